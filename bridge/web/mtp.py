"""The Mailio transfer protocol's ingress: ``POST /api/v1/mtp/message``, ``/did`` and ``/handshake``.

Peers' servers call these, signed by their server keys (mtp-wire.md). The work is in
``bridge.mailio.accept`` and ``bridge.mailio.answers``; this module reads the body and maps outcomes:

====  =================================================================================================
code  when
====  =================================================================================================
202   ``/message``: stored and queued (or a delivery message applied), or a repeated id (nothing stored
      again): the body is our signed receipt for the same ``id``
200   ``/did``, ``/handshake``: our signed answer
400   not the envelope or payload the protocol says (the reason names the field); a body that ended early
401   the signature does not verify with the key ``senderDomain`` publishes (asked again once), or it
      publishes none
403   verified, but stale (outside BRIDGE_MTP_TIME_WINDOW), ``from`` not on ``senderDomain``, or a
      delivery message about a message we did not send to that server
408   the body did not arrive within BRIDGE_READ_TIMEOUT
413   over BRIDGE_MTP_MAX_BYTES (from ``Content-Length`` before reading, or while reading)
429   over BRIDGE_MTP_RATE_LIMIT requests a minute from that sender domain
503   Redis, the object store or DNS unreachable, or no server key: retry later
====  =================================================================================================

Errors are ``{"error": "<one line>"}``; nothing is stored for any of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from bridge.context import Bridge
from bridge.mailio import mtp
from bridge.mailio.accept import accept_message, server_key, signed_receipt
from bridge.mailio.answers import answer_did_lookup, answer_handshake_lookup
from bridge.web.postal import BodyIncomplete, BodyTooLarge, cut_off, read_body

log = logging.getLogger(__name__)
blueprint = Blueprint("mtp", __name__, url_prefix="/api/v1/mtp")


def _error(message: str, status: int) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(mtp.body_bytes(body), status=status, mimetype="application/json")


def _handle(where: str, work: Callable[[Bridge, bytes], tuple[dict[str, Any], int]]) -> Response:
    """Read the body within BRIDGE_MTP_MAX_BYTES, run ``work``, and answer its protocol errors."""
    bridge: Bridge = current_app.extensions["bridge"]
    limit = bridge.settings.mtp_max_bytes
    request.max_content_length = limit
    server_key(bridge)  # 503 now, before reading or storing anything, when we could not sign an answer
    try:
        body = read_body(limit)
    except BodyTooLarge:
        return _error(f"body is over {limit} bytes", 413)
    except BodyIncomplete:
        log.warning("mtp %s: request body incomplete, malformed or too slow", where)
        return cut_off()
    try:
        answer, status = work(bridge, bytes(body))
    except mtp.MtpError as exc:
        log.warning("mtp %s refused (%d): %s", where, exc.status, exc)
        return _error(str(exc), exc.status)
    return _json(answer, status)


def _message(bridge: Bridge, body: bytes) -> tuple[dict[str, Any], int]:
    accepted = accept_message(bridge, body)
    return signed_receipt(bridge, accepted.id), 202


@blueprint.post("/message")
def message() -> Response:
    return _handle("message", _message)


@blueprint.post("/did")
def did_lookup() -> Response:
    return _handle("did", lambda bridge, body: (answer_did_lookup(bridge, body), 200))


@blueprint.post("/handshake")
def handshake_lookup() -> Response:
    return _handle("handshake", lambda bridge, body: (answer_handshake_lookup(bridge, body), 200))
