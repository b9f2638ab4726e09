"""``make bench`` (``python -m bench``): the inbound path against a bare baseline, in one run.

1. Throughput and latency: gunicorn (4 sync workers) serving the full bridge (fsync on, and off) and
   bench/bare.py, loaded by wrk with signed 20 KB deliveries, interleaved bare/full/full-nofsync runs.
2. End to end: one gunicorn worker and one ``python -m bridge worker``; N unique deliveries; time
   until the last 2xx (accepted) and until all N are listed in the folder index (filed).
3. Memory: one 25 MB message to a gunicorn with one sync worker; that worker's peak RSS growth.
4. Where the time goes: each stage of the request path, timed in-process.
5. Screening (bench/screening.py): the filing job in-process against a Knot DNS server, known vs
   first-time senders (scrypt runs counted), then end to end with screening on.
Plus one experiment in section 1: the full bridge (fsync on) and bare under ``--workers 8``.

Prints a table and writes it to bench/RESULTS.md. A benchmark, not a test: no timing is asserted;
it exits non-zero only when something broke (a server did not start, a non-2xx answer, socket errors).
It must never send traffic anywhere but 127.0.0.1, never leave a process running, never stop a
process it did not start, and never keep its throw-away keys outside its temporary directory.
"""

from __future__ import annotations

import argparse
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

from bench import procs, report, screening
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
SECTIONS = ("load", "e2e", "memory", "where", "screening")


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
    only: tuple[str, ...] = ()
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)


@dataclass
class Run:
    """Everything one ``python -m bench`` measured, for the report."""

    config: Config
    started: datetime
    machine: dict[str, str] = field(default_factory=dict)
    load: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    pool_size: int = 0
    e2e: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: list[Any] = field(default_factory=list)
    stage_memory: list[Any] = field(default_factory=list)
    cyclic_mib: float = 0.0
    screening: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # something broke: exit 1
    notes: list[str] = field(default_factory=list)  # worth saying, not broken


class Bench:
    """Holds the run's temporary directory, private Redis, Postal key, mailbox keys and pool."""

    def __init__(self, tmp: Path, config: Config) -> None:
        self.tmp = tmp
        self.config = config
        self.redis = RedisServer(tmp / "redis")
        self.signer = PostalSigner()
        self.pem = tmp / "postal-signing.pem"
        self.pem.write_bytes(self.signer.public_pem())
        self.owner: UserKeys = generate_user_keys()
        self.pool: Pool | None = None
        self._databases = 0
        self.log_dir = tmp / "logs"
        self.log_dir.mkdir()

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

    def bare_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AWS_"))}

    def address(self, env: dict[str, str]) -> str:
        mailbox = Bridge(Settings.from_env(env)).mailboxes.resolve(EMAIL)
        assert mailbox is not None
        return mailbox.address

    def ensure_pool(self, count: int) -> Pool:
        if self.pool is None:
            self.pool = build_pool(self.tmp / "pool", self.signer, count, EMAIL)
        elif count > self.pool.count:
            self.pool = extend_pool(self.pool, self.signer, count)
        return self.pool


# --------------------------------------------------------------------------------------------------
# 1. throughput and latency


def measure_load(bench: Bench, run: Run) -> None:
    config = bench.config
    targets: dict[str, Gunicorn] = {
        "bare": Gunicorn("bare", "bench.bare:app", bench.bare_env(), bench.log_dir, workers=config.web_workers),
        "full": Gunicorn(
            "full", BRIDGE_APP, bench.env("load-fsync", fsync=True), bench.log_dir, workers=config.web_workers
        ),
    }
    if config.nofsync:
        targets["full-nofsync"] = Gunicorn(
            "full-nofsync",
            BRIDGE_APP,
            bench.env("load-nofsync", fsync=False),
            bench.log_dir,
            workers=config.web_workers,
        )
    if config.experiment_workers:
        # The experiment (one extra row): more sync workers may overlap more fsyncs. Same settings otherwise.
        n = config.experiment_workers
        targets[f"bare-w{n}"] = Gunicorn(f"bare-w{n}", "bench.bare:app", bench.bare_env(), bench.log_dir, workers=n)
        targets[f"full-w{n}"] = Gunicorn(
            f"full-w{n}", BRIDGE_APP, bench.env(f"load-fsync-w{n}", fsync=True), bench.log_dir, workers=n
        )
    cursors = dict.fromkeys(targets, 0)
    try:
        for server in targets.values():
            server.start()
        for name in targets:
            if not name.startswith("bare"):
                cursors[name] = _probe(targets[name], bench.ensure_pool(1))

        fastest = [400.0]  # req/s of the fastest bridge run so far: sizes the pool before each run

        def once(name: str, seconds: float) -> dict[str, float]:
            unique = not name.startswith("bare")
            # Enough unique deliveries for this run even at twice the fastest rate seen; building more
            # between runs (~1.5 ms each) keeps the pool small when the bridge is slow.
            pool = bench.ensure_pool(cursors[name] + int(fastest[0] * seconds * 2) + 300 if unique else 1)
            server = targets[name]
            pids = [server.pid, *server.worker_pids()]
            cpu_before = procs.cpu_seconds(pids)
            result = procs.wrk(
                targets[name].url,
                pool_index=pool.index,
                pool_bodies=pool.bodies,
                first=cursors[name] if unique else 0,
                mode="unique" if unique else "cycle",
                seconds=seconds,
                threads=THREADS,
                connections=CONNECTIONS,
            )
            result["server_cpu_ms"] = (procs.cpu_seconds(pids) - cpu_before) * 1000 / max(1, result["requests"])
            if unique:
                cursors[name] += int(result["sent_per_thread"]) * THREADS
                fastest[0] = max(fastest[0], report.rate(result))
            return result

        # Warm-up: every worker imports the app lazily and fills its caches on its first requests.
        for name in targets:
            once(name, config.warm_up)
        for repeat in range(config.repeats):
            for name in targets:
                result = once(name, config.seconds)
                run.load.setdefault(name, []).append(result)
                print(f"  run {repeat + 1}/{config.repeats} {name:13s} {report.load_line(result)}", flush=True)
    finally:
        for server in targets.values():
            server.stop()
    run.pool_size = bench.pool.count if bench.pool else 0
    for name, results in run.load.items():
        for result in results:
            if result["non2xx"] or _socket_errors(result):
                run.problems.append(
                    f"{name}: {int(result['non2xx'])} non-2xx answers, {_socket_errors(result)} socket errors"
                )
            if not name.startswith("bare") and result["wrapped"]:
                run.notes.append(f"{name}: the pool wrapped in one run (some deliveries were duplicates)")


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


def _socket_errors(result: dict[str, float]) -> int:
    return int(result["connect_errors"] + result["read_errors"] + result["write_errors"] + result["timeouts"])


# --------------------------------------------------------------------------------------------------
# 2. end to end: accepted vs filed


def measure_e2e(bench: Bench, run: Run) -> None:
    count = bench.config.e2e_count
    pool = bench.ensure_pool(count)
    env = bench.env("e2e", fsync=True)
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
    message = big_message(BIG_MESSAGE_BYTES)
    body = encode_delivery(message, 9_000_001, EMAIL)
    headers = {"Content-Type": "application/json", **bench.signer.sign_headers(body, sha1=False)}
    stored = len(decode_base64(json.loads(body)["message"], field="message"))
    pool = bench.ensure_pool(1)
    warm_body, warm_headers = pool.read(0, 1)[0]
    targets = {
        "bare": ("bench.bare:app", bench.bare_env()),
        "full": (BRIDGE_APP, bench.env("memory", fsync=True)),
    }
    for name, (app, env) in targets.items():
        server = Gunicorn(f"memory-{name}", app, env, bench.log_dir, workers=1)
        try:
            server.start()
            (pid,) = server.worker_pids()
            status = _post(server.url, warm_body, warm_headers)
            if not 200 <= status < 300:
                raise BenchError(f"memory {name}: the warm-up request got {status}")
            procs.reset_peak_rss(pid)
            before = procs.status_kb(pid, "VmRSS")
            started = time.perf_counter()
            status = _post(server.url, body, headers)
            seconds = time.perf_counter() - started
            peak = procs.status_kb(pid, "VmHWM")
            after = procs.status_kb(pid, "VmRSS")
        finally:
            server.stop()
        if not 200 <= status < 300:
            run.problems.append(f"memory {name}: the 25 MB delivery got HTTP {status}")
        run.memory[name] = {
            "status": status,
            "message_bytes": stored,
            "request_bytes": len(body),
            "rss_before_kb": before,
            "peak_kb": peak,
            "rss_after_kb": after,
            "growth_bytes": (peak - before) * 1024,
            "seconds": seconds,
        }
    # Where the bridge's peak comes from: the same delivery through each stage, in-process.
    env = bench.env("memory-stages", fsync=True)
    run.stage_memory, run.cyclic_mib = measure_stage_memory(Settings.from_env(env), body, headers)


# --------------------------------------------------------------------------------------------------
# 4. where the time goes


def measure_where(bench: Bench, run: Run) -> None:
    runs = bench.config.stage_runs
    pool = bench.ensure_pool(3 * (runs + 3))
    env = bench.env("stages", fsync=True)
    deliveries = pool.read(0, 3 * (runs + 3))
    run.stages = measure_stages(Settings.from_env(env), deliveries, runs=runs, seconds=40)


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
    }


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per target")
    parser.add_argument("--e2e-count", type=int, default=2000, help="deliveries in the end-to-end run")
    parser.add_argument("--stage-runs", type=int, default=150, help="timed calls per stage")
    parser.add_argument("--no-nofsync", action="store_true", help="skip the BRIDGE_FSYNC=false target")
    parser.add_argument(
        "--experiment-workers", type=int, default=8, help="gunicorn workers of the extra full/bare pair (0: none)"
    )
    parser.add_argument("--known-messages", type=int, default=5000, help="screening: messages from known senders")
    parser.add_argument("--new-senders", type=int, default=300, help="screening: first-time senders (one scrypt each)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (numbers not comparable)")
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
        nofsync=not args.no_nofsync,
        write_results=not args.no_write,
        screening=ScreeningConfig(known_messages=args.known_messages, new_senders=args.new_senders),
        only=tuple(args.only or ()),
    )
    if config.only:
        config.write_results = False
    if args.quick:
        config.seconds, config.repeats, config.warm_up = 2.0, 1, 1.0
        config.e2e_count, config.stage_runs = 300, 20
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
            ("1/5 throughput and latency", measure_load),
            ("2/5 end to end (accepted vs filed)", measure_e2e),
            ("3/5 memory (one 25 MB message)", measure_memory),
            ("4/5 where the time goes (in-process)", measure_where),
            ("5/5 screening: the filing job in-process, then end to end", measure_screening),
        ]
        if config.only:
            sections = [(t, f) for (t, f), name in zip(sections, SECTIONS, strict=True) if name in config.only]
        try:
            bench.redis.start()
            print(f"bench: building signed deliveries in {tmp / 'pool'}", flush=True)
            bench.ensure_pool(max(config.e2e_count, 2000))
            for title, section in sections:
                print(f"bench: {title}", flush=True)
                section(bench, run)
        except (BenchError, ServerStartError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.redis.stop()
            logging.shutdown()
    run.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report.render(run, time.monotonic() - begin)
    print()
    print(text)
    if config.write_results:
        RESULTS.write_text(text)
        print(f"bench: wrote {RESULTS}")
    if run.problems:
        print("bench: something broke: " + "; ".join(run.problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
