"""Handshakes as their owners signed them, and the caches screening reads them through.

System of record: ``handshakes/<owner address>/<handshake id>.json`` in the object store, the
wire document exactly as signed (so anyone can verify it again). Redis caches, all rebuildable:

    hs:<owner>            hash: handshake id -> status     (``hs:<owner>:loaded`` marks it complete)
    ehash:<keyed digest>  the sender's e-mail lookup hash (scrypt: ~120 ms, so computed once per sender)

The e-mail hash cache is keyed by an HMAC of the address under a server secret, never by the
plain address, so Redis holds no list of who writes to whom.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import string
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import redis

from bridge.errors import RedisUnavailable
from bridge.mailio.handshakes import (
    MAX_FUTURE_MS,
    Handshake,
    HandshakeError,
    from_the_future,
    newer,
    parse_signed_handshake,
)
from bridge.mailio.identity import email_lookup_hash
from bridge.store.index import PREFIX, REDIS_ERRORS, as_text
from bridge.store.objects import ObjectStore

CREATED, REPLACED, UNCHANGED = "created", "replaced", "unchanged"
EMAIL_HASH_TTL = 90 * 86400


class StaleHandshake(Exception):
    """A document older than the one stored: a replay must not undo a newer decision."""


class HandshakeStore:
    def __init__(self, objects: ObjectStore, connection: redis.Redis) -> None:
        self._objects = objects
        self._redis = connection

    def put(self, owner_address: str, handshake: Handshake) -> str:
        """Store a verified handshake unless a newer one for the same id is stored already.

        A stored document dated more than MAX_FUTURE_MS ahead of our clock (accepted before uploads were
        checked for that) does not count as newer: it would otherwise outrank every honest document for
        good. The same check refuses such a document here, whoever parsed it.
        """
        if from_the_future(handshake):
            raise HandshakeError(400, f"content.created is more than {MAX_FUTURE_MS // 60_000} minutes in the future")
        key = self._key(owner_address, handshake.handshake_id)
        document = json.dumps(handshake.to_document(), separators=(",", ":"), sort_keys=True).encode()
        for _ in range(2):
            current = self._load(key)
            if current is None:
                if self._objects.create(key, document):
                    return self._cache(owner_address, handshake, CREATED)
                continue  # lost a race with another upload: compare with what it stored
            if current.cbor_payload == handshake.cbor_payload and current.signature == handshake.signature:
                return UNCHANGED
            if not newer(handshake, current) and not from_the_future(current):
                raise StaleHandshake("an equal or newer handshake for this sender is stored")
            self._objects.put(key, document)
            return self._cache(owner_address, handshake, REPLACED)
        # The object exists but does not load: damaged, and a damaged object never grants anything, so the
        # owner's signed document replaces it (it used to recurse here until the stack ran out: a 503).
        self._objects.put(key, document)
        return self._cache(owner_address, handshake, REPLACED)

    def _cache(self, owner_address: str, handshake: Handshake, result: str) -> str:
        try:
            self._redis.hset(self._cache_key(owner_address), handshake.handshake_id, handshake.status)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return result

    def get(self, owner_address: str, handshake_id: str) -> Handshake | None:
        """One stored handshake by id (None if absent or damaged): what a peer's handshake look-up reads."""
        return self._load(self._key(owner_address, handshake_id))

    def all(self, owner_address: str) -> list[Handshake]:
        handshakes = []
        for key in self._objects.list(f"handshakes/{owner_address}/"):
            handshake = self._load(key)
            if handshake is not None:
                handshakes.append(handshake)
        return sorted(handshakes, key=lambda h: h.created, reverse=True)

    def statuses(self, owner_address: str, handshake_ids: Iterable[str]) -> dict[str, str]:
        """Status per handshake id (absent ids have none), from the cache, loading it if Redis lost it."""
        ids = list(dict.fromkeys(handshake_ids))
        if not ids:
            return {}
        cache = self._cache_key(owner_address)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(cache + ":loaded")
            pipe.hmget(cache, ids)
            loaded, values = pipe.execute()
            if not loaded:
                self.reload(owner_address)
                values = self._redis.hmget(cache, ids)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return {i: as_text(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def reload(self, owner_address: str) -> int:
        """Rebuild one owner's status cache from the object store."""
        handshakes = self.all(owner_address)
        cache = self._cache_key(owner_address)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(cache)
            if handshakes:
                pipe.hset(cache, mapping={h.handshake_id: h.status for h in handshakes})
            pipe.set(cache + ":loaded", "1")
            pipe.execute()
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return len(handshakes)

    def _load(self, key: str) -> Handshake | None:
        data = self._objects.get(key)
        if data is None:
            return None
        try:
            # stored=True: a document dated in the future must still load, so that put() can replace it.
            return parse_signed_handshake(json.loads(data), stored=True)
        except (HandshakeError, ValueError, RecursionError):
            return None  # a damaged object never grants anything

    @staticmethod
    def _key(owner_address: str, handshake_id: str) -> str:
        return f"handshakes/{owner_address}/{handshake_id}.json"

    @staticmethod
    def _cache_key(owner_address: str) -> str:
        return f"{PREFIX}hs:{owner_address}"


OFFER_SECONDS = 300
_OFFER_ALPHABET = string.ascii_letters


class HandshakeOffers:
    """Single-use nonces an owner hands out so a Mailio sender can ask for a handshake (mailio.md §4).

    ``<16 letters>:<server domain>:<owner address>``, from the OS CSPRNG, valid five minutes,
    consumed atomically (GETDEL) so a nonce can be redeemed once.
    """

    def __init__(self, connection: redis.Redis, domain: str) -> None:
        self._redis = connection
        self._domain = domain

    def create(self, owner_address: str) -> dict[str, object]:
        nonce = "".join(secrets.choice(_OFFER_ALPHABET) for _ in range(16))
        try:
            self._redis.set(f"{PREFIX}offer:{nonce}", owner_address, ex=OFFER_SECONDS, nx=True)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return {
            "offer": f"{nonce}:{self._domain}:{owner_address}",
            "nonce": nonce,
            "expires_at": time.time() + OFFER_SECONDS,
        }

    def redeem(self, nonce: str) -> str | None:
        """The owner the nonce was issued to, once; None if unknown, expired or already used."""
        if len(nonce) != 16 or not nonce.isascii() or not nonce.isalpha():
            return None
        try:
            owner = self._redis.getdel(f"{PREFIX}offer:{nonce}")
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        return as_text(owner) if owner else None


class SenderHashes:
    """E-mail lookup hashes, computed once per sender and cached under a keyed digest."""

    def __init__(self, objects: ObjectStore, connection: redis.Redis) -> None:
        self._objects = objects
        self._redis = connection
        self._secret: bytes | None = None
        self._lock = threading.Lock()
        self.computed = 0  # scrypt runs by this process (the benchmark reports it)

    def _server_secret(self) -> bytes:
        with self._lock:
            if self._secret is None:
                key = "server/cache-key.json"
                self._objects.create(key, json.dumps({"key": secrets.token_hex(32)}).encode())
                self._secret = bytes.fromhex(json.loads(self._objects.get(key) or b"{}")["key"])
            return self._secret

    def _cache_key(self, email: str) -> str:
        digest = hmac.new(self._server_secret(), email.lower().encode(), hashlib.sha256).digest()
        return f"{PREFIX}ehash:{base64.urlsafe_b64encode(digest[:18]).decode()}"

    def lookup_hashes(self, emails: Iterable[str]) -> dict[str, str]:
        """E-mail -> lookup hash for every address, one Redis round trip for the cached ones."""
        unique = list(dict.fromkeys(e.lower() for e in emails))
        if not unique:
            return {}
        keys = [self._cache_key(e) for e in unique]
        try:
            cached = self._redis.mget(keys)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        result = {email: as_text(value) for email, value in zip(unique, cached, strict=True) if value is not None}
        new = [(email, key) for email, key, value in zip(unique, keys, cached, strict=True) if value is None]
        # scrypt releases the GIL: new senders hash in parallel, one per core (32 MiB each).
        with ThreadPoolExecutor(max_workers=min(len(new), os.cpu_count() or 1) or 1) as pool:
            hashes = list(pool.map(email_lookup_hash, [email for email, _ in new]))
        missing: dict[str, str] = {}
        for (email, key), value in zip(new, hashes, strict=True):
            result[email] = missing[key] = value
        self.computed += len(new)
        if missing:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for key, value in missing.items():
                    pipe.set(key, value, ex=EMAIL_HASH_TTL)
                pipe.execute()
            except REDIS_ERRORS as exc:
                raise RedisUnavailable("redis unavailable") from exc
        return result
