"""Serving a mount: check the mount point, open the image, mount, answer FUSE and control
requests until unmounted or signalled, then flush, commit and release the image lock.

``run`` backgrounds like other FUSE filesystems: the command forks twice and its first
process exits only once the mount works (0) or with the serving process's one-line error,
so ``blockemu mount ... && cp ...`` never races the mount.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Callable

from blockemu.crypto import fscrypt
from blockemu.crypto.keyring import parse_identifier
from blockemu.errors import Busy, NotADirectory, NotFoundError, NotPermitted
from blockemu.fs.filesystem import Filesystem
from blockemu.fuse import control

FSTYPE = "fuse.blockemu"


FUSE_CONF = "/etc/fuse.conf"


class NoFuse(OSError):
    """This system cannot serve a FUSE mount (no binding, no /dev/fuse)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ENODEV, why)

    def __str__(self) -> str:
        return str(self.strerror)


def check_fuse() -> None:
    """Fail at once, in one line, where FUSE cannot work; nothing is forked or opened yet."""
    try:
        import pyfuse3  # noqa: F401
        import pyfuse3.asyncio  # noqa: F401
    except ImportError as e:
        raise NoFuse(f"FUSE support is not installed ({e}): pip install 'blockemu[fuse]' "
                     "(needs the OS packages fuse3 libfuse3-dev pkg-config and a C compiler)") from None
    if not os.path.exists("/dev/fuse"):
        raise NoFuse("/dev/fuse is missing: this kernel or container has no FUSE (modprobe fuse)")


def check_allow_other(conf: str = FUSE_CONF) -> None:
    """``-o allow_other`` by a user other than root needs ``user_allow_other`` on a line of
    its own in /etc/fuse.conf, or fusermount3 refuses it -- and that reached the user as a bare
    "FUSE mount failed". Said in one line, naming the file, before anything is forked."""
    if os.geteuid() == 0:
        return
    try:
        with open(conf) as f:
            if any(line.strip() == "user_allow_other" for line in f):
                return
    except OSError:
        pass
    raise NotPermitted(f"-o allow_other by a user other than root needs a line 'user_allow_other' "
                       f"in {conf} (fusermount3 refuses it otherwise)")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounted(mountpoint: str) -> tuple[str, int] | None:
    """The filesystem type mounted at ``mountpoint`` and its device's minor number, from
    /proc/self/mountinfo, which no FUSE request answers (os.path.ismount says False on a dead
    FUSE mount: stat fails with ENOTCONN). It names the real path: the parent's symlinks are
    resolved, not the mount point's own -- stat-ing it is a request to its server, which one
    not serving yet (``connection``, right after the mount) would never answer."""
    parent, name = os.path.split(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(parent), name)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if _unescape(fields[4]) == target:  # the last mount on a point is the one that shows
                found = right.split()[0], int(fields[2].partition(":")[2])
    return found


def mounted_fstype(mountpoint: str) -> str | None:
    """The filesystem type mounted at ``mountpoint``, None if nothing is."""
    found = _mounted(mountpoint)
    return None if found is None else found[0]


FUSECTL = "/sys/fs/fuse/connections"


def connection(mountpoint: str) -> int | None:
    """The FUSE connection serving the blockemu mount at ``mountpoint`` (None: there is none):
    its directory under fusectl is named by the mount's device minor."""
    found = _mounted(mountpoint)
    return found[1] if found is not None and found[0] == FSTYPE else None


def abort_connection(number: int) -> None:
    """End every request of FUSE connection ``number`` (fusectl's abort, as the kernel does when
    the server's /dev/fuse closes): what waits on the kernel for those requests -- a notification
    waiting for a directory a lookup holds -- goes on. fusectl is mounted first where it is not
    (root only; systemd mounts it on most systems)."""
    if not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    with open(f"{FUSECTL}/{number}/abort", "w") as f:
        f.write("1")


def is_dead(mountpoint: str) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def unmount_command(mountpoint: str, *, lazy: bool) -> list[str]:
    """fusermount3 (which unprivileged users may run), umount(8) where it is missing."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        return [tool, "-u", *(["-z"] if lazy else []), mountpoint]
    return ["umount", *(["-l"] if lazy else []), mountpoint]


def clear_dead_mount(mountpoint: str) -> bool:
    """A killed server leaves "Transport endpoint is not connected": detach it. True if it did.
    Its socket goes too, and its log if that is empty (a kill -9 leaves no last words): both
    stayed in the runtime directory, an empty log where a log left there should say something."""
    if mounted_fstype(mountpoint) is None or not is_dead(mountpoint):
        return False
    cmd = unmount_command(mountpoint, lazy=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise Busy(f"{mountpoint}: a dead mount is in the way and {' '.join(cmd)} failed: {done.stderr.strip()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control.socket_path(mountpoint))
    drop_quiet_log(control.log_path(mountpoint))
    return True


def check_mountpoint(mountpoint: str) -> None:
    clear_dead_mount(mountpoint)
    if not os.path.exists(mountpoint):
        raise NotFoundError(f"{mountpoint}: mount point does not exist")
    if not os.path.isdir(mountpoint):
        raise NotADirectory(f"{mountpoint}: mount point is not a directory")
    fstype = mounted_fstype(mountpoint)
    if fstype is not None:
        hint = f" (blockemu umount {mountpoint})" if fstype == FSTYPE else ""
        raise Busy(f"{mountpoint}: mount point is busy: {fstype} is mounted there{hint}")


class Server:
    """One mount: the filesystem, its FUSE operations and its control channel."""

    def __init__(self, fs: Filesystem, mountpoint: str) -> None:
        from blockemu.fuse.ops import Operations

        self.fs = fs
        self.mountpoint = mountpoint
        self.ops = Operations(fs)
        self.control = control.ControlServer(mountpoint, self.handle)
        self.unmounted = asyncio.Event()
        self.unmount_error: OSError | None = None  # the image's last flush or commit failed

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op in ("key-remove", "key-status"):
            # "files still busy" (a status's "Incompletely removed") only for files open now: the
            # kernel sends a release after close(2) has returned, so hear every release of a file
            # closed before this request -- the last one's completes a removal busy files held back
            await self.ops.releases.settle(self.mountpoint)
        if op in KEY_OPS:
            reply = await answer_key(self.fs, req)
            if op == "key-add":
                self.ops.key_added(bytes.fromhex(reply["identifier"]))
            # answered once the kernel forgot the names the change made stale: a script's next
            # command must not reach a plaintext name of a directory the removal locked
            await self.ops.kernel.settled()
            return reply
        if op == "umount":
            # the kernel's unmount, not a lazy one: it alone knows whether a process still uses
            # the mount (an open file, a cwd; a close's release reaches us only later). It runs
            # beside the loop, which answers the requests the unmount sends meanwhile -- once no
            # key removal's barrier has the root open (the server's own use of it was "busy")
            async with self.ops.releases.quiet():
                proc = await asyncio.create_subprocess_exec(*unmount_command(self.mountpoint, lazy=False),
                                                            stdout=asyncio.subprocess.DEVNULL,
                                                            stderr=asyncio.subprocess.PIPE)
                _, err = await proc.communicate()
            if proc.returncode:
                why = err.decode(errors="replace").strip()
                if "busy" in why.lower():
                    raise Busy(f"{self.mountpoint}: target is busy")
                raise OSError(errno.EIO, f"{self.mountpoint}: unmount failed: {why}")
            await self.unmounted.wait()  # main() returns, then the image is flushed, committed, unlocked
            if (e := self.unmount_error) is not None:
                # the mount is gone either way: say so, and name the image whose write failed
                # (a bare "No space left on device" left the user asking what was full, and
                # whether the mount was still there)
                why = f"{e.filename}: {e.strerror}" if e.filename else str(e) if e.strerror is None else e.strerror
                raise OSError(e.errno, f"{self.mountpoint}: unmounted, but its last flush or commit failed "
                                       f"(what was fsynced before it stays): {why}")
            return {"text": f"unmounted {self.mountpoint}"}
        raise ValueError(f"unknown op {op!r}")


KEY_OPS = ("key-add", "key-remove", "key-status")


async def answer_key(fs: Filesystem, req: dict[str, Any]) -> dict[str, Any]:
    """A ``blockemu key`` request: xfs_io's line, and beside it the result's fields, which
    ``--json`` prints (the API's ``add_key``, ``RemovalResult``, ``KeyStatus``)."""
    op, user = req["op"], int(req.get("user", 0))
    if op == "key-add":
        kid = await fs.add_key(req["key"], user=user)  # the raw key the channel wipes once this returns
        in_use = await fs.key_in_use(kid)
        return {"text": f"Added encryption key with identifier {kid}", "identifier": kid, "in_use": in_use,
                **({} if in_use else {"note": unused_key(kid, "the mounted image")})}
    if op == "key-remove":
        removed = await fs.remove_key(req["id"], user=user, all_users=bool(req.get("all_users")))
        return {"text": str(removed), **dataclasses.asdict(removed)}
    status = fs.key_status(req["id"], user=user)
    return {"text": str(status), "identifier": parse_identifier(req["id"]).hex(), "state": status.state.value,
            "user_count": status.user_count, "added_by_self": status.added_by_self}


def unused_key(kid: str, image: str) -> str:
    """What adding a key no encryption policy uses is told (fscrypt allows it: the identifier comes
    from the key alone): a wrong ``--key-file`` mounted with every encrypted directory locked, silently."""
    return f"key {kid} unlocks nothing: no encrypted directory on {image} uses it (added all the same)"


def abort_stuck(number: int | None) -> None:
    """A notification still waits on a request the stopped loop will never answer (a lookup in
    the directory it names, after SIGTERM): the connection would live on in that wait after the
    unmount, and the exit wait for the notifying thread for ever. Abort the connection: the
    request fails (ECONNABORTED), the notification returns."""
    try:
        if number is None:
            raise NotFoundError("the mount was not found in /proc/self/mountinfo")
        abort_connection(number)
    except OSError as e:
        print(f"blockemu: mount: a notification to the kernel waits on a request this server will not "
              f"answer, and aborting its FUSE connection failed ({e.strerror or e}): "
              f"echo 1 > {FUSECTL}/{'N' if number is None else number}/abort ends it", file=sys.stderr, flush=True)


async def serve(image: str, mountpoint: str, *, keys: list[bytearray], readonly: bool, ready: Callable[[], None],
                allow_other: bool = False, **mount_opts: Any) -> None:
    """Mount ``image`` at ``mountpoint`` and serve until unmounted, SIGINT or SIGTERM.
    ``allow_other``: other users than the mounting one get in too (FUSE lets in only its owner
    otherwise: EACCES whatever the modes), checked against the file modes by the kernel, as
    for any local filesystem (``default_permissions``, always on)."""
    import pyfuse3
    import pyfuse3.asyncio

    check_mountpoint(mountpoint)
    fs = await Filesystem.mount(image, readonly=readonly, **mount_opts)
    server = None
    try:
        try:
            for raw in keys:
                kid = await fs.add_key(raw)
                if not await fs.key_in_use(kid):
                    print(f"blockemu: mount: {unused_key(kid, image)}", file=sys.stderr, flush=True)
        finally:
            for raw in keys:
                fscrypt.wipe(raw)  # the keyring holds its own copy, wiped when the key is removed
        server = Server(fs, mountpoint)
        pyfuse3.asyncio.enable()
        # noatime: no read updates atime (Filesystem has no such path), so the mount says it
        # rather than the kernel's default relatime, which find -atime and mail tools would trust
        options = {"subtype=blockemu", "default_permissions", "noatime",
                   f"fsname={image}" if "," not in image else "fsname=blockemu"}
        if readonly:
            options.add("ro")
        if allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(server.ops, mountpoint, options)
        except RuntimeError as e:
            raise OSError(errno.EIO, f"{mountpoint}: FUSE mount failed: {e}") from None
        server.ops.kernel.live = True
        number = connection(mountpoint)
        try:
            await server.control.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, pyfuse3.terminate)
            ready()
            await pyfuse3.main()
        finally:
            server.control.close()
            server.ops.releases.close()  # no request is read any more: a barrier would never pass
            sent = await server.ops.kernel.close()  # nothing is sent to a session being closed
            if not sent:  # aborted while the session is open: the connection is surely this mount's
                abort_stuck(number)
                # the notifications it let go on end before the session goes: one running into
                # pyfuse3.close used the session as it was freed
                await server.ops.kernel.close()
            pyfuse3.close(unmount=True)
            if not sent:  # libfuse unmounts no aborted connection: its dead mount is detached here
                clear_dead_mount(mountpoint)
    finally:
        try:
            await fs.unmount()
        except OSError as e:
            if server is not None:
                server.unmount_error = e
            raise
        finally:
            if server is not None:  # a waiting `blockemu umount` hears how it went
                server.unmounted.set()
                await server.control.drain()


def run(image: str, mountpoint: str, *, foreground: bool, **kw: Any) -> int:
    """Serve in this process (``foreground``), or fork a daemon and return once it is mounted."""
    check_fuse()
    if kw.get("allow_other"):
        check_allow_other()
    image, mountpoint = os.path.abspath(image), os.path.abspath(mountpoint)
    if foreground:
        def ready() -> None:  # what a script waits for before it uses the mount point
            print(f"blockemu: mounted {image} on {mountpoint} (pid {os.getpid()})", flush=True)

        asyncio.run(serve(image, mountpoint, ready=ready, **kw))
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            status = pipe.read().decode(errors="replace")
        os.waitpid(pid, 0)
        if status.startswith("ok"):
            return 0
        code, _, why = status.partition(" ")
        raise OSError(int(code) if code.isdigit() else errno.EIO, why.strip() or "the mount's process died before mounting")
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)
    _daemon(image, mountpoint, w, kw)


def drop_quiet_log(path: str) -> None:
    """After a clean unmount, a log with nothing in it goes: one was left per mount point ever
    mounted. One that holds anything -- why a request failed with EIO, a traceback, an earlier
    server's lines (each mount of a mount point appends to its one log) -- stays to be read."""
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _daemon(image: str, mountpoint: str, w: int, kw: dict[str, Any]) -> None:
    """The serving process: tell the first process how mounting went, then detach from its terminal."""
    os.chdir("/")
    # resolved now: once mounted, a stat of the mount point from this process would wait on
    # requests that only this process, then blocked in that stat, can answer
    log_path = control.log_path(mountpoint)

    def ready() -> None:
        os.write(w, b"ok\n")
        os.close(w)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        for fd in (1, 2):
            os.dup2(log, fd)
        os.close(null)
        os.close(log)

    code = 0
    try:
        asyncio.run(serve(image, mountpoint, ready=ready, **kw))
        sys.stdout.flush()
        sys.stderr.flush()
        drop_quiet_log(log_path)
    except BaseException as e:  # noqa: BLE001 -- whatever it is, the first process must hear of it
        code = 1
        try:
            err = getattr(e, "errno", None) or errno.EIO
            if isinstance(e, OSError) and e.strerror:
                why = e.strerror + (f": {e.filename}" if e.filename else "")
            else:
                why = str(e) or type(e).__name__
            os.write(w, f"{err} {why}\n".encode())
        except OSError:
            pass  # already mounted and detached: nobody to tell
    finally:
        sys.stdout.flush()
        os._exit(code)
