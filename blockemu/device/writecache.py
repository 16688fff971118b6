"""The device's volatile write cache, kept as a drive keeps its cache segments: an ordered set of
disjoint sector ranges, each naming the newest completed write that covers it.

It used to be a dict per sector, so each cached MiB cost a flush 256 steps to snapshot, count,
run and delete (~0.5 M instructions a MiB written, ~14 % of a sequential encrypted write's main
process): a write, a read, a flush's snapshot and its clean-up now cost a step per *range* (a
bisection, and a slice of the list of range starts that C moves), whatever the ranges' length.
A newer write over part of a range cuts it: what is left of the older write stays cached as one
or two shorter ranges. Only the torn fault of a power cut still walks sectors, as it tears at
sector granularity (``BlockDevice.power_cut``).
"""
from __future__ import annotations

import contextlib
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator

from blockemu.device.writelog import SECTOR

Buffer = bytes | memoryview
Segment = tuple[int, int, "Entry"]  # first sector, end sector, the write whose data they hold
Runs = list[tuple[int, list[memoryview]]]  # (image offset, buffers) per contiguous stretch


class Entry:
    """A completed write in the cache: its data and first sector, how many cached sectors still
    name it (``live``), and how many destages or reads use its data across an await (``pins``).
    A write whose buffer was lent to the device (``release``: a sealing slot's ciphertext, kept
    rather than copied) gives it back once neither is left -- the owner then reuses it."""

    __slots__ = ("data", "first", "live", "pins", "release")

    def __init__(self, data: Buffer, first: int, live: int, release: Callable[[], None] | None = None) -> None:
        self.data, self.first, self.live, self.pins, self.release = data, first, live, 0, release


def let_go(entry: Entry) -> None:
    """Give a lent buffer back once no cached sector names it and nothing is using it."""
    if not entry.live and not entry.pins and entry.release is not None:
        release, entry.release = entry.release, None
        release()


@contextlib.contextmanager
def pinned(entries: Iterable[Entry]) -> Iterator[None]:
    """Keep the entries' buffers while their data is used across an await (a destage in the
    executor, a read's overlay after its pread), even if their sectors leave the cache meanwhile."""
    held = set(entries)  # identity: one per write, however many ranges it has
    for e in held:
        e.pins += 1
    try:
        yield
    finally:
        for e in held:
            e.pins -= 1
            let_go(e)


def as_runs(segments: Iterable[Segment]) -> Runs:
    """Ranges in sector order as (offset, buffers): adjacent ranges make one run, a buffer each."""
    out: Runs = []
    at = -1
    for first, end, e in segments:
        if first != at:
            out.append((first * SECTOR, []))
        out[-1][1].append(memoryview(e.data)[(first - e.first) * SECTOR : (end - e.first) * SECTOR])
        at = end
    return out


class WriteCache:
    """Disjoint sector ranges in order: ``_starts`` sorted, ``_ranges`` start -> (end, write).
    ``sectors`` counts the cached sectors; ``version`` changes with every change, so a destage
    can tell the cache is still the snapshot it wrote and empty it in one step."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: dict[int, tuple[int, Entry]] = {}
        self.sectors = 0
        self.version = 0

    def __bool__(self) -> bool:
        return bool(self._starts)

    def _reaching(self, lo: int) -> int:
        """The index in ``_starts`` of the first range that ends past sector ``lo``."""
        starts = self._starts
        i = bisect_right(starts, lo)
        return i - 1 if i and self._ranges[starts[i - 1]][0] > lo else i

    def _cut(self, lo: int, hi: int, only: Entry | None = None) -> int:
        """Take [lo, hi) out of the cache (only the ranges naming ``only``, if given), trimming the
        ranges it cuts through; where in ``_starts`` a range starting at ``lo`` now goes."""
        starts, ranges = self._starts, self._ranges
        i = self._reaching(lo)
        j, n = i, len(starts)
        kept: list[int] = []
        at = i
        while j < n and (s := starts[j]) < hi:
            end, e = ranges[s]
            j += 1
            if only is not None and e is not only:
                kept.append(s)
                continue
            if s < lo:
                ranges[s] = (lo, e)
                kept.append(s)
                at += 1
            else:
                del ranges[s]
            if end > hi:
                ranges[hi] = (end, e)
                kept.append(hi)
            gone = min(end, hi) - max(s, lo)
            self.sectors -= gone
            e.live -= gone
            let_go(e)
        if j > i:
            starts[i:j] = kept
            self.version += 1
        return at

    def put(self, first: int, entry: Entry) -> None:
        """A completed write over [first, first + entry.live): newest, so it hides what it overlaps."""
        if not entry.live:  # (an empty write names no sector: its lent buffer goes back at once)
            let_go(entry)
            return
        end = first + entry.live
        self._starts.insert(self._cut(first, end), first)
        self._ranges[first] = (end, entry)
        self.sectors += entry.live
        self.version += 1

    def covering(self, lo: int, hi: int) -> list[Segment]:
        """The cached ranges within [lo, hi), clipped to it, in order."""
        starts, ranges = self._starts, self._ranges
        if hi <= lo:
            return []
        i = self._reaching(lo)
        out: list[Segment] = []
        n = len(starts)
        while i < n and (s := starts[i]) < hi:
            end, e = ranges[s]
            out.append((max(s, lo), min(end, hi), e))
            i += 1
        return out

    def snapshot(self) -> list[Segment]:
        """Every cached range, in order."""
        ranges = self._ranges
        return [(s, *ranges[s]) for s in self._starts]

    def sector_items(self) -> Iterator[tuple[int, Entry]]:
        """Every cached sector, in order (the torn fault tears at sector granularity)."""
        for first, end, e in self.snapshot():
            for s in range(first, end):
                yield s, e

    def drop(self, segments: Iterable[Segment]) -> None:
        """Take out the parts of these ranges whose write the cache still holds there (a newer
        write taken meanwhile stays)."""
        for first, end, e in segments:
            self._cut(first, end, e)

    def evict(self, lo: int, hi: int) -> None:
        """Take [lo, hi) out of the cache, whichever writes hold it: a FUA write that has just
        completed there supersedes them all, a write that completed while it was in flight too
        (the write log orders writes by completion: ``BlockDevice.writev``)."""
        self._cut(lo, hi)

    def destaged(self, snapshot: list[Segment], version: int) -> None:
        """``snapshot`` (taken at ``version``) is written: out of the cache, but for what a newer
        write took meanwhile. Unchanged since, the cache is the snapshot: emptied in one step."""
        if version == self.version:
            self.clear()
        else:
            self.drop(snapshot)

    def clear(self) -> None:
        """Empty the cache, giving back the buffers lent to it (once no destage or read uses them)."""
        entries = {e for _, e in self._ranges.values()}
        self._starts.clear()
        self._ranges.clear()
        self.sectors = 0
        self.version += 1
        for e in entries:
            e.live = 0
            let_go(e)
