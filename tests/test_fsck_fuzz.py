"""A seeded slice of tools/fuzz_fsck.py: byte flips in metadata never crash fsck, and raw flips
are always detected (exit 4 or 8)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from fuzz_fsck import campaign  # noqa: E402


def test_raw_flips_are_always_detected():
    out = io.StringIO()
    counts = campaign(40, seed=11, recsum=False, out=out)
    assert counts["crash"] == 0, out.getvalue()
    assert counts["missed"] == 0, out.getvalue()


def test_checksum_valid_flips_never_crash():
    out = io.StringIO()
    counts = campaign(80, seed=12, recsum=True, out=out)
    assert counts["crash"] == 0, out.getvalue()
    assert counts["detected"] > 0  # (many flips land in a leaf's unused middle: harmless, so no rate is asserted)
