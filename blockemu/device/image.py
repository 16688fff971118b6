"""Read-only access to an image without an event loop (fsck, inspect, tests).

Opens the file, finds a superblock and builds a read-only ``Engine`` over
``os.pread``: the same tree code the mounted filesystem runs, minus I/O.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from blockemu.device.imagelock import open_image
from blockemu.errors import CorruptionError, ReadOnlyError
from blockemu.ondisk.structs import COMPAT_RO_SUPPORTED, INCOMPAT_SUPPORTED, MAGIC, SUPER_INFO_SIZE, SUPER_OFFSETS
from blockemu.ondisk.superblock import SuperInfo, decode_super


def too_small(path: str, size: int) -> CorruptionError | None:
    """A file that cannot hold the primary superblock is no image, nor anything fsck could
    restore (the mirrors lie further on): one text for every command that opens one."""
    if size < SUPER_OFFSETS[0] + SUPER_INFO_SIZE:
        return CorruptionError(f"{path}: too small to be a blockemu image ({size} bytes)", "BAD_MAGIC")
    return None


def unsupported(path: str, sb: SuperInfo) -> CorruptionError | None:
    """An image with incompat features this blockemu does not know (SPEC: a reader must refuse
    them): one text for every command, fsck's and rescue's too -- fsck called such an image clean,
    exit 0, that ls, cat and put refused."""
    if unknown := sb.incompat_flags & ~INCOMPAT_SUPPORTED:
        return CorruptionError(f"{path}: unknown incompat features {unknown:#x}; a newer blockemu made this image",
                               "SUPERBLOCK")
    return None


def read_only_features(path: str, sb: SuperInfo) -> ReadOnlyError | None:
    """An image with compat_ro features this blockemu does not know may be read, never written
    (SPEC "Feature bits"; btrfs mounts such an image read-only only): one text for every command
    that would write it -- a mount, put, run, stress, fsck --repair, rescue."""
    if unknown := sb.compat_ro_flags & ~COMPAT_RO_SUPPORTED:
        return ReadOnlyError(f"{path}: unknown compat_ro features {unknown:#x}; a newer blockemu made this image, "
                             f"which this one may read (ls, cat, extents, inspect, fsck) but not write")
    return None


def not_blockemu(path: str) -> CorruptionError:
    """No superblock copy bears the magic: one text for every command (fsck said "no superblock
    magic", the others "superblock at 65536: bad magic, not a blockemu image")."""
    return CorruptionError(f"{path}: not a blockemu image (no superblock magic)", "BAD_MAGIC")


def bad_primary(path: str, error: CorruptionError, size: int, read: Callable[[int], bytes]) -> CorruptionError:
    """The error for a primary superblock that does not decode (``error``), for the commands
    that read only the primary: naming a sound mirror and the command that restores the primary
    from it ("checksum mismatch" alone left the user without the fix fsck had); and, when no
    mirror bears the magic either, a file that is no image. ``read(at)`` reads the copy at ``at``."""
    mirrors = super_copies(size, read, SUPER_OFFSETS[1:])
    if sound := next((c for c in mirrors if c.info is not None), None):
        return CorruptionError(f"{path}: {error}; the mirror at {sound.offset} is sound: `blockemu fsck --repair {path}` "
                               "restores it", error.kind, error.bytenr)
    magic = any(e.kind != "BAD_MAGIC" for e in (error, *(c.error for c in mirrors)) if e is not None)
    return CorruptionError(f"{path}: {error}", error.kind, error.bytenr) if magic else not_blockemu(path)


def truncated(sb: SuperInfo, size: int) -> str | None:
    """Why an image file of ``size`` bytes cannot hold what its superblock describes, if it cannot."""
    if sb.total_bytes > size:
        return f"image truncated: superblock says {sb.total_bytes} bytes, file has {size}"
    return None


@dataclass
class SuperCopy:
    offset: int
    raw: bytes
    info: SuperInfo | None = None
    error: CorruptionError | None = None


def super_copies(size: int, read: Callable[[int], bytes], offsets: tuple[int, ...] = SUPER_OFFSETS) -> list[SuperCopy]:
    """The superblock copies at ``offsets`` that fit in an image of ``size`` bytes, each decoded
    or with the reason it does not (``read(at)`` reads the copy at ``at``)."""
    copies = []
    for at in offsets:
        if at + SUPER_INFO_SIZE > size:
            break
        copy = SuperCopy(at, read(at))
        try:
            copy.info = decode_super(copy.raw, at)
        except CorruptionError as e:
            copy.error = e
        copies.append(copy)
    return copies


@dataclass
class ImageFile:
    """An image opened for reading; ``read`` never returns past the end silently."""

    path: str
    fd: int
    size: int
    supers: list[SuperCopy] = field(default_factory=list)

    @classmethod
    def open(cls, path: str) -> "ImageFile":
        fd = open_image(path, readonly=True)
        try:
            img = cls(path, fd, os.fstat(fd).st_size)
            img.supers = super_copies(img.size, lambda at: os.pread(fd, SUPER_INFO_SIZE, at))
        except BaseException:  # a read error (EIO): an int descriptor is closed by nobody else
            os.close(fd)
            raise
        return img

    def is_blockemu(self) -> bool:
        return any(c.raw[0x40:0x48] == MAGIC for c in self.supers)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise CorruptionError(f"read [{offset}, +{length}) beyond the image end {self.size}", "BAD_BLOCKPTR", offset)
        return os.pread(self.fd, length, offset)

    def best_super(self) -> SuperInfo:
        """The primary if valid; a mirror otherwise (newest generation first). Raises if none is usable."""
        if small := too_small(self.path, self.size):
            raise small
        if not self.is_blockemu():
            raise not_blockemu(self.path)
        good = [c for c in self.supers if c.info is not None]
        if not good:
            raise CorruptionError(f"{self.path}: no valid superblock: {self.supers[0].error}", "SUPERBLOCK")
        if good[0].offset == SUPER_OFFSETS[0]:
            return good[0].info  # type: ignore[return-value]
        return max(good, key=lambda c: c.info.generation).info  # type: ignore[union-attr]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
