"""Supervised sealing (issue 10, item 4): a sealing worker that dies or hangs fails the
requests it holds with EIO and is replaced; a slot is reused only once its request is
answered or its worker is dead; close() stops a hung worker within its timeout.

The workers are real processes and the signals real; a test acts at a given request
by wrapping ``_Worker.send`` (the real send still happens), never by sleeping."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import select
import signal
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockemu
from blockemu.check.fsck import check
from blockemu.crypto import fscrypt
from blockemu.crypto.arena import Arena
from blockemu.crypto.sealer import DEPTH, Sealer, _Worker, seal_local
from blockemu.crypto.sealworker import IN_SLOT, PAGE, seal_slot, slot_size
from blockemu.crypto.sealworker import KEY as KEY_SIZE
from blockemu.errors import NoSpaceError
from tests.util import KEY, ErrnoCheck, encrypted_dir

EXTENT = 256 << 10  # the smallest run the workers take
PAGES = EXTENT // fscrypt.DATA_UNIT
RUNS = 2 * DEPTH + 2  # more runs than slots


@pytest.fixture
def arena():
    a = Arena(RUNS * PAGES)
    rng = random.Random(10)
    a.view[:] = rng.randbytes(len(a.view))
    yield a
    a.close()


@pytest.fixture
async def pool(arena):
    """A sealer with two workers, already started; ``make`` builds it with other limits."""
    made: list[Sealer] = []

    async def make(**kw) -> Sealer:
        sealer = Sealer(arena=arena, max_extent=EXTENT, workers=2, **kw)
        made.append(sealer)
        await seal(sealer, arena, 0)  # starts the workers
        return sealer

    yield make
    for sealer in made:
        for pid in sealer.pids:
            os.kill(pid, signal.SIGCONT)
        await sealer.close()


def run_frames(i: int) -> list[int]:
    return list(range(i * PAGES, (i + 1) * PAGES))


def run_key(i: int) -> bytearray:
    return bytearray(random.Random(i).randbytes(fscrypt.XTS_KEY_SIZE))


async def seal(sealer: Sealer, arena: Arena, i: int) -> None:
    """Seal run ``i`` and check the result against sealing it here."""
    expected = seal_local(run_key(i), bytes(arena.view[i * EXTENT : (i + 1) * EXTENT]), 0)
    async with sealer.sealed(run_key(i), run_frames(i), 0) as (ciphertext, sums):
        assert (bytes(ciphertext), sums) == expected, f"run {i} sealed wrong"


def on_send(monkeypatch, action: Callable[[_Worker, int], None], before: bool = False) -> list[int]:
    """Call ``action(worker, n)`` as the n-th request (from 1) goes to ``worker``: just after
    it is in the pipe, or with ``before`` just before; returns the pid each request went to."""
    real = _Worker.send
    sent: list[int] = []

    def send(self: _Worker, *args):
        sent.append(self.proc.pid)
        if before:
            action(self, len(sent))
        fut = real(self, *args)
        if not before:
            action(self, len(sent))
        return fut

    monkeypatch.setattr(_Worker, "send", send)
    return sent


def stop_first(stopped: list[_Worker]) -> Callable[[_Worker, int], None]:
    """An action before the send (``on_send(..., before=True)``): SIGSTOP the worker the first
    request goes to. The worker is stopped before the request reaches its pipe, so it stays in
    flight until we act; stopped just after the send, an idle worker on the other core could
    answer first (the test then saw a killed worker's request succeed)."""
    def action(worker: _Worker, n: int) -> None:
        if n == 1:
            os.kill(worker.proc.pid, signal.SIGSTOP)
            stopped.append(worker)
    return action


def reaped(pid: int) -> bool:
    """The process is gone (a zombie would still answer signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_killed_worker_fails_its_requests_with_eio_and_is_replaced(pool, arena, monkeypatch):
    sealer = await pool()
    stopped: list[_Worker] = []
    on_send(monkeypatch, stop_first(stopped), before=True)
    inflight = asyncio.create_task(seal(sealer, arena, 1))
    while not stopped:
        await asyncio.sleep(0)
    victim = stopped[0].proc.pid
    os.kill(victim, signal.SIGKILL)
    with ErrnoCheck(errno.EIO):
        await inflight
    assert str(victim) in str(inflight.exception())
    # later requests -- more than the slots at once -- all succeed, on a full pool
    await asyncio.gather(*(seal(sealer, arena, i) for i in range(RUNS)))
    assert len(sealer.pids) == 2 and victim not in sealer.pids
    assert reaped(victim)


async def test_a_hung_worker_misses_its_deadline_and_is_replaced(pool, arena, monkeypatch):
    """Only the stopped worker gets a short deadline: a healthy worker on a loaded machine
    may take long over a run, and must not be killed for it."""
    sealer = await pool()
    stopped: list[_Worker] = []
    stop = stop_first(stopped)

    def stop_with_short_deadline(worker: _Worker, n: int) -> None:
        stop(worker, n)
        if n == 1:
            worker.timeout = 0.3  # the send arms the deadline

    on_send(monkeypatch, stop_with_short_deadline, before=True)
    with pytest.raises(OSError) as caught:
        await seal(sealer, arena, 1)
    victim = stopped[0].proc.pid
    assert caught.value.errno == errno.EIO and f"sealing worker {victim} did not answer within 0.3 s" in str(caught.value)
    assert reaped(victim)
    await asyncio.gather(*(seal(sealer, arena, i) for i in range(RUNS)))
    assert len(sealer.pids) == 2 and victim not in sealer.pids


async def test_a_loop_stalled_past_the_deadline_kills_no_worker_that_answered(pool, arena, monkeypatch):
    """The loop is blocked until the worker's answer is in the pipe and the deadline has
    passed: timer and answer come due in one loop turn, and the answer wins."""
    sealer = await pool()
    workers = list(sealer._workers)

    def stall(worker: _Worker, n: int) -> None:
        if n == 1:
            worker.timeout = 0.05
            worker._arm()
            pipe = worker.proc.stdout._transport.get_extra_info("pipe")  # type: ignore[union-attr]
            assert select.select([pipe], [], [], 30)[0], "no answer"
            time.sleep(0.5)  # the loop stalls well past the deadline (not a wait for a race)

    on_send(monkeypatch, stall)
    await seal(sealer, arena, 1)
    assert [w.pid for w in workers] == sealer.pids, "a worker that answered in time was killed"


async def test_a_cancelled_seal_keeps_its_slot_until_the_worker_answers(pool, arena, monkeypatch):
    """Every slot is in flight on stopped workers; one request is cancelled while another
    user waits for a slot. That user must not get the cancelled request's slot before the
    worker has answered it: the stale request would read (and zero) the new user's key."""
    sealer = await pool()
    for pid in sealer.pids:
        os.kill(pid, signal.SIGSTOP)
    sent = on_send(monkeypatch, lambda worker, n: None)
    slots = 2 * DEPTH
    users = [asyncio.create_task(seal(sealer, arena, i)) for i in range(slots)]
    while len(sent) < slots:
        await asyncio.sleep(0)
    waiter = asyncio.create_task(seal(sealer, arena, slots))
    users[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await users[0]
    for _ in range(10):  # let the waiter run as far as it can
        await asyncio.sleep(0)
    assert len(sent) == slots, "a slot was handed on while its request was in flight"
    for pid in sealer.pids:
        os.kill(pid, signal.SIGCONT)
    await asyncio.gather(waiter, *users[1:])


async def test_close_kills_a_stopped_worker_within_its_timeout(pool, arena, monkeypatch):
    sealer = await pool(close_timeout=0.5)
    stopped: list[_Worker] = []
    on_send(monkeypatch, stop_first(stopped), before=True)
    inflight = asyncio.create_task(seal(sealer, arena, 1))
    while not stopped:
        await asyncio.sleep(0)
    pids = sealer.pids
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(sealer.close(), 30)  # it used to wait for ever
    assert loop.time() - start < 0.5 + 10  # its timeout, and room for a loaded machine's kill and reap
    for pid in pids:
        assert reaped(pid)
    with ErrnoCheck(errno.EIO):
        await inflight


async def test_close_while_a_replacement_starts_stops_it_too(pool, arena, monkeypatch):
    """close() during a respawn: the worker still starting must be stopped with the pool, not
    join it afterwards and outlive the mount (a leaked process, its reader a task the loop's
    shutdown then waits on)."""
    sealer = await pool()
    victim = sealer._workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    await victim.reader
    started: list[int] = []
    real = _Worker.__init__

    def init(self, proc, *args):
        real(self, proc, *args)
        started.append(proc.pid)

    monkeypatch.setattr(_Worker, "__init__", init)
    user = asyncio.create_task(seal(sealer, arena, 1))  # tops the pool up: a replacement starts
    while not started:
        await asyncio.sleep(0)
    assert sealer._starting.locked() and started[0] not in sealer.pids  # started, not ready yet
    survivor = sealer.pids
    await asyncio.wait_for(sealer.close(), 30)
    for pid in started + survivor:
        assert reaped(pid)
    await asyncio.gather(user, return_exceptions=True)
    assert sealer.pids == []


async def test_close_after_an_error_inside_sealed(pool, arena):
    """An error raised inside ``sealed()`` keeps the caller's frame -- and its view of the
    slot -- alive in the traceback (writeback keeps ENOSPC on the inode until fsync):
    close must not fail with BufferError for it, nor for a slice the caller kept."""
    sealer = await pool()
    with pytest.raises(NoSpaceError) as caught:
        async with sealer.sealed(run_key(1), run_frames(1), 0) as (ciphertext, sums):
            kept = ciphertext[:16]
            raise NoSpaceError("No space left on device")
    await sealer.close()
    assert caught.value.__traceback__ is not None and len(kept) == 16


async def test_respawns_are_bounded_and_sealing_goes_on_without_workers(pool, arena):
    sealer = await pool(respawns=2)
    for _ in range(2):
        workers = list(sealer._workers)
        for w in workers:
            os.kill(w.proc.pid, signal.SIGKILL)
        await asyncio.gather(*(w.reader for w in workers))
        await seal(sealer, arena, 1)  # on the replacements, then (budget spent) in a thread
    assert sealer.pids == []
    await asyncio.gather(*(seal(sealer, arena, i) for i in range(RUNS)))


async def test_sigkill_of_a_sealing_worker_in_a_64_mib_encrypted_write(tmp_path, monkeypatch):
    """The production write path (sealing workers, 1 MiB extents): a worker is killed as
    the 20th extent goes to it. Each fsync either succeeds -- and what it acknowledged
    survives remount byte for byte -- or fails with EIO naming the worker; later writes
    succeed on its replacement; fsck is clean."""
    image = str(tmp_path / "fs.img")
    await blockemu.mkfs(image, size="256M")
    chunk, total = 8 << 20, 64 << 20
    base = random.Random(64).randbytes(1 << 20)  # each MiB a different rotation of it: cheap, and no page repeats
    data = b"".join(base[i * 4099 :] + base[: i * 4099] for i in range(total >> 20))
    after = data[: 4 << 20][::-1]
    killed: list[int] = []

    def kill_20th(worker: _Worker, n: int) -> None:
        if n == 20:
            killed.append(worker.proc.pid)
            os.kill(worker.proc.pid, signal.SIGKILL)

    sent = on_send(monkeypatch, kill_20th)
    acked: list[int] = []
    failed: list[OSError] = []
    async with blockemu.mount(image, seal_workers=2) as fs:
        await encrypted_dir(fs, "/enc")
        async with fs.open("/enc/big", "w") as f:
            for off in range(0, total, chunk):
                await f.write(data[off : off + chunk])
                try:
                    await f.fsync()
                    acked.append(off)
                except OSError as e:
                    failed.append(e)
        assert killed and len(failed) <= 1
        for e in failed:
            assert e.errno == errno.EIO and f"sealing worker {killed[0]}" in str(e), e
        before = len(sent)
        async with fs.open("/enc/after", "w") as f:
            await f.write(after)
            await f.fsync()
        replacements = set(sent[before:]) - set(sent[:20])
        assert replacements and replacements <= set(fs.writeback.sealer.pids)
    assert acked, "no fsync succeeded"
    report = check(image)
    assert report.clean, [e.message for e in report.errors]
    async with blockemu.mount(image, seal_workers=2) as fs:
        await fs.add_key(KEY)
        async with fs.open("/enc/big") as f:
            for off in acked:
                await f.seek(off)
                assert await f.read(chunk) == data[off : off + chunk], f"acknowledged bytes at {off} lost"
        async with fs.open("/enc/after") as f:
            assert await f.read() == after


async def test_unmount_after_an_encrypted_enospc(tmp_path):
    """The ENOSPC raised inside ``sealed()`` is kept on the inode with its traceback until
    fsync reports it: unmount must still complete (it raised BufferError) and stop the workers."""
    image = str(tmp_path / "fs.img")
    await blockemu.mkfs(image, size="16M")
    fs = await blockemu.mount(image, seal_workers=2)
    await encrypted_dir(fs, "/enc")

    fs.room_for = lambda n, runs=1, inode=None: True  # write() would refuse it first: reach writeback's ENOSPC
    with ErrnoCheck(errno.ENOSPC):
        async with fs.open("/enc/big", "w") as f:
            await f.write(random.Random(16).randbytes(24 << 20))
            await f.fsync()
    pids = [w.proc.pid for w in fs.writeback.sealer._workers]
    assert pids
    await fs.unmount()
    for pid in pids:
        assert reaped(pid)
    report = check(image)
    assert report.clean, [e.message for e in report.errors]


async def test_ctrl_c_leaves_the_workers_to_their_parent(pool, arena, capfd):
    """Ctrl-C at a terminal signals the whole process group, sealing workers too: the command
    handles it and closes them; a worker must neither die of it nor print a traceback."""
    sealer = await pool()
    pids = list(sealer.pids)
    for pid in pids:
        os.kill(pid, signal.SIGINT)
    await asyncio.gather(*(seal(sealer, arena, i) for i in range(RUNS)))  # a round trip to each after the signal
    assert sealer.pids == pids
    assert "Traceback" not in capfd.readouterr().err


def test_a_worker_starts_without_cryptography_or_package_metadata():
    """A mount's first large write waits for its workers to start: a worker loads the XTS and
    checksum modules only -- not the cryptography package, nor the importlib.metadata lookup
    crc32c's __init__ makes (together over half of a start) -- and still checksums right."""
    import subprocess
    import sys

    import blockemu.crypto.sealworker
    from blockemu.crypto.sealworker import BOOT
    from blockemu.ondisk import csum

    probe = BOOT.replace("worker_main(*map(int, sys.argv[2:]))",
                         "from blockemu.ondisk import csum\n"
                         "print(sorted(m for m in ('cryptography', 'importlib.metadata', 'blockemu.crypto.fscrypt')"
                         " if m in sys.modules), csum.field(0, b'abc').hex())")
    package = os.path.dirname(os.path.dirname(os.path.abspath(blockemu.crypto.sealworker.__file__)))
    out = subprocess.run([sys.executable, "-c", probe, package], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["[]", csum.field(0, b"abc").hex()]


async def test_seal_many_seals_small_batches_on_the_loop_and_larger_keyed_ones_in_one_thread_trip(arena, monkeypatch):
    """A batch of small runs (an fsync after scattered writes): without a key sealing is only
    checksumming, done on the loop -- no thread round trip, and no copy: the parts are the
    run's pages where they lie, copied once where they are written; with keys, up to
    ``LOOP_SEAL`` bytes are sealed on the loop too (the thread held the GIL throughout: its
    round trip was pure cost), and a larger batch's runs share one trip to a thread. Each
    result, its parts joined, is what sealing the run here gives."""
    trips: list[int] = []
    real = asyncio.to_thread

    async def counted(func, jobs, *args):
        trips.append(len(jobs))
        return await real(func, jobs, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    sealer = Sealer(arena=arena, max_extent=EXTENT, workers=0)
    runs = [[i * PAGES + 3, i * PAGES + 5] for i in range(RUNS)]  # two scattered frames each
    plain = [bytes(arena.page(runs[i][0])) + bytes(arena.page(runs[i][1])) for i in range(RUNS)]
    got = await sealer.seal_many([(None, frames) for frames in runs], 0)
    assert trips == [] and [(b"".join(d), s) for d, s in got] == [seal_local(None, p, 0) for p in plain]
    assert all(isinstance(part, memoryview) and part.obj is arena.map for parts, _ in got for part in parts)
    got = await sealer.seal_many([(run_key(i), frames) for i, frames in enumerate(runs)], 0)
    assert trips == [] and [(b"".join(d), s) for d, s in got] == [seal_local(run_key(i), p, 0) for i, p in enumerate(plain)]
    large = [list(range(i * PAGES, (i + 1) * PAGES)) for i in range(2)]  # 2 x 256 KiB: past LOOP_SEAL
    got = await sealer.seal_many([(run_key(i), frames) for i, frames in enumerate(large)], 0)
    assert trips == [2] and [(b"".join(d), s) for d, s in got] == [
        seal_local(run_key(i), b"".join(bytes(arena.page(p)) for p in frames), 0) for i, frames in enumerate(large)]
    await sealer.close()


@pytest.mark.timeout(60)  # turns the hang into a failure; the flush takes well under a second
async def test_a_flush_with_more_groups_than_sealing_slots_finishes(tmp_path):
    """A run holds its sealing slot until its turn to be placed, and turns go in group order.
    With a 256 MiB dirty limit a flush put 32 one-extent groups in flight for 6 slots; a waiter
    for a slot loses its place to a newcomer, so later groups came to hold every slot waiting
    for the turn of a group that waited for a slot, and the fsync of 48 MiB never returned.
    In-flight groups are now bounded by the slots."""
    image = str(tmp_path / "lanes.img")
    await blockemu.mkfs(image, size="256M")
    data = random.Random(5).randbytes(64 << 20)
    async with blockemu.mount(image, dirty_limit=256 << 20, background_bytes=64 << 20) as fs:
        await encrypted_dir(fs, "/e")
        assert fs.writeback.sealer.slots == 2 * DEPTH  # the production path: two sealing workers
        async with fs.open("/e/f", "w") as f:
            for at in range(0, len(data), 1 << 20):
                await f.write(data[at : at + (1 << 20)])
            await f.fsync()
    async with blockemu.mount(image) as fs:
        await fs.add_key(KEY)
        async with fs.open("/e/f") as f:
            assert await f.read() == data
    assert check(image).clean


UNITS = st.lists(st.one_of(st.integers(0, RUNS * PAGES - 1), st.just(IN_SLOT)), min_size=1, max_size=24)


# the arena is only read, so sharing it across examples is safe
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(units=UNITS, start=st.integers(0, RUNS * PAGES - 24), consecutive=st.booleans())
def test_seal_slot_seals_consecutive_scattered_and_in_slot_units_alike(arena, units, start, consecutive):
    """A worker seals a run of consecutive frames (a streaming write's) as one buffer and any
    other run unit by unit (scattered frames, pages copied into the slot): each the same
    ciphertext and checksums as sealing the run's plaintext here."""
    if consecutive:
        units = list(range(start, start + len(units)))
    elif len({f for f in units if f != IN_SLOT}) < len([f for f in units if f != IN_SLOT]):
        units = list(dict.fromkeys(units))  # a frame is in a run at most once
    cap = len(units) * PAGE
    slots = memoryview(bytearray(slot_size(cap)))
    rng = random.Random(len(units))
    plain = []
    for i, f in enumerate(units):
        if f == IN_SLOT:
            slots[KEY_SIZE + i * PAGE : KEY_SIZE + (i + 1) * PAGE] = page = rng.randbytes(PAGE)
        else:
            page = bytes(arena.page(f))
        plain.append(page)
    slots[:KEY_SIZE] = run_key(1)
    sums = seal_slot(arena.view, slots, 0, tuple(units), cap, 0)
    assert (bytes(slots[KEY_SIZE + cap : KEY_SIZE + 2 * cap]), sums) == seal_local(run_key(1), b"".join(plain), 0)
    assert slots[:KEY_SIZE] == bytes(KEY_SIZE), "the key stayed in the slot"


async def test_a_pooled_run_with_heap_pages_is_sealed_from_the_slot(pool, arena):
    """A run a worker seals may hold heap pages (the arena was full): those are copied into the
    slot and sealed from there, and wiped from it once the run is done; the frames beside them
    are read where they are."""
    sealer = await pool()
    frames: list[int | bytearray] = list(run_frames(1))
    heap = {3: bytearray(random.Random(3).randbytes(PAGE)), PAGES - 1: bytearray(random.Random(4).randbytes(PAGE))}
    for k, page in heap.items():
        frames[k] = page
    plain = b"".join(bytes(p) if isinstance(p, bytearray) else bytes(arena.page(p)) for p in frames)
    async with sealer.sealed(run_key(1), frames, 0) as (ciphertext, sums):
        assert (bytes(ciphertext), sums) == seal_local(run_key(1), plain, 0)
    assert sealer._slots is not None
    slots = bytes(sealer._slots[1])
    assert all(bytes(page) not in slots for page in heap.values()), "a heap page's plaintext stayed in a slot"


async def test_a_lent_slot_keeps_its_ciphertext_until_repaid_and_loans_stay_within_budget(pool, arena):
    """``loan`` lets the device keep a slot's ciphertext past ``sealed``: sealing goes on in the
    other slots and never writes into the lent one before it is repaid; past ``lendable`` loans
    the caller must copy (None); a heap page copied into a lent slot is wiped at once."""
    sealer = await pool(lendable=1)
    frames: list[int | bytearray] = list(run_frames(1))
    frames[2] = heap = bytearray(random.Random(5).randbytes(PAGE))
    async with sealer.sealed(run_key(1), frames, 0) as (ciphertext, _):
        repay = sealer.loan(ciphertext)
        assert repay is not None
        kept = bytes(ciphertext)
    assert sealer._slots is not None and bytes(heap) not in bytes(sealer._slots[1])
    for k in range(sealer.slots + 1):  # every other slot, and one again
        i = 2 + k % (RUNS - 2)
        async with sealer.sealed(run_key(i), run_frames(i), 0) as (other, _):
            assert sealer.loan(other) is None  # the one loan allowed is out
    assert bytes(ciphertext) == kept, "a lent slot was sealed into"
    repay()
    async with sealer.sealed(run_key(2), run_frames(2), 0) as (other, _):
        again = sealer.loan(other)
        assert again is not None
    again()
    assert sealer._idle.qsize() == sealer.slots + 1


async def test_a_slot_repaid_inside_sealed_is_not_wiped_again_at_its_exit(pool, arena):
    """A device write that fails gives its lent slot back at once, still inside ``sealed``:
    another run may take the slot and put its key there before the ``async with`` is left,
    and leaving it must not zero that key (the lent slot was wiped when lent)."""
    sealer = await pool(lendable=1)
    async with sealer.sealed(run_key(1), run_frames(1), 0) as (ciphertext, _):
        repay = sealer.loan(ciphertext)
        assert repay is not None
        repay()
        taken = [sealer._idle.get_nowait() for _ in range(sealer._idle.qsize())]
        assert sealer._slots is not None
        buf, off = sealer._slots[2], taken[-1]  # the one given back (the queue is FIFO)
        buf[off : off + KEY_SIZE] = run_key(2)  # the next run's key
    assert buf[off : off + KEY_SIZE] == run_key(2), "the next user's key was wiped"
    for off in taken:
        sealer._idle.put_nowait(off)
