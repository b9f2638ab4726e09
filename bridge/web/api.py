"""The mailbox owner's API: ``/api/v1/messages``.

Authenticated by a bearer token (``python -m bridge mailbox token EMAIL``). A mailbox sees only
its own mail: every lookup is scoped to the token's mailbox, so another mailbox's message id
is simply not found (404), never forbidden (which would confirm it exists).

====  ======================================================
code  when
====  ======================================================
200   the listing or the message
400   a bad query parameter (folder, limit, before)
401   no or unknown bearer token
404   no such message in this mailbox
503   Redis or the object store is unreachable
====  ======================================================
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from bridge.context import Bridge
from bridge.store.mailboxes import Mailbox
from bridge.store.messages import FOLDERS, is_message_id

blueprint = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_PAGE = 200


def error(message: str, status: int) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mailio-bridge"'
    return response


def authenticated_mailbox(bridge: Bridge) -> Mailbox | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return bridge.mailboxes.authenticate(token.strip())


def _bridge() -> Bridge:
    return current_app.extensions["bridge"]


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "folder": record.get("folder"), **record}


@blueprint.get("/messages")
def list_messages() -> Response:
    bridge = _bridge()
    mailbox = authenticated_mailbox(bridge)
    if mailbox is None:
        return error("missing or unknown bearer token", 401)
    folder = request.args.get("folder", "inbox")
    if folder not in FOLDERS:
        return error(f"unknown folder; one of: {', '.join(FOLDERS)}", 400)
    try:
        limit = int(request.args.get("limit", "50"))
        before = float(request.args["before"]) if "before" in request.args else None
    except ValueError:
        return error("limit must be a whole number and before a cursor from a previous page", 400)
    if not 1 <= limit <= MAX_PAGE:
        return error(f"limit must be between 1 and {MAX_PAGE}", 400)
    records, cursor = bridge.index.listing(mailbox.address, folder, limit=limit, before=before)
    return jsonify({"messages": [_public(r) for r in records], "next": cursor})


@blueprint.get("/messages/<msg_id>")
def get_message(msg_id: str) -> Response:
    bridge = _bridge()
    mailbox = authenticated_mailbox(bridge)
    if mailbox is None:
        return error("missing or unknown bearer token", 401)
    if not is_message_id(msg_id):
        return error("no such message", 404)
    record = bridge.messages.get_record(mailbox.address, msg_id)
    body = bridge.messages.get_body(mailbox.address, msg_id) if record else None
    if record is None or body is None:
        return error("no such message", 404)
    # The sealed body is stored as compact JSON already: splice it in rather than re-encoding it.
    head = json.dumps(_public(record), separators=(",", ":"))
    return Response(head[:-1].encode() + b',"body":' + body + b"}", mimetype="application/json")
