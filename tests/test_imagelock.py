"""One writer per image (issue 10, item 1): real processes contend for one image file.

The holder is a separate Python process that mounts the image, writes and fsyncs, says
"up" on its stdout and keeps the image mounted until the test writes a line to its stdin:
every step is a handshake, nothing waits on a timer.
"""
from __future__ import annotations

import errno
import gc
import os
import signal
import stat
import subprocess
import sys

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.check.repair import repair
from blockemu.device.image import ImageFile
from blockemu.device.imagelock import open_image
from blockemu.errors import Busy, ImageInUse, ReadOnlyError
from tests.util import flip, obey_file_modes

HOLDER = """
import asyncio, sys, blockemu
async def main():
    async with blockemu.mount(sys.argv[1], seal_workers=0) as fs:
        await fs.mkdir("/held")
        for i in range(20):
            async with fs.open(f"/held/f{i}", "w") as f:
                await f.write(bytes([i]) * 5000)
                await f.fsync()
        print("up", flush=True)
        sys.stdin.readline()
asyncio.run(main())
"""


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "blockemu", *args], capture_output=True, text=True, timeout=60, **kw)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def in_use(path: str, pid: int, how: str = "mounted or open for writing") -> str:
    return f"{path}: image is in use by pid {pid} ({how}); one writer per image"


@pytest.fixture
async def image(tmp_path) -> str:
    path = str(tmp_path / "a.img")
    await blockemu.mkfs(path, size="32M")
    return path


@pytest.fixture
def holder(image):
    """A process with ``image`` mounted; the test lets it unmount by writing a line."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, image], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n", proc.stderr.read()
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


async def test_a_second_writer_is_refused_and_the_holder_loses_nothing(image, holder, tmp_path):
    with pytest.raises(ImageInUse) as e:
        await blockemu.mount(image)
    assert e.value.errno == errno.EBUSY and e.value.pid == holder.pid
    assert str(e.value) == in_use(image, holder.pid)
    host = tmp_path / "x"
    host.write_bytes(b"intruder")
    p = cli("put", image, str(host), "/x")
    assert (p.returncode, p.stderr) == (1, f"blockemu: put: {in_use(image, holder.pid)}\n")
    before = open(image, "rb").read()
    with pytest.raises(ImageInUse, match=f"pid {holder.pid}"):
        await blockemu.mkfs(image, size="32M", force=True)
    assert open(image, "rb").read() == before
    # readers take a shared lock: refused too while a writer holds the image (README, "One writer per image")
    p = cli("ls", image)
    assert (p.returncode, p.stderr) == (1, f"blockemu: ls: {in_use(image, holder.pid)}\n")
    with pytest.raises(ImageInUse, match=f"pid {holder.pid}"):
        check(image)

    holder.stdin.write("done\n")
    holder.stdin.flush()
    assert holder.wait(timeout=60) == 0, holder.stderr.read()
    async with blockemu.mount(image) as fs:
        assert not await fs.exists("/x")
        assert sorted(await fs.readdir("/held")) == sorted(f"f{i}" for i in range(20))
        for i in range(20):
            async with fs.open(f"/held/f{i}") as f:
                assert await f.read() == bytes([i]) * 5000
    assert check(image).clean


async def test_the_lock_of_a_killed_holder_is_gone(image, holder):
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    async with blockemu.mount(image) as fs:  # no stale lock: the kernel dropped it with the process
        assert len(await fs.readdir("/held")) == 20
    assert check(image).clean


async def test_readers_share_and_keep_writers_out(image):
    with ImageFile.open(image), ImageFile.open(image):  # two readers at once
        p = cli("mkdir", image, "/d")
        assert (p.returncode, p.stderr) == (1, f"blockemu: mkdir: {in_use(image, os.getpid(), 'open for reading')}\n")
        with pytest.raises(ImageInUse, match="in use by this process"):
            await blockemu.mount(image)  # the lock belongs to the open, so one program's two opens conflict too
        assert cli("ls", image).returncode == 0
    async with blockemu.mount(image) as fs:
        await fs.mkdir("/d")


async def test_a_read_only_mount_refuses_changes(image):
    async with blockemu.mount(image) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"data")
    async with blockemu.mount(image, readonly=True) as fs:
        async with fs.open("/f") as f:
            assert await f.read() == b"data"
        with pytest.raises(ReadOnlyError) as e:
            await fs.open("/f", "a")
        assert e.value.errno == errno.EROFS
        with pytest.raises(ReadOnlyError):
            await fs.mkdir("/d")
    assert check(image).clean


async def test_a_repair_refuses_an_image_changed_since_its_check(image):
    """fsck --repair checks under a shared lock and repairs under an exclusive one: a writer
    that got in between would make the report's fixes stale."""
    report = check(image)
    async with blockemu.mount(image) as fs:
        await fs.mkdir("/meanwhile")
    with pytest.raises(Busy, match="changed since the check"):
        await repair(image, report)
    assert await repair(image, check(image)) == 0


async def test_read_only_commands_work_on_a_0444_image(tmp_path):
    """ls, cat and fsck (and extents, inspect) open the image O_RDONLY; put, which writes, cannot."""
    img, host = str(tmp_path / "ro.img"), tmp_path / "h"
    host.write_bytes(b"x")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img) as fs:
        async with fs.open("/h", "w") as f:
            await f.write(b"read me" * 1000)
    os.chmod(img, 0o444)
    as_reader = {"preexec_fn": obey_file_modes} if os.geteuid() == 0 else {}
    p = cli("ls", img, "-l", **as_reader)
    assert p.returncode == 0 and p.stdout.endswith(" h\n"), p.stderr
    assert cli("fsck", img, **as_reader).returncode == 0
    assert cli("cat", img, "/h", **as_reader).stdout == "read me" * 1000
    p = cli("put", img, str(host), "/g", **as_reader)
    assert (p.returncode, p.stderr) == (1, f"blockemu: put: {img}: permission denied (opening it for writing)\n")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_collector():
    """The collector off, as in a long-lived program between its (rare: cli/collector.py)
    collections: what only a collection would release stays held."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_failing_mounts_hold_no_descriptor_nor_the_lock_once_they_raise(tmp_path, image, no_collector):
    """A mount server, a campaign worker keeps running after a failed mount, and often keeps its
    error (a task's result, a shard's): the error's traceback holds every frame of the failure,
    so whatever only the collector would close -- an image, its lock, the page arena's memfd --
    must have been closed before it was raised."""
    from blockemu.engine.btree import BTree
    from blockemu.ondisk import structs as S
    from blockemu.workload.crash import record
    from blockemu.workload.writepath import PRODUCTION

    damaged = str(tmp_path / "damaged.img")  # its fs tree's root block fails its checksum
    await blockemu.mkfs(damaged, size="32M")
    async with blockemu.mount(damaged, seal_workers=0) as fs:
        fs_root = fs.vol.engine.trees[S.FS_TREE_OBJECTID]
        assert isinstance(fs_root, BTree)
        at = fs_root.root
    flip(damaged, at + 200)

    async def wrong_key(fs, rec) -> None:  # a workload that fails: a file under another key
        await rec.mkdir("/A")
        async with fs.open("/A/f", "w") as f:
            await f.write(b"x" * 5000)
        await fs.remove_key(rec.kid)
        await fs.add_key(b"\x01" * 64)
        await fs.stat("/A/f")  # ENOENT: under another key the name is not there

    kept: list[BaseException] = []
    fds = open_fds()
    held = open_image(image, readonly=False)  # a writer holds the image: every mount is refused (EBUSY)
    try:
        for _ in range(4):
            for attempt in (lambda: blockemu.mount(damaged, seal_workers=0),
                            lambda: blockemu.mount(image, seal_workers=0),
                            lambda: record(wrong_key, str(tmp_path / "w.img"), str(tmp_path / "base.img"),
                                           write_path=PRODUCTION)):
                with pytest.raises(OSError) as failed:
                    await attempt()
                kept.append(failed.value)  # kept, with its traceback: nothing collected
    finally:
        os.close(held)
    assert {type(e).__name__ for e in kept} == {"CorruptionError", "ImageInUse", "NotFoundError"}, kept
    assert open_fds() == fds
    for path in (damaged, str(tmp_path / "w.img"), image):  # the lock is free at once
        os.close(open_image(path, readonly=False))
    async with blockemu.mount(image, seal_workers=0) as fs:
        assert await fs.exists("/")


def test_an_image_whose_superblock_read_fails_is_closed_at_once(image, monkeypatch, no_collector):
    """ImageFile.open's descriptor is an int: if reading the superblocks fails (EIO from a
    failing disk), nothing but the open itself can close it."""
    def failing(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")
    fds = open_fds()
    monkeypatch.setattr(os, "pread", failing)
    with pytest.raises(OSError):
        ImageFile.open(image)
    monkeypatch.undo()
    assert open_fds() == fds
    os.close(open_image(image, readonly=False))  # and its lock is free


async def test_a_run_whose_mount_fails_half_way_releases_the_image(tmp_path, image, monkeypatch, no_collector):
    """``blockemu run`` mounts, then makes its jobs' directory: a failure there (ENOSPC on a full
    image, here injected) left the mount open, held by the error's traceback -- its descriptors
    and the image's lock, so the next run on the image was refused (EBUSY)."""
    from blockemu.errors import NoSpaceError
    from blockemu.fs.filesystem import Filesystem
    from blockemu.workload.runner import run_workload

    job = tmp_path / "j.fio"
    job.write_text("[w]\nrw=write\nsize=64k\n")

    async def full(self, path: str) -> None:
        raise NoSpaceError("No space left on device")
    monkeypatch.setattr(Filesystem, "mkdir", full)
    fds = open_fds()
    kept = []
    for _ in range(3):
        with pytest.raises(NoSpaceError) as failed:
            await run_workload(str(job), image=image, seed=1)
        kept.append(failed.value)  # kept, with its traceback: nothing collected
    assert open_fds() == fds
    os.close(open_image(image, readonly=False))  # the lock is free at once
    monkeypatch.undo()
    assert (await run_workload(str(job), image=image, seed=1)).ok


def test_a_campaign_that_fails_before_its_first_shard_closes_its_results_file(tmp_path, monkeypatch, no_collector):
    """``--resume F --results F`` opens F to append, then reads its last byte (an interrupted
    run's half line gets a newline): a failing read there left the appending descriptor open."""
    import builtins

    from blockemu.workload.campaign import Campaign, LocalExecutor, Shard, run_campaign

    results = str(tmp_path / "r.jsonl")
    with open(results, "w") as f:
        f.write('{"half a line')
    real = builtins.open

    def failing(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if path == results and mode == "rb":
            raise OSError(errno.EIO, "Input/output error")
        return real(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", failing)
    campaign = Campaign("c", {}, [Shard("0", ())], lambda args: {"units": 1, "states": 0, "failures": []}, str)
    fds = open_fds()
    kept = []
    for _ in range(3):
        with pytest.raises(OSError, match="Input/output error") as failed:
            run_campaign(campaign, LocalExecutor(1), results=results, resume=results)
        kept.append(failed.value)  # kept, with its traceback: its frames' locals too
    assert open_fds() == fds


async def test_mkfs_makes_the_new_images_name_durable(tmp_path, monkeypatch):
    """The image's own syncs made its contents durable, not the directory entry naming it: a host
    crash after mkfs could leave no image. mkfs syncs the directory a new image is made in (once,
    and not for an image it overwrites, whose name was durable already)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await blockemu.mkfs(str(tmp_path / "new.img"), size="32M")
    assert synced == [str(tmp_path)]
    await blockemu.mkfs(str(tmp_path / "new.img"), size="32M", force=True)
    assert synced == [str(tmp_path)]
