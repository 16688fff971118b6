"""The corruption corpus (tools/make_corpus.py): fsck finds each class, never writes without
--repair, repairs exactly what it claims to, and a second fsck is then clean."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())


def fsck(image: Path, *extra: str) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-m", "blockemu", "fsck", str(image), "--json", *extra],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, json.loads(p.stdout)


def unpack(name: str, tmp_path: Path, corpus: Path = CORPUS) -> Path:
    out = tmp_path / f"{name}.img"
    with gzip.open(corpus / f"{name}.img.gz", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_image(name, tmp_path):
    check_case(unpack(name, tmp_path), MANIFEST[name])


# the cases the generator once failed at: free_items became a sorted dict, and a name in the
# encrypted /secret cannot be looked up by its plaintext
REGENERATED = ["orphan-csum", "free-space", "plaintext-extent"]


def test_the_generator_still_makes_the_corpus(tmp_path):
    """tools/make_corpus.py had rotted (it failed at these cases) with nothing to notice: it
    runs here into a temporary directory, and what it makes passes what the corpus must."""
    out = tmp_path / "corpus"
    p = subprocess.run([sys.executable, str(CORPUS.parent.parent / "tools" / "make_corpus.py"), "--out", str(out),
                        *REGENERATED], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    made = json.loads((out / "manifest.json").read_text())
    assert made == {name: MANIFEST[name] for name in REGENERATED}
    for name in REGENERATED:
        check_case(unpack(name, tmp_path, out), made[name])


def check_case(image: Path, case: dict) -> None:
    """fsck finds the case's class, writes nothing without --repair, and repairs what it claims to."""
    extra = ("--check-data",) if case["check_data"] else ()
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    rc, report = fsck(image, *extra)
    assert rc == 4 and not report["clean"]
    assert case["code"] in {e["code"] for e in report["errors"]}, report["errors"]
    for e in report["errors"]:
        assert e["message"] and e["code"].isupper()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest  # read-only without --repair
    rc, repaired = fsck(image, "--repair", *extra)
    if case["repairable"]:
        assert rc == 1 and repaired["clean"], repaired
        assert case["code"] in {e["code"] for e in repaired["repaired"]}
        rc, again = fsck(image, *extra)
        assert rc == 0 and again["clean"], again
    else:
        assert rc == 4 and case["code"] in {e["code"] for e in repaired["errors"]}


def test_manifest_covers_the_classes_fsck_reports():
    codes = {c["code"] for c in MANIFEST.values()}
    for code in ("CSUM_MISMATCH", "BAD_TREE_BLOCK", "KEY_ORDER", "EXTENT_REF_MISMATCH", "NLINK_MISMATCH",
                 "ISIZE_MISMATCH", "DIR_ITEM_MISMATCH", "MISSING_CSUM", "NONCE_REUSE",
                 "UNENCRYPTED_EXTENT_IN_ENCRYPTED_FILE", "SUPERBLOCK", "FREE_SPACE_MISMATCH", "BAD_ENCRYPTED_SYMLINK",
                 "LOG_OVERLAP"):
        assert code in codes, code


def test_the_cyclic_collector_pauses_for_the_check_only(tmp_path):
    """fsck makes millions of small tuples and no cycles: the collector, which would walk them
    again and again, is off while the passes run, and on again (if it was) when they end."""
    import gc

    from blockemu.check.fsck import check
    image = unpack(sorted(MANIFEST)[0], tmp_path)
    during: list[bool] = []
    assert gc.isenabled()
    check(str(image), progress=lambda n, phase: during.append(gc.isenabled()))
    assert during and not any(during) and gc.isenabled()
    gc.disable()
    try:
        check(str(image))
        assert not gc.isenabled()
    finally:
        gc.enable()
