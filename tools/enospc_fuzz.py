"""Seeded fill/delete/overwrite runs on a small image, on demand: does every write() that
returned success reach the disk once the image is full?

Each seed fills a fresh image with files of mixed sizes (some fsynced, some only written)
until write() says ENOSPC, deletes most of them, then writes into new files -- appends and
overwrites at random offsets -- until write() says ENOSPC again, and syncs. A write that
returned success and that writeback then could not place (the sync, or the unmount, reports
"writeback ... failed: N bytes lost"), or a file whose bytes differ after a fresh mount, is a
loss: write() must refuse what writeback cannot place (DESIGN §5, "space").

    python tools/enospc_fuzz.py --seeds 0..8          # seeds 0 to 7, plain and encrypted each

Exit 0 if no seed lost anything, 1 otherwise. Runs are not fully deterministic: writeback's
timing against the writer decides which write meets the full image. tests/test_enospc.py runs
a few seeds with background writeback off (``one``'s mount options).
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import random
import sys

import blockemu
from blockemu.workload.campaign import parse_range

KEY = bytes(range(64))


async def fill(fs: blockemu.Filesystem, d: str, rng: random.Random, model: dict[str, bytes]) -> None:
    """Files of mixed sizes until write() says ENOSPC; half of them fsynced, a sync now and then."""
    for i in range(100_000):
        data = rng.randbytes(rng.choice([4096, 12288, 65536, 200_000, 311_296]))
        try:
            async with fs.open(f"{d}f{i}", "w") as f:
                await f.write(data)
                if rng.random() < 0.5:
                    await f.fsync()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            await fs.unlink(f"{d}f{i}")  # what a refused write left behind is not the model's
            return
        model[f"{d}f{i}"] = data
        if rng.random() < 0.2:
            await fs.sync()


async def scribble(fs: blockemu.Filesystem, d: str, rng: random.Random, model: dict[str, bytes]) -> None:
    """Appends and overwrites, in new files, until write() says ENOSPC."""
    files: dict[str, bytearray] = {}
    for k in range(100_000):
        p = f"{d}n{k}" if not files or rng.random() < 0.1 else rng.choice(list(files))
        m = files.get(p, bytearray())
        data = rng.randbytes(rng.choice([512, 4096, 5000, 65536, 131072]))
        off = len(m) if rng.random() < 0.6 else rng.randrange(0, len(m) + 1)
        try:
            async with fs.open(p, "r+" if p in files else "w") as f:
                await f.pwrite(data, off)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            break
        m[off : off + len(data)] = data
        files[p] = m
    model.update((p, bytes(m)) for p, m in files.items())


async def one(image: str, seed: int, encrypted: bool, **opts: int) -> str | None:
    """One seed's run; what it lost, or None. ``opts``: mount options over the seed's own (a
    test turns the interval and background writeback off, which time alone would start)."""
    rng = random.Random(f"{seed}:{encrypted}")
    await blockemu.mkfs(image, size="16M", force=True)
    model: dict[str, bytes] = {}
    phase = "filling"
    try:
        async with blockemu.mount(image, **{"max_extent": rng.choice([16384, 65536, 1 << 20]), **opts}) as fs:
            d = "/"
            if encrypted:
                kid = await fs.add_key(KEY)
                await fs.mkdir("/e")
                await fs.set_policy("/e", kid)
                d = "/e/"
            await fill(fs, d, rng, model)
            await fs.sync()
            phase = "deleting"
            for p in [p for p in model if rng.random() < 0.6]:
                await fs.unlink(p)
                del model[p]
            await fs.sync()
            phase = "scribbling"
            await scribble(fs, d, rng, model)
            await fs.sync()
            phase = "unmounting"
    except OSError as e:
        return f"acknowledged writes lost ({phase}): {e}"
    async with blockemu.mount(image, readonly=True) as fs:
        if encrypted:
            await fs.add_key(KEY)
        for p, want in sorted(model.items()):
            async with fs.open(p) as f:
                got = await f.read()
            if got != want:
                return f"{p}: {len(got)} bytes on disk, {len(want)} written"
    return None


def seed_range(text: str) -> range:
    """``A..B`` as every blockemu command reads it: B excluded."""
    try:
        return range(*parse_range(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=seed_range, default=seed_range("0..8"), help="A..B, B excluded (as blockemu stress --seeds)")
    ap.add_argument("--image", default="images/enospc-fuzz.img")
    a = ap.parse_args()
    lost = 0
    for seed in a.seeds:
        for encrypted in (False, True):
            why = asyncio.run(one(a.image, seed, encrypted))
            print(f"seed {seed} {'encrypted' if encrypted else 'plain'}: {why or 'nothing lost'}", flush=True)
            lost += why is not None
    print(f"{lost} of {2 * len(a.seeds)} runs lost acknowledged writes")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
