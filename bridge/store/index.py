"""The mailbox index in Redis: folders, listing, and the queue of messages waiting to be filed.

Everything here can be rebuilt from the object store (``rebuild``), so losing Redis loses no
mail. Keys (all under ``bridge:``)::

    idx:<address>:<folder>   sorted set: message id -> received time (newest first when listing)
    rec:<address>            hash: message id -> the message record as stored (JSON)
    inbound:unfiled          sorted set: "<address>/<id>" -> received time; the filing job's work
    inbound:drain            flag: a filing job is queued or running
    jobs:<name>              the RQ id of the latest job of a kind queued (the sweeper checks it is alive)
    inbound:recheck          sorted set: "<address>/<id>" -> when to ask DNS again (SPF/DMARC temperror)
    inbound:recheck-tries    hash: "<address>/<id>" -> how many re-evaluations already ran
    epoch                    set once by the worker's sweeper; absent means Redis lost its data

The inbound request path talks to Redis once (``note_received``); filing happens in batches in
the worker, because one RQ job per message costs more than the whole request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from bridge.errors import RedisUnavailable
from bridge.store.messages import STATUS_RECEIVED

PREFIX = "bridge:"
UNFILED = PREFIX + "inbound:unfiled"
DRAIN_FLAG = PREFIX + "inbound:drain"
DRAIN_FLAG_SECONDS = 120
JOB_IDS = PREFIX + "jobs:"
FILING = "filing"
RECHECK = PREFIX + "inbound:recheck"
RECHECK_TRIES = PREFIX + "inbound:recheck-tries"
EPOCH = PREFIX + "epoch"
REBUILD_LOCK = PREFIX + "rebuild-lock"

REDIS_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ResponseError,
)


def as_text(value: Any) -> str:
    """redis-py answers bytes (we never set decode_responses); its types say bytes or str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _folder_key(address: str, folder: str) -> str:
    return f"{PREFIX}idx:{address}:{folder}"


def _records_key(address: str) -> str:
    return f"{PREFIX}rec:{address}"


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


class MailIndex:
    """Folder listings and the filing queue; every method maps Redis failures to RedisUnavailable."""

    def __init__(self, connection: redis.Redis) -> None:
        self._redis = connection

    # --- the inbound request path ----------------------------------------------------------

    def note_received(self, address: str, msg_id: str, received_at: float, record: bytes | None = None) -> bool:
        """Queue a stored message for filing, in one round trip.

        ``record``, the initial record as stored, is kept beside the index so the filing job reads
        a whole batch from Redis instead of one object per message (the store stays the truth).
        Returns True when no filing job is queued yet, so the caller must enqueue one.
        """
        try:
            pipe = self._redis.pipeline(transaction=False)
            if record is not None:
                pipe.hsetnx(_records_key(address), msg_id, record)
            pipe.zadd(UNFILED, {f"{address}/{msg_id}": received_at}, nx=True)
            pipe.set(DRAIN_FLAG, "1", nx=True, ex=DRAIN_FLAG_SECONDS)
            flag_was_set = pipe.execute()[-1]
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return bool(flag_was_set)

    # --- the filing job -----------------------------------------------------------------------

    def unfiled(self, limit: int) -> list[tuple[str, str]]:
        """The oldest messages waiting to be filed, as (address, id)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.expire(DRAIN_FLAG, DRAIN_FLAG_SECONDS)
            pipe.zrange(UNFILED, 0, limit - 1)
            members = pipe.execute()[-1]
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        pairs = []
        for member in members:
            address, _, msg_id = as_text(member).partition("/")
            pairs.append((address, msg_id))
        return pairs

    def release_drain(self) -> bool:
        """Called by a filing job that found nothing left: drop the flag, then look once more.

        Returns True if work arrived meanwhile and this job took the flag back (keep going).
        Ingest does ZADD-then-SET-NX and we do DEL-then-ZCARD-then-SET-NX, so every message
        is seen either by this job or by a job the request enqueues.
        """
        try:
            self._redis.delete(DRAIN_FLAG)
            if self._redis.zcard(UNFILED) == 0:
                return False
            return bool(self._redis.set(DRAIN_FLAG, "1", nx=True, ex=DRAIN_FLAG_SECONDS))
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def file(self, filed: Iterable[tuple[dict[str, Any], str | None]]) -> None:
        """Write records into their folders in one round trip: (record, previous folder or None)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for record, previous in filed:
                address, msg_id = record["mailbox"], record["id"]
                if previous and previous != record["folder"]:
                    pipe.zrem(_folder_key(address, previous), msg_id)
                if record["status"] != STATUS_RECEIVED:
                    pipe.zadd(_folder_key(address, record["folder"]), {msg_id: record["received_at"]})
                    pipe.zrem(UNFILED, f"{address}/{msg_id}")
                else:
                    pipe.zadd(UNFILED, {f"{address}/{msg_id}": record["received_at"]}, nx=True)
                pipe.hset(_records_key(address), msg_id, _dump(record))
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def unfiled_count(self) -> int:
        try:
            return int(self._redis.zcard(UNFILED))
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def note_job(self, name: str, job_id: str) -> None:
        """Remember the latest job of a kind; for filing, hold the drain flag too (deliveries then queue none)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(JOB_IDS + name, job_id, ex=7 * 86400)
            if name == FILING:
                pipe.set(DRAIN_FLAG, "1", ex=DRAIN_FLAG_SECONDS)
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def noted_job(self, name: str) -> str | None:
        try:
            value = self._redis.get(JOB_IDS + name)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return as_text(value) if value is not None else None

    def forget_unfiled(self, address: str, msg_id: str) -> None:
        try:
            self._redis.zrem(UNFILED, f"{address}/{msg_id}")
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    # --- SPF/DMARC verdicts to ask DNS for again (temperror) ---------------------------------

    def schedule_rechecks(self, items: Iterable[tuple[str, str, int, float]]) -> None:
        """(address, id, re-evaluations done so far, when the next is due), in one round trip."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for address, msg_id, tries, due in items:
                member = f"{address}/{msg_id}"
                pipe.zadd(RECHECK, {member: due})
                pipe.hset(RECHECK_TRIES, member, tries)
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def due_rechecks(self, now: float, limit: int) -> list[tuple[str, str, int]]:
        """Messages whose re-evaluation is due: (address, id, re-evaluations done so far), oldest first."""
        try:
            members: list[Any] = list(self._redis.zrangebyscore(RECHECK, "-inf", now, start=0, num=limit))
            tries = self._redis.hmget(RECHECK_TRIES, members) if members else []
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        due = []
        for member, count in zip(members, tries, strict=True):
            address, _, msg_id = as_text(member).partition("/")
            due.append((address, msg_id, int(count or 0)))
        return due

    def drop_rechecks(self, pairs: Iterable[tuple[str, str]]) -> None:
        members = [f"{address}/{msg_id}" for address, msg_id in pairs]
        if not members:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(RECHECK, *members)
            pipe.hdel(RECHECK_TRIES, *members)
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    # --- noticing that Redis lost its data ------------------------------------------------------

    def epoch(self) -> str | None:
        """The marker the sweeper sets after a complete index; None when Redis lost it (or is new)."""
        try:
            value = self._redis.get(EPOCH)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return as_text(value) if value is not None else None

    def set_epoch(self, value: str) -> None:
        try:
            self._redis.set(EPOCH, value)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def take_rebuild_lock(self, owner: str, seconds: int) -> bool:
        """One process rebuilds at a time; the lock expires on its own if that process dies."""
        try:
            return bool(self._redis.set(REBUILD_LOCK, owner, nx=True, ex=seconds))
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def release_rebuild_lock(self, owner: str) -> None:
        try:
            if self._redis.get(REBUILD_LOCK) == owner.encode():
                self._redis.delete(REBUILD_LOCK)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    # --- the owner's read side ----------------------------------------------------------------

    def listing(
        self, address: str, folder: str, *, limit: int, before: float | None = None
    ) -> tuple[list[dict[str, Any]], float | None]:
        """Records of one folder, newest first; returns (records, cursor for the next page or None)."""
        maximum = f"({before!r}" if before is not None else "+inf"
        try:
            rows = self._redis.zrange(
                _folder_key(address, folder),
                maximum,
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=limit + 1,
                withscores=True,
            )
            page, more = rows[:limit], len(rows) > limit
            raw = self._redis.hmget(_records_key(address), [row[0] for row in page]) if page else []
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        records = [json.loads(r) for r in raw if r is not None]
        cursor = float(page[-1][1]) if more and page else None
        return records, cursor

    def records(self, pairs: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
        """The indexed records of (address, id) pairs, in order, in one round trip (None if absent)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for address, msg_id in pairs:
                pipe.hget(_records_key(address), msg_id)
            raw = pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return [json.loads(r) if r else None for r in raw]

    # --- rebuilding from the object store -----------------------------------------------------

    def clear_mailbox(self, address: str, folders: Iterable[str]) -> None:
        try:
            self._redis.delete(_records_key(address), *(_folder_key(address, f) for f in folders))
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
