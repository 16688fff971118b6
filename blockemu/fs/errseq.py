"""Writeback-error sequences: what an open file's ``fsync``/``close`` and the mount's ``sync``
report, as Linux's ``errseq_t`` (per file since 4.13, per superblock for syncfs(2) since 5.8).

Linux keeps an ``errseq_t`` on each inode's mapping and on the superblock: a writeback error
advances both; each open file description samples the inode's at open and its fsync (or here
close) reports what was noted since its sample, then advances it; a syncfs reports the
superblock's. Every caller hears each error once -- not the first caller alone: when the
error was cleared at the first report, a second descriptor's fsync returned success although
a write it had acknowledged was gone (two handles on one file, a power cut between).

An ``ErrSeq`` numbers the errors noted and keeps each until no cursor that may still report
it is left. A cursor is a sequence number: the errors past it are the holder's to report.
``open`` holds one from ``seen``, the last error any caller reported -- an error no one has
reported yet is the new holder's too, as Linux's ``errseq_sample`` gives 0 for an unseen error
(4.14: "always report a writeback error once"), so a file opened and fsynced after a
background writeback failed with no handle open still raises it; ``take`` lets the cursor go
and returns what was noted past it. Two syncs running at once therefore both report an error
that happened while both ran (neither may return success over it), and a sync after them
reports nothing new; a file opened after an error some caller reported does not report it.

A cursor is a ``Cursor`` object, not its number: an open file moves its own along at each fsync
(``advance``), and lets it go at close -- or, dropped without a close, when it is collected
(``drop``, from the file's ``__del__``), as a process's exit closes its descriptors.
Before, 1,000 handles dropped unclosed left 1,000 cursors for ever: every error past the
lowest was kept, and each open and close paid for the list of them. The held cursors are
counted by number, so an open and a close cost the same however many handles are open.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from blockemu.errors import restate


@dataclass
class Noted:
    seq: int
    ino: int
    error: OSError
    lost: int  # bytes of acknowledged data this run dropped


class Cursor:
    """A holder's place in an ``ErrSeq``: the errors noted past ``seq`` are its to report."""

    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq


@dataclass
class ErrSeq:
    noted: list[Noted] = field(default_factory=list)  # errors some cursor may still have to report
    last: int = 0  # the sequence number of the latest error noted
    seen: int = 0  # every error up to this sequence number some caller has reported
    _held: dict[int, int] = field(default_factory=dict)  # sequence number -> cursors held there
    # cursors whose holders were collected (``drop``): let go at the next open or take, not by
    # the collector, which may run in the middle of either
    _dropped: list[Cursor] = field(default_factory=list)

    def note(self, ino: int, error: OSError, lost: int) -> None:
        """Writeback dropped ``lost`` bytes of inode ``ino`` with ``error``."""
        self.last += 1
        self.noted.append(Noted(self.last, ino, error, lost))

    def latest(self) -> OSError | None:
        """The error noted last, while some cursor keeps it."""
        return self.noted[-1].error if self.noted else None

    def open(self) -> Cursor:
        """Hold a cursor that will report what no caller has reported yet and what comes next:
        an open file's, or a sync's (``end``)."""
        self._let_dropped_go()
        return self._hold(Cursor(self.seen))

    def take(self, cursor: Cursor) -> list[Noted]:
        """Let ``cursor`` go: what was noted after it, now reported (``seen``)."""
        self._let_dropped_go()
        self._release(cursor)
        return self._report(cursor)

    def advance(self, cursor: Cursor) -> list[Noted]:
        """What was noted after ``cursor``, now reported; the cursor then stands past it (an
        fsync: its file still holds it)."""
        self._let_dropped_go()
        self._release(cursor)
        mine = self._report(cursor)
        cursor.seq = self.seen
        self._hold(cursor)
        return mine

    def drop(self, cursor: Cursor) -> None:
        """The holder of ``cursor`` was collected without letting it go, or its close was
        cancelled: it goes at the next open or take, reporting nothing (what it held is the
        other holders' and the unmount's to report). Only appends -- it runs inside whatever the
        collector interrupted."""
        self._dropped.append(cursor)

    def _let_dropped_go(self) -> None:
        while self._dropped:
            self._release(self._dropped.pop())

    def _hold(self, cursor: Cursor) -> Cursor:
        self._held[cursor.seq] = self._held.get(cursor.seq, 0) + 1
        return cursor

    def _release(self, cursor: Cursor) -> None:
        n = self._held[cursor.seq] - 1
        if n:
            self._held[cursor.seq] = n
        else:
            del self._held[cursor.seq]

    def _report(self, cursor: Cursor) -> list[Noted]:
        """What was noted after ``cursor``, now reported; what no cursor held now may still
        report is forgotten."""
        if not self.noted:  # nothing failed: every close of every file comes here
            return []
        mine = [n for n in self.noted if n.seq > cursor.seq]
        if mine:
            self.seen = max(self.seen, mine[-1].seq)
        # every cursor was opened at some ``seen`` and ``seen`` only grows: none is past it
        keep = min(self._held, default=self.seen)
        self.noted = [n for n in self.noted if n.seq > keep]
        return mine

    def unreported(self) -> list[Noted]:
        """What no caller has reported yet, now reported (an unmount's last word)."""
        return self.take(self.open())

    def end(self, since: Cursor) -> OSError | None:
        """The sync that began at ``since`` is done: the error to raise for what was noted after
        that, if anything was (the first such error, counting every byte and file lost since)."""
        mine = self.take(since)
        return files_error(mine, "writeback failed since the last sync") if mine else None


def files_error(mine: list[Noted], what: str) -> OSError:
    """One error for the losses ``mine`` (some) of any number of files: the first error, with
    every byte and file lost counted -- a sync's, and an unmount's last word, which named the
    first file alone and hid the others' losses."""
    first, files = mine[0], len({n.ino for n in mine})
    return _lost(mine, f"{first.error} ({what}: {_bytes(mine)} bytes of {files} file{'s' * (files > 1)} lost, "
                       f"inode {first.ino} first)")


def file_error(ino: int, mine: list[Noted]) -> OSError:
    """What an fsync or close of inode ``ino`` raises for the errors ``mine`` (some) its handle
    took: the first, with the bytes lost since the handle last reported one."""
    err = mine[0].error
    return _lost(mine, f"{err} (writeback of inode {ino} failed: {_bytes(mine)} bytes lost)")


def _bytes(mine: list[Noted]) -> int:
    return sum(n.lost for n in mine)


def _lost(mine: list[Noted], message: str) -> OSError:
    """A fresh error per report (several inodes and callers may report the same one), caused
    by the first, with ``lost_bytes`` for the harnesses that count them."""
    err = restate(mine[0].error, message)
    err.lost_bytes = _bytes(mine)  # type: ignore[attr-defined]
    err.__cause__ = mine[0].error
    return err
