"""The mount's writeback-error sequence: what ``sync`` reports, as syncfs(2) does since Linux 5.8.

Linux keeps an ``errseq_t`` on the superblock besides each file's: a writeback error sets
both, an fsync or close of the file reports the file's, a syncfs reports the superblock's
-- each caller once, an error that happened since it last checked. Before this a sync
returned success after writeback had dropped acknowledged data (the error waited on the
inode for a close that might never come), so a harness that took a returned sync for
"everything acknowledged is durable" counted lost data as safe.

Each ``Filesystem.sync`` is a caller here: it starts from the errors no sync has reported
yet and, once its flush and commit are done, raises the first error noted since then. Two
syncs running at once therefore both report an error that happened while both ran (neither
may return success over it), and a sync after them reports nothing new.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from blockemu.errors import restate


@dataclass
class Noted:
    seq: int
    ino: int
    error: OSError
    lost: int  # bytes of acknowledged data this run dropped


@dataclass
class ErrSeq:
    noted: list[Noted] = field(default_factory=list)  # errors some sync may still have to report
    seen: int = 0  # every error up to this sequence number some sync has reported
    _next: itertools.count = field(default_factory=lambda: itertools.count(1))
    _since: list[int] = field(default_factory=list)  # where each sync in progress started

    def note(self, ino: int, error: OSError, lost: int) -> None:
        """Writeback dropped ``lost`` bytes of inode ``ino`` with ``error``."""
        self.noted.append(Noted(next(self._next), ino, error, lost))

    def begin(self) -> int:
        """A sync starts: it will report what was noted after the last report."""
        self._since.append(self.seen)
        return self.seen

    def end(self, since: int) -> OSError | None:
        """The sync that began at ``since`` is done: the error to raise for what was noted after
        that, if anything was (the first such error, counting every byte and file lost since)."""
        self._since.remove(since)
        mine = [n for n in self.noted if n.seq > since]
        if mine:
            self.seen = max(self.seen, mine[-1].seq)
        keep = min(self._since, default=self.seen)
        self.noted = [n for n in self.noted if n.seq > keep]
        if not mine:
            return None
        first, files = mine[0], len({n.ino for n in mine})
        err = restate(first.error, f"{first.error} (writeback failed since the last sync: "
                                   f"{sum(n.lost for n in mine)} bytes of {files} file{'s' * (files > 1)} lost, "
                                   f"inode {first.ino} first)")
        err.lost_bytes = sum(n.lost for n in mine)  # type: ignore[attr-defined]
        return err
