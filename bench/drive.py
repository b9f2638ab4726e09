"""A fixed-count load generator: post exactly N pool deliveries with C connections, then stop.

wrk runs for a time, not a count, and leaves requests in flight when it stops; the end-to-end
measurement needs exactly N deliveries so that "all N filed" is well defined. Run as its own
process (``python -m bench.drive``) so it does not share an interpreter with the measurer. It
prints one JSON line: wall-clock start, time of the last 2xx, the counts, and each answered
request's latency in ms (the hostile mix's hostile side: few, slow requests, each waited for to the
end, which wrk would drop when its run ends).

It must never send more than N requests, never retry, and only talk to the 127.0.0.1 URL it is given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from typing import BinaryIO
from urllib.parse import urlsplit

from bench.pool import index_rows, read_delivery


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drive")
    parser.add_argument("url")
    parser.add_argument("index")
    parser.add_argument("bodies")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=120.0, help="stop sending after this many seconds")
    args = parser.parse_args(argv)
    target = urlsplit(args.url)
    if target.hostname != "127.0.0.1":
        raise SystemExit("bench.drive only posts to 127.0.0.1")
    try:
        rows = index_rows(args.index, args.first, args.count)  # bodies are read when sent, not held
    except IndexError as exc:
        raise SystemExit(f"bench.drive: {exc}") from None

    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "non2xx": 0, "errors": 0, "last_ok": 0.0}
    latencies: list[float] = []
    start = time.time()
    stop_at = time.monotonic() + args.deadline

    def run() -> None:
        with open(args.bodies, "rb") as data:
            while send(data):
                pass

    def send(data: BinaryIO) -> bool:
        """Post the next delivery; False when the pool or the time is used up."""
        if time.monotonic() >= stop_at:
            return False
        with lock:
            i = state["next"]
            if i >= len(rows):
                return False
            state["next"] = i + 1
        body, headers = read_delivery(data, rows[i])
        sent = time.perf_counter()
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            conn.request("POST", target.path or "/", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError:
            status = -1
        finally:
            conn.close()
        now = time.time()
        with lock:
            if status > 0:
                latencies.append((time.perf_counter() - sent) * 1000)
            if 200 <= status < 300:
                state["ok"] += 1
                state["last_ok"] = max(state["last_ok"], now)
            elif status < 0:
                state["errors"] += 1
            else:
                state["non2xx"] += 1
        return True

    workers = [threading.Thread(target=run) for _ in range(args.concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    summary = {"start": start, "end": time.time(), "sent": state["next"], **state}
    print(json.dumps({**summary, "exhausted": state["next"] >= len(rows), "latencies_ms": latencies}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
