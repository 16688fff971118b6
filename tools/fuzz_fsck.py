#!/usr/bin/env python3
"""Fuzz campaign for fsck: flip random bytes in the metadata blocks of a populated image and
check that fsck reports an error (exit 4 or 8) every time, without a traceback or a hang.

    python tools/fuzz_fsck.py [--trials N] [--seed S] [--recsum]

--recsum recomputes the block checksum after the flip, so the damage reaches the parsers
and cross-checks instead of stopping at the checksum; some such flips are legitimately
undetectable (a timestamp), so the campaign reports a detection rate, not a pass/fail.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blockemu  # noqa: E402
from blockemu.check.fsck import check  # noqa: E402
from blockemu.check.inspect import dump_tree  # noqa: E402
from blockemu.errors import BlockemuError  # noqa: E402
from blockemu.ondisk import csum as csums  # noqa: E402

KEY = bytes(range(1, 65))


async def populated(path: str, seed: int) -> None:
    rng = random.Random(seed)
    await blockemu.mkfs(path, size="96M", node_size="4K")
    async with blockemu.mount(path, interval=3600, max_extent=64 << 10) as fs:
        kid = await fs.add_key(KEY)
        await fs.mkdir("/e")
        await fs.set_policy("/e", kid)
        for d in ("/e", "/p"):
            if d == "/p":
                await fs.mkdir(d)
            for i in range(60):
                async with fs.open(f"{d}/f{i}", "w") as f:
                    await f.write(rng.randbytes(rng.randrange(1, 200_000)))


def trial(base: str, work: str, blocks: list[int], nodesize: int, csum_type: int, rng: random.Random,
          recsum: bool) -> tuple[str, str]:
    """One flip; returns (outcome, detail): detected / operational / missed / crash."""
    shutil.copy(base, work)
    bytenr = rng.choice(blocks)
    pos = rng.randrange(nodesize)
    with open(work, "r+b") as f:
        f.seek(bytenr)
        buf = bytearray(f.read(nodesize))
        buf[pos] ^= 1 << rng.randrange(8)
        if recsum:
            buf[:32] = csums.field(csum_type, bytes(buf[32:]))
        f.seek(bytenr)
        f.write(buf)
    try:
        report = check(work)
    except BlockemuError as e:
        return "operational", str(e)
    except Exception:  # noqa: BLE001 - the campaign exists to find these
        return "crash", traceback.format_exc()
    return ("missed", f"block {bytenr} byte {pos}") if report.clean else ("detected", report.errors[0].code)


def campaign(trials: int, seed: int, recsum: bool, out=sys.stdout) -> dict[str, int]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        base, work = os.path.join(d, "base.img"), os.path.join(d, "work.img")
        asyncio.run(populated(base, seed))
        blocks = [b["bytenr"] for b in dump_tree(base)]
        with open(base, "rb") as f:
            f.seek(65536 + 0x74)
            nodesize = int.from_bytes(f.read(4), "little")
            f.seek(65536 + 0x78)
            csum_type = int.from_bytes(f.read(2), "little")
        counts = {"detected": 0, "operational": 0, "missed": 0, "crash": 0}
        t = time.perf_counter()
        for i in range(trials):
            outcome, detail = trial(base, work, blocks, nodesize, csum_type, rng, recsum)
            counts[outcome] += 1
            if outcome == "crash":
                print(f"CRASH in trial {i} (seed {seed}):\n{detail}", file=out)
        dt = time.perf_counter() - t
    rate = (counts["detected"] + counts["operational"]) / trials
    print(f"{trials} trials over {len(blocks)} tree blocks ({'checksum recomputed' if recsum else 'raw flips'}), "
          f"{dt:.1f} s: detection rate {rate:.1%}  {counts}", file=out)
    return counts


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--recsum", action="store_true")
    a = ap.parse_args()
    counts = campaign(a.trials, a.seed, a.recsum)
    sys.exit(1 if counts["crash"] else 0)
