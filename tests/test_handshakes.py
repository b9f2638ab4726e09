"""Signed handshakes: interop with the reference vectors, round trips, and a table of documents that must
be refused with the right status (400 malformed, 403 not authentic / not the owner's)."""

from __future__ import annotations

import base64
import json
import pickle
import random
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.mailio.handshakes import (
    Handshake,
    HandshakeError,
    build_content,
    decode_content,
    newer,
    parse_signed_handshake,
    sign_handshake,
)
from bridge.mailio.identity import generate_user_keys, handshake_id, mailio_address

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "mailio_vectors.json").read_text())
SIGNED = VECTORS["signed_handshake"]
NONCANONICAL = VECTORS["handshake_cbor_noncanonical"]
SENDER_HASH = VECTORS["email_lookup_hash"][1]["hash_b64"]  # news@shop.example
OWNER = generate_user_keys()
STRANGER = generate_user_keys()
SENDER = generate_user_keys()
SENDER_DID = f"did:web:mio.shop.example#{SENDER.address}"
OTHER_SENDERS_ID = handshake_id(OWNER.address, SENDER_DID)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sign_bytes(payload: bytes, private: bytes = OWNER.ed25519_private, content: Any = None) -> dict[str, Any]:
    """A wire document over any bytes, signed by ``private``: for documents sign_handshake won't make."""
    signature = Ed25519PrivateKey.from_private_bytes(private).sign(payload)
    return {"content": content or {}, "signatureBase64": b64(signature), "cborPayloadBase64": b64(payload)}


def good_content(**changes: Any) -> dict[str, Any]:
    content = build_content(
        owner_public_key=OWNER.ed25519_public,
        status="accepted",
        origin_domain="mio.example.com",
        created_ms=1_700_000_000_000.0,
        sender_email_hash=SENDER_HASH,
    )
    content.update(changes)
    return content


def signed_content(private: bytes = OWNER.ed25519_private, **changes: Any) -> dict[str, Any]:
    content = good_content(**changes)
    return sign_bytes(cbor2.dumps(content), private, content)


# --- the reference vectors ---------------------------------------------------------------------------


def test_noncanonical_reference_payload_decodes_and_would_not_survive_re_encoding() -> None:
    raw = base64.b64decode(NONCANONICAL["cbor_b64"])
    content = decode_content(raw)
    assert content == NONCANONICAL["decoded"]
    assert raw[:3] == b"\xb9\x00\x0a"  # a 10-entry map announced with a 2-byte length
    assert cbor2.dumps(content) != raw  # so a signature over raw only checks against raw itself
    # Its identifiers derive as we derive them.
    key = base64.b64decode(content["ownerPublicKey"])
    assert mailio_address(key) == content["ownerAddress"]
    assert handshake_id(content["ownerAddress"], content["senderMetadata"]["emailHash"]) == content["handshakeId"]


def test_signed_vector_verifies_and_its_fields_check_out() -> None:
    owner_key = base64.b64decode(SIGNED["owner_ed25519_public_b64"])
    handshake = parse_signed_handshake(SIGNED["handshake"], owner_public_key=owner_key)
    content = SIGNED["handshake"]["content"]
    assert handshake.status == "accepted"
    assert handshake.level == "none"
    assert handshake.type == "user"
    assert handshake.owner_public_key == owner_key
    assert handshake.owner_address == content["ownerAddress"] == mailio_address(owner_key)
    assert handshake.sender_email_hash == SENDER_HASH
    assert handshake.sender_address is None
    assert handshake.sender_key() == SENDER_HASH
    assert handshake.handshake_id == content["handshakeId"]
    assert handshake.created == 1709502766479.0
    assert handshake.origin_domain == "mio.example.com"
    assert handshake.signature_scheme == "EdDSA_X25519"
    assert handshake.to_document() == SIGNED["handshake"]
    # Without a registered key, the key inside the signed payload is the one that must verify.
    assert parse_signed_handshake(SIGNED["handshake"]) == handshake


def test_build_content_encodes_to_the_vector_bytes() -> None:
    """Same member order and number encoding as the client that produced the vector."""
    handshake = parse_signed_handshake(SIGNED["handshake"])
    content = build_content(
        owner_public_key=handshake.owner_public_key,
        status="accepted",
        origin_domain="mio.example.com",
        created_ms=1709502766479,
        sender_email_hash=SENDER_HASH,
        type="user",
    )
    assert content == SIGNED["handshake"]["content"]
    assert cbor2.dumps(content) == handshake.cbor_payload


# --- round trips -------------------------------------------------------------------------------------


def test_round_trip_smtp_sender_by_email() -> None:
    document = sign_handshake(
        ed25519_private=OWNER.ed25519_private,
        status="revoked",
        sender_email="News@Shop.Example",
        origin_domain="mio.example.com",
        created_ms=1_700_000_000_123.0,
    )
    handshake = parse_signed_handshake(json.loads(json.dumps(document)), owner_public_key=OWNER.ed25519_public)
    assert handshake.status == "revoked"
    assert handshake.sender_email_hash == SENDER_HASH
    assert handshake.handshake_id == handshake_id(OWNER.address, SENDER_HASH)
    assert handshake.owner_address == OWNER.address
    assert handshake.type == "personal"
    assert handshake.created == 1_700_000_000_123.0
    assert handshake.to_document() == document


def test_round_trip_mailio_sender() -> None:
    document = sign_handshake(
        ed25519_private=OWNER.ed25519_private,
        status="accepted",
        sender_did=SENDER_DID,
        origin_domain="mio.example.com",
        level="poh",
        type="user",
    )
    handshake = parse_signed_handshake(document, owner_public_key=OWNER.ed25519_public)
    assert handshake.sender_address == SENDER_DID
    assert handshake.sender_email_hash is None
    assert handshake.sender_key() == SENDER_DID
    assert handshake.handshake_id == handshake_id(OWNER.address, SENDER_DID)
    assert (handshake.level, handshake.type) == ("poh", "user")
    assert handshake.created > 1_700_000_000_000  # defaults to now, in milliseconds


def test_stored_document_parses_again_to_the_same_handshake() -> None:
    handshake = parse_signed_handshake(signed_content())
    stored = json.loads(json.dumps(handshake.to_document()))
    assert parse_signed_handshake(stored, owner_public_key=OWNER.ed25519_public) == handshake


def test_noncanonical_cbor_signed_by_the_owner_is_accepted_and_kept_byte_for_byte() -> None:
    canonical = cbor2.dumps(good_content())
    assert canonical[0] == 0xAA  # 10-entry map, 1-byte header
    noncanonical = b"\xb9\x00\x0a" + canonical[1:]
    document = sign_bytes(noncanonical)
    handshake = parse_signed_handshake(document, owner_public_key=OWNER.ed25519_public)
    assert handshake.cbor_payload == noncanonical
    assert handshake.to_document()["cborPayloadBase64"] == document["cborPayloadBase64"]
    assert handshake.to_document()["content"] == good_content()


def test_json_twin_is_ignored_the_signed_cbor_wins() -> None:
    document = signed_content(status="revoked")
    document["content"] = {**document["content"], "status": "accepted"}
    handshake = parse_signed_handshake(document, owner_public_key=OWNER.ed25519_public)
    assert handshake.status == "revoked"
    assert handshake.to_document()["content"]["status"] == "revoked"
    # A missing or junk twin changes nothing either.
    for twin in (None, "junk"):
        assert parse_signed_handshake({**document, "content": twin}).status == "revoked"


def test_newer() -> None:
    old = parse_signed_handshake(signed_content(created=1000.0))
    new = parse_signed_handshake(signed_content(created=2000.0, status="revoked"))
    same_time = parse_signed_handshake(signed_content(created=2000.0, level="poh"))
    assert newer(old, None)
    assert newer(new, old)
    assert not newer(old, new)
    assert not newer(same_time, new)


# --- refusals ----------------------------------------------------------------------------------------


def _tampered() -> dict[str, Any]:
    document = signed_content()
    raw = bytearray(base64.b64decode(document["cborPayloadBase64"]))
    at = raw.index(b"mio.example.com")
    raw[at] = ord("n")  # still valid CBOR, different domain
    return {**document, "cborPayloadBase64": b64(bytes(raw))}


def _stranger_content() -> dict[str, Any]:
    return build_content(
        owner_public_key=STRANGER.ed25519_public,
        status="accepted",
        origin_domain="mio.example.com",
        created_ms=1.0,
        sender_email_hash=SENDER_HASH,
    )


def _strangers_own_handshake() -> dict[str, Any]:
    """Signed by the stranger with the stranger's key inside, but presented at the owner's mailbox."""
    return sign_bytes(cbor2.dumps(_stranger_content()), STRANGER.ed25519_private)


def _owner_signed_for_stranger_key() -> dict[str, Any]:
    """The owner's signature is real, but the payload names another key as its owner."""
    return sign_bytes(cbor2.dumps(_stranger_content()), OWNER.ed25519_private)


SIG_OWNER = "does not verify with the owner's key"
SIG_EMBEDDED = "does not verify with its ownerPublicKey"
FORBIDDEN: list[tuple[str, Any, bytes | None, str]] = [
    ("tampered CBOR byte", _tampered, None, SIG_EMBEDDED),
    ("tampered CBOR byte, owner key given", _tampered, OWNER.ed25519_public, SIG_OWNER),
    ("signed by another key", lambda: signed_content(STRANGER.ed25519_private), None, SIG_EMBEDDED),
    (
        "signed by another key, owner key given",
        lambda: signed_content(STRANGER.ed25519_private),
        OWNER.ed25519_public,
        SIG_OWNER,
    ),
    (
        "ownerAddress not derived (handshakeId consistent with it)",
        lambda: signed_content(ownerAddress=STRANGER.address, handshakeId=handshake_id(STRANGER.address, SENDER_HASH)),
        None,
        "ownerAddress does not derive",
    ),
    (
        "handshakeId not derived",
        lambda: signed_content(handshakeId="ab" * 32),
        None,
        "handshakeId does not derive",
    ),
    (
        "handshakeId for another sender",
        lambda: signed_content(handshakeId=OTHER_SENDERS_ID),
        None,
        "handshakeId does not derive",
    ),
    ("valid, but not the mailbox owner's", lambda: signed_content(), STRANGER.ed25519_public, SIG_OWNER),
    ("stranger's handshake at owner's mailbox", _strangers_own_handshake, OWNER.ed25519_public, SIG_OWNER),
    (
        "owner-signed, names another owner key",
        _owner_signed_for_stranger_key,
        OWNER.ed25519_public,
        "ownerPublicKey is not the mailbox owner's key",
    ),
]


@pytest.mark.parametrize(
    ("make", "owner_key", "reason"), [row[1:] for row in FORBIDDEN], ids=[row[0] for row in FORBIDDEN]
)
def test_not_authentic_or_not_the_owners_is_403(make: Any, owner_key: bytes | None, reason: str) -> None:
    with pytest.raises(HandshakeError, match=reason) as info:
        parse_signed_handshake(make(), owner_public_key=owner_key)
    assert info.value.status == 403


def _without(*path: str) -> Any:
    def make() -> dict[str, Any]:
        content = good_content()
        target = content
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return sign_bytes(cbor2.dumps(content))

    return make


def _signed_bytes(payload: bytes) -> Any:
    return lambda: sign_bytes(payload)


def _swap(**fields: Any) -> Any:
    return lambda: {**signed_content(), **fields}


_GOOD = cbor2.dumps(good_content())
_NESTED = cbor2.dumps(good_content(extra=[[[[[[[[[[["deep"]]]]]]]]]]]))
_DUPLICATE = b"\xab" + _GOOD[1:] + cbor2.dumps("status")[0:] + cbor2.dumps("revoked")  # 11 entries, one twice
_CYCLE = b"\xab" + _GOOD[1:] + cbor2.dumps("loop") + b"\xd8\x1c\x81\xd8\x1d\x00"  # shared-reference cycle

MALFORMED: list[tuple[str, Any]] = [
    ("a list", lambda: [1, 2]),
    ("a string", lambda: "handshake"),
    ("None", lambda: None),
    ("no cborPayloadBase64", lambda: {"signatureBase64": signed_content()["signatureBase64"]}),
    ("no signatureBase64", lambda: {"cborPayloadBase64": signed_content()["cborPayloadBase64"]}),
    ("cborPayloadBase64 a number", _swap(cborPayloadBase64=12)),
    ("cborPayloadBase64 bad base64", _swap(cborPayloadBase64="not*base64!")),
    ("signatureBase64 bad base64", _swap(signatureBase64="%%%%")),
    ("signature too short", _swap(signatureBase64=b64(b"\1" * 63))),
    ("payload too large", _swap(cborPayloadBase64=b64(b"\0" * 20_000))),
    ("not CBOR (lone break)", _signed_bytes(b"\xff")),
    ("truncated CBOR", _signed_bytes(_GOOD[:-5])),
    ("CBOR array, not map", _signed_bytes(cbor2.dumps(["accepted"]))),
    ("trailing garbage", _signed_bytes(_GOOD + b"\x00")),
    ("two CBOR items", _signed_bytes(_GOOD + _GOOD)),
    ("huge declared length", _signed_bytes(b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff")),
    ("nested junk", _signed_bytes(_NESTED)),
    ("duplicate map key", _signed_bytes(_DUPLICATE)),
    ("shared-reference cycle", _signed_bytes(_CYCLE)),
    ("byte string value", _signed_bytes(cbor2.dumps(good_content(extra=b"\0")))),
    ("integer map key", _signed_bytes(cbor2.dumps({**good_content(), 1: "x"}))),
    ("ownerPublicKey missing", _without("ownerPublicKey")),
    ("ownerPublicKey not base64", lambda: signed_content(ownerPublicKey="%" * 44)),
    ("status missing", _without("status")),
    ("status unknown", lambda: signed_content(status="maybe")),
    ("status an integer (old enum)", lambda: signed_content(status=0)),
    ("level unknown", lambda: signed_content(level="high")),
    ("type unknown", lambda: signed_content(type="bulk")),
    ("signatureScheme other", lambda: signed_content(signatureScheme="RSA")),
    ("created missing", _without("created")),
    ("created a string", lambda: signed_content(created="1709502766479")),
    ("created a bool", lambda: signed_content(created=True)),
    ("created NaN", lambda: signed_content(created=float("nan"))),
    ("created infinite", lambda: signed_content(created=float("inf"))),
    ("created huge integer", lambda: signed_content(created=10**400)),
    ("handshakeId not a string", lambda: signed_content(handshakeId=5)),
    ("originServer not a map", lambda: signed_content(originServer="mio.example.com")),
    ("originServer.domain missing", lambda: signed_content(originServer={"ip": "192.0.2.1"})),
    ("senderMetadata missing", _without("senderMetadata")),
    ("senderMetadata empty", lambda: signed_content(senderMetadata={})),
    (
        "senderMetadata both",
        lambda: signed_content(senderMetadata={"emailHash": SENDER_HASH, "address": SENDER_DID}),
    ),
    ("emailHash not a hash", lambda: signed_content(senderMetadata={"emailHash": "news@shop.example"})),
    ("emailHash a number", lambda: signed_content(senderMetadata={"emailHash": 7, "address": SENDER_DID})),
    ("address not a Mailio address", lambda: signed_content(senderMetadata={"address": "did:web:x#bob"})),
    ("signupRules junk", lambda: signed_content(signupRules={"frequencyMinutes": "often"})),
]


@pytest.mark.parametrize("make", [m for _, m in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_is_400(make: Any) -> None:
    document = make()
    with pytest.raises(HandshakeError) as info:
        parse_signed_handshake(document)
    assert info.value.status == 400
    message = str(info.value)
    assert "\n" not in message
    if isinstance(document, dict) and isinstance(document.get("signatureBase64"), str):
        assert document["signatureBase64"] not in message
    assert b64(OWNER.ed25519_public) not in message


def test_owner_key_argument_must_be_a_key() -> None:
    with pytest.raises(HandshakeError) as info:
        parse_signed_handshake(signed_content(), owner_public_key=b"short")
    assert info.value.status == 400


def test_random_corruption_raises_only_handshake_errors() -> None:
    """Whatever a client sends, the caller sees a HandshakeError and nothing else."""
    rng = random.Random(20240304)
    good = base64.b64decode(signed_content()["cborPayloadBase64"])
    outcomes = set()
    for _ in range(400):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        for signer in (OWNER.ed25519_private, STRANGER.ed25519_private):
            try:
                parse_signed_handshake(sign_bytes(bytes(raw), signer))
                outcomes.add("ok")
            except HandshakeError as exc:
                outcomes.add(exc.status)
    assert {400, 403} <= outcomes


def test_sign_handshake_refuses_bad_arguments() -> None:
    base: dict[str, Any] = {"ed25519_private": OWNER.ed25519_private, "status": "accepted"}
    base["origin_domain"] = "mio.example.com"
    with pytest.raises(HandshakeError):
        sign_handshake(**base)  # no sender
    with pytest.raises(HandshakeError):
        sign_handshake(**base, sender_email_hash=SENDER_HASH, sender_did=SENDER_DID)
    with pytest.raises(HandshakeError):
        sign_handshake(**{**base, "status": "maybe"}, sender_did=SENDER_DID)
    with pytest.raises(HandshakeError):
        sign_handshake(**{**base, "ed25519_private": b"short"}, sender_did=SENDER_DID)
    with pytest.raises(HandshakeError):
        sign_handshake(**base, sender_did="bob@example.com")
    with pytest.raises(HandshakeError):
        sign_handshake(**base, sender_did=SENDER_DID, created_ms=float("nan"))


def test_handshake_is_immutable_and_hashable_for_caching() -> None:
    handshake = parse_signed_handshake(signed_content())
    with pytest.raises(AttributeError):
        handshake.status = "revoked"  # type: ignore[misc]
    assert handshake in {handshake}
    assert isinstance(handshake, Handshake)


def test_handshake_error_keeps_its_status_through_pickling() -> None:
    """RQ pickles exceptions of failed jobs; the status must survive the trip."""
    assert issubclass(HandshakeError, ValueError)
    error = pickle.loads(pickle.dumps(HandshakeError(403, "handshake signature does not verify")))  # noqa: S301 - our own bytes
    assert (error.status, str(error)) == (403, "handshake signature does not verify")


# --- dates in the future -----------------------------------------------------------------------------

MINUTE_MS = 60_000.0


@pytest.mark.parametrize("ahead_ms", [6 * MINUTE_MS, 86_400_000.0, 1e308])
def test_a_handshake_dated_in_the_future_is_400(ahead_ms: float) -> None:
    now = 1_800_000_000_000.0
    document = signed_content(created=now + ahead_ms)
    with pytest.raises(HandshakeError, match="in the future") as info:
        parse_signed_handshake(document, owner_public_key=OWNER.ed25519_public, now=now)
    assert info.value.status == 400
    assert parse_signed_handshake(document, now=now, stored=True).created == now + ahead_ms  # still readable


def test_a_few_minutes_of_clock_skew_are_accepted() -> None:
    now = 1_800_000_000_000.0
    handshake = parse_signed_handshake(signed_content(created=now + 4 * MINUTE_MS), now=now)
    assert handshake.created == now + 4 * MINUTE_MS


def _api_document(owner: Any, status: str, created_ms: float) -> dict[str, Any]:
    return sign_handshake(
        ed25519_private=owner.keys.ed25519_private,
        status=status,
        sender_email_hash=SENDER_HASH,
        origin_domain="mail.example.test",
        created_ms=created_ms,
    )


def _stored_handshakes(settings: Any) -> list[Path]:
    root = Path(settings.storage_url.removeprefix("file://")) / "handshakes"
    return sorted(root.rglob("*.json")) if root.exists() else []


@pytest.mark.parametrize("when", ["1e308", "tomorrow"])
def test_the_api_refuses_a_future_dated_handshake_and_a_later_honest_one_still_counts(
    client: Any, owner: Any, settings: Any, when: str
) -> None:
    created_ms = 1e308 if when == "1e308" else time.time() * 1000 + 86_400_000
    response = client.put("/api/v1/handshakes", json=_api_document(owner, "revoked", created_ms), headers=owner.auth)
    assert response.status_code == 400
    assert "in the future" in response.get_json()["error"]
    assert _stored_handshakes(settings) == []

    response = client.put(
        "/api/v1/handshakes", json=_api_document(owner, "accepted", time.time() * 1000), headers=owner.auth
    )
    assert response.status_code == 201, response.get_json()
    [stored] = client.get("/api/v1/handshakes", headers=owner.auth).get_json()["handshakes"]
    assert stored["content"]["status"] == "accepted"


def test_a_future_dated_handshake_stored_before_the_check_no_longer_locks_the_sender(
    client: Any, bridge: Any, owner: Any, settings: Any
) -> None:
    """A document from before this check was stored as is; the next honest upload replaces it."""
    poisoned = _api_document(owner, "revoked", 1e308)
    key = f"handshakes/{owner.mailbox.address}/{poisoned['content']['handshakeId']}.json"
    assert bridge.objects.create(key, json.dumps(poisoned).encode())

    honest = _api_document(owner, "accepted", time.time() * 1000)
    response = client.put("/api/v1/handshakes", json=honest, headers=owner.auth)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["result"] == "replaced"
    [stored] = client.get("/api/v1/handshakes", headers=owner.auth).get_json()["handshakes"]
    assert stored["content"]["status"] == "accepted"
    # and the honest one now protects itself like any other: an older replay is stale
    replay = _api_document(owner, "revoked", time.time() * 1000 - 3_600_000)
    assert client.put("/api/v1/handshakes", json=replay, headers=owner.auth).status_code == 403


def test_a_damaged_stored_handshake_is_replaced_not_a_503(client: Any, bridge: Any, owner: Any) -> None:
    honest = _api_document(owner, "accepted", time.time() * 1000)
    key = f"handshakes/{owner.mailbox.address}/{honest['content']['handshakeId']}.json"
    assert bridge.objects.create(key, b"{not json")
    response = client.put("/api/v1/handshakes", json=honest, headers=owner.auth)
    assert response.status_code == 200, response.get_json()
    assert [
        h["content"]["status"] for h in client.get("/api/v1/handshakes", headers=owner.auth).get_json()["handshakes"]
    ] == ["accepted"]
