"""The outgoing spool: the plaintext Postal needs, encrypted at rest, kept only until it is handed over.

Sending over SMTP needs the message in clear (Postal gets it), but the owner's sealed ``sent`` copy opens
only with the owner's key. So the send path keeps one more copy, ``spool/<owner>/<msg id>``, encrypted
with AES-256-GCM (``cryptography``'s AESGCM, nothing by hand) under a key the server holds for this
purpose alone (``BRIDGE_SPOOL_KEY_FILE``, default ``<BRIDGE_DATA_DIR>/spool.key``, created 0600 on first
use). The object's key is the authenticated data, so a spool object moved to another message's name does
not open. The delivery job deletes it once no SMTP recipient still waits to be handed to Postal.

Every process that sends or accepts mail must read the same key file: with several hosts, point
BRIDGE_SPOOL_KEY_FILE at one shared secret file. Losing the key loses only what is still waiting.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.store.objects import ObjectStore

MAGIC = b"MBS1"  # format version: AES-256-GCM, 12-byte nonce, aad = the object's key
KEY_BYTES = 32
NONCE_BYTES = 12


class SpoolError(ValueError):
    """A spool object that does not open with this server's key (another key, or tampered)."""


def load_or_create_key(path: Path) -> bytes:
    """The spool key at ``path``, created (0600, atomically) when absent; a wrong-sized file is refused."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a private temporary name, then linked into place: a concurrent reader never sees a
        # half-written key, and of two processes creating it at once the second adopts the first's.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink()
        key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SpoolError(f"the spool key file must hold {KEY_BYTES} bytes")
    return key


class Spool:
    """Encrypted plaintext copies of outgoing messages, one object per message."""

    def __init__(self, objects: ObjectStore, key_path: Path) -> None:
        self._objects = objects
        self._key_path = key_path
        self._aead: AESGCM | None = None
        self._lock = threading.Lock()

    def _cipher(self) -> AESGCM:
        with self._lock:
            if self._aead is None:
                self._aead = AESGCM(load_or_create_key(self._key_path))
            return self._aead

    def put(self, owner: str, msg_id: str, mail_from: str, message: bytes) -> None:
        """Store the envelope sender and the message as sent, encrypted (create-only: a retry keeps the first)."""
        key = _key(owner, msg_id)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._cipher().encrypt(nonce, mail_from.encode() + b"\n" + message, key.encode())
        self._objects.create(key, [MAGIC, nonce, sealed])

    def get(self, owner: str, msg_id: str) -> tuple[str, bytes] | None:
        """(envelope sender, message), or None when the spool object is gone (handed over, or never stored)."""
        key = _key(owner, msg_id)
        data = self._objects.get(key)
        if data is None:
            return None
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + NONCE_BYTES + 16:
            raise SpoolError("not a spool object")
        nonce = data[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            plain = self._cipher().decrypt(nonce, data[len(MAGIC) + NONCE_BYTES :], key.encode())
        except InvalidTag:
            raise SpoolError("the spool object does not open with this server's spool key") from None
        mail_from, _, message = plain.partition(b"\n")
        return mail_from.decode(), message

    def exists(self, owner: str, msg_id: str) -> bool:
        return self._objects.exists(_key(owner, msg_id))

    def delete(self, owner: str, msg_id: str) -> None:
        self._objects.delete(_key(owner, msg_id))


def _key(owner: str, msg_id: str) -> str:
    return f"spool/{owner}/{msg_id}"
