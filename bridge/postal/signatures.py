"""Is this request body really from Postal?  (postal.md §1 "Signatures")

Postal signs every HTTP-endpoint and webhook request over the exact raw body bytes with one RSA key per
install: ``X-Postal-Signature-256`` (PKCS#1 v1.5 + SHA-256, Postal >= 3.2.0), ``X-Postal-Signature``
(the same with SHA-1, every version) and ``X-Postal-Signature-KID`` (hex SHA-256 of the DER PKCS#1 public
key). No timestamp or nonce is signed, so replay protection is the caller's job (idempotency keys).

Keys come from operator configuration (PEM file, DNS ``p=`` value or a whole DKIM TXT record, see
:func:`load_public_keys`) and/or from Postal's ``/.well-known/jwks.json``, fetched lazily and refetched,
rate-limited, when an unknown KID shows up (key rotation).

Exceptions, and what the web layer answers:

    SignatureError   -> 401  not from Postal: missing, malformed, tampered or signed by a key we do not know
    KeysUnavailable  -> 503  no key to be had now (JWKS unreachable, nothing configured): Postal retries

This module must never parse the body before it is verified, never trust a KID that it did not compute
itself, and never put key material, signatures or body bytes into exception messages or logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import requests
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = [
    "KID_HEADER",
    "SIGNATURE_256_HEADER",
    "SIGNATURE_SHA1_HEADER",
    "KeysUnavailable",
    "PostalKeyring",
    "SignatureError",
    "key_id",
    "load_public_keys",
]

log = logging.getLogger(__name__)

SIGNATURE_256_HEADER = "X-Postal-Signature-256"
SIGNATURE_SHA1_HEADER = "X-Postal-Signature"
KID_HEADER = "X-Postal-Signature-KID"

MIN_KEY_BITS = 1024  # Postal installs still use 1024-bit keys (postal.md)
_MAX_SIGNATURE_CHARS = 2048  # a 8192-bit signature is 1368 base64 characters
_MAX_KEY_FILE_BYTES = 64 * 1024
_MAX_JWKS_BYTES = 256 * 1024

_KID = re.compile(r"[0-9a-f]{64}")
_B64_STD = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# One key item: a whole PEM block (it has newlines of its own) or a run of text up to a comma/newline.
_SPEC_ITEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?-----END [A-Z0-9 ]+-----|[^,\n]+", re.S)
_DKIM_P_TAG = re.compile(r"(?:^|;)\s*p\s*=", re.I)


class SignatureError(Exception):
    """The request is not from Postal (missing/malformed/wrong signature, unknown key): answer 401."""


class KeysUnavailable(Exception):
    """No key to check against can be had right now: answer 503 so that Postal retries later."""


def key_id(public_key: RSAPublicKey) -> str:
    """Postal's KID: lowercase hex SHA-256 of the DER PKCS#1 RSAPublicKey (n, e).

    This is ruby-jwt's default ``key_digest`` KID, the value Postal sends in X-Postal-Signature-KID and
    publishes in its JWKS.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------- loading configured keys


def load_public_keys(spec: str) -> list[RSAPublicKey]:
    """Load the Postal public keys an operator configured.

    ``spec`` holds items separated by commas or newlines (not spaces: a DKIM record has spaces). Each item is
    a path to a PEM or DER file (SubjectPublicKeyInfo or PKCS#1), an inline PEM block, a bare base64 DER key
    (the DNS ``p=`` value), or a whole ``v=DKIM1; t=s; h=sha256; p=...`` TXT value (quoted strings as ``dig``
    prints them are joined). Several items allow a key rotation to overlap.

    Raises ValueError naming the position of the bad item, never its content (it may be a secret path
    or a private key pasted by mistake).
    """
    keys: list[RSAPublicKey] = []
    items = [m.group(0).strip() for m in _SPEC_ITEM.finditer(spec or "")]
    for position, item in enumerate((i for i in items if i), start=1):
        try:
            keys.append(_load_item(item))
        except _KeyItemError as exc:
            raise ValueError(f"Postal public key #{position} cannot be loaded: {exc}") from None
    return keys


class _KeyItemError(Exception):
    """A short, content-free reason why one configured key item could not be loaded."""


def _load_item(item: str) -> RSAPublicKey:
    if item.startswith("-----BEGIN"):
        return _key_from_pem_or_der(item.encode("ascii", "replace"))
    if _DKIM_P_TAG.search(item) or ";" in item:
        return _key_from_dkim_record(item)
    compact = re.sub(r"\s+", "", item)
    if len(compact) >= 100 and _B64_STD.fullmatch(compact) and not Path(item).is_file():
        return _key_from_base64_der(compact)
    return _key_from_file(Path(item))


def _key_from_file(path: Path) -> RSAPublicKey:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError:
        raise _KeyItemError("not a readable file, DKIM record or base64 key") from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise _KeyItemError("file too large for a public key")
    return _key_from_pem_or_der(data)


def _key_from_pem_or_der(data: bytes) -> RSAPublicKey:
    if b"PRIVATE KEY" in data:
        # A private key in the public-key setting is an operator mistake worth refusing loudly.
        raise _KeyItemError("this is a private key; configure the public half only")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _KeyItemError("not a PEM/DER public key") from None
    return _check_rsa(key)


def _key_from_base64_der(text: str) -> RSAPublicKey:
    try:
        der = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise _KeyItemError("invalid base64") from None
    return _key_from_pem_or_der(der)


def _key_from_dkim_record(record: str) -> RSAPublicKey:
    # dig prints long TXT records as several quoted strings: joining them is removing the quotes.
    tags: dict[str, str] = {}
    for part in record.replace('"', "").split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = value
    if tags.get("v", "DKIM1").strip() != "DKIM1":
        raise _KeyItemError("DKIM record with an unknown version")
    if tags.get("k", "rsa").strip().lower() != "rsa":
        raise _KeyItemError("DKIM record for a non-RSA key")
    if "p" not in tags:
        raise _KeyItemError("DKIM record without a p= value")
    p_value = re.sub(r"\s+", "", tags["p"])
    if not p_value:
        raise _KeyItemError("DKIM record with an empty (revoked) p= value")
    if not _B64_STD.fullmatch(p_value):
        raise _KeyItemError("DKIM record whose p= is not base64")
    return _key_from_base64_der(p_value)


def _check_rsa(key: object) -> RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise _KeyItemError("not an RSA key")
    if key.key_size < MIN_KEY_BITS:
        raise _KeyItemError(f"RSA key shorter than {MIN_KEY_BITS} bits")
    return key


# --------------------------------------------------------------------------- JWKS


def _b64url_uint(value: object) -> int:
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise ValueError("bad base64url integer")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return int.from_bytes(raw, "big")


def parse_jwks(document: object) -> dict[str, RSAPublicKey]:
    """The RSA signing keys of a JWKS document, indexed by the KID we compute ourselves.

    A key whose claimed ``kid`` differs from its real one is dropped: trusting it would let a JWKS
    (or whoever fakes it) make one key answer to another key's name.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    found: dict[str, RSAPublicKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
            continue
        try:
            numbers = rsa.RSAPublicNumbers(_b64url_uint(entry.get("e")), _b64url_uint(entry.get("n")))
            key = _check_rsa(numbers.public_key())
        except (ValueError, TypeError, _KeyItemError):
            log.warning("ignoring an unusable RSA key in Postal's JWKS")
            continue
        kid = key_id(key)
        claimed = entry.get("kid")
        if claimed is not None and claimed != kid:
            log.warning("ignoring a JWKS key whose kid does not match its key digest")
            continue
        found[kid] = key
    return found


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
    """

    def __init__(
        self,
        static_keys: list[RSAPublicKey],
        jwks_url: str | None,
        *,
        refresh_seconds: float = 300,
        timeout: float = 5.0,
        failure_retry_seconds: float = 10.0,
    ) -> None:
        self._static: dict[str, RSAPublicKey] = {key_id(k): k for k in static_keys}
        self._jwks_url = jwks_url or None
        self._refresh_seconds = refresh_seconds
        self._failure_retry_seconds = min(failure_retry_seconds, refresh_seconds)
        self._timeout = timeout
        self._jwks: dict[str, RSAPublicKey] = {}
        self._jwks_ok: bool | None = None  # None: never fetched; else: did the last fetch succeed?
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
                    return
            self._last_fetch = now
            try:
                fetched = self._fetch()
            except KeysUnavailable as exc:
                log.warning("Postal JWKS fetch failed: %s", exc)
                self._jwks_ok = False  # keep the keys we had: a rotation is not a revocation
            else:
                self._jwks = fetched
                self._jwks_ok = True
            self._generation += 1

    def _fetch(self) -> dict[str, RSAPublicKey]:
        assert self._jwks_url is not None
        try:
            with self._session.get(
                self._jwks_url, timeout=self._timeout, stream=True, headers={"Accept": "application/json"}
            ) as response:
                if response.status_code != 200:
                    raise KeysUnavailable(f"JWKS answered HTTP {response.status_code}")
                raw = bytearray()
                for chunk in response.iter_content(chunk_size=16384):
                    raw += chunk
                    if len(raw) > _MAX_JWKS_BYTES:
                        raise KeysUnavailable("JWKS document too large")
        except requests.RequestException as exc:
            raise KeysUnavailable(f"JWKS request failed ({type(exc).__name__})") from None
        try:
            return parse_jwks(json.loads(bytes(raw)))
        except (ValueError, RecursionError):
            raise KeysUnavailable("JWKS document is not valid JSON/JWKS") from None
