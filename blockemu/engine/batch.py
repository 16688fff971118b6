"""Changes to one B-tree staged in memory, read through as if made, then applied in one pass.

Writeback turns each extent batch into dozens of item changes in three trees -- file
extent items trimmed and added, extent items and their back references, checksum items --
and the old extents' references looked up and dropped along the way. Made one by one,
each change is a root-to-leaf descent copying the path; staged here, each tree gets one
``BTree.apply`` that visits every block on the touched paths once. The staging reads
through: ``get`` and ``items`` see the staged changes over the tree, so the code that
computes the changes (``extents``) reads what it has already changed, exactly as it
would on the tree itself. Nothing reaches the tree until ``apply``: a batch that fails
half way (a corrupt back reference) leaves the tree as it was.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import itemgetter
from typing import Iterator, Mapping

from blockemu.engine.btree import MAX_KEY, MIN_KEY, BTree, Change, KeyT, Must, Through
from blockemu.errors import ExistsError, NotFoundError

_KEY = itemgetter(0)


def in_key_order(changes: Mapping[KeyT, bytes | Must | None]) -> list[Change]:
    """Staged changes as ``BTree.apply`` takes them, sorted by key. Sorted by the key alone, not
    as (key, value) pairs: comparing two pairs compares their keys twice over (equal? then
    less?), each a walk of the key's fields, so a plain ``sorted(changes.items())`` cost twice as
    much (~580k instructions for 150 items, ~300k this way) -- a sort per tree per mapped batch
    and per fsync's log. Keys are unique, so the order is the same."""
    return sorted(changes.items(), key=_KEY)  # type: ignore[arg-type]


class TreeBatch:
    """The tree-like interface ``extents`` uses (get, items, insert, update, delete), staged."""

    def __init__(self, tree: "BTree | TreeBatch") -> None:
        self.tree = tree  # a tree, or another batch: changes staged over changes (``pending``)
        self.owner, self.max_item = tree.owner, tree.max_item
        # key -> new value, or None: deleted; the keys are sorted only when read in order
        # (``_ordered``, kept until the next change). Writeback stages each change once and
        # reads few back in key order (its maps answer its reads): staging is one dict store,
        # where keeping the keys sorted was a bisection and two more hashes of the key per change
        self.changes: dict[KeyT, bytes | None] = {}
        self.order: list[KeyT] | None = []  # None: changed since last sorted
        self.ranges: list[tuple[KeyT, KeyT]] = []  # ``drop_range``'s, not read through

    def get(self, key: KeyT) -> bytes | None:
        if key in self.changes:
            return self.changes[key]
        return self.tree.get(key)

    def items(self, lo: KeyT = MIN_KEY, hi: KeyT = MAX_KEY, *, reverse: bool = False) -> Iterator[tuple[KeyT, bytes]]:
        """The tree's items in [lo, hi] with the staged changes over them, in key order. Do not
        stage changes while iterating."""
        base = self.tree.items(lo, hi, reverse=reverse)
        if not self._staged_in(lo, hi):
            return base
        order = self._ordered()
        staged = order[bisect_left(order, lo) : bisect_right(order, hi)]
        return self._merged(base, iter(reversed(staged) if reverse else staged), reverse)

    def _merged(self, base: Iterator[tuple[KeyT, bytes]], staged: Iterator[KeyT], reverse: bool) -> Iterator[tuple[KeyT, bytes]]:
        b, s = next(base, None), next(staged, None)
        while b is not None or s is not None:
            if s is None or (b is not None and (b[0] > s if reverse else b[0] < s)):
                yield b  # type: ignore[misc]
                b = next(base, None)
                continue
            if b is not None and b[0] == s:
                b = next(base, None)  # staged over
            value = self.changes[s]
            if value is not None:
                yield s, value
            s = next(staged, None)

    def _ordered(self) -> list[KeyT]:
        """The staged keys, sorted."""
        if self.order is None:
            self.order = sorted(self.changes)
        return self.order

    def _staged_in(self, lo: KeyT, hi: KeyT) -> bool:
        order = self._ordered()
        i = bisect_left(order, lo)
        return i < len(order) and order[i] <= hi

    def last_at_or_before(self, key: KeyT, lo: KeyT = MIN_KEY) -> tuple[KeyT, bytes] | None:
        """One descent of the tree and one bisection of the staged keys: the later of the two
        answers wins, unless it is a staged deletion (then the merged walk decides)."""
        found = self.tree.last_at_or_before(key, lo)
        order = self._ordered()
        i = bisect_right(order, key) - 1
        staged = order[i] if i >= 0 else None
        if staged is None or staged < lo or (found is not None and found[0] > staged):
            return found  # no staged key in (found, key]: found stands as it is
        if self.changes[staged] is not None:
            return staged, self.changes[staged]
        return next(self.items(lo, key, reverse=True), None)

    def floor_items(self, key: KeyT, lo: KeyT, hi: KeyT) -> list[tuple[KeyT, bytes]]:
        """``BTree.floor_items`` with the staged changes over it. The tree's answer stands when
        nothing is staged from its floor (or from ``lo``, if it has none) to ``hi``: a staged key
        below the tree's floor cannot be the floor, and none above it changes the range.
        Otherwise the staged view's floor, then its items."""
        base = self.tree.floor_items(key, lo, hi)
        start = base[0][0] if base and base[0][0] <= key else lo
        if not self._staged_in(start, hi):
            return base
        found = self.last_at_or_before(key, lo)
        return list(self.items(found[0] if found is not None else key, hi))

    def first_at_or_after(self, key: KeyT, hi: KeyT = MAX_KEY) -> tuple[KeyT, bytes] | None:
        found = self.tree.first_at_or_after(key, hi)
        order = self._ordered()
        i = bisect_left(order, key)
        staged = order[i] if i < len(order) else None
        if staged is None or staged > hi or (found is not None and found[0] < staged):
            return found
        if self.changes[staged] is not None:
            return staged, self.changes[staged]
        return next(self.items(key, hi), None)

    def insert(self, key: KeyT, value: bytes, *, replace: bool = False) -> None:
        if len(value) > self.max_item:
            raise ValueError(f"item of {len(value)} bytes exceeds the {self.max_item}-byte limit")
        if not replace and self.get(key) is not None:
            raise ExistsError(f"item {key} already in tree {self.owner}")
        self.changes[key] = bytes(value)  # (``_stage``, written out: a call per staged item)
        self.order = None

    def put(self, key: KeyT, value: bytes) -> None:
        """``insert(replace=True)`` of a value the caller knows is bytes within the item limit (a
        file extent's, a checksum item's): none of insert's checks, for writeback stages a few
        of these per extent it maps."""
        self.changes[key] = value
        self.order = None

    def put_many(self, items: list[tuple[KeyT, bytes]]) -> None:
        """``put`` of each (key, value): one update for the many items an extent batch makes."""
        if items:
            self.changes.update(items)
            self.order = None

    def update(self, key: KeyT, value: bytes) -> None:
        if self.get(key) is None:
            raise NotFoundError(f"no item {key} in tree {self.owner}")
        self.insert(key, value, replace=True)

    def delete(self, key: KeyT) -> bytes:
        value = self.get(key)
        if value is None:
            raise NotFoundError(f"no item {key} in tree {self.owner}")
        self._stage(key, None)
        return value

    def drop(self, key: KeyT) -> None:
        """Stage the deletion of an item the caller has just read through this batch: unlike
        ``delete``, no lookup to check that it is there -- another descent of the tree, for
        each of the items writeback replaces (a deletion of an absent key changes nothing)."""
        self.changes[key] = None  # (``_stage``, written out)
        self.order = None

    def drop_range(self, lo: KeyT, hi: KeyT) -> None:
        """Stage the deletion of every item in [lo, hi] without looking for them: the apply
        deletes them in the leaves it visits (``Through``). Unlike every other change, reads
        through the batch do not see it, so stage it only for items nothing reads again -- the
        checksums of an extent being freed -- and stage no insert in the range."""
        self.ranges.append((lo, hi))

    def _stage(self, key: KeyT, value: bytes | None) -> None:
        self.changes[key] = value
        self.order = None

    def apply(self) -> None:
        """Make the staged changes in the tree, in one pass, and start empty again."""
        changes = self.staged()
        self.changes, self.order, self.ranges = {}, [], []
        self.tree.apply(changes)

    def staged(self) -> list[Change]:
        """The staged changes as ``BTree.apply`` takes them: in key order, ranges in place."""
        changes = in_key_order(self.changes)
        return self._with_ranges(changes) if self.ranges else changes

    def _with_ranges(self, changes: list[Change]) -> list[Change]:
        """The staged changes (sorted) with each ``drop_range`` as a ``Through``
        in its place (ranges that overlap joined), a staged deletion inside one left to it
        (``BTree.apply`` allows no other change in the range): bisections of the staged keys,
        no sort of the whole list."""
        merged: list[tuple[KeyT, KeyT]] = []
        for lo, hi in sorted(self.ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        order, out, i = [key for key, _ in changes], [], 0
        for lo, hi in merged:
            j = bisect_left(order, lo, i)
            k = bisect_right(order, hi, j)
            for key, value in changes[j:k]:
                if value is not None:
                    raise ValueError(f"item {key} staged in a range staged for deletion in tree {self.owner}")
            out += changes[i:j]
            out.append((lo, Through(hi)))
            i = k
        out += changes[i:]
        return out
