"""Persistence of outbound records: the object store holds them, Redis indexes and locks them.

System of record: ``outbound/<owner address>/<msg id>.json``: ``{"owner", "id", "message_id" (the
Message-ID the bridge set, without <>), "created_at", "updated_at", "recipients": [entry, ...]}`` with
the entries ``bridge.store.outbound_states`` describes.

Redis, under ``bridge:outbound:`` (``OutboundStore.rebuild_index`` restores all but ``pending`` from the
store): ``postal:<postal id>`` -> {owner, id, address, token}; ``mid:<sha256 of the Message-ID>`` ->
"<owner>/<msg id>"; ``waiting``: sorted set "<owner>/<msg id>/<address>" -> updated_at of OPEN
recipients; ``pending:<owner>/<msg id>``: hash uuid -> event, kept for recipients whose Postal id is
not recorded yet; ``lock:<owner>/<msg id>``.

Concurrency: events for one message arrive on several threads and processes at once, and the send
path updates the same record. The object store has no compare-and-set overwrite (S3 and the
filesystem offer create-only writes, not If-Match), so every read-modify-write of a record holds a
short Redis lock per message (SET NX PX with a random token, released only by its holder). A holder
that dies frees it after LOCK_SECONDS; a caller that cannot take it in time gets ``OutboundBusy`` (503).
Losing Redis loses pending events only: Postal's retries and the reconciler cover them.

Cost: one update is one store read and one write of the whole record, and one Redis pipeline for the
entries whose indexed fields changed. Callers batch: a 1,000-recipient message is routed in one update
and handed to Postal in two updates per 50-recipient call, never one update per recipient.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import redis

from bridge.errors import RedisUnavailable
from bridge.store.index import PREFIX, REDIS_ERRORS, as_text
from bridge.store.objects import ObjectStore
from bridge.store.outbound_states import OPEN, Location, NoSuchRecord, PostalEvent, normalize_message_id

WAITING = PREFIX + "outbound:waiting"
INDEX_SECONDS = 30 * 86400  # bounces can come days after Postal's ~31 h of delivery attempts
PENDING_SECONDS = 3 * 86400
LOCK_SECONDS = 30  # above one store read plus write at their timeouts


class OutboundBusy(RedisUnavailable):
    """The message's lock is held longer than the caller may wait: retry later (503)."""


class RecordStore:
    """Read, create and change outbound records under their lock, keeping the Redis indexes in step."""

    def __init__(self, objects: ObjectStore, connection: redis.Redis, *, lock_wait: float = 2.0) -> None:
        self.objects = objects
        self.redis = connection
        self.lock_wait = lock_wait

    def get(self, owner: str, msg_id: str) -> dict[str, Any] | None:
        data = self.objects.get(record_key(owner, msg_id))
        return json.loads(data) if data else None

    def create(self, record: dict[str, Any]) -> dict[str, Any]:
        """Store ``record`` unless it exists (create-only: a retry gets the stored one); index it."""
        if not self.objects.create(record_key(record["owner"], record["id"]), dump(record)):
            stored = self.get(record["owner"], record["id"])
            record = stored if stored is not None else record
        self.index(record)
        return record

    def update(self, owner: str, msg_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and write one record under its lock; then refresh the index of what changed.

        Raises NoSuchRecord (a KeyError) when the record or a named recipient does not exist."""
        with self.locked(owner, msg_id) as pipe:
            record = self.get(owner, msg_id)
            if record is None:
                raise NoSuchRecord("no such outbound record")
            # Two serialisations of the record, not three: its own ``updated_at`` is left out of the
            # comparison and appended to what is written (a 1,000-recipient record is ~1 MB of JSON).
            stamp = record.pop("updated_at", None)
            before = dump(record)
            marks = [_indexed(entry) for entry in record["recipients"]]
            change(record)
            after = dump(record)
            changed = after != before
            record["updated_at"] = time.time() if changed else stamp
            if changed:
                stamped = after[:-1] + b',"updated_at":' + json.dumps(record["updated_at"]).encode() + b"}"
                self.objects.put(record_key(owner, msg_id), stamped)
                # Queued after the store's write (an index entry never points at a record not yet
                # written), sent with the lock's release: one round trip.
                moved = [e for e, mark in zip(record["recipients"], marks, strict=True) if _indexed(e) != mark]
                self.index(record, moved, pipe)
        return record

    @contextlib.contextmanager
    def locked(self, owner: str, msg_id: str) -> Iterator[Any]:
        """Hold the message's lock; yields a pipeline whose commands are sent with the release."""
        key, token = f"{PREFIX}outbound:lock:{owner}/{msg_id}", secrets.token_hex(8)
        deadline = time.monotonic() + self.lock_wait
        while not self.call(lambda: self.redis.set(key, token, nx=True, px=LOCK_SECONDS * 1000)):
            if time.monotonic() > deadline:
                raise OutboundBusy("outbound record busy")
            time.sleep(0.01)
        pipe = self.redis.pipeline(transaction=False)
        try:
            yield pipe
        except BaseException:
            self.call(lambda: self.redis.eval(_RELEASE, 1, key, token))
            raise
        pipe.eval(_RELEASE, 1, key, token)
        self.call(pipe.execute)

    def index(self, record: dict[str, Any], entries: list[dict[str, Any]] | None = None, pipe: Any = None) -> None:
        """Index ``entries`` (default: every recipient) and the record's Message-ID: in one pipeline of its
        own, or queued on ``pipe`` for its owner to send."""
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        if record.get("message_id"):
            pipe.set(mid_key(record["message_id"]), f"{record['owner']}/{record['id']}", ex=INDEX_SECONDS)
        for entry in record["recipients"] if entries is None else entries:
            member = f"{record['owner']}/{record['id']}/{entry['address']}"
            if entry["state"] in OPEN:
                pipe.zadd(WAITING, {member: entry["updated_at"]})
            else:
                pipe.zrem(WAITING, member)
            if entry["postal"] is not None:
                where = {"owner": record["owner"], "id": record["id"], "address": entry["address"]}
                value = json.dumps(where | {"token": entry["postal"]["token"]})
                pipe.set(f"{PREFIX}outbound:postal:{entry['postal']['id']}", value, ex=INDEX_SECONDS)
        if own:
            self.call(pipe.execute)

    # --- lookups ------------------------------------------------------------------------------------

    def find_postal(self, postal_id: int, token: str | None) -> Location | None:
        raw = self.call(lambda: self.redis.get(f"{PREFIX}outbound:postal:{int(postal_id)}"))
        if raw is None:
            return None
        found = json.loads(raw)
        if token is not None and found.get("token") not in (None, token):
            return None
        return Location(found["owner"], found["id"], found["address"])

    def find_message_id(self, message_id: str) -> tuple[str, str] | None:
        raw = self.call(lambda: self.redis.get(mid_key(message_id)))
        if raw is None:
            return None
        owner, _, msg_id = as_text(raw).partition("/")
        return owner, msg_id

    def waiting(self, updated_before: float, limit: int) -> list[Location]:
        members = self.call(lambda: self.redis.zrangebyscore(WAITING, "-inf", updated_before, 0, limit))
        return [Location(*as_text(m).split("/", 2)) for m in members]

    def rebuild_index(self) -> int:
        count = 0
        for key in self.objects.list("outbound/"):
            data = self.objects.get(key)
            if data:
                self.index(json.loads(data))
                count += 1
        return count

    # --- events kept until their recipient's Postal id is recorded ---------------------------------

    def keep(self, record: dict[str, Any], event: PostalEvent) -> None:
        key = pending_key(record)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, event.uuid, json.dumps(asdict(event)))
        pipe.expire(key, PENDING_SECONDS)
        self.call(pipe.execute)

    def kept(self, record: dict[str, Any]) -> list[PostalEvent]:
        """The events kept for ``record``, in Postal's time order."""
        kept = self.call(lambda: self.redis.hgetall(pending_key(record)))
        return sorted((PostalEvent(**json.loads(v)) for v in kept.values()), key=lambda e: e.at)

    def forget(self, record: dict[str, Any], uuids: list[str]) -> None:
        if uuids:
            self.call(lambda: self.redis.hdel(pending_key(record), *uuids))

    @staticmethod
    def call(operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _indexed(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What the index holds of an entry: a change here means its index entries must be rewritten."""
    postal = entry["postal"]
    return entry["state"], entry["updated_at"], None if postal is None else (postal["id"], postal["token"])


def record_key(owner: str, msg_id: str) -> str:
    return f"outbound/{owner}/{msg_id}.json"


def mid_key(message_id: str) -> str:
    digest = hashlib.sha256(normalize_message_id(message_id).encode()).hexdigest()[:40]
    return f"{PREFIX}outbound:mid:{digest}"


def pending_key(record: dict[str, Any]) -> str:
    return f"{PREFIX}outbound:pending:{record['owner']}/{record['id']}"


def dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
