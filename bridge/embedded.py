"""``python -m bridge run`` (what ``make run`` calls): the whole bridge on one machine, supervised.

Starts a private ``redis-server`` in ``BRIDGE_DATA_DIR/redis`` when ``BRIDGE_REDIS_URL`` is
unset, the web process (gunicorn, configured by ``gunicorn.conf.py``) and one worker with its
scheduler; prints what to paste into Postal; then watches them. A child that exits is started
again, with one line saying so, after a pause that doubles while it keeps dying (up to
``RESTART_MAX_SECONDS``), so a crash loop neither spins nor gives up.

Only Ctrl-C or SIGTERM stops it, quietly: the worker first (it finishes its job with Redis still
there), then the web process, Redis last, each by the PID started here. Every child runs in its
own session, Redis included, so that a Ctrl-C in the terminal reaches only this launcher, which
then stops the children in that order (instead of all of them dying at once, Redis first).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis

from bridge import metrics
from bridge.context import embedded_redis_socket
from bridge.settings import Settings, SettingsError
from bridge.store.objects import open_object_store

ROOT = Path(__file__).resolve().parents[1]

#: First pause before restarting a child that exited; doubled per quick exit, up to the maximum.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
#: A child that ran this long before exiting is restarted after the first pause again.
HEALTHY_SECONDS = 60.0
#: How long a child may take to stop after SIGTERM before it is killed.
STOP_SECONDS = 15.0
POLL_SECONDS = 0.25


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    pause: float = RESTART_FIRST_SECONDS
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        _say(f"{self.name} started (pid {self.proc.pid})")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _say(f"stopping {self.name} (pid {proc.pid})")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                _say(f"{self.name} (pid {proc.pid}) did not stop within {STOP_SECONDS:.0f} s; killing it")
                proc.kill()
                proc.wait()
        self.proc = None


class _Stop(Exception):
    pass


def run_embedded() -> int:
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for directory in metrics.directories(settings.data_dir).values():
        metrics.clear(directory)  # this machine's counters start with its processes
    stopping = {"now": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping["now"] = True

    # Before any child exists: a Ctrl-C from here on is a request, never a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    children: list[Child] = []  # in start order: Redis, web, worker; stopped in reverse
    try:
        if not settings.redis_url:
            redis_child = _redis_child(settings, env)
            children.append(redis_child)
            redis_child.start()
            env["BRIDGE_REDIS_URL"] = _wait_for_redis(settings, redis_child, stopping)
        store = open_object_store(settings.storage_url)
        ensure = getattr(store, "ensure_bucket", None)
        if ensure:
            ensure()
        web = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "wsgi:app"]
        children.append(Child("web", web, env))
        children.append(Child("worker", [sys.executable, "-m", "bridge", "worker"], env))
        for child in children[1:]:
            child.start()
        host, port = settings.listen.rsplit(":", 1)
        _print_postal_instructions(settings, host, port)
        _supervise(children, stopping)
    except _Stop:
        pass
    finally:
        for child in reversed(children):
            child.stop()
    _say("stopped")
    return 0


def _supervise(children: list[Child], stopping: dict[str, bool]) -> None:
    """Restart children that exit, with backoff, until a signal asks to stop."""
    while not stopping["now"]:
        now = time.monotonic()
        for child in children:
            proc = child.proc
            if child.restart_at is None and proc is not None and proc.poll() is not None:
                if now - child.started_at >= HEALTHY_SECONDS:
                    child.pause = RESTART_FIRST_SECONDS
                child.restart_at = now + child.pause
                _say(
                    f"{child.name} (pid {proc.pid}) exited with status {proc.returncode}; "
                    f"restarting it in {child.pause:.0f} s"
                )
                child.pause = min(child.pause * 2, RESTART_MAX_SECONDS)
            elif child.restart_at is not None and now >= child.restart_at:
                child.start()
        time.sleep(POLL_SECONDS)


def _redis_child(settings: Settings, env: dict[str, str]) -> Child:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SettingsError("BRIDGE_REDIS_URL is unset and redis-server is not installed (make run installs it)")
    directory = settings.data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    socket = embedded_redis_socket(settings)
    argv = [
        binary,
        "--port",
        "0",
        "--unixsocket",
        str(socket),
        "--unixsocketperm",
        "700",
        "--dir",
        str(directory),
        # Kept across restarts (of this process or of Redis alone): the index need not be rebuilt.
        "--appendonly",
        "yes",
        "--save",
        "",
        "--logfile",
        str(directory / "redis.log"),
    ]
    return Child("redis", argv, env)


def _wait_for_redis(settings: Settings, child: Child, stopping: dict[str, bool]) -> str:
    url = f"unix://{embedded_redis_socket(settings)}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if stopping["now"]:
            raise _Stop()
        if child.proc is not None and child.proc.poll() is not None:
            break
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return url
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            time.sleep(0.05)
    raise SettingsError(f"the private redis-server did not start (see {settings.data_dir / 'redis' / 'redis.log'})")


def _say(message: str) -> None:
    print(f"mailio-bridge: {message}", file=sys.stderr, flush=True)


def _print_postal_instructions(settings: Settings, host: str, port: str) -> None:
    """The banner: where this machine serves, then ``postal-setup``'s text (one source, no contradictions)."""
    from bridge.context import Bridge
    from bridge.postal_setup import gather, render

    try:
        text = render(gather(settings, Bridge(settings).postal_keys.describe))
    except Exception as exc:  # the banner must never stop what it describes
        text = f"(the setup text failed: {exc.__class__.__name__}; run `mailio-bridge postal-setup`)\n"
    print(
        f"\nMailio bridge running at http://{host}:{port}  (Ctrl-C stops it)\n"
        f"Postal and peers reach it through BRIDGE_PUBLIC_URL (your TLS proxy in front of http://{host}:{port}).\n"
        f"This text again: `.venv/bin/mailio-bridge postal-setup`.\n\n{text}",
        flush=True,
    )
