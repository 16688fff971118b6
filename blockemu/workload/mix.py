"""An fsstress-like random mix of filesystem operations, checked against an oracle.

Each task works in its own directory (as ``fsstress -p``) and keeps a model of
what its subtree must hold: names, file contents. Reads are checked against the
model as they happen; at the end, after unmount and a fresh mount, the whole
subtree as the disk holds it is compared (``verify_mix``) -- never through the
page cache that ran the mix, where pages marked clean but never written would
still read back right. Every random choice comes from the seed, so a seed
replays the same operations.
"""
from __future__ import annotations

import asyncio
import errno
import random
import re
import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable

from blockemu.errors import ChecksumError, CorruptionError, NotFoundError
from blockemu.fs.filesystem import Filesystem

# a task's data is drawn from one seeded buffer of this many of its largest writes: slices at
# random offsets differ wherever two writes overlap (their offsets in the pool coincide with
# chance 1 in its size), and a slice costs a copy where ``randbytes`` cost a big-integer draw
# per write -- a tenth of the mix's event-loop time
POOL_WRITES = 16
DEFAULT_OPS = {"create": 4, "write": 4, "overwrite": 4, "append": 3, "truncate": 2, "read": 3, "fsync": 1,
               "rename": 2, "unlink": 1, "mkdir": 2, "rmdir": 1, "sync": 1}


@dataclass
class MixResult:
    ops: int = 0
    # wall seconds from the first operation to the end of the last (every task's last one,
    # begun before a --duration deadline, ends after it): the mix's own time, the denominator
    # of its ops/s -- not the making, mounting or checking around it
    seconds: float = 0.0
    by_op: dict[str, int] = field(default_factory=dict)
    acknowledged_writes: int = 0
    divergent: list[str] = field(default_factory=list)
    # operations, and reads after the run, that a checksum (data's or a tree block's) refused:
    # corruption detected, which injected bit flips make and a sound run without them never shows
    detected: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # operations the (faulty) device made fail
    no_space: list[str] = field(default_factory=list)  # operations refused with ENOSPC: the image is full
    # the ledger: what an fsync or sync acknowledged as durable and nothing changed since (a
    # sync records a file's model itself, which no change touches before dropping the entry)
    durable: dict[str, bytes | bytearray] = field(default_factory=dict)
    tasks: list["Task"] = field(default_factory=list)


def names(said: str, paths: list[str]) -> bool:
    """Whether ``said`` names every one of ``paths``, each whole: ``/t0/f1`` is not named by an
    error about ``/t0/f12`` (a substring test took it for named, and the line then named only
    the other file)."""
    return all(re.search(re.escape(p) + r"(?![^\s:'\"),])", said) for p in paths)


class Task:
    def __init__(self, fs: Filesystem, root: str, rng: random.Random, result: MixResult, scale: int = 1) -> None:
        """``scale`` multiplies the sizes of the data written (for the production write path)."""
        self.fs, self.root, self.rng, self.r, self.scale = fs, root, rng, result, scale
        self.files: dict[str, bytearray] = {}
        self.dirs: list[str] = [root]
        self.n = 0
        self.tainted: set[str] = set()  # paths an injected fault left in an unknown state
        self.version: dict[str, int] = {}  # bumped whenever a path is about to change
        self.busy: set[str] = set()  # paths the operation in progress is changing
        self.reading: str | None = None  # the path the operation in progress reads, if a read
        self.about = ""  # the path an operation that neither reads nor changes a file names (fsync, mkdir, rmdir)
        # the files a failure of the operation in progress may leave unknown; None: every one
        self.scope: set[str] | None = None
        self.pool = memoryview(rng.randbytes(POOL_WRITES * 20_000 * scale))

    def _data(self, n: int) -> memoryview:
        """``n`` bytes of seeded random data: a view of the task's (immutable) pool at a random
        offset. A view, not a copy: a fresh ``bytes`` of up to 192 KiB per write was faulted in
        page by page, ~2 % of the production mix's event-loop time."""
        off = self.rng.randrange(len(self.pool) - n + 1)
        return self.pool[off : off + n]

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{self.rng.choice(self.dirs)}/{kind}{self.n}"

    async def step(self, op: str) -> None:
        """One operation; a failure the device injected (EIO, EROFS), a full image (ENOSPC) or a
        checksum's refusal taints the paths involved. A checksum's refusal (of data: EIO, of a
        tree block: EUCLEAN) is corruption detected -- a flip's under flip=, else the run's
        failure -- not an I/O error."""
        try:
            await self._step(op)
        except OSError as e:
            # the paths the operation was on, unless its error names them: "overwrite: inode 339:
            # ..." left a reader to find the file by its inode
            where = [self.reading] if self.reading else sorted(self.busy) or [self.about] * bool(self.about)
            what = f"{op} {' '.join(where)}" if where and not names(str(e), where) else op
            if detected(e):
                self.r.detected.append(f"{what}: {e}")
            elif e.errno not in (errno.EIO, errno.ENOSPC, errno.EROFS):
                raise
            else:
                (self.r.no_space if e.errno == errno.ENOSPC else self.r.errors).append(f"{what}: {e}")
            # what the operation may have changed: the paths it was changing (a create whose
            # write failed left its file, empty, on disk: the model adds a file only once
            # written), an fsync's file, a directory operation's entries -- not the task's
            # other files, whose loss the check after the run must still see (another file's
            # lost writeback is reported by its own next close, or else by the unmount, which
            # leaves the check to the ledger). A sync's error may be any task's file's loss,
            # and the next sync returns success over it (it reports each loss once, as
            # syncfs(2) on one descriptor): every task's files are unknown, or another task's
            # sync put a file whose data was lost in the ledger (seed 9, eio=30M-60M:w). A read
            # changed nothing: its file only, as its error may be the file's close reporting a
            # lost writeback, and not even that when a checksum refused what it read (a flip:
            # the file is checked after the run like any other).
            if op == "sync":
                for t in self.r.tasks or [self]:  # (crash_mix runs a Task of its own, in no list)
                    t.tainted |= set(t.files)
            elif self.reading is None:
                # no scope: it failed before naming one, so before its first filesystem call and
                # before it changed the model (each changes it only once its calls succeeded):
                # the files now are the files it began with -- not copied up front, a set of
                # every file per operation that almost never failed
                self.tainted |= set(self.files) if self.scope is None else self.scope
            elif not detected(e):
                self.tainted.add(self.reading)
            self.tainted |= self.busy
        finally:
            self.busy.clear()
            self.reading = None
            self.scope = None
            self.about = ""

    def _frozen(self) -> bool:
        """Nothing reaches the disk any more: the power was cut (or the transaction aborted, which
        commits nothing after it), so the ledger as it stands is what the crashed image must hold.
        Later operations fail on the dead device and change nothing on disk; dropping the paths
        they touched from the ledger emptied it, and ``cut=`` runs checked none of the files
        fsynced before the cut (seed 3, ``cut=300``: 28 in the ledger at the cut, 0 checked)."""
        return self.fs.vol.device.dead or self.fs.vol.aborted is not None

    def _changing(self, *paths: str) -> None:
        """These paths are about to change: what the ledger held for them is no longer certain --
        unless nothing can reach the disk any more (``_frozen``): then the entry stays, copied, as
        a sync's entry is the model itself, which the change is about to alter in place."""
        self.scope = set()  # a failure leaves unknown these (``busy``) and nothing else
        frozen = self._frozen()
        for p in paths:
            if not frozen:
                self.r.durable.pop(p, None)
            elif p in self.r.durable:
                self.r.durable[p] = bytes(self.r.durable[p])
            self.version[p] = self.version.get(p, 0) + 1
            self.busy.add(p)

    def _entries(self, *dirs: str) -> set[str]:
        """The files directly in these directories: what a failed mkdir or rmdir may leave unknown."""
        return {p for p in self.files if p.rpartition("/")[0] in dirs}

    async def _step(self, op: str) -> None:
        fs, rng, files, scale = self.fs, self.rng, self.files, self.scale
        if op in ("write", "overwrite", "append", "truncate", "read", "fsync", "rename", "unlink") and not files:
            op = "create"
        if op == "rmdir" and len(self.dirs) == 1:
            op = "mkdir"
        self.r.by_op[op] = self.r.by_op.get(op, 0) + 1
        self.r.ops += 1
        if op == "create":
            p = self._name("f")
            data = self._data(rng.randrange(0, 20_000 * scale))
            self._changing(p)
            async with fs.open(p, "x") as f:
                await f.write(data)
            files[p] = bytearray(data)
            self.r.acknowledged_writes += 1
        elif op in ("write", "overwrite", "append"):
            p = rng.choice(list(files))
            self._changing(p)
            model = files[p]
            data = self._data(rng.randrange(1, 12_000 * scale))
            off = len(model) if op == "append" else rng.randrange(0, len(model) + (8192 * scale if op == "write" else 1))
            async with fs.open(p, "r+") as f:
                await f.pwrite(data, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
            self.r.acknowledged_writes += 1
        elif op == "truncate":
            p = rng.choice(list(files))
            self._changing(p)
            size = rng.randrange(0, len(files[p]) + 4096 * scale)
            async with fs.open(p, "r+") as f:
                await f.truncate(size)
            m = files[p]  # in place, as a write changes it (``_changing`` dropped the ledger's entry)
            del m[size:]
            m.extend(bytes(size - len(m)))
        elif op == "read":
            p = self.reading = rng.choice(list(files))
            async with fs.open(p, "r") as f:
                got = await f.read()
            if got != files[p] and p not in self.tainted:
                self.r.divergent.append(f"{p}: read {len(got)} bytes, model has {len(files[p])}")
        elif op == "fsync":
            p = self.about = rng.choice(list(files))
            self.scope = {p}
            async with fs.open(p, "r+") as f:
                await f.fsync()
            if not self._frozen() and p not in self.tainted:  # its lost write, reported, is in the model
                # the model itself, uncopied, as a sync records it: every change to it goes
                # through ``_changing``, which drops (or, frozen, copies) the entry first
                self.r.durable[p] = files[p]
        elif op == "sync":
            # what was acknowledged when sync() was called is durable when it returns; paths
            # another task is changing (an operation begun, not yet acknowledged: it may land
            # in this sync or not) or changes meanwhile may land either way: not recorded. A
            # path whose version did not move still holds what it held at the call, so the
            # ledger takes its model as it is, uncopied: every later change to it goes through
            # ``_changing``, which drops the ledger's entry first (copying every file of every
            # task on each sync cost more than the sync's own writeback)
            before = [(t, q, t.version.get(q, 0)) for t in self.r.tasks for q in t.files
                      if q not in t.tainted and q not in t.busy]
            await fs.sync()
            for t, q, ver in before if not self._frozen() else ():
                if t.version.get(q, 0) == ver and q in t.files:
                    self.r.durable[q] = t.files[q]
        elif op == "rename":
            src = rng.choice(list(files))
            dst = self._name("r") if rng.random() < 0.7 or len(files) < 2 else rng.choice(list(files))
            self._changing(src, dst)
            await fs.rename(src, dst)
            files[dst] = files.pop(src)
            if src in self.tainted:  # what a fault left unknown goes with the file, not the name
                self.tainted.add(dst)
        elif op == "unlink":
            p = rng.choice(list(files))
            self._changing(p)
            await fs.unlink(p)
            del files[p]
        elif op == "mkdir":
            d = self.about = self._name("d")
            self.scope = self._entries(d.rpartition("/")[0])
            await fs.mkdir(d)
            self.dirs.append(d)
        elif op == "rmdir":
            d = self.about = rng.choice(self.dirs[1:])
            self.scope = self._entries(d.rpartition("/")[0], d)
            try:
                await fs.rmdir(d)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                return
            self.dirs.remove(d)

    async def verify(self, fs: Filesystem, into: MixResult) -> None:
        """The subtree as ``fs`` (a fresh mount of the image) holds it is exactly the model:
        every name, every byte; what differs or fails to read goes to ``into``."""
        found: dict[str, bytes] = {}
        unreadable: set[str] = set()
        todo = [self.root]
        while todo:
            d = todo.pop()
            try:
                names = await fs.readdir(d)
            except NotFoundError as e:  # the task's directory gone: a finding (its files follow), not the run's error
                into.divergent.append(f"{d}: missing on disk: {e}")
                continue
            for name in names:
                p = f"{d}/{name}"
                if (await fs.stat(p)).st_mode & 0o040000:
                    todo.append(p)
                    continue
                try:
                    async with fs.open(p) as f:
                        found[p] = await f.read()
                except OSError as e:
                    unreadable.add(p)
                    if p not in self.tainted:
                        (into.detected if detected(e) else into.divergent).append(f"{p}: unreadable on disk: {e}")
        for p in sorted((set(found) | set(self.files)) - self.tainted - unreadable):
            if found.get(p) != (bytes(self.files[p]) if p in self.files else None):
                into.divergent.append(f"{p}: on disk {len(found.get(p, b''))} bytes, model "
                                        f"{len(self.files[p]) if p in self.files else 'absent'}")


async def run_mix(fs: Filesystem, *, root: str, tasks: int, nops: int, ops: dict[str, int] | None, seed: int,
                  duration: float | None = None, advance: Callable[[int], None] = lambda n: None,
                  result: MixResult | None = None, scale: int = 1) -> MixResult:
    """``tasks`` tasks of ``nops`` operations each (or until ``duration`` seconds pass). The
    caller unmounts, mounts afresh and checks the result with ``verify_mix``."""
    weights = ops or DEFAULT_OPS
    unknown = set(weights) - set(DEFAULT_OPS)
    if unknown:
        raise ValueError(f"unknown mix operations: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_OPS)})")
    # the cumulative weights once, not per draw (``choices`` accumulates ``weights`` each call):
    # the same draws, as ``choices`` computes them from these
    names, cum = list(weights), list(accumulate(weights.values()))
    result = result if result is not None else MixResult()  # the caller's, so a failed run keeps its counts
    if not await fs.exists(root):
        await fs.mkdir(root)
    workers = []
    for i in range(tasks):
        sub = f"{root}/p{i}"
        await fs.mkdir(sub)
        workers.append(Task(fs, sub, random.Random(f"{seed}:{i}"), result, scale))
    result.tasks = workers

    started = time.monotonic()
    deadline = started + duration if duration else None

    async def drive(t: Task) -> None:
        n = 0
        while (n < nops) if deadline is None else (time.monotonic() < deadline):
            await t.step(t.rng.choices(names, cum_weights=cum)[0])
            advance(1)
            n += 1

    drivers = [asyncio.ensure_future(drive(t)) for t in workers]
    try:
        await asyncio.gather(*drivers)
    finally:
        # one task failing stops the others before the caller goes on (gather cancels nothing):
        # left running, they changed a filesystem being unmounted under them
        for d in drivers:
            d.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        result.seconds = time.monotonic() - started
    return result


async def verify_mix(fs: Filesystem, result: MixResult, into: MixResult | None = None) -> None:
    """Every task's subtree on ``fs`` -- a fresh mount, so what the disk holds -- against its model.
    Findings go to ``into`` (``result`` itself by default): a second image judged against the
    same model (the run's, its bit flips undone) keeps its findings apart."""
    for t in result.tasks:
        await t.verify(fs, into or result)


async def verify_ledger(fs: Filesystem, result: MixResult, into: MixResult | None = None) -> None:
    """After a crash: every file the ledger holds must be on disk, byte for byte (a read that
    fails its checksum is corruption detected, not silent loss: ``into.detected``; ``into`` as
    ``verify_mix``'s)."""
    into = into or result
    for p, want in sorted(result.durable.items()):
        try:
            async with fs.open(p) as f:
                got = await f.read()
        except OSError as e:
            (into.detected if detected(e) else into.divergent).append(f"{p}: fsync-acknowledged, now {e}")
            continue
        if got != want:
            into.divergent.append(f"{p}: fsync-acknowledged {len(want)} bytes, after the crash {len(got)} differ")


def detected(e: OSError) -> bool:
    """A read refused because what it read failed a checksum: data (EIO) or a tree block (EUCLEAN)."""
    return isinstance(e, (ChecksumError, CorruptionError))
