"""What a clone's verify reads back: the last write of each block, with fio's overlap rule.

fio logs each write it will verify (``log_io_piece``) and drops every logged write the new
one overlaps, whole, even when the overlap is partial: the bytes it wrote are no longer all
there to read back. Blocks of different sizes overlap as soon as one write does not land on
an earlier one's offset -- ``bssplit``/``bsrange`` over a second pass (``loops``,
``time_based``) or ``norandommap`` -- and keeping the older write there makes verify read
the newer one's bytes as a bad block of the older, a failure fio does not report.

Entries of one region never overlap (each insert drops what it overlaps), so only the
nearest entry starting before a write can reach into it. Offsets are kept sorted per region;
an entry popped by a read-back leaves its offset behind (lazily: the verify phase pops every
entry in order, and removing each from a sorted list would be quadratic), skipped and
dropped by the next insert that meets it.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

Key = tuple[int, int]  # (region index, offset)


class LastWrites:
    """(region, offset) -> (length, numberio) of the last write there still whole."""

    def __init__(self) -> None:
        self._entries: dict[Key, tuple[int, int]] = {}
        self._starts: dict[int, list[int]] = {}  # region -> sorted offsets (some possibly popped)

    def record(self, region: int, offset: int, length: int, numberio: int) -> None:
        """A write completed: it replaces every earlier write it overlaps."""
        self.forget(region, offset, length)
        starts = self._starts.setdefault(region, [])
        i = bisect_left(starts, offset)
        starts.insert(i, offset)
        self._entries[(region, offset)] = (length, numberio)

    def forget(self, region: int, offset: int, length: int) -> None:
        """Drop every write overlapping [offset, offset + length) (a trim's, or a newer write's)."""
        starts = self._starts.get(region)
        if not starts:
            return
        i = bisect_left(starts, offset)
        while i > 0:  # the nearest live entry before offset is the only one that can reach in
            prev = (region, starts[i - 1])
            if prev not in self._entries:
                del starts[i - 1]
                i -= 1
                continue
            if starts[i - 1] + self._entries[prev][0] > offset:
                del self._entries[prev]
                del starts[i - 1]
                i -= 1
            break
        end = i
        while end < len(starts) and starts[end] < offset + length:
            self._entries.pop((region, starts[end]), None)
            end += 1
        del starts[i:end]

    def get(self, key: Key) -> tuple[int, int] | None:
        return self._entries.get(key)

    def pop(self, key: Key) -> tuple[int, int]:
        return self._entries.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
