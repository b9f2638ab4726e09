"""Every Prometheus metric of the bridge, in one place, and how the processes of one machine share them.

Call sites count with one line (``metrics.DELIVERIES.labels(outcome="stored").inc()``); ``GET /metrics``
(``bridge.web.ops``) serves them. Label values are always a fixed, small vocabulary (route templates,
outcomes, folder and rule names, state names): never an address, a domain a user chose, a KID, a token
or anything else a sender or a user controls, so the series stay few and the scrape holds no secret.

Several processes: gunicorn runs ``BRIDGE_WEB_WORKERS`` processes and the RQ worker is another, so each
process writes its counters into memory-mapped files (prometheus-client's multiprocess mode) under
``BRIDGE_DATA_DIR/metrics/{web,worker}`` and every scrape, answered by whichever web process, adds up
all files of both directories: the totals of the whole machine. ``share_through`` switches a process
to that mode; it must run before the process first uses a metric (gunicorn.conf.py for the web
processes, ``bridge.worker`` for the worker). That is also why every metric here has at least one
label: the value of a metric without labels would be created at import, before the switch.

What the worker does to mail across machines (the backlog and its age, queue depths, failed jobs,
worker heartbeats) is read from Redis at scrape time instead, so any web process of any machine shows
it; ``worker_heartbeat`` is the worker's half of that.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --------------------------------------------------------------------------- web
REQUESTS = Counter(
    "bridge_http_requests", "HTTP requests answered, by route template and status", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "bridge_http_request_duration_seconds", "Time to answer a request, by route template", ["route"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip

# --------------------------------------------------------------------------- Postal ingress
#: reason: unsigned, unknown_kid, bad_signature, malformed (see ``signature_reason``)
SIGNATURE_FAILURES = Counter(
    "bridge_postal_signature_failures", "Postal requests refused 401, by endpoint and reason", ["endpoint", "reason"]
)
#: outcome: stored, duplicate, unknown_recipient, too_large, malformed, incomplete, unavailable
DELIVERIES = Counter("bridge_postal_deliveries", "Postal deliveries to /postal/inbound, by outcome", ["outcome"])
STORED_BYTES = Counter(
    "bridge_stored_message_bytes", "Bytes of messages stored (their size before sealing), by source", ["source"]
)
#: outcome: ok, failed, shared (another process's last good set adopted)
JWKS_FETCHES = Counter("bridge_postal_jwks_fetches", "Fetches of Postal's JWKS, by outcome", ["outcome"])

# --------------------------------------------------------------------------- worker
FILING_SECONDS = Histogram(
    "bridge_filing_batch_duration_seconds", "Duration of one filing batch (its count: batches), by job", ["job"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0, 180.0),
)  # fmt: skip
FILED = Counter("bridge_filed_messages", "Messages filed or re-filed, by job", ["job"])
SCREENING = Counter("bridge_screening_decisions", "Screening decisions, by folder and rule", ["folder", "rule"])

# --------------------------------------------------------------------------- DNS
#: outcome: answer, nodata, nxdomain, timeout, servfail, error, skipped (zone recently unreachable), budget_spent
DNS_LOOKUPS = Counter("bridge_dns_lookups", "DNS lookups, by outcome", ["outcome"])
DNS_CACHE_HITS = Counter("bridge_dns_cache_hits", "DNS lookups answered from the resolver's cache", ["rdtype"])

# --------------------------------------------------------------------------- outbound
#: state: every recipient state of ``bridge.store.outbound_states`` a recipient moves into
OUTBOUND_RECIPIENTS = Counter(
    "bridge_outbound_recipient_states", "Outbound recipients moving into a state, by state", ["state"]
)
#: call: send/raw, messages/message, messages/deliveries; outcome: ok, permanent, temporary, uncertain
POSTAL_CALLS = Counter("bridge_postal_api_calls", "Calls to Postal's API, by call and outcome", ["call", "outcome"])
#: outcome: 2xx, 4xx, 5xx (the peer's answer) or refused (the SSRF guard), unavailable, answer_too_large,
#: error (see ``peer_call``); never a peer's name
PEER_CALLS = Counter("bridge_peer_calls", "Calls to other Mailio servers (MTP), by outcome", ["outcome"])


# --------------------------------------------------------------------------- helpers for call sites
_SIGNATURE_REASONS = {
    "missing signature": "unsigned",
    "unknown signing key": "unknown_kid",
    "signature does not match": "bad_signature",
}


def signature_reason(message: str) -> str:
    """The label for a ``SignatureError``'s message (its messages are fixed strings, never input)."""
    return _SIGNATURE_REASONS.get(message, "malformed")


_F = TypeVar("_F", bound=Callable[..., Any])


def postal_call(func: _F) -> _F:
    """Count a ``PostalClient._call``: its path is the call, the class of a Failure (or ok) the outcome."""

    @wraps(func)
    def counted(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        result = func(self, path, *args, **kwargs)
        outcome = getattr(result, "outcome", "ok")  # Permanent, Temporary and Uncertain say which they are
        POSTAL_CALLS.labels(call=path.removeprefix("/api/v1/"), outcome=outcome).inc()
        return result

    return counted  # type: ignore[return-value]


def peer_call(func: _F) -> _F:
    """Count a ``PeerClient.request``: the answer's status class, or the ``Peer...`` error it raised."""

    @wraps(func)
    def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            response = func(*args, **kwargs)
        except Exception as exc:
            name = type(exc).__name__
            known = name.startswith("Peer") and name != "PeerError"
            outcome = re.sub(r"(?<!^)(?=[A-Z])", "_", name.removeprefix("Peer")).lower() if known else "error"
            PEER_CALLS.labels(outcome=outcome).inc()
            raise
        PEER_CALLS.labels(outcome=f"{int(getattr(response, 'status', 0)) // 100}xx").inc()
        return response

    return counted  # type: ignore[return-value]


# --------------------------------------------------------------------------- worker heartbeats (Redis)
HEARTBEATS_KEY = "bridge:workers:heartbeat"
#: A heartbeat older than this is dropped from Redis at the next beat (a worker gone for good).
HEARTBEAT_FORGET_SECONDS = 86400


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_heartbeat(connection: Any, name: str | None = None, now: float | None = None) -> None:
    """Note that this worker process is alive (its housekeeping thread calls this every second or so)."""
    now = time.time() if now is None else now
    pipe = connection.pipeline(transaction=False)
    pipe.zadd(HEARTBEATS_KEY, {name or worker_name(): now})
    pipe.zremrangebyscore(HEARTBEATS_KEY, "-inf", now - HEARTBEAT_FORGET_SECONDS)
    pipe.execute()


def forget_worker(connection: Any, name: str | None = None) -> None:
    """A worker that stops on purpose leaves no stale heartbeat behind."""
    connection.zrem(HEARTBEATS_KEY, name or worker_name())


# --------------------------------------------------------------------------- processes sharing counters
def directories(data_dir: Path) -> dict[str, Path]:
    """Where web and worker processes of this machine keep their counter files."""
    return {"web": data_dir / "metrics" / "web", "worker": data_dir / "metrics" / "worker"}


def clear(directory: Path) -> None:
    """Start a directory afresh (the web master at start; ``make run`` for both)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def share_through(directory: Path) -> None:
    """Write this process's (and its forked children's) counters into files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()


def sharing() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def process_died(pid: int) -> None:
    """gunicorn's ``child_exit``: a dead worker's live gauges no longer count (its counters still do)."""
    if sharing():
        mark_process_dead(pid)


class FileTotals(Collector):
    """The sum of every process's counter files in some directories (prometheus-client's merge)."""

    def __init__(self, dirs: Iterable[Path]) -> None:
        self.dirs = list(dirs)

    def collect(self) -> Iterable[Any]:
        files = sorted(f for d in self.dirs for f in glob.glob(os.path.join(d, "*.db")))
        return MultiProcessCollector.merge(files, accumulate=True)


def all_metrics() -> list[MetricWrapperBase]:
    return [m for m in globals().values() if isinstance(m, MetricWrapperBase)]


for _metric in all_metrics():
    assert _metric._labelnames, f"{_metric._name} needs a label (see the module docstring)"
