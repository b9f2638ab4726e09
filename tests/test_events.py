"""Postal's event webhooks -> per-recipient delivery states, against the suite's real Redis and store.

Events are built in Postal's shape and key order, encoded as Rails' to_json (ruby_json) and signed by
the Postal simulator's throw-away key, as Postal would send them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid as uuids
from pathlib import Path

import pytest
import redis
import requests

from bridge import create_app
from bridge.maintenance import rebuild_index
from bridge.settings import Settings
from bridge.store import outbound
from bridge.store.outbound import (
    BOUNCED,
    DELAYED,
    DELIVERED,
    FAILED,
    HELD,
    QUEUED,
    RANK,
    UNCERTAIN,
    may_move,
    public_recipients,
)
from bridge.web.events import COUNTS
from tests.conftest import bridge_environment
from tests.postal_sim import PostalSigner, ruby_json
from tests.servers import free_port
from tests.webproc import gunicorn_process

FIXTURES = Path(__file__).resolve().parent / "data" / "postal"  # copies of ../shared/fixtures/postal
OWNER, MSG = "0xowner", "msg1"
MESSAGE_ID = "20261130.abc@mail.example.test"
ANN, BOB = "ann@example.net", "bob@example.org"
IDS = {ANN: (7001, "tokAnn"), BOB: (7002, "tokBob")}
STATUS = {
    "MessageSent": "Sent",
    "MessageDelayed": "SoftFail",
    "MessageDeliveryFailed": "HardFail",
    "MessageHeld": "Held",
}
KINDS = {
    "MessageSent": DELIVERED,
    "MessageDelayed": DELAYED,
    "MessageDeliveryFailed": FAILED,
    "MessageHeld": HELD,
    "MessageBounced": BOUNCED,
}


def message(postal_id: int, token: str, to: str, *, direction: str = "outgoing", message_id: str = MESSAGE_ID) -> dict:
    return {
        "id": postal_id,
        "token": token,
        "direction": direction,
        "message_id": message_id,
        "to": to,
        "from": "support@mail.example.test",
        "subject": "Hello",
        "timestamp": 1777393299.851346,
        "spam_status": "NotChecked",
        "tag": None,
    }


def event(kind: str, msg: dict, *, at: float = 1777393301.5, uuid: str | None = None) -> bytes:
    if kind == "MessageBounced":
        bounce = message(9000, "bounceTok", "support@mail.example.test", direction="incoming")
        payload: dict = {"original_message": msg, "bounce": {**bounce, "subject": "Mail delivery failed"}}
    elif kind in STATUS:
        payload = {
            "message": msg,
            "status": STATUS[kind],
            "details": f"{kind} details",
            "output": "550 5.1.1 <x@example.net>: User unknown" if kind == "MessageDeliveryFailed" else "",
            "sent_with_ssl": True,
            "timestamp": at - 0.01,
            "time": 0.41,
        }
    else:
        payload = {"message": msg, "url": "https://example.org", "token": "t", "ip_address": "192.0.2.1"}
    return ruby_json({"event": kind, "timestamp": at, "payload": payload, "uuid": uuid or str(uuids.uuid4())})


def post(client, signer: PostalSigner, body: bytes, **sign):
    headers = {**signer.sign_headers(body, **sign), "Content-Type": "application/json"}
    return client.post("/postal/events", data=body, headers=headers)


def for_(rcpt: str, kind: str, **kw) -> bytes:
    return event(kind, message(*IDS[rcpt], rcpt), **kw)


def state(bridge, rcpt: str = ANN) -> str:
    record = bridge.outbound.get(OWNER, MSG)
    return next(r for r in record["recipients"] if r["address"].lower() == rcpt)["state"]


def counts(bridge) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in bridge.redis.hgetall(COUNTS).items()}


@pytest.fixture
def sent(bridge):
    """A message to two recipients, accepted by Postal's send API."""
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", ["Ann@Example.net", BOB, "ann@example.NET"])
    bridge.outbound.record_postal(OWNER, MSG, {a: {"id": i, "token": t} for a, (i, t) in IDS.items()})
    return bridge


# --- the record and its transition rule ------------------------------------------------------


def test_the_transition_rule_never_goes_backwards_but_a_bounce_after_delivery_wins():
    states = list(RANK)
    for current in states:
        for proposed in states:
            expected = RANK[proposed] >= RANK[current]
            if current in (FAILED, BOUNCED):
                expected = False
            if current == DELIVERED:
                expected = proposed == BOUNCED
            assert may_move(current, proposed) is expected, (current, proposed)
    assert may_move(DELIVERED, BOUNCED) and not may_move(DELIVERED, DELAYED) and not may_move(BOUNCED, DELIVERED)
    assert may_move(DELAYED, HELD) and may_move(HELD, DELAYED) and not may_move(UNCERTAIN, QUEUED)


def test_create_collapses_recipients_and_record_postal_accepts(sent):
    record = sent.outbound.get(OWNER, MSG)
    assert [r["address"] for r in record["recipients"]] == ["Ann@Example.net", BOB]
    assert record["message_id"] == MESSAGE_ID
    assert {r["state"] for r in record["recipients"]} == {"accepted"}
    assert record["recipients"][0]["postal"] == {"id": 7001, "token": "tokAnn"}
    assert sent.outbound.find_postal(7001, "tokAnn") == outbound.Location(OWNER, MSG, "Ann@Example.net")
    assert sent.outbound.find_postal(7001, "otherServersToken") is None
    # create is create-only: a retried job gets the stored record back, states kept
    again = sent.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", [ANN])
    assert len(again["recipients"]) == 2 and again["recipients"][0]["state"] == "accepted"
    waiting = sent.outbound.waiting(time.time() + 1)
    assert {(w.owner, w.id, w.address) for w in waiting} == {(OWNER, MSG, "Ann@Example.net"), (OWNER, MSG, BOB)}
    sent.outbound.set_state(OWNER, MSG, BOB, DELIVERED)
    assert [w.address for w in sent.outbound.waiting(time.time() + 1)] == ["Ann@Example.net"]
    assert sent.outbound.waiting(0) == []
    assert public_recipients(sent.outbound.get(OWNER, MSG))[1] == {
        "address": BOB,
        "route": None,
        "state": DELIVERED,
        "reason": None,
        "updated_at": pytest.approx(time.time(), abs=30),
        "postal": {"id": 7002, "token": "tokBob"},
        "peer": None,  # a Mailio recipient's host and sealed_by (tests/test_mtp_e2e.py)
    }
    sent.redis.flushall()  # Redis lost its index: rebuilt from the store
    assert sent.outbound.find_postal(7002) is None
    assert sent.outbound.rebuild_index() == 1
    assert sent.outbound.find_postal(7002).address == BOB
    assert len(sent.outbound.waiting(time.time() + 1)) == 1
    assert sent.outbound.find_message_id(f"<{MESSAGE_ID}>") == (OWNER, MSG)


def test_route_none_fails_and_attempts_are_recorded(bridge):
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", [ANN, BOB])
    bridge.outbound.set_route(OWNER, MSG, BOB, "none", reason="no MX and no Mailio record")
    bridge.outbound.set_route(OWNER, MSG, ANN, "smtp")
    number = bridge.outbound.start_attempt(OWNER, MSG, [ANN])
    record = bridge.outbound.end_attempt(OWNER, MSG, [ANN], number, "temporary", "connection refused")
    ann, bob = record["recipients"]
    assert (bob["state"], bob["reason"], bob["route"]) == (FAILED, "no MX and no Mailio record", "none")
    assert (
        ann["attempts"] == [{**ann["attempts"][0], "n": 1, "outcome": "temporary", "detail": "connection refused"}]
        and ann["state"] == QUEUED
    )
    assert bridge.outbound.set_state(OWNER, MSG, BOB, DELIVERED) is False  # failed is final


# --- each event kind -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_event_kind_moves_the_right_recipient(client, sent, postal_signer, kind):
    response = post(client, postal_signer, for_(BOB, kind))
    assert (response.status_code, response.get_data(as_text=True)) == (200, "applied\n")
    assert (state(sent, BOB), state(sent, ANN)) == (KINDS[kind], "accepted")
    bob = sent.outbound.get(OWNER, MSG)["recipients"][1]
    assert bob["reason"] == (
        "bounced: Mail delivery failed"
        if kind == "MessageBounced"
        else f"{kind} details"
        + (" (550 5.1.1 <x@example.net>: User unknown)" if kind == "MessageDeliveryFailed" else "")
    )
    assert counts(sent)[f"received:{kind}"] == 1 and counts(sent)["outcome:applied"] == 1


def test_postals_captured_fixtures_as_sent(client, bridge, postal_signer):
    failed = (FIXTURES / "webhook_message_delivery_failed.json").read_bytes().strip()
    bridge.outbound.create(
        OWNER, MSG, "<0b6c1d9e-2f7a-4e3b-8c5d-6a9f0e1b2c3d@rp.postal.example.com>", ["nobody@example.net"]
    )
    bridge.outbound.record_postal(OWNER, MSG, {"nobody@example.net": {"id": 4822, "token": "Hq3VbT8nLx2RcW7a"}})
    assert post(client, postal_signer, failed).get_data() == b"applied\n"
    [entry] = bridge.outbound.get(OWNER, MSG)["recipients"]
    assert entry["state"] == FAILED and "User unknown" in entry["reason"]
    incoming = (FIXTURES / "webhook_message_sent.json").read_bytes().strip()
    assert post(client, postal_signer, incoming).get_data() == b"incoming\n"


# --- duplicates and reordering ---------------------------------------------------------------


def test_a_duplicate_uuid_is_applied_once_even_after_redis_lost_the_dedupe_key(client, sent, postal_signer):
    body = for_(ANN, "MessageDelayed", uuid="11111111-2222-3333-4444-555555555555")
    assert post(client, postal_signer, body).get_data() == b"applied\n"
    sent.redis.set(f"bridge:outbound:lock:{OWNER}/{MSG}", "busy", px=30_000)
    assert post(client, postal_signer, body).get_data() == b"duplicate\n"  # from Redis: the record is not read
    sent.redis.delete(f"bridge:outbound:lock:{OWNER}/{MSG}", "bridge:events:done:11111111-2222-3333-4444-555555555555")
    assert post(client, postal_signer, body).get_data() == b"duplicate\n"  # the recipient remembers the uuid
    ann = sent.outbound.get(OWNER, MSG)["recipients"][0]
    assert len(ann["events"]) == 1 and ann["state"] == DELAYED


def test_delayed_after_sent_is_ignored(client, sent, postal_signer):
    assert post(client, postal_signer, for_(ANN, "MessageSent", at=200.0)).get_data() == b"applied\n"
    assert post(client, postal_signer, for_(ANN, "MessageDelayed", at=100.0)).get_data() == b"stale\n"
    assert state(sent) == DELIVERED


def test_bounced_after_sent_wins_and_sent_after_bounced_is_ignored(client, sent, postal_signer):
    post(client, postal_signer, for_(ANN, "MessageSent"))
    assert post(client, postal_signer, for_(ANN, "MessageBounced")).get_data() == b"applied\n"
    assert state(sent) == BOUNCED
    assert post(client, postal_signer, for_(BOB, "MessageBounced")).get_data() == b"applied\n"
    assert post(client, postal_signer, for_(BOB, "MessageSent")).get_data() == b"stale\n"
    assert post(client, postal_signer, for_(BOB, "MessageDelayed")).get_data() == b"stale\n"
    assert state(sent, BOB) == BOUNCED


def test_delayed_and_held_follow_postals_timestamps(client, sent, postal_signer):
    post(client, postal_signer, for_(ANN, "MessageHeld", at=300.0))
    assert post(client, postal_signer, for_(ANN, "MessageDelayed", at=200.0)).get_data() == b"stale\n"
    assert state(sent) == HELD
    assert post(client, postal_signer, for_(ANN, "MessageDelayed", at=400.0)).get_data() == b"applied\n"
    assert state(sent) == DELAYED


# --- events before the send answer, uncertain sends ----------------------------------------------


def test_an_event_before_the_send_answer_is_kept_and_applied_when_it_is_recorded(client, bridge, postal_signer):
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", [ANN, BOB])
    assert post(client, postal_signer, for_(ANN, "MessageDelayed", at=1.0)).get_data() == b"kept\n"
    assert post(client, postal_signer, for_(ANN, "MessageSent", at=2.0)).get_data() == b"kept\n"
    assert state(bridge) == QUEUED
    bridge.outbound.record_postal(OWNER, MSG, {a: {"id": i, "token": t} for a, (i, t) in IDS.items()})
    assert (state(bridge), state(bridge, BOB)) == (DELIVERED, "accepted")
    assert bridge.redis.exists(f"bridge:outbound:pending:{OWNER}/{MSG}") == 0


def test_an_uncertain_send_is_resolved_by_message_id_and_recipient(client, bridge, postal_signer):
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", [ANN, BOB])
    bridge.outbound.set_state(OWNER, MSG, ANN, UNCERTAIN, "timed out after sending")
    unknown_id = event("MessageSent", message(8123, "tokX", "ANN@example.net", message_id=f"x <{MESSAGE_ID}>"))
    assert post(client, postal_signer, unknown_id).get_data() == b"applied\n"
    ann = bridge.outbound.get(OWNER, MSG)["recipients"][0]
    assert (ann["state"], ann["postal"]) == (DELIVERED, {"id": 8123, "token": "tokX"})
    assert post(client, postal_signer, event("MessageBounced", message(8123, "tokX", ANN))).get_data() == b"applied\n"
    assert state(bridge) == BOUNCED
    assert state(bridge, BOB) == QUEUED


def test_events_kept_while_the_send_was_in_flight_resolve_it_when_it_turns_uncertain(client, bridge, postal_signer):
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", [ANN])
    assert post(client, postal_signer, event("MessageSent", message(8200, "tokY", ANN))).get_data() == b"kept\n"
    bridge.outbound.set_state(OWNER, MSG, ANN, UNCERTAIN, "worker died during the call")
    assert state(bridge) == DELIVERED


# --- what is not the bridge's: counted, 2xx -------------------------------------------------------


def test_unknown_events_unknown_messages_and_incoming_mail_are_2xx_and_counted(client, sent, postal_signer):
    assert post(client, postal_signer, for_(ANN, "MessageLinkClicked")).get_data() == b"unknown_event\n"
    dns_error = ruby_json({"event": "DomainDNSError", "timestamp": 1.5, "payload": {"domain": "x"}, "uuid": "u-1"})
    assert post(client, postal_signer, dns_error).get_data() == b"unknown_event\n"
    other = event("MessageSent", message(99, "tok99", "zed@example.com", message_id="not-ours@example.com"))
    assert post(client, postal_signer, other).get_data() == b"not_ours\n"
    wrong_token = event("MessageSent", message(7001, "otherServer", ANN, message_id="theirs@example.com"))
    assert post(client, postal_signer, wrong_token).get_data() == b"not_ours\n"
    incoming = event("MessageSent", message(7001, "tokAnn", ANN, direction="incoming"))
    assert post(client, postal_signer, incoming).get_data() == b"incoming\n"
    assert {state(sent), state(sent, BOB)} == {"accepted"}
    got = counts(sent)
    assert got["outcome:unknown_event"] == 2 and got["outcome:not_ours"] == 2 and got["outcome:incoming"] == 1
    assert got["received:DomainDNSError"] == 1 and got["received:MessageLinkClicked"] == 1
    assert not any("@" in name for name in got)


# --- refused requests -------------------------------------------------------------------------------


def test_unsigned_wrong_key_or_tampered_is_401_and_nothing_changes(client, sent, postal_signer):
    body = for_(ANN, "MessageBounced")
    assert client.post("/postal/events", data=body, content_type="application/json").status_code == 401
    assert post(client, PostalSigner(), body).status_code == 401
    headers = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
    assert client.post("/postal/events", data=body.replace(b"tokAnn", b"tokAnm"), headers=headers).status_code == 401
    assert state(sent) == "accepted"
    assert counts(sent) == {} and not sent.redis.keys("bridge:events:done:*")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"event": "MessageSent", "timestamp": 1.0, "payload": {}}',
        b'{"event": "MessageSent", "timestamp": 1.0, "payload": [], "uuid": "u"}',
        b'{"event": "MessageSent", "timestamp": "x", "payload": {}, "uuid": "u"}',
        b'{"event": "MessageSent", "timestamp": 1.0, "payload": {"message": {"token": "t", "to": "a@b"}}, "uuid": "u"}',
        b'{"event": "MessageBounced", "timestamp": 1.0, "payload": {"message": {"id": 1, "to": "a@b"}}, "uuid": "u"}',
        b'{"event": "MessageSent", "timestamp": 1.0, "payload": {"message": {"id": 1, "to": null}}, "uuid": "u"}',
        b'{"event": "MessageSent", "timestamp": 1.0, "payload": {"message": {"id": 1, "to": "a@b"}}, "uuid": "../x"}',
        b"[" * 100_000,
    ],
)
def test_malformed_signed_events_are_400(client, sent, postal_signer, body):
    response = post(client, postal_signer, body)
    assert response.status_code == 400 and response.get_data(as_text=True).startswith("malformed event")
    assert state(sent) == "accepted"


def test_an_oversized_event_is_413(client, sent, postal_signer):
    body = ruby_json({"event": "MessageSent", "timestamp": 1.0, "payload": {"x": "a" * (1 << 20)}, "uuid": "u"})
    assert post(client, postal_signer, body).status_code == 413
    assert post(client, postal_signer, for_(ANN, "MessageSent")).status_code == 200


def test_redis_down_is_503_and_nothing_leaks(tmp_path, postal_signer):
    env = bridge_environment(tmp_path, f"redis://127.0.0.1:{free_port()}/0", postal_signer)
    client = create_app(Settings.from_env(env)).test_client()
    response = post(client, postal_signer, for_(ANN, "MessageSent"))
    assert response.status_code == 503 and response.get_data() == b"storage unavailable, retry later\n"


def test_storage_down_is_503(tmp_path, redis_url, postal_signer, monkeypatch):
    for name, value in [
        ("AWS_ACCESS_KEY_ID", "k"),
        ("AWS_SECRET_ACCESS_KEY", "secret-xyz"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_STORAGE_URL="s3://events-bucket")
    client = create_app(Settings.from_env(env)).test_client()
    location = {"owner": OWNER, "id": MSG, "address": ANN, "token": "tokAnn"}
    redis.Redis.from_url(redis_url).set("bridge:outbound:postal:7001", json.dumps(location))
    response = post(client, postal_signer, for_(ANN, "MessageSent"))
    assert response.status_code == 503 and b"secret-xyz" not in response.data


def test_a_record_locked_past_the_wait_is_503_then_applied_on_postals_retry(client, sent, postal_signer):
    sent.outbound.lock_wait = 0.2
    sent.redis.set(f"bridge:outbound:lock:{OWNER}/{MSG}", "someone else", px=30_000)
    body = for_(ANN, "MessageSent")
    assert post(client, postal_signer, body).status_code == 503
    assert state(sent) == "accepted" and not sent.redis.keys("bridge:events:done:*")
    sent.redis.delete(f"bridge:outbound:lock:{OWNER}/{MSG}")
    assert post(client, postal_signer, body).get_data() == b"applied\n"


def test_concurrent_events_for_one_message_lose_no_update(live_url, bridge, postal_signer):
    rcpts = [f"r{i}@example.net" for i in range(24)]
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", rcpts)
    bridge.outbound.record_postal(OWNER, MSG, {a: {"id": 100 + i, "token": f"t{i}"} for i, a in enumerate(rcpts)})
    bodies = [event("MessageDelayed", message(100 + i, f"t{i}", a)) for i, a in enumerate(rcpts)]
    answers: list[int] = []

    def send(body: bytes) -> None:
        headers = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
        answers.append(requests.post(f"{live_url}/postal/events", data=body, headers=headers, timeout=10).status_code)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * len(rcpts)
    assert [r["state"] for r in bridge.outbound.get(OWNER, MSG)["recipients"]] == [DELAYED] * len(rcpts)


def test_an_event_through_gunicorn(tmp_path, environment, sent, postal_signer):
    log = tmp_path / "gunicorn.log"
    with gunicorn_process(environment, log) as (url, _pid):
        body = for_(ANN, "MessageSent")
        headers = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
        started = time.monotonic()
        response = requests.post(f"{url}/postal/events", data=body, headers=headers, timeout=5)  # Postal's limit
        assert (response.status_code, response.text) == (200, "applied\n")
        assert time.monotonic() - started < 2  # well inside Postal's fixed 5 s, even on a busy machine
        assert requests.post(f"{url}/postal/events", data=body, timeout=5).status_code == 401
    assert state(sent) == DELIVERED
    assert "postal event MessageSent: applied" in log.read_text()
    assert ANN not in log.read_text().lower() and "tokAnn" not in log.read_text()


def test_after_an_explicit_resend_the_earlier_copys_events_move_nothing(client, bridge, postal_signer):
    bridge.outbound.create(OWNER, MSG, f"<{MESSAGE_ID}>", [ANN])
    bridge.outbound.set_state(OWNER, MSG, ANN, UNCERTAIN, "timed out after sending")
    assert post(client, postal_signer, event("MessageDelayed", message(8300, "old", ANN))).get_data() == b"applied\n"
    record = bridge.outbound.reopen(OWNER, MSG, ANN)
    assert (record["recipients"][0]["state"], record["recipients"][0]["postal"]) == (QUEUED, None)
    bridge.outbound.record_postal(OWNER, MSG, {ANN: {"id": 8301, "token": "new"}})
    assert post(client, postal_signer, event("MessageBounced", message(8300, "old", ANN))).get_data() == b"stale\n"
    assert post(client, postal_signer, event("MessageSent", message(8301, "new", ANN))).get_data() == b"applied\n"
    assert state(bridge) == DELIVERED


def test_events_still_find_sent_mail_after_redis_lost_its_index(sent, client, postal_signer):
    # Redis holds only what can be rebuilt: rebuild-index restores the Postal-id index of sent mail.
    for key in sent.redis.scan_iter(match="bridge:outbound:*"):
        sent.redis.delete(key)
    assert sent.outbound.find_postal(7001, "tokAnn") is None
    assert rebuild_index(sent)["outbound"] >= 1
    assert sent.outbound.find_postal(7001, "tokAnn") == outbound.Location(OWNER, MSG, "Ann@Example.net")
    assert post(client, postal_signer, for_(ANN, "MessageSent")).status_code == 200
    assert state(sent) == DELIVERED
