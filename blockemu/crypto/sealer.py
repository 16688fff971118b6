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
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import mmap
import os
import sys
from collections.abc import AsyncIterator, Sequence

from blockemu.crypto import fscrypt
from blockemu.crypto.arena import Arena
from blockemu.crypto.fscrypt import Buffer
from blockemu.crypto.sealworker import BOOT, IN_SLOT, KEY, PAGE, RESPONSE, digests, request, slot_size

POOL_THRESHOLD = 256 << 10
DEPTH = 3  # requests in flight per worker


def worker_count(requested: int | None) -> int:
    """Worker processes a mount runs: one per core unless told."""
    return (os.cpu_count() or 1) if requested is None else requested


def seal_local(key: bytearray | None, data: bytes, csum_type: int) -> tuple[bytes, bytes]:
    sealed = bytes(fscrypt.encrypt_units(key, data)) if key is not None else data
    return sealed, digests(sealed, csum_type)


def seal_batch(jobs: list[tuple[bytearray | None, bytes]], csum_type: int) -> list[tuple[bytes, bytes]]:
    return [seal_local(key, data, csum_type) for key, data in jobs]


class _Worker:
    """One worker process; requests are pipelined (several in flight), answered in order."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                (size,) = RESPONSE.unpack(await self.proc.stdout.readexactly(RESPONSE.size))
                raw = await self.proc.stdout.readexactly(size)
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_result(raw)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            while self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_exception(OSError(f"sealing worker exited: {e}"))

    async def seal(self, off: int, frames: list[int], cap: int, csum_type: int) -> bytes:
        assert self.proc.stdin is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.proc.stdin.write(request(off, frames, cap, csum_type))
        await self.proc.stdin.drain()
        return await fut


class Sealer:
    def __init__(self, *, arena: Arena, max_extent: int, workers: int) -> None:
        self.workers = workers
        self.arena = arena
        self.max_extent = max_extent
        self.slot = slot_size(max_extent)
        self._slots: tuple[int, mmap.mmap, memoryview] | None = None  # memfd, its mapping, a view
        self._idle: asyncio.Queue[tuple[_Worker, int]] | None = None
        self._procs: list[asyncio.subprocess.Process] = []
        self._workers: list[_Worker] = []
        self._starting: asyncio.Lock | None = None
        # small extents requested in the same loop turn share one trip to a thread
        self._batch: list[tuple[bytearray | None, bytes, int, asyncio.Future]] = []

    async def _start(self) -> None:
        # DEPTH slots per worker: the next extent is already waiting when one is done, so a
        # worker never idles while this process is busy elsewhere
        size = self.workers * DEPTH * self.slot
        fd = os.memfd_create("blockemu-seal", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
        self._slots = (fd, mapping, memoryview(mapping))
        self._idle = asyncio.Queue()
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # blockemu/, not crypto/
        arena = self.arena
        for i in range(self.workers):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", BOOT, package, str(arena.fd), str(len(arena.map)), str(fd), str(size),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(arena.fd, fd),
            )
            self._procs.append(proc)
            worker = _Worker(proc)
            self._workers.append(worker)
            for d in range(DEPTH):
                self._idle.put_nowait((worker, (i * DEPTH + d) * self.slot))

    @contextlib.asynccontextmanager
    async def sealed(self, key: bytearray | None, slots: Sequence[bytes | bytearray | int], csum_type: int) -> AsyncIterator[tuple[Buffer, bytes]]:
        """Seal the run: yields its ciphertext (its contents when ``key`` is None) and the
        per-sector checksums, concatenated. Ciphertext from a worker is a view of its slot,
        valid inside the ``async with`` only: the device copies it once, straight from there.
        The page cache keeps the run's frames stable until it is written; heap pages are
        copied without yielding to the loop, so a write lands wholly before or after."""
        n = len(slots) * PAGE
        if key is None or self.workers < 2 or n < POOL_THRESHOLD or n > self.max_extent:
            yield await self._seal_in_thread(key, slots, csum_type)
            return
        if self._slots is None:
            if self._starting is None:
                self._starting = asyncio.Lock()
            async with self._starting:
                if self._slots is None:
                    await self._start()
        assert self._idle is not None and self._slots is not None
        worker, off = await self._idle.get()
        buf = self._slots[2]
        try:
            buf[off : off + KEY] = key
            plain = off + KEY
            frames = [s if type(s) is int else IN_SLOT for s in slots]
            for k, slot in enumerate(slots):
                if type(slot) is not int:  # a heap page: into the slot
                    buf[plain + k * PAGE : plain + (k + 1) * PAGE] = slot
            sums = await worker.seal(off, frames, self.max_extent, csum_type)
            out = off + KEY + self.max_extent
            yield buf[out : out + n], sums
        finally:
            buf[off : off + KEY] = bytes(KEY)
            self._idle.put_nowait((worker, off))

    async def _seal_in_thread(self, key: bytearray | None, slots: Sequence[bytes | bytearray | int], csum_type: int) -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._batch:
            loop.call_soon(lambda: loop.create_task(self._run_batch()))
        page = self.arena.page
        self._batch.append((key, b"".join([page(s) if type(s) is int else s for s in slots]), csum_type, fut))
        return await fut

    async def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        by_type: dict[int, list] = {}
        for job in batch:
            by_type.setdefault(job[2], []).append(job)
        for ctype, jobs in by_type.items():
            try:
                results = await asyncio.to_thread(seal_batch, [(k, d) for k, d, _, _ in jobs], ctype)
            except BaseException as e:
                for *_, fut in jobs:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (*_, fut), result in zip(jobs, results):
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        for proc in self._procs:
            if proc.stdin is not None:
                proc.stdin.close()
            await proc.wait()
        for w in self._workers:
            await w.reader
        self._procs.clear()
        self._workers.clear()
        if self._slots is not None:
            fd, mapping, view = self._slots
            view.release()
            mapping.close()
            os.close(fd)
            self._slots = None
