"""Section 8 of ``make bench``: throughput and p99 against concurrency, on the filesystem and on S3.

The same wrk load as section 1 at 1 to 32 connections against four gunicorns started once: the bare
baseline, the bridge on its filesystem store, and the bridge on S3 (BRIDGE_STORAGE_URL=s3://...)
served by moto's server and by a one-node Ceph RGW (tests/servers.py's starters: the S3 path is what
production uses). The levels are interleaved target by target, so the machine's noise falls on all
of them alike; the ratios to the bare baseline at the same level are the comparison.

moto is a Python process on the same two cores, itself slower than the bridge: its row bounds what
the S3 client costs from below, not what AWS would give. Ceph RGW is a real S3 implementation, but
here a single memstore OSD on loopback sharing the same cores.

It must never send traffic anywhere but 127.0.0.1 and never stop a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.servers import CephRGW, MotoS3Server, ServerStartError, ceph_missing

LEVELS = (1, 4, 8, 16, 32)
GOAL_S3_RATIO = 0.2
#: Target names and the labels of the report and the pictures, in drawing order.
LABELS = {
    "bare": "bare WSGI",
    "full": "bridge, file store",
    "full-moto": "bridge, S3 (moto)",
    "full-ceph": "bridge, S3 (Ceph RGW)",
}


class S3Backends:
    """moto and (when installed) Ceph RGW, each with a fresh bucket per bridge; stopped by ``close``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: dict[str, Any] = {}
        self.notes: list[str] = []
        self._ceph_dir: Path | None = None

    def start(self, wanted: tuple[str, ...] = ("moto", "ceph")) -> S3Backends:
        if "moto" in wanted:
            self.servers["moto"] = MotoS3Server(self.tmp / "moto").start()
        if "ceph" in wanted:
            missing = ceph_missing()
            if missing:
                self.notes.append(f"Ceph RGW not measured: {', '.join(missing)} not installed (make bench installs it)")
            else:
                self._start_ceph()
        return self

    def _start_ceph(self) -> None:
        """Ceph RGW, with one fresh attempt (new fsid, new ports): a one-node cluster on a busy machine
        now and then loses its OSD at boot (as the test suite's fixture knows)."""
        for attempt in (1, 2):
            # A short path: Ceph's admin sockets are Unix sockets (at most 107 bytes).
            self._ceph_dir = Path(tempfile.mkdtemp(prefix="ceph-bench-"))
            try:
                self.servers["ceph"] = CephRGW(self._ceph_dir).start(timeout=150)
                return
            except ServerStartError as exc:
                shutil.rmtree(self._ceph_dir, ignore_errors=True)
                self._ceph_dir = None
                if attempt == 2:
                    self.notes.append(f"Ceph RGW not measured: it did not start twice ({str(exc).splitlines()[0]})")

    def env(self, name: str) -> dict[str, str]:
        """A new bucket on backend ``name`` and the settings that point a bridge at it."""
        server = self.servers[name]
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        server.client().create_bucket(Bucket=bucket)
        return {
            "BRIDGE_STORAGE_URL": f"s3://{bucket}/mx",
            "AWS_ENDPOINT_URL_S3": server.endpoint,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": server.region,
        }

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        if self._ceph_dir is not None:
            shutil.rmtree(self._ceph_dir, ignore_errors=True)
            self._ceph_dir = None


@contextlib.contextmanager
def aws_environ(extra: dict[str, str]) -> Iterator[None]:
    """This process's own Bridge (adding the bench mailbox) finds S3 through boto3's chain: the
    environment. Set the AWS_* variables of ``extra`` for the duration, then put the old ones back."""
    names = [name for name in extra if name.startswith("AWS_")]
    old = {name: os.environ.get(name) for name in names}
    os.environ.update({name: extra[name] for name in names})
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------------------
# summaries, shared by the report and the pictures


def summarize(
    sweep: dict[str, Any], rate: Callable[[dict[str, float]], float]
) -> dict[str, dict[int, dict[str, float]]]:
    """Per target and level: median req/s, median p99 ms, and the ratio to bare at the same level."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, levels in sweep.get("runs", {}).items():
        for level, results in levels.items():
            out.setdefault(name, {})[int(level)] = {
                "rps": statistics.median(rate(r) for r in results),
                "p99": statistics.median(r["p99_us"] / 1000 for r in results),
                "non2xx": sum(r["non2xx"] for r in results),
            }
    bare = out.get("bare", {})
    for levels in out.values():
        for level, row in levels.items():
            base = bare.get(level, {}).get("rps")
            row["ratio"] = row["rps"] / base if base else float("nan")
    return out


def render(add: Callable[[str], None], sweep: dict[str, Any], rate: Callable[[dict[str, float]], float]) -> None:
    """Section 8 of bench/RESULTS.md."""
    table = summarize(sweep, rate)
    if not table:
        return
    add("## 8. Throughput and p99 against concurrency; the S3 backend")
    add("")
    add(
        f"The load of section 1 (wrk, Postal-signed ~20 KB deliveries, unique ids; `-t1` at one connection) at "
        f"{', '.join(str(level) for level in sweep['levels'])} connections, {sweep['seconds']:.0f} s per run, "
        f"runs per point: {sweep['repeats']}, the targets interleaved at each level; medians. Four gunicorns as "
        "deployed (4 processes x 8 threads), fsync on for the file store: the bare baseline, the bridge on its "
        "filesystem store, and the bridge on S3 (`BRIDGE_STORAGE_URL=s3://...`: one conditional PUT per "
        "delivery) served by moto's server and by a one-node Ceph RGW (memstore OSD), all on 127.0.0.1 and the "
        "same two cores. Picture: [`bench/img/concurrency.png`](img/concurrency.png)."
    )
    add("")
    names = [name for name in LABELS if name in table]
    add(
        "| connections | "
        + " | ".join(f"{LABELS[n]} req/s (p99 ms)" for n in names)
        + " | "
        + " | ".join(f"{LABELS[n]} / bare" for n in names if n != "bare")
        + " |"
    )
    add("|---" * (1 + len(names) + len(names) - 1) + "|")
    for level in sweep["levels"]:
        cells = []
        for name in names:
            row = table[name].get(level)
            cells.append(f"{row['rps']:.0f} ({row['p99']:.0f})" if row else "-")
        ratios = []
        for name in names:
            if name == "bare":
                continue
            row = table[name].get(level)
            ratios.append(f"{row['ratio']:.2f}" if row else "-")
        add(f"| {level} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    add("")
    s3 = [name for name in ("full-moto", "full-ceph") if name in table]
    if s3:
        parts = []
        for name in s3:
            at8 = table[name].get(8)
            if at8:
                verdict = "met" if at8["ratio"] >= GOAL_S3_RATIO else "**missed**"
                parts.append(f"{LABELS[name]} {at8['ratio']:.2f} at 8 connections ({verdict})")
        add(f"Goal full/bare >= {GOAL_S3_RATIO} on S3: " + "; ".join(parts) + ".")
        add("")
    for note in sweep.get("notes", []):
        add(f"- {note}")
    if sweep.get("notes"):
        add("")
