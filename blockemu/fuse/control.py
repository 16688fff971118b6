"""The mount's private control channel: keys from outside, and ``umount``.

FUSE passes only fixed-size ioctls, so ``FS_IOC_ADD_ENCRYPTION_KEY`` cannot carry key bytes
through the mount (DESIGN: keys need another channel). The serving process listens on a Unix
socket named after the mount point, in a runtime directory only its owner can enter (0700; the
socket itself 0600), and also checks each peer's credentials (SO_PEERCRED): root or the
mounting user. One request per connection, a JSON line each way:
``{"op": "key-add"|"key-remove"|"key-status"|"umount", ...}`` -> ``{"ok": true, "text": ...}``
(a key request's result's fields beside its text: ``blockemu key --json`` prints them) or
``{"ok": false, "errno": N, "message": ...}``.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import struct
from typing import Any, Awaitable, Callable

from blockemu.errors import BlockemuError

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]  # a request -> its reply's "text" and fields


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
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(runtime_dir(), f"{digest}.sock")


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


class ControlServer:
    def __init__(self, mountpoint: str, handler: Handler) -> None:
        self.path = socket_path(mountpoint)
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        private_dir(os.path.dirname(self.path))
        if os.path.exists(self.path):
            os.unlink(self.path)  # a killed server's; the mount point was checked free before
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            uid = _peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, os.geteuid()):
                reply = {"ok": False, "errno": errno.EPERM, "message": "permission denied"}
            else:
                try:
                    request = json.loads(await reader.readline())
                    reply = {"ok": True, **await self.handler(request)}
                except OSError as e:
                    reply = {"ok": False, "errno": e.errno, "message": str(e) if e.strerror is None else e.strerror}
                except (ValueError, KeyError, TypeError) as e:
                    reply = {"ok": False, "errno": errno.EINVAL, "message": f"bad request: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away: nothing to tell it
        finally:
            writer.close()
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop accepting; requests already taken (an ``umount`` waiting for the unmount) finish."""
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def drain(self, timeout: float = 10.0) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


class NotServed(BlockemuError):
    """No blockemu server listens for this mount point (never mounted, unmounted, or killed)."""

    code = errno.ENOTCONN


def request(mountpoint: str, op: str, **args: Any) -> dict[str, Any]:
    """Send one request to the mount at ``mountpoint``; its reply (``text`` and the result's
    fields), or its error as an OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(socket_path(mountpoint))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotServed(f"{mountpoint}: not a blockemu mount point (no blockemu server for it)") from None
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, f"{mountpoint}: the mount's process closed the channel")
            buf += chunk
    reply = json.loads(buf)
    if not reply.pop("ok"):
        raise OSError(reply["errno"], reply["message"])
    return reply
