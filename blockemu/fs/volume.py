"""An open image: the device, the superblock and the trees, and the async half
of the commit protocol (the half with no I/O is ``transaction.Engine``)."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, TypeVar

from blockemu.device.blockdev import BlockDevice
from blockemu.device.faultplan import FaultPlan
from blockemu.device.image import bad_primary, read_only_features, too_small, unsupported
from blockemu.engine.transaction import Engine
from blockemu.engine.treelog import TreeLog, choose_log, read_log, replay
from blockemu.errors import BlockemuError, CorruptionError, DeviceIOError, FreeSpaceDamage, NoSpaceError, ReadOnlyError, restate
from blockemu.ondisk.logslot import SlotInfo, encode_slot
from blockemu.ondisk.structs import LOG_SLOT_OFFSETS, SUPER_INFO_SIZE, SUPER_OFFSETS
from blockemu.ondisk.superblock import SuperInfo, decode_super, mirror_writes, primary_write

T = TypeVar("T")


async def outlast_cancellation(work: list[asyncio.Future]) -> bool:
    """Wait until every future in ``work`` is done, even if the caller is cancelled meanwhile
    (unlike ``gather``, nothing in ``work`` is cancelled); returns whether it was. For steps
    that must not stop half way -- a commit, runs being written back -- the cancellation is
    the caller's to raise once they have finished."""
    cancelled = False
    while pending := [w for w in work if not w.done()]:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


def read_primary_super(dev: BlockDevice) -> SuperInfo:
    if small := too_small(dev.path, dev.size):
        raise small
    try:
        sb = decode_super(dev.read_sync(SUPER_OFFSETS[0], SUPER_INFO_SIZE), SUPER_OFFSETS[0])
    except CorruptionError as e:
        raise bad_primary(dev.path, e, dev.size, lambda at: dev.read_sync(at, SUPER_INFO_SIZE)) from None
    if sb.total_bytes > dev.size:
        raise CorruptionError(
            f"{dev.path}: image truncated: superblock says {sb.total_bytes} bytes, file has {dev.size}", "SUPERBLOCK"
        )
    if newer := unsupported(dev.path, sb):
        raise newer
    return sb


def damaged_log(e: CorruptionError | DeviceIOError, path: str, committed: bool = False) -> OSError:
    """``e`` (its class and errno kept) saying what fsck says of a log that stops a mount: it
    can be dropped. Every failure to read the log or replay what it holds fails each mount,
    read-only ones too, and only ``rescue zero-log`` gets the image mounting again -- a log link
    past the device's end said nothing of it, as any other EIO reading the log did not.
    ``committed``: the block that failed is a committed tree's, met by the replay: the log is
    not what is damaged (it was blamed), but dropping it is still what lets the image mount."""
    drop = f"`blockemu rescue zero-log {path}` drops the log, losing what was fsynced since the last commit"
    text = f"{e} (a committed tree, read replaying the fsync log; `blockemu fsck {path}` shows the damage); {drop}" \
        if committed else f"fsync log: {e}; {drop}"
    return CorruptionError(text, e.kind, e.bytenr) if isinstance(e, CorruptionError) else restate(e, text)


def damaged_root(e: CorruptionError, path: str) -> CorruptionError:
    """``e``, a committed tree's block the open needs, saying where to go next: the bare "tree
    block N: checksum mismatch" of a root tree a power cut never let land (``--faults nobarrier``)
    left the user guessing, though fsck names the backup root that gives the image back
    (``rescue use-backup-root``). The free-space record's damage names its way out already
    (fsck --repair rebuilds it), and is left as it is."""
    if isinstance(e, FreeSpaceDamage):
        return e
    return CorruptionError(f"{e} (a committed tree; `blockemu fsck {path}` shows the damage, and names the backup "
                           f"root that reads whole, if one does)", e.kind, e.bytenr)


def replay_engine(e: CorruptionError, dev: BlockDevice, sb: SuperInfo, path: str) -> Engine:
    """An engine for a read-only open of ``path`` with a log to replay, whose allocator (the
    replay COWs, in memory) did not build: ``e``. A damaged free-space tree is only a record of
    what the extent tree implies, so the allocator is built from that instead, and ls and cat
    read the fsynced data: told to run zero-log, they lost it, where ``fsck --repair`` (which
    rebuilds that tree, replaying the log) kept it. Else ``e``, said as ``damaged_log`` says a
    committed tree the replay met when the image opens without the allocator -- ls and cat of
    an image whose extent tree was damaged said only "tree block N: checksum mismatch", though
    zero-log lets them read it."""
    try:
        return Engine(sb, dev.read_sync, writable=True, rebuild_free_space=True)
    except CorruptionError:
        pass
    try:
        Engine(sb, dev.read_sync, writable=False)
    except CorruptionError:
        raise e from None  # damage the log's replay is not what meets
    raise damaged_log(e, path, committed=True) from None


class Volume:
    """Owner of one image's device and engine. All metadata changes happen on
    the event loop between ``await`` points; ``commit`` serialises itself."""

    def __init__(self, device: BlockDevice, engine: Engine) -> None:
        self.device = device
        self.engine = engine
        self.commit_lock = asyncio.Lock()
        self._cond = asyncio.Condition()
        self._writers = 0
        self._committing = False
        self.aborted: OSError | None = None
        # whether an abort may have dropped what was not yet durable: every abort but a commit's
        # tail failing once its superblock was durable (an fsync's tail meeting a power cut), or
        # a commit failing whose whole transaction a durable log held (``abort_logged``)
        self.abort_dropped = False
        # the abort was a commit's, failing before it let the next transaction in, whose
        # transaction the durable log held whole: what the engine still holds, part-converged, is
        # all in the log, and nothing can join after an abort
        self.abort_logged = False
        self.closed = False  # every later change or commit is refused with EIO
        self._changed: dict[asyncio.Task, bool] = {}  # participants -> whether they changed a tree
        self._first: set[asyncio.Task] = set()  # runs waiting for room a commit gives back (``first_for_space``)
        self._served = asyncio.Event()  # set while no run waits for room: others may join
        self._served.set()
        engine.store.on_change = self._note_change
        self.log = TreeLog(engine)
        self.log_root = engine.sb.log_root  # the log the durable superblock points at (0: none)
        self.replayed = False  # open replayed a log (and, read-write, committed it)
        self._begun = 0  # commits begun, numbered from 1
        self._completed = 0  # the number of the last commit that completed
        self._fsyncs: dict[int, int] = {}  # inode -> its fsyncs waiting to log it
        self._log_syncs = 0  # log syncs begun, numbered from 1
        self._logged_by: dict[int, int] = {}  # inode -> the last log sync that made it durable
        # awaited before a commit's tail that its caller does not wait for (an fsync's) starts:
        # None in use, the tail runs at once beside what comes next, its flush racing the next
        # operation's writeback on thread timing; the crash recorder's seam to hold it until a
        # point it picks, so its write log is the same on every run (workload/crash.py, DESIGN §10)
        self.tail_gate: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, path: str, *, readonly: bool = False, faults: FaultPlan | None = None,
                   rebuild_free_space: bool = False) -> "Volume":
        dev = await BlockDevice.open(path, readonly=readonly, faults=faults)
        try:
            sb = read_primary_super(dev)
            if not readonly and (newer := read_only_features(path, sb)):
                raise newer
            # replaying a log needs an allocator even read-only: the replay COWs, in memory
            try:
                engine = Engine(sb, dev.read_sync, writable=not readonly or bool(sb.log_root),
                                rebuild_free_space=rebuild_free_space)
            except CorruptionError as e:
                if not (readonly and sb.log_root):
                    raise damaged_root(e, path) from None
                engine = replay_engine(e, dev, sb, path)
            try:
                # the newest log sync that landed whole (SPEC "Log slots"), read once
                log = None
                if sb.log_root:
                    chosen, _, log = choose_log(engine.store.read, sb)
                    if log is None:
                        log = read_log(engine.store.read, chosen)
            except (CorruptionError, DeviceIOError) as e:  # damaged, past the device's end, EIO
                raise damaged_log(e, path) from None
            try:
                if log is not None:
                    replay(engine, *log)
            except CorruptionError as e:  # what it holds cannot be replayed (a committed tree's EIO is not its fault)
                raise damaged_log(e, path, committed=e.bytenr is not None and e.bytenr not in log[0]) from None
            if rebuild_free_space and not readonly:
                engine.new_free_space_tree()
            if readonly:
                engine.store.allocator = None  # ls/cat see the logged state; nothing is written
        except BaseException:
            dev.close_sync()
            raise
        vol = cls(dev, engine)
        vol.replayed = replayed = log is not None
        if replayed and not readonly:
            try:
                await vol.commit(force=True)  # durable, and the log cleared, before anything else
            except BaseException:
                await vol.close(commit=False)
                raise
        return vol

    @property
    def sb(self) -> SuperInfo:
        return self.engine.sb

    @property
    def generation(self) -> int:
        return self.engine.sb.generation

    @asynccontextmanager
    async def join(self, deleting: bool = False) -> AsyncIterator[Engine]:
        """Take part in the running transaction: tree changes made inside land in one commit
        whole. A commit waits for every participant to leave; new ones wait until it has
        encoded its blocks, then join the next transaction beside the commit's I/O.

        A participant that fails after changing a tree (a rename that removed the old entry and
        then failed to add the new one) leaves a half-done operation in the transaction, and
        the trees have no undo: changes land in place in the blocks COWed this transaction.
        So the transaction is aborted, as btrfs does: nothing of it is committed, the image
        keeps its last durable generation, and this mount turns read-only. The failure is
        raised -- as an OSError with its own errno, or EIO for an unexpected exception -- and
        every later change, commit and the unmount raise EROFS naming it (``check_aborted``);
        reads go on.

        ``deleting``: the participant may free space (unlink, rmdir, a rename over a file),
        which near full must commit sooner (``Engine.short_of_room``)."""
        if self.engine.short_of_room(deleting) and self.aborted is None:
            # the space this transaction freed stays pinned until it commits: near full, commit
            # first, as btrfs commits to reclaim pinned space before it gives up with ENOSPC
            await self.commit()
        task = asyncio.current_task()
        while self._committing or self._first and task not in self._first:
            if self._committing:  # a commit encodes its blocks: join the next transaction after it
                async with self._cond:
                    await self._cond.wait_for(lambda: not self._committing)
            else:  # a run waits for the room a commit gives back: it goes first
                await self._served.wait()
        # no await from the check to the count: a commit that begins later waits for this one
        self.check_aborted()
        self._writers += 1
        assert task is not None and task not in self._changed, "join() does not nest"
        self._changed[task] = False
        try:
            yield self.engine
        except BaseException as e:
            if self._changed[task]:
                raise self.abort(e, "a failed operation left the transaction half done")
            raise
        finally:
            del self._changed[task]
            self._writers -= 1
            if self._committing and not self._writers:  # only a commit waits for the count
                async with self._cond:
                    self._cond.notify_all()

    @contextmanager
    def first_for_space(self) -> Iterator[None]:
        """While the calling task (a run of writeback that found its room pinned) commits to get
        that room back and tries again, no other task joins the transaction: space a commit frees
        goes first to the runs queued for it, as btrfs's reservation tickets. Otherwise a task
        that kept changing metadata took the room back after each commit (a tree block COWed,
        its old copy pinned) and the run committed and retried for as long as it went on."""
        task = asyncio.current_task()
        assert task is not None
        self._first.add(task)
        self._served.clear()
        try:
            yield
        finally:
            self._first.discard(task)
            if not self._first:
                self._served.set()

    def set_incompat(self, flag: int) -> None:
        """Turn a feature bit on at its first use, as btrfs_set_fs_incompat: called inside ``join``
        with the first item that needs it, so both land in the same commit (an image that never
        uses the feature stays readable by readers that do not know the bit)."""
        self.engine.sb.incompat_flags |= flag

    def _note_change(self) -> None:
        if self._changed:  # outside any participant (a commit converging the trees) nothing to note
            task = asyncio.current_task()
            if task in self._changed:
                self._changed[task] = True

    def abort(self, e: BaseException, why: str = "aborted", *, dropped: bool = True) -> BaseException:
        """Abort the running transaction for good (see ``join``): every further change fails and
        the image stays at its last durable generation; the first reason is kept. Returns what
        to raise for ``e``: itself if it is an OSError or a cancellation, else an EIO caused by it.
        ``dropped=False``: nothing that was not durable was thrown away (``close``)."""
        self.abort_dropped = self.abort_dropped or dropped
        if isinstance(e, OSError):
            self.aborted = self.aborted or e
            return e
        err = DeviceIOError(f"{self.device.path}: {why}: {e!r}")
        err.__cause__ = e
        self.aborted = self.aborted or err
        return err if isinstance(e, Exception) else e

    async def commit(self, *, force: bool = False, share: bool = True, whole: bool = True) -> bool:
        """Make the running transaction durable; False when it changed nothing (unless ``force``:
        a new generation is written anyway, e.g. to record a rebuilt free-space record).

        Group commit: a caller that, once it holds the lock, finds that a commit begun after its
        call has completed shares that one -- everything the caller changed before calling was
        in that commit's transaction -- instead of committing again what others changed since
        (with four stress tasks, most syncs waited behind another's commit, then ran their own).
        ``share=False`` (the unmount's): what others changed since must be written too, for
        nothing is written after it.

        ``whole=False`` (an fsync's): return once the primary superblock is durable -- all the
        caller needs -- while the commit's tail (the mirrors, their flush, the pins released)
        goes on under the commit lock, so the next commit or log sync still waits for it, as
        btrfs's fsync waits for its transaction's superblock, not for the kthread's cleanup."""
        called = self._begun
        await self.commit_lock.acquire()
        tail: asyncio.Future | None = None
        try:
            if self._completed > called and share and not force:
                self.check_aborted()
                return True
            async with self._cond:
                self._committing = True
                await self._cond.wait_for(lambda: self._writers == 0)
            try:
                self.check_aborted()
                if not self.engine.is_dirty() and not force:
                    return False
                self._begun += 1
                number = self._begun
                # asked before the commit drops the log's notes: if the durable log holds the whole
                # transaction, a commit that fails loses nothing (review35: the interval's commit
                # meeting a power cut after a log sync made the unmount say EROFS over a whole file)
                logged = self._logged_whole()
                # a caller cancelled meanwhile still gets the commit whole: its tail is started
                # before the cancellation is raised (and then runs on under the lock, as an fsync's)
                head = asyncio.ensure_future(self._durably(self._commit(), "commit failed", dropped=not logged))
                cancelled = await outlast_cancellation([head])
                # only while it had let no one into the next transaction (``_unblock``): changes made
                # there beside its I/O are in no log (test_races: the fsyncs of the next transaction)
                self.abort_logged = logged and head.exception() is not None and self._committing
                new_sb = head.result()
                self._completed = number
                gate = None if whole else self.tail_gate
                tail = asyncio.ensure_future(self._durably(self._commit_tail(new_sb, gate), "commit failed", dropped=False))
                if cancelled or whole and await outlast_cancellation([tail]):
                    raise asyncio.CancelledError
                if whole:
                    tail.result()
                return True
            finally:
                await self._unblock()
        finally:
            if tail is None or tail.done():
                self.commit_lock.release()
            else:
                tail.add_done_callback(self._tail_done)

    def _tail_done(self, tail: asyncio.Future) -> None:
        """A commit's tail that its caller did not wait for has ended: the lock is free. Its
        failure has aborted the mount (``_durably``), and the next change or commit raises that."""
        if not tail.cancelled():
            tail.exception()  # retrieved: asyncio would log it as never retrieved
        self.commit_lock.release()

    async def _unblock(self) -> None:
        """Let participants into the (next) running transaction."""
        async with self._cond:
            self._committing = False
            self._cond.notify_all()

    async def fsync(self, ino: int) -> None:
        """Make inode ``ino``'s changes in the running transaction durable: through the log
        tree when the log can say them (DESIGN §9), else -- or when the log finds no room --
        by a full commit. Group commit, as ``commit``: a full commit begun after the call and
        completed by the time this one holds the lock holds everything the inode had."""
        called = self._begun, self._log_syncs
        self._fsyncs[ino] = self._fsyncs.get(ino, 0) + 1
        try:
            if await self._log_sync(ino, *called):
                return
        finally:
            self._fsyncs[ino] -= 1
            if not self._fsyncs[ino]:
                del self._fsyncs[ino]
        await self.commit(whole=False)

    async def _log_sync(self, ino: int, commits: int, log_syncs: int) -> bool:
        """Log ``ino`` and write the log; False if the log cannot say its change, finds no room
        or has grown too big to be worth syncing (``TreeLog.can_log``). Decided under the commit lock: a hole punched, or a name changed, while this
        waited for the lock must make it commit -- logged, the hole has no item, and replay
        would bring back the committed data from before the write being fsynced.

        Grouped, as btrfs batches log writers: the log sync also logs every inode whose fsync
        waits for the lock (its writeback done) and the log can say, so one flush serves them
        all; an fsync whose inode a log sync begun after its call made durable writes nothing."""
        async with self.commit_lock:
            self.check_aborted()
            if self._completed > commits or self._logged_by.get(ino, 0) > log_syncs or not self.engine.is_dirty():
                return True  # a commit or log sync since the call (or the last commit) holds everything
            if not self.log.can_log(ino):
                return False
            inos = [ino, *(i for i in self._fsyncs if i != ino and self.log.can_log(i))]
            try:
                for i in inos:
                    self.log.log_inode(i)
                todo = self.log.prepare_sync()
            except NoSpaceError:
                self.log.spoil()  # its bookkeeping may name items it lacks: no log sync before the commit
                return False  # the full commit drops the half-built log and gives back what it pinned
            self._log_syncs += 1
            number = self._log_syncs
            if todo is not None:
                await self._durably(self._write_log(*todo), "log sync failed")
            self._logged_by.update(dict.fromkeys(inos, number))
            return True

    async def _durably(self, step: Coroutine[Any, Any, T], why: str, *, dropped: bool = True) -> T:
        """Run a step that writes a superblock (a commit, a log sync) to its end: never left
        half done, a caller cancelled meanwhile sees the cancellation once it has finished.
        As btrfs aborts a transaction whose commit failed, however it failed, a failure aborts
        the mount: the image keeps its last durable state (or the new one, if its superblock
        landed) and this mount refuses further changes. ``dropped=False``: a step after the
        superblock, whose failure loses nothing (``abort``)."""
        work = asyncio.ensure_future(step)
        cancelled = await outlast_cancellation([work])
        try:
            done = work.result()
        except BaseException as e:
            raise self.abort(e, why, dropped=dropped)
        if cancelled:
            raise asyncio.CancelledError
        return done

    async def _write_log(self, writes: list[tuple[int, bytes]], head: SuperInfo | SlotInfo) -> None:
        """The first log sync of a transaction: the log's blocks, one flush, then ``head``, the
        primary superblock pointing at them, with FUA (with INCOMPAT_LOG_SLOTS: later syncs may
        write slots), so the superblock names only blocks already durable. A later one: the
        blocks and ``head``, the slot naming them (alternate slots, the last sync's left intact),
        and one flush -- the slot may land without them, and mount then replays the log of the
        slot or superblock before it (``choose_log``). The mirrors keep the last full commit."""
        if isinstance(head, SuperInfo):
            await self.device.writev(writes)
            await self.device.flush_then_fua(*primary_write(head))
        else:
            at, sb = LOG_SLOT_OFFSETS[head.sequence % 2], self.sb
            await self.device.writev([*writes, (at, encode_slot(head, sb.fsid, sb.csum_type, at))])
            await self.device.flush()
        self.log.finish_sync(head)
        self.log_root = head.log_root

    def not_mounted(self) -> DeviceIOError:
        """The one error every call on an unmounted filesystem raises, reads and key calls
        included: a stat answered from the cache of a closed image is no answer."""
        return DeviceIOError(f"{self.device.path}: not mounted")

    def check_aborted(self) -> None:
        if self.closed:
            raise self.not_mounted()
        if self.aborted is not None:
            # EROFS, as btrfs: an abort (btrfs_handle_fs_error) makes the mount read-only, and
            # start_transaction then refuses every change with -EROFS; the abort's own cause
            # went to the caller that met it
            cause = self.aborted if isinstance(self.aborted, BlockemuError) else self.aborted.strerror
            raise ReadOnlyError(f"{self.device.path}: read-only after an aborted transaction ({cause or self.aborted})")

    async def _commit(self) -> SuperInfo:
        """DESIGN §9 up to the primary superblock, which it returns (``_commit_tail`` does the
        rest). Once the blocks are encoded the next transaction runs beside the writes (btrfs's
        unblocked state): it COWs what it changes, and pins what it frees for its own
        commit, which -- holding the commit lock, as a log sync does -- comes after this one is
        durable. Runs as its own task (``_durably``), so a cancelled caller cannot stop it
        between ending the transaction and writing it."""
        engine = self.engine
        self.log.drop()  # this commit supersedes the log: its blocks are pinned, free after it
        writes, new_sb = engine.prepare_commit()
        await self._unblock()
        await self.device.writev(writes)
        await self.device.flush_then_fua(*primary_write(new_sb))
        self.log_root = 0
        engine.committed(new_sb)
        self._logged_by.clear()  # an fsync that a log sync covered, this commit -- begun after it -- covers too
        return new_sb

    async def _commit_tail(self, new_sb: SuperInfo, gate: Callable[[], Awaitable[None]] | None) -> None:
        """The rest of a commit once its primary superblock is durable (DESIGN §9 steps 4-5): the
        mirrors, a flush, then the extents its transaction freed given back -- once ``gate``, if
        any (``tail_gate``), lets it start."""
        if gate is not None:
            await gate()
        if mirrors := mirror_writes(new_sb):
            await self.device.writev(mirrors)
        await self.device.flush()
        self.engine.finish_commit()

    async def close(self, *, commit: bool = True) -> None:
        """Commit and close the device -- the device even when the commit fails. After an abort
        the commit raises it: what the transaction held is lost, and the caller must know. Not
        when only a commit's tail failed and nothing joined since: the commit was durable (its
        superblock landed), and an unmount that raises says something may be lost (review29: a
        power cut right after an fsync's commit made every unmount report a loss). Nor when a
        commit failed whose whole transaction the durable log held (``abort_logged``): mount's
        replay brings it all back (review35: the interval's commit meeting a power cut after a
        log sync)."""
        quiet = self.aborted is not None and not self.abort_dropped and (self.abort_logged or not self.engine.is_dirty())
        try:
            if commit and not self.device.readonly and not quiet:
                if not self.device.dead:
                    await self.commit(share=False)
                else:
                    # the power is cut: what the running transaction holds is lost, and only this
                    # unmount can say so -- a commit no caller waited for (the interval's) aborted
                    # on the cut, or a background writeback met it (its file's close is told, not
                    # of a mkdir): returning quietly lost that mkdir
                    self.check_aborted()
                    if self.engine.is_dirty() and not self._logged_whole():
                        raise DeviceIOError(f"{self.device.path}: device is gone (power cut): "
                                            "changes made since the last commit and not fsynced are lost")
        finally:
            self.closed = True
            async with self.commit_lock:  # a commit's tail an fsync did not wait for (``commit``)
                await self.device.close()

    def _logged_whole(self) -> bool:
        """Whether a durable log holds everything the running transaction changed, so mount's
        replay brings it all back and a power cut lost none of it: a log is on disk (the
        superblock names it), nothing was changed that the log cannot say (``needs_commit``:
        names, truncates, new inodes) and no file was changed since it was last logged
        (``Engine.changed_extents``, which a saved inode item enters too). A log sync that
        failed aborted the mount (``_durably``) and ``check_aborted`` says so first. Without
        this, write, fsync through the log, a power cut, and the unmount said EIO over a file
        mount then found whole (trust18's false alarm); dirty data the cut kept from the disk
        is reported by its own file's close or the unmount (``Filesystem.unmount``)."""
        engine = self.engine
        return bool(self.log_root) and not self.log.spoiled and not engine.needs_commit and not engine.changed_extents
