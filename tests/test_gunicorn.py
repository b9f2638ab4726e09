"""The deployed shape: gunicorn serving wsgi:app and `python -m bridge worker`, as real processes.

The werkzeug server other tests use hands the app a different input stream than gunicorn does;
this file catches what only the production server shows.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bridge.context import Bridge
from bridge.sealing import open_sealed
from bridge.settings import Settings
from tests.conftest import DOMAIN, make_owner
from tests.postal_sim import PostalSimulator, raw_payload, ruby_json
from tests.webproc import ROOT, gunicorn_process


@pytest.fixture
def gunicorn(environment: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with gunicorn_process(environment, tmp_path / "gunicorn.log") as (url, _pid):
        yield url


def test_postal_to_gunicorn_to_worker_to_owner(gunicorn, environment, postal_signer):
    bridge = Bridge(Settings.from_env(environment))
    owner = make_owner(bridge, f"support@{DOMAIN}")
    big = b"From: Jane <jane@example.org>\r\nSubject: big\r\n\r\n" + b"x" * 3_000_000 + b"\r\n"
    sent = {}
    for postal_id, (encoding, message) in enumerate(
        [("BodyAsJSON", b"From: Jane <jane@example.org>\r\n\r\nhi\r\n"), ("FormData", big), ("BodyAsJSON", big)], 1
    ):
        payload = raw_payload(
            postal_id=postal_id, rcpt_to=f"support@{DOMAIN}", mail_from="jane@example.org", message=message
        )
        attempt = PostalSimulator(f"{gunicorn}/postal/inbound", postal_signer, encoding=encoding).post(payload)
        assert (attempt.status, attempt.body_text.strip()) == (200, "stored")
        sent[postal_id] = base64.b64decode(payload["message"])

    # chunked transfer encoding (no Content-Length) reads the same way
    payload = raw_payload(postal_id=9, rcpt_to=f"support@{DOMAIN}", mail_from="jane@example.org", message=big)
    body = ruby_json(payload)
    headers = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
    response = requests.post(
        f"{gunicorn}/postal/inbound", data=iter([body[:1000], body[1000:]]), headers=headers, timeout=30
    )
    assert response.status_code == 200 and response.text == "stored\n"
    sent[9] = base64.b64decode(payload["message"])

    env = {**os.environ, **environment, "PYTHONPATH": str(ROOT)}
    worker = subprocess.run(
        [sys.executable, "-m", "bridge", "worker", "--burst"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]

    auth = {"Authorization": f"Bearer {owner.token}"}
    listing = requests.get(f"{gunicorn}/api/v1/messages?folder=other", headers=auth, timeout=10).json()["messages"]
    assert sorted(r["postal"]["id"] for r in listing) == [1, 2, 3, 9]
    for record in listing:
        body = requests.get(f"{gunicorn}/api/v1/messages/{record['id']}", headers=auth, timeout=30).json()["body"]
        assert open_sealed(body, owner.private_jwk) == sent[record["postal"]["id"]]


def test_gunicorn_refuses_an_oversize_delivery_before_reading_it(gunicorn, environment):
    port = int(gunicorn.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"POST /postal/inbound HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999999\r\n\r\n"
        )
        assert conn.recv(4096).startswith(b"HTTP/1.1 413")


def test_gunicorn_refuses_an_oversize_chunked_delivery(gunicorn, environment, postal_signer):
    # No Content-Length to judge by: the bridge stops reading at its limit (BRIDGE_MAX_MESSAGE_BYTES
    # is 25 MiB by default; the request limit is 1.5x that plus 1 MiB).
    chunk = b"x" * (1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range(45):
            yield chunk

    response = requests.post(
        f"{gunicorn}/postal/inbound", data=body(), timeout=60, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


def test_two_instances_on_one_host_keep_their_own_control_sockets(environment, tmp_path):
    # gunicorn 27's default control socket is one path per user: a second instance would take it over
    # and stopping either would delete the other's. gunicorn.conf.py gives each its own.
    other = {**environment, "BRIDGE_DATA_DIR": str(tmp_path / "d2")}

    def control_socket(env: dict[str, str], url: str) -> Path:
        return Path(env["BRIDGE_DATA_DIR"]) / "run" / f"gunicorn-{url.rsplit(':', 1)[1]}.ctl"

    def appears(path: Path) -> bool:  # gunicorn opens it once its workers are up, a moment after /healthz
        deadline = time.monotonic() + 20
        while not path.is_socket():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    with gunicorn_process(environment, tmp_path / "a.log") as (first_url, _):
        first_socket = control_socket(environment, first_url)
        with gunicorn_process(other, tmp_path / "b.log") as (second_url, _):
            second_socket = control_socket(other, second_url)
            assert appears(first_socket) and appears(second_socket)
        assert not second_socket.exists()  # the second removed its own ...
        assert first_socket.is_socket()  # ... and left the first one's alone
        assert requests.get(f"{first_url}/healthz", timeout=10).status_code == 200
