"""Mailio identity: addresses, lookup hashes, ids and DID documents must match the reference bit for bit,
and user key files must round-trip and refuse anything inconsistent."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from joserfc import jws
from joserfc.jwk import OKPKey

from bridge.mailio import identity
from bridge.mailio.did import user_did_document
from bridge.mailio.identity import (
    UserKeys,
    did_mailio,
    did_web,
    email_lookup_hash,
    generate_user_keys,
    handshake_id,
    mailio_address,
    parse_public_key_b64,
)

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "mailio_vectors.json").read_text())
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@pytest.mark.parametrize("vector", VECTORS["mailio_address"], ids=lambda v: v["source"])
def test_mailio_address_matches_vectors(vector: dict[str, str]) -> None:
    public = base64.b64decode(vector["ed25519_public_b64"])
    assert mailio_address(public) == vector["address"]
    assert identity.is_mailio_address(vector["address"])


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "not bytes"])
def test_mailio_address_refuses_anything_but_32_bytes(bad: Any) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mailio_address(bad)


@pytest.mark.parametrize("vector", VECTORS["email_lookup_hash"], ids=lambda v: v["source"])
def test_email_lookup_hash_matches_vectors(vector: dict[str, str]) -> None:
    assert email_lookup_hash(vector["email"]) == vector["hash_b64"]


def test_email_lookup_hash_ignores_case_like_the_reference() -> None:
    reference = VECTORS["email_lookup_hash"][0]
    assert email_lookup_hash(reference["email"].upper()) == reference["hash_b64"]


def test_email_lookup_hash_refuses_empty() -> None:
    with pytest.raises(ValueError):
        email_lookup_hash("")


@pytest.mark.parametrize("vector", VECTORS["handshake_id"], ids=lambda v: v["sender_key"][:8])
def test_handshake_id_matches_vectors(vector: dict[str, str]) -> None:
    assert handshake_id(vector["owner_address"], vector["sender_key"]) == vector["handshake_id"]


def test_dids() -> None:
    address = VECTORS["mailio_address"][0]["address"]
    assert did_mailio(address) == f"did:mailio:{address}"
    assert did_web("mio.example.com", address) == f"did:web:mio.example.com#{address}"


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _base58_decode(text: str) -> bytes:
    number = 0
    for char in text:
        number = number * 58 + BASE58.index(char)
    ones = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * ones + body


def test_user_did_document_follows_the_reference_shape() -> None:
    keys = generate_user_keys()
    doc = user_did_document("mio.example.com", keys.address, keys.ed25519_public, keys.x25519_public)
    did = f"did:mailio:{keys.address}"
    assert doc["id"] == did
    assert doc["authentication"] == [f"{did}#master"]
    [master] = doc["verificationMethod"]
    assert master["id"] == f"{did}#master"
    assert master["type"] == "JsonWebKey2020"
    assert master["controller"] == did
    assert master["publicKeyJwk"]["kty"] == "OKP"
    assert master["publicKeyJwk"]["crv"] == "Ed25519"
    assert _b64url_decode(master["publicKeyJwk"]["x"]) == keys.ed25519_public
    [agreement] = doc["keyAgreement"]
    assert agreement["type"] == "X25519KeyAgreementKey2019"
    assert _base58_decode(agreement["publicKeyMultibase"]) == keys.x25519_public
    assert _b64url_decode(agreement["publicKeyJwk"]["x"]) == keys.x25519_public
    [service] = [s for s in doc["service"] if s["type"] == "DIDCommMessaging"]
    assert service["serviceEndpoint"] == "https://mio.example.com/api/v1/mtp/message"
    json.dumps(doc)  # served as JSON as is


def test_base58_matches_bitcoin_vectors() -> None:
    # From Bitcoin Core's base58_encode_decode.json; leading zero bytes become "1"s.
    assert identity._base58btc(bytes.fromhex("516b6fcd0f")) == "ABnLTmg"
    assert identity._base58btc(bytes.fromhex("00eb15231dfceb60925886b67d065299925915aeb172c06647")) == (
        "1NS17iag9jJgTHD1VXjvLCEnZuQ3rJDE9L"
    )
    assert identity._base58btc(b"\0" * 32) == "1" * 32


def test_did_document_master_key_verifies_a_jws_signed_with_the_key_file() -> None:
    """What a peer does with the document: take #master and check the owner's signature with it."""
    keys = generate_user_keys()
    doc = user_did_document("mio.example.com", keys.address, keys.ed25519_public, keys.x25519_public)
    signing = OKPKey.import_key(keys.to_key_file("a@mio.example.com")["signing_key"])
    token = jws.serialize_compact({"alg": "Ed25519"}, b"hello", signing, algorithms=["Ed25519"])
    public = OKPKey.import_key(doc["verificationMethod"][0]["publicKeyJwk"])
    assert jws.deserialize_compact(token, public, algorithms=["Ed25519"]).payload == b"hello"


def test_user_did_document_refuses_an_address_of_another_key() -> None:
    keys, other = generate_user_keys(), generate_user_keys()
    with pytest.raises(ValueError, match="address"):
        user_did_document("mio.example.com", other.address, keys.ed25519_public, keys.x25519_public)
    with pytest.raises(ValueError, match="X25519"):
        user_did_document("mio.example.com", keys.address, keys.ed25519_public, b"short")


def test_generated_keys_are_fresh_and_consistent() -> None:
    keys, other = generate_user_keys(), generate_user_keys()
    assert keys.ed25519_private != other.ed25519_private
    assert keys.x25519_private != other.x25519_private
    for raw in (keys.ed25519_private, keys.ed25519_public, keys.x25519_private, keys.x25519_public):
        assert len(raw) == 32
    signature = Ed25519PrivateKey.from_private_bytes(keys.ed25519_private).sign(b"m")
    assert identity.verify_ed25519(keys.ed25519_public, signature, b"m")
    assert not identity.verify_ed25519(other.ed25519_public, signature, b"m")
    # The two X25519 halves agree with each other: a peer derives the same shared secret.
    mine = X25519PrivateKey.from_private_bytes(keys.x25519_private)
    theirs = X25519PrivateKey.from_private_bytes(other.x25519_private)
    assert mine.exchange(X25519PublicKey.from_public_bytes(other.x25519_public)) == theirs.exchange(
        X25519PublicKey.from_public_bytes(keys.x25519_public)
    )


def test_user_keys_repr_shows_no_key_material() -> None:
    keys = generate_user_keys()
    text = repr(keys)
    assert keys.address in text
    file = keys.to_key_file("a@b.example")
    for secret in (file["signing_key"]["d"], file["encryption_key"]["d"], repr(keys.ed25519_private)):
        assert secret not in text


def test_key_file_round_trip_through_json(tmp_path: Path) -> None:
    keys = generate_user_keys()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys.to_key_file("Owner@Mio.Example.com")))
    data = json.loads(path.read_text())
    assert data["email"] == "Owner@Mio.Example.com"
    assert data["address"] == keys.address
    assert data["signing_key"]["crv"] == "Ed25519"
    assert data["encryption_key"]["crv"] == "X25519"
    assert UserKeys.from_key_file(data) == keys
    # Any JOSE library takes the JWKs as they are.
    assert OKPKey.import_key(data["encryption_key"]).is_private


def _mutated(**changes: Any) -> dict[str, Any]:
    data = generate_user_keys().to_key_file("a@b.example")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return data


_DELETE = object()
_OTHER = generate_user_keys().to_key_file("x@y.example")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("not a dict", "JSON object"),
        (_mutated(signing_key=_DELETE), "signing_key"),
        (_mutated(signing_key__crv="X25519"), "signing_key"),
        (_mutated(encryption_key__kty="EC"), "encryption_key"),
        (_mutated(signing_key__d="!!!"), "signing_key.d"),
        (_mutated(encryption_key__d=_DELETE), "encryption_key.d"),
        (_mutated(signing_key__x=_OTHER["signing_key"]["x"]), "signing_key.x does not match"),
        (_mutated(encryption_key__x=_OTHER["encryption_key"]["x"]), "encryption_key.x does not match"),
        (_mutated(address=_OTHER["address"]), "address"),
    ],
)
def test_malformed_key_files_are_refused_with_a_reason(data: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        UserKeys.from_key_file(data)
    assert "\n" not in str(info.value)
    if isinstance(data, dict) and isinstance(data.get("signing_key"), dict):
        assert str(data["signing_key"].get("d")) not in str(info.value)


def test_parse_public_key_b64() -> None:
    text = VECTORS["mailio_address"][0]["ed25519_public_b64"]
    assert parse_public_key_b64(text, name="ownerPublicKey") == base64.b64decode(text)
    non_canonical = text[:-2] + "Z="  # same bytes to a lax decoder, different text (and address)
    assert base64.b64decode(non_canonical) == base64.b64decode(text)
    for bad in (non_canonical, text[:-4], text + "AAAA", "!" * 44, base64.b64encode(b"\1" * 31).decode(), 7):
        with pytest.raises(ValueError, match="ownerPublicKey"):
            parse_public_key_b64(bad, name="ownerPublicKey")  # type: ignore[arg-type]
