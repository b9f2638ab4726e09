"""The worker process: every bridge queue, a scheduler, and a sweeper; it outlives its dependencies.

A ``SimpleWorker`` runs jobs in this process instead of forking one child per job: the jobs
are batch jobs that benefit from warm caches (mailboxes, DNS, e-mail hashes) and a fork per
job would cost more than most jobs. Run several worker processes to use more cores.

RQ's ``work()`` gives up ("found an unhandled exception, quitting") when Redis goes away in the
middle of a job, and its forked scheduler dies with a traceback. Here the work loop is restarted
instead: Redis errors anywhere in RQ's loop end that loop quietly, this process logs one line,
waits with backoff until Redis answers, and works again under a new RQ registration. Only
SIGTERM or SIGINT stop it. A job that fails because the object store went away is an ordinary
failed job (retried with backoff, see ``bridge.jobs.queue.enqueue``); the process is not affected.

RQ's scheduler (needed by retries with a delay) and the sweeper run in one housekeeping thread
of this process (``bridge.jobs.sweeper``), so they come back with the process, not ten minutes
later with RQ's maintenance. Jobs run in the main thread, where RQ's SIGALRM job timeout works.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from types import FrameType
from typing import Any, TypeVar

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested

from bridge import context, logs, metrics
from bridge.context import Bridge
from bridge.errors import DependencyUnavailable
from bridge.jobs.sweeper import Housekeeping, sweep
from bridge.postal.ingress import enqueue_filing

log = logging.getLogger(__name__)

#: Waiting for Redis: first pause, growth factor and longest pause, in seconds.
BACKOFF_FIRST = 0.5
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 10.0

_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_T = TypeVar("_T")


class RedisLost(StopRequested):
    """Redis went away under RQ's work loop. A ``StopRequested``, which RQ's loop ends on quietly."""


def _guard(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except _LOST as exc:
        raise RedisLost() from exc


class _Queue(Queue):
    """A queue whose blocking dequeue reports a lost Redis instead of retrying it inside RQ
    (where it would log a line per attempt and never let the work loop end)."""

    @classmethod
    def dequeue_any(cls, *args: Any, **kwargs: Any) -> Any:
        return _guard(lambda: super(_Queue, cls).dequeue_any(*args, **kwargs))


class BridgeWorker(SimpleWorker):
    """RQ's SimpleWorker, with Redis loss turned into a quiet end of ``work()`` (the caller restarts it)."""

    queue_class = _Queue

    def perform_job(self, job: Any, queue: Queue) -> bool:
        with logs.job_context(job.id, job.meta.get("request_id")):
            return bool(super().perform_job(job, queue))

    def __init__(self, *args: Any, stopping: threading.Event, **kwargs: Any) -> None:
        kwargs.setdefault("log_job_description", False)  # RQ would log each job's arguments: an address, say
        super().__init__(*args, **kwargs)
        self.stopping = stopping
        self.redis_lost = False
        self._tearing_down = False

    def work(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().work(*args, **kwargs)
        except _LOST:
            self.redis_lost = True  # while registering, before RQ's loop started
            return False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        super().request_stop(signum, frame)

    def _guarded(self, call: Callable[[], _T]) -> _T:
        try:
            return _guard(call)
        except RedisLost:
            self.redis_lost = True
            raise

    def execute_job(self, job: Any, queue: Queue) -> None:
        self._guarded(lambda: super(BridgeWorker, self).execute_job(job, queue))

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        self._guarded(lambda: super(BridgeWorker, self).heartbeat(timeout, pipeline))

    def check_for_suspension(self, burst: bool) -> None:
        self._guarded(lambda: super(BridgeWorker, self).check_for_suspension(burst))

    def run_maintenance_tasks(self) -> None:
        self._guarded(lambda: super(BridgeWorker, self).run_maintenance_tasks())

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        return self._guarded(lambda: super(BridgeWorker, self).dequeue_job_and_maintain_ttl(timeout, max_idle_time))

    def handle_exception(self, job: Any, *exc_info: Any) -> None:
        # One line: the traceback stays on the job (the dashboard shows it), not in the log.
        exc = exc_info[1]
        log.warning("job %s (%s) failed: %s", job.id, job.func_name, type(exc).__name__)

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        # RQ's handler logs every failed read of the command channel, and re-raises anything else
        # (a traceback on stderr when teardown closes the channel under the thread): the main loop
        # reports a lost Redis once, and a channel being closed is no news.
        if self._tearing_down:
            return
        if isinstance(exc, _LOST):
            time.sleep(2.0)
            return
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)

    def teardown(self) -> None:
        """RQ's teardown, step by step, each allowed to fail when Redis is gone."""
        self._tearing_down = True
        thread = getattr(self, "pubsub_thread", None)
        if thread is not None:
            with suppress(Exception):
                self.pubsub.unsubscribe()  # type: ignore[union-attr]  # wakes the thread's read
            thread.stop()
            thread.join(timeout=2.5)
            with suppress(Exception):
                self.pubsub.close()  # type: ignore[union-attr]
            self.pubsub_thread = None
        with suppress(*_LOST):
            self.register_death()


def run_worker(*, burst: bool = False) -> int:
    bridge = context.current()
    from bridge import configure_logging

    # Counters into files beside the web processes' (``bridge.metrics``): their /metrics adds them up.
    metrics.share_through(metrics.directories(bridge.settings.data_dir)["worker"])
    configure_logging(bridge.settings)
    # RQ's default handler lets Ctrl-C raise KeyboardInterrupt anywhere: between work loops
    # (waiting for Redis) a signal only asks this loop to stop.
    stopping = threading.Event()
    _on_signals(lambda: stopping.set())
    if burst:
        return _burst(bridge, stopping)
    housekeeping = Housekeeping(bridge, stopping)
    housekeeping.start()
    try:
        _work_until_stopped(bridge, stopping, housekeeping)
    finally:
        stopping.set()
        housekeeping.join(timeout=5)
        with suppress(*_LOST):
            metrics.forget_worker(bridge.redis)
    log.info("worker stopped")
    return 0


def _burst(bridge: Bridge, stopping: threading.Event) -> int:
    """Sweep once (what a long-running worker's housekeeping would do), then work until the queues are empty."""
    if not _wait_for_redis(bridge, stopping):
        return 0
    sweep(bridge)
    worker = BridgeWorker([bridge.queue.name], connection=_worker_connection(bridge), stopping=stopping)
    worker.work(burst=True, with_scheduler=True, logging_level=bridge.settings.log_level)
    return 0


def _work_until_stopped(bridge: Bridge, stopping: threading.Event, housekeeping: Housekeeping) -> None:
    while not stopping.is_set():
        if not _wait_for_redis(bridge, stopping):
            return
        housekeeping.sweep_soon()  # Redis may have come back empty: rebuild now, not at the next sweep
        _pick_up(bridge)
        worker = BridgeWorker([bridge.queue.name], connection=_worker_connection(bridge), stopping=stopping)
        try:
            worker.work(burst=False, with_scheduler=False, logging_level=bridge.settings.log_level)
        except StopRequested:
            # RQ's own stop handler raises this; a signal landing just outside work()'s try (while it
            # installs its handlers or tears down) would otherwise end the worker with a traceback.
            stopping.set()
        finally:
            # work() installs RQ's handlers; between loops ours apply again.
            _on_signals(lambda: stopping.set())
        if stopping.is_set():
            return
        if worker.redis_lost:
            log.warning("worker: Redis went away; waiting for it (no jobs run meanwhile)")
            _announced.set()
        else:
            log.warning("worker: RQ's work loop ended unexpectedly; starting it again")
            time.sleep(BACKOFF_MAX)  # RQ logged why; do not spin if it keeps ending


def _pick_up(bridge: Bridge) -> None:
    """Queue filing for mail stored while no worker ran, or left by a worker that was killed mid-batch.

    Unconditionally, not only when no filing job looks alive: a killed worker's job still looks
    started until its time limit passes, and a second filing job is harmless (filing is idempotent).
    """
    try:
        if bridge.index.unfiled_count():
            enqueue_filing(bridge)
    except DependencyUnavailable:
        pass  # Redis went away again: the work loop notices and waits


def _worker_connection(bridge: Bridge) -> redis.Redis:
    """RQ's own connection: RQ raises its socket timeout above its blocking dequeue's (minutes), which
    must not apply to the jobs' connection (``bridge.redis``), where a dead Redis should fail fast."""
    return redis.Redis.from_url(bridge.redis_url, socket_connect_timeout=2, health_check_interval=30)


def _wait_for_redis(bridge: Bridge, stopping: threading.Event) -> bool:
    """Block until Redis answers a PING (True) or a stop is requested (False), with backoff.

    Says so once when it starts waiting (unless the work loop just said Redis went away) and once
    when Redis answers: two lines per outage, however long it lasts.
    """
    pause = BACKOFF_FIRST
    waited = False
    while not stopping.is_set():
        try:
            if bridge.redis.ping():
                if waited or _announced.is_set():  # back, even if it was back before the first ping
                    log.warning("worker: Redis answers again; working")
                _announced.clear()
                return True
        except _LOST:
            pass
        if not waited and not _announced.is_set():
            log.warning("worker: Redis does not answer; waiting for it (no jobs run meanwhile)")
        _announced.clear()
        waited = True
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and not stopping.is_set():
            time.sleep(0.1)  # short naps: a signal handler's flag is seen promptly
        pause = min(pause * BACKOFF_FACTOR, BACKOFF_MAX)
    return False


_announced = threading.Event()  # the work loop already said Redis went away


def _on_signals(action: Callable[[], None]) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        action()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
