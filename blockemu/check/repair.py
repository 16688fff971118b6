"""fsck --repair: fix what needs no guessing, leave the rest reported.

Repairs: a bad primary superblock is rewritten from the best valid copy; a truncated
image file whose cut-off tail held nothing the trees reach is extended back to its size; the
free-space tree and ``bytes_used`` are rebuilt from the extent tree (the
allocator is derived from what is allocated, and the commit writes the tree
anew, so damaged blocks of it are no obstacle); an inode's missing back references (INODE_REF, or INODE_EXTREF where the INODE_REF is full) are
rebuilt from the directory entries that name it whole -- every name of a hard link -- rather than
the inode dropped as nameless (in place of a stale reference there that gives the entry's name
another index, or its index another name), and a back reference no entry names is removed while
the inode keeps another name;
inode link counts, directory sizes and nbytes, data-extent
reference counts and back references, and checksum items for space no extent
holds are set to what the checker found. Each repair is the ``fix`` the
checker attached to an error; an error without one is left for a human.

``zero_log`` (``blockemu rescue zero-log``) is not a repair fsck makes by itself: dropping a
damaged fsync log loses what was fsynced since the last commit, so the user asks for it.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from blockemu.check.fsck import FsckReport
from blockemu.device.image import ImageFile, bad_primary, read_only_features, too_small, truncated, unsupported
from blockemu.device.imagelock import open_image
from blockemu.engine.transaction import Engine
from blockemu.errors import Busy, CorruptionError, ReadOnlyError
from blockemu.fs import backrefs
from blockemu.fs.volume import Volume
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import (
    InodeItem,
    extref_hash,
    name_hash,
    pack_dir_entries,
    unpack_dir_entries,
    unpack_inode_extrefs,
    unpack_inode_refs,
)
from blockemu.ondisk.structs import SUPER_OFFSETS
from blockemu.ondisk.superblock import SuperInfo, decode_super, encode_super

# classes the rebuild-and-commit path fixes without a per-error ``fix``
REBUILT = {"FREE_SPACE_MISMATCH", "USED_BYTES_MISMATCH", "SUPERBLOCK"}


# the tree the rebuild makes anew from the extent tree: damage to it is no obstacle
REBUILT_TREE = S.TREE_NAMES[S.FREE_SPACE_TREE_OBJECTID]


def repairable(report: FsckReport) -> bool:
    """Damaged tree blocks rule repair out, changing items around them would mean guessing --
    except in the free-space tree, a cache of what the extent tree implies, which the repair
    rebuilds whole without reading it (``Engine(rebuild_free_space=True)``)."""
    return (report.damaged_trees <= {S.FREE_SPACE_TREE_OBJECTID}
            and any(e.fix is not None or e.code in REBUILT or e.tree == REBUILT_TREE for e in report.errors))


def restore_primary_super(path: str) -> bool:
    """Rewrite the primary superblock (and bad mirrors) from the best valid copy."""
    with ImageFile.open(path) as img:
        if img.supers and img.supers[0].info is not None:
            return False
        sb = img.best_super()
        targets = [c.offset for c in img.supers if c.info is None]
    fd = open_image(path, readonly=False)
    try:
        if SUPER_OFFSETS[0] in targets:
            # a mirror names no log, yet has the lost primary's generation until the repair's
            # commit: a crash before it, and the next first log sync would find the lost log's
            # slots its own should its log root land where that log's was
            wipe_slots(fd)
        for off in targets:
            os.pwrite(fd, encode_super(sb, off), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return SUPER_OFFSETS[0] in targets


def wipe_slots(fd: int) -> None:
    """Zero both log slots, durably, before a superblock that keeps its generation but names
    no log is written: a later log's superblock of that generation must not find them its own
    (SPEC "Log slots")."""
    for slot in S.LOG_SLOT_OFFSETS:
        os.pwrite(fd, bytes(S.LOG_SLOT_SIZE), slot)
    os.fsync(fd)


def restore_size(path: str, size: int) -> None:
    """Extend a truncated image file back to the size its superblock gives (a sparse tail)."""
    fd = open_image(path, readonly=False)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)


def zero_log(path: str) -> SuperInfo | None:
    """Drop the fsync log, as ``btrfs rescue zero-log``: the primary superblock is rewritten
    without it (the log blocks and their new extents lie in space the committed free-space
    record already calls free, so nothing else changes) and the image is the last full commit
    again. Returns the superblock that named the log, None if there was none. Only the primary
    names a log (a log sync writes no mirror), so only the primary is rewritten; a bad primary
    is fsck --repair's to restore first. A truncated image is refused, log or not: the log (and
    anything else) may lie in the part that is missing, and "no log" would read as "sound"."""
    try:
        fd, unwritable = open_image(path, readonly=False), None  # exclusive: never under a mount
    except (PermissionError, ReadOnlyError) as e:  # a 0444 image, one on a read-only file system
        fd, unwritable = open_image(path, readonly=True), e  # an image with no log is still "nothing to do"
    try:
        at = SUPER_OFFSETS[0]
        if small := too_small(path, os.fstat(fd).st_size):
            raise small
        try:
            sb = decode_super(os.pread(fd, S.SUPER_INFO_SIZE, at), at)
        except CorruptionError as e:  # fsck --repair's to restore from a sound mirror, if there is one
            raise bad_primary(path, e, os.fstat(fd).st_size, lambda m: os.pread(fd, S.SUPER_INFO_SIZE, m)) from None
        if newer := unsupported(path, sb) or read_only_features(path, sb):  # its log may be more than
            raise newer  # this blockemu knows to drop, or its features forbid our writing it
        short = truncated(sb, os.fstat(fd).st_size)
        if short:  # its log, if any, may lie in the missing part: nothing here is to be trusted
            raise CorruptionError(f"{path}: {short}; nothing written", "SUPERBLOCK", at)
        if not sb.log_root:
            return None
        if unwritable is not None:
            raise unwritable
        new = sb.without_log()
        if sb.incompat_flags & S.INCOMPAT_LOG_SLOTS:
            wipe_slots(fd)  # first: the generation stays
        os.pwrite(fd, encode_super(new, at), at)
        os.fsync(fd)
        return sb
    finally:
        os.close(fd)


async def repair(path: str, report: FsckReport) -> int:
    """Apply every fix; returns how many errors it addressed."""
    fixed = 0
    for e in report.errors:
        if e.fix is not None and "extend_to" in e.fix:
            restore_size(path, e.fix["extend_to"])
    if any(e.code == "SUPERBLOCK" for e in report.errors):
        restore_primary_super(path)
    vol = await Volume.open(path, rebuild_free_space=True)
    try:
        if vol.replayed:
            # opening replayed the fsync log and committed it, free-space record rebuilt: the
            # report's fixes are of the trees before the replay, stale now (a logged inode item
            # replaced), so the caller checks again and the next round repairs from that
            return sum(e.code in REBUILT or e.tree == REBUILT_TREE for e in report.errors)
        if vol.generation != report.generation:
            # the check ran under a shared lock, released before this exclusive one: a writer
            # in between makes the report's fixes stale, and applying them would do harm
            raise Busy(f"{path}: generation {vol.generation} is not the checked {report.generation}: "
                       "the image changed since the check; run the repair again")
        async with vol.join() as engine:
            for e in report.errors:
                if e.fix is None:
                    fixed += e.code in REBUILT or e.tree == REBUILT_TREE
                    continue
                e.done = _apply(engine, e.fix)
                fixed += 1
        await vol.commit(force=True)
    finally:
        await vol.close(commit=False)
    return fixed


def _apply(engine: Engine, fix: dict[str, Any]) -> str:
    """Make one finding's fix; returns what it did, in words: "repaired" alone hid that a fix
    removed an inode (and its data) or a name."""
    fs = engine.trees[S.FS_TREE_OBJECTID]
    if "inode" in fix:
        key = (fix["inode"], S.INODE_ITEM, 0)
        changes = {k: v for k, v in fix.items() if k != "inode"}
        fs.update(key, InodeItem.unpack(fs[key])._replace(**changes).pack())
        return f"set inode {fix['inode']}'s " + ", ".join(f"{k} to {v}" for k, v in changes.items())
    if "extent_item" in fix:
        bytenr, _, length = fix["extent_item"]
        engine.trees[S.EXTENT_TREE_OBJECTID].update(tuple(fix["extent_item"]), fix["body"].pack())
        return f"set extent [{bytenr}, +{length})'s references to {fix['body'].refs_count}"
    if "delete" in fix:
        tid, key = fix["delete"]
        if tuple(key) in engine.trees[tid]:  # another finding's fix (an inode's removal) may have taken it
            engine.trees[tid].delete(tuple(key))
        return f"removed item {tuple(key)} of the {S.TREE_NAMES[tid]} tree"
    if "drop_inode" in fix:
        ino = fix["drop_inode"]
        size = InodeItem.unpack(fs[(ino, S.INODE_ITEM, 0)]).size if (ino, S.INODE_ITEM, 0) in fs else 0
        _drop_items(fs, ino)
        return f"removed inode {ino} ({size} bytes)"
    if "drop_entry" in fix:
        d, idx, name = fix["drop_entry"]
        _drop_entry(fs, d, idx, name)
        return f"removed entry {name.decode(errors='backslashreplace')!r} (index {idx}) of directory inode {d}"
    if "add_ref" in fix:  # where the filesystem would put it: its INODE_REF, or an INODE_EXTREF once that is full
        ino, parent, index, name = fix["add_ref"]
        # an item there that does not decode gave fsck none of its names, and each entry naming
        # the inode has its own add_ref: it goes, and they rebuild it (read, it stopped the repair)
        for key, unpack in (((ino, S.INODE_REF, parent), unpack_inode_refs),
                            ((ino, S.INODE_EXTREF, extref_hash(parent, name)), unpack_inode_extrefs)):
            if (body := fs.get(key)) is not None:
                try:
                    unpack(body)
                except CorruptionError:
                    fs.delete(key)
        # stale references in its place -- its name under another index, or its index under
        # another name, which no entry gives the inode -- go first, as btrfs check rebuilds an
        # inode ref from the dir item and index
        stale = fix.get("stale", [])
        for old, at in stale:
            backrefs.remove(fs, ino, parent, old, at)
        backrefs.add(fs, ino, parent, index, name, bool(engine.sb.incompat_flags & S.INCOMPAT_EXTENDED_IREF))
        return (f"added inode {ino}'s reference to its name {name.decode(errors='backslashreplace')!r} in directory "
                f"inode {parent}" + "".join(f", in place of the one naming {old.decode(errors='backslashreplace')!r} "
                                            f"(index {at})" for old, at in stale))
    if "drop_ref" in fix:
        # a copy: the item fsck named holding it again goes (it said INODE_EXTREF, and the
        # INODE_REF's went, while the message did not say which)
        ino, parent, name, index = fix["drop_ref"]
        copy = fix.get("copy")
        backrefs.remove(fs, ino, parent, name, index, extref_first=copy == "INODE_EXTREF")
        why = f"a second copy, from its {copy}" if copy else "which no entry has"
        return (f"removed inode {ino}'s reference to the name {name.decode(errors='backslashreplace')!r} in directory "
                f"inode {parent}, {why}")
    if "extend_to" in fix:  # restored before the volume opened: it refuses a truncated image
        return f"extended the image file to {fix['extend_to']} bytes"
    bytenr, length = fix["drop_extent"]
    engine.trees[S.EXTENT_TREE_OBJECTID].delete((bytenr, S.EXTENT_ITEM, length))
    csum = engine.trees[S.CSUM_TREE_OBJECTID]
    lo = (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, bytenr)
    for key in [k for k, _ in csum.items(lo, (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, bytenr + length - 1))]:
        csum.delete(key)
    return f"removed extent [{bytenr}, +{length}) and its checksums"


def _drop_items(fs, ino: int) -> None:
    """Every item of an inode nothing names (its extents' references go with them; the next
    round of the check frees what is left unreferenced)."""
    for key in [k for k, _ in fs.items((ino, 0, 0), (ino, 255, (1 << 64) - 1))]:
        fs.delete(key)
    orphan = (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, ino)
    if orphan in fs:
        fs.delete(orphan)


def _drop_entry(fs, d: int, idx: int, name: bytes) -> None:
    fs.delete((d, S.DIR_INDEX, idx))
    key = (d, S.DIR_ITEM, name_hash(name))
    body = fs.get(key)
    if body is not None:
        rest = [e for e in unpack_dir_entries(body) if e.name != name]
        if rest:
            fs.update(key, pack_dir_entries(rest))
        else:
            fs.delete(key)


def run_repair(path: str, report: FsckReport) -> tuple[int, str | None]:
    """Repair: how many errors it addressed, and, when it could not finish, the note saying why
    (the check afterwards says what is left): the image may contradict itself beyond what the
    check saw (two extents claiming the same space), or the fsync log's replay, which opening
    the image read-write does first, fails -- its error says how to drop the log. Swallowed,
    that left "repaired: 0" and exit 4 with nothing saying what was not done, or what to do.
    Anything else -- the image busy or changed since the check -- is the user's to see."""
    try:
        return asyncio.run(repair(path, report)), None
    except CorruptionError as e:
        return 0, f"the repair stopped, nothing more repaired: {e}"
