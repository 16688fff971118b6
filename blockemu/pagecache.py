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
    def __init__(self, clean_limit: int = 64 << 20) -> None:
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

    def take_dirty(self, pages: Pages, max_run: int) -> list[tuple[int, list[bytes]]]:
        """Snapshot the dirty pages as runs of consecutive indexes (each ≤ max_run pages) and
        clear their dirty bits; a write landing meanwhile dirties the page again. Until the
        caller reports them ``written`` the pages can be neither evicted nor counted twice."""
        runs: list[tuple[int, list[bytes]]] = []
        for idx in sorted(pages.dirty):
            if runs and runs[-1][0] + len(runs[-1][1]) == idx and len(runs[-1][1]) < max_run:
                runs[-1][1].append(bytes(pages.pages[idx]))
            else:
                runs.append((idx, [bytes(pages.pages[idx])]))
        pages.dirty.clear()
        return runs

    def written(self, pages: Pages, first: int, count: int) -> None:
        """A run from ``take_dirty`` is on its way to disk (or was dropped): its pages are clean now."""
        self.dirty_bytes -= count * PAGE
        for idx in range(first, first + count):
            if idx in pages.pages and idx not in pages.dirty:
                self._clean[(pages.ino, idx)] = pages
        self._shrink()

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
