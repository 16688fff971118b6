"""Byte ranges, disjoint and coalesced: what a shadow still has to make durable, in memory that
grows with the ranges, not with the writes that made them (a job's 4 KiB writes between two
fsyncs of a 1 GiB file are one range once they meet, not 262,144 tuples)."""
from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict


class RangeSet:
    """[start, end) ranges; adding one merges it with those it overlaps or touches."""

    def __init__(self) -> None:
        self._ends: SortedDict = SortedDict()  # start -> end

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        ends = self._ends
        i = ends.bisect_right(start)
        if i:  # the range before may reach this one
            s = ends.keys()[i - 1]
            if ends[s] >= start:
                start, end = s, max(end, ends[s])
                i -= 1
        while i < len(ends) and ends.keys()[i] <= end:
            s = ends.keys()[i]
            end = max(end, ends.pop(s))
        ends[start] = end

    def update(self, other: "RangeSet") -> None:
        for start, end in other:
            self.add(start, end)

    def clip(self, size: int) -> None:
        """Drop what lies at or past ``size`` (a truncate)."""
        ends = self._ends
        while ends and ends.keys()[-1] >= size:
            ends.popitem()
        if ends and ends.peekitem()[1] > size:
            ends[ends.keys()[-1]] = size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._ends.items()))

    def __len__(self) -> int:
        return len(self._ends)
