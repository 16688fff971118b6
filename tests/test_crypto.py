"""AES-256-XTS per data unit: the fast path (one Cipher, its mode swapped per unit) must give
exactly what a Cipher built per unit gives, and must still be the path in use."""
from __future__ import annotations

import os

import cryptography
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockemu.crypto import fscrypt

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


@pytest.mark.parametrize("swap", [True, False], ids=["mode-swap", "cipher-per-unit"])
@pytest.mark.parametrize("first_unit", [0, 3, 300])
def test_both_paths_equal_a_cipher_per_unit(monkeypatch, swap, first_unit):
    monkeypatch.setattr(fscrypt, "MODE_SWAP", swap)
    key, data = os.urandom(64), os.urandom(5 * UNIT)
    sealed = fscrypt.encrypt_units(bytearray(key), data, first_unit)
    assert bytes(sealed) == reference(key, data, first_unit)
    assert bytes(fscrypt.decrypt_units(bytearray(key), bytes(sealed), first_unit)) == data
