"""Hostile images (issue 11 item 3): structures with valid checksums that lie -- a DAG instead of
a tree, a bad free-space record, huge sizes and lengths -- give every command a clear one-line
corruption error within bounded time and memory, never a traceback, a hang or a wrong listing.

Each image is the fuzz campaign's base image (blockemu fuzz, blockemu/cli/fuzz.py) with one targeted change. The
commands run in this process through the CLI's ``main``, under an alarm: code that would run
away fails the test with ``Hang`` instead of stalling the suite.
"""
from __future__ import annotations

import errno
import io
import json
import random
import signal
import sys
from pathlib import Path

import pytest

import blockemu
from blockemu.cli import fuzz as fz
from blockemu.cli.main import main
from blockemu.ondisk import structs as S
from blockemu.ondisk.csum import csum_size
from blockemu.ondisk.fast import FILE_EXTENT_ITEM, INODE_ITEM
from tests.util import ErrnoCheck

U64 = (1 << 64) - 1
MAX_FILE_SIZE = (1 << 63) - 1  # SPEC: the largest i_size


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> fz.Base:
    d = tmp_path_factory.mktemp("hostile")
    key_file = d / "key"
    key_file.write_bytes(fz.KEY)
    path = str(d / "base.img")
    import asyncio
    asyncio.run(fz.populated(path, 7, size="48M", files=8, max_file=20_000))
    return fz.load_base(path, str(key_file))


def cli(capsys, *argv: str, seconds: int = 10) -> tuple[int, str, str]:
    """The CLI in this process under an alarm; (exit code, stdout, stderr)."""
    old = signal.signal(signal.SIGALRM, fz._alarm)
    signal.alarm(seconds)
    try:
        rc = main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def image(base: fz.Base, tmp_path: Path, patches: list[tuple[int, bytes]]) -> str:
    path = str(tmp_path / "m.img")
    base.write(path, patches)
    return path


def fsck_json(capsys, path: str, *extra: str) -> tuple[int, dict]:
    rc, out, _ = cli(capsys, "fsck", "--json", path, *extra)
    return rc, json.loads(out)


def edit_item(base: fz.Base, key: tuple[int, int, int], fmt, index: int, value: int) -> list[tuple[int, bytes]]:
    """Set field ``index`` (of struct ``fmt``) of the fs-tree item ``key``."""
    bytenr = next(b for b in base.blocks_of(lambda t, lvl: t == "fs" and lvl == 0) if key in base.block(b).keys)
    b = base.block(bytenr)
    slot = b.keys.index(key)
    body = bytearray(b.values[slot])
    v = list(fmt.unpack_from(body, 0))
    v[index] = value
    fmt.pack_into(body, 0, *v)
    b.values[slot] = bytes(body)
    return fz._patch(base, b)


def inode_of(capsys, base: fz.Base, path: str) -> int:
    rc, out, _ = cli(capsys, "ls", "--json", "--key-file", base.key_file, base.path, path)
    return json.loads(out)[0]["ino"]


# ------------------------------------------------------------------ each block reached once


def test_dag_tower_ls_and_inspect_stop_at_the_second_visit(base, tmp_path, capsys):
    """Two levels of full nodes, every slot at the one below: 121^2 paths to the root directory's
    leaf. ls listed each name thousands of times and inspect grew without bound."""
    path = image(base, tmp_path, fz.m_dag_tower(base, random.Random(0), depth=2))
    rc, out, err = cli(capsys, "ls", path, "/")
    assert rc == 1 and out == ""
    assert err.startswith("blockemu: ls: tree block ") and "reached twice" in err and err.count("\n") == 1
    rc, out, err = cli(capsys, "inspect", "dump-tree", path, "--tree", "fs")
    assert rc == 1 and "reached twice" in err
    rc, report = fsck_json(capsys, path)
    assert rc == 4 and "SHARED_TREE_BLOCK" in {e["code"] for e in report["errors"]}


def test_fsck_names_a_shared_child(base, tmp_path, capsys):
    b = base.block(base.roots["fs"])
    b.ptrs[-1] = b.ptrs[0]
    rc, report = fsck_json(capsys, image(base, tmp_path, fz._patch(base, b)))
    shared = [e for e in report["errors"] if e["code"] == "SHARED_TREE_BLOCK"]
    assert rc == 4 and shared and shared[0]["bytenr"] == b.ptrs[0][0] and shared[0]["tree"] == "fs"


def test_a_loop_to_the_root_is_caught(base, tmp_path, capsys):
    b = base.block(base.roots["fs"])
    b.ptrs[1] = (b.bytenr, b.generation)
    path = image(base, tmp_path, fz._patch(base, b))
    rc, _, err = cli(capsys, "inspect", "dump-tree", path)
    assert rc == 1 and f"tree block {b.bytenr}: reached twice" in err


# ------------------------------------------------------------------ the free-space record


def free_space_with(base: fz.Base, change) -> list[tuple[int, bytes]]:
    """The free-space leaf with its items' keys passed through ``change`` (a list -> list)."""
    fst = base.block(base.roots["free-space"])
    items = change(list(zip(fst.keys, fst.values)))
    fst.keys, fst.values = map(list, zip(*sorted(items)))
    fst.recount()
    return fz._patch(base, fst)


def test_free_extent_of_2_62_refuses_a_writable_mount_with_the_fsck_hint(base, tmp_path, capsys):
    """It crashed ls and cat at mount with ``ValueError: double free``. ls and cat now mount
    read-only and never load the record; a writable mount checks it and refuses."""
    patches = free_space_with(base, lambda items: [((k[0], k[1], 1 << 62), v) for k, v in items[:1]] + items[1:])
    path = image(base, tmp_path, patches)
    rc, out, _ = cli(capsys, "ls", path, "/")
    assert rc == 0 and out.split() == ["e", "p"]
    rc, out, err = cli(capsys, "mkdir", path, "/d")
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("blockemu: mkdir: free-space record: extent [") and "run blockemu fsck --repair" in err, err
    rc, report = fsck_json(capsys, path, "--repair")
    assert rc == 1 and report["clean"], report
    assert cli(capsys, "mkdir", path, "/d")[0] == 0


def test_a_damaged_free_space_tree_block_names_the_tree_and_the_repair(base, tmp_path, capsys):
    """A free-space tree block failing its checksum refused a writable mount with the bare "tree
    block N: checksum mismatch": the tree is a cache of the extent tree, which fsck --repair
    rebuilds, so the line says which tree and that; reads need no record and go on."""
    at = base.roots["free-space"]
    path = image(base, tmp_path, [(at + 200, bytes([base.raw[at][200] ^ 0xFF]))])
    rc, out, _ = cli(capsys, "ls", path, "/")
    assert rc == 0 and out.split() == ["e", "p"]
    rc, out, err = cli(capsys, "mkdir", path, "/d")
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"blockemu: mkdir: free-space tree: tree block {at}: checksum mismatch") and \
        err.endswith("; run blockemu fsck --repair to rebuild it\n"), err
    rc, report = fsck_json(capsys, path, "--repair")
    assert rc == 1 and report["clean"], report
    assert cli(capsys, "mkdir", path, "/d")[0] == 0


@pytest.mark.parametrize("tree", ["root", "fs"])
def test_a_stale_root_block_is_refused_as_its_parent_transid_says(base, tmp_path, capsys, tree):
    """A tree's root block of an older generation than its parent (the superblock, a ROOT_ITEM)
    records -- what a device that dropped a flush leaves where a commit reused the address
    (``stress --faults nobarrier,cut=40``: the superblock of generation 4 over the root tree of
    generation 1). Its checksum is good, and every open read it as the tree: ls showed generation
    1's empty root, and put committed over it while fsck called it damaged. As btrfs, the
    generation is checked: every command refuses (at the open, naming fsck, for the root tree)."""
    at = base.sb.root if tree == "root" else base.roots["fs"]
    block = base.block(at)
    block.generation -= 1
    path = image(base, tmp_path, fz._patch(base, block))
    for argv in (("ls", path, "/"), ("mkdir", path, "/d")):
        rc, out, err = cli(capsys, *argv)
        assert rc == 1 and out == "" and f"tree block {at}: parent transid verify failed, wanted " in err, err
        assert tree == "fs" or f"blockemu fsck {path}" in err, err  # (the open's line; fs's is read later)
    assert fsck_json(capsys, path)[0] == 4


def test_free_extent_over_a_tree_block_refuses_a_writable_mount(base, tmp_path, capsys):
    fs_root = base.roots["fs"]
    patches = free_space_with(base, lambda items: items + [((fs_root, S.FREE_SPACE_EXTENT, base.sb.nodesize), b"")])
    rc, _, err = cli(capsys, "mkdir", image(base, tmp_path, patches), "/d")
    assert rc == 1 and f"extent [{fs_root}, +{base.sb.nodesize}) overlaps allocated space" in err


def test_a_tree_block_the_extent_tree_forgot_in_free_space_is_caught_when_read(base, tmp_path, capsys):
    """The extent tree lost the fs root's METADATA_ITEM and the free-space record took the block:
    the record looks consistent, but the first read of the block refuses to go on (a commit would
    otherwise hand the block out again and overwrite it)."""
    fs_root = base.roots["fs"]
    bytenr, slot = next((b, i) for b in base.blocks_of(lambda t, lvl: t == "extent" and lvl == 0)
                        for i, k in enumerate(base.block(b).keys) if k[:2] == (fs_root, S.METADATA_ITEM))
    ext = base.block(bytenr)
    del ext.keys[slot], ext.values[slot]
    ext.recount()
    patches = fz._patch(base, ext) + free_space_with(
        base, lambda items: items + [((fs_root, S.FREE_SPACE_EXTENT, base.sb.nodesize), b"")])
    rc, _, err = cli(capsys, "mkdir", image(base, tmp_path, patches), "/d")
    assert rc == 1 and f"tree block {fs_root} lies in space the free-space record calls free" in err


def test_repair_over_overlapping_extents_gives_up_without_a_traceback(base, tmp_path, capsys):
    """A data extent grown over its neighbour: the free-space rebuild cannot place both."""
    found = fz._items_of(base, "extent", S.EXTENT_ITEM)
    keys = sorted(base.block(b).keys[i] for b, i in found)
    first, second = next((a, b) for a, b in zip(keys, keys[1:]) if a[0] + a[2] == b[0])
    bytenr = next(b for b, i in found if base.block(b).keys[i] == first)
    blk = base.block(bytenr)
    i = blk.keys.index(first)
    blk.keys[i] = (first[0], first[1], first[2] + S.SECTOR_SIZE)
    path = image(base, tmp_path, fz._patch(base, blk))
    rc, report = fsck_json(capsys, path, "--repair")
    assert rc == 4 and "EXTENT_OVERLAP" in {e["code"] for e in report["errors"]}


# ------------------------------------------------------------------ sizes and lengths


def test_fsck_checks_ram_bytes(base, tmp_path, capsys):
    key = (inode_of(capsys, base, "/p/f1"), S.EXTENT_DATA, 0)
    patches = edit_item(base, key, FILE_EXTENT_ITEM, 1, U64)
    rc, report = fsck_json(capsys, image(base, tmp_path, patches))
    bad = [e for e in report["errors"] if e["code"] == "BAD_FILE_EXTENT"]
    assert rc == 4 and bad and f"ram_bytes {U64}" in bad[0]["message"] and bad[0]["key"] == list(key)


def test_inode_size_past_2_63_is_corruption_and_cat_says_so(base, tmp_path, capsys):
    """A 2^64-1 size: fsck flags it, and cat stops at once instead of streaming zeros."""
    ino = inode_of(capsys, base, "/p/f2")
    path = image(base, tmp_path, edit_item(base, (ino, S.INODE_ITEM, 0), INODE_ITEM, 2, U64))
    rc, report = fsck_json(capsys, path)
    assert rc == 4 and any(e["code"] == "ISIZE_MISMATCH" and "exceeds the largest file size" in e["message"]
                           for e in report["errors"])
    old, sys.stdout = sys.stdout, io.TextIOWrapper(io.BufferedWriter(fz.HeadSink(1 << 20)), write_through=True)
    try:  # as ``| head -c 1M``: the old code streamed zeros without end
        rc, _, err = cli(capsys, "cat", path, "/p/f2")
    finally:
        sys.stdout = old
    assert rc == 1 and f"inode {ino}: size {U64} exceeds the largest file size" in err


def test_a_sparse_tail_up_to_2_63_minus_1_is_legal(base, tmp_path, capsys):
    """The rule in SPEC: a size past the extents, even past the device, is a sparse tail."""
    ino = inode_of(capsys, base, "/e/f3")
    path = image(base, tmp_path, edit_item(base, (ino, S.INODE_ITEM, 0), INODE_ITEM, 2, MAX_FILE_SIZE))
    rc, report = fsck_json(capsys, path)
    assert rc == 0, report
    run = fz.run_command(["cat", "--key-file", base.key_file, path, "/e/f3"])  # as ``| head -c 4M``
    assert (run["outcome"], run["rc"]) == ("ok", 141), run["detail"]  # 141: the pipe broke, as SIGPIPE ends a process


async def test_writes_and_truncates_past_2_63_minus_1_fail_with_efbig(tmp_path):
    path = str(tmp_path / "a.img")
    await blockemu.mkfs(path, size="16M")
    async with blockemu.mount(path) as fs:
        async with fs.open("/f", "w") as f:
            with ErrnoCheck(errno.EFBIG):
                await f.truncate(MAX_FILE_SIZE + 1)
            with ErrnoCheck(errno.EFBIG):
                await f.pwrite(b"xy", MAX_FILE_SIZE - 1)
            await f.truncate(MAX_FILE_SIZE)
            assert (await fs.stat("/f")).st_size == MAX_FILE_SIZE
    assert (await blockemu.fsck(path)).clean


def test_a_huge_extent_length_does_not_make_fsck_walk_it(base, tmp_path, capsys):
    """An EXTENT_ITEM of length 2^62: the checksum pass used to walk its 2^50 sectors."""
    bytenr, slot = fz._items_of(base, "extent", S.EXTENT_ITEM)[0]
    blk = base.block(bytenr)
    k = blk.keys[slot]
    blk.keys[slot] = (k[0], k[1], 1 << 62)
    rc, report = fsck_json(capsys, image(base, tmp_path, fz._patch(base, blk)))
    assert rc == 4 and "EXTENT_BAD_RANGE" in {e["code"] for e in report["errors"]}


async def test_a_device_sized_extent_costs_fsck_no_more_than_a_small_one(tmp_path, capsys):
    """On a 1 TiB sparse image, an EXTENT_ITEM claiming 256 GiB without checksums: fsck walked (and
    kept a set of) its 67 million sectors and reported each; now one MISSING_CSUM for the extent."""
    path = str(tmp_path / "big.img")
    await blockemu.mkfs(path, size="1T")
    async with blockemu.mount(path) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x" * 8192)
    big = fz.load_base(path, "")
    bytenr, slot = fz._items_of(big, "extent", S.EXTENT_ITEM)[0]
    blk = big.block(bytenr)
    start, length = 65 << 20, (256 << 30) - (65 << 20)
    blk.keys.append((start, S.EXTENT_ITEM, length))
    blk.values.append(blk.values[slot])
    blk.keys, blk.values = map(list, zip(*sorted(zip(blk.keys, blk.values))))
    blk.recount()
    with open(path, "r+b") as f:
        f.seek(bytenr)
        f.write(big.encode(blk))
    rc, report = fsck_json(capsys, path)
    missing = [e for e in report["errors"] if e["code"] == "MISSING_CSUM"]
    assert rc == 4 and len(missing) == 1 and f"of its {length // 4096} sectors" in missing[0]["message"]


def test_repair_offers_no_back_reference_it_cannot_store(base, tmp_path, capsys):
    """A file extent whose ``offset`` is 2^63 implies a back reference at a negative file offset:
    repair used to try to pack it (struct.error traceback); now the mismatch is left reported."""
    key = (inode_of(capsys, base, "/p/f1"), S.EXTENT_DATA, 0)
    rc, report = fsck_json(capsys, image(base, tmp_path, edit_item(base, key, FILE_EXTENT_ITEM, 8, 1 << 63)), "--repair")
    assert rc == 4 and "EXTENT_REF_MISMATCH" in {e["code"] for e in report["errors"]}


def test_overlapping_checksum_items_are_named_sector_by_sector(base, tmp_path, capsys):
    """fsck takes checksum items as ranges only while each ends before the next begins; an item
    overlapping another sends it back sector by sector, which names each sector checksummed twice."""
    size = csum_size(base.sb.csum_type)
    b, slot = next((b, i) for b in map(base.block, base.blocks_of(lambda t, lvl: t == "csum" and lvl == 0))
                   for i, v in enumerate(b.values) if len(v) >= 2 * size)
    oid, typ, start = b.keys[slot]
    sectors = len(b.values[slot]) // size
    items = dict(zip(b.keys, b.values))
    items[(oid, typ, start + S.SECTOR_SIZE)] = b.values[slot][size:]  # a copy of all but the first sector
    b.keys, b.values = map(list, zip(*sorted(items.items())))
    rc, report = fsck_json(capsys, image(base, tmp_path, fz._patch(base, b)))
    assert rc == 4
    assert [e["bytenr"] for e in report["errors"] if e["code"] == "CSUM_OVERLAP"] == \
        [start + i * S.SECTOR_SIZE for i in range(1, sectors)]
