"""The worker's housekeeping: RQ's scheduler, and a sweeper that keeps stored mail from waiting forever.

Filing is driven by deliveries (each one queues a filing job when none is queued). That alone
stalls when a filing job dies (its worker was killed, its retries ran out on a read-only store)
while its drain flag still says "queued", or when Redis lost everything (nothing queued, nothing
indexed, yet the object store holds mail). The sweeper, every ``SWEEP_SECONDS`` in every worker
process, repairs both without a new delivery and without an operator:

* ``bridge:epoch`` absent means Redis is new or lost its data: rebuild the index from the object
  store (``bridge.maintenance.rebuild_index``, which also queues unfiled mail), one process at a
  time, then set the marker;
* stored-but-unfiled mail and no filing job alive (none noted, or the noted one finished, failed,
  vanished, or started longer ago than its time limit allows) -> queue filing;
* the same for peers' MTP messages: after a rebuild, every envelope still in the store is noted again
  (``bridge.jobs.peer_inbound.requeue_stored``); envelopes noted and no MTP filing job alive -> queue one;
* delivery messages to peers still pending (``mtp/delivery/``) whose job is not alive -> queue it again,
  or drop one older than all its retries (every ``DELIVERY_SWEEP_SECONDS``: it lists the object store);
* SPF/DMARC re-evaluations due and no re-evaluation job alive -> queue one;
* jobs of a killed worker whose time limit has passed are retried (RQ's registry cleanup, which RQ
  itself runs only every ten minutes).

RQ's own scheduler (it moves retries whose delay has passed back into the queue) runs in the same
thread: RQ's forked scheduler process dies with a traceback when Redis goes away and is only
restarted by RQ's maintenance, minutes later.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.scheduler import RQScheduler

from bridge import metrics
from bridge.context import Bridge
from bridge.errors import DependencyUnavailable, RedisUnavailable
from bridge.jobs import peer_inbound
from bridge.jobs.outbound import enqueue_reconcile, reconcile_due
from bridge.jobs.queue import enqueue
from bridge.mailio import accept
from bridge.maintenance import rebuild_index
from bridge.postal.ingress import enqueue_filing
from bridge.store.index import FILING, REDIS_ERRORS
from bridge.store.objects import StorageUnavailable

log = logging.getLogger(__name__)

SWEEP_SECONDS = 10.0
SCHEDULE_SECONDS = 1.0
REBUILD_LOCK_SECONDS = 900
#: A started job is taken for dead this long after its time limit should have stopped it.
STARTED_GRACE_SECONDS = 30
RECHECK = "recheck"
RECONCILE = "reconcile"
RECHECK_JOB = "bridge.jobs.inbound.recheck_auth"
RECHECK_JOB_TIMEOUT = 180

_ALIVE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


def sweep(bridge: Bridge) -> list[str]:
    """One pass; returns what it did ("rebuilt", "filing", "mtp-filing", "mtp-delivery", "recheck", "reconcile").

    Raises when Redis is down.
    """
    done = []
    if bridge.index.epoch() is None:
        owner = uuid.uuid4().hex
        if bridge.index.take_rebuild_lock(owner, REBUILD_LOCK_SECONDS):
            try:
                counts = rebuild_index(bridge)
                # Peers' stored messages: their notes went with Redis too (before the marker, so a store
                # that fails here is retried by the next sweep).
                envelopes = peer_inbound.requeue_stored(bridge)
                bridge.index.set_epoch(datetime.now(UTC).isoformat())
            finally:
                bridge.index.release_rebuild_lock(owner)
            # A new install has nothing to rebuild; mail in the store means Redis lost its data.
            level = logging.WARNING if counts["filed"] or counts["queued_for_filing"] else logging.INFO
            log.log(
                level,
                "sweeper: Redis had no index (new, or it lost its data): rebuilt it from the object store "
                "(%d mailboxes, %d messages listed, %d queued for filing)",
                counts["mailboxes"],
                counts["filed"],
                counts["queued_for_filing"],
            )
            if envelopes:
                log.warning("sweeper: %d stored MTP messages noted for filing again", envelopes)
            done.append("rebuilt")
    # Jobs of a killed worker, once their time limit has passed: RQ retries them (every bridge job
    # has retries) or fails them. RQ's own workers do this only every ten minutes.
    bridge.queue.started_job_registry.cleanup()
    waiting = bridge.index.unfiled_count()
    if waiting and not job_alive(bridge, bridge.index.noted_job(FILING)):
        enqueue_filing(bridge)
        log.warning("sweeper: %d stored messages wait unfiled and no filing job is alive: queued one", waiting)
        done.append("filing")
    waiting = accept.unfiled_count(bridge)
    if waiting and not job_alive(bridge, bridge.index.noted_job(accept.FILING_JOB)):
        accept.queue_filing(bridge, take_drain=True)
        log.warning("sweeper: %d stored MTP messages wait unfiled and no filing job is alive: queued one", waiting)
        done.append("mtp-filing")
    if peer_inbound.delivery_sweep_due(bridge) and _resume_deliveries(bridge):
        done.append("mtp-delivery")
    if bridge.index.due_rechecks(time.time(), 1) and not job_alive(bridge, bridge.index.noted_job(RECHECK)):
        bridge.index.note_job(RECHECK, enqueue(bridge, RECHECK_JOB, job_timeout=RECHECK_JOB_TIMEOUT))
        done.append("recheck")
    # Postal gives up on a webhook after ~36 minutes: ask its message API about recipients left open.
    if reconcile_due(bridge) and not job_alive(bridge, bridge.index.noted_job(RECONCILE)):
        bridge.index.note_job(RECONCILE, enqueue_reconcile(bridge))
        done.append("reconcile")
    return done


def _resume_deliveries(bridge: Bridge) -> int:
    """Pending delivery messages whose job is gone (lost with Redis, or failed and not cleaned up): queue
    them again or drop the ones past every retry. Returns how many it touched."""
    touched: dict[str, int] = {}
    for eid in peer_inbound.pending_deliveries(bridge):
        if not job_alive(bridge, peer_inbound.delivery_job_id(eid)):
            outcome = peer_inbound.resume_delivery(bridge, eid)
            if outcome is not None:
                touched[outcome] = touched.get(outcome, 0) + 1
    if touched:
        log.warning("sweeper: pending MTP delivery messages whose job was gone: %s", touched)
    return sum(touched.values())


def job_alive(bridge: Bridge, job_id: str | None) -> bool:
    """Whether a job will still run or finish: queued, waiting for a retry, or started recently enough."""
    if job_id is None:
        return False
    try:
        job = Job.fetch(job_id, connection=bridge.redis)
    except NoSuchJobError:
        return False
    status = job.get_status(refresh=False)
    if status in _ALIVE:
        return True
    if status == JobStatus.STARTED:
        if job.started_at is None:
            return True
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
        limit = (job.timeout or 0) + STARTED_GRACE_SECONDS
        # Past its time limit a started job is dead: its worker was killed (a live one would have
        # stopped it with JobTimeoutException, and RQ would have marked it failed or retrying).
        return (datetime.now(UTC) - started).total_seconds() < limit
    return False


class Housekeeping(threading.Thread):
    """Runs RQ's scheduler every second and the sweeper every ``SWEEP_SECONDS`` until ``stopping``."""

    def __init__(self, bridge: Bridge, stopping: threading.Event) -> None:
        super().__init__(name="bridge-housekeeping", daemon=True)
        self.bridge = bridge
        self.stopping = stopping
        self.scheduler = RQScheduler([bridge.queue.name], connection=bridge.redis)
        self._trouble: str | None = None
        self._sweep_now = threading.Event()

    def sweep_soon(self) -> None:
        """Sweep at the next tick (the worker saw Redis come back: it may have come back empty)."""
        self._sweep_now.set()

    def run(self) -> None:
        next_sweep = 0.0
        while not self.stopping.is_set():
            self._quietly("heartbeat", lambda: metrics.worker_heartbeat(self.bridge.redis))
            self._quietly("scheduler", self._schedule)
            if time.monotonic() >= next_sweep or self._sweep_now.is_set():
                self._sweep_now.clear()
                self._quietly("sweeper", lambda: sweep(self.bridge))
                next_sweep = time.monotonic() + SWEEP_SECONDS
            self.stopping.wait(SCHEDULE_SECONDS)
        try:
            self.scheduler.release_locks()
        except REDIS_ERRORS:
            pass

    def _schedule(self) -> None:
        # Locks (one scheduler per queue across all workers) are taken or refreshed every tick;
        # they expire a minute after a worker that held them dies.
        self.scheduler.acquire_locks()
        if self.scheduler.acquired_locks:
            self.scheduler.enqueue_scheduled_jobs()

    def _quietly(self, what: str, step: Callable[[], object]) -> None:
        """Run one step; the object store being down is said once, Redis not at all (the worker's
        main loop says that Redis went away and when it is back)."""
        try:
            step()
        except (*REDIS_ERRORS, RedisUnavailable):
            return
        except (DependencyUnavailable, StorageUnavailable) as exc:
            if self._trouble is None:
                log.warning("%s: paused, %s", what, type(exc).__name__)
            self._trouble = what
            return
        except Exception as exc:  # a bug must not end the thread that keeps mail moving
            log.error("%s: unexpected %s", what, type(exc).__name__)
            return
        if self._trouble == what:
            log.info("%s: working again", what)
            self._trouble = None
