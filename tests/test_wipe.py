"""Nothing of a locked file stays in memory (issue 11): once an encrypted file is closed and
its key removed, no process of the mount -- this one and its sealing workers -- holds the
master key, an extent key derived from it or the file's plaintext, in live or freed memory;
nor does this process after unmount.

The crux is that the test runs in the process it scans. A separate scanner process
(``tests/memscan.py``) makes the secrets and hands them over a pipe straight into
``bytearray``s here, derives the extent keys itself, and keeps every needle to itself; this
test zeroes its own buffers (and the ``bytes`` that reads return) once it has used them, so
any hit is a copy blockemu made and left behind.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import blockemu
from blockemu.crypto.arena import PAGE
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import FileExtent
from tests import heldscan
from tests.memscan import Finder

EXTENT = 1 << 20  # the default max_extent: a large write becomes extents of 1 MiB, each sealed by a worker
LARGE = 5 << 20  # written at once, past the 4 MiB arena: the excess waits on heap pages, copied into a worker's slot
SMALL = 64 << 10  # below the size a worker takes: sealed in a thread of this process
CLEAN = 2 << 20  # the clean pages the cache keeps: reading back the rest decrypts it
DIRTY = 8 << 20  # a dirty limit that leaves the arena its minimum, four extents
UNIT = 64  # the plaintext repeats a 64-byte random unit: any copy of 127 bytes or more holds it whole

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/proc/self/mem"),
                                reason="reads other processes' memory: needs root and /proc")


class Scanner:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("memscan.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def receive(self, buf: bytearray) -> None:
        """Read the next secret from the scanner straight into ``buf`` (no ``bytes`` in between)."""
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = self.proc.stdout.readinto(view[got:])  # type: ignore[union-attr]
            assert n, "the scanner exited"
            got += n
        view.release()

    def scan(self, pids: list[int], nonces: list[str], name_nonces: list[str] = []) -> dict[str, list]:
        """Where the secrets are: ``{"<needle> in pid <pid> <region>": [count, first address]}``;
        ``name_nonces``: directories whose names keys are looked for too."""
        return self.ask(pids, nonces, name_nonces)["hits"]

    def ask(self, pids: list[int], nonces: list[str], name_nonces: list[str] = [], names: bool = False) -> dict[str, Any]:
        """The scanner's whole answer: ``hits`` (``scan``'s), ``runs`` -- each needle's stretches
        of back-to-back copies, ``[address, length]`` -- and ``scanned`` (tests/memscan.py);
        ``names``: look for the file names ``memscan.names`` makes of the unit too."""
        gc.collect()
        req = {"pids": pids, "nonces": nonces, "name_nonces": name_nonces, "names": names}
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")  # type: ignore[union-attr]
        reply = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        assert reply["scanned"] > 0
        return reply

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def zero(buf: bytearray | bytes) -> None:
    """Zero a buffer of this test's in place -- a ``bytes`` too (a read's result), which Python
    would otherwise free with its contents intact."""
    if isinstance(buf, bytes):
        ctypes.memset(id(buf) + bytes.__basicsize__ - 1, 0, len(buf))
    else:
        buf[:] = bytes(len(buf))


def report(hits: dict[str, list]) -> str:
    return "left behind:\n" + "\n".join(f"  {where}: {n} (first at {addr})" for where, (n, addr) in sorted(hits.items()))


# the child that runs ``lock_and_scan``: its last stdout line is the two scans' hits, as JSON
CHILD = ("import asyncio, json, sys\n"
         "from tests.test_wipe import lock_and_scan\n"
         "print(json.dumps(asyncio.run(lock_and_scan(sys.argv[1], sys.argv[2]))))")


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_no_key_or_plaintext_outlives_the_lock(tmp_path, mode):
    """Run in a fresh interpreter: a scan reads every writable byte of the process it scans, and
    an xdist worker grown by the hundreds of tests before this one made each case take 80-110 s
    (4-5 s in a fresh process). The child is still the process that mounts, unlocks, reads and
    is scanned, as the module's docstring says."""
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), mode], cwd=Path(__file__).parent.parent,
                              capture_output=True, text=True, timeout=280)
    except subprocess.TimeoutExpired as e:  # what the child said before it hung, not only that it did
        pytest.fail(f"the child hung; its stderr: {(e.stderr or b'')[-4000:]!r}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    locked, unmounted = json.loads(proc.stdout.splitlines()[-1])
    assert not locked, report(locked)
    assert not unmounted, report(unmounted)


async def lock_and_scan(tmp_path: str, mode: str) -> tuple[dict[str, list], dict[str, list]]:
    """Write an encrypted file large enough for the sealing workers and a small one, read them
    back, remove the key with ``mode`` and unmount: where the secrets are found while locked
    (in this process and the workers) and after unmount (in this process)."""
    scanner = Scanner()
    try:
        key, unit = bytearray(64), bytearray(UNIT)
        scanner.receive(key)
        scanner.receive(unit)
        plain = bytearray(LARGE)
        view = memoryview(plain)
        view[:UNIT] = unit
        zero(unit)
        filled = UNIT
        while filled < LARGE:  # doubling, view to view: no temporary copies
            view[filled : min(2 * filled, LARGE)] = view[: min(filled, LARGE - filled)]
            filled *= 2

        image = os.path.join(tmp_path, "w.img")
        await blockemu.mkfs(image, size="128M")
        fs = await blockemu.mount(image, key_removal=mode, seal_workers=2, interval=3600, cache_limit=CLEAN,
                                 dirty_limit=DIRTY)
        assert len(fs.cache.arena.free) * PAGE < LARGE
        kid = await fs.add_key(key)
        zero(key)
        await fs.mkdir("/s")
        await fs.set_policy("/s", kid)
        sizes = {"/s/large": LARGE, "/s/small": SMALL}
        for path, size in sizes.items():
            async with fs.open(path, "w") as f:
                await f.write(view[:size])
                await f.fsync()
        same = True
        for path, size in sizes.items():
            async with fs.open(path) as f:
                for at in range(0, size, EXTENT):
                    data = await f.pread(EXTENT, at)
                    same = same and data == view[at : at + len(data)]
                    zero(data)
                    del data
        view.release()
        zero(plain)
        assert same
        nonces = []
        for path in sizes:
            ino = fs._resolve(path).ino
            nonces += [FileExtent.unpack(body).context.nonce.hex()  # type: ignore[union-attr]
                       for _, body in fs.tree.items((ino, S.EXTENT_DATA, 0), (ino, S.EXTENT_DATA, (1 << 64) - 1))]
        assert len(nonces) == LARGE // EXTENT + 1
        workers = fs.writeback.sealer.pids
        assert len(workers) == 2

        names = [fs._policy(fs._resolve("/s"))[1].hex()]
        # the directory's names key, derived once per unlock and kept: the needle finds it now
        assert any(k.startswith("names key") for k in scanner.scan([os.getpid()], [], names))

        await fs.remove_key(kid)
        assert str(fs.key_status(kid)) == "Absent"
        locked = scanner.scan([os.getpid(), *workers], nonces, names)
        await fs.unmount()
        unmounted = scanner.scan([os.getpid()], nonces, names)
    finally:
        scanner.close()
    return locked, unmounted


def test_the_scanners_one_pass_finds_what_a_find_per_needle_finds():
    """``memscan.Finder`` (one pass for all needles) against ``bytes.find`` per needle: needles
    of 15 to 128 bytes (hex ones too) planted at every alignment, back to back, overlapping
    themselves, and across the end the caller counts to; each occurrence found once, none
    more. A needle it could miss (under 15 bytes) is refused."""
    rng = random.Random(4)
    needles = {f"n{n}": rng.randbytes(n) for n in (15, 16, 24, 32, 48, 64, 128)}
    needles["hex"] = rng.randbytes(32).hex().encode()
    needles["self-overlapping"] = b"ab" * 12
    data = bytearray(rng.randbytes(1 << 18))
    for k, needle in enumerate(needles.values()):
        for align in range(8):
            at = (k * 8 + align) * 512 + align
            data[at:at + len(needle)] = needle
        at = 100_000 + k * 1000
        data[at:at + 3 * len(needle)] = needle * 3
    n = len(data) - 20  # a needle starting past ``n`` is the next chunk's
    data[n - 10:n + 54] = needles["n64"]
    data[n + 1:n + 65] = needles["n64"]
    want = []
    for what, needle in needles.items():
        at = data.find(needle)
        while 0 <= at < n:
            want.append((what, at))
            at = data.find(needle, at + 1)
    assert list(Finder(needles).find(bytes(data), n)) == sorted(want)
    with pytest.raises(AssertionError):
        Finder({"short": b"x" * 14})


KEPT: list[bytes] = []  # test_heldscan_tells_held_from_freed_and_garbage's module-level holder


def test_heldscan_tells_held_from_freed_and_garbage() -> None:
    """tests/heldscan.py, which test_fuse's name check trusts to tell a copy held from one freed:
    a bytes a module-level list keeps is held, its chain naming the list; one only a reference
    cycle nothing reaches keeps is garbage; one let go is neither. In-process: the walk is the
    server's, without a server."""
    kept, cyclic, freed = os.urandom(300), os.urandom(300), os.urandom(300)
    spans = [(id(b) + bytes.__basicsize__ - 1 + 100, 24) for b in (kept, cyclic, freed)]
    KEPT.append(kept)
    cycle: list[object] = [cyclic]
    cycle.append(cycle)
    del kept, cyclic, freed, cycle
    try:
        found = {h["at"]: h for h in heldscan.held(spans)[0]}
    finally:
        KEPT.clear()
    held, garbage, freed_at = (hex(at) for at, _ in spans)
    assert not found[held]["garbage"] and "list at ['KEPT']" in found[held]["chain"], found[held]
    assert found[garbage]["garbage"], found[garbage]
    assert freed_at not in found, found[freed_at]
