"""Outbound records: one per message an owner sent, one entry per recipient with an explicit state.

``OutboundStore`` is the one door: the send path (create, routes, attempts, Postal's answer), the
lookups the web layer and the reconciler need, and the application of Postal's events. It is split
by concern, and re-exports what callers import from here:

* ``bridge.store.outbound_states``: the per-recipient state machine (states, ranks, ``may_move``),
  Postal events and how one applies to a recipient entry; pure;
* ``bridge.store.outbound_records``: the records in the object store, their Redis indexes, the
  per-message lock, events kept until their send answer is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

from bridge.store.objects import ObjectStore
from bridge.store.outbound_records import (
    INDEX_SECONDS,
    LOCK_SECONDS,
    PENDING_SECONDS,
    WAITING,
    OutboundBusy,
    RecordStore,
)
from bridge.store.outbound_states import (
    ACCEPTED,
    BOUNCED,
    DELAYED,
    DELIVERED,
    EVENT_HISTORY,
    FAILED,
    FINAL,
    HELD,
    OPEN,
    QUEUED,
    RANK,
    REASON_CHARS,
    ROUTES,
    UNCERTAIN,
    Location,
    NoSuchRecord,
    PostalEvent,
    apply_event,
    cut,
    entries,
    entry,
    find,
    may_move,
    move,
    new_record,
    normalize_message_id,
    public_recipients,
    route,
)

__all__ = [
    "ACCEPTED", "BOUNCED", "DELAYED", "DELIVERED", "EVENT_HISTORY", "FAILED", "FINAL", "HELD", "INDEX_SECONDS",
    "LOCK_SECONDS", "OPEN", "PENDING_SECONDS", "QUEUED", "RANK", "REASON_CHARS", "ROUTES", "UNCERTAIN", "WAITING",
    "Location", "NoSuchRecord", "OutboundBusy", "OutboundStore", "PostalEvent", "may_move", "normalize_message_id",
    "public_recipients",
]  # fmt: skip


class OutboundStore:
    """Outbound records, their Redis indexes and the application of Postal's events."""

    def __init__(self, objects: ObjectStore, connection: redis.Redis, *, lock_wait: float = 2.0) -> None:
        self._records = RecordStore(objects, connection, lock_wait=lock_wait)

    @property
    def lock_wait(self) -> float:
        """How long a change waits for the message's lock before ``OutboundBusy``."""
        return self._records.lock_wait

    @lock_wait.setter
    def lock_wait(self, seconds: float) -> None:
        self._records.lock_wait = seconds

    # --- the send path ----------------------------------------------------------------------

    def create(self, owner: str, msg_id: str, message_id: str, recipients: Iterable[str]) -> dict[str, Any]:
        """Create the record (create-only: a retry gets the stored one), every recipient ``queued``.

        Recipients are collapsed case-insensitively, the first spelling kept. ``message_id`` is the
        Message-ID header the bridge set in what it sends (Postal reports it back in every event).
        """
        return self._records.create(new_record(owner, msg_id, message_id, recipients))

    def get(self, owner: str, msg_id: str) -> dict[str, Any] | None:
        return self._records.get(owner, msg_id)

    def set_route(self, owner: str, msg_id: str, address: str, route_: str, *, reason: str | None = None) -> dict:
        """Record the route discovery chose; ``none`` fails the recipient with ``reason`` (permanent)."""
        return self.set_routes(owner, msg_id, {address: (route_, reason)})

    def set_routes(self, owner: str, msg_id: str, routes: Mapping[str, tuple[str, str | None]]) -> dict[str, Any]:
        """``set_route`` for many recipients in one record update: ``{address: (route, reason)}``; an
        unknown route is a ValueError and changes nothing."""

        def change(record: dict[str, Any]) -> None:
            for found, (route_, reason) in zip(entries(record, list(routes)), routes.values(), strict=True):
                route(found, route_, reason)

        return self._update(owner, msg_id, change)

    def set_state(self, owner: str, msg_id: str, address: str, state: str, reason: str | None = None) -> bool:
        """Move one recipient if ``may_move`` allows; True if it moved. ``uncertain`` also applies the
        events kept for it, matched by its address (the Postal id was never learnt)."""
        return bool(self.set_states(owner, msg_id, [address], state, reason))

    def set_states(
        self, owner: str, msg_id: str, addresses: Iterable[str], state: str, reason: str | None = None
    ) -> list[str]:
        """``set_state`` for many recipients in one record update; returns the addresses that moved."""
        if state not in RANK:
            raise ValueError(f"unknown state {state!r}")
        wanted = list(addresses)
        moved: list[str] = []
        self._update(owner, msg_id, lambda record: moved.extend(self._move_many(record, wanted, state, reason)))
        return moved

    def _move_many(self, record: dict[str, Any], addresses: list[str], state: str, reason: str | None) -> list[str]:
        moved, unknown = [], set()
        for address, found in zip(addresses, entries(record, addresses), strict=True):
            if may_move(found["state"], state):
                move(found, state, reason)
                moved.append(address)
            if state == UNCERTAIN and found["postal"] is None:
                unknown.add(found["address"].lower())
        if unknown:
            self._drain_pending(record, lambda e: e.to.lower() in unknown)
        return moved

    def start_attempt(
        self,
        owner: str,
        msg_id: str,
        addresses: Iterable[str],
        routes: Mapping[str, tuple[str, str | None]] | None = None,
    ) -> int:
        """Note, before calling Postal, that these recipients are being sent: returns the attempt number.

        A crash leaves the attempt ``sending``: the caller must then treat it as ``uncertain``, not resend.
        ``routes`` (as ``set_routes``) are recorded in the same update, first: the routing job's first
        call to Postal costs one record write before it, not two.
        """
        numbers: list[int] = []
        wanted = [a.lower() for a in addresses]
        chosen = dict(routes or {})

        def change(record: dict[str, Any]) -> None:
            for found, (route_, reason) in zip(entries(record, list(chosen)), chosen.values(), strict=True):
                route(found, route_, reason)
            number = 1 + max((a["n"] for r in record["recipients"] for a in r["attempts"]), default=0)
            numbers.append(number)
            for found in entries(record, wanted):
                found["attempts"].append(
                    {"n": number, "started_at": time.time(), "ended_at": None, "outcome": "sending", "detail": None}
                )

        self._update(owner, msg_id, change)
        return numbers[0]

    def end_attempt(
        self,
        owner: str,
        msg_id: str,
        addresses: Iterable[str],
        number: int,
        outcome: str,
        detail: str | None = None,
        *,
        postal: Mapping[str, Mapping[str, Any]] | None = None,
        state: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Record how attempt ``number`` ended (``accepted``, ``refused``, ``temporary``, ``ambiguous``...),
        and in the same update what it means: Postal's ids (``postal``, as ``record_postal``) or a
        ``state`` with its ``reason`` (as ``set_states``). One write after each call to Postal."""
        if state is not None and state not in RANK:
            raise ValueError(f"unknown state {state!r}")
        wanted = [a.lower() for a in addresses]

        def change(record: dict[str, Any]) -> None:
            for found in entries(record, wanted):
                for attempt in found["attempts"]:
                    if attempt["n"] == number:
                        attempt |= {"ended_at": time.time(), "outcome": outcome, "detail": cut(detail)}
            if postal is not None:
                self._accept(record, postal)
            if state is not None:
                self._move_many(record, wanted, state, reason)

        return self._update(owner, msg_id, change)

    def record_postal(self, owner: str, msg_id: str, messages: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Postal's send answer ``data.messages`` (``{rcpt: {"id", "token"}}``): ``accepted``, indexed,
        and the events that arrived before this answer was recorded applied now."""
        return self._update(owner, msg_id, lambda record: self._accept(record, messages))

    def _accept(self, record: dict[str, Any], messages: Mapping[str, Mapping[str, Any]]) -> None:
        by_address = {rcpt.strip().lower(): ids for rcpt, ids in messages.items()}
        for found, ids in zip(entries(record, list(by_address)), by_address.values(), strict=True):
            found["postal"] = {"id": int(ids["id"]), "token": str(ids["token"])}
            if may_move(found["state"], ACCEPTED):
                move(found, ACCEPTED, None)
        recorded = {int(ids["id"]) for ids in by_address.values()}
        self._drain_pending(record, lambda e: e.postal_id in recorded)

    def reopen(self, owner: str, msg_id: str, address: str, reason: str | None = None) -> dict[str, Any]:
        """The owner's explicit resend: back to ``queued`` whatever the state, Postal ids forgotten."""

        def change(record: dict[str, Any]) -> None:
            found = entry(record, address)
            found["postal"] = None
            found["event_at"] = None
            move(found, QUEUED, reason or "resend requested")

        return self._update(owner, msg_id, change)

    def note_peers(
        self,
        owner: str,
        msg_id: str,
        peers: Mapping[str, Mapping[str, str]],
        dids: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Note where the Mailio leg sends recipients, before it posts: ``peers[address]`` becomes the entry's
        ``peer`` (``host``: the Mailio host it is POSTed to, ``address``: the recipient's 0x address there,
        and what else the leg keeps, such as ``sealed_by``), ``dids[address]`` its ``did``. Only that host's
        signed delivery message may then move the recipient (``bridge.mailio.accept.apply_delivery``)."""
        for peer in peers.values():
            if not (isinstance(peer.get("host"), str) and isinstance(peer.get("address"), str)):
                raise ValueError("a peer needs its host and address")
        addresses = list(peers)

        def change(record: dict[str, Any]) -> None:
            for address, found in zip(addresses, entries(record, addresses), strict=True):
                found["peer"] = dict(peers[address])
                if dids is not None and address in dids:
                    found["did"] = dids[address]

        return self._update(owner, msg_id, change)

    # --- lookups and the index ------------------------------------------------------------------

    def find_postal(self, postal_id: int, token: str | None = None) -> Location | None:
        """The recipient Postal's message ``postal_id`` belongs to; None if not ours (or the token differs:
        ids are unique only within one Postal server, and one install signs for all its servers)."""
        return self._records.find_postal(postal_id, token)

    def find_message_id(self, message_id: str) -> tuple[str, str] | None:
        """(owner, msg id) of the message the bridge sent with this Message-ID."""
        return self._records.find_message_id(message_id)

    def waiting(self, updated_before: float, limit: int = 100) -> list[Location]:
        """Recipients left ``uncertain``/``accepted``/``delayed``/``held`` since before ``updated_before``,
        oldest first: what a reconciler asks Postal's message API about (its webhooks stop after ~36 min)."""
        return self._records.waiting(updated_before, limit)

    def rebuild_index(self) -> int:
        """Re-index every record from the store (after Redis lost its data); returns how many."""
        return self._records.rebuild_index()

    # --- Postal's events ------------------------------------------------------------------------

    def apply_event(self, event: PostalEvent) -> str:
        """Apply one outgoing message event: ``applied``, ``stale``, ``duplicate``, ``kept`` or ``not_ours``.

        Matched by Postal's id (and token), else by the Message-ID the bridge set plus the recipient:
        that resolves an ``uncertain`` send, and keeps an event whose send answer is not recorded yet.
        """
        location = self.find_postal(event.postal_id, event.token)
        if location is not None:
            owner, msg_id, address = location.owner, location.id, location.address
        else:
            found = self.find_message_id(event.message_id) if event.message_id else None
            if found is None:
                return "not_ours"
            (owner, msg_id), address = found, event.to
        outcome: list[str] = []
        try:
            self._update(owner, msg_id, lambda r: outcome.append(self._event_on(r, find(r, address), event)))
        except NoSuchRecord:
            return "not_ours"  # an index entry whose record is gone
        return outcome[0]

    def _event_on(self, record: dict[str, Any], found: dict[str, Any] | None, event: PostalEvent) -> str:
        if found is None:
            return "not_ours"
        if found["postal"] is not None:
            # Another Postal copy for this recipient (an ambiguous attempt before an explicit resend)
            # moves nothing: the state follows the copy the bridge recorded.
            return apply_event(found, event) if found["postal"]["id"] == event.postal_id else "stale"
        if found["state"] == UNCERTAIN:
            found["postal"] = {"id": event.postal_id, "token": event.token}  # the evidence: Postal took it
            return apply_event(found, event)
        self._records.keep(record, event)  # the send answer is not recorded yet
        return "kept"

    def _drain_pending(self, record: dict[str, Any], wanted: Callable[[PostalEvent], bool]) -> None:
        """Apply the kept events ``wanted`` picks (in Postal's time order) and forget them."""
        done = []
        for event in filter(wanted, self._records.kept(record)):
            found = find(record, event.to)
            if found is not None:
                if found["postal"] is None:
                    found["postal"] = {"id": event.postal_id, "token": event.token}
                if found["postal"]["id"] == event.postal_id:
                    apply_event(found, event)
                    done.append(event.uuid)
        self._records.forget(record, done)

    def _update(self, owner: str, msg_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        return self._records.update(owner, msg_id, change)
