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


def unpack(name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.img"
    with gzip.open(CORPUS / f"{name}.img.gz", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_image(name, tmp_path):
    case = MANIFEST[name]
    image = unpack(name, tmp_path)
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
