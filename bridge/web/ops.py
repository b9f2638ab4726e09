"""Operations: health for load balancers and the RQ dashboard for operators.

``GET /healthz`` answers 200 when Redis and the object store answer, else 503 with which one
failed. The RQ dashboard is mounted at ``/rq`` behind HTTP basic auth (user ``admin``,
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
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from bridge.context import Bridge
from bridge.store.index import REDIS_ERRORS
from bridge.store.objects import StorageUnavailable

blueprint = Blueprint("ops", __name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# rq-dashboard views that change state even on GET (its own JavaScript POSTs to them).
_CHANGES_STATE_ON_GET = frozenset({"rq_dashboard.requeue_all"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


@blueprint.get("/healthz")
def healthz() -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    checks = {}
    try:
        bridge.redis.ping()
        checks["redis"] = "ok"
    except REDIS_ERRORS:
        checks["redis"] = "unavailable"
    try:
        bridge.objects.check()
        checks["storage"] = "ok"
    except StorageUnavailable:
        checks["storage"] = "unavailable"
    healthy = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ok" if healthy else "degraded", **checks})
    response.status_code = 200 if healthy else 503
    return response


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
