"""What fio writes: the contents of its write buffers, as its buffer options shape them.

Storage under test often compresses or deduplicates, so fio lets a job say how much of
what it writes should compress (``buffer_compress_percentage``, per
``buffer_compress_chunk``: that share of each chunk is zeros or ``buffer_pattern``, the
rest random) and how much should repeat (``dedupe_percentage``: that share of the
buffers is one written before -- the previous unique one with ``dedupe_mode=repeat``,
one of a working set of the first unique ones with ``working_set``, shared by the jobs
with ``dedupe_global``). A buffer is made from a seed, so a repeated one is the same
bytes, compressible share included, as fio regenerates it from a saved random state.
Without those: ``buffer_pattern`` fills, ``zero_buffers`` zeroes, otherwise random data,
made once per size and reused unless ``refill_buffers``; ``scramble_buffers`` (fio's
default) stamps each reused buffer's 512-byte sectors with the I/O's offset, which
defeats naive dedupe without the cost of a refill.
"""
from __future__ import annotations

import array
import random

from blockemu.workload.jobfile import Job

SECTOR = 512


class WorkingSet:
    """The seeds of the unique buffers a dedupe may repeat: at most ``limit`` of them (at least one)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit, self.seeds = limit, []

    def add(self, seed: int) -> None:
        if len(self.seeds) < max(1, self.limit):
            self.seeds.append(seed)


class Buffers:
    """One clone's write buffers."""

    def __init__(self, job: Job, rng: random.Random, region_bytes: int, shared: WorkingSet | None) -> None:
        self.rng = rng
        self.pattern: bytes | None = job.get("buffer_pattern")
        self.zero = job.get("zero_buffers", False)
        self.compress = job.get("buffer_compress_percentage")
        self.chunk = job.get("buffer_compress_chunk", SECTOR)
        self.dedupe = job.get("dedupe_percentage", 0)
        self.working_set = job.get("dedupe_mode", "repeat") == "working_set"
        self.refill = job.get("refill_buffers", False)  # compress and dedupe make every buffer anew anyway
        self.scramble = job.get("scramble_buffers", True)
        bs = min((s for s in (job.get("bs") or ()) if s), default=4096)
        limit = region_bytes * job.get("dedupe_working_set_percentage", 5) // 100 // bs
        self.seeds = shared if shared is not None else WorkingSet()
        self.seeds.limit += limit  # dedupe_global: the shared set is every participant's share
        self.last_seed: int | None = None
        self.reused: dict[int, Reused] = {}

    def make(self, length: int, offset: int, numberio: int) -> bytes | bytearray:
        if self.compress is not None or self.dedupe:
            return self._from_seed(self._seed(), length)
        if self.pattern:
            return repeat(self.pattern, length)
        if self.zero:
            return bytes(length)
        if self.refill:
            return self.rng.randbytes(length)
        reused = self.reused.get(length)
        if reused is None:
            reused = self.reused[length] = Reused(self.rng.randbytes(length))
        if not self.scramble:
            return reused.data
        return reused.scrambled(offset, numberio)

    def _seed(self) -> int:
        """A new seed, or -- for dedupe_percentage of the buffers -- one used before."""
        if self.dedupe and self.rng.randrange(100) < self.dedupe:
            if self.working_set and self.seeds.seeds:
                return self.rng.choice(self.seeds.seeds)
            if not self.working_set and self.last_seed is not None:
                return self.last_seed
        seed = self.rng.getrandbits(64)
        self.last_seed = seed
        self.seeds.add(seed)
        return seed

    def _from_seed(self, seed: int, length: int) -> bytes:
        """fio's fill_random_buf_percentage: each chunk is random data, then the compressible
        share as zeros or the pattern."""
        r = random.Random(seed)
        fixed_pct = self.compress or 0
        chunk = min(self.chunk or length, length)
        out = bytearray()
        while len(out) < length:
            n = min(chunk, length - len(out))
            rand = n * (100 - fixed_pct) // 100
            out += r.randbytes(rand)
            out += repeat(self.pattern, n - rand) if self.pattern else bytes(n - rand)
        return bytes(out)


class Reused:
    """A buffer made once and written again and again, and where scramble_buffers stamps it:
    worked out once for its length, since a stamp is made for every write."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        words = len(data) // 8
        n = (words - 2) // 64 + 1 if words >= 2 else 0  # sectors with room for both words
        self.sectors, self.words = n, words
        self.offsets, self.numbers = slice(0, 64 * (n - 1) + 1, 64), slice(1, 64 * (n - 1) + 2, 64)

    def scrambled(self, offset: int, numberio: int) -> bytes | bytearray:
        """A copy with each 512-byte sector starting with the I/O's offset there and its
        sequence number (native u64s): two strided copies, however large the buffer. The copy
        is the I/O's own, so it is handed over as it is, not copied again into a bytes."""
        n = self.sectors
        if not n:
            return self.data
        out = bytearray(self.data)
        q = memoryview(out)[: self.words * 8].cast("Q")
        q[self.offsets] = array.array("Q", range(offset, offset + n * SECTOR, SECTOR))
        q[self.numbers] = array.array("Q", [numberio]) * n
        q.release()
        return out


def repeat(pattern: bytes, n: int) -> bytes:
    return (pattern * (n // len(pattern) + 1))[:n]
