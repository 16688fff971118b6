"""A device's own I/O thread: the host calls that write the image (a flush's pwrites and
fdatasync, a FUA write), run one at a time off the event loop, woken and answered through pipes.

Why not the loop's default executor (``run_in_executor``), which these calls used: a flush is
the fsync's one trip to a thread and back, and the trip is latency the fsync waits through.
After ~3 ms of loop CPU (the fio cycle's writeback and log build before its flush), a no-op trip
took a median 315-443 us through the executor and 144-206 us through two pipes (this VM, 300
trips each, alternated runs; the pipes' answer alone 72-119 us against 148-243). Two causes,
both in the wake-ups: a pipe write wakes its reader as a *sync* wake-up, so the scheduler runs
it on the writer's CPU, which is about to wait (the executor's queue wakes a worker through a
futex, on whichever CPU is free: an idle vCPU's wake-up is the dear part); and the executor's
worker answers through ``call_soon_threadsafe`` with Python still to run after it (the
concurrent future's callbacks, its idle count), so the loop, woken, often waited on the GIL
and was woken a second time -- here the thread's last act before it blocks is the pipe write.

One thread per device, started by its first call and ended by ``close``: the calls it runs are
the device's writes of its image, which the device already makes one at a time (its destage
lock), so a queue of them loses no parallelism, and two devices still write side by side.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Call:
    run: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


class HostThread:
    """Runs blocking calls in a thread of its own, in the order given; ``call`` awaits one."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._todo: deque[_Call] = deque()  # given to the thread, not yet taken by it
        self._sent: deque[_Call] = deque()  # not yet answered on the loop, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop watching for answers
        self._wake_r = self._wake_w = self._done_r = self._done_w = -1

    async def call(self, run: Callable[..., Any], *args: Any) -> Any:
        """``run(*args)`` in the thread: its result, or its exception raised here. A caller
        cancelled meanwhile stops waiting; the call itself runs to its end."""
        if self._thread is None:
            self._wake_r, self._wake_w = os.pipe()
            self._done_r, self._done_w = os.pipe()
            self._thread = threading.Thread(target=self._serve, name="blockemu-host", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # watched while calls are out, by the loop that sent them
            self._unwatch()
            loop.add_reader(self._done_r, self._answered)
            self._loop = loop
        c = _Call(run, args, loop.create_future())
        self._sent.append(c)
        self._todo.append(c)
        os.write(self._wake_w, b"\0")
        return await c.future

    def _serve(self) -> None:
        while os.read(self._wake_r, 1):  # b"": ``close`` closed the pipe
            c = self._todo.popleft()
            try:
                c.result = c.run(*c.args)
            except BaseException as e:  # noqa: BLE001 -- raised on the loop, by the caller
                c.error = e
            os.write(self._done_w, b"\0")

    def _answered(self) -> None:
        """The loop's side: a byte for each call done, in the order they were sent."""
        for _ in os.read(self._done_r, len(self._sent)):
            c = self._sent.popleft()
            if c.future.done() or c.future.get_loop().is_closed():
                continue  # its caller stopped waiting (cancelled), or its loop is gone
            if c.error is not None:
                c.future.set_exception(c.error)
            else:
                c.future.set_result(c.result)
        if not self._sent:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._done_r)
        self._loop = None

    def close(self) -> None:
        """End the thread once the calls given to it are done, and close its pipes."""
        if self._thread is None:
            return
        os.close(self._wake_w)
        self._thread.join()
        self._unwatch()
        for fd in (self._wake_r, self._done_r, self._done_w):
            os.close(fd)
        self._thread = None
