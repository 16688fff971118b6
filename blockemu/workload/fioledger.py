"""What a run's fio jobs made durable, for a power cut inside them (DESIGN §7).

A ``kind=faults`` job's ``cut=`` is a crash: a fio job running when the power goes fails on
the dead device, and that failure is the cut's, not the filesystem's. What the filesystem
owes it is what its fsyncs made durable, so that is what is checked once the image is
mounted again, as a mix's ledger is (``workload/mix.py``). Each file of the run's fio jobs
is shadowed while the run has a cut planned: per byte whether it is durable and unchanged
since (checked), written since (either version may be on disk: not checked) or never made
durable by this mount (not checked), and what a durable byte must read. Jobs sharing a file
share its shadow, so one job's overwrite is never taken for another's loss.

The shadow keeps hashes, not bytes: a 1 GiB job peaked at 5.4 GB when it kept the bytes
acknowledged and the bytes made durable, three bytes of memory per byte written. A 512-byte
block (fio's sector: every ``bs`` a job gives is a multiple of it, but for odd ones) that a
write covers whole is a state and two 64-bit hashes -- of what it holds now and of what an
fsync made durable -- 17 bytes per 512; only a block a write, punch or truncate covered in
part is kept byte for byte, as the whole file was. Splitting a hashed block keeps its state
but not its bytes: what was durable in it, or is still to be made durable, can no longer be
told from the disk and is not checked -- a lost check, never a false loss.
"""
from __future__ import annotations

import re
from array import array
from collections.abc import Iterator
from typing import Any

import xxhash

from blockemu.errors import BlockemuError, NotFoundError
from blockemu.fs.filesystem import File, Filesystem, split_path
from blockemu.workload.rangeset import RangeSet

BLOCK = 512
UNKNOWN, DURABLE, CHANGED, SPLIT = 0, 1, 2, 3  # SPLIT: the block is kept byte for byte (``Bytes``)
WINDOW = 1 << 20  # the check reads the file this much at a time
_DURABLE_RUNS = re.compile(rb"\x01+")
_DURABLE_SPANS = re.compile(rb"\x01+|\x03")


def _digest(data: bytes | bytearray | memoryview) -> int:
    """A block's hash; 0 is kept for "not known"."""
    return xxhash.xxh3_64_intdigest(data) or 1


ZEROS = _digest(bytes(BLOCK))


def canonical(path: str) -> str:
    """``path`` as the filesystem resolves it (``split_path``: no empty or ``.`` component)."""
    return "/" + b"/".join(split_path(path)).decode(errors="surrogateescape")


class Bytes:
    """A split block, byte for byte: each byte's state, what it holds now and whether that is
    known (not for the bytes a hashed block held when it was split), and what it was made
    durable holding."""

    __slots__ = ("state", "current", "known", "durable")

    def __init__(self, n: int, state: int) -> None:
        self.state = bytearray([state]) * n
        self.current, self.known, self.durable = bytearray(n), bytearray(n), bytearray(n)

    def resize(self, n: int) -> None:
        """The file's end moved inside the block: bytes past it go, bytes it grows by are unknown."""
        for a in (self.state, self.current, self.known, self.durable):
            if n < len(a):
                del a[n:]
            else:
                a += bytes(n - len(a))


class FileShadow:
    """One file's shadow (see the module docstring)."""

    def __init__(self, job: str) -> None:
        self.job = job  # the first job that wrote it: named in a loss
        self.size = 0
        self.state = bytearray()  # per block
        self.current, self.durable = array("Q"), array("Q")  # per block: its hashes, 0 where not known
        self.split: dict[int, Bytes] = {}
        self.pending = RangeSet()  # changed since the last fsync began
        # each running fsync's ranges, by its number (``syncing``): those it took, and those changed since it began
        self.running: dict[int, tuple[RangeSet, RangeSet]] = {}
        self.syncs = 0

    def _resize(self, size: int) -> None:
        """The shadow spans ``size`` bytes: blocks past it go, blocks it grows by are unknown, and
        a last block the end cuts is kept byte for byte."""
        old, blocks = self.size, -(-size // BLOCK)
        if size < old:
            del self.state[blocks:], self.current[blocks:], self.durable[blocks:]
            for b in [b for b in self.split if b >= blocks]:
                del self.split[b]
        else:
            more = blocks - len(self.state)
            self.state += bytes(more)
            self.current.frombytes(bytes(8 * more))
            self.durable.frombytes(bytes(8 * more))
        self.size = size
        for b in {old // BLOCK, size // BLOCK}:  # the old last block, and the new one
            n = min(BLOCK, size - b * BLOCK)
            if n <= 0:
                continue
            if b in self.split:
                self.split[b].resize(n)
                self._settle(b)
            elif n < BLOCK:
                self._split(b)

    def _split(self, b: int) -> Bytes:
        """Block ``b`` byte for byte, from now on until it is whole again (``_settle``)."""
        x = self.split.get(b)
        if x is None:
            state = self.state[b]
            x = self.split[b] = Bytes(min(BLOCK, self.size - b * BLOCK), UNKNOWN if state == DURABLE else state)
            self.state[b] = SPLIT
        return x

    def _settle(self, b: int) -> None:
        """A split block whole again -- all its bytes in one state, all known -- is hashed."""
        x = self.split[b]
        state = x.state[0]
        if len(x.state) == BLOCK and x.state.count(state) == BLOCK and x.known.count(1) == BLOCK:
            del self.split[b]
            self.state[b], self.current[b] = state, _digest(x.current)
            self.durable[b] = _digest(x.durable) if state == DURABLE else 0

    @staticmethod
    def _blocks(start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Each block [start, end) meets: its number, and the part of it met (from its start)."""
        for b in range(start // BLOCK, (end - 1) // BLOCK + 1):
            base = b * BLOCK
            yield b, max(start - base, 0), min(end - base, BLOCK)

    @classmethod
    def _cut(cls, start: int, end: int) -> tuple[list[tuple[int, int, int]], int, int]:
        """[start, end) as the blocks it meets in part (as ``_blocks``) and those it covers whole,
        [b0, b1): those are handled a slice at a time, not a block at a time."""
        b0, b1 = -(-start // BLOCK), end // BLOCK
        if b0 >= b1:
            return list(cls._blocks(start, end)), b0, b0
        edges = [(b0 - 1, start - (b0 - 1) * BLOCK, BLOCK)] if start < b0 * BLOCK else []
        if end > b1 * BLOCK:
            edges.append((b1, 0, end - b1 * BLOCK))
        return edges, b0, b1

    def _unsplit(self, b0: int, b1: int) -> None:
        """Blocks [b0, b1), about to be hashed whole, are no longer kept byte for byte."""
        if self.split and self.state.find(SPLIT, b0, b1) >= 0:
            for b in [b for b in self.split if b0 <= b < b1]:
                del self.split[b]

    def _write(self, offset: int, length: int, data: memoryview | None) -> None:
        """The file holds ``data`` (zeros if None) at ``offset`` now."""
        end = offset + length
        if end > self.size:
            self._resize(end)
        edges, b0, b1 = self._cut(offset, end)
        if b1 > b0:
            n = b1 - b0
            self._unsplit(b0, b1)
            self.state[b0:b1] = bytes([CHANGED]) * n
            self.durable[b0:b1] = array("Q", bytes(8 * n))
            self.current[b0:b1] = array("Q", [ZEROS]) * n if data is None else array(
                "Q", [_digest(data[i : i + BLOCK]) for i in range(b0 * BLOCK - offset, b1 * BLOCK - offset, BLOCK)])
        for b, lo, hi in edges:
            at = b * BLOCK - offset
            x = self._split(b)
            x.current[lo:hi] = bytes(hi - lo) if data is None else data[at + lo : at + hi]
            x.known[lo:hi] = b"\x01" * (hi - lo)
            x.state[lo:hi] = bytes([CHANGED]) * (hi - lo)
            self._settle(b)
        self.pending.add(offset, end)
        for _, since in self.running.values():
            since.add(offset, end)

    def changed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` is what the file holds at ``offset`` now (a write)."""
        self._write(offset, len(data), memoryview(data))

    def zeroed(self, offset: int, length: int) -> None:
        """The file reads zeros over ``length`` bytes at ``offset`` now (a punch, or a grow)."""
        self._write(offset, length, None)

    def truncated(self, old: int, size: int) -> None:
        """A truncate from ``old`` bytes to ``size``: bytes past ``size`` are gone, or back after a
        cut (it was not durable yet): unknown either way; a grow reads as zeros past ``old``,
        changed. The file may hold bytes the shadow never saw (written before it was opened
        here), up to ``old``: they stay unknown -- counted as zeros from the shadow's end, the
        fsync after the grow called them durable zeros, and the check a loss (review35)."""
        if size < self.size:
            self._resize(size)
            # what is still to be made durable ends there too: a range an fsync running now
            # took, past the end, was marked durable over what a later write grew the file to
            # (review35: a job's ftruncates beside another's writes and fsyncs)
            for ranges in (self.pending, *(taken for taken, _ in self.running.values())):
                ranges.clip(size)
        elif size > old:
            self.zeroed(old, size - old)

    def syncing(self) -> int:
        """An fsync begins: it takes what is pending, and what changes while it runs is noted
        for it (``synced``)."""
        taken, self.pending = self.pending, RangeSet()
        self.syncs += 1
        self.running[self.syncs] = taken, RangeSet()
        return self.syncs

    def synced(self, sync: int) -> None:
        """The fsync numbered ``sync`` returned: what it took is durable, but for what was changed again
        after it began (either version may be on disk). Noted for each fsync, not read from
        ``pending``: another fsync that began meanwhile took those changes from there, and the
        first to return called them durable -- while the other one, which had them, failed
        on the power cut (review35: three clones of a job sharing a file, fsync=3)."""
        taken, since = self.running.pop(sync)
        self._mark(taken, DURABLE)
        self._mark(since, CHANGED)

    def unsynced(self, sync: int) -> None:
        """The fsync failed: what it took is still to be made durable."""
        taken, _ = self.running.pop(sync)
        taken.update(self.pending)
        self.pending = taken

    def lost(self) -> None:
        """An fsync or close reported that writeback dropped some of the file's data: what is
        still to be made durable may be gone, and no later fsync says otherwise -- each handle
        hears a loss once (DESIGN §5, Linux's errseq), so a handle's next fsync, or one opened
        after the report, returns success over it. Unknown until written again; kept pending,
        the next fsync to return called the lost bytes durable (review38)."""
        self._mark(self.pending, UNKNOWN)
        self.pending = RangeSet()

    def _mark(self, ranges: RangeSet, state: int) -> None:
        """Give ``ranges`` ``state`` (DURABLE: holding what they hold now, where that is known),
        cut at the shadow's end (a change noted while an fsync ran may lie past a truncate since)."""
        for start, end in ranges:
            end = min(end, self.size)
            if end <= start:
                continue
            edges, b0, b1 = self._cut(start, end)
            if self.state.find(SPLIT, b0, b1) >= 0:  # split blocks covered whole: byte for byte
                edges += [(b, 0, BLOCK) for b in range(b0, b1) if self.state[b] == SPLIT]
            if b1 > b0:
                self._mark_whole(b0, b1, state)
            for b, lo, hi in edges:
                x = self._split(b)
                if state == DURABLE:
                    x.durable[lo:hi] = x.current[lo:hi]
                    x.state[lo:hi] = x.known[lo:hi]  # DURABLE where known, else UNKNOWN (1 and 0)
                else:
                    x.state[lo:hi] = bytes([state]) * (hi - lo)
                self._settle(b)

    def _mark_whole(self, b0: int, b1: int, state: int) -> None:
        """``_mark`` for the hashed blocks in [b0, b1) (split ones are left as they are)."""
        n = b1 - b0
        keep = self.state[b0:b1]
        current = self.current[b0:b1]
        self.state[b0:b1] = bytes([state]) * n
        self.durable[b0:b1] = current if state == DURABLE else array("Q", bytes(8 * n))
        if state == DURABLE and 0 in current:  # what is not known cannot be checked
            for i, h in enumerate(current):
                if not h:
                    self.state[b0 + i] = UNKNOWN
        if SPLIT in keep:
            for i, was in enumerate(keep):
                if was == SPLIT:
                    self.state[b0 + i] = SPLIT

    def has_durable(self) -> bool:
        return DURABLE in self.state or any(DURABLE in x.state for x in self.split.values())

    def durable_spans(self) -> Iterator[tuple[int, int]]:
        """The blocks holding durable bytes, in order: [b0, b1) runs of hashed ones, and each
        split one alone."""
        for m in _DURABLE_SPANS.finditer(self.state):
            b0, b1 = m.span()
            if self.state[b0] != SPLIT or DURABLE in self.split[b0].state:
                yield b0, b1

    def losses(self, path: str, on_disk: bytes | None) -> list[str]:
        """Each durable stretch the disk (``on_disk``: the whole file, None if it is gone) does
        not hold, as the run's finding."""
        scan, disk = Scan(self), memoryview(on_disk or b"")
        for b0, b1 in self.durable_spans():
            scan.blocks(b0, b1, disk[b0 * BLOCK : b1 * BLOCK])
        return scan.findings(path, on_disk is None)


class Scan:
    """A shadow's durable stretches, compared with the disk block by block in order: the check
    reads the file a window at a time, never the whole file into memory."""

    def __init__(self, shadow: FileShadow) -> None:
        self.shadow = shadow
        self.runs: list[list[int | None]] = []  # [start, end, first byte found wrong or None]

    def blocks(self, b0: int, b1: int, disk: memoryview) -> None:
        """Blocks [b0, b1) (a ``durable_spans`` span or part of one) against ``disk``, what the
        file holds there (short at its end)."""
        shadow, base = self.shadow, b0 * BLOCK
        if shadow.state[b0] == SPLIT:
            x = shadow.split[b0]
            for m in _DURABLE_RUNS.finditer(x.state):
                lo, hi = m.span()
                bad = None
                if disk[lo:hi] != x.durable[lo:hi]:
                    bad = base + next(i for i in range(lo, hi) if i >= len(disk) or disk[i] != x.durable[i])
                self._run(base + lo, base + hi, bad)
            return
        read = array("Q", [_digest(disk[i : i + BLOCK]) if len(disk) >= i + BLOCK else 0
                           for i in range(0, (b1 - b0) * BLOCK, BLOCK)])
        want = shadow.durable[b0:b1]
        bad = None if read == want else base + BLOCK * next(i for i, h in enumerate(read) if h != want[i])
        self._run(base, b1 * BLOCK, bad)  # a hash tells the block, not the byte

    def _run(self, start: int, end: int, bad: int | None) -> None:
        if self.runs and self.runs[-1][1] == start:
            run = self.runs[-1]
            run[1] = end
            run[2] = bad if run[2] is None else run[2]
        else:
            self.runs.append([start, end, bad])

    def findings(self, path: str, missing: bool) -> list[str]:
        job = self.shadow.job
        if missing and self.runs:
            start, end, _ = self.runs[0]
            return [f"{job}: {path}: missing after the power cut, though fsync made {end - start} bytes "  # type: ignore[operator]
                    f"at {start} durable"]
        return [f"{job}: {path}: bytes [{bad}, {end}) differ after the power cut, though an fsync made them durable"
                for _, end, bad in self.runs if bad is not None]


class LedgeredFile:
    """A fio job's open file whose changes and fsyncs go into its shadow; everything else is
    the file's own."""

    def __init__(self, file: File, shadow: FileShadow) -> None:
        self._file, self._shadow = file, shadow

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    async def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        n = await self._file.pwrite(data, offset)
        self._shadow.changed(offset, memoryview(data)[:n])
        return n

    async def punch_hole(self, offset: int, length: int) -> None:
        await self._file.punch_hole(offset, length)
        end = min(offset + length, self._shadow.size)
        if end > offset:
            self._shadow.zeroed(offset, end - offset)

    async def truncate(self, size: int | None = None) -> int:
        old = self._file.inode.size
        done = await self._file.truncate(size)
        self._shadow.truncated(old, self._file.inode.size)
        return done

    async def fsync(self) -> None:
        sync = self._shadow.syncing()
        try:
            await self._file.fsync()
        except BaseException as e:
            self._shadow.unsynced(sync)
            if hasattr(e, "lost_bytes"):
                self._shadow.lost()
            raise
        self._shadow.synced(sync)

    async def close(self) -> None:
        try:
            await self._file.close()
        except OSError as e:
            if hasattr(e, "lost_bytes"):  # a writeback loss no fsync of this handle reported
                self._shadow.lost()
            raise


class FsyncLedger:
    """The run's shadows, by path, for the mount a cut may end (``forget``: the file is gone).
    Keyed by the path as the filesystem resolves it (``canonical``): two jobs naming one file
    ``f`` and ``./f`` had a shadow each, and the second's overwrite, fsynced, was the first's
    loss (review35)."""

    def __init__(self) -> None:
        self.files: dict[str, FileShadow] = {}

    def wrap(self, path: str, file: File, job: str) -> File:
        shadow = self.files.setdefault(canonical(path), FileShadow(job))
        return LedgeredFile(file, shadow)  # type: ignore[return-value]  # a File to every caller

    def forget(self, path: str) -> None:
        self.files.pop(canonical(path), None)

    async def check(self, fs: Filesystem) -> tuple[int, list[str]]:
        """The files with durable bytes, and each loss, on ``fs`` (the image mounted again); the
        shadows are dropped after: the jobs that follow start on what the disk held."""
        checked, found = 0, []
        for path, shadow in self.files.items():
            if not shadow.has_durable():
                continue
            checked += 1
            scan = Scan(shadow)
            try:
                async with fs.open(path) as f:
                    window: bytes | None = None
                    at = 0
                    for b0, b1 in shadow.durable_spans():
                        for c0 in range(b0, b1, WINDOW // BLOCK):
                            c1 = min(b1, c0 + WINDOW // BLOCK)
                            if window is None or c0 * BLOCK < at or c1 * BLOCK > at + WINDOW:
                                window, at = await f.pread(WINDOW, c0 * BLOCK), c0 * BLOCK
                            scan.blocks(c0, c1, memoryview(window)[c0 * BLOCK - at : c1 * BLOCK - at])
            except NotFoundError:
                found += shadow.losses(path, None)
                continue
            except BlockemuError as e:
                found.append(f"{shadow.job}: {path}: unreadable after the power cut: {e}")
                continue
            found += scan.findings(path, missing=False)
        self.files.clear()
        return checked, found
