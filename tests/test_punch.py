"""File.punch_hole: fallocate(PUNCH_HOLE | KEEP_SIZE), what fio's trim does to a file.

Each check unmounts and mounts again before it compares: the oracle reads from disk.
"""
from __future__ import annotations

import errno
import random

import pytest

import blockemu
from tests.util import ErrnoCheck, assert_fsck_clean, encrypted_dir

S = 4096


@pytest.mark.parametrize("encrypt", [False, True])
async def test_punched_ranges_read_zeros_after_remount_and_their_space_comes_back(tmp_path, encrypt):
    """Holes punched in written-back extents, in dirty pages not written back yet, and across
    partial pages at both ends; on the production path (sealing workers, 1 MiB extents)."""
    image = str(tmp_path / "p.img")
    await blockemu.mkfs(image, size="32M")
    rng = random.Random(7)
    want = bytearray(rng.randbytes(3 * (1 << 20) + 1000))
    path = "/e/f" if encrypt else "/f"
    fs = await blockemu.mount(image, interval=3600, seal_workers=2, max_extent=1 << 20)
    try:
        if encrypt:
            await encrypted_dir(fs, "/e")
        async with fs.open(path, "w+") as f:
            await f.write(want)
            await f.fsync()
            before = fs.space()[1]
            holes = [(5000, 2 * (1 << 20) - 5000), (2 * (1 << 20) + 100, 200), (3 * (1 << 20), 1 << 30)]
            for off, n in holes[:2]:
                await f.punch_hole(off, n)
            await f.pwrite(b"\xaa" * (3 * S), 3 * (1 << 20) - 2 * S)  # dirty, then punched before writeback
            want[3 * (1 << 20) - 2 * S: 3 * (1 << 20) + S] = b"\xaa" * (3 * S)
            await f.punch_hole(*holes[2])
            for off, n in holes:
                want[off: off + n] = bytes(len(want[off: off + n]))
            assert await f.pread(len(want) + 10, 0) == want  # through the cache, before writeback too
            await f.fsync()
        await fs.sync()
        # the second 1 MiB extent is no longer referenced: free; the first, partly referenced
        # still, keeps its space (as btrfs keeps a bookend extent) until the rest goes too
        assert fs.space()[1] - before >= (1 << 20) - 16 * S  # less the tree blocks the commit rewrote
    finally:
        await fs.unmount()
    assert_fsck_clean(image)
    async with blockemu.mount(image) as fs:
        if encrypt:
            await encrypted_dir(fs, "/e2")  # adds the key again
        assert (await fs.stat(path)).st_size == len(want)  # KEEP_SIZE
        async with fs.open(path) as f:
            assert await f.read() == want


async def test_punch_hole_arguments(tmp_path):
    image = str(tmp_path / "a.img")
    await blockemu.mkfs(image, size="16M")
    async with blockemu.mount(image) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x" * 100)
            for off, n in ((-1, 10), (0, 0), (0, -5)):
                with ErrnoCheck(errno.EINVAL):
                    await f.punch_hole(off, n)
            await f.punch_hole(200, 10)  # past the end: nothing to punch, the size stays
            assert (await fs.stat("/f")).st_size == 100
        async with fs.open("/f") as f:
            with ErrnoCheck(errno.EBADF):
                await f.punch_hole(0, 10)
