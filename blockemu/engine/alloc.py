"""Extent allocator: the free-space map of the running transaction.

Freed extents that the last durable commit still references are *pinned*:
unusable until the commit that stops referencing them is durable, so a crash
always finds the previous generation intact. Extents both allocated and freed
within the running transaction were never durable and return at once. While a
commit's writes are in flight the next transaction already runs (DESIGN §9): the
committing transaction's pins are *sealed* apart from the running one's, and only
they come back when that commit is durable.

Where an allocation goes: small ones (below ``hole_max``, 1 MiB: a 4 KiB overwrite, a tree
block) first fill the smallest *hole* -- a free extent below ``hole_max`` -- that holds them, as
btrfs's free-space cache hands out the space its commits gave back; larger ones, and small
ones when no hole fits, come next-fit from a roving cursor, so consecutive allocations come
out contiguous (a sequential file's 1 MiB extents). Without hole reuse the cursor crossed the
whole device before it came back to the 4 KiB an overwrite freed: the free-space record, which
every commit rewrites, grew by a hole per overwrite. Holes are only ever free space: what the
running or the committing transaction freed is pinned or sealed, outside ``free``.

Tree blocks and data share the space, so the allocator counts ``node_room``: how
many tree blocks its free extents could hold. A caller that must not eat the
space metadata needs (data, see ``Engine.data_keep``) passes ``keep``: the tree
blocks' worth of room the allocation must leave. Running out is always
``NoSpaceError`` (ENOSPC), never a bare Python error.

Reserving space that is not free, or freeing space that already is, means the
image's own records disagree (an extent in the free-space record, or two
references to one extent): CorruptionError, which fsck --repair can rebuild.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator

from sortedcontainers import SortedDict, SortedList

from blockemu.errors import CorruptionError, NoSpaceError

SECTOR = 4096
HOLE_MAX = 1 << 20  # free extents below this are holes, filled best-fit by allocations below it
ADDRESS = (1 << 64) - 1  # a hole's start, in its key in ``Allocator.holes``
DIFF_WHOLE_ABOVE = 4  # the record is compared whole when the ranges touched pass 1/4 of its extents
# a commit's pins are merged into the free maps one by one while they are under 1/10 of the free
# extents, else the maps are rebuilt (measured: ~10 us per pin merged in place, ~1 us per extent rebuilt)
UNPIN_REBUILD_ABOVE = 10


def no_space(length: int, free: int, largest: int, kept: int = 0) -> NoSpaceError:
    """The one ENOSPC text every allocation path raises: what the user expects first, then the numbers."""
    held = f", {kept} kept for metadata" if kept else ""
    return NoSpaceError(f"No space left on device: cannot allocate {length} bytes "
                        f"({free} bytes free, largest free extent {largest}{held})")


def coalesce(extents: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """``extents`` (start, length), disjoint, in any order, sorted and joined where one ends at the
    next one's start: their starts and lengths. One C sort and one pass, where merging each into
    a sorted map costs look-ups, pops and puts. Two that overlap are space freed twice."""
    starts: list[int] = []
    lengths: list[int] = []
    end = -1
    for start, length in sorted(extents):
        if start > end:
            starts.append(start)
            lengths.append(length)
        elif start == end:
            lengths[-1] += length
        else:
            raise CorruptionError(f"extent [{start}, +{length}) freed twice (its space is already free)",
                                  "FREE_SPACE_MISMATCH", start)
        end = start + length
    return starts, lengths


class Allocator:
    def __init__(self, free: list[tuple[int, int]] | None = None, *, nodesize: int = 16384,
                 hole_max: int = HOLE_MAX) -> None:
        self.free = SortedDict()  # start -> length, disjoint, coalesced
        self.hole_max = hole_max
        self.holes = SortedList()  # length << 64 | start of each free extent shorter than hole_max
        self.pinned: list[tuple[int, int]] = []  # freed by the running transaction
        self.sealed: list[tuple[int, int]] = []  # freed by the transaction whose commit is in flight
        self.cursor = 0
        self.nodesize = nodesize
        self.node_room = 0  # sum(length // nodesize) over the free extents: tree blocks that would fit
        # sum(length) over the free extents, kept as they change: near full, every write asks it
        # (ENOSPC text, room checks) and summing ~2,900 holes through the sorted map's Python
        # iterator cost 11 s of the 46 s that 20 MB of appends into them took (cProfile)
        self.free_total = 0
        self.changes = 0  # counts every change of the free extents: lets callers cache what they derive
        # [start, end) of each range allocated or given up since ``record_changes`` last ran (None:
        # everything -- no record matches this allocator yet)
        self.touched: list[tuple[int, int]] | None = None
        # ``fills``' cache: the change count it was built at, the running sums of the free
        # extents' lengths smallest first so far, and the lengths not summed yet
        self._fills_seen = -1
        self._fills_sums: list[int] = []
        self._fills_rest: Iterator[int] = iter(())
        self._fills_widest = 0
        for start, length in free or ():
            self.release(start, length)

    # -------------------------------------------------------------- queries

    def free_bytes(self) -> int:
        return self.free_total

    def pinned_bytes(self) -> int:
        return sum(n for _, n in self.pinned) + sum(n for _, n in self.sealed)

    def holds_pinned(self) -> bool:
        """Whether a commit would give space back (the running one's, or the one in flight's)."""
        return bool(self.pinned or self.sealed)

    def extents_after_commit(self) -> list[tuple[int, int]]:
        """The free extents once pinned ones are released: what the free-space record stores.
        Asked while no commit is in flight (commits are serialised): nothing is sealed."""
        assert not self.sealed, "the previous commit is not durable yet"
        return list(zip(*coalesce([*dict.items(self.free), *self.pinned])))  # the C view: coalesce sorts

    def record_changes(self, record: SortedDict) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """What the free-space record ``record`` (start -> length, as the commit before left it)
        must lose and gain, as (start, length) lists, to equal ``extents_after_commit``. Work in
        proportion to what changed since the last call, not to the record's size: only the
        record's extents that reach a range allocated or given up since then are compared
        (a commit converges in several rounds, and the later ones change a few tree blocks).
        Asked while no commit is in flight, as ``extents_after_commit``."""
        assert not self.sealed, "the previous commit is not durable yet"
        touched, self.touched = self.touched, []
        if touched is None or len(touched) * DIFF_WHOLE_ABOVE > len(record):
            # nearly everything moved: one pass over both is cheaper than a look-up per range
            want = set(self.extents_after_commit())
            have = set(dict.items(record))  # the C view: SortedDict.items iterates in Python
            return sorted(have - want), sorted(want - have)
        pins = sorted(self.pinned)
        pin_starts = [start for start, _ in pins]
        gone: list[tuple[int, int]] = []
        new: list[tuple[int, int]] = []
        for lo, hi in self._spans(touched, record):
            have = [(start, record[start]) for start in record.irange(lo, hi - 1)]
            want = list(zip(*coalesce([(start, self.free[start]) for start in self.free.irange(lo, hi - 1)]
                                      + pins[bisect.bisect_left(pin_starts, lo):bisect.bisect_left(pin_starts, hi)])))
            if have != want:
                kept = set(have) & set(want)
                gone += (e for e in have if e not in kept)
                new += (e for e in want if e not in kept)
        return gone, new

    @staticmethod
    def _spans(touched: list[tuple[int, int]], record: SortedDict) -> list[tuple[int, int]]:
        """The touched ranges, merged, each widened to the record's extents that overlap or adjoin
        it: outside them nothing changed, and their ends stay allocated in the record before and
        after, so the extents inside can be compared alone."""
        spans: list[tuple[int, int]] = []
        keys = record.keys()
        for lo, hi in sorted(touched):
            if spans and lo <= spans[-1][1]:
                lo = spans[-1][0]
                hi = max(hi, spans.pop()[1])
            i = record.bisect_right(lo) - 1
            if i >= 0 and keys[i] + record[keys[i]] >= lo:
                lo = keys[i]
            i = record.bisect_right(hi) - 1
            if i >= 0 and keys[i] + record[keys[i]] > hi:
                hi = keys[i] + record[keys[i]]
            while spans and lo <= spans[-1][1]:
                lo, hi = min(lo, spans[-1][0]), max(hi, spans.pop()[1])
            spans.append((lo, hi))
        return spans

    def fills(self, nbytes: int) -> int:
        """How many free extents ``nbytes`` of allocations could fill whole by splitting runs: a
        run that fits nowhere is split, each piece but its last filling a free extent whole (the
        largest there is: ``largest``), so the pieces a flush makes beyond one per run are at most
        as many as the free extents, the smallest first, those bytes fill -- thousands where free
        space is small scattered holes, each piece an extent with its own items, which write()
        must reserve tree room for (``Filesystem.room_for``). None when the widest free extent
        holds them all: every run then fits somewhere. The running sums are built per change of
        the free extents, and only as far as asked."""
        if self._fills_seen != self.changes:
            self._fills_seen, self._fills_sums, self._fills_rest = self.changes, [], self._smallest_first()
            self._fills_widest = max(dict.values(self.free), default=0)  # the C view: one pass
        if self._fills_widest >= nbytes:
            return 0
        sums = self._fills_sums
        if not sums or sums[-1] <= nbytes:
            total = sums[-1] if sums else 0
            for length in self._fills_rest:
                total += length
                sums.append(total)
                if total > nbytes:
                    break
        return bisect.bisect_right(sums, nbytes)

    def _smallest_first(self) -> Iterator[int]:
        """The free extents' lengths, shortest first: the holes in their sorted order, then the
        (few) large extents, sorted only if the walk gets that far."""
        for key in self.holes:
            yield key >> 64
        yield from sorted(n for n in self.free.values() if n >= self.hole_max)

    def is_free(self, start: int, length: int) -> bool:
        i = self.free.bisect_right(start) - 1
        if i < 0:
            return False
        s, n = self.free.peekitem(i)
        return s <= start and start + length <= s + n

    def overlaps_free(self, start: int, length: int) -> bool:
        """Whether any byte of [start, +length) is free (the extents are disjoint and sorted, so
        only the last one starting before the end can reach into the range)."""
        i = self.free.bisect_left(start + length) - 1
        if i < 0:
            return False
        s, n = self.free.peekitem(i)
        return s + n > start

    # -------------------------------------------------------------- changes

    def largest(self, keep: int = 0) -> int:
        """The longest allocation ``alloc(..., keep=keep)`` could satisfy now (0: none): taken
        from the start of a free extent, it must leave ``keep`` tree blocks of room."""
        best, ns = 0, self.nodesize
        if (widest := self._widest_hole()) and keep <= self.node_room - widest // ns:
            return widest  # no extent is longer, and taking it whole leaves the keep
        for n in dict.values(self.free):  # the C view: the order does not matter
            need = keep - (self.node_room - n // ns)  # tree blocks what is left of this extent must hold
            fit = n if need <= 0 else n - need * ns
            best = max(best, fit)
        return best

    def alloc(self, length: int, *, keep: int = 0) -> int:
        """The smallest hole that holds a small allocation, else next fit from a roving cursor
        (the module's docstring says why). The allocation leaves at least ``keep`` tree blocks
        of room (tree blocks pass 0: they may use everything)."""
        if length <= 0 or length % SECTOR:
            raise ValueError(f"allocation of {length} bytes is not a sector multiple")
        keys, ns = self.free.keys(), self.nodesize
        if (hole := self._best_hole(length)) is not None:
            start, n = hole
            if not keep or self.node_room - n // ns + (n - length) // ns >= keep:
                self._take(start, n, start, length)  # the cursor stays where large allocations go on
                return start
        if (widest := self._widest_hole()) is not None and widest < length:
            raise no_space(length, self.free_bytes(), self.largest(), keep * ns)  # nothing is that long
        first = max(self.free.bisect_right(self.cursor) - 1, 0)
        for lo, indexes in ((self.cursor, range(first, len(keys))), (0, range(0, min(first + 1, len(keys))))):
            for idx in indexes:
                start = keys[idx]
                n = self.free[start]
                s = max(start, lo)
                if start + n - s < length:
                    continue
                if keep and self.node_room - n // ns + (s - start) // ns + (start + n - s - length) // ns < keep:
                    continue
                self._take(start, n, s, length)
                self.cursor = s + length
                return s
        raise no_space(length, self.free_bytes(), self.largest(), keep * ns)

    def alloc_many(self, lengths: list[int], *, keep: int = 0) -> list[int]:
        """``alloc`` of each length in turn -- the same places, the same free extents left -- with
        the free extent the last piece came from held out of the map while the next pieces are
        carved from its head: an fsync's writeback places dozens of small runs at once, nearly
        always from one free extent, and each ``alloc`` popped and put back its remainder in the
        sorted map. All or nothing: a piece that does not fit gives back those placed before it.
        Whether a hole would take a length is asked once per length while pieces are carved: the
        holes change only when ``alloc`` places one -- each small piece bisected the holes' sorted
        list (a Python-level call of it, ~3k instructions) though the answer stayed the same."""
        out: list[int] = []
        held_at = held = 0  # a free extent [held_at, +held), out of the map, carved from its head
        ns = self.nodesize
        unholed: set[int] = set()  # lengths no hole holds, since the holes last changed
        try:
            for length in lengths:
                # where ``alloc`` would put it: next fit into this extent (not a hole, nor would a
                # hole take it), with the room test ``alloc`` makes -- node_room does not count it now
                if (held >= length > 0 and length % SECTOR == 0
                        and (length >= self.hole_max or held >= self.hole_max
                             and (length in unholed or self._unholed(length, unholed)))
                        and (not keep or self.node_room + (held - length) // ns >= keep)):
                    out.append(held_at)
                    self._touch(held_at, held_at + length)
                    held_at, held = held_at + length, held - length
                    self.cursor = held_at
                    continue
                unholed.clear()  # the holes may change from here
                if held:
                    self._put(held_at, held)
                    held = 0
                out.append(self.alloc(length, keep=keep))
                held_at = out[-1] + length
                if self.free.get(held_at, 0) >= self.hole_max:
                    held = self._pop(held_at)
        except BaseException:
            if held:
                self._put(held_at, held)
                held = 0
            for start, length in zip(out, lengths):
                self.release(start, length)
            raise
        finally:
            if held:
                self._put(held_at, held)
        return out

    def _unholed(self, length: int, unholed: set[int]) -> bool:
        """No hole holds ``length`` (``_best_hole``): remembered in ``unholed`` while the holes stay."""
        if self._best_hole(length) is None:
            unholed.add(length)
            return True
        return False

    def _best_hole(self, length: int) -> tuple[int, int] | None:
        """The hole a small allocation fills: of the shortest holes that hold it, the first
        (start, length); None for a large allocation or when none holds it."""
        if length >= self.hole_max:
            return None
        holes = self.holes
        i = holes.bisect_left(length << 64)
        if i == len(holes):
            return None
        key = holes[i]
        return key & ADDRESS, key >> 64

    def _widest_hole(self) -> int | None:
        """The longest free extent when every free extent is a hole (None if one is not): found
        without a walk over the free extents. Near full, where free space is thousands of small
        holes, each piece of a run split across them asked ``alloc`` (a next-fit walk over all of
        them that found nothing) and ``largest`` (another): 20 MB of appends into 2,900 holes
        spent two thirds of their CPU there."""
        if len(self.holes) != len(self.free) or not self.holes:
            return None
        return self.holes[-1] >> 64

    def _put(self, start: int, length: int) -> None:
        self.free[start] = length
        self.node_room += length // self.nodesize
        self.free_total += length
        self.changes += 1
        if length < self.hole_max:
            self.holes.add(length << 64 | start)

    def _pop(self, start: int) -> int:
        length = self.free.pop(start)
        self.node_room -= length // self.nodesize
        self.free_total -= length
        self.changes += 1
        if length < self.hole_max:
            self.holes.remove(length << 64 | start)
        return length

    def _touch(self, start: int, end: int) -> None:
        """[start, end) was allocated or given up: the record may differ there (``record_changes``)."""
        if self.touched is not None:
            self.touched.append((start, end))

    def _take(self, start: int, n: int, s: int, length: int) -> None:
        """Allocate [s, +length) from the free extent [start, +n)."""
        self._touch(s, s + length)
        self._pop(start)
        if s > start:
            self._put(start, s - start)
        end = start + n
        if s + length < end:
            self._put(s + length, end - (s + length))

    def reserve(self, start: int, length: int) -> None:
        """Take a specific range (it must be free), e.g. to replay a known layout."""
        i = self.free.bisect_right(start) - 1
        s, n = self.free.peekitem(i) if i >= 0 else (0, 0)
        if not (s <= start and start + length <= s + n):
            raise CorruptionError(f"extent [{start}, +{length}) is allocated twice or lies outside the usable space",
                                  "EXTENT_OVERLAP", start)
        self._take(s, n, start, length)

    def release(self, start: int, length: int) -> None:
        """Return an extent for immediate reuse, merging with its neighbours."""
        if length > 0:
            self._touch(start, start + length)
            self._free(start, length)

    def _free(self, start: int, length: int) -> None:
        """``release`` of space the record already counts free (a durable commit's pins)."""
        end = start + length
        i = self.free.bisect_right(start) - 1
        j = self.free.bisect_left(start)
        left = self.free.peekitem(i) if i >= 0 else None
        if left and left[0] + left[1] > start or j < len(self.free) and self.free.peekitem(j)[0] < end:
            raise CorruptionError(f"extent [{start}, +{length}) freed twice (its space is already free)",
                                  "FREE_SPACE_MISMATCH", start)
        if left and left[0] + left[1] == start:
            start = left[0]
            self._pop(start)
        if end in self.free:
            end += self._pop(end)
        self._put(start, end - start)

    def pin(self, start: int, length: int) -> None:
        self._touch(start, start + length)
        self.pinned.append((start, length))

    def pin_many(self, extents: list[tuple[int, int]]) -> None:
        """``pin`` of each (start, length): a mapped batch of overwrites frees an extent per page
        it writes, and two calls each were ~2 % of mapping one."""
        if self.touched is not None:
            self.touched += [(start, start + length) for start, length in extents]
        self.pinned += extents

    def seal_pins(self) -> None:
        """The running transaction has ended and its commit is being written: what it freed waits
        for that commit; what the next transaction frees is pinned apart, for its own."""
        assert not self.sealed, "the previous commit is not durable yet"
        self.pinned, self.sealed = [], self.pinned

    def unpin_sealed(self) -> None:
        """The commit that stopped referencing the sealed extents is durable: they are free.
        A commit after scattered overwrites gives back hundreds of 4 KiB extents, and merging
        each into the sorted maps (two look-ups, a pop and a put in each) was a quarter of the
        commit's CPU, paid by the fsync that waited for it; so past a few pins per free extent
        the free extents are merged with the sorted pins in one pass and the maps rebuilt in bulk."""
        sealed, self.sealed = self.sealed, []
        if len(sealed) * UNPIN_REBUILD_ABOVE <= len(self.free):
            for start, length in sealed:
                self._free(start, length)
            return
        starts, lengths = coalesce([*dict.items(self.free), *sealed])
        ns, hole_max = self.nodesize, self.hole_max
        self.free = SortedDict(zip(starts, lengths))
        self.holes = SortedList([n << 64 | s for s, n in zip(starts, lengths) if n < hole_max])
        self.node_room = sum([n // ns for n in lengths])
        self.free_total = sum(lengths)
        self.changes += 1
