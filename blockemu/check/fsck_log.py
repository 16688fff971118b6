"""fsck of the fsync log tree (SPEC "Log tree"). A non-empty log is no error -- the next
read-write mount replays it -- so it is reported as a note; but replay trusts it, so its
blocks must be readable tree blocks of the log, and what it names must be replayable: blocks
and new extents in space the committed trees leave free (the committed free-space record
calls them free, by design), inodes the fs tree holds, checksums for every new extent -- and,
with ``--check-data``, the new extents' data matching those checksums, as the committed data is
checked. A damaged log (one replay would refuse) makes the read-write mount fail; ``blockemu
rescue zero-log`` drops it, and with it what was fsynced since the last commit, as ``btrfs
rescue zero-log`` does, so the note says so."""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable

from blockemu.display import counted
from blockemu.engine.treelog import Log, choose_log, extent_csums, read_log
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


ZERO_LOG = ("the log is damaged: `blockemu rescue zero-log` drops it, and what was fsynced since the last commit "
            "with it")


def check_log(ck: Any, sb: Any, extents: list[tuple[int, int]], read: Callable[[int, int], bytes] | None = None) -> None:
    """``extents``: every extent the committed extent tree records, (start, length). ``read``
    (``--check-data``): also read every logged data sector and compare it with its checksum."""
    if not sb.log_root:
        return
    try:
        sb, passed, log = choose_log(ck.img.read, sb)  # a newer log sync that did not land whole is no damage: a note
    except OSError as e:  # a slot's log landed but does not read, or EIO: mount fails on it too
        _log_error(ck, e)
        ck.report.notes.append(ZERO_LOG)
        return
    ck.report.notes.extend(passed)
    before = len(ck.report.errors)
    bad_data = _check(ck, sb, log, extents, read)
    if len(ck.report.errors) - before > bad_data:  # damaged data replays (and fails its reads); a damaged log does not
        ck.report.notes.append(ZERO_LOG)


def _log_error(ck: Any, e: OSError) -> None:
    """The log does not read: the chain's own errors name the log already; a block's do not."""
    text = str(e)
    ck.error(getattr(e, "kind", "BAD_LOG_ITEM"), text if text.startswith("log tree") else f"log tree: {text}", LOG,
             getattr(e, "bytenr", None))


def _check(ck: Any, sb: Any, log: Log | None, extents: list[tuple[int, int]],
           read: Callable[[int, int], bytes] | None) -> int:
    """Reports what is wrong; returns how many of those reports are data sectors (with ``read``).
    ``log``: the log as ``choose_log`` read it (None: read here)."""
    try:
        blocks, items = read_log(ck.img.read, sb) if log is None else log
    except CorruptionError as e:
        _log_error(ck, e)
        return 0
    taken = sorted(extents)
    starts = [s for s, _ in taken]
    for bytenr in blocks:
        if not ck._in_usable(bytenr, sb.nodesize) or _overlaps(taken, starts, bytenr, sb.nodesize):
            ck.error("LOG_OVERLAP", f"log tree block {bytenr} lies in space the committed trees use", LOG, bytenr)
    fs_inodes = {k[0] for k in ck.keys.get(S.FS_TREE_OBJECTID, []) if k[1] == S.INODE_ITEM and not k[2]}
    # an inode the walk did not find may be in an fs tree block it could not read: "not in the fs
    # tree" then called a sound log damaged, and its note pointed at zero-log, which drops the
    # fsyncs and leaves the damage where it was. Only there: excusing every inode while any fs
    # tree block was damaged judged sound a log naming an inode the readable leaves show absent
    lost = ck.lost.get(S.FS_TREE_OBJECTID, [])
    csummed: list[tuple[tuple[int, int, int], bytes]] = []  # in key order, as the log holds them
    size = csums.csum_size(sb.csum_type)
    bad_data = 0
    for key, body in items:
        if key[:2] == (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM):
            csummed.append((key, body))
    new_extents: dict[int, int] = {}
    inodes = set()
    for key, body in items:
        ino, typ, off = key
        if typ == S.INODE_ITEM:
            inodes.add(ino)
            if off:  # replay, as the filesystem, takes the inode at (ino, INODE_ITEM, 0) (fsck_fs._file_inodes)
                ck.error("BAD_LOG_ITEM", f"log tree: {key}: INODE_ITEM key offset {off}, not 0", LOG, key=key)
            elif ino not in fs_inodes and not any((lo is None or key >= lo) and (hi is None or key < hi)
                                                  for lo, hi in lost):
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
            if off % S.SECTOR_SIZE:  # replayed, every read of the file failed on it (fsck said clean)
                ck.error("BAD_LOG_ITEM", f"log tree: extent item {key} is not at a sector-aligned file offset", LOG,
                         key=key)
            if new_extents.setdefault(fe.disk_bytenr, fe.disk_num_bytes) != fe.disk_num_bytes:
                ck.error("BAD_LOG_ITEM", f"log tree: extent {fe.disk_bytenr} logged with two lengths", LOG, fe.disk_bytenr)
        elif typ != S.EXTENT_CSUM:
            ck.error("BAD_LOG_ITEM", f"log tree: unexpected item {key}", LOG, key=key)
    starts_c = [k[2] for k, _ in csummed]
    for bytenr, length in sorted(new_extents.items()):
        if (bytenr % S.SECTOR_SIZE or length % S.SECTOR_SIZE or not ck._in_usable(bytenr, length)
                or _overlaps(taken, starts, bytenr, length)):
            ck.error("LOG_OVERLAP", f"log tree: new extent [{bytenr}, +{length}) lies in space the committed trees use",
                     LOG, bytenr)
        # as replay cuts them: an item may span several extents
        mine = extent_csums(csummed, starts_c, bytenr, length, size, length)
        if read is not None:  # replay uses these digests only: of an extent overwritten again, none
            bad_data += sum(_check_data(ck, sb, key[2], body, size, read) for key, body in mine)
        have = sum(len(b) for _, b in mine)
        if have != length // S.SECTOR_SIZE * size:
            ck.error("MISSING_CSUM", f"log tree: extent [{bytenr}, +{length}) has {have // size} of "
                     f"{length // S.SECTOR_SIZE} sector checksums", LOG, bytenr)
    ck.report.notes.append(f"log tree: {counted(len(items), 'item')} of {counted(len(inodes), 'fsynced inode')} in "
                           f"{counted(len(blocks), 'block')}, replayed at the next read-write mount")
    ck.report.stats["log_items"] = len(items)
    return bad_data


def _check_data(ck: Any, sb: Any, start: int, body: bytes, size: int, read: Callable[[int, int], bytes]) -> int:
    """The sectors of a logged extent one checksum item covers, read and digested (a damaged
    sector makes replay bring back bytes that fail their checksum at the first read). Only the
    extents the log's EXTENT_DATA items name: a sector overwritten again in the logged
    transaction keeps its checksum in the log, but replay neither maps nor reserves it, so its
    commit may reuse it -- a power cut there left a clean image that fsck called damaged.
    Returns how many are bad."""
    bad = 0
    for i in range(len(body) // size):
        sector = start + i * S.SECTOR_SIZE
        want = body[i * size:(i + 1) * size]
        try:
            got = csums.digest(sb.csum_type, read(sector, S.SECTOR_SIZE))
        except CorruptionError as e:
            ck.error("CSUM_MISMATCH", f"log tree: data sector {sector}: {e}", LOG, sector)
            bad += 1
            continue
        if got != want:
            ck.error("CSUM_MISMATCH", f"log tree: data sector {sector}: checksum {got.hex()}, expected {want.hex()}",
                     LOG, sector)
            bad += 1
    return bad
