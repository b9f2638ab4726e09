"""The Mailio leg of sending (bridge.mailio.peer_send, bridge.jobs.peer_outbound) against a peer on loopback.

The peer is a small HTTP server on 127.0.0.2 playing a Mailio server as mtp-wire.md describes it: it checks
our envelopes' signatures with the key our domain would publish, decodes the CBOR, answers DID look-ups and
messages signed by its own key (published in Knot), either in our form (the signed CBOR carries the DID
document) or the reference's (the CBOR's document has ``"id": {}`` and empty JWKs: the keys only in the
twin). The bridge runs for real: the send API, Redis, the store, discovery against Knot, the RQ worker.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge import context, create_app
from bridge.context import Bridge
from bridge.mailio.did import user_did_document
from bridge.mailio.identity import UserKeys, did_web, generate_user_keys, verify_ed25519
from bridge.mailio.peer_send import seal_for_peers
from bridge.mailio.server_key import create_server_key
from bridge.sealing import Recipient, open_sealed
from bridge.settings import Settings
from bridge.store.outbound import ACCEPTED, FAILED, QUEUED
from tests.conftest import Owner, bridge_environment, make_owner, run_worker
from tests.dns_server import KnotDNS
from tests.postal_sim import PostalSigner

pytestmark = pytest.mark.dns

MESSAGE_KEYS = [
    "type", "id", "from", "to", "toEmails", "thid", "pthid", "expiresTime", "createdTime", "next",
    "fromPrior", "intent", "body", "attachments", "plainBodyBase64",
]  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakePeer:
    """A Mailio server for one domain on 127.0.0.2: users, its key, and what it received."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes_raw()
        self.users: dict[str, tuple[str, UserKeys]] = {}  # e-mail hash -> (e-mail, keys)
        self.bridge_key: bytes | None = None  # the bridge's server public key: what its DNS would publish
        self.style = "ours"  # or "reference": the signed CBOR does not cover the DID document
        self.tamper_document = False  # did.json serves another key than the look-up answered
        self.fail_messages = 0  # answer 503 to this many messages first
        self.receipt_id: str | None = None  # a receipt naming another id
        self.wrong_receipt_key = False
        self.received: list[dict[str, Any]] = []  # decoded didCommRequests
        self.lookups = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                address = self.path.strip("/").removesuffix("/did.json")
                for _, keys in outer.users.values():
                    if keys.address == address:
                        served = generate_user_keys() if outer.tamper_document else keys  # someone else's
                        document = user_did_document(
                            outer.domain, served.address, served.ed25519_public, served.x25519_public
                        )
                        return self._json(200, document)
                return self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                document = json.loads(body)
                raw = base64.b64decode(document["cborPayloadBase64"])
                if not verify_ed25519(outer.bridge_key or b"", base64.b64decode(document["signatureBase64"]), raw):
                    return self._json(400, {"error": "signature does not verify"})
                payload = cbor2.loads(raw)
                if self.path == "/api/v1/mtp/did":
                    return self._json(200, outer.did_answer(payload))
                if self.path == "/api/v1/mtp/message":
                    outer.received.append(payload)
                    if outer.fail_messages > 0:
                        outer.fail_messages -= 1
                        return self._json(503, {"error": "busy"})
                    msg_id = outer.receipt_id or payload["didCommMessage"]["id"]
                    receipt = {
                        "signatureScheme": "EdDSA_X25519",
                        "timestamp": 1700000000000,
                        "didCommMessage": {"type": "", "id": msg_id, "from": ""},
                    }
                    signer = Ed25519PrivateKey.generate() if outer.wrong_receipt_key else outer.key
                    return self._json(202, outer.signed("didCommRequest", receipt, signer, outer.domain))
                return self._json(404, {"error": "no route"})

            def _json(self, status: int, document: Any) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.2:{self.port}"

    def add_user(self, email: str, email_hash: str) -> UserKeys:
        keys = generate_user_keys()
        self.users[email_hash] = (email, keys)
        return keys

    def signed(self, payload_key: str, payload: dict[str, Any], key: Ed25519PrivateKey, domain: str | None) -> dict:
        raw = cbor2.dumps(payload)
        body: dict[str, Any] = {
            payload_key: payload,
            "cborPayloadBase64": _b64(raw),
            "signatureBase64": _b64(key.sign(raw)),
        }
        if domain:
            body["senderDomain"] = domain
        return body

    def did_answer(self, request: dict[str, Any]) -> dict[str, Any]:
        self.lookups += 1
        found, twins = [], []
        for lookup in request["didLookups"]:
            user = self.users.get(lookup["emailHash"])
            if user is None:
                continue
            keys = user[1]
            document = user_did_document(self.domain, keys.address, keys.ed25519_public, keys.x25519_public)
            signed_document = document
            if self.style == "reference":  # Go types with private fields: nothing of the DID or keys is signed
                signed_document = json.loads(json.dumps(document))
                signed_document["id"] = {}
                for method in signed_document["verificationMethod"]:
                    method["publicKeyJwk"] = {"Key": {}}
                signed_document["keyAgreement"] = [{"id": {}, "type": "X25519KeyAgreementKey2019"}]
            base = {"emailHash": lookup["emailHash"], "email": lookup["email"]}
            found.append({**base, "supportsMailio": True, "didDocument": signed_document})
            twins.append({**base, "supportsMailio": True, "didDocument": document})
        header = {"signatureScheme": "EdDSA_X25519", "timestamp": 1700000000000}
        payload: dict[str, Any] = {"lookupHeader": header}
        if found:
            payload["foundLookups"] = found
        answer = self.signed("didLookupResponse", payload, self.key, None)
        if twins:
            answer["didLookupResponse"] = {**payload, "foundLookups": twins}
        return answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(name="peer")
def peer_fixture(knot_dns: KnotDNS) -> Iterator[FakePeer]:
    domain = f"p{secrets.token_hex(4)}.peer.test"
    peer = FakePeer(domain)
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", f"v=MAILIO1; k=ed25519; p={_b64(peer.public)}")
    yield peer
    peer.close()


@pytest.fixture(name="environment")
def environment_fixture(tmp_path: Path, redis_url: str, postal_signer: PostalSigner, peer: FakePeer) -> dict[str, str]:
    return bridge_environment(
        tmp_path,
        redis_url,
        postal_signer,
        BRIDGE_PEER_URLS=f"{peer.domain}={peer.url}",
        BRIDGE_PEER_ALLOWLIST="127.0.0.2/32",
        BRIDGE_ALLOW_INSECURE_PEERS="true",
        BRIDGE_PEER_TIMEOUT="2",
        BRIDGE_OUTBOUND_RETRY_DELAYS="0,0",  # retried at once, so the burst worker runs the retries
    )


@pytest.fixture(name="server_key")
def server_key_fixture(settings: Settings, peer: FakePeer) -> Ed25519PrivateKey:
    key = create_server_key(settings.server_key_path)
    peer.bridge_key = key.public_key().public_bytes_raw()
    return key


def _send(client: Any, owner: Owner, to: list[str], **fields: Any) -> str:
    answer = client.post(
        "/api/v1/messages", json={"to": to, "subject": "Hi", "text": "sealed hello", **fields}, headers=owner.auth
    )
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()["id"]


def _entry(bridge: Bridge, owner: Owner, msg_id: str, address: str) -> dict[str, Any]:
    record = bridge.outbound.get(owner.mailbox.address, msg_id)
    assert record is not None
    return next(e for e in record["recipients"] if e["address"] == address)


def _opened(payload: dict[str, Any], keys: UserKeys, email: str) -> bytes:
    return open_sealed(payload["didCommMessage"]["body"], keys.to_key_file(email)["encryption_key"])


def _hash(bridge: Bridge, email: str) -> str:
    return bridge.sender_hashes.lookup_hashes([email])[email.lower()]


# --- sending ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["ours", "reference"])
def test_a_mailio_recipient_gets_an_envelope_sealed_to_its_key_and_is_accepted_on_a_verified_receipt(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey, style: str
) -> None:
    peer.style = style
    bob = f"bob@{peer.domain}"
    bob_keys = peer.add_user(bob, _hash(bridge, bob))
    msg_id = _send(client, owner, [bob])
    run_worker(bridge)
    entry = _entry(bridge, owner, msg_id, bob)
    assert (entry["route"], entry["state"]) == ("mailio", ACCEPTED), entry["reason"]
    assert "signed receipt" in entry["reason"] and "sealed by the server" in entry["reason"]
    [payload] = peer.received
    # The envelope as the reference builds it: field order, integer milliseconds, the JWE's six members.
    assert list(payload) == ["signatureScheme", "timestamp", "didCommMessage"]
    message = payload["didCommMessage"]
    assert list(message) == [k for k in MESSAGE_KEYS if k in message]
    assert isinstance(payload["timestamp"], int) and message["id"] == message["thid"] == msg_id
    kid = did_web(peer.domain, bob_keys.address)
    assert message["from"] == did_web("mail.example.test", owner.mailbox.address) and message["to"] == [kid]
    assert list(message["body"]) == ["aad", "ciphertext", "iv", "recipients", "tag", "protected"]
    assert [list(r) for r in message["body"]["recipients"]] == [["encrypted_key", "header"]]
    assert message["body"]["recipients"][0]["header"]["kid"] == kid
    assert b"sealed hello" in _opened(payload, bob_keys, bob)
    # Where it went, so that only that server's signed delivery message may move it on.
    wanted = {"host": peer.domain, "address": bob_keys.address, "sealed_by": "server"}
    assert (entry["peer"], entry["did"]) == (wanted, kid)
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)  # handed over: the plaintext is gone


def test_an_unknown_user_fails_and_a_tampered_document_is_not_trusted(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey
) -> None:
    peer.style, peer.tamper_document = "reference", True
    bob, nobody = f"bob@{peer.domain}", f"nobody@{peer.domain}"
    peer.add_user(bob, _hash(bridge, bob))
    msg_id = _send(client, owner, [bob, nobody])
    run_worker(bridge)
    assert _entry(bridge, owner, msg_id, nobody)["state"] == FAILED
    assert "no such Mailio user" in _entry(bridge, owner, msg_id, nobody)["reason"]
    tampered = _entry(bridge, owner, msg_id, bob)
    assert tampered["state"] == FAILED and "differs from its lookup answer" in tampered["reason"]
    assert peer.received == []  # nothing was sealed to a key the bridge could not trust


def test_a_busy_peer_is_retried_with_the_same_id_and_accepted(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey
) -> None:
    bob = f"bob@{peer.domain}"
    peer.add_user(bob, _hash(bridge, bob))
    peer.fail_messages = 1
    msg_id = _send(client, owner, [bob])
    run_worker(bridge)
    assert _entry(bridge, owner, msg_id, bob)["state"] == ACCEPTED
    assert [p["didCommMessage"]["id"] for p in peer.received] == [msg_id, msg_id]


@pytest.mark.parametrize("fault", ["wrong_receipt_key", "receipt_id"])
def test_a_receipt_that_does_not_verify_or_names_another_id_is_not_accepted(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey, fault: str
) -> None:
    bob = f"bob@{peer.domain}"
    peer.add_user(bob, _hash(bridge, bob))
    if fault == "wrong_receipt_key":
        peer.wrong_receipt_key = True
    else:
        peer.receipt_id = "another-id"
    msg_id = _send(client, owner, [bob])
    run_worker(bridge)
    entry = _entry(bridge, owner, msg_id, bob)
    assert entry["state"] == FAILED and "gave up after retries" in entry["reason"]
    assert len(peer.received) == 3  # the first try and both retries: never accepted on a bad receipt


def test_without_a_server_key_mailio_recipients_stay_queued(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer
) -> None:
    bob = f"bob@{peer.domain}"
    msg_id = _send(client, owner, [bob])
    run_worker(bridge)
    entry = _entry(bridge, owner, msg_id, bob)
    assert (entry["route"], entry["state"], entry["reason"]) == ("mailio", QUEUED, "Mailio delivery not available yet")
    assert peer.lookups == 0 and peer.received == []


@pytest.mark.parametrize("via", ["peer_url", "txt_host"])
def test_a_peer_leading_to_a_refused_address_fails_without_a_connection(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, peer: FakePeer, knot_dns: KnotDNS, via: str
) -> None:
    """Only 127.0.0.2 and .3 are allowed: 127.0.0.1, named by BRIDGE_PEER_URLS or reached through the Mailio
    host a TXT record names (``mio.<domain>``, whose A record is 127.0.0.1), is refused before connecting."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.setblocking(False)
    port = trap.getsockname()[1]
    domain = peer.domain
    if via == "peer_url":
        urls = f"{domain}=http://127.0.0.1:{port}"
    else:
        domain = f"t{secrets.token_hex(4)}.peer.test"
        knot_dns.set_txt(f"mailio._mailiokey.mio.{domain}", f"v=MAILIO1; k=ed25519; p={_b64(peer.public)}")
        knot_dns.set_a(f"mio.{domain}", "127.0.0.1")
        urls = f"mio.{domain}=http://mio.{domain}:{port}"  # the port of the trap; the address from DNS
    env = bridge_environment(
        tmp_path,
        redis_url,
        postal_signer,
        BRIDGE_PEER_URLS=urls,
        BRIDGE_PEER_ALLOWLIST="127.0.0.2/32,127.0.0.3/32",
        BRIDGE_ALLOW_INSECURE_PEERS="true",
        BRIDGE_OUTBOUND_RETRY_DELAYS="0,0",
    )
    app = create_app(Settings.from_env(env))
    bridge: Bridge = app.extensions["bridge"]
    context.use(bridge)
    try:
        create_server_key(bridge.settings.server_key_path)
        owner = make_owner(bridge, "support@mail.example.test")
        bob = f"bob@{domain}"
        msg_id = _send(app.test_client(), owner, [bob])
        run_worker(bridge)
        entry = _entry(bridge, owner, msg_id, bob)
        assert entry["state"] == FAILED and "refused to connect to a loopback address" in entry["reason"]
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody ever connected
    finally:
        context.use(None)
        trap.close()


def test_a_rotated_peer_key_is_looked_up_again_once(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey, knot_dns: KnotDNS
) -> None:
    bob = f"bob@{peer.domain}"
    peer.add_user(bob, _hash(bridge, bob))
    first = _send(client, owner, [bob])
    run_worker(bridge)  # the peer's key is now in discovery's cache
    assert _entry(bridge, owner, first, bob)["state"] == ACCEPTED
    peer.key = Ed25519PrivateKey.generate()  # the peer rotates its key and publishes the new one
    knot_dns.set_txt(
        f"mailio._mailiokey.{peer.domain}", f"v=MAILIO1; k=ed25519; p={_b64(peer.key.public_key().public_bytes_raw())}"
    )
    second = _send(client, owner, [bob])
    run_worker(bridge)
    assert _entry(bridge, owner, second, bob)["state"] == ACCEPTED
    assert [p["didCommMessage"]["id"] for p in peer.received] == [first, second]  # no retry was needed


def test_a_document_whose_address_does_not_derive_from_its_key_is_refused(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey
) -> None:
    bob = f"bob@{peer.domain}"
    keys = peer.add_user(bob, _hash(bridge, bob))
    impostor = generate_user_keys()  # the answer claims bob's address with another key
    peer.users[_hash(bridge, bob)] = (bob, keys)
    original = peer.did_answer

    def forged(request: dict[str, Any]) -> dict[str, Any]:
        answer = original(request)
        for name in ("didLookupResponse",):
            for found in answer[name].get("foundLookups", []):
                found["didDocument"]["verificationMethod"][0]["publicKeyJwk"]["x"] = (
                    base64.urlsafe_b64encode(impostor.ed25519_public).decode().rstrip("=")
                )
        payload = answer["didLookupResponse"]
        return peer.signed("didLookupResponse", payload, peer.key, None)  # signed: only the binding is wrong

    peer.did_answer = forged  # type: ignore[method-assign]
    msg_id = _send(client, owner, [bob])
    run_worker(bridge)
    entry = _entry(bridge, owner, msg_id, bob)
    assert entry["state"] == FAILED and "does not derive from its #master key" in entry["reason"]
    assert peer.received == []


# --- resolving for the owner's client -------------------------------------------------------------------------


def test_resolve_answers_route_kid_and_document_per_address(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey
) -> None:
    bob = f"bob@{peer.domain}"
    bob_keys = peer.add_user(bob, _hash(bridge, bob))
    did = did_web(peer.domain, bob_keys.address)
    answer = client.post(
        "/api/v1/recipients/resolve", json={"addresses": [bob, f"eve@{peer.domain}", did]}, headers=owner.auth
    )
    assert answer.status_code == 200, answer.get_json()
    by_address = {r["address"]: r for r in answer.get_json()["recipients"]}
    assert by_address[bob]["route"] == "mailio" and by_address[bob]["kid"] == did
    assert by_address[bob]["did_document"]["id"] == f"did:mailio:{bob_keys.address}"
    assert by_address[did]["kid"] == did and by_address[did]["did_document"]["keyAgreement"]
    assert by_address[f"eve@{peer.domain}"]["kid"] is None
    assert "no such Mailio user" in by_address[f"eve@{peer.domain}"]["reason"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic c3VwcG9ydDp4"},
        {"Authorization": "Bearer "},
    ],
)
def test_resolve_needs_the_owners_token(client: Any, owner: Owner, headers: dict[str, str], peer: FakePeer) -> None:
    answer = client.post("/api/v1/recipients/resolve", json={"addresses": [f"bob@{peer.domain}"]}, headers=headers)
    assert answer.status_code == 401 and answer.get_json() == {"error": "missing or unknown bearer token"}
    assert peer.lookups == 0


def test_resolve_refuses_malformed_input_and_answers_routes_only_without_a_server_key(
    client: Any, owner: Owner, peer: FakePeer
) -> None:
    for document, wanted in [
        ({"addresses": "bob@x.test"}, "give"),
        ({"addresses": []}, "give"),
        ({"addresses": [1]}, "give"),
        ({"addresses": ["not an address"]}, "neither an e-mail address nor a did:web"),
        ({"addresses": [f"u{i}@x.test" for i in range(21)]}, "at most 20"),
    ]:
        answer = client.post("/api/v1/recipients/resolve", json=document, headers=owner.auth)
        assert answer.status_code == 400 and wanted in answer.get_json()["error"]
    answer = client.post("/api/v1/recipients/resolve", json={"addresses": [f"bob@{peer.domain}"]}, headers=owner.auth)
    assert answer.status_code == 200
    [found] = answer.get_json()["recipients"]
    assert (found["route"], found["kid"]) == ("mailio", None) and "no server key" in found["reason"]
    assert peer.lookups == 0


# --- a body the owner's client sealed ------------------------------------------------------------------------


def test_a_client_sealed_body_is_sent_as_sealed_trimmed_to_the_hosts_recipients(
    client: Any, bridge: Bridge, owner: Owner, peer: FakePeer, server_key: Ed25519PrivateKey
) -> None:
    bob = f"bob@{peer.domain}"
    bob_keys = peer.add_user(bob, _hash(bridge, bob))
    other = generate_user_keys()  # a recipient on another host: its entry must not travel to this one
    recipients = [
        Recipient(did_web(peer.domain, bob_keys.address), bob_keys.x25519_public),
        Recipient(did_web("elsewhere.test", other.address), other.x25519_public),
        owner.mailbox.recipient("mail.example.test"),
    ]
    sealed = seal_for_peers(b"Subject: e2e\r\n\r\nonly the client saw this", recipients, b'{"from":"x"}')
    answer = client.post("/api/v1/messages", json={"to": [bob], "sealed": sealed}, headers=owner.auth)
    assert answer.status_code == 202, answer.get_json()
    msg_id = answer.get_json()["id"]
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)  # the server never had the plaintext
    assert bridge.messages.get_record(owner.mailbox.address, msg_id)["sealed_by"] == "client"
    assert open_sealed(json.loads(bridge.messages.get_body(owner.mailbox.address, msg_id)), owner.private_jwk).endswith(
        b"only the client saw this"
    )
    run_worker(bridge)
    entry = _entry(bridge, owner, msg_id, bob)
    assert entry["state"] == ACCEPTED and "sealed by the owner's client" in entry["reason"]
    assert entry["peer"]["sealed_by"] == "client"
    [payload] = peer.received
    body = payload["didCommMessage"]["body"]
    assert [r["header"]["kid"] for r in body["recipients"]] == [did_web(peer.domain, bob_keys.address)]
    assert body["ciphertext"] == sealed["ciphertext"]  # as the client sealed it
    assert _opened(payload, bob_keys, bob).endswith(b"only the client saw this")


@pytest.mark.parametrize(
    ("change", "wanted"),
    [
        (lambda s: "not a jwe", "General JSON JWE"),
        (lambda s: {**s, "aad": ""}, "aad is missing"),
        (lambda s: {**s, "protected": base64.urlsafe_b64encode(b'{"enc":"A256GCM"}').decode().rstrip("=")}, "alg"),
        (lambda s: {**s, "recipients": [{"header": {"kid": "x"}, "encrypted_key": "e"}]}, "epk"),
        (lambda s: {**s, "recipients": s["recipients"][:1]}, "owner's own key"),
    ],
)
def test_a_malformed_client_sealed_body_is_400(
    client: Any, bridge: Bridge, owner: Owner, change: Callable[[dict], Any], wanted: str
) -> None:
    other = generate_user_keys()
    sealed = seal_for_peers(
        b"x",
        [
            Recipient("did:web:a.test#" + other.address, other.x25519_public),
            owner.mailbox.recipient("mail.example.test"),
        ],
        b"a",
    )
    answer = client.post("/api/v1/messages", json={"to": ["bob@a.test"], "sealed": change(sealed)}, headers=owner.auth)
    assert answer.status_code == 400 and wanted in answer.get_json()["error"]
    answer = client.post(
        "/api/v1/messages", json={"to": ["bob@a.test"], "sealed": sealed, "subject": "x"}, headers=owner.auth
    )
    assert answer.status_code == 400 and "to, cc, bcc and from only" in answer.get_json()["error"]


# --- the CLI seals on the owner's machine ---------------------------------------------------------------------


def test_mail_send_with_key_seals_on_the_client_and_refuses_smtp_recipients(
    live_url: str,
    bridge: Bridge,
    owner: Owner,
    peer: FakePeer,
    server_key: Ed25519PrivateKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    knot_dns: KnotDNS,
) -> None:
    from bridge.__main__ import main

    bob = f"bob@{peer.domain}"
    bob_keys = peer.add_user(bob, _hash(bridge, bob))
    key_path = tmp_path / "owner.json"
    key_path.write_text(json.dumps(owner.keys.to_key_file(owner.mailbox.email)))
    base = ["mail", "send", "--url", live_url, "--token", owner.token, "--key", str(key_path), "--subject", "E2E"]
    assert main([*base, "--to", bob, "--text", "never seen by the server"]) == 0
    msg_id = json.loads(capsys.readouterr().out)["id"]
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)
    record = bridge.messages.get_record(owner.mailbox.address, msg_id)
    assert record is not None and record["sealed_by"] == "client"
    run_worker(bridge)
    assert _entry(bridge, owner, msg_id, bob)["state"] == ACCEPTED
    assert b"never seen by the server" in _opened(peer.received[0], bob_keys, bob)
    own_copy = json.loads(bridge.messages.get_body(owner.mailbox.address, msg_id) or b"{}")
    assert b"never seen by the server" in open_sealed(own_copy, owner.private_jwk)  # the owner opens the sent copy

    smtp_domain = f"s{secrets.token_hex(4)}.example.test"
    knot_dns.set(smtp_domain, "MX", "10 mx.example.test.")
    assert main([*base, "--to", bob, "--to", f"carol@{smtp_domain}", "--text", "x"]) == 1
    assert f"carol@{smtp_domain} cannot get mail sealed on this machine (smtp" in capsys.readouterr().err
    assert len(peer.received) == 1  # nothing submitted
