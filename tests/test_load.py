"""A sustained load below capacity, through gunicorn and a real worker: nothing grows, nothing fails.

Postal delivers at a steady rate (open loop: each delivery is sent at its scheduled time, whether
or not the previous ones were answered), well below what this machine takes (``make bench``
measures ~150-250 deliveries/s into one web process). What an operator would notice over hours is
measured here over half a minute: every answer a 200, every message filed, the unfiled backlog
flat instead of climbing, and the memory of every process (gunicorn's master and workers, the
worker) the same at the end as after warm-up, within a stated bound (GROWTH_BOUND_KB): a process
that kept each delivery's message, or anything as large, exceeds it in this run.
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from bridge.context import Bridge
from bridge.settings import Settings
from tests.conftest import DOMAIN, make_owner
from tests.postal_sim import PostalSigner, raw_payload, ruby_json
from tests.servers import log_tail, stop_process, wait_until
from tests.webproc import gunicorn_process, worker_process

RATE = 20.0  # deliveries per second
WARM_UP_SECONDS = 6.0
MEASURED_SECONDS = 30.0
#: Memory bound per process, end vs after warm-up (measured here: about 1 MiB each). A gunicorn worker
#: takes about half the run's ~600 deliveries: one that kept each ~20 KB message would grow ~6 MiB.
GROWTH_BOUND_KB = 5 * 1024
#: Backlog bound: what arrives in two seconds. Filing keeps up at this rate in well under a second.
BACKLOG_BOUND = int(2 * RATE)
EMAIL = f"support@{DOMAIN}"


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (gunicorn's workers)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _message(number: int) -> bytes:
    prose = " ".join(f"line {number}.{i}: the order shipped today, tracking to follow." for i in range(330))
    return (
        f"From: Jane <jane@example.org>\r\nTo: {EMAIL}\r\nSubject: order {number}\r\n"
        f"Message-ID: <load-{number}@example.org>\r\n\r\n{prose}\r\n"
    ).encode()


@pytest.fixture
def stack(environment: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """gunicorn (2 processes, as deployed) and one ``python -m bridge worker`` on the suite's Redis."""
    owner = make_owner(Bridge(Settings.from_env(environment)), EMAIL)
    connection = redis.Redis.from_url(environment["BRIDGE_REDIS_URL"], socket_timeout=5)
    worker_log = tmp_path / "worker.log"
    with gunicorn_process(environment, tmp_path / "gunicorn.log") as (url, master):
        worker = worker_process(environment, worker_log)
        try:
            assert wait_until(lambda: connection.scard("rq:workers") >= 1, 60), log_tail(worker_log)
            yield {
                "url": url,
                "master": master,
                "worker": worker.pid,
                "owner": owner,
                "redis": connection,
                "logs": [tmp_path / "gunicorn.log", worker_log],
            }
        finally:
            stop_process(worker)
            connection.close()


def test_sustained_rate_below_capacity_keeps_memory_and_backlog_flat(
    stack: dict[str, Any], postal_signer: PostalSigner
) -> None:
    total = int(RATE * (WARM_UP_SECONDS + MEASURED_SECONDS))
    deliveries = []
    for number in range(1, total + 1):
        payload = raw_payload(postal_id=number, rcpt_to=EMAIL, mail_from="jane@example.org", message=_message(number))
        body = ruby_json(payload)
        deliveries.append((body, {"Content-Type": "application/json", **postal_signer.sign_headers(body)}))
    warm_up = int(RATE * WARM_UP_SECONDS)
    answers: list[tuple[int, str, float, float]] = []  # status, text, lateness s, latency s
    lock = threading.Lock()
    local = threading.local()
    start = time.monotonic() + 0.5

    def deliver(number: int) -> None:
        due = start + number / RATE
        time.sleep(max(0.0, due - time.monotonic()))
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        sent = time.monotonic()
        body, headers = deliveries[number]
        try:
            response = session.post(f"{stack['url']}/postal/inbound", data=body, headers=headers, timeout=30)
            status, text = response.status_code, response.text.strip()
        except requests.RequestException as exc:
            status, text = -1, exc.__class__.__name__
        with lock:
            answers.append((status, text, sent - due, time.monotonic() - sent))

    pids = {"gunicorn master": stack["master"], "worker": stack["worker"]}
    pids.update({f"gunicorn worker {pid}": pid for pid in _children(stack["master"])})
    backlog: list[int] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(deliver, n) for n in range(total)]
        # After the warm-up (each process has imported everything and filled its caches): memory at start.
        time.sleep(max(0.0, start + warm_up / RATE - time.monotonic()))
        before = {name: _rss_kb(pid) for name, pid in pids.items()}
        while not all(f.done() for f in futures):
            backlog.append(int(stack["redis"].zcard("bridge:unfiled")))
            time.sleep(1.0)
        for future in futures:
            future.result()
    after = {name: _rss_kb(pid) for name, pid in pids.items()}
    assert sorted(_children(stack["master"])) == sorted(p for n, p in pids.items() if n.startswith("gunicorn w"))

    # No error: every delivery stored, answered 200, and sent on time (the load was what it says).
    assert [(s, t) for s, t, _, _ in answers if (s, t) != (200, "stored")] == []
    assert len(answers) == total
    lateness = sorted(late for _, _, late, _ in answers)
    assert lateness[int(0.99 * total)] < 1.0, "the sender fell behind: the rate was not held"
    latencies = [latency for *_, latency in answers]
    assert statistics.median(latencies) < 0.5 and max(latencies) < 10, (statistics.median(latencies), max(latencies))

    # Backlog flat: never more than two seconds' worth waiting, and all of it filed once the load stops.
    assert max(backlog) <= BACKLOG_BOUND, backlog
    owner = stack["owner"]

    def all_filed() -> bool:
        return (
            stack["redis"].zcard("bridge:unfiled") == 0
            and stack["redis"].zcard(f"bridge:idx:{owner.mailbox.address}:other") == total
        )

    assert wait_until(all_filed, 15), backlog
    listing = requests.get(f"{stack['url']}/api/v1/messages?folder=other&limit=1", headers=owner.auth, timeout=10)
    assert listing.status_code == 200 and len(listing.json()["messages"]) == 1

    # Memory: no process grew by more than the bound between warm-up and the end.
    growth = {name: after[name] - before[name] for name in pids}
    report = ", ".join(f"{name}: {before[name] // 1024} -> {after[name] // 1024} MiB" for name in pids)
    assert max(growth.values()) <= GROWTH_BOUND_KB, report
    for path in stack["logs"]:
        text = path.read_text(errors="replace")
        # No error line in either format (JSON lines by default, text with BRIDGE_LOG_FORMAT=text).
        errors = [
            line for line in text.splitlines() if re.search(r'"level": ?"(ERROR|CRITICAL)"|\b(ERROR|CRITICAL)\b', line)
        ]
        assert "Traceback" not in text and not errors, errors[:5] or log_tail(path)
