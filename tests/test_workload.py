"""Job files (fio syntax), blockemu run / stress / crash from the command line."""
from __future__ import annotations

import errno
import json
import os
import random
import re

import pytest

import blockemu
from blockemu.errors import InvalidArgument
from blockemu.workload.jobfile import RW, parse
from tests.test_cli import run


def test_parser_globals_stonewall_env_and_bare_keys(monkeypatch):
    monkeypatch.setenv("BLOCKSIZE", "8k")
    jf = parse("""
; comment
[global]
bs=${BLOCKSIZE}
size=1m
[a]
rw=randwrite   # trailing comment
time_based
runtime=2s
[global]
size=2M
[b]
stonewall
rw=read
""", "t.fio")
    a, b = jf.jobs
    assert a.options == {"bs": (8192,) * 3, "size": 1 << 20, "rw": RW("randwrite"), "time_based": True, "runtime": 2.0}
    assert b.options["size"] == 2 << 20 and b.options["bs"] == (8192,) * 3  # a later [global] applies only below it
    assert (a.group, b.group) == (0, 1)


@pytest.mark.parametrize("text,msg", [
    ("[j]\nrw=write\nbogus=1\n", "t.fio:3: unknown option 'bogus'"),
    ("[j]\nbs=lots\n", "t.fio:2: bad value for bs"),
    ("[j]\nrw=sideways\n", "t.fio:2: bad value for rw"),
    ("[j]\niodepth=abc\n", "t.fio:2: bad value for iodepth: 'abc' (expected a whole number)"),
    ("[j]\nioengine=null\n", "t.fio:2: ioengine=null is not supported (blockemu runs file engines: sync"),
    ("[j]\nexec_prerun=ls\n", "t.fio:2: fio option 'exec_prerun' is not supported"),
    ("[global]\nbs=4k\n", "t.fio: no jobs"),
    # the run's mount is set up from [global]: in a job's section these were taken and ignored
    # (encrypt=1 there wrote the job's files in plain)
    ("[j]\nrw=write\nencrypt=1\n", "t.fio:3: encrypt= encrypts the run's directory, /enc-jobs, for every job: "
                                    "put it in [global]"),
    ("[j]\nimage_size=1G\n", "t.fio:2: image_size= sizes the image the run makes, for every job: put it in [global]"),
    ("[j]\nrw=write\nkey_removal=hard\n", "t.fio:1: job j: key_removal= in a job's section sets a keyrace job's own "
                                          "mode; the mount's, which every other job runs under, is set in [global]"),
    # an option only another kind of job reads was taken and ignored: faults= on a fio job injected nothing
    ("[j]\nrw=write\nfaults=eio=0-1G\n", "t.fio:1: job j: faults= is read by a kind=faults job"),
    ("[m]\nkind=mix\nschedule=seeded\n", "t.fio:1: job m: schedule= is read by a kind=keyrace job"),
    ("[j]\nrw=write\ncheck_data=1\n", "t.fio:1: job j: check_data= is read by a kind=fsck job"),
    # and options nothing read at all are gone: kind=ledger ran nothing, and the run said it passed
    ("[l]\nkind=ledger\n", "t.fio:2: bad value for kind"),
    ("[l]\nrw=write\npower_cut_after=10\n", "t.fio:3: unknown option 'power_cut_after'"),
    ("[l]\nrw=write\nappends=10\n", "t.fio:3: unknown option 'appends'"),
])
def test_parser_errors_name_file_and_line(text, msg):
    with pytest.raises(InvalidArgument, match=re.escape(msg)):
        parse(text, "t.fio")


def test_every_problem_is_reported_at_once_with_file_and_line():
    with pytest.raises(InvalidArgument) as e:
        parse("[global]\nioengine=null\n[j]\nrw=write\nbogus=1\nbs=lots\nexec_prerun=ls\n", "t.fio")
    assert str(e.value) == ("t.fio:2: ioengine=null is not supported (blockemu runs file engines: sync, psync, vsync, "
                            "pvsync, pvsync2, mmap, ftruncate, libaio, io_uring, posixaio); "
                            "t.fio:5: unknown option 'bogus'; t.fio:6: bad value for bs: bad size 'lots': expected "
                            "a number with an optional K/M/G/T/P suffix; t.fio:7: fio option 'exec_prerun' is not supported")


def test_fio_values_env_keywords_expressions_and_modifiers(monkeypatch):
    """Unset ${VAR} is empty (as in fio); $mb_memory/$ncpus/$pagesize and (arithmetic)
    evaluate; rw= modifiers, bssplit, bsrange and per-direction bs parse as fio reads them."""
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    pagesize, ncpus = os.sysconf("SC_PAGE_SIZE"), os.cpu_count()
    mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    job = parse("""[j]
size=1m${NOT_SET_ANYWHERE}
io_size=2*$mb_memory
offset=$pagesize
number_ios=($ncpus*2+1)
bs=4k,64k
bssplit=4k/10:64k/50:32k
bsrange=1k-4k
rw=read:-8k
[k]
rw=randwrite:8
[l]
rw=write:112k
verify=crc64
verify_pattern=0xaa555aa5
""", "t.fio").jobs
    o = job[0].options
    assert (o["size"], o["io_size"], o["offset"], o["number_ios"]) == (1 << 20, 2 * mb, pagesize, ncpus * 2 + 1)
    assert o["bs"] == (4096, 65536, 65536) and o["bsrange"] == ((1024, 4096),) * 3
    assert o["bssplit"][0] == ((4096, 10.0), (65536, 50.0), (32768, 40.0))
    assert o["rw"] == RW("read", -8192) and job[1].options["rw"] == RW("randwrite", 8)
    assert job[2].options["rw"] == RW("write", 112 << 10) and job[2].options["verify_pattern"] == bytes.fromhex("aa555aa5")


def test_include(tmp_path):
    (tmp_path / "common.fio").write_text("[global]\nbs=16k\n")
    (tmp_path / "main.fio").write_text("include common.fio\n[j]\nsize=1m\n")
    from blockemu.workload.jobfile import load
    assert load(str(tmp_path / "main.fio")).jobs[0].options["bs"] == (16384,) * 3


def test_an_include_in_a_jobs_section_gives_that_job_its_options(tmp_path):
    """fio's include is textual: in a job's section the file's options are that job's
    (``fio --showcmd``: ``--name=x --rw=write --size=64k --bs=4k``). They went to the globals
    of the jobs that followed, so the job itself had no size ("size= is needed"), and a job
    after it got them without asking."""
    from blockemu.workload.jobfile import load
    (tmp_path / "sized.fio").write_text("size=64k\nbs=8k\n")
    (tmp_path / "main.fio").write_text("[x]\nrw=write\ninclude sized.fio\n[y]\nrw=read\nsize=1m\n")
    x, y = load(str(tmp_path / "main.fio")).jobs
    assert (x.get("size"), x.get("bs"), x.raw.get("size")) == (65536, (8192,) * 3, "64k")
    assert y.get("bs") is None


def test_an_include_in_a_jobs_section_cannot_bring_in_global_only_options(tmp_path):
    """encrypt= and image_size= set up the run's one mount, so a job's section refuses them;
    brought in by an ``include`` there (fio's include is textual, cac56b2) they skipped that
    check and were taken and ignored: an included encrypt=1 wrote the job's files in plain."""
    from blockemu.workload.jobfile import load
    (tmp_path / "enc.fio").write_text("encrypt=1\nsize=64k\n")
    (tmp_path / "main.fio").write_text("[x]\nrw=write\ninclude enc.fio\n")
    with pytest.raises(InvalidArgument, match=r"enc.fio:1: encrypt= encrypts the run's "
                                              r"directory, /enc-jobs, for every job: put it in \[global\]"):
        load(str(tmp_path / "main.fio"))
    (tmp_path / "top.fio").write_text("include enc.fio\n[x]\nrw=write\n")  # before any job: [global]'s
    assert load(str(tmp_path / "top.fio")).globals["encrypt"]


def test_an_included_files_jobs_take_the_globals_before_the_include(tmp_path):
    """fio's include is textual: a job written in an included file starts from the [global]
    options in force at the include, and the lines after the include are in the included file's
    last section. Parsed apart, its job had none of them (no size=, "size= is needed") and a
    [global] option written after the include reached the later jobs but not it."""
    from blockemu.workload.jobfile import load
    (tmp_path / "jobs.fio").write_text("[a]\nrw=write\n")
    (tmp_path / "main.fio").write_text("[global]\nsize=1m\nbs=8k\ninclude jobs.fio\nbs=16k\n[b]\nrw=read\n")
    jf = load(str(tmp_path / "main.fio"))
    a, b = jf.jobs
    assert (a.get("size"), a.get("bs"), a.raw.get("bs")) == (1 << 20, (16384,) * 3, "16k")
    assert (b.get("size"), b.get("bs"), jf.globals["bs"]) == (1 << 20, (8192,) * 3, (8192,) * 3)


def test_a_plain_fio_job_runs_unmodified(tmp_path):
    job = tmp_path / "plain.fio"
    job.write_text("""[global]
ioengine=libaio
direct=1
bs=4k
size=2m
randseed=7
group_reporting

[writer]
rw=randwrite
iodepth=4
fsync=16
verify=crc32c

[reader]
stonewall
rw=read
numjobs=2
runtime=5
""")
    out = json.loads(run("run", str(job), "--output-format", "json", "--seed", "1", "--image", str(tmp_path / "j.img")).stdout)
    assert out["blockemu"]["ok"] and out["blockemu"]["fsck_clean"]
    jobs = {j["jobname"]: j for j in out["jobs"]}
    w, r = jobs["writer"], jobs["reader"]
    assert w["write"]["io_bytes"] == 2 << 20 and w["write"]["iops"] > 0 and w["sync"]["total_ios"] == 31  # as fio
    assert set(w["write"]["clat_ns"]["percentile"]) >= {"50.000000", "99.000000", "99.990000"}
    assert r["read"]["io_bytes"] == 2 * (2 << 20) and r["groupid"] == 1 and r["error"] == 0  # group_reporting
    text = run("run", str(job), "--seed", "1").stdout
    assert "seed = 1" in text and "Run status group 0" in text and "IOPS=" in text


def test_builtin_scenarios(tmp_path):
    listing = run("run", "--list").stdout
    assert "generic-595" in listing and "fsstress" in listing
    out = json.loads(run("run", "fsstress", "--json", "--seed", "3").stdout)
    assert out["blockemu"]["ok"], out["blockemu"]["failures"]
    mix = next(j for j in out["jobs"] if j["kind"] == "mix")
    assert mix["ops"] == 4 * 300 and not mix["divergent"]
    race = json.loads(run("run", "key-removal-hard", "--json", "--seed", "2", check_rc=None).stdout)
    r = next(j for j in race["jobs"] if j["kind"] == "keyrace")
    assert r["mode"] == "hard" and r["silent"] == 0


def test_script_jobs_and_errors(tmp_path):
    job = tmp_path / "s.fio"
    job.write_text("[s]\nkind=script\nscript=tests.scripted:touch_files\n")
    out = json.loads(run("run", str(job), "--json", "--seed", "5").stdout)
    assert out["blockemu"]["ok"] and out["jobs"][0]["result"]
    bad = tmp_path / "bad.fio"
    bad.write_text("[j]\nrw=write\nsize=1m\nfrobnicate=3\n")
    p = run("run", str(bad), check_rc=1)
    assert p.stderr.strip() == f"blockemu: run: {bad}:4: unknown option 'frobnicate'"
    missing = json.loads(run("run", str(tmp_path / "none.fio"), "--json", check_rc=1).stdout)["error"]
    assert missing["code"] == "ENOENT", missing  # was EINVAL: a missing job file is a missing file


def test_stress_mix_and_crash_points(tmp_path):
    img = str(tmp_path / "s.img")
    fast = ("--write-path", "fast")  # the production path has its own slice in test_oracles.py
    out = json.loads(run("stress", img, "--seed", "4", "--tasks", "3", "--ops", "80", "--crash-points", "25", *fast,
                         "--json").stdout)
    assert out["ok"] and out["fsck"] == "clean" and out["lost_acknowledged_writes"] == 0
    assert out["ops"] == 240 and out["crash_states_checked"] == 25
    assert (out["tasks"], out["ops_per_task"]) == (3, 80)  # --ops is per task; ops counts all tasks'
    again = json.loads(run("stress", img, "--seed", "4", "--tasks", "3", "--ops", "80", *fast, "--json").stdout)
    assert again["by_op"] == out["by_op"]  # the same seed replays the same operations


def test_a_failing_stress_says_what_a_rerun_repeats_and_where_the_failure_is(tmp_path, monkeypatch, capsys):
    """"reproduce with:" promised a repetition the run's timing denies (one seed, three fresh
    images: 6, 33 and 37 corruptions detected): the line is a rerun on a fresh image, and a note
    says what repeats, what does not, and that the image the run left is the failure."""
    from blockemu.cli.main import main
    from blockemu.workload import runner

    async def failing(image, **kw):
        return {"ok": False, "problems": ["/p0/f1: planted"], "detected": [], "notes": []}

    monkeypatch.setattr(runner, "stress_mix", failing)
    img = str(tmp_path / "s.img")
    assert main(["stress", img, "--seed", "4", "--ops", "100", "--faults", "flip=0.01"]) == 1
    out = capsys.readouterr().out
    assert "reproduce with" not in out
    assert f"rerun with: blockemu stress {tmp_path / 's-rerun.img'} --seed 4 --tasks 4 --ops 100 --faults flip=0.01\n" in out
    assert "not the timing (the tasks' interleaving, commits, sealing workers, encryption nonces)" in out
    assert out.endswith(f"; this failure is {img} as the run left it (blockemu fsck {img} --check-data)\n")


@pytest.mark.parametrize("schedule", ["free", "seeded"])
def test_the_key_removal_race_reproduces_only_a_seeded_schedule(tmp_path, monkeypatch, capsys, schedule):
    """The free race's interleaving is timing (one seed: 3308 then 3602 appends): its line is a
    rerun that says so and names the schedule that does replay; the seeded one's reproduces."""
    from blockemu.cli.main import main
    from blockemu.workload import keyrace

    async def silent_loss(mode, **kw):
        return keyrace.RaceResult(mode, kw["seed"], kw["schedule"], attempted=1, acknowledged=1, lost=1)

    monkeypatch.setattr(keyrace, "run_race", silent_loss)
    span = ["--ops", "50"] if schedule == "seeded" else ["--duration", "1.0"]
    img = str(tmp_path / "r.img")
    argv = ["stress", img, "--scenario", "key-removal-race", "--seed", "5", "--schedule", schedule, *span]
    assert main(argv) == 1
    line = capsys.readouterr().out.splitlines()[-1]
    again = f"blockemu stress {img} --scenario key-removal-race --force --seed 5 --schedule {schedule} {' '.join(span)}"
    if schedule == "seeded":
        assert line == f"UNEXPECTED LOSS in soft; reproduce with: {again} --key-removal soft"
    else:
        assert line == (f"UNEXPECTED LOSS in soft; rerun with: {again} --key-removal soft (the free schedule's "
                        "interleaving is timing, so the loss may not recur; --schedule seeded --ops N replays an "
                        "interleaving exactly)")


def test_stress_with_injected_faults_reports_and_checks(tmp_path):
    img = str(tmp_path / "f.img")
    run("mkfs", img, "--size", "64M")
    out = json.loads(run("stress", img, "--seed", "9", "--tasks", "2", "--ops", "60", "--faults",
                         "eio=1M-64M:w", "--json", check_rc=None).stdout)
    assert out["io_errors"] > 0 and "injected_errors" not in out  # one name, with faults or without
    assert "fsck" in out and "reproduce" not in out


def test_stress_with_flips_counts_detected_corruption_apart_from_loss(tmp_path):
    """Flipped sectors read back as checksum errors (EIO) were counted as lost acknowledged
    writes (twice: unreadable, then 0 bytes against the model) and the run exited 1: detected
    corruption is what flips should give, counted apart, and no failure."""
    img = str(tmp_path / "f.img")
    run("mkfs", img, "--size", "64M")
    p = run("stress", img, "--seed", "1", "--tasks", "2", "--ops", "100", "--faults", "flip=0.05",
            "--write-path", "fast", "--json", check_rc=None)
    out = json.loads(p.stdout)
    assert out["detected_corruption"] > 0, out
    assert all("checksum mismatch" in d or d.startswith("fsck: [CSUM_MISMATCH]") for d in out["detected"]), out
    assert out["lost_acknowledged_writes"] == 0 and out["problems"] == [] and p.returncode == 0
    assert any("flipped bits in" in n for n in out["notes"]), out  # the damage it leaves is said
    # A rerun on that image failed, blaming itself for the first run's flipped sectors: it is now
    # refused before it writes, one line, EUCLEAN, the image untouched.
    before = open(img, "rb").read()
    again = run("stress", img, "--seed", "1", "--tasks", "2", "--ops", "100", "--faults", "flip=0.05",
                "--write-path", "fast", check_rc=1)
    assert again.stderr.startswith(f"blockemu: stress: {img}: not clean before the run (fsck: "), again.stderr
    assert again.stderr.count("\n") == 1 and "[CSUM_MISMATCH]" in again.stderr
    assert open(img, "rb").read() == before
    err = json.loads(run("stress", img, "--seed", "2", "--faults", "flip=0.01", "--json", check_rc=1).stdout)["error"]
    assert err["code"] == "EUCLEAN", err


@pytest.mark.parametrize("bug", [False, True], ids=["flips only", "a wrong link count too"])
def test_under_flips_only_the_fsck_findings_the_flips_explain_count_as_detected(tmp_path, monkeypatch, bug):
    """Under flip= every fsck finding counted as detected corruption, so a consistency bug (here a
    planted one: mkdir counts one link too many in its parent) hid behind the flips and the run
    passed. Now a finding counts as detected only if it goes away with the flips undone: a flipped
    tree block the run never rewrote (planted through the device, so that every run has one)
    makes many findings, all explained; the wrong link count fails the run."""
    import asyncio

    from blockemu.device.faultplan import FaultPlan
    from blockemu.fs.filesystem import Filesystem
    from blockemu.ondisk import structs as S
    from blockemu.workload import runner
    from blockemu.workload.writepath import WRITE_PATHS

    real_mix, real_mkdir = runner.run_mix, Filesystem.mkdir

    async def mix_then_flip_a_leaf(fs, **kw):
        result = await real_mix(fs, **kw)
        await fs.sync()
        dev, plan = fs.vol.device, fs.vol.device.faults
        leaf = next(b for b in fs.vol.engine.trees[S.FS_TREE_OBJECTID].blocks() if b.level == 0)
        raw = await dev.read(leaf.bytenr, fs.vol.engine.store.nodesize)
        dev.faults = FaultPlan(flip=1.0)
        await dev.write(leaf.bytenr, raw)
        dev.faults = plan
        return result

    async def mkdir_one_link_too_many(self, path, *a, **kw):
        await real_mkdir(self, path, *a, **kw)
        parent = self._resolve(path.rsplit("/", 1)[0] or "/")
        parent.item = parent.item._replace(nlink=parent.item.nlink + 1)
        self.save_inode(parent)

    monkeypatch.setattr(runner, "run_mix", mix_then_flip_a_leaf)
    if bug:
        monkeypatch.setattr(Filesystem, "mkdir", mkdir_one_link_too_many)
    out = asyncio.run(runner.stress_mix(str(tmp_path / "f.img"), seed=1, tasks=2, nops=60, duration=None,
                                        faults=FaultPlan.parse("flip=0.01"), crash_points=0,
                                        write_path=WRITE_PATHS["fast"]))
    assert out["fsck"] != "clean" and any(d.startswith("fsck: [CSUM_MISMATCH] tree block") for d in out["detected"])
    if bug:
        assert not out["ok"] and out["fsck_flips_undone"] != "clean", out
        assert out["problems"] and all(p.startswith("fsck (the flips undone): [NLINK_MISMATCH]")
                                       for p in out["problems"]), out["problems"]
        assert not any("NLINK_MISMATCH" in d for d in out["detected"])
    else:
        assert out["ok"] and out["fsck_flips_undone"] == "clean" and out["problems"] == [], out


@pytest.mark.parametrize("bug", [False, True], ids=["a flipped leaf", "a lost write behind it"])
def test_under_flips_a_read_the_flips_explain_must_read_right_with_them_undone(tmp_path, monkeypatch, bug):
    """Under flip= every read the oracle found failing its checksum counted as detected, so a file
    whose content was wrong (here a planted lost write: the model holds a byte the disk never got)
    passed whenever a flipped block made its read fail. Now the image with the flips undone is
    mounted and checked against the model too: the flipped leaf alone passes, the lost write
    behind it fails the run."""
    import asyncio

    from blockemu.device.faultplan import FaultPlan
    from blockemu.ondisk import structs as S
    from blockemu.workload import runner
    from blockemu.workload.writepath import WRITE_PATHS

    real_mix = runner.run_mix
    victim = []

    async def mix_then_flip_a_files_leaf(fs, **kw):
        result = await real_mix(fs, **kw)
        task = result.tasks[0]
        p = next(p for p, m in sorted(task.files.items()) if m and p not in task.tainted)
        ino = (await fs.stat(p)).st_ino
        if bug:
            task.files[p][0] ^= 1  # acknowledged, says the model; never on disk
        await fs.sync()
        dev, plan = fs.vol.device, fs.vol.device.faults
        leaf = next(b for b in fs.vol.engine.trees[S.FS_TREE_OBJECTID].blocks()
                    if b.level == 0 and any(k[0] == ino for k in b.keys))
        raw = await dev.read(leaf.bytenr, fs.vol.engine.store.nodesize)
        dev.faults = FaultPlan(flip=1.0)
        await dev.write(leaf.bytenr, raw)
        dev.faults = plan
        victim.append(p)
        return result

    monkeypatch.setattr(runner, "run_mix", mix_then_flip_a_files_leaf)
    out = asyncio.run(runner.stress_mix(str(tmp_path / "f.img"), seed=1, tasks=2, nops=40, duration=None,
                                        faults=FaultPlan.parse("flip=0.001"), crash_points=0,
                                        write_path=WRITE_PATHS["fast"]))
    assert out["detected_corruption"] > 0, out  # the oracle's read of the flipped leaf failed
    if bug:
        assert not out["ok"], out
        assert [p for p in out["problems"] if p.startswith(f"the oracle (the flips undone): {victim[0]}: on disk")], out
    else:
        assert out["ok"] and out["problems"] == [], out


async def write_then_flip_its_first_sector(fs, path: str, size: int) -> tuple[int, bytes]:
    """Write ``size`` bytes to ``path`` (outside the mix's tree: never read back) and rewrite its
    first sector through the device with a bit flipped (recorded, as flip= records it): its disk
    offset and its bytes as written."""
    from blockemu.device.faultplan import FaultPlan

    async with fs.open(path, "w") as f:
        await f.write(b"v" * size)
        await f.fsync()
    where = next(fs.extents.mappings(f.inode.ino)).disk_at(0)
    dev, plan = fs.vol.device, fs.vol.device.faults
    raw = await dev.read(where, size)
    dev.faults = FaultPlan(flip=1.0)
    await dev.write(where, raw[:4096])
    await dev.flush()
    dev.faults = plan
    return where, raw


@pytest.mark.parametrize("bug", [False, True], ids=["a flipped data sector", "a bad data sector no flip made"])
def test_under_flips_the_closing_fsck_checks_data(tmp_path, monkeypatch, bug):
    """The closing fsck did not check data, so a flipped data sector the mix never read back
    left "fsck clean" (``fsck --check-data`` found it). Now it is found and, explained by the
    flips (gone once they are undone), counted as detected; a bad data sector no flip made
    (written behind the device's back) stays bad with the flips undone and fails the run."""
    import asyncio

    from blockemu.device.faultplan import FaultPlan
    from blockemu.workload import runner
    from blockemu.workload.writepath import WRITE_PATHS

    real_mix = runner.run_mix
    image = str(tmp_path / "f.img")

    async def mix_then_spoil_a_data_sector(fs, **kw):
        """Flip a bit of /victim's first sector through the device (recorded); with ``bug``,
        one of its second sector behind the device's back (no flip explains it)."""
        result = await real_mix(fs, **kw)
        where, raw = await write_then_flip_its_first_sector(fs, "/victim", 8192)
        if bug:
            fd = os.open(image, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes([raw[4096] ^ 1]), where + 4096)
            finally:
                os.close(fd)
        return result

    monkeypatch.setattr(runner, "run_mix", mix_then_spoil_a_data_sector)
    out = asyncio.run(runner.stress_mix(image, seed=1, tasks=2, nops=40, duration=None,
                                        faults=FaultPlan.parse("flip=0.001"), crash_points=0,
                                        write_path=WRITE_PATHS["fast"]))
    assert out["fsck"] != "clean", out
    victim = [e for e in out["fsck_errors"] if e["code"] == "CSUM_MISMATCH" and "/victim)" in e["message"]]
    assert len(victim) == 1 + bug, out["fsck_errors"]
    if bug:
        assert not out["ok"] and out["fsck_flips_undone"] != "clean", out
        assert [p for p in out["problems"] if p.startswith("fsck (the flips undone): [CSUM_MISMATCH]")
                and "at file offset 4096: /victim)" in p], out
        assert any("at file offset 0: /victim)" in d for d in out["detected"]), out
    else:
        assert out["ok"] and out["fsck_flips_undone"] == "clean" and out["problems"] == [], out
        assert any(d.startswith("fsck: [CSUM_MISMATCH] data sector") and "/victim)" in d for d in out["detected"]), out


def test_under_flips_a_finding_names_an_encrypted_file_as_the_mix_does(tmp_path, monkeypatch):
    """The closing fsck ran without the mix's key, so a flipped sector of a file in an encrypted
    directory was listed as ``/ChQVTw.../suFQ...`` -- its no-key names -- beside the mix's own
    line naming the same file ``/p1/f1``. It gets the key now (and so does the check of the copy
    with the flips undone, whose findings are matched to it by their text)."""
    import asyncio
    import random

    from blockemu.device.faultplan import FaultPlan
    from blockemu.workload import runner
    from blockemu.workload.writepath import WRITE_PATHS

    real_mix = runner.run_mix

    async def mix_then_flip_an_encrypted_sector(fs, **kw):
        result = await real_mix(fs, **kw)
        kid = await fs.add_key(random.Random("1:key").randbytes(64))  # the mix's key (seed 1)
        await fs.mkdir("/sealed")
        await fs.set_policy("/sealed", kid)
        await write_then_flip_its_first_sector(fs, "/sealed/victim", 4096)
        return result

    monkeypatch.setattr(runner, "run_mix", mix_then_flip_an_encrypted_sector)
    out = asyncio.run(runner.stress_mix(str(tmp_path / "f.img"), seed=1, tasks=2, nops=40, duration=None,
                                        faults=FaultPlan.parse("flip=0.001"), crash_points=0,
                                        write_path=WRITE_PATHS["fast"]))
    assert any(d.startswith("fsck: [CSUM_MISMATCH] data sector") and "/sealed/victim)" in d
               for d in out["detected"]), out["detected"]
    assert out["ok"] and out["fsck_flips_undone"] == "clean", out


def test_crash_campaign_cli_finds_nothing_and_catches_a_planted_bug():
    out = json.loads(run("crash", "--max-ops", "1", "--jobs", "1", "--write-path", "fast", "--json").stdout)
    assert out["workloads"] == 13 and out["states"] > 50 and out["failures"] == []
    bad = run("crash", "--max-ops", "2", "--limit", "4", "--jobs", "1", "--nobarrier", "--write-path", "fast", check_rc=1)
    assert "FAILED:" in bad.stdout and "reproduce with: blockemu crash" in bad.stdout
    assert "--write-path fast" in bad.stdout


def test_crash_campaign_reports_failures_by_workload_and_keeps_their_images(tmp_path):
    """Hundreds of failures of one workload's crash states hid how many workloads failed: the
    report counts the failing workloads and gives each one's first failure; --keep-failed
    writes that crash state's image, named by the reproduce line's --workloads."""
    kept = tmp_path / "kept"
    bad = run("crash", "--max-ops", "2", "--limit", "3", "--groups", "0", "--jobs", "1", "--nobarrier", "--write-path", "fast",
              "--keep-failed", str(kept), check_rc=1).stdout
    assert "3 of 3 workloads failed:" in bad
    firsts = [line for line in bad.splitlines() if line.startswith("FAILED:")]
    assert len(firsts) == 3 and all("more failures of it)" in line for line in firsts)
    for n in range(3):
        image = kept / f"workload-{n}.img"
        assert f"(its image: {image})" in bad and f"--workloads {n} " in bad
        assert run("fsck", str(image), check_rc=None).returncode == 4  # the state as the crash left it
    assert sorted(os.listdir(kept)) == [f"workload-{n}.img" for n in range(3)]
    assert "upto=N is the number of write-log entries" in run("crash", "--help").stdout


def test_stress_power_cut_keeps_every_fsync_acknowledged_file(tmp_path):
    """A power cut mid-run (unflushed cache lost, half of it torn in): afterwards every file
    the ledger recorded as fsync/sync-acknowledged is on disk byte for byte, and fsck is clean."""
    out = json.loads(run("stress", str(tmp_path / "c.img"), "--seed", "61", "--tasks", "4", "--ops", "400",
                         "--faults", "cut=1000,torn=0.5", "--json").stdout)
    assert out["aborted"] and "power cut" in out["aborted"]
    assert out["ledger_files_checked_after_crash"] > 0
    assert out["lost_acknowledged_writes"] == 0 and out["fsck"] == "clean" and out["ok"]
    assert out["notes"] == []


def test_a_stress_campaign_counts_the_files_it_checked_after_each_power_cut():
    """Each seed's ledger files checked after its cut are summed with the other counts: a
    campaign whose cuts checked nothing (the ledger emptied after the cut) looked the same as
    one that checked every fsynced file."""
    out = json.loads(run("stress", "--seeds", "61..62", "--tasks", "4", "--ops", "400", "--faults", "cut=1000",
                         "--jobs", "1", "--json").stdout)
    assert out["counts"]["aborted"] == 1 and out["counts"]["ledger_files_checked_after_crash"] > 0
    assert not out["failures"]


def test_a_stress_campaign_counts_the_seeds_its_power_cut_came_to():
    """Each seed's run says when its cut= never came, but a campaign of them dropped the notes:
    ``stress --seeds 0..3 --ops 60 --faults cut=150`` reported 0 failures, no seed cut (a
    newcomer's power-cut campaign that cut nothing). It counts the seeds the cut came to."""
    from blockemu.workload.runner import _stress_shard

    args = (5, 1, 10, None, "cut=100000", 0, "fast", None)
    assert _stress_shard(args)["counts"]["power_cuts"] == 0
    assert _stress_shard((*args[:4], "cut=5", *args[5:]))["counts"]["power_cuts"] == 1
    assert "power_cuts" not in _stress_shard((*args[:4], None, *args[5:]))["counts"]  # none asked: no figure


async def test_stress_says_when_the_power_cut_it_was_given_never_came(tmp_path):
    """--faults cut=N past the run's last write: the run passed, with no word that it never
    tested the power cut it was asked for (injected errors 0, aborted null)."""
    from blockemu.device.faultplan import FaultPlan
    from blockemu.workload.runner import stress_mix
    from blockemu.workload.writepath import WRITE_PATHS

    out = await stress_mix(str(tmp_path / "s.img"), seed=5, tasks=1, nops=10, duration=None,
                           faults=FaultPlan.parse("cut=100000"), crash_points=0, write_path=WRITE_PATHS["fast"])
    assert out["ok"] and out["aborted"] is None
    assert len(out["notes"]) == 1 and out["notes"][0].startswith("cut=100000: the run made ")
    assert "so no power cut happened" in out["notes"][0]


def test_run_says_when_the_power_cut_its_faults_job_asked_for_never_came(tmp_path):
    """A job file's ``kind=faults`` ``cut=N`` past its jobs' last write: ``run`` passed in
    silence (stress said so already), and the tester took the crash for tested."""
    job = tmp_path / "cut.fio"
    job.write_text("[global]\nimage_size=64m\n[cut]\nkind=faults\nfaults=cut=100000\n"
                   "[w]\nrw=write\nbs=64k\nsize=1m\nfsync=4\n")
    out = run("run", str(job), "--seed", "1").stdout
    assert re.search(r"^note: cut=100000: the run made \d+ writes, so no power cut happened", out, re.M), out
    job.write_text(job.read_text().replace("cut=100000", "cut=5"))
    out = run("run", str(job), "--seed", "1").stdout  # the cut stops w: a crash, its fsyncs checked after
    assert "no power cut happened" not in out and "note: w: stopped by the power cut" in out, out


CUT_BETWEEN_MIXES = """[global]
image_size=64m
[m1]
kind=mix
nops=60
ops=create:3,write:4,append:3,fsync:4
[cut]
stonewall
kind=faults
faults=cut=20
[m2]
stonewall
kind=mix
nops=100
[w]
stonewall
rw=write
size=64k
"""


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_runs_power_cut_is_a_crash_the_next_jobs_mount_again_after(tmp_path, seed):
    """``kind=faults`` ``cut=``: the mix the cut stopped ended the run with a raw ``/jobs/m/p0:
    no such file or directory`` (its directory never made durable), and a mix before the cut
    was held to its whole model, un-fsynced files listed as divergent (review29). A cut is a
    crash: each mix it met is checked against its ledger (what its fsyncs and syncs made
    durable -- m1's fsynced files, checked), the jobs it stopped say so in a note, and the
    jobs after it run on the image mounted again (w writes its 64 KiB without an error)."""
    from blockemu.workload.runner import run_workload

    job = tmp_path / "cut.fio"
    job.write_text(CUT_BETWEEN_MIXES)
    report = await run_workload(str(job), image=str(tmp_path / "cut.img"), seed=seed)
    assert report.ok and report.fsck_clean, report.failures
    assert any(n.startswith("the power was cut: the next jobs run on the image mounted again") for n in report.notes)
    checked = [n for n in report.notes if n.startswith("m1: the power cut met it")]
    assert checked and int(re.search(r"only the (\d+) file", checked[0])[1]) > 0, report.notes
    out = report.as_json()
    (w,) = [j for j in out["jobs"] if j["jobname"] == "w"]
    assert w["error"] == 0 and w["write"]["io_bytes"] == 64 << 10


async def test_a_mix_whose_directory_is_gone_is_a_finding_not_the_runs_error(tmp_path):
    """The check walked a task's directory with a bare readdir: a directory the disk lost ended
    the run with a raw ENOENT instead of naming what was lost."""
    from blockemu.workload.mix import MixResult, Task, verify_mix

    image = str(tmp_path / "m.img")
    await blockemu.mkfs(image, size="32M")
    async with blockemu.mount(image) as fs:
        mix = MixResult()
        task = Task(fs, "/gone", random.Random(1), mix)
        task.files["/gone/f"] = bytearray(b"x")
        mix.tasks = [task]
        await verify_mix(fs, mix)
    assert mix.divergent[0].startswith("/gone: missing on disk") and "/gone/f: on disk 0 bytes, model 1" in mix.divergent


async def test_the_stress_summary_has_the_same_keys_whatever_the_flags(tmp_path):
    """A script reading ``stress --json`` of runs with and without --faults met a KeyError: the
    ``notes``, ``crash_states_checked``
    or ``fsck_flips_undone`` came only with the flags that fill them. Every key is always there,
    null (or an empty list) where the run has no figure for it."""
    from blockemu.device.faultplan import FaultPlan
    from blockemu.workload.runner import stress_mix
    from blockemu.workload.writepath import FAST

    runs = [await stress_mix(str(tmp_path / f"{n}.img"), seed=5, tasks=1, nops=10, duration=None,
                             faults=FaultPlan.parse(faults) if faults else None, crash_points=points, write_path=FAST)
            for n, (faults, points) in enumerate(((None, 0), ("latency=0.0001", 0), (None, 2)))]
    assert [sorted(r) for r in runs[1:]] == [sorted(runs[0])] * 2
    plain, faulted, crashed = runs
    assert (plain["io_errors"], faulted["io_errors"]) == (0, 0)
    assert (plain["crash_states_checked"], plain["fsck_flips_undone"], plain["notes"]) == (None, None, [])
    assert crashed["crash_states_checked"] == 2 and all(r["ok"] for r in runs)


async def test_the_stress_bar_names_the_checks_after_the_mix(tmp_path):
    """The bar sat at 400/400 with no word while the unmount, the oracle and fsck ran (as long
    as the mix itself on a big run): it is renamed for them once the operations are counted."""
    from blockemu.workload.runner import stress_mix
    from blockemu.workload.writepath import FAST

    calls = []
    out = await stress_mix(str(tmp_path / "s.img"), seed=5, tasks=2, nops=10, duration=None, faults=None,
                           crash_points=0, write_path=FAST, advance=lambda n=1, description=None: calls.append((n, description)))
    assert out["ok"] and sum(n for n, _ in calls) == out["ops"] == 20
    assert calls[-1] == (0, "stress: checking (unmount, the oracle on a fresh mount, fsck)")


async def test_stress_ops_per_second_is_over_the_mix_alone(tmp_path, monkeypatch):
    """The stress figure (tools/bench.py's stress row) was ``ops / --duration``: the operations
    still running at the deadline ended after it, uncounted in the time. The summary now gives
    the mix's own seconds -- from its first operation to the end of its last, so at least the
    duration, and none of mkfs, mount, the oracle's check or fsck around it -- and ops/s over them."""
    import time

    from blockemu.workload import runner
    from blockemu.workload.writepath import FAST

    spans = []
    run_mix = runner.run_mix

    async def timed(*args, **kw):
        started = time.monotonic()
        try:
            return await run_mix(*args, **kw)
        finally:
            spans.append(time.monotonic() - started)

    monkeypatch.setattr(runner, "run_mix", timed)
    began = time.monotonic()
    out = await runner.stress_mix(str(tmp_path / "s.img"), seed=2, tasks=2, nops=10_000, duration=0.3, faults=None,
                                  crash_points=0, write_path=FAST)
    whole = time.monotonic() - began
    assert out["ok"]
    (mix,) = spans
    assert 0.3 <= out["seconds"] <= mix + 0.001 < whole
    assert out["ops_per_second"] == pytest.approx(out["ops"] / out["seconds"], rel=0.01)


async def test_a_mix_runs_again_on_its_image_and_another_seed_is_told_its_key_differs(tmp_path):
    """`run fsstress --image IMAGE` a second time failed with EEXIST (the mix's directories are
    made afresh), and with another --seed with a bare 'Required key not available' (the run's
    encrypted directory has the key of the first run's seed)."""
    from blockemu.workload.runner import run_workload

    job, img = tmp_path / "m.fio", str(tmp_path / "m.img")
    job.write_text("[global]\nencrypt=1\n[m]\nkind=mix\nnumjobs=2\nnops=10\n")
    for _ in range(2):
        report = await run_workload(str(job), image=img, seed=4)
        assert not report.failures and report.fsck_clean, report.failures
    with pytest.raises(InvalidArgument, match=r"/enc-jobs holds an earlier run's files, encrypted with the key of its "
                                              r"--seed .*: run with that --seed, or on a fresh image"):
        await run_workload(str(job), image=img, seed=5)
    async with blockemu.mount(img) as fs:  # unmounted by the refused run; the two runs' directories, m and m.2
        assert len(await fs.readdir("/enc-jobs")) == 2


async def test_a_scratch_image_never_outgrows_the_free_space_that_holds_it(tmp_path, monkeypatch):
    """A run sizes the image it makes by its jobs (three times their sizes): fio's
    enospc-pressure.fio asks for 3 x 999 GiB, and its 128 GiB layout filled the host's /tmp (a
    sparse image takes what is written). The image is capped at 90 % of the free space of its
    directory, so the emulated disk fills first (ENOSPC inside the run) and a note says why;
    image_size= still sizes it as asked."""
    from blockemu.workload import runner

    real = os.statvfs

    def small(path):  # this directory's filesystem has 400 MiB free
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, 102400, 102400, *st[5:]))
    monkeypatch.setattr(runner.os, "statvfs", small)
    job = tmp_path / "big.fio"
    job.write_text("[big]\nrw=write\nbs=1m\nsize=100g\nnumber_ios=2\n")  # asks for 100 GiB, writes 2 MiB
    report = await runner.run_workload(str(job), image=str(tmp_path / "big.img"), seed=1)
    assert report.ok and os.path.getsize(tmp_path / "big.img") == 360 << 20  # 90 % of 400 MiB
    assert any("90% of the free space" in n for n in report.as_json()["blockemu"]["notes"])
    assert any(line.startswith("note: the image is 360MiB") for line in report.text("normal"))
    job.write_text("[global]\nimage_size=1g\n[big]\nrw=write\nbs=1m\nsize=100g\nnumber_ios=2\n")
    report = await runner.run_workload(str(job), image=str(tmp_path / "asked.img"), seed=1)
    assert report.ok and os.path.getsize(tmp_path / "asked.img") == 1 << 30 and not report.as_json()["blockemu"]["notes"]


def test_fios_buffer_alignment_option_is_accepted_and_listed_as_ignored():
    """mem_align (alias iomem_align) only aligns fio's I/O buffers in memory: fio accepts it, and
    blockemu called it an "unknown option", as it says of a typo."""
    jf = parse("[t]\nrw=write\nsize=64k\nmem_align=4096\n[u]\nrw=write\nsize=64k\niomem_align=4k\n", "t.fio")
    assert [j.ignored for j in jf.jobs] == [["mem_align"], ["mem_align"]]


def test_a_filesize_range_is_refused_as_unsupported_not_as_a_bad_value():
    """fio's filesize=1m-4m gives each file a random size in the range; blockemu does not, and
    said "bad size '1m-4m': expected a number", as of a typo."""
    with pytest.raises(InvalidArgument) as e:
        parse("[t]\nrw=write\nnrfiles=2\nfilesize=1m-4m\n", "t.fio")
    assert str(e.value) == ("t.fio:4: filesize=1m-4m: a range of sizes (fio picks each file's in it) is not "
                            "supported: give one size")


async def test_a_scratch_image_on_little_free_space_is_capped_too(tmp_path, monkeypatch):
    """The 90 % cap holds below 256 MiB: with 100 MiB free the image was 256 MiB (the jobs'
    floor won over the cap), the host's disk to fill; it is 90 MiB, and with too little free
    for any image the run says so with ENOSPC before it makes one."""
    from blockemu.workload import runner

    real, free = os.statvfs, [25600]  # 4 KiB blocks: 100 MiB

    def small(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, free[0], free[0], *st[5:]))
    monkeypatch.setattr(runner.os, "statvfs", small)
    job = tmp_path / "j.fio"
    job.write_text("[j]\nrw=write\nbs=1m\nsize=8m\n")
    report = await runner.run_workload(str(job), image=str(tmp_path / "a.img"), seed=1)
    assert report.ok and os.path.getsize(tmp_path / "a.img") == 90 << 20
    free[0] = 2560  # 10 MiB
    with pytest.raises(OSError) as e:
        await runner.run_workload(str(job), image=str(tmp_path / "b.img"), seed=1)
    assert e.value.errno == errno.ENOSPC and "too little for the image" in str(e.value)
    assert not os.path.exists(tmp_path / "b.img")


CUT_INSIDE_FIO = """[global]
image_size=64m
[cut]
kind=faults
faults=cut=30
[w]
stonewall
rw=randwrite
bs=4k
size=1m
fsync=4
[after]
stonewall
rw=write
size=64k
"""


@pytest.mark.parametrize("fsync", ["honest", "lying"])
async def test_a_power_cut_inside_an_fio_job_is_a_crash_its_fsyncs_checked_after(tmp_path, monkeypatch, fsync):
    """A ``kind=faults`` cut inside an fio job failed the run with fio's ``err=5`` while a mix the
    cut stopped was a note (review32). A cut is a crash: the fio job it stops says so in a note,
    and what its fsyncs made durable is checked on the image mounted again -- a loss there (an
    fsync that returned without making anything durable) fails the run."""
    from blockemu.fs.volume import Volume
    from blockemu.workload.runner import run_workload

    if fsync == "lying":
        async def lie(self, ino: int) -> None:
            return None
        monkeypatch.setattr(Volume, "fsync", lie)
    job = tmp_path / "cut.fio"
    job.write_text(CUT_INSIDE_FIO)
    report = await run_workload(str(job), image=str(tmp_path / "cut.img"), seed=1)
    assert any(n.startswith("w: stopped by the power cut:") for n in report.notes), report.notes
    assert any(n.startswith("fio jobs: the bytes their fsyncs made durable in 1 file were checked") for n in report.notes)
    if fsync == "honest":
        assert report.ok and report.fsck_clean, report.failures
        (after,) = [j for j in report.as_json()["jobs"] if j["jobname"] == "after"]
        assert after["error"] == 0 and after["write"]["io_bytes"] == 64 << 10
    else:
        assert not report.ok
        assert any("though an fsync made them durable" in f or "missing after the power cut" in f
                   for f in report.failures), report.failures


async def test_a_keyrace_job_says_it_ran_on_an_image_of_its_own(tmp_path, monkeypatch):
    """generic/595 makes its scratch filesystem, and so does a ``kind=keyrace`` job: its
    appends never reach the run's image. A newcomer put it beside ``kind=faults`` ``cut=50``
    and read "the run made 6 writes, so no power cut happened", the disk stats' 6 writes and
    "fsck: clean" as the race's, after 5,307 appends on another image. A note says so."""
    from blockemu.workload import keyrace, runner

    async def race(mode, **kw):
        return keyrace.RaceResult(mode, kw["seed"], kw["schedule"], attempted=1, acknowledged=1)

    monkeypatch.setattr(runner, "run_race", race)
    job = tmp_path / "race.fio"
    job.write_text("[race]\nkind=keyrace\nruntime=0.1\n[cut]\nkind=faults\nfaults=cut=50\n")
    report = await runner.run_workload(str(job), image=str(tmp_path / "r.img"), seed=1)
    assert any(n.startswith("race: the key-removal race ran on a scratch image of its own") for n in report.notes), \
        report.notes


async def test_run_key_removal_overrides_the_mounts_mode_and_each_keyrace_jobs(tmp_path, monkeypatch):
    """``run --list`` said to run generic-595 under each mode, but its mode was fixed in the
    scenario's file (a newcomer had to write a job file of their own): ``--key-removal MODE``
    sets the mount's ``key_removal=`` and each keyrace job's, as ``--runtime`` does runtimes."""
    from blockemu.workload import keyrace, runner

    modes = []

    async def race(mode, **kw):
        modes.append(mode)
        return keyrace.RaceResult(mode, kw["seed"], kw["schedule"], attempted=1, acknowledged=1)

    monkeypatch.setattr(runner, "run_race", race)
    job = tmp_path / "race.fio"
    job.write_text("[global]\nkey_removal=soft\n[own]\nkind=keyrace\nkey_removal=deny-writes\nruntime=0.1\n"
                   "[other]\nkind=keyrace\nruntime=0.1\n[w]\nrw=write\nsize=64k\n")
    assert runner.prepare(str(job), {"key_removal": "hard"}).globals["key_removal"] == "hard"
    await runner.run_workload(str(job), image=str(tmp_path / "r.img"), seed=1, overrides={"key_removal": "sync"})
    await runner.run_workload("generic-595", seed=1, overrides={"key_removal": "hard", "runtime": 0.1})
    assert modes == ["sync", "sync", "hard"]
