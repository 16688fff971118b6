"""The filesystem API (DESIGN §8) end to end on real images: plain and encrypted files,
directories, rename(2) semantics, persistence, orphans, and fsync error reporting."""
from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import random
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import blockemu
from blockemu.check.fsck import check
from blockemu.device.faultplan import FaultPlan
from blockemu.device.image import ImageFile
from blockemu.engine.extents import ExtentBatch
from blockemu.engine.transaction import Engine
from blockemu.fs.filesystem import split_path
from blockemu.fs.pagecache import PAGE
from blockemu.ondisk import structs as S
from tests.util import KEY, KID, ErrnoCheck, Gate, encrypted_dir, fail_next_data_write


@pytest.fixture
async def image(tmp_path):
    path = str(tmp_path / "fs.img")
    await blockemu.mkfs(path, size="64M")
    return path


@pytest.fixture
async def fs(image):
    f = await blockemu.mount(image, interval=3600)
    yield f
    await f.unmount()
    report = check(image)
    assert report.clean, [e.message for e in report.errors]


# path components: the special ones, names at and past NAME_MAX (in bytes: é is two), and any
# text without "/" -- surrogate-escaped bytes (U+DC80..U+DCFF, how Linux byte names arrive) included
COMPONENTS = st.one_of(
    st.sampled_from(["", ".", "..", "a" * 255, "a" * 256, "\u00e9" * 127, "\u00e9" * 128, "\udcff", "b\udce9d"]),
    st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",))
            | st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00)]), min_size=1, max_size=12))


@given(st.lists(COMPONENTS, max_size=6), st.booleans())
def test_split_path_against_its_components(components, absolute):
    """A path is its components joined by "/" (empty ones and "." dropped): each comes back as
    its bytes; ".." is EINVAL, a component longer than NAME_MAX bytes ENAMETOOLONG, and a
    relative path or a NUL byte EINVAL -- whatever the others hold."""
    path = ("/" if absolute else "") + "/".join(components)
    want = [c.encode(errors="surrogateescape") for c in components if c not in ("", ".")]
    if not path.startswith("/") or ".." in components or "\0" in path:
        code = errno.EINVAL
    elif any(len(c) > 255 for c in want):
        code = errno.ENAMETOOLONG
    else:
        assert split_path(path) == want
        return
    with ErrnoCheck(code):
        split_path(path)


async def test_api_round_trip_plain_and_encrypted(image):
    async with blockemu.mount(image) as fs:
        kid = await fs.add_key(KEY, user=0)
        assert kid == KID
        await fs.mkdir("/dir")
        await fs.set_policy("/dir", kid)
        async with fs.open("/dir/f", "a") as f:
            await f.write(b"X")
            await f.fsync()
        async with fs.open("/plain", "w") as f:
            assert await f.write(b"hello") == 5
        assert sorted(await fs.readdir("/")) == ["dir", "plain"]
        assert await fs.get_policy("/dir/f") == kid
        st = await fs.stat("/dir/f")
        assert st.st_size == 1 and st.st_nlink == 1 and (st.st_mode & 0o170000) == 0o100000
    assert check(image).clean
    async with blockemu.mount(image) as fs:
        await fs.add_key(KEY)
        async with fs.open("/dir/f") as f:
            assert await f.read() == b"X"
        f = await fs.open("/plain", "r+")
        assert await f.read(3) == b"hel"
        await f.seek(0)
        await f.write(b"J")
        assert await f.pread(10, 0) == b"Jello"
        await f.close()


async def test_open_modes(fs):
    with ErrnoCheck(errno.ENOENT):
        await fs.open("/nope", "r")
    async with fs.open("/a", "x") as f:
        await f.write(b"abc")
    with ErrnoCheck(errno.EEXIST):
        await fs.open("/a", "x")
    async with fs.open("/a", "a") as f:
        await f.seek(0)
        await f.write(b"d")  # append ignores the position
    async with fs.open("/a", "r") as f:
        assert await f.read() == b"abcd"
        with ErrnoCheck(errno.EBADF):
            await f.write(b"no")
    async with fs.open("/a", "w") as f:  # w truncates
        with ErrnoCheck(errno.EBADF):
            await f.read()
    assert (await fs.stat("/a")).st_size == 0
    with ErrnoCheck(errno.EINVAL):
        await fs.open("/a", "q")
    await fs.mkdir("/d")
    with ErrnoCheck(errno.EISDIR):
        await fs.open("/d", "r")
    with ErrnoCheck(errno.ENOTDIR):
        await fs.open("/a/x", "w")
    f = await fs.open("/a", "r")
    await f.close()
    for call in (f.read, f.tell, lambda: f.seek(0)):  # seek and tell as lseek(2): EBADF, not 0
        with ErrnoCheck(errno.EBADF):
            await call()


async def test_an_owner_or_mode_out_of_range_is_refused_before_the_transaction(fs):
    """What a new inode is made with is checked before the create joins the transaction: a uid
    the inode item cannot hold failed its pack inside the join, which aborted the mount (EROFS
    for every later change) over a caller's bad argument. As os: TypeError for 1.5."""
    calls = [lambda **kw: fs.open("/f", "x", **kw), lambda **kw: fs.mkdir("/d", **kw),
             lambda **kw: fs.symlink("t", "/l", **kw)]
    for call in calls:
        for bad in ({"uid": -1}, {"gid": 2**32 - 1}, {"uid": 2**40}):
            with ErrnoCheck(errno.EINVAL):
                await call(**bad)
        with pytest.raises(TypeError):
            await call(gid=1.5)
    with pytest.raises(TypeError):
        await fs.open("/f", "x", perms=1.5)
    with pytest.raises(TypeError):
        await fs.mkdir("/d", 1.5)
    await fs.mkdir("/d", 0o700, uid=2**32 - 2, gid=7)  # the mount goes on; the largest uid fits
    s = await fs.stat("/d")
    assert (s.st_mode, s.st_uid, s.st_gid) == (0o40700, 2**32 - 2, 7)
    assert await fs.readdir("/") == ["d"]


async def test_a_setgid_directory_gives_new_entries_its_group_after_a_remount(image):
    """As Linux's inode_init_owner: in a setgid directory a new file, directory or symlink takes
    the directory's gid, not its creator's, and a new directory is setgid too, so the group
    passes down; elsewhere the creator's gid stands. The bits of a file are kept as given (the
    caller's VFS strips S_ISGID, as it applies the umask). Each was made with the creator's gid."""
    fs = await blockemu.mount(image, interval=3600)
    await fs.mkdir("/shared", 0o2775, uid=0, gid=50)
    await fs.mkdir("/plain", 0o755, uid=0, gid=50)
    for d in ("/shared", "/plain"):
        async with fs.open(f"{d}/f", "x", perms=0o2755, uid=1000, gid=1000):
            pass
        await fs.mkdir(f"{d}/sub", 0o750, uid=1000, gid=1000)
        await fs.mkdir(f"{d}/sub/deeper", 0o700, uid=1000, gid=1000)
        await fs.symlink("f", f"{d}/l", uid=1000, gid=1000)
    await fs.unmount()
    fs = await blockemu.mount(image, interval=3600)
    try:
        got = {p: ((s := await fs.stat(p)).st_uid, s.st_gid, oct(s.st_mode))
               for d in ("/shared", "/plain") for p in (f"{d}/f", f"{d}/sub", f"{d}/sub/deeper", f"{d}/l")}
    finally:
        await fs.unmount()
    assert got == {
        "/shared/f": (1000, 50, oct(0o102755)), "/shared/sub": (1000, 50, oct(0o42750)),
        "/shared/sub/deeper": (1000, 50, oct(0o42700)), "/shared/l": (1000, 50, oct(0o120777)),
        "/plain/f": (1000, 1000, oct(0o102755)), "/plain/sub": (1000, 1000, oct(0o40750)),
        "/plain/sub/deeper": (1000, 1000, oct(0o40700)), "/plain/l": (1000, 1000, oct(0o120777))}
    assert check(image).clean


async def test_sparse_files_read_zeros_and_survive_remount(image):
    async with blockemu.mount(image) as fs:
        async with fs.open("/s", "w") as f:
            await f.pwrite(b"tail", 10 * 4096 + 5)
            await f.pwrite(b"head", 1)
        async with fs.open("/s") as f:
            data = await f.read()
        assert len(data) == 10 * 4096 + 9 and data[:5] == b"\0head" and data[-4:] == b"tail"
        assert data[5:-4] == bytes(len(data) - 9)
    async with blockemu.mount(image) as fs:
        async with fs.open("/s") as f:
            assert await f.read() == data
        st = await fs.stat("/s")
        assert st.st_blocks * 512 == 2 * 4096  # only the two written pages are allocated


async def test_st_blocks_counts_data_not_yet_written_back(image, monkeypatch):
    """As btrfs and ext4 count delayed allocation: a freshly written file with st_blocks 0 looks
    all holes to ``tar --sparse``, which archived it as zeros from a mount. Dirty, taken for
    writeback, half mapped (two extents: the flush held before writing the second) and mapped,
    the file's blocks stay counted, once."""
    size = 8 * 4096
    async with blockemu.mount(image, interval=3600, max_extent=16 << 10) as fs:
        async with fs.open("/d", "w") as f:
            await f.write(b"x" * size)
            assert (await fs.stat("/d")).st_blocks * 512 == size  # dirty
            real = fs.vol.device.write
            gate = Gate(real)

            async def second_held(*args, **kw):
                monkeypatch.setattr(fs.vol.device, "write", gate)
                return await real(*args, **kw)

            monkeypatch.setattr(fs.vol.device, "write", second_held)
            fsync = asyncio.ensure_future(f.fsync())
            await gate.entered.wait()
            try:
                assert (await fs.stat("/d")).st_blocks * 512 == size  # one extent mapped, one not yet
            finally:
                gate.release.set()  # a failure must not leave the unmount waiting for the write
                await fsync
            assert (await fs.stat("/d")).st_blocks * 512 == size  # both mapped


async def test_a_writes_times_show_at_once_and_a_later_ctime_outlives_them(image, monkeypatch):
    """A write marks mtime and ctime (POSIX: stat sees them at once), but the filesystem folds the
    write's time into the inode item only when the inode is saved: stat showed the time before the
    write until writeback, and a rename after the write had its ctime replaced by the write's older
    time at that save -- on disk too. Driven by a clock of our own, no sleeps."""
    from blockemu.fs import filesystem

    clock = [1_700_000_000 * 10**9]
    monkeypatch.setattr(filesystem, "time", SimpleNamespace(time_ns=lambda: clock[0]))
    t_write, t_rename = clock[0] + 10**9, clock[0] + 2 * 10**9
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"old")
        await fs.sync()
        clock[0] = t_write
        async with fs.open("/f", "r+") as f:
            await f.pwrite(b"new", 0)
        s = await fs.stat("/f")
        assert (s.st_mtime_ns, s.st_ctime_ns) == (t_write, t_write)  # not yet written back
        clock[0] = t_rename
        await fs.rename("/f", "/g")
        s = await fs.stat("/g")
        assert (s.st_mtime_ns, s.st_ctime_ns) == (t_write, t_rename)
    async with blockemu.mount(image, readonly=True) as fs:
        s = await fs.stat("/g")
        assert (s.st_mtime_ns, s.st_ctime_ns) == (t_write, t_rename)


@pytest.mark.parametrize("change", ["truncate", "punch_hole"])
async def test_a_truncate_or_punch_after_a_write_keeps_its_later_mtime(image, monkeypatch, change):
    """A truncate or a hole punch marks mtime and ctime now and saves the inode -- which folded
    the earlier write's time in over them, so the file's mtime went back to that write's, in stat
    and on disk (make(1) saw an older file). Driven by a clock of our own, no sleeps."""
    from blockemu.fs import filesystem

    clock = [1_700_000_000 * 10**9]
    monkeypatch.setattr(filesystem, "time", SimpleNamespace(time_ns=lambda: clock[0]))
    t_write, t_change = clock[0] + 10**9, clock[0] + 2 * 10**9
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(bytes(3 * 4096))
        await fs.sync()
        async with fs.open("/f", "r+") as f:
            clock[0] = t_write
            await f.pwrite(b"new", 0)
            clock[0] = t_change
            await (f.truncate(4096) if change == "truncate" else f.punch_hole(4096, 4096))
            await f.fsync()
        s = await fs.stat("/f")
        assert (s.st_mtime_ns, s.st_ctime_ns) == (t_change, t_change)
    async with blockemu.mount(image, readonly=True) as fs:
        s = await fs.stat("/f")
        assert (s.st_mtime_ns, s.st_ctime_ns) == (t_change, t_change)


async def test_truncate_down_and_up(fs):
    async with fs.open("/t", "w+") as f:
        await f.write(os.urandom(3 * 4096 + 100) + b"END")
        await f.fsync()
        await f.truncate(4096 + 10)
        await f.truncate(3 * 4096)
        data = await f.pread(1 << 20, 0)
        assert len(data) == 3 * 4096 and data[4096 + 10 :] == bytes(3 * 4096 - 4096 - 10)
        await f.fsync()
    async with fs.open("/t") as f:
        assert (await f.read())[4096 + 10 :] == bytes(2 * 4096 - 10)


async def crash(fs) -> None:
    """A power cut, then the mount let go (its unmount fails if it has anything to write)."""
    fs.vol.device.power_cut()
    with contextlib.suppress(OSError):
        await fs.unmount()


async def leave_a_truncated_tail(image) -> None:
    """/g on disk: 2047 bytes of "A", and the truncated "A"s still past them in its block (a
    truncate committed by another file's fsync before its zeroed tail block was written back,
    then a power cut)."""
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/g", "w") as f:
        await f.write(b"A" * 4096)
    await fs.sync()
    async with fs.open("/g", "r+") as f:
        await f.truncate(2047)
    async with fs.open("/commit", "w") as f:  # a new file's fsync commits the size, not /g's tail
        await f.fsync()
    await crash(fs)


GROW = {  # a way to grow the file past its end (2047), and what it then holds past 2047
    "truncate up": (lambda f: f.truncate(7047), bytes(5000)),
    "write in the end's block": (lambda f: f.pwrite(b"B", 3000), bytes(953) + b"B"),
    "write past the end's block": (lambda f: f.pwrite(b"B", 7046), bytes(4999) + b"B"),
}


@pytest.mark.parametrize("grow", GROW)
async def test_growing_a_file_reads_zeros_where_a_crash_left_a_truncated_tail(image, grow):
    """A truncate into a block, committed by another file's fsync before its zeroed tail block
    was written back, then a power cut: on disk the block still holds the truncated bytes past
    the end. Growing the file over them -- a truncate up, a write past the end -- showed them
    again (a newcomer's crash loop, seed 69: 2,049 bytes of old data in an fsynced file), live
    and after the next crash; they read as zeros, and a commit that lands before the file's
    own writeback does not bring them back (``Filesystem.zero_past_eof``)."""
    await leave_a_truncated_tail(image)
    step, past = GROW[grow]
    want = b"A" * 2047 + past
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/g", "r+") as f:
        await step(f)
        assert await f.pread(8192, 0) == want
    async with fs.open("/commit2", "w") as f:  # the larger size committed, /g not fsynced
        await f.fsync()
    await crash(fs)
    async with blockemu.mount(image) as fs:
        async with fs.open("/g") as f:
            got = await f.read()
    # a truncate's size is committed at once; a write's only once writeback has placed it
    assert got == want or (grow != "truncate up" and got == b"A" * 2047)


async def test_growing_past_a_stale_tail_leaves_a_lost_write_for_fsync_to_report(image):
    """Growing past a stale tail writes the zeroed block back first (``zero_past_eof``); when
    that writeback fails, it drops the file's other dirty pages too -- an acknowledged write
    among them. The grow fails with the EIO, but the loss is the fsync's to report: taken by
    the grow, it left the next fsync returning success over the lost write."""
    await leave_a_truncated_tail(image)
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/g", "r+") as f:
        await f.pwrite(b"D" * 100, 0)  # acknowledged, not yet written back
        fs.vol.device.faults = FaultPlan(eio=[(0, 1 << 40, "w")])
        with ErrnoCheck(errno.EIO):
            await f.pwrite(b"B", 7046)
        fs.vol.device.faults = FaultPlan()
        assert await f.pread(8192, 0) == b"A" * 2047  # not grown over the stale bytes
        with ErrnoCheck(errno.EIO):
            await f.fsync()
    await fs.unmount()


async def grow_over_a_zeroed_tail(fs, f, grow: str, when: str) -> None:
    """/g (4 KiB of "A" on disk, truncated to 2047: its end page zeroed past the end in the
    cache only) grown by ``grow``: while an fsync's writeback of that page fails (``in
    flight``), with the page's writeback armed to fail (``failing``), or then committed by
    another file's fsync and cut (``cut``)."""
    step = GROW[grow][0]
    if when == "in flight":
        await fail_next_data_write(fs)
        synced, grown = await asyncio.gather(f.fsync(), step(f), return_exceptions=True)
        assert isinstance(synced, OSError) and synced.errno == errno.EIO  # the loss is reported
        assert not isinstance(grown, BaseException)
    elif when == "failing":
        await fail_next_data_write(fs)
        with ErrnoCheck(errno.EIO):  # the zeroed end block was not written: not grown
            await step(f)
        with ErrnoCheck(errno.EIO):  # and the loss is still the fsync's to report
            await f.fsync()
    else:
        await step(f)
        async with fs.open("/commit", "w") as other:  # the larger size committed, /g not fsynced
            await other.fsync()
    fs.vol.device.faults = FaultPlan()


@pytest.mark.parametrize(("grow", "when"), [  # (a write past the end is committed only once placed: no cut case)
    (grow, when) for grow in ("truncate up", "write past the end's block") for when in ("in flight", "failing")
] + [("truncate up", "cut")])
async def test_growing_over_a_tail_zeroed_only_in_the_cache_never_shows_the_truncated_bytes(image, grow, when):
    """A truncate zeroes its end page in the cache; a grow found that page zero and went on,
    but the page was not on disk yet: its writeback failed (the page dropped, reads fell
    through to the old block) or a commit of the larger size met a power cut first. 2,049
    truncated bytes read back past the end, live and after a remount (review29). The grow
    waits for the page's writeback and writes it itself (``zero_past_eof``); an fsync still
    reports the failed writeback."""
    want = b"A" * 2047 + GROW[grow][1]
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/g", "w") as f:
        await f.write(b"A" * 4096)
    await fs.sync()
    f = await fs.open("/g", "r+")
    await f.truncate(2047)
    await grow_over_a_zeroed_tail(fs, f, grow, when)
    if when != "cut":
        assert await f.pread(8192, 0) == (b"A" * 2047 if when == "failing" else want)
        await f.close()
        await fs.unmount()
    else:
        await crash(fs)
    async with blockemu.mount(image) as fs:
        async with fs.open("/g") as f:
            got = await f.read()
    # a write's new size is committed only once writeback placed it: before, the file is 2047
    assert got == want or (got == b"A" * 2047 and (when == "failing" or grow != "truncate up"))


async def test_sparse_appends_past_a_dirty_end_never_on_disk_write_nothing_back(image):
    """A dirty end page with no block under it on disk is safe to grow over: a failed writeback
    that drops it leaves a hole, read as zeros. Writing it back first, as for an end page a
    truncate zeroed over an old block, cost a device write and ~14x a pwrite's instructions
    for each pwrite a byte past an unaligned end (review32). The data all reads back after a
    remount."""
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/s", "w") as f:
            writes = fs.vol.device.writes
            for i in range(50):
                await f.pwrite(b"%03d" % i * 33, i * 100)  # 99 bytes, one past the last end
            assert fs.vol.device.writes == writes
            await f.fsync()
    async with blockemu.mount(image) as fs:
        async with fs.open("/s") as f:
            assert await f.read() == b"".join(b"%03d" % i * 33 + b"\0" for i in range(50))[:-1]


@pytest.mark.parametrize("size", [10, PAGE])
async def test_a_write_past_the_end_checks_the_end_page_after_waiting_for_room(image, monkeypatch, size):
    """A write past the end zeroed the end page before it waited for room (the dirty limit); a
    truncate down meanwhile left a new end page zeroed only in the cache, and the write grew the
    file over it: once that page's writeback failed (dropped), 2,049 truncated bytes read back
    inside the file (review32). The write checks the end page after its last await."""
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/g", "w") as f:
        await f.write(b"A" * 5000)
    await fs.sync()
    f = await fs.open("/g", "r+")
    room = asyncio.Event()

    async def wait_for_room(n: int) -> None:
        await room.wait()
    monkeypatch.setattr(fs.writeback, "over_limit", lambda n: True)
    monkeypatch.setattr(fs.writeback, "wait_for_room", wait_for_room)
    write = asyncio.ensure_future(f.pwrite(b"x" * size, 2 * PAGE))
    await asyncio.sleep(0)  # the write waits for room, the end (5000) clean and zero past it
    await f.truncate(2047)  # the end page zeroed past 2047 in the cache only
    monkeypatch.undo()
    room.set()
    await write
    await fail_next_data_write(fs, 3 * PAGE)
    with ErrnoCheck(errno.EIO):  # the write's page lost, and reported
        await f.fsync()
    fs.vol.device.faults = FaultPlan()
    assert await f.pread(PAGE, 0) == b"A" * 2047 + bytes(PAGE - 2047)
    with contextlib.suppress(OSError):
        await f.close()
        await fs.unmount()


async def test_overwrites_are_copy_on_write(fs, image):
    async with fs.open("/c", "w") as f:
        await f.write(b"a" * 65536)
        await f.fsync()
        first = [m for m in fs.extents.mappings((await fs.stat("/c")).st_ino)]
        await f.pwrite(b"b" * 4096, 8192)
        await f.fsync()
    ino = (await fs.stat("/c")).st_ino
    maps = list(fs.extents.mappings(ino))
    assert [(m.file_offset, m.length) for m in maps] == [(0, 8192), (8192, 4096), (12288, 65536 - 12288)]
    assert maps[0].extent.disk_bytenr == maps[2].extent.disk_bytenr == first[0].extent.disk_bytenr
    assert maps[1].extent.disk_bytenr != first[0].extent.disk_bytenr
    async with fs.open("/c") as f:
        data = await f.read()
    assert data == b"a" * 8192 + b"b" * 4096 + b"a" * (65536 - 12288)
    # the split extent is referenced twice through the same back reference
    key, item = ExtentBatch(fs.extents)._extent_key(first[0].extent.disk_bytenr)
    assert item.refs_count == 2 and item.refs == (("data", 5, ino, 0, 2),)
    # overwrite everything: the old extent loses its last reference and is freed
    async with fs.open("/c", "r+") as f:
        await f.write(b"c" * 65536)
        await f.fsync()
    assert fs.extents.ext.get(key) is None


async def test_rename_semantics(fs):
    for p in ("/a", "/b"):
        async with fs.open(p, "w") as f:
            await f.write(p.encode())
    await fs.mkdir("/d1")
    await fs.mkdir("/d2")
    await fs.mkdir("/full")
    async with fs.open("/full/x", "w"):
        pass
    await fs.rename("/a", "/b")  # over an existing file
    assert sorted(await fs.readdir("/")) == ["b", "d1", "d2", "full"]
    async with fs.open("/b") as f:
        assert await f.read() == b"/a"
    with ErrnoCheck(errno.EISDIR):
        await fs.rename("/b", "/d1")
    with ErrnoCheck(errno.ENOTDIR):
        await fs.rename("/d1", "/b")
    with ErrnoCheck(errno.ENOTEMPTY):
        await fs.rename("/d1", "/full")
    with ErrnoCheck(errno.EINVAL):
        await fs.rename("/d1", "/d1/sub")
    await fs.rename("/d1", "/d2")  # over an empty directory
    await fs.rename("/b", "/d2/b")
    await fs.rename("/d2/b", "/d2/b")
    assert await fs.readdir("/d2") == ["b"]
    assert (await fs.stat("/")).st_nlink == 4  # ., .., d2, full
    with ErrnoCheck(errno.ENOENT):
        await fs.rename("/nope", "/x")


async def test_a_trailing_slash_never_names_a_new_or_renamed_file(fs):
    """As Linux: a name ending in '/' names a directory, so a rename of a file to 'f/' is ENOTDIR
    (it replaced the file f, or made a file 'nope') and a create of 'nope/' is EISDIR, whatever
    is there (it made a file 'nope'); 'nope/.' names no directory to create in (ENOENT); a link
    or symlink to 'nope/' is ENOENT (made as 'nope'). All were taken as the name without the
    slash, before the namespace ops walked once and since."""
    for p in ("/f", "/g"):
        async with fs.open(p, "w") as f:
            await f.write(p.encode())
    await fs.mkdir("/d")
    for dst in ("/f/", "/nope/", "/d/"):
        with ErrnoCheck(errno.ENOTDIR):
            await fs.rename("/g", dst)
    for mode in ("w", "x", "a", "w+"):
        for path in ("/nope/", "/f/", "/d/"):
            with ErrnoCheck(errno.EISDIR):
                await fs.open(path, mode)
        with ErrnoCheck(errno.ENOENT):
            await fs.open("/nope/.", mode)
        with ErrnoCheck(errno.ENOTDIR):
            await fs.open("/f/.", mode)
    with ErrnoCheck(errno.EEXIST):
        await fs.open("/d/.", "x")
    # a link or symlink: EEXIST when the name is there, else ENOENT (filename_create)
    for make in (lambda dst: fs.link("/g", dst), lambda dst: fs.symlink("/g", dst)):
        for dst, code in (("/nope/", errno.ENOENT), ("/nope/.", errno.ENOENT), ("/f/", errno.EEXIST),
                          ("/d/.", errno.EEXIST)):
            with ErrnoCheck(code):
                await make(dst)
    await fs.mkdir("/new/")  # a new directory takes the slash
    await fs.rmdir("/new")
    assert sorted(await fs.readdir("/")) == ["d", "f", "g"] and await fs.readdir("/d") == []
    async with fs.open("/f") as f:
        assert await f.read() == b"/f"
    await fs.mkdir("/e")
    await fs.rename("/e/", "/d/")  # a directory takes the slash
    assert sorted(await fs.readdir("/")) == ["d", "f", "g"]


async def test_rmdir_unlink_errors(fs):
    await fs.mkdir("/d")
    async with fs.open("/d/f", "w"):
        pass
    with ErrnoCheck(errno.ENOTEMPTY):
        await fs.rmdir("/d")
    with ErrnoCheck(errno.EISDIR):
        await fs.unlink("/d")
    with ErrnoCheck(errno.ENOTDIR):
        await fs.rmdir("/d/f")
    # a file in the middle of a path: ENOTDIR (lookups in it found nothing: ENOENT), at any depth
    for through_a_file in (fs.stat("/d/f/x"), fs.open("/d/f/x/y", "w"), fs.mkdir("/d/f/x/y"), fs.unlink("/d/f/x")):
        with ErrnoCheck(errno.ENOTDIR):
            await through_a_file
    with ErrnoCheck(errno.EEXIST):
        await fs.mkdir("/d")
    with ErrnoCheck(errno.EBUSY):
        await fs.rmdir("/")
    await fs.unlink("/d/f")
    await fs.rmdir("/d")
    assert await fs.readdir("/") == []


async def test_unlinked_open_file_lives_until_close_and_orphans_are_recovered(image):
    fs = await blockemu.mount(image)
    f = await fs.open("/o", "w+")
    await f.write(b"still here")
    await f.fsync()
    await fs.unlink("/o")
    assert await fs.readdir("/") == []
    assert await f.pread(100, 0) == b"still here"
    await fs.sync()  # the unlink and its orphan item are now durable
    orphan = (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, f.inode.ino)
    fs.vol.device.power_cut()  # crash with the file still open
    await fs.writeback.stop()
    await fs.vol.device.close()
    with ImageFile.open(image) as img:
        tree = Engine(img.best_super(), img.read, writable=False).trees[S.FS_TREE_OBJECTID]
        assert orphan in tree and (f.inode.ino, S.INODE_ITEM, 0) in tree
    async with blockemu.mount(image) as fs2:  # mount finishes the deletion
        assert orphan not in fs2.tree and (f.inode.ino, S.INODE_ITEM, 0) not in fs2.tree
    assert check(image).clean


async def test_last_close_of_an_unlinked_file_deletes_it(fs):
    f = await fs.open("/o", "w")
    await f.write(b"x" * 10000)
    await fs.unlink("/o")
    ino = f.inode.ino
    await f.close()
    await fs.sync()
    assert not list(fs.tree.items((ino, 0, 0), (ino, 255, (1 << 64) - 1)))
    assert not list(fs.extents.mappings(ino))


async def test_policies_and_exdev(fs):
    kid = await fs.add_key(KEY)
    other = await fs.add_key(b"\x07" * 32)
    await fs.mkdir("/enc")
    await fs.mkdir("/enc2")
    await fs.mkdir("/plain")
    await fs.set_policy("/enc", kid)
    await fs.set_policy("/enc", kid)  # same policy again is fine
    await fs.set_policy("/enc2", other)
    with ErrnoCheck(errno.EEXIST):
        await fs.set_policy("/enc", other)
    async with fs.open("/plain/p", "w"):
        pass
    with ErrnoCheck(errno.ENOTEMPTY):
        await fs.set_policy("/plain", kid)
    async with fs.open("/enc/e", "w") as f:
        await f.write(b"secret")
    await fs.mkdir("/enc/sub")
    assert await fs.get_policy("/enc/sub") == kid
    with ErrnoCheck(errno.EXDEV):
        await fs.rename("/plain/p", "/enc/p")
    with ErrnoCheck(errno.EXDEV):
        await fs.rename("/enc/e", "/enc2/e")
    await fs.rename("/enc/e", "/enc/sub/e")  # same policy
    await fs.mkdir("/empty")
    with ErrnoCheck(errno.ENOKEY):
        await fs.set_policy("/empty", "00" * 16)
    for size in (16, 31):  # a valid add_key, but shorter than AES-256's 32 bytes: no policy
        short = await fs.add_key(bytes(range(size)))
        with ErrnoCheck(errno.EINVAL):
            await fs.set_policy("/empty", short)
        assert await fs.get_policy("/empty") is None
    await fs.set_policy("/empty", await fs.add_key(bytes(range(32))))


async def test_no_plaintext_reaches_the_image(image):
    pattern = b"PLAINTEXT-MARKER-" * 256
    async with blockemu.mount(image) as fs:
        await encrypted_dir(fs, "/secret")
        for i in range(5):
            async with fs.open(f"/secret/f{i}", "w") as f:
                for _ in range(20):
                    await f.write(pattern)
                await f.pwrite(pattern[:4000], 3)  # unaligned overwrite: read-modify-write path
    raw = open(image, "rb").read()
    assert b"PLAINTEXT-MARKER" not in raw
    async with blockemu.mount(image) as fs:
        await fs.add_key(KEY)
        async with fs.open("/secret/f3") as f:
            data = await f.read()
        assert data[:3] == pattern[:3] and data[3:4003] == pattern[:4000] and len(data) == 20 * len(pattern)


async def test_every_extent_has_its_own_nonce(fs):
    kid = await encrypted_dir(fs, "/e")
    for i in range(8):
        async with fs.open(f"/e/{i}", "w") as f:
            for j in range(6):
                await f.pwrite(b"\0" * 4096, j * 8192)  # identical plaintext, separate extents
                await f.fsync()
    nonces = []
    for key, body in fs.tree.items():
        if key[1] == S.EXTENT_DATA:
            from blockemu.ondisk.items import FileExtent
            fe = FileExtent.unpack(body)
            assert fe.context is not None and fe.context.key_identifier.hex() == kid
            nonces.append(fe.context.nonce)
    assert len(nonces) == 48 and len(set(nonces)) == 48


async def a_page_whose_writeback_fails(fs):
    """/x, open: a page written and fsynced, then a second page written whose writeback will
    fail with EIO."""
    f = await fs.open("/x", "w+")
    await f.write(b"1" * 4096)
    await f.fsync()
    await fail_next_data_write(fs)
    await f.write(b"2" * 4096)
    return f


async def test_fsync_reports_an_io_error_once(image):
    async with blockemu.mount(image, interval=3600) as fs:
        async with await a_page_whose_writeback_fails(fs) as f:
            with ErrnoCheck(errno.EIO):
                await f.fsync()
            fs.vol.device.faults = FaultPlan()
            await f.fsync()  # reported once; nothing new failed
            assert f.inode.lost_bytes == 4096
            assert await f.pread(8192, 0) == b"1" * 4096 + bytes(4096)  # the lost page is a hole, not stale
    assert check(image).clean


async def test_a_tree_read_that_fails_while_mapping_frees_the_lost_runs_space(image):
    """An I/O error reading the fs tree's root (evicted from the cache) while writeback maps its
    runs loses them before any tree changed: their written extents are referenced by nothing and
    go back to free at the commit -- never committed as allocated, which fsck calls damaged."""
    async with blockemu.mount(image, interval=3600) as fs:
        f = await fs.open("/x", "w+")
        await f.pwrite(b"1" * 8 * PAGE, 0)
        await f.fsync()
        await fs.sync()
        engine = fs.vol.engine
        root = engine.trees[S.FS_TREE_OBJECTID].root
        engine.store.clean.clear()  # the cache let every clean block go
        fs.vol.device.faults = FaultPlan(eio=[(root, root + fs.vol.sb.nodesize, "r")])
        for off in (0, 4 * PAGE):  # two runs: a batch, then each again on its own
            await f.pwrite(b"2" * PAGE, off)
        await fs.writeback.flush_inode(f.inode)
        fs.vol.device.faults = FaultPlan()
        assert f.inode.lost_bytes == 2 * PAGE
        with ErrnoCheck(errno.EIO):
            await f.close()
        async with await fs.open("/y", "w") as g:  # a change for the unmount's commit to commit
            await g.write(b"3")
    async with blockemu.mount(image) as fs:
        async with fs.open("/x") as f:
            assert await f.read() == b"1" * 8 * PAGE
    assert check(image).clean


async def test_the_bytes_lost_are_the_files_bytes_not_whole_pages(image):
    """A lost write of a 1-byte tail (a 4097-byte file's second page) is 1 byte lost, as the
    fsync's error says: a user compares it with what they wrote."""
    async with blockemu.mount(image, interval=3600) as fs:
        async with await fs.open("/x", "w+") as f:
            await f.write(b"1" * 4096)
            await f.fsync()
            await fail_next_data_write(fs)
            await f.write(b"2")
            with pytest.raises(OSError) as caught:
                await f.fsync()
            assert caught.value.errno == errno.EIO and "1 bytes lost" in str(caught.value)
            assert f.inode.lost_bytes == 1
            fs.vol.device.faults = FaultPlan()



async def test_the_bytes_lost_do_not_count_what_the_file_grew_by_since(image):
    """A 1-byte write whose writeback fails while the user appends 8 KiB lost 1 byte: the page's
    bytes under the size when writeback took it, not under the size at the failure (that said
    4096: the newcomer's '1 byte written, 4096 lost' again; review11). (An append, not a write
    past the end: that waits for the end block's writeback, ``zero_past_eof``.)"""
    async with blockemu.mount(image, interval=3600) as fs:
        async with await fs.open("/x", "w+") as f:
            await fail_next_data_write(fs)
            await f.write(b"1")
            writing, extended = asyncio.Event(), asyncio.Event()
            device = fs.vol.device
            real = device.write, device.writev

            def held(call):
                async def issued(*args, **kw):  # the run's write is issued; the user goes on meanwhile
                    writing.set()
                    await extended.wait()
                    return await call(*args, **kw)
                return issued
            device.write, device.writev = held(real[0]), held(real[1])
            fsync = asyncio.ensure_future(f.fsync())
            await writing.wait()
            device.write, device.writev = real
            await f.pwrite(b"2" * 8192, 1)
            extended.set()
            with pytest.raises(OSError) as caught:
                await fsync
            fs.vol.device.faults = FaultPlan()
            assert caught.value.errno == errno.EIO and f.inode.lost_bytes == 1, (str(caught.value), f.inode.lost_bytes)


async def test_sync_visits_the_inodes_dirtied_in_every_way_and_only_those(image):
    """A sync writes back the inodes the page cache noted as dirtied, not every cached one: each
    way of dirtying a page -- whole pages, a partial write, a truncate's tail, a punched hole's
    ends -- notes its inode, a clean cached file is not visited, and the sync prunes the note.
    From disk, on a fresh mount, every change the sync acknowledged is there."""
    model = {name: bytearray(os.urandom(3 * 4096 + 100)) for name in ("whole", "partial", "truncated", "punched", "clean")}
    async with blockemu.mount(image, interval=3600) as fs:
        for name, data in model.items():
            async with fs.open(f"/{name}", "w") as f:
                await f.write(data)
        await fs.sync()
        assert fs.writeback.dirty_inodes() == [] and fs.cache.dirtied == set()
        inos = {name: (await fs.stat(f"/{name}")).st_ino for name in model}
        async with fs.open("/whole", "r+") as f:
            await f.pwrite(b"W" * 8192, 4096)
        model["whole"][4096:12288] = b"W" * 8192
        async with fs.open("/partial", "r+") as f:
            await f.pwrite(b"P" * 10, 5000)
        model["partial"][5000:5010] = b"P" * 10
        async with fs.open("/truncated", "r+") as f:
            await f.truncate(6000)
        del model["truncated"][6000:]
        async with fs.open("/punched", "r+") as f:
            await f.punch_hole(1000, 2000)
        model["punched"][1000:3000] = bytes(2000)
        dirty = {i.ino for i in fs.writeback.dirty_inodes()}
        assert dirty == {inos[n] for n in ("whole", "partial", "truncated", "punched")}
        await fs.sync()
        assert fs.writeback.dirty_inodes() == [] and fs.cache.dirtied == set()
    async with blockemu.mount(image, interval=3600) as fs:
        for name, data in model.items():
            async with fs.open(f"/{name}") as f:
                assert await f.read() == data, name
    assert check(image).clean


async def test_sync_reports_a_writeback_error_once_and_the_files_fsync_still_does(image):
    """syncfs(2) since Linux 5.8: the sync whose writeback dropped data raises its error (it
    returned success, and the error waited on the inode for a close that might never come), a
    sync after it with nothing new fails succeeds, and the file's own fsync reports it too, once."""
    async with blockemu.mount(image, interval=3600) as fs:
        f = await a_page_whose_writeback_fails(fs)
        with ErrnoCheck(errno.EIO):
            await fs.sync()
        fs.vol.device.faults = FaultPlan()
        await fs.sync()  # reported once; nothing new failed
        with ErrnoCheck(errno.EIO):
            await f.fsync()  # the file's own report is its own
        await f.fsync()
        await f.close()
    assert check(image).clean
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/x") as f:
            assert await f.read() == b"1" * 4096  # the lost write never reached the disk


async def test_two_syncs_running_when_writeback_fails_both_report_it(image, monkeypatch):
    """Each sync reports what failed since the last report: one sync taking the error must not
    let another running beside it return success over the same loss (a stress oracle would
    count the lost data durable). The first sync is held at its commit, its writeback already
    failed, while the second starts; both raise, and a third, after them, does not."""
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/x", "w") as f:
            await f.write(b"1" * 4096)
        await fs.sync()
        await fail_next_data_write(fs)
        async with fs.open("/x", "r+") as f:
            await f.write(b"2" * 4096)
            gate = Gate(fs.vol.commit)
            monkeypatch.setattr(fs.vol, "commit", gate)
            first = asyncio.ensure_future(fs.sync())
            await gate.entered.wait()
            fs.vol.device.faults = FaultPlan()
            second = asyncio.ensure_future(fs.sync())
            await asyncio.sleep(0)  # let it begin: it waits for nothing the gate holds
            gate.release.set()
            results = await asyncio.gather(first, second, return_exceptions=True)
            assert [getattr(r, "errno", None) for r in results] == [errno.EIO, errno.EIO], results
            await fs.sync()
            with ErrnoCheck(errno.EIO):
                await f.close()
        assert not fs.writeback.errseq.noted  # nothing kept once every sync has seen it


async def test_checksum_mismatch_reads_as_eio(image):
    async with blockemu.mount(image) as fs:
        async with fs.open("/x", "w") as f:
            await f.write(b"z" * 8192)
        await fs.sync()
        ino = (await fs.stat("/x")).st_ino
        bytenr = next(fs.extents.mappings(ino)).extent.disk_bytenr
    with open(image, "r+b") as raw:
        raw.seek(bytenr + 4096 + 7)
        raw.write(b"!")
    async with blockemu.mount(image) as fs:
        async with fs.open("/x") as f:
            assert await f.pread(4096, 0) == b"z" * 4096
            with ErrnoCheck(errno.EIO):
                await f.pread(4096, 4096)


async def test_a_read_checks_its_sectors_with_one_csum_lookup_and_names_the_bad_one(image, monkeypatch):
    """A read of 32 sectors of one extent takes their checksums from one descent of the csum
    tree (one per sector was a thirtieth of the stress mix); a sector flipped in the middle
    still reads as EIO, named by its file offset, and the sectors before it read fine."""
    data = os.urandom(32 * 4096)
    async with blockemu.mount(image) as fs:
        async with fs.open("/x", "w") as f:
            await f.write(data)
        await fs.sync()
        ino = (await fs.stat("/x")).st_ino
        (m,) = list(fs.extents.mappings(ino))
        bytenr = m.extent.disk_bytenr
    async with blockemu.mount(image) as fs:
        csum_tree, descents = fs.extents.csum.tree, []  # under the changes held for the commit
        real = csum_tree._leaf_for
        monkeypatch.setattr(csum_tree, "_leaf_for", lambda key: descents.append(key) or real(key))
        async with fs.open("/x") as f:
            assert await f.read() == data
        assert len(descents) == 1, descents
    with open(image, "r+b") as raw:
        raw.seek(bytenr + 17 * 4096 + 5)
        raw.write(bytes([data[17 * 4096 + 5] ^ 1]))
    async with blockemu.mount(image) as fs:
        async with fs.open("/x") as f:
            assert await f.pread(17 * 4096, 0) == data[: 17 * 4096]
            with pytest.raises(OSError) as e:
                await f.pread(8 * 4096, 12 * 4096)
            assert e.value.errno == errno.EIO and f"file offset {17 * 4096} " in str(e.value)


async def test_pages_rewritten_while_being_sealed(image):
    """Stable pages: frames a worker is encrypting are never changed under it. Rewrites made
    while writeback has the whole file in flight go to fresh frames; the extents sealed meanwhile
    hold the old data, the next fsync the new, and the file reads back as last written."""
    key = os.urandom(64)
    model = bytearray(os.urandom(8 << 20))
    async with blockemu.mount(image, interval=3600) as fs:
        await encrypted_dir(fs, "/e", key)
        async with fs.open("/e/f", "w") as f:
            await f.write(model)
            flush = asyncio.ensure_future(f.fsync())
            while not fs.cache._sealing:  # let writeback take the file's runs
                await asyncio.sleep(0)
            rng = random.Random(3)
            for _ in range(64):  # no await yields in here: no run can complete meanwhile
                off, data = rng.randrange(len(model) - 9000), os.urandom(rng.randrange(1, 9000))
                await f.pwrite(data, off)
                model[off : off + len(data)] = data
            assert fs.cache._orphans, "no page was rewritten while its frame was being sealed"
            await flush
            await f.fsync()
        assert not fs.cache._sealing and not fs.cache._orphans
        assert fs.writeback.stats["lost_bytes"] == 0
    async with blockemu.mount(image) as fs:
        await fs.add_key(key)
        async with fs.open("/e/f") as f:
            assert await f.read() == bytes(model)


async def test_dirty_memory_stays_bounded(image):
    async with blockemu.mount(image, interval=3600, dirty_limit=1 << 20, background_bytes=256 << 10,
                              cache_limit=1 << 20, max_extent=256 << 10) as fs:
        peak_dirty = peak_pages = spilled = 0
        async with fs.open("/big", "w") as f:
            chunk = os.urandom(64 << 10)
            for _ in range(24 << 20 >> 16):
                await f.write(chunk)
                peak_dirty = max(peak_dirty, fs.cache.dirty_bytes)
                peak_pages = max(peak_pages, sum(len(i.pages.pages) for i in fs.inodes.values()))
                spilled += sum(type(f.inode.pages.pages[i]) is not int for i in f.inode.pages.dirty)
            await f.fsync()
        assert peak_dirty <= (1 << 20) + len(chunk)
        assert peak_pages * 4096 <= 3 << 20
        assert spilled == 0, "dirty pages spilled onto the heap instead of waiting for free frames"
        async with fs.open("/big") as f:
            assert await f.pread(len(chunk), 5 << 20) == chunk


async def test_a_writer_waiting_for_frames_asks_no_destage_one_over_the_byte_limit_does(image, monkeypatch):
    """A streaming writer outruns writeback and waits for free frames: writeback frees those,
    a destage of the device's cache does not, so it asks for none (it asked for a small one,
    a trip to the I/O thread, about every other MiB). Over the byte limit the device's cached
    bytes count, and the waiting writer must have them destaged or wait for ever."""
    async def stream(fs, mib: int) -> int:
        """Writes ``mib`` MiB; how many destages were asked for below the device's own threshold."""
        device, small = fs.vol.device, []
        real = device.destage_in_background
        monkeypatch.setattr(device, "destage_in_background",
                            lambda: small.append(device.cached_bytes() <= device.cache_limit) or real())
        chunk = os.urandom(1 << 20)
        async with fs.open(f"/e/f{mib}", "w") as f:
            for _ in range(mib):
                await f.write(chunk)
            asked = sum(small)
            await f.fsync()
        return asked

    async with blockemu.mount(image, interval=3600) as fs:
        await encrypted_dir(fs, "/e")
        assert fs.writeback.cache.arena.size < 32 << 20  # frames run out long before the bytes do
        assert await stream(fs, 48) == 0
    async with blockemu.mount(image, interval=3600, dirty_limit=2 << 20, background_bytes=1 << 20) as fs:
        await fs.add_key(KEY)
        assert await asyncio.wait_for(stream(fs, 8), 60) > 0


async def test_stale_frames_are_room_for_a_streaming_writer_and_gone_once_the_file_is_dropped(image):
    """A streaming run's frames go back stale -- unzeroed, for the next streaming write to
    overwrite -- and count as free for a writer asking for room: one that counted only zeroed
    frames waited, with stale frames enough, until writeback had written everything dirty. A
    page drop (here the file's delete) zeroes the stale frames, whoever's they were."""
    chunk = bytes(range(256)) * 4096
    async with blockemu.mount(image, interval=3600, cache_limit=0) as fs:
        arena, wb = fs.cache.arena, fs.writeback
        async with fs.open("/f", "w") as f:
            for _ in range(8):
                await f.write(chunk)
            await f.fsync()
            assert arena.stale and all(arena.page(n) == chunk[:4096] for n in arena.stale[-1:])
            await f.pwrite(b"x", 0)  # something dirty: a writer that finds no frame waits
            assert not wb.over_limit(arena.available() * 4096)
        await fs.unlink("/f")
        assert not arena.stale and all(arena.page(n) == bytes(4096) for n in arena.free)


async def test_a_typed_buffer_is_written_as_its_bytes_and_no_frame_is_lost(image):
    """A write of a buffer whose items are not bytes (an ``array('H')``'s memoryview, as
    os.write takes any buffer): its bytes land, and it returns how many. The whole pages in its
    middle were copied into frames taken from the arena first -- stale ones first, holding
    another file's plaintext -- and the copy raised ValueError (not an OSError) with the frames
    taken and never given back: neither reused nor ever zeroed, so that plaintext outlived
    every page drop, a key removal's included."""
    chunk = bytes(range(256)) * 4096
    data = array.array("H", bytes(range(1, 256)) * 100)
    async with blockemu.mount(image, interval=3600, cache_limit=0) as fs:
        arena = fs.cache.arena
        async with fs.open("/f", "w") as f:
            await f.write(chunk)
            await f.fsync()
        assert arena.stale  # the streamed run's frames, unzeroed
        frames = arena.available()
        async with fs.open("/g", "w") as f:
            assert await f.pwrite(memoryview(data), 0) == len(data) * data.itemsize
            await f.fsync()
        assert arena.available() == frames
        async with fs.open("/g") as f:
            assert await f.read() == data.tobytes()


async def test_a_read_larger_than_the_clean_cache_returns_every_page(image):
    """A read of 16 pages through an 8-page clean cache that held its first page: the fill of
    pages 1..15 evicted page 0 and pages 1..7, so page 0 was filled again -- an await, on which
    the evicted pages 1..7, still to be returned, were zeroed: the read returned zeros there."""
    data = os.urandom(16 * 4096)
    async with blockemu.mount(image, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(data)
    async with blockemu.mount(image, interval=3600, cache_limit=8 * 4096) as fs:
        async with fs.open("/f") as f:
            assert await f.pread(500, 0) == data[:500]
            assert await f.pread(len(data), 0) == data


async def test_fsync_dir_makes_a_rename_durable_as_fsync_of_the_directory_does(image):
    """The POSIX way to replace a file atomically: write a temporary file, fsync it, rename it
    over the old one, fsync the directory. DESIGN §9 says a directory's fsync commits, but the
    API had no way to ask for one (``open`` of a directory is EISDIR); ``fs.fsync_dir`` is it."""
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/a", "w") as f:
        await f.write(b"old")
        await f.fsync()
    async with fs.open("/a.tmp", "w") as f:
        await f.write(b"new")
        await f.fsync()
    await fs.mkdir("/d")
    await fs.rename("/a.tmp", "/a")
    await fs.fsync_dir("/")
    with pytest.raises(NotADirectoryError):
        await fs.fsync_dir("/a")
    with pytest.raises(FileNotFoundError):
        await fs.fsync_dir("/nope")
    fs.vol.device.power_cut()  # the rename is durable only by fsync_dir's commit
    await fs.writeback.stop()
    await fs.vol.device.close()
    async with blockemu.mount(image) as fs2:
        assert sorted(await fs2.readdir("/")) == ["a", "d"]
        async with fs2.open("/a") as f:
            assert await f.read() == b"new"
    assert check(image).clean


async def test_set_attrs_refuses_an_owner_or_time_out_of_range_with_einval(fs):
    """chown to a uid, or utimensat to a time, the inode item cannot hold failed its pack inside
    the transaction with a struct.error -- no OSError, against DESIGN's every-error-is-an-OSError
    rule. Checked before the join as a create's owner is: EINVAL (TypeError for 1.5, as os), the
    inode unchanged."""
    async with fs.open("/f", "w") as f:
        await f.write(b"x")
    before = await fs.stat("/f")
    node = fs.inode(before.st_ino)
    for bad in ({"uid": -1}, {"gid": 2**32 - 1}, {"uid": 2**40}):
        with ErrnoCheck(errno.EINVAL):
            await fs.set_attrs(node, mode=0o600, **bad)
    with pytest.raises(TypeError):
        await fs.set_attrs(node, gid=1.5)
    for bad in ({"atime_ns": 2**63 * 10**9}, {"mtime_ns": -2**63 * 10**9 - 1}):  # the seconds' 64 bits, signed
        with ErrnoCheck(errno.EINVAL):
            await fs.set_attrs(node, mode=0o600, **bad)
    with pytest.raises(TypeError):
        await fs.set_attrs(node, atime_ns=1.5)
    assert await fs.stat("/f") == before
    await fs.set_attrs(node, atime_ns=2**63 * 10**9 - 1, mtime_ns=-2**63 * 10**9)  # the extremes fit
    assert (await fs.stat("/f")).st_mtime_ns == -2**63 * 10**9
    await fs.set_attrs(node, uid=2**32 - 2, gid=7)  # the largest fits
    after = await fs.stat("/f")
    assert (after.st_uid, after.st_gid) == (2**32 - 2, 7)


async def test_set_attrs_whose_save_fails_changes_nothing(image, monkeypatch):
    """chmod, chown and utimensat changed the inode in memory before saving it: a save that
    failed (here ENOSPC for the item's new leaf) left stat showing the refused change, which the
    next save of that inode (a write's) then wrote. The inode takes the change with its save, or
    not at all: stat shows what a fresh mount finds, and a later save keeps the old attributes."""
    fs = await blockemu.mount(image, interval=3600)
    async with fs.open("/f", "w") as f:
        await f.write(b"data")
    await fs.sync()
    before = await fs.stat("/f")
    node = fs.inode(before.st_ino)
    insert = fs.tree.insert

    def no_room(key, *args, **kw):
        if key[1] == S.INODE_ITEM:
            raise OSError(errno.ENOSPC, "no space left on device")
        return insert(key, *args, **kw)
    monkeypatch.setattr(fs.tree, "insert", no_room)
    with pytest.raises(OSError) as e:
        await fs.set_attrs(node, mode=0o600, uid=7, gid=8, atime_ns=5, mtime_ns=6)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(fs.tree, "insert", insert)
    assert await fs.stat("/f") == before
    async with fs.open("/f", "r+") as f:
        await f.pwrite(b"D", 0)
    await fs.sync()  # saves the inode again
    shown = await fs.stat("/f")
    assert (shown.st_mode, shown.st_uid, shown.st_gid, shown.st_atime_ns) == \
        (before.st_mode, before.st_uid, before.st_gid, before.st_atime_ns)
    await fs.unmount()
    async with blockemu.mount(image, readonly=True) as again:
        assert await again.stat("/f") == shown
