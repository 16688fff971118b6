"""Property test: the filesystem's file contents against a bytearray model, through the page
cache, writeback (forced often by tiny limits), COW overwrites, truncates, hole punches and
remounts, of one file or of several whose runs share a flush's batches -- and each file's extent map (``Extents.maps``) against the fs tree's items after each,
and write admission's per-file reserves (``accounts_agree``)."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import blockemu
from blockemu.check.fsck import check
from tests.test_admission import accounts_agree
from tests.test_extent_map import maps_are_the_tree

KEY = bytes(range(32))
OPTS = dict(interval=3600, dirty_limit=64 << 10, background_bytes=16 << 10, cache_limit=32 << 10, max_extent=16 << 10)

def ops_on(files: int, most: int = 20_000, fewest: int = 1) -> st.SearchStrategy:
    """Random operations on ``files`` files (each op's second field: which), pwrites of at most
    ``most`` bytes, at least ``fewest`` of them: with several files and small runs a flush's batch holds several files' runs,
    mapped in one pass (``add_extents``)."""
    which = st.integers(0, files - 1)
    return st.lists(
        st.one_of(
            st.tuples(st.just("pwrite"), which, st.integers(0, 80_000), st.integers(1, most), st.integers(0, 255)),
            st.tuples(st.just("truncate"), which, st.integers(0, 90_000)),
            st.tuples(st.just("punch"), which, st.integers(0, 90_000), st.integers(1, 40_000)),
            st.tuples(st.just("read"), which, st.integers(0, 90_000), st.integers(0, 30_000)),
            st.tuples(st.just("fsync"), which),
            st.tuples(st.sampled_from(["sync", "remount"])),
        ),
        min_size=fewest,
        max_size=max(30, fewest * 2),
    )


async def run(ops_list, encrypted: bool, files: int = 1, **opts) -> None:
    with tempfile.TemporaryDirectory() as d:
        image = str(Path(d) / "m.img")
        await blockemu.mkfs(image, size="32M", node_size="4K")
        models = [bytearray() for _ in range(files)]
        paths = [f"/e/f{i}" if encrypted else f"/f{i}" for i in range(files)]

        async def mount():
            fs = await blockemu.mount(image, **{**OPTS, **opts})
            if encrypted:
                await fs.add_key(KEY)
            return fs

        fs = await mount()
        if encrypted:
            await fs.mkdir("/e")
            await fs.set_policy("/e", await fs.add_key(KEY))
        handles = [await fs.open(path, "w+") for path in paths]
        for op in ops_list:
            if op[0] == "sync":
                await fs.sync()
            elif op[0] == "remount":
                for f in handles:
                    await f.close()
                await fs.unmount()
                fs = await mount()
                handles = [await fs.open(path, "r+") for path in paths]
            else:
                f, model = handles[op[1]], models[op[1]]
                if op[0] == "pwrite":
                    _, _, off, n, byte = op
                    data = bytes([byte]) * n
                    await f.pwrite(data, off)
                    if off > len(model):
                        model.extend(bytes(off - len(model)))
                    model[off : off + n] = data
                elif op[0] == "truncate":
                    await f.truncate(op[2])
                    del model[op[2] :]
                    model.extend(bytes(op[2] - len(model)))
                elif op[0] == "punch":
                    _, _, off, n = op
                    await f.punch_hole(off, n)
                    end = min(off + n, len(model))
                    if off < end:
                        model[off:end] = bytes(end - off)
                elif op[0] == "read":
                    assert await f.pread(op[3], op[2]) == bytes(model[op[2] : op[2] + op[3]])
                else:
                    await f.fsync()
            for f, model in zip(handles, models):
                assert f.inode.size == len(model)
            maps_are_the_tree(fs)
            accounts_agree(fs)  # no write admission reserve leaked by a truncate, punch or writeback
        for f, model in zip(handles, models):
            assert await f.pread(1 << 20, 0) == bytes(model)
            await f.close()
        await fs.unmount()
        fs = await mount()
        for path, model in zip(paths, models):
            async with fs.open(path) as f2:
                assert await f2.read() == bytes(model)
        await fs.unmount()
        report = check(image)
        assert report.clean, [e.message for e in report.errors]


@settings(max_examples=150)
@given(ops_on(1))
def test_plain_file_matches_model(ops_list):
    asyncio.run(run(ops_list, encrypted=False))


@settings(max_examples=80)
@given(ops_on(1))
def test_encrypted_file_matches_model(ops_list):
    asyncio.run(run(ops_list, encrypted=True))


@settings(max_examples=60)
@given(ops_on(4, most=3_000, fewest=24))
def test_files_written_back_together_match_models(ops_list):
    """Three files' small runs share a flush's batches (a sync's, or the background writeback's;
    runs of up to 64 KiB, all sealed on the loop, batched): each file's bytes after remounts
    match its own model."""
    asyncio.run(run(ops_list, encrypted=False, files=4, max_extent=64 << 10, seal_workers=0))
