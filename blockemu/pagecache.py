"""The page cache: 4 KiB plaintext pages per inode, dirty tracking, and a
global budget so memory stays bounded whatever is written.

Theory of operation. Dirty pages live in *frames* of one shared-memory arena
(a memfd the sealing workers map too), so writeback hands a worker frame
numbers, not bytes: the page a writer filled is the page the worker encrypts,
with no copy in between, and the arena's size bounds the memory dirty data can
take. Clean pages are ordinary ``bytearray``s in one LRU across all inodes,
dropped past ``clean_limit``: they can always be read back.

A frame being sealed is *stable*: a worker in another process reads it with
no lock, so nothing may change it until writeback reports the run
``written``. A write to such a page gets a fresh frame (copy-on-write) and the
old frame is freed when its run completes. When the arena is full, dirty
pages fall back to heap ``bytearray``s (the sealer copies those into its
slot); the writers' dirty limit, not the arena, is what bounds memory.

Pages handed out by ``get`` are valid until the caller next awaits: a frame
can be reused once its page is cleaned or dropped.
"""
from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

PAGE = 4096
HEAP = -1  # the frame number of a page that is not in the arena

Page = bytearray | memoryview


@dataclass(eq=False)
class Pages:
    """One inode's cached pages. ``dirty`` holds page indexes awaiting writeback;
    ``frames`` the arena frame of each page that has one."""

    ino: int
    pages: dict[int, Page] = field(default_factory=dict)
    frames: dict[int, int] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)


@dataclass
class Run:
    """Consecutive dirty pages taken for writeback: their buffers and frames (HEAP if none)."""

    first: int
    pages: list[Page]
    frames: list[int]


class Arena:
    """Fixed page frames in a memfd, shared with the sealing workers by file descriptor."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.fd = os.memfd_create("blockemu-pages", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, max(frames, 1) * PAGE)
        self.map = mmap.mmap(self.fd, max(frames, 1) * PAGE)
        self.view = memoryview(self.map)
        # LIFO: the most recently freed frame is reused first, so the arena's touched
        # (resident) part is only as large as the most dirty data ever held at once
        self.free = list(range(frames - 1, -1, -1))

    def page(self, frame: int) -> memoryview:
        return self.view[frame * PAGE : (frame + 1) * PAGE]

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a page view outlives the mount: the mapping goes with it
            pass
        os.close(self.fd)


class PageCache:
    def __init__(self, clean_limit: int = 8 << 20, dirty_frames: int = (80 << 20) // PAGE) -> None:
        self.clean_limit = clean_limit
        self.dirty_bytes = 0
        self.arena = Arena(dirty_frames)
        self._clean: OrderedDict[tuple[int, int], Pages] = OrderedDict()
        self._sealing: set[int] = set()  # frames in runs taken and not yet written
        self._orphans: set[int] = set()  # sealing frames whose page has moved on: free when written

    def close(self) -> None:
        self.arena.close()

    # ------------------------------------------------------------ reading

    def get(self, pages: Pages, idx: int) -> Page | None:
        page = pages.pages.get(idx)
        if page is not None and (pages.ino, idx) in self._clean:
            self._clean.move_to_end((pages.ino, idx))
        return page

    def put_clean(self, pages: Pages, idx: int, data: bytearray) -> None:
        if idx in pages.pages:  # a write got there first: it is newer
            return
        pages.pages[idx] = data
        self._clean[(pages.ino, idx)] = pages
        self._shrink()

    # ------------------------------------------------------------ writing

    def writable(self, pages: Pages, idx: int, fill: bytes | bytearray | memoryview | None = None) -> Page:
        """The page at ``idx``, dirty and safe to change in place: a frame no worker is
        reading. Its contents are kept (or ``fill``, or zeros, if it is not cached)."""
        frame = pages.frames.get(idx, HEAP)
        old = pages.pages.get(idx)
        if idx in pages.dirty and frame != HEAP and frame not in self._sealing:
            return old  # type: ignore[return-value]
        page = self._install(pages, idx)
        src = old if old is not None else fill
        if src is not None:
            page[:] = src
        elif pages.frames.get(idx, HEAP) != HEAP:
            page[:] = bytes(PAGE)  # a recycled frame holds someone's old data
        self._mark(pages, idx)
        return page

    def put_dirty(self, pages: Pages, first: int, data: memoryview) -> None:
        """Whole pages [first, ...) replaced by ``data`` (a multiple of PAGE): the streaming-write
        path, which takes fresh frames in one slice and, when they are consecutive (as a
        streaming run's freed frames are), fills them with one copy."""
        count = len(data) // PAGE
        table = pages.pages
        fresh = range(first, first + count)
        if table and any(i in table for i in fresh):
            for k, idx in enumerate(fresh):
                if idx in table:
                    self.writable(pages, idx)[:] = data[k * PAGE : (k + 1) * PAGE]
            fresh = [i for i in fresh if i not in table]  # type: ignore[assignment]
        free = self.arena.free
        n = min(len(fresh), len(free))
        frames = free[len(free) - n :][::-1]
        del free[len(free) - n :]
        view = self.arena.view
        if n and frames[-1] - frames[0] == n - 1 and fresh[n - 1] - fresh[0] == n - 1:
            k = fresh[0] - first
            view[frames[0] * PAGE : (frames[0] + n) * PAGE] = data[k * PAGE : (k + n) * PAGE]
            table.update(zip(fresh, [view[f * PAGE : (f + 1) * PAGE] for f in frames]))
        else:
            for idx, f in zip(fresh, frames):
                page = table[idx] = view[f * PAGE : (f + 1) * PAGE]
                page[:] = data[(idx - first) * PAGE : (idx - first + 1) * PAGE]
        pages.frames.update(zip(fresh, frames))
        for idx in fresh[n:]:  # the arena is full: heap pages
            table[idx] = bytearray(data[(idx - first) * PAGE : (idx - first + 1) * PAGE])
        pages.dirty.update(fresh)
        self.dirty_bytes += len(fresh) * PAGE

    def _install(self, pages: Pages, idx: int) -> Page:
        """A new buffer for page ``idx``, replacing (and releasing) what it had."""
        self._release(pages, idx)
        self._clean.pop((pages.ino, idx), None)
        arena = self.arena
        if arena.free:
            frame = arena.free.pop()
            pages.frames[idx] = frame
            page: Page = arena.page(frame)
        else:
            page = bytearray(PAGE)
        pages.pages[idx] = page
        return page

    def _mark(self, pages: Pages, idx: int) -> None:
        if idx not in pages.dirty:
            pages.dirty.add(idx)
            self.dirty_bytes += PAGE

    def _release(self, pages: Pages, idx: int) -> None:
        frame = pages.frames.pop(idx, HEAP)
        if frame == HEAP:
            return
        if frame in self._sealing:
            self._orphans.add(frame)
        else:
            self.arena.free.append(frame)

    # ------------------------------------------------------------ writeback

    def take_dirty(self, pages: Pages, max_run: int) -> list[Run]:
        """The dirty pages as runs of consecutive pages, each at most ``max_run`` long, with
        their dirty bits cleared; a write landing meanwhile dirties (a copy of) its page
        again. Until the caller reports a run ``written`` its frames stay as they are."""
        runs: list[Run] = []
        table, frames = pages.pages, pages.frames
        prev = -2
        for idx in sorted(pages.dirty):
            if idx == prev + 1 and len(runs[-1].pages) < max_run:
                run = runs[-1]
            else:
                run = Run(idx, [], [])
                runs.append(run)
            frame = frames.get(idx, HEAP)
            run.pages.append(table[idx])
            run.frames.append(frame)
            if frame != HEAP:
                self._sealing.add(frame)
            prev = idx
        pages.dirty.clear()
        return runs

    def written(self, pages: Pages, run: Run) -> None:
        """A run from ``take_dirty`` is on its way to disk (or was dropped): its pages that
        nobody rewrote meanwhile are clean now, and its frames go back to the arena."""
        self.dirty_bytes -= len(run.pages) * PAGE
        room = self.clean_limit // PAGE - len(self._clean)
        freed: list[int] = []
        table, frames, dirty = pages.pages, pages.frames, pages.dirty
        for k, frame in enumerate(run.frames):
            idx = run.first + k
            if frame != HEAP:
                self._sealing.discard(frame)
                if frame in self._orphans:
                    self._orphans.discard(frame)
                    freed.append(frame)
                    continue
            if idx in dirty or table.get(idx) is not run.pages[k]:
                continue  # rewritten (or dropped) since: the newer page stays as it is
            if room > 0:  # clean pages live on the heap; the arena is for dirty ones
                if frame != HEAP:
                    table[idx] = bytearray(run.pages[k])
                self._clean[(pages.ino, idx)] = pages
                room -= 1
            else:  # cache full of clean pages: drop written-behind pages first, as streaming I/O wants
                del table[idx]
            if frame != HEAP:
                del frames[idx]
                freed.append(frame)
        # a run's frames go back highest first, so the next streaming write takes them
        # as one ascending slice (see put_dirty)
        self.arena.free.extend(reversed(freed))

    def drop(self, pages: Pages, first: int = 0) -> int:
        """Forget pages ≥ ``first`` (dirty ones too: truncate, unlink, lost writeback, a key
        going away); returns dirty bytes dropped. Freed frames are zeroed: they held plaintext."""
        gone = [i for i in pages.pages if i >= first]
        dirty = 0
        for i in gone:
            frame = pages.frames.get(i, HEAP)
            if frame != HEAP and frame not in self._sealing:
                self.arena.page(frame)[:] = bytes(PAGE)
            self._release(pages, i)
            del pages.pages[i]
            self._clean.pop((pages.ino, i), None)
            if i in pages.dirty:
                pages.dirty.discard(i)
                dirty += PAGE
        self.dirty_bytes -= dirty
        return dirty

    def forget(self, pages: Pages, idxs: Iterable[int]) -> None:
        """Drop these pages unless rewritten since (a run writeback could not write)."""
        for idx in idxs:
            if idx not in pages.dirty and idx in pages.pages:
                self._release(pages, idx)
                del pages.pages[idx]
                self._clean.pop((pages.ino, idx), None)

    def _shrink(self) -> None:
        while len(self._clean) * PAGE > self.clean_limit:
            (_, idx), pages = self._clean.popitem(last=False)
            if idx not in pages.dirty:
                pages.pages.pop(idx, None)
