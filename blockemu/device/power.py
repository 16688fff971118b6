"""The device's power, as the threads that write its image see it.

A flush, a FUA write or the cache's own writeback runs its host calls (``pwritev``, ``fdatasync``)
in the executor's thread, while a power cut comes on the event loop: without a switch both
see, a call in flight at the cut went on writing the image after it -- a copy, a check or a
second mount of the image taken right after the cut raced the thread. So the thread writes
in *pieces* (up to ``IOV_MAX`` runs of the cache, a FUA write), each inside ``with power:``, and the
cut (``cut()``) waits for a piece in progress and refuses every later one: once it has
returned, no byte of the image changes. A flush cut so leaves a torn snapshot -- some runs
landed, the rest not -- which a real disk's interrupted destage leaves too, and which the
write log already counts among its crash states (the snapshot's writes stay in doubt until
the flush completes: ``LogEntry.covers``).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class PowerCut(Exception):
    """A host call met the cut between two pieces: the pieces before it landed, no other did."""


class Power:
    """On until ``cut()``; a piece of a host write runs whole before the cut or not at all.
    ``with power:`` is a piece (any thread): refused, ``PowerCut``, once the power is cut."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.on = True

    def __enter__(self) -> None:
        self._lock.acquire()
        if not self.on:
            self._lock.release()
            raise PowerCut

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """Cut the power (the loop's thread): waits for a piece in progress to land, and holds
        every other thread's off while the body lands what the cut itself lets land (the torn
        fault's sectors, newer than any piece in flight, so they land last)."""
        with self._lock:
            self.on = False
            yield
