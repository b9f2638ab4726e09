"""Issue 8's "Done when" across two bridges: a message written on bridge A's CLI to a user of bridge B arrives in
B's store sealed end to end (A never held the plaintext), and A's state for that recipient reaches
``delivered`` from B's signed delivery message.

Real parts, all on loopback: two gunicorns (A on 127.0.0.2, B on 127.0.0.3) with the repository's
gunicorn.conf.py and a ``python -m bridge worker`` each; one Redis server, a database each; a filesystem store,
data directory, domain and server key each; both domains' ``mailio._mailiokey`` TXT records in Knot. The
peer client may reach only 127.0.0.2 and 127.0.0.3 (``BRIDGE_PEER_ALLOWLIST``), over http because these
are tests (``BRIDGE_ALLOW_INSECURE_PEERS``); ``BRIDGE_PEER_URLS`` says where each domain's bridge listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bridge.context import Bridge
from bridge.mailio.did import parse_did_document
from bridge.mailio.peer_send import seal_for_peers
from bridge.mailio.server_key import create_server_key, txt_record
from bridge.sealing import Recipient, open_sealed
from bridge.settings import Settings
from tests.conftest import Owner, bridge_environment, make_owner
from tests.dns_server import KnotDNS
from tests.postal_sim import PostalSigner
from tests.servers import ServerStartError, free_port, stop_process

pytestmark = pytest.mark.dns
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Side:
    domain: str
    host: str
    port: int
    env: dict[str, str]
    data: Path
    owner: Owner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str) -> Any:
        assert self.owner is not None
        answer = requests.get(f"{self.url}{path}", headers=self.owner.auth, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()


@contextlib.contextmanager
def bridge_processes(sides: tuple[Side, ...], logs: Path) -> Iterator[None]:
    """gunicorn on each ``side.host:side.port`` and a worker each, started together; stopped by PID."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for side in sides:
            env = {**os.environ, **side.env, "BRIDGE_WEB_WORKERS": "1", "BRIDGE_LISTEN": f"{side.host}:{side.port}"}
            env["PYTHONPATH"] = str(ROOT)
            for kind, command in (
                ("gunicorn", ["-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "wsgi:app"]),
                ("worker", ["-m", "bridge", "worker"]),
            ):
                with (logs / f"{kind}-{side.host}.log").open("wb") as log:
                    processes.append(
                        subprocess.Popen(
                            [sys.executable, *command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                        )
                    )
        deadline = time.monotonic() + 60
        for side in sides:
            while True:
                if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                    raise ServerStartError(f"a bridge did not start: {_logs(logs)}")
                try:
                    if requests.get(f"{side.url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
        yield
    finally:
        for process in processes:
            process.terminate()  # all at once: each takes a moment to stop
        for process in processes:
            stop_process(process)


def _logs(logs: Path) -> str:
    return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.iterdir()))


def make_side(
    root: Path, name: str, domain: str, host: str, redis_url: str, signer: PostalSigner, knot: KnotDNS
) -> Side:
    data = root / name
    data.mkdir()
    env = bridge_environment(
        data,
        redis_url,
        signer,
        nameserver=knot.nameserver,
        BRIDGE_DOMAIN=domain,
        BRIDGE_PEER_ALLOWLIST="127.0.0.2/32,127.0.0.3/32",
        BRIDGE_ALLOW_INSECURE_PEERS="true",
        BRIDGE_PEER_TIMEOUT="5",
        BRIDGE_OUTBOUND_RETRY_DELAYS="1,1,1,1,1",
        BRIDGE_LOG_LEVEL="INFO",
    )
    return Side(domain, host, free_port(), env, data)


def make_pair(
    root: Path, redis_urls: tuple[str, str], signer: PostalSigner, knot: KnotDNS, **extra: str
) -> tuple[Side, Side]:
    """Bridges A (alice, 127.0.0.2) and B (bob, 127.0.0.3), each told where the other listens, their server
    keys made and published in Knot, ready for :func:`bridge_processes` (``extra``: more settings for both;
    ``bench.mtp`` uses this too)."""
    tag = uuid.uuid4().hex[:10]
    a = make_side(root, "a", f"a{tag}.mailio.test", "127.0.0.2", redis_urls[0], signer, knot)
    b = make_side(root, "b", f"b{tag}.mailio.test", "127.0.0.3", redis_urls[1], signer, knot)
    for this, other in ((a, b), (b, a)):
        this.env |= extra
        this.env["BRIDGE_PUBLIC_URL"] = this.url
        this.env["BRIDGE_PEER_URLS"] = f"{other.domain}={other.url}"
        settings = Settings.from_env(this.env)
        knot.set_txt(f"mailio._mailiokey.{this.domain}", txt_record(create_server_key(settings.server_key_path)))
        this.owner = make_owner(Bridge(settings), f"{'alice' if this is a else 'bob'}@{this.domain}")
    return a, b


@pytest.fixture(name="sides")
def sides_fixture(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, knot_dns: KnotDNS
) -> Iterator[tuple[Side, Side]]:
    a, b = make_pair(tmp_path, (redis_url, redis_url.rsplit("/", 1)[0] + "/1"), postal_signer, knot_dns)
    logs = tmp_path / "logs"
    logs.mkdir()
    with bridge_processes((a, b), logs):
        yield a, b


def _stored_entry(side: Side, msg_id: str, address: str) -> dict[str, Any]:
    """The outbound record's entry as the store keeps it (the owner API shows fewer fields)."""
    assert side.owner is not None
    record = Bridge(Settings.from_env(side.env)).outbound.get(side.owner.mailbox.address, msg_id)
    assert record is not None
    return next(e for e in record["recipients"] if e["address"] == address)


def _wait(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: still {last!r}")


def test_a_message_sealed_on_a_s_cli_reaches_b_sealed_and_a_learns_it_was_delivered(
    sides: tuple[Side, Side], tmp_path: Path
) -> None:
    a, b = sides
    assert a.owner is not None and b.owner is not None
    key_file = tmp_path / "alice.json"
    key_file.write_text(json.dumps(a.owner.keys.to_key_file(a.owner.mailbox.email)))
    secret = f"only alice and bob can read this {uuid.uuid4().hex}"
    env = {**os.environ, "BRIDGE_API_URL": a.url, "BRIDGE_API_TOKEN": a.owner.token}
    command = [
        "mail",
        "send",
        "--key",
        str(key_file),
        "--to",
        b.owner.mailbox.email,
        "--subject",
        "Hi",
        "--text",
        secret,
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bridge", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    msg_id = json.loads(done.stdout)["id"]
    bob = b.owner.mailbox.email

    def bobs_state() -> dict[str, Any] | None:
        entry = next(r for r in a.get(f"/api/v1/messages/{msg_id}")["recipients"] if r["address"] == bob)
        return entry if entry["state"] == "delivered" else None

    try:
        entry = _wait("bob's state on A", bobs_state)
    except AssertionError:
        state = a.get(f"/api/v1/messages/{msg_id}")["recipients"]
        raise AssertionError(f"{state}\n{_logs(tmp_path / 'logs')}") from None
    assert entry["route"] == "mailio" and entry["reason"].startswith("2.0.0")
    assert _stored_entry(a, msg_id, bob)["peer"] == {
        "host": b.domain,
        "address": b.owner.mailbox.address,
        "sealed_by": "client",
    }

    # B filed it for bob (screened: alice has no handshake with him), sealed: his key opens it, the server's can't.
    def bobs_copy() -> dict[str, Any] | None:
        for folder in ("inbox", "other", "handshake"):
            for message in b.get(f"/api/v1/messages?folder={folder}")["messages"]:
                return b.get(f"/api/v1/messages/{message['id']}")
        return None

    copy = _wait("bob's copy on B", bobs_copy)
    assert secret.encode() in open_sealed(copy["body"], b.owner.private_jwk)
    assert [r["header"]["kid"] for r in copy["body"]["recipients"]] == [f"did:web:{b.domain}#{b.owner.mailbox.address}"]

    # A never held the plaintext: no spool copy, and no byte of it anywhere in A's (or B's) store.
    for side in (a, b):
        stored = [p for p in (side.data / "data" / "objects").rglob("*") if p.is_file()]
        assert stored and not any(secret.encode() in p.read_bytes() for p in stored)
        assert not any("spool" in p.parts for p in stored if side is a)
    sent = a.get(f"/api/v1/messages/{msg_id}")
    assert sent.get("sealed_by") == "client" and secret.encode() in open_sealed(sent["body"], a.owner.private_jwk)

    # Plaintext from a client without a key: A seals it to bob's key itself, and the record says so.
    answer = requests.post(
        f"{a.url}/api/v1/messages",
        json={"to": [bob], "subject": "plain", "text": "sealed by A's server"},
        headers=a.owner.auth,
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    msg_id = answer.json()["id"]
    _wait("bob's state on A (server-sealed)", bobs_state)
    assert _stored_entry(a, msg_id, bob)["peer"]["sealed_by"] == "server"


def _cli(side: Side, *command: str) -> str:
    """``python -m bridge ...`` against ``side``'s API with its owner's token; its stdout."""
    assert side.owner is not None
    env = {**os.environ, "BRIDGE_API_URL": side.url, "BRIDGE_API_TOKEN": side.owner.token}
    done = subprocess.run(
        [sys.executable, "-m", "bridge", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _key_file(side: Side, path: Path) -> str:
    assert side.owner is not None
    path.write_text(json.dumps(side.owner.keys.to_key_file(side.owner.mailbox.email)))
    return str(path)


def test_a_handshake_request_across_servers_then_approval_brings_alices_mail_to_bobs_inbox(
    sides: tuple[Side, Side], tmp_path: Path, knot_dns: KnotDNS
) -> None:
    a, b = sides
    assert a.owner is not None and b.owner is not None
    alice_key, bob_key = _key_file(a, tmp_path / "alice.json"), _key_file(b, tmp_path / "bob.json")
    bob = b.owner.mailbox.email

    def state_on_a(msg_id: str, wanted: str) -> dict[str, Any] | None:
        entry = next(r for r in a.get(f"/api/v1/messages/{msg_id}")["recipients"] if r["address"] == bob)
        return entry if entry["state"] == wanted else None

    def folder_on_b(folder: str) -> list[dict[str, Any]]:
        return list(b.get(f"/api/v1/messages?folder={folder}")["messages"])

    # bob asks B for an offer (his CLI) and gives it to alice; alice's CLI on A sends a handshake request with it.
    offer = json.loads(_cli(b, "handshake", "offer"))["offer"]
    assert offer.split(":")[1:] == [b.domain, b.owner.mailbox.address]
    secret = f"may I write to you, bob? {uuid.uuid4().hex}"
    sent = _cli(a, "mail", "send", "--key", alice_key, "--to", bob, "--text", secret, "--handshake-offer", offer)
    request_id = json.loads(sent)["id"]
    try:
        entry = _wait("the handshake request's state on A", lambda: state_on_a(request_id, "delivered"))
    except AssertionError:
        raise AssertionError(f"{a.get(f'/api/v1/messages/{request_id}')}\n{_logs(tmp_path / 'logs')}") from None
    assert entry["reason"].startswith("2.0.0")
    assert entry["peer"] == {"host": b.domain, "sealed_by": "client"}  # the owner API shows where it went
    (filed,) = _wait("the request in bob's handshake folder", lambda: folder_on_b("handshake"))
    copy = b.get(f"/api/v1/messages/{filed['id']}")
    assert copy["mtp"]["intent"] == "handshake_request" and copy["sender"]["from"].startswith(f"did:web:{a.domain}#")
    assert secret.encode() in open_sealed(copy["body"], b.owner.private_jwk)

    # The same offer again: B does not honour a used nonce (5.8.9 back to A), nothing more is filed.
    answer = requests.post(
        f"{a.url}/api/v1/messages",
        json={"to": [bob], "text": "again with the same nonce", "handshake_offer": offer},
        headers=a.owner.auth,
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    refused = _wait("the reused offer's state on A", lambda: state_on_a(answer.json()["id"], "failed"))
    assert refused["reason"].startswith("5.8.9")
    assert len(folder_on_b("handshake")) == 1 and folder_on_b("inbox") == []

    # bob's offer on a message to carl, another user of B: A sends nothing and says whose offer it is.
    carl = make_owner(Bridge(Settings.from_env(b.env)), f"carl@{b.domain}")
    fresh = requests.post(f"{b.url}/api/v1/handshake-offers", headers=b.owner.auth, timeout=10).json()["offer"]
    answer = requests.post(
        f"{a.url}/api/v1/messages",
        json={"to": [carl.mailbox.email], "text": "not for carl", "handshake_offer": fresh},
        headers=a.owner.auth,
        timeout=10,
    )
    assert answer.status_code == 202, answer.text

    def carls_state() -> dict[str, Any] | None:
        (entry,) = a.get(f"/api/v1/messages/{answer.json()['id']}")["recipients"]
        return entry if entry["state"] == "failed" else None

    reason = _wait("carl's state on A", carls_state)["reason"]
    assert reason == f"the handshake offer is {b.owner.mailbox.address}'s at {b.domain}, not this recipient's"
    assert Bridge(Settings.from_env(b.env)).offers.redeem(fresh.split(":")[0]) == b.owner.mailbox.address

    # A malformed offer, or an offer with more than its owner as recipients: 400 naming the field.
    for fields in ({"to": [bob], "handshake_offer": "nonce:only"}, {"to": [bob, "x@a.test"], "handshake_offer": offer}):
        answer = requests.post(
            f"{a.url}/api/v1/messages", json={**fields, "text": "x"}, headers=a.owner.auth, timeout=10
        )
        assert answer.status_code == 400 and answer.json()["error"].startswith("handshake_offer: "), answer.text

    # bob approves alice (her full did:web sender key) on B; her next message from A's CLI reaches his inbox.
    alice_did = copy["sender"]["from"]
    assert alice_did == f"did:web:{a.domain}#{a.owner.mailbox.address}"
    approved = json.loads(_cli(b, "handshake", "approve", alice_did, "--key", bob_key))
    assert approved["status"] == "accepted"
    secret = f"thanks for accepting {uuid.uuid4().hex}"
    msg_id = json.loads(_cli(a, "mail", "send", "--key", alice_key, "--to", bob, "--text", secret))["id"]
    assert _wait("alice's message on A", lambda: state_on_a(msg_id, "delivered"))["reason"].startswith("2.0.0")
    (inbox,) = _wait("alice's message in bob's inbox", lambda: folder_on_b("inbox"))
    assert secret.encode() in open_sealed(b.get(f"/api/v1/messages/{inbox['id']}")["body"], b.owner.private_jwk)

    # A body the client sealed cannot go to an SMTP recipient: that one fails saying so, bob still gets it.
    smtp_domain = f"s{uuid.uuid4().hex[:8]}.example.test"
    knot_dns.set(smtp_domain, "MX", "10 mx.example.test.")
    carol = f"carol@{smtp_domain}"
    resolved = requests.post(
        f"{a.url}/api/v1/recipients/resolve", json={"addresses": [bob]}, headers=a.owner.auth, timeout=10
    ).json()
    bobs = resolved["recipients"][0]
    to = [Recipient(bobs["kid"], parse_did_document(bobs["did_document"]).x25519_public or b"")]
    to.append(Recipient(resolved["owner"]["kid"], a.owner.keys.x25519_public))
    sealed = seal_for_peers(b"Subject: both\r\n\r\nsealed on the client", to, b'{"from":"alice"}')
    answer = requests.post(
        f"{a.url}/api/v1/messages", json={"to": [bob, carol], "sealed": sealed}, headers=a.owner.auth, timeout=10
    )
    assert answer.status_code == 202, answer.text
    msg_id = answer.json()["id"]

    def carols() -> dict[str, Any] | None:
        entry = next(r for r in a.get(f"/api/v1/messages/{msg_id}")["recipients"] if r["address"] == carol)
        return entry if entry["state"] == "failed" else None

    assert _wait("carol's state on A", carols)["reason"].startswith("sealed by the client: SMTP recipients need")
    assert _wait("bob's state on A", lambda: state_on_a(msg_id, "delivered"))["peer"]["sealed_by"] == "client"
