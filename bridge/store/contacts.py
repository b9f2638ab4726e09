"""Who each owner has written to: replies to people you wrote to are never screened.

The outbound path records a contact for every recipient an owner sends to; screening asks.
System of record: ``contacts/<owner>/<hex of the sender's e-mail lookup hash>.json`` (no plain
addresses). Redis caches the set per owner (``contacts:<owner>``, complete once
``contacts:<owner>:loaded`` exists) and is rebuilt from the store when it lost it.

Computing a lookup hash costs a scrypt, so the send path asks first, in one round trip, whether it
recorded these addresses already (``contacts:<owner>:sent``: truncated SHA-256 digests of the
lower-cased addresses, a hint only: when Redis lost it, the contacts job just runs again).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable

import redis

from bridge.errors import RedisUnavailable
from bridge.store.index import PREFIX, REDIS_ERRORS
from bridge.store.objects import ObjectStore


def _name(email_hash: str) -> str:
    return base64.b64decode(email_hash).hex()


class ContactBook:
    def __init__(self, objects: ObjectStore, connection: redis.Redis) -> None:
        self._objects = objects
        self._redis = connection

    def record(self, owner_address: str, email_hash: str) -> None:
        self.record_many(owner_address, [email_hash])

    def record_many(self, owner_address: str, email_hashes: Iterable[str]) -> int:
        """Record contacts in one pass: those already known cost one Redis round trip in all, each new
        one one store write (the system of record) and all of them one Redis write. Returns how many
        were new. Safe to repeat."""
        hashes = set(email_hashes)
        new = sorted(hashes - self.known(owner_address, hashes))
        since = json.dumps({"since": time.time()}).encode()
        for email_hash in new:
            self._objects.put(f"contacts/{owner_address}/{_name(email_hash)}.json", since)
        if new:
            try:
                self._redis.sadd(self._key(owner_address), *(_name(h) for h in new))
            except REDIS_ERRORS as exc:
                raise RedisUnavailable("redis unavailable") from exc
        return len(new)

    def known(self, owner_address: str, email_hashes: Iterable[str]) -> set[str]:
        """The subset of ``email_hashes`` the owner has written to."""
        hashes = list(dict.fromkeys(email_hashes))
        if not hashes:
            return set()
        key = self._key(owner_address)
        try:
            if not self._redis.exists(key + ":loaded"):
                self.reload(owner_address)
            flags = self._redis.smismember(key, [_name(h) for h in hashes])
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return {h for h, flag in zip(hashes, flags, strict=True) if flag}

    def reload(self, owner_address: str) -> None:
        names = [k.rsplit("/", 1)[1].removesuffix(".json") for k in self._objects.list(f"contacts/{owner_address}/")]
        key = self._key(owner_address)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key)
            if names:
                pipe.sadd(key, *names)
            pipe.set(key + ":loaded", "1")
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc

    def unrecorded(self, owner_address: str, addresses: Iterable[str]) -> list[str]:
        """The ``addresses`` the send path has not recorded as contacts yet (one Redis round trip)."""
        wanted = list(dict.fromkeys(a.lower() for a in addresses))
        if not wanted:
            return []
        try:
            flags = self._redis.smismember(self._key(owner_address) + ":sent", [_digest(a) for a in wanted])
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return [address for address, flag in zip(wanted, flags, strict=True) if not flag]

    def mark_recorded(self, owner_address: str, addresses: Iterable[str]) -> None:
        """Note that ``addresses`` are recorded (after ``record_many``), so the send path skips them."""
        digests = {_digest(a.lower()) for a in addresses}
        if digests:
            try:
                self._redis.sadd(self._key(owner_address) + ":sent", *digests)
            except REDIS_ERRORS as exc:
                raise RedisUnavailable("redis unavailable") from exc

    @staticmethod
    def _key(owner_address: str) -> str:
        return f"{PREFIX}contacts:{owner_address}"


def _digest(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()[:32]
