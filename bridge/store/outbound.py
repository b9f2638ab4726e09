"""Outbound records: one per message an owner sent, one entry per recipient with an explicit state.

System of record: ``outbound/<owner address>/<msg id>.json``: ``{"owner", "id", "message_id" (the
Message-ID the bridge set, without <>), "created_at", "updated_at", "recipients": [{"address", "route":
"smtp"|"mailio"|"none"|null, "state", "reason", "updated_at", "postal": {"id", "token"}|null, "attempts",
"events", "event_at"}]}``. ``attempts`` are the send path's calls; ``events`` the last EVENT_HISTORY
Postal events seen for the recipient (uuid, kind, Postal's time, applied or not), so re-applying an
event is recognised by its uuid even when Redis lost the webhook's dedupe key.

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

Redis, under ``bridge:outbound:`` (``rebuild_index`` restores all but ``pending`` from the store):
``postal:<postal id>`` -> {owner, id, address, token}; ``mid:<sha256 of the Message-ID>`` ->
"<owner>/<msg id>"; ``waiting``: sorted set "<owner>/<msg id>/<address>" -> updated_at of OPEN
recipients; ``pending:<owner>/<msg id>``: hash uuid -> event, kept for recipients whose Postal id is
not recorded yet (applied by record_postal and set_state(uncertain)); ``lock:<owner>/<msg id>``.

Concurrency: events for one message arrive on several threads and processes at once, and the send
path updates the same record. The object store has no compare-and-set overwrite (S3 and the
filesystem offer create-only writes, not If-Match), so every read-modify-write of a record holds a
short Redis lock per message (SET NX PX with a random token, released only by its holder). A holder
that dies frees it after LOCK_SECONDS; a caller that cannot take it in time gets ``OutboundBusy`` (503).
Losing Redis loses pending events only: Postal's retries and the reconciler cover them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from bridge.errors import RedisUnavailable
from bridge.store.index import PREFIX, REDIS_ERRORS, as_text
from bridge.store.objects import ObjectStore

QUEUED, UNCERTAIN, ACCEPTED, DELAYED, HELD = "queued", "uncertain", "accepted", "delayed", "held"
DELIVERED, FAILED, BOUNCED = "delivered", "failed", "bounced"
RANK = {QUEUED: 0, UNCERTAIN: 1, ACCEPTED: 2, DELAYED: 3, HELD: 3, DELIVERED: 4, FAILED: 5, BOUNCED: 5}
FINAL = frozenset({FAILED, BOUNCED})
ROUTES = ("smtp", "mailio", "none")
OPEN = frozenset({UNCERTAIN, ACCEPTED, DELAYED, HELD})  # waiting on Postal: the reconciler's work
WAITING = PREFIX + "outbound:waiting"

INDEX_SECONDS = 30 * 86400  # bounces can come days after Postal's ~31 h of delivery attempts
PENDING_SECONDS = 3 * 86400
LOCK_SECONDS = 30  # above one store read plus write at their timeouts
EVENT_HISTORY = 50  # MessageDelayed fires up to 18 times per message
REASON_CHARS = 300


class NoSuchRecord(KeyError):
    """No outbound record (or no such recipient on it)."""


class OutboundBusy(RedisUnavailable):
    """The message's lock is held longer than the caller may wait: retry later (503)."""


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


class OutboundStore:
    """Outbound records, their Redis indexes and the application of Postal's events."""

    def __init__(self, objects: ObjectStore, connection: redis.Redis, *, lock_wait: float = 2.0) -> None:
        self._objects = objects
        self._redis = connection
        self.lock_wait = lock_wait

    # --- the send path ----------------------------------------------------------------------

    def create(self, owner: str, msg_id: str, message_id: str, recipients: Iterable[str]) -> dict[str, Any]:
        """Create the record (create-only: a retry gets the stored one), every recipient ``queued``.

        Recipients are collapsed case-insensitively, the first spelling kept. ``message_id`` is the
        Message-ID header the bridge set in what it sends (Postal reports it back in every event).
        """
        now = time.time()
        seen: dict[str, dict[str, Any]] = {}
        for address in recipients:
            seen.setdefault(address.strip().lower(), _recipient(address.strip(), now))
        if not seen:
            raise ValueError("no recipients")
        record: dict[str, Any] = {"owner": owner, "id": msg_id, "message_id": normalize_message_id(message_id)}
        record |= {"created_at": now, "updated_at": now, "recipients": list(seen.values())}
        if not self._objects.create(_key(owner, msg_id), _dump(record)):
            stored = self.get(owner, msg_id)
            record = stored if stored is not None else record
        self._index(record)
        return record

    def get(self, owner: str, msg_id: str) -> dict[str, Any] | None:
        data = self._objects.get(_key(owner, msg_id))
        return json.loads(data) if data else None

    def set_route(self, owner: str, msg_id: str, address: str, route: str, *, reason: str | None = None) -> dict:
        """Record the route discovery chose; ``none`` fails the recipient with ``reason`` (permanent)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}")

        def change(record: dict[str, Any]) -> None:
            entry = _entry(record, address)
            entry["route"] = route
            if route == "none":
                _move(entry, FAILED, reason or "no mail service for this domain")
            elif reason is not None and may_move(entry["state"], QUEUED):
                _move(entry, QUEUED, reason)

        return self._update(owner, msg_id, change)

    def set_state(self, owner: str, msg_id: str, address: str, state: str, reason: str | None = None) -> bool:
        """Move one recipient if ``may_move`` allows; True if it moved. ``uncertain`` also applies the
        events kept for it, matched by its address (the Postal id was never learnt)."""
        if state not in RANK:
            raise ValueError(f"unknown state {state!r}")
        moved: list[bool] = []

        def change(record: dict[str, Any]) -> None:
            entry = _entry(record, address)
            moved.append(may_move(entry["state"], state))
            if moved[0]:
                _move(entry, state, reason)
            if state == UNCERTAIN and entry["postal"] is None:
                self._drain_pending(record, lambda e: e.to.lower() == entry["address"].lower())

        self._update(owner, msg_id, change)
        return moved[0]

    def start_attempt(self, owner: str, msg_id: str, addresses: Iterable[str]) -> int:
        """Note, before calling Postal, that these recipients are being sent: returns the attempt number.

        A crash leaves the attempt ``sending``: the caller must then treat it as ``uncertain``, not resend.
        """
        numbers: list[int] = []
        wanted = [a.lower() for a in addresses]

        def change(record: dict[str, Any]) -> None:
            number = 1 + max((a["n"] for r in record["recipients"] for a in r["attempts"]), default=0)
            numbers.append(number)
            for address in wanted:
                _entry(record, address)["attempts"].append(
                    {"n": number, "started_at": time.time(), "ended_at": None, "outcome": "sending", "detail": None}
                )

        self._update(owner, msg_id, change)
        return numbers[0]

    def end_attempt(
        self, owner: str, msg_id: str, addresses: Iterable[str], number: int, outcome: str, detail: str | None = None
    ) -> dict[str, Any]:
        """Record how attempt ``number`` ended (``accepted``, ``refused``, ``temporary``, ``ambiguous``...)."""
        wanted = [a.lower() for a in addresses]

        def change(record: dict[str, Any]) -> None:
            for address in wanted:
                for attempt in _entry(record, address)["attempts"]:
                    if attempt["n"] == number:
                        attempt |= {"ended_at": time.time(), "outcome": outcome, "detail": _cut(detail)}

        return self._update(owner, msg_id, change)

    def record_postal(self, owner: str, msg_id: str, messages: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Postal's send answer ``data.messages`` (``{rcpt: {"id", "token"}}``): ``accepted``, indexed,
        and the events that arrived before this answer was recorded applied now."""
        by_address = {rcpt.strip().lower(): ids for rcpt, ids in messages.items()}

        def change(record: dict[str, Any]) -> None:
            for rcpt, ids in by_address.items():
                entry = _entry(record, rcpt)
                entry["postal"] = {"id": int(ids["id"]), "token": str(ids["token"])}
                if may_move(entry["state"], ACCEPTED):
                    _move(entry, ACCEPTED, None)
            recorded = {int(ids["id"]) for ids in by_address.values()}
            self._drain_pending(record, lambda e: e.postal_id in recorded)

        return self._update(owner, msg_id, change)

    def reopen(self, owner: str, msg_id: str, address: str, reason: str | None = None) -> dict[str, Any]:
        """The owner's explicit resend: back to ``queued`` whatever the state, Postal ids forgotten."""

        def change(record: dict[str, Any]) -> None:
            entry = _entry(record, address)
            entry["postal"] = None
            entry["event_at"] = None
            _move(entry, QUEUED, reason or "resend requested")

        return self._update(owner, msg_id, change)

    # --- lookups and the index ------------------------------------------------------------------

    def find_postal(self, postal_id: int, token: str | None = None) -> Location | None:
        """The recipient Postal's message ``postal_id`` belongs to; None if not ours (or the token differs:
        ids are unique only within one Postal server, and one install signs for all its servers)."""
        raw = self._call(lambda: self._redis.get(f"{PREFIX}outbound:postal:{int(postal_id)}"))
        if raw is None:
            return None
        found = json.loads(raw)
        if token is not None and found.get("token") not in (None, token):
            return None
        return Location(found["owner"], found["id"], found["address"])

    def find_message_id(self, message_id: str) -> tuple[str, str] | None:
        """(owner, msg id) of the message the bridge sent with this Message-ID."""
        raw = self._call(lambda: self._redis.get(_mid_key(message_id)))
        if raw is None:
            return None
        owner, _, msg_id = as_text(raw).partition("/")
        return owner, msg_id

    def waiting(self, updated_before: float, limit: int = 100) -> list[Location]:
        """Recipients left ``uncertain``/``accepted``/``delayed``/``held`` since before ``updated_before``,
        oldest first: what a reconciler asks Postal's message API about (its webhooks stop after ~36 min)."""
        members = self._call(lambda: self._redis.zrangebyscore(WAITING, "-inf", updated_before, start=0, num=limit))
        return [Location(*as_text(m).split("/", 2)) for m in members]

    def rebuild_index(self) -> int:
        """Re-index every record from the store (after Redis lost its data); returns how many."""
        count = 0
        for key in self._objects.list("outbound/"):
            data = self._objects.get(key)
            if data:
                self._index(json.loads(data))
                count += 1
        return count

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
            self._update(owner, msg_id, lambda r: outcome.append(self._event_on(r, _find(r, address), event)))
        except NoSuchRecord:
            return "not_ours"  # an index entry whose record is gone
        return outcome[0]

    def _event_on(self, record: dict[str, Any], entry: dict[str, Any] | None, event: PostalEvent) -> str:
        if entry is None:
            return "not_ours"
        if entry["postal"] is not None:
            # Another Postal copy for this recipient (an ambiguous attempt before an explicit resend)
            # moves nothing: the state follows the copy the bridge recorded.
            return _apply(entry, event) if entry["postal"]["id"] == event.postal_id else "stale"
        if entry["state"] == UNCERTAIN:
            entry["postal"] = {"id": event.postal_id, "token": event.token}  # the evidence: Postal took it
            return _apply(entry, event)
        self._call(lambda: self._keep(record, event))  # the send answer is not recorded yet
        return "kept"

    def _keep(self, record: dict[str, Any], event: PostalEvent) -> None:
        key = _pending_key(record)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, event.uuid, json.dumps(asdict(event)))
        pipe.expire(key, PENDING_SECONDS)
        pipe.execute()

    def _drain_pending(self, record: dict[str, Any], wanted: Callable[[PostalEvent], bool]) -> None:
        """Apply the kept events ``wanted`` picks (in Postal's time order) and forget them."""
        key = _pending_key(record)
        kept = self._call(lambda: self._redis.hgetall(key))
        events = sorted((PostalEvent(**json.loads(v)) for v in kept.values()), key=lambda e: e.at)
        done = []
        for event in filter(wanted, events):
            entry = _find(record, event.to)
            if entry is not None:
                if entry["postal"] is None:
                    entry["postal"] = {"id": event.postal_id, "token": event.token}
                if entry["postal"]["id"] == event.postal_id:
                    _apply(entry, event)
                    done.append(event.uuid)
        if done:
            self._call(lambda: self._redis.hdel(key, *done))

    # --- plumbing -------------------------------------------------------------------------------

    def _update(self, owner: str, msg_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and write one record under its lock; then refresh its Postal ids in the index.

        Raises NoSuchRecord (a KeyError) when the record or a named recipient does not exist."""
        with self._locked(owner, msg_id):
            record = self.get(owner, msg_id)
            if record is None:
                raise NoSuchRecord("no such outbound record")
            before = _dump(record)
            change(record)
            changed = _dump(record) != before
            if changed:
                record["updated_at"] = time.time()
                self._objects.put(_key(owner, msg_id), _dump(record))
        if changed:  # after the store: an index entry never points at a record not yet written
            self._index(record)
        return record

    @contextlib.contextmanager
    def _locked(self, owner: str, msg_id: str) -> Iterator[None]:
        key, token = f"{PREFIX}outbound:lock:{owner}/{msg_id}", secrets.token_hex(8)
        deadline = time.monotonic() + self.lock_wait
        while not self._call(lambda: self._redis.set(key, token, nx=True, px=LOCK_SECONDS * 1000)):
            if time.monotonic() > deadline:
                raise OutboundBusy("outbound record busy")
            time.sleep(0.01)
        try:
            yield
        finally:
            self._call(lambda: self._redis.eval(_RELEASE, 1, key, token))

    def _index(self, record: dict[str, Any]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        if record.get("message_id"):
            pipe.set(_mid_key(record["message_id"]), f"{record['owner']}/{record['id']}", ex=INDEX_SECONDS)
        for entry in record["recipients"]:
            member = f"{record['owner']}/{record['id']}/{entry['address']}"
            if entry["state"] in OPEN:
                pipe.zadd(WAITING, {member: entry["updated_at"]})
            else:
                pipe.zrem(WAITING, member)
            if entry["postal"] is not None:
                where = {"owner": record["owner"], "id": record["id"], "address": entry["address"]}
                value = json.dumps(where | {"token": entry["postal"]["token"]})
                pipe.set(f"{PREFIX}outbound:postal:{entry['postal']['id']}", value, ex=INDEX_SECONDS)
        self._call(pipe.execute)

    @staticmethod
    def _call(operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def public_recipients(record: dict[str, Any]) -> list[dict[str, Any]]:
    """What the owner's API shows of each recipient (attempts and Postal's event history stay inside)."""
    names = ("address", "route", "state", "reason", "updated_at", "postal")
    return [{name: entry[name] for name in names} for entry in record["recipients"]]


def _apply(entry: dict[str, Any], event: PostalEvent) -> str:
    """Apply ``event`` to one recipient entry: ``applied``, or ``stale`` if it may not move it."""
    if any(seen["uuid"] == event.uuid for seen in entry["events"]):
        return "duplicate"  # applied before (Redis lost the dedupe key, or a crash before it was set)
    last = entry.get("event_at")
    older = last is not None and event.at < last and RANK[event.state] == RANK[entry["state"]]
    applied = may_move(entry["state"], event.state) and not older
    entry["events"] = [*entry["events"], {"uuid": event.uuid, "kind": event.kind, "at": event.at, "applied": applied}]
    entry["events"] = entry["events"][-EVENT_HISTORY:]
    if not applied:
        return "stale"
    _move(entry, event.state, event.reason)
    entry["event_at"] = event.at
    return "applied"


def _move(entry: dict[str, Any], state: str, reason: str | None) -> None:
    entry.update(state=state, reason=_cut(reason), updated_at=time.time())


def _recipient(address: str, now: float) -> dict[str, Any]:
    fields = {"address": address, "route": None, "state": QUEUED, "reason": None, "updated_at": now}
    return fields | {"postal": None, "attempts": [], "events": [], "event_at": None}


def _find(record: dict[str, Any], address: str) -> dict[str, Any] | None:
    wanted = address.strip().lower()
    return next((r for r in record["recipients"] if r["address"].lower() == wanted), None)


def _entry(record: dict[str, Any], address: str) -> dict[str, Any]:
    entry = _find(record, address)
    if entry is None:
        raise NoSuchRecord("no such recipient on this message")
    return entry


def _cut(text: str | None) -> str | None:
    return text[:REASON_CHARS] if text else text


def _key(owner: str, msg_id: str) -> str:
    return f"outbound/{owner}/{msg_id}.json"


def _mid_key(message_id: str) -> str:
    digest = hashlib.sha256(normalize_message_id(message_id).encode()).hexdigest()[:40]
    return f"{PREFIX}outbound:mid:{digest}"


def _pending_key(record: dict[str, Any]) -> str:
    return f"{PREFIX}outbound:pending:{record['owner']}/{record['id']}"


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
