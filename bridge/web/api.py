"""The mailbox owner's API: messages, folders, handshakes and handshake offers under ``/api/v1``.

Authenticated by a bearer token (``mailio-bridge mailbox token EMAIL``; ``bridge.store.tokens``: named,
listed with its last use, revocable one by one, checked against the store on every request so that a
revoked token is refused at once by every process). A mailbox sees only
its own mail: every lookup is scoped to the token's mailbox, so another mailbox's message id
is simply not found (404), never forbidden (which would confirm it exists).

====  ======================================================
code  when
====  ======================================================
200   the listing or the message
201   a new handshake stored, an offer created
400   a bad query parameter or body (not JSON, nested too deeply to parse, wrong shape); a malformed
      handshake, or one dated more than a few minutes in the future
401   no, unknown or revoked bearer token (or its mailbox was removed)
403   a handshake not signed by this mailbox's key, or older than the one stored
404   no such message in this mailbox
411   a request body without a Content-Length
413   a request body over 64 KB
503   Redis or the object store is unreachable (never for a bad request: every malformed input is a 4xx)
====  ======================================================
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from bridge.context import Bridge
from bridge.jobs.queue import enqueue
from bridge.mailio.handshakes import HandshakeError, parse_signed_handshake
from bridge.store.handshakes import CREATED, UNCHANGED, StaleHandshake
from bridge.store.mailboxes import Mailbox
from bridge.store.messages import FOLDERS, STATUS_FILED, is_message_id
from bridge.store.outbound import public_recipients

blueprint = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_PAGE = 200


def error(message: str, status: int) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mailio-bridge"'
    return response


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticated_mailbox(bridge: Bridge) -> Mailbox | None:
    token = _bearer_token()
    return bridge.mailboxes.authenticate(token) if token else None


def _bridge() -> Bridge:
    return current_app.extensions["bridge"]


def owner_only(view: Callable[..., Response]) -> Callable[..., Response]:
    """Authenticate the bearer token first; the view gets the bridge and the token's mailbox.

    A successful answer records the token's last use (``mailbox tokens`` shows it); a refused or
    malformed request records nothing.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Response:
        bridge = _bridge()
        token = _bearer_token()
        mailbox = bridge.mailboxes.authenticate(token) if token else None
        if token is None or mailbox is None:
            return error("missing or unknown bearer token", 401)
        response = view(bridge, mailbox, *args, **kwargs)
        if response.status_code < 400:
            bridge.mailboxes.note_token_use(token)
        return response

    return wrapper


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "folder": record.get("folder"), **record}


@blueprint.get("/messages")
@owner_only
def list_messages(bridge: Bridge, mailbox: Mailbox) -> Response:
    folder = request.args.get("folder", "inbox")
    if folder not in FOLDERS:
        return error(f"unknown folder; one of: {', '.join(FOLDERS)}", 400)
    try:
        limit = int(request.args.get("limit", "50"))
        before = float(request.args["before"]) if "before" in request.args else None
    except ValueError:
        return error("limit must be a whole number and before a cursor from a previous page", 400)
    if before is not None and not math.isfinite(before):
        return error("before must be a cursor from a previous page", 400)
    if not 1 <= limit <= MAX_PAGE:
        return error(f"limit must be between 1 and {MAX_PAGE}", 400)
    records, cursor = bridge.index.listing(mailbox.address, folder, limit=limit, before=before)
    return jsonify({"messages": [_public(r) for r in records], "next": cursor})


@blueprint.get("/messages/<msg_id>")
@owner_only
def get_message(bridge: Bridge, mailbox: Mailbox, msg_id: str) -> Response:
    if not is_message_id(msg_id):
        return error("no such message", 404)
    body = bridge.messages.get_body(mailbox.address, msg_id)
    record = bridge.messages.get_record(mailbox.address, msg_id, body=body) if body else None
    if record is None or body is None:
        return error("no such message", 404)
    if record.get("source") == "owner":  # sent mail: each recipient's delivery state
        sent = bridge.outbound.get(mailbox.address, msg_id)
        record = {**record, "recipients": public_recipients(sent) if sent else []}
    # The sealed body is stored as compact JSON already: splice it in rather than re-encoding it.
    head = json.dumps(_public(record), separators=(",", ":"))
    return Response([head[:-1].encode(), b',"body":', body, b"}"], mimetype="application/json")


# --- moving mail between folders ------------------------------------------------------------------


@blueprint.post("/messages/<msg_id>/move")
@owner_only
def move_message(bridge: Bridge, mailbox: Mailbox, msg_id: str) -> Response:
    if refused := _unreadable_body():
        return refused
    data = _json_body()
    folder = data.get("folder") if isinstance(data, dict) else None
    if folder not in FOLDERS:
        return error(f'give {{"folder": ...}}, one of: {", ".join(FOLDERS)}', 400)
    record = bridge.messages.get_record(mailbox.address, msg_id) if is_message_id(msg_id) else None
    if record is None:
        return error("no such message", 404)
    previous = record.get("folder")
    record.update(folder=folder, status=STATUS_FILED, moved_by_owner=True, reason="moved by the owner")
    bridge.messages.put_record(record)  # the object store keeps the truth; the index follows
    bridge.index.file([(record, previous)])
    return jsonify(_public(record))


# --- handshakes -----------------------------------------------------------------------------------

MAX_DOCUMENT_BYTES = 64 * 1024


def _unreadable_body() -> Response | None:
    """The API's bodies are small JSON documents with a length; anything else is refused unread."""
    if request.content_length is None:
        return error("a Content-Length is required", 411)
    if request.content_length > MAX_DOCUMENT_BYTES:
        return error("request body too large", 413)
    return None


def _json_body() -> Any:
    """The body's JSON document, or None when it is not JSON; never raises.

    Not ``request.get_json``: it lets RecursionError through, so ``[`` x 30,000 (64 KB fit that easily)
    became an unexpected error and a 503, which tells a client to retry what can never succeed.
    """
    if not request.is_json:
        return None
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


@blueprint.put("/handshakes")
@owner_only
def put_handshake(bridge: Bridge, mailbox: Mailbox) -> Response:
    """Store a handshake the owner signed: 201 new, 200 replaced or unchanged.

    400 malformed · 403 not signed by this mailbox's key, identifiers that do not derive, or
    older than the stored one (a replayed approval must not undo a revocation) · 413 too large.
    """
    if refused := _unreadable_body():
        return refused
    document = _json_body()
    if document is None:
        return error("the body must be a JSON handshake document", 400)
    try:
        handshake = parse_signed_handshake(document, owner_public_key=base64.b64decode(mailbox.ed25519_public))
        result = bridge.handshakes.put(mailbox.address, handshake)
    except HandshakeError as exc:
        return error(str(exc), exc.status)
    except StaleHandshake as exc:
        return error(str(exc), 403)
    if result != UNCHANGED:
        enqueue(bridge, "bridge.jobs.inbound.rescreen_mailbox", mailbox.address, handshake.handshake_id)
    response = jsonify({"result": result, "handshake": handshake.to_document()})
    response.status_code = 201 if result == CREATED else 200
    return response


@blueprint.get("/handshakes")
@owner_only
def list_handshakes(bridge: Bridge, mailbox: Mailbox) -> Response:
    return jsonify({"handshakes": [h.to_document() for h in bridge.handshakes.all(mailbox.address)]})


@blueprint.post("/handshake-offers")
@owner_only
def create_handshake_offer(bridge: Bridge, mailbox: Mailbox) -> Response:
    response = jsonify(bridge.offers.create(mailbox.address))
    response.status_code = 201
    return response
