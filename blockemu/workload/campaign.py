"""Campaigns: crash, stress and fuzz work cut into shards, run by local processes or on Ray.

A campaign is a list of shards (a range of workloads, a stress seed, a range of fuzz trials),
each named by a stable key and run by one module-level function of picklable arguments, so
the same shard gives the same result whichever process or machine runs it: no shared
filesystem, every image is made in the worker from the shard's arguments. Shards are sized
so one takes seconds, not milliseconds, and scheduling stays a small share of the work.

The driver streams each finished shard as one JSON line (``--results``); ``--resume FILE``
reads the shards a previous run finished and runs only the others. Totals and failures are
gathered in shard order, so a campaign reports the same counts and the same failures under
``--jobs`` and under ``--ray``. Every failure carries a command that reproduces it on one
machine, without Ray.

Ray is optional (``pip install 'blockemu[ray]'``): ``RayExecutor`` imports it only when used.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from blockemu.display import tally
from blockemu.errors import InvalidArgument

RAY_HINT = "--ray needs Ray: pip install 'blockemu[ray]'"
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent ends


class RayMissing(Exception):
    """Ray is not installed; the CLI turns this into its one-line usage error."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissing(RAY_HINT) from None
    return ray


ShardFn = Callable[[tuple], dict[str, Any]]


@dataclass(frozen=True)
class Shard:
    key: str     # stable across runs: what --resume matches
    args: tuple  # picklable: everything the worker needs


@dataclass
class Campaign:
    """``run(args)`` returns ``{"units", "states", "failures": [{"unit", "message"}], "counts"}``;
    ``reproduce(failure)`` is the one-machine command for a failure."""
    name: str
    identity: dict[str, Any]  # the options that define the campaign: a resumed file must match them
    shards: list[Shard]
    run: ShardFn
    reproduce: Callable[[dict[str, Any]], str]


@dataclass
class Summary:
    """A campaign's totals, gathered in shard order."""
    shards: int = 0
    resumed: int = 0
    units: int = 0
    states: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    worker_seconds: float = 0.0  # the shards' own wall times, added up
    cpu_seconds: float = 0.0  # the shards' own CPU times (sealing workers included), added up

    def as_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "resumed": self.resumed, "units": self.units, "states": self.states,
                "counts": self.counts, "failures": self.failures, "seconds": round(self.seconds, 1),
                "worker_seconds": round(self.worker_seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1)}


def cpu_seconds() -> float:
    """This process's CPU time and its reaped children's (a shard's sealing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: ShardFn, args: tuple) -> dict[str, Any]:
    """Run one shard where it lands, noting its own wall time -- their sum is the campaign's
    cost in worker-seconds, whatever the executor's overhead -- and its CPU time, which unlike
    wall time does not move with what else the machine runs (executors compare by it)."""
    t, cpu = time.perf_counter(), cpu_seconds()
    r = fn(args)
    return {**r, "seconds": round(time.perf_counter() - t, 3), "cpu_seconds": round(cpu_seconds() - cpu, 3)}


class Executor(Protocol):
    def run(self, fn: ShardFn, shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, Any]]]: ...


class LocalExecutor:
    """``jobs`` processes of this machine (one: in this process)."""

    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs)

    def run(self, fn: ShardFn, shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, Any]]]:
        if self.jobs == 1:
            for s in shards:
                yield s, timed(fn, s.args)
            return
        # A shard's images live in temporary directories it removes as it ends; a worker killed
        # on an interruption never ends, so its workers make them in one directory of the
        # driver's, removed after the pool is gone.
        with tempfile.TemporaryDirectory(prefix="blockemu-shards-") as tmp, \
                ProcessPoolExecutor(self.jobs, initializer=start_worker, initargs=(tmp, os.getpid())) as pool:
            futures = {pool.submit(timed, fn, s.args): s for s in shards}
            try:
                for f in as_completed(futures):
                    yield futures[f], f.result()
            except BaseException:
                # Interrupted (Ctrl-C, a failed shard, the caller gone): the pool's exit would
                # first run every queued shard -- the rest of the campaign -- and the shards in
                # flight would finish unrecorded. Drop the queue, stop the workers; --resume
                # reruns what was not recorded.
                kill_workers(pool)  # first: shutdown() forgets them
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def start_worker(path: str, driver: int) -> None:
    """A pool worker's start: its temporary files go under ``path``; Ctrl-C, which reaches
    the whole process group, is left to the driver, which stops the campaign and kills the
    workers (a worker's own KeyboardInterrupt came back as its shard's result, or, between
    shards, as multiprocessing's 'Process ForkProcess-2:' and a traceback on stderr); and it
    dies with the driver (pid ``driver``): a driver killed with SIGKILL cannot kill its workers,
    which ran their shards on as orphans (a structural fuzz's for half an hour)."""
    tempfile.tempdir = path
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(driver)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent ends (Linux's PR_SET_PDEATHSIG), or now if the
    parent (pid ``parent``) has already gone -- before the call, nothing would send it."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not Linux: the worker still ends when its shard does
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_workers(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes: Python 3.14's ``kill_workers()``; before it there is no
    public way, so through the pool's table of them."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for p in workers:
        p.kill()
    for p in workers:
        p.join()


class RayExecutor:
    """Ray tasks, one a shard. No address: a local instance (``ray.init()``); ``auto`` or an
    address: join that cluster (every node needs blockemu installed). Results come back
    through Ray's object store."""

    def __init__(self, address: str | None = None) -> None:
        self.ray = import_ray()
        self.address = address

    def run(self, fn: ShardFn, shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, Any]]]:
        ray = self.ray
        started = not ray.is_initialized()
        local = started and self.address is None
        with contextlib.ExitStack() as cleanup:
            options: dict[str, Any] = {}
            if local:
                # Ray runs its workers at nice 15 so its daemons stay responsive; on a machine
                # shared with other work that starves the campaign (shards ran 2-3x slower here
                # than under --jobs). A local instance started for a campaign runs it at the
                # driver's priority; a cluster's nodes keep what their ``ray start`` chose.
                os.environ.setdefault("RAY_worker_niceness", "0")
                # Ray's usage statistics: a thread that reports to Ray's servers, nothing a
                # campaign needs.
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                # As LocalExecutor's: shards' temporary directories in one of the driver's,
                # removed after the shutdown that kills the workers (an interruption's
                # shards never remove their own).
                tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="blockemu-shards-"))
                options["runtime_env"] = {"env_vars": {"TMPDIR": tmp}}
            if started:  # else the caller's ray.init() holds (a test's num_cpus=2)
                ray.init(address=self.address, logging_level=logging.WARNING, include_dashboard=False)
                cleanup.callback(ray.shutdown)
            yield from self._gather(ray.remote(num_cpus=1, max_retries=2, **options)(timed), fn, shards)

    def _gather(self, task: Any, fn: ShardFn, shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, Any]]]:
        ray = self.ray
        pending = {task.remote(fn, s.args): s for s in shards}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                shard = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    # The shard's own error, as --jobs raises it (an OSError keeps its errno):
                    # the CLI's one line, not Ray's wrapper with the remote traceback in it.
                    raise e.cause from None
                yield shard, r


def executor(jobs: int, ray: str | None) -> Executor:
    """``--ray`` given (``""`` without an address): Ray; otherwise ``--jobs`` local processes."""
    return LocalExecutor(jobs) if ray is None else RayExecutor(ray or None)


def read_results(path: str, campaign: Campaign) -> dict[str, dict[str, Any]]:
    """The shards a previous run of the same campaign finished, by key."""
    done: dict[str, dict[str, Any]] = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of an interrupted run, half written
            if rec.get("campaign") != campaign.name or rec.get("identity") != campaign.identity:
                raise InvalidArgument(f"{path}:{n} is from another campaign ({rec.get('campaign')} {rec.get('identity')})")
            done[rec["shard"]] = rec
    return done


def run_campaign(campaign: Campaign, ex: Executor, *, results: str | None = None, resume: str | None = None,
                 progress: bool = False) -> Summary:
    """Run the shards ``resume`` has not finished, streaming each to ``results`` as it ends."""
    t = time.perf_counter()
    done = read_results(resume, campaign) if resume else {}
    todo = [s for s in campaign.shards if s.key not in done]
    out = open(results, "a" if results == resume else "w") if results else None
    try:  # closed however this ends: a driver that goes on (a test, a notebook) keeps no descriptor
        if out and out.tell():
            with open(results, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # an interrupted run's half line: ours start on a line of their own
                    out.write("\n")
        start = (len(done), sum(r["states"] for r in done.values()), sum(len(r["failures"]) for r in done.values()))
        with tally(campaign.name, len(campaign.shards), progress, start) as advance:
            for shard, r in ex.run(campaign.run, todo):
                rec = {"campaign": campaign.name, "identity": campaign.identity, "shard": shard.key, **r,
                       "failures": [{**f, "reproduce": campaign.reproduce(f)} for f in r["failures"]]}
                done[shard.key] = rec
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                advance(1, r["states"], len(r["failures"]))
    finally:
        if out:
            out.close()
    s = Summary(resumed=len(campaign.shards) - len(todo))
    for shard in campaign.shards:  # shard order: the same totals and failures whatever finished first
        rec = done[shard.key]
        s.shards += 1
        s.units += rec["units"]
        s.states += rec["states"]
        s.worker_seconds += rec.get("seconds", 0.0)
        s.cpu_seconds += rec.get("cpu_seconds", 0.0)  # not in the lines of an older run
        for k, v in rec.get("counts", {}).items():  # a "max_" figure is the worst shard's, the rest add up
            s.counts[k] = max(s.counts.get(k, v), v) if k.startswith("max_") else s.counts.get(k, 0) + v
        s.failures += rec["failures"]
    s.seconds = time.perf_counter() - t
    return s


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[0, n) in consecutive ranges of ``size``."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def parse_range(text: str) -> tuple[int, int]:
    """``A..B`` (B excluded, like Python's range) or a single ``A``."""
    a, sep, b = text.partition("..")
    try:
        lo, hi = int(a), int(b) if sep else int(a) + 1
    except ValueError:
        raise ValueError(f"{text!r} is not A..B nor A (whole numbers)") from None
    if hi <= lo or lo < 0:
        raise ValueError(f"empty range {text!r} (A..B runs from A up to B, B excluded)")
    return lo, hi
