"""The object store: the bridge's system of record, on S3 or on a local filesystem.

Sealed bodies, message records, mailbox records and handshake documents live here; Redis only holds
what can be rebuilt from it. Two backends share one small interface (``ObjectStore``):

- ``FileObjectStore`` (``file:///abs/path``), the embedded default: atomic create-only writes with
  ``os.link`` and atomic overwrites with ``os.replace``, safe across the gunicorn and RQ worker
  processes that share the directory.
- ``S3ObjectStore`` (``s3://bucket[/prefix]``): create-only writes with a conditional PUT
  (``If-None-Match: *``), short timeouts and few retries so a dead store turns into a quick 503
  (Postal then retries for a day) rather than a hung request.

Every failure of the store itself becomes ``StorageUnavailable``; a missing object is ``None``.
This module must never log or put in an exception message anything secret (credentials, object
contents), must never accept a key that could escape its root or prefix, and knows nothing of Flask.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

Data = bytes | bytearray | memoryview | Sequence[bytes]

_SEGMENT = re.compile(r"[A-Za-z0-9._@+=-]+")
_PARTIAL_SEGMENT = re.compile(r"[A-Za-z0-9._@+=-]*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Temporary files carry a "~", which no key segment may contain, so listings never show them.
_TMP_MARK = "~"


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
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"invalid object key {key[:200]!r}")
    return key


def _validate_prefix(prefix: str) -> tuple[str, str]:
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


def _chunks(data: Data) -> Sequence[bytes | bytearray | memoryview]:
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
        return FileObjectStore(path, fsync=fsync)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket):
            raise ValueError("s3 object store URL must be s3://bucket or s3://bucket/prefix")
        prefix = parts.path.strip("/")
        if prefix:
            validate_key(prefix)
        return S3ObjectStore(bucket, prefix)
    raise ValueError("object store URL must start with file:/// or s3://")


# --------------------------------------------------------------------------------------------------
# Filesystem


class FileObjectStore:
    """Objects as files under one root directory; atomic across processes sharing the directory.

    A create writes a temporary file in the target directory, fsyncs it, then ``os.link``s it to the
    final name: the link is atomic and fails if the name exists, so exactly one of several racing
    creators wins and readers never see a half-written object. Overwrites use ``os.replace``.
    A key cannot be both an object and a "directory" of other keys here (unlike S3), and the directory
    must be on a filesystem with hard links (any local POSIX filesystem or NFS; not vfat or SMB).
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_absolute():
            raise ValueError("file object store root must be an absolute path")
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # reported by check() and by the first write, as StorageUnavailable

    def __repr__(self) -> str:
        return f"FileObjectStore({str(self.root)!r})"

    # -- helpers

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _unavailable(self, action: str, exc: OSError) -> StorageUnavailable:
        # No key in the message: keys carry e-mail addresses, and the reason may reach logs and Postal.
        reason = errno.errorcode.get(exc.errno or 0, exc.__class__.__name__)
        return StorageUnavailable(f"filesystem store: {action} failed: {reason}")

    def _root_broken(self) -> bool:
        return not self.root.is_dir()

    def _fsync_dir(self, directory: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, directory: Path, key: str) -> None:
        """Create ``directory`` and missing parents, fsyncing each new entry's parent."""
        if self._root_broken():
            # Created when the store was opened; if it is gone now (unmounted, deleted), recreating it
            # would silently start an empty store.
            raise StorageUnavailable(f"filesystem store root {str(self.root)!r} is missing")
        missing: list[Path] = []
        probe = directory
        while probe != self.root and not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for new_dir in reversed(missing):
            try:
                new_dir.mkdir()
            except FileExistsError:
                if not new_dir.is_dir():
                    raise self._conflict(key) from None
                continue
            except NotADirectoryError:
                raise self._conflict(key) from None
            self._fsync_dir(new_dir.parent)

    def _conflict(self, key: str) -> Exception:
        if self._root_broken():
            return StorageUnavailable(f"filesystem store root {str(self.root)!r} is not a directory")
        return ValueError("object key collides with another key's directory (or is one)")

    def _write_temp(self, directory: Path, name: str, data: Data) -> Path:
        tmp = directory / f".{name}{_TMP_MARK}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                for chunk in _chunks(data):
                    out.write(chunk)
                out.flush()
                if self.fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    # -- interface

    def create(self, key: str, data: Data) -> bool:
        path = self._path(key)
        try:
            self._ensure_dir(path.parent, key)
            tmp = self._write_temp(path.parent, path.name, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path.is_dir():
                    raise self._conflict(key) from None
                return False
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_dir(path.parent)
            return True
        except (IsADirectoryError, NotADirectoryError):
            raise self._conflict(key) from None
        except OSError as exc:
            raise self._unavailable("create", exc) from None

    def put(self, key: str, data: Data) -> None:
        path = self._path(key)
        try:
            self._ensure_dir(path.parent, key)
            tmp = self._write_temp(path.parent, path.name, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._fsync_dir(path.parent)
        except (IsADirectoryError, NotADirectoryError):
            raise self._conflict(key) from None
        except OSError as exc:
            raise self._unavailable("put", exc) from None

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # An absent object, unless the whole store has gone (unmounted, deleted): saying
            # "absent" then would make callers re-create what they already stored.
            if self._root_broken():
                raise StorageUnavailable(f"filesystem store root {str(self.root)!r} is missing") from None
            return None
        except OSError as exc:
            raise self._unavailable("get", exc) from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # a "directory" of other keys, not an object
        except OSError as exc:
            raise self._unavailable("delete", exc) from None

    def list(self, prefix: str) -> Iterator[str]:
        base, partial = _validate_prefix(prefix)
        start = self.root.joinpath(*base.split("/")) if base else self.root
        key_base = f"{base}/" if base else ""
        try:
            yield from self._walk(start, key_base, partial)
        except OSError as exc:
            raise self._unavailable("list", exc) from None

    def _walk(self, directory: Path, key_base: str, partial: str = "") -> Iterator[str]:
        """Depth-first in sorted order: sorting directories as "name/" yields globally sorted keys."""
        try:
            with os.scandir(directory) as it:
                entries = [
                    (e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                    for e in it
                    if e.name.startswith(partial) and _SEGMENT.fullmatch(e.name) and e.name not in (".", "..")
                ]
        except (FileNotFoundError, NotADirectoryError):
            if self._root_broken():
                raise StorageUnavailable(f"filesystem store root {str(self.root)!r} is missing") from None
            return
        entries.sort(key=lambda pair: pair[0])
        for sort_name, entry in entries:
            if sort_name.endswith("/"):
                yield from self._walk(Path(entry.path), key_base + sort_name)
            elif entry.is_file(follow_symlinks=False):
                yield key_base + entry.name

    def check(self) -> None:
        if self._root_broken():
            raise StorageUnavailable(f"filesystem store root {str(self.root)!r} is missing")
        try:
            probe = self.root / f".check{_TMP_MARK}{secrets.token_hex(8)}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise self._unavailable("check", exc) from None


# --------------------------------------------------------------------------------------------------
# S3


class _ChunkReader(io.RawIOBase):
    """A seekable read-only file over a list of byte chunks, so boto3 can stream them without a join.

    botocore reads the body once to sign it (SigV4 over plain HTTP) and once to send it, seeking back in
    between; both passes copy only one small block at a time. tests/test_objects.py measures that a
    chunked create allocates far less than the body's size.
    """

    def __init__(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        super().__init__()
        self._views = [memoryview(c).cast("B") for c in chunks if len(c)]
        self._starts: list[int] = []
        total = 0
        for view in self._views:
            self._starts.append(total)
            total += len(view)
        self._size = total
        self._pos = 0
        self._index = 0  # the chunk holding self._pos (or len(views) at the end)

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        self._index = 0
        while self._index < len(self._views) and (self._starts[self._index] + len(self._views[self._index]) <= pos):
            self._index += 1
        return pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        written = 0
        while written < len(out) and self._index < len(self._views):
            view = self._views[self._index]
            inner = self._pos - self._starts[self._index]
            n = min(len(view) - inner, len(out) - written)
            out[written : written + n] = view[inner : inner + n]
            written += n
            self._pos += n
            if inner + n == len(view):
                self._index += 1
        return written


def _s3_config() -> Config:
    return Config(
        connect_timeout=2,
        read_timeout=10,
        # Two tries in all (botocore's "max_attempts" counts retries, "total_max_attempts" tries): an
        # endpoint that drops packets then fails in ~4 s, inside Postal's patience, instead of ~6 s.
        retries={"total_max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path"},
        # Ceph RGW and other S3 implementations do not all understand the flexible-checksum headers and
        # trailers botocore now sends by default; SigV4 payload signing (HTTP) or TLS (HTTPS) covers
        # integrity in transit, so only send checksums where the API requires them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
    )


class S3ObjectStore:
    """Objects in one S3 bucket (optionally under a prefix); one thread-safe boto3 client, reused.

    Any failure of S3 itself (unreachable, timeout, 5xx, throttling, bad credentials, missing bucket)
    is ``StorageUnavailable``: the operator must fix it, and Postal should retry rather than bounce.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        list_page_size: int = 1000,
    ) -> None:
        self.bucket = bucket
        self.list_page_size = list_page_size
        self.prefix = f"{validate_key(prefix.strip('/'))}/" if prefix.strip("/") else ""
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self.region = session.region_name
        try:
            self._client = session.client("s3", endpoint_url=endpoint_url, config=_s3_config())
        except BotoCoreError as exc:
            raise ValueError(f"cannot configure the S3 client: {exc.__class__.__name__}") from None

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _unavailable(self, operation: str, exc: Exception) -> StorageUnavailable:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return StorageUnavailable(f"S3 {operation} failed: {error.get('Code', '?')} (HTTP {status})")
        return StorageUnavailable(f"S3 {operation} failed: {exc.__class__.__name__}")

    @staticmethod
    def _code(exc: ClientError) -> tuple[str, int | None]:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status

    def create(self, key: str, data: Data) -> bool:
        full = self.prefix + validate_key(key)
        chunks = _chunks(data)
        for attempt in range(2):
            body: Any = chunks[0] if len(chunks) == 1 else _ChunkReader(chunks)
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code, status = self._code(exc)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if status == 409 and code == "ConditionalRequestConflict":
                    # Another writer is creating the same key right now: ask once more, and if it is
                    # still in flight, the object is theirs.
                    if attempt == 0:
                        continue
                    return False
                raise self._unavailable("PutObject", exc) from None
            except BotoCoreError as exc:
                raise self._unavailable("PutObject", exc) from None
        return False  # pragma: no cover - the loop always returns

    def put(self, key: str, data: Data) -> None:
        full = self.prefix + validate_key(key)
        chunks = _chunks(data)
        body: Any = chunks[0] if len(chunks) == 1 else _ChunkReader(chunks)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=body)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("PutObject", exc) from None

    def get(self, key: str) -> bytes | None:
        full = self.prefix + validate_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as stream:
                return stream.read()
        except ClientError as exc:
            code, status = self._code(exc)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                return None
            raise self._unavailable("GetObject", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("GetObject", exc) from None

    def delete(self, key: str) -> None:
        full = self.prefix + validate_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            code, _ = self._code(exc)
            if code == "NoSuchKey":
                return
            raise self._unavailable("DeleteObject", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("DeleteObject", exc) from None

    def list(self, prefix: str) -> Iterator[str]:
        _validate_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        try:
            for page in paginator.paginate(
                Bucket=self.bucket,
                Prefix=self.prefix + prefix,
                PaginationConfig={"PageSize": self.list_page_size},
            ):
                for item in page.get("Contents", ()):
                    yield item["Key"][strip:]
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("ListObjectsV2", exc) from None

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("HeadBucket", exc) from None

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (``make run`` and the tests use this)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            _, status = self._code(exc)
            if status != 404:
                raise self._unavailable("HeadBucket", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("HeadBucket", exc) from None
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            code, _ = self._code(exc)
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._unavailable("CreateBucket", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("CreateBucket", exc) from None
