from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from blockemu.engine.alloc import Allocator
from blockemu.engine.btree import BTree
from blockemu.engine.transaction import TreeStore

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FSID = bytes(range(16))


class MemoryImage:
    """Committed tree blocks as bytes, keyed by bytenr: the sans-I/O backing for B-tree tests.

    ``commit`` does what a real commit does to blocks (encode, publish, release pinned
    extents) so the tests exercise COW, encoding and re-reading, not a shortcut."""

    def __init__(self, nodesize: int, cache_blocks: int = 64) -> None:
        self.blocks: dict[int, bytes] = {}
        self.alloc = Allocator([(1 << 20, 1 << 34)])
        self.store = TreeStore(
            self.read, nodesize=nodesize, csum_type=0, fsid=FSID, transid=1, allocator=self.alloc, cache_blocks=cache_blocks
        )

    def read(self, bytenr: int, n: int) -> bytes:
        return self.blocks[bytenr]

    def new_tree(self, owner: int = 5) -> BTree:
        root = self.store.new_block(owner, 0)
        return BTree(self.store, owner, root.bytenr, 0)

    def commit(self) -> None:
        for bytenr, data in self.store.encode_dirty():
            self.blocks[bytenr] = data
        for bytenr in self.store.freed_blocks:
            # overwrite freed blocks with garbage once unpinned: any stale reference would fail loudly
            self.blocks[bytenr] = b"\xff" * self.store.nodesize
        self.store.end_transaction()
        self.alloc.seal_pins()
        self.alloc.unpin_sealed()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A private ``BLOCKEMU_RUNTIME_DIR`` (not yet made: the server makes it) with a short path.
    Not under ``tmp_path``: a socket address holds 107 bytes, and under pytest-xdist a test's
    ``tmp_path`` (/tmp/pytest-of-root/pytest-N/popen-gw0/<test name>0/) leaves too few for the
    socket's 37. blockemu's own runtime directories are short (/run/blockemu, $XDG_RUNTIME_DIR)."""
    parent = tempfile.mkdtemp(prefix="be-")
    try:
        yield Path(parent) / "run"
    finally:
        shutil.rmtree(parent, ignore_errors=True)
