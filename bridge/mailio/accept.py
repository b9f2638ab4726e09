"""Accepting one signed MTP request from a peer server: the work that must happen before it gets its answer.

Order matters; nothing is stored until the last step, and every step is safe to repeat:

1. read the envelope strictly (``mtp.parse_signed``: size, fields, padded base64, IDNA ``senderDomain``);
2. authenticate: the Ed25519 signature over the received CBOR bytes must verify with the key
   ``senderDomain`` publishes (discovery, cached in Redis). If it does not, DNS is asked once more
   (the peer may have rotated its key), at most once per domain every ``REFRESH_SECONDS``, so forged
   requests cannot make us hammer DNS. Only then is the CBOR decoded, and only the CBOR is used;
3. check what it says (``bridge.mailio.received``): shape (400), timestamp inside
   ``BRIDGE_MTP_TIME_WINDOW`` (403), ``from`` on ``senderDomain`` (403);
4. count it against ``senderDomain``'s ``BRIDGE_MTP_RATE_LIMIT`` per minute (429). Counted after the
   signature verifies, so a forger cannot spend a real peer's budget;
5. a message or handshake request: its (senderDomain, id) is looked up in the replay cache (with the
   rate count, one round trip), then the verified envelope is written create-only to the object store
   (the durable dedupe) and noted for the draining filing job (``bridge.jobs.peer_inbound``), which is
   queued unless one is. A delivery message is applied to our outbound record
   at once (``apply_delivery``).

**A repeated id is answered 202 (idempotent), with a fresh signed receipt for the same id, and stores
and files nothing.** Only the sending domain can sign a request under its name, so a repeat is either
its own retry, whose first 202 may have been lost (a 409 would make it report a delivered message as
failed: the reference sender turns any non-2xx into 4.4.4), or a replay by someone who captured it,
which within the window changes nothing and outside it is refused as stale. The replay cache
(``mtp:seen``) outlives the window (2 windows + a minute), and the create-only envelope is the dedupe
across processes even when Redis lost it.

Protocol errors are ``MtpError`` (the web layer answers its status and one-line reason); Redis, the
store and DNS raise ``DependencyUnavailable`` (503). Nothing here knows Flask.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.context import Bridge
from bridge.dns import DNSUnavailable
from bridge.errors import DependencyUnavailable, RedisUnavailable
from bridge.jobs.queue import enqueue
from bridge.mailio import mtp
from bridge.mailio.discovery import MAILIO, InvalidDomain
from bridge.mailio.received import (
    ReceivedMessage,
    check_fresh,
    check_sender,
    parse_did_web,
    parse_message_request,
)
from bridge.mailio.server_key import ServerKeyError, load_server_key
from bridge.mailio.status import StatusCode
from bridge.store.index import PREFIX, REDIS_ERRORS
from bridge.store.messages import message_id
from bridge.store.outbound import DELAYED, DELIVERED, FAILED, NoSuchRecord, OutboundBusy

log = logging.getLogger(__name__)

ENVELOPES = "mtp/inbound/"
SEEN = PREFIX + "mtp:seen:"
UNFILED = PREFIX + "mtp:unfiled"
DRAIN_FLAG = PREFIX + "mtp:drain"
DRAIN_SECONDS = 120
FILING_JOB = "mtp-filing"
RATE = PREFIX + "mtp:rate:"
REFRESH = PREFIX + "mtp:refresh:"
#: A forced fresh discovery per sender domain at most this often (after a signature failed).
REFRESH_SECONDS = 10
#: The filing job's limits: it reads one envelope and writes a few objects per recipient.
FILING_TIMEOUT = 300
FILING_RETRIES = (5, 30, 120, 600)


class ServerKeyMissing(DependencyUnavailable):
    """The server key cannot be loaded: nothing can be signed (503, and the log says why)."""


@dataclass(frozen=True)
class Accepted:
    id: str
    duplicate: bool = False


def server_key(bridge: Bridge) -> Ed25519PrivateKey:
    try:
        return load_server_key(bridge.settings.server_key_path)
    except ServerKeyError as exc:
        log.error("mtp: %s", exc)
        raise ServerKeyMissing("the server key is not configured") from None


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope_id(sender_domain: str, msg_id: str) -> str:
    """Our id for a peer's message: the same for every repeat of (domain, id); the storage id of its copies."""
    return message_id(f"mtp\0{sender_domain}\0{msg_id}")


# --- authentication --------------------------------------------------------------------------


def _published_key(bridge: Bridge, domain: str, *, fresh: bool) -> bytes:
    try:
        route = bridge.discovery.discover(domain, fresh=fresh)
    except InvalidDomain:
        raise mtp.MtpError(400, "senderDomain is an invalid domain") from None
    if route.temporary:
        raise DNSUnavailable(f"{domain}: DNS did not answer")
    if route.route != MAILIO:
        raise mtp.MtpError(401, "senderDomain publishes no Mailio key")
    return route.public_key


def _may_refresh(bridge: Bridge, domain: str) -> bool:
    try:
        return bool(bridge.redis.set(REFRESH + domain, "1", nx=True, ex=REFRESH_SECONDS))
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc


def authenticate(bridge: Bridge, body: bytes, payload_key: str) -> tuple[mtp.SignedRequest, dict[str, Any]]:
    """The envelope and the payload decoded from its verified CBOR; ``MtpError`` 400/401/413 otherwise."""
    signed = mtp.parse_signed(body, payload_key, max_bytes=bridge.settings.mtp_max_bytes)
    assert signed.sender_domain is not None
    try:
        return signed, mtp.verify(signed, _published_key(bridge, signed.sender_domain, fresh=False))
    except mtp.MtpError as exc:
        if exc.status != 401 or not _may_refresh(bridge, signed.sender_domain):
            raise
    # The key may have been rotated since we cached it: ask DNS once more.
    return signed, mtp.verify(signed, _published_key(bridge, signed.sender_domain, fresh=True))


def check_rate(bridge: Bridge, domain: str, *, seen_id: str | None = None) -> bool:
    """Count a request against ``domain``'s BRIDGE_MTP_RATE_LIMIT per fixed minute (429 above), and say in
    the same round trip whether the envelope ``seen_id`` is in the replay cache."""
    key = f"{RATE}{domain}:{int(time.time() // 60)}"
    try:
        pipe = bridge.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        if seen_id is not None:
            pipe.exists(SEEN + seen_id)
        answers = pipe.execute()
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc
    if int(answers[0]) > bridge.settings.mtp_rate_limit:
        raise mtp.MtpError(429, f"more than {bridge.settings.mtp_rate_limit} requests a minute from senderDomain")
    return seen_id is not None and bool(answers[2])


# --- POST /api/v1/mtp/message ------------------------------------------------------------------


def accept_message(bridge: Bridge, body: bytes) -> Accepted:
    """Authenticate, check and durably take one ``didCommRequest``; the caller answers 202 with a receipt."""
    signed, payload = authenticate(bridge, body, mtp.DIDCOMM_REQUEST)
    domain = signed.sender_domain
    assert domain is not None
    message = parse_message_request(payload)
    check_fresh(message.timestamp, now_ms(), bridge.settings.mtp_time_window)
    check_sender(message, domain)
    if message.intent == mtp.INTENT_DELIVERY:
        check_rate(bridge, domain)
        changed = apply_delivery(bridge, domain, message)
        log.info("mtp delivery message from %s: %d recipient states changed", domain, changed)
        return Accepted(message.id)
    return _store(bridge, signed, domain, message)


def _store(bridge: Bridge, signed: mtp.SignedRequest, domain: str, message: ReceivedMessage) -> Accepted:
    """One Redis round trip to count and look the id up, the create-only envelope, one more to note it."""
    eid = envelope_id(domain, message.id)
    if check_rate(bridge, domain, seen_id=eid):
        log.info("mtp message %s from %s: a repeated id, nothing stored", eid, domain)
        return Accepted(message.id, duplicate=True)
    envelope = {
        "sender_domain": domain,
        "id": message.id,
        "received_at": time.time(),
        "cbor": base64.b64encode(signed.cbor).decode("ascii"),
        "signature": base64.b64encode(signed.signature).decode("ascii"),
    }
    created = bridge.objects.create(f"{ENVELOPES}{eid}.json", json.dumps(envelope, separators=(",", ":")).encode())
    # Noted again for a repeat that found the envelope still there: the first request may have died before
    # noting it, and filing twice files nothing twice.
    note_stored(bridge, [eid], seen_seconds=2 * bridge.settings.mtp_time_window + 60)
    log.info("mtp message %s from %s: %s", eid, domain, "stored" if created else "a repeated id, noted again")
    return Accepted(message.id, duplicate=not created)


def note_stored(bridge: Bridge, eids: list[str], *, seen_seconds: int | None = None) -> None:
    """Note stored envelopes for the filing job (one round trip) and queue it unless one is queued.

    Like Postal deliveries, MTP messages are filed in batches by one draining job: an RQ job per message
    would cost more than receiving it.
    """
    try:
        pipe = bridge.redis.pipeline(transaction=False)
        for eid in eids:
            if seen_seconds is not None:
                pipe.set(SEEN + eid, "1", ex=seen_seconds)
            pipe.zadd(UNFILED, {eid: time.time()}, nx=True)
        pipe.set(DRAIN_FLAG, "1", nx=True, ex=DRAIN_SECONDS)
        queue_one = pipe.execute()[-1]
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc
    if queue_one:
        queue_filing(bridge)


def queue_filing(bridge: Bridge, *, take_drain: bool = False) -> None:
    """Queue the draining filing job and note its id (``FILING_JOB``) for the worker's sweeper, which tells a
    live filing job from a dead one by it. ``take_drain`` (the sweeper replacing a dead job) takes the drain
    flag first, so that requests arriving meanwhile do not queue a second drainer."""
    if take_drain:
        try:
            bridge.redis.set(DRAIN_FLAG, "1", ex=DRAIN_SECONDS)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable("redis unavailable") from exc
    job_id = enqueue(
        bridge,
        "bridge.jobs.peer_inbound.file_peer_messages",
        job_timeout=FILING_TIMEOUT,
        retry_intervals=FILING_RETRIES,
    )
    bridge.index.note_job(FILING_JOB, job_id)


def unfiled_count(bridge: Bridge) -> int:
    """How many stored envelopes wait for the filing job."""
    try:
        return int(bridge.redis.zcard(UNFILED))
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc


def signed_receipt(bridge: Bridge, msg_id: str) -> dict[str, Any]:
    """The 202 body: a receipt for ``msg_id`` signed by our key, with our domain."""
    return mtp.sign_request(
        mtp.DIDCOMM_REQUEST, mtp.receipt(msg_id, now_ms()), server_key(bridge), bridge.settings.domain
    )


# --- delivery messages about what we sent ------------------------------------------------------


def _peer_of(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(Mailio host, 0x address) a recipient entry was sent to by the Mailio leg, or None.

    The sending leg writes ``entry["peer"] = {"host": <the Mailio host the message was POSTed to>,
    "address": <the recipient's 0x address>}`` (``"mailio"`` is read too), or ``entry["did"]``, the
    recipient's ``did:web:<host>#0x...``.
    """
    for name in ("peer", "mailio"):
        found = entry.get(name)
        if isinstance(found, dict) and isinstance(found.get("host"), str) and isinstance(found.get("address"), str):
            return found["host"].lower(), found["address"].lower()
    try:
        did = parse_did_web(entry.get("did"))
    except ValueError:
        return None
    return did.host, did.address


def state_of(code: StatusCode) -> str:
    """2.0.0 delivered; 4.x.x delayed; everything else failed, the reference's class-2 failures included
    (2.2.1 disabled, 2.2.2 mailbox full, 2.3.5 no such user: mtp-wire.md section 4)."""
    if code.class_ == 2 and code.subject == 0:
        return DELIVERED
    return DELAYED if code.class_ == 4 else FAILED


def apply_delivery(bridge: Bridge, domain: str, message: ReceivedMessage) -> int:
    """Apply a delivery message to the outbound record it reports on; returns how many recipients moved.

    Its ``to`` names our sender (``did:web:<our domain>#<owner>``) and its ``id`` is the outbound record's.
    Only recipients the Mailio leg sent to ``domain`` can be changed: anything else (an unknown record,
    another server's recipients) is refused with 403 and changes nothing.
    """
    try:
        owner = parse_did_web(message.to[0])
    except ValueError:
        raise mtp.MtpError(400, "didCommMessage.to[0] is not a did:web identity") from None
    record = bridge.outbound.get(owner.address, message.id) if owner.host == bridge.settings.domain else None
    ours = []
    for entry in record["recipients"] if record else ():
        peer = _peer_of(entry)
        if entry.get("route") == "mailio" and peer is not None and peer[0] == domain:
            ours.append((entry["address"], peer[1]))
    if not ours:
        raise mtp.MtpError(403, "no message of ours with this id went to senderDomain")
    moves: dict[tuple[str, str], list[str]] = {}
    for code in message.codes:
        reason = f"{code.code} {code.description}".strip()
        for address, peer_address in ours:
            if not code.address or code.address.lower() == peer_address:
                moves.setdefault((state_of(code), reason), []).append(address)
    moved = 0
    try:
        for (state, reason), addresses in moves.items():
            moved += len(bridge.outbound.set_states(owner.address, message.id, addresses, state, reason))
    except NoSuchRecord:
        raise mtp.MtpError(403, "no message of ours with this id went to senderDomain") from None
    except OutboundBusy as exc:
        raise DependencyUnavailable("the outbound record is busy, retry later") from exc
    return moved
