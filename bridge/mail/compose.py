"""Outgoing messages: composed from an owner's fields, or checked from a raw RFC 5322 message.

Everything MIME is Python's ``email`` package with ``policy.SMTP`` (CRLF line ends, folded headers):
nothing here builds MIME by hand. Both ways end in one :class:`Outgoing`:

* ``owner_copy``: the message as composed, ``Bcc`` kept (the owner's sealed ``sent`` copy shows whom they
  blind-copied);
* ``wire``: what recipients receive: the same message without ``Bcc``;
* ``recipients``: To, Cc and Bcc, collapsed case-insensitively (the first spelling kept).

``Message-ID`` and ``Date`` are set when missing; the Message-ID is what Postal reports back in every event,
so the outbound record keeps it (``message_id``, without angle brackets). Bad input raises
:class:`ComposeError` naming the field, for a 400 that says which one.

No network, no Flask, no settings: the web layer checks domains, sizes and who may send as ``From``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

FIELDS = frozenset({"from", "to", "cc", "bcc", "subject", "text", "html", "attachments", "in_reply_to"})
MAX_ADDRESS = 320
MAX_SUBJECT = 998  # RFC 5322's line limit; folding spreads it, but nobody needs more
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOCAL_PART = re.compile(r"^[^\s<>()\[\]\\,;:@\"]+$")


DomainCheck = Callable[[str], bool] | None


class ComposeError(ValueError):
    """Bad input; ``field`` names it (``to``, ``attachments``, ``raw``...) for the one-line 400."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Outgoing:
    owner_copy: bytes
    wire: bytes
    from_address: str
    recipients: tuple[str, ...]
    message_id: str  # the Message-ID header's value without < >


def from_fields(
    document: Mapping[str, Any], *, default_from: str, message_id: str, check_domain: DomainCheck = None
) -> Outgoing:
    """Compose a message from the API's fields; ``message_id`` (without < >) becomes its Message-ID.

    ``check_domain`` is asked about every recipient's domain (the web layer passes discovery's rules).
    """
    unknown = sorted(set(document) - FIELDS)
    if unknown:
        raise ComposeError(str(unknown[0])[:40], "unknown field")
    sender = document.get("from", default_from)
    from_header, from_address = _address("from", sender)
    lists = {name: _address_list(name, document.get(name), check_domain) for name in ("to", "cc", "bcc")}
    subject = _text("subject", document.get("subject", ""), header=True)
    text = _text("text", document.get("text"))
    html = _text("html", document.get("html"))
    attachments = _attachments(document.get("attachments"))
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = from_header
    for name in ("to", "cc", "bcc"):
        if lists[name]:
            message[name.capitalize()] = ", ".join(header for header, _ in lists[name])
    message["Subject"] = subject
    message["Date"] = _now()
    message["Message-ID"] = f"<{message_id}>"
    in_reply_to = document.get("in_reply_to")
    if in_reply_to is not None:
        if not isinstance(in_reply_to, str) or not _message_id_value(in_reply_to):
            raise ComposeError("in_reply_to", "must be a Message-ID such as <id@example.org>")
        message["In-Reply-To"] = message["References"] = f"<{_message_id_value(in_reply_to)}>"
    if text is not None and html is not None:
        message.set_content(text)
        message.add_alternative(html, subtype="html")
    elif html is not None:
        message.set_content(html, subtype="html")
    else:
        message.set_content(text or "")
    for filename, content_type, data in attachments:
        maintype, _, subtype = content_type.partition("/")
        try:
            message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        except (TypeError, ValueError):  # e.g. message/rfc822 as bytes: the email package refuses it
            raise ComposeError("attachments", f"cannot attach a {content_type}") from None
    recipients = [address for name in ("to", "cc", "bcc") for _, address in lists[name]]
    return _finish(message, from_address, recipients, message_id)


def from_raw(raw: bytes, *, message_id: str, check_domain: DomainCheck = None) -> Outgoing:
    """Check a raw message: one From address, recipients in To/Cc/Bcc; Message-ID and Date added if missing."""
    try:
        message = BytesParser(policy=policy.SMTP).parsebytes(raw)
        froms = message.get_all("From") or []
        if len(froms) != 1:
            raise ComposeError("raw", "needs exactly one From header")
        pairs = email.utils.getaddresses([str(froms[0])])
        if len(pairs) != 1:
            raise ComposeError("raw", "From must name exactly one address")
        _, from_address = _address("raw", str(froms[0]))
        recipients: list[str] = []
        for name in ("To", "Cc", "Bcc"):
            for value in message.get_all(name) or []:
                for _, address in email.utils.getaddresses([str(value)]):
                    if address:
                        recipients.append(_address("raw", address, check_domain)[1])
        existing = _message_id_value(str(message.get("Message-ID") or ""))
        if existing is None:
            del message["Message-ID"]
            message["Message-ID"] = f"<{message_id}>"
        if message.get("Date") is None:
            message["Date"] = _now()
    except ComposeError:
        raise
    except Exception:  # the email package's header parsers raise assorted errors on junk
        raise ComposeError("raw", "not a readable RFC 5322 message") from None
    return _finish(message, from_address, recipients, existing or message_id)


def _now() -> str:
    return email.utils.format_datetime(datetime.now(UTC))


def _finish(message: EmailMessage, from_address: str, recipients: list[str], message_id: str) -> Outgoing:
    collapsed: dict[str, str] = {}
    for address in recipients:
        collapsed.setdefault(address.lower(), address)
    owner_copy = message.as_bytes()
    del message["Bcc"]  # never in what recipients receive
    return Outgoing(owner_copy, message.as_bytes(), from_address, tuple(collapsed.values()), message_id)


def _address(field: str, value: Any, check_domain: DomainCheck = None) -> tuple[str, str]:
    """(header text, bare address) of one ``addr`` or ``Name <addr>``; ComposeError naming ``field``."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ADDRESS or _CONTROL.search(value):
        raise ComposeError(field, "must be an e-mail address")
    pairs = email.utils.getaddresses([value])
    if len(pairs) != 1 or not pairs[0][1]:
        raise ComposeError(field, "must be one e-mail address")
    name, address = pairs[0]
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or not _LOCAL_PART.match(local) or "." not in domain.strip("."):
        raise ComposeError(field, "must be an e-mail address such as jane@example.org")
    if check_domain is not None and not check_domain(domain):
        raise ComposeError(field, "has an address whose domain is not a mail domain")
    header = email.utils.formataddr((name, address)) if name else address
    return header, address


def _address_list(field: str, value: Any, check_domain: DomainCheck) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ComposeError(field, "must be a list of e-mail addresses")
    return [_address(field, item, check_domain) for item in value]


def _text(field: str, value: Any, *, header: bool = False) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ComposeError(field, "must be a string")
    if "\x00" in value:
        raise ComposeError(field, "must not contain NUL")
    if header and (_CONTROL.search(value.replace("\t", " ")) or len(value) > MAX_SUBJECT):
        raise ComposeError(field, f"must be one line of at most {MAX_SUBJECT} characters")
    if not header:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from JSON's \ud800
            raise ComposeError(field, "must be valid Unicode") from None
    return value


def _attachments(value: Any) -> list[tuple[str, str, bytes]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ComposeError("attachments", "must be a list of {filename, content_type, data}")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"filename", "content_type", "data"}:
            raise ComposeError("attachments", "each must be {filename, content_type, data}")
        filename, content_type, data = item.get("filename"), item.get("content_type"), item.get("data")
        if not isinstance(filename, str) or not filename.strip() or len(filename) > 255 or _CONTROL.search(filename):
            raise ComposeError("attachments", "each needs a filename (one line, at most 255 characters)")
        if not isinstance(content_type, str) or not _CONTENT_TYPE.match(content_type):
            raise ComposeError("attachments", "each needs a content_type such as application/pdf")
        if content_type.lower().startswith("multipart/"):
            raise ComposeError("attachments", "a content_type may not be multipart")
        if not isinstance(data, str):
            raise ComposeError("attachments", "each needs data, base64")
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ComposeError("attachments", "data must be base64") from None
        out.append((filename, content_type.lower(), decoded))
    return out


def _message_id_value(value: str) -> str | None:
    """What lies between < and > (or the whole, stripped), if it looks like ``left@right``."""
    inner = value.strip()
    if inner.startswith("<") and inner.endswith(">"):
        inner = inner[1:-1].strip()
    if not inner or len(inner) > 250 or _CONTROL.search(inner) or any(c in inner for c in " <>") or "@" not in inner:
        return None
    return inner
