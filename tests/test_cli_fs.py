"""CLI file commands, mkfs --rootdir, and an independent decryption of an extent from
``extents --json``: our own HKDF-SHA512 (hmac) and XTS (AES-ECB + GF(2^128)), not blockemu's."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import stat
import struct
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockemu.fs.mkfs import mkfs
from blockemu.ondisk import structs as S
from tests.test_cli import run


def hkdf_sha512(ikm: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(b"\0" * 64, ikm, hashlib.sha512).digest()  # extract, empty salt
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha512).digest()
        out += t
        i += 1
    return out[:length]


def xts_decrypt_unit(key: bytes, unit: int, data: bytes) -> bytes:
    """IEEE 1619 XTS-AES-256 for one 4096-byte data unit (no ciphertext stealing needed)."""
    k1, k2 = key[:32], key[32:]
    tweak = Cipher(algorithms.AES(k2), modes.ECB()).encryptor().update(unit.to_bytes(16, "little"))
    t = int.from_bytes(tweak, "little")
    dec = Cipher(algorithms.AES(k1), modes.ECB()).decryptor()
    out = bytearray()
    for j in range(0, len(data), 16):
        tb = t.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(data[j : j + 16], tb))
        out += bytes(a ^ b for a, b in zip(dec.update(block), tb))
        t <<= 1
        if t >> 128:
            t = (t & ((1 << 128) - 1)) ^ 0x87
    return bytes(out)


def test_independent_decryption_of_an_extent(tmp_path):
    key = os.urandom(64)
    (tmp_path / "k").write_bytes(key)
    root = tmp_path / "root"
    (root / "s").mkdir(parents=True)
    plain = os.urandom(3 * 4096 + 123)
    (root / "s" / "f").write_bytes(plain)
    img = str(tmp_path / "i.img")
    run("mkfs", img, "--size", "64M", "--rootdir", str(root), "--encrypt", "/s", "--key-file", str(tmp_path / "k"))
    ext = json.loads(run("extents", img, "/s/f", "--json", "--key-file", str(tmp_path / "k")).stdout)
    [nokey] = run("ls", img, "/s").stdout.split()  # without the key: the no-key name, same extents
    assert nokey != "f" and json.loads(run("extents", img, f"/s/{nokey}", "--json").stdout) == ext
    assert len(ext) == 1 and ext[0]["encrypted"] and ext[0]["contents_mode"] == 1
    e = ext[0]
    ident = hkdf_sha512(key, b"fscrypt\0\x01", 16).hex()
    assert e["key_identifier"] == ident == run("key-id", "--key-file", str(tmp_path / "k")).stdout.strip()
    xts_key = hkdf_sha512(key, b"fscrypt\0\x09" + bytes.fromhex(e["nonce"]), 64)
    with open(img, "rb") as f:
        f.seek(e["disk_bytenr"])
        cipher = f.read(e["disk_length"])
    got = b"".join(xts_decrypt_unit(xts_key, u, cipher[u * 4096 : (u + 1) * 4096]) for u in range(len(cipher) // 4096))
    assert got[: len(plain)] == plain and got[len(plain) :] == bytes(len(got) - len(plain))
    assert plain[:64] not in open(img, "rb").read()


def test_rootdir_round_trips_every_file(tmp_path):
    root = tmp_path / "root"
    files = {}
    for rel, size in [("a.txt", 5), ("d/e/f.bin", 200_000), ("d/empty", 0), ("d/g", 4096), ("big", 2_500_000)]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
        files[rel] = p.read_bytes()
    (root / "emptydir").mkdir()
    os.symlink("a.txt", root / "link")
    os.symlink("d/e", root / "dirlink")  # os.walk lists it with the directories: copied as a link too
    os.mkfifo(root / "fifo")
    img = str(tmp_path / "r.img")
    p = run("mkfs", img, "--size", "64M", "--rootdir", str(root))
    assert "skipped" in p.stderr and "fifo" in p.stderr and "link" not in p.stderr.replace("symbolic link", "")
    for rel, data in files.items():
        out = run_bytes("cat", img, "/" + rel)
        assert out == data, rel
    assert sorted(run("ls", img, "/").stdout.split()) == ["a.txt", "big", "d", "dirlink", "emptydir", "link"]
    long = {line.split()[7]: line for line in run("ls", img, "/", "-l").stdout.splitlines()}
    assert long["link"].endswith("link -> a.txt") and long["dirlink"].endswith("dirlink -> d/e")
    listing = json.loads(run("ls", img, "/d", "--json").stdout)
    assert {r["name"]: r["size"] for r in listing} == {"e": 10, "empty": 0, "g": 4096}  # btrfs: a directory's size is 2 x its names
    assert run("fsck", img).returncode == 0


def run_bytes(*args: str) -> bytes:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "blockemu", *args], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_put_mkdir_encrypt_and_key_errors(tmp_path):
    img = str(tmp_path / "p.img")
    run("mkfs", img, "--size", "64M")
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    host = tmp_path / "h"
    host.write_bytes(b"payload" * 1000)
    run("mkdir", img, "/e", "--encrypt", "--key-file", str(key))
    run("put", img, str(host), "/e/h", "--key-file", str(key))
    assert run_bytes("cat", img, "/e/h", "--key-file", str(key)) == host.read_bytes()
    p = run("cat", img, "/e/h", check_rc=1)  # without the key the real name is not there (fscrypt)
    assert p.stderr.strip().startswith("blockemu: cat: /e/h: no such file or directory (/e is encrypted with key ")
    [nokey] = run("ls", img, "/e").stdout.split()
    p = run("cat", img, f"/e/{nokey}", check_rc=1)  # its no-key name is, but reading needs the key
    assert p.stderr.strip().startswith(f"blockemu: cat: /e/{nokey}: Required key not available (")
    assert "(encrypted)" in run("ls", img, "-l").stdout
    assert "no such file" in run("cat", img, "/nope", check_rc=1).stderr
    bad = tmp_path / "bad"
    bad.write_bytes(b"short")
    assert "16 to 64 bytes" in run("key-id", "--key-file", str(bad), check_rc=1).stderr
    assert run("mkdir", img, "/x", "--encrypt", check_rc=2).stderr.startswith("blockemu: usage:")
    assert "no such file" in run("put", img, str(tmp_path / "missing"), "/m", check_rc=1).stderr.lower()
    assert b"payload" not in open(img, "rb").read()
    assert run("fsck", img).returncode == 0


def test_key_file_dash_reads_the_key_from_standard_input(tmp_path):
    """As fscryptctl add_key reads it: a key piped from a secret store need not land in a file.
    ``ls`` reads its key twice (the second time to say which key a directory wants): stdin is
    read once, or the second read found the pipe empty ('this file has 0')."""
    img, key, other = str(tmp_path / "s.img"), os.urandom(32), os.urandom(32)
    (tmp_path / "k").write_bytes(key)
    run("mkfs", img, "--size", "64M")

    def piped(data: bytes, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "blockemu", *args], input=data, capture_output=True, timeout=120)
        assert p.returncode == rc, p.stderr
        return p
    ident = run("key-id", "--key-file", str(tmp_path / "k")).stdout.strip()
    assert piped(key, "key-id", "--key-file", "-").stdout.decode().strip() == ident
    piped(key, "mkdir", img, "/e", "--encrypt", "--key-file", "-")
    piped(key, "mkdir", img, "/e/plain-name", "--key-file", "-")
    assert piped(key, "ls", img, "/e", "--key-file", "-").stdout == b"plain-name\n"
    wrong = piped(other, "ls", img, "/e", "--key-file", "-").stderr.decode()
    assert f"does not unlock /e (its encryption policy uses key {ident})" in wrong
    assert "16 to 64 bytes, this file has 5" in piped(b"short", "key-id", "--key-file", "-", rc=1).stderr.decode()


def test_put_reads_a_pipe_or_a_device_to_its_end(tmp_path):
    """``echo hello | blockemu put IMG /dev/stdin /x`` made an empty /x and exited 0: put copied
    the source's size, which a pipe's or a device's is (0). Now it reads them to their end, as
    cp does; ``-`` is standard input; /dev/zero fills the image and leaves PATH as it was."""
    img = str(tmp_path / "p.img")
    run("mkfs", img, "--size", "32M")
    data = os.urandom(3 << 20)
    for hostfile, path in (("-", "/a"), ("/dev/stdin", "/b")):
        p = subprocess.run([sys.executable, "-m", "blockemu", "put", img, hostfile, path], input=data,
                           capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert run_bytes("cat", img, path) == data
    err = run("put", img, "/dev/zero", "/z", check_rc=1).stderr
    assert err.startswith("blockemu: put: /dev/zero (") and "bytes read) does not fit in the image" in err, err
    assert "z" not in run("ls", img).stdout.split() and run("fsck", img).returncode == 0


def test_put_names_the_path_it_was_given(tmp_path):
    """``put f d1/x`` said "'d1': paths are absolute inside the image" -- the parent it looked up,
    not the path given -- and ``put f /`` "the root has no parent" where cp says it is a directory."""
    img, host = str(tmp_path / "p.img"), tmp_path / "h"
    host.write_bytes(b"x")
    run("mkfs", img, "--size", "32M")
    run("mkdir", img, "/d1")
    assert run("put", img, str(host), "d1/x", check_rc=1).stderr == \
        "blockemu: put: 'd1/x': paths are absolute inside the image\n"
    assert run("put", img, str(host), "/", check_rc=1).stderr == "blockemu: put: /: is a directory\n"
    # a trailing slash names a directory: the rename over it said "/d1/: not a directory"
    for path, why in (("/d1/", "is a directory"), ("/new/", "is a directory"), ("/d1/.", "is a directory"),
                      ("/new/.", "no such file or directory")):
        assert run("put", img, str(host), path, check_rc=1).stderr == f"blockemu: put: {path}: {why}\n", path
    assert run("ls", img, "/").stdout.split() == ["d1"] and run("ls", img, "/d1").stdout == ""


def _link_farm(tmp_path, names: int) -> str:
    """A host tree /d holding file f and ``names`` more names of it."""
    host = tmp_path / "h" / "d"
    host.mkdir(parents=True)
    (host / "f").write_bytes(b"hello")
    for i in range(names):
        os.link(host / "f", host / f"link{i}")
    return str(tmp_path / "h")


def test_rootdir_links_400_names_of_one_file_in_one_directory(tmp_path):
    """400 host names of one file in one directory: they fill an INODE_REF, and mkfs --rootdir
    failed halfway with "b'link314': too many links to inode 258 in directory inode 257"; the
    names past it now live in INODE_EXTREFs, one inode with 401 names."""
    img = str(tmp_path / "r.img")
    p = run("mkfs", img, "--size", "64M", "--rootdir", _link_farm(tmp_path, 400))
    assert "copied" not in p.stderr, p.stderr
    rows = json.loads(run("ls", img, "/d", "--json").stdout)
    assert len(rows) == 401 and {(r["ino"], r["nlink"], r["size"]) for r in rows} == {(rows[0]["ino"], 401, 5)}
    assert run("fsck", img).returncode == 0


def test_rootdir_copies_a_hard_link_past_the_link_limit(tmp_path, monkeypatch, capsys):
    """A name past the most one inode may have (65,535; lowered here) is copied, said on stderr,
    and the names after it link to the copy -- not a failure halfway through the tree."""
    monkeypatch.setattr(S, "LINK_MAX", 50)
    img = str(tmp_path / "r.img")
    asyncio.run(mkfs(img, "64M", rootdir=_link_farm(tmp_path, 80)))
    assert re.search(r"blockemu mkfs: \S+/d/link\d+: copied, not linked to /d/f: /d/f has as many names "
                     r"as one inode can$", capsys.readouterr().err, re.M)
    monkeypatch.undo()
    rows = json.loads(run("ls", img, "/d", "--json").stdout)
    links = {r["ino"]: r["nlink"] for r in rows}
    assert len(rows) == 81 and sorted(links.values()) == [31, 50]  # the copy took the names after it
    assert all(r["size"] == 5 for r in rows) and run("fsck", img).returncode == 0


def test_rootdir_keeps_modes_owners_times_and_hard_links(tmp_path):
    """As mkfs.btrfs --rootdir: every entry kept its name and bytes but took default modes (0644,
    0755), owner 0 and the time of the copy, and hard links were copied as separate files."""
    import asyncio
    import stat

    import blockemu

    root = tmp_path / "root"
    (root / "d" / "private").mkdir(parents=True)
    (root / "d" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "a").write_bytes(os.urandom(9000))
    os.link(root / "a", root / "d" / "also-a")  # one inode, two names
    os.symlink("a", root / "ln")
    modes = {"/d/run.sh": 0o750, "/a": 0o640, "/d/private": 0o700, "/d": 0o711, "/": 0o755}
    for path, mode in modes.items():
        os.chmod(root / path.lstrip("/") if path != "/" else root, mode)
    os.utime(root / "a", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    for path in ("d/private", "d", ""):  # last, as the copy's own changes would move them
        os.utime(root / path if path else root, ns=(1_400_000_000_000_000_000, 1_300_000_000_000_000_001))
    img = str(tmp_path / "r.img")
    assert run("mkfs", img, "--size", "32M", "--rootdir", str(root)).stderr == ""

    async def stats() -> dict:
        async with blockemu.mount(img, readonly=True) as fs:
            return {p: await fs.stat(p) for p in [*modes, "/d/also-a", "/ln"]}

    got = asyncio.run(stats())
    for path, mode in modes.items():
        assert stat.S_IMODE(got[path].st_mode) == mode, path
    host = os.lstat(root / "a")
    assert (got["/a"].st_uid, got["/a"].st_gid) == (host.st_uid, host.st_gid)
    assert (got["/a"].st_mtime_ns, got["/d"].st_mtime_ns) == (1_500_000_000_987_654_321, 1_300_000_000_000_000_001)
    assert got["/a"].st_ino == got["/d/also-a"].st_ino and got["/a"].st_nlink == 2
    assert stat.S_ISLNK(got["/ln"].st_mode)
    assert run_bytes("cat", img, "/d/also-a") == (root / "a").read_bytes()
    assert run("fsck", img).returncode == 0


def test_rootdir_hard_link_into_an_encrypted_directory_is_copied_and_said(tmp_path):
    """fscrypt lets no hard link into an encrypted directory from outside it (EXDEV): the second
    name is a copy, and mkfs says so rather than failing or copying silently."""
    root = tmp_path / "root"
    (root / "vault").mkdir(parents=True)
    (root / "a").write_bytes(b"shared")
    os.link(root / "a", root / "vault" / "b")
    (tmp_path / "k").write_bytes(os.urandom(32))
    img = str(tmp_path / "v.img")
    p = run("mkfs", img, "--size", "32M", "--rootdir", str(root), "--encrypt", "/vault", "--key-file", str(tmp_path / "k"))
    assert p.stderr == (f"blockemu mkfs: {root}/vault/b: copied, not linked to /a: a hard link cannot enter an "
                        "encrypted directory from outside it\n")
    assert run_bytes("cat", img, "/vault/b", "--key-file", str(tmp_path / "k")) == b"shared"


def test_rootdir_too_big_names_the_host_file_that_did_not_fit(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "root"
    root.mkdir()
    (root / "small").write_bytes(b"s" * 1000)
    (root / "huge").write_bytes(os.urandom(20 << 20))
    img = tmp_path / "h.img"
    p = subprocess.run([sys.executable, "-m", "blockemu", "mkfs", str(img), "--size", "16M", "--rootdir", str(root)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"blockemu: mkfs: {root}/huge ({20 << 20} bytes) does not fit in the image: "
                               "No space left on device"), p.stderr
    assert not img.exists()


def test_cat_of_a_bad_sector_prints_the_bytes_before_it_then_the_error(tmp_path):
    """cat read 1 MiB at a time: a checksum mismatch in the third sector of a file printed nothing
    at all. As cat(1) gives what read() returned before an EIO: the two good sectors, then the
    one-line error and exit 1."""
    import subprocess
    import sys

    data = os.urandom(64 << 10)
    (tmp_path / "host").write_bytes(data)
    img = str(tmp_path / "c.img")
    run("mkfs", img, "--size", "32M")
    run("put", img, str(tmp_path / "host"), "/f")
    (extent,) = json.loads(run("extents", img, "/f", "--json").stdout)
    at = extent["disk_bytenr"] + 2 * 4096 + 17
    with open(img, "r+b") as raw:
        raw.seek(at)
        byte = raw.read(1)[0]
        raw.seek(at)
        raw.write(bytes([byte ^ 1]))
    p = subprocess.run([sys.executable, "-m", "blockemu", "cat", img, "/f"], capture_output=True, timeout=120)
    assert p.returncode == 1 and p.stdout == data[: 2 * 4096], (len(p.stdout), p.stderr)
    assert p.stderr.startswith(b"blockemu: cat: ") and p.stderr.count(b"\n") == 1, p.stderr


def test_rootdir_keeps_a_sparse_files_holes(tmp_path):
    """A 40 MiB host file holding 3 bytes was copied as 40 MiB of zeros: extents for all of it,
    and a --size 16M image refused it with ENOSPC. Its holes stay holes; the bytes are the same."""
    root = tmp_path / "root"
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(40 << 20)
        f.seek(20 << 20)
        f.write(b"mid")
    (root / "tail").write_bytes(b"x" * 5000)
    os.truncate(root / "tail", 3 << 20)  # a hole at the end
    img = str(tmp_path / "s.img")
    assert run("mkfs", img, "--size", "16M", "--rootdir", str(root)).stderr == ""
    extents = json.loads(run("extents", img, "/sparse", "--json").stdout)
    assert sum(e["length"] for e in extents) <= 1 << 20, extents
    assert run_bytes("cat", img, "/sparse") == (root / "sparse").read_bytes()
    assert run_bytes("cat", img, "/tail") == (root / "tail").read_bytes()
    assert run("fsck", img).returncode == 0


def test_put_reads_a_regular_file_past_its_size_as_cp_does(tmp_path):
    """/proc's files are regular files of size 0: ``put IMG /proc/version /v`` made an empty /v and
    exited 0, where cp copies the text. A regular file is read on past its size, to its end."""
    img = str(tmp_path / "p.img")
    run("mkfs", img, "--size", "32M")
    assert os.stat("/proc/version").st_size == 0
    run("put", img, "/proc/version", "/v")
    want = open("/proc/version", "rb").read()
    assert want and run_bytes("cat", img, "/v") == want


def test_put_gives_the_permissions_cp_gives(tmp_path):
    """Every put made a 0644 file, so a script put into the image did not run on the mount. As cp:
    a new PATH takes the host file's permissions less the umask, an existing PATH keeps its own,
    and standard input (no regular file) gives the default."""
    img, script, private = str(tmp_path / "p.img"), tmp_path / "s.sh", tmp_path / "private"
    script.write_text("#!/bin/sh\necho hi\n")
    private.write_text("secret")
    os.chmod(script, 0o755)
    os.chmod(private, 0o600)
    umask = os.umask(0)
    os.umask(umask)
    run("mkfs", img, "--size", "32M")
    run("put", img, str(script), "/s.sh")
    run("put", img, str(private), "/p")
    run("put", img, str(private), "/s.sh")  # over an existing PATH: its permissions stay

    modes = {e["name"]: e["mode"] for e in json.loads(run("ls", img, "--json").stdout)}
    assert modes == {"s.sh": stat.filemode(stat.S_IFREG | 0o755 & ~umask), "p": stat.filemode(stat.S_IFREG | 0o600 & ~umask)}
    assert run_bytes("cat", img, "/s.sh") == b"secret"


def test_put_over_a_symbolic_link_does_not_take_its_0777(tmp_path):
    """put replaces PATH whole, a symbolic link too, and kept "PATH's own permissions" -- a link's
    are 0777 -- so a private host file put over a link came out world-writable (-rwxrwxrwx).
    Only an existing regular file's permissions stay; over anything else the host file's apply."""
    root, private = tmp_path / "root", tmp_path / "private"
    root.mkdir()
    os.symlink("elsewhere", root / "link")
    private.write_text("secret")
    os.chmod(private, 0o600)
    umask = os.umask(0)
    os.umask(umask)
    img = str(tmp_path / "p.img")
    run("mkfs", img, "--size", "32M", "--rootdir", str(root))
    run("put", img, str(private), "/link")
    modes = {e["name"]: e["mode"] for e in json.loads(run("ls", img, "--json").stdout)}
    assert modes == {"link": stat.filemode(stat.S_IFREG | 0o600 & ~umask)}
    assert run_bytes("cat", img, "/link") == b"secret"


def test_put_keeps_holes_and_names_the_file_that_does_not_fit(tmp_path):
    """put copied a sparse host file as zeros (mkfs --rootdir's own copy, repeated) and its
    ENOSPC named nothing ('blockemu: put: No space left on device: ...'); it shares mkfs's copy."""
    sparse, big = tmp_path / "sparse", tmp_path / "big"
    with open(sparse, "wb") as f:
        f.truncate(40 << 20)
        f.seek(30 << 20)
        f.write(b"end")
    big.write_bytes(os.urandom(20 << 20))
    img = str(tmp_path / "p.img")
    run("mkfs", img, "--size", "16M")
    run("put", img, str(sparse), "/s")
    assert run_bytes("cat", img, "/s") == sparse.read_bytes()
    assert sum(e["length"] for e in json.loads(run("extents", img, "/s", "--json").stdout)) <= 1 << 20
    err = run("put", img, str(big), "/s", check_rc=1).stderr
    assert err.startswith(f"blockemu: put: {big} ({20 << 20} bytes) does not fit in the image: No space left"), err
    assert run_bytes("cat", img, "/s") == sparse.read_bytes()  # all or nothing
    assert run("fsck", img).returncode == 0


def test_rootdir_names_that_are_not_utf8_round_trip(tmp_path):
    """Linux names are bytes: mkfs --rootdir of a tree holding b'bad\\xff' died in a traceback
    (split_path encoded the surrogate-escaped name strictly). Now every byte name is stored as
    it is, in a plain and in an encrypted directory, and ls / cat / put reach it."""
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    root = tmp_path / "root"
    (root / "enc").mkdir(parents=True)
    names = [b"bad\xff\xfename", b"\xe9" * 255]
    for n in names:
        with open(os.path.join(os.fsencode(root), n), "wb") as f:
            f.write(n)
        with open(os.path.join(os.fsencode(root / "enc"), n), "wb") as f:
            f.write(n[::-1])
    img = str(tmp_path / "u.img")
    run("mkfs", img, "--size", "64M", "--rootdir", str(root), "--encrypt", "/enc", "--key-file", str(key))
    assert sorted(run_bytes("ls", img, "/").split(b"\n")) == sorted([b"", b"enc", *names])
    listed = run_bytes("ls", img, "/enc", "--key-file", str(key))
    assert sorted(listed.split(b"\n")) == sorted([b"", *names])
    for n in names:
        assert run_bytes("cat", img, "/" + os.fsdecode(n)) == n
        assert run_bytes("cat", img, "/enc/" + os.fsdecode(n), "--key-file", str(key)) == n[::-1]
    run("put", img, str(key), "/" + os.fsdecode(b"k\xfe"))
    assert run_bytes("cat", img, "/" + os.fsdecode(b"k\xfe")) == key.read_bytes()
    assert run("fsck", img).returncode == 0
    # --json: valid Unicode for every parser, the exact bytes beside it
    rows = {base64.b64decode(r["name_base64"]) if "name_base64" in r else r["name"].encode(): r
            for r in json.loads(run("ls", img, "/", "--json").stdout)}
    assert set(rows) == {b"enc", b"k\xfe", *names}
    assert rows[b"bad\xff\xfename"]["name"] == "bad\ufffd\ufffdname" and "name_base64" not in rows[b"enc"]
    json.loads(run("ls", img, "/", "--json").stdout, strict=True)
    assert "\\ud" not in run("ls", img, "/", "--json").stdout  # no lone surrogate escapes


def test_ls_lists_a_directory_whose_link_target_is_unreadable(tmp_path):
    """ls read every symbolic link's target, -l or not, and a target that did not read (a bad
    sector under a plain link's target, or the checksum tree damaged) failed the whole listing:
    no name at all, where names never need the target -- though fsck --repair's note promises
    that ls still lists names. Now plain ls does not read targets, and ls -l says the one it
    cannot read and lists the rest (exit 1), as ls(1) does."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"data")
    os.symlink("a", root / "link")
    img = str(tmp_path / "l.img")
    run("mkfs", img, "--size", "32M", "--rootdir", str(root))
    (extent,) = json.loads(run("extents", img, "/link", "--json").stdout)
    with open(img, "r+b") as raw:
        raw.seek(extent["disk_bytenr"])
        raw.write(b"Z")
    assert sorted(run("ls", img, "/").stdout.split()) == ["a", "link"]
    p = run("ls", img, "/", "-l", check_rc=1)
    assert [line.split()[-1] for line in p.stdout.splitlines()] == ["a", "link"], p.stdout
    assert p.stderr.startswith("blockemu: ls: /link: cannot read symbolic link: ") and p.stderr.count("\n") == 1
    rows = json.loads(run("ls", img, "/", "--json", check_rc=1).stdout)
    assert {r["name"]: r["target"] for r in rows} == {"a": None, "link": None}


def test_ls_lists_the_names_whose_inodes_sit_in_a_damaged_tree_block(tmp_path):
    """ls stat'ed every entry, -l or not, so one bad fs-tree leaf holding some children's inodes
    (not the directory's entries) failed the whole listing -- fsck --repair's note sends the user
    to ls to find the files still readable. Plain ls now needs names only; ls -l and --json say
    each entry they cannot stat and list the rest, exit 1, as ls(1) does."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    names = [f"f{i:03}" for i in range(200)]
    for name in names:
        (root / "d" / name).write_bytes(b"x")
    img = str(tmp_path / "d.img")
    run("mkfs", img, "--size", "32M", "--rootdir", str(root))
    leaves = [b for b in json.loads(run("inspect", "dump-tree", img, "--tree", "fs", "--json").stdout) if b["level"] == 0]
    d_ino = json.loads(run("ls", img, "/", "--json").stdout)[0]["ino"]
    bad = leaves[-2]  # children's items only (the last leaf holds what a mount's orphan scan reads)
    assert all(d_ino < item["key"][0] < 1 << 32 for item in bad["items"])
    lost = {it["key"][0] for it in bad["items"] if it["type"] == "INODE_ITEM"}
    with open(img, "r+b") as raw:
        raw.seek(bad["bytenr"])
        raw.write(bytes(4096))
    assert run("ls", img, "/d").stdout.split() == names
    p = run("ls", img, "/d", "-l", check_rc=1)
    listed = [line.split()[-1] for line in p.stdout.splitlines()]
    assert 0 < len(listed) == len(names) - len(lost) and p.stderr.count("cannot access") == len(lost), p.stderr
    rows = json.loads(run("ls", img, "/d", "--json", check_rc=1).stdout)
    assert [r["name"] for r in rows] == listed and not {r["ino"] for r in rows} & lost


def test_put_takes_any_legal_name_and_names_a_parent_that_is_no_directory(tmp_path):
    """put's temporary file was PATH's name with '.' before and '.put-XXXXXXXX' after, so a legal
    name of 242 to 255 bytes failed with ENAMETOOLONG naming that temporary file; and a parent
    that is a file was said as '/f/.x.put-1bd19ea6: not a directory'."""
    (tmp_path / "host").write_bytes(b"contents")
    img = str(tmp_path / "n.img")
    run("mkfs", img, "--size", "16M")
    name = "n" * 255
    run("put", img, str(tmp_path / "host"), f"/{name}")
    assert run("ls", img, "/").stdout.split() == [name]
    assert run_bytes("cat", img, f"/{name}") == b"contents"
    err = run("put", img, str(tmp_path / "host"), f"/{name}/x", check_rc=1).stderr
    assert err == f"blockemu: put: /{name}: not a directory\n", err


def test_a_trailing_slash_on_a_file_is_not_a_directory(tmp_path):
    """``cat IMG /a.txt/`` and ``extents IMG /a.txt/`` printed the file; Linux gives ENOTDIR
    for a trailing slash (or '/.') after a non-directory, and takes it after a directory."""
    (tmp_path / "host").write_bytes(b"contents")
    img = str(tmp_path / "s.img")
    run("mkfs", img, "--size", "16M")
    run("mkdir", img, "/d")
    run("put", img, str(tmp_path / "host"), "/d/a.txt")
    for cmd in ("cat", "extents", "ls"):
        for path in ("/d/a.txt/", "/d/a.txt/."):
            err = run(cmd, img, path, check_rc=1).stderr
            assert err == f"blockemu: {cmd}: {path}: not a directory\n", err
    assert run("cat", img, "/d/a.txt").stdout == "contents"
    assert run("ls", img, "/d/").stdout.split() == ["a.txt"]


def test_every_key_a_command_reads_is_wiped_when_it_ends(tmp_path, monkeypatch, capsys):
    """One-shot commands kept the key they read in a bytearray nobody wiped, and the ``key``
    client's remove and status never wiped theirs: every key read through ``read_key`` is now
    zeroed when ``main`` returns, whether the command succeeded or failed (a missing file, no
    server at the mount point, a key of the wrong length), and standard input's is forgotten."""
    import io
    import types

    from blockemu.cli import main as cli

    img, hostfile, key = str(tmp_path / "w.img"), tmp_path / "host", os.urandom(32)
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "short").write_bytes(b"short")
    hostfile.write_bytes(b"payload\n")
    read: list[bytearray] = []
    real = cli.read_secret

    def recorded(f: object, limit: int) -> bytearray:
        read.append(real(f, limit))
        return read[-1]
    monkeypatch.setattr(cli, "read_secret", recorded)
    k = ("--key-file", str(tmp_path / "k"))
    commands = [(0, "mkfs", img, "--size", "64M"), (0, "mkdir", img, "/e", "--encrypt", *k),
                (0, "put", img, str(hostfile), "/e/f", *k), (0, "cat", img, "/e/f", *k), (0, "ls", img, "/e", *k),
                (0, "extents", img, "/e/f", *k), (0, "fsck", img, *k), (0, "key-id", *k),
                (1, "cat", img, "/e/missing", *k), (1, "key", "status", str(tmp_path), *k),
                (1, "key", "remove", str(tmp_path), *k), (1, "key-id", "--key-file", str(tmp_path / "short"))]
    for rc, *args in commands:
        read.clear()
        assert cli.main(list(args)) == rc, (args, capsys.readouterr())
        assert all(not any(buf) for buf in read) and (read or args[0] == "mkfs"), args
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=types.SimpleNamespace(raw=io.BytesIO(key))))
    read.clear()
    capsys.readouterr()
    assert cli.main(["ls", img, "/e", "--key-file", "-"]) == 0  # reads it twice: from the one read of stdin
    assert capsys.readouterr().out == "f\n"
    assert len(read) == 1 and not any(read[0]) and cli.stdin_key.cache_info().currsize == 0


def test_a_key_read_that_fails_part_way_leaves_no_partial_key_behind():
    """A key file whose read fails after the key's first bytes (EIO half way): ``read_secret``
    raised before wiping its buffer, so those bytes stayed in memory. The buffer read into is
    zeroed however the read ends."""
    import errno
    import io

    from blockemu.cli import main as cli

    class FailingReader(io.RawIOBase):
        def __init__(self) -> None:
            self.bufs: list[memoryview] = []

        def readinto(self, b: memoryview) -> int:
            self.bufs.append(b)
            if len(self.bufs) > 1:
                raise OSError(errno.EIO, "Input/output error")
            b[:16] = b"\xa5" * 16
            return 16

    reader = FailingReader()
    with pytest.raises(OSError) as e:
        cli.read_secret(reader, 65)
    assert e.value.errno == errno.EIO and len(reader.bufs) == 2
    assert not any(reader.bufs[0].obj)  # the bytearray both reads went into


def test_ls_long_and_json_show_each_entrys_owner_and_group(tmp_path):
    """``ls -l`` and ``ls --json`` showed no owner or group: two files of distinct owners, and a
    directory of a third, each listed with its own numbers (``ls -l`` as ``ls -n`` shows them)."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    owners = {"alice": (1001, 2001), "bob": (1002, 2002), "d": (1003, 2003)}
    for name, (uid, gid) in owners.items():
        if name != "d":
            (root / name).write_bytes(name.encode())
        os.chown(root / name, uid, gid)
    img = str(tmp_path / "o.img")
    run("mkfs", img, "--size", "32M", "--rootdir", str(root))
    rows = {r["name"]: (r["uid"], r["gid"]) for r in json.loads(run("ls", img, "/", "--json").stdout)}
    assert rows == owners
    lines = {line.split()[-1]: line.split() for line in run("ls", img, "/", "-l").stdout.splitlines()}
    assert {name: (int(f[2]), int(f[3])) for name, f in lines.items()} == owners
    assert lines["alice"][4] == "5"  # the size still follows them


def test_mkfs_encrypt_makes_a_path_rootdir_lacks_with_its_parents(tmp_path):
    """As the README says: ``--encrypt PATH`` that ``--rootdir`` has no entry for is made, empty, with
    its parents (as ``mkdir -p``), and it alone is encrypted; a file at PATH is refused."""
    root, img, key = tmp_path / "root", str(tmp_path / "e.img"), tmp_path / "k"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x")
    key.write_bytes(os.urandom(32))
    run("mkfs", img, "--size", "32M", "--rootdir", str(root), "--encrypt", "/no/deeper", "--key-file", str(key))
    rows = {r["name"]: r["encrypted"] for r in json.loads(run("ls", img, "/no", "--json").stdout)}
    assert rows == {"deeper": True}
    assert not any(r["encrypted"] for r in json.loads(run("ls", img, "/", "--json").stdout))
    assert run("ls", img, "/no/deeper").stdout == ""
    p = run("mkfs", img, "--size", "32M", "--force", "--rootdir", str(root), "--encrypt", "/a/f", "--key-file",
            str(key), check_rc=1)
    assert "/a/f is not a directory" in p.stderr


def test_ls_sorts_by_name_as_ls_does_and_U_keeps_directory_order(tmp_path):
    """``ls`` printed names in the order they were made (readdir's), which reads as a bug to anyone
    used to ls(1): now sorted by the names' bytes as ``LC_ALL=C ls`` (text, ``-l`` and ``--json``
    alike), and ``-U`` keeps directory order, as ``ls -U``."""
    img, host = str(tmp_path / "s.img"), tmp_path / "h"
    host.write_bytes(b"x")
    run("mkfs", img, "--size", "32M")
    made = ["zeta", "alpha", "Mid", "beta"]
    for name in made:
        run("put", img, str(host), f"/{name}")
    in_order = ["Mid", "alpha", "beta", "zeta"]
    assert run("ls", img).stdout.split() == in_order
    assert [line.split()[-1] for line in run("ls", img, "-l").stdout.splitlines()] == in_order
    assert [r["name"] for r in json.loads(run("ls", img, "--json").stdout)] == in_order
    assert run("ls", img, "-U").stdout.split() == made


def test_put_refuses_the_image_itself(tmp_path, capsys):
    """``put IMG IMG /x`` (or a hard link of IMG, or IMG on standard input) copied the image, half
    written by the copy, into itself; now it is one line, exit 1, and the image as it was."""
    from blockemu.cli.main import main
    img, link = tmp_path / "p.img", tmp_path / "link"
    assert main(["mkfs", str(img), "--size", "32M"]) == 0
    os.link(img, link)
    for name in (img, link):
        capsys.readouterr()
        assert main(["put", str(img), str(name), "/x"]) == 1
        assert capsys.readouterr().err == \
            f"blockemu: put: {name}: is the image itself (a copy would read it as it is written)\n"
    with open(img, "rb") as stdin:
        p = subprocess.run([sys.executable, "-m", "blockemu", "put", str(img), "-", "/x"], stdin=stdin,
                           capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (1, "blockemu: put: -: is the image itself (a copy would read it as it is "
                                           "written)\n")
    assert "x" not in run("ls", str(img)).stdout.split() and run("fsck", str(img)).returncode == 0


def test_mkfs_rootdir_says_each_kind_of_xattr_it_drops_once(tmp_path):
    """The image keeps no xattrs (blockemu/fs/hostxattrs.py): the host entries' ACLs, file
    capabilities and other xattrs are each said in one line per run -- counted, not a line per
    entry -- and a tree without any is said nothing about."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for name in ("a", "b", "d/c"):
        (root / name).write_bytes(b"x")
    try:
        for name in ("a", "d/c", "d"):
            os.setxattr(root / name, "user.note", b"1")
    except OSError as e:
        pytest.skip(f"the host's filesystem keeps no user xattrs: {e}")
    anyone = 0xFFFFFFFF  # an ACL entry's id where the tag names none: owner, group, mask, other; and one user's
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
                                          [(1, 6, anyone), (2, 6, 1000), (4, 4, anyone), (0x10, 6, anyone), (0x20, 4, anyone)])
    said = ["extended attributes of 3 host entries"]
    with contextlib.suppress(OSError):  # (no ACLs, or not root for a capability: the kinds it can make)
        os.setxattr(root / "b", "system.posix_acl_access", acl)
        said.append(f"POSIX ACLs of 1 host entry (first {root / 'b'})")
    with contextlib.suppress(OSError):
        os.setxattr(root / "b", "security.capability", bytes.fromhex("0000000200200000000000000000000000000000"))
        said.append("file capabilities of 1 host entry")
    p = run("mkfs", str(tmp_path / "x.img"), "--size", "64M", "--rootdir", str(root))
    lines = [line for line in p.stderr.splitlines() if "not copied" in line]
    assert len(lines) == len(said) and all(any(s in line for line in lines) for s in said), p.stderr
    for name in ("a", "d/c", "d", "b"):
        for attr in os.listxattr(root / name):
            os.removexattr(root / name, attr)
    assert "not copied" not in run("mkfs", str(tmp_path / "y.img"), "--size", "64M", "--rootdir", str(root)).stderr


@pytest.mark.parametrize("force", [False, True], ids=["empty image file", "--force over an image"])
def test_mkfs_rootdir_skips_the_image_it_makes(tmp_path, capsys, force):
    """``mkfs --rootdir DIR DIR/a.img`` copied the image, half built, into itself when the file was
    there before the walk (empty, or overwritten with --force); made there by mkfs it was never
    in the walk. Either way it is skipped now, with a line saying so."""
    from blockemu.cli.main import main
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    img = root / "a.img"
    img.touch()
    if force:
        assert main(["mkfs", str(img), "--size", "32M"]) == 0
    capsys.readouterr()
    assert main(["mkfs", str(img), "--size", "32M", "--rootdir", str(root)] + ["--force"] * force) == 0
    assert capsys.readouterr().err == f"blockemu mkfs: skipped {img}: the image being made\n"
    assert run("ls", str(img)).stdout.split() == ["f"] and run("fsck", str(img)).returncode == 0


def test_rootdir_a_directory_the_walk_cannot_list_fails_mkfs(tmp_path, monkeypatch):
    """A directory mkfs may not read (mode 000 as non-root; the suite runs as root, so its listing
    is refused here) fails mkfs before the image is made, naming it, as a file it cannot read
    does: os.walk skipped it silently, and the image lacked it and all under it, exit 0."""
    tree = tmp_path / "tree"
    (tree / "noperm" / "sub").mkdir(parents=True)
    (tree / "noperm" / "f").write_bytes(b"data")
    (tree / "ok").write_bytes(b"ok")
    real = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("noperm"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    img = tmp_path / "r.img"
    with pytest.raises(PermissionError) as e:
        asyncio.run(mkfs(str(img), "64M", rootdir=str(tree)))
    assert e.value.filename == str(tree / "noperm") and not img.exists()


def test_mkfs_failing_through_a_symbolic_link_removes_the_image_not_the_link(tmp_path, monkeypatch):
    """A failed ``mkfs --rootdir`` removes the half-built image it wrote. Given a symbolic link as
    IMAGE it removed the link and left the half-built image at the link's target."""
    import blockemu.fs.mkfs as m

    async def populate(*args, **kw):
        raise OSError(5, "Input/output error", "tree/f")

    monkeypatch.setattr(m, "populate", populate)
    (tmp_path / "tree").mkdir()
    link, target = tmp_path / "link.img", tmp_path / "target.img"
    link.symlink_to(target.name)
    with pytest.raises(OSError):
        asyncio.run(mkfs(str(link), "64M", rootdir=str(tmp_path / "tree")))
    assert link.is_symlink() and not target.exists()


@pytest.mark.timeout(60, method="signal")  # (the bug blocked in open() for good: this ends it as a failure)
def test_rootdir_a_file_swapped_for_a_fifo_after_the_walk_is_skipped_not_waited_on(tmp_path, monkeypatch, capsys):
    """A regular file the walk planned, replaced by a fifo before it is copied: opened
    O_NOFOLLOW | O_NONBLOCK and checked by fstat, as tar and rsync do, it is skipped with a
    line -- open() blocked mkfs waiting for a writer -- and the rest is copied. Nor is a link
    swapped in followed (a link to a secret would have copied the secret)."""
    from blockemu.fs import mkfs as mkfs_mod

    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    planned = mkfs_mod.plan_population

    def then_swapped(*args):
        out = planned(*args)
        (root / "b").unlink()
        os.mkfifo(root / "b")
        return out
    monkeypatch.setattr(mkfs_mod, "plan_population", then_swapped)
    img = str(tmp_path / "s.img")
    asyncio.run(mkfs(img, "64M", rootdir=str(root)))
    assert f"skipped {root / 'b'}: no longer a regular file" in capsys.readouterr().err
    assert run("ls", img, "/").stdout.split() == ["a"] and run("cat", img, "/a").stdout == "a"
    assert run("fsck", img).returncode == 0
    os.symlink(root / "a", tmp_path / "link")
    assert mkfs_mod.open_regular(str(tmp_path / "link")) is None
