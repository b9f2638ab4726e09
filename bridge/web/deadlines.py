"""Read deadlines: a client that sends its request too slowly is cut off, and its thread freed.

Anyone on the internet can open a connection to the endpoint and then send its headers or body a
byte at a time, or announce ``Content-Length: 10000`` and send 100 bytes. gunicorn bounds none of
this (its ``timeout`` kills a whole sync worker, with an HTML 500 and a traceback). So every request
gets one deadline for everything it reads: the gunicorn worker in ``bridge.web.server`` arms it when
a request starts and disarms it when the request is answered; if it expires first, one watchdog
thread per process shuts the socket's *read* side. The blocked read then returns end-of-file at
once, the view sees a short body and answers 408 (the write side still works), and the thread is
free again. No signal, no thread killed, nothing to clean up.

Deadlines are kept in a heap watched by one daemon thread: arming and disarming cost a lock and a
heap push, not a thread or a timer per request.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Deadline", "ReadDeadlines", "deadlines"]


@dataclass(order=True)
class Deadline:
    at: float
    seq: int
    sock: socket.socket | None = field(compare=False)
    fired: bool = field(default=False, compare=False)


class ReadDeadlines:
    """Per-connection read deadlines for one process, enforced by shutting down the socket's read side."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._heap: list[Deadline] = []
        self._by_socket: dict[int, Deadline] = {}
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, seconds: float | None = None) -> Deadline:
        entry = Deadline(time.monotonic() + (self.seconds if seconds is None else seconds), next(self._seq), sock)
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                # Started on first use, in the process that serves (after gunicorn forks its workers).
                self._thread = threading.Thread(target=self._watch, name="read-deadlines", daemon=True)
                self._thread.start()
            self._by_socket[id(sock)] = entry
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wake.notify()
        return entry

    def disarm(self, entry: Deadline) -> None:
        with self._wake:
            if entry.sock is not None and self._by_socket.get(id(entry.sock)) is entry:
                del self._by_socket[id(entry.sock)]
            entry.sock = None  # the heap drops it lazily when its time comes

    def expired(self, sock: object) -> bool:
        """Whether the deadline of the request now reading from ``sock`` has cut it off."""
        with self._wake:
            entry = self._by_socket.get(id(sock))
            return bool(entry and entry.fired)

    def _watch(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0].at > time.monotonic():
                    self._wake.wait(None if not self._heap else max(0.0, self._heap[0].at - time.monotonic()))
                entry = heapq.heappop(self._heap)
                sock = entry.sock
                if sock is None:
                    continue
                entry.fired = True
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed by its thread: nothing left to free


#: The process's deadlines; ``create_app`` sets ``seconds`` from BRIDGE_READ_TIMEOUT.
deadlines = ReadDeadlines()
