"""DID documents: the server's (``/.well-known/did.json``) and each mailbox's (``/<address>/did.json``).

Member for member as go-mailio-did builds them (mtp-wire.md section 8), so reference servers and clients
find what they look for: ``verificationMethod[0]`` is the ``JsonWebKey2020`` Ed25519 key ``<did>#master``;
a user's ``keyAgreement[0]`` is an ``X25519KeyAgreementKey2019`` whose ``publicKeyMultibase`` is bare
base58btc (no multibase ``z``: the reference decodes it with plain base58) and whose ``id`` is the
document's own DID; the ``DIDCommMessaging`` service names where MTP requests go.

Deliberate differences: service endpoints carry their ``https://`` scheme and come from
``BRIDGE_PUBLIC_URL`` (readers add ``https://`` only when it is missing, so both read alike); a user's
key agreement also has a ``publicKeyJwk`` twin for standard JOSE consumers; there is no
``MailioDIDAuth`` service because the bridge offers none.

:func:`parse_did_document` reads a peer's document strictly, and checks what the reference never does:
that the ``did:mailio`` address derives from the ``#master`` key.

Pure functions: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bridge.mailio.identity import KEY_LENGTH, _b64url, _base58btc, _from_b64url, did_mailio, mailio_address

__all__ = ["MESSAGING_PATH", "DidDocument", "parse_did_document", "server_did_document", "user_did_document"]

MESSAGING_PATH = "/api/v1/mtp/message"
CONTEXT = [
    "https://www.w3.org/ns/did/v1",
    "https://w3id.org/security/suites/ed25519-2020/v1",
    "https://w3id.org/security/suites/x25519-2019/v1",
]
ACCEPT = ["didcomm/v2", "didcomm/aip2;env=rfc587"]
_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_DID = re.compile(r"did:[a-z0-9]+:[^\s]+")


def _base_url(public_url: str) -> str:
    """``https://bridge.example`` as given, or a bare host (``mio.example.com``) with ``https://``."""
    url = public_url.rstrip("/")
    return url if url.startswith(("https://", "http://")) else f"https://{url}"


def _master(did: str, ed25519_public: bytes) -> dict[str, Any]:
    return {
        "id": f"{did}#master",
        "type": "JsonWebKey2020",
        "controller": did,
        "publicKeyJwk": {"kty": "OKP", "crv": "Ed25519", "x": _b64url(bytes(ed25519_public))},
    }


def _messaging(service_did: str, public_url: str) -> dict[str, Any]:
    return {
        "id": f"{service_did}#didcomm",
        "type": "DIDCommMessaging",
        "serviceEndpoint": f"{_base_url(public_url)}{MESSAGING_PATH}",
        "accept": list(ACCEPT),
    }


def server_did_document(public_url: str, server_public: bytes) -> dict[str, Any]:
    """The server's document: its DNS key as ``#master``, no authentication list, no key agreement."""
    did = did_mailio(mailio_address(server_public))
    return {
        "@context": list(CONTEXT),
        "id": did,
        "verificationMethod": [_master(did, server_public)],
        "service": [_messaging(did, public_url)],
    }


def user_did_document(
    public_url: str,
    address: str,
    ed25519_public: bytes,
    x25519_public: bytes,
    *,
    server_address: str | None = None,
) -> dict[str, Any]:
    """A mailbox's document served at ``<public url>/<address>/did.json``.

    ``public_url``: the bridge's base URL (or a bare host). ``server_address``: the server's Mailio
    address; the service ids hang off the server's DID as in the reference (the user's without it).
    """
    if address != mailio_address(ed25519_public):
        raise ValueError("address does not derive from the Ed25519 public key")
    if not isinstance(x25519_public, bytes | bytearray) or len(x25519_public) != KEY_LENGTH:
        raise ValueError("an X25519 public key must be 32 bytes")
    did = did_mailio(address)
    return {
        "@context": list(CONTEXT),
        "id": did,
        "authentication": [f"{did}#master"],
        "verificationMethod": [_master(did, ed25519_public)],
        "keyAgreement": [
            {
                "id": did,
                "type": "X25519KeyAgreementKey2019",
                "controller": did,
                "publicKeyMultibase": _base58btc(bytes(x25519_public)),
                "publicKeyJwk": {"kty": "OKP", "crv": "X25519", "x": _b64url(bytes(x25519_public))},
            }
        ],
        "service": [_messaging(did_mailio(server_address) if server_address else did, public_url)],
    }


@dataclass(frozen=True)
class DidDocument:
    """What a peer's document tells us: its DID, keys (raw 32 bytes) and MTP endpoint URL."""

    id: str
    address: str | None  # the did:mailio address, checked against the master key
    ed25519_public: bytes
    x25519_public: bytes | None
    messaging_endpoint: str | None


def _base58_decode(text: str) -> bytes:
    number = 0
    for char in text:
        index = _BASE58_ALPHABET.find(char)
        if index < 0:
            raise ValueError("publicKeyMultibase is not base58btc")
        number = number * 58 + index
    ones = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * ones + body


def _x25519_of(method: dict[str, Any]) -> bytes:
    jwk = method.get("publicKeyJwk")
    if isinstance(jwk, dict) and (jwk.get("kty"), jwk.get("crv")) == ("OKP", "X25519"):
        return _from_b64url(jwk.get("x"), name="keyAgreement publicKeyJwk.x")
    multibase = method.get("publicKeyMultibase")
    if not isinstance(multibase, str) or not 0 < len(multibase) <= 64:
        raise ValueError("keyAgreement has no usable key")
    raw = _base58_decode(multibase[1:] if multibase.startswith("z") and len(multibase) > 44 else multibase)
    if len(raw) != KEY_LENGTH:
        raise ValueError("keyAgreement key is not 32 bytes")
    return raw


def _endpoint(service: Any) -> str | None:
    """The first DIDCommMessaging endpoint, read as the reference reads it (``https://`` when missing)."""
    for item in service if isinstance(service, list) else ():
        if isinstance(item, dict) and item.get("type") == "DIDCommMessaging":
            endpoint = item.get("serviceEndpoint")
            if not isinstance(endpoint, str) or not endpoint:
                return None
            endpoint = endpoint.rstrip("/")
            return endpoint if endpoint.startswith("http") else f"https://{endpoint}"
    return None


def parse_did_document(document: Any) -> DidDocument:
    """A peer's DID document, strictly; raises ``ValueError`` naming what is wrong (never a key's value).

    ``#master`` must be an Ed25519 ``OKP`` JWK; a ``did:mailio`` id must derive from it (the reference
    never checks). The X25519 key is read from the JWK twin, else from bare (or ``z``-prefixed) base58.
    """
    if not isinstance(document, dict):
        raise ValueError("DID document is not an object")
    did = document.get("id")
    if not isinstance(did, str) or not _DID.fullmatch(did):
        raise ValueError("DID document id is not did:<method>:<value>")
    methods = document.get("verificationMethod")
    master = None
    for method in methods if isinstance(methods, list) else ():
        if isinstance(method, dict) and method.get("id") == f"{did}#master":
            master = method
            break
    if master is None:
        raise ValueError("DID document has no #master verification method")
    jwk = master.get("publicKeyJwk")
    if not isinstance(jwk, dict) or (jwk.get("kty"), jwk.get("crv")) != ("OKP", "Ed25519"):
        raise ValueError("#master is not an Ed25519 OKP JWK")
    ed25519 = _from_b64url(jwk.get("x"), name="#master publicKeyJwk.x")
    address = None
    if did.startswith("did:mailio:"):
        address = did.removeprefix("did:mailio:")
        if address != mailio_address(ed25519):
            raise ValueError("DID does not derive from its #master key")
    x25519 = None
    agreements = document.get("keyAgreement")
    if isinstance(agreements, list) and agreements:
        if not isinstance(agreements[0], dict):
            raise ValueError("keyAgreement is not a verification method")
        x25519 = _x25519_of(agreements[0])
    return DidDocument(did, address, ed25519, x25519, _endpoint(document.get("service")))
