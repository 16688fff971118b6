"""What the kernel keeps of encrypted directories, and telling it to forget that when a key changes.

The kernel keeps each name -> inode entry the server answers for ``ATTR_TIMEOUT``, and a file's
pages until its next open. Removing a key in Linux evicts the inodes it locks (fscrypt's
``try_to_lock_encrypted_files``): their entries and pages go, so a plaintext name is looked up
again -- and not found, the directory holding no-key names now (ENOENT, not ENOKEY). Adding a key
back makes the no-key entries invalid (``fscrypt_d_revalidate``). Through FUSE the server has to
say so: it remembers the names of encrypted directories it hands the kernel (lookup, readdirplus,
create, mkdir, symlink, link, a rename's target) and, when a directory's names change, tells the
kernel to forget them (FUSE_NOTIFY_INVAL_ENTRY), and an inode that was locked, its attributes
and pages (FUSE_NOTIFY_INVAL_INODE). A zero entry timeout in encrypted directories would need no
bookkeeping, but made every path walk through one a request: 10,000 stats of 200 files took
2.4 s instead of 0.03 s.

The kernel takes such a notification only once the requests in flight on that directory are
answered (it takes the directory's lock), and pyfuse3's call blocks until then: so the
notifications go from a thread while the loop answers those requests. That same lock orders a
lookup the server answered before the change: its entry is in place before the notification
removes it. ``settled`` waits until all are sent: a key removal answers only then, so the next
command of a script finds ENOENT. A walk that passed the entry just before that still opens the
inode: ENOKEY, as a lookup racing the removal ioctl in Linux. After SIGTERM the loop answers no
request, so a notification may wait for ever: ``close`` says so, and ``serve`` aborts the connection.
"""
from __future__ import annotations

import asyncio
import errno
import sys

import pyfuse3

CLOSE_WAIT = 5.0  # seconds the unmount waits for notifications in flight (see ``close``)


class KernelCache:
    """Names handed to the kernel in encrypted directories (FUSE inode numbers), and the
    invalidations not yet sent."""

    def __init__(self) -> None:
        self.names: dict[int, set[bytes]] = {}
        self.stale: list[tuple[int, bytes | None]] = []  # (directory, name) entries; (inode, None) inodes
        self.sending: asyncio.Task[None] | None = None
        self.live = False  # a kernel mount to notify: set by ``serve`` once mounted, cleared before it closes

    def handed(self, parent: int, name: bytes) -> bool:
        """``name`` in ``parent`` may reach the kernel; True if it was not remembered yet."""
        names = self.names.setdefault(parent, set())
        new = name not in names
        names.add(name)
        return new

    def dropped(self, parent: int, name: bytes) -> None:
        """The kernel dropped the entry itself (unlink, rmdir, a rename's source), or never got it."""
        names = self.names.get(parent)
        if names is not None:
            names.discard(name)
            if not names:
                del self.names[parent]

    def forget(self, ino: int, is_dir: bool) -> None:
        """What the kernel keeps of ``ino`` is stale: its attributes and pages, and a directory's names."""
        names = self.names.pop(ino, ()) if is_dir else ()
        if not self.live:
            return
        self.stale += [(ino, name) for name in names]
        self.stale.append((ino, None))
        if self.sending is None:
            self.sending = asyncio.get_running_loop().create_task(self._send(), name="blockemu-fuse-invalidate")

    def key_added(self, directories: set[int]) -> None:
        """A key came back: the no-key names handed out in these directories are stale."""
        for ino in directories & self.names.keys():
            self.forget(ino, True)

    async def settled(self) -> None:
        """Every invalidation asked for so far has reached the kernel."""
        while self.sending is not None:
            await asyncio.shield(self.sending)

    async def close(self) -> bool:
        """The mount is going: send nothing more. A notification in flight is waited for, but not
        for ever -- one blocked on a request the stopped loop will never answer (a SIGTERM) would
        hold the unmount. False if one is still in flight: the caller aborts the connection."""
        self.live = False
        self.stale.clear()
        if self.sending is not None:
            await asyncio.wait([self.sending], timeout=CLOSE_WAIT)
        return self.sending is None

    async def _send(self) -> None:
        try:
            while self.stale and self.live:
                batch, self.stale = self.stale, []
                await asyncio.to_thread(_notify, batch)
        finally:
            self.sending = None


def _notify(batch: list[tuple[int, bytes | None]]) -> None:
    for ino, name in batch:
        try:
            if name is None:
                pyfuse3.invalidate_inode(ino)
            else:
                pyfuse3.invalidate_entry(ino, name)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel had forgotten it already
                print(f"blockemu: mount: invalidate inode {ino}: {e.strerror or e}", file=sys.stderr, flush=True)
