"""Tree blocks: bytes <-> ``TreeBlock``, validating everything on the way in.

Decoding trusts nothing in the block: every count, offset and size is checked
against the block it sits in before it is used, so a hostile image raises a
``CorruptionError`` naming the block, never an IndexError or a huge allocation.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cache
from itertools import chain, islice
from operator import add, gt, itemgetter, le, lt, sub

from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk.fast import HEADER, HEADER_SIZE, ITEM, ITEM_KEYS, ITEM_SIZE, ITEM_SPANS, KEY_PTR, KEY_PTR_SIZE
from blockemu.ondisk.structs import CSUM_FIELD, HEADER_FLAG_WRITTEN, MAX_LEVEL

KeyT = tuple[int, int, int]


@dataclass(slots=True, eq=False)
class TreeBlock:
    """A decoded node or leaf. Leaves use ``values``; internal nodes ``ptrs``.

    ``used`` tracks the bytes the body occupies so fullness checks are O(1).
    """

    bytenr: int
    generation: int
    owner: int
    level: int
    keys: list[KeyT] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    ptrs: list[tuple[int, int]] = field(default_factory=list)
    flags: int = HEADER_FLAG_WRITTEN
    used: int = 0

    @property
    def is_leaf(self) -> bool:
        return self.level == 0

    def recount(self) -> None:
        if self.level == 0:
            self.used = ITEM_SIZE * len(self.keys) + sum(map(len, self.values))
        else:
            self.used = KEY_PTR_SIZE * len(self.keys)


def body_size(nodesize: int) -> int:
    return nodesize - HEADER_SIZE


def max_ptrs(nodesize: int) -> int:
    return body_size(nodesize) // KEY_PTR_SIZE


def max_item_data(nodesize: int) -> int:
    """Largest item body that fits a leaf alone."""
    return body_size(nodesize) - ITEM_SIZE


def peek_header(buf: bytes | memoryview) -> tuple:
    """Raw header fields (csum, fsid, bytenr, flags, generation, owner, nritems, level)."""
    return HEADER.unpack_from(buf, 0)


def decode_block(
    buf: bytes | memoryview,
    *,
    bytenr: int,
    nodesize: int,
    csum_type: int,
    fsid: bytes,
    verify_csum: bool = True,
) -> TreeBlock:
    if len(buf) != nodesize:
        raise CorruptionError(f"tree block {bytenr}: short read ({len(buf)} of {nodesize} bytes)", "BAD_TREE_BLOCK", bytenr)
    mv = memoryview(buf)
    csum, bfsid, hbytenr, flags, generation, owner, nritems, level = HEADER.unpack_from(mv, 0)
    if verify_csum:
        want = csums.field(csum_type, mv[CSUM_FIELD:])
        if want != csum:
            n = csums.csum_size(csum_type)
            why = csums.unfilled(csum_type, csum, want) or f"checksum mismatch (found {csum[:n].hex()}, wanted {want[:n].hex()})"
            raise CorruptionError(f"tree block {bytenr}: {why}", "CSUM_MISMATCH", bytenr)
    if bfsid != fsid:
        raise CorruptionError(f"tree block {bytenr}: fsid mismatch", "BAD_TREE_BLOCK", bytenr)
    if hbytenr != bytenr:
        raise CorruptionError(f"tree block {bytenr}: header says bytenr {hbytenr}", "BAD_TREE_BLOCK", bytenr)
    if level >= MAX_LEVEL:
        raise CorruptionError(f"tree block {bytenr}: bad level {level}", "BAD_TREE_BLOCK", bytenr)
    body = nodesize - HEADER_SIZE
    block = TreeBlock(bytenr=bytenr, generation=generation, owner=owner, level=level, flags=flags)
    keys = block.keys
    if level == 0:
        if nritems * ITEM_SIZE > body:
            raise CorruptionError(f"tree block {bytenr}: nritems {nritems} does not fit a leaf", "BAD_TREE_BLOCK", bytenr)
        data_floor = HEADER_SIZE + nritems * ITEM_SIZE
        block.values, block.used = _leaf_values(buf, mv, keys, bytenr, data_floor, nodesize)
    else:
        if nritems * KEY_PTR_SIZE > body or nritems == 0:
            raise CorruptionError(f"tree block {bytenr}: bad nritems {nritems} for a node", "BAD_TREE_BLOCK", bytenr)
        ptrs = block.ptrs
        for oid, typ, off, ptr, gen in KEY_PTR.iter_unpack(mv[HEADER_SIZE : HEADER_SIZE + nritems * KEY_PTR_SIZE]):
            keys.append((oid, typ, off))
            ptrs.append((ptr, gen))
        block.used = nritems * KEY_PTR_SIZE
    if not all(map(lt, keys, islice(keys, 1, None))):
        i = next(i for i in range(1, len(keys)) if keys[i - 1] >= keys[i])
        raise CorruptionError(
            f"tree block {bytenr}: key order: slot {i - 1} {keys[i - 1]} >= slot {i} {keys[i]}", "KEY_ORDER", bytenr
        )
    return block


def _leaf_values(buf: bytes | memoryview, mv: memoryview, keys: list[KeyT], bytenr: int, data_floor: int,
                 nodesize: int) -> tuple[list[bytes], int]:
    """A leaf's item headers decoded in bulk (two ``iter_unpack`` columns, then C-level maps):
    appends the keys, returns the item bodies and the bytes the body uses.

    Bounds and overlap are checked over whole columns; only a block that fails is walked item
    by item, to name the first bad item as the message always has. Bodies laid out as every
    writer lays them (each below the one before) skip the sort the overlap check needs."""
    heads = mv[HEADER_SIZE:data_floor]
    keys.extend(ITEM_KEYS.iter_unpack(heads))
    spans = list(ITEM_SPANS.iter_unpack(heads))
    starts = list(map(HEADER_SIZE.__add__, map(itemgetter(0), spans)))  # C-level: a listcomp was a third of the decode
    ends = list(map(add, starts, map(itemgetter(1), spans)))
    if spans and (min(starts) < data_floor or max(ends) > nodesize):
        i = next(i for i, (s, e) in enumerate(zip(starts, ends)) if s < data_floor or e > nodesize)
        raise CorruptionError(
            f"tree block {bytenr}: item {i} data [{spans[i][0]}, +{spans[i][1]}) outside the leaf", "BAD_ITEM_OFFSET", bytenr
        )
    descending = all(map(gt, starts, islice(starts, 1, None)))
    if not (descending and all(map(le, islice(ends, 1, None), starts))):
        ordered = sorted(zip(starts, ends))
        if any(map(lt, map(itemgetter(0), islice(ordered, 1, None)), map(itemgetter(1), ordered))):
            raise CorruptionError(f"tree block {bytenr}: item data overlap", "BAD_ITEM_OFFSET", bytenr)
    raw = buf if isinstance(buf, bytes) else mv.tobytes()
    return list(map(raw.__getitem__, map(slice, starts, ends))), data_floor - HEADER_SIZE + sum(map(sub, ends, starts))


PACK_ROWS = 64  # item headers (or key pointers) per pack_into call


@cache
def _rows_struct(row: struct.Struct, n: int) -> struct.Struct:
    """``n`` of ``row`` one after another, as one Struct."""
    return struct.Struct("<" + row.format.lstrip("<") * n)


def _pack_rows(row: struct.Struct, buf: bytearray, pos: int, flat: list[int]) -> None:
    """Rows of ``row``'s fields, flattened in ``flat``, packed into ``buf`` from ``pos`` by
    Structs of ``PACK_ROWS`` rows and one for the rest, each compiled once. Not one Struct of
    all the rows (``struct.pack_into`` with a format per row count): struct's cache keeps 100
    formats and a block's row count varies, so each encode compiled a format of hundreds of
    rows anew: ~300 k instructions of the ~21.5 M of an fio fsync cycle, more where commits
    are more frequent (Struct___init__, callgrind; now ~7 k)."""
    fields = _FIELDS[row]
    per = PACK_ROWS * fields
    whole = len(flat) - len(flat) % per
    if whole:
        rows = _rows_struct(row, PACK_ROWS)
        for i in range(0, whole, per):
            rows.pack_into(buf, pos, *flat[i:i + per])
            pos += rows.size
    if whole < len(flat):
        _rows_struct(row, (len(flat) - whole) // fields).pack_into(buf, pos, *flat[whole:])


_FIELDS = {row: len(row.unpack(bytes(row.size))) for row in (ITEM, KEY_PTR)}


def encode_block(block: TreeBlock, *, nodesize: int, csum_type: int, fsid: bytes) -> bytes:
    buf = bytearray(nodesize)
    n = len(block.keys)
    HEADER.pack_into(buf, 0, b"", fsid, block.bytenr, block.flags, block.generation, block.owner, n, block.level)
    pos = HEADER_SIZE
    # the item headers (or key pointers) by a few pack_into calls (``_pack_rows``), the leaf's data in one copy: a
    # commit or a log sync encodes each dirty block, and a block holds hundreds of items. A node's
    # fields are flattened by C-level maps (a third fewer instructions than a listcomp, callgrind);
    # a leaf's loop below measured no dearer than maps building the same list.
    if block.level == 0:
        values = block.values
        # one len per item and the key unpacked by the loop, not indexed: a commit encodes ~30
        # leaves of ~100 items (the stress mix), and a 100-item leaf took 381k instructions with
        # each length taken twice and the key indexed thrice, 342k now (callgrind)
        flat: list[int] = []
        off = nodesize - HEADER_SIZE
        for (objectid, typ, offset), size in zip(block.keys, map(len, values)):
            off -= size
            flat += (objectid, typ, offset, off, size)
        end = HEADER_SIZE + off  # where the data of the last item starts
        if end < pos + n * ITEM_SIZE:
            raise ValueError(f"leaf {block.bytenr} overfull")
        buf[end:] = b"".join(reversed(values))  # item 0's data last, at the very end
        _pack_rows(ITEM, buf, pos, flat)
    else:
        _pack_rows(KEY_PTR, buf, pos, list(chain.from_iterable(map(add, block.keys, block.ptrs))))
    buf[0:CSUM_FIELD] = csums.field(csum_type, memoryview(buf)[CSUM_FIELD:])
    return bytes(buf)
