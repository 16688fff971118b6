"""The fsync log tree (btrfs's tree-log), sans-I/O: what an fsync of a regular file writes
instead of a full commit, and how mount replays it. DESIGN.md §9 "Fsync through the log" is
the protocol, format/SPEC.md "Log tree" the bytes.

Theory of operation. The running transaction changes the fs, extent and csum trees in memory,
and a full commit makes all of it durable: it COWs every path it touched in every tree, the
extent, root and free-space trees converging after them. An fsync needs one file: its inode
item, the EXTENT_DATA items written since the last commit, and the checksums of their new
extents. ``TreeLog`` keeps those items, for every inode fsynced in this transaction, in a tree
of its own (owner TREE_LOG_OBJECTID) whose blocks come from the same allocator as everything
else but are never entered in the extent tree: the committed free-space record calls them
free. The transaction's first log sync writes the log's dirty blocks, flushes once, and writes
the primary superblock -- the committed trees unchanged, plus ``log_root`` -- with FUA; each
later one writes its blocks and a log slot naming them, and flushes once (SPEC "Log slots":
mount believes a slot only once what it names verifies, ``choose_log``). A later change to
the log COWs its blocks, and the old ones are pinned, like every extent the transaction frees,
until the next full commit is durable; that commit drops the log (its blocks pinned too, so
its free-space record calls them free) and writes ``log_root`` 0.

Which items. Every change to a file's EXTENT_DATA items goes through ``ExtentBatch``, which
notes the item it leaves at each changed key (``Engine.changed_extents``), and the checksum
items of each extent it adds (``Engine.new_csums``). Logging an inode takes those notes as
they are -- as btrfs logs from its in-memory extent maps -- with no lookup of the trees: each
noted key holding an item of this transaction's extents is logged (with that extent's
checksums, once per log, joined to the log's item that ends where they start: ``_joined``),
and each other noted key the log holds is dropped from it (stale:
what the log said there is no longer so). Items of older extents need no logging: replaying
the new ones over the committed tree trims those exactly as the overwrites did. A change the
log cannot say (a name made, changed or removed, a new inode, a truncate:
``Engine.needs_commit``) makes that inode's fsync a full commit.

A chain of trees. What a sync logs goes into the delta (the tree the superblock names), a
leaf whose items win over those of the trees behind it; a stale item an older tree holds is
marked in the delta (``DROPPED``). A sync writes the delta's leaf. Once what a sync logs no
longer fits in that leaf, the delta is left as it is -- on disk already, never encoded
again -- and a new delta names it (``_freeze``): the log is the delta, then the trees each
names in turn. ``read_log`` gives replay and fsck the chain as one list.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import replace

from blockemu.engine.batch import in_key_order
from blockemu.engine.btree import BTree
from blockemu.engine.extents import Extents
from blockemu.engine.transaction import Engine, ReadFn, TreeStore
from blockemu.errors import CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.csum import csum_size
from blockemu.ondisk.csum import digests as all_digests
from blockemu.ondisk.csum import field as block_csum
from blockemu.ondisk.fast import ITEM_SIZE
from blockemu.ondisk.items import FileExtent, RootItem
from blockemu.ondisk.logslot import SlotInfo, decode_slot
from blockemu.ondisk.structs import CSUM_FIELD
from blockemu.ondisk.superblock import SuperInfo

U64_MAX = (1 << 64) - 1
Item = tuple[tuple[int, int, int], bytes]
Log = tuple[list[int], list[Item]]  # a log's blocks and items (``read_log``)
# A log past this many blocks makes the next fsync a full commit (which empties it), as btrfs
# commits when logging gets too costly. Every log sync re-encodes each log leaf its ranges
# touch, and scattered writes touch them all, so a log sync costs more with every leaf the
# log has grown since the last commit; a commit costs about the same whatever the log holds.
# Measured with fio's randwrite 4k fsync=32 on a 16 MiB file: a log allowed to grow (~17 blocks
# after 3 s) took 18-19.6 ms of the loop's CPU per fsync cycle, one capped at 6-10 blocks
# 14.4 ms, at 3 blocks 14.6-15 (commits too often), at 16 blocks 14.9-17.4. Measured again once
# logging took the writeback's notes (no lookups): 8 blocks 9.9-10.0 ms, 16 blocks 9.8-10.4,
# 32 blocks 10.7-11.4 (each log sync encodes more leaves than the commits it saves cost).
# Measured again (log6, 300 cycles, loaded machine): 4, 8 and 16 blocks all 11.3-13.5 ms.
# A log sync already writes only the blocks changed since the last one (a written block is
# COWed); 32 scattered writes change ~4.2 of ~4.4 log blocks each time, and a leaf's encoding
# is then ~230 us of the ~1 ms per cycle (the same call on the same leaf again at once: ~120 us;
# its items are cold). Tried and dropped: encoding a leaf from its bytes on disk, copying the
# stretches between changed items and packing only those (byte-identical, tested; branch
# log6-encode-verified): with ~18 changed items in ~200 a leaf has ~40 stretches, and their
# Python-level upkeep (~5 us each) ate the saving -- log encoding 1.0 vs 0.86-1.03 ms per cycle
# with each stretch checked by comparing it, 0.97-0.99 vs 1.06-1.07 trusting the changed keys.
# What did pay: the leaves a sync encoded held ~357 EXTENT_DATA and ~327 checksum items, one
# per 4 KiB extent; joined (``_joined``), ~15 checksum items, and the log fills more slowly.
# Once the log was two trees (a delta folded into a base) only a fold re-encoded the leaves the log had
# grown: the cap then measured (log7, 300 and 600 cycles, machine loaded to 4x its cores): 8, 16, 32 and
# 64 blocks within each other's spread (9.0-13.1 ms per cycle, the order changing run to run).
# Counted in instructions instead (keys14: callgrind, PYTHONHASHSEED=0, the same seeded job --
# mkfs, a 16 MiB encrypted file, 30 warm-up cycles, then N cycles -- with only the cap changed):
# 8 -> 16 blocks takes the job from 4,200 to 4,039 M instructions at N=120 and from 8,266 to
# 7,848 M at N=300 (-5 %; over cycles 121-300, 22.6 -> 21.2 M each: a commit re-encodes every
# leaf the scattered writes dirtied, and the trees grow as the file fragments, so commits cost
# more with time while a log sync does not); device writes 7,784 -> 5,843.
# Process CPU, alternated, 3 runs of 300 cycles each: 7.9-8.6 ms per cycle at 8, 6.1-7.6 at 16.
# 32 and 64 blocks: 4,070 and 4,006 M at N=120, CPU within 16's spread -- not clearly better,
# and replay reads the whole log, so the cap stays at the smallest that measured the gain.
# With the log a chain of trees (below) a sync's cost no longer grows with the log, and only
# the commits change with the cap (fsync16, logcap16: the same job, plain file, callgrind, N=800
# less N=0): 16 blocks 12.31 M instructions a cycle (10 commits), 32 blocks 11.36 M (5), 64 blocks
# 10.61 M (2); process CPU alternated, 4 runs each: 4.17-4.71 ms a cycle at 16, 3.96-4.21 at 64.
# It stayed at 16 while the log's blocks came out of the metadata reserve (they stay taken
# through the commit that drops them); now they leave the reserve and the room promised to dirty
# data (``TreeLog._keep``), so the log's size cannot cost an ENOSPC anywhere else, and the cap
# bounds only what replay reads and the log's blocks in memory (64: 1 MiB at 16 KiB nodes). Not
# scaled with the image: near full, the keep already makes an fsync commit rather than log.
LOG_COMMIT_BLOCKS = 64
# The log is a chain of trees (SPEC "Log tree"): the superblock names the delta, which holds what
# was logged since it began and, once an older tree stands behind it, LINK_KEY naming that one
# (which may name one older still); a newer tree's items win. A sync encodes the delta (one
# leaf) and no block behind it; a delta that has no room for what a sync logs is left as it
# is, written already, and a new delta names it. Why: every log sync re-encoded every leaf its
# scattered items touched -- all of a one-tree log's; then, with two trees, every fold
# re-encoded each leaf of the base its items touched (all of them again: 2.45 blocks encoded
# per sync on the fio-like cycle, of which the fold's ~1.5; fsync16).
LINK_KEY = (S.TREE_LOG_OBJECTID, S.ROOT_ITEM, 1)
# where an older build's two-tree log named its base; read still, never written: a build that
# knows only BASE_KEY refuses LINK_KEY ("unexpected item") rather than reading two trees of a
# longer chain and missing the rest
BASE_KEY = (S.TREE_LOG_OBJECTID, S.ROOT_ITEM, 0)
DROPPED = b""  # a newer tree's EXTENT_DATA item saying an older tree's item at its key is stale


def extent_csums(csums: list[Item], starts: list[int], bytenr: int, length: int, size: int, per: int) -> list[Item]:
    """The checksum items of the extent [bytenr, +length) as writeback makes them (``per``
    sectors each, from the extent's start), cut from the log's ``csums`` (in key order,
    ``starts`` their bytenrs), one of which may span several extents (``TreeLog._joined``).
    Sectors no item covers get none (fsck says MISSING_CSUM)."""
    end, pieces = bytenr + length, []  # [first sector, digests] of each covered stretch
    i = max(bisect_right(starts, bytenr) - 1, 0)
    while i < len(csums) and starts[i] < end:
        start, body = starts[i], csums[i][1]
        lo, hi = max(start, bytenr), min(start + len(body) // size * S.SECTOR_SIZE, end)
        if lo < hi:
            digests = body[(lo - start) // S.SECTOR_SIZE * size:(hi - start) // S.SECTOR_SIZE * size]
            if pieces and pieces[-1][0] + len(pieces[-1][1]) // size * S.SECTOR_SIZE == lo:
                pieces[-1][1] += digests
            else:
                pieces.append([lo, digests])
        i += 1
    return [((S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, first + k * S.SECTOR_SIZE), digests[k * size:(k + per) * size])
            for first, digests in pieces for k in range(0, len(digests) // size, per)]


class TreeLog:
    """The running transaction's log tree, in memory; empty until an fsync logs an inode."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store: TreeStore | None = None
        self.tree: BTree | None = None  # the delta: what the superblock names
        self.base: BTree | None = None  # the tree the delta's LINK_KEY names, once a delta was frozen
        self.older: set[tuple[int, int, int]] = set()  # the keys of the trees behind the delta
        self.logged: dict[int, bytes] = {}  # ino -> the inode item the log holds
        self.held: dict[int, set[int]] = {}  # ino -> file offsets of the EXTENT_DATA items the log holds
        self.csummed: set[int] = set()  # extents whose checksum items the log holds
        # a log_inode failed (ENOSPC) after marking items logged that it never applied: no log
        # sync until the commit that drops the log (``spoil``)
        self.spoiled = False
        self.csum_ends: dict[int, Item] = {}  # the log's checksum items, by where their sectors end
        # tree blocks' worth of room the layer above promised to dirty data and writeback has not
        # taken yet (``Filesystem.promised_blocks``): the log may not take it (``_keep``)
        self.promised: Callable[[], int] = lambda: 0
        self.sequence = 0  # log syncs durable in this transaction (a slot's number is the next)
        self.base_root = 0  # the log root the durable primary superblock names (0: none yet)

    def can_log(self, ino: int) -> bool:
        """Whether an fsync of ``ino`` may go through the log: its change is one the log can say
        (``Engine.needs_commit``), and the log is still small enough to be worth syncing."""
        return not self.spoiled and ino not in self.engine.needs_commit and self.blocks() <= LOG_COMMIT_BLOCKS

    def spoil(self) -> None:
        """A ``log_inode`` failed: it may have marked items logged (``logged``, ``held``,
        ``csummed``, the changes taken from ``Engine.changed_extents``) that the log does not
        hold. A later sync would then write the log without them and acknowledge an fsync whose
        inode it lacks (an fsync grouped into the failed sync, next at the lock before the
        fallback commit, lost its data to a power cut). Every fsync commits until ``drop``."""
        self.spoiled = True

    def blocks(self) -> int:
        """The log tree's blocks (its store keeps every one: its cache is unbounded)."""
        return 0 if self.store is None else len(self.store.dirty) + len(self.store.clean)

    def _tree(self) -> BTree:
        if self.tree is None:
            e = self.engine
            # every block of the log stays cached: it is never read back while mounted
            self.store = TreeStore(e.store.read, nodesize=e.sb.nodesize, csum_type=e.sb.csum_type, fsid=e.sb.fsid,
                                   transid=e.transid, allocator=e.allocator, cache_blocks=U64_MAX)
            self._keep()
            root = self.store.new_block(S.TREE_LOG_OBJECTID, 0)
            self.tree = BTree(self.store, S.TREE_LOG_OBJECTID, root.bytenr, 0)
        return self.tree

    def _keep(self) -> None:
        """Make each new block of the log leave the metadata reserve (``Engine.data_keep``) and
        the room promised to dirty data. The log's blocks are in no tree a commit frees, and
        every one -- the live ones, and the old copy of each COWed since (pinned) -- stays taken
        until the commit that drops the log is durable: so the log is paid for from the free
        room as data is, never from the reserve that commit needs for its own blocks, nor from
        the room writeback needs for data ``write()`` acknowledged. A block that would take
        either fails with ENOSPC, and the fsync commits instead (``Volume._log_sync``). Set for
        each inode logged: nothing between here and the sync's write changes either amount."""
        assert self.store is not None
        self.store.keep = self.engine.data_keep() + self.promised()

    def log_inode(self, ino: int) -> None:
        """Bring inode ``ino``'s items in the log up to the running transaction's. The changes
        are applied to the delta in one pass (``BTree.apply``): an fsync after scattered writes
        re-logs many ranges, and each would otherwise be its own descents and COWs. Gathered in
        a dict, not a ``TreeBatch``: nothing reads them back before they are applied. If they
        do not fit in the delta's leaf, a new delta takes them (``_freeze``)."""
        e = self.engine
        changes: dict[tuple[int, int, int], bytes | None] = {}
        if self.store is not None:
            self._keep()
        body = e.trees[S.FS_TREE_OBJECTID].get((ino, S.INODE_ITEM, 0))
        if body is None:
            raise CorruptionError(f"inode {ino} has no INODE_ITEM to log", "MISSING_INODE")
        if self.logged.get(ino) != body:
            changes[(ino, S.INODE_ITEM, 0)] = body
            self.logged[ino] = body
        held, transid, new_csums = self.held.setdefault(ino, set()), e.transid, e.new_csums
        csums: list[Item] = []  # of the extents logged here for the first time
        for offset, item in e.changed_extents.pop(ino, {}).items():
            key = (ino, S.EXTENT_DATA, offset)
            if item is None or item[0].generation != transid:
                if offset in held:  # stale: what the log said here is no longer so
                    changes[key] = DROPPED if key in self.older else None
                    held.remove(offset)
                continue
            fe, body = item
            changes[key] = body
            held.add(offset)
            if fe.disk_bytenr not in self.csummed:
                self.csummed.add(fe.disk_bytenr)
                csums.extend(new_csums[fe.disk_bytenr])
        changes.update(self._joined(csums))
        if self._full(changes):
            self._freeze()
            # a key the delta held (to be removed from it) is now one an older tree holds
            changes = {key: DROPPED if body is None else body for key, body in changes.items()}
        self._tree().apply(in_key_order(changes))

    def _full(self, changes: dict[tuple[int, int, int], bytes | None]) -> bool:
        """Whether the delta should be left as it is and a new one take ``changes``: they may
        not fit in its leaf (counted as if every item were new), or it has outgrown its leaf
        already. A delta holding nothing but its link is never left: the next would be the same."""
        tree = self._tree()
        if tree.level:
            return True
        assert self.store is not None
        leaf = self.store.get(tree.root)
        if len(leaf.keys) <= (self.base is not None):
            return False
        return leaf.used + sum(ITEM_SIZE + len(body) for body in changes.values() if body is not None) > tree.body

    def _freeze(self) -> None:
        """Leave the delta as it is (written already, or written with this sync: encoded once)
        and start a new delta naming it: its keys are from now on an older tree's."""
        assert self.tree is not None and self.store is not None
        frozen = self.tree
        self.older.update(key for key, _ in frozen.items() if key[1] == S.EXTENT_DATA)
        root = self.store.new_block(S.TREE_LOG_OBJECTID, 0)
        self.tree = BTree(self.store, S.TREE_LOG_OBJECTID, root.bytenr, 0)
        self.tree.insert(LINK_KEY, RootItem(generation=self.engine.transid, root_dirid=0, bytenr=frozen.root,
                                            bytes_used=0, last_snapshot=0, flags=0, refs=1, level=frozen.level).pack())
        self.base = frozen

    def _joined(self, items: list[Item]) -> list[Item]:
        """Checksum items for the log, each joined to the one that ends where it starts -- this
        call's, or one the log holds already (then that one grows) -- up to the largest item.
        Small writes make one extent each, one after another on disk: one item per extent made
        half the log's items, and the leaf holding them, which grows at every sync, was
        re-encoded whole each time. Replay gives each extent its own digests back
        (``extent_csums``), so the csum tree gets what writeback would have put there."""
        size, limit, ends = csum_size(self.engine.sb.csum_type), self._tree().max_item, self.csum_ends
        out: dict[tuple[int, int, int], bytes] = {}
        for key, body in sorted(items):
            start = key[2]
            before = ends.pop(start, None)
            if before is not None and len(before[1]) + len(body) <= limit:
                key, body = before[0], before[1] + body
            elif before is not None:
                ends[start] = before  # full: stays as it is
            out[key] = body
            ends[key[2] + len(body) // size * S.SECTOR_SIZE] = (key, body)
        return list(out.items())

    def prepare_sync(self) -> tuple[list[tuple[int, bytes]], SuperInfo | SlotInfo] | None:
        """The log blocks to write and what names them: the superblock pointing at them, or --
        once a superblock naming the log is durable (``base_root``) and the blocks fit a slot's
        list -- the log slot written instead of it; None if the log on disk already says
        everything (nothing was logged since the last sync). The superblock is only made when
        it is the one written: a copy of its 21 fields cost ~20 us of every later sync."""
        if self.tree is None or self.store is None or not self.store.dirty:
            return None
        sb = self.engine.sb
        writes = self.store.encode_dirty()
        if self.base_root and len(writes) <= S.LOG_SLOT_BLOCKS:
            return writes, SlotInfo(sb.generation, self.base_root, self.sequence + 1, self.tree.root, self.tree.level,
                                    tuple((bytenr, raw[:CSUM_FIELD]) for bytenr, raw in writes))
        return writes, replace(sb, log_root=self.tree.root, log_root_level=self.tree.level,
                               log_root_transid=self.engine.transid, incompat_flags=sb.incompat_flags | S.INCOMPAT_LOG_BITS)

    def finish_sync(self, head: SuperInfo | SlotInfo) -> None:
        """The log sync is durable (its superblock, or its slot and everything the slot names:
        ``head``, as ``prepare_sync`` gave it): later changes to the log COW (and pin) its blocks, so no block a durable log
        names is written over before the commit that drops the log -- the fallback of a later
        sync whose slot landed without its blocks (``choose_log``) needs them as they are."""
        assert self.store is not None and self.tree is not None
        self.store.mark_written()
        self.sequence += 1
        if isinstance(head, SuperInfo):
            self.base_root = self.tree.root

    def drop(self) -> None:
        """A full commit supersedes the log: its blocks are freed -- pinned until that commit is
        durable, so its free-space record calls them free and nothing reuses them before."""
        if self.store is not None:
            # every block the store holds (its cache is unbounded), not only those the root
            # reaches: an insert that failed half way (ENOSPC) may have allocated others
            for block in [*self.store.dirty.values(), *self.store.clean.values()]:
                self.store.free_block(block)
        self.tree = self.base = self.store = None
        self.logged, self.held, self.csummed, self.csum_ends, self.older = {}, {}, set(), {}, set()
        self.spoiled = False
        self.sequence = self.base_root = 0


def log_trees(read: ReadFn, sb: SuperInfo) -> list[BTree]:
    """The log's trees, the delta first, then each tree the one before names (its LINK_KEY, or
    an older build's BASE_KEY), read through a store of their own: the log's blocks lie in
    space the committed free-space record calls free."""
    store = TreeStore.reader(read, sb, sb.log_root_transid)
    trees: list[BTree] = []
    bytenr, level = sb.log_root, sb.log_root_level
    while True:
        if any(t.root == bytenr for t in trees):
            raise CorruptionError(f"log tree: block {bytenr} is reached twice (a tree of the log names one before it)",
                                  "BAD_LOG_ITEM", bytenr)
        store.get(bytenr, generation=sb.log_root_transid, level=level, owner=S.TREE_LOG_OBJECTID)
        trees.append(BTree(store, S.TREE_LOG_OBJECTID, bytenr, level))
        # ``is None``, not falsiness: an empty body (an edit under a valid checksum) is damage,
        # and read as the chain's end it silently dropped what the older trees hold
        body = next((b for b in (trees[-1].get(LINK_KEY), trees[-1].get(BASE_KEY)) if b is not None), None)
        if body is None:
            return trees
        try:
            root = RootItem.unpack(body)
        except CorruptionError as e:
            raise CorruptionError(f"log tree: block {bytenr}: its link to an older tree is damaged ({e})",
                                  "BAD_LOG_ITEM", bytenr) from None
        bytenr, level = root.bytenr, root.level


def read_log(read: ReadFn, sb: SuperInfo) -> Log:
    """The log's blocks and items (for replay and fsck): each tree's items replaced by those of
    the newer trees at their keys, without the stale ones (``DROPPED``) and the links."""
    trees = log_trees(read, sb)
    blocks, items = [b.bytenr for t in trees for b in t.blocks()], {}
    if len(set(blocks)) != len(blocks):
        # a tree reaching a newer one's block: fsck found each block readable, and replay's
        # reserve then failed on the second sight of one -- say what is wrong, once
        shared = next(b for b in blocks if blocks.count(b) > 1)
        raise CorruptionError(f"log tree: block {shared} is reached twice (two trees of the log share it)",
                              "BAD_LOG_ITEM", shared)
    for t in reversed(trees):
        items.update(t.items())
    items.pop(LINK_KEY, None)
    items.pop(BASE_KEY, None)
    return blocks, sorted((key, body) for key, body in items.items() if body != DROPPED)


def choose_log(read: ReadFn, sb: SuperInfo) -> tuple[SuperInfo, list[str], Log | None]:
    """The superblock as the newest log that landed whole makes it (its ``log_root`` that log's),
    a line for each newer log slot passed over, and that log as ``read_log`` gives it when
    choosing it read it (a slot's, whose items name the data to verify; None: the caller reads
    it if it needs it) -- mount read and parsed the chosen log twice, here and for replay. A slot is written in the same flush as the
    blocks and data it names (SPEC "Log slots"), so a power cut may land it without them: its
    log counts only if every block the sync wrote reads back with the checksum field the slot
    recorded and every data sector the log names matches the log's checksum -- else that sync
    was never acknowledged, and the slot before it (made durable by a completed flush, its
    blocks and data never reused before the next commit: ``TreeLog.finish_sync``), or the
    superblock's own log, is the log. A log whose blocks all landed but that does not read (a
    broken chain) is damage, raised as ``read_log`` raises it, and so is an EIO: neither says
    the sync did not complete. A superblock without LOG_SLOTS (an older build's log) has none."""
    if not sb.log_root or not sb.incompat_flags & S.INCOMPAT_LOG_SLOTS:
        return sb, [], None
    slots = [decode_slot(read(at, S.LOG_SLOT_SIZE), at, sb.fsid, sb.csum_type) for at in S.LOG_SLOT_OFFSETS]
    mine = sorted((s for s in slots if s is not None and s.generation == sb.generation and s.base_root == sb.log_root),
                  key=lambda s: -s.sequence)
    passed: list[str] = []
    for slot in mine:
        if slot.damage:  # whole, yet no sync's record: it cannot say whether its sync completed
            raise CorruptionError(f"log tree: {slot.damage}", "BAD_LOG_ITEM", slot.log_root)
        new = replace(sb, log_root=slot.log_root, log_root_level=slot.log_root_level)
        why, log = _blocks_missing(read, new, slot), None
        if why is None:
            log = read_log(read, new)
            why = _data_missing(read, new, log[1])
        if why is None:
            return new, passed, log
        if passed:
            # only the newest sync can be in flight: this one's flush completed before the newer
            # slot (the same superblock's log) was written -- damage, not a power cut, and
            # replaying the log before it would drop fsyncs it acknowledged
            raise CorruptionError(f"log tree: log sync {slot.sequence} (its log slot names log root {slot.log_root}) "
                                  f"was durable before log sync {slot.sequence + 1} began, yet does not read "
                                  f"whole: {why}", "BAD_LOG_ITEM", slot.log_root)
        passed.append(f"log sync {slot.sequence} (its log slot names log root {slot.log_root}) did not land "
                      f"whole and was never acknowledged: {why}; the log before it replays")
    return sb, passed, None


def _blocks_missing(read: ReadFn, sb: SuperInfo, slot: SlotInfo) -> str | None:
    """Which log block the log sync of ``slot`` wrote is not on disk (None: all of them are)."""
    for bytenr, csum in slot.blocks:
        raw = read(bytenr, sb.nodesize)
        # the whole block, not only its checksum field: a block larger than a sector may land
        # torn, its first sector (the field) new and the rest old -- a sync that did not complete
        if raw[:CSUM_FIELD] != csum or block_csum(sb.csum_type, memoryview(raw)[CSUM_FIELD:]) != csum:
            return f"log block {bytenr} is not the one it wrote"
    return None


def _data_missing(read: ReadFn, sb: SuperInfo, items: list[Item]) -> str | None:
    """Which extent a log (its ``items``) names does not hold the data its checksums say (None:
    every one does): a slot lands in the same flush as the data it names."""
    csums = [(key, body) for key, body in items if key[:2] == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM)]
    starts, size, seen = [k[2] for k, _ in csums], csum_size(sb.csum_type), set()
    for key, body in items:
        if key[1] != S.EXTENT_DATA:
            continue
        fe = FileExtent.unpack(body)
        if fe.disk_bytenr in seen:
            continue
        seen.add(fe.disk_bytenr)
        for (_, _, first), digests in extent_csums(csums, starts, fe.disk_bytenr, fe.disk_num_bytes, size,
                                                   fe.disk_num_bytes // S.SECTOR_SIZE):
            if all_digests(read(first, len(digests) // size * S.SECTOR_SIZE), sb.csum_type) != digests:
                return f"the data of extent [{fe.disk_bytenr}, +{fe.disk_num_bytes}) does not match its checksums"
    return None


def replay(engine: Engine, blocks: list[int], items: list[Item]) -> None:
    """Apply the superblock's log (``read_log``'s ``blocks`` and ``items``: mount reads it first,
    to tell a log that does not read from a committed tree that does not) to the running
    transaction (mount does this before anything allocates; a full commit then makes it durable
    and clears the log). For each logged inode: its inode item; each logged EXTENT_DATA item
    over what the tree maps there (references released, extents at zero references freed); the
    new extents' EXTENT_ITEMs and checksums."""
    sb = engine.sb
    alloc = engine.allocator
    csums: list[Item] = []
    extents: dict[int, int] = {}
    for key, body in items:
        if key[1] == S.EXTENT_DATA:
            fe = FileExtent.unpack(body)
            if extents.setdefault(fe.disk_bytenr, fe.disk_num_bytes) != fe.disk_num_bytes:
                raise CorruptionError(f"log tree: extent {fe.disk_bytenr} logged with two lengths", "BAD_LOG_ITEM", sb.log_root)
        elif key[:2] == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM):
            csums.append((key, body))
        elif key[1] != S.INODE_ITEM:
            raise CorruptionError(f"log tree: unexpected item {key}", "BAD_LOG_ITEM", sb.log_root)
    # the committed free-space record calls all of these free: take them before anything allocates
    for bytenr in blocks:
        alloc.reserve(bytenr, sb.nodesize)
    for bytenr, length in extents.items():
        alloc.reserve(bytenr, length)
    fs, ext = engine.trees[S.FS_TREE_OBJECTID], Extents(engine)
    starts, size = [k[2] for k, _ in csums], csum_size(sb.csum_type)
    for key, body in items:
        ino = key[0]
        if key[1] == S.INODE_ITEM:
            if fs.get(key) is None:
                raise CorruptionError(f"log tree: inode {ino} is not in the fs tree", "BAD_LOG_ITEM", sb.log_root)
            fs.insert(key, body, replace=True)
        elif key[1] == S.EXTENT_DATA:
            fe = FileExtent.unpack(body)
            mine = extent_csums(csums, starts, fe.disk_bytenr, fe.disk_num_bytes, size, ext.sectors_per_csum_item)
            if sum(len(b) for _, b in mine) != fe.disk_num_bytes // S.SECTOR_SIZE * size:
                # as fsck says (MISSING_CSUM): replayed, the extent's sectors would fail every read
                raise CorruptionError(f"log tree: extent [{fe.disk_bytenr}, +{fe.disk_num_bytes}) lacks sector "
                                      "checksums", "MISSING_CSUM", fe.disk_bytenr)
            ext.map_logged(ino, key[2], fe, mine)
    for bytenr in blocks:
        alloc.pin(bytenr, sb.nodesize)  # free once the commit that ends the replay is durable
