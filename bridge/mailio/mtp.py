"""The Mailio transfer protocol (MTP) on the wire: signed envelopes and the payloads they carry.

Two Mailio servers talk over HTTPS POST with JSON bodies ``{<payload key>: {...}, cborPayloadBase64,
signatureBase64[, senderDomain]}``. The signature is the sending server's Ed25519 signature over the CBOR
bytes of the payload; the payload also appears as a JSON "twin". The reference server
(mailio/go-mailio-server) builds both from one Go struct and, receiving, trusts only the twin. We do the
opposite (mailio.md section 7, defect 3): :func:`verify` checks the signature over the received bytes and
returns the payload decoded from them; nothing here ever reads the twin.

Interoperability depends on byte-exact CBOR: the reference signs what fxamacker/cbor writes for its
structs (keys in declaration order, ``omitempty`` members dropped when empty, shortest integers), so the
builders below write each payload's keys in that order with the same omissions (mtp-wire.md sections 2-7),
and :func:`encode_cbor` is cbor2's default (non-canonical) encoder, which keeps insertion order. Times
are integer milliseconds, in CBOR and in JSON.

Protocol code only: no Flask, no Redis, no I/O, no logging; errors are :class:`MtpError` with the HTTP
status to answer (400 shape, 401 signature, 413 size) and a one-line reason that never quotes key
material or message content.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.mailio.discovery import InvalidDomain, normalize_domain
from bridge.mailio.identity import verify_ed25519
from bridge.mailio.status import StatusCode, status_codes_body

SIGNATURE_SCHEME = "EdDSA_X25519"  # what the reference calls plain Ed25519
SIGNATURE_LENGTH = 64

#: Payload keys of the signed bodies (mtp-wire.md sections 3, 6, 7).
DIDCOMM_REQUEST = "didCommRequest"
DID_LOOKUP_REQUEST = "didLookupRequest"
DID_LOOKUP_RESPONSE = "didLookupResponse"
HANDSHAKE_REQUEST = "handshakeRequest"
HANDSHAKE_RESPONSE = "handshakeResponse"

TYPE_ENCRYPTED = "application/didcomm-encrypted+json"
TYPE_SIGNED = "application/didcomm-signed+json"
MESSAGE_TYPES = (
    TYPE_ENCRYPTED,
    TYPE_SIGNED,
    "application/mailio-smtp+json",
    "application/mailio-handshake+json",
    "application/mailio-handshake-request+json",
    "application/mailio-handshake-response+json",
)
INTENT_MESSAGE, INTENT_HANDSHAKE, INTENT_DELIVERY, INTENT_HANDSHAKE_REQUEST = (
    "message",
    "handshake",
    "delivery",
    "handshake_request",
)
INTENTS = (INTENT_MESSAGE, INTENT_HANDSHAKE, INTENT_DELIVERY, INTENT_HANDSHAKE_REQUEST)

#: A didCommRequest is nested about 6 deep (request -> message -> body -> recipients -> header -> epk).
MAX_DEPTH = 16
#: Longest senderDomain we read at all (a DNS name is at most 253 octets; Unicode forms are longer).
MAX_DOMAIN_CHARS = 1024


class MtpError(ValueError):
    """An MTP body or payload is unusable; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[type[MtpError], tuple[int, str]]:
        return (type(self), (self.status, str(self)))


def _bad(message: str) -> MtpError:
    return MtpError(400, message)


# --- CBOR ------------------------------------------------------------------------------------


def encode_cbor(payload: dict[str, Any]) -> bytes:
    """fxamacker/cbor's bytes for a payload built by this module: keys as inserted, shortest ints.

    Never pass a dict decoded from a peer: re-encoding need not give the bytes the peer signed.
    """
    return cbor2.dumps(payload)


def decode_cbor(raw: bytes, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Exactly one CBOR map, no trailing bytes, no duplicate keys, bounded depth, only what JSON carries.

    Call it on bytes whose signature was verified (:func:`verify` does). Raises ``MtpError(400)``.
    Signed handshakes are decoded by it too (``bridge.mailio.handshakes.decode_content``).
    """
    stream = io.BytesIO(raw)
    try:
        decoder = cbor2.CBORDecoder(stream, max_depth=max_depth, allow_duplicate_keys=False, strict_hashable_types=True)
        item = decoder.decode()
    except Exception:  # cbor2 and its tag decoders raise many types; all mean "not CBOR we take"
        raise _bad("cborPayloadBase64 is not a valid CBOR item") from None
    if stream.tell() != len(raw):
        raise _bad("cborPayloadBase64 has trailing bytes after the CBOR item")
    if not isinstance(item, dict):
        raise _bad("cborPayloadBase64 is not a CBOR map")
    _check_plain(item, 0, max_depth)
    return item


def _check_plain(value: Any, depth: int, max_depth: int) -> None:
    """Refuse byte strings, tags' objects, non-text keys and non-finite numbers: no MTP payload has them."""
    if depth > max_depth:
        raise _bad("cborPayloadBase64 is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad("cborPayloadBase64 has a map key that is not text")
            _check_plain(item, depth + 1, max_depth)
    elif isinstance(value, list):
        for item in value:
            _check_plain(item, depth + 1, max_depth)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad("cborPayloadBase64 holds a non-finite number")
    elif value is not None and not isinstance(value, str | int):
        raise _bad("cborPayloadBase64 holds a value that is not text, a number, a list or a map")


def go_struct(*fields: tuple[str, Any, bool]) -> dict[str, Any]:
    """A Go struct as fxamacker/cbor writes it: (key, value, omitempty) in declaration order.

    ``omitempty`` drops "", 0, False, None and an empty list; a map (a non-null pointer) always stays.
    """
    out: dict[str, Any] = {}
    for key, value, omitempty in fields:
        if omitempty and (value is None or (not isinstance(value, dict) and not value)):
            continue
        out[key] = value
    return out


# --- the signed envelope ---------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class SignedRequest:
    """A parsed but not yet verified body: the exact CBOR bytes, the signature and who claims to sign."""

    payload_key: str
    cbor: bytes
    signature: bytes
    sender_domain: str | None  # A-labels, lower case; None for answers (they carry none)

    def __repr__(self) -> str:
        return f"SignedRequest({self.payload_key!r}, {len(self.cbor)} bytes, from {self.sender_domain!r})"


def sign_request(
    payload_key: str, payload: dict[str, Any], key: Ed25519PrivateKey, sender_domain: str | None
) -> dict[str, Any]:
    """The JSON body of a signed request (or, without ``sender_domain``, of a signed answer).

    The twin is the payload itself: the same keys and omissions as the CBOR, as the reference sends.
    """
    raw = encode_cbor(payload)
    body: dict[str, Any] = {
        payload_key: payload,
        "cborPayloadBase64": base64.b64encode(raw).decode("ascii"),
        "signatureBase64": base64.b64encode(key.sign(raw)).decode("ascii"),
    }
    if sender_domain is not None:
        body["senderDomain"] = sender_domain
    return body


def body_bytes(body: dict[str, Any]) -> bytes:
    """Compact JSON, members in order, integers without ``.0`` (what Go's encoder writes for these bodies)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(f"member {key[:40]!r} appears twice")
        out[key] = value
    return out


def _padded_b64(body: dict[str, Any], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"{name} is missing or not a string")
    if len(value) % 4:
        raise _bad(f"{name} is not padded standard base64")
    try:
        return base64.b64decode(value, validate=True)  # refuses newlines, base64url and bad padding
    except (binascii.Error, ValueError):
        raise _bad(f"{name} is not padded standard base64") from None


def parse_signed(
    body: bytes, payload_key: str, *, max_bytes: int | None = None, sender_domain: bool = True
) -> SignedRequest:
    """Read the envelope of a signed body, strictly; nothing is decoded from the CBOR yet.

    Required: a JSON object with the payload twin (an object, never read), ``cborPayloadBase64`` and
    ``signatureBase64`` (padded standard base64, a 64-byte signature) and, for requests
    (``sender_domain=True``), ``senderDomain``: a host name of letters, digits, hyphens and dots (IDNA;
    no port, scheme or ``_``), returned as lower-case A-labels. Raises ``MtpError`` 413 or 400.
    """
    if max_bytes is not None and len(body) > max_bytes:
        raise MtpError(413, f"body is over {max_bytes} bytes")
    try:
        document = json.loads(body, object_pairs_hook=_unique_members)
    except MtpError:
        raise
    except (ValueError, RecursionError):
        raise _bad("body is not JSON") from None
    if not isinstance(document, dict):
        raise _bad("body is not a JSON object")
    if not isinstance(document.get(payload_key), dict):
        raise _bad(f"{payload_key} is missing or not an object")
    raw = _padded_b64(document, "cborPayloadBase64")
    signature = _padded_b64(document, "signatureBase64")
    if len(signature) != SIGNATURE_LENGTH:
        raise _bad(f"signatureBase64 is not a {SIGNATURE_LENGTH}-byte Ed25519 signature")
    domain: str | None = None
    if sender_domain:
        claimed = document.get("senderDomain")
        if not isinstance(claimed, str) or not claimed:
            raise _bad("senderDomain is missing or not a string")
        if len(claimed) > MAX_DOMAIN_CHARS or claimed != claimed.strip() or claimed.endswith("."):
            raise _bad("senderDomain is an invalid domain")
        try:
            domain = normalize_domain(claimed)
        except InvalidDomain:
            raise _bad("senderDomain is an invalid domain") from None
    return SignedRequest(payload_key, raw, signature, domain)


def verify(signed: SignedRequest, public_key: bytes) -> dict[str, Any]:
    """The payload decoded from the signed CBOR bytes, once the signature verifies with ``public_key``.

    Raises ``MtpError(401)`` when it does not (the caller may rediscover the key once and try again),
    ``MtpError(400)`` when the verified bytes are not a CBOR map we take.
    """
    if not verify_ed25519(public_key, signed.signature, signed.cbor):
        raise MtpError(401, "signature does not verify with the sender's published key")
    return decode_cbor(signed.cbor)


# --- payloads: messages (section 3) ----------------------------------------------------------


def did_comm_message(
    *,
    type: str,
    from_: str,
    id: str = "",
    to: list[str] | None = None,
    to_emails: list[dict[str, str]] | None = None,
    thid: str = "",
    pthid: str = "",
    expires_time: int = 0,
    created_time: int = 0,
    next: str = "",
    from_prior: str = "",
    intent: str = "",
    body: dict[str, Any] | None = None,
    attachments: list[dict[str, Any]] | None = None,
    plain_body_base64: str = "",
) -> dict[str, Any]:
    """``DIDCommMessage``: ``type`` and ``from`` always written, everything else only when set."""
    return go_struct(
        ("type", type, False),
        ("id", id, True),
        ("from", from_, False),
        ("to", to, True),
        ("toEmails", [{"email": e["email"], "emailHash": e["emailHash"]} for e in to_emails or ()], True),
        ("thid", thid, True),
        ("pthid", pthid, True),
        ("expiresTime", int(expires_time), True),
        ("createdTime", int(created_time), True),
        ("next", next, True),
        ("fromPrior", from_prior, True),
        ("intent", intent, True),
        ("body", body, True),
        ("attachments", attachments, True),
        ("plainBodyBase64", plain_body_base64, True),
    )


def jwe_body(document: dict[str, Any]) -> dict[str, Any]:
    """A General JSON JWE in the reference's shape: its six members in order, recipients' ``kid``/``epk``.

    The reference drops every other member (a recipient's ``alg`` included): seal with ``alg`` in the
    protected header if a reference client must open it.
    """
    recipients = []
    for recipient in document.get("recipients") or ():
        header = recipient.get("header") or {}
        epk = header.get("epk")
        header_out = go_struct(("kid", header.get("kid", ""), False))
        if isinstance(epk, dict):
            header_out["epk"] = go_struct(
                ("x", epk.get("x", ""), True), ("crv", epk.get("crv", ""), True), ("kty", epk.get("kty", ""), True)
            )
        recipients.append({"encrypted_key": recipient.get("encrypted_key", ""), "header": header_out})
    return {
        "aad": document.get("aad", ""),
        "ciphertext": document.get("ciphertext", ""),
        "iv": document.get("iv", ""),
        "recipients": recipients,
        "tag": document.get("tag", ""),
        "protected": document.get("protected", ""),
    }


def attachment(id: str, *, base64_data: str = "", hash: str = "", links: list[str] | None = None) -> dict[str, Any]:
    """An attachment as the reference sender writes it (data inlined, ``links`` null)."""
    return {"id": id, "data": go_struct(("hash", hash, True), ("base64", base64_data, True), ("links", links, False))}


def did_comm_request(message: dict[str, Any], timestamp_ms: int) -> dict[str, Any]:
    """The ``didCommRequest`` payload of ``POST /api/v1/mtp/message``."""
    return {"signatureScheme": SIGNATURE_SCHEME, "timestamp": int(timestamp_ms), "didCommMessage": message}


def receipt(msg_id: str, timestamp_ms: int) -> dict[str, Any]:
    """The 202 receipt's payload (section 3.1): ``type`` and ``from`` present and empty, the received ``id``."""
    return did_comm_request(did_comm_message(type="", from_="", id=msg_id), timestamp_ms)


def delivery_message(
    *, msg_id: str, from_did: str, to_did: str, codes: Iterable[StatusCode], timestamp_ms: int
) -> dict[str, Any]:
    """The ``didCommRequest`` of a delivery message (section 4): per-recipient RFC 3463 codes for ``msg_id``.

    ``from_did``: the receiving server's identity (we write ``did:web:<domain>#<server address>``; the
    reference writes ``did:web:<domain>:<server address>``); ``to_did``: the original message's ``from``.
    """
    message = did_comm_message(
        type=TYPE_SIGNED,
        id=msg_id,
        from_=from_did,
        to=[to_did],
        intent=INTENT_DELIVERY,
        plain_body_base64=status_codes_body(codes),
    )
    return did_comm_request(message, timestamp_ms)
