"""Adversarial crash tests of fsync through the log tree (DESIGN §9) mixed with the full
commits around it: every crash state of each workload must open fsck-clean to exactly what the
last durable superblock's fsync or sync acknowledged."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import subprocess
import sys

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.device.faultplan import FaultPlan
from blockemu.device.writelog import sparse_copy
from blockemu.engine.treelog import choose_log, read_log
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import FileExtent
from blockemu.ondisk.superblock import decode_super, encode_super
from blockemu.workload.crash import CampaignResult, Recorder, check_sample, check_states, record
from blockemu.workload.writepath import FAST, KEY, PRODUCTION, WritePath
from tests.test_treelog import _log_items, committed_files, committed_then_log


def log_then_commit_workload(scale: int):
    """A file fsynced through the log, then another file's fsync commits (a new name), more log
    fsyncs of the same range, a hole (commit), and a log fsync after it. Every file changed is
    fsynced before the oracle is taken, so each persistence point is the whole namespace."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(7)
        await committed_files(fs, rec, {"foo": rng.randbytes(9000 * scale)})
        async with fs.open("/A/foo", "r+") as f:
            await f.pwrite(rng.randbytes(3000 * scale), 1000 * scale)
            await f.fsync()  # log
            assert fs.vol.log_root
            await rec.persisted()
            async with fs.open("/A/bar", "w") as g:  # a new name: this fsync commits, the log goes
                await g.write(rng.randbytes(5000 * scale))
                await g.fsync()
            assert not fs.vol.log_root
            await rec.persisted()
            for _ in range(2):  # the same range twice: the log's items of it replaced
                await f.pwrite(rng.randbytes(4000 * scale), 2000 * scale)
                await f.fsync()
                assert fs.vol.log_root
                await rec.persisted()
            await f.punch_hole(4096 * scale, 4096 * scale)
            await f.fsync()  # a hole: commits
            assert not fs.vol.log_root
            await rec.persisted()
            await f.pwrite(rng.randbytes(2000 * scale), 8000 * scale)
            await f.fsync()
            assert fs.vol.log_root
            await rec.persisted()
    return run


async def _every_crash_state_holds(tmp_path, workload, write_path) -> None:
    """Record ``workload`` and check every crash state of its write log (one random subset of
    the in-doubt writes per point) against the oracle."""
    log, models = await record(workload(write_path.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=write_path)
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(1), 1, workload.__name__, result,
                       write_path)
    assert result.states >= 30 and not result.failures, (result.states, result.failures[:3])


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
async def test_log_fsyncs_around_full_commits(tmp_path, write_path):
    await _every_crash_state_holds(tmp_path, log_then_commit_workload, write_path)


def two_logged_one_unlinked_workload(scale: int):
    """Two files logged in one transaction; one is unlinked and the next sync commits while the
    durable log still names the unlinked file's extents (freed, pinned). With encryption the
    key is then removed (its write back commits) and added again."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(8)
        await committed_files(fs, rec, {name: rng.randbytes(6000 * scale) for name in ("foo", "bar")})
        for name in ("foo", "bar"):
            async with fs.open(f"/A/{name}", "r+") as f:
                await f.pwrite(rng.randbytes(5000 * scale), 500 * scale)
                await f.fsync()
                assert fs.vol.log_root
            await rec.persisted()
        await fs.unlink("/A/bar")
        await fs.sync()
        await rec.persisted()
        async with fs.open("/A/foo", "r+") as f:
            await f.pwrite(rng.randbytes(7000 * scale), 3000 * scale)
            await f.fsync()
            assert fs.vol.log_root
        await rec.persisted()
        if rec.kid is not None:
            await fs.remove_key(rec.kid)  # writes back and commits: the log goes
            assert not fs.vol.log_root
            await fs.add_key(KEY)
            await rec.persisted()
    return run


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
async def test_two_logged_files_one_unlinked_then_commits(tmp_path, write_path):
    await _every_crash_state_holds(tmp_path, two_logged_one_unlinked_workload, write_path)


def full_fs_workload(scale: int):
    """The image nearly full: two whole-file overwrites fsynced through the log take the last
    free space (what they free stays pinned), then the sync's commit must place its tree
    blocks around the logged extents and log blocks, and the next round reuses what was pinned.
    Every crash state must replay."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(9)
        await rec.mkdir("/A")
        size = 256 << 10
        room = fs.vol.engine.allocator.free_bytes()
        async with fs.open("/A/fill", "w") as f:
            await f.write(bytes(room - 3 * size - (2 << 20)))
        async with fs.open("/A/foo", "w") as f:
            await f.write(rng.randbytes(size))
        await fs.sync()
        await rec.persisted()
        await fs.vol.device.mark("logs")
        async with fs.open("/A/foo", "r+") as f:
            for _ in range(3):
                gen = fs.vol.generation
                for _ in range(2):
                    await f.pwrite(rng.randbytes(size), 0)
                    await f.fsync()
                    assert fs.vol.log_root and fs.vol.generation == gen, "the fsync went through the log"
                    await rec.persisted()
                await fs.sync()
                await rec.persisted()
    return run


# plain data in extents of up to 1 MiB: the fill is few extents, quick to write and to check
FULL = WritePath("full", 1 << 20, 0, encrypt=False, scale=1, node_size="4K")


async def test_log_fsyncs_on_a_full_image_reuse_space_safely(tmp_path):
    log, models = await record(full_fs_workload(FULL.scale), str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=FULL, size="16M")
    # each state reads the whole image back: a sample of those after the fill
    rng = random.Random(3)
    states = [st for st in log.crash_states(rng, 1) if st.upto >= log.marks()["logs"]]
    result = CampaignResult()
    await check_sample(log, models, str(tmp_path / "crash.img"), rng.sample(states, 12), result, "full", FULL)
    assert not result.failures and not result.failures, (result.states, result.failures[:3])


async def test_a_power_cut_at_every_write_of_the_replays_commit(tmp_path):
    """Mount replays the log, then commits: a cut at any write of that commit (torn writes too)
    leaves an image that still replays to what was fsynced, and fsck finds it clean."""
    img, crash, work = (str(tmp_path / n) for n in ("a.img", "crash.img", "work.img"))
    await blockemu.mkfs(img, size="64M", force=True)
    rng = random.Random(4)
    async with blockemu.mount(img, interval=3600) as fs:
        want = bytearray(rng.randbytes(200 << 10))
        log = await committed_then_log(fs, tmp_path, want)
        async with fs.open("/f", "r+") as f:
            for off, n in ((4096, 30000), (150 << 10, 90 << 10), (0, 5000)):
                data = rng.randbytes(n)
                await f.pwrite(data, off)
                want[off:off + n] = data
                want.extend(bytes(max(0, off + n - len(want))))
                await f.fsync()
        assert fs.vol.log_root
        log.crash_image(crash, len(log.entries))
    for cut in itertools.count(1):
        sparse_copy(crash, work)
        try:
            async with blockemu.mount(work, faults=FaultPlan(cut_after_writes=cut, torn=0.5, seed=cut)):
                pass
        except OSError:
            pass
        else:
            break
        assert cut < 200
        report = check(work, check_data=True)
        assert report.clean, (cut, [e.message for e in report.errors])
        async with blockemu.mount(work) as fs:
            async with fs.open("/f") as f:
                assert await f.read() == want, cut
    assert cut > 3  # the replay's commit was cut at each of its writes


async def test_repair_of_an_image_holding_a_log_replays_it_then_repairs(tmp_path):
    """fsck --repair opens the image read-write, which replays the log and commits: the check's
    report (of the trees before the replay) is then stale. The repair must go on from a fresh
    check -- not refuse with 'the image changed since the check' -- and keep what was fsynced."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", force=True)
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, bytes(100000))
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"L" * 5000, 0)
            await f.fsync()
        assert fs.vol.log_root
        log.crash_image(crash, len(log.entries))
    with open(crash, "r+b") as fh:  # a damage repair fixes: the superblock's bytes_used off by a sector
        off = S.SUPER_OFFSETS[0]
        fh.seek(off)
        sb = decode_super(fh.read(S.SUPER_INFO_SIZE), off)
        fh.seek(off)
        fh.write(encode_super(dataclasses.replace(sb, bytes_used=sb.bytes_used + 4096), off))
    assert {e.code for e in check(crash).errors} == {"USED_BYTES_MISMATCH"}
    p = subprocess.run([sys.executable, "-m", "blockemu", "fsck", crash, "--repair", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr  # corrected
    assert "USED_BYTES_MISMATCH" in {e["code"] for e in json.loads(p.stdout)["repaired"]}
    assert check(crash, check_data=True).clean
    async with blockemu.mount(crash, readonly=True) as fs:
        async with fs.open("/f") as f:
            assert await f.read(5001) == b"L" * 5000 + b"\0"


async def test_a_hole_punched_while_an_fsync_waits_for_the_log_is_not_lost(tmp_path, monkeypatch):
    """An fsync decides to log, then waits for the commit lock (another fsync's log sync holds
    it); a hole punched meanwhile makes that inode's fsync a commit. If the waiting fsync logs
    anyway, its log has no item for the hole, and replay over the committed tree brings back
    the data from before the write it acknowledged."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", force=True)
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, b"o" * 65536)
        waiting, go = asyncio.Event(), asyncio.Event()
        log_sync = fs.vol._log_sync

        async def held(ino: int, *called: int) -> bool:  # the commit lock is busy: this fsync waits for it
            waiting.set()
            await go.wait()
            return await log_sync(ino, *called)

        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"n" * 8192, 0)
            monkeypatch.setattr(fs.vol, "_log_sync", held)
            fsync = asyncio.ensure_future(f.fsync())
            await waiting.wait()
            monkeypatch.setattr(fs.vol, "_log_sync", log_sync)
            await f.punch_hole(0, 4096)
            go.set()
            await fsync
            log.crash_image(crash, len(log.entries))
    assert check(crash, check_data=True).clean
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            head = await f.pread(4096, 0)
            assert head in (b"n" * 4096, bytes(4096)), head[:8]  # the write fsynced, or the hole after it
            assert await f.pread(4096, 4096) == b"n" * 4096


async def test_a_durable_log_stays_unallocatable_until_a_superblock_supersedes_it(tmp_path, monkeypatch):
    """The protocol's pin rule, checked where it matters rather than by luck of the allocator's
    cursor: whenever a superblock is written (a log sync, the commit that drops the log), no
    block of the log the durable superblock names and no extent that log names may be free to
    allocate -- the writes before that superblock would overwrite what a crash replays. The
    overwrites free logged extents whole, and COW the log's blocks."""
    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size="64M", force=True)
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(random.Random(5).randbytes(300 << 10))
        await fs.sync()
        vol = fs.vol
        flush_then_fua, writev, checked = vol.device.flush_then_fua, vol.device.writev, []

        def free_but_named() -> list[tuple[int, int]]:
            at = S.SUPER_OFFSETS[0]
            # the durable one, and the log slot written by the last completed flush, if any
            sb = choose_log(vol.device.read_sync, decode_super(vol.device.read_sync(at, S.SUPER_INFO_SIZE), at))[0]
            if not sb.log_root:
                return []
            blocks, items = read_log(vol.device.read_sync, sb)
            named = [(b, sb.nodesize) for b in blocks]
            named += [(fe.disk_bytenr, fe.disk_num_bytes) for fe in
                      (FileExtent.unpack(body) for key, body in items if key[1] == S.EXTENT_DATA)]
            checked.append(len(named))
            return [r for r in named if vol.engine.allocator.overlaps_free(*r)]

        async def watched(offset: int, data: bytes) -> None:
            if offset == S.SUPER_OFFSETS[0]:  # the flush, then the primary superblock with FUA
                assert not free_but_named()
            await flush_then_fua(offset, data)

        async def watched_writev(writes, **kw) -> None:
            if any(at in S.LOG_SLOT_OFFSETS for at, _ in writes):  # a later log sync's blocks and slot
                assert not free_but_named()
            await writev(writes, **kw)

        monkeypatch.setattr(vol.device, "flush_then_fua", watched)
        monkeypatch.setattr(vol.device, "writev", watched_writev)
        async with fs.open("/f", "r+") as f:
            for off in (0, 100 << 10, 0, 0, 4096):
                await f.pwrite(random.Random(off).randbytes(64 << 10), off)
                await f.fsync()
                assert vol.log_root
        await fs.sync()
        assert len(checked) == 5  # the four log syncs after the first, and the commit


async def test_an_fsync_that_finds_no_room_for_the_log_fails_and_keeps_the_durable_log(tmp_path):
    """No room left at all (another allocation took it): the log cannot COW its blocks, so the
    fsync falls back to a commit, which finds no room either. The fsync must fail (never report
    success), and the image keep what the earlier log fsync made durable, fsck-clean."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", force=True)
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, b"o" * 65536)
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"a" * 8192, 0)
            await f.fsync()
            assert fs.vol.log_root
            await f.pwrite(b"b" * 8192, 16384)
            await fs.writeback.flush_inode(f.inode)  # the data has its extent; the log needs blocks
            alloc = fs.vol.engine.allocator
            while alloc.node_room:
                alloc.alloc(fs.vol.sb.nodesize)
            with pytest.raises(OSError):
                await f.fsync()
            log.crash_image(crash, len(log.entries))
        with pytest.raises(OSError):
            await fs.unmount()
    assert check(crash, check_data=True).clean
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == b"a" * 8192 + b"o" * (65536 - 8192)


async def test_a_log_sync_leaves_the_metadata_reserve_and_the_room_promised_to_dirty_data(tmp_path):
    """The log's blocks stay taken until the commit that drops the log is durable, so they must
    come out of free room as data does: never the reserve that commit needs for its own blocks,
    nor the room write() promised to another file's dirty data. With free room squeezed to
    exactly those two, a file's fsync that would log commits instead, and the dirty data's own
    fsync then gets its extents: both files read back after a remount."""
    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size="64M", force=True)
    rng = random.Random(5)
    a_data, b_data = rng.randbytes(1 << 20), rng.randbytes(2 << 20)
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/a", "w") as a, fs.open("/b", "w") as b:
            await a.write(a_data)
            await b.write(b_data)
            await fs.sync()
            b_data = bytearray(b_data)
            for off in rng.sample(range(0, len(b_data), 4096), 300):  # scattered: ~2 log blocks of items
                page = rng.randbytes(4096)
                await b.pwrite(page, off)
                b_data[off:off + 4096] = page
            await fs.writeback.flush_inode(b.inode)  # b's extents placed: its fsync needs only the log
            page = rng.randbytes(65536)
            await a.pwrite(page, 4096)  # acknowledged, dirty: write() promised it room
            a_data = a_data[:4096] + page + a_data[4096 + 65536:]
            engine, alloc = fs.vol.engine, fs.vol.engine.allocator
            while alloc.node_room > engine.data_keep() + fs.promised_blocks():
                alloc.alloc(fs.vol.sb.nodesize)
            generation = fs.vol.generation
            await b.fsync()
            assert fs.vol.generation > generation and not fs.vol.log_root  # it committed, logging nothing
            await a.fsync()
    async with blockemu.mount(img) as fs:
        for path, data in (("/a", a_data), ("/b", bytes(b_data))):
            async with fs.open(path) as f:
                assert await f.read() == data


async def _log_at_its_cap(tmp_path, fill: int | None) -> tuple[int, int, bytes]:
    """A 4 MiB file committed, then scattered pages of it overwritten and fsynced through the
    log until the log has ``LOG_COMMIT_BLOCKS`` blocks (4K nodes: a leaf holds few items). With
    ``fill``, another file first takes the free room down to ``fill`` tree blocks, and once the
    log is at its cap one more overwrite (fsynced, logged) takes it to within a few blocks of
    what write() must leave -- the keep and a path per tree for splits (``promised_blocks``) --
    ``crash.img`` being then the image after a power cut. Returns the room the rounds took plus
    the keep they left, what is left beyond the keep and that path, and the file's contents."""
    from blockemu.engine.treelog import LOG_COMMIT_BLOCKS

    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size="32M", node_size="4K", force=True)
    rng, size = random.Random(12), 4 << 20
    want = bytearray(rng.randbytes(size))
    async with blockemu.mount(img, interval=3600) as fs:
        vol, ns = fs.vol, fs.vol.sb.nodesize
        alloc, engine = vol.engine.allocator, vol.engine
        async with fs.open("/t", "w") as f:
            await f.write(want)
        async with fs.open("/fill", "w") as g:
            while fill is not None and alloc.node_room > fill + 2:
                await g.write(bytes(max(alloc.node_room - fill, 2) // 2 * ns))
                await fs.sync()
        await fs.sync()
        start, gen = alloc.node_room, vol.generation
        log = vol.device.start_log(base_copy=str(tmp_path / "base.img"))
        async with fs.open("/t", "r+") as f:
            while vol.log.blocks() < LOG_COMMIT_BLOCKS:
                for off in rng.sample(range(0, size, 4096), 24):
                    want[off:off + 4096] = page = rng.randbytes(4096)
                    await f.pwrite(page, off)
                await f.fsync()
                assert vol.generation == gen, "every fsync went through the log"
            # the extent and checksum changes held for the commit take their room now, not the
            # bound they keep back: what the rounds took, whether or not the room let them be held
            fs.apply_held()
            used = start - alloc.node_room + engine.data_keep()
            # write() admits data up to the keep and a path per tree for splits (``op_blocks``), its
            # partial end pages and its items (``Filesystem.room_for``): 3 blocks more here
            while fill is not None and alloc.node_room - engine.data_keep() - engine.op_blocks() > 6:
                page = rng.randbytes((alloc.node_room - engine.data_keep() - engine.op_blocks() - 6) * ns)
                want[8192:8192 + len(page)] = page
                await f.pwrite(page, 8192)
                await f.fsync()
            assert vol.generation == gen and vol.log_root, "every fsync went through the log"
        log.crash_image(str(tmp_path / "crash.img"), len(log.entries))
        return used, alloc.node_room - engine.data_keep() - engine.op_blocks(), bytes(want)


async def test_a_log_at_its_cap_on_an_image_full_to_the_keep_replays_at_mount(tmp_path):
    """The largest log there can be (``LOG_COMMIT_BLOCKS``) on an image whose free room is the
    keep and no more than a write can leave (a path per tree besides): the log's blocks and extents stay taken until the commit that drops it,
    so mount's replay reserves them all and its commit must fit in what is left -- the metadata
    reserve. The power cut's image mounts with every fsynced write, fsck-clean."""
    from blockemu.engine.treelog import LOG_COMMIT_BLOCKS

    used, _, _ = await _log_at_its_cap(tmp_path, None)  # what the rounds take, on room to spare
    _, left, want = await _log_at_its_cap(tmp_path, used + 40)  # the rounds, then the top-up, fill the rest
    crash = str(tmp_path / "crash.img")
    _, blocks, _ = _log_items(crash)
    assert 0 <= left <= 6 and len(blocks) >= LOG_COMMIT_BLOCKS, (left, len(blocks))
    assert check(crash, check_data=True).clean
    work = str(tmp_path / "work.img")
    sparse_copy(crash, work)
    async with blockemu.mount(work) as fs:
        assert fs.vol.replayed and not fs.vol.log_root
        writes = fs.vol.device.writes  # the replay's commit
        async with fs.open("/t") as f:
            assert await f.read() == want
    report = check(work, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    # a power cut in that commit (torn writes too): the log still replays, in the room left
    for cut in sorted({1, writes // 4, writes // 2, writes - 2, writes - 1}):
        sparse_copy(crash, work)
        with pytest.raises(OSError):
            async with blockemu.mount(work, faults=FaultPlan(cut_after_writes=cut, torn=0.5, seed=cut)):
                pass
        report = check(work, check_data=True)
        assert report.clean, (cut, [e.message for e in report.errors])
        async with blockemu.mount(work) as fs:
            async with fs.open("/t") as f:
                assert await f.read() == want, cut
