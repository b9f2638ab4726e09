"""The gunicorn worker class the bridge runs under (``gunicorn.conf.py`` names it).

gunicorn's threaded worker (``gthread``) plus one thing it lacks: a deadline on reading each
request (``bridge.web.deadlines``). Why threads: a delivery mixes CPU (signature, sealing) with
waits (DNS for DKIM, the object store, Redis), so several requests per process overlap their
waits, and a slow client or a sender's dead DNS occupies one thread, never a whole process; the
GIL keeps CPU work per process serial, so processes (``BRIDGE_WEB_WORKERS``) are what use cores.

Only gunicorn imports this module; the Flask app knows nothing of it.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from bridge.web.deadlines import deadlines


class BridgeThreadWorker(ThreadWorker):
    """gthread, with every request's reading bounded by BRIDGE_READ_TIMEOUT, accepting only with a free thread.

    Plain gthread accepts connections while it has fewer than ``worker_connections`` (1,000) open and
    queues them behind its busy threads, so a process whose threads are all held (by slow clients, say)
    keeps taking deliveries that another process could answer at once. Here a process takes a new
    connection only while one of its threads is free; otherwise the kernel's listen queue hands it to
    a process that has one. (gthread's main loop re-reads ``worker_connections`` before each accept.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._in_flight = 0  # connections handed to the thread pool and not yet finished (main thread only)
        super().__init__(*args, **kwargs)

    @property
    def worker_connections(self) -> int:
        limit = int(self.cfg.worker_connections)
        if self._in_flight >= self.cfg.threads:
            return min(limit, self.nr_conns)  # "full": stop accepting until a thread is free
        return limit

    @worker_connections.setter
    def worker_connections(self, value: int) -> None:
        pass  # gthread's __init__ assigns the configured value; the property above reads it from cfg

    def enqueue_req(self, conn: Any) -> None:
        self._in_flight += 1
        super().enqueue_req(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        self._in_flight -= 1
        super().finish_request(conn, fs)

    def handle(self, conn: Any) -> Any:
        entry = deadlines.arm(conn.sock)
        try:
            return super().handle(conn)
        finally:
            deadlines.disarm(entry)
