"""Errors are OSError subclasses carrying the real errno, so callers can treat
the emulated filesystem exactly like a kernel one (``except OSError as e: e.errno``).

Where Python has a built-in OSError subclass for the errno (FileNotFoundError for
ENOENT, FileExistsError, IsADirectoryError, ...), the error derives from it too, so
``except FileNotFoundError`` works as it does around ``os`` and aiofiles calls.
``OSError(errno, msg)`` picks that subclass only when OSError itself is constructed,
so each class names its built-in base explicitly; tests/test_errors.py checks that
every class has the base ``OSError(code, ...)`` would have chosen. Errnos without one
(ENOKEY, ENOSPC, EIO, EUCLEAN, EBUSY, ...) stay plain OSErrors with that errno, as the
kernel returns them."""
from __future__ import annotations

import errno
import os


class BlockemuError(OSError):
    """Base: every error we raise on purpose. ``str()`` is the one line the CLI prints."""

    code = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def restate(err: OSError, text: str) -> OSError:
    """A fresh error of ``err``'s class and errno saying ``text``: writeback reports one dropped
    run's error to several callers (the file's fsync or close, a sync), each with its own words,
    and a raised exception must not be shared between them (its traceback grows with each raise)."""
    return type(err)(text) if isinstance(err, BlockemuError) else OSError(err.errno, text)


class CorruptionError(BlockemuError):
    """The image contradicts its own format (EUCLEAN, as the kernel's tree-checker).

    ``kind`` is the fsck error class (DESIGN §6) so the checker reports what the
    decoder found without re-deriving it.
    """

    code = errno.EUCLEAN

    def __init__(self, message: str, kind: str = "BAD_TREE_BLOCK", bytenr: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.bytenr = bytenr


class FreeSpaceDamage(CorruptionError):
    """The free-space record does not read, or contradicts the extent tree: only a cache of it,
    which ``fsck --repair`` rebuilds -- its message names that way out, so an open that says
    where to go after a damaged committed tree (``volume.damaged_root``) leaves it as it is."""


class DeviceIOError(BlockemuError):
    """The (emulated) device failed an I/O, e.g. an injected fault or a power cut."""

    code = errno.EIO


class ChecksumError(DeviceIOError):
    """Data read back failed its checksum: EIO, as a disk's bit rot gives. Its own class so a
    run with injected bit flips can tell corruption detected apart from data silently wrong."""


class NoSpaceError(BlockemuError):
    code = errno.ENOSPC


class NoKeyError(BlockemuError):
    code = errno.ENOKEY


class NotFoundError(BlockemuError, FileNotFoundError):
    code = errno.ENOENT


class ExistsError(BlockemuError, FileExistsError):
    code = errno.EEXIST


class InvalidArgument(BlockemuError):
    code = errno.EINVAL


class IsADirectory(BlockemuError, IsADirectoryError):
    code = errno.EISDIR


class NotADirectory(BlockemuError, NotADirectoryError):
    code = errno.ENOTDIR


class NotEmpty(BlockemuError):
    code = errno.ENOTEMPTY


class CrossDevice(BlockemuError):
    """EXDEV: fscrypt refuses to mix policies by rename or link."""

    code = errno.EXDEV


class BadFile(BlockemuError):
    code = errno.EBADF


class NameTooLong(BlockemuError):
    code = errno.ENAMETOOLONG


class Busy(BlockemuError):
    code = errno.EBUSY


class ImageInUse(Busy):
    """Another open holds the image's lock (device/imagelock.py): EBUSY, as mounting a busy
    device. Not EAGAIN: nothing here is worth retrying at once; the holder has to let go."""

    def __init__(self, path: str, pid: int | None, *, writing: bool) -> None:
        who = "another process" if pid is None else "this process" if pid == os.getpid() else f"pid {pid}"
        how = "mounted or open for writing" if writing else "open for reading"
        super().__init__(f"{path}: image is in use by {who} ({how}); one writer per image")
        self.path, self.pid, self.writing = path, pid, writing


class ReadOnlyError(BlockemuError):
    """A change asked of an image opened read-only (EROFS)."""

    code = errno.EROFS


class PermissionDenied(BlockemuError, PermissionError):
    code = errno.EACCES


class FileTooBig(BlockemuError):
    """EFBIG: a file may not grow past MAX_FILE_SIZE (fsck rejects a larger i_size)."""

    code = errno.EFBIG


class NotPermitted(BlockemuError, PermissionError):
    """EPERM: the operation is not allowed on this kind of file (a hard link to a directory)."""

    code = errno.EPERM


class SymlinkLoop(BlockemuError):
    """ELOOP: a path ends at a symbolic link where a file was wanted (the API never follows one)."""

    code = errno.ELOOP


class TooManyLinks(BlockemuError):
    """EMLINK: a file has the most names it may (65,535, btrfs's BTRFS_LINK_MAX), or -- on an
    image without extended references -- its names in one directory fill the INODE_REF item
    that holds them (btrfs without extended refs says the same)."""

    code = errno.EMLINK


class NameOverflow(BlockemuError):
    """EOVERFLOW: names whose hashes collide fill the DIR_ITEM that holds them, as btrfs's
    insert_with_overflow says."""

    code = errno.EOVERFLOW
