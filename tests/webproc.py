"""The web process as deployed: gunicorn with the repository's gunicorn.conf.py, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.servers import ServerStartError, free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def gunicorn_process(environment: dict[str, str], log_path: Path, **extra: str) -> Iterator[tuple[str, int]]:
    """Run ``gunicorn -c gunicorn.conf.py wsgi:app``; yields (base URL, master PID) once /healthz answers."""
    port = free_port()
    env = {
        **os.environ,
        "BRIDGE_WEB_WORKERS": "2",
        **environment,
        "BRIDGE_LISTEN": f"127.0.0.1:{port}",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerStartError(f"gunicorn did not start:\n{log_path.read_text()[-2000:]}")
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.2)
            yield url, proc.pid
        finally:
            stop_process(proc)


def worker_process(environment: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start ``python -m bridge worker`` (the deployed worker, with its scheduler), its output in ``log_path``.

    The caller stops it with ``tests.servers.stop_process``.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "worker", *args],
            cwd=ROOT,
            env={**os.environ, **environment, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
