"""Proofs, over whole columns, that an fs-tree pass would report nothing.

A sound fs tree is nearly all of a large check's items, and the passes in ``fsck_fs`` look at
each item through a Python object (an InodeRow, a DirEntry, a FileExtent) and a few dict
lookups. Here the same conditions are decided for the common shape of a sound tree -- keys in
order, one name per INODE_REF / DIR_ITEM / DIR_INDEX body, no INODE_EXTREF (names past a full
INODE_REF: hard links by the dozen in one directory, left to the passes), no orphan or encryption item --
with each item type's fields unpacked into columns (one ``iter_unpack`` or C-level ``map`` per
field) and compared as lists and sets. Each proof returns True only when the pass it stands for
would report nothing; anything else (a finding, or a shape it does not cover) returns False,
and the caller runs the pass itself, which says what is wrong in its words and order.
"""
from __future__ import annotations

import stat as st
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from itertools import accumulate, chain, compress, islice, repeat
from operator import add, and_, eq, getitem, itemgetter, le, lt, ne, not_, or_, sub, xor
from typing import TYPE_CHECKING, Any

from blockemu.ondisk import fast
from blockemu.ondisk import structs as S
from blockemu.ondisk.csum import crc32c
from blockemu.ondisk.items import FILE_TYPES, ExtentItem

if TYPE_CHECKING:
    from blockemu.check.fsck import Checker

FS = S.FS_TREE_OBJECTID
PAGE = S.SECTOR_SIZE
ROOT_INO = S.FIRST_FREE_OBJECTID
PLAIN_TYPES = frozenset((S.INODE_ITEM, S.INODE_REF, S.DIR_ITEM, S.DIR_INDEX, S.EXTENT_DATA))

INODE = fast.picked("InodeItem", ("size", "nbytes", "nlink", "mode"))
FILE_EXTENT = fast.FILE_EXTENT_ITEM
ENCRYPTED_EXTENT_SIZE = FILE_EXTENT.size + fast.EXTENT_ENCRYPTION_CONTEXT.size
Columns = dict[int, tuple[list[tuple[int, int, int]], list[bytes]]]


def columns(ck: "Checker") -> Columns | None:
    """The fs tree's items as (keys, bodies) per item type, each in key order; None unless the
    tree's keys are in strictly ascending order (a tree the walk found sound), which the proofs
    rely on: no key twice, an inode's items together, its extents by offset."""
    keys, bodies = ck.keys.get(FS, []), ck.bodies.get(FS, [])
    if not all(map(lt, keys, islice(keys, 1, None))):
        return None
    kinds = list(map(itemgetter(1), keys))
    order = sorted(range(len(kinds)), key=kinds.__getitem__)  # stable: by type, each in key order
    kinds = list(map(kinds.__getitem__, order))
    keys = list(map(keys.__getitem__, order))
    bodies = list(map(bodies.__getitem__, order))
    out: Columns = {}
    for typ in set(kinds):
        lo, hi = bisect_left(kinds, typ), bisect_right(kinds, typ)
        out[typ] = (keys[lo:hi], bodies[lo:hi])
    return out


def _named(bodies: list[bytes], head: Any, name_len: int, tail_len: int | None) -> tuple[list[tuple], list[bytes]] | None:
    """Columns of the heads, and the names, of bodies that each hold one head + name (+ tail),
    the shape ``items._named`` takes in bulk; None if any body has another shape."""
    lens = list(map(len, bodies))
    if not bodies:
        return [()] * len(head.unpack(bytes(head.size))), []
    if min(lens) < head.size:
        return None
    cols = list(zip(*map(head.unpack_from, bodies)))
    sizes = cols[name_len] if tail_len is None else list(map(add, cols[name_len], cols[tail_len]))
    if not all(cols[name_len]) or list(map(head.size.__add__, sizes)) != lens:
        return None
    if tail_len is None or not any(cols[tail_len]):  # each name runs to its body's end: one slice serves all
        return cols, list(map(getitem, bodies, repeat(slice(head.size, None))))
    names = list(map(getitem, bodies, map(slice, repeat(head.size), map(head.size.__add__, cols[name_len]))))
    return cols, names


def _hashes(names: list[bytes]) -> list[int]:
    """``items.name_hash`` of each name, without a Python call per name."""
    return list(map(xor, map(crc32c, names, repeat(1)), repeat(0xFFFFFFFF)))


def inodes_clean(cols: Columns | None) -> int | None:
    """The number of inodes, if ``collect``, ``check_inodes``, ``check_encryption`` and the
    encrypted-name and symlink passes would report nothing on the tree of these ``columns``;
    else None."""
    if cols is None or not cols.keys() <= PLAIN_TYPES or S.INODE_ITEM not in cols:
        return None
    cols = {typ: cols.get(typ, ([], [])) for typ in PLAIN_TYPES}
    ino_keys, ino_bodies = cols[S.INODE_ITEM]
    if any(map(INODE.size.__ne__, map(len, ino_bodies))) or any(map(itemgetter(2), ino_keys)):
        return None  # a body of another size, or a key offset other than 0 (the pass names it)
    inos = list(map(itemgetter(0), ino_keys))
    sizes, _, nlinks, modes = zip(*INODE.iter_unpack(b"".join(ino_bodies)))
    inoset = set(inos)
    if len(inoset) != len(inos):  # an objectid with two INODE_ITEMs: the passes take its last, the columns each
        return None
    # every objectid with an item has an inode; the root is a directory
    if not set(map(itemgetter(0), chain.from_iterable(k for k, _ in cols.values()))) <= inoset or ROOT_INO not in inoset \
            or not st.S_ISDIR(modes[inos.index(ROOT_INO)]):
        return None
    # file extents: each decodes (no compression, no other encoding), none encrypted (so no
    # encryption pass has anything to say)
    ext_bodies = cols[S.EXTENT_DATA][1]
    plain = (0, S.ENCRYPTION_NONE, 0)
    if any(map(FILE_EXTENT.size.__ne__, map(len, ext_bodies))) or \
            any(map(plain.__ne__, map(itemgetter(2, 3, 4), FILE_EXTENT.iter_unpack(b"".join(ext_bodies))))):
        return None
    refs = _named(cols[S.INODE_REF][1], fast.INODE_REF_HEAD, 1, None)
    index = _named(cols[S.DIR_INDEX][1], fast.DIR_ITEM_HEAD, 5, 4)
    items = _named(cols[S.DIR_ITEM][1], fast.DIR_ITEM_HEAD, 5, 4)
    if refs is None or index is None or items is None:
        return None
    (r_index, _), r_names = refs
    r_ino, _, r_parent = _columns(cols[S.INODE_REF][0])
    (x_oid, x_typ, x_off, _, _, _, x_type), x_names = index
    x_d, _, x_idx = _columns(cols[S.DIR_INDEX][0])
    (i_oid, i_typ, i_off, _, _, _, _), i_names = items
    i_d, _, i_h = _columns(cols[S.DIR_ITEM][0])
    mode_of = dict(zip(inos, modes))
    isdir = list(map(st.S_ISDIR, modes))
    dirs = set(compress(inos, isdir))
    # each DIR_INDEX: in a directory, naming an inode of its type
    if not set(x_d) <= dirs or not set(x_oid) <= inoset or \
            list(map(FILE_TYPES.get, map(st.S_IFMT, map(mode_of.__getitem__, x_oid)), repeat(0))) != list(x_type):
        return None
    # ... which names it back by an INODE_REF, and every INODE_REF but the root's ".." to itself
    # is such a name (keys are unique, so neither side holds a name twice: equal counts and one
    # inclusion make the two sides equal)
    names_back = set(zip(x_oid, x_d, x_idx, x_names))
    at = bisect_left(cols[S.INODE_REF][0], (ROOT_INO, S.INODE_REF, ROOT_INO))
    root_ref = (ROOT_INO, ROOT_INO, r_index[at], b"..") if at < len(r_names) and r_ino[at] == r_parent[at] == ROOT_INO \
        and r_names[at] == b".." else None
    if root_ref in names_back or len(r_names) - (root_ref is not None) != len(x_names) \
            or not names_back <= set(zip(r_ino, r_parent, r_index, r_names)):
        return None
    # every DIR_ITEM under its name's hash, the DIR_ITEMs and DIR_INDEXes the same entries
    if _hashes(i_names) != list(i_h) or len(i_names) != len(x_names) \
            or not set(zip(x_d, x_names, x_oid, x_typ, x_off)) <= set(zip(i_d, i_names, i_oid, i_typ, i_off)):
        return None
    links = Counter(r_ino)
    if root_ref is not None:
        links[ROOT_INO] -= 1
    if max(sizes) > S.MAX_FILE_SIZE:
        return None
    # files and symbolic links: as many links as names, at least one; a target of 1 to PAGE - 1 bytes
    files = list(map(not_, isdir))
    file_links = list(map(links.__getitem__, compress(inos, files)))
    if file_links != list(compress(nlinks, files)) or not all(file_links):
        return None
    link_sizes = list(compress(sizes, map(st.S_ISLNK, modes)))
    if link_sizes and (min(link_sizes) < 1 or max(link_sizes) >= PAGE):
        return None
    # directories: one name (the root none), 2 + subdirectories links, names adding up to the size
    names = _sums(x_d, list(map(len, x_names)))
    subdirs = Counter(compress(x_d, map(dirs.__contains__, x_oid)))
    for ino, size, nlink in zip(compress(inos, isdir), compress(sizes, isdir), compress(nlinks, isdir)):
        n = links[ino]
        if (n != 1 if ino != ROOT_INO else n) or size != 2 * names.get(ino, 0) or nlink != 2 + subdirs[ino]:
            return None
    return len(inos)


def extent_records(keys: list[tuple[int, int, int]], items: list[ExtentItem | None], nodesize: int) \
        -> tuple[list[tuple[int, int, tuple]], dict[int, tuple[int, ExtentItem]], dict[int, tuple[int, ExtentItem]]] | None:
    """What ``Checker.check_extents``' item loop builds -- the (start, length, key) of every
    extent, the METADATA_ITEMs and the data extents by bytenr -- when that loop would report
    nothing: each item a METADATA_ITEM or an EXTENT_ITEM flagged DATA, each decoded in bulk
    (``items``, from ``unpack_extent_items``); else None, and the loop runs."""
    if None in items:
        return None
    bytenrs, types, offs = _columns(keys)
    meta = list(map(S.METADATA_ITEM.__eq__, types))
    data = list(map(not_, meta))
    if any(map(S.EXTENT_ITEM.__ne__, compress(types, data))) or \
            not all(map(and_, map(itemgetter(2), compress(items, data)), repeat(S.EXTENT_FLAG_DATA))):
        return None
    # the later of two items of one bytenr stands in each dict, as the loop's assignments leave it
    recorded = dict(zip(compress(bytenrs, meta), zip(compress(offs, meta), compress(items, meta))))
    data_extents = dict(zip(compress(bytenrs, data), zip(compress(offs, data), compress(items, data))))
    lengths = map(getitem, zip(offs, repeat(nodesize)), meta)  # a METADATA_ITEM's is the nodesize, not its offset
    return list(zip(bytenrs, lengths, keys)), recorded, data_extents


def _sums(groups: list[int], values: list[int]) -> dict[int, int]:
    """The sum of ``values`` per group, ``groups`` non-decreasing (as a type's objectids are in
    key order): cut where the group changes, without a Python step per value."""
    if not groups:
        return {}
    total = list(accumulate(values, initial=0))
    cuts = [0, *compress(range(1, len(groups)), map(ne, groups, islice(groups, 1, None))), len(groups)]
    return {groups[a]: total[b] - total[a] for a, b in zip(cuts, islice(cuts, 1, None))}


def _columns(keys: list[tuple[int, int, int]]) -> tuple[tuple[int, ...], ...]:
    """(objectids, types, offsets) of keys."""
    return tuple(zip(*keys)) if keys else ((), (), ())


def file_extents_clean(cols: Columns | None, data: dict[int, tuple[int, ExtentItem]]) -> bool:
    """Whether ``check_file_extents`` (over what ``collect`` decodes from the tree of these
    ``columns``) would report nothing: every extent sound, inside its inode's size, adding up to
    its nbytes, and the one reference to a data extent of its own, which that extent's one
    backref names."""
    if cols is None:
        return False
    ino_keys, ino_bodies = cols.get(S.INODE_ITEM, ([], []))
    ext_keys, ext_bodies = cols.get(S.EXTENT_DATA, ([], []))
    if any(map(INODE.size.__ne__, map(len, ino_bodies))):
        return False
    if not ext_keys:
        return not data
    if min(map(len, ext_bodies)) < FILE_EXTENT.size:
        return False
    _, ram, compression, enc, other, kind, bytenr, disk, offset, num = zip(*map(FILE_EXTENT.unpack_from, ext_bodies))
    shapes = set(zip(map(len, ext_bodies), enc))
    if not shapes <= {(FILE_EXTENT.size, S.ENCRYPTION_NONE), (ENCRYPTED_EXTENT_SIZE, S.ENCRYPTION_FSCRYPT)} \
            or any(compression) or any(other):
        return False
    e_ino, _, e_off = _columns(ext_keys)
    ends = list(map(add, e_off, num))
    if set(kind) != {S.FILE_EXTENT_REG} or any(map(PAGE.__rmod__, map(or_, map(or_, e_off, num), offset))) \
            or not all(map(le, map(add, offset, num), disk)) or ram != disk \
            or list(map(itemgetter(0), map(data.get, bytenr, repeat((None,))))) != list(disk):
        return False
    # no overlap: keys ascend, so an inode's next extent starts at or after the one before ends
    if any(map(and_, map(eq, e_ino, islice(e_ino, 1, None)), map(lt, islice(e_off, 1, None), ends))):
        return False
    if not _inside_inodes(ino_keys, ino_bodies, e_ino, ends, num):
        return False
    # each data extent referenced once, by the file extent its one backref names
    if len(set(bytenr)) != len(bytenr) or set(bytenr) != data.keys():
        return False
    items = list(map(itemgetter(1), data.values()))
    backrefs = list(map(itemgetter(3), items))
    if set(map(itemgetter(0), items)) != {1} or set(map(len, backrefs)) != {1}:
        return False
    backrefs = list(map(itemgetter(0), backrefs))
    if set(map(len, backrefs)) != {5}:
        return False
    tags, roots, r_ino, r_off, counts = zip(*backrefs)
    # the extents' bytenrs are the data extents' keys, each once: the backref of each, in the file
    # extents' order, against the file extent itself
    named = dict(zip(data.keys(), zip(r_ino, r_off)))
    return set(tags) == {"data"} and set(roots) == {FS} and set(counts) == {1} and \
        list(map(named.__getitem__, bytenr)) == list(zip(e_ino, map(sub, e_off, offset)))


def _inside_inodes(ino_keys: list[tuple[int, int, int]], ino_bodies: list[bytes], e_ino: tuple[int, ...],
                   ends: list[int], num: tuple[int, ...]) -> bool:
    """Whether each inode's extents (sector-aligned, in key order, not overlapping) end within its
    size rounded up to a sector and add up to its nbytes."""
    rows = dict(zip(map(itemgetter(0), ino_keys), INODE.iter_unpack(b"".join(ino_bodies))))
    if len(set(e_ino)) == len(e_ino) and set(e_ino) <= rows.keys():  # one extent per inode, the common case
        mine = list(map(rows.__getitem__, e_ino))
        # an aligned end is within the size rounded up to a sector when it is below size + a sector
        return all(map(lt, ends, map(PAGE.__add__, map(itemgetter(0), mine)))) and list(map(itemgetter(1), mine)) == list(num)
    reach: dict[int, int] = {}
    total: dict[int, int] = defaultdict(int)
    for ino, end, n in zip(e_ino, ends, num):
        reach[ino] = end
        total[ino] += n
    for ino, end in reach.items():
        item = rows.get(ino)
        if item is not None and (end > -(-item[0] // PAGE) * PAGE or item[1] != total[ino]):
            return False
    return True
