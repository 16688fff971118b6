#!/usr/bin/env python3
"""Build the fsck corruption corpus, as btrfs-progs' fsck-tests: small images, each
carrying one known corruption, gzip-compressed into tests/corpus/, with manifest.json
saying which error class fsck must report and whether --repair must fix it.

    python tools/make_corpus.py [--out DIR] [CASE ...]   # every case, or only these (the others kept)

``--out`` writes elsewhere than tests/corpus (tests/test_fsck_corpus.py runs the generator
into a temporary directory, so that it cannot rot as the engine changes).

Corruptions are made two ways: surgically through the engine's own tree code (the
image stays structurally valid and only the logic is wrong), or as raw byte edits
with the block checksum recomputed, so the checker sees exactly the one defect.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blockemu  # noqa: E402
from blockemu.device.image import ImageFile  # noqa: E402
from blockemu.engine.transaction import Engine  # noqa: E402
from blockemu.fs.volume import Volume  # noqa: E402
from blockemu.ondisk import csum as csums  # noqa: E402
from blockemu.ondisk import structs as S  # noqa: E402
from blockemu.ondisk.items import (  # noqa: E402
    ExtentItem,
    FileExtent,
    InodeExtref,
    InodeItem,
    extref_hash,
    name_hash,
    pack_inode_extrefs,
    pack_symlink_data,
    unpack_dir_entries,
    unpack_symlink_data,
)
from blockemu.ondisk.superblock import decode_super, encode_super  # noqa: E402
from tests.util import flip  # noqa: E402

OUT = ROOT / "tests" / "corpus"
KEY = bytes(range(1, 65))
FS, EXT, CSUM, FST, RT = (S.FS_TREE_OBJECTID, S.EXTENT_TREE_OBJECTID, S.CSUM_TREE_OBJECTID,
                          S.FREE_SPACE_TREE_OBJECTID, S.ROOT_TREE_OBJECTID)


INOS: dict[str, int] = {}  # the base image's inode numbers, by path (every case is a copy of it)


async def base_image(path: str) -> None:
    await blockemu.mkfs(path, size="80M", node_size="4K", uuid="0c0c0c0c-1111-2222-3333-444444444444")
    async with blockemu.mount(path, interval=3600) as fs:
        kid = await fs.add_key(KEY)
        await fs.mkdir("/plain")
        await fs.mkdir("/secret")
        await fs.set_policy("/secret", kid)
        for p, n in [("/plain/a", 5000), ("/plain/b", 70_000), ("/secret/s1", 9000), ("/secret/s2", 12_000)]:
            async with fs.open(p, "w") as f:
                await f.write(bytes([len(p)]) * n)
        async with fs.open("/plain/b", "r+") as f:
            await f.pwrite(b"\x01" * 4096, 8192)  # a split extent: refs 2
        await fs.symlink("../plain/a", "/secret/link")  # an inline encrypted target (FSCRYPT_SYMLINK)
        for p in ("/plain", "/secret", "/plain/a", "/plain/b", "/secret/s1", "/secret/s2"):
            INOS[p] = (await fs.stat(p)).st_ino


async def with_log(path: str, change: Callable[[str], None]) -> None:
    """Leave an fsync log in the image -- a crash right after an fsync that went through it --
    then ``change`` the image (the log lies in space the committed trees call free)."""
    crash = path + ".crash"
    async with blockemu.mount(path, interval=3600) as fs:
        log = fs.vol.device.start_log(base_copy=path + ".base")
        async with fs.open("/plain/a", "r+") as f:
            await f.pwrite(b"\x02" * 4096, 0)
            await f.fsync()
        assert fs.vol.log_root, "the fsync went through the log"
        log.crash_image(crash, len(log.entries))
    os.replace(crash, path)
    os.unlink(path + ".base")
    change(path)


def ino_of(path: str) -> int:
    """From the mounted base image, not by looking names up in the trees: a name in /secret
    is stored encrypted (looking '/secret/s1' up by its plaintext failed)."""
    return INOS[path]


async def edit(path: str, change: Callable[[Engine], None]) -> None:
    """Change items through the tree code and commit: a logically corrupt, structurally valid image."""
    vol = await Volume.open(path)
    async with vol.join() as engine:
        change(engine)
    await vol.close()


def first_extent(engine: Engine, ino: int) -> tuple[tuple[int, int, int], FileExtent]:
    key, body = next(engine.trees[FS].items((ino, S.EXTENT_DATA, 0), (ino, S.EXTENT_DATA, (1 << 64) - 1)))
    return key, FileExtent.unpack(body)


def set_inode(engine: Engine, ino: int, **fields: int) -> None:
    fs = engine.trees[FS]
    item = InodeItem.unpack(fs[(ino, S.INODE_ITEM, 0)])
    fs.update((ino, S.INODE_ITEM, 0), item._replace(**fields).pack())


def patch_block(path: str, tree: str, change: Callable[[bytearray], None], *, recsum: bool = True) -> None:
    """Edit the first leaf of ``tree`` in place (and re-checksum it)."""
    from blockemu.check.inspect import dump_tree

    blocks = dump_tree(path, [tree])
    bytenr = next(b["bytenr"] for b in blocks if b["level"] == 0)
    with ImageFile.open(path) as img:
        sb = img.best_super()
    with open(path, "r+b") as f:
        f.seek(bytenr)
        buf = bytearray(f.read(sb.nodesize))
        change(buf)
        if recsum:
            buf[:32] = csums.field(sb.csum_type, bytes(buf[32:]))
        f.seek(bytenr)
        f.write(buf)


def patch_super(path: str, **fields: int) -> None:
    with open(path, "r+b") as f:
        f.seek(65536)
        sb = decode_super(f.read(4096), 65536)
        for k, v in fields.items():
            setattr(sb, k, v)
        f.seek(65536)
        f.write(encode_super(sb, 65536))


def data_bytenr(path: str, file: str) -> int:
    with ImageFile.open(path) as img:
        engine = Engine(img.best_super(), img.read, writable=False)
        return first_extent(engine, ino_of(file))[1].disk_bytenr


def log_over_committed_data(path: str) -> None:
    """The logged extent item names the committed extent of /plain/b: replay would take
    space the committed trees use."""
    from blockemu.engine.treelog import read_log
    from blockemu.ondisk.block import decode_block, encode_block

    with ImageFile.open(path) as img:
        sb = img.best_super()
        blocks, _ = read_log(img.read, sb)
    committed = data_bytenr(path, "/plain/b")
    with open(path, "r+b") as f:
        for bytenr in blocks:
            f.seek(bytenr)
            block = decode_block(f.read(sb.nodesize), bytenr=bytenr, nodesize=sb.nodesize, csum_type=sb.csum_type,
                                 fsid=sb.fsid)
            for i, key in enumerate(block.keys):
                if key[1] == S.EXTENT_DATA:
                    block.values[i] = FileExtent.unpack(block.values[i])._replace(disk_bytenr=committed).pack()
            f.seek(bytenr)
            f.write(encode_block(block, nodesize=sb.nodesize, csum_type=sb.csum_type, fsid=sb.fsid))


def swap_first_keys(buf: bytearray) -> None:
    a, b = 85, 85 + 25
    buf[a : a + 17], buf[b : b + 17] = buf[b : b + 17], buf[a : a + 17]


def bump_root_item_generation(buf: bytearray) -> None:
    """The fs tree's ROOT_ITEM claims a generation its root block does not have."""
    nritems = struct.unpack_from("<I", buf, 0x50)[0]
    for i in range(nritems):
        oid, typ, _, off, _ = struct.unpack_from("<QBQII", buf, 85 + 25 * i)
        if (oid, typ) == (FS, S.ROOT_ITEM):
            pos = 85 + off
            struct.pack_into("<Q", buf, pos, struct.unpack_from("<Q", buf, pos)[0] + 7)


Case = tuple[str, bool, bool, Callable[[str], Awaitable[None]]]  # code, repairable, check_data, corrupt


def cases() -> dict[str, Case]:
    async def sync(fn: Callable[[str], None], p: str) -> None:
        fn(p)

    def with_engine(change: Callable[[Engine], None]) -> Callable[[str], Awaitable[None]]:
        return lambda p: edit(p, change)

    def drop_dir_item(e: Engine) -> None:
        ino = ino_of("/plain")
        e.trees[FS].delete((ino, S.DIR_ITEM, name_hash(b"a")))

    def dangling(e: Engine) -> None:
        ino = ino_of("/plain/a")
        for k in [k for k, _ in e.trees[FS].items((ino, 0, 0), (ino, 255, (1 << 64) - 1))]:
            if k[1] != S.EXTENT_DATA:
                e.trees[FS].delete(k)

    def orphan(e: Engine) -> None:
        parent, ino = ino_of("/plain"), ino_of("/plain/a")
        fs = e.trees[FS]
        idx = next(k[2] for k, body in fs.items((parent, S.DIR_INDEX, 0), (parent, S.DIR_INDEX, (1 << 64) - 1))
                   if unpack_dir_entries(body)[0].name == b"a")
        fs.delete((parent, S.DIR_INDEX, idx))
        fs.delete((parent, S.DIR_ITEM, name_hash(b"a")))
        fs.delete((ino, S.INODE_REF, parent))
        set_inode(e, parent, size=InodeItem.unpack(fs[(parent, S.INODE_ITEM, 0)]).size - 2)

    async def hard_linked(path: str, change: Callable[[Engine, int, int], None]) -> None:
        """/plain/a given 8 more names of 240 bytes in /plain (most past its full INODE_REF, in
        INODE_EXTREF items), then ``change(engine, its inode, /plain's)``."""
        async with blockemu.mount(path, interval=3600) as fs:
            for i in range(8):
                await fs.link("/plain/a", f"/plain/{i:04d}" + "y" * 236)
        await edit(path, lambda e: change(e, ino_of("/plain/a"), ino_of("/plain")))

    def first_extref(e: Engine, ino: int) -> tuple[tuple[int, int, int], bytes]:
        return next(e.trees[FS].items((ino, S.INODE_EXTREF, 0), (ino, S.INODE_EXTREF, (1 << 64) - 1)))

    def dangling_extref(e: Engine, ino: int, parent: int) -> None:
        """A name in an INODE_EXTREF that no entry of the directory has."""
        name = b"gone" + b"y" * 236
        e.trees[FS].insert((ino, S.INODE_EXTREF, extref_hash(parent, name)),
                           pack_inode_extrefs([InodeExtref(parent, 9999, name)]))

    def lost_extref(e: Engine, ino: int, parent: int) -> None:
        e.trees[FS].delete(first_extref(e, ino)[0])

    def data_refs(e: Engine) -> None:
        key, fe = first_extent(e, ino_of("/plain/b"))
        k = (fe.disk_bytenr, S.EXTENT_ITEM, fe.disk_num_bytes)
        ei = ExtentItem.unpack(e.trees[EXT][k])
        e.trees[EXT].update(k, ei._replace(refs_count=ei.refs_count + 1).pack())

    def meta_ref(e: Engine) -> None:
        fs_root = e.trees[FS].root
        e.trees[EXT].delete((fs_root, S.METADATA_ITEM, e.trees[FS].level))

    def overlap(e: Engine) -> None:
        ino = ino_of("/plain/b")
        key, fe = first_extent(e, ino)
        e.trees[FS].insert((ino, S.EXTENT_DATA, 4096), fe._replace(offset=4096, num_bytes=4096).pack())

    def missing_csum(e: Engine) -> None:
        key, fe = first_extent(e, ino_of("/plain/a"))
        e.trees[CSUM].delete((S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, fe.disk_bytenr))

    def orphan_csum(e: Engine) -> None:
        start = next(iter(e.free_items))  # start -> length, sorted
        e.trees[CSUM].insert((S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM, start + (1 << 20)), b"\0\0\0\0")

    def plaintext_extent(e: Engine) -> None:
        ino = ino_of("/secret/s1")
        key, fe = first_extent(e, ino)
        e.trees[FS].update(key, fe._replace(encryption=S.ENCRYPTION_NONE, context=None).pack())

    def nonce_reuse(e: Engine) -> None:
        k1, f1 = first_extent(e, ino_of("/secret/s1"))
        k2, f2 = first_extent(e, ino_of("/secret/s2"))
        e.trees[FS].update(k2, f2._replace(context=f2.context._replace(nonce=f1.context.nonce)).pack())

    def wrong_key(e: Engine) -> None:
        k, f = first_extent(e, ino_of("/secret/s1"))
        e.trees[FS].update(k, f._replace(context=f.context._replace(key_identifier=b"\x99" * 16)).pack())

    def bad_context(e: Engine) -> None:
        k, f = first_extent(e, ino_of("/secret/s1"))
        e.trees[FS].update(k, f._replace(context=f.context._replace(version=7)).pack())

    def drop_free_space(e: Engine) -> None:
        start, length = max(e.free_items.items(), key=lambda x: x[1])
        e.trees[FST].delete((start, S.FREE_SPACE_EXTENT, length))
        del e.free_items[start]
        e.allocator.reserve(start, length)  # the engine must not write it back at commit

    def symlink_ciphertext(e: Engine) -> None:
        """A target one byte short of a padded length, its length field and i_size agreeing."""
        # the only one there is (its name in /secret is encrypted: no lookup by it)
        key = next(k for k, _ in e.trees[FS].items() if k[1] == S.FSCRYPT_SYMLINK_ITEM)
        ino = key[0]
        ciphertext = unpack_symlink_data(e.trees[FS][key])[:-1]
        e.trees[FS].update(key, pack_symlink_data(ciphertext))
        set_inode(e, ino, size=len(ciphertext) + 2)

    return {
        "encrypted-symlink": ("BAD_ENCRYPTED_SYMLINK", False, False, with_engine(symlink_ciphertext)),
        "log-overlap": ("LOG_OVERLAP", False, False, lambda p: with_log(p, log_over_committed_data)),
        "superblock-csum": ("SUPERBLOCK", True, False, lambda p: sync(lambda q: flip(q, 65536 + 0x100), p)),
        "tree-block-csum": ("CSUM_MISMATCH", False, False,
                            lambda p: sync(lambda q: patch_block(q, "fs", lambda b: b.__setitem__(300, b[300] ^ 1), recsum=False), p)),
        "key-order": ("KEY_ORDER", False, False, lambda p: sync(lambda q: patch_block(q, "csum", swap_first_keys), p)),
        # a free-space tree block: the repair rebuilds that tree from the extent tree
        "bad-bytenr": ("BAD_TREE_BLOCK", True, False,
                       lambda p: sync(lambda q: patch_block(q, "free-space", lambda b: struct.pack_into("<Q", b, 0x30, 4096)), p)),
        "transid": ("TRANSID_MISMATCH", False, False, lambda p: sync(lambda q: patch_block(q, "root", bump_root_item_generation), p)),
        "used-bytes": ("USED_BYTES_MISMATCH", True, False, lambda p: sync(lambda q: patch_super(q, bytes_used=3 * 4096), p)),
        "free-space": ("FREE_SPACE_MISMATCH", True, False, with_engine(drop_free_space)),
        "metadata-ref": ("EXTENT_REF_MISMATCH", False, False, with_engine(meta_ref)),
        "data-refcount": ("EXTENT_REF_MISMATCH", True, False, with_engine(data_refs)),
        "nlink": ("NLINK_MISMATCH", True, False, with_engine(lambda e: set_inode(e, ino_of("/plain/a"), nlink=5))),
        "dir-isize": ("ISIZE_MISMATCH", True, False, with_engine(lambda e: set_inode(e, ino_of("/plain"), size=99))),
        "nbytes": ("NBYTES_MISMATCH", True, False, with_engine(lambda e: set_inode(e, ino_of("/plain/b"), nbytes=1))),
        "dir-item": ("DIR_ITEM_MISMATCH", False, False, with_engine(drop_dir_item)),
        "dangling-extref": ("DIR_ITEM_MISMATCH", True, False, lambda p: hard_linked(p, dangling_extref)),
        "lost-extref": ("DIR_ITEM_MISMATCH", True, False, lambda p: hard_linked(p, lost_extref)),
        "dangling-entry": ("DANGLING_ENTRY", True, False, with_engine(dangling)),
        "orphan-inode": ("ORPHAN", True, False, with_engine(orphan)),
        "file-extent-overlap": ("FILE_EXTENT_OVERLAP", False, False, with_engine(overlap)),
        "missing-csum": ("MISSING_CSUM", False, False, with_engine(missing_csum)),
        "orphan-csum": ("ORPHAN_CSUM", True, False, with_engine(orphan_csum)),
        "data-csum": ("CSUM_MISMATCH", False, True, lambda p: sync(lambda q: flip(q, data_bytenr(q, "/plain/a") + 10), p)),
        "plaintext-extent": ("UNENCRYPTED_EXTENT_IN_ENCRYPTED_FILE", False, False, with_engine(plaintext_extent)),
        "nonce-reuse": ("NONCE_REUSE", False, False, with_engine(nonce_reuse)),
        "wrong-key": ("ENCRYPTION_CONTEXT_MISMATCH", False, False, with_engine(wrong_key)),
        "bad-context": ("BAD_ENCRYPTION_CONTEXT", False, False, with_engine(bad_context)),
    }


async def main(only: list[str], out: Path = OUT) -> None:
    """Build every case, or (``only``) just the named ones, keeping the other images as they
    are: a rebuild changes every image's bytes (fresh nonces and keys), and a corpus is most
    useful when its files change only when their case does."""
    out.mkdir(parents=True, exist_ok=True)
    every = cases()
    unknown = sorted(set(only) - set(every))
    if unknown:
        raise SystemExit(f"make_corpus: no such case: {', '.join(unknown)}")
    kept = out / "manifest.json"
    manifest = json.loads(kept.read_text()) if only and kept.exists() else {}
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.img")
        await base_image(base)
        for name, (code, repairable, check_data, corrupt) in every.items():
            if only and name not in only:
                continue
            img = os.path.join(d, f"{name}.img")
            shutil.copy(base, img)
            await corrupt(img)
            with open(img, "rb") as src, gzip.open(out / f"{name}.img.gz", "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
            manifest[name] = {"code": code, "repairable": repairable, "check_data": check_data}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(only) or len(manifest)} corrupted images to {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    where = Path(args.pop(args.index("--out") + 1)) if "--out" in args else OUT
    asyncio.run(main([a for a in args if a != "--out"], where))
