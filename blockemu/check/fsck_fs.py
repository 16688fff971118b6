"""fsck passes over the filesystem's items: inodes and directories, data-extent
references, checksums, encryption. They work on the items the structural pass
collected (``Checker.items``), so nothing here reads a tree block again.

Each check names its class (the ``code`` of DESIGN §6) after the btrfs-check
or e2fsck problem it mirrors, and says where: tree, bytenr, key.
"""
from __future__ import annotations

import stat as st
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import compress, groupby, islice
from operator import add, itemgetter, le
from typing import TYPE_CHECKING, Any, Callable

from blockemu.engine.btree import max_item_size
from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.fast import INODE_ENCRYPTION_CONTEXT
from blockemu.ondisk.items import (
    DirEntry,
    ExtentItem,
    FileExtent,
    InodeItem,
    InodeRef,
    InodeRow,
    extref_hash,
    file_type,
    name_hash,
    symlink_ciphertext_max,
    unpack_dir_entries,
    unpack_dir_entries_one,
    unpack_file_extents,
    unpack_inode_extrefs,
    unpack_inode_refs,
    unpack_inode_refs_one,
    unpack_inode_rows,
    unpack_symlink_data,
)

if TYPE_CHECKING:
    from blockemu.check.fsck import Checker

FS = S.FS_TREE_OBJECTID
PAGE = S.SECTOR_SIZE
ROOT_INO = S.FIRST_FREE_OBJECTID


@dataclass
class FsItems:
    """The fs tree, decoded and indexed for cross-checks."""

    inodes: dict[int, InodeRow] = field(default_factory=dict)
    refs: dict[int, list[tuple[int, InodeRef]]] = field(default_factory=lambda: defaultdict(list))  # both kinds
    extrefs: dict[tuple[int, int, bytes], int] = field(default_factory=dict)  # (ino, dir, name) in an INODE_EXTREF: its key offset
    dir_items: dict[tuple[int, int], list[DirEntry]] = field(default_factory=dict)
    dir_index: dict[tuple[int, int], DirEntry] = field(default_factory=dict)
    extents: dict[int, list[tuple[int, FileExtent]]] = field(default_factory=lambda: defaultdict(list))
    policies: dict[int, bytes] = field(default_factory=dict)
    policy_flags: dict[int, int] = field(default_factory=dict)
    nonces: dict[int, bytes] = field(default_factory=dict)
    symlinks: dict[int, bytes] = field(default_factory=dict)  # FSCRYPT_SYMLINK bodies, by inode
    orphans: set[int] = field(default_factory=set)
    owners: set[int] = field(default_factory=set)  # every objectid with any item


def collect(ck: "Checker", only: frozenset[int] | None = None) -> FsItems:
    """Decode the fs tree's items by type, each type in bulk where its bodies have the common
    shape (the rest one by one, which names what is wrong). Problems are reported in key order,
    as a walk item by item would. ``only``: decode just these item types (what one pass reads)."""
    fi = FsItems()
    keys, bodies = ck.keys.get(FS, []), ck.bodies.get(FS, [])
    if only is not None:
        wanted = list(map(only.__contains__, map(itemgetter(1), keys)))
        keys, bodies = list(compress(keys, wanted)), list(compress(bodies, wanted))
    problems: list[tuple[int, CorruptionError]] = []
    types = [k[1] for k in keys]
    order = sorted(range(len(keys)), key=types.__getitem__)  # stable: by type, then in key order
    fi.owners = {k[0] for k in keys if k[1] != S.ORPHAN_ITEM or k[0] != S.ORPHAN_OBJECTID}
    for typ, group in groupby(order, key=types.__getitem__):
        pos = list(group)
        decode = _DECODERS.get(typ)
        if decode is None:
            if typ == S.ORPHAN_ITEM:
                fi.orphans.update(keys[i][2] for i in pos if keys[i][0] == S.ORPHAN_OBJECTID)
                pos = [i for i in pos if keys[i][0] != S.ORPHAN_OBJECTID]
            problems += ((i, CorruptionError(f"unknown item type {typ}", "UNKNOWN_KEY")) for i in pos)
            continue
        bulk, single = decode
        got = bulk([bodies[i] for i in pos]) if bulk else [None] * len(pos)
        if None in got:  # some bodies one by one: the general case, or what is wrong
            good = []
            for i, v in zip(pos, got):
                try:
                    good.append((i, single(bodies[i]) if v is None else v))
                except CorruptionError as e:
                    problems.append((i, e))
                    if typ == S.EXTENT_DATA:  # the inode's extents are still added up, without this one
                        fi.extents[keys[i][0]]
            pos, got = [i for i, _ in good], [v for _, v in good]
        _FILE[typ](fi, pos, [keys[i] for i in pos], got, problems)
    for i, e in sorted(problems, key=lambda p: p[0]):
        ck.error(e.kind, f"fs tree item {keys[i]}: {e}", FS, key=keys[i])
    return fi


Filed = Callable[[FsItems, list[int], list[tuple[int, int, int]], list, list[tuple[int, CorruptionError]]], None]


def _file_refs(fi: FsItems, pos: list[int], keys: list[tuple[int, int, int]], refs: list, problems: list) -> None:
    for k, v in zip(keys, refs):
        fi.refs[k[0]].extend([(k[2], r) for r in v])


def _file_extrefs(fi: FsItems, pos: list[int], keys: list[tuple[int, int, int]], refs: list, problems: list) -> None:
    """An INODE_EXTREF's names count as the inode's names, filed as an INODE_REF's are (the
    triangle and the link count see one kind); where each came from is kept for the messages."""
    for k, v in zip(keys, refs):
        fi.refs[k[0]].extend([(r.parent, InodeRef(r.index, r.name)) for r in v])
        # a name in two items is kept under the misfiled one's key: that copy is reported, and
        # neither is offered for removal under its hash (the second removal found nothing)
        for r in v:
            at = (k[0], r.parent, r.name)
            if at not in fi.extrefs or k[2] != extref_hash(r.parent, r.name):
                fi.extrefs[at] = k[2]


def _file_inodes(fi: FsItems, pos: list[int], keys: list[tuple[int, int, int]], rows: list, problems: list) -> None:
    """An INODE_ITEM's key offset is 0 (btrfs's tree-checker refuses any other): the filesystem
    looks the inode up at (ino, INODE_ITEM, 0), so one filed elsewhere is no inode to it -- fsck
    took it as the inode, said clean, and ls, cat and mount failed on the image."""
    for i, k, row in zip(pos, keys, rows):
        if k[2]:
            problems.append((i, CorruptionError(f"INODE_ITEM key offset {k[2]}, not 0", "BAD_ITEM")))
        else:
            fi.inodes[k[0]] = row


def _file_extents(fi: FsItems, pos: list[int], keys: list[tuple[int, int, int]], extents: list, problems: list) -> None:
    for k, v in zip(keys, extents):
        fi.extents[k[0]].append((k[2], v))


def _file_dir_index(fi: FsItems, pos: list[int], keys: list[tuple[int, int, int]], entries: list, problems: list) -> None:
    for i, k, v in zip(pos, keys, entries):
        if len(v) != 1:
            problems.append((i, CorruptionError(f"DIR_INDEX holds {len(v)} names", "BAD_ITEM")))
        else:
            fi.dir_index[(k[0], k[2])] = v[0]


def _file_policies(fi: FsItems, pos: list[int], keys: list[tuple[int, int, int]], bodies: list, problems: list) -> None:
    for i, k, body in zip(pos, keys, bodies):
        if k[2]:  # looked up at (ino, FSCRYPT_CTXT, 0), as the INODE_ITEM (_file_inodes): elsewhere it is no policy
            problems.append((i, CorruptionError(f"FSCRYPT_CTXT key offset {k[2]}, not 0", "BAD_ITEM")))
            continue
        if len(body) != INODE_ENCRYPTION_CONTEXT.size:
            problems.append((i, CorruptionError(f"encryption context of {len(body)} bytes", "BAD_ENCRYPTION_CONTEXT")))
            continue
        v = INODE_ENCRYPTION_CONTEXT.unpack(body)
        if v[0] != 2 or v[1] != S.CONTENTS_MODE_AES_256_XTS:
            problems.append((i, CorruptionError(f"encryption context version {v[0]} mode {v[1]}", "BAD_ENCRYPTION_CONTEXT")))
            continue
        fi.policies[k[0]] = v[5]
        fi.policy_flags[k[0]] = v[3]
        fi.nonces[k[0]] = v[6]


def policy_key_ids(ck: "Checker") -> set[bytes]:
    """The master key identifiers the image's encryption policies name (sound ones: the passes
    say what is wrong with the rest), from the fs tree's items as walked: no decoding pass."""
    size = INODE_ENCRYPTION_CONTEXT.size
    return {INODE_ENCRYPTION_CONTEXT.unpack(body)[5]
            for k, body in zip(ck.keys.get(FS, ()), ck.bodies.get(FS, ()))
            if k[1] == S.FSCRYPT_CTXT_ITEM and len(body) == size}


def _inode_row(body: bytes) -> InodeRow:
    InodeItem.unpack(body)  # raises what is wrong: the bulk decoder takes every body of the right size
    raise AssertionError("an inode body of the right size was left to the single decoder")


def _entries_one(bodies: list[bytes]) -> list[list[DirEntry] | None]:
    return [None if e is None else [e] for e in unpack_dir_entries_one(bodies)]


def _refs_one(bodies: list[bytes]) -> list[list[InodeRef] | None]:
    return [None if r is None else [r] for r in unpack_inode_refs_one(bodies)]


# item type -> (bulk decoder or None, decoder of one body), and how the decoded items are filed
_DECODERS: dict[int, tuple[Callable | None, Callable]] = {
    S.INODE_ITEM: (unpack_inode_rows, _inode_row),
    S.INODE_REF: (_refs_one, unpack_inode_refs),
    S.INODE_EXTREF: (None, unpack_inode_extrefs),
    S.DIR_ITEM: (_entries_one, unpack_dir_entries),
    S.DIR_INDEX: (_entries_one, unpack_dir_entries),
    S.EXTENT_DATA: (unpack_file_extents, FileExtent.unpack),
    S.FSCRYPT_CTXT_ITEM: (None, bytes),
    S.FSCRYPT_SYMLINK_ITEM: (None, bytes),
}
_FILE: dict[int, Filed] = {
    S.INODE_ITEM: _file_inodes,
    S.INODE_REF: _file_refs,
    S.INODE_EXTREF: _file_extrefs,
    S.DIR_ITEM: lambda fi, pos, keys, entries, problems: fi.dir_items.update(zip([(k[0], k[2]) for k in keys], entries)),
    S.DIR_INDEX: _file_dir_index,
    S.EXTENT_DATA: _file_extents,
    S.FSCRYPT_CTXT_ITEM: _file_policies,
    S.FSCRYPT_SYMLINK_ITEM: lambda fi, pos, keys, bodies, problems: fi.symlinks.update(zip([k[0] for k in keys], bodies)),
}


Stale = list[tuple[bytes, int]]  # (name, index) of references a rebuilt one replaces


def _refs_to_rebuild(fi: FsItems, dirs: set[int], kinds: dict[int, int], dir_items: set, hash_of: dict[bytes, int],
                     ref_names: set) -> dict[tuple[int, int, int], Stale]:
    """The entries (inode, directory, index) whose lost INODE_REF is rebuilt, rather than the
    inode dropped as nameless or a hard link's other names left without theirs: each names its
    inode whole (DIR_INDEX and DIR_ITEM agree, the entry's type the inode's). Only from a
    directory the root reaches by back references (or by ones rebuilt so): a nameless one is
    dropped with its entries, and a reference into it would name nothing; one reached from
    nowhere but the inode itself (its own entry, a descendant's) would make a cycle -- the root
    above all, which has no name to rebuild. A directory gets one name back, and only if it has
    none (a second would be a hard-linked directory); a file, every entry naming it in every
    directory reached (a file names nothing, so makes no cycle).

    A reference of the inode in the entry's directory that gives the entry's index another
    name, or its name another index, is *stale* if no entry names it whole (and the repair can
    find it to take out: not a misplaced INODE_EXTREF): the rebuilt reference replaces it, as
    btrfs check rebuilds an inode ref from the dir item and dir index (a stale copy two entries
    clash with -- one's name, the other's index -- goes with the first's fix, and the second's
    is rebuilt beside it: deferred to the next round, the link count was cut to one name in
    between) -- for a directory too, if those are all its references (its one name,
    mis-recorded). A whole one there leaves the entry reported. The value: the stale references
    each fix takes out, (name, index) each. Called only once an entry was found without its
    reference: a sound tree pays nothing."""
    found: dict[int, list[tuple[int, int, Stale]]] = defaultdict(list)  # directory -> what it names whole
    for (d, idx), e in sorted(fi.dir_index.items()):
        child = e.location[0]
        if (child, d, idx, e.name) in ref_names or d not in dirs or kinds.get(child) != e.type \
                or (d, hash_of.get(e.name), e.name, e.location) not in dir_items or child == ROOT_INO:
            continue
        refs = fi.refs.get(child, [])
        clashing = [r for p, r in refs if p == d and (r.index == idx or r.name == e.name)]
        if any(_whole(fi, child, d, r) or not _removable(fi, child, d, r.name) for r in clashing) \
                or child in dirs and len(clashing) < len(refs):
            continue
        found[d].append((child, idx, [(r.name, r.index) for r in clashing]))
    named_in: dict[int, list[int]] = defaultdict(list)
    for ino, refs in fi.refs.items():
        for parent, _ in refs:
            named_in[parent].append(ino)
    rebuilt: dict[tuple[int, int, int], Stale] = {}
    claimed: set[tuple[int, int, bytes, int]] = set()
    reached, todo = {ROOT_INO}, [ROOT_INO]
    while todo:
        d = todo.pop()
        for child in named_in.get(d, ()):
            if child not in reached:
                reached.add(child)
                todo.append(child)
        for child, idx, clashing in found.get(d, ()):
            # a copy another entry's fix takes out (it comes first: both are in ``d``) is not this one's
            stale = [ref for ref in clashing if (child, d, *ref) not in claimed]
            if child in dirs and child in reached and not stale:
                continue
            claimed.update((child, d, *ref) for ref in stale)
            if child not in reached:
                reached.add(child)
                todo.append(child)
            rebuilt[(child, d, idx)] = stale
    return rebuilt


def _whole(fi: FsItems, ino: int, parent: int, r: InodeRef) -> bool:
    """Whether the entry at ``r``'s index in ``parent`` is ``r``'s name, naming ``ino``."""
    e = fi.dir_index.get((parent, r.index))
    return e is not None and e.name == r.name and e.location[0] == ino


def _removable(fi: FsItems, ino: int, parent: int, name: bytes) -> bool:
    """Whether the repair finds ``ino``'s name ``name`` in ``parent`` where the filesystem looks
    for it (``backrefs.remove``): in the INODE_REF, or an INODE_EXTREF under its hash."""
    return _ref_item(fi, ino, parent, name)[0] == "INODE_REF" or fi.extrefs[(ino, parent, name)] == extref_hash(parent, name)


def _add_ref(ino: int, parent: int, index: int, name: bytes, stale: Stale) -> dict[str, Any]:
    """The fix that gives ``ino`` its reference to the entry (``index``, ``name``) in
    ``parent``, taking out the stale ones in its place first (``repair._apply``)."""
    return {"add_ref": (ino, parent, index, name), **({"stale": stale} if stale else {})}


def _ref_item(fi: FsItems, ino: int, parent: int, name: bytes) -> tuple[str, tuple[int, int, int]]:
    """The kind and key of the item holding ``ino``'s name ``name`` in ``parent``."""
    offset = fi.extrefs.get((ino, parent, name))
    return ("INODE_REF", (ino, S.INODE_REF, parent)) if offset is None else ("INODE_EXTREF", (ino, S.INODE_EXTREF, offset))


def _check_extref_keys(ck: "Checker", fi: FsItems, sb) -> None:
    """Each INODE_EXTREF name under its (directory, name) hash, on an image whose superblock
    allows extended references."""
    if fi.extrefs and not sb.incompat_flags & S.INCOMPAT_EXTENDED_IREF:
        ck.error("DIR_ITEM_MISMATCH", f"{len(fi.extrefs)} names in INODE_EXTREF items, but the superblock lacks "
                 "EXTENDED_IREF", FS, key=_ref_item(fi, *min(fi.extrefs))[1])
    for (ino, parent, name), offset in sorted(fi.extrefs.items()):
        if offset != extref_hash(parent, name):
            ck.error("DIR_ITEM_MISMATCH", f"INODE_EXTREF {offset} of {ino} holds {name!r} in {parent}, whose hash is "
                     f"{extref_hash(parent, name)}", FS, key=(ino, S.INODE_EXTREF, offset))


def check_inodes(ck: "Checker", fi: FsItems, sb) -> None:
    """The INODE_ITEM / INODE_REF (and INODE_EXTREF) / DIR_ITEM / DIR_INDEX triangle, link
    counts and sizes."""
    _check_extref_keys(ck, fi, sb)
    if ROOT_INO not in fi.inodes or not st.S_ISDIR(fi.inodes[ROOT_INO].mode):
        ck.error("MISSING_INODE", "the root directory (inode 256) is missing or not a directory", FS, key=(ROOT_INO, 1, 0))
    for oid in sorted(fi.owners - fi.inodes.keys()):
        ck.error("MISSING_INODE", f"items of inode {oid}, which has no INODE_ITEM", FS, key=(oid, S.INODE_ITEM, 0),
                 fix={"drop_inode": oid})
    subdirs: dict[int, int] = defaultdict(int)
    names: dict[int, int] = defaultdict(int)
    # each side of the triangle as a set, so each entry is checked by lookups rather than scans
    dirs = {ino for ino, item in fi.inodes.items() if st.S_ISDIR(item.mode)}
    kinds = {ino: file_type(item.mode) for ino, item in fi.inodes.items()}
    ref_names = {(ino, p, r.index, r.name) for ino, refs in fi.refs.items() for p, r in refs}
    hashed = {(d, h, e): name_hash(e.name) for (d, h), entries in fi.dir_items.items() for e in entries}
    dir_items = {(d, h, e.name, e.location) for d, h, e in hashed}
    hash_of = {e.name: h for (_, _, e), h in hashed.items()}
    rebuilt: dict[tuple[int, int, int], Stale] | None = None  # found on the first entry without its INODE_REF
    for (d, idx), e in sorted(fi.dir_index.items()):
        child = e.location[0]
        names[d] += 2 * len(e.name)
        if d not in dirs:
            ck.error("DANGLING_ENTRY", f"DIR_INDEX {idx} of {d}, which is not a directory", FS, key=(d, S.DIR_INDEX, idx))
        if child not in kinds:
            ck.error("DANGLING_ENTRY", f"entry {e.name!r} in directory {d} points to missing inode {child}", FS,
                     key=(d, S.DIR_INDEX, idx), fix={"drop_entry": (d, idx, e.name)})
            continue
        if child in dirs:
            subdirs[d] += 1
        if e.type != kinds[child]:
            ck.error("DIR_ITEM_MISMATCH", f"entry {e.name!r} in {d} has type {e.type}, inode {child} has mode "
                     f"{oct(fi.inodes[child].mode)}", FS, key=(d, S.DIR_INDEX, idx))
        h = hash_of.get(e.name) or name_hash(e.name)
        if (child, d, idx, e.name) not in ref_names:
            if rebuilt is None:
                rebuilt = _refs_to_rebuild(fi, dirs, kinds, dir_items, hash_of, ref_names)
            ck.error("DIR_ITEM_MISMATCH", f"entry {e.name!r} (index {idx}) in directory {d} names inode {child}, "
                     f"but no INODE_REF in inode {child} names it back", FS, key=(child, S.INODE_REF, d),
                     fix=_add_ref(child, d, idx, e.name, rebuilt[(child, d, idx)]) if (child, d, idx) in rebuilt else None)
        if (d, h, e.name, e.location) not in dir_items:
            ck.error("DIR_ITEM_MISMATCH", f"entry {e.name!r} in {d} has a DIR_INDEX but no DIR_ITEM", FS,
                     key=(d, S.DIR_ITEM, h))
    indexed = {(d, e.name) for (d, _), e in fi.dir_index.items()}
    entry_names = {(d, e.name, e.location[0]) for (d, _), e in fi.dir_index.items()}
    for (d, h), entries in sorted(fi.dir_items.items()):
        for e in entries:
            if hashed[(d, h, e)] != h:
                ck.error("DIR_ITEM_MISMATCH", f"DIR_ITEM {h} of {d} holds {e.name!r}, whose hash is {name_hash(e.name)}",
                         FS, key=(d, S.DIR_ITEM, h))
            elif (d, e.name) not in indexed:
                ck.error("DIR_ITEM_MISMATCH", f"DIR_ITEM {e.name!r} in {d} has no DIR_INDEX", FS, key=(d, S.DIR_ITEM, h))
    # each inode's names the repair gives back, counted as names: its link count is judged by them too
    regained: dict[int, int] = defaultdict(int)
    replaced: set[tuple[int, int, bytes, int]] = set()  # the stale references those replace
    for (ino, d, _), stale in (rebuilt or {}).items():
        regained[ino] += 1
        replaced.update((ino, d, name, index) for name, index in stale)
    for ino, item in sorted(fi.inodes.items()):
        refs = fi.refs.get(ino, [])
        if ino == ROOT_INO:  # the root's ".." reference to itself, as btrfs keeps it
            refs = [(p, r) for p, r in refs if not (p == ROOT_INO and r.name == b"..")]
        wrong = [(parent, r, e) for parent, r in refs
                 if (e := fi.dir_index.get((parent, r.index))) is None or e.name != r.name or e.location[0] != ino]
        # a name held twice -- its name and index again, in the INODE_REF or an INODE_EXTREF beside
        # it -- is one link: the copy is reported and goes. (Counted as a second link, the repair
        # raised nlink to match, and the file outlived its last name.)
        wrong_at = {(parent, r.name, r.index) for parent, r, _ in wrong}
        seen: set[tuple[int, bytes, int]] = set()
        twice: list[tuple[int, InodeRef]] = []
        for parent, r in refs:
            if (parent, r.name, r.index) in seen and (parent, r.name, r.index) not in wrong_at:
                twice.append((parent, r))
            seen.add((parent, r.name, r.index))
        for parent, r in twice:
            kind, key = _ref_item(fi, ino, parent, r.name)
            ck.error("DIR_ITEM_MISMATCH", f"{kind} of {ino} names {r.name!r} (index {r.index}) in {parent} a second "
                     "time", FS, key=key, fix={"drop_ref": (ino, parent, r.name, r.index), "copy": kind}
                     if _removable(fi, ino, parent, r.name) else None)
        names_held = len(refs) - len(twice)
        # names no entry gives the inode at all (a misplaced extref excepted: the repair would not
        # find it) are dropped -- only while the inode keeps another name, so that a lost entry
        # never costs a file its data
        # (a stale one a rebuilt reference replaces goes with that fix, not by its own)
        stale = sum((ino, parent, r.name, r.index) in replaced for parent, r, _ in wrong)
        # -- each copy by its index: a stale copy a rebuilt reference replaces may share its name
        # with a dangling one, and counted (and removed) twice it cut the link count by one too many
        dangling = {(parent, r.name, r.index) for parent, r, _ in wrong
                    if (parent, r.name, ino) not in entry_names
                    and (parent, name_hash(r.name), r.name, (ino, S.INODE_ITEM, 0)) not in dir_items
                    and _removable(fi, ino, parent, r.name) and (ino, parent, r.name, r.index) not in replaced}
        # counted as references, not as names: one name held twice (an INODE_REF and an
        # INODE_EXTREF) is one name, and both copies would go
        dropped = sum((parent, r.name, r.index) in dangling for parent, r, _ in wrong)
        if names_held - stale + regained[ino] <= dropped:
            dangling, dropped = set(), 0
        for parent, r, e in wrong:
            kind, key = _ref_item(fi, ino, parent, r.name)
            fix = {"drop_ref": (ino, parent, r.name, r.index)} if (parent, r.name, r.index) in dangling else None
            if e is None:
                ck.error("DIR_ITEM_MISMATCH", f"{kind} of {ino} names {r.name!r} in {parent}, which has no such entry",
                         FS, key=key, fix=fix)
            else:
                ck.error("DIR_ITEM_MISMATCH", f"{kind} of {ino} names {r.name!r} (index {r.index}) in {parent}, whose "
                         f"DIR_INDEX {r.index} names {e.name!r} (inode {e.location[0]})", FS, key=key, fix=fix)
        is_dir = st.S_ISDIR(item.mode)
        if is_dir and names_held > 1:
            ck.error("NLINK_MISMATCH", f"directory {ino} has {names_held} names (a hard-linked directory)", FS,
                     key=_ref_item(fi, ino, refs[1][0], refs[1][1].name)[1])
        if st.S_ISLNK(item.mode) and not 0 < item.size < PAGE and ino not in fi.orphans:
            ck.error("ISIZE_MISMATCH", f"symbolic link {ino} has size {item.size}: a target is 1 to {PAGE - 1} bytes",
                     FS, key=(ino, S.INODE_ITEM, 0))
        if ino == ROOT_INO:
            want = 2 + subdirs[ino]
        elif is_dir:
            want = (2 + subdirs[ino]) if refs or regained[ino] else 0
        else:
            want = names_held + regained[ino] - dropped - stale
        if item.nlink != want:
            ck.error("NLINK_MISMATCH", f"inode {ino} nlink {item.nlink}, found {want}", FS, key=(ino, S.INODE_ITEM, 0),
                     fix={"inode": ino, "nlink": want} if want else None)
        if not refs and ino != ROOT_INO and ino not in fi.orphans and not regained[ino]:
            ck.error("ORPHAN", f"inode {ino} has no name and no orphan item", FS, key=(ino, S.INODE_ITEM, 0),
                     fix={"drop_inode": ino})
        if item.size > S.MAX_FILE_SIZE:
            ck.error("ISIZE_MISMATCH", f"inode {ino}: size {item.size} exceeds the largest file size {S.MAX_FILE_SIZE}",
                     FS, key=(ino, S.INODE_ITEM, 0))
        if is_dir and item.size != names[ino]:
            ck.error("ISIZE_MISMATCH", f"directory {ino} size {item.size}, its names add up to {names[ino]}", FS,
                     key=(ino, S.INODE_ITEM, 0), fix={"inode": ino, "size": names[ino]})
    for ino in sorted(fi.orphans - fi.inodes.keys()):
        ck.error("ORPHAN", f"orphan item for missing inode {ino}", FS, key=(S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, ino),
                 fix={"delete": (FS, (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, ino))})


def check_file_extents(ck: "Checker", fi: FsItems, data: dict[int, tuple[int, ExtentItem]]) -> None:
    """File extents against the inode (size, nbytes, overlap) and the extent tree (refs and backrefs).

    Each extent and each data extent is first tried against what a sound one is, in one test;
    only one that fails it goes through the checks one by one, which say what is wrong."""
    found: dict[int, dict[tuple[int, int], int]] = {}
    lengths = {bytenr: length for bytenr, (length, _) in data.items()}
    for ino, maps in sorted(fi.extents.items()):
        item = fi.inodes.get(ino)
        end = nbytes = 0
        for off, fe in sorted(maps, key=itemgetter(0)) if len(maps) > 1 else maps:
            _, ram_bytes, _, _, _, kind, bytenr, disk_bytes, offset, num_bytes, _ = fe
            if off < end or kind != S.FILE_EXTENT_REG or (off | num_bytes | offset) % PAGE \
                    or offset + num_bytes > disk_bytes or ram_bytes != disk_bytes or lengths.get(bytenr) != disk_bytes:
                _file_extent_problems(ck, ino, off, fe, end, data)
            if off + num_bytes > end:
                end = off + num_bytes
            nbytes += num_bytes
            refs = found.setdefault(bytenr, {})
            refs[(ino, off - offset)] = refs.get((ino, off - offset), 0) + 1
        if item is not None:
            if end > -(-item.size // PAGE) * PAGE:
                ck.error("ISIZE_MISMATCH", f"inode {ino}: size {item.size} but extents reach {end}", FS,
                         key=(ino, S.INODE_ITEM, 0))
            if item.nbytes != nbytes:
                ck.error("NBYTES_MISMATCH", f"inode {ino}: nbytes {item.nbytes}, extents add up to {nbytes}", FS,
                         key=(ino, S.INODE_ITEM, 0), fix={"inode": ino, "nbytes": nbytes})
    for bytenr in sorted(b for b, (_, ei) in data.items() if not _one_backref(ei, found.get(b))):
        length, ei = data[bytenr]
        refs = found.get(bytenr, {})
        backrefs = {(r[2], r[3]): r[4] for r in ei.refs if r[0] == "data"}
        roots = sorted({r[1] for r in ei.refs if r[0] == "data"} - {FS})  # file data lives in the fs tree alone
        total = sum(refs.values())
        if total != ei.refs_count or backrefs != dict(refs) or roots:
            fix: dict | None
            if any(not 0 <= off < 1 << 64 for _, off in refs):
                fix = None  # a file extent with a wild ``offset`` makes a back reference no item can hold
            elif total:
                refs_now = tuple(("data", FS, ino, off, n) for (ino, off), n in sorted(refs.items()))
                fix = {"extent_item": (bytenr, S.EXTENT_ITEM, length), "body": ei._replace(refs_count=total, refs=refs_now)}
            else:  # nothing references it any more: free it (the free-space rebuild returns the space)
                fix = {"drop_extent": (bytenr, length)}
            ck.error("EXTENT_REF_MISMATCH", f"data extent [{bytenr}, +{length}]: refs {ei.refs_count} backrefs "
                     f"{sorted(backrefs.items())}" + (f" in trees {roots}" if roots else "") +
                     f", found {total} references {sorted(refs.items())}",
                     S.EXTENT_TREE_OBJECTID, bytenr, (bytenr, S.EXTENT_ITEM, length), fix=fix)


def _file_extent_problems(ck: "Checker", ino: int, off: int, fe: FileExtent, end: int,
                          data: dict[int, tuple[int, ExtentItem]]) -> None:
    """What is wrong with one file extent (``end``: where the inode's extents before it reach)."""
    key = (ino, S.EXTENT_DATA, off)
    if off < end:
        ck.error("FILE_EXTENT_OVERLAP", f"inode {ino}: extent at {off} overlaps the previous one ending at {end}",
                 FS, key=key)
    if fe.type != S.FILE_EXTENT_REG or off % PAGE or fe.num_bytes % PAGE or fe.offset % PAGE:
        ck.error("BAD_FILE_EXTENT", f"inode {ino}: extent at {off} is not a sector-aligned regular extent", FS, key=key)
    if fe.offset + fe.num_bytes > fe.disk_num_bytes:
        ck.error("BAD_FILE_EXTENT", f"inode {ino}: extent at {off} reaches past its data extent", FS, key=key)
    if fe.ram_bytes != fe.disk_num_bytes:  # nothing is compressed: the plaintext is as long as the extent
        ck.error("BAD_FILE_EXTENT", f"inode {ino}: extent at {off} has ram_bytes {fe.ram_bytes}, its data "
                 f"extent is {fe.disk_num_bytes} bytes", FS, key=key)
    if fe.disk_bytenr not in data or data[fe.disk_bytenr][0] != fe.disk_num_bytes:
        ck.error("EXTENT_REF_MISMATCH", f"inode {ino}: extent at {off} points to [{fe.disk_bytenr}, "
                 f"+{fe.disk_num_bytes}), which the extent tree does not hold", FS, fe.disk_bytenr, key)


def _one_backref(ei: ExtentItem, refs: dict[tuple[int, int], int] | None) -> bool:
    """An extent with one data backref, which the one file extent referencing it matches."""
    if refs is None or len(refs) != 1 or len(ei.refs) != 1 or len(ei.refs[0]) != 5:
        return False
    ((where, n),) = refs.items()
    kind, root, ino, off, count = ei.refs[0]
    return kind == "data" and root == FS and (ino, off) == where and count == n == ei.refs_count


def check_csums(ck: "Checker", sb, data: dict[int, tuple[int, ExtentItem]], read: Callable[[int, int], bytes] | None,
                advance: Callable[[int], None], master: bytes | None = None) -> None:
    """Every data sector has exactly one checksum, and (with ``read``) matches it; a mismatch
    names the files holding the sector (with ``master``, their names in its directories decrypted).

    Work and memory follow the checksum items, not the extents' lengths: an extent's sectors
    without a checksum are counted by bisection and reported once per extent, so a hostile
    1 TiB extent costs what a small one does (only ``read`` touches every sector, by design)."""
    size = csums.csum_size(sb.csum_type)
    if read is None and _one_item_per_extent(ck.keys.get(S.CSUM_TREE_OBJECTID, []), ck.bodies.get(S.CSUM_TREE_OBJECTID, []),
                                             size, data):
        total = sum(map(itemgetter(0), data.values()))
        advance(total)  # at once: each extent is done with
        ck.report.stats["data_sectors"] = total // PAGE
        return
    items = ck.pairs(S.CSUM_TREE_OBJECTID)
    spans = [(key[2], key[2] + len(body) // size * PAGE) for key, body in items if _csum_item_ok(key, body, size)]
    # items in ascending order, none overlapping the next, as every writer leaves them: the sectors
    # are ranges, and only a data check needs each sector's checksum by itself
    by_range = read is None and all(map(le, map(itemgetter(1), spans), map(itemgetter(0), islice(spans, 1, None))))
    sums: dict[int, bytes] = {}
    sectors: list[int] = []
    for key, body in items:
        if not _csum_item_ok(key, body, size):
            ck.error("BAD_ITEM", f"checksum item {key} is malformed", S.CSUM_TREE_OBJECTID, key[2], key)
            continue
        start = key[2]
        if by_range:
            sectors.extend(range(start, start + len(body) // size * PAGE, PAGE))
            continue
        for i in range(len(body) // size):
            sector = start + i * PAGE
            if sector in sums:
                ck.error("CSUM_OVERLAP", f"sector {sector} has two checksums", S.CSUM_TREE_OBJECTID, sector, key)
            sums[sector] = body[i * size : (i + 1) * size]
    if not by_range:
        sectors = sorted(sums)
    files = FileNames(ck, master)
    runs: list[list[int]] = []  # the data extents merged into disjoint [start, end)
    for bytenr, (length, _) in sorted(data.items()):
        end = bytenr + length
        lo, hi = bisect_left(sectors, bytenr), bisect_left(sectors, end)
        if hi - lo < length // PAGE:
            first = bytenr + next((k for k, s in enumerate(sectors[lo:hi]) if s != bytenr + k * PAGE), hi - lo) * PAGE
            ck.error("MISSING_CSUM", f"data extent [{bytenr}, +{length}): {length // PAGE - (hi - lo)} of its "
                     f"{length // PAGE} sectors have no checksum, the first at {first}", S.CSUM_TREE_OBJECTID, first)
        for sector in sectors[lo:hi] if read is not None else ():
            want = sums[sector]
            try:
                got = csums.digest(sb.csum_type, read(sector, PAGE))
            except CorruptionError as e:
                ck.error("CSUM_MISMATCH", f"data sector {sector}{files.holding(data[bytenr][1], bytenr, sector)}: {e}",
                         S.CSUM_TREE_OBJECTID, sector)
                continue
            if got != want:
                ck.error("CSUM_MISMATCH", f"data sector {sector}{files.holding(data[bytenr][1], bytenr, sector)}: "
                         f"checksum {got.hex()}, expected {want.hex()}", S.CSUM_TREE_OBJECTID, sector)
        if runs and bytenr <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([bytenr, end])
        advance(length)
    ck.report.stats["data_sectors"] = sum(e - s for s, e in runs) // PAGE
    if sum(bisect_left(sectors, e) - bisect_left(sectors, s) for s, e in runs) == len(sectors):
        return  # every checksum lies in a data extent
    stray, r = [], 0
    for sector in sectors:
        while r < len(runs) and runs[r][1] <= sector:
            r += 1
        if r == len(runs) or sector < runs[r][0]:
            stray.append(sector)
    bodies = dict(items)
    item_of = {key[2] + i * PAGE: key for key, body in bodies.items() for i in range(len(body) // size)}
    # one finding per run of stray sectors within one item (one an extent's worth of sectors
    # printed a line each): a run that is the whole item carries the fix that deletes it
    runs_of: list[tuple[tuple, int, int]] = []  # (item, first sector, sectors)
    for sector in stray:
        key = item_of[sector]
        if runs_of and runs_of[-1][0] == key and runs_of[-1][1] + runs_of[-1][2] * PAGE == sector:
            runs_of[-1] = (key, runs_of[-1][1], runs_of[-1][2] + 1)
        else:
            runs_of.append((key, sector, 1))
    for key, first, n in runs_of:
        whole = n == len(bodies[key]) // size
        what = f"sector {first}" if n == 1 else f"{n} sectors [{first}, +{n * PAGE})"
        ck.error("ORPHAN_CSUM", f"checksums for {what}, which no data extent holds", S.CSUM_TREE_OBJECTID, first,
                 key, fix={"delete": (S.CSUM_TREE_OBJECTID, key)} if whole else None)


class FileNames:
    """Which files hold a data sector, for a CSUM_MISMATCH to name them, not only the sector: the
    extent's data backrefs give the inodes, their INODE_REF chains the paths (names as stored; in
    an encrypted directory the name decrypted with ``master`` when it is the directory's key, else
    the no-key name ``ls`` shows). The names are decoded at the first mismatch only: a sound image
    never pays for them."""

    def __init__(self, ck: "Checker", master: bytes | None = None) -> None:
        self.ck = ck
        self.master = master
        self.items: FsItems | None = None

    def holding(self, item: ExtentItem, bytenr: int, sector: int) -> str:
        """`` (inode 257 at file offset 8192: /d/f)``, one entry per referencing inode."""
        where = [f"inode {ino} at file offset {off + sector - bytenr}{self.path(ino)}"
                 for kind, root, ino, off, _ in (r for r in item.refs if r[0] == "data") if root == FS]
        return f" ({'; '.join(where)})" if where else ""

    def path(self, ino: int) -> str:
        """``: /d/f``, or nothing when a name on the way up is missing (the inode passes say why)."""
        if self.items is None:
            mark = len(self.ck.report.errors)
            self.items = collect(self.ck, only=frozenset((S.INODE_REF, S.INODE_EXTREF, S.FSCRYPT_CTXT_ITEM)))
            del self.ck.report.errors[mark:]  # what is wrong with these items is the inode passes' to say
        names: list[str] = []
        while ino != ROOT_INO:
            refs = self.items.refs.get(ino)
            if not refs or len(names) > 4096:  # no name, or a loop
                return ""
            parent, ref = refs[0]
            names.append(self.name(parent, ref.name))
            ino = parent
        return ": /" + "/".join(reversed(names))

    def name(self, parent: int, stored: bytes) -> str:
        items = self.items
        assert items is not None
        if parent in items.policies:
            from blockemu.crypto import fscrypt  # a cipher import, for a damaged encrypted file only

            if self.master is not None and items.policies[parent] == fscrypt.key_identifier(self.master) \
                    and parent in items.nonces:
                key = fscrypt.names_key(self.master, items.nonces[parent])
                try:
                    stored = bytes(fscrypt.decrypt_name(key, stored))
                except (OSError, ValueError):
                    return fscrypt.nokey_name(stored, name_hash(stored))  # not a name this key made
                finally:
                    fscrypt.wipe(key)
            else:
                return fscrypt.nokey_name(stored, name_hash(stored))
        return stored.decode(errors="backslashreplace")


def _one_item_per_extent(keys: list[tuple[int, int, int]], bodies: list[bytes], size: int,
                         data: dict[int, tuple[int, ExtentItem]]) -> bool:
    """Whether the checksum items are exactly what every writer leaves, which the check below
    would pass without a word: each well formed, and their ranges, in key order, the data
    extents' ranges one for one. Decided over whole columns (a few C-level passes instead of a
    Python loop per sector); anything else takes the general path, which names what is wrong."""
    if not keys:
        return not data
    lens = list(map(len, bodies))
    if set(map(itemgetter(0), keys)) != {S.EXTENT_CSUM_OBJECTID} or set(map(itemgetter(1), keys)) != {S.EXTENT_CSUM} \
            or not all(lens) \
            or any(map(size.__rmod__, lens)):
        return False
    starts = list(map(itemgetter(2), keys))
    if any(map(PAGE.__rmod__, starts)):
        return False
    ends = list(map(add, starts, map(PAGE.__mul__, map(size.__rfloordiv__, lens))))
    extents = sorted(data.items())
    return starts == list(map(itemgetter(0), extents)) \
        and ends == [start + length for start, (length, _) in extents] \
        and all(map(le, ends, islice(starts, 1, None)))


def _csum_item_ok(key: tuple[int, int, int], body: bytes, size: int) -> bool:
    return (key[0], key[1]) == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM) and not key[2] % PAGE and bool(body) \
        and not len(body) % size


def check_encrypted_names(ck: "Checker", fi: FsItems, master: bytes | None) -> None:
    """Each name of an encrypted directory has a length its padding can give (no key needed:
    the hash checks are over the stored bytes already); with the directory's master key, it
    decrypts to a legal name: no ``/``, no NUL before the padding, not ``.`` or ``..``."""
    if not fi.policies:
        return  # nothing encrypted: the check needs no cipher (importing one is a tenth of the command's start)
    from blockemu.crypto import fscrypt

    ident = fscrypt.key_identifier(master) if master is not None else None
    keys: dict[int, bytearray] = {}
    try:
        for (d, idx), e in sorted(fi.dir_index.items()):
            if d not in fi.policies:
                continue
            where = (d, S.DIR_INDEX, idx)
            if not fscrypt.legal_encrypted_len(len(e.name), fi.policy_flags[d]):
                ck.error("BAD_ENCRYPTED_NAME", f"a name of {len(e.name)} bytes in encrypted directory {d} is no padded "
                         f"ciphertext (policy flags {fi.policy_flags[d]})", FS, key=where)
            elif master is not None and fi.policies[d] == ident:
                if d not in keys:
                    keys[d] = fscrypt.names_key(master, fi.nonces[d])
                name = fscrypt.decrypt_name(keys[d], e.name)
                if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                    ck.error("BAD_ENCRYPTED_NAME", f"name {idx} of encrypted directory {d} decrypts to {name!r}, "
                             f"no legal name", FS, key=where)
    finally:
        for k in keys.values():
            fscrypt.wipe(k)


def check_encrypted_symlinks(ck: "Checker", fi: FsItems, sb, master: bytes | None) -> None:
    """Each FSCRYPT_SYMLINK item belongs to an encrypted symlink, on an image whose superblock
    says so, and is what fscrypt stores -- a length that says exactly what follows, a ciphertext
    length its padding can give, i_size the stored length, no extents beside it; with the master
    key, the ciphertext decrypts to a legal target: not empty, no NUL before the padding."""
    if not fi.symlinks:
        return
    from blockemu.crypto import fscrypt

    limit = symlink_ciphertext_max(max_item_size(sb.nodesize))
    ident = fscrypt.key_identifier(master) if master is not None else None
    for ino, body in sorted(fi.symlinks.items()):
        where = (ino, S.FSCRYPT_SYMLINK_ITEM, 0)
        item = fi.inodes.get(ino)
        if item is None:
            continue  # MISSING_INODE already says so
        if not sb.incompat_flags & S.INCOMPAT_ENCRYPTED_SYMLINKS:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"inode {ino} has an inline encrypted target, but the superblock "
                     f"lacks ENCRYPTED_SYMLINKS", FS, key=where)
        if not st.S_ISLNK(item.mode) or ino not in fi.policies:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"inode {ino} (mode {oct(item.mode)}) holds an encrypted symlink target "
                     f"but is no encrypted symbolic link", FS, key=where)
            continue
        try:
            ciphertext = unpack_symlink_data(body)
        except CorruptionError as e:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino}: {e}", FS, key=where)
            continue
        if not fscrypt.legal_encrypted_len(len(ciphertext), fi.policy_flags[ino], limit):
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino}: a ciphertext of {len(ciphertext)} bytes is no "
                     f"padded target (policy flags {fi.policy_flags[ino]}, at most {limit} bytes)", FS, key=where)
        if item.size != len(body):
            ck.error("ISIZE_MISMATCH", f"symbolic link {ino}: size {item.size}, its stored target is {len(body)} bytes",
                     FS, key=(ino, S.INODE_ITEM, 0), fix={"inode": ino, "size": len(body)})
        if fi.extents.get(ino):
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino} has file extents beside its inline target", FS,
                     key=(ino, S.EXTENT_DATA, fi.extents[ino][0][0]))
        if master is None or fi.policies[ino] != ident or len(ciphertext) < fscrypt.FNAME_MIN_LEN:
            continue
        key = fscrypt.names_key(master, fi.nonces[ino])
        try:
            target = fscrypt.decrypt_name(key, ciphertext)
        finally:
            fscrypt.wipe(key)
        if not target or b"\0" in target:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino} decrypts to {target[:32]!r}, no legal target", FS,
                     key=where)


def check_encryption(ck: "Checker", fi: FsItems) -> None:
    """Policies are inherited; every extent of an encrypted file carries its context; no nonce twice."""
    for (d, idx), e in sorted(fi.dir_index.items()):
        child = e.location[0]
        if d in fi.policies and child in fi.inodes and fi.policies.get(child) != fi.policies[d]:
            ck.error("POLICY_MISMATCH", f"{e.name!r} in encrypted directory {d} lacks its policy", FS,
                     key=(child, S.FSCRYPT_CTXT_ITEM, 0))
    owner_of_nonce: dict[bytes, int] = {}
    for ino, maps in sorted(fi.extents.items()):
        policy = fi.policies.get(ino)
        for off, fe in maps:
            key = (ino, S.EXTENT_DATA, off)
            ctx = fe.context
            if policy is not None and ctx is None:
                ck.error("UNENCRYPTED_EXTENT_IN_ENCRYPTED_FILE", f"inode {ino}: extent at {off} is plaintext", FS,
                         fe.disk_bytenr, key)
                continue
            if ctx is None:
                continue
            if policy is None:
                ck.error("ENCRYPTION_CONTEXT_MISMATCH", f"inode {ino} has no policy but its extent at {off} is encrypted",
                         FS, fe.disk_bytenr, key)
            elif ctx.key_identifier != policy or ctx.contents_mode != S.CONTENTS_MODE_AES_256_XTS:
                ck.error("ENCRYPTION_CONTEXT_MISMATCH", f"inode {ino}: extent at {off} uses key {ctx.key_identifier.hex()} "
                         f"mode {ctx.contents_mode}, the policy says {policy.hex()} mode 1", FS, fe.disk_bytenr, key)
            if ctx.version != 1 or ctx.log2_data_unit_size != 12:
                ck.error("BAD_ENCRYPTION_CONTEXT", f"inode {ino}: extent at {off} has context version {ctx.version}, "
                         f"data unit 2^{ctx.log2_data_unit_size}", FS, fe.disk_bytenr, key)
            first = owner_of_nonce.setdefault(ctx.nonce, fe.disk_bytenr)
            if first != fe.disk_bytenr:
                ck.error("NONCE_REUSE", f"extents {first} and {fe.disk_bytenr} share nonce {ctx.nonce.hex()}", FS,
                         fe.disk_bytenr, key)

