"""Checksum algorithms by their on-disk id (btrfs's numbering).

The on-disk field is always 32 bytes with the digest at its start, so changing
algorithm never moves a layout.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import crc32c as _crc32c
import xxhash

CSUM_FIELD = 32  # bytes every on-disk checksum field takes, whatever the algorithm
CRC32C, XXHASH64, SHA256, BLAKE2B = 0, 1, 2, 3


def _crc(data: bytes | memoryview) -> bytes:
    return _crc32c.crc32c(data).to_bytes(4, "little")


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


def field(csum_type: int, data: bytes | memoryview) -> bytes:
    """The 32-byte checksum field for ``data``."""
    return digest(csum_type, data).ljust(CSUM_FIELD, b"\0")


def name_of(csum_type: int) -> str:
    return ALGORITHMS[csum_type][0] if csum_type in ALGORITHMS else f"unknown({csum_type})"
