"""Log slot encode/decode (SPEC "Log slots"): what a log sync after the first of a transaction
writes instead of the primary superblock, so that the sync needs one host flush, not a flush
and a FUA write. A slot is only a claim: the log it names is replayed only once its blocks and
data verify (``treelog.choose_log``), for the slot lands in the same flush as them."""
from __future__ import annotations

from dataclasses import dataclass, field

from blockemu.ondisk import csum as csums
from blockemu.ondisk import fast
from blockemu.ondisk.structs import CSUM_FIELD, LOG_SLOT_BLOCKS, LOG_SLOT_MAGIC, LOG_SLOT_SIZE, LogSlot

_PACK, _ = fast.FAST["LogSlot"]
# a slot is encoded at every log sync but the first of a transaction: the head packed alone (the
# rest zero) and each used block entry spliced in -- packing all 96 entries took ~45 us a sync
_HEAD = fast.picked("LogSlot", ("csum", "fsid", "bytenr", "magic", "generation", "base_root", "sequence", "log_root",
                                "log_root_level", "nblocks"))
_BLOCK, _ = fast.FAST["LogSlotBlock"]
_BLOCKS_AT = next(at for at, _, name in fast.layout(LogSlot) if name == "blocks")

@dataclass(frozen=True)
class SlotInfo:
    """One log sync's record: the superblock it extends (``generation``, ``base_root``), its
    number, the log's root, and every block the sync wrote with its checksum field."""

    generation: int
    base_root: int
    sequence: int
    log_root: int
    log_root_level: int
    blocks: tuple[tuple[int, bytes], ...] = field(default=())
    # why a slot whose checksum verifies cannot be a log sync's record (it claims more blocks
    # than it has room for): damage or a crafted slot, not a sync a power cut cut short -- so
    # not passed over as one, which would drop the fsyncs of the log it names ("" if sound)
    damage: str = ""


def encode_slot(info: SlotInfo, fsid: bytes, csum_type: int, at: int) -> bytes:
    """The 4 KiB slot for offset ``at``."""
    assert len(info.blocks) <= LOG_SLOT_BLOCKS
    raw = bytearray(_HEAD.pack(b"", fsid, at, LOG_SLOT_MAGIC, info.generation, info.base_root, info.sequence,
                               info.log_root, info.log_root_level, len(info.blocks)))
    entries = b"".join(_BLOCK.pack(bytenr, csum) for bytenr, csum in info.blocks)
    raw[_BLOCKS_AT:_BLOCKS_AT + len(entries)] = entries
    return csums.field(csum_type, memoryview(raw)[CSUM_FIELD:]) + bytes(raw[CSUM_FIELD:])


def decode_slot(raw: bytes, at: int, fsid: bytes, csum_type: int) -> SlotInfo | None:
    """The slot at ``at``, or None if it holds none of this image's: never written, wiped, or
    torn by a power cut (its checksum fails) -- a slot is written without a barrier after it.
    A whole slot claiming more blocks than it holds comes back with ``damage`` said and no
    blocks: whether that is the log's damage depends on whose slot it is (``choose_log``)."""
    if len(raw) < LOG_SLOT_SIZE or raw[0x38:0x40] != LOG_SLOT_MAGIC:
        return None
    if csums.field(csum_type, raw[CSUM_FIELD:LOG_SLOT_SIZE]) != raw[:CSUM_FIELD]:
        return None
    v = _PACK.unpack(raw[:LOG_SLOT_SIZE])
    _, got_fsid, bytenr, _, generation, base_root, sequence, log_root, level, n = v[:10]
    if got_fsid != fsid or bytenr != at:
        return None
    if n > LOG_SLOT_BLOCKS:
        return SlotInfo(generation, base_root, sequence, log_root, level,
                        damage=f"log slot {at} claims {n} blocks, more than the {LOG_SLOT_BLOCKS} a slot holds")
    pairs = v[10:10 + 2 * n]
    return SlotInfo(generation, base_root, sequence, log_root, level,
                    tuple((pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)))
