"""The bridge's own errors, and the HTTP status each one means.

Each outside system's module translates its library's errors into one of these (or into its
own subclass), so the web layer can answer with a deliberate status and a short, secret-free
reason without knowing about redis-py, botocore or dnspython::

    BridgeError                      500 (never shown with details)
    └── DependencyUnavailable        503 Redis, the object store or Postal's JWKS is down: Postal retries
        ├── RedisUnavailable
        ├── dns.DNSUnavailable
        └── (store.objects.StorageUnavailable, postal.signatures.KeysUnavailable are mapped to 503 too)
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of the bridge's errors; ``str(exc)`` is safe to show to a client."""

    status = 500


class DependencyUnavailable(BridgeError):
    """A dependency cannot be reached right now; the caller should retry later."""

    status = 503


class RedisUnavailable(DependencyUnavailable):
    """Redis refused, timed out or answered with an error."""
