"""The writeback queue: dirty pages -> encrypted extents -> device -> commit.

A background task writes back on the commit interval, when dirty bytes pass
the background threshold, and on request (fsync, sync, unmount, key
removal). Per inode, dirty pages coalesce into runs of up to ``max_extent``
bytes; each run becomes one new extent: a fresh random nonce, the extent key
derived from the master secret *now* (the inode's lease keeps that secret
alive in soft mode), AES-256-XTS and checksums over the ciphertext in a sealing
worker (``sealer.py``), then -- inside the running transaction -- allocation,
the new items, and the device write. A run that does not fit while space freed
in the running transaction is still pinned commits first to reclaim it; a run
longer than the largest free extent is split, each piece its own extent with its
own nonce (as btrfs does). A run that cannot be written (ENOKEY, EIO, ENOSPC) is
dropped and its error recorded on the inode, to be raised by the next fsync or
close of each handle open on it, and on the mount, to be raised by the next sync (``errseq``): an acknowledged
write is never lost silently.

The background task is supervised: whatever a run raises, its pages are never
marked clean without the loss recorded; an exception that is not an OSError
is a bug, so it is logged with its traceback and aborts the mount read-only
(``vol.abort``) -- neither the task nor the data dies silently.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from operator import attrgetter, itemgetter
from typing import Any, Protocol

from blockemu.crypto import fscrypt
from blockemu.crypto.fscrypt import Buffer
from blockemu.crypto.keyring import Keyring
from blockemu.crypto.sealer import DEPTH, TIMEOUT, Parts, RunKey, Sealer, worker_count
from blockemu.engine.extents import Extents, NewExtent
from blockemu.errors import DeviceIOError, InvalidArgument, NoKeyError, NoSpaceError
from blockemu.fs.errseq import ErrSeq
from blockemu.fs.pagecache import PAGE, PageCache, Pages, Run
from blockemu.fs.volume import Volume, outlast_cancellation
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import ExtentContext
from blockemu.units import parse_size

log = logging.getLogger(__name__)
_INO = attrgetter("ino")
_FIRST = itemgetter(0)


class Inode(Protocol):
    """What writeback reads and updates on an inode (``filesystem.Inode`` is one)."""

    ino: int
    size: int
    disk_size: int
    nbytes: int
    key_id: bytes | None
    pages: Pages
    inflight: int  # I/O in flight: the key's lease is held while it is non-zero
    wb_lock: asyncio.Lock
    errs: ErrSeq  # the file's writeback errors, for each of its open handles to report
    lost_bytes: int
    epoch: int  # bumped when writeback changes the extent mappings (see Filesystem._fill)


Piece = tuple[Inode, Run]  # a run taken for writeback, and the inode whose pages it holds


class Turn:
    """A group's place in its flush's order. Groups seal in parallel but are placed
    (allocation, device write, items) in the order they were taken, so an image's layout --
    which extent lands where, the order of writes and of tree updates -- depends on the data
    alone, not on which sealing finished first: a crash campaign records a workload's writes
    and must count the same crash states on every run, executor and machine. Only a group's
    first placement is ordered: a piece retried after a split goes when it can (a later group
    may hold the sealing slot it needs while waiting for its own turn). A piece retried after
    a commit for pinned room keeps its ciphertext and its turn: it needs no slot, and it
    queues for the room (``Volume.first_for_space``), which must not wait for a slot others
    hold while they wait to join behind it."""

    def __init__(self, before: asyncio.Event | None) -> None:
        self._before = before
        self.passed = asyncio.Event()

    async def __aenter__(self) -> None:
        if self._before is not None and not self.passed.is_set():
            await self._before.wait()

    async def __aexit__(self, *exc: object) -> None:
        self.passed.set()


class Owner(Protocol):
    """The few calls writeback makes into the filesystem it serves: that filesystem imports
    writeback, so writeback names only this interface, never the filesystem itself."""

    vol: Volume
    keyring: Keyring
    extents: Extents

    @property
    def inodes(self) -> Mapping[int, Inode]: ...

    async def settle(self, inode: Inode) -> None:
        """Writeback has left the inode (its ``wb_lock`` still held): delete it if it was
        unlinked and closed meanwhile, else a key being removed may lock it."""

    def save_inode(self, inode: Inode) -> None:
        """Write the inode item (size, nbytes, times) into the running transaction."""

    def data_keep(self) -> int:
        """Tree blocks of room a data allocation must leave (the reserve write() admitted under)."""


class _NoFit(Exception):
    """A run found no free extent for itself (``error``): space freed in the running
    transaction may be ``pinned`` until it commits, and the first ``fit`` bytes would fit."""

    def __init__(self, error: NoSpaceError, fit: int, pinned: bool) -> None:
        super().__init__(error)
        self.error, self.fit, self.pinned = error, fit, pinned


def arena_frames(dirty_limit: int, *, device_cache: int, clean_limit: int, max_extent: int, workers: int) -> int:
    """Page frames for dirty data. The dirty limit is the write path's whole memory budget:
    the device's volatile cache (up to the 2x its writes stall at), the clean pages
    writeback leaves behind, the ciphertext in the sealing slots and an eighth for the caches'
    own bookkeeping and the allocator's slack (measured: ~8 MiB at 64 MiB) share it with the
    dirty pages, which get the rest -- never less than a few extents' worth."""
    rest = dirty_limit * 7 // 8 - 2 * device_cache - clean_limit - workers * DEPTH * max_extent
    return max(rest, 4 * max_extent) // PAGE


def joined(writes: Iterable[tuple[int, int, Parts]]) -> list[tuple[int, Buffer]]:
    """Writes (each its offset, length and parts) that continue one another as one write, its
    parts joined: a batch's extents are placed one after another (``Allocator.alloc_many``), and
    the device spends as much per write as per byte of a small one -- as the block layer merges
    contiguous bios into one request. That join is the one copy of a run without a key, which
    comes as its pages (the device copies what it is not lent, unless it is ``bytes`` already)."""
    spans: list[tuple[int, Parts]] = []
    end = -1
    for offset, length, parts in writes:
        if offset != end:
            spans.append((offset, []))
        spans[-1][1].extend(parts)
        end = offset + length
    return [(offset, parts[0] if len(parts) == 1 else b"".join(parts)) for offset, parts in spans]


# the mount options (``Writeback``'s keywords) and the least each may be, with whether that least
# is allowed: ``mount(seal_workers=-1)`` or ``dirty_limit=-5`` mounted and misbehaved later, and an
# unknown keyword was a TypeError, not the EINVAL a caller catches as an OSError
OPTION_FLOORS: dict[str, tuple[float, bool]] = {
    "interval": (0, False), "seal_timeout": (0, False), "background_bytes": (0, True), "cache_limit": (0, True),
    "dirty_limit": (PAGE, True), "max_extent": (PAGE, True), "batch_bytes": (PAGE, True), "seal_workers": (0, True),
}


# the options that are byte counts: written as sizes too (``dirty_limit="128M"``), as mkfs's size is
SIZE_OPTIONS = frozenset({"background_bytes", "cache_limit", "dirty_limit", "max_extent", "batch_bytes"})


def check_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Refuse an unknown or out-of-range mount option (EINVAL, naming it) before the image opens;
    the options, a size written as text parsed."""
    out = {}
    for name, value in opts.items():
        out[name] = value
        if name not in OPTION_FLOORS:
            raise InvalidArgument(f"unknown mount option {name!r} (known: {', '.join(sorted(OPTION_FLOORS))})")
        if value is None and name in ("seal_workers", "batch_bytes"):
            continue  # chosen from the machine / the dirty limit
        low, inclusive = OPTION_FLOORS[name]
        if name in SIZE_OPTIONS and isinstance(value, str):
            try:
                out[name] = value = parse_size(value)
            except InvalidArgument as e:
                raise InvalidArgument(f"bad value for mount option {name}: {value!r} (must be a size, as 128M)") from e
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # max_extent="16K" was told it "must be at least 4096"; a size is parsed above
            raise InvalidArgument(f"bad value for mount option {name}: {value!r} (must be a number, not {type(value).__name__})")
        # said as what is allowed, so a NaN is refused too: interval=nan passed ``value <= 0``, and the
        # writeback task's wait, max(0, nan) = 0 s, spun and never committed on the interval
        if not (value > low or (value == low and inclusive)):
            raise InvalidArgument(f"bad value for mount option {name}: {value!r} (must be {'at least' if inclusive else 'more than'} {low})")
    return out


class Writeback:
    def __init__(
        self,
        fs: Owner,
        *,
        interval: float = 5.0,
        background_bytes: int = 16 << 20,
        dirty_limit: int = 64 << 20,
        max_extent: int = 1 << 20,
        seal_workers: int | None = None,
        seal_timeout: float = TIMEOUT,
        batch_bytes: int | None = None,
        cache_limit: int = 8 << 20,
    ) -> None:
        """Owns the page cache too: its arena is sized from this writeback's memory budget.
        ``cache_limit`` bounds the clean pages; a sealing worker that takes longer than
        ``seal_timeout`` seconds over one extent is taken for hung and replaced."""
        self.fs = fs
        self.device = fs.vol.device
        workers = worker_count(seal_workers)
        frames = arena_frames(dirty_limit, device_cache=self.device.cache_limit, clean_limit=cache_limit,
                              max_extent=max_extent, workers=workers)
        self.cache = PageCache(clean_limit=cache_limit, dirty_frames=frames)
        self.interval = interval
        self.background_bytes = background_bytes
        self.dirty_limit = dirty_limit
        self.max_pages = max(1, max_extent // PAGE)
        self.batch_pages = max(self.max_pages, (batch_bytes or max(dirty_limit // 8, max_extent)) // PAGE)
        # the device may keep a sealed extent in its slot rather than copy it: as many slots as
        # extents its cache holds before writes stall (the budget above counts that cache already)
        self.sealer = Sealer(arena=self.cache.arena, max_extent=self.max_pages * PAGE, workers=workers, timeout=seal_timeout,
                             lendable=2 * self.device.cache_limit // (self.max_pages * PAGE))
        self._kick = asyncio.Event()
        self._room = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.stats = {"extents": 0, "bytes": 0, "lost_bytes": 0, "errors": 0}
        self.errseq = ErrSeq()  # what ``sync`` reports: every drop is noted there as on its inode

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="blockemu-writeback")

    async def stop(self) -> None:
        """End the background task, then the sealing workers -- those even if the task failed."""
        self._stopping = True
        self._kick.set()
        try:
            if self._task is not None:
                task, self._task = self._task, None
                await task
        finally:
            await self.sealer.close()

    def kick(self) -> None:
        self._kick.set()

    async def _run(self) -> None:
        """Write back under memory pressure; commit on the interval. Pressure alone does not
        commit: data extents join the running transaction, which the interval (or an fsync)
        makes durable, so sealing never waits behind a device flush it does not need."""
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        while not self._stopping:
            try:
                await asyncio.wait_for(self._kick.wait(), max(0.0, last_commit + self.interval - loop.time()))
            except TimeoutError:
                pass
            self._kick.clear()
            if self._stopping:
                break
            try:
                await self.flush_all()
                if loop.time() - last_commit >= self.interval:
                    last_commit = loop.time()  # a failed commit too waits for the next interval: no spinning
                    await self.fs.vol.commit()
            except OSError:
                # a failed write is recorded on its inode, a failed commit aborts the volume
                # (vol.aborted); either way the error reaches the caller that asks next
                pass
            except Exception as e:
                self._bug("writeback", e)
            finally:
                self._room.set()

    def over_limit(self, nbytes: int = 0) -> bool:
        """The memory written data holds on its way down -- dirty pages (and those being
        written) and the device's volatile cache -- is past the hard limit, or too few free
        frames are left for a write of ``nbytes``: dirty pages then wait for writeback rather
        than spill onto the heap. (Only a write larger than the whole arena spills, and only
        its excess.) The arena and the sealing slots are fixed in size."""
        cache = self.cache
        if cache.dirty_bytes + self.device.cached_bytes() > self.dirty_limit:  # (``_over_bytes``)
            return True
        arena = cache.arena
        return arena.available() < (nbytes if nbytes < arena.size else arena.size) // PAGE and cache.dirty_bytes > 0

    def _over_bytes(self) -> bool:
        return self.cache.dirty_bytes + self.device.cached_bytes() > self.dirty_limit

    async def wait_for_room(self, nbytes: int = 0) -> None:
        """Backpressure: writers wait here while writeback's memory is over the hard limit.
        Writeback drains the dirty pages; the device's cache drains once it passes its own
        threshold -- and on request here when its bytes count towards the limit passed, or a
        small limit would wait on it forever. Not when the writer waits for free frames:
        writeback frees those, a destage does not (a streaming writer always waits for frames,
        and asked for a small destage -- a trip to the I/O thread -- about every other MiB)."""
        device = self.device
        while self.over_limit(nbytes):
            self._room.clear()
            self.kick()
            if device.cached_bytes() and self._over_bytes():
                device.destage_in_background().add_done_callback(lambda _t: self._room.set())
            await self._room.wait()

    async def flush_all(self) -> None:
        """Every dirty inode at once, in one pipeline: small runs of different files share seal
        batches, one allocation pass, one device writev and one pass over each tree (a sync
        after writes to a dozen small files paid a dozen of each). The inodes another flush
        holds (their ``wb_lock``) are flushed once those flushes are done, together in a second
        pipeline -- meanwhile the others are written: the runs such a flush took are no longer
        dirty but not yet in the trees, and a sync that did not wait for them would commit
        without them. (With four stress tasks a sync often found another's sync holding 10 to
        30 inodes, and flushed each on its own: a pipeline, a seal batch and a tree pass each.)
        (A clean inode a truncate, a punch or a delete holds is not waited for: what it does is
        not acknowledged yet.) The inodes come from the page cache's note of dirtied ones, not
        a scan of every cached inode."""
        inodes = self.dirty_inodes()
        free = [i for i in inodes if not i.wb_lock.locked()]
        held = [i for i in inodes if i.wb_lock.locked()]
        work = [asyncio.ensure_future(self._flush_together(group)) for group in (free, held) if group]
        if not work:
            return
        # every flush this started is done before it returns, however it ends: gather returned
        # at the first flush cancelled (a wait for another's lock) while the rest still had runs
        # in flight -- a cancelled unmount then dropped the page cache under them
        try:
            await asyncio.wait(work)
        except asyncio.CancelledError:
            for w in work:
                w.cancel()  # each lets the runs it has in flight finish (``_flush_locked``)
            await outlast_cancellation(work)
            for w in work:
                if not w.cancelled():
                    w.exception()  # retrieved: the cancellation is what this raises
            raise
        await asyncio.gather(*work)  # all done: raises the first failure

    def dirty_inodes(self) -> list[Inode]:
        """The cached inodes, in inode order, that have dirty pages or are held by a flush (its
        runs may be in flight): found among those the page cache noted as dirtied
        (``PageCache.dirtied``), which are dropped from that note here once they are neither.
        An inode's runs are in flight only while a flush holds its ``wb_lock``, and only pages
        it dirtied were taken, so every inode that has either is still noted."""
        noted, inodes, found = self.cache.dirtied, self.fs.inodes, []
        for ino in list(noted):
            inode = inodes.get(ino)
            if inode is not None and (inode.pages.dirty or inode.wb_lock.locked()):
                found.append(inode)
            else:
                noted.discard(ino)
        found.sort(key=_INO)
        return found

    async def _flush_together(self, inodes: list[Inode]) -> None:
        """Flush ``inodes`` in one pipeline. Their locks are taken in inode order (one taken by
        another flush since it was found free is waited for): a flush holding a lock waits only
        for a higher one, and ``flush_inode`` holds one lock, so no two flushes wait for each
        other."""
        async with contextlib.AsyncExitStack() as held:
            for inode in inodes:
                await held.enter_async_context(inode.wb_lock)
            await self._flush_locked(inodes)

    async def flush_inode(self, inode: Inode) -> None:
        """Write back what is dirty in ``inode`` now (``_flush_locked``)."""
        async with inode.wb_lock:
            await self._flush_locked([inode])

    async def _flush_locked(self, inodes: list[Inode]) -> None:
        """Write back what is dirty in ``inodes`` (whose ``wb_lock`` the caller holds) now: their
        runs are taken at once (their dirty bits cleared; a write landing meanwhile dirties a
        copy of its page, for the next flush) and written as a pipeline, at most
        ``batch_pages`` worth in flight, so sealing never drains between batches and memory
        stays bounded.

        Cancelling it (a cancelled fsync) never drops dirty pages: runs taken and not yet
        started are dirty again, and runs in flight are waited for -- not cancelled half
        way, and never left running once the inode's ``wb_lock`` is free, where a later
        flush could write the same page's newer data before them."""
        # A run holds its sealing slot until its turn to be placed, and turns go in group
        # order: with more groups in flight than slots, later groups (a queue's waiter loses
        # its place to a newcomer) could hold every slot waiting for the turn of a group that
        # waits for a slot -- a flush hung for ever (a 256 MiB dirty limit, 48 MiB written).
        lanes = asyncio.Semaphore(max(1, min(self.batch_pages // self.max_pages, self.sealer.slots or 1 << 30)))
        for inode in inodes:
            inode.inflight += 1
            inode.wb_size = inode.size  # what the runs taken next can hold (``_lose``)
            inode.flushing = len(inode.pages.dirty) * PAGE  # in st_blocks until mapped (``_mapped``)
        tasks: list[asyncio.Task] = []
        taken = [(inode, self.cache.take_dirty(inode.pages, self.max_pages)) for inode in inodes]  # all at once
        groups = self._groups(itertools.chain.from_iterable(zip(itertools.repeat(inode), runs) for inode, runs in taken))
        group: list[Piece] = []  # taken from ``groups``, not yet handed to a task
        before: asyncio.Event | None = None
        try:
            for group in groups:
                await lanes.acquire()
                turn = Turn(before)
                before = turn.passed
                tasks.append(asyncio.ensure_future(self._write_group(group, turn)))
                tasks[-1].add_done_callback(lambda _t: lanes.release())
                group = []
        finally:
            for inode, run in itertools.chain(group, itertools.chain.from_iterable(groups)):
                self.cache.untake(inode.pages, run)
            try:
                if await outlast_cancellation(tasks):
                    raise asyncio.CancelledError
            finally:
                for inode in inodes:
                    inode.inflight -= 1
                    inode.flushing = 0  # mapped, lost or dirty again
                    self.fs.release_meta(inode)  # (lost runs: what _mapped did not release)
        for task in tasks:
            task.result()
        for inode in inodes:
            await self.fs.settle(inode)

    def _groups(self, runs: Iterable[Piece]) -> Iterator[list[Piece]]:
        """Runs in the groups written together, each made as the pipeline asks for it:
        neighbouring small runs (those sealed on a thread), of one file or several, share one
        seal batch, one device writev and one pass over the trees, until the group is as big as
        a run a worker would seal (or ``max_extent``), so that several groups still fill the
        pipeline's lanes; a run big enough for a sealing worker goes on its own."""
        group: list[Piece] = []
        pages, most = 0, self.max_pages
        # the pages from which a run (or a group) is a worker's (``Sealer.pooled``: a run is never
        # over ``max_extent``), worked out once, not asked for twice per run
        big = min(-(-self.sealer.pool_from // PAGE), most + 1)
        for piece in runs:
            n = len(piece[1].entries)
            if group and (n >= big or pages >= big or pages + n > most):
                yield group
                group, pages = [], 0
            group.append(piece)
            pages += n
        if group:
            yield group

    async def _write_group(self, pieces: list[Piece], turn: Turn) -> None:
        try:
            await self._write_group_in_turn(pieces, turn)
        finally:
            turn.passed.set()  # however it ended, the next group's placement need not wait for it

    async def _write_group_in_turn(self, pieces: list[Piece], turn: Turn) -> None:
        """Write a group of runs as one batch. If the batch fails (no room, no key, an I/O error)
        it has changed no tree, so each run is written again on its own, where a run that does
        not fit is split or waits for a commit, and a run that cannot be written is recorded as
        lost on its inode: the batch is only the fast path."""
        if len(pieces) > 1:
            try:
                await self._write_batch(pieces, turn)
            except Exception as e:
                if not isinstance(e, OSError):  # the runs below then fail with EIO
                    self._bug(f"writeback of inode {', '.join(sorted({str(i.ino) for i, _ in pieces}))}", e)
            except BaseException:  # cancelled: the loss is recorded, the cancellation goes on
                for inode, run in pieces:
                    self._lose(inode, run, DeviceIOError("writeback interrupted"))
                self.cache.written([(inode.pages, run) for inode, run in pieces])
                self._room.set()
                raise
            else:
                self.cache.written([(inode.pages, run) for inode, run in pieces])
                self._room.set()
                return
        for i, (inode, run) in enumerate(pieces):
            try:
                await self._write_one(inode, run, turn)
            except BaseException:  # cancelled (_write_one has recorded its own run)
                for other, rest in pieces[i + 1 :]:
                    self._lose(other, rest, DeviceIOError("writeback interrupted"))
                self.cache.written([(other.pages, rest) for other, rest in pieces[i + 1 :]])
                raise

    async def _write_one(self, inode: Inode, run: Run, turn: Turn) -> None:
        """Write a run, split across free extents if it must be; whatever fails is recorded as
        lost on the inode before its pages stop being dirty."""
        pending = [run]
        try:
            while pending:
                piece = pending.pop()
                try:
                    await self._write_run(inode, piece, turn)
                except _NoFit as e:
                    pending.append(piece)  # split or lost: recorded below
                    if not 0 < e.fit < len(piece.entries) * PAGE:
                        raise e.error from None
                    head = e.fit // PAGE  # the largest piece that fits, then the rest
                    pending[-1:] = [Run(piece.first + head, piece.entries[head:]), Run(piece.first, piece.entries[:head])]
                except BaseException:
                    pending.append(piece)
                    raise
        except BaseException as e:
            err = e if isinstance(e, OSError) else DeviceIOError(
                f"internal error in writeback: {e!r}" if isinstance(e, Exception) else "writeback interrupted")
            for piece in pending:
                self._lose(inode, piece, err)
            if not isinstance(e, Exception):
                raise  # cancelled: the loss is recorded, the cancellation goes on
            if not isinstance(e, OSError):
                self._bug(f"writeback of inode {inode.ino}", e)
        finally:
            self.cache.written([(inode.pages, run)])
            self._room.set()

    async def _reclaim(self) -> bool:
        """Commit to get back the space pinned when a piece found no room, as btrfs commits
        to reclaim pinned space before it gives up; whether that space is free now. Asked each
        time the piece finds room pinned anew, not once per piece: participants inside the
        transaction when it queued (``first_for_space``) -- the groups placed while it committed
        -- map their extents meanwhile, COWing tree blocks and pinning their old copies (six of
        them took back the room, and the retry lost an acknowledged write). Queued, no one else
        joins, so the retries end: a commit with nothing to write still waits for the one in
        flight, whose pins it may free; pins that stay (a failed write's, with no tree change to
        commit) end them."""
        return await self.fs.vol.commit() or not self.fs.vol.engine.allocator.holds_pinned()

    def _bug(self, what: str, e: Exception) -> None:
        """An exception no layer raises on purpose: log it whole and stop changing the image, as
        btrfs aborts a transaction on an unexpected error. Callers get EIO from then on."""
        log.error("%s: unexpected error; the mount is now read-only", what, exc_info=e)
        self.fs.vol.abort(DeviceIOError(f"{what}: unexpected error {e!r}"))

    def _lose(self, inode: Inode, run: Run, err: OSError) -> None:
        """The run cannot reach the disk: drop it from the cache (unless rewritten since) and
        keep the error for the next fsync/close of each of the file's handles."""
        self.cache.forget(inode.pages, range(run.first, run.first + len(run.entries)))
        # the file's bytes in those pages when they were taken, not whole pages: a 1-byte file
        # lost 1 byte, not 4096, even if a write past its end came meanwhile
        start = run.first * PAGE
        lost = max(min((run.first + len(run.entries)) * PAGE, inode.wb_size) - start, 0)
        inode.errs.note(inode.ino, err, lost)
        inode.lost_bytes += lost
        self.errseq.note(inode.ino, err, lost)
        self.stats["lost_bytes"] += lost
        self.stats["errors"] += 1

    async def _write_batch(self, pieces: list[Piece], turn: Turn) -> None:
        """Small runs (of one file or several) sealed in one batch, each its own extent (its own
        nonce and key), placed and written with one writev, then mapped with one pass over each
        tree (``add_extents``). Raises before any tree changes if a run cannot be placed or
        written.

        The extent keys are derived in the sealing thread, from the secret and each run's nonce
        (``RunKey``), not here on the loop. A secret wiped meanwhile (hard removal) may have
        given a run a wrong key: the check after sealing refuses the batch then, as it refuses
        one whose secret went while it was being encrypted."""
        fs = self.fs
        secrets = {inode.ino: (inode, fs.keyring.secret_for(inode.key_id, inode.ino))
                   for inode, _ in pieces if inode.key_id is not None}
        if secrets:
            nonces = [None if inode.key_id is None else os.urandom(fscrypt.NONCE_SIZE) for inode, _ in pieces]
            keys: list[RunKey] = [None if nonce is None else (secrets[inode.ino][1], nonce)
                                  for (inode, _), nonce in zip(pieces, nonces)]
        else:  # no run has a key: none to make a nonce for, asked per run
            nonces = keys = [None] * len(pieces)
        sealed = await self.sealer.seal_many([(k, run.entries) for k, (_, run) in zip(keys, pieces)], fs.vol.sb.csum_type)
        async with turn:
            for inode, secret in secrets.values():
                if fs.keyring.secret_for(inode.key_id, inode.ino) is not secret:
                    raise NoKeyError("Required key not available")  # wiped (hard removal) meanwhile
            lengths = [len(run.entries) * PAGE for _, run in pieces]  # (sealing keeps a run's length)
            async with fs.vol.join() as engine:
                placed = engine.allocator.alloc_many(lengths, keep=fs.data_keep())
                try:
                    await fs.vol.device.writev(joined(zip(placed, lengths, map(_FIRST, sealed))))
                    # each NewExtent made as ``new_data_extent`` makes its items, by tuple.__new__ (the
                    # NamedTuple constructor is a Python-level call per extent), its context only
                    # where a nonce says the run has a key
                    self._mapped([(inode, tuple.__new__(NewExtent, (
                                       run.first * PAGE, bytenr, length, length,
                                       None if nonce is None else self._context(inode, nonce), digests)))
                                  for (inode, run), bytenr, length, (_, digests), nonce
                                  in zip(pieces, placed, lengths, sealed, nonces)])
                except BaseException:
                    for bytenr, length in zip(placed, lengths):
                        # referenced by nothing (``_place``); pinned, not released: the runs' retry
                        # must not be handed the place that failed (the allocator refills holes at once)
                        engine.allocator.pin(bytenr, length)
                    raise

    @staticmethod
    def _context(inode: Inode, nonce: bytes | None) -> ExtentContext | None:
        if nonce is None:
            return None
        return ExtentContext(1, S.CONTENTS_MODE_AES_256_XTS, 12, inode.key_id, nonce)

    def _mapped(self, new: list[tuple[Inode, NewExtent]]) -> None:
        """The new extents are written: map them into their files (inside the transaction), all
        in one pass over each tree, then save each file's inode item once. A batch's extents
        come file by file (a flush takes its inodes' runs in turn), so each file's end and
        bytes are summed over its stretch of them with one dict store per file, not per extent."""
        fs = self.fs
        deltas = fs.extents.add_extents([(inode.ino, e) for inode, e in new], fs.pending_room())
        ends: dict[int, tuple[Inode, int, int]] = {}  # ino -> (inode, end of its new extents, their bytes)
        total = 0
        last: Inode | None = None
        end = length = 0
        for inode, e in new:
            n = e.length
            if inode is not last:
                if last is not None:
                    ends[last.ino] = (last, end, length)
                last = inode
                _, end, length = ends.get(inode.ino, (inode, 0, 0))
            end = max(end, e.file_offset + n)
            length += n
            total += n
        if last is not None:
            ends[last.ino] = (last, end, length)
        for ino, (inode, end, length) in ends.items():
            inode.epoch += 1  # a read that mapped the old extents discards what it read
            inode.nbytes += deltas[ino]
            inode.flushing = max(inode.flushing - length, 0)
            inode.disk_size = max(inode.disk_size, min(inode.size, end))
            fs.save_inode(inode)
            fs.release_meta(inode)
        self.stats["extents"] += len(new)
        self.stats["bytes"] += total

    async def _write_run(self, inode: Inode, run: Run, turn: Turn) -> None:
        fs = self.fs
        key: RunKey = None
        nonce = secret = None
        if inode.key_id is not None:
            secret = fs.keyring.secret_for(inode.key_id, inode.ino)  # ENOKEY once hard-wiped
            nonce = os.urandom(fscrypt.NONCE_SIZE)
            key = (secret, nonce)  # derived where the run seals (as ``_write_batch``'s)
        async with self.sealer.sealed(key, run.entries, fs.vol.sb.csum_type) as (sealed, digests):
            new = NewExtent(run.first * PAGE, 0, len(sealed), len(sealed), self._context(inode, nonce), digests)
            async with turn:
                with contextlib.ExitStack() as first:
                    queued = False
                    while True:
                        if secret is not None and fs.keyring.secret_for(inode.key_id, inode.ino) is not secret:
                            raise NoKeyError("Required key not available")  # wiped (hard removal) meanwhile
                        try:
                            return await self._place(inode, new, sealed)
                        except _NoFit as e:
                            if not e.pinned:
                                raise
                            # sealed still, it commits for that room and, until placed, goes first for it
                            if not queued:
                                first.enter_context(fs.vol.first_for_space())
                                queued = True
                            if not await self._reclaim():
                                raise

    async def _place(self, inode: Inode, new: NewExtent, sealed: Buffer) -> None:
        """Allocate a sealed run's extent, write it and map it, in the running transaction; raises
        ``_NoFit`` if it found no room."""
        fs = self.fs
        length = new.length
        async with fs.vol.join() as engine:
            # the data goes first: items must never point at an extent whose write failed
            keep = fs.data_keep()
            try:
                bytenr = engine.allocator.alloc(length, keep=keep)
            except NoSpaceError as e:
                alloc = engine.allocator
                raise _NoFit(e, alloc.largest(keep) // PAGE * PAGE, alloc.holds_pinned()) from None
            try:
                # the device keeps the slot's ciphertext until destaged (or copies it)
                await fs.vol.device.write(bytenr, sealed, release=self.sealer.loan(sealed))
                self._mapped([(inode, new._replace(bytenr=bytenr))])
            except BaseException:
                # referenced by nothing: the write failed, or the mapping did before it changed a
                # tree (an I/O error reading a leaf to stage it) -- pinned, the space is free again
                # at the commit and not handed out before it; a mapping that failed after changing
                # a tree aborts the transaction (``Volume.join``), so nothing of it is committed
                engine.allocator.pin(bytenr, length)
                raise
