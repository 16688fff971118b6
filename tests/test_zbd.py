"""zonemode=zbd on regular files, as fio emulates it: the zone state machine against a model,
the job-file syntax, fio-style jobs checked from disk, and the OS's fio as the oracle of the
JSON layout."""
from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.check.fsck import check
from blockemu.cli.main import main
from blockemu.errors import InvalidArgument
from blockemu.fs.filesystem import mount
from blockemu.workload.fio import Clone
from blockemu.workload.jobfile import parse
from blockemu.workload.zones import ZonedFile, ZoneRange, region_in_zones
from tests.test_cli import run
from tests.test_fio import FIO, JOBS, same_layout

ZONE = 4096


def zone_range(zf: ZonedFile, start: int = 0, length: int | None = None, **kw) -> ZoneRange:
    length = len(zf.zones) * zf.zone_size - start if length is None else length
    return ZoneRange(zf, start, length, kw.pop("min_bs", (512, 512, ZONE)), **kw)


# --- the state machine against a model ----------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["write", "read", "trim", "begin"]), st.integers(0, 2),
                         st.integers(0, 16 * ZONE - 1), st.integers(1, 3)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, max_open=st.integers(0, 3), job_max=st.integers(0, 2), capacity=st.sampled_from([ZONE, 3072]),
       freq=st.sampled_from([0.0, 0.25]), verify=st.booleans(), random=st.booleans())
def test_zones_against_a_model(ops, max_open, job_max, capacity, freq, verify, random):
    """Three jobs on one 16-zone file (two overlapping regions): writes land only at a write
    pointer and never past the capacity, the open zones stay within both limits and inside
    the job's region, reads stay below the write pointer, resets empty a zone and are counted
    only when it had data, and the bytes with data are the sum of the write pointers."""
    zf = ZonedFile(16 * ZONE - 100, ZONE, capacity, max_open)  # the last zone runs past the file's end
    job_max = job_max if max_open else 0
    ranges = [zone_range(zf, 0, 8 * ZONE, random=random, verify=verify, job_max_open=job_max,
                         reset_frequency=freq, reset_threshold=0.5),
              zone_range(zf, 4 * ZONE, 12 * ZONE, random=random, job_max_open=job_max),
              zone_range(zf, 8 * ZONE, 8 * ZONE, random=not random, verify=verify)]
    wp = {z.start: z.start for z in zf.zones}  # the model: each zone's write pointer
    for op, j, offset, blocks in ops:
        zr = ranges[j]
        offset = zr.start + offset % zr.length
        before, resets = sum(r.resets for r in ranges), 0  # the resets of zones with data this op makes
        if op == "begin":
            zr.begin()
            if zr.verify:
                for i in range(zr.lo, zr.hi):
                    resets += wp[zf.zones[i].start] > zf.zones[i].start
                    wp[zf.zones[i].start] = zf.zones[i].start
        elif op == "write":
            placed = zr.write(offset, blocks * 512)
            if placed is not None:
                at, n = placed
                zone = zf.zones[zf.index(at)]
                assert zr.lo <= zf.index(at) < zr.hi and n % 512 == 0 and 0 < n <= blocks * 512
                assert at == wp[zone.start] or at == zone.start and wp[zone.start] > zone.start  # at the wp, or reset
                assert at + n <= zone.start + capacity
                resets += at == zone.start < wp[zone.start]
                wp[zone.start] = at + n
        elif op == "read":
            placed = zr.read(offset, blocks * 512)
            if placed is not None:
                at, n = placed
                zone = zf.zones[zf.index(at)]
                assert zone.start <= at and at + n <= wp[zone.start] and n > 0 and zr.lo <= zf.index(at) < zr.hi
            else:  # nothing to read: no zone of the region (from here on, for a sequential reader) has data
                later = range(zr.lo if zr.random else zf.index(offset) + 1, zr.hi)
                assert all(wp[zf.zones[i].start] - zf.zones[i].start < 512 for i in later)
        else:
            at = zr.trim(zf.start_of(zf.index(offset)))
            if at is not None:
                assert zr.lo <= zf.index(at) < zr.hi
                resets += wp[at] > at
                wp[at] = at
        assert {z.start: z.wp for z in zf.zones} == wp
        assert sum(r.resets for r in ranges) - before == resets
        assert zf.valid == sum(w - s for s, w in wp.items())
        assert len(zf.open) <= max_open if max_open else not zf.open
        assert all(r.opened <= r.job_max_open for r in ranges if r.job_max_open)
        assert sorted(zf.open) == sorted(i for i, z in enumerate(zf.zones) if z.opener is not None)
        assert all(zf.zones[i].wp < zf.zones[i].capacity_end for i in zf.open)  # a zone is closed once full
        assert all(z.opener.lo <= i < z.opener.hi for i, z in enumerate(zf.zones) if z.opener is not None)
        assert sum(r.opened for r in ranges) == len(zf.open)


def test_fresh_zones_are_empty_and_reads_skip_to_data():
    zf = ZonedFile(8 * ZONE, ZONE, 0, 0)
    seq, rnd = zone_range(zf), zone_range(zf, random=True)
    assert seq.read(0, 1024) is None and rnd.read(5 * ZONE, 1024) is None  # no data anywhere: the pass ends
    w = zone_range(zf)
    assert w.write(3 * ZONE + 777, 2048) == (3 * ZONE, 2048)  # at the write pointer, not where asked
    assert w.write(6 * ZONE, 1024) == (6 * ZONE, 1024)
    assert seq.read(0, 1024) == (3 * ZONE, 1024)  # the next zone with data
    assert seq.read(3 * ZONE + 1024, 1024) == (3 * ZONE + 1024, 1024)
    assert seq.read(3 * ZONE + 1024, 4096) == (3 * ZONE, 2048)  # longer than the zone's data: all of it
    assert seq.read(3 * ZONE + 2048, 1024) == (6 * ZONE, 1024)  # past it: on to the next zone with data
    assert seq.read(6 * ZONE + 1024, 512) is None
    assert rnd.read(5 * ZONE, 512)[0] == 6 * ZONE  # random: the nearest zone with data, either way
    assert rnd.read(4 * ZONE, 512)[0] == 3 * ZONE


def test_open_zone_limit_full_zones_and_resets():
    zf = ZonedFile(4 * ZONE, ZONE, 0, 1)
    zr = zone_range(zf, min_bs=(512, 2048, ZONE))
    assert zr.write(2 * ZONE, 2048) == (2 * ZONE, 2048) and zf.open == [2]
    assert zr.write(0, 2048) == (2 * ZONE + 2048, 2048)  # zone 0 cannot open: the open zone takes it
    assert zf.open == [] and zr.opened == 0  # the write that filled zone 2 closed it
    assert zr.write(2 * ZONE, 2048) == (2 * ZONE, 2048) and zr.resets == 1  # full: reset, then written
    assert zr.trim(2 * ZONE) == 2 * ZONE and zr.resets == 2 and zf.zones[2].wp == 2 * ZONE
    assert zr.trim(2 * ZONE) == 2 * ZONE and zr.resets == 2  # an empty zone's reset is not counted
    with pytest.raises(InvalidArgument, match="Trim offset not at zone start"):
        zr.trim(2 * ZONE + 512)
    with pytest.raises(InvalidArgument, match="exceeds zone size"):
        zr.write(0, 2 * ZONE)


def test_verify_resets_the_region_first_and_never_reuses_a_full_zone():
    zf = ZonedFile(2 * ZONE, ZONE, 0, 0)
    old = zone_range(zf)
    for _ in range(4):
        old.write(0, 2048)
    zr = zone_range(zf, verify=True)
    zr.begin()
    assert zr.resets == 1 and zf.valid == 0
    assert [zr.write(0, 2048) for _ in range(5)] == [(0, 2048), (2048, 2048), (ZONE, 2048), (ZONE + 2048, 2048),
                                                       None]  # both full: the job ends rather than reset data


def test_reset_frequency_capacity_and_region_rounding():
    zf = ZonedFile(4 * ZONE, ZONE, 0, 0)
    zr = zone_range(zf, min_bs=(512, 1024, ZONE), reset_threshold=0.0, reset_frequency=0.5)
    zr.begin()
    assert [zr.write(0, 1024) for _ in range(3)] == [(0, 1024), (0, 1024), (1024, 1024)]
    assert zr.resets == 1  # every second write resets its zone first (threshold 0: always over it)
    cap = ZonedFile(2 * ZONE, ZONE, 3072, 0)
    seq = zone_range(cap, min_bs=(512, 1024, ZONE))
    assert seq.skip_capacity_gap(3072) == ZONE and seq.skip_capacity_gap(1024) == 1024
    with pytest.raises(InvalidArgument, match="zone capacity 1024 smaller than minimum block size 2048"):
        zone_range(ZonedFile(2 * ZONE, ZONE, 1024, 0), min_bs=(512, 2048, ZONE)).write(0, 2048)
    assert region_in_zones(ZONE, 8, 100, 5 * ZONE, False, "f") == (ZONE, 4 * ZONE, [
        f"f: rounded up offset from 100 to {ZONE}", f"f: rounded down io_size from {5 * ZONE - ZONE + 100} to "
        f"{4 * ZONE}"])
    assert region_in_zones(ZONE, 8, 100, 5 * ZONE, True, "f") == (100, 5 * ZONE, [])  # a read job keeps its region
    with pytest.raises(InvalidArgument, match="io_size must be at least one zone"):
        region_in_zones(ZONE, 8, 100, ZONE, False, "f")
    for args, why in (((ZONE - 1, ZONE, 0, 0), "smaller than zone size"), ((ZONE, 256, 0, 0), "at least 512"),
                      ((ZONE, ZONE, ZONE + 1, 0), "zonecapacity")):
        with pytest.raises(InvalidArgument, match=why):
            ZonedFile(*args)


# --- job files -------------------------------------------------------------------------------------

def test_zone_counts_and_zbd_options_parse():
    jf = parse("[global]\nzonemode=zbd\nzonesize=256M\noffset=524z\n[w]\nrw=randwrite\nsize=128z\nmax_open_zones=8\n"
               "job_max_open_zones=2\nzonecapacity=200m\nread_beyond_wp=1\nzone_reset_threshold=0.5\n"
               "zone_reset_frequency=0.01\nignore_zone_limits=1\n", "z.fio")
    job = jf.jobs[0]
    assert job.get("offset") == 524 << 28 and job.get("size") == 128 << 28 and job.raw["size"] == "128z"
    assert (job.get("max_open_zones"), job.get("zonecapacity"), job.get("zone_reset_frequency")) == (8, 200 << 20, 0.01)
    with pytest.raises(InvalidArgument) as e:
        parse("[global]\noffset=524z\n[w]\nrw=randwrite\nsize=128z\nzone_reset_threshold=2\n", "z.fio")
    for what in ("z.fio:6: bad value for zone_reset_threshold", "z.fio:3: job w: size=128z is a number of zones",
                 "job w: offset=524z is a number of zones, which needs zonemode=zbd (or strided) and zonesize="):
        assert what in str(e.value)


def test_zbd_jobs_fio_refuses_are_refused_at_once(tmp_path):
    bad = tmp_path / "z.fio"
    bad.write_text("[global]\nzonemode=zbd\nfilename=/dev/z\nsize=1m\n[a]\nrw=randwrite\n[t]\nrw=randtrim\nzonesize=64k\n"
                   "bs=4k\n[v]\nrw=write\nzonesize=64k\nbs=24k\nverify=crc32c\njob_max_open_zones=2\nzoneskip=24k\n")
    p = run("run", str(bad), "--parse-only", check_rc=1)
    for why in ("job a: Specifying the zone size is mandatory", "job t: trim block size 4096 is not the zone size "
                "65536", "job v: block size 24576 is not a divisor of the zone size 65536",
                "job v: 'job_max_open_zones' cannot be used without a global open zones limit",
                "job v: zoneskip 24576 is not a multiple of the device zone size 65536"):
        assert why in p.stderr
    assert p.stderr.count("\n") == 1


# --- fio-style jobs through blockemu run, checked from disk ----------------------------------------

async def _zones_on_disk(image: str, zones: dict) -> dict[tuple[str, int], bytes]:
    out = {}
    async with mount(image) as fs:
        for path, info in zones.items():
            async with fs.open(path) as f:
                for start, n in info["written"].items():
                    out[(path, int(start))] = await f.pread(n, int(start))
    return out


# I/Os per clone of each section (``number_ios``) replacing the job files' time-based runs: a
# one-second run under load (a machine at load 10+) wrote nothing the trimmer had not reset, and
# the zones reported were none. The trimmer ends first (its ~4 trims within ~64 of the writer's
# 16-per-trim flow), so the writer's last ~100 writes land after every reset.
COUNTED = {"zbd-rand-write": {"global": 64}, "zbd-rand-write-trim-gc": {"warmup": 32, "wjob": 160, "trimjob": 4},
           "zbd-seq-read": {}}


def counted_job(name: str, tmp_path: Path) -> Path:
    """The job file with its time-based runs (``time_based``, ``runtime``) driven by counts instead."""
    lines = []
    for line in (JOBS / f"{name}.fio").read_text().splitlines():
        if line.strip() == "time_based" or line.startswith("runtime="):
            continue
        lines.append(line)
        section = line.strip()[1:-1] if line.startswith("[") else None
        if section in COUNTED[name]:
            lines.append(f"number_ios={COUNTED[name][section]}")
    job = tmp_path / f"{name}.fio"
    job.write_text("\n".join(lines) + "\n")
    return job


@pytest.mark.parametrize("name", list(COUNTED))
def test_zbd_jobs_leave_each_zone_holding_what_was_written_below_its_write_pointer(tmp_path, monkeypatch, capsys,
                                                                                    name):
    """Each fio-style zbd job file, run by ``blockemu run --size 4m`` with its time-based runs
    driven by I/O counts (``counted_job``: nothing here depends on the machine's speed): every
    write was issued at its zone's write pointer (or at the zone's start after a reset), and
    after the run, from the image mounted afresh, every zone holds below its write pointer
    exactly the bytes last written there; fsck is clean."""
    writes: list[tuple[str, int, bytes]] = []  # every write's data, in the order issued
    made = Clone._buffer

    def recorded(self, io):
        data = made(self, io)
        writes.append((io.region.path, io.offset, data))
        return data
    monkeypatch.setattr(Clone, "_buffer", recorded)
    image = str(tmp_path / "z.img")
    assert main(["run", str(counted_job(name, tmp_path)), "--size", "4m", "--image", image, "--seed", "1",
                 "--output-format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["blockemu"]["ok"] and out["blockemu"]["fsck_clean"], out["blockemu"]["failures"]
    zones = out["blockemu"]["zones"]
    size = {p: z["zone_size"] for p, z in zones.items()}
    wp: dict[tuple[str, int], int] = {}
    for path, at, data in writes:
        start = at - at % size[path]
        assert at in (wp.get((path, start), start), start), (path, at)  # at the write pointer, or a reset zone's start
        assert at + len(data) <= start + size[path]
        wp[(path, start)] = at + len(data)
    reported = {(p, int(s)): n for p, z in zones.items() for s, n in z["written"].items()}
    assert reported and all(wp[k] - k[1] == n for k, n in reported.items())
    disk = asyncio.run(_zones_on_disk(image, zones))
    for (path, start), n in reported.items():
        want = bytearray(n)
        for p, at, data in writes:
            if p == path and start <= at < start + n:
                want[at - start: at - start + len(data)] = data[: start + n - at]
        assert disk[(path, start)] == want, (path, start)
    assert check(image).clean
    if name == "zbd-seq-read":  # the reader read exactly the data below the write pointers, nothing else
        assert out["jobs"][1]["read"]["io_bytes"] == sum(reported.values()) > 0
    if name == "zbd-rand-write-trim-gc":
        assert out["jobs"][0]["trim"]["total_ios"] > 0 and out["jobs"][0]["blockemu"]["zone_resets"] > 0


def test_a_device_past_a_hundred_gib_stays_sparse(tmp_path):
    """zbd-seq-read's offset (524 zones of 256 MiB, 131 GiB): the file is extended sparse,
    nothing is laid out, the image stays small and the (empty) zones give the reader nothing,
    so, as in fio's output, the job has no block of figures."""
    job = tmp_path / "far.fio"
    job.write_text("[r]\nzonemode=zbd\nzonesize=256M\nfilename=/dev/sdd\noffset=140660178944\nsize=10G\nrw=read\n"
                   "read_beyond_wp=0\nbs=256k\n")
    image = tmp_path / "far.img"
    text = run("run", str(job), "--image", str(image)).stdout
    assert "r: (g=0): rw=read" in text and "(groupid=" not in text  # as fio: no block for a job that did nothing
    assert "fsck: clean" in text
    assert image.stat().st_blocks * 512 < 64 << 20
    ls = json.loads(run("ls", str(image), "/dev", "-l", "--json").stdout)
    assert [e["size"] for e in ls] == [140660178944 + (10 << 30)]


@pytest.mark.skipif(FIO is None, reason="the OS's fio is not installed (apt-get install fio; .ci/run does)")
def test_zbd_json_keys_and_text_match_the_real_fio(tmp_path):
    """A zbd job on a host file through the OS's fio, and through blockemu: the same JSON keys
    (ours add only ``blockemu``), and the write line's zone-reset count in the text output."""
    job = tmp_path / "z.fio"
    job.write_text(f"""[global]
directory={tmp_path}
filename=zoned
zonemode=zbd
zonesize=64k
max_open_zones=2
bs=16k
[w]
rw=randwrite
size=1m
io_size=2m
[r]
stonewall
rw=randread
size=1m
""")
    (tmp_path / "zoned").write_bytes(b"\0" * (1 << 20))  # fio emulates zones in an existing file only
    theirs = json.loads(subprocess.run([FIO, "--output-format=json", str(job)], capture_output=True, text=True,
                                       timeout=120, cwd=tmp_path, check=True).stdout)
    ours = json.loads(run("run", str(job), "--output-format", "json", "--seed", "1").stdout)
    assert [j["jobname"] for j in ours["jobs"]] == [j["jobname"] for j in theirs["jobs"]]
    mine, fios = same_layout(ours, theirs)
    assert mine == fios, mine ^ fios
    for out in (ours, theirs):  # io_size=2m over a 1m region of 64k zones: some zones were reset
        assert out["jobs"][0]["write"]["io_bytes"] == 2 << 20
        assert 0 < out["jobs"][1]["read"]["io_bytes"] <= 1 << 20
    text = run("run", str(job), "--seed", "1").stdout
    assert "zone resets" in text.splitlines()[[i for i, line in enumerate(text.splitlines())
                                                if line.strip().startswith("write:")][0]]


async def test_a_write_after_a_reset_lands_after_the_older_write_to_those_bytes(tmp_path, monkeypatch):
    """Two writes in flight (libaio, iodepth=2) to the one zone: the second comes after the
    zone was reset, to the bytes the first is still writing. The first is held until the
    second has landed -- unless the second waits for it, as it must: the zone then holds
    the second write's bytes, as its write pointer says."""
    from blockemu.fs.filesystem import File
    from blockemu.workload.fio import RunContext
    from blockemu.workload.runner import run_workload
    job = tmp_path / "z.fio"
    job.write_text("[w]\nzonemode=zbd\nzonesize=16k\nfilename=/dev/z\nrw=randwrite\nbs=16k\nsize=16k\nio_size=32k\n"
                   "ioengine=libaio\niodepth=2\n")
    released, calls, data = asyncio.Event(), [], []
    write, issued, made = File.pwrite, RunContext.issued, Clone._buffer

    async def pwrite(self, buf, offset):
        calls.append(offset)
        if len(calls) == 1:  # the first write: held
            await released.wait()
        n = await write(self, buf, offset)
        if len(calls) == 2:
            released.set()
        return n

    def issue(self, io, task):
        issued(self, io, task)
        if io.after:  # the second write waits for the first: nothing to hold the first for
            released.set()

    def buffer(self, io):
        data.append(made(self, io))
        return data[-1]
    monkeypatch.setattr(File, "pwrite", pwrite)
    monkeypatch.setattr(RunContext, "issued", issue)
    monkeypatch.setattr(Clone, "_buffer", buffer)
    image = str(tmp_path / "z.img")
    out = (await run_workload(str(job), image=image, seed=1)).as_json()
    assert out["blockemu"]["ok"] and out["jobs"][0]["blockemu"]["zone_resets"] == 1 and len(data) == 2
    async with mount(image) as fs:
        async with fs.open("/dev/z") as f:
            assert await f.pread(16 << 10, 0) == data[1]


async def test_a_mixed_job_writes_until_there_is_data_to_read_and_a_short_region_wraps(tmp_path):
    """rw=randrw on empty zones: a read with nothing to read becomes a write (fio's
    zbd_adjust_ddir), so the job does its whole budget; a sequential writer whose region
    ends before the file's end wraps, resetting the zone it comes back to, as fio does."""
    from tests.test_fio import run_job
    out, _ = await run_job(tmp_path, "[m]\nzonemode=zbd\nzonesize=64k\nfilename=/dev/z\nbs=4k\nrw=randrw\nsize=1m\n")
    m = out["jobs"][0]
    assert m["read"]["io_bytes"] > 0 and m["read"]["io_bytes"] + m["write"]["io_bytes"] == 1 << 20
    out, _ = await run_job(tmp_path, "[global]\nzonemode=zbd\nzonesize=64k\nfilename=/dev/y\nbs=16k\n[big]\nrw=write\n"
                                     "size=256k\nio_size=16k\n[w]\nstonewall\nrw=write\nsize=64k\nio_size=128k\n")
    assert out["jobs"][1]["write"]["io_bytes"] == 128 << 10 and out["jobs"][1]["blockemu"]["zone_resets"] == 2  # as fio


def test_a_writer_off_zone_boundaries_is_cut_to_whole_zones_and_says_so_as_fio_does(tmp_path):
    job = tmp_path / "q.fio"
    job.write_text("[w]\nfilename=/dev/q\nzonemode=zbd\nzonesize=64k\nbs=4k\nrw=randwrite\noffset=100k\nsize=500k\n")
    lines = run("run", str(job), "--seed", "1").stdout.splitlines()
    at = lines.index("/dev/q: rounded up offset from 102400 to 131072")  # fio's lines, in fio's order
    assert lines[at + 1] == "/dev/q: rounded down io_size from 483328 to 458752"
    assert any(line.strip().startswith("write: IOPS=") and "(448KiB/" in line and line.endswith("; 0 zone resets")
               for line in lines)


async def test_a_trim_resets_its_zone_and_leaves_the_bytes_as_fio_leaves_them_in_a_regular_file(tmp_path):
    from tests.test_fio import run_job
    out, image = await run_job(tmp_path, "[global]\nfilename=/dev/t\nzonemode=zbd\nzonesize=64k\n[w]\nrw=write\nbs=16k\n"
                                         "size=256k\nbuffer_pattern=0x5a\n[t]\nstonewall\nrw=trim\nbs=64k\nsize=256k\n")
    assert out["jobs"][1]["trim"]["total_ios"] == 4 and out["jobs"][1]["blockemu"]["zone_resets"] == 4
    assert out["blockemu"]["zones"]["/dev/t"]["written"] == {}  # every write pointer back at its zone's start
    async with mount(image) as fs:
        async with fs.open("/dev/t") as f:
            assert await f.pread(256 << 10, 0) == b"\x5a" * (256 << 10)  # not punched: a reset moves the pointer only


async def test_zoneskip_walks_the_zones_as_fio_does(tmp_path, monkeypatch):
    """Sequential zbd jobs with zoneskip: the offsets fio 3.33 issues for this job file
    (recorded with write_iolog on a 512 KiB host file) -- a zone, a zone skipped, wrapping at
    the end and resetting the zones it comes back to; a reader skipping two zones lands on
    the next zone with data."""
    from tests.test_fio import run_job
    issued: list[tuple[str, int]] = []
    do = Clone._do

    async def recorded(self, io, data):
        issued.append((self.job.name, io.offset >> 10))
        return await do(self, io, data)
    monkeypatch.setattr(Clone, "_do", recorded)
    out, _ = await run_job(tmp_path, "[global]\nfilename=/dev/s\nzonemode=zbd\nzonesize=64k\nbs=16k\nzoneskip=64k\n"
                                     "[w]\nrw=write\nsize=512k\nio_size=384k\n[r]\nstonewall\nrw=read\nsize=512k\n"
                                     "zoneskip=128k\nio_size=256k\n")
    assert [o for n, o in issued if n == "w"] == [0, 16, 32, 48, 128, 144, 160, 176, 256, 272, 288, 304, 384, 400, 416,
                                                  432, 0, 16, 32, 48, 128, 144, 160, 176]
    assert [o for n, o in issued if n == "r"] == [0, 16, 32, 48, 256, 272, 288, 304, 384, 400, 416, 432, 0, 16, 32, 48]
    assert out["jobs"][0]["blockemu"]["zone_resets"] == 2
