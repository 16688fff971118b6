"""The filesystem keyring: fscrypt v2 master keys, per-user claims, and leases.

Theory of operation
-------------------
A master key is *present* while some user claims it (``add_key``). An
encrypted inode is *unlocked* when it takes a **lease** on its key, which is
only granted while the key is present; the filesystem holds that lease while
the inode is open, has dirty data, or has I/O in flight (``fs.py`` decides).
When the last claim goes (``remove_key``), removal starts: no new leases are
granted (ENOKEY), and what happens to the secret depends on the removal mode:

* ``soft`` (default): the secret survives for the existing leases -- their
  writeback derives extent keys from it -- and is wiped when the last lease
  is released. This is the fix for acknowledged writes lost at writeout.
* ``hard``: the secret is wiped at once; existing leases hold a dead key and
  writeback of their dirty data fails with ENOKEY (upstream fscrypt
  semantics, with per-extent keys derived at writeout: the bug, measurable).
* ``sync`` / ``deny-writes``: the filesystem writes the key's dirty data back
  (``deny-writes`` first refuses new dirtying), then the secret is wiped.

The whole state machine is the table below; every change of state goes
through ``_transition``, which refuses anything the table does not list.
Status is derived, as in the kernel: PRESENT if claimed, else
INCOMPLETELY_REMOVED while leases remain, else ABSENT (the entry is dropped
and its secret and every derived key zeroed).
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from blockemu.crypto import fscrypt
from blockemu.errors import InvalidArgument, NoKeyError

MODES = ("soft", "hard", "sync", "deny-writes")


class State(enum.Enum):
    ABSENT = "absent"
    PRESENT = "present"
    INCOMPLETELY_REMOVED = "incompletely_removed"


class Event(enum.Enum):
    ADD = "add"
    REMOVE_CLAIM = "remove a claim, others remain"
    REMOVE_LAST = "remove the last claim"
    LEASE = "unlock an inode"
    RELEASE = "release a lease"


S, E = State, Event
# (state, event, leases remain afterwards) -> next state
TRANSITIONS: dict[tuple[State, Event, bool], State] = {
    (S.ABSENT, E.ADD, False): S.PRESENT,
    (S.PRESENT, E.ADD, False): S.PRESENT,
    (S.PRESENT, E.ADD, True): S.PRESENT,
    (S.INCOMPLETELY_REMOVED, E.ADD, True): S.PRESENT,  # revive
    (S.PRESENT, E.REMOVE_CLAIM, False): S.PRESENT,
    (S.PRESENT, E.REMOVE_CLAIM, True): S.PRESENT,
    (S.PRESENT, E.REMOVE_LAST, False): S.ABSENT,
    (S.PRESENT, E.REMOVE_LAST, True): S.INCOMPLETELY_REMOVED,
    (S.INCOMPLETELY_REMOVED, E.REMOVE_LAST, True): S.INCOMPLETELY_REMOVED,  # retry: files still busy
    (S.PRESENT, E.LEASE, True): S.PRESENT,
    (S.PRESENT, E.RELEASE, False): S.PRESENT,
    (S.PRESENT, E.RELEASE, True): S.PRESENT,
    (S.INCOMPLETELY_REMOVED, E.RELEASE, True): S.INCOMPLETELY_REMOVED,
    (S.INCOMPLETELY_REMOVED, E.RELEASE, False): S.ABSENT,  # last holder let go: wipe
}


@dataclass
class MasterKey:
    identifier: bytes
    secret: bytearray | None
    users: set[int] = field(default_factory=set)
    leases: set[int] = field(default_factory=set)  # inode numbers holding the key
    deny_dirtying: bool = False
    removal_started: float | None = None  # time.monotonic() of the removal that emptied the claims

    @property
    def state(self) -> State:
        if self.users:
            return S.PRESENT
        return S.INCOMPLETELY_REMOVED if self.leases else S.ABSENT


@dataclass(frozen=True)
class RemovalResult:
    identifier: str
    files_busy: bool = False
    other_users: bool = False

    def __str__(self) -> str:
        if self.other_users:
            return f"Removed user's claim to encryption key with identifier {self.identifier}"
        busy = ", but files still busy" if self.files_busy else ""
        return f"Removed encryption key with identifier {self.identifier}{busy}"


@dataclass(frozen=True)
class KeyStatus:
    state: State
    user_count: int = 0
    added_by_self: bool = False

    def __str__(self) -> str:
        if self.state is S.PRESENT:
            mine = ", added_by_self" if self.added_by_self else ""
            return f"Present (user_count={self.user_count}{mine})"
        return "Incompletely removed" if self.state is S.INCOMPLETELY_REMOVED else "Absent"


def parse_identifier(key_id: str | bytes) -> bytes:
    if isinstance(key_id, bytes):
        raw = key_id
    else:
        try:
            raw = bytes.fromhex(key_id)
        except ValueError:
            raw = b""
    if len(raw) != fscrypt.KEY_IDENTIFIER_SIZE:
        raise InvalidArgument(f"bad key identifier {key_id!r}: expected 32 hex digits")
    return raw


class Keyring:
    """One per mounted filesystem. Owns every master secret and every lease."""

    def __init__(self, mode: str = "soft") -> None:
        if mode not in MODES:
            raise InvalidArgument(f"bad key_removal mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.keys: dict[bytes, MasterKey] = {}
        self.wiped: deque[bytearray] = deque(maxlen=16)  # the last zeroed secrets, so tests can check them
        # Removals that completed when the last lease went. The kernel keeps such a key until
        # the removal is retried (its dentries pin the inode); we wipe at once, and remember
        # that one retry is owed a success, so generic/580's "close, remove again" reads the same.
        self.completed: set[bytes] = set()
        self.wipe_delays: list[float] = []  # seconds from removal start to wipe, per wipe

    def _transition(self, mk: MasterKey, event: Event, apply: "callable") -> State:
        before = mk.state
        apply()
        after = mk.state
        if TRANSITIONS.get((before, event, bool(mk.leases))) is not after:
            raise AssertionError(f"keyring: illegal transition {before} --{event}--> {after}")
        if after is S.ABSENT:
            self._wipe(mk)
            self.keys.pop(mk.identifier, None)
            if event is E.RELEASE:
                self.completed.add(mk.identifier)
        return after

    def _wipe(self, mk: MasterKey) -> None:
        if mk.secret is not None:
            fscrypt.wipe(mk.secret)
            self.wiped.append(mk.secret)
            mk.secret = None
            if mk.removal_started is not None:
                self.wipe_delays.append(time.monotonic() - mk.removal_started)

    # ------------------------------------------------------------------ ioctls

    def add_key(self, raw: bytes, user: int = 0) -> str:
        if not fscrypt.MIN_KEY_SIZE <= len(raw) <= fscrypt.MAX_KEY_SIZE:
            raise InvalidArgument(f"raw key must be {fscrypt.MIN_KEY_SIZE} to {fscrypt.MAX_KEY_SIZE} bytes, got {len(raw)}")
        ident = fscrypt.key_identifier(raw)
        self.completed.discard(ident)
        mk = self.keys.get(ident)
        if mk is None:
            mk = self.keys[ident] = MasterKey(ident, None)
        secret = bytearray(raw)

        def apply() -> None:
            if mk.secret is None:
                mk.secret = secret
            else:
                fscrypt.wipe(secret)
            mk.users.add(user)
            mk.deny_dirtying = False
            mk.removal_started = None

        self._transition(mk, E.ADD, apply)
        return ident.hex()

    def begin_removal(self, key_id: str | bytes, user: int = 0, all_users: bool = False) -> tuple[MasterKey | None, bool]:
        """Drop the claim(s). Returns (key, removal_started); other claims remaining -> not started;
        (None, True) for a retry of a removal that has completed since.

        ENOKEY when the key is unknown, or the caller has no claim while others do."""
        ident = parse_identifier(key_id)
        mk = self.keys.get(ident)
        if mk is None and ident in self.completed:
            self.completed.discard(ident)
            return None, True
        if mk is None:
            raise NoKeyError("Required key not available")
        if mk.users and not all_users and user not in mk.users:
            raise NoKeyError("Required key not available")
        if mk.users and not all_users and mk.users - {user}:
            self._transition(mk, E.REMOVE_CLAIM, lambda: mk.users.discard(user))
            return mk, False
        if mk.state is S.PRESENT:
            mk.removal_started = time.monotonic()
        self._transition(mk, E.REMOVE_LAST, mk.users.clear)
        if self.mode == "hard":
            self._wipe(mk)
        return mk, True

    def finish_removal(self, mk: MasterKey) -> RemovalResult:
        """After the filesystem wrote back / locked what it could: wipe now unless soft mode keeps it for leases."""
        if self.mode != "soft" and mk.state is not S.PRESENT:
            self._wipe(mk)
        return RemovalResult(mk.identifier.hex(), files_busy=bool(mk.leases))

    def key_status(self, key_id: str | bytes, user: int = 0) -> KeyStatus:
        mk = self.keys.get(parse_identifier(key_id))
        if mk is None:
            return KeyStatus(S.ABSENT)
        if mk.state is S.PRESENT:
            return KeyStatus(S.PRESENT, len(mk.users), user in mk.users)
        return KeyStatus(mk.state)

    # ------------------------------------------------------------------ leases

    def lease(self, ident: bytes, ino: int) -> None:
        """Unlock inode ``ino``: only while the key is present (or ``ino`` already holds a lease)."""
        mk = self.keys.get(ident)
        if mk is None or (mk.state is not S.PRESENT and ino not in mk.leases):
            raise NoKeyError("Required key not available")
        if ino not in mk.leases:
            self._transition(mk, E.LEASE, lambda: mk.leases.add(ino))

    def holds(self, ident: bytes, ino: int) -> bool:
        mk = self.keys.get(ident)
        return mk is not None and ino in mk.leases

    def release(self, ident: bytes, ino: int) -> None:
        mk = self.keys.get(ident)
        if mk is not None and ino in mk.leases:
            self._transition(mk, E.RELEASE, lambda: mk.leases.discard(ino))

    def is_present(self, ident: bytes) -> bool:
        mk = self.keys.get(ident)
        return mk is not None and mk.state is S.PRESENT

    def secret_for(self, ident: bytes, ino: int) -> bytearray:
        """The master secret for deriving ``ino``'s extent keys; ENOKEY unless ``ino`` holds a live lease."""
        mk = self.keys.get(ident)
        if mk is None or ino not in mk.leases or mk.secret is None:
            raise NoKeyError("Required key not available")
        return mk.secret

    def dirtying_allowed(self, ident: bytes) -> bool:
        mk = self.keys.get(ident)
        return mk is not None and not mk.deny_dirtying and mk.secret is not None

    def wipe_all(self) -> None:
        """Unmount: every secret goes."""
        for mk in list(self.keys.values()):
            self._wipe(mk)
        self.keys.clear()
