"""The fio jobs' fsync ledger (``workload/fioledger.py``): after a power cut, the bytes it calls
durable are on the disk -- no false alarm over an honest filesystem -- and a lost fsync is
caught."""
from __future__ import annotations

import asyncio
import contextlib
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

import blockemu
from blockemu.workload.fioledger import FileShadow, FsyncLedger

S = 4096
op = st.one_of(
    st.tuples(st.just("pwrite"), st.integers(0, 12 * S), st.integers(1, 3 * S), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 14 * S)),
    st.tuples(st.just("punch"), st.integers(0, 12 * S), st.integers(1, 3 * S)),
    st.tuples(st.just("fsync")),
    # the same file opened by another job that spells its path another way
    st.tuples(st.just("pwrite"), st.integers(0, 12 * S), st.integers(1, 3 * S), st.integers(0, 255), st.just(1)),
    st.tuples(st.just("fsync"), st.just(1)),
)


async def cut_after(ops: list[tuple], fsync_works: bool = True, before: bytes = b"") -> list[str]:
    """Run ``ops`` on a file through the ledger, cut the power, mount again: the ledger's losses.
    ``before``: what the file holds, durable, before the ledger opens it; an op whose last
    element is 1 goes through a second handle on the file, opened as ``/./f``."""
    with tempfile.TemporaryDirectory() as d:
        image = f"{d}/l.img"
        await blockemu.mkfs(image, size="32M")
        async with blockemu.mount(image) as fs, fs.open("/f", "w") as f:
            await f.write(before)
        ledger = FsyncLedger()
        fs = await blockemu.mount(image, interval=3600)
        handles = [ledger.wrap(path, await fs.open(path, "r+"), job) for path, job in (("/f", "job"), ("/./f", "other"))]
        if not fsync_works:
            async def lie() -> None:
                return None
            for f in handles:
                f._file.fsync = lie  # type: ignore[attr-defined]
        for o in ops:
            f = handles[o[-1] if o[0] in ("pwrite", "fsync") and len(o) in (2, 5) else 0]
            if o[0] == "pwrite":
                await f.pwrite(bytes([o[3]]) * o[2], o[1])
            elif o[0] == "truncate":
                await f.truncate(o[1])
            elif o[0] == "punch":
                await f.punch_hole(o[1], o[2])
            else:
                await f.fsync()
        fs.power_cut()
        for f in handles:
            with contextlib.suppress(OSError):
                await f.close()
        with contextlib.suppress(OSError):  # what was not durable is lost, and the unmount may say so
            await fs.unmount()
        async with blockemu.mount(image) as fs:
            return (await ledger.check(fs))[1]


@settings(max_examples=120, deadline=None)
@given(st.lists(op, max_size=12))
def test_what_the_ledger_calls_durable_survives_a_power_cut(ops):
    assert asyncio.run(cut_after(ops)) == []


def test_a_lost_fsync_is_caught():
    """The check breaks when the filesystem does: an fsync that makes nothing durable."""
    lost = asyncio.run(cut_after([("pwrite", 0, 3 * S, 7), ("fsync",)], fsync_works=False))
    assert lost and ("missing after the power cut" in lost[0] or "differ after the power cut" in lost[0])


def test_bytes_the_ledger_never_saw_are_not_called_durable_zeros_by_a_grow():
    """A file holding bytes before its job opened it, grown by a truncate (ftruncate's I/O) and
    fsynced: the ledger called the old bytes durable zeros, and the check a loss."""
    assert asyncio.run(cut_after([("truncate", 8 * S), ("fsync",)], before=b"old!" * S)) == []


def test_two_spellings_of_a_path_share_a_shadow():
    """Jobs naming one file ``f`` and ``./f``: the second's overwrite, fsynced, was the first's
    loss while each had its own shadow."""
    assert asyncio.run(cut_after([("pwrite", 0, 2 * S, 1), ("fsync",), ("pwrite", 0, 2 * S, 2, 1), ("fsync", 1)])) == []


def test_a_change_another_fsync_took_is_not_called_durable_by_one_begun_before_it():
    """Fsync A begins, the byte changes, fsync B begins (taking the change), A returns, and the
    power cut fails B: the disk holds the byte as A found it. A called the new byte durable
    (it read "changed while I ran" from what was pending, which B had taken) -- a false loss
    three clones sharing a file hit at fsync=3."""
    shadow = FileShadow("job")
    shadow.changed(0, b"ax")
    a = shadow.syncing()
    shadow.changed(0, b"b")
    b = shadow.syncing()
    shadow.synced(a)
    shadow.unsynced(b)
    assert shadow.losses("/f", b"ax") == []
    assert shadow.losses("/f", b"a?")  # what A made durable, and nothing changed since, stays checked


def test_a_truncate_while_an_fsync_runs_cuts_what_it_took():
    """An fsync takes [0, 10), a truncate to 2 runs meanwhile, a write at 5 grows the file again:
    the fsync's return called [2, 5) -- a hole the truncate left, never written -- durable."""
    shadow = FileShadow("job")
    shadow.changed(0, b"x" * 10)
    a = shadow.syncing()
    shadow.truncated(10, 2)
    shadow.changed(5, b"y")
    shadow.synced(a)
    assert shadow.losses("/f", b"xx") == []
    assert shadow.losses("/f", b"x?")


async def lost_then_fsynced(report: str) -> list[str]:
    """A job's write is lost in background writeback; one handle reports it (its fsync, or its
    close), a handle opened after the report writes elsewhere and fsyncs -- success, as each
    handle hears a loss once -- then the power is cut: the ledger's losses."""
    from blockemu.device.faultplan import FaultPlan
    from tests.util import fail_next_data_write

    with tempfile.TemporaryDirectory() as d:
        image = f"{d}/l.img"
        await blockemu.mkfs(image, size="32M")
        ledger = FsyncLedger()
        fs = await blockemu.mount(image, interval=3600)
        x = ledger.wrap("/f", await fs.open("/f", "w+"), "x")
        await x.pwrite(b"k" * S, 0)
        await x.fsync()
        await fail_next_data_write(fs)
        await x.pwrite(b"l" * S, S)
        await fs.writeback.flush_inode(x._file.inode)
        fs.vol.device.faults = FaultPlan()
        with contextlib.suppress(OSError):
            await (x.fsync() if report == "fsync" else x.close())
        y = ledger.wrap("/f", await fs.open("/f", "r+"), "y")
        await y.pwrite(b"m" * S, 2 * S)
        await y.fsync()
        fs.power_cut()
        for f in (x, y):
            with contextlib.suppress(OSError):
                await f.close()
        with contextlib.suppress(OSError):
            await fs.unmount()
        async with blockemu.mount(image) as fs:
            return (await ledger.check(fs))[1]


def test_a_loss_one_handle_reported_is_not_called_durable_by_a_later_fsync():
    """A loss is reported once per handle (DESIGN §5): the fsync after the report returns
    success, and the ledger, which kept the failed fsync's ranges pending, called the lost
    bytes durable -- a false loss after the cut."""
    assert asyncio.run(lost_then_fsynced("fsync")) == []
    assert asyncio.run(lost_then_fsynced("close")) == []


def test_a_lost_fsync_of_unaligned_writes_is_caught():
    """Blocks a write covers in part are kept byte for byte: a lying fsync is caught there too,
    at the first byte it lost."""
    lost = asyncio.run(cut_after([("pwrite", 100, 300, 7), ("pwrite", 5000, 2 * S, 8), ("fsync",)],
                                 fsync_works=False, before=b"o" * 3 * S))
    assert lost == ["job: /f: bytes [100, 400) differ after the power cut, though an fsync made them durable",
                    "job: /f: bytes [5000, 13192) differ after the power cut, though an fsync made them durable"]


def test_the_shadow_of_a_large_job_is_a_small_fraction_of_what_it_wrote():
    """A 1 GiB fio job with a power cut planned peaked at 5.4 GB: the shadow kept three bytes
    per byte written. Whole blocks are hashes now: 64 MiB written, fsynced, overwritten in
    part, in under a tenth of it (as 17 bytes per 512, plus what a call holds for a while)."""
    import tracemalloc

    data = bytes(range(256)) * 4096  # 1 MiB, made before the count starts
    tracemalloc.start()
    try:
        shadow = FileShadow("job")
        for i in range(64):
            shadow.changed(i << 20, data)
        shadow.synced(shadow.syncing())
        for i in range(0, 64, 2):
            shadow.changed(i << 20, data[: 1 << 19])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (64 << 20) // 10, peak
    assert shadow.losses("/f", data * 64) == []
    assert shadow.losses("/f", data * 63 + bytes(1 << 20)) == [
        f"job: /f: bytes [{63 << 20}, {64 << 20}) differ after the power cut, though an fsync made them durable"]
