"""fsck --repair of damaged tree blocks: which it can rebuild (the free-space tree, a cache
derived from the extent tree) and which it must leave (DESIGN §6)."""
from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockemu
from blockemu.check.fsck import check
from blockemu.check.inspect import dump_tree
from blockemu.cli.main import main
from tests.util import assert_fsck_clean, flip, fsynced_then_cut


async def fragmented_image(path: str) -> dict[str, bytes]:
    """An image whose free-space tree is a node over several leaves (4 KiB nodes, free space cut
    into hundreds of extents by deleting every other small file); returns the files kept."""
    await blockemu.mkfs(path, size="32M", node_size="4K")
    kept = {}
    async with blockemu.mount(path) as fs:
        await fs.mkdir("/d")
        for i in range(400):
            async with fs.open(f"/d/{i}", "w") as f:
                await f.write(os.urandom(4096))
        await fs.sync()
        for i in range(400):
            if i % 2:
                await fs.unlink(f"/d/{i}")
            else:
                kept[f"/d/{i}"] = b""
    async with blockemu.mount(path, readonly=True) as fs:
        for name in kept:
            async with fs.open(name, "r") as f:
                kept[name] = await f.read()
    return kept


@pytest.mark.parametrize("level", [1, 0], ids=["root node", "leaf"])
def test_a_damaged_free_space_tree_block_is_rebuilt_from_the_extent_tree(tmp_path, capsys, level):
    """The free-space tree is a cache of what the extent tree implies: a damaged block of it (the
    root node: its leaves' METADATA_ITEMs then name blocks no walk reaches; or one leaf) used to
    rule repair out like any damaged tree block. Now --repair rebuilds the tree, the image fscks
    clean, and every file reads back the same after a fresh mount."""
    img = str(tmp_path / "f.img")
    kept = asyncio.run(fragmented_image(img))
    blocks = [b for b in dump_tree(img, ["free-space"]) if b["level"] == level]
    assert blocks and (level == 0 or len(dump_tree(img, ["free-space"])) > 2)
    flip(img, blocks[-1]["bytenr"] + 300)
    before = check(img)
    assert before.trees_damaged and {e.tree for e in before.errors if e.code == "CSUM_MISMATCH"} == {"free-space"}
    rc = main(["fsck", img, "--repair"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "repaired: [CSUM_MISMATCH]" in out and "found" in out and "no error found" in out
    assert_fsck_clean(img)
    asyncio.run(read_back_and_write(img, kept))
    assert_fsck_clean(img)


async def read_back_and_write(img: str, kept: dict[str, bytes]) -> None:
    async with blockemu.mount(img) as fs:
        for name, data in kept.items():
            async with fs.open(name, "r") as f:
                assert await f.read() == data
        async with fs.open("/d/new", "w") as f:  # the rebuilt record hands out only free space
            await f.write(os.urandom(1 << 20))


def test_a_damaged_block_of_another_tree_still_rules_repair_out(tmp_path, capsys):
    img = str(tmp_path / "g.img")
    asyncio.run(fragmented_image(img))
    fs_leaf = next(b for b in dump_tree(img, ["fs"]) if b["level"] == 0)
    free_leaf = next(b for b in dump_tree(img, ["free-space"]) if b["level"] == 0)
    flip(img, fs_leaf["bytenr"] + 300)
    flip(img, free_leaf["bytenr"] + 300)
    before = open(img, "rb").read()
    assert main(["fsck", img, "--repair"]) == 4
    assert "note: --repair wrote nothing: tree blocks are damaged" in capsys.readouterr().out
    assert open(img, "rb").read() == before


def test_the_note_on_damaged_trees_says_what_can_still_be_read(tmp_path, capsys):
    """--repair's note said files could still be copied out with ls / cat whatever tree was
    damaged; with the checksum tree damaged every cat failed (the newcomer's trial). The note
    now says so, and what it promises holds."""
    img = str(tmp_path / "g.img")
    kept = asyncio.run(fragmented_image(img))
    csum_leaf = next(b for b in dump_tree(img, ["csum"]) if b["level"] == 0)
    flip(img, csum_leaf["bytenr"] + 300)
    assert main(["fsck", img, "--repair"]) == 4
    note = capsys.readouterr().out
    assert "the checksum tree is among them" in note and "can still be copied out" not in note
    name = next(iter(kept))
    assert main(["cat", img, name]) != 0  # as the note says
    assert main(["ls", img, "/"]) == 0


@pytest.mark.parametrize("what", ["/d/f", "/d/sub"])
def test_a_lost_back_reference_is_rebuilt_from_the_entry_not_the_file_dropped(tmp_path, capsys, what):
    """An inode whose one INODE_REF item was lost, while its directory's DIR_INDEX and DIR_ITEM
    still name it whole -- ls listed it and cat read it -- was reported ORPHAN ("no name") and
    --repair deleted it with its data, then the entry as dangling. The back reference is
    rebuilt from the entry instead: the file keeps its name and contents."""
    from blockemu.fs.volume import Volume
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "r.img")
    data = os.urandom(50_000)

    async def make() -> int:
        await blockemu.mkfs(img, size="32M")
        async with blockemu.mount(img) as fs:
            await fs.mkdir("/d")
            await fs.mkdir("/d/sub")
            async with fs.open("/d/f", "w") as f:
                await f.write(data)
            parent, ino = (await fs.stat("/d")).st_ino, (await fs.stat(what)).st_ino
        vol = await Volume.open(img)
        async with vol.join() as engine:
            engine.trees[S.FS_TREE_OBJECTID].delete((ino, S.INODE_REF, parent))
        await vol.close()
        return ino

    ino = asyncio.run(make())
    # one finding, the missing reference: the link count agrees with the name it gets back
    assert {e.code for e in check(img).errors} == {"DIR_ITEM_MISMATCH"}
    assert main(["fsck", img, "--repair"]) == 1
    assert f"no INODE_REF in inode {ino}" in capsys.readouterr().out
    assert_fsck_clean(img)

    async def read_back() -> None:
        async with blockemu.mount(img, readonly=True) as fs:
            assert sorted(await fs.readdir("/d")) == ["f", "sub"]
            async with fs.open("/d/f", "r") as f:
                assert await f.read() == data
            assert (await fs.stat(what)).st_ino == ino

    asyncio.run(read_back())


def test_an_orphan_checksum_item_of_several_sectors_is_deleted_once(tmp_path, capsys):
    """Each orphan sector of one checksum item carries the fix that deletes the item; the repair
    deleted it at the first sector's and failed at the second's ('blockemu: fsck: no item (...)
    in tree 7', exit 8), writing nothing."""
    from blockemu.fs.volume import Volume
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "c.img")

    async def make() -> int:
        await blockemu.mkfs(img, size="32M")
        vol = await Volume.open(img)
        async with vol.join() as engine:
            sector = next(iter(engine.free_items)) + (1 << 20)
            engine.trees[S.CSUM_TREE_OBJECTID].insert((S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, sector), bytes(4 * 4))
        await vol.close()
        return sector

    sector = asyncio.run(make())
    # one finding for the item's four sectors (it printed one line per sector: 144 for an extent)
    assert [(e.code, e.message) for e in check(img).errors] == [
        ("ORPHAN_CSUM", f"checksums for 4 sectors [{sector}, +16384), which no data extent holds")]
    assert main(["fsck", img, "--repair"]) == 1
    out = capsys.readouterr().out
    assert out.count("repaired: [ORPHAN_CSUM]") == 1
    assert (f"-- removed item ({S.EXTENT_CSUM_OBJECTID}, {S.EXTENT_CSUM}, {sector}) of the "
            f"{S.TREE_NAMES[S.CSUM_TREE_OBJECTID]} tree") in out
    assert_fsck_clean(img)


def test_a_repair_says_what_it_removed(tmp_path, capsys):
    """--repair printed "repaired: [ORPHAN] inode N has no name ..." when the fix deleted the
    inode and its data: each repaired line says what the fix did."""
    from blockemu.check.repair import _drop_entry
    from blockemu.fs.volume import Volume
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "o.img")

    async def make() -> tuple[int, int]:
        await blockemu.mkfs(img, size="32M")
        async with blockemu.mount(img) as fs:
            await fs.mkdir("/d")
            async with fs.open("/d/f", "w") as f:
                await f.write(bytes(50_000))
            d, ino = (await fs.stat("/d")).st_ino, (await fs.stat("/d/f")).st_ino
        vol = await Volume.open(img)
        async with vol.join() as engine:  # every name of /d/f gone, the inode and its data left
            tree = engine.trees[S.FS_TREE_OBJECTID]
            _drop_entry(tree, d, next(k[2] for k, _ in tree.items((d, S.DIR_INDEX, 0), (d, S.DIR_INDEX, 1 << 63))), b"f")
            tree.delete((ino, S.INODE_REF, d))
        await vol.close()
        return d, ino

    d, ino = asyncio.run(make())
    assert main(["fsck", img, "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"repaired: [ORPHAN] inode {ino} has no name and no orphan item -- removed inode {ino} (50000 bytes)" in out
    assert f"-- set inode {d}'s size to 0" in out
    assert_fsck_clean(img)


async def image_with(img: str, dirs: list[str], files: tuple[str, ...] = ()) -> list[int]:
    """A fresh image holding ``dirs`` and ``files`` (5000 random bytes each); their inodes, in order."""
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img) as fs:
        for d in dirs:
            await fs.mkdir(d)
        for p in files:
            async with fs.open(p, "w") as f:
                await f.write(os.urandom(5000))
        return [(await fs.stat(p)).st_ino for p in (*dirs, *files)]


async def linked_image(img: str, dirs: list[str], path: str, links: tuple[str, ...]) -> tuple[int, int, bytes]:
    """A fresh image holding ``dirs`` and the file ``path`` (``image_with``) hard-linked as
    ``links``: the inodes of its directory and itself, and its data."""
    *inos, ino = await image_with(img, dirs, (path,))
    async with blockemu.mount(img) as fs:
        for n in links:
            await fs.link(path, n)
        async with fs.open(path, "r") as f:
            data = await f.read()
    return inos[dirs.index(os.path.dirname(path))], ino, data


async def edit_fs_tree(img: str, change) -> None:
    """``change(tree)`` on the image's fs tree, committed: damage no filesystem call makes."""
    from blockemu.fs.volume import Volume
    from blockemu.ondisk import structs as S

    vol = await Volume.open(img)
    async with vol.join() as engine:
        change(engine.trees[S.FS_TREE_OBJECTID])
    await vol.close()


def unname(tree, ino: int, parent: int) -> None:
    """``ino``'s name in directory ``parent`` lost on both sides: its INODE_REF and the entry."""
    from blockemu.check.repair import _drop_entry
    from blockemu.ondisk import structs as S
    from blockemu.ondisk.items import unpack_inode_refs

    (r,) = unpack_inode_refs(tree.get((ino, S.INODE_REF, parent)))
    tree.delete((ino, S.INODE_REF, parent))
    _drop_entry(tree, parent, r.index, r.name)


def test_no_back_reference_is_rebuilt_into_a_directory_the_repair_drops(tmp_path, capsys):
    """A nameless directory (its INODE_REF and its entry lost) is dropped as ORPHAN with its
    items; a file it names whose own INODE_REF was lost too must go with it, not get a back
    reference rebuilt into the dropped directory: that left the file with a reference nothing
    names, which no later repair fixes (fsck never came back clean)."""
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "n.img")

    async def make() -> None:
        d, sub, f_ino = await image_with(img, ["/d", "/d/sub"], ("/d/sub/f",))

        def damage(tree) -> None:
            unname(tree, sub, d)
            tree.delete((f_ino, S.INODE_REF, sub))
        await edit_fs_tree(img, damage)

    asyncio.run(make())
    assert main(["fsck", img, "--repair"]) == 1
    assert "repaired: [ORPHAN] inode" in capsys.readouterr().out
    assert_fsck_clean(img)

    async def read_back() -> None:
        async with blockemu.mount(img, readonly=True) as fs:
            assert await fs.readdir("/d") == []

    asyncio.run(read_back())


def plant_entry(tree, d: int, index: int, name: bytes, target: int) -> None:
    """A hostile entry, whole (DIR_INDEX and DIR_ITEM agree), in directory ``d`` naming the
    directory ``target``."""
    from blockemu.ondisk import structs as S
    from blockemu.ondisk.items import DirEntry, name_hash, pack_dir_entries

    body = pack_dir_entries([DirEntry((target, S.INODE_ITEM, 0), 1, S.FT_DIR, name)])
    tree.insert((d, S.DIR_INDEX, index), body)
    tree.insert((d, S.DIR_ITEM, name_hash(name)), body)


@pytest.mark.parametrize("hostile", ["root in /d", "/d/x in /d/x/y"])
def test_no_back_reference_is_rebuilt_that_makes_a_cycle(tmp_path, capsys, hostile):
    """A hostile whole entry naming a directory without a back reference, in a directory below
    it: the root in /d (its ".." reference gone), or /d/x (nameless: its reference and entry
    lost) in its own child /d/x/y. The rebuilt reference put the directory inside itself (fsck
    then passed the root's cycle); now no reference comes from anywhere the root does not reach
    by references, and the entry is left for a human."""
    from blockemu.fs.volume import Volume
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "loop.img")

    async def make() -> int:
        d, x, y = await image_with(img, ["/d", "/d/x", "/d/x/y"])
        target = 256 if hostile == "root in /d" else x

        def damage(tree) -> None:
            if target == 256:
                plant_entry(tree, d, 9, b"loop", target)
                if (256, S.INODE_REF, 256) in tree:
                    tree.delete((256, S.INODE_REF, 256))
            else:
                unname(tree, x, d)
                plant_entry(tree, y, 9, b"loop", target)
        await edit_fs_tree(img, damage)
        return target

    target = asyncio.run(make())
    main(["fsck", img, "--repair"])

    async def refs_of_target() -> list:
        vol = await Volume.open(img, readonly=True)
        try:
            async with vol.join() as engine:
                return [k for k, _ in engine.trees[S.FS_TREE_OBJECTID].items((target, S.INODE_REF, 0),
                                                                              (target, S.INODE_REF, (1 << 64) - 1))]
        finally:
            await vol.close()

    assert asyncio.run(refs_of_target()) == []


@pytest.mark.parametrize("lost", ["all", "one"])
def test_every_name_of_a_hard_link_gets_its_back_reference_rebuilt(tmp_path, capsys, lost):
    """A file with four names -- two in one directory (one INODE_REF item holds both), one each
    in two others -- whose INODE_REF items were lost (all of them, or one directory's): repair
    rebuilt one back reference and left the other names reported with no fix (their entries
    kept, the link count cut to the one name). Now every entry that names the file whole gets
    its back reference back: the repaired image fscks clean and every name reads the file."""
    from blockemu.fs.volume import Volume
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "h.img")
    data = os.urandom(20_000)
    names = ["/a/f", "/a/g", "/b/f", "/c/sub/h"]

    async def make() -> int:
        await blockemu.mkfs(img, size="32M")
        async with blockemu.mount(img) as fs:
            for d in ("/a", "/b", "/c", "/c/sub"):
                await fs.mkdir(d)
            async with fs.open(names[0], "w") as f:
                await f.write(data)
            for n in names[1:]:
                await fs.link(names[0], n)
            ino = (await fs.stat(names[0])).st_ino
            parents = [(await fs.stat(d)).st_ino for d in (("/a", "/b", "/c/sub") if lost == "all" else ("/a",))]
        vol = await Volume.open(img)
        async with vol.join() as engine:
            for p in parents:
                engine.trees[S.FS_TREE_OBJECTID].delete((ino, S.INODE_REF, p))
        await vol.close()
        return ino

    ino = asyncio.run(make())
    missing = [e for e in check(img).errors if e.code == "DIR_ITEM_MISMATCH"]
    assert len(missing) == (4 if lost == "all" else 2)  # one finding per name without its reference
    assert all(f"no INODE_REF in inode {ino}" in e.message and e.fix for e in missing), [e.message for e in missing]
    assert main(["fsck", img]) == 4  # read-only: errors found, none fixed
    capsys.readouterr()
    assert main(["fsck", img, "--repair"]) == 1
    out = capsys.readouterr().out
    assert out.count(f"added inode {ino}'s reference") == len(missing), out
    assert_fsck_clean(img)

    async def read_back() -> None:
        async with blockemu.mount(img, readonly=True) as fs:
            for n in names:
                st = await fs.stat(n)
                assert (st.st_ino, st.st_nlink) == (ino, 4)
                async with fs.open(n, "r") as f:
                    assert await f.read() == data

    asyncio.run(read_back())


@pytest.mark.parametrize("what, damage", [(w, d) for w in ("/d/f", "/d/sub") for d in ("index", "name")]
                         + [("/d/f", "both")])
def test_a_back_reference_at_odds_with_its_entry_is_rebuilt_from_the_entry(tmp_path, capsys, what, damage):
    """The entry (DIR_INDEX and DIR_ITEM) names the inode whole, but its INODE_REF there gives
    the name another index, or the entry's index another name (the name missing): fsck
    reported both sides and --repair left them, as a reference already there for that name or
    index stopped the rebuild. The stale reference is replaced by one rebuilt from the entry,
    as btrfs check does: fsck is clean, and every name reads the file (a hard link's other
    names, one beside it in the same INODE_REF item, keep theirs). ``both``: one stale copy
    gives f's name g's index, g's name gone -- both entries are rebuilt in one round, the link
    count never cut."""
    from blockemu.ondisk import structs as S
    from blockemu.ondisk.items import InodeRef, pack_inode_refs, unpack_inode_refs

    img = str(tmp_path / "r.img")
    data = os.urandom(30_000)
    names = ["/d/f", "/d/g", "/e/h"] if what == "/d/f" else [what]

    async def make() -> tuple[int, int]:
        await blockemu.mkfs(img, size="32M")
        async with blockemu.mount(img) as fs:
            for d in ("/d", "/e", "/d/sub"):
                await fs.mkdir(d)
            async with fs.open("/d/f", "w") as f:
                await f.write(data)
            for n in ("/d/g", "/e/h"):
                await fs.link("/d/f", n)
            return (await fs.stat("/d")).st_ino, (await fs.stat(what)).st_ino

    parent, ino = asyncio.run(make())

    def damage_ref(tree) -> None:
        key = (ino, S.INODE_REF, parent)
        refs = unpack_inode_refs(tree.get(key))
        (r,) = [r for r in refs if r.name == what.rsplit("/", 1)[1].encode()]
        if damage == "both":
            (g,) = [q for q in refs if q.name == b"g"]
            tree.update(key, pack_inode_refs([InodeRef(g.index, r.name)]))
            return
        bad = InodeRef(r.index + 100, r.name) if damage == "index" else InodeRef(r.index, b"x")
        tree.update(key, pack_inode_refs([bad if q is r else q for q in refs]))

    asyncio.run(edit_fs_tree(img, damage_ref))
    before = check(img).errors
    assert before and {e.code for e in before} == {"DIR_ITEM_MISMATCH"}, [e.message for e in before]
    assert [e for e in before if e.fix and "stale" in e.fix], [e.message for e in before]
    assert main(["fsck", img, "--repair"]) == 1
    out = capsys.readouterr().out
    old = "'x' (index" if damage == "name" else f"'{what.rsplit('/', 1)[1]}' (index"
    assert f"added inode {ino}'s reference" in out and f"in place of the one naming {old}" in out, out
    assert "nlink" not in out, out  # judged by the names the repair gives back
    assert_fsck_clean(img)

    async def read_back() -> None:
        async with blockemu.mount(img) as fs:
            assert sorted(await fs.readdir("/d")) == ["f", "g", "sub"]
            for n in names:
                st = await fs.stat(n)
                assert (st.st_ino, st.st_nlink) == (ino, 3 if what == "/d/f" else 2)
                if what == "/d/f":
                    async with fs.open(n, "r") as f:
                        assert await f.read() == data
            await fs.rename(what, "/e/moved")  # the rebuilt reference is the one the filesystem finds
            assert (await fs.stat("/e/moved")).st_ino == ino

    asyncio.run(read_back())
    assert_fsck_clean(img)


def test_a_stale_name_held_at_two_indexes_goes_once_with_the_rebuilt_reference(tmp_path, capsys):
    """Entry g's INODE_REF gives g's index the name z, and a second copy of z sits at an index no
    entry has. The rebuilt reference for g takes out the first copy (its ``stale``); the second
    is dangling and dropped on its own. The first copy used to count -- and carry a ``drop_ref``
    -- as dangling too: the link count was judged one short (f, g and h would be left nlink 2)
    and the repair removed a name three times where two copies were, failing every round."""
    from blockemu.ondisk import structs as S
    from blockemu.ondisk.items import InodeRef, pack_inode_refs, unpack_inode_refs

    img = str(tmp_path / "r.img")
    parent, ino, data = asyncio.run(linked_image(img, ["/d", "/e"], "/d/f", ("/d/g", "/e/h")))

    def damage(tree) -> None:
        key = (ino, S.INODE_REF, parent)
        refs = unpack_inode_refs(tree.get(key))
        (g,) = [r for r in refs if r.name == b"g"]
        tree.update(key, pack_inode_refs([r for r in refs if r is not g]
                                         + [InodeRef(g.index, b"z"), InodeRef(g.index + 100, b"z")]))

    asyncio.run(edit_fs_tree(img, damage))
    before = check(img).errors
    assert not [e for e in before if e.code == "NLINK_MISMATCH"], [e.message for e in before]
    assert main(["fsck", img, "--repair"]) == 1, capsys.readouterr()
    assert_fsck_clean(img)
    assert main(["fsck", img, "--repair"]) == 0  # nothing left to change

    async def read_back() -> None:
        async with blockemu.mount(img) as fs:
            for n in ("/d/f", "/d/g", "/e/h"):
                st = await fs.stat(n)
                assert (st.st_ino, st.st_nlink) == (ino, 3)
                async with fs.open(n, "r") as f:
                    assert await f.read() == data

    asyncio.run(read_back())


@pytest.mark.parametrize("where", ["INODE_REF", "INODE_EXTREF"])
def test_a_back_reference_held_twice_is_one_link_and_the_copy_goes(tmp_path, capsys, where):
    """A hard link's name held twice -- the same name and index again in its INODE_REF, or in an
    INODE_EXTREF beside it. It is one name: fsck counted two links for it, found nlink one short,
    and --repair raised the count to match, so unlinking every name left the inode alive with no
    entry (and a reference fsck then reports but keeps). Now the copy is reported and removed, the
    count judged by the names. The item the finding names is the one the fix takes the copy from,
    and the repair's line says which (it said INODE_EXTREF, and the INODE_REF's copy went)."""
    from blockemu.ondisk import structs as S
    from blockemu.ondisk.items import (
        InodeExtref,
        extref_hash,
        pack_inode_extrefs,
        pack_inode_refs,
        unpack_inode_extrefs,
        unpack_inode_refs,
    )

    img = str(tmp_path / "r.img")
    parent, ino, _ = asyncio.run(linked_image(img, ["/d"], "/d/a", ("/d/b",)))

    def damage(tree) -> None:
        key = (ino, S.INODE_REF, parent)
        refs = unpack_inode_refs(tree.get(key))
        if where == "INODE_REF":
            tree.update(key, pack_inode_refs([*refs, refs[0]]))
        else:
            r = refs[0]
            tree.insert((ino, S.INODE_EXTREF, extref_hash(parent, r.name)),
                        pack_inode_extrefs([InodeExtref(parent, r.index, r.name)]))

    asyncio.run(edit_fs_tree(img, damage))
    before = check(img).errors
    assert [e.code for e in before] == ["DIR_ITEM_MISMATCH"] and "a second time" in before[0].message, \
        [e.message for e in before]
    assert main(["fsck", img, "--repair"]) == 1
    out = capsys.readouterr().out
    assert "nlink" not in out and f"] {where} of {ino} names " in out and f"a second copy, from its {where}\n" in out, out
    assert_fsck_clean(img)
    held: list[tuple[int, list[bytes]]] = []

    def names_held(tree) -> None:
        for key, body in tree.items((ino, S.INODE_REF, 0), (ino, S.INODE_EXTREF, (1 << 64) - 1)):
            unpack = unpack_inode_refs if key[1] == S.INODE_REF else unpack_inode_extrefs
            held.append((key[1], sorted(r.name for r in unpack(body))))
    asyncio.run(edit_fs_tree(img, names_held))
    assert held == [(S.INODE_REF, [b"a", b"b"])], held  # an INODE_EXTREF copy went, not the INODE_REF's

    async def unlink_all() -> None:
        async with blockemu.mount(img) as fs:
            assert (await fs.stat("/d/a")).st_nlink == 2
            await fs.unlink("/d/a")
            await fs.unlink("/d/b")

    asyncio.run(unlink_all())
    assert_fsck_clean(img)
    assert check(img).stats["inodes"] == 2  # the root and /d: the file went with its last name


LINKS = ("/d/a", "/d/b", "/d/c", "/e/h")
# one change to the back references an inode has in a directory: (directory, what, index, name)
REF_DAMAGE = st.tuples(st.sampled_from(["/d", "/e"]),
                       st.sampled_from(["index", "name", "add", "copy", "drop", "extref"]),
                       st.sampled_from([2, 3, 4, 5, 50]), st.sampled_from([b"a", b"b", b"c", b"h", b"z"]))


@pytest.fixture(scope="module")
def hard_linked(tmp_path_factory) -> tuple[str, dict[str, int], int]:
    """An image whose file has the names ``LINKS`` in two directories: its path, the
    directories' inodes and the file's."""
    img = str(tmp_path_factory.mktemp("linked") / "base.img")
    parent, ino, _ = asyncio.run(linked_image(img, ["/d", "/e"], LINKS[0], LINKS[1:]))
    dirs = {"/d": parent, "/e": asyncio.run(image_inode(img, "/e"))}
    return img, dirs, ino


async def image_inode(img: str, path: str) -> int:
    async with blockemu.mount(img, readonly=True) as fs:
        return (await fs.stat(path)).st_ino


@settings(max_examples=60, deadline=None)
@given(st.lists(REF_DAMAGE, min_size=1, max_size=6))
def test_repair_of_damaged_back_references_keeps_every_name_and_converges(hard_linked, tmp_path_factory, damage):
    """Back references changed at random -- an index or a name replaced, a name added, held
    twice, dropped, moved to an INODE_EXTREF -- while the entries stay whole. The model: every
    entry is a name of the file. --repair leaves no finding it has a fix for (a fix that failed
    left them all, every round), and once the image is clean every entry still names the file,
    whose link count is the entries' count."""
    import shutil

    from blockemu.ondisk import structs as S
    from blockemu.ondisk.items import InodeExtref, InodeRef, extref_hash, pack_inode_extrefs, pack_inode_refs, unpack_inode_refs

    base, dirs, ino = hard_linked
    img = str(tmp_path_factory.mktemp("damaged") / "r.img")
    shutil.copy(base, img)

    def change(tree) -> None:
        refs = {d: unpack_inode_refs(tree.get((ino, S.INODE_REF, d))) for d in dirs.values()}
        for where, what, index, name in damage:
            d = dirs[where]
            out = refs[d]
            if what == "add" or what == "copy" and out:
                out.append(InodeRef(index, name) if what == "add" else out[index % len(out)])
            elif out:
                r = out.pop(index % len(out))
                if what in ("index", "name"):
                    out.append(InodeRef(index, r.name) if what == "index" else InodeRef(r.index, name))
                elif what == "extref":
                    tree.insert((ino, S.INODE_EXTREF, extref_hash(d, r.name)),
                                pack_inode_extrefs([InodeExtref(d, r.index, r.name)]), replace=True)
        for d, out in refs.items():
            if out:
                tree.update((ino, S.INODE_REF, d), pack_inode_refs(out))
            else:
                tree.delete((ino, S.INODE_REF, d))

    asyncio.run(edit_fs_tree(img, change))
    main(["fsck", img, "--repair"])
    left = check(img).errors
    assert all(e.fix is None for e in left), [(e.message, e.fix) for e in left]
    if left:
        return

    async def names() -> None:
        async with blockemu.mount(img, readonly=True) as fs:
            for path in LINKS:
                s = await fs.stat(path)
                assert (s.st_ino, s.st_nlink) == (ino, len(LINKS)), path

    asyncio.run(names())


def test_the_note_on_damaged_trees_says_zero_log_when_a_log_must_replay_first(tmp_path, capsys):
    """With an fsync log on the image and its extent tree's leaf damaged, the note promised "files
    the errors do not name can still be copied out with blockemu ls / cat" -- and both failed, as
    the log's replay (which they run first) needs that tree. The note says how to read them."""
    img = str(tmp_path / "l.img")
    asyncio.run(fsynced_then_cut(img))
    (leaf,) = dump_tree(img, ["extent"])
    flip(img, leaf["bytenr"] + 2000)
    assert main(["fsck", img, "--repair"]) == 4
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --repair wrote nothing"))
    assert note.endswith("can still be copied out with blockemu ls / cat; with the fsync log on the image, ls and "
                         "cat replay it first, and fail where the replay meets the damage: `blockemu rescue zero-log` "
                         "then lets them read the last commit, dropping what was fsynced since"), note
    assert main(["cat", img, "/f"]) == 1  # as the note says
    assert main(["rescue", "zero-log", img]) == 0
    capsys.readouterr()
    assert main(["cat", img, "/f"]) == 0 and capsys.readouterr().out == "x" * 4096
