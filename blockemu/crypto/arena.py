"""The shared page arena: fixed 4 KiB frames in a memfd that the sealing workers
map too. The page cache keeps its dirty pages here so that a worker encrypts the
very page a writer filled, with no copy between them; it lives in the crypto
layer because sealing is what needs it shared (the page cache, above, owns what
the frames mean)."""
from __future__ import annotations

import mmap
import os

from blockemu.crypto import fscrypt

PAGE = 4096
ZERO_PAGE = bytes(PAGE)


class Arena:
    """Fixed page frames in a memfd, shared with the sealing workers by file descriptor."""

    def __init__(self, frames: int) -> None:
        self.size = frames * PAGE
        self.fd = os.memfd_create("blockemu-pages", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max(frames, 1) * PAGE)
        except OSError as e:
            os.close(self.fd)
            # a memfd counts against the file size limit (ulimit -f) as any file does: the bare
            # "File too large" a mount failed with read as the image's
            raise OSError(e.errno, f"{e.strerror}: the page arena, a memfd of {self.size >> 20} MiB "
                          "for dirty pages (the file size limit, ulimit -f; a smaller dirty_limit)") from None
        self.map = mmap.mmap(self.fd, max(frames, 1) * PAGE)
        self.view = memoryview(self.map)
        # LIFO: the most recently freed frame is reused first, so the arena's touched
        # (resident) part is only as large as the most dirty data ever held at once
        self.free = list(range(frames - 1, -1, -1))
        # frames freed with their plaintext still in them (``release(wipe=False)``): a streaming
        # write's written runs, which the next streaming write overwrites whole -- zeroing them
        # on the way was a memset of every byte written, for nothing. Only ``take`` hands them
        # out, to a caller that overwrites every byte; ``wipe_stale`` zeroes the rest. Also LIFO
        self.stale: list[int] = []
        self.closed = False

    def available(self) -> int:
        """Free frames, zeroed or not."""
        return len(self.free) + len(self.stale)

    def page(self, frame: int) -> memoryview:
        return self.view[frame * PAGE : (frame + 1) * PAGE]

    def frames(self, first: int, count: int) -> memoryview:
        """``count`` consecutive frames from ``first``, as one view."""
        return self.view[first * PAGE : (first + count) * PAGE]

    def release(self, frames: list[int], *, wipe: bool = True) -> None:
        """Frames go back to the free list zeroed -- they held plaintext, in memory every
        sealing worker maps too -- so a frame in ``free`` is always a page of zeros. A run of
        consecutive frames is zeroed in one go. Unless not to ``wipe``: then they go to
        ``stale`` as they are, and the caller sees to it that ``wipe_stale`` runs before the
        plaintext they hold must be gone (the page cache: whenever it drops pages)."""
        if not wipe:
            self.stale.extend(frames)
            return
        view = self.view
        if len(frames) > 1 and max(frames) - (lo := min(frames)) == len(frames) - 1:  # no frame is freed twice
            fscrypt.wipe(view[lo * PAGE : (lo + len(frames)) * PAGE])
        else:
            for f in frames:
                view[f * PAGE : (f + 1) * PAGE] = ZERO_PAGE
        self.free.extend(frames)

    def take(self, n: int) -> list[int]:
        """Up to ``n`` free frames for pages the caller overwrites whole: stale ones first, then
        zeroed ones, each list's most recently freed first -- so a run freed highest frame first
        comes back as one ascending slice."""
        frames: list[int] = []
        for pool in (self.stale, self.free):
            k = min(n - len(frames), len(pool))
            if k:
                frames += pool[len(pool) - k :][::-1]
                del pool[len(pool) - k :]
        return frames

    def take_one(self) -> int | None:
        """One free frame for a page the caller overwrites whole, as ``take``: a stale one first
        (not zeroed first, for nothing), or None: none is free."""
        if self.stale:
            return self.stale.pop()
        return self.free.pop() if self.free else None

    def take_zeroed(self) -> int | None:
        """A free frame that reads as zeros (a stale one is zeroed first), or None: none is free."""
        if self.free:
            return self.free.pop()
        if self.stale:
            frame = self.stale.pop()
            fscrypt.wipe(self.page(frame))
            return frame
        return None

    def wipe_stale(self) -> None:
        """Zero the stale frames and make them free like any other (``release``), highest first
        as ``release`` keeps a run for ``take``."""
        if self.stale:
            stale, self.stale = sorted(self.stale, reverse=True), []
            self.release(stale)

    def close(self) -> None:
        self.closed = True
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
