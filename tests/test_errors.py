"""Errors Python code can catch as it catches os's (issue 11, item 4)."""
from __future__ import annotations

import contextlib
import errno
import os

import pytest

import blockemu
from blockemu import errors
from blockemu.errors import BlockemuError


def every_error_class() -> list[type[BlockemuError]]:
    seen, todo = [], [BlockemuError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    return seen


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
def test_each_error_has_the_builtin_class_of_its_errno(cls):
    builtin = type(OSError(cls.code, "x"))  # what os would raise for this errno
    assert issubclass(cls, builtin), f"{cls.__name__} (errno {errno.errorcode[cls.code]}) should derive from {builtin.__name__}"


def test_message_and_errno_survive():
    e = errors.NotFoundError("/a: no such file or directory")
    assert isinstance(e, FileNotFoundError) and e.errno == errno.ENOENT and str(e) == "/a: no such file or directory"
    k = errors.NoKeyError("Required key not available")
    assert type(k).__mro__[1:] == (BlockemuError, OSError, Exception, BaseException, object)
    assert k.errno == errno.ENOKEY


async def test_the_api_raises_what_os_would(tmp_path):
    img = str(tmp_path / "e.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        await fs.mkdir("/d")
        async with fs.open("/f", "w") as f:
            await f.write(b"x")
        with pytest.raises(FileNotFoundError):
            await fs.open("/missing")
        with pytest.raises(FileExistsError):
            await fs.mkdir("/d")
        with pytest.raises(FileExistsError):
            await fs.open("/f", "x")
        with pytest.raises(IsADirectoryError):
            await fs.open("/d", "r")
        with pytest.raises(IsADirectoryError):
            await fs.unlink("/d")
        with pytest.raises(NotADirectoryError):
            await fs.readdir("/f")
        with pytest.raises(NotADirectoryError):
            await fs.mkdir("/f/sub")
        with pytest.raises(FileNotFoundError):
            await fs.stat("/d/nothing")
    with pytest.raises(FileNotFoundError):
        await blockemu.mount(str(tmp_path / "no.img"))
    with pytest.raises(IsADirectoryError):
        await blockemu.mount(str(tmp_path))


async def test_the_root_as_a_name_to_make_or_remove_fails_as_on_linux(tmp_path):
    """mkdir("/") said EINVAL "the root has no parent"; Linux says EEXIST for what would create
    "/", EISDIR for unlink, EBUSY for rename (checked against os on the host's own root)."""
    img = str(tmp_path / "r.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x")
        for call, err, host in [(fs.mkdir("/"), FileExistsError, lambda: os.mkdir("/")),
                                (fs.link("/f", "/"), FileExistsError, None),
                                (fs.symlink("f", "/"), FileExistsError, lambda: os.symlink("f", "/")),
                                (fs.unlink("/"), IsADirectoryError, None),
                                (fs.rename("/", "/x"), OSError, None),
                                (fs.rename("/f", "/"), OSError, None)]:
            with pytest.raises(err) as e:
                await call
            if host is not None:
                with pytest.raises(err) as h:
                    host()
                assert e.value.errno == h.value.errno
        assert e.value.errno == errno.EBUSY and str(e.value) == "/: device or resource busy"
        assert await fs.readdir("/") == ["f"]


async def test_stat_has_the_float_times_of_os_stat_result(tmp_path):
    img = str(tmp_path / "s.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x")
        s = await fs.stat("/f")
    host = os.stat(img)
    for name in ("st_atime", "st_mtime", "st_ctime"):
        assert isinstance(getattr(s, name), float) and isinstance(getattr(host, name), float)
        assert getattr(s, name) == getattr(s, name + "_ns") / 1e9
    assert abs(s.st_mtime - host.st_mtime) < 60


async def test_a_power_cut_planned_through_the_api(tmp_path):
    """``blockemu.FaultPlan`` (the CLI's --faults SPEC) is part of the API, as DESIGN §8 shows:
    the newcomer found ``faults=`` only by reading the source."""
    img = str(tmp_path / "cut.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img) as fs:
        async with fs.open("/kept", "w") as f:
            await f.write(b"acknowledged")
            await f.fsync()
    fs = await blockemu.mount(img, faults=blockemu.FaultPlan.parse("cut=0"))
    f = await fs.open("/lost", "w")
    await f.write(b"never durable")
    with pytest.raises(OSError) as e:
        await f.fsync()
    assert e.value.errno == errno.EIO
    with contextlib.suppress(OSError):
        await fs.unmount()
    async with blockemu.mount(img) as fs:
        assert await (await fs.open("/kept")).read() == b"acknowledged"
        assert not await fs.exists("/lost")
    assert (await blockemu.fsck(img)).clean


async def test_a_size_mount_option_takes_a_size_as_mkfs_does(tmp_path):
    """``mkfs(size="64M")`` took a size and ``mount(dirty_limit="1M")`` was refused as "not str"
    (a newcomer's trial): the options that are byte counts take sizes too."""
    img = str(tmp_path / "s.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, dirty_limit="2M", max_extent="64K", cache_limit="1m") as fs:
        assert (fs.writeback.dirty_limit, fs.writeback.max_pages) == (2 << 20, 16)


@pytest.mark.parametrize("opts, says", [
    ({"seal_workers": -1}, "bad value for mount option seal_workers: -1 (must be at least 0)"),
    ({"dirty_limit": -5}, "bad value for mount option dirty_limit: -5 (must be at least 4096)"),
    ({"interval": 0}, "bad value for mount option interval: 0 (must be more than 0)"),
    ({"interval": float("nan")}, "bad value for mount option interval: nan (must be more than 0)"),
    ({"seal_timeout": float("nan")}, "bad value for mount option seal_timeout: nan (must be more than 0)"),
    ({"cache_limit": "8Q"}, "bad value for mount option cache_limit: '8Q' (must be a size, as 128M)"),
    ({"interval": "5"}, "bad value for mount option interval: '5' (must be a number, not str)"),
    ({"dirty_limit": "1K"}, "bad value for mount option dirty_limit: 1024 (must be at least 4096)"),
    ({"interval": True}, "bad value for mount option interval: True (must be a number, not bool)"),
    ({"dirty_limt": 1 << 20}, "unknown mount option 'dirty_limt'"),
])
async def test_a_bad_mount_option_is_einval_naming_it_and_opens_nothing(tmp_path, opts, says):
    """``mount(seal_workers=-1)`` and ``dirty_limit=-5`` mounted (review11), and a misspelt
    keyword was a TypeError: each is the OSError a caller catches, before the image is opened."""
    img = str(tmp_path / "o.img")
    await blockemu.mkfs(img, size="32M")
    with pytest.raises(OSError) as e:
        await blockemu.mount(img, **opts)
    assert e.value.errno == errno.EINVAL and says in str(e.value)
    async with blockemu.mount(img, seal_workers=0):  # nothing left held: it mounts at once
        pass


async def test_a_negative_offset_or_size_is_einval_for_pread(tmp_path):
    """``pread(4, -1)`` returned ``b"\\x00012"`` -- a zero from "page -1", then the file's
    first bytes -- and ``pread(4, -5)`` four zeros, where pread(2) (and ``os.pread``, and this
    API's own ``pwrite``) fail with EINVAL (a newcomer's trial)."""
    img = str(tmp_path / "p.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"0123456789")
        async with fs.open("/f", "r") as f:
            for offset in (-1, -5, -4097):
                with pytest.raises(OSError) as e:
                    await f.pread(4, offset)
                assert e.value.errno == errno.EINVAL and str(e.value) == "negative offset"
            assert await f.pread(4, 0) == b"0123"
            # pread(-1, 0) returned b"" where os.pread fails with EINVAL; read(-1) (any negative
            # size) still reads to the end, as a Python file's read does
            with pytest.raises(OSError) as e:
                await f.pread(-1, 0)
            assert e.value.errno == errno.EINVAL and str(e.value) == "negative size"
            assert await f.read(-2) == b"0123456789"
            await f.seek(20)  # past the end: nothing to read, not a negative size
            assert await f.read() == b""


async def test_a_name_with_a_null_byte_is_einval(tmp_path):
    """``open("/a\\0b", "w")`` made a file named ``a\\0b``: no program can name it through a
    mount (a path is a C string), and os refuses such a path ("embedded null byte"). A symbolic
    link's target too: readlink through a mount showed it cut at the NUL."""
    img = str(tmp_path / "n.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        for call in (fs.open("/a\0b", "w"), fs.mkdir("/d\0"), fs.stat("/\0"), fs.symlink("a\0b", "/s")):
            with pytest.raises(OSError) as e:
                await call
            assert e.value.errno == errno.EINVAL and "embedded null byte" in str(e.value)
        assert await fs.readdir("/") == []


async def test_removing_or_moving_dot_fails_as_on_linux(tmp_path):
    """``rmdir("/a/.")`` removed /a and ``rename("/a/.", "/c")`` moved it: the "." dropped
    from the path left the directory's own name. Linux refuses both (rmdir: EINVAL, rename:
    EBUSY, either side), checked here against os on the host (f-strings: pathlib drops ".")."""
    img = str(tmp_path / "dot.img")
    await blockemu.mkfs(img, size="32M")
    host = tmp_path / "host"
    (host / "a").mkdir(parents=True)
    async with blockemu.mount(img, seal_workers=0) as fs:
        await fs.mkdir("/a")
        for call, hostcall in [(fs.rmdir("/a/."), lambda: os.rmdir(f"{host}/a/.")),
                               (fs.rmdir("/a/./"), lambda: os.rmdir(f"{host}/a/./")),
                               (fs.rename("/a/.", "/c"), lambda: os.rename(f"{host}/a/.", f"{host}/c")),
                               (fs.rename("/a", "/a/."), lambda: os.rename(f"{host}/a", f"{host}/a/."))]:
            with pytest.raises(OSError) as e:
                await call
            with pytest.raises(OSError) as h:
                hostcall()
            assert e.value.errno == h.value.errno
        assert await fs.readdir("/") == ["a"]
        assert sorted(os.listdir(host)) == ["a"]


async def test_a_seek_past_the_largest_file_size_is_einval(tmp_path):
    """``seek(2**63)`` returned 2**63 where lseek(2) fails with EINVAL past the file system's
    largest size (``vfs_setpos``; os.lseek says so on the host); the write there then failed
    with EFBIG instead."""
    img = str(tmp_path / "s.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(b"x")
            for offset, whence in ((2**63, os.SEEK_SET), (2**63 - 1, os.SEEK_END)):
                with pytest.raises(OSError) as e:
                    await f.seek(offset, whence)
                assert e.value.errno == errno.EINVAL
            assert await f.seek(2**63 - 1) == 2**63 - 1
            assert await f.tell() == 2**63 - 1


async def test_paths_are_taken_as_os_takes_them(tmp_path):
    """str, bytes and ``os.PathLike`` (pathlib) name the same file, as with ``os``; bytes that are
    not UTF-8 name the same entry as their surrogate-escaped str; anything else is os's
    TypeError. A bytes path failed with ``startswith first arg must be bytes`` and a pathlib
    one with an AttributeError, deep inside."""
    from pathlib import PurePosixPath

    img = str(tmp_path / "p.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        await fs.mkdir(b"/d")
        async with fs.open(PurePosixPath("/d/f"), "w") as f:
            await f.write(b"x")
        await fs.rename(b"/d/f", PurePosixPath("/d/\udcff"))
        assert await fs.readdir("/d") == ["\udcff"] and (await fs.stat(b"/d/\xff")).st_size == 1
        await fs.symlink(b"/d/\xff", "/l")
        assert await fs.readlink(PurePosixPath("/l")) == "/d/\udcff"
        await fs.unlink(b"/d/\xff")
        assert not await fs.exists(PurePosixPath("/d/\udcff"))
        with pytest.raises(TypeError, match="expected str, bytes or os.PathLike object, not int"):
            await fs.stat(5)
        with pytest.raises(TypeError, match="expected str, bytes or os.PathLike object, not NoneType"):
            fs.open(None, "w")


async def test_sizes_and_offsets_must_be_integers(tmp_path):
    """``read(1.5)``, ``pread(4, 0.5)``, ``seek(1.5)``, ``truncate(2.0)``, ``punch_hole(1.5, 4)``:
    TypeError, as ``os.read``, ``os.pread``, ``os.lseek``, ``os.ftruncate`` and
    ``os.posix_fallocate`` say -- a float went through as an offset (a punch's to the page
    cache, failing there as 'slice indices must be integers')."""
    img = str(tmp_path / "i.img")
    await blockemu.mkfs(img, size="32M")
    async with blockemu.mount(img, seal_workers=0) as fs:
        async with fs.open("/f", "w+") as f:
            await f.write(b"0123456789")
            for bad in (lambda: f.read(1.5), lambda: f.pread(4, 0.5), lambda: f.seek(1.5), lambda: f.truncate(2.0),
                        lambda: f.pwrite(b"x", 1.0), lambda: f.punch_hole(1.5, 4), lambda: f.punch_hole(0, 4.0)):
                with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
                    await bad()
            assert await f.pread(10, 0) == b"0123456789"
            await f.seek(4)
            assert await f.read(None) == b"456789"  # None: to the end, as a Python file's read


def test_dir_of_the_package_lists_its_api_not_its_imports():
    names = dir(blockemu)
    assert set(blockemu.__all__) <= set(names) and "__version__" in names
    assert not {"Any", "TYPE_CHECKING", "import_module", "annotations"} & set(names)


async def test_making_a_name_through_dot_or_slash_fails_as_on_linux(tmp_path):
    """``mkdir("/m/.")``, ``open("/m/.", "w")``, ``symlink``/``link`` to "/m/." or "/m/" made
    "m" (``split_path`` drops the "." and the slash), ``open("/g/", "w")`` made a file g and
    ``rename("/f", "/g/")`` moved a file to g; "/x/." and "/f/." gave EBUSY or EEXIST where
    Linux, walking to x or f first, says ENOENT or ENOTDIR. Checked against os on the host."""
    img = str(tmp_path / "dot.img")
    await blockemu.mkfs(img, size="32M")
    h = f"{tmp_path}/host"
    os.makedirs(f"{h}/a")
    open(f"{h}/f", "w").close()

    def creat(p: str) -> None:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT))

    async with blockemu.mount(img, seal_workers=0) as fs:
        await fs.mkdir("/a")
        await (await fs.open("/f", "w")).close()
        cases = [(lambda: fs.mkdir("/m/."), lambda: os.mkdir(f"{h}/m/.")),
                 (lambda: fs.open("/m/.", "w"), lambda: creat(f"{h}/m/.")),
                 (lambda: fs.open("/g/", "w"), lambda: creat(f"{h}/g/")),
                 (lambda: fs.symlink("/f", "/m/."), lambda: os.symlink("/f", f"{h}/m/.")),
                 (lambda: fs.symlink("/f", "/m/"), lambda: os.symlink("/f", f"{h}/m/")),
                 (lambda: fs.link("/f", "/m/."), lambda: os.link(f"{h}/f", f"{h}/m/.")),
                 (lambda: fs.link("/f", "/m/"), lambda: os.link(f"{h}/f", f"{h}/m/")),
                 (lambda: fs.rename("/f", "/g/"), lambda: os.rename(f"{h}/f", f"{h}/g/")),
                 (lambda: fs.rename("/a", "/x/."), lambda: os.rename(f"{h}/a", f"{h}/x/.")),
                 (lambda: fs.mkdir("/f/."), lambda: os.mkdir(f"{h}/f/.")),
                 (lambda: fs.symlink("/a", "/f/."), lambda: os.symlink("/a", f"{h}/f/."))]
        for call, hostcall in cases:
            with pytest.raises(OSError) as e:
                await call()
            with pytest.raises(OSError) as hx:
                hostcall()
            assert e.value.errno == hx.value.errno
        assert sorted(await fs.readdir("/")) == ["a", "f"]
        assert sorted(os.listdir(h)) == ["a", "f"]
