"""Faults under load, in the deployed shape: gunicorn and a real worker process while Postal keeps delivering.

Each test runs a stream of signed deliveries from the Postal simulator through gunicorn while it breaks
something for real: Redis SIGKILLed mid-job and restarted empty on the same port, the object store made
read-only and then full (a tmpfs remounted or filled), the worker SIGKILLed mid-batch. Every delivery
that gets a 5xx (or no answer) is retried as Postal would, at once. Afterwards, with no manual step and
no new delivery, every message must be stored exactly once, filed, and listed through the owner API
within ``SETTLE_SECONDS``; the worker must still be the same process (except where the test killed it)
and must not have logged a traceback.

The stack (its own Redis, store, gunicorn and worker) is shared by the tests of this module; each test
uses its own mailbox and senders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from rq.registry import StartedJobRegistry

from bridge.context import QUEUE_NAME, Bridge
from bridge.settings import Settings
from tests.conftest import DOMAIN, Owner, bridge_environment, make_owner
from tests.postal_sim import RETRY, PostalSigner, PostalSimulator, new_message, raw_payload
from tests.servers import RedisServer, StoreDir, free_port, kill_redis, log_tail, stop_process
from tests.webproc import worker_process

ROOT = Path(__file__).resolve().parents[1]
#: After the last fault and the last delivery: the sweeper runs every 10 s, retries within seconds.
SETTLE_SECONDS = 45.0
#: How long one delivery may keep being retried (Postal would go on for a day).
DELIVERY_SECONDS = 45.0


@dataclass
class Stack:
    env: dict[str, str]
    url: str
    redis: RedisServer
    store: StoreDir
    logs: Path
    bridge: Bridge
    worker: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> None:
        self.worker = worker_process(self.env, self.logs / "worker.log")

    def worker_log(self) -> str:
        return (self.logs / "worker.log").read_text(errors="replace")

    def started_jobs(self) -> list[str]:
        try:
            return list(StartedJobRegistry(QUEUE_NAME, connection=self.bridge.redis).get_job_ids())
        except Exception:
            return []

    def wait_for_started_job(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.started_jobs():
                return True
            time.sleep(0.01)
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postal_signer: PostalSigner, knot_dns: Any) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("faults")
    redis_server = RedisServer(base / "redis").start()
    store = StoreDir(base / "store")
    port = free_port()
    env = bridge_environment(
        base,
        redis_server.url,
        postal_signer,
        nameserver=knot_dns.nameserver,
        BRIDGE_STORAGE_URL=f"file://{store.path}",
        BRIDGE_LISTEN=f"127.0.0.1:{port}",
        BRIDGE_WEB_WORKERS="2",
    )
    logs = base / "logs"
    logs.mkdir()
    stack = Stack(env, f"http://127.0.0.1:{port}", redis_server, store, logs, Bridge(Settings.from_env(env)))
    try:
        with open(logs / "gunicorn.log", "ab") as log:
            stack.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "wsgi:app"],
                    cwd=ROOT,
                    env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        stack.start_worker()
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or stack.procs[0].poll() is not None:
                pytest.fail(f"gunicorn did not start:\n{log_tail(logs / 'gunicorn.log')}", pytrace=False)
            time.sleep(0.2)
        yield stack
    finally:
        stop_process(stack.worker)
        for proc in stack.procs:
            stop_process(proc)
        redis_server.stop()
        store.close()


class Stream:
    """Postal delivering ``count`` messages to ``owner`` from two threads, each retried until accepted.

    ``senders``: how many distinct senders. A new sender costs the filing job a scrypt (~0.1 s), which
    keeps a job running long enough to be interrupted; known senders make filing fast.
    """

    def __init__(
        self, stack: Stack, signer: PostalSigner, owner: Owner, first_id: int, count: int, tag: str, senders: int
    ) -> None:
        self.payloads = [
            raw_payload(
                postal_id=first_id + i,
                rcpt_to=owner.mailbox.email,
                mail_from=f"{tag}{i % senders}@sender.test",
                message=new_message(
                    sender=f"<{tag}{i % senders}@sender.test>", to=owner.mailbox.email, text=f"{tag} {i}\n"
                ),
            )
            for i in range(count)
        ]
        self.ids = [p["id"] for p in self.payloads]
        self.url = f"{stack.url}/postal/inbound"
        self.signer = signer
        self.accepted = 0
        self.retried = 0
        self.refused: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(self.payloads[i::2],)) for i in range(2)]

    def start(self) -> Stream:
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self._threads:
            thread.join(DELIVERY_SECONDS + 15)

    def wait_accepted(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.accepted < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self, payloads: list[dict[str, Any]]) -> None:
        postal = PostalSimulator(self.url, self.signer, timeout=10.0)
        for payload in payloads:
            deadline = time.monotonic() + DELIVERY_SECONDS
            while True:
                attempt = postal.post(payload)
                if attempt.status == 200:
                    with self._lock:
                        self.accepted += 1
                    break
                if attempt.outcome != RETRY or time.monotonic() > deadline:
                    with self._lock:
                        self.refused.append((payload["id"], attempt.status, attempt.body_text[:80]))
                    break
                with self._lock:
                    self.retried += 1
                time.sleep(0.05)


def _listed(stack: Stack, owner: Owner) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    params: dict[str, Any] = {"folder": "other", "limit": 200}
    while True:
        response = requests.get(f"{stack.url}/api/v1/messages", params=params, headers=owner.auth, timeout=10)
        if response.status_code != 200:
            return []
        page = response.json()
        records += page["messages"]
        if not page["next"]:
            return records
        params["before"] = page["next"]


def _settled(stack: Stack, owner: Owner, stream: Stream) -> None:
    """Every delivery accepted, stored once, filed and listed, within SETTLE_SECONDS of the stream's end."""
    assert stream.refused == [], f"deliveries refused for good: {stream.refused[:5]}"
    assert stream.accepted == len(stream.ids)
    bodies = sorted((stack.store.path / "mail" / owner.mailbox.address).glob("*.jwe"))
    assert len(bodies) == len(stream.ids), "every message stored exactly once"
    deadline = time.monotonic() + SETTLE_SECONDS
    listed: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        listed = _listed(stack, owner)
        if sorted(r["postal"]["id"] for r in listed) == sorted(stream.ids):
            break
        time.sleep(0.5)
    got = sorted(r["postal"]["id"] for r in listed)
    missing = sorted(set(stream.ids) - set(got))
    assert got == sorted(stream.ids), (
        f"{len(missing)} of {len(stream.ids)} not listed after {SETTLE_SECONDS:.0f} s (e.g. {missing[:5]}); "
        f"duplicates: {len(got) - len(set(got))}\nworker log:\n{stack.worker_log()[-3000:]}"
    )
    assert all(r["status"] == "filed" for r in listed)


def _worker_healthy(stack: Stack, pid: int) -> None:
    assert stack.worker is not None
    assert stack.worker.poll() is None, f"the worker exited:\n{stack.worker_log()[-3000:]}"
    assert stack.worker.pid == pid
    assert "Traceback" not in stack.worker_log()


def test_redis_killed_mid_job_and_restarted_empty(stack: Stack, postal_signer: PostalSigner) -> None:
    owner = make_owner(stack.bridge, f"faults-redis@{DOMAIN}")
    assert stack.worker is not None
    pid = stack.worker.pid
    # New senders: each costs the filing job a scrypt, so a job is running when Redis dies.
    stream = Stream(stack, postal_signer, owner, 1000, 40, "r", senders=40).start()
    stream.wait_accepted(15)
    assert stack.wait_for_started_job(), "no filing job started"
    kill_redis(stack.redis)
    time.sleep(1.5)
    stack.redis.start()
    stream.join()
    assert stream.retried > 0, "the fault did not hit any delivery"
    _settled(stack, owner, stream)
    _worker_healthy(stack, pid)
    assert "Redis went away" in stack.worker_log()


@pytest.mark.parametrize(
    ("fault", "first_id"),
    [("read-only", 2000), ("full", 3000)],
    ids=["read-only", "full"],
)
def test_store_fault_mid_stream(stack: Stack, postal_signer: PostalSigner, fault: str, first_id: int) -> None:
    if reason := stack.store.unsupported(fault):
        pytest.skip(reason)
    start, end = (
        (stack.store.read_only, stack.store.writable)
        if fault == "read-only"
        else (
            stack.store.fill,
            stack.store.drain,
        )
    )
    owner = make_owner(stack.bridge, f"faults-{fault}@{DOMAIN}")
    assert stack.worker is not None
    pid = stack.worker.pid
    stream = Stream(stack, postal_signer, owner, first_id, 40, fault[0], senders=40).start()
    stream.wait_accepted(15)
    # While a filing job runs: it fails on the store too (it used to be neither retried nor replaced).
    assert stack.wait_for_started_job(), "no filing job started"
    start()
    try:
        time.sleep(2.5)
    finally:
        end()
    stream.join()
    assert stream.retried > 0, "the fault did not hit any delivery"
    _settled(stack, owner, stream)
    _worker_healthy(stack, pid)


def test_worker_killed_mid_batch_and_restarted(stack: Stack, postal_signer: PostalSigner) -> None:
    owner = make_owner(stack.bridge, f"faults-kill@{DOMAIN}")
    assert stack.worker is not None
    stream = Stream(stack, postal_signer, owner, 4000, 40, "k", senders=40).start()
    stream.wait_accepted(15)
    assert stack.wait_for_started_job(), "no filing job started"
    stack.worker.kill()
    stack.worker.wait(10)
    time.sleep(0.5)
    stack.start_worker()
    stream.join()
    _settled(stack, owner, stream)
    _worker_healthy(stack, stack.worker.pid)


def test_worker_stops_quietly_on_sigterm(stack: Stack) -> None:
    assert stack.worker is not None and stack.worker.poll() is None
    stack.worker.terminate()
    assert stack.worker.wait(15) == 0
    log = stack.worker_log()
    assert "Traceback" not in log and "unhandled exception" not in log
