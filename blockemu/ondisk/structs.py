"""The one definition of every on-disk layout (format v1).

Everything that reads or writes image bytes goes through these construct
definitions, or through the ``struct`` formats that ``fast.py`` derives from
them for the hot path. ``format/SPEC.md`` documents each struct and a test
checks its tables against these definitions, so the prose cannot drift.
"""
from __future__ import annotations

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64sl, Int64ul, Padding, Struct

from blockemu.ondisk.csum import CSUM_FIELD

MAGIC = b"_BEmU_v1"
SUPER_INFO_SIZE = 4096
SUPER_OFFSETS = (64 * 1024, 64 * 1024 * 1024, 256 * 1024**3)
SECTOR_SIZE = 4096
MIN_NODE_SIZE = 4096
MAX_NODE_SIZE = 64 * 1024
MAX_LEVEL = 8
# the largest i_size: Linux's MAX_LFS_FILESIZE (loff_t is signed), btrfs's s_maxbytes
MAX_FILE_SIZE = (1 << 63) - 1
NUM_BACKUP_ROOTS = 4
LABEL_SIZE = 256
# Nothing is allocated below 1 MiB: the primary superblock lives there, as in btrfs.
RESERVED_START = 1024 * 1024

# Tree ids / well-known objectids (btrfs numbers).
ROOT_TREE_OBJECTID = 1
EXTENT_TREE_OBJECTID = 2
FS_TREE_OBJECTID = 5
CSUM_TREE_OBJECTID = 7
FREE_SPACE_TREE_OBJECTID = 10
FIRST_FREE_OBJECTID = 256
U64 = 1 << 64
EXTENT_CSUM_OBJECTID = U64 - 10
ORPHAN_OBJECTID = U64 - 5
TREE_LOG_OBJECTID = U64 - 6  # the fsync log tree (btrfs's BTRFS_TREE_LOG_OBJECTID, -6)

# Item types (btrfs numbers where a twin exists).
INODE_ITEM = 1
INODE_REF = 12
# a name that did not fit in its INODE_REF item, keyed by extref_hash(parent, name) (btrfs's INODE_EXTREF)
INODE_EXTREF = 13
FSCRYPT_CTXT_ITEM = 41  # from the btrfs fscrypt series
FSCRYPT_SYMLINK_ITEM = 42  # an encrypted symlink's target, inline: fscrypt_symlink_data (SPEC "Symbolic links")
ORPHAN_ITEM = 48
DIR_ITEM = 84
DIR_INDEX = 96
EXTENT_DATA = 108
EXTENT_CSUM = 128
ROOT_ITEM = 132
EXTENT_ITEM = 168
METADATA_ITEM = 169
TREE_BLOCK_REF = 176
EXTENT_DATA_REF = 178
FREE_SPACE_EXTENT = 199

ITEM_TYPE_NAMES = {
    INODE_ITEM: "INODE_ITEM",
    INODE_REF: "INODE_REF",
    INODE_EXTREF: "INODE_EXTREF",
    FSCRYPT_CTXT_ITEM: "FSCRYPT_CTXT",
    FSCRYPT_SYMLINK_ITEM: "FSCRYPT_SYMLINK",
    ORPHAN_ITEM: "ORPHAN_ITEM",
    DIR_ITEM: "DIR_ITEM",
    DIR_INDEX: "DIR_INDEX",
    EXTENT_DATA: "EXTENT_DATA",
    EXTENT_CSUM: "EXTENT_CSUM",
    ROOT_ITEM: "ROOT_ITEM",
    EXTENT_ITEM: "EXTENT_ITEM",
    METADATA_ITEM: "METADATA_ITEM",
    TREE_BLOCK_REF: "TREE_BLOCK_REF",
    EXTENT_DATA_REF: "EXTENT_DATA_REF",
    FREE_SPACE_EXTENT: "FREE_SPACE_EXTENT",
}
TREE_NAMES = {
    ROOT_TREE_OBJECTID: "root",
    EXTENT_TREE_OBJECTID: "extent",
    FS_TREE_OBJECTID: "fs",
    CSUM_TREE_OBJECTID: "csum",
    FREE_SPACE_TREE_OBJECTID: "free-space",
    TREE_LOG_OBJECTID: "log",
}

# Header / extent flags.
HEADER_FLAG_WRITTEN = 1
SUPER_FLAG_WRITTEN = 1
EXTENT_FLAG_DATA = 1
EXTENT_FLAG_TREE_BLOCK = 2

# File extent item.
# DirItemHead.type: the kind of inode an entry names (btrfs's BTRFS_FT_*)
FT_REG_FILE, FT_DIR, FT_SYMLINK = 1, 2, 7

FILE_EXTENT_INLINE = 0
FILE_EXTENT_REG = 1
ENCRYPTION_NONE = 0
ENCRYPTION_FSCRYPT = 1
CONTENTS_MODE_AES_256_XTS = 1
FILENAMES_MODE_AES_256_CTS = 4
POLICY_FLAGS_PAD_32 = 0x03  # fscrypt's recommended name padding

# Superblock incompat_flags (a reader refuses any bit it does not know).
INCOMPAT_ENCRYPTED_NAMES = 1 << 0  # names in encrypted directories are stored encrypted (SPEC "Names")
INCOMPAT_ENCRYPTED_SYMLINKS = 1 << 1  # targets of encrypted symlinks are FSCRYPT_SYMLINK items (SPEC "Symbolic links")
# set while the superblock points at a non-empty log tree (SPEC "Log tree"): a reader that
# ignored the log would lose what fsync acknowledged, and its first commit could overwrite the
# log's blocks, which the free-space record calls free
INCOMPAT_TREE_LOG = 1 << 2
# the image may hold INODE_EXTREF items (btrfs's EXTENDED_IREF): mkfs sets it; without it a
# hard link's names in one directory end where their INODE_REF item is full (EMLINK)
INCOMPAT_EXTENDED_IREF = 1 << 3
# set with TREE_LOG when later log syncs of the transaction may have written log slots (SPEC "Log
# slots"): a reader that knew only TREE_LOG would replay the superblock's log and miss theirs
INCOMPAT_LOG_SLOTS = 1 << 4
INCOMPAT_LOG_BITS = INCOMPAT_TREE_LOG | INCOMPAT_LOG_SLOTS  # what a commit (or zero-log) clears with the log
INCOMPAT_SUPPORTED = (INCOMPAT_ENCRYPTED_NAMES | INCOMPAT_ENCRYPTED_SYMLINKS | INCOMPAT_TREE_LOG
                      | INCOMPAT_EXTENDED_IREF | INCOMPAT_LOG_SLOTS)
# the most names one inode has (btrfs's BTRFS_LINK_MAX): link(2) past it is EMLINK
LINK_MAX = 65535
# Superblock compat_ro_flags: format v1 defines none. An image with a bit this blockemu does not
# know is read but never written (SPEC "Feature bits"), as btrfs mounts it read-only only.
COMPAT_RO_SUPPORTED = 0

# ---------------------------------------------------------------- checksummed blocks

Key = Struct(
    "objectid" / Int64ul,
    "type" / Int8ul,
    "offset" / Int64ul,
)

BackupRoot = Struct(
    "tree_root" / Int64ul,
    "tree_root_gen" / Int64ul,
    "extent_root" / Int64ul,
    "extent_root_gen" / Int64ul,
    "fs_root" / Int64ul,
    "fs_root_gen" / Int64ul,
    "csum_root" / Int64ul,
    "csum_root_gen" / Int64ul,
    "free_space_root" / Int64ul,
    "free_space_root_gen" / Int64ul,
    "total_bytes" / Int64ul,
    "bytes_used" / Int64ul,
    "tree_root_level" / Int8ul,
    "extent_root_level" / Int8ul,
    "fs_root_level" / Int8ul,
    "csum_root_level" / Int8ul,
    "free_space_root_level" / Int8ul,
    Padding(3),
)

Superblock = Struct(
    "csum" / Bytes(CSUM_FIELD),
    "fsid" / Bytes(16),
    "bytenr" / Int64ul,
    "flags" / Int64ul,
    "magic" / Const(MAGIC),
    "generation" / Int64ul,
    "root" / Int64ul,
    "total_bytes" / Int64ul,
    "bytes_used" / Int64ul,
    "root_dir_objectid" / Int64ul,
    "sectorsize" / Int32ul,
    "nodesize" / Int32ul,
    "csum_type" / Int16ul,
    "root_level" / Int8ul,
    Padding(1),
    "compat_flags" / Int64ul,
    "compat_ro_flags" / Int64ul,
    "incompat_flags" / Int64ul,
    "label" / Bytes(LABEL_SIZE),
    "backup_roots" / BackupRoot[NUM_BACKUP_ROOTS],
    "log_root" / Int64ul,  # 0x334: root block of the fsync log tree, 0 = none
    "log_root_transid" / Int64ul,  # 0x33c: the transaction the log belongs to (generation + 1)
    "log_root_level" / Int8ul,  # 0x344
    Padding(SUPER_INFO_SIZE - 0x194 - NUM_BACKUP_ROOTS * 104 - 17),
)

# The two log slots (SPEC "Log slots"): the 4 KiB after the primary superblock, alternated per
# log sync, so the one the last sync wrote is intact while the next one's write is in doubt.
LOG_SLOT_SIZE = 4096
LOG_SLOT_OFFSETS = (SUPER_OFFSETS[0] + SUPER_INFO_SIZE, SUPER_OFFSETS[0] + 2 * SUPER_INFO_SIZE)
LOG_SLOT_MAGIC = b"_BEmULOG"
LOG_SLOT_BLOCKS = 96  # a log sync writing more blocks than a slot lists writes the superblock instead

LogSlotBlock = Struct(
    "bytenr" / Int64ul,
    "csum" / Bytes(CSUM_FIELD),  # the block's header csum field as the sync wrote it
)

LogSlot = Struct(
    "csum" / Bytes(CSUM_FIELD),
    "fsid" / Bytes(16),
    "bytenr" / Int64ul,  # 0x030: offset of this slot
    "magic" / Const(LOG_SLOT_MAGIC),
    "generation" / Int64ul,  # 0x040: the superblock generation the log extends
    "base_root" / Int64ul,  # 0x048: the superblock's log_root when the slot was written
    "sequence" / Int64ul,  # 0x050: the log sync's number in its transaction; the higher slot is newer
    "log_root" / Int64ul,  # 0x058
    "log_root_level" / Int8ul,  # 0x060
    Padding(1),
    "nblocks" / Int16ul,  # 0x062
    "blocks" / LogSlotBlock[LOG_SLOT_BLOCKS],  # 0x064
    Padding(LOG_SLOT_SIZE - 0x64 - LOG_SLOT_BLOCKS * 40),
)

Header = Struct(
    "csum" / Bytes(CSUM_FIELD),
    "fsid" / Bytes(16),
    "bytenr" / Int64ul,
    "flags" / Int64ul,
    "generation" / Int64ul,
    "owner" / Int64ul,
    "nritems" / Int32ul,
    "level" / Int8ul,
)

Item = Struct(
    "key" / Key,
    "offset" / Int32ul,
    "size" / Int32ul,
)

KeyPtr = Struct(
    "key" / Key,
    "blockptr" / Int64ul,
    "generation" / Int64ul,
)

# ---------------------------------------------------------------- item bodies

# Seconds are signed, as btrfs reads its le64 into a time64_t: a file dated before 1970
# (an old tarball's) has a negative count, and an unsigned field could not pack it.
Timespec = Struct(
    "sec" / Int64sl,
    "nsec" / Int32ul,
)

InodeItem = Struct(
    "generation" / Int64ul,
    "transid" / Int64ul,
    "size" / Int64ul,
    "nbytes" / Int64ul,
    "block_group" / Int64ul,
    "nlink" / Int32ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "mode" / Int32ul,
    "rdev" / Int64ul,
    "flags" / Int64ul,
    "sequence" / Int64ul,
    Padding(32),
    "atime" / Timespec,
    "ctime" / Timespec,
    "mtime" / Timespec,
    "otime" / Timespec,
)

# INODE_REF and DIR_ITEM/DIR_INDEX carry a name after the fixed part; the
# fixed part is what is defined here, and name_len says how much follows.
InodeRefHead = Struct(
    "index" / Int64ul,
    "name_len" / Int16ul,
)

# INODE_EXTREF's entries: as InodeRefHead, with the parent directory in the body, since the
# key's offset holds the hash (btrfs_inode_extref)
InodeExtrefHead = Struct(
    "parent" / Int64ul,
    "index" / Int64ul,
    "name_len" / Int16ul,
)

DirItemHead = Struct(
    "location" / Key,
    "transid" / Int64ul,
    "data_len" / Int16ul,
    "name_len" / Int16ul,
    "type" / Int8ul,
)

FileExtentItem = Struct(
    "generation" / Int64ul,
    "ram_bytes" / Int64ul,
    "compression" / Int8ul,
    "encryption" / Int8ul,
    "other_encoding" / Int16ul,
    "type" / Int8ul,
    "disk_bytenr" / Int64ul,
    "disk_num_bytes" / Int64ul,
    "offset" / Int64ul,
    "num_bytes" / Int64ul,
)

# Follows FileExtentItem when encryption == ENCRYPTION_FSCRYPT: the extent's own
# encryption context, so an extent decrypts from its item, the master key and
# the ciphertext alone, wherever it is referenced.
ExtentEncryptionContext = Struct(
    "version" / Int8ul,
    "contents_mode" / Int8ul,
    "log2_data_unit_size" / Int8ul,
    Padding(1),
    "key_identifier" / Bytes(16),
    "nonce" / Bytes(16),
)

# fscrypt_context_v2, stored on an inode as FSCRYPT_CTXT_ITEM (ino, 41, 0).
InodeEncryptionContext = Struct(
    "version" / Int8ul,
    "contents_mode" / Int8ul,
    "filenames_mode" / Int8ul,
    "flags" / Int8ul,
    "log2_data_unit_size" / Int8ul,
    Padding(3),
    "key_identifier" / Bytes(16),
    "nonce" / Bytes(16),
)

RootItem = Struct(
    "generation" / Int64ul,
    "root_dirid" / Int64ul,
    "bytenr" / Int64ul,
    "bytes_used" / Int64ul,
    "last_snapshot" / Int64ul,
    "flags" / Int64ul,
    "refs" / Int32ul,
    "level" / Int8ul,
)

ExtentItem = Struct(
    "refs" / Int64ul,
    "generation" / Int64ul,
    "flags" / Int64ul,
)

# Inline back references follow an ExtentItem, each starting with its type byte.
TreeBlockRef = Struct(
    "type" / Const(TREE_BLOCK_REF, Int8ul),
    "root" / Int64ul,
)

ExtentDataRef = Struct(
    "type" / Const(EXTENT_DATA_REF, Int8ul),
    "root" / Int64ul,
    "objectid" / Int64ul,
    "offset" / Int64ul,
    "count" / Int32ul,
)

# fscrypt_symlink_data's fixed part: the ciphertext of the target follows, ``len`` bytes.
SymlinkDataHead = Struct(
    "len" / Int16ul,
)

# Every struct with a fixed size, by the name SPEC.md uses for it.
STRUCTS = {
    "Key": Key,
    "BackupRoot": BackupRoot,
    "Superblock": Superblock,
    "LogSlot": LogSlot,
    "LogSlotBlock": LogSlotBlock,
    "Header": Header,
    "Item": Item,
    "KeyPtr": KeyPtr,
    "Timespec": Timespec,
    "InodeItem": InodeItem,
    "InodeRefHead": InodeRefHead,
    "InodeExtrefHead": InodeExtrefHead,
    "DirItemHead": DirItemHead,
    "FileExtentItem": FileExtentItem,
    "ExtentEncryptionContext": ExtentEncryptionContext,
    "InodeEncryptionContext": InodeEncryptionContext,
    "SymlinkDataHead": SymlinkDataHead,
    "RootItem": RootItem,
    "ExtentItem": ExtentItem,
    "TreeBlockRef": TreeBlockRef,
    "ExtentDataRef": ExtentDataRef,
}
