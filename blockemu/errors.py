"""Errors are OSError subclasses carrying the real errno, so callers can treat
the emulated filesystem exactly like a kernel one (``except OSError as e: e.errno``)."""
from __future__ import annotations

import errno


class BlockemuError(OSError):
    """Base: every error we raise on purpose. ``str()`` is the one line the CLI prints."""

    code = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


class DeviceIOError(BlockemuError):
    """The (emulated) device failed an I/O, e.g. an injected fault or a power cut."""

    code = errno.EIO


class NoSpaceError(BlockemuError):
    code = errno.ENOSPC


class NoKeyError(BlockemuError):
    code = errno.ENOKEY


class NotFoundError(BlockemuError):
    code = errno.ENOENT


class ExistsError(BlockemuError):
    code = errno.EEXIST


class InvalidArgument(BlockemuError):
    code = errno.EINVAL


class IsADirectory(BlockemuError):
    code = errno.EISDIR


class NotADirectory(BlockemuError):
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
