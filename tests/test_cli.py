"""The command-line contract (DESIGN §6), run as a user runs it: a real subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from blockemu.ondisk.structs import SUPER_OFFSETS


def run(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "blockemu", *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def image(tmp_path) -> str:
    path = str(tmp_path / "a.img")
    run("mkfs", path, "--size", "96M", "--label", "tests", "--uuid", "11111111-2222-3333-4444-555555555555")
    return path


def test_mkfs_then_dump_super_json(image):
    d = json.loads(run("inspect", "dump-super", image, "--json").stdout)
    assert d["label"] == "tests" and d["fsid"] == "11111111-2222-3333-4444-555555555555"
    assert d["generation"] == 1 and d["total_bytes"] == 96 << 20 and d["nodesize"] == 16384
    assert d["csum_type_name"] == "crc32c" and d["csum_match"] is True and d["magic"] == "_BEmU_v1"
    assert len(d["backup_roots"]) == 4 and d["backup_roots"][1]["tree_root"] == d["root"]
    assert {"bytenr", "flags", "bytes_used", "sectorsize", "root_level", "incompat_flags"} <= d.keys()


def test_mirror_written_when_it_fits(image):
    with open(image, "rb") as f:
        f.seek(SUPER_OFFSETS[1] + 0x40)
        assert f.read(8) == b"_BEmU_v1"


def test_dump_tree_json_and_text(image):
    blocks = json.loads(run("inspect", "dump-tree", image, "--json").stdout)
    assert {b["tree"] for b in blocks} == {"root", "extent", "fs", "csum", "free-space"}
    fs = next(b for b in blocks if b["tree"] == "fs")
    assert {"bytenr", "level", "generation", "owner", "nritems", "items"} <= fs.keys()
    assert fs["items"][0]["key"] == [256, 1, 0] and fs["items"][0]["data"]["mode"] == "0o40755"
    with open(image, "rb") as f:  # bytenr is the byte offset in the image file
        f.seek(fs["bytenr"] + 0x30)
        assert int.from_bytes(f.read(8), "little") == fs["bytenr"]
    text = run("inspect", "dump-tree", image, "--tree", "fs").stdout
    assert "leaf" in text and "(256 INODE_ITEM 0)" in text and "extent tree" not in text
    # the log tree asked for on an image with no fsync log: said, not an empty output
    assert run("inspect", "dump-tree", image, "--tree", "log").stdout == (
        "log tree: none (no fsync log to replay: the image is its last full commit)\n")


def test_fsck_clean_json_and_never_writes(image):
    before = sha(image)
    p = run("fsck", image, "--json")
    d = json.loads(p.stdout)
    assert d["clean"] is True and d["errors"] == [] and d["generation"] == 1 and d["image"] == image
    assert "found" in run("fsck", image).stdout
    assert sha(image) == before


def test_fsck_reports_a_corrupt_tree_block(image):
    blocks = json.loads(run("inspect", "dump-tree", image, "--json", "--tree", "fs").stdout)
    with open(image, "r+b") as f:
        f.seek(blocks[0]["bytenr"] + 500)
        f.write(b"\xde\xad")
    before = sha(image)
    d = json.loads(run("fsck", image, "--json", check_rc=4).stdout)
    assert not d["clean"] and "CSUM_MISMATCH" in {e["code"] for e in d["errors"]}
    err = next(e for e in d["errors"] if e["code"] == "CSUM_MISMATCH")
    assert err["bytenr"] == blocks[0]["bytenr"] and err["tree"] == "fs"
    assert sha(image) == before
    # --repair cannot work around a damaged block: it says so (it used to exit 4 in silence)
    p = run("fsck", image, "--repair", check_rc=4)
    assert "note: --repair wrote nothing: tree blocks are damaged" in p.stdout and sha(image) == before


def test_fsck_falls_back_to_a_mirror(image):
    with open(image, "r+b") as f:
        f.seek(SUPER_OFFSETS[0] + 0x100)
        f.write(b"garbage")
    d = json.loads(run("fsck", image, "--json", check_rc=4).stdout)
    assert [e["code"] for e in d["errors"]] == ["SUPERBLOCK"] and d["generation"] == 1


@pytest.mark.parametrize("content", [b"", b"\0" * 100, os.urandom(1 << 20)])
def test_fsck_of_non_images_is_operational_error(tmp_path, content):
    path = tmp_path / "junk.img"
    path.write_bytes(content)
    p = run("fsck", str(path), check_rc=8)
    assert p.stderr.startswith("blockemu: fsck: ") and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, says", [
    (["--size", "12Q"], "argument --size: bad size '12Q': expected a number with an optional K/M/G/T/P suffix"),
    (["--size", "abc"], "argument --size: bad size 'abc': expected a number with an optional K/M/G/T/P suffix"),
    (["--node-size", "big"], "argument --node-size: bad size 'big'"),
    (["--size", "1K"], "size 1K is too small: the minimum is 16M"),
    (["--size", "1M"], "size 1M is too small"),
    (["--node-size", "3K"], "node size 3072 must be a power of two from 4K to 64K"),
    (["--node-size", "128K"], "node size 131072 must be a power of two"),
    (["--uuid", "nope"], "bad uuid 'nope'"),
    (["--label", "L" * 256], "label must be under 256 bytes and on one line"),
    (["--csum", "md5"], "argument --csum: invalid choice: 'md5'"),
])
def test_a_bad_mkfs_value_is_a_usage_error(tmp_path, flags, says):
    """Every bad value is the command line's fault, as DESIGN §6 has it: one usage line, exit 2,
    nothing made. Out-of-range ones (--size 1K, --node-size 3K, a bad --uuid, a too-long
    --label) used to exit 1 while a bad --csum exited 2."""
    img = tmp_path / "b.img"
    flags = ["--size", "64M", *flags] if "--size" not in flags else flags
    err = run("mkfs", str(img), *flags, check_rc=2).stderr
    assert err.startswith("blockemu: usage: blockemu mkfs: ") and says in err and err.count("\n") == 1, err
    assert not img.exists()


def test_bad_input_gets_one_line(tmp_path, image):
    assert run("fsck", str(tmp_path / "missing.img"), check_rc=8).stderr.count("\n") == 1
    assert run("fsck", str(tmp_path), check_rc=8).stderr.count("\n") == 1
    assert run("fsck", check_rc=16).stderr.startswith("blockemu: usage:")
    assert run("fsck", image, "--bogus", check_rc=16).returncode == 16
    assert run("inspect", "dump-super", str(tmp_path / "missing.img"), check_rc=1).stderr.count("\n") == 1
    # a host file the command cannot make is named first, as put's and --key-file's are
    out = str(tmp_path / "no-dir" / "map.png")
    assert run("inspect", "heatmap", image, out, check_rc=1).stderr == (
        f"blockemu: inspect: {out}: No such file or directory\n")
    # a suffix matplotlib cannot write was a traceback once the image was walked: now a usage line first
    txt = str(tmp_path / "map.txt")
    err = run("inspect", "heatmap", image, txt, check_rc=2).stderr
    assert err.startswith(f"blockemu: usage: blockemu inspect heatmap: {txt}: matplotlib cannot write .txt pictures")
    assert not os.path.exists(txt)
    # no suffix: savefig appended ".png" and drew beside the name given (even /dev/full.png), a directory too
    bare = tmp_path / "map"
    run("inspect", "heatmap", image, str(bare))
    assert bare.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not os.path.exists(f"{bare}.png")
    assert run("inspect", "heatmap", image, str(tmp_path), check_rc=1).stderr == (
        f"blockemu: inspect: {tmp_path}: Is a directory\n")
    assert not os.path.exists(f"{tmp_path}.png")


def test_mkfs_refuses_to_overwrite_without_force(image):
    before = sha(image)
    p = run("mkfs", image, "--size", "64M", check_rc=1)
    assert "--force" in p.stderr and sha(image) == before
    run("mkfs", image, "--size", "64M", "--force", "--csum", "blake2b", "--node-size", "64K")
    d = json.loads(run("inspect", "dump-super", image, "--json").stdout)
    assert d["csum_type_name"] == "blake2b" and d["nodesize"] == 65536 and d["total_bytes"] == 64 << 20
    assert run("fsck", image).returncode == 0


def test_truncated_image_is_reported_not_crashed(image, tmp_path):
    short = tmp_path / "short.img"
    short.write_bytes(open(image, "rb").read(2 << 20))
    p = run("fsck", str(short), "--json", check_rc=4)
    assert "truncated" in p.stdout


def test_repair_of_a_truncated_image_restores_its_size_or_says_why_not(image, tmp_path):
    """An image one byte short (only free space cut off) made --repair loop four rounds, write
    nothing and exit 4 with "repaired: 0" and no word why. Now it restores the file's size (the
    cut-off space was free: nothing is guessed), and fsck is clean; an image cut through its tree
    blocks is left as it is, and the note says so."""
    short = tmp_path / "short.img"
    os.truncate(image, (96 << 20) - 1)
    p = run("fsck", image, "--repair", check_rc=1)
    assert "repaired: [SUPERBLOCK] image truncated" in p.stdout, p.stdout
    assert os.path.getsize(image) == 96 << 20
    run("fsck", image)
    short.write_bytes(open(image, "rb").read(1 << 20))
    before = sha(short)
    p = run("fsck", str(short), "--repair", check_rc=4)
    assert "note: --repair wrote nothing: the image is truncated" in p.stdout, p.stdout
    assert sha(short) == before


def test_one_tib_sparse_image_is_fast_and_small(tmp_path):
    path = tmp_path / "big.img"
    t = time.perf_counter()
    run("mkfs", str(path), "--size", "1T")
    assert time.perf_counter() - t < 5  # including interpreter start-up
    assert os.stat(path).st_blocks * 512 < 4 << 20
    d = json.loads(run("fsck", str(path), "--json").stdout)
    assert d["clean"]


@pytest.mark.parametrize("csum", ["crc32c", "xxhash64", "sha256", "blake2b"])
async def test_every_checksum_type_round_trips(tmp_path, csum):
    import blockemu

    path = str(tmp_path / f"{csum}.img")
    await blockemu.mkfs(path, size="32M", csum=csum, node_size="4K")
    report = await blockemu.fsck(path)
    assert report.clean, report.errors


def test_console_scripts_exist():
    bindir = os.path.dirname(sys.executable)
    for name in ("blockemu", "mkfs.blockemu", "fsck.blockemu"):
        assert os.path.exists(os.path.join(bindir, name)), name


@pytest.mark.parametrize("script", ["mkfs.blockemu", "fsck.blockemu"])
def test_the_fsck_and_mkfs_scripts_name_themselves_in_their_usage(script):
    """``fsck.blockemu --help`` said ``usage: blockemu fsck``, a command the user did not type."""
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), script), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"usage: {script} ")


def fsck_blockemu(*args: str, check_rc: int) -> subprocess.CompletedProcess:
    """The ``fsck.blockemu`` script, as fsck(8) runs it."""
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fsck.blockemu"), *args],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr and p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.mark.parametrize("flags", [["-y"], ["-p"], ["-a"], ["-fy"], ["-f", "-p"], ["-p", "-a"], ["-y", "-y"]])
def test_fsck_blockemu_takes_e2fscks_repairing_flags(image, flags):
    """fsck(8) runs ``fsck.TYPE -a`` / ``-p`` at boot: they were usage errors (16). Each repairs
    as --repair does (an image one byte short: its size restored, exit 1), ``-f`` with them."""
    os.truncate(image, (96 << 20) - 1)
    p = fsck_blockemu(*flags, image, check_rc=1)
    assert "repaired: [SUPERBLOCK] image truncated" in p.stdout and os.path.getsize(image) == 96 << 20
    fsck_blockemu("-f", image, check_rc=0)


def test_fsck_blockemu_n_only_checks_and_refuses_a_repairing_flag(image):
    """``-n`` checks and never writes (exit 4, the image's bytes as they were); ``-n`` with
    ``-y`` (or --repair) is refused before the image is opened -- and so is ``-p`` (or ``-a``)
    with ``-y``, which repaired -- with e2fsck's exit for it, 8: its "only one of the options"
    is a ``fatal_error`` (FSCK_ERROR), not its ``usage()`` (16)."""
    os.truncate(image, (96 << 20) - 1)
    before = sha(image)
    for flags in (["-n"], ["-fn"]):
        assert "truncated" in fsck_blockemu(*flags, image, check_rc=4).stdout
    for flags in (["-n", "-y"], ["-ny"], ["-n", "--repair"], ["-p", "-n"], ["-p", "-y"], ["-ya"], ["-p", "--repair"]):
        p = fsck_blockemu(*flags, image, check_rc=8)
        assert p.stderr == ("blockemu: fsck: only one of the options -p/-a, -n or -y (--repair) "
                            "may be specified\n"), p.stderr
    assert sha(image) == before
    assert "unrecognized arguments: -y" in run("fsck", image, "-y", check_rc=16).stderr  # blockemu fsck: its own only


@pytest.mark.parametrize("flags, drawn", [([], True), (["-C", "0"], True), (["-C0"], True), (["-C", "3"], False),
                                           (["-C", "-3"], False)])
def test_fsck_blockemu_takes_fsck8s_progress_fd(image, monkeypatch, capsys, flags, drawn):
    """fsck(8) passes ``-C FD`` for progress (it was a usage error): FD 0 asks for e2fsck's bar,
    drawn as without the flag (stderr a terminal here); any other FD -- e2fsck's progress lines
    for a program, which fsck.blockemu does not write -- draws none."""
    import blockemu.display
    from blockemu.cli.main import main

    bars, bar = [], blockemu.display.bar

    def recorded(description: str, total: int | None, enabled: bool):
        bars.append(enabled)
        return bar(description, total, False)
    monkeypatch.setattr(blockemu.display, "bar", recorded)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["fsck", *flags, image], "fsck.blockemu") == 0
    assert bars == [drawn] and capsys.readouterr().err == ""


@pytest.mark.parametrize("fd", ["9", "-9", "99999999999", "-99999999999"])
def test_fsck_blockemu_refuses_a_progress_fd_that_is_not_open(image, fd):
    """``-C FD`` naming a descriptor that is not open was taken silently; e2fsck validates it
    (a ``dup`` of its absolute value, a negative FD only turning the progress off) and refuses
    with ``fatal_error``: exit 8, before the image is opened. A number past a C int names no
    descriptor either: ``os.fstat`` raised OverflowError, a traceback (review27)."""
    before = sha(image)
    p = fsck_blockemu("-n", "-C", fd, image, check_rc=8)
    assert p.stderr == ("blockemu: fsck: -C " + fd + ": invalid completion information file descriptor: "
                        f"descriptor {fd.lstrip('-')} is not open (Bad file descriptor)\n"), p.stderr
    assert sha(image) == before


@pytest.mark.parametrize("fd", ["abc", "", "x1", "\u0663", "\u00a05"])
def test_fsck_blockemu_refuses_a_non_numeric_progress_fd_as_e2fsck_does(image, fd):
    """``-C abc`` was argparse's usage error, exit 16; e2fsck reads ``-C`` with sscanf("%d") and
    refuses what has no number with "Invalid non-numeric argument to -C", exit(1) (e2fsprogs
    ``e2fsck/unix.c``, PRS's sscanf_err), before the image is opened. Its digits and blanks are
    ASCII ones: an Arabic-Indic three, or a no-break space before a 5, was read as a number
    (Python's ``\\d``, ``\\s``) and refused as a closed FD 3 or 5, exit 8 (review32)."""
    before = sha(image)
    p = fsck_blockemu("-n", "-C", fd, image, check_rc=1)
    assert p.stderr == f'blockemu: usage: fsck.blockemu: invalid non-numeric argument to -C ("{fd}")\n', p.stderr
    assert sha(image) == before


def test_fsck_blockemu_reads_the_progress_fds_leading_number_as_e2fsck_does(image):
    """sscanf("%d") takes the number a ``-C`` argument starts with: ``-C 0x`` is FD 0 (a check)."""
    assert "no error found" in fsck_blockemu("-n", "-C", " 0x", image, check_rc=0).stdout


@pytest.mark.parametrize("argv, says", [
    (["crash", "--limit", "1", "--shard-size", "0"], "--shard-size: 0 is out of range: at least 1"),
    (["crash", "--limit", "-1"], "--limit: -1 is out of range: at least 1"),
    (["crash", "--max-ops", "9", "--limit", "1"], "--max-ops: 9 is out of range: from 1 to 6"),
    (["crash", "--jobs", "0"], "--jobs: 0 is out of range: at least 1"),
    (["crash", "--workloads", "5..3"], "--workloads: empty range '5..3'"),
    (["crash", "--workloads", "x"], "--workloads: 'x' is not A..B nor A"),
    # past the campaign's end: 0 workloads checked, exit 0 -- a typo passed for a clean campaign
    (["crash", "--max-ops", "1", "--workloads", "500..600"],
     "--workloads 500..600: this campaign has workloads 0..13 (11 of Ace's, 2 of fsync groups)"),
    # each Ray worker writes its images on its own node, from a cwd of Ray's: a relative DIR names no shared place
    (["crash", "--ray", "--keep-failed", "kept"], "--keep-failed kept with --ray: give an absolute DIR that every "
                                                  "node reaches (a shared file system)"),
    (["stress", "s.img", "--crash-points", "-1"], "--crash-points: -1 is out of range: at least 0"),
    (["stress", "s.img", "--tasks", "0"], "--tasks: 0 is out of range: at least 1"),
    (["stress", "s.img", "--duration", "0"], "--duration: 0 is out of range: more than 0 seconds"),
    (["fuzz", "--trials", "-3"], "--trials: -3 is out of range: at least 1"),
    # every image failed, "grew the process by 0 MB ..., over -1.0 MB"
    (["fuzz", "--structural", "--max-rss", "-1"], "--max-rss: -1 is out of range: more than 0 MB"),
    (["run", "seqwrite", "--size", "0"], "--size: 0 is out of range: more than 0"),  # it asked for --size
    (["run", "seqwrite", "--runtime", "-1"], "--runtime: bad value '-1' (a time is at least 0)"),  # no reason given
    (["run", "seqwrite", "--size", "10Q"],  # the size parser's sentence, as mkfs's, not a bare "bad value"
     "--size: bad size '10Q': expected a number with an optional K/M/G/T/P suffix"),
    # a fault spec: flip=2 flipped every sector and failed the mix, eio=5M-1M injected nothing, and a bad
    # spec exited 1 once the image was made
    (["stress", "s.img", "--faults", "flip=2"], "--faults: bad fault spec: 'flip=2': a probability from 0 to 1"),
    (["stress", "s.img", "--faults", "torn=-0.5"], "--faults: bad fault spec: 'torn=-0.5': a probability from 0 to 1"),
    (["stress", "s.img", "--faults", "flip=nan"], "--faults: bad fault spec: 'flip=nan': a probability from 0 to 1"),
    (["stress", "s.img", "--faults", "latency=inf"], "--faults: bad fault spec: 'latency=inf': seconds, 0 or more"),
    (["stress", "s.img", "--faults", "eio=5M-1M:w"], "--faults: bad fault spec: 'eio=5M-1M:w': START must be below END"),
    (["stress", "s.img", "--faults", "cut=-3"], "--faults: bad fault spec: 'cut=-3': a number of writes, 0 or more"),
    (["stress", "s.img", "--faults", "bogus=1"], "--faults: bad fault spec: unknown fault 'bogus'"),
    # the free race runs for a time, the seeded one for a number of steps: the other bound was ignored
    (["stress", "s.img", "--scenario", "key-removal-race", "--ops", "10"],
     "--ops counts the steps of --schedule seeded; the free race runs for --duration S (default 5)"),
    (["stress", "s.img", "--scenario", "key-removal-race", "--schedule", "seeded", "--duration", "1"],
     "--duration bounds the free race; --schedule seeded runs --ops N steps (default 300)"),
])
def test_a_count_out_of_range_is_a_usage_line_not_a_traceback_nor_an_empty_run(tmp_path, argv, says):
    """Counts checked where they are parsed: --shard-size 0 and --limit -1 were tracebacks deep in
    the run, --max-ops 9 enumerated every workload until the kernel killed it, --jobs 0 and
    --tasks 0 ran nothing and exited 0, --duration 0 ran the default op count."""
    p = subprocess.run([sys.executable, "-m", "blockemu", *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (p.returncode, p.stdout) == (2, "") and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "s.img") and not os.path.exists(tmp_path / "kept")


def test_heatmap_refuses_to_draw_over_the_image(image, tmp_path):
    """A read-only inspection never writes the image: ``heatmap disk.raw disk.raw`` (matplotlib
    writes .raw pictures) or an OUT that is a link to the image drew the picture over it, and the
    image was gone. Refused before drawing, EINVAL, exit 1; the image is as it was."""
    raw = tmp_path / "disk.raw"
    os.rename(image, raw)
    (tmp_path / "link.png").symlink_to(raw)
    before = sha(raw)
    for out in (raw, tmp_path / "link.png"):
        assert run("inspect", "heatmap", str(raw), str(out), check_rc=1).stderr == (
            f"blockemu: inspect: {out}: is the image itself (the picture would overwrite it)\n")
    assert sha(raw) == before


def test_heatmap_without_matplotlib_names_the_extra(image, tmp_path):
    """numpy, which comes with matplotlib, was imported first: a ModuleNotFoundError traceback.
    Then it exited 1 after walking the whole image; now a usage error before it, as stress --report."""
    code = ("import sys; sys.modules['matplotlib'] = sys.modules['numpy'] = None; from blockemu.cli.main import main; "
            f"sys.exit(main(['inspect', 'heatmap', {image!r}, {str(tmp_path / 'h.png')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("blockemu: usage: blockemu inspect heatmap: drawing needs matplotlib")
    assert "pip install 'blockemu[report]'" in p.stderr and p.returncode == 2


def test_stress_report_without_matplotlib_is_refused_before_the_race(tmp_path):
    """It ran the whole race (and made the image and DIR) before finding matplotlib missing."""
    img, out = tmp_path / "r.img", tmp_path / "rep"
    code = ("import sys; sys.modules['matplotlib'] = sys.modules['numpy'] = None; from blockemu.cli.main import main; "
            f"sys.exit(main(['stress', {str(img)!r}, '--scenario', 'key-removal-race', '--duration', '0.5', "
            f"'--report', {str(out)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (
        2, "", "blockemu: usage: blockemu stress: --report: drawing needs matplotlib: pip install 'blockemu[report]'\n")
    assert not img.exists() and not out.exists()


def test_ctrl_c_in_fsck_exits_32_as_e2fsck(image):
    """e2fsck's 32, "canceled by user request" (README, DESIGN §6): a real SIGINT, raised by the
    process in its own main thread halfway through the check (as the extents pass starts), not a
    timed kill. (``os.kill`` of its own pid let the kernel pick another thread, whose handler
    could run after the pass had gone on: flaky under load.) Python's own SIGINT handler is put
    back first, as a terminal gives it: a suite run from a background job inherits SIGINT
    ignored, and Python then installs none."""
    code = ("import signal, sys; from blockemu.check import fsck; from blockemu.cli.main import main; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "fsck.Checker.check_extents = lambda self, sb: signal.raise_signal(signal.SIGINT); "
            f"sys.exit(main(['fsck', {image!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (32, "", "blockemu: fsck: interrupted\n")


def test_ctrl_c_with_json_prints_the_error_object(image):
    """--json's contract holds on Ctrl-C too (DESIGN §6): the error object on stdout, as for any
    other failure -- an interrupted ``fsck --json`` (or ``crash --json``) printed nothing, so the
    reader's parse failed instead of reading why."""
    code = ("import signal, sys; from blockemu.check import fsck; from blockemu.cli.main import main; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "fsck.Checker.check_extents = lambda self, sb: signal.raise_signal(signal.SIGINT); "
            f"sys.exit(main(['fsck', {image!r}, '--json']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (32, "blockemu: fsck: interrupted\n")
    assert json.loads(p.stdout) == {"error": {"command": "fsck", "errno": 4, "code": "EINTR", "message": "interrupted"}}


def test_cat_into_a_pipe_closed_early_exits_141(image, tmp_path):
    """A file under 1 MiB is one write to the pipe; the reader gone mid-write, the buffered writer
    returned a short count without raising, and ``cat | head`` exited 0, not 141."""
    host = tmp_path / "f"
    host.write_bytes(os.urandom(300 << 10))  # more than a pipe holds, less than one 1 MiB chunk
    run("put", image, str(host), "/f")
    p = subprocess.Popen([sys.executable, "-m", "blockemu", "cat", image, "/f"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.read(10) == host.read_bytes()[:10]  # the write is under way, the pipe full
    p.stdout.close()  # as head exits
    assert (p.wait(timeout=60), p.stderr.read()) == (141, b"")


def test_json_into_a_pipe_closed_early_exits_141(tmp_path):
    """JSON larger than a pipe holds, its reader gone after a few bytes: 141, as SIGPIPE ends a
    process -- not 0, which one large write cut short gave (it returned the short count)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(300):
        (tree / f"f{i:03}").write_bytes(b"x")
    img = str(tmp_path / "a.img")
    run("mkfs", img, "--size", "64M", "--rootdir", str(tree))
    assert len(run("inspect", "dump-tree", img, "--json").stdout) > 1 << 19  # many times a pipe's 64 KiB
    p = subprocess.Popen([sys.executable, "-m", "blockemu", "inspect", "dump-tree", img, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(2) == b"[\n"
    p.stdout.close()
    assert (p.wait(timeout=60), p.stderr.read()) == (141, b"")


@pytest.mark.parametrize("args, closing, code, said", [
    (["put", "{img}", "-", "/y"], "<&-", 1, "put: -: Bad file descriptor"),
    (["ls", "{img}", "--key-file", "-"], "<&-", 1, "ls: --key-file -: Bad file descriptor"),
    (["fsck", "--json", "{img}"], ">&-", 8, "fsck: standard output: Bad file descriptor"),
    (["ls", "{img}"], ">&-", 1, "ls: standard output: Bad file descriptor"),
])
def test_a_closed_standard_stream_is_one_line_and_the_failure_exit(image, args, closing, code, said):
    """A command started with stdin or stdout closed (blockemu/cli/stdio.py): reading ``-`` or
    writing its output fails with EBADF in one line and the command's failure exit, as
    ``cat >&-`` does -- an AttributeError traceback before, and ``ls >&-`` lost its listing
    and exited 0."""
    run("put", image, "/dev/null", "/x")
    argv = [sys.executable, "-m", "blockemu", *(a.format(img=image) for a in args)]
    p = subprocess.run(["sh", "-c", f'exec "$@" {closing}', "sh", *argv], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (code, f"blockemu: {said}\n")
    assert run("fsck", image).returncode == 0  # nothing of the command landed in the image


def test_blockemus_programs_collect_young_objects_less_often():
    """The CLI (every command, the mount server) runs with blockemu/cli/collector.py's schedule:
    with CPython's default the collector took ~7 % of an fsync cycle's CPU."""
    from blockemu.cli.collector import OLDER, YOUNG
    code = ("import gc, json\n"
            "from blockemu.cli.main import main\n"
            "before = gc.get_threshold()\n"
            "main(['mkfs'])\n"  # a usage error: main returns
            "print(json.dumps([before, gc.get_threshold()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout.splitlines()[-1])
    assert tuple(before) != (YOUNG, OLDER, OLDER) and tuple(after) == (YOUNG, OLDER, OLDER)


def test_mkfs_the_host_refuses_the_size_of_names_the_image_and_leaves_none(tmp_path):
    """A file size limit (ulimit -f) makes the host refuse the sparse image's size, EFBIG: mkfs
    said a bare "File too large" and left an empty file, no image, where the image was asked."""
    import resource
    img = tmp_path / "a.img"
    p = subprocess.run([sys.executable, "-m", "blockemu", "mkfs", str(img), "--size", "256M"], capture_output=True,
                       text=True, timeout=60, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    assert (p.returncode, p.stderr) == (1, f"blockemu: mkfs: {img}: File too large\n")
    assert not img.exists()


def test_mkfs_force_keeps_the_old_image_when_the_host_refuses_the_size(tmp_path):
    """--force over an image with a size the host cannot hold (EFBIG: here a file size limit, as
    ext4's 16 TiB for --size 100P) deleted the image it was to replace and made none (a
    newcomer's trial): the size is tried before the old contents go, and the image stays whole."""
    import resource

    from blockemu.cli.main import main
    img = tmp_path / "a.img"
    assert main(["mkfs", str(img), "--size", "16M"]) == 0
    assert main(["put", str(img), __file__, "/kept"]) == 0
    before = img.read_bytes()
    p = subprocess.run([sys.executable, "-m", "blockemu", "mkfs", str(img), "--size", "256M", "--force"],
                       capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20)))
    assert (p.returncode, p.stderr) == (1, f"blockemu: mkfs: {img}: File too large\n")
    assert img.read_bytes() == before
    assert main(["fsck", str(img)]) == 0


def test_a_file_size_limit_below_the_page_arena_is_named(image):
    """The dirty pages' memfd counts against ulimit -f as any file: a mount under a small limit
    failed with a bare "File too large", which read as the image's."""
    import resource
    p = subprocess.run([sys.executable, "-m", "blockemu", "ls", image], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    assert p.returncode == 1 and p.stderr.startswith("blockemu: ls: File too large: the page arena, a memfd of ")
    assert "ulimit -f" in p.stderr and p.stderr.count("\n") == 1


def test_ls_prints_a_name_that_is_not_utf8_under_a_strict_utf8_locale(image):
    """Under ``LANG=en_US.UTF-8`` Python's stdout is strict (PYTHONIOENCODING stands in for the
    locale here): ``ls`` of a name that is not UTF-8 ended in a UnicodeEncodeError traceback;
    it prints the name's bytes, as ls(1) does."""
    subprocess.run([sys.executable, "-m", "blockemu", "put", image, "/etc/hostname", b"/bad\xff\xfe"], check=True,
                   capture_output=True, timeout=60)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    p = subprocess.run([sys.executable, "-m", "blockemu", "ls", image], capture_output=True, timeout=60, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"bad\xff\xfe\n", b"")


def test_sigterm_in_mkfs_rootdir_removes_the_half_built_image(tmp_path):
    """SIGTERM (timeout, systemd, kill) stops mkfs as Ctrl-C does: the half-built image goes. It
    ended the process on the spot, exit 143 and no line, leaving an image that mounted with part
    of the tree. A real SIGTERM, raised by the process itself as the copy starts."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"x" * 10000)
    img = tmp_path / "a.img"
    code = ("import signal, sys; import blockemu.fs.mkfs as m; from blockemu.cli.main import main\n"
            "async def populate(*args, **kw):\n"
            "    signal.raise_signal(signal.SIGTERM)\n"
            "m.populate = populate\n"
            f"sys.exit(main(['mkfs', {str(img)!r}, '--size', '64M', '--rootdir', {str(tmp_path / 'tree')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (143, "blockemu: mkfs: terminated\n")
    assert not img.exists()


def test_sigterm_in_fsck_exits_32_as_e2fsck(image):
    """e2fsck cancels on SIGTERM as on SIGINT, exit 32; the default action ended fsck with 143."""
    code = ("import signal, sys; from blockemu.check import fsck; from blockemu.cli.main import main; "
            "fsck.Checker.check_extents = lambda self, sb: signal.raise_signal(signal.SIGTERM); "
            f"sys.exit(main(['fsck', {image!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (32, "", "blockemu: fsck: terminated\n")


def test_json_names_a_path_that_is_not_utf8_in_text_strict_parsers_take(image, tmp_path):
    """An image path that is not UTF-8 went into the JSON as lone surrogate escapes
    (``"\\udcff"``), which strict parsers (serde_json) refuse: U+FFFD stands for each such byte,
    as in ``ls --json``'s names -- in the result and in an error's message."""
    odd = os.path.join(os.fsencode(tmp_path), b"d\xff")
    os.mkdir(odd)
    os.rename(image, os.path.join(odd, b"a.img"))
    for args, field in ((["fsck", os.path.join(odd, b"a.img")], lambda d: d["image"]),
                        (["ls", os.path.join(odd, b"none.img")], lambda d: d["error"]["message"])):
        p = subprocess.run([sys.executable, "-m", "blockemu", *args, "--json"], capture_output=True, timeout=60)
        assert b"\\udc" not in p.stdout
        assert f"{tmp_path}/d\ufffd/" in field(json.loads(p.stdout))


def test_dump_tree_shows_an_inodes_times_as_the_decimal_they_are(tmp_path):
    """A time is sec + nsec / 1e9 with 0 <= nsec < 1e9: shown as ``f"{sec}.{nsec}"`` a time 5 us
    past a second read as half a second past it (``12.5000``), and one before 1970 (signed sec since
    7f8842e: -1.5 s is sec -2, nsec 500000000) read as a second earlier (``-2.500000000``)."""
    from blockemu.check.inspect import dump_tree
    from blockemu.cli.main import main

    root, img = tmp_path / "root", str(tmp_path / "x.img")
    root.mkdir()
    for name, mtime in (("a", -1_500_000_000), ("b", 12_000_005_000)):  # (mkfs's read sets the host's atime)
        (root / name).write_bytes(b"x")
        os.utime(root / name, ns=(0, mtime))
    assert main(["mkfs", img, "--size", "64M", "--rootdir", str(root)]) == 0
    inodes = [i["data"] for b in dump_tree(img, ["fs"]) for i in b.get("items", ()) if i["key"][1] == 1 and i["key"][0] > 256]
    assert sorted(i["mtime"] for i in inodes) == ["-1.500000000", "12.000005000"]
