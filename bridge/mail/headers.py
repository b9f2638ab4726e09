"""The few facts the bridge reads from a message's header block, fast and without ever raising.

Runs on the inbound request path for every message Postal posts (20 KB typical, up to 25 MB), so it looks only
at the header block: it finds the first empty line and parses the bytes before it (capped at
``MAX_HEADER_BYTES``), never the body. ``email``'s ``compat32`` header parser is used because the modern
policy decodes every header eagerly and costs several times more; we decode only From, Message-ID and Postal's
own lines.

Trust: Postal (v3.3.6) puts its lines on top of what the sender wrote, in this order:
``X-Postal-Spam``, ``X-Postal-Spam-Threshold``, ``X-Postal-Spam-Score``, ``X-Postal-Threat`` (only when spam
inspection ran), then its own ``Received: from <helo> (<rDNS> [<client IP>]) by <host> with SMTP; <date>``
(written when DATA starts, so always present for mail received over SMTP). Everything after that line is the
sender's and may be forged, so the spam verdict is read only from the leading ``X-Postal-*`` block and the
client IP only from the ``Received:`` line straight after it.

This module must never raise on any input and never look at the body; it does no I/O and no authentication
(``bridge.mail.auth`` decides whether the From address is genuine).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

__all__ = ["MAX_HEADER_BYTES", "SenderFacts", "sender_facts"]

#: Header bytes we are willing to parse. Postfix truncates headers at 100 KiB; real ones (long Received and
#: ARC chains included) stay far below. Anything past this is not read: a From beyond it counts as missing.
MAX_HEADER_BYTES = 256 * 1024

NO_FROM = "no From"
SEVERAL_FROM = "several From addresses"
UNDECODABLE_FROM = "undecodable From"

_PARSER = BytesHeaderParser(policy=compat32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")

# An addr-spec we accept: dot-atom or quoted local part, and a domain of host labels. Non-ASCII letters are
# allowed on both sides (RFC 6531/6532 mail). Anything else (domain literals, stray "@", spaces) is refused
# rather than guessed at: a From we cannot read unambiguously must not be shown or authenticated.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_LOCAL = rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*|\"(?:[^\"\\\r\n]|\\.)*\")"
_LABEL = r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?"
_ADDR_SPEC = re.compile(rf"{_LOCAL}@{_LABEL}(?:\.{_LABEL})*")

# Postal's Received line. The HELO name is the client's free text and may itself contain "(x [ip]) by", so the
# greedy helo group makes the match end at the LAST "(rdns [ip]) by ", which is the part Postal wrote.
_POSTAL_RECEIVED = re.compile(
    r"\A\s*from (?P<helo>.*) \((?P<rdns>[^()\[\]]*?) ?\[(?P<ip>[0-9A-Fa-f:.]+)\]\) by ", re.DOTALL
)


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """What the header block says about the sender; every field is None/() when it could not be read."""

    from_addresses: tuple[str, ...]
    """Every address in every From: header, lower-cased addr-spec; () when none or undecodable."""
    from_problem: str | None
    """None when exactly one From address; else "no From", "several From addresses" or "undecodable From"."""
    postal_spam: bool | None
    """Postal's X-Postal-Spam verdict (its own, leading header only); None when Postal did not inspect."""
    postal_spam_score: float | None
    client_ip: str | None
    """The SMTP client's IP from Postal's own Received: line (IPv4-mapped IPv6 shown as IPv4)."""
    helo: str | None
    message_id: str | None
    """Message-ID without the angle brackets (as Postal's Hash format gives it)."""

    @property
    def from_address(self) -> str | None:
        """The single From address, or None when ``from_problem`` says why there is none."""
        if self.from_problem is None and len(self.from_addresses) == 1:
            return self.from_addresses[0]
        return None


def _header_block(message: bytes) -> bytes:
    """Return the bytes before the first empty line (CRLF or LF), at most ``MAX_HEADER_BYTES``.

    ``b"\\n\\r\\n"`` finds CRLFCRLF (and an LF line followed by a CRLF blank line); ``b"\\n\\n"`` the LF-only
    form, searched only up to the first hit of the other. Both searches are bounded and nothing is copied
    but the header itself, so a 25 MB message costs no more than a small one.
    """
    if message.startswith((b"\n", b"\r\n")):
        return b""
    end = message.find(b"\n\r\n", 0, MAX_HEADER_BYTES + 3)
    lf_end = message.find(b"\n\n", 0, end + 2 if end != -1 else MAX_HEADER_BYTES + 2)
    if lf_end != -1 and (end == -1 or lf_end < end):
        end = lf_end
    if end != -1 and end < MAX_HEADER_BYTES:
        return message[: end + 1]
    if len(message) <= MAX_HEADER_BYTES:
        return message  # a message that is all header (no body) is allowed
    cut = message.rfind(b"\n", 0, MAX_HEADER_BYTES)
    return message[: cut + 1] if cut != -1 else b""


def _raw_bytes(value: str) -> bytes:
    """Undo compat32's surrogateescape decoding to get the header's original bytes back."""
    return value.encode("ascii", errors="surrogateescape")


def _text(value: str) -> str | None:
    """Unfolded UTF-8 text of a raw header value, or None when its bytes are not UTF-8."""
    try:
        return _FOLD.sub("", _raw_bytes(value).decode("utf-8")).strip()
    except UnicodeError:
        return None


def _from_addresses(values: list[str]) -> tuple[tuple[str, ...], str | None]:
    if not values:
        return (), NO_FROM
    texts = [_text(value) for value in values]
    if any(text is None for text in texts):
        return (), UNDECODABLE_FROM
    addresses: list[str] = []
    for _name, addr in getaddresses([text for text in texts if text is not None]):
        if not addr:
            continue  # an empty group ("undisclosed-recipients:;") or "<>" names nobody
        if not _ADDR_SPEC.fullmatch(addr) or not addr.isprintable():
            return (), UNDECODABLE_FROM  # isprintable: no invisible or bidi-control characters
        addresses.append(addr.lower())
    if not addresses:
        return (), NO_FROM
    if len(addresses) > 1:
        return tuple(addresses), SEVERAL_FROM
    return tuple(addresses), None


def _postal_received(value: str) -> tuple[str | None, str | None]:
    """(client IP, HELO name) from Postal's Received line; (None, None) when it is not in Postal's shape."""
    text = _text(value)
    if text is None:
        return None, None
    match = _POSTAL_RECEIVED.match(text)
    if match is None:
        return None, None
    try:
        ip = ipaddress.ip_address(match["ip"])
    except ValueError:
        return None, None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    helo = match["helo"].strip()
    return str(ip), (helo if helo and len(helo) <= 255 else None)


def _spam_flag(value: str) -> bool | None:
    word = value.strip().lower()
    return True if word == "yes" else False if word == "no" else None


def _spam_score(value: str) -> float | None:
    try:
        score = float(value.strip())
    except ValueError:
        return None
    return score if math.isfinite(score) else None


def _message_id(value: str) -> str | None:
    text = _text(value)
    if not text or len(text) > 998:
        return None
    if text.startswith("<"):
        end = text.find(">")
        text = text[1:end] if end != -1 else text[1:]
    text = text.strip()
    return text if text and text.isprintable() and " " not in text else None


def _facts(headers: Message) -> SenderFacts:
    postal_spam: bool | None = None
    postal_spam_score: float | None = None
    client_ip = helo = message_id = None
    from_values: list[str] = []
    seen: set[str] = set()  # the first occurrence of each header we read wins
    # Postal's leading X-Postal-* lines, then the line right after them (Postal's Received, when it is one),
    # then the "sender" zone: everything the sender wrote, which may be forged.
    zone = "postal block"
    for name, value in headers.raw_items():
        name = name.lower()
        if zone == "postal block":
            if name.startswith("x-postal-"):
                if name == "x-postal-spam" and name not in seen:
                    postal_spam = _spam_flag(value)
                elif name == "x-postal-spam-score" and name not in seen:
                    postal_spam_score = _spam_score(value)
                seen.add(name)
                continue
            zone = "sender"
            if name == "received":
                client_ip, helo = _postal_received(value)
                continue
        if name == "from":
            from_values.append(value)
        elif name == "message-id" and name not in seen:
            seen.add(name)
            message_id = _message_id(value)
    from_addresses, from_problem = _from_addresses(from_values)
    return SenderFacts(
        from_addresses=from_addresses,
        from_problem=from_problem,
        postal_spam=postal_spam,
        postal_spam_score=postal_spam_score,
        client_ip=client_ip,
        helo=helo,
        message_id=message_id,
    )


def sender_facts(message: bytes) -> SenderFacts:
    """Read the sender facts from a raw RFC 5322 message; never raises, whatever the bytes.

    Only the header block is parsed (see the module docstring), so the cost does not grow with the body.
    """
    try:
        return _facts(_PARSER.parsebytes(_header_block(message)))
    except Exception:  # a parser bug on hostile bytes must not take the request path down
        return SenderFacts((), UNDECODABLE_FROM, None, None, None, None, None)
