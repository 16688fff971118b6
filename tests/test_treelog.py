"""fsync through the log tree (DESIGN §9): what an fsync writes, what a crash keeps, replay,
read-only opens, fsck, the full-commit fallbacks, and every crash state around the log's
writes, flushes and FUAs on the production write path."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import subprocess
import sys

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.device.image import ImageFile
from blockemu.engine import treelog
from blockemu.ondisk import structs as S
from blockemu.workload.crash import CampaignResult, Recorder, check_sample, check_states, expected_states, record
from blockemu.workload.writepath import FAST, PRODUCTION
from tests.util import PRODUCTION_4K, flip, fsynced_then_cut

MiB = 1 << 20


async def _fresh(path: str, size: str = "64M") -> None:
    await blockemu.mkfs(path, size=size, force=True)


def _crash_now(log, dest: str) -> None:
    """The image after a power cut right now: what the last flush and FUA made durable."""
    log.crash_image(dest, len(log.entries))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _super(path: str):
    with ImageFile.open(path) as img:
        return img.best_super()


def _log_super(path: str):
    """The superblock as mount reads it: ``log_root`` the newest log that landed whole (a log
    slot's, or the superblock's own)."""
    from blockemu.engine.treelog import choose_log
    with ImageFile.open(path) as img:
        return choose_log(img.read, img.best_super())[0]


def _resign_slots(path: str) -> None:
    """After a test's edit of log blocks: each log slot of the image records the checksum field
    its blocks now have, as if the edited log had been written so (a hostile log that landed
    whole, not one a power cut tore)."""
    from blockemu.ondisk.logslot import decode_slot, encode_slot
    sb = _super(path)
    with open(path, "r+b") as f:
        for at in S.LOG_SLOT_OFFSETS:
            f.seek(at)
            slot = decode_slot(f.read(S.LOG_SLOT_SIZE), at, sb.fsid, sb.csum_type)
            if slot is None:
                continue
            blocks = []
            for bytenr, _ in slot.blocks:
                f.seek(bytenr)
                blocks.append((bytenr, f.read(S.CSUM_FIELD)))
            f.seek(at)
            f.write(encode_slot(dataclasses.replace(slot, blocks=tuple(blocks)), sb.fsid, sb.csum_type, at))


async def committed_then_log(fs, tmp_path, data: bytes, path: str = "/f"):
    """``path`` holding ``data``, committed; then the write log starts (the crash images' base) --
    through ``start_write_log``, which empties the device's cache first: a commit leaves its
    mirrors there, on an image that has one, until the next flush."""
    async with fs.open(path, "w") as f:
        await f.write(data)
    await fs.sync()
    return await fs.start_write_log(str(tmp_path / "base.img"))


async def test_fsync_writes_the_log_with_one_flush_and_one_fua(tmp_path):
    img = str(tmp_path / "a.img")
    await _fresh(img)
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(os.urandom(256 << 10))
        await fs.sync()
        gen = fs.vol.generation
        log = fs.vol.device.start_log()
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"x" * 4096, 8192)
            await f.fsync()
            # no full commit: same generation, the superblock names a log
            assert fs.vol.generation == gen and fs.vol.log_root
            kinds = [e.kind for e in log.entries]
            assert kinds.count("flush") == 1 and kinds.count("fua") == 1, kinds
            fua = next(e for e in log.entries if e.kind == "fua")
            assert fua.offset == S.SUPER_OFFSETS[0] and fua is log.entries[-1]
            # the superblock comes after the flush that made the log blocks durable
            assert kinds.index("flush") < kinds.index("fua")
        await fs.sync()  # the full commit (on the interval, sync or unmount) supersedes the log
        assert fs.vol.generation == gen + 1 and not fs.vol.log_root
    assert not _super(img).log_root


async def _crash_after_fsyncs(tmp_path, writes: list[tuple[int, int]], *, size: int = 256 << 10):
    """Write a file, commit, then for each (offset, length) pwrite random bytes and fsync;
    crash at once. Returns the crash image and the bytes fsync acknowledged."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await _fresh(img)
    rng = random.Random(len(writes))
    async with blockemu.mount(img, interval=3600) as fs:
        want = bytearray(rng.randbytes(size))
        log = await committed_then_log(fs, tmp_path, want)
        async with fs.open("/f", "r+") as f:
            for off, n in writes:
                data = rng.randbytes(n)
                await f.pwrite(data, off)
                want.extend(bytes(max(0, off - len(want))))  # a write past the end leaves a hole
                want[off:off + n] = data
                await f.fsync()
                assert fs.vol.log_root, "the fsync went through the log"
        _crash_now(log, crash)
    return crash, bytes(want)


@pytest.mark.parametrize("writes", [
    [(4096, 4096)],
    # a later write covers a logged item whole, then splits one: stale log items must go
    [(4096, 4096), (0, 8192), (2048, 100)],
    # a write past the end (size grows), overlapping rewrites across many fsyncs
    [(300 << 10, 5000), (250 << 10, 60 << 10), (100, 10), (260 << 10, 4096), (0, 256 << 10)],
])
async def test_a_crash_after_log_fsyncs_keeps_every_fsynced_byte(tmp_path, writes):
    crash, want = await _crash_after_fsyncs(tmp_path, writes)
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    assert any(n.startswith("log tree:") for n in report.notes), report.notes
    async with blockemu.mount(crash) as fs:
        assert not fs.vol.log_root and not fs.vol.sb.incompat_flags & S.INCOMPAT_TREE_LOG  # replayed, committed
        async with fs.open("/f") as f:
            assert await f.read() == want
    report = check(crash, check_data=True)
    assert report.clean and not report.notes, ([e.message for e in report.errors], report.notes)


async def test_random_overwrites_and_fsyncs_replay_exactly(tmp_path):
    rng = random.Random(11)
    writes = [(rng.randrange(0, 400 << 10), rng.randrange(1, 40 << 10)) for _ in range(25)]
    crash, want = await _crash_after_fsyncs(tmp_path, writes)
    assert check(crash, check_data=True).clean
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want


async def test_read_only_opens_see_the_log_and_write_nothing(tmp_path):
    crash, want = await _crash_after_fsyncs(tmp_path, [(4096, 10000)])
    before = _digest(crash)
    async with blockemu.mount(crash, readonly=True) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want
        with pytest.raises(OSError):
            await fs.mkdir("/d")
    assert check(crash).clean
    assert _digest(crash) == before


async def test_a_log_sets_an_incompat_flag_that_the_next_commit_clears(tmp_path):
    crash, _ = await _crash_after_fsyncs(tmp_path, [(0, 4096)])
    sb = _super(crash)
    assert sb.log_root and sb.incompat_flags & S.INCOMPAT_TREE_LOG and sb.log_root_transid == sb.generation + 1
    async with blockemu.mount(crash):
        pass
    sb = _super(crash)
    assert not sb.log_root and not sb.incompat_flags & S.INCOMPAT_TREE_LOG


@pytest.mark.parametrize("change", ["new", "rename", "link", "unlink", "truncate", "punch"])
async def test_changes_the_log_cannot_say_commit_and_are_durable(tmp_path, change):
    """btrfs's guarantees after fsync of a file whose name changed (or that is new): the name
    is durable. Here such an fsync is a full commit (a new generation, no log)."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await _fresh(img)
    async with blockemu.mount(img, interval=3600) as fs:
        await fs.mkdir("/d")
        log = await committed_then_log(fs, tmp_path, b"o" * 20000, "/d/old")
        gen = fs.vol.generation
        path, size = "/d/old", 20000
        if change == "new":
            path = "/d/new"
            f = await fs.open(path, "w")
            await f.write(b"n" * 5000)
            size = 5000
        elif change == "rename":
            await fs.rename("/d/old", "/d/renamed")
            path = "/d/renamed"
            f = await fs.open(path, "r+")
        elif change == "link":
            await fs.link("/d/old", "/d/linked")
            path = "/d/linked"
            f = await fs.open(path, "r+")
        elif change == "punch":  # a hole in the middle: the committed data must not come back
            f = await fs.open(path, "r+")
            await f.punch_hole(4096, 8192)
        elif change == "unlink":
            f = await fs.open(path, "r+")
            await fs.unlink(path)  # open, unlinked: an orphan
        else:
            f = await fs.open(path, "r+")
            await f.truncate(3000)
            size = 3000
        await f.pwrite(b"w" * 100, 0)
        await f.fsync()
        assert fs.vol.generation == gen + 1 and not fs.vol.log_root
        _crash_now(log, crash)
        await f.close()
    async with blockemu.mount(crash) as fs:
        if change == "unlink":
            assert not await fs.exists(path) and await fs.readdir("/d") == []
            return
        st = await fs.stat(path)
        assert st.st_size == size
        async with fs.open(path) as f:
            assert (await f.read(100)) == b"w" * 100
            if change == "punch":
                assert await f.pread(8192, 4096) == bytes(8192)
        if change == "rename":
            assert not await fs.exists("/d/old")


async def test_an_fsync_commits_once_the_log_has_grown_past_its_limit(tmp_path):
    """Replay reads the whole log, and the log only grows until a commit empties it: past
    LOG_COMMIT_BLOCKS the fsync commits (a new generation,
    the log emptied), the next one logs again into a fresh log, and both keep what they acked."""
    from blockemu.engine.treelog import LOG_COMMIT_BLOCKS
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)  # small leaves: the log grows fast
    rng = random.Random(7)
    async with blockemu.mount(img, interval=3600) as fs:
        want = bytearray(rng.randbytes(1 << 20))
        log = await committed_then_log(fs, tmp_path, want)
        async with fs.open("/f", "r+") as f:
            gens = []
            while fs.vol.log.blocks() <= LOG_COMMIT_BLOCKS:
                gen = fs.vol.generation
                for page in rng.sample(range(256), 32):
                    data = rng.randbytes(4096)
                    await f.pwrite(data, page * 4096)
                    want[page * 4096 : (page + 1) * 4096] = data
                await f.fsync()
                assert fs.vol.generation == gen and fs.vol.log_root, "below the limit, fsync logs"
                gens.append(gen)
            assert len(gens) > 1
            await f.pwrite(b"c" * 4096, 0)
            want[:4096] = b"c" * 4096
            await f.fsync()
            assert fs.vol.generation == gens[-1] + 1 and not fs.vol.log_root and fs.vol.log.blocks() == 0
            await f.pwrite(b"l" * 4096, 8192)
            want[8192:12288] = b"l" * 4096
            await f.fsync()
            assert fs.vol.generation == gens[-1] + 1 and fs.vol.log_root and fs.vol.log.blocks() == 1
        _crash_now(log, crash)
    assert check(crash, check_data=True).clean
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want


async def test_a_directory_fsync_commits(tmp_path):
    img = str(tmp_path / "a.img")
    await _fresh(img)
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x" * 5000)
        gen = fs.vol.generation
        d = fs.inode((await fs.stat("/")).st_ino)
        await fs.fsync_inode(d)
        assert fs.vol.generation == gen + 1 and not fs.vol.log_root


async def committed_files(fs, rec: Recorder, files: dict[str, bytes]) -> None:
    """The crash workloads' start: /A holding ``files`` (name -> contents), committed, a
    persistence point."""
    await rec.mkdir("/A")
    for name, data in files.items():
        async with fs.open(f"/A/{name}", "w") as f:
            await f.write(data)
    await fs.sync()
    await rec.persisted()


def log_fsync_workload(scale: int):
    """write; fsync (log); write; fsync (log) -- and the crash comes before any interval commit."""
    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(3)
        await committed_files(fs, rec, {"foo": rng.randbytes(8000 * scale)})
        async with fs.open("/A/foo", "r+") as f:
            for off, n in ((1000 * scale, 3000 * scale), (0, 9000 * scale)):
                await f.pwrite(rng.randbytes(n), off)
                await f.fsync()
                assert fs.vol.log_root, "the fsync went through the log"
                await rec.persisted()
    return run


async def crash_states(tmp_path, workload, write_path, subsets: int, tag: str, **record_options):
    """Record ``workload`` and check every crash state of its log (``subsets`` orderings of the
    writes in doubt at each cut): the models recorded, and the campaign's result."""
    log, models = await record(workload, str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                               write_path=write_path, **record_options)
    result = CampaignResult()
    await check_states(log, models, str(tmp_path / "crash.img"), random.Random(5), subsets, tag, result, write_path)
    return models, result


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
async def test_every_crash_state_around_log_fsyncs(tmp_path, write_path):
    models, result = await crash_states(tmp_path, log_fsync_workload(write_path.scale), write_path, 3, "log")
    gens = {}
    for gen, root in models:
        gens.setdefault(gen, []).append(root)
    assert any(len([r for r in roots if r]) == 2 for roots in gens.values()), models.keys()  # two log states
    assert result.states >= 20 and not result.failures, result.failures[:3]



async def test_a_log_written_without_barriers_is_caught(tmp_path):
    """With flushes ignored (nobarrier) the log's superblock can land before its blocks: the
    crash states of the same workload must then show failures (the checker can fail)."""
    from blockemu.device.faultplan import FaultPlan
    _, result = await crash_states(tmp_path, log_fsync_workload(FAST.scale), FAST, 3, "nobarrier",
                                   faults=FaultPlan(nobarrier=True))
    assert result.failures


def _log_items(path: str):
    from blockemu.engine.treelog import read_log
    sb = _log_super(path)
    with ImageFile.open(path) as img:
        return sb, *read_log(img.read, sb)


async def test_fsck_check_data_reads_the_logged_data(tmp_path):
    """--check-data checks the data the log's new extents hold against the log's checksums, as
    it checks committed data: a damaged sector there would replay and then fail every read."""
    crash, _ = await _crash_after_fsyncs(tmp_path, [(4096, 8192)])
    _, _, items = _log_items(crash)
    sector = next(key[2] for key, _ in items if key[:2] == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM))
    flip(crash, sector + 100)
    assert check(crash).clean  # without reading data nothing says so
    report = check(crash, check_data=True)
    assert [(e.code, e.bytenr) for e in report.errors] == [("CSUM_MISMATCH", sector)], [e.message for e in report.errors]
    assert "log tree" in report.errors[0].message
    assert not any("zero-log" in n for n in report.notes)  # the log itself is sound: replay is the way


async def test_a_damaged_log_fails_the_mount_and_rescue_zero_log_drops_it(tmp_path, capsys):
    from blockemu.cli.main import main
    from blockemu.errors import CorruptionError
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await _fresh(img)
    committed = os.urandom(64 << 10)
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, committed)
        gen = fs.vol.generation
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"L" * 4096, 0)
            await f.fsync()
        _crash_now(log, crash)
    sb, blocks, _ = _log_items(crash)
    flip(crash, blocks[0] + sb.nodesize // 2)  # the log's leaf fails its checksum

    report = check(crash)
    assert not report.clean and any("zero-log" in n for n in report.notes), report.notes
    for readonly in (False, True):  # a reader fails too: what the log holds is part of the image's state
        with pytest.raises(CorruptionError, match="rescue zero-log"):
            async with blockemu.mount(crash, readonly=readonly):
                pass
    assert main(["rescue", "zero-log", crash]) == 0
    assert "dropped the fsync log" in capsys.readouterr().out
    sb = _super(crash)
    assert not sb.log_root and not sb.incompat_flags & S.INCOMPAT_TREE_LOG and sb.generation == gen
    assert check(crash, check_data=True).clean
    async with blockemu.mount(crash) as fs:  # the last full commit: the logged write is gone, as btrfs's zero-log
        async with fs.open("/f") as f:
            assert await f.read() == committed
    before = _digest(crash)
    assert main(["rescue", "zero-log", crash]) == 0 and "no fsync log" in capsys.readouterr().out
    assert _digest(crash) == before


LOG_CAP = 16  # the cap the log-cap test sets: crossed as at 64, in a quarter of the rounds


def log_cap_workload(scale: int, grew: list[int]):
    """Three files, each rewritten in scattered pages and fsynced in turn, until the log has
    crossed its cap (LOG_COMMIT_BLOCKS, set to ``LOG_CAP``: the fsync commits instead) twice:
    states before, at and after each cap-commit, with the log then started afresh. Every change
    is fsynced before the next persistence point, so each durable state has its oracle.
    ``grew`` collects the generations the cap-commits made."""

    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(11)
        files = [f"/A/f{i}" for i in range(3)]
        await committed_files(fs, rec, {p.removeprefix("/A/"): rng.randbytes(128 * 4096) for p in files})
        handles = [await fs.open(p, "r+") for p in files]
        try:
            rounds = 0
            while len(grew) < 2 and rounds < 8 * LOG_CAP:  # a cap of 64 was crossed at rounds 62 and 124 (fast), 41 and 84 (production)
                rounds += 1
                for f in handles:
                    if rounds == 2 and f is handles[0] and scale > 1:
                        await f.pwrite(rng.randbytes(1 << 20), 0)  # a worker's extent too, on production
                    for page in rng.sample(range(128), 12):
                        await f.pwrite(rng.randbytes(4096), page * 4096)
                    gen, over = fs.vol.generation, fs.vol.log.blocks() > LOG_CAP
                    await f.fsync()
                    if over:
                        assert fs.vol.generation == gen + 1 and not fs.vol.log_root, "past the cap, fsync commits"
                        grew.append(fs.vol.generation)
                    else:
                        assert fs.vol.generation == gen and fs.vol.log_root, "below the cap, fsync logs"
                    await rec.persisted()
        finally:
            for f in handles:
                await f.close()
    return run


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
async def test_every_crash_state_across_the_log_cap(tmp_path, write_path, monkeypatch):
    """Crash states around fsyncs of several files that grow the log past its cap (a full
    commit), then log again into a fresh log: each must mount as the last durable state. The
    cap is lowered to ``LOG_CAP``: at 64 blocks the workload took 84 rounds of three fsyncs,
    each with its snapshot, and the test ~100 s of a loaded suite."""
    monkeypatch.setattr(treelog, "LOG_COMMIT_BLOCKS", LOG_CAP)
    grew: list[int] = []
    log, models = await record(log_cap_workload(write_path.scale, grew), str(tmp_path / "w.img"),
                               str(tmp_path / "base.img"), write_path=write_path)
    assert len(grew) == 2, grew
    # the states whose last durable one is the log just before a cap-commit, that commit, or
    # the fresh log after it, sampled (a state costs an fsck and a mount), and the last state
    rng = random.Random(5)
    states = list(log.crash_states(rng, subsets=1))
    first = min(models)
    wants = expected_states(log, (st.upto for st in states), first)
    order = list(dict.fromkeys(wants))
    near = {d for g in grew for d in order[order.index((g, 0)) - 1 : order.index((g, 0)) + 2]}
    around = [st for st, want in zip(states, wants) if want in near]
    assert len(around) > 12
    result = CampaignResult()
    await check_sample(log, models, str(tmp_path / "crash.img"), rng.sample(around, 12) + states[-1:],
                       result, "logcap", write_path)
    assert not result.failures, result.failures[:3]


def logged_notes_workload(scale: int):
    """Two files, fsynced through the log in an order that exercises every kind of note the
    log is built from (``Engine.changed_extents``): a write inside an extent logged earlier
    (its item trimmed, a new item for what is left on its right), one covering logged items
    whole and trimming the next at its start (items dropped from the log, one moved), a second
    file logged between the first's fsyncs, and a write past the end. A note missed is a
    logged range lost: replay then shows committed data older than what the fsync
    acknowledged."""
    u = 4096 * max(1, scale // 16)

    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(7)
        await committed_files(fs, rec, {"foo": rng.randbytes(24 * u), "bar": rng.randbytes(24 * u)})
        foo, bar = await fs.open("/A/foo", "r+"), await fs.open("/A/bar", "r+")
        try:
            for f, writes in ((foo, [(u, 4 * u)]), (foo, [(2 * u, u)]), (foo, [(0, 4 * u)]), (bar, [(2 * u, u)]),
                              (bar, [(20 * u, 6 * u), (10 * u, u)]), (foo, [(3 * u, 3 * u), (u, u)])):
                for off, n in writes:
                    await f.pwrite(rng.randbytes(n), off)
                gen = fs.vol.generation
                await f.fsync()
                assert fs.vol.generation == gen and fs.vol.log_root, "the fsync went through the log"
                await rec.persisted()
        finally:
            await foo.close()
            await bar.close()
    return run


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
async def test_every_crash_state_around_fsyncs_logged_from_notes(tmp_path, write_path):
    """Crash states cut around each log write, flush and FUA of ``logged_notes_workload``:
    every one must open (replaying the log) to the last state fsync acknowledged."""
    _, result = await crash_states(tmp_path, logged_notes_workload(write_path.scale), write_path, 1, "notes")
    assert result.states >= 20 and not result.failures, result.failures[:3]


async def test_a_file_written_before_another_files_log_sync_is_logged_at_its_own(tmp_path):
    """bar is written and written back (as memory pressure does: extents mapped, no commit),
    then foo is written and fsynced (logged), then bar is fsynced: bar's notes must wait
    through foo's log sync, and the crash right after keeps both."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await _fresh(img)
    rng = random.Random(2)
    want = {p: bytearray(rng.randbytes(64 << 10)) for p in ("/foo", "/bar")}
    async with blockemu.mount(img, interval=3600) as fs:
        for p, data in want.items():
            async with fs.open(p, "w") as f:
                await f.write(data)
        log = await committed_then_log(fs, tmp_path, want["/foo"], "/foo")
        async with fs.open("/foo", "r+") as foo, fs.open("/bar", "r+") as bar:
            for f, p, off in ((bar, "/bar", 8192), (foo, "/foo", 4096), (bar, "/bar", 40960)):
                data = rng.randbytes(12288)
                await f.pwrite(data, off)
                want[p][off:off + len(data)] = data
                if f is bar:
                    await fs.writeback.flush_inode(fs.inode((await fs.stat("/bar")).st_ino))
            await foo.fsync()
            await bar.fsync()
            assert fs.vol.log_root, "both fsyncs went through the log"
        _crash_now(log, crash)
    async with blockemu.mount(crash) as fs:
        for p, data in want.items():
            async with fs.open(p) as f:
                assert await f.read() == data, p


def _durable_log(fs) -> tuple[list[int], list]:
    """The blocks and items of the log the durable superblock (or log slot) names, read through
    the device."""
    from blockemu.engine.treelog import choose_log, read_log
    from blockemu.fs.volume import read_primary_super
    read = fs.vol.device.read_sync
    return read_log(read, choose_log(read, read_primary_super(fs.vol.device))[0])


def _log_csum_items(fs) -> list:
    return [(k, b) for k, b in _durable_log(fs)[1] if k[:2] == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM)]


def joined_csums_workload(scale: int):
    """Scattered small overwrites, fsynced through the log three times: each write its own
    extent, the extents one after another on disk, so the log joins their checksum items --
    within a sync, and onto the item an earlier sync wrote (which grows, in a new copy of its
    leaf). Replay must give each extent its own digests back: a sector left without one fails
    fsck, a digest given to the wrong sector fails the read."""
    u = 4096 * max(1, scale // 16)

    async def run(fs, rec: Recorder) -> None:
        rng = random.Random(9)
        await committed_files(fs, rec, {"foo": rng.randbytes(64 * u)})
        async with fs.open("/A/foo", "r+") as f:
            for _ in range(3):
                for slot in rng.sample(range(0, 64, 2), 6):
                    await f.pwrite(rng.randbytes(u), slot * u)
                gen = fs.vol.generation
                await f.fsync()
                assert fs.vol.generation == gen and fs.vol.log_root, "the fsync went through the log"
                assert len(_log_csum_items(fs)) < len(fs.vol.log.csummed), "the extents' checksum items joined"
                await rec.persisted()
    return run


@pytest.mark.parametrize("write_path", [PRODUCTION, FAST], ids=lambda p: p.name)
async def test_every_crash_state_around_log_syncs_that_join_checksum_items(tmp_path, write_path):
    _, result = await crash_states(tmp_path, joined_csums_workload(write_path.scale), write_path, 1, "joined")
    assert result.states >= 15 and not result.failures, result.failures[:3]


async def test_replay_cuts_joined_checksum_items_back_into_each_extents(tmp_path):
    """The log holds fewer checksum items than the extents it names (joined); the replayed
    csum tree holds each extent's digests as writeback made them -- as if the writes had been
    committed -- and fsck --check-data reads every sector clean, before and after replay."""
    img, crash, committed = (str(tmp_path / n) for n in ("a.img", "crash.img", "committed.img"))
    await _fresh(img)
    rng = random.Random(4)
    writes = [(rng.randrange(64) * 4096, rng.randbytes(4096)) for _ in range(20)]
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, rng.randbytes(256 << 10))
        async with fs.open("/f", "r+") as f:
            for off, data in writes:
                await f.pwrite(data, off)
            await f.fsync()
            assert fs.vol.log_root
            assert 0 < len(_log_csum_items(fs)) < len(fs.vol.log.csummed)
            want_csums = sorted(fs.extents.csum.items())  # the tree with the changes held for the commit
        _crash_now(log, crash)
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    async with blockemu.mount(crash) as fs:
        assert sorted(fs.vol.engine.trees[S.CSUM_TREE_OBJECTID].items()) == want_csums
    assert check(crash, check_data=True).clean


async def test_a_log_sync_writes_the_delta_not_the_whole_log(tmp_path):
    """Scattered writes change items in every leaf of a one-tree log, so each sync re-encoded
    and wrote all of them; folded into a base, every fold did. The log's delta holds what was
    logged since it began: a sync writes its one leaf and no block behind it -- a delta with no
    room left stays as it was written, and a new one names it."""
    img = str(tmp_path / "a.img")
    await _fresh(img)
    rng = random.Random(2)
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(rng.randbytes(16 * MiB))
        await fs.sync()
        written: list[tuple[int, int]] = []  # (blocks the log had, blocks this sync wrote), per sync
        async with fs.open("/f", "r+") as f:
            before: set[int] = set()
            while len(written) < 24:
                for _ in range(32):
                    await f.pwrite(rng.randbytes(4096), rng.randrange(4096) * 4096)
                gen = fs.vol.generation
                await f.fsync()
                if fs.vol.generation != gen:  # the log's cap: a full commit, a fresh log after it
                    before = set()
                    continue
                blocks = set(_durable_log(fs)[0])
                written.append((len(before), len(blocks - before)))
                before = blocks
    small = [n for had, n in written if had >= 4]  # syncs of a log past a few leaves
    assert small and all(n == 1 for n in small), written


def stale_in_base_workload(scale: int):
    """Scattered one-page overwrites fsynced until the log's delta has filled and a new one names it,
    then a write starting a page before a logged page and covering it whole: the item the base
    holds there is stale, and the delta must say so (replay applies the delta over the base).
    Then more syncs, until that delta too is left behind a new one."""
    from blockemu.engine.treelog import DROPPED

    async def run(fs, rec: Recorder) -> None:
        u = 4096
        rng = random.Random(13)
        await committed_files(fs, rec, {"foo": rng.randbytes(128 * u)})
        async with fs.open("/A/foo", "r+") as f:
            logged: list[int] = []
            stale_in = None  # the base when the delta first said one of its items is stale
            for _ in range(40):
                log = fs.vol.log
                if stale_in is not None and log.base.root != stale_in:
                    break  # left behind a new delta since: an older tree says the item is stale
                if log.base is not None and stale_in is None:
                    page = next(p for p in logged if p > 0 and p - 1 not in logged and p + 1 not in logged)
                    await f.pwrite(rng.randbytes(2 * u), (page - 1) * u)
                else:
                    for page in rng.sample(range(0, 128, 3), 16):
                        await f.pwrite(rng.randbytes(u), page * u)
                        logged.append(page)
                gen = fs.vol.generation
                await f.fsync()
                assert fs.vol.generation == gen and fs.vol.log_root, "the fsync went through the log"
                if stale_in is None and any(b == DROPPED for _, b in log.tree.items()):
                    stale_in = log.base.root
                await rec.persisted()
            assert stale_in is not None and fs.vol.log.base.root != stale_in, "a stale item marked, then left behind"
    return run


@pytest.mark.parametrize("write_path", [PRODUCTION_4K, FAST], ids=lambda p: p.name)
async def test_every_crash_state_around_new_deltas_and_a_stale_item_in_an_older_tree(tmp_path, write_path):
    """Each crash state around the log writes, flushes and FUAs of syncs that start a new delta
    and that mark an item of an older tree stale mounts as what fsync acknowledged:
    a stale item replayed would bring back data from before the write that covered it."""
    _, result = await crash_states(tmp_path, stale_in_base_workload(write_path.scale), write_path, 1, "fold")
    assert result.states >= 20 and not result.failures, result.failures[:3]


async def _crashed_after_scattered_fsyncs(tmp_path, seed: int, done) -> tuple[str, bytearray]:
    """A 4K-node image (small leaves: the delta fills soon) whose 512 KiB file is committed, then
    six scattered one-page writes at a time fsynced, each through the log, until
    ``done(fs.vol.log)``; then a power cut. The crash image, and the bytes fsync acknowledged."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)
    rng = random.Random(seed)
    async with blockemu.mount(img, interval=3600) as fs:
        want = bytearray(rng.randbytes(128 * 4096))
        log = await committed_then_log(fs, tmp_path, want)
        async with fs.open("/f", "r+") as f:
            while not done(fs.vol.log):
                for page in rng.sample(range(0, 128, 2), 6):
                    data = rng.randbytes(4096)
                    await f.pwrite(data, page * 4096)
                    want[page * 4096:(page + 1) * 4096] = data
                gen = fs.vol.generation
                await f.fsync()
                assert fs.vol.generation == gen and fs.vol.log_root, "the fsync went through the log"
        _crash_now(log, crash)
    return crash, want


async def test_a_log_chain_replays_and_inspect_shows_every_tree(tmp_path):
    """A log of three trees or more (a delta, the one it names, and that one's), crashed: fsck
    reads them all (clean), inspect's dump of the log shows every block of each, and the mount
    replays them to what fsync acknowledged."""
    from blockemu.check.inspect import dump_tree
    crash, want = await _crashed_after_scattered_fsyncs(
        tmp_path, 8, lambda log: log.blocks() >= 3 and len(list(log.tree.items())) >= 4)
    _, blocks, items = _log_items(crash)
    dumped = dump_tree(crash, ["log"])
    assert sorted(b["bytenr"] for b in dumped) == sorted(blocks) and len(blocks) > 2
    assert sum(it["type"] == "ROOT_ITEM" for b in dumped if b["level"] == 0 for it in b["items"]) >= 2
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    assert f"{len(items)} items" in next(n for n in report.notes if n.startswith("log tree:"))
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want


def _edit_log_leaf(path: str, edit) -> None:
    """Re-encode the leaf ``log_root`` names after ``edit(leaf, sb)`` changed it (a hostile log,
    its log slot re-signed: ``_resign_slots``)."""
    from blockemu.ondisk.block import decode_block, encode_block
    sb = _log_super(path)
    with open(path, "r+b") as f:
        f.seek(sb.log_root)
        leaf = decode_block(f.read(sb.nodesize), bytenr=sb.log_root, nodesize=sb.nodesize, csum_type=sb.csum_type,
                            fsid=sb.fsid)
        edit(leaf, sb)
        f.seek(sb.log_root)
        f.write(encode_block(leaf, nodesize=sb.nodesize, csum_type=sb.csum_type, fsid=sb.fsid))
    _resign_slots(path)


async def test_a_log_base_that_shares_the_deltas_block_is_damaged_for_fsck_and_mount(tmp_path):
    """A hostile LINK_KEY naming the delta's own leaf: every block reads, so fsck said the log
    was fine, while replay failed on reserving that block a second time (or, following the
    chain, would never end). Both must say it."""
    from blockemu.engine.treelog import LINK_KEY
    from blockemu.errors import CorruptionError
    from blockemu.ondisk.items import RootItem
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)  # small leaves: the delta fills soon
    rng = random.Random(8)
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, rng.randbytes(128 * 4096))
        async with fs.open("/f", "r+") as f:
            while fs.vol.log.base is None:
                for page in rng.sample(range(0, 128, 2), 6):
                    await f.pwrite(rng.randbytes(4096), page * 4096)
                await f.fsync()
        _crash_now(log, crash)

    def at_itself(leaf, sb) -> None:
        i = leaf.keys.index(LINK_KEY)
        leaf.values[i] = RootItem.unpack(leaf.values[i])._replace(bytenr=sb.log_root, level=0).pack()
    _edit_log_leaf(crash, at_itself)
    report = check(crash)
    assert not report.clean and any("zero-log" in n for n in report.notes), [e.message for e in report.errors]
    with pytest.raises(CorruptionError, match="reached twice.*rescue zero-log"):
        async with blockemu.mount(crash):
            pass


async def test_an_empty_log_link_is_damage_for_fsck_and_mount_not_the_chain_end(tmp_path):
    """A delta whose LINK_KEY item has an empty body under a valid checksum (an edit, not a bit
    flip: review24) read as the end of the chain -- an empty body is falsy -- so mount replayed
    the delta alone, silently dropping what the older trees held, and fsck called the log clean.
    Both must say the log is damaged, with the rescue hint, in one line (exit 1)."""
    from blockemu.engine.treelog import LINK_KEY
    from blockemu.errors import CorruptionError
    crash, _ = await _crashed_after_scattered_fsyncs(tmp_path, 9, lambda log: log.base is not None)

    def emptied(leaf, sb) -> None:
        leaf.values[leaf.keys.index(LINK_KEY)] = b""
    _edit_log_leaf(crash, emptied)
    report = check(crash)
    assert not report.clean and any("zero-log" in n for n in report.notes), [e.message for e in report.errors]
    # the chain's error names the log once: fsck used to prefix it again ("log tree: log tree: ...")
    assert [e.message.count("log tree") for e in report.errors] == [1], [e.message for e in report.errors]
    for readonly in (False, True):
        with pytest.raises(CorruptionError, match=r"^fsync log: .*link to an older tree.*`blockemu rescue zero-log .*` drops"):
            async with blockemu.mount(crash, readonly=readonly):
                pass
    p = subprocess.run([sys.executable, "-m", "blockemu", "ls", crash, "/"], capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr.count("\n")) == (1, "", 1) and "rescue zero-log" in p.stderr, p.stderr


@pytest.mark.parametrize("damage", ["link past the end", "delta unreadable"])
async def test_every_log_read_failure_at_mount_gives_the_rescue_hint(tmp_path, damage):
    """A log whose link names a block past the device's end, or whose delta does not read
    (EIO): mount refused with one line, as for a damaged log, but without the hint fsck gives
    (``blockemu rescue zero-log``). Every failure to read the log at mount now gives it."""
    from blockemu.device.faultplan import FaultPlan
    from blockemu.engine.treelog import LINK_KEY
    from blockemu.errors import DeviceIOError
    from blockemu.ondisk.items import RootItem
    crash, _ = await _crashed_after_scattered_fsyncs(tmp_path, 9, lambda log: log.base is not None)
    sb = _log_super(crash)
    faults = None
    if damage == "link past the end":
        def past_the_end(leaf, sb) -> None:
            i = leaf.keys.index(LINK_KEY)
            leaf.values[i] = RootItem.unpack(leaf.values[i])._replace(bytenr=sb.total_bytes + sb.nodesize).pack()
        _edit_log_leaf(crash, past_the_end)
        assert any("zero-log" in n for n in check(crash).notes)  # as fsck says
    else:
        faults = FaultPlan(eio=[(sb.log_root, sb.log_root + sb.nodesize, "r")])
    for readonly in (False, True):
        with pytest.raises(DeviceIOError, match=r"^fsync log: .*`blockemu rescue zero-log .*` drops the log"):
            async with blockemu.mount(crash, readonly=readonly, faults=faults):
                pass
    if faults is None:
        p = subprocess.run([sys.executable, "-m", "blockemu", "ls", crash, "/"], capture_output=True, text=True)
        assert (p.returncode, p.stdout, p.stderr.count("\n")) == (1, "", 1) and "rescue zero-log" in p.stderr, p.stderr


def test_fsck_repair_says_the_log_replay_stopped_it(tmp_path, capsys):
    """``fsck --repair`` opens the image read-write, which replays the fsync log first; a replay
    that fails stopped the repair silently ("repaired: 0", exit 4, no note of its own). The note
    says the repair stopped, why, and how to drop the log; the exit stays 4 (errors left)."""
    import asyncio
    import json

    from blockemu.check.inspect import dump_tree
    from blockemu.cli.main import main
    crash, _ = asyncio.run(_crash_after_fsyncs(tmp_path, [(4096, 8192)]))  # main runs its own loop
    sb, blocks, _ = _log_items(crash)
    flip(crash, blocks[0] + sb.nodesize // 2)  # the log's leaf fails its checksum: no replay
    flip(crash, dump_tree(crash, ["free-space"])[0]["bytenr"] + 2000)  # something to repair
    assert main(["fsck", "--repair", crash]) == 4
    out = capsys.readouterr().out
    stopped = [line for line in out.splitlines() if line.startswith("note: the repair stopped")]
    assert len(stopped) == 1 and f"`blockemu rescue zero-log {crash}` drops the log" in stopped[0], out
    assert main(["fsck", "--repair", crash, "--json"]) == 4
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert sum(n.startswith("the repair stopped") and "fsync log" in n for n in notes) == 1, notes


async def test_a_committed_tree_block_the_replay_meets_damaged_is_not_blamed_on_the_log(tmp_path):
    """A committed checksum or extent tree leaf that fails its checksum when the replay reads it
    refused the mount with "fsync log: tree block N: ..." -- the log blamed, and fsck (rightly)
    gave no zero-log note. The log is sound; the line names the committed tree and fsck, and
    still how to mount without the log."""
    import shutil

    from blockemu.check.inspect import dump_tree
    from blockemu.errors import CorruptionError
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)
    async with blockemu.mount(img, interval=3600) as fs:
        for i in range(200):  # enough checksums and extents for several leaves
            async with fs.open(f"/n{i:04d}", "w") as f:
                await f.write(os.urandom(8192))
        async with fs.open("/f", "w") as f:
            await f.write(os.urandom(64 << 10))
        await fs.sync()
        log = fs.vol.device.start_log(base_copy=str(tmp_path / "base.img"))
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"L" * 4096, 0)
            await f.fsync()
        log.crash_image(crash, len(log.entries))
    met = []
    for b in dump_tree(crash, ["extent", "csum"]):
        work = str(tmp_path / "w.img")
        shutil.copy(crash, work)
        flip(work, b["bytenr"] + 2000)
        try:
            async with blockemu.mount(work, readonly=True):
                continue  # a leaf the replay does not read
        except CorruptionError as e:
            met.append(str(e))
            assert not any("zero-log" in n for n in check(work).notes)  # fsck: the log is fine
    assert all(not line.startswith("fsync log") for line in met), met  # (some fail before the replay)
    replayed = [line for line in met if "(a committed tree, read replaying the fsync log;" in line]
    assert replayed, met  # a leaf the replay reads
    assert all("blockemu rescue zero-log" in line for line in replayed), replayed


async def test_an_item_gone_stale_in_the_sync_that_starts_a_new_delta_stays_dropped(tmp_path):
    """A page logged in the delta, then, in one sync, covered by a write starting a page before
    it (its item is gone: stale) along with enough other writes that the delta has no room and
    is left behind a new one: the new delta must mark the item stale, for the old delta -- now
    an older tree -- still holds it, and replayed it would bring back the page's old data."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)  # small leaves: the delta fills soon
    rng = random.Random(11)
    u = 4096
    async with blockemu.mount(img, interval=3600) as fs:
        want = bytearray(rng.randbytes(256 * u))
        log = await committed_then_log(fs, tmp_path, want)

        async def write(page: int, n: int = 1) -> None:
            data = rng.randbytes(n * u)
            await f.pwrite(data, page * u)
            want[page * u:(page + n) * u] = data
        async with fs.open("/f", "r+") as f:
            await write(101)
            await f.fsync()
            assert fs.vol.log_root and fs.vol.log.base is None, "logged, in the delta alone"
            await write(100, 2)  # the item at page 101 is gone
            for page in range(0, 256, 4):
                if page not in (100, 104):
                    await write(page)
            gen = fs.vol.generation
            await f.fsync()
            assert fs.vol.generation == gen and fs.vol.log.base is not None, "a new delta, in the same sync"
        _crash_now(log, crash)
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want


async def test_a_two_tree_log_of_an_older_build_still_replays(tmp_path):
    """The two-tree writer named its base at BASE_KEY (offset 0); such a log, left by a crash
    before an upgrade, must still read: the same log with its link moved to BASE_KEY replays
    to what fsync acknowledged, and fsck calls it clean."""
    from blockemu.engine.treelog import BASE_KEY, LINK_KEY
    crash, want = await _crashed_after_scattered_fsyncs(tmp_path, 9, lambda log: log.base is not None)
    assert len(_log_items(crash)[1]) == 2, "a delta and the one tree it names"

    def as_base(leaf, sb) -> None:
        leaf.keys[leaf.keys.index(LINK_KEY)] = BASE_KEY  # last in key order either way
    _edit_log_leaf(crash, as_base)
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want


async def test_a_log_missing_an_extents_checksums_fails_the_mount_as_fsck_says(tmp_path):
    """fsck calls a log whose new extent has no checksum items damaged (MISSING_CSUM, "rescue
    zero-log"); replay took it anyway and committed the extent without checksums -- the
    committed trees then failed fsck and every read of those sectors."""
    from blockemu.errors import CorruptionError
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await _fresh(img)
    async with blockemu.mount(img, interval=3600) as fs:
        log = await committed_then_log(fs, tmp_path, os.urandom(64 << 10))
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"L" * 4096, 0)
            await f.fsync()
        _crash_now(log, crash)

    def without_checksums(leaf, sb) -> None:
        i = next(i for i, k in enumerate(leaf.keys) if k[1] == S.EXTENT_CSUM)
        del leaf.keys[i], leaf.values[i]
    _edit_log_leaf(crash, without_checksums)
    report = check(crash)
    assert any(e.code == "MISSING_CSUM" for e in report.errors) and any("zero-log" in n for n in report.notes)
    with pytest.raises(CorruptionError, match="lacks sector checksums.*rescue zero-log"):
        async with blockemu.mount(crash):
            pass
    assert check(crash).errors == report.errors  # nothing of it was committed


async def test_a_damaged_extent_tree_the_replay_needs_names_zero_log_as_other_committed_trees_do(tmp_path):
    """Read-only, an image with a log builds the allocator for the replay (its extent and
    free-space trees), which read-only without a log it never needs: with the extent tree's leaf
    damaged, ls, cat and a read-only mount said only "tree block N: checksum mismatch", though
    zero-log lets them read the last commit -- which a leaf the replay itself meets names."""
    from blockemu.check.inspect import dump_tree
    from blockemu.check.repair import zero_log
    from blockemu.errors import CorruptionError

    img = str(tmp_path / "a.img")
    await fsynced_then_cut(img)
    (leaf,) = dump_tree(img, ["extent"])
    flip(img, leaf["bytenr"] + 2000)
    with pytest.raises(CorruptionError) as e:
        await blockemu.mount(img, readonly=True)
    assert str(e.value).startswith(f"tree block {leaf['bytenr']}: checksum mismatch (found ")
    assert str(e.value).endswith(f"(a committed tree, read replaying the fsync log; `blockemu fsck {img}` shows the "
                                 f"damage); `blockemu rescue zero-log {img}` drops the log, losing what was fsynced "
                                 f"since the last commit")
    assert zero_log(img) is not None
    async with blockemu.mount(img, readonly=True) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == b"x" * 4096  # the last commit's


async def test_a_damaged_free_space_tree_does_not_keep_a_read_only_open_from_the_fsynced_data(tmp_path):
    """Read-only, an image with a log builds the allocator the replay needs from the extent and
    free-space trees: with the free-space tree's leaf damaged, ls, cat and a read-only mount
    failed telling the user to run zero-log, "losing what was fsynced since the last commit" --
    while ``fsck --repair`` rebuilt that tree from the extent tree, replayed the log and kept
    it. The read-only open builds its allocator from the extent tree then, and reads the
    fsynced bytes; the image is not written (fsck still finds the damage)."""
    from blockemu.check.inspect import dump_tree

    img = str(tmp_path / "a.img")
    await fsynced_then_cut(img)
    (leaf,) = dump_tree(img, ["free-space"])
    flip(img, leaf["bytenr"] + 300)
    before = open(img, "rb").read()
    async with blockemu.mount(img, readonly=True) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == b"x" * 4096 + b"y" * 4096
    assert open(img, "rb").read() == before
    assert [e.code for e in check(img).errors][:1] == ["CSUM_MISMATCH"]
