"""Scaling out: two web instances and two workers, as on two machines, sharing one Redis and one S3.

Each "machine" has its own data directory (nothing local is shared but the spool key, as the README
asks); both gunicorns run the deployed config, both ``python -m bridge worker`` processes take jobs
from the one Redis. Postal delivers the same message several times at once (its retries after a
timeout, or two Postal workers picking the same queued message), spread over both instances: the
create-only body write in S3 must make exactly one of them store it, and the single filing job
must file it once, so the owner sees each message once.
"""

from __future__ import annotations

import base64
import re
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from bridge.context import Bridge
from bridge.sealing import open_sealed
from bridge.settings import Settings
from bridge.store.index import UNFILED
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.servers import log_tail, stop_process, wait_until
from tests.webproc import gunicorn_process, worker_process

MESSAGES = 24
COPIES = 4  # deliveries of each message, two to each instance, all at once
EMAIL = f"support@{DOMAIN}"


def _aws(bucket: dict[str, str]) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": bucket["endpoint"],
        "AWS_ACCESS_KEY_ID": bucket["access_key"],
        "AWS_SECRET_ACCESS_KEY": bucket["secret_key"],
        "AWS_DEFAULT_REGION": bucket["region"],
    }


def _host(tmp_path: Path, name: str, redis_url: str, signer: PostalSigner, bucket: dict[str, str]) -> dict[str, str]:
    """One machine's environment: its own data directory, the shared Redis, bucket and spool key."""
    (tmp_path / name).mkdir()
    env = bridge_environment(
        tmp_path,
        redis_url,
        signer,
        BRIDGE_DATA_DIR=str(tmp_path / name / "data"),
        BRIDGE_STORAGE_URL=f"s3://{bucket['bucket']}/mx",
        BRIDGE_SPOOL_KEY_FILE=str(tmp_path / "shared-spool.key"),
        BRIDGE_WEB_WORKERS="2",
        **_aws(bucket),
    )
    return env


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    return worker_process(env, log_path)


@pytest.fixture
def cluster(
    tmp_path: Path, redis_url: str, postal_signer: PostalSigner, s3_bucket: dict[str, str], monkeypatch: Any
) -> Iterator[dict[str, Any]]:
    """Two web instances and two workers on one Redis and one bucket; yields their URLs, logs and the owner."""
    for name, value in _aws(s3_bucket).items():
        monkeypatch.setenv(name, value)  # this process's own Bridge (the mailbox, the checks) reads the bucket too
    hosts = [_host(tmp_path, name, redis_url, postal_signer, s3_bucket) for name in ("a", "b")]
    owner = make_owner(Bridge(Settings.from_env(hosts[0])), EMAIL)
    connection = redis.Redis.from_url(redis_url, socket_timeout=5)
    with ExitStack() as stack:
        urls = [
            stack.enter_context(gunicorn_process(env, tmp_path / f"web-{name}.log"))[0]
            for env, name in zip(hosts, "ab", strict=True)
        ]
        worker_logs = [tmp_path / f"worker-{name}.log" for name in "ab"]
        workers = [_start_worker(env, log) for env, log in zip(hosts, worker_logs, strict=True)]
        for worker in workers:
            stack.callback(stop_process, worker)
        assert wait_until(lambda: connection.scard("rq:workers") >= 2, 60), [log_tail(p) for p in worker_logs]
        yield {"urls": urls, "owner": owner, "worker_logs": worker_logs, "bucket": s3_bucket, "redis": connection}
    connection.close()


def _deliveries(signer: PostalSigner) -> list[tuple[int, bytes, dict[str, str], bytes]]:
    """One signed RawMessage delivery per message: (Postal id, body, headers, the message as sent)."""
    out = []
    for postal_id in range(1, MESSAGES + 1):
        message = (
            f"From: Jane <jane@example.org>\r\nTo: {EMAIL}\r\nSubject: order {postal_id}\r\n"
            f"Message-ID: <order-{postal_id}@example.org>\r\n\r\nOrder {postal_id} shipped.\r\n"
        ).encode()
        payload = raw_payload(postal_id=postal_id, rcpt_to=EMAIL, mail_from="jane@example.org", message=message)
        body = ruby_json(payload)
        headers = {"Content-Type": "application/json", **signer.sign_headers(body)}
        out.append((postal_id, body, headers, base64.b64decode(payload["message"])))
    return out


def test_duplicates_across_two_instances_and_two_workers_store_file_and_list_each_message_once(
    cluster: dict[str, Any], postal_signer: PostalSigner
) -> None:
    urls, owner = cluster["urls"], cluster["owner"]
    deliveries = _deliveries(postal_signer)
    # Every copy of one message waits at a barrier, then all go at once: two to each instance.
    barriers = {postal_id: threading.Barrier(COPIES) for postal_id, *_ in deliveries}
    jobs = [(d, urls[copy % 2]) for d in deliveries for copy in range(COPIES)]

    def deliver(job: tuple[tuple[int, bytes, dict[str, str], bytes], str]) -> tuple[int, int, str]:
        (postal_id, body, headers, _), url = job
        barriers[postal_id].wait(timeout=60)
        with requests.Session() as session:
            response = session.post(f"{url}/postal/inbound", data=body, headers=headers, timeout=60)
        return postal_id, response.status_code, response.text.strip()

    with ThreadPoolExecutor(max_workers=COPIES * 4) as pool:
        answers = list(pool.map(deliver, jobs))

    assert {status for _, status, _ in answers} == {200}, answers
    results = Counter((postal_id, text) for postal_id, _, text in answers)
    for postal_id, *_ in deliveries:
        # The create-only write in S3 decides: exactly one copy stored it, the others were duplicates.
        assert results[(postal_id, "stored")] == 1, results
        assert results[(postal_id, "duplicate")] == COPIES - 1, results

    listing = _wait_for_listing(urls, owner, MESSAGES)
    assert sorted(r["postal"]["id"] for r in listing) == list(range(1, MESSAGES + 1))  # listed once
    assert len({r["id"] for r in listing}) == MESSAGES
    assert {r["status"] for r in listing} == {"filed"}

    # Stored once: one sealed body per message in the bucket, and nothing else under the mailbox but records.
    bucket = cluster["bucket"]
    keys = _bucket_keys(bucket)
    address = owner.mailbox.address
    bodies = [k for k in keys if k.startswith(f"mx/mail/{address}/") and k.endswith(".jwe")]
    assert sorted(k.rsplit("/", 1)[1].removesuffix(".jwe") for k in bodies) == sorted(r["id"] for r in listing)

    # Filed once: the workers together filed exactly one record per message, whichever took the job.
    # The job logs its count after indexing the batch, so the listing can be complete a moment before the line.
    def filed() -> list[int]:
        logs = cluster["worker_logs"]
        return [int(n) for path in logs for n in re.findall(r"filed (\d+) messages", path.read_text())]

    wait_until(lambda: sum(filed()) >= MESSAGES, 30)
    assert sum(filed()) == MESSAGES, filed()
    assert cluster["redis"].zcard(UNFILED) == 0

    # Each instance serves the same listing and the same bodies (nothing lives on one machine only).
    sent = {postal_id: message for postal_id, _, _, message in deliveries}
    for url, record in zip(urls * MESSAGES, listing, strict=False):
        got = requests.get(f"{url}/api/v1/messages/{record['id']}", headers=owner.auth, timeout=30)
        assert got.status_code == 200
        assert open_sealed(got.json()["body"], owner.private_jwk) == sent[record["postal"]["id"]]
    for url in urls:
        other = _listing(url, owner)
        assert [r["id"] for r in other] == [r["id"] for r in listing]
    for path in cluster["worker_logs"]:
        assert "Traceback" not in path.read_text(errors="replace")


def _listing(url: str, owner: Owner) -> list[dict[str, Any]]:
    response = requests.get(f"{url}/api/v1/messages?folder=other&limit=200", headers=owner.auth, timeout=10)
    assert response.status_code == 200
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def _wait_for_listing(urls: list[str], owner: Owner, count: int) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = []

    def complete() -> bool:
        nonlocal listing
        listing = _listing(urls[1], owner)
        return len(listing) >= count

    assert wait_until(complete, 60), f"{len(listing)} of {count} listed"
    # Give a second filing (there must be none) the chance to show as a duplicate listing.
    assert not wait_until(lambda: len(_listing(urls[0], owner)) > count, 2)
    return _listing(urls[0], owner)


def _bucket_keys(bucket: dict[str, str]) -> list[str]:
    from tests.servers import s3_client

    client = s3_client(bucket["endpoint"], bucket["access_key"], bucket["secret_key"], bucket["region"])
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["bucket"]):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys
