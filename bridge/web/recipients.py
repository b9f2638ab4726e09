"""Recipients' keys for the owner's client, and messages the client sealed itself (end to end).

``POST /api/v1/recipients/resolve`` (the owner's Bearer token) ``{"addresses": [e-mail or
did:web:<host>#<address>, ...]}`` answers per address its route (``mailio``/``smtp``/``none``/
``temporary``) and, for Mailio recipients, the ``kid`` to seal to and the DID document the key came from
(checked as ``bridge.mailio.peer_send`` explains: signed by the peer's server key, or fetched over
verified TLS from the discovered host). The client seals the message to those keys plus the owner's own
and submits it with ``POST /api/v1/messages`` ``{"sealed": <JWE>, "to": [...], ...}``: the server then
never sees that plaintext (:func:`store_client_sealed`).

====  ==============================================================================================
code  when
====  ==============================================================================================
200   ``{"recipients": [{"address", "route", "reason", "host", "kid", "did_document"}, ...], "owner": {"kid"}}``
400   not ``{"addresses": [text, ...]}``, more than MAX_ADDRESSES, an address that is neither an e-mail
      address nor a did:web
401   no or unknown bearer token
411   no Content-Length; 413 a body over the API's document limit
503   Redis down (without a server key: 200 with each route, no keys, and the reason)
====  ==============================================================================================
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, jsonify

from bridge.context import Bridge
from bridge.jobs.peer_outbound import SEALED_BY_CLIENT, sender
from bridge.mail.compose import Outgoing
from bridge.mailio.discovery import MAILIO, InvalidDomain
from bridge.mailio.identity import did_web
from bridge.mailio.peer_send import Resolution, check_client_sealed
from bridge.mailio.server_key import ServerKeyError
from bridge.store.mailboxes import Mailbox
from bridge.store.messages import STATUS_FILED
from bridge.web.api import _json_body, _unreadable_body, error, owner_only

blueprint = Blueprint("recipients", __name__, url_prefix="/api/v1")

RESOLVE_SECONDS = 15.0  # then the rest answer "temporary": the owner asks again (peers choose their pace)
MAX_ADDRESSES = 20  # each new e-mail address costs one scrypt (~120 ms) and its domain a signed look-up
SEALED_FIELDS = frozenset({"sealed", "to", "cc", "bcc", "from"})


@blueprint.post("/recipients/resolve")
@owner_only
def resolve_recipients(bridge: Bridge, mailbox: Mailbox) -> Response:
    if refused := _unreadable_body():
        return refused
    document = _json_body()
    addresses = document.get("addresses") if isinstance(document, dict) else None
    if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
        return error('give {"addresses": ["someone@example.org", "did:web:<host>#<address>", ...]}', 400)
    if len(addresses) > MAX_ADDRESSES:
        return error(f"addresses: at most {MAX_ADDRESSES} per call", 400)
    wanted = [a.strip() for a in addresses]
    if (bad := next((a for a in wanted if not a.startswith("did:web:") and a.count("@") != 1), None)) is not None:
        return error(f"addresses: {bad[:80]!r} is neither an e-mail address nor a did:web", 400)
    try:
        peer = sender(bridge)
    except ServerKeyError:
        return _routes_only(bridge, wanted)
    emails = [a for a in wanted if not a.startswith("did:web:")]
    hashes = bridge.sender_hashes.lookup_hashes(emails)
    deadline = time.monotonic() + RESOLVE_SECONDS
    found = peer.resolve(mailbox.address, {a: hashes[a.lower()] for a in emails}, deadline=deadline) if emails else {}
    answers = [found[a] if a in found else peer.resolve_did_web(a) for a in wanted]
    owner = {"kid": did_web(bridge.settings.domain, mailbox.address)}  # the client seals to itself too
    return jsonify({"recipients": [answer.to_json() for answer in answers], "owner": owner})


def _routes_only(bridge: Bridge, wanted: list[str]) -> Response:
    """Without a server key the bridge cannot sign look-ups: each address's route, and no keys."""
    answers = []
    for address in wanted:
        try:
            route = bridge.discovery.discover(address.removeprefix("did:web:").partition("#")[0].rpartition("@")[2])
            kind, reason = route.route, route.reason
        except InvalidDomain:
            kind, reason = "none", "not a mail domain"
        if kind == MAILIO:
            reason = "this bridge has no server key to sign look-ups with (python -m bridge keys init)"
        answers.append(Resolution(address, kind, reason).to_json())
    return jsonify({"recipients": answers, "owner": {"kid": None}})


def sealed_submission(document: dict[str, Any], mailbox: Mailbox, domain: str) -> tuple[dict[str, Any] | None, str]:
    """For ``POST /api/v1/messages``: pop a client-sealed body off ``document``, checked.

    Returns (the JWE or None when there is none, a one-line reason when it is refused: answer 400).
    """
    if "sealed" not in document:
        return None, ""
    if extra := sorted(set(document) - SEALED_FIELDS):
        return None, f"sealed: give it with to, cc, bcc and from only, not {extra[0][:40]}"
    try:
        return check_client_sealed(document.pop("sealed"), did_web(domain, mailbox.address)), ""
    except ValueError as exc:
        return None, str(exc)


def sent_record(mailbox: Mailbox, msg_id: str, outgoing: Outgoing, size: int, **extra: Any) -> dict[str, Any]:
    """The record of the owner's sent copy, filed in ``sent`` (for either kind of submission); ``extra``
    adds members such as ``sealed_by``."""
    now = time.time()
    return {
        "id": msg_id,
        "mailbox": mailbox.address,
        "status": STATUS_FILED,
        "folder": "sent",
        "received_at": now,
        "sent_at": now,
        "size": size,
        "source": "owner",
        **extra,
        "message_id": outgoing.message_id,
        "sender": {"from": outgoing.from_address},
        "verdicts": {},
        "reason": None,
    }


def store_client_sealed(
    bridge: Bridge, mailbox: Mailbox, msg_id: str, outgoing: Outgoing, sealed: dict, **extra: Any
) -> None:
    """Store a message the client sealed: its JWE is the owner's sent copy and what Mailio peers receive.

    No spool copy (the server has no plaintext): recipients that turn out to need one (SMTP) fail.
    The record says ``sealed_by: client``; it is written before the outbound record, so the Mailio leg
    never sees a message without it. ``extra``: more members of the sent record (``handshake_offer``).
    """
    body = json.dumps(sealed, separators=(",", ":")).encode()
    record = sent_record(mailbox, msg_id, outgoing, len(body), sealed_by=SEALED_BY_CLIENT, **extra)
    bridge.messages.create_body(mailbox.address, msg_id, body)
    bridge.messages.put_record(record)
    bridge.outbound.create(mailbox.address, msg_id, f"<{outgoing.message_id}>", outgoing.recipients)
    bridge.index.file([(record, None)])
