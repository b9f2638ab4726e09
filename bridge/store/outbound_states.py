"""The per-recipient state machine of outbound records, and how one Postal event applies to an entry.

Pure: functions over one recipient entry (a dict of the stored record), no I/O. A record's entry is
``{"address", "route": "smtp"|"mailio"|"none"|null, "state", "reason", "updated_at", "postal": {"id",
"token"}|null, "attempts", "events", "event_at"}``. ``attempts`` are the send path's calls; ``events``
the last EVENT_HISTORY Postal events seen for the recipient (uuid, kind, Postal's time, applied or not),
so re-applying an event is recognised by its uuid even when Redis lost the webhook's dedupe key.

States and the one transition rule (``may_move``), by rank; nothing moves backwards::

    rank  state      set by                                    may then become
    0     queued     create; a temporary send failure; resend  anything
    1     uncertain  the send path (ambiguous Postal answer)   rank >= 1 (events resolve it)
    2     accepted   record_postal (Postal's send API took it) rank >= 2
    3     delayed    MessageDelayed (every soft fail)          rank >= 3; delayed <-> held by Postal's time
    3     held       MessageHeld                               rank >= 3; the later Postal timestamp wins
    4     delivered  MessageSent                               bounced only (a bounce after delivery wins)
    5     failed     MessageDeliveryFailed; route none; send   final
    5     bounced    MessageBounced                            final

Equal ranks move too (a newer reason), except an event older than the last applied one. Only
``reopen`` (the owner's explicit resend) puts a recipient back to ``queued``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bridge import metrics

QUEUED, UNCERTAIN, ACCEPTED, DELAYED, HELD = "queued", "uncertain", "accepted", "delayed", "held"
DELIVERED, FAILED, BOUNCED = "delivered", "failed", "bounced"
RANK = {QUEUED: 0, UNCERTAIN: 1, ACCEPTED: 2, DELAYED: 3, HELD: 3, DELIVERED: 4, FAILED: 5, BOUNCED: 5}
FINAL = frozenset({FAILED, BOUNCED})
ROUTES = ("smtp", "mailio", "none")
OPEN = frozenset({UNCERTAIN, ACCEPTED, DELAYED, HELD})  # waiting on Postal: the reconciler's work

EVENT_HISTORY = 50  # MessageDelayed fires up to 18 times per message
REASON_CHARS = 300


class NoSuchRecord(KeyError):
    """No outbound record (or no such recipient on it)."""


@dataclass(frozen=True)
class PostalEvent:
    """One Postal message event, normalised by the web layer: what it means for one recipient."""

    uuid: str
    kind: str  # Postal's name, e.g. MessageSent
    state: str  # the state it proposes
    postal_id: int
    token: str | None
    message_id: str | None
    to: str
    at: float  # Postal's timestamp of the event
    reason: str | None


@dataclass(frozen=True)
class Location:
    owner: str
    id: str
    address: str


def may_move(current: str, proposed: str) -> bool:
    """The transition rule (see the table above); pure."""
    if current in FINAL:
        return False
    if current == DELIVERED:
        return proposed == BOUNCED
    return RANK[proposed] >= RANK[current]


def normalize_message_id(value: str) -> str:
    """As Postal stores it (copy_attributes_from_raw_message): what lies between ``<`` and ``>``, stripped."""
    return re.sub(r">.*", "", re.sub(r".*<", "", value, flags=re.S), flags=re.S).strip()


def public_recipients(record: dict[str, Any]) -> list[dict[str, Any]]:
    """What the owner's API shows of each recipient (attempts and Postal's event history stay inside); for a
    Mailio recipient ``peer``: the host it was sent to and who sealed what it got (``client``/``server``)."""
    names = ("address", "route", "state", "reason", "updated_at", "postal")
    return [{**{name: entry[name] for name in names}, "peer": _public_peer(entry)} for entry in record["recipients"]]


def _public_peer(entry: dict[str, Any]) -> dict[str, Any] | None:
    peer = entry.get("peer")
    return {"host": peer.get("host"), "sealed_by": peer.get("sealed_by")} if isinstance(peer, dict) else None


def apply_event(entry: dict[str, Any], event: PostalEvent) -> str:
    """Apply ``event`` to one recipient entry: ``applied``, ``duplicate``, or ``stale`` if it may not move it."""
    if any(seen["uuid"] == event.uuid for seen in entry["events"]):
        return "duplicate"  # applied before (Redis lost the dedupe key, or a crash before it was set)
    last = entry.get("event_at")
    older = last is not None and event.at < last and RANK[event.state] == RANK[entry["state"]]
    applied = may_move(entry["state"], event.state) and not older
    entry["events"] = [*entry["events"], {"uuid": event.uuid, "kind": event.kind, "at": event.at, "applied": applied}]
    entry["events"] = entry["events"][-EVENT_HISTORY:]
    if not applied:
        return "stale"
    move(entry, event.state, event.reason)
    entry["event_at"] = event.at
    return "applied"


def move(entry: dict[str, Any], state: str, reason: str | None) -> None:
    if entry.get("state") != state:
        metrics.OUTBOUND_RECIPIENTS.labels(state=state).inc()
    entry.update(state=state, reason=cut(reason), updated_at=time.time())


def route(entry: dict[str, Any], kind: str, reason: str | None) -> None:
    """Record the route discovery chose; ``none`` fails the recipient with ``reason`` (permanent), and
    a reason on another route notes why it still waits (``queued``)."""
    if kind not in ROUTES:
        raise ValueError(f"unknown route {kind!r}")
    entry["route"] = kind
    if kind == "none":
        move(entry, FAILED, reason or "no mail service for this domain")
    elif reason is not None and may_move(entry["state"], QUEUED):
        move(entry, QUEUED, reason)


def new_record(owner: str, msg_id: str, message_id: str, recipients: Iterable[str]) -> dict[str, Any]:
    """A record with every recipient ``queued``, collapsed case-insensitively (the first spelling kept)."""
    now = time.time()
    seen: dict[str, dict[str, Any]] = {}
    for address in recipients:
        seen.setdefault(address.strip().lower(), new_recipient(address.strip(), now))
    if not seen:
        raise ValueError("no recipients")
    record: dict[str, Any] = {"owner": owner, "id": msg_id, "message_id": normalize_message_id(message_id)}
    return record | {"created_at": now, "updated_at": now, "recipients": list(seen.values())}


def new_recipient(address: str, now: float) -> dict[str, Any]:
    fields = {"address": address, "route": None, "state": QUEUED, "reason": None, "updated_at": now}
    return fields | {"postal": None, "attempts": [], "events": [], "event_at": None}


def find(record: dict[str, Any], address: str) -> dict[str, Any] | None:
    """The entry of ``address`` (case-insensitively), or None; a linear scan, see ``entries`` for many."""
    wanted = address.strip().lower()
    return next((r for r in record["recipients"] if r["address"].lower() == wanted), None)


def entry(record: dict[str, Any], address: str) -> dict[str, Any]:
    found = find(record, address)
    if found is None:
        raise NoSuchRecord("no such recipient on this message")
    return found


def entries(record: dict[str, Any], addresses: list[str]) -> list[dict[str, Any]]:
    """The entries of many addresses at once (one pass over the record: a 1,000-recipient message
    would otherwise cost a million comparisons per update); NoSuchRecord if one is missing."""
    by_address = {r["address"].lower(): r for r in record["recipients"]}
    try:
        return [by_address[a.strip().lower()] for a in addresses]
    except KeyError:
        raise NoSuchRecord("no such recipient on this message") from None


def cut(text: str | None) -> str | None:
    return text[:REASON_CHARS] if text else text
