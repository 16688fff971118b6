"""blockemu: an asyncio block-device emulator holding a btrfs-like, encrypted,
copy-on-write filesystem in a disk image. See DESIGN.md §8 for the API.

The API's names are imported when first used (PEP 562): importing any part of the
package -- the ``blockemu`` command's ``fsck`` above all -- then costs only that part."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockemu.check.fsck import FsckReport, fsck
    from blockemu.device.faultplan import FaultPlan
    from blockemu.device.writelog import CrashState, WriteLog
    from blockemu.errors import BlockemuError, CorruptionError, DeviceIOError, NoKeyError, NoSpaceError
    from blockemu.fs.filesystem import File, Filesystem, mount
    from blockemu.fs.mkfs import mkfs

__version__ = "0.1.0"
__all__ = ["mkfs", "mount", "fsck", "Filesystem", "File", "FsckReport", "FaultPlan", "WriteLog", "CrashState", "BlockemuError", "CorruptionError", "DeviceIOError", "NoKeyError", "NoSpaceError"]

# each name of the API -> the module that defines it
_HOME = {"fsck": "blockemu.check.fsck", "FsckReport": "blockemu.check.fsck", "mkfs": "blockemu.fs.mkfs",
         "FaultPlan": "blockemu.device.faultplan",
         **dict.fromkeys(("WriteLog", "CrashState"), "blockemu.device.writelog"),
         **dict.fromkeys(("mount", "Filesystem", "File"), "blockemu.fs.filesystem"),
         **dict.fromkeys(("BlockemuError", "CorruptionError", "DeviceIOError", "NoKeyError", "NoSpaceError"),
                         "blockemu.errors")}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'blockemu' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The API, the module's dunders and the subpackages imported so far -- not the names this
    file imports for itself (``Any``, ``TYPE_CHECKING``, ``import_module``, ``annotations``),
    which a user's ``dir(blockemu)`` listed as if they were the API's."""
    own = {n for n, v in globals().items() if n.startswith("__") or getattr(v, "__name__", "").startswith(__name__ + ".")}
    return sorted(own | set(__all__))
