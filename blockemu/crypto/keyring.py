"""The filesystem keyring: fscrypt v2 master keys, per-user claims, and leases.

Theory of operation
-------------------
A master key is *present* while some user claims it (``add_key``). An
encrypted inode is *unlocked* when it takes a **lease** on its key, which is
only granted while the key is present; the filesystem holds that lease while
the inode is open, has dirty data, or has I/O in flight (``fs.filesystem``
decides). When the last claim goes (``remove_key``), removal starts: no new
leases are granted (ENOKEY), and the mount's removal mode decides the rest.

Two tables below are the whole state machine; nothing else decides:

* ``TRANSITIONS``: (state, event, leases remain afterwards) -> (next state,
  what the keyring does). The state is derived from the key's claims, leases
  and secret, as the kernel derives its status, and ``_transition`` checks that
  every change lands where the table says, then does the row's action: store
  or keep the secret, grant or refuse a lease, zero the secret.
* ``REMOVAL``: mode -> the steps that removing the last claim takes, in order.
  The keyring does its own steps (refuse new dirtying, wipe); the filesystem
  does the others (write the key's dirty data back, lock the idle inodes):

  - ``soft`` (default): no wipe step: the secret survives for the existing
    leases -- their writeback derives extent keys from it -- and the last
    lease's release wipes it. The fix for acknowledged writes lost at writeout.
  - ``hard``: wipe first; existing leases hold a dead key (state ``WIPED``) and
    writeback of their dirty data fails with ENOKEY (upstream fscrypt's
    semantics with per-extent keys derived at writeout: the bug, measurable).
  - ``sync``: write back, then wipe, open files or not (lossy by design: what is dirtied
    while the write back runs is dropped -- by a write back after the wipe, so the removal
    counts it -- and open files' later writes get ENOKEY).
  - ``deny-writes``: refuse new dirtying, write back, then wipe (and write back again, as sync).

Status as the ioctl reports it: PRESENT if claimed, else "Incompletely
removed" while leases remain (secret kept or wiped), else ABSENT (the entry is
dropped and its secret and every derived key zeroed).
"""
from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from blockemu.crypto import fscrypt
from blockemu.errors import InvalidArgument, NoKeyError

MODES = ("soft", "hard", "sync", "deny-writes")
# how a caller without a claim removes the others' anyway, in no front end's words (the API's
# keyword is all_users, the CLI's flag --all-users): a front end that names its own may restate it
OTHERS_HOLD = "removing it for all users removes theirs"


class State(enum.Enum):
    ABSENT = "absent"
    PRESENT = "present"
    INCOMPLETELY_REMOVED = "incompletely_removed"  # no claims; leases keep the secret
    WIPED = "wiped"  # no claims; leases remain but hold a zeroed secret (hard, sync, deny-writes)


class Event(enum.Enum):
    ADD = "add"
    REMOVE_CLAIM = "remove a claim, others remain"
    REMOVE_LAST = "remove the last claim"
    WIPE = "the removal mode's wipe step"
    LEASE = "unlock an inode"
    RELEASE = "release a lease"


class Do(enum.Enum):
    """What a transition does besides changing the state."""

    NOTHING = "nothing"
    STORE = "store the added secret"
    KEEP = "keep the secret held; zero the copy just added"
    GRANT = "grant the lease"
    REFUSE = "refuse with ENOKEY"
    ZERO = "zero the secret"


class Step(enum.Enum):
    DENY_DIRTYING = "refuse new dirty data with ENOKEY"
    WRITE_BACK = "write the key's dirty data back and commit (the filesystem)"
    LOCK_IDLE = "lock every closed, clean, idle inode: drop its plaintext and lease (the filesystem)"
    WIPE = "zero the secret, leases or not"


St, Ev = State, Event
# (state, event, leases remain afterwards) -> (next state, action)
TRANSITIONS: dict[tuple[State, Event, bool], tuple[State, Do]] = {
    (St.ABSENT, Ev.ADD, False): (St.PRESENT, Do.STORE),
    (St.PRESENT, Ev.ADD, False): (St.PRESENT, Do.KEEP),
    (St.PRESENT, Ev.ADD, True): (St.PRESENT, Do.KEEP),
    (St.INCOMPLETELY_REMOVED, Ev.ADD, True): (St.PRESENT, Do.KEEP),  # revive: the leases' secret is the same
    (St.WIPED, Ev.ADD, True): (St.PRESENT, Do.STORE),  # the key comes back for the leases it left dead
    (St.PRESENT, Ev.REMOVE_CLAIM, False): (St.PRESENT, Do.NOTHING),
    (St.PRESENT, Ev.REMOVE_CLAIM, True): (St.PRESENT, Do.NOTHING),
    (St.PRESENT, Ev.REMOVE_LAST, False): (St.ABSENT, Do.ZERO),
    (St.PRESENT, Ev.REMOVE_LAST, True): (St.INCOMPLETELY_REMOVED, Do.NOTHING),
    (St.INCOMPLETELY_REMOVED, Ev.REMOVE_LAST, True): (St.INCOMPLETELY_REMOVED, Do.NOTHING),  # retry: files busy
    (St.WIPED, Ev.REMOVE_LAST, True): (St.WIPED, Do.NOTHING),  # retry: files busy
    (St.PRESENT, Ev.WIPE, False): (St.PRESENT, Do.NOTHING),  # re-added while the removal wrote back
    (St.PRESENT, Ev.WIPE, True): (St.PRESENT, Do.NOTHING),
    (St.INCOMPLETELY_REMOVED, Ev.WIPE, True): (St.WIPED, Do.ZERO),
    (St.WIPED, Ev.WIPE, True): (St.WIPED, Do.NOTHING),
    (St.PRESENT, Ev.LEASE, True): (St.PRESENT, Do.GRANT),
    (St.INCOMPLETELY_REMOVED, Ev.LEASE, True): (St.INCOMPLETELY_REMOVED, Do.REFUSE),
    (St.WIPED, Ev.LEASE, True): (St.WIPED, Do.REFUSE),
    (St.PRESENT, Ev.RELEASE, False): (St.PRESENT, Do.NOTHING),
    (St.PRESENT, Ev.RELEASE, True): (St.PRESENT, Do.NOTHING),
    (St.INCOMPLETELY_REMOVED, Ev.RELEASE, True): (St.INCOMPLETELY_REMOVED, Do.NOTHING),
    (St.INCOMPLETELY_REMOVED, Ev.RELEASE, False): (St.ABSENT, Do.ZERO),  # last holder let go: wipe
    (St.WIPED, Ev.RELEASE, True): (St.WIPED, Do.NOTHING),
    (St.WIPED, Ev.RELEASE, False): (St.ABSENT, Do.NOTHING),  # zeroed already
}

# mode -> what removing the last claim does, in order
REMOVAL: dict[str, tuple[Step, ...]] = {
    "soft": (Step.WRITE_BACK, Step.LOCK_IDLE),
    "hard": (Step.WIPE, Step.WRITE_BACK, Step.LOCK_IDLE),
    # a wiping mode that writes back first writes back again after its wipe: what a write dirtied
    # meanwhile is dropped there (ENOKEY), within the removal, which counts it -- left to a later
    # flush, the removal said "0 bytes lost" of what its wipe had just doomed
    "sync": (Step.WRITE_BACK, Step.LOCK_IDLE, Step.WIPE, Step.WRITE_BACK, Step.LOCK_IDLE),
    "deny-writes": (Step.DENY_DIRTYING, Step.WRITE_BACK, Step.LOCK_IDLE, Step.WIPE, Step.WRITE_BACK, Step.LOCK_IDLE),
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
            return St.PRESENT
        if self.leases:
            return St.INCOMPLETELY_REMOVED if self.secret is not None else St.WIPED
        return St.ABSENT


@dataclass(frozen=True)
class RemovalResult:
    identifier: str
    files_busy: bool = False
    other_users: bool = False
    wiped_by: str | None = None  # the removal mode that wiped the secret under busy files or dirty data
    lost_bytes: int = 0  # dirty data of the key's files the removal's own write back had to drop
    lost_files: int = 0

    def __str__(self) -> str:
        """xfs_io's text; when a wiping mode left busy files holding a dead key, or dropped dirty
        data, one clause more: xfs_io's "but files still busy" alone reads as soft removal's
        promise that they keep working, the opposite of what hard removal does to their dirty
        data, and its plain line hid that closed files' dirty data had just been dropped."""
        if self.other_users:
            return f"Removed user's claim to encryption key with identifier {self.identifier}"
        busy = ", but files still busy" if self.files_busy else ""
        wiped = ""
        if self.wiped_by:
            wiped = (f"; {self.wiped_by} removal wiped the key under "
                     + ("them: their writes can no longer reach the disk" if self.files_busy else "dirty data"))
        if self.lost_bytes:
            wiped += (f" ({self.lost_bytes} bytes of {self.lost_files} file{'s' * (self.lost_files > 1)} "
                      "lost at writeback)")
        return f"Removed encryption key with identifier {self.identifier}{busy}{wiped}"


@dataclass(frozen=True)
class KeyStatus:
    state: State
    user_count: int = 0
    added_by_self: bool = False

    def __str__(self) -> str:
        if self.state is St.PRESENT:
            mine = ", added_by_self" if self.added_by_self else ""
            return f"Present (user_count={self.user_count}{mine})"
        return "Absent" if self.state is St.ABSENT else "Incompletely removed"


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


def check_policy_key(secret: bytes | bytearray, where: str) -> None:
    """EINVAL unless ``secret`` is long enough to encrypt ``where`` under a v2 policy
    (``fscrypt.MIN_POLICY_KEY_SIZE``). set_policy checks it, and mkfs before it touches the image."""
    if len(secret) < fscrypt.MIN_POLICY_KEY_SIZE:
        raise InvalidArgument(f"key {fscrypt.key_identifier(secret).hex()} is {len(secret)} bytes, too short to encrypt "
                              f"{where}: AES-256-XTS needs a key of at least {fscrypt.MIN_POLICY_KEY_SIZE} bytes")


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
        # called with a key's identifier once its secret is zeroed: whoever caches keys derived
        # from it (a directory's names key) zeroes them too
        self.on_wipe: list[Callable[[bytes], None]] = []

    @property
    def removal_steps(self) -> tuple[Step, ...]:
        return REMOVAL[self.mode]

    def _transition(self, mk: MasterKey, event: Event, apply: Callable[[], object], busy_after: bool,
                    secret: bytearray | None = None) -> State:
        """Take the table's row for (state, event, ``busy_after``): do its action, then check the
        derived state landed where the row says. ``secret``: the copy an ADD brings."""
        before = mk.state
        row = TRANSITIONS.get((before, event, busy_after))
        if row is None:
            raise AssertionError(f"keyring: no transition for {before} --{event}--> (leases remain: {busy_after})")
        after, action = row
        if action is Do.REFUSE:
            raise NoKeyError("Required key not available")
        if action is Do.STORE:
            mk.secret = secret
        elif action is Do.KEEP and secret is not None:
            fscrypt.wipe(secret)
        elif action is Do.ZERO:
            self._wipe(mk)
        apply()
        if mk.state is not after:
            raise AssertionError(f"keyring: illegal transition {before} --{event}--> {mk.state} (table: {after})")
        if after is St.ABSENT:
            self.keys.pop(mk.identifier, None)
            if event is Ev.RELEASE:
                self.completed.add(mk.identifier)
        return after

    def _wipe(self, mk: MasterKey) -> None:
        if mk.secret is not None:
            fscrypt.wipe(mk.secret)
            self.wiped.append(mk.secret)
            mk.secret = None
            if mk.removal_started is not None:
                self.wipe_delays.append(time.monotonic() - mk.removal_started)
            for hook in self.on_wipe:
                hook(mk.identifier)

    # ------------------------------------------------------------------ ioctls

    def add_key(self, raw: bytes, user: int = 0) -> str:
        if not fscrypt.MIN_KEY_SIZE <= len(raw) <= fscrypt.MAX_KEY_SIZE:
            raise InvalidArgument(f"raw key must be {fscrypt.MIN_KEY_SIZE} to {fscrypt.MAX_KEY_SIZE} bytes, got {len(raw)}")
        ident = fscrypt.key_identifier(raw)
        self.completed.discard(ident)
        mk = self.keys.get(ident)
        if mk is None:
            mk = self.keys[ident] = MasterKey(ident, None)

        def apply() -> None:
            mk.users.add(user)
            mk.deny_dirtying = False
            mk.removal_started = None

        self._transition(mk, Ev.ADD, apply, bool(mk.leases), secret=bytearray(raw))
        return ident.hex()

    def begin_removal(self, key_id: str | bytes, user: int = 0, all_users: bool = False) -> tuple[MasterKey | None, bool]:
        """Drop the claim(s). Returns (key, removal_started); other claims remaining -> not started;
        (None, True) for a retry of a removal that has completed since. The caller then takes
        ``removal_steps`` in order (``step`` does the keyring's own).

        ENOKEY when the key is unknown, or the caller has no claim while others do."""
        ident = parse_identifier(key_id)
        mk = self.keys.get(ident)
        if mk is None and ident in self.completed:
            self.completed.discard(ident)
            return None, True
        if mk is None:
            raise NoKeyError(f"Required key not available: key {ident.hex()} is not on this mount's keyring")
        if mk.users and not all_users and user not in mk.users:
            raise NoKeyError(f"Required key not available: user {user} has no claim to key {ident.hex()} "
                             f"(users {', '.join(map(str, sorted(mk.users)))} have: {OTHERS_HOLD})")
        if mk.users and not all_users and mk.users - {user}:
            self._transition(mk, Ev.REMOVE_CLAIM, lambda: mk.users.discard(user), bool(mk.leases))
            return mk, False
        if mk.state is St.PRESENT:
            mk.removal_started = time.monotonic()
        self._transition(mk, Ev.REMOVE_LAST, mk.users.clear, bool(mk.leases))
        return mk, True

    def step(self, mk: MasterKey, step: Step) -> None:
        """The keyring's own removal steps; the filesystem does WRITE_BACK and LOCK_IDLE."""
        if self.keys.get(mk.identifier) is not mk:  # the last lease went meanwhile: wiped and gone (and maybe added anew)
            return
        if step is Step.DENY_DIRTYING:
            mk.deny_dirtying = mk.state is not St.PRESENT
        elif step is Step.WIPE:
            self._transition(mk, Ev.WIPE, lambda: None, bool(mk.leases))
        else:
            raise AssertionError(f"keyring: {step} is the filesystem's step")

    def removal_result(self, mk: MasterKey, lost: dict[int, int] | None = None, wiped_loss: bool = False) -> RemovalResult:
        """The removal's result, taken once its steps are done; ``lost``: the bytes the filesystem's
        write back steps dropped, per inode that lost any; ``wiped_loss``: some of it was dropped by
        a write back after the wipe (hard's, or what sync's window dirtied), else only an I/O
        error's, which no wipe is blamed for. A removal that leaves no busy file
        owes no retry a success: its own lock step released the last lease (so ``completed``
        holds the key), but the kernel would have dropped the key within the call, and a second
        removal is ENOKEY there -- it succeeded here, with the status already ``Absent``."""
        if not mk.leases:
            self.completed.discard(mk.identifier)
        lost = lost or {}
        return RemovalResult(mk.identifier.hex(), files_busy=bool(mk.leases),
                             wiped_by=self.mode if mk.state is St.WIPED or wiped_loss else None,
                             lost_bytes=sum(lost.values()), lost_files=len(lost))

    def key_status(self, key_id: str | bytes, user: int = 0) -> KeyStatus:
        mk = self.keys.get(parse_identifier(key_id))
        if mk is None:
            return KeyStatus(St.ABSENT)
        if mk.state is St.PRESENT:
            return KeyStatus(St.PRESENT, len(mk.users), user in mk.users)
        return KeyStatus(mk.state)

    # ------------------------------------------------------------------ leases

    def lease(self, ident: bytes, ino: int) -> None:
        """Unlock inode ``ino``: only while the key is present (or ``ino`` already holds a lease)."""
        mk = self.keys.get(ident)
        if mk is None:
            raise NoKeyError("Required key not available")
        if ino not in mk.leases:
            self._transition(mk, Ev.LEASE, lambda: mk.leases.add(ino), True)

    def holds(self, ident: bytes, ino: int) -> bool:
        mk = self.keys.get(ident)
        return mk is not None and ino in mk.leases

    def holders(self, ident: bytes) -> list[int]:
        """The inodes holding a lease on the key, as a list: locking releases them while a caller walks it."""
        mk = self.keys.get(ident)
        return list(mk.leases) if mk is not None else []

    def release(self, ident: bytes, ino: int) -> None:
        mk = self.keys.get(ident)
        if mk is not None and ino in mk.leases:
            self._transition(mk, Ev.RELEASE, lambda: mk.leases.discard(ino), len(mk.leases) > 1)

    def is_present(self, ident: bytes) -> bool:
        mk = self.keys.get(ident)
        return mk is not None and mk.state is St.PRESENT

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
