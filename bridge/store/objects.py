"""The object store: the bridge's system of record, on S3 or on a local filesystem.

Sealed bodies, message records, mailbox records and handshake documents live here; Redis only holds
what can be rebuilt from it. Two backends share one small interface (``ObjectStore``), one module each:

- ``filesystem.FileObjectStore`` (``file:///abs/path``), the embedded default: atomic create-only
  writes with ``os.link`` and atomic overwrites with ``os.replace``, safe across the gunicorn and RQ
  worker processes that share the directory.
- ``s3.S3ObjectStore`` (``s3://bucket[/prefix]``): create-only writes with a conditional PUT
  (``If-None-Match: *``), short timeouts and few retries so a dead store turns into a quick 503
  (Postal then retries for a day) rather than a hung request.

This module holds what both share: the interface, ``StorageUnavailable``, key validation and
``open_object_store``. Every failure of the store itself becomes ``StorageUnavailable``; a missing
object is ``None``. No backend may log or put in an exception message anything secret (credentials,
object contents), accept a key that could escape its root or prefix, or know anything of Flask.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # re-exported lazily (see __getattr__): the backends import this module
    from bridge.store.filesystem import FileObjectStore
    from bridge.store.s3 import S3ObjectStore

__all__ = [
    "Data",
    "FileObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "StorageUnavailable",
    "as_chunks",
    "open_object_store",
    "validate_key",
    "validate_prefix",
]

Data = bytes | bytearray | memoryview | Sequence[bytes]

KEY_SEGMENT = re.compile(r"[A-Za-z0-9._@+=-]+")
_PARTIAL_SEGMENT = re.compile(r"[A-Za-z0-9._@+=-]*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StorageUnavailable(Exception):
    """The store cannot be reached, failed, or refused us: the caller answers 503 and retries later."""


@runtime_checkable
class ObjectStore(Protocol):
    """What the rest of the bridge needs from a store: create-only writes, overwrites, reads, listings."""

    def create(self, key: str, data: Data) -> bool:
        """Create-only write: True if this call created the object, False if it already existed.

        Nothing is ever overwritten, so a retried job cannot clobber what an earlier run stored.
        ``data`` may be a list of chunks, so a large body is never joined into one more copy.
        """
        ...

    def put(self, key: str, data: Data) -> None:
        """Overwrite (or create) a mutable record."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists, without reading it (a retry's cheap dedupe check)."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting an absent object is not an error."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Full keys starting with ``prefix``, in sorted order, paginating as needed."""
        ...

    def check(self) -> None:
        """Cheap health probe for /health: raises StorageUnavailable if the store is not usable."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ValueError.

    Keys are partly built from e-mail addresses, so anything that could climb out of the store's
    root or prefix (``..``, absolute paths, empty segments, odd characters) is refused outright.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    for segment in key.split("/"):
        if not KEY_SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"invalid object key {key[:200]!r}")
    return key


def validate_prefix(prefix: str) -> tuple[str, str]:
    """Split a listing prefix into (directory part, partial last segment), both validated."""
    if not isinstance(prefix, str):
        raise ValueError("object key prefix must be a string")
    base, _, partial = prefix.rpartition("/")
    if base:
        validate_key(base)
    elif prefix.startswith("/"):
        raise ValueError(f"invalid object key prefix {prefix[:200]!r}")
    if not _PARTIAL_SEGMENT.fullmatch(partial):
        raise ValueError(f"invalid object key prefix {prefix[:200]!r}")
    return base, partial


def as_chunks(data: Data) -> Sequence[bytes | bytearray | memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        return [data]
    return data


def open_object_store(url: str, *, fsync: bool = True) -> ObjectStore:
    """Open the store named by ``url``: ``file:///abs/path``, ``s3://bucket`` or ``s3://bucket/prefix``.

    S3 endpoint, region and credentials come from boto3's own chain (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ...),
    so nothing secret ever sits in the URL. ``fsync`` only concerns the filesystem backend.
    """
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("object store URL must not carry credentials, a query or a fragment")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file object store URL must be file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise ValueError("file object store URL must be file:///absolute/path")
        from bridge.store.filesystem import FileObjectStore

        return FileObjectStore(path, fsync=fsync)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket):
            raise ValueError("s3 object store URL must be s3://bucket or s3://bucket/prefix")
        prefix = parts.path.strip("/")
        if prefix:
            validate_key(prefix)
        from bridge.store.s3 import S3ObjectStore  # boto3 is imported only when S3 is used

        return S3ObjectStore(bucket, prefix)
    raise ValueError("object store URL must start with file:/// or s3://")


def __getattr__(name: str) -> Any:
    """``from bridge.store.objects import FileObjectStore`` (or ``S3ObjectStore``) keeps working.

    Imported on first use rather than at the top, because each backend imports this module: whichever
    is imported first, nobody sees a half-initialised module.
    """
    if name == "FileObjectStore":
        from bridge.store.filesystem import FileObjectStore

        return FileObjectStore
    if name == "S3ObjectStore":
        from bridge.store.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
