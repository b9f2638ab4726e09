"""Log lines: one JSON object a line (``BRIDGE_LOG_FORMAT=json``, the default) or plain text (``text``).

The same formatter serves the web processes, gunicorn's own error log (``gunicorn.conf.py``) and the
worker, so one log pipeline reads them all. Every line a request causes carries that request's id
(``request_id``: the proxy's ``X-Request-Id`` when it sent a sane one, else a new one, and the answer
says which); a job queued by a request carries the same id in its RQ ``meta`` (never as an argument),
so the worker's lines about that message carry it too, beside the job's id.

What a line may hold is decided where it is written: ids, counts, outcomes, a recipient's domain, a
KID. Never message contents, tokens, API keys or whole addresses (``tests/test_logging.py`` greps every
line the test suite makes for them).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("bridge_request_id", default=None)
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("bridge_job_id", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{8,64}")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # RQ colours its lines for terminals
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def new_request_id(offered: str | None = None) -> str:
    """The proxy's id when it looks like one (so lines join up with the proxy's log), else a fresh one."""
    if offered and _SANE_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex[:16]


def current_request_id() -> str | None:
    return REQUEST_ID.get()


@contextlib.contextmanager
def job_context(job_id: str | None, request_id: str | None) -> Iterator[None]:
    """While a job runs, its lines name the job and the request that queued it."""
    job_token = JOB_ID.set(job_id)
    request_token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        JOB_ID.reset(job_token)
        REQUEST_ID.reset(request_token)


def _context(record: logging.LogRecord) -> dict[str, str]:
    found = {}
    for key, var in (("request_id", REQUEST_ID), ("job_id", JOB_ID)):
        value = getattr(record, key, None) or var.get()
        if value:
            found[key] = str(value)
    return found


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id"?, "job_id"?, "process", "error"?}``, one line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _ANSI.sub("", record.getMessage()),
            **_context(record),
            "process": record.process,
        }
        if record.exc_info and record.exc_info[0] is not None:
            # The class only: a traceback's text can quote values (a library's message, say).
            document["error"] = record.exc_info[0].__name__
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """For a developer's terminal: the classic line, with the request or job id at its end."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        return f"{line} [{' '.join(f'{k}={v}' for k, v in context.items())}]" if context else line

    def formatException(self, ei: Any) -> str:
        return f"({ei[0].__name__})" if ei and ei[0] is not None else ""


def formatter(log_format: str) -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()


class _BridgeHandler(logging.StreamHandler):
    """Marks the handler this module installed, so configuring twice does not log twice."""


def configure(level: str, log_format: str) -> None:
    """The process's root handler on stderr, unless something (pytest, an embedding program) set one up."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _BridgeHandler)]
    if ours:
        for handler in ours:
            handler.setFormatter(formatter(log_format))
        root.setLevel(level)
        return
    if root.handlers:
        return  # as logging.basicConfig does: someone else owns the root logger
    handler = _BridgeHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)
    root.setLevel(level)
