"""The checks themselves can fail: the key-removal race and the stress mix judge what is on
disk after a fresh mount, a lost append is silent unless an error for its file reported it in
time, and the crash campaigns and stress run the production write path (sealing workers,
1 MiB extents) -- each shown by planting the bug the old check could not see."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import re
from typing import Any, AsyncIterator, Callable

import pytest

import blockemu
from blockemu.crypto import sealer
from blockemu.device.faultplan import FaultPlan
from blockemu.errors import DeviceIOError
from blockemu.fs.pagecache import PAGE, Run
from blockemu.fs.writeback import Writeback
from blockemu.workload.crash import CampaignResult, ace_workload, check_states, record, run_ace
from blockemu.workload.keyrace import AppendLedger, Race, RaceResult, read_back, run_race, unexpected
from blockemu.workload.mix import MixResult, Task
from blockemu.workload.runner import run_workload, stress_mix
from blockemu.workload.writepath import FAST, KEY, PRODUCTION
from tests.test_cli import run
from tests.util import fail_next_data_write


class SkipDataWrites:
    """The planted bug: writeback marks a run's pages clean without writing them (no device
    write, no extent) -- while ``on`` and for the runs ``which`` selects, whether written on
    their own or in a batch (of one file's runs or several files'). The pages stay in the
    page cache, so a check that reads through it still sees the data."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, which: Callable[[Run], bool] = lambda run: True) -> None:
        self.on = True
        self.skipped = 0
        write_run, write_batch = Writeback._write_run, Writeback._write_batch

        def skips(run: Run) -> bool:
            if self.on and which(run):
                self.skipped += 1
                return True
            return False

        async def planted(wb: Writeback, inode, run: Run, turn) -> None:
            if not skips(run):
                await write_run(wb, inode, run, turn)

        async def planted_batch(wb: Writeback, pieces, turn) -> None:
            kept = [(inode, run) for inode, run in pieces if not skips(run)]
            if kept:
                await write_batch(wb, kept, turn)

        monkeypatch.setattr(Writeback, "_write_run", planted)
        monkeypatch.setattr(Writeback, "_write_batch", planted_batch)


def count_worker_seals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts extents sealed in a worker process (not in a thread of this one)."""
    calls = [0]
    send = sealer._Worker.send

    def counting(self, *args):
        calls[0] += 1
        return send(self, *args)

    monkeypatch.setattr(sealer._Worker, "send", counting)
    return calls


# ------------------------------------------------------------------ the race's per-append ledger

def test_a_report_covers_only_appends_acknowledged_before_it_and_after_the_last_good_fsync():
    """Counting "any report after the append" would call all four losses reported."""
    ledger = AppendLedger()
    ledger.acked(0, b"A")
    ledger.acked(1, b"B")
    ledger.synced()  # vouched for A and B: a later report cannot be theirs
    ledger.reported()
    ledger.acked(2, b"C")  # acknowledged after the only report
    ledger.synced()
    ledger.acked(3, b"D")
    ledger.reported()  # D's
    r = RaceResult("hard", 0, "seeded")
    ledger.judge(b"", r)
    assert (r.lost, r.lost_reported, r.silent) == (4, 1, 3)
    r = RaceResult("hard", 0, "seeded")
    ledger.judge(b"ABCX", r)  # only D missing: reported
    assert (r.lost, r.lost_reported, r.silent) == (1, 1, 0)


@pytest.mark.parametrize("mode", ["soft", "hard"])
async def test_race_counts_pages_marked_clean_but_never_written_as_silent_loss(monkeypatch, mode):
    """At the race's final fsync writeback drops the file's dirty pages without writing them
    and without an error. The old oracle read the file through the same page cache (the
    pages are still there) and found nothing lost; read from a fresh mount they are missing,
    and nothing reported them."""
    plant = SkipDataWrites(monkeypatch)
    plant.on = False
    finish = Race.finish

    async def planted_finish(race: Race) -> None:
        plant.on = True
        await finish(race)

    monkeypatch.setattr(Race, "finish", planted_finish)
    r = await run_race(mode, seed=1, schedule="seeded", steps=300)
    assert plant.skipped
    assert r.silent > 0 and unexpected(r), r


async def test_race_judges_from_disk(tmp_path, monkeypatch):
    """Step the race by hand: two appends written back, a third acknowledged while the plant
    is on. Through the live mount all three read back; from disk the third is lost, silently."""
    plant = SkipDataWrites(monkeypatch)
    plant.on = False
    img = str(tmp_path / "r.img")
    await blockemu.mkfs(img, size="64M")
    result = RaceResult("soft", 0, "seeded")
    async with blockemu.mount(img, interval=3600) as fs:
        race = Race(fs, result, random.Random(0))
        await race.setup()
        appender = race.appender()
        for _ in range(6):  # open, write, close: two appends
            await anext(appender)
        await fs.sync()
        plant.on = True
        for _ in range(3):
            await anext(appender)
        await appender.aclose()
        await race.finish()
        async with fs.open("/dir/file") as f:
            assert await f.read() == b"ABC"  # what the old oracle saw
    race.ledger.judge(await read_back(img, "/dir/file"), result)
    assert (result.acknowledged, result.lost, result.silent) == (3, 1, 1)


async def mix_tasks(fs, n: int) -> tuple[MixResult, list[Task]]:
    """``n`` mix tasks in /t0, /t1, ..., reporting to one result, as the mix makes them."""
    result = MixResult()
    result.tasks = [Task(fs, f"/t{i}", random.Random(i), result) for i in range(n)]
    for t in result.tasks:
        await fs.mkdir(t.root)
    return result, result.tasks


async def test_a_sync_records_no_path_whose_write_is_still_in_flight(tmp_path, monkeypatch):
    """The stress ledger after a sync holds only what was acknowledged when sync was called. A
    write another task has begun but not finished (here: held waiting for room) may land in
    that sync or not; recording the path with its old content made a later power cut look
    like a lost acknowledged write (seen once in ~10 runs of seed 61 with cut=1500)."""
    img = str(tmp_path / "l.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, interval=3600) as fs:
        result, (a, b) = await mix_tasks(fs, 2)
        await b.step("create")
        (path,) = b.files
        held, release = asyncio.Event(), asyncio.Event()

        async def wait_for_room(n: int) -> None:
            held.set()
            await release.wait()

        monkeypatch.setattr(fs.writeback, "over_limit", lambda n: True)
        monkeypatch.setattr(fs.writeback, "wait_for_room", wait_for_room)
        writing = asyncio.create_task(b.step("append"))
        await held.wait()  # b's append is acknowledged by nobody yet
        monkeypatch.undo()
        syncing = asyncio.create_task(a.step("sync"))
        await asyncio.sleep(0)  # the sync has taken its snapshot
        release.set()  # b's append lands while the sync writes back
        await asyncio.gather(writing, syncing)
        assert path not in result.durable or result.durable[path] == bytes(b.files[path])


async def test_a_sync_whose_writeback_lost_data_records_nothing_in_the_ledger(tmp_path):
    """A sync that raises acknowledged nothing: the stress ledger must not take the files it
    wrote back as durable. Before sync reported writeback errors (syncfs semantics) it
    returned success after another task's acknowledged write was dropped with EIO, and the
    ledger recorded that file's model -- data the disk never got."""
    img = str(tmp_path / "l.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, interval=3600) as fs:
        result, (a, b) = await mix_tasks(fs, 2)
        await fs.sync()
        await b.step("create")  # acknowledged, still dirty
        (path,) = b.files
        assert b.files[path]
        await fail_next_data_write(fs, len(b.files[path]))
        await a.step("sync")
        fs.vol.device.faults = FaultPlan()
        assert len(result.errors) == 1 and result.errors[0].startswith("sync: ")
        assert path not in result.durable
        await b.step("read")  # the file's own close reports the loss too, and taints it
        assert len(result.errors) == 2 and path in b.tainted


@contextlib.asynccontextmanager
async def fresh_mix(tmp_path, n: int) -> AsyncIterator[tuple[Any, MixResult, list[Task]]]:
    """A fresh image, mounted, with ``n`` mix tasks on it."""
    img = str(tmp_path / "l.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, interval=3600) as fs:
        yield (fs, *await mix_tasks(fs, n))


async def lost_write(fs, t: Task) -> str:
    """``t`` creates a file whose writeback then fails: its data is lost, the loss not yet
    reported to anyone. Returns its path."""
    await fs.sync()
    await t.step("create")
    (path,) = t.files
    assert t.files[path]
    await fail_next_data_write(fs, len(t.files[path]))
    await fs.write_out()  # which reports no error
    fs.vol.device.faults = FaultPlan()
    return path


async def test_a_sync_after_another_task_s_failed_sync_vouches_for_none_of_its_losses(tmp_path):
    """A sync reports each loss once (syncfs on one descriptor): after task a's sync failed for
    b's lost file, b's own sync returns success over it. Only a's files were tainted, so b's
    sync put the file in the ledger with data the disk never got (``stress --faults
    eio=30M-60M:w``: 'fsync-acknowledged 260387 bytes, after the crash 0 differ')."""
    async with fresh_mix(tmp_path, 2) as (fs, result, (a, b)):
        path = await lost_write(fs, b)
        await a.step("sync")
        assert len(result.errors) == 1 and path in b.tainted
        await b.step("sync")
        assert len(result.errors) == 1 and path not in result.durable
        await b.step("read")  # the file's own close reports its loss (else the unmount does)


async def test_an_fsync_after_the_loss_was_reported_vouches_for_nothing(tmp_path):
    """A file's lost writeback is reported once (its close, here a read's): the next fsync
    returns success, and recorded the model -- with the lost data -- in the ledger."""
    async with fresh_mix(tmp_path, 1) as (fs, result, (t,)):
        path = await lost_write(fs, t)
        await t.step("read")
        assert len(result.errors) == 1 and path in t.tainted
        await t.step("fsync")
        assert len(result.errors) == 1 and path not in result.durable


async def test_a_renamed_file_keeps_its_taint(tmp_path):
    """A fault left a file's content unknown; renamed, the model moved to the new name and the
    taint stayed on the old one, so a read of the new name was judged against the model
    ('read 67774 bytes, model has 47903' under ``eio=30M-60M:w``)."""
    async with fresh_mix(tmp_path, 1) as (fs, result, (t,)):
        path = await lost_write(fs, t)
        await t.step("read")
        await t.step("rename")
        (renamed,) = t.files
        assert renamed != path and renamed in t.tainted
        await t.step("read")
        assert not result.divergent


async def test_the_ledger_keeps_what_was_fsynced_before_the_power_cut(tmp_path):
    """After a power cut nothing reaches the disk, so the ledger is frozen as it stood: the
    operations the mix goes on running fail on the dead device and change nothing there. They
    dropped the files they touched from the ledger, and a ``cut=`` run checked none of the files
    fsynced before the cut (seed 3, ``cut=300``: 28 in the ledger at the cut, 0 checked). A
    sync's entry is the file's model itself, which a write acknowledged after the cut alters in
    place: the frozen entry must not change with it."""
    img = str(tmp_path / "l.img")
    await blockemu.mkfs(img, size="32M")
    fs = await blockemu.mount(img, interval=3600)
    try:
        result, (t,) = await mix_tasks(fs, 1)
        await t.step("create")
        await t.step("fsync")
        await t.step("sync")
        (path,) = t.files
        fsynced = bytes(t.files[path])
        assert result.durable == {path: fsynced} and result.durable[path] is t.files[path]
        fs.vol.device.power_cut()
        for op in ("overwrite", "append", "truncate", "fsync", "sync", "unlink"):
            await t.step(op)  # each fails (or is acknowledged into the page cache only)
        assert result.durable == {path: fsynced} and result.errors
    finally:  # the device is dead and the mount aborted: the unmount says what the mix lost
        with pytest.raises(OSError) as lost:
            await fs.unmount()
    assert lost.value.errno in (errno.EROFS, errno.EIO), lost.value
    async with blockemu.mount(img, interval=3600) as after:
        async with after.open(path) as f:
            assert await f.read() == fsynced  # what the ledger holds is what the crash left


def test_compare_modes_table_hard_loses_reported_soft_loses_nothing(tmp_path):
    out = run("stress", str(tmp_path / "race.img"), "--scenario", "key-removal-race", "--compare-modes",
              "--schedule", "seeded", "--ops", "800", "--seed", "5", "--force").stdout
    lines = out.splitlines()
    header = lines[1].split()
    assert header[:9] == ["mode", "attempted", "acked", "ENOKEY", "failed", "cut-off", "acked+lost", "lost,reported",
                          "lost,silent"]
    rows = {cells[0]: dict(zip(header[1:9], map(int, cells[1:9]))) for cells in map(str.split, lines[2:6])}
    assert set(rows) == {"soft", "hard", "sync", "deny-writes"}
    assert rows["soft"]["acked+lost"] == 0 and rows["soft"]["acked"] > 0
    assert rows["hard"]["acked+lost"] > 0
    assert rows["hard"]["lost,reported"] == rows["hard"]["acked+lost"] and rows["hard"]["lost,silent"] == 0
    assert all(r["lost,silent"] == 0 for r in rows.values())
    # the columns add up: hard mode's 117 attempted vs 28 acked + 83 ENOKEY left out the appends
    # whose own close reported a loss, and the one the end cut off
    assert all(r["attempted"] == r["acked"] + r["ENOKEY"] + r["failed"] + r["cut-off"] for r in rows.values()), rows
    assert rows["hard"]["failed"] > 0
    # the legend names the modes whose rows lost something: it said "hard and sync" over a sync row of 0
    lossy = [m for m in ("hard", "sync") if rows[m]["acked+lost"]]
    assert [line for line in lines if "cost: expected, but never silent" in line] == \
        [f"the losses in {' and '.join(lossy)} mode are what {'those' if len(lossy) > 1 else 'its'} semantics cost: "
         "expected, but never silent"]


# ------------------------------------------------------------------ the stress mix

async def test_stress_mix_catches_pages_marked_clean_but_never_written(tmp_path, monkeypatch):
    """No data ever reaches the disk, yet every page is marked clean: reads through the
    mount's cache still match the model (the old final check passed); from a fresh mount the
    files are empty."""
    SkipDataWrites(monkeypatch)
    summary = await stress_mix(str(tmp_path / "s.img"), seed=3, tasks=2, nops=20, duration=None,
                               faults=None, crash_points=0, write_path=FAST)
    assert summary["fsck"] == "clean"  # nothing points at unwritten data: only the oracle can tell
    assert not summary["ok"] and summary["lost_acknowledged_writes"] > 0
    assert any("on disk" in p for p in summary["problems"])


async def test_run_mix_jobs_are_checked_from_disk(tmp_path, monkeypatch):
    """``blockemu run``'s mix jobs: the same planted bug, caught on the fresh mount after the run."""
    SkipDataWrites(monkeypatch)
    job = tmp_path / "m.fio"
    job.write_text("[global]\nencrypt=1\n\n[m]\nkind=mix\nnumjobs=2\nnops=20\n")
    report = await run_workload(str(job), image=str(tmp_path / "m.img"), seed=2)
    assert report.fsck_clean and not report.ok
    assert any("on disk" in f for f in report.failures), report.failures


async def test_run_mix_jobs_report_the_operations_an_io_error_refused(tmp_path, monkeypatch):
    """A mix job's operations that failed with EIO (a sync or close reporting writeback that
    lost data) are counted in its report, not swallowed: the job's line said nothing of them."""
    async def fails(self, *args, **kw):
        raise DeviceIOError("planted write error")

    monkeypatch.setattr(Writeback, "_write_run", fails)
    monkeypatch.setattr(Writeback, "_write_batch", fails)
    job = tmp_path / "m.fio"
    job.write_text("[m]\nkind=mix\nnumjobs=1\nnops=30\n")
    report = await run_workload(str(job), image=str(tmp_path / "m.img"), seed=2)
    (mix,) = [j for j in report.jobs if j["kind"] == "mix"]
    assert mix["io_errors"] > 0
    assert f"io_errors={mix['io_errors']}" in "\n".join(report.text("normal"))


# ------------------------------------------------------------------ the production write path

SEQ = (("write", "/A/foo"), ("rename", "/A/foo", "/B/foo"))


async def test_crash_states_of_the_production_write_path(tmp_path, monkeypatch):
    """A workload writing over 1 MiB into encrypted files with sealing workers on; its crash
    states, each fsck'ed and mounted, hold an old or the new generation, whole."""
    seals = count_worker_seals(monkeypatch)
    w, base = str(tmp_path / "w.img"), str(tmp_path / "base.img")
    log, models = await record(ace_workload(SEQ, seed=4), w, base, write_path=PRODUCTION)
    assert seals[0] >= 2
    async with blockemu.mount(w) as fs:
        await fs.add_key(KEY)
        ino = (await fs.stat("/B/foo")).st_ino
        extents = [m.extent for m in fs.extents.mappings(ino)]
    assert any(e.disk_num_bytes == 1 << 20 and e.context is not None for e in extents), extents
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(4), 1, "production", result)
    assert result.states >= 10 and not result.failures, result.failures[:3]


async def test_a_large_extent_bug_is_caught_only_on_the_production_path(monkeypatch):
    """Planted: writeback drops every run big enough for the sealing workers. The fast
    campaign (16 KiB extents, the only one before) cannot see it; the production one does."""
    plant = SkipDataWrites(monkeypatch, lambda run: len(run.entries) * PAGE >= sealer.POOL_THRESHOLD)
    fast = await run_ace([SEQ], seed=4, subsets=1, write_path=FAST)
    assert not fast.failures and not plant.skipped
    production = await run_ace([SEQ], seed=4, subsets=1, write_path=PRODUCTION)
    assert plant.skipped and production.failures


async def test_stress_runs_the_production_write_path(tmp_path, monkeypatch):
    seals = count_worker_seals(monkeypatch)
    summary = await stress_mix(str(tmp_path / "p.img"), seed=7, tasks=2, nops=25, duration=None,
                               faults=None, crash_points=4, write_path=PRODUCTION)
    assert summary["ok"], summary["problems"]
    assert summary["crash_states_checked"] == 4
    assert seals[0] > 0


def test_cli_crash_and_stress_default_to_the_production_write_path():
    assert "production (default)" in run("crash", "--help").stdout
    out = json.loads(run("crash", "--max-ops", "1", "--limit", "1", "--jobs", "1", "--json").stdout)
    assert out["write_path"] == "production" and out["states"] > 0 and not out["failures"]


async def lone_task(fs, seed: int, scale: int, files: int = 0) -> tuple[Task, MixResult]:
    """One mix task working in /t, and the result it reports to, as the mix makes them; with
    ``files``, after it created that many, synced."""
    result = MixResult()
    task = Task(fs, "/t", random.Random(seed), result, scale=scale)
    result.tasks = [task]
    await fs.mkdir(task.root)
    if files:
        for _ in range(files):
            await task.step("create")
        await fs.sync()
    return task, result


async def test_a_read_the_device_refused_taints_its_own_file_at_most(tmp_path):
    """A read the device refused tainted every file of its task, as a failed sync must: the check
    after the run then skipped them all, though a read changes nothing. An injected EIO now
    taints the file read alone (its error may be the file's close reporting a lost writeback); a
    checksum's refusal (a flipped sector under flip=) taints nothing and is corruption detected."""
    import os

    async def read_until_refused(task: Task, result: MixResult) -> None:
        result.errors.clear()
        for _ in range(30):
            await task.step("read")
            if result.errors or result.detected:
                return
        raise AssertionError("no read was refused")

    img = str(tmp_path / "r.img")
    await blockemu.mkfs(img, size="64M")
    async with blockemu.mount(img, interval=3600) as fs:
        task, result = await lone_task(fs, seed=4, scale=1, files=6)
        where = [m.disk_at(0) for p, data in task.files.items() if data
                 for m in list(fs.extents.mappings((await fs.stat(p)).st_ino))[:1]]
    assert len(where) == sum(bool(d) for d in task.files.values()) > 1
    async with blockemu.mount(img, interval=3600) as fs:  # a cold cache: reads go to the device
        task.fs = fs
        fs.vol.device.faults = FaultPlan.parse("eio=0-64M:r")
        await read_until_refused(task, result)
        fs.vol.device.faults = FaultPlan()
    assert len(task.tainted) == 1 and result.errors[0].startswith(f"read {next(iter(task.tainted))}: "), \
        (result.errors, task.tainted)  # the file it read named: the device's error names the image
    task.tainted.clear()
    fd = os.open(img, os.O_RDWR)
    try:
        for at in where:  # every file's first data sector fails its checksum
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
    finally:
        os.close(fd)
    async with blockemu.mount(img, interval=3600) as fs:
        task.fs = fs
        await read_until_refused(task, result)
    # corruption detected (a sound device's run fails on it), not an I/O error
    assert not result.errors and "checksum" in result.detected[0] and not task.tainted, (result, task.tainted)


async def test_a_sync_ledger_copies_no_model_and_stays_right_after_later_changes(tmp_path):
    """A sync records every unchanged file's model in the ledger without copying it (copying
    every task's files on each sync cost the stress mix more than the sync's writeback); a
    file changed afterwards leaves the ledger before its model changes. An fsync records its
    file's model uncopied too, and the next change takes it out of the ledger first."""
    import tracemalloc

    img = str(tmp_path / "l.img")
    await blockemu.mkfs(img, size="64M")
    async with blockemu.mount(img, interval=3600) as fs:
        task, result = await lone_task(fs, seed=7, scale=16, files=12)
        models = sum(len(m) for m in task.files.values())
        assert models > 1 << 20
        tracemalloc.start()
        try:
            await task.step("sync")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < models // 4, f"a sync of clean files allocated {peak} bytes for {models} bytes of models"
        assert {p: bytes(m) for p, m in result.durable.items()} == {p: bytes(m) for p, m in task.files.items()}
        synced = {p: bytes(m) for p, m in task.files.items()}
        for op in ("write", "append", "truncate"):
            await task.step(op)
        changed = {p for p in synced if bytes(task.files.get(p, b"")) != synced[p]}
        assert changed and not changed & set(result.durable)
        assert all(bytes(m) == synced[p] for p, m in result.durable.items())
        fsynced = min(changed & set(task.files))
        task.rng.choice = lambda seq: fsynced  # the fsync and the append below take this file
        await task.step("fsync")
        assert result.durable[fsynced] is task.files[fsynced]
        await task.step("append")
        assert fsynced not in result.durable


async def test_the_mix_draws_its_data_from_the_task_pool_and_the_disk_holds_it(tmp_path, monkeypatch):
    """A task's writes are slices of its seeded pool (``randbytes`` per write was a tenth of the
    mix's loop time), not one more big-integer draw per write; what they wrote is on disk after
    a remount, every byte, and two writes' data differ."""
    img = str(tmp_path / "d.img")
    await blockemu.mkfs(img, size="64M")
    async with blockemu.mount(img, interval=3600) as fs:
        task, result = await lone_task(fs, seed=5, scale=4)

        def no_draws(n: int) -> bytes:
            raise AssertionError("a write drew its data from randbytes")

        monkeypatch.setattr(task.rng, "randbytes", no_draws)
        for op in ["create"] * 4 + ["write", "overwrite", "append"] * 4:
            await task.step(op)
        assert len({bytes(m[:4096]) for m in task.files.values() if len(m) >= 4096}) == \
            sum(len(m) >= 4096 for m in task.files.values())
    async with blockemu.mount(img, interval=3600) as fs:
        await task.verify(fs, result)
    assert result.ops == 16 and not result.divergent, result.divergent


async def test_a_create_refused_by_enospc_at_its_write_leaves_no_divergence(tmp_path):
    """On a full image a create's open made the file and its write failed with ENOSPC before
    acknowledging anything: the empty file on disk is right (as open(O_CREAT) + write on Linux),
    but the model, which adds a file only once written, had it absent and the path untainted --
    ``stress --ops 2000`` on its 256M image reported dozens of 'lost acknowledged writes'."""
    img = str(tmp_path / "full.img")
    await blockemu.mkfs(img, size="16M")
    async with blockemu.mount(img, interval=3600) as fs:
        task, result = await lone_task(fs, seed=3, scale=16)
        for _ in range(200):
            await task.step("create")
            if len(result.no_space) >= 3:
                break
    assert result.no_space and all("No space left on device" in e for e in result.no_space), result.no_space
    assert not result.errors, result.errors
    async with blockemu.mount(img, interval=3600) as fs:
        await task.verify(fs, result)
    assert not result.divergent, result.divergent


async def test_a_mix_task_that_fails_stops_its_siblings_before_run_mix_raises(tmp_path, monkeypatch):
    """One task's unexpected error left the others running (gather propagates the first error and
    cancels nothing): stress then unmounted under them, and their writeback groups came back to a
    page cache already released (``ValueError: operation forbidden on released memoryview object``
    at shutdown). Now run_mix stops and waits for them before it raises."""
    from blockemu.workload.mix import run_mix

    img = str(tmp_path / "m.img")
    await blockemu.mkfs(img, size="64M")
    real_step = Task.step

    async def step(self, op):
        if self.root.endswith("/p0"):
            raise RuntimeError("planted: an error no operation expects")
        await real_step(self, op)

    monkeypatch.setattr(Task, "step", step)
    async with blockemu.mount(img, interval=3600) as fs:
        with pytest.raises(RuntimeError, match="planted"):
            await run_mix(fs, root="/m", tasks=2, nops=50, ops=None, seed=1)
        left = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("<locals>.drive") and not t.done()]
        assert not left, left


# what each operation calls that the planted fault refuses, and how many of the task's six
# files (two in each of /t, /t/a, /t/b) its failure may leave unknown
REFUSED = {"write": ("File", "pwrite", 1), "truncate": ("File", "truncate", 1), "fsync": ("File", "fsync", 1),
           "unlink": ("Filesystem", "unlink", 1), "rename": ("Filesystem", "rename", 2),
           "mkdir": ("Filesystem", "mkdir", 2), "rmdir": ("Filesystem", "rmdir", 4)}


async def test_an_error_naming_another_path_that_starts_as_the_ops_does_not_hide_the_ops_path(tmp_path, monkeypatch):
    """The line names the operation's path unless the error does; a substring test took an
    error about ``/t/g00`` for one naming ``/t/g0``, and the line named only the other file."""
    from blockemu.fs import filesystem

    img = str(tmp_path / "t.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, interval=3600) as fs:
        task, result = await lone_task(fs, seed=1, scale=1)
        async with fs.open("/t/g0", "x") as f:
            await f.write(b"x")
        task.files["/t/g0"] = bytearray(b"x")

        async def refused(self, *args, **kw):
            raise DeviceIOError(f"{self.name}0: planted")

        monkeypatch.setattr(filesystem.File, "fsync", refused)
        await task.step("fsync")
        monkeypatch.undo()
    assert result.errors == ["fsync /t/g0: /t/g00: planted"], result.errors


@pytest.mark.parametrize("op", sorted(REFUSED))
async def test_a_changing_operation_that_fails_taints_what_it_may_change_and_no_other_file(tmp_path, monkeypatch,
                                                                                             op):
    """A changing operation that an injected fault failed tainted every file of its task (as a
    failed sync must), so the check after the run skipped them all: a real loss in another of
    the task's files went unseen. Now it taints its own file(s) -- both names of a rename, the
    entries of a directory it made or removed -- and a loss planted in another file (an append
    acknowledged, its pages marked clean, never written) is caught on the fresh mount."""
    from blockemu.fs import filesystem

    img = str(tmp_path / "t.img")
    await blockemu.mkfs(img, size="64M")
    async with blockemu.mount(img, interval=3600) as fs:
        task, result = await lone_task(fs, seed=1, scale=1)
        for d in (f"{task.root}/a", f"{task.root}/b"):
            await fs.mkdir(d)
            task.dirs.append(d)
        for i, d in enumerate(task.dirs * 2):
            p = f"{d}/g{i}"
            async with fs.open(p, "x") as f:
                await f.write(bytes([i + 1]) * 5000)
            task.files[p] = bytearray(bytes([i + 1]) * 5000)
        await fs.sync()
        owner, name, count = REFUSED[op]

        async def refused(*args, **kw):
            raise DeviceIOError("planted: the device refused it")

        monkeypatch.setattr(getattr(filesystem, owner), name, refused)
        await task.step(op)
        monkeypatch.undo()
        assert len(task.tainted) == count, task.tainted
        # the paths it was changing named ("overwrite: inode 339: ..." left the file to be found)
        assert re.fullmatch(rf"{op} /t/\S+( /t/\S+)?: planted: the device refused it", result.errors[0]), result.errors
        lost = sorted(set(task.files) - task.tainted)[0]
        SkipDataWrites(monkeypatch)
        async with fs.open(lost, "r+") as f:
            await f.pwrite(b"lost", len(task.files[lost]))
        task.files[lost] += b"lost"
    async with blockemu.mount(img, interval=3600) as fs:
        await task.verify(fs, result)
    assert [d.partition(":")[0] for d in result.divergent] == [lost], result.divergent
