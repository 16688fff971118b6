"""Hard links and symbolic links (what cp -a, rsync and tar need of a mount): the API, the
format (an INODE_REF item per directory holding every name the inode has there; a link's
target as its file data), crash atomicity of a new symlink, and fsck's checks of both."""
from __future__ import annotations

import asyncio
import errno
import shutil
import stat

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.errors import CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import (
    InodeRef,
    name_hash,
    pack_dir_entries,
    pack_inode_refs,
    unpack_dir_entries,
    unpack_inode_refs,
)
from tests.util import KEY, ErrnoCheck, assert_fsck_clean, encrypted_dir, set_super


@pytest.fixture
async def image(tmp_path):
    path = str(tmp_path / "fs.img")
    await blockemu.mkfs(path, size="64M")
    return path




async def read(fs, path: str) -> bytes:
    async with fs.open(path) as f:
        return await f.read()


async def test_hard_links_in_one_and_in_two_directories_survive_remount(image):
    async with blockemu.mount(image) as fs:
        await fs.mkdir("/d")
        async with fs.open("/a", "w") as f:
            await f.write(b"shared")
        await fs.link("/a", "/b")  # same directory: one INODE_REF item, two names
        await fs.link("/a", "/d/c")
        async with fs.open("/b", "a") as f:
            await f.write(b"+more")
        assert (await fs.stat("/a")).st_nlink == 3
        assert len({(await fs.stat(p)).st_ino for p in ("/a", "/b", "/d/c")}) == 1
        ino = (await fs.stat("/a")).st_ino
        assert [r.name for r in unpack_inode_refs(fs.tree[(ino, S.INODE_REF, (await fs.stat("/")).st_ino)])] == [b"a", b"b"]
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert await read(fs, "/d/c") == b"shared+more"
        await fs.unlink("/a")
        assert (await fs.stat("/b")).st_nlink == 2
        assert fs.path_of(ino) == "/b"
        await fs.rename("/b", "/d/c")  # two names of one inode: rename does nothing (POSIX)
        assert sorted(await fs.readdir("/")) == ["b", "d"]
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        await fs.unlink("/b")
        assert await read(fs, "/d/c") == b"shared+more"
        await fs.unlink("/d/c")
        assert ino not in fs.inodes
    assert_fsck_clean(image)


async def test_link_errors(image):
    async with blockemu.mount(image) as fs:
        await fs.mkdir("/d")
        async with fs.open("/f", "w"):
            pass
        with ErrnoCheck(errno.EPERM):
            await fs.link("/d", "/d2")
        with ErrnoCheck(errno.EEXIST):
            await fs.link("/f", "/d")
        with ErrnoCheck(errno.ENOENT):
            await fs.link("/nothing", "/x")
        await encrypted_dir(fs, "/enc")
        with ErrnoCheck(errno.EXDEV):  # fscrypt: only files of the same policy enter
            await fs.link("/f", "/enc/f")
    assert_fsck_clean(image)


async def test_names_past_what_one_item_holds_are_refused_before_any_change(image):
    """On an image without EXTENDED_IREF (made before mkfs set it) all of an inode's names in
    one directory live in one INODE_REF item; on any image all names of one hash live in one
    DIR_ITEM. Past the largest item a leaf holds, link(2) found out halfway (the tree refused
    the insert) and aborted the transaction: the mount went read-only. Now link and rename say
    EMLINK (btrfs without extended refs says the same) and EOVERFLOW, before any change, and
    the mount goes on -- and, as btrfs, nothing turns the bit on by itself."""
    names = [("n%03d" % i).encode() + b"x" * 200 for i in range(40)]
    set_super(image, incompat_flags=S.INCOMPAT_ENCRYPTED_NAMES)
    async with blockemu.mount(image) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"data")
        linked = 0
        with ErrnoCheck(errno.EMLINK):
            for name in names:
                await fs.link("/f", "/" + name.decode())
                linked += 1
        assert 10 < linked < len(names)
        with ErrnoCheck(errno.EMLINK):  # a rename that adds a name to the full item
            await fs.rename("/f", "/" + "y" * 250)
        await fs.rename("/f", "/g")  # one that swaps a name for a shorter one fits
        # names of one hash (as a hostile image may hold): a DIR_ITEM a few bytes short of full
        await fs.mkdir("/d")
        async with fs.vol.join():
            d = fs._resolve("/d")
            key = (d.ino, S.DIR_ITEM, name_hash(b"a"))
            entry = unpack_dir_entries(fs.tree[(fs._resolve("/").ino, S.DIR_ITEM, name_hash(b"g"))])[0]
            filler = [entry._replace(name=b"%03d" % i + b"z" * (250 if i else 47)) for i in range(15)]
            fs.tree.insert(key, pack_dir_entries(filler))
        with ErrnoCheck(errno.EOVERFLOW):
            await fs.mkdir("/d/a")
        async with fs.vol.join():
            fs.tree.delete(key)
        await fs.mkdir("/d/a")  # the mount is still writable
        assert len(await fs.readdir("/")) == linked + 2  # the links, /g and /d
    async with blockemu.mount(image) as fs:
        assert await read(fs, "/g") == b"data"
        assert (await fs.stat("/g")).st_nlink == linked + 1
        assert not fs.vol.sb.incompat_flags & S.INCOMPAT_EXTENDED_IREF
    assert_fsck_clean(image)


async def test_symlinks_plain_and_encrypted(image):
    async with blockemu.mount(image) as fs:
        await fs.symlink("../some/where", "/s")
        kid = await encrypted_dir(fs, "/enc")
        await fs.symlink("secret-target", "/enc/s")
        s = await fs.stat("/s")
        assert stat.S_ISLNK(s.st_mode) and s.st_size == len("../some/where")
        with ErrnoCheck(errno.ELOOP):  # the API never follows a link
            await fs.open("/s")
        with ErrnoCheck(errno.EEXIST):
            await fs.symlink("x", "/s")
        with ErrnoCheck(errno.ENAMETOOLONG):
            await fs.symlink("x" * 4096, "/long")
        with ErrnoCheck(errno.EINVAL):
            await fs.readlink("/enc")
        await fs.remove_key(kid)
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        assert await fs.readlink("/s") == "../some/where"
        with ErrnoCheck(errno.ENOENT):  # without the key the real name is not there (fscrypt, generic/580)
            await fs.readlink("/enc/s")
        (nokey,) = await fs.readdir("/enc")
        target = await fs.readlink(f"/enc/{nokey}")  # by its no-key name: the target's no-key form
        assert "secret" not in target and len(target) > 16
        await fs.add_key(KEY)
        assert await fs.readlink("/enc/s") == "secret-target"
        await fs.unlink("/s")
        assert sorted(await fs.readdir("/")) == ["enc"]
    assert_fsck_clean(image)


async def test_a_symlink_appears_whole_or_not_at_all(image, tmp_path):
    """The name is added only once the target is written back: a commit made while the target
    is on its way down holds an orphan (deleted at the next mount), never a link without target."""
    crashed = str(tmp_path / "crashed.img")
    async with blockemu.mount(image) as fs:
        flush, entered, go = fs.writeback.flush_inode, asyncio.Event(), asyncio.Event()

        async def held_flush(inode):
            entered.set()
            await go.wait()
            await flush(inode)
        fs.writeback.flush_inode = held_flush
        task = asyncio.create_task(fs.symlink("target", "/s"))
        await entered.wait()
        await fs.vol.commit()
        shutil.copyfile(image, crashed)  # the image as a power cut now would leave it
        go.set()
        await task
    assert_fsck_clean(crashed)
    async with blockemu.mount(crashed) as fs:
        assert await fs.readdir("/") == []
    assert_fsck_clean(crashed)
    async with blockemu.mount(image) as fs:
        assert await fs.readlink("/s") == "target"


async def test_fsck_catches_an_entry_type_that_contradicts_the_inode(image):
    async with blockemu.mount(image) as fs:
        await fs.symlink("t", "/s")
        root = (await fs.stat("/")).st_ino
        async with fs.vol.join():
            key = (root, S.DIR_ITEM, name_hash(b"s"))
            fs.tree.update(key, pack_dir_entries([e._replace(type=S.FT_REG_FILE) for e in unpack_dir_entries(fs.tree[key])]))
            idx = next(k for k, _ in fs.tree.items((root, S.DIR_INDEX, 0), (root, S.DIR_INDEX, (1 << 64) - 1)))
            fs.tree.update(idx, pack_dir_entries([e._replace(type=S.FT_REG_FILE) for e in unpack_dir_entries(fs.tree[idx])]))
    report = check(image)
    assert [e.code for e in report.errors] == ["DIR_ITEM_MISMATCH"]
    assert "has type 1" in report.errors[0].message


async def test_fsck_catches_a_hard_linked_directory(image):
    async with blockemu.mount(image) as fs:
        await fs.mkdir("/d")
        await fs.mkdir("/e")
        d = fs.inode((await fs.stat("/d")).st_ino)
        e = fs.inode((await fs.stat("/e")).st_ino)
        async with fs.vol.join():
            fs._add_entry(e, b"again", d)  # what link() refuses to do
            e.item = e.item._replace(nlink=e.item.nlink + 1)
            fs.save_inode(e)
    codes = [x.code for x in check(image).errors]
    assert "NLINK_MISMATCH" in codes


def test_inode_refs_round_trip_and_refuse_hostile_bodies():
    refs = [InodeRef(2, b"a"), InodeRef(7, b"other-name")]
    assert unpack_inode_refs(pack_inode_refs(refs)) == refs
    body = pack_inode_refs(refs)
    for bad in (b"", body[:5], body[:-1], body + b"\x00", InodeRef(3, b"").pack()):
        with pytest.raises(CorruptionError):
            unpack_inode_refs(bad)
