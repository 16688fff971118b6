"""Every crash state of a logged workload opens to the old or the new generation, whole."""
from __future__ import annotations

import random

from blockemu.faults import FaultPlan
from blockemu.fsck import check
from blockemu.image import ImageFile
from blockemu.mkfs import mkfs
from blockemu.ondisk.structs import FS_TREE_OBJECTID
from blockemu.transaction import Engine
from blockemu.volume import Volume


def fs_items(path: str) -> tuple[int, dict]:
    with ImageFile.open(path) as img:
        sb = img.best_super()
        engine = Engine(sb, img.read, writable=False)
        return sb.generation, dict(engine.trees[FS_TREE_OBJECTID].items())


async def logged_workload(tmp_path, faults: FaultPlan | None = None, commits: int = 8, seed: int = 7):
    """Commits that grow, rewrite and shrink the fs tree (splits, merges, height changes, frees)."""
    path = str(tmp_path / "w.img")
    await mkfs(path, "64M", node_size="4K")
    vol = await Volume.open(path, faults=faults)
    log = vol.device.start_log(base_copy=str(tmp_path / "base.img"))
    gen0, model = fs_items(path)
    models = {gen0: dict(model)}
    rng = random.Random(seed)
    fs = vol.engine.trees[FS_TREE_OBJECTID]
    for _ in range(commits):
        for _ in range(rng.randrange(50, 400)):
            key = (1000 + rng.randrange(2000), 1, 0)
            if key in model and rng.random() < 0.4:
                fs.delete(key)
                del model[key]
            else:
                value = rng.randbytes(rng.randrange(0, 200))
                fs.insert(key, value, replace=True)
                model[key] = value
        await vol.commit()
        models[vol.generation] = dict(model)
    await vol.close()
    return log, models


def expected_generation(log, upto: int) -> int:
    """Generation of the newest primary superblock whose FUA completed within the prefix."""
    gen = None
    for e in log.entries[:upto]:
        if e.kind == "fua" and e.offset == 65536:
            gen = int.from_bytes(e.data[0x48:0x50], "little")
    return gen


async def test_every_crash_state_is_old_or_new_generation(tmp_path):
    log, models = await logged_workload(tmp_path)
    first_gen = min(models)
    out = str(tmp_path / "crash.img")
    rng = random.Random(1)
    states = list(log.crash_states(rng, subsets=4))
    assert len(states) > 60
    for st in states:
        log.crash_image(out, st.upto, st.keep, st.torn)
        report = check(out)
        assert report.clean, (str(st), [e.message for e in report.errors])
        gen, items = fs_items(out)
        assert gen == (expected_generation(log, st.upto) or first_gen), str(st)
        assert items == models[gen], str(st)


async def test_crash_images_stay_usable(tmp_path):
    """After any persistence-point crash the image mounts, takes a new commit, and checks clean."""
    log, models = await logged_workload(tmp_path, commits=4)
    out = str(tmp_path / "crash.img")
    for upto in log.boundaries():
        log.crash_image(out, upto)
        vol = await Volume.open(out)
        fs = vol.engine.trees[FS_TREE_OBJECTID]
        for i in range(300):
            fs.insert((50_000 + i, 1, 0), b"after-crash" * 5, replace=True)
        await vol.close()
        report = check(out)
        assert report.clean, [e.message for e in report.errors]
        gen, items = fs_items(out)
        assert items[(50_000, 1, 0)] == b"after-crash" * 5 and len(items) >= 300


async def test_a_planted_ordering_bug_is_caught(tmp_path):
    """With flushes ignored (nobarrier), superblocks can land before their trees: some crash
    state must then fail the check. Proves the crash test can fail."""
    log, models = await logged_workload(tmp_path, faults=FaultPlan(nobarrier=True), commits=4)
    out = str(tmp_path / "crash.img")
    failures = 0
    for st in log.crash_states(random.Random(2), subsets=2):
        log.crash_image(out, st.upto, st.keep, st.torn)
        try:
            report = check(out)
        except OSError:
            failures += 1
            continue
        failures += not report.clean
    assert failures > 0
