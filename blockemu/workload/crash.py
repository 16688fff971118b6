"""Crash-consistency campaigns, CrashMonkey/Ace style.

A workload runs on a fresh image with the device's write log on; after each
persistence operation (fsync, sync) it records the oracle: the namespace and
every file's contents, under the generation that operation committed. Then
every crash state of the log -- just before and after each flush and FUA
write, with the in-doubt writes none, all, one at a time and random subsets,
some torn -- is rebuilt, checked with fsck, mounted (replaying the fsync log,
if its superblock names one), and compared with the oracle of the durable
state its superblock names: the generation and the log root, since an fsync
through the log tree makes a state durable without a new generation. Any difference is a failure,
reported with the workload and the state that reproduce it.

``ace_workloads`` enumerates Ace's bounded space: every sequence of up to
three operations over a small file set (dirs A, B; files foo, bar; a hard link
of /A/foo as /B/bar), each followed by fsync of what it touched.

Both run on a ``WritePath``: ``production`` (the default: sealing workers, 1 MiB
extents, encrypted directories, writes large enough to reach the workers) or
``fast`` (16 KiB extents sealed in a thread, small plain files).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import tempfile
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Literal, NamedTuple

from blockemu.check.fsck import check
from blockemu.device.faultplan import FaultPlan
from blockemu.device.image import ImageFile
from blockemu.device.writelog import CrashState, LogEntry, WriteLog
from blockemu.engine.treelog import choose_log
from blockemu.errors import InvalidArgument
from blockemu.fs.filesystem import File, Filesystem, mount
from blockemu.fs.mkfs import mkfs
from blockemu.ondisk.structs import LOG_SLOT_OFFSETS, SUPER_OFFSETS
from blockemu.workload.campaign import Campaign, Shard, ranges
from blockemu.workload.writepath import KEY, PRODUCTION, WRITE_PATHS, WritePath


class Node(NamedTuple):
    """A file as the oracle knows it: its content and its link count. The count tells a hard
    link's names -- each holding the content -- from copies: a crash state that kept the
    names but lost the link would be fsck-clean, two inodes of one name each."""

    content: bytes
    nlink: int = 1


Snapshot = dict[str, Node | None]  # None: a directory
Durable = tuple[int, int]  # what a superblock names: (generation, log root or 0)


async def snapshot(fs: Filesystem) -> Snapshot:
    """The namespace and every file's contents and link count (None for a directory)."""
    out: Snapshot = {}
    todo = ["/"]
    while todo:
        d = todo.pop()
        for name in await fs.readdir(d):
            p = d.rstrip("/") + "/" + name
            st = await fs.stat(p)
            if st.st_mode & 0o040000:
                out[p] = None
                todo.append(p)
            else:
                async with fs.open(p) as f:
                    out[p] = Node(await f.read(), st.st_nlink)
    return out


@dataclass
class Version:
    """One fsync of a file: what it makes durable, and where it was in the write log (entries
    completed) when it was called and when it returned."""

    content: Node | None
    called: int
    returned: int = 1 << 62  # not yet


class Models(dict[Durable, Snapshot]):
    """The oracle of a workload: the whole namespace at each persistence point
    (``Recorder.persisted``), by the durable state it was recorded under, and for files that
    tasks fsync at once (``Recorder.fsync``), each fsync's version of the file.

    Several tasks' fsyncs share one log sync (a group: DESIGN §9), and a crash while one is
    in flight leaves a durable state no quiescent point recorded. What must hold there is what
    fsync promises, per file (DESIGN §10): everything acknowledged before the crash, and for
    each file the version its last acknowledged fsync (or a later persistence point) made durable or that of an fsync in
    flight -- whole: the log names a file's new items all or none (a full commit run while a
    file's writeback is half done could make part of a version in flight durable, which fsync
    does not forbid: a workload checked so writes each version in one writeback batch). Nothing
    more is promised: not which of the group's files went together (the log does land them in
    one superblock, but btrfs's fsync promises each file its own), nor anything of a file not
    being fsynced."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, Snapshot]] = []  # (write-log position, namespace) of each persisted()
        self.labels: list[str] = []  # what each of them made durable, as a failure names it
        self.versions: dict[str, list[Version]] = {}

    def where(self, upto: int) -> str:
        """Where in the workload a crash state with ``upto`` log entries completed falls, in its
        own words: the last persistence point it is past (whose operations returned: what they
        made durable must be there), and the one it comes before."""
        done = sum(at <= upto for at, _ in self.points)
        after = f"after {self.labels[done - 1]} returned" if done else "before any persistence point"
        return after + (f", during {self.labels[done]}" if done < len(self.labels) else "")

    def judge(self, got: Snapshot, state: Durable, upto: int) -> str | None:
        """Why ``got``, read from a crash state with ``upto`` log entries completed whose
        superblock names ``state``, breaks the oracle; None if it holds."""
        want = self.get(state)
        if want is not None:  # recorded at a quiescent point: the whole namespace, exactly
            wrong = [p for p in sorted(set(want) | set(got)) if p not in want or p not in got or got[p] != want[p]]
            return (f"differs from the oracle of (generation, log root) {state}: "
                    + "; ".join(difference(p, want, got) for p in wrong[:3])
                    + (f"; and {len(wrong) - 3} more paths" if len(wrong) > 3 else "")) if wrong else None
        if not self.versions:
            return f"no oracle recorded for (generation, log root) {state}"
        base_at, base = [(at, snap) for at, snap in self.points if at <= upto][-1]
        # a file's fsyncs speak from the persistence point before its first one
        fsynced = {p: versions for p, versions in self.versions.items() if versions[0].returned <= upto}
        for p in sorted((set(base) | set(got)) - set(fsynced)):
            if p not in got or p not in base or got[p] != base[p]:
                return (f"differs from the last persistence point before the crash (no fsync of {p} was in "
                        f"flight): {difference(p, base, got)}")
        for p, versions in fsynced.items():
            acked = max(i for i, v in enumerate(versions) if v.returned <= upto)
            # a sync and persistence point after the file's last acknowledged fsync made its
            # content then durable, whatever the fsyncs of it before said
            durable = versions[acked].content if versions[acked].returned > base_at else base.get(p)
            may = [durable, *(v.content for v in versions[acked + 1:] if v.called < upto)]
            if got.get(p) not in may:
                last = {} if durable is None else {p: durable}  # None: the file did not exist
                return (f"{p} is neither what its last acknowledged fsync made durable nor what an fsync in "
                        f"flight would ({len(may) - 1} in flight): {difference(p, last, got)}")
        return None


def difference(path: str, want: Snapshot, got: Snapshot) -> str:
    """How ``path`` read back differs from the oracle, in words a user can act on: which side
    lacks it, or what kind each side holds, or both sizes and the first byte that differs --
    a list of paths said neither what was expected nor what was found."""
    if path not in got:
        return f"{path} missing (expected {describe(want[path])})"
    if path not in want:
        return f"{path} unexpected (found {describe(got[path])})"
    w, g = want[path], got[path]
    if w is None or g is None:
        return f"{path}: expected {describe(w)}, found {describe(g)}"
    if w.content == g.content:
        return f"{path}: expected {w.nlink} link(s), found {g.nlink}"
    at = next((i for i, (a, b) in enumerate(zip(w.content, g.content)) if a != b), min(len(w.content), len(g.content)))
    return f"{path}: expected {len(w.content)} bytes, found {len(g.content)}, first difference at offset {at}"


def describe(node: Node | None) -> str:
    if node is None:
        return "a directory"
    return f"a file of {len(node.content)} bytes" + (f" with {node.nlink} links" if node.nlink != 1 else "")


class WantedLock(asyncio.Lock):
    """A volume's commit lock that notes when a task waits for it: a recorder holding commit
    tails (``Recorder``) lets each go once the next commit or log sync wants the lock."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0  # tasks inside ``acquire``
        self._news = asyncio.Event()

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        self._news.set()
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1

    async def wanted(self) -> None:
        """Return once a task waits for the lock (at once if one does)."""
        while not self.waiting:
            self._news.clear()
            await self._news.wait()


class Recorder:
    """Runs a workload with the write log on and the oracle recorded at each persistence point.

    An fsync that commits returns once its primary superblock is durable, and the commit's tail
    (mirrors, a flush, the freed extents given back: DESIGN §9) runs on under the commit lock; in
    use, whether its flush lands before the next operation's data, and whether that operation's
    allocations see the freed space, is thread timing -- a log recorded so would differ from
    run to run, and a failure's reproduce line replay another. So the recorder puts each such
    tail at one point, in one of two orders (DESIGN §10): ``hold_tails`` False, the tail first --
    each persistence point starts by waiting for the commit lock (Ace's workloads have one after
    every fsync; a group, ``fsync_together``, takes the lock first), so the workload goes on once
    the tail is done; True, the tail last -- held (``Volume.tail_gate``) until a commit or log
    sync wants the lock, the next operation's writeback done. ``overtaken``: where in the log the
    workload first wrote, allocated or changed a tree while a tail was held (None: never) -- the
    two orders log the same entries up to there, and differ only from there on.

    Allocated on its own counts: an extent placed while the tail holds its freed space pinned,
    whose device write has not been logged when the lock is wanted (it stalls: a latency fault,
    a cache twice over its limit), went elsewhere than the tail-first order puts it, though
    nothing was logged and no tree changed (``tests/test_commit_tails.py``). The judgement
    assumes that, when the lock is wanted, nothing else of the workload is still on its way to
    an allocation (sealing): the released tail would race it on thread timing, which neither
    order pins. The campaign's workloads run one operation at a time (DESIGN §10)."""

    def __init__(self, fs: Filesystem, write_path: WritePath, kid: str | None, log: WriteLog, *,
                 hold_tails: bool = True) -> None:
        self.fs = fs
        self.write_path = write_path
        self.kid = kid
        self.log = log
        self.models = Models()
        self.in_flight = 0  # fsyncs (``fsync``) not yet returned
        self.hold_tails = hold_tails
        self.overtaken: int | None = None
        if hold_tails:
            fs.vol.commit_lock = WantedLock()  # free: no commit runs before the workload
            fs.vol.tail_gate = self._hold_tail

    async def _hold_tail(self) -> None:
        lock, engine = self.fs.vol.commit_lock, self.fs.vol.engine
        assert isinstance(lock, WantedLock)
        at, allocated = len(self.log.entries), engine.allocator.changes
        await lock.wanted()
        if self.overtaken is None and (len(self.log.entries) > at or engine.is_dirty()
                                       or engine.allocator.changes != allocated):
            self.overtaken = at

    async def mkdir(self, path: str) -> None:
        """A workload's top directory: encrypted when the write path says so."""
        await self.fs.mkdir(path)
        if self.kid is not None:
            await self.fs.set_policy(path, self.kid)

    async def persisted(self, what: str = "") -> None:
        """Call right after an fsync/sync, with nothing else in flight: everything so far is one
        durable state (``what``: the operations that made it, as a failure report names them).
        An fsync in flight would put its file's new content in the snapshot under a durable
        state that need not hold it (and the crash states after it would be judged by that
        model, exactly): refused."""
        if self.in_flight:
            raise RuntimeError(f"a persistence point with {self.in_flight} recorded fsync(s) in flight")
        if not self.hold_tails:
            async with self.fs.vol.commit_lock:  # the tail of a commit an fsync did not wait for ends
                pass
        now = await snapshot(self.fs)
        self.models[(self.fs.vol.generation, self.fs.vol.log_root)] = now
        self.models.points.append((len(self.log.entries), now))
        self.models.labels.append(f"'{what}'" if what else f"persistence point {len(self.models.points)}")

    async def fsync(self, f: File, path: str) -> None:
        """fsync ``f`` (open at ``path``) -- while other tasks may be fsyncing theirs -- noting
        the version it makes durable (``Models``): its content, as this task wrote it before the call.

        In flight from the start, before the read: the writes are done, so a commit while the
        read awaits (the interval's, another task's sync, one for room) may already make the
        content durable. Acknowledged from the superblock that made it durable: the last primary
        FUA before the fsync returned (or the call, if it wrote none: the content was durable),
        not from when this task resumed -- other tasks' writes logged meanwhile would leave the
        fsync in flight there, where the oracle accepts the file's older content."""
        called = len(self.log.entries)
        self.in_flight += 1
        try:
            async with self.fs.open(path) as r:
                content = Node(await r.read(), (await self.fs.stat(path)).st_nlink)
            versions = self.models.versions.setdefault(path, [])
            if not versions:  # as the last persistence point left it, acknowledged then
                at, then = self.models.points[-1]
                versions.append(Version(then.get(path), at, at))
            version = Version(content, called)
            versions.append(version)
            await f.fsync()
        finally:
            self.in_flight -= 1
        version.returned = max(called, superblock_written(self.log, len(self.log.entries)))


def superblock_written(log: WriteLog, upto: int) -> int:
    """The log position right after the last durable point among the first ``upto`` entries (0
    if none): from there on, every crash state names that superblock or log slot."""
    points = durable_points(log, upto)
    return points[-1][0] if points else 0


def durable_points(log: WriteLog, upto: int) -> list[tuple[int, Durable]]:
    """Each point among the first ``upto`` entries from which every crash state names a newer
    durable state, with that state: right after a primary superblock's FUA write, and right
    after the flush that made a log slot durable (SPEC "Log slots": written with the log's
    blocks, made durable by the one flush after them)."""
    out: list[tuple[int, Durable]] = []
    slot: LogEntry | None = None  # a slot write no completed flush covers yet
    for e in log.entries[:upto]:
        if is_primary_super(e):
            out.append((e.seq + 1, (int.from_bytes(e.data[0x48:0x50], "little"),
                                    int.from_bytes(e.data[0x334:0x33c], "little"))))
        elif is_log_slot(e):
            slot = e
        elif e.kind == "flush" and slot is not None and e.covers > slot.seq:
            out.append((e.seq + 1, slot_state(slot)))
            slot = None
    return out


def is_primary_super(e: LogEntry) -> bool:
    return e.kind == "fua" and e.offset == SUPER_OFFSETS[0]


def is_log_slot(e: LogEntry) -> bool:
    return e.kind == "write" and e.offset in LOG_SLOT_OFFSETS


def slot_state(e: LogEntry) -> Durable:
    """(generation, log root) a log slot write names (SPEC "LogSlot")."""
    return int.from_bytes(e.data[0x40:0x48], "little"), int.from_bytes(e.data[0x58:0x60], "little")


Workload = Callable[[Filesystem, Recorder], Awaitable[None]]


SIZE = "64M"  # small: a workload that fills it makes every allocation reuse freed space
MIRRORED_SIZE = "72M"  # past the superblock mirror at 64 MiB, which a 64 MiB image has not
MIRRORED_SHARE = 4  # every 4th workload of a campaign runs on an image with a mirror


def image_size(i: int) -> str:
    """The image workload ``i`` of a campaign records on: a share of them get a superblock
    mirror, so crash states during a commit's mirror write -- the mirror landed, lost or torn
    beside the new primary -- are checked too (the campaigns' 64 MiB images have none). By
    the workload's index, so a shard's result does not depend on how the space was cut."""
    return MIRRORED_SIZE if i % MIRRORED_SHARE == MIRRORED_SHARE - 1 else SIZE


async def record(workload: Workload, image: str, base: str, **kw: Any) -> tuple[WriteLog, Models]:
    """Run ``workload`` on a fresh image with the write log on (``run_recorded``); returns the log
    and the oracle."""
    rec = await run_recorded(workload, image, base, **kw)
    return rec.log, rec.models


async def run_recorded(workload: Workload, image: str, base: str, *, faults: FaultPlan | None = None,
                       write_path: WritePath = PRODUCTION, size: str = SIZE, hold_tails: bool = True) -> Recorder:
    """Run ``workload`` on a fresh image of ``size`` with the write log on, commit tails in the
    order ``hold_tails`` says (``Recorder``); returns the recorder: its log, oracle, and where
    the other order's log would part from this one (``overtaken``)."""
    await mkfs(image, size, node_size=write_path.node_size, force=True)
    fs = await mount(image, faults=faults, interval=3600, **write_path.mount_options())
    try:
        kid = await fs.add_key(KEY) if write_path.encrypt else None
        log = fs.vol.device.start_log(base_copy=base)
        rec = Recorder(fs, write_path, kid, log, hold_tails=hold_tails)
        await rec.persisted("mkfs")
        await workload(fs, rec)
        # the unmount's commit is a durable state of its own when fsyncs went through the log
        # (they left the running transaction uncommitted): record it as the commit it is
        await fs.sync()
        await rec.persisted("the closing sync")
    except BaseException:
        # unmounted here, not by the collector: a campaign worker runs shard after shard, and a
        # mount kept alive by the error's traceback holds its image, lock, arena and sealing
        # workers; the error to raise is the workload's, not the clean-up's
        with contextlib.suppress(Exception):
            await fs.unmount()
        raise
    await fs.unmount()
    return rec


def expected_state(log: WriteLog, upto: int, first: Durable) -> Durable:
    """What the newest durable point in the prefix names (``durable_points``)."""
    return expected_states(log, [upto], first)[0]


def expected_states(log: WriteLog, uptos: Iterable[int], first: Durable) -> list[Durable]:
    """``expected_state`` of each prefix length in ``uptos``, the log scanned once: a prefix's
    durable points are the whole log's up to its length. A test choosing its sample by the state
    each crash state names (13,000 states of a 6,000-entry log) scanned the log once per state:
    ~22 s of the log-cap test's 58."""
    points = durable_points(log, len(log.entries))
    at = [p for p, _ in points]
    return [points[i - 1][1] if (i := bisect_right(at, upto)) else first for upto in uptos]


@dataclass
class CampaignResult:
    workloads: int = 0
    states: int = 0
    failures: list[str] = field(default_factory=list)


async def check_states(log: WriteLog, models: Models, work: str, rng: random.Random,
                       subsets: int, name: str, result: CampaignResult, write_path: WritePath = PRODUCTION,
                       keep: str | None = None) -> None:
    await check_sample(log, models, work, list(log.crash_states(rng, subsets=subsets)), result, name, write_path,
                       keep)


async def check_sample(log: WriteLog, models: Models, work: str, states: list, result: CampaignResult,
                       name: str = "mix", write_path: WritePath = PRODUCTION, keep: str | None = None) -> None:
    """``keep``: where to write the first failing crash state's image, as the crash left it
    (rebuilt from the log: fsck and the mount have changed ``work`` by then), for ``inspect``
    and ``fsck``."""
    first = min(models)
    for st in states:
        result.states += 1
        log.crash_image(work, st.upto, st.keep, st.torn, st.split)
        if why := await check_state(log, models, work, st, first, write_path):
            result.failures.append(f"{name} at crash state {st} ({models.where(st.upto)}): {why}")
            if keep is not None:
                log.crash_image(keep, st.upto, st.keep, st.torn, st.split)
                result.failures[-1] += f" (its image: {keep})"
                keep = None


async def check_state(log: WriteLog, models: Models, work: str, st: CrashState, first: Durable,
                      write_path: WritePath) -> str | None:
    """Why crash state ``st``, rebuilt in ``work``, breaks the oracle; None if it holds."""
    report = check(work, check_data=True)
    if not report.clean:
        return f"fsck: [{report.errors[0].code}] {report.errors[0].message}"
    _, doubt = log.split(st.upto)
    with ImageFile.open(work) as img:
        sb = choose_log(img.read, img.best_super())[0]
        gen = (sb.generation, sb.log_root)
        # a log slot whose flush had not completed may have landed (byte for byte: a torn one
        # whose old tail equals its new one did too) with what it names: that log sync's state,
        # its fsyncs in flight, which the oracle judges as such
        landed = {slot_state(e) for e in doubt if is_log_slot(e) and img.read(e.offset, len(e.data)) == e.data}
    want = expected_state(log, st.upto, first)
    if gen != want and gen not in landed:
        return f"mounted (generation, log root) {gen}, the last durable one was {want}"
    try:
        async with mount(work, interval=3600, **write_path.mount_options()) as fs:
            if write_path.encrypt:
                await fs.add_key(KEY)
            got = await snapshot(fs)
    except OSError as e:
        return f"reading the image back failed: {e}"
    return models.judge(got, gen, st.upto)


# ------------------------------------------------------------------ Ace's bounded workload space

FILES = ["/A/foo", "/A/bar", "/B/foo"]
OPS = [
    ("creat", "/A/foo"), ("creat", "/B/foo"), ("write", "/A/foo"), ("append", "/A/foo"), ("truncate", "/A/foo"),
    ("unlink", "/A/foo"), ("rename", "/A/foo", "/A/bar"), ("rename", "/A/foo", "/B/foo"), ("mkdir", "/A/C"),
    ("rmdir", "/A/C"), ("link", "/A/foo", "/B/bar"),
]


async def apply(fs: Filesystem, op: tuple[str, ...], rng: random.Random, scale: int = 1) -> str | None:
    """Run one Ace operation if it applies to the current state; returns the path to fsync.
    Data sizes are multiplied by ``scale``."""
    kind, path = op[0], op[1]
    exists = await fs.exists(path)
    if kind == "creat" and not exists:
        async with fs.open(path, "x") as f:
            await f.write(rng.randbytes(5000 * scale))
    elif kind in ("write", "append", "truncate") and exists:
        async with fs.open(path, "r+") as f:
            if kind == "write":
                await f.pwrite(rng.randbytes(6000 * scale), rng.randrange(0, 8192 * scale))
            elif kind == "append":
                await f.pwrite(rng.randbytes(3000 * scale), f.inode.size)
            else:
                await f.truncate(rng.randrange(0, 4096 * scale))
    elif kind == "unlink" and exists:
        await fs.unlink(path)
        return os.path.dirname(path)
    elif kind == "rename" and exists:
        await fs.rename(path, op[2])
        return op[2]
    elif kind == "link" and exists and not await fs.exists(op[2]):
        await fs.link(path, op[2])
        return op[2]
    elif kind == "mkdir" and not exists:
        await fs.mkdir(path)
    elif kind == "rmdir" and exists and not await fs.readdir(path):
        await fs.rmdir(path)
        return os.path.dirname(path)
    else:
        return None
    return path


def ace_workloads(max_len: int) -> list[tuple[tuple[str, ...], ...]]:
    return [seq for n in range(1, max_len + 1) for seq in itertools.product(OPS, repeat=n)]


def ace_workload(seq: tuple[tuple[str, ...], ...], seed: int) -> Workload:
    async def run(fs: Filesystem, rec: Recorder) -> None:
        rng = random.Random(seed)
        scale = rec.write_path.scale
        for d in ("/A", "/B"):
            await rec.mkdir(d)
        async with fs.open("/A/foo", "w") as f:
            await f.write(rng.randbytes(7000 * scale))
        await fs.sync()
        await rec.persisted("mkdir /A /B; write /A/foo; sync")
        for op in seq:
            target = await apply(fs, op, rng, scale)
            if target is None:
                continue
            if await fs.exists(target) and not (await fs.stat(target)).st_mode & 0o040000:
                async with fs.open(target, "r") as f:
                    await f.fsync()
                await rec.persisted(f"{' '.join(op)}; fsync {target}")
            else:
                await fs.sync()
                await rec.persisted(f"{' '.join(op)}; sync")
    return run


def ace_unit(seq: tuple[tuple[str, ...], ...], seed: int) -> tuple[str, Workload]:
    """An Ace workload and the name its failures carry."""
    return f"[{' ; '.join(' '.join(op) for op in seq)}]", ace_workload(seq, seed)


async def run_ace(seqs: list, *, seed: int = 0, subsets: int = 2, faults: FaultPlan | None = None,
                  write_path: WritePath = PRODUCTION, first: int = 0) -> CampaignResult:
    """``seqs`` are the campaign's workloads ``first``, ``first + 1``, ... (their image sizes
    follow from that: ``image_size``)."""
    return await run_workloads([ace_unit(seq, seed + i) for i, seq in enumerate(seqs)], seed=seed, subsets=subsets,
                               faults=faults, write_path=write_path, first=first)


# the orders a campaign records commit tails in (``Recorder``): held until the next commit or log
# sync (as a tail mostly ends in use, after the next operation's writeback), then -- if the
# workload wrote meanwhile -- each run before the workload goes on; and what a failure's name adds
TAIL_ORDERS = ((True, ""), (False, " (commit tails first)"))


async def run_workloads(named: list[tuple[str, Workload]], *, seed: int, subsets: int, faults: FaultPlan | None,
                        write_path: WritePath, first: int, keep_failed: str | None = None) -> CampaignResult:
    """Record each of the campaign's workloads ``first``, ``first + 1``, ... and check its crash
    states (the ``i``-th's random subsets drawn from ``seed + i``): in both ``TAIL_ORDERS`` where
    they differ, the second's only past the entries both log alike (the states up to there are
    the first's). ``keep_failed``: a directory that gets the first failing crash state of each
    failing workload (``kept_image``)."""
    result = CampaignResult()
    with tempfile.TemporaryDirectory() as d:
        image, base, work = (os.path.join(d, n) for n in ("w.img", "base.img", "crash.img"))
        for i, (name, workload) in enumerate(named):
            keep = kept_image(keep_failed, first + i) if keep_failed else None
            checked = -1  # the states up to this many entries are checked
            for hold_tails, order in TAIL_ORDERS:
                rec = await run_recorded(workload, image, base, faults=faults, write_path=write_path,
                                         size=image_size(first + i), hold_tails=hold_tails)
                states = [st for st in rec.log.crash_states(random.Random(seed + i), subsets) if st.upto > checked]
                failed = len(result.failures)
                await check_sample(rec.log, rec.models, work, states, result, name + order, write_path, keep)
                keep = keep if len(result.failures) == failed else None  # the workload's first failure only
                if rec.overtaken is None:
                    break  # the other order logs the same entries
                checked = rec.overtaken
            result.workloads += 1
    return result


def kept_image(directory: str, workload: int) -> str:
    """Where ``--keep-failed DIR`` puts workload ``workload``'s first failing crash state: named
    by the number its reproduce line's ``--workloads`` gives."""
    return os.path.join(directory, f"workload-{workload}.img")


def ace_space(max_len: int, seed: int, limit: int | None) -> list[tuple[tuple[str, ...], ...]]:
    """The campaign's workloads in their fixed order (a seeded sample of ``limit`` of them):
    workload ``i`` is the same wherever and in whatever shard it runs."""
    seqs = ace_workloads(max_len)
    return seqs if limit is None else random.Random(seed).sample(seqs, min(limit, len(seqs)))


# ------------------------------------------------------------------ fsyncs at once

async def fsync_together(fs: Filesystem, jobs: list[Callable[[], Awaitable[None]]], *, in_turn: bool = True) -> None:
    """Run ``jobs`` -- each changes a file and fsyncs it (``Recorder.fsync``) -- as tasks whose
    fsyncs all wait together for the commit lock once every one has done its writeback: then one
    log sync takes them all (DESIGN §9's group), or a commit when a member's change is one the
    log cannot say, which the others share or follow -- the same group on every run, whatever
    the loop's scheduling. ``in_turn``: each job starts once the one before has reached its
    fsync, so their writebacks, too, land in the same order and places on every run (in
    parallel, they are placed as their sealing workers finish): a campaign's crash-state counts
    must not move.

    The members' fsyncs wait at a gate until all have arrived, not on the commit lock: held while
    they wrote back, it made a member whose writeback needs a commit to find room (the space
    freed in the running transaction is pinned until one) wait for ever. The lock is taken once
    before the first member starts, so that the commit tail of an fsync before the group is over
    first, as it was when the group held it; and once all have arrived, to let the gated fsyncs
    in: each registers and waits for it, and the first to hold it logs them all."""
    arrived = entered = 0
    news = asyncio.Event()  # an arrival, an fsync let in, or a job that ended without one (it failed)
    gate = asyncio.Event()
    real = fs.vol.fsync
    tasks: list[asyncio.Future] = []

    async def arriving(ino: int) -> None:
        nonlocal arrived, entered
        arrived += 1
        news.set()
        await gate.wait()
        entered += 1
        news.set()
        await real(ino)  # registers the fsync at once, then waits for the lock the group holds

    async def until(done: Callable[[], bool]) -> None:
        while not done():
            news.clear()
            await news.wait()

    def all_arrived() -> bool:  # or one failed: the others go on without it
        return arrived == len(tasks) or any(t.done() for t in tasks)
    fs.vol.fsync = arriving  # type: ignore[method-assign]
    try:
        async with fs.vol.commit_lock:
            pass
        for job in jobs:
            tasks.append(asyncio.ensure_future(job()))
            tasks[-1].add_done_callback(lambda _: news.set())
            if in_turn:
                await until(all_arrived)
        await until(all_arrived)
        async with fs.vol.commit_lock:
            gate.set()
            waiting = arrived  # each goes in, once woken, without another await before the lock
            await until(lambda: entered == waiting or any(t.cancelled() for t in tasks))
    finally:
        gate.set()
        del fs.vol.fsync
    await asyncio.gather(*tasks)


GROUPS = 3  # groups of fsyncs per workload
GROUP_SHARE = 10  # a campaign adds one group workload per this many of Ace's


def group_workload(seed: int) -> Workload:
    """Groups of tasks fsyncing files at once (``fsync_together``), seeded: 2-4 files of a
    directory (encrypted on the production write path); in each of ``GROUPS`` groups, 2 or more
    of them overwritten, appended to, extended, or cut shorter (that fsync must commit: the
    log cannot say a hole), and maybe a new file (a commit too: a name); after some groups a
    sync, a persistence point. Every crash state inside the groups' log syncs and commits is
    judged file by file (``Models``)."""
    async def run(fs: Filesystem, rec: Recorder) -> None:
        rng = random.Random(seed)
        scale = rec.write_path.scale
        await rec.mkdir("/A")
        paths = [f"/A/f{i}" for i in range(rng.randint(2, 4))]
        for p in paths:
            async with fs.open(p, "w") as f:
                await f.write(rng.randbytes(2000 * scale))
        await fs.sync()
        await rec.persisted()

        def job(p: str, mode: str, change: str) -> Callable[[], Awaitable[None]]:
            data, at = rng.randbytes(1200 * scale), rng.randrange(0, 1500 * scale)
            cut = rng.randrange(0, 1000 * scale)

            async def one() -> None:
                async with fs.open(p, mode) as f:
                    if change == "extend":
                        await f.truncate(f.inode.size + len(data))
                    else:
                        await f.pwrite(data, f.inode.size if change == "append" else at)
                    if change == "shrink":
                        await f.truncate(cut)
                    await rec.fsync(f, p)
            return one
        for g in range(GROUPS):
            jobs = [job(p, "r+", rng.choice(("write", "write", "append", "extend", "shrink")))
                    for p in rng.sample(paths, rng.randint(2, len(paths)))]
            if rng.random() < 0.3:
                paths.append(f"/A/n{g}")
                jobs.insert(rng.randint(0, len(jobs)), job(paths[-1], "x", "write"))
            await fsync_together(fs, jobs)
            if rng.random() < 0.3:
                await fs.sync()
                await rec.persisted()
    return run


def _crash_shard(args: tuple) -> dict:
    """Workloads [lo, hi) of the space: Ace's, then the group workloads (``group_workload``);
    workload ``i`` is seeded with ``seed + i``."""
    max_ops, seed, subsets, nobarrier, limit, write_path, lo, hi, keep_failed = args
    seqs = ace_space(max_ops, seed, limit)

    async def go() -> dict:
        out: dict = {"units": 0, "states": 0, "failures": []}
        for i in range(lo, hi):
            unit = ace_unit(seqs[i], seed + i) if i < len(seqs) else (f"[fsync groups {seed + i}]",
                                                                       group_workload(seed + i))
            r = await run_workloads([unit], seed=seed + i, subsets=subsets, faults=FaultPlan(nobarrier=nobarrier),
                                    write_path=WRITE_PATHS[write_path], first=i, keep_failed=keep_failed)
            out["units"] += r.workloads
            out["states"] += r.states
            out["failures"] += [{"unit": i, "message": m} for m in r.failures]
        return out
    return asyncio.run(go())


def crash_campaign(max_ops: int, *, seed: int = 0, subsets: int = 2, nobarrier: bool = False, limit: int | None = None,
                   groups: int | None = None, write_path: WritePath = PRODUCTION,
                   workloads: tuple[int, int] | None = None, shard_size: int = 10,
                   keep_failed: str | None = None) -> Campaign:
    """Ace's bounded space, then ``groups`` group workloads (by default one per ``GROUP_SHARE``
    of Ace's, at least one), as shards of ``shard_size`` consecutive workloads (a few seconds
    each), optionally only the workloads in ``[A, B)``. ``keep_failed`` is no part of the
    identity: a resumed run may keep images where the first did not."""
    n = len(ace_space(max_ops, seed, limit))
    groups = -(-n // GROUP_SHARE) if groups is None else groups
    lo, hi = workloads if workloads else (0, n + groups)
    if lo >= n + groups:  # checked nothing and said so by exit 0: a typo passed for a clean campaign
        raise InvalidArgument(f"--workloads {lo}..{hi}: this campaign has workloads 0..{n + groups} "
                              f"({n} of Ace's, {groups} of fsync groups)")
    hi = min(hi, n + groups)
    identity = {"max_ops": max_ops, "seed": seed, "subsets": subsets, "nobarrier": nobarrier, "limit": limit,
                "groups": groups, "write_path": write_path.name, "workloads": [lo, hi]}
    shards = [Shard(f"workloads {a}..{b}", (max_ops, seed, subsets, nobarrier, limit, write_path.name, a, b,
                                           keep_failed))
              for a, b in ((lo + a, lo + b) for a, b in ranges(hi - lo, shard_size))]

    def reproduce(f: dict) -> str:
        return (f"blockemu crash --max-ops {max_ops} --seed {seed} --subsets {subsets} --workloads {f['unit']}"
                + (f" --limit {limit}" if limit is not None else "") + f" --groups {groups}"
                + (" --nobarrier" if nobarrier else "") + f" --write-path {write_path.name} --jobs 1"
                + (f" --keep-failed {keep_failed}" if keep_failed else ""))
    return Campaign("crash", identity, shards, _crash_shard, reproduce)
