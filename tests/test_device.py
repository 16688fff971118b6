"""BlockDevice: volatile cache, flush/FUA durability, faults, and the write log."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.device import blockdev
from blockemu.device.blockdev import BlockDevice
from blockemu.device.faultplan import FaultPlan
from blockemu.device.power import Power
from blockemu.device.writelog import SECTOR, WriteLog
from blockemu.errors import DeviceIOError, InvalidArgument
from tests.util import Gate

MiB = 1 << 20


def make_image(path, size=4 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def on_disk(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def sector(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (SECTOR * n)


async def test_write_is_visible_but_not_in_the_image_until_flush(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    await dev.write(8192, sector(1, 2))
    assert await dev.read(8192, 2 * SECTOR) == sector(1, 2)
    assert dev.read_sync(8192 + 100, 50) == b"\x01" * 50
    assert on_disk(path, 8192, SECTOR) == bytes(SECTOR)
    await dev.flush()
    assert on_disk(path, 8192, 2 * SECTOR) == sector(1, 2)
    assert dev.stats.ops["flush"] == 1 and dev.stats.bytes["write"] == 2 * SECTOR
    await dev.close()


async def test_fua_write_is_durable_alone_and_supersedes_cached_data(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    await dev.write(0, sector(1, 2))
    await dev.write(SECTOR, sector(2), fua=True)
    assert on_disk(path, SECTOR, SECTOR) == sector(2)
    assert on_disk(path, 0, SECTOR) == bytes(SECTOR)  # the plain write is still only cached
    await dev.flush()
    # the older cached copy of sector 1 must not overwrite the FUA data at flush
    assert on_disk(path, 0, 2 * SECTOR) == sector(1) + sector(2)
    await dev.close()


@pytest.mark.parametrize("how", ["flush", "flush_then_fua"])
async def test_a_flush_syncs_the_image_with_fdatasync_alone(tmp_path, monkeypatch, how):
    """The image's size is fixed at mkfs, so a flush needs its data durable, not its timestamps:
    fdatasync, as QEMU flushes a raw image (an fsync made each flush on ext4 a journal commit
    for the image's mtime). The FUA write after a commit's flush was fdatasync already."""
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(blockdev.os, name, lambda fd, name=name, real=getattr(os, name): calls.append(name) or real(fd))
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    await dev.write(0, sector(1, 2))
    await (dev.flush() if how == "flush" else dev.flush_then_fua(4 * SECTOR, sector(2)))
    assert calls == ["fdatasync"] * (1 if how == "flush" else 2)
    assert on_disk(path, 0, 2 * SECTOR) == sector(1, 2)
    await dev.close()


async def _trips(dev: BlockDevice, step) -> int:
    """How many calls ``step`` sends to an I/O thread: the device's own, or the loop's executor."""
    import asyncio

    loop, trips = asyncio.get_running_loop(), []
    real, real_call = loop.run_in_executor, dev._io.call
    loop.run_in_executor = lambda *a: trips.append(a) or real(*a)  # type: ignore[method-assign]
    dev._io.call = lambda *a: trips.append(a) or real_call(*a)  # type: ignore[method-assign]
    try:
        await step()
    finally:
        del loop.run_in_executor, dev._io.call
    return len(trips)


@pytest.mark.parametrize("faults", [None, FaultPlan(cut_after_writes=2)], ids=["plain", "cut-at-the-fua"])
async def test_flush_then_fua_is_a_flush_then_a_fua_write_in_one_trip(tmp_path, faults):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=faults)
    log = dev.start_log()
    await dev.write(0, sector(1, 2))
    await dev.write(4 * SECTOR, sector(5))
    if faults is None:
        assert await _trips(dev, lambda: dev.flush_then_fua(SECTOR, sector(2))) == 1
        assert on_disk(path, 0, 5 * SECTOR) == sector(1) + sector(2) + bytes(2 * SECTOR) + sector(5)
        assert [e.kind for e in log.entries] == ["write", "write", "flush", "fua"] and not dev.cached_bytes()
    else:  # the power cut comes at the FUA write: the flush before it has happened, the FUA not
        with pytest.raises(DeviceIOError):
            await dev.flush_then_fua(SECTOR, sector(2))
        assert on_disk(path, 0, 5 * SECTOR) == sector(1, 2) + bytes(2 * SECTOR) + sector(5)
        assert [e.kind for e in log.entries] == ["write", "write", "flush"]
    await dev.close()


@pytest.mark.parametrize("how", ["flush", "flush_then_fua"])
async def test_a_write_completed_during_a_flush_stays_in_doubt_after_it(tmp_path, monkeypatch, how):
    """The flush's snapshot of the cache is what it makes durable: a write that completes while
    the host syncs is not what the flush covers, so the crash states keep it in doubt (logged
    at the flush's completion without that, it was counted durable)."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    log = dev.start_log()
    await dev.write(0, sector(1))
    name = "_a_destage" if how == "flush" else "_a_flush_fua"
    gate = Gate(getattr(blockdev, name))
    monkeypatch.setattr(blockdev, name, gate)
    flushing = asyncio.ensure_future(dev.flush() if how == "flush" else dev.flush_then_fua(SECTOR, sector(2)))
    await gate.entered.wait()  # the snapshot is taken, the host call not made
    await dev.write(4 * SECTOR, sector(5))
    gate.release.set()
    await flushing
    kinds = [e.kind for e in log.entries]
    assert kinds == (["write", "write", "flush"] if how == "flush" else ["write", "write", "flush", "fua"])
    assert log.entries[2].covers == 1  # its snapshot: the first write only
    durable, doubt = log.split(len(log.entries))
    assert [e.offset for e in durable if e.kind == "write"] == [0] and [e.offset for e in doubt] == [4 * SECTOR]
    assert dev.cached_bytes() == SECTOR  # and the device agrees: the later write is still only cached
    await dev.close()


async def test_a_power_cut_during_a_flush_leaves_a_crash_state_of_the_log(tmp_path, monkeypatch):
    """A flush makes its snapshot durable only when it completes: a power cut while the host
    syncs may land a write completed meanwhile (here torn lands it) but not the snapshot's
    writes. The log must name that image among its crash states; logged as a flush at the
    snapshot, every state with the later write had the earlier one durable."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan(torn=0.5, seed=10))  # lands sector 4, not 0
    log = dev.start_log()
    await dev.write(0, sector(1))
    gate = Gate(blockdev._a_destage)
    monkeypatch.setattr(blockdev, "_a_destage", gate)
    flushing = asyncio.ensure_future(dev.flush())
    await gate.entered.wait()  # the snapshot is taken, the host call not made
    await dev.write(4 * SECTOR, sector(5))
    dev.power_cut()
    left = on_disk(path, 0, 8 * SECTOR)
    assert left == bytes(4 * SECTOR) + sector(5) + bytes(3 * SECTOR)
    gate.release.set()
    with pytest.raises(DeviceIOError, match="power cut"):
        await flushing
    assert on_disk(path, 0, 8 * SECTOR) == left  # the host call, let go after the cut, wrote nothing
    states = []
    for upto in range(len(log.entries) + 1):
        doubt = [e.seq for e in log.split(upto)[1]]
        for mask in range(1 << len(doubt)):
            log.crash_image(str(tmp_path / "s.img"), upto, [s for i, s in enumerate(doubt) if mask >> i & 1])
            states.append(on_disk(str(tmp_path / "s.img"), 0, 8 * SECTOR))
    assert left in states
    await dev.close()


def crash_images(log, path: str, length: int, completed: int = 0) -> list[bytes]:
    """The first ``length`` bytes of every crash state the log names (``crash_states``) once
    ``completed`` entries have completed."""
    out = []
    for state in log.crash_states(random.Random(0), subsets=0):
        if state.upto < completed:
            continue
        log.crash_image(path, state.upto, state.keep, state.torn, state.split)
        out.append(on_disk(path, 0, length))
    return out


@pytest.mark.parametrize("call", ["flush", "flush_then_fua", "fua", "background"])
async def test_a_host_call_the_power_cut_overtook_writes_nothing(tmp_path, monkeypatch, call):
    """A host call submitted before a power cut but not yet run (held here between the loop and
    the I/O thread) must not write the image once it runs: the cut froze it. It used to write
    and sync its snapshot or FUA data after the cut, racing whoever looked at the image then."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    log = dev.start_log()
    await dev.write(0, sector(1))
    name = {"flush": "_a_destage", "background": "_a_destage", "flush_then_fua": "_a_flush_fua", "fua": "_a_fua"}[call]
    gate = Gate(getattr(blockdev, name))
    monkeypatch.setattr(blockdev, name, gate)
    running = asyncio.ensure_future({"flush": dev.flush, "background": dev.destage_in_background,
                                     "flush_then_fua": lambda: dev.flush_then_fua(SECTOR, sector(2)),
                                     "fua": lambda: dev.write(SECTOR, sector(2), fua=True)}[call]())
    await gate.entered.wait()
    dev.power_cut()
    gate.release.set()
    with pytest.raises(DeviceIOError, match="power cut"):
        await running
    assert on_disk(path, 0, 4 * SECTOR) == bytes(4 * SECTOR)
    assert [e.kind for e in log.entries] in (["write"], ["write", "mark"])  # no flush or FUA completed
    await dev.close()


class CountedPower(Power):
    def __init__(self) -> None:
        super().__init__()
        self.pieces = 0

    def __enter__(self) -> None:
        self.pieces += 1
        super().__enter__()


def test_the_image_is_written_in_pieces_of_up_to_iov_max_runs(tmp_path, monkeypatch):
    """The switch is taken per piece of runs, not per run (per run, it cost a flush of scattered
    4 KiB writes 39 % more instructions than their pwritev), and every byte still lands where it
    belongs, a run longer than ``IOV_MAX`` buffers too."""
    monkeypatch.setattr(blockdev, "IOV_MAX", 2)
    path = make_image(tmp_path / "d.img")
    runs = [(0, [memoryview(sector(1))]), (2 * SECTOR, [memoryview(sector(k)) for k in (2, 3, 4)]),
            (6 * SECTOR, [memoryview(sector(5))])]
    power = CountedPower()
    fd = os.open(path, os.O_RDWR)
    try:
        blockdev._pwrite_runs(fd, runs, power)
    finally:
        os.close(fd)
    assert power.pieces == 2  # the first two runs, then the third
    assert on_disk(path, 0, 7 * SECTOR) == sector(1) + bytes(SECTOR) + sector(2) + sector(3) + sector(4) + bytes(SECTOR) + sector(5)


class HeldPower(Power):
    """Holds the I/O thread before its ``at``-th piece (outside the switch) until ``go``, having
    told the loop (``reached``)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.pieces = at, 0
        self.loop = asyncio.get_running_loop()
        self.reached: asyncio.Future[None] = self.loop.create_future()
        self.go = threading.Event()

    def __enter__(self) -> None:
        self.pieces += 1
        if self.pieces == self.at:
            self.loop.call_soon_threadsafe(self.reached.set_result, None)
            self.go.wait()
        super().__enter__()


async def test_a_power_cut_between_a_flushs_pieces_leaves_a_torn_snapshot_and_a_frozen_image(tmp_path, monkeypatch):
    """The I/O thread is held after the first of a flush's two runs, each a piece here (a piece
    is up to ``IOV_MAX`` runs): the cut lands that run and refuses the second, for good -- the
    image is the same after the thread goes on -- and that torn snapshot is one of the write
    log's crash states (the flush never completed)."""
    monkeypatch.setattr(blockdev, "IOV_MAX", 1)
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    log = dev.start_log()
    await dev.write(0, sector(1, 2))
    await dev.write(8 * SECTOR, sector(2))
    dev.power = held = HeldPower(2)
    flushing = asyncio.ensure_future(dev.flush())
    try:
        await asyncio.wait([held.reached, flushing], return_when=asyncio.FIRST_COMPLETED)
        assert held.reached.done()  # the first run is written, the second not begun
        dev.power_cut()
        left = on_disk(path, 0, 12 * SECTOR)
    finally:
        held.go.set()
    with pytest.raises(DeviceIOError, match="power cut"):
        await flushing
    assert left == sector(1, 2) + bytes(10 * SECTOR)
    assert on_disk(path, 0, 12 * SECTOR) == left
    assert left in crash_images(log, str(tmp_path / "s.img"), 12 * SECTOR)
    await dev.close()


async def test_a_failed_flush_leaves_a_mark_not_a_flush(tmp_path, monkeypatch):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    log = dev.start_log()
    await dev.write(0, sector(1))

    async def refused(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(blockdev, "_a_destage", refused)
    with pytest.raises(OSError):
        await dev.flush()
    assert [(e.kind, e.name) for e in log.entries] == [("write", ""), ("mark", "flush failed")]
    assert [e.offset for e in log.split(2)[1]] == [0]  # still in doubt
    monkeypatch.undo()
    await dev.close()


async def test_power_cut_loses_unflushed_writes_and_kills_the_device(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan(cut_after_writes=2))
    await dev.write(0, sector(1))
    await dev.flush()
    await dev.write(SECTOR, sector(2))
    with pytest.raises(DeviceIOError, match="power cut"):
        await dev.write(2 * SECTOR, sector(3))
    with pytest.raises(DeviceIOError):
        await dev.read(0, SECTOR)
    await dev.close()
    assert on_disk(path, 0, 3 * SECTOR) == sector(1) + bytes(2 * SECTOR)


async def test_torn_power_cut_lands_some_cached_sectors(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan(torn=0.5, seed=3))
    await dev.write(0, sector(7, 64))
    dev.power_cut()
    await dev.close()
    landed = [on_disk(path, i * SECTOR, SECTOR) == sector(7) for i in range(64)]
    assert 0 < sum(landed) < 64


async def test_injected_eio_on_a_range(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan.parse("eio=1M-2M:w"))
    await dev.write(0, sector(1))
    with pytest.raises(DeviceIOError, match="injected"):
        await dev.write(MiB + SECTOR, sector(1))
    assert await dev.read(MiB, SECTOR) == bytes(SECTOR)  # reads of the range still work
    await dev.close()


async def test_bit_flips_corrupt_silently(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan(flip=1.0, seed=1))
    await dev.write(0, sector(0, 4))
    data = await dev.read(0, 4 * SECTOR)
    assert data != bytes(4 * SECTOR)
    assert all(data[i * SECTOR : (i + 1) * SECTOR] != bytes(SECTOR) for i in range(4))
    await dev.close()


async def test_same_seed_flips_the_same_writes_whatever_their_order(tmp_path):
    """flip= decides by the seed and the sector written, not by a draw in write order: the order
    writes reach the device is the run's timing (tasks, commit timer, sealing workers), and a
    draw per sector made one stress seed flip different writes on every run."""
    writes = [(i * 4 * SECTOR, bytes([i]) * 4 * SECTOR) for i in range(32)]

    async def flips(order: list[tuple[int, bytes]], *, batched: bool, before: int) -> set[tuple[int, int, int]]:
        dev = await BlockDevice.open(make_image(tmp_path / f"{batched}{before}.img"),
                                     faults=FaultPlan.parse("flip=0.3,seed=7"))
        for _ in range(before):  # other writes first, elsewhere: they shift any draw order
            await dev.write(2 * MiB, sector(9, 4))
        if batched:
            await dev.writev(order)
        else:
            for offset, data in order:
                await dev.write(offset, data)
        await dev.close()
        return {(f.sector, f.byte, f.mask) for f in dev.flipped if f.sector < 2 * MiB}

    first = await flips(writes, batched=False, before=0)
    assert 0 < len(first) < 4 * len(writes)
    assert await flips(writes[::-1], batched=True, before=3) == first


async def test_bounds_alignment_and_readonly(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    with pytest.raises(DeviceIOError, match="beyond"):
        await dev.write(4 * MiB, sector(1))
    with pytest.raises(InvalidArgument):
        await dev.write(100, sector(1))
    await dev.close()
    ro = await BlockDevice.open(path, readonly=True)
    with pytest.raises(DeviceIOError, match="read-only"):
        await ro.write(0, sector(1))
    await ro.close()
    with pytest.raises(FileNotFoundError, match="no such file"):
        await BlockDevice.open(str(tmp_path / "missing.img"))


async def test_cache_limit_destages_without_making_durable(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, cache_limit=8 * SECTOR)
    log = dev.start_log()
    await dev.write(0, sector(5, 16))
    await dev.settle()
    assert dev.cached_bytes() == 0 and on_disk(path, 0, SECTOR) == sector(5)
    # destaged data reached the file, but the log still treats it as in doubt
    durable, doubt = log.split(len(log.entries))
    assert not durable and len(doubt) == 1
    await dev.close()


def test_fault_spec_errors():
    with pytest.raises(InvalidArgument, match="unknown fault"):
        FaultPlan.parse("explode=1")
    with pytest.raises(InvalidArgument, match="bad fault spec"):
        FaultPlan.parse("eio=banana")
    plan = FaultPlan.parse("eio=0-4K:r,latency=0.001,flip=0.5,torn=0.25,cut=9,seed=4")
    assert plan.eio == [(0, 4096, "r")] and plan.cut_after_writes == 9 and plan.seed == 4


async def test_write_log_rebuilds_crash_states(tmp_path):
    path = make_image(tmp_path / "d.img")
    with open(path, "r+b") as f:
        f.write(sector(9))  # pre-existing content: captured by the log's base copy
    dev = await BlockDevice.open(path)
    log = dev.start_log(base_copy=str(tmp_path / "base.img"))
    await dev.write(SECTOR, sector(1))
    await dev.flush()
    await dev.mark("after-first")
    await dev.write(2 * SECTOR, sector(2, 2))
    await dev.write(4 * SECTOR, sector(3), fua=True)
    await dev.write(5 * SECTOR, sector(4))
    await dev.close()
    assert log.boundaries() == [2, 5] and log.marks() == {"after-first": 3}
    out = str(tmp_path / "crash.img")

    log.crash_image(out, upto=len(log.entries))
    assert on_disk(out, 0, 6 * SECTOR) == sector(9) + sector(1) + bytes(2 * SECTOR) + sector(3) + bytes(SECTOR)

    w2, w4 = log.entries[3].seq, log.entries[5].seq
    log.crash_image(out, upto=len(log.entries), keep=[w2, w4], torn={w2: [1]})
    assert on_disk(out, 2 * SECTOR, 4 * SECTOR) == bytes(SECTOR) + sector(2) + sector(3) + sector(4)

    log.crash_image(out, upto=1)  # before the first flush completed: nothing of ours is durable
    assert on_disk(out, 0, 2 * SECTOR) == sector(9) + bytes(SECTOR)
    assert os.path.getsize(out) == 4 * MiB


HOST_FULL = """
import asyncio, gc, resource, signal, sys
from blockemu.device.blockdev import BlockDevice

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, no signal
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

async def main(path):
    dev = await BlockDevice.open(path, cache_limit=64 << 10)
    try:
        await dev.write((1 << 20) - 8192, bytes(16384))  # straddles the limit: a short write
        for i in range(8):  # past the cache limit: background destages, which fail; a write
            await dev.write((2 << 20) + i * 16384, bytes(16384))  # the full cache stalls fails too
            await asyncio.sleep(0)
            gc.collect()
        await dev.flush()
    except OSError as e:
        print(e.errno, e.filename)
    try:
        await dev.close()
    except OSError as e:
        print(e.errno, e.filename)
    gc.collect()

asyncio.run(main(sys.argv[1]))
"""


def test_a_write_the_host_refuses_names_the_image_and_its_errno(tmp_path):
    """The host's file system full under the image (here a file size limit, RLIMIT_FSIZE: the
    kernel cuts the write short, then fails it with EFBIG, as a full disk does with ENOSPC) was
    raised as "short write at N: M of K" -- no errno, no file -- and a failed background destage
    nobody awaited printed asyncio's "Task exception was never retrieved" traceback. Now the
    flush fails with the host's errno, naming the image, and nothing else reaches stderr."""
    import errno
    import subprocess
    import sys

    path = make_image(tmp_path / "h.img")
    p = subprocess.run([sys.executable, "-c", HOST_FULL, path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout == f"{errno.EFBIG} {path}\n" * 2


FUA_HOST_FULL = """
import asyncio, resource, signal, sys
from blockemu.device.blockdev import BlockDevice

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

async def main(path, how):
    dev = await BlockDevice.open(path)
    try:  # straddles the limit: the host writes the first sector, then refuses
        if how == "fua":
            await dev.write((1 << 20) - 4096, bytes([7]) * 8192, fua=True)
        else:
            await dev.flush_then_fua((1 << 20) - 4096, bytes([7]) * 8192)
        print("acknowledged")
    except OSError as e:
        print(e.errno, e.filename)
    await dev.close()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["fua", "flush_then_fua"])
def test_a_fua_write_the_host_cuts_short_fails(tmp_path, how):
    """A FUA write the host's file system wrote only part of (full, or a file size limit: the
    kernel cuts the write short) was acknowledged: durable, the caller told, with its tail never
    written. It fails now, with the host's errno, naming the image, as a destage does."""
    import errno
    import subprocess
    import sys

    path = make_image(tmp_path / "h.img")
    p = subprocess.run([sys.executable, "-c", FUA_HOST_FULL, path, how], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout == f"{errno.EFBIG} {path}\n"


def test_stats_count_time_in_requests_and_time_with_one_in_flight(monkeypatch):
    """``busy`` is the union of the requests' spans (a disk's io_ticks, fio's util), not their
    sum (``seconds``, in_queue): two overlapping requests are busy once."""
    from blockemu.device import blockdev

    clock = iter([0.0, 1.0, 3.0, 5.0, 10.0, 11.0])
    monkeypatch.setattr(blockdev.time, "perf_counter", lambda: next(clock))
    stats = blockdev.DeviceStats()
    a = stats.begin()
    b = stats.begin()
    stats.done("read", SECTOR, a)  # at 3
    stats.done("write", SECTOR, b)  # at 5: the device was busy from 0 to 5
    stats.done("fua", SECTOR, stats.begin())  # 10 to 11
    assert stats.busy == 6.0 and stats.in_flight == 0
    assert stats.seconds == {"read": 3.0, "write": 4.0, "fua": 1.0, "flush": 0.0, "discard": 0.0}


async def test_a_failed_request_ends_too(tmp_path):
    """A write the power cut refuses, a flush on a dead device: counted, and in flight no more
    (else the device looks busy for the rest of the run)."""
    dev = await BlockDevice.open(make_image(tmp_path / "d.img"), faults=FaultPlan(cut_after_writes=1))
    await dev.write(0, sector(1))
    with pytest.raises(DeviceIOError):
        await dev.write(SECTOR, sector(2), fua=True)
    with pytest.raises(DeviceIOError):
        await dev.flush_then_fua(0, sector(3))
    assert dev.stats.in_flight == 0
    assert (dev.stats.ops["write"], dev.stats.ops["fua"]) == (1, 1)
    await dev.close()


class Lender:
    """Buffers lent to the device as a sealer lends its slots: each given back exactly once, and
    then reused at once -- overwritten with a pattern no write carries -- so a device still
    reading a buffer it gave back reads garbage, as it would from a slot sealed into again."""

    def __init__(self) -> None:
        self.out: dict[int, bytearray] = {}
        self.back = 0

    def lend(self, data: bytes) -> tuple[memoryview, Callable[[], None]]:
        buf = bytearray(data)
        key = len(self.out) + self.back

        def release() -> None:
            assert self.out.pop(key) is buf, "a lent buffer given back twice"
            buf[:] = b"\xee" * len(buf)
            self.back += 1

        self.out[key] = buf
        return memoryview(buf), release

    async def write(self, dev: BlockDevice, offset: int, data: bytes, *, fua: bool = False) -> None:
        view, release = self.lend(data)
        await dev.write(offset, view, fua=fua, release=release)


def hold(monkeypatch, name: str) -> tuple[asyncio.Event, asyncio.Event]:
    """The device's executor call ``name`` waits for the first event to be set; the second is set
    once one is waiting: the test drives what happens while it is in flight."""
    gate, entered = asyncio.Event(), asyncio.Event()
    real = getattr(blockdev, name)

    async def held(*args):
        entered.set()
        await gate.wait()
        return await real(*args)

    monkeypatch.setattr(blockdev, name, held)
    return gate, entered


async def test_a_lent_buffer_is_kept_not_copied_and_given_back_after_a_destage_reading_it(tmp_path, monkeypatch):
    """A write superseding a lent one while a flush writes the lent one out: the buffer goes back
    only once that destage is done with it, and the flush lands what it snapshotted."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    lender = Lender()
    data, release = lender.lend(sector(1, 4))
    await dev.write(0, data, release=release)
    data[:SECTOR] = sector(9)  # kept, not copied: the cache reads the lent buffer itself
    assert await dev.read(0, SECTOR) == sector(9)
    data[:SECTOR] = sector(1)
    gate, entered = hold(monkeypatch, "_a_destage")
    flush = asyncio.ensure_future(dev.flush())
    await entered.wait()
    await dev.write(0, sector(2, 4))  # supersedes every sector of the lent write
    assert lender.out, "given back while a destage still reads it"
    gate.set()
    await flush
    assert not lender.out and lender.back == 1
    assert on_disk(path, 0, 4 * SECTOR) == sector(1, 4)  # what the flush snapshotted
    await dev.flush()
    assert on_disk(path, 0, 4 * SECTOR) == sector(2, 4)
    await dev.close()


async def test_a_lent_buffer_goes_back_at_once_when_its_write_fails_or_is_fua_and_the_log_keeps_a_copy(tmp_path):
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    log = dev.start_log()
    lender = Lender()
    with pytest.raises(DeviceIOError):
        await lender.write(dev, dev.size, sector(1))  # beyond the end
    await lender.write(dev, 0, sector(3), fua=True)
    assert not lender.out and lender.back == 2
    await lender.write(dev, SECTOR, sector(4))
    await dev.close()  # an orderly close destages: the buffer is back
    assert not lender.out and lender.back == 3
    assert [bytes(e.data) for e in log.entries] == [sector(3), sector(4)]  # not the reused buffers


cache_ops = st.lists(st.one_of(
    st.tuples(st.sampled_from(["write", "lend", "fua", "during"]), st.integers(0, 15), st.integers(1, 6), st.integers(1, 250)),
    st.tuples(st.just("discard"), st.integers(0, 15), st.integers(1, 4)),
    st.tuples(st.sampled_from(["flush", "destage", "read", "cut"]), st.integers(0, 15), st.integers(1, 8)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(cache_ops)
def test_the_cache_against_a_model(tmp_path_factory, ops):
    """Writes (copied, lent, FUA, or made while a destage is in the host's hands), discards,
    flushes, background destages, reads and a torn power cut against a model of what each sector
    holds and what is durable: reads and the image agree with it, lent buffers (poisoned when
    given back) are read only while the device holds them, and all are back at close or cut.
    The writes overlap in every way (inside, across and over cached ranges: the cache keeps
    ranges, which a newer write cuts)."""
    path = make_image(tmp_path_factory.mktemp("m") / "d.img", 24 * SECTOR)

    async def run() -> None:
        dev = await BlockDevice.open(path, cache_limit=8 * SECTOR, faults=FaultPlan(torn=0.5, seed=len(ops)))
        lender = Lender()
        now: dict[int, bytes] = {}  # sector -> what it holds
        # sector -> what the image may hold there: what the last flush or FUA made durable, or
        # a version written since (the cache may have destaged it on its own)
        since: dict[int, list[bytes]] = {}
        for op, start, n, *byte in ops:
            n = min(n, 24 - start)
            if op == "cut":  # the image holds, sector by sector, any version the cache may have landed
                dev.power_cut()
                break
            if op in ("write", "lend", "fua", "discard", "during"):
                data = b"".join(sector((byte[0] + k) % 256) for k in range(n)) if byte else bytes(n * SECTOR)
                if op == "during":  # the destage has its snapshot and is in the executor: the write lands after it
                    destage = dev.destage_in_background()
                    await asyncio.sleep(0)
                    await lender.write(dev, start * SECTOR, data)
                    await destage
                elif op == "lend":
                    await lender.write(dev, start * SECTOR, data)
                elif op == "discard":
                    await dev.discard(start * SECTOR, n * SECTOR)
                else:
                    await dev.write(start * SECTOR, data, fua=op == "fua")
                for k in range(n):
                    now[start + k] = data[k * SECTOR : (k + 1) * SECTOR]
                    since[start + k] = [now[start + k]] if op == "fua" else [*since.get(start + k, [bytes(SECTOR)]), now[start + k]]
            elif op == "flush":
                await dev.flush()
                since = {s: [data] for s, data in now.items()}
            elif op == "destage":
                await dev.destage_in_background()
            got = await dev.read(start * SECTOR, n * SECTOR)
            assert got == b"".join(now.get(start + k, bytes(SECTOR)) for k in range(n))
        else:
            await dev.settle()
        image = on_disk(path, 0, 24 * SECTOR)
        for s in range(24):
            assert image[s * SECTOR : (s + 1) * SECTOR] in since.get(s, [bytes(SECTOR)])
        if dev.dead:
            assert not lender.out, "a lent buffer never given back"
            return
        await dev.close()
        assert not lender.out, "a lent buffer never given back"
        image = on_disk(path, 0, 24 * SECTOR)
        assert all(image[s * SECTOR : (s + 1) * SECTOR] == data for s, data in now.items())

    asyncio.run(run())


async def test_a_large_read_keeps_the_lent_buffers_it_overlays_until_it_has(tmp_path, monkeypatch):
    """A read past SYNC_READ takes the cached writes it covers, then awaits the executor's pread: a
    lent one superseded and destaged meanwhile must not go back (and be sealed into) before the
    read has copied from it."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    lender = Lender()
    n = blockdev.SYNC_READ // SECTOR + 1
    await lender.write(dev, 0, sector(1, n))
    gate, entered = hold(monkeypatch, "_a_pread")
    read = asyncio.ensure_future(dev.read(0, n * SECTOR))
    await entered.wait()
    await dev.write(0, sector(2, n))
    await dev.flush()
    assert lender.out, "given back while a read still overlays it"
    gate.set()
    assert await read == sector(1, n)
    assert not lender.out
    await dev.close()


@pytest.mark.parametrize("call", ["fua", "flush_then_fua"])
async def test_a_torn_cut_after_a_fua_landed_does_not_land_the_older_cached_copy_over_it(tmp_path, monkeypatch, call):
    """A FUA write whose piece landed before the cut completes (``_host``), so its data must be
    what the image holds: the torn fault lands cached sectors at the cut, and the cache still
    holds the older copy the FUA write superseded (taken out only once the call is back on the
    loop) -- landed after the FUA data, it put the older write over an acknowledged one, a state
    no prefix of the write log names."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan(torn=1.0))
    log = dev.start_log()
    await dev.write(SECTOR, sector(1))
    name = {"fua": "_a_fua", "flush_then_fua": "_a_flush_fua"}[call]
    gate = Gate(getattr(blockdev, name), after=True)  # the host call done, the loop not yet back
    monkeypatch.setattr(blockdev, name, gate)
    running = asyncio.ensure_future(dev.write(SECTOR, sector(2), fua=True) if call == "fua"
                                    else dev.flush_then_fua(SECTOR, sector(2)))
    await gate.entered.wait()
    dev.power_cut()
    gate.release.set()
    await running  # every piece landed before the cut: acknowledged
    assert on_disk(path, SECTOR, SECTOR) == sector(2)
    assert on_disk(path, 0, 4 * SECTOR) in crash_images(log, str(tmp_path / "s.img"), 4 * SECTOR)
    await dev.close()


async def test_a_flush_the_cut_overtook_before_its_snapshot_fails(tmp_path, monkeypatch):
    """A flush called before a cut but taking its snapshot after it (here held at its latency
    wait) finds the cache the cut dropped empty: it must fail, not report durable the writes
    completed before it was called, which the cut lost."""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path)
    await dev.write(0, sector(1))
    gate = Gate(dev._delay)
    monkeypatch.setattr(dev, "_delay", gate)
    flushing = asyncio.ensure_future(dev.flush())
    await gate.entered.wait()
    dev.power_cut()
    gate.release.set()
    with pytest.raises(DeviceIOError, match="power cut"):
        await flushing
    assert on_disk(path, 0, SECTOR) == bytes(SECTOR)
    await dev.close()


@pytest.mark.parametrize("end", ["flush", "cut"])
@pytest.mark.parametrize("call, held", [("fua", "host call"), ("fua", "destage lock"), ("flush_then_fua", "host call")])
async def test_a_plain_write_completing_while_a_fua_write_is_in_flight_is_ordered_as_the_log_orders_it(
        tmp_path, monkeypatch, call, held, end):
    """A FUA write and a plain write to the same sector in flight together, the plain one
    completing first (while the FUA write waits for the destage lock or its host call): the log
    records them in completion order, the FUA write last, so every crash state from there on
    holds the FUA data. The device must agree: reads then, and the image after a flush, give the
    FUA data, and a torn cut lands no cached plain copy over it. (The cache used to keep the
    plain write as the newest copy: reads and the flush gave the plain data, a state no crash
    state of the log names.)"""
    path = make_image(tmp_path / "d.img")
    dev = await BlockDevice.open(path, faults=FaultPlan(torn=1.0))
    log = dev.start_log()
    await dev.write(SECTOR, sector(1))
    name = "_a_destage" if held == "destage lock" else {"fua": "_a_fua", "flush_then_fua": "_a_flush_fua"}[call]
    gate = Gate(getattr(blockdev, name))
    monkeypatch.setattr(blockdev, name, gate)
    destage = dev.destage_in_background() if held == "destage lock" else None
    running = asyncio.ensure_future(dev.write(SECTOR, sector(2), fua=True) if call == "fua"
                                    else dev.flush_then_fua(SECTOR, sector(2)))
    await (gate.entered.wait() if destage is None else asyncio.sleep(0))  # the FUA write waits for the lock
    await dev.write(SECTOR, sector(3))  # completes first
    gate.release.set()
    await running
    if destage is not None:
        await destage
    order = [(e.kind, e.data[:1]) for e in log.entries if e.kind in ("write", "fua")]
    assert order[-2:] == [("write", b"\x03"), ("fua", b"\x02")]
    assert await dev.read(SECTOR, SECTOR) == sector(2)
    if end == "flush":
        await dev.flush()
        assert on_disk(path, SECTOR, SECTOR) == sector(2)
        assert set(crash_images(log, str(tmp_path / "s.img"), 2 * SECTOR, len(log.entries))) == {
            bytes(SECTOR) + sector(2)}
    else:  # torn=1.0: every cached sector lands
        completed = len(log.entries)
        dev.power_cut()
        assert on_disk(path, 0, 2 * SECTOR) in crash_images(log, str(tmp_path / "s.img"), 2 * SECTOR, completed)
    await dev.close()


log_ops = st.lists(st.tuples(st.sampled_from(["write", "discard", "fua", "flush", "mark"]), st.integers(0, 10)),
                   max_size=60)


@settings(max_examples=200)
@given(log_ops, log_ops)
def test_the_write_logs_split_is_the_scan_of_its_prefix(first, more):
    """``WriteLog.split`` (an index built once per log length) against its definition, a scan of
    the prefix: durable = the writes and discards a completed flush covers, and every FUA
    write; in doubt = the other writes and discards -- at every prefix length, and again after
    more entries are logged (the index rebuilt). A flush covers some of the entries before it."""
    log = WriteLog()

    def scan(upto: int) -> tuple[list[int], list[int]]:
        head = log.entries[:upto]
        covered = max((e.covers for e in head if e.kind == "flush"), default=0)
        durable = [e.seq for e in head if e.kind in ("write", "discard") and e.seq < covered or e.kind == "fua"]
        return durable, [e.seq for e in head if e.kind in ("write", "discard") and e.seq >= covered]

    for ops in (first, more):
        for kind, back in ops:
            seq = len(log.entries)
            log.append(kind, covers=max(0, seq - back) if kind == "flush" else None)
        for upto in range(len(log.entries) + 2):
            durable, doubt = log.split(upto)
            assert ([e.seq for e in durable], [e.seq for e in doubt]) == scan(upto), upto
