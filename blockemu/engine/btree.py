"""Copy-on-write B+tree keyed by (objectid u64, type u8, offset u64).

Theory of operation: a tree is a root bytenr and level. Reads descend from the
root through ``store.get``. A change first copies every block on the path
(``store.cow``): a block already written in the running transaction is changed
in place, any other gets a new location and its old one is freed (pinned until
the commit is durable). So the tree of the last commit is never touched, and a
crash finds it whole. Node keys always equal their child's first key (btrfs's
invariant, which fsck checks). Leaves split by bytes; a leaf or node under a
quarter full merges with, or borrows from, a sibling; the root grows when it
splits and shrinks when a node is left with one child.

Hostile images: a descent cannot loop, since every child must have its parent's
level minus one (``store.get`` checks it) and levels are below MAX_LEVEL. A walk
over many blocks (``items``, ``blocks``) also keeps the set of blocks it reached:
a block reached twice (a DAG instead of a tree) raises SHARED_TREE_BLOCK, so no
walk reads more blocks, or yields more items, than the image holds.

No I/O here: ``store`` (transaction.TreeStore) supplies blocks from its cache.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from operator import itemgetter
from typing import Iterator, NamedTuple, Protocol

from blockemu.errors import CorruptionError, ExistsError, NotFoundError
from blockemu.ondisk.block import TreeBlock, body_size, max_ptrs
from blockemu.ondisk.fast import ITEM_SIZE, KEY_PTR_SIZE

KeyT = tuple[int, int, int]
MIN_KEY: KeyT = (0, 0, 0)
MAX_KEY: KeyT = ((1 << 64) - 1, 255, (1 << 64) - 1)
# a change's key, for bisecting changes by key alone: comparing (key, value) pairs against a
# 1-tuple compares the keys twice (for equality, then for order)
_change_key = itemgetter(0)


class Through(NamedTuple):
    """The value of a change to ``BTree.apply`` that deletes every item from the change's key
    through ``hi`` (inclusive) -- found in the leaves the apply visits anyway, with no descent
    of its own: writeback drops the checksum items of every extent it frees, and a lookup of
    each, in a leaf nothing else had touched since the last commit, cost a third of mapping
    the extent."""

    hi: KeyT


class Must(NamedTuple):
    """The value of a change to ``BTree.apply`` that checks the item's presence: ``value`` bytes
    are a new item (its key must be absent), None deletes one that must be there. A directory's
    DIR_INDEX is both (a fresh index added, the index its back reference named removed): on a
    damaged image the one there already, or the one missing, is CorruptionError (EUCLEAN, the
    transaction aborts, as ``backrefs``' missing reference), not a silent replace or no-op --
    as ``insert`` and ``delete`` refused them one item at a time."""

    value: bytes | None


Change = tuple[KeyT, "bytes | None | Through | Must"]


class BlockStore(Protocol):
    nodesize: int
    dirty: dict[int, TreeBlock]  # the blocks written in the running transaction, by bytenr

    def get(self, bytenr: int, *, generation: int | None = None, level: int | None = None, owner: int | None = None) -> TreeBlock: ...
    def cow(self, block: TreeBlock, *, note: bool = True) -> TreeBlock: ...
    def new_block(self, owner: int, level: int) -> TreeBlock: ...
    def free_block(self, block: TreeBlock) -> None: ...


def max_item_size(nodesize: int) -> int:
    """Largest item body: small enough that any leaf split in two halves fits."""
    return body_size(nodesize) // 4 - ITEM_SIZE


class BTree:
    def __init__(self, store: BlockStore, owner: int, root: int, level: int, generation: int | None = None) -> None:
        self.store = store
        self.owner = owner
        self.root = root
        self.level = level
        # the root block's generation as its parent records it (the superblock, a ROOT_ITEM),
        # checked at its first read as a child's is against its pointer's: a root a dropped write
        # left stale (a device that lost a flush) read as the tree, silently an older state
        self.root_generation = generation
        self.body = body_size(store.nodesize)
        self.fanout = max_ptrs(store.nodesize)
        self.max_item = max_item_size(store.nodesize)

    # ------------------------------------------------------------------ reads

    def _root_block(self) -> TreeBlock:
        if self.root_generation is None:
            return self.store.get(self.root, level=self.level, owner=self.owner)
        block = self.store.get(self.root, generation=self.root_generation, level=self.level, owner=self.owner)
        self.root_generation = None  # checked; a COW of it is this mount's
        return block

    def _child(self, node: TreeBlock, slot: int, seen: set[int] | None = None) -> TreeBlock:
        """Child ``slot`` of ``node``; a walk passes the blocks it has reached as ``seen``."""
        bytenr, gen = node.ptrs[slot]
        if seen is not None:
            if bytenr in seen:
                raise CorruptionError(f"tree block {bytenr}: reached twice in tree {self.owner} (a shared or looped "
                                      f"block, not a tree)", "SHARED_TREE_BLOCK", bytenr)
            seen.add(bytenr)
        child = self.store.get(bytenr, generation=gen, level=node.level - 1, owner=self.owner)
        if not child.keys:
            raise CorruptionError(f"tree block {bytenr}: empty non-root block", "BAD_TREE_BLOCK", bytenr)
        return child

    @staticmethod
    def _slot(node: TreeBlock, key: KeyT) -> int:
        return max(bisect_right(node.keys, key) - 1, 0)

    def _leaf_for(self, key: KeyT) -> TreeBlock:
        node = self._root_block()
        while node.level:
            node = self._child(node, self._slot(node, key))
        return node

    def get(self, key: KeyT) -> bytes | None:
        node = self._leaf_for(key)
        i = bisect_left(node.keys, key)
        if i < len(node.keys) and node.keys[i] == key:
            return node.values[i]
        return None

    def __getitem__(self, key: KeyT) -> bytes:
        v = self.get(key)
        if v is None:
            raise NotFoundError(f"no item {key} in tree {self.owner}")
        return v

    def __contains__(self, key: KeyT) -> bool:
        return self.get(key) is not None

    def items(self, lo: KeyT = MIN_KEY, hi: KeyT = MAX_KEY, *, reverse: bool = False) -> Iterator[tuple[KeyT, bytes]]:
        """Items with lo <= key <= hi in key order. Do not change the tree while iterating."""
        return self._iter(self._root_block(), lo, hi, reverse, {self.root})

    def _iter(self, node: TreeBlock, lo: KeyT, hi: KeyT, reverse: bool, seen: set[int]) -> Iterator[tuple[KeyT, bytes]]:
        if node.level == 0:
            i, j = bisect_left(node.keys, lo), bisect_right(node.keys, hi)
            if reverse:  # by index, not reversed(list(...)): last_at_or_before takes one item
                keys, values = node.keys, node.values
                yield from ((keys[k], values[k]) for k in range(j - 1, i - 1, -1))
            else:
                yield from zip(node.keys[i:j], node.values[i:j])
            return
        first = self._slot(node, lo)
        last = bisect_right(node.keys, hi) - 1
        slots = range(first, last + 1)
        for s in reversed(slots) if reverse else slots:
            yield from self._iter(self._child(node, s, seen), lo, hi, reverse, seen)

    def last_at_or_before(self, key: KeyT, lo: KeyT = MIN_KEY) -> tuple[KeyT, bytes] | None:
        """One descent: the leaf ``key`` falls in starts at or before it (node keys are their
        children's first keys), so the item wanted is in it or there is none."""
        leaf = self._leaf_for(key)
        i = bisect_right(leaf.keys, key) - 1
        if i < 0 or leaf.keys[i] < lo:
            return None
        return leaf.keys[i], leaf.values[i]

    def floor_items(self, key: KeyT, lo: KeyT, hi: KeyT) -> list[tuple[KeyT, bytes]]:
        """``list(items(f, hi))``, where f is the last key <= ``key`` that is >= ``lo`` (``key`` if
        there is none): a range plus the item reaching into it from before, which is what mapping
        a file range asks, with one descent instead of two (``last_at_or_before``, then
        ``items``) -- the leaf ``key`` falls in holds f, and usually the whole range. A list, not
        an iterator: writeback asks this once per new extent, and a generator's frames cost more
        than the one or two items it yields."""
        leaf = self._leaf_for(key)
        keys = leaf.keys
        i = bisect_right(keys, key) - 1
        if i < 0 or keys[i] < lo:
            i += 1
        j = bisect_right(keys, hi, i)
        found = list(zip(keys[i:j], leaf.values[i:j]))
        if j == len(keys) and keys and keys[-1] < hi:  # the range goes on past this leaf
            last = keys[-1]
            found += (item for item in self.items(last, hi) if item[0] != last)
        return found

    def first_at_or_after(self, key: KeyT, hi: KeyT = MAX_KEY) -> tuple[KeyT, bytes] | None:
        leaf = self._leaf_for(key)
        i = bisect_left(leaf.keys, key)
        if i == len(leaf.keys):  # past this leaf's last item: the next leaf's first, if any
            return next(self.items(key, hi), None)
        return (leaf.keys[i], leaf.values[i]) if leaf.keys[i] <= hi else None

    def blocks(self) -> Iterator[TreeBlock]:
        """Every block, parents before children (for inspect, fsck and accounting)."""
        stack, seen = [self._root_block()], {self.root}
        while stack:
            node = stack.pop()
            yield node
            if node.level:
                stack.extend(self._child(node, s, seen) for s in reversed(range(len(node.ptrs))))

    def __len__(self) -> int:
        return sum(len(b.keys) for b in self.blocks() if b.level == 0)

    def block_count(self) -> int:
        """How many blocks the tree has, counted from its interior nodes alone (each leaf is a
        pointer of a level-1 node): no leaf is read, for ``PendingTrees.bound`` asks after
        every change of the tree's root."""
        nodes = [self._root_block()]
        count = 1
        while nodes[0].level:
            count += sum(len(n.ptrs) for n in nodes)
            if nodes[0].level == 1:
                break
            nodes = [self._child(n, s) for n in nodes for s in range(len(n.ptrs))]
        return count

    # ------------------------------------------------------------------ writes

    def _writable_root(self) -> TreeBlock:
        root = self.store.cow(self._root_block())
        self.root = root.bytenr
        return root

    def _writable_child(self, node: TreeBlock, slot: int) -> TreeBlock:
        """Child ``slot`` of the writable ``node`` made writable (the change was reported with
        the root's COW, which also found the store writable). A child this transaction wrote
        already is taken as it is, with no checks or COW bookkeeping: past the first batch
        after a commit nearly every block an apply visits is one, and these calls were a fifth
        of the apply's time under cProfile (4 KiB random overwrites, an fsync every 32)."""
        child = self.store.dirty.get(node.ptrs[slot][0])
        if child is None:
            child = self.store.cow(self._child(node, slot), note=False)
            node.ptrs[slot] = (child.bytenr, child.generation)
        return child

    def insert(self, key: KeyT, value: bytes, *, replace: bool = False) -> None:
        if len(value) > self.max_item:
            raise ValueError(f"item of {len(value)} bytes exceeds the {self.max_item}-byte limit")
        root = self._writable_root()
        split = self._insert(root, key, bytes(value), replace)
        if split is not None:
            new_root = self.store.new_block(self.owner, root.level + 1)
            new_root.keys = [root.keys[0], split.keys[0]]
            new_root.ptrs = [(root.bytenr, root.generation), (split.bytenr, split.generation)]
            new_root.recount()
            self.root, self.level = new_root.bytenr, new_root.level

    def update(self, key: KeyT, value: bytes) -> None:
        if key not in self:
            raise NotFoundError(f"no item {key} in tree {self.owner}")
        self.insert(key, value, replace=True)

    def _insert(self, node: TreeBlock, key: KeyT, value: bytes, replace: bool) -> TreeBlock | None:
        if node.level == 0:
            i = bisect_left(node.keys, key)
            if i < len(node.keys) and node.keys[i] == key:
                if not replace:
                    raise ExistsError(f"item {key} already in tree {self.owner}")
                node.used += len(value) - len(node.values[i])
                node.values[i] = value
            else:
                node.keys.insert(i, key)
                node.values.insert(i, value)
                node.used += ITEM_SIZE + len(value)
            return self._split_leaf(node) if node.used > self.body else None
        slot = self._slot(node, key)
        child = self._writable_child(node, slot)
        split = self._insert(child, key, value, replace)
        node.keys[slot] = child.keys[0]
        if split is None:
            return None
        node.keys.insert(slot + 1, split.keys[0])
        node.ptrs.insert(slot + 1, (split.bytenr, split.generation))
        node.used += KEY_PTR_SIZE
        return self._split_node(node) if len(node.keys) > self.fanout else None

    # ------------------------------------------------------------------ batched writes

    def apply(self, changes: list[Change]) -> None:
        """Apply many changes at once: ``changes`` sorted by key, each key once, a value to insert
        or replace, None to delete (a no-op if absent), or ``Through(hi)`` to delete every item
        from the key through ``hi`` (no other change may fall in that range). Each block on the paths to the leaves the changes touch is copied
        and visited once, not once per item as ``insert``/``delete`` do: writeback changes dozens
        of neighbouring items per extent batch, and the descents and COW lookups were most of
        its cost. The tree ends as if the changes were made one by one (same items, same
        invariants), though not necessarily with the same block boundaries."""
        if not changes:
            return
        for key, value in changes:
            if type(value) is Must:
                value = value.value
            if value is not None and type(value) is not Through and len(value) > self.max_item:
                raise ValueError(f"item of {len(value)} bytes exceeds the {self.max_item}-byte limit")
        root = self._writable_root()
        pieces = [root, *self._apply(root, changes)]
        if not root.keys and root.level:  # every item deleted: the tree is one empty leaf again
            self.store.free_block(root)
            pieces = [self.store.new_block(self.owner, 0)]
        while len(pieces) > 1:  # the root split: new levels above it, as many as it takes
            parent = self.store.new_block(self.owner, pieces[0].level + 1)
            parent.keys = [p.keys[0] for p in pieces]
            parent.ptrs = [(p.bytenr, p.generation) for p in pieces]
            parent.recount()
            pieces = [parent, *self._split_node_many(parent)]
        root = pieces[0]
        while root.level and len(root.keys) == 1:
            child = self._writable_child(root, 0)  # the new root must be this transaction's own block
            self.store.free_block(root)
            root = child
        self.root, self.level = root.bytenr, root.level

    def _apply(self, node: TreeBlock, changes: list[Change]) -> list[TreeBlock]:
        """Apply ``changes`` (all inside ``node``'s range) below the writable ``node``; returns the
        new right siblings it split into. ``node`` may be left empty or underfull: its parent
        mends that, as it sees all its children at once. A ``Through`` reaching past a child's
        range goes on in the next child, from its first key."""
        if node.level == 0:
            self._merge_leaf(node, changes)
            return self._split_leaf_many(node) if node.used > self.body else []
        keys, ptrs, touched, underfull = node.keys, node.ptrs, set(), False
        leaves, body = node.level == 1, self.body
        quarter = body // 4  # _underfull of a leaf
        new_keys: list[KeyT] = []
        new_ptrs: list[tuple[int, int]] = []
        # only the children the changes fall in are visited, each found by a bisection of the
        # node's keys, and the slots between are copied as they are -- not a step (and a
        # bisection of the changes) for every slot: an fsync's few dozen scattered changes fall
        # in a few dozen of a node's hundreds of children
        n, lo, done = len(keys), 0, 0  # done: the slots before it are copied or visited
        rest = None  # a Through from a child before, reaching into the next one
        while lo < len(changes) or rest is not None:
            slot = done if rest is not None else max(bisect_right(keys, changes[lo][0], done) - 1, done)
            new_keys += keys[done:slot]
            new_ptrs += ptrs[done:slot]
            done = slot + 1
            last = done == n
            hi = len(changes) if last else bisect_left(changes, keys[done], lo, key=_change_key)
            part = changes[lo:hi] if rest is None else [(keys[slot], rest), *changes[lo:hi]]
            lo = hi
            rest = part[-1][1]
            if type(rest) is not Through or last or rest.hi < keys[done]:
                rest = None
            child = self._writable_child(node, slot)
            if leaves:  # the leaf case of _apply inline: a frame fewer for each of dozens of leaves
                self._merge_leaf(child, part)
                pieces = (child, *self._split_leaf_many(child)) if child.used > body else (child,)
            else:
                pieces = (child, *self._apply(child, part))
            for c in pieces:
                if c.keys:
                    new_keys.append(c.keys[0])
                    new_ptrs.append((c.bytenr, c.generation))
                    touched.add(c.bytenr)
                    underfull = underfull or (c.used < quarter if leaves else self._underfull(c))
                else:
                    self.store.free_block(c)
        new_keys += keys[done:]
        new_ptrs += ptrs[done:]
        node.keys, node.ptrs = new_keys, new_ptrs
        node.recount()
        if underfull:  # mostly none is: then no scan of the node's slots
            self._mend(node, touched)
        return self._split_node_many(node) if len(node.keys) > self.fanout else []

    def _mend(self, node: TreeBlock, touched: set[int]) -> None:
        """Merge or even out every changed child of ``node`` left underfull, as ``delete`` does. A
        merge may leave the merged block underfull still, so the scan steps back to look at it;
        each step merges (one child fewer), evens out (both then past a quarter) or moves right.
        Every block on the path is written already (COWed by ``_apply`` or ``_rebalance``).
        ``_apply`` calls it only when a changed child is underfull, which it sees as it visits
        them (a store lookup of each again cost more than the check)."""
        slot = 0
        while slot < len(node.ptrs) and len(node.ptrs) > 1:
            bytenr = node.ptrs[slot][0]
            if bytenr in touched and self._underfull(self.store.get(bytenr)):
                before, left = len(node.ptrs), max(slot - 1, 0)  # _rebalance pairs it with its left neighbour
                self._rebalance(node, slot)
                slot = left
                # what _rebalance wrote (COWed): the merged block, or the two evened out -- never
                # a neighbour beyond them, which may still be the committed block
                written = [b for b, _ in node.ptrs[left : left + (1 if len(node.ptrs) < before else 2)]]
                touched.update(written)
                if node.level > 1:
                    # nodes merged or evened out: a child that was its node's only one (and so
                    # could not be mended below) now has siblings to merge with
                    for b in written:
                        inner = self.store.get(b)
                        self._mend(inner, {p for p, _ in inner.ptrs})
            else:
                slot += 1

    @staticmethod
    def _merge_leaf(leaf: TreeBlock, changes: list[Change]) -> None:
        """Merge sorted ``changes`` into a leaf's sorted items, each a bisection and an edit in
        place (the leaf is this transaction's own copy) -- however many there are. Rebuilding
        the two lists in one pass around them (slices between the changes) cost more in every
        case measured (callgrind: -37 % instructions for 10 changes into 140 items, -24 % for
        60, -2 % and equal CPU for 1,000 into 600): each change is a bisection and a few opcodes
        either way, and the pass added its slices and appends. An insert or delete in place moves only the items after it that were there
        before (the changes come in key order, so the ones made already are all before it): at
        most a leaf's worth of pointers (a few hundred), a memmove, however long the batch."""
        keys, values = leaf.keys, leaf.values
        used, i = leaf.used, 0
        for key, value in changes:
            j = bisect_left(keys, key, i)
            if type(value) is Must:
                if (j < len(keys) and keys[j] == key) == (value.value is not None):
                    leaf.used = used  # what was merged so far stays consistent for the abort
                    raise CorruptionError(f"tree {leaf.owner}: item {key} " + (
                        "already present" if value.value is not None else "missing"))
                value = value.value
            if type(value) is Through:
                k = bisect_right(keys, value.hi, j)
                used -= ITEM_SIZE * (k - j) + sum(map(len, values[j:k]))
                del keys[j:k], values[j:k]
            elif j < len(keys) and keys[j] == key:
                if value is None:
                    used -= ITEM_SIZE + len(values[j])
                    del keys[j], values[j]
                else:
                    used += len(value) - len(values[j])
                    values[j] = value
                    j += 1
            elif value is not None:
                keys.insert(j, key)
                values.insert(j, value)
                used += ITEM_SIZE + len(value)
                j += 1
            i = j
        leaf.used = used

    def _split_leaf_many(self, leaf: TreeBlock) -> list[TreeBlock]:
        """Split an overfull leaf into as many evenly filled leaves as its bytes need. Each piece
        takes its first item, then the next while they fit ``target``: where it ends is found
        by a bisection of the items' running byte totals (C-level), not a step per item -- an
        fsync's apply splits a leaf of hundreds of items every other cycle."""
        ends = _item_ends(leaf.values)
        total, n = ends[-1], len(leaf.values)
        parts = -(-total // self.body)
        target = -(-total // parts)
        cuts = [0]
        while (cut := max(bisect_right(ends, ends[cuts[-1]] + target) - 1, cuts[-1] + 1)) < n:
            cuts.append(cut)
        if total - ends[cuts[-1]] < self.body // 4:  # a short tail: into the piece before, or share it evenly
            if total - ends[cuts[-2]] <= self.body:
                cuts.pop()
            else:
                cuts[-1] = cuts[-2] + _balanced_cut(leaf.values[cuts[-2]:])
        cuts.append(n)
        keys, values = leaf.keys, leaf.values
        out = []
        for a, b in zip(cuts[1:], cuts[2:]):
            right = self.store.new_block(self.owner, 0)
            right.keys, right.values, right.used = keys[a:b], values[a:b], ends[b] - ends[a]
            out.append(right)
        leaf.keys, leaf.values, leaf.used = keys[: cuts[1]], values[: cuts[1]], ends[cuts[1]]
        return out

    def _split_node_many(self, node: TreeBlock) -> list[TreeBlock]:
        """Split an overfull node into as many evenly filled nodes as it needs (none if it fits)."""
        n = len(node.keys)
        parts = -(-n // self.fanout)
        if parts <= 1:
            return []
        cuts = [n * i // parts for i in range(parts + 1)]
        out = []
        for a, b in zip(cuts[1:], cuts[2:]):
            right = self.store.new_block(self.owner, node.level)
            right.keys, right.ptrs = node.keys[a:b], node.ptrs[a:b]
            right.recount()
            out.append(right)
        node.keys, node.ptrs = node.keys[: cuts[1]], node.ptrs[: cuts[1]]
        node.recount()
        return out

    def _split_leaf(self, leaf: TreeBlock) -> TreeBlock:
        cut = _balanced_cut(leaf.values)
        right = self.store.new_block(self.owner, 0)
        right.keys, leaf.keys = leaf.keys[cut:], leaf.keys[:cut]
        right.values, leaf.values = leaf.values[cut:], leaf.values[:cut]
        leaf.recount()
        right.recount()
        return right

    def _split_node(self, node: TreeBlock) -> TreeBlock:
        cut = len(node.keys) // 2
        right = self.store.new_block(self.owner, node.level)
        right.keys, node.keys = node.keys[cut:], node.keys[:cut]
        right.ptrs, node.ptrs = node.ptrs[cut:], node.ptrs[:cut]
        node.recount()
        right.recount()
        return right

    def delete(self, key: KeyT) -> bytes:
        """Remove ``key`` and return its value (NotFoundError if absent; the tree is then unchanged)."""
        if key not in self:
            raise NotFoundError(f"no item {key} in tree {self.owner}")
        root = self._writable_root()
        value = self._delete(root, key)
        while root.level and len(root.keys) == 1:
            child = self._child(root, 0)
            self.store.free_block(root)
            root = child
            self.root, self.level = root.bytenr, root.level
        return value

    def _delete(self, node: TreeBlock, key: KeyT) -> bytes:
        if node.level == 0:
            i = bisect_left(node.keys, key)
            del node.keys[i]
            value = node.values.pop(i)
            node.used -= ITEM_SIZE + len(value)
            return value
        slot = self._slot(node, key)
        child = self._writable_child(node, slot)
        value = self._delete(child, key)
        if self._underfull(child) and len(node.keys) > 1:
            self._rebalance(node, slot)
        elif child.keys:
            node.keys[slot] = child.keys[0]
        return value

    def _underfull(self, node: TreeBlock) -> bool:
        if node.level == 0:
            return node.used < self.body // 4
        return len(node.keys) < self.fanout // 4

    def _capacity(self, node: TreeBlock) -> int:
        return self.body if node.level == 0 else self.fanout * KEY_PTR_SIZE

    def _rebalance(self, parent: TreeBlock, slot: int) -> None:
        """Merge parent's child ``slot`` with a sibling, or even the two out if they cannot merge."""
        left_slot = slot - 1 if slot > 0 else slot
        left = self._writable_child(parent, left_slot)
        right = self._writable_child(parent, left_slot + 1)
        if left.used + right.used <= self._capacity(left):
            left.keys += right.keys
            if left.level == 0:
                left.values += right.values
            else:
                left.ptrs += right.ptrs
            left.used += right.used
            del parent.keys[left_slot + 1]
            del parent.ptrs[left_slot + 1]
            parent.used -= KEY_PTR_SIZE
            self.store.free_block(right)
        else:
            self._even_out(left, right)
            parent.keys[left_slot + 1] = right.keys[0]
        parent.keys[left_slot] = left.keys[0]

    def _even_out(self, left: TreeBlock, right: TreeBlock) -> None:
        keys = left.keys + right.keys
        if left.level == 0:
            vals = left.values + right.values
            cut = _balanced_cut(vals)
            left.values, right.values = vals[:cut], vals[cut:]
        else:
            ptrs = left.ptrs + right.ptrs
            cut = len(keys) // 2
            left.ptrs, right.ptrs = ptrs[:cut], ptrs[cut:]
        left.keys, right.keys = keys[:cut], keys[cut:]
        left.recount()
        right.recount()


def _item_ends(values: list[bytes]) -> list[int]:
    """Running byte totals of a leaf's items: element i is the bytes items [0, i) use."""
    return list(accumulate(map(ITEM_SIZE.__add__, map(len, values)), initial=0))


def _balanced_cut(values: list[bytes]) -> int:
    """Split point (1..n-1) of a leaf's items that makes the larger half smallest (the first
    such). The larger half, max(left, total - left), shrinks while the left one is under half
    the total and grows after it: the best cut is one of the two around half, found by a
    bisection of the running totals, not a step per item."""
    ends = _item_ends(values)
    total, n = ends[-1], len(values)
    if n < 2:
        return 1
    cut = min(max(bisect_left(ends, (total + 1) // 2), 1), n - 1)  # the first whose left half is >= half
    if cut > 1 and total - ends[cut - 1] <= max(ends[cut], total - ends[cut]):
        cut -= 1
    return cut
