"""``blockemu run``: a job file (fio syntax) against a mounted image, then fsck.

Jobs between stonewalls run concurrently (``wait_for=`` holds one until the named job
ends); stonewalled sets run in order. Kinds:
``fio`` (the default: fio's own options), ``mix`` (fsstress-like, with an
oracle checked after the run, on a fresh mount), ``keyrace`` (fstests
generic/595 on a scratch image, under the job's ``key_removal``), ``fsck``
(unmount, check, remount), ``faults`` (from now on the device misbehaves as
``faults=SPEC`` says) and ``script=module:func`` (an async function given the
mounted filesystem and a seeded RNG). Every random choice derives from the
run's seed. The report is fio's JSON layout with our own keys under
``blockemu``; SIGINT/SIGTERM (or an ``exitall`` job, for its ``exit_what``) stop the jobs, which report
what they did.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import os
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import version
from typing import Any, Awaitable, Callable, Iterator

from blockemu.check.fsck import FsckReport, check
from blockemu.device.faultplan import FaultPlan, Flip, undo_flips
from blockemu.device.writelog import sparse_copy
from blockemu.display import Advance, counted
from blockemu.errors import BlockemuError, InvalidArgument, NoSpaceError, NotFoundError
from blockemu.fs.filesystem import Filesystem, mount
from blockemu.fs.mkfs import MIN_SIZE, mkfs
from blockemu.workload.buffers import WorkingSet
from blockemu.workload.campaign import Campaign, Shard
from blockemu.workload.crash import CampaignResult, Recorder, check_sample, record
from blockemu.workload.diskutil import DiskUtil
from blockemu.workload.fio import (
    InFlight,
    JobResult,
    LayoutGate,
    RunContext,
    bin_size,
    check_job,
    group_bandwidth,
    group_results,
    run_fio,
    terse_report,
    text_report,
)
from blockemu.workload.fioledger import FsyncLedger
from blockemu.workload.jobfile import Job, JobFile, fixed, load, parse
from blockemu.workload.keyrace import run_race, unexpected
from blockemu.workload.mix import DEFAULT_OPS, MixResult, Task, detected, run_mix, verify_ledger, verify_mix
from blockemu.workload.writepath import PRODUCTION, WRITE_PATHS, WritePath
from blockemu.workload.zones import ZonedFile

SCENARIO_PACKAGE = "blockemu.workload.scenarios"
PRODUCER = f"blockemu-{version('blockemu')}"  # fio's "fio version" slot names what wrote the report


def scenarios() -> dict[str, str]:
    """Built-in job files, by name (without .fio)."""
    return {p.name[:-4]: p.read_text() for p in resources.files(SCENARIO_PACKAGE).iterdir() if p.name.endswith(".fio")}


def load_workload(arg: str, text: str | None = None) -> JobFile:
    """A path to a job file, or the name of a built-in scenario; ``text``: the job file itself,
    read by the caller (``blockemu run -``: standard input, as ``fio -``), ``arg`` its name."""
    if text is not None:
        return parse(text, arg)
    if os.path.exists(arg):
        return load(arg)
    builtin = scenarios()
    if arg in builtin:
        return parse(builtin[arg], f"<built-in {arg}>")
    raise NotFoundError(f"{arg}: no such job file or built-in scenario (see blockemu run --list)")


SCRATCH_IMAGE = "scratch image (deleted)"  # what a report without --image says the image was


@dataclass
class RunReport:
    seed: int
    image: str
    jobs: list[dict[str, Any]] = field(default_factory=list)
    fio: list[JobResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    fsck_clean: bool | None = None
    global_options: dict[str, str] = field(default_factory=dict)
    group_reporting: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    interrupted: str | None = None  # the signal that stopped the run early
    notes: list[str] = field(default_factory=list)  # the run's own, beside its jobs'
    zones: dict[str, ZonedFile] = field(default_factory=dict)  # zonemode=zbd: each file's zones at the end
    disk: DiskUtil = field(init=False)  # the image's device over the run's mounts

    def __post_init__(self) -> None:
        self.disk = DiskUtil(self.image)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def entries(self) -> list[JobResult]:
        """fio's jobs[]: one per clone, or one per group under group_reporting."""
        return group_results(sorted(self.fio, key=lambda r: r.order), self.group_reporting)

    def as_json(self, plus: bool = False) -> dict[str, Any]:
        entries = self.entries
        bw = group_bandwidth(entries)
        ignored = {r.name: r.ignored for r in entries if r.ignored}
        return {"fio version": PRODUCER, "timestamp": int(self.started),
                "timestamp_ms": int(self.started * 1000), "time": time.ctime(self.started),
                "global options": self.global_options,
                "jobs": [r.as_json(bw[r.group], plus) for r in entries] + self.jobs, "disk_util": self.disk.as_json(),
                "blockemu": {"seed": self.seed, "image": self.image, "fsck_clean": self.fsck_clean,
                             "failures": self.failures, "ok": self.ok, "interrupted": self.interrupted,
                             "ignored_options": ignored,
                             "notes": self.notes + sorted({n for r in entries for n in r.notes}),
                             **({"zones": {path: {"zone_size": zf.zone_size, "written": {
                                 str(start): n for start, n in zf.written().items()}}
                                 for path, zf in self.zones.items()}} if self.zones else {})}}

    def text(self, fmt: str) -> list[str]:
        """fio's ``normal`` or ``terse`` output for the fio jobs, then blockemu's own lines."""
        entries = self.entries
        bw = group_bandwidth(entries)
        if fmt == "terse":
            return terse_report(entries, bw, PRODUCER, self.disk.as_json())
        lines = [f"seed = {self.seed}"] + [f"note: {n}" for n in self.notes] + \
            (text_report(entries, bw) if entries else []) + self.disk.text()
        for j in self.jobs:
            extra = {k: v for k, v in j.items() if k not in ("jobname", "kind", "errors", "stats", "divergent")}
            lines.append(f"{j['jobname']} ({j['kind']}): " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        if self.interrupted:
            lines.append(f"interrupted by {self.interrupted}: partial results")
        fsck = "not run (no image: stopped while making it)" if self.fsck_clean is None else \
            "clean" if self.fsck_clean else "ERRORS"
        lines.append(f"fsck: {fsck}")
        return lines


async def fresh_dir(fs: Filesystem, path: str) -> str:
    """``path``, or ``path.2``, ``path.3``, ... when an earlier run on the image left it: a mix
    makes its directories afresh (a second run on an image failed with EEXIST)."""
    free, n = path, 1
    while await fs.exists(free):
        n += 1
        free = f"{path}.{n}"
    return free


def _image_size(jf: JobFile, where: str) -> tuple[int, str | None]:
    """The size of the image a run makes, and a note when it is less than its jobs ask for.
    A sparse image takes of the host what its jobs write, a preallocated one its whole size: either
    way it is capped at 90 % of the free space of ``where``, its directory, so that the emulated
    disk is full (ENOSPC, which jobs can expect) before the host's is (fio's enospc-pressure.fio lays out
    128 GiB). ``image_size=`` is the user's own choice, taken as it is."""
    size = jf.globals.get("image_size")
    if size:
        return size, None
    # a zoned file (zonemode=zbd) is sparse up to its offset: only what the job writes takes space
    need = sum((fixed(j.get("size")) or j.get("filesize", 0) * max(1, j.get("nrfiles", 1)))
               + (0 if j.get("zonemode") == "zbd" else fixed(j.get("offset")))
               for j in jf.jobs for _ in range(max(1, j.get("numjobs", 1))))
    want = max(256 << 20, 3 * need)
    st = os.statvfs(where)
    # no floor above the cap: with less than 284 MiB free, a floor of 256 MiB was the host's to fill
    room = (st.f_bavail * st.f_frsize * 9 // 10) >> 20 << 20
    if want <= room:
        return want, None
    if room < MIN_SIZE:
        raise NoSpaceError(f"{where}: {bin_size(st.f_bavail * st.f_frsize)} free, too little for the "
                           f"image a run makes (90% of it is under the {bin_size(MIN_SIZE)} an image needs)")
    return room, (f"the image is {bin_size(room)}, not the {bin_size(want)} the jobs' sizes ask for: that is 90% of "
                  f"the free space of {where} (a sparse image takes what is written); image_size= in [global] "
                  "sizes it as asked")


class Runner:
    def __init__(self, jf: JobFile, image: str, seed: int, preallocate: bool = False) -> None:
        self.jf, self.image, self.seed = jf, image, seed
        self.preallocate = preallocate  # the image the run makes, laid out whole (mkfs --preallocate)
        self.report = RunReport(seed, image, global_options=dict(jf.global_raw),
                                group_reporting={j.group for j in jf.jobs if j.get("group_reporting")})
        self.zoned = self.report.zones  # zonemode=zbd: a file's zones span the run's jobs, as in fio
        self.fs: Filesystem | None = None
        self.directory = "/jobs"
        self.mixes: list[tuple[str, MixResult]] = []  # checked after the run, on a fresh mount
        self.crashed: set[str] = set()  # the mixes a power cut met (during or after them): ledger-checked
        self.crashed_last = False  # the last mount unmounted ended with the power cut
        self.stop = asyncio.Event()
        self.done = {j.name: asyncio.Event() for j in jf.jobs}
        self.flows: dict[int, list[int]] = {}  # fio's flow groups span the run's jobs
        self.dedupe: dict[int, WorkingSet] = {}  # dedupe_global's working set spans them too
        self.halts = {j.name: asyncio.Event() for j in jf.jobs}  # exitall's, per job
        self.inflight: dict[str, list[InFlight]] = {}
        # a power cut planned: what the fio jobs' fsyncs made durable, checked once it came
        self.ledger = FsyncLedger() if any(j.get("kind", "fio") == "faults" and
                                           FaultPlan.parse(j.get("faults", "")).cut_after_writes is not None
                                           for j in jf.jobs) else None

    def interrupt(self, signum: int) -> None:
        """SIGINT/SIGTERM: jobs stop issuing I/O and report what they did, as fio does."""
        self.report.interrupted = signal.Signals(signum).name
        self.stop.set()

    async def _unless_stopped(self, work: Awaitable[None]) -> bool:
        """Run ``work`` unless SIGINT/SIGTERM (``interrupt``) comes first, which cancels it; whether
        it finished. The run takes those signals for itself, so mkfs's own stop at the next chunk
        of a preallocated layout never came: a Ctrl-C waited for every zero of the image (25 s
        for 6 GiB), then mounted it for jobs that did nothing. Cancelled, mkfs removes the image."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            task.cancel()  # nothing when it is done
            await asyncio.gather(task, return_exceptions=True)  # its clean-up runs to its end
        if task.cancelled():
            return False
        task.result()  # its error, if it failed
        return True

    async def _mount(self) -> Filesystem:
        g = self.jf.globals
        fs = await mount(self.image, key_removal=g.get("key_removal", "soft"), interval=5.0)
        self.report.disk.mounted()
        try:
            await self._jobs_directory(fs)
        except BaseException:
            # unmounted here, not by the collector: the error's traceback keeps the mount alive, and
            # with it the image's lock (the next run on the image refused) and the page arena; the
            # error to raise is this one, not the clean-up's
            with contextlib.suppress(Exception):
                await fs.unmount()
            raise
        return fs

    async def _jobs_directory(self, fs: Filesystem) -> None:
        """The directory the jobs' files go in, made on the first run on the image: encrypted, with
        the run's key added, under ``encrypt=1``."""
        if self.jf.globals.get("encrypt"):
            key = random.Random(f"{self.seed}:key").randbytes(64)
            kid = await fs.add_key(key)
            self.directory = "/enc-jobs"
            if not await fs.exists(self.directory):
                await fs.mkdir(self.directory)
                await fs.set_policy(self.directory, kid)
            elif await fs.get_policy(self.directory) != kid:  # every job in it failed with a bare ENOKEY
                raise InvalidArgument(f"{self.image}: {self.directory} holds an earlier run's files, encrypted with "
                                      "the key of its --seed (a run's key comes from its seed): run with that "
                                      "--seed, or on a fresh image")
        elif not await fs.exists(self.directory):
            await fs.mkdir(self.directory)

    async def run(self) -> RunReport:
        if not os.path.exists(self.image) or os.path.getsize(self.image) == 0:
            size, note = _image_size(self.jf, os.path.dirname(os.path.abspath(self.image)))
            self.report.notes += [note] if note else []
            if not await self._unless_stopped(mkfs(self.image, size, preallocate=self.preallocate)):
                return self.report  # stopped while the image was made: mkfs removed it, no job ran
        elif self.preallocate:
            self.report.notes.append(f"--preallocate: {self.image} exists, so it is used as it is (only an image the "
                                     "run makes is preallocated)")
        self.fs = await self._mount()
        try:
            for barrier in sorted({j.barrier for j in self.jf.jobs}):
                if self.fs.vol.device.dead:
                    await self._mount_again()
                jobs = [j for j in self.jf.jobs if j.barrier == barrier]
                gate = LayoutGate(sum(1 for j in jobs if j.get("kind", "fio") == "fio" and not j.get("wait_for")))
                await asyncio.gather(*(self._job(j, gate) for j in jobs))
        finally:
            if self.fs is not None:
                try:
                    await self._unmount()
                except BlockemuError as e:  # read-only after a failed commit: the run still reports
                    self.report.failures.append(f"unmount: {e}")
        if self.mixes:
            await self._verify_mixes()
        if self.crashed_last and self.ledger is not None and self.ledger.files:  # the cut met the last jobs
            fs = await self._mount()
            try:
                await self._check_ledger(fs)
            finally:
                await fs.unmount()
        report = check(self.image)
        self.report.fsck_clean = report.clean
        if not report.clean:
            self.report.failures.append(f"fsck: {len(report.errors)} errors, first: [{report.errors[0].code}] "
                                        f"{report.errors[0].message}")
        return self.report

    async def _unmount(self) -> None:
        """Unmount the run's filesystem; its device's requests join the report's disk_util. After
        a power cut (a ``faults`` job's ``cut=``, met by the jobs or by this unmount's own writes)
        the unmount's error is the cut's, said in a note: what the cut may take is every change
        not yet durable, and the mixes it met are judged by their ledgers (``_verify_mixes``)."""
        assert self.fs is not None
        dev = self.fs.vol.device
        try:
            await self.fs.unmount()
        except BlockemuError as e:
            if not dev.dead:
                raise
            self.report.notes.append(f"unmount after the power cut: {e}")
        finally:
            self.report.disk.unmounted(dev.stats)
            self.crashed_last = dev.dead
            if dev.dead:
                self.crashed.update(name for name, _ in self.mixes)
            # judged after the unmount: its own writes may be the ones the cut waited for
            elif note := missed_cut(dev.faults, dev.dead, dev.writes, "larger jobs"):
                self.report.notes.append(note)
        self.fs = None

    async def _mount_again(self) -> None:
        """The power was cut: as after a real crash, the image is mounted again (its log replayed)
        and the next jobs run on that mount, with no faults (the plan ended with the cut). The
        jobs running at the cut failed on the dead device and said so; the first dead request
        ended a mix's ledger (``Task._frozen``)."""
        assert self.fs is not None
        self.report.notes.append("the power was cut: the next jobs run on the image mounted again; a mix the cut "
                                 "met is checked against what its fsyncs and syncs made durable")
        await self._unmount()
        self.fs = await self._mount()
        await self._check_ledger(self.fs)

    async def _job(self, job: Job, gate: LayoutGate) -> None:
        """``gate``: the fio jobs that start together lay out their files before any starts (a
        job started later, by wait_for, is not waited for)."""
        try:
            if job.get("wait_for") in self.done:
                await self.done[job.get("wait_for")].wait()
                gate = LayoutGate(1)
            if not (self.stop.is_set() or self.halts[job.name].is_set()):
                await self._run_job(job, gate)
                if job.get("exitall"):
                    self._exit(job)
        finally:
            if job.get("kind", "fio") == "fio":  # stopped before it began, or failed: not waited for
                gate.arrived(job.name)
            self.done[job.name].set()

    def _exit(self, job: Job) -> None:
        """exitall: the job ended, so do the jobs of its group (exit_what=group, fio's default),
        every running job (stonewall: the next stonewalled set still runs), or the run (all)."""
        what = job.get("exit_what", "group")
        if what == "all":
            self.stop.set()
        for j in self.jf.jobs:
            if j.group == job.group if what == "group" else j.barrier == job.barrier:
                self.halts[j.name].set()

    async def _run_job(self, job: Job, gate: LayoutGate) -> None:
        kind = job.get("kind", "fio")
        seed = random.Random(f"{self.seed}:{job.name}").randrange(1 << 31)
        assert self.fs is not None
        try:
            if kind == "fio":
                ctx = RunContext(self.fs, self.directory, self.stop, self.halts[job.name], self.flows, self.dedupe, gate,
                                 self.zoned, self.inflight, self.ledger)
                results = await run_fio(ctx, job, seed)
                for r in results:
                    r.order = self.jf.jobs.index(job)
                self.report.fio += results
                cut = [r for r in results if r.error_text and self._the_cuts(r.error)]
                # stopped by the cut the run asked for, as a mix is: its fsyncs are checked after (``FsyncLedger``)
                self.report.notes += list(dict.fromkeys(f"{job.name}: stopped by the power cut: {r.error_text} "
                                                        f"(err={r.error})" for r in cut))
                self.report.failures += list(dict.fromkeys(f"{job.name}: {r.error_text} (err={r.error})"
                                                           for r in results if r.error_text and r not in cut))
                self.report.failures += [f"{job.name}: {r.rate_shortfall}" for r in results if r.rate_shortfall]
                bad = sum(r.verify_errors for r in results)
                if bad:
                    first = next(r.verify_first for r in results if r.verify_first)
                    self.report.failures.append(f"{job.name}: {bad} blocks failed verification, first: {first}")
            elif kind == "mix":
                mix = MixResult()
                self.mixes.append((job.name, mix))  # before it runs: one the cut stopped is checked too
                await run_mix(self.fs, root=await fresh_dir(self.fs, f"{self.directory}/{job.name}"), tasks=job.get("numjobs", 1),
                              nops=job.get("nops", 200), ops=job.get("ops"), seed=seed, result=mix)
                self.report.jobs.append({"jobname": job.name, "kind": "mix", "ops": mix.ops, "by_op": mix.by_op,
                                         "acknowledged_writes": mix.acknowledged_writes,
                                         # operations a failed I/O or a full image refused (a sync
                                         # reporting lost writeback among them): counted, not swallowed
                                         "io_errors": len(mix.errors), "refused_out_of_space": len(mix.no_space),
                                         "divergent": mix.divergent})
            elif kind == "keyrace":
                mode = job.get("key_removal", self.jf.globals.get("key_removal", "soft"))
                r = await run_race(mode, seed=seed, schedule=job.get("schedule", "free"), steps=job.get("nops", 3000),
                                   duration=job.get("runtime", 2.0))
                self.report.jobs.append({"jobname": job.name, "kind": "keyrace", **r.as_json()})
                # as generic/595 makes its scratch filesystem: this run's faults, disk stats and fsck
                # are of another image, and were read as the race's
                self.report.notes.append(f"{job.name}: the key-removal race ran on a scratch image of its own, as "
                                         f"generic/595 makes its scratch filesystem; this run's image, its faults, "
                                         f"disk stats and fsck do not see it (its own read-back is the check)")
                if unexpected(r):
                    self.report.failures.append(f"{job.name}: {r.lost} acknowledged appends lost ({r.silent} silently)"
                                                f" under {mode} removal")
            elif kind == "fsck":
                await self._unmount()
                rep = check(self.image, check_data=job.get("check_data", False))
                self.report.jobs.append({"jobname": job.name, "kind": "fsck", **rep.as_json()})
                if not rep.clean:
                    self.report.failures.append(f"{job.name}: fsck found {counted(len(rep.errors), 'error')}")
                self.fs = await self._mount()
            elif kind == "faults":
                self.fs.vol.device.faults = FaultPlan.parse(job.get("faults", ""))
                self.report.jobs.append({"jobname": job.name, "kind": "faults", "faults": job.get("faults", "")})
            elif kind == "script":
                await self._script(job, seed)
        except BlockemuError as e:
            if self._the_cuts(e.errno):
                # the cut the run asked for, not the filesystem failing: what it lost is judged after
                self.report.notes.append(f"{job.name}: stopped by the power cut: {e}")
            else:
                self.report.failures.append(f"{job.name}: {e}")

    def _the_cuts(self, err: int | None) -> bool:
        """Whether a job's error ``err`` is the power cut's: the device is dead, and the error is
        its EIO or the EROFS of the mount it aborted."""
        return self.fs is not None and self.fs.vol.device.dead and err in (errno.EIO, errno.EROFS)

    async def _check_ledger(self, fs: Filesystem) -> None:
        """After a power cut, on the image mounted again: the bytes the fio jobs' fsyncs made
        durable must all be there; a loss fails the run."""
        if self.ledger is None or not self.ledger.files:
            return
        checked, lost = await self.ledger.check(fs)
        self.report.failures += lost
        if checked:
            self.report.notes.append(f"fio jobs: the bytes their fsyncs made durable in {counted(checked, 'file')} "
                                     "were checked after the power cut")

    async def _verify_mixes(self) -> None:
        """The mix jobs' models against the image, unmounted and mounted afresh: what the disk
        holds, not what the page cache of the run still had. A mix a power cut met is held to
        its ledger alone (as ``stress``'s after a cut): what it wrote and never made durable may
        be gone, a file or its whole directory."""
        fs = await self._mount()
        try:
            for name, mix in self.mixes:
                if name in self.crashed:
                    await verify_ledger(fs, mix)
                    self.report.notes.append(f"{name}: the power cut met it: only the {counted(len(mix.durable), 'file')} "
                                             "its fsyncs and syncs made durable were checked")
                else:
                    await verify_mix(fs, mix)
                self.report.failures += [f"{name}: {d}" for d in mix.divergent]
        finally:
            await fs.unmount()

    async def _script(self, job: Job, seed: int) -> None:
        spec = job.get("script")
        if not spec or ":" not in spec:
            raise InvalidArgument(f"job {job.name}: script= must be module:function")
        mod, _, func = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), func)
        except (ImportError, AttributeError) as e:
            raise InvalidArgument(f"job {job.name}: cannot load {spec}: {e}") from None
        try:
            out = await fn(self.fs, random.Random(seed))
        except (BlockemuError, OSError):
            raise
        except Exception as e:  # the script's own bug (or not an async function of (fs, rng)): the run's
            # failure line, as a job's other failures are, not a traceback that ended the run unreported
            raise InvalidArgument(f"job {job.name}: script {spec} raised {type(e).__name__}: {e}") from e
        self.report.jobs.append({"jobname": job.name, "kind": "script", "result": out})


def prepare(workload: str, overrides: dict[str, Any] | None = None, text: str | None = None) -> JobFile:
    """The job file with the command line's overrides applied, checked whole: every job's
    problem is reported at once, before any image is touched (also ``--parse-only``)."""
    jf = load_workload(workload, text)
    overrides = dict(overrides or {})
    mode = overrides.pop("key_removal", None)
    if mode is not None:  # the mount's, and each keyrace job's own (the one place a job may set it)
        jf.globals["key_removal"] = mode
    problems = []
    for i, job in enumerate(jf.jobs):
        job.options.update(overrides)
        if mode is not None and job.get("kind", "fio") == "keyrace":
            job.options["key_removal"] = mode
        if overrides and "size" in overrides and job.get("filesize"):
            # --size shortens a job however it sizes its files, as fio's --size does not need to:
            # a job with filesize= only would otherwise lay out its files at full size
            job.options["filesize"] = min(job.get("filesize"), overrides["size"])
        if job.get("kind", "fio") == "fio":
            problems += [f"{jf.path}:{job.line}: job {job.name}: {p}" for p in check_job(job)]
        if job.get("wait_for") and job.get("wait_for") not in {j.name for j in jf.jobs[:i]}:
            problems.append(f"{jf.path}:{job.line}: job {job.name}: wait_for={job.get('wait_for')} names no earlier job")
    if problems:
        raise InvalidArgument("; ".join(problems))
    return jf


async def run_workload(workload: str, *, image: str | None = None, seed: int = 0,
                       overrides: dict[str, Any] | None = None, text: str | None = None,
                       preallocate: bool = False) -> RunReport:
    """Run a job file; ``overrides`` (the command line's ``--runtime``/``--size``/``--key-removal``)
    win over every job's own values; ``text``: the job file's text, ``workload`` then only names it;
    ``preallocate``: an image the run makes is laid out whole, as a real disk has every block (DESIGN §7)."""
    jf = prepare(workload, overrides, text)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(jf, image if image is not None else os.path.join(tmp, "run.img"), seed, preallocate)
        if image is None:  # the report must not name a file that is gone once it is read
            runner.report.image = SCRATCH_IMAGE
        with _stopped_by_signals(runner.interrupt):
            return await runner.run()


def _free(handler: Any) -> bool:
    """A signal's handler is nobody's own: the default (SIG_DFL, Python's KeyboardInterrupt) or
    the one asyncio.run puts on SIGINT, which cancels the main task."""
    return handler in (signal.SIG_DFL, signal.default_int_handler) or \
        (isinstance(handler, functools.partial) and isinstance(getattr(handler.func, "__self__", None), asyncio.Runner))


@contextlib.contextmanager
def _stopped_by_signals(interrupt: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM stop the run (``interrupt``), as Ctrl-C stops fio -- where they are
    free to take (``_free``): ``run_workload`` is also called by applications, and a signal an
    application handles (or ignores, as a shell's background job does SIGINT) stays its own,
    during the run and after it; each handler taken is put back after the run (the loop's
    remove_signal_handler leaves SIG_DFL, which a later SIGTERM would kill the process by).
    Off the main thread no signal can be taken (add_signal_handler raises RuntimeError
    there), and the run goes on without."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    taken = {sig: h for sig in (signal.SIGINT, signal.SIGTERM) if _free(h := signal.getsignal(sig))}
    for sig in taken:
        loop.add_signal_handler(sig, interrupt, sig)
    try:
        yield
    finally:
        for sig, handler in taken.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


# What a rerun of one stress seed repeats, and what it does not (measured, DESIGN §7): said beside
# every rerun line, which promised as "reproduce with:" a repetition that the run's timing denies
# -- one seed gave 6, 33 and 37 detected corruptions on three fresh images, and trees differ without faults.
RERUN_REPEATS = ("a rerun repeats each task's operations (until a fault changes their course) and the fault rule "
                 "(flip=: a given write is flipped the same way), not the timing (the tasks' interleaving, commits, "
                 "sealing workers, encryption nonces), so its writes, where faults land and whether it fails may differ")


MIX_IMAGE_SIZE = 256 << 20  # the image ``stress`` makes when IMAGE is missing


async def stress_mix(image: str, *, seed: int, tasks: int, nops: int, duration: float | None,
                     faults: FaultPlan | None, crash_points: int, advance: Advance = lambda n=1, description=None: None,
                     write_path: WritePath = PRODUCTION) -> dict[str, Any]:
    """``blockemu stress``: the fsstress-like mix on ``image`` (created if missing), with injected
    faults; then unmount, check the oracle on a fresh mount, and fsck; optionally a crash
    campaign over a logged single-task mix. Its directory is encrypted, and its key stays: key
    removal under load is the key-removal race's (``keyrace``), whose oracle knows what each
    removal mode may lose."""
    check_data = faults is not None and faults.flip > 0
    if not os.path.exists(image) or os.path.getsize(image) == 0:
        await mkfs(image, MIX_IMAGE_SIZE)
    else:
        refuse_unclean(image, check_data)
    problems: list[str] = []
    mix, aborted = MixResult(), None
    fs = await mount(image, faults=faults, interval=1.0, **write_path.mount_options())
    try:
        key = random.Random(f"{seed}:key").randbytes(64)
        kid = await fs.add_key(key)
        root, k = f"/stress-{seed}", 1
        while await fs.exists(root):  # a rerun on the same image gets its own directory
            root, k = f"/stress-{seed}.{k}", k + 1
        await fs.mkdir(root)
        await fs.set_policy(root, kid)
        await run_mix(fs, root=root, tasks=tasks, nops=nops, ops=None, seed=seed, duration=duration,
                      advance=advance, result=mix, scale=mix_scale(write_path))
    except BlockemuError as e:
        # a commit the faulty device failed: like btrfs, the mount turned read-only; the image
        # keeps its last durable generation, which fsck below must still find consistent
        if fs.vol.aborted is None:
            raise
        aborted = str(e)
    finally:
        # the bar has counted every operation; what follows can take as long as the mix did
        advance(0, description="stress: checking (unmount, the oracle on a fresh mount, fsck)")
        writes = fs.vol.device.writes
        fs.vol.device.faults = FaultPlan()
        try:
            await fs.unmount()
        except BlockemuError as e:
            aborted = aborted or str(e)
    if aborted is None and fs.vol.aborted is not None:
        aborted = str(fs.vol.aborted)  # a failed commit a task took as its own EIO: read-only all the same
    cut = fs.vol.device.dead or aborted is not None
    await check_model(image, key, mix, cut, mix)
    problems += mix.divergent
    flips = fs.vol.device.flipped
    # under flip= the data's checksums are checked too: a flipped data sector the mix never read
    # back is corruption only they show, and without them the run said "fsck clean" over it
    # with the mix's key, so a finding names a file as the mix's own lines do (/p1/f1, not its no-key name)
    report = check(image, check_data=check_data, key=key)  # (flips come only from flip=)
    # flipped bits are injected corruption: a checksum (a read's, a mount's) that catches them is
    # the filesystem doing its job, listed but no failure; only wrong data read back without an
    # error is. What fsck finds counts as detected only if the flips explain it -- gone once they
    # are undone; the rest (a wrong link count, a dangling entry) is a bug the flips would hide.
    # Without flips, any of it is a failure.
    # Likewise a read the oracle found failing its checksum: the flips explain it only if the
    # image with them undone reads back as the model says -- else a file's wrong content (a lost
    # write) hid behind a flipped block.
    unread: list[str] = []
    if flips and (mix.detected or not report.clean):
        undone, unread = await check_flips_undone(image, flips, key, mix, cut)
        unexplained = undone.errors
    else:
        unexplained = report.errors
    again = {u.partition(": ")[0] for u in unread}
    found = [d for d in mix.detected if d.partition(": ")[0] not in again] + \
        [f"fsck: [{e.code}] {e.message}" for e in report.errors if e not in unexplained][:5]
    problems += ([] if flips else mix.detected) + [f"the oracle (the flips undone): {u}" for u in unread] + \
        [f"fsck{' (the flips undone)' * bool(flips)}: [{e.code}] {e.message}" for e in unexplained[:5]]

    summary: dict[str, Any] = {"seed": seed, "image": image, "ops": mix.ops, "tasks": tasks,
                               "ops_per_task": None if duration else nops,
                               # the mix's own time (``MixResult.seconds``): making the image,
                               # mounting and the checks after it are not the filesystem's ops/s
                               "seconds": round(mix.seconds, 3),
                               "ops_per_second": round(mix.ops / mix.seconds, 1) if mix.seconds else None,
                               "by_op": mix.by_op,
                               "acknowledged_writes": mix.acknowledged_writes,
                               "lost_acknowledged_writes": len(mix.divergent), "divergent_files": len(mix.divergent),
                               "detected_corruption": len(mix.detected),
                               # ENOSPC is the image being full, never injected (no fault makes it). One
                               # name with or without --faults (injected ones, else the image file's
                               # own), as run's mix jobs name it: it was "injected_errors" under --faults
                               "refused_out_of_space": len(mix.no_space),
                               "io_errors": len(mix.errors) + bool(aborted),
                               "aborted": aborted,
                               "ledger_files_checked_after_crash": len(mix.durable) if cut else None,
                               "fsck": "clean" if report.clean else
                               counted(len(report.errors), "error"), "fsck_errors": [e.as_json() for e in report.errors[:20]],
                               # every key is always there, null where the run's flags give it no figure: a
                               # script reading the JSON of runs with and without --faults met a KeyError
                               "crash_states_checked": None, "crash_failures": None, "fsck_flips_undone": None}
    if crash_points:
        camp = await crash_mix(seed, crash_points, write_path)
        summary["crash_states_checked"] = camp.states
        summary["crash_failures"] = len(camp.failures)
        problems += camp.failures
    note = missed_cut(faults, fs.vol.device.dead, writes, "more --ops")
    summary["notes"] = [note] if note else []
    # whether the planned cut came (a campaign counts its seeds by it), null when none was planned
    summary["power_cut"] = None if faults is None or faults.cut_after_writes is None else note is None
    if flips:  # left as a failing disk leaves them: said, since a rerun on this image is refused
        summary["notes"].append(f"the run flipped bits in {len(flips)} sector(s) and leaves them on the image: "
                                "fsck reports those still in use, and a next stress run needs a fresh image")
    summary["problems"] = problems
    summary["detected"] = found if flips else []
    if flips:
        summary["fsck_flips_undone"] = "clean" if not unexplained else counted(len(unexplained), "error")
    summary["ok"] = not problems
    return summary


def refuse_unclean(image: str, check_data: bool) -> None:
    """Refuse a run on an image fsck does not find clean (EUCLEAN): the run's own checks would
    blame it for damage it found there -- a rerun on the image an earlier ``flip=`` run left
    failed with that run's flipped sectors as its own corruption."""
    before = check(image, check_data=check_data)
    if not before.clean:
        first = before.errors[0]
        raise OSError(errno.EUCLEAN, f"{image}: not clean before the run (fsck: {counted(len(before.errors), 'error')}, "
                      f"first [{first.code}] {first.message}); run stress on a fresh image (mkfs)")


def missed_cut(faults: FaultPlan | None, dead: bool, writes: int, more: str) -> str | None:
    """The note for a ``cut=N`` that never came -- the run made fewer writes -- else None. Not a
    failure (nothing went wrong), but the run did not test what was asked: ``run`` said nothing
    of it while ``stress`` did, and a job file's cut past its jobs' writes passed in silence."""
    due = faults.cut_after_writes if faults is not None else None
    if due is None or dead:
        return None
    return f"cut={due}: the run made {writes} writes, so no power cut happened (a smaller cut=, or {more})"


async def check_flips_undone(image: str, flips: list[Flip], key: bytes, mix: MixResult,
                             cut: bool) -> tuple[FsckReport, list[str]]:
    """fsck of a copy of ``image`` with the device's bit flips undone (the sectors that still hold
    them), then the oracle on a fresh mount of it (the ledger after a crash, else the whole
    model): the image the run would have left on a sound device, so what either finds no flip
    explains. The oracle's findings are returned as lines."""
    with tempfile.TemporaryDirectory() as d:
        copy = os.path.join(d, "flips-undone.img")
        sparse_copy(image, copy)
        undo_flips(copy, flips)
        # the key of the report its findings are matched to; before the mount, which may replay its log into it
        report = check(copy, check_data=True, key=key)
        again = MixResult()
        await check_model(copy, key, mix, cut, again)
        return report, again.divergent + again.detected


async def check_model(image: str, key: bytes, mix: MixResult, cut: bool, into: MixResult) -> None:
    """The mix's model against ``image`` on a fresh mount -- from disk: after a crash what was
    acknowledged durable must be there (the rest of the model is moot), otherwise everything the
    model holds; findings (an image that does not mount too) go to ``into``."""
    try:
        async with mount(image, interval=3600) as after:
            await after.add_key(key)
            await (verify_ledger if cut else verify_mix)(after, mix, into)
    except BlockemuError as e:
        (into.detected if detected(e) else into.divergent).append(f"after the run the image does not mount: {e}")


def mix_scale(write_path: WritePath) -> int:
    """The mix runs many more operations than an Ace workload: a sixteenth of the write path's
    scale still makes files of a few hundred KiB, whose runs reach the sealing workers."""
    return max(1, write_path.scale // 16)


async def crash_mix(seed: int, points: int, write_path: WritePath = PRODUCTION) -> CampaignResult:
    """A logged single-task mix, then ``points`` of its crash states checked against the oracle."""
    result = CampaignResult()

    async def workload(fs: Filesystem, rec: Recorder) -> None:
        task = Task(fs, "/c", random.Random(seed), MixResult(), mix_scale(write_path))
        await rec.mkdir("/c")
        # every persistence point is a full sync: an fsync of one file makes only that file's
        # data durable, and the oracle here is the whole namespace with every byte
        ops = {**DEFAULT_OPS, "fsync": 0}
        names, weights = list(ops), list(ops.values())
        for i in range(120):
            op = task.rng.choices(names, weights)[0]
            await task.step(op)
            if op == "sync" or i % 15 == 14:
                await fs.sync()
                await rec.persisted()

    with tempfile.TemporaryDirectory() as d:
        log, models = await record(workload, os.path.join(d, "m.img"), os.path.join(d, "base.img"),
                                   write_path=write_path)
        rng = random.Random(seed)
        states = list(log.crash_states(rng, subsets=2))
        sample = rng.sample(states, min(points, len(states)))
        await check_sample(log, models, os.path.join(d, "crash.img"), sample, result, write_path=write_path)
    return result


def _stress_shard(args: tuple) -> dict[str, Any]:
    """One stress seed on a fresh image made here, in the worker, and thrown away after -- but
    for a failing seed's with ``keep_failed``: a rerun does not repeat the run's timing (DESIGN
    §7), so the image the run left is the one record of its failure."""
    seed, tasks, ops, duration, faults, crash_points, write_path, keep_failed = args
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "stress.img")
        s = asyncio.run(stress_mix(image, seed=seed, tasks=tasks, nops=ops, duration=duration,
                                   faults=FaultPlan.parse(faults) if faults else None,
                                   crash_points=crash_points, write_path=WRITE_PATHS[write_path]))
        if keep_failed and not s["ok"]:
            sparse_copy(image, kept_seed_image(keep_failed, seed))  # DIR may be another file system
    # the files checked after a power cut too: a cut= campaign that checked none said nothing of it
    counts = {k: s.get(k) or 0 for k in ("ops", "acknowledged_writes", "lost_acknowledged_writes",
                                         "io_errors", "refused_out_of_space", "ledger_files_checked_after_crash",
                                         "crash_states_checked", "crash_failures")}
    counts["aborted"] = int(s["aborted"] is not None)
    if s["power_cut"] is not None:
        # each seed's note that its cut never came is no campaign's: one of runs all ended before
        # their cut passed with 0 failures, as if every seed had been cut
        counts["power_cuts"] = int(s["power_cut"])
    problems = s["problems"] or ([] if s["ok"] else ["not ok"])
    return {"units": 1, "states": s["ops"] + (s.get("crash_states_checked") or 0), "counts": counts,
            "failures": [{"unit": seed, "message": p} for p in problems[:10]]}


def kept_seed_image(directory: str, seed: int) -> str:
    """Where ``stress --seeds --keep-failed DIR`` puts a failing seed's image."""
    return os.path.join(directory, f"seed-{seed}.img")


def stress_campaign(seeds: tuple[int, int], *, tasks: int, ops: int, duration: float | None,
                    faults: str | None, crash_points: int, write_path: WritePath,
                    keep_failed: str | None = None) -> Campaign:
    """``blockemu stress --seeds A..B``: each seed a shard, each on its own fresh image (a failing
    seed's kept in ``keep_failed``, no part of the identity, as crash's)."""
    identity = {"seeds": list(seeds), "tasks": tasks, "ops": ops, "duration": duration,
                "faults": faults, "crash_points": crash_points, "write_path": write_path.name}
    shards = [Shard(f"seed {s}", (s, tasks, ops, duration, faults, crash_points, write_path.name, keep_failed))
              for s in range(*seeds)]

    def reproduce(f: dict[str, Any]) -> str:
        span = f"--duration {duration}" if duration else f"--ops {ops}"
        return (f"blockemu stress stress-{f['unit']}.img --seed {f['unit']} --tasks {tasks} {span}"
                + (f" --faults {faults}" if faults else "")
                + (f" --crash-points {crash_points}" if crash_points else "") + f" --write-path {write_path.name}")
    return Campaign("stress", identity, shards, _stress_shard, reproduce)
