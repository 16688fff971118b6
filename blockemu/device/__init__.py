"""The image file and the block device over it: the async ``BlockDevice`` with its
volatile write cache, flush/FUA and discard; fault plans; the write log that
rebuilds crash states; and ``ImageFile``, read-only synchronous access for
fsck and inspect.

May import ``blockemu.ondisk``, ``blockemu.engine`` (``ImageFile`` builds a
read-only engine) and the common modules. Never the crypto or filesystem layers.
"""
