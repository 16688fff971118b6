"""mkfs: an image holding an empty filesystem (generation 1), sparse or (``preallocate``) laid
out whole."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import sys
import time
import uuid as uuidlib
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, NoReturn

from blockemu.device.blockdev import BlockDevice
from blockemu.device.imagelock import open_image, sync_parent
from blockemu.display import bar
from blockemu.engine.transaction import Engine
from blockemu.errors import (
    CrossDevice,
    ExistsError,
    ImageInUse,
    InvalidArgument,
    IsADirectory,
    NoSpaceError,
    NotADirectory,
    TooManyLinks,
)
from blockemu.fs import hostxattrs
from blockemu.fs.volume import Volume
from blockemu.ondisk import csum as csums
from blockemu.ondisk.items import InodeItem, InodeRef, Timespec
from blockemu.ondisk.structs import (
    FIRST_FREE_OBJECTID,
    FS_TREE_OBJECTID,
    INCOMPAT_ENCRYPTED_NAMES,
    INCOMPAT_EXTENDED_IREF,
    INODE_ITEM,
    INODE_REF,
    LABEL_SIZE,
    MAX_NODE_SIZE,
    MIN_NODE_SIZE,
    RESERVED_START,
    SECTOR_SIZE,
)
from blockemu.ondisk.superblock import SuperInfo
from blockemu.units import human, parse_size

MIN_SIZE = 16 << 20
MAX_SIZE = (1 << 63) - SECTOR_SIZE  # a file offset is a signed 64-bit off_t: past it ftruncate overflowed
ROOT_DIR = FIRST_FREE_OBJECTID
LAYOUT_CHUNK = 4 << 20  # zeros per pwrite when preallocating: big enough that the calls cost nothing beside the writes


def new_inode(mode: int, transid: int, now_ns: int, nlink: int = 1, size: int = 0) -> InodeItem:
    ts = Timespec.from_ns(now_ns)
    return InodeItem(transid, transid, size, 0, 0, nlink, 0, 0, mode, 0, 0, 0, ts, ts, ts, ts)


class Options(NamedTuple):
    """mkfs's values as the image takes them."""

    nbytes: int
    nodesize: int
    csum_type: int
    fsid: bytes


def check_options(size: str | int, node_size: str | int, csum: str, label: str, uuid: str | None) -> Options:
    """Validate mkfs's values (``size`` as given) before anything is touched: every one refused
    is InvalidArgument, which the CLI says as a usage error (exit 2) -- a bad value, as one
    that does not parse, is the command line's fault."""
    nbytes = parse_size(size) // SECTOR_SIZE * SECTOR_SIZE
    nodesize = parse_size(node_size)
    if nbytes < MIN_SIZE:
        raise InvalidArgument(f"size {size} is too small: the minimum is {MIN_SIZE >> 20}M ({MIN_SIZE} bytes)")
    if nbytes > MAX_SIZE:
        raise InvalidArgument(f"size {size} is too large: a file holds at most {MAX_SIZE} bytes")
    if nodesize < MIN_NODE_SIZE or nodesize > MAX_NODE_SIZE or nodesize & (nodesize - 1):
        raise InvalidArgument(f"node size {nodesize} must be a power of two from 4K to 64K")
    if csum not in csums.BY_NAME:
        raise InvalidArgument(f"unknown checksum {csum!r}: choose one of {', '.join(csums.BY_NAME)}")
    if len(label.encode()) >= LABEL_SIZE or "\n" in label:
        raise InvalidArgument(f"label must be under {LABEL_SIZE} bytes and on one line")
    try:
        fsid = uuidlib.UUID(uuid).bytes if uuid else uuidlib.uuid4().bytes
    except ValueError:
        raise InvalidArgument(f"bad uuid {uuid!r}") from None
    return Options(nbytes, nodesize, csums.BY_NAME[csum], fsid)


def check_target(path: str, force: bool) -> None:
    """Refuse a directory, or a non-empty file without ``force``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectory(f"{path}: is a directory")
    if st.st_size > 0 and not force:
        raise ExistsError(f"{path} exists and is not empty (use --force to overwrite)")


def check_room(fd: int, path: str, nbytes: int) -> None:
    """``--preallocate`` writes every byte of the image: refused before anything is written
    when the host's free space (what ``df`` says is available, not root's reserve; the blocks
    of the file ``--force`` replaces count, they are freed first) cannot hold it -- failing
    when the host filled up, halfway, had already deleted the image --force was to replace."""
    st = os.fstatvfs(fd)
    room = st.f_bavail * st.f_frsize + os.fstat(fd).st_blocks * 512
    if room < nbytes:
        raise NoSpaceError(f"{path}: the host has {human(room)} free, too little to preallocate the image's "
                           f"{human(nbytes)} (without --preallocate the image is sparse: it takes what is written)")


async def lay_out(fd: int, path: str, nbytes: int, progress: bool) -> None:
    """Write every byte of the image once, zeros, as ``qemu-img create -o preallocation=full``
    or ``dd if=/dev/zero`` lays out a raw disk: a block's first write into a sparse image makes
    the host allocate it, and the next fdatasync then commits the host's journal (0.97 ms a
    flush against 0.41 ms for the same writes into blocks written once, DESIGN §10), so a
    flush measured the host's allocation, not the device. posix_fallocate is not enough: its
    unwritten extents are converted on the first write, a journal commit as well (1.0-1.25 ms).
    A failure of the host (ENOSPC past ``check_room``, EIO) names the image and how far it got.
    The loop is let in after each chunk: Ctrl-C (asyncio.run cancels the task at its next await)
    stopped a 1 TiB layout only once it was done."""
    zeros = memoryview(bytes(min(LAYOUT_CHUNK, nbytes)))
    done = 0
    with bar("mkfs --preallocate", nbytes, progress) as advance:
        try:
            while done < nbytes:
                n = os.pwrite(fd, zeros[: nbytes - done], done)
                done += n
                advance(n)
                await asyncio.sleep(0)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror}: the host took {human(done)} of the {human(nbytes)} to "
                                   "preallocate; the image is removed", path) from None


def encrypt_target(encrypt: str) -> str:
    return "/" + "/".join(p for p in encrypt.split("/") if p)


Plan = list[tuple[str, "str | None"]]  # (image path, host file or symlink, None for a directory), parents first
Sources = list[tuple[str, str]]  # (image path, the host entry whose mode, owner and times it takes), parents first
Skipped = list[tuple[str, str]]  # (host entry, why populate leaves it out)


def file_id(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file ``path`` names, None if there is none: ``put`` and
    ``--rootdir`` compare a host file's with the image's -- copied in, the image was read
    half-written into itself."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse(e: OSError) -> NoReturn:
    """A directory the walk cannot list (permission denied, gone) fails mkfs, as a file it cannot
    read does: os.walk leaves it out by default, and ``--rootdir`` made an image without it, and
    everything under it, exit 0, no word."""
    raise e


def plan_population(rootdir: str | None, encrypt: str | None, image: str) -> tuple[Plan, Skipped, Sources]:
    """What ``populate`` will create, the host entries it skips (and why), and where each entry's
    metadata comes from. Checked before mkfs writes anything, so a bad ``--encrypt`` leaves no
    half-built image behind. ``image`` itself, when it is in ``rootdir`` already (``--force``, or
    an empty file), is skipped as it is when mkfs creates it there, after this walk: copied, it
    was the image read half-written into itself."""
    plan: Plan = []
    skipped: Skipped = []
    sources: Sources = []
    if rootdir is not None:
        own = file_id(image)  # once, not per entry
        for top, dirs, files in os.walk(rootdir, onerror=refuse):
            dirs.sort()
            rel = os.path.relpath(top, rootdir)
            base = "" if rel == "." else "/" + rel.replace(os.sep, "/")
            if base:
                plan.append((base, None))
            sources.append((base or "/", top))
            links = [d for d in dirs if os.path.islink(os.path.join(top, d))]  # os.walk lists, never enters them
            dirs[:] = [d for d in dirs if d not in links]
            for name in sorted(files + links):
                host = os.path.join(top, name)
                try:
                    st = os.lstat(host)  # one stat an entry: a link is copied as a link
                except OSError:  # gone since the walk listed it
                    st = None
                if st is None or not stat.S_ISLNK(st.st_mode) and not stat.S_ISREG(st.st_mode):
                    skipped.append((host, "not a regular file, directory or symbolic link"))
                    continue
                if not stat.S_ISLNK(st.st_mode) and (st.st_dev, st.st_ino) == own:
                    skipped.append((host, "the image being made"))
                    continue
                plan.append((f"{base}/{name}", host))
                sources.append((f"{base}/{name}", host))
    if encrypt is not None:
        files = dict(plan)
        target = encrypt_target(encrypt)
        parts = target.split("/")[1:] if target != "/" else []
        chain = ["/" + "/".join(parts[:depth]) for depth in range(1, len(parts) + 1)] or ["/"]
        for path in chain:
            if files.get(path):
                raise NotADirectory(f"--encrypt {encrypt}: {path} is not a directory (it is the file {files[path]})")
        # the encrypted directory, and any parent --rootdir lacks, made first
        plan[:0] = [(path, None) for path in chain if path not in files]
    return plan, skipped, sources


async def mkfs(
    path: str,
    size: str | int,
    *,
    node_size: str | int = "16K",
    csum: str = "crc32c",
    label: str = "",
    uuid: str | None = None,
    force: bool = False,
    rootdir: str | None = None,
    encrypt: str | None = None,
    key: bytes | None = None,
    progress: bool = False,
    preallocate: bool = False,
) -> SuperInfo:
    """Create the image; with ``rootdir``, populate it from a host directory (as
    ``mkfs.btrfs --rootdir``), ``encrypt`` naming a directory inside the image that gets an
    encryption policy for ``key`` before its contents are copied. ``preallocate``: every
    byte of the image is written once (``lay_out``), else it is sparse. ``progress``: a bar
    for the preallocation and the copy. Returns the superblock."""
    if encrypt is not None and key is None:
        raise InvalidArgument("--encrypt needs --key-file")
    if encrypt is not None and key is not None:  # refused here, not by set_policy after --force truncated the image
        from blockemu.crypto.keyring import check_policy_key  # only here: a plain mkfs loads no cipher

        check_policy_key(key, encrypt_target(encrypt))
    if rootdir is not None and not os.path.isdir(rootdir):
        raise InvalidArgument(f"--rootdir {rootdir}: not a directory")
    nbytes, nodesize, csum_type, fsid = check_options(size, node_size, csum, label, uuid)
    populating = rootdir is not None or encrypt is not None
    plan, skipped, sources = plan_population(rootdir, encrypt, path) if populating else ([], [], [])
    check_target(path, force)
    existed = os.path.exists(path)
    fd = open_image(path, readonly=False, create=True)  # locked before anything is written
    # what a failure removes: the file written, not a symbolic link to it (removing the link left
    # the half-built image at its target)
    made = os.path.realpath(path)
    try:
        if preallocate:
            check_room(fd, path, nbytes)
        # the host's file size limit (EFBIG: ext4 holds 16 TiB) is met before the old contents
        # go: --force with a size the host refused deleted the image it was to replace and made
        # none. A file already as large holds the size; a larger one is grown, contents kept
        old_size = os.fstat(fd).st_size
        if nbytes > old_size:
            os.ftruncate(fd, nbytes)
        # then drop any old contents, and extend: the image is sparse until lay_out. A new file
        # has none, and is not cut to 0: ext4 takes that for a file being replaced and writes
        # back all written since at its close -- a preallocation stopped 2 GiB in (Ctrl-C, ENOSPC)
        # took 5.7 s to close and remove its file, 0.35 s without
        if old_size:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, nbytes)
        dev = BlockDevice(path, fd)
    except BaseException as e:
        os.close(fd)
        if not existed:  # the empty file this made was no image
            with contextlib.suppress(FileNotFoundError):
                os.unlink(made)
        if type(e) is OSError and e.filename is None:  # the bare "File too large" named no file
            raise OSError(e.errno, e.strerror, path) from e
        raise
    try:
        if preallocate:
            await lay_out(fd, path, nbytes, progress)
        sb = SuperInfo(
            fsid=fsid,
            generation=0,
            root=RESERVED_START,
            root_level=0,
            total_bytes=nbytes,
            bytes_used=0,
            nodesize=nodesize,
            csum_type=csum_type,
            label=label,
            incompat_flags=INCOMPAT_ENCRYPTED_NAMES | INCOMPAT_EXTENDED_IREF,
        )
        engine = Engine.create(sb)
        now = time.time_ns()
        fs = engine.trees[FS_TREE_OBJECTID]
        fs.insert((ROOT_DIR, INODE_ITEM, 0), new_inode(stat.S_IFDIR | 0o755, 1, now, nlink=2).pack())
        fs.insert((ROOT_DIR, INODE_REF, ROOT_DIR), InodeRef(0, b"..").pack())
        vol = Volume(dev, engine)
        await vol.close()
        if not existed:
            sync_parent(made)
        if not populating:
            return vol.sb
        await populate(path, plan, skipped, sources, encrypt, key, progress)
        return read_super(path)
    except ImageInUse:
        raise  # another process took the image between mkfs's write and populate's mount: theirs now
    except BaseException:
        # a half-built image is worse than none: what was there is gone already (truncated)
        dev.close_sync()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(made)
        raise


def read_super(path: str) -> SuperInfo:
    from blockemu.device.image import ImageFile

    with ImageFile.open(path) as img:
        return img.best_super()


async def populate(image: str, plan: Plan, skipped: Skipped, sources: Sources, encrypt: str | None,
                   key: bytes | None, progress: bool) -> None:
    """Copy a host tree into the image, top-down, so an encrypted directory gets its policy while
    empty; as mkfs.btrfs --rootdir, host files that are hard links of one another become one inode
    with as many names, and every entry keeps its mode, owner and times -- set last, children
    before parents, so the names added to a directory do not move its mtime after."""
    from blockemu.fs.filesystem import mount

    enc = encrypt_target(encrypt) if encrypt is not None else None
    total = sum(os.path.getsize(h) for _, h in plan if h and not os.path.islink(h)) or 1
    copied: dict[tuple[int, int], str] = {}  # a host inode with several names -> its first image path
    gone: set[str] = set()  # planned files the host swapped for something else since the walk
    async with mount(image, interval=3600) as fs:
        kid = await fs.add_key(key) if key is not None else None
        with bar("mkfs --rootdir", total, progress) as advance:
            for target, host in plan:
                if host is None:
                    if not await fs.exists(target):
                        await fs.mkdir(target)
                    if target == enc:
                        await fs.set_policy(target, kid)
                    continue
                if os.path.islink(host):  # copied as a link (its target encrypted in an encrypted directory)
                    await fs.symlink(os.readlink(host), target)
                    continue
                src = open_regular(host)
                if src is None:
                    skipped.append((host, "no longer a regular file (replaced since the walk)"))
                    gone.add(target)
                    continue
                with src:
                    await copy_file(fs, src, host, target, copied, advance)
            for target, host in reversed(sources):
                if target in gone:
                    continue
                hst = os.lstat(host)
                await fs.set_attrs(fs.inode((await fs.stat(target)).st_ino), mode=hst.st_mode, uid=hst.st_uid,
                                   gid=hst.st_gid, atime_ns=hst.st_atime_ns, mtime_ns=hst.st_mtime_ns)
    for host, why in skipped:
        print(f"blockemu mkfs: skipped {host}: {why}", file=sys.stderr)
    for line in hostxattrs.lines(hostxattrs.dropped(host for _, host in sources)):
        print(line, file=sys.stderr)


def open_regular(host: str) -> BinaryIO | None:
    """The host file the walk found regular, opened for reading -- None if it no longer is one.
    Opened as tar and rsync open it, O_NOFOLLOW | O_NONBLOCK, then checked by fstat: a file
    swapped for a fifo since the walk blocked mkfs in open() waiting for a writer, and one
    swapped for a link was followed (ELOOP, or a fifo's open without a reader, is no longer one)."""
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a link now; a socket (ENXIO)
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


async def copy_file(fs: Any, src: BinaryIO, host: str, target: str, copied: dict[tuple[int, int], str],
                    advance: Callable[[int], None]) -> None:
    """One planned regular file into the image at ``target``: a further name of a host inode
    already copied (``copied``) is linked to it, as mkfs.btrfs --rootdir does, unless the image
    refuses the link; else its bytes are copied."""
    hst = os.fstat(src.fileno())
    if hst.st_nlink > 1 and (first := copied.get((hst.st_dev, hst.st_ino))) is not None:
        try:
            await fs.link(first, target)
            advance(hst.st_size)
            return
        except CrossDevice:  # fscrypt lets no name into an encrypted directory from outside it
            print(f"blockemu mkfs: {host}: copied, not linked to {first}: a hard link cannot "
                  f"enter an encrypted directory from outside it", file=sys.stderr)
        except TooManyLinks:
            # it has the most names one inode may: a copy takes this name and the next
            # ones (mkfs failed there, halfway through the tree)
            print(f"blockemu mkfs: {host}: copied, not linked to {first}: {first} has as many "
                  f"names as one inode can", file=sys.stderr)
            copied.pop((hst.st_dev, hst.st_ino))
    async with fs.open(target, "w") as f:
        await copy_in(f, src, host, advance)
    copied.setdefault((hst.st_dev, hst.st_ino), target)


async def copy_in(f: Any, src: BinaryIO, host: str, advance: Callable[[int], None] = lambda n: None) -> None:
    """A host file's bytes into the image file ``f`` (mkfs --rootdir, put), its holes left holes
    (a 50 MiB sparse file took 50 MiB of zeros in the image, as ``cp --sparse=never``); a full
    image names the host file that did not fit. A pipe or a device (``put - PATH``, ``put
    /dev/stdin PATH``) is read to its end, as cp reads it: its size, 0, made an empty file. So
    is a regular file past its size: /proc's and sysfs's files say 0 (``put /proc/cpuinfo``
    made an empty file), and one still growing holds more than fstat said."""
    st, copied = os.fstat(src.fileno()), 0
    regular = stat.S_ISREG(st.st_mode)

    async def run(start: int, end: int | None) -> int:
        """[start, end) of the source, read from where it stands; ``end`` None: to its end.
        Returns where it stopped."""
        nonlocal copied
        while (n := 1 << 20 if end is None else min(1 << 20, end - start)) > 0 and (chunk := src.read(n)):
            await f.pwrite(chunk, start)
            start += len(chunk)
            copied += len(chunk)
            advance(len(chunk))
        return start
    try:
        if not regular:
            await run(0, None)
        for start, end in data_runs(src.fileno(), st.st_size) if regular else ():
            src.seek(start)
            await run(start, end)
        if regular:
            src.seek(st.st_size)
            await f.truncate(await run(st.st_size, None))  # the size: a trailing hole's end, or past it
    except NoSpaceError as e:
        what = f"{st.st_size} bytes" if regular else f"{copied} bytes read"
        raise NoSpaceError(f"{host} ({what}) does not fit in the image: {e}") from None
    advance(max(0, st.st_size - copied) if regular else 0)  # the holes: the bar counts the files' sizes


def data_runs(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The [start, end) runs of a host file's first ``size`` bytes that hold data (SEEK_DATA /
    SEEK_HOLE); the whole file as one run where the host filesystem cannot tell."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from pos on
                return
            if e.errno != errno.EINVAL:
                raise
            start = pos
            end = size
        else:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        if start >= size:
            return
        yield start, min(end, size)
        pos = end
