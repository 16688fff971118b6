"""AES-256-XTS per data unit: the fast paths -- OpenSSL's EVP API with the tweak alone set per
unit, and one Cipher with its mode swapped per unit -- must give exactly what a Cipher built per
unit gives, and must still be the paths in use."""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import tracemalloc

import cryptography
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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



def _counting_libcrypto(monkeypatch, iv: str) -> tuple[list, object]:
    """A fresh ``libcrypto_xts`` over a libcrypto whose EVP_CipherInit_ex2 calls are counted;
    its EVP_CIPHER_CTX_iv_noconst the real one (``iv`` "live"), one naming a scratch buffer
    ("copy": a libcrypto whose IV pointer is not the context's IV, so writes to it change
    nothing), or none ("absent": the deprecated call gone from a later OpenSSL)."""
    real, inits, scratch = xts.library(), [], ctypes.create_string_buffer(16)

    class Init:
        def __init__(self) -> None:
            object.__setattr__(self, "fn", real.EVP_CipherInit_ex2)

        def __setattr__(self, name: str, value: object) -> None:  # argtypes: the real function's
            setattr(self.fn, name, value)

        def __call__(self, *args: object) -> int:
            inits.append(args)
            return self.fn(*args)

    class Lib:
        EVP_CipherInit_ex2 = Init()

        def __getattr__(self, name: str) -> object:
            if name == "EVP_CIPHER_CTX_iv_noconst" and iv == "copy":
                return lambda ctx: ctypes.addressof(scratch)
            if name == "EVP_CIPHER_CTX_iv_noconst" and iv == "absent":
                raise AttributeError(name)
            return getattr(real, name)

    monkeypatch.setattr(xts, "library", Lib)
    fast = xts.libcrypto_xts.__wrapped__()
    assert fast is not None
    inits.clear()  # the setup's own check
    return inits, fast


@pytest.mark.parametrize("iv", ["live", "copy", "absent"])
def test_a_units_tweak_is_written_into_the_context_not_set_by_an_init(monkeypatch, iv):
    """A MiB's 256 units take one EVP_CipherInit_ex2 (the key's), each later tweak written
    into the context's IV: an init per unit was ~40 % of the per-unit calls' cost, in every
    sealing worker. A libcrypto whose IV pointer is not the live IV is caught by the setup's
    check (one without the call, by its absence) and gets an init per unit: the same
    ciphertext either way."""
    inits, fast = _counting_libcrypto(monkeypatch, iv)
    key, data = os.urandom(64), os.urandom(256 * UNIT)
    out = bytearray(len(data) + 15)
    src, dst = xts.buffer_address(data), xts.buffer_address(out)
    fast(bytearray(key), range(src, src + len(data), UNIT), 7, range(dst, dst + len(data), UNIT), True)
    assert len(inits) == (1 if iv == "live" else 256)
    assert bytes(out[: len(data)]) == reference(key, data, 7)

def test_hkdf_calls_keep_the_gil_too(monkeypatch):
    """HKDF-SHA512 loads libcrypto through ``xts.library()`` (the PyDLL): derived on the event
    loop through a CDLL, each key gave the GIL to a sealing thread and waited to get it back,
    ~5x its own CPU time in the stress mix. Same key as cryptography's HKDF."""
    loaded, real = [], xts.library

    def library():
        loaded.append(True)
        return real()

    monkeypatch.setattr(xts, "library", library)
    derive = fscrypt._libcrypto_hkdf.__wrapped__()
    assert derive is not None and loaded
    master, info = os.urandom(64), b"fscrypt\0\x09" + os.urandom(16)
    out = bytearray(64)
    derive(master, info, out)
    assert bytes(out) == HKDF(algorithm=hashes.SHA512(), length=64, salt=None, info=info).derive(master)


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
    pages = fscrypt.decrypt_pages(bytearray(key), bytes(sealed), first_unit)  # a cold read's: a page per unit
    assert [len(p) for p in pages] == [UNIT] * 5 and b"".join(pages) == data


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


def test_a_shorter_tweak_table_built_late_never_replaces_the_one_in_use(monkeypatch):
    """Threads share the tweak table. A thread that started growing it for a short extent (B)
    and finishes after a longer one grew it further must not leave the shorter table in place
    for a thread (C) that checked the longer one was long enough: C would read tweaks past
    the shorter table's end -- wrong ciphertext, silently. Driven by events: B's build (the
    closure's ``range``) and C's window between its check and its use (its ``len`` of the
    sources) block until the test lets them go."""
    import builtins
    import threading

    xts.libcrypto_xts.cache_clear()  # a fresh table, empty: this test grows it
    monkeypatch.setattr(xts, "libcrypto_xts", functools.cache(xts.libcrypto_xts.__wrapped__))
    key, data = os.urandom(64), os.urandom(5 * UNIT)
    b_building, b_go, c_waiting, c_go = (threading.Event() for _ in range(4))
    names: dict[int, str] = {}

    def blocking_range(*args):
        if names.get(threading.get_ident()) == "B" and len(args) == 1:  # B's table build
            b_building.set()
            assert b_go.wait(10)
        return builtins.range(*args)

    checked: set[int] = set()

    def blocking_len(x):
        me = threading.get_ident()
        if names.get(me) == "C":
            if isinstance(x, bytearray) and builtins.len(x) >= 16 * 1000:
                checked.add(me)  # C read the long table's length; its next len is the window
            elif me in checked:
                checked.discard(me)
                c_waiting.set()
                assert c_go.wait(10)
        return builtins.len(x)

    monkeypatch.setattr(xts, "range", blocking_range, raising=False)
    monkeypatch.setattr(xts, "len", blocking_len, raising=False)
    results: dict[str, bytes] = {}

    def run(name: str, first_unit: int) -> None:
        names[threading.get_ident()] = name
        results[name] = bytes(fscrypt.encrypt_units(bytearray(key), data, first_unit))

    b = threading.Thread(target=run, args=("B", 295))  # needs 300 tweaks
    b.start()
    assert b_building.wait(10)
    run("A", 995)  # needs 1000: grows the table while B still builds its 300
    c = threading.Thread(target=run, args=("C", 995))
    c.start()
    assert c_waiting.wait(10)  # C saw a table long enough
    b_go.set()
    b.join(10)  # B's table lands now
    c_go.set()
    c.join(10)
    assert results["A"] == reference(key, data, 995)
    assert results["B"] == reference(key, data, 295)
    assert results["C"] == reference(key, data, 995), "C encrypted with tweaks read past a shorter table"


def test_without_libcrypto_every_caller_falls_back_to_cryptography(monkeypatch):
    """No OpenSSL 3 libcrypto (``library()`` raising OSError, as ctypes does when the .so is
    absent): encryption, decryption and a sealing worker's slot all give the same bytes
    through cryptography's path."""
    from blockemu.crypto import sealworker
    from blockemu.ondisk import csum

    def absent():
        raise OSError("libcrypto.so.3: cannot open shared object file")

    monkeypatch.setattr(xts, "library", absent)
    monkeypatch.setattr(xts, "libcrypto_xts", functools.cache(xts.libcrypto_xts.__wrapped__))
    assert xts.libcrypto_xts() is None
    key, data = os.urandom(64), os.urandom(3 * UNIT)
    assert bytes(fscrypt.encrypt_units(bytearray(key), data, 300)) == reference(key, data, 300)
    assert bytes(fscrypt.decrypt_units(bytearray(key), reference(key, data, 300), 300)) == data
    assert b"".join(fscrypt.decrypt_pages(bytearray(key), reference(key, data, 300), 300)) == data
    arena = memoryview(bytearray(4 * UNIT))
    arena[UNIT : 4 * UNIT] = data
    cap = 3 * UNIT
    slots = memoryview(bytearray(sealworker.slot_size(cap)))
    slots[: sealworker.KEY] = key
    ctype = next(iter(csum.ALGORITHMS))
    digests = sealworker.seal_slot(arena, slots, 0, (1, 2, 3), cap, ctype)
    out = sealworker.KEY + cap
    assert bytes(slots[out : out + 3 * UNIT]) == reference(key, data, 0)
    assert bytes(slots[: sealworker.KEY]) == bytes(sealworker.KEY), "the key stayed in the slot"
    assert digests == csum.digests(reference(key, data, 0), ctype)
