"""``blockemu mount``: real programs (cp, diff, dd, shells, python processes, fio) on a FUSE
mount of an image, served by the asyncio Filesystem in another process; every oracle reads
after an unmount (or a kill -9) and a fresh mount, or with fsck.

Needs pyfuse3 (``pip install -e '.[fuse]'``, which needs the OS packages fuse3 libfuse3-dev
pkg-config) and /dev/fuse; without them each test is skipped with the reason (pytest -ra
prints it). Every test unmounts in a ``finally`` (fusermount3 -u -z), so a failing one never
leaves a dead mount behind.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Iterator

import pytest

from blockemu import mkfs, mount
from blockemu.check.fsck import check
from blockemu.cli.main import main
from blockemu.device.faultplan import FaultPlan
from blockemu.fuse import control
from blockemu.fuse.serve import abort_connection, connection, mounted_fstype
from tests import heldscan
from tests.memscan import names
from tests.test_wipe import Scanner, report, zero
from tests.util import cancel_while_it_waits, fail_next_data_write, set_super

PY = sys.executable


def fuse_unavailable() -> str | None:
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not installed ({e}): pip install -e '.[fuse]' after apt-get install fuse3 libfuse3-dev pkg-config"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: no FUSE in this kernel or container"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing: apt-get install fuse3"
    if os.geteuid() != 0:
        return "the FUSE tests mount as root (CI's user); run them as root"
    return None


@pytest.fixture
def env(runtime_dir: Path) -> dict[str, str]:
    why = fuse_unavailable()
    if why:
        pytest.skip(why)
    return {**os.environ, "BLOCKEMU_RUNTIME_DIR": str(runtime_dir)}


def blockemu(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([PY, "-m", "blockemu", *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def sh(script: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def detach(mnt: Path) -> None:
    if mounted_fstype(str(mnt)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


class Served:
    """``blockemu mount --foreground`` in a child process, ready once it prints its line."""

    def __init__(self, env: dict[str, str], image: Path, mnt: Path, *args: str,
                 run: tuple[str, ...] = ("-m", "blockemu")) -> None:
        """``run``: how python starts the command (``-c`` and a script that patches the server first)."""
        self.mnt, self.env = mnt, env
        self.proc = subprocess.Popen([PY, *run, "mount", str(image), str(mnt), "--foreground", *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("blockemu: mounted"):
            self.proc.wait(timeout=30)
            raise AssertionError(f"mount failed: {line}{self.proc.stderr.read()}")  # type: ignore[union-attr]

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, typ: object, *exc: object) -> None:
        try:
            done = subprocess.run([PY, "-m", "blockemu", "umount", str(self.mnt)], env=self.env, capture_output=True,
                                  text=True, timeout=120)
            if typ is None:
                assert done.returncode == 0, done.stderr
                assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()  # type: ignore[union-attr]
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        detach(self.mnt)


@pytest.fixture
def image(tmp_path: Path, env: dict[str, str]) -> Path:
    img = tmp_path / "a.img"
    asyncio.run(mkfs(str(img), "128M"))  # set-up and oracles in-process: each CLI start costs a second
    return img


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    try:
        yield m
    finally:
        detach(m)


def fsck_clean(env: dict[str, str], image: Path) -> None:
    report = check(str(image), check_data=True)
    assert report.clean, report.text()


def encrypted_image(image: Path, tmp_path: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    """A fresh key, and /enc encrypted with it on the unmounted image holding ``dirs`` and
    ``files`` (set-up in-process: a mount cannot set a policy); returns the key's file."""
    key = tmp_path / "k.key"
    key.write_bytes(os.urandom(32))

    async def setup() -> None:
        async with mount(str(image)) as fs:
            kid = await fs.add_key(key.read_bytes())
            await fs.mkdir("/enc")
            await fs.set_policy("/enc", kid)
            for d in dirs:
                await fs.mkdir(d)
            for path, data in files.items():
                async with fs.open(path, "w") as f:
                    await f.write(data)
    asyncio.run(setup())
    return key


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "small").write_bytes(b"hello\n")
    (root / "sub" / "big").write_bytes(os.urandom(3 << 20))
    (root / "sub" / "deeper" / "odd").write_bytes(os.urandom(12345))
    (root / "sub" / "zero").write_bytes(b"")
    os.chmod(root / "small", 0o600)
    os.link(root / "small", root / "sub" / "hard")  # cp -a keeps hard links as links
    os.link(root / "small", root / "hard2")
    os.symlink("../small", root / "sub" / "soft")
    os.symlink("sub/deeper", root / "dirlink")
    os.utime(root / "sub" / "big", ns=(1_000_000_000_123, 2_000_000_000_456))


def test_mount_in_background_cp_diff_umount_fsck_remount(env, image, mnt, tmp_path) -> None:
    """The default mount backgrounds and returns once mounted; cp -a and diff -r agree; umount
    flushes, commits and releases the image (fsck opens it at once); a remount serves the same tree."""
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    blockemu(env, "mount", str(image), str(mnt))
    try:
        assert mounted_fstype(str(mnt)) == "fuse.blockemu"
        run = Path(env["BLOCKEMU_RUNTIME_DIR"])  # the control socket and the server's log: private
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        assert sorted((p.suffix, stat.S_IMODE(p.stat().st_mode)) for p in run.iterdir()) == [(".log", 0o600),
                                                                                           (".sock", 0o600)]
        r = sh(f"cp -a {src}/. {mnt}/ && diff -r --no-dereference {src} {mnt} && "
               f"stat -c '%a %Y %h' {mnt}/small {mnt}/sub/big && readlink {mnt}/sub/soft {mnt}/dirlink")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:4] == ["600 " + str(int((src / "small").stat().st_mtime)) + " 3", "644 2000 1",
                                            "../small", "sub/deeper"]
        assert (mnt / "sub" / "hard").stat().st_ino == (mnt / "small").stat().st_ino
        assert (mnt / "dirlink" / "odd").read_bytes() == (src / "sub" / "deeper" / "odd").read_bytes()
        df = os.statvfs(mnt)
        assert df.f_blocks * df.f_frsize == 128 << 20 and 0 < df.f_bfree < df.f_blocks
        assert df.f_bfree * df.f_frsize < (128 << 20) - (3 << 20)  # the copied data is counted as used
    finally:
        blockemu(env, "umount", str(mnt))
    assert mounted_fstype(str(mnt)) is None
    fsck_clean(env, image)
    blockemu(env, "mount", str(image), str(mnt))
    try:
        r = sh(f"diff -r --no-dereference {src} {mnt} && tar -C {mnt} -cf {tmp_path}/t.tar . && "
               f"mkdir {tmp_path}/untar && tar -C {tmp_path}/untar -xf {tmp_path}/t.tar && "
               f"diff -r --no-dereference {src} {tmp_path}/untar && stat -c %h {tmp_path}/untar/small")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "3"  # tar saw the hard links as links
    finally:
        blockemu(env, "umount", str(mnt))


POSIX = textwrap.dedent("""
    import ctypes, errno, os, subprocess, sys
    m = sys.argv[1]
    def fails(code, fn, *a):
        try:
            fn(*a)
        except OSError as e:
            assert e.errno == code, (fn, e)
        else:
            raise AssertionError(f"{fn.__name__}{a} did not fail with {errno.errorcode[code]}")

    # rename over an existing file, as editors and package managers replace files
    with open(f"{m}/conf", "w") as f:
        f.write("old")
    fd = os.open(f"{m}/conf.tmp", os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, b"new contents"); os.fsync(fd); os.close(fd)
    os.rename(f"{m}/conf.tmp", f"{m}/conf")
    assert open(f"{m}/conf").read() == "new contents" and not os.path.exists(f"{m}/conf.tmp")
    assert oct(os.stat(f"{m}/conf").st_mode & 0o777) == oct(0o640)

    # unlink while open: the descriptor keeps working, the name is gone
    fd = os.open(f"{m}/tmpfile", os.O_CREAT | os.O_RDWR, 0o600)
    os.unlink(f"{m}/tmpfile")
    os.write(fd, b"x" * 10000)
    assert os.pread(fd, 5, 9995) == b"xxxxx" and os.fstat(fd).st_nlink == 0
    assert not os.path.exists(f"{m}/tmpfile")
    os.close(fd)

    # truncate down and up, through the path and through a descriptor
    with open(f"{m}/t", "wb") as f:
        f.write(b"A" * 9000)
    os.truncate(f"{m}/t", 5000)
    fd = os.open(f"{m}/t", os.O_RDWR)
    os.ftruncate(fd, 7000)
    os.close(fd)
    assert open(f"{m}/t", "rb").read() == b"A" * 5000 + bytes(2000)
    with open(f"{m}/t", "w") as f:  # O_TRUNC
        f.write("z")
    assert open(f"{m}/t").read() == "z"

    # append from two descriptors, then fsync
    for _ in range(2):
        with open(f"{m}/log", "a") as f:
            f.write("line\\n"); f.flush(); os.fsync(f.fileno())
    assert open(f"{m}/log").read() == "line\\nline\\n"

    # reads leave atime alone, and the mount says so (noatime, not the kernel's default relatime)
    os.utime(f"{m}/log", ns=(1_000_000_000, os.stat(f"{m}/log").st_mtime_ns))
    assert open(f"{m}/log").read() and os.stat(f"{m}/log").st_atime_ns == 1_000_000_000
    assert "noatime" in next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == m).split(",")

    # chmod, utime, directories
    os.chmod(f"{m}/t", 0o751); os.utime(f"{m}/t", ns=(5, 6_000_000_007))
    s = os.stat(f"{m}/t")
    assert s.st_mode & 0o7777 == 0o751 and s.st_mtime_ns == 6_000_000_007
    os.makedirs(f"{m}/a/b/c")
    os.rename(f"{m}/a/b", f"{m}/b2")
    assert os.listdir(f"{m}/b2") == ["c"]
    assert subprocess.run(["ls", "-a", f"{m}/b2"], capture_output=True, text=True).stdout.split() == [".", "..", "c"]
    fails(errno.ENOTEMPTY, os.rmdir, f"{m}/b2")
    os.rmdir(f"{m}/b2/c"); os.rmdir(f"{m}/b2")
    fails(errno.EEXIST, os.mkdir, f"{m}/a")
    fails(errno.ENOENT, os.stat, f"{m}/nothing")
    fails(errno.EISDIR, os.unlink, f"{m}/a")

    # what stays unsupported says so cleanly
    fails(errno.EOPNOTSUPP, os.setxattr, f"{m}/t", "user.x", b"1")
    fails(errno.EOPNOTSUPP, os.getxattr, f"{m}/t", "user.x")
    fails(errno.EOPNOTSUPP, os.listxattr, f"{m}/t")
    fails(errno.EPERM, os.mkfifo, f"{m}/fifo")
    os.link(f"{m}/t", f"{m}/hard")
    assert os.stat(f"{m}/hard").st_nlink == 2
    os.unlink(f"{m}/hard")
    fails(errno.EPERM, os.link, f"{m}/a", f"{m}/hardlinked-dir")
    os.symlink("t", f"{m}/soft")
    assert os.readlink(f"{m}/soft") == "t" and open(f"{m}/soft").read() == "z"
    os.rename(f"{m}/soft", f"{m}/soft2")
    os.unlink(f"{m}/soft2")
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2
    def renameat2(a, b, flags):
        if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), flags):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    fails(errno.EINVAL, renameat2, f"{m}/t", f"{m}/log", RENAME_EXCHANGE)
    fails(errno.EEXIST, renameat2, f"{m}/t", f"{m}/log", RENAME_NOREPLACE)
    renameat2(f"{m}/t", f"{m}/t2", RENAME_NOREPLACE)
    print("ok")
""")


def test_posix_surface_through_real_processes(env, image, mnt) -> None:
    """rename-over, unlink-while-open, truncate, O_TRUNC, append+fsync, chmod/utime, directory
    moves, hard and symbolic links, and clean errors for xattrs, fifos, hard-linked directories
    and rename flags; dd on top; then a fresh mount sees what the processes left and fsck is clean."""
    served = Served(env, image, mnt)
    try:
        r = subprocess.run([PY, "-c", POSIX, str(mnt)], capture_output=True, text=True, timeout=120)
        assert r.stdout.strip() == "ok", r.stdout + r.stderr
        r = sh(f"dd if=/dev/urandom of={mnt}/dd bs=64k count=40 conv=fsync status=none && "
               f"dd if={mnt}/dd of={mnt}/dd2 bs=4k status=none && cmp {mnt}/dd {mnt}/dd2 && sha256sum {mnt}/dd")
        assert r.returncode == 0, r.stderr
        digest = r.stdout.split()[0]
    finally:
        served.__exit__(None)
    fsck_clean(env, image)

    async def oracle() -> None:
        async with mount(str(image), readonly=True) as fs:
            assert sorted(await fs.readdir("/")) == ["a", "conf", "dd", "dd2", "log", "t2"]
            for path, want in (("/conf", b"new contents"), ("/t2", b"z"), ("/log", b"line\nline\n")):
                async with fs.open(path) as f:
                    assert await f.read() == want
            async with fs.open("/dd") as f:
                assert hashlib.sha256(await f.read()).hexdigest() == digest
    asyncio.run(oracle())


def test_soft_key_removal_with_a_shell_holding_the_file_open(env, image, mnt, tmp_path, capsys, monkeypatch) -> None:
    """xfs_io's sequence with real processes: a shell's open descriptor keeps appending after
    ``blockemu key remove``; a new ``cat`` gets ENOKEY; the appends survive a remount with the key."""
    key = encrypted_image(image, tmp_path, {"/enc/other": b"secret\n"})
    b = f"{PY} -m blockemu"
    with Served(env, image, mnt):
        monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
        assert main(["key", "status", str(mnt), "--key-file", str(key)]) == 0  # in-process: quicker
        assert capsys.readouterr().out == "Absent\n"
        r = sh(f"cat {mnt}/enc/other", env)  # without the key the real name is hidden (fscrypt)
        assert r.returncode == 1 and "No such file or directory" in r.stderr, r.stderr
        [nokey] = sh(f"ls {mnt}/enc", env).stdout.split()
        r = sh(f"cat {mnt}/enc/{nokey}", env)  # its no-key name: reading needs the key
        assert r.returncode == 1 and "Required key not available" in r.stderr, r.stderr
        assert main(["key", "add", str(mnt), "--key-file", str(key)]) == 0
        added = capsys.readouterr().out
        assert added.startswith("Added encryption key with identifier ")
        script = f"""
            set -e
            exec 3>>{mnt}/enc/log
            echo before >&3
            {b} key remove {mnt} --key-file {key}
            {b} key status {mnt} --key-file {key}
            echo after-1 >&3
            echo after-2 >&3
            cat {mnt}/enc/other 2>&1 && exit 9 || true
            exec 3>&-
        """
        r = sh(script, env)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].endswith(", but files still busy") and lines[0].startswith("Removed encryption key")
        assert lines[1] == "Incompletely removed"
        assert lines[2] == f"cat: {mnt}/enc/other: Required key not available"
    fsck_clean(env, image)
    with Served(env, image, mnt, "--key-file", str(key)):
        assert (mnt / "enc" / "log").read_text() == "before\nafter-1\nafter-2\n"
        assert (mnt / "enc" / "other").read_text() == "secret\n"


def test_a_key_change_takes_the_names_it_made_stale_out_of_the_kernel_at_once(env, image, mnt, tmp_path, capsys,
                                                                               monkeypatch) -> None:
    """fscrypt evicts what a key removal locks, so a plaintext name is looked up again and not
    found: ENOENT, and ls shows no-key names. The kernel kept the server's entries for a second:
    right after ``blockemu key remove`` a plaintext name still resolved, and cat said ENOKEY.
    Adding the key back makes the no-key names stale in the same way (fscrypt_d_revalidate)."""
    key = encrypted_image(image, tmp_path, {"/enc/f": b"secret\n", "/enc/sub/g": b"secret\n"}, dirs=("/enc/sub",))
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
    enc = mnt / "enc"
    plain = [enc / "f", enc / "sub", enc / "sub" / "g"]
    with Served(env, image, mnt, "--key-file", str(key)):
        assert sorted(os.listdir(enc)) == ["f", "sub"]
        # read and closed just before: the removal hears their releases first (fuse/releases.py)
        assert (enc / "f").read_text() == (enc / "sub" / "g").read_text() == "secret\n"
        assert main(["key", "remove", str(mnt), "--key-file", str(key)]) == 0  # in-process: well within the second
        out = capsys.readouterr().out
        assert out.startswith("Removed encryption key with identifier ") and "busy" not in out, out
        for p in plain:
            with pytest.raises(FileNotFoundError):
                os.stat(p)
        r = sh(f"cat {enc}/f", env)
        assert r.returncode == 1 and r.stderr == f"cat: {enc}/f: No such file or directory\n", r.stderr
        nokey = sorted(os.listdir(enc))
        assert len(nokey) == 2 and not {"f", "sub"} & set(nokey)
        [nokey_file] = [n for n in nokey if (enc / n).is_file()]
        with pytest.raises(OSError) as e:
            (enc / nokey_file).read_bytes()
        assert e.value.errno == errno.ENOKEY
        assert main(["key", "add", str(mnt), "--key-file", str(key)]) == 0
        capsys.readouterr()
        for n in nokey:
            with pytest.raises(FileNotFoundError):
                os.stat(enc / n)
        assert (enc / "sub" / "g").read_text() == "secret\n" and sorted(os.listdir(enc)) == ["f", "sub"]


def test_a_key_no_encrypted_directory_uses_is_added_and_said_to_unlock_nothing(env, image, mnt, tmp_path, capsys,
                                                                             monkeypatch) -> None:
    """fscrypt adds a key no policy uses (its identifier comes from the key alone), and so do
    ``mount --key-file`` and ``key add``, exit 0 -- but a wrong key mounted with every encrypted
    directory still locked and said nothing. Now one line on stderr names the key and says so
    (``key add --json``: ``"in_use": false``); the right key says nothing."""
    from blockemu.crypto.fscrypt import key_identifier

    key = encrypted_image(image, tmp_path, {"/enc/f": b"secret\n"})
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wid = key_identifier(wrong.read_bytes()).hex()
    unused = "key {} unlocks nothing: no encrypted directory on {} uses it (added all the same)\n"
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
    s = Served(env, image, mnt, "--key-file", str(wrong))
    with s:
        assert sh(f"cat {mnt}/enc/f", env).returncode == 1  # still locked
        assert main(["key", "add", str(mnt), "--key-file", str(wrong), "--json"]) == 0
        out, err = capsys.readouterr()
        assert err == "blockemu: key: " + unused.format(wid, "the mounted image")
        reply = json.loads(out)
        assert (reply["identifier"], reply["in_use"]) == (wid, False)
        assert main(["key", "add", str(mnt), "--key-file", str(key)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("Added encryption key with identifier ") and err == ""
    assert s.proc.stderr.read() == "blockemu: mount: " + unused.format(wid, image)  # type: ignore[union-attr]
    s = Served(env, image, mnt, "--key-file", str(key))
    with s:
        assert (mnt / "enc" / "f").read_bytes() == b"secret\n"
    assert s.proc.stderr.read() == ""  # type: ignore[union-attr]


def removal_text(capsys: pytest.CaptureFixture[str], mnt: Path, key: Path) -> str:
    """``blockemu key remove`` in this process (no interpreter start between a close and it), its line."""
    assert main(["key", "remove", str(mnt), "--key-file", str(key)]) == 0
    return capsys.readouterr().out


def test_a_file_read_and_closed_just_before_a_key_removal_is_not_busy(env, image, mnt, tmp_path, capsys,
                                                                      monkeypatch) -> None:
    """close(2) returns before the kernel sends the server FUSE_RELEASE (later still while a
    readahead of the file is unanswered), so a removal arriving on the control socket at once
    found the file still open: "files still busy" in 2 runs of 50 (a 1 MiB file read by this
    process, or a small one by cat). The server now hears every release queued before the
    removal first (fuse/releases.py). A file really open is still busy."""
    big = os.urandom(1 << 20)
    key = encrypted_image(image, tmp_path, {"/enc/small": b"secret\n", "/enc/big": big})
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
    kid = subprocess.run([PY, "-m", "blockemu", "key-id", "--key-file", str(key)], capture_output=True, text=True,
                         check=True).stdout.strip()
    removed = f"Removed encryption key with identifier {kid}\n"
    with Served(env, image, mnt, "--key-file", str(key)):
        for i in range(50):
            if i % 2:
                assert (mnt / "enc" / "big").read_bytes() == big
            else:
                assert sh(f"cat {mnt}/enc/small", env).stdout == "secret\n"
            assert removal_text(capsys, mnt, key) == removed, f"run {i}"
            assert main(["key", "add", str(mnt), "--key-file", str(key)]) == 0
            capsys.readouterr()
        with open(mnt / "enc" / "small", "rb") as f:
            assert f.read() == b"secret\n"
            assert removal_text(capsys, mnt, key) == removed[:-1] + ", but files still busy\n"


# The server with a readahead that waits: a READ past the first 256 KiB (the reader asks for
# less, so the kernel's async readahead alone asks for it) is answered only once the server has
# sent a request through its own mount (a barrier: an OPENDIR from one of its threads) or has
# answered a key removal. Meanwhile the kernel holds the file's release back. It prints a line
# when it holds one.
HELD_READAHEAD_SERVER = textwrap.dedent("""
    import asyncio, os, sys
    from blockemu.cli.main import main
    from blockemu.fuse import serve
    from blockemu.fuse.ops import Operations

    read, opendir, handle, let_go = Operations.read, Operations.opendir, serve.Server.handle, []
    def gate():
        if not let_go:
            let_go.append(asyncio.Event())
        return let_go[0]
    async def held(self, fh, off, size):
        if off >= 256 << 10:
            print("readahead held", flush=True)
            await gate().wait()
        return await read(self, fh, off, size)
    async def opened(self, inode, ctx):
        if os.path.exists(f"/proc/self/task/{ctx.pid}"):
            gate().set()
        return await opendir(self, inode, ctx)
    async def handled(self, req):
        try:
            return await handle(self, req)
        finally:
            gate().set()
    Operations.read, Operations.opendir, serve.Server.handle = held, opened, handled
    sys.exit(main(sys.argv[1:]))
""")


def test_a_release_a_readahead_holds_back_is_heard_before_the_removal_judges(env, image, mnt, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    """The deterministic case of the race above: the reader has its 132 KiB and closes while the
    kernel's readahead of the next window is still unanswered; the kernel queues the file's
    release only when that READ is answered. Here it is held until the server sends a request
    through its own mount: without the barrier the removal judged with the release not even
    sent, "files still busy" every time."""
    key = encrypted_image(image, tmp_path, {"/enc/big": os.urandom(4 << 20)})
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
    s = Served(env, image, mnt, "--key-file", str(key), run=("-c", HELD_READAHEAD_SERVER))
    with s:
        fd = os.open(mnt / "enc" / "big", os.O_RDONLY)
        try:
            assert len(os.read(fd, 132 << 10)) == 132 << 10
        finally:
            os.close(fd)
        out = removal_text(capsys, mnt, key)
        assert out.startswith("Removed encryption key with identifier ") and "busy" not in out, out
    assert "readahead held" in s.proc.stdout.read(), "no readahead was unanswered at the close: nothing was tested"


# The server with every FUSE_RELEASE held until the server next sends a request through its own
# mount (a barrier: an OPENDIR from one of its threads) or is asked to unmount, as the kernel
# holds one back behind an unanswered readahead or has it queued and not yet read. It prints a
# line when it holds one.
HELD_RELEASE_SERVER = textwrap.dedent("""
    import asyncio, os, sys
    from blockemu.cli.main import main
    from blockemu.fuse import serve
    from blockemu.fuse.ops import Operations

    release, opendir, handle, held = Operations.release, Operations.opendir, serve.Server.handle, []
    def let_go():
        while held:
            held.pop().set()
    async def holding(self, fh):
        print("release held", flush=True)
        held.append(asyncio.Event())
        await held[-1].wait()
        return await release(self, fh)
    async def opened(self, inode, ctx):
        if os.path.exists(f"/proc/self/task/{ctx.pid}"):
            let_go()
        return await opendir(self, inode, ctx)
    async def handled(self, req):
        if req["op"] == "umount":
            let_go()
        return await handle(self, req)
    Operations.release, Operations.opendir, serve.Server.handle = holding, opened, handled
    sys.exit(main(sys.argv[1:]))
""")


def test_key_status_right_after_a_close_hears_its_release_first(env, image, mnt, tmp_path, capsys,
                                                                 monkeypatch) -> None:
    """A key removed while a file is open stays "Incompletely removed" until that file's
    release; ``key status`` right after the close judged before the release was heard (the
    barrier ran for ``key remove`` only), and said so though nothing had the file open. Status
    now hears every release of a file closed before it, as removal does."""
    key = encrypted_image(image, tmp_path, {"/enc/f": b"secret\n"})
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
    s = Served(env, image, mnt, "--key-file", str(key), run=("-c", HELD_RELEASE_SERVER))
    with s:
        fd = os.open(mnt / "enc" / "f", os.O_RDONLY)
        try:
            assert os.read(fd, 100) == b"secret\n"
            assert removal_text(capsys, mnt, key).endswith(", but files still busy\n")
        finally:
            os.close(fd)
        assert main(["key", "status", str(mnt), "--key-file", str(key)]) == 0
        assert capsys.readouterr().out == "Absent\n"
    assert "release held" in s.proc.stdout.read(), "no release was held at the status: nothing was tested"


# The server with a key removal's barrier held inside its open of the mount's root (its OPENDIR
# unanswered: the mount is in use by the server's own thread) until an unmount has been tried --
# its command ran and the request ended -- or waits for the barrier (``Releases.quiet``, if the
# server has it). It prints a line when it holds one.
HELD_BARRIER_SERVER = textwrap.dedent("""
    import asyncio, os, sys
    from blockemu.cli.main import main
    from blockemu.fuse import serve
    from blockemu.fuse.ops import Operations
    from blockemu.fuse.releases import Releases

    opendir, handle, quiet, tried = Operations.opendir, serve.Server.handle, getattr(Releases, "quiet", None), []
    def unmount_tried():
        if not tried:
            tried.append(asyncio.Event())
        return tried[0]
    async def opened(self, inode, ctx):
        if os.path.exists(f"/proc/self/task/{ctx.pid}"):
            print("barrier held", flush=True)
            await unmount_tried().wait()
        return await opendir(self, inode, ctx)
    async def handled(self, req):
        try:
            return await handle(self, req)
        finally:
            if req["op"] == "umount":
                unmount_tried().set()
    def waiting(self):
        unmount_tried().set()
        return quiet(self)
    Operations.opendir, serve.Server.handle = opened, handled
    if quiet is not None:
        Releases.quiet = waiting
    sys.exit(main(sys.argv[1:]))
""")


def test_umount_waits_for_a_key_removals_barrier_rather_than_say_busy(env, image, mnt, tmp_path) -> None:
    """A key removal's barrier opens the mount's root from a server thread (fuse/releases.py);
    ``blockemu umount`` arriving meanwhile ran the kernel's unmount while the server itself used
    the mount, and said "target is busy" though no process of the user's did. The unmount now
    waits for the barrier: exit 0; the removal, answered after the unmount, says the mount is gone."""
    key = encrypted_image(image, tmp_path, {"/enc/f": b"secret\n"})
    s = Served(env, image, mnt, "--key-file", str(key), run=("-c", HELD_BARRIER_SERVER))
    try:
        removal = subprocess.Popen([PY, "-m", "blockemu", "key", "remove", str(mnt), "--key-file", str(key)],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert s.proc.stdout.readline() == "barrier held\n"  # type: ignore[union-attr]
        done = subprocess.run([PY, "-m", "blockemu", "umount", str(mnt)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert s.proc.wait(timeout=60) == 0, s.proc.stderr.read()  # type: ignore[union-attr]
        out, err = removal.communicate(timeout=60)
        # its answer came after the unmount (which wipes every key): the mount is gone, in one line
        assert (removal.returncode, out) == (1, "") and err.endswith(": not mounted\n") and err.count("\n") == 1, err
    finally:
        s.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="reads the server's memory through /proc")
@pytest.mark.parametrize("arrives", ["mount --key-file", "key add"])
def test_the_server_keeps_no_copy_of_a_key_once_it_is_removed(env, image, mnt, tmp_path, arrives) -> None:
    """Either way a key reaches the server, the keyring's is its one copy, and none outlives
    ``key remove``: ``mount --key-file`` read it into a ``bytes`` kept for the life of the mount,
    and ``key add`` sent it as hex in the control request's JSON line (the stream's buffer, the
    line, the str, the bytes: none wiped). The scanner (tests/memscan.py) makes the key and looks
    for it raw, by its tail (what a freed, unwiped copy keeps: the allocator reuses its first
    bytes) and as hex; this process writes it to the key file from a bytearray it zeroes, so a
    hit is the server's. The count while the key is present catches a copy left unwiped that
    later work would overwrite before the scan after the removal."""
    scanner = Scanner()
    try:
        key, unit = bytearray(64), bytearray(64)
        scanner.receive(key)
        scanner.receive(unit)  # the plaintext unit it also looks for: nothing here writes it
        key_file = str(tmp_path / "key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, key)
        os.close(fd)
        zero(key)
        at_mount = ("--key-file", key_file) if arrives == "mount --key-file" else ()
        with Served(env, image, mnt, *at_mount) as served:
            if not at_mount:
                r = blockemu(env, "key", "add", str(mnt), "--key-file", key_file)
                assert r.stdout.startswith("Added encryption key"), r.stdout
            hits = scanner.scan([served.proc.pid], [])
            copies = {what: sum(n for where, (n, _) in hits.items() if where.startswith(f"{what} in "))
                      for what in ("master key", "master key's tail", "master key (hex)")}
            assert copies == {"master key": 1, "master key's tail": 1, "master key (hex)": 0}, report(hits)
            r = blockemu(env, "key", "remove", str(mnt), "--key-file", key_file)
            assert r.stdout.startswith("Removed encryption key"), r.stdout
            hits = scanner.scan([served.proc.pid], [])
            assert not hits, report(hits)
    finally:
        scanner.close()


def scanned_unit(scanner: Scanner) -> bytearray:
    """The scanner's plaintext unit. The master key it sends first is not used (the image's
    key is ``encrypted_image``'s): zeroed."""
    secret_key, unit = bytearray(64), bytearray(64)
    scanner.receive(secret_key)
    scanner.receive(unit)
    zero(secret_key)
    return unit


# libfuse's request buffer: one per pyfuse3 worker task, malloc'd (1 MiB + 4 KiB: glibc maps it
# on its own pages, its data 16 bytes into the first) and read into for every request; a WRITE's
# payload follows the request's two headers (fuse_in_header, fuse_write_in: 40 bytes each)
REQUEST_PAYLOAD_AT = 16 + 40 + 40


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="reads the server's memory through /proc")
def test_the_server_keeps_no_plaintext_of_a_locked_file_but_in_libfuses_request_buffers(env, image, mnt, tmp_path,
                                                                                        capsys, monkeypatch) -> None:
    """Written and read through the mount, closed, key removed: once ``key status`` says Absent,
    the server holds no copy of the plaintext blockemu could have zeroed. pyfuse3 hands each
    WRITE's payload to ``Operations.write`` as a ``bytes`` and replies to a READ from the buffer
    ``Operations.read`` returns; both were freed unzeroed, onto the heap (the sizes stay below
    glibc's mmap threshold, 128 KiB, so a freed one is not unmapped). What stays is libfuse's
    request buffer, which blockemu cannot reach (DESIGN section 4): a run of plaintext at
    ``REQUEST_PAYLOAD_AT`` into a page of an anonymous mapping, no longer than a write."""
    key = encrypted_image(image, tmp_path, {})
    scanner = Scanner()
    try:
        unit = scanned_unit(scanner)
        sizes = [64 << 10] * 4 + [4096, 3000]  # whole pages and a partial one (read-modify-write)
        plain = unit * (sum(sizes) // len(unit) + 1)
        zero(unit)
        with Served(env, image, mnt, "--key-file", str(key)) as served:
            fd = os.open(mnt / "enc" / "f", os.O_WRONLY | os.O_CREAT, 0o600)
            at = 0
            for size in sizes:
                assert os.pwrite(fd, memoryview(plain)[at : at + size], at) == size
                at += size
            os.fsync(fd)
            os.close(fd)
            fd = os.open(mnt / "enc" / "f", os.O_RDONLY | os.O_DIRECT)  # each read a READ request
            got = mmap.mmap(-1, 64 << 10)
            same = all(os.preadv(fd, [got], off) == len(got) and got[:] == plain[off : off + len(got)]
                       for off in range(0, 4 * len(got), len(got)))
            os.close(fd)
            zero(plain)
            got.close()
            assert same
            monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
            assert main(["key", "remove", str(mnt), "--key-file", str(key)]) == 0  # in-process: quicker
            assert main(["key", "status", str(mnt), "--key-file", str(key)]) == 0
            assert capsys.readouterr().out.endswith("\nAbsent\n")
            answer = scanner.ask([served.proc.pid], [])
    finally:
        scanner.close()
    left = {where: [[hex(a), n] for a, n in runs
                    if not (where.endswith(" rw-p ") and a % mmap.PAGESIZE == REQUEST_PAYLOAD_AT and n <= max(sizes))]
            for where, runs in answer["runs"].items()}
    assert not any(left.values()), (left, report(answer["hits"]))
    assert set(answer["hits"]) <= {f"plaintext in pid {served.proc.pid} rw-p "}, report(answer["hits"])

@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="reads the server's memory through /proc")
def test_the_server_keeps_no_name_of_a_locked_directory(env, image, mnt, tmp_path, capsys, monkeypatch) -> None:
    """Names made, listed, looked up, renamed and removed in an encrypted directory through the
    mount, a symlink's target read, and a listing left open across the key removal (as ``ls -R``
    or ``find`` holds one): once ``key status`` says Absent, the server holds none of the names
    (DESIGN section 4: nothing of a locked file stays in memory, its names included). The open
    listing kept its plaintext names, a snapshot ``opendir`` took; read again, it shows the
    no-key name. The names are the hex of the scanner's plaintext unit (tests/memscan.py
    ``names``), so the scanner alone knows what to look for; only the server is scanned. Each
    copy found is then put to the server's hook (tests/heldscan.py): one inside a str, bytes or
    buffer a live object reaches fails, with its referrers. What DESIGN section 4 admits -- a
    copy no live object holds: freed unzeroed (found or not, as the removal's own work reuses
    that memory), pyfuse3's READDIRPLUS replies (``in_readdirplus_reply``), cyclic garbage --
    is only listed in the messages: the scan alone could not tell it from a held one, and
    failed about one run in eleven on such copies."""
    key = encrypted_image(image, tmp_path, {})
    scanner = Scanner()
    try:
        unit = scanned_unit(scanner)
        file, gone, sub, link, target = names(unit)
        zero(unit)
        enc = mnt / "enc"
        asked = str(tmp_path / "held.json")
        with Served({**env, heldscan.ENV: asked}, image, mnt, "--key-file", str(key),
                    run=("-c", heldscan.SERVER)) as served:
            (enc / file).write_bytes(b"x")
            (enc / gone).write_bytes(b"y")
            (enc / sub).mkdir()
            os.symlink(target, enc / link)
            os.rename(enc / file, enc / sub / file)
            assert sorted(os.listdir(enc)) == sorted([gone, sub, link])
            assert [p.name for p in (enc / sub).iterdir()] == [file]
            assert (enc / sub / file).stat().st_size == 1
            assert os.readlink(enc / link) == target
            os.unlink(enc / gone)
            listing = os.open(enc / sub, os.O_RDONLY | os.O_DIRECTORY)  # open across the removal, as ls -R's
            assert os.listdir(listing) == [file]
            monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
            assert main(["key", "remove", str(mnt), "--key-file", str(key)]) == 0  # in-process: quicker
            assert main(["key", "status", str(mnt), "--key-file", str(key)]) == 0
            assert capsys.readouterr().out.endswith("\nAbsent\n")
            answer = scanner.ask([served.proc.pid], [], names=True)
            # what is a READDIRPLUS reply is read first: the hook's walk reuses freed memory
            left = {where: [hex(a) for a, n in runs if not in_readdirplus_reply(served.proc.pid, a, n)]
                    for where, runs in answer["runs"].items()}
            found = heldscan.ask(served.proc, [run for runs in answer["runs"].values() for run in runs], asked)
            nokey = os.listdir(listing)  # read again: what the locked directory shows
            os.close(listing)
    finally:
        scanner.close()
    held = [h for h in found if not h["garbage"] and not h["reused"]]
    owned = {h["at"] for h in held}
    others = "\n".join(["copies no live object holds (freed unzeroed, or C memory; DESIGN section 4's limits):",
                        *(f"  {where}: {', '.join(at)}" for where, runs in left.items()
                          if (at := [a for a in runs if a not in owned])),
                        *(f"  {h['at']} in cyclic garbage, a {h['object']}: {' -> '.join(h['chain'])}"
                          for h in found if h["garbage"] and not h["reused"]),
                        report(answer["hits"])])
    assert not held, "\n".join(["live objects of the server hold names after the lock:",
                                 *(f"  {h['at']} in a {h['object']}: {' -> '.join(h['chain'])}" for h in held), others])
    assert len(nokey) == 1 and nokey != [file], (nokey, others)  # main's listing kept the plaintext names, found nothing by them


def in_readdirplus_reply(pid: int, at: int, length: int) -> bool:
    """Whether the name at ``at`` in ``pid`` is one entry of a READDIRPLUS reply: right after
    its ``struct fuse_dirent``'s ``namelen`` (u32, the name's length) and ``type`` (u32). pyfuse3
    builds each reply in a buffer it mallocs and frees unzeroed once sent (``ReaddirToken``,
    ``fuse_readdirplus_async``), out of blockemu's reach (DESIGN section 4)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(at - 8)
        namelen, kind = struct.unpack("<II", mem.read(8))
    return namelen == length and kind in (stat.S_IFREG >> 12, stat.S_IFDIR >> 12, stat.S_IFLNK >> 12)


def test_kill_9_then_fsck_then_mount_clears_the_dead_mount(env, image, mnt) -> None:
    """kill -9 of the server: the image opens to its last commit, every fsynced file is there,
    fsck is clean, and the next ``blockemu mount`` on that mount point detaches the dead mount."""
    s = Served(env, image, mnt, "-o", "interval=3600")  # only the fsyncs commit
    try:
        code = textwrap.dedent(f"""
            import os
            for i in range(5):
                fd = os.open("{mnt}/synced%d" % i, os.O_CREAT | os.O_WRONLY, 0o644)
                os.write(fd, bytes([65 + i]) * (20000 * (i + 1))); os.fsync(fd); os.close(fd)
            with open("{mnt}/dirsynced", "wb") as f:
                f.write(b"d" * 30000)
            d = os.open("{mnt}", os.O_RDONLY); os.fsync(d); os.close(d)  # commits everything (README)
            with open("{mnt}/unsynced", "wb") as f:
                f.write(b"u" * 50000)
            os.sync()  # never reaches the server: no SYNCFS for a FUSE daemon (README)
        """)
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(timeout=30)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.strerror == "Transport endpoint is not connected"
        fsck_clean(env, image)
        blockemu(env, "mount", str(image), str(mnt))  # clears the dead mount itself
        try:
            for i in range(5):
                assert (mnt / f"synced{i}").read_bytes() == bytes([65 + i]) * (20000 * (i + 1))
            assert (mnt / "dirsynced").read_bytes() == b"d" * 30000
            assert not (mnt / "unsynced").exists()  # created after the last commit
        finally:
            blockemu(env, "umount", str(mnt))
        fsck_clean(env, image)
    finally:
        s.close()


def test_umount_of_a_killed_server_detaches_the_dead_mount(env, image, mnt, monkeypatch) -> None:
    """... and clears what the server left in the runtime directory: its stale socket, and its
    log if that is empty (a kill -9 leaves no last words); a log that says something stays."""
    run = Path(env["BLOCKEMU_RUNTIME_DIR"])
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", str(run))
    for words in ("", "last words\n"):
        s = Served(env, image, mnt)
        try:
            os.kill(s.proc.pid, signal.SIGKILL)
            s.proc.wait(timeout=30)
            Path(control.log_path(str(mnt))).write_text(words)  # as a background server's log
            r = blockemu(env, "umount", str(mnt))
            assert "detached the dead mount" in r.stdout
            assert mounted_fstype(str(mnt)) is None
            assert [p.read_text() for p in run.iterdir()] == ([words] if words else [])
        finally:
            s.close()


def test_mount_and_umount_errors_are_one_line(env, image, mnt, tmp_path, capsys, monkeypatch) -> None:
    """The first through a backgrounding mount (the serving process's error reaches the command
    through its pipe), the others in-process (--foreground, umount): each CLI start costs a second."""
    missing = tmp_path / "nowhere"
    r = blockemu(env, "mount", str(image), str(missing), check=False)
    assert (r.returncode, r.stderr) == (1, f"blockemu: mount: {missing}: mount point does not exist\n")
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])

    def fails(*args: str) -> str:
        assert main(list(args)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert fails("umount", str(mnt)) == f"blockemu: umount: {mnt}: not a blockemu mount point (no blockemu server for it)\n"
    newer = tmp_path / "newer.img"  # unknown compat_ro features: read, never written (SPEC "Feature bits")
    shutil.copyfile(image, newer)
    set_super(str(newer), compat_ro_flags=0x30)
    assert fails("mount", str(newer), str(mnt), "--foreground") == (
        f"blockemu: mount: {newer}: unknown compat_ro features 0x30; a newer blockemu made this image, which this "
        f"one may read (ls, cat, extents, inspect, fsck) but not write\n")
    assert fails("key", "status", str(mnt), "--id", "0" * 32) == (
        f"blockemu: key: {mnt}: not a blockemu mount point (no blockemu server for it)\n")
    with Served(env, image, mnt) as s:
        other = tmp_path / "other"
        other.mkdir()
        assert fails("mount", str(image), str(other), "--foreground") == (
            f"blockemu: mount: {image}: image is in use by pid {s.proc.pid} (mounted or open for writing); one writer per image\n")
        assert mounted_fstype(str(other)) is None
        assert fails("mount", str(image), str(mnt), "--foreground") == (
            f"blockemu: mount: {mnt}: mount point is busy: fuse.blockemu is mounted there (blockemu umount {mnt})\n")
        with open(mnt / "held", "w"):
            assert "target is busy" in fails("umount", str(mnt))
        monkeypatch.chdir(mnt)  # the kernel's view of busy: a working directory counts too
        assert fails("umount", str(mnt)) == f"blockemu: umount: {mnt}: target is busy\n"
        monkeypatch.chdir(tmp_path)
        assert s.proc.poll() is None  # a refused umount leaves the mount serving


def test_umount_whose_commit_the_full_host_refuses_says_the_mount_is_gone(env, mnt, tmp_path) -> None:
    """The host's file system under the image fills up (a 16 MiB tmpfs): the fsync that hits
    it fails, the unmount's commit fails too, and ``blockemu umount`` says that the mount is
    gone and which image's write failed -- not a bare "No space left on device" (exit 1)."""
    host = tmp_path / "host"
    host.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(host)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        img = host / "t.img"
        asyncio.run(mkfs(str(img), "1G"))
        s = Served(env, img, mnt)
        try:
            r = sh(f"dd if=/dev/urandom of={mnt}/ok bs=64k count=16 conv=fsync status=none && "
                   f"dd if=/dev/urandom of={mnt}/big bs=1M count=24 conv=fsync status=none")
            assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
            r = blockemu(env, "umount", str(mnt), check=False)
            assert r.returncode == 1
            assert r.stderr == (f"blockemu: umount: {mnt}: unmounted, but its last flush or commit failed (what was "
                                f"fsynced before it stays): {img}: No space left on device\n")
            assert s.proc.wait(timeout=60) != 0 and mounted_fstype(str(mnt)) is None
        finally:
            s.close()

        async def oracle() -> None:
            async with mount(str(img), readonly=True) as fs:
                assert (await fs.stat("/ok")).st_size == 1 << 20
        asyncio.run(oracle())
    finally:
        subprocess.run(["umount", "-l", str(host)], capture_output=True)


def test_no_fuse_binding_is_one_line(tmp_path) -> None:
    """Where pyfuse3 is not installed, mount says what to install (runs everywhere)."""
    code = ("import sys; sys.modules['pyfuse3'] = None\n"
            "from blockemu.cli.main import main\n"
            f"sys.exit(main(['mount', '{tmp_path}/a.img', '{tmp_path}']))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("blockemu: mount: FUSE support is not installed") and r.stderr.count("\n") == 1
    assert "pip install 'blockemu[fuse]'" in r.stderr and "libfuse3-dev" in r.stderr


def test_mount_options_are_checked_before_anything_is_mounted(capsys) -> None:
    from blockemu.cli.main import mount_options

    assert mount_options(["ro,interval=0.5", "dirty_limit=32M"]) == {"readonly": True, "interval": 0.5,
                                                                     "dirty_limit": 32 << 20}
    for bad in ("bogus", "dirty_limit=zz", "interval", "interval=0", "dirty_limit=1K"):  # unparsed or out of range
        assert main(["mount", "a.img", "mnt", "-o", bad]) == 2
        assert capsys.readouterr().err.startswith("blockemu: usage: blockemu mount: ")


def test_the_cli_takes_every_mount_option_the_library_does() -> None:
    """``-o`` knows the options ``mount`` checks its keywords against (batch_bytes was missing
    from a list of the CLI's own), each parsed to the type its ``Writeback`` keyword is
    annotated with, so that the library takes the value."""
    import inspect

    from blockemu.cli.main import mount_options
    from blockemu.fs.writeback import OPTION_FLOORS, Writeback, check_options

    params = inspect.signature(Writeback.__init__).parameters
    assert sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY) == sorted(OPTION_FLOORS)
    for name in OPTION_FLOORS:
        got = mount_options([f"{name}=8192"])  # above every floor, and whole: every parser takes it
        assert type(got[name]).__name__ in params[name].annotation.split(" | "), (name, got, params[name].annotation)
        check_options({k: v for k, v in got.items() if k != "readonly"})
    assert mount_options(["batch_bytes=64K"])["batch_bytes"] == 64 << 10


def test_read_only_mount_and_sigterm(env, image, mnt) -> None:
    """-o ro: writes fail with EROFS; SIGTERM unmounts cleanly and releases the image."""

    async def put() -> None:
        async with mount(str(image)) as fs, fs.open("/h", "w") as f:
            await f.write(Path("/etc/hostname").read_bytes())
    asyncio.run(put())
    s = Served(env, image, mnt, "-o", "ro")
    try:
        assert (mnt / "h").read_bytes() == Path("/etc/hostname").read_bytes()
        r = sh(f"echo x > {mnt}/new")
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        assert mounted_fstype(str(mnt)) is None
        fsck_clean(env, image)
    finally:
        s.close()


# The server with one lookup that is never answered (of the name "blocker": it waits until the
# loop stops, then goes unanswered, as a request the stopped loop never reads) and notifications
# that say when they start; each prints a line the test waits for. At its exit it says how many
# notifications started once the session was being closed (each used a session freed under it).
STALLED_SERVER = textwrap.dedent("""
    import asyncio, atexit, sys
    import pyfuse3
    from blockemu.cli.main import main
    from blockemu.fuse.ops import Operations

    answer, stop, stalled = Operations.lookup, pyfuse3.terminate, []
    async def lookup(self, parent, name, ctx=None):
        if name == b"blocker":
            stalled.append(asyncio.current_task())
            print("lookup stalled", flush=True)
            await asyncio.get_running_loop().create_future()
        return await answer(self, parent, name, ctx)
    def terminate():
        stop()
        for task in stalled:
            task.cancel()
    late, closing, close = [], [], pyfuse3.close
    def notifying(notify):
        def call(*args):
            print("notifying", flush=True)
            if closing:
                late.append(args)
            notify(*args)
        return call
    def closed(unmount=True):
        closing.append(True)
        close(unmount)
    Operations.lookup, pyfuse3.terminate, pyfuse3.close = lookup, terminate, closed
    pyfuse3.invalidate_entry, pyfuse3.invalidate_inode = map(notifying, (pyfuse3.invalidate_entry, pyfuse3.invalidate_inode))
    atexit.register(lambda: print(f"late notifications: {len(late)}", flush=True))
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_while_a_notification_waits_on_a_lookup_never_answered_exits(env, image, mnt, tmp_path) -> None:
    """The kernel takes a directory's name notification only once the lookups in flight there are
    answered; after SIGTERM the loop answers none, so the notifying thread waited for ever and
    so did the exit, joining it (the image already unmounted). Now the server aborts the
    connection when its notifications outlive the unmount's wait: it exits, the lookup fails,
    the mount is gone and the image is clean. The notifications the abort let go on (here the
    rest of 200 names) end before the session is destroyed: they ran into its close, using the
    session as it was freed."""
    names = {f"/enc/f{i}": b"secret\n" for i in range(200)}
    key = encrypted_image(image, tmp_path, names)
    s = Served(env, image, mnt, "--key-file", str(key), run=("-c", STALLED_SERVER))
    number = connection(str(mnt))
    assert number is not None
    waiting: list[subprocess.Popen] = []
    try:
        assert len(os.listdir(mnt / "enc")) == len(names)  # handed to the kernel: a key removal invalidates them
        waiting.append(subprocess.Popen(["stat", str(mnt / "enc" / "blocker")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        assert s.proc.stdout.readline() == "lookup stalled\n"  # type: ignore[union-attr]
        waiting.append(subprocess.Popen([PY, "-m", "blockemu", "key", "remove", str(mnt), "--key-file", str(key)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert s.proc.stdout.readline() == "notifying\n"  # type: ignore[union-attr]
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0, s.proc.stderr.read()  # type: ignore[union-attr]
        assert waiting[0].wait(timeout=30) != 0  # the lookup fails: its server is gone
        assert mounted_fstype(str(mnt)) is None
        assert s.proc.stdout.read().endswith("late notifications: 0\n")  # type: ignore[union-attr]
        fsck_clean(env, image)
    finally:
        if s.proc.poll() is None:
            abort_connection(number)  # else neither the server nor the stat (which SIGKILL does not end) exit
        for proc in waiting:
            proc.kill()
            proc.wait(timeout=30)
        s.close()


def test_a_mount_point_named_through_a_symlink_is_found_in_mountinfo(tmp_path) -> None:
    """/proc/self/mountinfo names a mount point by its real path: one named through a symlinked
    directory (a home under /data, /var/run) was never found -- the stuck notification's
    connection never aborted (the exit hung as before), a dead mount never detached. The parent
    is resolved; the mount point itself is not stat'ed (a request its server may never answer)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    real = tmp_path / "real"
    (real / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    done = subprocess.run(["mount", "-t", "tmpfs", "none", str(real / "mnt")], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        assert mounted_fstype(str(tmp_path / "link" / "mnt")) == "tmpfs"
    finally:
        subprocess.run(["umount", str(real / "mnt")], check=True)


@pytest.mark.skipif(not shutil.which("fio"), reason="fio is not installed (apt-get install fio)")
def test_real_fio_verify_on_the_mount(env, image, mnt, tmp_path) -> None:
    """The OS's fio with verify=crc32c writes and reads back through the mount. It runs in the
    test's directory: a verify job saves its state (for verify_state_load) in fio's working
    directory, and run from the checkout it left local-v-0-verify.state there."""
    with Served(env, image, mnt):
        r = subprocess.run(["fio", "--name=v", f"--directory={mnt}", "--rw=randwrite", "--bs=4k", "--size=4m",
                            "--ioengine=psync", "--verify=crc32c", "--do_verify=1", "--fsync=16", "--randseed=7",
                            "--output-format=terse"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verify" not in r.stderr
    assert (tmp_path / "local-v-0-verify.state").exists()  # here, not in the checkout
    fsck_clean(env, image)


@contextlib.asynccontextmanager
async def in_process_ops(tmp_path: Path, **mount_opts: object):
    """A fresh image mounted in this process with its FUSE operations, no kernel mount: requests
    are called as coroutines, so an interleaving is driven step by step."""
    try:
        from blockemu.fuse.ops import Operations
    except ImportError as e:
        pytest.skip(f"pyfuse3 is not installed ({e}): pip install -e '.[fuse]'")
    img = str(tmp_path / "a.img")
    await mkfs(img, "64M")
    async with mount(img, **mount_opts) as fs:
        yield fs, Operations(fs)


async def test_a_rename_landing_while_a_create_waits_cannot_misplace_the_file(tmp_path) -> None:
    """The kernel names the parent by inode; the path made of it must still name that directory
    when the filesystem resolves it. Driven in-process through the FUSE operations: the create
    waits in vol.join (for a commit, say) while a rename moves its directory and a new one takes
    the old name; the file must land in the moved directory."""
    async with in_process_ops(tmp_path) as (fs, ops):
        import pyfuse3

        await fs.mkdir("/a")
        a = (await fs.stat("/a")).st_ino
        join, gate, entered = fs.vol.join, asyncio.Event(), asyncio.Event()

        @contextlib.asynccontextmanager
        async def held_join(*args, **kwargs):
            fs.vol.join = join  # only the create's first join waits
            entered.set()
            await gate.wait()
            async with join(*args, **kwargs) as engine:
                yield engine
        fs.vol.join = held_join
        ctx = types.SimpleNamespace(uid=0, gid=0, umask=0o022)
        create = asyncio.create_task(ops.create(a, b"x", 0o100644, os.O_WRONLY | os.O_CREAT, ctx))
        # the create's failure before it joins is raised here: waiting on ``entered`` alone hung
        await asyncio.wait([create, asyncio.ensure_future(entered.wait())], return_when=asyncio.FIRST_COMPLETED)
        if create.done():
            create.result()

        async def moves() -> None:
            await ops.rename(pyfuse3.ROOT_INODE, b"a", pyfuse3.ROOT_INODE, b"b", 0, ctx)
            await ops.mkdir(pyfuse3.ROOT_INODE, b"a", 0o755, ctx)
        mover = asyncio.create_task(moves())
        while not (mover.done() or getattr(getattr(ops, "names", None), "_waiters", None)):  # done, or waits its turn
            await asyncio.sleep(0)
        gate.set()
        fi, _ = await create
        await mover
        await ops.release(fi.fh)
        assert await fs.readdir("/b") == ["x"] and await fs.readdir("/a") == []


async def test_a_fuse_create_makes_its_inode_with_the_callers_mode_and_owner_in_one_transaction(tmp_path) -> None:
    """CREATE, MKDIR and SYMLINK give the new inode the caller's mode, uid and gid as it is made:
    one join of the running transaction and one save of the inode each (a create made the file
    and then chmod-chowned it in a second transaction, ~half of its CPU), kept across a remount."""
    async with in_process_ops(tmp_path) as (fs, ops):
        import pyfuse3

        join, joins, save, saves = fs.vol.join, [], fs.save_inode, []

        def counted_join(*args, **kwargs):
            joins.append(1)
            return join(*args, **kwargs)

        def counted_save(inode):
            saves.append(inode.ino)
            return save(inode)
        fs.vol.join, fs.save_inode = counted_join, counted_save
        ctx = types.SimpleNamespace(uid=1234, gid=5678, umask=0o022)
        made = {}
        for name, request in [
            ("f", lambda: ops.create(pyfuse3.ROOT_INODE, b"f", 0o100640, os.O_WRONLY | os.O_CREAT, ctx)),
            ("d", lambda: ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o40710, ctx)),
        ]:
            joins.clear(), saves.clear()
            answer = await request()
            attrs = answer[1] if isinstance(answer, tuple) else answer
            assert len(joins) == 1 and saves.count(attrs.st_ino) == 1, (name, joins, saves)
            made[name] = (attrs.st_mode, attrs.st_uid, attrs.st_gid)
            if isinstance(answer, tuple):
                await ops.release(answer[0].fh)
        link = await ops.symlink(pyfuse3.ROOT_INODE, b"l", b"f", ctx)  # two transactions (the target's data first), as before
        made["l"] = (link.st_mode, link.st_uid, link.st_gid)
        fs.vol.join, fs.save_inode = join, save
    assert made == {"f": (0o100640, 1234, 5678), "d": (0o40710, 1234, 5678), "l": (0o120777, 1234, 5678)}
    async with mount(str(tmp_path / "a.img")) as fs:
        for name, want in made.items():
            s = await fs.stat(f"/{name}")
            assert (s.st_mode, s.st_uid, s.st_gid) == want, name


async def test_each_fuse_file_handle_reports_a_writeback_loss_on_its_fsync(tmp_path) -> None:
    """Two opens of one file are two FUSE handles, each its own File: a loss a background
    writeback took is raised by the FSYNC of each (the kernel hands it to the calling fd), once;
    a handle opened after they reported it does not see it."""
    async with in_process_ops(tmp_path, interval=3600) as (fs, ops):
        import pyfuse3

        await (await fs.open("/f", "w")).close()
        ino = (await fs.stat("/f")).st_ino
        ctx = types.SimpleNamespace(uid=0, gid=0, umask=0o022)
        a, b = [(await ops.open(ino, os.O_RDWR, ctx)).fh for _ in range(2)]
        await fail_next_data_write(fs)
        await ops.write(b, 0, os.urandom(4096))  # not a constant: write zeroes its payload in place
        await fs.writeback.flush_inode(ops.files[b].inode)
        fs.vol.device.faults = FaultPlan()
        for fh in (a, b):
            with pytest.raises(pyfuse3.FUSEError) as caught:
                await ops.fsync(fh, False)
            assert caught.value.errno == errno.EIO
        c = (await ops.open(ino, os.O_RDWR, ctx)).fh
        for fh in (a, b, c):
            await ops.fsync(fh, False)
            await ops.release(fh)


async def test_an_open_truncating_that_is_cancelled_stays_cancelled_and_reports_no_loss(tmp_path) -> None:
    """OPEN with O_TRUNC makes its handle, then truncates: cancelled there (the truncate waits
    for the file's writeback lock), it closed the handle and that close raised a loss no handle
    had reported -- over the cancellation, for a handle the kernel never got (review40 fixed the
    same in Filesystem.open). The handle goes unreported, as a dropped one's: the loss is left
    to the unmount."""
    with pytest.raises(OSError) as unmount:
        async with in_process_ops(tmp_path, interval=3600) as (fs, ops):
            async with fs.open("/f", "w") as a:
                await fail_next_data_write(fs)
                await a.pwrite(b"L" * 4096, 0)
            await fs.writeback.flush_inode(a.inode)  # fails after the close: no handle reported it
            fs.vol.device.faults = FaultPlan()
            ctx = types.SimpleNamespace(uid=0, gid=0, umask=0o022)
            ino = (await fs.stat("/f")).st_ino
            await cancel_while_it_waits(a.inode.wb_lock, lambda: ops.open(ino, os.O_RDWR | os.O_TRUNC, ctx))
            assert not ops.files
    assert unmount.value.errno == errno.EIO and not a.inode.errs._held


def test_encrypted_symlinks_with_and_without_the_key(env, image, mnt, tmp_path, capsys, monkeypatch) -> None:
    """Through the mount: with the key a link in an encrypted directory reads and is followed;
    without it, readlink gives the no-key form of the stored ciphertext (fscrypt_get_symlink),
    lstat works, and following it finds nothing (the form names no entry), as on Linux;
    a new link there needs the key; with the key added the real target is back."""
    import base64

    key = tmp_path / "k.key"
    key.write_bytes(os.urandom(32))
    target = "../plain/target-file"

    async def setup() -> bytes:
        async with mount(str(image)) as fs:
            kid = await fs.add_key(key.read_bytes())
            await fs.mkdir("/enc")
            await fs.set_policy("/enc", kid)
            await fs.mkdir("/plain")
            async with fs.open("/plain/target-file", "w") as f:
                await f.write(b"reached\n")
            await fs.symlink(target, "/enc/s")
            return fs.tree[(fs.inode((await fs.stat("/enc/s")).st_ino).ino, 42, 0)]  # FSCRYPT_SYMLINK
    body = asyncio.run(setup())
    nokey = base64.urlsafe_b64encode(bytes(8) + body[2:]).rstrip(b"=").decode()
    with Served(env, image, mnt, "--key-file", str(key)):
        assert os.readlink(mnt / "enc" / "s") == target and (mnt / "enc" / "s").read_text() == "reached\n"
        assert os.lstat(mnt / "enc" / "s").st_size == len(target)
        os.symlink("made-through-the-mount", mnt / "enc" / "m")
    with Served(env, image, mnt):
        names = sorted(os.listdir(mnt / "enc"))
        assert len(names) == 2 and not {"s", "m"} & set(names)
        forms = {os.readlink(mnt / "enc" / n) for n in names}
        assert nokey in forms and not {target, "made-through-the-mount"} & forms
        for n in names:
            st = os.lstat(mnt / "enc" / n)
            assert stat.S_ISLNK(st.st_mode) and st.st_size == len(os.readlink(mnt / "enc" / n))
        r = sh(f"cat {mnt}/enc/{names[0]}", env)
        assert r.returncode == 1 and "No such file or directory" in r.stderr, r.stderr
        r = sh(f"ln -s somewhere {mnt}/enc/new", env)
        assert r.returncode == 1 and "Required key not available" in r.stderr, r.stderr
        monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", env["BLOCKEMU_RUNTIME_DIR"])
        assert main(["key", "add", str(mnt), "--key-file", str(key)]) == 0
        capsys.readouterr()
        assert os.readlink(mnt / "enc" / "s") == target and (mnt / "enc" / "s").read_text() == "reached\n"
        assert os.readlink(mnt / "enc" / "m") == "made-through-the-mount"
    fsck_clean(env, image)
    assert check(str(image), key=key.read_bytes()).clean


def test_a_read_that_fails_with_eio_says_why_in_the_servers_log(env, image, mnt) -> None:
    """README: the server's stderr is where an EIO says why -- the reader gets a bare errno.
    A sector whose checksum does not match failed the read with EIO and the log stayed empty."""
    async def put() -> None:
        async with mount(str(image)) as fs:
            async with fs.open("/f", "w") as f:
                await f.write(b"x" * 16384)
    asyncio.run(put())
    disk = json.loads(blockemu(env, "extents", str(image), "/f", "--json").stdout)[0]["disk_bytenr"]
    with open(image, "r+b") as img:
        img.seek(disk + 5000)
        img.write(b"\xff")
    s = Served(env, image, mnt)
    try:
        r = sh(f"cat {mnt}/f > /dev/null")
        assert r.returncode == 1 and "Input/output error" in r.stderr, r.stderr
    finally:
        blockemu(env, "umount", str(mnt))
        s.proc.wait(timeout=60)
        log = s.proc.stderr.read()  # type: ignore[union-attr]
        s.close()
    assert "blockemu: mount: read: " in log and f"checksum mismatch at file offset 4096 (disk {disk + 4096})" in log, log


def test_a_directory_listing_says_the_entries_a_damaged_tree_block_hides(env, mnt, tmp_path) -> None:
    """readdir looks each entry up for its attributes and skipped every entry whose lookup
    failed, as if removed since opendir: with a bad fs-tree leaf under some files' inodes,
    ``ls`` showed the rest and ``cp -a`` of the directory exited 0 without those files. The
    listing now gives every other entry, then fails with the entries' error (EUCLEAN)."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for i in range(200):
        (root / "d" / f"f{i:03}").write_bytes(b"x")
    image = tmp_path / "d.img"
    blockemu(env, "mkfs", str(image), "--size", "32M", "--rootdir", str(root))
    inos = {r["ino"]: r["name"] for r in json.loads(blockemu(env, "ls", str(image), "/d", "--json").stdout)}
    leaves = [b for b in json.loads(blockemu(env, "inspect", "dump-tree", str(image), "--tree", "fs", "--json").stdout)
              if b["level"] == 0]
    bad = leaves[-2]  # children's inodes only (the last leaf holds what a mount's orphan scan reads)
    lost = {inos[it["key"][0]] for it in bad["items"] if it["type"] == "INODE_ITEM"}
    assert lost and all(it["key"][0] in inos for it in bad["items"])
    with open(image, "r+b") as raw:
        raw.seek(bad["bytenr"])
        raw.write(bytes(4096))
    with Served(env, image, mnt, "-o", "ro"):
        script = tmp_path / "list.py"
        script.write_text(textwrap.dedent(f"""
            import json, os
            seen, err = [], None
            try:
                for e in os.scandir({str(mnt / "d")!r}):
                    seen.append(e.name)
            except OSError as e:
                err = e.errno
            print(json.dumps([err, sorted(seen)]))
            """))
        err, names = json.loads(sh(f"{PY} {script}").stdout)
        assert err == errno.EUCLEAN and names == sorted(set(inos.values()) - lost)
        copy = sh(f"cp -a {mnt}/d {tmp_path}/copy")
        assert copy.returncode == 1 and "Structure needs cleaning" in copy.stderr, copy.stderr


def test_a_clean_unmount_removes_an_empty_log_and_keeps_one_that_says_something(env, image, mnt) -> None:
    """The background server's logs were never removed: one more in the runtime directory for
    every mount point ever mounted. A clean unmount drops an empty one; one that explains an
    EIO stays, and the next mount of that mount point appends to it."""
    run = Path(env["BLOCKEMU_RUNTIME_DIR"])
    blockemu(env, "mount", str(image), str(mnt))
    (mnt / "f").write_bytes(b"x" * 16384)
    blockemu(env, "umount", str(mnt))
    assert list(run.iterdir()) == []
    disk = json.loads(blockemu(env, "extents", str(image), "/f", "--json").stdout)[0]["disk_bytenr"]
    with open(image, "r+b") as img:
        img.seek(disk + 5000)
        img.write(b"\xff")
    blockemu(env, "mount", str(image), str(mnt))
    try:
        assert sh(f"cat {mnt}/f > /dev/null").returncode == 1
    finally:
        blockemu(env, "umount", str(mnt))
    [log] = run.iterdir()
    assert log.suffix == ".log" and "checksum mismatch at file offset 4096" in log.read_text()


async def test_a_missing_name_is_a_negative_entry_the_kernel_keeps_except_where_a_key_changes_names(tmp_path,
                                                                                                   monkeypatch) -> None:
    """Every stat of a missing name was a request to the server (an ENOENT answer is not
    cached: 100 stats, 100 lookups); a negative entry is kept for ATTR_TIMEOUT (1 lookup). In an
    encrypted directory adding the key makes names appear, so there a missing name stays ENOENT;
    readdir still skips a name gone since opendir."""
    async with in_process_ops(tmp_path) as (fs, ops):
        import pyfuse3

        from blockemu.fuse.ops import ATTR_TIMEOUT

        await fs.mkdir("/enc")
        await fs.set_policy("/enc", await fs.add_key(bytes(range(32))))
        async with fs.open("/here", "w"):
            pass
        missing = await ops.lookup(pyfuse3.ROOT_INODE, b"missing")
        assert (missing.st_ino, missing.entry_timeout) == (0, ATTR_TIMEOUT)
        assert (await ops.lookup(pyfuse3.ROOT_INODE, b"here")).st_ino == (await fs.stat("/here")).st_ino
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup((await fs.stat("/enc")).st_ino, b"missing")
        assert e.value.errno == errno.ENOENT
        fh = await ops.opendir(pyfuse3.ROOT_INODE, None)
        await fs.unlink("/here")  # gone between opendir and readdir: not listed
        listed: list[bytes] = []
        monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attrs, nxt: listed.append(name) or True)
        await ops.readdir(fh, 0, None)
        assert listed == [b".", b"..", b"enc"]


@pytest.mark.parametrize("mode", ["soft", "hard"])
async def test_the_kernel_is_told_to_forget_exactly_what_a_key_change_made_stale(tmp_path, monkeypatch, mode) -> None:
    """In-process, the notifications recorded: the names of an encrypted directory handed to the
    kernel (create, mkdir, a rename's target; not an unlinked one, nor a plain directory's) are
    invalidated when the directory's names change, and a locked inode's attributes and pages.
    Soft removal: a file held open keeps its directory's real names (the kernel's dentries pin
    it), so they go when it closes; hard removal wipes the names key at once, so they go at the
    removal. Adding the key back invalidates the no-key names a readdir handed out."""
    async with in_process_ops(tmp_path, key_removal=mode) as (fs, ops):
        import pyfuse3

        sent: list[tuple[int, bytes | None]] = []
        monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda ino, name: sent.append((ino, name)))
        monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino: sent.append((ino, None)))
        ops.kernel.live = True
        kid = await fs.add_key(bytes(range(32)))
        await fs.mkdir("/enc")
        await fs.set_policy("/enc", kid)
        await fs.mkdir("/plain")
        enc, plain = (await fs.stat("/enc")).st_ino, (await fs.stat("/plain")).st_ino
        ctx = types.SimpleNamespace(uid=0, gid=0, umask=0o022)

        async def create(parent: int, name: bytes) -> int:
            fi, _ = await ops.create(parent, name, 0o100644, os.O_WRONLY | os.O_CREAT, ctx)
            return fi.fh
        held = await create(enc, b"held")
        for parent, name in ((enc, b"a"), (enc, b"gone"), (plain, b"p")):
            await ops.release(await create(parent, name))
        sub = (await ops.mkdir(enc, b"sub", 0o755, ctx)).st_ino
        await ops.unlink(enc, b"gone", ctx)
        await ops.rename(enc, b"a", enc, b"b", 0, ctx)
        b = (await ops.lookup(enc, b"b")).st_ino
        assert ops.kernel.names == {enc: {b"held", b"b", b"sub"}}

        await fs.remove_key(kid)
        await ops.kernel.settled()
        if mode == "soft":
            assert sorted(sent) == sorted([(b, None), (sub, None)])  # locked; enc is held, its names stay
            await ops.release(held)
            await ops.kernel.settled()
        entries = {(ino, name) for ino, name in sent if name is not None}
        assert entries == {(enc, b"held"), (enc, b"b"), (enc, b"sub")}
        assert {b, sub, enc} <= {ino for ino, name in sent if name is None}
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(enc, b"b")
        assert e.value.errno == errno.ENOENT and enc not in ops.kernel.names

        listed: list[bytes] = []
        monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attrs, nxt: listed.append(name) or True)
        await ops.readdir(await ops.opendir(enc, None), 0, None)
        nokey = set(listed) - {b".", b".."}
        assert len(nokey) == 3 and ops.kernel.names == {enc: nokey}
        sent.clear()
        await fs.add_key(bytes(range(32)))
        ops.key_added(bytes.fromhex(kid))
        await ops.kernel.settled()
        assert {(ino, name) for ino, name in sent if name is not None} == {(enc, n) for n in nokey}


def test_allow_other_lets_other_users_in_as_the_modes_say_and_df_i_counts_no_inodes(env, image, mnt) -> None:
    """``-o allow_other`` was refused as an unknown option, so every user but the mounting one
    got EACCES whatever the modes. Now other users get in as the file modes allow (the kernel
    checks them: default_permissions). ``df -i`` showed block counts as inode counts; btrfs,
    which has no inode table either, reports none (f_files 0)."""
    with Served(env, image, mnt, "-o", "allow_other"):
        (mnt / "open").write_text("for all\n")
        (mnt / "private").write_text("root's\n")
        os.chmod(mnt / "private", 0o600)
        # (from inside the mount point: pytest's directories above it are root's alone)
        nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        done = subprocess.run([*nobody, "cat", "open"], cwd=mnt, capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout) == (0, "for all\n"), done.stderr
        done = subprocess.run([*nobody, "cat", "private"], cwd=mnt, capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "Permission denied" in done.stderr, done.stderr
        vfs = os.statvfs(mnt)
        assert (vfs.f_files, vfs.f_ffree, vfs.f_favail) == (0, 0, 0) and vfs.f_bfree > 0


SETGID_STEPS = """umask 022
cd shared && touch f && mkdir sub sub/deeper && ln -s f l && /usr/bin/python3 -c "$MAKE"
cd ../own && /usr/bin/python3 -c "$MAKE"
"""


def setgid_steps(where: Path) -> str:
    """In ``where``, as root, two setgid directories open to all -- ``shared`` of group 50, ``own``
    of nobody's group -- then, as nobody, a file, directories, a symlink and a file asked for with
    S_ISGID (open(2)'s mode 02755) made in them: what each ended up as, ``stat`` line by line."""
    made = sh("mkdir shared own && chown 0:50 shared && chown 0:65534 own && chmod 2777 shared own", cwd=where)
    assert made.returncode == 0, made.stderr
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "bash", "-c", SETGID_STEPS]
    make = "import os; os.close(os.open('x', os.O_CREAT | os.O_WRONLY, 0o2755))"
    done = subprocess.run(nobody, cwd=where, env={**os.environ, "MAKE": make}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return stat_setgid_tree(where)


def stat_setgid_tree(where: Path) -> str:
    done = sh("stat -c '%n %u %g %a %F' shared shared/* shared/sub/deeper own/x", cwd=where)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_setgid_directory_gives_its_group_through_the_mount_as_on_the_host(env, image, mnt, tmp_path) -> None:
    """A setgid directory's new entries take its group, and new directories its setgid bit, as a
    local filesystem's inode_init_owner gives them: the FUSE kernel leaves that to the server,
    which gave every entry its creator's gid. The same steps as nobody in a host directory and
    through the mount (allow_other) end alike, and still after a remount; the S_ISGID a creator
    outside the group asked for is stripped by the kernel before the server hears the create."""
    host = tmp_path / "host"
    host.mkdir()
    want = setgid_steps(host)
    assert want.splitlines() == [
        "shared 0 50 2777 directory", "shared/f 65534 50 644 regular empty file",
        "shared/l 65534 50 777 symbolic link", "shared/sub 65534 50 2755 directory",
        "shared/x 65534 50 755 regular empty file", "shared/sub/deeper 65534 50 2755 directory",
        "own/x 65534 65534 2755 regular empty file"]
    with Served(env, image, mnt, "-o", "allow_other"):
        assert setgid_steps(mnt) == want
    with Served(env, image, mnt):
        assert stat_setgid_tree(mnt) == want
    fsck_clean(env, image)


def test_allow_other_by_a_user_needs_user_allow_other(tmp_path, monkeypatch) -> None:
    """fusermount3 refuses allow_other to a user other than root unless /etc/fuse.conf says
    user_allow_other: said in one line naming the file (EPERM), not a bare "mount failed"."""
    from blockemu.fuse.serve import check_allow_other

    conf = tmp_path / "fuse.conf"
    conf.write_text("#user_allow_other\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError) as e:
        check_allow_other(str(conf))
    assert e.value.errno == errno.EPERM and str(conf) in str(e.value) and "user_allow_other" in str(e.value)
    conf.write_text("mount_max = 10\nuser_allow_other\n")
    check_allow_other(str(conf))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    check_allow_other(str(tmp_path / "missing"))  # root needs nothing


async def test_flush_answers_enosys_so_the_kernel_stops_sending_it(tmp_path) -> None:
    """FLUSH (every close(2)) has nothing to do here -- nothing is buffered above the page cache
    -- yet it was a round trip on every close, one of a create's five. ENOSYS makes the kernel
    stop sending it (``fc->no_flush``); the file is still open, and released as before."""
    async with in_process_ops(tmp_path) as (fs, ops):
        import pyfuse3

        fi, _ = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o100644, os.O_WRONLY,
                                 types.SimpleNamespace(uid=0, gid=0, pid=1))
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.flush(fi.fh)
        assert e.value.errno == errno.ENOSYS
        await ops.release(fi.fh)
        assert ops.files == {}


async def test_a_listing_finds_its_entries_without_walking_their_paths(tmp_path, monkeypatch) -> None:
    """READDIRPLUS answers each entry's attributes: it looked every name up again, walking its
    path from the root (and, in an encrypted directory, encrypting the name again) -- an ``ls``
    of 20,000 names took 3.7 s. It finds each by the name the directory stores, as listed: no
    walk per entry; a name removed since opendir is left out, and one another file was renamed
    over answers that file, as a lookup would."""
    async with in_process_ops(tmp_path) as (fs, ops):
        import pyfuse3

        await fs.mkdir("/a")
        await fs.mkdir("/a/d")
        for path in [f"/a/d/f{n}" for n in range(20)] + ["/a/other"]:
            async with fs.open(path, "w"):
                pass
        d, other = (await fs.stat("/a/d")).st_ino, (await fs.stat("/a/other")).st_ino
        fh = await ops.opendir(d, None)
        await fs.unlink("/a/d/f0")
        await fs.rename("/a/other", "/a/d/f1")
        walk, walks = fs._walk, []
        monkeypatch.setattr(fs, "_walk", lambda parts, path: walks.append(path) or walk(parts, path))
        listed: dict[bytes, int] = {}
        monkeypatch.setattr(pyfuse3, "readdir_reply",
                            lambda token, name, attrs, nxt: listed.__setitem__(name, attrs.st_ino) or True)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        assert sorted(listed) == sorted([b".", b".."] + [b"f%d" % n for n in range(1, 20)])
        assert listed[b"f1"] == other
        assert walks == ["/a"], walks  # the parent's, for ..


async def test_a_listing_read_before_a_key_came_shows_the_real_names_after_it(tmp_path, monkeypatch) -> None:
    """A listing opened while the directory was locked holds its no-key names. READDIRPLUS finds
    each entry by its stored name, so after the key was added it went on handing the kernel
    no-key entries (remembered as valid, though a lookup of such a name now finds nothing).
    Linux's next getdents after the key shows the real names: so does this one (re-read)."""
    async with in_process_ops(tmp_path) as (fs, ops):
        import pyfuse3

        monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda ino, name: None)
        monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino: None)
        kid = await fs.add_key(bytes(range(32)))
        await fs.mkdir("/enc")
        await fs.set_policy("/enc", kid)
        for name in ("a", "b"):
            await fs.mkdir(f"/enc/{name}")
        enc = (await fs.stat("/enc")).st_ino
        await fs.remove_key(kid)
        fh = await ops.opendir(enc, None)
        await fs.add_key(bytes(range(32)))
        ops.key_added(bytes.fromhex(kid))
        listed: list[bytes] = []
        monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attrs, nxt: listed.append(name) or True)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        assert sorted(listed) == [b".", b"..", b"a", b"b"], listed
        assert ops.kernel.names.get(enc, set()) <= {b"a", b"b"}


async def test_a_listing_whose_directory_a_key_removal_locks_mid_reply_goes_on_with_the_no_key_names(
        tmp_path, monkeypatch) -> None:
    """A hard removal lands while a READDIRPLUS waits on an entry's lookup: the listing's
    plaintext names are zeroed then (``Operations._view_changed``), so the reply is built again
    from the names the locked directory shows -- not from the zeroed buffers (a name of NULs:
    EIO), and not, as before, from the stale plaintext names, which find nothing any more and
    left the listing empty."""
    async with in_process_ops(tmp_path, key_removal="hard") as (fs, ops):
        import pyfuse3

        monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda ino, name: None)
        monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino: None)
        kid = await fs.add_key(bytes(range(32)))
        await fs.mkdir("/enc")
        await fs.set_policy("/enc", kid)
        for name in ("a", "b", "c"):
            await fs.mkdir(f"/enc/{name}")
        enc = (await fs.stat("/enc")).st_ino
        fh = await ops.opendir(enc, None)
        lookup = ops.lookup

        async def removal_during_the_first(parent: int, name: bytes) -> pyfuse3.EntryAttributes:
            attrs = await lookup(parent, name)
            if ops.lookup is not lookup:
                monkeypatch.setattr(ops, "lookup", lookup)
                await fs.remove_key(kid)
            return attrs
        monkeypatch.setattr(ops, "lookup", removal_during_the_first)
        listed: list[bytes] = []
        monkeypatch.setattr(pyfuse3, "readdir_reply", lambda token, name, attrs, nxt: listed.append(name) or True)
        await ops.readdir(fh, 0, None)
        assert listed[:2] == [b".", b".."] and len(listed) == 5 and not {b"a", b"b", b"c"} & set(listed), listed
        await ops.releasedir(fh)


def test_names_that_are_not_utf8_through_the_mount(env, image, mnt) -> None:
    """Linux names are bytes. The mount decoded each name strictly, so creating b'bad\\xff'
    failed and a directory holding one (made by mkfs --rootdir) could not be listed; now
    names go through as bytes, and a fresh mount sees them."""
    name = b"bad\xff\xfe"
    with Served(env, image, mnt):
        base = os.fsencode(mnt)
        os.mkdir(base + b"/d\xe9")
        with open(base + b"/d\xe9/" + name, "wb") as f:
            f.write(b"payload")
        assert os.listdir(base + b"/d\xe9") == [name]
        assert sorted(os.listdir(base)) == [b"d\xe9"]
    fsck_clean(env, image)

    async def oracle() -> None:
        async with mount(str(image), readonly=True) as fs:
            async with fs.open(os.fsdecode(b"/d\xe9/" + name)) as f:
                assert await f.read() == b"payload"
    asyncio.run(oracle())


def test_times_before_1970_are_kept_and_leave_the_filesystem_writable(env, image, mnt) -> None:
    """`tar xf` of an archive holding a file dated 1965 set its times to a negative second count:
    the inode item packed its seconds unsigned, so utimensat failed with EIO, the in-memory inode
    kept the refused times, and the next save of it (a write's fsync) aborted the transaction --
    read-only, and everything not yet committed lost. Linux and btrfs keep such times (signed)."""
    old = (-1_500_000_000, -152_150_400_000_000_000)  # 1969-12-31 23:59:58.5, 1965-03-05
    with Served(env, image, mnt):
        (mnt / "f").write_bytes(b"ancient\n")
        (mnt / "other").write_bytes(b"not yet committed\n")
        os.utime(mnt / "f", ns=old)
        with open(mnt / "f", "ab") as f:
            f.write(b"more\n")
            f.flush()
            os.fsync(f.fileno())
        assert os.stat(mnt / "f").st_atime_ns == old[0]  # the write moved mtime alone (noatime)
        os.utime(mnt / "f", ns=old)
    fsck_clean(env, image)

    async def oracle() -> None:
        async with mount(str(image), readonly=True) as fs:
            st = await fs.stat("/f")
            assert (st.st_atime_ns, st.st_mtime_ns) == old
            async with fs.open("/other") as f:
                assert await f.read() == b"not yet committed\n"
    asyncio.run(oracle())
