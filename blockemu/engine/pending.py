"""The extent- and checksum-tree changes of the running transaction, held until its commit
(btrfs's delayed refs and delayed checksums).

Writeback maps each batch of new extents into three trees. The fs tree's items are what a
file's reads and the fsync log follow, so its changes are applied at once; the extent and
checksum trees' are read by nothing but writeback itself and a cold read's checksum check,
both of which read through this set (``TreeBatch`` staged over ``TreeBatch``). Held here,
a transaction's changes reach those trees in one ``BTree.apply`` each, at the commit or when
the set outgrows its room, not one apply per mapped batch: the fio cycle (32 random 4 KiB
writes and an fsync, a commit every ~350 cycles) changed the extent tree 58 times in 16.5
leaves and the checksum tree 54 times in 9.7 leaves per cycle -- and an extent made and freed
inside one transaction (``fresh``: its items were never in a tree) never reaches them at all.

Nothing durable depends on this set: the fsync log carries the data's file items and checksums,
and replay rebuilds the extent items from them. What must hold is room: applying the set COWs
tree blocks, so the commit must find them. ``blocks`` bounds what applying it may take, and the
engine keeps that much back from every allocation (``Engine.data_keep``); a batch joins the set
only if the bound then fits the room its caller says is spare, else the set is applied there
and then, as each batch was before.
"""
from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter
from typing import Iterable

from blockemu.engine.batch import TreeBatch
from blockemu.engine.btree import BTree, KeyT
from blockemu.ondisk.block import ITEM_SIZE
from blockemu.ondisk.structs import SECTOR_SIZE

# Changes held at most (both trees; ~100-200 bytes each): a long run without a commit applies
# the set when it is this large, as it would when short of room.
MAX_PENDING = 1 << 14
_KEY, _VALUE = itemgetter(0), itemgetter(1)


class HeldBatch(TreeBatch):
    """The held changes to one tree: a ``TreeBatch`` changed only by ``PendingTrees.absorb``,
    which keeps its sorted keys across changes -- the keys batches added and removed since the
    last read in key order go in and out at the next one, each found by bisection and the list
    rebuilt around them in slices (``_merged_in``, ``_without``: O(k log n) comparisons and a
    copy in C), not the whole set sorted again: a read's checksum check after each mapped batch
    sorted up to 16,384 held keys (~6 ms), and merged as a sort of the sorted keys plus the new
    ones, still compared each held key once to find the sorted run (~0.6 ms for 100 new keys,
    +22 % of the instructions of a read after writes)."""

    def __init__(self, tree: BTree) -> None:
        super().__init__(tree)
        # keys staged since the last read in order (maybe gone again), and keys gone since (maybe
        # staged again): lists, deduplicated at the read -- absorb appends, not a set's hash per key
        self.added: list[KeyT] = []
        self.removed: list[KeyT] = []

    def _ordered(self) -> list[KeyT]:
        order = self.order
        assert order is not None  # (absorb never leaves it unsorted)
        if self.removed:
            order = _without(order, sorted(set(self.removed)))
            self.removed = []
        if self.added:
            changes = self.changes
            order = _merged_in(order, sorted({key for key in self.added if key in changes}))
            self.added = []
        self.order = order
        return order

    def apply(self) -> None:
        """Make the held changes in the tree, then forget them -- not before: an apply that fails
        half way aborts the transaction, and the mount's reads go on through what is held (the
        tree took part of it; the staged values stand over that part as over the rest), where a
        set forgotten first left every extent of the transaction without its checksums (EIO)."""
        self.tree.apply(self.staged())
        self.forget()

    def forget(self) -> None:
        """Start empty (applied, or dropped)."""
        self.changes, self.order, self.ranges, self.added, self.removed = {}, [], [], [], []


def _merged_in(order: list[KeyT], new: list[KeyT]) -> list[KeyT]:
    """``order`` with the sorted keys ``new`` (none of them in it) put in their places."""
    out: list[KeyT] = []
    at = 0
    for key in new:
        i = bisect_left(order, key, at)
        out += order[at:i]
        out.append(key)
        at = i
    out += order[at:]
    return out


def _without(order: list[KeyT], gone: list[KeyT]) -> list[KeyT]:
    """``order`` without the sorted keys ``gone`` (those in it)."""
    out: list[KeyT] = []
    at = 0
    for key in gone:
        i = bisect_left(order, key, at)
        if i < len(order) and order[i] == key:
            out += order[at:i]
            at = i + 1
    out += order[at:]
    return out


class PendingTrees:
    """The running transaction's held changes to the extent and checksum trees."""

    def __init__(self, ext: BTree, csum: BTree, nodesize: int, csum_size: int) -> None:
        self.ext, self.csum = HeldBatch(ext), HeldBatch(csum)
        self.nodesize, self.csum_size = nodesize, csum_size
        # keys staged as new items (a new extent's EXTENT_ITEM and checksums: the tree holds none):
        # one set for both trees, whose key types differ; such a key dropped again is forgotten
        self.fresh: set[KeyT] = set()
        self.added = 0  # bytes of items staged (replacements counted again: the growth's bound)
        self.range_leaves = 0  # leaves the staged ranges (a freed extent's checksums) may reach
        self.blocks = 0  # tree blocks applying the set may take (``bound``), kept back while it is held
        self._sizes: dict[int, tuple[int, int, int]] = {}  # tree owner -> (root, blocks, level)

    def __len__(self) -> int:
        return len(self.ext.changes) + len(self.csum.changes) + len(self.ext.ranges) + len(self.csum.ranges)

    def absorb(self, ext: TreeBatch, csum: TreeBatch, fresh: Iterable[KeyT]) -> None:
        """Take a mapped batch's staged changes to the two trees (staged over this set)."""
        held = self.fresh
        held.update(fresh)
        added = 0
        for mine, theirs in ((self.ext, ext), (self.csum, csum)):
            changes, new, gone = mine.changes, mine.added, mine.removed
            for key, value in theirs.changes.items():
                if value is None and key in held:
                    if key in changes:  # made and gone in this transaction: nothing to apply
                        del changes[key]
                        gone.append(key)
                    held.discard(key)
                else:
                    if key not in changes:
                        new.append(key)
                    changes[key] = value
                    if value is not None:
                        added += len(value) + ITEM_SIZE
            if theirs.ranges:
                mine.ranges += theirs.ranges
                for lo, hi in theirs.ranges:
                    # its checksums' bytes, in leaves at least half full, and the two it starts and ends in
                    self.range_leaves += 2 + 2 * ((hi[2] - lo[2]) // SECTOR_SIZE * self.csum_size) // self.nodesize
        self.added += added

    def absorb_new(self, ext_items: list[tuple[KeyT, bytes]], csum_items: list[tuple[KeyT, bytes]]) -> None:
        """Take the items a mapped batch made for its new extents (``ExtentBatch.add_extents``):
        what ``absorb`` does with each, for keys no tree holds and no held change names (a new
        extent's space was free: space freed in this transaction stays pinned until it commits),
        in a few C-level passes over the lists -- ``absorb``'s step per key was ~6 % of mapping
        a one-page extent (two keys each). (A key held already would only be listed twice in
        ``added``, which the next ordered read deduplicates, as ``absorb`` allows.)"""
        fresh = self.fresh
        for mine, items in ((self.ext, ext_items), (self.csum, csum_items)):
            if items:
                keys = list(map(_KEY, items))
                mine.changes.update(items)
                mine.added += keys
                fresh.update(keys)
                self.added += sum(map(len, map(_VALUE, items))) + ITEM_SIZE * len(items)

    def hold(self, spare: int) -> bool:
        """Whether the set may stay held (else the caller applies it): no larger than
        ``MAX_PENDING``, its bound within ``spare`` tree blocks -- kept back from then on
        (``blocks``: ``Engine.data_keep``)."""
        if spare <= 0 or len(self) > MAX_PENDING:
            return False
        blocks = self.bound()
        if blocks > spare:
            return False
        self.blocks = blocks
        return True

    def bound(self) -> int:
        """Tree blocks applying the set may take: each change or range COWs at most its leaf and a
        sibling the apply mends it with, and the interior nodes above them -- never more than the
        tree has -- and the items' bytes may split leaves and nodes (each split block at least half
        full), up to a new root."""
        total = 0
        half = self.nodesize // 2
        for batch in (self.ext, self.csum):
            tree = batch.tree
            assert isinstance(tree, BTree)
            size = self._sizes.get(tree.owner)
            if size is None or size[0] != tree.root:
                size = self._sizes[tree.owner] = (tree.root, tree.block_count(), tree.level)
            _, blocks, level = size
            touched = 2 * (len(batch.changes) + len(batch.ranges)) * (level + 1)
            total += min(touched, blocks) + 2 * (level + 1)
        return total + self.range_leaves + 2 * (-(-self.added // half))

    def apply(self) -> None:
        """Make the held changes in the trees (the commit, or the set has outgrown its room). One
        that fails half way (an I/O error reading a leaf) leaves the trees with part of the
        transaction's extent items; every caller then aborts the transaction -- a mapped batch's
        and ``Filesystem.apply_held``'s failure inside ``Volume.join`` after changes, the
        commit's in ``Volume._durably`` -- so nothing of it is committed, and the fsync log
        replays what was fsynced. What did not reach its tree stays held (``HeldBatch.apply``),
        for the aborted mount's reads."""
        self.ext.apply()
        self.csum.apply()
        self.drop()

    def drop(self) -> None:
        """Forget the held changes (applied, or the transaction aborted)."""
        self.ext.forget()
        self.csum.forget()
        self.fresh = set()
        self.added = self.range_leaves = self.blocks = 0
        self._sizes.clear()
