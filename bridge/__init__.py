"""The Mailio bridge for Postal.

``create_app`` is the only place that wires settings, stores and blueprints together; the
worker builds the same ``Bridge`` through ``bridge.context``. Imports run one way:
web -> inbound/jobs -> store/postal/mailio -> sealing/mail -> settings.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from bridge.context import Bridge
from bridge.errors import DependencyUnavailable
from bridge.settings import Settings
from bridge.store.objects import StorageUnavailable

log = logging.getLogger("bridge")


def configure_logging(settings: Settings) -> None:
    """JSON lines (or text, BRIDGE_LOG_FORMAT) on stderr, the same in web and worker (``bridge.logs``)."""
    from bridge import logs

    logs.configure(settings.log_level, settings.log_format)
    # dkimpy logs every sender's broken signature at ERROR: the verdict on the record says it all.
    logging.getLogger("dkimpy").setLevel(logging.CRITICAL)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging(settings)
    bridge = Bridge(settings)
    _ = bridge.redis_url  # fail at start-up, not on the first request, when Redis is not configured
    _ = bridge.peers  # built now, so that BRIDGE_ALLOW_INSECURE_PEERS is announced at start
    from bridge.web import api, events, openapi, ops, postal, recipients, send, wellknown
    from bridge.web import mtp as mtp_web
    from bridge.web.deadlines import deadlines
    from bridge.web.postal import request_limit

    deadlines.seconds = settings.read_timeout  # enforced by the gunicorn worker (bridge.web.server)
    app = Flask(__name__)
    app.config["MAX_FORM_MEMORY_SIZE"] = None
    # Bounds bodies sent without a Content-Length too (chunked); the Postal view checks earlier.
    app.config["MAX_CONTENT_LENGTH"] = request_limit(settings.max_message_bytes)
    app.extensions["bridge"] = bridge

    app.register_blueprint(postal.blueprint)
    app.register_blueprint(events.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(send.blueprint)
    app.register_blueprint(recipients.blueprint)
    app.register_blueprint(openapi.blueprint)
    app.register_blueprint(mtp_web.blueprint)
    app.register_blueprint(wellknown.blueprint)
    app.register_blueprint(ops.blueprint)
    ops.mount_dashboard(app, bridge)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = jsonify({"error": (exc.name or "error").lower()})
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(DependencyUnavailable)
    @app.errorhandler(StorageUnavailable)
    def dependency_down(exc: Exception) -> Response:
        log.error("dependency unavailable: %s", exc.__class__.__name__)
        response = jsonify({"error": "a dependency is unavailable, retry later"})
        response.status_code = 503
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # A bug, not a dependency: 500 (a 503 would have Postal retry a hopeless delivery for a day and
        # hide the bug). One line, no traceback and no message (it could carry data): class and place.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
        log.error("unexpected %s at %s", exc.__class__.__name__, where)
        response = jsonify({"error": "internal error"})
        response.status_code = 500
        return response

    return app
