"""fsck: a read-only consistency check of an image, read synchronously through ImageFile
(no event loop).

Passes, in the order ``btrfs check`` runs them: superblocks; every tree block
reached from the root tree (checksum, fsid, bytenr, level, owner, key order,
item bounds, parent generation, child keys inside the parent's range, loops);
the extent tree against the tree blocks actually found; the free-space record
against the extents; then, in ``fsck_fs``, inodes and directories, file extents
against the extent tree, checksums (and with ``check_data`` every data sector),
and encryption. It never writes. Work is bounded: each block is read at most
once, and a block reached twice is reported, not followed again.
"""
from __future__ import annotations

import gc
from bisect import bisect_right
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from operator import add, itemgetter, le, ne
from typing import Any, Callable, Iterator

from blockemu.check import fsck_fast, fsck_fs, fsck_log
from blockemu.check.exitcodes import EXIT_CLEAN, EXIT_UNCORRECTED
from blockemu.check.forked import CAN_FORK, Forked, alone, second_core
from blockemu.device.image import ImageFile, read_only_features, truncated, unsupported
from blockemu.engine.transaction import BACKUP_NAMES, SUBTREES, TreeStore, usable_ranges
from blockemu.errors import BlockemuError, CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import ExtentItem, RootItem, unpack_extent_items

PHASES = ("superblock", "tree blocks", "extents", "free space", "fs roots", "csums", "encryption")


@dataclass
class FsckError:
    code: str
    message: str
    tree: str | None = None
    bytenr: int | None = None
    key: list[int] | None = None
    # what --repair would do, when that needs no guessing (see repair.py); not part of the JSON
    fix: dict[str, Any] | None = field(default=None, compare=False)
    done: str | None = field(default=None, compare=False)  # what --repair's fix did, in words

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "tree": self.tree, "bytenr": self.bytenr, "key": self.key,
                **({"action": self.done} if self.done else {})}


@dataclass
class FsckReport:
    image: str
    generation: int | None = None
    errors: list[FsckError] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    bytes_used: int = 0
    repaired: list[dict[str, Any]] = field(default_factory=list)
    # the trees (objectids) some block of which could not be read or trusted: --repair can
    # rebuild only the free-space tree (repair.py)
    damaged_trees: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)  # informational, not errors (a log to replay)
    warnings: list[str] = field(default_factory=list)  # about the check itself, not the image (a key that fits nothing)
    read_only: OSError | None = None  # why the image may not be written (unknown compat_ro features): --repair refuses

    @property
    def trees_damaged(self) -> bool:
        return bool(self.damaged_trees)

    @property
    def clean(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        return EXIT_CLEAN if self.clean else EXIT_UNCORRECTED

    def as_json(self) -> dict[str, Any]:
        out = {"image": self.image, "clean": self.clean, "generation": self.generation,
               "errors": [e.as_json() for e in self.errors], "stats": dict(self.stats)}
        if self.repaired:
            out["repaired"] = self.repaired
        if self.notes:
            out["notes"] = self.notes
        if self.warnings:
            out["warnings"] = self.warnings
        return out

    def text(self) -> list[str]:
        lines = [f"ERROR: [{e.code}] {e.message}" for e in self.errors] + [f"note: {n}" for n in self.notes]
        verdict = "no error found" if self.clean else f"{len(self.errors)} errors found"
        lines.append(f"found {self.bytes_used} bytes used, {verdict}")
        lines += [f"{k.replace('_', ' ')}: {v}" for k, v in self.stats.items()]
        return lines


Progress = Callable[[int, str], None]


class Checker:
    def __init__(self, img: ImageFile, report: FsckReport, progress: Progress | None,
                 use_super: Any = None) -> None:
        self.img = img
        # a superblock to check the image as (a backup root's, ``check.backup``) instead of its own
        self.use_super = use_super
        self.report = report
        self.progress = progress or (lambda n, p: None)
        self.blocks: dict[int, tuple[int, int]] = {}  # bytenr -> (owner, level) of every block found
        # blocks a tree points to that did not decode (reported so): their METADATA_ITEMs are
        # referenced, not the "which no tree references" their absence from ``blocks`` suggests
        self.unreadable: set[int] = set()
        # each tree's key ranges the walk could not read, [lo, hi) (None: open-ended): below a
        # block that did not decode or a pointer not followed, or all of a tree whose root is
        # unknown -- an item missing from ``keys`` may be there, and there alone (``fsck_log``)
        self.lost: dict[int, list[tuple[Any, Any]]] = {}
        # the trees whose root block did not read (or whose ROOT_ITEM is missing or bad): the
        # damage a backup root may give back (``check.backup``)
        self.failed_roots: set[int] = set()
        # each tree's items as two columns, keys and bodies, in the walk's order: the column
        # proofs (fsck_fast) read them as they are; ``pairs`` zips them for a pass that walks
        # item by item
        self.keys: dict[int, list[tuple[int, int, int]]] = {}
        self.bodies: dict[int, list[bytes]] = {}

    def pairs(self, tid: int) -> list[tuple[tuple[int, int, int], bytes]]:
        """The (key, body) of each item of tree ``tid`` the walk found."""
        return list(zip(self.keys.get(tid, ()), self.bodies.get(tid, ())))

    def release(self) -> None:
        """Let go of the trees' items and what the passes built from them."""
        self.keys.clear()
        self.bodies.clear()
        self.blocks.clear()
        self.unreadable.clear()
        self.lost.clear()
        self.data_extents.clear()

    def error(self, code: str, message: str, tree: int | None = None, bytenr: int | None = None,
              key: tuple[int, int, int] | None = None, fix: dict[str, Any] | None = None) -> None:
        self.report.errors.append(FsckError(code, message, S.TREE_NAMES.get(tree) if tree is not None else None,
                                            bytenr, list(key) if key else None, fix))

    # ------------------------------------------------------------------ pass 1

    def check_supers(self) -> Any:
        self.progress(1, PHASES[0])
        sb = self.img.best_super() if self.use_super is None else self.use_super
        if newer := unsupported(self.img.path, sb):  # its trees may mean what this check cannot tell
            raise newer
        if ro := read_only_features(self.img.path, sb):  # readable: checked as any image, and said
            self.report.read_only = ro
            self.report.notes.append(str(ro))
        primary = self.img.supers[0]
        if primary.error is not None and self.use_super is None:
            self.error("SUPERBLOCK", f"primary superblock: {primary.error}; using a mirror", bytenr=primary.offset)
        for copy in self.img.supers[1:] if self.use_super is None else ():  # the copies a backup's replace
            if copy.error is not None and copy.raw[0x40:0x48] == S.MAGIC:
                if primary.error is None:
                    # what a cut during a commit's mirror write leaves (SPEC "Which copy wins"):
                    # nothing reads a mirror beside a valid primary, and the next commit rewrites it
                    self.report.notes.append(f"superblock mirror at {copy.offset}: {copy.error} (as a crash during "
                                             f"a commit's mirror write leaves it; the next commit rewrites it)")
                else:
                    self.error("SUPERBLOCK", f"superblock mirror: {copy.error}", bytenr=copy.offset)
        if short := truncated(sb, self.img.size):
            # --repair restores the size only when nothing the trees reach was cut off (the repair
            # is refused while a tree is damaged): the space beyond the end was free, zeros in it guess nothing
            self.error("SUPERBLOCK", short, fix={"extend_to": sb.total_bytes})
        backup = sb.backup_roots[sb.generation % S.NUM_BACKUP_ROOTS]
        if (backup["tree_root"], backup["tree_root_gen"]) != (sb.root, sb.generation):
            self.error("SUPERBLOCK", f"backup root slot {sb.generation % S.NUM_BACKUP_ROOTS} does not record generation "
                                     f"{sb.generation} (has root {backup['tree_root']} gen {backup['tree_root_gen']})")
        self.report.generation = sb.generation
        return sb

    # ------------------------------------------------------------------ pass 2

    def walk(self, store: TreeStore, tid: int, root: int, level: int, generation: int | None) -> None:
        """Depth-first over one tree, reporting each bad block and carrying on with the rest."""
        stack: list[tuple[int, int | None, int, Any, Any, Any]] = [(root, generation, level, None, None, None)]
        while stack:
            bytenr, gen, lvl, lo, hi, first = stack.pop()
            if bytenr % S.SECTOR_SIZE or not self._in_usable(bytenr, store.nodesize):
                self.error("BAD_BLOCKPTR", f"tree block pointer {bytenr} outside the usable device", tid, bytenr)
                self.lose(tid, lo, hi)
                continue
            if bytenr in self.blocks:
                self.error("SHARED_TREE_BLOCK", f"tree block {bytenr} reached twice (a shared or looped block, "
                                                f"not a tree): not followed again", tid, bytenr)
                self.lose(tid, lo, hi)
                continue
            try:
                block = store.get(bytenr, generation=gen, level=lvl, owner=tid)
            except CorruptionError as e:
                self.error(e.kind, str(e), tid, bytenr)
                self.unreadable.add(bytenr)
                self.lose(tid, lo, hi)
                continue
            finally:
                store.clean.pop(bytenr, None)  # each block is read once: no need to cache
            self.blocks[bytenr] = (tid, lvl)
            self.report.stats["tree_blocks"] = self.report.stats.get("tree_blocks", 0) + 1
            if first is not None and block.keys and block.keys[0] != first:
                self.report.damaged_trees.add(tid)
                self.error("KEY_ORDER", f"tree block {bytenr}: first key {block.keys[0]} differs from its parent's {first}", tid, bytenr)
            if block.keys and (lo is not None and block.keys[0] < lo or hi is not None and block.keys[-1] >= hi):
                self.report.damaged_trees.add(tid)
                self.error("KEY_ORDER", f"tree block {bytenr}: keys outside the parent's range", tid, bytenr)
            if block.level == 0:
                if not block.keys and lo is not None:
                    self.error("BAD_TREE_BLOCK", f"tree block {bytenr}: empty leaf below a node", tid, bytenr)
                self.keys.setdefault(tid, []).extend(block.keys)
                self.bodies.setdefault(tid, []).extend(block.values)
                self.report.stats["items"] = self.report.stats.get("items", 0) + len(block.keys)
                continue
            for i in reversed(range(len(block.ptrs))):
                ptr, pgen = block.ptrs[i]
                nxt = block.keys[i + 1] if i + 1 < len(block.keys) else hi
                stack.append((ptr, pgen, block.level - 1, block.keys[i], nxt, block.keys[i]))

    def lose(self, tid: int, lo: Any, hi: Any) -> None:
        """A block of tree ``tid`` covering [lo, hi) was not read: the tree is damaged there (its
        root block, when ``lo`` is None: only a root's range is open below)."""
        self.report.damaged_trees.add(tid)
        self.lost.setdefault(tid, []).append((lo, hi))
        if lo is None:
            self.failed_roots.add(tid)

    def _in_usable(self, start: int, length: int) -> bool:
        for s, n in self.usable:
            if s <= start and start + length <= s + n:
                return True
        return False

    def _all_usable(self, extents: list[tuple[int, int, Any]]) -> bool:
        """Whether every (start, length) is sector-aligned and ``_in_usable``, decided over whole
        columns: the usable ranges are few, sorted and disjoint, so the one that can hold a start
        is the last beginning at or before it (a sentinel stands before the first)."""
        starts = list(map(itemgetter(0), extents))
        ends = list(map(add, starts, map(itemgetter(1), extents)))
        if any(map(S.SECTOR_SIZE.__rmod__, starts)) or any(map(S.SECTOR_SIZE.__rmod__, ends)):
            return False
        firsts = [-1] + [s for s, _ in self.usable]
        lasts = [-1, -1] + [s + n for s, n in self.usable]  # by bisect_right's index, one past the range's
        return all(map(le, ends, map(lasts.__getitem__, map(bisect_right, repeat(firsts), starts))))

    def check_root_tree(self, sb: Any) -> dict[tuple[int, int, int], bytes]:
        """The root tree's walk; its items, by key (the subtrees' ROOT_ITEMs)."""
        self.progress(2, PHASES[1])
        self.usable = usable_ranges(sb.total_bytes)
        self.store = TreeStore.reader(self.img.read, sb)
        self.walk(self.store, S.ROOT_TREE_OBJECTID, sb.root, sb.root_level, sb.generation)
        return dict(self.pairs(S.ROOT_TREE_OBJECTID))

    def check_subtrees(self, sb: Any, roots: dict[tuple[int, int, int], bytes], trees: tuple[int, ...] = SUBTREES) -> None:
        # as an older generation's superblock (the current one's slot is the SUPERBLOCK check's: a
        # slot that does not record it is no damage to its trees, which the rescue must not leave)
        older = self.use_super is not None and sb.generation != self.img.best_super().generation
        for tid in trees:
            key = (tid, S.ROOT_ITEM, 0)
            if key not in roots:
                self.report.damaged_trees.add(S.ROOT_TREE_OBJECTID)  # an item of its is missing
                self.error("MISSING_ROOT", f"no ROOT_ITEM for the {S.TREE_NAMES[tid]} tree", S.ROOT_TREE_OBJECTID, key=key)
                self.lost[tid] = [(None, None)]
                self.failed_roots.add(tid)
                continue
            try:
                ri = RootItem.unpack(roots[key])
            except CorruptionError as e:
                self.error("BAD_ITEM", f"ROOT_ITEM of tree {tid}: {e}", S.ROOT_TREE_OBJECTID, key=key)
                self.lost[tid] = [(None, None)]
                self.failed_roots.add(tid)
                continue
            if older:
                self.check_backup_record(sb, tid, ri)
            if ri.generation > sb.generation:
                self.error("TRANSID_MISMATCH", f"ROOT_ITEM of tree {tid} has generation {ri.generation} > superblock {sb.generation}",
                           S.ROOT_TREE_OBJECTID, key=key)
            self.walk(self.store, tid, ri.bytenr, ri.level, ri.generation)

    def check_backup_record(self, sb: Any, tid: int, ri: RootItem) -> None:
        """Checking as a backup root's superblock: its slot's record of tree ``tid`` must be the
        ROOT_ITEM its root tree holds -- a root tree of that generation that says otherwise is
        not the set the slot recorded (``check.backup``)."""
        b = sb.backup_roots[sb.generation % S.NUM_BACKUP_ROOTS]
        name = BACKUP_NAMES[tid]
        if (b[name], b[name + "_gen"], b[name + "_level"]) != (ri.bytenr, ri.generation, ri.level):
            self.report.damaged_trees.add(tid)
            self.error("SUPERBLOCK", f"backup root slot {sb.generation % S.NUM_BACKUP_ROOTS} records the "
                                     f"{S.TREE_NAMES[tid]} tree at {b[name]} gen {b[name + '_gen']}, its ROOT_ITEM "
                                     f"says {ri.bytenr} gen {ri.generation}", S.ROOT_TREE_OBJECTID)

    # ------------------------------------------------------------------ pass 3

    def check_extents(self, sb: Any) -> list[tuple[int, int]]:
        """Every tree block has exactly one METADATA_ITEM naming its tree, and vice versa."""
        self.progress(3, PHASES[2])
        self.data_extents: dict[int, tuple[int, ExtentItem]] = {}
        recorded: dict[int, tuple[int, ExtentItem]] = {}
        extents: list[tuple[int, int, tuple]] = []
        keys, bodies = self.keys.get(S.EXTENT_TREE_OBJECTID, []), self.bodies.get(S.EXTENT_TREE_OBJECTID, [])
        decoded = unpack_extent_items(bodies)
        sound = fsck_fast.extent_records(keys, decoded, sb.nodesize)
        if sound is not None:
            extents, recorded, self.data_extents = sound
        for key, body, item in zip(keys, bodies, decoded) if sound is None else ():
            bytenr, typ, off = key
            if typ not in (S.METADATA_ITEM, S.EXTENT_ITEM):
                self.error("UNKNOWN_KEY", f"unexpected item type {typ} in the extent tree", S.EXTENT_TREE_OBJECTID, key=key)
                continue
            try:
                item = item or ExtentItem.unpack(body)
            except CorruptionError as e:
                self.error("BAD_ITEM", f"extent item {key}: {e}", S.EXTENT_TREE_OBJECTID, key=key)
                continue
            length = sb.nodesize if typ == S.METADATA_ITEM else off
            extents.append((bytenr, length, key))
            if typ == S.METADATA_ITEM:
                recorded[bytenr] = (off, item)
            elif not item.flags & S.EXTENT_FLAG_DATA:
                self.error("BAD_ITEM", f"EXTENT_ITEM {key} lacks the DATA flag", S.EXTENT_TREE_OBJECTID, bytenr, key)
            else:
                self.data_extents[bytenr] = (off, item)
        extents.sort()
        starts = list(map(itemgetter(0), extents))
        disjoint = all(map(le, map(add, starts, map(itemgetter(1), extents)), islice(starts, 1, None)))
        for (s1, n1, k1), (s2, _, k2) in zip(extents, extents[1:]) if not disjoint else ():
            if s2 < s1 + n1:
                self.error("EXTENT_OVERLAP", f"extent {k1} overlaps extent {k2}", S.EXTENT_TREE_OBJECTID, s2, k2)
        for start, length, key in extents if not self._all_usable(extents) else ():
            if start % S.SECTOR_SIZE or length % S.SECTOR_SIZE or not self._in_usable(start, length):
                self.error("EXTENT_BAD_RANGE", f"extent {key} is outside the usable device or unaligned",
                           S.EXTENT_TREE_OBJECTID, start, key)
                if key[1] == S.EXTENT_ITEM and self.data_extents.get(start, (None,))[0] == length:
                    del self.data_extents[start]  # later passes walk its sectors: its length is not to be trusted
        for bytenr, (owner, level) in sorted(self.blocks.items()):
            rec = recorded.get(bytenr)
            if rec is None:
                self.error("EXTENT_REF_MISMATCH", f"tree block {bytenr} of tree {owner} has no METADATA_ITEM", owner, bytenr)
                continue
            rlevel, item = rec
            if rlevel != level or item.refs_count != 1 or item.refs != (("tree", owner),) or not item.flags & S.EXTENT_FLAG_TREE_BLOCK:
                self.error("EXTENT_REF_MISMATCH", f"METADATA_ITEM of block {bytenr} says level {rlevel} refs {item.refs_count} "
                           f"backrefs {list(item.refs)}, block is level {level} of tree {owner}",
                           S.EXTENT_TREE_OBJECTID, bytenr, [bytenr, S.METADATA_ITEM, rlevel])
        for bytenr, (rlevel, _) in sorted(recorded.items()):
            if bytenr not in self.blocks and bytenr not in self.unreadable:
                self.error("EXTENT_REF_MISMATCH", f"METADATA_ITEM for block {bytenr}, which no tree references",
                           S.EXTENT_TREE_OBJECTID, bytenr, [bytenr, S.METADATA_ITEM, rlevel])
        return list(map(itemgetter(0, 1), extents))

    # ------------------------------------------------------------------ pass 4

    def check_free_space(self, sb: Any, extents: list[tuple[int, int]]) -> None:
        """Free extents + allocated extents tile the usable device exactly; bytes_used agrees."""
        self.progress(4, PHASES[3])
        free = []
        for key in self.keys.get(S.FREE_SPACE_TREE_OBJECTID, []):
            if key[1] != S.FREE_SPACE_EXTENT:
                self.error("UNKNOWN_KEY", f"unexpected item type {key[1]} in the free-space tree", S.FREE_SPACE_TREE_OBJECTID, key=key)
                continue
            free.append((key[0], key[2]))
        used = sum(n for _, n in extents)
        self.report.bytes_used = used
        covered = self._tiles(sorted(free + extents))
        if covered is None:  # some records overlap: say which, span by span
            covered = []
            for start, length, what in sorted([(s, n, "free") for s, n in free] + [(s, n, "used") for s, n in extents]):
                if covered and start < covered[-1][1]:
                    self.error("FREE_SPACE_MISMATCH", f"{what} extent [{start}, +{length}) overlaps other space records",
                               S.FREE_SPACE_TREE_OBJECTID, start)
                if covered and start <= covered[-1][1]:
                    covered[-1][1] = max(covered[-1][1], start + length)
                else:
                    covered.append([start, start + length])
        want = [[s, s + n] for s, n in self.usable]
        if covered != want:
            missing = next((w for w, c in zip(want, covered) if w != c), want[len(covered)] if len(want) > len(covered) else None)
            self.error("FREE_SPACE_MISMATCH", f"free and allocated extents do not tile the device "
                       f"(first difference near {missing or covered[len(want)]})", S.FREE_SPACE_TREE_OBJECTID)
        if sb.bytes_used != used:
            self.error("USED_BYTES_MISMATCH", f"superblock bytes_used {sb.bytes_used}, extents add up to {used}")
        self.report.stats["free_bytes"] = sum(n for _, n in free)

    @staticmethod
    def _tiles(spans: list[tuple[int, int]]) -> list[list[int]] | None:
        """The [start, end) runs sorted (start, length) spans cover, joined where one ends as the
        next starts; None if two overlap (the caller then says which, span by span)."""
        starts = list(map(itemgetter(0), spans))
        ends = list(map(add, starts, map(itemgetter(1), spans)))
        if not all(map(le, ends, islice(starts, 1, None))):
            return None
        breaks = [i + 1 for i in compress(range(len(spans) - 1), map(ne, ends, islice(starts, 1, None)))]
        return [[starts[a], ends[b - 1]] for a, b in zip([0] + breaks, breaks + [len(spans)])] if spans else []


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """fsck makes a few small tuples per item and no reference cycles; the cyclic collector would
    walk all of them again each time enough new ones were made (a third of the run on a large
    image). It is paused for the check, and all that it would have found is found after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# fs tree items from which the fs-tree passes run in a second process (with a second core).
# The fork costs a few ms and the two processes spend more CPU than one (copy-on-write faults,
# items split by type before the fork). Measured after the column proofs (fsck_fast), check()
# in one process vs two, medians of 5 alternating runs on images of tools/bench.py's content:
# on a quiet 2-core machine two win from ~8,000 items (2,900: 26 vs 24 ms; 7,900: 62 vs 82;
# 15,400: 115 vs 147; 40,400: 245 vs 343; 45,000 files: 1.30 vs 2.15 s); with one other
# process keeping a core busy they lose up to ~40,000 items (15,400: 119 vs 95 ms; 40,400:
# 368 vs 363). The threshold favours the quiet machine a developer runs fsck on: the loss
# under load is tens of ms, the gain on a quiet machine a quarter of the check.
PARALLEL_ITEMS = 10_000
FILE_EXTENT_TYPES = frozenset((S.INODE_ITEM, S.EXTENT_DATA))  # what check_file_extents reads
Findings = tuple[list[FsckError], list[FsckError], int]  # fs_findings' problems and inode count


def check(path: str, *, check_data: bool = False, progress: Progress | None = None,
          key: bytes | None = None, parallel: bool | None = None, use_super: Any = None) -> FsckReport:
    """Check ``path`` without writing. Raises BlockemuError only for operational errors (exit 8).
    ``key``: a master key, to check that the names it encrypts decrypt to legal names.
    ``parallel``: a forked process runs the passes over the fs tree's items while this one walks
    the other trees and cross-checks extents, free space, file extents and checksums -- by
    default (None) when the fs tree holds PARALLEL_ITEMS items, a second core is there and no
    other thread runs (a fork beside threads is unsafe: ``forked.alone``); True
    whenever the platform can fork; False never. The findings, and their order, are the single
    process's: the child starts from everything the walk found, and only the problems return.
    ``use_super``: check the image as this superblock (a backup root's) describes it; without it,
    trees that do not read whole get a note naming the backup root that does, if one does."""
    report = FsckReport(image=path)
    with ImageFile.open(path) as img, _no_cycle_collection():
        ck = Checker(img, report, progress, use_super)
        sb = ck.check_supers()
        roots = ck.check_root_tree(sb)
        split = SUBTREES.index(S.FS_TREE_OBJECTID) + 1  # the trees up to the fs tree, then the rest
        ck.check_subtrees(sb, roots, SUBTREES[:split])
        if key is not None:
            report.warnings += key_fits_nothing(ck, key)
        if parallel is None:
            parallel = len(ck.keys.get(S.FS_TREE_OBJECTID, ())) >= PARALLEL_ITEMS and second_core() and alone()
        parallel = parallel and CAN_FORK
        cols = fsck_fast.columns(ck)  # here, for both processes
        with Forked(lambda: fs_findings(ck, sb, key, cols)) if parallel else nullcontext() as side:
            ck.check_subtrees(sb, roots, SUBTREES[split:])
            extents = ck.check_extents(sb)
            ck.check_free_space(sb, extents)
            fsck_log.check_log(ck, sb, extents, img.read if check_data else None)
            ck.progress(5, PHASES[4])
            if side is None:
                findings = fs_findings(ck, sb, key, cols)
            mark = len(report.errors)
            check_file_extents(ck, cols)
            ck.progress(6, "csums against data" if check_data else "csums (without verifying data)")
            fsck_fs.check_csums(ck, sb, ck.data_extents, img.read if check_data else None, lambda n: None, key)
            ck.progress(7, PHASES[6])
            if side is not None:
                # what this side made is freed while the child finishes (freeing a large check's
                # millions of small objects takes a good part of a second)
                del extents, cols
                ck.release()
                findings = side.result()
                if findings is None:  # the child failed (killed, out of memory): once more, in one process
                    return check(path, check_data=check_data, progress=progress, key=key, parallel=False,
                                 use_super=use_super)
        inodes_and_dirs, encryption, inodes = findings
        # in the order of the passes: inodes and directories come before file extents, encryption last
        report.errors[mark:mark] = inodes_and_dirs
        report.errors += encryption
        report.stats["inodes"] = inodes
        primary_sound = img.supers[0].error is None  # else --repair restores it first, and the rescue says so
    if use_super is None and primary_sound and ck.failed_roots - {S.FREE_SPACE_TREE_OBJECTID}:
        # a root that does not read, as a power cut that dropped a commit's blocks leaves it (not
        # the free-space tree's: --repair rebuilds that); only then are older generations checked,
        # a whole check each, which a leaf damaged deep in a large tree should not cost
        from blockemu.check.backup import note_for

        if note := note_for(path, sb, check_data):
            report.notes.append(note)
    return report


def key_fits_nothing(ck: Checker, key: bytes) -> list[str]:
    """A key no encryption policy on the image names checks nothing (the names it would decrypt
    are not its): said, as ``ls`` says a key that does not unlock its directory -- silence let a
    wrong --key-file pass for a check of the encrypted names."""
    from blockemu.crypto.fscrypt import key_identifier

    used = fsck_fs.policy_key_ids(ck)
    ident = key_identifier(key)
    if ident in used:
        return []
    if ck.report.damaged_trees & {S.ROOT_TREE_OBJECTID, S.FS_TREE_OBJECTID}:  # no policy read is not none there
        return [f"key {ident.hex()} unlocks no encrypted directory fsck could read on {ck.img.path}: its fs tree is "
                f"damaged, and what could not be read may hold one"]
    why = (f"its encryption policies use key{'s' if len(used) > 1 else ''} "
           f"{', '.join(sorted(k.hex() for k in used))}; its encrypted names were checked without a key"
           if used else "nothing on it is encrypted")
    return [f"key {ident.hex()} unlocks no encrypted directory on {ck.img.path}: {why}"]


def fs_findings(ck: Checker, sb: Any, key: bytes | None, cols: fsck_fast.Columns | None) -> Findings:
    """The passes that need the fs tree's items only: (problems of the items, of inodes and
    directories; of encryption; the inode count). The problems are taken out of the report, for
    the caller to put in their place among the other passes'. ``cols``: the items by type
    (``fsck_fast.columns``), for the proof that spares the passes on a sound tree."""
    inodes = fsck_fast.inodes_clean(cols)
    if inodes is not None:
        return [], [], inodes
    mark = len(ck.report.errors)
    items = fsck_fs.collect(ck)
    fsck_fs.check_inodes(ck, items, sb)
    middle = len(ck.report.errors)
    fsck_fs.check_encryption(ck, items)
    if sb.incompat_flags & S.INCOMPAT_ENCRYPTED_NAMES:
        fsck_fs.check_encrypted_names(ck, items, key)
    fsck_fs.check_encrypted_symlinks(ck, items, sb, key)
    found = ck.report.errors[mark:]
    del ck.report.errors[mark:]
    return found[:middle - mark], found[middle - mark:], len(items.inodes)


def check_file_extents(ck: Checker, cols: fsck_fast.Columns | None) -> None:
    """File extents against inodes and the extent tree. The items are decoded here for this pass
    alone: what is wrong with them is the fs passes' to report (``fs_findings``)."""
    if fsck_fast.file_extents_clean(cols, ck.data_extents):
        return
    mark = len(ck.report.errors)
    items = fsck_fs.collect(ck, only=FILE_EXTENT_TYPES)
    del ck.report.errors[mark:]
    fsck_fs.check_file_extents(ck, items, ck.data_extents)


async def fsck(path: str, *, check_data: bool = False) -> FsckReport:
    """The Python API: the check runs in a thread so the caller's loop keeps going."""
    import asyncio  # here: the command's fsck has no event loop, and importing asyncio takes a tenth of its start

    return await asyncio.to_thread(check, path, check_data=check_data)


__all__ = ["check", "fsck", "FsckReport", "FsckError", "BlockemuError"]
