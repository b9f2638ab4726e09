"""Filing received mail into folders, in batches, and re-filing it when handshakes change.

One RQ job per message costs more than receiving it (RQ's own overhead is milliseconds per
job), so the request path only notes each stored message in Redis and a single filing job
drains that set in batches: read the records, gather what screening needs in bulk (e-mail
hashes, handshakes, contacts, SPF/DMARC), decide, write the records back, and index them in
one Redis round trip per batch.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from bridge import context
from bridge.context import Bridge
from bridge.mail.auth import AuthVerdict, authenticate_sender
from bridge.mailio.identity import handshake_id
from bridge.screening import SenderStanding, classify
from bridge.store.messages import STATUS_FILED, STATUS_RECEIVED

log = logging.getLogger(__name__)

BATCH = 500
AUTH_CACHE_SECONDS = 300.0
SCREENED_FOLDERS = ("inbox", "other", "spam", "handshake")


def file_unfiled() -> int:
    """Drain the unfiled set; returns how many messages this run filed."""
    bridge = context.current()
    total = 0
    while True:
        batch = bridge.index.unfiled(BATCH)
        if not batch:
            if bridge.index.release_drain():
                continue
            return total
        records, gone = [], []
        for (address, msg_id), indexed in zip(batch, bridge.index.records(batch), strict=True):
            # The index's copy is enough to screen; the object store is read only when Redis lacks it.
            record = indexed if indexed is not None else bridge.messages.get_record(address, msg_id)
            if record is None:
                gone.append((address, msg_id))
            else:
                records.append(record)
        for address, msg_id in gone:
            bridge.index.forget_unfiled(address, msg_id)
        fresh = [r for r in records if r["status"] == STATUS_RECEIVED]
        for record in fresh:
            record["verdicts"].update(_auth(bridge, record).as_dict())
        _screen(bridge, fresh)
        now = time.time()
        for record in fresh:
            record.update(status=STATUS_FILED, filed_at=now)
            bridge.messages.put_record(record)
        bridge.index.file((record, None) for record in records)
        total += len(fresh)
        log.info("filed %d messages", len(fresh))


def rescreen_mailbox(address: str, handshake: str | None = None) -> int:
    """Re-file one mailbox's screened mail after its handshakes changed; returns how many moved.

    ``handshake``: only the sender that handshake id is about (the job queued after an upload);
    None re-screens everything (``python -m bridge rescreen``). Messages the owner moved by hand
    stay where the owner put them. Authentication verdicts are the ones recorded when the message
    arrived; only the owner's standing toward the sender is new.
    """
    bridge = context.current()
    records = [
        r
        for r in bridge.messages.records(address)
        if r["status"] == STATUS_FILED
        and r.get("folder") in SCREENED_FOLDERS
        and not r.get("moved_by_owner")
        and (handshake is None or _handshake_of(address, r) == handshake)
    ]
    before = {r["id"]: r["folder"] for r in records}
    _screen(bridge, records)
    changed = [r for r in records if r["folder"] != before[r["id"]]]
    for record in changed:
        bridge.messages.put_record(record)
    bridge.index.file((record, before[record["id"]]) for record in changed)
    log.info("rescreened mailbox: %d of %d messages moved", len(changed), len(records))
    return len(changed)


def _handshake_of(owner: str, record: dict[str, Any]) -> str | None:
    email_hash = record["sender"].get("email_hash")
    return handshake_id(owner, email_hash) if email_hash else None


def _screen(bridge: Bridge, records: list[dict[str, Any]]) -> None:
    """Decide the folder of every record, gathering handshakes and contacts per owner in bulk."""
    senders = {r["sender"]["from"] for r in records if r["sender"].get("from") and not r["sender"].get("problem")}
    hashes = bridge.sender_hashes.lookup_hashes(senders)
    by_owner: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_owner[record["mailbox"]].append(record)
    for owner, owned in by_owner.items():
        mailbox = bridge.mailboxes.get(owner)
        wanted = {}
        for record in owned:
            sender = record["sender"].get("from")
            if sender in hashes:
                record["sender"]["email_hash"] = hashes[sender]
                wanted[record["id"]] = handshake_id(owner, hashes[sender])
        statuses = bridge.handshakes.statuses(owner, wanted.values())
        contacts = bridge.contacts.known(owner, [r["sender"]["email_hash"] for r in owned if r["id"] in wanted])
        for record in owned:
            sender = record["sender"].get("from")
            standing = SenderStanding(
                handshake=statuses.get(wanted.get(record["id"], "")),
                known_contact=record["sender"].get("email_hash") in contacts,
                is_owner=bool(mailbox and sender and sender == mailbox.email),
            )
            decision = classify(record, standing)
            record["verdicts"]["handshake"] = standing.handshake
            record["verdicts"]["rule"] = decision.rule
            record.update(folder=decision.folder, reason=decision.reason)


def _auth(bridge: Bridge, record: dict[str, Any]) -> AuthVerdict:
    sender, postal, verdicts = record["sender"], record["postal"], record["verdicts"]
    mail_from = postal.get("mail_from") or ""
    key = (
        sender.get("from"),
        mail_from.rpartition("@")[2].lower(),
        sender.get("client_ip"),
        sender.get("helo"),
        verdicts.get("dkim", "none"),
        tuple(verdicts.get("dkim_domains", ())),
    )
    # One sender's mail from one server gets the same SPF/DMARC answer: known senders cost no DNS.
    cache = bridge.auth_cache
    now = time.monotonic()
    hit = cache.get(key)
    if hit and hit[0] > now:
        return hit[1]
    verdict = authenticate_sender(
        from_address=sender.get("from") if not sender.get("problem") else None,
        client_ip=sender.get("client_ip"),
        helo=sender.get("helo"),
        mail_from=mail_from,
        dkim_result=verdicts.get("dkim", "none"),
        dkim_domains=tuple(verdicts.get("dkim_domains", ())),
        resolver=bridge.resolver,
    )
    if len(cache) > 100_000:
        cache.clear()
    cache[key] = (now + AUTH_CACHE_SECONDS, verdict)
    return verdict
