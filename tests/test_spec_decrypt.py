"""format/SPEC.md is enough to decrypt an image: an independent reader proves it.

blockemu's public API (``blockemu.mkfs``, ``blockemu.mount``) only *builds* the
image. Everything below ``# ---- the independent reader`` is written from SPEC.md
alone and uses nothing of blockemu: ``struct``, ``hmac``/``hashlib`` for HKDF
and the checksums, and ``cryptography``'s AES-XTS primitive. It walks superblock
-> root tree -> fs tree, finds the file by name through its DIR_ITEM, reads its
EXTENT_DATA items and decrypts every extent, and must get back what was written.
Names in the encrypted directory are stored encrypted (SPEC § Names in encrypted
directories): the reader encrypts each path component to look it up, and lists the
directory by decrypting its entries, with CBC-CS3 built from single AES blocks.

The file is laid out so that the XTS tweak rule matters: one of its items maps
the tail of a split extent (extent_offset > 0) at a file offset different from
that extent_offset, so "unit index from the extent's start" (SPEC § Encryption)
and "unit index from the file's start" (plain fscrypt) give different tweaks.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import blockemu  # builds the image; the reader below never touches it

MASTER = bytes(range(1, 65))  # SPEC § Encryption, worked example: 0x01..0x40
UNIT = 4096


# ---- the independent reader (SPEC.md only) -------------------------------------------------

# SPEC § Device layout / § Opening an image
SUPER_OFFSETS = (64 << 10, 64 << 20, 256 << 30)
MAGIC = b"_BEmU_v1"
HEADER_SIZE = 85  # SPEC § Header: 85 bytes
ITEM_SIZE = 25  # SPEC § Item
KEY_PTR_SIZE = 33  # SPEC § KeyPtr
# SPEC § Item types / § Trees
INODE_ITEM, INODE_REF, FSCRYPT_CTXT, DIR_ITEM, DIR_INDEX, EXTENT_DATA, EXTENT_CSUM, ROOT_ITEM = 1, 12, 41, 84, 96, 108, 128, 132
FSCRYPT_SYMLINK = 42
FS_TREE, CSUM_TREE = 5, 7
EXTENT_CSUM_OBJECTID = (1 << 64) - 10
U64_MAX = (1 << 64) - 1


def crc32c_register(data: bytes, register: int) -> int:
    """Reflected CRC-32C (polynomial 0x82F63B78), no inversion at either end."""
    for byte in data:
        register = _CRC_TABLE[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _crc_entry(i: int) -> int:
    for _ in range(8):
        i = (i >> 1) ^ (0x82F63B78 if i & 1 else 0)
    return i


_CRC_TABLE = [_crc_entry(i) for i in range(256)]


def name_hash(name: bytes) -> int:
    # SPEC § Directories, "Name hash": register starts at 0xFFFFFFFE, no final inversion
    return crc32c_register(name, 0xFFFFFFFE)


def checksum(csum_type: int, data: bytes) -> bytes:
    # SPEC § Checksums: crc32c is the conventional one (inverted on entry and exit), stored LE
    if csum_type == 0:
        return struct.pack("<I", crc32c_register(data, 0xFFFFFFFF) ^ 0xFFFFFFFF)
    if csum_type == 2:
        return hashlib.sha256(data).digest()
    if csum_type == 3:
        return hashlib.blake2b(data, digest_size=32).digest()
    raise NotImplementedError(f"csum_type {csum_type}")


CSUM_SIZE = {0: 4, 1: 8, 2: 32, 3: 32}


def hkdf_sha512(master: bytes, context: int, info: bytes, length: int) -> bytes:
    # SPEC § Encryption, "Key derivation": empty salt, info = b"fscrypt\0" + context byte + info
    prk = hmac.new(b"", master, hashlib.sha512).digest()
    full_info = b"fscrypt\0" + bytes([context]) + info
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + full_info + bytes([i]), hashlib.sha512).digest()
        out += block
        i += 1
    return out[:length]


def xts_decrypt(key: bytes, ciphertext: bytes, first_unit: int) -> bytes:
    # SPEC § Encryption, "AES-256-XTS": 4096-byte units, tweak = unit index as 16 LE bytes
    out = bytearray()
    for k in range(0, len(ciphertext), UNIT):
        tweak = (first_unit + k // UNIT).to_bytes(16, "little")
        out += Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor().update(ciphertext[k : k + UNIT])
    return bytes(out)


def aes_block(key: bytes, block: bytes, encrypt: bool) -> bytes:
    ecb = Cipher(algorithms.AES(key), modes.ECB())
    return (ecb.encryptor() if encrypt else ecb.decryptor()).update(block)


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def pad_name(name: bytes, flags: int, cap: int = 255) -> bytes:
    # SPEC § Names in encrypted directories, step 2; a symlink target's cap is M (§ Symbolic links)
    pad = 4 << (flags & 3)
    return name.ljust(min(-(-max(len(name), 16) // pad) * pad, cap), b"\0")


def symlink_cap(nodesize: int) -> int:
    # SPEC § Symbolic links in encrypted directories, step 2: M = min(4095, max_item) - 2
    return min(4095, (nodesize - 85) // 4 - 25) - 2


def symlink_target(body: bytes, master: bytes, nonce: bytes) -> bytes:
    # SPEC § Symbolic links in encrypted directories: SymlinkDataHead (u16 len) + ciphertext, the link's own key
    (length,) = struct.unpack_from("<H", body, 0)
    assert length == len(body) - 2 and length >= 16
    return cs3_decrypt(hkdf_sha512(master, 2, nonce, 32), body[2:]).rstrip(b"\0")


def cs3_encrypt(key: bytes, text: bytes) -> bytes:
    # step 3, block by block: CBC with a zero IV over the zero-padded text, swap the last two, cut
    blocks = [text[i : i + 16].ljust(16, b"\0") for i in range(0, len(text), 16)]
    tail = len(text) - 16 * (len(blocks) - 1)
    out, prev = [], bytes(16)
    for b in blocks:
        prev = aes_block(key, xor(prev, b), True)
        out.append(prev)
    if len(out) > 1:
        out[-2], out[-1] = out[-1], out[-2][:tail]
    return b"".join(out)


def cs3_decrypt(key: bytes, stored: bytes) -> bytes:
    # step 4
    if len(stored) == 16:
        return aes_block(key, stored, False)
    tail = len(stored) - 16 * ((len(stored) - 1) // 16)
    head, swapped, last = stored[: -tail - 16], stored[-tail - 16 : -tail], stored[-tail:]
    d = aes_block(key, swapped, False)
    hidden = last + d[tail:]
    blocks = [head[i : i + 16] for i in range(0, len(head), 16)] + [hidden]
    out, prev = b"", bytes(16)
    for b in blocks:
        out += xor(aes_block(key, b, False), prev)
        prev = b
    return out + xor(d[:tail], last)


class SpecReader:
    """Reads an image file the way SPEC.md describes, checking what it says must hold."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.img = f.read()
        self.sb = self._superblock()
        self.blocks_read: dict[int, tuple[int, int]] = {}  # bytenr -> (owner, level): what was walked
        # SPEC § Finding the trees, step 1: superblock -> root tree, whose root has the superblock's generation
        self.root_tree = (self.sb["root"], self.sb["root_level"], self.sb["generation"], 1)
        self.trees = {}
        for tid in (2, FS_TREE, CSUM_TREE, 10):
            # step 2: (tid, ROOT_ITEM, 0) in the root tree: RootItem (SPEC § RootItem)
            body = self.get(self.root_tree, (tid, ROOT_ITEM, 0))
            assert body is not None and len(body) == 53, f"no ROOT_ITEM for tree {tid}"
            generation, root_dirid, bytenr, _used, _snap, _flags, _refs, level = struct.unpack("<QQQQQQIB", body)
            assert generation <= self.sb["generation"]
            if tid == FS_TREE:
                assert root_dirid == self.sb["root_dir_objectid"] == 256
            self.trees[tid] = (bytenr, level, generation, tid)

    # SPEC § Superblock, § Opening an image
    def _superblock(self) -> dict:
        for at in SUPER_OFFSETS:
            raw = self.img[at : at + 4096]
            if len(raw) < 4096 or raw[0x40:0x48] != MAGIC:
                continue
            (bytenr, flags, generation, root, total_bytes, bytes_used, root_dir, sectorsize, nodesize, csum_type,
             root_level) = struct.unpack_from("<QQ8xQQQQQIIHB", raw, 0x30)
            fsid = raw[0x20:0x30]
            if csum_type not in CSUM_SIZE or csum_type == 1:
                continue
            size = CSUM_SIZE[csum_type]
            valid = (raw[:size] == checksum(csum_type, raw[0x20:]) and raw[size:0x20] == bytes(0x20 - size)
                     and bytenr == at and sectorsize == 4096 and nodesize & (nodesize - 1) == 0
                     and 4096 <= nodesize <= 65536 and root_level < 8 and generation != 0)
            (incompat,) = struct.unpack_from("<Q", raw, 0x8C)  # SPEC § Superblock
            if at == SUPER_OFFSETS[0]:
                assert valid, "the primary superblock must be valid here (nothing was corrupted)"
                # EXTENDED_IREF: back references, which a reader looking names up by DIR_ITEM never reads
                assert incompat & ~0x8 in (1, 3), "ENCRYPTED_NAMES (and ENCRYPTED_SYMLINKS), no bit this reader does not know"
                return dict(fsid=fsid, generation=generation, root=root, root_level=root_level, nodesize=nodesize,
                            csum_type=csum_type, root_dir_objectid=root_dir, total_bytes=total_bytes)
        raise AssertionError("no valid primary superblock")

    # SPEC § Tree blocks, § Header, § Item, § KeyPtr; § Finding the trees, step 3
    def block(self, bytenr: int, level: int, generation: int, owner: int) -> tuple[int, list]:
        ns, ctype = self.sb["nodesize"], self.sb["csum_type"]
        raw = self.img[bytenr : bytenr + ns]
        size = CSUM_SIZE[ctype]
        assert raw[:size] == checksum(ctype, raw[0x20:]), f"tree block {bytenr}: checksum"
        fsid, hbytenr, _flags, hgen, howner, nritems, hlevel = struct.unpack_from("<16sQQQQIB", raw, 0x20)
        assert (fsid, hbytenr, hgen, howner, hlevel) == (self.sb["fsid"], bytenr, generation, owner, level)
        self.blocks_read[bytenr] = (owner, level)
        entries = []
        for i in range(nritems):
            if level == 0:
                oid, typ, off, doff, dsize = struct.unpack_from("<QBQII", raw, HEADER_SIZE + i * ITEM_SIZE)
                entries.append(((oid, typ, off), raw[HEADER_SIZE + doff : HEADER_SIZE + doff + dsize]))
            else:
                oid, typ, off, ptr, pgen = struct.unpack_from("<QBQQQ", raw, HEADER_SIZE + i * KEY_PTR_SIZE)
                entries.append(((oid, typ, off), (ptr, pgen)))
        keys = [k for k, _ in entries]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        return level, entries

    def items(self, tree: tuple, lo: tuple, hi: tuple):
        """Every (key, body) with lo <= key <= hi, in order (SPEC § Finding the trees, steps 3-4)."""
        bytenr, level, generation, owner = tree

        def walk(bytenr, level, generation):
            lvl, entries = self.block(bytenr, level, generation, owner)
            if lvl == 0:
                for key, body in entries:
                    if lo <= key <= hi:
                        yield key, body
                return
            # the last slot whose key <= lo (slot 0 if none), then every later child whose first key <= hi
            start = max([i for i, (k, _) in enumerate(entries) if k <= lo], default=0)
            for key, (ptr, pgen) in entries[start:]:
                if key > hi:
                    break
                yield from walk(ptr, lvl - 1, pgen)

        yield from walk(bytenr, level, generation)

    def get(self, tree: tuple, key: tuple) -> bytes | None:
        return next((body for _, body in self.items(tree, key, key)), None)

    # SPEC § Directories
    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        body = self.get(self.trees[FS_TREE], (dir_ino, DIR_ITEM, name_hash(name)))
        pos = 0
        while body is not None and pos < len(body):
            # DirItemHead (SPEC § DirItemHead): location Key, transid, data_len, name_len, type; then name, data
            loc_oid, loc_type, loc_off, _transid, data_len, name_len, _ftype = struct.unpack_from("<QBQQHHB", body, pos)
            pos += 30
            entry_name = body[pos : pos + name_len]
            pos += name_len + data_len
            if entry_name == name:
                assert (loc_type, loc_off) == (INODE_ITEM, 0)
                return loc_oid
        return None

    # SPEC § Names in encrypted directories
    def names_key(self, dir_ino: int, master: bytes) -> tuple[bytes, int] | None:
        ctxt = self.get(self.trees[FS_TREE], (dir_ino, FSCRYPT_CTXT, 0))
        if ctxt is None:
            return None
        assert ctxt[:4] == bytes([2, 1, 4, 3]) and ctxt[8:24] == hkdf_sha512(master, 1, b"", 16)
        return hkdf_sha512(master, 2, ctxt[24:40], 32), ctxt[3]

    def stored_name(self, dir_ino: int, name: bytes, master: bytes) -> bytes:
        key = self.names_key(dir_ino, master)
        return name if key is None else cs3_encrypt(key[0], pad_name(name, key[1]))

    def listdir(self, dir_ino: int, master: bytes) -> list[bytes]:
        key = self.names_key(dir_ino, master)
        out = []
        for _, body in self.items(self.trees[FS_TREE], (dir_ino, DIR_INDEX, 0), (dir_ino, DIR_INDEX, U64_MAX)):
            (name_len,) = struct.unpack_from("<H", body, 27)  # DirItemHead: name_len at 27, name at 30
            stored = body[30 : 30 + name_len]
            out.append(stored if key is None else cs3_decrypt(key[0], stored).rstrip(b"\0"))
        return out

    def resolve(self, path: str, master: bytes = MASTER) -> int:
        ino = self.sb["root_dir_objectid"]
        for part in path.strip("/").split("/"):
            found = self.lookup(ino, self.stored_name(ino, part.encode(), master))
            assert found is not None, f"{path}: no {part!r}"
            ino = found
        return ino

    # SPEC § Data checksums (in § File data)
    def sector_csum(self, sector: int) -> bytes:
        ctype = self.sb["csum_type"]
        hits = list(self.items(self.trees[CSUM_TREE], (EXTENT_CSUM_OBJECTID, EXTENT_CSUM, 0),
                               (EXTENT_CSUM_OBJECTID, EXTENT_CSUM, sector)))
        (_, _, start), body = hits[-1]
        i, size = (sector - start) // UNIT, CSUM_SIZE[ctype]
        assert (sector - start) % UNIT == 0 and (i + 1) * size <= len(body)
        return body[i * size : (i + 1) * size]

    # SPEC § File data, § Encryption, § Reading a file, step by step
    def file_items(self, ino: int) -> list[dict]:
        out = []
        for (_, _, file_offset), body in self.items(self.trees[FS_TREE], (ino, EXTENT_DATA, 0), (ino, EXTENT_DATA, U64_MAX)):
            # FileExtentItem (SPEC § FileExtentItem), 53 bytes
            (generation, ram_bytes, compression, encryption, other, typ, disk_bytenr, disk_num_bytes, extent_offset,
             num_bytes) = struct.unpack_from("<QQBBHBQQQQ", body, 0)
            item = dict(file_offset=file_offset, disk_bytenr=disk_bytenr, disk_num_bytes=disk_num_bytes,
                        extent_offset=extent_offset, num_bytes=num_bytes, encryption=encryption, context=None)
            assert (typ, compression, other) == (1, 0, 0) and disk_bytenr != 0 and ram_bytes == disk_num_bytes
            assert file_offset % UNIT == extent_offset % UNIT == num_bytes % UNIT == 0
            assert extent_offset + num_bytes <= disk_num_bytes
            if encryption == 1:
                # ExtentEncryptionContext (SPEC § ExtentEncryptionContext), 36 bytes after the FileExtentItem
                assert len(body) == 53 + 36
                version, mode, log2_unit, key_id, nonce = struct.unpack_from("<BBBx16s16s", body, 53)
                assert (version, mode, log2_unit) == (1, 1, 12)
                item["context"] = (key_id, nonce)
            else:
                assert encryption == 0 and len(body) == 53
            out.append(item)
        return out

    def read_file(self, path: str, master: bytes, *, tweak_from_file_start: bool = False) -> bytes:
        ino = self.resolve(path)
        fs = self.trees[FS_TREE]
        inode = self.get(fs, (ino, INODE_ITEM, 0))
        (size,) = struct.unpack_from("<Q", inode, 0x10)  # SPEC § InodeItem: size at 0x010
        ctxt = self.get(fs, (ino, FSCRYPT_CTXT, 0))  # SPEC § InodeEncryptionContext
        policy_key_id = ctxt[8:24] if ctxt is not None else None
        items = self.file_items(ino)
        end = max([it["file_offset"] + it["num_bytes"] for it in items], default=0)
        data = bytearray(max(size, end))  # holes (no item) read as zeros: SPEC § File data
        for it in items:
            start = it["disk_bytenr"] + it["extent_offset"]
            stored = self.img[start : start + it["num_bytes"]]
            for k in range(0, len(stored), UNIT):  # checksums are over the bytes on disk (ciphertext)
                assert checksum(self.sb["csum_type"], stored[k : k + UNIT]) == self.sector_csum(start + k)
            if it["encryption"] == 1:
                key_id, nonce = it["context"]
                assert key_id == policy_key_id == hkdf_sha512(master, 1, b"", 16)
                extent_key = hkdf_sha512(master, 9, nonce, 64)  # context 9, 64 bytes
                first = it["extent_offset"] // UNIT  # unit index from the extent's start on disk
                if tweak_from_file_start:  # the plain-fscrypt rule, wrong here: shows the difference
                    first = it["file_offset"] // UNIT
                stored = xts_decrypt(extent_key, stored, first)
            else:
                assert policy_key_id is None
            data[it["file_offset"] : it["file_offset"] + it["num_bytes"]] = stored
        return bytes(data[:size])  # i_size bounds the file


# ---- building the image (blockemu's public API) --------------------------------------------

def build(path: str, csum: str, node_size: str) -> bytes:
    rng = random.Random(12)
    units = [rng.randbytes(UNIT) for _ in range(12)]

    async def go() -> bytes:
        await blockemu.mkfs(path, size="64M", csum=csum, node_size=node_size)
        async with blockemu.mount(path) as fs:
            kid = await fs.add_key(MASTER)
            await fs.mkdir("/enc")
            await fs.set_policy("/enc", kid)
            await fs.mkdir("/plain")
            for i in range(40):  # siblings, so a 4 KiB-node fs tree needs more than one leaf
                async with fs.open(f"/enc/sibling-{i:02d}", "w") as f:
                    await f.write(b"s%d" % i)
            expect = bytearray()
            async with fs.open("/enc/target", "w") as f:
                await f.pwrite(units[0] + units[1] + units[2], 0)  # extent A: file units 0-2
                await f.fsync()
                await f.pwrite(units[3] + units[4] + units[5] + units[6], 5 * UNIT)  # extent B: file units 5-8
                await f.fsync()
                await f.pwrite(units[7], 6 * UNIT)  # splits B: its tail (file unit 7-8) keeps B's units 2-3
                await f.pwrite(units[8], 1 * UNIT)  # splits A: its tail at file unit 2 = A's unit 2
                await f.fsync()
                await f.pwrite(units[9][:100], 10 * UNIT + 7)  # a hole at unit 9, a partial last unit
                await f.fsync()
            expect += units[0] + units[8] + units[2] + bytes(2 * UNIT) + units[3] + units[7] + units[5] + units[6]
            expect += bytes(UNIT) + bytes(7) + units[9][:100]
            async with fs.open("/plain/file", "w") as f:
                await f.write(units[10] + units[11][:5])
            async with fs.open("/enc/target") as f:
                assert await f.read() == bytes(expect)  # blockemu agrees with the expectation
        return bytes(expect)

    return asyncio.run(go())


# ---- the tests ----------------------------------------------------------------------------

def test_worked_example_in_spec():
    """SPEC § Encryption, worked example, recomputed by the independent code."""
    assert hkdf_sha512(MASTER, 1, b"", 16).hex() == "69b2f6edeee720cce0577937eb8a6751"
    key = hkdf_sha512(MASTER, 9, bytes(range(16)), 64)
    assert key.hex() == ("a8c26f6033618f12cb6107c62d18d50e2b35239dc6e7351e238894be44d523e1"
                         "86f908b107f42992cb3d964fda4ed7e280584a1e41c945c059f77b13461e84b4")
    for unit, first16 in ((0, "9fccad452b7932f9f87c5ebd9cbd29c8"), (2, "659d9a741c9c96c74eb195ea0d6098f7")):
        ct = Cipher(algorithms.AES(key), modes.XTS(unit.to_bytes(16, "little"))).encryptor().update(bytes(UNIT))
        assert ct[:16].hex() == first16
        assert xts_decrypt(key, ct, unit) == bytes(UNIT)
    # SPEC § Directories, name hash table; § Checksums, crc32c check value
    assert [name_hash(n) for n in (b"f", b"hello", b"file.txt")] == [0x188E5B27, 0x5D9F2B1F, 0xEBD4CC02]
    # SPEC § Directories, extended reference hash table: the register starts at the parent's low 32 bits
    assert [crc32c_register(n, d & 0xFFFFFFFF) for d, n in ((256, b"f"), (257, b"hello"), (256, b"file.txt"))] \
        == [0x4767748B, 0x3A57086D, 0xB93CD098]
    assert checksum(0, b"123456789") == (0xE3069283).to_bytes(4, "little")
    # SPEC § Names in encrypted directories, worked example
    names_key = hkdf_sha512(MASTER, 2, bytes(range(16)), 32)
    assert names_key.hex() == "badfbae70512e3d28b99414b7887741d848f9283e09b7f59e8cbe78a2b2c05cb"
    hello = cs3_encrypt(names_key, pad_name(b"hello", 3))
    assert hello.hex() == "5cb2a7682a675ad009cc5401ce96209cb11b1123ab7c7f65ba62df02ba11140c"
    assert name_hash(hello) == 0xBD08F819
    long = cs3_encrypt(names_key, pad_name(b"a-name-of-33-bytes-long-exactly!!", 3))
    assert long.hex() == ("9086032b7459cb98a83c886b7311673447f69473cabe6235d54241b98d325f63"
                          "78e231c5651b054ec9948b80c335171cca85612639d9959a3a4b6f3131380a64")
    assert cs3_decrypt(names_key, long).rstrip(b"\0") == b"a-name-of-33-bytes-long-exactly!!"
    nokey = base64.urlsafe_b64encode(struct.pack("<II", name_hash(hello), 0) + hello).rstrip(b"=")
    assert nokey == b"GfgIvQAAAABcsqdoKmda0AnMVAHOliCcsRsRI6t8f2W6Yt8CuhEUDA"
    # SPEC § Symbolic links in encrypted directories, worked example (16 KiB nodes: M = 4047)
    assert symlink_cap(16384) == 4047 and symlink_cap(4096) == 975 and symlink_cap(65536) == 4093
    for target, body, form in (
        (b"../target/file", "2000ba2158ce9329248743f6be6fb62f833c460cb90a1ad7ad19daad7c3727edcede",
         b"AAAAAAAAAAC6IVjOkykkh0P2vm-2L4M8Rgy5ChrXrRnarXw3J-3O3g"),
        (b"/a/target/of/exactly-33-bytes-xyz",
         "400094572b401fd400a0f74b4e493c326355655412d06c6c4bb072dc88a90ffab1ab"
         "cc313a307b36d5aca5c403fd4a33eb0e45138f4af449bf80336ff37a45aef8bc",
         b"AAAAAAAAAACUVytAH9QAoPdLTkk8MmNVZVQS0GxsS7By3IipD_qxq8wxOjB7NtWspcQD_Uoz6w5FE49K9Em_gDNv83pFrvi8"),
    ):
        ct = cs3_encrypt(names_key, pad_name(target, 3, symlink_cap(16384)))
        assert (struct.pack("<H", len(ct)) + ct).hex() == body
        assert symlink_target(bytes.fromhex(body), MASTER, bytes(range(16))) == target
        assert base64.urlsafe_b64encode(bytes(8) + ct).rstrip(b"=") == form  # no-key form: dirhash 0, 0


@pytest.mark.parametrize("csum,node_size", [("crc32c", "4K"), ("sha256", "16K"), ("blake2b", "64K")])
def test_independent_reader_decrypts_the_image(tmp_path, csum, node_size):
    path = str(tmp_path / "spec.img")
    expect = build(path, csum, node_size)
    reader = SpecReader(path)

    # the file's layout really exercises the tweak rule: an item into the middle of an extent whose
    # extent_offset differs from its file offset (so extent-relative and file-relative tweaks differ)
    items = reader.file_items(reader.resolve("/enc/target"))
    assert any(it["extent_offset"] > 0 and it["extent_offset"] != it["file_offset"] for it in items), items
    assert len({it["disk_bytenr"] for it in items}) < len(items)  # an extent referenced twice
    assert all(it["encryption"] == 1 for it in items)

    assert reader.read_file("/enc/target", MASTER) == expect
    assert reader.read_file("/enc/target", MASTER, tweak_from_file_start=True) != expect
    assert reader.read_file("/enc/sibling-07", MASTER) == b"s7"
    plain = reader.read_file("/plain/file", MASTER)
    assert len(plain) == UNIT + 5 and reader.file_items(reader.resolve("/plain/file"))[0]["encryption"] == 0
    if node_size == "4K":
        assert (FS_TREE, 1) in reader.blocks_read.values()  # the fs tree was walked through a node, not one leaf
    with pytest.raises(AssertionError, match="no 'missing'"):
        reader.resolve("/enc/missing")
    enc = reader.resolve("/enc")
    assert sorted(reader.listdir(enc, MASTER)) == sorted([b"target"] + [b"sibling-%02d" % i for i in range(40)])
    with pytest.raises(AssertionError):
        reader.listdir(enc, bytes(range(64)))  # another key: its identifier is not the policy's
    assert reader.listdir(reader.resolve("/plain"), MASTER) == [b"file"]  # plaintext outside


def encrypted_dump(path: str, fill) -> dict:
    """An image whose /enc is encrypted with MASTER and filled by ``fill(fs)``: its fs tree as
    ``inspect dump-tree --json`` shows it, each item's data by key."""
    import json
    import subprocess
    import sys

    async def go() -> None:
        await blockemu.mkfs(path, size="32M")
        async with blockemu.mount(path) as fs:
            kid = await fs.add_key(MASTER)
            await fs.mkdir("/enc")
            await fs.set_policy("/enc", kid)
            await fill(fs)

    asyncio.run(go())
    out = subprocess.run([sys.executable, "-m", "blockemu", "inspect", "dump-tree", path, "--tree", "fs", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return {tuple(i["key"]): i["data"] for block in json.loads(out) for i in block.get("items", [])}


def test_names_decrypt_from_inspect_dump_tree_json(tmp_path):
    """Issue 15's independent check: directory entries as ``inspect dump-tree --json`` shows them
    (their stored bytes in ``name_hex``), decrypted by this file's own HKDF and CS3 code."""
    names = [b"hello", b"a-name-of-33-bytes-long-exactly!!", b"x" * 240, "caf\u00e9".encode()]

    async def fill(fs) -> None:
        for n in names:
            async with fs.open("/enc/" + n.decode(), "w") as f:
                await f.write(b"1")

    items = encrypted_dump(str(tmp_path / "names.img"), fill)
    [enc] = [k[0] for k in items if k[1] == FSCRYPT_CTXT and (k[0], INODE_REF, 256) in items]
    ctxt = bytes.fromhex(items[(enc, FSCRYPT_CTXT, 0)]["raw"])
    key = hkdf_sha512(MASTER, 2, ctxt[24:40], 32)
    stored = [bytes.fromhex(e["name_hex"]) for k, d in items.items() if k[:2] == (enc, DIR_INDEX) for e in d["entries"]]
    assert all(len(s) % 32 == 0 or len(s) == 255 for s in stored)
    assert sorted(cs3_decrypt(key, s).rstrip(b"\0") for s in stored) == sorted(names)
    for k, d in items.items():  # the hash is over the stored bytes
        if k[:2] == (enc, DIR_ITEM):
            assert all(name_hash(bytes.fromhex(e["name_hex"])) == k[2] for e in d["entries"])


def test_symlink_targets_decrypt_from_inspect_dump_tree_json(tmp_path):
    """Issue 15's independent check for links: each FSCRYPT_SYMLINK item as ``inspect dump-tree
    --json`` shows it (``raw``), decrypted with the link's own nonce by this file's HKDF and CS3
    code; the reader finds the same link by its encrypted name and its body has no plaintext."""
    path = str(tmp_path / "links.img")
    targets = {"s": "../target/file", "abs": "/an/absolute/target/of/some/length", "long": "/l/" + "q" * 3000}

    async def fill(fs) -> None:
        for name, target in targets.items():
            await fs.symlink(target, "/enc/" + name)

    items = encrypted_dump(path, fill)
    links = [k[0] for k in items if k[1] == FSCRYPT_SYMLINK]
    got = {}
    for ino in links:
        body = bytes.fromhex(items[(ino, FSCRYPT_SYMLINK, 0)]["raw"])
        nonce = bytes.fromhex(items[(ino, FSCRYPT_CTXT, 0)]["raw"])[24:40]  # the link's own context
        assert items[(ino, INODE_ITEM, 0)]["size"] == len(body) and not any(k[:2] == (ino, EXTENT_DATA) for k in items)
        assert (len(body) - 2) % 32 == 0 or len(body) - 2 == symlink_cap(16384)
        got[ino] = symlink_target(body, MASTER, nonce)
    assert sorted(got.values()) == sorted(t.encode() for t in targets.values())
    reader = SpecReader(path)
    for name, target in targets.items():
        ino = reader.resolve("/enc/" + name)
        assert got[ino] == target.encode()
        assert target.encode() not in reader.get(reader.trees[FS_TREE], (ino, FSCRYPT_SYMLINK, 0))
