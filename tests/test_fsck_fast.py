"""fsck's column proofs (check/fsck_fast.py): on a sound plain image each proof holds, so the
passes it stands for are skipped; on structural mutations and byte flips of that image a proof
holds only where the pass it stands for finds nothing -- a proof that passed a damaged image
would hide what the pass reports."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import stat
import subprocess
import sys
from typing import Callable

import pytest

import blockemu
from blockemu.check import fsck as fsck_mod
from blockemu.check import fsck_fast, fsck_fs
from blockemu.check.fsck import Checker, FsckReport
from blockemu.cli import fuzz
from blockemu.device.image import ImageFile
from blockemu.engine.transaction import SUBTREES
from blockemu.errors import CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.items import unpack_extent_items
from tests.test_treelog import _resign_slots

PAGE = S.SECTOR_SIZE


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> fuzz.Base:
    """A plain image from a host tree: nested directories, empty and multi-extent files,
    symbolic links, long and short names, an empty directory (4 KiB nodes: many leaves)."""
    d = tmp_path_factory.mktemp("plain")
    root = d / "root"
    rng = random.Random(11)
    for i in range(4):
        sub = root / f"dir{i}" / f"sub{i % 2}"
        sub.mkdir(parents=True)
        for j in range(25):
            (sub / (f"f{j}-" + "n" * rng.randrange(30))).write_bytes(rng.randbytes(rng.choice([0, 10, 4096, 5000, 70000])))
        os.symlink("../" * (i % 3) + "target" * (i + 1), sub / "link")
    (root / "empty").mkdir()
    image, key = d / "plain.img", d / "key"
    key.write_bytes(fuzz.KEY)
    subprocess.run([sys.executable, "-m", "blockemu", "mkfs", "--size", "48M", "--node-size", "4K", "--rootdir", str(root),
                    str(image)], check=True, capture_output=True)
    return fuzz.load_base(str(image), str(key))


def walked(path: str) -> tuple[Checker, object]:
    """A Checker after the walk and the extent pass, as the fs passes find it."""
    with ImageFile.open(path) as img:
        ck = Checker(img, FsckReport(image=path), None)
        sb = ck.check_supers()
        roots = ck.check_root_tree(sb)
        ck.check_subtrees(sb, roots, SUBTREES)
        ck.check_free_space(sb, ck.check_extents(sb))
    return ck, sb


def passes_find(ck: Checker, sb) -> tuple[bool, bool]:
    """Whether the fs passes, and the file-extent pass, report anything (run as they are)."""
    mark = len(ck.report.errors)
    items = fsck_fs.collect(ck)
    fsck_fs.check_inodes(ck, items, sb)
    fsck_fs.check_encryption(ck, items)
    fsck_fs.check_encrypted_names(ck, items, None)
    fsck_fs.check_encrypted_symlinks(ck, items, sb, None)
    fs_found = len(ck.report.errors) > mark
    mark = len(ck.report.errors)
    fsck_fs.check_file_extents(ck, items, ck.data_extents)
    return fs_found, len(ck.report.errors) > mark


def test_a_sound_image_is_proved_clean_and_the_proofs_are_taken(plain, monkeypatch):
    ck, sb = walked(plain.path)
    assert passes_find(ck, sb) == (False, False)
    assert fsck_fast.inodes_clean(fsck_fast.columns(ck)) == len(fsck_fs.collect(ck).inodes) > 100
    assert fsck_fast.file_extents_clean(fsck_fast.columns(ck), ck.data_extents)
    ran = []
    monkeypatch.setattr(fsck_fs, "check_inodes", lambda *a: ran.append("inodes"))
    monkeypatch.setattr(fsck_fs, "check_file_extents", lambda *a: ran.append("file extents"))
    assert fsck_mod.check(plain.path).clean and ran == []


def _cases(plain: fuzz.Base, n: int) -> list[list[tuple[int, bytes]]]:
    targeted = ["inode", "file_extent", "dir_entry", "key", "extent_item", "item_header"]
    out = [fuzz.MUTATIONS[targeted[i % len(targeted)]](plain, random.Random(f"fast:{i}")) for i in range(n)]
    blocks = plain.blocks_of(lambda tree, level: tree == "fs")
    for i in range(n // 2):
        rng = random.Random(f"fastflip:{i}")
        bytenr = rng.choice(blocks)
        buf = bytearray(plain.raw[bytenr])
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        out.append([(bytenr, plain.recsum(buf))])
    return out


def test_a_proof_holds_only_where_its_pass_finds_nothing(plain, tmp_path):
    work = str(tmp_path / "m.img")
    proved = found = 0
    for patches in _cases(plain, 120):
        plain.write(work, patches)
        try:
            ck, sb = walked(work)
        except OSError:
            continue
        cols = fsck_fast.columns(ck)
        inodes, extents = fsck_fast.inodes_clean(cols), fsck_fast.file_extents_clean(cols, ck.data_extents)
        fs_found, extents_found = passes_find(ck, sb)
        assert not (inodes is not None and fs_found), patches
        assert not (extents and extents_found), patches
        proved += inodes is not None
        found += fs_found + extents_found
    assert found > 60 and proved > 5  # both sides were met


def test_a_check_of_a_mutated_image_reports_what_the_passes_do(plain, tmp_path):
    """The whole report through ``check``, with the proofs and with every proof failing."""
    work = str(tmp_path / "w.img")
    for patches in _cases(plain, 30):
        plain.write(work, patches)
        try:
            fast = fsck_mod.check(work, parallel=False)
        except OSError:
            continue
        with pytest.MonkeyPatch.context() as m:
            m.setattr(fsck_fast, "inodes_clean", lambda cols: None)
            m.setattr(fsck_fast, "file_extents_clean", lambda cols, data: False)
            m.setattr(fsck_fast, "extent_records", lambda keys, items, nodesize: None)
            slow = fsck_mod.check(work, parallel=False)
        assert fast.as_json() == slow.as_json() and [e.fix for e in fast.errors] == [e.fix for e in slow.errors]


def test_the_extent_records_over_columns_are_the_item_loops(plain, tmp_path):
    """``extent_records`` stands for check_extents' item loop only where the loop reports nothing,
    and then builds what the loop builds: the extents, the METADATA_ITEMs and the data extents."""
    work = str(tmp_path / "x.img")
    cases = [fuzz.MUTATIONS[("extent_item", "item_header", "key")[i % 3]](plain, random.Random(f"records:{i}")) for i in range(60)]
    taken = 0
    for patches in [[]] + cases:
        plain.write(work, patches)
        try:
            fast_ck, sb = walked(work)
        except OSError:
            continue
        with pytest.MonkeyPatch.context() as m:
            m.setattr(fsck_fast, "extent_records", lambda keys, items, nodesize: None)
            slow_ck, _ = walked(work)
        keys, bodies = fast_ck.keys.get(S.EXTENT_TREE_OBJECTID, []), fast_ck.bodies.get(S.EXTENT_TREE_OBJECTID, [])
        sound = fsck_fast.extent_records(keys, unpack_extent_items(bodies), sb.nodesize)
        assert fast_ck.report == slow_ck.report and fast_ck.data_extents == slow_ck.data_extents, patches
        assert fast_ck.check_extents(sb) == slow_ck.check_extents(sb)
        loop_found = any(e.tree == "extent" and e.code in ("UNKNOWN_KEY", "BAD_ITEM") for e in slow_ck.report.errors)
        assert not (sound is not None and loop_found), patches
        taken += sound is not None
    assert taken > 10


def test_the_fsck_command_of_a_plain_image_loads_no_cipher(plain):
    """Without a key and with nothing encrypted, no cipher module: importing one was a tenth of
    the command's start. No module looks up a package's version either."""
    code = ("import contextlib, io, sys\nfrom blockemu.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    rc = main(['fsck', '--json', sys.argv[1]])\n"
            "print(rc, *sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, plain.path], capture_output=True, text=True, check=True).stdout
    rc, *loaded = out.split()
    assert rc == "0" and "blockemu.check.fsck" in loaded
    assert [m for m in loaded if m.startswith(("cryptography", "blockemu.crypto"))] == []
    # nor importlib.metadata, which the crc32c package's __init__ and --version's lookup would
    # import: ~0.1 s of the command's start
    assert [m for m in loaded if m.startswith("importlib.metadata")] == []


def test_key_order_is_what_lets_a_proof_trust_its_columns(plain, tmp_path):
    """Items out of key order (a tree the walk calls damaged) are never proved clean."""
    ck, _ = walked(plain.path)
    for column in ck.keys[S.FS_TREE_OBJECTID], ck.bodies[S.FS_TREE_OBJECTID]:
        column[1], column[2] = column[2], column[1]
    assert fsck_fast.columns(ck) is None
    assert fsck_fast.inodes_clean(None) is None and not fsck_fast.file_extents_clean(None, ck.data_extents)


def test_a_file_extent_that_disagrees_with_its_data_extent_in_length_alone_is_no_proof(plain, tmp_path):
    """disk_num_bytes and ram_bytes both one sector longer: every field of the file extent agrees
    with the others, only the extent tree's length says otherwise."""
    from blockemu.ondisk.items import FileExtent

    bytenr = next(b for b in plain.blocks_of(lambda tree, level: tree == "fs" and level == 0)
                  if any(k[1] == S.EXTENT_DATA for k in plain.block(b).keys))
    block = plain.block(bytenr)
    i = next(i for i, k in enumerate(block.keys) if k[1] == S.EXTENT_DATA)
    fe = FileExtent.unpack(block.values[i])
    block.values[i] = fe._replace(ram_bytes=fe.ram_bytes + 4096, disk_num_bytes=fe.disk_num_bytes + 4096).pack()
    work = str(tmp_path / "longer.img")
    plain.write(work, [(bytenr, plain.encode(block))])
    ck, sb = walked(work)
    assert passes_find(ck, sb)[1] and not fsck_fast.file_extents_clean(fsck_fast.columns(ck), ck.data_extents)


def test_column_checks_of_extents_and_free_space_agree_with_the_span_by_span_ones():
    """``_all_usable`` is ``_in_usable`` (and sector alignment) of every extent; ``_tiles`` the
    runs the span-by-span walk of free space builds, or None where that walk reports an overlap."""
    ck = Checker.__new__(Checker)
    ck.usable = [(1 << 20, 63 << 20), (65 << 20, 4031 << 20)]
    rng = random.Random(3)
    edges = [0, 1 << 20, 64 << 20, 65 << 20, 4 << 30]
    for _ in range(3000):
        extents = [(max(rng.choice(edges) + rng.choice((-8192, -4096, 0, 4096, 1)), 0),
                    rng.choice((0, 4096, 8192, 1 << 20, 12345)), None) for _ in range(rng.randrange(1, 4))]
        want = all(not s % PAGE and not n % PAGE and ck._in_usable(s, n) for s, n, _ in extents)
        assert ck._all_usable(extents) == want, extents
        spans, pos = [], rng.randrange(3) * PAGE
        for _ in range(rng.randrange(8)):
            pos = max(pos + rng.choice((0, 0, PAGE, -PAGE, 2 * PAGE)), 0)
            spans.append((pos, rng.choice((0, PAGE, 2 * PAGE))))
            pos += spans[-1][1]
        spans.sort()
        covered, overlap = [], False
        for start, length in spans:
            overlap |= bool(covered) and start < covered[-1][1]
            if covered and start <= covered[-1][1]:
                covered[-1][1] = max(covered[-1][1], start + length)
            else:
                covered.append([start, start + length])
        assert Checker._tiles(spans) == (None if overlap else covered), spans


def _edited(plain: fuzz.Base, edit, tree: str = "fs") -> list[tuple[int, bytes]]:
    """Patches that apply ``edit(key, body) -> {key: body}`` (an empty dict drops the item, two
    keys add one) to every leaf item of ``tree``, each leaf kept sorted and re-encoded."""
    from blockemu.ondisk.block import body_size

    patches = []
    for bytenr in plain.blocks_of(lambda name, level: name == tree and level == 0):
        b = plain.block(bytenr)
        items: dict = {}
        for k, v in zip(b.keys, b.values):
            items.update(edit(k, v))
        if list(items.items()) != list(zip(b.keys, b.values)):
            b.keys, b.values = map(list, zip(*sorted(items.items())))
            b.recount()
            assert b.used <= body_size(plain.sb.nodesize)
            patches.append((bytenr, plain.encode(b)))
    return patches


def _check_both(path: str) -> tuple[FsckReport, FsckReport]:
    """``check`` as it runs, and with every proof failing (the passes themselves)."""
    fast = fsck_mod.check(path, parallel=False)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fsck_fast, "inodes_clean", lambda cols: None)
        m.setattr(fsck_fast, "file_extents_clean", lambda cols, data: False)
        slow = fsck_mod.check(path, parallel=False)
    return fast, slow


def test_a_second_inode_item_of_a_directory_is_no_proof(plain, tmp_path):
    """An INODE_ITEM under offset 1 beside a directory's: the passes take the last item of an
    objectid (a regular file here, which the parent's entry now says), so the directory's own
    entries dangle and its parent has a subdirectory fewer; the proof must not pass it."""
    from blockemu.ondisk.items import InodeItem, pack_dir_entries, unpack_dir_entries

    ck, _ = walked(plain.path)
    inodes = {k[0]: InodeItem.unpack(v) for k, v in ck.pairs(S.FS_TREE_OBJECTID) if k[1] == S.INODE_ITEM}
    d = next(ino for ino, item in sorted(inodes.items()) if ino != fsck_fast.ROOT_INO and stat.S_ISDIR(item.mode))
    as_file = inodes[d]._replace(mode=stat.S_IFREG | 0o644, nlink=1).pack()

    def edit(k, v):
        if k == (d, S.INODE_ITEM, 0):
            return {k: v, (d, S.INODE_ITEM, 1): as_file}
        if k[1] in (S.DIR_ITEM, S.DIR_INDEX):
            v = pack_dir_entries([e._replace(type=S.FT_REG_FILE) if e.location[0] == d else e
                                  for e in unpack_dir_entries(v)])
        return {k: v}

    work = str(tmp_path / "twice.img")
    plain.write(work, _edited(plain, edit))
    fast, slow = _check_both(work)
    assert not slow.clean and fast.as_json() == slow.as_json()


def _triangle_edits(ck: Checker) -> dict[str, Callable]:
    """Edits of a sound tree's inode/directory triangle and file extents, each one a finding of
    the passes a proof stands for: ``edit(key, body) -> {key: body}`` as ``_edited`` applies."""
    from blockemu.ondisk.items import FileExtent, InodeItem, InodeRef, name_hash, pack_dir_entries, unpack_dir_entries

    fs = dict(ck.pairs(S.FS_TREE_OBJECTID))
    inodes = {k[0]: InodeItem.unpack(v) for k, v in fs.items() if k[1] == S.INODE_ITEM}
    index = {k: unpack_dir_entries(v)[0] for k, v in fs.items() if k[1] == S.DIR_INDEX}
    big = max((k for k in fs if k[1] == S.EXTENT_DATA), key=lambda k: FileExtent.unpack(fs[k]).num_bytes)
    f = big[0]
    (xk, entry), = [(k, e) for k, e in index.items() if e.location[0] == f]
    d = next(k[0] for k, e in index.items() if stat.S_ISDIR(inodes[e.location[0]].mode) and k[0] != xk[0]
             and e.location[0] != xk[0])
    sub = next(e.location[0] for k, e in index.items() if k[0] == xk[0] and e.location[0] != f)  # f's sibling
    dir_item = (xk[0], S.DIR_ITEM, name_hash(entry.name))

    def one(key: tuple, change: Callable) -> Callable:
        return lambda k, v: change(k, v) if k == key else {k: v}

    def entries(key: tuple, **kw) -> Callable:
        return one(key, lambda k, v: {k: pack_dir_entries([e._replace(**kw) for e in unpack_dir_entries(v)])})

    def named_in_d(child: int, e) -> Callable:
        """``child`` named ``e`` in ``d`` too: INODE_REF, DIR_ITEM, DIR_INDEX, d's size; not its nlink."""
        name = b"also-" + e.name
        def edit(k, v):
            out = {k: v}
            if k == (d, S.INODE_ITEM, 0):
                item = InodeItem.unpack(v)
                out = {k: item._replace(size=item.size + 2 * len(name)).pack(),
                       (d, S.DIR_ITEM, name_hash(name)): pack_dir_entries([e._replace(name=name)]),
                       (d, S.DIR_INDEX, 9999): pack_dir_entries([e._replace(name=name)])}
            if k[0] == child and k[1] == S.INODE_ITEM:
                out[(child, S.INODE_REF, d)] = InodeRef(9999, name).pack()
            return out
        return edit

    fe = FileExtent.unpack(fs[big])
    return {
        "a file named in a second directory, nlink 1": named_in_d(f, entry),
        "a directory named in a second directory": named_in_d(sub, next(e for e in index.values() if e.location[0] == sub)),
        "DIR_ITEM names another inode": entries(dir_item, location=(sub, S.INODE_ITEM, 0)),
        "DIR_ITEM another name than DIR_INDEX": entries(dir_item, name=entry.name + b"x"),
        "DIR_INDEX type other than the mode's": entries(xk, type=S.FT_SYMLINK),
        "INODE_REF index off by one": one((f, S.INODE_REF, xk[0]), lambda k, v: {k: InodeRef(xk[2] + 1, entry.name).pack()}),
        "file extent past i_size": one((f, S.INODE_ITEM, 0), lambda k, v: {k: InodeItem.unpack(v)._replace(
            size=fe.num_bytes - 2 * PAGE).pack()}),
        "a data extent referenced twice": one(big, lambda k, v: {k: v, (f, S.EXTENT_DATA, 1 << 30): v}),
        "a hole and nbytes short": one(big, lambda k, v: {(f, S.EXTENT_DATA, PAGE): v}),
    }


@pytest.fixture(scope="module")
def triangle(plain) -> dict[str, Callable]:
    return _triangle_edits(walked(plain.path)[0])


@pytest.mark.parametrize("case", ["a file named in a second directory, nlink 1", "a directory named in a second directory",
                                  "DIR_ITEM names another inode", "DIR_ITEM another name than DIR_INDEX",
                                  "DIR_INDEX type other than the mode's", "INODE_REF index off by one",
                                  "file extent past i_size", "a data extent referenced twice", "a hole and nbytes short"])
def test_an_edit_of_the_triangle_or_the_extents_is_what_the_passes_say(plain, triangle, tmp_path, case):
    """Hand-made damage each proof's conditions must see: the check with its proofs reports what
    the passes do."""
    work = str(tmp_path / "t.img")
    plain.write(work, _edited(plain, triangle[case]))
    fast, slow = _check_both(work)
    assert not slow.clean and fast.as_json() == slow.as_json() and [e.fix for e in fast.errors] == [e.fix for e in slow.errors]


def test_a_data_backref_in_another_tree_is_a_ref_mismatch_the_repair_rewrites(plain, tmp_path):
    """File data lives in the fs tree alone: a data extent whose one backref names tree 7 is
    EXTENT_REF_MISMATCH (no pass looked at a backref's tree), its fix names the fs tree, and the
    proof does not pass it."""
    from blockemu.ondisk.items import ExtentItem

    def edit(k, v):
        if k[1] != S.EXTENT_ITEM:
            return {k: v}
        ei = ExtentItem.unpack(v)
        if ei.refs and ei.refs[0][0] == "data" and not edit.done:
            edit.done = k
            return {k: ei._replace(refs=(("data", 7, *ei.refs[0][2:]),)).pack()}
        return {k: v}
    edit.done = None

    work = str(tmp_path / "root7.img")
    plain.write(work, _edited(plain, edit, "extent"))
    fast, slow = _check_both(work)
    assert fast.as_json() == slow.as_json()
    (e,) = fast.errors
    assert e.code == "EXTENT_REF_MISMATCH" and "in trees [7]" in e.message
    assert {r[1] for r in e.fix["body"].refs} == {S.FS_TREE_OBJECTID}


@pytest.mark.parametrize("field", ["compression", "other_encoding"])
def test_an_encoded_file_extent_is_a_bad_item_not_data(plain, tmp_path, field):
    """This format writes neither compression nor another encoding: an extent that says so is
    refused where it is decoded (read as it is, its bytes would be handed out as the file's),
    by fsck with the proofs as without them."""
    from blockemu.ondisk.items import FileExtent

    fs = dict(walked(plain.path)[0].pairs(S.FS_TREE_OBJECTID))
    key = next(k for k in fs if k[1] == S.EXTENT_DATA)
    fe = FileExtent.unpack(fs[key])
    with pytest.raises(CorruptionError, match="compression"):
        FileExtent.unpack(fe._replace(**{field: 1}).pack())
    work = str(tmp_path / "encoded.img")
    plain.write(work, _edited(plain, lambda k, v: {k: fe._replace(**{field: 1}).pack() if k == key else v}))
    fast, slow = _check_both(work)
    assert fast.as_json() == slow.as_json()
    assert [e.code for e in fast.errors][:1] == ["BAD_ITEM"] and "compression" in fast.errors[0].message


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory) -> fuzz.Base:
    """fuzz's populated image: an encrypted directory /e and a plain one /p (4 KiB nodes)."""
    d = tmp_path_factory.mktemp("encrypted")
    image, key = d / "e.img", d / "key"
    key.write_bytes(fuzz.KEY)
    asyncio.run(fuzz.populated(str(image), 3, size="32M", files=4, max_file=20_000))
    return fuzz.load_base(str(image), str(key))


@pytest.mark.parametrize("typ, name", [(S.INODE_ITEM, "INODE_ITEM"), (S.FSCRYPT_CTXT_ITEM, "FSCRYPT_CTXT")])
def test_an_item_off_offset_zero_is_a_bad_item_not_the_inodes(encrypted, tmp_path, typ, name):
    """The filesystem looks an inode and its encryption context up at offset 0 (btrfs's
    tree-checker refuses an INODE_ITEM anywhere else): a flipped bit of the key's offset (a
    newcomer's trial, checksum made right) left fsck saying clean, exit 0, while ls, cat and mount
    failed on the image (the inode) or reading the file was ENOKEY with its key added (the context)."""
    fs = dict(walked(encrypted.path)[0].pairs(S.FS_TREE_OBJECTID))
    key = next(k for k in sorted(fs) if k[1] == typ and k[0] != fsck_fast.ROOT_INO)
    work = str(tmp_path / "offset.img")
    encrypted.write(work, _edited(encrypted, lambda k, v: {(k[0], k[1], 1 << 54) if k == key else k: v}))
    fast, slow = _check_both(work)
    assert fast.as_json() == slow.as_json()
    assert (fast.errors[0].code, fast.errors[0].message) == (
        "BAD_ITEM", f"fs tree item {(key[0], typ, 1 << 54)}: {name} key offset {1 << 54}, not 0")


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> fuzz.Base:
    """A crash state whose fsync log waits for replay: two files of fuzz's populated image (one
    encrypted) overwritten and fsynced, the image copied before any commit."""
    d = tmp_path_factory.mktemp("logged")
    image, crashed, key = d / "l.img", d / "crashed.img", d / "key"
    key.write_bytes(fuzz.KEY)

    async def make() -> None:
        await fuzz.populated(str(image), 5, size="32M", files=4, max_file=20_000)
        async with blockemu.mount(str(image), interval=3600) as fs:
            await fs.add_key(fuzz.KEY)
            for path in ("/p/f0", "/e/f1"):
                async with fs.open(path, "r+") as f:
                    await f.pwrite(b"x" * 8192, 4096)
                    await f.fsync()
            shutil.copyfile(image, crashed)  # fsync flushed the device: this is what a power cut leaves

    asyncio.run(make())
    return fuzz.load_base(str(crashed), str(key))


@pytest.mark.parametrize("typ, offset, says", [
    (S.INODE_ITEM, 256, "INODE_ITEM key offset 256, not 0"),
    (S.EXTENT_DATA, 1024, "is not at a sector-aligned file offset"),
])
def test_a_log_item_replay_cannot_use_is_a_finding(logged, tmp_path, typ, offset, says):
    """fsck said clean of a log whose INODE_ITEM sat at offset 256 (the mount then refused the image:
    "inode is not in the fs tree") or whose file extent sat at 1024 (every read of the file failed
    once replayed): a newcomer's trial, a key offset flipped with the checksum made right."""
    leaves = logged.blocks_of(lambda name, level: name == "log" and level == 0)
    key = next(k for bytenr in leaves for k in logged.block(bytenr).keys if k[1] == typ)
    assert fsck_mod.check(logged.path, parallel=False).clean
    work = str(tmp_path / "log.img")
    logged.write(work, _edited(logged, lambda k, v: {(k[0], k[1], k[2] + offset) if k == key else k: v}, tree="log"))
    _resign_slots(work)  # the edited log is the one replay uses, not a log sync that did not land whole
    report = fsck_mod.check(work, parallel=False)
    assert [e.code for e in report.errors] == ["BAD_LOG_ITEM"] and says in report.errors[0].message


def test_a_log_naming_an_inode_a_readable_fs_leaf_lacks_is_damaged_beside_a_damaged_leaf(logged, tmp_path):
    """fsck excused every inode a log names that the fs tree walk did not find while any fs
    tree block was damaged (an inode in a block it could not read is no fault of the log's). A
    log naming an inode past the last file -- in the key range of a leaf that reads, and lacks
    it -- beside a zeroed first fs leaf was judged sound: no finding of the log's, and no note
    that replay refuses it (the read-write mount does: "inode is not in the fs tree"). Only an
    inode in the key range of a block that does not read is excused."""
    leaves = logged.blocks_of(lambda name, level: name == "fs" and level == 0)
    assert len(leaves) > 1
    keys = {k for b in leaves for k in logged.block(b).keys}
    first = min(leaves, key=lambda b: logged.block(b).keys[0])
    absent = max(k[0] for k in keys) + 100
    logged_ino = next(k[0] for b in logged.blocks_of(lambda name, level: name == "log" and level == 0)
                      for k in logged.block(b).keys if k[1] == S.INODE_ITEM)
    edit = _edited(logged, lambda k, v: {k: v, (absent, S.INODE_ITEM, 0): v} if k == (logged_ino, S.INODE_ITEM, 0)
                   else {k: v}, tree="log")
    work = str(tmp_path / "both.img")
    logged.write(work, [*edit, (first, bytes(logged.sb.nodesize))])
    _resign_slots(work)
    report = fsck_mod.check(work, parallel=False)
    assert report.damaged_trees == {S.FS_TREE_OBJECTID}
    assert f"log tree: inode {absent} is not in the fs tree" in [e.message for e in report.errors]
    assert any("zero-log" in n for n in report.notes), report.notes
