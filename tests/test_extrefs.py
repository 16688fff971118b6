"""Hard links past one INODE_REF item: btrfs's INODE_EXTREF (SPEC "Directories"). A name that
does not fit in its inode's INODE_REF for that directory goes to an INODE_EXTREF item, so the
only limit on a file's names is the link count (65,535, EMLINK past it); fsck counts those names,
checks that each is named back by its directory, and repair mends them as INODE_REF's."""
from __future__ import annotations

import asyncio
import errno
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import blockemu
from blockemu.check import fsck_fast
from blockemu.check.fsck import check
from blockemu.check.repair import repair
from blockemu.fs import backrefs
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import (
    InodeExtref,
    InodeItem,
    extref_hash,
    name_hash,
    pack_inode_extrefs,
    unpack_inode_extrefs,
    unpack_inode_refs,
)
from tests.test_fsck_fast import walked
from tests.util import KEY, ErrnoCheck, assert_fsck_clean, encrypted_dir, set_super

LAST = (1 << 64) - 1


@pytest.fixture
async def image(tmp_path):
    path = str(tmp_path / "fs.img")
    await blockemu.mkfs(path, size="64M", node_size="4K")  # 3 names of 240 bytes fill an INODE_REF
    return path


def long_name(i: int, fill: str = "y") -> str:
    return f"{i:04d}" + fill * 236


def extref_items(fs, ino: int) -> list[tuple[tuple[int, int, int], bytes]]:
    return list(fs.tree.items((ino, S.INODE_EXTREF, 0), (ino, S.INODE_EXTREF, LAST)))


def disk_names(fs, ino: int) -> set[tuple[int, bytes]]:
    return set(backrefs.names(fs.tree, ino))


def test_extref_hash_is_specs_table_and_bodies_refuse_hostile_bytes():
    assert [extref_hash(d, n) for d, n in ((256, b"f"), (257, b"hello"), (256, b"file.txt"))] \
        == [0x4767748B, 0x3A57086D, 0xB93CD098]
    refs = [InodeExtref(256, 2, b"a"), InodeExtref(300, 7, b"other-name")]
    body = pack_inode_extrefs(refs)
    assert unpack_inode_extrefs(body) == refs
    for bad in (b"", body[:17], body[:-1], body + b"\x00", pack_inode_extrefs([InodeExtref(1, 2, b"")])):
        with pytest.raises(OSError):
            unpack_inode_extrefs(bad)


async def test_a_thousand_long_names_in_one_directory_across_remounts(image):
    """1,000 links of 240-byte names to one file in one directory: all but a few live in
    INODE_EXTREF items. Unlink half, rename some (within the directory and out of it), and each
    time the names and the link count read back from disk after a remount, and fsck is clean."""
    n = 1000
    async with blockemu.mount(image) as fs:
        await fs.mkdir("/d")
        async with fs.open("/f", "w") as f:
            await f.write(b"shared")
        for i in range(n):
            await fs.link("/f", "/" + long_name(i))
        ino = (await fs.stat("/f")).st_ino
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        root = (await fs.stat("/")).st_ino
        assert (await fs.stat("/" + long_name(n - 1))).st_nlink == n + 1
        assert len(extref_items(fs, ino)) > n - 10
        assert disk_names(fs, ino) == {(root, b"f")} | {(root, long_name(i).encode()) for i in range(n)}
        for i in range(0, n, 2):
            await fs.unlink("/" + long_name(i))
        for i in range(1, n, 10):  # out of the directory, and to another name in it
            await fs.rename("/" + long_name(i), "/d/" + long_name(i))
            await fs.rename("/" + long_name(i + 2), "/" + long_name(i + 2, "z"))
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        d = (await fs.stat("/d")).st_ino
        want = {(root, b"f")} | {(root, long_name(i).encode()) for i in range(1, n, 2) if i % 10 not in (1, 3)} \
            | {(d, long_name(i).encode()) for i in range(1, n, 10)} \
            | {(root, long_name(i, "z").encode()) for i in range(3, n, 10)}
        assert disk_names(fs, ino) == want
        assert (await fs.stat("/f")).st_nlink == len(want) == n // 2 + 1
        assert len(await fs.readdir("/")) == len(want) - n // 10 + 1  # and /d
        async with fs.open("/d/" + long_name(1)) as f:
            assert await f.read() == b"shared"
        for i in range(1, n, 2):  # every name but /f: the names left are in whichever item
            path = "/d/" + long_name(i) if i % 10 == 1 else "/" + long_name(i, "z" if i % 10 == 3 else "y")
            await fs.unlink(path)
        assert disk_names(fs, ino) == {(root, b"f")} and not extref_items(fs, ino)
    assert_fsck_clean(image)


async def test_names_only_in_extrefs_give_a_path_and_count_in_fsck(image):
    """Once the INODE_REF's names are gone, the extrefs are an inode's only names: path_of (what
    FUSE resolves inodes by) finds one, and fsck -- which leaves such a tree to the full passes,
    as it does any INODE_EXTREF -- counts them toward nlink."""
    async with blockemu.mount(image) as fs:
        async with fs.open("/" + long_name(0), "w"):
            pass
        for i in range(1, 8):
            await fs.link("/" + long_name(0), "/" + long_name(i))
        ino = (await fs.stat("/" + long_name(0))).st_ino
        root = (await fs.stat("/")).st_ino
        in_ref = [r.name.decode() for r in unpack_inode_refs(fs.tree[(ino, S.INODE_REF, root)])]
        assert len(in_ref) == 3
        for name in in_ref:
            await fs.unlink("/" + name)
        assert (ino, S.INODE_REF, root) not in fs.tree
        assert fs.path_of(ino)[1:] in {long_name(i) for i in range(8)} - set(in_ref)
        assert (await fs.stat(fs.path_of(ino))).st_nlink == 5
    ck, _ = walked(image)
    assert fsck_fast.inodes_clean(fsck_fast.columns(ck)) is None
    assert_fsck_clean(image)


async def test_emlink_only_at_the_link_count_limit(image):
    """btrfs's BTRFS_LINK_MAX: link(2) to a file with 65,535 names is EMLINK, before any change."""
    async with blockemu.mount(image) as fs:
        async with fs.open("/f", "w"):
            pass
        inode = fs._resolve("/f")
        inode.item = inode.item._replace(nlink=S.LINK_MAX - 1)  # as if it had the names
        await fs.link("/f", "/g")
        assert (await fs.stat("/g")).st_nlink == S.LINK_MAX
        with ErrnoCheck(errno.EMLINK):
            await fs.link("/f", "/h")
        assert sorted(await fs.readdir("/")) == ["f", "g"]


async def test_an_extref_full_of_colliding_names_is_eoverflow_before_any_change(image):
    """Names whose (directory, name) hashes collide share an INODE_EXTREF, as a DIR_ITEM's do: one
    more than it holds is EOVERFLOW (btrfs's insert says the same), found before any change, so
    the mount goes on. The filler stands for colliding names a hostile image may hold."""
    ino, root = await linked_file(image)
    name = long_name(50).encode()
    key = (ino, S.INODE_EXTREF, extref_hash(root, name))
    async with blockemu.mount(image) as fs:
        async with fs.vol.join():
            fs.tree.insert(key, pack_inode_extrefs([InodeExtref(root, 9000 + i, b"%03d" % i + b"z" * 230) for i in range(3)]))
        with ErrnoCheck(errno.EOVERFLOW):
            await fs.link("/f", "/" + name.decode())
        async with fs.vol.join():
            fs.tree.delete(key)
        await fs.link("/f", "/" + name.decode())  # the mount is still writable
        assert (await fs.stat("/f")).st_nlink == 10
    assert_fsck_clean(image)


async def test_extrefs_in_an_encrypted_directory(image):
    """Names stored as ciphertext (longer than the plaintext) spill the same way; without the key
    the directory lists no-key names, with it the real ones; fsck needs no key for either."""
    async with blockemu.mount(image) as fs:
        kid = await encrypted_dir(fs, "/e")
        async with fs.open("/e/f", "w") as f:
            await f.write(b"secret")
        for i in range(12):
            await fs.link("/e/f", "/e/" + long_name(i)[:200])
        ino = (await fs.stat("/e/f")).st_ino
        assert extref_items(fs, ino)
        await fs.remove_key(kid)
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        nokey = await fs.readdir("/e")
        assert len(nokey) == 13 and "f" not in nokey
        await fs.add_key(KEY)
        assert sorted(await fs.readdir("/e")) == sorted(["f"] + [long_name(i)[:200] for i in range(12)])
        for i in range(12):
            await fs.unlink("/e/" + long_name(i)[:200])
        assert (await fs.stat("/e/f")).st_nlink == 1
    assert_fsck_clean(image)


# ---------------------------------------------------------------- fsck and repair

async def linked_file(image: str, n: int = 8) -> tuple[int, int]:
    """/f with ``n`` more names of 240 bytes in / (most in INODE_EXTREFs): (its inode, the root's)."""
    async with blockemu.mount(image) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"data")
        for i in range(n):
            await fs.link("/f", "/" + long_name(i))
        return (await fs.stat("/f")).st_ino, (await fs.stat("/")).st_ino


async def edit(image: str, change) -> None:
    async with blockemu.mount(image) as fs:
        async with fs.vol.join():
            change(fs.tree)


def codes_and_messages(image: str) -> list[tuple[str, str]]:
    return [(e.code, e.message) for e in check(image).errors]


async def test_fsck_finds_a_dangling_extref_and_repair_removes_it(image):
    ino, root = await linked_file(image)

    def dangle(tree) -> None:
        name = long_name(99).encode()
        tree.insert((ino, S.INODE_EXTREF, extref_hash(root, name)), pack_inode_extrefs([InodeExtref(root, 999, name)]))

    await edit(image, dangle)
    found = codes_and_messages(image)
    assert found == [("DIR_ITEM_MISMATCH", f"INODE_EXTREF of {ino} names {long_name(99).encode()!r} in {root}, "
                                           "which has no such entry")], found
    assert await repair(image, check(image)) == 1
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert (await fs.stat("/f")).st_nlink == 9 and len(disk_names(fs, ino)) == 9


async def test_fsck_finds_an_extref_naming_another_entry_and_repair_rebuilds_it_from_the_entry(image):
    """An extref whose index is another name's DIR_INDEX: mismatched, not dangling (its name is
    still an entry of the directory), so it is not dropped by itself; the entry it fails to name
    back gets its reference rebuilt in its place (it used to be left: the extref already gave
    that name). Every name is the file's again."""
    ino, root = await linked_file(image)

    def swap(tree) -> None:
        key, body = next(tree.items((ino, S.INODE_EXTREF, 0), (ino, S.INODE_EXTREF, LAST)))
        (r,) = unpack_inode_extrefs(body)
        tree.update(key, pack_inode_extrefs([r._replace(index=r.index + 1)]))

    await edit(image, swap)
    found = codes_and_messages(image)
    assert any(code == "DIR_ITEM_MISMATCH" and f"INODE_EXTREF of {ino} names" in m and "whose DIR_INDEX" in m
               for code, m in found), found
    assert all(e.fix is None for e in check(image).errors if "INODE_EXTREF" in e.message)
    await repair(image, check(image))
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert (await fs.stat("/f")).st_nlink == 9 and len(disk_names(fs, ino)) == 9
        for i in range(8):
            assert (await fs.stat("/" + long_name(i))).st_ino == ino


async def test_a_lost_extref_is_rebuilt_where_the_filesystem_puts_it(image):
    ino, root = await linked_file(image)
    async with blockemu.mount(image) as fs:
        lost = extref_items(fs, ino)[0]
    await edit(image, lambda tree: tree.delete(lost[0]))
    found = codes_and_messages(image)
    assert [c for c, _ in found] == ["DIR_ITEM_MISMATCH"] and f"no INODE_REF in inode {ino}" in found[0][1]
    assert await repair(image, check(image)) == 1
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert lost in extref_items(fs, ino)  # the INODE_REF is full: back in its INODE_EXTREF


async def test_fsck_finds_a_misfiled_extref_and_one_on_an_image_without_the_bit(image):
    ino, root = await linked_file(image)

    def misfile(tree) -> None:
        key, body = next(tree.items((ino, S.INODE_EXTREF, 0), (ino, S.INODE_EXTREF, LAST)))
        tree.delete(key)
        tree.insert((ino, S.INODE_EXTREF, key[2] + 1), body)

    await edit(image, misfile)
    assert any("whose hash is" in m for _, m in codes_and_messages(image))
    set_super(image, incompat_flags=S.INCOMPAT_ENCRYPTED_NAMES)
    assert any("lacks EXTENDED_IREF" in m for _, m in codes_and_messages(image))


# ---------------------------------------------------------------- the model

NAMES = [long_name(i) for i in range(6)]  # 240 bytes: the 4th name of an inode in a directory is an extref
PATHS = ["/" + n for n in NAMES] + ["/d/" + n for n in NAMES]
P = st.integers(0, len(PATHS) - 1)
OPS = st.lists(st.one_of(st.tuples(st.just("link"), P, P), st.tuples(st.just("link"), P, P), st.tuples(st.just("unlink"), P),
                         st.tuples(st.just("rename"), P, P), st.tuples(st.just("remount"))), min_size=8, max_size=40)


async def run_model(ops: list[tuple]) -> None:
    """link/unlink/rename against a dict model (path -> file); after a remount, each file's nlink
    and the set of names its back references hold on disk are the model's."""
    with tempfile.TemporaryDirectory() as tmp:
        image = str(Path(tmp) / "m.img")
        await blockemu.mkfs(image, size="16M", node_size="4K")
        # two files, each with names enough to fill its INODE_REF in its directory: one more
        # name there is an extref
        model = {PATHS[i]: i // len(NAMES) for i in (0, 1, 2, len(NAMES), len(NAMES) + 1, len(NAMES) + 2)}
        fs = await blockemu.mount(image)
        await fs.mkdir("/d")
        for path, file in model.items():
            if path.endswith(NAMES[0]):
                async with fs.open(path, "w") as f:
                    await f.write(path.encode())
            else:
                await fs.link(PATHS[file * len(NAMES)], path)
        inos = [(await fs.stat(PATHS[0])).st_ino, (await fs.stat(PATHS[len(NAMES)])).st_ino]
        spilled = False
        for op in ops:
            if op[0] == "remount":
                await fs.unmount()
                fs = await blockemu.mount(image)
                continue
            src = PATHS[op[1]]
            if src not in model:
                with ErrnoCheck(errno.ENOENT):
                    await getattr(fs, op[0])(*(PATHS[i] for i in op[1:]))
            elif op[0] == "unlink":
                await fs.unlink(src)
                del model[src]
            elif op[0] == "link":
                dst = PATHS[op[2]]
                if dst in model:
                    with ErrnoCheck(errno.EEXIST):
                        await fs.link(src, dst)
                else:
                    await fs.link(src, dst)
                    model[dst] = model[src]
            else:
                dst = PATHS[op[2]]
                await fs.rename(src, dst)
                if model.get(dst) != model[src]:  # two names of one file: rename does nothing (POSIX)
                    model[dst] = model.pop(src)
            spilled = spilled or any(extref_items(fs, ino) for ino in inos)
        if spilled:
            event("a name went to an INODE_EXTREF")
        await fs.unmount()
        async with blockemu.mount(image) as fs:
            dirs = {"/": (await fs.stat("/")).st_ino, "/d/": (await fs.stat("/d")).st_ino}
            assert sorted(await fs.readdir("/d")) == sorted(p[3:] for p in model if p.startswith("/d/"))
            inos: dict[int, int] = {}
            for path, file in model.items():
                s = await fs.stat(path)
                assert inos.setdefault(file, s.st_ino) == s.st_ino
                assert s.st_nlink == list(model.values()).count(file)
            for file, ino in inos.items():
                want = {(dirs[p[: p.rindex("/") + 1]], p[p.rindex("/") + 1 :].encode()) for p, f in model.items() if f == file}
                assert disk_names(fs, ino) == want
        assert_fsck_clean(image, check_data=False)


@settings(max_examples=100, deadline=None)
@given(OPS)
def test_links_unlinks_and_renames_against_a_model(ops):
    asyncio.run(run_model(ops))


async def test_names_in_extrefs_are_whole_after_every_crash_state(image, tmp_path):
    """Links that spill into INODE_EXTREFs, an unlink of an INODE_REF name and one of an extref
    name, a rename out of the directory, each followed by an fsync: a power cut anywhere
    (every crash state of the write log, in-doubt writes kept, dropped and torn) leaves an
    image fsck finds clean, holding the names of the last fsync before it or of the next."""
    crashed, names = str(tmp_path / "crashed.img"), [long_name(i) for i in range(6)]
    async with blockemu.mount(image, interval=3600) as fs:
        await fs.mkdir("/d")
        async with fs.open("/f", "w") as f:
            await f.write(b"data")
        await fs.sync()
        log = fs.vol.device.start_log(base_copy=str(tmp_path / "base.img"))
        steps = [("link", "/f", "/" + n) for n in names] + [
            ("unlink", "/" + names[0]), ("unlink", "/" + names[5]), ("rename", "/" + names[4], "/d/" + names[4])]
        snapshots, synced_at = [["f"]], [0]
        for op, *paths in steps:
            await getattr(fs, op)(*paths)
            async with fs.open("/f") as f:
                await f.fsync()  # a name changed: the fsync commits (DESIGN §9)
            snapshots.append(await names_of(fs))
            synced_at.append(len(log.entries))
    assert extref_items_of(image)
    for state in log.crash_states(random.Random(4), subsets=1):
        log.crash_image(crashed, state.upto, state.keep, state.torn, state.split)
        assert_fsck_clean(crashed, check_data=False)
        last = max(i for i, at in enumerate(synced_at) if at <= state.upto)
        async with blockemu.mount(crashed) as fs:
            got = await names_of(fs)
            assert got in (snapshots[last], snapshots[min(last + 1, len(steps))]), (str(state), got)
            assert (await fs.stat("/f")).st_nlink == len(got)


async def names_of(fs) -> list[str]:
    """The files' names in / and /d, as one sorted list."""
    return sorted([n for n in await fs.readdir("/") if n != "d"] + ["d/" + n for n in await fs.readdir("/d")])


def extref_items_of(image: str) -> int:
    """How many INODE_EXTREF items the image's fs tree holds (read back from disk)."""
    ck, _ = walked(image)
    return sum(k[1] == S.INODE_EXTREF for k in ck.keys.get(S.FS_TREE_OBJECTID, []))


async def test_unlink_of_a_name_without_its_back_reference_is_euclean(image):
    """A damaged image: an entry whose back reference is in neither item. The unlink cannot
    finish what it started (the DIR_ITEM went first), so the transaction aborts -- as btrfs
    aborts one on a missing inode ref -- and says what is wrong: EUCLEAN, not a bare lookup
    failure; the image keeps its last commit."""
    ino, root = await linked_file(image)
    name = long_name(7).encode()
    await edit(image, lambda tree: tree.delete((ino, S.INODE_EXTREF, extref_hash(root, name))))
    fs = await blockemu.mount(image)
    with ErrnoCheck(errno.EUCLEAN):
        await fs.unlink("/" + name.decode())
    with ErrnoCheck(errno.EROFS):  # the abort made the mount read-only, its unmount too
        await fs.unlink("/f")
    with ErrnoCheck(errno.EROFS):
        await fs.unmount()
    assert any(f"no INODE_REF in inode {ino}" in m for _, m in codes_and_messages(image))


async def test_a_missing_dir_index_aborts_the_unlink_and_a_taken_one_the_create(image):
    """A damaged image: a name's DIR_INDEX gone (the unlink's delete finds nothing), and a
    directory's next index already taken (the create's insert finds an item). Both are
    EUCLEAN and abort the transaction, as ``delete``/``insert`` refused them one item at a time
    -- not a silent no-op or a replace (which would drop the other name from readdir) since
    the directory's items go in one ``apply``."""
    async with blockemu.mount(image) as fs:
        for p in ("/a", "/b"):
            async with fs.open(p, "w"):
                pass
        root = (await fs.stat("/")).st_ino
    def indexes(tree) -> list:
        return [k for k, _ in tree.items((root, S.DIR_INDEX, 0), (root, S.DIR_INDEX, (1 << 64) - 1))]

    await edit(image, lambda tree: tree.delete(indexes(tree)[0]))  # /a's
    fs = await blockemu.mount(image)
    with ErrnoCheck(errno.EUCLEAN):
        await fs.unlink("/a")
    with ErrnoCheck(errno.EROFS):
        await fs.unmount()
    fs = await blockemu.mount(image)  # nothing of the unlink was committed: /a is still named
    assert (await fs.stat("/a")).st_nlink == 1 and await fs.readdir("/") == ["b"]  # its index is the edit's loss
    async with fs.open("/c", "w"):  # the directory's next index is known now: the last one + 1
        pass
    async with fs.vol.join():  # the next one taken behind its back
        last = indexes(fs.tree)[-1]
        fs.tree.insert((root, S.DIR_INDEX, last[2] + 1), fs.tree[last])
    with ErrnoCheck(errno.EUCLEAN):
        async with fs.open("/d", "w"):
            pass
    with ErrnoCheck(errno.EROFS):
        await fs.unmount()
    async with blockemu.mount(image, readonly=True) as fs:  # the aborted transaction left nothing
        assert not await fs.exists("/d") and not await fs.exists("/c") and await fs.readdir("/") == ["b"]


async def test_repair_keeps_a_name_when_the_only_one_is_dangling_in_both_items(image):
    """A damaged image: a file's one name lost its entry, and the same (directory, name) is
    also in an INODE_EXTREF. The two back references are one name, not two: "the inode keeps
    another name" must count references, not distinct names, or the repair drops both and the
    file is left with none (its data unreachable) -- what the rule is there to prevent."""
    async with blockemu.mount(image) as fs:
        async with fs.open("/g", "w") as f:
            await f.write(b"keep me")
        ino, root = (await fs.stat("/g")).st_ino, (await fs.stat("/")).st_ino
        (ref,) = unpack_inode_refs(fs.tree[(ino, S.INODE_REF, root)])

    def lose_the_entry_and_double_the_ref(tree) -> None:
        tree.delete((root, S.DIR_INDEX, ref.index))
        tree.delete((root, S.DIR_ITEM, name_hash(b"g")))
        tree.insert((ino, S.INODE_EXTREF, extref_hash(root, b"g")), pack_inode_extrefs([InodeExtref(root, 999, b"g")]))

    await edit(image, lose_the_entry_and_double_the_ref)
    await repair(image, check(image))
    async with blockemu.mount(image) as fs:
        assert disk_names(fs, ino) == {(root, b"g")}  # not dropped: it was the file's only name


async def test_a_damaged_inode_ref_body_stops_no_key_removal(image):
    """Locking needs only which directories an inode is named in: an INODE_REF's key says
    that, with no body to read. A damaged body (a name overrunning the item) of one file made
    every lock that asked about its directory's children fail with EUCLEAN, so the key removal
    stopped halfway: the other files kept their leases, and the key's secret was never wiped."""
    async with blockemu.mount(image) as fs:
        kid = await encrypted_dir(fs, "/s")
        for name in ("a", "b"):
            async with fs.open(f"/s/{name}", "w") as f:
                await f.write(b"secret")
        ino = (await fs.stat("/s/b")).st_ino
        s = (await fs.stat("/s")).st_ino

    def damage(tree) -> None:
        body = bytearray(tree[(ino, S.INODE_REF, s)])
        body[8:10] = (len(body) + 1).to_bytes(2, "little")  # name_len past the item
        tree.update((ino, S.INODE_REF, s), bytes(body))

    await edit(image, damage)
    async with blockemu.mount(image) as fs:
        await fs.add_key(KEY)
        for name in ("a", "b"):
            async with fs.open(f"/s/{name}") as f:
                assert await f.read() == b"secret"
        await fs.remove_key(kid)
        assert str(fs.key_status(kid)) == "Absent"
        assert not fs.keyring.keys  # every lease let go: the secret is wiped


async def test_repair_rebuilds_a_back_reference_over_an_undecodable_item(image):
    """An INODE_REF body that does not decode (a name overrunning the item): fsck counts none of
    its names, offers each entry's back reference rebuilt, and the repair puts it where the
    filesystem would -- which reads the item there first, and raised, so the whole repair
    stopped with nothing repaired (another file's link count too). The undecodable item is
    replaced by the names rebuilt."""
    async with blockemu.mount(image) as fs:
        for name in ("a", "b"):
            async with fs.open(f"/{name}", "w") as f:
                await f.write(b"x")
        a, b, root = [(await fs.stat(p)).st_ino for p in ("/a", "/b", "/")]

    def damage(tree) -> None:
        body = bytearray(tree[(b, S.INODE_REF, root)])
        body[8:10] = (len(body) + 1).to_bytes(2, "little")  # name_len past the item
        tree.update((b, S.INODE_REF, root), bytes(body))
        item = InodeItem.unpack(tree[(a, S.INODE_ITEM, 0)])
        tree.update((a, S.INODE_ITEM, 0), item._replace(nlink=5).pack())

    await edit(image, damage)
    report = check(image)
    assert {e.code for e in report.errors} == {"BAD_ITEM", "DIR_ITEM_MISMATCH", "NLINK_MISMATCH"}
    await repair(image, report)
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert disk_names(fs, b) == {(root, b"b")} and (await fs.stat("/a")).st_nlink == 1


async def test_a_misfiled_copy_of_a_dangling_extref_is_found_and_repair_still_runs(image):
    """The same dangling name in two INODE_EXTREFs, one under its hash and a copy under another
    key before it. fsck kept one key per (inode, directory, name) -- the last -- so the copy was
    never called misfiled, both were offered for removal as dangling under their hash, and the
    second removal found nothing: the repair raised EUCLEAN with nothing repaired."""
    ino, root = await linked_file(image)
    name = long_name(99).encode()
    h = extref_hash(root, name)

    def dangle_twice(tree) -> None:
        body = pack_inode_extrefs([InodeExtref(root, 999, name)])
        tree.insert((ino, S.INODE_EXTREF, h), body)
        tree.insert((ino, S.INODE_EXTREF, h - 1), body)

    await edit(image, dangle_twice)
    report = check(image)
    assert any(tuple(e.key) == (ino, S.INODE_EXTREF, h - 1) and "whose hash is" in e.message for e in report.errors), \
        [(e.key, e.message[:60]) for e in report.errors]
    await repair(image, report)  # raised CorruptionError
