"""Item bodies: typed values <-> bytes through the derived ``struct`` formats.

Every unpack checks the body's length against what its fixed part says follows,
so a hostile item raises CorruptionError instead of reading past its end.
"""
from __future__ import annotations

import stat
import struct
from collections import namedtuple
from itertools import compress, repeat, starmap
from typing import Iterable, Iterator, NamedTuple, Sequence

from blockemu.errors import CorruptionError
from blockemu.ondisk import fast
from blockemu.ondisk.csum import crc32c
from blockemu.ondisk.structs import (
    ENCRYPTION_FSCRYPT,
    ENCRYPTION_NONE,
    EXTENT_DATA_REF,
    EXTENT_FLAG_DATA,
    FILE_EXTENT_REG,
    FS_TREE_OBJECTID,
    FT_DIR,
    FT_REG_FILE,
    FT_SYMLINK,
    SECTOR_SIZE,
    TREE_BLOCK_REF,
)


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise CorruptionError(f"{what}: item size {len(body)}, expected {size}", "BAD_ITEM")


class RootItem(NamedTuple):
    generation: int
    root_dirid: int
    bytenr: int
    bytes_used: int
    last_snapshot: int
    flags: int
    refs: int
    level: int

    def pack(self) -> bytes:
        return fast.ROOT_ITEM.pack(*self)

    @classmethod
    def unpack(cls, body: bytes) -> "RootItem":
        _need(body, fast.ROOT_ITEM.size, "root item")
        return cls(*fast.ROOT_ITEM.unpack(body))


class Timespec(NamedTuple):
    sec: int
    nsec: int

    @classmethod
    def from_ns(cls, ns: int) -> "Timespec":
        return cls(ns // 1_000_000_000, ns % 1_000_000_000)

    @property
    def ns(self) -> int:
        """The time in nanoseconds since the epoch (``from_ns``'s inverse): negative before 1970."""
        return self.sec * 1_000_000_000 + self.nsec


class InodeItem(NamedTuple):
    generation: int
    transid: int
    size: int
    nbytes: int
    block_group: int
    nlink: int
    uid: int
    gid: int
    mode: int
    rdev: int
    flags: int
    sequence: int
    atime: Timespec
    ctime: Timespec
    mtime: Timespec
    otime: Timespec

    def pack(self) -> bytes:
        return fast.INODE_ITEM.pack(*self[:12], *self.atime, *self.ctime, *self.mtime, *self.otime)

    @classmethod
    def unpack(cls, body: bytes) -> "InodeItem":
        _need(body, fast.INODE_ITEM.size, "inode item")
        v = fast.INODE_ITEM.unpack(body)
        ts = [Timespec(v[i], v[i + 1]) for i in range(12, 20, 2)]
        return cls(*v[:12], *ts)


class DirEntry(NamedTuple):
    location: tuple[int, int, int]
    transid: int
    type: int
    name: bytes
    data: bytes = b""


def pack_dir_entries(entries: list[DirEntry]) -> bytes:
    """DIR_ITEM bodies chain every name whose hash collides; DIR_INDEX holds one."""
    out = bytearray()
    for e in entries:
        out += fast.DIR_ITEM_HEAD.pack(*e.location, e.transid, len(e.data), len(e.name), e.type)
        out += e.name + e.data
    return bytes(out)


def unpack_dir_entries(body: bytes) -> list[DirEntry]:
    out = []
    pos, head = 0, fast.DIR_ITEM_HEAD
    while pos < len(body):
        if pos + head.size > len(body):
            raise CorruptionError("dir item: truncated entry header", "BAD_ITEM")
        oid, typ, off, transid, data_len, name_len, ftype = head.unpack_from(body, pos)
        pos += head.size
        if name_len == 0 or pos + name_len + data_len > len(body):
            raise CorruptionError(f"dir item: name_len {name_len} data_len {data_len} overrun the item", "BAD_ITEM")
        name = body[pos : pos + name_len]
        data = body[pos + name_len : pos + name_len + data_len]
        pos += name_len + data_len
        out.append(DirEntry((oid, typ, off), transid, ftype, bytes(name), bytes(data)))
    if not out:
        raise CorruptionError("dir item: empty", "BAD_ITEM")
    return out


FILE_TYPES = {stat.S_IFREG: FT_REG_FILE, stat.S_IFDIR: FT_DIR, stat.S_IFLNK: FT_SYMLINK}


def file_type(mode: int) -> int:
    """The directory entry type of an inode of this mode; 0 for a kind the format does not hold."""
    return FILE_TYPES.get(stat.S_IFMT(mode), 0)


def name_hash(name: bytes) -> int:
    """The DIR_ITEM key offset: btrfs_name_hash, crc32c seeded with ~1 and not inverted at the end."""
    return ~crc32c(name, value=1) & 0xFFFFFFFF


class InodeRef(NamedTuple):
    index: int
    name: bytes

    def pack(self) -> bytes:
        return fast.INODE_REF_HEAD.pack(self.index, len(self.name)) + self.name

    @classmethod
    def unpack(cls, body: bytes) -> "InodeRef":
        head = fast.INODE_REF_HEAD
        if len(body) < head.size:
            raise CorruptionError("inode ref: truncated", "BAD_ITEM")
        index, name_len = head.unpack_from(body, 0)
        _need(body, head.size + name_len, "inode ref")
        return cls(index, bytes(body[head.size :]))


def pack_inode_refs(refs: list[InodeRef]) -> bytes:
    """An INODE_REF body: one InodeRefHead + name per name the inode has in that directory
    (hard links in one directory share the item, as in btrfs)."""
    return b"".join(r.pack() for r in refs)


def unpack_inode_refs(body: bytes) -> list[InodeRef]:
    out, pos, head = [], 0, fast.INODE_REF_HEAD
    while pos < len(body):
        if pos + head.size > len(body):
            raise CorruptionError("inode ref: truncated", "BAD_ITEM")
        index, name_len = head.unpack_from(body, pos)
        pos += head.size
        if name_len == 0 or pos + name_len > len(body):
            raise CorruptionError(f"inode ref: name_len {name_len} overruns the item", "BAD_ITEM")
        out.append(InodeRef(index, bytes(body[pos : pos + name_len])))
        pos += name_len
    if not out:
        raise CorruptionError("inode ref: empty", "BAD_ITEM")
    return out


class InodeExtref(NamedTuple):
    """One name of an INODE_EXTREF item: the directory is in the body, the key's offset being
    ``extref_hash(parent, name)``."""
    parent: int
    index: int
    name: bytes


def extref_hash(parent: int, name: bytes) -> int:
    """The INODE_EXTREF key offset: btrfs_extref_hash, crc32c seeded with the parent's low 32 bits
    and not inverted at the end (``name_hash`` is the same CRC seeded with ~1)."""
    return ~crc32c(name, value=~parent & 0xFFFFFFFF) & 0xFFFFFFFF


def pack_inode_extrefs(refs: list[InodeExtref]) -> bytes:
    """An INODE_EXTREF body: one InodeExtrefHead + name per name whose (parent, name) hash is the key's."""
    head = fast.INODE_EXTREF_HEAD
    return b"".join(head.pack(r.parent, r.index, len(r.name)) + r.name for r in refs)


def unpack_inode_extrefs(body: bytes) -> list[InodeExtref]:
    out, pos, head = [], 0, fast.INODE_EXTREF_HEAD
    while pos < len(body):
        if pos + head.size > len(body):
            raise CorruptionError("inode extref: truncated", "BAD_ITEM")
        parent, index, name_len = head.unpack_from(body, pos)
        pos += head.size
        if name_len == 0 or pos + name_len > len(body):
            raise CorruptionError(f"inode extref: name_len {name_len} overruns the item", "BAD_ITEM")
        out.append(InodeExtref(parent, index, bytes(body[pos : pos + name_len])))
        pos += name_len
    if not out:
        raise CorruptionError("inode extref: empty", "BAD_ITEM")
    return out


class ExtentContext(NamedTuple):
    version: int
    contents_mode: int
    log2_data_unit_size: int
    key_identifier: bytes
    nonce: bytes


_FE_NUM_BYTES = struct.Struct("<Q")  # FileExtentItem's last field


class FileExtent(NamedTuple):
    generation: int
    ram_bytes: int
    compression: int
    encryption: int
    other_encoding: int
    type: int
    disk_bytenr: int
    disk_num_bytes: int
    offset: int
    num_bytes: int
    context: ExtentContext | None = None

    def pack(self) -> bytes:
        if self.context is None:
            return fast.FILE_EXTENT_ITEM.pack(*self[:10])
        return _ENCRYPTED_FILE_EXTENT.pack(*self[:10], *self.context)

    def piece(self, offset: int, num_bytes: int) -> "FileExtent":
        """This item narrowed to [offset, +num_bytes) of its extent (what is left of it beside an
        overwrite): ``_replace(offset=, num_bytes=)`` without its dict and its per-field map, for
        writeback trims or splits an item for nearly every extent it maps over an older one."""
        return tuple.__new__(FileExtent, (*self[:8], offset, num_bytes, self[10]))

    @staticmethod
    def end_in_file(offset: int, body: bytes) -> int:
        """Where the item at file ``offset`` ends (offset + num_bytes), read without decoding the
        rest: mapping a new extent looks at the item before it, which mostly ends before it."""
        if len(body) < fast.FILE_EXTENT_ITEM.size:
            raise CorruptionError("file extent: truncated", "BAD_ITEM")
        return offset + _FE_NUM_BYTES.unpack_from(body, fast.FILE_EXTENT_ITEM.size - _FE_NUM_BYTES.size)[0]

    @classmethod
    def unpack(cls, body: bytes) -> "FileExtent":
        head = fast.FILE_EXTENT_ITEM
        if len(body) < head.size:
            raise CorruptionError("file extent: truncated", "BAD_ITEM")
        v = head.unpack_from(body, 0)
        if v[2] or v[4]:  # read as they are, encoded bytes would be handed out as the file's
            raise CorruptionError(f"file extent: compression {v[2]}, other encoding {v[4]} (this format writes "
                                  "neither)", "BAD_ITEM")
        encryption = v[3]
        if encryption == ENCRYPTION_NONE:
            _need(body, head.size, "file extent")
            return cls(*v)
        if encryption != ENCRYPTION_FSCRYPT:
            raise CorruptionError(f"file extent: unknown encryption {encryption}", "BAD_ITEM")
        ctx = fast.EXTENT_ENCRYPTION_CONTEXT
        _need(body, head.size + ctx.size, "encrypted file extent")
        return cls(*v, ExtentContext(*ctx.unpack_from(body, head.size)))


class ExtentItem(NamedTuple):
    """EXTENT_ITEM / METADATA_ITEM with its inline back references.

    ``refs`` is a tuple of ("tree", root) or ("data", root, objectid, offset, count).
    """

    refs_count: int
    generation: int
    flags: int
    refs: tuple[tuple, ...]

    def pack(self) -> bytes:
        if len(self.refs) == 1:  # what every writer makes (a tree block's, a new data extent's): one call
            ref = self.refs[0]
            if ref[0] == "tree":
                return _ONE_TREE_REF.pack(self.refs_count, self.generation, self.flags, TREE_BLOCK_REF, ref[1])
            return _ONE_DATA_REF.pack(self.refs_count, self.generation, self.flags, EXTENT_DATA_REF, *ref[1:])
        out = bytearray(fast.EXTENT_ITEM.pack(self.refs_count, self.generation, self.flags))
        for ref in self.refs:
            if ref[0] == "tree":
                out += fast.TREE_BLOCK_REF.pack(TREE_BLOCK_REF, ref[1])
            else:
                out += fast.EXTENT_DATA_REF.pack(EXTENT_DATA_REF, *ref[1:])
        return bytes(out)

    @classmethod
    def unpack(cls, body: bytes) -> "ExtentItem":
        head = fast.EXTENT_ITEM
        if len(body) < head.size:
            raise CorruptionError("extent item: truncated", "BAD_ITEM")
        count, gen, flags = head.unpack_from(body, 0)
        pos, refs = head.size, []
        while pos < len(body):
            kind = body[pos]
            if kind == TREE_BLOCK_REF and pos + fast.TREE_BLOCK_REF.size <= len(body):
                _, root = fast.TREE_BLOCK_REF.unpack_from(body, pos)
                refs.append(("tree", root))
                pos += fast.TREE_BLOCK_REF.size
            elif kind == EXTENT_DATA_REF and pos + fast.EXTENT_DATA_REF.size <= len(body):
                refs.append(("data", *fast.EXTENT_DATA_REF.unpack_from(body, pos)[1:]))
                pos += fast.EXTENT_DATA_REF.size
            else:
                raise CorruptionError(f"extent item: bad inline ref type {kind} at {pos}", "BAD_ITEM")
        return cls(count, gen, flags, tuple(refs))


def pack_symlink_data(ciphertext: bytes) -> bytes:
    """An FSCRYPT_SYMLINK body: fscrypt's ``struct fscrypt_symlink_data``, the ciphertext's
    length (little-endian u16), then the ciphertext (SPEC "Symbolic links")."""
    return fast.SYMLINK_DATA_HEAD.pack(len(ciphertext)) + ciphertext


def unpack_symlink_data(body: bytes) -> bytes:
    """The ciphertext an FSCRYPT_SYMLINK body holds; its length field must say exactly what
    follows and be non-zero (the kernel's fscrypt_get_symlink refuses 0 with EUCLEAN)."""
    head = fast.SYMLINK_DATA_HEAD
    if len(body) < head.size:
        raise CorruptionError("encrypted symlink: truncated", "BAD_ITEM")
    (length,) = head.unpack_from(body, 0)
    if length == 0:
        raise CorruptionError("encrypted symlink: empty ciphertext", "BAD_ITEM")
    _need(body, head.size + length, "encrypted symlink")
    return bytes(body[head.size :])


def symlink_ciphertext_max(max_item: int) -> int:
    """The longest ciphertext (= the longest target) of an encrypted symlink: its
    fscrypt_symlink_data plus the NUL the kernel counts must fit a page (4096, as ext4's
    block), and the item a leaf of this node size holds (``max_item``, as btrfs's inline limit)."""
    return min(SECTOR_SIZE - 1, max_item) - fast.SYMLINK_DATA_HEAD.size


# ---------------------------------------------------------------------------------------------
# Bulk decoders, for readers of whole trees (fsck): the bodies of one shape are joined and
# decoded by one ``iter_unpack``, with no Python object per field. Each returns, per body, what
# ``unpack`` returns for it, or None where the body is not of the common shape; the caller then
# calls ``unpack`` on that body, which gives the general case or names what is wrong.

def _joined(packed: struct.Struct, bodies: list[bytes], pick: list[int]) -> Iterator[tuple]:
    return packed.iter_unpack(b"".join(map(bodies.__getitem__, pick)))


def _shape(bodies: list[bytes], size: int) -> list[int]:
    return list(compress(range(len(bodies)), map(size.__eq__, map(len, bodies))))


InodeRow = namedtuple("InodeRow", [n.replace(".", "_") for n in fast.FAST["InodeItem"][1]])  # type: ignore[misc]
"""An INODE_ITEM flat, timestamps as ``atime_sec``, ``atime_nsec``, ...: the fields of InodeItem
without a Timespec object per timestamp."""


def unpack_inode_rows(bodies: list[bytes]) -> list[InodeRow | None]:
    out: list[InodeRow | None] = [None] * len(bodies)
    pick = _shape(bodies, fast.INODE_ITEM.size)
    for i, row in zip(pick, map(InodeRow._make, _joined(fast.INODE_ITEM, bodies, pick))):
        out[i] = row
    return out


_ENCRYPTED_FILE_EXTENT = struct.Struct(fast.FILE_EXTENT_ITEM.format + fast.EXTENT_ENCRYPTION_CONTEXT.format.lstrip("<"))
_FE_FIELDS = len(FileExtent._fields) - 1  # the fixed part; ``context`` follows


def unpack_file_extents(bodies: list[bytes]) -> list[FileExtent | None]:
    out: list[FileExtent | None] = [None] * len(bodies)
    plain = _shape(bodies, fast.FILE_EXTENT_ITEM.size)
    for i, v in zip(plain, _joined(fast.FILE_EXTENT_ITEM, bodies, plain)):
        if v[3] == ENCRYPTION_NONE and not (v[2] or v[4]):
            out[i] = FileExtent(*v)
    sealed = _shape(bodies, _ENCRYPTED_FILE_EXTENT.size)
    for i, v in zip(sealed, _joined(_ENCRYPTED_FILE_EXTENT, bodies, sealed)):
        if v[3] == ENCRYPTION_FSCRYPT and not (v[2] or v[4]):
            out[i] = FileExtent(*v[:_FE_FIELDS], ExtentContext._make(v[_FE_FIELDS:]))
    return out


_ONE_TREE_REF = struct.Struct(fast.EXTENT_ITEM.format + fast.TREE_BLOCK_REF.format.lstrip("<"))
_ONE_DATA_REF = struct.Struct(fast.EXTENT_ITEM.format + fast.EXTENT_DATA_REF.format.lstrip("<"))


def new_data_extent(generation: int, ram_bytes: int, bytenr: int, length: int,
                    context: ExtentContext | None) -> tuple[FileExtent, bytes]:
    """A newly written extent's EXTENT_DATA item mapping all of it, with its body: the same as
    ``FileExtent(...)`` and its ``pack()``, made in one struct call and without the Python-level
    NamedTuple constructor (``new_data_extents``' answer for one extent)."""
    if context is None:
        fields = (generation, ram_bytes, 0, ENCRYPTION_NONE, 0, FILE_EXTENT_REG, bytenr, length, 0, length)
        return tuple.__new__(FileExtent, (*fields, None)), fast.FILE_EXTENT_ITEM.pack(*fields)
    fields = (generation, ram_bytes, 0, ENCRYPTION_FSCRYPT, 0, FILE_EXTENT_REG, bytenr, length, 0, length)
    return tuple.__new__(FileExtent, (*fields, context)), _ENCRYPTED_FILE_EXTENT.pack(*fields, *context)


def new_data_extents(generation: int, ram_bytes: Sequence[int], bytenrs: Sequence[int], lengths: Sequence[int],
                     contexts: Sequence[ExtentContext | None]) -> tuple[list[FileExtent], list[bytes]]:
    """``new_data_extent`` of each extent of a batch (every written extent is staged through
    here: ``ExtentBatch.add_extents``): when the batch's extents are all plaintext or all
    encrypted, the items and bodies are made by C-level maps over the columns, with no Python
    step per extent (a call and its tuples per extent were ~8 % of mapping a one-page extent)."""
    plain = contexts.count(None)
    if plain and plain != len(contexts):  # a batch of plaintext and encrypted files' runs
        fes, bodies = zip(*map(new_data_extent, repeat(generation), ram_bytes, bytenrs, lengths, contexts))
        return list(fes), list(bodies)
    flags = (0, ENCRYPTION_NONE if plain else ENCRYPTION_FSCRYPT, 0, FILE_EXTENT_REG)

    def fields(*more: Iterable) -> Iterator[tuple]:
        """Each extent's fields, then its values from ``more``."""
        return zip(repeat(generation), ram_bytes, *map(repeat, flags), bytenrs, lengths, repeat(0), lengths, *more)

    fes = list(map(tuple.__new__, repeat(FileExtent), fields(contexts)))
    if plain:
        return fes, list(starmap(fast.FILE_EXTENT_ITEM.pack, fields()))
    return fes, list(starmap(_ENCRYPTED_FILE_EXTENT.pack, fields(*zip(*contexts))))  # (each context's fields too)


def new_data_extent_items(generation: int, inos: Sequence[int], file_offsets: Sequence[int]) -> list[bytes]:
    """Each newly written extent's EXTENT_ITEM body (one reference, from the file that wrote it
    at ``file_offsets``): ``ExtentItem(...).pack()`` by a C-level map over the batch, without the
    generic pack's shape checks. No ExtentItem is made: most are never read back, and one that
    is (an overwrite of the extent) is decoded then (``new_data_extent_item``)."""
    return list(starmap(_ONE_DATA_REF.pack, zip(repeat(1), repeat(generation), repeat(EXTENT_FLAG_DATA), repeat(EXTENT_DATA_REF),
                                                repeat(FS_TREE_OBJECTID), inos, file_offsets, repeat(1))))


def new_data_extent_item(body: bytes) -> ExtentItem:
    """The ExtentItem of a body ``new_data_extent_items`` made (its one shape: no checks)."""
    count, generation, flags, _, root, ino, offset, refs = _ONE_DATA_REF.unpack(body)
    return tuple.__new__(ExtentItem, (count, generation, flags, (("data", root, ino, offset, refs),)))


def unpack_extent_items(bodies: list[bytes]) -> list[ExtentItem | None]:
    """The two shapes every writer makes: a tree block's item with its one tree backref, and a
    data extent's with one data backref."""
    out: list[ExtentItem | None] = [None] * len(bodies)
    for packed, kind, tag in ((_ONE_TREE_REF, TREE_BLOCK_REF, "tree"), (_ONE_DATA_REF, EXTENT_DATA_REF, "data")):
        pick = _shape(bodies, packed.size)
        if not pick:
            continue
        count, generation, flags, kinds, *ref = zip(*_joined(packed, bodies, pick))
        # each made by tuple.__new__ from a C-level map: ExtentItem(...) is a Python call per item
        made = map(tuple.__new__, repeat(ExtentItem), zip(count, generation, flags, zip(zip(repeat(tag), *ref))))
        keep = list(map(kind.__eq__, kinds))
        for i, item in zip(compress(pick, keep), compress(made, keep)):
            out[i] = item
    return out


def _named(bodies: list[bytes], head: struct.Struct, name_len: int, tail_len: int | None) -> list[tuple | None]:
    """Per body, its head's fields when it holds exactly one head + name (+ tail), else None."""
    out: list[tuple | None] = [None] * len(bodies)
    size = head.size
    if bodies and min(map(len, bodies)) >= size:
        heads: list = list(map(head.unpack_from, bodies))
    else:
        heads = [head.unpack_from(b) if len(b) >= size else None for b in bodies]
    for i, (v, n) in enumerate(zip(heads, map(len, bodies))):
        if v and v[name_len] and size + v[name_len] + (v[tail_len] if tail_len is not None else 0) == n:
            out[i] = v
    return out


def unpack_dir_entries_one(bodies: list[bytes]) -> list[DirEntry | None]:
    """The entry of each body that holds exactly one (every DIR_INDEX, nearly every DIR_ITEM)."""
    size = fast.DIR_ITEM_HEAD.size
    return [None if v is None else DirEntry((v[0], v[1], v[2]), v[3], v[6], b[size : size + v[5]], b[size + v[5] :])
            for b, v in zip(bodies, _named(bodies, fast.DIR_ITEM_HEAD, 5, 4))]


def unpack_inode_refs_one(bodies: list[bytes]) -> list[InodeRef | None]:
    """The name of each INODE_REF body that holds exactly one (every name but hard links in one directory)."""
    size = fast.INODE_REF_HEAD.size
    return [None if v is None else InodeRef(v[0], b[size:]) for b, v in zip(bodies, _named(bodies, fast.INODE_REF_HEAD, 1, None))]
