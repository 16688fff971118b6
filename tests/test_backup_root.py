"""`blockemu rescue use-backup-root`: an image whose newest root tree block never landed (a power
cut under `--faults nobarrier` drops it from the write cache) goes back to the newest backup root
set that reads whole (DESIGN §6). Every command failed on such an image, and fsck --repair could
not help; the backup roots each commit records were never used."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random

import blockemu
from blockemu.check.backup import choose, write_rescue
from blockemu.check.fsck import check
from blockemu.cli.main import main
from blockemu.device.blockdev import BlockDevice
from blockemu.device.image import ImageFile
from blockemu.ondisk.superblock import SuperInfo
from tests.util import assert_fsck_clean, set_super

A, B = b"A" * 5000, b"B" * 7000


def lost_root_image(path: str) -> dict[int, int]:
    """An image of three generations: mkfs's, /a synced (2), /b committed at unmount (3); then
    generation 3's root tree block zeroed, as a cache that dropped it leaves it. 80M: one mirror
    (at 64M) for the rescue to write too. Returns each generation's root tree block."""
    sb = three_generations(path)
    zero(path, sb.root)
    return {b["tree_root_gen"]: b["tree_root"] for b in sb.backup_roots if b["tree_root"]}


def three_generations(path: str) -> SuperInfo:
    """mkfs's generation, /a synced (2), /b committed at unmount (3): the superblock."""
    async def build() -> None:
        await blockemu.mkfs(path, size="80M", node_size="4K")
        async with blockemu.mount(path) as fs:
            async with fs.open("/a", "w") as f:
                await f.write(A)
            await fs.sync()
            async with fs.open("/b", "w") as f:
                await f.write(B)
    asyncio.run(build())
    with ImageFile.open(path) as img:
        sb = img.best_super()
    assert sb.generation == 3
    return sb


def zero(path: str, at: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(4096), at)
    finally:
        os.close(fd)


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def read(path: str, name: str) -> bytes:
    async with blockemu.mount(path, readonly=True) as fs:
        async with fs.open(name, "r") as f:
            return await f.read()


def test_fsck_names_the_rescue_and_the_generation_it_gives_back(tmp_path):
    img = str(tmp_path / "x.img")
    lost_root_image(img)
    before = digest(img)
    report = check(img)
    assert not report.clean and report.trees_damaged
    notes = [n for n in report.notes if "use-backup-root" in n]
    assert notes == [f"backup root slot 2 (generation 2) reads whole and checks clean (its data unread: the rescue "
                     f"checks it first): `blockemu rescue use-backup-root {img}` goes back to it, losing every change "
                     f"after generation 2"], report.notes
    notes = [n for n in check(img, check_data=True).notes if "use-backup-root" in n]
    assert notes[0].startswith("backup root slot 2 (generation 2) reads whole and checks clean: ")
    assert digest(img) == before  # read-only, as always


def test_ls_names_fsck_when_the_root_tree_fails(tmp_path, capsys):
    img = str(tmp_path / "x.img")
    roots = lost_root_image(img)
    assert main(["ls", img, "/"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"blockemu: ls: tree block {roots[3]}: checksum mismatch") \
        and f"`blockemu fsck {img}`" in err, err


def test_rescue_goes_back_one_generation_and_the_image_lives_on(tmp_path, capsys):
    """Generation 2's files read back, fsck is clean, and its free-space record (which calls
    generation 3's blocks free) is what the allocator uses: a write, an fsync, a remount, clean."""
    img = str(tmp_path / "x.img")
    lost_root_image(img)
    assert main(["rescue", "use-backup-root", img]) == 0
    out = capsys.readouterr().out
    assert out == (f"{img}: went back from generation 3 to backup root slot 2, generation 2 (its trees committed as "
                   f"generation 5, above every lost one); every change after generation 2 is lost\n")
    assert_fsck_clean(img)
    assert asyncio.run(read(img, "/a")) == A

    async def live_on() -> None:
        async with blockemu.mount(img) as fs:
            assert sorted(await fs.readdir("/")) == ["a"]  # /b was committed after generation 2
            async with fs.open("/c", "w") as f:
                await f.write(os.urandom(300_000))
                await f.fsync()
    asyncio.run(live_on())
    assert_fsck_clean(img)
    assert asyncio.run(read(img, "/a")) == A and len(asyncio.run(read(img, "/c"))) == 300_000
    with ImageFile.open(img) as im:
        sb = im.best_super()
    assert sb.generation > 2 and all(b["tree_root_gen"] <= sb.generation for b in sb.backup_roots)
    assert main(["rescue", "use-backup-root", img]) == 0  # a sound image: nothing to do
    assert capsys.readouterr().out.endswith("reads whole and checks clean; nothing to do\n")


def test_json_says_where_it_went_and_what_it_tried(tmp_path, capsys):
    img = str(tmp_path / "x.img")
    roots = lost_root_image(img)
    assert main(["rescue", "use-backup-root", img, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out.keys() == {"image", "generation", "rescued", "to_generation", "slot", "generation_after", "dropped_log", "tried"}
    assert (out["generation"], out["rescued"], out["to_generation"], out["slot"], out["generation_after"],
            out["dropped_log"]) == (3, True, 2, 2, 5, False)
    assert [(t["generation"], t["clean"]) for t in out["tried"]] == [(3, False), (2, True)]
    assert out["tried"][0]["first_error"].startswith(f"[CSUM_MISMATCH] tree block {roots[3]}")
    assert out["tried"][0].keys() == {"slot", "generation", "clean", "errors", "first_error"}


def test_no_clean_backup_is_refused_and_nothing_written(tmp_path, capsys):
    img = str(tmp_path / "x.img")
    for at in lost_root_image(img).values():
        zero(img, at)
    before = digest(img)
    assert not any("use-backup-root" in n for n in check(img).notes)
    assert main(["rescue", "use-backup-root", img]) == 4
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"blockemu: rescue: {img}: no backup root reads whole and checks clean (generation 3: ")
    assert err.endswith("; nothing written\n")
    assert main(["rescue", "use-backup-root", img, "--json"]) == 4
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["command"], error["errno"]) == ("rescue", errno.EUCLEAN)
    assert digest(img) == before


def test_a_cut_during_the_rescues_write_leaves_either_superblock_whole(tmp_path):
    """Every crash state of the rescue's own writes (slots wiped, its commit's tree blocks,
    primary FUA, mirror, flush; the mirror torn too): the primary is generation 2's trees
    committed as 5 -- fsck clean, /a reads back -- or still the lost generation 3, which the rescue
    then takes back to 2 again."""
    img, base, crashed = (str(tmp_path / n) for n in ("x.img", "base.img", "c.img"))
    lost_root_image(img)
    rescue = choose(img)
    assert rescue.chosen is not None and rescue.chosen.generation == 2

    async def write() -> None:
        dev = await BlockDevice.open(img)
        log = dev.start_log(base)
        try:
            await write_rescue(dev, rescue)
        finally:
            await dev.close()
        states = list(log.crash_states(random.Random(0)))
        assert len(states) > 5
        seen = set()
        for st in states:
            log.crash_image(crashed, st.upto, st.keep, st.torn, st.split)
            with ImageFile.open(crashed) as im:
                gen = im.best_super().generation
            seen.add(gen)
            if gen == 3:
                assert choose(crashed).chosen.generation == 2, st
                continue
            assert gen == 5, st
            report = check(crashed)
            assert report.clean, (st, report.errors)
            assert await read(crashed, "/a") == A
        assert seen == {5, 3}
    asyncio.run(write())


def test_dump_super_says_which_backup_slots_root_blocks_read(tmp_path, capsys):
    """Generation 1's root block was reused by generation 3's fs tree (a commit writes where the
    generation before it calls free), generation 3's is zeroed: only generation 2's read."""
    img = str(tmp_path / "x.img")
    lost_root_image(img)
    assert main(["inspect", "dump-super", img, "--json"]) == 0
    read = json.loads(capsys.readouterr().out)["backup_roots_read"]
    assert [(r["generation"], r["roots_read"]) for r in read] == [(1, False), (2, True), (3, False)]
    assert "checksum mismatch" in read[2]["problem"] and read[1]["problem"] is None
    assert main(["inspect", "dump-super", img]) == 0
    assert capsys.readouterr().out.count("backup_roots_read:\tyes") == 1


def test_a_slot_whose_record_its_root_tree_contradicts_is_not_taken(tmp_path, capsys):
    """A backup's root tree that reads whole but whose ROOT_ITEM for a tree is not the one the slot
    records is not the set the slot recorded: not gone back to."""
    img = str(tmp_path / "x.img")
    lost_root_image(img)
    with ImageFile.open(img) as im:
        sb = im.best_super()
    slots = [dict(b) for b in sb.backup_roots]
    slots[2]["fs_root_gen"] = 1
    set_super(img, backup_roots=slots)
    assert main(["rescue", "use-backup-root", img]) == 4
    err = capsys.readouterr().err
    assert "generation 2: [SUPERBLOCK] backup root slot 2 records the fs tree at " in err, err
    assert not any("use-backup-root" in n for n in check(img).notes)


def test_a_current_generation_that_reads_whole_is_fsck_repairs_not_a_rescue(tmp_path, capsys):
    """Its trees read whole and fsck finds something else (bytes_used): going back would lose a
    commit for what --repair fixes. Refused, nothing written; --repair then fixes it."""
    img = str(tmp_path / "x.img")
    lost_root_image(img)
    assert main(["rescue", "use-backup-root", img]) == 0
    with ImageFile.open(img) as im:
        used = im.best_super().bytes_used
    set_super(img, bytes_used=used + 4096)
    before = digest(img)
    capsys.readouterr()
    assert main(["rescue", "use-backup-root", img]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"blockemu: rescue: {img}: generation 5's trees read whole; what fsck finds "
                          "([USED_BYTES_MISMATCH] ") and f"`blockemu fsck {img}` says what fixes it" in err, err
    assert err.count("\n") == 1 and digest(img) == before
    assert main(["fsck", img, "--repair"]) == 1


def test_the_fsync_log_of_a_newer_generation_is_dropped_and_said(tmp_path, capsys):
    """The log extends the generation whose root was lost: going back drops it. (A real log
    writes into space the generation before calls free, as a commit does -- the allocator reuses
    what the last commit gave back -- so a log of generation 3 would likely have overwritten
    generation 2's blocks: the superblock is made to name one here, at a block nothing uses.)"""
    from blockemu.check.inspect import dump_super
    from blockemu.ondisk import structs as S

    img = str(tmp_path / "x.img")
    lost_root_image(img)
    with ImageFile.open(img) as im:
        sb = im.best_super()
    set_super(img, log_root=60 << 20, log_root_transid=4, incompat_flags=sb.incompat_flags | S.INCOMPAT_TREE_LOG)
    assert main(["rescue", "use-backup-root", img, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped_log"] is True
    d = dump_super(img)
    assert (d["generation"], d["log_root"], d["log_root_transid"], d["log_slots"]) == (5, 0, 0, [])
    assert not d["incompat_flags"] & S.INCOMPAT_LOG_BITS
    assert_fsck_clean(img)

    async def fsync_again() -> None:
        async with blockemu.mount(img) as fs:
            assert await fs.readdir("/") == ["a"]
            async with fs.open("/g", "w") as f:
                await f.write(b"z" * 4096)
                await f.fsync()
            fs.power_cut()
    asyncio.run(fsync_again())
    assert asyncio.run(read(img, "/g")) == b"z" * 4096
    assert_fsck_clean(img)


def test_the_rescued_generation_is_above_every_lost_one(tmp_path):
    """Going back to generation 2 and committing as 3 again let a stale block of the lost
    generation 3 (still on the disk, in space generation 2 calls free) pass the parent transid
    check where a later commit's block at that address never landed. The rescue commits the
    chosen trees as a generation above the lost ones and the transaction they ran (its log, an
    unfinished commit): a stale block's header generation then tells it apart."""
    img = str(tmp_path / "x.img")
    lost_root_image(img)
    assert main(["rescue", "use-backup-root", img]) == 0
    with ImageFile.open(img) as im:
        sb = im.best_super()
    assert sb.generation == 3 + 2
    assert_fsck_clean(img)
    assert asyncio.run(read(img, "/a")) == A


def test_a_generation_whose_file_data_was_overwritten_is_not_called_clean(tmp_path, capsys):
    """A generation's data extents are free once the next commit is durable, so the writes after
    it (data written back before a cut, the blocks a drive's cache reordered ahead of the newer
    root) may overwrite them while its tree blocks survive. The check of each generation read its
    trees only: generation 2 was called clean and taken, and /a then failed its checksum."""
    img, copy = str(tmp_path / "x.img"), str(tmp_path / "y.img")
    lost_root_image(img)
    with open(img, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    assert main(["rescue", "use-backup-root", copy]) == 0
    assert main(["extents", copy, "/a", "--json"]) == 0
    capsys.readouterr()
    assert main(["extents", copy, "/a", "--json"]) == 0
    at = json.loads(capsys.readouterr().out)[0]["disk_bytenr"]
    zero(img, at)  # what a newer generation's data written there leaves, as far as /a can tell
    before = digest(img)
    assert main(["rescue", "use-backup-root", img, "--json"]) == 4  # generation 1's blocks were reused too
    message = json.loads(capsys.readouterr().out)["error"]["message"]
    assert f"generation 2: [CSUM_MISMATCH] data sector {at} (inode 257 at file offset 0: /a)" in message, message
    assert digest(img) == before


def test_a_current_generation_its_slot_does_not_record_is_still_checked_first(tmp_path, capsys):
    """The current generation was a candidate only when its own backup slot recorded it: with that
    slot emptied (a SUPERBLOCK finding, its trees whole) it was never checked, and the rescue went
    back to generation 2, losing /b, where it must refuse as for any current generation that reads whole."""
    from blockemu.ondisk.superblock import empty_backup

    img = str(tmp_path / "x.img")
    sb = three_generations(img)
    set_super(img, backup_roots=[empty_backup() if slot == sb.generation % 4 else dict(b)
                                 for slot, b in enumerate(sb.backup_roots)])
    before = digest(img)
    capsys.readouterr()
    assert main(["rescue", "use-backup-root", img]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"blockemu: rescue: {img}: generation 3's trees read whole; what fsck finds ([SUPERBLOCK] "), err
    assert digest(img) == before
