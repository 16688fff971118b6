"""FUSE requests -> ``Filesystem`` calls (pyfuse3's low-level, inode-numbered interface).

The kernel names inodes; the filesystem's namespace calls take paths, so a request on a
directory reaches them through ``fs.path_of`` (the inode's back references). Open files are
``File`` handles: they hold their inode, so an unlinked-but-open file keeps working and a
file opened before a soft key removal keeps its key lease, exactly as through the Python API.

Every ``OSError`` becomes a ``FUSEError`` with its errno (ENOKEY reaches the process as
"Required key not available"). What is not implemented fails cleanly:
extended attributes (and FLUSH, which has nothing to do) answer ENOSYS, which the kernel remembers and turns into EOPNOTSUPP for
every later call without asking again (an EOPNOTSUPP answer would make it ask on every
write, for security.capability); mknod of anything but a regular file answers EPERM (the
format holds no device nodes, fifos or sockets); rename flags other than RENAME_NOREPLACE
answer EINVAL.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import stat as st
import sys
import traceback
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pyfuse3

from blockemu.crypto.fscrypt import wipe
from blockemu.crypto.xts import zero_bytes
from blockemu.fs.filesystem import ROOT_INO, File, Filesystem, Inode, Stat, dropped_on_failure
from blockemu.fuse.kernelcache import KernelCache
from blockemu.fuse.releases import Releases

BLOCK = 4096
ATTR_TIMEOUT = 1.0  # the mount has the image's writer lock: nothing else changes what we answered
T = TypeVar("T")
NOT_REMEMBERED = contextlib.nullcontext()  # a plain directory's names: no key changes them (Operations._naming)


def fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An OSError leaves as its errno; a bug is printed and leaves as EIO, never killing the loop.
    An I/O error or corruption (EIO, EUCLEAN) is said in one line on stderr (the server's log)
    too: the caller gets a bare errno, and only the server knows which sector failed and why."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> T:
        try:
            return await fn(*args, **kw)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if e.errno in (errno.EIO, errno.EUCLEAN) or not e.errno:
                print(f"blockemu: mount: {fn.__name__}: {e.strerror or e}", file=sys.stderr, flush=True)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except UnicodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except Exception:
            traceback.print_exc(file=sys.stderr)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def by_path(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Requests that turn inode numbers into paths and then wait (for the running commit, in
    ``vol.join``) before the filesystem resolves them run one at a time: otherwise a rename
    landing in that wait would leave the path naming another directory, or nothing."""
    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args: Any, **kw: Any) -> T:
        async with self.names:
            return await fn(self, *args, **kw)
    return wrapper


def to_fs(ino: int) -> int:
    return ROOT_INO if ino == pyfuse3.ROOT_INODE else ino


def to_fuse(ino: int) -> int:
    return pyfuse3.ROOT_INODE if ino == ROOT_INO else ino


def entry(s: Stat) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = to_fuse(s.st_ino)
    e.generation = 0
    e.entry_timeout = e.attr_timeout = ATTR_TIMEOUT
    e.st_mode, e.st_nlink, e.st_uid, e.st_gid = s.st_mode, s.st_nlink, s.st_uid, s.st_gid
    e.st_rdev = 0
    e.st_size, e.st_blksize, e.st_blocks = s.st_size, BLOCK, s.st_blocks
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = s.st_atime_ns, s.st_mtime_ns, s.st_ctime_ns
    return e


def child(parent: str, name: bytes) -> str:
    return parent.rstrip("/") + "/" + name.decode(errors="surrogateescape")


Listed = tuple[bytearray, bytes]  # a listing's entry: its name, and what the directory stores for it (b"": . and ..)


def forget_listing(names: list[Listed] | None) -> None:
    """Zero an open directory's snapshot of names (plaintext, in an encrypted directory)."""
    for name, _ in names or ():
        wipe(name)


def open_mode(flags: int) -> str:
    """The access mode; the kernel gives every write its offset (O_APPEND included)."""
    return "r" if flags & os.O_ACCMODE == os.O_RDONLY else "r+"


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False  # write-through: a write() reaches the page cache it judges at once

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.files: dict[int, File] = {}
        self.dirs: dict[int, tuple[int, list[Listed] | None]] = {}  # open listings; None: re-read (_view_changed)
        self.dir_errors: dict[int, int] = {}  # an open directory's first unreadable entry's errno (readdir)
        self.next_fh = 1
        self.names = asyncio.Lock()  # see by_path
        self.kernel = KernelCache()  # names handed out in encrypted directories, forgotten on a key change
        self.releases = Releases()  # what a key removal waits for before it judges "busy"
        fs.on_view_change.append(self._view_changed)

    def _fh(self) -> int:
        self.next_fh += 1
        return self.next_fh

    def _path(self, ino: int) -> str:
        return self.fs.path_of(to_fs(ino))

    def _inode(self, ino: int) -> Inode:
        return self.fs.inode(to_fs(ino))

    def _dir(self, ino: int) -> tuple[Inode, str]:
        """A directory the kernel names, and a path to it. ``path_of`` checked the mount, and the
        inode is cached (loaded when it was handed out): a dict lookup, on every lookup's path."""
        ino = to_fs(ino)
        path = self.fs.path_of(ino)
        return self.fs.inodes.get(ino) or self.fs.inode(ino), path

    async def _entry_at(self, path: str) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.stat(path))

    def _view_changed(self, inode: Inode) -> None:
        """A key change made what the kernel keeps of ``inode`` stale (``Filesystem.on_view_change``).
        A directory's open listings hold the names it showed: zeroed now -- a listing open across
        a key removal kept its plaintext names after the key was Absent (Linux would call the
        directory busy; here it is not) -- and read again by the next ``readdir``."""
        self.kernel.forget(to_fuse(inode.ino), inode.is_dir)
        if inode.is_dir:
            self._relist({to_fuse(inode.ino)})

    def _relist(self, inos: set[int]) -> None:
        """The open listings of directories ``inos`` show names that are stale now: zeroed, and
        read again by the next ``readdir``."""
        for fh, (listed, names) in list(self.dirs.items()):
            if listed in inos:
                self.dirs[fh] = (listed, None)
                forget_listing(names)

    def key_added(self, key_id: bytes) -> None:
        """The no-key names of this key's directories are stale now: those the kernel keeps, and
        those an open listing holds -- READDIRPLUS finds each entry by its stored name, so a listing
        read before the key came went on handing the kernel no-key entries (valid dentries, while a
        lookup of that name now finds nothing) where Linux's next getdents shows the real names."""
        dirs = {to_fuse(i.ino) for i in list(self.fs.inodes.values()) if i.key_id == key_id and i.is_dir}
        self.kernel.key_added(dirs)
        self._relist(dirs)

    def _naming(self, parent: Inode, name: bytes) -> contextlib.AbstractContextManager[None]:
        """A request that may hand the kernel an entry for ``name`` in ``parent``: in an encrypted
        directory the name is remembered (``KernelCache``) before the answer is made -- a key
        change while it waits then forgets it too -- and let go if the request fails."""
        return NOT_REMEMBERED if parent.key_id is None else self._remembering(to_fuse(parent.ino), name)

    @contextlib.contextmanager
    def _remembering(self, ino: int, name: bytes) -> Iterator[None]:
        new = self.kernel.handed(ino, name)
        try:
            yield
        except BaseException:
            if new:
                self.kernel.dropped(ino, name)
            raise

    def _unnamed(self, parent_inode: int, name: bytes) -> None:
        """The kernel dropped the entry itself (unlink, rmdir, a rename's source)."""
        if parent_inode in self.kernel.names:  # a plain directory's never is: no call
            self.kernel.dropped(parent_inode, name)

    # ------------------------------------------------------------------ names

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        """A name that is not there is answered as a negative entry the kernel keeps for
        ``ATTR_TIMEOUT`` (an ENOENT answer is not kept): probes of a missing name (a shell's
        PATH search, a build's or git's stat of files not there) cost one request, not one
        each (100 stats: 1 lookup instead of 100). The kernel still asks for a rename's target
        and an O_EXCL create's name every time (LOOKUP_RENAME_TARGET, LOOKUP_EXCL). Not in an
        encrypted directory: adding its key (on the control socket, unseen by the kernel)
        makes names appear there."""
        if name == b".":
            return entry(self.fs.stat_inode(self._inode(parent_inode)))
        if name == b"..":
            path = self._path(parent_inode)
            return await self._entry_at(path.rsplit("/", 1)[0] or "/")
        ino = to_fs(parent_inode)  # _dir inline: this is the hot path, a plain directory's lookup costs as before
        path = child(self.fs.path_of(ino), name)
        if (self.fs.inodes.get(ino) or self.fs.inode(ino)).key_id is not None:
            with self._remembering(parent_inode, name):
                return await self._entry_at(path)
        try:
            return await self._entry_at(path)
        except FileNotFoundError:
            missing = pyfuse3.EntryAttributes()
            missing.st_ino, missing.entry_timeout = 0, ATTR_TIMEOUT
            return missing

    @fuse_errors
    async def forget(self, inode_list: Any) -> None:
        """Inodes stay cached by the filesystem itself; nothing is held per lookup here."""

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry(self.fs.stat_inode(self._inode(inode)))

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.files[fh].inode if fh in self.files else self._inode(inode)
        if fields.update_size:
            await self.fs.truncate_inode(node, attr.st_size)
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime or fields.update_mtime:
            await self.fs.set_attrs(
                node,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            )
        return entry(self.fs.stat_inode(node))

    @fuse_errors
    @by_path
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        d, path = self._dir(parent_inode)
        path = child(path, name)
        with self._naming(d, name):
            await self.fs.mkdir(path, mode & 0o7777, uid=ctx.uid, gid=ctx.gid)
            return await self._entry_at(path)

    @fuse_errors
    @by_path
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(child(self._path(parent_inode), name))
        self._unnamed(parent_inode, name)

    @fuse_errors
    @by_path
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(child(self._path(parent_inode), name))
        self._unnamed(parent_inode, name)

    @fuse_errors
    @by_path
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT: not implemented
        src = child(self._path(parent_inode_old), name_old)
        d, dst = self._dir(parent_inode_new)
        dst = child(dst, name_new)
        if flags & pyfuse3.RENAME_NOREPLACE and await self.fs.exists(dst):
            raise pyfuse3.FUSEError(errno.EEXIST)
        with self._naming(d, name_new):  # the kernel moves the source's entry to this name
            await self.fs.rename(src, dst)
        self._unnamed(parent_inode_old, name_old)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        if not st.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # devices, fifos, sockets: not in the format
        fi, attrs = await self.create(parent_inode, name, mode, os.O_RDONLY, ctx)
        await self.release(fi.fh)
        return attrs

    @fuse_errors
    @by_path
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        d, path = self._dir(new_parent_inode)
        with self._naming(d, new_name):
            await self.fs.link(self._path(inode), child(path, new_name))
            return entry(self.fs.stat_inode(self._inode(inode)))

    @fuse_errors
    @by_path
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        d, path = self._dir(parent_inode)
        path = child(path, name)
        with self._naming(d, name):
            await self.fs.symlink(target.decode(errors="surrogateescape"), path, uid=ctx.uid, gid=ctx.gid)
            return await self._entry_at(path)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return (await self.fs.readlink(self._path(inode))).encode(errors="surrogateescape")

    # ------------------------------------------------------------------ files

    @fuse_errors
    @by_path
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> tuple[Any, Any]:
        d, path = self._dir(parent_inode)
        path = child(path, name)
        with self._naming(d, name):
            # the kernel applied the umask and stripped an S_ISGID the caller may not set (mode_strip_sgid)
            f = await self.fs.open(path, "x+", perms=mode & 0o7777, uid=ctx.uid, gid=ctx.gid)
        fh = self._fh()
        self.files[fh] = f
        return pyfuse3.FileInfo(fh=fh), entry(self.fs.stat_inode(f.inode))

    @fuse_errors
    @by_path
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        f = await self.fs.open(self._path(inode), open_mode(flags))
        if flags & os.O_TRUNC:
            async with dropped_on_failure(f):
                await f.truncate(0)
        fh = self._fh()
        self.files[fh] = f
        return pyfuse3.FileInfo(fh=fh)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytearray:
        """The plaintext read is zeroed once pyfuse3 has replied with it: the reply is written
        to /dev/fuse straight from this buffer (``fuse_reply_buf``, no copy) in the same task
        step that this returns to, so a callback scheduled now runs after it."""
        started = self.releases.begin()  # a readahead's READ holds its file's release back
        try:
            data = await self.files[fh].pread_wipeable(size, off)
        finally:
            self.releases.end(started)
        asyncio.get_running_loop().call_soon(wipe, data)
        return data

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """``buf`` is pyfuse3's copy of the request's payload, made for this call and let go of
        after it: zeroed once the page cache has its own copy (whatever the write's outcome).
        libfuse's request buffer, which it was copied from, is out of reach (DESIGN §4)."""
        try:
            return await self.files[fh].pwrite(buf, off)
        finally:
            zero_bytes(buf)

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: nothing is buffered above the page cache, so nothing to
        do -- and ENOSYS says so once: the kernel then sends no FLUSH again (``fc->no_flush``),
        one round trip less on every close (a create was LOOKUP, CREATE, GETATTR of the parent,
        FLUSH, RELEASE)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        started = self.releases.begin()
        try:
            await self.files.pop(fh).close()
        finally:
            self.releases.end(started)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files[fh].fsync()

    # ------------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        fh = self._fh()
        if ctx is not None and self.releases.opened(ctx.pid, fh):  # the server's own barrier (fuse/releases.py): nothing to list
            return fh
        self.dirs[fh] = (inode, await self._listing(inode))
        return fh

    async def _listing(self, inode: int) -> list[Listed]:
        """A snapshot of the directory's names (offsets stay stable while it is listed), in
        buffers of its own that ``forget_listing`` zeroes, each with the name the directory stores."""
        entries = await self.fs.listing(self._path(inode))
        return [(bytearray(b"."), b""), (bytearray(b".."), b""),
                *((bytearray(n.encode(errors="surrogateescape")), stored) for n, stored in entries)]

    async def _listed(self, d: Inode, name: bytes, stored: bytes) -> pyfuse3.EntryAttributes | None:
        """A listing's entry, found by the name the directory stores -- what the listing read --
        not by a lookup walking its path again and, in an encrypted directory, encrypting its
        name (an ``ls -l`` of 5,000 names: 56 us an entry, 103 encrypted; now 14 and 33).
        Remembered in an encrypted directory as a lookup's answer is; None if removed or
        renamed away since the listing was read."""
        if not stored:  # . and ..
            return await self.lookup(to_fuse(d.ino), name)
        try:
            with self._naming(d, name):
                return entry(self.fs.stat_inode(self.fs.listed(d, stored)))
        except FileNotFoundError:
            return None

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """An entry whose inode does not read (a damaged tree block: EUCLEAN, EIO) is left out, and
        its error ends the listing once every other entry is given: skipped silently, it made
        ``cp -a`` of a damaged directory exit 0 without the files. The kernel drops the
        entries of a reply that fails, so the error waits for a call that would give none."""
        given = False
        while fh in self.dirs and not given:
            inode, names = self.dirs[fh]
            if names is None:  # its names were zeroed at a key change (_view_changed): read what it shows now
                names = await self._listing(inode)
                if self.dirs.get(fh) != (inode, None):  # released, or read again, meanwhile
                    forget_listing(names)
                    continue
                self.dirs[fh] = (inode, names)
            try:
                d = self._inode(inode)
            except FileNotFoundError:
                break  # removed since it was opened: nothing to list, as Linux's readdir of it
            for i in range(start_id, len(names)):
                listed, stored = names[i]
                name = bytes(listed)  # what pyfuse3 takes (a copy: the listing's buffer may be zeroed meanwhile)
                try:
                    attrs = await self._listed(d, name, stored)
                except (pyfuse3.FUSEError, OSError) as e:  # . and .. as lookup's answer, the rest as the fs's
                    if e.errno in (errno.EIO, errno.EUCLEAN):  # else removed (or locked) since opendir
                        self.dir_errors.setdefault(fh, e.errno)
                    attrs = None
                if self.dirs.get(fh, (0, None))[1] is not names:
                    break  # zeroed while the lookup waited: given entries end this reply, else read again
                if attrs is None:
                    continue
                if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                    return
                given = True
            else:
                break
        if not given and fh in self.dir_errors:
            raise pyfuse3.FUSEError(self.dir_errors.pop(fh))

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        if self.releases.passed(fh):
            return
        forget_listing(self.dirs.pop(fh)[1])
        self.dir_errors.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """A directory's entries are durable at the next commit; fsync of the directory makes one.
        It reports no other file's writeback error (``write_out``, not ``sync``): Linux's fsync
        of a directory checks the directory's own errors, not the filesystem's as syncfs does."""
        await self.fs.write_out()

    # ------------------------------------------------------------------ the rest

    @fuse_errors
    async def statfs(self, ctx: Any) -> Any:
        total, free = self.fs.space()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks, s.f_bfree = total // BLOCK, free // BLOCK
        s.f_bavail = s.f_bfree
        # no inode table: inodes come from the free space, so there is no count to give, and
        # btrfs gives none (0, which df -i shows as "-"); block counts here made df -i claim
        # a fixed, wrong number of inodes
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)
