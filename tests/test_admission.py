"""Write admission's per-file account of tree room (``Filesystem.reserve_meta``): what a dirty
file's data will cost writeback -- its runs' items and the leaves it COWs -- is reserved when the
file dirties and given back whole at one point, once none of its data is dirty or in flight
(``release_meta``): written back, lost, or dropped by an unlink or a truncate. Its items' share
and its leaves' came back on different schedules, and a file unlinked, truncated or failed
while another stayed dirty held both until nothing in the mount was (review30)."""
from __future__ import annotations

import asyncio
import contextlib
import errno

import pytest

import blockemu
from blockemu.device.faultplan import FaultPlan
from blockemu.errors import NoSpaceError
from blockemu.fs.filesystem import Filesystem
from tests.util import ErrnoCheck

S = 4096


def accounts_agree(fs: Filesystem) -> None:
    """The mount's total is its files' accounts, and a file with nothing dirty or in flight
    holds none (the invariant ``tests/test_fs_model.py`` checks after every step too)."""
    assert fs.meta_reserved == sum(i.reserved for i in fs.inodes.values())
    assert all(not i.reserved for i in fs.inodes.values() if not i.pages.dirty and not i.flushing)


@pytest.fixture
async def image(tmp_path):
    path = str(tmp_path / "a.img")
    await blockemu.mkfs(path, size="32M")
    return path


@pytest.mark.parametrize("how", ["unlink", "truncate", "failed writeback"])
async def test_a_files_reserve_comes_back_when_its_dirty_data_goes(image, how):
    """/keep stays dirty throughout, so nothing in the mount is clean: /gone's account must come
    back the moment its dirty data goes, and /keep's once it is written back -- with no write
    after it to notice that nothing is dirty."""
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        async with fs.open("/keep", "w") as keep:
            await keep.write(b"k" * S)
            held = fs.meta_reserved
            assert held == keep.inode.reserved >= fs.inode_leaves
            gone = await fs.open("/gone", "w")
            await gone.write(b"g" * 3 * S)
            await gone.pwrite(b"h" * S, 8 * S)  # a second run: its items, not its leaves again
            assert gone.inode.reserved > fs.inode_leaves + fs.meta_for(S)
            assert fs.meta_reserved == held + gone.inode.reserved
            if how == "unlink":
                await gone.close()
                await fs.unlink("/gone")
            elif how == "truncate":
                await gone.truncate(0)
                await gone.close()
            else:
                # its data's write fails (no commit meanwhile: the trees' writes are not refused)
                fs.vol.device.faults = FaultPlan(eio=[(0, 1 << 40, "w")])
                await fs.writeback.flush_inode(gone.inode)
                fs.vol.device.faults = FaultPlan()
                assert gone.inode.lost_bytes == 4 * S
                with ErrnoCheck(errno.EIO):
                    await gone.close()
            assert keep.inode.pages.dirty
            accounts_agree(fs)
            assert fs.meta_reserved == held
            await keep.fsync()
            accounts_agree(fs)
            assert fs.meta_reserved == 0


async def test_a_file_dirtied_during_its_writeback_keeps_its_reserve_for_the_next(image):
    """A write landing while the file's flush is in flight dirties it again: the flush's end
    must not give back the room the new data was admitted under."""
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"a" * 4 * S)
            flush = asyncio.ensure_future(f.fsync())
            await asyncio.sleep(0)  # the flush has taken the pages; now a write lands
            assert f.inode.flushing
            await f.pwrite(b"b" * S, 16 * S)
            await flush
            assert f.inode.pages.dirty and f.inode.reserved >= fs.inode_leaves
            accounts_agree(fs)
            await f.fsync()
            accounts_agree(fs)
            assert fs.meta_reserved == 0


@pytest.mark.parametrize(("size", "node", "tasks", "files"), [("24M", "64K", 16, 150), ("32M", "16K", 8, 600)])
async def test_many_tasks_creating_small_files_on_a_roomy_image_are_never_refused(tmp_path, size, node, tasks, files):
    """Each new file reserves its leaves (three tree blocks for 4 KiB of data), so the room
    fills with promises long before the disk does; an operation short of room writes out and
    commits, and the other tasks dirty new files meanwhile. After a fixed number of write-outs
    creates were refused with megabytes free (4 write-outs: 9 and 2 refused here; review30: 8
    tasks x 1,500 files on 64 MiB, 3 refused): it writes out for as long as that takes dirty
    data off the promises."""
    image = str(tmp_path / "m.img")
    await blockemu.mkfs(image, size=size, node_size=node)
    refused = 0
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        async def creator(t: int) -> None:
            nonlocal refused
            for i in range(files):
                try:
                    async with fs.open(f"/f{t}_{i}", "w") as f:
                        await f.write(b"x" * S)
                except NoSpaceError:
                    refused += 1

        await asyncio.gather(*(creator(t) for t in range(tasks)))
        free = fs.vol.engine.allocator.free_bytes()
        accounts_agree(fs)
    assert free > 4 << 20  # room to spare: none of them should have been refused
    assert refused == 0


async def test_a_write_that_cannot_fit_ends_while_another_task_keeps_writing(tmp_path, monkeypatch):
    """An operation short of room writes out while that takes dirty data; counting another
    task's new data as progress, a write that could never fit wrote out once per write of the
    other, for as long as it wrote (review31: 401 write-outs for 400 writes). While one writes
    out, every other admission waits its turn (``room_queue``): it ends after two."""
    image = str(tmp_path / "s.img")
    await blockemu.mkfs(image, size="24M", node_size="16K")
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        async with fs.open("/fill", "w") as f:
            while fs.vol.engine.allocator.free_bytes() > 8 << 20:
                await f.write(b"F" * (64 * S))
                await f.fsync()
        outs, real = 0, fs.write_out
        tick = asyncio.Event()

        async def write_out() -> None:
            nonlocal outs
            outs += 1
            tick.set()  # the other task writes once per write-out
            await real()
        monkeypatch.setattr(fs, "write_out", write_out)
        a = await fs.open("/a", "w")
        writing = asyncio.ensure_future(a.write(b"A" * (16 << 20)))  # more than is free

        async def other() -> int:
            async with fs.open("/b", "w") as f:
                for n in range(200):
                    if writing.done():
                        return n
                    tick.clear()
                    await tick.wait()
                    await f.pwrite(b"b" * S, n % 4 * S)
            return 200
        writes = asyncio.ensure_future(other())
        with ErrnoCheck(errno.ENOSPC):
            await writing
        assert outs <= 2 and await writes <= 2
        await a.close()


async def test_a_create_that_met_a_commits_pins_waits_for_them_rather_than_refuse(tmp_path):
    """A create checks its room, then waits in ``Volume.join`` while a commit encodes its
    blocks: the commit COWs tree blocks whose old copies stay pinned until its tail, so the
    room the create checked is gone when it joins, and it was refused with megabytes pinned
    (review34: 7-10 creates per seed of a near-full stress). The commit gives that room back:
    the create waits for it, as btrfs's tickets wait for a transaction commit before ENOSPC."""
    image = str(tmp_path / "p.img")
    await blockemu.mkfs(image, size="32M", node_size="4K")
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        engine = fs.vol.engine
        alloc = engine.allocator
        for i in range(20):  # a dirty transaction: its commit COWs and pins tree blocks
            await fs.mkdir(f"/d{i}")
        hogs = []
        while alloc.node_room > engine.data_keep():  # the room a create needs, and not a block more
            hogs.append(alloc.alloc(fs.vol.sb.nodesize))
        assert engine.meta_room()
        committing = asyncio.ensure_future(fs.vol.commit())
        await asyncio.sleep(0)  # the commit has begun: the create waits for it in join
        await fs.mkdir("/new")  # ENOSPC, with the commit's pins to come back
        await committing
        for start in hogs:
            alloc.release(start, fs.vol.sb.nodesize)
    async with blockemu.mount(image) as fs:
        assert "new" in await fs.readdir("/")


async def test_a_create_whose_room_a_second_commit_pinned_waits_for_that_one_too(tmp_path, monkeypatch):
    """As above, and once the create has written out for the first commit's pins, another task
    writes and commits before it joins again: that commit's pins took the room once more (short
    of what the new dirty data was promised, not of the delete reserve, so ``join`` does not
    commit for it), and the create, allowed one retry, was refused (review34's near-full stress,
    seed 5 of 0..9). It goes first for the room now, and waits for that commit too."""
    image = str(tmp_path / "p.img")
    await blockemu.mkfs(image, size="32M", node_size="4K")
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        vol, engine = fs.vol, fs.vol.engine
        alloc, node = engine.allocator, fs.vol.sb.nodesize
        for i in range(20):
            await fs.mkdir(f"/d{i}")
        g = await fs.open("/g", "w")
        hogs: list[int] = []

        def squeeze(room: int) -> None:  # node_room to ``room``, by taking or giving back blocks
            while alloc.node_room > room:
                hogs.append(alloc.alloc(node))
            while alloc.node_room < room:
                alloc.release(hogs.pop(), node)
        squeeze(engine.data_keep())
        at_gate, gate = asyncio.Event(), asyncio.Event()

        async def tail_gate() -> None:  # the second commit's tail, its pins with it, waits here
            at_gate.set()
            await gate.wait()
        vol.tail_gate = tail_gate
        creator, joins, second = asyncio.current_task(), 0, None
        real_join, real_commit = vol.join, vol.commit

        def join(*args, **kw):
            nonlocal joins, second
            if asyncio.current_task() is not creator or second is not None:
                return real_join(*args, **kw)
            joins += 1
            if joins < 2:
                return real_join(*args, **kw)

            async def another() -> None:  # written out for the first commit's pins: another task's turn
                squeeze(engine.data_keep() + 64)  # room for its write (squeezed again below)
                await g.pwrite(b"g" * S, 0)
                await fs.set_attrs(fs._resolve("/d0"), mode=0o700)
                await real_commit(whole=False)
            second = asyncio.ensure_future(another())

            @contextlib.asynccontextmanager
            async def after_it():
                await at_gate.wait()  # the other commit landed; its tail holds its pins
                assert alloc.holds_pinned()
                squeeze(engine.data_keep() + fs.promised_blocks() + engine.op_blocks() - 1)
                async with real_join(*args, **kw) as e:
                    yield e
            return after_it()

        async def commit(*args, **kw):
            if second is not None:
                gate.set()  # a commit for the room: the other commit's tail may end
            return await real_commit(*args, **kw)
        monkeypatch.setattr(vol, "join", join)
        monkeypatch.setattr(vol, "commit", commit)
        first = asyncio.ensure_future(real_commit())
        await asyncio.sleep(0)  # the first commit has begun: the create waits for it in join
        try:
            await fs.mkdir("/new")
        finally:
            gate.set()
            await first
            if second is not None:
                await second
        assert joins == 2
        for start in hogs:
            alloc.release(start, node)
        await g.close()
    async with blockemu.mount(image) as fs:
        assert "new" in await fs.readdir("/")


async def test_a_partial_write_that_waited_its_turn_does_not_queue_again(image, monkeypatch):
    """A write waits its turn behind an operation writing out (``room_queue``), then reads its
    partial page from disk; another operation began writing out during that read, and the
    write checked ``admits`` again and queued a second time behind it -- under cache pressure
    every partial page is such a read (latency, not a hang). Its turn came once: after it only
    the room is checked again, never the queue."""
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"o" * S)
    async with blockemu.mount(image, interval=3600, seal_workers=0) as fs:  # the page is on disk only
        queued, real_make_room, real_read = 0, fs.make_room, fs.read_pages
        holders: list[asyncio.Event] = []

        async def other() -> None:  # standing in for an operation short of room, writing out
            holders.append(done := asyncio.Event())
            async with fs.room_queue:
                await done.wait()

        async def make_room(n: int, runs: int = 1, inode=None) -> None:
            nonlocal queued
            queued += 1
            for done in holders:  # each write-out ends once the write waits behind it
                done.set()
            await real_make_room(n, runs, inode)

        async def read_pages(inode, first: int, count: int):
            asyncio.ensure_future(other())  # begins writing out while the write reads
            await asyncio.sleep(0)
            return await real_read(inode, first, count)
        monkeypatch.setattr(fs, "make_room", make_room)
        monkeypatch.setattr(fs, "read_pages", read_pages)
        first = asyncio.ensure_future(other())
        await asyncio.sleep(0)  # it holds the queue: the write waits its turn
        assert fs.room_queue.locked()
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"n" * 100, 10)
        await first
        assert queued == 1
    async with blockemu.mount(image) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == b"o" * 10 + b"n" * 100 + b"o" * (S - 110)
