"""File extents, data-extent references and data checksums (pure: it works on an Engine, no I/O of its own).

A file's data is a sequence of EXTENT_DATA items (ino, EXTENT_DATA, file
offset), each pointing into a data extent: (disk_bytenr, disk_num_bytes) with
``offset``/``num_bytes`` selecting the part the file uses. Extents are never
written in place: an overwrite allocates a new extent and trims, splits or
drops the items it covers (``punch``). Each data extent has an EXTENT_ITEM in
the extent tree whose reference count is the number of EXTENT_DATA items
pointing into it, with btrfs-style back references keyed by (root, inode,
file offset − extent offset), which a split leaves unchanged; at zero
references the extent, its checksums and its space are freed (space pinned
until the commit is durable). Checksums cover what is on disk (ciphertext),
one digest per 4 KiB sector, in EXTENT_CSUM items of at most one leaf-quarter.

Changes go through an ``ExtentBatch``: writeback maps a whole batch of new extents at
once, and the batch stages every item change (``engine.batch``) and applies each tree's
in one pass, so a leaf touched by many of them is reached and copied once.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import compress, islice, repeat
from operator import is_
from typing import Iterable, Iterator, NamedTuple, Sequence

from blockemu.engine.batch import TreeBatch
from blockemu.engine.btree import BTree, KeyT, max_item_size
from blockemu.engine.transaction import Engine
from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import (
    ExtentContext,
    ExtentItem,
    FileExtent,
    new_data_extent_item,
    new_data_extent_items,
    new_data_extents,
)
from blockemu.ondisk.structs import EXTENT_DATA

PAGE = S.SECTOR_SIZE
KNOWN_EXTENTS = 1 << 16  # ``Extents.known`` holds at most this many items (~20 MiB)
MAPPED_EXTENTS = 1 << 16  # ``Extents.maps`` hold at most this many items in all (~15 MiB)


class Mapping(NamedTuple):
    """One EXTENT_DATA item: file range [file_offset, file_offset + length)."""

    file_offset: int
    extent: FileExtent

    @property
    def length(self) -> int:
        return self.extent.num_bytes

    @property
    def end(self) -> int:
        return self.file_offset + self.extent.num_bytes

    def disk_at(self, file_offset: int) -> int:
        """Byte offset in the image of the data at ``file_offset`` (inside this mapping)."""
        return self.extent.disk_bytenr + self.extent.offset + (file_offset - self.file_offset)


class NewExtent(NamedTuple):
    """A data extent written by the caller, to map at ``file_offset``: ``digests`` are its
    per-sector checksums concatenated, ``context`` its encryption context (None: plaintext)."""

    file_offset: int
    bytenr: int
    length: int
    ram_bytes: int
    context: ExtentContext | None
    digests: bytes


def file_mappings(fs: BTree | TreeBatch, ino: int, start: int, end: int) -> list[Mapping]:
    """EXTENT_DATA items of ``ino`` overlapping [start, end), in file order."""
    return [Mapping(key[2], FileExtent.unpack(body))
            for key, body in fs.floor_items((ino, S.EXTENT_DATA, start), (ino, S.EXTENT_DATA, 0),
                                            (ino, S.EXTENT_DATA, max(end - 1, 0)))
            if key[2] < end and FileExtent.end_in_file(key[2], body) > start]


class ExtentMap:
    """One file's EXTENT_DATA items in memory, as the fs tree holds them (btrfs's extent_map tree):
    the offsets in order, and the extent at each. Writeback maps each new extent over the ones
    it replaces: finding those in the fs tree was a descent and a decode of the items, per
    extent; here it is a bisection of the file's offsets. (The apply still visits that leaf to
    change the item, and now pays the first touch of it the lookup used to pay: DESIGN §5.)"""

    __slots__ = ("offsets", "extents")

    def __init__(self, items: Iterable[tuple[int, FileExtent]]) -> None:
        self.extents: dict[int, FileExtent] = dict(items)
        self.offsets: list[int] = sorted(self.extents)

    def __len__(self) -> int:
        return len(self.offsets)

    def overlapping(self, start: int, end: int) -> list[tuple[int, FileExtent]]:
        """The (file offset, extent) pairs overlapping [start, end), in file order
        (``file_mappings``'s answer, as plain pairs: a Mapping each was a Python-level call).
        An item at ``start`` reaching ``end`` is the whole answer (items do not overlap): an
        overwrite of what the last write there mapped -- every write of the fio cycle -- costs
        a dict lookup, not two bisections of the file's offsets and the lists built from them."""
        offsets, extents = self.offsets, self.extents
        at = extents.get(start)
        if at is not None and at.num_bytes >= end - start:
            return [(start, at)]
        i = max(bisect_right(offsets, start) - 1, 0)
        if i < len(offsets) and offsets[i] + extents[offsets[i]].num_bytes <= start:
            i += 1  # the item before ``start`` ends at or before it
        found = offsets[i : bisect_left(offsets, end, i)]
        return list(zip(found, map(extents.__getitem__, found)))

    def vacant(self, start: int, end: int) -> int | None:
        """Where an item at ``start`` goes among the offsets if no item overlaps [start, end), else
        None. Only the last item starting before ``end`` can overlap (items do not overlap): one
        bisection, no list of them (a new extent in a sparse file, every write of the random-write
        figure, overlaps nothing), and ``ExtentBatch.add_extents`` inserts the item there rather than
        bisecting again."""
        offsets = self.offsets
        i = bisect_left(offsets, end)
        if i and offsets[i - 1] + self.extents[offsets[i - 1]].num_bytes > start:
            return None
        return i

    def set(self, offset: int, fe: FileExtent | None) -> int:
        """The item at ``offset`` is now ``fe`` (None: gone); returns the change in items."""
        extents = self.extents
        if fe is None:
            if extents.pop(offset, None) is None:
                return 0
            del self.offsets[bisect_left(self.offsets, offset)]
            return -1
        had = offset in extents
        extents[offset] = fe
        if had:
            return 0
        # a slice assignment, not ``insort``: list.insert moves the later offsets up one by one
        # (~2 instructions each, ~20k to add one to a 20k-item map), a slice assignment with one
        # memmove (~5k); random writes over a big file add an offset per extent
        i = bisect_right(self.offsets, offset)
        self.offsets[i:i] = (offset,)
        return 1


class Extents:
    """The file-extent view of one Engine's fs, extent and csum trees."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.fs: BTree = engine.trees[S.FS_TREE_OBJECTID]
        # the extent and checksum trees as this transaction has them: the trees with the changes
        # held for its commit over them (``PendingTrees``), which every reader must see
        self.ext: TreeBatch = engine.pending.ext
        self.csum: TreeBatch = engine.pending.csum
        self.csum_type = engine.sb.csum_type
        self.csum_size = csums.csum_size(self.csum_type)
        self.sectors_per_csum_item = max_item_size(engine.sb.nodesize) // self.csum_size
        # The EXTENT_ITEMs of data extents this view made or changed, by bytenr: key and item as
        # the extent tree holds them (every change to a data extent's item goes through an
        # ExtentBatch of this view, which updates this once its trees are applied). An overwrite
        # changes the references of the extent it replaces, nearly always one an earlier
        # writeback made: its item is found here, not by a descent into an extent-tree leaf
        # nothing else touched (a third of mapping a small extent). Bounded: emptied when full.
        # (A new extent's item is kept as its body until an overwrite reads it: ``_extent_key``.)
        self.known: dict[int, tuple[KeyT, ExtentItem | bytes]] = {}
        # The EXTENT_DATA items of the files writeback maps extents into, by inode: each filled
        # from the fs tree once, then changed with it by every ExtentBatch of this view (the only
        # writer of those items), so an overwrite finds the items it replaces without a lookup.
        # A batch that fails drops the maps of the files it touched (the tree is what stands);
        # bounded: emptied when they hold more than MAPPED_EXTENTS items.
        self.maps: dict[int, ExtentMap] = {}
        self.mapped = 0  # items in ``maps``
        self.unmapped: set[int] = set()  # files the maps had no room for (``ExtentBatch._mappings``)

    # ------------------------------------------------------------------ reading

    def mappings(self, ino: int, start: int = 0, end: int = (1 << 64) - 1) -> Iterator[Mapping]:
        """EXTENT_DATA items of ``ino`` overlapping [start, end), in file order."""
        return iter(file_mappings(self.fs, ino, start, end))

    def sector_csums(self, bytenr: int, length: int) -> bytes:
        """The checksums of the sectors of [bytenr, +length), concatenated, from one descent of
        the csum tree (a read checked each sector with a descent of its own); they stop at the
        first sector that has none, so a caller comparing sector by sector finds it there."""
        oid, typ, size = S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, self.csum_size
        at, end, out = bytenr, bytenr + length, []
        for (_, _, start), body in self.csum.floor_items((oid, typ, bytenr), (oid, typ, 0), (oid, typ, end - 1)):
            if start > at or (at - start) % PAGE:
                break  # a gap, or an item not aligned with this sector
            i = (at - start) // PAGE
            n = min(len(body) // size - i, (end - at) // PAGE)
            if n > 0:
                out.append(body[i * size : (i + n) * size])
                at += n * PAGE
            if at >= end:
                break
        return b"".join(out)

    # ------------------------------------------------------------------ changing files

    def punch(self, ino: int, start: int, end: int) -> int:
        """Remove [start, end) from the file's mapping; returns the change in nbytes (≤ 0).
        Its changes are applied at once, with those held (``PendingTrees``): a caller that
        frees space has no room to spare."""
        with ExtentBatch(self) as batch:
            return batch.punch(ino, start, end)

    def add_extents(self, extents: Sequence[tuple[int, NewExtent]], spare: int = 0) -> dict[int, int]:
        """Map each new extent (written by the caller) into its file (the inode number it comes
        with), in one batch: several files' extents share the passes over the trees. Returns
        each file's change in nbytes. ``spare``: tree blocks of room the caller can leave to
        the transaction's held changes (``ExtentBatch.spare``)."""
        with ExtentBatch(self, spare) as batch:
            return batch.add_extents(extents)

    def map_logged(self, ino: int, file_offset: int, fe: FileExtent, csum_items: list[tuple[tuple[int, int, int], bytes]]) -> None:
        """Log replay: one logged EXTENT_DATA item over the tree (``ExtentBatch.map_logged``)."""
        with ExtentBatch(self) as batch:
            batch.map_logged(ino, file_offset, fe, csum_items)


Notes = dict[int, "tuple[FileExtent, bytes] | None"]  # a file's changed EXTENT_DATA items, by offset: item and body, or None


class ExtentBatch:
    """File-extent changes staged over the three trees (``TreeBatch``), applied together."""

    def __init__(self, extents: Extents, spare: int = 0) -> None:
        self.engine = extents.engine
        # the extent and checksum trees' changes are staged over the transaction's held ones and
        # join them once applied; ``spare`` bounds what those may then reserve (``PendingTrees``),
        # beyond which they are applied with this batch's
        self.pending, self.spare = extents.engine.pending, spare
        self.fs, self.ext, self.csum = TreeBatch(extents.fs), TreeBatch(self.pending.ext), TreeBatch(self.pending.csum)
        self.fresh: set[KeyT] = set()  # the items log replay makes for new extents (``PendingTrees.fresh``)
        # the extent and checksum items ``add_extents`` makes, absorbed by the held set in bulk
        self.made: tuple[list[tuple[KeyT, bytes]], list[tuple[KeyT, bytes]]] = ([], [])
        self.extents = extents
        self.known = extents.known
        self.touched: set[int] = set()  # inodes whose map this batch has changed
        self.staged_known: dict[int, tuple[KeyT, ExtentItem | bytes] | None] = {}  # this batch's changes to it (None: gone)
        self.sectors_per_csum_item = extents.sectors_per_csum_item
        self.freed: list[tuple[int, int]] = []  # data extents left without references: pinned once applied
        # for the fsync log (``Engine.changed_extents``, ``Engine.new_csums``), noted once applied;
        # by inode, then offset, as the engine keeps them: one update per file when applied
        self.changed: dict[int, Notes] = {}
        self.new_csums: dict[int, list[tuple[tuple[int, int, int], bytes]]] = {}
        self._last: tuple[int, tuple[ExtentMap | None, Notes]] | None = None  # ``_file``'s last answer

    def __enter__(self) -> "ExtentBatch":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Applied if the changes were all staged; else (or if the apply fails) nothing of them
        stays in the files' maps."""
        if kind is not None:
            self.forget()
            return
        try:
            self.apply()
        except BaseException:
            self.forget()
            raise

    def apply(self) -> None:
        self._last = None
        self.fs.apply()
        pending = self.pending
        pending.absorb(self.ext, self.csum, self.fresh)
        pending.absorb_new(*self.made)
        self.made = ([], [])
        if not pending.hold(self.spare):
            pending.apply()
        extents = self.extents
        for ino in self.touched:
            if not extents.maps.get(ino, True):  # emptied (a deleted file): no map kept for it
                # (a file emptied and written again is refilled: an empty walk)
                del extents.maps[ino]
        self.touched.clear()
        if extents.mapped > MAPPED_EXTENTS:
            extents.maps.clear()
            extents.mapped = 0
            extents.unmapped.clear()
        known, staged = self.known, self.staged_known
        if len(known) + len(staged) > KNOWN_EXTENTS:
            known.clear()
        # in one update, then the extents freed (None: a few a batch) taken out again -- a
        # Python step per staged extent was ~1 % of a random 4 KiB write with its writeback
        known.update(staged)  # type: ignore[arg-type]
        for bytenr in list(compress(staged, map(is_, staged.values(), repeat(None)))):
            del known[bytenr]
        self.staged_known = {}
        engine = self.engine
        for ino, notes in self.changed.items():
            engine.changed_extents.setdefault(ino, {}).update(notes)
        new_csums = engine.new_csums
        new_csums.update(self.new_csums)
        engine.allocator.pin_many(self.freed)
        for bytenr, _ in self.freed:
            new_csums.pop(bytenr, None)
        self.freed = []
        self.changed = {}
        self.new_csums = {}

    def _file(self, ino: int) -> tuple[ExtentMap | None, Notes]:
        """The file's map (None: it has none) and this batch's notes of its changed items, found
        once for all the items one change of the file stages (``_set``) -- and kept for the
        next change if it is the same file's, as a batch of a file's runs is: asked after
        ``_mappings``, which fills a file's map on its first use, the answer stays right until
        the batch applies or is forgotten, which alone drop maps."""
        last = self._last
        if last is not None and last[0] == ino:
            return last[1]
        emap = self.extents.maps.get(ino)
        if emap is not None:
            self.touched.add(ino)
        notes = self.changed.get(ino)
        if notes is None:
            notes = self.changed[ino] = {}
        self._last = (ino, (emap, notes))
        return emap, notes

    def _set(self, ino: int, file: tuple[ExtentMap | None, Notes], offset: int, fe: FileExtent | None,
             body: bytes | None = None) -> None:
        """Stage the file's EXTENT_DATA item at ``offset`` (None: none there), noted for the fsync
        log, which logs from these notes rather than looking each changed range up again. The
        key is known present (just read) or absent (inside a mapping, or a new extent's): no
        lookup to check it, each would be another descent. ``body``: ``fe`` packed, if the caller
        made it already; ``file``: ``_file(ino)``."""
        key = (ino, EXTENT_DATA, offset)
        emap, notes = file
        if emap is not None:
            self.extents.mapped += emap.set(offset, fe)
        if fe is None:
            self.fs.drop(key)
            notes[offset] = None
            return
        if body is None:
            body = fe.pack()
        self.fs.put(key, body)  # of a fixed size, far below an item's limit
        notes[offset] = (fe, body)

    # ------------------------------------------------------------------ data extents

    def _extent_key(self, bytenr: int) -> tuple[tuple[int, int, int], ExtentItem]:
        """The EXTENT_ITEM of data extent ``bytenr`` as this batch sees it: its own change, what
        the view knows, or the tree's."""
        hit = self.staged_known[bytenr] if bytenr in self.staged_known else self.known.get(bytenr)
        if hit is not None:
            key, item = hit
            return key, new_data_extent_item(item) if type(item) is bytes else item
        found = None if bytenr in self.staged_known else \
            self.ext.first_at_or_after((bytenr, S.EXTENT_ITEM, 0), (bytenr, S.EXTENT_ITEM, (1 << 64) - 1))
        if found is None:
            raise CorruptionError(f"data extent {bytenr} has no EXTENT_ITEM", "EXTENT_REF_MISMATCH", bytenr)
        return found[0], ExtentItem.unpack(found[1])

    def _put_extent(self, key: KeyT, item: ExtentItem, body: bytes | None = None) -> None:
        """Stage a data extent's EXTENT_ITEM, new or changed (``body``: ``item`` packed, if made already)."""
        self.ext.insert(key, item.pack() if body is None else body, replace=True)
        self.staged_known[key[0]] = (key, item)

    def _change_ref(self, fe: FileExtent, ino: int, ref_offset: int, delta: int) -> None:
        key, item = self._extent_key(fe.disk_bytenr)
        refs = list(item.refs)
        for i, r in enumerate(refs):  # field by field: a slice compared would be a tuple made per ref
            if r[3] == ref_offset and r[2] == ino and r[0] == "data" and r[1] == S.FS_TREE_OBJECTID:
                count = r[4] + delta
                if count:
                    refs[i] = ("data", S.FS_TREE_OBJECTID, ino, ref_offset, count)
                else:
                    del refs[i]
                break
        else:
            if delta < 0:
                raise CorruptionError(f"extent {fe.disk_bytenr}: no back reference from inode {ino}", "EXTENT_REF_MISMATCH", fe.disk_bytenr)
            refs.append(("data", S.FS_TREE_OBJECTID, ino, ref_offset, delta))
        total = item.refs_count + delta
        if total > 0:
            self._put_extent(key, ExtentItem(total, item.generation, item.flags, tuple(refs)))
            return
        self.ext.drop(key)
        self.staged_known[key[0]] = None
        if key in self.pending.fresh or key in self.fresh:
            # made in this transaction, its items not yet in the trees: its checksum items are
            # those it was made with, dropped one by one (a range is not read through, and
            # would find nothing in the tree)
            bytenr = fe.disk_bytenr
            for ckey, _ in self.new_csums.get(bytenr) or self.engine.new_csums[bytenr]:
                self.csum.drop(ckey)
        else:
            self._drop_csums(fe.disk_bytenr, fe.disk_num_bytes)
        self.freed.append((fe.disk_bytenr, fe.disk_num_bytes))

    def _drop_csums(self, bytenr: int, length: int) -> None:
        """The checksum items of a freed extent go with the csum tree's apply, which finds them
        in the leaves it visits: nothing reads them again (the extent's space stays pinned until
        the commit, so no new extent's items land there in this transaction)."""
        self.csum.drop_range((S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, bytenr),
                             (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, bytenr + length - 1))

    # ------------------------------------------------------------------ changing a file

    def punch(self, ino: int, start: int, end: int) -> int:
        """Leave a hole at [start, end) (a truncate, a hole punch, a delete); returns the change
        in nbytes (≤ 0). The fsync log replays items over the committed tree and has no item
        for "nothing here", so that inode's fsync commits until the transaction does."""
        self.engine.needs_commit.add(ino)
        return self._unmap(ino, start, end)[0]

    def _mappings(self, ino: int, start: int, end: int) -> list[tuple[int, FileExtent]]:
        """``file_mappings`` through the batch, from the file's map (filled from the tree the
        first time). A file with more items than the maps have room for, or whose items cannot
        be read, gets none until the maps are emptied: the tree answers, as it did before maps
        (a fill that failed each time would walk the file each time)."""
        extents = self.extents
        emap = extents.maps.get(ino)
        if emap is None:
            if ino in extents.unmapped:
                return file_mappings(self.fs, ino, start, end)
            room = max(MAPPED_EXTENTS - extents.mapped, 0)
            items = self.fs.items((ino, S.EXTENT_DATA, 0), (ino, S.EXTENT_DATA, (1 << 64) - 1))
            try:
                emap = ExtentMap((key[2], FileExtent.unpack(body)) for key, body in islice(items, room + 1))
            except OSError:  # a block or an item that does not read: only a write over it fails
                emap = None
            if emap is None or len(emap) > room:
                extents.unmapped.add(ino)
                return file_mappings(self.fs, ino, start, end)
            extents.maps[ino] = emap
            extents.mapped += len(emap)
            self.touched.add(ino)  # filled through this batch's staged changes
        return emap.overlapping(start, end)

    def forget(self) -> None:
        """The batch failed (or was dropped) before it applied everything: the maps of the files
        it changed follow staged changes the trees may never see, so they go (refilled from the
        tree on their next use)."""
        self._last = None
        extents = self.extents
        for ino in self.touched:
            emap = extents.maps.pop(ino, None)
            if emap is not None:
                extents.mapped -= len(emap)
        self.touched.clear()

    def _unmap(self, ino: int, start: int, end: int, *, refill: bool = False) -> tuple[int, tuple[ExtentMap | None, Notes]]:
        """Remove [start, end) from the file's mapping; returns the change in nbytes (≤ 0), and
        the file's map and notes (``_file``) for the caller's item there.
        ``refill``: the caller maps the range anew, its item at ``start`` -- an item starting
        there is left for that one to replace, not dropped first (an overwrite of whole extents
        would stage the key twice and take it out of the file's map only to put it back)."""
        freed = 0
        found = self._mappings(ino, start, end)
        f = self._file(ino)
        for at, fe in found:
            length = fe.num_bytes
            ref_offset = at - fe.offset
            keep_left, keep_right = start > at, end < at + length
            if keep_left:
                self._set(ino, f, at, fe.piece(fe.offset, start - at))
            elif not refill or at != start:
                self._set(ino, f, at, None)
            if keep_right:
                cut = end - at
                self._set(ino, f, end, fe.piece(fe.offset + cut, length - cut))
            freed += min(at + length, end) - max(at, start)
            if keep_left and keep_right:
                self._change_ref(fe, ino, ref_offset, +1)
            elif not keep_left and not keep_right:
                self._change_ref(fe, ino, ref_offset, -1)
        return -freed, f

    def add_extents(self, extents: Sequence[tuple[int, NewExtent]]) -> dict[int, int]:
        """Map each new extent (with the inode number of its file) over [file_offset, +length);
        returns each file's change in nbytes. The extents' items are made as bytes for the whole
        batch at once, by C-level maps over its columns (``new_data_extents``,
        ``new_data_extent_items``): the one Python loop is the files' mappings -- per extent, the
        file's items there are trimmed (``_unmap``, not entered where the file's map holds nothing
        in the range -- a new extent in a sparse file: ``ExtentMap.vacant``) and its EXTENT_DATA
        item staged. The extent and checksum items go to the held set in bulk when the batch
        applies (``made``, ``PendingTrees.absorb_new``): nothing in the loop reads them back, for
        a batch's extents never overlap (each dirty page is in one run), so no extent of the batch
        trims or frees another -- a call per item was ~1k instructions."""
        if not extents:
            return {}
        transid, per = self.engine.transid, self.sectors_per_csum_item
        inos, news = zip(*extents)
        file_offsets, bytenrs, lengths, ram_bytes, contexts, digests = zip(*news)
        maps, fs_changes = self.extents.maps, self.fs.changes
        delta: dict[int, int] = {}
        fes, bodies = new_data_extents(transid, ram_bytes, bytenrs, lengths, contexts)
        last, notes = None, {}
        for ino, file_offset, length, fe, body in zip(inos, file_offsets, lengths, fes, bodies):
            end = file_offset + length
            emap = maps.get(ino)
            at = None if emap is None else emap.vacant(file_offset, end)
            if at is None:
                freed, f = self._unmap(ino, file_offset, end, refill=True)
                self._set(ino, f, file_offset, fe, body)
                delta[ino] = delta.get(ino, 0) + freed + length
                continue
            # over nothing (a new extent in a sparse file, every write of the random-write
            # figure): ``_set`` written out for a new offset at ``at`` in the file's map
            if ino != last:  # (a batch's extents come file by file: a file's notes found once)
                last, notes = ino, self._file(ino)[1]
            emap.extents[file_offset] = fe  # type: ignore[union-attr]
            emap.offsets[at:at] = (file_offset,)  # type: ignore[union-attr]  # (``ExtentMap.set``'s one memmove)
            self.extents.mapped += 1
            fs_changes[(ino, EXTENT_DATA, file_offset)] = body  # (``TreeBatch.put``)
            self.fs.order = None
            notes[file_offset] = (fe, body)
            delta[ino] = delta.get(ino, 0) + length
        made = list(zip(zip(bytenrs, repeat(S.EXTENT_ITEM), lengths), new_data_extent_items(transid, inos, file_offsets)))
        self.made[0].extend(made)  # (``_put_extent``, in bulk: fixed-size bodies)
        self.staged_known.update(zip(bytenrs, made))  # each item as its body (``known``)
        oid, typ = S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM
        if max(lengths) <= per * PAGE:  # one checksum item each (every small extent): no slicing
            csum_items = list(zip(zip(repeat(oid), repeat(typ), bytenrs), digests))
            self.new_csums.update(zip(bytenrs, map(list, zip(csum_items))))
        else:
            csum_items = []
            for bytenr, length, sums in zip(bytenrs, lengths, digests):
                step = len(sums) // (length // PAGE)
                mine = [((oid, typ, bytenr + i * PAGE), sums[i * step : (i + per) * step])
                        for i in range(0, length // PAGE, per)]
                csum_items += mine  # at most an item's worth of digests each (``sectors_per_csum_item``)
                self.new_csums[bytenr] = mine
        self.made[1].extend(csum_items)
        return delta

    def map_logged(self, ino: int, file_offset: int, fe: FileExtent, csum_items: list[tuple[tuple[int, int, int], bytes]]) -> None:
        """Log replay (``treelog``): map the file range of ``fe`` as an fsync logged it, over what
        the tree holds -- trimmed or dropped as the overwrite did. The extent is this log's own
        (new since the last commit): the first item naming it creates its EXTENT_ITEM and
        checksums (``csum_items``), the others (pieces of it split by later writes) add references."""
        self._set(ino, self._unmap(ino, file_offset, file_offset + fe.num_bytes, refill=True)[1], file_offset, fe)
        ref_offset = file_offset - fe.offset
        if self.ext.first_at_or_after((fe.disk_bytenr, S.EXTENT_ITEM, 0), (fe.disk_bytenr, S.EXTENT_ITEM, (1 << 64) - 1)):
            self._change_ref(fe, ino, ref_offset, +1)
            return
        item = ExtentItem(1, fe.generation, S.EXTENT_FLAG_DATA, (("data", S.FS_TREE_OBJECTID, ino, ref_offset, 1),))
        key = (fe.disk_bytenr, S.EXTENT_ITEM, fe.disk_num_bytes)
        self.ext.insert(key, item.pack())
        self.fresh.add(key)
        for ckey, body in csum_items:
            self.csum.insert(ckey, body)
            self.fresh.add(ckey)
        self.new_csums[fe.disk_bytenr] = csum_items
