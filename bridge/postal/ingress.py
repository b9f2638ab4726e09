"""Accepting one verified Postal delivery: the work that must happen before Postal gets its 2xx.

Order matters and every step is safe to repeat:

1. resolve the mailbox (unknown -> the caller answers 404 or 429);
2. derive the message id from Postal's delivery key (same id for every retry); a DKIM-signed
   message whose body is stored already is a retry: it is noted again and answered without DNS;
3. read the sender facts (From, Postal's spam flag and client IP) and check DKIM, the only
   verdict that needs the plaintext, within BRIDGE_DKIM_DNS_BUDGET seconds of DNS (temperror
   after): together they are the message's initial record;
4. seal the message to the owner, the record as the JWE's authenticated ``aad``, and create
   the body object: one create-only write (a retry finds it there and stores nothing);
5. note it for filing in Redis (one round trip) and enqueue a filing job if none is queued.

Only then is the delivery acknowledged. Filing into folders happens in the worker, in batches.
This module knows nothing of Flask; it raises the stores' own errors for the web layer to map.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from bridge import metrics
from bridge.context import Bridge
from bridge.dns import dns_budget
from bridge.jobs.queue import enqueue
from bridge.mail.auth import check_dkim, has_dkim_signature
from bridge.mail.headers import sender_facts
from bridge.postal.payloads import InboundMessage
from bridge.sealing import seal, sealed_chunks
from bridge.store.messages import STATUS_RECEIVED, message_id

log = logging.getLogger(__name__)

STORED = "stored"
DUPLICATE = "duplicate"
UNKNOWN_RECIPIENT = "unknown recipient"


@dataclass(frozen=True)
class Outcome:
    result: str
    message_id: str | None = None


def accept_postal_delivery(bridge: Bridge, message: InboundMessage, postal_kid: str) -> Outcome:
    mailbox = bridge.mailboxes.resolve(message.rcpt_to)
    if mailbox is None:
        return Outcome(UNKNOWN_RECIPIENT)
    msg_id = message_id(message.delivery_key(postal_kid))
    signed = has_dkim_signature(message.message)
    if signed and bridge.messages.has_body(mailbox.address, msg_id):
        # A retry of a stored delivery (Postal re-sends after a timeout or a 5xx): answer it without
        # paying for DKIM's DNS again. Unsigned mail needs no such check: its retry asks no DNS, and
        # the create-only write below is the dedupe either way.
        return _noted(bridge, mailbox.address, msg_id, message, None, time.time())
    facts = sender_facts(message.message)
    # DKIM is the one check that needs the plaintext: run it before sealing (SPF, DMARC and the
    # handshake lookup need only envelope facts and run in the filing job). Its DNS is a sender's
    # to choose, so it gets a budget: past it the verdict is temperror, and Postal gets its answer.
    dkim_result, dkim_domains = "none", tuple[str, ...]()
    if signed:
        with dns_budget(bridge.settings.dkim_dns_budget):
            dkim_result, dkim_domains = check_dkim(message.message, bridge.resolver)
    received_at = time.time()
    spam = facts.postal_spam if message.spam_status is None else message.spam_status == "Spam"
    record: dict[str, Any] = {
        "id": msg_id,
        "mailbox": mailbox.address,
        "status": STATUS_RECEIVED,
        "folder": None,
        "received_at": received_at,
        "size": len(message.message),
        "source": "postal",
        "postal": {
            "kid": postal_kid,
            "id": message.postal_id,
            "token": message.token,
            "rcpt_to": message.rcpt_to,
            "mail_from": message.mail_from,
            "format": message.format,
            "rebuilt": message.rebuilt,
        },
        "sender": {
            "from": facts.from_address,
            "problem": facts.from_problem,
            "client_ip": facts.client_ip,
            "helo": facts.helo,
        },
        "spam": {"postal": spam, "score": facts.postal_spam_score},
        "verdicts": {"dkim": dkim_result, "dkim_domains": list(dkim_domains)},
        "reason": None,
    }
    aad = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    sealed = seal(message.message, [mailbox.recipient(bridge.settings.domain)], aad)
    created = bridge.messages.create_body(mailbox.address, msg_id, sealed_chunks(sealed))
    del sealed
    if created:
        metrics.STORED_BYTES.labels(source="postal").inc(len(message.message))
    return _noted(bridge, mailbox.address, msg_id, message, aad if created else None, received_at)


def _noted(
    bridge: Bridge, address: str, msg_id: str, message: InboundMessage, record: bytes | None, received_at: float
) -> Outcome:
    """Queue a stored body for filing; ``record`` only for a new message (None: a retry of a stored one).

    Only a new message's record goes to the index: a retry's may long since have been filed (and
    moved by its owner), so for a retry the filing job reads the truth from the object store.
    """
    if bridge.index.note_received(address, msg_id, received_at, record):
        enqueue_filing(bridge)
    result = STORED if record is not None else DUPLICATE
    log.info("postal delivery %s: postal id %s -> %s", result, message.postal_id, msg_id)
    return Outcome(result, msg_id)


#: The filing job's time limit: a batch's DNS is bounded well below it (bridge.jobs.inbound), so it
#: fires only on a real hang, and a hung job no longer holds every job behind it for ten minutes.
FILING_JOB_TIMEOUT = 180
#: Seconds between a failed filing job's retries (a store or Redis that went away). Beyond these,
#: the worker's sweeper queues filing again while stored mail waits unfiled.
FILING_RETRY_INTERVALS = (2, 5, 15, 30, 60)


def enqueue_filing(bridge: Bridge) -> None:
    """Queue the batch filing job (the job ids nothing: it drains the index's unfiled set).

    It is retried with backoff when it fails (needs the scheduler the worker runs), and its id is
    noted so the worker's sweeper can tell a live filing job from a dead one.
    """
    job_id = enqueue(
        bridge,
        "bridge.jobs.inbound.file_unfiled",
        job_timeout=FILING_JOB_TIMEOUT,
        retry_intervals=FILING_RETRY_INTERVALS,
    )
    bridge.index.note_job("filing", job_id)
