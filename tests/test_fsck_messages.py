"""What fsck's findings say: where the damage is, in the words a user acts on."""
from __future__ import annotations

import asyncio

import blockemu
from blockemu.check.fsck import check
from tests.util import KEY, encrypted_dir, flip, fsynced_then_cut


async def two_files(path: str) -> dict:
    """/d/plain and an encrypted /e/secret, 3 sectors each: each file's (inode, disk_bytenr), and
    under "nokey" the name ls shows for /e/secret without the key."""
    await blockemu.mkfs(path, size="32M")
    out = {}
    async with blockemu.mount(path) as fs:
        await fs.mkdir("/d")
        await encrypted_dir(fs, "/e")
        for name in ("/d/plain", "/e/secret"):
            async with fs.open(name, "w") as f:
                await f.write(b"x" * 12288)
            await fs.sync()  # written back: the extent is placed
            ino = (await fs.stat(name)).st_ino
            out[name] = (ino, next(iter(fs.extents.mappings(ino))).extent.disk_bytenr)
    async with blockemu.mount(path) as fs:  # no key: the names ls shows
        out["nokey"] = (await fs.readdir("/e"))[0]
    return out


def test_a_data_checksum_mismatch_names_the_file_not_only_the_sector(tmp_path):
    """CSUM_MISMATCH said "data sector N": which file to restore was left to the user."""
    img = str(tmp_path / "c.img")
    files = asyncio.run(two_files(img))
    for name in ("/d/plain", "/e/secret"):
        flip(img, files[name][1] + 4096 + 10)  # the second sector of each
    found = [e.message for e in check(img, check_data=True).errors if e.code == "CSUM_MISMATCH"]
    (ino_p, at_p), (ino_s, at_s) = files["/d/plain"], files["/e/secret"]
    assert len(found) == 2, found
    found.sort(key=lambda m: "/d/plain" not in m)  # in address order, wherever the allocator put each file
    assert found[0].startswith(f"data sector {at_p + 4096} (inode {ino_p} at file offset 4096: /d/plain): checksum ")
    assert found[1].startswith(f"data sector {at_s + 4096} (inode {ino_s} at file offset 4096: "
                               f"/e/{files['nokey']}): checksum ")


def test_with_the_key_a_data_checksum_mismatch_names_the_encrypted_file_by_its_name(tmp_path):
    """With the directory's key (fsck --key-file) the file is named as the user knows it, not by
    its no-key name; another key names it as without one."""
    img = str(tmp_path / "c.img")
    files = asyncio.run(two_files(img))
    flip(img, files["/e/secret"][1] + 4096 + 10)
    named = [e.message for e in check(img, check_data=True, key=KEY).errors if e.code == "CSUM_MISMATCH"]
    assert len(named) == 1 and ": /e/secret): checksum " in named[0], named
    other = [e.message for e in check(img, check_data=True, key=bytes(64)).errors if e.code == "CSUM_MISMATCH"]
    assert len(other) == 1 and f": /e/{files['nokey']}): checksum " in other[0], other


def test_a_tree_block_that_does_not_decode_is_not_also_called_unreferenced(tmp_path):
    """A flipped byte in the fs tree's root leaf gave two findings for one block: its checksum
    mismatch, and "METADATA_ITEM for block N, which no tree references" -- false, the root tree
    references it; the walk only could not read it."""
    from blockemu.check.inspect import dump_tree

    img = str(tmp_path / "t.img")
    asyncio.run(blockemu.mkfs(img, size="32M"))
    (leaf,) = [b["bytenr"] for b in dump_tree(img, ["fs"])]
    flip(img, leaf + 200)
    errors = check(img).errors
    assert [e.code for e in errors if e.bytenr == leaf] == ["CSUM_MISMATCH"], [e.message for e in errors]


def test_a_damaged_fs_tree_leaves_a_sound_fsync_log_sound(tmp_path):
    """A byte dd'ed into the fs tree's leaf of an image holding an fsync log made fsck add
    "[BAD_LOG_ITEM] log tree: inode N is not in the fs tree" and "note: the log is damaged:
    `blockemu rescue zero-log` drops it": the log was sound -- the inode sat in the block fsck
    could not read -- and zero-log would have dropped the fsync and left the damage."""
    from blockemu.check.inspect import dump_tree

    img = str(tmp_path / "l.img")
    asyncio.run(fsynced_then_cut(img))
    assert check(img).stats["log_items"] > 0
    (leaf,) = dump_tree(img, ["fs"])
    flip(img, leaf["bytenr"] + 300)
    report = check(img)
    assert [e.code for e in report.errors][:1] == ["CSUM_MISMATCH"]
    assert not [e.message for e in report.errors if e.tree == "log"]
    assert not [n for n in report.notes if "zero-log" in n], report.notes
