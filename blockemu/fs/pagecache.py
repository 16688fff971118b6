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
old frame is freed when its run completes. Writers wait for free frames (see
``Writeback.over_limit``); only a write larger than the whole arena spills its
excess onto heap ``bytearray``s, as stable: the sealer copies them into a
worker's slot, or its thread reads them where they lie.

Pages handed out by ``get`` are valid until the caller next awaits: a frame
can be reused once its page is cleaned or dropped.

Every page holds plaintext, so none is let go of with its contents: a frame is
zeroed when it goes back to the arena (``Arena.release``), a heap page when the
cache drops it -- or, if a run being written still reads it, when that run is
``written``; a clean page evicted to make room is zeroed on the event loop's
next turn, as a reader may still use it until it next awaits (and not while a read that
gathers pages across awaits is running: ``reading``). One exception, kept in
the cache's own hands: a streaming run's frames (``_streamed``: written while the
clean cache is full, a sequential writer's runs or a scattered writer's pages) go
back *stale*, unzeroed, because the next write of whole pages overwrites them
(``put_dirty`` and ``writable(overwrite=True)`` take stale frames first; a page
that needs zeros gets a stale frame zeroed first) -- zeroing them was a memset of
every byte written. Every ``drop`` (and
``close``) zeroes whatever is stale, whichever inode it came from. So once an
inode's pages are dropped (when it is locked, or at unmount), no copy remains.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import add, attrgetter, eq, itemgetter, ne

from blockemu.crypto.arena import PAGE, ZERO_PAGE, Arena

Page = bytearray | memoryview
Entry = bytearray | int  # what a cache entry holds: a heap page, or the number of its arena frame
_FIRST, _SECOND, _ENTRIES, _RUN_FIRST = itemgetter(0), itemgetter(1), attrgetter("entries"), attrgetter("first")


@dataclass(eq=False)
class Pages:
    """One inode's cached pages: a heap page or an arena frame per index. ``dirty`` holds
    page indexes awaiting writeback."""

    ino: int
    pages: dict[int, Entry] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Run:
    """Consecutive dirty pages taken for writeback, as the cache held them then (one per
    scattered page of a random write load: slots make it cheaper to make and to read)."""

    first: int
    entries: list[Entry]


class PageCache:
    def __init__(self, *, clean_limit: int, dirty_frames: int) -> None:
        self.clean_limit = clean_limit
        self.dirty_bytes = 0
        self.arena = Arena(dirty_frames)
        self._clean: OrderedDict[tuple[int, int], Pages] = OrderedDict()
        self._sealing: set[int] = set()  # frames in runs taken and not yet written
        self._orphans: set[int] = set()  # sealing frames whose page has moved on: free when written
        self._evicted: list[bytearray] = []  # clean pages to zero on the loop's next turn
        self._readers = 0  # reads gathering pages across awaits (see ``reading``)
        self._closing = False  # closed, the arena to go once no run taken for writeback is out
        # the inodes (by number) whose pages were dirtied since writeback last found them clean,
        # as the kernel's per-bdi dirty inode list: every page made dirty here adds its inode, and
        # only writeback removes one (``Writeback.dirty_inodes``), so a sync visits these, not
        # every cached inode (a scan of all of them was ~2 % of the stress mix's CPU)
        self.dirtied: set[int] = set()

    def close(self) -> None:
        """Zero what is cached and let the arena go -- once every run taken for writeback is
        back: a flush whose caller gave up on it (a cancelled unmount or sync) still returns its
        frames, zeroed, to the arena, which then must still be mapped. The last one back closes it."""
        self.zero_evicted()
        self._closing = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._closing and not self._sealing and not self.arena.closed:
            self.arena.wipe_stale()
            self.arena.close()

    def buffer(self, entry: Entry) -> Page:
        return self.arena.page(entry) if type(entry) is int else entry  # type: ignore[return-value,arg-type]

    # ------------------------------------------------------------ reading

    def get(self, pages: Pages, idx: int) -> Page | None:
        entry = pages.pages.get(idx)
        if entry is None:
            return None
        if type(entry) is int:
            return self.arena.page(entry)
        if (pages.ino, idx) in self._clean:
            self._clean.move_to_end((pages.ino, idx))
        return entry  # type: ignore[return-value]

    def get_range(self, pages: Pages, first: int, count: int) -> list[Page | None]:
        """``get`` of pages [first, first + count), None where not cached: the entries looked up
        by one C-level map, and the LRU touched only for the cached heap pages -- a whole-file
        read asked ``get`` per page twice (before and after its fill), ~14 % of a cold read of a
        160 KB file."""
        got: list = list(map(pages.pages.get, range(first, first + count)))
        if got.count(None) == count:  # none cached (a cold read): nothing to view or touch
            return got
        page, clean, ino = self.arena.page, self._clean, pages.ino
        for k, entry in enumerate(got, first):
            if type(entry) is int:
                got[k - first] = page(entry)
            elif entry is not None and (ino, k) in clean:
                clean.move_to_end((ino, k))
        return got

    def put_clean(self, pages: Pages, read: dict[int, bytearray]) -> None:
        """Cache pages read from disk (by index); the cache owns them from now on. The clean
        pages past the limit are evicted once, after them all: a cold read of a few MiB put
        page by page paid an eviction pass per page."""
        table, clean, ino = pages.pages, self._clean, pages.ino
        for idx, data in read.items():
            if idx in table:  # a write got there first: it is newer
                data[:] = ZERO_PAGE
                continue
            table[idx] = data
            clean[(ino, idx)] = pages
        self._shrink()

    # ------------------------------------------------------------ writing

    def writable(self, pages: Pages, idx: int, fill: bytes | bytearray | memoryview | None = None,
                 overwrite: bool = False) -> Page:
        """The page at ``idx``, dirty and safe to change in place: never a frame a worker is
        reading (a page taken for writeback is no longer dirty, so it is copied first). Its
        contents are kept (or ``fill``, or zeros, if it is not cached) unless the caller is
        about to ``overwrite`` all of it."""
        old = pages.pages.get(idx)
        if old is None:  # not cached (every page of a scattered write load): nothing to let go of
            src, settled = None if overwrite else fill, False
        elif idx in pages.dirty:
            return self.arena.page(old) if type(old) is int else old  # type: ignore[arg-type,return-value]
        else:
            src = None if overwrite else self.buffer(old)
            # clean (a heap page to zero once copied), or only in a run being written (``_settled``)
            settled = self._clean.pop((pages.ino, idx), None) is not None
            self._release(pages, idx)
        # a stale frame only for a page the caller overwrites whole, else zeros (it may change part)
        frame = self.arena.take_one() if overwrite else self.arena.take_zeroed()
        if frame is not None:
            pages.pages[idx] = frame
            page = self.arena.view[frame * PAGE : (frame + 1) * PAGE]  # (``Arena.page``: a call per write)
        else:
            page = pages.pages[idx] = bytearray(PAGE)
        if src is not None:
            page[:] = src
        if settled and type(old) is not int:
            old[:] = ZERO_PAGE  # type: ignore[index]  # the clean page this one replaces
        pages.dirty.add(idx)
        self.dirtied.add(pages.ino)
        self.dirty_bytes += PAGE
        return page

    def put_dirty(self, pages: Pages, first: int, data: memoryview) -> None:
        """Whole pages [first, ...) replaced by ``data`` (a multiple of PAGE): the streaming-write
        path, which takes fresh frames in one slice and, when they are consecutive (as a
        streaming run's freed frames are), fills them with one copy."""
        count = len(data) // PAGE
        table = pages.pages
        fresh = range(first, first + count)
        if table and not table.keys().isdisjoint(fresh):  # (a C-level scan: no Python per page)
            for k, idx in enumerate(fresh):
                if idx in table:
                    self.writable(pages, idx)[:] = data[k * PAGE : (k + 1) * PAGE]
            fresh = [i for i in fresh if i not in table]  # type: ignore[assignment]
        frames = self.arena.take(len(fresh))  # (stale ones too: each is overwritten whole)
        n = len(frames)
        view = self.arena.view
        if n and fresh[n - 1] - fresh[0] == n - 1 and frames == list(range(frames[0], frames[0] + n)):
            k = fresh[0] - first
            view[frames[0] * PAGE : (frames[0] + n) * PAGE] = data[k * PAGE : (k + n) * PAGE]
        else:
            for idx, f in zip(fresh, frames):
                view[f * PAGE : (f + 1) * PAGE] = data[(idx - first) * PAGE : (idx - first + 1) * PAGE]
        table.update(zip(fresh, frames))
        for idx in fresh[n:]:  # the arena is full: heap pages
            table[idx] = bytearray(data[(idx - first) * PAGE : (idx - first + 1) * PAGE])
        pages.dirty.update(fresh)
        self.dirtied.add(pages.ino)
        self.dirty_bytes += len(fresh) * PAGE

    def _release(self, pages: Pages, idx: int) -> None:
        """Page ``idx`` is losing its entry: a frame goes back to the arena (or waits for its run)."""
        entry = pages.pages.get(idx)
        if type(entry) is not int:
            return
        if entry in self._sealing:
            self._orphans.add(entry)  # type: ignore[arg-type]
        else:
            self.arena.release([entry])  # type: ignore[list-item]

    def _settled(self, pages: Pages, idx: int) -> bool:
        """Page ``idx`` is dirty or clean, not only in a run being written: a heap page there may
        be zeroed when the cache lets go of it (a run's own heap pages are zeroed by ``written``)."""
        return idx in pages.dirty or (pages.ino, idx) in self._clean

    # ------------------------------------------------------------ writeback

    def take_dirty(self, pages: Pages, max_run: int) -> Iterator[Run]:
        """The dirty pages as runs of consecutive pages, each at most ``max_run`` long, with
        their dirty bits cleared now; a write landing meanwhile dirties (a copy of) its page
        again. Until the caller reports a run ``written`` (or ``untake``s it) its frames stay as
        they are.

        The pages are taken at once but cut into ``Run``s only as the caller iterates: a flush
        of thousands of scattered pages no longer holds a Run per page from the start, and
        those objects, alive across the whole flush, made the cyclic GC's full passes (each
        over every object the mount holds) run during it. A caller that stops early must still
        ``untake`` the rest."""
        idxs = sorted(pages.dirty)
        pages.dirty.clear()
        entries = list(map(pages.pages.__getitem__, idxs))
        self._sealing.update(itertools.compress(entries, map(isinstance, entries, itertools.repeat(int))))
        return _runs(idxs, entries, max_run)

    def written(self, runs: Iterable[tuple[Pages, Run]]) -> None:
        """Runs from ``take_dirty`` (each with its inode's pages) are on their way to disk (or
        were dropped): their pages that nobody rewrote meanwhile are clean now, and their frames
        go back to the arena -- in one pass for a whole batch of runs."""
        freed: list[int] = []
        orphans, sealing = self._orphans, self._sealing
        room = self.clean_limit // PAGE - len(self._clean)
        for pages, stretch in itertools.groupby(runs, _FIRST):  # (a batch's runs come file by file)
            taken = list(map(_SECOND, stretch))
            self.dirty_bytes -= sum(map(len, map(_ENTRIES, taken))) * PAGE
            if room <= 0 and self._streamed(pages, taken):
                continue
            table, dirty = pages.pages, pages.dirty
            for idx, entry in itertools.chain.from_iterable(enumerate(run.entries, run.first) for run in taken):
                frame = type(entry) is int
                if frame:
                    freed.append(entry)  # type: ignore[arg-type]  # every frame goes back (and stops sealing)
                    if entry in orphans:
                        orphans.discard(entry)  # type: ignore[arg-type]
                        continue
                    # a frame still in use is still its page's: rewriting or dropping a page
                    # being sealed gives it a new entry and orphans this one
                    assert idx not in dirty and table.get(idx) == entry
                elif idx in dirty or table.get(idx) is not entry:
                    entry[:] = ZERO_PAGE  # type: ignore[index]  # rewritten (or dropped) since: the newer page stays
                    continue
                if room > 0:  # clean pages live on the heap; the arena is for dirty ones
                    if frame:
                        table[idx] = bytearray(self.arena.page(entry))  # type: ignore[arg-type]
                    self._clean[(pages.ino, idx)] = pages
                    room -= 1
                else:  # cache full of clean pages: drop written-behind pages first, as streaming I/O wants
                    del table[idx]
                    if not frame:
                        entry[:] = ZERO_PAGE  # type: ignore[index]
        sealing.difference_update(freed)  # (one call for the batch, not one per page)
        # a run's frames go back highest first, so the next streaming write takes them as one
        # ascending slice (see put_dirty)
        self.arena.release(freed[::-1])
        self._close_if_idle()

    def _streamed(self, pages: Pages, runs: list[Run]) -> bool:
        """Streaming runs (of one inode), written while the clean cache is full: all frames -- a
        sequential writer's, and as well a scattered writer's pages, each a run of its own.
        Their pages leave the cache (written-behind pages go first) and their frames go back to
        the arena together, stale: the next write of a whole page takes one and overwrites it
        (``take``, ``take_one``), and ``drop`` zeroes any it has not. A page rewritten or
        dropped since it was taken keeps its newer state, and the run's frame (an orphan then)
        goes back zeroed. A scattered writer's frames were zeroed one by one here, then written
        over whole, and its pages left the cache a Python step each (~60 bytecodes a page)."""
        frames = list(itertools.chain.from_iterable(map(_ENTRIES, runs))) if len(runs) > 1 else runs[0].entries
        if not all(map(isinstance, frames, itertools.repeat(int))):  # (a scan in C: a MiB's run is 256 pages)
            return False
        # Its pages are taken out as they are, and put back if any is not the run's frame: a page
        # rewritten since it was taken has a new entry (its frame, being sealed, could not be
        # reused), so does one dropped and written again, and a dropped one has none -- so the
        # entries alone say what the dirty set and the orphans would (each test a pass in C)
        firsts = list(map(_RUN_FIRST, runs))
        span = list(itertools.chain.from_iterable(map(range, firsts, map(add, firsts, map(len, map(_ENTRIES, runs))))))
        table = pages.pages
        held = list(map(table.pop, span, itertools.repeat(None)))
        self._sealing.difference_update(frames)
        if held != frames:
            moved = list(itertools.compress(range(len(held)), map(ne, held, frames)))
            for k in moved:  # (a few pages: written again while their runs were in flight)
                if held[k] is not None:
                    table[span[k]] = held[k]
            orphans = [frames[k] for k in moved]
            self._orphans.difference_update(orphans)
            self.arena.release(orphans)
            frames = list(itertools.compress(frames, map(eq, held, frames)))
        self.arena.release(frames[::-1], wipe=False)  # type: ignore[arg-type]
        return True

    def untake(self, pages: Pages, run: Run) -> None:
        """A run from ``take_dirty`` that will not be written (its flush was cancelled before
        it started): its pages are dirty again, unless rewritten or dropped since -- then the
        newer state stands and only the run's own frames go back to the arena."""
        table, dirty = pages.pages, pages.dirty
        for idx, entry in zip(range(run.first, run.first + len(run.entries)), run.entries):
            if type(entry) is int:
                self._sealing.discard(entry)  # type: ignore[arg-type]
                if entry in self._orphans:  # the page has a new entry, or is gone
                    self._orphans.discard(entry)  # type: ignore[arg-type]
                    self.arena.release([entry])  # type: ignore[list-item]
                    self.dirty_bytes -= PAGE
                    continue
            elif idx in dirty or table.get(idx) is not entry:
                entry[:] = ZERO_PAGE  # type: ignore[index]  # rewritten (or dropped) since: the newer page stays
                self.dirty_bytes -= PAGE
                continue
            dirty.add(idx)
            self.dirtied.add(pages.ino)
        self._close_if_idle()

    def drop(self, pages: Pages, first: int = 0, end: int | None = None) -> int:
        """Forget pages ≥ ``first`` (and < ``end``: a punched hole), dirty ones too: truncate,
        unlink, hole punch, lost writeback, a key going away; returns dirty bytes dropped. Every
        page is zeroed as it goes (or, if a run being written still reads it, when that run is
        written): they held plaintext. So are the clean pages evicted so far (a caller dropping
        pages is not in the middle of a read) and the arena's stale frames, whoever's they were."""
        self.zero_evicted()
        self.arena.wipe_stale()
        gone = [i for i in pages.pages if first <= i and (end is None or i < end)]
        dirty = 0
        for i in gone:
            self._discard(pages, i)
            if i in pages.dirty:
                pages.dirty.discard(i)
                dirty += PAGE
        self.dirty_bytes -= dirty
        return dirty

    def forget(self, pages: Pages, idxs: Iterable[int]) -> None:
        """Drop these pages unless rewritten since (a run writeback could not write)."""
        for idx in idxs:
            if idx not in pages.dirty and idx in pages.pages:
                self._discard(pages, idx)

    def _discard(self, pages: Pages, idx: int) -> None:
        """Page ``idx`` leaves the cache: a heap page is zeroed unless a run being written still
        reads it (then when that run is written), a frame goes back to the arena."""
        entry = pages.pages[idx]
        if type(entry) is not int and self._settled(pages, idx):
            entry[:] = ZERO_PAGE  # type: ignore[index]
        self._release(pages, idx)
        del pages.pages[idx]
        self._clean.pop((pages.ino, idx), None)

    def _shrink(self) -> None:
        evicted = self._evicted
        pending = bool(evicted)
        while len(self._clean) * PAGE > self.clean_limit:
            (_, idx), pages = self._clean.popitem(last=False)
            page = pages.pages.pop(idx, None) if idx not in pages.dirty else None
            if page is not None:
                evicted.append(page)  # type: ignore[arg-type]
        if evicted and not pending:
            self._zero_soon()

    def _zero_soon(self) -> None:
        try:  # the reader that filled the cache may still be using it: zero it once it has awaited
            asyncio.get_running_loop().call_soon(self._zero_if_unread)
        except RuntimeError:  # no event loop, so no reader in the middle of a read
            self.zero_evicted()

    def _zero_if_unread(self) -> None:
        if not self._readers:  # else the last reader to finish asks again
            self.zero_evicted()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around a read that gathers pages across awaits (``Filesystem.read_pages``): the pages
        it filled first may be evicted by the ones it fills next, and must not be zeroed before
        it has returned them. Evicted pages are zeroed once no such read is running -- on the
        loop's next turn, so its caller may still copy what it got until it next awaits -- or
        when the next read starts with none running: its caller has awaited since (a read
        loop whose reads each await the disk never sees the loop turn between two of them, and
        kept every page it evicted, plaintext, past the cache's limit: 250 MB for a 256 MiB
        file's check in trust23)."""
        if not self._readers and self._evicted:
            self.zero_evicted()
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            if not self._readers and self._evicted:
                self._zero_soon()

    def zero_evicted(self) -> None:
        """Zero the clean pages evicted since the last call."""
        for page in self._evicted:
            page[:] = ZERO_PAGE
        self._evicted.clear()


def _runs(idxs: list[int], entries: list[Entry], max_run: int) -> Iterator[Run]:
    """Cut taken pages (sorted indexes, their entries) into runs of consecutive pages, each at
    most ``max_run`` long, as the caller asks for them."""
    n = len(idxs)
    if not n:
        return
    if idxs[-1] - idxs[0] == n - 1:  # one stretch: the streaming case
        starts = [0]
    else:
        starts = [k for k, (a, b) in enumerate(zip(idxs, idxs[1:]), 1) if b != a + 1]
        starts.insert(0, 0)
    starts.append(n)
    for a, b in zip(starts, starts[1:]):
        if b - a == 1:
            yield Run(idxs[a], entries[a:b])
            continue
        for k in range(a, b, max_run):
            yield Run(idxs[k], entries[k : min(k + max_run, b)])
