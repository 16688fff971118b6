"""``struct`` formats derived from the construct definitions.

construct parses a 150-item leaf in about 2 ms; ``struct`` on a memoryview is
two orders of magnitude faster. Rather than writing the layouts a second time,
the formats here are computed from ``structs.py`` at import, so construct stays
the one definition and a test holds both decoders equal on every vector.
"""
from __future__ import annotations

import struct
from typing import Any

import construct as c

from blockemu.ondisk import structs as S


def _pieces(con: Any, prefix: str = "") -> list[tuple[str, str | None]]:
    """(struct format without byte order, flattened field name) per field of a fixed-size Struct,
    in layout order; padding has no name."""
    pieces: list[tuple[str, str | None]] = []
    for sub in con.subcons:
        name = f"{prefix}{sub.name}" if sub.name else ""
        inner = sub.subcon if isinstance(sub, c.Renamed) else sub
        if isinstance(inner, c.Const):
            inner = inner.subcon
        if isinstance(inner, c.Struct):
            pieces += _pieces(inner, name + ".")
        elif isinstance(inner, c.FormatField):
            pieces.append((inner.fmtstr.lstrip("<>=!"), name))
        elif isinstance(inner, c.Bytes):
            pieces.append((f"{inner.length}s", name))
        elif isinstance(inner, c.Padded) and not name:
            pieces.append((f"{inner.length}x", None))
        elif isinstance(inner, c.Array):
            for i in range(inner.count):
                pieces += [(f, None if n is None else f"{name}[{i}].{n}") for f, n in _pieces(inner.subcon)]
        else:  # pragma: no cover - a new construct type needs a rule here
            raise TypeError(f"no struct format for {inner!r}")
    return pieces


def derive(con: Any) -> tuple[struct.Struct, list[str]]:
    pieces = _pieces(con)
    packed = struct.Struct("<" + "".join(f for f, _ in pieces))
    assert packed.size == con.sizeof(), (con, packed.size, con.sizeof())
    return packed, [n for _, n in pieces if n is not None]


def picked(con_name: str, fields: tuple[str, ...]) -> struct.Struct:
    """A decoder of only ``fields`` (in layout order) of a struct: every other field is skipped
    as padding, so a reader that needs four fields of twenty makes no object for the rest."""
    pieces = _pieces(S.STRUCTS[con_name])
    assert [n for _, n in pieces if n in fields] == list(fields), (con_name, fields)
    return struct.Struct("<" + "".join(f if n in fields else f"{struct.calcsize('<' + f)}x" for f, n in pieces))


FAST: dict[str, tuple[struct.Struct, list[str]]] = {name: derive(con) for name, con in S.STRUCTS.items()}

SUPERBLOCK, _ = FAST["Superblock"]
HEADER, _ = FAST["Header"]
ITEM, _ = FAST["Item"]
KEY_PTR, _ = FAST["KeyPtr"]
KEY, _ = FAST["Key"]
INODE_ITEM, _ = FAST["InodeItem"]
INODE_REF_HEAD, _ = FAST["InodeRefHead"]
INODE_EXTREF_HEAD, _ = FAST["InodeExtrefHead"]
DIR_ITEM_HEAD, _ = FAST["DirItemHead"]
FILE_EXTENT_ITEM, _ = FAST["FileExtentItem"]
EXTENT_ENCRYPTION_CONTEXT, _ = FAST["ExtentEncryptionContext"]
INODE_ENCRYPTION_CONTEXT, _ = FAST["InodeEncryptionContext"]
SYMLINK_DATA_HEAD, _ = FAST["SymlinkDataHead"]
ROOT_ITEM, _ = FAST["RootItem"]
EXTENT_ITEM, _ = FAST["ExtentItem"]
TREE_BLOCK_REF, _ = FAST["TreeBlockRef"]
EXTENT_DATA_REF, _ = FAST["ExtentDataRef"]
BACKUP_ROOT, BACKUP_ROOT_FIELDS = FAST["BackupRoot"]

# A leaf's item headers as two columns, each decoded by one ``iter_unpack`` over the header
# array: the keys (the item's tail skipped) and the (data offset, data size) pairs (the key
# skipped). The item header is a key followed by those two fields.
assert ITEM.format.startswith(KEY.format)
ITEM_KEYS = struct.Struct(f"{KEY.format}{ITEM.size - KEY.size}x")
ITEM_SPANS = struct.Struct(f"<{KEY.size}x{ITEM.format[len(KEY.format):]}")

HEADER_SIZE = HEADER.size
ITEM_SIZE = ITEM.size
KEY_PTR_SIZE = KEY_PTR.size


def flat_values(con_name: str, parsed: Any) -> list[Any]:
    """The construct parse of a struct flattened in the fast format's field order (for tests)."""
    _, names = FAST[con_name]
    out = []
    for name in names:
        obj = parsed
        for part in name.replace("]", "").replace("[", ".").split("."):
            obj = obj[int(part)] if part.isdigit() else obj[part]
        out.append(obj)
    return out


def layout(con: Any) -> list[tuple[int, int, str]]:
    """Top-level (offset, size, field) rows of a fixed-size Struct, as SPEC.md tables list them.

    Padding rows are named ``(padding)``; nested structs and arrays are one row each."""
    rows, pos = [], 0
    for sub in con.subcons:
        size = sub.sizeof()
        rows.append((pos, size, sub.name or "(padding)"))
        pos += size
    return rows
