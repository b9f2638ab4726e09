"""The server's own Ed25519 key: what signs every MTP request, receipt and answer this bridge sends.

Peers verify those signatures with the key the domain publishes in DNS (MIR-5):
``mailio._mailiokey.<domain> TXT "v=MAILIO1; k=ed25519; p=<base64>"``. The private key lives in one file
(``BRIDGE_SERVER_KEY_FILE``), PKCS#8 PEM, readable by the service user only; ``python -m bridge keys init``
creates it and never overwrites one (a new key breaks every peer's cached copy until DNS is updated).

Every web and worker process must read the same file. It is loaded once per process and path.
"""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.mailio.identity import mailio_address

__all__ = ["ServerKeyError", "create_server_key", "load_server_key", "public_key_bytes", "server_address", "txt_record"]

RECORD_NAME = "mailio._mailiokey.{domain}"


class ServerKeyError(ValueError):
    """The key file is missing, unreadable, not an Ed25519 key, or (creating) exists already."""


_cache: dict[Path, Ed25519PrivateKey] = {}
_lock = threading.Lock()


def create_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read (0600, ``O_EXCL``: an existing file is never
    replaced, ``FileExistsError``), flushed to disk. Every private key file the bridge writes goes here."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def create_server_key(path: Path) -> Ed25519PrivateKey:
    """A fresh key from the OS CSPRNG, written 0600 with O_EXCL: an existing file is never replaced."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        create_private_file(path, pem)
    except FileExistsError:
        raise ServerKeyError(f"{path} exists already; not overwriting the server key") from None
    except OSError as exc:
        raise ServerKeyError(f"cannot create {path}: {exc.strerror}") from None
    return key


def load_server_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path`` (cached per process). Raises :class:`ServerKeyError` with a one-line reason."""
    with _lock:
        cached = _cache.get(path)
        if cached is not None:
            return cached
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ServerKeyError(f"no server key at {path}: run `python -m bridge keys init`") from None
        except OSError as exc:
            raise ServerKeyError(f"cannot read the server key {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ServerKeyError(f"{path} is not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ServerKeyError(f"{path} is not an Ed25519 key")
        _cache[path] = key
        return key


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def server_address(key: Ed25519PrivateKey) -> str:
    """The server's Mailio address (``0x`` + 40 hex), derived from its key like a user's."""
    return mailio_address(public_key_bytes(key))


def txt_record(key: Ed25519PrivateKey) -> str:
    """The TXT value to publish at ``mailio._mailiokey.<domain>``, exactly as peers parse it."""
    return f"v=MAILIO1; k=ed25519; p={base64.b64encode(public_key_bytes(key)).decode('ascii')}"
