"""The sealing worker process: encrypt an extent and checksum its ciphertext, in shared memory.

Kept apart from ``sealer.py`` (the asyncio side) so that a worker imports only the
XTS and checksum modules (``xts``, not ``fscrypt`` and the cryptography package): ``BOOT`` loads this module without running the
package's ``__init__``, which would import the whole filesystem into every worker.

A worker maps two memfds it inherits: the page cache's arena of page frames and
the sealer's slots. A request names a slot and, per 4 KiB unit, the frame that
holds its plaintext (or ``IN_SLOT``: the plaintext was copied into the slot,
for pages outside the arena). A slot is ``key | plaintext | ciphertext``: the
worker zeroes the key as soon as it has read it, writes the ciphertext to the
slot and answers with the concatenated per-sector digests. It greets with an empty
answer once it has started, so that starting is not counted against a request's deadline.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys

from blockemu.crypto import xts
from blockemu.ondisk import csum as csums

PAGE = xts.DATA_UNIT
KEY = xts.XTS_KEY_SIZE
SLACK = 15  # update_into wants a block's worth (less one byte) of room after the output
IN_SLOT = -1
REQUEST = struct.Struct("<QIIH")  # slot offset, units, slot capacity, checksum type; then int32 frames
FRAME = struct.Struct("<i")
RESPONSE = struct.Struct("<I")  # bytes of digests that follow
# The event loop drives the pipeline: a worker that preempts it delays the replies it
# must read and the requests it must send, and the other worker starves. Below it in
# priority, the workers take exactly the CPU the loop leaves (measured here: +25-30 %
# sequential throughput on two cores at nice 10).
NICE = 10

# A worker's life is its parent's to end: it exits when its stdin closes (close, or the parent's
# death). Ctrl-C reaches the terminal's whole process group, workers included, and must stop
# the command -- which closes them -- not kill them mid-import with a traceback each, so a
# worker ignores SIGINT from its first line on.
#
# A worker's start delays a mount's first large write, so it loads as little as it can: the
# package without its __init__ (and ondisk.csum loads crc32c's extension without that package's
# __init__, which reads crc32c's version through importlib.metadata: 60 % of the start)
BOOT = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "import sys, types\n"
    "pkg = types.ModuleType('blockemu'); pkg.__path__ = [sys.argv[1]]; sys.modules['blockemu'] = pkg\n"
    "from blockemu.crypto.sealworker import worker_main\n"
    "worker_main(*map(int, sys.argv[2:]))\n"
)


def slot_size(max_extent: int) -> int:
    return KEY + 2 * max_extent + SLACK


def request(off: int, frames: list[int], cap: int, csum_type: int) -> bytes:
    return REQUEST.pack(off, len(frames), cap, csum_type) + struct.pack(f"<{len(frames)}i", *frames)


def seal_slot(arena: memoryview, slots: memoryview, off: int, frames: tuple[int, ...], cap: int, csum_type: int) -> bytes:
    """Seal into the slot at ``off`` the units ``frames`` name; returns the digests."""
    n = len(frames) * PAGE
    plain, out = off + KEY, off + KEY + cap
    first = frames[0]
    units: memoryview | list[memoryview]
    if first >= 0 and frames == tuple(range(first, first + len(frames))):
        # consecutive frames (a streaming write's run): one buffer, so no view and no address
        # lookup per unit -- those were a third of a worker's time on a MiB
        units = arena[first * PAGE : first * PAGE + n]
    else:
        units = [arena[f * PAGE : (f + 1) * PAGE] if f != IN_SLOT else slots[plain + i * PAGE : plain + (i + 1) * PAGE]
                 for i, f in enumerate(frames)]
    key = bytearray(slots[off : off + KEY])
    slots[off : off + KEY] = bytes(KEY)
    try:
        if not xts.crypt(key, units, 0, True, slots[out : out + n + SLACK]):
            from blockemu.crypto import fscrypt  # no OpenSSL 3 libcrypto: cryptography's path

            fscrypt.encrypt_units(key, units, out=slots[out : out + n + SLACK])
    finally:
        xts.zero(key)
    return csums.digests(slots[out : out + n], csum_type)


def worker_main(arena_fd: int, arena_size: int, slots_fd: int, slots_size: int) -> None:
    """Serve requests on stdin until it closes."""
    os.nice(NICE)
    arena = memoryview(mmap.mmap(arena_fd, arena_size))
    slots = memoryview(mmap.mmap(slots_fd, slots_size))
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    try:
        wr.write(RESPONSE.pack(0))
        wr.flush()
        while req := rd.read(REQUEST.size):
            off, count, cap, ctype = REQUEST.unpack(req)
            frames = struct.unpack(f"<{count}i", rd.read(count * FRAME.size))
            out = seal_slot(arena, slots, off, frames, cap, ctype)
            wr.write(RESPONSE.pack(len(out)) + out)
            wr.flush()
    except BrokenPipeError:  # the parent died before reading the answer: nobody is left to tell
        os._exit(0)
