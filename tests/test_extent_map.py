"""The per-file extent maps (``Extents.maps``, engine/extents.py): every map stays what the fs
tree holds -- through a batch that fails part way, log replay after a crash and the bound on
their size. tests/test_batch.py checks that an overwrite finds the items it replaces in them,
with no lookup in the fs tree, through scattered overwrites, punches, truncates and commits;
tests/test_fs_model.py checks them after every one of its random operations."""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

import blockemu
from blockemu.engine import extents as module
from blockemu.engine.btree import BTree
from blockemu.engine.extents import ExtentBatch
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import FileExtent
from tests.util import assert_fsck_clean

MIB = 1 << 20
PAGE = 4096
U64 = (1 << 64) - 1


def maps_are_the_tree(fs) -> None:
    """Each file's map holds exactly the EXTENT_DATA items the fs tree holds for it, and the
    count the bound is kept by is their number."""
    ext = fs.extents
    for ino, emap in ext.maps.items():
        tree = [(k[2], FileExtent.unpack(v)) for k, v in fs.tree.items((ino, S.EXTENT_DATA, 0), (ino, S.EXTENT_DATA, U64))]
        assert [(o, emap.extents[o]) for o in emap.offsets] == tree, ino
        assert sorted(emap.extents) == emap.offsets
    assert ext.mapped == sum(len(m) for m in ext.maps.values())


@pytest.fixture
async def image(tmp_path):
    path = str(tmp_path / "fs.img")
    await blockemu.mkfs(path, size="64M")
    return path


async def test_a_batch_that_fails_part_way_leaves_the_maps_what_the_tree_holds(image, monkeypatch):
    """A batch's staged changes reach the file's map as they are staged (later changes of the
    batch read them); a batch that fails before it applies them -- or whose apply fails -- drops
    the maps of the files it changed, so the next write refills them from the tree."""
    fs = await blockemu.mount(image, interval=3600)
    f = await fs.open("/f", "w+")
    for off in range(0, 256 << 10, 16 << 10):
        await f.pwrite(os.urandom(16 << 10), off)
        await fs.writeback.flush_inode(f.inode)
    ino = f.inode.ino
    assert ino in fs.extents.maps
    real = ExtentBatch._change_ref
    calls = []

    def fails_second(batch, *args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(5, "planted")
        return real(batch, *args)

    monkeypatch.setattr(ExtentBatch, "_change_ref", fails_second)
    with pytest.raises(OSError, match="planted"):
        fs.extents.punch(ino, 0, 64 << 10)  # four extents: fails at the second
    assert ino not in fs.extents.maps
    monkeypatch.undo()
    fs.extents.punch(ino, 0, 8 << 10)  # refilled from the tree, and changed with it
    assert ino in fs.extents.maps
    maps_are_the_tree(fs)

    real_apply = BTree.apply

    def ext_apply_fails(tree, changes):
        if tree.owner == S.EXTENT_TREE_OBJECTID:
            raise OSError(5, "planted")
        return real_apply(tree, changes)

    monkeypatch.setattr(BTree, "apply", ext_apply_fails)
    with pytest.raises(OSError, match="planted") as failed:
        fs.extents.punch(ino, 16 << 10, 40 << 10)  # the fs tree's part is applied
    monkeypatch.undo()
    assert ino not in fs.extents.maps
    fs.extents.punch(ino, 48 << 10, 56 << 10)
    maps_are_the_tree(fs)  # refilled from the fs tree as the failed apply left it
    fs.vol.abort(failed.value)  # the trees disagree now: this mount must not commit them
    await f.close()  # nothing dirty: closing writes nothing
    with pytest.raises(OSError):
        await fs.unmount()  # its commit refused: EIO


async def test_a_file_overwritten_after_log_replay_maps_over_the_replayed_items(tmp_path):
    """Log replay maps the logged items with a view of its own; the mount's maps are filled
    afterwards from the tree replay left, and overwrites after it land right."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M")
    rng = random.Random(2)
    want = bytearray(rng.randbytes(MIB))
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(want)
        await fs.sync()
        log = fs.vol.device.start_log(base_copy=str(tmp_path / "base.img"))
        async with fs.open("/f", "r+") as f:
            for _ in range(6):
                off, n = rng.randrange(MIB - (64 << 10)), rng.randrange(1, 64 << 10)
                data = rng.randbytes(n)
                await f.pwrite(data, off)
                want[off : off + n] = data
                await f.fsync()
            assert fs.vol.log_root
            log.crash_image(crash, len(log.entries))
    async with blockemu.mount(crash, interval=3600) as fs:
        async with fs.open("/f", "r+") as f:
            for idx in rng.sample(range(MIB // PAGE), 40):
                page = rng.randbytes(PAGE)
                want[idx * PAGE : (idx + 1) * PAGE] = page
                await f.pwrite(page, idx * PAGE)
            await f.fsync()
            maps_are_the_tree(fs)
            assert f.inode.ino in fs.extents.maps
    async with blockemu.mount(crash) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == want
    assert_fsck_clean(crash)


async def test_the_maps_stay_within_their_bound(image, monkeypatch):
    """A file with more items than the maps have room for gets none (the tree answers, and no
    batch walks it again); maps grown past the bound are emptied. The files stay right."""
    monkeypatch.setattr(module, "MAPPED_EXTENTS", 24)
    rng = random.Random(9)
    want = {"/a": bytearray(os.urandom(MIB)), "/b": bytearray(os.urandom(MIB))}
    async with blockemu.mount(image, interval=3600) as fs:
        for name, data in want.items():
            async with fs.open(name, "w+") as f:
                for off in range(0, MIB, 64 << 10):  # 16 extents each
                    await f.pwrite(data[off : off + (64 << 10)], off)
                    await fs.writeback.flush_inode(f.inode)

    async def overwrite(name: str, pages: int) -> None:
        for idx in rng.sample(range(MIB // PAGE), pages):
            page = os.urandom(PAGE)
            want[name][idx * PAGE : (idx + 1) * PAGE] = page
            await files[name].pwrite(page, idx * PAGE)
        await files[name].fsync()
        maps_are_the_tree(fs)

    async with blockemu.mount(image, interval=3600) as fs:
        files = {name: await fs.open(name, "r+") for name in want}
        ino = {name: f.inode.ino for name, f in files.items()}
        await overwrite("/a", 1)
        await overwrite("/b", 1)  # 16 items or more: no room left for them
        assert list(fs.extents.maps) == [ino["/a"]] and fs.extents.unmapped == {ino["/b"]}
        fills = []
        real = module.ExtentMap.__init__

        def counted(emap, items):
            fills.append(emap)
            real(emap, items)

        monkeypatch.setattr(module.ExtentMap, "__init__", counted)
        await overwrite("/b", 6)
        await overwrite("/a", 6)  # /a grows past the bound: every map goes
        assert fills == [] and not fs.extents.maps and not fs.extents.unmapped
        monkeypatch.undo()
        for f in files.values():
            await f.close()
    async with blockemu.mount(image, interval=3600) as fs:
        for name, data in want.items():
            async with fs.open(name) as f:
                assert await f.pread(2 * MIB, 0) == data
    assert_fsck_clean(image)


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4)), max_size=12), st.integers(0, 40), st.integers(1, 8))
def test_overlapping_is_every_item_the_range_touches(pieces, start, length):
    """``ExtentMap.overlapping`` against a scan of every item: whatever the shortcuts (an item
    at ``start`` that reaches ``end``), the answer is the items overlapping [start, end), in order;
    ``vacant`` (one bisection, which writeback asks before it trims anything) is None if any does,
    else where an item at ``start`` goes among the offsets."""
    items, at = [], 0
    for gap, size in pieces:  # non-overlapping items, in pages, with holes between some
        at += gap
        items.append((at * PAGE, FileExtent(1, size * PAGE, 0, 0, 0, 1, (at + 1) * PAGE, size * PAGE, 0, size * PAGE)))
        at += size
    start, end = start * PAGE, (start + length) * PAGE
    model = [(o, fe) for o, fe in items if o < end and o + fe.num_bytes > start]
    assert module.ExtentMap(items).overlapping(start, end) == model
    at = module.ExtentMap(items).vacant(start, end)
    assert (at is None) == bool(model)
    if at is not None:  # where an item at ``start`` goes: the offsets stay sorted
        offsets = [o for o, _ in items]
        assert sorted([*offsets, start]) == [*offsets[:at], start, *offsets[at:]]


@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=60))
def test_set_keeps_the_offsets_sorted_and_counts_the_items(changes):
    """``ExtentMap.set`` against a dict: after any sequence of items put and removed (offsets new
    or already there), ``offsets`` is the model's keys in order, each offset's extent is the
    model's, and each call returned the change in the number of items."""
    emap, model = module.ExtentMap([]), {}
    for page, put in changes:
        fe = FileExtent(1, PAGE, 0, 0, 0, 1, (page + 1) * PAGE, PAGE, 0, PAGE) if put else None
        before = len(model)
        if fe is None:
            model.pop(page * PAGE, None)
        else:
            model[page * PAGE] = fe
        assert emap.set(page * PAGE, fe) == len(model) - before
        assert emap.offsets == sorted(model) and emap.extents == model
