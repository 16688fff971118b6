"""The cyclic garbage collector's schedule for blockemu's own processes (the CLI, the mount
server, the tools): collect young objects after 50,000 allocations net, not CPython's 700.

Why: a mounted filesystem keeps hundreds of thousands of objects alive (decoded tree blocks,
their key tuples, the files' extent maps), and writeback, commits and log syncs allocate and
free tens of thousands a second. With the default schedule the collector ran ~135 young and
~12 middle collections per 300 fsync cycles of 32 random 4 KiB writes, traversing survivors
each time: 0.7-0.9 ms of CPU per ~11 ms cycle (7 %); with this one, one collection, 0.05 ms
per cycle (gc.callbacks, process CPU; tools/bench.py's figures move with it). blockemu makes
few reference cycles (nothing relies on the collector to free memory promptly), so deferring
collection costs little memory. A process-wide setting: applied by the programs that are
blockemu's (``cli.main``: every command and the mount server; tools/bench.py), never by importing the library -- an application
embedding it keeps its own schedule, and can call this.
"""
from __future__ import annotations

import gc

YOUNG = 50_000  # net allocations between collections of the youngest generation
OLDER = 10  # collections of one generation between collections of the next


def collect_less() -> None:
    gc.set_threshold(YOUNG, OLDER, OLDER)
