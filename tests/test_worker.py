"""``python -m bridge worker`` as a real process: it waits for Redis, outlives it, and stops only on a signal.

(Redis dying in the middle of a job, under a stream of deliveries, is in tests/test_faults.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from rq import Worker

from bridge.store.index import EPOCH
from tests.conftest import bridge_environment
from tests.postal_sim import PostalSigner
from tests.servers import RedisServer, kill_redis, stop_process, wait_until
from tests.webproc import worker_process

ROOT = Path(__file__).resolve().parents[1]


def _workers(url: str) -> set[str]:
    return {w.name for w in Worker.all(connection=redis.Redis.from_url(url, socket_timeout=2))}


def test_worker_waits_for_redis_comes_back_after_it_and_stops_quietly(
    tmp_path: Path, postal_signer: PostalSigner, knot_dns: Any
) -> None:
    server = RedisServer(tmp_path / "redis")  # not started yet: the worker must wait for it
    env = bridge_environment(tmp_path, server.url, postal_signer, nameserver=knot_dns.nameserver)
    log_path = tmp_path / "worker.log"
    worker = worker_process(env, log_path)
    try:
        time.sleep(2)
        assert worker.poll() is None, log_path.read_text()
        server.start()
        assert wait_until(lambda: len(_workers(server.url)) == 1, 20), log_path.read_text()
        first = _workers(server.url)
        assert wait_until(lambda: redis.Redis.from_url(server.url).exists(EPOCH), 20)

        kill_redis(server)
        time.sleep(1.5)
        server.start()  # empty
        assert wait_until(lambda: len(_workers(server.url) - first) == 1, 20), log_path.read_text()
        assert wait_until(lambda: redis.Redis.from_url(server.url).exists(EPOCH), 20)  # the sweeper saw the loss
        assert worker.poll() is None

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        stop_process(worker)
        server.stop()
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and "unhandled exception" not in text
    # One line when the wait starts, one when it ends: at start-up, and for the outage.
    assert text.count("Redis does not answer") == 1
    assert text.count("Redis went away") == 1
    assert text.count("Redis answers again") == 2


def test_worker_stops_on_sigterm_while_waiting_for_redis(
    tmp_path: Path, postal_signer: PostalSigner, knot_dns: Any
) -> None:
    server = RedisServer(tmp_path / "redis")  # never started
    env = bridge_environment(tmp_path, server.url, postal_signer, nameserver=knot_dns.nameserver)
    worker = subprocess.Popen(
        [sys.executable, "-m", "bridge", "worker"],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2)
        assert worker.poll() is None
        worker.send_signal(signal.SIGINT)
        output, _ = worker.communicate(timeout=15)
    finally:
        stop_process(worker)
    assert worker.returncode == 0
    assert b"Traceback" not in output and b"KeyboardInterrupt" not in output
