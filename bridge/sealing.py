"""Sealing: the one module that encrypts and decrypts stored mail.

Every stored body is a JWE in General JSON serialization, ``alg: ECDH-ES+A256KW``,
``enc: A256GCM``, one recipient entry per X25519 key with ``kid`` =
``did:web:<domain>#<address>``. That is the shape of Mailio's own message bodies, so a
Mailio client opens them with any JOSE library.

The server only ever holds public keys: ``seal`` needs none of the owner's secrets, and
``open_sealed`` runs on the owner's side (the ``mail read`` CLI). All cryptography is
joserfc's; nothing here is written by hand.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast, overload

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

KEY_ALGORITHM = "ECDH-ES+A256KW"
CONTENT_ENCRYPTION = "A256GCM"
MAX_SEALED_BYTES = 1 << 31


class SealingError(ValueError):
    """A key or a sealed document is unusable (wrong key, tampered, not a JWE)."""


@dataclass(frozen=True)
class Recipient:
    """Who can open a sealed body: a kid and the raw 32-byte X25519 public key."""

    kid: str
    x25519_public: bytes

    def jwk(self) -> OKPKey:
        x = base64.urlsafe_b64encode(self.x25519_public).rstrip(b"=").decode()
        return OKPKey.import_key({"kty": "OKP", "crv": "X25519", "x": x})


def seal(plaintext: bytes, recipients: list[Recipient], aad: bytes | None = None) -> dict[str, Any]:
    """Encrypt ``plaintext`` to every recipient; returns the General JSON JWE as a dict.

    ``aad`` travels in clear beside the ciphertext but is authenticated with it: whoever opens
    the body knows those bytes were sealed together with it and not changed since.
    """
    if not recipients:
        raise SealingError("no recipient to seal to")
    document = jwe.GeneralJSONEncryption({"enc": CONTENT_ENCRYPTION}, plaintext, aad=aad)
    for recipient in recipients:
        document.add_recipient({"alg": KEY_ALGORITHM, "kid": recipient.kid}, recipient.jwk())
    sealed = jwe.encrypt_json(document, None)
    # joserfc's recipients point back at the document: break the cycle so the ciphertext-sized
    # buffers it holds are freed now, not whenever the cyclic garbage collector runs.
    document.recipients.clear()
    return dict(sealed)


def aad_of(document: dict[str, Any]) -> bytes | None:
    """The additional authenticated data of a sealed body, decoded (None when it has none)."""
    value = document.get("aad")
    if not isinstance(value, str):
        return None
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _reader_registry() -> jwe.JWERegistry:
    """joserfc refuses ciphertexts over 64 KB by default (a guard for tokens); mail is larger.

    ``verify_all_recipients=False``: a body sealed to several keys is opened with one of them.
    """
    registry = jwe.JWERegistry(algorithms=[KEY_ALGORITHM, CONTENT_ENCRYPTION], verify_all_recipients=False)
    registry.max_ciphertext_length = MAX_SEALED_BYTES
    return registry


def open_sealed(document: dict[str, Any], private_jwk: dict[str, Any]) -> bytes:
    """Decrypt a sealed body with the owner's X25519 private JWK (client side only)."""
    try:
        key = OKPKey.import_key(private_jwk)
        return jwe.decrypt_json(cast(Any, document), key, registry=_reader_registry()).plaintext or b""
    except (JoseError, ValueError, KeyError, TypeError) as exc:
        raise SealingError(f"cannot open sealed body: {exc.__class__.__name__}") from exc


class _LazyChunks(Sequence[bytes]):
    """A JSON document as byte chunks, its long ASCII member encoded a slice at a time when read."""

    def __init__(self, head: bytes, text: str, tail: bytes, size: int = 1 << 20) -> None:
        self._text = text
        self._pieces: list[bytes | tuple[int, int]] = [
            head,
            *((i, min(i + size, len(text))) for i in range(0, len(text), size)),
            tail,
        ]

    def __len__(self) -> int:
        return len(self._pieces)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        piece = self._pieces[index]
        return piece if isinstance(piece, bytes) else self._text[piece[0] : piece[1]].encode("ascii")


def sealed_chunks(document: dict[str, Any]) -> Sequence[bytes]:
    """The sealed JWE as compact JSON, in pieces: the ciphertext is encoded a slice at a time,
    so a 25 MB message's ciphertext is never copied into one more full-size object."""
    ciphertext = document.pop("ciphertext")
    head = json.dumps(document, separators=(",", ":"))
    return _LazyChunks(head[:-1].encode() + b',"ciphertext":"', ciphertext, b'"}')
