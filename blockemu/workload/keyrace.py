"""The fstests generic/595 race, under each key-removal semantics.

One actor adds and removes the master key in a loop; another re-opens the file
in append mode, writes one byte and closes it, recording each append that was
acknowledged (open, write and close all succeeded). At the end the key is
added back, the file is fsync'ed (collecting any pending writeback error), the
filesystem unmounted and the file read from a fresh mount -- from disk, never
through the page cache being judged: every acknowledged byte must be there.
What each removal mode loses -- and whether each lost append was reported by an
error for that file, or went silent -- is the measurement (``AppendLedger``).

Two schedules: ``free`` runs the actors as concurrent tasks for a duration,
with background writeback on a short interval; ``seeded`` steps the actors
(key, appender, writeback) one operation at a time in an order drawn from a
seeded RNG, so an interleaving replays exactly from its seed.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Callable

from blockemu import display
from blockemu.crypto.keyring import MODES
from blockemu.fs.filesystem import Filesystem, mount
from blockemu.fs.mkfs import mkfs

KEY = bytes(range(1, 65))  # fstests' TEST_RAW_KEY pattern: 0x01..0x40
PATH = "/dir/file"


@dataclass
class RaceResult:
    mode: str
    seed: int
    schedule: str
    attempted: int = 0
    acknowledged: int = 0
    refused: int = 0  # appends that failed with ENOKEY (open or write): refused, not lost
    failed: int = 0  # appends whose own write or close said a loss (or another error): not acknowledged
    cut_off: int = 0  # the append the race's end caught between open and close
    lost: int = 0  # acknowledged appends missing from the file at the end
    lost_reported: int = 0  # of those, how many a close/fsync error for the file reported in time
    removals: int = 0
    wipes: int = 0
    wipe_delay_max_ms: float = 0.0
    wipe_delay_mean_ms: float = 0.0
    other_errors: list[str] = field(default_factory=list)
    append_size: int = 1
    wipe_delays_ms: list[float] = field(default_factory=list)  # each remove->wipe, for the report's distribution

    @property
    def silent(self) -> int:
        return self.lost - self.lost_reported

    def settle(self, errors: list[OSError], refusals: tuple[int, ...] = (errno.ENOKEY,)) -> bool:
        """File one finished append under exactly one column, so that attempted = acknowledged +
        refused + failed + cut_off (the table's columns used not to add up: an append whose own
        close reported a loss was in none). Refused: every error it met was a refusal that lost
        nothing. True if it was acknowledged."""
        if not errors:
            self.acknowledged += 1
            return True
        if all(e.errno in refusals and not getattr(e, "lost_bytes", 0) for e in errors):
            self.refused += 1
        else:
            self.failed += 1
        return False

    def as_json(self) -> dict:
        d = {**asdict(self), "silent": self.silent}
        del d["wipe_delays_ms"]  # a distribution, not a table cell: the report carries it
        return d

    def note_wipes(self, delays: list[float]) -> None:
        """Record the remove->wipe delays (seconds) the keyring or the kernel showed."""
        self.wipes = len(delays)
        self.wipe_delays_ms = [round(d * 1000, 3) for d in delays]
        if delays:
            self.wipe_delay_max_ms = round(max(delays) * 1000, 3)
            self.wipe_delay_mean_ms = round(sum(delays) / len(delays) * 1000, 3)


class AppendLedger:
    """Per-append loss accounting for one file, on a clock of the file's events.

    An acknowledged append whose bytes are not on disk after remount was *reported*
    only if an error for this file that declared lost bytes was raised after the
    append was acknowledged and before the file's next successful fsync: that error
    is the one a careful application would have seen for that append. A report
    before the acknowledgement, after a successful fsync had vouched for the data,
    or for another file covers nothing -- the loss is silent."""

    def __init__(self) -> None:
        self.clock = 0
        self.appends: list[tuple[int, bytes, int]] = []  # (offset, data, clock at acknowledgement)
        self.reports: list[int] = []  # clock of each loss reported for this file
        self.syncs: list[int] = []  # clock of each fsync of this file that succeeded

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def acked(self, offset: int, data: bytes) -> None:
        self.appends.append((offset, data, self._tick()))

    def reported(self) -> None:
        self.reports.append(self._tick())

    def synced(self) -> None:
        self.syncs.append(self._tick())

    def covered(self, acked_at: int) -> bool:
        until = next((t for t in self.syncs if t > acked_at), self.clock + 1)
        return any(acked_at < t < until for t in self.reports)

    def judge(self, data: bytes, result: RaceResult) -> None:
        """Count each acknowledged append missing from ``data`` (the file as read from disk)."""
        for off, appended, at in self.appends:
            if data[off:off + len(appended)] != appended:
                result.lost += 1
                result.lost_reported += self.covered(at)


class Race:
    def __init__(self, fs: Filesystem, result: RaceResult, rng: random.Random) -> None:
        self.fs = fs
        self.r = result
        self.rng = rng
        self.kid = ""
        self.ledger = AppendLedger()

    async def setup(self) -> None:
        self.kid = await self.fs.add_key(KEY)
        await self.fs.mkdir("/dir")
        await self.fs.set_policy("/dir", self.kid)
        async with self.fs.open(PATH, "w"):
            pass

    def _note_error(self, e: OSError, ledger: AppendLedger | None = None) -> None:
        """``ledger``: the file the failed operation was on; a loss report counts only there.
        An append's refusal is counted by ``RaceResult.settle``, once per append."""
        if getattr(e, "lost_bytes", 0):
            if ledger is not None:
                ledger.reported()
            else:
                self.r.other_errors.append(f"a loss reported for no file: {type(e).__name__}: {e}")
        elif e.errno != errno.ENOKEY or ledger is None:
            self.r.other_errors.append(f"{type(e).__name__}: {e}")

    async def appender(self) -> AsyncIterator[None]:
        """One append per three steps: open, write, close -- like ``echo -n X >> file``."""
        n, ledger = 0, self.ledger
        while True:
            self.r.attempted += 1
            chunk = bytes([0x41 + n % 26]) * self.r.append_size
            n += 1
            errors: list[OSError] = []
            try:
                f = await self.fs.open(PATH, "a")
            except OSError as e:
                errors.append(e)
                self._note_error(e, ledger)
                self.r.settle(errors)
                yield
                continue
            try:
                yield
                try:
                    off = f.inode.size
                    await f.write(chunk)
                except OSError as e:
                    errors.append(e)
                    self._note_error(e, ledger)
                yield
            except GeneratorExit:  # the race ended between open and close: nothing is acknowledged
                self.r.cut_off += 1
                raise
            finally:
                try:
                    await f.close()
                except OSError as e:
                    errors.append(e)
                    self._note_error(e, ledger)
            if self.r.settle(errors):
                ledger.acked(off, chunk)
            yield

    async def key_loop(self) -> AsyncIterator[None]:
        while True:
            await self.fs.add_key(KEY)
            yield
            try:
                await self.fs.remove_key(self.kid)
                self.r.removals += 1
            except OSError as e:
                self._note_error(e)
            yield

    async def writeback(self) -> AsyncIterator[None]:
        while True:
            await self.fs.writeback.flush_all()
            yield
            if self.rng.random() < 0.3:
                await self.fs.vol.commit()
                yield

    async def finish(self) -> None:
        """Re-add the key and fsync, collecting the errors still pending for the file."""
        await self.fs.add_key(KEY)
        async with self.fs.open(PATH, "r+") as f:
            try:
                await f.fsync()
            except OSError as e:
                self._note_error(e, self.ledger)
            else:
                self.ledger.synced()
        self.r.note_wipes(self.fs.keyring.wipe_delays)


async def read_back(image: str, path: str) -> bytes:
    """The file as the disk holds it: a fresh mount, the key added again, nothing cached."""
    async with mount(image, interval=3600) as fs:
        await fs.add_key(KEY)
        async with fs.open(path) as f:
            return await f.read()


async def run_race(
    mode: str,
    *,
    image: str | None = None,
    force: bool = True,
    seed: int = 0,
    schedule: str = "seeded",
    steps: int = 2000,
    duration: float = 2.0,
    append_size: int = 1,
    min_removals: int = 0,
) -> RaceResult:
    """Run the race on ``image`` (a fresh temporary one by default) under removal ``mode``;
    each append writes ``append_size`` bytes (the dirty data a removal can catch). A free run
    goes on past ``duration`` until the key has been removed ``min_removals`` times: how many
    cycles a second holds is the host's speed (a removal waits for the file's writeback), and a
    loaded machine managed four -- too few for the run to say anything (a minute at most more)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = image or os.path.join(tmp, "race.img")
        await mkfs(path, size="64M", force=force)
        interval = 3600.0 if schedule == "seeded" else 0.005
        result = RaceResult(mode, seed, schedule, append_size=append_size)
        rng = random.Random(seed)
        async with mount(path, key_removal=mode, interval=interval) as fs:
            race = Race(fs, result, rng)
            await race.setup()
            actors = [race.key_loop(), race.appender()]
            if schedule == "seeded":
                actors.append(race.writeback())
                for _ in range(steps):
                    await anext(rng.choice(actors))
            else:
                await _free_run(actors, duration, rng, lambda: result.removals >= min_removals)
            for a in actors:
                await a.aclose()
            await race.finish()
        race.ledger.judge(await read_back(path, PATH), result)
        return result


async def _free_run(actors: list[AsyncIterator[None]], duration: float, rng: random.Random,
                    enough: Callable[[], bool]) -> None:
    deadline = time.monotonic() + duration
    cap = deadline + 60  # a removal that no longer completes ends the run, not a hang

    async def drive(actor: AsyncIterator[None]) -> None:
        while (now := time.monotonic()) < deadline or not enough() and now < cap:
            await anext(actor)
            for _ in range(rng.randrange(3)):  # let the other actor and writeback interleave, unevenly
                await asyncio.sleep(0)

    await asyncio.gather(*(drive(a) for a in actors))


async def compare_modes(*, image: str | None = None, seed: int = 0, schedule: str = "seeded", steps: int = 2000,
                        duration: float = 2.0) -> list[RaceResult]:
    return [await run_race(m, image=image, seed=seed, schedule=schedule, steps=steps, duration=duration) for m in MODES]


# Modes whose design loses acknowledged writes: hard wipes under dirty data; sync wipes
# while files stay open, so writes after its writeback pass are lost. Reported, always.
LOSSY_MODES = ("hard", "sync")


def unexpected(r: RaceResult) -> bool:
    """A loss nobody declared: any loss in soft or deny-writes mode, and any silent loss at all."""
    return r.silent > 0 or (r.lost > 0 and r.mode not in LOSSY_MODES) or bool(r.other_errors)


# attempted = acked + ENOKEY + failed + cut off (``RaceResult.settle``)
COLUMNS = [("mode", "mode"), ("attempted", "attempted"), ("acknowledged", "acked"), ("refused", "ENOKEY"),
           ("failed", "failed"), ("cut_off", "cut-off"),
           ("lost", "acked+lost"), ("lost_reported", "lost,reported"), ("silent", "lost,silent"),
           ("wipe_delay_max_ms", "remove->wipe max ms")]


def table(results: list[RaceResult]) -> str:
    return display.table([h for _, h in COLUMNS], [[str(getattr(r, k)) for k, _ in COLUMNS] for r in results])