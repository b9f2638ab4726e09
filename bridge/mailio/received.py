"""What a peer's verified ``didCommRequest`` says, checked field by field before anything acts on it.

Input is the payload :func:`bridge.mailio.mtp.verify` decoded from the signed CBOR (never the JSON twin).
Stricter than the reference (mailio.md section 7): a message needs an ``id`` (receipts, replay cache and
storage key on it), an intent we act on, a ``from`` of the form ``did:web:<host>#0x...`` (a delivery
message may use the reference's ``did:web:<host>:0x...``), and a timestamp inside the window.

Intents (mtp-wire section 3 lists what the reference accepts: absent, ``message``, ``handshake``,
``delivery``, ``handshake_request``), chosen so that no mail is lost and nothing is granted:

* absent (or empty) is a ``message``. The reference answers 202 and then drops it in its worker, so the
  sender believes it delivered; we file it, screened like any message, and report it;
* ``handshake`` is the reference's older name for a handshake request (its worker filed it in the
  handshake folder). With an offer nonce in ``plainBodyBase64`` it is a ``handshake_request`` (the
  offer decides, as for one); without one it is filed as a ``message``, screened by the owner's
  handshakes: it never reaches the handshake folder without a live offer;
* anything else (the reference's own ``handsake_response`` included) is refused with 400.

Status of the errors (``MtpError``): 400 for shape, 403 for a stale timestamp or a ``from`` that is not
the signing domain's. Protocol code: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from bridge.mailio.discovery import InvalidDomain, normalize_domain
from bridge.mailio.mtp import (
    INTENT_DELIVERY,
    INTENT_HANDSHAKE,
    INTENT_HANDSHAKE_REQUEST,
    INTENT_MESSAGE,
    MESSAGE_TYPES,
    SIGNATURE_SCHEME,
    MtpError,
)
from bridge.mailio.status import StatusCode, parse_status_codes

#: Intents this server acts on (absent and ``handshake`` become one of them: ``_intent``); others get 400.
ACCEPTED_INTENTS = (INTENT_MESSAGE, INTENT_HANDSHAKE_REQUEST, INTENT_DELIVERY)
MAX_ID_CHARS = 200
MAX_DID_CHARS = 400
MAX_RECIPIENTS = 1000

_DID_WEB = re.compile(r"did:web:(?P<host>[^#:/\s]{1,253})(?P<sep>[#:])(?P<address>0x[0-9a-f]{40})")
_NONCE = re.compile(r"[A-Za-z]{16}")


def _bad(message: str) -> MtpError:
    return MtpError(400, message)


@dataclass(frozen=True)
class SenderDid:
    host: str  # A-labels, lower case
    address: str
    reference_form: bool  # did:web:<host>:<address> (the reference's delivery messages)

    @property
    def did(self) -> str:
        """The Mailio sender key: the full ``did:web:<host>#<address>`` (handshake ids hash it)."""
        return f"did:web:{self.host}#{self.address}"


def parse_did_web(value: Any, *, allow_reference_form: bool = False) -> SenderDid:
    """``did:web:<host>#0x...`` (or, when allowed, ``did:web:<host>:0x...``). Raises ``ValueError``."""
    if not isinstance(value, str) or len(value) > MAX_DID_CHARS:
        raise ValueError("not a did:web identity")
    match = _DID_WEB.fullmatch(value)
    if match is None or (match["sep"] == ":" and not allow_reference_form):
        raise ValueError("not a did:web:<host>#0x... identity")
    try:
        host = normalize_domain(match["host"])
    except InvalidDomain:
        raise ValueError("did:web host is not a domain") from None
    return SenderDid(host, match["address"], match["sep"] == ":")


@dataclass(frozen=True)
class ReceivedMessage:
    """A checked ``didCommMessage`` and its request's timestamp."""

    id: str
    type: str
    sender: SenderDid
    intent: str
    timestamp: int
    to: tuple[str, ...]
    body: dict[str, Any] | None
    plain_body_base64: str
    codes: tuple[StatusCode, ...] = ()  # delivery messages only

    def local_recipients(self, host: str) -> list[str]:
        """The Mailio addresses of the JWE recipients whose ``kid`` is ``did:web:<host>#0x...``, once each,
        skipping the sender itself (the reference does too)."""
        found: list[str] = []
        for recipient in (self.body or {}).get("recipients", ()):
            kid = recipient["header"]["kid"]
            try:
                did = parse_did_web(kid)
            except ValueError:
                continue
            if did.host == host and did.did != self.sender.did and did.address not in found:
                found.append(did.address)
        return found


def _text(data: dict[str, Any], name: str, *, required: bool, limit: int = 1 << 30) -> str:
    value = data.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise _bad(f"didCommMessage.{name} is not text")
    if required and not value:
        raise _bad(f"didCommMessage.{name} is missing")
    return value


def _check_jwe(body: Any) -> dict[str, Any]:
    """A General JSON JWE as the reference reads it: the parts as text, recipients with a text ``kid``."""
    if not isinstance(body, dict):
        raise _bad("didCommMessage.body is missing or not a JWE object")
    for name in ("ciphertext", "iv", "tag", "protected"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise _bad(f"didCommMessage.body.{name} is missing")
    if not isinstance(body.get("aad", ""), str):
        raise _bad("didCommMessage.body.aad is not text")
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not 0 < len(recipients) <= MAX_RECIPIENTS:
        raise _bad("didCommMessage.body.recipients is missing or too long")
    for recipient in recipients:
        header = recipient.get("header") if isinstance(recipient, dict) else None
        if not isinstance(header, dict) or not isinstance(header.get("kid"), str) or not header["kid"]:
            raise _bad("didCommMessage.body.recipients has an entry without header.kid")
        if not isinstance(recipient.get("encrypted_key", ""), str):
            raise _bad("didCommMessage.body.recipients has an encrypted_key that is not text")
    return body


def parse_message_request(payload: dict[str, Any]) -> ReceivedMessage:
    """The decoded ``didCommRequest``, checked; raises ``MtpError(400)`` naming the first problem."""
    if payload.get("signatureScheme") != SIGNATURE_SCHEME:
        raise _bad(f"signatureScheme is not {SIGNATURE_SCHEME}")
    timestamp = payload.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp <= 0:
        raise _bad("timestamp is not a positive whole number of milliseconds")
    message = payload.get("didCommMessage")
    if not isinstance(message, dict):
        raise _bad("didCommMessage is missing")
    kind = _text(message, "type", required=True)
    if kind not in MESSAGE_TYPES:
        raise _bad("didCommMessage.type is not a Mailio message type")
    msg_id = _text(message, "id", required=True, limit=MAX_ID_CHARS)
    if not msg_id.isprintable() or not msg_id.isascii():
        raise _bad("didCommMessage.id is not printable ASCII")
    plain = _text(message, "plainBodyBase64", required=False)
    intent = _intent(_text(message, "intent", required=False), plain)
    try:
        sender = parse_did_web(message.get("from"), allow_reference_form=intent == INTENT_DELIVERY)
    except ValueError as exc:
        raise _bad(f"didCommMessage.from: {exc}") from None
    to = message.get("to") or []
    if not isinstance(to, list) or not all(isinstance(t, str) for t in to) or len(to) > MAX_RECIPIENTS:
        raise _bad("didCommMessage.to is not a list of text")
    body = None
    codes: tuple[StatusCode, ...] = ()
    if intent == INTENT_DELIVERY:
        if not to:
            raise _bad("didCommMessage.to is missing (a delivery message names the original sender)")
        try:
            codes = tuple(parse_status_codes(plain))
        except ValueError as exc:
            raise _bad(str(exc)) from None
    else:
        body = _check_jwe(message.get("body"))
        if intent == INTENT_HANDSHAKE_REQUEST and nonce_of(plain) is None:
            raise _bad('plainBodyBase64 is not base64 of {"nonce": "<16 letters>"}')
    return ReceivedMessage(msg_id, kind, sender, intent, timestamp, tuple(to), body, plain, codes)


def _intent(given: str, plain_body_base64: str) -> str:
    """The intent we act on for the one a request names (see the module's docstring); 400 if none."""
    if not given:
        return INTENT_MESSAGE
    if given == INTENT_HANDSHAKE:
        return INTENT_HANDSHAKE_REQUEST if nonce_of(plain_body_base64) is not None else INTENT_MESSAGE
    if given not in ACCEPTED_INTENTS:
        raise _bad(f"intent {given[:40]!r} is not supported (message, handshake, handshake_request, delivery)")
    return given


def nonce_of(plain_body_base64: str) -> str | None:
    """The offer nonce a ``handshake_request`` carries, or None."""
    try:
        document = json.loads(base64.b64decode(plain_body_base64, validate=True))
    except (binascii.Error, ValueError, RecursionError):
        return None
    nonce = document.get("nonce") if isinstance(document, dict) else None
    return nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None


def check_fresh(timestamp_ms: int, now_ms: int, window_seconds: int) -> None:
    """Refuse (403) a request signed further from our clock than the window, in either direction."""
    if abs(now_ms - timestamp_ms) > window_seconds * 1000:
        raise MtpError(403, f"timestamp is more than {window_seconds} s from our clock")


def check_sender(message: ReceivedMessage, sender_domain: str) -> None:
    """The ``from`` DID's host must be the domain whose key signed the request (403 otherwise)."""
    if message.sender.host != sender_domain:
        raise MtpError(403, "didCommMessage.from is not on senderDomain")
