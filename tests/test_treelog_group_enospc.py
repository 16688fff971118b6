"""A log sync that groups two fsyncs and finds no room for the second's items falls back to a
full commit; the second fsync, next at the lock, must not then sync the half-built log as if it
held its inode (review23)."""
from __future__ import annotations

import asyncio
import random

import blockemu
from blockemu.device.writelog import sparse_copy
from tests.util import until


async def test_an_fsync_after_its_group_found_no_room_still_logs_its_inode(tmp_path):
    """fsyncs of a and b wait for the commit lock together: a's log sync logs both. a's items
    fill the log's leaf, so b's need a new one, and the room left is exactly the keep: ENOSPC,
    and a's fsync commits. b's fsync takes the lock before that commit (it waited first) and
    must not sync the log, whose bookkeeping the failed attempt left marking b's items logged
    (it commits). A power cut right after b's fsync returned (a's commit held back) keeps b's data."""
    img, crash = str(tmp_path / "a.img"), str(tmp_path / "crash.img")
    await blockemu.mkfs(img, size="64M", force=True)
    rng = random.Random(7)
    size = 4 << 20
    data = {"/a": bytearray(rng.randbytes(size)), "/b": bytearray(rng.randbytes(size))}
    async with blockemu.mount(img, interval=3600) as fs:
        handles = {}
        for path, want in data.items():
            handles[path] = await fs.open(path, "w")
            await handles[path].write(bytes(want))
        await fs.sync()
        for path, count in (("/a", 120), ("/b", 120)):  # scattered: a's items fill most of a leaf
            for off in rng.sample(range(0, size, 4096), count):
                page = rng.randbytes(4096)
                await handles[path].pwrite(page, off)
                data[path][off:off + 4096] = page
        vol, engine, alloc = fs.vol, fs.vol.engine, fs.vol.engine.allocator
        gate, commits = asyncio.Event(), []
        commit = vol.commit

        async def held_commit(**kw):  # a's fallback commit (the first) waits until the cut is taken
            commits.append(kw)
            if len(commits) == 1:
                await gate.wait()
            return await commit(**kw)

        vol.commit = held_commit
        await vol.commit_lock.acquire()
        fa = asyncio.ensure_future(handles["/a"].fsync())
        await until(lambda: len(vol._fsyncs) >= 1, "a's fsync never waited for the commit lock")
        fb = asyncio.ensure_future(handles["/b"].fsync())
        await until(lambda: len(vol._fsyncs) >= 2, "b's fsync never waited for the commit lock")
        while alloc.node_room > engine.data_keep() + fs.promised_blocks() + 1:  # room for the log's first block only
            alloc.alloc(vol.sb.nodesize)
        vol.commit_lock.release()
        await fb
        assert commits and not fa.done()  # a fell back to a commit, which has not run yet
        sparse_copy(img, crash)  # the power cut: b's fsync returned
        gate.set()
        await fa
        for h in handles.values():
            await h.close()
    async with blockemu.mount(crash) as fs:
        async with fs.open("/b") as f:
            assert await f.read() == data["/b"]
