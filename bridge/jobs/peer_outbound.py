"""The Mailio leg of sending: hand a message's ``mailio`` recipients to their Mailio servers.

``deliver_mailio(owner, msg_id)`` (queued by the routing job once a server key exists) takes every
recipient routed ``mailio`` and still ``queued``, resolves their keys through their servers
(``bridge.mailio.peer_send``), and posts one signed envelope per Mailio host:

* a verified receipt -> ``accepted`` (the peer's signed delivery message later moves it to
  ``delivered``/``failed``: ``bridge.web.mtp`` applies those);
* no such user, a refused address (SSRF guard), a peer that refuses the message -> ``failed``;
* a peer or DNS that does not answer, a receipt that does not verify -> retried after the next of
  BRIDGE_OUTBOUND_RETRY_DELAYS, then ``failed``. Resending is safe: the envelope keeps the message's id,
  on which the peer dedupes, so a retry never files twice there.

The body: what the owner's client sealed (``sealed_by: client`` on the sent record: sent as it is,
trimmed to each host's recipients), else the spool's plaintext sealed here to the recipients' keys;
every recipient's reason says which. A message submitted with a ``handshake_offer`` (sent record) goes to
the offer's owner as intent ``handshake_request`` with its nonce; the offer's owner's server files it in
``handshake`` (5.8.9 back when the nonce is unknown, used or expired). One job per message at a time (a
Redis lock). Arguments are ids.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

from bridge import context
from bridge.context import Bridge
from bridge.jobs.outbound import RetryLater, _drop_spool_when_done, _last_try, message_lock
from bridge.jobs.queue import enqueue
from bridge.mailio.discovery import MAILIO
from bridge.mailio.identity import did_web
from bridge.mailio.offer import Offer, parse_offer
from bridge.mailio.peer_send import NotSent, PeerSender, Resolution, Sent, for_host, seal_for_peers
from bridge.mailio.server_key import ServerKeyError, load_server_key
from bridge.sealing import Recipient
from bridge.store.outbound import ACCEPTED, FAILED, QUEUED

log = logging.getLogger(__name__)

MAILIO_JOB = "bridge.jobs.peer_outbound.deliver_mailio"
MAILIO_TIMEOUT = 900  # per host: discovery, a DID lookup and a post, each bounded by BRIDGE_PEER_TIMEOUT
SEALED_BY_CLIENT, SEALED_BY_SERVER = "client", "server"


def mailio_ready(bridge: Bridge) -> bool:
    """Whether this bridge can sign envelopes (its server key exists): the routing job then hands over."""
    return bridge.settings.server_key_path.exists()


def enqueue_mailio(bridge: Bridge, owner: str, msg_id: str) -> str:
    delays = bridge.settings.outbound_retry_delays
    return enqueue(bridge, MAILIO_JOB, owner, msg_id, job_timeout=MAILIO_TIMEOUT, retry_intervals=delays)


def sender(bridge: Bridge) -> PeerSender:
    """The bridge's peer sender; ``ServerKeyError`` without a server key."""
    key = load_server_key(bridge.settings.server_key_path)
    return PeerSender(bridge.peers, bridge.discovery, key, bridge.settings.domain)


def deliver_mailio(owner: str, msg_id: str) -> dict[str, int]:
    """Send the message to its queued Mailio recipients; returns outcome counts (for logs and tests)."""
    bridge = context.current()
    with message_lock(bridge, "mailio", owner, msg_id, MAILIO_TIMEOUT) as held:
        if not held:
            raise RetryLater("another Mailio delivery job of this message is running")
        counts = _deliver(bridge, owner, msg_id)
    log.info("mailio: %s %s", msg_id, counts)
    return counts


def _deliver(bridge: Bridge, owner: str, msg_id: str) -> dict[str, int]:
    outbound = bridge.outbound
    record = outbound.get(owner, msg_id)
    todo = [e["address"] for e in (record or {}).get("recipients", []) if e["route"] == MAILIO and e["state"] == QUEUED]
    if record is None or not todo:
        return {}
    try:
        peer = sender(bridge)
    except ServerKeyError as exc:
        return _not_sent(bridge, owner, msg_id, todo, f"no server key: {exc}")
    sent_record = bridge.messages.get_record(owner, msg_id) or {}
    body = _body(bridge, owner, msg_id, sent_record)
    if body is None:
        for address in todo:
            outbound.set_state(owner, msg_id, address, FAILED, "the copy to send is no longer kept: send it again")
        return {"failed": len(todo)}
    hashes = bridge.sender_hashes.lookup_hashes(todo)
    resolved = peer.resolve(owner, {a: hashes[a.lower()] for a in todo})
    counts: dict[str, int] = defaultdict(int)
    left: dict[str, str] = {}
    by_host: dict[str, list[Resolution]] = defaultdict(list)
    for address in todo:
        found = resolved[address]
        if found.temporary:
            left[address] = found.reason
        elif not found.sealable:
            outbound.set_state(owner, msg_id, address, FAILED, found.reason)
            counts["failed"] += 1
        else:
            by_host[str(found.host)].append(found)
    from_did = did_web(bridge.settings.domain, owner)
    offer = parse_offer(sent_record["handshake_offer"]) if sent_record.get("handshake_offer") else None
    for host, group in by_host.items():
        if offer is not None:
            group, refused = _offer_group(offer, group)
            for item in refused:
                reason = f"the handshake offer is {offer.address}'s at {offer.domain}, not this recipient's"
                outbound.set_state(owner, msg_id, item.address, FAILED, reason)
                counts["failed"] += 1
            if not group:
                continue
        sealed_by = SEALED_BY_CLIENT if isinstance(body, dict) else SEALED_BY_SERVER
        _note_peers(bridge, owner, msg_id, group, sealed_by)  # before posting: the delivery may beat the receipt
        nonce = offer.nonce if offer is not None else ""
        outcome, how, covered = _send_to_host(peer, host, msg_id, from_did, body, group, nonce)
        for item in group:
            if isinstance(outcome, Sent) and item.kid in covered:
                outbound.set_state(owner, msg_id, item.address, ACCEPTED, f"taken by {host} (signed receipt); {how}")
                counts["accepted"] += 1
            elif isinstance(outcome, Sent):
                reason = "the body sealed by the client has no key for this recipient: send it again"
                outbound.set_state(owner, msg_id, item.address, FAILED, reason)
                counts["failed"] += 1
            elif outcome.temporary:
                left[item.address] = outcome.reason
            else:
                outbound.set_state(owner, msg_id, item.address, FAILED, f"{outcome.reason}; {how}")
                counts["failed"] += 1
    if left:
        counts |= _not_sent(bridge, owner, msg_id, list(left), "; ".join(dict.fromkeys(left.values())))
    _drop_spool_when_done(bridge, owner, msg_id)
    return dict(counts)


def _note_peers(bridge: Bridge, owner: str, msg_id: str, group: list[Resolution], sealed_by: str) -> None:
    """Record on each entry where it is sent (``peer``: host and 0x address, ``did``), so that only that
    server's signed delivery message may change its state (``bridge.mailio.accept.apply_delivery``), and who
    sealed what it receives (``peer.sealed_by``: ``client`` or ``server``; the reason changes later)."""
    peers, dids = {}, {}
    for item in group:
        if item.kid and item.host:
            peers[item.address] = {"host": item.host, "address": item.kid.rpartition("#")[2], "sealed_by": sealed_by}
            dids[item.address] = item.kid
    bridge.outbound.note_peers(owner, msg_id, peers, dids)


def _body(bridge: Bridge, owner: str, msg_id: str, sent_record: dict[str, Any]) -> bytes | dict[str, Any] | None:
    """The client's sealed JWE (a dict) or the spool's plaintext (bytes); None when neither is kept."""
    if sent_record.get("sealed_by") == SEALED_BY_CLIENT:
        stored = bridge.messages.get_body(owner, msg_id)
        return json.loads(stored) if stored else None
    spooled = bridge.spool.get(owner, msg_id)
    return spooled[1] if spooled else None


def _offer_group(offer: Offer, group: list[Resolution]) -> tuple[list[Resolution], list[Resolution]]:
    """Who of a host's recipients the handshake offer is for (its owner's 0x address; the send API allows one
    recipient), and who it is not: a handshake request goes to the offer's owner only."""
    mine = [item for item in group if str(item.kid).rpartition("#")[2] == offer.address]
    return mine, [item for item in group if item not in mine]


def _send_to_host(
    peer: PeerSender,
    host: str,
    msg_id: str,
    from_did: str,
    body: bytes | dict[str, Any],
    group: list[Resolution],
    nonce: str = "",
) -> tuple[Sent | NotSent, str, list[str]]:
    """One envelope to one host: the outcome, how the body was sealed, and the kids it is sealed to; with an
    offer's ``nonce``, a handshake request."""
    if isinstance(body, dict):
        sealed, kids = for_host(body, host)
        if nonce:  # a handshake request is for the offer's owner alone
            sealed, kids = _only(sealed, [str(item.kid) for item in group])
        how = "sealed by the owner's client"
        if not kids:
            return NotSent("the body sealed by the client has no key for this host's recipients", False), how, kids
    else:
        kids = [str(item.kid) for item in group]
        aad = json.dumps({"from": from_did}, separators=(",", ":")).encode()
        sealed = seal_for_peers(body, [Recipient(str(item.kid), item.x25519 or b"") for item in group], aad)
        how = "sealed by the server"
    if nonce:
        how += "; a handshake request"
    return peer.deliver(host, msg_id, from_did, sealed, kids, nonce), how, kids


def _only(sealed: dict[str, Any], kids: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The JWE trimmed to the recipient entries of ``kids``."""
    entries = [r for r in sealed.get("recipients") or () if r.get("header", {}).get("kid") in kids]
    return {**sealed, "recipients": entries}, [r["header"]["kid"] for r in entries]


def _not_sent(bridge: Bridge, owner: str, msg_id: str, addresses: list[str], reason: str) -> dict[str, int]:
    """Not sent for a reason that may pass: retry later, or after the last delay fail with ``reason``."""
    if not _last_try():
        for address in addresses:
            bridge.outbound.set_route(owner, msg_id, address, MAILIO, reason=f"will retry: {reason}"[:300])
        raise RetryLater(reason)
    for address in addresses:
        bridge.outbound.set_state(owner, msg_id, address, FAILED, f"gave up after retries: {reason}"[:300])
    return {"failed": len(addresses)}
