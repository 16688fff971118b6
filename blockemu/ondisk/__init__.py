"""The on-disk format v1: construct definitions (``structs``), the ``struct``
fast path derived from them (``fast``), checksums, and codecs for tree blocks,
superblocks and item bodies. Pure functions on bytes: no I/O, no asyncio.

The bottom layer: imports only ``blockemu.errors`` (and third-party codecs).
Nothing else in blockemu packs or unpacks on-disk bytes by hand.
"""
