"""MTP status codes: RFC 3463 enhanced codes plus Mailio's handshake family (mtp-wire.md sections 4, 5).

A delivery message reports one code per local recipient inside ``plainBodyBase64``: standard base64 of
compact JSON ``{"statusCodes": [{"class", "subject", "detail", "description"?, "address"?, "timestamp"?}]}``,
integers, keys in that order, as the reference's ``types/mtp_status.go`` writes them.

Unlike the reference (mailio.md section 7, defect 6) we report failures with class 5 (permanent) or 4
(temporary), never class 2, so a peer can tell them from success.

Protocol code: pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["DESCRIPTIONS", "StatusCode", "code", "parse_status_codes", "status_codes_body"]

#: (subject, detail) -> description, after RFC 3463 and the reference's ``types/mtp_status.go``.
DESCRIPTIONS: dict[tuple[int, int], str] = {
    (0, 0): "other or undefined status",
    (1, 0): "other address status",
    (1, 1): "bad destination mailbox address",
    (1, 3): "bad destination mailbox address syntax",
    (1, 4): "destination mailbox address ambiguous",
    (1, 5): "destination address valid",
    (1, 6): "destination mailbox has moved",
    (1, 7): "bad sender's mailbox address syntax",
    (1, 8): "bad sender's system address",
    (2, 0): "other or undefined mailbox status",
    (2, 1): "mailbox disabled, not accepting messages",
    (2, 2): "mailbox full",
    (2, 3): "message length exceeds administrative limit",
    (2, 4): "mailing list expansion problem",
    (2, 5): "other mailbox status",
    (2, 6): "mailbox has moved",
    (2, 7): "bad sender's mailbox address syntax",
    (2, 8): "bad sender's system address",
    (3, 0): "other or undefined mail system status",
    (3, 1): "mail system full",
    (3, 2): "system not accepting network messages",
    (3, 3): "system not capable of selected features",
    (3, 4): "message too big for system",
    (3, 5): "system incorrectly configured",
    (3, 6): "requested priority was changed or content refused",
    (3, 7): "time expired",
    (3, 8): "storage exceeded",
    (3, 9): "authentication required",
    (4, 0): "other or undefined network or routing status",
    (4, 1): "no answer from host",
    (4, 2): "bad connection",
    (4, 3): "directory server failure",
    (4, 4): "unable to route",
    (4, 5): "mail system congestion",
    (4, 6): "routing loop detected",
    (4, 7): "delivery time expired",
    (5, 0): "other or undefined protocol status",
    (5, 1): "duplicate message id",
    (5, 2): "syntax error",
    (5, 3): "too many recipients",
    (5, 4): "invalid command arguments",
    (5, 5): "wrong protocol version",
    (6, 0): "other or undefined media error",
    (6, 1): "media not supported",
    (6, 2): "conversion required and prohibited",
    (6, 3): "conversion required but not supported",
    (6, 4): "conversion with loss performed",
    (6, 5): "conversion failed",
    (7, 0): "other or undefined security status",
    (7, 1): "delivery not authorized, message refused",
    (7, 2): "mailing list expansion prohibited",
    (7, 3): "security conversion required but not possible",
    (7, 4): "security features not supported",
    (7, 5): "cryptographic failure: keys invalid",
    (7, 6): "cryptographic algorithm not supported",
    (7, 7): "message integrity failure: signature invalid",
    (8, 0): "other or undefined handshake status",
    (8, 1): "handshake failed",
    (8, 2): "handshake revoked",
    (8, 3): "handshake expired",
    (8, 4): "handshake not supported",
    (8, 5): "handshake not possible",
    (8, 6): "handshake not available",
    (8, 7): "handshake not verified",
    (8, 8): "handshake not completed",
    (8, 9): "handshake not found",
    (8, 10): "handshake frequency exceeded",
    (8, 11): "intent not supported",
}

#: A delivery message is small; a status list far longer than any server's recipients is junk.
MAX_CODES = 1000
MAX_TEXT = 1000


@dataclass(frozen=True)
class StatusCode:
    """One ``class.subject.detail`` code, optionally for one recipient (``address``) at a time (ms)."""

    class_: int
    subject: int
    detail: int
    description: str = ""
    address: str = ""
    timestamp: int = 0

    @property
    def code(self) -> str:
        return f"{self.class_}.{self.subject}.{self.detail}"

    @property
    def success(self) -> bool:
        return self.class_ == 2

    @property
    def permanent(self) -> bool:
        return self.class_ == 5

    def to_json(self) -> dict[str, Any]:
        """The reference's member order; ``description``, ``address``, ``timestamp`` only when set."""
        out: dict[str, Any] = {"class": self.class_, "subject": self.subject, "detail": self.detail}
        if self.description:
            out["description"] = self.description
        if self.address:
            out["address"] = self.address
        if self.timestamp:
            out["timestamp"] = int(self.timestamp)
        return out

    @classmethod
    def from_json(cls, data: Any) -> StatusCode:
        """Strict: integers in range (class 2, 4 or 5), text where text belongs. Raises ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError("a status code is not an object")
        numbers = []
        for name in ("class", "subject", "detail"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 999:
                raise ValueError(f"status code {name} is not a small whole number")
            numbers.append(value)
        if numbers[0] not in (2, 4, 5):
            raise ValueError("status code class is not 2, 4 or 5")
        texts = []
        for name in ("description", "address"):
            value = data.get(name, "")
            if not isinstance(value, str) or len(value) > MAX_TEXT:
                raise ValueError(f"status code {name} is not text")
            texts.append(value)
        timestamp = data.get("timestamp", 0)
        if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
            raise ValueError("status code timestamp is not a whole number of milliseconds")
        return cls(numbers[0], numbers[1], numbers[2], texts[0], texts[1], timestamp)


def code(value: str, *, address: str = "", timestamp: int = 0, description: str | None = None) -> StatusCode:
    """``code("5.1.1", address=...)``: a status code with RFC 3463's description unless one is given."""
    klass, subject, detail = (int(part) for part in value.split("."))
    text = DESCRIPTIONS.get((subject, detail), "") if description is None else description
    return StatusCode(klass, subject, detail, text, address, timestamp)


def status_codes_body(codes: Iterable[StatusCode]) -> str:
    """``plainBodyBase64`` of a delivery message."""
    document = {"statusCodes": [c.to_json() for c in codes]}
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode("ascii")


def parse_status_codes(value: Any) -> list[StatusCode]:
    """The codes of a delivery message's ``plainBodyBase64``. Raises ``ValueError`` naming the problem."""
    if not isinstance(value, str) or not value:
        raise ValueError("plainBodyBase64 is missing")
    try:
        document = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, RecursionError):
        raise ValueError("plainBodyBase64 is not base64 of JSON") from None
    codes = document.get("statusCodes") if isinstance(document, dict) else None
    if not isinstance(codes, list) or not codes or len(codes) > MAX_CODES:
        raise ValueError("plainBodyBase64 has no statusCodes list")
    return [StatusCode.from_json(item) for item in codes]
