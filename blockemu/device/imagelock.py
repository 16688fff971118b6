"""One writer per image: a lock on the image file, taken where the file is opened.

Two processes writing one image destroy it: each commits trees built from its own
view of the free space, so each overwrites the other's blocks. Every open of an
image therefore locks it (``open_image``): read-write opens (mount, mkfs, put,
mkdir, fsck --repair, run, stress) take an exclusive lock; read-only opens (ls,
cat, extents, inspect, fsck) a shared one. Readers are *refused* while a writer
holds the image, and a writer while readers do, rather than reading the last
committed generation: a committed generation stays intact only until the writer's
next commit frees its blocks for reuse, so a long read (fsck of a large image)
could not rely on it.

The locks are Linux open file description (OFD) locks: owned by the open file,
not the process, so two opens in one process conflict too (two mounts of one
image in one program are refused as well), closing some other descriptor of the
file does not drop them (classic POSIX locks' trap), and the kernel releases them
when the process dies, however it dies: a crash never leaves a stale lock.

F_OFD_GETLK reports no pid for an OFD lock (l_pid is -1), so each holder also
locks one byte at ``PID_BASE + its pid``: the conflicting lock that F_OFD_GETLK
finds in that range names the holder by its offset. The bytes lie far beyond any
image's end; locks do not need the bytes to exist.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from blockemu.errors import ImageInUse, InvalidArgument, IsADirectory, NotFoundError, PermissionDenied, ReadOnlyError

# struct flock as Linux lays it out on 64-bit machines: l_type, l_whence, l_start, l_len, l_pid
FLOCK = struct.Struct("hhqqi4x")
PID_BASE = 1 << 40
PID_SPAN = 1 << 22  # the largest pid_max Linux allows


def _fcntl(fd: int, cmd: int, kind: int, start: int, length: int) -> tuple[int, int, int, int, int]:
    return FLOCK.unpack(fcntl.fcntl(fd, cmd, FLOCK.pack(kind, os.SEEK_SET, start, length, 0)))


def lock_image(fd: int, path: str, *, exclusive: bool) -> None:
    """Lock the open image, or raise ImageInUse (EBUSY) naming the holder."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        _fcntl(fd, fcntl.F_OFD_SETLK, kind, 0, 1)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise holder(fd, path) from None
    _fcntl(fd, fcntl.F_OFD_SETLK, kind, PID_BASE + os.getpid(), 1)


def holder(fd: int, path: str) -> ImageInUse:
    """The error for a lock refused on ``fd``: who holds the image, and how."""
    held, *_ = _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, 0, 1)
    found, _, start, _, _ = _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PID_BASE, PID_SPAN)
    # a holder between its two locks has no pid byte yet; one that just let go, neither
    pid = start - PID_BASE if found != fcntl.F_UNLCK else None
    return ImageInUse(path, pid, writing=held != fcntl.F_RDLCK)


def open_image(path: str, readonly: bool, *, create: bool = False) -> int:
    """The image's file descriptor, locked (as above: exclusive for read-write, shared for
    read-only), or one clear error naming the image. A read-only open needs only read permission
    (a 0444 image). ``create``: make the file if it is missing (mkfs), and lock it before the
    caller writes anything, so an image another process holds is never touched."""
    # O_NONBLOCK: a read-only open of a FIFO waits for a writer (fsck of one hung for ever); on
    # a regular file the flag changes nothing, and the descriptor is checked to be one below
    flags = (os.O_RDONLY if readonly else os.O_RDWR | (os.O_CREAT if create else 0)) | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectory(f"{path}: is a directory") from None
    except PermissionError:
        raise PermissionDenied(f"{path}: permission denied" + ("" if readonly else " (opening it for writing)")) from None
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise ReadOnlyError(f"{path}: read-only file system (opening it for writing)") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # O_RDONLY opens a directory without complaint
            raise IsADirectory(f"{path}: is a directory")
        if not stat.S_ISREG(mode):  # a FIFO, a device: no size to read, and ftruncate says only EINVAL
            raise InvalidArgument(f"{path}: not a regular file (a blockemu image is a file)")
        os.set_blocking(fd, True)
        # writers exclusive, readers shared: a reader is refused while a writer holds the image
        # rather than served its last committed generation, whose blocks the writer's next
        # commit may reuse (imagelock.py, README "One writer per image")
        lock_image(fd, path, exclusive=not readonly)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync_parent(path: str) -> None:
    """Make a newly created image's name durable: an image file's own syncs make its contents
    durable, not the directory entry naming it, so a host crash after mkfs could leave no file
    (fsync(2): "an explicit fsync() on a file descriptor for the directory is also needed")."""
    fd = os.open(os.path.dirname(os.path.realpath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
