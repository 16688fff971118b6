"""The allocator against a set-of-sectors model: no double allocation, pinned space unusable
until unpinned, and the free-space record equal to free plus pinned."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.engine.alloc import Allocator
from blockemu.errors import NoSpaceError

S = 4096
TOTAL = 64


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "keep", "free", "pin", "unpin"]), st.integers(1, 8),
                          st.integers(0, 1000)), max_size=80))
def test_allocator_matches_model(ops):
    a = Allocator([(0, TOTAL * S)], nodesize=2 * S)
    free = set(range(TOTAL))
    live: list[tuple[int, int]] = []
    pinned: set[int] = set()
    for op, n, pick in ops:
        if op == "alloc":
            try:
                start = a.alloc(n * S)
            except NoSpaceError:
                assert not any(all(s + i in free for i in range(n)) for s in range(TOTAL - n + 1))
                continue
            sectors = set(range(start // S, start // S + n))
            assert start % S == 0 and sectors <= free, "allocated space that was not free"
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
        elif op == "unpin":
            a.unpin_all()
            free |= pinned
            pinned = set()
        got = {s for start, length in a.free.items() for s in range(start // S, (start + length) // S)}
        assert got == free
        assert a.free_bytes() == len(free) * S and a.pinned_bytes() == len(pinned) * S
        assert a.node_room == sum(n // a.nodesize for n in a.free.values())
        record = {s for start, length in a.extents_after_commit() for s in range(start // S, (start + length) // S)}
        assert record == free | pinned
        starts = list(a.free.keys())
        assert all(starts[i] + a.free[starts[i]] < starts[i + 1] for i in range(len(starts) - 1)), "not coalesced"


def test_alloc_is_contiguous_for_consecutive_requests_and_fails_cleanly():
    a = Allocator([(0, 16 * S)])
    assert [a.alloc(S) for _ in range(4)] == [0, S, 2 * S, 3 * S]
    a.release(S, S)
    try:
        a.alloc(13 * S)
        raise AssertionError("fragmented space satisfied a too-large request")
    except NoSpaceError as e:
        assert e.errno == 28
