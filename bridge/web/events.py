"""Postal's event webhooks: ``POST /postal/events`` (Webhooks -> Add in Postal).

Postal signs each event like an inbound delivery, waits a fixed 5 s, counts any 2xx as done and
retries anything else 5 more times over ~36 minutes, in no particular order (postal.md §2):

====  ==========================================================  ==============================
code  when                                                        what Postal does
====  ==========================================================  ==============================
200   applied, kept until the send answer is recorded, already    done
      applied (same uuid), stale (no state goes backwards), or
      not for the bridge (another sender, incoming mail, an
      event kind the bridge does not follow): counted in Redis
400   signed by Postal but not a well-formed event; a body that   retried, then dropped
      ended early or malformed chunking (nothing verified)
401   missing, wrong or tampered signature: nothing changes       retried, then dropped
408   the body did not arrive within BRIDGE_READ_TIMEOUT          retried, then dropped
413   over 1 MiB (events are a few hundred bytes)                 retried, then dropped
503   Redis or the object store down, no signing key, or the      retried (+2, 3, 6, 10, 15 min)
      message's record busy past 2 s
====  ==========================================================  ==============================

The signature is checked over the exact raw bytes (the same ``postal_keys.verify`` as inbound mail)
before anything parses them. Duplicates are dropped by ``uuid`` (``bridge:events:done:<uuid>``, two
days: longer than Postal's retries), set only after the event was applied; a crash in between is
harmless because each recipient remembers the uuids applied to it. Counters:
``bridge:events:counts`` (``received:<event>``, ``outcome:<outcome>``), never an address.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from flask import Blueprint, Response, current_app

from bridge.context import Bridge
from bridge.errors import DependencyUnavailable
from bridge.store.index import PREFIX, REDIS_ERRORS
from bridge.store.objects import StorageUnavailable
from bridge.store.outbound import BOUNCED, DELAYED, DELIVERED, FAILED, HELD, PostalEvent

# The inbound endpoint's body reader (limits, chunking, read deadline) and answers: one copy of each.
from bridge.web.postal import text_response, verified_body

log = logging.getLogger(__name__)
blueprint = Blueprint("events", __name__)

MAX_EVENT_BYTES = 1 << 20
DONE_SECONDS = 2 * 86400  # Postal gives up after ~36 min; a day's margin for clocks and admins' "Retry"
COUNTS = PREFIX + "events:counts"
STATES = {
    "MessageSent": DELIVERED,
    "MessageDelayed": DELAYED,  # fires on every soft fail
    "MessageDeliveryFailed": FAILED,
    "MessageHeld": HELD,
    "MessageBounced": BOUNCED,
}
_UUID = re.compile(r"[A-Za-z0-9-]{1,64}")
_NAME = re.compile(r"[A-Za-z]{1,40}")


class EventError(ValueError):
    """Signed by Postal but not an event the bridge can read: 400."""


def parse_event(body: bytes | bytearray) -> tuple[str, str, float, dict[str, Any]]:
    """(event name, uuid, Postal's timestamp, payload) of a webhook body, or EventError."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise EventError("not JSON") from None
    if not isinstance(document, dict):
        raise EventError("not a JSON object")
    name, uuid, payload = document.get("event"), document.get("uuid"), document.get("payload")
    if not isinstance(name, str) or not name:
        raise EventError("event")
    if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
        raise EventError("uuid")
    if not isinstance(payload, dict):
        raise EventError("payload")
    stamp = document.get("timestamp")
    if not isinstance(stamp, int | float) or isinstance(stamp, bool) or not math.isfinite(stamp):
        raise EventError("timestamp")
    return name, uuid, float(stamp), payload


def message_event(name: str, uuid: str, at: float, payload: dict[str, Any]) -> tuple[str, PostalEvent]:
    """(direction, the normalised event) of one of the five message events, or EventError."""
    field = "original_message" if name == "MessageBounced" else "message"
    message = payload.get(field)
    if not isinstance(message, dict):
        raise EventError(field)
    postal_id, token, to = message.get("id"), message.get("token"), message.get("to")
    if not isinstance(postal_id, int) or isinstance(postal_id, bool) or postal_id < 0:
        raise EventError(f"{field}.id")
    if token is not None and not isinstance(token, str):
        raise EventError(f"{field}.token")
    if not isinstance(to, str):
        raise EventError(f"{field}.to")
    message_id = message.get("message_id")
    if message_id is not None and not isinstance(message_id, str):
        raise EventError(f"{field}.message_id")
    direction = message.get("direction")
    event = PostalEvent(
        uuid=uuid,
        kind=name,
        state=STATES[name],
        postal_id=postal_id,
        token=token,
        message_id=message_id or None,
        to=to,
        at=at,
        reason=_reason(name, payload),
    )
    return str(direction), event


def _reason(name: str, payload: dict[str, Any]) -> str | None:
    """What the owner is shown: Postal's details (and the remote server's answer for failures)."""
    if name == "MessageBounced":
        bounce = payload.get("bounce")
        subject = bounce.get("subject") if isinstance(bounce, dict) else None
        return f"bounced: {subject}" if isinstance(subject, str) and subject else "bounced"
    details, output = payload.get("details"), payload.get("output")
    text = details if isinstance(details, str) and details else None
    if name != "MessageSent" and isinstance(output, str) and output.strip():
        text = f"{text} ({output.strip()})" if text else output.strip()
    return text


@blueprint.post("/postal/events")
def events() -> Response:
    bridge: Bridge = current_app.extensions["bridge"]
    verified = verified_body(bridge, MAX_EVENT_BYTES, "postal events", "event")
    if isinstance(verified, Response):
        return verified
    body, _kid = verified
    try:
        name, uuid, at, payload = parse_event(body)
        event = message_event(name, uuid, at, payload) if name in STATES else None
    except EventError as exc:
        log.warning("postal events: refused 400: malformed event: %s", exc)  # a field's name, never its value
        return text_response(f"malformed event: {exc}", 400)
    try:
        outcome = _handle(bridge, name, uuid, event)
    except (DependencyUnavailable, StorageUnavailable) as exc:
        log.error("postal events: %s", exc.__class__.__name__)
        return text_response("storage unavailable, retry later", 503)
    log.info("postal event %s: %s", name if _NAME.fullmatch(name) else "(other)", outcome)
    return text_response(outcome, 200)


def _handle(bridge: Bridge, name: str, uuid: str, event: tuple[str, PostalEvent] | None) -> str:
    done = f"{PREFIX}events:done:{uuid}"
    connection = bridge.outbound_redis
    try:
        seen = connection.exists(done)
    except REDIS_ERRORS as exc:
        raise DependencyUnavailable("redis unavailable") from exc
    if seen:
        outcome = "duplicate"
    elif event is None:
        outcome = "unknown_event"
    elif event[0] != "outgoing":
        outcome = "incoming"
    else:
        outcome = bridge.outbound.apply_event(event[1])
    try:
        pipe = connection.pipeline(transaction=False)
        if outcome != "duplicate":
            pipe.set(done, "1", ex=DONE_SECONDS)
        pipe.hincrby(COUNTS, f"received:{name if _NAME.fullmatch(name) else 'other'}", 1)
        pipe.hincrby(COUNTS, f"outcome:{outcome}", 1)
        pipe.execute()
    except REDIS_ERRORS as exc:
        raise DependencyUnavailable("redis unavailable") from exc
    return outcome
