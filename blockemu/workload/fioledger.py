"""What a run's fio jobs made durable, for a power cut inside them (DESIGN §7).

A ``kind=faults`` job's ``cut=`` is a crash: a fio job running when the power goes fails on
the dead device, and that failure is the cut's, not the filesystem's. What the filesystem
owes it is what its fsyncs made durable, so that is what is checked once the image is
mounted again, as a mix's ledger is (``workload/mix.py``). Each file of the run's fio jobs
is shadowed byte for byte while the run has a cut planned (only then: three bytes of memory
per byte written): the latest bytes acknowledged, the bytes the last successful fsync made
durable, and per byte whether it is durable and unchanged since (checked), written since
(either version may be on disk: not checked) or never made durable by this mount (not
checked). Jobs sharing a file share its shadow, so one job's overwrite is never taken for
another's loss.
"""
from __future__ import annotations

import re
from typing import Any

from blockemu.errors import BlockemuError, NotFoundError
from blockemu.fs.filesystem import File, Filesystem, split_path

UNKNOWN, DURABLE, CHANGED = 0, 1, 2
_DURABLE_RUNS = re.compile(rb"\x01+")


def canonical(path: str) -> str:
    """``path`` as the filesystem resolves it (``split_path``: no empty or ``.`` component)."""
    return "/" + b"/".join(split_path(path)).decode(errors="surrogateescape")


class FileShadow:
    """One file's shadow (see the module docstring)."""

    def __init__(self, job: str) -> None:
        self.job = job  # the first job that wrote it: named in a loss
        self.current = bytearray()
        self.durable = bytearray()
        self.state = bytearray()
        self.pending: list[tuple[int, int]] = []  # [start, end) changed since the last fsync began
        # each running fsync's ranges, by its number (``syncing``): those it took, and those changed since it began
        self.running: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        self.syncs = 0

    def _grow(self, end: int) -> None:
        if end > len(self.state):
            more = end - len(self.state)
            self.current += bytes(more)
            self.durable += bytes(more)
            self.state += bytes(more)

    def changed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` is what the file holds at ``offset`` now (a write, zeros a punch or a grow left)."""
        end = offset + len(data)
        self._grow(end)
        self.current[offset:end] = data
        self.state[offset:end] = bytes([CHANGED]) * (end - offset)
        self.pending.append((offset, end))
        for _, since in self.running.values():
            since.append((offset, end))

    def truncated(self, old: int, size: int) -> None:
        """A truncate from ``old`` bytes to ``size``: bytes past ``size`` are gone, or back after a
        cut (it was not durable yet): unknown either way; a grow reads as zeros past ``old``,
        changed. The file may hold bytes the shadow never saw (written before it was opened
        here), up to ``old``: they stay unknown -- counted as zeros from the shadow's end, the
        fsync after the grow called them durable zeros, and the check a loss (review35)."""
        if size < len(self.state):
            del self.current[size:], self.durable[size:], self.state[size:]
            # what is still to be made durable ends there too: a range an fsync running now
            # took, past the end, was marked durable over what a later write grew the file to
            # (review35: a job's ftruncates beside another's writes and fsyncs)
            for ranges in (self.pending, *(taken for taken, _ in self.running.values())):
                ranges[:] = [(start, min(end, size)) for start, end in ranges if start < size]
        elif size > old:
            self.changed(old, bytes(size - old))

    def syncing(self) -> int:
        """An fsync begins: it takes what is pending, and what changes while it runs is noted
        for it (``synced``)."""
        taken, self.pending = self.pending, []
        self.syncs += 1
        self.running[self.syncs] = taken, []
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
        self.pending = taken + self.pending

    def lost(self) -> None:
        """An fsync or close reported that writeback dropped some of the file's data: what is
        still to be made durable may be gone, and no later fsync says otherwise -- each handle
        hears a loss once (DESIGN §5, Linux's errseq), so a handle's next fsync, or one opened
        after the report, returns success over it. Unknown until written again; kept pending,
        the next fsync to return called the lost bytes durable (review38)."""
        self._mark(self.pending, UNKNOWN)
        self.pending = []

    def _mark(self, ranges: list[tuple[int, int]], state: int) -> None:
        """Give ``ranges`` ``state`` (DURABLE: with the bytes they hold now), cut at the shadow's
        end (a change noted while an fsync ran may lie past a truncate since)."""
        for start, end in ranges:
            end = min(end, len(self.state))
            if end > start:
                if state == DURABLE:
                    self.durable[start:end] = self.current[start:end]
                self.state[start:end] = bytes([state]) * (end - start)

    def losses(self, path: str, on_disk: bytes | None) -> list[str]:
        """Each durable stretch the disk does not hold, as the run's finding."""
        found = []
        for m in _DURABLE_RUNS.finditer(self.state):
            start, end = m.span()
            if on_disk is None:
                return [f"{self.job}: {path}: missing after the power cut, though fsync made {end - start} bytes "
                        f"at {start} durable"]
            if on_disk[start:end] != self.durable[start:end]:
                bad = next(i for i in range(start, end) if i >= len(on_disk) or on_disk[i] != self.durable[i])
                found.append(f"{self.job}: {path}: bytes [{bad}, {end}) differ after the power cut, though an "
                             "fsync made them durable")
        return found


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
        end = min(offset + length, len(self._shadow.state))
        if end > offset:
            self._shadow.changed(offset, bytes(end - offset))

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
            if DURABLE not in shadow.state:
                continue
            checked += 1
            try:
                async with fs.open(path) as f:
                    on_disk: bytes | None = await f.read()
            except NotFoundError:
                on_disk = None
            except BlockemuError as e:
                found.append(f"{shadow.job}: {path}: unreadable after the power cut: {e}")
                continue
            found += shadow.losses(path, on_disk)
        self.files.clear()
        return checked, found
