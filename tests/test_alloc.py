"""The allocator against a set-of-sectors model: no double allocation, pinned space unusable
until unpinned, the free-space record equal to free plus pinned, and the placement policy:
a small allocation fills the shortest hole that holds it."""
from __future__ import annotations

import bisect
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedDict

from blockemu.engine import alloc
from blockemu.engine.alloc import Allocator
from blockemu.errors import CorruptionError, NoSpaceError

S = 4096
TOTAL = 64
HOLE_MAX = 16 * S  # free extents shorter than this are holes (the allocator's 1 MiB, scaled down)


# whole_above 0: the record never compared whole; rebuild_above 0: pins always merged one by one,
# 1 << 20: the free maps always rebuilt; hole_max past the whole space: every free extent is a hole
# (``alloc``'s and ``largest``'s walk-free paths; with 16 sectors 1 step in 100 reached them)
@pytest.mark.parametrize("whole_above, rebuild_above, hole_max", [
    (alloc.DIFF_WHOLE_ABOVE, alloc.UNPIN_REBUILD_ABOVE, HOLE_MAX), (0, 0, HOLE_MAX),
    (alloc.DIFF_WHOLE_ABOVE, 1 << 20, HOLE_MAX), (alloc.DIFF_WHOLE_ABOVE, alloc.UNPIN_REBUILD_ABOVE, (TOTAL + 1) * S)])
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["alloc", "keep", "free", "pin", "unpin", "record"]), st.integers(1, 8),
                          st.integers(0, 1000)), max_size=80))
def test_allocator_matches_model(whole_above, rebuild_above, hole_max, monkeypatch, ops):
    monkeypatch.setattr(alloc, "DIFF_WHOLE_ABOVE", whole_above)
    monkeypatch.setattr(alloc, "UNPIN_REBUILD_ABOVE", rebuild_above)
    a = Allocator([(0, TOTAL * S)], nodesize=2 * S, hole_max=hole_max)
    record = SortedDict()  # the free-space record, kept as commits keep it: from record_changes
    free = set(range(TOTAL))
    live: list[tuple[int, int]] = []
    pinned: set[int] = set()
    for op, n, pick in ops:
        if op == "alloc":
            extents = dict(a.free)
            try:
                start = a.alloc(n * S)
            except NoSpaceError:
                assert not any(all(s + i in free for i in range(n)) for s in range(TOTAL - n + 1))
                continue
            sectors = set(range(start // S, start // S + n))
            assert start % S == 0 and sectors <= free, "allocated space that was not free"
            fits = sorted((m, s) for s, m in extents.items() if n * S <= m < hole_max)
            if n * S < hole_max and fits:
                assert start == fits[0][1], "a small allocation did not fill the shortest hole holding it"
            else:
                assert extents.get(start, 0) >= hole_max or any(
                    s < start < s + m and m >= hole_max for s, m in extents.items()), "next fit took a hole"
            free -= sectors
            live.append((start, n * S))
        elif op == "keep":  # data: leave ``keep`` tree blocks (2 sectors each) of room
            keep, extents = pick % 6, list(a.free.items())
            try:
                start = a.alloc(n * S, keep=keep)
            except NoSpaceError:
                # from the start of any free extent, the rest would hold too few tree blocks
                assert all(m < n * S or a.node_room - m // (2 * S) + (m - n * S) // (2 * S) < keep for _, m in extents)
                assert a.largest(keep) < n * S
                continue
            assert a.node_room >= keep
            free -= set(range(start // S, start // S + n))
            live.append((start, n * S))
        elif op in ("free", "pin") and live:
            start, length = live.pop(pick % len(live))
            sectors = set(range(start // S, (start + length) // S))
            if op == "free":
                a.release(start, length)
                free |= sectors
            else:
                a.pin(start, length)
                pinned |= sectors
        elif op in ("unpin", "record"):  # a commit: its record, then (unpin) its pins released
            gone, new = a.record_changes(record)
            assert set(gone) <= set(record.items()) and not set(new) & set(record.items())
            for start, _ in gone:
                del record[start]
            record.update(new)
            assert list(record.items()) == a.extents_after_commit()
            if op == "unpin":
                a.seal_pins()
                a.unpin_sealed()
                free |= pinned
                pinned = set()
        got = {s for start, length in a.free.items() for s in range(start // S, (start + length) // S)}
        assert got == free
        assert a.free_bytes() == len(free) * S and a.pinned_bytes() == len(pinned) * S
        assert a.node_room == sum(n // a.nodesize for n in a.free.values())
        assert list(a.holes) == sorted(n << 64 | s for s, n in a.free.items() if n < hole_max)
        after = {s for start, length in a.extents_after_commit() for s in range(start // S, (start + length) // S)}
        assert after == free | pinned
        starts = list(a.free.keys())
        assert all(starts[i] + a.free[starts[i]] < starts[i + 1] for i in range(len(starts) - 1)), "not coalesced"
        # how many free extents, shortest first, ``pick`` sectors fill whole (asked twice: the
        # second answer comes from the running sums the first built)
        sums = list(itertools.accumulate(sorted(a.free.values())))
        for nbytes in (pick * S, pick * S // 3):
            assert a.fills(nbytes) == (0 if max(a.free.values(), default=0) >= nbytes else bisect.bisect_right(sums, nbytes))
        for keep in {*range(6), a.node_room, a.node_room + 1}:  # near node_room too: taking the widest whole may not leave it
            assert a.largest(keep) == max([0, *(m if a.node_room - m // (2 * S) >= keep else
                                               m - (keep - (a.node_room - m // (2 * S))) * 2 * S for m in a.free.values())])


def test_only_holes_free_largest_and_fills():
    """Free space all holes (the fast paths: the widest hole is the longest free extent): the
    longest allocation that leaves ``keep`` tree blocks, and how many extents, shortest first, a
    number of bytes fills whole."""
    a = Allocator([(0, 4 * S), (8 * S, 8 * S), (20 * S, 2 * S)], nodesize=2 * S, hole_max=16 * S)
    assert a.node_room == 7
    assert [a.largest(keep) for keep in (0, 3, 4, 5, 7)] == [8 * S, 8 * S, 6 * S, 4 * S, 0]
    assert [a.fills(n) for n in (0, 8 * S, 9 * S, 13 * S, 14 * S, 1 << 30)] == [0, 0, 2, 2, 3, 3]  # none if 8 KiB holds it
    with pytest.raises(NoSpaceError):
        a.alloc(10 * S)  # longer than any hole
    a.alloc(8 * S, keep=3)  # leaves exactly 3
    assert (a.fills(1 << 30), a.fills(4 * S), a.largest(0)) == (2, 0, 4 * S)  # asked again after a change: built anew


def test_alloc_is_contiguous_for_consecutive_requests_and_fails_cleanly():
    a = Allocator([(0, 16 * S)])
    assert [a.alloc(S) for _ in range(4)] == [0, S, 2 * S, 3 * S]
    a.release(S, S)
    try:
        a.alloc(13 * S)
        raise AssertionError("fragmented space satisfied a too-large request")
    except NoSpaceError as e:
        assert e.errno == 28


@pytest.mark.parametrize("rebuild_above", [0, 1 << 20])  # pins merged one by one, the maps rebuilt
@pytest.mark.parametrize("pin", [(4 * S, S), (3 * S, 2 * S), (9 * S, S)])  # in a free extent, across its end, twice
def test_unpinning_space_already_free_is_corruption(monkeypatch, rebuild_above, pin):
    monkeypatch.setattr(alloc, "UNPIN_REBUILD_ABOVE", rebuild_above)
    a = Allocator([(4 * S, 4 * S), (20 * S, 4 * S)])  # [4, 8) and [20, 24) free
    a.pin(*pin)
    a.pin(9 * S, S)
    a.seal_pins()
    before = (dict(a.free), list(a.holes), a.node_room)
    with pytest.raises(CorruptionError) as e:
        a.unpin_sealed()
    assert e.value.kind == "FREE_SPACE_MISMATCH"
    if rebuild_above:  # rebuilt, nothing changed (one by one, the pins before the bad one are free)
        assert (dict(a.free), list(a.holes), a.node_room) == before


def _fragmented(ops: list[tuple[int, int]], hole_max: int) -> Allocator:
    """An allocator over 64 sectors with holes: ``ops`` allocate (n > 0) or release a live extent."""
    a = Allocator([(0, TOTAL * S)], nodesize=2 * S, hole_max=hole_max)
    live: list[tuple[int, int]] = []
    for n, pick in ops:
        if n > 0:
            try:
                live.append((a.alloc(n * S), n * S))
            except NoSpaceError:
                pass
        elif live:
            a.release(*live.pop(pick % len(live)))
    return a


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(-3, 6), st.integers(0, 100)), max_size=30),
       st.lists(st.integers(1, 6), min_size=1, max_size=12), st.integers(0, 8), st.sampled_from([2, 4, 16, 128]))
def test_alloc_many_places_as_alloc_one_by_one(ops, pieces, keep, hole_sectors):
    """One call for a group of runs (an fsync's writeback) gives the places ``alloc`` would give
    each run in turn and leaves the same free extents, room and cursor; if a piece does not fit,
    it raises as that ``alloc`` would, with nothing taken."""
    one, many = _fragmented(ops, hole_sectors * S), _fragmented(ops, hole_sectors * S)
    before = dict(many.free)
    lengths = [n * S for n in pieces]
    try:
        expected = [one.alloc(length, keep=keep) for length in lengths]
    except NoSpaceError:
        expected = None
    try:
        got = many.alloc_many(lengths, keep=keep)
    except NoSpaceError:
        assert expected is None, "alloc_many refused what alloc placed"
        assert dict(many.free) == before and many.node_room == sum(n // many.nodesize for n in before.values())
        return
    assert got == expected
    assert dict(many.free) == dict(one.free) and many.node_room == one.node_room and many.cursor == one.cursor


def test_alloc_many_sees_a_hole_its_own_placing_made():
    """``alloc_many`` asks once per length whether a hole would take it, while it carves pieces
    from one free extent; a piece placed by ``alloc`` in between may leave a new hole (the rest of
    that extent, put back), and the next small piece goes there, as ``alloc`` one by one puts it."""
    lengths = [S, S, S, S, 2 * S, S]  # the fifth leaves [4S, 5S) a hole: the sixth fills it
    one, many = (Allocator([(0, 5 * S), (10 * S, 10 * S)], nodesize=S, hole_max=2 * S) for _ in range(2))
    assert [one.alloc(n) for n in lengths] == many.alloc_many(lengths) == [0, S, 2 * S, 3 * S, 10 * S, 4 * S]
    assert dict(many.free) == dict(one.free)


async def test_overwrites_reuse_the_holes_commits_gave_back(tmp_path):
    """Scattered 4 KiB overwrites free a 4 KiB hole each. Once the commit that freed them is
    durable the next transaction fills them, so the free-space record every commit rewrites
    stays the size of one commit's frees instead of growing by a hole per overwrite (next fit
    alone came back to them only after crossing the device). Read back after a remount, fsck
    clean."""
    import os
    import random

    import blockemu
    from tests.util import assert_fsck_clean

    image = str(tmp_path / "fs.img")
    await blockemu.mkfs(image, size="64M")
    rng, want = random.Random(5), bytearray(os.urandom(256 * S))
    sizes = []
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/f", "w+") as f:
            await f.pwrite(bytes(want), 0)
            await fs.sync()
            for _ in range(24):
                for _ in range(16):
                    page, data = rng.randrange(256), os.urandom(S)
                    want[page * S:(page + 1) * S] = data
                    await f.pwrite(data, page * S)
                await fs.sync()
                sizes.append(len(fs.vol.engine.free_items))
    # one commit's frees (16) and the rest of the device; next fit alone grew it to 78, and on
    assert max(sizes) <= 24, sizes
    async with blockemu.mount(image) as fs:
        async with fs.open("/f") as f:
            assert await f.pread(len(want), 0) == want
    assert_fsck_clean(image)
