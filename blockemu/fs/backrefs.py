"""An inode's back references: the items that say which names it has, in which directories.

btrfs keeps every name an inode has in one directory in one INODE_REF item (inode, 12, dir).
Once a name would grow that item past what a leaf holds, it goes to an INODE_EXTREF item
(inode, 13, extref_hash(dir, name)) instead -- on an image with EXTENDED_IREF, which mkfs sets
-- as ``btrfs_insert_inode_ref`` falls back to ``btrfs_insert_inode_extref``; without the bit
the name is refused (EMLINK), as btrfs does on a filesystem made without extended refs. So a
hard link's names are bounded by the link count alone (``LINK_MAX``), not by an item's size.

The filesystem places and removes names through here, and repair when it rebuilds a lost
reference, so the two cannot disagree about where a name lives; readers of names (a path for
a message or a FUSE request, the directories an inode is in) see both kinds.
"""
from __future__ import annotations

from typing import Iterator

from blockemu.engine.btree import BTree
from blockemu.errors import CorruptionError, NameOverflow, TooManyLinks
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import (
    InodeExtref,
    InodeRef,
    extref_hash,
    pack_inode_extrefs,
    pack_inode_refs,
    unpack_inode_extrefs,
    unpack_inode_refs,
)

LAST = (1 << 64) - 1


def _refs(tree: BTree, ino: int, parent: int) -> list[InodeRef]:
    body = tree.get((ino, S.INODE_REF, parent))
    return unpack_inode_refs(body) if body is not None else []


def _extrefs(tree: BTree, key: tuple[int, int, int]) -> list[InodeExtref]:
    body = tree.get(key)
    return unpack_inode_extrefs(body) if body is not None else []


def check_fits(tree: BTree, ino: int, parent: int, name: bytes, extended: bool, leaving: bytes | None = None) -> None:
    """EMLINK or EOVERFLOW, before any change, if ``ino`` cannot get the name ``name`` in
    ``parent``: the INODE_REF there is full and the image has no extended refs (EMLINK), or the
    INODE_EXTREF the name hashes to is full of colliding names (EOVERFLOW, as a full DIR_ITEM).
    ``leaving``: a name of ``ino`` in ``parent`` a rename removes first."""
    refs = [r for r in _refs(tree, ino, parent) if r.name != leaving]
    if len(pack_inode_refs([*refs, InodeRef(0, name)])) <= tree.max_item:
        return
    if not extended:
        raise TooManyLinks(f"{name!r}: too many links to inode {ino} in directory inode {parent} "
                           "(the image has no extended references: EXTENDED_IREF)")
    ext = [r for r in _extrefs(tree, (ino, S.INODE_EXTREF, extref_hash(parent, name)))
           if (r.parent, r.name) != (parent, leaving)]
    if len(pack_inode_extrefs([*ext, InodeExtref(parent, 0, name)])) > tree.max_item:
        raise NameOverflow(f"{name!r}: too many names with its hash among inode {ino}'s extended references")


def add(tree: BTree, ino: int, parent: int, index: int, name: bytes, extended: bool) -> None:
    """Record that ``ino`` is named ``name`` (DIR_INDEX ``index``) in ``parent``: in the
    INODE_REF while the name fits there, else in its INODE_EXTREF (``check_fits`` said one does)."""
    body = pack_inode_refs([*_refs(tree, ino, parent), InodeRef(index, name)])  # with its other names here
    if len(body) <= tree.max_item or not extended:
        tree.insert((ino, S.INODE_REF, parent), body, replace=True)
        return
    key = (ino, S.INODE_EXTREF, extref_hash(parent, name))
    tree.insert(key, pack_inode_extrefs([*_extrefs(tree, key), InodeExtref(parent, index, name)]), replace=True)


def remove(tree: BTree, ino: int, parent: int, name: bytes, index: int | None = None, *,
           extref_first: bool = False) -> int:
    """Remove the name ``name`` of ``ino`` in ``parent`` from whichever item holds it; its
    DIR_INDEX index. ``index``: only the copy of the name giving that index (repair drops a
    stale copy of a name that another copy, or the rebuilt one, holds rightly).
    ``extref_first``: of a name held in both items, the INODE_EXTREF's copy goes (repair
    removes the copy fsck named: the INODE_REF is where the name belongs while it fits)."""
    order = (_remove_extref, _remove_ref) if extref_first else (_remove_ref, _remove_extref)
    for take in order:
        if (at := take(tree, ino, parent, name, index)) is not None:
            return at
    # a damaged image: the entry's back reference is in neither item
    raise CorruptionError(f"inode {ino} has no back reference to its name {name!r} in directory inode {parent}",
                          "DIR_ITEM_MISMATCH")


def _remove_ref(tree: BTree, ino: int, parent: int, name: bytes, index: int | None) -> int | None:
    ref_key = (ino, S.INODE_REF, parent)
    refs = _refs(tree, ino, parent)
    ref = next((r for r in refs if r.name == name and index in (None, r.index)), None)
    if ref is None:
        return None
    if len(refs) > 1:
        tree.update(ref_key, pack_inode_refs([r for r in refs if r is not ref]))
    else:
        tree.delete(ref_key)
    return ref.index


def _remove_extref(tree: BTree, ino: int, parent: int, name: bytes, index: int | None) -> int | None:
    key = (ino, S.INODE_EXTREF, extref_hash(parent, name))
    ext = _extrefs(tree, key)
    found = next((r for r in ext if (r.parent, r.name) == (parent, name) and index in (None, r.index)), None)
    if found is None:
        return None
    rest = [r for r in ext if r is not found]
    if rest:
        tree.update(key, pack_inode_extrefs(rest))
    else:
        tree.delete(key)
    return found.index


def names(tree: BTree, ino: int) -> Iterator[tuple[int, bytes]]:
    """(directory, name as stored) of each name ``ino`` has: its INODE_REFs', then its
    INODE_EXTREFs' (types 12 and 13: one range of keys)."""
    for (_, typ, offset), body in tree.items((ino, S.INODE_REF, 0), (ino, S.INODE_EXTREF, LAST)):
        if typ == S.INODE_REF:
            yield from ((offset, r.name) for r in unpack_inode_refs(body))
        else:
            yield from ((r.parent, r.name) for r in unpack_inode_extrefs(body))


def parents(tree: BTree, ino: int) -> set[int]:
    """The directories ``ino`` has a name in: an INODE_REF's key says which, with no body to
    read -- locking asks this, and a damaged INODE_REF body must not stop a key removal's locks
    halfway (leases kept, the secret never wiped), as it never did before INODE_EXTREFs."""
    out: set[int] = set()
    for (_, typ, offset), body in tree.items((ino, S.INODE_REF, 0), (ino, S.INODE_EXTREF, LAST)):
        if typ == S.INODE_REF:
            out.add(offset)
        else:
            out.update(r.parent for r in unpack_inode_extrefs(body))
    return out


def named_in(tree: BTree, ino: int, parent: int) -> bool:
    """Whether ``ino`` has a name in ``parent``: its INODE_REF there by key, as before extended
    references (a key removal's lock asks this of every cached inode), else its INODE_EXTREFs."""
    if (ino, S.INODE_REF, parent) in tree:
        return True
    return any(r.parent == parent for _, body in tree.items((ino, S.INODE_EXTREF, 0), (ino, S.INODE_EXTREF, LAST))
               for r in unpack_inode_extrefs(body))
