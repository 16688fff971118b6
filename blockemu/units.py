"""Sizes as users write them (fio and mkfs.btrfs: K/M/G/T/P suffixes, binary)."""
from __future__ import annotations

import re

from blockemu.errors import InvalidArgument

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"bad size {text!r}: negative")
        return text
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+(?:\.\d+)?)\s*([kmgtpKMGTP]?)(?:i?[bB])?\s*", text)
    if not m:
        raise InvalidArgument(f"bad size {text!r}: expected a number with an optional K/M/G/T/P suffix")
    num = int(m[1], 16) if m[1].startswith("0x") else float(m[1])
    return int(num * _SUFFIX[m[2].lower()])


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    return str(n)  # pragma: no cover
