"""Operations: health for load balancers and the RQ dashboard for operators.

``GET /healthz`` answers 200 when Redis and the object store answer, else 503 with which one
failed. The RQ dashboard is mounted at ``/rq`` behind HTTP basic auth (user ``admin``,
``BRIDGE_DASHBOARD_PASSWORD``) and only when that password is set.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from bridge.context import Bridge
from bridge.store.index import REDIS_ERRORS
from bridge.store.objects import StorageUnavailable

blueprint = Blueprint("ops", __name__)


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
        return None

    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
