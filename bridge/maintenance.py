"""Operator maintenance: rebuild what Redis holds from the object store (the system of record)."""

from __future__ import annotations

from typing import Any

from bridge.context import Bridge
from bridge.inbound import enqueue_filing
from bridge.store.messages import FOLDERS

BATCH = 500


def rebuild_index(bridge: Bridge) -> dict[str, Any]:
    """Restore every mailbox's folder index from stored records; queue unfiled ones for filing.

    Safe to run while mail arrives: a record written meanwhile is either listed by this pass or
    noted by its own request.
    """
    mailboxes = bridge.mailboxes.all()
    for mailbox in mailboxes:
        bridge.index.clear_mailbox(mailbox.address, FOLDERS)
    filed = unfiled = 0
    batch: list[tuple[dict[str, Any], str | None]] = []
    for record in bridge.messages.records():
        batch.append((record, None))
        if record.get("folder"):
            filed += 1
        else:
            unfiled += 1
        if len(batch) >= BATCH:
            bridge.index.file(batch)
            batch = []
    if batch:
        bridge.index.file(batch)
    if unfiled:
        enqueue_filing(bridge)
    return {"mailboxes": len(mailboxes), "filed": filed, "queued_for_filing": unfiled}
