"""Sending end to end: POST /api/v1/messages -> routing job -> Postal's send API -> signed events.

Real parts: the suite's Redis and a filesystem store, the RQ worker (in this process), discovery against
Knot (zones mailio.test, peer.test, example.test), the Postal send-API server of tests/postal_api.py
(it counts what it accepted per recipient, so a double send fails), events signed by the Postal simulator.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from rq import SimpleWorker

from bridge import context, create_app
from bridge.context import Bridge
from bridge.mailio.identity import email_lookup_hash
from bridge.sealing import open_sealed
from bridge.settings import Settings
from bridge.store.spool import Spool, SpoolError
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner, run_worker
from tests.postal_api import API_KEY, PostalSendAPI
from tests.postal_sim import PostalSigner, ruby_json

pytestmark = pytest.mark.dns


@pytest.fixture(name="postal")
def postal_fixture() -> Iterator[PostalSendAPI]:
    with PostalSendAPI(verified_domains=(DOMAIN,)) as server:
        yield server


@pytest.fixture(name="environment")
def environment_fixture(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, postal: PostalSendAPI, knot_dns: Any
):
    return bridge_environment(
        tmp_path,
        redis_url,
        postal_signer,
        BRIDGE_POSTAL_URL=postal.url,
        BRIDGE_POSTAL_API_KEY=API_KEY,
        BRIDGE_POSTAL_TIMEOUT="1",
        BRIDGE_OUTBOUND_RETRY_DELAYS="0,0",  # retried at once, so the burst worker runs the retries
    )


@pytest.fixture(name="domains")
def domains_fixture(knot_dns: Any) -> dict[str, str]:
    """Fresh domains: one served by Mailio (TXT, no MX), one by SMTP (MX), one with nothing at all."""
    tag = uuid.uuid4().hex[:10]
    mailio, smtp, nothing = f"m{tag}.mailio.test", f"s{tag}.peer.test", f"n{tag}.example.test"
    key = base64.b64encode(os.urandom(32)).decode()
    knot_dns.set_txt(f"mailio._mailiokey.{mailio}", f"v=MAILIO1; k=ed25519; p={key}")
    knot_dns.set(smtp, "MX", "10 mx.peer.test.")
    return {"mailio": mailio, "smtp": smtp, "none": nothing}


def send(client: Any, owner: Owner, **fields: Any) -> Any:
    return client.post("/api/v1/messages", json=fields, headers=owner.auth)


def recipients(client: Any, owner: Owner, msg_id: str) -> dict[str, dict[str, Any]]:
    response = client.get(f"/api/v1/messages/{msg_id}", headers=owner.auth)
    assert response.status_code == 200, response.get_data()[:300]
    return {r["address"].lower(): r for r in response.get_json()["recipients"]}


def run_jobs(bridge: Bridge, count: int) -> None:
    """Run exactly ``count`` jobs (a retry with delay 0 is queued again at once, for a later call)."""
    SimpleWorker([bridge.queue], connection=bridge.redis).work(burst=True, with_scheduler=False, max_jobs=count)


def sent_event(signer: PostalSigner, kind: str, postal_id: int, token: str, to: str, message_id: str) -> bytes:
    message = {
        "id": postal_id,
        "token": token,
        "direction": "outgoing",
        "message_id": message_id,
        "to": to,
        "from": f"support@{DOMAIN}",
        "subject": "Hello",
        "timestamp": time.time(),
        "spam_status": "NotChecked",
        "tag": None,
    }
    payload = {
        "message": message,
        "status": "Sent",
        "details": "Message for x accepted by mx.peer.test",
        "output": "250 2.0.0 OK",
        "sent_with_ssl": True,
        "timestamp": time.time(),
        "time": 0.41,
    }
    return ruby_json({"event": kind, "timestamp": time.time(), "payload": payload, "uuid": str(uuid.uuid4())})


def post_event(client: Any, signer: PostalSigner, body: bytes) -> Any:
    headers = {**signer.sign_headers(body), "Content-Type": "application/json"}
    return client.post("/postal/events", data=body, headers=headers)


def store_root(settings: Settings) -> Path:
    return Path(settings.storage_url.removeprefix("file://"))


# --- the "Done when" scenario ----------------------------------------------------------------------


def test_three_domains_are_routed_and_the_smtp_recipient_is_delivered_once(
    client: Any,
    bridge: Bridge,
    owner: Owner,
    postal: PostalSendAPI,
    domains: dict[str, str],
    postal_signer: PostalSigner,
) -> None:
    mailio, smtp, nothing = f"ann@{domains['mailio']}", f"Bob@{domains['smtp']}", f"cy@{domains['none']}"
    blind = f"dee@{domains['smtp']}"
    response = send(
        client, owner, to=[mailio, smtp], cc=[nothing, smtp.lower()], bcc=[blind], subject="Plans", text="hi"
    )
    assert response.status_code == 202, response.get_data()
    msg_id = response.get_json()["id"]
    assert set(recipients(client, owner, msg_id)) == {mailio, smtp.lower(), nothing, blind}

    run_worker(bridge)
    states = recipients(client, owner, msg_id)
    assert states[mailio]["route"] == "mailio" and states[mailio]["state"] == "queued"
    assert states[mailio]["reason"] == "Mailio delivery not available yet"
    assert states[nothing]["route"] == "none" and states[nothing]["state"] == "failed"
    assert states[smtp.lower()]["state"] == "accepted" and states[smtp.lower()]["postal"]["id"]
    assert postal.accepted[smtp] == 1 and postal.accepted[blind] == 1 and sum(postal.accepted.values()) == 2
    # Bcc never reaches recipients: not in the headers Postal got, though Postal delivers to its address.
    for sent in postal.messages.values():
        assert b"Bcc" not in sent.raw and blind.encode() not in sent.raw
        assert sent.mail_from == f"support@{DOMAIN}"

    record = bridge.outbound.get(owner.mailbox.address, msg_id)
    assert record["message_id"] == f"{msg_id}@{DOMAIN}"
    ref = states[smtp.lower()]["postal"]
    body = sent_event(postal_signer, "MessageSent", ref["id"], ref["token"], smtp, record["message_id"])
    assert post_event(client, postal_signer, body).status_code == 200
    assert recipients(client, owner, msg_id)[smtp.lower()]["state"] == "delivered"

    run_worker(bridge)  # nothing left to do: no second send
    assert postal.duplicates() == {} and postal.accepted[smtp] == 1
    # The Mailio recipient still waits for the peer leg, so its plaintext is still kept (encrypted).
    assert bridge.spool.exists(owner.mailbox.address, msg_id)
    # The owner's sealed copy keeps the Bcc, and is listed in `sent`.
    data = client.get(f"/api/v1/messages/{msg_id}", headers=owner.auth).get_json()
    opened = open_sealed(data["body"], owner.private_jwk)
    assert b"Bcc: " + blind.encode() in opened and b"Message-ID: <" + record["message_id"].encode() in opened
    listed = client.get("/api/v1/messages?folder=sent", headers=owner.auth).get_json()["messages"]
    assert [m["id"] for m in listed] == [msg_id]


def test_a_slow_answer_after_accepting_is_uncertain_and_never_resent(
    client: Any,
    bridge: Bridge,
    owner: Owner,
    postal: PostalSendAPI,
    domains: dict[str, str],
    postal_signer: PostalSigner,
) -> None:
    rcpt = f"eve@{domains['smtp']}"
    postal.fail_next("slow", delay=2.5)
    msg_id = send(client, owner, to=[rcpt], subject="s", text="t").get_json()["id"]
    run_worker(bridge)
    state = recipients(client, owner, msg_id)[rcpt]
    assert state["state"] == "uncertain" and "not resent" in state["reason"]
    assert postal.accepted[rcpt] == 1
    from bridge.jobs.outbound import enqueue_delivery

    enqueue_delivery(bridge, owner.mailbox.address, msg_id)  # a second delivery job changes nothing
    run_worker(bridge)
    assert postal.accepted[rcpt] == 1
    # Postal's event, matched by the Message-ID the bridge set and the recipient, resolves it.
    sent = next(m for m in postal.messages.values() if m.rcpt_to == rcpt)
    body = sent_event(postal_signer, "MessageSent", sent.id, sent.token, rcpt, sent.message_id)
    assert post_event(client, postal_signer, body).status_code == 200
    assert recipients(client, owner, msg_id)[rcpt]["state"] == "delivered"


def test_a_502_is_uncertain_and_a_refused_connection_is_retried_then_accepted(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    first, second = f"fay@{domains['smtp']}", f"gus@{domains['smtp']}"
    postal.fail_next("http", status=502)
    failed_id = send(client, owner, to=[first], subject="s", text="t").get_json()["id"]
    run_worker(bridge)
    assert recipients(client, owner, failed_id)[first]["state"] == "uncertain"
    assert postal.accepted[first] == 0  # this proxy answered without passing it on, but nobody can know that

    msg_id = send(client, owner, to=[second], subject="s", text="t").get_json()["id"]
    with postal.refusing():
        run_jobs(bridge, 1)  # routing and its first call: connection refused, provably not sent -> queued again
        state = recipients(client, owner, msg_id)[second]
        assert state["state"] == "queued" and "will retry" in state["reason"]
        assert postal.accepted[second] == 0
    run_worker(bridge)
    assert recipients(client, owner, msg_id)[second]["state"] == "accepted"
    assert postal.accepted[second] == 1 and postal.duplicates() == {}


def test_refused_past_the_last_retry_fails_with_the_reason(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    rcpt = f"hal@{domains['smtp']}"
    msg_id = send(client, owner, to=[rcpt], subject="s", text="t").get_json()["id"]
    with postal.refusing():
        run_worker(bridge)  # routing's first call, then a delivery job and its retries (delays 0, 0)
    state = recipients(client, owner, msg_id)[rcpt]
    assert state["state"] == "failed" and "gave up after retries" in state["reason"]
    record = bridge.outbound.get(owner.mailbox.address, msg_id)
    assert len(record["recipients"][0]["attempts"]) == 3  # one call, then one per delay: no more, no less
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)


def test_a_leftover_sending_mark_is_uncertain_not_resent(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    rcpt = f"ida@{domains['smtp']}"
    msg_id = send(client, owner, to=[rcpt], subject="s", text="t").get_json()["id"]
    bridge.outbound.start_attempt(owner.mailbox.address, msg_id, [rcpt])  # a worker died during its call
    run_worker(bridge)
    assert recipients(client, owner, msg_id)[rcpt]["state"] == "uncertain"
    assert postal.accepted[rcpt] == 0


def test_routing_sends_once_and_leaves_a_busy_message_to_a_delivery_job(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    from bridge.jobs.outbound import DELIVER_TIMEOUT, message_lock

    rcpt = f"ivy@{domains['smtp']}"
    msg_id = send(client, owner, to=[rcpt], subject="s", text="t").get_json()["id"]
    # Another delivery job of this message holds its lock (an owner's resend, say): routing must not send.
    with message_lock(bridge, "deliver", owner.mailbox.address, msg_id, DELIVER_TIMEOUT) as held:
        assert held
        run_jobs(bridge, 1)  # the routing job
        state = recipients(client, owner, msg_id)[rcpt]
        assert state["route"] == "smtp" and state["state"] == "queued" and postal.accepted[rcpt] == 0
    run_worker(bridge)  # the delivery job routing queued for it
    assert recipients(client, owner, msg_id)[rcpt]["state"] == "accepted"
    assert postal.accepted[rcpt] == 1 and postal.duplicates() == {}


def test_a_thousand_recipient_message_is_routed_in_bulk_and_tracked_per_recipient(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    smtp = [f"r{i:04d}@{domains['smtp']}" for i in range(998)]
    mailio, nothing = f"ann@{domains['mailio']}", f"cy@{domains['none']}"
    response = send(client, owner, to=smtp[:500], cc=[mailio, *smtp[500:]], bcc=[nothing], subject="All", text="hi")
    assert response.status_code == 202, response.get_data()[:300]
    msg_id = response.get_json()["id"]
    run_jobs(bridge, 1)  # the routing job and its calls to Postal (the contacts job stays queued)
    assert bridge.sender_hashes.computed == 0  # no scrypt on the way to Postal
    calls = [seen for seen in postal.seen if seen.path == "/api/v1/send/raw"]
    assert len(calls) == 20 and all(len(json.loads(c.body)["rcpt_to"]) == 50 for c in calls[:-1])
    assert sorted(postal.accepted) == sorted(smtp) and postal.duplicates() == {}
    states = recipients(client, owner, msg_id)
    assert len(states) == 1000
    accepted = [states[a] for a in smtp]
    assert {s["state"] for s in accepted} == {"accepted"} and len({s["postal"]["id"] for s in accepted}) == 998
    assert states[mailio]["state"] == "queued" and states[mailio]["reason"] == "Mailio delivery not available yet"
    assert states[nothing]["state"] == "failed"
    # Each recipient is followed on its own: Postal's id of one of them finds that one only.
    ref = states[smtp[777]]["postal"]
    assert bridge.outbound.find_postal(ref["id"], ref["token"]).address == smtp[777]
    assert bridge.spool.exists(owner.mailbox.address, msg_id)  # the Mailio recipient still waits for it


def test_the_contacts_job_records_whom_the_owner_wrote_to(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    first, second, stranger = f"Kim@{domains['smtp']}", f"lee@{domains['none']}", f"max@{domains['smtp']}"
    send(client, owner, to=[first, second], subject="s", text="t")
    run_worker(bridge)
    hashes = {address: email_lookup_hash(address) for address in (first, second, stranger)}
    known = bridge.contacts.known(owner.mailbox.address, hashes.values())
    assert known == {hashes[first], hashes[second]} and bridge.sender_hashes.computed == 2
    send(client, owner, to=[first.lower()], subject="again", text="t")
    run_worker(bridge)
    assert bridge.sender_hashes.computed == 2  # hashed once per address, whoever writes to it again
    bridge.redis.delete(f"bridge:contacts:{owner.mailbox.address}", f"bridge:contacts:{owner.mailbox.address}:loaded")
    assert bridge.contacts.known(owner.mailbox.address, hashes.values()) == {hashes[first], hashes[second]}


def test_the_spool_is_encrypted_and_deleted_after_the_handoff(
    client: Any, bridge: Bridge, settings: Settings, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    subject = f"Quarterly-{uuid.uuid4().hex}"
    rcpt = f"jo@{domains['smtp']}"
    msg_id = send(client, owner, to=[rcpt], subject=subject, text="numbers").get_json()["id"]
    root = store_root(settings)
    assert bridge.spool.exists(owner.mailbox.address, msg_id)
    stored = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in stored if subject.encode() in p.read_bytes()]  # no plaintext at rest
    other_key = settings.data_dir / "other.key"
    with pytest.raises(SpoolError):
        Spool(bridge.objects, other_key).get(owner.mailbox.address, msg_id)
    assert (settings.spool_key_path.stat().st_mode & 0o777) == 0o600
    _, wire = bridge.spool.get(owner.mailbox.address, msg_id) or ("", b"")
    assert subject.encode() in wire

    run_worker(bridge)
    assert postal.accepted[rcpt] == 1
    assert not bridge.spool.exists(owner.mailbox.address, msg_id)
    assert not [p for p in root.rglob("*") if p.is_file() and subject.encode() in p.read_bytes()]


def test_raw_messages_keep_their_message_id_and_lose_bcc(
    client: Any, bridge: Bridge, owner: Owner, postal: PostalSendAPI, domains: dict[str, str]
) -> None:
    rcpt, blind = f"kim@{domains['smtp']}", f"lou@{domains['smtp']}"
    raw = (
        f"From: Support <{owner.mailbox.email}>\r\nTo: {rcpt}\r\nBcc: {blind}\r\nSubject: raw\r\n"
        "Message-ID: <given.1@example.org>\r\n\r\nbody\r\n"
    ).encode()
    response = client.post("/api/v1/messages", json={"raw": base64.b64encode(raw).decode()}, headers=owner.auth)
    assert response.status_code == 202, response.get_data()
    msg_id = response.get_json()["id"]
    assert bridge.outbound.get(owner.mailbox.address, msg_id)["message_id"] == "given.1@example.org"
    run_worker(bridge)
    assert postal.accepted[rcpt] == 1 and postal.accepted[blind] == 1
    assert all(b"Bcc" not in m.raw and b"Date: " in m.raw for m in postal.messages.values())


# --- bad input -------------------------------------------------------------------------------------

BAD_FIELDS = [
    ({"to": ["not an address"]}, "to"),
    ({"to": "a@example.org", "cc": [7]}, "cc"),
    ({"to": "a@example.org", "bcc": {"x": 1}}, "bcc"),
    ({"to": "a@bad_domain!.org"}, "to"),
    ({"to": "a@example.org", "subject": "two\r\nBcc: x@example.org"}, "subject"),
    ({"to": "a@example.org", "subject": 5}, "subject"),
    ({"to": "a@example.org", "text": ["x"]}, "text"),
    ({"to": "a@example.org", "html": 1}, "html"),
    ({"to": "a@example.org", "attachments": {"filename": "x"}}, "attachments"),
    (
        {"to": "a@example.org", "attachments": [{"filename": "x", "content_type": "text/plain", "data": "%%"}]},
        "attachments",
    ),
    (
        {"to": "a@example.org", "attachments": [{"filename": "", "content_type": "text/plain", "data": ""}]},
        "attachments",
    ),
    ({"to": "a@example.org", "attachments": [{"filename": "x", "content_type": "nope", "data": ""}]}, "attachments"),
    ({"to": "a@example.org", "in_reply_to": "no angle or at"}, "in_reply_to"),
    ({"to": "a@example.org", "from": "x"}, "from"),
    ({"to": "a@example.org", "priority": "high"}, "priority"),
    ({"raw": "***"}, "raw"),
    ({"raw": base64.b64encode(b"no headers at all").decode()}, "raw"),
    ({"raw": "AAAA", "to": "a@example.org"}, "raw"),
    ({}, "to"),
    ({"to": [], "cc": [], "subject": "nobody"}, "to"),
]


@pytest.mark.parametrize(("fields", "name"), BAD_FIELDS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_FIELDS)])
def test_malformed_input_is_400_naming_the_field(client: Any, owner: Owner, fields: dict, name: str) -> None:
    response = client.post("/api/v1/messages", json=fields, headers=owner.auth)
    assert response.status_code == 400, response.get_data()
    assert response.get_json()["error"].startswith(f"{name}:")


def test_not_json_a_foreign_from_no_token_and_too_large(client: Any, bridge: Bridge, owner: Owner) -> None:
    assert client.post("/api/v1/messages", data="to=x", headers=owner.auth).status_code == 400
    assert client.post("/api/v1/messages", json=[1], headers=owner.auth).status_code == 400
    foreign = send(client, owner, to=["a@example.org"], **{"from": "ceo@example.org"}, text="x")
    assert foreign.status_code == 403
    raw = b"From: ceo@example.org\r\nTo: a@example.org\r\n\r\nx\r\n"
    response = client.post("/api/v1/messages", json={"raw": base64.b64encode(raw).decode()}, headers=owner.auth)
    assert response.status_code == 403
    assert client.post("/api/v1/messages", json={"to": "a@example.org"}).status_code == 401
    assert (
        client.post("/api/v1/messages", json={"to": "a@example.org"}, headers={"Authorization": "Bearer x"}).status_code
        == 401
    )
    assert len(bridge.queue) == 0  # nothing queued by a refused request


def test_over_the_size_limit_is_413_before_the_body_is_read(live_url: str, settings: Settings, owner: Owner) -> None:
    limit = settings.max_message_bytes * 2
    with socket.create_connection(("127.0.0.1", int(live_url.rsplit(":", 1)[1])), timeout=5) as conn:
        conn.sendall(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {owner.token}\r\nContent-Length: {limit}\r\n\r\n".encode()
        )
        answer = conn.recv(4096)  # answered without our sending a single body byte
    assert answer.startswith(b"HTTP/1.1 413")


def test_a_decoded_message_over_the_limit_is_413(environment: dict[str, str]) -> None:
    app: Flask = create_app(Settings.from_env({**environment, "BRIDGE_MAX_MESSAGE_BYTES": "1000"}))
    owner = make_owner(app.extensions["bridge"], f"big@{DOMAIN}")
    client = app.test_client()
    raw = f"From: {owner.mailbox.email}\r\nTo: a@example.org\r\n\r\n".encode() + b"x" * 2000
    assert (
        client.post("/api/v1/messages", json={"raw": base64.b64encode(raw).decode()}, headers=owner.auth).status_code
        == 413
    )
    assert send(client, owner, to=["a@example.org"], text="x" * 2000).status_code == 413


def test_an_alias_may_send_and_another_mailboxs_message_is_404(client: Any, bridge: Bridge, owner: Owner) -> None:
    bridge.mailboxes.add_alias(owner.mailbox.email, f"sales@{DOMAIN}")
    owner.mailbox = bridge.mailboxes.resolve(owner.mailbox.email, cached=False) or owner.mailbox
    response = send(client, owner, to=["a@example.org"], **{"from": f"Sales <Sales@{DOMAIN}>"}, text="x")
    assert response.status_code == 202, response.get_data()
    stranger = make_owner(bridge, f"other@{DOMAIN}")
    msg_id = response.get_json()["id"]
    assert client.get(f"/api/v1/messages/{msg_id}", headers=stranger.auth).status_code == 404
    assert client.get(f"/api/v1/messages/{msg_id}", headers=owner.auth).status_code == 200


def test_the_hourly_limits_answer_429(environment: dict[str, str], redis_url: str) -> None:
    settings = Settings.from_env(
        {**environment, "BRIDGE_SEND_LIMIT_MESSAGES": "2", "BRIDGE_SEND_LIMIT_RECIPIENTS": "3"}
    )
    app: Flask = create_app(settings)
    context.use(app.extensions["bridge"])
    try:
        client, owner = app.test_client(), make_owner(app.extensions["bridge"], f"limited@{DOMAIN}")
        assert send(client, owner, to=["a@example.org", "b@example.org"], text="x").status_code == 202
        assert send(client, owner, to=["c@example.org", "d@example.org"], text="x").status_code == 429  # 4 > 3
        assert send(client, owner, to=["c@example.org"], text="x").status_code == 202
        assert send(client, owner, to=["e@example.org"], text="x").status_code == 429  # a third message
    finally:
        context.use(None)


def test_the_records_of_a_sent_message_carry_no_subject(client: Any, bridge: Bridge, owner: Owner) -> None:
    response = send(client, owner, to=["a@example.org"], subject="Secret-subject-xyz", text="x")
    record = bridge.outbound.get(owner.mailbox.address, response.get_json()["id"])
    assert "Secret-subject-xyz" not in json.dumps(record)
