"""Small helpers shared by the tests."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import signal
from collections.abc import Callable, Iterator

import pytest

from blockemu.workload.writepath import PRODUCTION

# the production write path on 4 KiB tree blocks, for workloads built to fill a leaf in a few
# items (new deltas, a chain of log trees, a hole just the size of a block): the default 16 KiB
# blocks never reach those states
PRODUCTION_4K = dataclasses.replace(PRODUCTION, node_size="4K")


def assert_fsck_clean(path: str, *, check_data: bool = True) -> None:
    """fsck finds nothing in the image at ``path`` (data checksums too, unless told otherwise)."""
    from blockemu.check.fsck import check

    report = check(path, check_data=check_data)
    assert report.clean, [e.message for e in report.errors]


def flip(path: str, offset: int) -> None:
    """Damage one byte of an image in place (XOR 0x5A: never a no-op)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def set_super(path: str, **fields: int) -> None:
    """Change fields of an image's primary superblock in place, re-checksummed (a feature bit
    this blockemu does not know, a bad root directory)."""
    import dataclasses

    from blockemu.ondisk.structs import SUPER_INFO_SIZE, SUPER_OFFSETS
    from blockemu.ondisk.superblock import decode_super, encode_super

    at = SUPER_OFFSETS[0]
    with open(path, "r+b") as f:
        f.seek(at)
        sb = decode_super(f.read(SUPER_INFO_SIZE), at)
        f.seek(at)
        f.write(encode_super(dataclasses.replace(sb, **fields), at))


async def fsynced_then_cut(img: str) -> None:
    """A fresh 32 MiB ``img`` whose /f holds 4 KiB of "x" committed and 4 KiB of "y" appended and
    fsynced (through the fsync log, no commit), then the power cut: an image with a log to replay."""
    import blockemu

    await blockemu.mkfs(img, size="32M", force=True)
    async with blockemu.mount(img) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x" * 4096)
    fs = await blockemu.mount(img)
    async with fs.open("/f", "a") as f:
        await f.write(b"y" * 4096)
        await f.fsync()
    fs.power_cut()
    await fs.unmount()


async def fail_next_data_write(fs, length: int = 4096) -> None:
    """EIO on writes to the next ``length`` bytes the allocator hands out -- where the next data
    extent goes -- and nowhere else: a run's write fails, the commit's blocks (placed after it) do not.
    Asked once no commit's tail runs (an fsync's commit returns before it gives back its pins)."""
    import copy

    from blockemu.device.faultplan import FaultPlan

    length = -(-length // 4096) * 4096  # a run of whole pages
    async with fs.vol.commit_lock:
        nxt = copy.deepcopy(fs.vol.engine.allocator).alloc(length)  # small ones fill holes first
    fs.vol.device.faults = FaultPlan(eio=[(nxt, nxt + length, "w")])


KEY = bytes(range(1, 65))  # the test master key; KID is its fscrypt identifier
KID = "69b2f6edeee720cce0577937eb8a6751"


async def encrypted_dir(fs, path: str, key: bytes = KEY) -> str:
    """Add ``key`` and make ``path`` a new directory encrypted with it; returns the key id."""
    kid = await fs.add_key(key)
    await fs.mkdir(path)
    await fs.set_policy(path, kid)
    return kid


class ErrnoCheck:
    """``with ErrnoCheck(errno.ENOKEY): ...``: the block must raise an OSError with that errno."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __enter__(self) -> "ErrnoCheck":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        assert exc is not None, f"expected errno {errno.errorcode[self.code]}"
        assert isinstance(exc, OSError) and exc.errno == self.code, (exc, errno.errorcode[self.code])
        return True


def obey_file_modes() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set (prctl PR_CAPBSET_DROP), so even root gets EACCES where the file's mode says no.
    Pass as ``preexec_fn`` when ``os.geteuid() == 0``."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


class Gate:
    """Wraps an async callable: its first call signals ``entered`` and holds until ``release``
    (before or after calling through, as ``after`` says); later calls pass straight through."""

    def __init__(self, real, *, after: bool = False) -> None:
        self.real, self.after = real, after
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.calls = 0

    async def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls > 1:
            return await self.real(*args, **kw)
        if self.after:
            result = await self.real(*args, **kw)
        self.entered.set()
        await self.release.wait()
        return result if self.after else await self.real(*args, **kw)


async def until(reached: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Yield to the loop until ``reached()`` holds: a state the code gets to only once work on
    I/O threads is done (a file's writeback, a read). No count of yields measures that -- at a
    load of 13, 10,000 yields passed first -- so the wait is bounded by wall-clock time and
    fails naming ``what`` never happened, not with a later, puzzling assertion. Past the first
    hundred yields (what the loop alone gets to) it polls each millisecond: a loop spinning on
    yields took the GIL from the very I/O threads it waited for, on two cores shared by xdist's
    workers. The condition decides, not the time: no nap stands for the state it waits for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    spins = 0
    while not reached():
        assert loop.time() < deadline, f"{what}: not within {seconds:g} s"
        spins += 1
        await asyncio.sleep(0 if spins < 100 else 0.001)


async def cancel_while_it_waits(lock: asyncio.Lock, call) -> None:
    """Start ``call()`` while ``lock`` is held and cancel it once it waits for the lock: it must
    end cancelled, not with a loss raised over the cancellation."""
    async with lock:
        task = asyncio.ensure_future(call())
        await until(lambda: bool(lock._waiters) or task.done(), "the call never waited for the lock")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def sigint_as_a_terminal_gives() -> Iterator[None]:
    """Python's own SIGINT handler, as a process started from a terminal has it (and a child
    started meanwhile gets SIG_DFL): a suite run from a background job inherits SIGINT ignored,
    Python then installs no handler, and blockemu leaves an ignored signal ignored, as a program
    started in the background should -- so a test of Ctrl-C could not pass there."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


async def abort_by_a_half_done_rename(fs, src: str, dst: str) -> None:
    """Abort the mount's transaction the way a bug does: a rename whose new entry fails (a planted
    KeyError) after its old one went. The rename raises EIO; the mount is read-only after."""
    def failing_add_entry(parent, name, child, **links):
        raise KeyError("planted bug")

    fs._add_entry = failing_add_entry
    try:
        with ErrnoCheck(errno.EIO):
            await fs.rename(src, dst)
    finally:
        del fs._add_entry
