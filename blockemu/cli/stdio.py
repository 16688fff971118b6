"""Standard streams a command was started without (``blockemu put IMG - /x <&-``, ``ls IMG >&-``).

Python leaves ``sys.stdin``/``sys.stdout``/``sys.stderr`` None for a descriptor closed at start-up:
reading the key or the data from ``-`` ended in an AttributeError traceback, and ``print`` to a
None stdout writes nothing, so ``ls IMG >&-`` lost its listing and exited 0. Worse, the first
file the command opens -- the image -- would get the free descriptor 0 or 1. So each closed one
is held open on /dev/null (no file of the command lands on it), and the stream in its place
refuses to be used with EBADF, which the command reports in its one line and its failure exit,
as coreutils' ``cat >&-`` fails ("standard output: Bad file descriptor", exit 1). A closed
stderr just drops what is said there (nothing can be said about it).
"""
from __future__ import annotations

import errno
import os
import sys
from typing import NoReturn

NAMES = {0: "standard input", 1: "standard output"}


class Closed:
    """A standard stream whose descriptor was closed when the command started: every use is EBADF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _refuse(self, *_: object, **__: object) -> NoReturn:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF), NAMES[self.fd])

    def __getattr__(self, name: str) -> NoReturn:
        """``fileno``, ``read``, ``write``, ``buffer``, ...: any of them refuses."""
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()

    def flush(self) -> None:
        """Nothing was written (every write refused): the interpreter's flush at exit finds nothing."""


def is_closed(stream: object) -> bool:
    return isinstance(stream, Closed)


def hold_closed() -> None:
    """Hold each standard descriptor closed at start-up open on /dev/null, and put a ``Closed``
    stream (stdin, stdout) or a /dev/null one (stderr) in place of Python's None."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError as e:
            if e.errno != errno.EBADF:
                continue
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if fd == 0:
            sys.stdin = Closed(0)  # type: ignore[assignment]
        elif fd == 1:
            sys.stdout = Closed(1)  # type: ignore[assignment]
        else:
            sys.stderr = open(fd, "w", closefd=False)  # noqa: SIM115 -- the process's stderr, never closed
