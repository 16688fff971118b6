"""The on-disk format: SPEC.md tables == construct definitions == golden vectors == fast path."""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.errors import CorruptionError
from blockemu.ondisk import csum, fast, items
from blockemu.ondisk import structs as S
from blockemu.ondisk.block import TreeBlock, decode_block, encode_block
from blockemu.ondisk.superblock import decode_super, encode_super

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_vectors import plain  # noqa: E402  (the generator and the test agree on the JSON form)

VECTORS = ROOT / "format" / "vectors"
SPEC = (ROOT / "format" / "SPEC.md").read_text()
FSID = bytes.fromhex("00112233445566778899aabbccddeeff")


def spec_tables() -> dict[str, list[tuple[int, int, str]]]:
    tables = {}
    for m in re.finditer(r"^### (\w+)\n(.*?)(?=^### |\Z)", SPEC, re.S | re.M):
        rows = re.findall(r"^\| (0x[0-9a-f]+) \| (\d+) \| ([^|]+?) \|", m[2], re.M)
        tables[m[1]] = [(int(o, 16), int(z), f) for o, z, f in rows]
    return tables


def test_spec_documents_exactly_the_structs():
    assert set(spec_tables()) == set(S.STRUCTS)


@pytest.mark.parametrize("name", list(S.STRUCTS))
def test_spec_table_matches_definition(name):
    con = S.STRUCTS[name]
    assert spec_tables()[name] == fast.layout(con)
    assert f"### {name}\n\n{con.sizeof()} bytes." in SPEC


@pytest.mark.parametrize("name", list(S.STRUCTS))
def test_vector_round_trips_and_fast_path_agrees(name):
    con = S.STRUCTS[name]
    raw = (VECTORS / f"{name}.bin").read_bytes()
    parsed = con.parse(raw)
    assert plain(parsed) == json.loads((VECTORS / f"{name}.json").read_text())
    assert con.build(parsed) == raw
    packed, _ = fast.FAST[name]
    assert list(packed.unpack(raw)) == fast.flat_values(name, parsed)
    assert packed.pack(*packed.unpack(raw)) == raw


@pytest.mark.parametrize("name", list(S.STRUCTS))
def test_a_decoder_of_some_fields_agrees_with_construct(name):
    """``fast.picked`` (fsck reads four fields of an inode this way): each field it keeps is what
    construct parses there, on the golden vector and on random bytes, whichever fields it keeps."""
    con = S.STRUCTS[name]
    _, names = fast.FAST[name]
    for seed in range(20):
        rng = random.Random(seed)
        keep = tuple(n for n in names if rng.random() < 0.5) or (names[-1],)
        picked = fast.picked(name, keep)
        assert picked.size == con.sizeof()
        for raw in ((VECTORS / f"{name}.bin").read_bytes(), rng.randbytes(con.sizeof())):
            try:
                parsed = con.parse(raw)
            except Exception:  # a Const field (a magic) that random bytes do not hold
                continue
            flat = dict(zip(names, fast.flat_values(name, parsed)))
            assert picked.unpack(raw) == tuple(flat[n] for n in keep), (name, keep)


def test_fsck_reads_the_inode_fields_it_names():
    from blockemu.check import fsck_fast

    raw = (VECTORS / "InodeItem.bin").read_bytes()
    item = items.InodeItem.unpack(raw)
    assert fsck_fast.INODE.unpack(raw) == (item.size, item.nbytes, item.nlink, item.mode)


@pytest.mark.parametrize("name,nodesize,csum_type", [("leaf_4k_crc32c", 4096, 0), ("node_4k_xxhash64", 4096, 1)])
def test_block_vectors_decode_and_reencode(name, nodesize, csum_type):
    raw = (VECTORS / f"{name}.bin").read_bytes()
    block = decode_block(raw, bytenr=int.from_bytes(raw[0x30:0x38], "little"), nodesize=nodesize, csum_type=csum_type, fsid=FSID)
    assert encode_block(block, nodesize=nodesize, csum_type=csum_type, fsid=FSID) == raw
    # the construct definitions read the same header and items as the fast path
    header = S.Header.parse(raw)
    assert (header.nritems, header.level, header.generation, header.owner) == (len(block.keys), block.level, block.generation, block.owner)
    entry = S.Item if block.level == 0 else S.KeyPtr
    for i, key in enumerate(block.keys):
        e = entry.parse(raw[fast.HEADER_SIZE + i * entry.sizeof():])
        assert (e.key.objectid, e.key.type, e.key.offset) == key


@pytest.mark.parametrize("n", [2, 63, 64, 65, 128, 300])
@pytest.mark.parametrize("level", [0, 1])
def test_encode_block_packs_every_row_as_the_construct_definition_reads_it(n, level):
    """Item headers and key pointers are packed in runs of ``PACK_ROWS``: every row, each side
    of a run's edge, lands where the construct definition reads it, and decodes back."""
    rng = random.Random(n)
    keys = sorted({(rng.randrange(1 << 40), rng.randrange(256), rng.randrange(1 << 62)) for _ in range(n)})
    block = TreeBlock(bytenr=1 << 20, generation=7, owner=5, level=level, keys=keys,
                      values=[rng.randbytes(rng.randrange(4, 40)) for _ in keys] if level == 0 else [],
                      ptrs=[] if level == 0 else [(rng.randrange(1 << 50) << 12, rng.randrange(1 << 40)) for _ in keys])
    raw = encode_block(block, nodesize=16384, csum_type=0, fsid=FSID)
    entry = S.Item if level == 0 else S.KeyPtr
    for i, key in enumerate(keys):
        e = entry.parse(raw[fast.HEADER_SIZE + i * entry.sizeof():])
        assert (e.key.objectid, e.key.type, e.key.offset) == key
        if level:
            assert (e.blockptr, e.generation) == block.ptrs[i]
        else:
            assert raw[fast.HEADER_SIZE + e.offset:][:e.size] == block.values[i]
    back = decode_block(raw, bytenr=1 << 20, nodesize=16384, csum_type=0, fsid=FSID)
    assert (back.keys, back.values, back.ptrs) == (keys, block.values, block.ptrs)


def test_superblock_vector():
    raw = (VECTORS / "superblock_primary.bin").read_bytes()
    sb = decode_super(raw, 65536)
    assert (sb.generation, sb.root, sb.root_level, sb.label, sb.nodesize) == (42, 1 << 20, 1, "golden", 16384)
    assert encode_super(sb, 65536) == raw
    with pytest.raises(CorruptionError, match="bytenr"):
        decode_super(raw, 64 << 20)
    bad = bytearray(raw)
    bad[0x100] ^= 1
    with pytest.raises(CorruptionError, match="checksum"):
        decode_super(bytes(bad), 65536)


def test_encode_super_packs_every_field_as_the_construct_definition_does():
    """encode_super packs with the struct format derived from construct: every field, the
    backup roots' and the log's included, lands where the construct definition puts it."""
    from blockemu.ondisk.superblock import BACKUP_FIELDS, SuperInfo

    n = iter(range(1, 10_000))
    backups = [{f: next(n) for f in BACKUP_FIELDS} for _ in range(S.NUM_BACKUP_ROOTS)]
    sb = SuperInfo(fsid=FSID, generation=next(n), root=next(n), root_level=2, total_bytes=next(n) << 30,
                   bytes_used=next(n), nodesize=4096, csum_type=csum.XXHASH64, label="lbl", compat_flags=next(n),
                   compat_ro_flags=next(n), incompat_flags=next(n), backup_roots=backups, log_root=next(n),
                   log_root_transid=next(n), log_root_level=3)
    raw = S.Superblock.build(dict(csum=bytes(S.CSUM_FIELD), fsid=sb.fsid, bytenr=65536, flags=sb.flags,
                                  generation=sb.generation, root=sb.root, total_bytes=sb.total_bytes,
                                  bytes_used=sb.bytes_used, root_dir_objectid=sb.root_dir_objectid,
                                  sectorsize=sb.sectorsize, nodesize=sb.nodesize, csum_type=sb.csum_type,
                                  root_level=sb.root_level, compat_flags=sb.compat_flags,
                                  compat_ro_flags=sb.compat_ro_flags, incompat_flags=sb.incompat_flags,
                                  label=b"lbl".ljust(256, b"\0"), backup_roots=backups, log_root=sb.log_root,
                                  log_root_transid=sb.log_root_transid, log_root_level=sb.log_root_level))
    assert encode_super(sb, 65536) == csum.field(sb.csum_type, raw[S.CSUM_FIELD:]) + raw[S.CSUM_FIELD:]


def test_checksum_known_answers():
    assert csum.digest(csum.CRC32C, b"123456789") == (0xE3069283).to_bytes(4, "little")
    assert csum.digest(csum.XXHASH64, b"") == (0xEF46DB3751D8E999).to_bytes(8, "little")
    assert csum.digest(csum.SHA256, b"abc").hex().startswith("ba7816bf")
    assert len(csum.field(csum.BLAKE2B, b"x")) == 32 and csum.csum_size(csum.BLAKE2B) == 32


@pytest.mark.parametrize("ctype", sorted(csum.ALGORITHMS))
def test_digests_of_a_range_are_its_sectors_digests(ctype):
    """A range's checksums in one call (a cold read verifies each part with it, the sealer
    checksums each extent) are exactly the per-sector digests the checksum items hold."""
    data = bytes(range(256)) * 16 * 3 + b"\x01" * 4096
    sectors = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    want = b"".join(csum.digest(ctype, s) for s in sectors)
    assert csum.digests(data, ctype) == want and csum.unit_digests(sectors, ctype) == want
    assert csum.digests(b"", ctype) == b""


def test_decode_rejects_bad_checksum_and_location():
    raw = bytearray((VECTORS / "leaf_4k_crc32c.bin").read_bytes())
    with pytest.raises(CorruptionError) as e:
        decode_block(bytes(raw), bytenr=4096, nodesize=4096, csum_type=0, fsid=FSID, verify_csum=False)
    assert "bytenr" in str(e.value)
    raw[200] ^= 0x40
    with pytest.raises(CorruptionError) as e:
        decode_block(bytes(raw), bytenr=1 << 20, nodesize=4096, csum_type=0, fsid=FSID)
    assert e.value.kind == "CSUM_MISMATCH"


@settings(max_examples=400)
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
       st.sampled_from(["leaf_4k_crc32c", "node_4k_xxhash64"]))
def test_hostile_blocks_only_raise_corruption(edits, name):
    """Arbitrary byte edits (checksum not verified, so the parser sees them) never crash the decoder."""
    raw = bytearray((VECTORS / f"{name}.bin").read_bytes())
    for pos, val in edits:
        raw[pos] = val
    try:
        block = decode_block(bytes(raw), bytenr=int.from_bytes(raw[0x30:0x38], "little"), nodesize=4096,
                             csum_type=0, fsid=bytes(raw[0x20:0x30]), verify_csum=False)
    except CorruptionError:
        return
    assert len(block.keys) * (25 if block.level == 0 else 33) <= 4096


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_hostile_item_bodies_only_raise_corruption(body):
    for parse in (items.RootItem.unpack, items.InodeItem.unpack, items.InodeRef.unpack, items.FileExtent.unpack,
                  items.ExtentItem.unpack, items.unpack_dir_entries, items.unpack_symlink_data):
        try:
            parse(body)
        except CorruptionError:
            pass


def test_item_bodies_round_trip():
    fe = items.FileExtent(3, 8192, 0, S.ENCRYPTION_FSCRYPT, 0, S.FILE_EXTENT_REG, 1 << 20, 8192, 0, 8192,
                          items.ExtentContext(1, 1, 12, b"k" * 16, b"n" * 16))
    assert items.FileExtent.unpack(fe.pack()) == fe and len(fe.pack()) == 53 + 36
    ei = items.ExtentItem(2, 5, S.EXTENT_FLAG_DATA, (("data", 5, 257, 0, 1), ("data", 5, 258, 4096, 1)))
    assert items.ExtentItem.unpack(ei.pack()) == ei
    entries = [items.DirEntry((257, 1, 0), 4, 1, b"a"), items.DirEntry((258, 1, 0), 4, 2, b"bcd")]
    assert items.unpack_dir_entries(items.pack_dir_entries(entries)) == entries


U64 = st.integers(0, (1 << 64) - 1)
CONTEXTS = st.none() | st.builds(items.ExtentContext, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
                                 st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16))


@settings(max_examples=200)
@given(st.lists(st.tuples(U64, U64, U64, U64, U64, CONTEXTS), min_size=1, max_size=4), U64)
def test_new_data_extent_items_are_the_general_ones(rows, generation):
    """The builders of a batch's new extents' items (``ExtentBatch.add_extents`` stages every
    written extent through them: C-level maps over the batch) and the decoder of the extent
    items' bodies give what the NamedTuples and their general pack and unpack give: the same
    objects and the same bytes, for every field value the format can hold -- batches of
    plaintext extents, of encrypted ones, and of both."""
    ram_bytes, bytenrs, lengths, inos, file_offsets, contexts = zip(*rows)
    fes, bodies = items.new_data_extents(generation, ram_bytes, bytenrs, lengths, contexts)
    ei_bodies = items.new_data_extent_items(generation, inos, file_offsets)
    assert len(fes) == len(bodies) == len(ei_bodies) == len(rows)
    for (ram, bytenr, length, ino, file_offset, context), got_fe, body, ei_body in zip(rows, fes, bodies, ei_bodies):
        fe = items.FileExtent(generation, ram, 0, S.ENCRYPTION_FSCRYPT if context else S.ENCRYPTION_NONE,
                              0, S.FILE_EXTENT_REG, bytenr, length, 0, length, context)
        assert type(got_fe) is items.FileExtent and got_fe == fe and body == fe.pack()
        assert items.FileExtent.unpack(body) == fe
        ei = items.ExtentItem(1, generation, S.EXTENT_FLAG_DATA, (("data", S.FS_TREE_OBJECTID, ino, file_offset, 1),))
        got_ei = items.new_data_extent_item(ei_body)
        assert type(got_ei) is items.ExtentItem and got_ei == ei and ei_body == ei.pack()
        assert items.ExtentItem.unpack(ei_body) == ei


def _one_by_one(unpack, body):
    try:
        return unpack(body)
    except CorruptionError:
        return "error"


WELL_FORMED = [
    items.FileExtent(3, 8192, 0, S.ENCRYPTION_FSCRYPT, 0, S.FILE_EXTENT_REG, 1 << 20, 8192, 0, 8192,
                     items.ExtentContext(1, 1, 12, b"k" * 16, b"n" * 16)).pack(),
    items.FileExtent(3, 4096, 0, S.ENCRYPTION_NONE, 0, S.FILE_EXTENT_REG, 1 << 20, 4096, 0, 4096).pack(),
    items.ExtentItem(1, 5, S.EXTENT_FLAG_DATA, (("data", 5, 257, 0, 1),)).pack(),
    items.ExtentItem(1, 5, S.EXTENT_FLAG_TREE_BLOCK, (("tree", 2),)).pack(),
    items.pack_dir_entries([items.DirEntry((257, 1, 0), 4, 1, b"name")]),
    items.InodeRef(3, b"name").pack(),
    fast.INODE_ITEM.pack(*range(1, 21)),
]


@settings(max_examples=120)
@given(st.lists(st.one_of(st.sampled_from(WELL_FORMED), st.binary(max_size=100),
                          st.sampled_from(WELL_FORMED).flatmap(lambda b: st.tuples(st.just(b), st.integers(0, len(b) - 1),
                                                                                    st.integers(0, 255)))
                          .map(lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:])), max_size=12))
def test_bulk_decoders_agree_with_one_by_one(bodies):
    """Each bulk decoder (fsck's) gives, per body, what ``unpack`` gives, or None, and None only
    where the body is not of its common shape: fsck then decodes it alone, so its findings
    cannot depend on which path a body took."""
    def refs_one(b):
        return items.unpack_inode_refs(b)[0]

    def entry_one(b):
        return items.unpack_dir_entries(b)[0]

    def inode_flat(b):
        return tuple(fast.INODE_ITEM.unpack(items.InodeItem.unpack(b).pack()))
    for bulk, unpack, shape in (
            (items.unpack_file_extents, items.FileExtent.unpack, lambda b, v: True),
            (items.unpack_extent_items, items.ExtentItem.unpack, lambda b, v: len(v.refs) != 1),
            (items.unpack_dir_entries_one, entry_one, lambda b, v: len(items.unpack_dir_entries(b)) != 1),
            (items.unpack_inode_refs_one, refs_one, lambda b, v: len(items.unpack_inode_refs(b)) != 1),
            (items.unpack_inode_rows, inode_flat, lambda b, v: False)):
        for body, got in zip(bodies, bulk(bodies)):
            want = _one_by_one(unpack, body)
            if got is None:
                assert want == "error" or shape(body, unpack(body) if bulk is not items.unpack_inode_rows else None), \
                    (bulk.__name__, body)
            else:
                assert tuple(got) == tuple(want), (bulk.__name__, body)


def test_leaf_bodies_in_any_layout_decode_alike():
    """Writers lay item bodies each below the one before, which the decoder checks without a sort;
    any other layout goes through the sort, and overlap is still caught."""
    block = decode_block((VECTORS / "leaf_4k_crc32c.bin").read_bytes(), bytenr=1 << 20, nodesize=4096,
                         csum_type=0, fsid=FSID, verify_csum=False)
    raw = bytearray(encode_block(block, nodesize=4096, csum_type=0, fsid=FSID))
    heads = [list(fast.ITEM.unpack_from(raw, fast.HEADER_SIZE + i * fast.ITEM_SIZE)) for i in range(len(block.keys))]
    assert len(heads) >= 2 and heads[0][3] > heads[1][3]
    a, b = heads[0], heads[1]  # swap where the first two bodies live
    lo = b[3]
    body_a, body_b = bytes(raw[fast.HEADER_SIZE + a[3]:][:a[4]]), bytes(raw[fast.HEADER_SIZE + b[3]:][:b[4]])
    raw[fast.HEADER_SIZE + lo:fast.HEADER_SIZE + lo + a[4] + b[4]] = body_a + body_b
    a[3], b[3] = lo, lo + a[4]
    for i, h in ((0, a), (1, b)):
        fast.ITEM.pack_into(raw, fast.HEADER_SIZE + i * fast.ITEM_SIZE, *h)
    again = decode_block(bytes(raw), bytenr=1 << 20, nodesize=4096, csum_type=0, fsid=FSID, verify_csum=False)
    assert (again.keys, again.values, again.used) == (block.keys, block.values, block.used)
    b[3] -= 1  # now the second body's first byte is the first body's last
    fast.ITEM.pack_into(raw, fast.HEADER_SIZE + fast.ITEM_SIZE, *b)
    with pytest.raises(CorruptionError, match="item data overlap"):
        decode_block(bytes(raw), bytenr=1 << 20, nodesize=4096, csum_type=0, fsid=FSID, verify_csum=False)
