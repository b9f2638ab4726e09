"""Receiving over the Mailio transfer protocol: a peer server (its key published in the suite's Knot, its
HTTP endpoint a small server on loopback) POSTs envelopes built field for field as mtp-wire.md shows them
(Go key order, integer milliseconds); the bridge answers with its signed receipt, files one copy per local
recipient by the handshake rules through the real worker, and sends the signed delivery message back.
Every refusal is answered with its code and stores nothing."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask, Response, request
from werkzeug.serving import make_server

from bridge import context, create_app
from bridge.context import Bridge
from bridge.mailio.handshakes import parse_signed_handshake, sign_handshake
from bridge.mailio.identity import email_lookup_hash, generate_user_keys, mailio_address
from bridge.mailio.server_key import create_server_key, public_key_bytes
from bridge.sealing import Recipient, open_sealed, seal
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner, run_worker

pytestmark = pytest.mark.dns


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def now_ms() -> int:
    return int(time.time() * 1000)


# --- a peer server: its key in Knot, its endpoint on loopback ------------------------------------------


@dataclass
class Peer:
    domain: str
    key: Ed25519PrivateKey
    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    user: Any = field(default_factory=generate_user_keys)
    status: int = 202  # what its message endpoint answers (a signed receipt only with 202)

    @property
    def sender_did(self) -> str:
        return f"did:web:{self.domain}#{self.user.address}"

    def envelope(
        self, payload: dict[str, Any], *, key: Ed25519PrivateKey | None = None, domain: str | None = None
    ) -> bytes:
        """The JSON body exactly as the reference sends it: twin, CBOR base64, signature, senderDomain."""
        raw = cbor2.dumps(payload)
        body = {
            "didCommRequest": payload,
            "cborPayloadBase64": b64(raw),
            "signatureBase64": b64((key or self.key).sign(raw)),
            "senderDomain": domain or self.domain,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def signed(self, payload_key: str, payload: dict[str, Any]) -> bytes:
        raw = cbor2.dumps(payload)
        body = {payload_key: payload, "cborPayloadBase64": b64(raw), "signatureBase64": b64(self.key.sign(raw))}
        return json.dumps({**body, "senderDomain": self.domain}).encode()


def publish(knot_dns: Any, domain: str, key: Ed25519PrivateKey) -> None:
    knot_dns.set_txt(f"mailio._mailiokey.{domain}", f"v=MAILIO1; k=ed25519; p={b64(public_key_bytes(key))}", ttl=1)


def serve_peer(peer: Peer) -> Iterator[Peer]:
    """The peer's /.well-known/did.json and /api/v1/mtp/message (it records and signs a receipt)."""
    app = Flask("peer")

    @app.get("/.well-known/did.json")
    def did() -> Any:
        address = mailio_address(public_key_bytes(peer.key))
        return {
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": f"did:mailio:{address}",
            "verificationMethod": [
                {
                    "id": f"did:mailio:{address}#master",
                    "type": "JsonWebKey2020",
                    "controller": f"did:mailio:{address}",
                    "publicKeyJwk": {
                        "kty": "OKP",
                        "crv": "Ed25519",
                        "x": base64.urlsafe_b64encode(public_key_bytes(peer.key)).rstrip(b"=").decode(),
                    },
                }
            ],
            "service": [{"id": "s", "type": "DIDCommMessaging", "serviceEndpoint": f"{peer.url}/api/v1/mtp/message"}],
        }

    @app.post("/api/v1/mtp/message")
    def message() -> Response:
        body = request.get_json()
        peer.received.append(body)
        if peer.status != 202:
            return Response("unavailable", peer.status)
        msg_id = body["didCommRequest"]["didCommMessage"]["id"]
        receipt = {
            "signatureScheme": "EdDSA_X25519",
            "timestamp": now_ms(),
            "didCommMessage": {"type": "", "id": msg_id, "from": ""},
        }
        return Response(peer.signed("didCommRequest", receipt), 202, mimetype="application/json")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    peer.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield peer
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def peer(knot_dns: Any) -> Iterator[Peer]:
    found = Peer(f"a{uuid.uuid4().hex[:10]}.mailio.test", Ed25519PrivateKey.generate())
    publish(knot_dns, found.domain, found.key)
    yield from serve_peer(found)


def peer_environment(tmp_path: Path, redis_url: str, postal_signer: Any, peer: Peer, **extra: str) -> dict[str, str]:
    """A bridge with a server key that reaches ``peer`` on loopback; delivery messages retried once at once."""
    key_file = tmp_path / "server.key"
    create_server_key(key_file)
    settings = {
        "BRIDGE_SERVER_KEY_FILE": str(key_file),
        "BRIDGE_PEER_URLS": f"{peer.domain}={peer.url}",
        "BRIDGE_ALLOW_INSECURE_PEERS": "true",
        "BRIDGE_PEER_ALLOWLIST": "127.0.0.1/32",
        "BRIDGE_OUTBOUND_RETRY_DELAYS": "0",
    }
    return bridge_environment(tmp_path, redis_url, postal_signer, **(settings | extra))


@pytest.fixture
def environment(tmp_path: Path, redis_url: str, postal_signer: Any, peer: Peer) -> dict[str, str]:
    return peer_environment(tmp_path, redis_url, postal_signer, peer, BRIDGE_MTP_RATE_LIMIT="1000")


@pytest.fixture
def server_public(environment: dict[str, str]) -> bytes:
    from bridge.mailio.server_key import load_server_key

    return public_key_bytes(load_server_key(Path(environment["BRIDGE_SERVER_KEY_FILE"])))


# --- envelopes, field for field -------------------------------------------------------------------------


def jwe_to(*recipients: Owner | str, plaintext: bytes = b"Subject: hi\r\n\r\nhello from a peer\r\n") -> dict[str, Any]:
    """A body sealed to each recipient (an Owner of ours, or a bare kid sealed to a throw-away key),
    in the reference's member order."""
    keys = []
    for recipient in recipients:
        if isinstance(recipient, str):
            keys.append(Recipient(recipient, generate_user_keys().x25519_public))
        else:
            keys.append(Recipient(f"did:web:{DOMAIN}#{recipient.mailbox.address}", recipient.keys.x25519_public))
    sealed = seal(plaintext, keys, aad=b"peer aad")
    return {
        "aad": sealed["aad"],
        "ciphertext": sealed["ciphertext"],
        "iv": sealed["iv"],
        "recipients": [{"encrypted_key": r["encrypted_key"], "header": r["header"]} for r in sealed["recipients"]],
        "tag": sealed["tag"],
        "protected": sealed["protected"],
    }


def request_payload(
    peer: Peer, body: dict[str, Any] | None, *, msg_id: str | None = None, intent: str = "message", **changes: Any
) -> dict[str, Any]:
    msg_id = msg_id or uuid.uuid4().hex
    message: dict[str, Any] = {"type": "application/didcomm-encrypted+json", "id": msg_id, "from": peer.sender_did}
    if body is not None:
        message["to"] = [r["header"]["kid"] for r in body["recipients"]]
    message |= {"thid": msg_id, "createdTime": now_ms(), "intent": intent}
    if body is not None:
        message["body"] = body
    message |= changes.pop("message", {})
    payload = {"signatureScheme": "EdDSA_X25519", "timestamp": now_ms(), "didCommMessage": message}
    return payload | changes


def post(client: Any, body: bytes, path: str = "/api/v1/mtp/message") -> Any:
    return client.post(path, data=body, headers={"Content-Type": "application/json"})


def verified_answer(response: Any, payload_key: str, public: bytes, *, sender_domain: bool) -> dict[str, Any]:
    """Check our answer's signature over its CBOR and return the decoded payload."""
    from bridge.mailio import mtp

    signed = mtp.parse_signed(response.get_data(), payload_key, sender_domain=sender_domain)
    return mtp.verify(signed, public)


def listing(client: Any, owner: Owner, folder: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/messages?folder={folder}", headers=owner.auth)
    assert response.status_code == 200
    return response.get_json()["messages"]


def delivered_codes(peer: Peer) -> list[list[dict[str, Any]]]:
    out = []
    for body in peer.received:
        message = body["didCommRequest"]["didCommMessage"]
        assert message["intent"] == "delivery"
        out.append(json.loads(base64.b64decode(message["plainBodyBase64"]))["statusCodes"])
    return out


def stored_envelopes(bridge: Bridge) -> list[str]:
    return list(bridge.objects.list("mtp/"))


# --- accepted, filed, reported -------------------------------------------------------------------------


def test_a_message_is_receipted_filed_screened_and_reported(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, server_public: bytes
) -> None:
    stranger = f"did:web:{DOMAIN}#0x{'9' * 40}"
    body = jwe_to(owner, stranger, f"did:web:elsewhere.test#0x{'8' * 40}")
    payload = request_payload(peer, body, msg_id="msg-1")
    envelope = json.loads(peer.envelope(payload))
    envelope["didCommRequest"]["didCommMessage"] |= {"id": "forged", "from": "did:web:evil.test#0x" + "6" * 40}
    response = post(client, json.dumps(envelope).encode())  # the unsigned twin lies; only the CBOR counts
    assert response.status_code == 202, response.get_json()
    receipt = verified_answer(response, "didCommRequest", server_public, sender_domain=True)
    assert receipt["didCommMessage"] == {"type": "", "id": "msg-1", "from": ""}
    assert abs(receipt["timestamp"] - now_ms()) < 60_000
    assert json.loads(response.get_data())["senderDomain"] == DOMAIN

    run_worker(bridge)
    [record] = listing(client, owner, "other")  # an unknown Mailio sender is screened
    assert record["sender"]["from"] == peer.sender_did
    assert record["source"] == "mtp"
    message = client.get(f"/api/v1/messages/{record['id']}", headers=owner.auth).get_json()
    assert message["body"] == body  # stored as received
    assert open_sealed(message["body"], owner.private_jwk) == b"Subject: hi\r\n\r\nhello from a peer\r\n"

    [codes] = delivered_codes(peer)
    by_address = {c["address"]: (c["class"], c["subject"], c["detail"]) for c in codes}
    assert by_address == {owner.mailbox.address: (2, 0, 0), "0x" + "9" * 40: (5, 1, 1)}
    delivery = peer.received[0]
    raw = base64.b64decode(delivery["cborPayloadBase64"])
    from bridge.mailio.identity import verify_ed25519

    assert verify_ed25519(server_public, base64.b64decode(delivery["signatureBase64"]), raw)
    decoded = cbor2.loads(raw)["didCommMessage"]
    assert (decoded["id"], decoded["to"], decoded["intent"]) == ("msg-1", [peer.sender_did], "delivery")
    assert stored_envelopes(bridge) == []  # the envelope and the pending delivery are cleaned up


def test_handshake_rules_decide_the_folder(client: Any, bridge: Bridge, owner: Owner, peer: Peer) -> None:
    for status, folder in (("accepted", "inbox"), ("revoked", "spam")):
        document = sign_handshake(
            ed25519_private=owner.keys.ed25519_private, status=status, sender_did=peer.sender_did, origin_domain=DOMAIN
        )
        bridge.handshakes.put(owner.mailbox.address, parse_signed_handshake(document))
        time.sleep(0.002)  # the next handshake is newer
        assert post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code == 202
        run_worker(bridge)
        assert len(listing(client, owner, folder)) == 1, folder


def test_a_handshake_request_needs_a_live_offer(client: Any, bridge: Bridge, owner: Owner, peer: Peer) -> None:
    nonce = bridge.offers.create(owner.mailbox.address)["nonce"]
    plain = b64(json.dumps({"nonce": nonce}).encode())
    for msg_id in ("hs-1", "hs-2"):  # the second redeems the same nonce again
        payload = request_payload(
            peer,
            jwe_to(owner),
            msg_id=msg_id,
            intent="handshake_request",
            message={"type": "application/mailio-handshake-request+json", "plainBodyBase64": plain},
        )
        assert post(client, peer.envelope(payload)).status_code == 202
        run_worker(bridge)
    assert [r["mtp"]["id"] for r in listing(client, owner, "handshake")] == ["hs-1"]
    assert listing(client, owner, "other") == []
    first, second = delivered_codes(peer)
    assert (first[0]["class"], first[0]["subject"], first[0]["detail"]) == (2, 0, 0)
    assert (second[0]["class"], second[0]["subject"], second[0]["detail"]) == (5, 8, 9)


def test_a_message_without_intent_or_with_the_references_handshake_intent_loses_no_mail(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer
) -> None:
    """Absent: a message (the reference drops it after its 202). ``handshake``: with an offer nonce a handshake
    request, without one an ordinary message, screened: never the handshake folder without a live offer."""
    nonce = bridge.offers.create(owner.mailbox.address)["nonce"]
    plain = b64(json.dumps({"nonce": nonce}).encode())
    absent = request_payload(peer, jwe_to(owner), msg_id="no-intent")
    del absent["didCommMessage"]["intent"]
    sent = {
        "no-intent": absent,
        "empty-intent": request_payload(peer, jwe_to(owner), msg_id="empty-intent", intent=""),
        "hs-plain": request_payload(peer, jwe_to(owner), msg_id="hs-plain", intent="handshake"),
        "hs-offer": request_payload(
            peer, jwe_to(owner), msg_id="hs-offer", intent="handshake", message={"plainBodyBase64": plain}
        ),
        "hs-spent": request_payload(
            peer, jwe_to(owner), msg_id="hs-spent", intent="handshake", message={"plainBodyBase64": plain}
        ),
    }
    for payload in sent.values():
        assert post(client, peer.envelope(payload)).status_code == 202
        run_worker(bridge)  # one at a time: the first offer redemption wins
    folders = {r["mtp"]["id"]: folder for folder in ("other", "handshake") for r in listing(client, owner, folder)}
    assert folders == {"no-intent": "other", "empty-intent": "other", "hs-plain": "other", "hs-offer": "handshake"}
    outcomes = [(c[0]["class"], c[0]["subject"], c[0]["detail"]) for c in delivered_codes(peer)]
    assert outcomes == [(2, 0, 0)] * 4 + [(5, 8, 9)]  # every sender hears how it went; the spent offer fails


def test_a_replayed_id_is_answered_again_and_filed_once(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, server_public: bytes
) -> None:
    envelope = peer.envelope(request_payload(peer, jwe_to(owner), msg_id="again"))
    first = post(client, envelope)
    run_worker(bridge)
    # The same envelope, and the same id re-signed later (a sender's retry): 202 and a receipt, nothing new.
    second = post(client, envelope)
    third = post(client, peer.envelope(request_payload(peer, jwe_to(owner), msg_id="again")))
    run_worker(bridge)
    for response in (first, second, third):
        assert response.status_code == 202
        assert (
            verified_answer(response, "didCommRequest", server_public, sender_domain=True)["didCommMessage"]["id"]
            == "again"
        )
    assert len(listing(client, owner, "other")) == 1
    assert len(peer.received) == 1  # one delivery message
    assert stored_envelopes(bridge) == []


def test_a_delivery_message_out_of_retries_is_cleaned_up_and_its_failure_kept(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    from rq.job import Job, JobStatus

    peer.status = 503  # the sender's server stays down through the try and its one retry (delays "0")
    assert post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code == 202
    run_worker(bridge)
    [record] = listing(client, owner, "other")  # filed all the same
    assert len(peer.received) == 2
    assert stored_envelopes(bridge) == []  # no delivery message left pending that nothing will send
    job = Job.fetch(f"mtp-delivery-{record['id']}", connection=bridge.redis)
    assert job.get_status() == JobStatus.FAILED  # the failure stays in RQ's failed registry ...
    assert (
        f"mtp delivery message for {record['id']} not sent: gave up after its retries" in caplog.text
    )  # ... and the log


def test_a_stored_envelope_survives_redis_losing_its_note(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer
) -> None:
    from bridge.jobs.peer_inbound import requeue_stored
    from bridge.mailio.accept import DRAIN_FLAG, UNFILED

    assert post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code == 202
    bridge.redis.delete(UNFILED, DRAIN_FLAG)  # Redis lost the note and the queued job
    bridge.queue.empty()
    run_worker(bridge)
    assert listing(client, owner, "other") == []
    assert requeue_stored(bridge) == 1
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 1
    assert stored_envelopes(bridge) == []


def test_the_sender_key_is_looked_up_again_after_a_rotation(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, knot_dns: Any
) -> None:
    assert post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code == 202  # caches the key
    peer.key = Ed25519PrivateKey.generate()
    publish(knot_dns, peer.domain, peer.key)
    assert post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code == 202
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 2


# --- refusals: each with its code, nothing stored --------------------------------------------------------


def _refusals(peer: Peer, owner: Owner) -> dict[str, tuple[bytes, int, str]]:
    body = jwe_to(owner)
    good = request_payload(peer, body)
    raw = cbor2.dumps(good)
    unsigned = json.loads(peer.envelope(good))
    del unsigned["signatureBase64"]
    not_cbor = {
        "didCommRequest": good,
        "cborPayloadBase64": b64(b"\xff\xfe"),
        "signatureBase64": b64(peer.key.sign(b"\xff\xfe")),
        "senderDomain": peer.domain,
    }
    twin_lies = json.loads(peer.envelope(good))
    twin_lies["cborPayloadBase64"] = b64(raw + b"\x00")
    no_id = request_payload(peer, body)
    del no_id["didCommMessage"]["id"]
    return {
        "unsigned": (json.dumps(unsigned).encode(), 400, "signatureBase64 is missing"),
        "forged": (peer.envelope(good, key=Ed25519PrivateKey.generate()), 401, "signature does not verify"),
        "tampered": (json.dumps(twin_lies).encode(), 401, "signature does not verify"),
        "no key published": (
            peer.envelope(good, domain=f"n{uuid.uuid4().hex[:8]}.mailio.test"),
            401,
            "publishes no Mailio key",
        ),
        "not cbor": (json.dumps(not_cbor).encode(), 400, "not a valid CBOR item"),
        "not json": (b"{nope", 400, "not JSON"),
        "stale": (peer.envelope(request_payload(peer, body, timestamp=now_ms() - 301_000)), 403, "from our clock"),
        "future": (peer.envelope(request_payload(peer, body, timestamp=now_ms() + 301_000)), 403, "from our clock"),
        "wrong-domain from": (
            peer.envelope(request_payload(peer, body, message={"from": f"did:web:evil.test#{peer.user.address}"})),
            403,
            "not on senderDomain",
        ),
        "no id": (peer.envelope(no_id), 400, "didCommMessage.id is missing"),
        # The reference's own response intent (misspelt; the reference refuses it too).
        "unsupported intent": (
            peer.envelope(request_payload(peer, body, intent="handsake_response")),
            400,
            "intent 'handsake_response' is not supported",
        ),
        "no body": (peer.envelope(request_payload(peer, None)), 400, "body is missing"),
        "bad type": (peer.envelope(request_payload(peer, body, message={"type": "text/plain"})), 400, "type"),
        "float timestamp": (peer.envelope(request_payload(peer, body, timestamp=float(now_ms()))), 400, "timestamp"),
        "port in domain": (peer.envelope(good, domain=f"{peer.domain}:443"), 400, "invalid domain"),
    }


REFUSALS = [
    "unsigned", "forged", "tampered", "no key published", "not cbor", "not json", "stale", "future",
    "wrong-domain from", "no id", "unsupported intent", "no body", "bad type", "float timestamp",
    "port in domain",
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_with_its_code_and_nothing_stored(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, case: str
) -> None:
    body, status, reason = _refusals(peer, owner)[case]
    response = post(client, body)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert reason in error and "\n" not in error
    assert stored_envelopes(bridge) == []
    assert bridge.queue.count == 0  # no job: nothing will be filed or reported


def test_oversized_bodies_are_refused_before_reading(
    live_url: str, bridge: Bridge, environment: dict[str, str], owner: Owner, peer: Peer
) -> None:
    limit = bridge.settings.mtp_max_bytes
    with socket.create_connection(("127.0.0.1", int(live_url.rsplit(":", 1)[1])), timeout=5) as conn:
        conn.sendall(
            b"POST /api/v1/mtp/message HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        answer = conn.recv(4096)  # answered without our sending a single body byte
    assert answer.startswith(b"HTTP/1.1 413")
    # A well-signed envelope over a small limit, sent whole: 413 too.
    small = create_app(Settings.from_env({**environment, "BRIDGE_MTP_MAX_BYTES": "2000"}))
    envelope = peer.envelope(request_payload(peer, jwe_to(owner, plaintext=b"x" * 3000)))
    response = post(small.test_client(), envelope)
    assert response.status_code == 413 and "over 2000 bytes" in response.get_json()["error"]
    assert stored_envelopes(bridge) == []


def test_a_sender_domain_over_its_rate_is_told_to_wait(
    environment: dict[str, str], bridge: Bridge, owner: Owner, peer: Peer
) -> None:
    limit = 5
    client = create_app(Settings.from_env({**environment, "BRIDGE_MTP_RATE_LIMIT": str(limit)})).test_client()
    if time.time() % 60 > 55:  # do not straddle a window boundary
        time.sleep(61 - time.time() % 60)
    minute = int(time.time() // 60)
    answers = [post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code for _ in range(limit + 1)]
    assert int(time.time() // 60) == minute
    assert answers == [202] * limit + [429]
    assert len(list(bridge.objects.list("mtp/inbound/"))) == limit


# --- delivery messages about what we sent ---------------------------------------------------------------


def _sent_message(bridge: Bridge, owner: Owner, peer: Peer, recipient: str, peer_address: str) -> str:
    msg_id = uuid.uuid4().hex
    bridge.outbound.create(owner.mailbox.address, msg_id, f"<{msg_id}@{DOMAIN}>", [recipient])
    bridge.outbound.set_route(owner.mailbox.address, msg_id, recipient, "mailio")
    # What the Mailio sending leg records before it posts (bridge.jobs.peer_outbound._note_peers).
    bridge.outbound.note_peers(
        owner.mailbox.address, msg_id, {recipient: {"host": peer.domain, "address": peer_address}}
    )
    return msg_id


def delivery_payload(
    peer: Peer, msg_id: str, owner: Owner, codes: list[dict[str, Any]], *, reference_from: bool
) -> dict[str, Any]:
    server = mailio_address(public_key_bytes(peer.key))
    sender = f"did:web:{peer.domain}:{server}" if reference_from else f"did:web:{peer.domain}#{server}"
    message = {
        "type": "application/didcomm-signed+json",
        "id": msg_id,
        "from": sender,
        "to": [f"did:web:{DOMAIN}#{owner.mailbox.address}"],
        "intent": "delivery",
        "plainBodyBase64": b64(json.dumps({"statusCodes": codes}, separators=(",", ":")).encode()),
    }
    return {"signatureScheme": "EdDSA_X25519", "timestamp": now_ms(), "didCommMessage": message}


@pytest.mark.parametrize(("code", "state"), [((2, 0, 0), "delivered"), ((5, 1, 1), "failed"), ((2, 3, 5), "failed")])
def test_a_delivery_message_moves_our_recipient(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, code: tuple[int, int, int], state: str
) -> None:
    peer_address = "0x" + "4" * 40
    msg_id = _sent_message(bridge, owner, peer, f"bob@{peer.domain}", peer_address)
    codes = [{"class": code[0], "subject": code[1], "detail": code[2], "description": "d", "address": peer_address}]
    response = post(client, peer.envelope(delivery_payload(peer, msg_id, owner, codes, reference_from=True)))
    assert response.status_code == 202, response.get_json()
    [entry] = bridge.outbound.get(owner.mailbox.address, msg_id)["recipients"]
    assert entry["state"] == state
    assert stored_envelopes(bridge) == []


def test_a_delivery_message_from_another_server_changes_nothing(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, knot_dns: Any
) -> None:
    msg_id = _sent_message(bridge, owner, peer, f"bob@{peer.domain}", "0x" + "4" * 40)
    other = Peer(f"o{uuid.uuid4().hex[:10]}.mailio.test", Ed25519PrivateKey.generate())
    publish(knot_dns, other.domain, other.key)
    codes = [{"class": 2, "subject": 0, "detail": 0}]
    for sender, sent_id in ((other, msg_id), (peer, uuid.uuid4().hex)):  # another server; an id we never sent
        response = post(client, sender.envelope(delivery_payload(sender, sent_id, owner, codes, reference_from=False)))
        assert response.status_code == 403
        assert "no message of ours" in response.get_json()["error"]
    [entry] = bridge.outbound.get(owner.mailbox.address, msg_id)["recipients"]
    assert entry["state"] == "queued"


# --- look-ups and DID documents ---------------------------------------------------------------------------


def test_did_lookup_answers_only_for_a_known_hash(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, server_public: bytes
) -> None:
    known = email_lookup_hash(owner.mailbox.email)
    unknown = email_lookup_hash(f"nobody@{DOMAIN}")
    payload = {
        "senderAddress": peer.user.address,
        "lookupHeader": {
            "signatureScheme": "EdDSA_X25519",
            "emailLookupHashScheme": "SC_N32768_R8_P1_L32_B64",
            "timestamp": now_ms(),
        },
        "didLookups": [
            {"emailHash": known, "email": owner.mailbox.email},
            {"emailHash": unknown, "email": f"nobody@{DOMAIN}"},
            {"emailHash": unknown, "email": owner.mailbox.email},  # a hash that is not this address's
            {"emailHash": known, "email": ""},  # a bare hash: never looked for by scanning the directory
        ],
    }
    response = post(client, peer.signed("didLookupRequest", payload), "/api/v1/mtp/did")
    assert response.status_code == 200, response.get_json()
    answer = verified_answer(response, "didLookupResponse", server_public, sender_domain=False)
    [found] = answer["foundLookups"]
    assert found["emailHash"] == known and found["supportsMailio"] is True
    assert found["didDocument"]["id"] == f"did:mailio:{owner.mailbox.address}"
    assert (
        found["didDocument"]["keyAgreement"][0]["publicKeyJwk"]["x"]
        == base64.urlsafe_b64encode(owner.keys.x25519_public).rstrip(b"=").decode()
    )
    assert answer["notFoundLookups"] == payload["didLookups"][1:]
    forged = json.loads(peer.signed("didLookupRequest", payload))
    forged["signatureBase64"] = b64(Ed25519PrivateKey.generate().sign(b"x"))
    assert post(client, json.dumps(forged).encode(), "/api/v1/mtp/did").status_code == 401
    stale = payload | {"lookupHeader": payload["lookupHeader"] | {"timestamp": now_ms() - 600_000}}
    assert post(client, peer.signed("didLookupRequest", stale), "/api/v1/mtp/did").status_code == 403


def test_handshake_lookup_shows_only_the_askers_own_handshake(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer, server_public: bytes
) -> None:
    document = sign_handshake(
        ed25519_private=owner.keys.ed25519_private, status="accepted", sender_did=peer.sender_did, origin_domain=DOMAIN
    )
    bridge.handshakes.put(owner.mailbox.address, parse_signed_handshake(document))

    def ask(sender_address: str) -> list[dict[str, Any]]:
        payload = {
            "lookupHeader": {
                "signatureScheme": "EdDSA_X25519",
                "emailLookupHashScheme": "SC_N32768_R8_P1_L32_B64",
                "timestamp": now_ms(),
            },
            "handshakeLookups": [
                {"address": owner.mailbox.address, "email": "", "originServer": {"domain": peer.domain}}
            ],
            "returnDefaultServerHandshake": True,
            "senderAddress": sender_address,
        }
        response = post(client, peer.signed("handshakeRequest", payload), "/api/v1/mtp/handshake")
        assert response.status_code == 200, response.get_json()
        return verified_answer(response, "handshakeResponse", server_public, sender_domain=False)["handshakes"]

    [found] = ask(peer.user.address)
    assert (found["status"], found["ownerAddress"]) == ("accepted", owner.mailbox.address)
    assert found["senderMetadata"] == {"address": peer.sender_did}
    assert ask("0x" + "7" * 40) == []  # another sender of the same server learns nothing


def test_did_documents(client: Any, bridge: Bridge, owner: Owner, server_public: bytes) -> None:
    server = client.get("/.well-known/did.json")
    assert server.status_code == 200
    assert server.get_json()["id"] == f"did:mailio:{mailio_address(server_public)}"
    assert server.get_json()["service"][0]["serviceEndpoint"] == f"https://{DOMAIN}/api/v1/mtp/message"
    user = client.get(f"/{owner.mailbox.address}/did.json")
    assert user.status_code == 200 and user.get_json()["id"] == f"did:mailio:{owner.mailbox.address}"
    for missing in ("0x" + "1" * 40, "0xNOPE", "postal"):
        assert client.get(f"/{missing}/did.json").status_code == 404


def test_without_a_server_key_the_protocol_answers_503(
    tmp_path: Path, redis_url: str, postal_signer: Any, peer: Peer
) -> None:
    environment = bridge_environment(
        tmp_path, redis_url, postal_signer, BRIDGE_SERVER_KEY_FILE=str(tmp_path / "none.key")
    )
    app = create_app(Settings.from_env(environment))
    context.use(app.extensions["bridge"])
    try:
        client = app.test_client()
        owner = make_owner(app.extensions["bridge"], f"x@{DOMAIN}")
        assert client.get("/.well-known/did.json").status_code == 503
        assert post(client, peer.envelope(request_payload(peer, jwe_to(owner)))).status_code == 503
        assert list(app.extensions["bridge"].objects.list("mtp/")) == []
    finally:
        context.use(None)


def test_signed_payloads_of_every_wrong_shape_are_4xx_never_5xx(
    client: Any, bridge: Bridge, owner: Owner, peer: Peer
) -> None:
    """Authenticated junk reaches the payload checks: each member replaced by values of other types."""
    import random

    rng = random.Random(8)
    junk: list[Any] = [None, True, 0, -1, 2**70, 1.5, "", "x" * 300, "é", [], [1], {}, {"a": {"b": []}}, b"bytes"]
    statuses = set()
    for _ in range(120):
        payload = request_payload(peer, jwe_to(owner))
        target = payload
        path = rng.choice(
            [["signatureScheme"], ["timestamp"], ["didCommMessage"], ["didCommMessage", "type"],
             ["didCommMessage", "id"], ["didCommMessage", "from"], ["didCommMessage", "to"],
             ["didCommMessage", "intent"], ["didCommMessage", "body"], ["didCommMessage", "body", "recipients"],
             ["didCommMessage", "body", "ciphertext"], ["didCommMessage", "plainBodyBase64"]]
        )  # fmt: skip
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = rng.choice(junk)
        try:
            body = peer.envelope(payload)
        except TypeError:  # bytes cannot ride in the JSON twin: send the twin without it
            raw = cbor2.dumps(payload)
            body = json.dumps(
                {
                    "didCommRequest": {},
                    "cborPayloadBase64": b64(raw),
                    "signatureBase64": b64(peer.key.sign(raw)),
                    "senderDomain": peer.domain,
                }
            ).encode()
        response = post(client, body)
        statuses.add(response.status_code)
        assert response.status_code in (202, 400, 403), (path, response.get_json())
    assert 400 in statuses
