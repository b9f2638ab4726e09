"""The pictures the README shows, drawn from one run's results (bench/results.json) with matplotlib.

- ``img/concurrency.png``: req/s, p99 and the ratio to the bare baseline against concurrency, for the
  bare baseline and the bridge on its file store and on S3 (moto, Ceph RGW): section 8 of RESULTS.md.
- ``img/memory.png``: the web process's peak memory growth against message size (1, 5, 25 MB), the
  bridge beside the bare baseline, with the goal (4x the message): section 3.

``make bench`` draws them after writing the results; ``python -m bench.plots`` redraws them from
bench/results.json. It measures nothing and writes only under bench/img/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from bench import report, sweep

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "img"
STYLE: dict[str, dict[str, Any]] = {
    "bare": {"color": "#777777", "marker": "o", "linestyle": "--"},
    "full": {"color": "#1f77b4", "marker": "s"},
    "full-moto": {"color": "#ff7f0e", "marker": "^"},
    "full-ceph": {"color": "#2ca02c", "marker": "D"},
}


def draw(document: dict[str, Any], directory: Path = IMAGES) -> list[Path]:
    """Both pictures (those the run has data for); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    when = str(document.get("started", ""))[:16].replace("T", " ")
    if document.get("sweep", {}).get("runs"):
        written.append(_concurrency(document["sweep"], directory / "concurrency.png", when))
    if document.get("memory_sizes"):
        written.append(_memory(document["memory_sizes"], directory / "memory.png", when))
    return written


def _concurrency(data: dict[str, Any], path: Path, when: str) -> Path:
    table = sweep.summarize(data, report.rate)
    figure, (rps, p99, ratio) = plt.subplots(1, 3, figsize=(15, 4.6))
    for name in sweep.LABELS:
        if name not in table:
            continue
        levels = sorted(table[name])
        style = STYLE[name]
        label = sweep.LABELS[name]
        rps.plot(levels, [table[name][n]["rps"] for n in levels], label=label, **style)
        p99.plot(levels, [table[name][n]["p99"] for n in levels], label=label, **style)
        if name != "bare":
            ratio.plot(levels, [table[name][n]["ratio"] for n in levels], label=label, **style)
    ratio.axhline(
        report.GOAL_RATIO,
        color="#1f77b4",
        linewidth=0.8,
        linestyle=":",
        label=f"goal, file store ({report.GOAL_RATIO})",
    )
    ratio.axhline(
        sweep.GOAL_S3_RATIO, color="#d62728", linewidth=0.8, linestyle=":", label=f"goal, S3 ({sweep.GOAL_S3_RATIO})"
    )
    p99.axhline(
        report.GOAL_P99_MS,
        color="#d62728",
        linewidth=0.8,
        linestyle=":",
        label=f"p99 goal at 8 ({report.GOAL_P99_MS:.0f} ms)",
    )
    for axis, title, unit in (
        (rps, "throughput", "deliveries/s (median)"),
        (p99, "p99 latency", "ms (median of runs)"),
        (ratio, "bridge / bare at the same concurrency", "ratio"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(data["levels"], [str(n) for n in data["levels"]])
        axis.set_xlabel("concurrent connections (wrk)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    rps.set_yscale("log")
    p99.set_yscale("log")
    ratio.set_ylim(bottom=0)
    rps.legend(fontsize=8)
    ratio.legend(fontsize=8)
    p99.legend(fontsize=8)
    figure.suptitle(f"make bench {when} UTC: ~20 KB Postal deliveries, gunicorn 4x8, 2 shared cores", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _memory(sizes: dict[str, list[dict[str, Any]]], path: Path, when: str) -> Path:
    figure, axis = plt.subplots(figsize=(6.5, 4.6))
    labels = {"bare": "bare WSGI", "full": "bridge"}
    mib = 1024 * 1024
    for name, rows in sizes.items():
        x = [row["message_bytes"] / mib for row in rows]
        y = [row["growth_bytes"] / mib for row in rows]
        axis.plot(x, y, label=labels.get(name, name), **STYLE.get(name, {}))
        for xi, yi, row in zip(x, y, rows, strict=True):
            axis.annotate(
                f"{row['growth_bytes'] / row['message_bytes']:.1f}x",
                (xi, yi),
                textcoords="offset points",
                xytext=(6, 4) if name == "full" else (6, -12),  # the bridge above its point, bare below
                fontsize=8,
            )
    biggest = max(row["message_bytes"] for rows in sizes.values() for row in rows) / mib
    axis.plot(
        [0, biggest],
        [0, report.GOAL_MEMORY * biggest],
        color="#d62728",
        linewidth=0.8,
        linestyle=":",
        label=f"goal: {report.GOAL_MEMORY:.0f}x the message",
    )
    axis.set_xlabel("message size (MiB, decoded)")
    axis.set_ylabel("peak RSS growth of the web process (MiB)")
    axis.set_title(f"memory against message size (make bench {when} UTC)", fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main() -> int:
    results = HERE / "results.json"
    if not results.exists():
        print(f"bench.plots: no {results.name}: run make bench first", file=sys.stderr)
        return 1
    for path in draw(json.loads(results.read_text())):
        print(f"bench.plots: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
