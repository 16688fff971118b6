"""The mount's private control channel: keys from outside, and ``umount``.

FUSE passes only fixed-size ioctls, so ``FS_IOC_ADD_ENCRYPTION_KEY`` cannot carry key bytes
through the mount (DESIGN: keys need another channel). The serving process listens on a Unix
socket named after the mount point, in a runtime directory only its owner can enter (0700; the
socket itself 0600), and also checks each peer's credentials (SO_PEERCRED): root or the
mounting user. One request per connection. The client sends one byte, the length of the raw
key that follows (0: none; ``key-add`` only sends one), the key's bytes, then a JSON line
``{"op": "key-add"|"key-remove"|"key-status"|"umount", ...}``; the server answers one JSON line
``{"ok": true, "text": ...}`` (a key request's result's fields beside its text: ``blockemu key
--json`` prints them) or ``{"ok": false, "errno": N, "message": ...}``.

While the request runs the server sends an empty line every ``HEARTBEAT`` seconds, and the
client gives up (ETIMEDOUT, naming the mount point) when ``TIMEOUT`` seconds pass with nothing
from the server: a stopped (SIGSTOP) or wedged server made ``blockemu umount`` and ``blockemu
key`` wait for ever, silently, while a long request (an umount writing back GBs, a key removal's
sync before its wipe) keeps its client waiting as long as it lives.

The key travels raw and first because every copy of it the server makes must be wiped when
the key is removed: it is read with ``recv_into`` straight into one ``bytearray`` -- no stream
buffer has read ahead, no line, JSON string or hex holds it -- handed to the request's handler
as ``request["key"]``, and wiped once the handler returns (the keyring keeps its own copy).
A key once sent as hex in the JSON line stayed in the server's memory after ``key remove``.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import struct
import sys
from typing import Any, Awaitable, Callable

from blockemu.errors import BlockemuError

# a request (its line's fields, and "key": the bytearray sent before it, wiped after) -> its
# reply's "text" and fields
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 1 << 16  # a request line longer than this is refused (EINVAL)
HEARTBEAT = 2.0  # seconds between the empty lines that say a running request's server lives
TIMEOUT = 30.0  # seconds of silence after which a client gives the server up: many heartbeats


def runtime_dir() -> str:
    """/run/blockemu for root, $XDG_RUNTIME_DIR/blockemu otherwise; BLOCKEMU_RUNTIME_DIR overrides."""
    if os.environ.get("BLOCKEMU_RUNTIME_DIR"):
        return os.environ["BLOCKEMU_RUNTIME_DIR"]
    if os.geteuid() == 0:
        return "/run/blockemu"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/blockemu-{os.getuid()}", "blockemu")


def socket_path(mountpoint: str) -> str:
    """The socket of the mount at ``mountpoint`` (its real path hashed: a path can be longer
    than a socket address allows)."""
    digest = hashlib.sha256(_real_mountpoint(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(runtime_dir(), f"{digest}.sock")


def _real_mountpoint(mountpoint: str, links: int = 40) -> str:
    """``os.path.realpath(mountpoint)`` without a stat of the mount point itself: that is a FUSE
    GETATTR to the server, and a stopped server left ``blockemu umount`` in it, uninterruptible,
    before any timeout could start. ``readlink`` of it asks the server nothing."""
    path = os.path.abspath(mountpoint)
    try:
        target = os.readlink(path)
    except OSError:  # EINVAL: not a symbolic link (a directory, the mount's root); or not there
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if not links:
        raise OSError(errno.ELOOP, f"{mountpoint}: too many levels of symbolic links")
    return _real_mountpoint(os.path.join(os.path.dirname(path), target), links - 1)


def log_path(mountpoint: str) -> str:
    """Where a backgrounded server's stderr goes: what made a request fail with EIO."""
    return socket_path(mountpoint)[: -len(".sock")] + ".log"


def private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(errno.EACCES, f"{path}: runtime directory must be private to uid {os.geteuid()}")


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _recv_exactly(sock: socket.socket, buf: bytearray) -> None:
    """Fill ``buf`` from ``sock`` with ``recv_into``: the bytes land in it and nowhere else."""
    loop, view, got = asyncio.get_running_loop(), memoryview(buf), 0
    while got < len(buf):
        n = await loop.sock_recv_into(sock, view[got:])
        if not n:
            raise ValueError(f"the request ended after {got} of its {len(buf)} bytes of key")
        got += n


async def _recv_line(sock: socket.socket) -> bytes:
    """The request's JSON line: the last thing the client sends before it waits for the reply."""
    loop, line = asyncio.get_running_loop(), b""
    while not line.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, MAX_LINE)
        if not chunk:
            raise ValueError("the request ended before its line did")
        line += chunk
        if len(line) > MAX_LINE:
            raise ValueError(f"request line longer than {MAX_LINE} bytes")
    return line


async def _heartbeating(conn: socket.socket, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """``work``'s result, sending the client an empty line every ``HEARTBEAT`` seconds until it
    comes: the client's timeout then measures the server's silence, not the request's length. A
    client gone away stops the heartbeats, never the work (an umount under way finishes)."""
    loop, task, listening = asyncio.get_running_loop(), asyncio.ensure_future(work), True
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=HEARTBEAT)
            if listening and not task.done():
                try:
                    await loop.sock_sendall(conn, b"\n")
                except OSError:
                    listening = False
    except asyncio.CancelledError:
        task.cancel()
        raise
    return task.result()


class ControlServer:
    """The socket's listener. It uses raw sockets and the loop's socket calls, not asyncio
    streams: a stream reads ahead into buffers of its own, where a key would stay (see above)."""

    def __init__(self, mountpoint: str, handler: Handler) -> None:
        self.path = socket_path(mountpoint)
        self.handler = handler
        self.listener: socket.socket | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        private_dir(os.path.dirname(self.path))
        if os.path.exists(self.path):
            os.unlink(self.path)  # a killed server's; the mount point was checked free before
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(self.path)
            listener.listen()
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old)
        listener.setblocking(False)
        self.listener = listener
        self._listen()

    def _listen(self) -> None:
        if self.listener is not None:  # not closed meanwhile
            asyncio.get_running_loop().add_reader(self.listener, self._accept)

    def _accept(self) -> None:
        """The listener is readable: serve each waiting connection in its own task."""
        assert self.listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none left (the reader calls again when one comes)
            except OSError as e:
                # out of descriptors or memory: the listener stays readable, so rather than
                # spin, try again in a second (as asyncio's own servers do)
                print(f"blockemu: control socket {self.path}: accept failed: {e}", file=sys.stderr, flush=True)
                loop.remove_reader(self.listener)
                loop.call_later(1.0, self._listen)
                return
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        # imported here: a client (``blockemu umount``) need not load the cipher library
        from blockemu.crypto.fscrypt import MAX_KEY_SIZE, wipe

        loop = asyncio.get_running_loop()
        key = bytearray()
        with conn:
            try:
                if _peer_uid(conn) not in (0, os.geteuid()):
                    reply = {"ok": False, "errno": errno.EPERM, "message": "permission denied"}
                else:
                    try:
                        size = bytearray(1)
                        await _recv_exactly(conn, size)
                        if size[0] > MAX_KEY_SIZE:  # a JSON line's "{": a blockemu from before the key went raw
                            raise ValueError(f"a key of {size[0]} bytes (the most is {MAX_KEY_SIZE})")
                        key = bytearray(size[0])
                        await _recv_exactly(conn, key)
                        request = json.loads(await _recv_line(conn))
                        request["key"] = key  # never a key from the line: one there would stay
                        reply = {"ok": True, **await _heartbeating(conn, self.handler(request))}
                    except OSError as e:
                        reply = {"ok": False, "errno": e.errno, "message": str(e) if e.strerror is None else e.strerror}
                    except (ValueError, KeyError, TypeError) as e:
                        reply = {"ok": False, "errno": errno.EINVAL, "message": f"bad request: {e}"}
                await loop.sock_sendall(conn, json.dumps(reply).encode() + b"\n")
            except (ConnectionError, OSError):
                pass  # the client went away: nothing to tell it
            finally:
                wipe(key)  # the keyring holds its own copy, wiped when the key is removed

    def close(self) -> None:
        """Stop accepting; requests already taken (an ``umount`` waiting for the unmount) finish."""
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def drain(self, timeout: float = 10.0) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


def _silent(mountpoint: str) -> TimeoutError:
    return TimeoutError(
        errno.ETIMEDOUT,
        f"{mountpoint}: the mount's server does not answer (stopped, wedged or too busy): nothing from it in "
        f"{TIMEOUT:g} s (it may still carry the request out if it resumes)",
    )


class NotServed(BlockemuError):
    """No blockemu server listens for this mount point (never mounted, unmounted, or killed)."""

    code = errno.ENOTCONN


def request(mountpoint: str, op: str, key: bytearray | None = None, **args: Any) -> dict[str, Any]:
    """Send one request to the mount at ``mountpoint``, with ``key`` raw before its line (the
    caller wipes it); its reply (``text`` and the result's fields), or its error as an OSError:
    TimeoutError (ETIMEDOUT) when the server says nothing, not even a heartbeat, for ``TIMEOUT``
    seconds."""
    key = key if key is not None else bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)  # each connect, send and recv: a stopped server accepts nothing
        try:
            s.connect(socket_path(mountpoint))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotServed(f"{mountpoint}: not a blockemu mount point (no blockemu server for it)") from None
        except TimeoutError:
            raise _silent(mountpoint) from None
        buf = b""
        try:
            s.sendall(bytes([len(key)]))
            s.sendall(key)  # from the caller's buffer: no copy to wipe
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, f"{mountpoint}: the mount's process closed the channel")
                buf = (buf + chunk).lstrip(b"\n")  # heartbeats come only before the reply
        except TimeoutError:
            raise _silent(mountpoint) from None
    reply = json.loads(buf)
    if not reply.pop("ok"):
        raise OSError(reply["errno"], reply["message"])
    return reply
