"""Hash -> MIME: rebuild an RFC 5322 message from Postal's lossy Hash payload (postal.md §1).

The Hash format carries parsed fields (addresses, subject, bodies, attachments) instead of the message, so
we rebuild one and mark it ``X-Mailio-Rebuilt: postal-hash`` so that no reader mistakes it for the original.
Headers are written as 7-bit text by hand (the stdlib's header classes are slow and fragile on hostile input).

Raises only PayloadError/MessageTooLarge; never puts a value into an exception message.
"""

from __future__ import annotations

import base64
import email.charset
import hashlib
import re
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.utils import formataddr, formatdate, getaddresses
from typing import Final
from urllib.parse import quote

from bridge.postal.encoding import MessageTooLarge, decode_base64, decoded_length
from bridge.postal.fields import Fields

__all__ = ["MAX_HEADER_CHARS", "REBUILT_HEADER", "REBUILT_VALUE", "rebuild"]

REBUILT_HEADER: Final = "X-Mailio-Rebuilt"
REBUILT_VALUE: Final = "postal-hash"

# SMTP line endings; 7bit so that non-ASCII bodies get quoted-printable/base64. Headers are encoded by
# _set_header itself and must never be re-parsed ("none"): the stdlib would mangle what it cannot parse.
_POLICY = email_policy.SMTP.clone(cte_type="7bit", refold_source="none")
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to"})
_HEADER_JUNK = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
_UTF8: Final = email.charset.Charset("utf-8")
MAX_HEADER_CHARS: Final = 16 * 1024
MAX_FILENAME_CHARS: Final = 1024
_CRLF: Final = b"\r\n"
_B64_BLOCK: Final = 57 * 1024  # a multiple of 57 bytes: every base64 line is a full 76 characters


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


def _utf8_length(text: str | None) -> int:
    if text is None:
        return 0
    if text.isascii():  # O(1) in CPython: no copy for the common case
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _disposition(filename: str | None) -> str:
    """``attachment`` with its filename: quoted when short ASCII, else RFC 2231 continuations.

    Written by hand like the other headers (the stdlib's parameter machinery parses every header it sets,
    which made thousands of parts cost seconds); continuations of 45 characters keep every line
    short (under 78 characters) whatever the name's length.
    """
    name = _header_text(filename)[:MAX_FILENAME_CHARS] if filename is not None else ""
    if not name:
        return "attachment"
    if name.isascii():
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        if len(quoted) <= 60:  # on a line of its own: under 78 characters
            return f'attachment;\r\n filename="{quoted}"'
    encoded = quote(name.encode("utf-8"), safe="")
    pieces: list[str] = []
    while encoded:
        cut = min(45, len(encoded))
        while "%" in encoded[max(cut - 2, 0) : cut]:  # never split a %XX escape
            cut -= 1
        pieces.append(encoded[:cut])
        encoded = encoded[cut:]
    pieces[0] = "utf-8''" + pieces[0]
    params = (f"filename*{i}*={piece}" for i, piece in enumerate(pieces))
    return "attachment;\r\n " + ";\r\n ".join(params)


def _append_attachment(chunks: list[bytes], blob: bytes, content_type: str | None, filename: str | None) -> None:
    """One base64 attachment part, as bytes: linear in its size, a constant cost per part."""
    maintype, subtype = _mime_type(content_type)
    head = (
        f"Content-Type: {maintype}/{subtype}\r\nContent-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: {_disposition(filename)}\r\n\r\n"
    )
    chunks.append(head.encode("ascii"))
    view = memoryview(blob)
    for start in range(0, len(view), _B64_BLOCK):  # blocks, so no second full-size copy exists at once
        chunks.append(base64.encodebytes(view[start : start + _B64_BLOCK]).replace(b"\n", _CRLF))
    view.release()


def _body_part(plain: str | None, html: str | None, *, empty: bool) -> MIMEPart | None:
    """The text bodies as one part (alternatives when both exist); an empty text part if ``empty``."""
    if plain is None and html is None and not empty:
        return None
    part = MIMEPart(policy=_POLICY)
    if plain is not None:
        part.set_content(_clean_text(plain), subtype="plain", charset="utf-8")
        if html is not None:
            part.add_alternative(_clean_text(html), subtype="html", charset="utf-8")
    elif html is not None:
        part.set_content(_clean_text(html), subtype="html", charset="utf-8")
    else:
        part.set_content("", subtype="plain", charset="utf-8")
    return part


def _set_boundaries(part: MIMEPart, seed: str, *, first: int) -> None:
    """Boundaries from the delivery (see rebuild), numbered in document order from ``first``."""
    for number, multipart in enumerate((p for p in part.walk() if p.is_multipart()), start=first):
        multipart.set_boundary(f"=_postal-hash_{seed}_{number}")


def _mime_type(content_type: str | None) -> tuple[str, str]:
    """Attachment type from Postal (JSON: bare type; FormData: with parameters); unknown -> octet-stream.

    multipart/* and message/* cannot be rebuilt from opaque bytes with a base64 transfer encoding, so they
    are attached as application/octet-stream (the filename, e.g. ``.eml``, still tells what they are).
    """
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if len(mime) > 64 or not _MIME_TYPE.fullmatch(mime):  # 64: the header stays on one short line
        return "application", "octet-stream"
    maintype, subtype = mime.split("/", 1)
    if maintype in ("multipart", "message"):
        return "application", "octet-stream"
    return maintype, subtype


def rebuild(fields: Fields, spam_status: str | None, max_message_bytes: int, *, boundary_seed: str) -> bytes:
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
    # take_attachments bounded their number (MAX_ATTACHMENTS). The size limit is checked before anything
    # is decoded or built, on what Postal sent (bodies as UTF-8, attachments decoded), never on the rebuilt
    # message, whose base64 is ~4/3 larger: a 20 MB attachment fits a 25 MB limit.
    size = _utf8_length(plain) + _utf8_length(html)
    for _, _, data in attachments:
        size += decoded_length(data)
    if size > max_message_bytes:
        raise MessageTooLarge("message over the size limit")
    attachments.reverse()  # popped from the end below, so that each base64 text is freed once decoded

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

    # The headers above, then the body: one part (text, or text and HTML as alternatives) when there is
    # nothing attached, else multipart/mixed written here part by part. Attachments never go through the
    # stdlib's generator, which re-parses every part's headers: thousands of parts cost seconds there.
    head = msg.as_bytes()[: -len(_CRLF)]  # the header lines without the blank line that ends them
    seed = hashlib.sha256(boundary_seed.encode("utf-8")).hexdigest()[:24]
    body = _body_part(plain, html, empty=not attachments)
    del plain, html, replies
    if not attachments:
        assert body is not None
        _set_boundaries(body, seed, first=0)
        return b"".join((head, b"MIME-Version: 1.0\r\n", body.as_bytes()))

    mixed = f"=_postal-hash_{seed}_0"
    chunks = [head, f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary="{mixed}"\r\n\r\n'.encode()]
    delimiter = f"--{mixed}\r\n".encode("ascii")
    if body is not None:
        _set_boundaries(body, seed, first=1)
        chunks += (delimiter, body.as_bytes(), _CRLF)
    del body
    while attachments:
        filename, content_type, data = attachments.pop()
        blob = decode_base64(data, field="attachments")  # sizes were checked above
        del data
        chunks.append(delimiter)
        _append_attachment(chunks, blob, content_type, filename)
        chunks.append(_CRLF)
        del blob
    chunks.append(f"--{mixed}--\r\n".encode("ascii"))
    return b"".join(chunks)
