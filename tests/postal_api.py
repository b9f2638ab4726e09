"""Postal's send and message API as the bridge sees it: a real HTTP server on 127.0.0.1, from postal.md §3.

Written from Postal 3.3.6's LegacyAPI controllers (base, send, messages): every handled outcome is HTTP
200 with ``{"status", "time", "flags", "data"}`` (Rails' JSON, ``postal_sim.ruby_json``); the key is checked
before anything else (AccessDenied, InvalidServerAPIKey which echoes the key as ``data.token``,
ServerSuspended); ``send/raw`` refuses a From/Sender outside the verified domains with a bare
``UnauthenticatedFromAddress`` and creates one message (id, token) per distinct recipient; bad JSON is
400; a Host other than Postal's web hostname is 403 (Rails' host authorization). Two checks go beyond
Postal's ``send/raw``, which takes any number of recipients and answers an empty list with an empty
success: here an empty list is ``NoRecipients`` and more than ``max_recipients`` (50) is
``TooManyToAddresses``, the limits of ``send/message`` that the bridge keeps for both.

It counts what it accepted per recipient (``accepted``; ``duplicates()`` names double sends), and it
can misbehave on purpose for the next N requests (``fail_next``): answer slowly or in a trickle after
accepting, answer a proxy's 3xx/4xx/5xx page or any 200 body with or without accepting first, reset the
connection mid-answer or before any answer, or refuse with a Postal error code. ``refusing()`` stops
listening, so connections are refused; ``gzip`` compresses answers as a proxy may; ``jwks`` serves
Postal's signing keys on the same URL, as Postal's web host does. Never imported by the service.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import email.parser
import email.policy
import email.utils
import gzip
import json
import secrets
import socket
import string
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.postal_sim import ruby_json

API_KEY = "postal-test-key-9f3k2LmQ"
_TOKEN_ALPHABET = string.ascii_letters + string.digits
_FAULT_KINDS = ("slow", "drip", "http", "answer", "reset", "drop", "error")


@dataclass
class SentMessage:
    """One message Postal created: one per recipient of an accepted call."""

    id: int
    token: str
    rcpt_to: str
    mail_from: str
    message_id: str
    raw: bytes
    bounce: bool
    timestamp: float
    status: str = "Pending"
    deliveries: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SeenRequest:
    path: str
    host: str
    api_key: str | None
    connection: str | None
    body: bytes


@dataclass
class Fault:
    kind: str  # one of _FAULT_KINDS
    accept: bool  # process (and count) the call before misbehaving
    status: int = 502
    code: str = "ServerSuspended"
    message: str | None = None
    delay: float = 2.0
    size: int = 0
    body: bytes = b""


class PostalSendAPI:
    """The server: ``url`` to give the client, ``accepted`` (recipient -> count), ``messages`` by id."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        verified_domains: tuple[str, ...] = ("example.test",),
        web_hostname: str = "127.0.0.1",
        max_recipients: int = 50,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.verified_domains = {d.lower() for d in verified_domains}
        self.web_hostname = web_hostname
        self.max_recipients = max_recipients
        self.suspended = False
        self.gzip = False  # compress JSON answers for clients that accept it, as a proxy in front may
        # Postal's web host also serves its signing keys; set a JWKS document to serve GET /.well-known/jwks.json.
        self.jwks: dict[str, Any] | None = None
        self.accepted: collections.Counter[str] = collections.Counter()
        self.messages: dict[int, SentMessage] = {}
        self.seen: list[SeenRequest] = []
        self._faults: list[Fault] = []
        self._next_id = 1000
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._listen(port)
        assert self._server is not None
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"

    # -- programming it -------------------------------------------------------------------------------

    def fail_next(
        self,
        kind: str,
        times: int = 1,
        *,
        status: int = 502,
        code: str = "ServerSuspended",
        message: str | None = None,
        delay: float = 2.0,
        size: int = 0,
        body: bytes = b"",
        accept: bool | None = None,
    ) -> None:
        """Misbehave on the next ``times`` requests.

        ``slow``: accept, then answer after ``delay`` s · ``drip``: accept, then send the answer in 8 pieces
        ``delay`` s apart · ``http``: answer ``status`` with a proxy's HTML page (at least ``size`` bytes; a
        ``Location`` for 3xx), accepting first only with ``accept=True`` · ``answer``: a 200 with ``body``
        as it is (accepting first only with ``accept=True``) · ``reset``: accept, send the headers and half the body, then RST · ``drop``:
        accept, then RST before any answer byte · ``error``: answer Postal's error ``code``, accepting nothing
        (``message`` as its ``data.message``, if given).
        """
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        if accept is None:
            accept = kind in ("slow", "drip", "reset", "drop")
        with self._lock:
            self._faults.extend(Fault(kind, accept, status, code, message, delay, size, body) for _ in range(times))

    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """Not listening inside the block: connections to ``url`` are refused. Listens again after it."""
        self._stop_listening()
        try:
            yield
        finally:
            self._listen(self.port)

    def duplicates(self) -> dict[str, int]:
        """Recipients Postal accepted more than once: what "never send twice" must keep empty."""
        with self._lock:
            return {rcpt: count for rcpt, count in self.accepted.items() if count > 1}

    def deliver(self, postal_id: int, status: str = "Sent", output: str = "250 2.0.0 OK") -> None:
        """Record a delivery attempt, as Postal's delivery queue would, and set the message's status."""
        with self._lock:
            message = self.messages[postal_id]
            message.status = status
            message.deliveries.append(
                {
                    "id": len(message.deliveries) + 1,
                    "status": status,
                    "details": f"Message for {message.rcpt_to} accepted by mx.example.net",
                    "output": output,
                    "sent_with_ssl": True,
                    "log_id": "P3-" + uuid.uuid4().hex[:8],
                    "time": 0.25,
                    "timestamp": time.time(),
                }
            )

    def close(self) -> None:
        self._closing.set()  # slow answers stop waiting
        self._stop_listening()

    def __enter__(self) -> PostalSendAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ---------------------------------------------------------------------------------------

    def _listen(self, port: int) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                owner._handle(self)

            do_GET = do_PUT = do_PATCH = do_POST  # Postal routes the legacy API for all four

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test output is for assertions."""

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        host = (handler.headers.get("Host") or "").rsplit(":", 1)[0]
        path = handler.path.split("?", 1)[0]
        handler.close_connection = True
        if handler.command == "GET" and path == "/.well-known/jwks.json" and self.jwks is not None:
            if host != self.web_hostname:  # neither counted nor faulted: only the API calls are
                return _send(handler, 403, b"<html><body><h1>Blocked host</h1></body></html>", "text/html")
            return _send(handler, 200, ruby_json(self.jwks))
        with self._lock:
            self.seen.append(
                SeenRequest(
                    path, host, handler.headers.get("X-Server-API-Key"), handler.headers.get("Connection"), body
                )
            )
            fault = self._faults.pop(0) if self._faults else None
        if host != self.web_hostname:  # Rails' HostAuthorization, before any controller
            return _send(handler, 403, b"<html><body><h1>Blocked host</h1></body></html>", "text/html")
        if fault is not None and fault.kind == "error":
            return _send(
                handler, 200, self._error(started, fault.code, {"message": fault.message} if fault.message else {})
            )
        if fault is not None and fault.kind == "http" and not fault.accept:
            return self._proxy_page(handler, fault)
        if fault is not None and fault.kind == "answer" and not fault.accept:
            return _send(handler, 200, fault.body)
        status, answer = self._answer(handler, path, body, started)
        if fault is None:
            if self.gzip and "gzip" in (handler.headers.get("Accept-Encoding") or "") and status == 200:
                return _send(handler, status, gzip.compress(answer), encoding="gzip")
            return _send(handler, status, answer)
        if fault.kind == "http":
            return self._proxy_page(handler, fault)
        if fault.kind == "answer":
            return _send(handler, 200, fault.body)
        if fault.kind == "drip":
            head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
            with contextlib.suppress(OSError):
                handler.wfile.write(head.encode())
                for i in range(8):
                    if self._closing.wait(fault.delay):
                        break
                    handler.wfile.write(answer[i * len(answer) // 8 : (i + 1) * len(answer) // 8])
            return None
        if fault.kind == "slow":
            self._closing.wait(fault.delay)
            with contextlib.suppress(OSError):
                _send(handler, status, answer)
            return None
        if fault.kind == "reset":
            head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
            handler.wfile.write(head.encode() + answer[: len(answer) // 2])
            time.sleep(0.05)  # let the client read the head before the reset
        _reset(handler.connection)  # reset, or drop: nothing answered at all
        return None

    def _proxy_page(self, handler: BaseHTTPRequestHandler, fault: Fault) -> None:
        page = b"<html><body>" + b" " * fault.size + b"Bad Gateway</body></html>"
        if 300 <= fault.status < 400:
            handler.send_response(fault.status)
            handler.send_header("Location", f"{self.url}/api/v1/send/raw")
            handler.send_header("Content-Length", str(len(page)))
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(page)
            return
        _send(handler, fault.status, page, "text/html")

    def _answer(self, handler: BaseHTTPRequestHandler, path: str, body: bytes, started: float) -> tuple[int, bytes]:
        actions = {
            "/api/v1/send/raw": self._send_raw,
            "/api/v1/messages/message": self._message,
            "/api/v1/messages/deliveries": self._deliveries,
        }
        action = actions.get(path)
        if action is None:
            return 404, b"Not Found"
        key = handler.headers.get("X-Server-API-Key")
        if not key:
            return 200, self._error(started, "AccessDenied", {"message": "Must be authenticated as a server."})
        if key != self.api_key:
            message = "The API token provided in X-Server-API-Key was not valid."
            return 200, self._error(started, "InvalidServerAPIKey", {"message": message, "token": key})
        if self.suspended:
            return 200, self._error(started, "ServerSuspended", {})
        params: Any = {}
        if (handler.headers.get("Content-Type") or "").startswith("application/json"):
            try:
                params = json.loads(body)
            except ValueError:
                return 400, b"Bad Request"
        if not isinstance(params, dict):
            params = {}
        return 200, action(params, started)

    def _send_raw(self, params: dict[str, Any], started: float) -> bytes:
        rcpt_to, mail_from, data = params.get("rcpt_to"), params.get("mail_from"), params.get("data")
        for name, value in (("rcpt_to", rcpt_to), ("mail_from", mail_from), ("data", data)):
            if (name == "rcpt_to" and not isinstance(value, list)) or (name != "rcpt_to" and not value):
                return self._parameter_error(started, f"`{name}` parameter is required but is missing")
        assert isinstance(rcpt_to, list)
        try:
            raw = base64.b64decode(str(data))  # Ruby's decode64 is as lenient
        except (binascii.Error, ValueError):
            raw = b""
        if not rcpt_to:
            message = "There are no recipients defined to receive this message"
            return self._error(started, "NoRecipients", {"message": message})
        if len(rcpt_to) > self.max_recipients:
            message = f"The maximum number of To addresses has been reached (maximum {self.max_recipients})"
            return self._error(started, "TooManyToAddresses", {"message": message})
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw.split(b"\r\n\r\n")[0])
        senders = email.utils.getaddresses(
            [str(v) for v in headers.get_all("From", []) + headers.get_all("Sender", [])]
        )
        if not any(addr.rpartition("@")[2].lower() in self.verified_domains for _, addr in senders):
            return self._error(started, "UnauthenticatedFromAddress", {})
        message_id = (headers.get("Message-ID") or "").strip().strip("<>") or f"{uuid.uuid4()}@rp.postal.example.test"
        result: dict[str, Any] = {"message_id": message_id, "messages": {}}
        with self._lock:
            for rcpt in dict.fromkeys(str(r) for r in rcpt_to):  # Postal: rcpt_to.uniq
                self._next_id += 1
                token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(12))
                self.messages[self._next_id] = SentMessage(
                    self._next_id, token, rcpt, str(mail_from), message_id, raw, bool(params.get("bounce")), time.time()
                )
                self.accepted[rcpt] += 1
                result["messages"][rcpt] = {"id": self._next_id, "token": token}
        return self._success(started, result)

    def _find(self, params: dict[str, Any], started: float) -> SentMessage | bytes:
        postal_id = params.get("id")
        if postal_id in (None, ""):
            return self._parameter_error(started, "`id` parameter is required but is missing")
        if not isinstance(postal_id, str | int) or isinstance(postal_id, bool):
            return self._parameter_error(started, "`id` parameter must be a string or integer")
        try:
            number = int(postal_id)
        except ValueError:
            number = 0  # Ruby's "abc".to_i
        message = self.messages.get(number)
        if message is None:
            data = {"message": "No message found matching provided ID", "id": postal_id}
            return self._error(started, "MessageNotFound", data)
        return message

    def _message(self, params: dict[str, Any], started: float) -> bytes:
        message = self._find(params, started)
        if isinstance(message, bytes):
            return message
        expansions = params.get("_expansions")
        wanted = (lambda name: True) if expansions is True else (lambda name: name in (expansions or []))
        data: dict[str, Any] = {"id": message.id, "token": message.token}
        if wanted("status"):
            last = message.deliveries[-1]["timestamp"] if message.deliveries else None
            data["status"] = {
                "status": message.status,
                "last_delivery_attempt": last,
                "held": False,
                "hold_expiry": None,
            }
        if wanted("details"):
            data["details"] = {
                "rcpt_to": message.rcpt_to,
                "mail_from": message.mail_from,
                "subject": None,
                "message_id": message.message_id,
                "timestamp": message.timestamp,
                "direction": "outgoing",
                "size": str(len(message.raw)),
                "bounce": message.bounce,
                "bounce_for_id": 0,
                "bounce_type": None,
                "tag": None,
                "received_with_ssl": True,
            }
        if wanted("raw_message"):
            data["raw_message"] = base64.encodebytes(message.raw).decode("ascii")
        return self._success(started, data)

    def _deliveries(self, params: dict[str, Any], started: float) -> bytes:
        message = self._find(params, started)
        if isinstance(message, bytes):
            return message
        return self._success(started, list(message.deliveries))

    @staticmethod
    def _envelope(started: float, status: str, data: Any) -> bytes:
        return ruby_json({"status": status, "time": round(time.monotonic() - started, 3), "flags": {}, "data": data})

    def _success(self, started: float, data: Any) -> bytes:
        return self._envelope(started, "success", data)

    def _error(self, started: float, code: str, data: dict[str, Any]) -> bytes:
        return self._envelope(started, "error", {**data, "code": code})

    def _parameter_error(self, started: float, message: str) -> bytes:
        return self._envelope(started, "parameter-error", {"message": message})


def _send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    encoding: str = "",
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if encoding:
        handler.send_header("Content-Encoding", encoding)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


def _reset(connection: socket.socket) -> None:
    """Close with an RST (linger 0), as a crashed proxy or a dropped NAT entry does."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


@pytest.fixture
def postal_api() -> Iterator[PostalSendAPI]:
    """Postal's send API on loopback, with the suite's API key (``tests.postal_api.API_KEY``)."""
    with PostalSendAPI() as server:
        yield server
