"""Turn a verified Postal HTTP-endpoint body into one InboundMessage  (postal.md §1).

Postal sends four shapes: RawMessage or Hash, each as JSON (``application/json``) or FormData
(``application/x-www-form-urlencoded``). All of them become one :class:`InboundMessage` holding the full
RFC 5322 message. RawMessage carries the stored message itself (with Postal's ``X-Postal-Spam*`` and
``Received:`` headers prepended). Hash is lossy: we rebuild a MIME message from its fields and mark it with
``X-Mailio-Rebuilt: postal-hash`` so that no reader mistakes it for the original.

This module dispatches; the parts live beside it: ``encoding`` (errors, strict base64), ``fields`` (typed
JSON/FormData field access) and ``rebuild`` (Hash -> MIME).

Exceptions, and what the web layer answers (Postal bounces the sender on any 4xx but 429):

    PayloadError     -> 400  signed but malformed (bad JSON/form, wrong types, missing fields, bad base64)
    MessageTooLarge  -> 413  what Postal sent is over BRIDGE_MAX_MESSAGE_BYTES (RawMessage: the decoded
                             message; Hash: decoded attachments plus bodies, never the bigger rebuilt
                             MIME), or a Hash has more than MAX_ATTACHMENTS attachments (1,000). Too
                             many parts is "too large" too: the sender's mail cannot be taken as it is,
                             a retry would not help (so not 5xx), and it is not malformed (so not 400).

Messages can be 25 MB, so parsing keeps few copies alive: base64 is validated in place with a regex and
decoded once, form values are unescaped with targeted replaces (never split into millions of pieces), and
the parsed body is dropped as soon as the message bytes exist. Peak extra memory is about twice the body.

This module must never verify signatures (signatures.py does, before parsing), never raise anything but
PayloadError (or MemoryError) whatever the input, and never put payload content (mail is private) into
exception messages or logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass

from bridge.postal.encoding import MessageTooLarge, PayloadError, decode_base64
from bridge.postal.fields import MAX_ATTACHMENTS, Fields, FormFields, JsonFields, bad_field, parse_form
from bridge.postal.rebuild import MAX_HEADER_CHARS, REBUILT_HEADER, REBUILT_VALUE, rebuild

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_HEADER_CHARS",
    "REBUILT_HEADER",
    "REBUILT_VALUE",
    "InboundMessage",
    "MessageTooLarge",
    "PayloadError",
    "decode_base64",
    "parse_inbound",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One message Postal delivered to one envelope recipient, whatever shape it came in."""

    postal_id: int
    token: str | None  # Hash format only
    rcpt_to: str
    mail_from: str  # "" for a null sender (bounces)
    message: bytes  # the full RFC 5322 message (RawMessage) or the one rebuilt from a Hash
    format: str  # "raw" or "hash"
    rebuilt: bool  # True for Hash: lossy, rebuilt by us
    spam_status: str | None  # Hash's spam_status as sent ("Spam"/"NotSpam"/"NotChecked"); None for RawMessage
    #                          (there the X-Postal-Spam header Postal prepended says it)

    def delivery_key(self, postal_kid: str) -> str:
        """A stable idempotency key for this delivery.

        Postal re-sends the same delivery after a timeout, a 5xx or an admin's "Retry"; ids are unique only
        within one Postal mail server while one install (one signing key) serves many, so the KID is part of
        the key. Hash: (kid, id, token). RawMessage has no token: (kid, id, rcpt_to, SHA-256 of the bytes).
        Hashed, so that the key can sit in Redis and logs without carrying addresses or tokens.
        """
        parts: list[object]
        if self.format == "hash":
            parts = ["hash", postal_kid, self.postal_id, self.token]
        else:
            parts = [
                "raw",
                postal_kid,
                self.postal_id,
                self.rcpt_to,
                hashlib.sha256(self.message).hexdigest(),
            ]
        digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode("utf-8")).hexdigest()
        return f"postal-{self.format}:{digest}"


# --------------------------------------------------------------------------- entry point


def parse_inbound(body: bytes | bytearray, content_type: str, max_message_bytes: int) -> InboundMessage:
    """Parse one verified Postal endpoint body (any of the four shapes) into an InboundMessage.

    A ``bytearray`` body is consumed (emptied) as soon as it has been decoded, to keep the peak
    memory of a large delivery low; pass ``bytes`` to keep it.

    Raises PayloadError (400) or MessageTooLarge (413) and nothing else, whatever the input (a stdlib
    parser crash on hostile input becomes a PayloadError too), except MemoryError, which is not the
    sender's fault and must not bounce them.
    """
    try:
        return _parse(body, content_type, max_message_bytes)
    except (PayloadError, MemoryError):
        raise
    except Exception as exc:  # a bug or a stdlib crash on odd input: still the payload's fault, say 400
        log.warning("unexpected %s while parsing a Postal payload", type(exc).__name__)
        raise PayloadError("malformed payload") from None


def _consume(body: bytes | bytearray) -> None:
    """Free a bytearray body as soon as its text exists: a 34 MB request must not be held three times.

    ``parse_inbound`` takes ownership of a bytearray it is given (the web view passes the one it
    read the request into, after verifying the signature over it).
    """
    if isinstance(body, bytearray):
        body.clear()


def _parse(body: bytes | bytearray, content_type: str, max_message_bytes: int) -> InboundMessage:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    fields: Fields
    if media_type == "application/json":
        try:
            text = body.decode("utf-8")
            _consume(body)
            data = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise PayloadError("malformed JSON") from None
        del text
        if not isinstance(data, dict):
            raise PayloadError("malformed JSON: not an object")
        fields = JsonFields(data)
        del data
    elif media_type == "application/x-www-form-urlencoded":
        form = parse_form(body)
        _consume(body)
        fields = FormFields(form)
    else:
        raise PayloadError("unsupported content type")

    is_hash, is_raw = fields.has("token"), fields.has("message")
    if is_hash == is_raw:
        raise PayloadError("unknown payload format")
    if is_raw:
        return _parse_raw(fields, max_message_bytes)
    return _parse_hash(fields, max_message_bytes)


_ENVELOPE_JUNK = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _envelope_text(fields: Fields, name: str, *, nullable: bool = False) -> str:
    """An SMTP envelope value or a token, checked strictly: they end up in storage keys and headers.

    Postal never sends control characters or lone surrogates there; anything that does is malformed.
    """
    value = fields.text(name, nullable=nullable) or ""
    if _ENVELOPE_JUNK.search(value) or (not value and not nullable):
        raise bad_field(name)
    return value


def _envelope(fields: Fields) -> tuple[int, str, str]:
    postal_id = fields.integer("id")
    rcpt_to = _envelope_text(fields, "rcpt_to")
    mail_from = _envelope_text(fields, "mail_from", nullable=True)  # "" (or null) for a null sender
    return postal_id, rcpt_to, mail_from


def _parse_raw(fields: Fields, max_message_bytes: int) -> InboundMessage:
    postal_id, rcpt_to, mail_from = _envelope(fields)
    if fields.flag("base64") is False:
        raise PayloadError("unsupported: message not base64")
    encoded = fields.take_base64("message")
    message = decode_base64(encoded, field="message", limit=max_message_bytes)
    del encoded  # the only reference to the big base64 text: free it before anything else is allocated
    if not message:
        raise bad_field("message")
    return InboundMessage(
        postal_id=postal_id,
        token=None,
        rcpt_to=rcpt_to,
        mail_from=mail_from,
        message=message,
        format="raw",
        rebuilt=False,
        spam_status=None,
    )


def _parse_hash(fields: Fields, max_message_bytes: int) -> InboundMessage:
    postal_id, rcpt_to, mail_from = _envelope(fields)
    token = _envelope_text(fields, "token")
    spam_status = fields.text("spam_status", required=False)
    message = rebuild(fields, spam_status, max_message_bytes, boundary_seed=f"{postal_id}:{token}")
    return InboundMessage(
        postal_id=postal_id,
        token=token,
        rcpt_to=rcpt_to,
        mail_from=mail_from,
        message=message,
        format="hash",
        rebuilt=True,
        spam_status=spam_status,
    )
