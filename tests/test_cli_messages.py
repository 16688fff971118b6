"""The exact text of the command line's smaller messages (issue 11, item 5).

These run ``blockemu.cli.main.main`` in this process -- the console script's entry
point, minus a second of interpreter start-up each -- and compare stdout and stderr
whole."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from blockemu.cli.main import main
from blockemu.crypto.fscrypt import key_identifier
from blockemu.workload.runner import scenarios
from tests.util import obey_file_modes, set_super


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_mkfs_too_small_names_the_size_given_and_the_minimum(tmp_path, capsys):
    img = tmp_path / "s.img"
    assert cli(capsys, "mkfs", str(img), "--size", "1K") == (
        2, "", "blockemu: usage: blockemu mkfs: size 1K is too small: the minimum is 16M (16777216 bytes)\n")
    assert not img.exists()


def test_a_malformed_section_header_names_file_and_line(tmp_path, capsys):
    job = tmp_path / "j.fio"
    job.write_text("; a job\n[global]\nbs=4k\n[j\nrw=write\n")
    assert cli(capsys, "run", str(job)) == (
        1, "", f"blockemu: run: {job}:4: malformed section header '[j' (expected [name])\n")


def test_mkfs_encrypt_of_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "D"
    root.mkdir()
    (root / "a.txt").write_text("hi")
    key = tmp_path / "k"
    key.write_bytes(bytes(range(32)))
    img = tmp_path / "m.img"
    args = ["mkfs", str(img), "--size", "32M", "--rootdir", str(root), "--encrypt", "/a.txt", "--key-file", str(key)]
    want = f"blockemu: mkfs: --encrypt /a.txt: /a.txt is not a directory (it is the file {root}/a.txt)\n"
    assert cli(capsys, *args) == (1, "", want)
    assert not img.exists()
    assert cli(capsys, "mkfs", str(img), "--size", "32M")[0] == 0
    before = img.read_bytes()
    assert cli(capsys, *args, "--force") == (1, "", want)
    assert img.read_bytes() == before  # the old image untouched


def test_mkfs_that_fails_while_populating_leaves_no_image(tmp_path):
    """A failure after mkfs started writing (here: a --rootdir file it may not read) removes the
    half-built image. Run as a process that obeys file modes even as root."""
    root = tmp_path / "D"
    root.mkdir()
    (root / "secret").write_bytes(b"x" * 10000)
    os.chmod(root / "secret", 0)
    img = tmp_path / "p.img"
    p = subprocess.run([sys.executable, "-m", "blockemu", "mkfs", str(img), "--size", "32M", "--rootdir", str(root)],
                       capture_output=True, text=True, timeout=60,
                       preexec_fn=obey_file_modes if os.geteuid() == 0 else None)
    assert (p.returncode, p.stderr) == (1, f"blockemu: mkfs: {root}/secret: Permission denied\n")
    assert not img.exists()


def test_a_key_too_short_for_aes_256_makes_no_encrypted_directory(tmp_path, capsys):
    """fscrypt needs a v2 master key of AES-256's strength, 32 bytes; Linux sets the policy and then
    refuses every unlock under it (ENOKEY), so a 16-byte key made a directory Linux could never
    open. mkdir --encrypt and mkfs --encrypt refuse it, and leave no plain directory or image."""
    img, short, root = tmp_path / "s.img", tmp_path / "short", tmp_path / "D"
    short.write_bytes(bytes(range(16)))
    (root / "enc").mkdir(parents=True)
    kid = key_identifier(bytes(range(16))).hex()
    why = "is 16 bytes, too short to encrypt /enc: AES-256-XTS needs a key of at least 32 bytes\n"
    assert cli(capsys, "mkfs", str(img), "--size", "32M")[0] == 0
    assert cli(capsys, "mkdir", str(img), "/enc", "--encrypt", "--key-file", str(short)) == (
        1, "", f"blockemu: mkdir: key {kid} {why}")
    assert cli(capsys, "ls", str(img), "/") == (0, "", "")
    mkfs = ["mkfs", str(tmp_path / "r.img"), "--size", "32M", "--rootdir", str(root), "--encrypt", "/enc",
            "--key-file", str(short)]
    assert cli(capsys, *mkfs) == (1, "", f"blockemu: mkfs: key {kid} {why}")
    assert not (tmp_path / "r.img").exists()
    before = img.read_bytes()
    assert cli(capsys, *mkfs[:1], str(img), *mkfs[2:], "--force") == (1, "", f"blockemu: mkfs: key {kid} {why}")
    assert img.read_bytes() == before  # refused before --force truncated the old image


def test_mkfs_size_past_what_a_file_offset_holds_is_a_usage_error(tmp_path, capsys):
    """--size 9999999999T ended in an OverflowError traceback from ftruncate (exit 1)."""
    img = tmp_path / "h.img"
    assert cli(capsys, "mkfs", str(img), "--size", "9999999999T") == (
        2, "", "blockemu: usage: blockemu mkfs: size 9999999999T is too large: a file holds at most "
        f"{(1 << 63) - 4096} bytes\n")
    assert not img.exists()


def test_a_key_file_that_does_not_read_gives_its_own_errno_in_json(tmp_path, capsys):
    """--json's errno is the key file's own (ENOENT, EISDIR), and EINVAL for a key of the wrong
    size, as add_key says it: every one was EIO, whatever the line on stderr said."""
    img, short = tmp_path / "k.img", tmp_path / "short"
    short.write_bytes(bytes(8))
    assert cli(capsys, "mkfs", str(img), "--size", "32M")[0] == 0
    for key, code, why in ((tmp_path / "none", "ENOENT", "No such file or directory"), (tmp_path, "EISDIR", "Is a directory"),
                           (short, "EINVAL", "a raw key is 16 to 64 bytes, this file has 8")):
        line = f"--key-file {key}: {why}"
        for command, failed in (("ls", 1), ("fsck", 8)):
            rc, out, err = cli(capsys, command, str(img), "--key-file", str(key), "--json")
            assert (rc, err) == (failed, f"blockemu: {command}: {line}\n")
            assert json.loads(out) == {"error": {"command": command, "errno": getattr(errno, code), "code": code,
                                                 "message": line}}


def test_a_key_file_too_long_is_not_said_to_have_the_bytes_read_to_find_out(tmp_path, capsys):
    """A 100-byte key file was refused as "this file has 65": the key is read only up to one byte
    past the largest key, and that count was given as the file's size."""
    long = tmp_path / "long"
    long.write_bytes(bytes(100))
    assert cli(capsys, "key-id", "--key-file", str(long)) == (
        1, "", f"blockemu: key-id: --key-file {long}: a raw key is 16 to 64 bytes, this file has more than 64\n")


def test_a_wrong_key_is_told_apart_from_no_key(tmp_path, capsys):
    img, right, wrong, host = (str(tmp_path / n) for n in ("k.img", "right", "wrong", "host"))
    open(right, "wb").write(bytes(range(32)))
    open(wrong, "wb").write(bytes(range(1, 33)))
    open(host, "wb").write(b"secret")
    assert cli(capsys, "mkfs", img, "--size", "32M")[0] == 0
    assert cli(capsys, "mkdir", img, "/e", "--encrypt", "--key-file", right)[0] == 0
    assert cli(capsys, "put", img, host, "/e/x", "--key-file", right)[0] == 0
    have, need = key_identifier(bytes(range(1, 33))).hex(), key_identifier(bytes(range(32))).hex()
    assert cli(capsys, "cat", img, "/e/x", "--key-file", wrong) == (
        1, "", f"blockemu: cat: key {have} does not unlock /e (its encryption policy uses key {need})\n")  # /e/x's name is /e's to decrypt
    assert cli(capsys, "put", img, host, "/e/new", "--key-file", wrong) == (
        1, "", f"blockemu: put: key {have} does not unlock /e (its encryption policy uses key {need})\n")
    # no key: the real name is not there (fscrypt shows no-key names), ENOENT as on Linux, and the key that
    # shows it (it said only 'no such file or directory'); the no-key name needs the key
    wants = f"is encrypted with key {need}: give that key with --key-file)"
    for command in (["cat"], ["extents"], ["ls"]):
        assert cli(capsys, *command, img, "/e/x") == (
            1, "", f"blockemu: {command[0]}: /e/x: no such file or directory (/e {wants}\n")
    assert cli(capsys, "cat", img, "/nope") == (1, "", "blockemu: cat: /nope: no such file or directory\n")
    rc, nokey, _ = cli(capsys, "ls", img, "/e")
    assert cli(capsys, "cat", img, f"/e/{nokey.strip()}") == (
        1, "", f"blockemu: cat: /e/{nokey.strip()}: Required key not available (/e/{nokey.strip()} {wants}\n")
    # put without a key named no path (it said only "Required key not available")
    assert cli(capsys, "put", img, host, "/e/new") == (
        1, "", f"blockemu: put: /e/new: Required key not available (/e {wants}\n")
    # ls lists no-key names with the wrong key too, and says the key is not the directory's (it was silent)
    assert cli(capsys, "ls", img, "/e", "--key-file", wrong) == (
        0, nokey, f"blockemu: ls: key {have} does not unlock /e (its encryption policy uses key {need}); no-key names shown\n")
    assert cli(capsys, "ls", img, "/e", "--key-file", right) == (0, "x\n", "")


@pytest.mark.parametrize("command", [["ls"], ["cat", "/x"]])
def test_a_file_that_is_no_image_is_named(tmp_path, capsys, command):
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    assert cli(capsys, command[0], str(junk), *command[1:]) == (
        1, "", f"blockemu: {command[0]}: {junk}: not a blockemu image (no superblock magic)\n")


def test_rescue_zero_log_of_a_file_that_is_no_image_says_so(tmp_path, capsys):
    """Not "restore it with fsck --repair first": there is no blockemu superblock to restore."""
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    assert cli(capsys, "rescue", "zero-log", str(junk)) == (
        1, "", f"blockemu: rescue: {junk}: not a blockemu image (no superblock magic)\n")


def test_a_truncated_image_is_named_and_said_truncated(tmp_path, capsys):
    """inspect dump-tree named no image; rescue zero-log said "no fsync log; nothing to do" and
    exited 0, as for a sound image."""
    img, short = tmp_path / "a.img", tmp_path / "short.img"
    assert cli(capsys, "mkfs", str(img), "--size", "64M")[0] == 0
    short.write_bytes(img.read_bytes()[:1 << 20])
    why = "image truncated: superblock says 67108864 bytes, file has 1048576"
    rc, out, err = cli(capsys, "inspect", "dump-tree", str(short))
    assert (rc, out) == (1, "") and err.startswith(f"blockemu: inspect: {short}: read [") and err.endswith(f" ({why})\n")
    before = short.read_bytes()
    assert cli(capsys, "rescue", "zero-log", str(short)) == (1, "", f"blockemu: rescue: {short}: {why}; nothing written\n")
    assert short.read_bytes() == before


def test_encrypt_without_a_key_file_is_the_same_usage_error_for_mkfs_and_mkdir(tmp_path, capsys):
    """mkfs exited 1, mkdir 2 (usage) for the same missing flag."""
    img = str(tmp_path / "e.img")
    assert cli(capsys, "mkfs", img, "--size", "32M", "--encrypt", "/e") == (
        2, "", "blockemu: usage: blockemu mkfs: --encrypt needs --key-file\n")
    assert not os.path.exists(img)
    assert cli(capsys, "mkfs", img, "--size", "32M")[0] == 0
    assert cli(capsys, "mkdir", img, "/e", "--encrypt") == (2, "", "blockemu: usage: blockemu mkdir: --encrypt needs --key-file\n")


def test_run_list_gives_whole_descriptions(capsys):
    rc, out, err = cli(capsys, "run", "--list")
    assert rc == 0 and err == ""
    listed = " ".join(out.split())
    for name, text in scenarios().items():
        comment = " ".join(" ".join(ln.lstrip(";") for ln in text.split("\n[", 1)[0].splitlines()).split())
        assert f"{name} {comment}" in listed


def test_errors_with_json_are_json_on_stdout_too(tmp_path, capsys):
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    why = f"{junk}: not a blockemu image (no superblock magic)"
    rc, out, err = cli(capsys, "stress", str(junk), "--json")
    assert (rc, err) == (1, f"blockemu: stress: {why}\n")
    assert json.loads(out) == {"error": {"command": "stress", "errno": 117, "code": "EUCLEAN", "message": why}}


@pytest.mark.parametrize("argv, code, why", [
    (["fsck", "--json"], 16, "blockemu fsck: the following arguments are required: image"),  # argparse's
    (["run", "seqwrite", "--output-format=terse,json", "--size", "0"], 2,
     "blockemu run: argument --size: 0 is out of range: more than 0"),
    (["stress", "s.img", "--scenario", "key-removal-race", "--ops", "3", "--json"], 2,  # the command's own
     "blockemu stress: --ops counts the steps of --schedule seeded; the free race runs for --duration S (default 5)"),
])
def test_usage_errors_with_json_are_json_on_stdout_too(tmp_path, capsys, argv, code, why):
    """A usage error printed its line and no JSON, though --json promises JSON on every outcome."""
    rc, out, err = cli(capsys, *argv)
    assert (rc, err) == (code, f"blockemu: usage: {why}\n")
    assert json.loads(out) == {"error": {"command": argv[0], "errno": 22, "code": "EINVAL", "message": why}}
    assert cli(capsys, *[a for a in argv if "json" not in a])[1] == ""  # without it, nothing on stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"blockemu {version('blockemu')}\n"


@pytest.mark.parametrize("argv, rc", [(["fsck", "{img}"], 8), (["ls", "{img}"], 1), (["mkfs", "{img}", "--size", "64M"], 1),
                                      (["run", "seqwrite", "--image", "{img}"], 1)])
def test_a_fifo_for_an_image_is_refused_by_name(tmp_path, argv, rc):
    """A reader's open of a FIFO waited for a writer for ever (fsck, ls hung); mkfs and run said
    only 'Invalid argument' (ftruncate's EINVAL), naming nothing."""
    img = tmp_path / "fifo"
    os.mkfifo(img)
    try:
        p = subprocess.run([sys.executable, "-m", "blockemu", *(a.format(img=img) for a in argv)],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[0]} waited on the FIFO")
    assert (p.returncode, p.stdout, p.stderr) == (
        rc, "", f"blockemu: {argv[0]}: {img}: not a regular file (a blockemu image is a file)\n")


@pytest.mark.parametrize("argv", [["fsck", "{img}"], ["ls", "{img}"], ["cat", "{img}", "/x"],
                                  ["inspect", "dump-super", "{img}"], ["rescue", "zero-log", "{img}"]])
def test_a_file_too_small_for_a_superblock_is_said_so_in_one_text(tmp_path, capsys, argv):
    """rescue zero-log told an empty file to 'restore it with blockemu fsck --repair first',
    which fsck refuses (there is no superblock anywhere to restore); ls said it otherwise."""
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    assert cli(capsys, *(a.format(img=small) for a in argv)) == (
        8 if argv[0] == "fsck" else 1, "", f"blockemu: {argv[0]}: {small}: too small to be a blockemu image (4096 bytes)\n")


def test_stress_on_a_full_image_without_faults_says_out_of_space_not_injected(tmp_path, capsys):
    """No --faults: the operations a full image refused with ENOSPC were counted as 'injected
    errors'. Nothing was injected; they are counted as what they are, and no injected line shows."""
    img, big = tmp_path / "full.img", tmp_path / "big"
    big.write_bytes(os.urandom((14 << 20) - (128 << 10)))  # write() leaves the trees room to split: 14 MiB no longer fits
    assert cli(capsys, "mkfs", str(img), "--size", "16M")[0] == 0
    assert cli(capsys, "put", str(img), str(big), "/big")[0] == 0
    rc, out, err = cli(capsys, "stress", str(img), "--ops", "30", "--tasks", "1", "--seed", "1", "--no-progress")
    lines = dict(line.rsplit(None, 1) for line in out.splitlines() if line and not line.startswith("seed"))
    assert (rc, err) == (0, ""), out
    assert int(lines["refused out of space"]) > 0 and lines["io errors"] == "0", out
    assert "injected errors" not in lines, out


@pytest.mark.parametrize("argv, code, line", [
    # argparse's own form, which every usage line now takes
    (["stress", "s.img", "--tasks", "0"], 2, "blockemu stress: argument --tasks: 0 is out of range: at least 1"),
    (["fsck"], 16, "blockemu fsck: the following arguments are required: image"),
    (["key", "add", "/mnt"], 2, "blockemu key add: the following arguments are required: --key-file"),
    # an unknown flag is the top-level parser's to report, which named no command ('blockemu: ...')
    (["fsck", "x.img", "--bogus"], 16, "blockemu fsck: unrecognized arguments: --bogus"),
    (["inspect", "dump-tree", "x.img", "--bogus", "y"], 2, "blockemu inspect dump-tree: unrecognized arguments: --bogus y"),
    # the commands' own checks: these read 'mkdir --encrypt ...', 'run: ...', '--kernel-peer ...'
    # (no command at all), 'blockemu stress: ...' -- four forms
    (["mkdir", "x.img", "/e", "--encrypt"], 2, "blockemu mkdir: --encrypt needs --key-file"),
    (["mkfs", "x.img", "--size", "16M", "--encrypt", "/e"], 2, "blockemu mkfs: --encrypt needs --key-file"),
    (["run"], 2, "blockemu run: a job file or a scenario name is needed (or --list)"),
    (["stress"], 2, "blockemu stress: IMAGE is required (unless --seeds)"),
    (["stress", "s.img", "--report", "out"], 2,
     "blockemu stress: --kernel-peer and --report belong to --scenario key-removal-race"),
    (["stress", "s.img", "--key-removal", "hard"], 2,
     "blockemu stress: --key-removal, --compare-modes and --schedule belong to --scenario key-removal-race: "
     "the mix uses no encryption key, so no removal mode changes what it does"),
    (["stress", "--seeds", "0..2", "--schedule", "seeded"], 2,
     "blockemu stress: --key-removal, --compare-modes and --schedule belong to --scenario key-removal-race: "
     "the mix uses no encryption key, so no removal mode changes what it does"),
    (["stress", "--seeds", "0..2", "--scenario", "key-removal-race", "--duration", "1"], 2,
     "blockemu stress: --seeds runs the mix scenario"),
    # flags one form of stress would ignore, refused (each was silently ignored)
    (["stress", "x.img", "--seeds", "0..2"], 2,
     "blockemu stress: --seeds runs each seed on a fresh image its worker makes: give no IMAGE"),
    (["stress", "--seeds", "0..2", "--seed", "4"], 2,
     "blockemu stress: --seed is one run's; --seeds A..B names the campaign's seeds"),
    (["stress", "s.img", "--jobs", "2", "--results", "r.jsonl"], 2,
     "blockemu stress: --jobs, --results belong to a campaign (--seeds A..B); a run on IMAGE is one run, in this process"),
    # the run on IMAGE leaves IMAGE as it is: --keep-failed (a campaign's) was taken and ignored
    (["stress", "s.img", "--keep-failed", "kept"], 2,
     "blockemu stress: --keep-failed belongs to a campaign (--seeds A..B); a run on IMAGE is one run, in this process"),
    (["stress", "s.img", "--scenario", "key-removal-race", "--faults", "cut=10"], 2,
     "blockemu stress: --faults belongs to the mix (--scenario mix, the default); the race runs its own two tasks, "
     "without faults"),
    (["stress", "s.img", "--scenario", "key-removal-race", "--tasks", "2", "--write-path", "fast"], 2,
     "blockemu stress: --tasks, --write-path belong to the mix (--scenario mix, the default); the race runs its own "
     "two tasks, without faults"),
    (["key", "status", "/mnt"], 2, "blockemu key status: give one of --key-file or --id"),
    # a uid out of range and a malformed identifier were taken (-5 claimed the key) or failed as a run's error
    (["key", "add", "/mnt", "--key-file", "k", "--user", "-5"], 2,
     "blockemu key add: argument --user: -5 is out of range: from 0 to 4294967294 (a uid)"),
    (["key", "status", "/mnt", "--id", "0123"], 2, "blockemu key status: argument --id: '0123' is not a key identifier "
     "(32 hex digits)"),
    # an empty MOUNTPOINT ("$MNT" unset) was the working directory: mount served the image over it
    *[(argv, 2, f"blockemu {' '.join(argv[:-1] if argv[0] != 'mount' else argv[:1])}: argument mountpoint: '' is "
       "no mount point (an empty argument; mount(8) refuses it too)")
      for argv in (["mount", "x.img", ""], ["umount", ""], ["key", "status", ""])],
    (["mount", "x.img", "/mnt", "-o", "bogus"], 2, "blockemu mount: unknown mount option 'bogus' (known: ro, rw, allow_other, "
     "interval=, seal_timeout=, background_bytes=, cache_limit=, dirty_limit=, max_extent=, batch_bytes=, "
     "seal_workers=)"),
])
def test_every_usage_error_reads_as_argparse_words_its_own(tmp_path, capsys, monkeypatch, argv, code, line):
    """One form for every usage line, argparse's: ``blockemu: usage: blockemu CMD [ACTION]: why``,
    and the JSON error's message is that line."""
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, *argv) == (code, "", f"blockemu: usage: {line}\n")
    rc, out, _ = cli(capsys, *argv, "--json") if argv[0] in ("stress", "fsck") else (code, None, None)
    if out is not None:
        assert (rc, json.loads(out)["error"]["message"]) == (code, line)


def test_stress_force_on_the_mix_is_refused_naming_the_scenario_it_belongs_to(tmp_path, capsys):
    """--force (help: 'key-removal-race: overwrite IMAGE with a fresh image') was silently ignored by
    the mix, which then ran on the old image; it is refused before anything runs."""
    img = tmp_path / "s.img"
    assert cli(capsys, "mkfs", str(img), "--size", "16M")[0] == 0
    before = img.read_bytes()
    assert cli(capsys, "stress", str(img), "--force", "--ops", "5") == (2, "", (
        "blockemu: usage: blockemu stress: --force belongs to --scenario key-removal-race, which makes IMAGE "
        "afresh; the mix runs on IMAGE as it is, in a directory of its own (making IMAGE only if it is missing)\n"))
    assert img.read_bytes() == before


def test_fsck_with_a_key_that_unlocks_nothing_says_so(tmp_path, capsys):
    """fsck --key-file WRONG checked the encrypted names without it and said nothing, as if the key
    had been used. One line on stderr now (the exit code stays the image's: clean is 0, as ls with
    such a key), and the JSON carries it."""
    img, right, wrong = (str(tmp_path / n) for n in ("k.img", "right", "wrong"))
    open(right, "wb").write(bytes(range(32)))
    open(wrong, "wb").write(bytes(range(1, 33)))
    have, need = key_identifier(bytes(range(1, 33))).hex(), key_identifier(bytes(range(32))).hex()
    assert cli(capsys, "mkfs", img, "--size", "32M")[0] == 0
    plain = f"key {have} unlocks no encrypted directory on {img}: nothing on it is encrypted"
    rc, out, err = cli(capsys, "fsck", img, "--key-file", wrong)
    assert (rc, err) == (0, f"blockemu: fsck: {plain}\n") and "no error found" in out
    assert cli(capsys, "mkdir", img, "/e", "--encrypt", "--key-file", right)[0] == 0
    why = f"key {have} unlocks no encrypted directory on {img}: its encryption policies use key {need}; " \
          "its encrypted names were checked without a key"
    rc, out, err = cli(capsys, "fsck", img, "--key-file", wrong, "--json")
    assert (rc, err) == (0, f"blockemu: fsck: {why}\n")
    assert json.loads(out)["warnings"] == [why] and json.loads(out)["clean"]
    rc, out, err = cli(capsys, "fsck", img, "--key-file", right, "--json")
    assert (rc, err) == (0, "") and "warnings" not in json.loads(out)


def test_fsck_with_a_key_on_an_image_whose_fs_tree_is_damaged_does_not_say_nothing_is_encrypted(tmp_path, capsys):
    """With the fs tree's block damaged, fsck --key-file RIGHT said "nothing on it is encrypted":
    it had read no policy because it could read no fs item, not because there is none."""
    img, key = str(tmp_path / "d.img"), str(tmp_path / "k")
    open(key, "wb").write(bytes(range(32)))
    assert cli(capsys, "mkfs", img, "--size", "32M")[0] == 0
    assert cli(capsys, "mkdir", img, "/e", "--encrypt", "--key-file", key)[0] == 0
    sb = json.loads(cli(capsys, "inspect", "dump-super", img, "--json")[1])
    with open(img, "r+b") as f:
        f.seek(sb["backup_roots"][sb["generation"] % 4]["fs_root"] + 200)
        f.write(b"\xff\x00\xff")
    rc, out, err = cli(capsys, "fsck", img, "--key-file", key)
    assert rc == 4 and "nothing on it is encrypted" not in err
    assert err == (f"blockemu: fsck: key {key_identifier(bytes(range(32))).hex()} unlocks no encrypted directory "
                   f"fsck could read on {img}: its fs tree is damaged, and what could not be read may hold one\n")


def test_an_image_with_unknown_incompat_features_is_refused_by_fsck_and_rescue_too(tmp_path, capsys):
    """SPEC: a reader must refuse unknown incompat bits. ls, cat and put did; fsck called such an
    image clean (exit 0, 'no error found') and fsck --repair and rescue zero-log worked on it.
    Now fsck cannot open it (exit 8, the one line the others print) and nothing writes it."""
    from blockemu.ondisk.structs import INCOMPAT_ENCRYPTED_NAMES

    img = str(tmp_path / "new.img")
    assert cli(capsys, "mkfs", img, "--size", "16M")[0] == 0
    set_super(img, incompat_flags=INCOMPAT_ENCRYPTED_NAMES | 0x80)
    before = open(img, "rb").read()
    line = f"{img}: unknown incompat features 0x80; a newer blockemu made this image\n"
    assert cli(capsys, "ls", img) == (1, "", f"blockemu: ls: {line}")
    assert cli(capsys, "fsck", img) == (8, "", f"blockemu: fsck: {line}")
    assert cli(capsys, "fsck", img, "--repair") == (8, "", f"blockemu: fsck: {line}")
    assert cli(capsys, "rescue", "zero-log", img) == (1, "", f"blockemu: rescue: {line}")
    assert open(img, "rb").read() == before


def test_every_command_action_and_option_says_in_help_what_it_does():
    """--help is where a newcomer looks first: `inspect --help` listed heatmap alone (dump-super
    and dump-tree had no line), `key --help` listed bare words, and 47 options (--repair,
    --json, --tree ...) had no text at all. Nor does a help name an option its command lacks
    (mkfs's --progress said "never with --json")."""
    import argparse

    from blockemu.cli.main import build_parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        options = {o for a in parser._actions for o in a.option_strings}
        for a in parser._actions:
            if a.help and "--json" in a.help and "--json" not in options:
                bare.append(f"{name} {a.option_strings[0]} names --json")
            if isinstance(a, argparse._SubParsersAction):
                helped = {c.dest for c in a._choices_actions}
                for sub, sp in a.choices.items():
                    if sub not in helped:
                        bare.append(f"{name} {sub}")
                    walk(sp, f"{name} {sub}")
            elif a.option_strings and a.help is None:
                bare.append(f"{name} {a.option_strings[0]}")
    walk(build_parser(), "blockemu")
    assert bare == []


def test_an_image_with_unknown_compat_ro_features_is_read_but_never_written(tmp_path, capsys):
    """SPEC "Feature bits": unknown compat_ro bits were not enforced (writes went on, fsck said
    clean without a word). As btrfs mounts such an image read-only only: every command that
    reads works, and every one that would write refuses with one line naming the bits, EROFS,
    exit 1 (fsck --repair 8), the image untouched."""
    import asyncio
    import errno

    import blockemu

    img, host = str(tmp_path / "ro.img"), tmp_path / "h"
    host.write_bytes(b"hello")
    assert cli(capsys, "mkfs", img, "--size", "16M")[0] == 0
    assert cli(capsys, "put", img, str(host), "/f")[0] == 0
    set_super(img, compat_ro_flags=0x30)
    before = open(img, "rb").read()
    why = (f"{img}: unknown compat_ro features 0x30; a newer blockemu made this image, which this one may read "
           f"(ls, cat, extents, inspect, fsck) but not write")
    assert cli(capsys, "ls", img) == (0, "f\n", "")
    assert cli(capsys, "cat", img, "/f") == (0, "hello", "")
    assert cli(capsys, "extents", img, "/f")[0] == 0
    assert cli(capsys, "inspect", "dump-super", img)[0] == 0
    rc, out, err = cli(capsys, "fsck", img)
    assert (rc, err) == (0, "") and f"note: {why}" in out
    job = tmp_path / "j.fio"
    job.write_text("[j]\nkind=mix\nnops=1\n")
    for args, code in ((["put", img, str(host), "/g"], 1), (["mkdir", img, "/d"], 1), (["fsck", img, "--repair"], 8),
                       (["rescue", "zero-log", img], 1), (["run", str(job), "--image", img], 1),
                       (["stress", img, "--ops", "1"], 1)):
        assert cli(capsys, *args) == (code, "", f"blockemu: {args[0]}: {why}\n"), args
    assert open(img, "rb").read() == before

    async def mounts() -> None:
        with pytest.raises(OSError) as e:
            await blockemu.mount(img)
        assert e.value.errno == errno.EROFS and str(e.value) == why
        async with blockemu.mount(img, readonly=True) as fs:
            assert await fs.readdir("/") == ["f"]
    asyncio.run(mounts())
    assert open(img, "rb").read() == before


def test_extents_of_a_directory_says_it_is_one(tmp_path, capsys):
    """It printed an empty table and exited 0, as for an empty file."""
    img = str(tmp_path / "d.img")
    assert cli(capsys, "mkfs", img, "--size", "16M")[0] == 0
    assert cli(capsys, "mkdir", img, "/d")[0] == 0
    assert cli(capsys, "extents", img, "/d") == (1, "", "blockemu: extents: /d: is a directory\n")
    rc, out, _ = cli(capsys, "extents", img, "/d", "--json")
    assert rc == 1 and json.loads(out)["error"]["code"] == "EISDIR"


@pytest.mark.parametrize("objectid", [0, 257])
def test_a_superblock_whose_root_directory_is_not_inode_256_is_invalid(tmp_path, capsys, objectid):
    """root_dir_objectid 0 was accepted: mounts went on (with inode 256 as the root whatever it
    said) and fsck called the image clean. It makes the copy invalid (SPEC "Opening an image"):
    mounts refuse in one line; fsck says so, falls back to a mirror and --repair restores it."""
    import asyncio

    import blockemu

    img = str(tmp_path / "r.img")
    assert cli(capsys, "mkfs", img, "--size", "72M")[0] == 0  # with a mirror at 64 MiB
    set_super(img, root_dir_objectid=objectid)
    why = f"superblock at 65536: root_dir_objectid {objectid} is not the root directory's inode 256"
    hint = f"; the mirror at {64 << 20} is sound: `blockemu fsck --repair {img}` restores it"
    assert cli(capsys, "ls", img) == (1, "", f"blockemu: ls: {img}: {why}{hint}\n")
    async def mount() -> None:
        await blockemu.mount(img)
    with pytest.raises(OSError, match=why):
        asyncio.run(mount())
    rc, out, _ = cli(capsys, "fsck", img, "--json")
    errors = json.loads(out)["errors"]
    assert rc == 4 and [(e["code"], e["message"]) for e in errors] == [("SUPERBLOCK", f"primary superblock: {why}; "
                                                                        "using a mirror")]
    assert cli(capsys, "fsck", img, "--repair")[0] == 1
    assert cli(capsys, "fsck", img)[0] == 0 and cli(capsys, "ls", img)[0] == 0


def test_stress_says_its_ops_are_all_tasks_of_ops_per_task(tmp_path, capsys):
    """--ops is per task (its help says so); the summary's "ops 6" for --ops 3 read as if the flag
    had been ignored. The line now says what the total is made of."""
    rc, out, err = cli(capsys, "stress", str(tmp_path / "s.img"), "--seed", "1", "--tasks", "2", "--ops", "3",
                       "--write-path", "fast")
    assert (rc, err) == (0, "")
    assert out.splitlines()[1] == f"{'ops':<34}6 (2 tasks x 3 per task)"


def test_run_on_a_scratch_image_names_no_path_that_is_gone(tmp_path, capsys):
    """Without --image the run's image is deleted when it ends: the report says so rather than
    naming a path that no longer exists, and a failure says how to keep the image."""
    job = tmp_path / "j.fio"
    job.write_text("[j]\nrw=read\nsize=64k\nallow_file_create=0\n")
    rc, out, err = cli(capsys, "run", str(job), "--json", "--seed", "1")
    assert rc == 1 and json.loads(out)["blockemu"]["image"] == "scratch image (deleted)"
    assert err == (f"blockemu: run: j: job j: /jobs/j.0.0 does not exist and allow_file_create=0 (err=2) "
                   f"(reproduce with: blockemu run {job} --seed 1; add --image PATH to keep the image)\n")
    img = tmp_path / "kept.img"
    rc, out, err = cli(capsys, "run", str(job), "--json", "--seed", "1", "--image", str(img))
    assert rc == 1 and json.loads(out)["blockemu"]["image"] == str(img) and img.exists()
    assert err.endswith(f"(reproduce with: blockemu run {job} --image {img} --seed 1)\n")


def test_a_run_failures_reproduce_line_keeps_the_overrides_it_ran_under(tmp_path, capsys):
    """The line said ``blockemu run JOB --seed N`` alone: a failure under ``--key-removal hard``
    (or a shortened ``--runtime``/``--size``) was to be reproduced under the job file's own values
    -- generic-595's soft mode, where hard mode's loss never happens."""
    job = tmp_path / "j.fio"
    job.write_text("[j]\nrw=read\nsize=64k\nallow_file_create=0\n")
    rc, _, err = cli(capsys, "run", str(job), "--json", "--seed", "1", "--runtime", "500ms", "--size", "32k",
                     "--key-removal", "hard")
    assert rc == 1 and err.endswith(f"(reproduce with: blockemu run {job} --runtime 0.5 --size 32768 --key-removal hard "
                                    "--seed 1; add --image PATH to keep the image)\n"), err


def test_a_bad_primary_superblock_names_the_sound_mirror_and_the_repair(tmp_path, capsys):
    """ls, cat and mount said "superblock at 65536: checksum mismatch" and no more, while
    fsck --repair restores the primary from the mirror: the message says so when a mirror is
    sound, and not when none is; a primary without its magic beside a sound mirror is a damaged
    image, not "no blockemu image"."""
    img, host = tmp_path / "m.img", tmp_path / "x"
    host.write_bytes(b"x")
    assert cli(capsys, "mkfs", str(img), "--size", "72M")[0] == 0
    assert cli(capsys, "put", str(img), str(host), "/x")[0] == 0
    mirror = 64 << 20
    for offset, why in ((0x100, "checksum mismatch"), (0x40, "bad magic, not a blockemu image")):
        with open(img, "r+b") as f:
            f.seek(65536 + offset)
            f.write(b"\xff")
        hint = (f"{img}: superblock at 65536: {why}; the mirror at {mirror} is sound: "
                f"`blockemu fsck --repair {img}` restores it\n")
        for argv in (["ls", str(img), "/"], ["cat", str(img), "/x"], ["rescue", "zero-log", str(img)]):
            assert cli(capsys, *argv) == (1, "", f"blockemu: {argv[0]}: {hint}")
        assert cli(capsys, "fsck", str(img), "--repair")[0] == 1
        assert cli(capsys, "cat", str(img), "/x") == (0, "x", "")
    with open(img, "r+b") as f:  # the mirror broken too: nothing to name
        f.seek(65536 + 0x100)
        f.write(b"\xff")
        f.seek(mirror + 0x100)
        f.write(b"\xff")
    assert cli(capsys, "ls", str(img), "/") == (1, "", f"blockemu: ls: {img}: superblock at 65536: checksum mismatch\n")


def test_rescue_zero_log_on_an_image_it_cannot_write_with_no_log_has_nothing_to_do(tmp_path, capsys, monkeypatch):
    """It failed with EROFS on an image on a read-only file system (or a 0444 image of another
    user) though the docs say "no log: nothing to do, exit 0"; a command that must write says
    it in one line."""
    import errno

    from blockemu.device import imagelock

    img = str(tmp_path / "ro.img")
    assert cli(capsys, "mkfs", img, "--size", "16M")[0] == 0
    real_open = imagelock.os.open

    def read_only_fs(path, flags, *args):
        if path == img and flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(imagelock.os, "open", read_only_fs)
    assert cli(capsys, "rescue", "zero-log", img) == (0, f"{img}: no fsync log; nothing to do\n", "")
    assert cli(capsys, "mkdir", img, "/d") == (
        1, "", f"blockemu: mkdir: {img}: read-only file system (opening it for writing)\n")


@pytest.mark.parametrize("command, actions", [("inspect", "{dump-super,dump-tree,heatmap}"),
                                              ("key", "{add,remove,status}"), ("rescue", "{zero-log,use-backup-root}")])
def test_a_missing_action_is_named_by_its_choices(capsys, command, actions):
    """`blockemu inspect` alone said 'the following arguments are required: what' -- argparse's
    internal name -- where the newcomer needs the actions to choose from."""
    assert cli(capsys, command) == (
        2, "", f"blockemu: usage: blockemu {command}: the following arguments are required: {actions}\n")


def test_a_checksum_field_damaged_past_its_digest_is_not_called_a_mismatch_of_equal_digests(tmp_path, capsys):
    """A byte dd'ed into the zero fill of a checksum field (past crc32c's 4 bytes) made fsck say
    "checksum mismatch (found edf6402e, wanted edf6402e)" of a tree block, and dump-super print the
    right digest beside [DON'T MATCH]: the message says what is wrong, the fill."""
    from blockemu.ondisk.structs import SUPER_OFFSETS

    img = str(tmp_path / "f.img")
    assert cli(capsys, "mkfs", img, "--size", "16M")[0] == 0
    root = json.loads(cli(capsys, "inspect", "dump-super", img, "--json")[1])["root"]
    with open(img, "r+b") as f:
        f.seek(root + 30)
        f.write(b"\x12\x34")
    rc, out, err = cli(capsys, "fsck", img)
    assert rc == 4 and err == ""
    assert out.splitlines()[0] == (f"ERROR: [CSUM_MISMATCH] tree block {root}: checksum field not zero-filled "
                                   f"past its 4-byte digest (found {'00' * 26}1234)")
    with open(img, "r+b") as f:
        f.seek(SUPER_OFFSETS[0] + 10)
        f.write(b"\x01")
    why = f"checksum field not zero-filled past its 4-byte digest (found {'00' * 6}01{'00' * 21})"
    assert cli(capsys, "fsck", img) == (8, "", f"blockemu: fsck: {img}: no valid superblock: superblock at 65536: {why}\n")
    rc, out, err = cli(capsys, "inspect", "dump-super", img)
    assert (rc, err) == (0, "") and out.endswith(f"WARNING: {why}\n")


def test_dump_tree_goes_on_past_a_block_that_does_not_read(tmp_path, capsys):
    """One damaged leaf made dump-tree print nothing but its error: the one command that shows
    the trees hid all of them. As btrfs inspect-internal dump-tree, it names the block (one line
    on stderr) and prints the rest; exit 1, as any block that did not read."""
    from blockemu.check.inspect import dump_tree
    from tests.util import flip

    img, host = str(tmp_path / "d.img"), tmp_path / "h"
    host.write_bytes(b"hello")
    assert cli(capsys, "mkfs", img, "--size", "16M")[0] == 0
    assert cli(capsys, "put", img, str(host), "/f")[0] == 0
    whole = {b["tree"] for b in dump_tree(img)}
    (leaf,) = dump_tree(img, ["csum"])
    flip(img, leaf["bytenr"] + 300)
    rc, out, err = cli(capsys, "inspect", "dump-tree", img)
    assert rc == 1 and err.startswith(f"blockemu: inspect: {img}: tree block {leaf['bytenr']}: checksum mismatch (")
    assert err.count("\n") == 1
    assert [line for line in out.splitlines() if line.endswith(" tree")] == [
        f"{t} tree" for t in ("root", "extent", "fs", "free-space") if t in whole]
    rc, out, err = cli(capsys, "inspect", "dump-tree", img, "--json")
    assert rc == 1 and err.count("\n") == 1
    assert {b["tree"] for b in json.loads(out)} == whole - {"csum"}


def test_python_m_blockemu_without_its_dependencies_says_which_in_one_line(tmp_path):
    """From a checkout whose dependencies pip never installed, ``python3 -m blockemu`` died in a
    traceback from deep inside the format layer (ModuleNotFoundError: construct)."""
    code = ("import runpy, sys; sys.modules['construct'] = None; sys.argv = ['blockemu', 'fsck', 'x.img']; "
            "runpy.run_module('blockemu', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == ("blockemu: the Python package 'construct' is not installed: python3 -m venv .venv && "
                           ".venv/bin/pip install -e . (the README's first command)\n")


def test_stress_says_how_many_findings_its_text_report_left_out(tmp_path, capsys, monkeypatch):
    """The text summary printed the first ten ``detected:`` and ``FAILED:`` lines and nothing
    more, so 34 detected corruptions (or 13 failures) read as ten; the campaigns' reports say
    ``... and N more``, and so does stress now, pointing at --json, which lists them all."""
    import blockemu.workload.runner as runner

    async def fake_mix(image: str, **_: object) -> dict[str, object]:
        return {"ok": False, "ops": 8, "notes": [], "detected": [f"read: sector {i}" for i in range(12)],
                "problems": [f"lost write {i}" for i in range(13)]}

    monkeypatch.setattr(runner, "stress_mix", fake_mix)
    code, out, _ = cli(capsys, "stress", str(tmp_path / "s.img"), "--seed", "1", "--no-progress")
    lines = out.splitlines()
    assert code == 1 and sum(x.startswith("FAILED: lost write") for x in lines) == 10
    assert "detected: ... and 2 more (--json lists every one)" in lines
    assert "FAILED: ... and 3 more (--json lists every one)" in lines


def test_run_reads_a_job_file_from_standard_input_as_fio_does(capsys, monkeypatch):
    """``fio -`` reads its job file from standard input (a heredoc, a generated job);
    ``blockemu run -`` said "-: no such job file or built-in scenario". Its problems are named
    ``<stdin>:LINE``, as a file's are named by path."""
    import io

    def stdin(text: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text)))

    stdin(b"[x]\nrw=write\nsize=64k\nverify=crc32c\n")
    code, out, _ = cli(capsys, "run", "-", "--seed", "1", "--json")
    job = json.loads(out)["jobs"][0]
    assert code == 0 and job["jobname"] == "x" and job["write"]["io_bytes"] == 65536 and job["error"] == 0
    stdin(b"[x]\nrw=write\nsize=64k\nbogus=1\n")
    code, _, err = cli(capsys, "run", "-", "--parse-only")
    assert code == 1 and err == "blockemu: run: <stdin>:4: unknown option 'bogus'\n"
