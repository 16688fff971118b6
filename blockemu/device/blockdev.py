"""An async block device over an image file, with a volatile write cache.

A completed write lands in the device's cache, not the image: it is visible to
reads at once but reaches the file only when a flush destages it (then the
file is fdatasync'ed for real), when the cache passes its size limit (destaged,
still not durable), or as a FUA write. A power cut drops the cache and freezes
the image (``power``: a host call in flight stops at the cut), so the image file
itself is left in a genuine crash state; the write log (``writelog``) can rebuild
every other one.

Blocking writes of the image run in the device's own I/O thread (``hostthread``), other blocking
file I/O in the executor through ``aiofiles.os.wrap``. A trip to a thread costs ~0.15-0.4 ms on
a loaded VM, so a flush destages the whole cache in one call
(``pwritev`` per contiguous run). ``read_sync`` serves metadata-block misses
of the B-tree's node cache: a 16 KiB pread from the page cache costs far less
than the executor hop; the tree code gets it as a callable and opens no file itself.
For the same reason an async ``read`` of up to 256 KiB (``SYNC_READ``) is a pread on the loop.
The cache itself (``writecache``) keeps sector ranges, so its cost is per write, not per sector.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TypeVar

import aiofiles.os

from blockemu.device.faultplan import FaultPlan, Flip, sector_digest
from blockemu.device.hostthread import HostThread
from blockemu.device.imagelock import open_image
from blockemu.device.power import Power, PowerCut
from blockemu.device.writecache import Buffer, Entry, Runs, Segment, WriteCache, as_runs, pinned
from blockemu.device.writelog import SECTOR, WriteLog, sparse_copy
from blockemu.errors import DeviceIOError, InvalidArgument

IOV_MAX = 1024
SYNC_READ = 256 << 10  # reads up to this size pread on the loop, not in the executor (``read``)


T = TypeVar("T")

OPS = ("read", "write", "fua", "flush", "discard")


@dataclass
class DeviceStats:
    """The device's requests as a disk's ``/sys/block/*/stat`` counts them (fio's disk_util reads
    that): each kind's count, bytes and time from taking a request to its end, and the time some
    request was in flight (``io_ticks``). A request that fails ends too, and counts, as in the kernel."""

    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: {"read": 0, "write": 0})
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(OPS, 0.0))
    # latency histogram: bucket i counts ops that took [2**(i-1), 2**i) microseconds
    latency_us: list[int] = field(default_factory=lambda: [0] * 32)
    in_flight: int = 0
    busy: float = 0.0  # seconds with a request in flight, up to the last time none was
    busy_since: float = 0.0

    def begin(self, n: int = 1) -> float:
        """``n`` requests taken now; the time, for each one's ``done``."""
        t = time.perf_counter()
        if not self.in_flight:
            self.busy_since = t
        self.in_flight += n
        return t

    def done(self, op: str, nbytes: int, started: float) -> None:
        now = time.perf_counter()
        self.ops[op] += 1
        if op in self.bytes:
            self.bytes[op] += nbytes
        self.seconds[op] += now - started
        self.latency_us[min(int((now - started) * 1e6).bit_length(), 31)] += 1
        self.in_flight -= 1
        if not self.in_flight:
            self.busy += now - self.busy_since

    def busy_seconds(self) -> float:
        """Seconds some request was in flight, up to now."""
        return self.busy + (time.perf_counter() - self.busy_since if self.in_flight else 0.0)



def _pwrite_runs(fd: int, runs: Runs, power: AbstractContextManager[None]) -> None:
    """A ``pwritev`` per run (per ``IOV_MAX`` buffers of a longer one), in *pieces* of up to
    ``IOV_MAX`` runs: a power cut lands a prefix of the pieces (``Power``). The switch is taken
    per piece, not per run: per run it cost the flush of a thousand scattered 4 KiB writes
    2,900 instructions a run, 39 % more than the run's own ``pwritev`` (callgrind)."""
    for first in range(0, len(runs), IOV_MAX):
        with power:
            for off, bufs in runs[first : first + IOV_MAX]:
                for i in range(0, len(bufs), IOV_MAX):
                    chunk = bufs[i : i + IOV_MAX]
                    n = os.pwritev(fd, chunk, off)
                    want = sum(len(b) for b in chunk)
                    if n != want:
                        _pwrite_rest(fd, memoryview(b"".join(chunk))[n:], off + n)
                    off += want


def _pwrite_rest(fd: int, rest: memoryview, off: int) -> None:
    """The rest of a short write. On a regular file one means the host's file system is full
    (or a quota or file size limit): writing on makes the kernel say which, with its errno --
    the bare "short write" this used to raise had none, and read as a bug of ours."""
    while rest:
        n = os.pwrite(fd, rest, off)
        if not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rest, off = rest[n:], off + n


def _destage(fd: int, runs: Runs, sync: bool, power: AbstractContextManager[None]) -> None:
    """``sync``: a flush, made durable by ``fdatasync``, as QEMU flushes a raw image and as
    ``_fua`` always did: the image's size is fixed at mkfs, so what ``fsync`` adds is the image
    file's timestamps, which no crash state reads -- and on ext4 an mtime changed by the writes
    made each flush a journal commit besides the data's."""
    _pwrite_runs(fd, runs, power)
    if sync:
        os.fdatasync(fd)
    else:
        # the emulated disk writing its cache back on its own: start the host's writeback of
        # what was destaged (and let it drop those pages), so a later flush has little left
        # to do and the image does not crowd the host's memory
        for off, bufs in runs:
            os.posix_fadvise(fd, off, sum(map(len, bufs)), os.POSIX_FADV_DONTNEED)


def _fua(fd: int, offset: int, data: bytes, power: AbstractContextManager[None]) -> None:
    """A short write goes on (``_pwrite_rest``) until the host says why it stops: unchecked, a FUA
    write the host cut short was acknowledged durable with its tail never written."""
    with power:  # one piece
        n = os.pwrite(fd, data, offset)
        if n != len(data):
            _pwrite_rest(fd, memoryview(data)[n:], offset + n)
    os.fdatasync(fd)


def _flush_fua(fd: int, runs: Runs, offset: int, data: bytes,
               power: AbstractContextManager[None]) -> None:
    _destage(fd, runs, True, power)
    _fua(fd, offset, data, power)


def _on(run: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """``run`` as the device's I/O thread runs it: the seam tests hold a host call at."""
    async def call(thread: HostThread, *args: object) -> T:
        return await thread.call(run, *args)
    return call


_a_destage = _on(_destage)
_a_fua = _on(_fua)
_a_flush_fua = _on(_flush_fua)
_a_pread = aiofiles.os.wrap(os.pread)
_a_close = aiofiles.os.wrap(os.close)


class BlockDevice:
    """Owns the image file descriptor and the volatile cache; one per open image."""

    def __init__(
        self,
        path: str,
        fd: int,
        *,
        readonly: bool = False,
        faults: FaultPlan | None = None,
        cache_limit: int = 8 << 20,
    ) -> None:
        self.path = path
        self.fd = fd
        self.readonly = readonly
        self.size = os.fstat(fd).st_size
        self.faults = faults or FaultPlan()
        self.cache_limit = cache_limit
        self.stats = DeviceStats()
        self.log: WriteLog | None = None
        self.dead = False
        self.power = Power()  # what the I/O thread's writes of the image check (``power_cut``)
        self.writes = 0
        self.flipped: list[Flip] = []  # every bit the fault plan's flip= flipped, in order
        # the newest completed, not yet destaged write of each cached sector, by range
        self._cache = WriteCache()
        self._destage_lock = asyncio.Lock()
        # the sectors of the FUA write whose host call is under way (one at a time: it holds the
        # destage lock), until the cache lets go of their older copies (``_host``, ``power_cut``)
        self._fua_sectors = range(0)
        self._background: asyncio.Task | None = None
        self._io = HostThread()  # where the image is written (``_host``)

    @classmethod
    def open_sync(cls, path: str, *, readonly: bool = False, **kw) -> "BlockDevice":
        return cls(path, open_image(path, readonly), readonly=readonly, **kw)

    @classmethod
    async def open(cls, path: str, *, readonly: bool = False, **kw) -> "BlockDevice":
        return cls.open_sync(path, readonly=readonly, **kw)

    # ------------------------------------------------------------ write log

    def start_log(self, base_copy: str | None = None) -> WriteLog:
        """Record from now on. ``base_copy``: where to keep the image as it is now
        (None: the image is all zeros now, e.g. freshly created). One log per device: a second
        start replaced the first, which then recorded nothing more -- its crash states, checked
        by the caller holding it, were those of an empty workload, every one passing."""
        if self.log is not None:
            raise InvalidArgument(f"{self.path}: a write log is already recording on this mount")
        if self._cache:
            raise InvalidArgument("start the write log with an empty write cache (after a flush)")
        if base_copy is not None:
            sparse_copy(self.path, base_copy)
        self.log = WriteLog(base=base_copy, size=self.size)
        return self.log

    async def destage_all(self) -> None:
        """Destage the cache to the image even where the fault plan ignores flushes (``nobarrier``),
        so a write log can start (``start_log`` refuses a cache holding writes): its crash states
        start from an image holding everything written before, as a campaign's start from the
        image mkfs wrote. Under nobarrier a sync left the cache full, and a log could only start
        before the mount's first write."""
        while self._cache:
            await self._destage_cache(sync=True)

    async def mark(self, name: str) -> None:
        """A named point in the write log. Without one it is refused, not dropped: a harness
        that forgot to start the log (``Filesystem.start_write_log``, or ``start_log`` here)
        would look for a mark that went nowhere, or judge a log started later by it."""
        if self.log is None:
            raise InvalidArgument(f"{self.path}: no write log: start_write_log first")
        self.log.append("mark", name=name)

    # ------------------------------------------------------------ checks

    def _gone(self) -> DeviceIOError:
        return DeviceIOError(f"{self.path}: device is gone (power cut)")

    def _check(self, offset: int, length: int, op: str) -> None:
        if self.dead:
            raise self._gone()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceIOError(f"{self.path}: {op} [{offset}, +{length}) beyond the device end {self.size}")
        if op != "read" and self.readonly:
            raise DeviceIOError(f"{self.path}: {op} on a read-only device")
        if op != "read" and (offset % SECTOR or length % SECTOR):
            raise InvalidArgument(f"{op} [{offset}, +{length}) is not {SECTOR}-byte aligned")
        if self.faults.eio and self.faults.eio_hit(offset, length, "r" if op == "read" else "w"):
            raise DeviceIOError(f"{self.path}: injected I/O error on {op} [{offset}, +{length})")

    async def _delay(self) -> None:
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)

    # ------------------------------------------------------------ read

    def _cached(self, offset: int, length: int) -> list[Segment]:
        """The cached writes covering [offset, offset + length), taken *before* the file is read:
        a sector missing from the cache then is in the file already, while one taken out of it
        later (destaged during the pread) might have reached the file only after the pread
        read it."""
        if not self._cache or not length:
            return []
        return self._cache.covering(offset // SECTOR, (offset + length - 1) // SECTOR + 1)

    @staticmethod
    def _overlay(offset: int, data: bytes, hits: list[Segment]) -> bytes:
        if not hits:
            return data
        buf = bytearray(data)
        for first, end, e in hits:
            lo, hi = max(first * SECTOR, offset), min(end * SECTOR, offset + len(data))
            buf[lo - offset : hi - offset] = memoryview(e.data)[lo - e.first * SECTOR : hi - e.first * SECTOR]
        return bytes(buf)

    def read_sync(self, offset: int, length: int) -> bytes:
        self._check(offset, length, "read")
        t = self.stats.begin()
        try:
            return self._overlay(offset, os.pread(self.fd, length, offset), self._cached(offset, length))
        finally:
            self.stats.done("read", length, t)

    async def read(self, offset: int, length: int) -> bytes:
        """A read of up to ``SYNC_READ`` bytes is a pread on the loop, as ``read_sync``'s: from the
        host's page cache it costs a fraction of the executor hop (the stress mix's partial-page
        read-modify-writes and reads of small files spent ~10 % of the loop in the hops). The
        size is the one up to which a read is decrypted on the loop too (filesystem's
        ``_read_extent_part``); larger reads overlap the executor's pread with the loop's work."""
        self._check(offset, length, "read")
        await self._delay()
        if length <= SYNC_READ:
            return self.read_sync(offset, length)
        t = self.stats.begin()
        try:
            hits = self._cached(offset, length)
            with pinned(e for _, _, e in hits):  # a lent buffer must not be reused before the overlay
                return self._overlay(offset, await _a_pread(self.fd, length, offset), hits)
        finally:
            self.stats.done("read", length, t)

    # ------------------------------------------------------------ write

    def _count_write(self) -> None:
        self.writes += 1
        cut = self.faults.cut_after_writes
        if cut is not None and self.writes > cut:
            self.power_cut()
            raise DeviceIOError(f"{self.path}: power cut after {cut} writes")

    def _flip(self, offset: int, data: bytes) -> bytes:
        """Silent corruption: each sector may get one bit flipped on its way to the media (as the
        plan's ``flip_bit`` decides for that sector), and recorded in ``flipped`` (what the flips
        explain is told from a bug by undoing them)."""
        buf = None
        for s in range(len(data) // SECTOR):
            bit = self.faults.flip_bit(offset + s * SECTOR, data[s * SECTOR:(s + 1) * SECTOR])
            if bit is not None:
                buf = buf or bytearray(data)
                at, mask = s * SECTOR + bit // 8, 1 << (bit % 8)
                buf[at] ^= mask
                self.flipped.append(Flip(offset + s * SECTOR, offset + at, mask,
                                         sector_digest(buf[s * SECTOR:(s + 1) * SECTOR])))
        return bytes(buf) if buf else data

    async def write(self, offset: int, data: Buffer, *, fua: bool = False, release: Callable[[], None] | None = None) -> None:
        await self.writev([(offset, data)], fua=fua, releases=[release])

    async def writev(self, writes: Sequence[tuple[int, Buffer]], *, fua: bool = False,
                     releases: Sequence[Callable[[], None] | None] = ()) -> None:
        """Several writes completing together; one log entry each, in order. A write given a
        release (``releases``, in the same order) is lent: the device keeps its buffer itself,
        not a copy, while its sectors are cached, and calls the release once it is done with it
        -- exactly once, whatever happens (at once when the write fails or goes out as FUA).

        Writes to the same sectors in flight together take effect in the order they complete,
        the order the log records them in (DESIGN §10): a FUA write supersedes, when it
        completes, every cached copy of its sectors -- a plain write's that completed while the
        FUA write was in flight too, else reads (and the next flush) kept the plain data where
        the log's crash states put the FUA data over it."""
        lends = list(releases) + [None] * (len(writes) - len(releases))
        cached: set[int] = set()  # the lent writes the cache took: their buffers are its to give back
        try:
            for offset, data in writes:
                self._check(offset, len(data), "write")
            await self._delay()
            incoming = sum(len(data) for _, data in writes)
            while not fua and self._cache and self._cache.sectors * SECTOR + incoming > 2 * self.cache_limit:
                # a full cache stalls the host, as a real one does: the write is accepted once it fits
                await asyncio.shield(self.destage_in_background())
            for i, ((offset, data), release) in enumerate(zip(writes, lends)):
                t = self.stats.begin()
                try:
                    self._count_write()
                    if release is None or fua or self.faults.flip:
                        data = bytes(data)  # the device's own copy (the caller's buffer is given back)
                        if self.faults.flip:
                            data = self._flip(offset, data)
                    first, end = offset // SECTOR, (offset + len(data)) // SECTOR
                    if fua:
                        async with self._destage_lock:  # a destage of the older copies must not land after it
                            await self._host(_a_fua, offset, data, fua_sectors=range(first, end))
                        self._cache.evict(first, end)  # superseded only now: until then reads still see them
                    else:
                        lent = type(data) is not bytes
                        self._cache.put(first, Entry(data, first, end - first, release if lent else None))
                        if lent:
                            cached.add(i)
                    if self.log is not None:  # the log keeps what was written for ever: never a lent buffer
                        self.log.append("fua" if fua else "write", offset, bytes(data))
                finally:
                    self.stats.done("fua" if fua else "write", len(data), t)
        finally:
            for i, release in enumerate(lends):
                if release is not None and i not in cached:
                    release()
        if self._cache.sectors * SECTOR > self.cache_limit:
            self.destage_in_background()  # the disk writes its cache back on its own, while the host keeps issuing

    def destage_in_background(self) -> asyncio.Task:
        """Start writing the cache back (not a flush: nothing becomes durable); the task doing it.
        Its failure (the host's file system full) is not lost when nobody awaits it: the sectors
        stay cached, and the next flush writes them again and raises it. So it is taken as seen,
        not left to asyncio's "Task exception was never retrieved" traceback on stderr."""
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._destage_cache(sync=False))
            self._background.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._background

    async def settle(self) -> None:
        """Wait for the cache's own background writeback (not a flush: nothing becomes durable)."""
        if self._background is not None:
            await asyncio.shield(self._background)

    async def discard(self, offset: int, length: int) -> None:
        """Discarded sectors read back as zeros (deterministic, like dm-thin in generic/482)."""
        self._check(offset, length, "discard")
        t = self.stats.begin()  # nothing here awaits or fails: it ends at once
        first = offset // SECTOR
        self._cache.put(first, Entry(bytes(length), first, length // SECTOR))
        if self.log is not None:
            self.log.append("discard", offset, bytes(length))
        self.stats.done("discard", length, t)

    # ------------------------------------------------------------ flush

    async def _host(self, call: Callable[..., Awaitable[None]], *args: object, fua_sectors: range = range(0)) -> None:
        """Run a host call that writes the image (``_a_destage``, ``_a_fua``, ``_a_flush_fua``)
        in the device's I/O thread, in pieces a power cut stops (``Power``): one the cut stopped raises
        the cut's error, its later pieces never written; one whose every piece landed before the
        cut completes, as a disk completes a command it finished before the power went.

        A write of the image file that the host refuses names the image, as cp(1) names the
        file it could not write: "a.img: No space left on device", not a bare strerror that
        reads as the emulated filesystem's own ENOSPC.

        ``fua_sectors``: a FUA write's, which a cut from here until the caller drops the older
        copies the cache holds of them (synchronously, once this returns) must not land from the
        cache (``power_cut``): the FUA data may be on the image already, and an older copy landed
        over it would lose a write the call acknowledges."""
        self._fua_sectors = fua_sectors
        try:
            await call(self._io, self.fd, *args, self.power)
        except PowerCut:
            raise self._gone() from None
        except OSError as e:
            if e.filename is None and type(e) is OSError:
                raise OSError(e.errno, e.strerror, self.path) from e
            raise
        finally:
            self._fua_sectors = range(0)

    async def _destage_cache(self, *, sync: bool) -> None:
        async with self._destage_lock:
            if self.dead:  # cut while this waited (the lock, a flush's latency): the cache it would sync is gone
                raise self._gone()
            snapshot, version = self._cache.snapshot(), self._cache.version
            with self._flush_logged(sync), pinned(e for _, _, e in snapshot):
                await self._host(_a_destage, as_runs(snapshot), sync)
                self._cache.destaged(snapshot, version)

    @contextlib.contextmanager
    def _flush_logged(self, flush: bool = True) -> Iterator[None]:
        """Log a flush where it completes, covering what was logged where it took its snapshot of
        the cache (``LogEntry.covers``): a write completed while the host syncs is not in the
        snapshot, so it stays in doubt after the flush; and until the flush completes, a power
        cut may land such a write but not the snapshot's. (Logged at completion alone, the
        crash states counted such a write durable; logged at the snapshot, they counted the
        snapshot durable from there on, so no state had the later write without the earlier.)
        A flush that fails leaves a mark."""
        log = self.log if flush else None
        start = len(log.entries) if log is not None else 0
        try:
            yield
        except BaseException:
            if log is not None:
                log.append("mark", name="flush failed")
            raise
        if log is not None:
            log.append("flush", covers=start)

    async def flush(self) -> None:
        """Every write completed before this call is durable when it returns."""
        if self.dead:
            raise self._gone()
        if self.readonly or self.faults.nobarrier:
            return
        await self._delay()
        t = self.stats.begin()
        try:
            await self._destage_cache(sync=True)
        finally:
            self.stats.done("flush", 0, t)

    async def flush_then_fua(self, offset: int, data: bytes) -> None:
        """``flush()``, then ``write(offset, data, fua=True)`` -- a commit's or a log sync's last
        two steps: every block the superblock names durable, then the superblock -- in one trip
        to the I/O thread instead of two (a trip is a thread hop on the loop and the fsync's
        latency). The file sees the same calls in the same order, and the write log the same
        entries. A fault plan that acts on either step (no barriers, latency, flips, injected
        errors, a power cut due at this write) gets the two steps one by one, as they are."""
        if self.readonly or not self.faults.barriers_plain(self.writes):
            await self.flush()
            await self.write(offset, data, fua=True)
            return
        self._check(offset, len(data), "write")
        t = self.stats.begin(2)  # a flush and a FUA write, as the kernel would issue them
        try:
            self._count_write()
            data = bytes(data)
            async with self._destage_lock:
                # older copies of the superblock's sectors too: destaged first
                snapshot, version = self._cache.snapshot(), self._cache.version
                with self._flush_logged(), pinned(e for _, _, e in snapshot):
                    first, end = offset // SECTOR, (offset + len(data)) // SECTOR
                    await self._host(_a_flush_fua, as_runs(snapshot), offset, data, fua_sectors=range(first, end))
                    self._cache.destaged(snapshot, version)
                    self._cache.evict(first, end)  # a write that completed during the call is older too
            if self.log is not None:
                self.log.append("fua", offset, data)
        finally:
            self.stats.done("flush", 0, t)
            self.stats.done("fua", len(data), t)

    # ------------------------------------------------------------ power and close

    def power_cut(self) -> None:
        """Drop the volatile cache, except sectors the ``torn`` fault lets land; the device then
        refuses all I/O. The image is frozen once this returns: a host call in flight (a flush,
        a FUA write, the cache's own writeback) has landed the piece it was writing and writes
        no other (``Power``) -- its request fails (``_host``), a flush's snapshot torn between
        the pieces that landed and those that did not, as the write log's crash states allow."""
        rng, p, fua = self.faults.rng, self.faults.torn, self._fua_sectors
        with self.power.cut():  # (not the sectors of a FUA write under way: its data may be newer on the image)
            landed = [(s, s + 1, e) for s, e in self._cache.sector_items() if s not in fua and rng.random() < p] if p else []
            _pwrite_runs(self.fd, as_runs(landed), contextlib.nullcontext())
        self._cache.clear()
        self.dead = True

    def cached_bytes(self) -> int:
        return self._cache.sectors * SECTOR

    async def close(self) -> None:
        """An orderly close destages the cache without fsync, as a disk writes its cache back at an
        orderly power-off; a disorderly one is ``power_cut()``. Durability still needs ``flush()``."""
        if self._background is not None:
            await asyncio.gather(self._background, return_exceptions=True)
        if self.fd >= 0:
            try:
                if not self.dead and not self.readonly and self._cache:
                    await self._destage_cache(sync=False)
            finally:  # the descriptor goes even when the destage fails, and the lent buffers go back
                self._cache.clear()
                self._io.close()
                fd, self.fd = self.fd, -1
                await _a_close(fd)

    def close_sync(self) -> None:
        if self.fd >= 0:
            if not self.dead and not self.readonly and self._cache:
                _pwrite_runs(self.fd, as_runs(self._cache.snapshot()), self.power)
                self._cache.clear()
            self._io.close()
            os.close(self.fd)
            self.fd = -1
