"""The baseline for ``make bench``: a bare WSGI endpoint that reads the whole body and answers 200.

Served by the same gunicorn settings as the bridge (``gunicorn bench.bare:app``), it measures what
gunicorn, the loopback socket and reading a body cost on this machine, so the bridge's numbers can be
quoted as a ratio to it. It reads the body the way the bridge's view does (1 MiB ``read`` calls copied
into one preallocated buffer of Content-Length bytes; gunicorn's input has no ``readinto``), so the
memory baseline holds what any endpoint must: one copy of the body plus gunicorn's own buffers.

It must never do more than that: no Flask, no parsing, no I/O beyond the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

_CHUNK = 1 << 20
_OK = [b"ok\n"]


def _read_body(environ: dict[str, Any]) -> int:
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length <= 0:
        total = 0
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
        return total
    body = bytearray(length)
    view, filled = memoryview(body), 0
    while filled < length:
        data = stream.read(min(_CHUNK, length - filled))
        if not data:
            break
        view[filled : filled + len(data)] = data
        filled += len(data)
    view.release()
    return filled


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Read the whole request body, answer ``200 ok``."""
    _read_body(environ)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(_OK[0])))])
    return _OK
