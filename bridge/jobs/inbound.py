"""Filing received mail into folders, in batches.

One RQ job per message costs more than receiving it (RQ's own overhead is milliseconds per
job), so the request path only notes each stored message in Redis and a single filing job
drains that set in batches: read records, screen them, write them back, index them in one
Redis round trip per batch.
"""

from __future__ import annotations

import logging
import time

from bridge import context
from bridge.screening import classify
from bridge.store.messages import STATUS_FILED, STATUS_RECEIVED

log = logging.getLogger(__name__)

BATCH = 500


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
        filed = []
        for address, msg_id in batch:
            record = bridge.messages.get_record(address, msg_id)
            if record is None:
                bridge.index.forget_unfiled(address, msg_id)
                continue
            if record["status"] == STATUS_RECEIVED:
                decision = classify(record)
                record.update(
                    status=STATUS_FILED, folder=decision.folder, reason=decision.reason, filed_at=time.time()
                )
                bridge.messages.put_record(record)
                total += 1
            filed.append((record, None))
        bridge.index.file(filed)
        log.info("filed %d messages", len(filed))
