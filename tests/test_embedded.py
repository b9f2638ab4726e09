"""``python -m bridge run`` (``make run``) as a real process tree: a child that dies comes back, Ctrl-C stops all.

The launcher starts its private Redis, gunicorn and the worker, each in its own session. Killing a child
by its PID must bring it back with a line saying so; SIGINT (a terminal's Ctrl-C) must stop the worker,
then the web process, then Redis, and exit 0 without a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import bridge_environment
from tests.postal_sim import PostalSigner
from tests.servers import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]


def _started(log: Path, name: str) -> list[int]:
    return [
        int(pid) for pid in re.findall(rf"mailio-bridge: {name} started \(pid (\d+)\)", log.read_text(errors="replace"))
    ]


def _wait_for(check: Any, timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}", pytrace=False)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_run_restarts_dead_children_and_stops_in_order_on_ctrl_c(
    tmp_path: Path, postal_signer: PostalSigner, knot_dns: Any
) -> None:
    port = free_port()
    env = bridge_environment(
        tmp_path, "unused", postal_signer, nameserver=knot_dns.nameserver, BRIDGE_LISTEN=f"127.0.0.1:{port}"
    )
    del env["BRIDGE_REDIS_URL"]  # the launcher starts its own
    env["BRIDGE_WEB_WORKERS"] = "1"
    base_env = {k: v for k, v in os.environ.items() if k != "BRIDGE_REDIS_URL"}
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"],
            cwd=ROOT,
            env={**base_env, **env, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        health = f"http://127.0.0.1:{port}/healthz"
        _wait_for(lambda: requests.get(health, timeout=2).status_code == 200, 60, "the bridge did not answer", log)
        redis_pid, web_pid, worker_pid = (_started(log, name)[0] for name in ("redis", "web", "worker"))
        assert os.getsid(redis_pid) != os.getsid(launcher.pid), "Redis must not share the launcher's session"

        os.kill(worker_pid, signal.SIGKILL)
        _wait_for(lambda: len(_started(log, "worker")) == 2, 20, "the worker was not restarted", log)
        text = log.read_text()
        assert f"worker (pid {worker_pid}) exited with status -9; restarting it" in text

        os.kill(web_pid, signal.SIGTERM)
        _wait_for(lambda: len(_started(log, "web")) == 2, 20, "the web process was not restarted", log)
        _wait_for(
            lambda: requests.get(health, timeout=2).status_code == 200, 60, "the new web process did not answer", log
        )
        assert launcher.poll() is None

        pids = [redis_pid, _started(log, "web")[-1], _started(log, "worker")[-1]]
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
    finally:
        stop_process(launcher)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    order = [text.index(f"stopping {name} (pid") for name in ("worker", "web", "redis")]
    assert order == sorted(order), "stop order: worker, web, Redis last"
    assert all(_gone(pid) for pid in pids)
