"""Seeded random fsync sequences against a model of what fsync acknowledged (DESIGN §9): a few
files, random pwrites (scattered pages, partial pages, past the end), truncates and punched
holes (those fsyncs commit), fsyncs of one file at a time; after each fsync a power cut, and
the crash image, mounted, must hold each file as its last fsync (or commit) left it. Small
leaves, so the log becomes a chain of trees and items go stale across trees."""
from __future__ import annotations

import asyncio
import random

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.workload.crash import CampaignResult, Recorder, check_sample, record
from blockemu.workload.writepath import FAST
from tests.test_treelog import _crash_now, committed_files, committed_then_log
from tests.util import PRODUCTION_4K, until

U = 4096
PAGES = 48


async def _change(rng: random.Random, f, want: bytearray, commit: bool) -> None:
    """A few random changes to ``f`` and to its model ``want``: pwrites (whole pages, or any
    bytes), and with ``commit`` also truncates and punched holes."""
    for _ in range(rng.randrange(1, 12)):
        op = rng.random() if commit else 0.0
        if op < 0.6:
            if rng.random() < 0.7:
                off, ln = rng.randrange(PAGES + 4) * U, U * rng.randrange(1, 3)
            else:
                off, ln = rng.randrange((PAGES + 4) * U), rng.randrange(1, 3 * U)
            data = rng.randbytes(ln)
            await f.pwrite(data, off)
            want.extend(bytes(max(0, off + ln - len(want))))
            want[off:off + ln] = data
        elif op < 0.8:
            size = rng.randrange(PAGES * U // 2, (PAGES + 4) * U)
            await f.truncate(size)
            del want[size:]
            want.extend(bytes(size - len(want)))
        else:
            off, ln = rng.randrange(len(want) + 1), rng.randrange(1, 4 * U)
            await f.punch_hole(off, ln)
            end = min(off + ln, len(want))
            want[off:end] = bytes(max(0, end - off))


async def _fsync_together(fs, files: list) -> None:
    """fsync ``files`` at once, with the commit lock held until each fsync waits for it: one
    log sync then logs them all (``Volume._log_sync``), and a delta may be left behind a new
    one between two inodes of the same sync."""
    async with fs.vol.commit_lock:
        tasks = [asyncio.ensure_future(f.fsync()) for f in files]
        await _queued(fs, len(files))
    await asyncio.gather(*tasks)


async def _queued(fs, n: int) -> None:
    """Until ``n`` of the fsyncs started (the caller holds the commit lock) wait for it, each
    having written its file back."""
    await until(lambda: len(fs.vol._fsyncs) == n, "the fsyncs never queued for the commit lock")


async def _run(tmp_path, seed: int, steps: int) -> int:
    """Returns how many crash images were checked with a log of several trees."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)
    rng = random.Random(seed)
    names = ["/f0", "/f1", "/f2"]
    chains = 0
    async with blockemu.mount(img, interval=3600) as fs:
        now = {n: bytearray(rng.randbytes(PAGES * U)) for n in names}
        for n in names[1:]:
            async with fs.open(n, "w") as f:
                await f.write(now[n])
        log = await committed_then_log(fs, tmp_path, now[names[0]], names[0])
        durable = {n: bytes(b) for n, b in now.items()}
        sure = set(names)  # files whose durable state is known (no unsynced change when a commit came)
        files = {n: await fs.open(n, "r+").__aenter__() for n in names}
        try:
            for step in range(steps):
                # one file, or two whose fsyncs run at once (one log sync may log both)
                synced = rng.sample(names, 1 if rng.random() < 0.7 else 2)
                commit = rng.random() < 0.1  # a truncate or a punched hole: this fsync commits
                for n in synced:
                    await _change(rng, files[n], now[n], commit)
                gen = fs.vol.generation
                await _fsync_together(fs, [files[n] for n in synced])
                for n in synced:
                    durable[n] = bytes(now[n])
                sure.update(synced)
                if fs.vol.generation != gen:  # a commit: every file as it is now -- if written back
                    for m in names:
                        if bytes(now[m]) != durable[m]:
                            sure.discard(m)
                chains += fs.vol.log.base is not None
                _crash_now(log, crash)
                async with blockemu.mount(crash, readonly=True) as cfs:
                    for m in sorted(sure):
                        async with cfs.open(m) as cf:
                            got = await cf.read()
                        assert got == durable[m], (seed, step, m, len(got), len(durable[m]),
                                                   next((i for i, (a, b) in enumerate(zip(got, durable[m])) if a != b), None))
        finally:
            for f in files.values():
                await f.__aexit__(None, None, None)
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    async with blockemu.mount(crash) as cfs:  # replayed and committed this time
        for m in sorted(sure):
            async with cfs.open(m) as cf:
                assert await cf.read() == durable[m], (seed, m)
    assert check(crash, check_data=True).clean
    return chains


@pytest.mark.parametrize("seed", range(3))
async def test_random_fsyncs_against_a_model_of_what_fsync_acknowledged(tmp_path, seed):
    assert await _run(tmp_path, seed, 60) > 5


def random_fsyncs_workload(seed: int, rounds: int, stats: list[bool]):
    """Three files; each round, random pwrites to one or two of them (``_change``), fsynced
    together (one log sync logs both), then a persistence point (the recorder reads what the
    files hold: no model of our own). ``stats``: whether the log was a chain, each round."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(seed)
        names = ["f0", "f1", "f2"]
        await committed_files(fs, rec, {n: rng.randbytes(PAGES * U) for n in names})
        files = {n: await fs.open(f"/A/{n}", "r+") for n in names}
        try:
            for _ in range(rounds):
                synced = rng.sample(names, 1 if rng.random() < 0.6 else 2)
                for n in synced:
                    await _change(rng, files[n], bytearray(), False)  # pwrites only: every fsync logs
                async with fs.vol.commit_lock:
                    tasks = [asyncio.ensure_future(rec.fsync(files[n], f"/A/{n}")) for n in synced]
                    await _queued(fs, len(synced))
                await asyncio.gather(*tasks)
                stats.append(fs.vol.log.base is not None)
                await rec.persisted()
        finally:
            for f in files.values():
                await f.close()
    return run


@pytest.mark.parametrize("write_path", [PRODUCTION_4K, FAST], ids=lambda p: p.name)
async def test_crash_states_of_random_fsyncs_through_a_chain_of_log_trees(tmp_path, write_path):
    """Crash states (sampled) around random log syncs of one or two files, the log growing into
    a chain of trees: each mounts as the last durable state's oracle."""
    stats: list[bool] = []
    log, models = await record(random_fsyncs_workload(3, 30, stats), str(tmp_path / "w.img"),
                               str(tmp_path / "base.img"), write_path=write_path)
    assert sum(stats) > 10, stats
    rng = random.Random(5)
    states = list(log.crash_states(rng, subsets=1))
    result = CampaignResult()
    await check_sample(log, models, str(tmp_path / "crash.img"), rng.sample(states, 40) + states[-1:], result,
                       "chain", write_path)
    assert not result.failures, result.failures[:3]
