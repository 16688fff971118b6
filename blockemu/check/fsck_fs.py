"""fsck passes over the filesystem's items: inodes and directories, data-extent
references, checksums, encryption. They work on the items the structural pass
collected (``Checker.items``), so nothing here reads a tree block again.

Each check names its class (the ``code`` of DESIGN §6) after the btrfs-check
or e2fsck problem it mirrors, and says where: tree, bytenr, key.
"""
from __future__ import annotations

import stat as st
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from blockemu.crypto import fscrypt
from blockemu.engine.btree import max_item_size
from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.fast import INODE_ENCRYPTION_CONTEXT
from blockemu.ondisk.items import (
    DirEntry,
    ExtentItem,
    FileExtent,
    InodeItem,
    InodeRef,
    file_type,
    name_hash,
    symlink_ciphertext_max,
    unpack_dir_entries,
    unpack_inode_refs,
    unpack_symlink_data,
)

if TYPE_CHECKING:
    from blockemu.check.fsck import Checker

FS = S.FS_TREE_OBJECTID
PAGE = S.SECTOR_SIZE
ROOT_INO = S.FIRST_FREE_OBJECTID


@dataclass
class FsItems:
    """The fs tree, decoded and indexed for cross-checks."""

    inodes: dict[int, InodeItem] = field(default_factory=dict)
    refs: dict[int, list[tuple[int, InodeRef]]] = field(default_factory=lambda: defaultdict(list))
    dir_items: dict[tuple[int, int], list[DirEntry]] = field(default_factory=dict)
    dir_index: dict[tuple[int, int], DirEntry] = field(default_factory=dict)
    extents: dict[int, list[tuple[int, FileExtent]]] = field(default_factory=lambda: defaultdict(list))
    policies: dict[int, bytes] = field(default_factory=dict)
    policy_flags: dict[int, int] = field(default_factory=dict)
    nonces: dict[int, bytes] = field(default_factory=dict)
    symlinks: dict[int, bytes] = field(default_factory=dict)  # FSCRYPT_SYMLINK bodies, by inode
    orphans: set[int] = field(default_factory=set)
    owners: set[int] = field(default_factory=set)  # every objectid with any item


def collect(ck: "Checker") -> FsItems:
    fi = FsItems()
    for key, body in ck.items.get(FS, []):
        oid, typ, off = key
        try:
            if oid == S.ORPHAN_OBJECTID and typ == S.ORPHAN_ITEM:
                fi.orphans.add(off)
                continue
            fi.owners.add(oid)
            if typ == S.INODE_ITEM:
                fi.inodes[oid] = InodeItem.unpack(body)
            elif typ == S.INODE_REF:
                fi.refs[oid].extend((off, r) for r in unpack_inode_refs(body))
            elif typ == S.DIR_ITEM:
                fi.dir_items[(oid, off)] = unpack_dir_entries(body)
            elif typ == S.DIR_INDEX:
                entries = unpack_dir_entries(body)
                if len(entries) != 1:
                    raise CorruptionError(f"DIR_INDEX holds {len(entries)} names", "BAD_ITEM")
                fi.dir_index[(oid, off)] = entries[0]
            elif typ == S.EXTENT_DATA:
                fi.extents[oid].append((off, FileExtent.unpack(body)))
            elif typ == S.FSCRYPT_SYMLINK_ITEM:
                fi.symlinks[oid] = body
            elif typ == S.FSCRYPT_CTXT_ITEM:
                if len(body) != INODE_ENCRYPTION_CONTEXT.size:
                    raise CorruptionError(f"encryption context of {len(body)} bytes", "BAD_ENCRYPTION_CONTEXT")
                v = INODE_ENCRYPTION_CONTEXT.unpack(body)
                if v[0] != 2 or v[1] != S.CONTENTS_MODE_AES_256_XTS:
                    raise CorruptionError(f"encryption context version {v[0]} mode {v[1]}", "BAD_ENCRYPTION_CONTEXT")
                fi.policies[oid] = v[5]
                fi.policy_flags[oid] = v[3]
                fi.nonces[oid] = v[6]
            else:
                raise CorruptionError(f"unknown item type {typ}", "UNKNOWN_KEY")
        except CorruptionError as e:
            ck.error(e.kind, f"fs tree item {key}: {e}", FS, key=key)
    return fi


def check_inodes(ck: "Checker", fi: FsItems) -> None:
    """The INODE_ITEM / INODE_REF / DIR_ITEM / DIR_INDEX triangle, link counts and sizes."""
    if ROOT_INO not in fi.inodes or not st.S_ISDIR(fi.inodes[ROOT_INO].mode):
        ck.error("MISSING_INODE", "the root directory (inode 256) is missing or not a directory", FS, key=(ROOT_INO, 1, 0))
    for oid in sorted(fi.owners - fi.inodes.keys()):
        ck.error("MISSING_INODE", f"items of inode {oid}, which has no INODE_ITEM", FS, key=(oid, S.INODE_ITEM, 0),
                 fix={"drop_inode": oid})
    subdirs: dict[int, int] = defaultdict(int)
    names: dict[int, int] = defaultdict(int)
    for (d, idx), e in sorted(fi.dir_index.items()):
        child = e.location[0]
        names[d] += 2 * len(e.name)
        if d not in fi.inodes or not st.S_ISDIR(fi.inodes[d].mode):
            ck.error("DANGLING_ENTRY", f"DIR_INDEX {idx} of {d}, which is not a directory", FS, key=(d, S.DIR_INDEX, idx))
        if child not in fi.inodes:
            ck.error("DANGLING_ENTRY", f"entry {e.name!r} in directory {d} points to missing inode {child}", FS,
                     key=(d, S.DIR_INDEX, idx), fix={"drop_entry": (d, idx, e.name)})
            continue
        if st.S_ISDIR(fi.inodes[child].mode):
            subdirs[d] += 1
        if e.type != file_type(fi.inodes[child].mode):
            ck.error("DIR_ITEM_MISMATCH", f"entry {e.name!r} in {d} has type {e.type}, inode {child} has mode "
                     f"{oct(fi.inodes[child].mode)}", FS, key=(d, S.DIR_INDEX, idx))
        if not any(p == d and r.index == idx and r.name == e.name for p, r in fi.refs.get(child, [])):
            ck.error("DIR_ITEM_MISMATCH", f"entry {e.name!r} (index {idx}) in {d} has no matching INODE_REF in {child}",
                     FS, key=(child, S.INODE_REF, d))
        bucket = fi.dir_items.get((d, name_hash(e.name)), [])
        if not any(x.name == e.name and x.location == e.location for x in bucket):
            ck.error("DIR_ITEM_MISMATCH", f"entry {e.name!r} in {d} has a DIR_INDEX but no DIR_ITEM", FS,
                     key=(d, S.DIR_ITEM, name_hash(e.name)))
    indexed = {(d, e.name) for (d, _), e in fi.dir_index.items()}
    for (d, h), entries in sorted(fi.dir_items.items()):
        for e in entries:
            if name_hash(e.name) != h:
                ck.error("DIR_ITEM_MISMATCH", f"DIR_ITEM {h} of {d} holds {e.name!r}, whose hash is {name_hash(e.name)}",
                         FS, key=(d, S.DIR_ITEM, h))
            elif (d, e.name) not in indexed:
                ck.error("DIR_ITEM_MISMATCH", f"DIR_ITEM {e.name!r} in {d} has no DIR_INDEX", FS, key=(d, S.DIR_ITEM, h))
    for ino, item in sorted(fi.inodes.items()):
        refs = fi.refs.get(ino, [])
        if ino == ROOT_INO:  # the root's ".." reference to itself, as btrfs keeps it
            refs = [(p, r) for p, r in refs if not (p == ROOT_INO and r.name == b"..")]
        for parent, r in refs:
            if fi.dir_index.get((parent, r.index), None) is None:
                ck.error("DIR_ITEM_MISMATCH", f"INODE_REF of {ino} names {r.name!r} in {parent}, which has no such entry",
                         FS, key=(ino, S.INODE_REF, parent))
        is_dir = st.S_ISDIR(item.mode)
        if is_dir and len(refs) > 1:
            ck.error("NLINK_MISMATCH", f"directory {ino} has {len(refs)} names (a hard-linked directory)", FS,
                     key=(ino, S.INODE_REF, refs[1][0]))
        if st.S_ISLNK(item.mode) and not 0 < item.size < PAGE and ino not in fi.orphans:
            ck.error("ISIZE_MISMATCH", f"symbolic link {ino} has size {item.size}: a target is 1 to {PAGE - 1} bytes",
                     FS, key=(ino, S.INODE_ITEM, 0))
        if ino == ROOT_INO:
            want = 2 + subdirs[ino]
        elif is_dir:
            want = (2 + subdirs[ino]) if refs else 0
        else:
            want = len(refs)
        if item.nlink != want:
            ck.error("NLINK_MISMATCH", f"inode {ino} nlink {item.nlink}, found {want}", FS, key=(ino, S.INODE_ITEM, 0),
                     fix={"inode": ino, "nlink": want} if want else None)
        if not refs and ino != ROOT_INO and ino not in fi.orphans:
            ck.error("ORPHAN", f"inode {ino} has no name and no orphan item", FS, key=(ino, S.INODE_ITEM, 0),
                     fix={"drop_inode": ino})
        if item.size > S.MAX_FILE_SIZE:
            ck.error("ISIZE_MISMATCH", f"inode {ino}: size {item.size} exceeds the largest file size {S.MAX_FILE_SIZE}",
                     FS, key=(ino, S.INODE_ITEM, 0))
        if is_dir and item.size != names[ino]:
            ck.error("ISIZE_MISMATCH", f"directory {ino} size {item.size}, its names add up to {names[ino]}", FS,
                     key=(ino, S.INODE_ITEM, 0), fix={"inode": ino, "size": names[ino]})
    for ino in sorted(fi.orphans - fi.inodes.keys()):
        ck.error("ORPHAN", f"orphan item for missing inode {ino}", FS, key=(S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, ino),
                 fix={"delete": (FS, (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, ino))})


def check_file_extents(ck: "Checker", fi: FsItems, data: dict[int, tuple[int, ExtentItem]]) -> None:
    """File extents against the inode (size, nbytes, overlap) and the extent tree (refs and backrefs)."""
    found: dict[int, dict[tuple[int, int], int]] = defaultdict(lambda: defaultdict(int))
    for ino, maps in sorted(fi.extents.items()):
        item = fi.inodes.get(ino)
        end = nbytes = 0
        for off, fe in sorted(maps, key=lambda m: m[0]):
            key = (ino, S.EXTENT_DATA, off)
            if off < end:
                ck.error("FILE_EXTENT_OVERLAP", f"inode {ino}: extent at {off} overlaps the previous one ending at {end}",
                         FS, key=key)
            end = max(end, off + fe.num_bytes)
            nbytes += fe.num_bytes
            if fe.type != S.FILE_EXTENT_REG or off % PAGE or fe.num_bytes % PAGE or fe.offset % PAGE:
                ck.error("BAD_FILE_EXTENT", f"inode {ino}: extent at {off} is not a sector-aligned regular extent", FS, key=key)
            if fe.offset + fe.num_bytes > fe.disk_num_bytes:
                ck.error("BAD_FILE_EXTENT", f"inode {ino}: extent at {off} reaches past its data extent", FS, key=key)
            if fe.ram_bytes != fe.disk_num_bytes:  # nothing is compressed: the plaintext is as long as the extent
                ck.error("BAD_FILE_EXTENT", f"inode {ino}: extent at {off} has ram_bytes {fe.ram_bytes}, its data "
                         f"extent is {fe.disk_num_bytes} bytes", FS, key=key)
            if fe.disk_bytenr not in data or data[fe.disk_bytenr][0] != fe.disk_num_bytes:
                ck.error("EXTENT_REF_MISMATCH", f"inode {ino}: extent at {off} points to [{fe.disk_bytenr}, "
                         f"+{fe.disk_num_bytes}), which the extent tree does not hold", FS, fe.disk_bytenr, key)
            found[fe.disk_bytenr][(ino, off - fe.offset)] += 1
        if item is not None:
            if end > -(-item.size // PAGE) * PAGE:
                ck.error("ISIZE_MISMATCH", f"inode {ino}: size {item.size} but extents reach {end}", FS,
                         key=(ino, S.INODE_ITEM, 0))
            if item.nbytes != nbytes:
                ck.error("NBYTES_MISMATCH", f"inode {ino}: nbytes {item.nbytes}, extents add up to {nbytes}", FS,
                         key=(ino, S.INODE_ITEM, 0), fix={"inode": ino, "nbytes": nbytes})
    for bytenr, (length, ei) in sorted(data.items()):
        refs = found.get(bytenr, {})
        backrefs = {(r[2], r[3]): r[4] for r in ei.refs if r[0] == "data"}
        total = sum(refs.values())
        if total != ei.refs_count or backrefs != dict(refs):
            fix: dict | None
            if any(not 0 <= off < 1 << 64 for _, off in refs):
                fix = None  # a file extent with a wild ``offset`` makes a back reference no item can hold
            elif total:
                refs_now = tuple(("data", FS, ino, off, n) for (ino, off), n in sorted(refs.items()))
                fix = {"extent_item": (bytenr, S.EXTENT_ITEM, length), "body": ei._replace(refs_count=total, refs=refs_now)}
            else:  # nothing references it any more: free it (the free-space rebuild returns the space)
                fix = {"drop_extent": (bytenr, length)}
            ck.error("EXTENT_REF_MISMATCH", f"data extent [{bytenr}, +{length}]: refs {ei.refs_count} backrefs "
                     f"{sorted(backrefs.items())}, found {total} references {sorted(refs.items())}",
                     S.EXTENT_TREE_OBJECTID, bytenr, (bytenr, S.EXTENT_ITEM, length), fix=fix)


def check_csums(ck: "Checker", sb, data: dict[int, tuple[int, ExtentItem]], read: Callable[[int, int], bytes] | None,
                advance: Callable[[int], None]) -> None:
    """Every data sector has exactly one checksum, and (with ``read``) matches it.

    Work and memory follow the checksum items, not the extents' lengths: an extent's sectors
    without a checksum are counted by bisection and reported once per extent, so a hostile
    1 TiB extent costs what a small one does (only ``read`` touches every sector, by design)."""
    size = csums.csum_size(sb.csum_type)
    sums: dict[int, bytes] = {}
    for key, body in ck.items.get(S.CSUM_TREE_OBJECTID, []):
        oid, typ, start = key
        if (oid, typ) != (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM) or start % PAGE or not body or len(body) % size:
            ck.error("BAD_ITEM", f"checksum item {key} is malformed", S.CSUM_TREE_OBJECTID, start, key)
            continue
        for i in range(len(body) // size):
            sector = start + i * PAGE
            if sector in sums:
                ck.error("CSUM_OVERLAP", f"sector {sector} has two checksums", S.CSUM_TREE_OBJECTID, sector, key)
            sums[sector] = body[i * size : (i + 1) * size]
    bodies = dict(ck.items.get(S.CSUM_TREE_OBJECTID, []))
    item_of = {key[2] + i * PAGE: key for key, body in bodies.items() for i in range(len(body) // size)}
    sectors = sorted(sums)
    runs: list[list[int]] = []  # the data extents merged into disjoint [start, end)
    for bytenr, (length, _) in sorted(data.items()):
        end = bytenr + length
        lo, hi = bisect_left(sectors, bytenr), bisect_left(sectors, end)
        if hi - lo < length // PAGE:
            first = bytenr + next((k for k, s in enumerate(sectors[lo:hi]) if s != bytenr + k * PAGE), hi - lo) * PAGE
            ck.error("MISSING_CSUM", f"data extent [{bytenr}, +{length}): {length // PAGE - (hi - lo)} of its "
                     f"{length // PAGE} sectors have no checksum, the first at {first}", S.CSUM_TREE_OBJECTID, first)
        for sector in sectors[lo:hi] if read is not None else ():
            want = sums[sector]
            try:
                got = csums.digest(sb.csum_type, read(sector, PAGE))
            except CorruptionError as e:
                ck.error("CSUM_MISMATCH", f"data sector {sector}: {e}", S.CSUM_TREE_OBJECTID, sector)
                continue
            if got != want:
                ck.error("CSUM_MISMATCH", f"data sector {sector}: checksum {got.hex()}, expected {want.hex()}",
                         S.CSUM_TREE_OBJECTID, sector)
        if runs and bytenr <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([bytenr, end])
        advance(length)
    stray, r = [], 0
    for sector in sectors:
        while r < len(runs) and runs[r][1] <= sector:
            r += 1
        if r == len(runs) or sector < runs[r][0]:
            stray.append(sector)
    stray_set = set(stray)
    for sector in stray:
        key = item_of[sector]
        whole = all(key[2] + i * PAGE in stray_set for i in range(len(bodies[key]) // size))
        ck.error("ORPHAN_CSUM", f"checksum for sector {sector}, which no data extent holds", S.CSUM_TREE_OBJECTID, sector,
                 key, fix={"delete": (S.CSUM_TREE_OBJECTID, key)} if whole else None)
    ck.report.stats["data_sectors"] = sum(e - s for s, e in runs) // PAGE


def check_encrypted_names(ck: "Checker", fi: FsItems, master: bytes | None) -> None:
    """Each name of an encrypted directory has a length its padding can give (no key needed:
    the hash checks are over the stored bytes already); with the directory's master key, it
    decrypts to a legal name: no ``/``, no NUL before the padding, not ``.`` or ``..``."""
    ident = fscrypt.key_identifier(master) if master is not None else None
    keys: dict[int, bytearray] = {}
    try:
        for (d, idx), e in sorted(fi.dir_index.items()):
            if d not in fi.policies:
                continue
            where = (d, S.DIR_INDEX, idx)
            if not fscrypt.legal_encrypted_len(len(e.name), fi.policy_flags[d]):
                ck.error("BAD_ENCRYPTED_NAME", f"a name of {len(e.name)} bytes in encrypted directory {d} is no padded "
                         f"ciphertext (policy flags {fi.policy_flags[d]})", FS, key=where)
            elif master is not None and fi.policies[d] == ident:
                if d not in keys:
                    keys[d] = fscrypt.names_key(master, fi.nonces[d])
                name = fscrypt.decrypt_name(keys[d], e.name)
                if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                    ck.error("BAD_ENCRYPTED_NAME", f"name {idx} of encrypted directory {d} decrypts to {name!r}, "
                             f"no legal name", FS, key=where)
    finally:
        for k in keys.values():
            fscrypt.wipe(k)


def check_encrypted_symlinks(ck: "Checker", fi: FsItems, sb, master: bytes | None) -> None:
    """Each FSCRYPT_SYMLINK item belongs to an encrypted symlink, on an image whose superblock
    says so, and is what fscrypt stores -- a length that says exactly what follows, a ciphertext
    length its padding can give, i_size the stored length, no extents beside it; with the master
    key, the ciphertext decrypts to a legal target: not empty, no NUL before the padding."""
    limit = symlink_ciphertext_max(max_item_size(sb.nodesize))
    ident = fscrypt.key_identifier(master) if master is not None else None
    for ino, body in sorted(fi.symlinks.items()):
        where = (ino, S.FSCRYPT_SYMLINK_ITEM, 0)
        item = fi.inodes.get(ino)
        if item is None:
            continue  # MISSING_INODE already says so
        if not sb.incompat_flags & S.INCOMPAT_ENCRYPTED_SYMLINKS:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"inode {ino} has an inline encrypted target, but the superblock "
                     f"lacks ENCRYPTED_SYMLINKS", FS, key=where)
        if not st.S_ISLNK(item.mode) or ino not in fi.policies:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"inode {ino} (mode {oct(item.mode)}) holds an encrypted symlink target "
                     f"but is no encrypted symbolic link", FS, key=where)
            continue
        try:
            ciphertext = unpack_symlink_data(body)
        except CorruptionError as e:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino}: {e}", FS, key=where)
            continue
        if not fscrypt.legal_encrypted_len(len(ciphertext), fi.policy_flags[ino], limit):
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino}: a ciphertext of {len(ciphertext)} bytes is no "
                     f"padded target (policy flags {fi.policy_flags[ino]}, at most {limit} bytes)", FS, key=where)
        if item.size != len(body):
            ck.error("ISIZE_MISMATCH", f"symbolic link {ino}: size {item.size}, its stored target is {len(body)} bytes",
                     FS, key=(ino, S.INODE_ITEM, 0), fix={"inode": ino, "size": len(body)})
        if fi.extents.get(ino):
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino} has file extents beside its inline target", FS,
                     key=(ino, S.EXTENT_DATA, fi.extents[ino][0][0]))
        if master is None or fi.policies[ino] != ident or len(ciphertext) < fscrypt.FNAME_MIN_LEN:
            continue
        key = fscrypt.names_key(master, fi.nonces[ino])
        try:
            target = fscrypt.decrypt_name(key, ciphertext)
        finally:
            fscrypt.wipe(key)
        if not target or b"\0" in target:
            ck.error("BAD_ENCRYPTED_SYMLINK", f"symbolic link {ino} decrypts to {target[:32]!r}, no legal target", FS,
                     key=where)


def check_encryption(ck: "Checker", fi: FsItems) -> None:
    """Policies are inherited; every extent of an encrypted file carries its context; no nonce twice."""
    for (d, idx), e in sorted(fi.dir_index.items()):
        child = e.location[0]
        if d in fi.policies and child in fi.inodes and fi.policies.get(child) != fi.policies[d]:
            ck.error("POLICY_MISMATCH", f"{e.name!r} in encrypted directory {d} lacks its policy", FS,
                     key=(child, S.FSCRYPT_CTXT_ITEM, 0))
    owner_of_nonce: dict[bytes, int] = {}
    for ino, maps in sorted(fi.extents.items()):
        policy = fi.policies.get(ino)
        for off, fe in maps:
            key = (ino, S.EXTENT_DATA, off)
            ctx = fe.context
            if policy is not None and ctx is None:
                ck.error("UNENCRYPTED_EXTENT_IN_ENCRYPTED_FILE", f"inode {ino}: extent at {off} is plaintext", FS,
                         fe.disk_bytenr, key)
                continue
            if ctx is None:
                continue
            if policy is None:
                ck.error("ENCRYPTION_CONTEXT_MISMATCH", f"inode {ino} has no policy but its extent at {off} is encrypted",
                         FS, fe.disk_bytenr, key)
            elif ctx.key_identifier != policy or ctx.contents_mode != S.CONTENTS_MODE_AES_256_XTS:
                ck.error("ENCRYPTION_CONTEXT_MISMATCH", f"inode {ino}: extent at {off} uses key {ctx.key_identifier.hex()} "
                         f"mode {ctx.contents_mode}, the policy says {policy.hex()} mode 1", FS, fe.disk_bytenr, key)
            if ctx.version != 1 or ctx.log2_data_unit_size != 12:
                ck.error("BAD_ENCRYPTION_CONTEXT", f"inode {ino}: extent at {off} has context version {ctx.version}, "
                         f"data unit 2^{ctx.log2_data_unit_size}", FS, fe.disk_bytenr, key)
            first = owner_of_nonce.setdefault(ctx.nonce, fe.disk_bytenr)
            if first != fe.disk_bytenr:
                ck.error("NONCE_REUSE", f"extents {first} and {fe.disk_bytenr} share nonce {ctx.nonce.hex()}", FS,
                         fe.disk_bytenr, key)

