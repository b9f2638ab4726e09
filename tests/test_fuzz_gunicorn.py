"""A shorter property-based run through the deployed web process: gunicorn with gunicorn.conf.py.

The same generated requests as tests/test_fuzz_inbound.py (signed garbage, bad signatures) plus owner
API requests with random auth, sent over real HTTP. Properties: every answer is deliberate (no 500,
no 503, no traceback); a refused request stores nothing; gunicorn's master stays up and ``/healthz``
answers throughout; its log shows no traceback and no killed worker.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.context import Bridge
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, make_owner
from tests.fuzzing import Blob, assert_deliberate, cases, store_root
from tests.postal_sim import PostalSigner
from tests.test_fuzz_inbound import SIGNER, bad_signatures, random_text, signed_requests
from tests.webproc import gunicorn_process

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def postal_signer() -> PostalSigner:
    return PostalSigner(1024)


class Deployed:
    def __init__(self, url: str, pid: int, log: Path, root: Path, owner: Owner) -> None:
        self.url, self.pid, self.log, self.root, self.owner = url, pid, log, root, owner
        self.session = requests.Session()
        self.sent = 0

    def objects(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.root))

    def up(self) -> None:
        os.kill(self.pid, 0)  # the master is still there (raises if not)
        assert self.session.get(f"{self.url}/healthz", timeout=10).status_code == 200


@pytest.fixture
def deployed(environment: dict[str, str], tmp_path: Path, postal_signer: PostalSigner) -> Iterator[Deployed]:
    bridge = Bridge(Settings.from_env(environment))
    owner = make_owner(bridge, f"support@{DOMAIN}")
    SIGNER[:] = [postal_signer]
    log = tmp_path / "gunicorn.log"
    with gunicorn_process(environment, log) as (url, pid):
        target = Deployed(url, pid, log, store_root(bridge.settings.storage_url), owner)
        yield target
        target.up()
    SIGNER.clear()
    text = log.read_text(errors="replace")
    for sign in ("Traceback", "WORKER TIMEOUT", "[CRITICAL]", "was sent SIGKILL"):
        assert sign not in text, text[-3000:]


@st.composite
def api_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    rnd = random.Random(draw(st.integers(0, 2**32)))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    path = rnd.choice(
        [
            "/api/v1/messages?folder=" + rnd.choice(["inbox", "other", "nope", "", "%00"]),
            "/api/v1/messages?limit=" + rnd.choice(["0", "50", "201", "-1", "nan", "x"]),
            "/api/v1/messages?before=" + rnd.choice(["nan", "inf", "1e309", "12.5", "x"]),
            "/api/v1/messages/" + "a" * 32,
            "/api/v1/messages/" + "a" * 32 + "/move",
            "/api/v1/handshakes",
            "/api/v1/handshake-offers",
            "/api/v1/" + "".join(rnd.choice("abc/%.") for _ in range(rnd.randrange(30))),
        ]
    )
    return (
        method,
        path,
        {"Authorization": "@token@" if rnd.random() < 0.5 else "Bearer nope"},
        (random_text(rnd, 200).encode("utf-8", "replace") if method != "GET" else None),
    )


requests_to_send = st.one_of(
    signed_requests("RawMessage").map(lambda r: ("inbound", r)),
    signed_requests("Hash").map(lambda r: ("inbound", r)),
    bad_signatures().map(lambda r: ("inbound", r)),
    api_requests().map(lambda r: ("api", r)),
)


def test_gunicorn_answers_generated_requests_deliberately_and_stays_up(deployed: Deployed) -> None:
    @settings(max_examples=cases(300))
    @given(item=requests_to_send)
    def check(item: tuple[str, Any]) -> None:
        kind, request = item
        before = deployed.objects()
        if kind == "inbound":
            body, headers = request
            headers = {k: v.strip() for k, v in headers.items()}  # requests refuses surrounding whitespace
            response = deployed.session.post(f"{deployed.url}/postal/inbound", data=body, headers=headers, timeout=30)
        else:
            method, path, headers, body = request
            if headers["Authorization"] == "@token@":
                headers = {"Authorization": f"Bearer {deployed.owner.token}"}
            response = deployed.session.request(method, f"{deployed.url}{path}", data=body, headers=headers, timeout=30)
        assert_deliberate(response.status_code, response.content)
        if response.status_code >= 400:
            assert deployed.objects() == before, f"{response.status_code} but an object was stored"
        deployed.sent += 1
        if deployed.sent % 50 == 0:
            deployed.up()

    check()
    assert deployed.sent >= cases(300) * 9 // 10  # the cases really ran


@st.composite
def raw_http(draw: st.DrawFn) -> bytes:
    """A request as bytes on the wire, framed wrongly in every way gunicorn and the bridge must survive:
    chunk sizes that are not hex or lie, Content-Length and Transfer-Encoding together or repeated,
    bodies cut short, junk where the request line or a header belongs."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    path = rnd.choice(["/postal/inbound", "/api/v1/messages", "/api/v1/handshakes", "/healthz", "/x"])
    method = rnd.choice(["POST", "PUT", "GET", "POST"])
    body = rnd.randbytes(rnd.randrange(200))
    lines = [f"{method} {path} HTTP/1.1", "Host: bridge", "Content-Type: application/json"]
    framing = draw(st.sampled_from(["length", "short", "chunked", "bad_chunk", "both", "two_lengths", "junk"]))
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "short":  # announces more than it sends; the client then closes its side
        lines.append(f"Content-Length: {len(body) + rnd.randrange(1, 10_000)}")
        payload = body
    elif framing in ("chunked", "bad_chunk"):
        lines.append("Transfer-Encoding: chunked")
        size = f"{len(body):x}" if framing == "chunked" else rnd.choice(["zz", "-1", "", "1" * 20, "0x10", "5;x=\x00"])
        payload = size.encode() + b"\r\n" + body + (b"\r\n0\r\n\r\n" if rnd.random() < 0.7 else b"")
    elif framing == "both":
        lines += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
        payload = body
    elif framing == "two_lengths":
        lines += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
        payload = body
    else:
        lines[rnd.randrange(len(lines))] = random_text(rnd, 60).encode("utf-8", "replace").decode("latin-1")
        payload = body
    if rnd.random() < 0.3:
        lines.append("Authorization: " + rnd.choice(["Bearer x", "Basic", "Bearer " + "y" * 9000]))
    return Blob("\r\n".join(lines).encode("latin-1", "replace") + b"\r\n\r\n" + payload)


def test_gunicorn_survives_misframed_requests(deployed: Deployed) -> None:
    port = int(deployed.url.rsplit(":", 1)[1])

    @settings(max_examples=cases(150))
    @given(wire=raw_http())
    def check(wire: bytes) -> None:
        before = deployed.objects()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(wire)
            conn.shutdown(socket.SHUT_WR)  # nothing more is coming: no one waits out a read deadline
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        if answer:  # closing without a word is allowed for garbage; a word must be a deliberate one
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1."), answer[:200]
            status = int(status_line.split()[1])
            assert_deliberate(status, answer.split(b"\r\n\r\n", 1)[-1])
            if status >= 400:
                assert deployed.objects() == before
        deployed.sent += 1
        if deployed.sent % 25 == 0:
            deployed.up()

    check()
    assert deployed.sent >= cases(150) * 9 // 10  # the cases really ran
