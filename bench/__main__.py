"""``make bench`` (``python -m bench``): the inbound path against a bare baseline, in one run.

1. Throughput and latency: gunicorn (4 worker processes, from gunicorn.conf.py when the tree has it)
   serving the full bridge (fsync on; and with DKIM-signed messages, the key in Knot; fsync off with
   ``--nofsync``) and bench/bare.py, loaded by wrk with Postal-signed 20 KB deliveries, interleaved runs.
2. End to end: one gunicorn worker and one ``python -m bridge worker``; N unique deliveries; time
   until the last 2xx (accepted) and until all N are listed in the folder index (filed).
3. Memory: one 1, 5 and 25 MB message to a gunicorn with one worker process; that process's peak RSS growth.
4. Where the time goes: each stage of the request path, timed in-process.
5. Screening (bench/screening.py): the filing job in-process against a Knot DNS server, known vs
   first-time senders (scrypt runs counted), then end to end with screening on.
7. Hostile mix: normal deliveries (wrk, 8 connections) while 1 or 3 more connections post deliveries with
   five DKIM-Signature headers for names whose DNS never answers (bench/dnslab.py: one dead zone, or a
   dead domain per delivery), against the same bridge with no extra connection and with extra plain
   ones (same concurrency), interleaved; the hostile requests' own latency too.
8. Throughput and p99 against concurrency (1-32 connections): bare, the bridge on its file store, and
   on S3 served by moto and by Ceph RGW (bench/sweep.py).
Optionally one experiment in section 1 (``--experiment-workers N``): full and bare under N processes.

Prints a table and writes it to bench/RESULTS.md, everything measured to bench/results.json, and the
pictures the README shows to bench/img/ (bench/plots.py; ``python -m bench.plots`` redraws them).
A benchmark, not a test: no timing is asserted; it exits non-zero only when something broke (a server
did not start, a non-2xx answer, socket errors).
It must never send traffic anywhere but 127.0.0.1, never leave a process running, never stop a
process it did not start, and never keep its throw-away keys outside its temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench import plots, procs, report, screening, sweep
from bench.dnslab import DnsLab
from bench.pool import Pool, big_message, build_pool, encode_delivery, extend_pool
from bench.procs import BenchError, BridgeWorker, Gunicorn
from bench.screening import ScreeningConfig
from bench.stages import measure_stage_memory, measure_stages
from bridge.context import Bridge
from bridge.mailio.identity import UserKeys, generate_user_keys
from bridge.postal.payloads import decode_base64
from bridge.settings import Settings
from tests.postal_sim import PostalSigner
from tests.servers import LOOPBACK, RedisServer, ServerStartError, log_tail

DOMAIN = "mail.bench.test"
EMAIL = f"support@{DOMAIN}"
MAX_MESSAGE_BYTES = 30 * 1024 * 1024
BIG_MESSAGE_BYTES = 25 * 1024 * 1024
THREADS, CONNECTIONS = 2, 8
BRIDGE_APP = "wsgi:app"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_JSON = Path(__file__).resolve().parent / "results.json"
SECTIONS = ("load", "hostile", "e2e", "memory", "where", "screening", "sweep")
MEMORY_SIZES_MB = (1, 5, 25)
# The pools (bench/pool.py, bench/dnslab.py). CONTROL holds plain messages numbered apart from PLAIN's, for
# the hostile mix's extra connections when they are not hostile (both pools go to one bridge there).
PLAIN, SIGNED, HOSTILE, FRESH, CONTROL = "plain", "signed", "hostile", "fresh", "control"
BASELINE = "none"  # the hostile mix's load without extra connections
CONTROL_NUMBERS = 5_000_000
HOSTILE_SHARES = (1, 3)  # extra connections beside the 8 normal ones: 1 of 9, 3 of 11
HOSTILE_TIMEOUT = 30.0  # seconds wrk and the hostile driver wait for one answer in the mix


@dataclass
class Config:
    seconds: float
    repeats: int
    warm_up: float
    web_workers: int
    experiment_workers: int  # 0: no "--workers N" experiment
    e2e_count: int
    stage_runs: int
    nofsync: bool
    write_results: bool
    hostile_repeats: int = 2
    hostile_seconds: float = 5.0
    only: tuple[str, ...] = ()
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    sweep_levels: tuple[int, ...] = sweep.LEVELS
    sweep_seconds: float = 2.0
    sweep_repeats: int = 2
    sweep_backends: tuple[str, ...] = ("moto", "ceph")
    draw: bool = False


@dataclass
class Run:
    """Everything one ``python -m bench`` measured, for the report."""

    config: Config
    started: datetime
    machine: dict[str, str] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)  # how gunicorn ran (procs.server_shape)
    load: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    pool_size: int = 0
    hostile: dict[str, Any] = field(default_factory=dict)
    section_seconds: dict[str, float] = field(default_factory=dict)
    e2e: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # the 25 MB message, per target
    memory_sizes: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # every size, per target
    sweep: dict[str, Any] = field(default_factory=dict)
    stages: list[Any] = field(default_factory=list)
    stage_memory: list[Any] = field(default_factory=list)
    cyclic_mib: float = 0.0
    screening: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # something broke: exit 1
    notes: list[str] = field(default_factory=list)  # worth saying, not broken


class Bench:
    """Holds the run's temporary directory, private Redis, Postal key, mailbox keys, pools and DNS lab."""

    def __init__(self, tmp: Path, config: Config) -> None:
        self.tmp = tmp
        self.config = config
        self.redis = RedisServer(tmp / "redis")
        self.signer = PostalSigner()
        self.pem = tmp / "postal-signing.pem"
        self.pem.write_bytes(self.signer.public_pem())
        self.owner: UserKeys = generate_user_keys()
        self.pools: dict[str, Pool] = {}
        self.lab: DnsLab | None = None
        self._databases = 0
        self.log_dir = tmp / "logs"
        self.log_dir.mkdir()

    @property
    def pool(self) -> Pool | None:
        """The plain pool (unsigned 20 KB messages): most sections use only that one."""
        return self.pools.get(PLAIN)

    def env(
        self, name: str, *, fsync: bool, root: Path | None = None, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The environment of one bridge (own data directory under ``root``, the run's temporary
        directory by default, and own Redis database) with its mailbox."""
        self._databases += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AWS_"))}
        env.update(
            BRIDGE_DOMAIN=DOMAIN,
            BRIDGE_DATA_DIR=str((root or self.tmp) / name),
            BRIDGE_REDIS_URL=f"redis://{LOOPBACK}:{self.redis.port}/{self._databases}",
            BRIDGE_POSTAL_PUBLIC_KEY=str(self.pem),
            BRIDGE_FSYNC="true" if fsync else "false",
            BRIDGE_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
            BRIDGE_LOG_LEVEL="INFO",
            **(extra or {}),
        )
        bridge = Bridge(Settings.from_env(env))
        bridge.mailboxes.add(EMAIL, self.owner.ed25519_public, self.owner.x25519_public)
        return env

    def bare_env(self, name: str = "bare") -> dict[str, str]:
        """The bare app's environment: no bridge settings but what gunicorn.conf.py needs to load."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AWS_"))}
        env.update(BRIDGE_DOMAIN=DOMAIN, BRIDGE_DATA_DIR=str(self.tmp / name))
        return env

    def dns(self) -> DnsLab:
        """Knot with the DKIM key and the dead zone (started on first use, stopped by main)."""
        if self.lab is None:
            self.lab = DnsLab(self.tmp / "knot").start()
        return self.lab

    def address(self, env: dict[str, str]) -> str:
        mailbox = Bridge(Settings.from_env(env)).mailboxes.resolve(EMAIL)
        assert mailbox is not None
        return mailbox.address

    def ensure_pool(self, count: int, kind: str = PLAIN) -> Pool:
        """The ``kind`` pool (plain, signed, hostile, fresh or control) with at least ``count`` deliveries."""
        pool = self.pools.get(kind)
        if pool is None:
            template = b""
            if kind == SIGNED:
                template = self.dns().signed_template()
            elif kind in (HOSTILE, FRESH):
                template = self.dns().hostile_template(fresh=kind == FRESH)
            directory = self.tmp / ("pool" if kind == PLAIN else f"pool-{kind}")
            numbers_from = CONTROL_NUMBERS if kind == CONTROL else 0
            pool = build_pool(directory, self.signer, count, EMAIL, template=template, numbers_from=numbers_from)
        elif count > pool.count:
            pool = extend_pool(pool, self.signer, count)
        self.pools[kind] = pool
        return pool

    def close(self) -> None:
        if self.lab is not None:
            self.lab.stop()
            self.lab = None


@dataclass
class Target:
    """One gunicorn under load and the pool it posts: ``kind`` None for the bare app (cycles the plain
    pool: it stores nothing), else every request a new delivery of that pool from ``cursor`` on."""

    server: Gunicorn
    kind: str | None
    cursor: int = 0


class Loader:
    """Runs wrk against targets, sizing each pool before each run from the fastest rate seen on it."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.fastest: dict[str, float] = {}  # req/s of the fastest run so far, per pool kind

    def probe(self, target: Target) -> None:
        if target.kind is not None:
            target.cursor = _probe(target.server, self.bench.ensure_pool(1, target.kind))

    def pool_for(self, target: Target, seconds: float, connections: int) -> Pool:
        if target.kind is None:
            return self.bench.ensure_pool(1)
        # Enough unique deliveries for this run even at twice the fastest rate seen; building more
        # between runs (~1.5 ms each) keeps the pool small when the bridge is slow.
        fastest = self.fastest.get(target.kind, 50.0 * connections)
        return self.bench.ensure_pool(target.cursor + int(fastest * seconds * 2) + 300, target.kind)

    def run(
        self, target: Target, seconds: float, *, connections: int = CONNECTIONS, timeout: float = 10.0
    ) -> dict[str, float]:
        pool = self.pool_for(target, seconds, connections)
        server = target.server
        pids = [server.pid, *server.worker_pids()]
        cpu_before = procs.cpu_seconds(pids)
        threads = min(THREADS, connections)  # wrk needs a connection per thread
        result = procs.wrk(
            server.url,
            pool_index=pool.index,
            pool_bodies=pool.bodies,
            first=target.cursor,
            mode="cycle" if target.kind is None else "unique",
            seconds=seconds,
            threads=threads,
            connections=connections,
            timeout=timeout,
        )
        result["server_cpu_ms"] = (procs.cpu_seconds(pids) - cpu_before) * 1000 / max(1, result["requests"])
        if target.kind is not None:
            target.cursor += int(result["sent_per_thread"]) * threads
            self.fastest[target.kind] = max(self.fastest.get(target.kind, 0.0), report.rate(result))
        return result


# --------------------------------------------------------------------------------------------------
# 1. throughput and latency


def measure_load(bench: Bench, run: Run) -> None:
    config = bench.config
    workers = config.web_workers
    knot = {"BRIDGE_DNS_NAMESERVERS": bench.dns().knot_nameserver}
    targets: dict[str, Target] = {
        "bare": Target(Gunicorn("bare", "bench.bare:app", bench.bare_env(), bench.log_dir, workers=workers), None),
        "full": Target(
            Gunicorn("full", BRIDGE_APP, bench.env("load-fsync", fsync=True), bench.log_dir, workers=workers), PLAIN
        ),
    }
    if config.nofsync:
        env = bench.env("load-nofsync", fsync=False)
        targets["full-nofsync"] = Target(
            Gunicorn("full-nofsync", BRIDGE_APP, env, bench.log_dir, workers=workers), PLAIN
        )
    # Most real mail is DKIM-signed: the same bridge (fsync on) verifying one real signature per message.
    env = bench.env("load-signed", fsync=True, extra=knot)
    targets["full-signed"] = Target(Gunicorn("full-signed", BRIDGE_APP, env, bench.log_dir, workers=workers), SIGNED)
    if config.experiment_workers:
        # The experiment (one extra row): more worker processes. Same settings otherwise.
        n = config.experiment_workers
        bare_n = Gunicorn(f"bare-w{n}", "bench.bare:app", bench.bare_env(f"bare-w{n}"), bench.log_dir, workers=n)
        env = bench.env(f"load-fsync-w{n}", fsync=True)
        targets[f"bare-w{n}"] = Target(bare_n, None)
        targets[f"full-w{n}"] = Target(Gunicorn(f"full-w{n}", BRIDGE_APP, env, bench.log_dir, workers=n), PLAIN)
    loader = Loader(bench)
    try:
        for target in targets.values():
            target.server.start()
        for target in targets.values():
            loader.probe(target)
        # Warm-up: every worker imports the app lazily and fills its caches on its first requests.
        for target in targets.values():
            loader.run(target, config.warm_up)
        for repeat in range(config.repeats):
            for name, target in targets.items():
                result = loader.run(target, config.seconds)
                run.load.setdefault(name, []).append(result)
                print(f"  run {repeat + 1}/{config.repeats} {name:13s} {report.load_line(result)}", flush=True)
    finally:
        for target in targets.values():
            target.server.stop()
    run.pool_size = bench.pool.count if bench.pool else 0
    for name, results in run.load.items():
        for result in results:
            if result["non2xx"] or _socket_errors(result):
                run.problems.append(
                    f"{name}: {int(result['non2xx'])} non-2xx answers, {_socket_errors(result)} socket errors"
                )
            if not name.startswith("bare") and result["wrapped"]:
                run.notes.append(f"{name}: the pool wrapped in one run (some deliveries were duplicates)")


# --------------------------------------------------------------------------------------------------
# 8. throughput and p99 against concurrency, on the file store and on S3


def measure_sweep(bench: Bench, run: Run) -> None:
    config = bench.config
    workers = config.web_workers
    backends = sweep.S3Backends(bench.tmp / "s3")
    targets: dict[str, Target] = {
        "bare": Target(
            Gunicorn("sweep-bare", "bench.bare:app", bench.bare_env(), bench.log_dir, workers=workers), None
        ),
        "full": Target(
            Gunicorn("sweep-full", BRIDGE_APP, bench.env("sweep-file", fsync=True), bench.log_dir, workers=workers),
            PLAIN,
        ),
    }
    loader = Loader(bench)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    try:
        backends.start(config.sweep_backends)
        for name in backends.servers:
            extra = backends.env(name)
            with sweep.aws_environ(extra):  # the mailbox is added by this process, through boto3's chain
                env = bench.env(f"sweep-{name}", fsync=True, extra=extra)
            server = Gunicorn(f"sweep-{name}", BRIDGE_APP, env, bench.log_dir, workers=workers)
            targets[f"full-{name}"] = Target(server, PLAIN)
        for target in targets.values():
            target.server.start()
        for target in targets.values():
            loader.probe(target)
            loader.run(target, config.warm_up)
        for level in config.sweep_levels:
            for repeat in range(config.sweep_repeats):
                for name, target in targets.items():
                    result = loader.run(target, config.sweep_seconds, connections=level)
                    runs.setdefault(name, {}).setdefault(level, []).append(result)
                    print(f"  c={level:2d} run {repeat + 1} {name:10s} {report.load_line(result)}", flush=True)
    finally:
        for target in targets.values():
            target.server.stop()
        backends.close()
    run.sweep = {
        "levels": list(config.sweep_levels),
        "seconds": config.sweep_seconds,
        "repeats": config.sweep_repeats,
        "runs": runs,
        "notes": backends.notes,
    }
    for name, levels in runs.items():
        for level, results in levels.items():
            for result in results:
                if result["non2xx"] or _socket_errors(result):
                    run.problems.append(
                        f"sweep {name} at {level} connections: {int(result['non2xx'])} non-2xx answers, "
                        f"{_socket_errors(result)} socket errors"
                    )


def _probe(server: Gunicorn, pool: Pool) -> int:
    """One delivery before any load: a bridge that cannot store mail is a broken run, not a slow one."""
    body, headers = pool.read(0, 1)[0]
    status = _post(server.url, body, headers)
    if not 200 <= status < 300:
        raise BenchError(
            f"the bridge ({server.app}) answered {status} to a valid signed delivery; its log:\n"
            f"{log_tail(server.log, 8)}"
        )
    return 1


# --------------------------------------------------------------------------------------------------
# 7. hostile mix: DKIM for DNS that never answers


def measure_hostile(bench: Bench, run: Run) -> None:
    """Normal deliveries (wrk, 8 connections, the plain pool) against one bridge while 1 or 3 more
    connections (bench/drive.py) post deliveries whose five DKIM signatures point into the dead zone
    (hostile) or into dead domains of their own (fresh), against the same extra connections posting
    plain deliveries (the control: same concurrency)."""
    config = bench.config
    lab = bench.dns()
    assert lab.resolver is not None
    env = bench.env("hostile", fsync=True, extra={"BRIDGE_DNS_NAMESERVERS": lab.resolver.nameserver})
    server = Gunicorn("hostile", BRIDGE_APP, env, bench.log_dir, workers=config.web_workers)
    normal = Target(server, PLAIN)
    extra = {kind: Target(server, kind) for kind in (CONTROL, HOSTILE, FRESH)}
    loader = Loader(bench)
    rate = dict.fromkeys(extra, 50.0)  # answered extra requests per second per connection, fastest so far
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        server.start()
        loader.probe(normal)
        loader.run(normal, config.warm_up)
        seconds = config.hostile_seconds
        loads = [(0, BASELINE)] + [(connections, kind) for connections in HOSTILE_SHARES for kind in extra]
        for repeat in range(config.hostile_repeats):
            for connections, kind in loads:
                before = lab.resolver.silenced  # building pools asks no DNS: only the bridge's requests do
                target, driver = extra.get(kind), None
                if target is not None:
                    count = int(rate[kind] * connections * seconds * 2) + 10 * connections
                    pool = bench.ensure_pool(target.cursor + count, kind)
                    driver = _start_driver(server.url, pool, target.cursor, count, connections, seconds)
                result: dict[str, Any] = {"extra": None}
                try:
                    result["normal"] = loader.run(normal, seconds, timeout=HOSTILE_TIMEOUT)
                finally:
                    if driver is not None:
                        result["extra"] = _finish_driver(driver, seconds + 2 * HOSTILE_TIMEOUT)
                result["dead_queries"] = lab.resolver.silenced - before
                answered = result["extra"]
                if target is not None and answered is not None:
                    target.cursor += int(answered["sent"])
                    span = max(1e-3, answered["end"] - answered["start"])
                    rate[kind] = max(rate[kind], len(answered["latencies_ms"]) / span / connections)
                runs.setdefault(f"{kind}-{connections}", []).append(result)
                line = report.hostile_line(kind, connections, result)
                print(f"  run {repeat + 1}/{config.hostile_repeats} {line}", flush=True)
    finally:
        server.stop()
    run.hostile = {"normal": CONNECTIONS, "shares": HOSTILE_SHARES, "runs": runs}
    for key, results in runs.items():
        for result in results:
            normal_result = result["normal"]
            if normal_result["non2xx"] or _socket_errors(normal_result):
                run.problems.append(
                    f"hostile mix ({key}): {int(normal_result['non2xx'])} non-2xx answers to normal deliveries, "
                    f"{_socket_errors(normal_result)} socket errors"
                )
            answered = result["extra"]
            if answered is None:
                continue
            if answered["non2xx"] or answered["errors"]:
                (run.problems if key.startswith(CONTROL) else run.notes).append(
                    f"hostile mix ({key}): {answered['non2xx']} extra deliveries answered non-2xx, "
                    f"{answered['errors']} without an answer"
                )
            if answered["exhausted"]:
                run.notes.append(f"hostile mix ({key}): the extra connections' pool ran out during a run")


def _start_driver(url: str, pool: Pool, first: int, count: int, connections: int, seconds: float) -> Any:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.drive",
            f"{url}/postal/inbound",
            str(pool.index),
            str(pool.bodies),
            "--first",
            str(first),
            "--count",
            str(count),
            "--concurrency",
            str(connections),
            "--deadline",
            str(seconds),
        ],
        cwd=procs.ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish_driver(driver: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The driver's summary once its last request is answered (it stops sending at its deadline)."""
    try:
        out, _ = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()
        raise BenchError("the hostile driver did not finish in time") from None
    if driver.returncode != 0 or not out.strip():
        raise BenchError(f"the hostile driver failed ({driver.returncode})")
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


def _socket_errors(result: dict[str, float]) -> int:
    return int(result["connect_errors"] + result["read_errors"] + result["write_errors"] + result["timeouts"])


# --------------------------------------------------------------------------------------------------
# 2. end to end: accepted vs filed


def measure_e2e(bench: Bench, run: Run) -> None:
    count = bench.config.e2e_count
    pool = bench.ensure_pool(count)
    # The worker asks DNS for SPF/DMARC: the bench's own Knot, never the machine's resolver (unreachable
    # here, it would make this row measure DNS timeouts instead of filing).
    env = bench.env("e2e", fsync=True, extra={"BRIDGE_DNS_NAMESERVERS": bench.dns().knot_nameserver})
    folder_key = f"bridge:idx:{bench.address(env)}:other"
    connection = redis.Redis.from_url(env["BRIDGE_REDIS_URL"], socket_timeout=5)
    try:
        run.e2e = run_e2e(bench, "e2e", env, pool, count, lambda: int(connection.zcard(folder_key)))
    finally:
        connection.close()
    run.problems.extend(e2e_problems("end to end", run.e2e))


def run_e2e(
    bench: Bench, name: str, env: dict[str, str], pool: Pool, count: int, filed: Callable[[], int]
) -> dict[str, Any]:
    """One gunicorn worker + one bridge worker; bench.drive posts ``count`` pool deliveries; ``filed()``
    (how many are in folders so far) is polled every 20 ms until it reaches the accepted count."""
    connection = redis.Redis.from_url(env["BRIDGE_REDIS_URL"], socket_timeout=5)
    web = Gunicorn(name, BRIDGE_APP, env, bench.log_dir, workers=1)
    worker = BridgeWorker(env, bench.log_dir)
    driver: subprocess.Popen[str] | None = None
    try:
        web.start()
        worker.start(lambda: connection.scard("rq:workers") >= 1)
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.drive",
                f"{web.url}/postal/inbound",
                str(pool.index),
                str(pool.bodies),
                "--count",
                str(count),
                "--concurrency",
                str(CONNECTIONS),
                "--deadline",
                "150",
            ],
            cwd=procs.ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + 300
        result: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            samples.append((time.time(), filed()))
            if result is None and driver.poll() is not None:
                out = driver.stdout.read() if driver.stdout else ""
                if driver.returncode != 0 or not out.strip():
                    raise BenchError(f"the end-to-end load generator failed ({driver.returncode})")
                result = json.loads(out.strip().splitlines()[-1])
                deadline = min(deadline, time.monotonic() + 120)  # time left for filing
            if result is not None and samples[-1][1] >= int(result["ok"]):
                break
            time.sleep(0.02)
        if result is None:
            raise BenchError("the end-to-end load generator did not finish in time")
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        worker.stop()
        web.stop()
        connection.close()
    accepted = int(result["ok"])
    filed_at = next((t for t, n in samples if n >= accepted), None)
    return {
        "count": count,
        "accepted": accepted,
        "non2xx": int(result["non2xx"]) + int(result["errors"]),
        "accepted_seconds": result["last_ok"] - result["start"],
        "filed": samples[-1][1] if samples else 0,
        "filed_seconds": (filed_at - result["start"]) if filed_at else None,
    }


def e2e_problems(what: str, e2e: dict[str, Any]) -> list[str]:
    problems = []
    if e2e["non2xx"]:
        problems.append(f"{what}: {e2e['non2xx']} non-2xx answers or socket errors")
    if e2e["accepted"] < e2e["count"]:
        problems.append(f"{what}: only {e2e['accepted']} of {e2e['count']} deliveries accepted")
    if e2e["filed_seconds"] is None:
        problems.append(f"{what}: only {e2e['filed']} of {e2e['accepted']} filed before the time limit")
    return problems


# --------------------------------------------------------------------------------------------------
# 3. memory: one 25 MB message


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    target = url.removeprefix("http://")
    host, port = target.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/postal/inbound", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def measure_memory(bench: Bench, run: Run) -> None:
    """Each size in turn, smallest first, to one gunicorn worker process per target: its peak RSS
    growth above what it held before the delivery (VmHWM reset per delivery)."""
    deliveries = []
    for number, size in enumerate(MEMORY_SIZES_MB):
        message = big_message(size * 1024 * 1024)
        body = encode_delivery(message, 9_000_001 + number, EMAIL)
        headers = {"Content-Type": "application/json", **bench.signer.sign_headers(body, sha1=False)}
        stored = len(decode_base64(json.loads(body)["message"], field="message"))
        deliveries.append((size, body, headers, stored))
    pool = bench.ensure_pool(1)
    warm_body, warm_headers = pool.read(0, 1)[0]
    targets = {
        "bare": ("bench.bare:app", bench.bare_env()),
        "full": (BRIDGE_APP, bench.env("memory", fsync=True)),
    }
    for name, (app, env) in targets.items():
        server = Gunicorn(f"memory-{name}", app, env, bench.log_dir, workers=1)
        rows = run.memory_sizes.setdefault(name, [])
        try:
            server.start()
            (pid,) = server.worker_pids()
            status = _post(server.url, warm_body, warm_headers)
            if not 200 <= status < 300:
                raise BenchError(f"memory {name}: the warm-up request got {status}")
            for size, body, headers, stored in deliveries:
                procs.reset_peak_rss(pid)
                before = procs.status_kb(pid, "VmRSS")
                started = time.perf_counter()
                status = _post(server.url, body, headers)
                seconds = time.perf_counter() - started
                peak = procs.status_kb(pid, "VmHWM")
                after = procs.status_kb(pid, "VmRSS")
                if not 200 <= status < 300:
                    run.problems.append(f"memory {name}: the {size} MB delivery got HTTP {status}")
                rows.append(
                    {
                        "size_mb": size,
                        "status": status,
                        "message_bytes": stored,
                        "request_bytes": len(body),
                        "rss_before_kb": before,
                        "peak_kb": peak,
                        "rss_after_kb": after,
                        "growth_bytes": (peak - before) * 1024,
                        "seconds": seconds,
                    }
                )
        finally:
            server.stop()
        run.memory[name] = rows[-1]  # the largest (25 MB): the goal's row
    body, headers = deliveries[-1][1], deliveries[-1][2]
    # Where the bridge's peak comes from: the same delivery through each stage, in-process.
    env = bench.env("memory-stages", fsync=True)
    run.stage_memory, run.cyclic_mib = measure_stage_memory(Settings.from_env(env), body, headers)


# --------------------------------------------------------------------------------------------------
# 4. where the time goes


def measure_where(bench: Bench, run: Run) -> None:
    runs = bench.config.stage_runs
    count = 3 * (runs + 3)
    deliveries = bench.ensure_pool(count).read(0, count)
    signed = bench.ensure_pool(2 * (runs + 3), SIGNED).read(0, 2 * (runs + 3))
    env = bench.env("stages", fsync=True, extra={"BRIDGE_DNS_NAMESERVERS": bench.dns().knot_nameserver})
    run.stages = measure_stages(Settings.from_env(env), deliveries, signed, runs=runs, seconds=50)


# --------------------------------------------------------------------------------------------------
# 5. screening in the filing job, and end to end with screening


def measure_screening(bench: Bench, run: Run) -> None:
    def e2e(name: str, env: dict[str, str], pool: Pool, count: int, filed: Callable[[], int]) -> dict[str, Any]:
        return run_e2e(bench, name, env, pool, count, filed)

    screening.measure_screening(bench, run, email=EMAIL, config=bench.config.screening, run_e2e=e2e)
    if run.screening.get("e2e"):
        run.problems.extend(e2e_problems("end to end with screening", run.screening["e2e"]))


# --------------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("[")[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_version.strip(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "tree": tree_state(),
    }


def tree_state() -> str:
    """The commit the run measured, and how many tracked files differed from it (others' work in progress)."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=procs.ROOT, capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    head = git("log", "-1", "--format=%h %s")
    if not head:
        return "not a git checkout"
    changed = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
    return f"`{head[:90]}`" + (f" with {changed} tracked files changed and not committed" if changed else ", clean")


def results_document(run: Run, elapsed: float) -> dict[str, Any]:
    """Everything one run measured, for bench/results.json and the pictures (dataclasses as dicts)."""
    document: dict[str, Any] = dataclasses.asdict(run)
    document["elapsed_seconds"] = elapsed
    document["started"] = run.started.isoformat()
    return document


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per target")
    parser.add_argument("--e2e-count", type=int, default=2000, help="deliveries in the end-to-end run")
    parser.add_argument("--stage-runs", type=int, default=150, help="timed calls per stage")
    parser.add_argument(
        "--nofsync", action="store_true", help="add a BRIDGE_FSYNC=false target to section 1 (section 4 times both)"
    )
    parser.add_argument(
        "--experiment-workers", type=int, default=0, help="gunicorn workers of an extra full/bare pair (0: none)"
    )
    parser.add_argument("--hostile-repeats", type=int, default=2, help="interleaved runs per hostile mix load")
    parser.add_argument("--hostile-seconds", type=float, default=5.0, help="length of each hostile mix run")
    parser.add_argument("--known-messages", type=int, default=3000, help="screening: messages from known senders")
    parser.add_argument("--new-senders", type=int, default=200, help="screening: first-time senders (one scrypt each)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (numbers not comparable)")
    parser.add_argument(
        "--no-ceph", action="store_true", help="section 8 without Ceph RGW (moto only; Ceph takes ~30 s to start)"
    )
    parser.add_argument("--draw", action="store_true", help="draw the pictures even when no results are written")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable; implies --no-write: a partial run is not a result)",
    )
    args = parser.parse_args(argv)
    config = Config(
        seconds=args.seconds,
        repeats=args.repeats,
        warm_up=2.0,
        web_workers=4,
        experiment_workers=args.experiment_workers,
        e2e_count=args.e2e_count,
        stage_runs=args.stage_runs,
        nofsync=args.nofsync,
        write_results=not args.no_write,
        hostile_repeats=args.hostile_repeats,
        hostile_seconds=args.hostile_seconds,
        screening=ScreeningConfig(known_messages=args.known_messages, new_senders=args.new_senders),
        only=tuple(args.only or ()),
    )
    config.draw = args.draw
    if args.no_ceph:
        config.sweep_backends = ("moto",)
    if config.only:
        config.write_results = False
    if args.quick:
        config.seconds, config.repeats, config.warm_up, config.hostile_repeats = 2.0, 1, 1.0, 1
        config.hostile_seconds = 2.0
        config.e2e_count, config.stage_runs = 300, 20
        config.sweep_levels, config.sweep_seconds, config.sweep_repeats = (1, 8, 32), 2.0, 1
        config.screening = ScreeningConfig(known_messages=500, new_senders=20, profile_messages=200, scrypt_samples=3)
        config.write_results = False
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 2
    run = Run(config=config, started=datetime.now(UTC), machine=machine_facts())
    begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as directory:
        tmp = Path(directory)
        bench = Bench(tmp, config)
        # The bridge logs one INFO line per delivery: keep them (that cost is real) but in a file.
        logging.basicConfig(filename=tmp / "logs" / "bench-process.log", level=logging.INFO)
        sections: list[tuple[str, Callable[[Bench, Run], None]]] = [
            ("1 throughput and latency", measure_load),
            ("7 hostile mix (DKIM for DNS that never answers)", measure_hostile),
            ("2 end to end (accepted vs filed)", measure_e2e),
            ("3 memory (1, 5 and 25 MB messages)", measure_memory),
            ("4 where the time goes (in-process)", measure_where),
            ("5-6 screening: the filing job in-process, then end to end", measure_screening),
            ("8 throughput and p99 against concurrency, file store and S3", measure_sweep),
        ]
        if config.only:
            sections = [(t, f) for (t, f), name in zip(sections, SECTIONS, strict=True) if name in config.only]
        try:
            bench.redis.start()
            run.server = procs.server_shape(dict(bench.bare_env("shape"), BRIDGE_WEB_WORKERS=str(config.web_workers)))
            print(f"bench: building signed deliveries in {tmp / 'pool'}", flush=True)
            bench.ensure_pool(max(config.e2e_count, 2000))
            for title, section in sections:
                print(f"bench: {title}", flush=True)
                started = time.monotonic()
                section(bench, run)
                run.section_seconds[title] = time.monotonic() - started
        except (BenchError, ServerStartError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.close()
            bench.redis.stop()
            logging.shutdown()
    run.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report.render(run, time.monotonic() - begin)
    print()
    print(text)
    if config.write_results:
        RESULTS.write_text(text)
        RESULTS_JSON.write_text(
            json.dumps(results_document(run, time.monotonic() - begin), indent=1, default=str) + "\n"
        )
        print(f"bench: wrote {RESULTS}, {RESULTS_JSON}")
    if config.write_results or config.draw:
        drawn = plots.draw(results_document(run, time.monotonic() - begin))
        print("bench: drew " + ", ".join(str(path) for path in drawn))
    if run.problems:
        print("bench: something broke: " + "; ".join(run.problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
