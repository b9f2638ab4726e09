"""Stored messages: sealed bodies and message records in the object store.

Layout (the object store is the system of record; Redis only indexes it)::

    mail/<address>/<id>.jwe    the sealed body, written once (create-only), never changed; its
                               JWE ``aad`` carries the message's initial record (the delivery facts)
    mail/<address>/<id>.json   the message record as the worker filed it: folder, verdicts, status

Receiving a message is one create-only write: the sealed body with its record authenticated
inside it. That halves the request path's writes (and fsyncs), and a body can never exist
without the facts needed to file it. Until the worker writes the ``.json`` record, the record is
read from the body's ``aad``.

A message id is derived from Postal's delivery key, so a retried delivery maps to the same
objects and the create-only write of the body is the durable, cross-process dedupe: the
second writer finds the body there and stores nothing.

Records carry no plaintext of the message beyond what routing needs (the sender's address and
Postal's envelope); subject and bodies live only inside the sealed body.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from bridge.sealing import aad_of
from bridge.store.objects import ObjectStore

STATUS_RECEIVED = "received"  # stored and acknowledged, not yet filed in a folder
STATUS_FILED = "filed"  # in a folder and listed in the index

FOLDERS = ("inbox", "goodreads", "other", "sent", "draft", "archive", "trash", "spam", "handshake")


def message_id(delivery_key: str) -> str:
    """A short, URL-safe id that is the same for every retry of one delivery."""
    digest = hashlib.sha256(delivery_key.encode()).digest()[:20]
    return base64.b32encode(digest).decode().lower()


def is_message_id(value: str) -> bool:
    return len(value) == 32 and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in value)


class MessageStore:
    """Reads and writes sealed bodies and records; knows nothing of folders' meaning."""

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    def create_body(self, address: str, msg_id: str, sealed: bytes | Sequence[bytes]) -> bool:
        """Store a sealed body once; False when a body for this id exists already (a retry)."""
        return self._objects.create(self._key(address, msg_id, "jwe"), sealed)

    def has_body(self, address: str, msg_id: str) -> bool:
        """Whether this delivery's body is stored already (a retry), without reading it."""
        return self._objects.exists(self._key(address, msg_id, "jwe"))

    def put_record(self, record: dict[str, Any]) -> None:
        self._objects.put(self._key(record["mailbox"], record["id"], "json"), _dump(record))

    def get_record(self, address: str, msg_id: str, *, body: bytes | None = None) -> dict[str, Any] | None:
        """The filed record, else the initial one from the body's aad (pass ``body`` if already read)."""
        data = self._objects.get(self._key(address, msg_id, "json"))
        if data:
            return json.loads(data)
        body = body if body is not None else self._objects.get(self._key(address, msg_id, "jwe"))
        return initial_record(body) if body else None

    def get_body(self, address: str, msg_id: str) -> bytes | None:
        return self._objects.get(self._key(address, msg_id, "jwe"))

    def records(self, address: str | None = None) -> Iterator[dict[str, Any]]:
        """Every message record (of one mailbox, or of all): the source for rebuilding indexes."""
        prefix = f"mail/{address}/" if address else "mail/"
        keys = list(self._objects.list(prefix))
        filed = {k[:-5] for k in keys if k.endswith(".json")}
        for key in keys:
            if key.endswith(".json") or (key.endswith(".jwe") and key[:-4] not in filed):
                data = self._objects.get(key)
                if data:
                    yield json.loads(data) if key.endswith(".json") else initial_record(data)

    @staticmethod
    def _key(address: str, msg_id: str, kind: str) -> str:
        return f"mail/{address}/{msg_id}.{kind}"


def initial_record(sealed_body: bytes) -> dict[str, Any]:
    """The record a body was stored with (its JWE ``aad``), before any filing."""
    aad = aad_of(json.loads(sealed_body))
    if aad is None:
        raise ValueError("sealed body without its record")
    return json.loads(aad)


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
