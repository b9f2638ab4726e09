"""Mailio identity: addresses, DIDs, e-mail lookup hashes, handshake ids and user key files.

DID documents are built and read in ``bridge.mailio.did``.

Everything here is a pure function of its inputs, bit-for-bit compatible with the reference Go server
(mailio/go-mailio-server ``util/crypto.go``, mailio/go-mailio-did ``did/document.go``), because other
Mailio servers and clients derive the same values independently and compare them.

It must never do I/O, never log, and never put key material in an exception message. Key generation
and serialization are the ``cryptography`` package's; hashing is ``hashlib``'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LENGTH = 32

# scrypt parameters of the e-mail lookup hash (the reference's "SC_N32768_R8_P1_L32_B64" scheme).
SCRYPT_N = 32768
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
# scrypt needs 128 * N * r bytes = 32 MiB here; hashlib's default ceiling (32 MiB) is just too small.
SCRYPT_MAXMEM = 64 * 1024 * 1024

ADDRESS_RE = re.compile(r"0x[0-9a-f]{40}")

_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw
_NO_ENCRYPTION = serialization.NoEncryption()
_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b64std(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _from_b64url(value: Any, *, name: str) -> bytes:
    """Decode an unpadded base64url JWK member of exactly 32 bytes, canonical form only."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{43}", value):
        raise ValueError(f"{name} is not a 32-byte base64url value")
    raw = base64.urlsafe_b64decode(value + "=")
    if _b64url(raw) != value:
        raise ValueError(f"{name} is not canonical base64url")
    return raw


def _base58btc(raw: bytes) -> str:
    """Bitcoin-alphabet base58, as mr-tron/base58 writes ``publicKeyMultibase`` in the reference.

    A plain encoding (not cryptography); written here to avoid a dependency for ten lines.
    """
    number = int.from_bytes(raw, "big")
    digits = []
    while number:
        number, rest = divmod(number, 58)
        digits.append(_BASE58_ALPHABET[rest])
    zeros = len(raw) - len(raw.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(digits))


def mailio_address(ed25519_public: bytes) -> str:
    """The owner's Mailio address: the last 20 bytes of sha256 over the key's base64 *text*."""
    if not isinstance(ed25519_public, bytes | bytearray) or len(ed25519_public) != KEY_LENGTH:
        raise ValueError("an Ed25519 public key must be 32 bytes")
    digest = hashlib.sha256(_b64std(bytes(ed25519_public)).encode("ascii")).hexdigest()
    return "0x" + digest[24:64]


def is_mailio_address(value: object) -> bool:
    """True for a well-formed lower-case ``0x`` + 40 hex address (the only form the reference emits)."""
    return isinstance(value, str) and ADDRESS_RE.fullmatch(value) is not None


def email_lookup_hash(email: str) -> str:
    """scrypt of the lower-cased address, salted with itself: how servers look senders up without
    revealing the address. About 120 ms and 32 MiB per call, so callers cache the result.

    No trimming or normalization beyond ``lower()``: the reference does exactly ``strings.ToLower``.
    """
    if not isinstance(email, str) or not email:
        raise ValueError("e-mail address must be a non-empty string")
    secret = email.lower().encode("utf-8")
    derived = hashlib.scrypt(
        secret,
        salt=secret,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM,
        dklen=SCRYPT_DKLEN,
    )
    return _b64std(derived)


def handshake_id(owner_address: str, sender_key: str) -> str:
    """sha256 hex of plain concatenation; ``sender_key`` is an e-mail lookup hash or a full did:web."""
    return hashlib.sha256((owner_address + sender_key).encode("utf-8")).hexdigest()


def did_mailio(address: str) -> str:
    return f"did:mailio:{address}"


def did_web(host: str, address: str) -> str:
    """The messaging identity: JWE ``kid`` of sealed bodies and the Mailio sender key of handshakes."""
    return f"did:web:{host}#{address}"


@dataclass(frozen=True, repr=False)
class UserKeys:
    """A user's two key pairs as raw 32-byte values. Lives on the user's side (CLI, tests), never the server.

    ``repr`` is suppressed so private keys never reach a log or a traceback by accident.
    """

    ed25519_private: bytes
    ed25519_public: bytes
    x25519_private: bytes
    x25519_public: bytes

    def __repr__(self) -> str:
        return f"UserKeys(address={self.address!r})"

    @property
    def address(self) -> str:
        return mailio_address(self.ed25519_public)

    def to_key_file(self, email: str) -> dict[str, Any]:
        """The JSON key file the owner keeps: private JWKs, usable by any JOSE library."""
        return {
            "email": email,
            "address": self.address,
            "signing_key": {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": _b64url(self.ed25519_public),
                "d": _b64url(self.ed25519_private),
            },
            "encryption_key": {
                "kty": "OKP",
                "crv": "X25519",
                "x": _b64url(self.x25519_public),
                "d": _b64url(self.x25519_private),
            },
        }

    @classmethod
    def from_key_file(cls, data: Any) -> UserKeys:
        """Load a key file, checking that each public half matches its private half and the address."""
        if not isinstance(data, dict):
            raise ValueError("key file is not a JSON object")
        signing = data.get("signing_key")
        encryption = data.get("encryption_key")
        if not isinstance(signing, dict) or (signing.get("kty"), signing.get("crv")) != ("OKP", "Ed25519"):
            raise ValueError("signing_key is not an Ed25519 OKP JWK")
        if not isinstance(encryption, dict) or (encryption.get("kty"), encryption.get("crv")) != (
            "OKP",
            "X25519",
        ):
            raise ValueError("encryption_key is not an X25519 OKP JWK")
        ed_private = _from_b64url(signing.get("d"), name="signing_key.d")
        x_private = _from_b64url(encryption.get("d"), name="encryption_key.d")
        keys = cls._from_private(ed_private, x_private)
        if _from_b64url(signing.get("x"), name="signing_key.x") != keys.ed25519_public:
            raise ValueError("signing_key.x does not match signing_key.d")
        if _from_b64url(encryption.get("x"), name="encryption_key.x") != keys.x25519_public:
            raise ValueError("encryption_key.x does not match encryption_key.d")
        if "address" in data and data["address"] != keys.address:
            raise ValueError("address does not derive from signing_key")
        return keys

    @classmethod
    def _from_private(cls, ed25519_private: bytes, x25519_private: bytes) -> UserKeys:
        ed = Ed25519PrivateKey.from_private_bytes(ed25519_private)
        xk = X25519PrivateKey.from_private_bytes(x25519_private)
        return cls(
            ed25519_private=ed.private_bytes(_RAW, _RAW_PRIVATE, _NO_ENCRYPTION),
            ed25519_public=ed.public_key().public_bytes(_RAW, _RAW_PUBLIC),
            x25519_private=xk.private_bytes(_RAW, _RAW_PRIVATE, _NO_ENCRYPTION),
            x25519_public=xk.public_key().public_bytes(_RAW, _RAW_PUBLIC),
        )


def generate_user_keys() -> UserKeys:
    """Fresh Ed25519 signing and X25519 key-agreement pairs from the OS CSPRNG (via ``cryptography``)."""
    ed = Ed25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIVATE, _NO_ENCRYPTION)
    xk = X25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIVATE, _NO_ENCRYPTION)
    return UserKeys._from_private(ed, xk)


def parse_public_key_b64(value: str, *, name: str) -> bytes:
    """Standard base64 of a 32-byte key -> raw bytes, canonical form only.

    Canonical matters: the address hashes the base64 *text*, so two spellings of one key would give
    two addresses. The message names the field, never its value.
    """
    if not isinstance(value, str) or len(value) != 44:
        raise ValueError(f"{name} is not a base64 32-byte key")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None
    if len(raw) != KEY_LENGTH or _b64std(raw) != value:
        raise ValueError(f"{name} is not a canonical base64 32-byte key")
    return raw


def verify_ed25519(public: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification through ``cryptography``; False (never an exception) for any failure."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
