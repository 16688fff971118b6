"""A workload's recorded write log does not depend on thread timing: an fsync that commits
returns before its commit's tail (mirrors, a flush, the freed extents given back), which in use
races the next operation's writeback; the recorder puts the tail at one point, in either of two
orders, and a campaign checks both where they differ (DESIGN §10)."""
from __future__ import annotations

import asyncio
import random
from typing import Any, Awaitable, Literal

import pytest

from blockemu.device.writelog import WriteLog
from blockemu.fs.filesystem import Filesystem
from blockemu.fs.volume import Volume
from blockemu.workload import crash
from blockemu.workload.crash import Recorder, Workload, ace_workload, group_workload, run_recorded
from blockemu.workload.writepath import PRODUCTION
from tests.util import PRODUCTION_4K, Gate

Timing = Literal["early", "late"]
# `crash --max-ops 2`'s workload 22 (24 since the link operation; seeded 22 here): 55 or 52 states
WORKLOAD_22 = (("creat", "/B/foo"), ("write", "/A/foo"))


class TailTiming:
    """Plays the two ends of the thread timing a commit's tail runs on, on ``vol``'s device:
    ``early``, its flush completes before anything else is written (a write issued meanwhile
    waits for it); ``late``, the flush starts only once a write was logged after it was called
    -- or once something waits for it (a commit call in progress, the commit lock wanted),
    before which nothing more is written. No sleeps: the schedule is driven."""

    def __init__(self, vol: Volume, timing: Timing) -> None:
        self.vol, self.timing = vol, timing
        self.waiting = 0  # commit calls in progress and tasks waiting for the commit lock
        self.news = asyncio.Event()
        self.flushed: asyncio.Event | None = None  # set once the flush in flight completes
        self.real_flush, self.real_writev = vol.device.flush, vol.device.writev
        self.real_commit, self.real_acquire = vol.commit, vol.commit_lock.acquire
        vol.device.flush, vol.device.writev = self.flush, self.writev  # type: ignore[method-assign]
        vol.commit, vol.commit_lock.acquire = self.commit, self.acquire  # type: ignore[method-assign]

    async def flush(self) -> None:
        log = self.vol.device.log
        assert log is not None
        at = len(log.entries)
        while self.timing == "late" and len(log.entries) == at and not self.waiting:
            self.news.clear()
            await self.news.wait()
        self.flushed = asyncio.Event()
        try:
            await self.real_flush()
        finally:
            self.flushed.set()

    async def writev(self, writes: list[tuple[int, bytes]], **kw: Any) -> None:
        if self.timing == "early" and self.flushed is not None:
            await self.flushed.wait()
        await self.real_writev(writes, **kw)  # fua=, releases= (lent buffers)
        self.news.set()

    async def waited(self, step: Awaitable[Any]) -> Any:
        self.waiting += 1
        self.news.set()
        try:
            return await step
        finally:
            self.waiting -= 1

    async def commit(self, **kw: Any) -> bool:
        return await self.waited(self.real_commit(**kw))

    async def acquire(self) -> Literal[True]:
        return await self.waited(self.real_acquire())


def timed(workload: Workload, timing: Timing) -> Workload:
    async def run(fs: Filesystem, rec: Recorder) -> None:
        TailTiming(fs.vol, timing)
        await workload(fs, rec)
    return run


def shape(log: WriteLog) -> list[tuple[str, int, int]]:
    """What the crash states are made of: each entry's kind, offset and length (file contents
    carry timestamps, which differ from run to run)."""
    return [(e.kind, e.offset, len(e.data)) for e in log.entries]


@pytest.mark.parametrize("hold_tails", [True, False], ids=["tails-held", "tails-first"])
@pytest.mark.parametrize("name, workload, seed", [("22", ace_workload(WORKLOAD_22, 22), 22),
                                                  ("group", group_workload(110), 110)])
async def test_the_recorded_log_is_the_same_whatever_the_tails_timing(tmp_path, hold_tails, name, workload, seed):
    """Workload 22 recorded 55 crash states in most runs and 52 in some, as the first fsync's
    commit tail flushed before or after the write's data: recorded with the tail's flush forced
    early and late, twice each, every log is the same, in either order the recorder drives."""
    logs, counts, overtaken = [], set(), set()
    for timing in ("early", "late", "early", "late"):
        rec = await run_recorded(timed(workload, timing), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                                 write_path=PRODUCTION, hold_tails=hold_tails)
        logs.append(shape(rec.log))
        counts.add(len(list(rec.log.crash_states(random.Random(seed), subsets=2))))
        overtaken.add(rec.overtaken)
    assert all(log == logs[0] for log in logs) and len(counts) == 1, counts
    # the write is written back while the fsync's tail before it is held; a group's next
    # members wait for the commit lock as a member's commit ends, so its tail goes at once
    assert len(overtaken) == 1 and (overtaken != {None}) == (hold_tails and name == "22"), overtaken


async def test_a_campaign_checks_both_orders_where_they_differ(monkeypatch):
    """Workload 22's write overtakes the held tail of the fsync before it, so its crash states
    are checked in both orders -- the second's past the entries both log alike, and named so in
    a failure; workload 0's (one creat) in one order."""
    checked, parts = [], []
    real_sample, real_record = crash.check_sample, crash.run_recorded

    async def spy_sample(log, models, work, states, result, name, *args):
        checked.append((name, min(st.upto for st in states)))
        return await real_sample(log, models, work, states, result, name, *args)

    async def spy_record(*args, **kw):
        rec = await real_record(*args, **kw)
        parts.append(rec.overtaken)
        return rec

    monkeypatch.setattr(crash, "check_sample", spy_sample)
    monkeypatch.setattr(crash, "run_recorded", spy_record)
    for unit, seq in ((0, crash.ace_space(2, 0, None)[0]), (22, WORKLOAD_22)):
        result = await crash.run_ace([seq], seed=unit, first=unit)
        assert result.workloads == 1 and not result.failures, result.failures[:3]
    assert [n for n, _ in checked] == ["[creat /A/foo]", "[creat /B/foo ; write /A/foo]",
                                       "[creat /B/foo ; write /A/foo] (commit tails first)"]
    assert parts[0] is None and parts[1] is not None and checked[1][1] <= parts[1] < checked[2][1], (parts, checked)


async def overwrite_stalled_while_the_lock_is_wanted(fs: Filesystem, rec: Recorder) -> None:
    """A new file's fsync commits (a name), returning before its tail; then an overwrite's
    writeback allocates its extent and its device write stalls (held at the device) until
    another task -- as a group of fsyncs starts by doing -- has waited for and taken the commit
    lock, which is what lets a held tail go."""
    await rec.mkdir("/A")
    async with fs.open("/A/f", "w") as f:
        await f.write(bytes(4096))
    await fs.sync()
    await rec.persisted()
    async with fs.open("/A/g", "x") as g:
        await g.write(bytes(4096))
        await g.fsync()
    await rec.persisted()
    stall = Gate(fs.vol.device.writev)
    fs.vol.device.writev = stall  # type: ignore[method-assign]

    async def wants_the_lock() -> None:
        await stall.entered.wait()  # the overwrite's extent is allocated, its write not logged
        async with fs.vol.commit_lock:
            pass
        stall.release.set()
    try:
        async with fs.open("/A/f", "r+") as f:
            await f.pwrite(b"x" * 4096, 0)
            await asyncio.gather(f.fsync(), wants_the_lock())
    finally:
        del fs.vol.device.writev
    await rec.persisted()


async def test_an_allocation_whose_write_stalls_overtakes_a_held_tail(tmp_path):
    """When the lock is wanted, the held tail's freed extents are still pinned, and the
    overwrite has been placed without them: nothing logged since the hold and no tree changed,
    yet in the other order (the tail first) the write fills the hole they leave and the logs
    part there. The recorder judged by log growth and dirty trees alone, called it not
    overtaken, and a campaign would never have checked the other order; it must say where the
    logs may part (the allocator changed), and they must be the same up to there."""
    recs = [await run_recorded(overwrite_stalled_while_the_lock_is_wanted, str(tmp_path / "w.img"),
                               str(tmp_path / "base.img"), write_path=PRODUCTION_4K, hold_tails=hold_tails)
            for hold_tails in (True, False)]
    held, first = (shape(rec.log) for rec in recs)
    assert held != first  # the premise: the orders place the overwrite differently
    at = recs[0].overtaken
    assert at is not None and held[:at] == first[:at], (at, held, first)
