"""Slow, short and malformed request bodies against the deployed web process (gunicorn + gunicorn.conf.py).

Anyone can reach the endpoint. A body that trickles in or never completes must be cut off after
BRIDGE_READ_TIMEOUT with a deliberate status, free its thread, and slow nobody else; malformed chunking
is a 400, not a 503 (which would have Postal retry for a day); gunicorn never answers its own 500.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bridge.context import Bridge
from bridge.settings import Settings
from tests.conftest import DOMAIN, make_owner
from tests.postal_sim import PostalSimulator, raw_payload
from tests.webproc import gunicorn_process

READ_TIMEOUT = 2.0


@pytest.fixture
def web(environment: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, Path]]:
    log = tmp_path / "gunicorn.log"
    with gunicorn_process(environment, log, BRIDGE_READ_TIMEOUT=str(READ_TIMEOUT), BRIDGE_WEB_THREADS="4") as (
        url,
        _pid,
    ):
        yield int(url.rsplit(":", 1)[1]), log


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _head(length: int | None, *, path: str = "/postal/inbound") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()


def _response(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def _no_server_errors(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert '" 500 ' not in text and '" 503 ' not in text


def test_a_body_that_never_completes_is_cut_off_with_408(web: tuple[int, Path]) -> None:
    port, log = web
    with _connect(port) as conn:
        started = time.monotonic()
        conn.sendall(_head(10_000) + b"{" * 100)
        answer = _response(conn)  # the server closes the connection after answering
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert READ_TIMEOUT - 0.2 <= waited < READ_TIMEOUT + 5
    _no_server_errors(log)


def test_a_trickling_chunked_body_is_cut_off_with_408(web: tuple[int, Path]) -> None:
    port, log = web
    with _connect(port) as conn:
        conn.sendall(_head(None))
        started = time.monotonic()
        conn.settimeout(0.4)
        answer = b""
        while time.monotonic() - started < READ_TIMEOUT + 5 and not answer:
            try:
                conn.sendall(b"1\r\nx\r\n")  # one byte every 0.4 s: never idle long enough for a per-read timeout
                answer = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    _no_server_errors(log)


def test_a_body_shorter_than_its_length_is_a_400(web: tuple[int, Path]) -> None:
    port, log = web
    with _connect(port) as conn:
        conn.sendall(_head(10_000) + b"{" * 100)
        conn.shutdown(socket.SHUT_WR)  # the client is done: 9,900 bytes will never come
        answer = _response(conn)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    _no_server_errors(log)


@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"-1\r\n\r\n"])
def test_malformed_chunking_is_a_400(web: tuple[int, Path], chunks: bytes) -> None:
    port, log = web
    with _connect(port) as conn:
        conn.sendall(_head(None) + chunks)
        answer = _response(conn)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    _no_server_errors(log)


def test_headers_that_never_end_are_dropped(web: tuple[int, Path]) -> None:
    port, log = web
    with _connect(port) as conn:
        started = time.monotonic()
        conn.sendall(b"POST /postal/inbound HTTP/1.1\r\nHost: bridge\r\nX-Slow: ")
        answer = _response(conn)  # gunicorn closes without a response: there is no request to answer
        waited = time.monotonic() - started
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    assert waited < READ_TIMEOUT + 5
    _no_server_errors(log)


def test_slow_clients_do_not_delay_normal_deliveries(
    web: tuple[int, Path], environment: dict[str, str], postal_signer
) -> None:
    port, log = web
    owner = make_owner(Bridge(Settings.from_env(environment)), f"support@{DOMAIN}")
    # More stalled bodies than there are web processes (2): each holds one thread, never a process.
    stalled = [_connect(port) for _ in range(6)]
    for conn in stalled:
        conn.sendall(_head(10_000) + b"{" * 100)
    simulator = PostalSimulator(f"http://127.0.0.1:{port}/postal/inbound", postal_signer)

    def deliver(postal_id: int) -> tuple[int, float]:
        payload = raw_payload(
            postal_id=postal_id,
            rcpt_to=owner.mailbox.email,
            mail_from="jane@example.org",
            message=b"From: Jane <jane@example.org>\r\nSubject: hi\r\n\r\nhello\r\n",
        )
        started = time.monotonic()
        attempt = simulator.post(payload)
        return attempt.status, time.monotonic() - started

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(deliver, range(1, 11)))
    finally:
        answers = []
        for conn in stalled:
            with conn:
                answers.append(_response(conn)[:12])
    assert [status for status, _ in results] == [200] * 10
    # The stalled bodies are cut at 2 s; normal deliveries must not have waited for them.
    assert max(elapsed for _, elapsed in results) < READ_TIMEOUT, results
    assert answers == [b"HTTP/1.1 408"] * 6
    _no_server_errors(log)


def test_a_slow_owner_api_body_is_cut_off_too(web: tuple[int, Path]) -> None:
    port, log = web
    with _connect(port) as conn:
        conn.sendall(
            b"PUT /api/v1/handshakes HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer mbx_x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
        )
        started = time.monotonic()
        answer = _response(conn)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert time.monotonic() - started < READ_TIMEOUT + 5
    _no_server_errors(log)
