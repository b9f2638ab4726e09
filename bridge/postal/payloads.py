"""Turn a verified Postal HTTP-endpoint body into one InboundMessage  (postal.md §1).

Postal sends four shapes: RawMessage or Hash, each as JSON (``application/json``) or FormData
(``application/x-www-form-urlencoded``). All of them become one :class:`InboundMessage` holding the full
RFC 5322 message. RawMessage carries the stored message itself (with Postal's ``X-Postal-Spam*`` and
``Received:`` headers prepended). Hash is lossy: we rebuild a MIME message from its fields and mark it with
``X-Mailio-Rebuilt: postal-hash`` so that no reader mistakes it for the original.

Exceptions, and what the web layer answers (Postal bounces the sender on any 4xx but 429):

    PayloadError     -> 400  signed but malformed (bad JSON/form, wrong types, missing fields, bad base64)
    MessageTooLarge  -> 413  the decoded message is over the configured limit

Messages can be 25 MB, so parsing keeps few copies alive: base64 is validated in place with a regex and
decoded once, form values are unescaped with targeted replaces (never split into millions of pieces), and
the parsed body is dropped as soon as the message bytes exist. Peak extra memory is about twice the body.

This module must never verify signatures (signatures.py does, before parsing), never raise anything but
PayloadError (or MemoryError) whatever the input, and never put payload content (mail is private) into
exception messages or logs.
"""

from __future__ import annotations

import binascii
import email.charset
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import formataddr, formatdate, getaddresses
from typing import Any, Final
from urllib.parse import unquote_to_bytes

__all__ = [
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

REBUILT_HEADER: Final = "X-Mailio-Rebuilt"
REBUILT_VALUE: Final = "postal-hash"


class PayloadError(ValueError):
    """Signed by Postal but malformed: answer 400. The message is short and never quotes the payload."""


class MessageTooLarge(PayloadError):
    """The decoded message is over the configured limit: answer 413."""


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


# --------------------------------------------------------------------------- base64


_B64_TAIL_STR = re.compile(r"={1,2}[\r\n]*")
_B64_TAIL_BYTES = re.compile(rb"={1,2}[\r\n]*")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"


def decode_base64(text: str | bytes, *, field: str, limit: int | None = None) -> bytes:
    """Decode base64 as Ruby's Base64.encode64 writes it (newlines every 60 characters), strictly.

    Newlines (LF or CRLF) may appear anywhere or not at all; any other non-alphabet character, misplaced
    padding or a truncated quantum is a PayloadError. The decoded length is computed and checked against
    ``limit`` before anything is allocated. No copy of a valid ``text`` is made before decoding.
    """
    if isinstance(text, str):
        valid = True  # checked after decoding, by length: cheaper than scanning a 34 MB string
        pad_at = text.find("=")
        tail_ok = pad_at == -1 or _B64_TAIL_STR.fullmatch(text, pad_at) is not None
        pad_count = 0 if pad_at == -1 else text.count("=", pad_at)
        chars = len(text) - text.count("\n") - text.count("\r")
    else:
        valid = not text.translate(None, _B64_ALPHABET)  # what is left is not base64
        pad_at = text.find(b"=")
        tail_ok = pad_at == -1 or _B64_TAIL_BYTES.fullmatch(text, pad_at) is not None
        pad_count = 0 if pad_at == -1 else text.count(b"=", pad_at)
        chars = len(text) - text.count(b"\n") - text.count(b"\r")
    if not (valid and tail_ok) or chars % 4:
        raise PayloadError(f"invalid base64: {field}")
    if limit is not None and chars // 4 * 3 - pad_count > limit:
        raise MessageTooLarge(f"{field} over the size limit")
    try:
        decoded = binascii.a2b_base64(text)
    except (binascii.Error, ValueError):
        raise PayloadError(f"invalid base64: {field}") from None
    # a2b_base64 skips characters outside the alphabet: any such character makes the output shorter
    # than the characters counted above promise, so this check is the strictness, without a scan.
    if len(decoded) != chars // 4 * 3 - pad_count:
        raise PayloadError(f"invalid base64: {field}")
    return decoded


# --------------------------------------------------------------------------- field access


_MISSING: Final = object()


def _missing(name: str) -> PayloadError:
    return PayloadError(f"missing field: {name}")


def _bad(name: str) -> PayloadError:
    return PayloadError(f"bad field: {name}")


class _JsonFields:
    """Typed access to a JSON payload's fields (Postal's own types: ints, bools, floats, strings, arrays)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def has(self, name: str) -> bool:
        return name in self._data

    def _raw(self, name: str, required: bool) -> Any:
        value = self._data.get(name, _MISSING)
        if value is _MISSING and required:
            raise _missing(name)
        return None if value is _MISSING else value

    def text(self, name: str, *, required: bool = True, nullable: bool = False) -> str | None:
        value = self._raw(name, required)
        if value is None:
            if required and not nullable:
                raise _bad(name)
            return None
        if not isinstance(value, str):
            raise _bad(name)
        return value

    def integer(self, name: str) -> int:
        value = self._raw(name, True)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name)
        return value

    def flag(self, name: str) -> bool | None:
        value = self._raw(name, False)
        if value is not None and not isinstance(value, bool):
            raise _bad(name)
        return value

    def number(self, name: str) -> float | None:
        value = self._raw(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(name)
        return float(value)

    def text_list(self, name: str) -> list[str] | None:
        value = self._raw(name, False)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(name)
        return value

    def take_base64(self, name: str) -> str:
        """Remove and return a base64 field, so that the caller holds the only reference to it."""
        value = self._data.pop(name, _MISSING)
        if value is _MISSING:
            raise _missing(name)
        if not isinstance(value, str):
            raise _bad(name)
        return value

    def take_attachments(self) -> list[tuple[str | None, str | None, str]]:
        value = self._data.pop("attachments", None)
        if value is None:
            return []
        if not isinstance(value, list):
            raise _bad("attachments")
        out = []
        for item in value:
            if not isinstance(item, dict):
                raise _bad("attachments")
            filename, content_type, data = item.get("filename"), item.get("content_type"), item.get("data")
            if not isinstance(filename, str | None) or not isinstance(content_type, str | None):
                raise _bad("attachments")
            if not isinstance(data, str):
                raise _bad("attachments")
            out.append((filename, content_type, data))
        return out


_ATTACHMENT_KEY = re.compile(r"attachments\[(\d{1,6})\]\[([a-z_]+)\]")
_INT = re.compile(r"-?[0-9]{1,19}")
_FLOAT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?", re.I)
# Ruby's encode_www_form_component writes upper-case hex; other encoders may not.
_COMMON_ESCAPES: Final = (
    (b"%0A", b"\n"),
    (b"%0a", b"\n"),
    (b"%0D", b"\r"),
    (b"%0d", b"\r"),
    (b"%2B", b"+"),
    (b"%2b", b"+"),
    (b"%2F", b"/"),
    (b"%2f", b"/"),
    (b"%3D", b"="),
    (b"%3d", b"="),
)


def _form_unquote(value: bytes) -> bytes:
    """application/x-www-form-urlencoded unescaping that stays cheap on a 35 MB base64 value.

    urllib's unquote splits on every '%' (millions of small objects for a big attachment). Base64 only needs
    a handful of escapes, done with whole-buffer replaces; anything left goes through urllib. The replaced
    characters are never '%' or hex digits, so the result equals a single-pass unquote.
    """
    if b"+" in value:
        value = value.replace(b"+", b" ")
    if b"%" not in value:
        return value
    for escaped, plain in _COMMON_ESCAPES:
        if escaped in value:
            value = value.replace(escaped, plain)
    if b"%" in value:
        value = unquote_to_bytes(value)
    return value


def _parse_form(body: bytes | bytearray) -> dict[str, list[bytes | None]]:
    """Split a form body into name -> values; ``name`` without ``=`` is Ruby's nil (kept as None)."""
    fields: dict[str, list[bytes | None]] = {}
    view = memoryview(body)
    pos, size = 0, len(body)
    while pos < size:
        end = body.find(b"&", pos)
        if end == -1:
            end = size
        if end > pos:  # Ruby writes "&&" for an empty array: nothing to keep
            eq = body.find(b"=", pos, end)
            name_end = end if eq == -1 else eq
            try:
                name = _form_unquote(bytes(view[pos:name_end])).decode("utf-8")
            except UnicodeDecodeError:
                raise PayloadError("malformed form data") from None
            value = None if eq == -1 else _form_unquote(bytes(view[eq + 1 : end]))
            fields.setdefault(name, []).append(value)
        pos = end + 1
    view.release()
    return fields


class _FormFields:
    """Typed access to a FormData payload, where Postal's values all became strings (nil: bare name)."""

    def __init__(self, data: dict[str, list[bytes | None]]) -> None:
        self._data = data

    def has(self, name: str) -> bool:
        return name in self._data

    def _one(self, name: str, required: bool) -> bytes | None:
        values = self._data.get(name)
        if values is None:
            if required:
                raise _missing(name)
            return None
        if len(values) != 1:
            raise _bad(name)
        return values[0]

    @staticmethod
    def _decode(name: str, value: bytes) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(name) from None

    def text(self, name: str, *, required: bool = True, nullable: bool = False) -> str | None:
        value = self._one(name, required)
        if value is None:
            if required and not nullable:
                raise _bad(name)
            return None
        return self._decode(name, value)

    def integer(self, name: str) -> int:
        value = self._one(name, True)
        if value is None or not _INT.fullmatch(self._decode(name, value)):
            raise _bad(name)
        return int(value)

    def flag(self, name: str) -> bool | None:
        value = self._one(name, False)
        if value is None:
            return None
        if value not in (b"true", b"false"):
            raise _bad(name)
        return value == b"true"

    def number(self, name: str) -> float | None:
        value = self._one(name, False)
        if value is None:
            return None
        text = self._decode(name, value)
        if not _FLOAT.fullmatch(text):
            raise _bad(name)
        return float(text)

    def text_list(self, name: str) -> list[str] | None:
        values = self._data.get(name)
        if values is None or values == [None]:
            return None
        return [self._decode(name, v) for v in values if v is not None]

    def take_base64(self, name: str) -> bytes:
        """Remove and return a base64 field, so that the caller holds the only reference to it."""
        value = self._one(name, True)
        del self._data[name]
        if value is None:
            raise _bad(name)
        return value

    def take_attachments(self) -> list[tuple[str | None, str | None, bytes]]:
        grouped: dict[int, dict[str, bytes | None]] = {}
        for key in [k for k in self._data if k.startswith("attachments")]:
            values = self._data.pop(key)
            match = _ATTACHMENT_KEY.fullmatch(key)
            if match is None or len(values) != 1:
                raise _bad("attachments")
            grouped.setdefault(int(match.group(1)), {})[match.group(2)] = values[0]
        out = []
        for index in sorted(grouped):
            item = grouped[index]
            data = item.get("data")
            if data is None:
                raise _bad("attachments")
            filename, content_type = item.get("filename"), item.get("content_type")
            out.append(
                (
                    None if filename is None else self._decode("attachments", filename),
                    None if content_type is None else self._decode("attachments", content_type),
                    data,
                )
            )
        return out


_Fields = _JsonFields | _FormFields


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
    fields: _Fields
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
        fields = _JsonFields(data)
        del data
    elif media_type == "application/x-www-form-urlencoded":
        form = _parse_form(body)
        _consume(body)
        fields = _FormFields(form)
    else:
        raise PayloadError("unsupported content type")

    is_hash, is_raw = fields.has("token"), fields.has("message")
    if is_hash == is_raw:
        raise PayloadError("unknown payload format")
    if is_raw:
        return _parse_raw(fields, max_message_bytes)
    return _parse_hash(fields, max_message_bytes)


_ENVELOPE_JUNK = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _envelope_text(fields: _Fields, name: str, *, nullable: bool = False) -> str:
    """An SMTP envelope value or a token, checked strictly: they end up in storage keys and headers.

    Postal never sends control characters or lone surrogates there; anything that does is malformed.
    """
    value = fields.text(name, nullable=nullable) or ""
    if _ENVELOPE_JUNK.search(value) or (not value and not nullable):
        raise _bad(name)
    return value


def _envelope(fields: _Fields) -> tuple[int, str, str]:
    postal_id = fields.integer("id")
    rcpt_to = _envelope_text(fields, "rcpt_to")
    mail_from = _envelope_text(fields, "mail_from", nullable=True)  # "" (or null) for a null sender
    return postal_id, rcpt_to, mail_from


def _parse_raw(fields: _Fields, max_message_bytes: int) -> InboundMessage:
    postal_id, rcpt_to, mail_from = _envelope(fields)
    if fields.flag("base64") is False:
        raise PayloadError("unsupported: message not base64")
    encoded = fields.take_base64("message")
    message = decode_base64(encoded, field="message", limit=max_message_bytes)
    del encoded  # the only reference to the big base64 text: free it before anything else is allocated
    if not message:
        raise _bad("message")
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


def _parse_hash(fields: _Fields, max_message_bytes: int) -> InboundMessage:
    postal_id, rcpt_to, mail_from = _envelope(fields)
    token = _envelope_text(fields, "token")
    spam_status = fields.text("spam_status", required=False)
    message = _rebuild(fields, spam_status, max_message_bytes, boundary_seed=f"{postal_id}:{token}")
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


# --------------------------------------------------------------------------- Hash -> MIME


# SMTP line endings; 7bit so that non-ASCII bodies get quoted-printable/base64. Headers are encoded by
# _set_header itself and must never be re-parsed ("none"): the stdlib would mangle what it cannot parse.
_POLICY = email_policy.SMTP.clone(cte_type="7bit", refold_source="none")
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to"})
_HEADER_JUNK = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
_UTF8: Final = email.charset.Charset("utf-8")
MAX_HEADER_CHARS: Final = 16 * 1024


def _clean_text(value: str) -> str:
    """Text that is encodable as UTF-8: JSON may carry lone surrogates, which become U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


def _header_text(value: str) -> str:
    return _HEADER_JUNK.sub(" ", _clean_text(value)).strip()


def _fold_ascii(name: str, value: str, width: int = 78) -> str:
    """Fold an ASCII header value at its own spaces (unfolding gives back exactly ``value``).

    Linear, unlike the stdlib's folder, which takes seconds on a long non-ASCII address list.
    """
    lines: list[str] = []
    current: str | None = None
    limit = width - len(name) - 2
    for word in value.split(" "):
        if current is None:
            current = word
        elif len(current) + 1 + len(word) > limit and current.strip():
            lines.append(current)
            current, limit = word, width - 1
        else:
            current += " " + word
    lines.append(current or "")
    return "\r\n ".join(lines)


def _encoded_words(value: str) -> str:
    """RFC 2047 encoded-words (UTF-8, base64) of at most 45 bytes each, separated by spaces.

    Readers drop the whitespace between adjacent encoded-words, so decoding gives back exactly ``value``.
    """
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for char in value:
        width = len(char.encode("utf-8"))
        if size + width > 45:
            words.append(_UTF8.header_encode("".join(chunk)))
            chunk, size = [], 0
        chunk.append(char)
        size += width
    if chunk:
        words.append(_UTF8.header_encode("".join(chunk)))
    return " ".join(words)


def _encoded_addresses(value: str) -> str | None:
    """A non-ASCII address list as ASCII: display names as encoded-words, domains as IDNA.

    None when the list does not parse into plain addresses (a non-ASCII local part cannot be written
    without SMTPUTF8); the caller then encodes the whole value as text.
    """
    try:
        pairs = getaddresses([value])
        out = []
        for display_name, address in pairs:
            local, at, domain = address.rpartition("@")
            if not at or not local or not domain or not local.isascii():
                return None
            ascii_domain = domain if domain.isascii() else domain.encode("idna").decode("ascii")
            out.append(formataddr((display_name, f"{local}@{ascii_domain}"), charset=_UTF8))
    except Exception:  # getaddresses recurses on nested comments; idna rejects odd labels
        return None
    return ", ".join(out) if out else None


def _set_header(msg: EmailMessage, name: str, value: str | None) -> None:
    """Add one header as 7-bit text; never fails, and stays linear in the size of the value.

    Values are capped at MAX_HEADER_CHARS (Postfix cuts headers at 100 kB; the Hash is lossy anyway).
    ASCII is written verbatim; non-ASCII address lists get encoded display names and IDNA domains; any
    other non-ASCII text (or text that would read as an encoded-word) becomes encoded-words. The stdlib's
    structured header classes are not used: they are slow (seconds on a long list) and have crashed or
    silently dropped values (an odd Date, a Message-ID with a space) on input like this.
    """
    if value is None:
        return
    value = _header_text(value)[:MAX_HEADER_CHARS]
    if not value:
        return
    if not value.isascii() and name.lower() in _ADDRESS_HEADERS:
        value = _encoded_addresses(value) or _encoded_words(value)
    elif not value.isascii() or "=?" in value:
        value = _encoded_words(value)
    msg.set_raw(name, _fold_ascii(name, value))


def _mime_type(content_type: str | None) -> tuple[str, str]:
    """Attachment type from Postal (JSON: bare type; FormData: with parameters); unknown -> octet-stream.

    multipart/* and message/* cannot be rebuilt from opaque bytes with a base64 transfer encoding, so they
    are attached as application/octet-stream (the filename, e.g. ``.eml``, still tells what they are).
    """
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if not _MIME_TYPE.fullmatch(mime):
        return "application", "octet-stream"
    maintype, subtype = mime.split("/", 1)
    if maintype in ("multipart", "message"):
        return "application", "octet-stream"
    return maintype, subtype


def _rebuild(fields: _Fields, spam_status: str | None, max_message_bytes: int, *, boundary_seed: str) -> bytes:
    """A MIME message from a Hash payload: every field it has, bodies as alternatives, attachments mixed.

    Boundaries derive from the delivery (id, token) instead of being random, so a retried delivery rebuilds
    to the same bytes. Nothing can collide with them: bodies are 7bit text, quoted-printable (which writes
    "=" as "=3D") or base64, and the text would have to contain a digest of Postal's secret token.
    """

    def text(name: str) -> str | None:
        return fields.text(name, required=False)

    plain, html = text("plain_body"), text("html_body")
    replies = text("replies_from_plain_body")
    if plain is not None and replies:
        plain = f"{plain}\n\n{replies}"  # strip_replies split them; the reader wants the whole text
    reply_to = fields.text_list("reply_to")
    timestamp = fields.number("timestamp")
    attachments = fields.take_attachments()
    attachments.reverse()  # consumed with pop() below, freeing each base64 text once it is decoded

    budget = max_message_bytes - len(plain or "") - len(html or "")
    if budget < 0:
        raise MessageTooLarge("message over the size limit")

    msg = EmailMessage(policy=_POLICY)
    _set_header(msg, REBUILT_HEADER, REBUILT_VALUE)
    if spam_status == "Spam":
        _set_header(msg, "X-Postal-Spam", "yes")
    elif spam_status == "NotSpam":
        _set_header(msg, "X-Postal-Spam", "no")
    date = text("date")
    if date is None and timestamp is not None and abs(timestamp) < 1e11:
        date = formatdate(timestamp, usegmt=True)  # Postal's reception time beats no Date at all
    _set_header(msg, "Date", date)
    _set_header(msg, "From", text("from"))
    _set_header(msg, "To", text("to"))
    _set_header(msg, "Cc", text("cc"))
    if reply_to:
        _set_header(msg, "Reply-To", ", ".join(r for r in reply_to if r.strip()))
    _set_header(msg, "Subject", text("subject"))
    message_id = text("message_id")
    if message_id is not None and message_id.strip():
        message_id = message_id.strip()
        if not message_id.startswith("<"):
            message_id = f"<{message_id}>"
        _set_header(msg, "Message-ID", message_id)
    _set_header(msg, "In-Reply-To", text("in_reply_to"))
    _set_header(msg, "References", text("references"))
    _set_header(msg, "Auto-Submitted", text("auto_submitted"))

    if plain is not None:
        msg.set_content(_clean_text(plain), subtype="plain", charset="utf-8")
        if html is not None:
            msg.add_alternative(_clean_text(html), subtype="html", charset="utf-8")
    elif html is not None:
        msg.set_content(_clean_text(html), subtype="html", charset="utf-8")
    elif not attachments:
        msg.set_content("", subtype="plain", charset="utf-8")
    del plain, html, replies

    while attachments:
        filename, content_type, data = attachments.pop()
        blob = decode_base64(data, field="attachments", limit=max(budget, 0))
        del data
        budget -= len(blob)
        maintype, subtype = _mime_type(content_type)
        name = _header_text(filename) if filename is not None else None
        msg.add_attachment(blob, maintype=maintype, subtype=subtype, filename=name or None)
        del blob

    seed = hashlib.sha256(boundary_seed.encode("utf-8")).hexdigest()[:24]
    for number, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"=_postal-hash_{seed}_{number}")
    out = msg.as_bytes()
    if len(out) > max_message_bytes:
        raise MessageTooLarge("message over the size limit")
    return out
