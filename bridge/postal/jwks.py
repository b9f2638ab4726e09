"""Postal's published signing keys (``/.well-known/jwks.json``): fetched over HTTP, shared through Redis.

Each web process fetches the JWKS itself (signatures.PostalKeyring decides when). The last document any
process fetched successfully is also kept in Redis, so that a process that cannot reach Postal right now
(started after Postal's web host went down, or after a failed refetch) checks signatures with the keys
the others have, instead of answering 503 while they answer 200. Redis down: each process keeps its own
copy, as before. The key is per JWKS URL, so changing BRIDGE_POSTAL_URL never reuses another install's keys.

Redis is trusted here as it is for the queues: whoever can write to it could publish a key. The document
is parsed again on every load (KIDs recomputed from the keys, never taken from the document).

This module never parses keys (signatures.py does) and never puts document bytes into messages or logs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import redis
import requests

__all__ = ["MAX_JWKS_BYTES", "JwksUnavailable", "SharedJwks", "fetch_jwks"]

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 256 * 1024
_KEY_PREFIX = "bridge:postal:jwks:"
# Redis unreachable, timing out or refusing: the shared copy is an optimisation, never a reason to fail.
_REDIS_FAILURES = (redis.RedisError, OSError)


class JwksUnavailable(Exception):
    """The JWKS could not be fetched (unreachable, HTTP error, too large); the message says why, briefly."""


def fetch_jwks(session: requests.Session, url: str, timeout: float) -> bytes:
    """The JWKS document's bytes, read with a size cap. Raises JwksUnavailable."""
    try:
        with session.get(url, timeout=timeout, stream=True, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise JwksUnavailable(f"JWKS answered HTTP {response.status_code}")
            raw = bytearray()
            for chunk in response.iter_content(chunk_size=16384):
                raw += chunk
                if len(raw) > MAX_JWKS_BYTES:
                    raise JwksUnavailable("JWKS document too large")
    except requests.RequestException as exc:
        raise JwksUnavailable(f"JWKS request failed ({type(exc).__name__})") from None
    return bytes(raw)


class SharedJwks:
    """The last good JWKS document of one URL, in Redis: ``bridge:postal:jwks:<digest of the URL>``.

    ``connect`` returns the Redis client; it is called on first use, so a process that never needs the
    shared copy never needs Redis for it. Every Redis failure is logged and treated as "no shared copy".
    """

    def __init__(self, connect: Callable[[], redis.Redis], url: str) -> None:
        self._connect = connect
        self._key = _KEY_PREFIX + hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]

    def store(self, document: bytes, fetched_at: float) -> None:
        """Keep ``document`` (fetched and parsed successfully at ``fetched_at``, epoch seconds).

        No expiry: this is the last good set, worth more than none however old; a newer fetch replaces it.
        A slower process never overwrites a newer document with an older one.
        """
        try:
            connection = self._connect()
            current = connection.hget(self._key, "fetched_at")
            if current is not None and float(current) > fetched_at:
                return
            connection.hset(self._key, mapping={"document": document, "fetched_at": repr(fetched_at)})
        except _REDIS_FAILURES as exc:
            log.warning("could not share Postal's JWKS through Redis (%s)", type(exc).__name__)

    def load(self) -> tuple[bytes, float] | None:
        """(document, fetched_at) of the last good fetch by any process, or None (none, or Redis down)."""
        try:
            document, fetched_at = self._connect().hmget(self._key, ["document", "fetched_at"])
        except _REDIS_FAILURES as exc:
            log.warning("could not read the shared Postal JWKS from Redis (%s)", type(exc).__name__)
            return None
        if document is None or fetched_at is None:
            return None
        try:
            return (document if isinstance(document, bytes) else document.encode()), float(fetched_at)
        except (TypeError, ValueError):
            return None
