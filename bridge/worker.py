"""The worker process: every bridge queue, with RQ's scheduler (retries with delays need it).

A ``SimpleWorker`` runs jobs in this process instead of forking one child per job: the jobs
are batch jobs that benefit from warm caches (mailboxes, DNS, e-mail hashes) and a fork per
job would cost more than most jobs. Run several worker processes to use more cores.
"""

from __future__ import annotations

import logging

from rq import SimpleWorker

from bridge import context
from bridge.inbound import enqueue_filing

log = logging.getLogger(__name__)


def run_worker(*, burst: bool = False) -> int:
    bridge = context.current()
    from bridge import configure_logging

    configure_logging(bridge.settings)
    # Pick up whatever was stored but not filed while no worker ran (or a worker died mid-batch).
    enqueue_filing(bridge)
    worker = SimpleWorker([bridge.queue], connection=bridge.redis)
    worker.work(burst=burst, with_scheduler=True, logging_level=bridge.settings.log_level)
    return 0
