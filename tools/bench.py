#!/usr/bin/env python3
"""Benchmarks: every figure is printed with its ratio to a ceiling measured in the same run,
so numbers compare across machines and noisy runs.

    python tools/bench.py [btree] [fs] [rss] [fsck] [fuse] [--keys N] [--mib N] [--gib N] [--files N]

fs: ceilings first -- the naive fscrypt-compatible pipeline (one AES-256-XTS call per
4 KiB data unit + crc32c + pwritev + fsync; measured in turn with the sequential write,
five times, medians reported; like the filesystem, every round writes new data), the
physical ceiling (one XTS call per MiB
+ crc32c + pwrite + fsync), aiofiles with one call per 4 KiB write, raw pwrite + fsync
for random 4 KiB overwrites, host-filesystem file creation -- then the filesystem:
a sequential encrypted write ending in fsync, 4 KiB random overwrites with an fsync every
64 writes, 4 KiB buffered writes, 10,000 small files, and the p99 latency of write calls
made while a flush runs.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sortedcontainers import SortedDict  # noqa: E402

from blockemu.fs.mkfs import mkfs  # noqa: E402
from blockemu.fs.volume import Volume  # noqa: E402
from blockemu.ondisk.structs import FS_TREE_OBJECTID  # noqa: E402

ROUNDS = 5


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

    Like the filesystem's copy-on-write writes, each round writes *new* data: a region of a
    provisioned file it has not written before. Overwriting the same region would keep its
    pages in the host's page cache, and this VM charges ~3 ms per MiB for the first touch of
    page cache, so that ceiling would skip a cost every real write of new data pays (and
    unlinking the file instead would make the next run pay its discards: -o discard)."""
    import crc32c
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = os.urandom(64)
    algo = algorithms.AES(key)
    chunk = os.urandom(1 << 20)
    out = bytearray((1 << 20) + 15)
    omv = memoryview(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size < base + total:
        os.posix_fallocate(fd, 0, base + total)
    t = time.perf_counter()
    for off in range(0, total, 1 << 20):
        if per_unit:
            for u in range(256):
                enc = Cipher(algo, modes.XTS(u.to_bytes(16, "little"))).encryptor()
                enc.update_into(chunk[u * 4096 : (u + 1) * 4096], omv[u * 4096 : u * 4096 + 4111])
            sums = [crc32c.crc32c(omv[u * 4096 : (u + 1) * 4096]) for u in range(256)]
            os.pwritev(fd, [omv[: 1 << 20]], base + off)
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
    import aiofiles

    import blockemu

    total = mib << 20
    print(f"Filesystem ({mib} MiB sequential, encrypted; all ratios are against ceilings measured now)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        physical = total / _naive_pipeline(os.path.join(d, "phys"), total, False)
        row("ceiling: physical (XTS per MiB + fsync)", physical / 1e6, "MB/s")

        n = 5000
        block = os.urandom(4096)
        async with aiofiles.open(os.path.join(d, "aio"), "wb") as f:
            t = time.perf_counter()
            for _ in range(n):
                await f.write(block)
            aio_rate = n / (time.perf_counter() - t)
        row("ceiling: aiofiles, one call per 4 KiB write", aio_rate, "writes/s")

        fd = os.open(os.path.join(d, "rnd"), os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, 64 << 20)
        rng = random.Random(2)
        t = time.perf_counter()
        for i in range(4096):
            os.pwrite(fd, block, rng.randrange(16384) * 4096)
            if i % 64 == 63:
                os.fsync(fd)
        raw_rand = 4096 / (time.perf_counter() - t)
        os.close(fd)
        row("ceiling: raw pwrite 4 KiB random, fsync/64", raw_rand, "writes/s")

        os.mkdir(os.path.join(d, "many"))
        t = time.perf_counter()
        for i in range(10_000):
            with open(os.path.join(d, "many", str(i)), "wb") as f:
                f.write(b"x" * 100)
        host_create = 10_000 / (time.perf_counter() - t)
        row("ceiling: host fs, 10,000 small files", host_create, "files/s")

        image = os.path.join(d, "fs.img")
        await blockemu.mkfs(image, size=max(4 * total, 1 << 30))
        # provisioned like a real disk (and like the naive file after its first round): the
        # host filesystem's block allocation is not the emulated disk's cost
        with open(image, "r+b") as img:
            os.posix_fallocate(img.fileno(), 0, os.fstat(img.fileno()).st_size)
        key = os.urandom(64)
        async with blockemu.mount(image, interval=3600) as fs:
            kid = await fs.add_key(key)
            await fs.mkdir("/e")
            await fs.set_policy("/e", kid)
            chunk = os.urandom(1 << 20)
            lat: list[float] = []
            # this machine's speed drifts by 2x within a minute: measure the ceiling and the
            # filesystem back to back, ROUNDS times, and report the median of each and of the ratios
            rounds: list[tuple[float, float]] = []
            with open(os.path.join(d, "naive"), "wb") as f:  # provisioned, like the image
                os.posix_fallocate(f.fileno(), 0, ROUNDS * total)
            for r in range(ROUNDS):
                naive = total / _naive_pipeline(os.path.join(d, "naive"), total, True, base=r * total)
                async with fs.open("/e/seq", "w") as f:
                    t = time.perf_counter()
                    for _ in range(mib):
                        t0 = time.perf_counter()
                        await f.write(chunk)
                        lat.append(time.perf_counter() - t0)
                    await f.fsync()
                    seq = total / (time.perf_counter() - t)
                await fs.unlink("/e/seq")
                await fs.sync()
                rounds.append((naive, seq))
            naive = statistics.median(n for n, _ in rounds)
            seq = statistics.median(q for _, q in rounds)
            ratios = sorted(q / n for n, q in rounds)
            row("ceiling: naive pipeline (XTS per 4 KiB + fsync)", naive / 1e6, "MB/s")
            row("encrypted sequential write + fsync", seq / 1e6, "MB/s", naive / 1e6, "of naive")
            print(f"    per round, fs/naive: {', '.join(f'{r:.2f}x' for r in ratios)} (median {statistics.median(ratios):.2f}x)")
            row("", seq / 1e6, "MB/s", physical / 1e6, "of physical")

            async with fs.open("/e/rnd", "w+") as f:
                await f.truncate(64 << 20)
                t = time.perf_counter()
                for i in range(4096):
                    await f.pwrite(block, rng.randrange(16384) * 4096)
                    if i % 64 == 63:
                        await f.fsync()
                rnd = 4096 / (time.perf_counter() - t)
            row("4 KiB random overwrites, fsync every 64", rnd, "writes/s", raw_rand, "of raw pwrite")

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


async def populate_tree(fs, rng: random.Random, files: int, big: int) -> None:
    for i in range(files):
        d = f"/d{i % 100}"
        if i < 100:
            await fs.mkdir(d)
        async with fs.open(f"{d}/f{i}", "w") as f:
            await f.write(rng.randbytes(big if i % 50 == 0 else rng.randrange(100, 8000)))


def bench_fsck(files: int) -> None:
    """fsck throughput (metadata items/s) on a populated image, next to btrfs check --readonly
    on a btrfs image made with mkfs.btrfs --rootdir from the same content (when btrfs-progs is there)."""
    import shutil
    import subprocess

    from blockemu.check.fsck import check

    print(f"fsck: {files:,} files in 100 directories (every 50th 1 MiB)")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        image = os.path.join(d, "f.img")

        async def make() -> None:
            await blockemu_mkfs(image, "4G")
            from blockemu import mount
            async with mount(image, interval=3600) as fs:
                await populate_tree(fs, random.Random(3), files, 1 << 20)
        asyncio.run(make())
        t = time.perf_counter()
        report = check(image)
        dt = time.perf_counter() - t
        items = report.stats["items"]
        row("blockemu fsck (no data check)", items / dt, "items/s")
        row(f"  ({items:,} items)", dt * 1000, "ms")
        t = time.perf_counter()
        check(image, check_data=True)
        row("blockemu fsck --check-data", (time.perf_counter() - t) * 1000, "ms")
        if shutil.which("mkfs.btrfs") and shutil.which("btrfs"):
            root = os.path.join(d, "root")

            async def export() -> None:
                from blockemu import mount
                async with mount(image) as fs:
                    for dd in await fs.readdir("/"):
                        os.makedirs(os.path.join(root, dd))
                        for name in await fs.readdir(f"/{dd}"):
                            async with fs.open(f"/{dd}/{name}") as f:
                                with open(os.path.join(root, dd, name), "wb") as out:
                                    out.write(await f.read())
            asyncio.run(export())
            bimg = os.path.join(d, "b.img")
            with open(bimg, "wb") as f:
                f.truncate(4 << 30)
            subprocess.run(["mkfs.btrfs", "-q", "--rootdir", root, bimg], check=True, capture_output=True)
            t = time.perf_counter()
            p = subprocess.run(["btrfs", "check", "--readonly", bimg], capture_output=True, text=True)
            bdt = time.perf_counter() - t
            row("btrfs check --readonly, same content", bdt * 1000, "ms")
            print(f"  blockemu fsck takes {dt / bdt:.1f}x the time of btrfs check on the same content")
            if p.returncode:
                print("  (btrfs check reported:", p.stderr.strip().splitlines()[-1:], ")")
        else:
            print("  (btrfs-progs not installed: no btrfs check comparison)")


def blockemu_mkfs(path: str, size: str):
    from blockemu.fs.mkfs import mkfs as _mkfs
    return _mkfs(path, size)


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", choices=[[], "btree", "fs", "writeback", "rss", "fsck", "fuse"], default=[])
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    if not a.what or "fs" in a.what:
        asyncio.run(bench_fs(a.mib))
    if not a.what or "writeback" in a.what:
        asyncio.run(bench_writeback())
    if not a.what or "btree" in a.what:
        asyncio.run(bench_btree(a.keys))
    if not a.what or "rss" in a.what:
        bench_rss(a.gib)
    if not a.what or "fsck" in a.what:
        bench_fsck(a.files)
    if not a.what or "fuse" in a.what:
        bench_fuse()


if __name__ == "__main__":
    main()
