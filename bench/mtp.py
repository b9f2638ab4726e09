"""``make bench``'s Mailio-protocol part (``python -m bench.mtp``): signed envelopes a peer server sends,
verified and accepted per second, against Postal deliveries accepted per second in the same run.

Issue 8's goal: the receive path (``POST /api/v1/mtp/message``) with the peer's key cached takes at least
0.8 times as many messages per second as the Postal inbound path (``POST /postal/inbound``). Both run
in-process through the Flask test client (no HTTP server, no network: the request path's own cost), on
one bridge with a private redis-server and the filesystem object store with fsync (the default), the
peer's key served by a Knot started here (looked up once, then cached in Redis as in production):

* **postal**: N deliveries of a ~2 KB message, signed as Postal signs them (RSA), unsigned by DKIM (no DNS):
  signature checked, message sealed to the owner, stored create-only, noted for filing;
* **mtp**: N envelopes built as the reference sends them (CBOR, Ed25519 by the peer's server key) carrying
  the same message sealed by the sender to the owner: envelope read, key from the cache, signature
  verified, CBOR decoded and checked, rate counted, replay cache, envelope stored create-only, filing job
  queued, receipt signed.

Rounds are interleaved (postal, mtp, postal, ...) and medians reported; every answer must be 200/202 (a
refusal stops the run).

Then **end to end, bridge A -> bridge B -> filed**: two bridges as in ``tests/test_mtp_e2e.py`` (a gunicorn
from ``gunicorn.conf.py`` and a ``python -m bridge worker`` each, A on 127.0.0.2 and B on 127.0.0.3, one
Redis database each, both server keys in Knot). After one warm-up message, N messages go to
``POST /api/v1/messages`` on A (plaintext, sealed by A's server, one after another); A's worker routes
them, resolves bob through B's signed DID look-up and posts the signed envelopes, B answers 202 and its
worker files them. Reported: messages filed per second (N over the time from the first send to the last
``filed_at`` at B), each message's latency from A's 202 to its ``filed_at`` (median, p90, max), when
A's last recipient became ``delivered`` (B's signed delivery messages closing the loop), and the latency
of single messages sent one at a time (no queue in front of them).

Only loopback is used; the servers started here are stopped by their PIDs. It writes bench/MTP.md and
prints it.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import cbor2
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge import context, create_app
from bridge.context import Bridge
from bridge.mailio.identity import generate_user_keys
from bridge.mailio.server_key import create_server_key, public_key_bytes
from bridge.sealing import Recipient, seal
from bridge.settings import Settings
from tests.dns_server import KnotDNS, KnotServer
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.servers import RedisServer

DOMAIN = "bench.example.test"
PEER = "peer.mailio.test"
OUT = Path(__file__).resolve().parent / "MTP.md"
SINGLES = 10  # end-to-end messages sent one at a time after the burst


def _message(n: int) -> bytes:
    return f"From: jane@{PEER}\r\nTo: owner@{DOMAIN}\r\nSubject: bench {n}\r\n\r\n{'x' * 1800}\r\n".encode()


def _postal_bodies(signer: PostalSigner, start: int, count: int) -> list[tuple[bytes, dict[str, str]]]:
    out = []
    for n in range(start, start + count):
        body = ruby_json(
            raw_payload(postal_id=n, rcpt_to=f"owner@{DOMAIN}", mail_from=f"jane@{PEER}", message=_message(n))
        )
        out.append((body, {**signer.sign_headers(body), "Content-Type": "application/json"}))
    return out


def _mtp_bodies(key: Ed25519PrivateKey, sender: str, kid: str, x25519: bytes, count: int) -> list[bytes]:
    out = []
    for n in range(count):
        sealed = seal(_message(n), [Recipient(kid, x25519)])
        body = {m: sealed.get(m, "") for m in ("aad", "ciphertext", "iv")}
        body["recipients"] = [
            {"encrypted_key": r["encrypted_key"], "header": r["header"]} for r in sealed["recipients"]
        ]
        body |= {"tag": sealed["tag"], "protected": sealed["protected"]}
        msg_id = uuid.uuid4().hex
        message: dict[str, Any] = {"type": "application/didcomm-encrypted+json", "id": msg_id, "from": sender}
        message["to"] = [kid]
        message |= {"thid": msg_id, "intent": "message", "body": body}
        payload = {"signatureScheme": "EdDSA_X25519", "timestamp": int(time.time() * 1000), "didCommMessage": message}
        raw = cbor2.dumps(payload)
        envelope = {
            "didCommRequest": payload,
            "cborPayloadBase64": base64.b64encode(raw).decode(),
            "signatureBase64": base64.b64encode(key.sign(raw)).decode(),
            "senderDomain": PEER,
        }
        out.append(json.dumps(envelope, separators=(",", ":")).encode())
    return out


def _round(client: Any, path: str, requests: list[tuple[bytes, dict[str, str]]], status: int) -> float:
    """Messages per second of one round; any other answer stops the run."""
    started = time.perf_counter()
    for body, headers in requests:
        answer = client.post(path, data=body, headers=headers)
        if answer.status_code != status:
            raise RuntimeError(f"{path} answered {answer.status_code}: {answer.get_data()[:200]!r}")
    return len(requests) / (time.perf_counter() - started)


def _measure(
    root: Path, redis_url: str, nameserver: str, peer_key: Ed25519PrivateKey, count: int, rounds: int
) -> dict[str, Any]:
    signer = PostalSigner()
    pem = root / "postal.pem"
    pem.write_bytes(signer.public_pem())
    key_file = root / "server.key"
    create_server_key(key_file)
    env = {
        "BRIDGE_DOMAIN": DOMAIN,
        "BRIDGE_DATA_DIR": str(root / "data"),
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_DNS_NAMESERVERS": nameserver,
        "BRIDGE_POSTAL_PUBLIC_KEY": str(pem),
        "BRIDGE_SERVER_KEY_FILE": str(key_file),
        "BRIDGE_MTP_RATE_LIMIT": "1000000",
        "BRIDGE_LOG_LEVEL": "WARNING",
    }
    app = create_app(Settings.from_env(env))
    bridge = app.extensions["bridge"]
    context.use(bridge)
    keys = generate_user_keys()
    mailbox = bridge.mailboxes.add(f"owner@{DOMAIN}", keys.ed25519_public, keys.x25519_public)
    client = app.test_client()
    sender = f"did:web:{PEER}#{generate_user_keys().address}"
    kid = f"did:web:{DOMAIN}#{mailbox.address}"
    json_headers = {"Content-Type": "application/json"}
    first_started = time.perf_counter()
    [warm] = _mtp_bodies(peer_key, sender, kid, keys.x25519_public, 1)
    _round(client, "/api/v1/mtp/message", [(warm, json_headers)], 202)  # the one discovery, then cached
    first = time.perf_counter() - first_started
    postal, mtp = [], []
    for r in range(rounds):
        postal_requests = _postal_bodies(signer, 1 + r * count, count)
        mtp_requests = [(b, json_headers) for b in _mtp_bodies(peer_key, sender, kid, keys.x25519_public, count)]
        postal.append(_round(client, "/postal/inbound", postal_requests, 200))
        mtp.append(_round(client, "/api/v1/mtp/message", mtp_requests, 202))
    stored = len(list(bridge.objects.list("mtp/inbound/")))
    if stored != rounds * count + 1:
        raise RuntimeError(f"{stored} envelopes stored, {rounds * count + 1} expected")
    context.use(None)
    return {"postal": postal, "mtp": mtp, "first": first}


def _end_to_end(root: Path, redis_url: str, knot: KnotDNS, count: int) -> dict[str, Any]:
    """N messages A -> B through two real bridges; see the module docstring."""
    from tests.test_mtp_e2e import bridge_processes, make_pair

    base = redis_url.rsplit("/", 1)[0]
    limits = {"BRIDGE_SEND_LIMIT_MESSAGES": "100000", "BRIDGE_SEND_LIMIT_RECIPIENTS": "100000"}
    (root / "e2e").mkdir()
    a, b = make_pair(root / "e2e", (f"{base}/2", f"{base}/3"), PostalSigner(), knot, **limits)
    for side in (a, b):
        side.env |= {"BRIDGE_MTP_RATE_LIMIT": "1000000", "BRIDGE_LOG_LEVEL": "WARNING"}
    assert a.owner is not None and b.owner is not None
    bob, bob_address = b.owner.mailbox.email, b.owner.mailbox.address
    index_b = Bridge(Settings.from_env(b.env)).index
    outbound_a = Bridge(Settings.from_env(a.env)).outbound
    session = requests.Session()
    session.headers.update(a.owner.auth)

    def send(n: int) -> tuple[str, float]:
        answer = session.post(f"{a.url}/api/v1/messages", json={"to": [bob], "text": f"bench {n} " + "x" * 1800})
        if answer.status_code != 202:
            raise RuntimeError(f"A answered {answer.status_code}: {answer.text[:200]}")
        return answer.json()["id"], time.time()

    def filed() -> dict[str, float]:
        records = index_b.listing(bob_address, "other", limit=count + 10)[0]
        return {r["mtp"]["id"]: r["filed_at"] for r in records if isinstance(r.get("mtp"), dict)}

    def wait(what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} after {timeout:.0f} s")
            time.sleep(0.05)

    def delivered(ids: list[str]) -> bool:
        return all(outbound_a.get(a.owner.mailbox.address, i)["recipients"][0]["state"] == "delivered" for i in ids)  # type: ignore[index,union-attr]

    logs = root / "e2e-logs"
    logs.mkdir()
    with bridge_processes((a, b), logs):
        warm_id, warm_sent = send(0)
        wait("the warm-up message was not filed at B", lambda: warm_id in filed(), 120)
        warm = filed()[warm_id] - warm_sent
        wait("the warm-up message was not delivered on A", lambda: delivered([warm_id]), 60)
        started = time.time()
        sent = dict(send(n) for n in range(1, count + 1))
        sending = time.time() - started
        wait(f"not all {count} messages were filed at B", lambda: len(filed()) >= count + 1, 60 + count)
        at_b = {i: t for i, t in filed().items() if i in sent}
        wait("not all were delivered on A", lambda: delivered(list(sent)), 60 + count)
        closed = time.time() - started
        alone = []  # one message at a time: the latency without a queue in front of it
        for n in range(count + 1, count + 1 + SINGLES):
            one, at = send(n)
            wait("a single message was not filed at B", lambda: one in filed(), 60)  # noqa: B023
            alone.append(filed()[one] - at)
    latencies = sorted(at_b[i] - sent[i] for i in sent)
    return {
        "count": count,
        "sending": sending,
        "rate": count / (max(at_b.values()) - started),
        "median": statistics.median(latencies),
        "p90": latencies[int(len(latencies) * 0.9) - 1],
        "max": latencies[-1],
        "closed": closed,
        "warm": warm,
        "alone": statistics.median(alone),
        "alone_max": max(alone),
        "filed_once": len(at_b) == count,
    }


def _report(result: dict[str, Any], count: int, rounds: int) -> str:
    postal, mtp = statistics.median(result["postal"]), statistics.median(result["mtp"])
    ratio = mtp / postal
    goal = "met" if ratio >= 0.8 else "**missed**"
    runs = " / ".join(f"{p:.0f} vs {m:.0f}" for p, m in zip(result["postal"], result["mtp"], strict=True))
    return f"""# `python -m bench.mtp`: the Mailio-protocol receive path against the Postal inbound path

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; {rounds} interleaved rounds of {count} messages
  (~2 KB each), in-process through the Flask test client; filesystem store with fsync, Redis on loopback.

| measure | Postal inbound | MTP receive (peer key cached) | ratio | goal |
|---|---|---|---|---|
| messages accepted per second (median of rounds) | {postal:.0f} | {mtp:.0f} | {ratio:.2f} | >= 0.8: {goal} |

Per round (Postal vs MTP, per second): {runs}. Every envelope was stored exactly once (checked). The
first MTP request, which looked the peer's key up in Knot, took {result["first"] * 1000:.0f} ms.
{_e2e_report(result["e2e"]) if result.get("e2e") else ""}"""


def _e2e_report(e2e: dict[str, Any]) -> str:
    ms = {k: e2e[k] * 1000 for k in ("median", "p90", "max", "warm", "alone", "alone_max")}
    burst = f"median {ms['median']:.0f} ms, p90 {ms['p90']:.0f}, max {ms['max']:.0f} ms"
    alone = f"**median {ms['alone']:.0f} ms**, max {ms['alone_max']:.0f} ms"
    return f"""
## End to end: bridge A -> bridge B -> filed

Two bridges as processes (gunicorn from gunicorn.conf.py with one web process, and one worker each; A on
127.0.0.2, B on 127.0.0.3; one Redis, a database each; file stores with fsync); {e2e["count"]} ~2 KB
messages sent one after another to A's `POST /api/v1/messages` (plaintext: A seals each to bob's key).

| measure | value |
|---|---|
| filed at B per second (first send to last `filed_at`) | **{e2e["rate"]:.1f} msg/s** |
| latency, A's 202 to B's `filed_at`, in that burst (queued) | {burst} |
| latency of one message alone ({SINGLES} sent one at a time, each after the last was filed) | {alone} |
| A's API taking the {e2e["count"]} messages | {e2e["sending"]:.1f} s ({e2e["count"] / e2e["sending"]:.0f}/s) |
| all {e2e["count"]} `delivered` on A (B's signed delivery messages) | {e2e["closed"]:.1f} s after the first send |
| the warm-up message (discovery, first DID look-up) | {ms["warm"]:.0f} ms to filed |

Each message was filed at B exactly once: {"yes" if e2e["filed_once"] else "**no**"}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mtp", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path")
    parser.add_argument("--e2e-count", type=int, default=100, help="messages bridge A -> bridge B (0: skip)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bridge-bench-mtp-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(root / "redis").start()
        knot = KnotServer(root / "knot")
        try:
            dns = knot.start()
            peer_key = Ed25519PrivateKey.generate()
            public = base64.b64encode(public_key_bytes(peer_key)).decode()
            dns.set_txt(f"mailio._mailiokey.{PEER}", f"v=MAILIO1; k=ed25519; p={public}")
            result = _measure(root, redis_server.url, dns.nameserver, peer_key, args.count, args.rounds)
            if args.e2e_count > 0:
                result["e2e"] = _end_to_end(root, redis_server.url, dns, args.e2e_count)
        finally:
            knot.stop()
            redis_server.stop()
    text = _report(result, args.count, args.rounds)
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
