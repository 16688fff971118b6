"""The page cache against a model of the file's pages, with writeback runs in flight.

What must hold whatever the interleaving of writes, takes, completions, drops and lost runs:
a cached page reads back as the model says; a frame being sealed never changes until its
run is written (stable pages: a worker in another process reads it with no lock); no frame
is lost, shared by two pages or free while in use; ``dirty_bytes`` is the dirty pages plus
the pages in flight; once everything is written every frame is free again. The arena is
small, so writes also spill onto heap pages when it is full. And nothing the cache lets go of
keeps its plaintext: a free frame, and a heap page no longer cached nor in flight, is zeros --
but a *stale* one (a streaming run's, freed unzeroed for the next whole-page write to
overwrite), which no page that needs zeros gets as it is, and which every drop zeroes.
Runs are cut from what ``take_dirty`` took only as they are asked for (writes landing
meanwhile must not change them), completed several at once (one ``written`` per batch), and
some are handed back unwritten (``untake``: a cancelled flush). Every inode with a dirty page
is in the cache's note of dirtied inodes, which writeback prunes, whichever way it got dirty.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockemu.fs.pagecache import PAGE, PageCache, Pages, Run

FRAMES = 12
INDEXES = st.integers(0, 15)
ZERO_PAGE = bytes(PAGE)


class PageCacheMachine(RuleBasedStateMachine):
    CLEAN = 4  # clean pages the cache keeps

    def __init__(self) -> None:
        super().__init__()
        self.cache = PageCache(clean_limit=self.CLEAN * PAGE, dirty_frames=FRAMES)
        self.pages = [Pages(1), Pages(2)]
        self.model: list[dict[int, bytes]] = [{}, {}]  # what each file holds, page by page
        self.inflight: list[tuple[int, Run, list[bytes]]] = []  # (file, run, contents when taken)
        # runs taken and not yet cut: (file, the runs to come, {index: (entry, contents)} when taken, max_run)
        self.pending: list[tuple[int, Iterator[Run], dict[int, tuple[object, bytes]], int]] = []
        self.counter = 0
        self.heap_pages: dict[int, bytearray] = {}  # every heap page the cache has held, by id

    def teardown(self) -> None:
        self.cache.close()

    def _fill(self, f: int, idx: int) -> bytes:
        return self.model[f].get(idx, bytes(PAGE))

    def _content(self) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(4, "little") * (PAGE // 4)

    @rule(f=st.integers(0, 1), idx=INDEXES, off=st.integers(0, PAGE - 1), size=st.integers(1, PAGE))
    def partial_write(self, f: int, idx: int, off: int, size: int) -> None:
        size = min(size, PAGE - off)
        data = self._content()[:size]
        # no fill where the file holds zeros: the cache must give a page of zeros itself
        page = self.cache.writable(self.pages[f], idx, self.model[f].get(idx))
        page[off : off + size] = data
        new = bytearray(self._fill(f, idx))
        new[off : off + size] = data
        self.model[f][idx] = bytes(new)

    @rule(f=st.integers(0, 1), idx=INDEXES, count=st.integers(1, 6))
    def whole_pages(self, f: int, idx: int, count: int) -> None:
        data = b"".join(self._content() for _ in range(count))
        self.cache.put_dirty(self.pages[f], idx, memoryview(data))
        for k in range(count):
            self.model[f][idx + k] = data[k * PAGE : (k + 1) * PAGE]

    @rule(f=st.integers(0, 1), max_run=st.integers(1, 4), now=st.integers(0, 3))
    def take(self, f: int, max_run: int, now: int) -> None:
        """Take the file's dirty pages; cut ``now`` runs at once, the rest later (``cut``)."""
        pages = self.pages[f]
        taken = {i: (pages.pages[i], self.model[f][i]) for i in pages.dirty}
        runs = self.cache.take_dirty(pages, max_run)
        assert not pages.dirty, "taken pages are still dirty"
        self.pending.append(took := (f, runs, taken, max_run))
        for _ in range(now):
            if took in self.pending:
                self._cut(took)

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 1000))
    def cut(self, pick: int) -> None:
        self._cut(self.pending[pick % len(self.pending)])

    def _cut(self, took: tuple[int, Iterator[Run], dict[int, tuple[object, bytes]], int]) -> None:
        """The next run of a take, as it was when taken whatever was written since."""
        f, runs, taken, max_run = took
        run = next(runs, None)
        if run is None:
            assert not taken, "taken pages that no run holds"
            self.pending.remove(took)
            return
        assert 0 < len(run.entries) <= max_run and run.first == min(taken)
        contents = []
        for k, entry in enumerate(run.entries):
            held, data = taken.pop(run.first + k)
            assert entry == held if type(entry) is int else entry is held
            assert bytes(self.cache.buffer(entry)) == data, "a taken page is not what was written"
            contents.append(data)
        self.inflight.append((f, run, contents))

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 1000), count=st.integers(1, 3), lose=st.booleans())
    def complete(self, pick: int, count: int, lose: bool) -> None:
        """Runs written together: one ``written`` for the batch."""
        done = [self.inflight.pop(pick % len(self.inflight)) for _ in range(min(count, len(self.inflight)))]
        for f, run, contents in done:
            for slot, data in zip(run.entries, contents):
                assert bytes(self.cache.buffer(slot)) == data, "a page changed while it was being sealed"
            if lose:  # writeback could not write it: the data is gone unless rewritten since
                self.cache.forget(self.pages[f], range(run.first, run.first + len(run.entries)))
                for k in range(len(run.entries)):
                    if run.first + k not in self.pages[f].dirty:
                        self.model[f].pop(run.first + k, None)
        self.cache.written([(self.pages[f], run) for f, run, _ in done])

    @precondition(lambda self: self.inflight)
    @rule(pick=st.integers(0, 1000))
    def untake(self, pick: int) -> None:
        """A run handed back unwritten (its flush cancelled): its pages are dirty again, unless
        rewritten or dropped since."""
        f, run, _ = self.inflight.pop(pick % len(self.inflight))
        pages = self.pages[f]
        again = [run.first + k for k, e in enumerate(run.entries) if pages.pages.get(run.first + k) is e
                 or type(e) is int and pages.pages.get(run.first + k) == e]
        self.cache.untake(pages, run)
        assert all(i in pages.dirty for i in again), "an untaken page is not dirty again"

    @rule(f=st.integers(0, 1), first=INDEXES)
    def drop(self, f: int, first: int) -> None:
        self.cache.drop(self.pages[f], first)
        assert not self.cache.arena.stale, "a drop left stale frames unzeroed"
        for idx in [i for i in self.model[f] if i >= first]:
            del self.model[f][idx]

    @rule()
    def forget_clean(self) -> None:
        """Writeback drops the inodes it finds clean from the cache's note of dirtied ones
        (``Writeback.dirty_inodes``; here nothing holds a ``wb_lock``)."""
        for pages in self.pages:
            if not pages.dirty:
                self.cache.dirtied.discard(pages.ino)

    @invariant()
    def dirty_inodes_are_noted(self) -> None:
        """A sync visits only the inodes the cache noted as dirtied: one with a dirty page
        missing there would be left out of the sync, its acknowledged data not made durable."""
        assert {p.ino for p in self.pages if p.dirty} <= self.cache.dirtied, "a dirty inode is not noted"

    @invariant()
    def cached_pages_read_back(self) -> None:
        for f, pages in enumerate(self.pages):
            for idx in pages.pages:
                got = self.cache.get(pages, idx)
                assert got is not None and bytes(got) == self.model[f][idx]
            for idx in pages.dirty:
                assert idx in pages.pages, "a dirty page is missing"

    @invariant()
    def a_range_reads_as_its_pages(self) -> None:
        """``get_range`` (a read's lookup of many pages at once) gives what ``get`` gives page by
        page: frame 0 included, which a truthiness test took for "not cached". It also marks the
        clean pages it finds used, as ``get`` does, in index order: else a file read over and
        over, all cached, is the first the clean limit evicts."""
        clean = self.cache._clean
        for pages in self.pages:
            for first, count in ((0, 16), (3, 5), (15, 1)):
                used = [(pages.ino, i) for i in range(first, first + count) if (pages.ino, i) in clean]
                lru = [key for key in clean if key not in used] + used
                got = self.cache.get_range(pages, first, count)
                assert list(clean) == lru, "the clean pages read are not the most recently used"
                want = [self.cache.get(pages, i) for i in range(first, first + count)]
                assert [None if g is None else bytes(g) for g in got] == \
                    [None if w is None else bytes(w) for w in want]

    @invariant()
    def frames_accounted(self) -> None:
        cache = self.cache
        used = [s for p in self.pages for s in p.pages.values() if type(s) is int]
        sealing = {s for _, run, _ in self.inflight for s in run.entries if type(s) is int}
        sealing |= {e for _, _, taken, _ in self.pending for e, _ in taken.values() if type(e) is int}
        free = cache.arena.free + cache.arena.stale
        assert len(set(used)) == len(used), "two pages share a frame"
        assert len(set(free)) == len(free) and not set(free) & (set(used) | sealing), "a frame in use is free"
        assert set(free) | set(used) | sealing == set(range(FRAMES)), "a frame was lost"
        in_flight = sum(len(run.entries) for _, run, _ in self.inflight) + sum(len(t) for _, _, t, _ in self.pending)
        assert cache.dirty_bytes == (sum(len(p.dirty) for p in self.pages) + in_flight) * PAGE

    @invariant()
    def clean_pages_on_the_heap_within_limit(self) -> None:
        sealing = {s for _, run, _ in self.inflight for s in run.entries if type(s) is int}
        sealing |= {e for _, _, taken, _ in self.pending for e, _ in taken.values() if type(e) is int}
        clean = [p.pages[i] for p in self.pages for i in p.pages if i not in p.dirty]
        assert all(type(s) is not int or s in sealing for s in clean), "a clean page holds a frame after its run was written"
        assert len(self.cache._clean) <= self.CLEAN

    @invariant()
    def nothing_let_go_keeps_plaintext(self) -> None:
        arena = self.cache.arena
        assert all(arena.page(f) == ZERO_PAGE for f in arena.free), "a free frame holds data"
        held = [s for p in self.pages for s in p.pages.values() if type(s) is not int]
        held += [s for _, run, _ in self.inflight for s in run.entries if type(s) is not int]
        held += [e for _, _, taken, _ in self.pending for e, _ in taken.values() if type(e) is not int]
        self.heap_pages.update((id(s), s) for s in held)  # type: ignore[misc]
        live = {id(s) for s in held}
        assert all(page == ZERO_PAGE for i, page in self.heap_pages.items() if i not in live), \
            "a heap page the cache let go of holds data"

    def check_drained(self) -> None:
        for f in range(2):
            self.take(f, 4, 0)
        while self.pending:
            self.cut(0)
        while self.inflight:
            self.complete(0, 1, False)
        assert self.cache.dirty_bytes == 0
        assert sorted(self.cache.arena.free + self.cache.arena.stale) == list(range(FRAMES)), "frames leaked"


class DrainingMachine(PageCacheMachine):
    @rule()
    def drain(self) -> None:
        self.check_drained()


TestPageCache = DrainingMachine.TestCase
TestPageCache.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


class StreamingMachine(DrainingMachine):
    """No clean pages kept: every run of several pages written is a streaming run (``_streamed``),
    whose pages leave the cache and whose frames go back stale -- unless a page of it was
    rewritten or dropped while it was being written."""

    CLEAN = 0


TestStreaming = StreamingMachine.TestCase
TestStreaming.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


async def test_an_evicted_page_is_zeroed_once_its_reader_has_awaited():
    """Filling the cache past its limit evicts clean pages; one may be the very page a reader
    is about to copy (read_pages returns what it filled), so it keeps its contents until the
    reader next awaits -- and is zeroed then."""
    cache = PageCache(clean_limit=2 * PAGE, dirty_frames=4)
    pages = Pages(1)
    filled = [bytearray([i + 1]) * PAGE for i in range(3)]
    cache.put_clean(pages, dict(enumerate(filled)))
    assert cache.get(pages, 0) is None and filled[0] == bytes([1]) * PAGE
    await asyncio.sleep(0)
    assert filled[0] == ZERO_PAGE and cache.get(pages, 1) == bytes([2]) * PAGE
    cache.put_clean(pages, {1: (page := bytearray(b"x" * PAGE))})  # already cached: the cache's copy is newer
    assert page == ZERO_PAGE
    cache.close()


async def test_a_read_loop_keeps_no_more_evicted_pages_than_one_read_evicts():
    """Each read awaits the disk inside ``reading`` (the loop turns there, with a read running,
    so the zeroing put off to that turn finds a reader and waits), and the next read starts as
    soon as the last returns: a loop of reads never let the loop turn with no read running, and
    every page it evicted stayed alive, unzeroed, beyond the cache's limit."""
    cache = PageCache(clean_limit=2 * PAGE, dirty_frames=4)
    pages = Pages(1)
    filled = []
    for i in range(64):
        with cache.reading():
            filled.append(page := bytearray([i + 1]) * PAGE)
            cache.put_clean(pages, {i: page})
            await asyncio.sleep(0)  # the read's own await, as a disk read's
        assert len(cache._evicted) <= 1, f"read {i}: {len(cache._evicted)} evicted pages kept"
    assert all(page == ZERO_PAGE for page in filled[:-3])
    cache.close()


async def test_a_flush_of_scattered_pages_cuts_its_runs_as_it_writes_them(tmp_path, monkeypatch):
    """A flush takes every dirty page at once but makes a Run of each stretch only as the
    pipeline reaches it: 2,048 scattered pages were 2,048 Runs (and their lists) alive from the
    flush's start to its end, and such a crowd of survivors is what sets the cyclic GC's full
    passes off. In flight at any time: the lanes' groups, a few hundred runs at most."""
    import gc

    import blockemu
    from blockemu.fs.writeback import Writeback

    image = str(tmp_path / "scattered.img")
    await blockemu.mkfs(image, size="64M")
    alive: list[int] = []
    real = Writeback._write_group
    # Runs left over by earlier tests (garbage the collector, run rarely, has not reached yet)
    # are not this flush's: in the whole suite they made the count fail on its own
    gc.collect()
    before = sum(type(o) is Run for o in gc.get_objects())

    async def counted(self, pieces, turn):
        alive.append(sum(type(o) is Run for o in gc.get_objects()) - before)
        return await real(self, pieces, turn)

    monkeypatch.setattr(Writeback, "_write_group", counted)
    async with blockemu.mount(image) as fs:
        async with fs.open("/f", "w") as f:
            page = bytes(range(256)) * 16
            for i in range(2048):
                await f.pwrite(page, 2 * i * PAGE)  # every other page: 2,048 runs of one page
            await f.fsync()
            assert fs.writeback.stats["extents"] == 2048
    assert alive and max(alive) <= 512, max(alive)


def test_a_streamed_run_s_frames_go_back_unzeroed_for_whole_page_writes_only():
    """A streaming run written while the clean cache is full leaves its frames stale: the next
    streaming write overwrites them whole, so zeroing them first would be a memset of every
    byte streamed. A page that must start as zeros never gets one as it is, and a drop -- what
    locking an inode or unmounting does -- zeroes them all, whoever's they were."""
    cache = PageCache(clean_limit=0, dirty_frames=4)
    a, b = Pages(1), Pages(2)
    cache.put_dirty(a, 0, memoryview(b"a" * 4 * PAGE))
    cache.written([(a, run) for run in cache.take_dirty(a, 4)])
    arena = cache.arena
    assert not a.pages and sorted(arena.stale) == [0, 1, 2, 3] and not arena.free
    cache.put_dirty(b, 0, memoryview(b"b" * 2 * PAGE))  # into two stale frames, one copy
    assert b.pages == {0: 0, 1: 1} and cache.get(b, 1) == b"b" * PAGE
    assert cache.writable(b, 9) == ZERO_PAGE  # a new page past what was written: zeros
    stale = list(arena.stale)
    assert stale and all(arena.page(f) == b"a" * PAGE for f in stale)
    cache.drop(a)  # a has no pages left; the stale frames held its plaintext all the same
    assert not arena.stale and all(arena.page(f) == ZERO_PAGE for f in stale)
    cache.close()


def test_scattered_pages_written_go_back_stale_for_whole_page_writes_only():
    """A scattered writer's one-page runs, written together while the clean cache is full, leave
    the cache as a stream's do: their frames go back stale, not zeroed one by one, for the next
    write of a whole page (``writable(overwrite=True)``) to take and overwrite; a page that is
    only partly written gets zeros, and a drop zeroes what is still stale."""
    cache = PageCache(clean_limit=0, dirty_frames=4)
    a, b = Pages(1), Pages(2)
    for idx in (0, 2, 4):
        cache.writable(a, idx, overwrite=True)[:] = bytes([idx + 1]) * PAGE
    runs = list(cache.take_dirty(a, 4))
    assert [len(run.entries) for run in runs] == [1, 1, 1]
    cache.written([(a, run) for run in runs])
    arena = cache.arena
    assert not a.pages and len(arena.stale) == 3 and cache.dirty_bytes == 0
    page = cache.writable(b, 7, overwrite=True)  # a whole-page write: a stale frame, as it is
    assert b.pages[7] in range(4) and len(arena.stale) == 2 and page != ZERO_PAGE
    page[:] = b"b" * PAGE
    assert cache.writable(b, 8) == ZERO_PAGE  # a partial write's page: zeros (the free frame)
    assert cache.writable(b, 9) == ZERO_PAGE  # and once none is free, a stale one zeroed first
    stale = list(arena.stale)
    assert stale and all(arena.page(f) != ZERO_PAGE for f in stale)
    cache.drop(a)
    assert not arena.stale and all(arena.page(f) == ZERO_PAGE for f in stale)
    cache.close()
