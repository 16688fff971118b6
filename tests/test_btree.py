"""The COW B-tree against a plain dict model, plus its structural invariants."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockemu.engine.btree import BTree, Must, Through, _balanced_cut, max_item_size
from blockemu.errors import CorruptionError, ExistsError, NotFoundError
from blockemu.ondisk.block import TreeBlock, body_size, max_ptrs
from blockemu.ondisk.fast import ITEM_SIZE
from tests.conftest import MemoryImage


def check_invariants(tree: BTree) -> None:
    """Key order, parent key == child's first key, levels, fill bounds, nothing overfull."""
    body, fanout = body_size(tree.store.nodesize), max_ptrs(tree.store.nodesize)
    root = tree.store.get(tree.root)
    assert root.level == tree.level

    def walk(node, lo, hi, is_root):
        assert node.keys == sorted(node.keys) and len(set(node.keys)) == len(node.keys)
        if node.keys:
            assert lo is None or node.keys[0] >= lo
            assert hi is None or node.keys[-1] < hi
        if node.level == 0:
            node_used = sum(25 + len(v) for v in node.values) + 0
            assert node.used == node_used <= body
            if not is_root:
                assert node.keys, "empty non-root leaf"
            return
        assert 2 <= len(node.keys) <= fanout if is_root else 1 <= len(node.keys) <= fanout
        for i, (bytenr, gen) in enumerate(node.ptrs):
            child = tree.store.get(bytenr, generation=gen)
            assert child.level == node.level - 1
            assert child.keys[0] == node.keys[i]
            walk(child, node.keys[i], node.keys[i + 1] if i + 1 < len(node.keys) else hi, False)

    walk(root, None, None, True)


class Commits:
    """Commits ``tree`` as the real one does and checks what it names can be read back.

    A real commit records a tree's root in its RootItem with the commit's own transid when the
    root moved, else with the generation recorded before (``_sync_root_items``); fsck then reads
    every block through its parent's pointer and rejects one whose header generation differs
    ("parent transid verify failed"). So after each commit this walks the committed bytes alone
    (a fresh reader, nothing cached) from the recorded root: every block the commit names must
    have been written by it or be one an earlier commit wrote and still names the same way. A
    new root that is a block of an earlier generation -- the root-collapse bug -- fails here
    even though its items are all still right."""

    def __init__(self, img: MemoryImage, tree: BTree) -> None:
        self.img, self.tree = img, tree
        self.recorded: tuple[int, int, int] | None = None  # root, level, generation

    def commit(self) -> BTree:
        """Commit and check; returns the tree as a reader of the committed bytes alone sees it."""
        transid = self.img.store.transid
        self.img.commit()
        if self.recorded is None or self.recorded[:2] != (self.tree.root, self.tree.level):
            self.recorded = (self.tree.root, self.tree.level, transid)
        reader = MemoryImage(self.img.store.nodesize)
        reader.blocks = self.img.blocks
        reader.store.allocator = None  # a reader: its fresh allocator would call the committed blocks free
        root, level, generation = self.recorded

        def walk(bytenr: int, generation: int, level: int) -> None:
            block = reader.store.get(bytenr, generation=generation, level=level)
            assert block.generation <= transid
            for child, child_gen in block.ptrs:
                walk(child, child_gen, level - 1)

        walk(root, generation, level)
        return BTree(reader.store, self.tree.owner, root, level)


def assert_matches(tree: BTree, model: dict) -> None:
    assert list(tree.items()) == sorted(model.items())


def run_ops(nodesize: int, ops: list[tuple], commit_every: int = 50) -> None:
    img = MemoryImage(nodesize)
    tree = img.new_tree()
    commits = Commits(img, tree)
    model: dict = {}
    committed_root = None
    for n, (op, k, size) in enumerate(ops):
        key = (k, 1, k * 7 % 13)
        if op == "put":
            value = bytes([k % 256]) * size
            tree.insert(key, value, replace=True)
            model[key] = value
        elif op == "del":
            if key in model:
                assert tree.delete(key) == model.pop(key)
            else:
                with pytest.raises(NotFoundError):
                    tree.delete(key)
        else:
            assert tree.get(key) == model.get(key)
        if n % commit_every == commit_every - 1:
            commits.commit()
            committed_root = (tree.root, tree.level, dict(model))
    check_invariants(tree)
    assert_matches(tree, model)
    if committed_root is not None:
        # the last committed generation is untouched by everything after it
        root, level, snapshot = committed_root
        img2 = MemoryImage(nodesize)
        img2.blocks = img.blocks
        img2.store.allocator = None  # a reader: its fresh allocator would call the committed blocks free
        assert list(BTree(img2.store, 5, root, level).items()) == sorted(snapshot.items())


def op_strategy(max_size: int):
    return st.tuples(st.sampled_from(["put", "put", "del", "get"]), st.integers(0, 400), st.integers(0, max_size))


@pytest.mark.parametrize("nodesize", [4096, 16384, 65536])
@settings(max_examples=60)
@given(data=st.data())
def test_btree_matches_dict_model(nodesize, data):
    ops = data.draw(st.lists(op_strategy(max_item_size(nodesize) // 8), min_size=50, max_size=700))
    run_ops(nodesize, ops)


@pytest.mark.parametrize("nodesize", [4096, 65536])
def test_btree_100k_random_ops(nodesize):
    """A long seeded run (100k operations) with big values that force splits, merges and height changes."""
    rng = random.Random(nodesize)
    limit = max_item_size(nodesize)
    ops = []
    for _ in range(50_000):
        r = rng.random()
        op = "put" if r < 0.55 else "del" if r < 0.9 else "get"
        ops.append((op, rng.randrange(3000), rng.choice([0, 8, 100, rng.randrange(limit + 1)])))
    run_ops(nodesize, ops, commit_every=997)


def test_tree_grows_and_shrinks_height():
    img = MemoryImage(4096)
    tree = img.new_tree()
    keys = [(i, 1, 0) for i in range(20000)]
    for k in keys:
        tree.insert(k, b"x" * 40)
    assert tree.level >= 2
    check_invariants(tree)
    for k in keys[:-3]:
        tree.delete(k)
    check_invariants(tree)
    assert tree.level == 0
    assert [k for k, _ in tree.items()] == keys[-3:]


def test_insert_existing_and_update_missing():
    img = MemoryImage(4096)
    tree = img.new_tree()
    tree.insert((1, 1, 1), b"a")
    with pytest.raises(ExistsError):
        tree.insert((1, 1, 1), b"b")
    with pytest.raises(NotFoundError):
        tree.update((2, 1, 1), b"b")
    with pytest.raises(ValueError):
        tree.insert((3, 1, 1), b"x" * (max_item_size(4096) + 1))


def test_range_iteration_and_neighbours():
    img = MemoryImage(4096)
    tree = img.new_tree()
    for i in range(0, 5000, 5):
        tree.insert((7, 108, i), i.to_bytes(8, "little"))
    got = [k[2] for k, _ in tree.items((7, 108, 1001), (7, 108, 1100))]
    assert got == list(range(1005, 1101, 5))
    assert [k[2] for k, _ in tree.items((7, 108, 1001), (7, 108, 1020), reverse=True)] == [1020, 1015, 1010, 1005]
    assert tree.last_at_or_before((7, 108, 1003))[0] == (7, 108, 1000)
    assert tree.first_at_or_after((7, 108, 1003))[0] == (7, 108, 1005)
    assert tree.last_at_or_before((6, 0, 0)) is None


def test_cow_leaves_committed_blocks_untouched():
    img = MemoryImage(4096)
    tree = img.new_tree()
    for i in range(2000):
        tree.insert((i, 1, 0), b"v1")
    img.commit()
    before = dict(img.blocks)
    for i in range(0, 2000, 3):
        tree.update((i, 1, 0), b"v2-longer")
    for i in range(1, 2000, 3):
        tree.delete((i, 1, 0))
    # nothing written yet, and every block the changes replaced is pinned, not reusable
    assert img.blocks == before
    freed = set(img.store.freed_blocks)
    assert freed and all(not img.alloc.is_free(b, 4096) for b in freed)
    assert not freed & set(img.store.dirty)


def check_filled(tree: BTree) -> None:
    """No block but the root is under a quarter full: ``apply`` mends what it leaves underfull."""
    for block in tree.blocks():
        assert block.bytenr == tree.root or not tree._underfull(block), f"underfull block at level {block.level}"


def run_batches(nodesize: int, batches: list[list[tuple]], commit_every: int = 3, through: bool = False) -> None:
    """``apply`` of each batch against the same changes made one by one on a second tree: the
    same items after every batch, and the batched tree keeps every invariant. ``through``: a
    batch's emptied key range is one ``Through`` change (its other changes in the range left
    out), not a deletion per key."""
    img = MemoryImage(nodesize)
    batched, single = img.new_tree(), img.new_tree(owner=6)
    commits = Commits(img, batched)
    model: dict = {}
    for n, (deletes, batch, cut) in enumerate(batches):
        changes: dict = {}
        for k, size, roll in batch:
            key = (k, 1, k * 7 % 13)
            changes[key] = None if roll < deletes else bytes([k % 256]) * size
        ranges = []
        if cut is not None:  # a key range emptied: whole leaves and subtrees go, their neighbours stay untouched
            lo, hi = sorted(cut)
            if through:
                changes = {key: value for key, value in changes.items() if not lo <= key[0] <= hi}
                ranges.append(((lo, 0, 0), Through((hi, 255, (1 << 64) - 1))))
            changes.update((key, None) for key in model if lo <= key[0] <= hi)
        for key, value in changes.items():
            if value is None:
                if key in model:
                    single.delete(key)
                    del model[key]
            else:
                single.insert(key, value, replace=True)
                model[key] = value
        if ranges:  # the range's deletions are the Through's to make
            changes = {key: value for key, value in changes.items() if not lo <= key[0] <= hi}
        batched.apply(sorted([*changes.items(), *ranges]))
        check_invariants(batched)
        check_filled(batched)
        assert_matches(batched, model)
        assert list(batched.items()) == list(single.items())
        if n % commit_every == commit_every - 1:
            # read back from the committed bytes alone: a committed block changed in place
            # (not copied first) would be right in the cache and wrong here
            assert list(commits.commit().items()) == sorted(model.items())
    check_invariants(batched)


def batch_strategy(max_size: int, max_key: int):
    """Batches of changes, each batch with its own share of deletes (percent) and maybe a key
    range it empties: some grow the tree, some hollow it out, some cut away all of it but a
    committed leaf or subtree nothing else touches (which may then become the root)."""
    change = st.tuples(st.integers(0, max_key), st.integers(0, max_size), st.integers(0, 99))
    end = st.integers(0, max_key)
    cut = st.none() | st.tuples(st.just(0) | end, st.just(max_key) | end)
    batch = st.tuples(st.sampled_from([0, 30, 90, 100]), st.lists(change, max_size=400), cut)
    return st.lists(batch, min_size=1, max_size=12)


@pytest.mark.parametrize("nodesize", [4096, 16384])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_batched_apply_equals_one_by_one(nodesize, data):
    """Model check of ``BTree.apply``: batches that grow the tree by several levels at once,
    empty whole leaves and subtrees, and shrink it back, equal the one-by-one operations."""
    max_key = data.draw(st.sampled_from([50, 400, 3000]))
    run_batches(nodesize, data.draw(batch_strategy(max_item_size(nodesize) // 4, max_key)),
                commit_every=data.draw(st.sampled_from([1, 3])), through=data.draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(items=st.dictionaries(st.integers(10, 290), st.integers(0, 60), max_size=250),
       staged=st.dictionaries(st.integers(0, 300), st.none() | st.integers(0, 60) | st.integers(1, 40).map(Through),
                              max_size=300),
       same=st.booleans())
def test_merge_leaf_matches_a_dict_model(items, staged, same):
    """``_merge_leaf``, the in-place edit of one leaf, against a dict: any number of changes
    (up to twice the leaf's items), inserts before its first and after its last item, deletes of
    absent keys, ``Through`` ranges, and (``same``) replacements all of the old value's size --
    the items, their order and the leaf's byte count all match."""
    def key(k: int) -> tuple[int, int, int]:
        return (k, 1, 0)

    def value(k: int, size: int) -> bytes:
        return bytes([k % 251]) * size

    leaf = TreeBlock(bytenr=1, generation=1, owner=5, level=0)
    leaf.keys = [key(k) for k in sorted(items)]
    leaf.values = [value(k, items[k]) for k in sorted(items)]
    leaf.recount()
    model = {key(k): value(k, size) for k, size in items.items()}
    changes, reach = [], -1
    for k in sorted(staged):
        if k <= reach:  # no change may fall in a Through's range
            continue
        change = staged[k]
        if type(change) is Through:
            reach = k + change.hi
            for m in [m for m in model if k <= m[0] <= reach]:
                del model[m]
            changes.append((key(k), Through((reach, 255, 0))))
        elif change is None:
            model.pop(key(k), None)
            changes.append((key(k), None))
        else:
            size = items.get(k, change) if same else change
            model[key(k)] = value(k + 1, size)
            changes.append((key(k), value(k + 1, size)))
    BTree._merge_leaf(leaf, changes)
    assert list(zip(leaf.keys, leaf.values)) == sorted(model.items())
    assert leaf.used == sum(ITEM_SIZE + len(v) for v in model.values())  # kept by the edits, not recounted


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 4, 53, 300, 4000]) | st.integers(0, 4000), min_size=1, max_size=60))
def test_a_balanced_cut_is_the_first_that_makes_the_larger_half_smallest(sizes):
    """``_balanced_cut`` bisects the items' running byte totals: it must pick the cut a scan of
    every split point would (the first of equals: ties are common, items being alike)."""
    values = [bytes(n) for n in sizes]
    halves = [(sum(map(len, values[:c])), sum(map(len, values[c:]))) for c in range(1, len(values))]
    worst = [max(left + ITEM_SIZE * c, right + ITEM_SIZE * (len(values) - c)) for c, (left, right) in enumerate(halves, 1)]
    assert _balanced_cut(values) == (worst.index(min(worst)) + 1 if worst else 1)


@pytest.mark.parametrize("n", [200, 20000])
def test_a_root_cut_down_to_one_committed_child_is_rewritten(n):
    """Deleting all but the root's last child (a leaf, or a whole subtree when n makes the tree
    three levels deep), untouched since the commit, leaves the root one child: the new root must
    be this generation's copy of it, or the commit names as its root a block of the last
    generation (what fsck reports as "parent transid verify failed")."""
    img = MemoryImage(4096)
    tree = img.new_tree()
    commits = Commits(img, tree)
    keys = [(i, 1, 0) for i in range(n)]
    tree.apply([(k, b"x" * 40) for k in keys])
    commits.commit()
    root = img.store.get(tree.root)
    kept = [k for k in keys if k >= root.keys[-1]]
    tree.apply([(k, None) for k in keys if k < root.keys[-1]])
    assert tree.level == root.level - 1
    commits.commit()
    assert [k for k, _ in tree.items()] == kept


def test_batched_apply_builds_and_empties_a_deep_tree():
    """One batch that makes a three-level tree from nothing, and one that deletes it all."""
    img = MemoryImage(4096)
    tree = img.new_tree()
    commits = Commits(img, tree)
    keys = [(i, 1, 0) for i in range(20000)]
    tree.apply([(k, b"x" * 40) for k in keys])
    check_invariants(tree)
    assert tree.level >= 2 and [k for k, _ in tree.items()] == keys
    commits.commit()
    tree.apply([(k, None) for k in keys[:-3]])
    commits.commit()
    check_invariants(tree)
    assert tree.level == 0 and [k for k, _ in tree.items()] == keys[-3:]
    tree.apply([(k, None) for k in keys[-3:]])
    assert tree.level == 0 and list(tree.items()) == []


def test_must_changes_check_presence_as_insert_and_delete_do():
    """``Must``: an insert of a key there already, or a delete of one missing, anywhere in a
    multi-leaf apply, is CorruptionError (as ``insert``/``delete`` one by one refuse them);
    present as required, it is a plain insert or delete."""
    img = MemoryImage(4096)
    tree = img.new_tree()
    tree.apply([((i, 1, 0), b"x" * 40) for i in range(0, 4000, 2)])
    assert tree.level >= 1
    tree.apply([((1, 1, 0), Must(b"new")), ((2, 1, 0), Must(None)), ((3000, 1, 0), b"plain")])
    assert tree[(1, 1, 0)] == b"new" and (2, 1, 0) not in dict(tree.items()) and tree[(3000, 1, 0)] == b"plain"
    for bad in ([((2999, 1, 0), Must(None))], [((3998, 1, 0), Must(b"again"))]):
        with pytest.raises(CorruptionError):
            tree.apply([((5, 1, 0), None), *bad])


def model_neighbours(model: dict, lo, hi, reverse: bool):
    keys = sorted(k for k in model if lo <= k <= hi)
    return [(k, model[k]) for k in (reversed(keys) if reverse else keys)]


@settings(max_examples=40, deadline=None)
@given(base=st.lists(st.integers(0, 2000), max_size=600), staged=st.lists(st.tuples(st.integers(0, 2000), st.booleans()), max_size=200),
       probes=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 2000)), min_size=1, max_size=30))
def test_tree_batch_reads_through_its_staged_changes(base, staged, probes):
    """A TreeBatch reads as the tree would after its changes (get, ranges both ways, the
    neighbour lookups and floor ranges the one-descent paths answer; deletions staged with a
    lookup or without, ``drop``), also when changes are staged after reads (the batch sorts its
    keys for a read and keeps them until the next change), and ``apply`` makes it so."""
    from blockemu.engine.batch import TreeBatch

    img = MemoryImage(4096)
    tree = img.new_tree()
    key = lambda k: (k, 1, k % 7)  # noqa: E731
    model = {key(k): b"b%d" % k for k in base}
    tree.apply(sorted(model.items()))
    img.commit()
    batch = TreeBatch(tree)
    half = len(staged) // 2
    for part in (staged[:half], staged[half:]):
        for k, delete in part:
            if delete:
                if key(k) in model:
                    if k % 2:
                        assert batch.delete(key(k)) == model.pop(key(k))
                    else:
                        batch.drop(key(k))
                        del model[key(k)]
            else:
                batch.insert(key(k), b"s%d" % k, replace=True)
                model[key(k)] = b"s%d" % k
        for a, b, c in probes:
            lo, hi = key(min(a, b)), key(max(a, b))
            floor_lo, at = key(min(a, b, c)), key(min(max(c, min(a, b)), max(a, b)))  # floor_lo <= at <= hi

            def floor_range(model):
                below = model_neighbours(model, floor_lo, at, True)
                return model_neighbours(model, below[0][0] if below else at, hi, False)

            assert list(batch.floor_items(at, floor_lo, hi)) == floor_range(model)
            assert list(tree.floor_items(at, floor_lo, hi)) == floor_range(dict(tree.items()))
            assert batch.get(lo) == model.get(lo)
            for reverse in (False, True):
                assert list(batch.items(lo, hi, reverse=reverse)) == model_neighbours(model, lo, hi, reverse)
            assert batch.last_at_or_before(hi, lo) == next(iter(model_neighbours(model, lo, hi, True)), None)
            assert batch.first_at_or_after(lo, hi) == next(iter(model_neighbours(model, lo, hi, False)), None)
            committed = dict(tree.items())
            assert tree.first_at_or_after(lo, hi) == next(iter(model_neighbours(committed, lo, hi, False)), None)
            assert tree.last_at_or_before(hi, lo) == next(iter(model_neighbours(committed, lo, hi, True)), None)
    batch.apply()
    check_invariants(tree)
    assert_matches(tree, model)


@settings(max_examples=40, deadline=None)
@given(base=st.lists(st.integers(0, 3000), max_size=1500), cuts=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 60)), max_size=20),
       staged=st.lists(st.integers(0, 3000), max_size=100))
def test_tree_batch_drops_ranges_in_its_apply(base, cuts, staged):
    """``TreeBatch.drop_range``: every item in each range is gone after ``apply`` (ranges that
    overlap, span leaves, hold staged deletions, or hold nothing), the rest as staged; and an
    insert staged in a range is refused."""
    from blockemu.engine.batch import TreeBatch

    img = MemoryImage(4096)
    tree = img.new_tree()
    key = lambda k: (k, 1, k % 7)  # noqa: E731
    model = {key(k): b"b%d" % k * 3 for k in base}
    tree.apply(sorted(model.items()))
    img.commit()
    batch = TreeBatch(tree)
    cut = lambda k: any(a <= k <= a + n for a, n in cuts)  # noqa: E731
    for k in staged:
        if cut(k):
            batch.drop(key(k))
        else:
            batch.insert(key(k), b"s%d" % k, replace=True)
            model[key(k)] = b"s%d" % k
    for a, n in cuts:
        batch.drop_range((a, 0, 0), (a + n, 255, 0))
    model = {k: v for k, v in model.items() if not cut(k[0])}
    batch.apply()
    check_invariants(tree)
    assert_matches(tree, model)
    if cuts:
        a, n = cuts[0]
        batch.insert(key(a), b"x", replace=True)
        batch.drop_range((a, 0, 0), (a + n, 255, 0))
        with pytest.raises(ValueError):
            batch.apply()


@pytest.mark.parametrize("cut", [(100, 900), (0, 19999), (0, 5), (19990, 19999), (5000, 15000), (7, 7)])
def test_a_through_range_goes_on_into_every_leaf_and_subtree_it_spans(cut):
    """A ``Through`` reaching past the child its key falls in deletes on into the next ones (a
    three-level tree; ranges over leaves, subtrees, the edges, all of it, one key)."""
    img = MemoryImage(4096)
    tree = img.new_tree()
    keys = [(i, 1, 0) for i in range(20000)]
    tree.apply([(k, b"x" * 40) for k in keys])
    assert tree.level >= 2
    img.commit()
    lo, hi = cut
    tree.apply([((lo, 0, 0), Through((hi, 255, 0)))])
    check_invariants(tree)
    check_filled(tree)
    assert [k for k, _ in tree.items()] == [k for k in keys if not lo <= k[0] <= hi]


def test_a_commits_blocks_are_read_from_memory_until_they_are_written():
    """The next transaction runs while a commit's blocks are written (DESIGN §9): a block the
    clean cache lets go meanwhile is not on the disk yet, so it must come from memory, and from
    the disk once ``written`` says it landed."""
    img = MemoryImage(4096, cache_blocks=1)
    tree = img.new_tree()
    keys = [(i, 1, 0) for i in range(300)]
    for k in keys:
        tree.insert(k, b"x" * 24)
    writes = img.store.encode_dirty()
    img.store.end_transaction()  # in flight: nothing in img.blocks yet
    assert [k for k, _ in tree.items()] == keys
    img.blocks.update(writes)
    img.store.written()
    img.store.clean.clear()
    assert [k for k, _ in tree.items()] == keys
