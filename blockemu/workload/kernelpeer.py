"""The generic/595 race against the real kernel: the baseline our removal modes are read against.

The same actors as ``keyrace`` -- one adds and removes the master key, one re-opens the
file in append mode, writes one byte and closes it -- and the same counters, but on a
kernel fscrypt directory, spoken to directly with the filesystem-keyring ioctls
(``fcntl.ioctl``; the structs are the UAPI's, see fscrypt-semantics.md §1.1). Either on
a directory the user names (it must be on a filesystem with encryption enabled) or, as
root, on a fresh loop-mounted ext4 image made with ``mkfs.ext4 -O encrypt``. What was
lost is judged the way generic/595 judges it -- after every file is closed, the key is
removed (so the kernel evicts the inodes, after syncing), the caches are dropped and,
for our own image, the filesystem is unmounted and mounted again; then the key is added
back and the file read.

The kernel wipes the master secret at REMOVE (ext4 derives its per-file keys at open, so
unlocked inodes keep theirs); what lingers is the key's INCOMPLETELY_REMOVED state while
an unlocked inode is cached. ``wipe_delay`` for the kernel is therefore REMOVE until
GET_ENCRYPTION_KEY_STATUS reports ABSENT, polled by the key actor before each re-add: a
key that is re-added while still incompletely removed never completes its removal, as in
our modes.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from blockemu.workload.keyrace import KEY, AppendLedger, RaceResult

# include/uapi/linux/fscrypt.h
FS_IOC_SET_ENCRYPTION_POLICY = 0x800C6613
FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617
FS_IOC_REMOVE_ENCRYPTION_KEY = 0xC0406618
FS_IOC_GET_ENCRYPTION_KEY_STATUS = 0xC080661A
KEY_SPEC_TYPE_IDENTIFIER = 2
KEY_REMOVAL_STATUS_FLAG_FILES_BUSY = 0x1
KEY_STATUS_ABSENT, KEY_STATUS_PRESENT, KEY_STATUS_INCOMPLETELY_REMOVED = 1, 2, 3
MODE_AES_256_XTS, MODE_AES_256_CTS, POLICY_FLAGS_PAD_32 = 1, 4, 0x3
KEY_SPEC = struct.Struct("=II32s")  # type, __reserved, u.identifier (padded to 32)

REFUSALS = (errno.ENOKEY, errno.ENOENT)  # an append refused for want of the key: see _note_error


class Unavailable(Exception):
    """Why the kernel peer cannot run here: one line, the rest of the report still runs."""


def _spec(identifier: bytes) -> bytes:
    return KEY_SPEC.pack(KEY_SPEC_TYPE_IDENTIFIER, 0, identifier)


def add_key(fd: int, raw: bytes) -> bytes:
    """FS_IOC_ADD_ENCRYPTION_KEY (v2): the kernel computes the identifier and copies it back."""
    buf = bytearray(_spec(b"") + struct.pack("=II8I", len(raw), 0, *[0] * 8) + raw)
    fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, buf, True)
    return bytes(buf[8:24])


def remove_key(fd: int, identifier: bytes) -> int:
    """FS_IOC_REMOVE_ENCRYPTION_KEY; returns removal_status_flags (FILES_BUSY, OTHER_USERS)."""
    buf = bytearray(_spec(identifier) + bytes(24))
    fcntl.ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY, buf, True)
    return struct.unpack_from("=I", buf, 40)[0]


def key_status(fd: int, identifier: bytes) -> int:
    """FS_IOC_GET_ENCRYPTION_KEY_STATUS: ABSENT, PRESENT or INCOMPLETELY_REMOVED."""
    buf = bytearray(_spec(identifier) + bytes(24) + bytes(64))
    fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, buf, True)
    return struct.unpack_from("=I", buf, 64)[0]


def set_policy(dirfd: int, identifier: bytes) -> None:
    """FS_IOC_SET_ENCRYPTION_POLICY with a v2 policy (the ioctl number carries the v1 size)."""
    policy = struct.pack("=BBBBB3s16s", 2, MODE_AES_256_XTS, MODE_AES_256_CTS, POLICY_FLAGS_PAD_32, 0, bytes(3), identifier)
    fcntl.ioctl(dirfd, FS_IOC_SET_ENCRYPTION_POLICY, policy)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def drop_caches() -> bool:
    """Evict clean dentries and inodes (``echo 2 > drop_caches``, as generic/595); False without root."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        return True
    except OSError:
        return False


class KernelRace:
    """The race's actors on a kernel directory; each ``yield`` is one step of the schedule."""

    def __init__(self, mnt: str, result: RaceResult) -> None:
        self.mnt = mnt
        self.r = result
        self.ledger = AppendLedger()
        self.keyfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        self.kid = b""
        self.dir = ""
        self.removed_at: float | None = None
        self.delays: list[float] = []

    def setup(self) -> None:
        self.kid = add_key(self.keyfd, KEY)
        self.dir = tempfile.mkdtemp(prefix="blockemu-race-", dir=self.mnt)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            set_policy(fd, self.kid)
        finally:
            os.close(fd)
        os.close(os.open(self.file, os.O_WRONLY | os.O_CREAT, 0o644))

    @property
    def file(self) -> str:
        return os.path.join(self.dir, "file")

    def _note_error(self, e: OSError, ledger: AppendLedger | None = None) -> None:
        """ENOENT counts as refused: once the key is fully removed the kernel evicts the
        directory's dentries and the plaintext name no longer resolves (no-key names). An
        append's refusal is counted by ``RaceResult.settle``, once per append."""
        if e.errno == errno.EIO and ledger is not None:
            ledger.reported()  # the kernel's way of reporting lost writeback for this file
        elif e.errno not in REFUSALS or ledger is None:
            self.r.other_errors.append(f"{type(e).__name__}: {e}")

    def appender(self) -> Iterator[None]:
        """``echo -n X >> file``: open, write, close, one step each."""
        n = 0
        while True:
            self.r.attempted += 1
            chunk = bytes([0x41 + n % 26]) * self.r.append_size
            n += 1
            errors: list[OSError] = []
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_APPEND)
            except OSError as e:
                errors.append(e)
                self._note_error(e, self.ledger)
                self.r.settle(errors, REFUSALS)
                yield
                continue
            off = -1
            try:
                yield
                try:
                    if os.write(fd, chunk) != len(chunk):
                        raise OSError(errno.EIO, "short append")
                    off = os.lseek(fd, 0, os.SEEK_CUR) - len(chunk)
                except OSError as e:
                    errors.append(e)
                    self._note_error(e, self.ledger)
                yield
            except GeneratorExit:  # the race ended between open and close: nothing is acknowledged
                self.r.cut_off += 1
                raise
            finally:
                try:
                    os.close(fd)
                except OSError as e:
                    errors.append(e)
                    self._note_error(e, self.ledger)
            if self.r.settle(errors, REFUSALS):
                self.ledger.acked(off, chunk)
            yield

    def key_loop(self) -> Iterator[None]:
        while True:
            self._poll_wipe()
            add_key(self.keyfd, KEY)
            self.removed_at = None  # a re-add ends a pending removal, as in our modes
            yield
            try:
                t = time.monotonic()
                busy = remove_key(self.keyfd, self.kid) & KEY_REMOVAL_STATUS_FLAG_FILES_BUSY
                self.r.removals += 1
                if busy:
                    self.removed_at = t
                else:
                    self.delays.append(time.monotonic() - t)
            except OSError as e:
                self._note_error(e)
            yield

    def _poll_wipe(self) -> None:
        if self.removed_at is not None and key_status(self.keyfd, self.kid) == KEY_STATUS_ABSENT:
            self.delays.append(time.monotonic() - self.removed_at)
            self.removed_at = None

    def writeback(self) -> Iterator[None]:
        while True:
            syncfs(self.keyfd)
            yield

    def quiesce(self) -> None:
        """Everything closed: add the key back, then remove it so the kernel syncs and evicts
        the inodes (generic/595's close + drop_caches), and drop the caches."""
        self._poll_wipe()
        add_key(self.keyfd, KEY)
        remove_key(self.keyfd, self.kid)
        drop_caches()
        self.r.note_wipes(self.delays)

    def read_back(self) -> bytes:
        add_key(self.keyfd, KEY)
        with open(self.file, "rb") as f:
            return f.read()

    def close(self) -> None:
        try:
            shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            os.close(self.keyfd)


def why_not(directory: str | None) -> str | None:
    """None if the peer can run; else the one-line reason it cannot."""
    if directory is not None:
        if not os.path.isdir(directory):
            return f"{directory} is not a directory"
        return None
    if os.geteuid() != 0:
        return "not root: a loop-mounted ext4 image needs root (name a directory on an encryption-enabled filesystem instead)"
    missing = [t for t in ("losetup", "mkfs.ext4", "mount", "umount") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found (install util-linux, e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    return None


def _run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise Unavailable(f"{' '.join(cmd[:2])} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return p.stdout.strip()


@contextmanager
def ext4_mount(size_mb: int = 64) -> Iterator[tuple[str, "callable"]]:  # type: ignore[valid-type]
    """A fresh ext4 image with the encrypt feature, loop-mounted; yields (mountpoint, remount)."""
    with tempfile.TemporaryDirectory(prefix="blockemu-kpeer-") as tmp:
        img, mnt = os.path.join(tmp, "ext4.img"), os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        with open(img, "wb") as f:
            f.truncate(size_mb << 20)
        _run("mkfs.ext4", "-q", "-F", "-O", "encrypt", img)
        loop = _run("losetup", "--find", "--show", img)
        mounted = False
        try:
            _run("mount", "-t", "ext4", loop, mnt)
            mounted = True

            def remount() -> None:
                nonlocal mounted
                _run("umount", mnt)
                mounted = False
                _run("mount", "-t", "ext4", loop, mnt)
                mounted = True

            yield mnt, remount
        finally:
            if mounted:
                subprocess.run(["umount", mnt], capture_output=True)
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def run_kernel_race(directory: str | None = None, *, seed: int = 0, schedule: str = "seeded", steps: int = 2000,
                    duration: float = 2.0) -> RaceResult:
    """The race on the kernel, with the same schedule knobs as ``keyrace.run_race``.
    Raises ``Unavailable`` (one line) when the kernel cannot be driven here."""
    reason = why_not(directory)
    if reason:
        raise Unavailable(reason)
    result = RaceResult("kernel", seed, schedule)
    if directory is not None:
        _race(directory, None, result, seed, schedule, steps, duration)
    else:
        with ext4_mount() as (mnt, remount):
            _race(mnt, remount, result, seed, schedule, steps, duration)
    return result


def _race(mnt: str, remount, result: RaceResult, seed: int, schedule: str, steps: int,  # type: ignore[no-untyped-def]
          duration: float) -> None:
    try:
        race = KernelRace(mnt, result)
    except OSError as e:
        raise Unavailable(f"{mnt}: {e.strerror}") from None
    try:
        try:
            race.setup()
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                raise Unavailable(f"{mnt}: the filesystem does not support fscrypt v2 keys ({e.strerror})") from None
            raise
        rng = random.Random(seed)
        actors = [race.key_loop(), race.appender()]
        if schedule == "seeded":
            actors.append(race.writeback())
            for _ in range(steps):
                next(rng.choice(actors))
        else:
            _free_run(actors, duration)
        for a in actors:
            a.close()
        race.quiesce()
        if remount is not None:
            rel = os.path.relpath(race.file, mnt)
            os.close(race.keyfd)
            remount()
            race.keyfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            race.dir = os.path.dirname(os.path.join(mnt, rel))
        race.ledger.judge(race.read_back(), result)
    finally:
        race.close()


def _free_run(actors: list[Iterator[None]], duration: float) -> None:
    """Each actor on its own thread for ``duration``: real concurrency in the kernel, as generic/595's shell loops."""
    deadline = time.monotonic() + duration
    errors: list[BaseException] = []

    def drive(actor: Iterator[None]) -> None:
        try:
            while time.monotonic() < deadline:
                next(actor)
        except BaseException as e:  # surfaced below, on the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=drive, args=(a,)) for a in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
