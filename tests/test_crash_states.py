"""Every crash state of a logged workload opens to the old or the new generation, whole;
the Ace-style bounded campaign finds nothing; and a planted ordering bug is caught."""
from __future__ import annotations

import random

import blockemu
from blockemu.check.fsck import check
from blockemu.device.faultplan import FaultPlan
from blockemu.workload.crash import (CampaignResult, Recorder, ace_workload, ace_workloads, check_states, record,
                                     run_ace)
from blockemu.workload.writepath import FAST


def random_workload(commits: int, seed: int):
    """Syncs after random file and namespace operations: COW overwrites, truncates, renames,
    unlinks and new directories, so trees split, merge and free blocks and extents."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(seed)
        files: list[str] = []
        dirs = ["/"]
        for _ in range(commits):
            for _ in range(rng.randrange(4, 12)):
                op = rng.random()
                if op < 0.35 or not files:
                    p = rng.choice(dirs).rstrip("/") + f"/f{rng.randrange(10**6)}"
                    async with fs.open(p, "w") as f:
                        await f.write(rng.randbytes(rng.randrange(0, 40_000)))
                    files.append(p)
                elif op < 0.55:
                    async with fs.open(rng.choice(files), "r+") as f:
                        await f.pwrite(rng.randbytes(rng.randrange(1, 9000)), rng.randrange(0, 30_000))
                elif op < 0.65:
                    async with fs.open(rng.choice(files), "r+") as f:
                        await f.truncate(rng.randrange(0, 20_000))
                elif op < 0.75:
                    src = rng.choice(files)
                    dst = rng.choice(dirs).rstrip("/") + f"/r{rng.randrange(10**6)}"
                    await fs.rename(src, dst)
                    files[files.index(src)] = dst
                elif op < 0.85:
                    await fs.unlink(files.pop(rng.randrange(len(files))))
                else:
                    d = rng.choice(dirs).rstrip("/") + f"/d{rng.randrange(10**6)}"
                    await fs.mkdir(d)
                    dirs.append(d)
            await fs.sync()
            await rec.persisted()
    return run


async def test_every_crash_state_is_old_or_new_generation(tmp_path):
    log, models = await record(random_workload(8, seed=7), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=FAST)
    assert len(models) == 9
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(1), 4, "random", result, FAST)
    assert result.states > 100
    assert not result.failures, result.failures[:3]


async def test_crash_images_stay_usable(tmp_path):
    """After any persistence-point crash the image mounts, takes new work, and checks clean."""
    log, _ = await record(random_workload(4, seed=3), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                          write_path=FAST)
    out = str(tmp_path / "crash.img")
    for upto in log.boundaries():
        log.crash_image(out, upto)
        async with blockemu.mount(out, interval=3600) as fs:
            async with fs.open("/after-crash", "w") as f:
                await f.write(b"after-crash" * 5000)
        report = check(out)
        assert report.clean, [e.message for e in report.errors]
        async with blockemu.mount(out) as fs:
            async with fs.open("/after-crash") as f:
                assert await f.read() == b"after-crash" * 5000


async def test_ace_single_operations_and_a_sample_of_pairs():
    seqs = ace_workloads(1) + random.Random(5).sample([s for s in ace_workloads(2) if len(s) == 2], 12)
    result = await run_ace(seqs, seed=1, subsets=1, write_path=FAST)
    assert result.workloads == len(seqs) and result.states > 5 * len(seqs)
    assert not result.failures, result.failures[:3]


async def test_a_planted_ordering_bug_is_caught(tmp_path):
    """With flushes ignored (nobarrier), superblocks can land before their trees: the campaign
    must report failures. Proves the crash checker itself can fail."""
    seqs = [s for s in ace_workloads(2) if len(s) == 2][:6]
    result = await run_ace(seqs, seed=2, subsets=2, faults=FaultPlan(nobarrier=True), write_path=FAST)
    assert result.failures
    log, models = await record(random_workload(3, seed=9), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               faults=FaultPlan(nobarrier=True), write_path=FAST)
    planted = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(2), 2, "nobarrier", planted, FAST)
    assert planted.failures


async def test_ace_write_fsyncs_go_through_the_log_and_every_crash_state_holds(tmp_path):
    """Ace's write and append are each followed by an fsync of the file, which goes through the
    log tree (DESIGN §9): the campaign's oracle names those states by (generation, log root)."""
    seq = (("write", "/A/foo"), ("append", "/A/foo"))
    log, models = await record(ace_workload(seq, 3), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=FAST)
    logged = [key for key in models if key[1]]
    assert len(logged) == 2 and len({g for g, _ in logged}) == 1, sorted(models)
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(3), 4, "ace-log", result, FAST)
    assert result.states > 20 and not result.failures, result.failures[:3]
