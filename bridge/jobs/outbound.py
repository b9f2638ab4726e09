"""Outbound jobs: route a sent message per recipient domain, then hand SMTP recipients to Postal.

``route_message(owner, msg_id)`` asks discovery about each domain with recipients still ``queued`` and
unrouted (or held for the Mailio leg), and records every route in one update of the record:

* ``mailio`` -> route ``mailio``, kept ``queued`` with "Mailio delivery not available yet" (the peer leg
  is the next issue's): never sent over SMTP instead, never dropped;
* ``smtp`` -> route ``smtp``, and the first attempt to hand them to Postal is made at once, in the routing
  job (the same code as ``deliver_postal``, under the same per-message lock ``message_lock``; the routes are
  recorded in the update that marks that first call, or before it when a Mailio leg is queued too, so that it
  need not wait for the Postal calls): one RQ job and one record write fewer per message.
  A ``deliver_postal`` job is queued only when that attempt was provably not sent (retried after the first
  of BRIDGE_OUTBOUND_RETRY_DELAYS, then RQ retries it after the rest), or when another delivery job of the
  message held the lock;
* ``none`` -> ``failed`` (permanent) with discovery's reason;
* ``temporary`` (DNS timeout, SERVFAIL) -> the job raises ``RetryLater`` and RQ runs it again after the
  next of BRIDGE_OUTBOUND_RETRY_DELAYS; past the last, those recipients fail with the reason.

It then queues ``record_contacts(owner, msg_id)``, unless every recipient was recorded before (one Redis
round trip): screening's "people you wrote to" are kept by their e-mail lookup hash, one scrypt (~120 ms,
cached in Redis) per address never hashed before, so a 1,000-recipient message costs that job about a
minute of CPU; it runs after the first call to Postal, off its path. A reply that arrives before it has
run is screened like any unknown sender's.

``deliver_postal(owner, msg_id)`` sends the spooled plaintext with ``send/raw``, 50 recipients a call,
each call two updates of the record (before and after), whatever the batch's size.
**Never twice**: every call is marked on the record before it is made (``start_attempt``: outcome
``sending``) and after (``end_attempt``). A mark still ``sending`` when a job starts means a worker died
during a call that Postal may have taken: that recipient becomes ``uncertain`` and is not resent.
The mark after the call also records what the outcome means, in the same update of the record.
Outcomes: accepted -> Postal's ids, ``accepted``; permanent -> ``failed``; uncertain (timeout or reset after
sending, 5xx) -> ``uncertain`` at once, never resent blindly (events or the owner's explicit resend
resolve it); temporary (provably not sent: connection refused, ServerSuspended) -> retried after the
next delay, then ``failed``. One delivery job runs per message at a time (a Redis lock), so two jobs
never both see a recipient ``queued`` and both send it.

The spool copy is deleted once no recipient still waits for it: ``queued`` on a route that needs the
plaintext (not yet routed, ``smtp``, or ``mailio`` waiting for the peer leg), or ``uncertain`` for less
than BRIDGE_UNCERTAIN_WINDOW (the owner may resend it explicitly; ``reconcile_outbound`` deletes it
after). Arguments are ids only; the API key never leaves ``PostalClient``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rq import get_current_job

from bridge import context
from bridge.context import Bridge
from bridge.jobs.queue import enqueue
from bridge.mailio.discovery import MAILIO, SMTP, InvalidDomain
from bridge.postal.client import (
    Accepted,
    Permanent,
    PostalMessage,
    PostalNotConfigured,
    Temporary,
    split_recipients,
)
from bridge.store.index import PREFIX, REDIS_ERRORS
from bridge.store.outbound import BOUNCED, DELAYED, DELIVERED, FAILED, HELD, QUEUED, UNCERTAIN, WAITING

log = logging.getLogger(__name__)

ROUTE_JOB = "bridge.jobs.outbound.route_message"
DELIVER_JOB = "bridge.jobs.outbound.deliver_postal"
CONTACTS_JOB = "bridge.jobs.outbound.record_contacts"
ROUTE_TIMEOUT = 900  # discovery is bounded per domain (5 s); a message may name many domains
DELIVER_TIMEOUT = 1800  # 20 calls of 50 recipients, each bounded by twice BRIDGE_POSTAL_TIMEOUT
MAILIO_NOT_YET = "Mailio delivery not available yet"
MAILIO_HANDED = "handed to the Mailio leg"
NEEDS_SPOOL = (None, SMTP, MAILIO)  # routes whose queued recipients still need the plaintext


class RetryLater(Exception):
    """Raised so that RQ runs the job again after the next of BRIDGE_OUTBOUND_RETRY_DELAYS."""


def enqueue_route(bridge: Bridge, owner: str, msg_id: str) -> str:
    delays = bridge.settings.outbound_retry_delays
    return enqueue(bridge, ROUTE_JOB, owner, msg_id, job_timeout=ROUTE_TIMEOUT, retry_intervals=delays)


def enqueue_delivery(bridge: Bridge, owner: str, msg_id: str, *, retry: bool = False) -> str:
    """A delivery job now; ``retry``: the one after the routing job's first attempt was provably not sent,
    run after the first of BRIDGE_OUTBOUND_RETRY_DELAYS and retried by RQ after the rest (as many tries
    in all as a delivery job of its own would get)."""
    delays = bridge.settings.outbound_retry_delays
    delay, delays = (delays[0], delays[1:]) if retry else (0, delays)
    return enqueue(bridge, DELIVER_JOB, owner, msg_id, job_timeout=DELIVER_TIMEOUT, retry_intervals=delays, delay=delay)


def enqueue_contacts(bridge: Bridge, owner: str, msg_id: str) -> str:
    return enqueue(bridge, CONTACTS_JOB, owner, msg_id, job_timeout=ROUTE_TIMEOUT, retry_intervals=(60, 600))


def _last_try() -> bool:
    """Whether RQ will not run this job again if it fails (RQ stores 0 retries left as none)."""
    job = get_current_job()
    return job is None or not job.retries_left


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


# --- routing ----------------------------------------------------------------------------------------


def route_message(owner: str, msg_id: str) -> dict[str, int]:
    """Route every unrouted ``queued`` recipient; returns how many went each way (for logs and tests)."""
    from bridge.jobs.peer_outbound import enqueue_mailio, mailio_ready  # it imports this module

    bridge = context.current()
    record = bridge.outbound.get(owner, msg_id)
    if record is None:
        log.warning("route: no outbound record %s", msg_id)
        return {}
    by_domain: dict[str, list[str]] = defaultdict(list)
    for entry in record["recipients"]:
        if entry["state"] == QUEUED and entry["route"] in (None, MAILIO):
            by_domain[_domain(entry["address"])].append(entry["address"])
    counts: dict[str, int] = defaultdict(int)
    routes: dict[str, tuple[str, str | None]] = {}
    waiting: list[str] = []
    reasons: list[str] = []
    for domain, addresses in by_domain.items():
        try:
            route = bridge.discovery.discover(domain)
            kind, reason = route.route, route.reason
        except InvalidDomain:
            kind, reason = "none", "not a mail domain"
        counts[kind] += len(addresses)
        if kind == "temporary":
            waiting.extend(addresses)
            reasons.append(reason)
            continue
        if kind == MAILIO:  # never SMTP instead; held when this bridge has no server key to sign with
            chosen: tuple[str, str | None] = (MAILIO, MAILIO_HANDED if mailio_ready(bridge) else MAILIO_NOT_YET)
        elif kind == SMTP:
            chosen = (SMTP, None)
        else:
            chosen = ("none", f"no mail service: {reason}")
        routes |= dict.fromkeys(addresses, chosen)
    ready = mailio_ready(bridge)
    first_call = any(kind == SMTP for kind, _ in routes.values())
    # The routes are recorded with the first call to Postal, unless there is no such call, or the Mailio leg
    # must see its routes first (it starts before the Postal calls end, as when they were a job of their own).
    if routes and (not first_call or (ready and any(kind == MAILIO for kind, _ in routes.values()))):
        record, routes = bridge.outbound.set_routes(owner, msg_id, routes), {}
    if ready and any(e["route"] == MAILIO and e["state"] == QUEUED for e in record["recipients"]):
        enqueue_mailio(bridge, owner, msg_id)  # the Mailio leg: bridge.jobs.peer_outbound
    if first_call:
        record = _deliver_first(bridge, owner, msg_id, routes)
    elif any(e["route"] == SMTP and e["state"] == QUEUED for e in record["recipients"]):
        enqueue_delivery(bridge, owner, msg_id)  # routed by an earlier run of this job
    if bridge.contacts.unrecorded(owner, [e["address"] for e in record["recipients"]]):
        enqueue_contacts(bridge, owner, msg_id)  # after the first call to Postal, off its path
    if waiting:
        if not _last_try():
            raise RetryLater(f"discovery did not answer for {len(waiting)} recipient(s)")
        bridge.outbound.set_states(owner, msg_id, waiting, FAILED, f"DNS did not answer, gave up: {reasons[0]}")
        _drop_spool_when_done(bridge, owner, msg_id)
    elif not any(e["route"] == SMTP for e in record["recipients"]):
        _drop_spool_when_done(bridge, owner, msg_id)  # no delivery job will run to do it
    log.info("route: %s %s", msg_id, dict(counts))
    return dict(counts)


def record_contacts(owner: str, msg_id: str) -> int:
    """Note whom the owner wrote to (screening files their replies in the inbox), in one pass: the
    lookup hashes of all recipients (new ones computed in parallel, cached in Redis), then one batch
    into the contact book. Safe to repeat; returns how many contacts were new."""
    bridge = context.current()
    record = bridge.outbound.get(owner, msg_id)
    if record is None:
        return 0
    addresses = [e["address"] for e in record["recipients"]]
    hashes = bridge.sender_hashes.lookup_hashes(addresses)
    added = bridge.contacts.record_many(owner, hashes.values())
    bridge.contacts.mark_recorded(owner, addresses)
    log.info("contacts: %s %d new of %d", msg_id, added, len(hashes))
    return added


# --- the Postal leg ---------------------------------------------------------------------------------


def deliver_postal(owner: str, msg_id: str) -> dict[str, int]:
    """Hand the message's queued SMTP recipients to Postal; returns outcome counts."""
    bridge = context.current()
    with message_lock(bridge, "deliver", owner, msg_id, DELIVER_TIMEOUT) as held:
        if not held:
            raise RetryLater("another delivery job of this message is running")
        return _deliver(bridge, owner, msg_id)[0]


def _no_copy_reason(bridge: Bridge, owner: str, msg_id: str) -> str:
    """Why SMTP recipients have no plaintext to get: the owner's client sealed the message (the server never
    had one: ``sealed_by`` on the sent record, ``bridge.web.recipients``), or the spool copy is gone."""
    if (bridge.messages.get_record(owner, msg_id) or {}).get("sealed_by") == "client":
        return "sealed by the client: SMTP recipients need a plaintext copy (send it to them without --key)"
    return "the copy to send is no longer kept: send it again"


def _deliver_first(bridge: Bridge, owner: str, msg_id: str, routes: dict[str, tuple[str, str | None]]) -> dict:
    """The routing job's first attempt at its SMTP recipients, under the delivery lock; ``routes`` are
    recorded with it. Returns the record as it is afterwards."""
    with message_lock(bridge, "deliver", owner, msg_id, DELIVER_TIMEOUT) as held:
        if held:
            record = _deliver(bridge, owner, msg_id, routes)[1]
            return record if record is not None else bridge.outbound.get(owner, msg_id) or {"recipients": []}
    record = bridge.outbound.set_routes(owner, msg_id, routes)
    enqueue_delivery(bridge, owner, msg_id)  # another delivery job of this message runs: one after it
    return record


def _deliver(
    bridge: Bridge, owner: str, msg_id: str, routes: dict[str, tuple[str, str | None]] | None = None
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Outcome counts, and the record afterwards when this already holds it (else None). ``routes``: from the
    routing job, not recorded yet (recorded with the first call's mark, or before giving up without one)."""
    outbound = bridge.outbound
    first, pending = routes is not None, dict(routes or {})
    record = outbound.get(owner, msg_id)
    if record is None:
        return {}, None
    if _settle_interrupted(bridge, owner, msg_id, record):
        record = outbound.get(owner, msg_id) or record
    todo = [
        e["address"]
        for e in record["recipients"]
        if pending.get(e["address"], (e["route"], None))[0] == SMTP and e["state"] == QUEUED
    ]
    counts: dict[str, int] = defaultdict(int)
    spooled = bridge.spool.get(owner, msg_id) if todo else None  # decrypted once per job
    try:
        client = bridge.postal_client
    except PostalNotConfigured:
        client = None
    if pending and (spooled is None or client is None):  # no call to mark: the routes on their own
        record = outbound.set_routes(owner, msg_id, pending)
    if not todo:
        _drop_spool_when_done(bridge, owner, msg_id, record)
        return {}, record
    if spooled is None:
        outbound.set_states(owner, msg_id, todo, FAILED, _no_copy_reason(bridge, owner, msg_id))
        return {"failed": len(todo)}, None
    if client is None:
        return _not_sent(bridge, owner, msg_id, todo, "Postal's send API is not configured", first), None
    mail_from, message = spooled
    left: list[str] = []  # provably not sent: a later run sends them
    reason, stop = "", False
    for batch in split_recipients(todo):
        if stop:  # after a temporary or uncertain call Postal is in trouble: the rest waits for a later run
            left.extend(batch)
            continue
        # Before the call (with the routes, on the routing job's first): a crash leaves "sending".
        number = outbound.start_attempt(owner, msg_id, batch, routes=pending)
        pending = {}
        result = client.send_raw(mail_from, batch, message)
        # After the call, one update records how it ended and what that means for its recipients.
        end: dict[str, Any] = {}
        detail = None if isinstance(result, Accepted) else f"{result.code}: {result.reason}"
        if isinstance(result, Accepted):
            end["postal"] = {rcpt: {"id": ref.id, "token": ref.token} for rcpt, ref in result.recipients.items()}
        elif isinstance(result, Permanent):
            end |= {"state": FAILED, "reason": f"Postal refused it: {detail}"}
        elif isinstance(result, Temporary):
            left.extend(batch)
            reason, stop = f"Postal did not take it: {detail}", True
        else:
            end |= {"state": UNCERTAIN, "reason": f"Postal may have taken it ({detail}): not resent"}
            reason, stop = f"not attempted after an uncertain call ({result.code})", True
        record = outbound.end_attempt(owner, msg_id, batch, number, result.outcome, detail, **end)
        counts[result.outcome] += len(batch)
    if left:
        _not_sent(bridge, owner, msg_id, left, reason, first)
        record = None  # changed: read again
    _drop_spool_when_done(bridge, owner, msg_id, record)
    log.info("deliver: %s %s", msg_id, dict(counts))
    return dict(counts), record


def _not_sent(
    bridge: Bridge, owner: str, msg_id: str, addresses: list[str], reason: str, first: bool = False
) -> dict[str, int]:
    """Recipients provably not sent: retry the job later, or after the last delay fail them with ``reason``.
    ``first``: the routing job's attempt, retried by a delivery job of its own (the routing job is done)."""
    if first:
        bridge.outbound.set_routes(owner, msg_id, dict.fromkeys(addresses, (SMTP, f"will retry: {reason}")))
        enqueue_delivery(bridge, owner, msg_id, retry=True)
        return {}
    if not _last_try():
        bridge.outbound.set_routes(owner, msg_id, dict.fromkeys(addresses, (SMTP, f"will retry: {reason}")))
        raise RetryLater(reason)
    bridge.outbound.set_states(owner, msg_id, addresses, FAILED, f"gave up after retries: {reason}")
    return {"failed": len(addresses)}


def _settle_interrupted(bridge: Bridge, owner: str, msg_id: str, record: dict[str, Any]) -> bool:
    """An attempt still marked ``sending`` belongs to a worker that died during its call: ``uncertain``.
    True if there was one (the record changed)."""
    interrupted: dict[int, list[str]] = defaultdict(list)
    for entry in record["recipients"]:
        for attempt in entry["attempts"]:
            if attempt["outcome"] == "sending":
                interrupted[attempt["n"]].append(entry["address"])
    for number, addresses in interrupted.items():
        note = "the worker stopped during the call to Postal"
        bridge.outbound.end_attempt(owner, msg_id, addresses, number, "interrupted", note)
        reason = "interrupted while handing it to Postal: not resent"
        bridge.outbound.set_states(owner, msg_id, addresses, UNCERTAIN, reason)
    return bool(interrupted)


def _drop_spool_when_done(bridge: Bridge, owner: str, msg_id: str, record: dict[str, Any] | None = None) -> None:
    """Delete the spool copy unless a recipient of ``record`` (read when not given) still needs it."""
    record = record if record is not None else bridge.outbound.get(owner, msg_id)
    window = bridge.settings.uncertain_window
    if record is None or not any(_needs_spool(e, window) for e in record["recipients"]):
        bridge.spool.delete(owner, msg_id)


def _needs_spool(entry: dict[str, Any], window: float) -> bool:
    """Still waiting to be handed over (queued on a route that sends the plaintext), or ``uncertain`` for
    less than BRIDGE_UNCERTAIN_WINDOW since its last call (the owner may resend it explicitly)."""
    if entry["state"] == QUEUED:
        return entry["route"] in NEEDS_SPOOL
    if entry["state"] == UNCERTAIN and entry["route"] == SMTP:
        ended = [a.get("ended_at") or a["started_at"] for a in entry["attempts"]] or [entry["updated_at"]]
        return time.time() - max(ended) < window
    return False


# --- reconciling with Postal ------------------------------------------------------------------------

RECONCILE_JOB = "bridge.jobs.outbound.reconcile_outbound"
RECONCILE_AFTER = 40 * 60  # Postal stops retrying a webhook after ~36 minutes
POSTAL_STATES = {"Sent": DELIVERED, "SoftFail": DELAYED, "HardFail": FAILED, "Held": HELD, "Bounced": BOUNCED}


def enqueue_reconcile(bridge: Bridge) -> str:
    """Queue one reconciler run (for the worker's sweeper, or an operator)."""
    return enqueue(bridge, RECONCILE_JOB, job_timeout=ROUTE_TIMEOUT, retry_intervals=(60,))


def reconcile_due(bridge: Bridge) -> bool:
    """Whether a recipient has been left open on Postal for RECONCILE_AFTER (one Redis read)."""
    return bool(bridge.outbound.waiting(time.time() - RECONCILE_AFTER, 1))


def reconcile_outbound(limit: int = 200) -> dict[str, int]:
    """Ask Postal's message API about recipients left open for RECONCILE_AFTER (a lost webhook leaves
    them stale), and delete spool copies nobody waits for any more. Meant to run periodically.

    An ``uncertain`` recipient whose Postal id was never learnt cannot be looked up (the API reads by
    id only): only an event carrying its Message-ID, or the owner's explicit resend, settles it.
    Every recipient looked at is touched (its ``updated_at`` moves), so the oldest do not starve the rest.
    """
    bridge = context.current()
    counts: dict[str, int] = defaultdict(int)
    try:
        client = bridge.postal_client
    except PostalNotConfigured:
        client = None
    for where in bridge.outbound.waiting(time.time() - RECONCILE_AFTER, limit):
        record = bridge.outbound.get(where.owner, where.id)
        entry = next((r for r in (record or {}).get("recipients", []) if r["address"] == where.address), None)
        if entry is None:  # its record is gone: an index entry nobody can settle, which would starve the rest
            bridge.outbound_redis.zrem(WAITING, f"{where.owner}/{where.id}/{where.address}")
            continue
        state, reason = entry["state"], entry["reason"]
        if entry["postal"] is not None and client is not None:
            answer = client.message(int(entry["postal"]["id"]))
            if isinstance(answer, PostalMessage) and answer.status in POSTAL_STATES:
                state, reason = POSTAL_STATES[answer.status], f"Postal's message API: {answer.status}"
            elif isinstance(answer, PostalMessage):
                reason = f"Postal's message API: {answer.status or 'no status'}"
        counts[state] += 1
        bridge.outbound.set_state(where.owner, where.id, where.address, state, reason)
    for key in list(bridge.objects.list("spool/")):
        _, owner, msg_id = key.split("/", 2)
        before = bridge.spool.exists(owner, msg_id)
        _drop_spool_when_done(bridge, owner, msg_id)
        counts["spool_deleted"] += int(before and not bridge.spool.exists(owner, msg_id))
    log.info("reconcile: %s", dict(counts))
    return dict(counts)


@contextmanager
def message_lock(bridge: Bridge, kind: str, owner: str, msg_id: str, job_timeout: int) -> Iterator[bool]:
    """One ``kind`` delivery job per message at a time (``deliver``: Postal, ``mailio``: peers); whether this
    one holds it. The lock outlives the job's time limit and is freed by its holder."""
    key, token = f"{PREFIX}outbound:{kind}:{owner}/{msg_id}", secrets.token_hex(8)
    try:
        held = bool(bridge.redis.set(key, token, nx=True, ex=job_timeout + 60))
    except REDIS_ERRORS as exc:
        raise RetryLater("redis unavailable") from exc
    try:
        yield held
    finally:
        if held:
            try:
                bridge.redis.eval(_RELEASE, 1, key, token)
            except REDIS_ERRORS:
                log.warning("%s: could not release the lock of %s (it expires)", kind, msg_id)


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
