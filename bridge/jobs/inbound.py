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

from bridge import context, metrics
from bridge.context import Bridge
from bridge.jobs.auth import RECHECK_DELAYS, authenticate_records, needs_recheck, sender_key
from bridge.mailio.identity import handshake_id
from bridge.screening import SenderStanding, classify
from bridge.store.messages import STATUS_FILED, STATUS_RECEIVED

log = logging.getLogger(__name__)

BATCH = 500
SCREENED_FOLDERS = ("inbox", "other", "spam", "handshake")


def file_unfiled() -> int:
    """Drain the unfiled set; returns how many messages this run filed."""
    bridge = context.current()
    total = 0
    while True:
        started = time.monotonic()
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
        verdicts = authenticate_records(bridge, fresh)
        for record in fresh:
            record["verdicts"].update(verdicts[sender_key(record)].as_dict())
        _screen(bridge, fresh)
        now = time.time()
        for record in fresh:
            record.update(status=STATUS_FILED, filed_at=now)
            bridge.messages.put_record(record)
        bridge.index.file((record, None) for record in records)
        # After filing: a recheck that ran first would find the message not yet filed.
        bridge.index.schedule_rechecks(
            (r["mailbox"], r["id"], 0, now + RECHECK_DELAYS[0]) for r in fresh if needs_recheck(r["verdicts"])
        )
        total += len(fresh)
        metrics.FILING_SECONDS.labels(job="file_unfiled").observe(time.monotonic() - started)
        metrics.FILED.labels(job="file_unfiled").inc(len(fresh))
        log.info("filed %d messages", len(fresh))


def recheck_auth() -> int:
    """Ask DNS again for filed messages whose SPF/DMARC was a temperror; re-screen them. Returns how many moved.

    Queued by the worker's sweeper when re-evaluations are due. A message its owner moved keeps its
    folder (its verdicts are still brought up to date); one still temperror is asked again after the
    next of ``RECHECK_DELAYS``, and after the last it keeps the verdict it has.
    """
    bridge = context.current()
    due = bridge.index.due_rechecks(time.time(), BATCH)
    records: list[dict[str, Any]] = []
    dropped = []
    for address, msg_id, tries in due:
        record = bridge.messages.get_record(address, msg_id)
        if record is None or record.get("status") != STATUS_FILED:
            dropped.append((address, msg_id))  # gone, or not filed (filing will authenticate it)
            continue
        record["auth_rechecks"] = tries + 1
        records.append(record)
    verdicts = authenticate_records(bridge, records, use_cache=False)
    for record in records:
        record["verdicts"].update(verdicts[sender_key(record)].as_dict())
    movable = [r for r in records if r.get("folder") in SCREENED_FOLDERS and not r.get("moved_by_owner")]
    before = {r["id"]: r.get("folder") for r in records}
    _screen(bridge, movable)
    for record in records:
        bridge.messages.put_record(record)
    bridge.index.file((record, before[record["id"]]) for record in records)
    now = time.time()
    again = [r for r in records if needs_recheck(r["verdicts"]) and r["auth_rechecks"] < len(RECHECK_DELAYS)]
    bridge.index.schedule_rechecks(
        (r["mailbox"], r["id"], r["auth_rechecks"], now + RECHECK_DELAYS[r["auth_rechecks"]]) for r in again
    )
    keep = {r["id"] for r in again}
    bridge.index.drop_rechecks(dropped + [(r["mailbox"], r["id"]) for r in records if r["id"] not in keep])
    moved = sum(1 for r in records if r.get("folder") != before[r["id"]])
    log.info("re-evaluated SPF/DMARC of %d messages: %d moved, %d to ask again", len(records), moved, len(again))
    return moved


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
            metrics.SCREENING.labels(folder=decision.folder, rule=decision.rule).inc()
            record.update(folder=decision.folder, reason=decision.reason)
