"""inspect dump-super / dump-tree, worded like ``btrfs inspect-internal``."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from blockemu.check.backup import roots_read
from blockemu.device.image import ImageFile, truncated
from blockemu.engine.btree import BTree
from blockemu.engine.transaction import Engine
from blockemu.engine.treelog import choose_log, log_trees
from blockemu.errors import CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.block import TreeBlock, body_size
from blockemu.ondisk.items import (
    ExtentItem,
    FileExtent,
    InodeItem,
    RootItem,
    Timespec,
    unpack_dir_entries,
    unpack_inode_extrefs,
    unpack_inode_refs,
    unpack_symlink_data,
)
from blockemu.ondisk.logslot import decode_slot
from blockemu.ondisk.superblock import BACKUP_TREES, decode_super, validate_super

TREE_BY_NAME = {"root": S.ROOT_TREE_OBJECTID, "extent": S.EXTENT_TREE_OBJECTID, "fs": S.FS_TREE_OBJECTID,
                "csum": S.CSUM_TREE_OBJECTID, "free-space": S.FREE_SPACE_TREE_OBJECTID, "log": S.TREE_LOG_OBJECTID}


def objectid_name(oid: int) -> str:
    names = {S.EXTENT_CSUM_OBJECTID: "EXTENT_CSUM", S.ORPHAN_OBJECTID: "ORPHAN"}
    return names.get(oid, str(oid))


def type_name(t: int) -> str:
    return S.ITEM_TYPE_NAMES.get(t, f"UNKNOWN.{t}")


def decimal_time(t: Timespec) -> str:
    """``t`` as the decimal it is, nine places: ``f"{sec}.{nsec}"`` showed 5 us past a second as
    ``12.5000`` and, sec being signed (a time before 1970), -1.5 s (sec -2, nsec 500000000) as
    ``-2.500000000``."""
    ns = t.ns
    whole, frac = divmod(abs(ns), 1_000_000_000)
    return f"{'-' if ns < 0 else ''}{whole}.{frac:09d}"


def describe_item(key: tuple[int, int, int], body: bytes) -> dict[str, Any]:
    """The decoded fields of an item body, for text and JSON output alike."""
    t = key[1]
    try:
        if t == S.INODE_ITEM:
            i = InodeItem.unpack(body)
            d = i._asdict()
            for ts in ("atime", "ctime", "mtime", "otime"):
                d[ts] = decimal_time(d[ts])
            d["mode"] = oct(i.mode)
            return d
        if t == S.INODE_REF:
            return {"refs": [{"index": r.index, "name": r.name.decode(errors="replace"), "name_hex": r.name.hex()}
                             for r in unpack_inode_refs(body)]}
        if t == S.INODE_EXTREF:
            return {"refs": [{"parent": r.parent, "index": r.index, "name": r.name.decode(errors="replace"),
                              "name_hex": r.name.hex()} for r in unpack_inode_extrefs(body)]}
        if t in (S.DIR_ITEM, S.DIR_INDEX):
            return {"entries": [{"location": list(e.location), "transid": e.transid, "type": e.type,
                                 "name": e.name.decode(errors="replace"), "name_hex": e.name.hex()}
                                for e in unpack_dir_entries(body)]}
        if t == S.EXTENT_DATA:
            if not body:  # only in a log's delta (SPEC "Log tree")
                return {"stale": "the log's base holds an item here that replay does not apply"}
            f = FileExtent.unpack(body)
            d = f._asdict()
            if f.context is not None:
                d["context"] = {**f.context._asdict(), "key_identifier": f.context.key_identifier.hex(),
                                "nonce": f.context.nonce.hex()}
            return d
        if t == S.FSCRYPT_SYMLINK_ITEM:  # raw as well: the exact bytes SPEC describes
            return {"len": len(unpack_symlink_data(body)), "ciphertext_hex": body[2:].hex(), "raw": body.hex()}
        if t == S.ROOT_ITEM:
            return RootItem.unpack(body)._asdict()
        if t in (S.EXTENT_ITEM, S.METADATA_ITEM):
            e = ExtentItem.unpack(body)
            return {"refs": e.refs_count, "generation": e.generation, "flags": e.flags, "backrefs": [list(r) for r in e.refs]}
        if t == S.EXTENT_CSUM:
            return {"bytes": len(body)}
        return {"raw": body.hex()} if body else {}
    except CorruptionError as e:
        return {"error": str(e), "raw": body.hex()}


def block_json(tree: str, block: TreeBlock, nodesize: int) -> dict[str, Any]:
    out: dict[str, Any] = {"tree": tree, "bytenr": block.bytenr, "level": block.level, "generation": block.generation,
                           "owner": block.owner, "nritems": len(block.keys), "free_space": body_size(nodesize) - block.used}
    if block.level == 0:
        out["items"] = [{"key": list(k), "type": type_name(k[1]), "itemsize": len(v), "data": describe_item(k, v)}
                        for k, v in zip(block.keys, block.values)]
    else:
        out["ptrs"] = [{"key": list(k), "blockptr": p, "generation": g} for k, (p, g) in zip(block.keys, block.ptrs)]
    return out


def fmt_key(k: list[int] | tuple[int, int, int]) -> str:
    return f"({objectid_name(k[0])} {type_name(k[1])} {k[2]})"


def block_text(b: dict[str, Any]) -> Iterator[str]:
    owner = S.TREE_NAMES.get(b["owner"], str(b["owner"])).upper().replace("-", "_") + "_TREE"
    if b["level"] == 0:
        yield f"leaf {b['bytenr']} items {b['nritems']} free space {b['free_space']} generation {b['generation']} owner {owner}"
        for i, it in enumerate(b["items"]):
            yield f"\titem {i} key {fmt_key(it['key'])} itemsize {it['itemsize']}"
            if it["data"]:
                yield "\t\t" + " ".join(f"{k} {v}" for k, v in it["data"].items())
    else:
        yield f"node {b['bytenr']} level {b['level']} items {b['nritems']} free space {b['free_space']} generation {b['generation']} owner {owner}"
        for p in b["ptrs"]:
            yield f"\tkey {fmt_key(p['key'])} block {p['blockptr']} gen {p['generation']}"


def dump_tree(path: str, trees: list[str] | None = None, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Every block of the named trees. A block that cannot be read ends the dump with an error
    naming the image (and, when the file is shorter than its superblock says, that) -- unless
    ``problems`` is given: then that error is put there and the dump goes on past the block and
    what hangs off it, as ``btrfs inspect-internal dump-tree`` does (one bad leaf hid every other
    tree of the image from the one command that shows them)."""
    with ImageFile.open(path) as img:
        sb = img.best_super()
        short = truncated(sb, img.size)

        def named(e: CorruptionError) -> CorruptionError:
            return CorruptionError(f"{path}: {e}{f' ({short})' if short else ''}", e.kind, e.bytenr)

        def unread(e: CorruptionError) -> None:
            if problems is None:
                raise named(e) from None
            problems.append(str(named(e)))

        try:
            return _dump_trees(img, sb, trees, unread)
        except CorruptionError as e:
            raise named(e) from None


def _dump_trees(img: ImageFile, sb: Any, trees: list[str] | None,
                unread: Callable[[CorruptionError], None]) -> list[dict[str, Any]]:
    engine = Engine(sb, img.read, writable=False)
    out = []
    for name in trees or list(TREE_BY_NAME):
        tid = TREE_BY_NAME[name]
        try:
            if tid == S.TREE_LOG_OBJECTID:
                if not sb.log_root:
                    continue  # no fsync log: nothing to show
                # found from the superblock, not the root tree: the delta, then each tree it names in turn
                found = log_trees(img.read, choose_log(img.read, sb)[0])  # the newest that landed whole
            else:
                found = [engine.tree(tid)]
        except CorruptionError as e:
            unread(e)
            continue
        out.extend(block_json(name, b, sb.nodesize) for tree in found for b in _bfs(tree, unread))
    return out


def _bfs(tree: BTree, unread: Callable[[CorruptionError], None]) -> Iterator[TreeBlock]:
    """Breadth-first, as btrfs inspect-internal prints by default; a block reached twice
    raises SHARED_TREE_BLOCK (a DAG would otherwise print, and hold, exponentially many). A
    block that does not read goes to ``unread``, with what hangs off it."""
    try:
        level, seen = [tree._root_block()], {tree.root}
    except CorruptionError as e:
        unread(e)
        return
    while level:
        yield from level
        below = []
        for b in level:
            for s in range(len(b.ptrs)) if b.level else ():
                try:
                    below.append(tree._child(b, s, seen))
                except CorruptionError as e:
                    unread(e)
        level = below


def dump_super(path: str) -> dict[str, Any]:
    """The primary superblock's fields, reported even when its checksum is wrong -- or when
    the file is cut short after it (a warning says so, as fsck does)."""
    with ImageFile.open(path) as img:
        if not img.is_blockemu():
            img.best_super()  # raises the right error
        copy = img.supers[0]
        info = decode_super(copy.raw, copy.offset, verify=False)
        out = info.as_json()
        out["csum_match"] = not any("checksum" in p for p in validate_super(info, copy.offset, copy.raw))
        out["problems"] = validate_super(info, copy.offset, copy.raw)
        if short := truncated(info, img.size):
            out["problems"].append(short)
        out["device"] = path
        out["log_slots"] = log_slots(img, info, out["problems"])
        # each backup slot's root blocks, read as recorded: only of a superblock that decodes whole
        out["backup_roots_read"] = [] if out["problems"] else roots_read(img.read, info)
        return out


def log_slots(img: ImageFile, sb: Any, problems: list[str]) -> list[dict[str, Any]]:
    """The log slots (SPEC "Log slots") that decode, each with whether it belongs to this
    superblock's log and whether mount replays its log (the newest that landed whole). A slot
    the file is too short to hold is none: dump-super of an image cut inside the slots failed
    with the slot's read error instead of printing the superblock it had. A whole slot that no
    writer wrote (``SlotInfo.damage``) goes to ``problems``, not the list: it names no blocks."""
    if not sb.incompat_flags & S.INCOMPAT_LOG_SLOTS:
        return []
    try:
        chosen = choose_log(img.read, sb)[0].log_root
    except OSError:  # the log does not read (fsck says why): no slot's is replayed
        chosen = None
    out = []
    for at in S.LOG_SLOT_OFFSETS:
        if at + S.LOG_SLOT_SIZE > img.size:
            continue
        slot = decode_slot(img.read(at, S.LOG_SLOT_SIZE), at, sb.fsid, sb.csum_type)
        if slot is None:
            continue
        # a stale slot's log root may be the chosen one's: the allocator reuses a dropped log's blocks
        current = slot.generation == sb.generation and slot.base_root == sb.log_root
        if slot.damage:  # a stale one is said as such: mount and fsck pass over it (``choose_log``)
            problems.append(slot.damage + ("" if current else f" (stale, generation {slot.generation}: not "
                                                               "this superblock's log; mount ignores it)"))
        else:
            out.append({"bytenr": at, "generation": slot.generation, "base_root": slot.base_root,
                        "sequence": slot.sequence, "log_root": slot.log_root, "log_root_level": slot.log_root_level,
                        "blocks": len(slot.blocks), "current": current, "replayed": current and slot.log_root == chosen})
    return out


def super_text(d: dict[str, Any]) -> Iterator[str]:
    yield f"superblock: bytenr={d['bytenr']}, device={d['device']}"
    yield "-" * 57
    yield f"csum_type\t\t{d['csum_type']} ({d['csum_type_name']})"
    yield f"csum_size\t\t{d['csum_size']}"
    yield f"csum\t\t\t0x{d['csum']} [{'match' if d['csum_match'] else 'DON’T MATCH'}]"
    for k in ("bytenr", "flags", "magic", "fsid", "label", "generation", "root", "root_level", "log_root",
              "log_root_transid", "log_root_level", "total_bytes", "bytes_used", "root_dir_objectid", "sectorsize", "nodesize", "compat_flags", "compat_ro_flags", "incompat_flags"):
        v = d[k]
        if k in ("flags", "compat_flags", "compat_ro_flags", "incompat_flags"):
            v = hex(v)
        if k == "magic":
            v = f"{v} [match]"
        yield f"{k}{chr(9) * max(1, 3 - len(k) // 8)}{v}"
    yield "backup_roots[4]:"
    read = {r["slot"]: r for r in d.get("backup_roots_read", [])}
    for i, b in enumerate(d["backup_roots"]):
        yield f"\tbackup {i}:"
        for t in BACKUP_TREES:
            yield f"\t\tbackup_{t}:\t{b[t]}\tgen: {b[t + '_gen']}\tlevel: {b[t + '_level']}"
        yield f"\t\tbackup_total_bytes:\t{b['total_bytes']}"
        yield f"\t\tbackup_bytes_used:\t{b['bytes_used']}"
        if (r := read.get(i)) is not None:
            yield f"\t\tbackup_roots_read:\t{'yes' if r['roots_read'] else 'no: ' + str(r['problem'])}"
    for slot in d.get("log_slots", []):
        state = "replayed" if slot["replayed"] else "current" if slot["current"] else "stale"
        yield (f"log slot {slot['bytenr']}:	sequence {slot['sequence']} log_root {slot['log_root']} "
               f"level {slot['log_root_level']} blocks {slot['blocks']} generation {slot['generation']} ({state})")
    for p in d["problems"]:
        yield f"WARNING: {p}"
