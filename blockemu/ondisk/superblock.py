"""Superblock encode/decode and validation (decode with construct: once per open, not hot;
encode with the derived ``struct`` format: once per commit and per log sync)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import construct as c

from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import fast
from blockemu.ondisk.structs import (
    CSUM_FIELD,
    FIRST_FREE_OBJECTID,
    INCOMPAT_LOG_BITS,
    INCOMPAT_LOG_SLOTS,
    INCOMPAT_TREE_LOG,
    MAGIC,
    MAX_LEVEL,
    MAX_NODE_SIZE,
    MIN_NODE_SIZE,
    NUM_BACKUP_ROOTS,
    SECTOR_SIZE,
    SUPER_FLAG_WRITTEN,
    SUPER_INFO_SIZE,
    SUPER_OFFSETS,
    BackupRoot,
    Superblock,
)

BACKUP_FIELDS = [sc.name for sc in BackupRoot.subcons if sc.name]
BACKUP_TREES = ("tree_root", "extent_root", "fs_root", "csum_root", "free_space_root")


def empty_backup() -> dict[str, int]:
    return {name: 0 for name in BACKUP_FIELDS}


@dataclass
class SuperInfo:
    fsid: bytes
    generation: int
    root: int
    root_level: int
    total_bytes: int
    bytes_used: int
    nodesize: int
    csum_type: int
    label: str = ""
    sectorsize: int = SECTOR_SIZE
    root_dir_objectid: int = 256
    flags: int = SUPER_FLAG_WRITTEN
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0
    backup_roots: list[dict[str, int]] = field(default_factory=lambda: [empty_backup() for _ in range(NUM_BACKUP_ROOTS)])
    bytenr: int = SUPER_OFFSETS[0]
    csum: bytes = b""
    log_root: int = 0  # the fsync log tree (SPEC "Log tree"); 0 = no log
    log_root_transid: int = 0
    log_root_level: int = 0

    def without_log(self, **changes: Any) -> "SuperInfo":
        """This superblock naming no fsync log (and ``changes``): what ``rescue zero-log`` writes,
        and a backup root's generation, which a log of a newer one does not extend."""
        return replace(self, log_root=0, log_root_transid=0, log_root_level=0,
                       incompat_flags=self.incompat_flags & ~INCOMPAT_LOG_BITS, **changes)

    def as_json(self) -> dict[str, Any]:
        return {
            "csum": self.csum[: csums.csum_size(self.csum_type)].hex() if self.csum_type in csums.ALGORITHMS else self.csum.hex(),
            "bytenr": self.bytenr,
            "flags": self.flags,
            "magic": MAGIC.decode(),
            "fsid": str(uuid.UUID(bytes=self.fsid)),
            "label": self.label,
            "generation": self.generation,
            "root": self.root,
            "root_level": self.root_level,
            "total_bytes": self.total_bytes,
            "bytes_used": self.bytes_used,
            "root_dir_objectid": self.root_dir_objectid,
            "sectorsize": self.sectorsize,
            "nodesize": self.nodesize,
            "csum_type": self.csum_type,
            "csum_type_name": csums.name_of(self.csum_type),
            "csum_size": csums.csum_size(self.csum_type) if self.csum_type in csums.ALGORITHMS else None,
            "compat_flags": self.compat_flags,
            "compat_ro_flags": self.compat_ro_flags,
            "incompat_flags": self.incompat_flags,
            "backup_roots": [dict(b) for b in self.backup_roots],
            "log_root": self.log_root,
            "log_root_transid": self.log_root_transid,
            "log_root_level": self.log_root_level,
        }


def mirror_offsets(total_bytes: int) -> list[int]:
    """Superblock copies that fit the device (btrfs: a copy is written only if it fits)."""
    return [off for off in SUPER_OFFSETS if off + SUPER_INFO_SIZE <= total_bytes]


def super_writes(sb: SuperInfo) -> list[tuple[int, bytes]]:
    """Every superblock copy that fits the device, primary first."""
    return [primary_write(sb), *mirror_writes(sb)]


def primary_write(sb: SuperInfo) -> tuple[int, bytes]:
    """The primary superblock: a commit writes it with FUA, and the mirrors (``mirror_writes``)
    only in its tail -- each encoded once (~17 us a copy), not every copy at both steps."""
    return SUPER_OFFSETS[0], encode_super(sb, SUPER_OFFSETS[0])


def mirror_writes(sb: SuperInfo) -> list[tuple[int, bytes]]:
    """The superblock copies after the primary that fit the device."""
    return [(off, encode_super(sb, off)) for off in mirror_offsets(sb.total_bytes)[1:]]


def _super_fields() -> list[tuple[int | None, str]]:
    """The fast superblock format's fields, in order: (backup root index, field) for a backup
    root's, (None, field) for the others."""
    out: list[tuple[int | None, str]] = []
    for name in fast.FAST["Superblock"][1]:
        if name.startswith("backup_roots["):
            index, sub = name[len("backup_roots["):].split("].")
            out.append((int(index), sub))
        else:
            out.append((None, name))
    return out


_SUPER_FIELDS = _super_fields()


def encode_super(info: SuperInfo, at: int) -> bytes:
    """The 4 KiB superblock copy for offset ``at``; each copy records its own bytenr, so csums
    differ. Packed with the ``struct`` format derived from the construct definition: every
    fsync through the log writes a superblock, and construct's build took ~0.4 ms of it."""
    top = {
        "csum": b"",
        "fsid": info.fsid,
        "bytenr": at,
        "flags": info.flags,
        "magic": MAGIC,
        "generation": info.generation,
        "root": info.root,
        "total_bytes": info.total_bytes,
        "bytes_used": info.bytes_used,
        "root_dir_objectid": info.root_dir_objectid,
        "sectorsize": info.sectorsize,
        "nodesize": info.nodesize,
        "csum_type": info.csum_type,
        "root_level": info.root_level,
        "compat_flags": info.compat_flags,
        "compat_ro_flags": info.compat_ro_flags,
        "incompat_flags": info.incompat_flags,
        "label": info.label.encode(),
        "log_root": info.log_root,
        "log_root_transid": info.log_root_transid,
        "log_root_level": info.log_root_level,
    }
    backups = info.backup_roots
    raw = fast.SUPERBLOCK.pack(*[top[name] if index is None else backups[index][name] for index, name in _SUPER_FIELDS])
    return csums.field(info.csum_type, raw[CSUM_FIELD:]) + raw[CSUM_FIELD:]


def decode_super(buf: bytes, at: int, *, verify: bool = True) -> SuperInfo:
    """Parse and validate the copy at ``at``. Raises CorruptionError(kind=SUPERBLOCK)."""
    if len(buf) < SUPER_INFO_SIZE:
        raise CorruptionError(f"superblock at {at}: truncated ({len(buf)} bytes)", "SUPERBLOCK", at)
    buf = bytes(buf[:SUPER_INFO_SIZE])
    if buf[0x40:0x48] != MAGIC:
        raise CorruptionError(f"superblock at {at}: bad magic, not a blockemu image", "BAD_MAGIC", at)
    try:
        p = Superblock.parse(buf)
    except c.ConstructError as e:  # pragma: no cover - fixed-size layout; magic checked above
        raise CorruptionError(f"superblock at {at}: {e}", "SUPERBLOCK", at) from None
    info = SuperInfo(
        fsid=p.fsid,
        generation=p.generation,
        root=p.root,
        root_level=p.root_level,
        total_bytes=p.total_bytes,
        bytes_used=p.bytes_used,
        nodesize=p.nodesize,
        csum_type=p.csum_type,
        label=p.label.rstrip(b"\0").decode(errors="replace"),
        sectorsize=p.sectorsize,
        root_dir_objectid=p.root_dir_objectid,
        flags=p.flags,
        compat_flags=p.compat_flags,
        compat_ro_flags=p.compat_ro_flags,
        incompat_flags=p.incompat_flags,
        backup_roots=[{k: b[k] for k in BACKUP_FIELDS} for b in p.backup_roots],
        bytenr=p.bytenr,
        csum=p.csum,
        log_root=p.log_root,
        log_root_transid=p.log_root_transid,
        log_root_level=p.log_root_level,
    )
    if not verify:
        return info
    problems = validate_super(info, at, buf)
    if problems:
        raise CorruptionError(f"superblock at {at}: {problems[0]}", "SUPERBLOCK", at)
    return info


def validate_super(info: SuperInfo, at: int, raw: bytes) -> list[str]:
    problems = []
    if info.csum_type not in csums.ALGORITHMS:
        return [f"unknown checksum type {info.csum_type}"]
    if (want := csums.field(info.csum_type, raw[CSUM_FIELD:SUPER_INFO_SIZE])) != info.csum:
        problems.append(csums.unfilled(info.csum_type, info.csum, want) or "checksum mismatch")
    if info.bytenr != at:
        problems.append(f"records bytenr {info.bytenr}")
    if info.sectorsize != SECTOR_SIZE:
        problems.append(f"bad sectorsize {info.sectorsize}")
    ns = info.nodesize
    if ns < MIN_NODE_SIZE or ns > MAX_NODE_SIZE or ns & (ns - 1):
        problems.append(f"bad nodesize {ns}")
    if info.root_level >= MAX_LEVEL:
        problems.append(f"bad root level {info.root_level}")
    if info.total_bytes < at + SUPER_INFO_SIZE:
        problems.append(f"total_bytes {info.total_bytes} smaller than the superblock offset")
    if info.root % SECTOR_SIZE or not (0 < info.root < info.total_bytes):
        problems.append(f"root tree bytenr {info.root} outside the device")
    if info.bytes_used > info.total_bytes:
        problems.append(f"bytes_used {info.bytes_used} > total_bytes {info.total_bytes}")
    if info.generation == 0:
        problems.append("generation 0")
    if info.root_dir_objectid != FIRST_FREE_OBJECTID:  # `/` is inode 256 in format v1: nothing else is read
        problems.append(f"root_dir_objectid {info.root_dir_objectid} is not the root directory's inode "
                        f"{FIRST_FREE_OBJECTID}")
    if info.log_root:
        if info.log_root % SECTOR_SIZE or not (0 < info.log_root < info.total_bytes):
            problems.append(f"log tree bytenr {info.log_root} outside the device")
        if info.log_root_level >= MAX_LEVEL:
            problems.append(f"bad log root level {info.log_root_level}")
        if info.log_root_transid != info.generation + 1:
            problems.append(f"log tree of transaction {info.log_root_transid}, not {info.generation + 1}")
        if not info.incompat_flags & INCOMPAT_TREE_LOG:
            problems.append("a log tree without the TREE_LOG incompat flag")
    elif info.incompat_flags & INCOMPAT_LOG_SLOTS:
        problems.append("the LOG_SLOTS incompat flag without a log tree")
    return problems
