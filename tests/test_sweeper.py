"""Filing never stalls, and its DNS is bounded: the sweeper, retries, the DNS budgets and re-evaluation.

In-process against the suite's Redis and Knot, with real faults: a tmpfs remounted read-only for the
store, Redis emptied, and a nameserver that never answers (a UDP socket on loopback that reads nothing).
The same failures end to end, through gunicorn and a worker process, are in tests/test_faults.py.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from rq.job import Job, JobStatus

import bridge.jobs.auth
import bridge.postal.ingress
from bridge import context, create_app
from bridge.context import Bridge
from bridge.jobs.peer_inbound import DELIVERY_SWEEP
from bridge.jobs.sweeper import sweep
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner, run_worker
from tests.postal_sim import PostalSigner, PostalSimulator, new_message, raw_payload
from tests.servers import StoreDir
from tests.test_mtp_receive import Peer, jwe_to, peer_environment, publish, request_payload, serve_peer


@pytest.fixture
def dead_nameserver() -> Iterator[str]:
    """A DNS server that never answers: every query waits out its time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _app(env: dict[str, str]) -> Iterator[Flask]:
    app = create_app(Settings.from_env(env))
    context.use(app.extensions["bridge"])
    yield app
    context.use(None)


def _deliver(app: Flask, signer: PostalSigner, owner: Owner, senders: list[str], first_id: int = 1) -> None:
    postal = PostalSimulator("http://unused", signer)
    client = app.test_client()
    for i, sender in enumerate(senders):
        payload = raw_payload(
            postal_id=first_id + i,
            rcpt_to=owner.mailbox.email,
            mail_from=sender,
            message=new_message(sender=f"<{sender}>", to=owner.mailbox.email, text=f"{i}\n"),
        )
        body, content_type = postal.encode(payload)
        response = client.post("/postal/inbound", data=body, headers=postal.wire_headers(body, content_type))
        assert response.status_code == 200, response.get_data()


def _listed(app: Flask, owner: Owner, folder: str) -> list[dict[str, Any]]:
    response = app.test_client().get(f"/api/v1/messages?folder={folder}&limit=200", headers=owner.auth)
    assert response.status_code == 200
    return list(response.get_json()["messages"])


# --- DNS: bounded per sender and per batch, and a job timeout that fires ---------------------------


def test_filing_job_timeout_fires_when_dns_never_answers(
    tmp_path: Path,
    redis_url: str,
    postal_signer: PostalSigner,
    dead_nameserver: str,
    monkeypatch: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Budgets far above the job's time limit: only RQ's timeout can end this job early. It used to be
    # swallowed inside the DNS lookup (pyspf catches every Exception), and the job ran on for minutes.
    monkeypatch.setattr(bridge.postal.ingress, "FILING_JOB_TIMEOUT", 1)
    monkeypatch.setattr(bridge.jobs.auth, "SENDER_BUDGET", 30.0)
    monkeypatch.setattr(bridge.jobs.auth, "BATCH_BUDGET", 60.0)
    for app in _app(bridge_environment(tmp_path, redis_url, postal_signer, nameserver=dead_nameserver)):
        bridge_ = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        _deliver(app, postal_signer, owner, [f"jane@d{i}.example" for i in range(6)])
        job_id = bridge_.index.noted_job("filing")
        started = time.monotonic()
        run_worker(bridge_)
        elapsed = time.monotonic() - started
        # It failed (and waits for its retry, like any failed filing job), and by the timeout.
        assert Job.fetch(job_id, connection=bridge_.redis).get_status() == JobStatus.SCHEDULED
        assert "JobTimeoutException" in caplog.text
        assert elapsed < 5, f"the 1 s job timeout took {elapsed:.1f} s to fire"


def test_a_batch_of_new_senders_with_dead_dns_is_filed_within_the_batch_budget(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, dead_nameserver: str, monkeypatch: Any
) -> None:
    monkeypatch.setattr(bridge.jobs.auth, "SENDER_BUDGET", 1.0)
    monkeypatch.setattr(bridge.jobs.auth, "BATCH_BUDGET", 2.0)
    monkeypatch.setattr(bridge.jobs.auth, "THREADS", 4)
    senders = [f"jane@d{i}.example" for i in range(20)]  # 20 zones: none can vouch for another
    for app in _app(bridge_environment(tmp_path, redis_url, postal_signer, nameserver=dead_nameserver)):
        bridge_ = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        _deliver(app, postal_signer, owner, senders)
        bridge_.sender_hashes.lookup_hashes(senders)  # their first-time scrypt (seconds) is not DNS: pay it first
        started = time.monotonic()
        run_worker(bridge_)
        elapsed = time.monotonic() - started
        # 20 senders x 2-4 s of dead DNS each took a minute or more in series; now the 2 s batch budget
        # bounds it (the rest is a busy machine's margin for screening and writing 20 records).
        assert elapsed < 10, f"filing took {elapsed:.1f} s"
        listed = _listed(app, owner, "other")
        assert len(listed) == 20
        assert {r["verdicts"]["spf"] for r in listed} == {"temperror"}
        assert not any(r["verdicts"]["authenticated"] for r in listed)
        due = bridge_.index.due_rechecks(time.time() + 3600, 100)
        assert sorted(msg_id for _, msg_id, _ in due) == sorted(r["id"] for r in listed)
        assert {tries for _, _, tries in due} == {0}


def test_temperror_verdicts_are_re_evaluated_and_re_screened_later(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, dead_nameserver: str, knot_dns: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(bridge.jobs.auth, "SENDER_BUDGET", 1.0)
    knot_dns.set_txt("forger.test", "v=spf1 -all")
    knot_dns.set_txt("_dmarc.forger.test", "v=DMARC1; p=reject")
    for app in _app(bridge_environment(tmp_path, redis_url, postal_signer, nameserver=dead_nameserver)):
        bridge_: Bridge = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        _deliver(app, postal_signer, owner, [f"x{i}@forger.test" for i in range(3)])
        run_worker(bridge_)
        first = sorted(_listed(app, owner, "other"), key=lambda r: r["postal"]["id"])
        assert [r["verdicts"]["dmarc"] for r in first] == ["temperror"] * 3
        # The owner keeps one in the inbox by hand: re-screening must not move it.
        kept = first[0]["id"]
        moved = app.test_client().post(f"/api/v1/messages/{kept}/move", json={"folder": "inbox"}, headers=owner.auth)
        assert moved.status_code == 200

        assert sweep(bridge_) == ["rebuilt"]  # a first sweep on this Redis; it keeps the rechecks queued
        bridge_.resolver = knot_dns.resolver()  # DNS answers again
        bridge_.auth_cache.clear()
        due = bridge_.index.due_rechecks(time.time() + 3600, 100)
        bridge_.index.schedule_rechecks((address, msg_id, tries, 0.0) for address, msg_id, tries in due)  # due now
        assert "recheck" in sweep(bridge_)
        run_worker(bridge_)

        spam = _listed(app, owner, "spam")
        assert sorted(r["id"] for r in spam) == sorted(r["id"] for r in first[1:])
        assert {(r["verdicts"]["spf"], r["verdicts"]["dmarc"]) for r in spam} == {("fail", "fail")}
        [inbox] = _listed(app, owner, "inbox")
        assert inbox["id"] == kept and inbox["verdicts"]["dmarc"] == "fail"
        assert _listed(app, owner, "other") == []
        assert bridge_.index.due_rechecks(time.time() + 10**6, 100) == []  # answered: nothing left to ask


# --- filing never stalls ---------------------------------------------------------------------------


def test_a_filing_job_that_failed_on_a_read_only_store_is_retried_and_swept(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, knot_dns: Any
) -> None:
    store = StoreDir(tmp_path / "store")
    try:
        if reason := store.unsupported("read-only"):
            pytest.skip(reason)
        env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_STORAGE_URL=f"file://{store.path}")
        for app in _app(env):
            bridge_: Bridge = app.extensions["bridge"]
            owner = make_owner(bridge_, f"support@{DOMAIN}")
            assert sweep(bridge_) == ["rebuilt"]  # a first sweep on this Redis sets its marker
            _deliver(app, postal_signer, owner, [f"jane{i}@sender.test" for i in range(10)])
            first_job = bridge_.index.noted_job("filing")
            store.read_only()
            try:
                run_worker(bridge_)
            finally:
                store.writable()
            assert _listed(app, owner, "other") == []
            # The failed job is retried with backoff (the worker's scheduler moves it back when due) ...
            assert Job.fetch(first_job, connection=bridge_.redis).get_status() == JobStatus.SCHEDULED
            assert sweep(bridge_) == []  # a retry pending is a live job
            # ... and a filing job that is gone for good (here: lost) is replaced by the sweeper, with no
            # new delivery: 300 stored messages once waited for one.
            Job.fetch(first_job, connection=bridge_.redis).delete()
            assert sweep(bridge_) == ["filing"]
            run_worker(bridge_)
            assert len(_listed(app, owner, "other")) == 10
            assert bridge_.index.unfiled_count() == 0
    finally:
        store.close()


def test_sweeper_rebuilds_the_index_when_redis_lost_its_data(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, redis_server: Any
) -> None:
    for app in _app(bridge_environment(tmp_path, redis_url, postal_signer)):
        bridge_: Bridge = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        _deliver(app, postal_signer, owner, [f"jane{i}@sender.test" for i in range(5)])
        sweep(bridge_)  # sets the marker (a first run on an empty Redis rebuilds nothing)
        run_worker(bridge_)
        _deliver(app, postal_signer, owner, [f"late{i}@sender.test" for i in range(3)], first_id=100)
        assert len(_listed(app, owner, "other")) == 5

        redis_server.flushall()  # Redis comes back empty: no index, no unfiled set, no queue
        assert _listed(app, owner, "other") == []
        assert sweep(bridge_) == ["rebuilt"]  # the rebuild queued the 3 unfiled messages itself
        assert len(_listed(app, owner, "other")) == 5
        run_worker(bridge_)
        assert len(_listed(app, owner, "other")) == 8
        assert sweep(bridge_) == []


# --- peers' MTP messages: the same guarantees --------------------------------------------------------


@pytest.fixture
def mtp_peer(knot_dns: Any) -> Iterator[Peer]:
    found = Peer(f"s{uuid.uuid4().hex[:10]}.mailio.test", Ed25519PrivateKey.generate())
    publish(knot_dns, found.domain, found.key)
    yield from serve_peer(found)


@pytest.fixture
def mtp_env(tmp_path: Path, redis_url: str, postal_signer: PostalSigner, mtp_peer: Peer) -> dict[str, str]:
    return peer_environment(tmp_path, redis_url, postal_signer, mtp_peer)


def _receive(app: Flask, peer: Peer, owner: Owner) -> None:
    body = peer.envelope(request_payload(peer, jwe_to(owner)))
    response = app.test_client().post("/api/v1/mtp/message", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.get_json()


def test_a_peer_message_whose_filing_job_died_is_filed_by_the_sweeper_alone(
    mtp_env: dict[str, str], mtp_peer: Peer
) -> None:
    for app in _app(mtp_env):
        bridge_: Bridge = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        assert sweep(bridge_) == ["rebuilt"]  # a first sweep on this Redis sets its marker
        _receive(app, mtp_peer, owner)
        first_job = bridge_.index.noted_job("mtp-filing")
        assert sweep(bridge_) == []  # a queued filing job is a live one
        # The job is gone for good (its worker died with it, Redis lost it) while its drain flag still
        # says "queued": no later request would queue another for two minutes, and nothing else would.
        Job.fetch(first_job, connection=bridge_.redis).delete()
        assert sweep(bridge_) == ["mtp-filing"]
        assert sweep(bridge_) == []  # the new one is alive: not queued twice
        run_worker(bridge_)
        [record] = _listed(app, owner, "other")
        assert record["source"] == "mtp"
        assert len(mtp_peer.received) == 1  # and the sender got its delivery message
        assert list(bridge_.objects.list("mtp/")) == []


def test_peer_messages_stored_when_redis_lost_its_data_are_filed_after_the_rebuild(
    mtp_env: dict[str, str], mtp_peer: Peer, redis_server: Any
) -> None:
    for app in _app(mtp_env):
        bridge_: Bridge = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        sweep(bridge_)
        _receive(app, mtp_peer, owner)
        _receive(app, mtp_peer, owner)
        redis_server.flushall()  # the notes, the queued job and its id are gone; the envelopes are stored
        assert sweep(bridge_) == ["rebuilt"]  # the rebuild noted them again and queued their filing itself
        run_worker(bridge_)
        assert len(_listed(app, owner, "other")) == 2
        assert len(mtp_peer.received) == 2
        assert sweep(bridge_) == []


def _age_pending_delivery(bridge_: Bridge, eid: str, seconds: float) -> None:
    """Make a pending delivery message look ``seconds`` old (instead of waiting that long)."""
    key = f"mtp/delivery/{eid}.json"
    delivery = json.loads(bridge_.objects.get(key) or b"")
    bridge_.objects.put(key, json.dumps(delivery | {"created_at": time.time() - seconds}).encode())


def _sweep_deliveries(bridge_: Bridge) -> list[str]:
    bridge_.redis.delete(DELIVERY_SWEEP)  # the delivery sweep runs every 5 minutes: as if they passed
    return sweep(bridge_)


def test_pending_delivery_messages_whose_job_is_gone_are_sent_again_or_dropped(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, mtp_peer: Peer
) -> None:
    # One retry, an hour after the first try: every delivery message waits on a scheduled job.
    env = peer_environment(tmp_path, redis_url, postal_signer, mtp_peer, BRIDGE_OUTBOUND_RETRY_DELAYS="3600")
    for app in _app(env):
        bridge_: Bridge = app.extensions["bridge"]
        owner = make_owner(bridge_, f"support@{DOMAIN}")
        sweep(bridge_)
        mtp_peer.status = 503
        _receive(app, mtp_peer, owner)
        _receive(app, mtp_peer, owner)
        run_worker(bridge_)
        peer_ids = {record["id"]: record["mtp"]["id"] for record in _listed(app, owner, "other")}
        eids = sorted(peer_ids)
        assert len(eids) == 2 and len(mtp_peer.received) == 2
        assert _sweep_deliveries(bridge_) == []  # their retries are scheduled: alive, left alone
        for eid in eids:  # Redis lost them
            Job.fetch(f"mtp-delivery-{eid}", connection=bridge_.redis).delete()
        assert _sweep_deliveries(bridge_) == []  # just written: their jobs may not be queued yet
        recent, ancient = eids
        _age_pending_delivery(bridge_, recent, 120)
        _age_pending_delivery(bridge_, ancient, 3600 + 2 * 120 + 60)  # past its retries' horizon
        mtp_peer.status = 202
        assert _sweep_deliveries(bridge_) == ["mtp-delivery"]
        run_worker(bridge_)
        [sent] = mtp_peer.received[2:]  # the recent one was sent again, the ancient one dropped
        decoded = cbor2.loads(base64.b64decode(sent["cborPayloadBase64"]))["didCommMessage"]
        assert (decoded["intent"], decoded["id"]) == ("delivery", peer_ids[recent])
        assert list(bridge_.objects.list("mtp/")) == []
        assert _sweep_deliveries(bridge_) == []
