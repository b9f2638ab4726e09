"""Sending from the command line (``mail send|status|resend``) against a live bridge, the explicit resend
API, the reconciler that asks Postal's message API about recipients whose events never came, and routing
when DNS does not answer."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bridge import context, create_app
from bridge.context import Bridge
from bridge.jobs.outbound import RECONCILE_AFTER, reconcile_due, reconcile_outbound
from bridge.jobs.sweeper import sweep
from bridge.settings import Settings
from bridge.store.outbound import WAITING
from tests.conftest import DOMAIN, Owner, make_owner, run_worker
from tests.postal_api import PostalSendAPI

# The fixtures are registered by importing them (their names are "domains", "environment", "postal").
from tests.test_send import domains_fixture, environment_fixture, postal_fixture, recipients, send  # noqa: F401

pytestmark = pytest.mark.dns
ROOT = Path(__file__).resolve().parents[1]


def cli(live_url: str, owner: Owner, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BRIDGE_API_URL": live_url, "BRIDGE_API_TOKEN": owner.token}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_send_status_and_an_explicit_resend_of_an_uncertain_recipient(
    live_url: str, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str], tmp_path: Path
) -> None:
    rcpt = f"max@{domains['smtp']}"
    attachment = tmp_path / "notes.txt"
    attachment.write_text("attached")
    postal.fail_next("slow", delay=2.5)
    sent = cli(
        live_url, owner, "mail", "send", "--to", rcpt, "--subject", "cli", "--text", "hi", "--attach", str(attachment)
    )
    assert sent.returncode == 0, sent.stderr
    msg_id = json.loads(sent.stdout)["id"]
    run_worker(bridge)
    status = cli(live_url, owner, "mail", "status", msg_id)
    assert status.returncode == 0, status.stderr
    (entry,) = json.loads(status.stdout)["recipients"]
    assert entry["state"] == "uncertain" and postal.accepted[rcpt] == 1
    assert b"notes.txt" in next(m.raw for m in postal.messages.values() if m.rcpt_to == rcpt)
    assert bridge.spool.exists(owner.mailbox.address, msg_id)  # kept for an explicit resend

    resent = cli(live_url, owner, "mail", "resend", msg_id, rcpt.upper())
    assert resent.returncode == 0, resent.stderr
    again = cli(live_url, owner, "mail", "resend", msg_id, rcpt)
    assert again.returncode == 1 and "409" in again.stderr  # already queued: one resend at a time
    run_worker(bridge)
    (entry,) = json.loads(cli(live_url, owner, "mail", "status", msg_id).stdout)["recipients"]
    assert entry["state"] == "accepted" and postal.accepted[rcpt] == 2  # the owner asked for the second copy
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)  # nobody waits for it any more
    gone = cli(live_url, owner, "mail", "resend", msg_id, rcpt)
    assert gone.returncode == 1 and "no longer kept" in gone.stderr


def test_resend_refusals(client: Any, bridge: Bridge, owner: Owner, domains: dict[str, str]) -> None:
    mailio, nothing = f"ann@{domains['mailio']}", f"cy@{domains['none']}"
    msg_id = send(client, owner, to=[mailio, nothing], text="x").get_json()["id"]
    run_worker(bridge)

    def resend(address: Any, msg: str = msg_id) -> Any:
        return client.post(f"/api/v1/messages/{msg}/resend", json={"address": address}, headers=owner.auth)

    assert resend(mailio).status_code == 409  # the Mailio leg, never SMTP instead
    assert resend(nothing).status_code == 409
    assert resend("zed@example.org").status_code == 404
    assert resend(7).status_code == 400
    assert resend(mailio, "a" * 32).status_code == 404
    assert client.post(f"/api/v1/messages/{msg_id}/resend", json={"address": mailio}).status_code == 401


def test_the_reconciler_reads_postal_for_a_lost_event_and_sweeps_the_spool(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    rcpt = f"ned@{domains['smtp']}"
    msg_id = send(client, owner, to=[rcpt], text="x").get_json()["id"]
    run_worker(bridge)
    assert recipients(client, owner, msg_id)[rcpt]["state"] == "accepted"
    postal_id = recipients(client, owner, msg_id)[rcpt]["postal"]["id"]
    postal.deliver(postal_id, "Sent")  # Postal delivered it, but the webhook never reached the bridge
    member = f"{owner.mailbox.address}/{msg_id}/{rcpt}"
    sweep(bridge)  # a first pass (this Redis has no index epoch yet: it rebuilds, which is not the point here)
    bridge.redis.zadd(WAITING, {member: time.time() - RECONCILE_AFTER - 5})  # as if accepted long ago
    bridge.spool.put(owner.mailbox.address, msg_id, "x@example.org", b"stale copy")  # nobody waits for it
    assert reconcile_due(bridge)
    assert "reconcile" in sweep(bridge)  # the worker's sweeper queues the reconciler by itself
    assert "reconcile" not in sweep(bridge)  # once: it is alive (queued) now
    run_worker(bridge)  # the job, as the worker runs it
    counts = reconcile_outbound()  # and once more by hand: nothing left to do for this one
    assert counts.get("spool_deleted", 0) == 0
    assert bridge.redis.zscore(WAITING, member) is None  # delivered: no longer waiting on Postal
    state = recipients(client, owner, msg_id)[rcpt]
    assert state["state"] == "delivered" and "message API" in state["reason"]
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)


def test_dns_that_does_not_answer_is_retried_then_failed_while_the_rest_goes_out(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    lost, rcpt = "ola@unserved.test", f"pat@{domains['smtp']}"  # Knot refuses names outside its zones
    msg_id = send(client, owner, to=[lost, rcpt], text="x").get_json()["id"]
    run_worker(bridge)  # the routing job runs three times (delays 0,0); the SMTP recipient goes at once
    states = recipients(client, owner, msg_id)
    assert states[lost]["state"] == "failed" and "DNS did not answer" in states[lost]["reason"]
    assert states[lost]["route"] is None
    assert states[rcpt]["state"] == "accepted" and postal.accepted[rcpt] == 1
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)


def test_a_wrong_api_key_fails_permanently_and_appears_nowhere(
    environment: dict[str, str], postal: PostalSendAPI, domains: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-key-" + "k" * 20
    app = create_app(Settings.from_env({**environment, "BRIDGE_POSTAL_API_KEY": wrong}))
    bridge = app.extensions["bridge"]
    context.use(bridge)
    try:
        owner, client = make_owner(bridge, f"keyed@{DOMAIN}"), app.test_client()
        rcpt = f"quin@{domains['smtp']}"
        msg_id = send(client, owner, to=[rcpt], text="x").get_json()["id"]
        with caplog.at_level(logging.DEBUG):
            run_worker(bridge)
        state = recipients(client, owner, msg_id)[rcpt]
        assert state["state"] == "failed" and "InvalidServerAPIKey" in state["reason"]
        record = bridge.outbound.get(owner.mailbox.address, msg_id)
        assert wrong not in json.dumps(record) and wrong not in caplog.text
        assert postal.accepted[rcpt] == 0
    finally:
        context.use(None)
