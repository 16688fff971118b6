"""Every crash state of a logged workload opens to the old or the new generation, whole."""
from __future__ import annotations

import random

import blockemu
from blockemu.faults import FaultPlan
from blockemu.fsck import check
from blockemu.image import ImageFile
from blockemu.mkfs import mkfs


def generation_of(path: str) -> int:
    with ImageFile.open(path) as img:
        return img.best_super().generation


async def snapshot(fs) -> dict[str, bytes | None]:
    """The namespace and every file's contents (None for a directory)."""
    out: dict[str, bytes | None] = {}
    todo = ["/"]
    while todo:
        d = todo.pop()
        for name in await fs.readdir(d):
            p = d.rstrip("/") + "/" + name
            if (await fs.stat(p)).st_mode & 0o040000:
                out[p] = None
                todo.append(p)
            else:
                async with fs.open(p) as f:
                    out[p] = await f.read()
    return out


async def logged_workload(tmp_path, faults: FaultPlan | None = None, commits: int = 8, seed: int = 7):
    """Syncs after random file and namespace operations: COW overwrites, truncates, renames,
    unlinks and new directories, so trees split, merge and free blocks and extents."""
    path = str(tmp_path / "w.img")
    await mkfs(path, "64M", node_size="4K")
    fs = await blockemu.mount(path, faults=faults, interval=3600, max_extent=16 << 10)
    log = fs.vol.device.start_log(base_copy=str(tmp_path / "base.img"))
    models = {fs.vol.generation: await snapshot(fs)}
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
                victim = files.pop(rng.randrange(len(files)))
                await fs.unlink(victim)
            else:
                d = rng.choice(dirs).rstrip("/") + f"/d{rng.randrange(10**6)}"
                await fs.mkdir(d)
                dirs.append(d)
        await fs.sync()
        models[fs.vol.generation] = await snapshot(fs)
    await fs.unmount()
    return log, models


async def state_of(path: str) -> tuple[int, dict]:
    gen = generation_of(path)
    async with blockemu.mount(path, interval=3600) as fs:
        return gen, await snapshot(fs)


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
        gen, contents = await state_of(out)
        assert gen == (expected_generation(log, st.upto) or first_gen), str(st)
        assert contents == models[gen], str(st)


async def test_crash_images_stay_usable(tmp_path):
    """After any persistence-point crash the image mounts, takes new work, and checks clean."""
    log, models = await logged_workload(tmp_path, commits=4)
    out = str(tmp_path / "crash.img")
    for upto in log.boundaries():
        log.crash_image(out, upto)
        async with blockemu.mount(out, interval=3600) as fs:
            async with fs.open("/after-crash", "w") as f:
                await f.write(b"after-crash" * 5000)
        report = check(out)
        assert report.clean, [e.message for e in report.errors]
        _, contents = await state_of(out)
        assert contents["/after-crash"] == b"after-crash" * 5000


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
