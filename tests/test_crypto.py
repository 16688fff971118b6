"""AES-256-XTS per data unit: the fast paths -- OpenSSL's EVP API with the tweak alone set per
unit, and one Cipher with its mode swapped per unit -- must give exactly what a Cipher built per
unit gives, and must still be the paths in use."""
from __future__ import annotations

import ctypes
import mmap
import os
import tracemalloc

import cryptography
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockemu.crypto import fscrypt, xts

UNIT = fscrypt.DATA_UNIT


def reference(key: bytes, data: bytes, first_unit: int) -> bytes:
    """A Cipher per unit, tweak = the unit's index within its extent (SPEC: "Contents")."""
    out = b""
    for i in range(len(data) // UNIT):
        tweak = (first_unit + i).to_bytes(16, "little")
        out += Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor().update(data[i * UNIT : (i + 1) * UNIT])
    return out


def test_the_mode_swap_is_still_honoured_by_this_cryptography():
    """Fails loudly when a cryptography release stops reading Cipher.mode afresh: blockemu then
    falls back to a Cipher per unit, correct but slower (the bench would show it)."""
    assert fscrypt.MODE_SWAP, f"cryptography {cryptography.__version__} ignores Cipher.mode swaps: slow path in use"


def test_libcrypto_is_the_path_in_use():
    """OpenSSL 3's libcrypto is what this machine seals with; without it (the fallback) the
    bench's sequential figure drops by the cost of a key schedule per 4 KiB unit. Its calls keep
    the GIL (a PyDLL): a thread sealing beside the event loop must not queue for the GIL twice
    per 4 KiB unit."""
    assert xts.libcrypto_xts() is not None
    assert isinstance(xts.library(), ctypes.PyDLL)


@pytest.mark.parametrize("path", ["libcrypto", "mode-swap", "cipher-per-unit"])
@pytest.mark.parametrize("first_unit", [0, 3, 300])
def test_every_path_equals_a_cipher_per_unit(monkeypatch, path, first_unit):
    if path != "libcrypto":
        monkeypatch.setattr(xts, "libcrypto_xts", lambda: None)
        monkeypatch.setattr(fscrypt, "MODE_SWAP", path == "mode-swap")
    key, data = os.urandom(64), os.urandom(5 * UNIT)
    sealed = fscrypt.encrypt_units(bytearray(key), data, first_unit)
    assert bytes(sealed) == reference(key, data, first_unit)
    assert bytes(fscrypt.decrypt_units(bytearray(key), bytes(sealed), first_unit)) == data


def test_units_wherever_they_live_into_a_shared_mapping():
    """The sealing worker's call: units from a mapping (and a read-only one, and a heap page),
    ciphertext into a slice of another mapping with room after it; nothing outside is touched."""
    key, data = os.urandom(64), os.urandom(4 * UNIT)
    arena = mmap.mmap(-1, 8 * UNIT)
    arena[2 * UNIT : 5 * UNIT] = data[: 3 * UNIT]
    view = memoryview(arena)
    units = [view[2 * UNIT : 3 * UNIT], memoryview(data)[UNIT : 2 * UNIT], view[4 * UNIT : 5 * UNIT],
             bytearray(data[3 * UNIT :])]
    slots = mmap.mmap(-1, 6 * UNIT)
    slots[:] = b"\xaa" * len(slots)
    out = memoryview(slots)[UNIT : 5 * UNIT + 15]
    fscrypt.encrypt_units(bytearray(key), units, 7, out=out)
    assert bytes(out[: 4 * UNIT]) == reference(key, data, 7)
    assert slots[:UNIT] == b"\xaa" * UNIT and slots[5 * UNIT :] == b"\xaa" * UNIT
    for v in (out, *units[:3], view):
        v.release()


def test_wrong_unit_sizes_and_equal_key_halves_are_refused():
    with pytest.raises(ValueError):
        fscrypt.encrypt_units(bytearray(64), [bytes(UNIT), bytes(100)])
    with pytest.raises(ValueError):
        fscrypt.encrypt_units(bytearray(64), bytes(UNIT + 1))
    with pytest.raises(ValueError):  # XTS refuses a key whose two halves are equal, on every path
        fscrypt.encrypt_units(bytearray(b"k" * 64), bytes(UNIT))


def test_wipe_zeroes_in_place_without_allocating_zeros():
    """Freeing an extent's frames zeroes a MiB of plaintext per run: allocating (and faulting in) a
    MiB of zeros to copy from cost more than sealing the run (tools/bench.py's profile)."""
    frames = mmap.mmap(-1, 300 * UNIT)
    frames[:] = b"p" * len(frames)
    view = memoryview(frames)
    tracemalloc.start()
    try:
        fscrypt.wipe(view[UNIT : 257 * UNIT])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, f"wipe allocated {peak} bytes"
    assert frames[:UNIT] == b"p" * UNIT and frames[257 * UNIT :] == b"p" * (43 * UNIT)
    assert frames[UNIT : 257 * UNIT] == bytes(256 * UNIT)
    secret = bytearray(b"s" * 64)
    fscrypt.wipe(secret)
    assert secret == bytes(64)
    view.release()
