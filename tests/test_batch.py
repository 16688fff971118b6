"""Writeback's extent batches (fs/writeback.py, engine/batch.py): the small runs of one flush
are sealed together, written with one writev and mapped with one pass over each tree -- and
the file reads back the same after a remount, fsck clean; a batch that fails falls back to
the per-run path, which loses nothing it can write."""
from __future__ import annotations

import asyncio
import copy
import errno
import os
import random

import pytest

import blockemu
from blockemu.device.faultplan import FaultPlan
from blockemu.engine.alloc import HOLE_MAX
from blockemu.engine.btree import BTree
from blockemu.engine.transaction import Engine
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import ExtentItem
from blockemu.workload.crash import ace_workload, record
from blockemu.workload.writepath import PRODUCTION
from tests.util import assert_fsck_clean, encrypted_dir

MIB = 1 << 20
PAGE = 4096


@pytest.fixture
async def image(tmp_path):
    path = str(tmp_path / "fs.img")
    await blockemu.mkfs(path, size="64M")
    return path


async def scattered_writes(image: str, *, fail: int | None = None, spy=None) -> tuple[bytearray, int]:
    """A 4 MiB encrypted file, then 32 single pages rewritten at scattered places and written
    back with one flush (with ``fail``, its writes to the place of the batch's extent number
    ``fail`` fail with EIO); returns the expected contents and the bytes writeback lost."""
    rng = random.Random(7)
    want = bytearray(os.urandom(4 * MIB))
    async with blockemu.mount(image, interval=3600) as fs:
        await encrypted_dir(fs, "/e")
        async with fs.open("/e/f", "w+") as f:
            await f.pwrite(want, 0)
            await f.fsync()
            async with fs.vol.commit_lock:  # its commit's tail is done: the pins are holes again
                pass
            for idx in rng.sample(range(0, 4 * MIB // PAGE, 2), 32):  # no two adjacent: 32 runs
                page = os.urandom(PAGE)
                want[idx * PAGE : (idx + 1) * PAGE] = page
                await f.pwrite(page, idx * PAGE)
            if fail is not None:
                # where the batch's 32 one-page extents go
                places = copy.deepcopy(fs.vol.engine.allocator).alloc_many([PAGE] * 32)
                fs.vol.device.faults = FaultPlan(eio=[(places[fail], places[fail] + PAGE, "w")])
            if spy is not None:
                spy(fs)
            await fs.writeback.flush_inode(f.inode)
            fs.vol.device.faults = FaultPlan()
            lost = f.inode.lost_bytes
            await f.fsync()
    return want, lost


async def read_back(image: str) -> bytes:
    async with blockemu.mount(image, interval=3600) as fs:
        await fs.add_key(bytes(range(1, 65)))
        async with fs.open("/e/f") as f:
            return await f.pread(8 * MIB, 0)


def writev_spy(monkeypatch, writevs: list[tuple[int, int]]):
    """Counts the writes and pages each device writev carries (and calls the real one)."""

    def spy(fs):
        real_writev = fs.vol.device.writev

        async def counting_writev(writes, **kw):
            writevs.append((len(writes), sum(len(data) for _, data in writes) // PAGE))
            return await real_writev(writes, **kw)

        monkeypatch.setattr(fs.vol.device, "writev", counting_writev)

    return spy


async def test_small_runs_of_a_flush_are_one_batch(image, monkeypatch):
    """32 scattered pages: one device writev of 32 extents, placed one after another and so
    one write (but for those placed in holes), and one ``apply`` of the fs tree (the extent and
    csum trees' changes are held for the commit, which applies them in one pass each), instead
    of a writev and a dozen root-to-leaf descents per run; the file is the same after a remount
    and fsck finds nothing."""
    writevs: list[tuple[int, int]] = []
    applies: dict[int, int] = {}
    real_apply, real_prepare = BTree.apply, Engine.prepare_commit
    committing = False

    def counting_apply(tree, changes):
        if not committing:  # a commit converges the trees with a pass per round: not counted
            applies[tree.owner] = applies.get(tree.owner, 0) + 1
        return real_apply(tree, changes)

    def prepare_commit(engine):
        nonlocal committing
        committing = True
        try:
            return real_prepare(engine)
        finally:
            committing = False

    count_writevs = writev_spy(monkeypatch, writevs)

    def spy(fs):  # from the flush on
        count_writevs(fs)
        monkeypatch.setattr(BTree, "apply", counting_apply)
        monkeypatch.setattr(Engine, "prepare_commit", prepare_commit)

    holes: list[int] = []
    want, lost = await scattered_writes(image, spy=lambda fs: (holes.append(len(fs.vol.engine.allocator.holes)), spy(fs)))
    # then the commit's writes (tree blocks, superblock mirrors); the runs that fill holes
    # earlier commits gave back are apart, the others one after another
    assert writevs[0][1] == 32 and writevs[0][0] <= 1 + holes[0]
    assert applies == {5: 1, S.TREE_LOG_OBJECTID: 1}  # and the fsync's one pass over its log
    assert lost == 0
    assert await read_back(image) == want
    assert_fsck_clean(image)


@pytest.mark.parametrize("fail", [4, 0], ids=["next fit", "hole"])
async def test_a_failed_batch_falls_back_to_the_runs(image, monkeypatch, fail):
    """The batch's writev fails (EIO where its 5th extent lands, or its 1st, in a hole an earlier
    commit gave back): no tree changed, so each run is written again on its own, at new places
    -- the failed places stay pinned until a commit, or the hole's run would go straight back
    to its bad sector -- none is lost, the file reads back whole."""
    writevs: list[tuple[int, int]] = []
    in_hole: list[bool] = []

    def spy(fs):
        alloc = fs.vol.engine.allocator
        in_hole.append(alloc.free.get(copy.deepcopy(alloc).alloc_many([PAGE] * 32)[fail], HOLE_MAX) < HOLE_MAX)
        writev_spy(monkeypatch, writevs)(fs)

    want, lost = await scattered_writes(image, fail=fail, spy=spy)
    assert in_hole == [fail == 0]
    assert writevs[0][1] == 32 and writevs[1:33] == [(1, 1)] * 32  # the batch, then each run on its own
    assert lost == 0
    assert await read_back(image) == want
    assert_fsck_clean(image)


async def layout_after_flush(path: str, *, reverse: bool) -> list[tuple[int, int]]:
    """A 3 MiB file's extents, (file offset, bytenr), after one flush of its three 1 MiB runs;
    with ``reverse``, each run's sealing finishes only after the next one's has."""
    await blockemu.mkfs(path, size="64M")
    async with blockemu.mount(path, interval=3600) as fs:
        async with fs.open("/f", "w+") as f:
            await f.pwrite(os.urandom(3 * MIB), 0)
            sealer = fs.writeback.sealer
            seal = sealer._seal_in_thread
            finished = [asyncio.Event() for _ in range(3)]
            calls = 0

            async def seal_in_reverse(*args):
                nonlocal calls
                i, calls = calls, calls + 1
                if reverse and i < 2:
                    await finished[i + 1].wait()
                try:
                    return await seal(*args)
                finally:
                    finished[i].set()

            sealer._seal_in_thread = seal_in_reverse
            await fs.writeback.flush_inode(f.inode)
            assert calls == 3, "the file did not go out as three runs"
            return [(m.file_offset, m.extent.disk_bytenr) for m in fs.extents.mappings(f.inode.ino)]


async def test_extents_are_placed_in_the_order_they_were_taken(tmp_path):
    """Runs of one flush seal in parallel, but the layout does not depend on which finishes
    first: crash campaigns count a workload's writes and must count the same on every run."""
    in_order = await layout_after_flush(str(tmp_path / "a.img"), reverse=False)
    reversed_ = await layout_after_flush(str(tmp_path / "b.img"), reverse=True)
    assert len(in_order) == 3 and reversed_ == in_order


async def test_a_batch_that_collapses_the_root_gives_the_tree_a_root_of_its_own(tmp_path):
    """Found by the full ``crash --max-ops 3`` campaign (workload 325: write /A/foo, creat /B/foo,
    unlink /A/foo): the unlink's batch emptied all but one child of the checksum tree's root,
    and the surviving child -- still the committed block -- became the root uncopied, so the
    commit recorded a root of this generation it never wrote. The image was corrupt after a
    clean unmount (parent transid verify failed)."""
    img = str(tmp_path / "w.img")
    seq = (("write", "/A/foo"), ("creat", "/B/foo"), ("unlink", "/A/foo"))  # (its index moved with the link operation)
    await record(ace_workload(seq, 325), img, str(tmp_path / "base.img"), write_path=PRODUCTION)
    assert_fsck_clean(img)


async def test_a_commit_rewrites_the_free_space_record_in_one_pass(image, monkeypatch):
    """Scattered overwrites fragment free space: the commit that releases their old extents
    moves dozens of free-space items, applied in one pass over the tree rather than one
    descent each -- and the record equals the allocator's extents, fsck clean."""
    per_item: list[str] = []
    for name in ("insert", "delete"):
        real = getattr(BTree, name)

        def counted(self, key, *args, _real=real, _name=name, **kw):
            if self.owner == S.FREE_SPACE_TREE_OBJECTID:
                per_item.append(_name)
            return _real(self, key, *args, **kw)

        monkeypatch.setattr(BTree, name, counted)
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/f", "w+") as f:
            for idx in range(64):  # 64 extents of a page, side by side on disk
                await f.pwrite(os.urandom(PAGE), idx * PAGE)
                await fs.writeback.flush_inode(f.inode)
            await fs.sync()
            for idx in range(0, 64, 2):
                await f.pwrite(os.urandom(PAGE), idx * PAGE)
            before = set(fs.vol.engine.free_items.items())
            await fs.sync()  # every other old extent is freed: the record gains each as a hole
            engine = fs.vol.engine
            assert len(before ^ set(engine.free_items.items())) > 20
            fst = engine.trees[S.FREE_SPACE_TREE_OBJECTID]
            assert [(k[0], k[2]) for k, _ in fst.items()] == list(engine.free_items.items())
    assert per_item == []
    assert_fsck_clean(image)


async def test_a_small_batch_derives_its_extent_keys_where_it_seals_on_the_loop(image, monkeypatch):
    """Each run of an encrypted batch has its own key (HKDF-SHA512 from the master secret and
    its nonce, ~13 us), derived with the encryption where the batch seals: for an fsync's 32
    one-page runs (128 KiB, under ``LOOP_SEAL``) that is the loop, not a sealing thread -- the
    thread kept the GIL throughout (the calls are a PyDLL's), so it held the loop up as long,
    and its round trip came on top (~0.1 ms an fsync idle)."""
    import threading

    from blockemu.crypto import fscrypt

    derived_on: list[str] = []
    real = fscrypt.extent_key

    def spy_key(master, nonce):
        derived_on.append(threading.current_thread().name)
        return real(master, nonce)

    want, lost = await scattered_writes(image, spy=lambda fs: monkeypatch.setattr(fscrypt, "extent_key", spy_key))
    assert derived_on == [threading.main_thread().name] * 32
    assert lost == 0
    monkeypatch.setattr(fscrypt, "extent_key", real)
    assert await read_back(image) == want


async def test_a_lone_small_run_derives_its_extent_key_off_the_loop(image, monkeypatch):
    """A flush with one small run (the stress mix's usual one: a write, then an fsync) is no
    batch, yet its key too is derived in the sealing thread: on the loop each derivation was
    ~5 % of the mix's time. The file reads back right after a remount."""
    import threading

    from blockemu.crypto import fscrypt

    derived_on: list[str] = []
    real = fscrypt.extent_key

    def spy_key(master, nonce):
        derived_on.append(threading.current_thread().name)
        return real(master, nonce)

    want = os.urandom(3 * PAGE)
    async with blockemu.mount(image, interval=3600) as fs:
        await encrypted_dir(fs, "/e")
        async with fs.open("/e/f", "w+") as f:
            await f.pwrite(want, 0)
            monkeypatch.setattr(fscrypt, "extent_key", spy_key)
            await f.fsync()
            monkeypatch.setattr(fscrypt, "extent_key", real)
            assert f.inode.lost_bytes == 0
    assert len(derived_on) == 1 and threading.main_thread().name not in derived_on
    assert (await read_back(image))[: len(want)] == want


async def test_a_commit_records_its_tree_blocks_in_one_pass_per_round(image, monkeypatch):
    """The METADATA_ITEMs of the tree blocks a transaction allocated and freed are staged and
    applied in one pass over the extent tree per converging round of the commit, not an insert
    or delete (a descent with COW) each: a commit after the stress mix's few dozen operations
    records dozens. The image is consistent after it (fsck checks every block's item)."""
    async with blockemu.mount(image, interval=3600) as fs:
        for i in range(40):
            await fs.mkdir(f"/d{i}")
            async with fs.open(f"/d{i}/f", "w") as f:
                await f.write(os.urandom(5000))
        ext = fs.vol.engine.trees[S.EXTENT_TREE_OBJECTID]

        def one_by_one(*args, **kw):
            raise AssertionError("the commit changed the extent tree one item at a time")

        monkeypatch.setattr(ext, "insert", one_by_one)
        monkeypatch.setattr(ext, "delete", one_by_one)
        await fs.sync()
        monkeypatch.undo()
    assert_fsck_clean(image)


async def small_files(fs, root: str, n: int, rng: random.Random) -> dict[str, bytes]:
    """``n`` files of one to three pages (and a bit) under ``root``, written and left dirty."""
    files = {}
    for i in range(n):
        data = rng.randbytes(rng.randrange(1, 3) * PAGE + rng.randrange(1, PAGE))
        async with fs.open(f"{root}/f{i}", "w") as f:
            await f.write(data)
        files[f"{root}/f{i}"] = data
    return files


async def files_read_back(image: str, files: dict[str, bytes]) -> None:
    """After a remount (the test key added) each file holds what was written; fsck clean."""
    async with blockemu.mount(image, interval=3600) as fs:
        await fs.add_key(bytes(range(1, 65)))
        for path, data in files.items():
            async with fs.open(path) as f:
                assert await f.read() == data
    assert_fsck_clean(image)


async def test_a_sync_writes_the_small_runs_of_many_files_as_one_batch(image, monkeypatch):
    """A sync after writes to eight small files (the stress mix's usual sync): their runs share
    one batch -- one device writev (eight extents placed one after another: one write) and one pass over the fs tree, the
    extent and csum trees' changes held for the commit -- where each file was a writev, an
    allocation and a pass over the trees of its own. Every file reads back after a remount, fsck clean."""
    rng = random.Random(3)
    writevs: list[int] = []
    applies: dict[int, int] = {}
    real_apply = BTree.apply

    def counting_apply(tree, changes):
        applies[tree.owner] = applies.get(tree.owner, 0) + 1
        return real_apply(tree, changes)

    async with blockemu.mount(image, interval=3600) as fs:
        await encrypted_dir(fs, "/e")
        files = await small_files(fs, "/e", 8, rng)
        writev_spy(monkeypatch, writevs)(fs)
        monkeypatch.setattr(BTree, "apply", counting_apply)
        await fs.writeback.flush_all()
        held = len(fs.vol.engine.pending)
        monkeypatch.setattr(BTree, "apply", real_apply)
        await fs.sync()
    pages = sum(-(-len(data) // PAGE) for data in files.values())
    assert writevs[0] == (1, pages)  # the eight extents, placed one after another: one write
    assert applies == {5: 1}
    assert held >= 8 * 2  # each extent's EXTENT_ITEM and checksums
    await files_read_back(image, files)


async def test_a_key_wiped_under_a_shared_batch_loses_only_its_own_files(image, monkeypatch):
    """Files of two keys in one batch; key B is removed in hard mode while the batch seals. The
    batch is refused (B's runs may have sealed with a wiped secret) and each run is written on
    its own: A's files all land, B's are lost -- and reported, by the next close -- never mapped
    with a wrong key. After a remount A's files read back, fsck clean."""
    from tests.util import ErrnoCheck

    rng = random.Random(4)
    async with blockemu.mount(image, interval=3600, key_removal="hard") as fs:
        await encrypted_dir(fs, "/a")
        kid_b = await encrypted_dir(fs, "/b", bytes(range(101, 165)))
        kept = await small_files(fs, "/a", 3, rng)
        opened = []
        for i in range(3):
            f = await fs.open(f"/b/f{i}", "w")
            await f.write(rng.randbytes(PAGE + 100))
            opened.append(f)
        sealer, sealing, go = fs.writeback.sealer, asyncio.Event(), asyncio.Event()
        real_seal = sealer.seal_many

        async def held_seal(runs, csum_type):
            out = await real_seal(runs, csum_type)
            sealing.set()
            await go.wait()  # the key goes now: after sealing, before the batch is placed
            return out

        monkeypatch.setattr(sealer, "seal_many", held_seal)
        flush = asyncio.ensure_future(fs.writeback.flush_all())
        await asyncio.wait_for(sealing.wait(), 10)  # (before shared batches: no batch, so never)
        monkeypatch.setattr(sealer, "seal_many", real_seal)
        removal = asyncio.ensure_future(fs.remove_key(kid_b))
        await asyncio.sleep(0)  # hard mode wipes at once; its write back then waits for this flush
        assert fs.keyring.key_status(kid_b).state.name != "PRESENT"
        go.set()
        await flush
        await removal
        for f in opened:
            assert f.inode.lost_bytes > 0
            with ErrnoCheck(errno.ENOKEY):
                await f.close()
    await files_read_back(image, kept)


async def test_a_sync_writes_the_other_files_while_one_is_held_by_another_flush(image, monkeypatch):
    """A sync finds one file's flush in progress (an fsync's, its sealing held here): the other
    files go out meanwhile, as one batch, and the sync ends once the held flush has -- it waits
    for no lock before writing what it can, and holds none while it waits."""
    async with blockemu.mount(image, interval=3600) as fs:
        await fs.mkdir("/d")
        a = await fs.open("/d/a", "w")  # the lowest inode number of the files
        await a.write(os.urandom(PAGE + 1))
        others = await small_files(fs, "/d", 3, random.Random(5))
        sealer, wb = fs.writeback.sealer, fs.writeback
        held, go, mapped = asyncio.Event(), asyncio.Event(), asyncio.Event()
        real_seal, real_mapped = sealer._seal_in_thread, wb._mapped

        async def held_seal(*args):
            held.set()
            await go.wait()
            return await real_seal(*args)

        def noting_mapped(new):
            real_mapped(new)
            if {inode.ino for inode, _ in new} != {a.inode.ino}:
                mapped.set()

        monkeypatch.setattr(sealer, "_seal_in_thread", held_seal)
        monkeypatch.setattr(wb, "_mapped", noting_mapped)
        first = asyncio.ensure_future(wb.flush_inode(a.inode))
        await held.wait()
        monkeypatch.setattr(sealer, "_seal_in_thread", real_seal)
        sync = asyncio.ensure_future(wb.flush_all())
        await asyncio.wait_for(mapped.wait(), 10)  # the others, while /d/a's flush is held
        assert not sync.done()
        go.set()
        await first
        await sync
        assert not a.inode.pages.dirty and a.inode.lost_bytes == 0
        await a.close()
    await files_read_back(image, others)


async def test_a_sync_writes_the_files_another_flush_held_together_once_it_is_done(image, monkeypatch):
    """A sync finds every dirty file held by another flush (a sync's pipeline, held here) and
    written again meanwhile: once that flush is done it writes them in one pipeline -- one seal
    batch, one device writev, one pass over the fs tree -- not a pipeline per file (with four
    stress tasks a sync often found 10 to 30 files held). Every file reads back its last data
    after a remount, fsck clean."""
    async with blockemu.mount(image, interval=3600) as fs:
        await fs.mkdir("/d")
        files = await small_files(fs, "/d", 4, random.Random(7))
        wb, held, go = fs.writeback, asyncio.Event(), asyncio.Event()
        real_group, real_locked = wb._write_group, wb._flush_locked
        pipelines: list[list[int]] = []

        async def held_group(pieces, turn):
            held.set()
            await go.wait()
            await real_group(pieces, turn)

        async def noting_locked(inodes):
            pipelines.append(sorted(inode.ino for inode in inodes))
            await real_locked(inodes)

        monkeypatch.setattr(wb, "_write_group", held_group)
        monkeypatch.setattr(wb, "_flush_locked", noting_locked)
        first = asyncio.ensure_future(wb.flush_all())
        await asyncio.wait_for(held.wait(), 10)
        monkeypatch.setattr(wb, "_write_group", real_group)
        for path, old in files.items():  # written again while the first flush holds every file
            data = os.urandom(PAGE + 7)
            async with fs.open(path, "r+") as f:
                await f.pwrite(data, 0)
            files[path] = data + old[len(data):]
        second = asyncio.ensure_future(wb.flush_all())
        await asyncio.sleep(0)  # it finds the four held
        go.set()
        await first
        await second
    inos = pipelines[0]
    assert len(inos) == 4 and pipelines == [inos, inos]
    await files_read_back(image, files)


async def test_a_file_unlinked_while_a_sync_writes_it_is_deleted_by_this_mount(image, monkeypatch):
    """A closed file unlinked while a sync's pipeline holds it (its runs taken, in flight) is
    left an orphan by the unlink -- writeback still reads its pages -- and no close comes to
    delete it later: the flush deletes it once its runs are done, as close does, so the sync's
    commit frees its extents (they stayed allocated until the next mount's orphan recovery).
    The other file reads back after a remount, fsck clean."""
    async with blockemu.mount(image, interval=3600) as fs:
        await fs.mkdir("/d")
        files = await small_files(fs, "/d", 2, random.Random(6))
        victim = fs.inodes[max(fs.inodes)]  # /d/f1
        wb, held, go = fs.writeback, asyncio.Event(), asyncio.Event()
        real_group = wb._write_group

        async def held_group(pieces, turn):
            held.set()
            await go.wait()
            await real_group(pieces, turn)

        monkeypatch.setattr(wb, "_write_group", held_group)
        sync = asyncio.ensure_future(fs.sync())
        await asyncio.wait_for(held.wait(), 10)
        await fs.unlink("/d/f1")
        go.set()
        await sync
        assert victim.ino not in fs.inodes
        assert (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, victim.ino) not in fs.tree
        assert not list(fs.extents.mappings(victim.ino))
    del files["/d/f1"]
    await files_read_back(image, files)


async def test_an_overwrite_finds_the_items_it_changes_without_a_lookup(image, monkeypatch):
    """The EXTENT_ITEMs of the extents writeback made are known to the filesystem's extent view
    (``Extents.known``), and each file's EXTENT_DATA items are in its extent map
    (``Extents.maps``): overwriting pages of them, in two files, by scattered writes, a punch
    and a truncate, finds the items it replaces and changes their references with no lookup in
    the extent tree or the fs tree -- and what the view knows is what the trees hold, before and
    after a commit; a deleted file's map goes; the files read back the same after a remount,
    fsck clean."""
    from blockemu.engine.batch import TreeBatch
    from blockemu.ondisk.items import ExtentItem
    from tests.test_extent_map import maps_are_the_tree

    lookups: list[tuple[int, int, int]] = []
    first_at_or_after, floor_items = TreeBatch.first_at_or_after, TreeBatch.floor_items

    def counted(real, tree):
        def lookup(batch, key, *args):
            if batch.tree.owner == tree:
                lookups.append(key)
            return real(batch, key, *args)
        return lookup

    def known_is_the_tree(fs):
        ext = fs.extents.ext  # the tree with the changes held for the commit
        for bytenr, (key, item) in fs.extents.known.items():
            body = ext.get(key)  # a new extent's item is known as its body until an overwrite reads it
            assert body == item if type(item) is bytes else ExtentItem.unpack(body) == item
        maps_are_the_tree(fs)

    rng = random.Random(3)
    want = {"/a": bytearray(os.urandom(MIB)), "/b": bytearray(os.urandom(MIB))}
    async with blockemu.mount(image, interval=3600) as fs:
        files = {name: await fs.open(name, "w+") for name in want}
        for name, f in files.items():
            for off in range(0, MIB, 64 << 10):  # 16 extents of 64 KiB each
                await f.pwrite(want[name][off : off + (64 << 10)], off)
                await fs.writeback.flush_inode(f.inode)
        await fs.sync()
        monkeypatch.setattr(TreeBatch, "first_at_or_after", counted(first_at_or_after, S.EXTENT_TREE_OBJECTID))
        monkeypatch.setattr(TreeBatch, "floor_items", counted(floor_items, S.FS_TREE_OBJECTID))
        for rnd in range(3):
            for name, f in files.items():
                for idx in rng.sample(range(MIB // PAGE), 24):
                    page = os.urandom(PAGE)
                    want[name][idx * PAGE : (idx + 1) * PAGE] = page
                    await f.pwrite(page, idx * PAGE)
            await fs.sync() if rnd == 1 else await files["/a"].fsync()
            known_is_the_tree(fs)
        await files["/b"].punch_hole(8 * PAGE, 40 * PAGE)
        want["/b"][8 * PAGE : 48 * PAGE] = bytes(40 * PAGE)
        await files["/a"].truncate(MIB // 2 + 100)
        del want["/a"][MIB // 2 + 100 :]
        known_is_the_tree(fs)
        await fs.sync()
        known_is_the_tree(fs)
        assert lookups == []
        assert sorted(fs.extents.maps) == sorted(f.inode.ino for f in files.values())
        for f in files.values():
            await f.close()
        b = files["/b"].inode.ino
        await fs.unlink("/b")
        del want["/b"]
        assert b not in fs.extents.maps  # a deleted file keeps no map
        known_is_the_tree(fs)
    async with blockemu.mount(image, interval=3600) as fs:
        for name, data in want.items():
            async with fs.open(name) as f:
                assert await f.pread(2 * MIB, 0) == data
    assert_fsck_clean(image)


@pytest.mark.parametrize("workers, groups", [(2, [[1, 1, 1], [64], [1, 1]]), (0, [[1, 1, 1, 64, 1, 1]])])
async def test_a_run_a_sealing_worker_takes_goes_in_a_group_of_its_own(tmp_path, monkeypatch, workers, groups):
    """A flush's runs in file order, grouped: the small ones together, and a run as big as a
    sealing worker takes (256 KiB) on its own, closing the group before it and starting none
    after it -- so the small runs after it share the next group; without workers nothing is
    pooled, and one group takes them all (up to ``max_extent``)."""
    image = str(tmp_path / "groups.img")
    await blockemu.mkfs(image, size="64M")
    async with blockemu.mount(image, interval=3600, seal_workers=workers) as fs:
        seen: list[list[int]] = []
        real = fs.writeback._groups

        def spy(runs):
            for group in real(runs):
                seen.append([len(run.entries) for _, run in group])
                yield group

        monkeypatch.setattr(fs.writeback, "_groups", spy)
        await encrypted_dir(fs, "/e")
        async with fs.open("/e/f", "w+") as f:
            for idx in (0, 10, 20, 300, 310):
                await f.pwrite(os.urandom(PAGE), idx * PAGE)
            await f.pwrite(os.urandom(64 * PAGE), 100 * PAGE)
            await fs.writeback.flush_inode(f.inode)
    assert seen == groups


async def test_commit_refuses_a_freed_tree_block_whose_metadata_item_is_missing(image):
    """The commit's METADATA_ITEM sync checks a freed block's item present in the leaf its one
    apply visits (``Must``), not by a lookup first: on a damaged extent tree the commit aborts
    with EUCLEAN, as a missing back reference does (before, the lookup's ENOENT); the mount is
    then read-only, its unmount too, and the image stays the last commit's."""
    fs = await blockemu.mount(image)
    async with fs.open("/f", "w") as f:
        await f.write(b"x")
    await fs.sync()
    engine = fs.vol.engine
    fs_tree = engine.trees[S.FS_TREE_OBJECTID]
    engine.trees[S.EXTENT_TREE_OBJECTID].delete((fs_tree.root, S.METADATA_ITEM, fs_tree.level))  # the damage
    await fs.mkdir("/d")  # COWs the fs tree's root: the committed one is freed
    with pytest.raises(OSError) as raised:
        await fs.sync()
    assert raised.value.errno == errno.EUCLEAN, raised.value
    with pytest.raises(OSError) as raised:
        await fs.unmount()
    assert raised.value.errno == errno.EROFS, raised.value
    # the apply stopped halfway through the extent tree's leaves, in memory only: the image is
    # the last commit's, whole
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert sorted(await fs.readdir("/")) == ["f"]


async def test_commit_gives_a_block_freed_and_allocated_again_in_its_transaction_one_item(image):
    """The commit's METADATA_ITEM sync across the rounds a commit converges in: a block new in
    the transaction gets its item; freed again and allocated again at the same bytenr (the
    allocator fills the hole at once) at another level, then with the same level and another
    owner (the same key: a replace, not a clash with the item the round before added), its item
    follows; freed for good, the item goes. The commit after is fsck clean, after a remount."""
    fs = await blockemu.mount(image)
    engine = fs.vol.engine
    store, extents = engine.store, engine.trees[S.EXTENT_TREE_OBJECTID]

    def items(bytenr: int) -> list[tuple[int, tuple]]:
        return [(key[2], ExtentItem.unpack(body).refs)
                for key, body in extents.items((bytenr, S.METADATA_ITEM, 0), (bytenr, S.METADATA_ITEM, 255))]

    block = store.new_block(S.FS_TREE_OBJECTID, 0)
    bytenr = block.bytenr
    assert engine._sync_extent_refs()
    assert items(bytenr) == [(0, (("tree", S.FS_TREE_OBJECTID),))]
    for owner, level in ((S.CSUM_TREE_OBJECTID, 1), (S.FS_TREE_OBJECTID, 1)):
        store.free_block(block)
        block = store.new_block(owner, level)
        assert block.bytenr == bytenr  # the hole filled again
        assert engine._sync_extent_refs()
        assert items(bytenr) == [(level, (("tree", owner),))]
    store.free_block(block)
    assert engine._sync_extent_refs()
    assert items(bytenr) == []
    await fs.sync()
    await fs.unmount()
    assert_fsck_clean(image)


async def test_a_committed_block_freed_is_not_handed_out_again_before_its_commit(image):
    """What lets the commit's METADATA_ITEM sync stage a freed committed block's removal and the
    new blocks' items in one dict: a committed block freed stays pinned until its commit, so no
    new block of the same transaction takes its bytenr -- else the removal (``Must(None)``)
    would overwrite the new block's item at the same key, and the commit lose it."""
    fs = await blockemu.mount(image)
    await fs.mkdir("/a")
    await fs.sync()
    engine = fs.vol.engine
    store = engine.store
    await fs.mkdir("/b")  # COWs the fs tree's committed blocks: they are freed, pinned
    assert store.freed_blocks
    made = [store.new_block(S.FS_TREE_OBJECTID, 0) for _ in range(64)]
    assert not {b.bytenr for b in made} & store.freed_blocks.keys()
    for block in made:
        store.free_block(block)
    await fs.sync()
    await fs.unmount()
    assert_fsck_clean(image)
