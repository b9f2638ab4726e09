"""Issue 7's "Done when", through the processes as deployed: an owner's message to a Mailio domain, an
SMTP domain and a domain with no mail service, sent and followed with ``python -m bridge mail send|status``
against gunicorn, routed and delivered by a real ``python -m bridge worker``, while the Postal send-API
server refuses connections, answers ServerSuspended, answers only after the client gave up (having
accepted the message) and answers a proxy's 502, and recovers in between; Postal's signed events,
POSTed to gunicorn's /postal/events, carry the SMTP recipients to ``delivered``.

Real parts: the suite's Redis, a filesystem store, Knot serving the three domains, gunicorn with the
repository's gunicorn.conf.py, the worker process, the send-API server of tests/postal_api.py (it counts
what it accepted per recipient: a double send fails the test), events signed by the Postal simulator.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bridge.context import Bridge
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner
from tests.postal_api import API_KEY, PostalSendAPI
from tests.postal_sim import PostalSigner
from tests.servers import stop_process
from tests.test_send import sent_event
from tests.webproc import gunicorn_process, worker_process

pytestmark = pytest.mark.dns
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Live:
    url: str
    owner: Owner
    postal: PostalSendAPI
    signer: PostalSigner
    logs: Path

    def cli(self, *args: str) -> dict[str, Any]:
        """``python -m bridge ARGS`` as the owner would run it; its one JSON line."""
        env = {**os.environ, "BRIDGE_API_URL": self.url, "BRIDGE_API_TOKEN": self.owner.token}
        done = subprocess.run(
            [sys.executable, "-m", "bridge", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def states(self, msg_id: str) -> dict[str, dict[str, Any]]:
        """Each recipient's delivery state, read with ``mail status``."""
        return {r["address"].lower(): r for r in self.cli("mail", "status", msg_id)["recipients"]}

    def wait(self, msg_id: str, address: str, done: Callable[[dict[str, Any]], bool], timeout: float = 20) -> None:
        """Poll the owner API (cheaper than a CLI process per poll) until ``address``'s entry is ``done``."""
        deadline = time.monotonic() + timeout
        entry: dict[str, Any] = {}
        while time.monotonic() < deadline:
            answer = requests.get(f"{self.url}/api/v1/messages/{msg_id}", headers=self.owner.auth, timeout=10)
            entry = next(r for r in answer.json()["recipients"] if r["address"].lower() == address.lower())
            if done(entry):
                return
            time.sleep(0.1)
        worker_log = (self.logs / "worker.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{address} is still {entry}\n{worker_log}")

    def event(self, kind: str, address: str) -> None:
        """Postal's signed event about the message it created for ``address``, POSTed to gunicorn."""
        (sent,) = [m for m in self.postal.messages.values() if m.rcpt_to == address]
        body = sent_event(self.signer, kind, sent.id, sent.token, address, sent.message_id)
        headers = {**self.signer.sign_headers(body), "Content-Type": "application/json"}
        assert requests.post(f"{self.url}/postal/events", data=body, headers=headers, timeout=10).status_code == 200


@pytest.fixture(name="domains")
def domains_fixture(knot_dns: Any) -> dict[str, str]:
    """The Mailio domain also has an MX, so that a fallback to SMTP would show at Postal; its Mailio host
    (``mio.<domain>``) has no address, so no peer leg can reach it either."""
    tag = uuid.uuid4().hex[:10]
    mailio, smtp, nothing = f"m{tag}.mailio.test", f"s{tag}.peer.test", f"n{tag}.example.test"
    key = base64.b64encode(os.urandom(32)).decode()
    knot_dns.set_txt(f"mailio._mailiokey.mio.{mailio}", f"v=MAILIO1; k=ed25519; p={key}")
    knot_dns.set(mailio, "MX", "10 mx.peer.test.")
    knot_dns.set(smtp, "MX", "10 mx.peer.test.")
    return {"mailio": mailio, "smtp": smtp, "none": nothing}


@pytest.fixture(name="live")
def live_fixture(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, knot_dns: Any, domains: dict[str, str]
) -> Iterator[Live]:
    env = bridge_environment(
        tmp_path,
        redis_url,
        postal_signer,
        nameserver=knot_dns.nameserver,
        BRIDGE_POSTAL_API_KEY=API_KEY,
        BRIDGE_POSTAL_TIMEOUT="1",
        BRIDGE_OUTBOUND_RETRY_DELAYS="1,1,1,1,1",
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    with PostalSendAPI(verified_domains=(DOMAIN,)) as postal:
        env["BRIDGE_POSTAL_URL"] = postal.url
        owner = make_owner(Bridge(Settings.from_env(env)), f"support@{DOMAIN}")
        with gunicorn_process(env, logs / "gunicorn.log") as (url, _):
            worker = worker_process(env, logs / "worker.log")
            try:
                yield Live(url, owner, postal, postal_signer, logs)
            finally:
                stop_process(worker)


def test_three_domains_through_a_failing_and_recovering_postal(live: Live, domains: dict[str, str]) -> None:
    postal = live.postal
    mailio, smtp, nothing = f"ann@{domains['mailio']}", f"bob@{domains['smtp']}", f"cy@{domains['none']}"

    # Postal is down (connection refused): provably not sent, so queued again and retried.
    with postal.refusing():
        msg_id = live.cli("mail", "send", "--to", mailio, "--to", smtp, "--cc", nothing, "--subject", "Plans",
                          "--text", "hi")["id"]  # fmt: skip
        live.wait(msg_id, smtp, lambda e: "will retry" in (e["reason"] or ""))
        states = live.states(msg_id)
        assert states[smtp]["state"] == "queued" and states[smtp]["route"] == "smtp"
        # Back, but failing twice: ServerSuspended (Postal took nothing), then accepting the message and
        # answering only after the client's BRIDGE_POSTAL_TIMEOUT: ambiguous, so never sent again.
        postal.fail_next("error", code="ServerSuspended")
        postal.fail_next("slow", delay=2.5)
    live.wait(msg_id, smtp, lambda e: e["state"] == "uncertain")
    time.sleep(2.5)  # the worker had its retries' chance: a resend would show in Postal's counts now
    assert postal.accepted[smtp] == 1 and postal.duplicates() == {}
    calls = [seen.body for seen in postal.seen if seen.path == "/api/v1/send/raw"]
    assert len(calls) == 2 and all(json.loads(body)["rcpt_to"] == [smtp] for body in calls)

    # Postal recovered: its events, matched by the Message-ID the bridge set, settle the ambiguous send.
    live.event("MessageDelayed", smtp)
    live.event("MessageSent", smtp)
    states = live.states(msg_id)
    assert states[smtp]["state"] == "delivered" and states[smtp]["postal"]["id"]
    assert states[mailio]["route"] == "mailio" and states[mailio]["state"] == "queued" and states[mailio]["reason"]
    assert states[nothing]["route"] == "none" and states[nothing]["state"] == "failed"
    assert "no mail service" in states[nothing]["reason"]
    assert set(postal.accepted) == {smtp}  # the Mailio recipient was never handed to Postal, despite its MX

    # A proxy's 502 in front of a Postal that did not take it: uncertain, not resent until the owner asks.
    second = f"dee@{domains['smtp']}"
    postal.fail_next("http", status=502)
    other_id = live.cli("mail", "send", "--to", second, "--subject", "Again", "--text", "hi")["id"]
    live.wait(other_id, second, lambda e: e["state"] == "uncertain")
    assert postal.accepted[second] == 0
    live.cli("mail", "resend", other_id, second)
    live.wait(other_id, second, lambda e: e["state"] == "accepted")
    live.event("MessageSent", second)
    assert live.states(other_id)[second]["state"] == "delivered"
    assert postal.accepted == {smtp: 1, second: 1} and postal.duplicates() == {}
    assert live.states(msg_id)[mailio]["state"] == "queued"  # still waiting for the peer leg
