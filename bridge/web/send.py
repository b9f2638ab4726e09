"""Sending: ``POST /api/v1/messages`` (the owner's Bearer token).

The body is ``{"raw": "<base64 RFC 5322>"}`` or fields ``{to, cc, bcc, subject, text, html, attachments,
in_reply_to, from}`` (``bridge.mail.compose``), either with ``handshake_offer`` (a Mailio recipient's offer
``<nonce>:<server domain>:<owner address>``: sent to that one recipient as a handshake request, the offer
kept on the sent record for the Mailio leg). Before the 202, in this order, every step durable:

1. the owner's copy (Bcc kept) sealed to the owner's X25519 key like inbound mail, its record in the
   JWE's ``aad``, create-only under ``mail/<owner>/<id>.jwe``: the server keeps no key that opens it;
2. what recipients receive (Bcc removed) in the spool, encrypted under the server's spool key
   (``bridge.store.spool``): Postal needs the plaintext, so this copy lives until it is handed over;
3. the outbound record, one ``queued`` recipient per address (To, Cc, Bcc, collapsed case-insensitively);
4. the ``sent`` folder's index entry, and the routing job, queued with ids only.

A crash in between leaves objects nobody sends (no job was queued): nothing goes out before the record
is durable. Contacts (screening's "people you wrote to") are recorded by a job the routing job queues
after the delivery: each new address costs one scrypt (~120 ms), which a 1,000-recipient request could
not pay before answering, nor the routing job before Postal gets the message.

====  ==============================================================================================
code  when
====  ==============================================================================================
202   ``{"id": ...}``: stored and queued; ``GET /api/v1/messages/<id>`` follows each recipient
400   not a JSON object, a malformed field (the one-line body names it), no recipients, a recipient
      domain that is not a mail domain; a body cut off or malformed chunking
401   no or unknown bearer token
403   ``From`` is neither the mailbox's address nor one of its aliases
413   over BRIDGE_MAX_MESSAGE_BYTES: from Content-Length before reading, then the composed message
429   over BRIDGE_SEND_LIMIT_MESSAGES or BRIDGE_SEND_LIMIT_RECIPIENTS in this hour
503   Redis or the object store is down
====  ==============================================================================================
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from bridge.context import Bridge
from bridge.errors import RedisUnavailable
from bridge.jobs.outbound import enqueue_delivery, enqueue_route
from bridge.mail.compose import ComposeError, Outgoing, from_fields, from_raw
from bridge.mailio.discovery import InvalidDomain, normalize_domain
from bridge.mailio.offer import parse_offer
from bridge.sealing import seal, sealed_chunks
from bridge.store.index import PREFIX, REDIS_ERRORS
from bridge.store.mailboxes import Mailbox, MailboxError, normalize_email
from bridge.store.messages import is_message_id, message_id
from bridge.store.outbound import QUEUED
from bridge.web.api import _json_body, _unreadable_body, error, owner_only
from bridge.web.postal import BodyIncomplete, BodyTooLarge, cut_off, read_body, request_limit
from bridge.web.recipients import sealed_submission, sent_record, store_client_sealed

log = logging.getLogger(__name__)
blueprint = Blueprint("send", __name__, url_prefix="/api/v1")

LIMIT_WINDOW = 3600
_LIMIT_PREFIX = PREFIX + "sendlimit:"


@blueprint.post("/messages")
@owner_only
def send_message(bridge: Bridge, mailbox: Mailbox) -> Response:
    settings = bridge.settings
    try:
        body = read_body(request_limit(settings.max_message_bytes))  # 413 from Content-Length, unread
    except BodyTooLarge:
        return error("message too large", 413)
    except BodyIncomplete:
        return cut_off()
    try:
        document = json.loads(body) if request.is_json else None
    except (ValueError, RecursionError):
        document = None
    del body
    if not isinstance(document, dict):
        return error('the body must be a JSON object: {"raw": ...} or {"to": [...], "subject": ..., ...}', 400)
    offer, refused = _handshake_offer(document)
    if refused:
        return error(refused, 400)
    sealed, refused = sealed_submission(document, mailbox, settings.domain)  # sealed by the owner's client
    if refused:
        return error(refused, 400)
    msg_id = message_id(f"sent:{mailbox.address}:{secrets.token_hex(16)}")
    try:
        outgoing = _compose(document, mailbox, f"{msg_id}@{settings.domain}", settings.max_message_bytes)
    except ComposeError as exc:
        return error(str(exc), 400)
    except _TooLarge:
        return error("message too large", 413)
    if not outgoing.recipients:
        return error("to: no recipients (to, cc and bcc are all empty)", 400)
    if offer and len(outgoing.recipients) != 1:
        return error("handshake_offer: give exactly one recipient, the offer's owner", 400)
    if not _may_send_as(mailbox, outgoing.from_address):
        return error("from: not this mailbox's address or one of its aliases", 403)
    if len(outgoing.wire) > settings.max_message_bytes or len(outgoing.owner_copy) > settings.max_message_bytes:
        return error("message too large", 413)
    if not _take_quota(bridge, mailbox.address, len(outgoing.recipients)):
        return error("send limit reached for this hour", 429)
    extra = {"handshake_offer": offer} if offer else {}  # the Mailio leg reads it (bridge.jobs.peer_outbound)
    if sealed is not None:
        store_client_sealed(bridge, mailbox, msg_id, outgoing, sealed, **extra)  # bridge.web.recipients
    else:
        _store(bridge, mailbox, msg_id, outgoing, **extra)
    enqueue_route(bridge, mailbox.address, msg_id)
    log.info("send: %s queued for %d recipient(s)", msg_id, len(outgoing.recipients))
    response = jsonify({"id": msg_id})
    response.status_code = 202
    return response


class _TooLarge(Exception):
    pass


def _handshake_offer(document: dict[str, Any]) -> tuple[str, str]:
    """Pop ``handshake_offer`` (``<nonce>:<server domain>:<owner address>``, from the recipient's owner):
    the message then goes to that Mailio user as a handshake request. Returns (the offer or "", a reason)."""
    if "handshake_offer" not in document:
        return "", ""
    try:
        return str(parse_offer(document.pop("handshake_offer"))), ""
    except ValueError as exc:
        return "", f"handshake_offer: {exc}"


def _compose(document: dict[str, Any], mailbox: Mailbox, new_id: str, max_bytes: int) -> Outgoing:
    if "raw" not in document:
        return from_fields(document, default_from=mailbox.email, message_id=new_id, check_domain=_mail_domain)
    if len(document) != 1:
        raise ComposeError("raw", "give raw alone, without other fields")
    raw = document["raw"]
    if not isinstance(raw, str):
        raise ComposeError("raw", "must be a base64 string")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ComposeError("raw", "must be base64") from None
    if len(data) > max_bytes:
        raise _TooLarge
    return from_raw(data, message_id=new_id, check_domain=_mail_domain)


def _mail_domain(domain: str) -> bool:
    try:
        normalize_domain(domain)
    except InvalidDomain:
        return False
    return True


def _may_send_as(mailbox: Mailbox, address: str) -> bool:
    """The mailbox's own address or an alias, case-insensitively and with a ``+tag`` allowed."""
    try:
        wanted = normalize_email(address)
    except MailboxError:
        return False
    return wanted in {mailbox.email.lower(), *(a.lower() for a in mailbox.aliases)}


def _take_quota(bridge: Bridge, owner: str, recipients: int) -> bool:
    """Count this message against the hour's limits; False (and nothing counted) when it would exceed one.

    A fixed hourly window per mailbox in Redis: a stolen token sends at most the limits per hour.
    """
    settings = bridge.settings
    window = int(time.time() // LIMIT_WINDOW)
    messages_key, recipients_key = f"{_LIMIT_PREFIX}{owner}:{window}:m", f"{_LIMIT_PREFIX}{owner}:{window}:r"
    try:
        pipe = bridge.redis.pipeline(transaction=True)
        pipe.incr(messages_key)
        pipe.incrby(recipients_key, recipients)
        pipe.expire(messages_key, LIMIT_WINDOW * 2)
        pipe.expire(recipients_key, LIMIT_WINDOW * 2)
        messages, total, *_ = pipe.execute()
        if messages > settings.send_limit_messages or total > settings.send_limit_recipients:
            pipe = bridge.redis.pipeline(transaction=True)
            pipe.decr(messages_key)
            pipe.decrby(recipients_key, recipients)
            pipe.execute()
            return False
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc
    return True


def _store(bridge: Bridge, mailbox: Mailbox, msg_id: str, outgoing: Outgoing, **extra: Any) -> None:
    record = sent_record(mailbox, msg_id, outgoing, len(outgoing.owner_copy), **extra)
    aad = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    sealed = seal(outgoing.owner_copy, [mailbox.recipient(bridge.settings.domain)], aad)
    bridge.messages.create_body(mailbox.address, msg_id, sealed_chunks(sealed))
    del sealed
    bridge.spool.put(mailbox.address, msg_id, outgoing.from_address, outgoing.wire)
    bridge.outbound.create(mailbox.address, msg_id, f"<{outgoing.message_id}>", outgoing.recipients)
    bridge.index.file([(record, None)])


@blueprint.post("/messages/<msg_id>/resend")
@owner_only
def resend_message(bridge: Bridge, mailbox: Mailbox, msg_id: str) -> Response:
    """The owner's explicit resend of one SMTP recipient ``{"address": ...}`` (never automatic: an
    ``uncertain`` recipient may already have it). 202 queued again; 404 no such message or recipient;
    409 not an SMTP recipient, already queued, or the copy to send is no longer kept (send it anew)."""
    if refused := _unreadable_body():
        return refused
    document = _json_body()
    address = document.get("address") if isinstance(document, dict) else None
    if not isinstance(address, str) or not address.strip():
        return error('address: give {"address": "<a recipient of this message>"}', 400)
    record = bridge.outbound.get(mailbox.address, msg_id) if is_message_id(msg_id) else None
    if record is None:
        return error("no such message", 404)
    entry = next((r for r in record["recipients"] if r["address"].lower() == address.strip().lower()), None)
    if entry is None:
        return error("address: not a recipient of this message", 404)
    if entry["route"] != "smtp":
        return error(f"only SMTP recipients can be resent (this one's route: {entry['route']})", 409)
    if entry["state"] == QUEUED:
        return error("already waiting to be sent", 409)
    if not bridge.spool.exists(mailbox.address, msg_id):
        return error("the copy to send is no longer kept: send the message again", 409)
    if not _take_quota(bridge, mailbox.address, 1):
        return error("send limit reached for this hour", 429)
    bridge.outbound.reopen(mailbox.address, msg_id, entry["address"], "resend requested by the owner")
    enqueue_delivery(bridge, mailbox.address, msg_id)
    response = jsonify({"id": msg_id, "address": entry["address"], "state": QUEUED})
    response.status_code = 202
    return response
