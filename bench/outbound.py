"""``make bench``'s outbound part (``python -m bench.outbound``): the bridge's own cost per SMTP delivery,
a 1,000-recipient message, and RQ's own share.

Issue 7's goal: the bridge's overhead per outbound delivery, beyond Postal's round trip, under 2 ms. Measured
in one run against one local send-API server (tests/postal_api.py, written from postal.md):

* **bare**: N ``POST /api/v1/send/raw`` calls made directly with requests (a new connection each, as the
  bridge's client makes them), the same ~2 KB message each time;
* **bridge**: N messages submitted through ``POST /api/v1/messages`` beforehand (untimed: that is the API's
  share), then the worker's job timed in-process as the worker runs it: routing (discovery, cached after the
  first) and the first call to Postal in the same job (routes and the attempt marked before the call, marked
  after it with Postal's ids, the spool read and deleted). Every message goes to one recipient: the first also
  runs the contacts job, one scrypt for the contact book (~150 ms, the same price as for a new sender), which is
  reported apart, not hidden in the rate;
* **50 recipients**: the same with every message to 50 recipients (one call to Postal for all 50), against
  bare calls carrying the same 50 recipients: the overhead per recipient is what "per delivery" means for mail
  to several people;
* **RQ's share**: the same number of jobs that do nothing, queued and run by the same worker, so that the part
  of the overhead that is RQ's own bookkeeping (per job, whatever it does) shows apart from the bridge's code;
* a round's clock stops when its last job ends: a burst worker's exit (it joins its pub/sub thread, ~1 s) is not
  a cost per delivery, and in reports before 2026-11-30 17:53 it was counted in both the bridge's and RQ's rows;
* **cached discovery**: ``discover()`` of a domain already looked up, as the routing job calls it (answered
  from the process's memory for up to a second, else from Redis), beside the same lookup with the memory
  turned off (from Redis) and a plain Redis GET of the same entry;
* **1,000 recipients**: one message to 1,000 addresses at one SMTP domain, submitted through the API (timed),
  then the routing job (which makes the 20 calls to Postal) timed; reported: the 202, that job, the time from
  the 202 until every recipient is ``accepted`` (read back through the status API, all 1,000), the number of
  calls Postal got (goal: 20 of 50). The contacts job it queues (1,000 scrypts, off the path) is not run.

Rounds are interleaved (bare, bridge, bare, bridge, ...) and medians reported. Everything runs on 127.0.0.1:
a private redis-server, the suite's Knot (one MX record), the send-API server in this process. It writes
bench/OUTBOUND.md and prints it.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from rq import SimpleWorker

from bridge import context, create_app
from bridge.jobs.queue import enqueue
from bridge.mailio.discovery import CACHE_PREFIX, Discovery
from bridge.mailio.identity import generate_user_keys
from bridge.settings import Settings
from tests.dns_server import KnotServer
from tests.postal_api import API_KEY, PostalSendAPI
from tests.servers import RedisServer

DOMAIN = "example.test"
RECIPIENT = "reader@out.peer.test"
THOUSAND_DOMAIN = "many.peer.test"
OUT = Path(__file__).resolve().parent / "OUTBOUND.md"
JOBS_PER_MESSAGE = 1  # routing, which makes the first call to Postal (the contacts job: only for new recipients)
MANY = [f"r{n:02d}@out.peer.test" for n in range(50)]  # one call to Postal for all 50


class TimedWorker(SimpleWorker):
    """RQ's SimpleWorker noting when its last job ended (``ended``: wall clock and CPU)."""

    ended = (0.0, 0.0)

    def execute_job(self, job: Any, queue: Any) -> None:
        super().execute_job(job, queue)
        self.ended = (time.perf_counter(), time.process_time())


def _run_worker(bridge: Any) -> tuple[float, float]:
    """Run the queue empty in this process; seconds from the start until the last job ended (wall, CPU)."""
    worker = TimedWorker([bridge.queue], connection=bridge.redis)
    started, cpu = time.perf_counter(), time.process_time()
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    return worker.ended[0] - started, worker.ended[1] - cpu


def _bare_round(url: str, count: int, message: bytes, rcpts: list[str]) -> tuple[float, float]:
    """Seconds per call of ``count`` direct send/raw calls to ``rcpts``: wall clock, and this process's CPU (the
    client's and the send-API server's, which runs in this process too)."""
    body = {"mail_from": f"owner@{DOMAIN}", "rcpt_to": rcpts, "data": base64.b64encode(message).decode()}
    headers = {"X-Server-API-Key": API_KEY, "Connection": "close"}
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        answer = requests.post(f"{url}/api/v1/send/raw", json=body, headers=headers, timeout=10)
        if answer.json().get("status") != "success":
            raise RuntimeError(f"bare call refused: {answer.text[:200]}")
    return (time.perf_counter() - started) / count, (time.process_time() - cpu) / count


def _bridge_round(
    client: Any, bridge: Any, auth: dict[str, str], count: int, postal: PostalSendAPI, rcpts: list[str]
) -> tuple[float, float]:
    """Seconds per message of the worker's jobs for ``count`` submitted messages to ``rcpts`` (submission
    untimed): wall clock and CPU, as ``_bare_round``."""
    before = {rcpt: postal.accepted[rcpt] for rcpt in rcpts}
    for n in range(count):
        answer = client.post(
            "/api/v1/messages", json={"to": rcpts, "subject": f"bench {n}", "text": "x" * 1500}, headers=auth
        )
        if answer.status_code != 202:
            raise RuntimeError(f"submission refused: {answer.status_code} {answer.get_data()[:200]!r}")
    elapsed, cpu = _run_worker(bridge)
    if any(postal.accepted[rcpt] - before[rcpt] != count for rcpt in rcpts):
        raise RuntimeError(f"Postal did not accept each of {len(rcpts)} recipients {count} times")
    return elapsed / count, cpu / count


def noop() -> None:
    """A job that does nothing: what RQ costs per job by itself."""


def _noop_round(bridge: Any, count: int) -> tuple[float, float]:
    """Seconds per job of ``count`` queued no-op jobs, run by the worker (queueing untimed, as above)."""
    for _ in range(count):
        enqueue(bridge, "bench.outbound.noop")
    elapsed, cpu = _run_worker(bridge)
    return elapsed / count, cpu / count


def _discovery(bridge: Any, rounds: int, count: int = 2000) -> dict[str, list[float]]:
    """Seconds per cached lookup: from memory (as deployed), from Redis alone, and a bare Redis GET."""
    domain = RECIPIENT.rpartition("@")[2]
    shared = Discovery(bridge.resolver, bridge.redis, local_seconds=0)
    bridge.discovery.discover(domain)  # cached by the bridge's routing jobs already; this makes sure
    if not shared.discover(domain).cached or not bridge.discovery.discover(domain).cached:
        raise RuntimeError("the discovery bench's domain is not cached")
    ways = {
        "memory": lambda: bridge.discovery.discover(domain),
        "redis": lambda: shared.discover(domain),
        "get": lambda: bridge.redis.get(CACHE_PREFIX + domain),
    }
    result: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, call in ways.items():
            started = time.perf_counter()
            for _ in range(count):
                call()
            result[name].append((time.perf_counter() - started) / count)
    return result


def _thousand(client: Any, bridge: Any, auth: dict[str, str], postal: PostalSendAPI) -> dict[str, float]:
    """One message to 1,000 recipients: the 202, the routing job, 202 -> all accepted, Postal's calls."""
    recipients = [f"r{n:04d}@{THOUSAND_DOMAIN}" for n in range(1000)]
    before = {rcpt: postal.accepted[rcpt] for rcpt in recipients}
    calls_before = sum(1 for seen in postal.seen if seen.path == "/api/v1/send/raw")
    started = time.perf_counter()
    answer = client.post(
        "/api/v1/messages", json={"to": recipients, "subject": "all", "text": "x" * 1500}, headers=auth
    )
    accepted_at = time.perf_counter()
    if answer.status_code != 202:
        raise RuntimeError(f"submission refused: {answer.status_code} {answer.get_data()[:200]!r}")
    msg_id = answer.get_json()["id"]
    worker = SimpleWorker([bridge.queue], connection=bridge.redis)
    routing = time.perf_counter()
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING", max_jobs=1)  # routing and the 20 calls
    routed_at = time.perf_counter()
    status = client.get(f"/api/v1/messages/{msg_id}", headers=auth).get_json()["recipients"]
    done_at = time.perf_counter()
    states = {entry["state"] for entry in status}
    once = all(postal.accepted[rcpt] == before[rcpt] + 1 for rcpt in recipients)
    if len(status) != 1000 or states != {"accepted"} or not once:
        raise RuntimeError(f"not every recipient accepted: {len(status)} listed, states {states}")
    bridge.queue.empty()  # the contacts job: 1,000 scrypts, not part of the way to Postal
    calls = sum(1 for seen in postal.seen if seen.path == "/api/v1/send/raw") - calls_before
    return {
        "post": accepted_at - started,
        "route": routed_at - routing,
        "all_accepted": done_at - accepted_at,
        "calls": calls,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbound", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=150, help="deliveries per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bridge-bench-out-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(root / "redis").start()
        knot = KnotServer(root / "knot")
        try:
            dns = knot.start()
            dns.set("out.peer.test", "MX", "10 mx.peer.test.", ttl=3600)  # cached for the whole run
            dns.set(THOUSAND_DOMAIN, "MX", "10 mx.peer.test.", ttl=3600)
            with PostalSendAPI(verified_domains=(DOMAIN,)) as postal:
                result = _measure(root, redis_server.url, dns.nameserver, postal, args.count, args.rounds)
        finally:
            knot.stop()
            redis_server.stop()
    text = _report(result, args.count, args.rounds)
    OUT.write_text(text)
    print(text)
    return 0


def _measure(root: Path, redis_url: str, nameserver: str, postal: PostalSendAPI, count: int, rounds: int) -> dict:
    env = {
        "BRIDGE_DOMAIN": DOMAIN,
        "BRIDGE_DATA_DIR": str(root / "data"),
        "BRIDGE_REDIS_URL": redis_url,
        "BRIDGE_DNS_NAMESERVERS": nameserver,
        "BRIDGE_POSTAL_URL": postal.url,
        "BRIDGE_POSTAL_API_KEY": API_KEY,
        "BRIDGE_SEND_LIMIT_MESSAGES": "1000000",
        "BRIDGE_SEND_LIMIT_RECIPIENTS": "1000000",
        "BRIDGE_LOG_LEVEL": "WARNING",
    }
    app = create_app(Settings.from_env(env))
    bridge = app.extensions["bridge"]
    context.use(bridge)
    keys = generate_user_keys()
    mailbox = bridge.mailboxes.add(f"owner@{DOMAIN}", keys.ed25519_public, keys.x25519_public)
    auth = {"Authorization": f"Bearer {bridge.mailboxes.issue_token(mailbox)}"}
    client = app.test_client()
    message = f"From: owner@{DOMAIN}\r\nTo: {RECIPIENT}\r\nSubject: bench\r\n\r\n{'x' * 1500}\r\n".encode()
    # The first message to new recipients pays their contact-book scrypts and the first discovery: apart.
    first = _bridge_round(client, bridge, auth, 1, postal, [RECIPIENT])[0]
    _bridge_round(client, bridge, auth, 1, postal, MANY)
    fewer = max(1, count // 5)  # messages per 50-recipient round
    bare, full, unsynced, rq, bare50, full50 = [], [], [], [], [], []
    for _ in range(rounds):
        bare.append(_bare_round(postal.url, count, message, [RECIPIENT]))
        full.append(_bridge_round(client, bridge, auth, count, postal, [RECIPIENT]))
        bridge.objects.fsync = False  # the file store's switch (BRIDGE_FSYNC), for this round only
        unsynced.append(_bridge_round(client, bridge, auth, count, postal, [RECIPIENT]))
        bridge.objects.fsync = True
        wall, cpu = _noop_round(bridge, count * JOBS_PER_MESSAGE)
        rq.append((wall * JOBS_PER_MESSAGE, cpu * JOBS_PER_MESSAGE))
        bare50.append(_bare_round(postal.url, fewer, message, MANY))
        full50.append(_bridge_round(client, bridge, auth, fewer, postal, MANY))
    thousand = [_thousand(client, bridge, auth, postal) for _ in range(max(1, rounds))]
    discovery = _discovery(bridge, rounds)
    context.use(None)
    return {
        "first": first,
        "bare": bare,
        "full": full,
        "unsynced": unsynced,
        "rq": rq,
        "bare50": bare50,
        "full50": full50,
        "fewer": fewer,
        "thousand": thousand,
        "discovery": discovery,
    }


def _report(result: dict, count: int, rounds: int) -> str:
    def ms(name: str, which: int) -> float:
        return statistics.median(pair[which] for pair in result[name]) * 1000

    bare, full, rq, unsynced = (ms(name, 0) for name in ("bare", "full", "rq", "unsynced"))
    bare_cpu, full_cpu, rq_cpu, unsynced_cpu = (ms(name, 1) for name in ("bare", "full", "rq", "unsynced"))
    n50 = len(MANY)
    bare50, full50 = ms("bare50", 0) / n50, ms("full50", 0) / n50  # per recipient
    bare50_cpu, full50_cpu = ms("bare50", 1) / n50, ms("full50", 1) / n50
    over50 = full50 - bare50
    goal50 = "< 2 ms beyond the round trip: " + ("met" if over50 < 2.0 else "**missed**")
    overhead, cpu_overhead = full - bare, full_cpu - bare_cpu
    goal = "< 2 ms beyond the round trip: " + ("met" if overhead < 2.0 else "**missed**")
    runs = " / ".join(
        f"{b[0] * 1000:.2f} vs {f[0] * 1000:.2f} (no fsync {u[0] * 1000:.2f}, RQ {q[0] * 1000:.2f})"
        for b, f, u, q in zip(result["bare"], result["full"], result["unsynced"], result["rq"], strict=True)
    )
    many = result["thousand"]

    def med(name: str) -> float:
        return statistics.median(t[name] for t in many)

    calls = sorted({int(t["calls"]) for t in many})
    disc = {name: statistics.median(values) * 1000 for name, values in result["discovery"].items()}
    disc_goal = "met" if disc["memory"] < 0.2 else "**missed**"
    calls_goal = "met" if calls == [20] else "**missed**"
    return f"""# `python -m bench.outbound`: the bridge's cost per SMTP delivery

- Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; {rounds} interleaved rounds of {count} deliveries;
  load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.
- CPU is this process's (``time.process_time``): steadier than the wall clock on a shared machine, but it
  leaves out Redis's and the kernel's work for other processes.
- bare: direct send/raw calls to the local send-API server; bridge: the worker's job (routing and the first call
  to Postal in one job) for messages submitted beforehand, in-process (RQ SimpleWorker, burst; timed until the
  last job ended), same server, same recipient; RQ: {JOBS_PER_MESSAGE} job that does nothing per message, run the
  same way (RQ's own bookkeeping per message).
- Store: the filesystem store with fsync (the default; one round each with it off), Redis on loopback;
  2 cores shared with other test suites: compare within a run.

| ms per delivery, medians of rounds | bare (HTTP round trip) | bridge | overhead | goal |
|---|---|---|---|---|
| wall clock | {bare:.2f} | {full:.2f} | {overhead:.2f} ms ({full / bare:.1f}x) | {goal} |
| of which RQ's own ({JOBS_PER_MESSAGE} empty job per message) | | {rq:.2f} | {rq:.2f} ms | |
| the bridge's code beyond RQ and the round trip | | | {overhead - rq:.2f} ms | |
| wall clock, the store's fsync off | | {unsynced:.2f} | {unsynced - bare:.2f} ms | |
| CPU of this process (worker and send-API server) | {bare_cpu:.2f} | {full_cpu:.2f} | {cpu_overhead:.2f} ms | |
| of which RQ's own | | {rq_cpu:.2f} | {rq_cpu:.2f} ms | |
| CPU, the store's fsync off | | {unsynced_cpu:.2f} | {unsynced_cpu - bare_cpu:.2f} ms | |

One message to {n50} recipients, one call to Postal for all ({result["fewer"]} messages a round), against bare calls
with the same {n50} recipients:

| ms per recipient, medians of rounds | bare (HTTP round trip / {n50}) | bridge | overhead | goal |
|---|---|---|---|---|
| wall clock | {bare50:.3f} | {full50:.3f} | {over50:.3f} ms ({full50 / bare50:.1f}x) | {goal50} |
| CPU of this process | {bare50_cpu:.3f} | {full50_cpu:.3f} | {full50_cpu - bare50_cpu:.3f} ms | |
| per message of {n50} (wall) | {bare50 * n50:.2f} | {full50 * n50:.2f} | {over50 * n50:.2f} ms | |

Per round (bare vs bridge, ms, and RQ's share): {runs}. Every bridge round's messages were accepted by the
server exactly once each (checked). The first message to a new recipient took {result["first"] * 1000:.0f} ms
(its contact-book scrypt and a cold discovery), not counted above.

## Cached discovery lookup ({rounds} rounds of 2,000, medians)

| measure | ms per lookup | goal |
|---|---|---|
| `discover()` as the routing job calls it (memory for 1 s, then Redis) | {disc["memory"]:.4f} | < 0.2 ms: {disc_goal} |
| the same from Redis only (`local_seconds=0`) | {disc["redis"]:.3f} | |
| a plain Redis GET of the same entry (baseline) | {disc["get"]:.3f} | |

## One message to 1,000 recipients ({len(many)} runs, medians)

| measure | value | goal |
|---|---|---|
| `POST /api/v1/messages` to 202 (sealed copy, spool, record of 1,000) | {med("post") * 1000:.0f} ms | |
| routing job (one discovery, 1,000 routes, the 20 calls to Postal) | {med("route") * 1000:.0f} ms | |
| from the 202 until all 1,000 are `accepted` (read back via the API) | {med("all_accepted") * 1000:.0f} ms | |
| calls to Postal's send API | {", ".join(map(str, calls))} | 20 (50 recipients each): {calls_goal} |
"""


if __name__ == "__main__":
    raise SystemExit(main())
