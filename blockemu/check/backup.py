"""``blockemu rescue use-backup-root``: go back to the newest backup root set that reads whole.

Each commit records its tree roots in the superblock's backup slot ``generation % 4`` (SPEC
"BackupRoot"). A power cut on a device that drops flushes (``--faults nobarrier``) can leave a
superblock whose trees' blocks never landed: every command fails on it, and ``fsck --repair``
cannot help (damaged tree blocks rule repair out). The blocks of an older generation's trees may
well be intact -- a commit writes only into space its previous generation calls free -- so, as
btrfs's ``mount -o rescue=usebackuproot`` and ``btrfs check --backup`` do, each recorded
generation is checked (newest first) with the sans-I/O checker as if its superblock were the
image's, and the first that reads whole and checks clean becomes the image's: its roots, its
generation's free-space record (which calls every newer block free) is what the allocator then
reads, and its trees are committed as a generation above every lost one, so that no stale block of
a lost commit passes for a block of a later one. Everything committed after it is lost, and so is the fsync log,
which extends a newer generation. Unlike btrfs's mount option this is a command: the user
decides to lose those commits, as with ``rescue zero-log``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from blockemu.device.blockdev import BlockDevice
from blockemu.device.image import ImageFile, read_only_features
from blockemu.engine.transaction import BACKUP_NAMES, Engine, TreeStore
from blockemu.errors import Busy, CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.superblock import SuperInfo, empty_backup, super_writes


class NoCleanBackup(CorruptionError):
    """The rescue's refusal: nothing written, and fsck's exit for errors left (4)."""


@dataclass
class Candidate:
    """One backup slot's generation, checked: ``sb`` the superblock it would give the image."""

    slot: int
    sb: SuperInfo
    errors: int  # fsck's findings on it (0: it reads whole and checks clean)
    damaged: bool  # some tree block of it did not read or could not be trusted
    why: str  # the first finding, or "clean"

    @property
    def generation(self) -> int:
        return self.sb.generation

    def as_json(self) -> dict[str, object]:
        return {"slot": self.slot, "generation": self.generation, "clean": not self.errors,
                "errors": self.errors, "first_error": None if not self.errors else self.why}


def backup_super(sb: SuperInfo, slot: int) -> SuperInfo:
    """The superblock that makes backup ``slot``'s generation the image's: its root tree, its
    generation and bytes_used, no fsync log (a log extends the newer generation it was written
    for), and the slots of newer generations emptied -- their trees lie in space the chosen
    generation calls free, which the next commits reuse, so no later rescue may go to them."""
    b = sb.backup_roots[slot]
    gen = b["tree_root_gen"]
    return sb.without_log(generation=gen, root=b["tree_root"], root_level=b["tree_root_level"], bytes_used=b["bytes_used"],
                          backup_roots=[empty_backup() if r["tree_root_gen"] > gen else dict(r) for r in sb.backup_roots])


def candidates(sb: SuperInfo) -> list[tuple[int, SuperInfo]]:
    """(slot, superblock) of ``sb`` itself, then of each backup slot that records an older commit
    in the slot its generation gives (a slot that does not was never this image's ring), newest
    first. The current generation is ``sb`` as it stands (its bytes_used, its log), whatever its
    slot says: it is what the image is when nothing needs going back, and a slot that does not
    record it (fsck's SUPERBLOCK finding) left it unchecked, and the rescue went back over trees
    that read whole."""
    found = [(sb.generation % S.NUM_BACKUP_ROOTS, sb)]
    for slot, b in enumerate(sb.backup_roots):
        gen = b["tree_root_gen"]
        if b["tree_root"] and 0 < gen < sb.generation and gen % S.NUM_BACKUP_ROOTS == slot:
            found.append((slot, backup_super(sb, slot)))
    return sorted(found, key=lambda c: -c[1].generation)


def examine(path: str, sb: SuperInfo, *, upto: int | None = None, check_data: bool = True) -> list[Candidate]:
    """Check each candidate of ``sb`` newest first, stopping at the first clean one; ``upto``:
    only generations below it (those above were checked already). ``check_data``: the data too,
    as the rescue does before it writes -- the writes after a generation may reuse its freed data
    extents while its tree blocks survive, and a check of the trees alone called such a
    generation clean (its files then failed their checksums)."""
    from blockemu.check.fsck import check

    out = []
    for slot, cand in candidates(sb):
        if upto is not None and cand.generation >= upto:
            continue
        report = check(path, check_data=check_data, use_super=cand, parallel=False)
        first = report.errors[0] if report.errors else None
        out.append(Candidate(slot, cand, len(report.errors), report.trees_damaged, f"[{first.code}] {first.message}" if first else "clean"))
        if first is None:
            break
    return out


def roots_read(read: Callable[[int, int], bytes], sb: SuperInfo) -> list[dict[str, object]]:
    """For ``inspect dump-super``: whether each recorded backup slot's root blocks read (checksum,
    bytenr, generation, owner and level as the slot records them) -- five blocks a slot, cheap;
    the whole trees and fsck's verdict are the rescue's (``examine``) and fsck's note."""
    store = TreeStore.reader(read, sb)
    out: list[dict[str, object]] = []
    for slot, b in enumerate(sb.backup_roots):
        if not b["tree_root"]:
            continue
        problem = None
        for tid, name in BACKUP_NAMES.items():
            try:
                store.get(b[name], generation=b[name + "_gen"], level=b[name + "_level"], owner=tid)
            except (CorruptionError, OSError) as e:
                problem = f"{S.TREE_NAMES[tid]} tree: {e}"
                break
        out.append({"slot": slot, "generation": b["tree_root_gen"], "roots_read": problem is None, "problem": problem})
    return out


def note_for(path: str, sb: SuperInfo, check_data: bool) -> str | None:
    """fsck's note on an image whose trees do not read whole: the generation a backup root gives
    back, when an older one reads clean (the current one was just checked, and failed). Its data
    is read only under fsck's ``--check-data`` (a read of every file per generation tried, which
    a plain fsck does not pay): without, the note says so, and the rescue reads it before it writes."""
    found = examine(path, sb, upto=sb.generation, check_data=check_data)
    if not found or found[-1].errors:
        return None
    gen = found[-1].generation
    unread = "" if check_data else " (its data unread: the rescue checks it first)"
    return (f"backup root slot {found[-1].slot} (generation {gen}) reads whole and checks clean{unread}: "
            f"`blockemu rescue use-backup-root {path}` goes back to it, losing every change after generation {gen}")


@dataclass
class Rescue:
    """What ``use_backup_root`` found and did."""

    image: str
    generation: int  # the image's before
    chosen: Candidate | None  # None: the current generation checks clean, nothing to do
    tried: list[Candidate]
    dropped_log: bool
    checked: bytes = b""  # the primary superblock as checked: the write is refused if it changed since

    @property
    def generation_after(self) -> int:
        """The image's generation once rescued, or as it stands: the rescue commits the chosen
        trees above every generation whose blocks the lost commits may have left in space the
        chosen generation calls free -- the current one and the transaction that ran after it (its
        fsync log's blocks, a commit whose superblock never landed). Committing as the chosen
        generation + 1 again let a stale block of the lost commit of that number pass the parent
        transid check where a later block at its address was dropped."""
        return self.generation + 2 if self.chosen else self.generation

    def as_json(self) -> dict[str, object]:
        return {"image": self.image, "generation": self.generation, "rescued": self.chosen is not None,
                "to_generation": self.chosen.generation if self.chosen else self.generation,
                "slot": self.chosen.slot if self.chosen else None, "generation_after": self.generation_after,
                "dropped_log": self.dropped_log,
                "tried": [c.as_json() for c in self.tried]}


def choose(path: str) -> Rescue:
    """Read-only: the generation to go back to. Raises NoCleanBackup (fsck's exit for errors
    left) when none reads clean, and when the current generation's trees read whole but fsck
    finds something else (``fsck --repair``'s or ``rescue zero-log``'s to fix: going back would
    lose commits for it)."""
    with ImageFile.open(path) as img:
        sb, raw = img.best_super(), img.supers[0].raw
        if img.supers[0].error is not None:
            raise CorruptionError(f"{path}: primary superblock: {img.supers[0].error}; `blockemu fsck --repair {path}` "
                                  f"restores it first; nothing written", "SUPERBLOCK", S.SUPER_OFFSETS[0])
    if ro := read_only_features(path, sb):
        raise ro
    tried = examine(path, sb)
    current = tried[0] if tried and tried[0].generation == sb.generation else None
    if current is not None and not current.errors:
        return Rescue(path, sb.generation, None, tried, False, raw)
    if current is not None and not current.damaged:
        raise NoCleanBackup(f"{path}: generation {sb.generation}'s trees read whole; what fsck finds ({current.why}) "
                            f"is no reason to lose commits: `blockemu fsck {path}` says what fixes it (--repair, or "
                            f"rescue zero-log for a damaged log); nothing written", "BAD_TREE_BLOCK")
    if not tried or tried[-1].errors:
        said = "; ".join(f"generation {c.generation}: {c.why}" for c in tried) or "no backup root recorded"
        raise NoCleanBackup(f"{path}: no backup root reads whole and checks clean ({said}); nothing written",
                            "BAD_TREE_BLOCK")
    return Rescue(path, sb.generation, tried[-1], tried, bool(sb.log_root), raw)


async def write_rescue(dev: BlockDevice, rescue: "Rescue") -> SuperInfo:
    """Commit the chosen generation's trees as ``generation_after`` (its root tree, and the
    trees the commit's own blocks change, COWed into space it calls free), as a commit writes
    them: the log slots wiped first (durably: a later log sync extending the rescued generation
    must not find a lost one's its own), the tree blocks, then the primary with FUA, the mirrors,
    a flush. A cut before the primary's FUA leaves the old superblock (the rescue can run
    again), after it the rescued one. Returns the superblock written."""
    assert rescue.chosen is not None
    engine = Engine(rescue.chosen.sb, dev.read_sync, writable=True)
    engine.store.transid = rescue.generation_after
    writes, new = engine.prepare_commit()
    for slot in S.LOG_SLOT_OFFSETS:
        await dev.write(slot, bytes(S.LOG_SLOT_SIZE))
    await dev.writev(writes)
    supers = super_writes(new)
    await dev.flush_then_fua(*supers[0])
    for off, data in supers[1:]:
        await dev.write(off, data)
    await dev.flush()
    return new


async def use_backup_root(path: str) -> Rescue:
    """Choose, then write under the exclusive lock -- refused if the image changed meanwhile."""
    rescue = choose(path)
    if rescue.chosen is None:
        return rescue
    dev = await BlockDevice.open(path)
    try:
        # the check ran under a shared lock, released before this exclusive one: a commit or a
        # log sync in between would make the choice stale
        if dev.read_sync(S.SUPER_OFFSETS[0], S.SUPER_INFO_SIZE) != rescue.checked:
            raise Busy(f"{path}: the image changed since it was checked; run the rescue again")
        await write_rescue(dev, rescue)
    finally:
        await dev.close()
    return rescue
