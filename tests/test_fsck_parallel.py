"""fsck on two cores: on a large image, given a second core, a forked process runs the fs-tree
passes (check/forked.py). Its findings -- their order, fixes and the exit code -- are the single
process's, on the corruption corpus, on byte flips and on structural mutations; and the
``blockemu fsck`` command imports only what a check runs."""
from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blockemu.check import fsck as fsck_mod
from blockemu.check.forked import Forked, second_core
from blockemu.check.fsck import FsckReport, check
from blockemu.cli import fuzz
from tests.test_fsck_corpus import MANIFEST, unpack


@pytest.fixture
def forks(monkeypatch) -> list[int]:
    """Counts the checks that forked, so a test knows it compared the two paths."""
    made: list[int] = []

    class Counted(Forked):
        def __enter__(self):
            made.append(1)
            return super().__enter__()

    monkeypatch.setattr(fsck_mod, "Forked", Counted)
    return made


def same_findings(path: str, **kw) -> FsckReport:
    one = check(path, parallel=False, **kw)
    two = check(path, parallel=True, **kw)
    assert two.as_json() == one.as_json()
    assert two == one, "a field beyond the JSON (trees_damaged, bytes_used) differs"
    assert [e.fix for e in two.errors] == [e.fix for e in one.errors]
    assert two.exit_code == one.exit_code
    return one


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_findings_on_two_cores_are_the_single_process_ones(name, tmp_path, forks):
    case = MANIFEST[name]
    report = same_findings(str(unpack(name, tmp_path)), check_data=case["check_data"])
    assert case["code"] in {e.code for e in report.errors}
    assert forks or report.trees_damaged  # a check that stops before the fs tree has nothing to fork for


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> fuzz.Base:
    """The structural fuzz campaign's base image: an encrypted and a plain directory."""
    d = tmp_path_factory.mktemp("base")
    path, key_file = str(d / "base.img"), str(d / "key")
    Path(key_file).write_bytes(fuzz.KEY)
    asyncio.run(fuzz.populated(path, 5, size="48M", files=fuzz.FILES, max_file=48_000))
    return fuzz.load_base(path, key_file)


def test_byte_flips_give_the_same_findings_on_two_cores(base, tmp_path, forks):
    work = str(tmp_path / "flip.img")
    blocks = sorted(base.raw)
    flagged = 0
    for i in range(40):
        fuzz.flip(base.path, work, blocks, base.sb.nodesize, base.sb.csum_type, random.Random(f"7:{i}"), i % 2 == 0)
        try:
            flagged += not same_findings(work, key=fuzz.KEY).clean
        except OSError as e:  # an operational error: the same from both paths
            with pytest.raises(type(e), match=re.escape(str(e))):
                check(work, parallel=True)
    assert flagged > 10 and len(forks) > 10


def test_structural_mutations_give_the_same_findings_on_two_cores(base, tmp_path, forks):
    """Shared and looped blocks across trees, lying levels and counts, wild item fields: whatever
    the walk of the fs tree meets, the forked walk meets the same."""
    work = str(tmp_path / "mutated.img")
    flagged = 0
    for i in range(40):
        _, patches = fuzz.mutate(base, random.Random(f"9:{i}"))
        base.write(work, patches)
        try:
            flagged += not same_findings(work, key=fuzz.KEY, check_data=i % 4 == 0).clean
        except OSError as e:
            with pytest.raises(type(e), match=re.escape(str(e))):
                check(work, parallel=True)
    assert flagged > 20 and len(forks) > 20


def test_a_clean_image_checks_the_same_on_two_cores(base, forks):
    report = same_findings(base.path, key=fuzz.KEY)
    assert report.clean and report.stats["inodes"] > 2 * fuzz.FILES and forks


def test_the_check_never_writes_the_image(base, tmp_path):
    before = Path(base.path).read_bytes()
    check(base.path, parallel=True, check_data=True)
    assert Path(base.path).read_bytes() == before


def test_a_forked_call_returns_the_childs_result_or_none():
    with Forked(os.getpid) as side:
        assert side.result() not in (None, os.getpid())
    with Forked(lambda: 1 // 0) as side:  # the child raised: the caller does the work itself
        assert side.result() is None


def test_leaving_without_the_result_reaps_the_child():
    r, w = os.pipe()

    def wait_forever() -> None:
        os.close(w)
        os.read(r, 1)  # never returns: the parent never writes

    with Forked(wait_forever) as side:
        pid = side.pid
    os.close(r)
    os.close(w)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_the_fsck_command_imports_only_what_a_check_runs(base):
    """No event loop, no workload, fs, FUSE or Ray layer, no rich without a bar: the command's
    start was a quarter of a large check."""
    code = ("import contextlib, io, sys\nfrom blockemu.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    rc = main(['fsck', '--json', sys.argv[1]])\n"
            "print(rc, *sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, base.path], capture_output=True, text=True, check=True).stdout
    rc, *loaded = out.split()
    assert rc == "0"
    assert "blockemu.check.fsck" in loaded
    unwanted = [m for m in loaded if m.split(".")[0] in ("asyncio", "ray", "rich", "hypothesis", "pyfuse3", "aiofiles")
                or m.startswith(("blockemu.workload", "blockemu.fs", "blockemu.fuse", "blockemu.check.repair"))]
    assert unwanted == []


def test_an_image_too_small_to_share_is_checked_in_one_process(base, forks):
    assert check(base.path).clean and not forks


def test_a_child_that_dies_costs_one_more_check_in_one_process(tmp_path, monkeypatch):
    """Killed (the OOM killer, say) before it sends its findings: the check's result is still the
    single process's, never a report without the child's part."""
    image = str(unpack("nlink", tmp_path))
    parent, real = os.getpid(), fsck_mod.fs_findings

    def dies_in_the_child(*args):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    monkeypatch.setattr(fsck_mod, "fs_findings", dies_in_the_child)
    report = check(image, parallel=True)
    assert report.as_json() == check(image, parallel=False).as_json()
    assert "NLINK_MISMATCH" in {e.code for e in report.errors}


def test_a_second_process_only_with_a_second_core(monkeypatch):
    """Pinned to one core (taskset), a second process would only take turns with the first."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert second_core()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert not second_core()


def test_no_fork_by_default_beside_other_threads(base, forks, monkeypatch):
    """The async ``fsck()`` runs the check in a thread of the caller's loop: a fork there could
    leave the child waiting for ever on a lock another thread held. Only a lone thread forks.
    The threads this process had before the test (pytest-xdist's worker runs two) are not
    counted: the check must see only the thread the async ``fsck()`` adds."""
    before, count = threading.active_count() - 1, threading.active_count
    monkeypatch.setattr(threading, "active_count", lambda: count() - before)
    monkeypatch.setattr(fsck_mod, "PARALLEL_ITEMS", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert check(base.path).clean and len(forks) == 1
    assert asyncio.run(fsck_mod.fsck(base.path)).clean and len(forks) == 1
