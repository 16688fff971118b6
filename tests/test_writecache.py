"""The device's write cache of sector ranges against a model: a dict sector -> the write there."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.device.writecache import Entry, Segment, WriteCache, as_runs, pinned
from blockemu.device.writelog import SECTOR

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 40), st.integers(1, 12)),
    st.tuples(st.sampled_from(["drop", "snapshot", "destaged", "clear", "pin"]), st.integers(0, 40), st.integers(0, 12)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_ranges_against_a_dict_of_sectors(ops):
    """Writes overlapping each other in every way, a FUA's drop of what it supersedes, a destage's
    snapshot and clean-up with writes in between (or none: the one-step path), and clears: every
    cached sector names the model's write, the ranges cover each sector once and in order, each
    write counts its cached sectors, and a lent buffer goes back exactly when the last of its
    sectors leaves the cache and nothing pins it."""
    cache, model = WriteCache(), {}
    released: list[Entry] = []
    made: list[Entry] = []
    snap: tuple[list[Segment], int, dict[int, Entry]] | None = None
    pins = []
    for op, first, n in ops:
        if op == "put":
            e = Entry(bytes(range(n)) * SECTOR, first, n)
            e.release = lambda e=e: released.append(e)
            made.append(e)
            cache.put(first, e)
            model.update(dict.fromkeys(range(first, first + n), e))
        elif op == "drop":  # a FUA write over [first, first + n) once its host call is done
            cache.drop(cache.covering(first, first + n))
            for s in range(first, first + n):
                model.pop(s, None)
        elif op == "snapshot":
            snap = (cache.snapshot(), cache.version, dict(model))
        elif op == "destaged" and snap is not None:
            segments, version, then = snap
            cache.destaged(segments, version)
            model = {s: e for s, e in model.items() if then.get(s) is not e}
            snap = None
        elif op == "clear":
            cache.clear()
            model = {}
        elif op == "pin":  # a read across an await holds what it overlays
            pins.append(pinned(e for *_, e in cache.covering(first, first + n)))
            pins[-1].__enter__()
        assert list(cache.sector_items()) == sorted(model.items(), key=lambda i: i[0])
        assert cache.sectors == len(model) and bool(cache) == bool(model)
        lo, hi = first, first + n
        assert [(s, e) for a, b, e in cache.covering(lo, hi) for s in range(a, b)] == \
            [(s, model[s]) for s in range(lo, hi) if s in model]
        held = {id(e) for e in model.values()}
        for e in made:
            assert e.live == sum(x is e for x in model.values())
            assert (e in released) == (id(e) not in held and not e.pins)
    for p in pins:
        p.__exit__(None, None, None)
    assert len(released) == len(set(map(id, released))), "a buffer given back twice"
    gone = {id(e) for e in released}
    assert all(id(e) not in gone for e in model.values())
    cache.clear()
    assert len(released) == len(set(map(id, released)))


def test_runs_join_adjacent_ranges_a_buffer_each():
    a, b = Entry(b"a" * 4 * SECTOR, 0, 4), Entry(b"b" * SECTOR, 9, 1)
    got = as_runs([(1, 3, a), (3, 4, a), (9, 10, b)])
    assert [(off, [bytes(v) for v in bufs]) for off, bufs in got] == \
        [(SECTOR, [b"a" * 2 * SECTOR, b"a" * SECTOR]), (9 * SECTOR, [b"b" * SECTOR])]
