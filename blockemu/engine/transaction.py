"""The block cache, copy-on-write bookkeeping and the commit protocol. No asyncio and no
file of its own: a block missing from the cache comes from the ``read`` callable its owner
passes in (a synchronous pread, DESIGN.md §2).

Theory of operation. There is one running transaction, ``transid`` = the last
committed generation + 1. Every block COWed, allocated or freed during it is
recorded in ``TreeStore``. A commit then:

1. *converges* the self-describing trees: the extent tree gets a METADATA_ITEM
   for every block allocated and loses the one of every block freed; the root
   tree's ROOT_ITEMs follow every tree's new root; the free-space tree is
   rewritten to equal the allocator's free extents once the pinned ones are
   released. Each of these changes may COW more blocks, so the three steps
   repeat until a round changes nothing (a block COWed once is changed in
   place afterwards, so this ends within a few rounds);
2. encodes the dirty blocks and ends the transaction (``prepare_commit``): the
   next one starts at once, and a block it changes is COWed again, the committing
   transaction's pins sealed apart from its own; the caller writes the blocks,
   flushes, writes the superblock with FUA, writes the mirrors, flushes;
3. once the primary superblock is durable, ``committed`` makes it the image's; once the
   mirrors are written and flushed too, ``finish_commit`` releases the committed
   transaction's pins: only now may the blocks of the previous generation be overwritten.

A crash before the superblock's FUA completes leaves the previous generation,
whose blocks nothing has overwritten; after it, the new one.
"""
from __future__ import annotations

from collections import OrderedDict
from operator import attrgetter
from typing import Callable

from sortedcontainers import SortedDict

from blockemu.engine.alloc import Allocator, no_space
from blockemu.engine.batch import in_key_order
from blockemu.engine.btree import BTree, KeyT, Must
from blockemu.engine.pending import PendingTrees
from blockemu.errors import CorruptionError, FreeSpaceDamage, ReadOnlyError
from blockemu.ondisk.block import TreeBlock, decode_block, encode_block
from blockemu.ondisk.csum import csum_size
from blockemu.ondisk.items import ExtentItem, FileExtent, RootItem
from blockemu.ondisk.structs import (
    CSUM_TREE_OBJECTID,
    EXTENT_FLAG_TREE_BLOCK,
    EXTENT_TREE_OBJECTID,
    FREE_SPACE_EXTENT,
    FREE_SPACE_TREE_OBJECTID,
    FS_TREE_OBJECTID,
    INCOMPAT_LOG_BITS,
    METADATA_ITEM,
    NUM_BACKUP_ROOTS,
    RESERVED_START,
    ROOT_ITEM,
    ROOT_TREE_OBJECTID,
    SECTOR_SIZE,
    SUPER_OFFSETS,
)
from blockemu.ondisk.superblock import SuperInfo

ReadFn = Callable[[int, int], bytes]
# Trees other than the root tree, each found through its ROOT_ITEM.
SUBTREES = (EXTENT_TREE_OBJECTID, FS_TREE_OBJECTID, CSUM_TREE_OBJECTID, FREE_SPACE_TREE_OBJECTID)
BACKUP_NAMES = {
    ROOT_TREE_OBJECTID: "tree_root",
    EXTENT_TREE_OBJECTID: "extent_root",
    FS_TREE_OBJECTID: "fs_root",
    CSUM_TREE_OBJECTID: "csum_root",
    FREE_SPACE_TREE_OBJECTID: "free_space_root",
}
MIRROR_RESERVE = 1 << 20
# The metadata reserve (btrfs's global reserve), in leaf paths per tree. Tree blocks and data
# share one pool, so without a reserve data could take the last free bytes and leave a full
# filesystem unable even to delete: an unlink COWs the paths to the items it removes (fs,
# extent and csum trees; the freed extents stay pinned until the commit) and its commit COWs
# the extent, root and free-space trees again. Each path costs a tree's height in new blocks,
# a split one more per level -- btrfs reserves nodesize x BTRFS_MAX_LEVEL x 2 per item; we
# use the trees' real heights, small here. A few paths per tree cover a delete of several
# files and its commit (a block is COWed once per transaction, and a delete's items cluster
# by inode). Measured on full images: deleting 5 files, or all 38 of a 32 MiB image (138 of
# 48 MiB), in one commit allocates 5 to 8 new tree blocks; the reserve then holds 40 to 56
# (3% of 32 MiB at 16 KiB nodes).
RESERVE_PATHS = 4
_LEVEL = attrgetter("level")


def usable_ranges(total_bytes: int) -> list[tuple[int, int]]:
    """The allocatable space: all but the first MiB and a MiB at each superblock mirror."""
    end = total_bytes - total_bytes % SECTOR_SIZE
    out, pos = [], RESERVED_START
    for off in SUPER_OFFSETS[1:]:
        if off >= end:
            break
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + MIRROR_RESERVE)
    if end > pos:
        out.append((pos, end - pos))
    return out


class TreeStore:
    """Owns every TreeBlock in memory: an LRU of clean blocks and the dirty ones of the running transaction."""

    def __init__(
        self,
        read: ReadFn,
        *,
        nodesize: int,
        csum_type: int,
        fsid: bytes,
        transid: int,
        allocator: Allocator | None = None,
        cache_blocks: int = 4096,
        verify_csum: bool = True,
    ) -> None:
        self.read = read
        self.nodesize = nodesize
        self.csum_type = csum_type
        self.fsid = fsid
        self.transid = transid
        self.allocator = allocator
        # tree blocks of room each new block must leave: 0 (trees may use the metadata reserve),
        # but the fsync log's store sets what it may not take (``TreeLog._keep``)
        self.keep = 0
        self.cache_blocks = cache_blocks
        self.verify_csum = verify_csum
        self.clean: OrderedDict[int, TreeBlock] = OrderedDict()
        self.dirty: dict[int, TreeBlock] = {}
        self.new_blocks: dict[int, tuple[int, int]] = {}  # bytenr -> (owner, level), allocated this transaction
        self.freed_blocks: dict[int, tuple[int, int]] = {}  # committed blocks freed this transaction
        # the blocks of a commit whose writes may not have landed: read from here, never from
        # the disk, should the clean cache let them go meanwhile
        self.unwritten: dict[int, TreeBlock] = {}
        # told of every tree change (see ``cow``): how the volume knows which participant of
        # the transaction changed something
        self.on_change: Callable[[], None] | None = None

    @classmethod
    def reader(cls, read: ReadFn, sb: SuperInfo, transid: int | None = None) -> "TreeStore":
        """A store that only reads ``sb``'s trees, caching no block (a walk reads each once):
        fsck's walk, dump-super's look at the backup roots, the fsync log's trees (``transid``:
        the log's; else the transaction after ``sb``'s)."""
        return cls(read, nodesize=sb.nodesize, csum_type=sb.csum_type, fsid=sb.fsid,
                   transid=sb.generation + 1 if transid is None else transid, cache_blocks=0)

    def get(self, bytenr: int, *, generation: int | None = None, level: int | None = None, owner: int | None = None) -> TreeBlock:
        block = self.dirty.get(bytenr)
        if block is None:
            block = self.clean.get(bytenr)
            if block is None:
                block = self.unwritten.get(bytenr)
                if block is None:
                    block = self._load(bytenr)
                self.clean[bytenr] = block
                if len(self.clean) > self.cache_blocks:
                    self.clean.popitem(last=False)
            else:
                self.clean.move_to_end(bytenr)
        if generation is not None and block.generation != generation:
            raise CorruptionError(
                f"tree block {bytenr}: parent transid verify failed, wanted {generation} found {block.generation}",
                "TRANSID_MISMATCH",
                bytenr,
            )
        if level is not None and block.level != level:
            raise CorruptionError(f"tree block {bytenr}: level {block.level}, expected {level}", "BAD_TREE_BLOCK", bytenr)
        if owner is not None and block.owner != owner:
            raise CorruptionError(f"tree block {bytenr}: owner {block.owner}, expected {owner}", "BAD_TREE_BLOCK", bytenr)
        return block

    def _load(self, bytenr: int) -> TreeBlock:
        block = decode_block(
            self.read(bytenr, self.nodesize),
            bytenr=bytenr,
            nodesize=self.nodesize,
            csum_type=self.csum_type,
            fsid=self.fsid,
            verify_csum=self.verify_csum,
        )
        if self.allocator is not None and self.allocator.overlaps_free(bytenr, self.nodesize):
            # a commit would hand this space out again and overwrite the block
            raise FreeSpaceDamage(f"tree block {bytenr} lies in space the free-space record calls free; "
                                  f"run blockemu fsck --repair", "FREE_SPACE_MISMATCH", bytenr)
        return block

    def _need_allocator(self) -> Allocator:
        if self.allocator is None:
            raise ReadOnlyError("read-only file system: the image is open read-only")
        return self.allocator

    def new_block(self, owner: int, level: int) -> TreeBlock:
        bytenr = self._need_allocator().alloc(self.nodesize, keep=self.keep)
        block = TreeBlock(bytenr=bytenr, generation=self.transid, owner=owner, level=level)
        self.dirty[bytenr] = block
        self.new_blocks[bytenr] = (owner, level)
        return block

    def cow(self, block: TreeBlock, *, note: bool = True) -> TreeBlock:
        """``block`` made writable: itself if already written this transaction, else a copy in
        a new block. Every tree change starts here, with its root, so here it is reported to
        ``on_change`` -- once the copy exists: a change whose first COW fails (ENOSPC) has
        changed nothing. The blocks below the root (``note=False``) are part of a change the
        root's COW reported already: an apply COWs dozens, and telling the volume of each was
        a percent of an fsync's CPU. Read-only (no allocator) refuses even a block already
        dirty: a read-only mount's log replay leaves dirty blocks in memory that nothing may change."""
        self._need_allocator()
        if block.bytenr not in self.dirty:
            new = self.new_block(block.owner, block.level)
            new.keys = list(block.keys)
            new.values = list(block.values)
            new.ptrs = list(block.ptrs)
            new.used = block.used
            self.free_block(block)
            block = new
        if note and self.on_change is not None:
            self.on_change()
        return block

    def free_block(self, block: TreeBlock) -> None:
        alloc = self._need_allocator()
        if self.dirty.pop(block.bytenr, None) is not None:
            # never durable: reusable at once
            del self.new_blocks[block.bytenr]
            alloc.release(block.bytenr, self.nodesize)
        else:
            self.clean.pop(block.bytenr, None)
            self.freed_blocks[block.bytenr] = (block.owner, block.level)
            alloc.pin(block.bytenr, self.nodesize)

    def encode_dirty(self) -> list[tuple[int, bytes]]:
        return [
            (b.bytenr, encode_block(b, nodesize=self.nodesize, csum_type=self.csum_type, fsid=self.fsid))
            for b in sorted(self.dirty.values(), key=lambda b: b.bytenr)
        ]

    def mark_written(self) -> None:
        """The dirty blocks are on disk: later changes COW them (and pin the old copies)."""
        for bytenr, block in self.dirty.items():
            self.clean[bytenr] = block
        while len(self.clean) > self.cache_blocks:
            self.clean.popitem(last=False)
        self.dirty.clear()
        self.new_blocks.clear()
        self.freed_blocks.clear()

    def end_transaction(self) -> None:
        """The transaction's blocks are encoded and go to the disk: the next transaction starts
        now and COWs them (``written`` says when they have landed)."""
        self.unwritten = dict(self.dirty)
        self.mark_written()
        self.transid += 1

    def written(self) -> None:
        """The ended transaction's blocks are on the disk: a block the cache lets go is read back."""
        self.unwritten = {}


class Engine:
    """The trees of one image and their commit protocol. Opened read-only (fsck,
    inspect) it loads no allocator and cannot change anything."""

    def __init__(self, sb: SuperInfo, read: ReadFn, *, writable: bool, verify_csum: bool = True,
                 rebuild_free_space: bool = False) -> None:
        self.sb = sb
        self.store = TreeStore(
            read, nodesize=sb.nodesize, csum_type=sb.csum_type, fsid=sb.fsid, transid=sb.generation + 1, verify_csum=verify_csum
        )
        self.roots = BTree(self.store, ROOT_TREE_OBJECTID, sb.root, sb.root_level, sb.generation)
        self.trees: dict[int, BTree] = {}
        self.root_items: dict[int, RootItem] = {}
        for tid in SUBTREES:
            body = self.roots.get((tid, ROOT_ITEM, 0))
            if body is None:
                raise CorruptionError(f"root tree has no ROOT_ITEM for tree {tid}", "MISSING_ROOT", sb.root)
            item = RootItem.unpack(body)
            self.root_items[tid] = item
            self.trees[tid] = BTree(self.store, tid, item.bytenr, item.level, item.generation)
        self.free_items = SortedDict()  # start -> length: the free-space tree's items
        if writable and rebuild_free_space:
            # the new tree comes later (``new_free_space_tree``), once a log is replayed
            self.store.allocator = self._allocator_from_extents()
        elif writable:
            fst = self.trees[FREE_SPACE_TREE_OBJECTID]
            try:
                recorded = [(k[0], k[2]) for k, _ in fst.items() if k[1] == FREE_SPACE_EXTENT]
            except CorruptionError as e:  # a cache of the extent tree: said so, with the way to rebuild it
                raise FreeSpaceDamage(f"free-space tree: {e}; run blockemu fsck --repair to rebuild it",
                                      e.kind, e.bytenr) from None
            extents = self._checked_free_space(recorded)
            self.free_items = SortedDict(extents)
            self.store.allocator = Allocator(extents, nodesize=sb.nodesize)
            if len(self.store.allocator.free) == len(extents):
                # built from the record, coalesced: the two differ only where the allocator changes
                self.store.allocator.touched = []
        self._applied_new: dict[int, tuple[int, int]] = {}  # bytenr -> (owner, level) its METADATA_ITEM says
        self._applied_freed: set[int] = set()
        self._new_pending()
        self._reset_log_notes()

    def _reset_log_notes(self) -> None:
        """What the fsync log (``treelog``) needs to know of the running transaction, noted by
        ``Extents`` as it changes the trees: each file's EXTENT_DATA items changed since the
        file was last logged (an empty map for a file whose inode item alone was saved since:
        ``Filesystem.save_inode``) (file offset -> the item now there, unpacked and packed, or None),
        the checksum items of every extent new in it that still has references (by bytenr),
        and the inodes whose change the log cannot express (a name made, changed or removed,
        a truncate), whose fsync must commit."""
        self.changed_extents: dict[int, dict[int, tuple[FileExtent, bytes] | None]] = {}
        self.new_csums: dict[int, list[tuple[KeyT, bytes]]] = {}
        self.needs_commit: set[int] = set()

    def _allocated(self) -> list[tuple[int, int]]:
        """[start, end) of every extent the extent tree records, merged into disjoint runs."""
        runs: list[tuple[int, int]] = []
        for start, end in sorted(
            (bytenr, bytenr + (self.sb.nodesize if typ == METADATA_ITEM else off))
            for (bytenr, typ, off), _ in self.trees[EXTENT_TREE_OBJECTID].items()
        ):
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end))
            else:
                runs.append((start, end))
        return runs

    def _checked_free_space(self, extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The free-space record's extents (in key order), refused unless each extent is
        sector-aligned usable space (inside the device, off the superblock reserves), apart from
        the others, and holds no extent the extent tree records: the allocator hands these
        extents out, so a wrong one would let a commit overwrite live metadata or data. (A tree
        block missing from the extent tree is caught when it is read: ``TreeStore.get``.)"""
        usable = usable_ranges(self.sb.total_bytes)
        taken = self._allocated()
        prev_end, j = 0, 0
        for start, length in extents:
            end = start + length
            while j < len(taken) and taken[j][1] <= start:
                j += 1
            if length <= 0 or start % SECTOR_SIZE or length % SECTOR_SIZE:
                why = "is not sector-aligned"
            elif not any(s <= start and end <= s + n for s, n in usable):
                why = f"lies outside the usable space (device of {self.sb.total_bytes} bytes, superblock reserves)"
            elif start < prev_end:
                why = "overlaps another free extent"
            elif j < len(taken) and taken[j][0] < end:
                why = f"overlaps allocated space [{taken[j][0]}, {taken[j][1]})"
            else:
                prev_end = end
                continue
            raise FreeSpaceDamage(f"free-space record: extent [{start}, +{length}) {why}; run blockemu fsck --repair "
                                  f"to rebuild it", "FREE_SPACE_MISMATCH", start)
        return extents

    def _allocator_from_extents(self) -> Allocator:
        """Free space as the extent tree implies it (fsck --repair): usable minus everything allocated."""
        alloc = Allocator(usable_ranges(self.sb.total_bytes), nodesize=self.sb.nodesize)
        for (bytenr, typ, off), _ in self.trees[EXTENT_TREE_OBJECTID].items():
            length = self.sb.nodesize if typ == METADATA_ITEM else off
            alloc.reserve(bytenr, length)
        return alloc

    def new_free_space_tree(self) -> None:
        """fsck --repair (``Engine(rebuild_free_space=True)``): the free-space tree starts empty
        and the commit fills it from the allocator, without reading the old one -- a damaged
        block of it is then no obstacle. The old tree's blocks are found through their
        METADATA_ITEMs' backrefs, not by walking it, and freed as a COW frees a block. Called
        after a log's replay has taken its blocks and extents: the new root is allocated, and the
        record calls that space free (the allocator fills the first hole that holds it)."""
        for (bytenr, typ, level), body in self.trees[EXTENT_TREE_OBJECTID].items():
            if typ == METADATA_ITEM and ExtentItem.unpack(body).refs == (("tree", FREE_SPACE_TREE_OBJECTID),):
                self.store.freed_blocks[bytenr] = (FREE_SPACE_TREE_OBJECTID, level)
                self.allocator.pin(bytenr, self.sb.nodesize)
        root = self.store.new_block(FREE_SPACE_TREE_OBJECTID, 0)
        self.trees[FREE_SPACE_TREE_OBJECTID] = BTree(self.store, FREE_SPACE_TREE_OBJECTID, root.bytenr, 0)

    @classmethod
    def create(cls, sb: SuperInfo) -> "Engine":
        """A new filesystem's empty trees in memory (mkfs); the first commit writes them."""
        self = cls.__new__(cls)
        self.sb = sb
        alloc = Allocator(usable_ranges(sb.total_bytes), nodesize=sb.nodesize)
        self.store = TreeStore(
            lambda off, n: b"", nodesize=sb.nodesize, csum_type=sb.csum_type, fsid=sb.fsid, transid=1, allocator=alloc
        )
        root = self.store.new_block(ROOT_TREE_OBJECTID, 0)
        self.roots = BTree(self.store, ROOT_TREE_OBJECTID, root.bytenr, 0)
        self.trees, self.root_items = {}, {}
        for tid in SUBTREES:
            block = self.store.new_block(tid, 0)
            self.trees[tid] = BTree(self.store, tid, block.bytenr, 0)
        self.free_items = SortedDict()
        self._applied_new, self._applied_freed = {}, set()
        self._new_pending()
        self._reset_log_notes()
        return self

    def _new_pending(self) -> None:
        """The extent and checksum trees' changes held until the commit (``PendingTrees``)."""
        self.pending = PendingTrees(self.trees[EXTENT_TREE_OBJECTID], self.trees[CSUM_TREE_OBJECTID],
                                    self.sb.nodesize, csum_size(self.sb.csum_type))

    @property
    def transid(self) -> int:
        return self.store.transid

    @property
    def allocator(self) -> Allocator:
        return self.store._need_allocator()

    def tree(self, tid: int) -> BTree:
        return self.roots if tid == ROOT_TREE_OBJECTID else self.trees[tid]

    # ------------------------------------------------------------------ space for metadata

    def op_blocks(self) -> int:
        """Tree blocks one operation may need: a path per tree, each possibly split at every level.
        Summed by C-level calls: every operation asks (``meta_room``, ``short_of_room``), and a
        generator over the trees was ~1 % of the stress mix (py-spy)."""
        trees = self.trees
        return 2 * (self.roots.level + sum(map(_LEVEL, trees.values())) + 1 + len(trees))

    def data_keep(self) -> int:
        """Tree blocks of room a data allocation must leave: the metadata reserve, kept for
        deletes and commits, plus the items of the extent being placed, plus what applying the
        held extent- and checksum-tree changes may take (``PendingTrees.blocks``)."""
        return (RESERVE_PATHS + 1) * self.op_blocks() + self.pending.blocks

    def short_of_room(self, deleting: bool = False) -> bool:
        """Room is below what data must leave while space freed in this transaction waits,
        pinned, for its commit: committing would give it back.

        ``deleting``: for a delete, the room must also hold what the commit will spend on
        this transaction's tree blocks -- a record in the extent tree of each block it made or
        freed, scattered over that tree's leaves. Deletes are never refused for room (freeing
        space must always work), so near full they gathered in one transaction until its commit
        found none: ~250 unlinks, 271 blocks made or freed, 109 blocks free, and the commit
        aborted (review25)."""
        store = self.store
        alloc = store.allocator
        if alloc is None or not alloc.holds_pinned():
            return False
        spend = len(store.new_blocks) + len(store.freed_blocks) if deleting else 0
        return alloc.node_room < self.data_keep() + spend

    def meta_room(self, promised: int = 0) -> bool:
        """Whether an operation that grows the metadata (a new inode, a name) may start: it
        may not eat the reserve that keeps deletes possible, nor the ``promised`` tree blocks'
        worth of room write() admitted dirty data under, which writeback has not yet taken.
        With a promise it must also leave the most it may take itself (``op_blocks``): the
        dirty data was admitted against the room as it was before this operation."""
        alloc = self.store.allocator
        need = self.data_keep() + (promised + self.op_blocks() if promised else 0)
        return alloc is None or alloc.node_room >= need

    def check_room(self, promised: int = 0) -> None:
        """ENOSPC before an operation that grows the metadata starts (``meta_room``), rather
        than halfway through it."""
        if not self.meta_room(promised):
            alloc = self.allocator
            raise no_space(self.sb.nodesize, alloc.free_bytes(), alloc.largest(), self.data_keep() * self.sb.nodesize)

    def is_dirty(self) -> bool:
        return bool(self.store.dirty or self.store.freed_blocks or len(self.pending))

    # ------------------------------------------------------------------ commit

    def _sync_extent_refs(self) -> bool:
        """Give each tree block new in this transaction its METADATA_ITEM and drop those of the
        blocks it freed (committed ones, and new ones freed again): in one ``BTree.apply``, not a
        descent with COW per block -- a commit after a few dozen operations adds and drops
        dozens. That the item of a new block is absent, and a freed block's there, is checked
        by the apply in the leaf it visits (``Must``), not by a lookup of each first: those
        lookups were a third of this step (cProfile, a stress-like commit of ~30 blocks). A new
        block freed again may be allocated again, to another tree or at another level (the
        allocator fills the hole it left at once): its item is made anew."""
        tree, store = self.trees[EXTENT_TREE_OBJECTID], self.store
        changes: dict[KeyT, bytes | Must | None] = {}
        new_blocks = store.new_blocks
        for bytenr in sorted(b for b, made in self._applied_new.items() if new_blocks.get(b) != made):
            # allocated, recorded, then freed within this transaction (and perhaps allocated again)
            del self._applied_new[bytenr]
            for key, _ in tree.items((bytenr, METADATA_ITEM, 0), (bytenr, METADATA_ITEM, 255)):
                changes[key] = None
        for bytenr in new_blocks.keys() - self._applied_new.keys():
            owner, level = self._applied_new[bytenr] = new_blocks[bytenr]
            body = ExtentItem(1, self.transid, EXTENT_FLAG_TREE_BLOCK, (("tree", owner),)).pack()
            key = (bytenr, METADATA_ITEM, level)
            changes[key] = body if key in changes else Must(body)  # (a replace of the item just dropped)
        for bytenr in store.freed_blocks.keys() - self._applied_freed:
            changes[(bytenr, METADATA_ITEM, store.freed_blocks[bytenr][1])] = Must(None)
            self._applied_freed.add(bytenr)
        tree.apply(in_key_order(changes))
        return bool(changes)

    def _sync_root_items(self) -> bool:
        changed = False
        for tid, tree in self.trees.items():
            old = self.root_items.get(tid)
            if old is not None and (old.bytenr, old.level) == (tree.root, tree.level):
                continue
            item = RootItem(self.transid, 256 if tid == FS_TREE_OBJECTID else 0, tree.root, 0, 0, 0, 1, tree.level)
            self.roots.insert((tid, ROOT_ITEM, 0), item.pack(), replace=True)
            self.root_items[tid] = item
            changed = True
        return changed

    def _sync_free_space(self) -> bool:
        """Rewrite the free-space record to the allocator's extents once the pins are released:
        the difference, applied in one pass (``BTree.apply``). Small writes fragment free space
        and every commit moves hundreds of extents; one descent and COW each made this the
        largest step of a commit after fsyncs of scattered 4 KiB writes. The difference comes
        from what the allocator saw change (``Allocator.record_changes``), not from comparing
        the whole record, each of the commit's rounds. ``free_items`` mirrors the tree's items,
        so what goes is there and what comes is not."""
        gone, new = self.allocator.record_changes(self.free_items)
        if not (gone or new):
            return False
        changes: dict[KeyT, bytes | None] = {(start, FREE_SPACE_EXTENT, length): None for start, length in gone}
        changes.update(((start, FREE_SPACE_EXTENT, length), b"") for start, length in new)
        self.trees[FREE_SPACE_TREE_OBJECTID].apply(in_key_order(changes))  # (no key is in both)
        for start, _ in gone:
            del self.free_items[start]
        self.free_items.update(new)
        return True

    def prepare_commit(self) -> tuple[list[tuple[int, bytes]], SuperInfo]:
        """Converge the trees; return the tree-block writes and the superblock to write after them."""
        # the root tree's root always carries the superblock's generation (fsck checks it), so a
        # commit that changed nothing else (a forced one) still copies it
        self.roots._writable_root()
        self.pending.apply()
        for _ in range(100):
            changed = self._sync_extent_refs()
            changed |= self._sync_root_items()
            changed |= self._sync_free_space()
            if not changed:
                break
        else:  # pragma: no cover - would be a bug in COW bookkeeping
            raise RuntimeError("commit did not converge")
        writes = self.store.encode_dirty()
        sb = self.sb
        free_after = sum(dict.values(self.free_items))  # the C view: SortedDict.values iterates in Python
        usable = sum(n for _, n in usable_ranges(sb.total_bytes))
        new = SuperInfo(
            fsid=sb.fsid,
            generation=self.transid,
            root=self.roots.root,
            root_level=self.roots.level,
            total_bytes=sb.total_bytes,
            bytes_used=usable - free_after,
            nodesize=sb.nodesize,
            csum_type=sb.csum_type,
            label=sb.label,
            compat_flags=sb.compat_flags,
            compat_ro_flags=sb.compat_ro_flags,
            incompat_flags=sb.incompat_flags & ~INCOMPAT_LOG_BITS,  # a full commit supersedes the log
            backup_roots=[dict(b) for b in sb.backup_roots],
        )
        backup = new.backup_roots[self.transid % NUM_BACKUP_ROOTS]
        for tid, name in BACKUP_NAMES.items():
            tree = self.tree(tid)
            backup[name] = tree.root
            backup[name + "_gen"] = self.transid if tid == ROOT_TREE_OBJECTID else self.root_items[tid].generation
            backup[name + "_level"] = tree.level
        backup["total_bytes"], backup["bytes_used"] = new.total_bytes, new.bytes_used
        # btrfs's unblocked transaction state: the blocks are encoded, so the next transaction
        # may change the trees while they are written (it COWs them again, and pins apart)
        self.store.end_transaction()
        self.allocator.seal_pins()
        self._applied_new.clear()
        self._applied_freed.clear()
        self._reset_log_notes()
        return writes, new

    def committed(self, new: SuperInfo) -> None:
        """The superblock ``new`` is durable (its tree blocks were flushed before it): it is the
        image's now, and a block the cache lets go may be read back. A feature bit the next
        transaction turned on meanwhile (``sb`` is still the old one's until now) is kept for
        that transaction's commit."""
        new.incompat_flags |= self.sb.incompat_flags & ~INCOMPAT_LOG_BITS
        self.sb = new
        self.store.written()

    def finish_commit(self) -> None:
        """The commit is done, its mirrors too: the previous generation's blocks may now be reused."""
        self.allocator.unpin_sealed()

