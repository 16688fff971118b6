"""fio jobs against files in the emulated filesystem, measured and reported the way fio does.

A job (times ``numjobs``) works on its files -- ``filename=`` (``:``-separated, shared by
the clones) or ``nrfiles`` files named by ``filename_format`` under ``directory=`` --
through the filesystem's ``pread``/``pwrite``. Relative names resolve against the run's
directory in the image and missing parent directories are created: an image starts empty,
so ``directory=/mnt/ssd`` is made rather than refused. Files a job reads are laid out
first, before the clock starts, as fio does.

Offsets follow fio's rules: sequential patterns walk the region (``rw=write:112k`` leaves
holes, ``rw=read:-8k`` walks backwards); random ones use a random map, so a pass over
``size`` in ``bs`` blocks touches every block once (``norandommap`` drops it, and so does a
non-uniform ``random_distribution``); ``rw=randread:8`` takes 8 sequential I/Os per random
offset. Budgets are fio's: passes (fio's keep_running) of at most ``size`` each, ``loops``
of them and then more while the job has moved less than ``io_size`` (reads, writes and the
verify's reads back), never issuing more than ``io_size`` (default ``size``) times ``loops``;
or ``runtime`` with ``time_based``, or ``number_ios`` times ``loops`` (verify's reads among
them, as fio counts them). ``ramp_time`` runs before measuring (its bytes count
towards ``size``, as in fio); ``startdelay`` waits first.

Engines: the sync family (sync, psync, vsync, pvsync, pvsync2, and mmap, whose mapped
accesses are done as reads and writes of the same ranges) has one I/O in flight,
and fio's note says so when ``iodepth`` asks for more; libaio, io_uring and posixaio keep
``iodepth`` I/Os in flight as asyncio tasks. One I/O in flight (any engine at depth 1) is
awaited in place, as a sync engine's thread does it -- a task and a wait per I/O cost more
than a cached 4 KiB write -- and the clone lets the loop in at least every ``SLICE_NS`` so
that clones run side by side; a zoned file's I/Os stay tasks (others wait on them). fio's
latency clocks: ``slat`` from preparing an I/O to its submission (async engines only),
``clat`` from submission to completion, ``lat`` both. ``ftruncate`` turns each write into
``ftruncate(offset)``.

``verify`` writes blocks (or ``verify_interval`` chunks) that carry a header -- offset,
write sequence number, and the chosen checksum of the rest -- and reads them back after
writing; read jobs check what they read. The first bad block ends the job (err=84), as in
fio whatever ``verify_fatal`` says; with ``continue_on_error=verify`` the job reads on,
counting them, and ``verify_fatal=1`` stops it at the first.

Where fio would use the device: a trim punches a hole (``File.punch_hole``), ``trimwrite``
writes each block right after trimming it; ``fill_device`` sizes the job by the image's free
space and ends at ENOSPC without an error; ``size=N%`` is a share of the files' size, or of
the free space for files not there yet. ``continue_on_error`` goes past the errors of its
types that ``ignore_error`` lists (fio's EIO/EILSEQ by default), counting them.

``zonemode=zbd`` is fio's emulation of a zoned device in a regular file: ``zones.py`` keeps
the zones (shared by every job on a file) and places each I/O -- writes at write pointers,
reads below them, trims as zone resets that leave the data where it is; the file is
extended sparse, never laid out, and I/Os on the same bytes land in the order issued.
"""
from __future__ import annotations

import asyncio
import bisect
import errno
import hashlib
import itertools
import math
import os
import random
import resource
import statistics
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import crc32c
import xxhash

from blockemu.errors import BlockemuError, InvalidArgument, NoSpaceError, NotFoundError
from blockemu.fs.filesystem import File, Filesystem
from blockemu.workload.buffers import Buffers, WorkingSet, repeat
from blockemu.workload.fioledger import FsyncLedger
from blockemu.workload.jobfile import ASYNC_ENGINES, ERROR_KINDS, RW, Job, Share, SteadyState, fixed
from blockemu.workload.lastwrites import LastWrites
from blockemu.workload.stats import stdev
from blockemu.workload.zones import ZonedFile, ZoneRange, region_in_zones

PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99)
READ, WRITE, TRIM = 0, 1, 2
MIXED = ("rw", "readwrite", "randrw")  # the patterns that read and write
DDIR_NAMES = ("read", "write", "trim")
SAMPLE_S = 0.5  # fio's bwavgtime/iopsavgtime default: one bandwidth/IOPS sample every 500 ms
SAMPLE_NS = int(SAMPLE_S * 1e9)
DEPTH_BUCKETS = (1, 2, 4, 8, 16, 32)
LAT_BUCKETS = (2, 4, 10, 20, 50, 100, 250, 500, 750, 1000)
MS_BUCKETS = LAT_BUCKETS + (2000,)
NON_FATAL = frozenset((errno.EIO, errno.EILSEQ))  # what continue_on_error goes past without ignore_error
SLICE_NS = 500_000  # a clone doing its I/Os in place lets the loop in at least this often
SYNC_NOTE = "note: both iodepth >= 1 and synchronous I/O engine are selected, queue depth will be capped at 1"
# fio's warnings about a verify job (fixup_options), given where fio gives them
SHARED_VERIFY_NOTE = "fio: multiple writers may overwrite blocks that belong to other jobs. This can cause " \
                     "verification failures."
TIMED_VERIFY_NOTE = "fio: verification read phase will never start because write phase uses all of runtime"


# --- checksums fio's verify= names ------------------------------------------------------------

def _reflected_table(poly: int) -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC64 = _reflected_table(0xC96C5795D7870F42)  # CRC-64/ECMA-182 (reflected)
_CRC16 = _reflected_table(0xA001)  # CRC-16 as Linux's lib/crc16.c
_CRC7 = [0] * 256
for _i in range(256):  # CRC-7/MMC, as Linux's crc7_be: the crc kept in the top 7 bits of a byte
    _c = _i
    for _ in range(8):
        _c = ((_c << 1) ^ 0x12) & 0xFF if _c & 0x80 else (_c << 1) & 0xFF
    _CRC7[_i] = _c


def _crc_reflected(table: list[int], mask: int, data: bytes, width: int) -> bytes:
    c = mask
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return (c ^ mask).to_bytes(width, "little")


def _crc7(data: bytes) -> bytes:
    c = 0
    for b in data:
        c = _CRC7[c ^ b]
    return bytes([c >> 1])


DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "md5": lambda d: hashlib.md5(d).digest(),
    "sha1": lambda d: hashlib.sha1(d).digest(),
    "sha256": lambda d: hashlib.sha256(d).digest(),
    "sha512": lambda d: hashlib.sha512(d).digest(),
    "sha3-224": lambda d: hashlib.sha3_224(d).digest(),
    "sha3-256": lambda d: hashlib.sha3_256(d).digest(),
    "sha3-384": lambda d: hashlib.sha3_384(d).digest(),
    "sha3-512": lambda d: hashlib.sha3_512(d).digest(),
    "crc32": lambda d: zlib.crc32(d).to_bytes(4, "little"),
    "crc32c": lambda d: crc32c.crc32c(d).to_bytes(4, "little"),
    "crc32c-intel": lambda d: crc32c.crc32c(d).to_bytes(4, "little"),
    "xxhash": lambda d: xxhash.xxh32(d).digest(),
    "crc64": lambda d: _crc_reflected(_CRC64, (1 << 64) - 1, d, 8),
    "crc16": lambda d: _crc_reflected(_CRC16, 0, d, 2),
    "crc7": _crc7,
    "meta": lambda d: b"",  # the header alone: offset and write sequence number
}
HEADER = struct.Struct("<4sQQI")  # magic, offset, numberio, crc32 of the header fields
MAGIC = b"bEvF"


class VerifyFailed(BlockemuError):
    """A block read back is not what was written: fio's err=84."""

    code = errno.EILSEQ


class Verifier:
    """fio's verify blocks: each ``interval`` chunk is a header (its offset and the write's
    sequence number), then the checksum of the data after it, then data -- random bytes or
    ``verify_pattern``. ``verify=pattern`` is the pattern alone, compared byte for byte."""

    def __init__(self, kind: str, pattern: bytes | None, interval: int | None) -> None:
        self.kind, self.pattern, self.interval = kind, pattern, interval
        self.digest = DIGESTS.get(kind)

    def _fill(self, n: int, rng: random.Random) -> bytes:
        if self.pattern:
            return repeat(self.pattern, n)
        return rng.randbytes(n)

    def _chunks(self, length: int) -> range:
        return range(0, length, self.interval or length)

    def make(self, offset: int, numberio: int, length: int, rng: random.Random) -> bytes:
        if self.digest is None:
            return self._fill(length, rng)
        out = bytearray()
        for c in self._chunks(length):
            n = min(self.interval or length, length - c)
            fields = (MAGIC, offset + c, numberio)
            head = HEADER.pack(*fields, zlib.crc32(struct.pack("<4sQQ", *fields)))
            body = self._fill(max(0, n - len(head) - len(self.digest(b""))), rng)
            out += (head + self.digest(body) + body)[:n]
        return bytes(out)

    def check(self, data: bytes, offset: int, numberio: int | None) -> str | None:
        """Why ``data`` read at ``offset`` is not what was written, in fio's words; None if it is."""
        if self.digest is None:
            want = self._fill(len(data), random.Random(0))
            return None if data == want else f"verify: pattern mismatch at offset {offset}"
        dlen = len(self.digest(b""))
        for c in self._chunks(len(data)):
            n = min(self.interval or len(data), len(data) - c)
            chunk = data[c: c + n]
            if n < HEADER.size + dlen:
                continue
            magic, off, nio, hcrc = HEADER.unpack_from(chunk)
            if magic != MAGIC:
                return f"verify: bad magic header {magic.hex()}, wanted {MAGIC.hex()} at offset {offset + c}"
            if zlib.crc32(chunk[: HEADER.size - 4]) != hcrc:
                return f"verify: bad header crc at offset {offset + c}"
            if off != offset + c:
                return f"verify: bad header offset {off}, wanted {offset + c}"
            if numberio is not None and nio != numberio:
                return f"verify: bad header numberio {nio}, wanted {numberio} at offset {offset + c}"
            if self.digest(chunk[HEADER.size + dlen:]) != chunk[HEADER.size: HEADER.size + dlen]:
                return f"verify: {self.kind} checksum mismatch at offset {offset + c}, length {n}"
        return None


# --- statistics, in fio's JSON layout ---------------------------------------------------------

def _lat_json(values: list[int], percentiles: tuple[float, ...] | None) -> dict[str, Any]:
    n = len(values)
    out: dict[str, Any] = {"min": min(values) if n else 0, "max": max(values) if n else 0,
                           "mean": statistics.fmean(values) if n else 0.0,
                           "stddev": stdev(values) if n > 1 else 0.0, "N": n}
    if n and percentiles:
        s = sorted(values)
        out["percentile"] = {f"{p:.6f}": s[min(n - 1, max(0, math.ceil(n * p / 100) - 1))] for p in percentiles}
    return out


def _share(count: int, step: float) -> float:
    """``step`` added ``count`` times, as the report added each I/O's share: the same float,
    where ``count * step`` may differ in the last bit."""
    total = 0.0
    for _ in range(count):
        total += step
    return total


def bins(values: list[int]) -> dict[str, int]:
    """json+'s latency histogram: how many I/Os took each latency (ns; exact, not fio's buckets)."""
    return {str(k): v for k, v in sorted(Counter(values).items())}


def _samples(values: list[float]) -> tuple[float, float, float, float, int]:
    if not values:
        return 0, 0, 0.0, 0.0, 0
    return min(values), max(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, \
        len(values)


@dataclass
class Direction:
    """One direction's measurements: per-I/O latencies in ns, and completions over time."""
    slat: list[int] = field(default_factory=list)
    clat: list[int] = field(default_factory=list)
    lat: list[int] = field(default_factory=list)
    io_bytes: int = 0
    done: list[tuple[int, int]] = field(default_factory=list)  # (ns since measuring began, bytes)
    # the verify phase's read-backs, counted as reads as fio counts them, and its time, which
    # fio adds to the read runtime (update_runtime(td, ..., DDIR_READ) after do_verify)
    verify_ios: int = 0
    verify_bytes: int = 0
    verify_s: float = 0.0

    def add(self, other: "Direction") -> None:
        self.slat += other.slat
        self.clat += other.clat
        self.lat += other.lat
        self.io_bytes += other.io_bytes
        self.done += other.done
        self.verify_ios += other.verify_ios
        self.verify_bytes += other.verify_bytes
        self.verify_s = max(self.verify_s, other.verify_s)

    def runtime(self, job_s: float) -> float:
        """This direction's runtime, as fio's: the job's run if it did I/O this way there, plus
        the verify phase's time for its read-backs."""
        return (job_s if len(self.clat) > self.verify_ios else 0.0) + self.verify_s if self.clat else 0.0

    def windows(self, runtime_s: float) -> tuple[list[float], list[float]]:
        """fio's bandwidth (KiB/s) and IOPS samples: one per full 500 ms of the run."""
        nwin = int(runtime_s / SAMPLE_S)
        byts, ios = [0] * nwin, [0] * nwin
        for t, b in self.done:
            i = max(0, t) // SAMPLE_NS  # (done before a reset of the statistics, reaped after it: the first)
            if i < nwin:
                byts[i] += b
                ios[i] += 1
        return [b / 1024 / SAMPLE_S for b in byts], [n / SAMPLE_S for n in ios]

    def as_json(self, runtime_s: float, opts: "ReportOptions", group_bw: float, plus: bool) -> dict[str, Any]:
        n = len(self.clat)
        runtime = self.runtime(runtime_s)
        out: dict[str, Any] = {
            "io_bytes": self.io_bytes, "io_kbytes": self.io_bytes // 1024,
            "bw_bytes": int(self.io_bytes / runtime) if runtime else 0,
            "bw": int(self.io_bytes / runtime / 1024) if runtime else 0,
            "iops": n / runtime if runtime else 0.0, "runtime": int(runtime * 1000) if n else 0,
            "total_ios": n, "short_ios": 0, "drop_ios": 0,
            "slat_ns": _lat_json(self.slat, opts.percentiles if opts.slat_percentiles else None),
            "clat_ns": _lat_json(self.clat, opts.percentiles if opts.clat_percentiles else None),
            "lat_ns": _lat_json(self.lat, opts.percentiles if opts.lat_percentiles else None),
        }
        if plus and n:
            out["clat_ns"]["bins"] = bins(self.clat)
        bws, iopss = self.windows(runtime)
        bmin, bmax, bmean, bdev, bn = _samples(bws)
        imin, imax, imean, idev, inn = _samples(iopss)
        out.update({"bw_min": int(bmin), "bw_max": int(bmax),
                    "bw_agg": 100.0 * bmean / group_bw if bn and group_bw else 0.0, "bw_mean": bmean,
                    "bw_dev": bdev, "bw_samples": bn, "iops_min": int(imin), "iops_max": int(imax),
                    "iops_mean": imean, "iops_stddev": idev, "iops_samples": inn})
        return out


@dataclass
class ReportOptions:
    percentiles: tuple[float, ...] = PERCENTILES
    clat_percentiles: bool = True
    lat_percentiles: bool = False
    slat_percentiles: bool = False
    precision: int = 2  # decimals of each percentile in the normal output: fio's for its default list

    @classmethod
    def of(cls, job: Job) -> "ReportOptions":
        chosen = job.get("percentile_list")
        return cls(chosen.values if chosen else PERCENTILES, job.get("clat_percentiles", True),
                   job.get("lat_percentiles", False), job.get("slat_percentiles", False),
                   chosen.precision if chosen else 2)


@dataclass
class JobResult:
    """One fio ``jobs[]`` entry: a clone, or a whole group under ``group_reporting``. CPU
    figures are the process's (clones share one process), over the clone's run."""
    name: str
    group: int
    options: dict[str, str] = field(default_factory=dict)
    report: ReportOptions = field(default_factory=ReportOptions)
    jobs: int = 1
    runtime_s: float = 0.0
    dirs: list[Direction] = field(default_factory=lambda: [Direction(), Direction(), Direction()])
    sync: list[int] = field(default_factory=list)
    error: int = 0
    verify_errors: int = 0
    verify_first: str = ""
    usr_s: float = 0.0
    sys_s: float = 0.0
    ctx: int = 0
    majf: int = 0
    minf: int = 0
    depths: Counter = field(default_factory=Counter)
    ios_issued: int = 0
    depth: int = 1  # the iodepth asked for (fio's latency_depth), not what a sync engine keeps
    order: int = 0  # the job's place in the job file: entries are listed in file order
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rate_shortfall: str = ""  # why rate_min/rate_iops_min were not met
    steady: "SteadyWatch | None" = None
    latency: "LatencyTarget | None" = None
    error_text: str = ""  # what the error (err=) was
    continue_on: bool = False  # continue_on_error: total_err and first_error are reported
    total_err: int = 0
    first_error: int = 0
    error_log: list[str] = field(default_factory=list)  # error_dump: each error gone past
    describe: str = ""  # fio's first line for the job: rw, bs, ioengine, iodepth
    description: str = ""  # the job's description=: fio shows it in every output format
    zone_resets: int | None = None  # zonemode=zbd: fio's nr_zone_resets

    @property
    def read(self) -> Direction:
        return self.dirs[READ]

    @property
    def write(self) -> Direction:
        return self.dirs[WRITE]

    def merge(self, other: "JobResult") -> None:
        """group_reporting: the group's clones as one entry, named after the first."""
        for a, b in zip(self.dirs, other.dirs):
            a.add(b)
        self.sync += other.sync
        self.jobs += other.jobs
        self.runtime_s = max(self.runtime_s, other.runtime_s)
        self.verify_errors += other.verify_errors
        self.verify_first = self.verify_first or other.verify_first
        self.error = self.error or other.error
        self.usr_s, self.sys_s = self.usr_s + other.usr_s, self.sys_s + other.sys_s
        self.ctx, self.majf, self.minf = self.ctx + other.ctx, self.majf + other.majf, self.minf + other.minf
        self.depths += other.depths
        self.ios_issued += other.ios_issued
        self.total_err += other.total_err
        self.first_error = self.first_error or other.first_error
        self.error_log += other.error_log
        self.ignored = sorted(set(self.ignored) | set(other.ignored))
        if other.zone_resets is not None:
            self.zone_resets = (self.zone_resets or 0) + other.zone_resets

    def count_error(self, code: int, line: str | None) -> None:
        """An I/O error the job went on past (continue_on_error): counted, and logged unless
        error_dump=0; it becomes the job's err= at the end, as in fio, without failing the run."""
        self.total_err += 1
        self.first_error = self.first_error or code
        if line:
            self.error_log.append(line)

    def fail(self, e: BlockemuError) -> None:
        """fio's err= for the job: the first error's errno, and its text for our report."""
        if not self.error:
            self.error, self.error_text = e.errno or errno.EIO, str(e)

    def cpu(self) -> tuple[float, float]:
        rt = self.runtime_s or 1e-9
        return 100.0 * self.usr_s / rt, 100.0 * self.sys_s / rt

    def depth_levels(self) -> dict[str, float]:
        total = sum(self.depths.values()) or 1
        out, prev = {}, 0
        for b in DEPTH_BUCKETS:
            out[str(b)] = 100.0 * sum(v for k, v in self.depths.items() if prev < k <= b) / total
            prev = b
        out[">=64"] = 100.0 * sum(v for k, v in self.depths.items() if k > 32) / total
        if not self.depths:
            out = {k: 0.0 for k in out}
        return out

    def lat_buckets(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """fio's latency_ns/us/ms: the share of I/Os whose total latency falls in each bucket."""
        lats = sorted(v for d in self.dirs for v in d.lat)  # each bucket's I/Os: one bisect, not a scan per I/O
        step = 100.0 / (len(lats) or 1)
        ns = {str(b): 0.0 for b in LAT_BUCKETS}
        us = {str(b): 0.0 for b in LAT_BUCKETS}
        ms: dict[str, float] = {str(b): 0.0 for b in MS_BUCKETS}
        lo = 0
        for unit, scale, buckets in ((ns, 1, LAT_BUCKETS), (us, 1000, LAT_BUCKETS), (ms, 1_000_000, MS_BUCKETS)):
            for b in buckets:  # a latency goes to the first unit it is under 1000 of, then its bucket
                top = b * scale if unit is ms else min(b * scale, 1000 * scale - 1)  # (latencies are whole ns)
                hi = bisect.bisect_right(lats, top, lo)
                unit[str(b)] = _share(hi - lo, step)
                lo = hi
        ms[">=2000"] = _share(len(lats) - lo, step)
        return ns, us, ms

    def as_json(self, group_bw: list[float], plus: bool = False) -> dict[str, Any]:
        usr, sys_ = self.cpu()
        ns, us, ms = self.lat_buckets()
        one = {"0": 0.0, "4": 100.0 if self.ios_issued else 0.0, "8": 0.0, "16": 0.0, "32": 0.0, "64": 0.0,
               ">=64": 0.0}
        out: dict[str, Any] = {
            "jobname": self.name, "groupid": self.group, "error": self.error, "eta": 0,
            "elapsed": int(round(self.runtime_s)), "job options": self.options,
            **{name: d.as_json(self.runtime_s, self.report, group_bw[i], plus) for i, (name, d) in
               enumerate(zip(DDIR_NAMES, self.dirs))},
            "sync": {"total_ios": len(self.sync), "lat_ns": _lat_json(self.sync, self.report.percentiles)},
            "job_runtime": int(self.runtime_s * 1000), "usr_cpu": usr, "sys_cpu": sys_, "ctx": self.ctx,
            "majf": self.majf, "minf": self.minf, "iodepth_level": self.depth_levels(),
            "iodepth_submit": one, "iodepth_complete": dict(one),
            "latency_ns": ns, "latency_us": us, "latency_ms": ms,
            "latency_depth": self.latency.qd if self.latency else self.depth,
            "latency_target": self.latency.target_ns if self.latency else 0,
            "latency_percentile": self.latency.percentile if self.latency else 100.0,
            "latency_window": self.latency.window_us if self.latency else 0,
            **({"total_err": self.total_err, "first_error": self.first_error} if self.continue_on else {}),
            **({"desc": self.description} if self.description else {}),
        }
        if self.steady is not None:
            out["steadystate"] = self.steady.as_json()
        if plus and self.sync:
            out["sync"]["lat_ns"]["bins"] = bins(self.sync)
        ours = {"error": self.error_text, "verify_errors": self.verify_errors,
                "first_verify_error": self.verify_first, "rate_shortfall": self.rate_shortfall,
                "errors": self.error_log, "zone_resets": self.zone_resets}
        if any(ours.values()):
            out["blockemu"] = {k: v for k, v in ours.items() if v}
        return out


def group_results(results: list[JobResult], group_reporting: set[int]) -> list[JobResult]:
    """One entry per clone, except groups with ``group_reporting``: one entry for the group."""
    out: list[JobResult] = []
    merged: dict[int, JobResult] = {}
    for r in results:
        if r.group in group_reporting:
            if r.group in merged:
                merged[r.group].merge(r)
                continue
            merged[r.group] = r
        out.append(r)
    return out


def group_bandwidth(results: list[JobResult]) -> dict[int, list[float]]:
    """Each group's aggregate bandwidth per direction in KiB/s (fio's bw_agg is a share of it)."""
    out: dict[int, list[float]] = {}
    for r in results:
        g = out.setdefault(r.group, [0.0, 0.0, 0.0])
        for i, d in enumerate(r.dirs):
            if d.runtime(r.runtime_s) and d.io_bytes:
                g[i] += d.io_bytes / d.runtime(r.runtime_s) / 1024
    return out


# --- running a job ----------------------------------------------------------------------------

class LayoutGate:
    """fio lays out every job's files before any job starts: a job's I/O must not slow the
    layout of another (whose runtime would then be spent before it began). The jobs that
    start together each pass, whether their layout worked or not (a job that failed before
    its layout, or was stopped, passes when it ends)."""

    def __init__(self, jobs: int) -> None:
        self.left = jobs
        self.seen: set[str] = set()
        self.open = asyncio.Event()
        if jobs <= 0:
            self.open.set()

    def arrived(self, job: str) -> None:
        if job in self.seen:
            return
        self.seen.add(job)
        self.left -= 1
        if self.left <= 0:
            self.open.set()


@dataclass
class RunContext:
    """What every job of a run shares: the filesystem, the run's directory in the image (where
    relative names resolve), the run's stop (SIGINT/SIGTERM, or ``exitall`` with
    ``exit_what=all``) and this job's halt (``exitall`` in its group or stonewalled set)."""
    fs: Filesystem
    directory: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    halt: asyncio.Event = field(default_factory=asyncio.Event)
    flows: dict[int, list[int]] = field(default_factory=dict)  # flow_id -> [I/Os issued, total weight]
    dedupe: dict[int, WorkingSet] = field(default_factory=dict)  # dedupe_global's working set (key 0)
    gate: LayoutGate = field(default_factory=lambda: LayoutGate(0))  # the jobs that start with this one
    zoned: dict[str, ZonedFile] = field(default_factory=dict)  # zonemode=zbd: each file's zones, run-wide
    inflight: dict[str, list["InFlight"]] = field(default_factory=dict)  # zoned files' I/Os in flight
    ledger: FsyncLedger | None = None  # what the jobs' fsyncs made durable, while the run plans a power cut

    def ordered(self, io: "IO") -> tuple[asyncio.Task, ...]:
        """The I/Os in flight on ``io``'s bytes that it must follow (a write, or a read after a
        write): a zone reset lets a write land where an older one is still on its way, and data
        must land in the order the write pointer handed it out, as fio's zone locks keep it."""
        end = io.offset + io.length
        return tuple(f.task for f in self.inflight.get(io.region.path, ())
                     if f.offset < end and io.offset < f.end and WRITE in (io.ddir, f.ddir))

    def issued(self, io: "IO", task: asyncio.Task) -> None:
        """``io`` is in flight as ``task`` until it completes."""
        entries = self.inflight.setdefault(io.region.path, [])
        entry = InFlight(io.offset, io.offset + io.length, io.ddir, task)
        entries.append(entry)
        task.add_done_callback(lambda _: entries.remove(entry))

    @property
    def stopped(self) -> bool:
        return self.stop.is_set() or self.halt.is_set()

    async def laid_out(self, job: str) -> None:
        """This job's files are laid out: wait for the others that start with it (or a stop)."""
        self.gate.arrived(job)
        await self.nap(math.inf, self.gate.open)

    async def nap(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Wait, unless the job is stopped first (or ``until`` is set)."""
        if seconds <= 0 or self.stopped:
            return
        waits = [asyncio.ensure_future(e.wait()) for e in (self.stop, self.halt, until) if e is not None]
        try:
            await asyncio.wait(waits, timeout=None if math.isinf(seconds) else seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _join(base: str, name: str) -> str:
    return name if name.startswith("/") else f"{base.rstrip('/')}/{name}"


def job_files(job: Job, base: str, clone: int) -> list[str]:
    """The paths a clone works on, as fio names them."""
    if job.get("filename"):
        names = [n for n in job.get("filename").split(":") if n]
    else:
        fmt = job.get("filename_format", "$jobname.$jobnum.$filenum")
        names = [fmt.replace("$jobname", job.name).replace("$jobnum", str(clone)).replace("$filenum", str(i))
                 .replace("$clientuid", "0") for i in range(max(1, job.get("nrfiles", 1)))]
    dirs = [_join(base, d) for d in job.get("directory", "").split(":") if d] or [base]
    return [_join(dirs[i % len(dirs)], n) for i, n in enumerate(names)]


async def makedirs(fs: Filesystem, path: str) -> None:
    """``mkdir -p`` of ``path``'s parent: fio creates the directories a filename names."""
    parts = [p for p in path.split("/")[:-1] if p]
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if not await fs.exists(d):
            await fs.mkdir(d)


@dataclass
class InFlight:
    offset: int
    end: int
    ddir: int
    task: asyncio.Task


class Sizes:
    """A direction's block sizes: ``bs``, ``bsrange`` or ``bssplit``, as fio picks them."""

    def __init__(self, job: Job, ddir: int) -> None:
        self.split = (job.get("bssplit") or (None,) * 3)[ddir]
        rng = (job.get("bsrange") or (None,) * 3)[ddir]
        bs = (job.get("bs") or (None,) * 3)[ddir] or 4096
        self.lo, self.hi = rng if rng else (bs, bs)
        if self.split:
            self.lo, self.hi = min(b for b, _ in self.split), max(b for b, _ in self.split)
            self.cum = [sum(p for _, p in self.split[: i + 1]) for i in range(len(self.split))]
        self.unaligned = job.get("bs_unaligned", False)

    def pick(self, rng: random.Random) -> int:
        if self.split:
            return self.split[min(len(self.split) - 1, bisect.bisect_left(self.cum, rng.random() * self.cum[-1]))][0]
        if self.lo == self.hi:
            return self.lo
        if self.unaligned:
            return rng.randint(self.lo, self.hi)
        return self.lo * rng.randint(1, self.hi // self.lo)


class Region:
    """One file's I/O region and where the next offset comes from: sequential positions per
    direction, or a random map (a shuffled pass over the blocks, each used once)."""

    def __init__(self, path: str, start: int, length: int, unit: int, index: int = 0) -> None:
        self.path, self.start, self.length, self.unit = path, start, length, unit
        self.index = index  # its place among the clone's regions: the key of what was written in it
        self.blocks = max(1, length // unit)
        self.next_pos = [0, 0, 0]
        self.used = bytearray()  # the random map, made on first use (never, without one)
        self.order: list[int] = []
        self.cursors: dict[int, int] = {}  # run length -> where in ``order`` the search for one resumes
        self.run_left = 0  # sequential I/Os left before the next random offset (rw=randread:N)
        self.last = 0  # the last I/O's position (rw_sequencer=identical repeats it)
        self.zone = self.zone_bytes = 0  # zonemode=strided, zbd's zoneskip: where the zone starts, what it has had
        self.zipf: list[float] | None = None
        self.file: File | None = None
        self.zoned: ZoneRange | None = None  # zonemode=zbd: this region's view of its file's zones

    def sequential(self, ddir: int, length: int, add: int) -> tuple[int, int]:
        pos = self.next_pos[ddir]
        if pos < 0 or pos >= self.length:
            pos = 0 if add >= 0 else max(0, self.length - length)
        length = min(length, self.length - pos)
        self.next_pos[ddir] = pos + length + add
        return pos, length

    def random_block(self, rng: random.Random, dist: tuple[str, Any]) -> int:
        kind, arg = dist
        if kind == "random":
            return rng.randrange(self.blocks)
        if kind in ("zoned", "zoned_abs"):  # pick a zone by its share of accesses, then a block in it
            edges, acc = [], 0.0
            for _, extent in arg:
                acc += extent * self.blocks / 100 if kind == "zoned" else extent / self.unit
                edges.append(min(self.blocks, int(acc)))
            z = bisect.bisect_left(list(itertools.accumulate(p for p, _ in arg)), rng.random() * 100)
            z = min(z, len(arg) - 1)
            lo, hi = (edges[z - 1] if z else 0), max(edges[z], (edges[z - 1] if z else 0) + 1)
            return min(self.blocks - 1, rng.randrange(lo, hi))
        if kind == "normal":
            x = rng.gauss(0.5, arg / 100 / 2)
            return min(self.blocks - 1, max(0, int(x * self.blocks)))
        if kind == "pareto":  # fio's lib/zipf.c: rank = (n - 1) * u ^ (log(h) / log(1 - h))
            rank = int((self.blocks - 1) * rng.random() ** (math.log(arg) / math.log(1 - arg)))
        else:  # zipf: ranks weighted 1/k^theta (over at most 4096 rank buckets, uniform inside one)
            if self.zipf is None:
                nb = min(self.blocks, 4096)
                acc, cum = 0.0, []
                for k in range(1, nb + 1):
                    acc += 1 / k ** arg
                    cum.append(acc)
                self.zipf = cum
            b = bisect.bisect_left(self.zipf, rng.random() * self.zipf[-1])
            per = self.blocks / len(self.zipf)
            rank = int(b * per + rng.random() * per)
        # scattered over the region, as fio hashes ranks, so hot blocks are not all adjacent
        return (min(rank, self.blocks - 1) * 2654435761) % self.blocks if math.gcd(2654435761, self.blocks) == 1 \
            else min(rank, self.blocks - 1)

    def mapped_block(self, rng: random.Random, run: int = 1) -> int | None:
        """The next block of this pass that starts ``run`` unused blocks (a direction's smallest
        I/O), or None when none is left. A block passed over never starts such a run again this
        pass (blocks only get used), so each run length's search resumes where it stopped."""
        if not self.order:
            self.used = self.used or bytearray(self.blocks)
            self.order = list(range(self.blocks))
            rng.shuffle(self.order)
            self.cursors = {}
        i, order, used, end = self.cursors.get(run, 0), self.order, self.used, len(self.order)
        if run == 1:  # the common case, kept to one look per block
            while i < end and used[order[i]]:
                i += 1
        else:
            while i < end and (order[i] + run > self.blocks or any(used[order[i]: order[i] + run])):
                i += 1
        self.cursors[run] = i
        return order[i] if i < end else None

    def new_pass(self) -> None:
        self.used = bytearray()
        self.order = []

    def take(self, block: int, length: int, least: int = 1) -> int:
        """Mark ``length`` bytes from ``block`` used, stopping at a used block; the length taken.
        Cut short, it is whole ``least``s (the direction's smallest block size, as fio's
        mark_random_map cuts in its min_bs; mapped_block found that much free)."""
        self.used = self.used or bytearray(self.blocks)
        if length <= self.unit:  # one block, which mapped_block found free: the common case
            self.used[block] = 1
            return min(length, self.length - block * self.unit)
        n = 0
        while n * self.unit < length and block + n < self.blocks and (n == 0 or not self.used[block + n]):
            n += 1
        taken = min(length, n * self.unit, self.length - block * self.unit)
        if taken < length:
            taken = max(taken - taken % least, min(least, taken))
        n = min(-(-taken // self.unit), self.blocks - block)
        self.used[block: block + n] = bytes([1]) * n
        return taken


class LatencyTarget:
    """fio's latency_target mode: over each latency_window, did latency_percentile of the I/Os
    finish within latency_target? Yes: try a deeper queue (doubling, then bisecting up to
    iodepth); no: bisect down. When the depth stops changing, one more window is run with
    fresh statistics (the results at that depth), and then the job ends -- or, with
    latency_run, keeps adjusting."""

    def __init__(self, job: Job, iodepth: int) -> None:
        self.target_ns = int(job.get("latency_target") * 1e9)
        self.window_us = int(job.get("latency_window", 0) * 1e6)
        self.percentile = float(job.get("latency_percentile", 100.0))
        self.run_on = job.get("latency_run", False)
        self.iodepth = iodepth
        self.qd, self.low, self.high = 1, 1, iodepth
        self.window_from = 0.0
        self.ios = self.late = 0
        self.final = self.done = False

    def start(self, now: float) -> None:
        self.window_from, self.ios, self.late = now, 0, 0

    def complete(self, now: float, lat_ns: int) -> bool:
        """Count one I/O; True when a new measuring period begins (the final window)."""
        self.ios += 1
        self.late += lat_ns > self.target_ns
        if now - self.window_from < self.window_us / 1e6 or not self.ios:
            return False
        met = 100.0 * (self.ios - self.late) / self.ios >= self.percentile
        before = self.qd
        fresh = False
        if met:
            self.low = self.qd
            self.qd = min(self.iodepth, (self.qd + self.high) // 2 if self.high != self.iodepth else self.qd * 2)
            if self.qd == before and not self.run_on:
                self.done, fresh = self.final, not self.final
                self.final = True
        else:
            self.high = self.qd
            if self.high == self.low:
                self.low = max(1, self.low - 1)
            self.qd = max(1, (self.qd + self.low) // 2)
        self.start(now)
        return fresh


class SteadyWatch:
    """fio's steady-state detection: once a second after ``ss_ramp``, the last second's IOPS
    and bandwidth join a rolling window of ``ss_dur`` seconds; when the window meets the
    criterion the job ends."""

    def __init__(self, crit: SteadyState, duration: float, ramp: float) -> None:
        self.crit, self.n, self.ramp = crit, max(1, int(duration)), ramp
        self.iops: list[float] = []
        self.bw: list[float] = []
        self.collect_from = self.next_tick = 0.0
        self.last: tuple[int, int] | None = None  # the counts when the current second began
        self.attained = False
        self.deviation = self.slope = self.measure = 0.0

    def start(self, measuring_from: float) -> None:
        self.collect_from = measuring_from + self.ramp
        self.next_tick = self.collect_from + 1.0

    def tick(self, now: float, ios: int, nbytes: int) -> bool:
        """Take the samples whose seconds are over; True once steady state is attained."""
        if self.last is None:
            if now < self.collect_from:
                return False
            self.last = (ios, nbytes)
        while now >= self.next_tick and not self.attained:
            self.iops.append(ios - self.last[0])
            self.bw.append(nbytes - self.last[1])
            self.last = (ios, nbytes)
            self.next_tick += 1.0
            self.iops, self.bw = self.iops[-self.n:], self.bw[-self.n:]
            if len(self.iops) == self.n:
                self.attained = self._judge()
        return self.attained

    def _judge(self) -> bool:
        data = self.iops if self.crit.metric == "iops" else self.bw
        mean = statistics.fmean(data)
        xs = range(len(data))
        xm = statistics.fmean(xs)
        var = sum((x - xm) ** 2 for x in xs)
        self.slope = sum((x - xm) * (y - mean) for x, y in zip(xs, data)) / var if var else 0.0
        self.deviation = max(abs(y - mean) for y in data)
        value = abs(self.slope) if self.crit.slope else self.deviation
        self.measure = 100 * value / mean if self.crit.percent and mean else value
        return self.measure <= self.crit.limit

    def as_json(self) -> dict[str, Any]:
        return {"ss": str(self.crit), "duration": self.n, "attained": int(self.attained),
                "criterion": f"{self.measure:.6f}%" if self.crit.percent else f"{self.measure:.6f}",
                "max_deviation": self.deviation, "slope": self.slope,
                "data": {"bw_mean": int(statistics.fmean(self.bw)) if self.bw else 0,
                         "iops_mean": int(statistics.fmean(self.iops)) if self.iops else 0,
                         "iops": [int(v) for v in self.iops], "bw": [int(v) for v in self.bw]}}


@dataclass(slots=True)
class IO:
    region: Region
    ddir: int
    offset: int  # within the file
    length: int
    numberio: int
    after: tuple[asyncio.Task, ...] = ()  # what it must follow: trimwrite's trim, a zoned file's I/Os on its bytes


class Clone:
    """One of a job's ``numjobs`` workers: its files, its offsets, its measurements."""

    def __init__(self, ctx: RunContext, job: Job, n: int, seed: int, result: JobResult) -> None:
        self.ctx, self.job, self.n, self.result = ctx, job, n, result
        self.rw: RW = job.get("rw", RW("read"))
        self.engine = job.get("ioengine", "psync")
        self.depth = max(1, job.get("iodepth", 1)) if self.engine in ASYNC_ENGINES else 1
        self.latency = LatencyTarget(job, self.depth) if job.get("latency_target") else None
        result.latency = self.latency
        self.think = job.get("thinktime", 0.0)
        self.think_every = max(1, job.get("thinktime_blocks", 1))
        if self.think:  # fio: thinking after every N blocks caps the queue depth at N
            self.depth = min(self.depth, self.think_every)
        self.sizes = [Sizes(job, d) for d in (READ, WRITE, TRIM)]
        self.flow = abs(job.get("flow", 0))  # fio's weight (the sign of old job files means nothing now)
        self.flow_count = 0
        if self.flow:
            ctx.flows.setdefault(job.get("flow_id", 0), [0, 0])[1] += self.flow
        self.rng = random.Random(job.get("randseed", seed) + n)
        self.data_rng = random.Random(self.rng.random())
        self.paths = job_files(job, ctx.directory, n)
        self.offset = fixed(job.get("offset")) + job.get("offset_increment", 0) * n
        # fio's ba per direction; an empty field (``ba=,64k``) is that direction's block size, as unset
        self.unit = min(s.lo if a is None else a for a, s in zip(job.get("ba") or (None,) * 3, self.sizes))
        self.dist = job.get("random_distribution", ("random", 0.0))
        self.randommap = self.rw.random and not job.get("norandommap") and self.dist[0] == "random"
        # a mixed job draws each I/O's direction; any other does one kind, and draws nothing for
        # it (fio's get_rw_ddir): the random numbers go to its offsets alone
        self.mixed = self.rw.pattern in MIXED
        self.regions: list[Region] = []
        self.budget = self.loop_bytes = self.plan = self.pass_end = 0
        self.fill = job.get("fill_device", False)  # writes until ENOSPC: sized at layout, by the free space
        size = job.get("size")
        if (fixed(size) or job.get("filesize")) and not self.fill and not isinstance(job.get("offset"), Share):
            total = fixed(size) or job.get("filesize") * len(self.paths)
            self._size_regions([job.get("filesize") or total // len(self.paths)] * len(self.paths))
        # fio's exceeds_number_ios: number_ios times loops, the job's whole run, verify reads in it
        self.number_ios = job.get("number_ios", 0) * max(1, job.get("loops", 1))
        zsize = job.get("zonesize")
        self.zones = (zsize, job.get("zonerange") or zsize, job.get("zoneskip", 0)) \
            if job.get("zonemode", "none") == "strided" and zsize else None
        self.zbd = job.get("zonemode") == "zbd"
        self.zbd_skip = 0 if self.rw.random else job.get("zoneskip", 0)  # zbd's zoneskip: sequential jobs only
        self.pass_ios = 0  # I/Os since the regions' pass began (a zoned pass with none ends the job)
        vkind = job.get("verify", "0")
        if job.get("verify_pattern") and vkind in ("0", "null"):
            vkind = "pattern"
        self.verifier = Verifier(vkind, job.get("verify_pattern"), job.get("verify_interval")) \
            if vkind not in ("0", "null") else None
        mix = job.get("rwmixread", 100 - job.get("rwmixwrite", 50))
        self.read_pct = mix if self.mixed else 100 if self.rw.pattern in ("read", "randread") else 0
        # the one direction of a job that is not mixed (None: drawn per I/O). rw=trim/randtrim
        # trim; trimwrite/randtrimwrite trim a block, then write that block
        self.ddir = None if self.mixed else TRIM if "trim" in self.rw.pattern else READ if self.read_pct else WRITE
        self.then_write: IO | None = None  # trimwrite: the trim just issued, whose block is written next
        self.trim_task: asyncio.Task | None = None  # ... and its I/O, which that write waits for
        self.continue_on: frozenset[str] = job.get("continue_on_error", frozenset())
        self.ignore = job.get("ignore_error") or (None, None, None)
        result.continue_on = bool(self.continue_on)
        self.trimmed: dict[tuple[int, int], int] = {}  # trim_percentage: (region, offset) -> length
        self.trim_due: list[tuple[int, int]] = []  # written since the last trim_backlog batch
        self.filled = False  # fill_device: a write met ENOSPC
        self.rate = job.get("rate") or (0, 0, 0)
        self.rate_iops = job.get("rate_iops") or (0, 0, 0)
        self.paced = any(self.rate) or any(self.rate_iops)
        self.fsync_every = job.get("fsync", 0) or job.get("fdatasync", 0)
        self.sync_writes = job.get("sync", "0") not in ("0", "none")
        # what every I/O's accounting asks, settled once: the job's options do not change
        self.timed = bool(job.get("time_based") and job.get("runtime"))
        self.slat = self.engine in ASYNC_ENGINES  # fio has no submission latency for a sync engine
        self.max_latency = job.get("max_latency") or (0, 0, 0)
        self.remember = self.verifier is not None or bool(job.get("trim_backlog"))  # who reads self.written
        # fio verifies each loop's writes before the next loop starts (thread_main: do_verify once
        # per keep_running pass), so with loops=N a verifying job stops at each loop's end
        self.loop_verify = self.verifier is not None and job.get("do_verify", True) and self.writer and not self.timed
        self.passes = 0  # passes done (fio's keep_running calls that went on), while each is verified
        self.verify_backlog = job.get("verify_backlog", 0) if self.verifier is not None else 0
        self.trim_backlog = job.get("trim_backlog", 0)
        self.buffers: Buffers | None = None  # made at layout, once the region's size is known
        self.written = LastWrites()  # (region, offset) -> (length, numberio): what verify reads back
        self.backlog: list[tuple[int, int]] = []  # written since the last verify_backlog check
        self.issued = [0, 0, 0]  # bytes this measuring period, per direction (for rate=)
        self.issued_ios = [0, 0, 0]
        self.arrival = [0.0, 0.0, 0.0]  # rate_process=poisson: the next arrival, per direction
        self.bytes_done = self.ios = self.numberio = self.completed = self.completed_bytes = 0
        self.writes_issued, self.last_was_sync = 0, False  # what fio's fsync=N decides by
        ss = job.get("steadystate")
        self.steady = SteadyWatch(ss, job.get("steadystate_duration", 0), job.get("steadystate_ramp_time", 0)) \
            if ss is not None and job.get("steadystate_duration") else None
        result.steady = self.steady
        self.file_turn = 0
        self.file_service = job.get("file_service_type", "roundrobin")
        self.measure_from = self.deadline = 0.0
        self.measure_ns = 0  # measure_from on the I/Os' own clock (perf_counter_ns), which dates their completions
        self.ramp_end: float | None = None

    def _size_regions(self, sizes: list[int]) -> None:
        self.regions = [Region(p, self.offset, n - n % self.unit, self.unit, i)
                        for i, (p, n) in enumerate(zip(self.paths, sizes))]
        self._budget()

    def _budget(self) -> None:
        """fio's limits on a sized job: ``budget`` the bytes it may issue in all (io_bytes_exceeded
        on io_issue_bytes), ``pass_bytes`` those of one pass (do_io's total_bytes: ``size``, or
        ``io_size`` for a random write without a map, where ``size`` does not apply), ``plan``
        the bytes a job without a read-back between passes issues (its passes move no other)."""
        total = sum(r.length for r in self.regions)
        io_size = self.job.get("io_size")
        self.io_limit = io_size.of(total, self.unit) if isinstance(io_size, Share) else io_size or 0  # of size
        self.loop_bytes = self.io_limit or total
        self.loops = max(1, self.job.get("loops", 1))
        self.budget = self.loop_bytes * self.loops
        self.max_bs = max(s.hi for s in self.sizes)
        self.pass_bytes = max(total, self.io_limit) if self.writer and self.rw.random and not self.randommap \
            else total
        self.pass_end = min(self.budget, self.pass_bytes)
        done = passes = 0
        while done < self.budget and self._another_pass(passes, done):
            done, passes = done + min(self.pass_bytes, self.budget - done), passes + 1
        self.plan = done

    def _another_pass(self, passes: int, moved: int) -> bool:
        """fio's keep_running after ``passes`` passes that moved ``moved`` bytes (reads and
        writes, the verify's reads back among them): ``loops`` passes, then more while
        ``io_size`` is not reached by a whole block. (Without ``io_size`` fio goes on only for a
        pass that fell short of ``size`` with its files not done: none here, a pass ends at ``size``.)"""
        return passes < self.loops or self.io_limit - moved >= self.max_bs

    @property
    def reads(self) -> bool:
        return self.read_pct > 0

    @property
    def writer(self) -> bool:
        """fio's td_write: the pattern writes (trimwrite too; a plain trim does not)."""
        return "write" in self.rw.pattern or self.mixed

    async def _zone(self, region: Region) -> None:
        """zonemode=zbd: the file is an emulated zoned device. The first job to open it makes its
        zones (sized by the file, extended sparse to the job's end: nothing is laid out, every
        zone starts empty); each job's region is then cut to whole zones, as fio says it does."""
        job, f = self.job, region.file
        assert f is not None
        zf = self.ctx.zoned.get(region.path)
        if zf is None:
            need = region.start + region.length
            if f.inode.size < need:
                await f.truncate(need)
            zf = ZonedFile(f.inode.size, job.get("zonesize"), job.get("zonecapacity", 0),
                           job.get("max_open_zones", 0))
            self.ctx.zoned[region.path] = zf
        elif zf.zone_size != job.get("zonesize"):
            raise InvalidArgument(f"{region.path}: job parameter zonesize {job.get('zonesize')} does not match disk "
                                  f"zone size {zf.zone_size}")
        elif job.get("max_open_zones", 0) and job.get("max_open_zones") != zf.max_open:
            raise InvalidArgument(f"{region.path}: Different 'max_open_zones' values")
        if job.get("job_max_open_zones") and not zf.max_open:
            raise InvalidArgument(f"{region.path}: 'job_max_open_zones' cannot be used without a global open zones "
                                  f"limit")
        end = min(region.start + region.length, len(zf.zones) * zf.zone_size)
        if end <= region.start:
            raise InvalidArgument(f"{region.path}: offset {region.start} is past the end of its {len(zf.zones)} zones")
        start, length, notes = region_in_zones(zf.zone_size, len(zf.zones), region.start, end - region.start,
                                               self.rw.pattern == "read", region.path)
        region.start, region.length, region.blocks = start, length, max(1, length // region.unit)
        self.result.notes = self.result.notes + [n for n in notes if n not in self.result.notes]
        region.zoned = ZoneRange(zf, start, length, tuple(s.lo for s in self.sizes), self.rw.random,
                                 self.verifier is not None, job.get("read_beyond_wp", False),
                                 job.get("job_max_open_zones", 0), job.get("zone_reset_threshold", 0.0),
                                 job.get("zone_reset_frequency", 0.0))
        self._budget()

    async def layout(self) -> None:
        """Create the files (and their directories); fill what a read will need. Not timed.
        Without size=, the files' own sizes are the job's, as fio takes them."""
        fs = self.ctx.fs
        if self.fill:  # fio: "size to something really large", ENOSPC ends it
            have = sum([(await fs.stat(p)).st_size for p in self.paths if await fs.exists(p)])
            self._size_regions([(fs.space()[1] + have) // len(self.paths)] * len(self.paths))
        elif isinstance(self.job.get("size"), Share) or isinstance(self.job.get("offset"), Share):
            await self._size_shares()
        if not self.regions:
            missing = [p for p in self.paths if not await fs.exists(p)]
            if missing:
                raise InvalidArgument(f"job {self.job.name}: size= is needed ({missing[0]} does not exist to take "
                                      f"it from); give it in the job file or with --size")
            self._size_regions([(await fs.stat(p)).st_size - self.offset for p in self.paths])
            if not any(r.length for r in self.regions):
                raise InvalidArgument(f"job {self.job.name}: size= is needed (its files are empty)")
        for region in self.regions:
            exists = await fs.exists(region.path)
            if not exists and not self.job.get("allow_file_create", True):
                raise NotFoundError(f"job {self.job.name}: {region.path} does not exist and allow_file_create=0")
            await makedirs(fs, region.path)
            region.file = await fs.open(region.path, "r+" if exists else "w+")
            if self.ctx.ledger is not None:
                region.file = self.ctx.ledger.wrap(region.path, region.file, self.job.name)
            if self.zbd:
                await self._zone(region)
                continue
            need = region.start + region.length
            have = region.file.inode.size
            laid = self.reads or self.job.get("overwrite") or self.rw.pattern in ("trim", "randtrim")
            if self.engine != "ftruncate" and laid and have < need:
                chunk = max(self.sizes[READ].hi, self.sizes[WRITE].hi) if self.verifier else 1 << 20
                pos = have - have % chunk if self.verifier else have
                try:
                    while pos < need and not self.ctx.stopped:  # SIGINT/SIGTERM stop a layout too, as fio's
                        n = min(chunk, need - pos)
                        data = self.verifier.make(pos, 0, n, self.data_rng) if self.verifier \
                            else self.data_rng.randbytes(n)
                        await region.file.pwrite(data, pos)
                        pos += n
                except NoSpaceError:  # fill_device with reads: "the mount point will be filled first"
                    if not self.fill:
                        raise
                    region.length = pos - pos % self.unit - region.start
                    region.blocks = max(1, region.length // region.unit)
                await region.file.fsync()
            if self.job.get("pre_read"):  # into the page cache before the clock starts
                for pos in range(region.start, min(need, region.file.inode.size), 1 << 20):
                    if self.ctx.stopped:
                        break
                    await region.file.pread(min(1 << 20, need - pos), pos)

    async def _size_shares(self) -> None:
        """``size=30%``/``offset=10%``: shares of the files' size when they all exist, of the
        image's free space otherwise (an image starts empty: there is no device size to take)."""
        fs, job = self.ctx.fs, self.job
        if all([await fs.exists(p) for p in self.paths]):
            whole = min([(await fs.stat(p)).st_size for p in self.paths])
        else:
            whole = fs.space()[1] // len(self.paths)
        offset, size = job.get("offset", 0), job.get("size")
        if isinstance(offset, Share):
            self.offset = offset.of(whole, self.unit) + job.get("offset_increment", 0) * self.n
        per = size.of(whole, self.unit) if isinstance(size, Share) else \
            job.get("filesize") or (size // len(self.paths) if size else whole - self.offset)
        self._size_regions([per] * len(self.paths))

    def _buffer(self, io: IO) -> bytes | bytearray:
        if self.verifier is not None:
            return self.verifier.make(io.offset, io.numberio, io.length, self.data_rng)
        if self.buffers is None:
            shared = self.ctx.dedupe.setdefault(0, WorkingSet()) if self.job.get("dedupe_global") else None
            self.buffers = Buffers(self.job, self.data_rng, sum(r.length for r in self.regions), shared)
        return self.buffers.make(io.length, io.offset, io.numberio)

    def _pick_region(self) -> Region:
        kind = self.file_service
        if kind == "random":
            return self.rng.choice(self.regions)
        if kind == "sequential":  # each loop goes through the files in turn, as fio's (write_iolog)
            per = self.loop_bytes // len(self.regions) or 1
            return self.regions[min(len(self.regions) - 1, self.bytes_done % (self.loop_bytes or 1) // per)]
        self.file_turn += 1
        return self.regions[self.file_turn % len(self.regions)]

    def next_io(self) -> IO | None:
        """The next I/O, or None when the job is done: budget, I/O count, runtime or stop."""
        now = time.monotonic()
        if self.ctx.stopped:
            return None
        if self.ramp_end is not None and now >= self.ramp_end:
            self._begin_measuring(now)
        if self.deadline and now >= self.deadline:
            return None
        if self.steady is not None and self.steady.tick(now, self.completed, self.completed_bytes):
            return None  # steady state attained: fio ends the job
        if self.latency is not None and self.latency.done or self.result.error or self.filled:
            return None  # the latency target's depth is found, max_latency was exceeded, or fill_device is full
        if self.then_write is not None:  # trimwrite: the block just trimmed is written now
            io, self.then_write = self.then_write, None
            self.bytes_done += io.length
            self.ios += 1
            self.numberio += 1
            return IO(io.region, WRITE, io.offset, io.length, self.numberio, (self.trim_task,) if self.trim_task else ())
        timed = self.timed
        if not timed and (self.bytes_done >= self._loop_end() or self.number_ios and self.ios >= self.number_ios):
            return None
        region = self._pick_region()
        ddir = self.ddir if self.ddir is not None else READ if self.rng.randrange(100) < self.read_pct else WRITE
        if ddir == READ and region.zoned is not None and self.writer and not region.zoned.readable():
            ddir = WRITE  # fio's zbd_adjust_ddir: a mixed job writes until there is data to read
        length = self.sizes[ddir].pick(self.rng)
        if region.zoned is not None and self.zbd_skip:
            self._zone_skip(region, ddir)
        if region.zoned is not None and not timed and not self.rw.random and region.next_pos[ddir] >= region.length \
                and region.start + region.length >= region.zoned.zf.size:
            return None  # a sequential pass reached the file's end: fio's file is done (a shorter region wraps)
        pos, length = self._offset(region, ddir, length)
        if region.zoned is not None:
            placed = self._place(region, ddir, pos, length)
            if placed is None and timed and self.pass_ios:  # fio: a pass that did I/O is followed by another
                self.pass_ios = 0
                for r in self.regions:
                    r.next_pos = [0, 0, 0]
                    r.new_pass()
                placed = self._place(region, ddir, *self._offset(region, ddir, length))
            if placed is None:
                return None  # no zone to do it in: the job ends
            pos, length = placed
            region.next_pos[ddir] = pos + length
            region.zone_bytes += length
        self.pass_ios += 1
        region.last = pos
        io = IO(region, ddir, region.start + pos, length, self.numberio + 1)
        if ddir == TRIM and "write" in self.rw.pattern:  # fio counts a trimwrite's writes, not its trims
            self.then_write = io
        else:
            self.bytes_done += length
        self.ios += 1
        self.numberio += 1
        return io

    def _offset(self, region: Region, ddir: int, length: int) -> tuple[int, int]:
        """Where in the region the next I/O of ``length`` goes, as the job's pattern says."""
        if self.zones is not None:
            pos, length = self._strided(region, ddir, length)
        elif self.rw.random and region.run_left > 0:  # within rw=randread:N's run
            region.run_left -= 1
            if self.job.get("rw_sequencer") == "identical":  # the same offset again
                pos, length = region.last, min(length, region.length - region.last)
            else:
                pos, length = region.sequential(ddir, length, 0)
                if self.randommap:
                    region.take(pos // region.unit, length)
        elif self.rw.random:
            if self.randommap:
                # never shorter than the direction's smallest block size (bs=4k,64k: a write
                # cut to the free blocks around the reads averaged 18 KiB): a block that does not
                # start that much free is passed over, and with none left the map starts afresh
                least = self.sizes[ddir].lo
                run = min(region.blocks, -(-least // region.unit))
                block = region.mapped_block(self.rng, run)
                if block is None:
                    region.new_pass()
                    block = region.mapped_block(self.rng, run)
                    assert block is not None
                length = region.take(block, length, least)
            else:
                block = region.random_block(self.rng, self.dist)
                length = min(length, region.length - block * region.unit)
            pos = block * region.unit
            region.run_left = max(0, self.rw.modifier - 1)
            region.next_pos[ddir] = pos + length
        else:
            pos, length = region.sequential(ddir, length, self.rw.modifier)
        return pos, length

    def _zone_skip(self, region: Region, ddir: int) -> None:
        """zonemode=zbd's zoneskip (setup_zbd_zone_mode): once a zone's worth has been done, or
        the position has left its zone, or a read has reached the write pointer, the next zone
        is zonesize + zoneskip past the last one's start, wrapping at the region's end."""
        zr = region.zoned
        assert zr is not None
        at = region.start + region.next_pos[ddir]
        zone = zr.zf.zones[min(zr.zf.index(at), len(zr.zf.zones) - 1)]
        if region.zone_bytes >= zr.zf.zone_size or at >= zone.start + zr.zf.zone_size or \
                ddir == READ and not zr.read_beyond_wp and at >= zone.wp:
            region.zone_bytes = 0
            region.zone += zr.zf.zone_size + self.zbd_skip
            if region.zone >= region.length:
                region.zone = 0
            region.next_pos[ddir] = region.zone  # (fio does not count zbd's skipped bytes towards io_size)

    def _place(self, region: Region, ddir: int, pos: int, length: int) -> tuple[int, int] | None:
        """zonemode=zbd: where the zones put an I/O generated at ``pos`` (a write at a write
        pointer, a read below one, a trim at a zone with data), or None if nowhere."""
        zr = region.zoned
        assert zr is not None
        offset = region.start + pos
        if ddir == WRITE:
            if not self.rw.random:
                offset = zr.skip_capacity_gap(offset)
                if offset >= region.start + region.length:
                    offset = region.start
            placed = zr.write(offset, length)
        elif ddir == READ:
            placed = zr.read(offset, length)
        else:
            at = zr.trim(offset)
            placed = None if at is None else (at, length)
        return None if placed is None else (placed[0] - region.start, placed[1])

    def _strided(self, region: Region, ddir: int, length: int) -> tuple[int, int]:
        """zonemode=strided: zonesize bytes inside a zonerange-long zone, then zoneskip bytes
        skipped (counted towards the size, as fio counts them), wrapping at the end of the
        file. Random offsets are uniform inside the zone."""
        zsize, zrange, zskip = self.zones  # type: ignore[misc]
        if not region.zone <= region.next_pos[ddir] < region.zone + zrange:
            region.next_pos[ddir] = region.zone
        end = min(region.length, region.zone + zrange)
        if self.rw.random:
            pos = region.zone + self.rng.randrange(max(1, (end - region.zone) // region.unit)) * region.unit
        else:
            pos = region.next_pos[ddir]
        length = min(length, end - pos)
        region.next_pos[ddir] = pos + length
        region.zone_bytes += length
        if region.zone_bytes >= zsize:  # on to the next zone
            region.zone_bytes = 0
            region.zone += zrange + zskip
            if region.zone >= region.length:
                region.zone = 0
            region.next_pos = [region.zone] * 3
            self.bytes_done += zskip
        return pos, length

    def _begin_measuring(self, now: float) -> None:
        """ramp_time is over: what happened so far does not count, and the runtime starts now.
        The size budget goes on: fio's reset_all_stats leaves io_issue_bytes alone, so a job
        sized by ``size``/``io_size`` does that many bytes in all, the ramp's included (fio 3.33,
        ``rw=write size=1m ramp_time=100ms rate_iops=1000``: 155 writes measured, not 256)."""
        self.ramp_end = None
        self._reset_stats(now)
        runtime = self.job.get("runtime")
        if runtime:
            self.deadline = now + runtime

    def _reset_stats(self, now: float) -> None:
        self.measure_from, self.measure_ns = now, time.perf_counter_ns()
        self.result.dirs = [Direction(), Direction(), Direction()]
        self.result.sync.clear()
        self.result.depths.clear()
        self.result.ios_issued = 0
        self.ios = 0  # (bytes_done, the size budget, is not reset: fio's io_issue_bytes is not)
        self.issued, self.issued_ios, self.arrival = [0, 0, 0], [0, 0, 0], [0.0, 0.0, 0.0]

    async def _flow_gate(self) -> None:
        """flow=: hold this clone while its share of its flow group's I/Os is ahead of its
        share of the group's weight (fio's token-based flow control)."""
        group = self.ctx.flows[self.job.get("flow_id", 0)]
        while group[0] and self.flow_count / group[0] > self.flow / group[1] and not self.ctx.stopped:
            if self.job.get("flow_sleep"):
                await self.ctx.nap(self.job.get("flow_sleep"))
            else:  # fio retries at once; here the others get the loop first
                await asyncio.sleep(0)
        group[0] += 1
        self.flow_count += 1

    async def _pace(self, io: IO) -> None:
        """rate= / rate_iops=: hold the I/O until its share of the period has come."""
        due = 0.0
        if self.rate[io.ddir]:
            due = self.issued[io.ddir] / self.rate[io.ddir]
        if self.rate_iops[io.ddir] and self.job.get("rate_process") == "poisson":
            # arrivals of a Poisson process: exponential gaps with mean 1/IOPS
            self.arrival[io.ddir] += self.rng.expovariate(self.rate_iops[io.ddir])
            due = max(due, self.arrival[io.ddir])
        elif self.rate_iops[io.ddir]:
            due = max(due, self.issued_ios[io.ddir] / self.rate_iops[io.ddir])
        self.issued[io.ddir] += io.length
        self.issued_ios[io.ddir] += 1
        await self.ctx.nap(self.measure_from + due - time.monotonic())

    async def _do(self, io: IO, data: bytes | bytearray | None) -> tuple[int, bytes | None] | BlockemuError:
        """Do one I/O: when it completed and what it read, or the error it met -- returned, not
        raised, so one reaping takes it whether the I/O ran as a task or was awaited in place."""
        f = io.region.file
        assert f is not None
        if io.after:
            await asyncio.wait(io.after)  # their errors, if any, are theirs
        got = None
        try:
            if self.engine == "ftruncate":
                await f.truncate(io.offset)
            elif io.ddir == READ:
                got = await f.pread(io.length, io.offset)
            elif io.ddir == TRIM:  # a file's discard: fallocate(PUNCH_HOLE | KEEP_SIZE); a zone's reset moved
                if io.region.zoned is None:  # its write pointer only (zones.py): the data stays, as in fio
                    await f.punch_hole(io.offset, io.length)
            else:
                await f.pwrite(data, io.offset)
                if self.sync_writes:  # O_SYNC/O_DSYNC: the write returns once it is durable
                    await f.fsync()
        except BlockemuError as e:
            return e
        return time.perf_counter_ns(), got

    def _account(self, io: IO, t_prep: int, t_sub: int, t_done: int) -> int:
        """Count a completed I/O in its direction's figures; its latency."""
        d = self.result.dirs[io.ddir]
        if self.slat:
            d.slat.append(t_sub - t_prep)
        d.clat.append(t_done - t_sub)
        lat = t_done - t_prep
        d.lat.append(lat)
        d.io_bytes += io.length
        d.done.append((t_done - self.measure_ns, io.length))
        return lat

    def _complete(self, io: IO, t_prep: int, t_sub: int, t_done: int, got: bytes | None) -> None:
        lat = self._account(io, t_prep, t_sub, t_done)
        limit = self.max_latency[io.ddir]
        if limit and lat > limit * 1e9 and not self.result.error:
            self.result.error, self.result.error_text = errno.ETIMEDOUT, \
                f"max_latency exceeded: {lat // 1000} usec > {int(limit * 1e6)} usec"
        if self.remember:
            self._remember(io, got)
        if self.latency is not None and self.latency.complete(time.monotonic(), lat):
            self._reset_stats(time.monotonic())  # the final window's figures are the job's

    def _log_piece(self, io: IO) -> None:
        """An I/O is issued: keep what verify reads back later, the last write of each block (a
        trim forgets it). As fio's log_io_piece, at issue, "so we know the specific order of
        it": with iodepth > 1 the I/Os complete in another order, and the verify phase reads
        back in the order written, which is the order issued."""
        if io.ddir == WRITE:
            self.written.record(io.region.index, io.offset, io.length, io.numberio)
        elif io.ddir == TRIM:
            self.written.forget(io.region.index, io.offset, io.length)

    def _remember(self, io: IO, got: bytes | None) -> None:
        """A completed write is due for verify_backlog and trim_backlog; check what a read got
        against the last write there -- in a job that only reads: as fio (``!td_rw``), the reads
        a read/write mix issues are not verified, since they land anywhere, across blocks of
        other sizes and inside a write still to come."""
        key = (io.region.index, io.offset)
        if io.ddir == WRITE:
            if self.verify_backlog:
                self.backlog.append(key)
            if self.trim_backlog:
                self.trim_due.append(key)
        elif got is not None and self.verifier is not None and not self.writer:
            w = self.written.get(key)
            self._verify(got, io.offset, w[1] if w and w[0] == io.length else None, io.region)

    def _verify(self, data: bytes, offset: int, numberio: int | None, region: Region) -> None:
        assert self.verifier is not None
        why = self.verifier.check(data, offset, numberio)
        if why:
            self._bad_block(f"{why}; verify failed at file {region.path} offset {offset}, length {len(data)}")

    def _bad_block(self, line: str) -> None:
        """fio's rule for a block that does not verify (fio 3.33, checked): it ends the job with
        err=84 (EILSEQ), whatever ``verify_fatal`` says, unless continue_on_error names verify
        (and ignore_error's verify list holds EILSEQ, as by default); then it is counted and the
        job reads on -- up to this first bad block with ``verify_fatal=1``."""
        self.result.verify_errors += 1
        self.result.verify_first = self.result.verify_first or line
        if not self._goes_past("verify", errno.EILSEQ, line) or self.job.get("verify_fatal"):
            raise VerifyFailed(line)

    async def _sync(self, counted: bool = True) -> None:
        """Sync the clone's files. fio counts fsync=N's syncs only: end_fsync's and the one
        before the verify phase run outside its running state (should_account), uncounted."""
        t = time.perf_counter_ns()
        for r in self.regions:
            assert r.file is not None
            await r.file.fsync()
        if counted:
            self.result.sync.append(time.perf_counter_ns() - t)
            self.last_was_sync = True

    def _fsync_due(self) -> bool:
        """fio's get_rw_ddir: before the next I/O, a sync when the writes issued so far are a
        multiple of fsync=N and the last I/O to complete was not a sync -- so none follows the
        job's last I/O, and one may follow a read of a mix (fio 3.33 does both)."""
        return bool(self.fsync_every and self.writes_issued and self.writes_issued % self.fsync_every == 0
                    and not self.last_was_sync)

    async def _drain(self, inflight: dict[asyncio.Task, tuple[IO, int, int]]) -> None:
        """Wait for every I/O in flight and account it: fio drains the queue before a sync and a
        read-back, which must not race the writes they follow."""
        if inflight:
            await asyncio.wait(inflight)
        for task in list(inflight):
            self._reap(*inflight.pop(task), task.result())

    async def run(self) -> None:
        now = time.monotonic()
        ramp = self.job.get("ramp_time", 0)
        self.measure_from, self.measure_ns = now, time.perf_counter_ns()
        if self.steady is not None:
            self.steady.start(now + ramp)
        if self.latency is not None:
            self.latency.start(now)
        if ramp:
            self.ramp_end = now + ramp
        elif self.job.get("runtime"):
            self.deadline = now + self.job.get("runtime")
        t_cpu, ru = os.times(), resource.getrusage(resource.RUSAGE_SELF)
        inflight: dict[asyncio.Task, tuple[IO, int, int]] = {}
        zoned = [r.zoned for r in self.regions if r.zoned is not None]
        for zr in zoned if self.writer else ():
            zr.begin()
        yielded = time.perf_counter_ns()
        try:
            while True:
                reaped = 0
                while len(inflight) < (self.latency.qd if self.latency else self.depth) and \
                        (io := self.next_io()) is not None:
                    if self._fsync_due():
                        await self._drain(inflight)
                        await self._sync()
                    if io.ddir == WRITE:
                        self.writes_issued += 1
                    if self.flow:
                        await self._flow_gate()
                    if self.paced:
                        await self._pace(io)
                    self.result.depths[len(inflight) + 1] += 1
                    self.result.ios_issued += 1
                    t_prep = time.perf_counter_ns()
                    data = self._buffer(io) if io.ddir == WRITE else None
                    if self.remember:
                        self._log_piece(io)
                    if self.depth == 1 and io.region.zoned is None:
                        # one I/O at a time, none to order it after: awaited here, as a sync engine
                        # does it (a task and a wait cost more than the write they carry)
                        t_sub = time.perf_counter_ns()
                        self._reap(io, t_prep, t_sub, await self._do(io, data))
                        reaped = 1
                        if t_sub - yielded >= SLICE_NS:  # the others' turn (clones, the filesystem's tasks:
                            await asyncio.sleep(0)  # writeback's completions, signals), judged by the clock
                            yielded = time.perf_counter_ns()  # the I/O read anyway, not one more read
                        break
                    if io.region.zoned is not None:
                        io.after += self.ctx.ordered(io)
                    task = asyncio.ensure_future(self._do(io, data))
                    if io.region.zoned is not None:
                        self.ctx.issued(io, task)
                    if self.then_write is io:  # the trim of a trimwrite: its write follows it
                        self.trim_task = task
                    inflight[task] = (io, t_prep, time.perf_counter_ns())
                    if self.depth == 1:  # a sync engine: this I/O completes before the next
                        break
                if inflight:
                    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        self._reap(*inflight.pop(task), task.result())
                    reaped = len(done)
                elif not reaped:
                    if not await self._next_loop():
                        break
                    continue
                if self.think and self.completed % self.think_every < reaped:
                    await self.ctx.nap(self.think)  # thinktime(_spin): slept, a spin would stall the loop
                verify_due = 0 < self.verify_backlog <= len(self.backlog)
                trim_due = 0 < self.trim_backlog <= len(self.trim_due)
                if verify_due or trim_due:
                    await self._drain(inflight)
                if verify_due:
                    await self._backlog()
                if trim_due:
                    await self._trim_backlog()
            if self.job.get("end_fsync") or self.verifier is not None:
                await self._sync(counted=False)
        except BlockemuError as e:  # the I/O error ends this clone, as in fio; the others go on
            self.result.fail(e)
        finally:
            if self.flow:  # a finished clone's weight leaves its group, so the others are not held
                self.ctx.flows[self.job.get("flow_id", 0)][1] -= self.flow
            for task in inflight:
                task.cancel()
            self.result.runtime_s = time.monotonic() - self.measure_from
            if zoned:
                self.result.zone_resets = sum(zr.resets for zr in zoned)
            t_end, ru_end = os.times(), resource.getrusage(resource.RUSAGE_SELF)
            self.result.usr_s, self.result.sys_s = t_end.user - t_cpu.user, t_end.system - t_cpu.system
            self.result.ctx = ru_end.ru_nvcsw + ru_end.ru_nivcsw - ru.ru_nvcsw - ru.ru_nivcsw
            self.result.majf, self.result.minf = ru_end.ru_majflt - ru.ru_majflt, ru_end.ru_minflt - ru.ru_minflt

    def _reap(self, io: IO, t_prep: int, t_sub: int, outcome: tuple[int, bytes | None] | BlockemuError) -> None:
        """Account a completed I/O (``_do``'s outcome)."""
        self.last_was_sync = False
        if isinstance(outcome, BlockemuError):
            self._io_error(io, outcome)
            return
        t_done, got = outcome
        self._complete(io, t_prep, t_sub, t_done, got)
        self.completed += 1
        self.completed_bytes += io.length

    def _io_error(self, io: IO, e: BlockemuError) -> None:
        """fio's error policy: fill_device ends at ENOSPC (or EDQUOT) without an error; with
        continue_on_error naming the I/O's type, an error in that type's list (ignore_error's,
        or fio's non-fatal EIO and EILSEQ) is counted and the job goes on; anything else ends it."""
        code = e.errno or errno.EIO
        if io.ddir == WRITE and self.remember:  # off the verify list, as fio's unlog_io_piece
            self.written.unlog(io.region.index, io.offset, io.numberio)
        if self.fill and io.ddir == WRITE and code in (errno.ENOSPC, errno.EDQUOT):
            self.filled = True
            return
        line = f"fio: io_u error on file {io.region.path}: {os.strerror(code)}: {DDIR_NAMES[io.ddir]} " \
               f"offset={io.offset}, buflen={io.length}"
        if not self._goes_past("read" if io.ddir == READ else "write", code, line):
            raise e

    def _goes_past(self, kind: str, code: int, line: str) -> bool:
        """continue_on_error: the error is counted (and logged unless error_dump=0); True if the
        job goes on past it -- its type is named and its errno is in that type's list."""
        if not self.continue_on:
            return False
        self.result.count_error(code, line if self.job.get("error_dump", True) else None)
        return kind in self.continue_on and code in (self.ignore[ERROR_KINDS.index(kind)] or NON_FATAL)

    async def _trim_backlog(self) -> None:
        """trim_backlog=N: after N writes, trim trim_percentage of (trim_backlog_batch of) them;
        the verify phase then expects zeros there (trim_verify_zero)."""
        batch, self.trim_due = self.trim_due[: self.job.get("trim_backlog_batch") or len(self.trim_due)], []
        for key in dict.fromkeys(batch):
            if key not in self.written or self.rng.randrange(100) >= self.job.get("trim_percentage", 0):
                continue
            length, _ = self.written.pop(key)
            region = self.regions[key[0]]
            assert region.file is not None
            t = time.perf_counter_ns()
            await region.file.punch_hole(key[1], length)
            self._complete(IO(region, TRIM, key[1], length, 0), t, t, time.perf_counter_ns(), None)
            self.trimmed[key] = length

    async def _verify_written(self, keys: list[tuple[int, int]], until: float = 0.0) -> None:
        """Read back written blocks and check them; each is then off the list to verify. Each
        read-back is a read in the job's figures, as in fio, and counts towards number_ios (fio's
        io_blocks counts it). ``until``: the job's runtime ends then, and so does the reading
        back (fio's do_verify stops at runtime_exceeded)."""
        for ri, off in keys:
            if until and time.monotonic() >= until:
                break
            length, numberio = self.written.pop((ri, off))
            self.ios += 1
            region = self.regions[ri]
            assert region.file is not None
            t = time.perf_counter_ns()
            data = await region.file.pread(length, off)
            self._account(IO(region, READ, off, length, 0), t, t, time.perf_counter_ns())
            self._verify(data, off, numberio, region)

    def _verify_order(self) -> list[tuple[int, int]]:
        """fio's order (lastwrites.py): as written where a random map kept the writes apart."""
        return list(self.written) if self.randommap else self.written.by_offset()

    def _loop_end(self) -> int:
        """Where the I/O stops for now: the end of this pass when each is verified, else the plan."""
        return self.pass_end if self.loop_verify else self.plan

    async def _next_loop(self) -> bool:
        """A pass (fio's do_io) of a job that verifies each is done: go on as fio's keep_running
        would, after reading this pass's writes back, as fio's do_verify does between passes;
        False at the end (the verify phase reads the last pass's back). Whether to go on counts
        the read-back to come, which fio has done by then. blockemu went on to ``io_size`` times
        ``loops`` written, each pass ``io_size`` long, where fio's passes stop at ``size`` and count
        the read-backs (``size=64k io_size=128k verify``: 32 writes and 32 reads, not 64 and 32)."""
        if not self.loop_verify or self.bytes_done < self.pass_end or self.ctx.stopped:
            return False
        self.passes += 1
        moved = self.result.read.io_bytes + self.result.write.io_bytes + self.written.bytes()
        if self.bytes_done >= self.budget or not self._another_pass(self.passes, moved):
            return False
        await self._read_back()
        self.pass_end = min(self.budget, self.bytes_done + self.pass_bytes)
        return True

    async def _read_back(self) -> None:
        """fio's do_verify: read back what is left to verify, up to the runtime, counted as the
        verify's reads (``verify_ios``, its time added to the read runtime), between passes as
        after the last; verify_backlog's count starts afresh (fio's io_hist_len is 0 again).
        The read-backs between passes counted as the job's own reads, and a read-side
        ``rate_min`` judged them; the backlog kept the writes read back, and fired early."""
        d = self.result.read
        ios, io_bytes, start = len(d.clat), d.io_bytes, time.monotonic()
        try:
            await self._verify_written(self._verify_order(), self.deadline)
        finally:
            d.verify_ios += len(d.clat) - ios
            d.verify_bytes += d.io_bytes - io_bytes
            d.verify_s += time.monotonic() - start
            self.backlog.clear()

    async def verify_phase(self) -> None:
        """do_verify: read back every block this clone wrote (the last write of each) that
        verify_backlog has not checked already."""
        if self.verifier is not None and self.job.get("do_verify", True):
            d = self.result.read
            # the phase's completions are timed on from the read runtime's end, where fio's are
            self.measure_from = time.monotonic() - d.runtime(self.result.runtime_s)
            self.measure_ns = time.perf_counter_ns() - int(d.runtime(self.result.runtime_s) * 1e9)
            await self._read_back()
            if self.job.get("trim_verify_zero", True):
                for (ri, off), length in sorted(self.trimmed.items()):
                    region = self.regions[ri]
                    assert region.file is not None
                    if any(await region.file.pread(length, off)):
                        self._bad_block(f"verify: trimmed block not zero at file {region.path} offset {off}, "
                                        f"length {length}")

    async def _backlog(self) -> None:
        """verify_backlog=N: after N writes, verify (verify_backlog_batch of) them."""
        every = self.job.get("verify_backlog")
        batch, self.backlog = self.backlog[: self.job.get("verify_backlog_batch") or every], []
        await self._verify_written([k for k in dict.fromkeys(batch) if k in self.written])

    async def close(self) -> None:
        for r in self.regions:
            f, r.file = r.file, None
            if f is not None:
                if self.job.get("fsync_on_close"):
                    await f.fsync()
                await f.close()


def rate_shortfall(job: Job, r: JobResult) -> str:
    """rate_min/rate_iops_min, judged over the whole measured run (fio judges each
    rate_cycle): the first direction that fell short, or ""."""
    for i, d in enumerate(r.dirs):
        if len(d.clat) == d.verify_ios or not r.runtime_s:
            continue  # fio judges the rates while the job runs, not in its verify phase
        floor, iops_floor = (job.get("rate_min") or (0, 0, 0))[i], (job.get("rate_iops_min") or (0, 0, 0))[i]
        bw, iops = (d.io_bytes - d.verify_bytes) / r.runtime_s, (len(d.clat) - d.verify_ios) / r.runtime_s
        if floor and bw < floor:
            return f"{DDIR_NAMES[i]} bandwidth {bw:.0f} B/s is below rate_min {floor}"
        if iops_floor and iops < iops_floor:
            return f"{DDIR_NAMES[i]} IOPS {iops:.0f} is below rate_iops_min {iops_floor}"
    return ""


def check_job(job: Job) -> list[str]:
    """What keeps a job from running, beyond what the parser checks: its sizes."""
    problems = []
    rw: RW = job.get("rw", RW("read"))
    if job.get("verify") == "pattern" and not job.get("verify_pattern"):
        problems.append("verify=pattern needs verify_pattern=")
    if job.get("ioengine") == "ftruncate" and rw.pattern not in ("write", "randwrite"):
        problems.append(f"ioengine=ftruncate only writes (its I/Os are truncates), not rw={rw.pattern}")
    if job.get("fill_device") or isinstance(job.get("size"), Share):
        pass  # sized at layout: by the image's free space, or a share of it or of the files
    elif not (job.get("size") or job.get("filesize")):
        if not job.get("filename"):  # a named file may exist by the time the job runs: its size is the job's
            problems.append("size= is needed (the emulated filesystem has no device to take it from); "
                            "give it in the job file or with --size")
    else:
        smallest = min(Sizes(job, d).lo for d in (READ, WRITE))
        per = job.get("filesize") or fixed(job.get("size")) // max(1, len(job_files(job, "/", 0)))
        if per < smallest:
            problems.append(f"size {per} per file is smaller than the block size {smallest}")
    if job.get("zonemode") == "zbd":
        problems += zbd_problems(job, rw)
    return problems


def zbd_problems(job: Job, rw: RW) -> list[str]:
    """What fio refuses in a zonemode=zbd job on a regular file (zbd_verify_bs, init_zone_info),
    in its words, and what blockemu does not emulate."""
    zone = job.get("zonesize", 0)
    if not zone:
        return ["Specifying the zone size is mandatory for regular file/block device with --zonemode=zbd"]
    problems = []
    if job.get("zonecapacity", 0) > zone:
        problems.append(f"job parameter zonecapacity {job.get('zonecapacity')} is larger than zone size {zone}")
    if "trim" in rw.pattern:
        trim = Sizes(job, TRIM)
        if trim.lo != trim.hi or trim.split:
            problems.append("bsrange and bssplit are not allowed for trim with zonemode=zbd")
        elif trim.lo != zone:
            problems.append(f"trim block size {trim.lo} is not the zone size {zone}")
    if job.get("verify", "0") not in ("0", "null"):
        problems += [f"block size {bs} is not a divisor of the zone size {zone}"
                     for bs in dict.fromkeys(Sizes(job, d).hi for d in (READ, WRITE, TRIM)) if zone % bs]
    if job.get("job_max_open_zones") and not job.get("max_open_zones"):
        problems.append("'job_max_open_zones' cannot be used without a global open zones limit")
    if rw.pattern in ("trimwrite", "randtrimwrite"):
        problems.append(f"rw={rw.pattern} with zonemode=zbd is not supported")
    if job.get("zoneskip", 0) % zone:
        problems.append(f"zoneskip {job.get('zoneskip')} is not a multiple of the device zone size {zone}")
    return problems


async def _close(clones: list[Clone]) -> None:
    """Close every clone's files; a close that fails (its writeback did) fails that clone."""
    for c in clones:
        try:
            await c.close()
        except BlockemuError as e:
            c.result.fail(e)


async def run_fio(ctx: RunContext, job: Job, seed: int) -> list[JobResult]:
    """All clones of one job: layout first (untimed), then the clones concurrently after
    ``startdelay``, then verification, ``unlink``; one result per clone."""
    numjobs = max(1, job.get("numjobs", 1))
    clones = [Clone(ctx, job, n, seed, JobResult(job.name, job.group, dict(job.raw), ReportOptions.of(job),
                                                 description=job.get("description", "")))
              for n in range(numjobs)]
    notes = [SYNC_NOTE] if job.get("iodepth", 1) > 1 and clones[0].engine not in ASYNC_ENGINES else []
    if clones[0].verifier is not None and clones[0].writer and job.get("do_verify", True):
        if numjobs > 1 and job.get("filename"):
            notes.append(SHARED_VERIFY_NOTE)
        if clones[0].timed and not clones[0].reads and not job.get("verify_backlog"):
            notes.append(TIMED_VERIFY_NOTE)
    for c in clones:
        c.result.depth, c.result.ignored, c.result.notes = max(1, job.get("iodepth", 1)), job.ignored, notes
        c.result.describe = describe(job, c)
    try:
        try:
            for c in clones:
                await c.layout()
        finally:
            await ctx.laid_out(job.name)
        await ctx.nap(job.get("startdelay", 0))
        if not job.get("create_only"):  # create_only: the setup phase alone
            await asyncio.gather(*(c.run() for c in clones))  # a clone's I/O error ends that clone only
        if not ctx.stopped:  # a stopped job is not verified, as in fio
            for c in clones:
                if not c.result.error:
                    try:
                        await c.verify_phase()
                    except VerifyFailed as e:  # this clone's bad block ends this clone's job
                        c.result.fail(e)
        await _close(clones)
        if job.get("unlink") or job.get("unlink_each_loop"):
            for path in dict.fromkeys(r.path for c in clones for r in c.regions):
                if await ctx.fs.exists(path):
                    await ctx.fs.unlink(path)
                if ctx.ledger is not None:
                    ctx.ledger.forget(path)
    except BlockemuError as e:  # layout, verification, close or unlink: the whole job failed
        for c in clones:
            c.result.fail(e)
    finally:
        await _close(clones)
    for c in clones:
        if c.result.verify_errors:
            c.result.error = c.result.error or errno.EILSEQ  # as fio reports a verify failure
        c.result.error = c.result.error or c.result.first_error  # fio's err= is the first error gone past
        c.result.rate_shortfall = rate_shortfall(job, c.result)
    return [c.result for c in clones]


# --- text output ------------------------------------------------------------------------------

def num2str(num: float, maxlen: int = 4, pow2: bool = False, unit: str = "") -> str:
    """fio 3.33's num2str: divided by 1000 (1024) until at most ``maxlen`` digits are left, then
    as many decimals as ``maxlen`` leaves room for -- ``16.0MiB``, ``2148KiB/s``, ``4541`` IOPS,
    ``12.3k``; fio's text output gives every size, rate and count so (4 significant figures,
    latencies' min and max 6), and a parser of it reads them in those forms."""
    prefixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi") if pow2 else ("", "k", "M", "G", "T", "P")
    thousand = 1024 if pow2 else 1000
    num, post, modulo, carry = int(num), 0, -1, False
    while post < len(prefixes) and len(str(num)) > maxlen:
        modulo, num = num % thousand, num // thousand
        carry, post = modulo >= thousand // 2, post + 1
    post = post if post < len(prefixes) else 0
    room = maxlen - len(str(num)) - 1
    if modulo < 0 or room < 1:
        return f"{num + (modulo >= 0 and carry)}{prefixes[post]}{unit}"
    frac = f"{modulo / thousand:.{room}f}"
    return f"{num + (frac[0] == '1')}.{frac[2:]}{prefixes[post]}{unit}"


def bin_size(n: float) -> str:
    return num2str(n, pow2=True, unit="B")


def dec_size(n: float) -> str:
    return num2str(n, unit="B")


def describe(job: Job, c: Clone) -> str:
    bs = ", ".join(f"({k}) {c.sizes[i].lo}B-{c.sizes[i].hi}B" for i, k in enumerate("RWT"))
    return f"{job.name}: (g={job.group}): rw={c.rw.pattern}, bs={bs}, ioengine={c.engine}, " \
           f"iodepth={max(1, job.get('iodepth', 1))}" + "\n..." * (job.get("numjobs", 1) > 1)  # fio's mark of the clones


def _lat_unit(lo: int, hi: int, dev: float = math.inf) -> tuple[str, int]:
    """fio's unit for nanosecond figures, and how many times 1000 it is: micro- or milliseconds
    only when the smallest, the largest (and for a latency line the spread) all call for it."""
    if lo > 2_000_000 and hi > 99_999_999 and dev > 1e6:
        return "msec", 2
    if lo > 2000 and hi > 99_999 and dev > 1000:
        return "usec", 1
    return "nsec", 0


def _lat_line(label: str, s: dict[str, Any]) -> str:
    """fio's display_lat of the figures ``_lat_json`` gave (``s``: the JSON report's, not
    computed again -- a stdev over every latency is a report's costliest sum): nanoseconds
    unless the smallest, the largest and the spread all call for micro- (or milli-) seconds,
    so a fast minimum keeps its digits (``min=635, max=23056k``)."""
    if not s["N"]:
        return ""
    lo, hi, avg, dev = s["min"], s["max"], s["mean"], s["stddev"]
    unit, steps = _lat_unit(lo, hi, dev)
    div = 1000 ** steps
    return f"{label} ({unit}): min={num2str(lo // div, 6)}, max={num2str(hi // div, 6)}, " \
           f"avg={avg / div:5.2f}, stdev={dev / div:5.2f}"


def _percentile_lines(label: str, pct: dict[str, int], precision: int = 2) -> list[str]:
    """fio's show_clat_percentiles: the unit from the smallest and largest value shown, each
    rounded up to it, in columns as wide as the largest needs; each percentile with
    ``precision`` decimals (fio's percentile_precision, as percentile_list was written:
    ``50th`` for ``50:99``, ``50.00th`` for ``50.00:99``), as many to a line as fit 73 columns."""
    unit, steps = _lat_unit(min(pct.values()), hi := max(pct.values()))
    width = max(5, len(str(hi // 1000 ** steps)))
    per_line = 73 // (precision + 10 + width)
    cells = []
    for k, v in pct.items():
        for _ in range(steps):
            v = (v + 999) // 1000
        cells.append(f"{float(k):{3 + precision}.{precision}f}th=[{v:{width}d}]")
    return [f"    {label} percentiles ({unit}):"] + [
        "     | " + ", ".join(cells[k: k + per_line]) + ("," if k + per_line < len(cells) else "")
        for k in range(0, len(cells), per_line)]


def text_report(results: list[JobResult], group_bw: dict[int, list[float]]) -> list[str]:
    """fio's normal output: per job, then per group."""
    lines = []
    seen = set()
    for r in results:
        if r.describe and r.name not in seen:
            seen.add(r.name)
            lines.append(r.describe)
    lines += dict.fromkeys(n for r in results for n in r.notes)  # in the order fio prints them
    started = sum(r.jobs for r in results)  # (group_reporting: one result for them all)
    lines.append(f"Starting {started} process{'es' if started > 1 else ''}\n")
    for r in results:
        if not r.ios_issued:
            continue  # fio shows no block for a job that issued nothing (zbd-seq-read on empty zones)
        lines.append(f"{r.name}: (groupid={r.group}, jobs={r.jobs}): err={r.error:2d}: pid={os.getpid()}: "
                     f"{time.strftime('%a %b %e %H:%M:%S %Y')}")
        if r.description:
            lines.append(f"  Description  : [{r.description}]")
        for i, label in enumerate(DDIR_NAMES):
            d = r.dirs[i]
            if not d.clat:
                continue
            j = d.as_json(r.runtime_s, r.report, group_bw[r.group][i], False)
            resets = f"; {r.zone_resets or 0} zone resets" if i == WRITE else ""  # fio 3.33's, zoned or not
            lines.append(f"  {label}: IOPS={num2str(j['iops'])}, BW={bin_size(j['bw_bytes'])}/s "
                         f"({dec_size(j['bw_bytes'])}/s)({bin_size(d.io_bytes)}/{j['runtime']}msec){resets}")
            for lab in ("slat", "clat", "lat"):
                if j[f"{lab}_ns"]["N"]:
                    lines.append(_lat_line(f"{lab:>8}", j[f"{lab}_ns"]))
            for lab in ("slat", "clat", "lat"):  # fio's show_ddir_status: each kind asked for, in this order
                pct = j[f"{lab}_ns"].get("percentile")
                if pct:
                    lines += _percentile_lines(lab, pct, r.report.precision)
            if j["bw_samples"]:
                lines.append(f"   bw (  KiB/s): min={j['bw_min']}, max={j['bw_max']}, per={j['bw_agg']:.2f}%, "
                             f"avg={j['bw_mean']:.2f}, stdev={j['bw_dev']:.2f}, samples={j['bw_samples']}")
                lines.append(f"   iops        : min={j['iops_min']}, max={j['iops_max']}, avg={j['iops_mean']:.2f}, "
                             f"stdev={j['iops_stddev']:.2f}, samples={j['iops_samples']}")
        for unit, buckets in zip(("nsec", "usec", "msec"), r.lat_buckets()):
            cells = [f"{k}={v:.2f}%" for k, v in buckets.items() if v >= 0.01]
            for k in range(0, len(cells), 5):
                lines.append(f"  lat ({unit})   : " + ", ".join(cells[k: k + 5]))
        if r.sync:
            lines.append("  fsync/fdatasync/sync_file_range:")
            lines.append(_lat_line("    sync", _lat_json(r.sync, None)))
        usr, sys_ = r.cpu()
        lines.append(f"  cpu          : usr={usr:.2f}%, sys={sys_:.2f}%, ctx={r.ctx}, majf={r.majf}, minf={r.minf}")
        lines.append("  IO depths    : " + ", ".join(f"{k}={v:.1f}%" for k, v in r.depth_levels().items()))
        per_call = r.as_json([0.0, 0.0, 0.0])["iodepth_submit"]
        for label in ("submit", "complete"):
            lines.append(f"     {label:<10}: " + ", ".join(f"{k}={v:.1f}%" for k, v in per_call.items()))
        totals = ",".join(str(len(d.clat)) for d in r.dirs)
        lines.append(f"     issued rwts: total={totals},0 short=0,0,0,0 dropped=0,0,0,0")
        if r.continue_on:
            lines.append(f"     errors    : total={r.total_err}, first_error={r.first_error}/"
                         f"<{os.strerror(r.first_error) if r.first_error else 'Success'}>")
        lines += r.error_log
        lat = r.as_json([0.0, 0.0, 0.0])
        lines.append(f"     latency   : target={lat['latency_target']}, window={lat['latency_window']}, "
                     f"percentile={lat['latency_percentile']:.2f}%, depth={lat['latency_depth']}")
        if r.verify_errors:
            lines.append(f"  verify: {r.verify_errors} bad blocks, first: {r.verify_first}")
        if r.ignored:
            lines.append(f"  ignored options: {', '.join(r.ignored)}")
        lines.append("")
    for g in sorted({r.group for r in results}):
        rs = [r for r in results if r.group == g]
        lines.append(f"Run status group {g} (all jobs):")
        for i, label in enumerate(DDIR_NAMES):
            active = [r for r in rs if r.dirs[i].io_bytes]
            if not active:
                continue
            total = sum(r.dirs[i].io_bytes for r in active)
            times = [r.dirs[i].runtime(r.runtime_s) for r in active]
            bws = [r.dirs[i].io_bytes / (t or 1e-9) for r, t in zip(active, times)]
            runs = [int(t * 1000) for t in times]
            agg = total / (max(times) or 1e-9)
            lines.append(f"  {label.upper():>5}: bw={bin_size(agg)}/s ({dec_size(agg)}/s), "
                         f"{bin_size(min(bws))}/s-{bin_size(max(bws))}/s ({dec_size(min(bws))}/s-{dec_size(max(bws))}/s), "
                         f"io={bin_size(total)} ({dec_size(total)}), run={min(runs)}-{max(runs)}msec")
        lines.append("")
    return lines


def terse_report(results: list[JobResult], group_bw: dict[int, list[float]], version: str,
                 disks: list[dict[str, Any]]) -> list[str]:
    """fio's terse format, version 3: one semicolon-separated line per job, latencies in usec;
    each line ends as fio 3.33's does, with the disk stats (``disks``: the run's ``disk_util``),
    then continue_on_error's error count and first error, then the description, each if any."""
    tail = [field for d in disks for field in (
        *(str(d[k]) for k in ("name", "read_ios", "write_ios", "read_merges", "write_merges", "read_ticks",
                              "write_ticks", "in_queue")), f"{d['util']:3.2f}%")]
    lines = []
    for r in results:
        f: list[str] = ["3", version, r.name, str(r.group), str(r.error)]
        for i in (READ, WRITE):
            j = r.dirs[i].as_json(r.runtime_s, r.report, group_bw[r.group][i], False)
            f += [str(j["io_kbytes"]), str(j["bw"]), str(int(j["iops"])), str(j["runtime"])]
            for key in ("slat_ns", "clat_ns"):
                s = j[key]
                f += [str(s["min"] // 1000), str(s["max"] // 1000), f"{s['mean'] / 1000:.6f}", f"{s['stddev'] / 1000:.6f}"]
                if key == "clat_ns":
                    pct = list(s.get("percentile", {}).items()) or [(f"{p:.6f}", 0) for p in r.report.percentiles]
                    pct = (pct + [("0", 0)] * 20)[:20]
                    f += [f"{k}%={v // 1000}" for k, v in pct]
            s = j["lat_ns"]
            f += [str(s["min"] // 1000), str(s["max"] // 1000), f"{s['mean'] / 1000:.6f}", f"{s['stddev'] / 1000:.6f}"]
            f += [str(j["bw_min"]), str(j["bw_max"]), f"{j['bw_agg']:.6f}%", f"{j['bw_mean']:.6f}", f"{j['bw_dev']:.6f}"]
        usr, sys_ = r.cpu()
        f += [f"{usr:.6f}%", f"{sys_:.6f}%", str(r.ctx), str(r.majf), str(r.minf)]
        f += [f"{v:.1f}%" for v in r.depth_levels().values()]
        _, us, ms = r.lat_buckets()
        f += [f"{v:.2f}%" for v in us.values()]
        f += [f"{v:.2f}%" for v in ms.values()]
        f += tail
        f += [str(r.total_err), str(r.first_error)] * r.continue_on + [r.description] * bool(r.description)
        lines.append(";".join(f))
    return lines
