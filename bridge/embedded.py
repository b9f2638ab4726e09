"""``python -m bridge run`` (what ``make run`` calls): the whole bridge on one machine.

Starts a private ``redis-server`` in ``BRIDGE_DATA_DIR/redis`` when ``BRIDGE_REDIS_URL`` is
unset, the web process (gunicorn) and one worker with its scheduler; prints what to paste into
Postal; Ctrl-C (or SIGTERM) stops exactly the processes it started, by PID, in order. The
children run in their own sessions so that Ctrl-C reaches only this launcher, which then stops
the worker before the web process and Redis last.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import redis

from bridge.context import embedded_redis_socket
from bridge.settings import Settings, SettingsError
from bridge.store.objects import open_object_store


def run_embedded() -> int:
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    children: list[subprocess.Popen[bytes]] = []
    try:
        if not settings.redis_url:
            redis_proc, url = _start_redis(settings)
            children.append(redis_proc)
            env["BRIDGE_REDIS_URL"] = url
        store = open_object_store(settings.storage_url)
        ensure = getattr(store, "ensure_bucket", None)
        if ensure:
            ensure()
        host, port = settings.listen.rsplit(":", 1)
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--workers",
                    str(settings.web_workers),
                    "--bind",
                    settings.listen,
                    "--timeout",
                    "60",
                    "--graceful-timeout",
                    "10",
                    "--access-logfile",
                    "-",
                    "wsgi:app",
                ],
                env=env,
                start_new_session=True,
            )
        )
        children.append(subprocess.Popen([sys.executable, "-m", "bridge", "worker"], env=env, start_new_session=True))
        _print_postal_instructions(settings, host, port)
        return _wait(children)
    finally:
        _stop(children)


def _start_redis(settings: Settings) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SettingsError("BRIDGE_REDIS_URL is unset and redis-server is not installed (make run installs it)")
    directory = settings.data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    socket = embedded_redis_socket(settings)
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(directory / "redis.log"),
        ],
    )
    url = f"unix://{socket}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return proc, url
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            time.sleep(0.05)
    proc.terminate()
    raise SettingsError(f"the private redis-server did not start (see {directory / 'redis.log'})")


def _print_postal_instructions(settings: Settings, host: str, port: str) -> None:
    keys = "configured" if settings.postal_public_keys or settings.postal_url else "NOT configured yet"
    print(
        f"""
Mailio bridge running at http://{host}:{port}  (Ctrl-C stops it)

In Postal (Routing -> HTTP Endpoints -> Add):
  URL:       https://{settings.domain}/postal/inbound   (your TLS proxy in front of http://{host}:{port})
  Encoding:  BodyAsJSON          Format: RawMessage (Hash works too, but is lossy)
  Then add a route (*@{settings.domain} or name@...) with that endpoint.

Postal's signing key is {keys}. Until it is, deliveries get 503 and Postal keeps retrying.
  Set BRIDGE_POSTAL_URL=https://<postal web host> (uses Postal's /.well-known/jwks.json), or
  on the Postal host run `postal default-dkim-record` and set BRIDGE_POSTAL_PUBLIC_KEY='<the p= value>'.

Mailboxes: python -m bridge mailbox add you@{settings.domain}
""",
        flush=True,
    )


def _wait(children: list[subprocess.Popen[bytes]]) -> int:
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop["now"]:
            for child in children:
                if child.poll() is not None:
                    print(
                        f"mailio-bridge: a child process exited ({child.pid}); stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    """Worker first, then the web process, Redis last: each finishes its work with Redis still there."""
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
