"""The page cache: 4 KiB plaintext pages per inode, dirty tracking, and a
global budget so memory stays bounded whatever is written.

Dirty pages are owned by the writeback queue's accounting (``dirty_bytes``;
writers wait above the hard limit). Clean pages sit in one LRU across all
inodes and are dropped past ``clean_limit``: they can always be read back.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

PAGE = 4096


@dataclass(eq=False)
class Pages:
    """One inode's cached pages. ``dirty`` holds page indexes awaiting writeback."""

    ino: int
    pages: dict[int, bytearray] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)


class PageCache:
    def __init__(self, clean_limit: int = 8 << 20) -> None:
        self.clean_limit = clean_limit
        self.dirty_bytes = 0
        self._clean: OrderedDict[tuple[int, int], Pages] = OrderedDict()

    def get(self, pages: Pages, idx: int) -> bytearray | None:
        page = pages.pages.get(idx)
        if page is not None and (pages.ino, idx) in self._clean:
            self._clean.move_to_end((pages.ino, idx))
        return page

    def put_clean(self, pages: Pages, idx: int, data: bytearray) -> None:
        pages.pages[idx] = data
        self._clean[(pages.ino, idx)] = pages
        self._shrink()

    def mark_dirty(self, pages: Pages, idx: int) -> None:
        if idx not in pages.dirty:
            pages.dirty.add(idx)
            self.dirty_bytes += PAGE
            self._clean.pop((pages.ino, idx), None)

    def put_dirty(self, pages: Pages, first: int, data: memoryview) -> None:
        """Whole pages [first, ...) replaced by ``data`` (a multiple of PAGE): the streaming-write path."""
        count = len(data) // PAGE
        idxs = range(first, first + count)
        had = [i for i in idxs if i in pages.pages] if pages.pages else []
        pages.pages.update(zip(idxs, map(bytearray, (data[k * PAGE : (k + 1) * PAGE] for k in range(count)))))
        for i in had:
            self._clean.pop((pages.ino, i), None)
        before = len(pages.dirty)
        pages.dirty.update(idxs)
        self.dirty_bytes += (len(pages.dirty) - before) * PAGE

    def take_dirty(self, pages: Pages, max_run: int, budget: int | None = None) -> list[tuple[int, int, bytearray]]:
        """Snapshot the dirty pages as runs (first index, page count, data) of consecutive pages,
        each at most ``max_run`` long, and clear their dirty bits; a write landing meanwhile
        dirties the page again. Until the caller reports a run ``written`` its pages can be
        neither evicted nor counted twice."""
        groups: list[list[int]] = []
        taken = sorted(pages.dirty)[:budget]
        for idx in taken:
            if groups and groups[-1][-1] + 1 == idx and len(groups[-1]) < max_run:
                groups[-1].append(idx)
            else:
                groups.append([idx])
        table = pages.pages
        runs = [(g[0], len(g), bytearray().join([table[i] for i in g])) for g in groups]
        pages.dirty.difference_update(taken)
        return runs

    def written(self, pages: Pages, first: int, count: int) -> None:
        """A run from ``take_dirty`` is on its way to disk (or was dropped): its pages are clean now."""
        self.dirty_bytes -= count * PAGE
        room = self.clean_limit // PAGE - len(self._clean)
        for idx in range(first, first + count):
            if idx in pages.pages and idx not in pages.dirty:
                if room > 0:
                    self._clean[(pages.ino, idx)] = pages
                    room -= 1
                else:  # cache full of clean pages: drop written-behind pages first, as streaming I/O wants
                    del pages.pages[idx]

    def drop(self, pages: Pages, first: int = 0) -> int:
        """Forget pages ≥ ``first`` (dirty ones too: truncate, unlink, lost writeback); returns dirty bytes dropped."""
        gone = [i for i in pages.pages if i >= first]
        dirty = 0
        for i in gone:
            del pages.pages[i]
            self._clean.pop((pages.ino, i), None)
            if i in pages.dirty:
                pages.dirty.discard(i)
                dirty += PAGE
        self.dirty_bytes -= dirty
        return dirty

    def _shrink(self) -> None:
        while len(self._clean) * PAGE > self.clean_limit:
            (_, idx), pages = self._clean.popitem(last=False)
            if idx not in pages.dirty:
                pages.pages.pop(idx, None)
