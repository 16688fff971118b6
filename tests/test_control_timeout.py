"""A mount's server that does not answer (stopped by SIGSTOP, wedged, too busy) fails ``blockemu
umount`` and ``blockemu key`` with one line naming the mount point, ETIMEDOUT, exit 1 -- they
waited for ever, silently -- while a request that runs longer than the timeout, its server
alive and sending heartbeats, still gets its answer (DESIGN §6). Runs where FUSE cannot: the
servers here are a listener that never accepts, a real ``ControlServer`` process stopped by
SIGSTOP, and a ``ControlServer`` on a thread's loop."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockemu.cli.main import main
from blockemu.fuse import control

QUICK = 0.3  # the client's timeout here: seconds, not the real 30

SERVER = """
import asyncio, sys
from blockemu.fuse import control

async def serve():
    async def answer(request):
        return {"text": "ok"}
    server = control.ControlServer(sys.argv[1], answer)
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(serve())
"""


@pytest.fixture
def mnt(tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.setattr(control, "TIMEOUT", QUICK)
    (tmp_path / "mnt").mkdir()
    return str(tmp_path / "mnt")


def assert_gives_up(capsys: pytest.CaptureFixture[str], mnt: str) -> None:
    """``umount``, ``key status`` and ``key status --json`` each end with the one line."""
    line = f"{mnt}: the mount's server does not answer (stopped, wedged or too busy): nothing from it in {QUICK:g} s " \
           "(it may still carry the request out if it resumes)"
    assert main(["umount", mnt]) == 1
    assert capsys.readouterr().err == f"blockemu: umount: {line}\n"
    assert main(["key", "status", mnt, "--id", "0" * 32]) == 1
    assert capsys.readouterr().err == f"blockemu: key: {line}\n"
    assert main(["key", "status", mnt, "--id", "0" * 32, "--json"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out)["error"]["code"] == "ETIMEDOUT", out


def test_a_listener_that_never_accepts_times_out(mnt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The kernel completes the connection into the listener's backlog; nothing reads it."""
    control.private_dir(os.path.dirname(control.socket_path(mnt)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(control.socket_path(mnt))
        listener.listen(8)
        assert_gives_up(capsys, mnt)


def test_a_stopped_server_times_out_and_answers_once_continued(mnt: str, capsys: pytest.CaptureFixture[str]) -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER, mnt], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        os.kill(server.pid, signal.SIGSTOP)
        assert_gives_up(capsys, mnt)
        os.kill(server.pid, signal.SIGCONT)
        assert control.request(mnt, "umount") == {"text": "ok"}
    finally:
        server.kill()
        server.wait()


class Slow:
    """A ``ControlServer`` on a thread's loop whose requests take ``seconds``."""

    def __init__(self, mountpoint: str, seconds: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = control.ControlServer(mountpoint, self.answer)
        self.seconds = seconds
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever)

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(self.seconds)  # the long request itself (an umount's writeback), no race
        self.finished.set()
        return {"text": request["op"]}


@pytest.fixture
def slow(mnt: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Slow]:
    monkeypatch.setattr(control, "HEARTBEAT", QUICK / 10)
    s = Slow(mnt, 4 * QUICK)
    s.thread.start()
    asyncio.run_coroutine_threadsafe(s.server.start(), s.loop).result()
    try:
        yield s
    finally:
        asyncio.run_coroutine_threadsafe(s.server.drain(), s.loop).result()  # the requests' tasks end first
        s.loop.call_soon_threadsafe(s.server.close)
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join()
        s.loop.close()


def test_a_request_longer_than_the_timeout_is_answered_while_the_server_lives(mnt: str, slow: Slow) -> None:
    assert control.request(mnt, "umount") == {"text": "umount"}


def test_a_client_gone_away_does_not_stop_the_request(mnt: str, slow: Slow) -> None:
    """The umount under way finishes though nobody hears its heartbeats any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(control.socket_path(mnt))
        c.sendall(b"\0" + json.dumps({"op": "umount"}).encode() + b"\n")
        assert c.recv(1) == b"\n"  # a heartbeat: the request runs
    assert slow.finished.wait(30), "the request stopped with its client"


def test_the_socket_is_found_without_a_stat_of_the_mount_point(mnt: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A stat of a FUSE mount's root asks its server: stopped, it held the client in the kernel
    (uninterruptible) before any timeout. The name is still the real path: a symbolic link to
    the mount point finds the same socket."""
    (tmp_path / "via").symlink_to(mnt)
    want = control.socket_path(mnt)
    for name in ("stat", "lstat"):
        monkeypatch.setattr(os, name, _not_of(mnt, getattr(os, name)))
    assert control.socket_path(mnt) == control.socket_path(str(tmp_path / "via")) == want


def _not_of(path: str, real: Any) -> Any:
    """``real`` (os.stat or os.lstat), failing the test when called on ``path``."""
    def call(p: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        assert os.fspath(p) != path, f"{path} was {real.__name__}()ed"
        return real(p, *args, **kwargs)
    return call
