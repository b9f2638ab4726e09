"""Signed Mailio handshakes: the owner's statement "mail from this sender is welcome (or not)".

A handshake travels as ``{content, signatureBase64, cborPayloadBase64}``. The owner (the recipient who
approves a sender) signs the CBOR encoding of ``content`` with Ed25519; ``content`` itself is an unsigned
JSON twin. This module verifies and parses such documents (server side) and produces them (owner side).

What we follow: the reference server mailio/go-mailio-server ``types/handshake.go`` (``HandshakeContent``,
``SenderMetadata``, the string enums) and ``util/handshake.go`` (``VerifyHandshake``), plus the
client-produced payload in its ``util/handshake_test.go``. ``sign_handshake`` writes the members in that
client's order (handshakeId, originServer, type, status, level, ownerPublicKey, ownerAddress, created,
senderMetadata, signatureScheme), ``created`` as a CBOR double, and omits the optional ``signupSubType`` /
``signupRules`` (the Go struct types ``signupSubType`` as ``*int`` while its constants are strings, so
sending one would break decoding there). fxamacker/cbor decodes maps by key name, so the reference server
decodes what we produce. Where the reference is weaker, we are stricter (mailio.md section 7, defect 3):

* the signature is verified over the EXACT received CBOR bytes (real clients emit non-canonical CBOR, so
  re-encoding would change the bytes), and only the decoded CBOR is used afterwards;
* the JSON ``content`` twin is ignored entirely, whatever it says. It is unsigned, so it carries no
  authority; demanding equality would reject honest clients whose JSON differs only in number formatting
  or omitted empty members; and ``Handshake.to_document`` rebuilds ``content`` from the signed bytes, so a
  stored document never carries a twin that disagrees with its signature;
* ownerAddress and handshakeId must derive from the signed key and sender, which the reference never checks;
* ``created`` may not lie more than MAX_FUTURE_MS ahead of our clock: since a newer ``created`` wins, one
  signed document dated in the year 10,000 (or ``1e308``) would otherwise lock that sender's handshake
  forever, every later honest one being "stale".

Errors: ``HandshakeError`` with ``.status`` 400 (cannot be parsed, wrong types or values) or 403 (parses,
but the signature, the owner or a derived identifier does not check out). Messages name fields, never
their values or any key. This module must never do I/O, never touch Flask/Redis/S3, and never raise
anything but ``HandshakeError`` from ``parse_signed_handshake``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.mailio.identity import (
    email_lookup_hash,
    handshake_id,
    mailio_address,
    parse_public_key_b64,
    verify_ed25519,
)
from bridge.mailio.mtp import MtpError, decode_cbor

STATUSES = ("accepted", "revoked", "notfound", "request")
LEVELS = ("none", "recaptchaV3", "poh", "personal")
TYPES = ("personal", "signup", "server", "user")
SIGNATURE_SCHEME = "EdDSA_X25519"

# A real handshake is ~400 bytes; anything far bigger is junk we refuse before decoding.
MAX_CBOR_BYTES = 8192
# content -> senderMetadata/originServer/signupRules is depth 2; leave room, refuse deep junk.
MAX_DEPTH = 8
SIGNATURE_LENGTH = 64
# How far ahead of our clock a handshake's ``created`` may be: the owner's machine and ours may disagree by
# a little (no NTP, a laptop waking up); more than this is a client bug or an attempt to outrank every
# later handshake for good.
MAX_FUTURE_MS = 5 * 60 * 1000

_SENDER_ADDRESS_RE = re.compile(r"(did:web:[^\s#]+#)?0x[0-9a-f]{40}")


class HandshakeError(ValueError):
    """A handshake document is unusable; ``status`` is the HTTP status to answer with (400 or 403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[type[HandshakeError], tuple[int, str]]:
        # Keep the status through pickling (RQ moves exceptions between processes).
        return (type(self), (self.status, str(self)))


def _bad(message: str) -> HandshakeError:
    return HandshakeError(400, message)


def _forbidden(message: str) -> HandshakeError:
    return HandshakeError(403, message)


@dataclass(frozen=True)
class Handshake:
    """A verified handshake: decoded fields plus the exact signed bytes, to store and re-verify later."""

    handshake_id: str
    status: str
    level: str
    owner_public_key: bytes
    owner_address: str
    sender_email_hash: str | None
    sender_address: str | None
    type: str
    created: float
    origin_domain: str | None
    signature_scheme: str
    cbor_payload: bytes
    signature: bytes

    def sender_key(self) -> str:
        """What the handshake id hashes with the owner: the e-mail hash (SMTP) or the did:web (Mailio)."""
        if self.sender_email_hash is not None:
            return self.sender_email_hash
        if self.sender_address is not None:
            return self.sender_address
        raise HandshakeError(400, "handshake has no sender")

    def to_document(self) -> dict[str, Any]:
        """The wire shape, with ``content`` decoded from the signed bytes (never from a received twin)."""
        return {
            "content": decode_content(self.cbor_payload),
            "signatureBase64": base64.b64encode(self.signature).decode("ascii"),
            "cborPayloadBase64": base64.b64encode(self.cbor_payload).decode("ascii"),
        }


def _b64decode(value: Any, *, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise _bad(f"{name} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{name} is not valid base64") from None


def decode_content(raw: bytes) -> dict[str, Any]:
    """Decode exactly one CBOR map from ``raw``: no trailing bytes, no duplicate keys, bounded depth,
    nothing JSON cannot carry. Raises ``HandshakeError(400)``. Never re-encode what this returns for
    verification: the signature covers the received bytes, which need not be canonical. The same strict
    decoding as MTP payloads (``bridge.mailio.mtp.decode_cbor``), with a handshake's shallower depth."""
    try:
        return decode_cbor(raw, max_depth=MAX_DEPTH)
    except MtpError as exc:
        raise _bad(str(exc)) from None


def _text(content: dict[str, Any], name: str) -> str:
    value = content.get(name)
    if not isinstance(value, str) or not value:
        raise _bad(f"content.{name} is missing or not a string")
    return value


def _choice(content: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = _text(content, name)
    if value not in allowed:
        raise _bad(f"content.{name} is not one of {', '.join(allowed)}")
    return value


def _origin_domain(content: dict[str, Any]) -> str | None:
    origin = content.get("originServer")
    if origin is None:
        return None
    if not isinstance(origin, dict) or not isinstance(origin.get("domain"), str) or not origin["domain"]:
        raise _bad("content.originServer.domain is missing or not a string")
    if not isinstance(origin.get("ip", ""), str):
        raise _bad("content.originServer.ip is not a string")
    return origin["domain"]


def _check_optional_members(content: dict[str, Any]) -> None:
    sub_type = content.get("signupSubType")
    if sub_type is not None and (isinstance(sub_type, bool) or not isinstance(sub_type, str | int)):
        raise _bad("content.signupSubType is not a string or integer")
    rules = content.get("signupRules")
    if rules is not None:
        minutes = rules.get("frequencyMinutes", 0) if isinstance(rules, dict) else None
        if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 0:
            raise _bad("content.signupRules.frequencyMinutes is not a non-negative integer")
    if not isinstance(content.get("signatureBase64", ""), str):
        raise _bad("content.signatureBase64 is not a string")


def _valid_email_hash(value: str) -> bool:
    try:
        parse_public_key_b64(value, name="emailHash")  # same shape: canonical std base64 of 32 bytes
    except ValueError:
        return False
    return True


def _sender(content: dict[str, Any]) -> tuple[str | None, str | None]:
    """(email hash, address): exactly one set. Empty strings count as absent, as Go's omitempty writes."""
    metadata = content.get("senderMetadata")
    if not isinstance(metadata, dict):
        raise _bad("content.senderMetadata is missing or not an object")
    email_hash = None if metadata.get("emailHash", "") == "" else metadata["emailHash"]
    address = None if metadata.get("address", "") == "" else metadata["address"]
    if (email_hash is None) == (address is None):
        raise _bad("content.senderMetadata needs exactly one of emailHash or address")
    if email_hash is not None and (not isinstance(email_hash, str) or not _valid_email_hash(email_hash)):
        raise _bad("content.senderMetadata.emailHash is not a base64 32-byte hash")
    if address is not None and (not isinstance(address, str) or not _SENDER_ADDRESS_RE.fullmatch(address)):
        raise _bad("content.senderMetadata.address is not a did:web:<host>#0x… or 0x… address")
    return email_hash, address


def _created(content: dict[str, Any]) -> float:
    value = content.get("created")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad("content.created is missing or not a number")
    try:
        created = float(value)
    except OverflowError:
        raise _bad("content.created is not a finite number") from None
    if not math.isfinite(created):
        raise _bad("content.created is not a finite number")
    return created


def now_ms() -> float:
    return time.time() * 1000


def from_the_future(handshake: Handshake, now: float | None = None) -> bool:
    """True if ``created`` is more than MAX_FUTURE_MS after ``now`` (ms since the epoch; default: now)."""
    return handshake.created > (now_ms() if now is None else now) + MAX_FUTURE_MS


def parse_signed_handshake(
    document: Any, *, owner_public_key: bytes | None = None, now: float | None = None, stored: bool = False
) -> Handshake:
    """Verify and parse ``{content, signatureBase64, cborPayloadBase64}`` as Mailio clients produce them.

    The Ed25519 signature is checked over the exact received CBOR bytes; only the decoded CBOR is used and
    the JSON ``content`` twin is ignored (see the module docstring for why). With ``owner_public_key`` (the
    mailbox owner's registered key) the bytes are verified against it before they are even decoded, and the
    signed ``ownerPublicKey`` must be that key. ``created`` more than MAX_FUTURE_MS after ``now`` (ms since
    the epoch, default the current time) is refused, unless ``stored``: re-reading a document accepted
    earlier (or before this check existed) must still work, so that a newer one can replace it. Raises only
    ``HandshakeError`` (400 malformed or dated in the future, 403 not authentic or not the owner's).
    """
    if not isinstance(document, dict):
        raise _bad("handshake is not a JSON object")
    cbor_b64 = document.get("cborPayloadBase64")
    if isinstance(cbor_b64, str) and len(cbor_b64) > 4 * ((MAX_CBOR_BYTES + 2) // 3):
        raise _bad("cborPayloadBase64 is too large")
    payload = _b64decode(cbor_b64, name="cborPayloadBase64")
    signature = _b64decode(document.get("signatureBase64"), name="signatureBase64")
    if len(signature) != SIGNATURE_LENGTH:
        raise _bad("signatureBase64 is not a 64-byte Ed25519 signature")

    if owner_public_key is not None:
        if not isinstance(owner_public_key, bytes) or len(owner_public_key) != 32:
            raise _bad("owner_public_key is not a 32-byte Ed25519 key")
        if not verify_ed25519(owner_public_key, signature, payload):
            raise _forbidden("handshake signature does not verify with the owner's key")

    content = decode_content(payload)
    try:
        signed_key = parse_public_key_b64(_text(content, "ownerPublicKey"), name="content.ownerPublicKey")
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if owner_public_key is not None:
        if signed_key != owner_public_key:
            raise _forbidden("handshake ownerPublicKey is not the mailbox owner's key")
    elif not verify_ed25519(signed_key, signature, payload):
        raise _forbidden("handshake signature does not verify with its ownerPublicKey")

    # Authentic from here on; now check that what the owner signed is well formed and consistent.
    scheme = _text(content, "signatureScheme")
    if scheme != SIGNATURE_SCHEME:
        raise _bad(f"content.signatureScheme is not {SIGNATURE_SCHEME}")
    status = _choice(content, "status", STATUSES)
    level = _choice(content, "level", LEVELS)
    kind = _choice(content, "type", TYPES)
    created = _created(content)
    if not stored and created > (now_ms() if now is None else now) + MAX_FUTURE_MS:
        raise _bad(f"content.created is more than {MAX_FUTURE_MS // 60_000} minutes in the future")
    claimed_id = _text(content, "handshakeId")
    owner_address = _text(content, "ownerAddress")
    origin_domain = _origin_domain(content)
    _check_optional_members(content)
    email_hash, sender_address = _sender(content)
    if owner_address != mailio_address(signed_key):
        raise _forbidden("handshake ownerAddress does not derive from ownerPublicKey")

    handshake = Handshake(
        handshake_id=claimed_id,
        status=status,
        level=level,
        owner_public_key=signed_key,
        owner_address=owner_address,
        sender_email_hash=email_hash,
        sender_address=sender_address,
        type=kind,
        created=created,
        origin_domain=origin_domain,
        signature_scheme=scheme,
        cbor_payload=payload,
        signature=signature,
    )
    if claimed_id != handshake_id(owner_address, handshake.sender_key()):
        raise _forbidden("handshakeId does not derive from ownerAddress and the sender")
    return handshake


def build_content(
    *,
    owner_public_key: bytes,
    status: str,
    origin_domain: str,
    created_ms: float,
    sender_email_hash: str | None = None,
    sender_did: str | None = None,
    level: str = "none",
    type: str = "personal",  # the wire name
) -> dict[str, Any]:
    """The ``content`` object in the reference client's member order (what gets CBOR-encoded and signed)."""
    if status not in STATUSES or level not in LEVELS or type not in TYPES:
        raise _bad("status, level or type is not one of the allowed values")
    if not isinstance(origin_domain, str) or not origin_domain:
        raise _bad("origin_domain must be a non-empty string")
    if isinstance(created_ms, bool) or not isinstance(created_ms, int | float):
        raise _bad("created_ms must be a finite number")
    if not math.isfinite(created_ms):
        raise _bad("created_ms must be a finite number")
    if (sender_email_hash is None) == (sender_did is None):
        raise _bad("give exactly one sender: an e-mail, an e-mail hash or a did:web")
    if sender_email_hash is not None and not _valid_email_hash(sender_email_hash):
        raise _bad("sender_email_hash is not a base64 32-byte hash")
    if sender_did is not None and not _SENDER_ADDRESS_RE.fullmatch(sender_did):
        raise _bad("sender_did is not a did:web:<host>#0x… or 0x… address")
    owner_address = mailio_address(owner_public_key)
    sender_key = sender_email_hash if sender_email_hash is not None else sender_did
    assert sender_key is not None
    return {
        "handshakeId": handshake_id(owner_address, sender_key),
        "originServer": {"domain": origin_domain},
        "type": type,
        "status": status,
        "level": level,
        "ownerPublicKey": base64.b64encode(owner_public_key).decode("ascii"),
        "ownerAddress": owner_address,
        "created": float(created_ms),
        "senderMetadata": {"emailHash": sender_email_hash}
        if sender_email_hash is not None
        else {"address": sender_did},
        "signatureScheme": SIGNATURE_SCHEME,
    }


def sign_handshake(
    *,
    ed25519_private: bytes,
    status: str,
    sender_email: str | None = None,
    sender_email_hash: str | None = None,
    sender_did: str | None = None,
    origin_domain: str,
    created_ms: float | None = None,
    level: str = "none",
    type: str = "personal",  # the wire name
) -> dict[str, Any]:
    """Owner side: build ``content``, CBOR-encode it (cbor2), sign the bytes (Ed25519), return the document.

    Give exactly one of ``sender_email`` (hashed here, ~120 ms), ``sender_email_hash`` or ``sender_did``.
    """
    if sum(value is not None for value in (sender_email, sender_email_hash, sender_did)) != 1:
        raise _bad("give exactly one sender: an e-mail, an e-mail hash or a did:web")
    try:
        private = Ed25519PrivateKey.from_private_bytes(ed25519_private)
    except (TypeError, ValueError):
        raise _bad("ed25519_private is not a 32-byte Ed25519 private key") from None
    if sender_email is not None:
        try:
            sender_email_hash = email_lookup_hash(sender_email)
        except ValueError as exc:
            raise _bad(str(exc)) from None
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    content = build_content(
        owner_public_key=public,
        status=status,
        origin_domain=origin_domain,
        created_ms=now_ms() if created_ms is None else created_ms,
        sender_email_hash=sender_email_hash,
        sender_did=sender_did,
        level=level,
        type=type,
    )
    payload = cbor2.dumps(content)
    return {
        "content": content,
        "signatureBase64": base64.b64encode(private.sign(payload)).decode("ascii"),
        "cborPayloadBase64": base64.b64encode(payload).decode("ascii"),
    }


def newer(a: Handshake, b: Handshake | None) -> bool:
    """True if ``a`` should replace the stored ``b``: strictly later ``created`` wins; a tie keeps ``b``."""
    return b is None or a.created > b.created
