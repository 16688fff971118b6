"""Fault plans: what the emulated device does wrong (EIO ranges, latency, bit
flips, torn writes, a power cut after N writes, ignored flushes). The plan is a
rule, not a replay: a bit flip is a function of the plan's seed and the sector
written (its address and bytes), so the same write is flipped the same way
whatever the order writes come in; which writes a run makes, and when, is the
run's own (DESIGN §7, what a stress rerun repeats). The device consults the
plan; the write log (``writelog``) records what it did."""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import TypeVar

from blockemu.device.writelog import SECTOR
from blockemu.errors import InvalidArgument
from blockemu.units import parse_size

N = TypeVar("N", int, float)


@dataclass
class FaultPlan:
    """What the device does wrong: flips by a seeded hash of each sector written, torn writes by
    a seeded RNG drawn over the cache at the cut.

    Spec syntax (``--faults``): comma-separated ``eio=START-END[:r|w|rw]``,
    ``latency=SECONDS``, ``flip=PROB`` (bit flip per written sector),
    ``torn=PROB`` (a write made non-atomic: on a cut only some sectors land),
    ``cut=N`` (power cut after N writes), ``nobarrier`` (flushes do nothing: the
    ordering bug the crash tests must catch), ``seed=N``.
    """

    eio: list[tuple[int, int, str]] = field(default_factory=list)
    latency: float = 0.0
    flip: float = 0.0
    torn: float = 0.0
    cut_after_writes: int | None = None
    nobarrier: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def barriers_plain(self, writes: int) -> bool:
        """Whether no fault acts on a flush or the next write after ``writes`` writes (no
        barriers dropped, no latency, flips or injected errors, no power cut due): only then may
        a device fuse the two into one trip (``BlockDevice.flush_then_fua``)."""
        return not (self.nobarrier or self.latency or self.flip or self.eio
                    or (self.cut_after_writes is not None and writes >= self.cut_after_writes))

    def flip_bit(self, offset: int, sector: bytes) -> int | None:
        """The bit ``flip=`` flips in ``sector``, written at image offset ``offset``, or None: a
        keyed hash of the seed, the offset and the bytes decides, not a draw in write order. The
        order writes reach the device is timing (the tasks' interleaving, the commit timer, the
        sealing workers), so a draw per sector flipped different writes on every run of one seed
        (6, 33 and 37 corruptions detected); the same write is now flipped the same way, alone or
        in a batch, first or last."""
        h = hashlib.blake2b(sector, digest_size=16, salt=offset.to_bytes(16, "little"))
        h.update(b"%d" % self.seed)
        d = h.digest()
        if int.from_bytes(d[:8], "little") >= self.flip * (1 << 64):
            return None
        return int.from_bytes(d[8:], "little") % (SECTOR * 8)

    def eio_hit(self, offset: int, length: int, op: str) -> bool:
        return any(op in ops and offset < end and start < offset + length for start, end, ops in self.eio)

    @classmethod
    def parse(cls, spec: str) -> "FaultPlan":
        """The plan ``spec`` names; a value out of range is refused by name (flip=2 flipped a bit
        in every sector and failed the run, eio=5M-1M injected nothing)."""
        plan = cls()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, val = part.partition("=")
            try:
                if key == "eio":
                    m = re.fullmatch(r"([^-:]+)-([^:]+)(?::(r|w|rw))?", val)
                    if not m:
                        raise ValueError(val)
                    start, end = parse_size(m[1]), parse_size(m[2])
                    if not start < end:  # an empty range injects nothing: a run that tests no fault
                        raise InvalidArgument(f"bad fault spec: {part!r}: START must be below END")
                    plan.eio.append((start, end, m[3] or "rw"))
                elif key == "latency":
                    plan.latency = in_range(part, float(val.removesuffix("s")), 0, None, "seconds, 0 or more")
                elif key in ("flip", "torn"):
                    setattr(plan, key, in_range(part, float(val), 0, 1, "a probability from 0 to 1"))
                elif key == "cut":
                    plan.cut_after_writes = in_range(part, int(val), 0, None, "a number of writes, 0 or more")
                elif key == "nobarrier":
                    plan.nobarrier = True
                elif key == "seed":
                    plan.seed = int(val)
                else:
                    raise InvalidArgument(f"bad fault spec: unknown fault {key!r}")
            except ValueError:
                raise InvalidArgument(f"bad fault spec: {part!r}") from None
        plan.rng = random.Random(plan.seed)
        return plan


@dataclass(frozen=True)
class Flip:
    """One bit the device flipped on its way to the media: the byte (an image offset) and the bit,
    and a digest of the whole sector as it was written, so that undoing it touches only a sector
    that still holds exactly that (a later write, or a power cut that dropped this one, leaves
    what is there alone)."""

    sector: int  # the sector's image offset
    byte: int
    mask: int
    digest: bytes


def sector_digest(sector: bytes) -> bytes:
    return hashlib.blake2b(sector, digest_size=16).digest()


def undo_flips(path: str, flips: list[Flip]) -> int:
    """Flip back, in the image at ``path``, every recorded bit whose sector still holds what its
    flip wrote -- newest first, so a sector flipped twice comes back whole; returns how many. The
    image left is the one the run would have made on a sound device: a check of it tells a
    consistency bug from what the flips explain (``blockemu stress --faults flip=P``)."""
    undone = 0
    fd = os.open(path, os.O_RDWR)
    try:
        for f in reversed(flips):
            sector = bytearray(os.pread(fd, SECTOR, f.sector))
            if sector_digest(sector) == f.digest:
                sector[f.byte - f.sector] ^= f.mask
                os.pwrite(fd, sector, f.sector)
                undone += 1
    finally:
        os.close(fd)
    return undone


def in_range(part: str, value: N, low: float, high: float | None, what: str) -> N:
    """``value`` if within [low, high]; the part of the spec and what it must be otherwise. A NaN
    or an infinity is neither: ``latency=nan`` and ``flip=nan`` ran as no fault at all, and
    ``latency=inf`` held every device request for ever."""
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise InvalidArgument(f"bad fault spec: {part!r}: {what}")
    return value
