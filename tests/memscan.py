"""A memory scanner, run as its own process by tests/test_wipe.py: it looks for secrets in
other processes' memory through /proc/<pid>/mem (we run as root).

It is a separate process so that the process being scanned -- the test's own -- never has to
hold what is searched for: the scanner makes the master key and the plaintext unit, hands
them over a pipe straight into the test's ``bytearray``s (which the test zeroes once it has
used them), derives the extent keys itself from the nonces the test names, and keeps every
needle to itself.

Protocol (stdin/stdout, binary): on start the scanner writes the 64-byte master key and the
64-byte plaintext unit; then, per JSON line ``{"pids": [...], "nonces": [hex, ...], "name_nonces": [hex, ...],
"names": true}`` read (extent nonces; directories' nonces, whose names keys are looked for too;
whether the names ``names(unit)`` makes are looked for too), it
answers one JSON line ``{"hits": {"<needle> in pid <pid> <region>": [count, first address]},
"runs": {"<needle> in pid <pid> <region>": [[address, length], ...]}, "scanned": bytes}``;
a run is a stretch of back-to-back copies of the needle (the plaintext repeats its unit), so
a caller can tell one buffer from another by where it starts and how long it is.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
from collections.abc import Iterator

import numpy as np

CHUNK = 16 << 20
WORD = 8  # every needle of 15 bytes or more holds a WORD-aligned word of the buffer it is in
BUCKETS = 20  # log2 of the words' hash table
REGION = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ (\S+) (\d+)\s*(.*)$")


def fscrypt_hkdf(master: bytes, context: int, info: bytes, length: int) -> tuple[bytes, bytes]:
    """RFC 5869 HKDF-SHA512 with fscrypt's empty salt and info; returns (PRK, OKM). Written out
    here, independently of blockemu and of the library it uses, so the needles are trustworthy."""
    prk = hmac.new(bytes(64), master, hashlib.sha512).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + b"fscrypt\0" + bytes([context]) + info + bytes([i]), hashlib.sha512).digest()
        okm += block
        i += 1
    return prk, okm[:length]


NAMES = 5
NAME_BYTES = 12


def names(unit: bytes | bytearray) -> list[str]:
    """Five file names, each the hex of 12 bytes of the unit: random, distinct, and no bytes a
    caller has to zero -- the caller builds them from the unit the scanner handed it, which
    is why they are not sent on their own."""
    return [unit[i * NAME_BYTES : (i + 1) * NAME_BYTES].hex() for i in range(NAMES)]


def needles(master: bytes, unit: bytes, nonces: list[str], name_nonces: list[str],
            with_names: bool = False) -> dict[str, bytes]:
    prk, _ = fscrypt_hkdf(master, 1, b"", 16)
    # the key's hex too: ``blockemu key add`` once sent it to the server as hex in a JSON line
    found = {"master key": master, "master key's tail": master[16:], "master key (hex)": master.hex().encode(),
             "HKDF PRK of the master key": prk, "plaintext": unit}
    for nonce in name_nonces:  # a directory's names key (AES-256-CTS, per-file context 2)
        found[f"names key {nonce}"] = fscrypt_hkdf(master, 2, bytes.fromhex(nonce), 32)[1]
    if with_names:  # as the names reach a process: bytes or str (UTF-8 or latin-1 compact ASCII: the same)
        found.update({f"name {i}": name.encode() for i, name in enumerate(names(unit))})
    for nonce in nonces:
        _, key = fscrypt_hkdf(master, 9, bytes.fromhex(nonce), 64)
        # each half: AES-256-XTS is two AES-256 keys, and an AES key schedule starts with its
        # key (a copy of the whole key holds both)
        found[f"extent key {nonce} (data half)"] = key[:32]
        found[f"extent key {nonce} (tweak half)"] = key[32:]
    return found


def regions(pid: int, seen: set[tuple[str, str]]) -> list[tuple[int, int, str]]:
    """Readable regions that can hold data written at run time: every writable one, and every
    one not backed by a regular file (anonymous, heap, stack, memfds such as the page arena).
    A shared mapping (the arena, the sealing slots) is scanned in the first process in
    which it is ``seen``: the others map the same memory."""
    out = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            m = REGION.match(line.rstrip("\n"))
            if m is None:
                continue
            start, end, perms, dev, inode, path = int(m[1], 16), int(m[2], 16), m[3], m[4], m[5], m[6]
            if perms[0] != "r" or path in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            if "w" not in perms and path.startswith("/") and not path.startswith("/memfd:"):
                continue  # code and read-only data of a file: nothing written at run time lands there
            if perms[3] == "s":
                if (dev, inode) in seen:
                    continue
                seen.add((dev, inode))
            out.append((start, end, f"{perms} {path}"))
    return out


class Finder:
    """Every occurrence of every needle in one pass over a buffer, not one ``bytes.find`` pass
    per needle: with ~20 needles that was ~25 MB/s, and a scan of a test process grown to a
    gigabyte under ``pytest -n 2`` took most of a minute. An occurrence of a needle at offset
    ``at`` covers the buffer's aligned word at ``at + k`` for the k in 0..WORD-1 that aligns it,
    which is the needle's bytes [k, k + WORD) -- so the aligned words are looked up (hashed, in
    numpy) among the needles' WORD shifted words, and each candidate is compared whole."""

    def __init__(self, found: dict[str, bytes]) -> None:
        assert min(map(len, found.values())) >= 2 * WORD - 1, "a needle too short to hold an aligned word"
        self.table = np.zeros(1 << BUCKETS, dtype=bool)
        self.by_word: dict[int, list[tuple[str, bytes, int]]] = {}
        for what, needle in found.items():
            for k in range(WORD):
                word = int.from_bytes(needle[k:k + WORD], "little")
                self.by_word.setdefault(word, []).append((what, needle, k))
        self.table[_bucket(np.array(list(self.by_word), dtype="<u8"))] = True

    def find(self, data: bytes, n: int) -> Iterator[tuple[str, int]]:
        """(needle, offset) of each occurrence in ``data`` that starts before ``n``, each once,
        by needle and offset."""
        words = np.frombuffer(data, dtype="<u8", count=len(data) // WORD)
        out = []
        for i in np.flatnonzero(self.table[_bucket(words)]).tolist():
            for what, needle, k in self.by_word.get(int(words[i]), ()):
                at = i * WORD - k
                if 0 <= at < n and data[at:at + len(needle)] == needle:
                    out.append((what, at))
        return iter(sorted(out))


def _bucket(words: np.ndarray) -> np.ndarray:
    """Fibonacci hashing of 64-bit words into the table (the low bits of a hex needle's word
    are a few ASCII digits, as much text in memory is)."""
    return (words * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - BUCKETS)


def scan(pid: int, found: dict[str, bytes], hits: dict[str, list], runs: dict[str, list[list[int]]],
         seen: set[tuple[str, str]]) -> int:
    """Count into ``hits`` where each needle occurs in ``pid``, and into ``runs`` the stretches
    its copies make; returns the bytes scanned."""
    scanned = 0
    longest = max(map(len, found.values()))
    finder = Finder(found)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, name in regions(pid, seen):
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(n + min(longest - 1, end - pos - n))  # overlap: a needle across chunks
                except OSError:
                    break
                scanned += n
                for what, at in finder.find(data, n):
                    where = f"{what} in pid {pid} {name}"
                    hits.setdefault(where, [0, hex(pos + at)])[0] += 1
                    stretches = runs.setdefault(where, [])
                    if stretches and stretches[-1][0] + stretches[-1][1] == pos + at:
                        stretches[-1][1] += len(found[what])
                    else:
                        stretches.append([pos + at, len(found[what])])
                pos += n
    return scanned


def main() -> None:
    master, unit = os.urandom(64), os.urandom(64)
    out = sys.stdout.buffer
    out.write(master + unit)
    out.flush()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        found = needles(master, unit, req["nonces"], req.get("name_nonces", []), req.get("names", False))
        hits: dict[str, list] = {}
        runs: dict[str, list[list[int]]] = {}
        seen: set[tuple[str, str]] = set()
        scanned = sum(scan(pid, found, hits, runs, seen) for pid in req["pids"])
        out.write(json.dumps({"hits": hits, "runs": runs, "scanned": scanned}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
