"""Shared pieces of the property-based (hypothesis) tests: profiles, what every answer must satisfy,
and a snapshot of the object store to prove a refused request wrote nothing.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default, what ``make test`` runs: the full case counts,
no deadline because the machine is shared and busy, no example database written into the working
tree) and ``quick`` (a tenth of the cases, for editing the tests). ``BRIDGE_FUZZ_SCALE`` multiplies
every test's case count (e.g. ``10`` for a long local hunt).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci", deadline=None, database=None, print_blob=True, suppress_health_check=_HEALTH, derandomize=False
)
settings.register_profile("quick", parent=settings.get_profile("ci"), max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_SCALE = float(os.environ.get("BRIDGE_FUZZ_SCALE", "1"))


def cases(count: int) -> int:
    """The number of examples a fuzz test runs: ``count`` in CI, a tenth under the quick profile."""
    if os.environ.get("HYPOTHESIS_PROFILE") == "quick":
        count //= 10
    return max(1, int(count * _SCALE))


# Never in an answer: Python's traceback header, a frame line, a path into the installed packages.
_LEAKS = (b"Traceback (most recent call last)", b'.py", line ', b"site-packages")


def assert_deliberate(status: int, body: bytes, *, allowed: set[int] | None = None) -> None:
    """An answer the code chose: no 500 (a crash) and no 503 (the suite's Redis and store are up)."""
    assert status not in (500, 503), f"{status}: {body[:300]!r}"
    assert 100 <= status < 500, f"{status}: {body[:300]!r}"
    if allowed is not None:
        assert status in allowed, f"{status} not in {sorted(allowed)}: {body[:300]!r}"
    for leak in _LEAKS:
        assert leak not in body, f"{status} answer leaks {leak!r}: {body[:300]!r}"


class Blob(bytes):
    """A request body whose repr stays short when hypothesis reports a failing example (bodies reach 64 KB)."""

    def __repr__(self) -> str:
        if len(self) <= 200:
            return f"Blob({bytes(self)!r})"
        return f"Blob({bytes(self[:120])!r} ... {bytes(self[-40:])!r}, {len(self)} bytes)"


def store_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every object under the store's root: path -> (size, mtime in ns). A rewrite changes the mtime."""
    snapshot: dict[str, tuple[int, int]] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            stat = os.stat(path)
            snapshot[path] = (stat.st_size, stat.st_mtime_ns)
    return snapshot


def store_root(storage_url: str) -> Path:
    assert storage_url.startswith("file://"), storage_url
    return Path(storage_url.removeprefix("file://"))


def header_safe(text: str) -> str:
    """A value werkzeug's test client and requests will put in a header (latin-1, no line breaks)."""
    return "".join(c for c in text if c not in "\r\n\0" and ord(c) < 256)


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
