#!/usr/bin/env python3
"""Benchmarks: every figure is printed with its ratio to a reference measured in the same run,
so numbers compare across machines and noisy runs.

    python tools/bench.py [table] [seq] [stress] [fio] [btree] [fs] [writeback] [rss] [fsck] [fuse] [--rounds N] [--mib N] ...

table (the default): issue 16's figures in one table -- figure, blockemu, reference, ratio,
target. Method, for every figure: blockemu and its reference run ``--rounds`` times each in
alternating order (blockemu first in even rounds, the reference first in odd ones; the three
sequential-write measurements rotate), and the medians are compared, because this shared
machine's speed drifts by 2x within a minute. Every round writes fresh files, regions or
images, never ones a previous round wrote, and images are big enough for every round (the
host page cache's first touch and the filesystem's allocation of new space are costs real
writes pay). A reference tool that is not installed prints "n/a (not installed)".

Where a figure's flushes are the point (the fio job, the random overwrites with fsync, the stress
mix), blockemu runs on a fresh *preallocated* image (``mkfs --preallocate``: every block written
once, as a real disk has its blocks), and its reference on a device laid out as well (real fio:
the host directory's disk; the pwrite loop: a laid-out file; kernel btrfs: a laid-out loop
image. fio itself does not lay out this write-only job's file: it fallocates it, unwritten
extents, as ``blockemu run`` extends its file sparse -- the filesystem's cost on both sides):
the first write of a block of a sparse image file makes the host
allocate it, and the fdatasync after commits the host's journal (~0.97 ms against ~0.41 ms for
blocks written before), a cost of the host, not of the device blockemu emulates. A row of its own
("sparse image") keeps that figure on a sparse image, as mkfs makes one by default, so the
difference stays visible.

* sequential encrypted write + fsync (``--mib``) against the physical ceiling (one AES-256-XTS
  call per MiB + crc32c + pwrite + fsync, a fresh region of a provisioned file) and the fair
  per-unit pipeline (a tweak per 4 KiB data unit through fscrypt's one Cipher per key reused,
  crc32c per unit, pwrite per MiB, fsync);
* the fio job ``rw=randwrite bs=4k size=16m fsync=32 runtime=3 time_based``: real fio on a host
  directory vs ``blockemu run --preallocate`` on the same job file (fresh image), IOPS and median
  fsync latency read from both tools' JSON (and the same on a sparse image); and, as root with the btrfs module, real fio on the
  kernel's btrfs in a fresh laid-out loop-mounted image -- the btrfs-like peer, reported beside the target;
* 80 MiB of random 4 KiB buffered pwrites over 256 MiB (past the 64 MiB dirty limit) vs a
  plain os.pwrite loop at the same offsets; 4 KiB random overwrites with an fsync every 64 vs
  raw pwrite + fsync, on a preallocated image against a laid-out file (and both sparse);
* ``blockemu fsck`` vs ``btrfs check --readonly``, both as commands, on images each tool's mkfs
  made with ``--rootdir`` from one host directory of ``--files`` files (every 50th 1 MiB);
  blockemu's modules compiled to bytecode as an installed package's are, and (a row of its own)
  not compiled, as an editable checkout under PYTHONDONTWRITEBYTECODE runs;
* the stress mix (4 tasks, the median of ``--rounds`` runs on fresh preallocated images, and on
  sparse ones): no ceiling can run
  here (fsstress on kernel btrfs needs root), so the reference is issue 16's ~400 ops/s baseline
  and the ratio reads as "x today".

seq, stress, fio, random: the table's sequential-write rows, its stress row, its fio rows (IOPS and
median fsync latency against real fio on the host directory and on kernel btrfs), or its two random
4 KiB write rows alone (a minute, not the table's many: fsck's content
alone takes minutes to make).
fs: buffered writes under the background threshold (against aiofiles), 10,000 small files and
10,000 renames of them (against the host filesystem), and write-call latency during a flush and
a sequential run.
fsck: the table's fsck figure alone. writeback: see bench_writeback.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sortedcontainers import SortedDict  # noqa: E402

from blockemu.cli.collector import collect_less  # noqa: E402
from blockemu.fs.mkfs import lay_out, mkfs  # noqa: E402
from blockemu.fs.volume import Volume  # noqa: E402
from blockemu.ondisk.structs import FS_TREE_OBJECTID  # noqa: E402

ROUNDS = 5  # bench_writeback's rounds


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


def _naive_pipeline(path: str, total: int, per_unit: bool, base: int = 0) -> float:
    """Seconds to encrypt, checksum, write and fsync ``total`` bytes the way a filesystem must,
    at ``base`` in ``path``.

    ``per_unit``: the fscrypt-compatible pipeline written plainly but fairly -- each 4 KiB data
    unit its own XTS tweak, through fscrypt's one Cipher per key reused (not one built per unit
    from sliced bytes), into one reused output buffer; a crc32c per unit; one pwrite per MiB.
    Otherwise the physical ceiling: one XTS call per MiB, one crc32c, one pwrite.

    Like the filesystem's copy-on-write writes, each round writes *new* data: a region of a
    provisioned file it has not written before. Overwriting the same region would keep its
    pages in the host's page cache, and this VM charges ~3 ms per MiB for the first touch of
    page cache, so that ceiling would skip a cost every real write of new data pays (and
    unlinking the file instead would make the next run pay its discards: -o discard)."""
    import crc32c
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from blockemu.crypto.fscrypt import encrypt_units

    key = os.urandom(64)
    algo = algorithms.AES(key)
    chunk = memoryview(os.urandom(1 << 20))
    out = bytearray((1 << 20) + 15)
    omv = memoryview(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size < base + total:
        os.posix_fallocate(fd, 0, base + total)
    t = time.perf_counter()
    for off in range(0, total, 1 << 20):
        if per_unit:
            encrypt_units(key, chunk, off >> 12, out=out)
            sums = [crc32c.crc32c(omv[u : u + 4096]) for u in range(0, 1 << 20, 4096)]
        else:
            enc = Cipher(algo, modes.XTS(bytes(16))).encryptor()
            enc.update_into(chunk, omv)
            sums = [crc32c.crc32c(omv[: 1 << 20])]
        os.pwrite(fd, omv[: 1 << 20], base + off)
        del sums
    os.fsync(fd)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


async def bench_fs(mib: int) -> None:
    """What the table leaves out: buffered writes under the background threshold, small files,
    and write-call latency (while a flush runs, and in a sequential run)."""
    import aiofiles

    import blockemu

    total = mib << 20
    print("Filesystem (all ratios are against ceilings measured now; the sequential write is in the table)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        n = 5000
        block = os.urandom(4096)
        async with aiofiles.open(os.path.join(d, "aio"), "wb") as f:
            t = time.perf_counter()
            for _ in range(n):
                await f.write(block)
            aio_rate = n / (time.perf_counter() - t)
        row("ceiling: aiofiles, one call per 4 KiB write", aio_rate, "writes/s")

        os.mkdir(os.path.join(d, "many"))
        t = time.perf_counter()
        for i in range(10_000):
            with open(os.path.join(d, "many", str(i)), "wb") as f:
                f.write(b"x" * 100)
        host_create = 10_000 / (time.perf_counter() - t)
        row("ceiling: host fs, 10,000 small files", host_create, "files/s")

        image = os.path.join(d, "fs.img")
        await blockemu.mkfs(image, size=max(2 * total + (256 << 20), 1 << 30))
        async with blockemu.mount(image, interval=3600) as fs:
            kid = await fs.add_key(os.urandom(64))
            await fs.mkdir("/e")
            await fs.set_policy("/e", kid)
            chunk = os.urandom(1 << 20)
            lat: list[float] = []
            async with fs.open("/e/seq", "w") as f:
                for _ in range(mib):
                    t0 = time.perf_counter()
                    await f.write(chunk)
                    lat.append(time.perf_counter() - t0)
                await f.fsync()

            async with fs.open("/e/buf", "w") as f:
                t = time.perf_counter()
                for _ in range(4096):  # 16 MiB: under the background threshold, so this is the page cache's speed
                    await f.write(block)
                buf = 4096 / (time.perf_counter() - t)
            row("4 KiB buffered writes (16 MiB), no fsync", buf, "writes/s", aio_rate, "of aiofiles/call")

            await fs.mkdir("/many")
            t = time.perf_counter()
            for i in range(10_000):
                async with fs.open(f"/many/{i}", "w") as f:
                    await f.write(b"x" * 100)
            await fs.sync()
            created = 10_000 / (time.perf_counter() - t)
            row("10,000 small files + sync", created, "files/s", host_create, "of host fs")

            # rename, as rsync and editors use it: each file written under a temporary name, then
            # moved to its own (the names of the small files above, moved to new ones)
            t = time.perf_counter()
            for i in range(10_000):
                os.rename(os.path.join(d, "many", str(i)), os.path.join(d, "many", f"r{i}"))
            host_rename = 10_000 / (time.perf_counter() - t)
            row("ceiling: host fs, 10,000 renames", host_rename, "renames/s")
            t = time.perf_counter()
            for i in range(10_000):
                await fs.rename(f"/many/{i}", f"/many/r{i}")
            renamed = 10_000 / (time.perf_counter() - t)
            row("10,000 renames (no sync)", renamed, "renames/s", host_rename, "of host fs")

            # write-call latency while a flush of 64 MiB runs
            flush_lat: list[float] = []
            async with fs.open("/e/lat", "w") as f:
                for _ in range(64):
                    await f.write(chunk)
                flusher = asyncio.get_running_loop().create_task(fs.sync())
                await asyncio.sleep(0)
                while not flusher.done():
                    t0 = time.perf_counter()
                    await f.write(block)
                    flush_lat.append(time.perf_counter() - t0)
                    await asyncio.sleep(0)
                await flusher
        flush_lat.sort()
        lat.sort()
        if flush_lat:
            row("p99 4 KiB write() latency during a flush", flush_lat[int(len(flush_lat) * 0.99)] * 1e6, "us")
        row("p99 1 MiB write() latency, sequential run", lat[int(len(lat) * 0.99)] * 1e6, "us")


def _small_extent_ceiling(path: str, offsets: list[int]) -> float:
    """Seconds for the physical part of writing back one 4 KiB page per offset as its own
    extent: a per-extent HKDF-SHA512 key, one AES-256-XTS call, crc32c and a pwrite each."""
    import crc32c

    from blockemu.crypto import fscrypt

    master, page = os.urandom(64), os.urandom(4096)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    t = time.perf_counter()
    for off in offsets:
        key = fscrypt.extent_key(master, os.urandom(16))
        sealed = fscrypt.encrypt_units(key, page)
        crc32c.crc32c(sealed)
        fscrypt.wipe(key)
        os.pwrite(fd, sealed, off)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


async def bench_writeback() -> None:
    """The metadata path of writeback (issue 16): a flush of 32 scattered 4 KiB runs (each its
    own extent), and random 4 KiB buffered pwrites past the dirty limit; each against a
    ceiling measured in turn, ROUNDS times, medians reported."""
    import blockemu

    print("Writeback of small extents (encrypted; each ratio against a ceiling measured in turn)")
    rng = random.Random(4)
    page = os.urandom(4096)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        image = os.path.join(d, "wb.img")
        await blockemu.mkfs(image, size=1 << 30)
        flushes: list[tuple[float, float]] = []
        bufs: list[tuple[float, float]] = []
        async with blockemu.mount(image, interval=3600) as fs:
            kid = await fs.add_key(os.urandom(64))
            await fs.mkdir("/e")
            await fs.set_policy("/e", kid)
            async with fs.open("/e/f", "w+") as f:
                await f.pwrite(os.urandom(16 << 20), 0)
                await f.fsync()
                for r in range(ROUNDS * 4):
                    offsets = [rng.randrange(4096) * 4096 for _ in range(32)]
                    ceiling = _small_extent_ceiling(os.path.join(d, "ceiling"), offsets)
                    for off in offsets:
                        await f.pwrite(page, off)
                    t = time.perf_counter()
                    await fs.writeback.flush_inode(f.inode)
                    flushes.append((ceiling, time.perf_counter() - t))
                    if r % 4 == 3:
                        await fs.sync()
            n, size = 20480, 80 << 20  # 80 MiB of random pages: past the 64 MiB dirty limit
            for r in range(ROUNDS):
                fd = os.open(os.path.join(d, "raw"), os.O_RDWR | os.O_CREAT, 0o644)
                offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
                t = time.perf_counter()
                for off in offsets:
                    os.pwrite(fd, page, off)
                raw = n / (time.perf_counter() - t)
                os.close(fd)
                os.unlink(os.path.join(d, "raw"))
                async with fs.open(f"/e/buf{r}", "w+") as f:
                    await f.truncate(size)
                    t = time.perf_counter()
                    for off in offsets:
                        await f.pwrite(page, off)
                    bufs.append((raw, n / (time.perf_counter() - t)))
                await fs.unlink(f"/e/buf{r}")
                await fs.sync()
    ceiling = statistics.median(c for c, _ in flushes) * 1e6
    flush = statistics.median(w for _, w in flushes) * 1e6
    row("ceiling: 32 x (HKDF + XTS 4 KiB + crc32c + pwrite)", ceiling, "us")
    row("flush_inode of 32 scattered 4 KiB runs", flush, "us", ceiling, "the ceiling's time")
    raw = statistics.median(r for r, _ in bufs)
    buf = statistics.median(b for _, b in bufs)
    row("ceiling: os.pwrite loop, random 4 KiB", raw, "writes/s")
    row("random 4 KiB buffered pwrites, 80 MiB", buf, "writes/s", raw, "of the pwrite loop")


RSS_CHILD = """
import asyncio, os, sys, time
import blockemu
def status(field):  # VmHWM, unlike ru_maxrss, starts afresh at exec
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
base = status("VmRSS")
async def go(path, total):
    await blockemu.mkfs(path, size=total * 2)
    async with blockemu.mount(path, interval=3600, dirty_limit=int(os.environ.get("DL", 64 << 20))) as fs:
        kid = await fs.add_key(os.urandom(64))
        await fs.mkdir("/e"); await fs.set_policy("/e", kid)
        chunk = os.urandom(1 << 20)
        async with fs.open("/e/warm", "w") as f:  # everything a mounted filesystem keeps, warmed
            await f.write(chunk)
            await f.fsync()
        before = status("VmHWM")
        with open("/proc/self/clear_refs", "w") as c:  # 5: VmHWM starts again from VmRSS
            c.write("5")
        mounted = status("VmRSS")
        async with fs.open("/e/big", "w") as f:
            t = time.perf_counter()
            for _ in range(total >> 20):
                await f.write(chunk)
            await f.fsync()
            return before, mounted, time.perf_counter() - t
before, mounted, dt = asyncio.run(go(sys.argv[1], int(sys.argv[2])))
print(base, mounted, max(before, status("VmHWM")), status("VmHWM"), dt)
"""


def bench_rss(gib: int) -> None:
    """Writing far more than the dirty limit keeps memory bounded (peak RSS of a child process)."""
    import subprocess

    total = gib << 30
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, os.path.join(d, "rss.img"), str(total)],
                             capture_output=True, text=True, check=True).stdout.split()
    base_kib, mounted_kib, peak_kib, write_peak_kib, dt = map(float, out)
    print(f"Memory: {gib} GiB encrypted write with a 64 MiB dirty limit")
    row("interpreter + imports, before the write", base_kib / 1024, "MiB")
    row("mounted, after a 1 MiB write + fsync", mounted_kib / 1024, "MiB")
    row("peak RSS", peak_kib / 1024, "MiB")
    row("peak above the interpreter", (peak_kib - base_kib) / 1024, "MiB")
    row("peak above the mounted filesystem", (write_peak_kib - mounted_kib) / 1024, "MiB")
    row("throughput", total / dt / 1e6, "MB/s")


# ---------------------------------------------------------------------------------------------
# The table of issue 16: each figure next to its reference measured in this run.

class Figure(NamedTuple):
    name: str
    ours: float | None
    reference: float | None
    unit: str
    higher_is_better: bool
    target: str
    note: str = ""

    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference


def num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def print_table(figures: list[Figure]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="blockemu against references measured in this run (medians of alternating rounds)")
    for col in ("figure", "blockemu", "reference", "ratio", "target"):
        table.add_column(col, justify="left" if col in ("figure", "target") else "right")
    for f in figures:
        ref = f"{num(f.reference)} {f.unit}" if f.reference is not None else f"n/a ({f.note or 'not installed'})"
        ours = f"{num(f.ours)} {f.unit}" if f.ours is not None else "n/a"
        ratio = f"{f.ratio():.2f}x" if f.ratio() is not None else "-"
        table.add_row(f.name, ours, ref, ratio, f.target)
    Console(width=160).print(table)


def alternate(rounds: int, *measurements) -> list[list]:
    """Run each measurement ``rounds`` times, the order rotating by one each round (with two:
    ours first in even rounds, the reference first in odd ones), so drift of this shared
    machine hits them alike. One list of results per measurement."""
    runs: list[list] = [[] for _ in measurements]
    n = len(measurements)
    for r in range(rounds):
        for i in list(range(n))[r % n:] + list(range(n))[: r % n]:
            runs[i].append(measurements[i](r))
    return runs


def med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


async def _fs_rate(image: str, body) -> float:
    import blockemu
    async with blockemu.mount(image, interval=3600) as fs:
        return await body(fs)


def fig_sequential(d: str, mib: int, rounds: int) -> list[Figure]:
    """Encrypted sequential write + fsync, against the fair per-unit pipeline and the physical
    ceiling; the three in rotating order, every round on new regions of provisioned files and
    of an image big enough for all rounds (nothing is deleted, so nothing is written twice)."""
    import blockemu

    total = mib << 20
    image = os.path.join(d, "seq.img")
    asyncio.run(blockemu.mkfs(image, size=(rounds + 1) * total + (256 << 20)))
    with open(image, "r+b") as img:  # provisioned like a real disk
        os.posix_fallocate(img.fileno(), 0, os.fstat(img.fileno()).st_size)
    for name in ("naive", "phys"):
        with open(os.path.join(d, name), "wb") as f:
            os.posix_fallocate(f.fileno(), 0, rounds * total)
    key = os.urandom(64)
    chunk = os.urandom(1 << 20)

    async def fs_round(r: int) -> float:
        async with blockemu.mount(image, interval=3600) as fs:
            kid = await fs.add_key(key)
            if r == 0:
                await fs.mkdir("/e")
                await fs.set_policy("/e", kid)
            async with fs.open(f"/e/seq{r}", "w") as f:
                t = time.perf_counter()
                for _ in range(mib):
                    await f.write(chunk)
                await f.fsync()
                return total / (time.perf_counter() - t)

    fs, naive, phys = (med(runs) for runs in alternate(
        rounds,
        lambda r: asyncio.run(fs_round(r)) / 1e6,
        lambda r: total / _naive_pipeline(os.path.join(d, "naive"), total, True, base=r * total) / 1e6,
        lambda r: total / _naive_pipeline(os.path.join(d, "phys"), total, False, base=r * total) / 1e6))
    return [Figure(f"sequential encrypted write + fsync, {mib} MiB", fs, phys, "MB/s", True, ">= 0.6x physical",
                   "physical: 1 XTS call/MiB + crc32c + pwrite + fsync"),
            Figure("  same, against the fair per-unit pipeline", fs, naive, "MB/s", True, "(reported)")]


PEER_IMAGE_SIZE = 2 << 30  # the loop image kernel btrfs runs the fio job in


def kernel_btrfs_available() -> bool:
    """The btrfs-like peer runs: mkfs.btrfs, root (a loop mount) and the kernel's btrfs."""
    import shutil

    return (shutil.which("mkfs.btrfs") is not None and os.geteuid() == 0
            and "btrfs" in Path("/proc/filesystems").read_text())


def fresh_host_file(path: str, size: int, laid_out: bool) -> None:
    """A new host file of ``size`` bytes that a reference writes into as its device: laid out
    (zeros written and fsynced), as ``mkfs --preallocate`` lays out blockemu's image, or sparse,
    as mkfs's default one -- each pairing's devices laid out on both sides or on neither, or a
    flush measured the host allocating a block on one side only (DESIGN §10)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        if laid_out:
            asyncio.run(lay_out(fd, path, size, False))
            os.fsync(fd)
    finally:
        os.close(fd)


def fig_fio(d: str, rounds: int) -> list[Figure]:
    """The fio job of issue 16, real fio on a host directory vs ``blockemu run --preallocate`` on
    the same job file (a fresh image each round; a sparse one in rows of their own): IOPS and
    median fsync latency, from both tools' JSON."""
    import json
    import shutil
    import subprocess

    job = os.path.join(d, "job.fio")
    Path(job).write_text("[j]\nrw=randwrite\nbs=4k\nsize=16m\nfsync=32\nruntime=3\ntime_based\n")
    fio = shutil.which("fio")

    def stats(out: str) -> tuple[float, float]:
        j = json.loads(out)["jobs"][0]
        return j["write"]["iops"], j["sync"]["lat_ns"]["percentile"]["50.000000"] / 1e6

    def ours(r: int, preallocate: bool = True) -> tuple[float, float]:
        image = os.path.join(d, f"fio{r}.img")
        out = subprocess.run([sys.executable, "-m", "blockemu", "run", job, "--image", image, "--output-format", "json",
                              *["--preallocate"] * preallocate], check=True, capture_output=True, text=True).stdout
        os.unlink(image)
        return stats(out)

    def real_fio(directory: str) -> tuple[float, float]:
        out = subprocess.run([fio, f"--directory={directory}", "--output-format=json", job],
                             check=True, capture_output=True, text=True).stdout
        return stats(out)

    def host(r: int) -> tuple[float, float] | None:
        if fio is None:
            return None
        directory = os.path.join(d, f"host{r}")
        os.mkdir(directory)
        try:
            return real_fio(directory)
        finally:
            shutil.rmtree(directory)

    # The btrfs-like peer: real fio on the kernel's btrfs (its tree-log does the fsyncs) in a
    # loop-mounted image on the same disk -- what a design like ours reaches in the kernel. Its
    # image is its device, laid out as blockemu's is: on a sparse one each loop flush paid the
    # host's allocation, the cost the preallocated image spares blockemu
    kernel_btrfs = fio is not None and kernel_btrfs_available()

    def btrfs(r: int) -> tuple[float, float] | None:
        if not kernel_btrfs:
            return None
        image, mnt = os.path.join(d, f"btrfs{r}.img"), os.path.join(d, f"btrfs{r}")
        fresh_host_file(image, PEER_IMAGE_SIZE, laid_out=True)
        os.mkdir(mnt)
        subprocess.run(["mkfs.btrfs", "-q", image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, mnt], check=True, capture_output=True)
        try:
            return real_fio(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)
            os.rmdir(mnt)
            os.unlink(image)

    mine, theirs, sparse, peer = alternate(rounds, ours, host, lambda r: ours(r, preallocate=False), btrfs)
    note = "" if fio else "fio not installed"
    peer_note = "" if kernel_btrfs else "needs fio, mkfs.btrfs, root and the btrfs module"

    def pick(runs: list, i: int) -> float | None:
        return med([x[i] for x in runs if x])

    return [Figure("fio randwrite 4k fsync=32 (IOPS)", pick(mine, 0), pick(theirs, 0), "IOPS", True,
                   ">= 0.5x real fio, host dir", note),
            Figure("  median fsync latency in that job", pick(mine, 1), pick(theirs, 1), "ms", False,
                   "<= 3x the host's", note),
            Figure("  same job, sparse image (IOPS)", pick(sparse, 0), pick(theirs, 0), "IOPS", True,
                   "(reported: the host allocating)", note),
            Figure("  median fsync latency, sparse image", pick(sparse, 1), pick(theirs, 1), "ms", False,
                   "(reported)", note),
            Figure("  same job, vs real fio on kernel btrfs (loop)", pick(mine, 0), pick(peer, 0), "IOPS", True,
                   "(reported: the btrfs-like peer)", peer_note),
            Figure("  median fsync latency, vs kernel btrfs", pick(mine, 1), pick(peer, 1), "ms", False,
                   "(reported)", peer_note)]


def fig_random(d: str, rounds: int, name: str, writes: int, span: int, fsync_every: int | None,
               target: str, preallocate: bool = False) -> list[Figure]:
    """``writes`` random 4 KiB pwrites over a ``span``-byte file (seeded offsets), an fsync every
    ``fsync_every`` if given; a fresh image each round, against the same pwrites (and fsyncs) of
    a plain os.pwrite loop on a fresh host file. ``preallocate``: the image is preallocated and
    the host file laid out (zeros written and fsynced before the loop), as a disk's blocks are,
    else both are sparse. The laid-out loop is the slower one on
    this host (2,537 against 5,248 writes/s with an fsync every 64, medians of 5 alternating
    runs): its overwrites land in place, 64 scattered writes a sync, where ext4 allocates a sparse
    file's new pages at the fsync and may put them together."""
    import blockemu

    rng = random.Random(4)  # one generator: a fresh Random(4) per offset gave every write the same page
    offsets = [rng.randrange(span >> 12) << 12 for _ in range(writes)]
    block = os.urandom(4096)
    every = fsync_every or writes + 1

    async def body(fs) -> float:
        async with fs.open("/rnd", "w+") as f:
            await f.truncate(span)
            t = time.perf_counter()
            for i, off in enumerate(offsets):
                await f.pwrite(block, off)
                if i % every == every - 1:
                    await f.fsync()
            return writes / (time.perf_counter() - t)

    def ours(r: int) -> float:
        image = os.path.join(d, f"rnd{r}.img")
        asyncio.run(blockemu.mkfs(image, size=max(2 * span, 1 << 30), preallocate=preallocate))
        rate = asyncio.run(_fs_rate(image, body))
        os.unlink(image)
        return rate

    def loop(r: int) -> float:
        path = os.path.join(d, f"pw{r}")
        fresh_host_file(path, span, laid_out=preallocate)
        fd = os.open(path, os.O_RDWR)
        t = time.perf_counter()
        for i, off in enumerate(offsets):
            os.pwrite(fd, block, off)
            if i % every == every - 1:
                os.fsync(fd)
        rate = writes / (time.perf_counter() - t)
        os.close(fd)
        os.unlink(path)
        return rate

    mine, theirs = alternate(rounds, ours, loop)
    return [Figure(name, med(mine), med(theirs), "writes/s", True, target)]


def fig_randoms(d: str, rounds: int) -> list[Figure]:
    """The table's two random-write rows (``random`` alone runs just these)."""
    # 80 MiB over 256 MiB: past the 64 MiB dirty limit, so writeback runs under the writes
    return (fig_random(d, rounds, "random 4 KiB buffered pwrites, 80 MiB", 80 << 8, 256 << 20, None,
                       ">= 0.3x the pwrite loop")
            + fig_random(d, rounds, "4 KiB random overwrites of 64 MiB, fsync every 64", 4096, 64 << 20, 64,
                         "(reported)", preallocate=True)
            + fig_random(d, rounds, "  same, sparse image and host file", 4096, 64 << 20, 64, "(reported)"))


def fsck_content(root: str, files: int) -> None:
    """``files`` files in 100 directories, every 50th 1 MiB, the rest 100 B to 8 KB (seeded)."""
    rng = random.Random(3)
    for i in range(files):
        directory = os.path.join(root, f"d{i % 100}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"f{i}"), "wb") as f:
            f.write(rng.randbytes((1 << 20) if i % 50 == 0 else rng.randrange(100, 8000)))


def fig_fsck(d: str, files: int, rounds: int) -> list[Figure]:
    """``blockemu fsck`` against ``btrfs check --readonly``, both as commands, on images each
    tool's mkfs made with ``--rootdir`` from one host directory (the same content)."""
    import shutil
    import subprocess

    root = os.path.join(d, "root")
    fsck_content(root, files)
    ours_img, btrfs_img = os.path.join(d, "f.img"), os.path.join(d, "b.img")
    subprocess.run([sys.executable, "-m", "blockemu", "mkfs", "--size", "4G", "--rootdir", root, "--no-progress",
                    ours_img], check=True, capture_output=True)
    btrfs = shutil.which("btrfs") if shutil.which("mkfs.btrfs") else None
    if btrfs:
        with open(btrfs_img, "wb") as f:
            f.truncate(4 << 30)
        subprocess.run(["mkfs.btrfs", "-q", "--rootdir", root, btrfs_img], check=True, capture_output=True)
    shutil.rmtree(root)

    def timed(argv: list[str]) -> tuple[float, float]:
        """(wall, CPU) seconds of one command; CPU (user + sys) is what a machine shared with
        other work cannot inflate by making the command wait for a core."""
        import resource
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode:
            raise SystemExit(f"bench: {' '.join(argv)} exited {p.returncode}: {p.stderr.strip()[-300:]}")
        return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    def bytecode(compiled: bool) -> None:
        """blockemu's modules compiled to bytecode, as pip leaves an installed package (and left
        its dependencies here), or not: an editable checkout under PYTHONDONTWRITEBYTECODE (this
        machine's sessions set it) compiles every module on every run, which a compiled btrfs
        never pays. The command is timed both ways."""
        package = Path(__file__).resolve().parent.parent / "blockemu"
        if compiled:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, capture_output=True)
        else:
            for cache in package.rglob("__pycache__"):
                shutil.rmtree(cache)

    def ours(r: int) -> tuple[float, float, float, float]:
        from blockemu.check.fsck import check
        t = time.perf_counter()
        check(ours_img)
        inproc = time.perf_counter() - t
        command = [sys.executable, "-m", "blockemu", "fsck", "--no-progress", ours_img]
        bytecode(False)
        uncompiled, _ = timed(command)
        bytecode(True)
        return (*timed(command), inproc, uncompiled)

    mine, theirs = alternate(rounds, ours, lambda r: timed([btrfs, "check", "--readonly", btrfs_img]) if btrfs else None)
    note = "" if btrfs else "btrfs-progs not installed"
    target = "<= 3x btrfs check --readonly"
    return [Figure(f"fsck, {files:,} files: command, wall", med([m[0] for m in mine]), med([t[0] for t in theirs if t]),
                   "s", False, target, note),
            Figure("  command, CPU (user + sys)", med([m[1] for m in mine]), med([t[1] for t in theirs if t]),
                   "s", False, "(reported: fsck runs two processes)", note),
            Figure("  in-process check(), wall (no interpreter start)", med([m[2] for m in mine]),
                   med([t[0] for t in theirs if t]), "s", False, target, note),
            Figure("  command, wall, blockemu's modules not compiled", med([m[3] for m in mine]),
                   med([t[0] for t in theirs if t]), "s", False, target, note)]


def fig_stress(d: str, seconds: float, rounds: int = 1) -> list[Figure]:
    """The stress mix, 4 tasks: ops/s over the mix's own time (the summary's ``seconds``: neither
    mkfs, mount nor the checks after it, and the operations still running at the ``--duration``
    deadline counted with the time they took), the median of ``rounds`` runs, each on a fresh
    image (one run moves by 2x with this shared machine's load): a preallocated one of the size
    stress makes (the mix waits on flushes), and, alternating with it, the sparse one stress makes
    itself. No ceiling runs here (fsstress on kernel
    btrfs needs root and a loop mount); the reference is issue 16's baseline, so its ratio is
    the 'x today'."""
    import json
    import subprocess

    import blockemu
    from blockemu.workload.runner import MIX_IMAGE_SIZE

    def one(r: int, preallocate: bool = True) -> float:
        image = os.path.join(d, f"stress{r}.img")
        if preallocate:
            asyncio.run(blockemu.mkfs(image, size=MIX_IMAGE_SIZE, preallocate=True))
        out = subprocess.run([sys.executable, "-m", "blockemu", "stress", image, "--tasks",
                              "4", "--duration", str(seconds), "--json", "--no-progress", "--seed", "1"],
                             check=True, capture_output=True, text=True).stdout
        os.unlink(image)
        return json.loads(out)["ops_per_second"]  # over the mix's own time, which outlasts --duration

    ops, sparse = (med(runs) for runs in alternate(rounds, one, lambda r: one(r, preallocate=False)))
    return [Figure("stress mix, 4 tasks (reference: issue 16's ~400)", ops, 400.0, "ops/s", True, ">= 5x today"),
            Figure("  same, sparse image", sparse, 400.0, "ops/s", True, "(reported)")]


def table_rows(a: argparse.Namespace, d: str) -> dict[str, Callable[[], list[Figure]]]:
    """The table's figures in its order, each by the name that runs it alone (``seq``, ``fio``...)."""
    return {"seq": lambda: fig_sequential(d, a.mib, a.rounds), "fio": lambda: fig_fio(d, a.rounds),
            "random": lambda: fig_randoms(d, a.rounds), "fsck": lambda: fig_fsck(d, a.files, a.rounds),
            "stress": lambda: fig_stress(d, a.stress_seconds, a.rounds)}


def bench_rows(a: argparse.Namespace, which: str | None = None) -> None:
    """Print a table of the figure named, or (None) the whole table, every figure in its order."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        rows = table_rows(a, d)
        print_table([f for name in ([which] if which else rows) for f in rows[name]()])


FUSE_JOBS = {
    # plain fio jobs that both the OS's fio and `blockemu run` accept
    "4 KiB random writes": "[j]\nrw=randwrite\nbs=4k\nsize=16m\nruntime=5\ntime_based\nrandseed=1\n",
    "4 KiB random writes, fsync every 32": "[j]\nrw=randwrite\nbs=4k\nsize=16m\nruntime=5\ntime_based\nrandseed=1\nfsync=32\n",
    "1 MiB sequential writes, fsync at the end": "[j]\nrw=write\nbs=1m\nsize=64m\nfsync=64\n",
}


def bench_fuse() -> None:
    """The same fio jobs on the host directory (the ceiling), through `blockemu mount` with the
    OS's fio, and in-process with `blockemu run`: what the FUSE round trip costs."""
    import json
    import shutil
    import subprocess

    if not shutil.which("fio"):
        print("fuse: skipped, fio is not installed (apt-get install fio)")
        return
    blockemu = [sys.executable, "-m", "blockemu"]

    def fio(job: str, directory: str) -> dict:
        out = subprocess.run(["fio", f"--directory={directory}", "--ioengine=psync", "--output-format=json", job],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)["jobs"][0]["write"]

    print("FUSE mount vs host directory vs `blockemu run` (fio, psync, one job)")
    with tempfile.TemporaryDirectory() as d:
        host, mnt, img = os.path.join(d, "host"), os.path.join(d, "mnt"), os.path.join(d, "f.img")
        os.mkdir(host)
        os.mkdir(mnt)
        for name, text in FUSE_JOBS.items():
            job = os.path.join(d, "job.fio")
            Path(job).write_text(text)
            ceiling = fio(job, host)
            subprocess.run([*blockemu, "mkfs", img, "--size", "1G", "--force"], check=True, capture_output=True)
            subprocess.run([*blockemu, "mount", img, mnt], check=True, capture_output=True)
            try:
                mounted = fio(job, mnt)
            finally:
                subprocess.run([*blockemu, "umount", mnt], check=True, capture_output=True)
            out = subprocess.run([*blockemu, "run", job, "--image", img, "--output-format", "json"],
                                 check=True, capture_output=True, text=True).stdout
            inproc = json.loads(out)["jobs"][0]["write"]
            print(f"  {name}")
            for what, r in (("host directory", ceiling), ("blockemu mount + fio", mounted), ("blockemu run", inproc)):
                row(f"  {what}: IOPS", r["iops"], "IOPS", ceiling["iops"], "of host")
                row(f"  {what}: bandwidth", r["bw_bytes"] / 1e6, "MB/s", ceiling["bw_bytes"] / 1e6, "of host")
            Path(img).unlink()


def main() -> None:
    collect_less()  # the collector's schedule blockemu's programs run with (blockemu/cli/collector.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", choices=[[], "table", "seq", "stress", "fio", "random", "btree", "fs", "writeback", "rss",
                                                "fsck", "fuse"],
                    default=[])
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--files", type=int, default=45_000)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per table figure (medians)")
    ap.add_argument("--stress-seconds", type=float, default=10)
    a = ap.parse_args()
    what = a.what or ["table"]
    if "table" in what:
        bench_rows(a)
    for which in ("seq", "stress", "fio", "random", "fsck"):
        if which in what:
            bench_rows(a, which)
    if "fs" in what:
        asyncio.run(bench_fs(a.mib))
    if "writeback" in what:
        asyncio.run(bench_writeback())
    if "btree" in what:
        asyncio.run(bench_btree(a.keys))
    if "rss" in what:
        bench_rss(a.gib)
    if "fuse" in what:
        bench_fuse()


if __name__ == "__main__":
    main()
