"""Postal's published signing keys (``/.well-known/jwks.json``), fetched over HTTP.

This module never parses keys (signatures.py does) and never puts document bytes into messages or logs.
"""

from __future__ import annotations

import logging

import requests

__all__ = ["MAX_JWKS_BYTES", "JwksUnavailable", "fetch_jwks"]

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 256 * 1024


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
