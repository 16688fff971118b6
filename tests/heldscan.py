"""Which live Python objects of a process hold the memory at given addresses: a hook the FUSE
tests install in a server they start (``SERVER``, run with ``python -c``), so a memory scan's
hit can be told *held* (inside a str, bytes or buffer some live object still reaches) from
*freed* (memory the allocator has not reused yet, which DESIGN section 4 admits for names).

The scan (tests/memscan.py) finds the needles; the hook is given only their addresses -- the
server never learns what was looked for. On SIGUSR1 it reads ``[[address, length], ...]`` as
JSON from the file named by ``$BLOCKEMU_TEST_HELD``, collects garbage (kept aside, not freed,
until it has answered), walks every object the garbage collector reaches (from
``sys.modules``, every thread's frames and every tracked object, through
``gc.get_referents``, breadth first), and prints one line on stdout: ``held: `` and JSON
``{"held": [{"at": hex, "object": what, "garbage": bool, "chain": [referrer, ...]}],
"objects": n}``, the chain leading from a root to the holding object; ``garbage``: reached
only from reference cycles nothing else reaches, which the next collection frees. Only
objects that keep data in memory of their own can hold a name: str and bytes (their body,
``sys.getsizeof``), bytearray, array and BytesIO (their buffer). A copy in memory C code
owns, or in an object only C reaches, is not found: it looks freed.

A signal, not the control socket: the hook adds no request kind to the product. The test
sends nothing meanwhile, so no FUSE request is in flight while it walks; its handler is
imported only when the signal comes, so the server runs as ``python -m blockemu`` until then.
"""
from __future__ import annotations

import array
import collections
import ctypes
import gc
import hashlib
import io
import json
import os
import signal
import sys
import textwrap
import types
from typing import Any

ENV = "BLOCKEMU_TEST_HELD"

SERVER = textwrap.dedent("""
    import runpy, signal
    def answer(signum, frame):
        from tests import heldscan
        heldscan.answer(signum, frame)
    signal.signal(signal.SIGUSR1, answer)
    runpy.run_module("blockemu", run_name="__main__", alter_sys=True)
""")


def answer(signum: int, frame: types.FrameType | None) -> None:
    """SIGUSR1's handler in the server: ``held`` for the spans in ``$BLOCKEMU_TEST_HELD``, as one line."""
    with open(os.environ[ENV]) as f:
        spans = [(at, length) for at, length in json.load(f)]
    found, count = held(spans, skip_frame=frame)
    print("held: " + json.dumps({"held": found, "objects": count}), flush=True)


def body(obj: object) -> tuple[int, int] | None:
    """Where ``obj`` keeps bytes of its own that a name could be copied into: (start, end). A
    memoryview is not one: it shows another object's buffer, which is walked on its own."""
    if isinstance(obj, (str, bytes)):
        return id(obj), id(obj) + sys.getsizeof(obj)
    if isinstance(obj, array.array):
        at, n = obj.buffer_info()
        return at, at + n * obj.itemsize
    if isinstance(obj, io.BytesIO) and not obj.closed and obj.getbuffer().nbytes:
        with obj.getbuffer() as view:
            start = ctypes.addressof(ctypes.c_char.from_buffer(view))
            return start, start + view.nbytes
    if isinstance(obj, bytearray) and len(obj):
        start = ctypes.addressof(ctypes.c_char.from_buffer(obj))
        return start, start + obj.__alloc__()
    return None


def held(spans: list[tuple[int, int]], skip_frame: types.FrameType | None = None) -> tuple[list[dict[str, Any]], int]:
    """The objects whose own memory overlaps one of ``spans``, each with a referrer chain from a
    root and whether it is live or only cyclic garbage (unreachable, freed at the next
    collection: kept here for this answer, then freed); and how many objects were walked."""
    debug = gc.get_debug()
    gc.set_debug(debug | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
        gc.garbage.clear()
    finally:
        gc.set_debug(debug)
    parent: dict[int, int | None] = {}
    objs: dict[int, object] = {}
    queue: collections.deque[object] = collections.deque()  # breadth first: each chain is a shortest one
    mine = {id(parent), id(objs), id(queue), id(spans), id(garbage)}
    f = sys._getframe()
    while f is not None and f is not skip_frame:  # the hook's own frames hold only its bookkeeping
        mine.add(id(f))
        f = f.f_back
    roots: list[object] = [sys.modules]
    for top in sys._current_frames().values():
        f = top
        while f is not None:
            roots.append(f)
            f = f.f_back
    mine.add(id(roots))
    dead = {id(o) for o in garbage}
    roots += [o for o in gc.get_objects() if id(o) not in dead]
    live = 0
    for root in [*roots, None, *garbage]:  # None: what is reached from here on is garbage only
        if root is None:
            live = len(objs)
            continue
        if id(root) in parent or id(root) in mine:
            continue
        parent[id(root)], objs[id(root)] = None, root
        queue.append(root)
        while queue:
            obj = queue.popleft()
            refs = list(gc.get_referents(obj))
            if isinstance(obj, types.FrameType):
                refs.append(obj.f_locals)
            for ref in refs:
                if id(ref) in parent or id(ref) in mine:
                    continue
                parent[id(ref)], objs[id(ref)] = id(obj), ref
                queue.append(ref)
    hits = []
    for i, (key, obj) in enumerate(objs.items()):
        where = body(obj)
        if where is None:
            continue
        for at, length in spans:
            if at < where[1] and where[0] < at + length:
                hits.append((at, key, i >= live))
    holding = {key for _, key, _ in hits}
    found = [{"at": hex(at), "object": f"{type(objs[key]).__name__} of {len(objs[key])}",  # type: ignore[arg-type]
              "garbage": unreached, "chain": chain(key, parent, objs, holding)} for at, key, unreached in sorted(hits)]
    count = len(objs)
    objs.clear()
    parent.clear()
    return found, count


def chain(key: int, parent: dict[int, int | None], objs: dict[int, object], holding: set[int]) -> list[str]:
    """How a root reaches ``objs[key]``, root first: each step's type, and the attribute, key or
    index it is found under. What holds a hit is never shown (it would carry the name on)."""
    steps: list[str] = []
    child: int | None = key
    while child is not None:
        up = parent[child]
        steps.append(_describe(objs[child], objs[up] if up is not None else None, holding))
        child = up
    return steps[::-1]


def _describe(obj: object, up: object, holding: set[int]) -> str:
    """One step of a chain: ``obj``, and where ``up`` keeps it."""
    what = type(obj).__qualname__
    if obj is sys.modules:
        what = "sys.modules"
    elif isinstance(obj, types.ModuleType):
        what = f"module {obj.__name__}"
    elif isinstance(obj, types.FrameType):
        what = f"frame of {obj.f_code.co_qualname} ({obj.f_code.co_filename}:{obj.f_lineno})"
    elif isinstance(obj, (types.FunctionType, type, types.CoroutineType, types.GeneratorType)):
        what = f"{what} {obj.__qualname__}"
    if isinstance(up, dict):
        for k, v in up.items():
            if v is obj:
                return f"{what} at [{_safe(k, holding)}]"
            if k is obj:
                return f"{what} (a key)"
    if isinstance(up, (list, tuple)):
        return f"{what} at [{next((i for i, v in enumerate(up) if v is obj), '?')}]"
    return what


def _safe(k: object, holding: set[int]) -> str:
    """A dict key as the chain shows it: an int or a str that holds no copy; else its type (a
    tuple could hold a name)."""
    if not isinstance(k, (int, str)) or id(k) in holding:
        return f"<a {type(k).__name__}>"
    text = repr(k)
    return text if len(text) <= 60 else text[:57] + "..."


def ask(proc: Any, spans: list[list[int]], path: str) -> list[dict[str, Any]]:
    """From the test's side: which of ``spans`` (``[address, length]``) live objects of the
    server ``proc`` (started with ``SERVER``, ``$BLOCKEMU_TEST_HELD`` = ``path``) hold. A span
    whose bytes changed meanwhile is marked ``reused``: it was free, and what the hook's own
    work allocated there (its import's strs) holds it now, not a copy."""
    with open(path, "w") as f:
        json.dump(spans, f)
    before = digests(proc.pid, spans)
    os.kill(proc.pid, signal.SIGUSR1)
    line = proc.stdout.readline()
    assert line.startswith("held: "), f"the server's hook did not answer: {line!r}"
    changed = {hex(at) for (at, _), was, now in zip(spans, before, digests(proc.pid, spans)) if was != now}
    return [{**h, "reused": h["at"] in changed} for h in json.loads(line[len("held: "):])["held"]]


def digests(pid: int, spans: list[list[int]]) -> list[bytes]:
    """Each span's bytes in ``pid``, hashed: they are a name, which this process does not keep
    (read into a buffer zeroed once hashed)."""
    buf = bytearray(max((n for _, n in spans), default=0))
    out = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for at, n in spans:
            mem.seek(at)
            got = mem.readinto(memoryview(buf)[:n])
            out.append(hashlib.sha256(memoryview(buf)[:got]).digest())
    buf[:] = bytes(len(buf))
    return out
