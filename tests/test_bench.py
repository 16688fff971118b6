"""tools/bench.py's pairings are fair (issue 16): where a figure's flushes are the point, the
devices of both sides are laid out or neither is -- a sparse one's flushes pay the host's
allocation of each block first written (DESIGN §10), a cost of the host on one side only."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIO_JSON = json.dumps({"jobs": [{"write": {"iops": 1000.0}, "sync": {"lat_ns": {"percentile": {"50.000000": 1e6}}}}]})


def load_bench():
    """tools/bench.py, loaded from its file (tools is a folder, not a package)."""
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent.parent / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def laid_out(path: str) -> bool:
    with open(path, "rb") as f:
        return os.lseek(f.fileno(), 0, os.SEEK_HOLE) == os.fstat(f.fileno()).st_size


def test_the_fio_peer_runs_kernel_btrfs_on_a_laid_out_loop_image(tmp_path, monkeypatch):
    """blockemu's fio rows run on a preallocated image; the btrfs-like peer's device, its loop
    image, was sparse, so each of its flushes paid the host's allocation besides. The tools the
    figure runs (fio, blockemu run, mkfs.btrfs, mount) answer here at once; what is checked is
    the loop image as mkfs.btrfs is given it."""
    bench = load_bench()
    peer_images: dict[str, bool] = {}

    def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        if argv[0] == "mkfs.btrfs":
            peer_images[argv[-1]] = laid_out(argv[-1])
        if argv[:4] == [sys.executable, "-m", "blockemu", "run"]:
            Path(argv[argv.index("--image") + 1]).touch()  # the image the run made, which the figure deletes
        return subprocess.CompletedProcess(argv, 0, stdout=FIO_JSON, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bench, "kernel_btrfs_available", lambda: True)
    monkeypatch.setattr(bench, "PEER_IMAGE_SIZE", 8 << 20)
    figures = bench.fig_fio(str(tmp_path), rounds=2)
    assert list(peer_images.values()) == [True, True]
    assert all(f.ours is not None and f.reference is not None for f in figures)
