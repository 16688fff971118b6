"""Checkers: ``fsck`` (structural passes, then filesystem passes in ``fsck_fs``, and
the fsync log in ``fsck_log``), ``repair`` and ``inspect``. They read the image through ``device.ImageFile`` and
the engine, with no event loop; ``repair`` writes through a ``Volume``.

May import ``fs`` (for ``Volume``), ``device``, ``engine``, ``ondisk`` and the
common modules.
"""
