"""Pictures and data for people: the image heatmap, the race report, the kernel peer."""
from __future__ import annotations

import csv
import json
import os
import struct

import pytest

from blockemu.check import heatmap
from blockemu.check.inspect import dump_tree
from blockemu.workload import kernelpeer
from tests.test_cli import run

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def known_image(tmp_path_factory) -> str:
    """64 MiB: one 3,000,000-byte plain file and one encrypted copy (733 sectors each)."""
    d = tmp_path_factory.mktemp("heat")
    img, key, big = str(d / "a.img"), d / "k", d / "big"
    key.write_bytes(bytes(range(32)))
    big.write_bytes(os.urandom(3_000_000))
    run("mkfs", img, "--size", "64M")
    run("mkdir", img, "/enc", "--encrypt", "--key-file", str(key))
    run("put", img, str(big), "/plain")
    run("put", img, str(big), "/enc/f", "--key-file", str(key))
    return img


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_heatmap_of_a_known_image_counts_each_class(known_image, tmp_path):
    out = str(tmp_path / "h.png")
    d = json.loads(run("inspect", "heatmap", known_image, out, "--json").stdout)
    c = d["counts"]
    assert d["cell_bytes"] == 4096 and d["cells"] == 16384
    assert c["data-plain"] == 733 and c["data-encrypted"] == 733
    assert c["superblock"] == 1 and c["reserved"] == 255  # the first MiB, but its superblock
    for tree in ("root", "extent", "fs", "csum", "free-space"):  # each tree is one 16 KiB leaf here
        assert c[f"{tree}-tree"] == 4
    assert c["unknown"] == 0 and c["corrupt"] == 0 and not d["problems"]
    assert c["free"] == 16384 - sum(n for k, n in c.items() if k != "free")
    # the run-length encoding expands to the same cells, in address order
    cells = [cls for cls, n in d["runs"] for _ in range(n)]
    assert len(cells) == d["cells"] and cells[16] == "superblock" and cells[0] == "reserved"
    assert {k: cells.count(k) for k in c} == c
    assert png_size(out) == (1000, 800)


def test_heatmap_of_a_corrupted_image_still_draws(known_image, tmp_path):
    """The fs tree's root leaf smashed: its block shows as corrupt, the data it described
    as unknown (allocated, owner unreadable), the rest as before."""
    bad = str(tmp_path / "bad.img")
    with open(known_image, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read())
    fs_root = next(b["bytenr"] for b in dump_tree(bad, ["fs"]))
    with open(bad, "r+b") as f:
        f.seek(fs_root + 200)
        f.write(b"\xff" * 64)
    out = str(tmp_path / "bad.png")
    d = json.loads(run("inspect", "heatmap", bad, out, "--json").stdout)
    c = d["counts"]
    assert c["corrupt"] == 4 and c["fs-tree"] == 0 and d["problems"]
    assert c["data-plain"] == 0 and c["data-encrypted"] == 0 and c["unknown"] == 2 * 733
    assert png_size(out) == (1000, 800)


def test_heatmap_without_a_superblock_is_all_unknown(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x00" * (2 << 20))
    hm = heatmap.build(str(junk))
    assert hm.counts()["unknown"] == 512 and hm.problems


def test_hilbert_curve_visits_each_cell_once_with_unit_steps():
    pts = [heatmap.hilbert_xy(16, d) for d in range(256)]
    assert len(set(pts)) == 256
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(pts, pts[1:]))


@pytest.mark.parametrize("cells", [1 << 19, 1 << 20, (1 << 18) + 1, 5])
def test_heatmap_grid_is_the_part_the_curve_reaches_on_its_long_side(cells):
    """A 2 GiB image's 2^19 cells fill half the 1024 x 1024 square; drawn whole it was a narrow
    strip beside an empty half. The grid holds every cell once and, for a half, nothing else."""
    import numpy as np

    hm = heatmap.Heatmap(cells * 4096, 4096)
    hm.cells[:] = bytes(i % len(heatmap.CLASSES) for i in range(cells))
    g = heatmap.grid(hm)
    assert g.shape[1] >= g.shape[0]
    assert np.count_nonzero(~np.isnan(g)) == cells
    assert sorted(np.bincount(g[~np.isnan(g)].astype(int))) == sorted(np.bincount(np.frombuffer(bytes(hm.cells), np.uint8)))
    if cells == 1 << 19:
        assert g.shape == (512, 1024)


@pytest.mark.parametrize("schedule", ["seeded", "free"])
def test_kernel_peer_loses_nothing(schedule):
    """generic/595 on the real kernel (root, loop devices: CI): every acknowledged append survives."""
    why = kernelpeer.why_not(None)
    if why:
        pytest.skip(f"kernel peer: {why}")
    r = kernelpeer.run_kernel_race(seed=5, schedule=schedule, steps=400, duration=0.5)
    assert r.mode == "kernel" and r.attempted and r.acknowledged and r.removals
    assert r.lost == 0 and not r.other_errors, r.other_errors[:3]
    assert r.acknowledged + r.refused <= r.attempted


def test_kernel_peer_on_a_directory_the_user_names():
    """``--kernel-peer DIR``: the race in a fresh subdirectory of DIR, judged after a drop of caches; DIR is left as found."""
    why = kernelpeer.why_not(None)
    if why:
        pytest.skip(f"kernel peer: {why}")
    with kernelpeer.ext4_mount() as (mnt, _):
        before = sorted(os.listdir(mnt))
        r = kernelpeer.run_kernel_race(mnt, seed=2, schedule="seeded", steps=300)
        assert sorted(os.listdir(mnt)) == before
    assert r.acknowledged and r.lost == 0 and not r.other_errors


def test_kernel_peer_unavailable_is_one_line_and_the_table_still_prints(tmp_path):
    p = run("stress", str(tmp_path / "r.img"), "--scenario", "key-removal-race", "--schedule", "seeded", "--ops", "60",
            "--seed", "1", "--kernel-peer", str(tmp_path / "missing"))
    lines = p.stdout.splitlines()
    assert any(line.split()[:1] == ["soft"] for line in lines)
    assert [line for line in lines if line.startswith("kernel peer not run: ")] == [
        f"kernel peer not run: {tmp_path / 'missing'} is not a directory"]


def test_report_from_a_seeded_run_matches_its_table(tmp_path):
    """The CLI's table, its JSON, the report's JSON and CSV all carry the same rows, and every plot is a PNG.
    With root and loop devices the kernel is a row too, and loses nothing."""
    out = tmp_path / "rep"
    args = ["stress", str(tmp_path / "r.img"), "--scenario", "key-removal-race", "--compare-modes", "--schedule", "seeded",
            "--ops", "150", "--seed", "7", "--report", str(out), "--kernel-peer"]
    printed = json.loads(run(*args, "--json").stdout)
    doc = json.loads((out / "race.json").read_text())
    modes = ["soft", "hard", "sync", "deny-writes"] + ([] if kernelpeer.why_not(None) else ["kernel"])
    assert [r["mode"] for r in doc["results"]] == modes
    for mine, shown in zip(doc["results"], printed["results"]):
        assert mine == {k: shown[k] for k in mine}
    with open(out / "race.csv") as f:
        rows = list(csv.DictReader(f))
    assert [{k: str(v) for k, v in r.items()} for r in doc["results"]] == rows
    assert set(doc["wipe_delays_ms"]) == set(modes)
    assert all(len(doc["wipe_delays_ms"][r["mode"]]) == r["wipes"] for r in doc["results"])
    assert [s["append_size"] for s in doc["hard_sweep"]] == [1, 1024, 4096, 16384, 65536]
    assert all(s["lost_bytes"] == s["lost"] * s["append_size"] for s in doc["hard_sweep"])
    for name in ("outcomes.png", "wipe-latency.png", "hard-loss-vs-dirty.png"):
        assert png_size(str(out / name)) == (800, 450)
    assert sorted(printed["report"]) == sorted(str(out / f) for f in os.listdir(out))
    if "kernel" in modes:
        assert doc["results"][-1]["lost"] == 0 and doc["results"][-1]["acknowledged"] > 0
    else:
        assert doc["kernel_peer_not_run"]


def test_race_only_flags_on_the_mix_are_a_usage_error(tmp_path):
    p = run("stress", str(tmp_path / "m.img"), "--report", str(tmp_path / "rep"), check_rc=2)
    assert p.stderr.strip() == "blockemu: usage: blockemu stress: --kernel-peer and --report belong to --scenario key-removal-race"


def test_a_report_dir_that_cannot_be_made_is_said_before_the_race(tmp_path):
    """--report FILE (a file, not a directory) ran the whole race and the hard sweep, then died on
    makedirs: the table was never printed. Now it is said before the race makes its image."""
    taken = tmp_path / "taken"
    taken.write_text("")
    img = tmp_path / "r.img"
    p = run("stress", str(img), "--scenario", "key-removal-race", "--duration", "1", "--report", str(taken),
            check_rc=1)
    assert p.stderr == f"blockemu: stress: {taken}: File exists\n" and not img.exists()
