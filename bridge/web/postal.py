"""Postal's HTTP endpoint: ``POST /postal/inbound``.

Postal shows the first ~250 characters of our answer in its UI and decides from the status
alone whether the sender gets a bounce, so every answer is deliberate (postal.md §1):

====  ==========================================================  ==============================
code  when                                                        what Postal does
====  ==========================================================  ==============================
200   stored, or a retry of a delivery already stored             done
400   signed by Postal but not a well-formed delivery; a body     hard fail, bounces the sender
      that ended early or malformed chunking (nothing verified)
408   the body did not arrive within BRIDGE_READ_TIMEOUT          hard fail (Postal sends whole
      (the connection is closed; nothing verified or stored)      bodies at once: not Postal)
401   missing, wrong or tampered signature (not from Postal)      hard fail (it was not Postal)
404   no such mailbox, BRIDGE_UNKNOWN_RECIPIENT=bounce            hard fail, bounces the sender
429   no such mailbox, BRIDGE_UNKNOWN_RECIPIENT=drop              hard fail, no bounce
413   over BRIDGE_MAX_MESSAGE_BYTES (checked before reading it,   hard fail, bounces the sender
      then on what Postal sent); a Hash with > 1,000 attachments
503   Redis, the object store or Postal's JWKS unreachable;       retried for about a day, so
      no signing key configured yet                               nothing is lost
====  ==========================================================  ==============================

The signature is checked over the exact raw bytes before anything parses them.
"""

from __future__ import annotations

import logging
import re

from flask import Blueprint, Response, current_app, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected

from bridge import metrics
from bridge.context import Bridge
from bridge.errors import DependencyUnavailable
from bridge.postal.ingress import UNKNOWN_RECIPIENT, accept_postal_delivery
from bridge.postal.payloads import MessageTooLarge, PayloadError, parse_inbound
from bridge.postal.signatures import KID_HEADER, KeysUnavailable, SignatureError
from bridge.store.objects import StorageUnavailable
from bridge.web.deadlines import deadlines

log = logging.getLogger(__name__)
blueprint = Blueprint("postal", __name__)

_READ_CHUNK = 1 << 20


class BodyTooLarge(Exception):
    pass


class BodyIncomplete(Exception):
    """The body ended early, was malformed chunking, or was cut off by the read deadline."""


def request_limit(max_message_bytes: int) -> int:
    """The largest request body a message of the maximum size can produce.

    Base64 with a newline every 60 characters, JSON-escaped (``\\n``) or form-encoded
    (``%2B``, ``%2F``, ``%0A``), grows a message by at most ~1.5x; the rest is headroom for the
    Hash format's other fields.
    """
    return max_message_bytes * 3 // 2 + (1 << 20)


def text_response(body: str, status: int) -> Response:
    return Response(body + "\n", status=status, mimetype="text/plain")


def read_body(limit: int) -> bytearray:
    """The whole body, or BodyTooLarge / BodyIncomplete; never more than ``limit`` bytes held."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    stream = request.stream
    try:
        if length is not None:
            # Preallocate and fill: no second full-size copy. (gunicorn's stream has read() but no readinto().)
            body = bytearray(length)
            filled = 0
            while filled < length:
                chunk = stream.read(min(_READ_CHUNK, length - filled))
                if not chunk:
                    raise BodyIncomplete  # the client closed early, or its read deadline cut it off
                body[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            return body
        body = bytearray()
        while chunk := stream.read(_READ_CHUNK):
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge
        return body
    except (OSError, ParseException, ClientDisconnected):
        # gunicorn: NoMoreData (an OSError) for a chunked body that stops, InvalidChunkSize & co. for
        # malformed chunking; werkzeug's stream wrapper turns some of these into ClientDisconnected.
        # Either way the request is not one Postal could have sent whole.
        raise BodyIncomplete from None


def cut_off() -> Response:
    """Answer a body that did not arrive whole, and close the connection (its framing is lost)."""
    if deadlines.expired(request.environ.get("gunicorn.socket")):
        response = text_response(f"request body not received within {deadlines.seconds:g} s", 408)
    else:
        response = text_response("incomplete or malformed request body", 400)
    response.headers["Connection"] = "close"
    return response


def _claimed_kid() -> str:
    """The KID header as received, for the log: whole when it looks like one, else only its length."""
    claimed = request.headers.get(KID_HEADER)
    if claimed is None:
        return "none"
    claimed = claimed.strip()
    return claimed if re.fullmatch(r"[0-9A-Fa-f]{1,128}", claimed) else f"<malformed, {len(claimed)} characters>"


def verified_body(bridge: Bridge, limit: int, where: str, what: str) -> tuple[bytearray, str] | Response:
    """Read a request Postal signed and check its signature over the exact bytes, before any parsing.

    Returns (body, the signing key's KID), or the answer to give: 413 over ``limit`` (``what`` too
    large), 400/408 for a body that did not arrive whole, 401 for a missing or wrong signature, 503
    when no key can be had. ``where`` names the endpoint in the log. Every Postal ingress uses this.
    """
    try:
        body = read_body(limit)
    except BodyTooLarge:
        return text_response(f"{what} too large", 413)
    except BodyIncomplete:
        log.warning("%s: request body incomplete, malformed or too slow", where)
        return cut_off()
    try:
        kid = bridge.postal_keys.verify(body, request.headers)
    except SignatureError as exc:
        metrics.SIGNATURE_FAILURES.labels(endpoint=where, reason=metrics.signature_reason(str(exc))).inc()
        log.warning(
            "%s: signature rejected (%s): KID received %s, KIDs trusted %s",
            where, exc, _claimed_kid(), ",".join(bridge.postal_keys.known_kids) or "none",
        )  # fmt: skip
        return text_response("invalid signature", 401)
    except KeysUnavailable:
        log.error("%s: no Postal signing key available (check BRIDGE_POSTAL_PUBLIC_KEY/URL)", where)
        return text_response("signing keys unavailable, retry later", 503)
    return body, kid


@blueprint.post("/postal/inbound")
def inbound() -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    settings = bridge.settings
    verified = verified_body(bridge, request_limit(settings.max_message_bytes), "postal inbound", "message")
    if isinstance(verified, Response):
        metrics.DELIVERIES.labels(outcome=_REFUSED.get(verified.status_code, "refused")).inc()
        return verified
    body, kid = verified
    try:
        message = parse_inbound(body, request.content_type or "", settings.max_message_bytes)
    except MessageTooLarge as exc:
        metrics.DELIVERIES.labels(outcome="too_large").inc()
        log.warning("postal inbound: refused 413: %s (%d bytes received)", exc, len(body))
        return text_response(str(exc), 413)  # "message too large", "too many attachments", "too many form fields"
    except PayloadError as exc:
        metrics.DELIVERIES.labels(outcome="malformed").inc()
        log.warning("postal inbound: refused 400: malformed delivery: %s (signed by KID %s)", exc, kid)
        return text_response(f"malformed delivery: {exc}", 400)
    del body
    try:
        outcome = accept_postal_delivery(bridge, message, kid)
    except (DependencyUnavailable, StorageUnavailable) as exc:
        metrics.DELIVERIES.labels(outcome="unavailable").inc()
        log.error("postal inbound: %s (postal id %s; Postal retries)", exc.__class__.__name__, message.postal_id)
        return text_response("storage unavailable, retry later", 503)
    if outcome.result == UNKNOWN_RECIPIENT:
        metrics.DELIVERIES.labels(outcome="unknown_recipient").inc()
        log.warning(
            "postal inbound: refused %d: no mailbox for the recipient (postal id %s, recipient domain %s)",
            settings.unknown_recipient_status, message.postal_id, domain_of(message.rcpt_to),
        )  # fmt: skip
        return text_response("unknown recipient", settings.unknown_recipient_status)
    metrics.DELIVERIES.labels(outcome=outcome.result).inc()
    return text_response(outcome.result, 200)


#: The outcome label of an answer ``verified_body`` gave (nothing was parsed yet).
_REFUSED = {400: "incomplete", 408: "incomplete", 401: "bad_signature", 413: "too_large", 503: "unavailable"}


def domain_of(address: str) -> str:
    """The domain part of an address, for logs (never the whole address: it is personal data)."""
    domain = address.rpartition("@")[2].strip().lower()
    return domain if domain and re.fullmatch(r"[a-z0-9.\-\[\]:]{1,253}", domain) else "<none>"
