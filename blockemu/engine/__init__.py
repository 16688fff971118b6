"""The storage engine: the copy-on-write B+tree, the extent allocator, transactions
and the commit protocol's bookkeeping, file extents and data checksums, and the
fsync log tree (``treelog``: what an fsync writes instead of a commit, and its replay).

Sans-I/O: it works on bytes and a block cache. It never awaits and opens no
file; a block it does not hold is fetched through the ``read_block`` callable its
owner passes in (a synchronous pread, see DESIGN.md §2). It may import
``blockemu.ondisk`` and ``blockemu.errors`` only, so fsck, inspect and the
property tests run it without an event loop.
"""
