"""Property test: the filesystem's file contents against a bytearray model, through the page
cache, writeback (forced often by tiny limits), COW overwrites, truncates, hole punches and
remounts -- and the file's extent map (``Extents.maps``) against the fs tree's items after each,
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

ops = st.lists(
    st.one_of(
        st.tuples(st.just("pwrite"), st.integers(0, 80_000), st.integers(1, 20_000), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 90_000)),
        st.tuples(st.just("punch"), st.integers(0, 90_000), st.integers(1, 40_000)),
        st.tuples(st.just("read"), st.integers(0, 90_000), st.integers(0, 30_000)),
        st.tuples(st.sampled_from(["fsync", "sync", "remount"])),
    ),
    min_size=1,
    max_size=30,
)


async def run(ops_list, encrypted: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        image = str(Path(d) / "m.img")
        await blockemu.mkfs(image, size="32M", node_size="4K")
        model = bytearray()
        path = "/e/f" if encrypted else "/f"

        async def mount():
            fs = await blockemu.mount(image, **OPTS)
            if encrypted:
                await fs.add_key(KEY)
            return fs

        fs = await mount()
        if encrypted:
            await fs.mkdir("/e")
            await fs.set_policy("/e", await fs.add_key(KEY))
        f = await fs.open(path, "w+")
        for op in ops_list:
            if op[0] == "pwrite":
                _, off, n, byte = op
                data = bytes([byte]) * n
                await f.pwrite(data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + n] = data
            elif op[0] == "truncate":
                await f.truncate(op[1])
                model = model[: op[1]] + bytes(max(0, op[1] - len(model)))
            elif op[0] == "punch":
                _, off, n = op
                await f.punch_hole(off, n)
                end = min(off + n, len(model))
                if off < end:
                    model[off:end] = bytes(end - off)
            elif op[0] == "read":
                assert await f.pread(op[2], op[1]) == bytes(model[op[1] : op[1] + op[2]])
            elif op[0] == "fsync":
                await f.fsync()
            elif op[0] == "sync":
                await fs.sync()
            else:
                await f.close()
                await fs.unmount()
                fs = await mount()
                f = await fs.open(path, "r+")
            assert f.inode.size == len(model)
            maps_are_the_tree(fs)
            accounts_agree(fs)  # no write admission reserve leaked by a truncate, punch or writeback
        assert await f.pread(1 << 20, 0) == bytes(model)
        await f.close()
        await fs.unmount()
        fs = await mount()
        async with fs.open(path) as f2:
            assert await f2.read() == bytes(model)
        await fs.unmount()
        report = check(image)
        assert report.clean, [e.message for e in report.errors]


@settings(max_examples=150)
@given(ops)
def test_plain_file_matches_model(ops_list):
    asyncio.run(run(ops_list, encrypted=False))


@settings(max_examples=80)
@given(ops)
def test_encrypted_file_matches_model(ops_list):
    asyncio.run(run(ops_list, encrypted=True))
