"""fio's ``disk_util`` for a run: the one disk its jobs' files live on, the image, counted as fio
counts a block device from ``/sys/block/<dev>/stat``.

The emulated device counts its requests as the kernel does (``DeviceStats``), across the run's
mounts (a ``kind=fsck`` job unmounts and mounts again), so the fields mean what fio's do --
``write_ios`` counts FUA writes with the others, ``in_queue`` adds every request's time, flushes
and discards included, ``util`` is the share of the run some request was in flight -- but for
``read_merges`` and ``write_merges``, which are always 0: the device has no I/O scheduler to
merge requests (the write path merges contiguous extents into one write before it issues it).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from blockemu.device.blockdev import OPS, DeviceStats


@dataclass
class DiskUtil:
    image: str
    devices: list[DeviceStats] = field(default_factory=list)  # each mount's, once unmounted
    started: float | None = None  # the run's first mount: util is over the time from it to the last unmount
    ended: float = 0.0

    def mounted(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def unmounted(self, stats: DeviceStats) -> None:
        """A mount's device, unmounted (or not: an unmount that failed is tried again)."""
        if all(s is not stats for s in self.devices):
            self.devices.append(stats)
        self.ended = time.perf_counter()

    def as_json(self) -> list[dict[str, Any]]:
        """fio's ``disk_util`` list: empty if the run never got to unmount the image."""
        if self.started is None or not self.devices:
            return []
        ops = {op: sum(d.ops[op] for d in self.devices) for op in OPS}
        ms = {op: int(sum(d.seconds[op] for d in self.devices) * 1000) for op in OPS}
        run = self.ended - self.started
        busy = sum(d.busy_seconds() for d in self.devices)
        return [{"name": os.path.basename(self.image), "read_ios": ops["read"], "write_ios": ops["write"] + ops["fua"],
                 "read_merges": 0, "write_merges": 0, "read_ticks": ms["read"], "write_ticks": ms["write"] + ms["fua"],
                 "in_queue": sum(ms.values()), "util": min(100.0, 100 * busy / run) if run > 0 else 0.0}]

    def text(self) -> list[str]:
        """fio's normal output's last lines, ``Disk stats (read/write):`` and a line per disk (fio's
        ``print_disk_util``), from ``as_json``'s values: the two forms cannot disagree. Nothing if
        the run never got to unmount the image, as fio prints nothing without disk stats."""
        disks = self.as_json()
        return ["Disk stats (read/write):"] * bool(disks) + [
            f"  {d['name']}: ios={d['read_ios']}/{d['write_ios']}, merge={d['read_merges']}/{d['write_merges']}, "
            f"ticks={d['read_ticks']}/{d['write_ticks']}, in_queue={d['in_queue']}, util={d['util']:3.2f}%"
            for d in disks]
