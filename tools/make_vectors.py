#!/usr/bin/env python3
"""Regenerate format/vectors/: one golden vector per struct of blockemu/ondisk/structs.py,
plus a leaf, a node and a superblock encoded by the real codecs.

Run it only when the format changes on purpose (and bump the format version):
tests/test_format.py pins these bytes, so a silent layout change fails the suite.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import construct as c

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockemu.ondisk import structs as S  # noqa: E402
from blockemu.ondisk.block import TreeBlock, encode_block  # noqa: E402
from blockemu.ondisk.superblock import SuperInfo, encode_super  # noqa: E402

OUT = ROOT / "format" / "vectors"


def sample(con: Any, seed: str) -> Any:
    """Deterministic, field-specific sample values: every field distinct, so a swap shows."""
    if isinstance(con, c.Renamed):
        return sample(con.subcon, seed)
    if isinstance(con, c.Struct):
        return {sub.name: sample(sub, f"{seed}.{sub.name}") for sub in con.subcons if sub.name and not isinstance(sub.subcon, c.Const)}
    if isinstance(con, c.Array):
        return [sample(con.subcon, f"{seed}[{i}]") for i in range(con.count)]
    digest = hashlib.sha256(seed.encode()).digest()
    if isinstance(con, c.FormatField):  # a signed field (struct's lower-case letter) reads its bytes signed
        return int.from_bytes(digest[: con.length], "little", signed=con.fmtstr[-1].islower())
    if isinstance(con, c.Bytes):
        return (digest * (con.length // 32 + 1))[: con.length]
    raise TypeError(con)


def plain(obj: Any) -> Any:
    """construct Containers/ListContainers -> JSON-able values (bytes as hex strings)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, bytes):
        return {"hex": obj.hex()}
    return obj


def write(name: str, raw: bytes, fields: Any) -> None:
    (OUT / f"{name}.bin").write_bytes(raw)
    (OUT / f"{name}.json").write_text(json.dumps(plain(fields), indent=1, sort_keys=True) + "\n")


FSID = bytes.fromhex("00112233445566778899aabbccddeeff")


def sample_blocks() -> dict[str, tuple[TreeBlock, int]]:
    leaf = TreeBlock(bytenr=1 << 20, generation=7, owner=S.FS_TREE_OBJECTID, level=0,
                     keys=[(256, S.INODE_ITEM, 0), (256, S.INODE_REF, 256), (257, S.EXTENT_DATA, 4096)],
                     values=[bytes(160), b"\x00" * 8 + b"\x02\x00..", b"\x07" * 53])
    node = TreeBlock(bytenr=2 << 20, generation=9, owner=S.EXTENT_TREE_OBJECTID, level=1,
                     keys=[(0, 0, 0), (5 << 20, S.METADATA_ITEM, 0)], ptrs=[(3 << 20, 8), (4 << 20, 9)])
    return {"leaf_4k_crc32c": (leaf, 0), "node_4k_xxhash64": (node, 1)}


def sample_super() -> SuperInfo:
    return SuperInfo(fsid=FSID, generation=42, root=1 << 20, root_level=1, total_bytes=1 << 30, bytes_used=5 << 20,
                     nodesize=16384, csum_type=0, label="golden")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, con in S.STRUCTS.items():
        value = sample(con, name)
        raw = con.build(value)
        write(name, raw, con.parse(raw))
    for name, (block, csum_type) in sample_blocks().items():
        (OUT / f"{name}.bin").write_bytes(encode_block(block, nodesize=4096, csum_type=csum_type, fsid=FSID))
    (OUT / "superblock_primary.bin").write_bytes(encode_super(sample_super(), 65536))
    print(f"wrote {len(list(OUT.iterdir()))} files to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
