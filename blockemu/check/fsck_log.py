"""fsck of the fsync log tree (SPEC "Log tree"). A non-empty log is no error -- the next
read-write mount replays it -- so it is reported as a note; but replay trusts it, so its
blocks must be readable tree blocks of the log, and what it names must be replayable: blocks
and new extents in space the committed trees leave free (the committed free-space record
calls them free, by design), inodes the fs tree holds, checksums for every new extent."""
from __future__ import annotations

from bisect import bisect_right
from typing import Any

from blockemu.engine.treelog import read_log
from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import FileExtent

LOG = S.TREE_LOG_OBJECTID


def _overlaps(taken: list[tuple[int, int]], starts: list[int], start: int, length: int) -> bool:
    i = bisect_right(starts, start) - 1
    for s, n in taken[max(i, 0):i + 2]:
        if s < start + length and start < s + n:
            return True
    return False


def check_log(ck: Any, sb: Any, extents: list[tuple[int, int]]) -> None:
    """``extents``: every extent the committed extent tree records, (start, length)."""
    if not sb.log_root:
        return
    try:
        blocks, items = read_log(ck.img.read, sb)
    except CorruptionError as e:
        ck.error(e.kind, f"log tree: {e}", LOG, e.bytenr)
        return
    taken = sorted(extents)
    starts = [s for s, _ in taken]
    for bytenr in blocks:
        if not ck._in_usable(bytenr, sb.nodesize) or _overlaps(taken, starts, bytenr, sb.nodesize):
            ck.error("LOG_OVERLAP", f"log tree block {bytenr} lies in space the committed trees use", LOG, bytenr)
    fs_inodes = {k[0] for k, _ in ck.items.get(S.FS_TREE_OBJECTID, []) if k[1] == S.INODE_ITEM}
    csummed: dict[int, int] = {}
    for key, body in items:
        if key[:2] == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM):
            csummed[key[2]] = len(body)
    size = csums.csum_size(sb.csum_type)
    new_extents: dict[int, int] = {}
    inodes = set()
    for key, body in items:
        ino, typ, off = key
        if typ == S.INODE_ITEM:
            inodes.add(ino)
            if ino not in fs_inodes:
                ck.error("BAD_LOG_ITEM", f"log tree: inode {ino} is not in the fs tree", LOG, key=key)
        elif typ == S.EXTENT_DATA:
            try:
                fe = FileExtent.unpack(body)
            except CorruptionError as e:
                ck.error("BAD_LOG_ITEM", f"log tree: {key}: {e}", LOG, key=key)
                continue
            if ino not in inodes:
                ck.error("BAD_LOG_ITEM", f"log tree: extent item {key} of an inode the log does not hold", LOG, key=key)
            if fe.offset + fe.num_bytes > fe.disk_num_bytes or fe.num_bytes % S.SECTOR_SIZE:
                ck.error("BAD_LOG_ITEM", f"log tree: extent item {key} reaches past its extent", LOG, key=key)
            if new_extents.setdefault(fe.disk_bytenr, fe.disk_num_bytes) != fe.disk_num_bytes:
                ck.error("BAD_LOG_ITEM", f"log tree: extent {fe.disk_bytenr} logged with two lengths", LOG, fe.disk_bytenr)
        elif typ != S.EXTENT_CSUM:
            ck.error("BAD_LOG_ITEM", f"log tree: unexpected item {key}", LOG, key=key)
    for bytenr, length in sorted(new_extents.items()):
        if (bytenr % S.SECTOR_SIZE or length % S.SECTOR_SIZE or not ck._in_usable(bytenr, length)
                or _overlaps(taken, starts, bytenr, length)):
            ck.error("LOG_OVERLAP", f"log tree: new extent [{bytenr}, +{length}) lies in space the committed trees use",
                     LOG, bytenr)
        have = sum(n for start, n in csummed.items() if bytenr <= start < bytenr + length)
        if have != length // S.SECTOR_SIZE * size:
            ck.error("MISSING_CSUM", f"log tree: extent [{bytenr}, +{length}) has {have // size} of "
                     f"{length // S.SECTOR_SIZE} sector checksums", LOG, bytenr)
    ck.report.notes.append(f"log tree: {len(items)} items of {len(inodes)} fsynced inodes in {len(blocks)} blocks, "
                           f"replayed at the next read-write mount")
    ck.report.stats["log_items"] = len(items)
