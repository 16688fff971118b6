"""``blockemu fuzz``: fuzz campaigns against hostile images (formerly tools/fuzz_fsck.py).

Byte flips: flip random bytes in the metadata blocks of a populated image and check that fsck
reports an error (exit 4 or 8) every time, without a traceback or a hang.

    blockemu fuzz [--trials N] [--seed S] [--recsum] [--jobs N | --ray [ADDRESS]]

--recsum recomputes the block checksum after the flip, so the damage reaches the parsers
and cross-checks instead of stopping at the checksum; some such flips are legitimately
undetectable (a timestamp), so the campaign reports a detection rate, not a pass/fail.

Structural: valid checksums over hostile structures (shared children, loops, lying levels,
huge counts, lengths and offsets, pointers out of range, a bad free-space record, a lying
superblock), each image run through ls, cat, mkdir, inspect dump-tree, fsck and fsck --repair with
a 10 s limit per command; it fails on any traceback, any hang, or an RSS growth over --max-rss
(over the worker process's own size, which a pool or Ray worker, or pytest, makes large).

    blockemu fuzz --structural [--images 2000] [--seed S] [--max-rss 300] [--jobs N | --ray [ADDRESS]]

Both are campaigns (blockemu.workload.campaign): a shard is a range of trials or images, each
with its own seeded generator (``"{seed}:{index}"``), so a shard gives the same outcomes in
any worker; each worker builds the base image from the seed itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import blockemu
from blockemu.check.fsck import check
from blockemu.check.inspect import dump_tree
from blockemu.cli.main import main
from blockemu.device.image import ImageFile
from blockemu.errors import BlockemuError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.block import TreeBlock, body_size, decode_block, encode_block, max_ptrs
from blockemu.ondisk.csum import CSUM_FIELD
from blockemu.ondisk.fast import (
    DIR_ITEM_HEAD,
    EXTENT_ITEM,
    FILE_EXTENT_ITEM,
    HEADER,
    HEADER_SIZE,
    INODE_ITEM,
    ITEM,
    ITEM_SIZE,
)
from blockemu.ondisk.items import RootItem
from blockemu.ondisk.structs import SUPER_OFFSETS
from blockemu.ondisk.superblock import SuperInfo, primary_write
from blockemu.workload.campaign import Campaign, Executor, LocalExecutor, Shard, ranges, run_campaign

KEY = bytes(range(1, 65))
FILES = 24  # per directory, in the structural campaign's base image


async def populated(path: str, seed: int, *, size: str = "96M", files: int = 60, max_file: int = 200_000) -> None:
    """An encrypted directory /e and a plain one /p of ``files`` random files each."""
    rng = random.Random(seed)
    await blockemu.mkfs(path, size=size, node_size="4K")
    async with blockemu.mount(path, interval=3600, max_extent=64 << 10) as fs:
        kid = await fs.add_key(KEY)
        await fs.mkdir("/e")
        await fs.set_policy("/e", kid)
        for d in ("/e", "/p"):
            if d == "/p":
                await fs.mkdir(d)
            for i in range(files):
                async with fs.open(f"{d}/f{i}", "w") as f:
                    await f.write(rng.randbytes(rng.randrange(1, max_file)))


def flip(base: str, work: str, blocks: list[int], nodesize: int, csum_type: int, rng: random.Random,
         recsum: bool) -> tuple[int, int]:
    """``work``: ``base`` with one bit of one of its tree ``blocks`` flipped (and with ``recsum``,
    the block's checksum made right again); returns (block, byte)."""
    shutil.copy(base, work)
    bytenr = rng.choice(blocks)
    pos = rng.randrange(nodesize)
    with open(work, "r+b") as f:
        f.seek(bytenr)
        buf = bytearray(f.read(nodesize))
        buf[pos] ^= 1 << rng.randrange(8)
        if recsum:
            buf[:32] = csums.field(csum_type, bytes(buf[32:]))
        f.seek(bytenr)
        f.write(buf)
    return bytenr, pos


def trial(base: str, work: str, blocks: list[int], nodesize: int, csum_type: int, rng: random.Random,
          recsum: bool) -> tuple[str, str]:
    """One flip; returns (outcome, detail): detected / operational / missed / crash."""
    bytenr, pos = flip(base, work, blocks, nodesize, csum_type, rng, recsum)
    try:
        report = check(work)
    except BlockemuError as e:
        return "operational", str(e)
    except Exception:  # noqa: BLE001 - the campaign exists to find these
        return "crash", traceback.format_exc()
    return ("missed", f"block {bytenr} byte {pos}") if report.clean else ("detected", report.errors[0].code)


def _flip_shard(args: tuple) -> dict[str, Any]:
    """Trials [lo, hi) on the seed's base image, built here; trial ``i`` draws from ``"{seed}:{i}"``."""
    seed, recsum, lo, hi = args
    with tempfile.TemporaryDirectory() as d:
        base, work = os.path.join(d, "base.img"), os.path.join(d, "work.img")
        asyncio.run(populated(base, seed))
        blocks = [b["bytenr"] for b in dump_tree(base)]
        with ImageFile.open(base) as img:
            sb = img.best_super()
        counts = {"detected": 0, "operational": 0, "missed": 0, "crash": 0}
        failures = []
        for i in range(lo, hi):
            outcome, detail = trial(base, work, blocks, sb.nodesize, sb.csum_type, random.Random(f"{seed}:{i}"), recsum)
            counts[outcome] += 1
            if outcome == "crash" or (outcome == "missed" and not recsum):  # a raw flip must always be caught
                failures.append({"unit": i, "message": f"{outcome.upper()} in trial {i}: {detail}"})
    return {"units": hi - lo, "states": hi - lo, "counts": counts, "failures": failures, "blocks": len(blocks)}


def flip_campaign(trials: int, seed: int, recsum: bool, *, only: tuple[int, int] | None = None,
                  shard_size: int = 100) -> Campaign:
    """Byte flips: shards of ``shard_size`` trials (each shard builds its base image once)."""
    lo, hi = only or (0, trials)
    shards = [Shard(f"trials {lo + a}..{lo + b}", (seed, recsum, lo + a, lo + b)) for a, b in ranges(hi - lo, shard_size)]

    def reproduce(f: dict[str, Any]) -> str:
        return f"blockemu fuzz --seed {seed}{' --recsum' if recsum else ''} --only {f['unit']} --jobs 1"
    return Campaign("fuzz", {"mode": "recsum" if recsum else "raw", "seed": seed, "range": [lo, hi]}, shards,
                    _flip_shard, reproduce)


def campaign(trials: int, seed: int, recsum: bool, out=sys.stdout, ex: Executor | None = None,
             **kw: Any) -> dict[str, int]:
    """The byte-flip campaign; prints its failures and a summary line, returns the outcome counts."""
    s = run_campaign(flip_campaign(trials, seed, recsum, **kw), ex or LocalExecutor(1))
    for f in s.failures:
        print(f"{f['message']}\n  reproduce with: {f['reproduce']}", file=out)
    counts = {k: s.counts.get(k, 0) for k in ("detected", "operational", "missed", "crash")}
    rate = (counts["detected"] + counts["operational"]) / max(s.units, 1)
    print(f"{s.units} trials ({'checksum recomputed' if recsum else 'raw flips'}), {s.seconds:.1f} s: "
          f"detection rate {rate:.1%}  {counts}", file=out)
    return {**counts, "failures": len(s.failures)}


# ---------------------------------------------------------------------------------------------
# Structural campaign: valid checksums over hostile contents.
#
# Each mutated image is decoded, changed as a structure (shared children, loops, lying levels,
# huge counts, lengths and offsets, pointers out of range, a bad free-space record) and encoded
# again with correct checksums, so every parser and every traversal sees it. Each image then
# goes through the commands a user runs -- ls, cat (as ``| head -c 4M``), mkdir (a writable
# mount and a commit), inspect dump-tree, fsck, and fsck --repair on a copy -- in a forked child with a 10 s alarm per command and an
# address-space limit; the parent reads the child's peak RSS from wait4. A forked child starts
# with its parent's resident pages, so the growth over that is reported too (under pytest the
# parent may be big; run as a tool, the parent is a fresh process much like the CLI's own).

CMD_TIMEOUT = 10
AS_GROWTH = 2 << 30  # a runaway allocation fails as MemoryError (a traceback) instead of swapping
CAT_LIMIT = 4 << 20
U64 = (1 << 64) - 1


@dataclass
class Base:
    """A populated image, read once: its tree blocks decoded, its non-hole bytes for cheap copies."""

    path: str
    size: int
    sb: SuperInfo
    raw: dict[int, bytes]  # bytenr -> tree block
    where: dict[int, tuple[str, int]]  # bytenr -> (tree name, level)
    roots: dict[str, int]
    data: list[tuple[int, bytes]]  # the image's non-hole regions
    files: list[str]
    key_file: str

    def block(self, bytenr: int) -> TreeBlock:
        return decode_block(self.raw[bytenr], bytenr=bytenr, nodesize=self.sb.nodesize, csum_type=self.sb.csum_type,
                            fsid=self.sb.fsid)

    def encode(self, block: TreeBlock) -> bytes:
        return encode_block(block, nodesize=self.sb.nodesize, csum_type=self.sb.csum_type, fsid=self.sb.fsid)

    def recsum(self, buf: bytearray) -> bytes:
        buf[:CSUM_FIELD] = csums.field(self.sb.csum_type, bytes(buf[CSUM_FIELD:]))
        return bytes(buf)

    def blocks_of(self, pred: Callable[[str, int], bool]) -> list[int]:
        return sorted(b for b, (t, lvl) in self.where.items() if pred(t, lvl))

    def write(self, path: str, patches: list[tuple[int, bytes]]) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            for off, buf in self.data + patches:
                os.pwrite(fd, buf, off)
        finally:
            os.close(fd)


def load_base(path: str, key_file: str) -> Base:
    with ImageFile.open(path) as img:
        sb = img.best_super()
        data, pos = [], 0
        while True:
            try:
                start = os.lseek(img.fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(img.fd, start, os.SEEK_HOLE)
            data.append((start, os.pread(img.fd, end - start, start)))
            pos = end
        dump = dump_tree(path)
        raw = {b["bytenr"]: img.read(b["bytenr"], sb.nodesize) for b in dump}
    where = {b["bytenr"]: (b["tree"], b["level"]) for b in dump}
    roots = {}
    for b in dump:
        roots.setdefault(b["tree"], b["bytenr"])  # breadth-first: each tree's root comes first
    files = [f"/{d}/f{i}" for d in ("p", "e") for i in range(FILES)]
    return Base(path, os.path.getsize(path), sb, raw, where, roots, data, files, key_file)


def huge(base: Base, rng: random.Random) -> int:
    return rng.choice([U64, (1 << 63) - 1, 1 << 63, 1 << 62, 1 << 32, base.size, base.size + 4096, 4095, 0, 1])


def _patch(base: Base, block: TreeBlock) -> list[tuple[int, bytes]]:
    return [(block.bytenr, base.encode(block))]


def m_shared_child(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """One child pointer copies another's: the child is reached twice."""
    b = base.block(rng.choice(base.blocks_of(lambda t, lvl: lvl > 0)))
    i, j = rng.sample(range(len(b.ptrs)), 2) if len(b.ptrs) > 1 else (0, 0)
    b.ptrs[j] = b.ptrs[i]
    return _patch(base, b)


def m_shared_all(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """Every node of a tree points all its slots at its first child (ls / listed 320,000 names)."""
    tree = base.where[rng.choice(base.blocks_of(lambda t, lvl: lvl > 0))][0]
    out = []
    for bytenr in base.blocks_of(lambda t, lvl: t == tree and lvl > 0):
        b = base.block(bytenr)
        b.ptrs = [b.ptrs[0]] * len(b.ptrs)
        out += _patch(base, b)
    return out


def m_cross_share(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """A node points at a block of another tree (or of its own) at the right level."""
    b = base.block(rng.choice(base.blocks_of(lambda t, lvl: lvl > 0)))
    other = base.block(rng.choice(base.blocks_of(lambda t, lvl: lvl == b.level - 1)))
    b.ptrs[rng.randrange(len(b.ptrs))] = (other.bytenr, other.generation)
    return _patch(base, b)


def m_loop(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """A child pointer at the node itself or at its tree's root, optionally with a level to match."""
    b = base.block(rng.choice(base.blocks_of(lambda t, lvl: lvl > 0)))
    target = base.block(rng.choice([b.bytenr, base.roots[base.where[b.bytenr][0]]]))
    b.ptrs[rng.randrange(len(b.ptrs))] = (target.bytenr, target.generation)
    out = _patch(base, b)
    if rng.random() < 0.5 and target.bytenr != b.bytenr:  # the target lies about its level too
        target.level = b.level - 1 if b.level > 1 else target.level
        out += _patch(base, target) if target.level else []
    return out


def m_ptr_range(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    b = base.block(rng.choice(base.blocks_of(lambda t, lvl: lvl > 0)))
    bad = rng.choice([0, 4096, SUPER_OFFSETS[0], SUPER_OFFSETS[0] + 1, base.size, base.size - 4096,
                      base.sb.total_bytes, 1 << 63, U64 - 4095, base.data[-1][0], rng.randrange(1 << 20, base.size)])
    b.ptrs[rng.randrange(len(b.ptrs))] = (bad, rng.choice([b.ptrs[0][1], U64, 0]))
    return _patch(base, b)


def _header(base: Base, rng: random.Random, field_index: int, values: list[int]) -> list[tuple[int, bytes]]:
    bytenr = rng.choice(sorted(base.raw))
    buf = bytearray(base.raw[bytenr])
    fields = list(HEADER.unpack_from(buf, 0))
    fields[field_index] = rng.choice(values)
    HEADER.pack_into(buf, 0, *fields)
    return [(bytenr, base.recsum(buf))]


def m_level(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    return _header(base, rng, 7, [0, 1, 2, 3, 7, 8, 255])


def m_nritems(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    return _header(base, rng, 6, [0, 1, 2, 200, 1000, 1 << 31, (1 << 32) - 1])


def m_header_misc(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    i = rng.choice([2, 4, 5])  # bytenr, generation, owner
    return _header(base, rng, i, [0, 1, 2, 5, 7, 10, U64, 1 << 63, rng.choice(sorted(base.raw))])


def m_item_header(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """A leaf item's data offset or size runs wild."""
    bytenr = rng.choice(base.blocks_of(lambda t, lvl: lvl == 0))
    buf = bytearray(base.raw[bytenr])
    n = HEADER.unpack_from(buf, 0)[6]
    if not n:
        return []
    pos = HEADER_SIZE + rng.randrange(n) * ITEM_SIZE
    fields = list(ITEM.unpack_from(buf, pos))
    fields[rng.choice([3, 4])] = rng.choice([0, 1, base.sb.nodesize, (1 << 31), (1 << 32) - 1, fields[3] + 1])
    ITEM.pack_into(buf, pos, *fields)
    return [(bytenr, base.recsum(buf))]


def _items_of(base: Base, tree: str, typ: int) -> list[tuple[int, int]]:
    """(bytenr, slot) of every item of type ``typ`` in ``tree``."""
    out = []
    for bytenr in base.blocks_of(lambda t, lvl: t == tree and lvl == 0):
        out += [(bytenr, i) for i, k in enumerate(base.block(bytenr).keys) if k[1] == typ]
    return out


def _edit_value(base: Base, rng: random.Random, tree: str, typ: int, fmt, fields: list[int]) -> list[tuple[int, bytes]]:
    """Set one of ``fields`` of a fixed-layout item body (struct ``fmt``) to a huge or edge value."""
    found = _items_of(base, tree, typ)
    if not found:
        return []
    bytenr, slot = rng.choice(found)
    b = base.block(bytenr)
    body = bytearray(b.values[slot])
    v = list(fmt.unpack_from(body, 0))
    for f in rng.sample(fields, min(len(fields), rng.choice([1, 1, 2]))):
        value = huge(base, rng)
        for mask in (U64, 0xFFFFFFFF, 0xFFFF, 0xFF):  # as wide as the field is
            v[f] = value & mask
            try:
                fmt.pack_into(body, 0, *v)
                break
            except struct.error:
                continue
    b.values[slot] = bytes(body)
    return _patch(base, b)


def m_inode(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """size, nbytes, nlink or mode: i_size 2^63-1 on a small image made cat stream zeros for minutes."""
    return _edit_value(base, rng, "fs", S.INODE_ITEM, INODE_ITEM, [2, 2, 3, 5, 8])


def m_file_extent(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """ram_bytes, type, disk_bytenr, disk_num_bytes, offset or num_bytes."""
    return _edit_value(base, rng, "fs", S.EXTENT_DATA, FILE_EXTENT_ITEM, [1, 5, 6, 7, 8, 9])


def m_extent_item(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    return _edit_value(base, rng, "extent", rng.choice([S.EXTENT_ITEM, S.METADATA_ITEM]), EXTENT_ITEM, [0])


def m_root_item(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """A ROOT_ITEM's bytenr (at another tree's root, a leaf, out of range), level or generation."""
    found = _items_of(base, "root", S.ROOT_ITEM)
    bytenr, slot = rng.choice(found)
    b = base.block(bytenr)
    ri = RootItem.unpack(b.values[slot])
    what = rng.choice(["bytenr", "bytenr", "level", "generation"])
    if what == "bytenr":
        ri = ri._replace(bytenr=rng.choice([*base.roots.values(), rng.choice(sorted(base.raw)), huge(base, rng)]))
    elif what == "level":
        ri = ri._replace(level=rng.choice([0, 1, 2, 7, 8, 255]))
    else:
        ri = ri._replace(generation=huge(base, rng))
    b.values[slot] = ri.pack()
    return _patch(base, b)


def _rekey(base: Base, rng: random.Random, tree: str, typ: int, change: Callable[[tuple], tuple],
           extra: bool = False) -> list[tuple[int, bytes]]:
    """Change an item's key (or add a changed copy, ``extra``) and keep the leaf sorted, so the
    block decodes and the damage reaches the code that trusts the key."""
    found = _items_of(base, tree, typ)
    if not found:
        return []
    bytenr, slot = rng.choice(found)
    b = base.block(bytenr)
    items = dict(zip(b.keys, b.values))
    new = change(b.keys[slot])
    if not extra:
        del items[b.keys[slot]]
    items[new] = b.values[slot]
    b.keys, b.values = map(list, zip(*sorted(items.items())))
    b.recount()
    if b.used > body_size(base.sb.nodesize):
        return []
    return _patch(base, b)


def m_free_space(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """A free extent of length 2^62 crashed ls/cat at mount; also out-of-range, overlapping, unaligned."""
    tree_block = rng.choice(sorted(base.raw))
    choices: list[Callable[[tuple], tuple]] = [
        lambda k: (k[0], k[1], 1 << 62),
        lambda k: (k[0], k[1], huge(base, rng)),
        lambda k: (huge(base, rng), k[1], k[2]),
        lambda k: (tree_block, k[1], base.sb.nodesize),
        lambda k: (SUPER_OFFSETS[0], k[1], 4096),
        lambda k: (base.sb.total_bytes - 4096, k[1], 8192),
        lambda k: (k[0] + 4096, k[1], k[2]),
        lambda k: (k[0] + 1, k[1], k[2]),
    ]
    return _rekey(base, rng, "free-space", S.FREE_SPACE_EXTENT, rng.choice(choices), extra=rng.random() < 0.5)


def m_key(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """Any item's key offset or objectid becomes huge (EXTENT_ITEM length, csum start, inode number...)."""
    tree = rng.choice(["fs", "extent", "csum", "root"])
    typ = rng.choice(sorted({k[1] for bytenr in base.blocks_of(lambda t, lvl: t == tree and lvl == 0)
                             for k in base.block(bytenr).keys}))
    pos = rng.choice([0, 2])
    return _rekey(base, rng, tree, typ, lambda k: tuple(huge(base, rng) if i == pos else x for i, x in enumerate(k)))


def m_dir_entry(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """A directory entry's name or data length overruns, or its target is huge, itself or the root."""
    typ = rng.choice([S.DIR_ITEM, S.DIR_INDEX])
    found = _items_of(base, "fs", typ)
    bytenr, slot = rng.choice(found)
    b = base.block(bytenr)
    body = bytearray(b.values[slot])
    v = list(DIR_ITEM_HEAD.unpack_from(body, 0))
    f = rng.choice([0, 0, 3, 4, 5])  # location objectid, transid, data_len, name_len
    v[f] = rng.choice([0, 1, 256, b.keys[slot][0], (1 << 16) - 1, U64 if f in (0, 3) else 255])
    DIR_ITEM_HEAD.pack_into(body, 0, *v)
    b.values[slot] = bytes(body)
    return _patch(base, b)


def m_super(base: Base, rng: random.Random) -> list[tuple[int, bytes]]:
    """The primary superblock (valid checksum): root at another tree, a leaf, out of range; a lying
    root_level, total_bytes or bytes_used."""
    sb = dataclasses.replace(base.sb, backup_roots=[dict(b) for b in base.sb.backup_roots])
    what = rng.choice(["root", "root_level", "total_bytes", "bytes_used"])
    if what == "root":
        sb.root = rng.choice([*base.roots.values(), rng.choice(sorted(base.raw)), huge(base, rng)])
    elif what == "root_level":
        sb.root_level = rng.choice([1, 2, 7])
    elif what == "total_bytes":
        sb.total_bytes = rng.choice([base.size * 2, 1 << 40, 1 << 62, 4 << 20, base.size - 4096])
    else:
        sb.bytes_used = huge(base, rng)
    return [primary_write(sb)]


def m_dag_tower(base: Base, rng: random.Random, depth: int = 0) -> list[tuple[int, bytes]]:
    """The fs tree's root becomes a tower of forged full nodes, each pointing every slot at the one
    below, over the leaf holding the root directory: fanout^depth paths to one leaf (inspect ran
    past 30 s at 3 GB, ls / listed 320,000 names). The tower sits at the end of the largest free
    extent, which the free-space record gives up, so a mount gets as far as the tree."""
    ns, depth, fanout = base.sb.nodesize, depth or rng.choice([2, 3, 5, 7]), max_ptrs(base.sb.nodesize)
    fst = base.block(base.roots["free-space"])
    slot = max(range(len(fst.keys)), key=lambda i: fst.keys[i][2])
    start, typ, length = fst.keys[slot]
    if length < (depth + 1) * ns:
        return []
    fst.keys[slot] = (start, typ, length - depth * ns)
    leaf = base.block(base.blocks_of(lambda t, lvl: t == "fs" and lvl == 0)[0])
    oid = leaf.keys[0][0]
    keys = [leaf.keys[0]] + [(oid, S.DIR_INDEX, i) for i in range(1, fanout)]
    out, child = [], leaf
    for level in range(1, depth + 1):
        node = TreeBlock(bytenr=start + length - level * ns, generation=base.sb.generation, owner=S.FS_TREE_OBJECTID,
                         level=level, keys=list(keys), ptrs=[(child.bytenr, child.generation)] * fanout)
        node.recount()
        out += _patch(base, node)
        child = node
    rb = base.block(base.roots["root"])
    i = rb.keys.index((S.FS_TREE_OBJECTID, S.ROOT_ITEM, 0))
    rb.values[i] = RootItem.unpack(rb.values[i])._replace(bytenr=child.bytenr, level=depth).pack()
    return out + _patch(base, fst) + _patch(base, rb)


MUTATIONS: dict[str, Callable[[Base, random.Random], list[tuple[int, bytes]]]] = {
    "shared_child": m_shared_child, "shared_all": m_shared_all, "cross_share": m_cross_share, "loop": m_loop,
    "ptr_range": m_ptr_range, "level": m_level, "nritems": m_nritems, "header": m_header_misc,
    "item_header": m_item_header, "inode": m_inode, "file_extent": m_file_extent, "extent_item": m_extent_item,
    "root_item": m_root_item, "free_space": m_free_space, "key": m_key, "dir_entry": m_dir_entry, "super": m_super,
    "dag_tower": m_dag_tower,
}


def mutate(base: Base, rng: random.Random) -> tuple[list[str], list[tuple[int, bytes]]]:
    """One or two structural mutations (the second over the first's result is not attempted: two
    independent blocks, or the same block twice with the later patch winning)."""
    names, patches = [], []
    for _ in range(1 if rng.random() < 0.8 else 2):
        name = rng.choice(sorted(MUTATIONS))
        names.append(name)
        patches += MUTATIONS[name](base, rng)
    return names, patches


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in the code under test eats it."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


class HeadSink(io.RawIOBase):
    """stdout as ``| head -c LIMIT``: discards, and breaks the pipe once LIMIT bytes went through."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.devnull = os.open(os.devnull, os.O_WRONLY)  # a real descriptor, as a pipe has

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.devnull

    def close(self) -> None:
        if not self.closed:
            os.close(self.devnull)
        super().close()

    def write(self, b) -> int:
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.left -= len(b)
        return len(b)


def commands(base: Base, img: str, copy: str, rng: random.Random) -> list[list[str]]:
    plain = rng.choice([f for f in base.files if f.startswith("/p")])
    secret = rng.choice([f for f in base.files if f.startswith("/e")])
    # the read-only ones first; mkdir is the writable mount (the free-space record, a commit)
    return [["inspect", "dump-tree", img], ["fsck", img], ["ls", img, "/"], ["ls", "-l", img, "/p"], ["cat", img, plain],
            ["cat", "--key-file", base.key_file, img, secret], ["mkdir", img, "/fuzz"], ["fsck", "--repair", copy]]


def run_command(argv: list[str]) -> dict[str, Any]:
    """One CLI command in this process, as a user runs it: its exit code, or hang / traceback."""
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(HeadSink(CAT_LIMIT)), write_through=True)
    t = time.perf_counter()
    handler = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CMD_TIMEOUT)
    try:
        rc, outcome, detail = main(argv), "ok", ""
    except Hang:
        rc, outcome, detail = None, "hang", traceback.format_exc()
    except BaseException:  # noqa: BLE001 - the campaign exists to find these
        rc, outcome, detail = None, "traceback", traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, handler)
        sink, sys.stdout = sys.stdout, sys.__stdout__
        try:
            sink.close()
        except BaseException:  # noqa: BLE001 - the sink's broken pipe, as after ``| head``
            pass
    return {"argv": argv, "rc": rc, "outcome": outcome, "detail": detail,
            "secs": round(time.perf_counter() - t, 3)}


def run_image(base: Base, index: int, seed: int, workdir: str) -> dict[str, Any]:
    """Mutate, then run every command in a forked child; the parent reads its peak RSS."""
    rng = random.Random(f"{seed}:{index}")
    names, patches = mutate(base, rng)
    img, copy, result = (os.path.join(workdir, n) for n in ("m.img", "m-repair.img", "result.json"))
    base.write(img, patches)
    base.write(copy, patches)
    argvs = commands(base, img, copy, rng)
    err = os.path.join(workdir, "stderr")
    with open("/proc/self/statm") as f:
        vsize, rss = (int(x) * resource.getpagesize() for x in f.read().split()[:2])
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            resource.setrlimit(resource.RLIMIT_AS, (vsize + AS_GROWTH, vsize + AS_GROWTH))
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            runs = []
            for argv in argvs:
                runs.append(run_command(argv))
                with open(result, "w") as f:
                    json.dump(runs, f)
                if runs[-1]["outcome"] == "hang":
                    break
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    deadline = time.monotonic() + CMD_TIMEOUT * (len(argvs) + 1)
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.01)
    try:
        with open(result) as f:
            runs = json.load(f)
        os.unlink(result)
    except FileNotFoundError:
        runs = []
    with open(err, errors="replace") as f:
        stderr = f.read()
    if "Traceback" in stderr:  # e.g. a task's exception logged by asyncio
        runs.append({"argv": ["stderr"], "rc": None, "outcome": "traceback", "detail": stderr[-3000:], "secs": 0})
    if len(runs) < len(argvs) and not any(r["outcome"] == "hang" for r in runs):
        runs.append({"argv": argvs[len(runs)], "rc": None, "outcome": "hang", "detail": "killed or died", "secs": 0})
    return {"index": index, "mutations": names, "runs": runs, "rss_kb": usage.ru_maxrss,
            "growth_kb": max(usage.ru_maxrss - rss // 1024, 0)}


def _structural_shard(args: tuple) -> dict[str, Any]:
    """Images [lo, hi) over the seed's base image, built here; image ``i`` draws from ``"{seed}:{i}"``."""
    seed, max_rss, lo, hi = args
    counts: dict[str, Any] = {"commands": 0, "ok": 0, "traceback": 0, "hang": 0, "fsck_detected": 0, "fsck_clean": 0,
                              "max_rss_mb": 0.0, "max_growth_mb": 0.0, "max_secs": 0.0}
    failures: list[dict[str, Any]] = []
    notes: list[str] = []
    by_mutation: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as d:
        base_path, key_file = os.path.join(d, "base.img"), os.path.join(d, "key")
        with open(key_file, "wb") as f:
            f.write(KEY)
        asyncio.run(populated(base_path, seed, size="48M", files=FILES, max_file=48_000))
        base = load_base(base_path, key_file)
        for i in range(lo, hi):
            r = run_image(base, i, seed, d)
            what = f"image {i} ({'+'.join(r['mutations'])})"
            rss = r["rss_kb"] / 1024
            counts["max_rss_mb"] = max(counts["max_rss_mb"], round(rss, 1))
            counts["max_growth_mb"] = max(counts["max_growth_mb"], round(r["growth_kb"] / 1024, 1))
            growth = r["growth_kb"] / 1024
            if growth > max_rss:  # over the worker's own size: a pool or Ray worker (or pytest) starts big
                failures.append({"unit": i, "message": f"RSS {what}: the commands grew the process by "
                                                       f"{growth:.0f} MB (peak {rss:.0f} MB), over {max_rss} MB"})
            for name in r["mutations"]:
                by_mutation[name] = by_mutation.get(name, 0) + 1
            for run in r["runs"]:
                counts["commands"] += 1
                counts[run["outcome"]] += 1
                counts["max_secs"] = max(counts["max_secs"], run["secs"])
                if run["argv"][0] == "fsck" and "--repair" not in run["argv"] and run["rc"] is not None:
                    counts["fsck_detected" if run["rc"] else "fsck_clean"] += 1
                    if not run["rc"]:  # some mutations are harmless (a huge but legal i_size, a timestamp)
                        notes.append(f"fsck passed {what}")
                if run["outcome"] != "ok":
                    failures.append({"unit": i, "message": f"{run['outcome'].upper()} {what}: "
                                                           f"blockemu {' '.join(run['argv'])}\n{run['detail']}"})
    counts.update({f"mutation {k}": v for k, v in by_mutation.items()})
    return {"units": hi - lo, "states": counts["commands"], "counts": counts, "failures": failures, "notes": notes}


def structural_campaign(images: int, seed: int, *, max_rss: float = 300, only: tuple[int, int] | None = None,
                        shard_size: int = 20) -> Campaign:
    """Structural mutations: shards of ``shard_size`` images (each shard builds its base image once)."""
    lo, hi = only or (0, images)
    shards = [Shard(f"images {lo + a}..{lo + b}", (seed, max_rss, lo + a, lo + b)) for a, b in ranges(hi - lo, shard_size)]

    def reproduce(f: dict[str, Any]) -> str:
        return f"blockemu fuzz --structural --seed {seed} --max-rss {max_rss} --only {f['unit']} --jobs 1"
    return Campaign("fuzz", {"mode": "structural", "seed": seed, "max_rss": max_rss, "range": [lo, hi]}, shards,
                    _structural_shard, reproduce)


def structural(images: int, seed: int, out=sys.stdout, ex: Executor | None = None, **kw: Any) -> dict[str, Any]:
    """The structural campaign; prints its failures and a summary line, returns the counts and worst figures."""
    s = run_campaign(structural_campaign(images, seed, **kw), ex or LocalExecutor(1))
    for f in s.failures:
        print(f"{f['message']}\n  reproduce with: {f['reproduce']}", file=out)
    t = {k: v for k, v in s.counts.items() if not k.startswith("mutation ")}
    mutations = {k.removeprefix("mutation "): v for k, v in sorted(s.counts.items()) if k.startswith("mutation ")}
    print(f"structural: {s.units} images, {t['commands']} commands in {s.seconds:.1f} s: {t['traceback']} tracebacks, "
          f"{t['hang']} hangs, peak RSS {t['max_rss_mb']} MB (at most {t['max_growth_mb']} MB over the parent's), "
          f"slowest command {t['max_secs']} s; fsck flagged {t['fsck_detected']} images, passed {t['fsck_clean']}; "
          f"mutations {mutations}", file=out)
    return {**t, "images": s.units, "failures": len(s.failures)}
