"""The S3 object store (``s3://bucket[/prefix]``): AWS S3, Ceph RGW, or any S3 with conditional writes.

Create-only writes are a conditional PUT (``If-None-Match: *``); short timeouts and few retries turn a
dead store into a quick 503 (Postal then retries for a day) rather than a hung request. Every failure of
S3 itself becomes ``StorageUnavailable`` naming the operation and S3's error code, never a key or a secret.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from bridge.store.objects import Data, StorageUnavailable, as_chunks, validate_key, validate_prefix

__all__ = ["S3ObjectStore"]


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
        chunks = as_chunks(data)
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
        chunks = as_chunks(data)
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

    def exists(self, key: str) -> bool:
        full = self.prefix + validate_key(key)
        try:
            # A one-byte ranged GET, not HEAD: a HEAD error has no body, so a missing bucket and a missing
            # key both read as a bare 404, and "absent" would make a retry store its delivery again.
            response = self._client.get_object(Bucket=self.bucket, Key=full, Range="bytes=0-0")
            response["Body"].close()
        except ClientError as exc:
            code, status = self._code(exc)
            if code == "InvalidRange" or status == 416:
                return True  # an empty object has no first byte
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                return False
            raise self._unavailable("GetObject", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("GetObject", exc) from None
        return True

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
        validate_prefix(prefix)
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
