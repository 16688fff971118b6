"""fscrypt v2 key derivation and contents encryption (pure functions).

Byte-compatible with Linux fscrypt: HKDF-SHA512 over the master key with an
empty salt and info ``b"fscrypt\\0" + context``; the key identifier is context
1, a per-extent key context 9 + the extent's 16-byte nonce (the btrfs
per-extent encryption series; fscrypt's per-file key is the same with context
2). Contents are AES-256-XTS per 4096-byte data unit, the tweak being the data
unit's index *from the extent's start* as 16 little-endian bytes, so an extent
decrypts the same wherever a file references it.

Derived keys are returned as ``bytearray`` so their holder can zero them.
"""
from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import struct
import threading
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blockemu.crypto import xts
from blockemu.crypto.xts import DATA_UNIT, XTS_KEY_SIZE, Buffer

HKDF_CONTEXT_KEY_IDENTIFIER = 1
HKDF_CONTEXT_PER_FILE_ENC_KEY = 2
HKDF_CONTEXT_PER_EXTENT_ENC_KEY = 9
KEY_IDENTIFIER_SIZE = 16
NONCE_SIZE = 16
MIN_KEY_SIZE, MAX_KEY_SIZE = 16, 64
# A v2 policy's master key must be at least as long as its modes' security strength: 32 bytes
# for AES-256-XTS and AES-256-CTS (fscrypt_valid_master_key_size). A shorter key is a valid
# add_key (16 bytes suffice there) but protects nothing fscrypt would unlock.
MIN_POLICY_KEY_SIZE = 32


class _Param(ctypes.Structure):
    """OpenSSL's OSSL_PARAM."""

    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_UTF8_STRING, _OCTET_STRING, _UNMODIFIED = 4, 5, ctypes.c_size_t(-1).value


@functools.cache
def _libcrypto_hkdf() -> Callable[[bytes | bytearray, bytes, bytearray], None] | None:
    """HKDF-SHA512 by OpenSSL 3's EVP_KDF (the libcrypto Python's own hashlib uses), reading the
    master key where it is and writing the derived key where it goes: OpenSSL cleanses its
    copies (the key in the KDF context, the pseudorandom key and each HMAC block) before it
    frees them. cryptography's ``HKDF.derive_into`` is no substitute: it leaves a freed
    ``bytes`` holding the derived key behind (seen by tests/test_wipe.py's memory scan).
    The library is ``xts.library()``, whose calls keep the GIL: a derivation takes tens of
    microseconds, and on the event loop a CDLL's call gave the GIL to a sealing thread and
    waited to get it back (the stress mix's loop spent ~5x a derivation's CPU time in it)."""
    try:
        lib = xts.library()
        fetch = lib.EVP_KDF_fetch
    except (OSError, AttributeError):  # no OpenSSL 3 libcrypto
        return None
    fetch.restype = ctypes.c_void_p
    fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    kdf = fetch(None, b"HKDF", None)
    if not kdf:
        return None
    lib.EVP_KDF_CTX_new.restype = ctypes.c_void_p
    lib.EVP_KDF_CTX_new.argtypes = [ctypes.c_void_p]
    lib.EVP_KDF_CTX_free.argtypes = [ctypes.c_void_p]
    lib.EVP_KDF_derive.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(_Param)]

    digest = b"SHA512"
    address = xts.buffer_address
    local = threading.local()

    def derive(master: bytes | bytearray, info: bytes, out: bytearray) -> None:
        # each thread fills in its own parameter array: building one (four ctypes structures)
        # per call cost a third of a derivation, and threads derive concurrently (sealing)
        params = getattr(local, "params", None)
        if params is None:
            params = local.params = (_Param * 4)(
                _Param(b"digest", _UTF8_STRING, address(digest), len(digest), _UNMODIFIED),
                _Param(b"key", _OCTET_STRING, None, 0, _UNMODIFIED),
                _Param(b"info", _OCTET_STRING, None, 0, _UNMODIFIED),
                _Param(None, 0, None, 0, 0),
            )
        key, about = params[1], params[2]
        key.data, key.data_size, about.data, about.data_size = address(master), len(master), address(info), len(info)
        ctx = lib.EVP_KDF_CTX_new(kdf)
        try:
            if lib.EVP_KDF_derive(ctx, address(out), len(out), params) != 1:
                raise ValueError("HKDF-SHA512 failed in libcrypto")
        finally:
            lib.EVP_KDF_CTX_free(ctx)
            key.data = about.data = None  # no address of a buffer that may go is kept

    return derive


def hkdf(master: bytes | bytearray, context: int, info: bytes, length: int) -> bytearray:
    """Derived straight into the ``bytearray`` returned, from the master as given (no ``bytes``
    copy of either), so zeroing the two leaves nothing behind. Without an OpenSSL 3 libcrypto,
    cryptography derives it, and one freed copy of each derived key may remain in memory."""
    out = bytearray(length)
    info = b"fscrypt\0" + bytes([context]) + info
    derive = _libcrypto_hkdf()
    if derive is not None:
        derive(master, info, out)
    else:
        HKDF(algorithm=hashes.SHA512(), length=length, salt=None, info=info).derive_into(master, out)
    return out


def key_identifier(master: bytes | bytearray) -> bytes:
    return bytes(hkdf(master, HKDF_CONTEXT_KEY_IDENTIFIER, b"", KEY_IDENTIFIER_SIZE))


def extent_key(master: bytes | bytearray, nonce: bytes) -> bytearray:
    """The AES-256-XTS key (64 bytes) of one extent, derived at writeout and at read."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("extent nonce must be 16 bytes")
    return hkdf(master, HKDF_CONTEXT_PER_EXTENT_ENC_KEY, nonce, XTS_KEY_SIZE)




def _units(data: Buffer) -> list[memoryview]:
    n = len(data)
    if n % DATA_UNIT:
        raise ValueError(f"{n} bytes is not a whole number of {DATA_UNIT}-byte data units")
    mv = memoryview(data)
    return [mv[a : a + DATA_UNIT] for a in range(0, n, DATA_UNIT)]


_TWEAKS: tuple[modes.XTS, ...] = ()


def _tweaks(count: int) -> tuple[modes.XTS, ...]:
    """XTS modes for data units 0 .. count-1. A mode only holds its tweak, so they are made
    once and shared; the table is replaced whole (never appended to), so a thread sealing
    concurrently always sees a consistent one."""
    global _TWEAKS
    table = _TWEAKS
    if len(table) < count:
        table = _TWEAKS = tuple(modes.XTS(i.to_bytes(16, "little")) for i in range(max(count, 2 * len(table), 256)))
    return table


def _mode_swap_honoured() -> bool:
    """One validated Cipher whose mode is swapped per data unit: building a Cipher per unit
    re-checks the key and mode every time, which costs more than the AES itself. But
    cryptography documents ``Cipher.mode`` as read-only in spirit (no setter is promised):
    the swap works because ``encryptor()`` reads the attribute afresh. Checked once at
    import against a freshly built Cipher; if a release changes that, ``_xts`` builds a
    Cipher per unit (correct, slower) and tests/test_crypto.py fails loudly."""
    key, unit, tweak = bytes(range(64)), bytes(DATA_UNIT), (1).to_bytes(16, "little")
    cipher = Cipher(algorithms.AES(key), modes.XTS(bytes(16)))
    try:
        cipher.mode = modes.XTS(tweak)  # type: ignore[misc]
    except AttributeError:
        return False
    fresh = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor().update(unit)
    return cipher.encryptor().update(unit) == fresh


MODE_SWAP = _mode_swap_honoured()


def _xts_by_cipher(key: bytes | bytearray, units: Sequence[Buffer], first_unit: int, encrypt: bool,
                   omv: memoryview) -> None:
    """The portable path: a cryptography encryptor per unit (its key schedule rebuilt each time)."""
    tweaks = _tweaks(first_unit + len(units))[first_unit:]
    # the key as given, not a bytes copy: its holder zeroes it; OpenSSL's copy (the key
    # schedules in the cipher context) is cleansed when the context is freed
    algorithm = algorithms.AES(key)
    cipher = Cipher(algorithm, tweaks[0] if tweaks else modes.XTS(bytes(16)))
    for i, (unit, mode) in enumerate(zip(units, tweaks)):
        if MODE_SWAP:
            cipher.mode = mode
        else:
            cipher = Cipher(algorithm, mode)
        context = cipher.encryptor() if encrypt else cipher.decryptor()
        a = i * DATA_UNIT
        context.update_into(unit, omv[a : a + DATA_UNIT + 15])


def _xts(key: bytes | bytearray, data: Buffer | Sequence[Buffer], first_unit: int, encrypt: bool,
         out: bytearray | memoryview | None = None) -> bytearray | memoryview:
    """``data``: one buffer of whole units, or a sequence of 4 KiB units wherever they live."""
    one = not isinstance(data, (list, tuple))
    units = _units(data) if one else data  # type: ignore[arg-type]
    n = len(units) * DATA_UNIT
    # update_into wants block_size - 1 bytes of slack after each unit; writing into one
    # (reusable) buffer avoids a fresh allocation, and its page faults, per call
    trim = out is None or len(out) < n + 15
    if trim:
        out = bytearray(n + 15)
    omv = memoryview(out)  # type: ignore[arg-type]
    try:
        if not xts.crypt(key, data if one else units, first_unit, encrypt, omv):  # type: ignore[arg-type]
            _xts_by_cipher(key, units, first_unit, encrypt, omv)
    finally:
        omv.release()
    if trim:
        del out[n:]  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


def encrypt_units(key: bytes | bytearray, plaintext: Buffer | Sequence[Buffer], first_unit: int = 0,
                  out: bytearray | memoryview | None = None) -> bytearray | memoryview:
    """Encrypt whole data units -- one buffer, or a sequence of 4 KiB units wherever they
    live; ``first_unit`` is the index of the first one within its extent. With ``out`` (at
    least 15 bytes longer than the data) the ciphertext goes to its start."""
    return _xts(key, plaintext, first_unit, True, out)


def decrypt_units(key: bytes | bytearray, ciphertext: Buffer, first_unit: int = 0) -> bytearray:
    return _xts(key, ciphertext, first_unit, False)  # type: ignore[return-value]


def decrypt_pages(key: bytes | bytearray, ciphertext: Buffer, first_unit: int = 0) -> list[bytearray]:
    """Whole data units decrypted into a fresh 4 KiB ``bytearray`` each, as the page cache keeps
    them: a cold read decrypts straight into the pages it caches, not into a buffer of the whole
    range that it then copies page by page and zeroes. On failure the pages are zeroed."""
    pages = [bytearray(DATA_UNIT) for _ in range(len(ciphertext) // DATA_UNIT)]
    try:
        if not xts.crypt(key, ciphertext, first_unit, False, pages):  # no OpenSSL 3: cryptography's path
            whole = decrypt_units(key, ciphertext, first_unit)
            for k, page in enumerate(pages):
                page[:] = memoryview(whole)[k * DATA_UNIT : (k + 1) * DATA_UNIT]
            wipe(whole)
    except BaseException:
        for page in pages:
            wipe(page)
        raise
    return pages


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a secret (or plaintext) in place. It zeroes only this buffer: every copy
    blockemu makes is a bytearray its owner wipes this way (tests/test_wipe.py scans the
    processes' memory for any other)."""
    xts.zero(buf)


# ---------------------------------------------------------------------- filenames
#
# fscrypt encrypts a directory's names with its per-inode key (HKDF context 2 and the inode's
# nonce, 32 bytes for AES-256-CTS), IV all zero, after NUL-padding the name to at least 16
# bytes and to the policy's boundary (FSCRYPT_POLICY_FLAGS_PAD_*), capped at NAME_MAX.

AES_BLOCK = 16
CTS_KEY_SIZE = 32
FNAME_MIN_LEN = 16
NAME_MAX = 255
POLICY_FLAGS_PAD_MASK = 0x03
NOKEY_NAME_BYTES = 149  # fscrypt_nokey_name.bytes: the ciphertext kept verbatim in a digested name
NOKEY_DIRHASH = 8  # fscrypt_nokey_name.dirhash[2]: two little-endian u32


def names_key(master: bytes | bytearray, nonce: bytes) -> bytearray:
    """A directory's AES-256-CTS key (fscrypt's per-file key, HKDF context 2)."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("inode nonce must be 16 bytes")
    return hkdf(master, HKDF_CONTEXT_PER_FILE_ENC_KEY, nonce, CTS_KEY_SIZE)


def _cbc(key: bytes | bytearray, data: bytes | bytearray, encrypt: bool) -> bytearray:
    cipher = Cipher(algorithms.AES(key), modes.CBC(bytes(AES_BLOCK)))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    out = bytearray(len(data) + AES_BLOCK - 1)
    n = ctx.update_into(data, out)
    del out[n:]
    return out


def _ecb_decrypt_block(key: bytes | bytearray, block: bytes | bytearray) -> bytearray:
    out = bytearray(2 * AES_BLOCK - 1)
    Cipher(algorithms.AES(key), modes.ECB()).decryptor().update_into(block, out)
    del out[AES_BLOCK:]
    return out


def cts_encrypt(key: bytes | bytearray, plaintext: bytes | bytearray) -> bytes:
    """AES-CBC-CS3 with a zero IV, the kernel's "cts(cbc(aes))" (NIST SP 800-38A addendum; the
    variant of RFC 3962): CBC over the text zero-padded to whole blocks, then the last two
    ciphertext blocks swapped and the (now last) one cut to the length of the text's last
    block. One block is plain CBC. cryptography has no CTS mode, hence this on top of CBC."""
    n = len(plaintext)
    if n < AES_BLOCK:
        raise ValueError("CTS needs at least one whole block")
    tail = n - (n - 1) // AES_BLOCK * AES_BLOCK  # bytes in the last block, 1..16
    padded = bytearray(plaintext) + bytes(AES_BLOCK - tail)
    try:
        c = _cbc(key, padded, True)
    finally:
        wipe(padded)
    if n == AES_BLOCK:
        return bytes(c)
    return bytes(c[: -2 * AES_BLOCK] + c[-AES_BLOCK:] + c[-2 * AES_BLOCK : -2 * AES_BLOCK + tail])


def cts_decrypt(key: bytes | bytearray, ciphertext: bytes) -> bytearray:
    """The inverse of ``cts_encrypt``: the block now second to last decrypts (ECB) to the hidden
    block's tail XOR the zero-padded last plaintext block, which gives both back."""
    n = len(ciphertext)
    if n < AES_BLOCK:
        raise ValueError("CTS needs at least one whole block")
    if n == AES_BLOCK:
        return _cbc(key, ciphertext, False)
    tail = n - (n - 1) // AES_BLOCK * AES_BLOCK
    head, swapped, last = ciphertext[: n - tail - AES_BLOCK], ciphertext[n - tail - AES_BLOCK : n - tail], ciphertext[n - tail :]
    d = _ecb_decrypt_block(key, swapped)
    hidden = last + bytes(d[tail:])  # C[k-1]: its cut tail equals d's, as the padding was zeros
    p_last = bytearray(a ^ b for a, b in zip(d[:tail], last))
    wipe(d)
    out = _cbc(key, head + hidden + swapped, False)
    del out[-AES_BLOCK:]  # that block was CBC of the padded last block: p_last is the real one
    out += p_last
    wipe(p_last)
    return out


def padded_name_len(length: int, policy_flags: int, max_len: int = NAME_MAX) -> int:
    """fscrypt_fname_encrypted_size: at least 16, a multiple of the padding, at most ``max_len``
    (NAME_MAX for a name; for a symlink target, what its item can hold)."""
    pad = 4 << (policy_flags & POLICY_FLAGS_PAD_MASK)
    return min(-(-max(length, FNAME_MIN_LEN) // pad) * pad, max_len)


def legal_encrypted_len(length: int, policy_flags: int, max_len: int = NAME_MAX) -> bool:
    """Whether a stored name's (or target's) length is one that ``encrypt_name`` can produce."""
    return FNAME_MIN_LEN <= length <= max_len and padded_name_len(length, policy_flags, max_len) == length


def encrypt_name(key: bytes | bytearray, name: bytes, policy_flags: int, max_len: int = NAME_MAX) -> bytes:
    """A name (or a symlink target: fscrypt encrypts both alike) NUL-padded, then CBC-CTS."""
    padded = bytearray(name) + bytes(padded_name_len(len(name), policy_flags, max_len) - len(name))
    try:
        return cts_encrypt(key, padded)
    finally:
        wipe(padded)


def decrypt_name(key: bytes | bytearray, stored: bytes) -> bytes:
    plain = cts_decrypt(key, stored)
    try:
        return bytes(plain).rstrip(b"\0")
    finally:
        wipe(plain)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nokey_name(stored: bytes, dirhash: int, minor_hash: int = 0) -> str:
    """fscrypt_fname_disk_to_usr without the key (Linux 5.10+): base64url, unpadded, of
    ``struct fscrypt_nokey_name`` -- dirhash[2], then the ciphertext if it fits in 149 bytes,
    else its first 149 bytes and the SHA-256 of the rest (at most 252 characters)."""
    head = struct.pack("<II", dirhash, minor_hash)
    if len(stored) <= NOKEY_NAME_BYTES:
        return _b64url(head + stored)
    return _b64url(head + stored[:NOKEY_NAME_BYTES] + hashlib.sha256(stored[NOKEY_NAME_BYTES:]).digest())


def parse_nokey_name(name: bytes) -> tuple[int, bytes, bytes | None] | None:
    """A no-key name taken apart: (dirhash, ciphertext or its 149-byte prefix, SHA-256 of the
    rest or None); None for a name no ``nokey_name`` produced (a lookup of it finds nothing)."""
    try:
        raw = base64.urlsafe_b64decode(name + b"=" * (-len(name) % 4))
    except (ValueError, TypeError):
        return None
    if _b64url(raw).encode() != name:
        return None
    body = raw[NOKEY_DIRHASH:]
    dirhash = struct.unpack_from("<I", raw)[0] if len(raw) >= NOKEY_DIRHASH else 0
    if FNAME_MIN_LEN <= len(body) <= NOKEY_NAME_BYTES:
        return dirhash, body, None
    if len(body) == NOKEY_NAME_BYTES + 32:
        return dirhash, body[:NOKEY_NAME_BYTES], body[NOKEY_NAME_BYTES:]
    return None


def nokey_matches(stored: bytes, prefix: bytes, digest: bytes | None) -> bool:
    if digest is None:
        return stored == prefix
    return (len(stored) > NOKEY_NAME_BYTES and stored[:NOKEY_NAME_BYTES] == prefix
            and hashlib.sha256(stored[NOKEY_NAME_BYTES:]).digest() == digest)
