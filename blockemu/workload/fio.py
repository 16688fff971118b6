"""fio jobs against a file in the emulated filesystem, reported the way fio reports.

Each job (times ``numjobs``) works on its own file ``<directory>/<name>.<n>.0``
through ``pread``/``pwrite`` with ``iodepth`` I/Os in flight; read jobs lay the
file out first, as fio does. ``verify`` writes blocks that carry their offset
and a checksum, then reads everything back. The result is fio's JSON layout
(``jobs[].read/write/sync`` with ``io_bytes``, ``bw_bytes``, ``iops``,
``runtime`` in ms and ``lat_ns`` percentiles) and a text summary in fio's words.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from blockemu.errors import InvalidArgument
from blockemu.fs.filesystem import Filesystem
from blockemu.units import human
from blockemu.workload.jobfile import Job

PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99)
VERIFY_HEAD = struct.Struct("<QQ32s")  # offset, generation, digest of the rest


@dataclass
class Direction:
    lat_ns: list[int] = field(default_factory=list)
    io_bytes: int = 0

    def as_json(self, runtime_s: float) -> dict[str, Any]:
        lat = sorted(self.lat_ns)
        n = len(lat)
        out: dict[str, Any] = {"io_bytes": self.io_bytes, "io_kbytes": self.io_bytes // 1024, "total_ios": n,
                               "runtime": int(runtime_s * 1000),
                               "bw_bytes": int(self.io_bytes / runtime_s) if runtime_s else 0,
                               "bw": int(self.io_bytes / runtime_s / 1024) if runtime_s else 0,
                               "iops": n / runtime_s if runtime_s else 0.0}
        out["lat_ns"] = {
            "min": lat[0] if n else 0, "max": lat[-1] if n else 0,
            "mean": statistics.fmean(lat) if n else 0.0, "stddev": statistics.pstdev(lat) if n > 1 else 0.0,
            "N": n, "percentile": {f"{p:.6f}": lat[min(n - 1, int(n * p / 100))] for p in PERCENTILES} if n else {},
        }
        return out


@dataclass
class JobResult:
    name: str
    group: int
    runtime_s: float = 0.0
    read: Direction = field(default_factory=Direction)
    write: Direction = field(default_factory=Direction)
    sync: Direction = field(default_factory=Direction)
    error: int = 0
    verify_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {"jobname": self.name, "groupid": self.group, "error": self.error, "job_runtime": int(self.runtime_s * 1000),
               "read": self.read.as_json(self.runtime_s), "write": self.write.as_json(self.runtime_s),
               "sync": self.sync.as_json(self.runtime_s)}
        if self.verify_errors:
            out["verify_errors"] = self.verify_errors
        out.update(self.extra)
        return out


def verify_block(offset: int, gen: int, size: int, rng: random.Random) -> bytes:
    body = rng.randbytes(size - VERIFY_HEAD.size)
    return VERIFY_HEAD.pack(offset, gen, hashlib.sha256(body).digest()) + body


def verify_ok(block: bytes, offset: int) -> bool:
    off, _, digest = VERIFY_HEAD.unpack_from(block)
    return off == offset and hashlib.sha256(block[VERIFY_HEAD.size :]).digest() == digest


def pattern_block(size: int, rng: random.Random) -> bytes:
    seed = rng.randbytes(512)
    return (seed * (size // 512 + 1))[:size]


async def run_fio(fs: Filesystem, job: Job, directory: str, seed: int) -> JobResult:
    rw = job.get("rw", job.get("readwrite", "read"))
    bs = job.get("bs", job.get("blocksize", 4096))
    size = job.get("size", job.get("filesize"))
    if size is None:
        raise InvalidArgument(f"job {job.name}: fio needs size= (the emulated filesystem has no device to size from)")
    if bs <= 0 or size < bs:
        raise InvalidArgument(f"job {job.name}: bs={bs} must be positive and at most size={size}")
    result = JobResult(job.name, job.group)
    numjobs = job.get("numjobs", 1)
    t0 = time.perf_counter()
    await asyncio.gather(*(_clone(fs, job, directory, n, rw, bs, size - size % bs, seed, result) for n in range(numjobs)))
    result.runtime_s = time.perf_counter() - t0
    return result


async def _clone(fs: Filesystem, job: Job, directory: str, n: int, rw: str, bs: int, size: int, seed: int,
                 result: JobResult) -> None:
    path = job.get("filename") or f"{directory.rstrip('/')}/{job.name}.{n}.0"
    rng = random.Random(job.get("randseed", seed) + n)
    data_rng = random.Random(rng.random())
    verify = job.get("verify", "0") not in ("0", "null")
    f = await fs.open(path, "w+" if not await fs.exists(path) else "r+")
    try:
        reads = rw in ("read", "randread")
        mixed = rw in ("rw", "readwrite", "randrw")
        if reads or mixed:  # lay the file out first, as fio does
            if f.inode.size < size:
                for off in range(0, size, bs):
                    await f.pwrite(verify_block(off, 0, bs, data_rng) if verify else pattern_block(bs, data_rng), off)
                await f.fsync()
        blocks = size // bs
        rand = rw.startswith("rand")
        order = list(range(blocks))
        runtime = job.get("runtime")
        deadline = time.monotonic() + runtime if runtime else None
        time_based = job.get("time_based", False) and deadline is not None
        loops = job.get("loops", 1)
        read_pct = job.get("rwmixread", 100 - job.get("rwmixwrite", 50))
        fsync_every = job.get("fsync", 0) or job.get("fdatasync", 0)
        state = {"i": 0, "writes": 0, "pass": 0}
        written: set[int] = set()

        def next_offset() -> int | None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if state["i"] >= blocks:
                state["pass"] += 1
                if not time_based and state["pass"] >= loops:
                    return None
                state["i"] = 0
            i = state["i"]
            state["i"] += 1
            return (rng.randrange(blocks) if rand else order[i]) * bs

        async def worker() -> None:
            while (off := next_offset()) is not None:
                is_read = reads or (mixed and rng.randrange(100) < read_pct)
                t = time.perf_counter_ns()
                if is_read:
                    data = await f.pread(bs, off)
                    result.read.lat_ns.append(time.perf_counter_ns() - t)
                    result.read.io_bytes += len(data)
                    if verify and not verify_ok(data, off):  # laid out or rewritten with verify blocks
                        result.verify_errors += 1
                else:
                    block = verify_block(off, state["pass"] + 1, bs, data_rng) if verify else pattern_block(bs, data_rng)
                    await f.pwrite(block, off)
                    result.write.lat_ns.append(time.perf_counter_ns() - t)
                    result.write.io_bytes += bs
                    written.add(off)
                    state["writes"] += 1
                    if fsync_every and state["writes"] % fsync_every == 0:
                        t = time.perf_counter_ns()
                        await f.fsync()
                        result.sync.lat_ns.append(time.perf_counter_ns() - t)

        await asyncio.gather(*(worker() for _ in range(max(1, job.get("iodepth", 1)))))
        if job.get("end_fsync") or job.get("fsync_on_close") or verify:
            await f.fsync()
        if verify and job.get("do_verify", True):
            for off in sorted(written):
                if not verify_ok(await f.pread(bs, off), off):
                    result.verify_errors += 1
                    if job.get("verify_fatal"):
                        break
    finally:
        await f.close()
    if result.verify_errors:
        result.error = 84  # fio reports EILSEQ for verify failures


def text_report(results: list[JobResult]) -> list[str]:
    lines = []
    for r in results:
        lines.append(f"{r.name}: (groupid={r.group}, jobs=1): err={r.error:2d}")
        for label, d in (("read", r.read), ("write", r.write)):
            if not d.lat_ns:
                continue
            j = d.as_json(r.runtime_s)
            lines.append(f"  {label}: IOPS={j['iops']:.0f}, BW={human(j['bw_bytes'])}/s "
                         f"({human(d.io_bytes)}/{j['runtime']}msec)")
            pct = j["lat_ns"]["percentile"]
            shown = ", ".join(f"{float(k):.2f}th=[{v // 1000}]" for k, v in pct.items() if float(k) in (50.0, 90.0, 99.0, 99.9))
            lines.append(f"    clat percentiles (usec): {shown}")
        if r.sync.lat_ns:
            lines.append(f"  fsync: {len(r.sync.lat_ns)} calls, p99 {sorted(r.sync.lat_ns)[int(len(r.sync.lat_ns) * .99)] // 1000} usec")
        if r.verify_errors:
            lines.append(f"  verify: {r.verify_errors} bad blocks")
    groups = sorted({r.group for r in results})
    for g in groups:
        rs = [r for r in results if r.group == g]
        lines.append(f"\nRun status group {g} (all jobs):")
        for label in ("read", "write"):
            total = sum(getattr(r, label).io_bytes for r in rs)
            if total:
                t = max(r.runtime_s for r in rs) or 1e-9
                lines.append(f"  {label.upper()}: bw={human(int(total / t))}/s, io={human(total)}, run={int(t * 1000)}msec")
    return lines
