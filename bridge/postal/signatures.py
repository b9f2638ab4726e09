"""Is this request body really from Postal?  (postal.md §1 "Signatures")

Postal signs every HTTP-endpoint and webhook request over the exact raw body bytes with one RSA key per
install: ``X-Postal-Signature-256`` (PKCS#1 v1.5 + SHA-256, Postal >= 3.2.0), ``X-Postal-Signature``
(the same with SHA-1, every version) and ``X-Postal-Signature-KID`` (hex SHA-256 of the DER PKCS#1 public
key). No timestamp or nonce is signed, so replay protection is the caller's job (idempotency keys).

Keys come from operator configuration (PEM file, DNS ``p=`` value or a whole DKIM TXT record, see
keys.py) and/or from Postal's ``/.well-known/jwks.json``, fetched lazily and refetched,
rate-limited, when an unknown KID shows up (key rotation). When a fetch fails, the last good JWKS any
process fetched (kept in Redis, see jwks.py) stands in, so every web process answers alike.

Exceptions, and what the web layer answers:

    SignatureError   -> 401  not from Postal: missing, malformed, tampered or signed by a key we do not know
    KeysUnavailable  -> 503  no key to be had now (JWKS unreachable, nothing configured): Postal retries

This module must never parse the body before it is verified, never trust a KID that it did not compute
itself, and never put key material, signatures or body bytes into exception messages or logs.
"""

from __future__ import annotations

import binascii
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import redis
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from bridge import metrics
from bridge.postal.jwks import JwksUnavailable, SharedJwks, fetch_jwks
from bridge.postal.keys import MIN_KEY_BITS, key_id, load_public_keys, parse_jwks

__all__ = [
    "KID_HEADER",
    "MIN_KEY_BITS",
    "SIGNATURE_256_HEADER",
    "SIGNATURE_SHA1_HEADER",
    "KeysUnavailable",
    "PostalKeyring",
    "SignatureError",
    "key_id",
    "load_public_keys",
    "parse_jwks",
]

log = logging.getLogger(__name__)

SIGNATURE_256_HEADER = "X-Postal-Signature-256"
SIGNATURE_SHA1_HEADER = "X-Postal-Signature"
KID_HEADER = "X-Postal-Signature-KID"

_MAX_SIGNATURE_CHARS = 2048  # a 8192-bit signature is 1368 base64 characters

_KID = re.compile(r"[0-9a-f]{64}")
_SHARED_CHECK_SECONDS = 1.0


class SignatureError(Exception):
    """The request is not from Postal (missing/malformed/wrong signature, unknown key): answer 401."""


class KeysUnavailable(Exception):
    """No key to check against can be had right now: answer 503 so that Postal retries later."""


# --------------------------------------------------------------------------- verification


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header lookup that is case-insensitive for plain dicts too (werkzeug's headers already are)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if isinstance(key, str) and key.lower() == lowered:
            return candidate
    return None


def _decode_signature(value: str) -> bytes:
    value = value.strip()
    if len(value) > _MAX_SIGNATURE_CHARS:
        raise SignatureError("malformed signature")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed signature") from None


def _matches(key: RSAPublicKey, signature: bytes, body: bytes | bytearray, algorithm: hashes.HashAlgorithm) -> bool:
    try:
        # cryptography reads any buffer; the cast only tells the type checker (no copy of a 34 MB body)
        key.verify(signature, cast(bytes, body), padding.PKCS1v15(), algorithm)
    except (InvalidSignature, ValueError):
        return False
    return True


class PostalKeyring:
    """Every public key Postal may sign with, and the check of one request against them.

    Static keys come from configuration; JWKS keys are fetched lazily on first need, cached, and refetched
    when an unknown KID arrives, at most once per ``refresh_seconds`` (a failed fetch may be retried after
    ``failure_retry_seconds``), so a stream of forged KIDs cannot turn the bridge into a load generator
    against Postal. Safe to share between threads: lookups read immutable snapshots, fetches are serialized.

    With ``shared_redis`` (a function returning the process's Redis client), every good fetch is shared and a
    failed one falls back to the newest set any process fetched; without it, or with Redis down, the
    process keeps its own last good set, as before.
    """

    def __init__(
        self,
        static_keys: list[RSAPublicKey],
        jwks_url: str | None,
        *,
        refresh_seconds: float = 300,
        timeout: float = 5.0,
        failure_retry_seconds: float = 10.0,
        shared_redis: Callable[[], redis.Redis] | None = None,
    ) -> None:
        self._static: dict[str, RSAPublicKey] = {key_id(k): k for k in static_keys}
        self._jwks_url = jwks_url or None
        self._refresh_seconds = refresh_seconds
        self._failure_retry_seconds = min(failure_retry_seconds, refresh_seconds)
        self._timeout = timeout
        self._jwks: dict[str, RSAPublicKey] = {}
        self._jwks_ok: bool | None = None  # None: never fetched; else: did the last fetch succeed?
        self._jwks_fetched_at = 0.0  # when (epoch seconds) self._jwks was fetched, by us or another process
        self._last_shared_check = float("-inf")
        self._shared = SharedJwks(shared_redis, self._jwks_url) if shared_redis is not None and self._jwks_url else None
        self._last_fetch: float | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._session = requests.Session()

    @property
    def known_kids(self) -> list[str]:
        """KIDs of every key currently known (configured and fetched); for health pages and logs."""
        return sorted({*self._static, *self._jwks})

    def describe(self) -> list[dict[str, str]]:
        """Where each key comes from and its KID, fetching the JWKS now (the operator's check)."""
        keys = [{"source": "BRIDGE_POSTAL_PUBLIC_KEY", "kid": kid} for kid in sorted(self._static)]
        if self._jwks_url:
            try:
                fetched = self._fetch()
            except KeysUnavailable as exc:
                return [*keys, {"source": "jwks", "error": str(exc)}]
            keys += [{"source": "jwks", "kid": kid} for kid in sorted(fetched)]
        return keys

    def verify(self, body: bytes | bytearray, headers: Mapping[str, str] | Any) -> str:
        """Return the KID of the key whose signature matches the exact raw body.

        Prefers X-Postal-Signature-256; SHA-1 is used only when the -256 header is absent, so a present
        but wrong -256 fails even if the SHA-1 one would match (no downgrade). Raises SignatureError or
        KeysUnavailable.
        """
        sig256 = _header(headers, SIGNATURE_256_HEADER)
        if sig256 is not None:
            algorithm: hashes.HashAlgorithm = hashes.SHA256()
            signature = _decode_signature(sig256)
        else:
            sig1 = _header(headers, SIGNATURE_SHA1_HEADER)
            if sig1 is None:
                raise SignatureError("missing signature")
            signature, algorithm = _decode_signature(sig1), hashes.SHA1()  # noqa: S303 - Postal < 3.2
        claimed_kid = _header(headers, KID_HEADER)
        if claimed_kid is not None:
            return self._verify_with_kid(claimed_kid, signature, body, algorithm)
        return self._verify_any(signature, body, algorithm)

    # -- helpers

    def _verify_with_kid(
        self, claimed: str, signature: bytes, body: bytes | bytearray, algorithm: hashes.HashAlgorithm
    ) -> str:
        kid = claimed.strip().lower()
        if not _KID.fullmatch(kid):
            raise SignatureError("malformed key id")
        key = self._static.get(kid) or self._jwks.get(kid)
        if key is None:
            if self._jwks_url is None:
                if not self._static:
                    raise KeysUnavailable("no Postal public key is configured")
                raise SignatureError("unknown signing key")
            self._refresh()
            key = self._jwks.get(kid)
            if key is None:
                if self._jwks_ok:
                    raise SignatureError("unknown signing key")
                raise KeysUnavailable("Postal's JWKS cannot be fetched")
        if not _matches(key, signature, body, algorithm):
            raise SignatureError("signature does not match")
        return kid

    def _verify_any(self, signature: bytes, body: bytes | bytearray, algorithm: hashes.HashAlgorithm) -> str:
        """Old Postal sends no KID: try every key we know, then (rate-limited) any newly published one."""
        tried: set[str] = set()
        for kid, key in self._static.items():
            tried.add(kid)
            if _matches(key, signature, body, algorithm):
                return kid
        if self._jwks_url is not None:
            for attempt in range(2):
                if attempt == 1 or self._jwks_ok is None:
                    self._refresh()
                for kid, key in self._jwks.items():
                    if kid not in tried:
                        tried.add(kid)
                        if _matches(key, signature, body, algorithm):
                            return kid
            if not self._jwks_ok:
                raise KeysUnavailable("Postal's JWKS cannot be fetched")
        if not tried:
            raise KeysUnavailable("no Postal public key is configured")
        raise SignatureError("signature does not match")

    def _refresh(self) -> None:
        """Fetch the JWKS unless the rate limit says not yet; serialized, one fetch for a crowd of threads."""
        seen_generation = self._generation
        with self._lock:
            if self._generation != seen_generation:
                return  # another thread fetched while we waited: use its result
            now = time.monotonic()
            if self._last_fetch is not None:
                interval = self._refresh_seconds if self._jwks_ok else self._failure_retry_seconds
                if now - self._last_fetch < interval:
                    # Not our turn to fetch, but another process may have fetched since (a key rotation
                    # it saw first): its newer set answers this KID as that process does, instead of our
                    # 401 bouncing the sender. Redis is asked at most once per _SHARED_CHECK_SECONDS.
                    if now - self._last_shared_check >= _SHARED_CHECK_SECONDS:
                        self._last_shared_check = now
                        if self._adopt_shared():
                            self._generation += 1
                    return
            self._last_fetch = now
            try:
                document = self._fetch_document()
                fetched = _parse_document(document)
            except KeysUnavailable as exc:
                metrics.JWKS_FETCHES.labels(outcome="failed").inc()
                log.warning("Postal JWKS fetch failed: %s", exc)
                self._jwks_ok = False  # keep the keys we had: a rotation is not a revocation
                self._adopt_shared()
            else:
                metrics.JWKS_FETCHES.labels(outcome="ok").inc()
                self._jwks, self._jwks_ok, self._jwks_fetched_at = fetched, True, time.time()
                if self._shared is not None:
                    self._shared.store(document, self._jwks_fetched_at)
            self._generation += 1

    def _adopt_shared(self) -> bool:
        """Take the last good set another process fetched if it is newer than ours; True if taken."""
        if self._shared is None:
            return False
        shared = self._shared.load()
        if shared is None or shared[1] <= self._jwks_fetched_at:
            return False
        try:
            self._jwks = _parse_document(shared[0])
        except KeysUnavailable:
            return False  # not written by us (we store only documents that parsed): ignore it
        self._jwks_fetched_at = shared[1]
        metrics.JWKS_FETCHES.labels(outcome="shared").inc()
        log.info("using the Postal JWKS another process fetched (%d keys)", len(self._jwks))
        return True

    def _fetch_document(self) -> bytes:
        assert self._jwks_url is not None
        try:
            return fetch_jwks(self._session, self._jwks_url, self._timeout)
        except JwksUnavailable as exc:
            raise KeysUnavailable(str(exc)) from None

    def _fetch(self) -> dict[str, RSAPublicKey]:
        return _parse_document(self._fetch_document())


def _parse_document(document: bytes) -> dict[str, RSAPublicKey]:
    try:
        return parse_jwks(json.loads(document))
    except (ValueError, RecursionError):
        raise KeysUnavailable("JWKS document is not valid JSON/JWKS") from None
