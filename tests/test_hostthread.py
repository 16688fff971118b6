"""The device's I/O thread (``device/hostthread.py``): answers in order, errors raised at the
caller, a cancelled caller's call still runs to its end, and ``close`` leaves nothing behind."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest

from blockemu.device.hostthread import HostThread


async def test_a_call_runs_in_the_thread_and_its_result_or_error_comes_back():
    t = HostThread()
    try:
        assert await t.call(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (5, "blockemu-host")

        def refused() -> None:
            raise OSError(28, "No space left on device")
        with pytest.raises(OSError, match="No space"):
            await t.call(refused)
        assert await t.call(len, b"abc") == 3  # the thread goes on after an error
    finally:
        t.close()


async def test_a_cancelled_caller_s_call_runs_to_its_end_and_the_next_gets_its_own_answer():
    """Answers come back in the order the calls were sent: the cancelled call's answer must be
    passed over, not given to the call after it."""
    t, gate, done = HostThread(), threading.Event(), []

    def held() -> str:
        gate.wait()
        done.append("held")
        return "held's"
    first = asyncio.ensure_future(t.call(held))
    await asyncio.sleep(0)  # sent
    first.cancel()
    second = asyncio.ensure_future(t.call(lambda: "second's"))
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.wait_for(second, 10) == "second's" and done == ["held"]
    assert first.cancelled()
    t.close()


def test_close_ends_the_thread_and_closes_its_pipes_and_a_new_loop_can_call_after_the_last():
    t, before = HostThread(), set(os.listdir("/proc/self/fd"))
    assert asyncio.run(t.call(lambda: 1)) == 1
    assert asyncio.run(t.call(lambda: 2)) == 2  # another loop watches for the answer
    thread = t._thread
    t.close()
    assert thread is not None and not thread.is_alive()
    assert set(os.listdir("/proc/self/fd")) <= before
    t.close()  # twice: nothing more to do
