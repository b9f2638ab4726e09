"""Backups: the object store is the system of record. A copy of it, restored beside a fresh, empty Redis,
becomes the whole bridge again after ``mailio-bridge rebuild-index``: mailboxes with their aliases and
tokens, every folder as it was, handshakes, and sent mail with each recipient's delivery state, which
Postal's events still find afterwards. Retried deliveries of mail in the backup are still duplicates.

Both stores: the filesystem (copied as ``rsync``/``cp -a`` would) and S3 on moto (every object copied to
another bucket, as ``aws s3 sync`` would). (``test_cli_commands`` proves the rebuild repairs a stale index
in place and ``test_sweeper`` that the worker rebuilds when Redis lost its data; here the store itself is a
copy and Redis another one.)"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import redis

from bridge import create_app
from bridge.__main__ import main
from bridge.mailio.handshakes import sign_handshake
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner, run_worker
from tests.postal_api import API_KEY, PostalSendAPI
from tests.postal_sim import PostalSigner, raw_payload, ruby_json

# The fixtures are registered by importing them (their names are "domains" and "postal").
from tests.test_send import domains_fixture, post_event, postal_fixture, recipients, send, sent_event  # noqa: F401

pytestmark = pytest.mark.dns
FOLDERS = ("inbox", "other", "archive", "trash", "spam", "handshake", "sent")


@pytest.fixture(name="environment", params=["file", "s3"])
def environment_fixture(
    request: Any,
    tmp_path: Path,
    redis_url: str,
    postal_signer: PostalSigner,
    postal: PostalSendAPI,
    knot_dns: Any,
    monkeypatch: Any,
) -> dict[str, str]:
    """The bridge on a filesystem store or on an S3 bucket (moto), sending through the send-API server."""
    extra = {"BRIDGE_POSTAL_URL": postal.url, "BRIDGE_POSTAL_API_KEY": API_KEY, "BRIDGE_POSTAL_TIMEOUT": "1"}
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_bucket")
        for name, value in (
            ("AWS_ENDPOINT_URL_S3", s3["endpoint"]),
            ("AWS_ACCESS_KEY_ID", s3["access_key"]),
            ("AWS_SECRET_ACCESS_KEY", s3["secret_key"]),
            ("AWS_DEFAULT_REGION", s3["region"]),
        ):
            monkeypatch.setenv(name, value)
        extra["BRIDGE_STORAGE_URL"] = f"s3://{s3['bucket']}"
    return bridge_environment(tmp_path, redis_url, postal_signer, **extra)


def back_up(storage_url: str, tmp_path: Path, request: Any) -> str:
    """A copy of the whole store, as an operator's backup tool makes it; the URL to restore from."""
    if storage_url.startswith("file://"):
        shutil.copytree(storage_url.removeprefix("file://"), tmp_path / "backup")
        return f"file://{tmp_path / 'backup'}"
    client = request.getfixturevalue("moto_s3").client()
    source, copy = storage_url.removeprefix("s3://"), "backup-" + storage_url.removeprefix("s3://")[-12:]
    client.create_bucket(Bucket=copy)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source):
        for item in page.get("Contents", ()):
            client.copy_object(Bucket=copy, Key=item["Key"], CopySource={"Bucket": source, "Key": item["Key"]})
    return f"s3://{copy}"


def post_delivery(client: Any, signer: PostalSigner, body: bytes) -> Any:
    headers = {**signer.sign_headers(body), "Content-Type": "application/json"}
    return client.post("/postal/inbound", data=body, headers=headers)


def folders(client: Any, owner: Owner) -> dict[str, list[str]]:
    listed = {}
    for folder in FOLDERS:
        response = client.get(f"/api/v1/messages?folder={folder}&limit=200", headers=owner.auth)
        assert response.status_code == 200
        listed[folder] = sorted(m["id"] for m in response.get_json()["messages"])
    return listed


def test_a_copy_of_the_store_and_an_empty_redis_are_the_whole_bridge_after_rebuild_index(
    environment: dict[str, str],
    settings: Settings,
    client: Any,
    bridge: Any,
    owner: Owner,
    postal: PostalSendAPI,
    domains: dict[str, str],
    postal_signer: PostalSigner,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: Any,
    capsys: Any,
    request: Any,
) -> None:
    # --- a bridge in use --------------------------------------------------------------------------
    other = make_owner(bridge, f"sales@{DOMAIN}")
    bridge.mailboxes.add_alias(other.mailbox.email, f"orders@{DOMAIN}")
    bodies = {}
    for postal_id, rcpt in ((1, owner.mailbox.email), (2, owner.mailbox.email), (3, f"orders@{DOMAIN}")):
        message = f"From: Jane <jane@example.org>\r\nTo: {rcpt}\r\nSubject: m{postal_id}\r\n\r\nhello\r\n"
        payload = raw_payload(postal_id=postal_id, rcpt_to=rcpt, mail_from="jane@example.org", message=message.encode())
        bodies[postal_id] = ruby_json(payload)
        assert post_delivery(client, postal_signer, bodies[postal_id]).status_code == 200
    run_worker(bridge)
    first = folders(client, owner)["other"][0]
    assert client.post(f"/api/v1/messages/{first}/move", json={"folder": "archive"}, headers=owner.auth).status_code
    handshake = sign_handshake(
        ed25519_private=owner.keys.ed25519_private,
        status="accepted",
        sender_email_hash=base64.b64encode(b"\x02" * 32).decode(),
        origin_domain=DOMAIN,
    )
    assert client.put("/api/v1/handshakes", json=handshake, headers=owner.auth).status_code == 201
    rcpt = f"kim@{domains['smtp']}"
    sent_id = send(client, owner, to=[rcpt], subject="Plans", text="hi").get_json()["id"]
    run_worker(bridge)
    sent_state = recipients(client, owner, sent_id)[rcpt]
    assert sent_state["state"] == "accepted" and postal.accepted[rcpt] == 1
    before = {who.mailbox.email: folders(client, who) for who in (owner, other)}
    assert before[owner.mailbox.email]["archive"] == [first] and before[owner.mailbox.email]["sent"] == [sent_id]

    # --- the backup: a copy of the object store, nothing of Redis ----------------------------------
    backup = back_up(settings.storage_url, tmp_path, request)

    # --- the restore: the copy as the store, a Redis that has never seen this bridge ---------------
    fresh_redis = redis_url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(fresh_redis).flushdb()
    restored_env = {**environment, "BRIDGE_STORAGE_URL": backup, "BRIDGE_REDIS_URL": fresh_redis}
    restored = create_app(Settings.from_env(restored_env))
    new = restored.test_client()
    assert folders(new, owner)["archive"] == []  # the listings live in Redis: empty until rebuilt

    for name in [k for k in os.environ if k.startswith("BRIDGE_")]:
        monkeypatch.delenv(name)
    for name, value in restored_env.items():
        monkeypatch.setenv(name, value)
    assert main(["rebuild-index"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"mailboxes": 2, "filed": 4, "queued_for_filing": 0, "outbound": 1}

    # Everything as it was: folders, mailboxes with aliases, tokens, handshakes, sent-mail states.
    assert {who.mailbox.email: folders(new, who) for who in (owner, other)} == before
    assert main(["mailbox", "list"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {m["email"]: m["aliases"] for m in listed} == {
        owner.mailbox.email: [],
        other.mailbox.email: [f"orders@{DOMAIN}"],
    }
    stored = new.get("/api/v1/handshakes", headers=owner.auth).get_json()["handshakes"]
    assert [h["content"]["handshakeId"] for h in stored] == [handshake["content"]["handshakeId"]]
    assert recipients(new, owner, sent_id)[rcpt] == sent_state

    # Postal's event for the sent message still finds its recipient (the Postal-id index was rebuilt) ...
    record = restored.extensions["bridge"].outbound.get(owner.mailbox.address, sent_id)
    ref = sent_state["postal"]
    event = sent_event(postal_signer, "MessageSent", ref["id"], ref["token"], rcpt, record["message_id"])
    assert post_event(new, postal_signer, event).status_code == 200
    assert recipients(new, owner, sent_id)[rcpt]["state"] == "delivered"
    # ... and Postal retrying a delivery that is in the backup stores nothing twice.
    retried = post_delivery(new, postal_signer, bodies[2])  # the same request again, as Postal retries
    assert (retried.status_code, retried.get_data()) == (200, b"duplicate\n")
    run_worker(restored.extensions["bridge"])
    assert folders(new, owner) == {**before[owner.mailbox.email]}
    assert postal.accepted[rcpt] == 1  # nothing was sent again
