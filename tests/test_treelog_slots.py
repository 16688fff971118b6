"""Log slots (SPEC "Log slots"): a log sync after the transaction's first writes its blocks, its
data and a slot naming them, then flushes once. A power cut may land the slot without the rest:
mount, fsck and the crash oracle must then take the log before it, and only then."""
from __future__ import annotations

import dataclasses
import os
import random

import pytest

import blockemu
from blockemu.check.fsck import check
from blockemu.check.inspect import dump_super, super_text
from blockemu.check.repair import restore_primary_super, zero_log
from blockemu.device.image import ImageFile
from blockemu.engine.treelog import choose_log
from blockemu.errors import CorruptionError
from blockemu.ondisk import csum as csums
from blockemu.ondisk import structs as S
from blockemu.ondisk.logslot import SlotInfo, decode_slot, encode_slot
from blockemu.ondisk.superblock import encode_super
from tests.test_treelog import _super, committed_then_log

FSID = bytes(range(16))


def test_a_slot_round_trips_and_a_torn_or_foreign_one_is_none():
    slot = SlotInfo(7, 1 << 20, 3, 2 << 20, 1, ((2 << 20, b"\x01" * 32), (3 << 20, b"\x02" * 32)))
    at = S.LOG_SLOT_OFFSETS[1]
    raw = encode_slot(slot, FSID, 0, at)
    assert len(raw) == S.LOG_SLOT_SIZE and decode_slot(raw, at, FSID, 0) == slot
    assert S.LogSlot.parse(raw).blocks[1].bytenr == 3 << 20  # the construct definition agrees
    # new head, old tail (zeros): a 512-byte tear of a slot with a block past the head
    many = dataclasses.replace(slot, blocks=tuple((i << 20, bytes([i]) * 32) for i in range(1, 20)))
    torn = encode_slot(many, FSID, 0, at)[:512] + bytes(S.LOG_SLOT_SIZE - 512)
    assert decode_slot(torn, at, FSID, 0) is None
    assert decode_slot(raw, S.LOG_SLOT_OFFSETS[0], FSID, 0) is None  # another slot's copy
    assert decode_slot(raw, at, bytes(16), 0) is None  # another image's
    assert decode_slot(bytes(S.LOG_SLOT_SIZE), at, FSID, 0) is None  # never written / wiped


async def _three_syncs(tmp_path, node_size: str = "4K", size: str = "64M"):
    """/f committed, then three fsyncs of scattered overwrites: the first writes the superblock,
    the second and third a slot each. Returns the write log and /f after each fsync."""
    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size=size, node_size=node_size, force=True)
    rng = random.Random(3)
    async with blockemu.mount(img, interval=3600) as fs:
        want = bytearray(rng.randbytes(64 * 4096))
        log = await committed_then_log(fs, tmp_path, bytes(want))
        gen, after = fs.vol.generation, []
        async with fs.open("/f", "r+") as f:
            for _ in range(3):
                for page in rng.sample(range(64), 5):
                    data = rng.randbytes(4096)
                    want[page * 4096:(page + 1) * 4096] = data
                    await f.pwrite(data, page * 4096)
                await f.fsync()
                after.append(bytes(want))
        assert fs.vol.generation == gen and fs.vol.log.sequence == 3, "three log syncs, no commit"
        log.crash_image(str(tmp_path / "done.img"), len(log.entries))
        return log, after


async def test_a_later_log_sync_is_one_flush_and_no_superblock_write(tmp_path):
    log, _ = await _three_syncs(tmp_path)
    kinds = [(e.kind, e.offset) for e in log.entries if e.kind in ("flush", "fua") or e.offset in S.LOG_SLOT_OFFSETS]
    syncs = kinds[:kinds.index(("write", S.LOG_SLOT_OFFSETS[1])) + 2]  # up to the third sync's flush
    assert syncs == [("flush", 0), ("fua", S.SUPER_OFFSETS[0]),  # the first: flush, superblock FUA
                     ("write", S.LOG_SLOT_OFFSETS[0]), ("flush", 0),  # sequence 2: its slot, one flush
                     ("write", S.LOG_SLOT_OFFSETS[1]), ("flush", 0)], kinds  # sequence 3: the other slot


async def _read_back(path: str) -> bytes:
    """/f as a read-only mount sees it (the log replayed in memory; the image unchanged)."""
    async with blockemu.mount(path, readonly=True) as fs:
        async with fs.open("/f") as f:
            return await f.read()


def _last_sync(log):
    """The last slot write and what is in doubt with it right after it completed (no flush yet):
    (its entry, the log block writes it lists, the other writes -- the sync's data)."""
    slot = [e for e in log.entries if e.kind == "write" and e.offset in S.LOG_SLOT_OFFSETS][-1]
    _, doubt = log.split(slot.seq + 1)
    with ImageFile.open(log.base) as img:
        sb = img.best_super()
    info = decode_slot(slot.data, slot.offset, sb.fsid, sb.csum_type)
    assert info is not None and info.sequence == 3
    listed = {b for b, _ in info.blocks}
    blocks = [e.seq for e in doubt if e.offset in listed]
    data = [e.seq for e in doubt if e.offset not in listed and e.seq != slot.seq]
    assert blocks and data, "the sync's log blocks and data are in doubt with its slot"
    return slot, blocks, data


@pytest.mark.parametrize("lost", ["data", "a log block", "nothing"])
async def test_a_slot_that_landed_without_what_it_names_falls_back_to_the_sync_before(tmp_path, lost):
    """The third fsync's slot landed, its flush never completed: with a data sector or a log
    block of it missing, mount, fsck and inspect take the second fsync's log (what was
    acknowledged), and fsck notes the sync that did not land; with all of it there, the third's.
    Fails if the data or the blocks are not verified (the data: a mount replays extents whose
    sectors fail every read; a block: a stale block reads as the log's)."""
    log, after = await _three_syncs(tmp_path)
    slot, blocks, data = _last_sync(log)
    crash = str(tmp_path / "crash.img")
    drop = {"data": data[-1:], "a log block": blocks[:1], "nothing": []}[lost]
    keep = [e.seq for e in log.split(slot.seq + 1)[1] if e.seq not in drop]
    log.crash_image(crash, slot.seq + 1, keep)
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    passed = [n for n in report.notes if "did not land whole" in n]
    assert len(passed) == (lost != "nothing"), report.notes
    assert await _read_back(crash) == after[1 if drop else 2]


async def test_a_log_block_torn_after_its_checksum_falls_back_to_the_sync_before(tmp_path):
    """A 16 KiB log block of the third fsync's sync torn at 4 KiB sectors: its first sector --
    the checksum field the slot recorded -- landed, the rest did not. That sync was never
    acknowledged: mount and fsck take the second's log, not fail on the block's checksum (the
    crash campaign's 4 KiB nodes never tear a block). Fails if only the checksum field is
    compared: mount refused the log (checksum mismatch) and the second fsync was lost."""
    log, after = await _three_syncs(tmp_path, node_size="16K")
    slot, blocks, _ = _last_sync(log)
    crash = str(tmp_path / "crash.img")
    log.crash_image(crash, slot.seq + 1, [e.seq for e in log.split(slot.seq + 1)[1]], torn={blocks[0]: [0]})
    report = check(crash, check_data=True)
    assert report.clean, [e.message for e in report.errors]
    assert [n for n in report.notes if "did not land whole" in n], report.notes
    assert await _read_back(crash) == after[1]


async def test_a_durable_slot_that_does_not_read_whole_is_damage(tmp_path):
    """Only the newest log sync can be in flight at a power cut: the one before it flushed before
    the newer slot was written. With both slots' logs failing (a block of each flipped: media
    damage), mount and fsck say the log is damaged -- not replay the superblock's log and drop the
    second fsync, acknowledged, as if it never landed. Fails if every failing slot is passed over."""
    await _three_syncs(tmp_path)
    done = str(tmp_path / "done.img")
    sb = _super(done)
    with open(done, "r+b") as f:
        for at in S.LOG_SLOT_OFFSETS:
            f.seek(at)
            bytenr = decode_slot(f.read(S.LOG_SLOT_SIZE), at, sb.fsid, sb.csum_type).blocks[0][0]
            f.seek(bytenr + 200)
            byte = f.read(1)[0]
            f.seek(bytenr + 200)
            f.write(bytes([byte ^ 1]))
    report = check(done)
    assert any("was durable before log sync 3 began" in e.message for e in report.errors), report.errors
    with pytest.raises(CorruptionError, match="zero-log"):
        await _read_back(done)


def _claim_blocks(path: str, at: int, n: int) -> None:
    """Rewrite the slot at ``at`` to claim ``n`` blocks, checksummed again: no tear, no writer's
    slot -- the crafted or buggy one a reader must not take for a sync that did not land."""
    sb = _super(path)
    with open(path, "r+b") as f:
        f.seek(at)
        raw = bytearray(f.read(S.LOG_SLOT_SIZE))
        raw[0x62:0x64] = n.to_bytes(2, "little")
        f.seek(at)
        f.write(csums.field(sb.csum_type, memoryview(raw)[S.CSUM_FIELD:]) + bytes(raw[S.CSUM_FIELD:]))


async def test_a_slot_claiming_more_blocks_than_it_holds_is_damage_not_skipped(tmp_path):
    """The newest slot (the third fsync's) rewritten whole, its checksum good, to claim 97 blocks
    (a slot holds 96): decode skipped it as if it never landed, so mount replayed the second
    fsync's log -- dropping the third, acknowledged -- and fsck said clean. It is a damaged log:
    fsck says so and points at zero-log, mount refuses it as any damaged log, dump-super warns.
    A stale slot (another generation) claiming as much is still only stale: the log replays."""
    log, after = await _three_syncs(tmp_path)
    done, stale = str(tmp_path / "done.img"), str(tmp_path / "stale.img")
    sb = _super(done)
    with open(done, "rb") as f, open(stale, "wb") as g:
        g.write(f.read())
    newest = max(S.LOG_SLOT_OFFSETS, key=lambda at: _slot(done, at, sb).sequence)
    _claim_blocks(done, newest, S.LOG_SLOT_BLOCKS + 1)
    report = check(done)
    assert any(f"log slot {newest} claims 97 blocks" in e.message for e in report.errors), report.errors
    assert any("zero-log" in n for n in report.notes), report.notes
    with pytest.raises(CorruptionError, match="zero-log"):
        await _read_back(done)
    assert any(f"log slot {newest} claims 97 blocks" in p for p in dump_super(done)["problems"])
    older = min(S.LOG_SLOT_OFFSETS, key=lambda at: _slot(stale, at, sb).sequence)
    info = _slot(stale, older, sb)
    with open(stale, "r+b") as f:
        f.seek(older)
        f.write(encode_slot(dataclasses.replace(info, generation=sb.generation - 1), sb.fsid, sb.csum_type, older))
    _claim_blocks(stale, older, 500)
    assert check(stale, check_data=True).clean
    # dump-super still warns of it, but as the stale slot mount ignores (it read as the log's damage)
    assert [p for p in dump_super(stale)["problems"] if "claims" in p] == \
        [f"log slot {older} claims 500 blocks, more than the 96 a slot holds (stale, generation "
         f"{sb.generation - 1}: not this superblock's log; mount ignores it)"]
    assert await _read_back(stale) == after[2]


def _slot(path: str, at: int, sb) -> SlotInfo:
    with open(path, "rb") as f:
        f.seek(at)
        return decode_slot(f.read(S.LOG_SLOT_SIZE), at, sb.fsid, sb.csum_type)


async def test_the_crash_oracle_makes_each_slot_durable_at_its_flush(tmp_path):
    """``durable_points``: a slot's state is durable right after the flush that covers it (then
    every crash state must open to it), not at its write; fails if slots are not followed."""
    from blockemu.workload.crash import durable_points
    log, _ = await _three_syncs(tmp_path)
    points = durable_points(log, len(log.entries))
    flushes = [e.seq + 1 for e in log.entries if e.kind == "flush"]
    assert [at for at, _ in points[1:3]] == [f for f in flushes if f > points[0][0]][:2], (points, flushes)
    assert len({root for _, (_, root) in points[:3]}) == 3 and points[3][1][1] == 0, points  # then the commit


async def test_zero_log_wipes_the_slots_and_an_older_builds_log_still_replays(tmp_path):
    log, after = await _three_syncs(tmp_path)
    done = str(tmp_path / "done.img")
    older = str(tmp_path / "older.img")
    # the superblock's own log, without LOG_SLOTS: what a build before the slots left
    with open(done, "rb") as f, open(older, "wb") as g:
        g.write(f.read())
    with ImageFile.open(older) as img:
        sb = img.best_super()
    sb.incompat_flags &= ~S.INCOMPAT_LOG_SLOTS
    with open(older, "r+b") as f:
        f.seek(S.SUPER_OFFSETS[0])
        f.write(encode_super(sb, S.SUPER_OFFSETS[0]))
    assert check(older, check_data=True).clean
    assert await _read_back(older) == after[0]  # the first sync's log: the superblock names it
    assert await _read_back(done) == after[2]
    slots = dump_super(done)["log_slots"]
    assert sorted((s["sequence"], s["current"], s["replayed"]) for s in slots) == [(2, True, False), (3, True, True)]
    assert "(replayed)" in "\n".join(super_text(dump_super(done)))
    assert zero_log(done) is not None
    with open(done, "rb") as f:
        for at in S.LOG_SLOT_OFFSETS:
            f.seek(at)
            assert f.read(S.LOG_SLOT_SIZE) == bytes(S.LOG_SLOT_SIZE)
    with ImageFile.open(done) as img:
        sb = img.best_super()
        assert not sb.log_root and not sb.incompat_flags & S.INCOMPAT_LOG_BITS
        assert choose_log(img.read, sb)[0] is sb
    assert check(done).clean
    assert len(await _read_back(done)) == len(after[0])  # the committed /f


async def test_inspect_calls_a_stale_slot_stale_whatever_its_log_root(tmp_path):
    """A slot of an earlier generation whose log root is the replayed log's (a commit freed the
    old log's blocks and the next log took them) is stale, not replayed. Fails if ``replayed``
    compares the log root alone."""
    await _three_syncs(tmp_path)
    done = str(tmp_path / "done.img")
    sb = _super(done)
    with open(done, "r+b") as f:
        slots = []
        for at in S.LOG_SLOT_OFFSETS:
            f.seek(at)
            slots.append(decode_slot(f.read(S.LOG_SLOT_SIZE), at, sb.fsid, sb.csum_type))
        older, newer = sorted(slots, key=lambda s: s.sequence)
        at = S.LOG_SLOT_OFFSETS[slots.index(older)]
        stale = dataclasses.replace(older, generation=sb.generation - 1, log_root=newer.log_root)
        f.seek(at)
        f.write(encode_slot(stale, sb.fsid, sb.csum_type, at))
    states = {s["sequence"]: (s["current"], s["replayed"]) for s in dump_super(done)["log_slots"]}
    assert states == {older.sequence: (False, False), newer.sequence: (True, True)}, states


@pytest.mark.parametrize("cut", [S.LOG_SLOT_OFFSETS[0] + 100, S.LOG_SLOT_OFFSETS[1] + 100])
async def test_dump_super_of_an_image_cut_inside_the_slots_prints_the_superblock(tmp_path, capsys, cut):
    """A file cut short after its primary superblock, inside the log slots: dump-super failed
    with "read [69632, +4096) beyond the image end" (no image named) instead of printing the
    superblock it holds; it prints it, the slots the file holds, and the truncation fsck names."""
    from blockemu.cli.main import main

    await _three_syncs(tmp_path)
    done = str(tmp_path / "done.img")
    os.truncate(done, cut)
    assert main(["inspect", "dump-super", done]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"superblock: bytenr={S.SUPER_OFFSETS[0]}, device={done}\n")
    assert out.endswith(f"WARNING: image truncated: superblock says {64 << 20} bytes, file has {cut}\n")
    assert [s["bytenr"] for s in dump_super(done)["log_slots"]] == [at for at in S.LOG_SLOT_OFFSETS if at < cut - 100]


async def test_restoring_the_primary_from_a_mirror_wipes_the_slots(tmp_path):
    """fsck --repair restores a damaged primary from a mirror: the same generation, no log, and
    the lost log's slots behind it until the repair's commit moves the generation on. A crash
    before that commit, and the next mount's first log sync writes a superblock of that
    generation whose log root may be the lost log's (the allocator starts from the same free
    space): the stale slots -- blocks and data still on disk -- would read as its own, and their
    log replay over the one it acknowledged. Fails if the restore leaves the slots."""
    await _three_syncs(tmp_path, size="128M")
    done = str(tmp_path / "done.img")
    with ImageFile.open(done) as img:
        lost = img.best_super()
        assert choose_log(img.read, lost)[0].log_root != lost.log_root, "a slot's log is the log"
    with open(done, "r+b") as f:  # media damage: the primary's checksum fails
        f.seek(S.SUPER_OFFSETS[0] + 0x200)
        f.write(b"\xff")
    assert restore_primary_super(done)
    with ImageFile.open(done) as img:
        restored = img.best_super()
        assert restored.generation == lost.generation and not restored.log_root
        # the next mount's first log sync, its root where the lost log's was
        again = dataclasses.replace(restored, log_root=lost.log_root, log_root_level=lost.log_root_level,
                                    log_root_transid=lost.log_root_transid, incompat_flags=lost.incompat_flags)
        assert choose_log(img.read, again)[0].log_root == lost.log_root, "a stale slot's log was chosen"


async def test_a_commit_clears_both_bits_and_the_slots_go_stale(tmp_path):
    img = str(tmp_path / "a.img")
    await blockemu.mkfs(img, size="64M", node_size="4K", force=True)
    async with blockemu.mount(img, interval=3600) as fs:
        async with fs.open("/f", "w") as f:
            await f.write(os.urandom(8192))
        await fs.sync()
        async with fs.open("/f", "r+") as f:
            for _ in range(3):
                await f.pwrite(os.urandom(4096), 0)
                await f.fsync()
        assert fs.vol.log.sequence == 3
        await fs.sync()
        assert not fs.vol.log_root and fs.vol.log.sequence == 0
    with ImageFile.open(img) as im:
        sb = im.best_super()
        assert not sb.incompat_flags & S.INCOMPAT_LOG_BITS and not sb.log_root


async def test_mount_and_fsck_read_a_slots_log_once(tmp_path, monkeypatch):
    """Choosing a slot's log reads it (its items name the data to verify); mount replays that
    log and fsck checks it as read there, not read and parsed again. Fails if ``choose_log``
    does not hand back the log it read (mount and fsck each walked the log's chain twice)."""
    from blockemu.engine import treelog

    await _three_syncs(tmp_path)
    done = str(tmp_path / "done.img")
    walks, log_trees = [], treelog.log_trees
    monkeypatch.setattr(treelog, "log_trees", lambda read, sb: walks.append(sb.log_root) or log_trees(read, sb))
    with ImageFile.open(done) as img:
        sb = img.best_super()
        chosen, passed, log = choose_log(img.read, sb)
        assert chosen.log_root != sb.log_root and not passed and log == treelog.read_log(img.read, chosen)
    walks.clear()
    assert check(done).clean
    assert walks == [chosen.log_root], walks
    walks.clear()
    async with blockemu.mount(done, readonly=True):
        pass
    assert walks == [chosen.log_root], walks
