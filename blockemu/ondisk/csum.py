"""Checksum algorithms by their on-disk id (btrfs's numbering).

The on-disk field is always 32 bytes with the digest at its start, so changing
algorithm never moves a layout.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import struct
import sys
from typing import Any, Callable

import xxhash


def _crc32c_function() -> Callable[..., int]:
    """The crc32c package's C function, loaded from its extension module without running the
    package's ``__init__``, which imports importlib.metadata to look up its own version: ~0.1 s
    of every command's start (a large fsck's wall is ~2 s). Anything unexpected in the package's
    layout loads it the ordinary way."""
    loaded = sys.modules.get("crc32c")
    if loaded is not None:  # imported already: its function
        return loaded.crc32c
    package = importlib.util.find_spec("crc32c")
    where = list(package.submodule_search_locations or []) if package else []
    finder = importlib.machinery.FileFinder(where[0], (importlib.machinery.ExtensionFileLoader,
                                                       importlib.machinery.EXTENSION_SUFFIXES)) if where else None
    spec = finder.find_spec("crc32c._crc32c") if finder else None
    if spec is not None and spec.loader is not None:
        module: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.crc32c
    import crc32c

    return crc32c.crc32c


crc32c = _crc32c_function()

CSUM_FIELD = 32  # bytes every on-disk checksum field takes, whatever the algorithm
# what one checksum covers (structs.SECTOR_SIZE, not imported from there: the sealing workers
# load this module without construct)
SECTOR = 4096
CRC32C, XXHASH64, SHA256, BLAKE2B = 0, 1, 2, 3


def _crc(data: bytes | memoryview) -> bytes:
    return crc32c(data).to_bytes(4, "little")


def _xx(data: bytes | memoryview) -> bytes:
    return xxhash.xxh64_intdigest(data).to_bytes(8, "little")


def _sha(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _blake(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


ALGORITHMS: dict[int, tuple[str, int, Callable[[bytes | memoryview], bytes]]] = {
    CRC32C: ("crc32c", 4, _crc),
    XXHASH64: ("xxhash64", 8, _xx),
    SHA256: ("sha256", 32, _sha),
    BLAKE2B: ("blake2b", 32, _blake),
}
BY_NAME = {name: ident for ident, (name, _, _) in ALGORITHMS.items()}


def csum_size(csum_type: int) -> int:
    return ALGORITHMS[csum_type][1]


def digest(csum_type: int, data: bytes | memoryview) -> bytes:
    return ALGORITHMS[csum_type][2](data)


def unit_digests(units: list[bytes | bytearray | memoryview], csum_type: int) -> bytes:
    """The checksums of ``units`` (4 KiB sectors each), concatenated as the checksum items hold
    them. crc32c, the default, packs its integers in one call: a ``bytes`` per sector and their
    join cost ~2.5x the CRCs themselves (a cold read verifies every sector it reads)."""
    if csum_type == CRC32C:
        return struct.pack(f"<{len(units)}I", *map(crc32c, units))
    return b"".join(map(ALGORITHMS[csum_type][2], units))


def digests(data: bytes | bytearray | memoryview, csum_type: int) -> bytes:
    """The per-sector checksums of ``data`` (whole sectors), concatenated: ``unit_digests`` of its sectors."""
    mv = memoryview(data)
    return unit_digests([mv[i : i + SECTOR] for i in range(0, len(mv), SECTOR)], csum_type)


def field(csum_type: int, data: bytes | memoryview) -> bytes:
    """The 32-byte checksum field for ``data``."""
    return digest(csum_type, data).ljust(CSUM_FIELD, b"\0")


def unfilled(csum_type: int, found: bytes, want: bytes) -> str | None:
    """Why a checksum field ``found`` is not ``want`` (``field``) when its digest is right: the
    field is the digest zero-filled to 32 bytes (SPEC), and a field whose fill alone was damaged
    was reported as "checksum mismatch (found 9a..., wanted 9a...)" -- the same digest twice."""
    n = csum_size(csum_type)
    if found[:n] != want[:n]:
        return None
    return f"checksum field not zero-filled past its {n}-byte digest (found {found[n:].hex()})"


def name_of(csum_type: int) -> str:
    return ALGORITHMS[csum_type][0] if csum_type in ALGORITHMS else f"unknown({csum_type})"
