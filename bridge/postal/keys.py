"""Postal's public signing keys: loaded from the operator's configuration or parsed from a JWKS document.

Every key is an RSA public key of at least MIN_KEY_BITS, indexed by the KID we compute ourselves (the hex
SHA-256 of its DER PKCS#1 form, as Postal computes it), never by a KID a document claims. Errors name the
position of a bad item, never its content (it may be a secret path or a private key pasted by mistake).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

__all__ = ["MIN_KEY_BITS", "key_id", "load_public_keys", "parse_jwks"]

log = logging.getLogger(__name__)

MIN_KEY_BITS = 1024  # Postal installs still use 1024-bit keys (postal.md)
_MAX_KEY_FILE_BYTES = 64 * 1024

_B64_STD = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# One key item: a whole PEM block (it has newlines of its own) or a run of text up to a comma/newline.
_SPEC_ITEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?-----END [A-Z0-9 ]+-----|[^,\n]+", re.S)
_DKIM_P_TAG = re.compile(r"(?:^|;)\s*p\s*=", re.I)


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
