"""Every log line the test suite makes, checked for what must never be logged.

``conftest.py`` installs ``SessionLog`` on the root logger for the whole session (the lines of the
bridge's code running inside pytest, at the bridge's default level INFO, formatted as in production)
and, when the session ends, reads the logs of the processes the tests started (gunicorn, the worker,
``python -m bridge run``: every ``*.log``, ``*.err`` and ``*.out`` under pytest's temporary directory,
except the logs of the real Redis, moto, Knot and Ceph servers). Any line holding one of ``LEAKS``
fails the session, with where it was found.

The patterns are what the tests use: every address (test mailboxes, senders, recipients), the owner
API's bearer tokens (``mbx_...``), the send API's key (``tests.postal_api.API_KEY``), private keys
(PEM or JWK) and a message's header block.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from bridge.logs import JsonFormatter

LEAKS: dict[str, re.Pattern[str]] = {
    # Not a Message-ID such as Postal's <32 random characters>@<domain>: an id, worth logging to find it in Postal.
    "an e-mail address": re.compile(
        r"(?<![A-Za-z0-9._%+=-])(?![a-z0-9]{20,}@)[A-Za-z0-9._%+=-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}"
    ),
    "a bearer token": re.compile(r"mbx_[A-Za-z0-9_-]{16,}"),
    "the Postal API key": re.compile(r"postal-test-key-[A-Za-z0-9]+"),  # tests.postal_api.API_KEY (checked below)
    "private key material": re.compile(r'PRIVATE KEY|\\?"d\\?"\s*:\s*\\?"[A-Za-z0-9_-]{20,}'),
    "message contents": re.compile(r"\bSubject: |\bDKIM-Signature: |Content-Type: text/plain"),
}

#: Logs of third-party servers the suite runs (they see object keys, which hold addresses; that is theirs).
_NOT_OURS = {"redis.log", "moto.log", "knotd.log"}
_SUFFIXES = {".log", ".err", ".out"}


def _check_api_key_pattern() -> None:
    # Not imported at the top: conftest imports this module before pytest registers tests.postal_api.
    from tests.postal_api import API_KEY

    assert LEAKS["the Postal API key"].fullmatch(API_KEY), "update the pattern to the suite's API key"


def leaks_in(line: str) -> list[str]:
    return [name for name, pattern in LEAKS.items() if pattern.search(line)]


class SessionLog(logging.Handler):
    """Keeps every line logged in this process, formatted as the bridge formats it in production."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.found: list[tuple[str, str]] = []  # (test that was running, line) for each leaking line
        self.lines = 0
        self.current_test = "(no test)"
        self._lock_found = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot be formatted is not ours to judge
            return
        self.lines += 1
        if leaks_in(line):
            with self._lock_found:
                self.found.append((self.current_test, line))


def process_logs(root: Path) -> Iterator[Path]:
    """The log files of the bridge's processes under ``root`` (pytest's base temporary directory)."""
    for path in sorted(root.rglob("*")):
        if path.suffix in _SUFFIXES and path.name not in _NOT_OURS and path.parent.name != "log" and path.is_file():
            yield path


def leaking_lines(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    for path in paths:
        with path.open(errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if leaks_in(line):
                    yield f"{path}:{number}", line.rstrip("\n")


def report(found: Iterable[tuple[str, str]], limit: int = 20) -> str:
    """One line per kind of leaking line (digits aside), with how often and where it was first seen."""
    kinds: dict[str, tuple[str, str, int]] = {}
    for where, line in found:
        kind = re.sub(r"[0-9]+", "N", re.sub(r'^\{"time":"[^"]*",', "{", line))[:200]
        first = kinds.get(kind)
        kinds[kind] = (first[0], first[1], first[2] + 1) if first else (where, line, 1)
    lines = [
        f"  {n}x, first at {where}: {', '.join(leaks_in(line))}: {line[:300]}" for where, line, n in kinds.values()
    ]
    return "\n".join(lines[:limit] + (["  ..."] if len(lines) > limit else []))
