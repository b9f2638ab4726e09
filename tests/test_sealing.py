"""Sealed bodies must open everywhere a Mailio client might open them, and nowhere else.

bridge/sealing.py seals with joserfc; here two independent JOSE implementations act as referees:
jwcrypto (Python) and panva's jose (Node.js, tests/referee/open.mjs). A body that only joserfc can open
would lock users out of their own mail, so every shape and size is opened by all three, byte-exact, and
every wrong key or tampered field must be refused by all three.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto.common import JWException

from bridge.sealing import Recipient, SealingError, open_sealed, seal, sealed_chunks

REFEREE_DIR = Path(__file__).resolve().parent / "referee"
REFEREE_INSTALL = "npm ci --prefix tests/referee --no-audit --no-fund"

PLAINTEXTS = {
    "empty": b"",
    "one-byte": b"\x00",
    "binary": bytes(range(256)) * 4 + b"\r\n.\r\n" + os.urandom(997),
    "one-megabyte": os.urandom(1 << 20),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Owner:
    """A mailbox owner's X25519 key pair, as a Mailio client would hold it."""

    def __init__(self, address: str) -> None:
        self.private = X25519PrivateKey.generate()
        self.public_raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        private_raw = self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        self.kid = f"did:web:example.com#{address}"
        self.jwk = {"kty": "OKP", "crv": "X25519", "x": b64url(self.public_raw), "d": b64url(private_raw)}

    @property
    def recipient(self) -> Recipient:
        return Recipient(kid=self.kid, x25519_public=self.public_raw)


@pytest.fixture
def alice() -> Owner:
    return Owner("0x" + os.urandom(20).hex())


@pytest.fixture
def bob() -> Owner:
    return Owner("0x" + os.urandom(20).hex())


# --------------------------------------------------------------------------------------------------
# The three openers


def open_with_jwcrypto(document: dict[str, Any], private_jwk: dict[str, Any]) -> bytes:
    token = jwcrypto_jwe.JWE()
    token.deserialize(json.dumps(document), key=jwcrypto_jwk.JWK(**private_jwk))
    return bytes(token.payload)


def referee_missing() -> str | None:
    if shutil.which("node") is None:
        return "Node.js not installed (make test installs it)"
    if not (REFEREE_DIR / "node_modules" / "jose").is_dir():
        return f"JOSE referee not installed: run `{REFEREE_INSTALL}`"
    return None


def run_referee(document: dict[str, Any], private_jwk: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    request = json.dumps({"jwe": document, "jwk": private_jwk}).encode()
    return subprocess.run(
        ["node", str(REFEREE_DIR / "open.mjs")],
        input=request,
        capture_output=True,
        timeout=60,
        check=False,
    )


def open_with_referee(document: dict[str, Any], private_jwk: dict[str, Any]) -> bytes:
    result = run_referee(document, private_jwk)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return base64.b64decode(result.stdout, validate=True)


@pytest.fixture
def referee() -> Callable[[dict[str, Any], dict[str, Any]], bytes]:
    reason = referee_missing()
    if reason:
        pytest.skip(reason)
    return open_with_referee


# --------------------------------------------------------------------------------------------------
# Every opener gets back exactly what was sealed


@pytest.mark.parametrize("name", PLAINTEXTS)
def test_open_sealed_opens_byte_exact(alice: Owner, name: str) -> None:
    document = seal(PLAINTEXTS[name], [alice.recipient])
    assert open_sealed(document, alice.jwk) == PLAINTEXTS[name]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "empty",
            marks=pytest.mark.xfail(
                raises=JWException,
                strict=True,
                reason="jwcrypto 1.6.1 treats an empty plaintext as a failed decryption "
                "(jwe.py: `if not self.plaintext: raise InvalidJWEData`); the Node referee covers it",
            ),
        ),
        *[name for name in PLAINTEXTS if name != "empty"],
    ],
)
def test_jwcrypto_opens_byte_exact(alice: Owner, name: str) -> None:
    document = seal(PLAINTEXTS[name], [alice.recipient])
    assert open_with_jwcrypto(document, alice.jwk) == PLAINTEXTS[name]


@pytest.mark.node
@pytest.mark.parametrize("name", PLAINTEXTS)
def test_node_jose_referee_opens_byte_exact(alice: Owner, name: str, referee: Callable[..., bytes]) -> None:
    document = seal(PLAINTEXTS[name], [alice.recipient])
    assert referee(document, alice.jwk) == PLAINTEXTS[name]


@pytest.mark.node
def test_stored_form_opens_after_a_round_trip_through_bytes(alice: Owner, referee: Callable[..., bytes]) -> None:
    """What goes into the object store is sealed_chunks' bytes (with the record as aad); they open everywhere."""
    plaintext = os.urandom(3_000_000)  # its ciphertext is encoded in several 1 MiB slices
    stored = b"".join(sealed_chunks(seal(plaintext, [alice.recipient], b'{"id":"x"}')))
    assert b"\n" not in stored and b": " not in stored
    document = json.loads(stored)
    assert open_sealed(document, alice.jwk) == plaintext
    assert open_with_jwcrypto(document, alice.jwk) == plaintext
    assert referee(document, alice.jwk) == plaintext


# --------------------------------------------------------------------------------------------------
# The other direction: bodies a Mailio client sealed with another library open with open_sealed


def seal_with_jwcrypto(plaintext: bytes, owner: Owner, protected: str) -> dict[str, Any]:
    """A General JSON JWE made by jwcrypto, the way another Mailio client could make it."""
    public = jwcrypto_jwk.JWK(kty="OKP", crv="X25519", x=owner.jwk["x"])
    token = jwcrypto_jwe.JWE(plaintext, protected=protected)
    token.add_recipient(public, header=json.dumps({"alg": "ECDH-ES+A256KW", "kid": owner.kid}))
    flat = json.loads(token.serialize())  # one recipient: jwcrypto writes the flattened form
    entry = {"header": flat.pop("header"), "encrypted_key": flat.pop("encrypted_key")}
    return {**flat, "recipients": [entry]}


def test_open_sealed_opens_a_body_sealed_by_jwcrypto(alice: Owner) -> None:
    document = seal_with_jwcrypto(PLAINTEXTS["binary"], alice, protected='{"enc":"A256GCM"}')
    assert open_sealed(document, alice.jwk) == PLAINTEXTS["binary"]


@pytest.mark.xfail(
    strict=True,
    raises=SealingError,
    reason="joserfc 1.8.0 authenticates a re-serialized protected header instead of the received "
    "octets (RFC 7516 5.2 step 14; authlib/joserfc#101), so valid JWEs whose protected header is "
    "not in joserfc's compact form fail to open",
)
def test_open_sealed_opens_a_body_whose_protected_header_is_not_compact(alice: Owner) -> None:
    document = seal_with_jwcrypto(b"from another client", alice, protected='{"enc": "A256GCM"}')
    assert open_with_jwcrypto(document, alice.jwk) == b"from another client"
    assert open_sealed(document, alice.jwk) == b"from another client"


@pytest.mark.node
def test_referee_opens_a_body_sealed_by_jwcrypto(alice: Owner, referee: Callable[..., bytes]) -> None:
    """Checks the referee itself: it must open a JWE it did not see joserfc make."""
    document = seal_with_jwcrypto(b"from another client", alice, protected='{"enc": "A256GCM"}')
    assert referee(document, alice.jwk) == b"from another client"


# --------------------------------------------------------------------------------------------------
# The documented shape (what Mailio clients expect)


def test_jwe_has_the_documented_shape(alice: Owner) -> None:
    secret_text = b"Subject: quarterly numbers\r\n\r\nThe numbers are in."
    document = seal(secret_text, [alice.recipient])
    assert set(document) == {"protected", "iv", "ciphertext", "tag", "recipients"}
    protected = json.loads(unb64url(document["protected"]))
    assert protected["enc"] == "A256GCM"
    assert "alg" not in protected  # per recipient, since each has its own ephemeral key
    assert len(unb64url(document["iv"])) == 12
    assert len(unb64url(document["tag"])) == 16
    assert len(unb64url(document["ciphertext"])) == len(secret_text)
    [entry] = document["recipients"]
    header = entry["header"]
    assert header["alg"] == "ECDH-ES+A256KW"
    assert header["kid"] == alice.kid
    assert header["epk"]["kty"] == "OKP"
    assert header["epk"]["crv"] == "X25519"
    assert len(unb64url(header["epk"]["x"])) == 32
    assert "d" not in header["epk"]
    assert len(unb64url(entry["encrypted_key"])) == 40  # a 256-bit content key wrapped with A256KW
    serialized = json.dumps(document)
    assert "quarterly" not in serialized
    assert alice.jwk["d"] not in serialized


def test_sealing_twice_gives_unrelated_ciphertexts(alice: Owner) -> None:
    first = seal(b"same message", [alice.recipient])
    second = seal(b"same message", [alice.recipient])
    assert first["ciphertext"] != second["ciphertext"]
    assert first["iv"] != second["iv"]
    assert first["recipients"][0]["header"]["epk"] != second["recipients"][0]["header"]["epk"]


def test_sealing_to_nobody_is_refused() -> None:
    with pytest.raises(SealingError):
        seal(b"lost", [])


# --------------------------------------------------------------------------------------------------
# Several recipients


def test_each_of_two_recipients_opens_it(alice: Owner, bob: Owner) -> None:
    body = PLAINTEXTS["binary"]
    document = seal(body, [alice.recipient, bob.recipient])
    assert [r["header"]["kid"] for r in document["recipients"]] == [alice.kid, bob.kid]
    for owner in (alice, bob):
        assert open_sealed(document, owner.jwk) == body
        assert open_with_jwcrypto(document, owner.jwk) == body


@pytest.mark.node
def test_each_of_two_recipients_opens_it_with_the_referee(
    alice: Owner, bob: Owner, referee: Callable[..., bytes]
) -> None:
    body = PLAINTEXTS["binary"]
    document = seal(body, [alice.recipient, bob.recipient])
    assert referee(document, alice.jwk) == body
    assert referee(document, bob.jwk) == body


# --------------------------------------------------------------------------------------------------
# Refusals: a wrong key or any tampered field


def flip(text: str, index: int = 0) -> str:
    raw = bytearray(unb64url(text))
    raw[index % len(raw)] ^= 0x01
    return b64url(bytes(raw))


def tamper_ciphertext(d: dict[str, Any]) -> None:
    d["ciphertext"] = flip(d["ciphertext"], 5)


def tamper_tag(d: dict[str, Any]) -> None:
    d["tag"] = flip(d["tag"], 15)


def tamper_encrypted_key(d: dict[str, Any]) -> None:
    d["recipients"][0]["encrypted_key"] = flip(d["recipients"][0]["encrypted_key"], 20)


def tamper_iv(d: dict[str, Any]) -> None:
    d["iv"] = flip(d["iv"], 0)


def tamper_protected(d: dict[str, Any]) -> None:
    # The protected header is authenticated: adding a member must break the tag.
    d["protected"] = b64url(b'{"enc":"A256GCM","cty":"text/plain"}')


def tamper_epk(d: dict[str, Any]) -> None:
    header = d["recipients"][0]["header"]
    header["epk"]["x"] = flip(header["epk"]["x"], 3)


TAMPERINGS = {
    "ciphertext": tamper_ciphertext,
    "tag": tamper_tag,
    "encrypted_key": tamper_encrypted_key,
    "iv": tamper_iv,
    "protected": tamper_protected,
    "epk": tamper_epk,
}


@pytest.fixture
def sealed(alice: Owner) -> dict[str, Any]:
    document = seal(b"Subject: hi\r\n\r\nmeet at noon", [alice.recipient])
    assert open_sealed(document, alice.jwk) == b"Subject: hi\r\n\r\nmeet at noon"
    return document


@pytest.mark.parametrize("field", TAMPERINGS)
def test_tampered_document_is_refused(sealed: dict[str, Any], alice: Owner, field: str) -> None:
    document = copy.deepcopy(sealed)
    TAMPERINGS[field](document)
    with pytest.raises(SealingError):
        open_sealed(document, alice.jwk)
    with pytest.raises(JWException):
        open_with_jwcrypto(document, alice.jwk)


def test_wrong_key_is_refused(sealed: dict[str, Any], bob: Owner) -> None:
    with pytest.raises(SealingError):
        open_sealed(sealed, bob.jwk)
    with pytest.raises(JWException):
        open_with_jwcrypto(sealed, bob.jwk)


@pytest.mark.parametrize(
    "document",
    [{}, {"ciphertext": "AAAA"}, {"protected": "not base64!", "recipients": []}],
    ids=["empty", "partial", "garbage"],
)
def test_non_jwe_is_refused(document: dict[str, Any], alice: Owner) -> None:
    with pytest.raises(SealingError):
        open_sealed(document, alice.jwk)


def test_unusable_key_is_refused_without_echoing_it(sealed: dict[str, Any]) -> None:
    bad_key = {"kty": "OKP", "crv": "X25519", "d": "c2VjcmV0LWtleS1tYXRlcmlhbA"}
    with pytest.raises(SealingError) as info:
        open_sealed(sealed, bad_key)
    assert bad_key["d"] not in str(info.value)


@pytest.mark.node
@pytest.mark.parametrize("field", TAMPERINGS)
def test_referee_refuses_tampered_document(
    sealed: dict[str, Any], alice: Owner, field: str, referee: Callable[..., bytes]
) -> None:
    document = copy.deepcopy(sealed)
    TAMPERINGS[field](document)
    result = run_referee(document, alice.jwk)
    assert result.returncode != 0
    assert result.stdout == b""


@pytest.mark.node
def test_referee_refuses_wrong_key(sealed: dict[str, Any], bob: Owner, referee: Callable[..., bytes]) -> None:
    result = run_referee(sealed, bob.jwk)
    assert result.returncode != 0
    assert result.stdout == b""
    assert bob.jwk["d"].encode() not in result.stderr
