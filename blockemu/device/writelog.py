"""The write log: the record of what the device wrote, and the crash states it implies.

It is dm-log-writes in Python: every write, flush, FUA write,
discard and named mark, in completion order, with sequence numbers. From it
``crash_image`` rebuilds the image as a power cut at any point could have left
it: everything made durable by a completed flush (and every FUA write), plus
any chosen subset -- optionally torn at sector granularity -- of the writes
issued after the last flush.
"""
from __future__ import annotations

import os
import random
from bisect import bisect_left
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Iterable, Literal

from blockemu.errors import InvalidArgument
from blockemu.ondisk.structs import LOG_SLOT_OFFSETS, SUPER_INFO_SIZE, SUPER_OFFSETS

SECTOR = 4096
TEAR = 512  # the device's logical sector: a power cut may land part of a 4 KiB write, as of a superblock
SEQ = attrgetter("seq")
TORN_COPIES = (*SUPER_OFFSETS[1:], *LOG_SLOT_OFFSETS)  # 4 KiB copies written in doubt (``mirror_tears``)
Kind = Literal["write", "fua", "flush", "discard", "mark"]


@dataclass(slots=True)
class LogEntry:
    seq: int
    kind: Kind
    offset: int = 0
    data: bytes = b""
    name: str = ""
    # a flush: the entries before this one were in its snapshot of the cache -- what it made
    # durable; those logged between (completed while the host synced) stay in doubt
    covers: int = 0


def sparse_copy(src: str, dst: str) -> None:
    """Copy an image keeping its holes (a 1 TiB sparse image copies in milliseconds). A ``dst``
    that is ``src`` (the same path, a symlink, a hard link) is refused: opened for writing it
    was emptied before it was read, and ``Filesystem.start_write_log`` given the mounted
    image's own path as its base copy wiped the image under the mount (every committed block
    the later commits did not rewrite read back as zeros)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise InvalidArgument(f"{dst}: is {src} itself; the copy of an image must go elsewhere")
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        fdi = fi.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fdi, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fdi, start, os.SEEK_HOLE)
            while start < end:
                chunk = os.pread(fdi, min(end - start, 8 << 20), start)
                os.pwrite(fo.fileno(), chunk, start)
                start += len(chunk)
            pos = end


@dataclass(frozen=True)
class CrashState:
    """A power cut once ``upto`` log entries had completed, with these in-doubt writes landing."""

    upto: int
    keep: tuple[int, ...] = ()
    torn: dict[int, list[int]] = field(default_factory=dict)
    split: dict[int, tuple[int, int]] = field(default_factory=dict)  # a kept write's bytes [a, b) only

    def __str__(self) -> str:
        torn = f" torn={self.torn}" if self.torn else ""
        split = f" split={self.split}" if self.split else ""
        return f"upto={self.upto} keep={list(self.keep)}{torn}{split}"


@dataclass
class WriteLog:
    """Records device operations; ``base`` is a copy of the image when recording began."""

    base: str | None = None
    size: int = 0
    entries: list[LogEntry] = field(default_factory=list)
    # ``split``'s index of ``entries`` (append-only), rebuilt when more were logged: the writes and
    # discards and the FUA writes in order, and the furthest a completed flush covers in each prefix
    _indexed: int = field(default=-1, repr=False, compare=False)
    _writes: list[LogEntry] = field(default_factory=list, repr=False, compare=False)
    _fuas: list[LogEntry] = field(default_factory=list, repr=False, compare=False)
    _covered: list[int] = field(default_factory=list, repr=False, compare=False)

    def append(self, kind: Kind, offset: int = 0, data: bytes = b"", name: str = "",
               covers: int | None = None) -> LogEntry:
        """``covers``: a flush's snapshot position (``LogEntry.covers``); None: this entry's own."""
        seq = len(self.entries)
        e = LogEntry(seq, kind, offset, bytes(data), name, seq if covers is None else covers)
        self.entries.append(e)
        return e

    def boundaries(self) -> list[int]:
        """Prefix lengths ending right after each flush or FUA write (the persistence points)."""
        return [e.seq + 1 for e in self.entries if e.kind in ("flush", "fua")]

    def marks(self) -> dict[str, int]:
        return {e.name: e.seq + 1 for e in self.entries if e.kind == "mark"}

    def split(self, upto: int) -> tuple[list[LogEntry], list[LogEntry]]:
        """(durable, in-doubt) writes among the first ``upto`` entries.

        Durable: writes in the snapshot of a completed flush (logged before the point it
        ``covers``), and FUA writes. In doubt: the other ordinary writes and discards.

        Work in proportion to what it returns, not to ``upto``: ``crash_states`` asks it at
        every flush and FUA of the log, and a scan of the prefix each time made a long recorded
        run's states quadratic (8 s of a 60 s crash test, a 6,000-entry log).
        """
        self._index()
        upto = max(0, min(upto, len(self.entries)))
        covered = self._covered[upto]  # <= upto: a flush covers only entries before it
        cut, end = bisect_left(self._writes, covered, key=SEQ), bisect_left(self._writes, upto, key=SEQ)
        fuas = self._fuas[: bisect_left(self._fuas, upto, key=SEQ)]
        durable = self._writes[:cut] + fuas
        if cut and fuas:
            durable.sort(key=SEQ)  # in log order, as the entries
        return durable, self._writes[cut:end]

    def _index(self) -> None:
        """Build ``split``'s index if entries were logged since it was built."""
        if self._indexed == len(self.entries):
            return
        self._writes = [e for e in self.entries if e.kind in ("write", "discard")]
        self._fuas = [e for e in self.entries if e.kind == "fua"]
        covered, self._covered = 0, [0]
        for e in self.entries:
            if e.kind == "flush":
                covered = max(covered, e.covers)
            self._covered.append(covered)
        self._indexed = len(self.entries)

    def crash_states(self, rng: random.Random, subsets: int = 4) -> Iterable[CrashState]:
        """Crash states worth checking, CrashMonkey-style: just before and just after every
        flush and FUA write (and at the end of the log), with the in-doubt writes none kept,
        all kept, each alone, and ``subsets`` random subsets with random torn writes; and each
        superblock mirror write in doubt torn inside its one sector (``mirror_tears``)."""
        after = self.boundaries()
        points = sorted({len(self.entries), *after, *(p - 1 for p in after)})
        for upto in points:
            _, doubt = self.split(upto)
            seqs = [e.seq for e in doubt]
            yield CrashState(upto)
            if not seqs:
                continue
            yield CrashState(upto, tuple(seqs))
            yield from mirror_tears(upto, doubt)
            if len(seqs) > 1:
                yield from (CrashState(upto, (s,)) for s in seqs[:16])
            for _ in range(subsets):
                keep = tuple(s for s in seqs if rng.random() < 0.5)
                torn = {}
                for s in keep:
                    n = len(self.entries[s].data) // SECTOR
                    if n > 1 and rng.random() < 0.3:
                        torn[s] = sorted(rng.sample(range(n), rng.randrange(1, n)))
                yield CrashState(upto, keep, torn)

    def crash_image(
        self,
        dest: str,
        upto: int,
        keep: Iterable[int] = (),
        torn: dict[int, list[int]] | None = None,
        split: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        """Write to ``dest`` the image after a power cut once ``upto`` entries had completed.

        ``keep``: sequence numbers of in-doubt writes that reached the media anyway.
        ``torn``: for a kept write, which of its sectors (indices) reached the media.
        ``split``: for a kept write, the byte range of it that reached the media.
        """
        split = split or {}
        durable, doubt = self.split(upto)
        keep = set(keep)
        torn = torn or {}
        chosen = sorted(durable + [e for e in doubt if e.seq in keep], key=lambda e: e.seq)
        if self.base is not None:
            sparse_copy(self.base, dest)
        else:
            with open(dest, "wb") as f:
                f.truncate(self.size)
        with open(dest, "r+b") as f:
            fd = f.fileno()
            for e in chosen:
                if e.kind == "discard":
                    os.pwrite(fd, bytes(len(e.data)), e.offset)
                elif e.seq in split:
                    a, b = split[e.seq]
                    os.pwrite(fd, e.data[a:b], e.offset + a)
                elif e.seq in torn:
                    for i in torn[e.seq]:
                        os.pwrite(fd, e.data[i * SECTOR : (i + 1) * SECTOR], e.offset + i * SECTOR)
                else:
                    os.pwrite(fd, e.data, e.offset)


def mirror_tears(upto: int, doubt: list[LogEntry]) -> Iterable[CrashState]:
    """A commit writes the mirrors after the primary's FUA and before its last flush, and a log
    sync its log slot before its flush: a cut there may land the copy's 4 KiB in part (a device
    of 512-byte sectors tears it), new head and old tail or the reverse -- a mirror whose
    checksum fails beside a valid primary, a slot whose checksum fails beside the one before.
    The other writes in doubt land (the worst case for the rest is covered by the states before)."""
    seqs = tuple(e.seq for e in doubt)
    for e in doubt:
        if e.kind == "write" and e.offset in TORN_COPIES and len(e.data) == SUPER_INFO_SIZE:
            for part in ((0, TEAR), (TEAR, SUPER_INFO_SIZE)):
                yield CrashState(upto, seqs, split={e.seq: part})
