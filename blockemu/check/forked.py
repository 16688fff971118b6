"""A call run in a forked child while this process goes on with other work: fsck's second core.

Fork, not a pool: the child inherits everything already read and decoded (copy-on-write), so
nothing large crosses between the processes -- only the call's result, pickled through a pipe,
which the caller keeps small. The child never returns into the caller's code: it leaves with
``os._exit`` (no atexit handlers, no stdio buffers flushed twice, no teardown of the inherited
objects, which costs a large check a good part of a second). If the child delivers nothing
(it raised, was killed, ran out of memory), ``result()`` says so with None, and the caller
does the work itself: exactly what one process would have done, exceptions included.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
from types import TracebackType
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

CAN_FORK = hasattr(os, "fork")


def second_core() -> bool:
    """Whether this process may run on more than one core (its CPU affinity): on one, a second
    process only takes turns with the first. A machine others keep busy still gains: the
    scheduler shares the cores among processes, and two of them get more turns than one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores > 1


def alone() -> bool:
    """Whether this process runs no other thread: only then is a fork safe by default. A thread
    holding a lock at the fork (an import, a logging handler, the allocator of a C library)
    leaves the child's copy held for ever; the async ``fsck()`` API runs the check in a thread
    of the caller's loop, beside whatever threads the caller has."""
    return threading.active_count() == 1


class Forked(Generic[T]):
    """``with Forked(call) as side: ...; side.result()``: ``call()`` runs in a child from the
    ``with`` on; leaving the block reaps the child (killing it if its result was not wanted)."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.pid = 0
        self.fd = -1

    def __enter__(self) -> "Forked[T]":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: compute, send, leave
            code = 1
            try:
                os.close(r)
                data = pickle.dumps(self.call(), pickle.HIGHEST_PROTOCOL)
                with open(w, "wb") as out:
                    out.write(data)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fd = pid, r
        return self

    def result(self) -> T | None:
        with open(self.fd, "rb") as f:
            self.fd = -1
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if os.waitstatus_to_exitcode(status) == 0 and data:
            return pickle.loads(data)
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
