"""What a clone's verify reads back: the last write of each block, with fio's overlap rule,
in fio's order.

fio logs each write it will verify as it issues it (``log_io_piece``, in ``do_io``: "so we
know the specific order of it"; one that then fails is unlogged) and drops every logged write the new
one overlaps, whole, even when the overlap is partial: the bytes it wrote are no longer all
there to read back. Blocks of different sizes overlap as soon as one write does not land on
an earlier one's offset -- ``bssplit``/``bsrange`` over a second pass (``loops``,
``time_based``) or ``norandommap`` -- and keeping the older write there makes verify read
the newer one's bytes as a bad block of the older, a failure fio does not report.

The order the verify phase reads them back in is fio's too (``get_next_verify``): a job with
a random map logs its writes on a list (``io_hist_list``) and reads them back in the order
they were written; every other job (sequential, ``norandommap``, a non-uniform
``random_distribution``) sorts them into a tree (``io_hist_tree``) and reads back by file,
then offset. Both views are kept: ``__iter__`` is the order written, ``by_offset`` the
tree's. Entries of one region never overlap (each insert drops what it overlaps), so only
the nearest entry starting before a write can reach into it.
"""
from __future__ import annotations

from collections.abc import Iterator

from sortedcontainers import SortedDict

Key = tuple[int, int]  # (region index, offset)


class LastWrites:
    """(region, offset) -> (length, numberio) of the last write there still whole; a write is
    recorded when it is issued, as fio logs it, so with iodepth > 1 "last" and "the order
    written" are issue order, not completion order."""

    def __init__(self) -> None:
        self._entries: dict[Key, tuple[int, int]] = {}  # in the order written
        self._lengths: dict[int, SortedDict] = {}  # region -> offset -> length

    def record(self, region: int, offset: int, length: int, numberio: int) -> None:
        """A write completed: it replaces every earlier write it overlaps."""
        self.forget(region, offset, length)
        self._lengths.setdefault(region, SortedDict())[offset] = length
        self._entries[(region, offset)] = (length, numberio)

    def forget(self, region: int, offset: int, length: int) -> None:
        """Drop every write overlapping [offset, offset + length) (a trim's, or a newer write's)."""
        lengths = self._lengths.get(region)
        if not lengths:
            return
        first = lengths.bisect_left(offset)
        if first:
            before, before_length = lengths.peekitem(first - 1)
            if before + before_length > offset:  # the one starting before reaches in
                first -= 1
        for off in lengths.keys()[first: lengths.bisect_left(offset + length)]:
            del lengths[off]
            del self._entries[(region, off)]

    def unlog(self, region: int, offset: int, numberio: int) -> None:
        """A write failed: drop its entry, if a newer write has not replaced it already (those it
        dropped stay dropped: their bytes may be overwritten in part, as fio leaves them)."""
        if self._entries.get((region, offset), (0, None))[1] == numberio:
            self.pop((region, offset))

    def get(self, key: Key) -> tuple[int, int] | None:
        return self._entries.get(key)

    def pop(self, key: Key) -> tuple[int, int]:
        del self._lengths[key[0]][key[1]]
        return self._entries.pop(key)

    def bytes(self) -> int:
        """What reading every entry back reads (fio's keep_running counts it as moved)."""
        return sum(length for length, _ in self._entries.values())

    def by_offset(self) -> list[Key]:
        """fio's tree order: by region (fio's file), then offset."""
        return [(r, off) for r in sorted(self._lengths) for off in self._lengths[r]]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
