"""Campaigns (DESIGN §6): shards give the same counts and failures whichever executor runs
them; results stream as JSON lines and an interrupted campaign resumes where it stopped;
every failure's reproduce line reproduces it on one machine; ``--ray`` without Ray is one
usage line; and a local Ray instance finds what ``--jobs 2`` finds, planted bug included."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from blockemu.cli.main import main
from blockemu.workload.campaign import Campaign, LocalExecutor, RayExecutor, Shard, run_campaign
from blockemu.workload.crash import crash_campaign
from blockemu.workload.writepath import FAST
from tests.util import sigint_as_a_terminal_gives


def planted(shard_size: int = 1):
    """Four two-operation workloads with flushes ignored: a campaign that must fail."""
    return crash_campaign(2, seed=3, subsets=1, nobarrier=True, limit=4, groups=0, write_path=FAST,
                          shard_size=shard_size)


class Recording(LocalExecutor):
    """The in-process executor, noting which shards it was asked to run."""

    def __init__(self) -> None:
        super().__init__(1)
        self.ran: list[str] = []

    def run(self, fn, shards):
        self.ran += [s.key for s in shards]
        return super().run(fn, shards)


def test_an_interrupted_campaign_resumes_with_the_same_totals(tmp_path):
    full = tmp_path / "full.jsonl"
    whole = run_campaign(planted(), LocalExecutor(1), results=str(full))
    lines = full.read_text().splitlines()
    assert whole.failures and len(lines) == whole.shards == 4
    assert all(f["reproduce"].startswith("blockemu crash ") for f in whole.failures)
    part = tmp_path / "part.jsonl"  # killed after two shards, in the middle of writing the third
    part.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    ex = Recording()
    again = run_campaign(planted(), ex, resume=str(part), results=str(part))
    assert ex.ran == [json.loads(x)["shard"] for x in lines[2:]]
    assert again.resumed == 2
    assert (again.units, again.states, again.failures) == (whole.units, whole.states, whole.failures)
    assert {json.loads(x)["shard"] for x in part.read_text().splitlines()[3:]} == {json.loads(x)["shard"] for x in lines[2:]}


def held_shard(args: tuple) -> dict:
    """Shard 0 returns at once; the others note that they started and the temporary directory
    they hold their images in, as a crash shard does, then wait for the lock the test holds."""
    lock, started, i = args
    with tempfile.TemporaryDirectory() as tmp:
        # whole or not at all: a worker the interruption kills between creating the note and
        # writing it left an empty one, which the test then failed to read
        (started / f".{i}").write_text(f"{os.getpid()} {tmp}")
        os.replace(started / f".{i}", started / str(i))
        if i:
            with open(lock) as f:
                fcntl.flock(f, fcntl.LOCK_SH)
    return {"units": 1, "states": 0, "failures": []}


def test_an_interrupted_local_campaign_stops_at_once(tmp_path):
    """Ctrl-C after the first shard: the pool must not run the rest of the campaign (nor wait
    for the shards in flight, whose results would go unrecorded) before letting go."""
    lock, started = tmp_path / "lock", tmp_path / "started"
    lock.touch()
    started.mkdir()
    shards = [Shard(str(i), (lock, started, i)) for i in range(20)]
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run = LocalExecutor(2).run(held_shard, shards)
        try:
            assert next(run)[0].key == "0"
            closer = threading.Thread(target=run.close)  # what KeyboardInterrupt in the loop does
            closer.start()
            closer.join(60)  # a bound on a hang, not a wait for a race: close() returns or never does
            assert not closer.is_alive(), "interrupting waited for shards blocked on the lock"
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)  # lets the old code's pool finish, so the test ends
    closer.join()
    ran = [f for f in started.iterdir() if not f.name.startswith(".")]  # notes written whole
    assert len(ran) <= 4  # shard 0, the two in flight, one queued ahead
    held = [f.read_text().split() for f in ran]
    assert not any(alive(int(pid)) for pid, _ in held), "a worker outlived the interruption"
    assert not any(os.path.exists(tmp) for _, tmp in held), "a killed shard left its temporary directory"


def interrupted_shard(args: tuple) -> dict:
    """A worker that gets the Ctrl-C its driver's process group gets."""
    signal.raise_signal(signal.SIGINT)
    return {"units": 1, "states": 0, "failures": []}


def test_a_pool_worker_leaves_ctrl_c_to_its_driver(capfd):
    """Ctrl-C reaches every process of the group: a pool worker raised KeyboardInterrupt in its
    shard, and multiprocessing wrote 'Process ForkProcess-2:' and a traceback on stderr (cut
    short when the driver's kill came first) -- the driver alone stops the campaign, on its own
    KeyboardInterrupt. Python's handler is put in place first: a suite run in the background
    inherits SIGINT ignored, which the worker would inherit and the test could not fail."""
    try:
        with sigint_as_a_terminal_gives():
            done = list(LocalExecutor(2).run(interrupted_shard, [Shard(str(i), ()) for i in range(2)]))
    except KeyboardInterrupt:
        pytest.fail("a worker's KeyboardInterrupt came back as its shard's result")
    assert [r["units"] for _, r in done] == [1, 1]
    assert "Traceback" not in capfd.readouterr().err


def alive(pid: int) -> bool:
    """Running, not a zombie nor gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def burns_in_a_child(args: tuple) -> dict:
    """A shard whose work is a child process's CPU, as a crash shard's is largely its sealing
    workers'."""
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass"], check=True)
    return {"units": 1, "states": 0, "failures": []}


def test_a_shards_cpu_time_counts_its_child_processes(tmp_path):
    s = run_campaign(Campaign("burn", {}, [Shard("0", ())], burns_in_a_child, str), LocalExecutor(2),
                     results=str(tmp_path / "r.jsonl"))
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert line["cpu_seconds"] >= 0.3 and s.cpu_seconds == line["cpu_seconds"]


def test_a_results_file_of_another_campaign_is_refused(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    assert main(["crash", "--max-ops", "1", "--limit", "1", "--jobs", "1", "--write-path", "fast",
                 "--results", str(f)]) == 0
    assert main(["crash", "--max-ops", "1", "--limit", "1", "--jobs", "1", "--write-path", "fast", "--seed", "5",
                 "--resume", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is from another campaign" in err[0], err


def test_a_failures_reproduce_line_reproduces_it_without_ray(capsys):
    s = run_campaign(planted(), LocalExecutor(1))
    f = s.failures[-1]
    argv = shlex.split(f["reproduce"])
    assert argv[0] == "blockemu" and "--ray" not in argv
    capsys.readouterr()
    assert main([*argv[1:], "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["workloads"] == 1 and f in out["failures"]


def test_ray_flag_without_ray_is_one_usage_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["crash", "--max-ops", "1", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'blockemu[ray]'" in err[0], err


def test_stress_seeds_each_shard_on_a_fresh_image(tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    assert main(["stress", "--seeds", "5..7", "--tasks", "2", "--ops", "30", "--write-path", "fast", "--jobs", "2",
                 "--results", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units"] == 2 and out["counts"]["ops"] == 2 * 2 * 30 and not out["failures"]
    assert sorted(json.loads(x)["shard"] for x in f.read_text().splitlines()) == ["seed 5", "seed 6"]


def test_stress_seeds_keep_a_failing_seeds_image(tmp_path, capsys):
    """A rerun does not repeat a stress run's timing (DESIGN §7), so the image a failing seed
    left is its one record: --keep-failed keeps it (it went with the shard's temp dir), and a
    seed that passed leaves none."""
    keep = tmp_path / "kept"
    assert main(["stress", "--seeds", "61..62", "--tasks", "4", "--ops", "200", "--faults", "nobarrier,cut=100",
                 "--write-path", "fast", "--jobs", "1", "--keep-failed", str(keep)]) == 1
    out = capsys.readouterr().out
    assert f"each failing seed's image is kept in {keep}/seed-N.img" in out
    assert "\n  rerun with: blockemu stress stress-61.img --seed 61" in out and "reproduce with" not in out
    assert main(["fsck", str(keep / "seed-61.img")]) != 0  # the failure is in it: nobarrier lost tree blocks
    assert main(["stress", "--seeds", "5..6", "--tasks", "2", "--ops", "30", "--write-path", "fast", "--jobs", "1",
                 "--keep-failed", str(keep)]) == 0
    assert sorted(os.listdir(keep)) == ["seed-61.img"]
    # resumed, a failure is not run again: the note does not claim its image was kept
    results = tmp_path / "r.jsonl"
    argv = ["stress", "--seeds", "61..62", "--tasks", "4", "--ops", "200", "--faults", "nobarrier,cut=100",
            "--write-path", "fast", "--jobs", "1"]
    assert main([*argv, "--results", str(results)]) == 1
    capsys.readouterr()
    assert main([*argv, "--resume", str(results), "--keep-failed", str(tmp_path / "other")]) == 1
    assert f"kept in {tmp_path / 'other'}/seed-N.img, but for seed 61: resumed, not run here)" in capsys.readouterr().out


def test_fuzz_is_a_campaign_command(tmp_path, capsys):
    f = tmp_path / "f.jsonl"
    assert main(["fuzz", "--structural", "--images", "2", "--shard-size", "1", "--seed", "21", "--jobs", "1",
                 "--results", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units"] == 2 and out["states"] == out["counts"]["commands"] == 16 and out["counts"]["traceback"] == 0
    assert [json.loads(x)["shard"] for x in f.read_text().splitlines()] == ["images 0..1", "images 1..2"]


def no_space(args: tuple) -> dict:
    raise OSError(errno.ENOSPC, "No space left on device", "crash.img")


def test_a_local_ray_instance_finds_what_two_jobs_find(monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'blockemu[ray]')")
    monkeypatch.setenv("RAY_worker_niceness", "0")  # as RayExecutor's own local instance (campaign.py)
    local = run_campaign(planted(shard_size=2), LocalExecutor(2))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        on_ray = run_campaign(planted(shard_size=2), RayExecutor())
        with pytest.raises(OSError) as raised:  # a shard's error comes back as the shard raised it
            list(RayExecutor().run(no_space, [Shard("0", ())]))
    finally:
        ray.shutdown()
    assert type(raised.value) is OSError and raised.value.errno == errno.ENOSPC
    assert str(raised.value) == "[Errno 28] No space left on device: 'crash.img'"  # one line, no remote traceback
    assert local.failures, "the planted --nobarrier bug was not caught"
    assert (on_ray.units, on_ray.states, on_ray.failures) == (local.units, local.states, local.failures)


def test_pool_workers_die_with_a_driver_killed_with_sigkill(tmp_path):
    """A driver killed with SIGKILL cannot stop its workers: they ran their shards on as orphans
    (a structural fuzz's for half an hour). Each worker now dies with it. The driver here runs
    a pool whose one shard never ends and says its worker's pid."""
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        from blockemu.workload.campaign import LocalExecutor, Shard
        from tests.test_campaign import never_ends
        for _ in LocalExecutor(2).run(never_ends, [Shard("0", ())]):
            pass
        """)], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        # The killed driver cannot remove its shards' directory: make it under tmp_path (each
        # suite run left one in /tmp).
        env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        worker = int(driver.stdout.readline())
        assert alive(worker)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 30
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the kernel's signal to land, not for a race
    orphan = alive(worker)
    if orphan:
        os.kill(worker, signal.SIGKILL)
    assert not orphan, "a pool worker outlived its driver"


def never_ends(args: tuple) -> dict:
    """A shard that says its process's pid and then never ends (as a long fuzz shard, to the
    driver's kill)."""
    print(os.getpid(), flush=True)
    threading.Event().wait()
    return {}
