"""Sealing extents at writeout -- encrypt, then checksum the ciphertext -- on every core.

fscrypt-compatible AES-256-XTS needs one cipher call per 4 KiB data unit; each
call is too short to release the GIL for long, so threads do not scale (about
0.5-0.8 GB/s per core here). Large extents therefore go to worker processes
through shared memory (``sealworker.py``): the run's pages already sit in the
page cache's arena, so this process only puts the derived extent key in a slot
and names the frames; a worker encrypts them into the slot and checksums the
ciphertext. Small extents, and mounts with ``workers=0``, seal in a thread of
this process.

The workers are plain ``python -c`` subprocesses that inherit the two memfds and
speak a small request/response protocol on their pipes -- not multiprocessing,
whose spawn start method re-imports the user's ``__main__`` in every worker.

The pool is supervised. A worker that exits, closes its pipe or leaves a request
unanswered past a deadline is killed and reaped; only then do its requests fail
(EIO, naming the worker) and their slots return to the idle queue, so a slot is
never handed to a new user while a worker may still read its key or write its
ciphertext. The next request tops the pool up with a new worker, at most
``respawns`` times a minute: past that, sealing continues on the workers left,
or in a thread of this process when none is.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import mmap
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence

from blockemu.crypto import fscrypt
from blockemu.crypto.arena import Arena, unmap
from blockemu.crypto.fscrypt import Buffer
from blockemu.crypto.sealworker import BOOT, IN_SLOT, KEY, PAGE, RESPONSE, request, slot_size
from blockemu.errors import DeviceIOError
from blockemu.ondisk.csum import csum_size, digests, unit_digests

POOL_THRESHOLD = 256 << 10
# Keyed runs of a ``seal_many`` batch up to this many bytes in all are sealed on the loop, not on
# a thread: the XTS calls keep the GIL (a PyDLL), so the thread never ran beside the loop, and its
# round trip was pure cost -- ~100 us idle (more under load) against ~27 us a one-page run
# (derive its key, encrypt, checksum): a batch of 32 such runs 875 us on the loop, 997 us there
# and back; one 64-page run 280 vs 333 us. Under the interpreter's 5 ms switch interval the
# loop waited on the thread's GIL just as long, so only batches past that need the thread.
LOOP_SEAL = POOL_THRESHOLD
DEPTH = 3  # requests in flight per worker
# A 1 MiB extent seals in milliseconds; a worker at nice 10 on a machine loaded with
# other work can take far longer, and killing a slow but healthy worker loses data
TIMEOUT = 30.0  # seconds a worker may take to answer the request at the head of its pipe
START_TIMEOUT = 30.0  # seconds a new worker may take to start (at least TIMEOUT)
LATE = 0.1  # seconds: a deadline timer this late means the loop stalled
CLOSE_TIMEOUT = 5.0  # seconds close() waits for a worker to exit before killing it
RESPAWNS = 4  # replacement workers per RESPAWN_WINDOW; a crash loop must not become a fork loop
RESPAWN_WINDOW = 60.0


def worker_count(requested: int | None) -> int:
    """Worker processes a mount runs: one per core unless told."""
    return (os.cpu_count() or 1) if requested is None else requested


def seal_local(key: bytearray | None, data: Buffer | list[Buffer], csum_type: int) -> tuple[Buffer, bytes]:
    """A run's ciphertext and checksums; ``data`` one buffer, or with a key its 4 KiB units
    wherever they lie."""
    sealed = bytes(fscrypt.encrypt_units(key, data)) if key is not None else data
    return sealed, digests(sealed, csum_type)


# A run's key for ``seal_many``: the extent key, or the master secret and the extent's nonce
# to derive it from where the run is sealed, once it is (~13 us a run) -- or None, no key.
RunKey = bytearray | tuple[bytearray, bytes] | None
# A sealed run's bytes as ``seal_many`` gives them: in parts, which the caller joins where it
# writes them (one copy for a stretch of runs placed one after another)
Parts = list[Buffer]


def seal_batch(jobs: list[tuple[RunKey, Buffer | list[Buffer]]], csum_type: int) -> list[tuple[Buffer, bytes]]:
    out = []
    for key, data in jobs:
        if isinstance(key, tuple):
            derived = fscrypt.extent_key(*key)
            try:
                out.append(seal_local(derived, data, csum_type))
            finally:
                fscrypt.wipe(derived)
        else:
            out.append(seal_local(key, data, csum_type))
    return out


class _Worker:
    """One worker process; requests are pipelined (several in flight), answered in order.

    Its end is one path whatever the cause (exit, closed pipe, deadline, close): it leaves
    the pool at once, the process is reaped (killed first unless it exits by itself), and
    only then does every request still waiting fail with EIO."""

    def __init__(self, proc: asyncio.subprocess.Process, timeout: float, on_exit: Callable[["_Worker"], None]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.timeout = timeout
        self.waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.why: str | None = None  # why we stopped it, if we did
        self._on_exit = on_exit
        self._deadline: asyncio.TimerHandle | None = None
        # its greeting is answered like a request: the worker has started, in time
        self.ready: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append(self.ready)
        self._arm()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, off: int, frames: list[int], cap: int, csum_type: int) -> asyncio.Future[bytes]:
        """Queue a request; the future holds its digests. The pipe is not drained: requests
        are tiny and their number is bounded by the slots, and a worker that stops reading
        is caught by the deadline (a broken pipe ends in its exit, seen by the reader)."""
        assert self.proc.stdin is not None
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.proc.stdin.write(request(off, frames, cap, csum_type))
        if len(self.waiting) == 1:
            self._arm()
        return fut

    def _arm(self) -> None:
        """The deadline runs for the request at the head of the pipe: the worker answers in
        order, so the clock starts when the previous answer arrived (or at the send)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.waiting and self.why is None:
            head = self.waiting[0]
            starting = head is self.ready
            limit = max(self.timeout, START_TIMEOUT) if starting else self.timeout
            self._expire_at(asyncio.get_running_loop().time() + limit, head,
                            f"did not {'start' if starting else 'answer'} within {limit:g} s")

    def _expire_at(self, when: float, head: asyncio.Future[bytes], why: str) -> None:
        self._deadline = asyncio.get_running_loop().call_at(when, self._expire, when, head, why)

    def _expire(self, due: float, head: asyncio.Future[bytes], why: str) -> None:
        """The deadline counts only time the loop could have read the answer: a loop that
        stalled past it runs this timer before it has read (a few turns later) an answer
        that came in time. Then look again once it has caught up."""
        now = asyncio.get_running_loop().time()
        if not self.waiting or self.waiting[0] is not head:
            return
        if now - due > LATE:
            self._expire_at(now + LATE, head, why)
        else:
            self.kill(why)

    def kill(self, why: str) -> None:
        """Stop the worker (SIGKILL also ends a stopped process); the reader then sees the
        pipe close, reaps it and fails what it held."""
        if self.why is None:
            self.why = why
        self._on_exit(self)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _error(self) -> DeviceIOError:
        rc = self.proc.returncode
        why = self.why or (f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with status {rc}")
        return DeviceIOError(f"sealing worker {self.pid} {why}")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                (size,) = RESPONSE.unpack(await self.proc.stdout.readexactly(RESPONSE.size))
                raw = await self.proc.stdout.readexactly(size)
                if not self.waiting:
                    raise ValueError("an answer to no request")
                fut = self.waiting.popleft()
                self._arm()
                if not fut.done():
                    fut.set_result(raw)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # it exited, or is exiting (after a kill of ours, or of its own accord)
        except asyncio.CancelledError:  # the loop is going away: leave no worker behind
            self.kill("was cancelled")
            self._fail()
            raise
        except Exception as e:  # a garbled answer: nothing it says can be trusted
            self.kill(f"broke the protocol ({e!r})")
        self._on_exit(self)  # a replacement may start now: the slots stay held until _fail
        try:
            await asyncio.wait_for(self.proc.wait(), self.timeout)
        except TimeoutError:
            self.kill(f"closed its pipe but did not exit within {self.timeout:g} s")
            await self.proc.wait()
        self._fail()

    def _fail(self) -> None:
        """The worker is dead: its requests fail and, through their futures, free their slots."""
        if self._deadline is not None:
            self._deadline.cancel()
        err = self._error()
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(err)


class Sealer:
    def __init__(self, *, arena: Arena, max_extent: int, workers: int, timeout: float = TIMEOUT,
                 close_timeout: float = CLOSE_TIMEOUT, respawns: int = RESPAWNS, lendable: int = 0) -> None:
        """``lendable``: slots that may be lent out (``loan``) on top of the ones sealing needs."""
        self.workers = workers
        # the smallest run (in bytes) a worker seals (``pooled``); none without two workers
        self.pool_from = POOL_THRESHOLD if workers >= 2 else max_extent + 1
        self.arena = arena
        self.max_extent = max_extent
        self.slot = slot_size(max_extent)
        self.timeout = timeout
        self.close_timeout = close_timeout
        self.respawns = respawns
        self._closed = False
        self._slots: tuple[int, mmap.mmap, memoryview] | None = None  # memfd, its mapping, a view
        # DEPTH slots per worker: the next extent is already waiting when one is done, so a
        # worker never idles while this process is busy elsewhere. A slot belongs to no
        # worker: whoever holds its offset owns it until its request is answered or failed.
        self.slots = workers * DEPTH if workers >= 2 else 0
        # and ``lendable`` more, which only loans take from sealing: a ciphertext lent to the
        # device stays in its slot until destaged, and the slots left always suffice to seal on
        self._lendable = lendable if self.slots else 0
        self._lent = 0
        # id of a ciphertext view ``sealed`` yields now -> its slot and the pages copied into it (None: lent)
        self._yielded: dict[int, tuple[int, Sequence[int]] | None] = {}
        self._idle: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.slots + self._lendable):
            self._idle.put_nowait(i * self.slot)
        self._workers: list[_Worker] = []  # the live ones
        self._spawned: collections.deque[float] = collections.deque()  # when replacements started
        self._starting = asyncio.Lock()
        # small extents requested in the same loop turn share one trip to a thread
        self._batch: list[tuple[list[tuple[RunKey, bytearray]], int, asyncio.Future]] = []  # runs, csum type, their future

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    async def _spawn(self) -> None:
        assert self._slots is not None
        fd, size = self._slots[0], len(self._slots[1])
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # blockemu/, not crypto/
        arena = self.arena
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BOOT, package, str(arena.fd), str(len(arena.map)), str(fd), str(size),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(arena.fd, fd),
        )
        worker = _Worker(proc, self.timeout, self._exited)
        try:
            await worker.ready
        except asyncio.CancelledError:  # nobody would stop it
            worker.kill("was cancelled while starting")
            raise
        self._workers.append(worker)

    def _exited(self, worker: _Worker) -> None:
        with contextlib.suppress(ValueError):  # close() has already let it go
            self._workers.remove(worker)

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceIOError("sealing after the sealer was closed (unmounted)")

    async def _pick(self) -> _Worker | None:
        """The live worker with the fewest requests in flight, after topping the pool up
        (replacements within the respawn budget); None when there is no worker to be had."""
        self._check_open()
        if len(self._workers) < self.workers:
            async with self._starting:
                self._check_open()  # closed while this waited for a start to finish
                missing = self.workers - len(self._workers)
                if self._slots is None:  # the first start
                    size = (self.slots + self._lendable) * self.slot
                    fd = os.memfd_create("blockemu-seal", os.MFD_CLOEXEC)
                    os.ftruncate(fd, size)
                    mapping = mmap.mmap(fd, size)
                    self._slots = (fd, mapping, memoryview(mapping))
                else:
                    now = asyncio.get_running_loop().time()
                    while self._spawned and self._spawned[0] < now - RESPAWN_WINDOW:
                        self._spawned.popleft()
                    missing = min(missing, self.respawns - len(self._spawned))
                    self._spawned.extend([now] * missing)
                errors = [e for e in await asyncio.gather(*(self._spawn() for _ in range(missing)), return_exceptions=True)
                          if e is not None]
                if errors and not self._workers:
                    raise errors[0]
        return min(self._workers, key=lambda w: len(w.waiting), default=None)

    def _release(self, off: int, answer: asyncio.Future[bytes] | None = None, copied: Sequence[int] = ()) -> None:
        """The slot's request is answered or its worker dead: wipe it, make it idle. (An answer
        nobody awaits any more is consumed here.)"""
        if answer is not None and not answer.cancelled():
            answer.exception()
        self._wipe_slot(off, copied)
        self._idle.put_nowait(off)

    def _wipe_slot(self, off: int, copied: Sequence[int]) -> None:
        """Zero the slot's key and the plaintext pages ``copied`` into it (the workers map the
        slots too); its ciphertext may stay."""
        if self._slots is not None:
            buf = self._slots[2]
            buf[off : off + KEY] = bytes(KEY)
            for k in copied:
                buf[off + KEY + k * PAGE : off + KEY + (k + 1) * PAGE] = bytes(PAGE)

    def loan(self, view: Buffer) -> Callable[[], None] | None:
        """Let the caller keep ``sealed``'s ciphertext ``view`` past the ``async with`` -- the
        device keeps it in its cache rather than a copy (a MiB's memcpy and fresh heap pages
        per extent) -- and the slot with it. Returns the call that gives the slot back, or None
        (copy it then) when ``view`` is no slot's or ``lendable`` slots are already out. The slot
        is wiped now: the borrower may give it back -- and another run take it -- before the
        ``async with`` is left (a device write that fails gives it back at once)."""
        held = self._yielded.get(id(view))
        if held is None or self._lent >= self._lendable:
            return None
        self._yielded[id(view)] = None
        self._wipe_slot(*held)
        self._lent += 1
        return functools.partial(self._repay, held[0])

    def _repay(self, off: int) -> None:
        self._lent -= 1
        self._idle.put_nowait(off)

    @contextlib.asynccontextmanager
    async def sealed(self, key: RunKey, pages: Sequence[bytes | bytearray | int], csum_type: int) -> AsyncIterator[tuple[Buffer, bytes]]:
        """Seal a run of ``pages`` (each an arena frame number, or a heap page): yields its ciphertext (its contents when ``key`` is None) and the
        per-sector checksums, concatenated. A key given as secret and nonce (a ``RunKey``) is
        derived where the run seals: in the sealing thread for a small run, not on the loop.
        Ciphertext from a worker is a view of its slot, valid inside the ``async with`` only --
        unless lent (``loan``): the device then keeps the view itself until it is destaged.
        The page cache keeps the run's pages stable until it is written (a write to one gets a
        fresh page): a worker's heap pages are copied into its slot, a thread reads them where
        they lie.
        A worker that dies or hangs fails the run with EIO (DeviceIOError)."""
        n = len(pages) * PAGE
        if key is None or not self.pooled(n):
            yield await self._seal_in_thread(key, pages, csum_type)
            return
        off = await self._idle.get()
        try:
            worker = await self._pick()
        except BaseException:
            self._idle.put_nowait(off)
            raise
        if worker is None:  # the respawn budget is spent and no worker is left
            self._idle.put_nowait(off)
            yield await self._seal_in_thread(key, pages, csum_type)
            return
        assert self._slots is not None
        buf = self._slots[2]
        derived = fscrypt.extent_key(*key) if isinstance(key, tuple) else key
        try:
            buf[off : off + KEY] = derived
        finally:
            if derived is not key:
                fscrypt.wipe(derived)
        plain = off + KEY
        if all(map(isinstance, pages, itertools.repeat(int))):  # all frames (a C-level scan): the common case
            frames, copied = list(pages), []
        else:
            frames = [p if type(p) is int else IN_SLOT for p in pages]
            copied = [k for k, p in enumerate(pages) if type(p) is not int]
        for k in copied:  # a heap page: into the slot
            buf[plain + k * PAGE : plain + (k + 1) * PAGE] = pages[k]  # type: ignore[assignment]
        fut = worker.send(off, frames, self.max_extent, csum_type)
        try:
            sums = await asyncio.shield(fut)
        except BaseException:
            # cancelled, or the worker is dead: the slot is free only once the request is
            # answered or failed -- until then the worker may still read it or write to it
            fut.add_done_callback(lambda f: self._release(off, f, copied))
            raise
        out = off + KEY + self.max_extent
        view = buf[out : out + n]
        self._yielded[id(view)] = (off, copied)
        try:
            yield view, sums
        finally:
            if self._yielded.pop(id(view)) is not None:  # (lent: wiped, and idle again once repaid)
                # our export of the mapping ends here, even if the caller's frame (kept alive
                # by an exception's traceback) still names the view
                view.release()
                self._release(off, copied=copied)

    def pooled(self, nbytes: int) -> bool:
        """Whether ``sealed`` would hand a run of ``nbytes`` (with a key) to a worker; smaller
        runs are sealed on a thread, in batches, and ``seal_many`` takes several at once."""
        return self.pool_from <= nbytes <= self.max_extent

    async def seal_many(self, runs: Sequence[tuple[RunKey, Sequence[bytes | bytearray | int]]],
                        csum_type: int) -> list[tuple[Parts, bytes]]:
        """Seal several runs (each a ``RunKey`` and its pages) in one batch: for small runs,
        where a worker's round trip costs more than the sealing. Each result is the run's bytes
        in parts (its ciphertext, the caller's own buffer, not a slot's view) and its checksums.

        Runs without a key are only checksummed, here on the loop: a group is at most a few
        hundred KiB (``pooled``'s threshold), and the thread's round trip cost more than the
        checksums (an fsync after 32 scattered 4 KiB writes spent ~1.2 ms of the loop's CPU
        handing them over). Runs with a key are sealed on the loop too, their keys derived
        there from secret and nonce, up to ``LOOP_SEAL`` bytes in all (the thread held the GIL
        throughout, so its round trip bought nothing); a larger batch (a mount with fewer than
        two workers groups up to ``max_extent``) shares one trip to a thread, queued as
        futures -- not a task per run."""
        if all(key is None for key, _ in runs):
            return self._checksummed([pages for _, pages in runs], csum_type)
        jobs = [(key, self._joined(pages) if key is None else self._in_place(pages)) for key, pages in runs]
        if sum(len(pages) for _, pages in runs) * PAGE <= LOOP_SEAL:
            sealed = seal_batch(jobs, csum_type)
        else:
            sealed = await self._queue(jobs, csum_type)
        return [([data], sums) for data, sums in sealed]

    def _queue(self, runs: list[tuple[RunKey, Buffer | list[Buffer]]], csum_type: int) -> asyncio.Future[list[tuple[Buffer, bytes]]]:
        """Runs into the next thread batch (started on the next loop turn, so runs queued
        in this one share it); one future for all their results. Not a future per run: an fsync
        after 32 scattered writes spent ~90 us of the loop's CPU on 32 futures, their gather
        and its 32 callbacks."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[tuple[Buffer, bytes]]] = loop.create_future()
        if not self._batch:
            loop.call_soon(lambda: loop.create_task(self._run_batch()))
        self._batch.append((runs, csum_type, fut))
        return fut

    def _checksummed(self, runs: list[Sequence[bytes | bytearray | int]], csum_type: int) -> list[tuple[Parts, bytes]]:
        """Runs without a key: each as its pages where they lie (arena views, heap pages: the
        page cache keeps them as they are until the runs are written, and the caller copies
        them once, where it writes them) and their checksums -- all the runs' in one call. A
        ``bytes`` per run here, then one per stretch of runs placed together, copied each page
        twice, and a scattered write load's runs are a page each: a join and a checksum call
        per page."""
        view = self.arena.view  # (``Arena.page`` written out: a call per page)
        units = [view[p * PAGE : (p + 1) * PAGE] if type(p) is int else p for pages in runs for p in pages]
        sums, size = unit_digests(units, csum_type), csum_size(csum_type)
        out: list[tuple[Parts, bytes]] = []
        at = 0
        for pages in runs:
            end = at + len(pages)
            out.append((units[at:end], sums[at * size : end * size]))
            at = end
        return out

    def _joined(self, pages: Sequence[bytes | bytearray | int]) -> bytearray:
        """A run's pages (arena frame numbers or heap pages) copied into one buffer."""
        page = self.arena.page
        return bytearray().join([page(p) if type(p) is int else p for p in pages])

    def _in_place(self, pages: Sequence[bytes | bytearray | int]) -> Buffer | list[Buffer]:
        """A keyed run's pages as the sealing thread encrypts them: where they lie, not copied
        -- one view when its frames follow one another in the arena (a write's usually do),
        else a view per page. Each page is stable until the run is written (the page cache
        gives a write to it a fresh page), as a worker relies on. A plaintext copy of the run,
        made on the loop and zeroed there after, was ~3 % of the stress mix's loop time (its
        runs are mostly under the workers' threshold), and the copy held plaintext besides.
        If the caller gives up before the thread is done, the pages may be reused while the
        thread reads them: what it makes of them is ciphertext nobody takes. A heap page goes
        as a view too: the export pins it while the thread's C call reads it with no lock, so a
        resize would be a BufferError, not a read of freed memory (review33)."""
        first = pages[0]
        if type(first) is int and list(pages) == list(range(first, first + len(pages))):
            return self.arena.frames(first, len(pages))
        page = self.arena.page
        return [page(p) if type(p) is int else memoryview(p) for p in pages]

    async def _seal_in_thread(self, key: RunKey, pages: Sequence[bytes | bytearray | int], csum_type: int) -> tuple[Buffer, bytes]:
        jobs = [(key, self._joined(pages) if key is None else self._in_place(pages))]
        return (await self._queue(jobs, csum_type))[0]

    async def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        by_type: dict[int, list] = {}
        for entry in batch:
            by_type.setdefault(entry[1], []).append(entry)
        for ctype, entries in by_type.items():
            try:
                results = await asyncio.to_thread(seal_batch, [run for runs, _, _ in entries for run in runs], ctype)
            except BaseException as e:
                for *_, fut in entries:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            at = 0
            for runs, _, fut in entries:
                if not fut.done():
                    fut.set_result(results[at:at + len(runs)])
                at += len(runs)

    async def close(self) -> None:
        """Stop the workers: each finishes what it holds and exits when its pipe closes;
        one that has not within ``close_timeout`` (hung, or stopped) is killed. None starts again."""
        self._closed = True
        async with self._starting:  # a worker still starting joins the pool first, and is stopped with it
            workers, self._workers = self._workers, []
        for w in workers:
            assert w.proc.stdin is not None
            w.proc.stdin.close()
        await asyncio.gather(*(self._stop(w) for w in workers))
        if self._slots is not None:
            fd, mapping, view = self._slots
            self._slots = None
            unmap(mapping, view)
            os.close(fd)

    async def _stop(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.reader), self.close_timeout)
        except TimeoutError:
            worker.kill(f"did not exit within {self.close_timeout:g} s of close")
            await worker.reader
