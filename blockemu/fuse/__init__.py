"""The image as a real mount point: FUSE requests served by the same asyncio ``Filesystem``
(same page cache, writeback, keyring and removal semantics), so unmodified tools run on it.

Imports ``fs`` and the layers below it (and pyfuse3, the optional ``blockemu[fuse]`` extra,
only inside ``ops`` and ``serve``); only the CLI imports this package.
"""
