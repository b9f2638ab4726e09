"""Queueing RQ jobs: by name, with ids only, retried with backoff (every job is idempotent).

Shared by every flow that queues work (Postal and MTP ingress, the outbound router, the sweeper), so it
lives with the jobs rather than in any one flow; it imports none of them.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

from bridge import logs
from bridge.context import Bridge
from bridge.errors import RedisUnavailable
from bridge.store.index import REDIS_ERRORS

#: Other jobs (re-screening a mailbox) read a whole mailbox: a longer limit, fewer retries.
JOB_TIMEOUT = 600
JOB_RETRY_INTERVALS = (10, 60, 300)


def enqueue(
    bridge: Bridge,
    function: str,
    *ids: str,
    job_timeout: int = JOB_TIMEOUT,
    retry_intervals: tuple[int, ...] = JOB_RETRY_INTERVALS,
    job_id: str | None = None,
    delay: int = 0,
) -> str:
    """Queue a job by name with ids only (the dashboard shows arguments: never anything secret).

    Returns the job's id (``job_id`` when given: a job one can look up by what it works on). Every job
    is idempotent, so a failed one is retried after each of ``retry_intervals`` seconds. ``delay``: run it after
    that many seconds (RQ's scheduler, which retries with a delay need anyway), not at once.
    """
    from rq import Retry

    try:
        queue = bridge.queue
        put: Any = partial(queue.enqueue_in, timedelta(seconds=delay)) if delay > 0 else queue.enqueue
        job = put(
            function,
            *ids,
            job_id=job_id,
            job_timeout=job_timeout,
            result_ttl=60,  # 0 (no result kept) costs more in rq 2.12: its delete reads the execution registry
            failure_ttl=7 * 86400,
            retry=Retry(max=len(retry_intervals), interval=list(retry_intervals)) if retry_intervals else None,
            meta={"request_id": logs.current_request_id()},  # the worker's lines about it carry the same id
        )
    except REDIS_ERRORS as exc:
        raise RedisUnavailable("redis unavailable") from exc
    return str(job.id)
