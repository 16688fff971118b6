"""``stress --scenario key-removal-race --report DIR``: the race's answer as data and pictures.

The table goes out as JSON and CSV (the same rows the terminal shows, plus the raw
remove->wipe delays), and three plots are drawn headless: what each mode (and the
kernel) did with the appends -- acknowledged, refused, lost; how long each kept the
secret after REMOVE; and how much ``hard`` removal loses as the dirty data a removal
can catch grows (the same race, ``hard`` only, each append ``size`` bytes).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any

from blockemu.display import pyplot
from blockemu.workload.keyrace import RaceResult, run_race

TABLE_FIELDS = ["mode", "schedule", "seed", "attempted", "acknowledged", "refused", "failed", "cut_off", "lost",
                "lost_reported", "silent", "removals", "wipes", "wipe_delay_max_ms", "wipe_delay_mean_ms"]
SWEEP_SIZES = (1, 1024, 4096, 16384, 65536)
FILES = ("race.json", "race.csv", "outcomes.png", "wipe-latency.png", "hard-loss-vs-dirty.png")


async def hard_sweep(sizes: tuple[int, ...] = SWEEP_SIZES, **race: Any) -> list[RaceResult]:
    """The race under ``hard`` removal once per append size: the dirty data at risk grows with it."""
    return [await run_race("hard", append_size=n, **race) for n in sizes]


def row(r: RaceResult) -> dict[str, Any]:
    d = r.as_json()
    return {k: d[k] for k in TABLE_FIELDS}


def write_report(out: str, results: list[RaceResult], sweep: list[RaceResult], *, note: str | None = None) -> list[str]:
    """Write the files of ``FILES`` into ``out`` (created if missing); returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f) for f in FILES]
    doc = {"results": [row(r) for r in results],
           "wipe_delays_ms": {r.mode: r.wipe_delays_ms for r in results},
           "hard_sweep": [{"append_size": r.append_size, "acknowledged": r.acknowledged, "lost": r.lost,
                           "lost_bytes": r.lost * r.append_size, "lost_reported": r.lost_reported} for r in sweep]}
    if note:
        doc["kernel_peer_not_run"] = note
    with open(paths[0], "w") as f:
        json.dump(doc, f, indent=2)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(doc["results"])
    plt = pyplot()
    _outcomes(plt, results, paths[2])
    _latency(plt, results, paths[3])
    _sweep(plt, sweep, paths[4])
    return paths


def _outcomes(plt: Any, results: list[RaceResult], path: str) -> None:
    """Grouped bars per mode, as shares of the appends attempted: the runs differ in length."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    series = [("acknowledged", "#2e7d32"), ("refused", "#f9a825"), ("lost", "#c62828")]
    width = 0.8 / len(series)
    for i, (k, colour) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(results))]
        ys = [100 * getattr(r, k) / max(r.attempted, 1) for r in results]
        bars = ax.bar(xs, ys, width, label={"refused": "refused (ENOKEY)"}.get(k, k), color=colour)
        ax.bar_label(bars, labels=[str(getattr(r, k)) for r in results], fontsize=7, padding=1)
    ax.set_xticks(range(len(results)), [r.mode for r in results])
    ax.set_ylabel("% of appends attempted")
    ax.set_ylim(0, 110)
    ax.set_title(f"generic/595 race ({results[0].schedule} schedule, seed {results[0].seed}): what happened to each append")
    ax.legend(frameon=False, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _latency(plt: Any, results: list[RaceResult], path: str) -> None:
    """How long the secret outlived REMOVE, one box per mode (log scale: microseconds to seconds)."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    data = [[max(d, 1e-3) for d in r.wipe_delays_ms] or [float("nan")] for r in results]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(results) + 1), [f"{r.mode}\n({r.wipes} wipes)" for r in results])
    ax.set_yscale("log")
    ax.set_ylabel("REMOVE -> secret wiped (ms)")
    ax.set_title("remove->wipe latency")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sweep(plt: Any, sweep: list[RaceResult], path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    sizes = [r.append_size for r in sweep]
    ax.plot(sizes, [r.lost * r.append_size for r in sweep], "o-", color="#c62828", label="acknowledged bytes lost")
    ax.plot(sizes, [r.acknowledged * r.append_size for r in sweep], "s--", color="#2e7d32", label="acknowledged bytes")
    for r in sweep:
        ax.annotate(f"{r.lost}/{r.acknowledged}", (r.append_size, max(r.lost * r.append_size, 1)), fontsize=7,
                    textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("bytes per append (dirty data a removal can catch)")
    ax.set_ylabel("bytes")
    ax.set_title("hard removal: loss grows with the dirty data held at REMOVE (labels: appends lost/acknowledged)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
