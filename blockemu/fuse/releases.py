"""Hearing every close(2) made before a key removal before the removal judges "files still busy".

close(2) returns before the server hears of it. The kernel sends FUSE_RELEASE as a *background*
request (``fuse_file_put`` in fs/fuse/file.c: the caller does not wait for it), and while async
READs of the file are outstanding -- readahead past what the reader asked for -- it does not
even queue it: the reply to the last of those READs does, as its end callback drops the file's
last reference. So a removal sent on the control socket right after ``cat f`` could find ``f``
still open and answer "files still busy" though nothing had it open any more (1 run in 50 of a
cat-then-remove loop, 2 in 50 reading a 1 MiB file in the removing process).

A *barrier* orders the removal behind those releases without sleeping. The server opens and
closes its own mount's root directory from a thread, while the loop goes on serving: the close
queues a FUSE_RELEASEDIR, a background request like RELEASE and readahead's READs, so it comes
after each of them that was queued before it -- the kernel's background queue (``fc->bg_queue``)
and its input queue are both first in, first out, and pyfuse3 reads one request at a time and
starts its handler before it reads the next. When the RELEASEDIR's handler starts (``passed``),
every release queued before the barrier has started, and so has every READ of a file closed
before it (a process's reads are queued inside its read(2) calls); the barrier then waits for the
READs and releases running at that moment (``begin``, ``end``). Once a READ's handler has
returned its reply is written, and writing it queued any release that READ held back -- but that
may have been after the barrier was queued. So a second barrier follows the first: every READ of
a closed file is answered by the time it starts, every release they held back is queued ahead
of it, and it waits for them.

While a barrier's thread has the root open the mount is in use -- by the server itself -- and the
kernel's unmount refuses it ("target is busy"): an ``umount`` racing a key removal failed. So the
barriers' opens and the unmount take turns (``quiet``): the unmount waits for a barrier's open and
close, and a barrier that comes while the unmount runs waits for it (once it is done, the open no
longer reaches this mount, and the barrier passes at once).

Writes hold no such reference: without the kernel's writeback cache (``ops.Operations``) a
write(2) waits for its WRITE. A file mapped, or with async direct I/O in flight, is not closed
yet: the kernel holds it, and busy is the right answer.
"""
from __future__ import annotations

import asyncio
import os
import threading
from contextlib import AbstractAsyncContextManager


class Releases:
    """The READ and RELEASE handlers running now, and the barriers on their way through the kernel.
    A handler is known by the number of its start, an int, not a future: a READ is the hot path,
    and tracking it costs ~1,950 instructions that way, ~4,900 with a future (callgrind, 4 KiB
    reads of a cached file in-process, a handler of ~41,000 before; a FUSE round trip adds
    pyfuse3's, libfuse's and the kernel's share on top)."""

    def __init__(self) -> None:
        self.begun = 0  # handlers started so far
        self.running: set[int] = set()  # the numbers of those not ended yet
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []  # (a barrier's mark, woken once all up to it ended)
        self.waiting: dict[int, asyncio.Future[int]] = {}  # a barrier's thread id -> its mark, when it passes
        self.passing: dict[int, asyncio.Future[int]] = {}  # a barrier's directory handle -> the same
        self._root = asyncio.Lock()  # held while a barrier has the mount's root open, or the unmount runs

    def quiet(self) -> AbstractAsyncContextManager[None]:
        """Held, no barrier has the mount's root open: the kernel's unmount runs inside it, which
        said "target is busy" for a root the server's own thread had open."""
        return self._root

    def begin(self) -> int:
        """A READ or RELEASE handler starts; ``end`` it once its answer is made."""
        self.begun += 1
        self.running.add(self.begun)
        return self.begun

    def end(self, n: int) -> None:
        self.running.discard(n)
        if self.waiters:
            self._wake()

    def _wake(self) -> None:
        oldest = min(self.running, default=self.begun + 1)
        still = []
        for mark, woken in self.waiters:
            if oldest > mark:
                if not woken.done():
                    woken.set_result(None)
            else:
                still.append((mark, woken))
        self.waiters = still

    def opened(self, pid: int, fh: int) -> bool:
        """An OPENDIR from thread ``pid``: True if it is a barrier's (its handle ``fh`` then lists nothing)."""
        passed = self.waiting.pop(pid, None)
        if passed is None:
            return False
        self.passing[fh] = passed
        return True

    def passed(self, fh: int) -> bool:
        """A RELEASEDIR: True if it is a barrier's, which now knows what it waits for: the
        handlers started so far."""
        passed = self.passing.pop(fh, None)
        if passed is None:
            return False
        if not passed.done():
            passed.set_result(self.begun)
        return True

    async def settle(self, mountpoint: str) -> None:
        """Every release of a file closed before this call has been handled."""
        await self._barrier(mountpoint)  # the READs of closed files answered: their releases queued
        await self._barrier(mountpoint)  # and handled

    def close(self) -> None:
        """No more requests are read: a barrier on its way would wait for ever. Let it go on --
        no release can come any more."""
        for passed in [*self.waiting.copy().values(), *self.passing.values()]:  # a copy: threads add to it
            if not passed.done():
                passed.set_result(0)
        self.waiting.clear()
        self.passing.clear()

    async def _barrier(self, mountpoint: str) -> None:
        """Every READ and release queued before this call has been answered."""
        passed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        async with self._root:
            if not await asyncio.to_thread(self._open_and_close, mountpoint, passed):
                return
        mark = await passed
        if any(n <= mark for n in self.running):
            woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append((mark, woken))
            await woken

    def _open_and_close(self, mountpoint: str, passed: asyncio.Future[int]) -> bool:
        """In a thread: open and close the mount's root. False if that did not reach this mount --
        it is gone or going (no release can come), or something is mounted over it, or its root
        is not readable by the server's user (nothing better can be done: the removal goes on
        without the barrier, as before it)."""
        tid = threading.get_native_id()  # what the kernel names as the request's pid
        self.waiting[tid] = passed
        try:
            fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        finally:
            ours = self.waiting.pop(tid, None) is None  # our OPENDIR's handler took it
        os.close(fd)
        return ours
