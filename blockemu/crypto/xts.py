"""AES-256-XTS per 4 KiB data unit through OpenSSL 3's libcrypto, by ctypes, and the zeroing
of buffers in place. Apart from ``fscrypt`` (which uses it) because the sealing workers import
only this and the checksums: not cryptography, whose import was half of a worker's start, and a
mount's first large write waits for its workers to start."""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence

DATA_UNIT = 4096
XTS_KEY_SIZE = 64
Buffer = bytes | bytearray | memoryview


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer, to learn where any buffer's bytes are (read-only ones too)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = [ctypes.py_object]


def buffer_address(buf: Buffer) -> int:
    """Where a contiguous buffer's bytes start. The caller keeps ``buf`` (a memoryview holds
    its object's export) for as long as it uses the address, so they cannot move meanwhile.
    The three common types take one C call each; the general path (``PyObject_GetBuffer``
    through ctypes) costs ~7 us, and a small read's decryption asked it for three or four
    addresses (its data, key and output, the tweak table) besides the AES's few us."""
    kind = type(buf)
    if (kind is memoryview and not buf.readonly) or (kind is bytearray and buf):  # type: ignore[union-attr]
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if kind is bytes:
        return _bytes_address(buf) or 0
    view = _PyBuffer()
    if _get_buffer(buf, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes, or it raises
        raise ValueError("not a contiguous buffer")
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


@functools.cache
def library() -> ctypes.PyDLL:
    """OpenSSL 3's libcrypto, loaded as a PyDLL: its calls keep the GIL. A unit's call takes a
    microsecond or two; a thread sealing small runs beside a busy event loop, which as a CDLL
    drops and retakes the GIL around every call, spent 2.7x its CPU time in wall time in the
    stress mix (1.5x keeping the GIL). OSError when there is no such library."""
    return ctypes.PyDLL("libcrypto.so.3")


@functools.cache
def libcrypto_xts() -> Callable[[bytes | bytearray, Sequence[int], int, Sequence[int], bool], None] | None:
    """AES-256-XTS per data unit through OpenSSL 3's EVP API: one cipher context per call, its
    key schedule built once, and per unit only the tweak set again and the unit encrypted.
    cryptography offers no way to change a context's IV, so its path rebuilds the key schedule
    per unit -- 4 KiB at a time that costs ~4x the AES itself (tools/bench.py).
    The key is read where it is; OpenSSL cleanses its key schedules when the context is freed.

    The tweak is written straight into the context's IV (``EVP_CIPHER_CTX_iv_noconst``: the
    provider's own buffer, which its XTS reads afresh at every update) rather than set by an
    ``EVP_CipherInit_ex2`` per unit: the per-unit calls were ~0.8 ms of a sealing worker's
    ~1.25 ms per MiB (one XTS call over the MiB takes ~0.15), the inits ~40 % of them
    (callgrind: a worker's MiB 6.6M -> 5.3M instructions). That pointer is OpenSSL 3.0's
    provider IV, an implementation detail of a deprecated call: whether this libcrypto has it
    and honours the write is checked once, here (``_live_iv``); if not, an init per unit."""
    try:
        lib = library()
        fetch, new, free = lib.EVP_CIPHER_fetch, lib.EVP_CIPHER_CTX_new, lib.EVP_CIPHER_CTX_free
        init, update = lib.EVP_CipherInit_ex2, lib.EVP_CipherUpdate
    except (OSError, AttributeError):  # no OpenSSL 3 libcrypto
        return None
    iv_of = getattr(lib, "EVP_CIPHER_CTX_iv_noconst", None)  # deprecated in 3.0: may go
    fetch.restype = ctypes.c_void_p
    fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    new.restype = ctypes.c_void_p
    free.argtypes = [ctypes.c_void_p]
    init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    if iv_of is not None:
        iv_of.restype = ctypes.c_void_p
        iv_of.argtypes = [ctypes.c_void_p]
    cipher = fetch(None, b"AES-256-XTS", None)
    if not cipher:
        return None
    tweaks = bytearray()  # tweak i at 16 * i; grown (replaced) when an extent is longer

    def units(key: bytes | bytearray, table: bytearray, first: int, sources: Sequence[int], outs: Sequence[int],
              enc: int, live_iv: bool) -> None:
        """Unit i with the tweak at ``16 * (first + i)`` in ``table``."""
        at = buffer_address(table) + 16 * first
        outl = ctypes.c_int()  # this call's own: threads seal and decrypt concurrently
        outl_at = ctypes.addressof(outl)
        ctx = new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        iv = None
        try:
            if init(ctx, cipher, buffer_address(key), at, enc, None) != 1:
                raise ValueError("AES-256-XTS: OpenSSL refused the key (its halves must differ)")
            if live_iv and (where := iv_of(ctx)):
                iv, tv = memoryview((ctypes.c_char * 16).from_address(where)).cast("B"), memoryview(table)
            for i, (src, out) in enumerate(zip(sources, outs)):
                if i and iv is not None:
                    t = 16 * (first + i)
                    iv[:] = tv[t : t + 16]
                elif i and init(ctx, None, None, at + 16 * i, enc, None) != 1:
                    raise ValueError("AES-256-XTS: setting the tweak failed in libcrypto")
                if update(ctx, out, outl_at, src, DATA_UNIT) != 1:
                    raise ValueError("AES-256-XTS failed in libcrypto")
        finally:
            if iv is not None:
                iv.release()  # no view of the context's memory outlives it
            free(ctx)

    live_iv = iv_of is not None and _live_iv(units)

    def xts(key: bytes | bytearray, sources: Sequence[int], first_unit: int, outs: Sequence[int], encrypt: bool) -> None:
        nonlocal tweaks
        # this call's table, taken once: the shared one may be replaced meanwhile, and by a
        # shorter one when a thread that began growing it for a short extent finishes after
        # one that grew it further -- it is checked, and kept alive, only as this local
        table = tweaks
        if len(table) < 16 * (first_unit + len(sources)):
            table = bytearray().join(i.to_bytes(16, "little") for i in range(max(first_unit + len(sources), 256)))
            if len(table) > len(tweaks):
                tweaks = table
        units(key, table, first_unit, sources, outs, int(encrypt), live_iv)

    return xts


def _live_iv(units: Callable[..., None]) -> bool:
    """Whether writing a context's IV (``live_iv``) gives what an init per unit gives: two
    units of zeros under a fixed key encrypted both ways (and the second unit's ciphertext must
    differ from the first's: the written tweak was used), then decrypted back by the write."""
    key, table, plain = bytes(range(XTS_KEY_SIZE)), bytearray(16) + (1).to_bytes(16, "little"), bytes(2 * DATA_UNIT)

    def run(data: bytes | bytearray, enc: int, live: bool) -> bytearray:
        out = bytearray(2 * DATA_UNIT + 15)
        src, dst = buffer_address(data), buffer_address(out)
        units(key, table, 0, [src, src + DATA_UNIT], [dst, dst + DATA_UNIT], enc, live)
        return out[: 2 * DATA_UNIT]

    sealed = run(plain, 1, False)
    return (run(plain, 1, True) == sealed and sealed[:DATA_UNIT] != sealed[DATA_UNIT:]
            and run(sealed, 0, True) == plain)


def crypt(key: bytes | bytearray, data: Buffer | Sequence[Buffer], first_unit: int, encrypt: bool,
          out: memoryview | Sequence[bytearray]) -> bool:
    """En- or decrypt ``data`` (one buffer of whole units, or a sequence of 4 KiB units wherever
    they live) into ``out`` (one buffer, or a 4 KiB bytearray per unit: a cold read's pages, each
    cached on its own, with no buffer of the whole range to copy them out of and zero), the
    tweak of unit i being ``first_unit + i``; False (nothing done) when libcrypto cannot: no
    OpenSSL 3, a key that is not AES-256-XTS's, a read-only ``out``."""
    one_out = type(out) is memoryview
    fast = libcrypto_xts() if len(key) == XTS_KEY_SIZE and (not one_out or not out.readonly) else None  # type: ignore[union-attr]
    if fast is None or not len(data):
        return False
    if isinstance(data, (list, tuple)):
        if any(len(u) != DATA_UNIT for u in data):
            raise ValueError(f"data units are {DATA_UNIT} bytes each")
        sources: Sequence[int] = [buffer_address(u) for u in data]
    else:
        if len(data) % DATA_UNIT:
            raise ValueError(f"{len(data)} bytes is not a whole number of {DATA_UNIT}-byte data units")
        base = buffer_address(data)
        sources = range(base, base + len(data), DATA_UNIT)
    if one_out:
        if len(out) < len(sources) * DATA_UNIT:
            raise ValueError("the output is shorter than the data")
        base = buffer_address(out)  # type: ignore[arg-type]
        outs: Sequence[int] = range(base, base + len(sources) * DATA_UNIT, DATA_UNIT)
    else:
        if len(out) != len(sources) or any(type(o) is not bytearray or len(o) != DATA_UNIT for o in out):
            raise ValueError(f"one {DATA_UNIT}-byte bytearray per data unit")
        outs = [ctypes.addressof(ctypes.c_char.from_buffer(o)) for o in out]  # type: ignore[arg-type]
    fast(key, sources, first_unit, outs, encrypt)
    return True


def zero_bytes(data: bytes) -> None:
    """Zero a ``bytes`` in place: one another library made, handed over and let go of
    (pyfuse3's WRITE payload), which Python would free with its contents. Only for a ``bytes``
    nothing else holds -- it is immutable to everyone else. One of fewer than two bytes is
    skipped: those are CPython's shared constants (``b""`` and the 256 one-byte values, each
    in memory anyway), not a copy."""
    if len(data) > 1:
        ctypes.memset(_bytes_address(data), 0, len(data))


def zero(buf: bytearray | memoryview) -> None:
    """Overwrite ``buf`` with zeros where it is. A memset: assigning ``bytes(n)`` would first
    allocate -- and fault in -- n fresh bytes of zeros, which for an extent's frames cost more
    than sealing them; small buffers (a key, a name) keep the assignment, cheaper than a C call."""
    if len(buf) < 1 << 14:
        buf[:] = bytes(len(buf))
    else:
        ctypes.memset(buffer_address(buf if type(buf) is memoryview else memoryview(buf)), 0, len(buf))
