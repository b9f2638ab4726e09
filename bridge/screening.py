"""Which folder a message belongs in, and why: the inbox by inclusion.

Pure decisions over facts gathered in bulk by the filing job (no I/O here). For an SMTP message
to owner R from sender S (the single ``From:`` address), first match wins:

1. Postal said spam, or S's domain fails its own DMARC policy (quarantine/reject) -> ``spam``.
2. No single readable From (none, several, undecodable) -> ``other``: screened, never dropped.
3. R's handshake for S says ``revoked`` -> ``spam``; ``request`` -> ``handshake``;
   ``accepted`` -> ``inbox`` **only if S is authenticated** (DKIM or SPF aligned with S's domain).
4. R wrote to S through the bridge before, or S is R, and S is authenticated -> ``inbox``.
5. Otherwise -> ``other`` (screened), with the reason kept.

Authentication is required wherever the verdict would let mail *into* the inbox: an approved
address in a forged ``From:`` is the attack every allow-list invites (the reference server has
no defence against it), so without aligned DKIM/SPF it stays screened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    folder: str
    rule: str
    reason: str


@dataclass(frozen=True)
class SenderStanding:
    """What the owner's own records say about the sender."""

    handshake: str | None = None  # accepted | revoked | request | notfound | None
    known_contact: bool = False  # the owner has written to this sender
    is_owner: bool = False  # the sender is the owner


def classify(record: dict[str, Any], standing: SenderStanding | None = None) -> Decision:
    standing = standing or SenderStanding()
    verdicts = record.get("verdicts") or {}
    if record.get("spam", {}).get("postal"):
        return Decision("spam", "spam", "Postal marked it as spam")
    if verdicts.get("dmarc") == "fail" and verdicts.get("dmarc_policy") in ("quarantine", "reject"):
        return Decision("spam", "dmarc", f"fails the DMARC policy of its From domain (p={verdicts['dmarc_policy']})")
    problem = record.get("sender", {}).get("problem")
    if problem or not record.get("sender", {}).get("from"):
        return Decision("other", "from", f"screened: {problem or 'no From'}")
    authenticated = bool(verdicts.get("authenticated"))
    if standing.handshake == "revoked":
        return Decision("spam", "handshake", "the owner revoked this sender's handshake")
    if standing.handshake == "request":
        return Decision("handshake", "handshake", "a handshake request from this sender")
    if standing.handshake == "accepted":
        if authenticated:
            return Decision("inbox", "handshake", "approved sender, authenticated")
        return Decision("other", "handshake", "approved sender's address, but not authenticated (no aligned DKIM/SPF)")
    if (standing.known_contact or standing.is_owner) and authenticated:
        return Decision("inbox", "contact", "the owner has written to this sender")
    return Decision("other", "screened", "sender not approved by a handshake")
