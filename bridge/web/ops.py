"""Operations: health for load balancers and supervisors, metrics for Prometheus, the RQ dashboard.

``GET /healthz`` answers 200 while this process serves requests at all (a supervisor restarts it
otherwise); it asks no dependency. ``GET /readyz`` answers 200 when this process can take deliveries
(Redis and the object store answer), else 503 naming the one down: a load balancer sends Postal
elsewhere meanwhile. Neither depends on a worker running: the worker's health is in the metrics.

``GET /metrics`` is Prometheus's text format (``bridge.metrics``): the counters of every web and worker
process of this machine added up, and what Redis says at scrape time (the unfiled backlog and the age of
its oldest message, queue depths, failed jobs, worker heartbeats). With ``BRIDGE_METRICS_TOKEN`` set it
requires ``Authorization: Bearer <token>`` (401 otherwise); unset, it is open like ``/healthz``: it holds
counts only, no address or secret, and operators scrape from a private network (restrict it at the proxy).

The RQ dashboard is mounted at ``/rq`` behind HTTP basic auth (user ``admin``,
``BRIDGE_DASHBOARD_PASSWORD``) and only when that password is set.

What ``/rq`` answers besides the dashboard itself:

====  ==============================================================================================
code  when
====  ==============================================================================================
401   no or wrong operator password (always checked first)
403   a state-changing request (any method but GET/HEAD/OPTIONS) whose ``Origin`` -- or, without
      one, ``Referer`` -- is not this host, or that carries neither: a browser holding the operator's
      basic auth sends it along to any site's form or script, so the password alone cannot tell the
      operator's click from a hostile page's (cross-site request forgery)
405   ``GET``/``HEAD`` on "requeue all": rq-dashboard also accepts GET there, which an ``<img>`` tag
      on any page could fire; its own page uses POST
====  ==============================================================================================
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from bridge import logs, metrics
from bridge.context import Bridge
from bridge.store.index import REDIS_ERRORS, UNFILED
from bridge.store.objects import StorageUnavailable

blueprint = Blueprint("ops", __name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# rq-dashboard views that change state even on GET (its own JavaScript POSTs to them).
_CHANGES_STATE_ON_GET = frozenset({"rq_dashboard.requeue_all"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    checks = {}
    try:
        bridge.outbound_redis.ping()  # short timeouts: a load balancer's probe must not hang
        checks["redis"] = "ok"
    except REDIS_ERRORS:
        checks["redis"] = "unavailable"
    try:
        bridge.objects.check()
        checks["storage"] = "ok"
    except StorageUnavailable:
        checks["storage"] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ok" if ready else "unavailable", **checks})
    response.status_code = 200 if ready else 503
    return response


@blueprint.get("/metrics")
def scrape() -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    token = bridge.settings.metrics_token
    if token:
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return Response("metrics token required\n", 401, {"WWW-Authenticate": 'Bearer realm="metrics"'})
    live = CollectorRegistry(auto_describe=False)
    live.register(RedisGauges(bridge))
    if metrics.sharing():
        live.register(metrics.FileTotals(metrics.directories(bridge.settings.data_dir).values()))
        body = generate_latest(live)
    else:  # one process (tests, a debugger): its own counters
        body = generate_latest(REGISTRY) + generate_latest(live)
    return Response(body, 200, {"Content-Type": CONTENT_TYPE_LATEST})


@blueprint.before_app_request
def _started() -> None:
    g.metrics_started = time.monotonic()
    # Every line this request logs, and the jobs it queues, carry this id (``bridge.logs``).
    g.request_id_token = logs.REQUEST_ID.set(logs.new_request_id(request.headers.get("X-Request-Id")))


@blueprint.teardown_app_request
def _finished(exc: BaseException | None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        logs.REQUEST_ID.reset(token)  # gunicorn's threads serve one request after another


@blueprint.after_app_request
def _count(response: Response) -> Response:
    """Every answer by route template (never the path itself: it can carry ids) and status."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    metrics.REQUESTS.labels(route=route, method=method, status=str(response.status_code)).inc()
    request_id = logs.current_request_id()
    if request_id:
        response.headers["X-Request-Id"] = request_id
    started = g.get("metrics_started")
    if started is not None:
        metrics.REQUEST_SECONDS.labels(route=route).observe(time.monotonic() - started)
    return response


class RedisGauges(Collector):
    """What Redis says at scrape time: the worker's state, whichever machine it runs on.

    With Redis down only ``bridge_redis_up 0`` is reported (and the scrape is not held up: the
    short-timeout client answers within about a second).
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterable[Any]:
        try:
            families = list(self._from_redis(self.bridge.outbound_redis, time.time()))
        except REDIS_ERRORS:
            return [GaugeMetricFamily("bridge_redis_up", "1 when Redis answered this scrape", value=0)]
        return [GaugeMetricFamily("bridge_redis_up", "1 when Redis answered this scrape", value=1), *families]

    def _from_redis(self, connection: Any, now: float) -> Iterable[Any]:
        backlog = connection.zcard(UNFILED)
        oldest = connection.zrange(UNFILED, 0, 0, withscores=True)
        yield GaugeMetricFamily("bridge_unfiled_messages", "Stored messages not filed yet", value=backlog)
        yield GaugeMetricFamily(
            "bridge_unfiled_oldest_age_seconds",
            "Age of the oldest message waiting to be filed (0 when none waits)",
            value=max(0.0, now - oldest[0][1]) if oldest else 0.0,
        )
        depth = GaugeMetricFamily("bridge_rq_queue_jobs", "Jobs waiting in an RQ queue", labels=["queue"])
        failed = GaugeMetricFamily("bridge_rq_failed_jobs", "Jobs in an RQ queue's failed registry", labels=["queue"])
        started = GaugeMetricFamily("bridge_rq_started_jobs", "Jobs an RQ worker is running", labels=["queue"])
        scheduled = GaugeMetricFamily("bridge_rq_scheduled_jobs", "Jobs waiting for a retry", labels=["queue"])
        for queue in Queue.all(connection=connection):
            depth.add_metric([queue.name], queue.count)
            failed.add_metric([queue.name], FailedJobRegistry(queue=queue).get_job_count(cleanup=False))
            started.add_metric([queue.name], StartedJobRegistry(queue=queue).get_job_count(cleanup=False))
            scheduled.add_metric([queue.name], ScheduledJobRegistry(queue=queue).get_job_count(cleanup=False))
        yield from (depth, failed, started, scheduled)
        yield GaugeMetricFamily(
            "bridge_rq_workers", "Workers in RQ's worker registry", value=len(Worker.all(connection))
        )
        beats = connection.zrangebyscore(metrics.HEARTBEATS_KEY, now - metrics.HEARTBEAT_FORGET_SECONDS, "+inf",
                                         withscores=True)  # fmt: skip
        alive = [score for _, score in beats if now - score < 60]
        yield GaugeMetricFamily(
            "bridge_workers_alive", "Worker processes that beat within the last minute", value=len(alive)
        )
        yield GaugeMetricFamily(
            "bridge_worker_heartbeat_age_seconds",
            "Seconds since the most recent heartbeat of any worker process (-1: none ever beat)",
            value=now - max(score for _, score in beats) if beats else -1,
        )


def mount_dashboard(app: Flask, bridge: Bridge) -> None:
    """The RQ dashboard at /rq, for the operator only."""
    password = bridge.settings.dashboard_password
    if not password:
        return
    import rq_dashboard
    import rq_dashboard.web

    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = bridge.redis_url
    rq_dashboard.web.setup_rq_connection(app)  # what rq-dashboard's own app factory does

    @app.before_request
    def require_operator() -> Response | None:
        if request.blueprint != rq_dashboard.blueprint.name:
            return None
        auth = request.authorization
        if (
            auth is None
            or not hmac.compare_digest((auth.username or "").encode(), b"admin")
            or not hmac.compare_digest((auth.password or "").encode(), password.encode())
        ):
            return Response("operator login required\n", 401, {"WWW-Authenticate": 'Basic realm="rq"'})
        if request.method in SAFE_METHODS:
            if request.method != "OPTIONS" and request.endpoint in _CHANGES_STATE_ON_GET:
                return Response("use POST\n", 405, {"Allow": "POST"})
            return None
        if not same_origin(request.headers.get("Origin"), request.headers.get("Referer"), request.host):
            return Response("cross-site request refused\n", 403)
        return None

    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")


def _authority(url: str) -> str | None:
    """``host[:port]`` of an absolute http(s) URL, lower-cased, without a default port; None otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # a malformed port or bracket
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or str(port) == _DEFAULT_PORTS[parts.scheme]:
        return host
    return f"{host}:{port}"


def same_origin(origin: str | None, referer: str | None, host: str) -> bool:
    """Did the browser say this request comes from a page of this very host?

    ``Origin`` when present (browsers send it on every POST, same-origin ones included; "null" from a
    sandboxed or privacy-redirected page matches nothing), else ``Referer``; neither: no. Compared by
    host and port with the Host the request was sent to, not by scheme, because a TLS-terminating proxy
    hands the bridge plain HTTP: a page on another host or port is still refused.
    """
    claimed = origin if origin is not None else referer
    if not claimed or not host:
        return False
    source = _authority(claimed)
    target = _authority(f"http://{host}")
    if source is None or target is None:
        return False
    # The Host header names the port the client used: strip a default one as _authority did for http;
    # "https://h" (no port) and Host "h:443" are the same place too.
    return source == target or f"{source}:443" == target
