"""Postal -> bridge, end to end: the simulator POSTs over real HTTP, the real RQ worker files,
the owner lists and decrypts through the API. Redis is the suite's real redis-server."""

from __future__ import annotations

import base64
import json
import socket
import threading
from pathlib import Path

import pytest
import redis

from bridge import create_app
from bridge.maintenance import rebuild_index
from bridge.sealing import SealingError, open_sealed
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner, run_worker
from tests.postal_sim import PostalSigner, PostalSimulator, hash_payload, raw_payload, ruby_json

MESSAGE = (
    b"Date: Tue, 28 Apr 2026 18:19:30 +0200\r\n"
    b"From: Jane Doe <jane@example.org>\r\n"
    b"To: Acme Support <support@mail.example.test>\r\n"
    b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <20260428161930.7f3c2a@mail.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=UTF-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hi, the shoes arrived but they are a 42, I ordered a 43.\r\n\xe2\x82\xac\r\n"
)

SHAPES = [
    ("BodyAsJSON", "RawMessage"),
    ("FormData", "RawMessage"),
    ("BodyAsJSON", "Hash"),
    ("FormData", "Hash"),
]


def payload_for(
    fmt: str,
    postal_id: int = 4821,
    rcpt: str = f"support@{DOMAIN}",
    message: bytes = MESSAGE,
    spam: bool = False,
    token: str = "p1ZqkR7vW3sYb9Lm",
) -> dict:
    if fmt == "RawMessage":
        return raw_payload(postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=message, spam=spam)
    return hash_payload(
        postal_id=postal_id,
        token=token,
        rcpt_to=rcpt,
        mail_from="jane@example.org",
        message=message,
        spam=spam,
    )


def listing(client, owner: Owner, folder: str) -> list[dict]:
    response = client.get(f"/api/v1/messages?folder={folder}", headers=owner.auth)
    assert response.status_code == 200
    return response.get_json()["messages"]


def read(client, owner: Owner, msg_id: str) -> bytes:
    response = client.get(f"/api/v1/messages/{msg_id}", headers=owner.auth)
    assert response.status_code == 200
    return open_sealed(response.get_json()["body"], owner.private_jwk)


def stored_keys(settings: Settings) -> list[str]:
    root = Path(settings.storage_url.removeprefix("file://")) / "mail"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize(("encoding", "fmt"), SHAPES)
def test_each_postal_shape_is_stored_sealed_filed_and_readable(
    live_url, client, bridge, owner, postal_signer, encoding, fmt
):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer, encoding=encoding, format=fmt)
    payload = payload_for(fmt)
    attempt = postal.post(payload)
    assert (attempt.status, attempt.outcome) == (200, "sent")
    assert attempt.body_text.strip() == "stored"

    assert listing(client, owner, "other") == []  # not filed until the worker ran
    run_worker(bridge)
    [record] = listing(client, owner, "other")
    assert record["folder"] == "other" and record["status"] == "filed"
    assert record["sender"]["from"] == "jane@example.org"
    assert record["postal"]["format"] == ("raw" if fmt == "RawMessage" else "hash")
    plaintext = read(client, owner, record["id"])
    if fmt == "RawMessage":
        # byte for byte what Postal passed, its prepended X-Postal-* and Received: headers included
        assert plaintext == base64.b64decode(payload["message"])
        assert record["postal"]["rebuilt"] is False
    else:
        assert record["postal"]["rebuilt"] is True
        assert b"X-Mailio-Rebuilt: postal-hash" in plaintext
        assert b"the shoes arrived" in plaintext


def test_sealed_body_is_not_plaintext_at_rest(client, bridge, owner, postal_signer, settings, live_url):
    PostalSimulator(f"{live_url}/postal/inbound", postal_signer).post(payload_for("RawMessage"))
    root = Path(settings.storage_url.removeprefix("file://"))
    stored = b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())
    assert b"the shoes arrived" not in stored
    assert b"Gr=C3=BC" not in stored
    jwe = json.loads(next(root.rglob("*.jwe")).read_bytes())
    [recipient] = jwe["recipients"]
    assert recipient["header"]["kid"] == f"did:web:{DOMAIN}#{owner.mailbox.address}"
    assert recipient["header"]["alg"] == "ECDH-ES+A256KW"


@pytest.mark.parametrize("fmt", ["RawMessage", "Hash"])
def test_spam_verdict_files_into_spam(live_url, client, bridge, owner, postal_signer, fmt):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer, format=fmt)
    assert postal.post(payload_for(fmt, spam=True)).status == 200
    run_worker(bridge)
    assert [r["folder"] for r in listing(client, owner, "spam")] == ["spam"]
    assert listing(client, owner, "other") == []


def test_a_retried_delivery_is_stored_once(live_url, client, bridge, owner, postal_signer, settings):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    payload = payload_for("RawMessage")
    assert postal.post(payload).body_text.strip() == "stored"
    run_worker(bridge)
    assert postal.post(payload).body_text.strip() == "duplicate"
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 1
    assert len(stored_keys(settings)) == 2  # one sealed body, one record


def test_concurrent_copies_of_one_delivery_store_one_message(live_url, client, bridge, owner, postal_signer, settings):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    payload = payload_for("RawMessage")
    statuses: list[str] = []

    def post() -> None:
        statuses.append(postal.post(payload).body_text.strip())

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == ["duplicate"] * 7 + ["stored"]
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 1
    assert len(stored_keys(settings)) == 2


def test_distinct_deliveries_are_distinct_messages(live_url, client, bridge, owner, postal_signer):
    raw = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    hashed = PostalSimulator(f"{live_url}/postal/inbound", postal_signer, format="Hash")
    assert raw.post(payload_for("RawMessage", postal_id=1)).status == 200
    assert raw.post(payload_for("RawMessage", postal_id=2)).status == 200  # same bytes, another Postal id
    assert hashed.post(payload_for("Hash", postal_id=1, token="aaaa")).status == 200
    assert hashed.post(payload_for("Hash", postal_id=1, token="bbbb")).status == 200
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 4


def test_another_postal_server_with_the_same_id_is_another_message(tmp_path, redis_url, postal_signer):
    # Ids are unique only inside one Postal; two installs (two keys, here trusted together as in a
    # key rotation) may send the same id for different mail.
    second = PostalSigner()
    (tmp_path / "second.pem").write_bytes(second.public_pem())
    env = bridge_environment(tmp_path, redis_url, postal_signer)
    env["BRIDGE_POSTAL_PUBLIC_KEY"] += f",{tmp_path / 'second.pem'}"
    app = create_app(Settings.from_env(env))
    bridge = app.extensions["bridge"]
    owner = make_owner(bridge, f"support@{DOMAIN}")
    client = app.test_client()
    body = ruby_json(payload_for("RawMessage"))
    assert signed_post(client, postal_signer, body).get_data() == b"stored\n"
    assert signed_post(client, second, body).get_data() == b"stored\n"
    from bridge import context

    context.use(bridge)
    try:
        run_worker(bridge)
    finally:
        context.use(None)
    assert len(listing(client, owner, "other")) == 2


def test_late_retry_after_redis_lost_its_keys_is_not_stored_twice(
    live_url, client, bridge, owner, postal_signer, redis_server, settings
):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    payload = payload_for("RawMessage")
    assert postal.post(payload).body_text.strip() == "stored"
    run_worker(bridge)
    redis_server.flushall()  # Redis restarted without persistence: dedupe keys and indexes gone
    assert postal.post(payload).body_text.strip() == "duplicate"
    assert len(stored_keys(settings)) == 2
    assert rebuild_index(bridge) == {"mailboxes": 1, "filed": 1, "queued_for_filing": 0, "outbound": 0}
    assert len(listing(client, owner, "other")) == 1


def test_redis_down_answers_503_and_the_retry_stores_exactly_once(
    live_url, client, bridge, owner, postal_signer, redis_server, settings
):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    payload = payload_for("RawMessage")
    redis_server.stop()
    try:
        attempt = postal.post(payload)
        assert (attempt.status, attempt.outcome) == (503, "retry")
        assert "Traceback" not in attempt.body_text
    finally:
        redis_server.start()
    attempt = postal.post(payload)
    assert attempt.status == 200
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 1
    assert len(stored_keys(settings)) == 2


def test_storage_down_answers_503_then_the_retry_is_stored(tmp_path, redis_url, postal_signer, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_bucket["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_bucket["region"])
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_STORAGE_URL=f"s3://{s3_bucket['bucket']}/mx")
    # first an endpoint where nothing listens: the object store is down
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{dead}")
    down = create_app(Settings.from_env(env))
    client = down.test_client()
    payload = payload_for("RawMessage")
    body = ruby_json(payload)
    headers = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
    response = client.post("/postal/inbound", data=body, headers=headers)
    assert response.status_code == 503
    assert b"Traceback" not in response.data and s3_bucket["secret_key"].encode() not in response.data

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket["endpoint"])
    up = create_app(Settings.from_env(env))
    bridge = up.extensions["bridge"]
    from bridge import context

    context.use(bridge)
    try:
        owner_keys = make_owner(bridge, f"support@{DOMAIN}")
        client = up.test_client()
        assert client.post("/postal/inbound", data=body, headers=headers).status_code == 200
        assert client.post("/postal/inbound", data=body, headers=headers).get_data() == b"duplicate\n"
        run_worker(bridge)
        [record] = listing(client, owner_keys, "other")
        assert read(client, owner_keys, record["id"]) == base64.b64decode(payload["message"])
    finally:
        context.use(None)


# --- bad input -------------------------------------------------------------------------------


def signed_post(client, signer: PostalSigner, body: bytes, content_type: str = "application/json", **kwargs):
    headers = {**signer.sign_headers(body, **kwargs), "Content-Type": content_type}
    return client.post("/postal/inbound", data=body, headers=headers)


def test_unsigned_wrongly_signed_or_tampered_is_401_and_nothing_stored(client, owner, postal_signer, settings):
    body = ruby_json(payload_for("RawMessage"))
    assert client.post("/postal/inbound", data=body, content_type="application/json").status_code == 401
    assert signed_post(client, PostalSigner(), body).status_code == 401  # someone else's key
    headers = {**postal_signer.sign_headers(body), "Content-Type": "application/json"}
    tampered = body.replace(b'"support@', b'"sUpport@')
    response = client.post("/postal/inbound", data=tampered, headers=headers)
    assert response.status_code == 401
    assert stored_keys(settings) == []


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[]", "application/json"),
        (
            b'{"id": 1, "rcpt_to": "support@mail.example.test", "mail_from": "", "base64": true}',
            "application/json",
        ),
        (
            b'{"id": 1, "rcpt_to": "support@mail.example.test", "mail_from": "", "message": "***", "base64": true}',
            "application/json",
        ),
        (b"id=1&rcpt_to=support%40mail.example.test&message=%%%", "application/x-www-form-urlencoded"),
        (b"hello", "text/plain"),
    ],
)
def test_signed_but_malformed_is_400(client, owner, postal_signer, settings, body, content_type):
    response = signed_post(client, postal_signer, body, content_type)
    assert response.status_code == 400
    assert response.get_data(as_text=True).startswith("malformed delivery")
    assert stored_keys(settings) == []


def test_sha1_only_signature_from_an_old_postal_is_accepted(client, owner, postal_signer):
    body = ruby_json(payload_for("RawMessage"))
    assert signed_post(client, postal_signer, body, sha256=False, kid=False).status_code == 200


def test_oversize_is_413_before_the_body_is_read(live_url, settings, owner):
    limit = settings.max_message_bytes * 2
    with socket.create_connection(("127.0.0.1", int(live_url.rsplit(":", 1)[1])), timeout=5) as conn:
        conn.sendall(
            b"POST /postal/inbound HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {limit}\r\n\r\n".encode()
        )
        answer = conn.recv(4096)  # answered without our sending a single body byte
    assert answer.startswith(b"HTTP/1.1 413")


def test_decoded_message_over_the_limit_is_413(tmp_path, redis_url, postal_signer):
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_MAX_MESSAGE_BYTES="1000")
    app = create_app(Settings.from_env(env))
    make_owner(app.extensions["bridge"], f"support@{DOMAIN}")
    body = ruby_json(payload_for("RawMessage", message=MESSAGE + b"x" * 2000))
    assert signed_post(app.test_client(), postal_signer, body).status_code == 413


@pytest.mark.parametrize(
    ("mode", "status", "outcome"), [("bounce", 404, "hard_fail_bounce"), ("drop", 429, "hard_fail_no_bounce")]
)
def test_unknown_mailbox_is_bounced_or_dropped_as_configured(tmp_path, redis_url, postal_signer, mode, status, outcome):
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_UNKNOWN_RECIPIENT=mode)
    app = create_app(Settings.from_env(env))
    body = ruby_json(payload_for("RawMessage", rcpt=f"nobody@{DOMAIN}"))
    response = signed_post(app.test_client(), postal_signer, body)
    assert response.status_code == status
    assert response.get_data(as_text=True) == "unknown recipient\n"


def test_no_signing_key_configured_is_503_so_postal_retries(tmp_path, redis_url, postal_signer):
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_POSTAL_PUBLIC_KEY="")
    env.pop("BRIDGE_POSTAL_PUBLIC_KEY")
    app = create_app(Settings.from_env(env))
    assert signed_post(app.test_client(), postal_signer, ruby_json(payload_for("RawMessage"))).status_code == 503


def test_jwks_unreachable_fails_closed_with_503(tmp_path, redis_url, postal_signer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    env = bridge_environment(tmp_path, redis_url, postal_signer, BRIDGE_POSTAL_URL=f"http://127.0.0.1:{dead}")
    env.pop("BRIDGE_POSTAL_PUBLIC_KEY")
    app = create_app(Settings.from_env(env))
    assert signed_post(app.test_client(), postal_signer, ruby_json(payload_for("RawMessage"))).status_code == 503


# --- mailbox resolution ----------------------------------------------------------------------


@pytest.mark.parametrize("rcpt", [f"Support@{DOMAIN.upper()}", f"support+orders@{DOMAIN}", f"help@{DOMAIN}"])
def test_recipient_resolution_ignores_case_and_tags_and_follows_aliases(
    live_url, client, bridge, owner, postal_signer, rcpt
):
    bridge.mailboxes.add_alias(owner.mailbox.email, f"help@{DOMAIN}")
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    assert postal.post(payload_for("RawMessage", rcpt=rcpt)).status == 200
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 1


# --- the owner's API -------------------------------------------------------------------------


def test_a_mailbox_sees_only_its_own_mail(live_url, client, bridge, owner, postal_signer):
    other = make_owner(bridge, f"sales@{DOMAIN}")
    PostalSimulator(f"{live_url}/postal/inbound", postal_signer).post(payload_for("RawMessage"))
    run_worker(bridge)
    [record] = listing(client, owner, "other")
    assert listing(client, other, "other") == []
    assert client.get(f"/api/v1/messages/{record['id']}", headers=other.auth).status_code == 404
    assert client.get("/api/v1/messages?folder=other").status_code == 401
    assert client.get("/api/v1/messages?folder=other", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/api/v1/messages?folder=nope", headers=owner.auth).status_code == 400
    assert client.get("/api/v1/messages/../../etc", headers=owner.auth).status_code == 404


def test_listing_is_newest_first_and_paginated(live_url, client, bridge, owner, postal_signer):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    for postal_id in range(1, 6):
        assert postal.post(payload_for("RawMessage", postal_id=postal_id)).status == 200
    run_worker(bridge)
    seen, cursor = [], None
    while True:
        query = "/api/v1/messages?folder=other&limit=2" + (f"&before={cursor}" if cursor is not None else "")
        page = client.get(query, headers=owner.auth).get_json()
        seen += [r["postal"]["id"] for r in page["messages"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [5, 4, 3, 2, 1]


def test_rebuild_index_restores_listings_and_queues_unfiled_mail(
    live_url, client, bridge, owner, postal_signer, redis_server
):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    postal.post(payload_for("RawMessage", postal_id=1))
    run_worker(bridge)
    postal.post(payload_for("RawMessage", postal_id=2))  # stored, not yet filed
    redis_server.flushall()
    assert rebuild_index(bridge) == {"mailboxes": 1, "filed": 1, "queued_for_filing": 1, "outbound": 0}
    assert len(listing(client, owner, "other")) == 1
    run_worker(bridge)
    assert len(listing(client, owner, "other")) == 2


def test_health_reports_dependencies(client, redis_server):
    assert client.get("/readyz").get_json()["status"] == "ok"
    redis_server.stop()
    try:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.get_json()["redis"] == "unavailable"
    finally:
        redis_server.start()


def test_unexpected_routes_and_methods_answer_json_errors(client):
    assert client.get("/postal/inbound").status_code == 405
    assert client.get("/nope").status_code == 404


def test_a_redis_error_is_503_never_500(client, owner, postal_signer, redis_url):
    redis.Redis.from_url(redis_url).set("bridge:inbound:unfiled", "not a sorted set")
    response = signed_post(client, postal_signer, ruby_json(payload_for("RawMessage")))
    assert response.status_code == 503
    assert response.get_data(as_text=True) == "storage unavailable, retry later\n"


def test_the_delivery_facts_are_sealed_with_the_body_and_tamper_evident(
    live_url, client, bridge, owner, postal_signer, settings
):
    PostalSimulator(f"{live_url}/postal/inbound", postal_signer).post(payload_for("RawMessage"))
    root = Path(settings.storage_url.removeprefix("file://"))
    [body_file] = list(root.rglob("*.jwe"))
    assert list(root.rglob("mail/**/*.json")) == []  # one write per delivery: the record rides in the body
    document = json.loads(body_file.read_bytes())
    facts = json.loads(base64.urlsafe_b64decode(document["aad"] + "=="))
    assert facts["postal"]["id"] == 4821 and facts["sender"]["from"] == "jane@example.org"
    assert facts["status"] == "received" and "Subject" not in json.dumps(facts)
    open_sealed(document, owner.private_jwk)  # opens as stored
    forged = dict(facts, postal={**facts["postal"], "id": 1})
    document["aad"] = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    with pytest.raises(SealingError):
        open_sealed(document, owner.private_jwk)
    run_worker(bridge)
    assert len(list(root.rglob("mail/**/*.json"))) == 1  # the worker wrote the filed record


def test_a_nonsense_cursor_is_400_not_a_redis_error(client, owner):
    for cursor in ("nan", "inf", "x"):
        assert client.get(f"/api/v1/messages?folder=other&before={cursor}", headers=owner.auth).status_code == 400


def test_a_late_retry_after_redis_loss_does_not_undo_the_owners_move(
    live_url, client, bridge, owner, postal_signer, redis_server
):
    postal = PostalSimulator(f"{live_url}/postal/inbound", postal_signer)
    payload = payload_for("RawMessage")
    postal.post(payload)
    run_worker(bridge)
    [record] = listing(client, owner, "other")
    client.post(f"/api/v1/messages/{record['id']}/move", json={"folder": "archive"}, headers=owner.auth)
    redis_server.flushall()
    assert postal.post(payload).body_text.strip() == "duplicate"
    run_worker(bridge)
    assert [r["id"] for r in listing(client, owner, "archive")] == [record["id"]]
    assert listing(client, owner, "other") == []
    assert bridge.messages.get_record(owner.mailbox.address, record["id"])["folder"] == "archive"
