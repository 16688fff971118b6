"""The mounted filesystem: ``Volume`` (an open image and the async half of commit),
the page cache, the writeback queue, ``Filesystem``/``File`` (the DESIGN.md §8 API)
and ``mkfs``.

May import every layer below it: ``device``, ``engine``, ``crypto``, ``ondisk`` and
the common modules. Nothing below imports it.
"""
