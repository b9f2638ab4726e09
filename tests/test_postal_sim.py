"""The Postal simulator is only worth trusting if it is Postal, byte for byte: proven here against the fixtures.

Captured Postal bodies are re-encoded with ruby_json and rebuilt from the original e-mail with raw_payload /
hash_payload, and must come out identical; the captured signatures must verify through the bridge's own
verifier; the simulator's HTTP behaviour (retries, verdicts, no redirects) is checked against a real server.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bridge.postal.payloads import parse_inbound
from bridge.postal.signatures import PostalKeyring, key_id, load_public_keys
from tests.postal_sim import (
    HARD_FAIL_BOUNCE,
    HARD_FAIL_NO_BOUNCE,
    RETRY,
    SENT,
    PostalSigner,
    PostalSimulator,
    encode64,
    final_outcome,
    form_encode,
    hash_payload,
    raw_payload,
    received_header,
    ruby_float,
    ruby_json,
    separate_replies,
)

DATA = Path(__file__).parent / "data" / "postal"
BODIES = [
    "inbound_raw.json",
    "inbound_hash.json",
    "inbound_hash_strip_replies_no_attachments.json",
    "webhook_message_sent.json",
    "webhook_message_delivery_failed.json",
]
SIGNED = json.loads((DATA / "signatures.json").read_text())
STORED = base64.b64decode(json.loads((DATA / "inbound_raw.json").read_bytes())["message"])
ORIGINAL = STORED[STORED.index(b"Date:") :]
AS_CAPTURED = {
    "postal_id": 4821,
    "rcpt_to": "support@example.com",
    "mail_from": "jane@example.org",
    "client_ip": "192.0.2.44",
    "helo": "mail-ej1-f44.example.org",
    "received_at": datetime(2026, 4, 28, 16, 19, 33, tzinfo=UTC),
}
HASH_AS_CAPTURED = {**AS_CAPTURED, "token": "p1ZqkR7vW3sYb9Lm", "timestamp": 1777393173.412853}


@pytest.fixture(scope="module")
def signer() -> PostalSigner:
    return PostalSigner(bits=1024)


# --------------------------------------------------------------------------- byte-exact encodings


@pytest.mark.parametrize("name", BODIES)
def test_ruby_json_reproduces_captured_bodies(name: str) -> None:
    captured = (DATA / name).read_bytes()
    assert ruby_json(json.loads(captured)) == captured


def test_raw_payload_rebuilds_the_captured_body_from_the_original_mail() -> None:
    payload = raw_payload(message=ORIGINAL, **AS_CAPTURED)
    assert ruby_json(payload) == (DATA / "inbound_raw.json").read_bytes()
    assert payload["size"] == len(STORED) - len(STORED[: STORED.index(b"Received:")])  # Received: counts


def test_hash_payload_rebuilds_the_captured_bodies_from_the_original_mail() -> None:
    assert ruby_json(hash_payload(message=ORIGINAL, **HASH_AS_CAPTURED)) == (DATA / "inbound_hash.json").read_bytes()
    stripped = hash_payload(message=ORIGINAL, strip_replies=True, include_attachments=False, **HASH_AS_CAPTURED)
    assert ruby_json(stripped) == (DATA / "inbound_hash_strip_replies_no_attachments.json").read_bytes()


def test_ruby_json_escaping_and_numbers() -> None:
    value = {"s": '<a href="x">&</a>\u2028\u2029\x01\x1f\x7f\b\f\n\r\t\\/é💡', "n": None, "t": True, "l": [1, 2.5]}
    expected = (
        '{"s":"\\u003ca href=\\"x\\"\\u003e\\u0026\\u003c/a\\u003e\\u2028\\u2029\\u0001\\u001f\x7f'
        '\\b\\f\\n\\r\\t\\\\/é💡","n":null,"t":true,"l":[1,2.5]}'
    )
    assert ruby_json(value) == expected.encode()
    assert ruby_json([float("inf"), float("nan")]) == b"[null,null]"  # ActiveSupport's Float#as_json


@pytest.mark.parametrize(
    ("value", "ruby"),
    [
        (1e16, "1.0e+16"),
        (1e15, "1000000000000000.0"),
        (0.0001, "0.0001"),
        (1e-05, "1.0e-05"),
        (1.5e-07, "1.5e-07"),
        (1777393173.412853, "1777393173.412853"),
        (100.0, "100.0"),
        (-0.0, "-0.0"),
        (1.2345e100, "1.2345e+100"),
    ],
)
def test_ruby_float(value: float, ruby: str) -> None:
    assert ruby_float(value) == ruby


def test_encode64_is_ruby_base64_encode64() -> None:
    assert encode64(b"") == ""
    assert encode64(b"A" * 45) == "QUFB" * 15 + "\n"  # exactly 60 characters: one line
    two_lines = encode64(b"A" * 46)
    assert two_lines.splitlines() == ["QUFB" * 15, "QQ=="] and two_lines.endswith("\n")
    assert base64.b64decode(encode64(bytes(range(256)))) == bytes(range(256))


def test_form_encode_flattens_like_postal() -> None:
    payload = {
        "id": 7,
        "null": None,
        "flag": True,
        "reply_to": ["a b@x", "c~*@y"],
        "empty": [],
        "attachments": [{"filename": None, "size": 3}],
        "ts": 1e16,
    }
    assert form_encode(payload) == (
        b"id=7&null&flag=true&reply_to=a+b%40x&reply_to=c%7E*%40y&&"
        b"attachments%5B0%5D%5Bfilename%5D&attachments%5B0%5D%5Bsize%5D=3&ts=1.0e%2B16"
    )


def test_flat_hash_payload_is_postals_own_flattening() -> None:
    flat = hash_payload(message=ORIGINAL, flat=True, **HASH_AS_CAPTURED)
    assert flat["attachments[0][content_type]"] == "text/plain; name=order-4411-note.txt"
    assert flat["attachments[0][size]"] == "48"
    assert "attachments" not in flat


def test_received_header_is_postals() -> None:
    header = received_header(
        client_ip="198.51.100.7",
        helo="[198.51.100.7]",
        rdns="host.example.net",
        received_at=datetime(2026, 1, 5, 3, 4, 5, tzinfo=UTC),
    )
    assert (
        header
        == "from [198.51.100.7] (host.example.net [198.51.100.7]) by mx.postal.example.com with SMTP; Mon, 05 Jan 2026 03:04:05 -0000"
    )
    assert received_header(privacy_mode=True, received_at=datetime(2026, 1, 5, tzinfo=UTC)).startswith("by ")


def test_raw_payload_spam_headers() -> None:
    payload = raw_payload(
        postal_id=1, rcpt_to="a@example.com", mail_from="", message=ORIGINAL, spam=True, spam_score=7.25
    )
    stored = base64.b64decode(payload["message"])
    assert stored.startswith(b"X-Postal-Spam: yes\r\nX-Postal-Spam-Threshold: 5.0\r\nX-Postal-Spam-Score: 7.25\r\n")
    assert payload["message"].count("\n") == -(-len(payload["message"].replace("\n", "")) // 60)


def test_separate_replies_like_postal() -> None:
    assert separate_replies("Thanks!\n\nOn Mon, 1 Jan 2026 at 10:00, Bob <b@x> wrote:\n> hi") == (
        "Thanks!",
        "On Mon, 1 Jan 2026 at 10:00, Bob <b@x> wrote:\n> hi",
    )
    assert separate_replies("No quotes here.\r\n") == ("No quotes here.", None)
    assert separate_replies(None) == ("", None)
    assert separate_replies("Top\n-----Original Message-----\nold") == ("Top", "-----Original Message-----\nold")


# --------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_captured_signatures_verify_with_the_fixture_key(name: str) -> None:
    keyring = PostalKeyring(load_public_keys(str(DATA / "test_signing_public.pem")), None)
    assert keyring.verify((DATA / name).read_bytes(), SIGNED[name]) == SIGNED[name]["X-Postal-Signature-KID"]


def test_own_signer_verifies_through_every_key_source(signer: PostalSigner) -> None:
    body = ruby_json(raw_payload(postal_id=1, rcpt_to="a@example.com", mail_from="", message=ORIGINAL))
    headers = signer.sign_headers(body)
    assert list(headers) == ["X-Postal-Signature-KID", "X-Postal-Signature", "X-Postal-Signature-256"]
    assert all("\n" not in v for v in headers.values())
    for spec in (signer.public_pem().decode(), signer.dns_p_value(), signer.dkim_record()):
        (key,) = load_public_keys(spec)
        assert key_id(key) == signer.kid == signer.jwks()["keys"][0]["kid"]
        assert PostalKeyring([key], None).verify(body, headers) == signer.kid
    assert PostalKeyring([signer.public_key], None).verify(body, signer.sign_headers(body, sha256=False)) == signer.kid
    assert set(signer.sign_headers(body, sha1=False, kid=False)) == {"X-Postal-Signature-256"}


# --------------------------------------------------------------------------- FormData round trips


@pytest.mark.parametrize("fmt", ["RawMessage", "Hash", "HashFlat"])
def test_form_data_round_trips_through_parse_inbound(fmt: str) -> None:
    if fmt == "RawMessage":
        payload = raw_payload(message=ORIGINAL, **AS_CAPTURED)
    else:
        payload = hash_payload(message=ORIGINAL, flat=fmt == "HashFlat", **HASH_AS_CAPTURED)
    json_twin = (
        raw_payload(message=ORIGINAL, **AS_CAPTURED)
        if fmt == "RawMessage"
        else hash_payload(message=ORIGINAL, **HASH_AS_CAPTURED)
    )
    from_form = parse_inbound(form_encode(payload), "application/x-www-form-urlencoded", 1_000_000)
    from_json = parse_inbound(ruby_json(json_twin), "application/json", 1_000_000)
    assert from_form == from_json
    if fmt == "RawMessage":
        assert from_form.message == STORED


# --------------------------------------------------------------------------- HTTP behaviour


class Endpoint:
    """A real HTTP endpoint on loopback that answers with a scripted list of statuses and records requests."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.delay = 0.0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.requests.append((self.path, dict(self.headers.items()), body))
                status = owner.script.pop(0) if owner.script else 200
                time.sleep(owner.delay)
                answer = b"ok" if status < 400 else b"nope"
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:  # the client gave up (the timeout test): nobody to answer
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/postal/inbound"
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    yield server
    server.close()


@pytest.mark.parametrize("encoding", ["BodyAsJSON", "FormData"])
def test_post_puts_postals_request_on_the_wire(endpoint: Endpoint, signer: PostalSigner, encoding: str) -> None:
    payload = raw_payload(message=ORIGINAL, **AS_CAPTURED)
    attempt = PostalSimulator(endpoint.url, signer, encoding=encoding).post(payload)
    assert (attempt.status, attempt.outcome, attempt.body_text) == (200, SENT, "ok")
    ((path, headers, body),) = endpoint.requests
    assert path == "/postal/inbound"
    if encoding == "BodyAsJSON":
        assert (headers["Content-Type"], body) == ("application/json", ruby_json(payload))
    else:
        assert (headers["Content-Type"], body) == ("application/x-www-form-urlencoded", form_encode(payload))
    assert headers["User-Agent"] == "Postal/3.3.6"
    assert headers["X-Postal-Signature-Kid"] == signer.kid  # Net::HTTP's capitalization
    assert PostalKeyring([signer.public_key], None).verify(body, headers) == signer.kid


@pytest.mark.parametrize(
    ("script", "outcomes", "final"),
    [
        ([200], [SENT], SENT),
        ([204], [SENT], SENT),
        ([500, 503, 200], [RETRY, RETRY, SENT], SENT),
        ([429], [HARD_FAIL_NO_BOUNCE], HARD_FAIL_NO_BOUNCE),
        ([404], [HARD_FAIL_BOUNCE], HARD_FAIL_BOUNCE),
        ([400], [HARD_FAIL_BOUNCE], HARD_FAIL_BOUNCE),
        ([502, 413], [RETRY, HARD_FAIL_BOUNCE], HARD_FAIL_BOUNCE),
        ([302], [HARD_FAIL_BOUNCE], HARD_FAIL_BOUNCE),
    ],
)
def test_deliver_follows_postals_verdicts(
    endpoint: Endpoint, signer: PostalSigner, script: list[int], outcomes: list[str], final: str
) -> None:
    endpoint.script = list(script)
    attempts = PostalSimulator(endpoint.url, signer).deliver(raw_payload(message=ORIGINAL, **AS_CAPTURED))
    assert [a.outcome for a in attempts] == outcomes
    assert final_outcome(attempts) == final
    assert [a.retry_after_seconds for a in attempts if a.outcome == RETRY] == [
        300 * 1.3**n for n in range(outcomes.count(RETRY))
    ]
    assert all(path == "/postal/inbound" for path, _, _ in endpoint.requests)  # a 3xx is never followed
    bodies = {body for _, _, body in endpoint.requests}
    assert len(bodies) == 1  # every retry re-sends the identical signed body


def test_exhausted_retries_bounce_after_about_31_hours(endpoint: Endpoint, signer: PostalSigner) -> None:
    endpoint.script = [503] * 18
    attempts = PostalSimulator(endpoint.url, signer).deliver(raw_payload(message=ORIGINAL, **AS_CAPTURED))
    assert len(attempts) == 18 and {a.outcome for a in attempts} == {RETRY}
    assert final_outcome(attempts) == HARD_FAIL_BOUNCE
    delays = [a.retry_after_seconds or 0.0 for a in attempts]
    last_try_hours = sum(delays[:17]) / 3600
    assert 23 < last_try_hours < 25  # postal.md: last try about 24 h after the first
    assert 30 < sum(delays) / 3600 < 32  # final failure about 31 h


def test_timeouts_and_refused_connections_are_retried(endpoint: Endpoint, signer: PostalSigner) -> None:
    endpoint.delay = 1.0
    slow = PostalSimulator(endpoint.url, signer, timeout=0.2).post(raw_payload(message=ORIGINAL, **AS_CAPTURED))
    assert (slow.status, slow.outcome) == (-1, RETRY)
    refused_url = endpoint.url
    endpoint.close()  # nothing listens on that port any more
    refused = PostalSimulator(refused_url, signer, timeout=1.0).post(raw_payload(message=ORIGINAL, **AS_CAPTURED))
    assert (refused.status, refused.outcome) == (-2, RETRY)
