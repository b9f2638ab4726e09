"""Real servers the test suite starts for itself: Redis, moto's S3 server, and a one-node Ceph RGW.

Every server runs on 127.0.0.1 on a free port, in its own temporary directory, and is stopped by the
PIDs this module started (terminate, wait, kill) — never by name. The servers are plain classes with
``start()``/``stop()`` so bench scripts can use them too; the pytest fixtures below are thin wrappers
(``conftest.py`` loads them with ``pytest_plugins = ["tests.servers"]``).

Every server here is the real one, never an in-process stand-in. Nothing here reads the shared folder beside the project.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

LOOPBACK = "127.0.0.1"
MOTO_ACCESS_KEY = "testing"
MOTO_SECRET_KEY = "testing"
REGION = "us-east-1"
CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")
CEPH_MISSING_REASON = "Ceph RGW not installed (make test installs it)"


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Stop one process we started: SIGTERM, wait, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def wait_until(ready: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll ``ready`` until it is true; give up early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(Exception):
            if ready():
                return True
        time.sleep(0.05)
    return False


def http_status(url: str, method: str = "GET", timeout: float = 1.0) -> int:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --------------------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """A private redis-server without persistence; ``stop()``/``start()`` keep the port, lose the data."""

    def __init__(self, directory: str | os.PathLike[str], port: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ping(self) -> bool:
        with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerStartError("redis-server not installed (apt-get install redis-server)")
        command = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.dir), "--logfile", str(self.log), "--daemonize", "no"]
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if not wait_until(self._ping, timeout, self._proc):
            self.stop()
            raise ServerStartError(f"redis-server did not answer on port {self.port}:\n{log_tail(self.log)}")
        return self

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def flushall(self) -> None:
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(16).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")


# --------------------------------------------------------------------------------------------------
# moto (S3 emulator: fast, accepts any credentials)


class MotoS3Server:
    """moto's standalone server from this virtualenv; ``reset()`` empties every bucket."""

    access_key = MOTO_ACCESS_KEY
    secret_key = MOTO_SECRET_KEY
    region = REGION

    def __init__(self, directory: str | os.PathLike[str], port: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = self.dir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 20.0) -> MotoS3Server:
        if self._proc is not None and self._proc.poll() is None:
            return self
        binary = Path(sys.executable).parent / "moto_server"
        if not binary.exists():
            raise ServerStartError(f"moto_server not found next to {sys.executable} (pip install 'moto[server]')")
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                # moto_server itself, but with atomic create-only writes (see tests/moto_atomic.py).
                [sys.executable, str(Path(__file__).with_name("moto_atomic.py")), "-H", LOOPBACK, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_until(lambda: http_status(f"{self.endpoint}/moto-api/") == 200, timeout, self._proc):
            self.stop()
            raise ServerStartError(f"moto_server did not answer on port {self.port}:\n{log_tail(self.log)}")
        return self

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def reset(self) -> None:
        if http_status(f"{self.endpoint}/moto-api/reset", method="POST", timeout=10) != 200:
            raise RuntimeError("moto reset failed")

    def client(self) -> Any:
        """A boto3 client for set-up, made once (clients are thread-safe but slow to create)."""
        if self._client is None:
            self._client = s3_client(self.endpoint, self.access_key, self.secret_key, self.region)
        return self._client


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str = REGION) -> Any:
    """A plain boto3 S3 client for test set-up (path-style, short timeouts)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


# --------------------------------------------------------------------------------------------------
# Ceph RGW (a real S3 implementation: checks signatures, enforces If-None-Match)


def ceph_missing() -> list[str]:
    return [name for name in CEPH_BINARIES if shutil.which(name) is None]


class CephRGW:
    """A throwaway one-node Ceph cluster (mon + memstore OSD + radosgw) without cephx, on loopback.

    About 15 s to start. All daemons run in the foreground under this process, so ``stop()`` ends
    exactly the PIDs started here.
    """

    region = REGION

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.mon_port = free_port()
        self.rgw_port = free_port()
        while self.rgw_port == self.mon_port:
            self.rgw_port = free_port()
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.conf = self.dir / "ceph.conf"
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.rgw_port}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _config(self, fsid: str) -> str:
        c = self.dir
        return f"""[global]
fsid = {fsid}
mon host = v1:{LOOPBACK}:{self.mon_port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
run dir = {c}/run
admin socket = {c}/run/$name.asok
log file = {c}/log/$name.log
pid file = {c}/run/$name.pid
keyring = {c}/keyring
ms bind ipv6 = false
[mon]
mon data = {c}/mon.$id
[osd]
osd data = {c}/osd.$id
osd objectstore = memstore
memstore device bytes = 1073741824
osd max object name len = 460
osd max object namespace len = 64
[client.rgw.a]
rgw frontends = beast endpoint={LOOPBACK}:{self.rgw_port}
rgw data = {c}/rgw
"""

    def _run(self, *command: str, timeout: float = 60.0) -> str:
        """Run a ceph tool to completion; its output goes to a log file, not to the test's terminal."""
        result = subprocess.run(
            [command[0], "-c", str(self.conf), *command[1:]],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        with open(self.dir / "log" / "tools.log", "ab") as log:
            log.write(f"$ {' '.join(command)} -> {result.returncode}\n".encode())
            log.write(result.stderr[-4000:])
        if result.returncode != 0:
            raise ServerStartError(
                f"`{' '.join(command[:3])} ...` failed ({result.returncode}):\n"
                f"{result.stderr.decode(errors='replace')[-2000:]}"
            )
        return result.stdout.decode()

    def _daemon(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        with open(self.dir / "log" / f"{name}.stderr", "ab") as log:
            proc = subprocess.Popen(
                [command[0], "-f", "-c", str(self.conf), *command[1:]],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        return proc

    def _ceph_ok(self, *args: str) -> str | None:
        result = subprocess.run(
            ["ceph", "-c", str(self.conf), "--connect-timeout", "2", *args],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=15,
            check=False,
        )
        return result.stdout.decode() if result.returncode == 0 else None

    def _fail(self, what: str, log_name: str) -> ServerStartError:
        tail = log_tail(self.dir / "log" / log_name)
        self.stop()
        return ServerStartError(f"Ceph RGW: {what} (in {self.dir}):\n{tail}")

    def start(self, timeout: float = 90.0) -> CephRGW:
        missing = ceph_missing()
        if missing:
            raise ServerStartError(f"{CEPH_MISSING_REASON}: missing {', '.join(missing)}")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("run", "log", "mon.a", "osd.0", "rgw"):
            (self.dir / sub).mkdir(parents=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(self._config(fsid))
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        keyring = str(self.dir / "keyring")
        monmap = str(self.dir / "monmap")
        admin_caps = ["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"]
        mon_addr = f"[v1:{LOOPBACK}:{self.mon_port}]"
        setup = [
            [
                "ceph-authtool",
                "--create-keyring",
                keyring,
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
            ["ceph-authtool", keyring, "--gen-key", "-n", "client.admin", *admin_caps],
            ["monmaptool", "--create", "--addv", "a", mon_addr, "--fsid", fsid, monmap],
        ]
        for command in setup:
            result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, check=False)
            if result.returncode != 0:
                detail = result.stderr.decode(errors="replace")[-1000:]
                raise ServerStartError(f"Ceph RGW: `{command[0]}` failed: {detail}")

        try:
            self._start_daemons(monmap, keyring, left)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_daemons(self, monmap: str, keyring: str, left: Callable[[], float]) -> None:
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        mon = self._daemon("mon.a", "ceph-mon", "-i", "a")
        if not wait_until(lambda: self._ceph_ok("mon", "stat") is not None, left(), mon):
            raise self._fail("ceph-mon did not answer", "mon.a.log")

        # The OSD is created under one uuid and formatted with the same one: without it the monitor holds
        # osd.0 under a uuid the OSD does not know, and now and then refuses its boot ("wrong fsid").
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "create", osd_uuid).strip()
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        osd = self._daemon(f"osd.{osd_id}", "ceph-osd", "-i", osd_id)
        if not wait_until(lambda: " 1 up" in (self._ceph_ok("osd", "stat") or ""), left(), osd):
            raise self._fail("ceph-osd did not come up", f"osd.{osd_id}.log")

        rgw = self._daemon("rgw", "radosgw", "-n", "client.rgw.a")
        if not wait_until(lambda: http_status(f"{self.endpoint}/") == 200, left(), rgw):
            raise self._fail("radosgw did not answer", "client.rgw.a.log")

        self._run(
            "radosgw-admin",
            "user",
            "create",
            "--uid=test",
            "--display-name=test",
            f"--access-key={self.access_key}",
            f"--secret-key={self.secret_key}",
        )
        self._warm_up(left())

    def _warm_up(self, timeout: float) -> None:
        """The first write creates RGW's data pools (seconds): pay that here, not in a test's timing."""
        client = self.client()
        bucket = f"warm-up-{secrets.token_hex(4)}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="warm-up", Body=b"x")
                client.delete_object(Bucket=bucket, Key="warm-up")
                client.delete_bucket(Bucket=bucket)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise self._fail(f"warm-up PUT failed: {exc.__class__.__name__}", "client.rgw.a.log") from None
                time.sleep(0.5)

    def client(self) -> Any:
        return s3_client(self.endpoint, self.access_key, self.secret_key, self.region)

    def stop(self) -> None:
        """Stop radosgw, then the OSD, then the monitor: the reverse of the start order."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            stop_process(proc, timeout=10)
        self._procs.clear()


# --------------------------------------------------------------------------------------------------
# pytest fixtures

_Server = TypeVar("_Server", RedisServer, MotoS3Server, CephRGW)


def _started(server: _Server) -> _Server:
    """Start a server or fail the test with its log, not a traceback."""
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private Redis for the session; tests may stop()/start() it (it comes back empty)."""
    server = _started(RedisServer(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, running and empty at the start of the test."""
    if not redis_server.running:
        _started(redis_server)
    redis_server.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    server = _started(MotoS3Server(tmp_path_factory.mktemp("moto")))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3Server) -> dict[str, str]:
    """A fresh, empty bucket on a freshly reset moto server."""
    moto_s3.reset()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    moto_s3.client().create_bucket(Bucket=bucket)
    return {
        "endpoint": moto_s3.endpoint,
        "bucket": bucket,
        "access_key": moto_s3.access_key,
        "secret_key": moto_s3.secret_key,
        "region": moto_s3.region,
    }


@pytest.fixture(scope="session")
def ceph_rgw() -> Iterator[CephRGW]:
    """A real Ceph RGW for the session (tests using it carry the ``ceph`` marker)."""
    missing = ceph_missing()
    if missing:
        pytest.skip(f"{CEPH_MISSING_REASON} (missing: {', '.join(missing)})")
    # A short path: Ceph's admin sockets are Unix sockets, whose paths may not exceed 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="ceph-"))
    server = CephRGW(directory)
    try:
        server.start()
    except ServerStartError:
        # A one-node cluster on a busy machine now and then loses its OSD at boot: one fresh attempt
        # (new fsid, new ports) before the tests that need it fail with its log.
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
        directory = Path(tempfile.mkdtemp(prefix="ceph-"))
        server = _started(CephRGW(directory))
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Fault injection (tests/test_faults.py, tests/test_sweeper.py)


def kill_redis(server: RedisServer) -> None:
    """SIGKILL a RedisServer (no shutdown, no save): ``start()`` then brings it back empty on the same port."""
    proc = server._proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)
    server._proc = None


class StoreDir:
    """A directory for a filesystem object store that tests can make read-only and full, for real.

    Root ignores file modes, so as root the directory is a small tmpfs that is remounted read-only
    and filled up; as another user, read-only is a ``chmod`` of every directory (and "full" is not
    available). ``unsupported(kind)`` says why a kind cannot be done here (None when it can).
    """

    def __init__(self, path: Path, size_mb: int = 64) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.mounted = False
        self._mount_error: str | None = None
        if os.geteuid() == 0:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
                capture_output=True,
                check=False,
            )
            self.mounted = result.returncode == 0
            if not self.mounted:
                self._mount_error = result.stderr.decode(errors="replace").strip() or "mount failed"

    def unsupported(self, kind: str) -> str | None:
        if self.mounted:
            return None
        if kind == "read-only" and os.geteuid() != 0:
            return None
        return f"cannot make the store {kind} here: running as root, tmpfs mount refused ({self._mount_error})"

    def read_only(self) -> None:
        if self.mounted:
            self._remount("ro")
        else:
            for directory, _, _ in os.walk(self.path):
                os.chmod(directory, 0o500)

    def writable(self) -> None:
        if self.mounted:
            self._remount("rw")
        else:
            for directory, _, _ in os.walk(self.path):
                os.chmod(directory, 0o700)

    def fill(self) -> None:
        """Write a filler file until the filesystem says ENOSPC."""
        with open(self.path / "filler", "wb", buffering=0) as out:
            for size in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):
                    while out.write(b"\0" * size):
                        pass

    def drain(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        if self.mounted:
            self._remount("rw")
            for _ in range(50):
                if subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            self.mounted = False

    def _remount(self, mode: str) -> None:
        # A remount read-only fails (EBUSY) while a file is open for writing: retry a moment.
        for _ in range(100):
            result = subprocess.run(
                ["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True, check=False
            )
            if result.returncode == 0:
                return
            time.sleep(0.02)
        raise RuntimeError(f"remount {mode} failed: {result.stderr.decode(errors='replace').strip()}")
