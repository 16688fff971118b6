"""Seeded slices of blockemu fuzz: byte flips in metadata never crash fsck, and raw flips
are always detected (exit 4 or 8); structurally hostile images never make a command crash, hang
or bloat."""
from __future__ import annotations

import io

from blockemu.cli.fuzz import campaign, structural


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


def test_structural_slice_no_traceback_hang_or_bloat():
    """Structural mutations with valid checksums (shared children, loops, lying levels, huge counts
    and lengths, pointers out of range, a bad free-space record), each image through ls, cat, mkdir,
    inspect dump-tree, fsck and fsck --repair in a forked child: no traceback, no command past
    10 s, peak RSS under 300 MB. The full campaign: blockemu fuzz --structural --images 2000."""
    out = io.StringIO()
    t = structural(36, seed=21, out=out)
    assert t["traceback"] == 0 and t["hang"] == 0, out.getvalue()
    assert t["max_growth_mb"] < 250, out.getvalue()  # over this (pytest) process: a fresh CLI starts near 40 MB
    assert t["commands"] == 36 * 8 and t["fsck_detected"] > 30, out.getvalue()
