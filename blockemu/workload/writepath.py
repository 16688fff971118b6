"""Which write path a campaign's filesystem runs, and how large its workloads write.

``production`` is what a default mount does with big encrypted files: sealing
worker processes encrypt extents of up to 1 MiB out of the shared page arena.
Its workloads write into encrypted directories, with data sizes scaled so runs
pass the sealer's pool threshold and fill whole 1 MiB extents -- otherwise a
production mount would still seal every small run in a thread and the worker
path would go untested -- on an image of mkfs's default 16 KiB tree blocks, whose
torn writes (a block lands a sector at a time) only a node larger than a sector shows.
``fast`` is the quick setting (16 KiB extents, sealing in a thread, small plain
files, 4 KiB tree blocks: deeper trees from fewer items): many more crash states per
second, but it never reaches the workers.
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
    node_size: str  # the image's tree block size (mkfs's)

    def mount_options(self) -> dict[str, Any]:
        return {"max_extent": self.max_extent, "seal_workers": self.seal_workers}


KEY = bytes(range(0x40, 0x80))  # the campaigns' master key: crash states are read back with it
# at least two workers even on one core: with fewer, every extent seals in a thread
PRODUCTION = WritePath("production", 1 << 20, max(2, os.cpu_count() or 1), encrypt=True, scale=256, node_size="16K")
FAST = WritePath("fast", 16 << 10, 0, encrypt=False, scale=1, node_size="4K")
WRITE_PATHS = {p.name: p for p in (PRODUCTION, FAST)}
