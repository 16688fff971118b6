#!/usr/bin/env python3
"""Benchmarks: every figure is printed with its ratio to a ceiling measured in the same run,
so numbers compare across machines and noisy runs.

    python tools/bench.py [btree] [--keys N]

btree: 1M-key insert and lookup in the COW B-tree (16 KiB nodes, sans-I/O over a
real TreeStore and Allocator), then the commit of that tree to an image on disk.
Ceiling: the same keys in a sortedcontainers.SortedDict (an in-memory ordered map
with no COW, no encoding, no I/O).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sortedcontainers import SortedDict  # noqa: E402

from blockemu.mkfs import mkfs  # noqa: E402
from blockemu.ondisk.structs import FS_TREE_OBJECTID  # noqa: E402
from blockemu.volume import Volume  # noqa: E402


def row(name: str, value: float, unit: str, ceiling: float | None = None, cname: str = "") -> None:
    ratio = f"{value / ceiling:6.2f}x {cname}" if ceiling else ""
    print(f"  {name:<44} {value:>14,.0f} {unit:<8} {ratio}")


async def bench_btree(n: int) -> None:
    print(f"B-tree, {n:,} keys (random order, 16-byte values, 16 KiB nodes)")
    rng = random.Random(1)
    keys = [(rng.randrange(1 << 40), 1, i) for i in range(n)]
    value = b"v" * 16

    t = time.perf_counter()
    sd = SortedDict()
    for k in keys:
        sd[k] = value
    ceil_ins = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for k in keys:
        sd.get(k)
    ceil_get = n / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.img")
        await mkfs(path, "4G")
        vol = await Volume.open(path)
        tree = vol.engine.trees[FS_TREE_OBJECTID]
        t = time.perf_counter()
        for k in keys:
            tree.insert(k, value)
        ins = n / (time.perf_counter() - t)
        t = time.perf_counter()
        await vol.commit()
        commit_s = time.perf_counter() - t
        blocks = vol.device.stats.ops["write"]
        t = time.perf_counter()
        for k in keys:
            tree.get(k)
        get_hot = n / (time.perf_counter() - t)
        vol.engine.store.clean.clear()
        vol.engine.store.cache_blocks = 1 << 20
        rng.shuffle(keys)
        t = time.perf_counter()
        for k in keys:
            tree.get(k)
        get_cold = n / (time.perf_counter() - t)
        t = time.perf_counter()
        count = sum(1 for _ in tree.items())
        scan = count / (time.perf_counter() - t)
        await vol.close()
    row("insert", ins, "keys/s", ceil_ins, "of SortedDict insert")
    row("lookup, cached blocks", get_hot, "keys/s", ceil_get, "of SortedDict lookup")
    row("lookup, cold cache (pread + decode)", get_cold, "keys/s", ceil_get, "of SortedDict lookup")
    row("ordered scan", scan, "items/s")
    row("commit of the whole tree", commit_s * 1000, "ms")
    row("tree blocks written by that commit", blocks, "blocks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", choices=[[], "btree"], default=[])
    ap.add_argument("--keys", type=int, default=1_000_000)
    a = ap.parse_args()
    if not a.what or "btree" in a.what:
        asyncio.run(bench_btree(a.keys))


if __name__ == "__main__":
    main()
