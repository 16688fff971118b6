"""blockemu: an asyncio block-device emulator holding a btrfs-like, encrypted,
copy-on-write filesystem in a disk image. See DESIGN.md §8 for the API."""
from blockemu.check.fsck import FsckReport, fsck
from blockemu.errors import BlockemuError, CorruptionError, DeviceIOError, NoKeyError, NoSpaceError
from blockemu.fs.filesystem import File, Filesystem, mount
from blockemu.fs.mkfs import mkfs

__version__ = "0.1.0"
__all__ = ["mkfs", "mount", "fsck", "Filesystem", "File", "FsckReport", "BlockemuError", "CorruptionError", "DeviceIOError", "NoKeyError", "NoSpaceError"]
