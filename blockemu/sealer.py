"""Sealing extents at writeout -- encrypt, then checksum the ciphertext -- on every core.

fscrypt-compatible AES-256-XTS needs one cipher call per 4 KiB data unit; each
call is too short to release the GIL for long, so threads do not scale (about
0.5-0.8 GB/s per core here). Large extents therefore go to worker processes
through shared memory: the derived extent key and the plaintext are copied
into a slot, a worker encrypts and checksums it in place, and zeroes the
slot's key bytes as soon as it has read them. Small extents, and mounts with
``workers=0``, seal in a thread of this process.

The workers are plain ``python -c`` subprocesses running ``worker_main``, speaking a
fixed-size request/response protocol on their pipes -- not multiprocessing,
whose spawn start method re-imports the user's ``__main__`` in every worker.
"""
from __future__ import annotations

import asyncio
import collections
import os
import struct
import sys
from multiprocessing import resource_tracker, shared_memory

from . import crypto
from .ondisk import csum as csums

PAGE = crypto.DATA_UNIT
KEY = crypto.XTS_KEY_SIZE
POOL_THRESHOLD = 256 << 10
REQUEST = struct.Struct("<QQH")  # slot offset, plaintext length, checksum type
RESPONSE = struct.Struct("<I")  # bytes of digests that follow
DEPTH = 3  # requests in flight per worker


def seal_local(key: bytearray | None, data: bytes | bytearray, csum_type: int) -> tuple[bytes, list[bytes]]:
    sealed = bytes(crypto.encrypt_units(key, data)) if key is not None else bytes(data)
    return sealed, digests(sealed, csum_type)


def seal_batch(jobs: list[tuple[bytearray | None, bytes | bytearray]], csum_type: int) -> list[tuple[bytes, list[bytes]]]:
    return [seal_local(key, data, csum_type) for key, data in jobs]


def digests(data: bytes | memoryview, csum_type: int) -> list[bytes]:
    mv = memoryview(data)
    return [csums.digest(csum_type, mv[i : i + PAGE]) for i in range(0, len(mv), PAGE)]


def _seal_in_place(buf: memoryview, off: int, n: int, csum_type: int, scratch: bytearray) -> bytes:
    key = bytearray(buf[off : off + KEY])
    buf[off : off + KEY] = bytes(KEY)
    try:
        crypto.encrypt_units(key, buf[off + KEY : off + KEY + n], out=scratch)
    finally:
        crypto.wipe(key)
    sealed = memoryview(scratch)[:n]
    buf[off + KEY : off + KEY + n] = sealed
    return b"".join(digests(sealed, csum_type))


def worker_main(shm_name: str) -> None:
    """A sealing worker: serve requests on stdin until it closes."""
    shm = shared_memory.SharedMemory(name=shm_name)
    # the mounting process owns and unlinks the segment, not this worker's resource tracker
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    scratch = bytearray(shm.size + 15)  # reused: fresh buffers cost page faults every call
    while req := rd.read(REQUEST.size):
        off, n, ctype = REQUEST.unpack(req)
        out = _seal_in_place(shm.buf, off, n, ctype, scratch)
        wr.write(RESPONSE.pack(len(out)) + out)
        wr.flush()
    shm.close()


class _Worker:
    """One worker process; requests are pipelined (several in flight), answered in order."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: collections.deque[tuple[asyncio.Future, int]] = collections.deque()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                (size,) = RESPONSE.unpack(await self.proc.stdout.readexactly(RESPONSE.size))
                raw = await self.proc.stdout.readexactly(size)
                fut, step = self.waiting.popleft()
                if not fut.done():
                    fut.set_result([raw[i : i + step] for i in range(0, size, step)])
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            while self.waiting:
                fut, _ = self.waiting.popleft()
                if not fut.done():
                    fut.set_exception(OSError(f"sealing worker exited: {e}"))

    async def seal(self, off: int, n: int, csum_type: int) -> list[bytes]:
        assert self.proc.stdin is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((fut, csums.csum_size(csum_type)))
        self.proc.stdin.write(REQUEST.pack(off, n, csum_type))
        await self.proc.stdin.drain()
        return await fut


class Sealer:
    def __init__(self, *, max_extent: int, workers: int | None = None) -> None:
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.slot = KEY + max_extent
        self._shm: shared_memory.SharedMemory | None = None
        self._idle: asyncio.Queue[tuple[_Worker, int]] | None = None
        self._procs: list[asyncio.subprocess.Process] = []
        self._workers: list[_Worker] = []
        self._starting: asyncio.Lock | None = None
        # small extents requested in the same loop turn share one trip to a thread
        self._batch: list[tuple[bytearray | None, bytes | bytearray, int, asyncio.Future]] = []

    async def _start(self) -> None:
        # DEPTH slots per worker: the next extent is already waiting when one is done, so a
        # worker never idles while this process is busy elsewhere
        self._shm = shared_memory.SharedMemory(create=True, size=self.workers * DEPTH * self.slot)
        self._idle = asyncio.Queue()
        for i in range(self.workers):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys; from blockemu.sealer import worker_main; worker_main(sys.argv[1])",
                self._shm.name,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            self._procs.append(proc)
            worker = _Worker(proc)
            self._workers.append(worker)
            for d in range(DEPTH):
                self._idle.put_nowait((worker, (i * DEPTH + d) * self.slot))

    async def seal(self, key: bytearray | None, data: bytes | bytearray, csum_type: int) -> tuple[bytes, list[bytes]]:
        """Ciphertext (the data itself when ``key`` is None) and its per-sector checksums."""
        if key is None or self.workers < 2 or len(data) < POOL_THRESHOLD or len(data) + KEY > self.slot:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            if not self._batch:
                loop.call_soon(lambda: loop.create_task(self._run_batch()))
            self._batch.append((key, data, csum_type, fut))
            return await fut
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._shm is None:
                await self._start()
        assert self._idle is not None and self._shm is not None
        worker, off = await self._idle.get()
        buf = self._shm.buf
        try:
            buf[off : off + KEY] = key
            buf[off + KEY : off + KEY + len(data)] = data
            sums = await worker.seal(off, len(data), csum_type)
            return bytes(buf[off + KEY : off + KEY + len(data)]), sums
        finally:
            buf[off : off + KEY] = bytes(KEY)
            self._idle.put_nowait((worker, off))

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
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None
