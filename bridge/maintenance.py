"""Operator maintenance: rebuild what Redis holds from the object store (the system of record)."""

from __future__ import annotations

import time
from typing import Any

from bridge.context import Bridge
from bridge.jobs.auth import RECHECK_DELAYS, needs_recheck
from bridge.postal.ingress import enqueue_filing
from bridge.store.messages import FOLDERS

BATCH = 500


def rebuild_index(bridge: Bridge) -> dict[str, Any]:
    """Restore every mailbox's folder index from stored records; queue unfiled ones for filing.

    Safe to run while mail arrives: a record written meanwhile is either listed by this pass or
    noted by its own request. Filed messages whose SPF/DMARC was a temperror and that have
    re-evaluations left are queued for one again (that queue lived in Redis too), and sent mail's
    Postal ids are indexed again so that Postal's events still find their recipients.
    """
    mailboxes = bridge.mailboxes.all()
    for mailbox in mailboxes:
        bridge.index.clear_mailbox(mailbox.address, FOLDERS)
    filed = unfiled = 0
    batch: list[tuple[dict[str, Any], str | None]] = []
    rechecks: list[tuple[str, str, int, float]] = []
    soon = time.time() + RECHECK_DELAYS[0]
    for record in bridge.messages.records():
        batch.append((record, None))
        if record.get("folder"):
            filed += 1
            tries = int(record.get("auth_rechecks") or 0)
            if needs_recheck(record.get("verdicts") or {}) and tries < len(RECHECK_DELAYS):
                rechecks.append((record["mailbox"], record["id"], tries, soon))
        else:
            unfiled += 1
        if len(batch) >= BATCH:
            bridge.index.file(batch)
            bridge.index.schedule_rechecks(rechecks)
            batch, rechecks = [], []
    if batch:
        bridge.index.file(batch)
        bridge.index.schedule_rechecks(rechecks)
    if unfiled:
        enqueue_filing(bridge)
    # Postal's events find sent mail by Postal's ids through a Redis index: rebuild it too.
    outbound = bridge.outbound.rebuild_index()
    return {"mailboxes": len(mailboxes), "filed": filed, "queued_for_filing": unfiled, "outbound": outbound}
