"""Which write path a campaign's filesystem runs, and how large its workloads write.

``production`` is what a default mount does with big encrypted files: sealing
worker processes encrypt extents of up to 1 MiB out of the shared page arena.
Its workloads write into encrypted directories, with data sizes scaled so runs
pass the sealer's pool threshold and fill whole 1 MiB extents -- otherwise a
production mount would still seal every small run in a thread and the worker
path would go untested. ``fast`` is the quick setting (16 KiB extents, sealing
in a thread, small plain files): many more crash states per second, but it
never reaches the workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WritePath:
    name: str
    max_extent: int
    seal_workers: int
    encrypt: bool  # workloads write into directories encrypted with KEY
    scale: int  # data sizes of a workload's writes are multiplied by this

    def mount_options(self) -> dict[str, Any]:
        return {"max_extent": self.max_extent, "seal_workers": self.seal_workers}


KEY = bytes(range(0x40, 0x80))  # the campaigns' master key: crash states are read back with it
# at least two workers even on one core: with fewer, every extent seals in a thread
PRODUCTION = WritePath("production", 1 << 20, max(2, os.cpu_count() or 1), encrypt=True, scale=256)
FAST = WritePath("fast", 16 << 10, 0, encrypt=False, scale=1)
WRITE_PATHS = {p.name: p for p in (PRODUCTION, FAST)}
