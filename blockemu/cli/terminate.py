"""SIGTERM stops a command as Ctrl-C does. Python leaves SIGTERM at its default, which ends the
process on the spot: no cleanup ran, so `timeout`, systemd or `kill` stopping ``mkfs --rootdir``
left a half-built image (one that mounts, holding part of the tree: mkfs removes it on Ctrl-C),
and a campaign (``crash``, ``stress --seeds``) left its shards' temporary directory of images
under /tmp. Raised as a ``KeyboardInterrupt``, SIGTERM unwinds through the same cleanup."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# they take SIGTERM themselves: ``run`` stops its jobs and reports what they did, as fio does
# (workload/runner.py takes the signal only while nobody else handles it); a mount's server
# unmounts
OWN_HANDLERS = frozenset({"run", "mount"})


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def terminated_as_interrupted(command: str) -> Iterator[None]:
    """While ``command`` runs, SIGTERM raises ``Terminated``, where nothing else handles it
    (a command's caller may: main() is called from Python too) and only in the main thread,
    the one Python runs signal handlers in."""
    if command in OWN_HANDLERS or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
