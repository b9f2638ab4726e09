"""Which folder a message belongs in, and why.

Pure decisions over a message record: no I/O here, so the filing job can screen a whole batch
after fetching what it needs in bulk. The inbound issue's rules: Postal's spam verdict sends a
message to ``spam``; everything else is screened into ``other``. Handshakes (the inbox by
inclusion) extend ``classify`` in their own module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    folder: str
    reason: str


def classify(record: dict[str, Any]) -> Decision:
    if record.get("spam", {}).get("postal"):
        return Decision("spam", "postal marked it as spam")
    return Decision("other", "sender not approved by a handshake")
