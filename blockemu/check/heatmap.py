"""inspect heatmap: what occupies each block of an image, drawn like btrfs-heatmap.

The map is built read-only from what the image itself says, and never gives up on a
corrupted image: each tree is walked block by block, and a child that fails to decode
is marked ``corrupt`` and skipped while its siblings are still walked. Space the extent
tree records as allocated but no walk reached stays ``unknown``; if the extent tree
itself could not be read whole, so does every block it might have described -- a map
that calls space free on a guess would hide exactly what a user opens it to find.

Each cell of the map is one sector (several for a huge image: ``cell_bytes``); a cell
takes the class of the most telling thing in it (classes are painted in ``CLASSES``
order, later ones over earlier ones). The picture walks the cells along a Hilbert
curve, so neighbouring addresses stay neighbours on screen and a fragmented file or a
COW-churned tree shows up as speckle rather than as one long stripe.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from blockemu.device.image import ImageFile
from blockemu.engine.btree import BTree
from blockemu.engine.transaction import SUBTREES, TreeStore, usable_ranges
from blockemu.errors import BlockemuError, CorruptionError
from blockemu.ondisk import structs as S
from blockemu.ondisk.block import TreeBlock
from blockemu.ondisk.items import FileExtent, RootItem

# Painting order: a later class wins a cell shared with an earlier one.
CLASSES = ["reserved", "free", "unknown", "data-plain", "data-encrypted", "free-space-tree", "csum-tree", "fs-tree",
           "extent-tree", "root-tree", "superblock", "corrupt"]
COLOURS = {"reserved": "#404040", "free": "#f4f4f4", "unknown": "#b8a0d8", "data-plain": "#8fd18f",
           "data-encrypted": "#2e7d32", "free-space-tree": "#ffe082", "csum-tree": "#ffb74d", "fs-tree": "#64b5f6",
           "extent-tree": "#1565c0", "root-tree": "#6a1b9a", "superblock": "#000000", "corrupt": "#e53935"}
MAX_CELLS = 1 << 20  # beyond this a cell covers several sectors, so the map stays small


class Heatmap:
    """Cells of ``cell_bytes`` over the image, each holding a class index into ``CLASSES``."""

    def __init__(self, size: int, sector: int) -> None:
        self.cell_bytes = sector
        while -(-size // self.cell_bytes) > MAX_CELLS:
            self.cell_bytes *= 2
        self.size = size
        self.cells = bytearray(-(-size // self.cell_bytes))
        self.ranges: dict[str, list[tuple[int, int]]] = {c: [] for c in CLASSES}
        self.problems: list[str] = []

    def mark(self, cls: str, start: int, length: int) -> None:
        self.ranges[cls].append((start, length))

    def paint(self) -> None:
        for i, cls in enumerate(CLASSES):
            for start, length in self.ranges[cls]:
                lo = max(start, 0) // self.cell_bytes
                hi = min(-(-(start + length) // self.cell_bytes), len(self.cells))
                if hi > lo:
                    self.cells[lo:hi] = bytes([i]) * (hi - lo)

    def counts(self) -> dict[str, int]:
        return {c: self.cells.count(i) for i, c in enumerate(CLASSES)}

    def runs(self) -> list[tuple[str, int]]:
        """The per-cell classes, run-length encoded: [class, number of cells], in address order."""
        out: list[tuple[str, int]] = []
        for c in self.cells:
            if out and out[-1][0] == CLASSES[c]:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((CLASSES[c], 1))
        return out

    def as_json(self, path: str) -> dict[str, Any]:
        return {"image": path, "size": self.size, "cell_bytes": self.cell_bytes, "cells": len(self.cells),
                "classes": CLASSES, "counts": self.counts(), "runs": [list(r) for r in self.runs()],
                "problems": self.problems}


def build(path: str) -> Heatmap:
    """The map of ``path``; what could not be read is in ``problems`` and drawn ``unknown`` or ``corrupt``."""
    with ImageFile.open(path) as img:
        try:
            sb = img.best_super()
        except CorruptionError as e:
            hm = Heatmap(img.size, S.SECTOR_SIZE)
            hm.problems.append(str(e))
            hm.mark("unknown", 0, img.size)
            _mark_supers(hm, img)
            hm.paint()
            return hm
        hm = Heatmap(img.size, sb.sectorsize)
        hm.mark("reserved", 0, img.size)
        store = TreeStore(img.read, nodesize=sb.nodesize, csum_type=sb.csum_type, fsid=sb.fsid, transid=sb.generation + 1)
        trees = {S.ROOT_TREE_OBJECTID: BTree(store, S.ROOT_TREE_OBJECTID, sb.root, sb.root_level)}
        complete = _walk(hm, trees[S.ROOT_TREE_OBJECTID], sb.nodesize, lambda k, v: _root_item(hm, trees, store, k, v))
        for tid in SUBTREES:
            if tid not in trees:
                hm.problems.append(f"no readable ROOT_ITEM for the {S.TREE_NAMES[tid]} tree")
        extent_complete = complete and S.EXTENT_TREE_OBJECTID in trees
        for start, length in usable_ranges(sb.total_bytes):
            hm.mark("free" if extent_complete else "unknown", start, length)
        for tid in SUBTREES:
            if tid in trees:
                ok = _walk(hm, trees[tid], sb.nodesize, _item_painter(hm, tid, sb.nodesize))
                extent_complete &= ok or tid != S.EXTENT_TREE_OBJECTID
        if not extent_complete:  # free space is only known from a whole extent tree
            hm.ranges["free"].clear()
            for start, length in usable_ranges(sb.total_bytes):
                hm.mark("unknown", start, length)
        _mark_supers(hm, img)
        hm.paint()
        return hm


def _mark_supers(hm: Heatmap, img: ImageFile) -> None:
    for copy in img.supers:
        if copy.raw[0x40:0x48] == S.MAGIC:
            hm.mark("superblock", copy.offset, S.SUPER_INFO_SIZE)


def _root_item(hm: Heatmap, trees: dict[int, BTree], store: TreeStore, key: tuple[int, int, int], body: bytes) -> None:
    if key[1] == S.ROOT_ITEM and key[0] in SUBTREES:
        item = RootItem.unpack(body)
        trees[key[0]] = BTree(store, key[0], item.bytenr, item.level)


def _item_painter(hm: Heatmap, tid: int, nodesize: int):  # type: ignore[no-untyped-def]
    """What a leaf item of tree ``tid`` says about the space it describes."""
    def paint(key: tuple[int, int, int], body: bytes) -> None:
        if tid == S.EXTENT_TREE_OBJECTID and key[1] in (S.EXTENT_ITEM, S.METADATA_ITEM):
            hm.mark("unknown", key[0], nodesize if key[1] == S.METADATA_ITEM else key[2])  # until a walk names it
        elif tid == S.FS_TREE_OBJECTID and key[1] == S.EXTENT_DATA:
            f = FileExtent.unpack(body)
            if f.type == S.FILE_EXTENT_REG and f.disk_bytenr:
                cls = "data-plain" if f.encryption == S.ENCRYPTION_NONE else "data-encrypted"
                hm.mark(cls, f.disk_bytenr, f.disk_num_bytes)
    return paint


def _walk(hm: Heatmap, tree: BTree, nodesize: int, on_item) -> bool:  # type: ignore[no-untyped-def]
    """Mark every block of ``tree`` reachable around corruption, feed its leaf items to
    ``on_item``; True if nothing was in the way."""
    name = f"{S.TREE_NAMES[tree.owner]}-tree"
    complete = True
    for block, err in _blocks(tree):
        if err is not None:
            complete = False
            hm.problems.append(str(err))
            if err.bytenr is not None:
                hm.mark("corrupt", err.bytenr, nodesize)
            continue
        hm.mark(name, block.bytenr, nodesize)
        for k, v in zip(block.keys, block.values) if block.level == 0 else ():
            try:
                on_item(k, v)
            except CorruptionError as e:
                complete = False
                hm.problems.append(f"{name} block {block.bytenr} item {k}: {e}")
    return complete


def _blocks(tree: BTree) -> Iterator[tuple[TreeBlock, None] | tuple[None, BlockemuError]]:
    """Every block of the tree that decodes, parents first; a child that does not is
    reported (with the error) in its place and its subtree skipped."""
    seen = {tree.root}
    try:
        stack = [tree._root_block()]
    except BlockemuError as e:
        if not isinstance(e, CorruptionError):
            e = CorruptionError(f"tree {tree.owner} root {tree.root}: {e}", "BAD_TREE_BLOCK", tree.root)
        yield None, e
        return
    while stack:
        node = stack.pop()
        yield node, None
        for s in reversed(range(len(node.ptrs)) if node.level else range(0)):
            try:
                stack.append(tree._child(node, s, seen))
            except BlockemuError as e:
                if not isinstance(e, CorruptionError):
                    e = CorruptionError(str(e), "BAD_TREE_BLOCK", node.ptrs[s][0])
                yield None, e


def hilbert_xy(n: int, d: Any) -> tuple[Any, Any]:
    """Cell ``d`` of a Hilbert curve filling an n x n square (n a power of two); ``d`` may be
    an integer or a numpy array of them (then every cell's position at once)."""
    x, y, t = d * 0, d * 0, d
    s = 1
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        flip = (ry == 0) & (rx == 1)
        x, y = x + flip * (s - 1 - 2 * x), y + flip * (s - 1 - 2 * y)
        swap = ry == 0
        x, y = x + swap * (y - x), y + swap * (x - y)
        x, y = x + s * rx, y + s * ry
        t = t // 4
        s *= 2
    return x, y


def grid(hm: Heatmap) -> Any:
    """The cells as a 2-D numpy array along the Hilbert curve (NaN where it has no cell), cut to
    the part the curve reaches and laid on its long side: the cells fill a quarter to all of
    the smallest power-of-two square, and the curve's first half is one half of it, so a 2 GiB
    image (2^19 cells of a 1024 x 1024 square) drew as a narrow strip beside an empty half."""
    import numpy as np

    side = 1
    while side * side < len(hm.cells):
        side *= 2
    x, y = hilbert_xy(side, np.arange(len(hm.cells), dtype=np.int64))
    out = np.full((int(y.max()) + 1, int(x.max()) + 1), np.nan)
    out[y, x] = np.frombuffer(bytes(hm.cells), dtype=np.uint8)
    return out.T if out.shape[0] > out.shape[1] else out


FIGSIZE = (10.0, 8.0)
DPI = 100  # so the PNG is always 1000 x 800 pixels


def draw(hm: Heatmap, path: str, out: str) -> None:
    """The map as a PNG: the Hilbert-ordered cells, and a legend with each class's share."""
    from blockemu.display import pyplot

    plt = pyplot()  # first: without the `report` extra, its one line (numpy comes with matplotlib)
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = grid(hm)
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.imshow(image, cmap=ListedColormap([COLOURS[c] for c in CLASSES]), vmin=-0.5, vmax=len(CLASSES) - 0.5,
              interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{path}: {len(hm.cells)} cells of {hm.cell_bytes // 1024} KiB along a Hilbert curve")
    counts = hm.counts()
    ax.legend(handles=[Patch(color=COLOURS[c], label=f"{c}: {counts[c]}") for c in CLASSES if counts[c]],
              loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.subplots_adjust(left=0.02, right=0.72, top=0.94, bottom=0.02)
    # the format named, never guessed: given a name without a suffix, savefig appended ".png" and
    # drew beside it (``OUT.png``, even ``/dev/full.png``), while the command reported OUT
    fig.savefig(out, dpi=DPI, format=os.path.splitext(out)[1][1:].lower() or "png")
    plt.close(fig)
