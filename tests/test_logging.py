"""Log lines: JSON from gunicorn, the app and the worker alike; a request id that follows a message into its
job; refusals that say what to fix; and the session-wide check that no line holds a secret (tests/loghygiene.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from bridge.context import Bridge
from bridge.mailio.identity import generate_user_keys
from bridge.settings import Settings
from tests import loghygiene
from tests.conftest import DOMAIN, SESSION_LOG, make_owner
from tests.postal_api import API_KEY
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.servers import stop_process, wait_until
from tests.webproc import ROOT, gunicorn_process, worker_process

MESSAGE = b"From: Jane <jane@example.org>\r\nSubject: hello\r\n\r\nthe secret plan\r\n"


def json_lines(path: Path) -> list[dict]:
    """Every line of a process's log, each of which must be one JSON object."""
    documents = []
    for line in path.read_text().splitlines():
        document = json.loads(line)  # fails the test on any line that is not JSON
        assert {"time", "level", "logger", "message"} <= document.keys(), line
        documents.append(document)
    return documents


def post(url: str, signer: PostalSigner, postal_id: int, rcpt: str, **headers: str) -> requests.Response:
    body = ruby_json(raw_payload(postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=MESSAGE))
    sent = {**signer.sign_headers(body), "Content-Type": "application/json", **headers}
    return requests.post(f"{url}/postal/inbound", data=body, headers=sent, timeout=10)


def test_json_lines_a_request_id_into_the_job_and_refusals_that_say_what_to_fix(environment, tmp_path, postal_signer):
    bridge = Bridge(Settings.from_env(environment))
    owner = make_owner(bridge, f"support@{DOMAIN}")
    web_log, worker_log = tmp_path / "gunicorn.log", tmp_path / "worker.log"
    stranger = PostalSigner(bits=1024)
    # started first: it takes a moment to come up, and waits for work
    worker = worker_process(environment, worker_log)
    try:
        with gunicorn_process(environment, web_log) as (url, _pid):
            stored = post(url, postal_signer, 41, f"support@{DOMAIN}", **{"X-Request-Id": "trace-4f1c9a77e2"})
            assert stored.text == "stored\n" and stored.headers["X-Request-Id"] == "trace-4f1c9a77e2"
            assert len(requests.get(f"{url}/healthz", timeout=5).headers["X-Request-Id"]) == 16  # a new one
            assert post(url, stranger, 42, f"support@{DOMAIN}").status_code == 401
            assert post(url, postal_signer, 43, f"nobody@{DOMAIN}").status_code == 404
            body = b'{"id": 44, "rcpt_to": "x"'
            signed = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
            assert requests.post(f"{url}/postal/inbound", data=body, headers=signed, timeout=10).status_code == 400
            assert requests.get(f"{url}/api/v1/messages", headers=owner.auth, timeout=10).status_code == 200

            def filed() -> bool:
                return any(
                    line.get("request_id") == "trace-4f1c9a77e2" and line["message"] == "filed 1 messages"
                    for line in json_lines(worker_log)
                )

            assert wait_until(filed, 30, worker), worker_log.read_text()[-3000:]
            worker.terminate()  # both stop at once
    finally:
        stop_process(worker)

    web = json_lines(web_log)
    loggers = {line["logger"] for line in web}
    assert {"gunicorn.error", "gunicorn.access", "bridge.postal.ingress", "bridge.web.postal"} <= loggers
    assert any(line["request_id"] == "trace-4f1c9a77e2" for line in web if line["logger"] == "bridge.postal.ingress")
    assert any(line["logger"] == "rq.worker" for line in json_lines(worker_log))
    messages = [line["message"] for line in web]
    stranger_kid = stranger.sign_headers(b"x")["X-Postal-Signature-KID"]
    (trusted,) = bridge.postal_keys.known_kids
    assert (
        f"postal inbound: signature rejected (unknown signing key): KID received {stranger_kid}, KIDs trusted {trusted}"
        in messages
    )
    assert (
        f"postal inbound: refused 404: no mailbox for the recipient (postal id 43, recipient domain {DOMAIN})"
        in messages
    )
    assert any(m.startswith("postal inbound: refused 400: malformed delivery: malformed JSON") for m in messages)
    everything = web_log.read_text() + worker_log.read_text()
    for secret in ("support@", "nobody@", "jane@", owner.token, "the secret plan", "Subject:"):
        assert secret not in everything


def test_text_lines_for_development(environment):
    """BRIDGE_LOG_FORMAT=text: what configure_logging (web and worker alike) writes, in a fresh process."""
    program = (
        "import logging; from bridge import configure_logging; from bridge.settings import Settings; "
        "configure_logging(Settings.from_env()); logging.getLogger('bridge.demo').warning('postal id %d', 7)"
    )
    env = {**os.environ, **environment, "PYTHONPATH": str(ROOT), "BRIDGE_LOG_FORMAT": "text"}
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stdout == b"", done.stderr
    line_format = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING bridge\.demo: postal id 7\n")
    assert line_format.fullmatch(done.stderr.decode()), done.stderr


def test_the_session_check_catches_every_kind_of_secret(bridge):
    """The check the whole suite runs under, shown to fail on planted lines (and to let ids through)."""
    loghygiene._check_api_key_pattern()
    assert SESSION_LOG in logging.getLogger().handlers
    seen = SESSION_LOG.lines
    logging.getLogger("bridge.tests").info("an INFO line of the bridge is checked too")
    assert SESSION_LOG.lines == seen + 1
    mailbox = make_owner(bridge, f"planted@{DOMAIN}")
    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    jwk = generate_user_keys().to_key_file(f"planted@{DOMAIN}")["encryption_key"]
    planted = {
        "an e-mail address": f"recipient {mailbox.mailbox.email}",
        "a bearer token": f"token {mailbox.token}",
        "the Postal API key": f"key {API_KEY}",
        "private key material": pem.splitlines()[0],
        "message contents": "Subject: hello",
    }
    checker = loghygiene.SessionLog()
    logger = logging.getLogger("tests.planted")
    logger.addHandler(checker)
    logger.propagate = False  # these lines are meant to leak: keep them from the session's own check
    try:
        for line in planted.values():
            logger.warning("%s", line)
        logger.warning("%s", json.dumps(jwk))
        logger.warning("postal send/raw: accepted, message_id xcwgmmdg4yfzuikp2xkhun4jcjkljruo@%s", DOMAIN)
        logger.warning("postal inbound: refused 404 (postal id 3, recipient domain %s)", DOMAIN)
    finally:
        logger.removeHandler(checker)
        logger.propagate = True
    assert [loghygiene.leaks_in(line) for _, line in checker.found] == [[kind] for kind in planted] + [
        ["private key material"]
    ]
    # The processes' log files: every bridge log under the directory, not the third-party servers' own.
    # (Outside pytest's temporary directory, which the session's check reads at its end.)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "a").mkdir()
        (root / "a" / "gunicorn.log").write_text(f'{{"message": "{planted["a bearer token"]}"}}\nfine\n')
        (root / "a" / "redis.log").write_text(planted["an e-mail address"])
        (root / "a" / "run.err").write_text(f"ok\n{planted['the Postal API key']}\n")
        found = list(loghygiene.leaking_lines(loghygiene.process_logs(root)))
    assert [where.rsplit("/", 1)[1] for where, _ in found] == ["gunicorn.log:1", "run.err:2"]
