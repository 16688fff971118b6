"""``blockemu key add|remove|status --json`` (DESIGN §6): the result's fields beside xfs_io's
line, and an error as ``{"error": ...}`` with its one stderr line. The mount's control channel is
served by a thread of this test (``answer_key`` is what the FUSE server answers with), so this
runs where FUSE cannot."""
from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockemu import mkfs, mount
from blockemu.cli.main import main
from blockemu.crypto.fscrypt import key_identifier
from blockemu.fs.filesystem import Filesystem
from blockemu.fuse import control
from blockemu.fuse.serve import answer_key

KEY = bytes(range(1, 65))
KID = key_identifier(KEY).hex()


class Served:
    """A mount whose control channel answers key requests, on an event loop in a thread."""

    def __init__(self, image: str, mountpoint: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(image, mountpoint),))
        self.fs: Filesystem | None = None

    async def _serve(self, image: str, mountpoint: str) -> None:
        self.stop = asyncio.Event()
        try:
            async with mount(image) as fs:
                server = control.ControlServer(mountpoint, lambda req: answer_key(fs, req))
                await server.start()
                self.fs = fs
                self.ready.set()
                await self.stop.wait()
                server.close()
        finally:
            self.ready.set()

    def run(self, coro):  # type: ignore[no-untyped-def]
        """``coro`` on the mount's loop, from the test's thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


@pytest.fixture
def served(tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Served, str, Path]]:
    monkeypatch.setenv("BLOCKEMU_RUNTIME_DIR", str(runtime_dir))
    image, mnt = str(tmp_path / "a.img"), tmp_path / "mnt"
    mnt.mkdir()
    asyncio.run(mkfs(image, "64M"))
    key = tmp_path / "k.key"
    key.write_bytes(KEY)
    s = Served(image, str(mnt))
    s.thread.start()
    s.ready.wait()
    assert s.fs is not None, "the mount did not start"
    try:
        yield s, str(mnt), key
    finally:
        s.loop.call_soon_threadsafe(s.stop.set)
        s.thread.join()
        s.loop.close()


def key_json(capsys: pytest.CaptureFixture[str], *argv: str, rc: int = 0, note: str | None = None) -> dict:
    """The command's JSON; its stderr is one line on failure, else ``note``'s line or nothing."""
    assert main(["key", *argv, "--json"]) == rc
    out, err = capsys.readouterr()
    if rc == 0:
        assert err == ("" if note is None else f"blockemu: key: {note}\n"), err
    else:
        assert err.count("\n") == 1 and err.startswith("blockemu: key: "), err
    return json.loads(out)


UNUSED = f"key {KID} unlocks nothing: no encrypted directory on the mounted image uses it (added all the same)"


def test_key_json_gives_each_results_fields(served, capsys) -> None:
    s, mnt, key = served
    # no encrypted directory uses the key yet: added all the same, and said (as no policy names it)
    assert key_json(capsys, "add", mnt, "--key-file", str(key), note=UNUSED) == {
        "action": "add", "identifier": KID, "in_use": False, "note": UNUSED,
        "text": f"Added encryption key with identifier {KID}"}
    assert key_json(capsys, "status", mnt, "--id", KID) == {
        "action": "status", "identifier": KID, "state": "present", "user_count": 1, "added_by_self": True,
        "text": "Present (user_count=1, added_by_self)"}

    async def hold() -> None:  # an open file of an encrypted directory: the key's removal leaves it busy
        assert s.fs is not None
        await s.fs.mkdir("/enc")
        await s.fs.set_policy("/enc", KID)
        s.held = await s.fs.open("/enc/f", "w")
    s.run(hold())
    assert key_json(capsys, "remove", mnt, "--key-file", str(key)) == {
        "action": "remove", "identifier": KID, "files_busy": True, "other_users": False, "wiped_by": None,
        "lost_bytes": 0, "lost_files": 0,
        "text": f"Removed encryption key with identifier {KID}, but files still busy"}
    assert key_json(capsys, "status", mnt, "--id", KID.upper())["state"] == "incompletely_removed"
    s.run(s.held.close())
    assert key_json(capsys, "status", mnt, "--id", KID) == {
        "action": "status", "identifier": KID, "state": "absent", "user_count": 0, "added_by_self": False,
        "text": "Absent"}
    assert main(["key", "status", mnt, "--id", KID]) == 0 and capsys.readouterr().out == "Absent\n"  # text as before
    assert key_json(capsys, "add", mnt, "--key-file", str(key)) == {  # /enc uses it now: nothing said
        "action": "add", "identifier": KID, "in_use": True, "text": f"Added encryption key with identifier {KID}"}


def test_key_json_errors(served, capsys, tmp_path) -> None:
    s, mnt, key = served
    out = key_json(capsys, "remove", mnt, "--id", KID, rc=1)  # never added
    assert out["error"]["command"] == "key" and out["error"]["errno"] == errno.ENOKEY, out
    assert main(["key", "status", str(tmp_path), "--id", KID, "--json"]) == 1  # no server there
    got, err = capsys.readouterr()
    assert json.loads(got)["error"]["code"] == "ENOTCONN" and err.count("\n") == 1, err
    assert main(["key", "status", mnt, "--json"]) == 2  # neither --id nor --key-file: a usage error, as JSON too
    got, err = capsys.readouterr()
    assert json.loads(got)["error"]["errno"] == errno.EINVAL and err.startswith("blockemu: usage: ") and err.count("\n") == 1


@pytest.mark.parametrize("sent, why", [
    # the raw key goes before the line, never in it: a "key" there is not taken for one
    (b"\0" + json.dumps({"op": "key-add", "key": KEY.hex()}).encode() + b"\n", "raw key must be 16 to 64 bytes, got 0"),
    # the line first, as blockemu sent it before: refused at once ("{" is no key's length), not waited on
    (json.dumps({"op": "key-status", "id": KID}).encode() + b"\n", "bad request: a key of 123 bytes"),
    (b"\x40" + KEY[:10], "bad request: the request ended after 10 of its 64 bytes of key"),
], ids=["key in the line", "line first", "key cut short"])
def test_the_channel_takes_a_key_only_raw_before_the_line(served, capsys, sent, why) -> None:
    s, mnt, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(control.socket_path(mnt))
        c.sendall(sent)
        c.shutdown(socket.SHUT_WR)
        reply = json.loads(c.makefile("rb").readline())
    assert reply["ok"] is False and reply["errno"] == errno.EINVAL and reply["message"].startswith(why), reply
    assert key_json(capsys, "status", mnt, "--id", KID)["state"] == "absent"


def test_key_remove_by_a_user_without_a_claim_names_the_cli_flag(served, capsys) -> None:
    """The keyring's hint named the API's keyword (``all_users removes theirs``) on the CLI,
    whose flag is ``--all-users``: the line names the flag, and the flag does what it says."""
    s, mnt, key = served
    assert main(["key", "add", mnt, "--key-file", str(key), "--user", "1000"]) == 0
    capsys.readouterr()
    assert main(["key", "remove", mnt, "--id", KID, "--user", "1001"]) == 1
    _, err = capsys.readouterr()
    assert err == (f"blockemu: key: Required key not available: user 1001 has no claim to key {KID} "
                   f"(users 1000 have: --all-users removes theirs)\n"), err
    assert main(["key", "remove", mnt, "--id", KID, "--user", "1001", "--all-users"]) == 0
    capsys.readouterr()
    assert key_json(capsys, "status", mnt, "--id", KID)["state"] == "absent"
