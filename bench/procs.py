"""Processes the benchmark starts: gunicorn (the bridge or the bare baseline), the RQ worker, wrk.

Everything listens on 127.0.0.1 on a free port, logs into the run's temporary directory, and is
stopped by the PID this module started (SIGTERM, wait, SIGKILL) — never by name. Memory figures
come from ``/proc/<pid>/status`` of the one gunicorn worker process under test.

This module must never send traffic anywhere but 127.0.0.1 and never stop a process it did not start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.servers import LOOPBACK, free_port, http_status, log_tail, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post.lua"
#: The deployment's gunicorn settings (make run, the Dockerfile). When the tree has it, every gunicorn
#: here runs from it, as deployed (worker class, threads, keep-alive, access log); BRIDGE_LISTEN and
#: BRIDGE_WEB_WORKERS in the environment (and the same flags) set the port and process count. Without
#: it, the flags the deployment used before: sync workers.
CONF = ROOT / "gunicorn.conf.py"


class BenchError(RuntimeError):
    """Something the benchmark needs did not work (a server did not start, a tool is missing)."""


class Gunicorn:
    """One gunicorn master with ``workers`` worker processes serving ``app`` (``wsgi:app`` or
    ``bench.bare:app``): from gunicorn.conf.py when the tree has one, else sync workers by flags."""

    def __init__(self, name: str, app: str, env: dict[str, str], log_dir: Path, *, workers: int) -> None:
        self.name = name
        self.app = app
        self.workers = workers
        self.port = free_port()
        self.env = dict(env, BRIDGE_LISTEN=f"{LOOPBACK}:{self.port}", BRIDGE_WEB_WORKERS=str(workers))
        self.log = log_dir / f"gunicorn-{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError(f"gunicorn {self.name} is not running")
        return self._proc.pid

    def start(self, timeout: float = 60.0) -> Gunicorn:
        command = [sys.executable, "-m", "gunicorn", "--workers", str(self.workers)]
        if CONF.exists():
            command += ["-c", str(CONF)]
        else:
            command += ["--worker-class", "sync", "--timeout", "120", "--graceful-timeout", "5"]
        command += ["--bind", f"{LOOPBACK}:{self.port}", "--log-level", "warning", self.app]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        # Every worker imports the app itself after the fork: wait until all of them are there and
        # one of them answers (a 404 or 405 on "/" is an answer).
        ready = wait_until(
            lambda: len(children(self.pid)) >= self.workers and http_status(f"{self.url}/") > 0,
            timeout,
            self._proc,
        )
        if not ready:
            self.stop()
            raise BenchError(f"gunicorn {self.name} ({self.app}) did not start:\n{log_tail(self.log)}")
        return self

    def worker_pids(self) -> list[int]:
        return children(self.pid)

    def stop(self) -> None:
        stop_process(self._proc, timeout=15)
        self._proc = None


class BridgeWorker:
    """``python -m bridge worker``: the RQ worker that files what the web process stored."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log = log_dir / "bridge-worker.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool], timeout: float = 60.0) -> BridgeWorker:
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "worker"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_until(ready, timeout, self._proc):
            self.stop()
            raise BenchError(f"the bridge worker did not start:\n{log_tail(self.log)}")
        return self

    def stop(self) -> None:
        stop_process(self._proc, timeout=15)
        self._proc = None


def server_shape(env: dict[str, str]) -> dict[str, Any]:
    """How the benchmark's gunicorns run: gunicorn.conf.py's worker class, threads, timeouts and
    keep-alive read under ``env`` (in a child process: the file reads the environment), or the flags."""
    if not CONF.exists():
        return {"conf": None, "worker_class": "sync", "threads": 1, "timeout": 120, "keepalive": None}
    names = ("worker_class", "threads", "timeout", "keepalive", "accesslog")
    code = (
        "import json, runpy, sys; g = runpy.run_path(sys.argv[1]); "
        f"print(json.dumps({{k: g.get(k) for k in {names!r}}}, default=str))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(CONF)], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"{CONF.name} does not load: {result.stderr.strip()[-500:]}")
    shape: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    shape["conf"] = CONF.name
    return shape


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (this kernel has no /proc/<pid>/task/<pid>/children)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (exited ones count as 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current RSS (``echo 5 > /proc/<pid>/clear_refs``)."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def wrk(
    url: str,
    *,
    pool_index: Path,
    pool_bodies: Path,
    first: int,
    mode: str,
    seconds: float,
    threads: int = 2,
    connections: int = 8,
    timeout: float = 10.0,
) -> dict[str, float]:
    """One wrk run posting pool deliveries; returns post.lua's summary (latencies in microseconds)."""
    binary = shutil.which("wrk")
    if binary is None:
        raise BenchError("wrk is not installed (make bench installs it: apt-get install wrk)")
    command = [
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        f"{timeout:.0f}s",
        "--latency",
        "-s",
        str(LUA),
        f"{url}/postal/inbound",
        "--",
        str(pool_index),
        str(pool_bodies),
        str(first),
        str(threads),
        mode,
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + timeout + 60, check=False
    )
    for line in result.stdout.splitlines():
        if line.startswith("BENCH "):
            summary: dict[str, float] = json.loads(line[len("BENCH ") :])
            summary["threads"] = threads
            return summary
    raise BenchError(f"wrk failed ({result.returncode}):\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")


def wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    if not wait_until(ready, timeout):
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
