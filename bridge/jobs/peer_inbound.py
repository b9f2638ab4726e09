"""Filing a peer server's message for each local recipient, then telling the sender how it went.

``file_peer_messages()`` drains the envelopes the request path noted (``bridge.mailio.accept``), in
batches, one job at a time; ``file_peer_message(eid)`` reads one stored envelope, decodes its signed CBOR
again (the JSON twin was never kept) and, for each JWE recipient ``kid`` on our host:

* no such mailbox -> 5.1.1;
* a ``handshake_request`` whose offer nonce (``bridge.store.handshakes.HandshakeOffers``) is unknown,
  used or another owner's -> 5.8.9, nothing stored; a valid one is consumed and files the message in
  ``handshake``;
* otherwise the owner's handshake for the sender decides (``bridge.screening``), the sender key being
  the full ``did:web:<host>#0x...``. The peer's signature is the authentication DKIM is for SMTP, so an
  approved Mailio sender reaches the inbox, an unknown one is screened into ``other``, a revoked one
  goes to ``spam``;
* the JWE body is stored as received (it is sealed to the recipient; the server cannot open it), the
  record first, then the body create-only: a repeat finds the body and files nothing twice -> 2.0.0.

Then it keeps the codes in ``mtp/delivery/<eid>.json``, drops the envelope, and queues
``send_delivery(eid)`` (job id ``mtp-delivery-<eid>``): a signed ``intent: "delivery"`` message POSTed to
the DIDCommMessaging endpoint of the sender's ``/.well-known/did.json`` through the guarded peer client,
retried after each of ``BRIDGE_OUTBOUND_RETRY_DELAYS`` while the peer cannot be reached, answers 5xx/429
or no valid receipt. After the last retry the pending object is deleted and the job fails (RQ keeps the
failure, the log says why); one whose job is gone (Redis lost it) is queued again by the worker's
sweeper (``resume_delivery``), and one older than all its retries could take is dropped.

``requeue_stored(bridge)`` notes every envelope still in the store again (after Redis lost its data): the
worker's sweeper calls it after it rebuilt the index, and queues ``file_peer_messages`` again when
``bridge:mtp:unfiled`` is not empty and the job noted as ``mtp-filing`` is not alive
(``bridge.jobs.sweeper``).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from bridge import context
from bridge.context import Bridge
from bridge.errors import RedisUnavailable
from bridge.jobs.outbound import _last_try
from bridge.jobs.queue import enqueue
from bridge.mailio import mtp
from bridge.mailio.accept import DRAIN_FLAG, DRAIN_SECONDS, ENVELOPES, UNFILED, note_stored, now_ms, server_key
from bridge.mailio.did import parse_did_document
from bridge.mailio.identity import did_web, handshake_id
from bridge.mailio.peers import PeerError, PeerRefused
from bridge.mailio.received import ReceivedMessage, nonce_of, parse_message_request
from bridge.mailio.server_key import server_address
from bridge.mailio.status import StatusCode, code
from bridge.screening import SenderStanding, classify
from bridge.store.index import PREFIX, REDIS_ERRORS, as_text
from bridge.store.messages import STATUS_FILED

log = logging.getLogger(__name__)

DELIVERIES = "mtp/delivery/"
DELIVERY_TIMEOUT = 120
#: The worker's sweeper looks for pending delivery messages whose job is gone at most this often.
DELIVERY_SWEEP = PREFIX + "mtp:delivery-sweep"
DELIVERY_SWEEP_SECONDS = 300
#: A pending delivery message younger than this may still be waiting for its job to be queued.
DELIVERY_GRACE_SECONDS = 60
BATCH = 100


class DeliveryNotSent(Exception):
    """The delivery message did not get a verified 2xx receipt yet: RQ retries the job."""


def file_peer_messages() -> int:
    """Drain the noted envelopes (``bridge.mailio.accept.note_stored``); returns how many copies were filed.

    Each envelope leaves the set only once it is filed, so a job that dies leaves the rest for the next.
    The drain flag follows ``MailIndex.release_drain``'s protocol, so every noted envelope is seen by this
    job or by one a request queues.
    """
    bridge = context.current()
    total = 0
    while True:
        try:
            pipe = bridge.redis.pipeline(transaction=False)
            pipe.expire(DRAIN_FLAG, DRAIN_SECONDS)
            pipe.zrange(UNFILED, 0, BATCH - 1)
            eids = [as_text(e) for e in pipe.execute()[-1]]
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
        for eid in eids:
            total += file_peer_message(eid)
            bridge.redis.zrem(UNFILED, eid)
        if eids:
            continue
        try:
            bridge.redis.delete(DRAIN_FLAG)
            if bridge.redis.zcard(UNFILED) == 0 or not bridge.redis.set(DRAIN_FLAG, "1", nx=True, ex=DRAIN_SECONDS):
                return total
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc


def requeue_stored(bridge: Bridge) -> int:
    """Note every envelope still in the store for filing (after Redis lost its data); returns how many.

    For the worker's sweeper or an operator: stored envelopes are never lost, only their note in Redis.
    """
    eids = [key.rsplit("/", 1)[1].removesuffix(".json") for key in bridge.objects.list(ENVELOPES)]
    if eids:
        note_stored(bridge, eids)
    return len(eids)


def file_peer_message(eid: str) -> int:
    """File one stored envelope for its local recipients; returns how many copies were filed now."""
    bridge = context.current()
    raw = bridge.objects.get(f"{ENVELOPES}{eid}.json")
    if raw is None:
        return 0  # filed and cleaned up by an earlier run
    envelope = json.loads(raw)
    message = parse_message_request(mtp.decode_cbor(base64.b64decode(envelope["cbor"])))
    recipients = message.local_recipients(bridge.settings.domain)
    codes: list[StatusCode] = []
    filed = 0
    for address in recipients:
        outcome, now_filed = _file_one(bridge, eid, envelope, message, address)
        filed += now_filed
        codes.append(outcome)
    if not codes:
        codes.append(code("5.4.4", description="no local recipients found", timestamp=now_ms()))
    delivery = {
        "sender_domain": envelope["sender_domain"],
        "id": message.id,
        "to": message.sender.did,
        "codes": [c.to_json() for c in codes],
    }
    delivery["created_at"] = time.time()
    bridge.objects.put(f"{DELIVERIES}{eid}.json", json.dumps(delivery, separators=(",", ":")).encode())
    queue_delivery(bridge, eid)
    bridge.objects.delete(f"{ENVELOPES}{eid}.json")
    log.info("mtp message %s: %d of %d local recipients filed now", eid, filed, len(recipients))
    return filed


def _file_one(
    bridge: Bridge, eid: str, envelope: dict[str, Any], message: ReceivedMessage, address: str
) -> tuple[StatusCode, bool]:
    """The recipient's code, and whether a copy was filed by this call."""
    now = now_ms()
    mailbox = bridge.mailboxes.get(address)
    if mailbox is None:
        return code("5.1.1", address=address, timestamp=now), False
    if bridge.messages.has_body(address, eid):
        return code("2.0.0", address=address, timestamp=now), False  # a repeat: filed before
    sender = message.sender.did
    if message.intent == mtp.INTENT_HANDSHAKE_REQUEST:
        nonce = nonce_of(message.plain_body_base64)
        if nonce is None or bridge.offers.redeem(nonce) != address:
            return code("5.8.9", address=address, timestamp=now, description="no valid handshake offer"), False
        standing = SenderStanding(handshake="request")
    else:
        hid = handshake_id(address, sender)
        standing = SenderStanding(handshake=bridge.handshakes.statuses(address, [hid]).get(hid))
    body = json.dumps(message.body, separators=(",", ":")).encode()
    record: dict[str, Any] = {
        "id": eid,
        "mailbox": address,
        "status": STATUS_FILED,
        "folder": None,
        "received_at": envelope["received_at"],
        "filed_at": time.time(),
        "size": len(body),
        "source": "mtp",
        "mtp": {
            "sender_domain": envelope["sender_domain"],
            "id": message.id,
            "type": message.type,
            "intent": message.intent,
        },
        "sender": {"from": sender, "problem": None},
        "spam": {"postal": False},
        "verdicts": {"authenticated": True, "mtp": "peer signature verified"},
        "reason": None,
    }
    decision = classify(record, standing)
    record["verdicts"] |= {"handshake": standing.handshake, "rule": decision.rule}
    record.update(folder=decision.folder, reason=decision.reason)
    bridge.messages.put_record(record)  # first: a body never exists without its record
    bridge.messages.create_body(address, eid, body)
    bridge.index.file([(record, None)])
    return code("2.0.0", address=address, timestamp=now), True


def delivery_job_id(eid: str) -> str:
    return f"mtp-delivery-{eid}"


def queue_delivery(bridge: Bridge, eid: str) -> None:
    delays = bridge.settings.outbound_retry_delays
    enqueue(
        bridge,
        "bridge.jobs.peer_inbound.send_delivery",
        eid,
        job_timeout=DELIVERY_TIMEOUT,
        retry_intervals=delays,
        job_id=delivery_job_id(eid),
    )


def delivery_sweep_due(bridge: Bridge) -> bool:
    """Whether the sweeper should look at pending delivery messages now (at most every DELIVERY_SWEEP_SECONDS
    across all workers: it lists them in the object store)."""
    try:
        return bool(bridge.redis.set(DELIVERY_SWEEP, "1", nx=True, ex=DELIVERY_SWEEP_SECONDS))
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc


def pending_deliveries(bridge: Bridge) -> list[str]:
    """The eids of delivery messages not sent yet (their objects wait under ``mtp/delivery/``)."""
    return [key.rsplit("/", 1)[1].removesuffix(".json") for key in bridge.objects.list(DELIVERIES)]


def resume_delivery(bridge: Bridge, eid: str) -> str | None:
    """For the sweeper, about a pending delivery message whose job is not alive: queue it again ("requeued"),
    or drop it once older than every retry could have taken ("dropped"); None when it is too new or gone."""
    raw = bridge.objects.get(f"{DELIVERIES}{eid}.json")
    if raw is None:
        return None
    age = time.time() - float(json.loads(raw).get("created_at", 0))
    delays = bridge.settings.outbound_retry_delays
    if age > sum(delays) + (len(delays) + 1) * DELIVERY_TIMEOUT:
        _give_up(bridge, eid, f"still pending after {int(age)} s and its job is gone")
        return "dropped"
    if age < DELIVERY_GRACE_SECONDS:
        return None
    queue_delivery(bridge, eid)
    return "requeued"


def send_delivery(eid: str) -> bool:
    """POST the signed delivery message for ``eid``; True once a peer took it (or it can never take it)."""
    bridge = context.current()
    raw = bridge.objects.get(f"{DELIVERIES}{eid}.json")
    if raw is None:
        return True
    delivery = json.loads(raw)
    domain = delivery["sender_domain"]
    key = server_key(bridge)
    codes = [StatusCode.from_json(c) for c in delivery["codes"]]
    payload = mtp.delivery_message(
        msg_id=delivery["id"],
        from_did=did_web(bridge.settings.domain, server_address(key)),
        to_did=delivery["to"],
        codes=codes,
        timestamp_ms=now_ms(),
    )
    body = mtp.body_bytes(mtp.sign_request(mtp.DIDCOMM_REQUEST, payload, key, bridge.settings.domain))
    try:
        endpoint = _messaging_endpoint(bridge, domain)
        answer = bridge.peers.post(endpoint, body)
    except PeerRefused as exc:
        return _give_up(bridge, eid, f"refused by the peer guard: {exc}")
    except PeerError as exc:
        return _not_yet(bridge, eid, f"{domain}: {exc}")
    if answer.status >= 500 or answer.status == 429:
        return _not_yet(bridge, eid, f"{domain} answered {answer.status}")
    if not 200 <= answer.status < 300:
        return _give_up(bridge, eid, f"{domain} answered {answer.status}")
    if problem := _receipt_problem(bridge, domain, answer.body, delivery["id"]):
        return _not_yet(bridge, eid, f"{domain}: {problem}")
    bridge.objects.delete(f"{DELIVERIES}{eid}.json")
    log.info("mtp delivery message for %s sent to %s", eid, domain)
    return True


def _messaging_endpoint(bridge: Bridge, domain: str) -> str:
    """The first DIDCommMessaging endpoint of ``https://<domain>/.well-known/did.json`` (as the reference)."""
    answer = bridge.peers.get(bridge.peers.url(domain, "/.well-known/did.json"))
    if answer.status != 200:
        raise PeerRefused(f"{domain}: /.well-known/did.json answered {answer.status}")
    try:
        endpoint = parse_did_document(json.loads(answer.body)).messaging_endpoint
    except (ValueError, RecursionError) as exc:
        raise PeerRefused(f"{domain}: unusable DID document ({exc})") from None
    if endpoint is None:
        raise PeerRefused(f"{domain}: its DID document names no DIDCommMessaging endpoint")
    return endpoint


def _receipt_problem(bridge: Bridge, domain: str, body: bytes, msg_id: str) -> str | None:
    """What is wrong with the peer's 2xx answer, or None: it must be its signed receipt for this id;
    otherwise the delivery is sent again."""
    try:
        signed = mtp.parse_signed(body, mtp.DIDCOMM_REQUEST, max_bytes=64 * 1024)
        route = bridge.discovery.discover(domain)
        payload = mtp.verify(signed, route.public_key)
    except (mtp.MtpError, ValueError) as exc:
        return f"receipt unusable ({exc})"
    if (payload.get("didCommMessage") or {}).get("id") != msg_id:
        return "receipt names another id"
    return None


def _not_yet(bridge: Bridge, eid: str, why: str) -> bool:
    """Not sent this time: RQ retries the job. After its last retry the pending object is deleted (nothing
    would ever send it) and the job still fails, so RQ's failed registry and the log keep why."""
    if _last_try():
        _give_up(bridge, eid, f"gave up after its retries: {why}")
    raise DeliveryNotSent(why)


def _give_up(bridge: Bridge, eid: str, why: str) -> bool:
    log.warning("mtp delivery message for %s not sent: %s", eid, why)
    bridge.objects.delete(f"{DELIVERIES}{eid}.json")
    return True
