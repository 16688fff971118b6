"""fio job files as fio users write them: semantics, engines, output layout, and the OS's fio as oracle."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import blockemu
from blockemu.errors import InvalidArgument
from blockemu.fs.filesystem import File, mount
from blockemu.workload.buffers import Buffers
from blockemu.workload.fio import (
    DIGESTS,
    SYNC_NOTE,
    WRITE,
    Clone,
    JobResult,
    LatencyTarget,
    RunContext,
    SteadyWatch,
    Verifier,
    _lat_json,
    _lat_line,
    _percentile_lines,
    num2str,
)
from blockemu.workload.jobfile import Share, parse
from blockemu.workload.lastwrites import LastWrites
from blockemu.workload.runner import run_workload
from tests.test_cli import run
from tests.util import assert_fsck_clean, sigint_as_a_terminal_gives

JOBS = Path(__file__).parent / "fio_jobs"
FIO = shutil.which("fio")


def ios(text: str) -> list[tuple[str, int, int]]:
    """The (file, offset, length) sequence a job's first clone would issue (no I/O done)."""
    job = parse(text, "t.fio").jobs[0]
    c = Clone(RunContext(None, "/jobs"), job, 0, 1, JobResult(job.name, 0))  # type: ignore[arg-type]
    out = []
    while (io := c.next_io()) is not None:
        out.append((io.region.path, io.offset, io.length))
    return out


async def run_job(tmp_path: Path, text: str, **overrides: Any) -> tuple[dict[str, Any], str]:
    path = tmp_path / "j.fio"
    path.write_text(text)
    image = str(tmp_path / "j.img")
    report = await run_workload(str(path), image=image, seed=1, overrides=overrides or None)
    out = report.as_json()
    assert out["blockemu"]["ok"], out["blockemu"]["failures"]
    assert out["blockemu"]["fsck_clean"]
    return out, image


# --- offsets, sizes and budgets ---------------------------------------------------------------

def test_random_map_touches_every_block_once_per_loop():
    offs = [o for _, o, _ in ios("[w]\nrw=randwrite\nsize=64k\nbs=4k\nloops=2\n")]
    assert sorted(offs) == sorted(list(range(0, 64 << 10, 4096)) * 2)
    assert offs[:16] != sorted(offs[:16])  # random order, each block once in the first pass
    free = [o for _, o, _ in ios("[w]\nrw=randread\nsize=64k\nbs=4k\nnorandommap\n")]
    assert len(free) == 16 and len(set(free)) < 16  # norandommap: repeats allowed, as in fio


def test_a_job_of_one_direction_draws_no_random_number_for_it():
    """fio's get_rw_ddir draws a direction only for a mixed job (rw, randrw): a job that only
    writes or only reads spends its random numbers on its offsets alone, so each pass of its
    random map is the clone's generator's next shuffle, with nothing drawn between them (a
    draw per I/O was ~5 % of the runner's own work in the fio job of issue 16)."""
    rng = random.Random(1)  # the clone's generator (seed 1, clone 0)
    rng.random()  # the data generator's seed
    passes = [list(range(16)), list(range(16))]
    for p in passes:
        rng.shuffle(p)
    for rw in ("randwrite", "randread"):
        offsets = [o for _, o, _ in ios(f"[w]\nrw={rw}\nsize=64k\nbs=4k\nloops=2\n")]
        assert offsets == [b * 4096 for b in passes[0] + passes[1]]
    mixed = [o for _, o, _ in ios("[w]\nrw=randrw\nsize=64k\nbs=4k\nloops=2\n")]
    assert sorted(mixed) == sorted(list(range(0, 64 << 10, 4096)) * 2)  # a whole map each pass too,
    assert mixed[16:] != [b * 4096 for b in passes[1]]  # but drawn after its directions were


def test_sequential_modifiers_random_runs_and_block_sizes():
    assert [o for _, o, _ in ios("[j]\nrw=write:12k\nsize=64k\nbs=4k\n")][:5] == [0, 16384, 32768, 49152, 0]
    assert [o for _, o, _ in ios("[j]\nrw=read:-8k\nsize=64k\nbs=4k\n")][:4] == [0, 61440, 57344, 53248]
    runs = [o for _, o, _ in ios("[j]\nrw=randread:4\nsize=1m\nbs=4k\nnumber_ios=64\n")]
    assert len(runs) == 64
    steps = [b - a for a, b in zip(runs, runs[1:])]
    assert all(steps[i] == 4096 for i in range(len(steps)) if i % 4 != 3)  # 4 sequential I/Os per random offset
    same = [o for _, o, _ in ios("[j]\nrw=randread:4\nrw_sequencer=identical\nsize=1m\nbs=4k\nnumber_ios=8\n")]
    assert same[:4] == [same[0]] * 4 and same[4:] == [same[4]] * 4
    split = [n for _, _, n in ios("[j]\nrw=randread\nnorandommap\nsize=64m\nbssplit=4k/75:64k/25\nnumber_ios=400\n")]
    assert set(split) == {4096, 65536} and 240 < split.count(4096) < 360
    ranged = {n for _, _, n in ios("[j]\nrw=read\nsize=1m\nbsrange=1k-4k\n")}
    assert ranged <= {1024, 2048, 3072, 4096} and len(ranged) > 1


@pytest.mark.parametrize("dist", ["zipf:1.2", "pareto:0.9", "normal:10", "zoned:50/5:50/95", "zoned:50/5:30/15:20/",
                                  "zoned_abs:50/200k:50/4m"])
def test_random_distributions_are_skewed(dist):
    offs = [o for _, o, _ in ios(f"[j]\nrw=randread\nsize=4m\nio_size=1g\nbs=4k\nnumber_ios=2000\nrandom_distribution={dist}\n")]
    hottest = max(offs.count(o) for o in set(offs))
    assert len(offs) == 2000 and hottest > 10 or dist.startswith("zoned")  # uniform over 1024 blocks: ~2 each
    if dist.startswith("zoned"):  # half the accesses go to the first 5% of the file
        assert 900 < sum(o < 200 << 10 for o in offs) < 1100 and max(offs) > 2 << 20
    if dist.startswith("normal"):
        assert sum(1 << 20 < o < 3 << 20 for o in offs) > 1900  # within 2.5 deviations of the middle


def test_strided_zones():
    seq = [o for _, o, _ in ios("[j]\nrw=read\nsize=1m\nbs=4k\nzonemode=strided\nzonesize=16k\nzoneskip=48k\n")]
    assert len(seq) == 64 and seq[:6] == [0, 4096, 8192, 12288, 65536, 69632]  # skipped bytes count as done
    rnd = [o for _, o, _ in ios("[j]\nrw=randread\nsize=1m\nbs=4k\nzonemode=strided\nzonesize=32k\n"
                                "zonerange=16k\nzoneskip=48k\n")]
    assert all(o // 65536 == i // 8 and o % 65536 < 16384 for i, o in enumerate(rnd[:64]))  # 8 I/Os per zone


def test_a_random_mix_never_cuts_an_io_below_its_directions_block_size():
    """fio's mark_random_map cuts an I/O to the free map in whole min_bs of its direction, so a
    ``bs=4k,64k`` write is never shorter than 64k. blockemu's map works in the smallest block
    size of all, and cut each write to the free blocks between the reads: ``rw=randrw
    bs=4k,64k`` wrote 18.5 KiB on average. A block too fragmented for a write is passed over."""
    for job in ("[j]\nrw=randrw\nbs=4k,64k\nsize=1m\n", "[j]\nrw=randrw\nbssplit=4k/100,64k/50:128k/50\nsize=1m\n"):
        sel = ios(job)
        writes = [n for _, o, n in sel if n > 4096]
        assert 1 << 20 <= sum(n for *_, n in sel) < (1 << 20) + (128 << 10) and len(writes) > 4  # the last may pass
        assert all(n % 65536 == 0 for n in writes), Counter(n for *_, n in sel)


def test_offset_io_size_number_ios_and_files():
    sel = ios("[j]\nrw=randwrite\nsize=64k\noffset=64k\nio_size=128k\nbs=4k\n")
    assert sum(n for *_, n in sel) == 128 << 10 and all(64 << 10 <= o < 128 << 10 for _, o, _ in sel)
    assert len(ios("[j]\nrw=read\nsize=1m\nnumber_ios=5\n")) == 5
    files = ios("[j]\nrw=write\nsize=48k\nnrfiles=3\nfilename_format=$jobname-$filenum.dat\ndirectory=d\n")
    assert [p for p, _, _ in files[:3]] == ["/jobs/d/j-1.dat", "/jobs/d/j-2.dat", "/jobs/d/j-0.dat"]
    assert {p for p, _, _ in files} == {f"/jobs/d/j-{i}.dat" for i in range(3)} and len(files) == 12
    listed = ios("[j]\nrw=write\nsize=32k\nfilename=/abs/f1:rel/f2\ndirectory=/base\n")
    assert {p for p, _, _ in listed} == {"/abs/f1", "/base/rel/f2"}


async def test_files_land_where_fio_puts_them_and_unlink_removes_them(tmp_path):
    out, image = await run_job(tmp_path, """[global]
rw=write
bs=4k
[listed]
directory=/srv/flash
filename=x/y/f1:f2
size=64k
[many]
nrfiles=2
size=32k
[gone]
size=16k
unlink=1
[rel]
directory=sub
filename=f
size=8k
""")
    async with mount(image) as fs:
        assert (await fs.stat("/srv/flash/x/y/f1")).st_size == 32 << 10 and (await fs.stat("/srv/flash/f2")).st_size == 32 << 10
        assert (await fs.stat("/jobs/many.0.0")).st_size == 16 << 10 and await fs.exists("/jobs/many.0.1")
        assert not await fs.exists("/jobs/gone.0.0") and (await fs.stat("/jobs/sub/f")).st_size == 8 << 10


async def test_create_only_pre_read_and_allow_file_create(tmp_path):
    out, image = await run_job(tmp_path, "[made]\nrw=read\nsize=64k\ncreate_only=1\n"
                                         "[warm]\nstonewall\nrw=read\nsize=64k\nfilename=made.0.0\npre_read=1\n")
    made, warm = out["jobs"]
    assert made["read"]["total_ios"] == 0 and warm["read"]["io_bytes"] == 64 << 10
    (tmp_path / "n.fio").write_text("[n]\nrw=write\nsize=64k\nallow_file_create=0\n")
    report = await run_workload(str(tmp_path / "n.fio"), image=image, seed=1)
    assert report.failures == ["n: job n: /jobs/n.0.0 does not exist and allow_file_create=0 (err=2)"]


async def test_randwrite_over_a_file_writes_every_block(tmp_path):
    """The random map end to end: a 1 MiB randwrite in 4k blocks leaves no block unwritten
    (read back after unmounting and mounting again)."""
    out, image = await run_job(tmp_path, "[w]\nrw=randwrite\nsize=1m\nbs=4k\nioengine=libaio\niodepth=8\n")
    assert out["jobs"][0]["write"]["total_ios"] == 256
    async with mount(image) as fs:
        async with fs.open("/jobs/w.0.0", "r") as f:
            data = await f.read()
    assert len(data) == 1 << 20 and all(any(data[i: i + 4096]) for i in range(0, 1 << 20, 4096))


async def test_ftruncate_engine_truncates_to_each_offset(tmp_path):
    out, image = await run_job(tmp_path, "[grow]\nioengine=ftruncate\nrw=write\nsize=64k\nbs=4k\n")
    assert out["jobs"][0]["write"]["total_ios"] == 16
    async with mount(image) as fs:
        assert (await fs.stat("/jobs/grow.0.0")).st_size == 60 << 10


# --- verify -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DIGESTS) + ["pattern"])
def test_verify_blocks_catch_a_flipped_byte(kind):
    v = Verifier(kind, b"\xaa\x55" if kind in ("pattern", "meta") else None, 512 if kind == "meta" else None)
    block = v.make(8192, 7, 4096, random.Random(1))
    assert v.check(block, 8192, 7) is None
    bad = bytearray(block)
    bad[1000] ^= 1
    assert v.check(bytes(bad), 8192, 7) is not None or kind == "meta"  # meta checks headers only
    if kind != "pattern":
        assert "bad header offset" in v.check(block, 4096, None)
        assert "numberio" in v.check(block, 8192, 8)


async def test_verify_backlog_checks_while_writing(tmp_path, monkeypatch):
    """verify_backlog=8: read-backs happen during the writes, each block once in all."""
    checked: list[tuple[int, int]] = []
    real = Clone._verify

    def spy(self, data, offset, numberio, region):
        checked.append((len(self.result.write.clat), offset))  # writes completed
        return real(self, data, offset, numberio, region)
    monkeypatch.setattr(Clone, "_verify", spy)
    out, _ = await run_job(tmp_path, "[w]\nrw=randwrite\nsize=64k\nbs=4k\nverify=md5\nverify_backlog=8\n"
                                     "ioengine=libaio\niodepth=4\n")
    assert out["jobs"][0]["error"] == 0 and sorted(o for _, o in checked) == list(range(0, 64 << 10, 4096))
    assert 8 <= min(w for w, _ in checked) < 16  # the first read-backs came after 8 writes, before the last


async def test_verify_types_run_clean(tmp_path):
    jobs = "".join(f"[{k}]\nverify={k}\nfilename={k}\n" for k in ("crc64", "md5", "sha256", "crc32c", "xxhash"))
    out, _ = await run_job(tmp_path, "[global]\nrw=randwrite\nsize=32k\nbs=4k\n" + jobs +
                           "[pat]\nverify=meta\nverify_pattern=0xaa555aa5\nverify_interval=512\nfilename=pat\n")
    assert all(j["error"] == 0 and j["write"]["io_bytes"] == 32 << 10 for j in out["jobs"])


@pytest.mark.parametrize("pattern", ["rw=write\nloops=2", "rw=randwrite\nnorandommap", "rw=randwrite\nloops=3"])
async def test_verify_reads_back_the_last_write_where_blocks_of_two_sizes_overlap(tmp_path, pattern):
    """bssplit over a second pass (or without the random map) lands writes across earlier
    ones of another size: fio verifies the newest and drops every write it overlaps; keeping
    the older one read the newer's bytes as its bad block (fio itself runs these clean)."""
    out, _ = await run_job(tmp_path, f"[w]\n{pattern}\nsize=512k\nbssplit=4k/50:64k/50\nverify=crc32c\n")
    assert out["jobs"][0]["error"] == 0


async def test_the_reads_of_a_read_write_mix_are_not_verified(tmp_path):
    """fio verifies what a read-only job reads and, in a job that writes, the verify phase's
    read-backs; a randrw mix's reads land across blocks of other sizes, and checking them
    failed a job fio runs clean."""
    job = "[w]\nrw=randrw\nrwmixread=50\nsize=512k\nloops=2\nbssplit=4k/50:64k/50\nverify=crc32c\n"
    out, _ = await run_job(tmp_path, job)
    assert out["jobs"][0]["error"] == 0 and out["jobs"][0]["read"]["io_bytes"] > 0


BAD = [blk * 4096 + 100 for blk in (10, 20, 30)]  # spoiled bytes in a 1 MiB file of 4 KiB verify blocks


@pytest.mark.parametrize("options, blocks_read, bad", [
    ("", 11, 1),  # fio ends the job at the first bad block (err=84), verify_fatal=0 or not
    ("verify_fatal=1", 11, 1),
    ("continue_on_error=verify", 256, 3),  # goes on, counting them
    ("continue_on_error=verify\nverify_fatal=1", 11, 1),
])
async def test_a_bad_block_ends_a_read_verify_job_as_in_fio(tmp_path, options, blocks_read, bad):
    """A read-only verify job over a file with three spoiled blocks, beside the OS's fio on a
    host file made and spoiled the same way: the bytes read and err= agree (ours read on to
    the end whatever the options, reporting every bad block)."""
    write = "[v]\nrw=write\nbs=4k\nsize=1m\nverify=crc32c\ndo_verify=0\nfilename=v\n"
    read = f"[v]\nrw=read\nbs=4k\nsize=1m\nverify=crc32c\nfilename=v\n{options}\n"
    _, image = await run_job(tmp_path, write)
    async with mount(image) as fs, fs.open("/jobs/v", "r+") as f:
        for off in BAD:
            await f.pwrite(b"\xff" * 16, off)
    (tmp_path / "r.fio").write_text(read)
    job = (await run_workload(str(tmp_path / "r.fio"), image=image, seed=1)).as_json()["jobs"][0]
    ours = (job["read"]["io_bytes"], job["error"], job["blockemu"]["verify_errors"])
    assert ours == (blocks_read * 4096, errno.EILSEQ, bad)
    if FIO:
        host = tmp_path / "host"
        host.mkdir()
        (tmp_path / "w.fio").write_text(write)
        subprocess.run([FIO, str(tmp_path / "w.fio")], cwd=host, capture_output=True, check=True, timeout=60)
        fd = os.open(host / "v", os.O_RDWR)
        for off in BAD:
            os.pwrite(fd, b"\xff" * 16, off)
        os.close(fd)
        done = subprocess.run([FIO, "--output-format=json", str(tmp_path / "r.fio")], cwd=host,
                              capture_output=True, text=True, timeout=60)
        theirs = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
        assert (theirs["read"]["io_bytes"], theirs["error"]) == ours[:2]


@pytest.mark.parametrize("rw, written_order", [("randwrite", True), ("randwrite\nnorandommap", False),
                                               ("randwrite\nrandom_distribution=zipf:1.2", False), ("write", False)])
async def test_the_verify_phase_reads_back_in_fios_order(tmp_path, monkeypatch, rw, written_order):
    """fio's get_next_verify: a job with a random map reads its writes back in the order it
    wrote them (io_hist_list); any other sorts them by offset (io_hist_tree)."""
    wrote: list[int] = []
    read: list[int] = []
    real_record, real_verify = LastWrites.record, Clone._verify

    def record(self, region, offset, length, numberio):
        wrote.append(offset)
        return real_record(self, region, offset, length, numberio)

    def verify(self, data, offset, numberio, region):
        read.append(offset)
        return real_verify(self, data, offset, numberio, region)
    monkeypatch.setattr(LastWrites, "record", record)
    monkeypatch.setattr(Clone, "_verify", verify)
    await run_job(tmp_path, f"[w]\nrw={rw}\nsize=64k\nbs=4k\nverify=crc32c\n")
    last = list(dict.fromkeys(reversed(wrote)))[::-1]  # each offset where it was last written
    assert read == (last if written_order else sorted(last))
    assert last != sorted(last) or rw == "write"  # so the two orders differ


async def test_the_verify_phase_reads_back_in_issue_order_with_iodepth_4(tmp_path, monkeypatch):
    """fio logs a write for verify as it issues it (backend.c, do_io: "Always log IO before
    it's issued, so we know the specific order of it"), so with iodepth > 1 the verify phase
    reads back in the order issued, whatever order the writes completed in. Here each pair of
    writes completes swapped: the first of a pair waits until the second is done."""
    issued: list[int] = []
    completed: list[int] = []
    read: list[int] = []
    done: dict[int, asyncio.Event] = {}
    real_do, real_verify = Clone._do, Clone._verify

    async def do(self, io, data):
        if io.ddir != WRITE:  # reads (the verify phase's among them) as they are
            return await real_do(self, io, data)
        n = len(issued)
        issued.append(io.offset)
        if n % 2 == 0:
            await done.setdefault(n + 1, asyncio.Event()).wait()
        out = await real_do(self, io, data)
        completed.append(io.offset)
        done.setdefault(n, asyncio.Event()).set()
        return out

    def verify(self, data, offset, numberio, region):
        read.append(offset)
        return real_verify(self, data, offset, numberio, region)
    monkeypatch.setattr(Clone, "_do", do)
    monkeypatch.setattr(Clone, "_verify", verify)
    await run_job(tmp_path, "[w]\nrw=randwrite\nsize=64k\nbs=4k\niodepth=4\nioengine=libaio\nverify=crc32c\n")
    assert len(issued) == 16 and completed != issued  # the pairs did complete swapped
    assert read == issued


async def test_a_write_that_fails_is_not_read_back(tmp_path, monkeypatch):
    """Logged as it is issued, a write that then fails goes off the verify list again (fio's
    unlog_io_piece): continue_on_error=write goes past it, and verify must not read back bytes
    that were never written as a bad block."""
    from blockemu.errors import DeviceIOError
    issued: list[int] = []
    read: list[int] = []
    real_do, real_verify = Clone._do, Clone._verify

    async def do(self, io, data):
        if io.ddir != WRITE:
            return await real_do(self, io, data)
        issued.append(io.offset)
        if len(issued) == 5:  # as an engine's EIO: nothing written
            return DeviceIOError("injected write error")
        return await real_do(self, io, data)

    def verify(self, data, offset, numberio, region):
        read.append(offset)
        return real_verify(self, data, offset, numberio, region)
    monkeypatch.setattr(Clone, "_do", do)
    monkeypatch.setattr(Clone, "_verify", verify)
    out, _ = await run_job(tmp_path, "[w]\nrw=randwrite\nsize=64k\nbs=4k\niodepth=4\nioengine=libaio\n"
                                     "verify=crc32c\ncontinue_on_error=write\n")
    assert out["jobs"][0]["total_err"] == 1 and out["blockemu"]["ok"]
    assert read == issued[:4] + issued[5:]


def test_a_write_drops_every_earlier_write_it_overlaps():
    log = LastWrites()
    log.record(0, 0, 65536, 1)
    log.record(0, 65536, 4096, 2)
    log.record(1, 0, 4096, 3)  # another region: untouched
    log.pop((0, 65536))  # read back already
    log.record(0, 61440, 8192, 4)  # reaches into the first write and over where the popped one was
    assert list(log) == [(1, 0), (0, 61440)] and log.by_offset() == [(0, 61440), (1, 0)]
    log.record(0, 57344, 4096, 5)
    log.forget(0, 60000, 4096)  # a trim across both
    assert sorted(log) == [(1, 0)]


# --- engines and options that change nothing here ---------------------------------------------

async def test_engines_depth_and_ignored_options(tmp_path):
    out, _ = await run_job(tmp_path, """[global]
rw=randread
size=256k
[s]
ioengine=psync
iodepth=8
write_bw_log=s
cpus_allowed=0
[a]
ioengine=io_uring
iodepth=8
""")
    s, a = out["jobs"]
    assert s["latency_depth"] == 8 and s["read"]["slat_ns"]["N"] == 0 and s["iodepth_level"]["1"] == 100.0
    assert a["latency_depth"] == 8 and a["read"]["slat_ns"]["N"] == 64 and a["iodepth_level"]["8"] > 0
    assert out["blockemu"]["notes"] == [SYNC_NOTE]
    assert out["blockemu"]["ignored_options"] == {"s": ["cpus_allowed", "write_bw_log"]}


async def test_one_io_in_flight_is_awaited_in_place_and_accounted_as_a_queue_is(tmp_path):
    """A job with one I/O in flight (a sync engine, or any engine at iodepth=1) does each I/O in
    place, as a sync engine's thread does: no asyncio task and wait per I/O (they cost the loop
    several times the 4 KiB write they carried: issue 16). A deeper queue keeps its I/Os in
    flight as tasks. Both are accounted alike: every I/O's latencies, the syncs fsync= asks for,
    and a submission latency for the async engine only, as fio has it."""
    loop = asyncio.get_running_loop()
    made: Counter[str] = Counter()

    def factory(loop, coro, **kw):
        made[getattr(coro, "__qualname__", "")] += 1
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    try:
        out, _ = await run_job(tmp_path, "[global]\nrw=randwrite\nsize=256k\nbs=4k\nfsync=8\n[s]\nioengine=psync\n"
                                         "[one]\nstonewall\nioengine=libaio\n[deep]\nstonewall\nioengine=libaio\n"
                                         "iodepth=4\n")
    finally:
        loop.set_task_factory(None)
    assert made["Clone._do"] == 64  # the deep queue's I/Os, and no other job's
    s, one, deep = out["jobs"]
    for j in (s, one, deep):
        w = j["write"]
        assert w["total_ios"] == w["clat_ns"]["N"] == w["lat_ns"]["N"] == 64 and w["io_bytes"] == 256 << 10
        # fsync=8: a sync before every 9th I/O, so none after the 64th (fio 3.33 counts 7 too)
        assert j["sync"]["total_ios"] == 7 and w["lat_ns"]["min"] >= w["clat_ns"]["min"] > 0
    assert s["write"]["slat_ns"]["N"] == 0 and one["write"]["slat_ns"]["N"] == deep["write"]["slat_ns"]["N"] == 64
    assert s["iodepth_level"]["1"] == one["iodepth_level"]["1"] == 100.0 and deep["iodepth_level"]["4"] > 0


async def test_an_io_done_in_place_reads_the_clock_four_times(tmp_path, monkeypatch):
    """The runner's own work per I/O is what fio's accounting needs: the runtime check and the
    I/O's prep, submission and completion times. Completions are dated for the IOPS samples,
    and the turn-taking judged, by those same readings, not by clock reads of their own (two
    more per I/O before; issue 16: the runner was ~25 % of the fio job's CPU)."""
    import blockemu.workload.fio as fio_module
    reads = Counter()

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        def monotonic(self):
            reads["monotonic"] += 1
            return time.monotonic()

        def perf_counter_ns(self):
            reads["perf_counter_ns"] += 1
            return time.perf_counter_ns()

    monkeypatch.setattr(fio_module, "time", Clock())
    monkeypatch.setattr(fio_module, "SLICE_NS", 1 << 62)  # no turn to take: its one read is not counted here
    out, _ = await run_job(tmp_path, "[w]\nrw=randwrite\nsize=256k\nbs=4k\n")
    w = out["jobs"][0]["write"]
    assert w["total_ios"] == w["clat_ns"]["N"] == 64
    assert sum(reads.values()) <= 4 * 64 + 16, reads


async def test_clones_doing_their_io_in_place_take_turns_on_the_loop(tmp_path, monkeypatch):
    """Clones that await their I/Os in place still run side by side, as fio's threads do: each
    lets the loop in at least every SLICE_NS (here: after every I/O), so no clone does its
    whole job before another starts -- and the filesystem's own tasks, a signal or a script
    job get their turn too."""
    monkeypatch.setattr("blockemu.workload.fio.SLICE_NS", 0)
    order: list[int] = []
    do = Clone._do

    async def recorded(self, io, data):
        order.append(self.n)
        return await do(self, io, data)

    monkeypatch.setattr(Clone, "_do", recorded)
    await run_job(tmp_path, "[w]\nrw=write\nsize=64k\nbs=4k\nnumjobs=2\n")
    assert order == [0, 1] * 16


def test_non_file_engines_and_jobs_they_cannot_run_are_refused_by_name(tmp_path):
    job = tmp_path / "x.fio"
    job.write_text("[a]\nioengine=null\nsize=1m\n[b]\nioengine=cpuio\nhttp_verbose=1\n")
    p = run("run", str(job), check_rc=1)
    assert p.stderr.count("\n") == 1 and "x.fio:2: ioengine=null is not supported" in p.stderr
    assert "x.fio:5: ioengine=cpuio is not supported" in p.stderr
    job.write_text("[t]\nioengine=ftruncate\nrw=read\nsize=1m\n[n]\nrw=read\nwait_for=later\n[later]\nsize=1m\n")
    p = run("run", str(job), "--parse-only", check_rc=1)
    assert "x.fio:1: job t: ioengine=ftruncate only writes" in p.stderr and "x.fio:5: job n: size= is needed" in p.stderr
    assert "x.fio:5: job n: wait_for=later names no earlier job" in p.stderr


async def test_size_comes_from_existing_files_and_poisson_rate(tmp_path):
    out, _ = await run_job(tmp_path, "[w]\nrw=write\nfilename=data\nsize=96k\n"
                                     "[r]\nstonewall\nrw=read\nfilename=data\nrate_iops=400\nrate_process=poisson\n")
    w, r = out["jobs"]
    assert r["read"]["io_bytes"] == 96 << 10 and r["read"]["total_ios"] == 24
    assert r["job_runtime"] >= 20  # 24 arrivals at 400/s: about 60 ms
    (tmp_path / "n.fio").write_text("[r]\nrw=read\nfilename=nothing\n")
    report = await run_workload(str(tmp_path / "n.fio"), image=str(tmp_path / "n.img"), seed=1)
    assert report.failures == ["r: job r: size= is needed (/jobs/nothing does not exist to take it from); "
                               "give it in the job file or with --size (err=22)"]


async def test_rate_caps_bandwidth_and_rate_min_is_judged(tmp_path):
    path = tmp_path / "r.fio"
    path.write_text("[capped]\nrw=read\nsize=64k\nrate=256k\nrate_min=1m\n[synced]\nrw=write\nsize=16k\nsync=1\n")
    report = await run_workload(str(path), image=str(tmp_path / "r.img"), seed=1)
    capped = report.as_json()["jobs"][0]
    assert capped["job_runtime"] >= 180 and capped["read"]["bw"] <= 300  # 64 KiB at 256 KiB/s: ~250 ms
    (failure,) = report.failures
    assert failure.startswith("capped: read bandwidth ") and failure.endswith(" B/s is below rate_min 1048576")


@pytest.mark.parametrize("what", ["group", "all"])
async def test_exitall_ends_its_group_or_the_run(tmp_path, what):
    out, _ = await run_job(tmp_path, f"[short]\nrw=read\nsize=64k\nexitall\nexit_what={what}\n"
                                     "[long]\nrw=randread\nsize=64k\ntime_based\nruntime=600\n"
                                     "[later]\nstonewall\nrw=read\nsize=64k\n")
    short, long_, *later = out["jobs"]
    assert short["read"]["io_bytes"] == 64 << 10 and long_["job_runtime"] < 60_000
    assert len(later) == (1 if what == "group" else 0)  # fio's default ends the group, the next one runs


async def test_thinktime_caps_depth_and_block_alignment(tmp_path):
    offs = {o for _, o, _ in ios("[j]\nrw=randread\nnorandommap\nsize=1m\nbs=4k\nba=64k\nnumber_ios=50\n")}
    assert all(o % 65536 == 0 for o in offs)
    # an empty field is that direction's bs, as fio leaves it unset (it was None: a TypeError traceback)
    offs = {o for _, o, _ in ios("[j]\nrw=randwrite\nnorandommap\nsize=1m\nbs=16k\nba=,,64k\nnumber_ios=50\n")}
    assert all(o % 16384 == 0 for o in offs) and any(o % 65536 for o in offs)
    out, _ = await run_job(tmp_path, "[t]\nrw=read\nsize=16k\nbs=4k\nthinktime=50ms\nthinktime_blocks=2\n"
                                     "ioengine=libaio\niodepth=8\nstartdelay=0.1\n")
    t = out["jobs"][0]
    assert t["job_runtime"] >= 100 and t["iodepth_level"]["2"] == 100.0 - t["iodepth_level"]["1"]
    assert out["blockemu"]["notes"] == []  # an async engine capped by thinktime is not a sync one


async def test_an_io_error_ends_the_job_with_fio_err_and_still_reports(tmp_path):
    path = tmp_path / "e.fio"
    path.write_text("[f]\nkind=faults\nfaults=eio=0-1G:w\n[w]\nstonewall\nrw=write\nsize=64k\nend_fsync=1\nnumjobs=2\n")
    report = await run_workload(str(path), image=str(tmp_path / "e.img"), seed=1)
    out = report.as_json()
    w = [j for j in out["jobs"] if j["jobname"] == "w"]
    # the clone that first meets the failing device (EIO -- either: they run at once) aborts the
    # transaction; the other's fsync then finds the mount read-only (EROFS, as btrfs after an abort)
    eio, erofs = sorted(w, key=lambda j: j["error"])
    assert [eio["error"], erofs["error"]] == [5, 30] and all(j["write"]["io_bytes"] == 64 << 10 for j in w)
    assert "injected I/O error" in eio["blockemu"]["error"]
    assert "read-only after an aborted transaction" in erofs["blockemu"]["error"]
    jobs = [f for f in report.failures if f.startswith("w: ")]  # and unmount's, read-only after the abort
    assert jobs and all("(err=5)" in f or "(err=30)" in f for f in jobs) and report.fsck_clean


def test_steady_state_is_judged_on_a_rolling_window_of_one_second_samples():
    job = parse("[j]\nss=iops:10%\nss_dur=3\nss_ramp=0.5\n", "t.fio").jobs[0]
    w = SteadyWatch(job.get("steadystate"), job.get("steadystate_duration"), job.get("steadystate_ramp_time"))
    w.start(100.0)
    assert not w.tick(100.2, 10, 0)  # still in ss_ramp: nothing sampled
    ios = 50
    for t, per_second in ((101.5, 100), (102.5, 100), (103.5, 150), (104.5, 100), (105.5, 100)):
        ios += per_second
        assert not w.tick(t, ios, ios * 4096)
    assert w.iops == [150, 100, 100] and not w.attained  # 150 is 29% off the mean
    ios += 100
    assert w.tick(106.5, ios, ios * 4096) and w.as_json()["attained"] == 1
    assert w.as_json()["ss"] == "iops:10.000000%" and w.as_json()["data"]["iops"] == [100, 100, 100]
    rising = SteadyWatch(parse("[j]\nss=bw_slope:1%\n", "t.fio").jobs[0].get("steadystate"), 3, 0)
    rising.start(0.0)
    rising.tick(0.0, 0, 0)
    total = 0
    for t in range(1, 6):
        total += t * 1000
        assert not rising.tick(float(t), t, total)  # bandwidth keeps growing: no steady state
    assert rising.slope == 1000.0


async def test_flow_keeps_jobs_in_proportion_to_their_weights(tmp_path):
    out, _ = await run_job(tmp_path, "[global]\nfilename=shared\nsize=256k\ntime_based\nruntime=0.3\n"
                                     "[heavy]\nrw=randread\nflow=3\n[light]\nrw=read:-8k\nflow=-1\n")
    heavy, light = (j["read"]["total_ios"] for j in out["jobs"])
    # while both run, light gets a quarter of the I/Os; whichever job's clock started first ends
    # first, and the other then runs unheld for the difference, so only the lower bound is firm
    assert light > 0 and heavy / light > 2.5


def test_latency_target_searches_the_deepest_queue_that_meets_it():
    job = parse("[j]\nlatency_target=250\nlatency_window=1s\nlatency_percentile=90\n", "t.fio").jobs[0]
    lt = LatencyTarget(job, 16)
    lt.start(0.0)
    trail = []
    for window, late in enumerate((0, 0, 5, 0, 0, 0)):  # 10 I/Os a window, `late` of them over 250 us
        for i in range(10):
            fresh = lt.complete(window + (i + 1) / 10, 300_000 if i < late else 100_000)
        trail.append((lt.qd, fresh, lt.done))
    assert trail == [(2, False, False), (4, False, False), (3, False, False), (3, True, False),
                     (3, False, True), (3, False, True)]  # 1 -> 2 -> 4 fails -> 3 holds: a final window, done
    assert (lt.target_ns, lt.window_us, lt.percentile) == (250_000, 1_000_000, 90.0)


async def test_latency_target_and_max_latency_in_a_run(tmp_path):
    out, _ = await run_job(tmp_path, "[t]\nrw=randread\nsize=256k\nioengine=io_uring\niodepth=8\n"
                                     "latency_target=10s\nlatency_window=20ms\ntime_based\nruntime=5\n")
    t = out["jobs"][0]
    assert t["latency_depth"] == 8 and t["latency_target"] == 10_000_000_000 and t["job_runtime"] < 4000
    path = tmp_path / "m.fio"
    path.write_text("[m]\nrw=write\nsize=64k\nsync=1\nmax_latency=1us\n")
    report = await run_workload(str(path), image=str(tmp_path / "m.img"), seed=1)
    (m,) = report.as_json()["jobs"]
    assert m["error"] == 110 and m["write"]["total_ios"] == 1 and "max_latency exceeded" in report.failures[0]


# --- output -----------------------------------------------------------------------------------

async def test_json_layout_clones_groups_and_idle_directions(tmp_path):
    out, _ = await run_job(tmp_path, """[global]
size=64k
[w]
rw=write
numjobs=2
[g]
stonewall
rw=read
numjobs=3
group_reporting
""")
    w1, w2, g = out["jobs"]
    assert (w1["jobname"], w2["jobname"], g["jobname"], g["groupid"]) == ("w", "w", "g", 1)
    assert g["read"]["io_bytes"] == 3 * (64 << 10) and g["job options"] == {"rw": "read", "numjobs": "3"}
    assert out["global options"] == {"size": "64k"} and {"timestamp", "time", "fio version"} <= set(out)
    assert w1["read"]["io_bytes"] == 0 and w1["read"]["runtime"] == 0 and "percentile" not in w1["read"]["clat_ns"]
    assert w1["write"]["clat_ns"]["percentile"]["99.000000"] >= w1["write"]["clat_ns"]["percentile"]["50.000000"]
    assert w1["write"]["lat_ns"]["N"] == 16 and w1["trim"]["total_ios"] == 0


async def test_layout_and_ramp_time_are_not_measured(tmp_path):
    out, _ = await run_job(tmp_path, """[layout]
rw=read
size=16m
number_ios=1
[ramp]
rw=randread
size=64k
time_based
ramp_time=0.3
runtime=0.3
""")
    lay, ramp = out["jobs"]
    assert lay["read"]["total_ios"] == 1 and lay["job_runtime"] < 100  # laying out 16 MiB is not in it
    assert 250 <= ramp["job_runtime"] < 500  # the 300 ms of ramp are not in it either


async def test_loops_with_verify_read_back_each_loop(tmp_path):
    """fio 3.33 runs do_verify after each loop (thread_main, once per keep_running pass): with
    ``rw=randwrite size=1m loops=2 verify=crc32c`` it reads back 2 MiB, 512 reads, and with
    ``rw=write loops=3 iodepth=8`` 768. blockemu wrote all loops, then verified once: 256 reads."""
    out, _ = await run_job(tmp_path, "[w]\nrw=randwrite\nbs=4k\nsize=64k\nloops=2\nverify=crc32c\n"
                                     "[s]\nstonewall\nrw=write\nbs=4k\nsize=64k\nloops=3\nverify=md5\n"
                                     "ioengine=libaio\niodepth=8\n")
    w, seq = out["jobs"]
    assert (w["read"]["total_ios"], w["write"]["total_ios"]) == (32, 32)
    assert (seq["read"]["total_ios"], seq["write"]["total_ios"]) == (48, 48)


async def test_io_size_past_size_runs_passes_of_size_counting_the_read_backs(tmp_path):
    """fio 3.33 (backend.c) caps each pass at ``size`` (do_io's total_bytes) and, after
    ``loops`` passes, runs another while the job has moved less than ``io_size``, its verify
    reads counted (keep_running on io_bytes). Real fio on a host directory, ``rw=write bs=4k
    size=64k io_size=128k``: ``loops=2`` writes 32; ``verify=crc32c`` 16 and 16; ``loops=2
    verify`` 32 and 32; ``io_size=256k loops=2`` 64. blockemu wrote ``io_size`` times
    ``loops``: 64, 32/16, 64/32 and 128."""
    job = "[j]\nrw={rw}\nbs=4k\nsize=64k\nio_size={io}\n{more}\n"
    assert len(ios(job.format(rw="write", io="128k", more="loops=2"))) == 32
    assert len(ios(job.format(rw="randwrite", io="256k", more="loops=2"))) == 64
    assert len(ios(job.format(rw="randwrite", io="256k", more="norandommap"))) == 64  # a pass is io_size
    out, _ = await run_job(tmp_path, "".join(f"[{n}]\n" + job.format(rw=rw, io="128k", more=more)[4:]
                                             for n, rw, more in [("a", "write", "verify=crc32c"),
                                                                 ("b", "randwrite", "loops=2\nverify=md5")]))
    assert [(j["write"]["total_ios"], j["read"]["total_ios"]) for j in out["jobs"]] == [(16, 16), (32, 32)]


async def test_the_read_back_between_loops_is_the_verifys_and_restarts_the_backlog(tmp_path, monkeypatch):
    """fio's do_verify between loops empties io_hist, so verify_backlog counts its writes
    afresh (``size=64k bs=4k loops=2 verify_backlog=5``: the first check of loop 2 after its
    5th write, at 84 KiB written); blockemu's pending list kept loop 1's last write and fired
    after 4 (80 KiB). And those read-backs are the verify's, not the job's reads: a read-side
    ``rate_iops_min`` failed a write job that only verifies, which fio does not judge."""
    at: list[int] = []
    real = Clone._backlog

    async def spy(self: Clone) -> None:
        at.append(self.bytes_done >> 10)
        await real(self)

    monkeypatch.setattr(Clone, "_backlog", spy)
    out, _ = await run_job(tmp_path, "[w]\nrw=write\nbs=4k\nsize=64k\nloops=2\nverify=crc32c\nverify_backlog=5\n"
                                     "[r]\nstonewall\nrw=write\nbs=4k\nsize=64k\nloops=3\nverify=crc32c\n"
                                     "rate_iops_min=100000000,0\n")
    assert at == [20, 40, 60, 84, 104, 124]
    assert [j["read"]["total_ios"] for j in out["jobs"]] == [32, 48]


async def test_number_ios_counts_every_loop_and_the_read_backs(tmp_path):
    """fio 3.33's exceeds_number_ios stops a job at ``number_ios`` times ``loops`` I/Os, the
    verify reads among them (io_blocks counts every completion). Real fio on a host directory,
    ``rw=write bs=4k``: ``size=64k number_ios=10 loops=2`` writes 20; ``size=256k number_ios=20
    loops=3 verify=crc32c`` writes and reads back 60; ``size=64k number_ios=10 loops=3 verify``
    16 and 16 (loop 1 and its read-back make 32, past 30); ``size=256k number_ios=20
    verify_backlog=4`` 12 and 12. blockemu stopped at number_ios, whatever loops said, and left
    the read-backs out: 10, 20/20, 10/10, 20/20."""
    out, _ = await run_job(tmp_path, "[global]\nrw=write\nbs=4k\n[a]\nsize=64k\nnumber_ios=10\nloops=2\n"
                                     "[b]\nsize=256k\nnumber_ios=20\nloops=3\nverify=crc32c\n"
                                     "[c]\nsize=64k\nnumber_ios=10\nloops=3\nverify=crc32c\n"
                                     "[d]\nsize=256k\nnumber_ios=20\nverify=crc32c\nverify_backlog=4\n")
    assert [(j["read"]["total_ios"], j["write"]["total_ios"]) for j in out["jobs"]] == \
        [(0, 20), (60, 60), (16, 16), (12, 12)]


async def test_sequential_file_service_goes_through_the_files_each_loop(tmp_path):
    """fio 3.33 (write_iolog, host directory) with ``nrfiles=2 file_service_type=sequential
    loops=2`` writes file 0, file 1, file 0, file 1; blockemu split the whole budget, all
    loops, between the files: file 0 twice, then file 1 twice. With verify, each loop's
    read-back then found one file's blocks only: 32 reads where fio reads back 64. A
    time_based job goes round the files too (fio: 0, 0, 1, 1, 0, 0, ...); blockemu stayed on
    the last file once the size was done."""
    job = "[a]\nrw=write\nbs=16k\nsize=128k\nnrfiles=2\nfile_service_type=sequential\nloops=2\n"
    assert [(f[-1], o // 16384) for f, o, _ in ios(job)] == [
        (f, b) for _ in range(2) for f in "01" for b in range(4)]
    timed = parse(job.replace("loops=2", "time_based\nruntime=60"), "t.fio").jobs[0]
    clone = Clone(RunContext(None, "/jobs"), timed, 0, 1, JobResult(timed.name, 0))  # type: ignore[arg-type]
    assert "".join(clone.next_io().region.path[-1] for _ in range(24)) == "0000111100001111" + "00001111"
    out, _ = await run_job(tmp_path, job.replace("bs=16k", "bs=4k") + "verify=crc32c\n")
    assert (out["jobs"][0]["read"]["total_ios"], out["jobs"][0]["write"]["total_ios"]) == (64, 64)


async def test_the_read_back_between_loops_stops_at_the_runtime(tmp_path, monkeypatch):
    """fio's do_verify stops at runtime_exceeded, between loops as after the last; the
    read-back between loops (9d1f4a4) was given no deadline, so a job with ``runtime`` could
    read back a whole loop past it. Each read-back is now bounded by the job's runtime."""
    untils: list[float] = []
    real = Clone._verify_written

    async def spy(self: Clone, keys: list[tuple[int, int]], until: float = 0.0) -> None:
        untils.append(until)
        await real(self, keys, until)

    monkeypatch.setattr(Clone, "_verify_written", spy)
    out, _ = await run_job(tmp_path, "[w]\nrw=write\nbs=4k\nsize=64k\nloops=3\nverify=crc32c\nruntime=60\n")
    assert out["jobs"][0]["read"]["total_ios"] == 48
    assert len(untils) == 3 and all(untils), untils


async def test_ramp_time_io_counts_towards_a_jobs_size(tmp_path):
    """fio 3.33 ends ramp_time with reset_all_stats, which leaves io_issue_bytes alone: a job
    sized by ``size`` does that many bytes in all, and the ramp's are not measured
    (``rw=write size=1m bs=4k ramp_time=100ms rate_iops=1000``: 155 writes reported). blockemu
    started the budget afresh, so it wrote ``size`` more after the ramp and reported all 256.
    The first write is issued before the ramp can end, so at least one is never measured."""
    out, _ = await run_job(tmp_path, "[w]\nrw=write\nsize=64k\nbs=4k\nramp_time=30ms\nrate_iops=200\n")
    assert 0 < out["jobs"][0]["write"]["total_ios"] < 16


@pytest.mark.parametrize("grouped", [False, True], ids=["numjobs=2", "numjobs=2 group_reporting"])
def test_the_normal_output_announces_clones_as_fio_does(tmp_path, grouped):
    """fio 3.33 marks a job's clones with a "..." line under its description line and counts
    "Starting 2 processes" -- with group_reporting too, where one result stands for both and the
    line read "Starting 2 process"."""
    job = tmp_path / "c.fio"
    job.write_text("[w]\nrw=randwrite\nsize=16k\nbs=4k\nnumjobs=2\n" + "group_reporting\n" * grouped)
    lines = run("run", str(job), "--seed", "3").stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("w: (g=0): rw=randwrite"))
    assert lines[at + 1] == "..." and "Starting 2 processes" in lines, lines[:6]


def test_figures_are_written_as_fio_writes_them():
    """The text output wrote sizes, rates and counts with 3 significant figures where fio 3.33's
    num2str gives 4 (``16MiB`` for fio's ``16.0MiB``, ``2.1MiB/s`` for ``2148KiB/s``, ``4.5k``
    IOPS for ``4541``), and chose a latency line's unit by its maximum alone, so a 34 ms worst
    case printed ``slat (msec): min=0, max=34, avg=0.01`` where fio keeps nanoseconds unless
    the minimum, the maximum and the spread all call for more. The expected strings are real
    fio 3.33's, from runs on a host directory (and fio's show_clat_percentiles)."""
    cases = [((16 << 20, 4, True, "B"), "16.0MiB"), ((16383 << 10, 4, True, "B"), "16.0MiB"),
             ((32768, 4, True, "B"), "32.0KiB"), ((32768, 4, False, "B"), "32.8kB"),
             ((2_200_000, 4, True, "B/s"), "2148KiB/s"), ((4541,), "4541"), ((12_345,), "12.3k"),
             ((23_056_123, 6), "23056k"), ((458_752, 4, True, "B"), "448KiB"), ((0,), "0")]
    assert [num2str(*args) for args, _ in cases] == [want for _, want in cases]
    fast_min = [635, 2_000, 5_000, 23_056_123]  # a fast minimum keeps nanoseconds
    assert _lat_line("    clat", _lat_json(fast_min, None)).startswith("    clat (nsec): min=635, max=23056k, avg=")
    assert _lat_line("    slat", _lat_json([3_100, 4_000, 1_872_000], None)).startswith("    slat (usec): min=3, max=1872, avg=")
    assert _lat_line("     lat", _lat_json([3_000_000, 250_000_000], None)).startswith("     lat (msec): min=3, max=250, avg=")
    pct = {"1.000000": 11_584, "50.000000": 12_608, "99.990000": 58_112}
    assert _percentile_lines("clat", pct) == ["    clat percentiles (nsec):",
                                              "     |  1.00th=[11584], 50.00th=[12608], 99.99th=[58112]"]
    pct = {"1.000000": 137_000, "99.990000": 22_911_001}  # rounded up to the unit, as fio does
    assert _percentile_lines("clat", pct)[1] == "     |  1.00th=[  137], 99.99th=[22912]"


def test_text_output_shows_every_percentile_kind_asked_for(tmp_path):
    """``lat_percentiles=1``/``slat_percentiles=1`` put their percentiles in the JSON, but the
    normal output showed only clat's, and wrote ``percentile_list=50:99`` as ``50.00th`` where
    fio 3.33 writes ``50th`` (its precision is the list's most precise value). Real fio 3.33 on
    a host directory, same job: ``slat``, ``clat``, then ``lat percentiles`` blocks."""
    assert _percentile_lines("lat", {"50.000000": 1_656, "99.000000": 16_192}, 0) == [
        "    lat percentiles (nsec):", "     |  50th=[ 1656],  99th=[16192]"]
    assert _percentile_lines("clat", {"50.000000": 1_624, "99.500000": 6_368}, 1)[1] == \
        "     | 50.0th=[ 1624], 99.5th=[ 6368]"
    job = tmp_path / "p.fio"
    job.write_text("[a]\nioengine=libaio\niodepth=4\nrw=randwrite\nbs=4k\nsize=64k\n"
                   "lat_percentiles=1\nslat_percentiles=1\npercentile_list=50:99\n")
    text = run("run", str(job), "--seed", "3").stdout
    kinds = re.findall(r"^    (\w+) percentiles \((?:n|u|m)sec\):\n     \|  50th=", text, re.M)
    assert kinds == ["slat", "clat", "lat"]


def test_percentile_precision_is_as_the_list_was_written(tmp_path):
    """fio 3.33 takes percentile_precision from percentile_list's text, trailing zeros
    included, and fits (73 columns) / (precision + 10 + width) percentiles to a line. Real fio
    on a host directory: ``percentile_list=50.00:99`` writes ``50.00th=[...], 99.00th=[...]``
    (blockemu wrote ``50th``, the precision read back from the values), and
    ``10.5:20:30:50.1234:90:99:99.9:99.99`` three to a line, ``10.5000th=[ 1384], 20.0000th=...``
    (blockemu put four, sized for two decimals)."""
    assert parse("[j]\nrw=write\nsize=64k\npercentile_list=50.00:99\n", "t.fio").jobs[0].get(
        "percentile_list").precision == 2
    pct = {f"{p:.6f}": 1_384 + i for i, p in enumerate((10.5, 20, 30, 50.1234, 90, 99, 99.9, 99.99))}
    assert _percentile_lines("clat", pct, 4)[1:] == [
        "     | 10.5000th=[ 1384], 20.0000th=[ 1385], 30.0000th=[ 1386],",
        "     | 50.1234th=[ 1387], 90.0000th=[ 1388], 99.0000th=[ 1389],",
        "     | 99.9000th=[ 1390], 99.9900th=[ 1391]"]
    job = tmp_path / "p.fio"
    job.write_text("[a]\nrw=randwrite\nbs=4k\nsize=64k\npercentile_list=50.00:99\n")
    text = run("run", str(job), "--seed", "3").stdout
    assert re.search(r"^     \| 50\.00th=\[ *\d+\], 99\.00th=\[ *\d+\]$", text, re.M), text


def test_output_formats_and_failures_on_stderr(tmp_path):
    job = tmp_path / "o.fio"
    job.write_text("[w]\nrw=randwrite\nsize=64k\nbs=4k\n")
    both = run("run", str(job), "--seed", "3", "--output-format", "terse,json+").stdout
    terse, _, js = both.partition("\n")
    fields = terse.split(";")
    assert fields[0] == "3" and fields[2] == "w" and len(fields) == 130  # fio 3.33's v3 fields
    disk = fields[121:]  # the disk stats end the line as fio's do: the image, its requests, util
    assert disk[0].endswith(".img") and int(disk[2]) > 0 and disk[8].endswith("%")
    assert disk[1:8] == [str(v) for v in list(json.loads(js)["disk_util"][0].values())[1:8]]
    assert sum(json.loads(js)["jobs"][0]["write"]["clat_ns"]["bins"].values()) == 16
    job.write_text("[w]\nrw=randwrite\nsize=64k\nbs=4k\ndescription=my job\ncontinue_on_error=all\n")
    both = run("run", str(job), "--seed", "3", "--output-format", "terse,json").stdout
    terse, _, js = both.partition("\n")
    assert terse.split(";")[130:] == ["0", "0", "my job"]  # then the error count, first error, description
    assert json.loads(js)["jobs"][0]["desc"] == "my job"
    text = run("run", str(job), "--seed", "3", "--size", "32k").stdout
    assert "w: (groupid=0, jobs=1): err= 0" in text and re.search(r"clat percentiles \((n|u|m)sec\):", text)
    assert "\n  Description  : [my job]\n" in text
    assert "WRITE: bw=" in text and "io=32.0KiB (32.8kB)" in text  # fio 3.33's figures (real fio's, same job)
    # fio 3.33 ends every write line so, zoned or not
    assert any(line.startswith("  write: IOPS=") and line.endswith("; 0 zone resets") for line in text.splitlines())
    job.write_text("[f]\nrw=write\nfilesize=1g\nbs=4k\n")  # sized by filesize= only (mobile-storage.fio)
    text = run("run", str(job), "--seed", "3", "--size", "32k").stdout
    assert "io=32.0KiB (32.8kB)" in text  # --size caps it: it used to lay out 1 GiB
    job.write_text("[s]\nkind=script\nscript=tests.scripted:no_such_function\n")
    p = run("run", str(job), "--seed", "3", "--output-format", "json", check_rc=1)
    assert json.loads(p.stdout)["blockemu"]["failures"]
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("blockemu: run: s: job s: cannot load")
    # a script that raises (its bug, or a function of other arguments) was a traceback that ended the run
    job.write_text("[s]\nkind=script\nscript=tests.scripted:divide_by_zero\n")
    p = run("run", str(job), "--seed", "3", check_rc=1)
    assert p.stderr == ("blockemu: run: s: job s: script tests.scripted:divide_by_zero raised ZeroDivisionError: "
                        f"integer division or modulo by zero (reproduce with: blockemu run {job} --seed 3; add --image "
                        "PATH to keep the image)\n")


def test_sigint_stops_the_jobs_and_reports_partial_results(tmp_path):
    job = tmp_path / "long.fio"
    job.write_text("[long]\nrw=randread\nsize=64k\ntime_based\nruntime=600\n"
                   "[kill]\nkind=script\nscript=tests.scripted:interrupt_when_laid_out\n")
    with sigint_as_a_terminal_gives():
        p = run("run", str(job), "--output-format", "json", check_rc=130)
    out = json.loads(p.stdout)
    assert out["blockemu"]["interrupted"] == "SIGINT" and out["blockemu"]["fsck_clean"]
    assert out["jobs"][0]["jobname"] == "long" and out["jobs"][0]["job_runtime"] < 60_000


async def test_sigint_during_the_layout_stops_it(tmp_path, monkeypatch):
    """A job that reads lays its file out first (64 MiB here, 128 GiB in fio's
    enospc-pressure.fio); SIGINT or SIGTERM then stops the layout, as fio's ``td->terminate``
    does, rather than acting only once every byte is written (98 s for a 3 GiB layout)."""
    from blockemu.workload.runner import Runner
    handled = asyncio.Event()
    real_interrupt, real_pwrite = Runner.interrupt, File.pwrite
    writes = 0

    def interrupt(self, signum):
        real_interrupt(self, signum)
        handled.set()

    async def pwrite(self, data, offset):
        nonlocal writes
        writes += 1
        if writes == 4:  # a few chunks in: the user presses Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            await handled.wait()  # the loop has run the handler before the layout goes on
        return await real_pwrite(self, data, offset)
    monkeypatch.setattr(Runner, "interrupt", interrupt)
    monkeypatch.setattr(File, "pwrite", pwrite)
    job = tmp_path / "lay.fio"
    job.write_text("[lay]\nrw=randread\nsize=64m\nbs=4k\n")
    with sigint_as_a_terminal_gives():
        report = await run_workload(str(job), image=str(tmp_path / "lay.img"), seed=1)
    out = report.as_json()
    assert out["blockemu"]["interrupted"] == "SIGINT" and out["blockemu"]["fsck_clean"]
    assert writes == 4 and out["jobs"][0]["read"]["total_ios"] == 0  # no more layout, and no I/O after it



def test_run_workload_leaves_an_applications_signals_alone(tmp_path):
    """run_workload is library code: a SIGTERM handler the application installed is still
    its own after a run (the run left SIG_DFL behind, and the application's next SIGTERM
    killed it), and a run from a thread other than the main one works (it raised asyncio's
    RuntimeError: set_wakeup_fd only works in main thread)."""
    import threading
    job = tmp_path / "j.fio"
    job.write_text("[j]\nrw=write\nsize=64k\nbs=16k\n")
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with sigint_as_a_terminal_gives():  # free, so the run takes it: and puts it back
            report = asyncio.run(run_workload(str(job), image=str(tmp_path / "a.img"), seed=1))
            assert report.ok and signal.getsignal(signal.SIGTERM) is handler
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGTERM)
        signal.getsignal(signal.SIGTERM)  # a few bytecodes: Python runs the handler before this returns
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    outcome: list[object] = []

    def in_a_thread():
        try:
            outcome.append(asyncio.run(run_workload(str(job), image=str(tmp_path / "b.img"), seed=1)).ok)
        except BaseException as e:  # noqa: BLE001 -- handed to the test's thread
            outcome.append(e)
    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    assert outcome == [True]


# --- fio's own kinds of example jobs, and fio itself as the oracle ----------------------------

EXPECTED_ENTRIES = {"rand-rw": 4, "seq-rw": 4, "ssd-test": 4, "tiobench": 4, "depths": 3, "clients": 3,
                    "ftruncate": 2, "surface": 2, "waitfor": 2, "butterfly": 2, "fill": 2, "punch-race": 4,
                    "dedupe": 2, "shares": 3, "zbd-seq-read": 2}


@pytest.mark.parametrize("name", sorted(p.stem for p in JOBS.glob("*.fio")))
async def test_example_style_jobs_run_unmodified(tmp_path, name):
    """Job files in the style of fio's examples, shortened only by --size/--runtime overrides."""
    report = await run_workload(str(JOBS / f"{name}.fio"), image=str(tmp_path / "e.img"), seed=1,
                                overrides={"size": 256 << 10, "runtime": 0.2})
    out = report.as_json()
    assert out["blockemu"]["ok"], out["blockemu"]["failures"]
    assert len(out["jobs"]) == EXPECTED_ENTRIES.get(name, 1)
    assert all(j["read"]["io_bytes"] + j["write"]["io_bytes"] + j["trim"]["io_bytes"] > 0 and j["error"] == 0
               for j in out["jobs"])


def keypaths(obj: Any, at: str = "") -> set[str]:
    """Every key's path; a histogram's bins are data (latencies), not layout."""
    if isinstance(obj, dict):
        return {f"{at}/{k}" for k in obj} | {p for k, v in obj.items() if k != "bins" for p in keypaths(v, f"{at}/{k}")}
    if isinstance(obj, list):
        return {p for v in obj for p in keypaths(v, f"{at}/[]")}
    return set()


async def test_disk_util_counts_the_images_device_over_the_runs_mounts(tmp_path):
    """fio's disk_util is the image's device, counted as a disk's /sys/block stat: 16 writes each
    fsynced (a FUA superblock each: write_ios), then a kind=fsck job -- the run unmounts and
    mounts again -- and a read job on a cold cache (device reads, on the second mount)."""
    out, image = await run_job(tmp_path, """[w]
rw=write
size=64k
bs=4k
fsync=1
[check]
stonewall
kind=fsck
[r]
stonewall
rw=read
size=64k
bs=4k
""")
    [disk] = out["disk_util"]
    assert list(disk) == ["name", "read_ios", "write_ios", "read_merges", "write_merges", "read_ticks", "write_ticks",
                          "in_queue", "util"]
    assert disk["name"] == "j.img" and disk["read_merges"] == disk["write_merges"] == 0
    assert disk["write_ios"] >= 16 and disk["read_ios"] >= 1, disk
    assert disk["in_queue"] >= disk["read_ticks"] + disk["write_ticks"] and 0 < disk["util"] <= 100, disk
    async with mount(image) as fs:  # what one mount's device counts, to compare with the two the run had
        async with fs.open("/jobs/r.0.0") as f:
            await f.read()
        reads_of_one_mount = fs.vol.device.stats.ops["read"]
    assert disk["read_ios"] > reads_of_one_mount > 0, (disk, reads_of_one_mount)


async def test_the_normal_output_ends_fios_way_with_the_disk_stats_of_the_json(tmp_path):
    """fio's normal output ends with ``Disk stats (read/write):`` and a line per disk; ours had
    the JSON's disk_util only. The text's numbers are the JSON's, after the last group's lines."""
    path = tmp_path / "j.fio"
    path.write_text("[w]\nrw=write\nsize=64k\nbs=4k\nfsync=1\n")
    report = await run_workload(str(path), image=str(tmp_path / "j.img"), seed=1)
    [disk] = report.as_json()["disk_util"]
    lines = report.text("normal")
    at = lines.index("Disk stats (read/write):")
    assert lines[at - 2].startswith("  WRITE: bw=") and lines[at - 1] == ""  # after fio's "Run status group"
    m = re.fullmatch(r"  (\S+): ios=(\d+)/(\d+), merge=(\d+)/(\d+), ticks=(\d+)/(\d+), in_queue=(\d+), "
                     r"util=(\d+\.\d\d)%", lines[at + 1])
    assert m, lines[at + 1]
    assert m[1] == disk["name"] == "j.img" and [int(v) for v in m.groups()[1:8]] == [
        disk[k] for k in ("read_ios", "write_ios", "read_merges", "write_merges", "read_ticks", "write_ticks",
                          "in_queue")]
    assert m[9] == f"{disk['util']:.2f}" and disk["write_ios"] >= 16


def same_layout(ours: dict, theirs: dict) -> tuple[set[str], set[str]]:
    """Both reports' key paths, to compare: ours without the ``blockemu`` objects, and without
    ``disk_util`` where fio found no block device under the job's directory (a tmpfs) and
    reported none."""
    mine = {p for p in keypaths(ours) if "/blockemu" not in p}
    if not theirs["disk_util"]:
        mine = {p for p in mine if not p.startswith("/disk_util/")}
    return mine, keypaths(theirs)


@pytest.mark.skipif(FIO is None, reason="the OS's fio is not installed (apt-get install fio; .ci/run does)")
def test_json_keys_match_the_real_fio(tmp_path):
    """The same job file through the OS's fio (on a host directory) and through blockemu: every
    key fio writes is where fio writes it; ours add only the ``blockemu`` objects."""
    job = tmp_path / "c.fio"
    job.write_text(f"""[global]
ioengine=psync
size=128k
bs=4k
directory={tmp_path}
[w]
rw=randwrite
numjobs=2
continue_on_error=write
[r]
stonewall
rw=randread
ioengine=libaio
iodepth=4
[m]
stonewall
rw=randrw
numjobs=2
group_reporting
fsync=4
""")
    for fmt in ("json", "json+"):
        fio = subprocess.run([FIO, f"--output-format={fmt}", str(job)], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert fio.returncode == 0, fio.stderr
        theirs = json.loads(fio.stdout[fio.stdout.index("{"):])  # fio may print notes before the JSON
        ours = json.loads(run("run", str(job), "--output-format", fmt, "--seed", "1").stdout)
        assert [j["jobname"] for j in ours["jobs"]] == [j["jobname"] for j in theirs["jobs"]]
        mine, fios = same_layout(ours, theirs)
        assert mine == fios, (mine ^ fios)
        assert [type(v) for v in ours["disk_util"][0].values()] == [type(v) for v in theirs["disk_util"][0].values()] \
            if theirs["disk_util"] else ours["disk_util"]
        assert ours["jobs"][0]["job options"] == theirs["jobs"][0]["job options"]
        assert ours["global options"] == theirs["global options"]


SYNC_AND_VERIFY_JOBS = """[global]
ioengine=psync
rw=write
bs=4k
[verify]
size=64k
verify=crc32c
[backlog]
size=64k
rw=randwrite
verify=md5
verify_backlog=4
[every4]
size=64k
fsync=4
[every1]
size=16k
fsync=1
[every5]
size=64k
fsync=5
end_fsync=1
[deep]
size=16k
ioengine=libaio
iodepth=4
fsync=1
[closing]
size=16k
end_fsync=1
fsync_on_close=1
"""


def io_counts(out: dict[str, Any]) -> list[tuple[str, int, int, int, int, int]]:
    """Each job's (name, read I/Os, read bytes, write I/Os, write bytes, syncs): what fio counts."""
    return [(j["jobname"], j["read"]["total_ios"], j["read"]["io_bytes"], j["write"]["total_ios"],
             j["write"]["io_bytes"], j["sync"]["total_ios"]) for j in out["jobs"]]


async def test_verify_reads_and_syncs_are_counted_as_fio_counts_them(tmp_path):
    """fio counts a verify's read-backs as reads (bytes, I/Os, latencies; the verify phase's
    time is the read runtime) and counts only fsync=N's syncs: an fsync=N sync is issued before
    the next I/O, so none follows the last one, and end_fsync's, fsync_on_close's and the
    sync before the verify phase are not counted (fio 3.33's numbers: the test below)."""
    out, _ = await run_job(tmp_path, SYNC_AND_VERIFY_JOBS)
    assert io_counts(out) == [("verify", 16, 64 << 10, 16, 64 << 10, 0), ("backlog", 16, 64 << 10, 16, 64 << 10, 0),
                              ("every4", 0, 0, 16, 64 << 10, 3), ("every1", 0, 0, 4, 16 << 10, 3),
                              ("every5", 0, 0, 16, 64 << 10, 3), ("deep", 0, 0, 4, 16 << 10, 1),
                              ("closing", 0, 0, 4, 16 << 10, 0)]
    verify = out["jobs"][0]
    assert verify["read"]["bw"] > 0 and verify["read"]["iops"] > 0 and verify["read"]["clat_ns"]["N"] == 16


async def test_the_verify_phase_shares_the_runtime_and_fios_verify_warnings_are_given(tmp_path):
    """As fio 3.33: the verify phase stops once the job's runtime is used up, so a time_based
    job that only writes verifies nothing (and fio says so); jobs that share a file= and verify
    get fio's warning that they may overwrite each other's blocks."""
    job = tmp_path / "v.fio"
    job.write_text("[tv]\nrw=randwrite\nbs=4k\nsize=256k\ntime_based\nruntime=0.3\nverify=crc32c\n"
                   "[shared]\nstonewall\nrw=randwrite\nbs=4k\nsize=64k\nnumjobs=2\nfilename=s\nverify=crc32c\n")
    out = (await run_workload(str(job), image=str(tmp_path / "v.img"), seed=1)).as_json()
    tv = out["jobs"][0]  # the shared file's clones may or may not fail verification: fio's warning says so
    assert tv["write"]["total_ios"] > 0 and tv["read"]["total_ios"] == 0
    assert out["blockemu"]["notes"] == [
        "fio: multiple writers may overwrite blocks that belong to other jobs. This can cause verification failures.",
        "fio: verification read phase will never start because write phase uses all of runtime"]


@pytest.mark.skipif(FIO is None, reason="the OS's fio is not installed (apt-get install fio; .ci/run does)")
def test_verify_reads_and_syncs_are_counted_as_the_real_fio_counts_them(tmp_path):
    job = tmp_path / "c.fio"
    job.write_text(SYNC_AND_VERIFY_JOBS.replace("[global]", f"[global]\ndirectory={tmp_path}"))
    fio = subprocess.run([FIO, "--output-format=json", str(job)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert fio.returncode == 0, fio.stderr
    theirs = json.loads(fio.stdout[fio.stdout.index("{"):])
    ours = json.loads(run("run", str(job), "--output-format", "json", "--seed", "1").stdout)
    assert io_counts(ours) == io_counts(theirs)


def test_parse_errors_come_all_at_once_from_the_cli(tmp_path):
    bad = tmp_path / "bad.fio"
    bad.write_text("[j]\nrw=write\nsize=1m\nfrobnicate=3\nverify=crc99\n")
    p = run("run", str(bad), check_rc=1)
    assert p.stderr == (f"blockemu: run: {bad}:4: unknown option 'frobnicate'; {bad}:5: bad value for verify: "
                        f"'crc99' (expected one of 0, null, md5, crc64, crc32c, crc32c-intel, crc32, crc16, crc7, "
                        f"xxhash, sha1, sha256, sha512, sha3-224, sha3-256, sha3-384, sha3-512, meta, pattern)\n")
    with pytest.raises(InvalidArgument):
        parse("[j]\nsize=(1+\n", "t.fio")



def test_values_fio_fails_parsing_are_refused_not_clamped():
    """fio's minval/maxval: ``iodepth=0``, ``bs=0``, ``numjobs=0`` and percentages past 100 fail
    fio's parsing; blockemu ran them (iodepth 1, bs 4 KiB, one job, a mix of 150 % reads).
    The bounds themselves still parse, and a reversed ``bsrange``, which fio takes, is no
    longer refused."""
    bad = {"numjobs": "0", "iodepth": "0", "bs": "4k,0", "ba": "4k,0", "rwmixread": "101", "rwmixwrite": "-1",
           "trim_percentage": "101", "buffer_compress_percentage": "101", "dedupe_percentage": "101",
           "dedupe_working_set_percentage": "101"}
    with pytest.raises(InvalidArgument) as e:
        parse("[j]\nrw=randrw\nsize=1m\n" + "".join(f"{k}={v}\n" for k, v in bad.items()), "b.fio")
    for line, (key, value) in enumerate(bad.items(), start=4):
        assert f"b.fio:{line}: bad value for {key}: '{value.split(',')[-1]}' (" in str(e.value)  # bs: the write's
    ok = parse("[j]\nrw=randrw\nsize=1m\nnumjobs=1\niodepth=1\nbs=1\nrwmixread=100\nrwmixwrite=0\n", "o.fio")
    assert [ok.jobs[0].get(k) for k in ("numjobs", "iodepth", "rwmixread", "rwmixwrite")] == [1, 1, 100, 0]
    # and the other way: a reversed bsrange fio runs smallest first (its job line: bs=(R) 4096B-8192B)
    assert parse("[j]\nrw=randrw\nsize=1m\nbsrange=8k-4k\n", "r.fio").jobs[0].get("bsrange") == ((4096, 8192),) * 3


def test_values_that_failed_only_once_the_run_began_are_refused_with_their_line(tmp_path):
    """A mix's ``ops=`` with an unknown name or no weight, ``percentile_list=`` past 100 or not a
    number, and a job file (or an include) that is not UTF-8 were tracebacks from ``blockemu run``
    -- the percentile list's only after the whole run, when the report was written."""
    bad = {"[m]\nkind=mix\nops=0\n": "t.fio:3: bad value for ops: unknown mix operations: 0 (known: create,",
           "[m]\nkind=mix\nops=write:0,fsync:0\n": "t.fio:3: bad value for ops: 'write:0,fsync:0' (weights are 0",
           "[m]\nkind=mix\nops=write:-1,sync\n": "t.fio:3: bad value for ops: 'write:-1,sync' (weights are 0",
           "[j]\nrw=write\nsize=64k\npercentile_list=1:200\n": "t.fio:4: bad value for percentile_list: '200' (between",
           "[j]\nrw=write\nsize=64k\npercentile_list=1:abc\n": "t.fio:4: bad value for percentile_list: could not",
           "[j]\nrw=write\nsize=64k\nlatency_percentile=101\n": "t.fio:4: bad value for latency_percentile: '101' ("}
    for text, why in bad.items():
        with pytest.raises(InvalidArgument, match=re.escape(why)):
            parse(text, "t.fio")
    ok = parse("[m]\nkind=mix\nops=write:3,fsync\n[j]\nrw=write\nsize=64k\npercentile_list=99:1:50\n", "o.fio")
    assert ok.jobs[0].get("ops") == {"write": 3, "fsync": 1}
    assert ok.jobs[1].get("percentile_list").values == (1.0, 50.0, 99.0)  # sorted, as fio's stat.c sorts it
    binary = tmp_path / "b.fio"
    binary.write_bytes(b"[j]\nrw=write\nsize=64k\nfilename=\xff\n")
    (tmp_path / "inc.fio").write_text(f"include {binary.name}\n")
    for job in (binary, tmp_path / "inc.fio"):
        p = run("run", str(job), check_rc=1)
        assert p.stderr.count("\n") == 1 and "not a text file (byte 31 is not UTF-8)" in p.stderr, p.stderr


def test_a_refused_time_or_triple_says_why_as_fio_does(tmp_path):
    """``runtime=-1`` and four comma values of ``rate=`` / ``bs=`` were refused with the bare
    value and no reason; fio's triples are read,write,trim (three at most)."""
    bad = tmp_path / "why.fio"
    bad.write_text("[j]\nrw=write\nsize=1m\nruntime=-1\nrate=1m,1m,1m,1m\nbs=4k,4k,4k,4k\nruntime=soon\n")
    p = run("run", str(bad), check_rc=1)
    assert p.stderr == (f"blockemu: run: {bad}:4: bad value for runtime: '-1' (a time is at least 0); "
                        f"{bad}:5: bad value for rate: '1m,1m,1m,1m' (at most three values: read,write,trim); "
                        f"{bad}:6: bad value for bs: '4k,4k,4k,4k' (at most three values: read,write,trim); "
                        f"{bad}:7: bad value for runtime: 'soon' (expected a number, optionally with a unit: "
                        f"us, ms, s, m, h or d)\n"), p.stderr


# --- fill_device, trim, error policy, buffer contents, percentage sizes ------------------------

async def test_fill_device_writes_until_enospc_and_that_is_success(tmp_path):
    """fill.fio on a 16 MiB image: the write phase ends at ENOSPC with err=0, the read phase
    verifies every block, and the full image is fsck-clean and remounts with the file whole."""
    image = str(tmp_path / "f.img")
    await blockemu.mkfs(image, size="16M")
    report = await run_workload(str(JOBS / "fill.fio"), image=image, seed=1)
    out = report.as_json()
    assert out["blockemu"]["ok"], out["blockemu"]["failures"]
    fill, check = out["jobs"]
    written = fill["write"]["io_bytes"]
    assert fill["error"] == 0 and written > 8 << 20
    assert check["error"] == 0 and check["read"]["io_bytes"] == written
    assert_fsck_clean(image)
    async with mount(image) as fs:
        assert (await fs.stat("/jobs/fill.tmp")).st_size == written
        await fs.unlink("/jobs/fill.tmp")  # a full filesystem still deletes
        assert fs.space()[1] > written


async def test_trim_punches_holes_that_read_zeros_after_remount(tmp_path):
    """rw=trim:4k trims every other block of a patterned file; after a remount the trimmed
    blocks read zeros and the others keep the pattern; the trim section has the figures."""
    out, image = await run_job(tmp_path, """[global]
bs=4k
filename=t.dat
size=1m
[lay]
rw=write
buffer_pattern=0xdeadbeef
[trim]
stonewall
rw=trim:4k
io_size=512k
""")
    trim = out["jobs"][1]["trim"]
    assert trim["io_bytes"] == 512 << 10 and trim["total_ios"] == 128 and "percentile" in trim["clat_ns"]
    assert out["jobs"][1]["write"]["io_bytes"] == 0
    async with mount(image) as fs:
        async with fs.open("/jobs/t.dat") as f:
            data = await f.read()
    assert len(data) == 1 << 20
    for i in range(256):
        block = data[i * 4096: (i + 1) * 4096]
        assert block == (bytes(4096) if i % 2 == 0 else bytes.fromhex("deadbeef") * 1024), i


async def test_trimwrite_and_trim_backlog_verify_zeros(tmp_path):
    """trimwrite writes each block it trims (the file ends up whole); trim_backlog trims a share
    of verified blocks, and the verify phase finds zeros there."""
    out, image = await run_job(tmp_path, """[tw]
rw=randtrimwrite
bs=8k
size=256k
filename=tw.dat
[vt]
rw=write
bs=4k
size=256k
verify=crc32c
trim_backlog=8
trim_percentage=50
filename=vt.dat
""")
    tw, vt = out["jobs"]
    assert tw["trim"]["total_ios"] == tw["write"]["total_ios"] == 32 and tw["write"]["io_bytes"] == 256 << 10
    assert 0 < vt["trim"]["total_ios"] < 64 and vt["error"] == 0
    async with mount(image) as fs:
        async with fs.open("/jobs/tw.dat") as f:
            data = await f.read()
    assert len(data) == 256 << 10 and all(any(data[i: i + 8192]) for i in range(0, len(data), 8192))


def test_ignore_error_lists():
    job = parse("[j]\nignore_error=EAGAIN,ENOSPC:122\ncontinue_on_error=io\n", "t.fio").jobs[0]
    assert job.get("ignore_error") == (frozenset({errno.EAGAIN}), frozenset({errno.ENOSPC, 122}), None)
    assert job.get("continue_on_error") == frozenset({"read", "write"})
    with pytest.raises(InvalidArgument, match="t.fio:2: bad value for ignore_error: 'ENOPE' is not an errno"):
        parse("[j]\nignore_error=,ENOPE\n", "t.fio")


@pytest.mark.parametrize("dump", [True, False])
async def test_continue_on_error_counts_ignored_errors_and_goes_on(tmp_path, dump):
    """Writing twice the image's size: each ENOSPC is counted (total_err, first_error, err=28
    as fio reports it) and the job goes on to its end; error_dump logs each one."""
    image = str(tmp_path / "e.img")
    await blockemu.mkfs(image, size="16M")
    job = tmp_path / "e.fio"
    job.write_text(f"[full]\nrw=write\nbs=1m\nsize=24m\nfilename=big\ncontinue_on_error=write\n"
                   f"ignore_error=,ENOSPC\nerror_dump={int(dump)}\n")
    out = (await run_workload(str(job), image=image, seed=1)).as_json()
    assert out["blockemu"]["ok"] and out["blockemu"]["fsck_clean"], out["blockemu"]["failures"]
    j = out["jobs"][0]
    assert j["error"] == j["first_error"] == errno.ENOSPC and j["total_err"] > 4
    assert j["total_err"] + j["write"]["total_ios"] == 24  # every write was issued: it went on
    logged = j.get("blockemu", {}).get("errors", [])
    assert len(logged) == (j["total_err"] if dump else 0)
    assert not dump or logged[0].startswith("fio: io_u error on file /jobs/big: No space left on device: write offset=")
    if not dump:
        return
    text = run("run", str(job), "--image", image, "--seed", "1").stdout  # fio's errors line
    assert "     errors    : total=" in text and "first_error=28/<No space left on device>" in text
    job.write_text("[full]\nrw=write\nbs=1m\nsize=24m\nfilename=big2\ncontinue_on_error=write\n")
    out = (await run_workload(str(job), image=image, seed=1)).as_json()  # ENOSPC is not EIO/EILSEQ: fatal
    assert not out["blockemu"]["ok"] and out["jobs"][0]["error"] == errno.ENOSPC and out["jobs"][0]["total_err"] == 1


def _blocks(data: bytes) -> list[bytes]:
    return [data[i: i + 4096] for i in range(0, len(data), 4096)]


async def test_dedupe_and_compress_shares_land_in_the_files(tmp_path):
    """dedupe.fio: about half of the 4k blocks of both files together are distinct (a
    working set shared by the jobs), and a block compresses to about half its size."""
    report = await run_workload(str(JOBS / "dedupe.fio"), image=str(tmp_path / "d.img"), seed=1,
                                overrides={"size": 4 << 20})
    assert report.ok
    async with mount(str(tmp_path / "d.img")) as fs:
        files = []
        for name in ("a", "b"):
            async with fs.open(f"/jobs/{name}.0.0") as f:
                files.append(_blocks(await f.read()))
    both = files[0] + files[1]
    assert len(both) == 2048
    assert 0.44 < len(set(both)) / len(both) < 0.56
    assert len(set(both)) < len(set(files[0])) + len(set(files[1]))  # the working set is shared
    ratio = statistics.fmean(len(zlib.compress(b)) / len(b) for b in set(both))
    assert 0.45 < ratio < 0.6


def test_buffer_contents_as_the_options_shape_them():
    def make(opts: str, n: int = 64) -> list[bytes]:
        job = parse(f"[j]\nrw=write\nbs=4k\n{opts}", "t.fio").jobs[0]
        b = Buffers(job, random.Random(1), n * 4096, None)
        return [bytes(b.make(4096, i * 4096, i + 1)) for i in range(n)]
    repeat = make("dedupe_percentage=25\n", 400)  # repeat mode: the previous unique buffer again
    assert 0.68 < len(set(repeat)) / 400 < 0.82
    assert set(make("buffer_pattern=\"ab\"\n")) == {b"ab" * 2048}
    assert len(set(make("scramble_buffers=0\n"))) == 1  # one buffer reused as it is
    scrambled = make("")  # fio's default: reused, but each 512-byte sector stamped with the offset
    assert len(set(scrambled)) == 64 and scrambled[0][16:512] == scrambled[1][16:512]
    stamps = [struct.unpack_from("=QQ", scrambled[5], k) for k in range(0, 4096, 512)]
    assert stamps == [(5 * 4096 + k, 6) for k in range(0, 4096, 512)]  # each sector: its offset, the write's number
    assert len(set(make("refill_buffers=1\n"))) == 64
    compressed = make("buffer_compress_percentage=75\nbuffer_compress_chunk=1k\n")[0]
    assert all(compressed[k + 256: k + 1024] == bytes(768) for k in range(0, 4096, 1024))


async def test_percentage_sizes_take_a_share_of_the_free_space_or_the_file(tmp_path):
    image = str(tmp_path / "s.img")
    await blockemu.mkfs(image, size="32M")
    async with mount(image) as fs:
        free = fs.space()[1]
    report = await run_workload(str(JOBS / "shares.fio"), image=image, seed=1)
    out = report.as_json()
    assert out["blockemu"]["ok"], out["blockemu"]["failures"]
    lay, middle, sample = out["jobs"]
    size = lay["write"]["io_bytes"]
    assert size == Share(10).of(free - (16 << 10), 4096) or 0.09 * free < size <= 0.1 * free
    assert middle["read"]["io_bytes"] == Share(50).of(size, 4096)
    assert sample["read"]["io_bytes"] == Share(25).of(size, 4096)
    assert parse("[j]\nsize=30%\noffset=10%\nio_size=50%\n", "t.fio").jobs[0].get("size") == Share(30)
    with pytest.raises(InvalidArgument, match="between 1 and 100"):
        parse("[j]\nsize=130%\n", "t.fio")


async def test_every_job_lays_out_before_any_starts(tmp_path, monkeypatch):
    """As fio: a job's I/O does not start while another job that starts with it is still
    laying out its files (exitall would otherwise end that job before it did any I/O). The
    slow layout yields to the loop many times; the order of events is recorded."""
    events: list[str] = []
    real_layout, real_run = Clone.layout, Clone.run

    async def layout(self):
        await real_layout(self)
        if self.job.name == "slow":
            for _ in range(50):
                await asyncio.sleep(0)
        events.append(f"laid {self.job.name}")

    async def run_(self):
        events.append(f"run {self.job.name}")
        await real_run(self)

    monkeypatch.setattr(Clone, "layout", layout)
    monkeypatch.setattr(Clone, "run", run_)
    out, _ = await run_job(tmp_path, "[global]\nsize=64k\nexitall\n[fast]\nrw=write\n[slow]\nrw=read\n"
                                     "[later]\nwait_for=fast\nrw=write\n")
    assert events[:4] == ["laid fast", "laid slow", "run fast", "run slow"], events
    assert out["jobs"][1]["read"]["io_bytes"] > 0


async def test_trimwrite_on_a_deep_queue_writes_after_each_trim(tmp_path, monkeypatch):
    """io_uring keeps the trim and the write of a block in flight together: the write waits
    for its trim, so the file ends up written whole, never with a punched block. Each punch
    yields to the loop first, so a write not held back would land before it."""
    real = File.punch_hole

    async def slow_punch(self, offset, length):
        for _ in range(3):
            await asyncio.sleep(0)
        await real(self, offset, length)

    monkeypatch.setattr(File, "punch_hole", slow_punch)
    out, image = await run_job(tmp_path, "[global]\nbs=4k\nsize=256k\nfilename=tw.dat\n[lay]\nrw=write\n"
                                         "[tw]\nstonewall\nrw=trimwrite\nioengine=io_uring\niodepth=8\n"
                                         "buffer_pattern=0x77\n")
    assert out["jobs"][1]["trim"]["total_ios"] == out["jobs"][1]["write"]["total_ios"] == 64
    async with mount(image) as fs:
        async with fs.open("/jobs/tw.dat") as f:
            assert await f.read() == b"\x77" * (256 << 10)


def test_zoned_device_jobs_parse_and_what_they_lack_is_named_at_once():
    """zonemode=zbd and its options parse (tests/test_zbd.py runs them); a number of zones
    without a zone size, and every other problem, is named with its line, all at once."""
    jf = parse("[global]\nzonemode=zbd\nzonesize=1m\noffset=524z\n[w]\nrw=randwrite\nsize=128z\nmax_open_zones=8\n",
               "z.fio")
    assert (jf.jobs[0].get("offset"), jf.jobs[0].get("size"), jf.jobs[0].get("max_open_zones")) == (524 << 20, 128 << 20, 8)
    with pytest.raises(InvalidArgument) as e:
        parse("[global]\nzonemode=zbd\noffset=524z\n[w]\nrw=randwrite\nsize=128z\nmax_open_zones=-1\n", "z.fio")
    for what in ("z.fio:7: bad value for max_open_zones", "z.fio:4: job w: size=128z is a number of zones",
                 "z.fio:4: job w: offset=524z is a number of zones"):
        assert what in str(e.value)


def test_the_seqwrite_scenario_writes_sequentially():
    """Its writes were rw=randwrite, under a name that says sequential."""
    from blockemu.workload.runner import scenarios

    text = scenarios()["seqwrite"]
    assert [(o, n) for _, o, n in ios(text)] == [(o, 4096) for o in range(0, 16 << 20, 4096)]


@pytest.mark.parametrize("option", ["nrfiles", "loops", "fsync", "fdatasync", "number_ios", "rate_iops",
                                    "rate_iops_min"])
def test_a_negative_count_is_refused_with_its_line(option):
    """fio has no minval for these counts (it stores -1 as 4294967295); blockemu took -1 as none
    -- one file, no fsync, no IOPS limit -- and the run reported clean."""
    with pytest.raises(InvalidArgument, match=f"^n.fio:4: bad value for {option}: '-1' \\(at least 0\\)$"):
        parse(f"[j]\nrw=write\nsize=64k\n{option}=-1\n", "n.fio")
    assert parse(f"[j]\nrw=write\nsize=64k\n{option}=0\n", "z.fio").jobs[0].get(option) in (0, (0, 0, 0))


def test_a_mix_of_negative_nops_is_refused_with_its_line():
    with pytest.raises(InvalidArgument, match=r"^m.fio:3: bad value for nops: '-1' \(at least 0\)$"):
        parse("[m]\nkind=mix\nnops=-1\n", "m.fio")
    assert parse("[m]\nkind=mix\nnops=7\n", "m.fio").jobs[0].get("nops") == 7


def test_an_empty_filename_and_unified_reporting_are_refused_as_fio_would_not_run_them():
    """``filename=`` (empty) was taken as unset, so the job ran on ``NAME.0.0`` where fio 3.33
    fails parsing it; ``unified_rw_reporting=mixed``/``both`` was listed as ignored, so a tool
    reading fio's ``jobs[].mixed`` found none. ``none``/``0`` is what blockemu writes."""
    with pytest.raises(InvalidArgument, match=r"t.fio:3: bad value for filename: '' \(a file name is needed\)"):
        parse("[j]\nrw=write\nfilename=\nsize=64k\n", "t.fio")
    with pytest.raises(InvalidArgument, match=r"t.fio:3: bad value for filename: '::' \(a file name is needed\)"):
        parse("[j]\nrw=write\nfilename=::\nsize=64k\n", "t.fio")  # was a ZeroDivisionError when run
    for value in ("mixed", "both", "1", "2"):
        with pytest.raises(InvalidArgument, match=f"t.fio:2: unified_rw_reporting={value} is not supported"):
            parse(f"[j]\nunified_rw_reporting={value}\nrw=write\nsize=64k\n", "t.fio")
    with pytest.raises(InvalidArgument, match="bad value for unified_rw_reporting: 'bogus'"):
        parse("[j]\nunified_rw_reporting=bogus\nrw=write\nsize=64k\n", "t.fio")
    job = parse("[j]\nunified_rw_reporting=none\nrw=write\nsize=64k\nfilename=a:b\n", "t.fio").jobs[0]
    assert job.get("filename") == "a:b" and job.ignored == []
