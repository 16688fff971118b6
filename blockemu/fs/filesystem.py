"""The mounted filesystem: inodes, directories, files, encryption policies, keys.

Every namespace change happens inside ``vol.join()`` with no ``await`` between
its tree updates, so each lands whole in one transaction. One that fails half
way (after its first tree update) cannot be undone -- the updates land in place
in the blocks this transaction COWed -- so it aborts the transaction instead:
the image keeps its last durable generation, the mount turns read-only and
every later change, commit and the unmount raise EROFS (``Volume.join``). File
data goes through the page cache and reaches the trees only through writeback.

Locking an encrypted inode (dropping its plaintext and its key lease) happens
in one place, ``lock_if_idle``: when the key is no longer present and the inode
is closed, clean and idle. That is the soft-removal rule of DESIGN §4.
"""
from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import stat as st
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator, NoReturn, TypeVar

from blockemu.crypto import fscrypt
from blockemu.crypto.extentkeys import ExtentKeys
from blockemu.crypto.keyring import Keyring, KeyStatus, RemovalResult, Step, check_policy_key, parse_identifier
from blockemu.device.faultplan import FaultPlan
from blockemu.device.writelog import WriteLog
from blockemu.engine.alloc import Allocator, no_space
from blockemu.engine.btree import Change, Must, Through
from blockemu.engine.extents import Extents
from blockemu.errors import (
    BadFile,
    BlockemuError,
    Busy,
    ChecksumError,
    CorruptionError,
    CrossDevice,
    DeviceIOError,
    ExistsError,
    FileTooBig,
    InvalidArgument,
    IsADirectory,
    NameOverflow,
    NameTooLong,
    NoKeyError,
    NotADirectory,
    NotEmpty,
    NotFoundError,
    NotPermitted,
    ReadOnlyError,
    SymlinkLoop,
    TooManyLinks,
    restate,
)
from blockemu.fs import backrefs
from blockemu.fs.errseq import ErrSeq, file_error, files_error
from blockemu.fs.pagecache import PAGE, Page, Pages
from blockemu.fs.volume import Volume
from blockemu.fs.writeback import Writeback, check_options
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.fast import INODE_ENCRYPTION_CONTEXT
from blockemu.ondisk.items import (
    DirEntry,
    InodeItem,
    Timespec,
    file_type,
    name_hash,
    pack_dir_entries,
    pack_symlink_data,
    symlink_ciphertext_max,
    unpack_dir_entries,
    unpack_symlink_data,
)

ROOT_INO = S.FIRST_FREE_OBJECTID
FT_REG, FT_DIR = S.FT_REG_FILE, S.FT_DIR
INODE_FLAG_ENCRYPT = 1 << 12
NAME_MAX = 255
# Tree room an extent's items take (EXTENT_DATA 78 bytes, EXTENT_ITEM with its back reference
# about 80, a checksum item header 25 plus 4-32 bytes a sector), doubled: leaves are at least
# half full after a split. Reserved per dirty run at write() (Filesystem.room_for).
META_PER_RUN = 512
# Tree leaves writeback copies (COW) for each file it maps: the fs tree's leaf holding the
# file's items, and the extent and checksum trees' leaves its new extents' items land in.
# Reserved per dirty file at write() (Filesystem.reserve_meta), as btrfs reserves a
# nodesize-sized path per item of a delalloc inode; the interior nodes above them, shared by
# every file, are COWed once per transaction and counted in the path per tree that
# promised_blocks adds (Engine.op_blocks).
LEAVES_PER_INODE = 3
YIELD_BYTES = 2 << 20
KEY_WALK_CHUNK = 4096  # fs tree items key_in_use reads between turns of the loop (~7 ms of CPU)
ZEROS = bytes(PAGE)  # what a page's bytes past the end of its file must be (zero_past_eof)


PathArg = str | bytes | os.PathLike


def as_path(path: PathArg) -> str:
    """A path as ``os`` takes one -- str, bytes or an ``os.PathLike`` (``pathlib``) -- as the str
    the filesystem works in: bytes decoded as ``os.fsdecode`` does (UTF-8, undecodable bytes
    surrogate-escaped, which ``split_path`` encodes back to the same bytes). Anything else is
    the TypeError ``os`` raises; a bytes path failed deep inside (``startswith first arg must
    be bytes``), a ``pathlib`` one with an AttributeError."""
    return os.fsdecode(os.fspath(path))


def as_id(what: str, n: int) -> int:
    """A uid or gid to store in an inode item, checked before the change joins the transaction:
    a value the item cannot hold failed its pack inside the join (struct.error, no OSError; in
    a create it aborted the mount over a bad argument). TypeError for 1.5, as os; EINVAL past
    2**32 - 2 (-1, 2**32 - 1: "no owner" to chown(2))."""
    n = operator.index(n)
    if not 0 <= n < 2**32 - 1:
        raise InvalidArgument(f"{what} {n} out of range (0 to {2**32 - 2})")
    return n


def as_time(what: str, ns: int | None) -> int | None:
    """A time to store (utimensat's, in ns; None: unchanged), checked before the change joins the
    transaction: one whose seconds the inode item's signed 64 bits cannot hold failed its pack
    inside the join (struct.error, no OSError). TypeError for 1.5, as os; EINVAL out of range."""
    if ns is None:
        return None
    ns = operator.index(ns)
    if not -2**63 <= ns // 1_000_000_000 < 2**63:
        raise InvalidArgument(f"{what} {ns} out of range (seconds must fit 64 bits, signed)")
    return ns


def as_owner(uid: int, gid: int) -> tuple[int, int]:
    """A new inode's owner (``as_id``)."""
    return as_id("uid", uid), as_id("gid", gid)


def split_path(path: str) -> list[bytes]:
    """The components of an absolute path, as bytes. The path is encoded once and split as bytes
    (no UTF-8 sequence, and no surrogate-escaped byte, contains a b"/"), and checked with C-level
    calls: every operation splits its path, encoding and testing each component on its own
    cost as much as resolving them."""
    if not path.startswith("/"):
        raise InvalidArgument(f"{path!r}: paths are absolute inside the image")
    if "\0" in path:  # no syscall can pass one (os.open: "embedded null byte"), nor a mount show it
        raise InvalidArgument(f"{path!r}: embedded null byte")
    parts = [p for p in path.encode(errors="surrogateescape").split(b"/") if p and p != b"."]
    if b".." in parts:
        raise InvalidArgument(f"{path!r}: '..' is not supported")
    if parts and max(map(len, parts)) > NAME_MAX:
        raise NameTooLong(f"{path!r}: name longer than {NAME_MAX} bytes")
    return parts


def ends_in_dot(path: str) -> bool:
    """Whether the last component of ``path`` is "." (trailing slashes aside), which
    ``split_path`` drops: Linux refuses to remove or move an entry by that name (rmdir's
    EINVAL, rename's EBUSY) rather than act on the directory it stands for."""
    return path.rstrip("/").endswith("/.")


def names_a_directory(path: str) -> bool:
    """Whether ``path`` ends in '/' or '/.': as Linux, it then names a directory -- a
    non-directory found there is ENOTDIR, and no file is created or renamed to it."""
    return path.endswith(("/", "/."))


@dataclass
class Stat:
    st_mode: int
    st_ino: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_blocks: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int

    # the float seconds os.stat_result users read
    @property
    def st_atime(self) -> float:
        return self.st_atime_ns / 1e9

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / 1e9

    @property
    def st_ctime(self) -> float:
        return self.st_ctime_ns / 1e9


STORED_NAMES = 4096  # ciphertexts of names an unlocked directory keeps (then it starts afresh)
DENTRIES = 4096  # entries a directory keeps from its lookups (then it starts afresh)


@dataclass(eq=False)
class Inode:
    ino: int
    item: InodeItem
    size: int
    disk_size: int
    nbytes: int
    key_id: bytes | None
    pages: Pages
    open_count: int = 0
    inflight: int = 0
    # bytes of pages a flush took for writeback and has not mapped yet: with the dirty pages,
    # counted in st_blocks as btrfs counts delalloc (stat_inode)
    flushing: int = 0
    wb_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the errors writeback dropped its data with, each reported once to every handle open when
    # it happened or opened before any reported it (File._wb_seen), and by the unmount if no
    # handle did: fs/errseq.py
    errs: ErrSeq = field(default_factory=ErrSeq)
    lost_bytes: int = 0  # file bytes writeback had to drop
    # tree room write() reserved for what writeback will add for this file's dirty data -- its
    # runs' items and the leaves it COWs (Filesystem.reserve_meta) -- held until none of that data
    # is left dirty or in flight, then released whole (Filesystem.release_meta)
    reserved: int = 0
    # the size when writeback last took its dirty pages: the bytes a run it fails to write can
    # hold (a write past the end meanwhile adds a page's zeros to that run, not data)
    wb_size: int = 0
    data_changed_ns: int = 0  # a write's mtime/ctime, folded into the item when it is saved
    epoch: int = 0  # bumped whenever the extent mappings change: see Filesystem._fill
    names_key: tuple[bytearray, bytearray] | None = None  # (the secret it came from, the key): Filesystem._names_key
    stored_names: dict[bytes, bytes] = field(default_factory=dict)  # name -> its ciphertext, while unlocked
    policy: tuple[int, bytes] | None = None  # (flags, nonce) of its encryption context, once read: Filesystem._policy
    dentries: dict[bytes, DirEntry] = field(default_factory=dict)  # a directory's stored names looked up: _lookup_entry

    @property
    def is_dir(self) -> bool:
        return st.S_ISDIR(self.item.mode)


def _ts(ns: int) -> Timespec:
    return Timespec.from_ns(ns)


class Filesystem:
    def __init__(self, vol: Volume, keyring: Keyring, **wb_opts: Any) -> None:
        self.vol = vol
        self.keyring = keyring
        # first, before anything that holds a descriptor: reading the fs tree fails on a damaged
        # image, and the page arena's memfd (Writeback's) is an int that no collector closes
        fs_tree = vol.engine.trees[S.FS_TREE_OBJECTID]
        last = fs_tree.last_at_or_before((S.ORPHAN_OBJECTID - 1, 255, (1 << 64) - 1))
        self.next_ino = max(ROOT_INO + 1, (last[0][0] + 1) if last else 0)
        self.extents = Extents(vol.engine)
        self.inodes: dict[int, Inode] = {}
        self.writeback = Writeback(self, **wb_opts)
        self.cache = self.writeback.cache
        self.unyielded = 0  # bytes written since a writer last let the loop run
        self._room_seen, self._room = -1, 0  # room_for's cache: the allocator's change count, and bytes
        # the allocator, one for the mount (None read-only: ``Engine.allocator`` raises then), as
        # room_for reads it on every write: the property is two calls, ~5 % of a 4 KiB pwrite
        self._allocator = None if vol.device.readonly else vol.engine.allocator
        # operations short of room write out in turn, first come first served, and while one
        # does every other admission queues behind it (``_write_out_while``): btrfs's tickets
        self.room_queue = asyncio.Lock()
        self.meta_reserved = 0  # the dirty files' ``Inode.reserved``, summed (room_for)
        self.inode_leaves = LEAVES_PER_INODE * vol.sb.nodesize  # what a dirty file reserves first (reserve_meta)
        # the admission's arithmetic for one page, worked out once: every 4 KiB write asks
        # ``room_for`` and ``reserve_meta``, which derived these from the superblock, the
        # writeback's extent size and the checksum size (five calls) per write
        self._page_meta, self._page_extends = self.meta_for(PAGE), self._extends_for(PAGE)
        self._room_keep = 0  # the metadata reserve (tree blocks) ``_room`` leaves
        self._room_pending = 0  # the held tree changes' part of it (``PendingTrees.blocks``)
        self.promised_keep: int | None = None  # the least reserve any dirty data was admitted under
        vol.log.promised = self.promised_blocks  # the fsync log leaves that room to writeback
        self.next_index: dict[int, int] = {}
        # images made before names were encrypted keep them as given (SPEC "Names")
        self.encrypted_names = bool(vol.sb.incompat_flags & S.INCOMPAT_ENCRYPTED_NAMES)
        # images made without extended references keep a hard link's names in one directory to
        # one INODE_REF item (SPEC "Directories"), as btrfs without EXTENDED_IREF
        self.extended_iref = bool(vol.sb.incompat_flags & S.INCOMPAT_EXTENDED_IREF)
        self.mounted = True
        keyring.on_wipe.append(self._forget_names_keys)
        self.extent_keys = ExtentKeys()  # derived secrets kept: see crypto/extentkeys.py
        keyring.on_wipe.append(self.extent_keys.forget)
        # a front end that keeps what encrypted inodes showed -- FUSE: the kernel's entries for a
        # directory's names, a file's pages -- hears when a key change makes that stale: the
        # inode was locked (lock_if_idle), or a wipe took a directory's names key while it was
        # still held (its names are no-key names from then on)
        self.on_view_change: list[Callable[[Inode], None]] = []

    def check_mounted(self) -> None:
        """The first step of every public call (DESIGN §8): after ``unmount`` nothing answers,
        not even a stat or a readdir the cache could serve -- what a closed image would say is
        unknown, and a key added now would never be wiped."""
        if not self.mounted:
            raise self.vol.not_mounted()

    @property
    def tree(self):
        return self.vol.engine.trees[S.FS_TREE_OBJECTID]

    # ------------------------------------------------------------------ mount

    @classmethod
    async def mount(cls, path: str, *, key_removal: str = "soft", faults: FaultPlan | None = None,
                    readonly: bool = False, **opts: Any) -> "Filesystem":
        """``readonly``: open the image O_RDONLY under a shared lock (a 0444 image mounts; a
        writer elsewhere refuses it) and refuse every change with EROFS."""
        opts = check_options(opts)
        keyring = Keyring(key_removal)
        vol = await Volume.open(path, readonly=readonly, faults=faults)
        try:
            fs = cls(vol, keyring, **opts)
        except BaseException:
            await vol.close(commit=False)
            raise
        if not readonly:
            try:
                await fs._recover_orphans()
            except BaseException:
                # a failed mount releases what it took (the image and its lock, the arena), as
                # unmount does; the error to raise is this one, not the clean-up's
                with contextlib.suppress(Exception):
                    await fs.unmount()
                raise
        fs.writeback.start()
        return fs

    async def start_write_log(self, base_copy: str) -> WriteLog:
        """Record every device write, flush and FUA write from now on, as dm-log-writes does, so
        the crash states of the caller's own workload can be rebuilt and checked:
        ``WriteLog.crash_states`` names them, ``crash_image`` writes one (DESIGN §8, §10). The
        campaigns had this and the API did not (``vol.device.start_log`` alone, which refuses a
        non-empty write cache). It syncs first -- a log starts on an empty cache -- then copies
        the image, as it then is, to ``base_copy``: every crash image starts from that copy. Under
        a ``nobarrier`` fault plan the sync's flushes do nothing, so the cache is destaged to the
        image regardless (``destage_all``): the planted bug acts on what the log records."""
        await self.sync()
        await self.vol.device.destage_all()
        return self.vol.device.start_log(base_copy=base_copy)

    async def mark(self, name: str) -> None:
        """A named point in the write log (``WriteLog.marks()`` gives its position), e.g. where
        an fsync returned: every crash state from there on must hold what it made durable.
        EINVAL before ``start_write_log``: the mark would go nowhere."""
        self.check_mounted()
        await self.vol.device.mark(name)

    def power_cut(self) -> None:
        """Cut the power now: the device drops its volatile write cache (but for the sectors a
        ``torn=`` fault lets land) and fails every later I/O with EIO, so the image holds what
        was durable at this instant. ``FaultPlan(cut=N)`` cuts after the Nth device write; this
        is the same cut at a point the caller picks (after an fsync returns, between two calls).
        Then unmount -- it raises if the cut took something not yet durable -- and mount again
        to see what survived (DESIGN §8, §10)."""
        self.check_mounted()
        self.vol.device.power_cut()

    async def unmount(self) -> None:
        """Write back, stop writeback and the sealing workers, commit and close the image, drop
        the plaintext pages and wipe the keys. Every step runs even when one before it failed
        -- a failed flush must not leave the writeback task, the workers, the image or a secret
        behind -- and the first failure is raised once all have run. Data writeback had to drop
        and no fsync or close has reported yet (a file still open, dropped unclosed or never
        fsynced) is reported here, so an unmount that returns lost nothing no caller was told
        of: a loss some handle's fsync or close reported is not raised again (each error is
        reported once per handle, fs/errseq.py), and one another handle still open never
        reported is not raised either -- its close after the unmount returns quietly."""
        if not self.mounted:
            return
        self.mounted = False
        first: BaseException | None = None
        for step in (self.writeback.flush_all, self.writeback.stop, self.vol.close, self._drop_pages,
                     self.keyring.wipe_all, self._report_unreported):
            try:
                done = step()
                if done is not None:
                    await done
            except BaseException as e:
                if first is not None and step == self._report_unreported and isinstance(first, OSError):
                    # an aborted mount's EROFS came first: the losses no caller heard of are said
                    # beside it, not hidden behind it
                    first, lost = restate(first, f"{first}; and {e}"), getattr(e, "lost_bytes", None)
                    if lost is not None:  # the count the harnesses read stays on what is raised
                        first.lost_bytes = lost  # type: ignore[attr-defined]
                first = first or e
        if first is not None:
            raise first

    def _report_unreported(self) -> None:
        """The unmount's last word: every file's writeback loss no caller was told of, in one
        error (one file's alone is said as its fsync would say it)."""
        mine = [n for inode in self.inodes.values() for n in inode.errs.unreported()]
        if len({n.ino for n in mine}) == 1:
            raise file_error(mine[0].ino, mine)
        if mine:
            raise files_error(mine, "writeback failed, no fsync or close reported it")

    def _drop_pages(self) -> None:
        for inode in self.inodes.values():
            self.cache.drop(inode.pages)
        self.cache.close()

    async def __aenter__(self) -> "Filesystem":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unmount()

    async def _recover_orphans(self) -> None:
        """Inodes unlinked while open when the last commit happened: finish deleting them, each
        as a delete of its own (``join(deleting=True)``), so near full the cleanup commits in
        steps, as unlinks do. All in one transaction, ~4,900 orphans on a full 48 MiB image
        with 4 KiB tree blocks COWed more leaves than there was room for and every mount failed
        with ENOSPC. Each step deletes whole inodes with their orphan items, so a crash between
        two leaves the rest orphans, for the next mount to finish."""
        lo = (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, 0)
        orphans = [k[2] for k, _ in self.tree.items(lo, (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, (1 << 64) - 1))]
        if not orphans:
            return
        for ino in orphans:
            async with self.vol.join(deleting=True):
                self._destroy(self._load(ino))
        await self.vol.commit()

    # ------------------------------------------------------------------ inodes

    def _load(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is not None:
            return inode
        body = self.tree.get((ino, S.INODE_ITEM, 0))
        if body is None:
            raise NotFoundError(f"inode {ino} has no INODE_ITEM")
        item = InodeItem.unpack(body)
        if item.size > S.MAX_FILE_SIZE:
            raise CorruptionError(f"inode {ino}: size {item.size} exceeds the largest file size {S.MAX_FILE_SIZE}; "
                                  f"run blockemu fsck", "ISIZE_MISMATCH")
        ctx = self.tree.get((ino, S.FSCRYPT_CTXT_ITEM, 0))
        key_id = INODE_ENCRYPTION_CONTEXT.unpack(ctx)[5] if ctx is not None else None
        inode = Inode(ino, item, item.size, item.size, item.nbytes, key_id, Pages(ino))
        self.inodes[ino] = inode
        return inode

    def save_inode(self, inode: Inode) -> None:
        """Write the inode item as it should be on disk (size = what writeback has made durable).
        One ``_replace`` a save: each costs a dict and a tuple, and saves come several an operation.
        The inode is noted changed for the fsync log (``Engine.changed_extents``): until it is
        logged again, a power cut loses its item's change (``Volume._logged_whole``)."""
        self.tree.insert((inode.ino, S.INODE_ITEM, 0), self._item_to_save(inode), replace=True)

    def _item_to_save(self, inode: Inode) -> bytes:
        """``save_inode`` but the insert: the packed item, for a caller that applies it with the
        other changes of its leaf (``_add_entry``, ``_remove_entry``: one descent, not three)."""
        engine = self.vol.engine
        tid = engine.transid
        engine.changed_extents.setdefault(inode.ino, {})
        if inode.data_changed_ns:
            # the write's time is the mtime; the ctime only if nothing changed the inode since
            # (a rename or chmod after the write, before this save, keeps its later ctime)
            now, item = _ts(inode.data_changed_ns), inode.item
            inode.item = item._replace(size=inode.disk_size, nbytes=inode.nbytes, transid=tid, mtime=now,
                                       ctime=max(item.ctime, now))
            inode.data_changed_ns = 0
        else:
            inode.item = inode.item._replace(size=inode.disk_size, nbytes=inode.nbytes, transid=tid)
        return inode.item.pack()

    def _touch(self, inode: Inode, *, mtime: bool = True, links: int = 0) -> None:
        """ctime (and mtime) now; ``links`` added to nlink in the same ``_replace``. A new mtime
        supersedes a pending write's time (``data_changed_ns``): folded in at the save, that older
        time took a truncate's or a punch's mtime back to the write's."""
        now, item = _ts(time.time_ns()), inode.item
        if mtime:
            inode.data_changed_ns = 0
        inode.item = item._replace(ctime=now, mtime=now if mtime else item.mtime, nlink=item.nlink + links)

    def _new_inode(self, mode: int, parent: Inode, owner: tuple[int, int]) -> Inode:
        """A new inode of ``mode`` owned by ``owner`` (uid, gid), saved once: a front end that
        creates for a caller (the FUSE mount) names the owner here, not in a second transaction.
        In a setgid directory the group is the directory's, and a subdirectory is setgid too, as
        the kernel's inode_init_owner does for local filesystems: under FUSE the kernel leaves it
        to us. Stripping S_ISGID from a file whose creator is not in that group is not done here:
        the VFS does it before any filesystem is called (vfs_prepare_mode, as the umask), knowing
        the caller's supplementary groups, which a FUSE request does not carry (DESIGN 8)."""
        self.check_meta_room()  # before any change: a create must not eat the delete reserve
        if parent.item.mode & st.S_ISGID:
            owner = owner[0], parent.item.gid
            if st.S_ISDIR(mode):
                mode |= st.S_ISGID
        ino = self.next_ino
        if parent.key_id is not None:
            self.keyring.lease(parent.key_id, ino)  # creating in an encrypted dir needs its key
        self.next_ino += 1
        now = _ts(time.time_ns())
        tid = self.vol.engine.transid
        nlink = 2 if st.S_ISDIR(mode) else 1
        item = InodeItem(tid, tid, 0, 0, 0, nlink, owner[0], owner[1], mode, 0, 0, 0, now, now, now, now)
        inode = Inode(ino, item, 0, 0, 0, parent.key_id, Pages(ino))
        if parent.key_id is not None:
            inode.item = item._replace(flags=INODE_FLAG_ENCRYPT)
            self._store_policy(ino, parent.key_id)
        self.inodes[ino] = inode
        self._names_changed(inode)
        self.save_inode(inode)
        return inode

    def _store_policy(self, ino: int, key_id: bytes) -> None:
        ctx = INODE_ENCRYPTION_CONTEXT.pack(2, S.CONTENTS_MODE_AES_256_XTS, S.FILENAMES_MODE_AES_256_CTS,
                                            S.POLICY_FLAGS_PAD_32, 0, key_id, os.urandom(fscrypt.NONCE_SIZE))
        self.tree.insert((ino, S.FSCRYPT_CTXT_ITEM, 0), ctx, replace=True)
        if (inode := self.inodes.get(ino)) is not None:
            inode.policy = None

    def _unlock(self, inode: Inode) -> None:
        if inode.key_id is not None:
            self.keyring.lease(inode.key_id, inode.ino)

    def lock_if_idle(self, inode: Inode) -> None:
        """Lock an encrypted inode once nothing needs its key any more and the key is being removed:
        drop its plaintext pages and release its lease (the last release wipes the secret). A
        directory is held by its unlocked children, as the kernel's dentries pin their parents:
        it shows real names until the last of them is locked, which then tries its parents."""
        if inode.key_id is None or not self.keyring.holds(inode.key_id, inode.ino):
            return
        if inode.open_count or inode.pages.dirty or inode.inflight or self.keyring.is_present(inode.key_id):
            return
        if inode.is_dir and self._a_child_holds(inode):
            return
        self.cache.drop(inode.pages)
        self._forget_names_key(inode)
        self.keyring.release(inode.key_id, inode.ino)
        for hook in self.on_view_change:
            hook(inode)
        for parent in self._cached_parents(inode):
            self.lock_if_idle(parent)

    async def settle(self, inode: Inode) -> None:
        """Writeback is done with ``inode`` (it holds its ``wb_lock``). Unlinked while a flush
        held it (``_drop_link`` leaves an orphan while I/O is in flight) and closed since, it
        has no close left to delete it: delete it now, as close does -- else its extents stay
        allocated until the next mount's orphan recovery. Otherwise lock it if it is idle. A
        delete that cannot join (the volume aborted) leaves the orphan to that recovery."""
        if inode.item.nlink or inode.open_count or inode.inflight or self.inodes.get(inode.ino) is not inode:
            self.lock_if_idle(inode)
            return
        with contextlib.suppress(OSError):
            async with self.vol.join():
                self._destroy(inode)

    def _cached_parents(self, inode: Inode) -> list[Inode]:
        return [p for pino in backrefs.parents(self.tree, inode.ino)
                if pino != inode.ino and (p := self.inodes.get(pino)) is not None]

    def _a_child_holds(self, d: Inode) -> bool:
        """Whether a cached inode named in the encrypted directory ``d`` still holds a lease: asked
        of the holders of d's key (everything in d has d's policy, EXDEV otherwise; a removal
        releases them as it goes) or of d's names, whichever is shorter. Asking every cached
        inode, per directory tried (each lock tries its parent), made locking a tree quadratic:
        2,000 names of a git clone took 15 s of CPU, past the 30 s ``blockemu key remove`` waits with 3,000."""
        assert d.key_id is not None
        holders = self.keyring.holders(d.key_id)
        # d's size counts each name's bytes twice, and an encrypted name has 16 at least: when d
        # surely has fewer names than there are holders, its DIR_INDEX items are the shorter walk
        # (each directory's last try finds no holder: it walks all of one or the other)
        if len(holders) > d.size // (32 if self._names_policy(d) else 2):  # either walk is exact: this picks the cost
            return any(e.location[0] != d.ino and e.location[0] in self.inodes
                       and self.keyring.holds(d.key_id, e.location[0])
                       for _, body in self.tree.items((d.ino, S.DIR_INDEX, 0), (d.ino, S.DIR_INDEX, (1 << 64) - 1))
                       for e in unpack_dir_entries(body))
        return any(ino != d.ino and ino in self.inodes and backrefs.named_in(self.tree, ino, d.ino) for ino in holders)

    # ------------------------------------------------------------------ names

    def _names_policy(self, d: Inode) -> tuple[int, bytes] | None:
        """(policy flags, nonce) of a directory whose names are stored encrypted, else None."""
        if d.key_id is None or not self.encrypted_names:
            return None
        return self._policy(d)

    def _policy(self, i: Inode) -> tuple[int, bytes]:
        """(policy flags, nonce) of an encrypted inode's context: read once (``_store_policy``
        forgets it), not a tree lookup per path component of every operation."""
        if i.policy is None:
            ctx = INODE_ENCRYPTION_CONTEXT.unpack(self.tree[(i.ino, S.FSCRYPT_CTXT_ITEM, 0)])
            i.policy = ctx[3], ctx[6]
        return i.policy

    @contextlib.contextmanager
    def _names_key(self, d: Inode, nonce: bytes) -> Iterator[bytearray | None]:
        """The directory's names key; None when it is locked and its key is not present (no-key
        names). Using a directory's names unlocks it, as a lookup does in Linux: it then holds a
        lease until ``lock_if_idle`` locks it. The key is derived once per unlock, as the kernel
        keeps an inode's fscrypt_info while it is unlocked (an HKDF-SHA512 per path component
        was a tenth of the stress mix's time), and zeroed when the inode is locked or the
        secret it came from is zeroed (``_forget_names_key``)."""
        assert d.key_id is not None
        if not self.keyring.holds(d.key_id, d.ino):
            if not self.keyring.is_present(d.key_id):
                yield None
                return
            self.keyring.lease(d.key_id, d.ino)
        try:
            secret = self.keyring.secret_for(d.key_id, d.ino)
        except NoKeyError:  # a lease whose secret a hard removal wiped
            self._forget_names_key(d)
            yield None
            return
        if d.names_key is None or d.names_key[0] is not secret:
            self._forget_names_key(d)
            d.names_key = (secret, fscrypt.names_key(secret, nonce))
        yield d.names_key[1]

    def _forget_names_key(self, inode: Inode) -> None:
        """The inode is locked (or its key's secret zeroed): its names key and the names it
        encrypted go."""
        if inode.names_key is not None:
            fscrypt.wipe(inode.names_key[1])
            inode.names_key = None
        inode.stored_names.clear()

    def _forget_names_keys(self, key_id: bytes) -> None:
        """The keyring zeroed this key's secret: every names key derived from it goes too."""
        for inode in self.inodes.values():
            if inode.key_id == key_id:
                showed_names = inode.names_key is not None
                self._forget_names_key(inode)
                if showed_names:
                    for hook in self.on_view_change:
                        hook(inode)

    def _disk_name(self, d: Inode, name: bytes) -> bytes | None:
        """What directory ``d`` stores for a name a caller gave: the name itself outside encrypted
        directories, its ciphertext with the key; without it, the stored name a no-key name stands
        for, or None when it stands for nothing (a lookup finds nothing, a create needs the key)."""
        policy = self._names_policy(d)
        if policy is None:
            return name
        # a name's ciphertext is a function of the key and the name (fscrypt's zero IV), so an
        # unlocked directory keeps the ones it has computed, as the kernel's dentries keep
        # plaintext names: path lookups then cost no CBC per component. They are kept only while
        # the directory holds its names key (``_forget_names_key`` drops both), so one found
        # here is what the key would give
        stored = d.stored_names.get(name)
        if stored is not None:
            return stored
        flags, nonce = policy
        with self._names_key(d, nonce) as key:
            if key is not None:
                if len(d.stored_names) >= STORED_NAMES:
                    d.stored_names.clear()
                stored = d.stored_names[name] = fscrypt.encrypt_name(key, name, flags)
                return stored
        parsed = fscrypt.parse_nokey_name(name)
        if parsed is None:
            return None
        dirhash, prefix, digest = parsed
        if digest is None:
            return prefix
        body = self.tree.get((d.ino, S.DIR_ITEM, dirhash))  # a digested name's hash finds its item
        entries = unpack_dir_entries(body) if body is not None else []
        return next((e.name for e in entries if fscrypt.nokey_matches(e.name, prefix, digest)), None)

    def _user_names(self, d: Inode, stored: list[bytes]) -> list[str]:
        """The names readdir shows: decrypted with the key, no-key names without it."""
        policy = self._names_policy(d)
        if policy is None:
            return [n.decode(errors="surrogateescape") for n in stored]
        with self._names_key(d, policy[1]) as key:
            if key is None:
                return [fscrypt.nokey_name(n, name_hash(n)) for n in stored]
            return [fscrypt.decrypt_name(key, n).decode(errors="surrogateescape") for n in stored]

    def _require_names_key(self, d: Inode) -> None:
        """fscrypt_prepare_rename: both directories' keys, or ENOKEY (generic/419)."""
        policy = self._names_policy(d)
        if policy is not None:
            with self._names_key(d, policy[1]) as key:
                if key is None:
                    raise NoKeyError("Required key not available")

    def _destroy(self, inode: Inode) -> None:
        """Delete an inode with no names left: its extents, items and cached pages."""
        self.drop_pages(inode)
        self.extents.punch(inode.ino, 0, (1 << 64) - 1)
        # its items in one pass, not a listing then a lookup and a descent per item (unlink: ~4 % less CPU)
        self.tree.apply([((inode.ino, 0, 0), Through((inode.ino, 255, (1 << 64) - 1)))])
        orphan = (S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, inode.ino)
        if orphan in self.tree:
            self.tree.delete(orphan)
        if inode.key_id is not None:
            self._forget_names_key(inode)
            self.keyring.release(inode.key_id, inode.ino)
        self.inodes.pop(inode.ino, None)

    # ------------------------------------------------------------------ directories

    def _lookup_entry(self, d: Inode, name: bytes) -> DirEntry | None:
        """The entry directory ``d`` stores under ``name`` (as stored: the ciphertext in an
        encrypted one). Entries found are kept on ``d`` (the dentry cache: a tree lookup and a
        decode per path component of every operation were a twentieth of the stress mix),
        and the one ``_add_entry`` or ``_remove_entry`` changes is dropped first."""
        entry = d.dentries.get(name)
        if entry is not None:
            return entry
        body = self.tree.get((d.ino, S.DIR_ITEM, name_hash(name)))
        if body is None:
            return None
        entry = next((e for e in unpack_dir_entries(body) if e.name == name), None)
        if entry is not None:
            if len(d.dentries) >= DENTRIES:
                d.dentries.clear()
            d.dentries[name] = entry
        return entry

    def _resolve(self, path: str) -> Inode:
        if not self.mounted:  # check_mounted, inline: every path call comes here
            raise self.vol.not_mounted()
        inode = self._walk(split_path(path), path)
        if names_a_directory(path) and not st.S_ISDIR(inode.item.mode):
            raise NotADirectory(f"{path}: not a directory")
        return inode

    def _walk(self, parts: list[bytes], path: str) -> Inode:
        """The inode the components ``parts`` of ``path`` name, from the root. Per component the
        directory's own caches are asked inline -- the name's ciphertext (``stored_names``), its
        entry (``dentries``), the child (``inodes``) -- and the methods that fill them only on a
        miss: at four calls a component, resolving paths was ~5 % of the stress mix's CPU."""
        inodes = self.inodes
        inode = inodes.get(ROOT_INO) or self._load(ROOT_INO)
        for name in parts:
            if not st.S_ISDIR(inode.item.mode):
                raise NotADirectory(f"{path}: not a directory")
            stored = inode.stored_names.get(name) or self._disk_name(inode, name)
            entry = (inode.dentries.get(stored) or self._lookup_entry(inode, stored)) if stored is not None else None
            if entry is None:
                raise NotFoundError(f"{path}: no such file or directory")
            ino = entry.location[0]
            inode = inodes.get(ino) or self._load(ino)
        return inode

    def _parent(self, path: str, at_root: type[BlockemuError] = ExistsError) -> tuple[Inode, bytes | None]:
        """The parent directory and the name it stores for the last component (None: a
        locked directory has no such no-key name; creating it needs the key). The root has
        none: the call fails with the errno Linux gives for "/" -- EEXIST for what would create
        it (mkdir, link, symlink), EISDIR for unlink, EBUSY for rename (``at_root``)."""
        if not self.mounted:  # check_mounted, inline, as _resolve
            raise self.vol.not_mounted()
        parts = split_path(path)
        if not parts:
            raise at_root(f"{path}: {os.strerror(at_root.code).lower()}")
        parent = self._walk(parts[:-1], path)
        if not parent.is_dir:
            raise NotADirectory(f"{path}: not a directory")
        return parent, self._disk_name(parent, parts[-1])

    def _named(self, parent: Inode, name: bytes | None, path: str) -> Inode:
        """The inode ``path`` names, from what ``_parent`` gave for it: ``_resolve``'s answer and
        errors without walking the path again (an unlink, a rename or a create walked it twice,
        ~a twentieth of their CPU)."""
        entry = self._lookup_entry(parent, name) if name is not None else None  # (the dentry cache first)
        if entry is None:
            raise NotFoundError(f"{path}: no such file or directory")
        ino = entry.location[0]
        inode = self.inodes.get(ino) or self._load(ino)
        if names_a_directory(path) and not st.S_ISDIR(inode.item.mode):
            raise NotADirectory(f"{path}: not a directory")
        return inode

    def _dir_index(self, dir_ino: int) -> int:
        nxt = self.next_index.get(dir_ino)
        if nxt is None:
            last = self.tree.last_at_or_before((dir_ino, S.DIR_INDEX, (1 << 64) - 1), (dir_ino, S.DIR_INDEX, 0))
            nxt = last[0][2] + 1 if last else 2
        self.next_index[dir_ino] = nxt + 1
        return nxt

    def _names_changed(self, *inodes: Inode) -> None:
        """A name was made or removed: the fsync log cannot say that (DESIGN §9), so an fsync of
        these inodes commits until the transaction does -- which makes the name durable, as
        btrfs's log-full-commit cases do."""
        self.vol.engine.needs_commit.update(i.ino for i in inodes)

    def _check_entry_fits(self, parent: Inode, name: bytes | None, child: Inode | None,
                          leaving: bytes | None = None) -> None:
        """EMLINK or EOVERFLOW before any change, if naming ``child`` ``name`` in ``parent``
        would grow an item past the largest a leaf holds: the DIR_ITEM holding names whose
        hashes collide, or the item the inode's back reference goes to (``backrefs.check_fits``:
        a full INODE_REF on an image without extended references). Found
        by the tree's insert halfway through, it aborted the transaction (some 15 long-named
        links to one file in one directory made the whole mount read-only). ``leaving``: the name a
        rename removes from ``parent`` first; a replaced entry at ``name`` goes too. ``child``
        None: a new inode, which has no names yet. ``name`` None: a locked directory's, where
        the create fails for want of its key first."""
        if name is None:
            return
        entry = DirEntry((0, S.INODE_ITEM, 0), 0, 0, name)  # only its packed size counts
        old = self.tree.get((parent.ino, S.DIR_ITEM, name_hash(name)))
        entries = [e for e in (unpack_dir_entries(old) if old is not None else []) if e.name != name]
        if len(pack_dir_entries([*entries, entry])) > self.tree.max_item:
            raise NameOverflow(f"{name!r}: too many names with its hash in directory inode {parent.ino}")
        if child is not None:
            backrefs.check_fits(self.tree, child.ino, parent.ino, name, self.extended_iref, leaving)

    def _add_entry(self, parent: Inode, name: bytes, child: Inode, *, links: int = 0) -> None:
        """Name ``child`` ``name`` in ``parent``; ``links``: the parent's nlink change (a
        subdirectory's ".."), saved with the entry's other changes to it."""
        self._names_changed(parent, child)
        parent.dentries.pop(name, None)
        tid = self.vol.engine.transid
        entry = DirEntry((child.ino, S.INODE_ITEM, 0), tid, file_type(child.item.mode), name)
        key = (parent.ino, S.DIR_ITEM, name_hash(name))
        old = self.tree.get(key)
        entries = (unpack_dir_entries(old) if old is not None else []) + [entry]
        index = self._dir_index(parent.ino)
        backrefs.add(self.tree, child.ino, parent.ino, index, name, self.extended_iref)
        parent.size += 2 * len(name)
        parent.disk_size = parent.size
        self._touch(parent, links=links)
        self._apply_dir(parent, [(key, pack_dir_entries(entries)),
                                 ((parent.ino, S.DIR_INDEX, index), Must(pack_dir_entries([entry])))])

    def _remove_entry(self, parent: Inode, name: bytes, child: Inode, *, links: int = 0) -> None:
        """Remove the entry ``name`` of ``child`` from ``parent``; ``links`` as ``_add_entry``'s."""
        self._names_changed(parent, child)
        parent.dentries.pop(name, None)
        key = (parent.ino, S.DIR_ITEM, name_hash(name))
        rest = [e for e in unpack_dir_entries(self.tree[key]) if e.name != name]
        # first: a back reference found missing next (a damaged image) then aborts the transaction
        if rest:
            self.tree.insert(key, pack_dir_entries(rest), replace=True)  # there: just read (``update`` looks again)
        else:
            self.tree.delete(key)
        index = backrefs.remove(self.tree, child.ino, parent.ino, name)
        parent.size -= 2 * len(name)
        parent.disk_size = parent.size
        self._touch(parent, links=links)
        self._apply_dir(parent, [((parent.ino, S.DIR_INDEX, index), Must(None))])

    def _apply_dir(self, parent: Inode, changes: list[Change]) -> None:
        """``changes`` to ``parent``'s own items after its inode item (DIR_ITEM, DIR_INDEX: in
        key order; None deletes) with the parent saved, in one pass over the tree: the keys share
        the parent's objectid, so mostly one leaf, which an insert, a delete and a save descended
        to one by one (and a delete looked its key up first)."""
        self.tree.apply([((parent.ino, S.INODE_ITEM, 0), self._item_to_save(parent)), *changes])

    def _is_empty(self, d: Inode) -> bool:
        return self.tree.first_at_or_after((d.ino, S.DIR_INDEX, 0), (d.ino, S.DIR_INDEX, (1 << 64) - 1)) is None

    def _check_policy_move(self, inode: Inode, new_parent: Inode) -> None:
        """fscrypt: nothing enters an encrypted directory unless it has the same policy (EXDEV)."""
        if new_parent.key_id is None:
            return
        if inode.key_id != new_parent.key_id:
            raise CrossDevice("Invalid cross-device link: encryption policies differ")
        self._unlock(new_parent)

    def _check_free(self, parent: Inode, name: bytes | None, path: str, *, directory: bool = False) -> None:
        """A new name's checks, as Linux's filename_create: EEXIST when ``parent`` has it (None: a
        locked directory's no-key name that names nothing) or ``path`` ends in '/.' (after the
        walk to what it names: mkdir('/m/.') made m); else, but for a new ``directory``,
        ENOENT when ``path`` ends in '/' or '/.' -- it asks for a directory that is not there (a
        link or symlink to 'nope/' was made as 'nope')."""
        if ends_in_dot(path):  # 'x/.' is x itself, walked to first: ENOENT, ENOTDIR, or there already
            self._resolve(path)
            raise ExistsError(f"{path}: file exists")
        if name is not None and self._lookup_entry(parent, name) is not None:
            raise ExistsError(f"{path}: file exists")
        if not directory and names_a_directory(path):
            raise NotFoundError(f"{path}: no such file or directory")

    async def mkdir(self, path: PathArg, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> None:
        """mkdir(2): ``mode``'s permission bits as given (no umask here: the caller applies its
        own, as the FUSE kernel does), owned by ``uid``/``gid`` -- in the transaction that names it."""
        path, mode, owner = as_path(path), st.S_IFDIR | (mode & 0o7777), as_owner(uid, gid)
        async with self.adding_items():
            parent, name = self._parent(path)
            self._check_free(parent, name, path, directory=True)
            self._check_entry_fits(parent, name, None)
            child = self._new_inode(mode, parent, owner)  # ENOKEY in a locked directory
            assert name is not None
            self._add_entry(parent, name, child, links=1)

    async def rmdir(self, path: PathArg) -> None:
        path = as_path(path)
        async with self.vol.join(deleting=True):
            if ends_in_dot(path):  # "/a/.": Linux's LAST_DOT, once the path up to it resolves
                self._resolve(path)
                raise InvalidArgument(f"{path}: invalid argument")
            parent, name = self._parent(path, Busy)  # the root: EBUSY
            d = self._named(parent, name, path)
            if not d.is_dir:
                raise NotADirectory(f"{path}: not a directory")
            if not self._is_empty(d):
                raise NotEmpty(f"{path}: directory not empty")
            assert name is not None  # it resolved
            self._remove_entry(parent, name, d, links=-1)
            self._destroy(d)

    async def unlink(self, path: PathArg) -> None:
        """unlink(2). Joins as a delete even when the file is open and frees nothing until its
        last close: never refused for room, its orphan item and COWs as a plain participant
        gathered until a commit found no room (DESIGN §5)."""
        path = as_path(path)
        async with self.vol.join(deleting=True):
            parent, name = self._parent(path, IsADirectory)
            inode = self._named(parent, name, path)
            if inode.is_dir:
                raise IsADirectory(f"{path}: is a directory")
            assert name is not None  # it resolved
            self._remove_entry(parent, name, inode)
            self._drop_link(inode)

    def _drop_link(self, inode: Inode) -> None:
        inode.item = inode.item._replace(nlink=inode.item.nlink - 1)
        if inode.item.nlink > 0:
            self._touch(inode, mtime=False)
            self.save_inode(inode)
        elif inode.open_count or inode.inflight:
            self.save_inode(inode)
            self.tree.insert((S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, inode.ino), b"", replace=True)
        else:
            self._destroy(inode)

    async def rename(self, src: PathArg, dst: PathArg) -> None:
        """rename(2): atomic, replacing an existing ``dst`` of a compatible type."""
        src, dst = as_path(src), as_path(dst)
        async with self.adding_items(deleting=True):
            self.check_meta_room()  # the new name's items, before the old name goes
            sparent, sname = self._parent(src, Busy)
            inode = self._named(sparent, sname, src)
            dparent, dname = self._parent(dst, Busy)
            if ends_in_dot(src) or ends_in_dot(dst):
                if ends_in_dot(dst):  # "/x/.": Linux walks to x first (ENOENT, ENOTDIR)
                    self._resolve(dst)
                raise Busy(f"{src} -> {dst}: device or resource busy")
            if names_a_directory(dst) and not inode.is_dir:  # as do_renameat2: 'b/' is no file's new name
                raise NotADirectory(f"{dst}: not a directory")
            sparts, dparts = split_path(src), split_path(dst)
            if sparts == dparts:
                return
            if inode.is_dir and dparts[: len(sparts)] == sparts:
                raise InvalidArgument(f"{src} -> {dst}: cannot move a directory into itself")
            self._require_names_key(sparent)
            self._require_names_key(dparent)
            self._check_policy_move(inode, dparent)
            assert sname is not None and dname is not None  # resolved, and both keys are here
            self._check_entry_fits(dparent, dname, inode, sname if sparent is dparent else None)
            entry = self._lookup_entry(dparent, dname)
            if entry is not None:
                victim = self._load(entry.location[0])
                if victim.ino == inode.ino:
                    return
                if victim.is_dir and not inode.is_dir:
                    raise IsADirectory(f"{dst}: is a directory")
                if inode.is_dir and not victim.is_dir:
                    raise NotADirectory(f"{dst}: not a directory")
                if victim.is_dir and not self._is_empty(victim):
                    raise NotEmpty(f"{dst}: directory not empty")
                self._remove_entry(dparent, dname, victim, links=-victim.is_dir)
                if victim.is_dir:
                    self._destroy(victim)
                else:
                    self._drop_link(victim)
            moved = int(inode.is_dir and sparent.ino != dparent.ino)  # its ".." changes directory
            self._remove_entry(sparent, sname, inode, links=-moved)
            self._add_entry(dparent, dname, inode, links=moved)
            self._touch(inode, mtime=False)
            self.save_inode(inode)

    async def link(self, src: PathArg, dst: PathArg) -> None:
        """link(2): another name for a file (not a directory: EPERM). Into an encrypted
        directory only with the same policy (EXDEV) and its key (ENOKEY), as fscrypt."""
        src, dst = as_path(src), as_path(dst)
        async with self.adding_items():
            self.check_meta_room()
            inode = self._resolve(src)
            if inode.is_dir:
                raise NotPermitted(f"{src}: hard link not allowed for directory")
            if inode.item.nlink >= S.LINK_MAX:  # btrfs_link's BTRFS_LINK_MAX
                raise TooManyLinks(f"{src}: too many links ({inode.item.nlink})")
            dparent, dname = self._parent(dst)
            self._check_free(dparent, dname, dst)
            self._require_names_key(dparent)
            self._check_policy_move(inode, dparent)
            assert dname is not None  # the key is here
            self._check_entry_fits(dparent, dname, inode)
            self._add_entry(dparent, dname, inode)
            inode.item = inode.item._replace(nlink=inode.item.nlink + 1)
            self._touch(inode, mtime=False)
            self.save_inode(inode)

    async def symlink(self, target: PathArg, path: PathArg, *, uid: int = 0, gid: int = 0) -> None:
        """symlink(2), the link owned by ``uid``/``gid`` from its first save. In an encrypted directory the target is encrypted as fscrypt does and
        stored inline, in the transaction that names the link (``_encrypted_symlink``).
        Elsewhere it is the link's file data, written back before the name appears: until then
        the inode is an orphan, so a crash leaves either no link or a whole one."""
        target, path, owner = as_path(target), as_path(path), as_owner(uid, gid)
        data = target.encode(errors="surrogateescape")
        if not data:
            raise NotFoundError(f"{path}: empty symbolic link target")
        if b"\0" in data:  # as a path's (split_path): symlink(2) takes a C string, readlink gives one
            raise InvalidArgument(f"{path}: embedded null byte in the symbolic link target")
        if len(data) >= PAGE:
            raise NameTooLong(f"{path}: symbolic link target longer than {PAGE - 1} bytes")
        async with self.adding_items():
            parent, name = self._parent(path)
            self._check_free(parent, name, path)
            if parent.key_id is not None:
                self._encrypted_symlink(parent, name, data, path, owner)
                return
            inode = self._new_inode(st.S_IFLNK | 0o777, parent, owner)
            inode.item = inode.item._replace(nlink=0)
            self.save_inode(inode)
            self.tree.insert((S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, inode.ino), b"")
            inode.open_count += 1  # the File below holds it: no destroy meanwhile
        f = File(self, inode, path, readable=False, writable=True, append=False)
        try:
            await f.pwrite(data, 0)
            await self.writeback.flush_inode(inode)
            f._report_writeback()
            async with self.vol.join():
                self.check_meta_room()
                parent, name = self._parent(path)
                self._check_policy_move(inode, parent)  # the path may name an encrypted directory by now
                assert name is not None
                self._check_free(parent, name, path)
                self._check_entry_fits(parent, name, inode)
                self._add_entry(parent, name, inode)
                inode.item = inode.item._replace(nlink=1)
                self.save_inode(inode)
                self.tree.delete((S.ORPHAN_OBJECTID, S.ORPHAN_ITEM, inode.ino))
        finally:
            await f.close()  # with no name (a failure above) the inode goes

    def _encrypted_symlink(self, parent: Inode, name: bytes | None, data: bytes, path: str,
                           owner: tuple[int, int]) -> None:
        """fscrypt_prepare_symlink + fscrypt_encrypt_symlink: the target NUL-padded and
        encrypted like a name, with the link's own per-file key (context 2, its nonce), stored
        as fscrypt_symlink_data in an FSCRYPT_SYMLINK item -- inline, as btrfs stores targets,
        so item, inode and name land in one commit and no plaintext ever reaches the disk.
        i_size is what is stored (2 + ciphertext), as on ext4; stat reports the target's length."""
        if not self.keyring.is_present(parent.key_id):  # fscrypt_policy_to_inherit: the key before the length
            raise NoKeyError("Required key not available")
        limit = symlink_ciphertext_max(self.tree.max_item)
        if len(data) > limit:
            raise NameTooLong(f"{path}: symbolic link target longer than {limit} bytes (encrypted)")
        self._check_entry_fits(parent, name, None)
        inode = self._new_inode(st.S_IFLNK | 0o777, parent, owner)  # ENOKEY in a locked directory
        assert name is not None  # the parent's key is here: _new_inode leased it
        flags, nonce = self._policy(inode)
        with self._names_key(inode, nonce) as key:
            if key is None:  # unreachable: the lease above holds the secret
                raise NoKeyError("Required key not available")
            body = pack_symlink_data(fscrypt.encrypt_name(key, data, flags, limit))
        self.tree.insert((inode.ino, S.FSCRYPT_SYMLINK_ITEM, 0), body)
        self.vol.set_incompat(S.INCOMPAT_ENCRYPTED_SYMLINKS)
        inode.size = inode.disk_size = len(body)
        self.save_inode(inode)
        self._add_entry(parent, name, inode)
        self.lock_if_idle(inode)

    async def readlink(self, path: PathArg) -> str:
        path = as_path(path)
        inode = self._resolve(path)
        if not st.S_ISLNK(inode.item.mode):
            raise InvalidArgument(f"{path}: not a symbolic link")
        stored = self._stored_target(inode)
        if stored is not None:
            return self._target(inode, stored)
        self._unlock(inode)  # a target stored as encrypted file data (older images): ENOKEY without the key
        try:
            pages = await self.read_pages(inode, 0, 1)
            return bytes(pages[0][: inode.size]).decode(errors="surrogateescape")
        finally:
            self.lock_if_idle(inode)

    def _stored_target(self, inode: Inode) -> bytes | None:
        """The ciphertext of an encrypted symlink's inline target; None for a target kept as file data."""
        body = self.tree.get((inode.ino, S.FSCRYPT_SYMLINK_ITEM, 0)) if inode.key_id is not None else None
        return unpack_symlink_data(body) if body is not None else None

    def _target(self, inode: Inode, ciphertext: bytes) -> str:
        """fscrypt_get_symlink: the target decrypted with the link's key; without it, the no-key
        form of the ciphertext -- fscrypt_fname_disk_to_usr with hash and minor hash 0, so
        base64url of eight zero bytes then the ciphertext (digested past 149 bytes)."""
        if len(ciphertext) < fscrypt.FNAME_MIN_LEN:
            raise CorruptionError(f"symbolic link {inode.ino}: ciphertext of {len(ciphertext)} bytes",
                                  "BAD_ENCRYPTED_SYMLINK")
        try:
            with self._names_key(inode, self._policy(inode)[1]) as key:
                if key is None:
                    return fscrypt.nokey_name(ciphertext, 0)
                plain = fscrypt.decrypt_name(key, ciphertext)
        finally:
            self.lock_if_idle(inode)
        if not plain:
            raise CorruptionError(f"symbolic link {inode.ino}: target decrypts to nothing", "BAD_ENCRYPTED_SYMLINK")
        return plain.decode(errors="surrogateescape")

    async def readdir(self, path: PathArg) -> list[str]:
        return [name for name, _ in await self.listing(path)]

    async def listing(self, path: PathArg) -> list[tuple[str, bytes]]:
        """readdir with, per name, what the directory stores for it: a front end that lists and
        then stats every entry (FUSE's READDIRPLUS) finds each through ``listed``, not by walking
        its path again (in an encrypted directory, encrypting its name again too): that was
        three quarters of a listing's time)"""
        path = as_path(path)
        d = self._resolve(path)
        if not d.is_dir:
            raise NotADirectory(f"{path}: not a directory")
        entries = [e for _, body in self.tree.items((d.ino, S.DIR_INDEX, 0), (d.ino, S.DIR_INDEX, (1 << 64) - 1))
                   for e in unpack_dir_entries(body)]
        names = self._user_names(d, [e.name for e in entries])
        return [(name, e.name) for name, e in zip(names, entries)]

    def listed(self, d: Inode, stored: bytes) -> Inode:
        """The inode directory ``d`` holds now under a name of its ``listing`` (``stored``: as
        the directory stores it), as a lookup of that name answers: ENOENT once it was removed
        or renamed away since, the inode it names now if another was renamed over it."""
        self.check_mounted()
        entry = self._lookup_entry(d, stored)
        if entry is None:
            raise NotFoundError(f"directory {d.ino} no longer holds a listed name")
        return self._load(entry.location[0])

    async def stat(self, path: PathArg) -> Stat:
        path = as_path(path)
        return self.stat_inode(self._resolve(path))

    def stat_inode(self, i: Inode) -> Stat:
        """lstat. An encrypted symlink's size is the length readlink returns (the target, or
        its no-key form), as fscrypt_symlink_getattr makes it, not the stored length.

        st_blocks counts the data not yet written back too, as btrfs and ext4 add their
        delayed-allocation bytes: a freshly written file with st_blocks 0 looks all holes to
        ``tar --sparse``, which then archives zeros without reading it."""
        it, size = i.item, i.size
        if st.S_ISLNK(it.mode) and (stored := self._stored_target(i)) is not None:
            size = len(self._target(i, stored).encode(errors="surrogateescape"))
        blocks = (i.nbytes + i.flushing + len(i.pages.dirty) * PAGE) // 512
        mtime, ctime = it.mtime.ns, it.ctime.ns
        if i.data_changed_ns:  # a write not yet folded into the item: stat shows its time at once, as POSIX asks
            mtime, ctime = i.data_changed_ns, max(ctime, i.data_changed_ns)
        return Stat(it.mode, i.ino, it.nlink, it.uid, it.gid, size, blocks, it.atime.ns, mtime, ctime)

    # ------------------------------------------------------------------ by inode number

    def inode(self, ino: int) -> Inode:
        """The inode numbered ``ino``: a FUSE request names inodes, not paths. An inode unlinked
        while open stays reachable until its last close."""
        self.check_mounted()
        return self._load(ino)

    def path_of(self, ino: int) -> str:
        """A path naming ``ino``, walked up its first names (INODE_REF, else INODE_EXTREF) to the
        root (btrfs's ino_paths): how a front end that is handed inode numbers reaches the
        path-based calls."""
        self.check_mounted()
        names: list[str] = []
        while ino != ROOT_INO:
            first = next(backrefs.names(self.tree, ino), None)
            if first is None:
                raise NotFoundError(f"inode {ino} has no name")
            parent = self._load(first[0])
            names += self._user_names(parent, [first[1]])  # as readdir shows it
            ino = parent.ino
        return "/" + "/".join(reversed(names))

    async def set_attrs(self, inode: Inode, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                        atime_ns: int | None = None, mtime_ns: int | None = None) -> None:
        """chmod, chown and utimensat in one transaction; the file type bits of ``mode`` are kept.
        All or nothing: the inode in memory takes the change only with its save, so a save that
        fails (EIO reading the leaf, ENOSPC for its new copy) leaves stat showing what the disk
        holds -- it showed the refused change, which the next save of the inode then wrote."""
        self.check_mounted()
        if self.vol.device.readonly:
            raise ReadOnlyError("read-only file system")
        uid = None if uid is None else as_id("uid", uid)
        gid = None if gid is None else as_id("gid", gid)
        atime_ns, mtime_ns = as_time("atime_ns", atime_ns), as_time("mtime_ns", mtime_ns)
        async with self.vol.join():
            it, written = inode.item, inode.data_changed_ns
            changed = it._replace(
                mode=it.mode if mode is None else st.S_IFMT(it.mode) | (mode & 0o7777),
                uid=it.uid if uid is None else uid,
                gid=it.gid if gid is None else gid,
                atime=it.atime if atime_ns is None else _ts(atime_ns),
                mtime=it.mtime if mtime_ns is None else _ts(mtime_ns),
                ctime=_ts(time.time_ns()),
            )
            inode.item = changed
            if mtime_ns is not None:
                inode.data_changed_ns = 0  # an explicit mtime wins over the last write's
            try:
                self.save_inode(inode)
            except BaseException:
                inode.item, inode.data_changed_ns = it, written
                raise

    def space(self) -> tuple[int, int]:
        """(total, free) bytes of the image, for statfs: free as the allocator sees it once this
        transaction's pinned extents are released (what the next commit makes free), less the
        dirty data still on its way to disk (as btrfs counts delalloc), so df moves with writes."""
        self.check_mounted()
        engine = self.vol.engine
        total = engine.sb.total_bytes
        alloc = engine.allocator
        if alloc is None:  # read-only: the last commit's own count
            return total, total - engine.sb.bytes_used
        return total, max(0, alloc.free_bytes() + alloc.pinned_bytes() - self.cache.dirty_bytes)

    async def exists(self, path: PathArg) -> bool:
        path = as_path(path)
        try:
            self._resolve(path)
        except (NotFoundError, NotADirectory):
            return False
        return True

    # ------------------------------------------------------------------ policies and keys

    async def set_policy(self, path: PathArg, key_id: str | bytes, user: int = 0) -> None:
        """FS_IOC_SET_ENCRYPTION_POLICY (v2) on an empty directory; the caller must have added the key."""
        path = as_path(path)
        ident = parse_identifier(key_id)
        async with self.adding_items():
            self.check_meta_room()
            d = self._resolve(path)
            if not d.is_dir:
                raise NotADirectory(f"{path}: not a directory")
            if d.key_id is not None:
                if d.key_id == ident:
                    return
                raise ExistsError(f"{path}: a different encryption policy is already set")
            if not self._is_empty(d):
                raise NotEmpty(f"{path}: directory not empty")
            mk = self.keyring.keys.get(ident)
            if mk is None or user not in mk.users:
                raise NoKeyError("Required key not available")
            if mk.secret is not None:  # Linux sets a policy for a short key, then every unlock under it is ENOKEY
                check_policy_key(mk.secret, path)
            self._store_policy(d.ino, ident)
            d.key_id = ident
            d.item = d.item._replace(flags=d.item.flags | INODE_FLAG_ENCRYPT)
            self.save_inode(d)

    async def get_policy(self, path: PathArg) -> str | None:
        path = as_path(path)
        d = self._resolve(path)
        return d.key_id.hex() if d.key_id is not None else None

    async def key_in_use(self, key_id: str | bytes) -> bool:
        """Whether an encrypted inode on the image names key ``key_id``. Adding a key no policy
        uses is allowed -- fscrypt computes the identifier from the key alone -- but unlocks
        nothing, and a mount given a wrong key said nothing: the command line asks this to say
        so. A walk of the fs tree, which stops at the first such inode: on a key added at mount or
        through ``blockemu key add`` only (160,000 items, 40,000 files, none encrypted: 0.3 s of
        CPU with the tree's blocks read from the image, 0.04 s with them cached; 1,000,000 items:
        1.7 s, 2-5 s wall). ``KEY_WALK_CHUNK`` items at a time, the loop served between: in one
        go, a mount's server answered no request for those seconds of a ``key add``. The tree
        may change between chunks; each starts past the last key the one before it read."""
        self.check_mounted()
        ident = parse_identifier(key_id)
        lo = (0, 0, 0)
        while True:
            n = 0
            for k, v in self.tree.items(lo):
                if k[1] == S.FSCRYPT_CTXT_ITEM and INODE_ENCRYPTION_CONTEXT.unpack(v)[5] == ident:
                    return True
                n += 1
                if n == KEY_WALK_CHUNK:
                    break
            else:
                return False
            lo = (k[0], k[1], k[2] + 1)  # past it (an offset of 2**64 still sorts before the next type)
            await asyncio.sleep(0)
            self.check_mounted()

    async def add_key(self, raw: bytes, user: int = 0) -> str:
        self.check_mounted()
        return self.keyring.add_key(raw, user)

    async def remove_key(self, key_id: str | bytes, user: int = 0, all_users: bool = False) -> RemovalResult:
        """FS_IOC_REMOVE_ENCRYPTION_KEY: drop the claim; when it was the last, take the removal
        mode's steps (``keyring.REMOVAL``): the keyring's own (refuse dirtying, wipe) and ours --
        write the key's dirty data back (as fscrypt's sync_filesystem), then lock every inode
        that is closed and clean."""
        self.check_mounted()
        ident = parse_identifier(key_id)
        mk, started = self.keyring.begin_removal(ident, user, all_users)
        if mk is None:
            return RemovalResult(ident.hex())
        if not started:
            return RemovalResult(ident.hex(), other_users=True)
        failed: BaseException | None = None
        # what the steps' write backs drop is said in the result, as it happens (and whether a
        # write back after the wipe dropped it: the wipe's loss, not an I/O error's); the files'
        # fsyncs, the next sync and the unmount still report it
        holders = [i for i in self.inodes.values() if i.key_id == ident]
        lost_before = [i.lost_bytes for i in holders]
        wiped_loss = False
        for step in self.keyring.removal_steps:
            users = [i for i in self.inodes.values() if i.key_id == ident]
            if step is Step.WRITE_BACK:
                wiped, before = mk.secret is None, sum(i.lost_bytes for i in holders)
                # a write back that fails (or is cancelled) still lets the steps after it run:
                # the removal has begun, and the lock and the wipe must not be skipped
                try:
                    for inode in users:
                        # clean is not enough: runs a background flush took are still on their
                        # way, and flush_inode waits for them (its wb_lock) before any wipe
                        await self.writeback.flush_inode(inode)
                    await self.vol.commit()
                except BaseException as e:
                    failed = failed or e  # the first: a later step's EROFS is its echo
                wiped_loss = wiped_loss or wiped and sum(i.lost_bytes for i in holders) > before
            elif step is Step.LOCK_IDLE:
                for inode in users:
                    self.lock_if_idle(inode)
            else:
                self.keyring.step(mk, step)
        if failed is not None:
            raise failed
        lost = {i.ino: i.lost_bytes - was for i, was in zip(holders, lost_before) if i.lost_bytes > was}
        return self.keyring.removal_result(mk, lost, wiped_loss)

    def key_status(self, key_id: str | bytes, user: int = 0) -> KeyStatus:
        self.check_mounted()
        return self.keyring.key_status(key_id, user)

    # ------------------------------------------------------------------ files

    def open(self, path: PathArg, mode: str = "r", *, perms: int = 0o644, uid: int = 0, gid: int = 0) -> "OpenContext":
        """aiofiles.open's ``mode``; a file this open creates ("w", "a", "x") gets os.open's mode
        as ``perms`` (its permission bits as given: no umask here, the caller applies its own, as
        the FUSE kernel does) and ``uid``/``gid``, in the transaction that makes it -- one save of
        the inode, not a second transaction of ``set_attrs``. A file already there keeps its own."""
        return OpenContext(self._open(as_path(path), mode, perms, uid, gid))

    async def _open(self, path: str, mode: str, perms: int, uid: int, gid: int) -> "File":
        base = mode.replace("b", "")
        if base not in ("r", "r+", "w", "w+", "a", "a+", "x", "x+"):
            raise InvalidArgument(f"bad open mode {mode!r}")
        create, excl, trunc = base[0] in "wax", base[0] == "x", base[0] == "w"
        if base != "r" and self.vol.device.readonly:
            raise ReadOnlyError(f"{path}: read-only file system")
        if create:
            made = st.S_IFREG | (perms & 0o7777), as_owner(uid, gid)  # checked before the join
            async with self.adding_items():
                inode = self._open_inode(path, excl, made)
        else:
            # changes no tree: no transaction to join, as stat; but open for writing it is
            # refused, as the join refused it, on an aborted mount (EROFS: reads go on)
            if base != "r":
                self.vol.check_aborted()
            inode = self._open_inode(path, excl, None)
        f = File(self, inode, path, readable=base[0] == "r" or "+" in base, writable=base != "r", append=base[0] == "a")
        if trunc and inode.size:
            async with dropped_on_failure(f):
                await self.truncate_inode(inode, 0)
        return f

    def _open_inode(self, path: str, excl: bool, made: tuple[int, tuple[int, int]] | None) -> Inode:
        """The inode ``path`` names, created if missing when ``made`` gives the new file's mode and
        (uid, gid) (inside ``vol.join``), unlocked and counted open. No await: an unlink cannot come
        between the lookup and the count that makes it keep the inode as an orphan."""
        if made is None:
            inode = self._resolve(path)
        else:
            # the root: EEXIST with O_EXCL, else EISDIR, as Linux
            parent, name = self._parent(path, ExistsError if excl else IsADirectory)
            if path.endswith("/"):  # as Linux's O_CREAT: a trailing slash is EISDIR, whatever it names
                raise IsADirectory(f"{path}: is a directory")
            try:
                inode = self._named(parent, name, path)
            except NotFoundError:
                if names_a_directory(path):  # 'x/.': no directory x to open, none to create
                    raise
                self._check_entry_fits(parent, name, None)
                mode, owner = made
                inode = self._new_inode(mode, parent, owner)  # ENOKEY in a locked directory
                assert name is not None
                self._add_entry(parent, name, inode)
            else:
                if excl:
                    raise ExistsError(f"{path}: file exists")
        if inode.is_dir:
            raise IsADirectory(f"{path}: is a directory")
        if st.S_ISLNK(inode.item.mode):
            raise SymlinkLoop(f"{path}: is a symbolic link (paths are never followed)")
        self._unlock(inode)
        inode.open_count += 1
        return inode

    def room_for(self, n: int, runs: int = 1, inode: Inode | None = None) -> bool:
        """Whether ``n`` more bytes of dirty data, in ``runs`` separate runs, can get extents at
        writeback, with the dirty
        data already waiting for its own and the tree room its extents' items will take: the
        free space (whole tree blocks' worth, as the allocator counts it) less the metadata
        reserve. Every write asks, so the space is derived again only when the allocator has
        changed since. A write asks again after its last await: concurrent writers must not
        all pass on the same room.

        It also leaves the trees room to split, a path per tree (``op_blocks``; why:
        ``promised_blocks``): the items' bytes pay for the leaves they fill, not for the whole
        block a split takes at once; and room for the items of the extents writeback may split
        the runs into where free space is small holes (``_split_room``); and, for ``inode``'s
        first dirty data, the leaves writeback will COW for it (``reserve_meta``). What earlier
        writes reserved comes back per file, once writeback has mapped (or lost) the file's
        dirty data or a truncate or unlink dropped it (``release_meta``)."""
        engine = self.vol.engine
        alloc = self._allocator or engine.allocator
        if alloc.changes != self._room_seen or engine.pending.blocks != self._room_pending:
            self._room_seen, self._room_keep, self._room_pending = alloc.changes, engine.data_keep(), engine.pending.blocks
            self._room = (alloc.node_room - self._room_keep - engine.op_blocks()) * self.vol.sb.nodesize
        if not self.cache.dirty_bytes:
            self.promised_keep = None  # everything dirty has its extents
        meta = self._page_meta if n == PAGE else self.meta_for(n)
        if runs != 1:
            meta += (runs - 1) * self._per_extent()
        need = n + 2 * PAGE + meta + self.cache.dirty_bytes + self.meta_reserved
        if inode is not None and not inode.reserved:  # (inline: every write asks)
            need += self.inode_leaves
        # the split room is at most an eighth of ``need`` (an extent's items, 512 bytes, a page): asked
        # only when that could decide, so an image with room to spare never counts its free extents
        if need + need // 8 > self._room and need + self._split_room(alloc, need) > self._room:
            return False
        if self.promised_keep is None or self._room_keep < self.promised_keep:
            self.promised_keep = self._room_keep
        return True

    def _split_room(self, alloc: Allocator, nbytes: int) -> int:
        """Tree room for the extents beyond one per run that writeback may make of ``nbytes`` --
        the dirty data and the tree blocks of its items, all taken from free space -- when it
        splits runs across free extents: each piece but a run's last fills a free extent whole, so
        there are at most as many as the smallest free extents those bytes fill
        (``Allocator.fills``). Reserving one extent's items per ``max_extent`` alone, 20 MB of
        appends into 4-32 KiB holes became 2,719 extents whose items outgrew the reserve, and
        the fsync lost the last 53-57 KiB with ENOSPC. None when the widest free extent holds it
        all (a fresh image): counting a hole a commit had left beside it refused the write that
        fills such an image exactly. Pinned extents a commit during the flush may give back are
        not counted: the flush fills the largest free extents first, the count assumes the
        smallest, and that slack covered them in every case measured."""
        return META_PER_RUN * alloc.fills(nbytes)

    def data_keep(self) -> int:
        """Tree blocks of room writeback's data allocations leave: the engine's metadata
        reserve (``Engine.data_keep``), but never more than the reserve the dirty data was
        admitted under. The reserve grows with the trees (a path per tree level): a tree
        gaining a level after write() acknowledged data against the smaller reserve took back
        the room promised to it (three trees of an empty image growing a level while a 14 MB
        write was written back: 30 tree blocks, and the fsync lost 360 KB with ENOSPC). Room
        once promised is kept, as btrfs keeps a delalloc reservation; the larger reserve
        applies to what is admitted from then on."""
        keep = self.vol.engine.data_keep()
        return keep if self.promised_keep is None else min(keep, self.promised_keep)

    def meta_for(self, n: int) -> int:
        """Tree room for the items of a new dirty run of ``n`` bytes: ``META_PER_RUN`` for the
        run, plus ``_extends_for``. ``room_for`` checks exactly what ``reserve_meta`` then
        reserves: checking one run's worth let a large write with small extents be acknowledged
        with room for its data and not its items."""
        return self._per_extent() + self._extends_for(n)

    def _per_extent(self) -> int:
        """What an extent writeback makes takes beyond its data's bytes: its items
        (``META_PER_RUN``), and with tree blocks larger than a page, up to a tree block less a
        page of room -- an extent placed at a free extent's head leaves a remainder that holds
        whole tree blocks only (the room ``room_for`` counts is whole tree blocks'): 20 KiB runs
        into 32 KiB holes with 16 KiB tree blocks each left 12 KiB, no tree block, and took
        32 KiB of room for 20 KiB counted; writeback reached the keep with 1.67 MB of
        acknowledged runs left, lost at fsync."""
        return META_PER_RUN + self.vol.sb.nodesize - PAGE

    def _extends_for(self, n: int) -> int:
        """Tree room ``n`` more bytes of a dirty run take at writeback: their share of the
        extents the run becomes (``META_PER_RUN`` per ``max_extent``, rounded up) and their
        checksums (one per sector), both doubled as leaves are half full after a split. A
        file written in 64 KiB appends is one run: reserving only for the run's first write
        left 20 MB of appends with 512 bytes of tree room, while their 20 extents and 5,000
        checksums grew the trees by 5 tree blocks, and the fsync lost the last 32 KiB with ENOSPC."""
        return -(-self._per_extent() * n // (self.writeback.max_pages * PAGE)) + 2 * self.extents.csum_size * -(-n // PAGE)

    def admits(self, n: int, inode: Inode) -> bool:
        """Whether a write of ``n`` bytes to ``inode`` may dirty its pages now, without
        ``make_room``: there is room, and no operation short of room is writing out (a write
        then waits its turn behind it, ``_write_out_while``)."""
        return not self.room_queue.locked() and self.room_for(n, 1, inode)

    def reserve_meta(self, inode: Inode, first: int, n: int) -> None:
        """Add to ``inode``'s account the tree room of ``n`` bytes dirtied from page ``first``:
        a write that starts a new dirty run (its first page does not extend one) will be at
        least one more extent at writeback, each with its items (EXTENT_DATA, EXTENT_ITEM, its
        checksums): ``meta_for``; one that extends a run, ``_extends_for``. The first dirty data
        of a file also reserves the leaves writeback COWs for it (``inode_leaves``); a second
        run of a dirty file COWs the same leaves. The items' bytes pay for the room they fill,
        not for the copy of a whole leaf each file touches: 547 4 KiB writes to files each in a
        leaf of its own, on a full image with 4 KiB tree blocks, were acknowledged with 2.5 MB
        reserved; their copies (the old ones pinned until the commit) and the commit's records
        of them took the rest, the transaction aborted and all 547 were lost. One account per
        file, released at one point (``release_meta``), as btrfs keeps a delalloc inode's
        metadata reservation until its ordered extents finish."""
        if n == PAGE:
            cost = self._page_meta if first - 1 not in inode.pages.dirty else self._page_extends
        else:
            cost = self.meta_for(n) if first - 1 not in inode.pages.dirty else self._extends_for(n)
        if not inode.reserved:
            cost += self.inode_leaves
        inode.reserved += cost
        self.meta_reserved += cost

    def release_meta(self, inode: Inode) -> None:
        """None of ``inode``'s dirty data is left, dirty or in flight: writeback mapped it (its
        items are in the trees, its leaves copied: that room is in use now, no longer promised),
        lost it, or a truncate or unlink dropped it -- give its account back whole
        (``btrfs_delalloc_release_metadata``). Data written meanwhile keeps it for the next
        flush. The items' share came back only once nothing in the mount was dirty, the
        leaves' as writeback mapped the file: a file unlinked, truncated or failed while others
        stayed dirty held both, and forced flushes for them (review30)."""
        if inode.reserved and not inode.pages.dirty and not inode.flushing:
            self.meta_reserved -= inode.reserved
            inode.reserved = 0

    def drop_pages(self, inode: Inode, first: int = 0, end: int | None = None) -> None:
        """Drop ``inode``'s cached pages from ``first`` (to ``end``), dirty ones too, and with the
        last of its dirty data the room reserved for it (``release_meta``)."""
        self.cache.drop(inode.pages, first, end)
        self.release_meta(inode)

    async def make_room(self, n: int, runs: int = 1, inode: Inode | None = None) -> None:
        """ENOSPC at write(), as btrfs reserves delayed-allocation space when a page is dirtied:
        a write that cannot get extents at writeback is refused now, before it is acknowledged,
        rather than reported at fsync or close. Short of room, write back and commit first (the
        space this transaction freed comes back at its commit), as btrfs flushes delalloc and
        commits before it gives up. ``room_for`` counts every byte as new (a COW overwrite
        needs new space too) plus the partial pages at both ends. With room enough it returns at
        once, without yielding to the loop."""
        await self._write_out_while(lambda: not self.room_for(n, runs, inode))
        self.require_room(n, runs, inode)

    async def _write_out_while(self, short: Callable[[], bool]) -> None:
        """Write back and commit (``write_out``) while ``short()`` and the last write-out took
        some dirty data off the promises (wrote or lost a run), as btrfs flushes for a
        reservation ticket while flushing makes progress. One operation at a time, in the order
        they came (``room_queue``), and while one writes out every other admission -- a write's
        too (``File._write``) -- waits its turn, as btrfs queues new reservations behind the
        tickets: otherwise the others dirtied new files -- each reserving its runs' items and
        leaves -- during each write-out, and either a fixed number of write-outs refused creates
        on roomy images (4: review30's 8 tasks x 1,500 new 4 KiB files on 64M/16K, 2-3 refused;
        16 x 150 on 24M/64K, 9) or, counting their data as progress, an operation that could
        never fit wrote out once per write of another task for as long as it wrote (review31: 401
        write-outs for 400 writes). A write-out that takes nothing leaves the room as it is: the
        caller's check decides then. With room and no one waiting it returns at once, without
        yielding to the loop."""
        if not self.room_queue.locked() and not short():
            return
        self.apply_held()
        stats = self.writeback.stats
        async with self.room_queue:
            while short():
                runs = stats["extents"] + stats["errors"]
                await self.write_out()
                if stats["extents"] + stats["errors"] == runs:
                    return

    def promised_blocks(self) -> int:
        """Tree blocks' worth of room write() promised to dirty data (``room_for``) that
        writeback has not yet taken: its bytes, the items of its extents and the room the
        trees may split into as they take those items (a path per tree, split at every level:
        ``Engine.op_blocks``). A tree block splits whole: the extent tree's root leaf, full,
        took two blocks (its new sibling and the new root) for the first of five extents a
        320 KiB run became in 64 KiB holes, whose items write() had reserved 1,232 bytes for,
        and the fsync lost the run's last 16 KiB with ENOSPC (``max_extent=2M``, one run in five:
        the split came during the last flush only when the lanes' pieces fell so)."""
        engine, need = self.vol.engine, self.cache.dirty_bytes + self.meta_reserved
        if not need:
            return 0
        return -(-(need + self._split_room(engine.allocator, need)) // self.vol.sb.nodesize) + engine.op_blocks()

    def apply_held(self) -> None:
        """Apply the extent- and checksum-tree changes held for the commit (``PendingTrees``):
        they keep back the most they may take, their bound, which near full is room an operation
        short of it would otherwise commit for -- applied, they take only what they need, as
        each batch's did before they were held. A failure half way aborts the transaction."""
        engine = self.vol.engine
        if not engine.pending.blocks:
            return
        self.vol.check_aborted()
        try:
            engine.pending.apply()
        except BaseException as e:
            raise self.vol.abort(e, "applying the held extent and checksum changes failed")

    def pending_room(self) -> int:
        """Tree blocks of room the transaction's held extent- and checksum-tree changes may keep
        back (``PendingTrees``): half of what is left once the metadata reserve and the room
        promised to dirty data are kept, so holding them never refuses a write that committing
        them would admit by much; short of room, none (each batch's changes are applied at once)."""
        engine = self.vol.engine
        keep = engine.data_keep() - engine.pending.blocks + engine.op_blocks()
        # ``promised_blocks`` with its split room at its most, an eighth (``room_for``), not the count
        # of the free extents it fills (``Allocator.fills``: a walk of the free extents per batch)
        need = self.cache.dirty_bytes + self.meta_reserved
        promised = -(-(need + need // 8) // self.vol.sb.nodesize)
        return (engine.allocator.node_room - keep - promised) // 2

    def check_meta_room(self) -> None:
        """ENOSPC before an operation that adds items (a new inode, a name) changes anything:
        it may take neither the delete reserve nor the room promised to dirty data. A mkdir
        after writes that filled the disk took the room of their extents, and their fsync lost
        them with ENOSPC (5 MB of 14 on a 16 MiB image under 3,000 mkdirs)."""
        self.vol.engine.check_room(self.promised_blocks())

    @contextlib.asynccontextmanager
    async def adding_items(self, deleting: bool = False) -> AsyncIterator[None]:
        """Join the transaction for an operation that adds items (``check_meta_room`` then
        guards its changes). Short of room only because dirty data holds it, that data is
        written back and committed first (``_write_out_while``), so the operation fails with
        ENOSPC only when the disk is full of what is written. ``deleting``: it may also free space
        (a rename over a file destroys it), so near full it commits sooner (``Volume.join``).

        Room checked before the join may be gone once joined: a commit encoding its blocks
        meanwhile (``join`` waits for it) COWed tree blocks whose old copies stay pinned until
        its tail, and creates were refused with megabytes pinned (review34: 7-10 per seed of a
        near-full stress). Then the operation leaves the transaction unchanged and writes out
        once more -- its commit waits for that tail and gives back what the transaction pinned
        -- before it joins for good, as btrfs's tickets commit the transaction as the last
        resort before ENOSPC; only what that leaves short is refused (``check_meta_room``).

        Pinned again after that -- a commit landed between the write-out and the join (review34's
        near-full stress, seed 5: refused after its one retry) -- it goes first for the room
        (``Volume.first_for_space``, as a writeback run that found its room pinned) and commits
        until the room is back: no one else joins meanwhile, so the commits end -- each waits
        for the one in flight, whose pins it frees -- and pins that stay (a failed write's, with
        nothing to commit) end them."""
        await self._write_out_while(self._meta_short)
        allocator, retries, gave_up = self.vol.engine.allocator, 0, False
        with contextlib.ExitStack() as first:
            while True:
                async with self.vol.join(deleting=deleting):
                    if gave_up or not allocator.holds_pinned() or not self._meta_short():
                        yield
                        return
                retries += 1
                if retries == 1:  # dirty data written since may hold the room too
                    await self._write_out_while(self._meta_short)
                    continue
                if retries == 2:  # not before: others' writeback, which the write-out waits for, joins
                    first.enter_context(self.vol.first_for_space())
                gave_up = not await self.vol.commit() and allocator.holds_pinned()

    def _meta_short(self) -> bool:
        """Whether an operation that adds items would be refused now (``check_meta_room``)."""
        return not self.vol.engine.meta_room(self.promised_blocks())

    def require_room(self, n: int, runs: int = 1, inode: Inode | None = None) -> None:
        """ENOSPC unless ``n`` more bytes of dirty data can get extents (``room_for``)."""
        if not self.room_for(n, runs, inode):
            alloc, engine = self.vol.engine.allocator, self.vol.engine
            raise no_space(n, alloc.free_bytes(), alloc.largest(), engine.data_keep() * self.vol.sb.nodesize)

    def zero_partial(self, inode: Inode, idx: int, old: Page, lo: int, hi: int) -> None:
        """Zero bytes [lo, hi) of page ``idx`` (holding ``old``), dirtying it: a truncate's tail, a
        punched hole's ends. The page is new dirty data like a write's, so it must have room for
        its extent -- checked here, after the caller's last await, as a write checks (room is
        made before the caller takes the ``wb_lock``: ``make_room`` syncs, and a sync's flush
        waits for that lock) -- or it is acknowledged now and lost at writeback with ENOSPC."""
        self.check_dirtying(inode)
        self.require_room(PAGE, inode=inode)
        self.reserve_meta(inode, idx, PAGE)
        self.cache.writable(inode.pages, idx, old)[lo:hi] = bytes(hi - lo)

    def check_dirtying(self, inode: Inode) -> None:
        """ENOKEY once removal of the file's key refuses new dirty data (``deny-writes``). A
        write checks again right where it dirties its pages (after its last await): one that
        passed the first check and then waited across ``remove_key`` would be acknowledged,
        then lost when writeback finds the secret wiped."""
        if inode.key_id is not None and not self.keyring.dirtying_allowed(inode.key_id):
            raise NoKeyError("Required key not available")

    async def zero_past_eof(self, inode: Inode) -> None:
        """Before the file grows past its end: zero what the block holding the end has past it,
        and write that block back, as btrfs_cont_expand zeroes it (btrfs_truncate_block). Past
        the end those bytes are never read, but a truncate's commit may land before its zeroed
        tail block does (another file's fsync commits it), and a crash then leaves the old bytes
        on disk: a truncate up, or a write past the end, showed the truncated data again, live
        and after the next crash. Written back here, not only dirtied, so that no commit names
        the larger size over the stale block. Only a clean cached page (``_end_zeroed``) says
        what the disk holds: a dirty or in-flight one, zeroed by the truncate, may yet fail its
        writeback and be dropped, and reads then fall through to the stale block (review29)."""
        idx, tail = divmod(inode.size, PAGE)
        if not tail:
            return
        page = self.cache.get(inode.pages, idx)  # cached, the common case: no coroutine to await
        if page is None:
            page = (await self.read_pages(inode, idx, 1))[0]
        if not inode.wb_lock.locked() and self._end_zeroed(inode, idx, tail, page):
            return
        await self.make_room(PAGE, inode=inode)
        async with inode.wb_lock:  # a flush holding the end page is done: written, or lost and dropped
            idx, tail = divmod(inode.size, PAGE)
            if not tail:  # (a truncate may have moved the end meanwhile)
                return
            page = (await self.read_pages(inode, idx, 1))[0]
            if self._end_zeroed(inode, idx, tail, page):
                return
            self.zero_partial(inode, idx, page, tail, PAGE)
        lost = inode.lost_bytes
        await self.writeback.flush_inode(inode)
        if inode.lost_bytes != lost:  # not written: growing now would show the stale bytes
            # refused, but the loss left for the file's fsync (or close) to report: the flush
            # dropped the file's other dirty pages too, and an error taken here left the next
            # fsync returning success over an acknowledged write among them
            err = inode.errs.latest() or DeviceIOError("writeback failed")
            raise restate(err, f"{err} (inode {inode.ino}: its end block, zeroed past the end, was not "
                               "written back; the file was not grown)")

    def end_settled(self, inode: Inode) -> bool:
        """Whether the file may grow past its end with no ``zero_past_eof`` first: the end is
        page-aligned, or its page is cached, clean, not in a flush and zero past the end. No
        await: a write checks it right before it copies."""
        idx, tail = divmod(inode.size, PAGE)
        if not tail:
            return True
        page = self.cache.get(inode.pages, idx)
        return page is not None and not inode.wb_lock.locked() and self._end_zeroed(inode, idx, tail, page)

    def _end_zeroed(self, inode: Inode, idx: int, tail: int, page: Page, end: int = PAGE) -> bool:
        """Whether reads of ``[tail, end)`` of page ``idx`` -- past the file's end, or a punched
        hole's partial page -- can only ever find zeros, with no flush of the file under way
        (the caller checks the ``wb_lock``): ``page`` is zero there, and it is clean -- what the
        disk holds -- or the disk holds no block under it, so a failed writeback that drops it
        leaves a hole, read as zeros. Without that second test a file grown by pwrites each a
        byte past its unaligned end wrote its end page back per write: ~14x a pwrite's
        instructions, a device write each (review32)."""
        # as bytes: an arena page is a memoryview, which compares byte by byte in Python's loop
        if bytes(page[tail:end]) != ZEROS[tail:end]:
            return False
        return idx not in inode.pages.dirty or not any(self.extents.mappings(inode.ino, idx * PAGE, (idx + 1) * PAGE))

    async def truncate_inode(self, inode: Inode, size: int) -> None:
        if operator.index(size) < 0:
            raise InvalidArgument("negative size")
        if size > S.MAX_FILE_SIZE:
            raise FileTooBig(f"size {size} exceeds the largest file size {S.MAX_FILE_SIZE}")
        if size > inode.size and inode.size % PAGE:
            await self.zero_past_eof(inode)
        if size < inode.size and size % PAGE:
            # the new end page is rewritten (zero_partial) unless it reads as zeros past the new
            # end already -- a hole, or zeros written -- which on a full filesystem made a
            # truncate into a hole ENOSPC, as if it wrote data
            idx, tail = divmod(size, PAGE)
            page = (await self.read_pages(inode, idx, 1))[0]
            if inode.wb_lock.locked() or not self._end_zeroed(inode, idx, tail, page):
                await self.make_room(PAGE, inode=inode)
        async with inode.wb_lock:
            if size < inode.size:
                tail = size % PAGE
                if tail:
                    idx = size // PAGE
                    old = (await self.read_pages(inode, idx, 1))[0]
                    if not self._end_zeroed(inode, idx, tail, old):  # (zero_partial checks room)
                        self.zero_partial(inode, idx, old, tail, PAGE)
                self.drop_pages(inode, -(-size // PAGE))
                async with self.vol.join():
                    inode.nbytes += self.extents.punch(inode.ino, -(-size // PAGE) * PAGE, (1 << 64) - 1)
                    inode.epoch += 1
                    inode.size = inode.disk_size = size
                    self._touch(inode)
                    self.save_inode(inode)
            elif size > inode.size:
                async with self.vol.join():
                    inode.size = inode.disk_size = size
                    self._touch(inode)
                    self.save_inode(inode)

    async def punch_inode(self, inode: Inode, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE | KEEP_SIZE): [offset, offset + length) reads as zeros from now
        on and the size stays. Whole pages leave the cache and the extents (the space comes back
        at the commit, as truncate's does); partial pages at the ends are zeroed in the cache,
        as Linux zeroes them, so no block is allocated or freed for them. Past the end of the
        file there is nothing to punch: nothing is mapped there."""
        offset, length = operator.index(offset), operator.index(length)  # TypeError for 1.5, as fallocate
        if offset < 0 or length <= 0:
            raise InvalidArgument(f"bad hole [{offset}, +{length})")
        # its partial end pages are rewritten (zero_partial) unless they read as zeros there
        # already -- a hole, or zeros written -- which on a full filesystem made a punch into a
        # hole ENOSPC, as if it wrote data (review44; truncate's the same, 9a35d1b). Decided
        # here from what is known without a read (a page not cached is zero if nothing is
        # mapped under it); under the lock, from the pages read
        _, _, edges = self._punch_span(inode, offset, length)
        if inode.wb_lock.locked() or not all(self._known_zero(inode, s, e) for s, e in edges):
            await self.make_room(2 * PAGE, runs=2, inode=inode)
        async with inode.wb_lock:
            end = min(offset + length, inode.size)
            if end <= offset:
                return
            lo, hi, edges = self._punch_span(inode, offset, length)
            # all or nothing: both end pages are read (copied: a page is valid only until the
            # next await) and room for both is checked before either is zeroed -- the second
            # refused after the first was zeroed left half a punch acknowledged by an ENOSPC
            olds = [bytearray((await self.read_pages(inode, s // PAGE, 1))[0]) for s, _ in edges]
            try:
                self.check_dirtying(inode)
                zeroing = [(s, e, old) for (s, e), old in zip(edges, olds)
                           if not self._end_zeroed(inode, s // PAGE, s % PAGE, old, e - s // PAGE * PAGE)]
                if zeroing:  # (asked for none, it is ENOSPC on a full image all the same)
                    self.require_room(len(zeroing) * PAGE, runs=len(zeroing), inode=inode)
                for s, e, old in zeroing:
                    idx = s // PAGE
                    self.zero_partial(inode, idx, old, s - idx * PAGE, e - idx * PAGE)
            finally:
                for old in olds:
                    fscrypt.wipe(old)  # plaintext copies
            self.drop_pages(inode, lo, hi)
            async with self.vol.join():
                if lo < hi:
                    inode.nbytes += self.extents.punch(inode.ino, lo * PAGE, hi * PAGE)
                    inode.epoch += 1
                # the hole is as written as data is: dirty pages dropped past the durable size
                # must not take the size they gave the file with them (as writeback moves it)
                inode.disk_size = max(inode.disk_size, end)
                self._touch(inode)
                self.save_inode(inode)

    @staticmethod
    def _punch_span(inode: Inode, offset: int, length: int) -> tuple[int, int, list[tuple[int, int]]]:
        """What a punch of ``[offset, +length)`` (cut at the file's end) does: the whole pages
        ``[lo, hi)`` it unmaps, and the parts of partial pages it zeroes -- [s, e) in the file,
        at most one at each end."""
        end = min(offset + length, inode.size)
        lo, hi = -(-offset // PAGE), end // PAGE  # the whole pages [lo, hi)
        if lo >= hi:  # inside one page, or across one page boundary: zeroed, not unmapped
            lo = hi = max(lo, offset // PAGE)
        return lo, hi, [(s, e) for s, e in ((offset, min(end, lo * PAGE)), (max(offset, hi * PAGE), end)) if s < e]

    def _known_zero(self, inode: Inode, s: int, e: int) -> bool:
        """Whether [s, e), inside one page, reads as zeros for good, known with no read: its page
        cached and ``_end_zeroed`` there, or not cached with nothing mapped under it (a hole)."""
        idx = s // PAGE
        page = self.cache.get(inode.pages, idx)
        if page is not None:
            return self._end_zeroed(inode, idx, s - idx * PAGE, page, e - idx * PAGE)
        return not any(self.extents.mappings(inode.ino, idx * PAGE, (idx + 1) * PAGE))

    async def read_pages(self, inode: Inode, first: int, count: int) -> list[Page]:
        """Pages [first, first + count) of the file, reading what is not cached (holes read as
        zeros). Like the cache's own pages, they are valid until the caller next awaits."""
        cache, filled = self.cache, {}
        with cache.reading():  # what the first fill cached and the next one evicts stays whole
            while True:
                # the cache first, after every await: a write landing meanwhile is newer than a read
                got = cache.get_range(inode.pages, first, count)
                if None not in got:
                    return got  # type: ignore[return-value]
                got = [filled.get(first + k) if page is None else page for k, page in enumerate(got)]
                missing = [first + k for k, page in enumerate(got) if page is None]
                if not missing:
                    return got  # type: ignore[return-value]
                filled.update(await self._fill(inode, missing))

    async def _fill(self, inode: Inode, missing: list[int]) -> dict[int, bytearray]:
        """Read pages missing from the cache and cache them clean. The extents are mapped before
        the reads' awaits; if writeback or truncate changed the inode's mappings meanwhile
        (``inode.epoch`` moved), what was read may be older than the page now on disk -- which
        may have been rewritten, written back and dropped from the cache meanwhile -- or come
        from an extent freed since, whose checksums are gone. Such a fill is discarded (nothing
        is returned or cached) and ``read_pages`` tries again from the cache.

        Each extent's part is read, verified and decrypted straight into the pages it fills
        (``_read_extent_part``), holes are fresh zeroed pages, and the pages are cached in one
        go: per page, a cold read used to copy out of a buffer of the whole range (itself
        filled by a copy of the decrypted range) and zero both, at ~20 us a page."""
        epoch = inode.epoch
        filled: dict[int, bytearray] = {}
        try:
            for first, end in _stretches(missing):
                for m in list(self.extents.mappings(inode.ino, first * PAGE, end * PAGE)):
                    s, e = max(first * PAGE, m.file_offset), min(end * PAGE, m.end)
                    part = await self._read_extent_part(inode, m, s, e, epoch)
                    if part is None:  # stale: discarded below
                        break
                    filled.update(zip(range(s // PAGE, e // PAGE), part))
                for i in range(first, end):
                    if i not in filled:  # a hole
                        filled[i] = bytearray(PAGE)
        except BaseException:  # a later part failed (EIO, ENOKEY, cancelled): the earlier parts'
            wipe_all(filled)  # pages are neither returned nor cached
            raise
        if inode.epoch != epoch:  # stale: what was read is discarded, and its plaintext with it
            wipe_all(filled)
            return {}
        self.cache.put_clean(inode.pages, filled)  # each kept, or zeroed if a write filled it meanwhile
        return filled

    async def _read_extent_part(self, inode: Inode, m, s: int, e: int, epoch: int) -> list[bytearray] | None:
        """File bytes [s, e) of mapping ``m`` as fresh pages, verified and -- for an encrypted
        extent -- decrypted; None when the inode's mappings changed (from ``epoch``) while the
        device read them: ``m`` may be stale."""
        disk = m.disk_at(s)
        if (s | e | disk) % PAGE:  # only a corrupt item maps part of a sector: it cannot be verified
            raise DeviceIOError(f"inode {inode.ino}: extent at file offset {m.file_offset} is not sector-aligned")
        inode.inflight += 1
        try:
            data = await self.vol.device.read(disk, e - s)
        finally:
            inode.inflight -= 1
        if inode.epoch != epoch:
            return None
        wants = self.extents.sector_csums(disk, e - s)
        if csums.digests(data, self.vol.sb.csum_type) != wants:
            self._checksum_mismatch(inode, data, wants, s, disk)
        ctx = m.extent.context
        if ctx is None:
            sectors = memoryview(data)
            return [bytearray(sectors[off : off + PAGE]) for off in range(0, e - s, PAGE)]
        secret = self.keyring.secret_for(inode.key_id, inode.ino) if inode.key_id is not None else None
        if secret is None or ctx.key_identifier != inode.key_id:
            raise NoKeyError("Required key not available")
        key = self.extent_keys.get(secret, inode.key_id, ctx.nonce)
        unit = (m.extent.offset + s - m.file_offset) // PAGE
        if e - s <= 256 << 10:
            return fscrypt.decrypt_pages(key, data, unit)  # no await: no removal wipes the key meanwhile
        key = bytearray(key)  # the thread's own copy: a removal while it runs wipes the cache's
        try:
            job = asyncio.ensure_future(asyncio.to_thread(fscrypt.decrypt_pages, key, data, unit))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:  # the thread goes on: wipe what it decrypts
                job.add_done_callback(_wipe_result)
                raise
        finally:
            fscrypt.wipe(key)

    def _checksum_mismatch(self, inode: Inode, data: bytes, wants: bytes, s: int, disk: int) -> NoReturn:
        """EIO naming the first sector of a part read whose checksum is not the one recorded
        (or has none: the checksums stop at a gap)."""
        ctype, size = self.vol.sb.csum_type, self.extents.csum_size
        sectors = memoryview(data)
        off = next((off for k, off in enumerate(range(0, len(data), PAGE))
                    if csums.digest(ctype, sectors[off : off + PAGE]) != wants[k * size : (k + 1) * size]), 0)
        raise ChecksumError(f"inode {inode.ino}: checksum mismatch at file offset {s + off} (disk {disk + off})")

    async def sync(self) -> None:
        """syncfs(2): write back every dirty file and commit, then raise the first writeback
        error noted since the last sync reported one (``errseq``) -- a sync that returns lost
        nothing acknowledged. The file's own fsync or close reports it too, as in Linux. The
        error is taken even when the commit fails (whose error is then the one raised)."""
        self.check_mounted()
        since = self.writeback.errseq.open()
        try:
            await self.write_out()
        finally:
            err = self.writeback.errseq.end(since)
        if err is not None:
            raise err

    async def fsync_dir(self, path: PathArg) -> None:
        """fsync(2) of a directory (``open(dir, O_RDONLY)`` + ``fsync``, which ``open`` cannot
        give: it is EISDIR): its entries -- a rename into it, a new or removed name -- are
        durable once it returns. It commits (DESIGN §9), and reports no other file's writeback
        error, as Linux's fsync of a directory checks the directory's own."""
        path = as_path(path)
        inode = self._resolve(path)
        if not inode.is_dir:
            raise NotADirectory(f"{path}: not a directory")
        await self.fsync_inode(inode)

    async def write_out(self) -> None:
        """Write back every dirty file and commit, reporting no writeback error: what a sync
        does for its callers inside the filesystem (room for a write, a directory's fsync),
        which must neither fail for another file's lost data nor take its report from a sync."""
        await self.writeback.flush_all()
        await self.vol.commit()

    async def fsync_inode(self, inode: Inode) -> None:
        """A regular file's fsync goes through the log tree unless the log cannot say its change
        (``_names_changed``, a truncate); a directory's or a symlink's commits (DESIGN §9). It
        reports no writeback error: each handle reports its own (``File._report_writeback``), and
        writeback drops no directory data."""
        await self.writeback.flush_inode(inode)
        if st.S_ISREG(inode.item.mode):
            await self.vol.fsync(inode.ino)
        else:
            await self.vol.commit()


def _stretches(idxs: list[int]) -> Iterator[tuple[int, int]]:
    """[first, end) of each stretch of consecutive indexes in ``idxs`` (sorted): one at once for
    the common case, a whole cold file."""
    if idxs[-1] - idxs[0] == len(idxs) - 1:
        yield idxs[0], idxs[-1] + 1
        return
    first = prev = idxs[0]
    for i in idxs[1:]:
        if i != prev + 1:
            yield first, prev + 1
            first = i
        prev = i
    yield first, prev + 1


def _wipe_result(job: asyncio.Future[list[bytearray]]) -> None:
    """A decryption in a thread whose reader gave up on it: its pages are zeroed once it is done."""
    if not job.cancelled() and job.exception() is None:
        for page in job.result():
            fscrypt.wipe(page)


def wipe_all(pages: dict[int, bytearray]) -> None:
    """Zero plaintext copies and forget them."""
    for page in pages.values():
        fscrypt.wipe(page)
    pages.clear()


class OpenContext:
    """``await fs.open(...)`` or ``async with fs.open(...) as f``, as aiofiles.open."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self._file: File | None = None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self) -> "File":
        self._file = await self._coro
        return self._file

    async def __aexit__(self, *exc: object) -> None:
        assert self._file is not None
        await self._file.close()


@contextlib.asynccontextmanager
async def dropped_on_failure(f: "File") -> AsyncIterator["File"]:
    """The steps an open takes after making its handle (a truncate, the attributes of a file
    it created): if one fails, the caller never gets the handle, so its close reports nothing
    -- a loss no handle had reported would be raised over the step's error, a cancellation
    too (review40) -- and the delete that close may do (EROFS) is not the open's error either.
    The cursor goes as a dropped handle's: the loss is left to the other handles and the unmount."""
    try:
        yield f
    except BaseException:
        with contextlib.suppress(Exception):
            await f.close(report=False)
        raise


B = TypeVar("B", bytes, bytearray)  # what a read returns (File._pread)


def _bytes_of(data: bytearray | memoryview) -> bytearray | memoryview | bytes:
    """A buffer to write, as bytes: one whose items are not bytes (an array's, or a view with
    more than one dimension) counted items, not bytes, and its whole pages' copy into frames
    taken from the arena raised ValueError with the frames taken -- stale ones hold another
    file's plaintext, which nothing then zeroed."""
    if type(data) is bytearray:
        return data
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B") if view.c_contiguous else view.tobytes()


class File:
    """An open file: an aiofiles-like handle over the page cache."""

    def __init__(self, fs: Filesystem, inode: Inode, path: str, *, readable: bool, writable: bool, append: bool) -> None:
        self.fs = fs
        self.inode = inode
        self.name = path
        self.readable = readable
        self.writable = writable
        self.append = append
        self.pos = 0
        self.closed = False
        self._wb_seen = inode.errs.open()  # errors a handle reported before the open are not this one's

    def __del__(self) -> None:
        """A handle dropped without a close lets its cursor go when collected, as a process's
        exit closes its descriptors: else every error past it was kept for ever (fs/errseq.py).
        Not ``weakref.finalize``: that adds ~2.8 us to every open (timeit), this ~0.15 us."""
        if not getattr(self, "closed", True):
            self.inode.errs.drop(self._wb_seen)

    def _check(self, write: bool) -> None:
        """Before every read and write, so inline: as calls, the checks here and in ``_resolve``
        added 2.7 % to a stat + 4 KiB pwrite (callgrind), inline 0.3 %."""
        fs = self.fs
        if not fs.mounted:
            raise fs.vol.not_mounted()
        if self.closed:
            raise BadFile(f"{self.name}: I/O on a closed file")
        if write and not self.writable or not write and not self.readable:
            raise BadFile(f"{self.name}: file not open for {'writing' if write else 'reading'}")
        if write and fs.vol.aborted is not None:  # EROFS, as btrfs_do_write_iter: acknowledged, it would be lost
            fs.vol.check_aborted()

    async def write(self, data: bytes) -> int:
        if self.append:
            return await self._write(data, None)  # (which leaves the position at the end it wrote)
        at = self.pos
        n = await self._write(data, at)
        self.pos = at + n
        return n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> Coroutine[Any, Any, int]:
        """``_write``'s coroutine itself, to await: a coroutine of pwrite's own around it was ~5 %
        of a buffered 4 KiB pwrite's instructions (callgrind)."""
        return self._write(data, offset)

    async def _write(self, data: bytes | bytearray | memoryview, offset: int | None) -> int:
        """Write ``data`` at ``offset`` (None: at the end of the file, O_APPEND, which then moves
        the position to where the write ended); returns how much. Everything the copy depends on
        is settled after the last await: the end of file an append goes to (another append may
        have moved it), the partial pages
        to read first (a cached one may have been evicted meanwhile -- by this very read's
        pages, too) and whether what was read is still current (writeback or truncate changed
        the extents: ``inode.epoch``)."""
        self._check(True)
        inode, fs = self.inode, self.fs
        if offset is not None and operator.index(offset) < 0:
            raise InvalidArgument("negative offset")
        fs.check_dirtying(inode)
        if type(data) is not bytes:
            data = _bytes_of(data)
        n = len(data)
        if not n:
            if offset is None:
                self.pos = inode.size
            return 0
        if waited := fs.writeback.over_limit(n):
            await fs.writeback.wait_for_room(n)
        if queued := not fs.admits(n, inode):  # (else make_room would return at once)
            await fs.make_room(n, 1, inode)
        at = inode.size if offset is None else offset
        end = at + n
        if n == PAGE and not at % PAGE and end <= S.MAX_FILE_SIZE and (offset is None or offset <= inode.size
                                                                       or fs.end_settled(inode)):
            # one whole page, the commonest write: nothing to read or split, and no await since
            # the checks above but for the key removal they may have waited across
            if waited or queued:
                fs.check_dirtying(inode)
            fs.reserve_meta(inode, at // PAGE, n)
            fs.cache.writable(inode.pages, at // PAGE, overwrite=True)[:] = data
        else:
            at, end = await self._write_partial(data, offset, queued)
        if end > inode.size:
            inode.size = end
        if offset is None:
            self.pos = end
        inode.data_changed_ns = time.time_ns()
        if fs.cache.dirty_bytes > fs.writeback.background_bytes:
            fs.writeback.kick()  # (every write past the threshold asks; a call to ask was ~2 % of every write)
        fs.unyielded += n
        if fs.unyielded >= YIELD_BYTES:
            # a writer that never waits would starve the loop: sealing workers' replies and
            # device completions sit unread while it copies; let them in every so often
            fs.unyielded = 0
            await asyncio.sleep(0)
        return n

    async def _write_partial(self, data: bytes | bytearray | memoryview, offset: int | None,
                             queued: bool) -> tuple[int, int]:
        """A write that is not one whole aligned page: read the partial pages at its ends, then
        copy with no await in between; returns where it landed, [at, end). Once the write has
        had its turn in the room queue (``queued``: ``make_room``), room is checked again after
        each read, not the queue: an operation that began writing out during the read made it
        queue a second time (under cache pressure every partial page is read from disk)."""
        inode, fs, n = self.inode, self.fs, len(data)
        fills: dict[int, bytearray] = {}  # plaintext copies of partial pages: zeroed however this ends
        epoch = inode.epoch
        try:
            while True:
                at = inode.size if offset is None else offset
                end = at + n
                if inode.epoch != epoch:  # what was read predates the extents' change: stale
                    wipe_all(fills)
                    epoch = inode.epoch
                missing = [i for i in self._partial_pages(at, end) if i not in fills]
                if missing:
                    await self._read_partial(missing, fills)
                elif not (fs.room_for(n, 1, inode) if queued else fs.admits(n, inode)):  # others took it meanwhile
                    await fs.make_room(n, 1, inode)
                    queued = True
                elif offset is not None and offset > inode.size and not fs.end_settled(inode):
                    # past the end: checked here, after the last await -- checked before the
                    # waits for room, a truncate down meanwhile left a new end page zeroed only
                    # in the cache, and a failed writeback then showed its old bytes (review32)
                    await fs.zero_past_eof(inode)
                else:
                    break
            if end > S.MAX_FILE_SIZE:
                raise FileTooBig(f"a write to [{at}, +{n}) would pass the largest file size {S.MAX_FILE_SIZE}")
            # no await from here on: the write lands whole, and a key removal that began while it
            # waited (for room, or for its partial pages) is seen before anything is dirtied
            fs.check_dirtying(inode)
            fs.reserve_meta(inode, at // PAGE, n)
            self._copy_in(memoryview(data), at, fills)
        finally:
            wipe_all(fills)
        return at, end

    def _partial_pages(self, offset: int, end: int) -> list[int]:
        """Pages the write covers only in part and that hold data not in the cache."""
        edges = {offset // PAGE} if offset % PAGE else set()
        if end % PAGE:
            edges.add(end // PAGE)
        inode = self.inode
        return [i for i in edges if i not in inode.pages.pages and i * PAGE < inode.size]

    async def _read_partial(self, idxs: list[int], into: dict[int, bytearray]) -> None:
        """Read-modify-write: the current contents of the partial pages, as copies (a cached page
        is only valid until the next await) put straight ``into`` the caller's dict, which zeroes
        them however the write ends -- a read failing half way included."""
        for i in idxs:
            into[i] = bytearray((await self.fs.read_pages(self.inode, i, 1))[0])

    def _copy_in(self, mv: memoryview, offset: int, fills: dict[int, bytearray]) -> None:
        """Copy into the page cache: whole pages in the middle in one go, the edges page by page."""
        cache, pages = self.fs.cache, self.inode.pages
        end = offset + len(mv)
        lo, hi = -(-offset // PAGE), end // PAGE  # the whole pages [lo, hi)
        parts = [(offset, end)]
        if hi - lo > 1:
            cache.put_dirty(pages, lo, mv[lo * PAGE - offset : hi * PAGE - offset])
            parts = [(offset, lo * PAGE), (hi * PAGE, end)]
        for start, stop in parts:
            pos = start
            while pos < stop:
                idx, off = divmod(pos, PAGE)
                take = min(PAGE - off, stop - pos)
                page = cache.writable(pages, idx, fills.get(idx), overwrite=take == PAGE)
                page[off : off + take] = mv[pos - offset : pos - offset + take]
                pos += take

    async def read(self, size: int | None = -1) -> bytes:
        # -1 (or None, as a Python file's read): to the end, which a seek may have left the position past
        if size is None or operator.index(size) < 0:
            size = max(self.inode.size - self.pos, 0)
        data = await self.pread(size, self.pos)
        self.pos += len(data)
        return data

    async def pread(self, size: int, offset: int) -> bytes:
        return await self._pread(size, offset, b"")

    async def pread_wipeable(self, size: int, offset: int) -> bytearray:
        """``pread``, as a ``bytearray`` its caller zeroes once it is done with it: the FUSE
        server's reply, which would otherwise be freed with the plaintext in it."""
        return await self._pread(size, offset, bytearray())

    async def _pread(self, size: int, offset: int, joiner: B) -> B:
        """The bytes at [offset, +size), joined by ``joiner`` (so of its type)."""
        self._check(False)
        size, offset = operator.index(size), operator.index(offset)  # TypeError for 1.5, as os.pread: not a short read
        if offset < 0:  # pread(2)'s EINVAL, as pwrite's: else "page -1" read as zeros
            raise InvalidArgument("negative offset")
        if size < 0:  # as os.pread (read's -1, "to the end", is resolved before this)
            raise InvalidArgument("negative size")
        inode = self.inode
        end = min(offset + size, inode.size)
        if end <= offset:
            return joiner[:0]
        first, last = offset // PAGE, (end - 1) // PAGE
        try:
            pages = await self.fs.read_pages(inode, first, last - first + 1)
            # the ends trimmed as views, so the one copy made is the one returned (no plaintext
            # left behind in a discarded intermediate)
            pages[-1] = memoryview(pages[-1])[: end - last * PAGE]
            pages[0] = memoryview(pages[0])[offset - first * PAGE :]
            return joiner.join(pages)
        finally:
            if self.closed:  # closed while this read was in flight: close could not lock then
                self.fs.lock_if_idle(inode)

    def _check_open(self) -> None:
        """Mounted and not closed -- what seek and tell need, which neither read nor write (a
        write-only file seeks): a closed file's are EBADF, as lseek(2) on a closed descriptor."""
        self.fs.check_mounted()
        if self.closed:
            raise BadFile(f"{self.name}: I/O on a closed file")

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        offset = operator.index(offset)
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.inode.size}.get(whence)
        if base is None or not 0 <= base + offset <= S.MAX_FILE_SIZE:  # lseek(2)'s EINVAL both ways
            raise InvalidArgument("bad seek")
        self.pos = base + offset
        return self.pos

    async def tell(self) -> int:
        self._check_open()
        return self.pos

    async def truncate(self, size: int | None = None) -> int:
        self._check(True)
        size = self.pos if size is None else size
        await self.fs.truncate_inode(self.inode, size)
        return size

    async def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) of [offset, offset + length)."""
        self._check(True)
        await self.fs.punch_inode(self.inode, offset, length)

    async def fsync(self) -> None:
        """Returns when this file's data and metadata are durable; raises the writeback error
        (ENOKEY, EIO, ENOSPC) recorded since the last fsync, so a lost write is never silent."""
        self.fs.check_mounted()
        if self.closed:
            raise BadFile(f"{self.name}: I/O on a closed file")
        await self.fs.fsync_inode(self.inode)
        if self.closed:  # closed meanwhile: the close let the cursor go and reported what it held
            raise BadFile(f"{self.name}: closed while its fsync ran")
        self._report_writeback()

    def _report_writeback(self, *, closing: bool = False) -> None:
        """Raise the first writeback error of the file noted since this handle last reported
        one (or was opened), with the bytes lost since: every open handle reports each error
        once, as Linux's per-file errseq -- a second handle's fsync never returns success over
        a loss the first one reported. ``closing`` lets the handle's cursor go."""
        errs = self.inode.errs
        mine = errs.take(self._wb_seen) if closing else errs.advance(self._wb_seen)
        if mine:
            raise file_error(self.inode.ino, mine)

    async def flush(self) -> None:
        """Python-level flush: nothing is buffered above the page cache."""
        self.fs.check_mounted()

    async def close(self, *, report: bool = True) -> None:
        """The one call an unmount leaves working: the handle is let go (as close(2) of a
        descriptor whose filesystem was detached); the unmount did the rest: it reported what
        writeback lost, and an unlinked file still open is left to the next mount's orphan
        recovery. ``report=False`` (a handle its caller never got, or a close cancelled): the
        cursor goes as a dropped handle's, what it held left to the other handles and the
        unmount -- raised here, it took a cancellation's place (review40)."""
        if self.closed:
            return
        self.closed = True
        if not self.fs.mounted:
            return
        inode, fs = self.inode, self.fs
        inode.open_count -= 1
        try:
            if inode.item.nlink == 0 and not inode.open_count:
                async with inode.wb_lock, fs.vol.join():
                    fs._destroy(inode)
            else:
                fs.lock_if_idle(inode)
        except BaseException as e:  # a delete that failed (EROFS) still lets the cursor go; a loss it held outranks that
            report = report and isinstance(e, Exception)
            raise
        finally:
            if report:
                self._report_writeback(closing=True)
            else:
                inode.errs.drop(self._wb_seen)

    async def __aenter__(self) -> "File":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[bytes]:
        rest = await self.read()
        for line in rest.splitlines(keepends=True):
            yield line


class MountContext:
    """``await blockemu.mount(...)`` or ``async with blockemu.mount(...) as fs``."""

    def __init__(self, path: str, **kw: Any) -> None:
        self._coro = Filesystem.mount(path, **kw)
        self._fs: Filesystem | None = None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self) -> Filesystem:
        self._fs = await self._coro
        return self._fs

    async def __aexit__(self, *exc: object) -> None:
        assert self._fs is not None
        await self._fs.unmount()


def mount(path: str, **kw: Any) -> MountContext:
    return MountContext(path, **kw)


__all__ = ["Filesystem", "File", "Stat", "mount"]
