"""The shared page arena: fixed 4 KiB frames in a memfd that the sealing workers
map too. The page cache keeps its dirty pages here so that a worker encrypts the
very page a writer filled, with no copy between them; it lives in the crypto
layer because sealing is what needs it shared (the page cache, above, owns what
the frames mean)."""
from __future__ import annotations

import mmap
import os

PAGE = 4096


class Arena:
    """Fixed page frames in a memfd, shared with the sealing workers by file descriptor."""

    def __init__(self, frames: int) -> None:
        self.size = frames * PAGE
        self.fd = os.memfd_create("blockemu-pages", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, max(frames, 1) * PAGE)
        self.map = mmap.mmap(self.fd, max(frames, 1) * PAGE)
        self.view = memoryview(self.map)
        # LIFO: the most recently freed frame is reused first, so the arena's touched
        # (resident) part is only as large as the most dirty data ever held at once
        self.free = list(range(frames - 1, -1, -1))

    def page(self, frame: int) -> memoryview:
        return self.view[frame * PAGE : (frame + 1) * PAGE]

    def close(self) -> None:
        unmap(self.map, self.view)
        os.close(self.fd)


def unmap(mapping: mmap.mmap, view: memoryview) -> None:
    """Release our view and unmap -- unless a slice of it outlives its use (a caller, or an
    exception's traceback, still holds one): the mapping then goes when the last one does.
    Closing never fails for it: a leftover view must not stop an unmount."""
    view.release()
    try:
        mapping.close()
    except BufferError:
        pass
