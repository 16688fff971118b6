"""Crash states inside concurrent fsync groups (DESIGN §9, §10): tasks fsync their files at
once, their fsyncs share one log sync, and a crash while it is in flight leaves a durable state
no quiescent point recorded. The oracle (``workload/crash.py``, ``Models``) checks each file
against its fsyncs: what the last acknowledged one made durable, or what one in flight would."""
from __future__ import annotations

import asyncio
import functools
import random

import pytest

from blockemu.device.faultplan import FaultPlan
from blockemu.engine.treelog import TreeLog
from blockemu.fs.filesystem import File
from blockemu.fs.volume import Volume
from blockemu.workload.campaign import LocalExecutor, run_campaign
from blockemu.workload.crash import (
    CampaignResult,
    Models,
    Node,
    Recorder,
    Version,
    check_states,
    crash_campaign,
    expected_states,
    fsync_together,
    group_workload,
    record,
)
from blockemu.workload.writepath import FAST, PRODUCTION


def fsync_groups(n: int):
    """``n`` files in an encrypted directory (production) overwritten and fsynced by ``n``
    tasks at once, three times (the campaign's ``group_workload`` has the same shapes, its
    members' writebacks in turn; here they run in parallel): (1) every fsync waits at the group's gate until all have
    done their writeback, then for the commit lock, so one log sync logs them all -- deterministic, whatever the
    loop's scheduling; (2) as they come; (3) gated as in (1), one of the files cut shorter, whose fsync
    must commit (the log cannot say a hole) while the others log or share the commit."""
    def workload(scale: int):
        async def run(fs, rec: Recorder) -> None:
            rng = random.Random(n)
            await rec.mkdir("/A")
            paths = [f"/A/f{i}" for i in range(n)]
            for p in paths:
                async with fs.open(p, "w") as f:
                    await f.write(rng.randbytes(2000 * scale))
            await fs.sync()
            await rec.persisted()

            async def one(p: str, shrink: bool = False) -> None:
                async with fs.open(p, "r+") as f:  # > 256 KiB in production: sealed by the workers
                    await f.pwrite(rng.randbytes(1200 * scale), rng.randrange(0, 1500 * scale))
                    if shrink:
                        await f.truncate(1000 * scale)
                    await rec.fsync(f, p)

            async def grouped(shrink: int | None = None) -> None:  # writebacks in parallel
                await fsync_together(fs, [functools.partial(one, p, i == shrink) for i, p in enumerate(paths)],
                                     in_turn=False)

            log_syncs = fs.vol._log_syncs
            await grouped()
            workload.seen["one log sync for the group"] = fs.vol._log_syncs == log_syncs + 1
            await asyncio.gather(*(one(p) for p in paths))
            generation = fs.vol.generation
            await grouped(shrink=1)
            workload.seen["the shrunk file's fsync committed"] = fs.vol.generation == generation + 1
        return run
    workload.__name__ = f"fsync_groups_{n}"
    workload.seen = {}  # what the run did, for the test to check (a planted bug may change it)
    return workload


async def _check(tmp_path, workload, write_path, faults: FaultPlan | None = None) -> CampaignResult:
    log, models = await record(workload(write_path.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=write_path, faults=faults)
    first = min(models)
    points = sorted({*log.boundaries(), len(log.entries)})
    inside = [p for p, want in zip(points, expected_states(log, points, first)) if want not in models]
    assert inside, "no crash state lies inside a group: the oracle of groups was not exercised"
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(5), 1, workload.__name__, result,
                       write_path)
    return result


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
@pytest.mark.parametrize("n", [2, 4])
async def test_every_crash_state_around_concurrent_fsync_groups(tmp_path, write_path, n):
    workload = fsync_groups(n)
    result = await _check(tmp_path, workload, write_path)
    assert all(workload.seen.values()) and len(workload.seen) == 2, workload.seen
    assert result.states >= 40 and not result.failures, (result.states, result.failures[:3])


def plant_unlogged_members(monkeypatch) -> None:
    """A log sync logs only the inode of the fsync that holds the lock, yet acknowledges every
    fsync of its group: theirs return as durable while their data is not in the log."""
    real_log, real_prepare = TreeLog.log_inode, TreeLog.prepare_sync
    logged: list[int] = []

    def first_only(self, ino):
        if not logged:
            real_log(self, ino)
        logged.append(ino)

    def prepare(self):
        logged.clear()
        return real_prepare(self)
    monkeypatch.setattr(TreeLog, "log_inode", first_only)
    monkeypatch.setattr(TreeLog, "prepare_sync", prepare)


def plant_covered_by_an_earlier_sync(monkeypatch) -> None:
    """An fsync takes a log sync begun *before* its call for one that covers it (``>=`` for
    ``>`` in ``_log_sync``'s test): it returns at once, its new writes never logged."""
    real = Volume._log_sync

    async def off_by_one(self, ino, commits, log_syncs):
        return await real(self, ino, commits, log_syncs - (ino in self._logged_by))
    monkeypatch.setattr(Volume, "_log_sync", off_by_one)


def plant_acknowledged_before_the_superblock(monkeypatch) -> None:
    """An fsync returns as soon as its log sync is under way, before the superblock naming the
    log is written: the oracle acknowledges a version from the last primary superblock written
    before the return (``superblock_written``), and none of this fsync's is -- its file's older
    content in the states up to that superblock must not pass."""
    real = Volume.fsync
    running: set[asyncio.Task] = set()

    async def early(self, ino):
        task = asyncio.ensure_future(real(self, ino))
        running.add(task)
        task.add_done_callback(running.discard)
        await asyncio.sleep(0)  # the log sync started, not done
    monkeypatch.setattr(Volume, "fsync", early)


@pytest.mark.parametrize("plant", [plant_unlogged_members, plant_covered_by_an_earlier_sync,
                                   plant_acknowledged_before_the_superblock], ids=lambda p: p.__name__)
async def test_the_oracle_catches_fsyncs_acknowledged_before_they_are_durable(tmp_path, monkeypatch, plant):
    """fsck finds nothing wrong in these states -- the log is sound, it just lacks what was
    acknowledged: only the oracle of each file's fsyncs sees it."""
    plant(monkeypatch)
    result = await _check(tmp_path, fsync_groups(3), FAST)
    assert result.failures and all("neither what its last acknowledged fsync made durable" in f
                                   for f in result.failures), result.failures[:3]


def test_a_persistence_point_after_a_files_fsyncs_is_what_it_must_keep():
    """/a is fsynced (A1), rewritten (A2) and synced at a persistence point; then /b's fsync
    is in flight when the power is cut. /a must be A2 there: the oracle took A1 -- its last
    acknowledged *fsync* -- as what /a must keep, so it passed a state that lost the synced A2
    and failed the legal one that kept it."""
    N = Node
    models = Models()
    models.points += [(10, {"/a": N(b"A0"), "/b": N(b"B0")}), (20, {"/a": N(b"A2"), "/b": N(b"B0")})]
    models.versions["/a"] = [Version(N(b"A0"), 10, 10), Version(N(b"A1"), 12, 15)]
    models.versions["/b"] = [Version(N(b"B0"), 20, 20), Version(N(b"B1"), 22)]  # in flight at 25
    unrecorded = (7, 1234)
    assert models.judge({"/a": N(b"A2"), "/b": N(b"B1")}, unrecorded, 25) is None
    assert models.judge({"/a": N(b"A2"), "/b": N(b"B0")}, unrecorded, 25) is None
    assert "/a is neither" in (models.judge({"/a": N(b"A1"), "/b": N(b"B1")}, unrecorded, 25) or "")
    # before the persistence point, A1 is what /a's fsync promised
    assert models.judge({"/a": N(b"A1"), "/b": N(b"B0")}, unrecorded, 16) is None


async def passes(tmp_path, workload) -> None:
    """Every crash state of ``workload``, on the fast write path, passes the oracle (there are some)."""
    result = await _check(tmp_path, workload, FAST)
    assert result.states >= 10 and not result.failures, (result.states, result.failures[:3])


async def synced(fs, rec: Recorder, paths: list[str], size: int) -> None:
    """``paths`` in the directory /A, ``size`` zeros each, synced: the persistence point to start from."""
    await rec.mkdir("/A")
    for p in paths:
        async with fs.open(p, "w") as f:
            await f.write(b"0" * size)
    await fs.sync()
    await rec.persisted()


async def rewrite(fs, rec: Recorder, p: str, data: bytes, at: int) -> None:
    """``data`` written at ``at`` of ``p``, and fsynced through the recorder."""
    async with fs.open(p, "r+") as f:
        await f.pwrite(data, at)
        await rec.fsync(f, p)


async def test_fsyncs_after_a_sync_of_a_file_fsynced_before(tmp_path):
    """The same through a workload, every crash state checked: the oracle failed the legal
    states of /b's and /c's fsyncs, where /a holds what the sync made durable."""
    def workload(scale: int):
        async def run(fs, rec: Recorder) -> None:
            await synced(fs, rec, ["/A/a", "/A/b", "/A/c"], 3000 * scale)
            await rewrite(fs, rec, "/A/a", b"1" * 1000 * scale, 0)
            async with fs.open("/A/a", "r+") as f:
                await f.pwrite(b"2" * 1000 * scale, 0)
            await fs.sync()
            await rec.persisted()
            await asyncio.gather(*(rewrite(fs, rec, p, b"3" * 1000 * scale, 500 * scale) for p in ("/A/b", "/A/c")))
        return run
    workload.__name__ = "fsync_after_sync"
    await passes(tmp_path, workload)


async def test_a_commit_while_the_recorder_reads_the_version(tmp_path, monkeypatch):
    """A commit that runs while ``Recorder.fsync`` reads the content it is about to fsync (the
    interval's, or another task's sync) makes that content durable before ``f.fsync()`` is
    called. The oracle noted the call after the read, so the state right after that commit --
    legal, the file's writes were done -- failed as "neither what its last acknowledged fsync
    made durable nor what an fsync in flight would"."""
    def workload(scale: int):
        async def run(fs, rec: Recorder) -> None:
            await synced(fs, rec, ["/A/a", "/A/b"], 3000 * scale)
            real = File.read

            async def read_beside_a_commit(self, size: int = -1) -> bytes:
                monkeypatch.setattr(File, "read", real)
                await fs.sync()  # not a persistence point: a commit the workload did not ask for
                return await real(self, size)
            async with fs.open("/A/a", "r+") as f:
                await f.pwrite(b"1" * 1000 * scale, 0)
                monkeypatch.setattr(File, "read", read_beside_a_commit)
                await rec.fsync(f, "/A/a")
            assert File.read is real, "the recorder no longer reads the file: this test drives nothing"
            # a group after it, so the commit's state is judged per file
            await asyncio.gather(*(rewrite(fs, rec, p, b"2" * 1000 * scale, 500 * scale) for p in ("/A/a", "/A/b")))
        return run
    workload.__name__ = "commit_while_reading"
    await passes(tmp_path, workload)


async def test_an_fsync_counts_as_acknowledged_from_the_superblock_that_made_it_durable(tmp_path, monkeypatch):
    """Other tasks' writes logged after the FUA that acknowledged an fsync and before its task
    resumed (here: another file's writeback) used to count as the fsync still in flight, where
    the oracle accepts the file's older content -- a loss there passed. The version is
    acknowledged from right after that FUA."""
    def workload(scale: int):
        async def run(fs, rec: Recorder) -> None:
            await synced(fs, rec, ["/A/a", "/A/b"], 3000 * scale)
            real = fs.vol.fsync
            async with fs.open("/A/b", "r+") as fb, fs.open("/A/a", "r+") as fa:
                async def resumed_late(ino: int) -> None:
                    await real(ino)
                    if ino != fb.inode.ino:
                        await fs.writeback.flush_inode(fb.inode)  # runs before the fsync's task resumes
                fs.vol.fsync = resumed_late
                await fb.pwrite(b"b" * 1000 * scale, 0)
                await fa.pwrite(b"a" * 1000 * scale, 0)
                await rec.fsync(fa, "/A/a")
                await rec.fsync(fb, "/A/b")
            del fs.vol.fsync
        return run
    workload.__name__ = "resumed_late"
    log, models = await record(workload(FAST.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=FAST)
    fua = max(e.seq + 1 for e in log.entries[:models.versions["/A/a"][1].returned + 1]
              if e.kind == "fua" and e.offset == 65536)
    a = models.versions["/A/a"][1]
    assert any(e.kind == "write" for e in log.entries[fua:models.versions["/A/b"][1].called]), \
        "nothing was logged between /A/a's FUA and its task's resumption: this test drives nothing"
    assert a.returned == fua, (a, fua)


async def test_a_persistence_point_is_refused_while_a_recorded_fsync_is_in_flight(tmp_path):
    """Its snapshot would hold the fsync's new content under a durable state that need not, and
    every crash state naming that state would be held to it exactly: a false failure, or a
    model that hides what the fsync failed to make durable."""
    def workload(scale: int):
        async def run(fs, rec: Recorder) -> None:
            async with fs.open("/a", "w") as f:
                await f.write(b"1" * 3000 * scale)
                fsync = asyncio.ensure_future(rec.fsync(f, "/a"))
                await asyncio.sleep(0)  # the fsync has started: it is in flight
                with pytest.raises(RuntimeError, match="1 recorded fsync"):
                    await rec.persisted()
                await fsync
            await rec.persisted()  # and taken once it returned
        return run
    log, models = await record(workload(FAST.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=FAST)
    assert len(models.points) == 3


@pytest.mark.parametrize("seed", [0, 3])
async def test_the_campaigns_group_workloads_have_crash_states_inside_groups(tmp_path, seed):
    """Seed 0: groups of 3 and 4 with a member whose fsync must commit beside members one log
    sync takes; seed 3: groups of 2 that one log sync each takes whole."""
    workload = group_workload(seed)
    workload.__name__ = f"group_workload({seed})"
    result = await _check(tmp_path, lambda scale: workload, FAST)
    assert result.states >= 40 and not result.failures, (result.states, result.failures[:3])


def test_a_crash_campaign_runs_group_workloads_after_aces(monkeypatch):
    """Unit 0 is Ace's only one-operation sample, 1 and 2 the group workloads; the same counts
    on a second run, and the planted bug caught in the group units alone, each failure naming
    the command that reruns its unit."""
    campaign = crash_campaign(1, limit=1, groups=2, write_path=FAST, subsets=1)
    first = run_campaign(campaign, LocalExecutor(1))
    assert (first.units, first.failures) == (3, []) and first.states > 80
    groups = crash_campaign(1, limit=1, groups=2, write_path=FAST, subsets=1, workloads=(1, 3))
    again = run_campaign(groups, LocalExecutor(1))
    assert again.units == 2 and again.states == first.states - run_campaign(
        crash_campaign(1, limit=1, groups=2, write_path=FAST, subsets=1, workloads=(0, 1)), LocalExecutor(1)).states
    plant_unlogged_members(monkeypatch)
    bad = run_campaign(groups, LocalExecutor(1))
    assert {f["unit"] for f in bad.failures} == {1, 2}, bad.failures[:3]
    assert all("[fsync groups " in f["message"] and "--workloads " + str(f["unit"]) + " --limit 1 --groups 2"
               in f["reproduce"] for f in bad.failures), bad.failures[:2]


@pytest.mark.parametrize("in_turn", [True, False], ids=["in turn", "in parallel"])
async def test_a_member_whose_writeback_commits_for_room_does_not_hang_the_group(tmp_path, in_turn):
    """A near-full image whose free space is mostly pinned (a file unlinked in the running
    transaction): a member of an fsync group whose writeback needs that room commits to get it
    back -- and waited for ever on the commit lock, which the group held until every member had
    written back. Bounded by a timeout that fails the test rather than hanging it: the group's
    work takes well under a second."""
    import os

    import blockemu
    from tests.util import assert_fsck_clean

    img = str(tmp_path / "full.img")
    data = {"/a": os.urandom(8 << 20), "/b": os.urandom(4096)}
    await blockemu.mkfs(img, size="16M")
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/big", "w") as f:
            await f.write(os.urandom(11 << 20))
        for p in data:
            async with fs.open(p, "w") as f:
                await f.write(b"x" * 4096)
        await fs.sync()
        await fs.unlink("/big")  # its 11 MiB pinned until the next commit: /a's 8 MiB needs them

        def job(p: str):
            async def one() -> None:
                async with fs.open(p, "r+") as f:
                    await f.pwrite(data[p], 0)
                    await f.fsync()
            return one
        generation, log_syncs = fs.vol.generation, fs.vol._log_syncs
        await asyncio.wait_for(fsync_together(fs, [job(p) for p in data], in_turn=in_turn), 60)
        assert fs.vol.generation == generation + 1  # /a's writeback committed to get the room back
        assert fs.vol._log_syncs == log_syncs + 1  # and the two fsyncs still went in one log sync
    assert_fsck_clean(img)
    async with blockemu.mount(img, readonly=True) as fs:
        for p, want in data.items():
            async with fs.open(p) as f:
                assert await f.read() == want, p
