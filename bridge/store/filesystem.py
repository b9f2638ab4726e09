"""The filesystem object store (``file:///abs/path``), the embedded default.

Atomic across the gunicorn and RQ worker processes sharing one directory: creates ``os.link`` a
written temporary file to its final name (exactly one racing creator wins), overwrites ``os.replace``.
Every OS failure becomes ``StorageUnavailable`` (no key in its message: keys carry e-mail addresses).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from bridge.store.objects import KEY_SEGMENT, Data, StorageUnavailable, as_chunks, validate_key, validate_prefix

__all__ = ["FileObjectStore"]

# Temporary files carry a "~", which no key segment may contain, so listings never show them.
_TMP_MARK = "~"


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
                for chunk in as_chunks(data):
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

    def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            if self._root_broken():  # as in get(): a vanished store is not an absent object
                raise StorageUnavailable(f"filesystem store root {str(self.root)!r} is missing") from None
            return False
        except OSError as exc:
            raise self._unavailable("exists", exc) from None
        return stat.S_ISREG(mode)  # a "directory" of other keys is no object, as get() says

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
        base, partial = validate_prefix(prefix)
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
                    if e.name.startswith(partial) and KEY_SEGMENT.fullmatch(e.name) and e.name not in (".", "..")
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
