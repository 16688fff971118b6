#!/usr/bin/env python3
"""Profile bench.py's random-write figure on a fixed run: N random 4 KiB buffered pwrites (seeded
offsets, one page of data) over a SPAN-MiB file on a fresh image, past the dirty limit (64 MiB
unless DL= in bytes; the background threshold a quarter of it), as ``fig_random`` writes them.

    python tools/prof_random.py N SPAN_MIB [time|cprofile|ops|exit]

time: CPU (process_time, every thread) and wall per write of the loop, then an unmount that
writes back the rest -- run under ``valgrind --tool=callgrind`` (PYTHONHASHSEED=0) with two N
and subtract for instructions per write, the write call with its share of writeback;
cprofile: the loop under cProfile, to OUT (default /tmp/prof_random.out);
ops: bytecodes executed per function in the loop (a settrace opcode count: deterministic, a
proxy for the Python-level work), printed as per-write counts by file and function;
exit: as time, but exit without the unmount (with a large DL: the write call alone).
The image goes in D (default the system's temporary directory).
"""
from __future__ import annotations

import asyncio
import collections
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())  # the checkout run from, for A/B runs of two trees
import blockemu  # noqa: E402


def opcode_counter(ops: collections.Counter) -> object:
    """A settrace function counting each frame's bytecodes under (file, function)."""
    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        key = (frame.f_code.co_filename.rsplit("/", 2)[-1], frame.f_code.co_name)

        def local(frame, event, arg):
            if event == "opcode":
                ops[key] += 1
            return local
        return local
    return trace


async def run(image: str, offsets: list[int], span: int, mode: str, dirty_limit: int) -> None:
    block = random.Random(5).randbytes(4096)
    n = len(offsets)
    async with blockemu.mount(image, interval=3600, dirty_limit=dirty_limit, background_bytes=dirty_limit // 4) as fs:
        async with fs.open("/rnd", "w+") as f:
            await f.truncate(span)
            ops: collections.Counter = collections.Counter()
            if mode == "cprofile":
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            elif mode == "ops":
                sys.settrace(opcode_counter(ops))
            cpu, wall = time.process_time(), time.perf_counter()
            for off in offsets:
                await f.pwrite(block, off)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if mode == "cprofile":
                prof.disable()
                prof.dump_stats(os.environ.get("OUT", os.path.join(tempfile.gettempdir(), "prof_random.out")))
            elif mode == "ops":
                sys.settrace(None)
                for (name, func), count in ops.most_common(40):
                    print(f"{count / n:8.1f} {name}:{func}")
            print(f"cpu/write {cpu / n * 1e6:.2f} us  wall/write {wall / n * 1e6:.2f} us  {n / wall:,.0f} writes/s  "
                  f"{fs.writeback.stats['extents']} extents written back in the loop", flush=True)
            if mode == "exit":
                os.unlink(image)
                os._exit(0)


def main() -> None:
    n, span = int(sys.argv[1]), int(sys.argv[2]) << 20
    mode = sys.argv[3] if len(sys.argv) > 3 else "time"
    rng = random.Random(4)
    offsets = [rng.randrange(span >> 12) << 12 for _ in range(n)]
    image = os.path.join(os.environ.get("D", tempfile.gettempdir()), f"prof_random{os.getpid()}.img")
    asyncio.run(blockemu.mkfs(image, size=max(2 * span, 1 << 30)))
    try:
        asyncio.run(run(image, offsets, span, mode, int(os.environ.get("DL", 64 << 20))))
    finally:
        if os.path.exists(image):
            os.unlink(image)


if __name__ == "__main__":
    main()
