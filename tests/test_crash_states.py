"""Every crash state of a logged workload opens to the old or the new generation, whole;
the Ace-style bounded campaign finds nothing; and a planted ordering bug is caught."""
from __future__ import annotations

import asyncio
import errno
import random
import re

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.device.faultplan import FaultPlan
from blockemu.ondisk.structs import SUPER_OFFSETS
from blockemu.workload import crash
from blockemu.workload.crash import (
    MIRRORED_SIZE,
    CampaignResult,
    Recorder,
    ace_workload,
    ace_workloads,
    check_sample,
    check_states,
    record,
    run_ace,
    snapshot,
)
from blockemu.workload.writepath import FAST, PRODUCTION
from tests.util import Gate


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


LINK = ("link", "/A/foo", "/B/bar")


async def test_the_campaign_links_a_file_and_unlinks_one_of_its_names(tmp_path):
    """Ace's space has a hard link (``crash.OPS``): the oracle holds both names, one content
    and a link count of 2, then the name left with 1; every crash state matches, and so do the
    link's pairs with the operations on the first name (written through, cut, renamed beside
    the link in /B)."""
    assert (LINK, ("unlink", "/A/foo")) in ace_workloads(2)  # in the campaign's space
    workload = ace_workload((LINK, ("unlink", "/A/foo")), 4)
    log, models = await record(workload, str(tmp_path / "w.img"), str(tmp_path / "base.img"), write_path=FAST)
    linked, unlinked = [snap for _, snap in models.points][2:4]
    assert linked["/A/foo"] == linked["/B/bar"] and linked["/B/bar"].nlink == 2
    assert "/A/foo" not in unlinked and unlinked["/B/bar"] == linked["/B/bar"]._replace(nlink=1)
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(4), 2, "link", result, FAST)
    assert result.states > 10 and not result.failures, result.failures[:3]
    seqs = [(LINK, ("write", "/A/foo")), (LINK, ("truncate", "/A/foo")), (LINK, ("rename", "/A/foo", "/B/foo"))]
    result = await run_ace(seqs, seed=4, subsets=1, write_path=FAST)
    assert result.workloads == 3 and not result.failures, result.failures[:3]


async def test_a_link_count_the_unlink_leaves_unsaved_is_caught(tmp_path, monkeypatch):
    """A planted bug: unlinking one name of a linked file keeps the count in memory only. The
    live filesystem (the oracle) looks right; the crash states after it must fail."""
    from blockemu.fs.filesystem import Filesystem

    def drop_link(self, inode) -> None:
        inode.item = inode.item._replace(nlink=inode.item.nlink - 1)
        if inode.item.nlink == 0:
            self._destroy(inode)
    monkeypatch.setattr(Filesystem, "_drop_link", drop_link)
    result = await run_ace([(LINK, ("unlink", "/A/foo"))], seed=4, subsets=1, write_path=FAST)
    assert result.failures and all("NLINK_MISMATCH" in f for f in result.failures), result.failures[:3]


async def test_a_planted_ordering_bug_is_caught(tmp_path):
    """With flushes ignored (nobarrier), superblocks can land before their trees: the campaign
    must report failures. Proves the crash checker itself can fail."""
    seqs = [s for s in ace_workloads(2) if len(s) == 2][:6]
    result = await run_ace(seqs, seed=2, subsets=2, faults=FaultPlan(nobarrier=True), write_path=FAST)
    assert result.failures
    # a failure says where in the workload its crash falls, in the workload's words (a newcomer
    # read only 'upto=9' and '(generation, log root) (2, 0)')
    where = re.compile(r"^\[(.*)\] at crash state upto=\d+ .*\(after '([^']*)' returned(?:, during '([^']*)')?\): ")
    said = [where.match(f) for f in result.failures]
    assert all(said), [f for f, m in zip(result.failures, said) if not m][:3]
    assert any(m[3] and m[3].split("; ")[0] in m[1].split(" ; ") for m in said), said[:3]  # one of its ops
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


def commit_in_flight(scale: int):
    """A sync's commit held at its flush + superblock FUA -- its blocks written, the transaction
    ended -- while the next transaction changes the trees (DESIGN §9): new files and directories,
    an overwrite and an unlink that free what the held commit references, a rename; their data
    reaches the device beside the held commit. Then more changes and data once it is durable,
    before the next sync: what the held commit's transaction freed came back to the allocator,
    what the next one freed must not have."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(11)

        async def put(path: str, n: int) -> None:
            async with fs.open(path, "w") as f:
                await f.write(rng.randbytes(n * scale))

        await rec.mkdir("/w")
        for i in range(6):
            await put(f"/w/f{i}", rng.randrange(1, 8000))
        await fs.sync()
        await rec.persisted()
        async with fs.open("/w/f0", "r+") as f:
            await f.pwrite(rng.randbytes(5000 * scale), 1000)
        await fs.unlink("/w/f1")
        await fs.mkdir("/w/d")
        gate = Gate(fs.vol.device.flush_then_fua)
        fs.vol.device.flush_then_fua = gate
        sync = asyncio.ensure_future(fs.sync())
        await gate.entered.wait()  # the held commit's blocks are written, its transaction ended
        rec.models[(fs.vol.generation + 1, 0)] = await snapshot(fs)
        nxt = asyncio.gather(put("/w/d/g", 6000), fs.rename("/w/f2", "/w/d/f2"), fs.unlink("/w/f3"), fs.mkdir("/w/e"))
        done, _ = await asyncio.wait([nxt], timeout=30)  # a guard against a hang, not a wait for a race
        assert done, "the next transaction waited for the commit being written"
        async with fs.open("/w/f4", "r+") as f:
            await f.pwrite(rng.randbytes(9000 * scale), 0)
        await fs.writeback.flush_all()  # the next transaction's data, written beside the held commit
        gate.release.set()
        await sync
        for i in range(3):
            await put(f"/w/e/h{i}", rng.randrange(1, 8000))
        await fs.writeback.flush_all()
        await fs.sync()
        await rec.persisted()
    return run


@pytest.mark.parametrize("write_path", [FAST, PRODUCTION], ids=lambda p: p.name)
async def test_a_crash_while_a_commit_is_written_and_the_next_transaction_runs(tmp_path, write_path):
    log, models = await record(commit_in_flight(write_path.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=write_path)
    assert len(models) == 4, sorted(models)  # mount, first sync, the held commit, the last sync
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(4), 4, "in-flight", result, write_path)
    assert result.states > 30 and not result.failures, result.failures[:3]


@pytest.mark.parametrize("write_path", [FAST, PRODUCTION], ids=lambda p: p.name)
async def test_crash_states_of_an_image_with_a_superblock_mirror(tmp_path, write_path):
    """The campaigns' 64 MiB images have no mirror, so a cut during a commit's mirror write was
    never checked. On an image with one, every crash state around each commit -- the mirror
    landed, not landed, or torn inside its sector beside the new primary -- opens to the last
    durable state, fsck-clean."""
    seq = (("write", "/A/foo"), ("rename", "/A/foo", "/B/foo"), ("creat", "/A/foo"))
    log, models = await record(ace_workload(seq, 5), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=write_path, size=MIRRORED_SIZE)
    mirror = SUPER_OFFSETS[1]
    assert sum(e.offset == mirror for e in log.entries if e.kind == "write") >= 3  # every commit writes it
    states = list(log.crash_states(random.Random(6), subsets=2))
    tears = [st for st in states if st.split]
    assert len(tears) >= 6 and all(log.entries[s].offset == mirror for st in tears for s in st.split)
    result = CampaignResult()
    await check_sample(log, models, str(tmp_path / "crash.img"), states, result, "mirror", write_path)
    assert result.states == len(states) and not result.failures, result.failures[:3]


def test_a_share_of_the_campaign_runs_on_images_with_a_mirror(monkeypatch):
    """The campaign (``blockemu crash``) records every 4th workload on an image with a
    superblock mirror, chosen by the workload's index (not by shard), and checks its tears."""
    sizes, splits = {}, []
    real_record, real_sample = crash.run_recorded, crash.check_sample

    async def spy_record(workload, image, base, **kw):
        sizes[len(sizes)] = kw["size"]
        return await real_record(workload, image, base, **kw)

    async def spy_sample(log, models, work, states, *args, **kw):
        splits.extend(st for st in states if st.split)
        return await real_sample(log, models, work, states, *args, **kw)

    monkeypatch.setattr(crash, "run_recorded", spy_record)
    monkeypatch.setattr(crash, "check_sample", spy_sample)
    out = crash._crash_shard((1, 0, 1, False, None, "fast", 2, 6, None))
    assert out["units"] == 4 and not out["failures"], out["failures"][:3]
    assert [sizes[k] for k in sorted(sizes)] == ["64M", MIRRORED_SIZE, "64M", "64M"]  # workload 3 of 2..5
    assert splits


def test_a_failure_names_each_path_and_how_it_differs():
    """A failure said 'contents differ from the oracle ... (['/A/foo'])': neither what was
    expected nor what was found. Now each path, with sizes and the first differing offset, or
    which side lacks it."""
    N = crash.Node
    models = crash.Models()
    models[(5, 0)] = {"/A": None, "/A/foo": N(b"abcdef"), "/A/bar": N(b"x", 2), "/B": None}
    got = {"/A": None, "/A/foo": N(b"abXdefgh"), "/B/foo": N(b"yy"), "/B": N(b"")}
    why = models.judge(got, (5, 0), 0)
    assert "(generation, log root) (5, 0)" in why
    assert "/A/foo: expected 6 bytes, found 8, first difference at offset 2" in why
    assert "/A/bar missing (expected a file of 1 bytes with 2 links)" in why
    assert "/B: expected a directory, found a file of 0 bytes" in why
    assert "; and 1 more paths" in why  # /B/foo, past the first three
    assert models.judge({**got, "/A/foo": N(b"abcdef")}, (5, 0), 0) != why
    assert models.judge(dict(models[(5, 0)]), (5, 0), 0) is None
    shorter = crash.difference("/f", {"/f": N(b"abc")}, {"/f": N(b"ab")})
    assert shorter == "/f: expected 3 bytes, found 2, first difference at offset 2"
    # a hard link's names kept, the link lost: two files of one name each, fsck-clean
    assert crash.difference("/f", {"/f": N(b"abc", 2)}, {"/f": N(b"abc")}) == "/f: expected 2 link(s), found 1"


async def test_the_campaign_never_comes_near_a_full_image(tmp_path, monkeypatch):
    """DESIGN §10: a room decision -- a commit for room, a metadata ENOSPC, a data extent that
    does not fit -- could differ between a held commit tail's two orders without logging,
    allocating or changing a tree, unseen by ``Recorder.overtaken``; but only near full, where
    the space the tail still pins decides it. Each compares free space with at most the metadata
    reserve and one extent. The campaign's heaviest workloads on the production path (six
    overwrites, --max-ops' bound; group workloads), tails held as a campaign records them, keep
    over half the image free at every allocation, and the largest free extent as long."""
    from blockemu.engine.alloc import Allocator

    low = {"free": 1 << 62, "largest": 1 << 62}
    keeps: list[int] = []

    def watching(real):
        def placed(self: Allocator, *args, **kw):
            at = real(self, *args, **kw)
            low["free"] = min(low["free"], self.free_bytes())
            low["largest"] = min(low["largest"], self.largest())
            return at
        return placed

    for name in ("alloc", "alloc_many"):
        monkeypatch.setattr(Allocator, name, watching(getattr(Allocator, name)))

    def reserve_noted(workload: crash.Workload) -> crash.Workload:
        async def run(fs, rec: Recorder) -> None:
            await workload(fs, rec)
            keeps.append(fs.data_keep() * fs.vol.sb.nodesize)
        return run

    overwrite = ("write", "/A/foo")
    for size, workload in ((crash.SIZE, ace_workload((overwrite,) * 6, 1)),
                           (crash.SIZE, crash.group_workload(112)), (MIRRORED_SIZE, crash.group_workload(111))):
        await crash.run_recorded(reserve_noted(workload), str(tmp_path / "w.img"), str(tmp_path / "b.img"),
                                 write_path=PRODUCTION, size=size)
    near_full = max(keeps) + PRODUCTION.max_extent  # the most any room decision compares free space with
    assert near_full < 2 << 20, keeps
    assert low["free"] >= 32 << 20 and low["largest"] >= 32 << 20, low


async def test_a_write_log_starts_after_writes_under_nobarrier_and_shows_the_bug(tmp_path):
    """``Filesystem.start_write_log`` syncs, then starts the log. Under a nobarrier fault plan
    the sync's flushes do nothing, the cache stayed full, and the log refused to start ("start
    the write log with an empty write cache") after any write: a developer could not check that
    their own crash harness catches the planted bug. It starts, and the bug shows: a crash
    state after the fsync returned lacks what the fsync acknowledged."""
    img, crash_img = str(tmp_path / "a.img"), str(tmp_path / "c.img")
    await blockemu.mkfs(img, size="32M", force=True)
    async with blockemu.mount(img, faults=FaultPlan.parse("nobarrier")) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x" * 4096)
        log = await fs.start_write_log(str(tmp_path / "base.img"))
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"y" * 4096, 0)
            await f.fsync()
        await fs.mark("fsynced")
    acked, lost = log.marks()["fsynced"], 0
    for st in log.crash_states(random.Random(0)):
        if st.upto >= acked:
            log.crash_image(crash_img, st.upto, st.keep, st.torn, st.split)
            try:
                async with blockemu.mount(crash_img, readonly=True) as fs:
                    async with fs.open("/f") as f:
                        lost += await f.read() != b"y" * 4096
            except OSError:  # the bug's damage: the mount refuses the image
                lost += 1
    assert lost


async def test_a_write_log_whose_base_copy_is_the_image_itself_is_refused(tmp_path):
    """``start_write_log(base_copy)`` copies the image to ``base_copy``: given the mounted
    image's own path (here through a symlink) the copy opened it for writing, which emptied it
    before it was read, and /g's committed data read back as zeros (checksum mismatches) once
    the later commit was all that stood. It is refused, and the image is left as it was."""
    img, link = tmp_path / "a.img", tmp_path / "base.img"
    await blockemu.mkfs(str(img), size="32M", force=True)
    link.symlink_to(img)
    async with blockemu.mount(str(img)) as fs:
        async with fs.open("/g", "w") as f:
            await f.write(b"g" * 8192)
        with pytest.raises(OSError) as e:
            await fs.start_write_log(str(link))
        assert e.value.errno == errno.EINVAL
        async with fs.open("/f", "w") as f:
            await f.write(b"f" * 4096)
    assert (await blockemu.fsck(str(img), check_data=True)).clean
    async with blockemu.mount(str(img), readonly=True) as fs:
        async with fs.open("/g") as f:
            assert await f.read() == b"g" * 8192


async def test_a_second_write_log_on_one_mount_is_refused(tmp_path):
    """A second ``start_write_log`` replaced the device's log: the first, still in the caller's
    hands, recorded nothing more, and its crash states -- of an empty workload -- all passed."""
    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size="32M", force=True)
    async with blockemu.mount(img) as fs:
        log = await fs.start_write_log(str(tmp_path / "b1.img"))
        with pytest.raises(OSError) as e:
            await fs.start_write_log(str(tmp_path / "b2.img"))
        assert e.value.errno == errno.EINVAL
        async with fs.open("/f", "w") as f:
            await f.write(b"x" * 4096)
            await f.fsync()
        await fs.mark("fsynced")
    assert "fsynced" in log.marks() and any(e.kind == "write" for e in log.entries)


async def test_a_mark_without_a_write_log_is_refused(tmp_path):
    """``fs.mark`` before ``start_write_log`` went nowhere, silently: a harness that forgot to
    start the log then found no mark (a KeyError far from the cause) or, worse, checked crash
    states of a log started later against a mark it believed it had set. It is EINVAL saying
    what to do, and changes nothing; the device's own mark refuses the same way."""
    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size="32M", force=True)
    async with blockemu.mount(img) as fs:
        for mark in (fs.mark, fs.vol.device.mark):
            with pytest.raises(OSError) as e:
                await mark("fsynced")
            assert e.value.errno == errno.EINVAL and "no write log" in str(e.value), e.value
        log = await fs.start_write_log(str(tmp_path / "b.img"))
        await fs.mark("started")
    assert list(log.marks()) == ["started"]


@pytest.mark.parametrize("write_path", [FAST, PRODUCTION], ids=lambda p: p.name)
async def test_a_primary_lost_in_flight_at_any_commit_leaves_a_mirror_whose_trees_are_whole(tmp_path, write_path):
    """The mirrors' guarantee, checked on the log (review52; DESIGN §9 step 5 says why the
    flush after them stays): the primary is only ever in flight once the last commit's mirror
    is durable, and that generation's blocks are still pinned -- so at every primary superblock
    write of a workload, the primary left unreadable by a cut during that write (its first
    sector garbage: a tear into old and new sectors often still reads, as the two differ only
    where the backup-root slot is) leaves a mirror that ``fsck --repair`` restores it from:
    the generation of the primary before, whole. The workload runs the next transaction beside
    a held commit, writing into space the last commit's tail gave back."""
    from blockemu.check.repair import restore_primary_super
    from blockemu.device.writelog import TEAR
    from blockemu.workload.crash import is_primary_super

    log, _ = await record(commit_in_flight(write_path.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                          write_path=write_path, size=MIRRORED_SIZE)
    supers = [e for e in log.entries if is_primary_super(e)]
    assert len(supers) >= 3 and all(log.entries[e.seq + 1].offset == SUPER_OFFSETS[1] for e in supers[:-1])
    work = str(tmp_path / "crash.img")
    before = check(str(tmp_path / "base.img")).generation
    for e in supers:
        log.crash_image(work, e.seq)  # everything before it durable: the flush it follows
        with open(work, "r+b") as f:
            f.seek(SUPER_OFFSETS[0])
            f.write(bytes(TEAR))
        assert restore_primary_super(work)
        report = check(work, check_data=True)
        assert report.clean and report.generation == before, (e.seq, report.generation, before,
                                                              [x.message for x in report.errors][:3])
        before = int.from_bytes(e.data[0x48:0x50], "little")
