"""The ``blockemu`` command (DESIGN §6). Errors are one line on stderr,
``blockemu: <what>: <why>``; set BLOCKEMU_DEBUG=1 for the traceback. With --json
(or --output-format json) an error is also a JSON object on stdout,
``{"error": {"command", "errno", "code", "message"}}``: fio and btrfs print their
errors as text on stderr, and a pipeline parsing stdout then gets valid JSON too."""
from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import functools
import io
import json
import os
import re
import signal
import stat
import sys
import textwrap
import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NoReturn

from blockemu.check.exitcodes import EXIT_CORRECTED, EXIT_OPERATIONAL, EXIT_UNCORRECTED, EXIT_USAGE
from blockemu.cli.collector import collect_less
from blockemu.cli.stdio import hold_closed, is_closed
from blockemu.cli.terminate import Terminated, terminated_as_interrupted
from blockemu.cli.textout import print_any_name
from blockemu.display import wanted as progress_wanted
from blockemu.errors import BlockemuError, ExistsError, InvalidArgument, IsADirectory, NoKeyError, NotADirectory, NotFoundError
from blockemu.ondisk.structs import CSUM_TREE_OBJECTID
from blockemu.units import human, parse_size

# Each command imports the layers it runs where it runs (``fsck`` needs no event loop, no
# workload, no FUSE, no Ray): this module itself imports nothing heavy.
if TYPE_CHECKING:
    from blockemu.workload.campaign import Campaign, Summary
    from blockemu.workload.keyrace import RaceResult

# every command but fsck: 1 failure, 2 usage error (argparse's convention)
CMD_FAILURE, CMD_USAGE = 1, 2
DEFAULT_OPS = 300  # stress --ops: a flag given is told from the default (the free race takes none)
MIX_TASKS = 4  # stress --tasks, told from the default in the same way (the race takes none)


class UsageError(Exception):
    """A command line blockemu will not run: ``why``, printed in argparse's one form, ``blockemu:
    usage: blockemu CMD [ACTION]: why`` -- ``prog`` is the (sub)command's, which ``main`` fills
    in for the checks the commands make themselves after parsing. ``code``: the exit status when
    it is not the command's usage error's (a program whose status blockemu copies says so)."""

    def __init__(self, why: str, prog: str | None = None, code: int | None = None) -> None:
        super().__init__(why)
        self.why, self.prog, self.code = why, prog, code


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def count(least: int, most: int | None = None, why: str = "") -> Callable[[str], int]:
    """An integer flag within bounds: out of them, a usage line naming the bound -- not a
    traceback deep in the run, nor a run that silently does nothing."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < least or (most is not None and n > most):
            bound = f"at least {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"{n} is out of range: {bound}{why}")
        return n
    return parse


def mountpoint_arg(text: str) -> str:
    """MOUNTPOINT of mount, umount and key: an empty one (``"$MNT"`` unset) was made absolute as the
    working directory, so ``mount`` served the image over it and ``umount``/``key`` acted on its
    mount; mount(8) refuses it as a mount point that does not exist."""
    if not text:
        raise argparse.ArgumentTypeError("'' is no mount point (an empty argument; mount(8) refuses it too)")
    return text


def key_identifier_arg(text: str) -> str:
    """``--id``: 32 hex digits, checked as the other flags are (a usage line, exit 2), before
    the command asks the mount."""
    from blockemu.crypto.keyring import parse_identifier

    try:
        return parse_identifier(text).hex()
    except InvalidArgument:
        raise argparse.ArgumentTypeError(f"{text!r} is not a key identifier (32 hex digits)") from None


def above_zero(unit: str, short: str) -> Callable[[str], float]:
    """A positive number of ``unit``: --duration 0 used to mean "not given" (and ran the default op
    count), --max-rss -1 failed every image ("over -1 MB")."""
    def parse(text: str) -> float:
        try:
            n = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not n > 0:
            raise argparse.ArgumentTypeError(f"{text} is out of range: more than 0 {short}")
        return n
    return parse


seconds = above_zero("seconds", "seconds")
megabytes = above_zero("megabytes", "MB")


def fault_spec(text: str) -> str:
    """--faults checked where it is parsed: a bad spec is a usage error (exit 2), as a count out
    of range is, not a failure found once the image is made."""
    from blockemu.device.faultplan import FaultPlan

    try:
        FaultPlan.parse(text)
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def span(text: str) -> tuple[int, int]:
    """``A..B`` for --seeds, --workloads, --only: parse_range's complaint as the usage line."""
    from blockemu.workload.campaign import parse_range

    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_progress_flags(p: argparse.ArgumentParser, *, json: bool = True) -> None:
    """--progress/--no-progress; neither: a bar only on a terminal (and never with --json).
    ``json`` False: the command has no --json, so its help does not name one (mkfs's did)."""
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help=f"draw a progress bar (default: only on a terminal{', never with --json' * json})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="draw no progress bar")


def name_actions(sub: Any) -> None:
    """A missing action is named by its choices, '{dump-super,dump-tree,heatmap}': argparse names
    it by its dest, and `blockemu inspect` said 'the following arguments are required: what'."""
    sub.metavar = "{" + ",".join(sub.choices) + "}"


def add_json_flag(p: argparse.ArgumentParser, what: str) -> None:
    """--json: every command says the same of it, so that a pipeline knows errors come as JSON too."""
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON document on stdout (an error too: {{\"error\": ...}})")


class _Version(argparse.Action):
    """--version, looked up when asked for: importlib.metadata takes a good part of every
    command's start (a tenth of a large fsck's wall over btrfs check's)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        from importlib.metadata import version

        parser._print_message(f"blockemu {version('blockemu')}\n", sys.stdout)  # on stdout, as argparse's own action
        parser.exit()


def build_parser(command: str | None = None, prog: str | None = None) -> Parser:
    """The parser. With ``command``, only that subcommand's arguments are declared (the others are
    listed, for --help): declaring some imports their layer, and a command imports only its own.
    ``prog`` names that command as it was run (``fsck.blockemu``), so its usage says so."""
    p = Parser(prog="blockemu", description="Block-device emulator with a btrfs-like encrypted COW filesystem.")
    p.add_argument("--version", action=_Version, nargs=0, help="show program's version number and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (text, declare) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=text, **({"prog": prog} if prog and name == command else {}))
        if command is None or command == name:
            declare(sp)
            if prog in PROG_FLAGS and command == name:
                PROG_FLAGS[prog](sp)
    return p


KEY_BYTES = "raw key bytes (16-64; -: standard input)"
KEY_TO_READ = f"{KEY_BYTES} of an encrypted directory on the path"
SEED_HELP = "seed of every random choice (default: a random one, printed)"


def size_text(text: str) -> str:
    """A SIZE flag that must parse (K/M/G/T): one that does not is a usage error (exit 2), as
    any flag argparse cannot read -- ``mkfs --size abc`` exited 1. Kept as written, so that a
    size out of range (too small, a node size not a power of two) is named as the user gave it."""
    try:
        parse_size(text)
    except BlockemuError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def args_mkfs(m: argparse.ArgumentParser) -> None:
    m.add_argument("image")
    m.add_argument("--size", required=True, type=size_text, help="image size, K/M/G/T/P suffixes")
    m.add_argument("--node-size", type=size_text, default="16K",
                   help="tree block size, a power of two from 4K to 64K (default 16K)")
    m.add_argument("--csum", default="crc32c", choices=["crc32c", "xxhash64", "sha256", "blake2b"],
                   help="checksum of tree blocks and data sectors (default crc32c)")
    m.add_argument("--label", default="", help="the filesystem's label")
    m.add_argument("--uuid", help="the filesystem's UUID (default: a random one)")
    m.add_argument("--force", action="store_true", help="overwrite an existing non-empty image")
    m.add_argument("--rootdir", help="populate the image from this host directory")
    m.add_argument("--encrypt", metavar="PATH", help="directory inside the image to encrypt (needs --key-file); made, with its "
                   "parents, where --rootdir has none")
    m.add_argument("--key-file", help=f"{KEY_BYTES} for --encrypt")
    m.add_argument("--preallocate", action="store_true",
                   help="write every byte of the image once (zeros), as qemu-img's preallocation=full: its flushes "
                        "then measure the device, not the host allocating a sparse file's blocks (the image takes "
                        "its whole size on the host at once)")
    add_progress_flags(m, json=False)


def args_fsck(f: argparse.ArgumentParser) -> None:
    f.add_argument("image")
    add_json_flag(f, "the findings")
    f.add_argument("--check-data", action="store_true", help="verify every data sector against its checksum")
    f.add_argument("--repair", action="store_true", help="repair what can be repaired (writes the image; "
                   "without it fsck only reads)")
    f.add_argument("--key-file", help="also check that the names this key encrypts decrypt to legal names")
    add_progress_flags(f)


def args_e2fsck(f: argparse.ArgumentParser) -> None:
    """e2fsck's flags, as fsck(8) passes them to ``fsck.TYPE`` (``-a``/``-p`` at boot, ``-n`` to
    check, ``-C FD`` for progress): ``fsck.blockemu`` copies e2fsck's name and exit codes, so it
    takes them too (they were usage errors). Each mode is recorded apart, for e2fsck refuses two
    of them (``e2fsck_modes``). ``blockemu fsck`` keeps its own flags only."""
    f.add_argument("-y", dest="modes", action="append_const", const="-y", help="same as --repair (e2fsck's)")
    f.add_argument("-p", "-a", dest="modes", action="append_const", const="-p", help="same as --repair (e2fsck's preen)")
    f.add_argument("-n", dest="modes", action="append_const", const="-n", help="check only, never write (the default)")
    f.add_argument("-f", dest="force", action="store_true", help="accepted: every check is full")
    f.add_argument("-C", dest="progress_fd", type=progress_fd, metavar="FD",
                   help="0: a progress bar, if stderr is a terminal; any other: none (e2fsck's progress lines are not written)")


class NonNumeric(str):
    """``-C``'s argument with no number to read: refused after parsing (``e2fsck_modes``)."""


def progress_fd(text: str) -> int | NonNumeric:
    """``-C FD`` as e2fsck reads it, ``sscanf("%d")``: the leading number, blanks and a sign
    before it, anything after it ignored (``-C 3x`` is FD 3); none at all is e2fsck's own
    refusal, not argparse's usage error (exit 16, where e2fsck exits 1). ASCII blanks and digits
    only (``re.ASCII``), as C's isspace and %d know them: Python's ``\\d`` took ``-C`` U+0663 (an
    Arabic-Indic three) for FD 3."""
    digits = re.match(r"\s*[+-]?\d+", text, re.ASCII)
    return int(digits[0]) if digits else NonNumeric(text)


def e2fsck_modes(a: argparse.Namespace) -> None:
    """Fold ``fsck.blockemu``'s e2fsck flags into ``fsck``'s: ``-y`` and ``-p``/``-a`` repair,
    ``-n`` only checks, and at most one of the three may be given, as e2fsck says (``--repair``
    counts as ``-y``): ``-p -y`` repaired, while e2fsck refuses it. Its exit then is 8, not its
    usage error's 16: e2fsck says it through ``fatal_error``, which exits FSCK_ERROR (e2fsprogs
    ``e2fsck/unix.c`` PRS, ``util.c``). ``-C FD``: fsck(8) passes it for progress; a bar only for
    FD 0 (on a terminal, as without it), else none; another FD must be open (its absolute value:
    a negative one only turns e2fsck's progress off), or e2fsck refuses it, with ``fatal_error``
    too ("Invalid completion information file descriptor")."""
    modes = set(getattr(a, "modes", None) or ()) | ({"-y"} if a.repair else set())
    if len(modes) > 1:
        raise InvalidArgument("only one of the options -p/-a, -n or -y (--repair) may be specified")
    a.repair = bool(modes - {"-n"})
    fd = getattr(a, "progress_fd", None)
    if isinstance(fd, NonNumeric):  # e2fsck's PRS: "Invalid non-numeric argument to -C", exit(1)
        raise UsageError(f'invalid non-numeric argument to -C ("{fd}")', code=1)
    if fd:
        try:
            os.fstat(abs(fd))
        except (OSError, OverflowError):  # a number past a C int names no descriptor either (a traceback)
            raise InvalidArgument(f"-C {fd}: invalid completion information file descriptor: "
                                  f"descriptor {abs(fd)} is not open ({os.strerror(errno.EBADF)})") from None
        if a.progress is None:
            a.progress = False


# the commands' extra flags under another name: fsck(8)'s fsck.TYPE calling convention
PROG_FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"fsck.blockemu": args_e2fsck}


def args_ls(ls: argparse.ArgumentParser) -> None:
    ls.add_argument("image")
    ls.add_argument("path", nargs="?", default="/")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing: mode, links, owner and group "
                    "(numbers, as ls -n), size, time")
    ls.add_argument("-U", dest="unsorted", action="store_true", help="directory order (readdir's: the order "
                    "names were made in), as ls -U; else sorted by name's bytes, as LC_ALL=C ls")
    add_json_flag(ls, "the entries")
    ls.add_argument("--key-file", help="show real names in directories this key encrypts (else no-key names)")


def args_cat(cat: argparse.ArgumentParser) -> None:
    cat.add_argument("image")
    cat.add_argument("path")
    cat.add_argument("--key-file", help=KEY_TO_READ)


def args_put(put: argparse.ArgumentParser) -> None:
    put.add_argument("image")
    put.add_argument("hostfile", help="the file to copy; - (or a pipe, a device): read to its end")
    put.add_argument("path", help="its path in the image (replaced whole, atomically)")
    put.add_argument("--key-file", help=KEY_TO_READ)


def args_mkdir(mk: argparse.ArgumentParser) -> None:
    mk.add_argument("image")
    mk.add_argument("path")
    mk.add_argument("--encrypt", action="store_true", help="make it an encrypted directory (needs --key-file)")
    mk.add_argument("--key-file", help=f"{KEY_BYTES}: --encrypt's key, or that of an encrypted parent")


def args_extents(ex: argparse.ArgumentParser) -> None:
    ex.add_argument("image")
    ex.add_argument("path")
    ex.add_argument("--key-file", help="to name a file by its real name in an encrypted directory (else its no-key name)")
    add_json_flag(ex, "the extents")


def args_key_id(kid: argparse.ArgumentParser) -> None:
    kid.add_argument("--key-file", required=True, help=KEY_BYTES)


def args_run(rn: argparse.ArgumentParser) -> None:
    from blockemu.crypto.keyring import MODES
    from blockemu.workload.jobfile import parse_time
    from blockemu.workload.jobfile import size as fio_size

    rn.add_argument("workload", nargs="?", help="an fio job file (-: standard input, as fio -) or a built-in "
                                                "scenario's name (--list)")
    rn.add_argument("--image", help="image to run on (created if missing), kept afterwards; default: a scratch "
                                    "image, deleted after the run (the report says \"scratch image (deleted)\")")
    rn.add_argument("--seed", type=int, help=SEED_HELP)
    rn.add_argument("--json", action="store_true", help="same as --output-format json")
    rn.add_argument("--output-format", type=output_formats, default=["normal"],
                    help="normal, json, json+ or terse; several comma-separated, as fio")
    rn.add_argument("--runtime", type=fio_value(parse_time), help="override every job's runtime (fio's units)")
    rn.add_argument("--size", type=fio_value(fio_size, positive=True), help="override every job's size")
    rn.add_argument("--key-removal", choices=MODES, help="override the mount's key_removal= and every keyrace "
                    "job's (e.g. generic-595 under each mode)")
    rn.add_argument("--preallocate", action="store_true", help="make the image laid out whole (mkfs --preallocate), "
                    "as a real disk has every block: fsyncs then pay no host allocation (an existing --image is used as "
                    "it is)")
    rn.add_argument("--list", action="store_true", help="list the built-in scenarios")
    rn.add_argument("--parse-only", action="store_true", help="check the job file (as fio --parse-only), run nothing")


def add_keep_failed(p: argparse.ArgumentParser, what: str) -> None:
    """A campaign's --keep-failed DIR: ``what`` it writes there."""
    p.add_argument("--keep-failed", metavar="DIR",
                   help=f"write {what}, for inspect and fsck; with --ray, DIR must be an absolute path every node "
                        "reaches (a shared file system): each shard's worker writes there, on its own node")


def keep_failed_dir(a: argparse.Namespace) -> str | None:
    """--keep-failed DIR as an absolute path, made; refused relative with --ray: Ray's workers
    write the images on the node that ran the shard, from a cwd of Ray's, so a relative DIR,
    resolved here, names a place only this machine is sure to have."""
    if not a.keep_failed:
        return None
    if a.ray is not None and not os.path.isabs(a.keep_failed):
        raise UsageError(f"--keep-failed {a.keep_failed} with --ray: give an absolute DIR that every node reaches "
                         f"(a shared file system): each shard's worker writes its images on its own node")
    keep = os.path.abspath(a.keep_failed)
    os.makedirs(keep, exist_ok=True)
    return keep


def args_stress(sp: argparse.ArgumentParser) -> None:
    from blockemu.crypto.keyring import MODES

    sp.add_argument("image", nargs="?", help="the image to stress (created if missing; not with --seeds)")
    sp.add_argument("--scenario", choices=["mix", "key-removal-race"], default="mix",
                    help="mix (default): a seeded random mix checked against an oracle; key-removal-race: "
                         "generic/595's race")
    sp.add_argument("--seed", type=int, help=SEED_HELP)
    sp.add_argument("--seeds", type=span, metavar="A..B",
                    help="a campaign: seeds A up to B (excluded), each on a fresh image made by its worker")
    sp.add_argument("--duration", type=seconds, help="seconds (instead of --ops)")
    sp.add_argument("--ops", type=count(1), help=f"operations per task (mix, default {DEFAULT_OPS}; the summary's "
                    f"ops are all tasks') or steps (key-removal-race with --schedule seeded, default {DEFAULT_OPS})")
    sp.add_argument("--tasks", type=count(1), help=f"mix: concurrent tasks (default {MIX_TASKS})")
    sp.add_argument("--key-removal", choices=list(MODES),
                    help="key-removal-race: the removal mode (default soft; the mix uses no key)")
    sp.add_argument("--faults", type=fault_spec,
                    help="e.g. eio=200M-210M:w,latency=0.001,flip=0.0001,torn=0.5,cut=5000; flip= is injected "
                         "corruption: reads that catch it by checksum, and fsck findings that go away with the "
                         "flips undone (fsck of a copy with each flipped bit set back), count as detected "
                         "corruption, listed, not failures; data read back wrong without an error, or any other "
                         "fsck finding, fails the run (exit 1)")
    sp.add_argument("--crash-points", type=count(0), help="also check N crash states of a logged mix")
    add_keep_failed(sp, "each failing seed's image (as the run left it) to DIR/seed-N.img, with --seeds: a rerun "
                        "does not repeat a run's timing, so the image is the failure's record")
    add_write_path(sp, "mix", told_apart=True)
    sp.add_argument("--compare-modes", action="store_true", help="key-removal-race: every removal mode, one table")
    sp.add_argument("--schedule", choices=["free", "seeded"], help="key-removal-race scheduling (default free)")
    sp.add_argument("--force", action="store_true", help="key-removal-race: overwrite IMAGE with a fresh image")
    sp.add_argument("--kernel-peer", nargs="?", const="", metavar="DIR",
                    help="key-removal-race: also race the real kernel, on DIR (an encryption-enabled filesystem) "
                         "or, as root, on a fresh loop-mounted ext4 image")
    sp.add_argument("--report", metavar="DIR", help="key-removal-race: also write the table (JSON, CSV) and plots into "
                    "DIR, with a sweep of append sizes under hard removal")
    add_json_flag(sp, "the summary")
    add_campaign_flags(sp, jobs=None)


def args_crash(cr: argparse.ArgumentParser) -> None:
    cr.add_argument("--max-ops", type=count(1, 6, " (7 operations make 11 million workloads, held in memory)"), default=3, help="longest operation sequence (Ace's bound)")
    cr.add_argument("--seed", type=int, default=0, help="seed of the sampling and write subsets (default 0)")
    cr.add_argument("--subsets", type=count(0), default=2, help="random in-doubt write subsets per crash point")
    cr.add_argument("--limit", type=count(1), help="check a random sample of this many workloads")
    cr.add_argument("--groups", type=count(0), help="also N workloads of tasks fsyncing files at once (their fsyncs "
                    "share log syncs), after Ace's (default: one per 10 of those, at least one)")
    cr.add_argument("--nobarrier", action="store_true", help="plant the ordering bug (flushes ignored)")
    cr.add_argument("--workloads", type=span, metavar="A..B",
                    help="only workloads A up to B (excluded) of the space (a failure's reproduce line names one)")
    cr.add_argument("--shard-size", type=count(1), default=10, help="workloads per shard (a few seconds of work)")
    add_keep_failed(cr, "the first failing crash state of each failing workload to DIR/workload-N.img "
                        "(N: its reproduce line's --workloads)")
    cr.epilog = ("A failure names its crash state: upto=N is the number of write-log entries (writes, "
                 "flushes) completed before the power cut; keep=[...] the in-doubt writes among them "
                 "(sequence numbers: not yet made durable by a flush) that landed anyway, the others "
                 "lost; torn={write: [sectors]} a kept write of which only those sectors landed; "
                 "split={write: (a, b)} one of which only bytes [a, b) landed. The crash states of your "
                 "own workload: Filesystem.start_write_log in the Python API (DESIGN.md section 8).")
    add_write_path(cr, "campaign")
    add_json_flag(cr, "the counts and failures")
    add_campaign_flags(cr, jobs=os.cpu_count() or 1)


def args_mount(mo: argparse.ArgumentParser) -> None:
    from blockemu.crypto.keyring import MODES

    mo.add_argument("image")
    mo.add_argument("mountpoint", type=mountpoint_arg)
    mo.add_argument("--key-file", action="append", default=[], help="add this key at mount (repeatable)")
    mo.add_argument("--key-removal", choices=list(MODES), default="soft",
                    help="what removing a key does to files still using it (default soft: they keep working)")
    mo.add_argument("-o", dest="options", action="append", default=[],
                    help="mount options: ro, rw, allow_other (users other than the mounting one get in, as the "
                         "file modes allow), and the API's " + ", ".join(f"{k}=" for k in mount_option_parsers()))
    mo.add_argument("--foreground", "-f", action="store_true", help="serve in this process until unmounted")


def args_umount(um: argparse.ArgumentParser) -> None:
    um.add_argument("mountpoint", type=mountpoint_arg)


KEY_ACTIONS = {"add": "add a key to the mount's keyring (as FS_IOC_ADD_ENCRYPTION_KEY); prints its identifier",
               "remove": "remove your (or --user's) claim to a key; the last claim's removal starts the "
                          "--key-removal mode's steps",
               "status": "print a key's status (Present, Incompletely removed, Absent)"}


def args_key(ky: argparse.ArgumentParser) -> None:
    ksub = ky.add_subparsers(dest="action", required=True, parser_class=Parser)
    for action, text in KEY_ACTIONS.items():
        kp = ksub.add_parser(action, help=text)
        kp.add_argument("mountpoint", type=mountpoint_arg)
        kp.add_argument("--key-file", required=action == "add", help=KEY_BYTES)
        if action != "add":
            kp.add_argument("--id", type=key_identifier_arg, help="the key identifier (32 hex digits) instead of --key-file")
        if action == "remove":
            kp.add_argument("--all-users", action="store_true", help="remove every user's claim, not only yours")
        kp.add_argument("--user", type=count(0, 0xFFFFFFFE, " (a uid)"), default=os.getuid(),
                        help="the claiming user (default: you)")
        add_json_flag(kp, "the result's fields and xfs_io's line")
    name_actions(ksub)


def args_fuzz(fz: argparse.ArgumentParser) -> None:
    fz.add_argument("--structural", action="store_true",
                    help="valid checksums over hostile structures, each image through ls, cat, mkdir, inspect, fsck")
    fz.add_argument("--trials", type=count(1), default=2000, help="byte flips")
    fz.add_argument("--images", type=count(1), default=2000, help="--structural: mutated images")
    fz.add_argument("--seed", type=int, default=1, help="seed of the flips and mutations (default 1)")
    fz.add_argument("--recsum", action="store_true", help="recompute the block checksum after each flip")
    fz.add_argument("--max-rss", type=megabytes, default=300, help="MB; --structural fails an image whose commands grow the process by more")
    fz.add_argument("--only", type=span, metavar="A..B", help="only trials (or images) A up to B (excluded)")
    fz.add_argument("--shard-size", type=count(1), help="trials (100) or images (20) per shard")
    add_json_flag(fz, "the counts and failures")
    add_campaign_flags(fz, jobs=os.cpu_count() or 1)


def args_inspect(i: argparse.ArgumentParser) -> None:
    from blockemu.check import inspect as inspect_mod

    isub = i.add_subparsers(dest="what", required=True, parser_class=Parser)
    ds = isub.add_parser("dump-super", help="print the primary superblock's fields")
    ds.add_argument("image")
    add_json_flag(ds, "every field")
    dt = isub.add_parser("dump-tree", help="print tree blocks and their items (btrfs inspect-internal dump-tree)")
    dt.add_argument("image")
    dt.add_argument("--tree", choices=list(inspect_mod.TREE_BY_NAME), action="append",
                    help="only this tree (repeatable; default: every tree)")
    add_json_flag(dt, "the blocks")
    hm = isub.add_parser("heatmap", help="draw what occupies each block (a Hilbert curve, like btrfs-heatmap)")
    hm.add_argument("image")
    hm.add_argument("out", help="the PNG to write")
    hm.add_argument("--json", action="store_true", help="also print the map as data (counts, run-length classes)")
    name_actions(isub)


def args_rescue(rs: argparse.ArgumentParser) -> None:
    rsub = rs.add_subparsers(dest="what", required=True, parser_class=Parser)
    zl = rsub.add_parser("zero-log", help="drop the fsync log (what was fsynced since the last commit is lost)")
    zl.add_argument("image")
    add_json_flag(zl, "what was done")
    ub = rsub.add_parser("use-backup-root", help="go back to the newest backup root set that reads whole "
                                                 "(every change after its generation is lost)")
    ub.add_argument("image")
    add_json_flag(ub, "what was done")
    name_actions(rsub)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "mkfs": ("create a filesystem image", args_mkfs),
    "fsck": ("check an image (read-only unless --repair)", args_fsck),
    "ls": ("list a directory inside an image", args_ls),
    "cat": ("write a file of the image to stdout", args_cat),
    "put": ("copy a host file into the image", args_put),
    "mkdir": ("make a directory, optionally encrypted", args_mkdir),
    "extents": ("show a file's extents", args_extents),
    "key-id": ("print the fscrypt v2 identifier of a raw key", args_key_id),
    "run": ("run a workload: an fio job file or a built-in scenario", args_run),
    "stress": ("hammer an image with a seeded random mix (or the key-removal race)", args_stress),
    "crash": ("crash-consistency campaign over Ace-style bounded workloads", args_crash),
    "mount": ("mount an image through FUSE (backgrounds once mounted)", args_mount),
    "umount": ("unmount a blockemu mount: flush, commit, release the image", args_umount),
    "key": ("add, remove or query an fscrypt key of a mounted image (xfs_io's texts)", args_key),
    "fuzz": ("fuzz campaign: byte flips (or --structural mutations) against fsck and the CLI", args_fuzz),
    "inspect": ("dump on-disk structures", args_inspect),
    "rescue": ("last-resort fixes fsck --repair does not make by itself (btrfs rescue)", args_rescue),
}


def add_write_path(p: argparse.ArgumentParser, what: str, *, told_apart: bool = False) -> None:
    """``told_apart``: no default (None), so that the command can tell the flag given from
    its default and refuse it where it would be ignored; the command then sets production."""
    from blockemu.workload.writepath import PRODUCTION, WRITE_PATHS

    p.add_argument("--write-path", choices=list(WRITE_PATHS), default=None if told_apart else PRODUCTION.name,
                   help=f"production (default): the {what} writes large encrypted files through sealing workers "
                        "into 1 MiB extents; fast: 16 KiB extents sealed in a thread, small plain files")


def add_campaign_flags(p: argparse.ArgumentParser, jobs: int | None) -> None:
    """Where a campaign's shards run, and where their results stream (DESIGN §6, campaigns).
    ``jobs`` None: the command tells a --jobs given from none, and sets the default itself."""
    p.add_argument("--jobs", type=count(1), default=jobs, help="local processes (without --ray)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the shards on Ray: alone, a local instance; 'auto' or HOST:PORT joins a cluster "
                        "(pip install 'blockemu[ray]')")
    p.add_argument("--results", metavar="FILE", help="write each finished shard to FILE as a JSON line")
    p.add_argument("--resume", metavar="FILE", help="skip the shards FILE holds as finished; append the rest to it")
    add_progress_flags(p)


def run_campaign_cli(a: argparse.Namespace, campaign: Campaign) -> Summary:
    """``--jobs`` processes or ``--ray``; without Ray installed, one usage line saying how to get it."""
    from blockemu.workload.campaign import RayMissing, run_campaign
    from blockemu.workload.campaign import executor as campaign_executor

    try:
        ex = campaign_executor(a.jobs, a.ray)
    except RayMissing as e:
        raise UsageError(str(e)) from None
    return run_campaign(campaign, ex, results=a.results or a.resume, resume=a.resume,
                        progress=progress_wanted(a.progress, a.json))


def report_campaign(a: argparse.Namespace, s: Summary, headline: str, unit: str, *,
                    json_extra: dict | None = None, counts: bool = True, again: str = "reproduce") -> int:
    """A finished campaign, as every campaign command reports it: JSON, or the headline, the
    counts and the failures with their reproduce lines; exit 1 when anything failed. ``unit``
    names what the campaign's units are (workloads, seeds, trials); ``again`` what a failure's
    line does: "rerun" where it does not repeat the run (stress seeds, DESIGN §7)."""
    if a.json:
        emit_json({**s.as_json(), **(json_extra or {})})
    else:
        print(headline)
        if counts:
            print("  ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.counts.items()))
        print_failures(s, unit, again)
    return 1 if s.failures else 0


def print_failures(s: Summary, unit: str, again: str = "reproduce", limit: int = 20) -> None:
    """How many units failed, then the first failure of each of the first ``limit``: printed in
    order, a thousand failures of one workload's crash states hid how many workloads failed."""
    by_unit: dict[Any, list[dict[str, Any]]] = {}
    for f in s.failures:
        by_unit.setdefault(f["unit"], []).append(f)
    if not by_unit:
        return
    print(f"{len(by_unit)} of {s.units} {unit} failed:")
    for fails in list(by_unit.values())[:limit]:
        more = f" (and {len(fails) - 1} more failures of it)" if len(fails) > 1 else ""
        print(f"FAILED: {fails[0]['message']}{more}\n  {again} with: {fails[0]['reproduce']}")
    if len(by_unit) > limit:
        print(f"... and {len(by_unit) - limit} more {unit} (every failure, with its {again} line, in --results "
              "or --json)")


def write_path_flag(a: argparse.Namespace) -> str:
    """The option to repeat in a reproduce line: only when it is not the default."""
    from blockemu.workload.writepath import PRODUCTION

    return "" if a.write_path == PRODUCTION.name else f" --write-path {a.write_path}"


def emit_json(obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if "\\udc" in text:  # perhaps a lone surrogate (else a pair's low half): rare, so checked only then
        text = json.dumps(valid_text(obj), indent=2, default=str)
    text += "\n"
    # in pieces the buffered writer takes in, never one large write: handed to the pipe as it is,
    # one cut short by a reader gone away (``| head``) returned the short count without raising,
    # and the command exited 0, not 141 (``write_all``)
    for i in range(0, len(text), io.DEFAULT_BUFFER_SIZE):
        sys.stdout.write(text[i : i + io.DEFAULT_BUFFER_SIZE])


def valid_text(obj: Any) -> Any:
    """``obj`` with every string made text strict parsers take: a path given as bytes that are
    not UTF-8 (an image named so, a file named in a message) is a str with lone surrogate
    escapes in Python, dumped as ``\\udcff``, which strict parsers (serde_json) refuse -- U+FFFD
    stands for each such byte, as in ``json_bytes``'s text (whose ``_base64`` keeps a name's
    exact bytes)."""
    if isinstance(obj, str):
        if obj.isascii():
            return obj
        try:
            obj.encode()
        except UnicodeEncodeError:
            return obj.encode(errors="surrogateescape").decode(errors="replace")
        return obj
    if isinstance(obj, dict):
        return {valid_text(k): valid_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [valid_text(v) for v in obj]
    return obj


def json_bytes(row: dict[str, Any], *fields: str) -> dict[str, Any]:
    """Names that are not UTF-8 (Linux names are bytes) in JSON every parser takes: the field as
    text with U+FFFD for each byte that is no UTF-8, and ``FIELD_base64`` beside it holding the
    bytes exactly, as ripgrep's JSON gives arbitrary bytes (a lone surrogate escape, Python's
    view of such a name, is refused by strict parsers)."""
    out: dict[str, Any] = {}
    for name in fields:
        value = row[name]
        if value is None:
            continue
        raw = value.encode(errors="surrogateescape")
        text = raw.decode(errors="replace")
        if text != value:
            out[name], out[f"{name}_base64"] = text, base64.b64encode(raw).decode()
    return out


KEYS_READ: list[bytearray] = []  # every key this command read: ``main`` wipes them when it ends


def read_key(path: str | None) -> bytearray | None:
    """The raw key in ``--key-file PATH``; ``-``: standard input, as fscryptctl add_key reads it
    (a key piped from a secret store never lands in a file). A ``bytearray`` read with no
    buffer in between, so whoever keeps it -- the mount's server, for the life of the mount --
    can wipe it once the keyring holds its own copy: a ``bytes`` key outlived its removal. Every
    command reads its keys here, and ``main`` wipes each one when the command ends, however it
    ends (``wipe_keys_read``): one-shot commands and the ``key`` client kept theirs unwiped."""
    if path is None:
        return None  # before the import: fsck without a key loads no cipher
    from blockemu.crypto.fscrypt import MAX_KEY_SIZE, MIN_KEY_SIZE

    try:
        if path == "-":
            raw = stdin_key(MAX_KEY_SIZE + 1)
        else:
            with open(path, "rb", buffering=0) as f:
                raw = read_secret(f, MAX_KEY_SIZE + 1)
    except OSError as e:  # its own errno (ENOENT, EACCES, EISDIR), which --json reports: it said EIO
        raise OSError(e.errno, f"--key-file {path}: {e.strerror}") from None
    KEYS_READ.append(raw)
    if not MIN_KEY_SIZE <= len(raw) <= MAX_KEY_SIZE:
        # read only to one byte past the largest key: that count is no file's size ("has 65" of 100)
        has = len(raw) if len(raw) <= MAX_KEY_SIZE else f"more than {MAX_KEY_SIZE}"
        raise InvalidArgument(f"--key-file {path}: a raw key is {MIN_KEY_SIZE} to {MAX_KEY_SIZE} bytes, this file has {has}")
    return raw


def read_secret(f: Any, limit: int) -> bytearray:
    """Up to ``limit`` bytes of the unbuffered file ``f``, into a ``bytearray`` of exactly what
    was read; the one read into is wiped (shrinking it in place could leave a copy behind) --
    also when a read fails part way, which would otherwise leave the key's first bytes behind."""
    from blockemu.crypto.fscrypt import wipe

    buf, n = bytearray(limit), 0
    try:
        while n < limit and (k := f.readinto(memoryview(buf)[n:])):
            n += k
        return buf[:n]
    finally:
        wipe(buf)


@functools.cache
def stdin_key(limit: int) -> bytearray:
    """Standard input, read once: a command reads its key more than once (``ls`` again to say
    which key a directory wants), and a second read of a pipe would find it empty."""
    return read_secret(sys.stdin.buffer.raw, limit)


def wipe_keys_read() -> None:
    """The command is over: zero every key it read (``read_key``). Standard input's is
    forgotten too -- a zeroed key would pass for a key of the same length."""
    if KEYS_READ:
        from blockemu.crypto.fscrypt import wipe

        while KEYS_READ:
            wipe(KEYS_READ.pop())
    stdin_key.cache_clear()


def on_image(a: argparse.Namespace, body: Callable[[Any], Awaitable[int]], *, readonly: bool = False) -> int:
    """Mount the image (adding --key-file's key if given), run ``body(fs)``, unmount.
    ``readonly``: the image is opened O_RDONLY under a shared lock (device/imagelock.py)."""
    import asyncio

    from blockemu.fs.filesystem import mount

    async def go() -> int:
        key = read_key(getattr(a, "key_file", None))
        fs = await mount(a.image, interval=3600, readonly=readonly)
        try:
            kid = await fs.add_key(key) if key is not None else None
            try:
                return await body(fs)
            except NoKeyError as e:
                raise NoKeyError(await explain_no_key(fs, a.path, kid) or await no_key_given(fs, a.path, e)) from None
            except NotFoundError as e:
                # with another key a locked directory's real names do not resolve: say which key it wants
                why = await explain_no_key(fs, a.path, kid)
                if why is not None:
                    raise NoKeyError(why) from None
                # with none, ENOENT as on Linux (only no-key names are there), and the key that shows the real ones
                if kid is None and (wants := await key_wanted(fs, a.path)):
                    raise NotFoundError(f"{e}{wants}") from None
                raise
        finally:
            await fs.unmount()
    return asyncio.run(go())


async def policy_of(fs: Any, path: str) -> tuple[str, str | None] | None:
    """The encryption policy (key identifier, or None) of ``path``, or of its nearest existing
    parent for a file about to be made, with the path it belongs to."""
    while True:
        try:
            return path, await fs.get_policy(path)
        except FileNotFoundError:
            if path.rstrip("/") in ("", "/"):
                return None
            path = path.rstrip("/").rsplit("/", 1)[0] or "/"


async def explain_no_key(fs: Any, path: str, kid: str | None) -> str | None:
    """Which key ``path`` needs when the one given is not it."""
    found = await policy_of(fs, path)
    if kid is None or found is None or found[1] is None or found[1] == kid:
        return None
    return f"key {kid} does not unlock {found[0]} (its encryption policy uses key {found[1]})"


async def no_key_given(fs: Any, path: str, e: OSError) -> str:
    """ENOKEY without --key-file: the path, the kernel's text, and which key to give."""
    return f"{path}: {e.strerror or e}{await key_wanted(fs, path)}"


async def key_wanted(fs: Any, path: str) -> str:
    """' (DIR is encrypted with key K: give that key with --key-file)' for a path in an
    encrypted directory, '' for any other."""
    found = await policy_of(fs, path)
    return f" ({found[0]} is encrypted with key {found[1]}: give that key with --key-file)" if found and found[1] else ""


def cmd_ls(a: argparse.Namespace) -> int:
    async def body(fs: Any) -> int:
        st = await fs.stat(a.path)
        names = await fs.readdir(a.path) if stat.S_ISDIR(st.st_mode) else [a.path.rsplit("/", 1)[-1]]
        if not a.unsorted:  # as ls(1): a listing in creation order read as unsorted output to every user
            names.sort(key=os.fsencode)
        base = a.path.rstrip("/") if stat.S_ISDIR(st.st_mode) else a.path.rsplit("/", 1)[0]
        if a.key_file and stat.S_ISDIR(st.st_mode):
            # the names are listed all the same (no-key names, as without a key), but a key
            # given for them that is not theirs is said, as cat says it
            from blockemu.crypto.fscrypt import key_identifier

            why = await explain_no_key(fs, a.path, key_identifier(read_key(a.key_file)).hex())
            if why is not None:
                print(f"blockemu: ls: {why}; no-key names shown", file=sys.stderr)
        if not (a.long or a.json):
            # names alone need no inode: a bad tree block under some of the directory's inodes
            # failed the whole listing, where fsck --repair's note promises ls lists the rest
            for name in names:
                print(name)
            return 0
        rows, unreadable = [], 0
        for name in names:
            try:
                s = await fs.stat(f"{base}/{name}")
            except OSError as e:  # as ls -l: said, and the listing goes on without it (exit 1)
                print(f"blockemu: ls: {base}/{name}: cannot access: {e.strerror or e}", file=sys.stderr)
                unreadable += 1
                continue
            target = None
            if stat.S_ISLNK(s.st_mode) and (a.long or a.json):
                # as ls -l: a link's target (its no-key form without the key); one that cannot be
                # read (a bad sector under a plain link's target) is said and the listing goes on,
                # as ls(1) does -- it used to fail the whole listing, which names alone never need
                try:
                    target = await fs.readlink(f"{base}/{name}")
                except OSError as e:
                    print(f"blockemu: ls: {base}/{name}: cannot read symbolic link: {e.strerror or e}", file=sys.stderr)
                    unreadable += 1
            rows.append({"name": name, "ino": s.st_ino, "mode": stat.filemode(s.st_mode), "nlink": s.st_nlink,
                         "uid": s.st_uid, "gid": s.st_gid, "size": s.st_size, "mtime_ns": s.st_mtime_ns,
                         "encrypted": await fs.get_policy(f"{base}/{name}") is not None, "target": target})
        if a.json:
            emit_json([{**r, **json_bytes(r, "name", "target")} for r in rows])
        for r in rows if not a.json else ():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["mtime_ns"] / 1e9))
            lock = " (encrypted)" if r["encrypted"] else ""
            arrow = f" -> {r['target']}" if r["target"] is not None else ""
            print(f"{r['mode']} {r['nlink']:>3} {r['uid']:>5} {r['gid']:>5} {r['size']:>12} {when} {r['name']}{arrow}{lock}")
        return 1 if unreadable else 0
    return on_image(a, body, readonly=True)


def cmd_cat(a: argparse.Namespace) -> int:
    from blockemu.ondisk.structs import SECTOR_SIZE

    async def body(fs: Any) -> int:
        async with fs.open(a.path, "r") as f:
            pos, step = 0, CAT_CHUNK
            while True:
                try:
                    chunk = await f.pread(step, pos)
                except OSError as e:
                    if e.errno != errno.EIO or step == SECTOR_SIZE:
                        raise
                    # as cat(1) gives what read() returned before an EIO: from here a sector at a
                    # time, each good one printed, until the bad one raises (a 1 MiB read failed
                    # whole, and a bad sector near the start printed nothing)
                    step = SECTOR_SIZE
                    continue
                if not chunk:
                    break
                write_all(sys.stdout.buffer, chunk)
                pos += len(chunk)
        sys.stdout.buffer.flush()
        return 0
    return on_image(a, body, readonly=True)


CAT_CHUNK = 1 << 20


def write_all(out: Any, data: bytes) -> None:
    """All of ``data``: a BufferedWriter hands a large write to the pipe as it is, and when the
    reader goes away mid-write (``| head``) returns the short count without raising, so the
    broken pipe went unseen and ``cat`` of a file under 1 MiB piped to head exited 0, not 141."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


def cmd_put(a: argparse.Namespace) -> int:
    from blockemu.fs.filesystem import split_path
    from blockemu.fs.mkfs import copy_in, file_id

    async def body(fs: Any) -> int:
        # PATH as given in its errors, not its parent ('put f d1/x' said "'d1': paths are
        # absolute"); the root is a directory ('put f /' said "the root has no parent"), and so
        # is 'x/' whatever x is, as a shell's '> x/' says (the rename over it said "not a directory"
        # of a directory d/); 'x/.' is x, when there is one
        if not split_path(a.path) or a.path.endswith("/"):
            raise IsADirectory(f"{a.path}: is a directory")
        if a.path.endswith("/."):
            await fs.stat(a.path)  # ENOENT, or ENOTDIR for a file
            raise IsADirectory(f"{a.path}: is a directory")
        try:
            src = os.fdopen(os.dup(sys.stdin.fileno()), "rb") if a.hostfile == "-" else open(a.hostfile, "rb")
        except OSError as e:
            raise BlockemuError(f"{a.hostfile}: {e.strerror}") from None
        st = os.fstat(src.fileno())
        if (st.st_dev, st.st_ino) == file_id(a.image):  # `put IMG IMG`, or IMG on standard input
            src.close()
            raise InvalidArgument(f"{a.hostfile}: is the image itself (a copy would read it as it is written)")
        # atomic, as rsync and editors do: the data goes to a new name in the same directory
        # (same encryption policy) and only a complete, fsynced file is renamed over PATH; on
        # any failure (ENOSPC above all) the temporary file goes and PATH is as it was
        parent = a.path.rpartition("/")[0]
        if not stat.S_ISDIR((await fs.stat(parent or "/")).st_mode):  # named, not the temporary file in it
            raise NotADirectory(f"{parent}: not a directory")
        # a name of its own, not PATH's with a suffix: that made a legal name of 242-255 bytes too long
        tmp = f"{parent}/.put-{os.urandom(4).hex()}"
        mode = await put_mode(fs, a.path, src)
        with src:
            f = await fs.open(tmp, "x")
            try:
                async with f:
                    await copy_in(f, src, a.hostfile)
                    if mode is not None:
                        await fs.set_attrs(f.inode, mode=mode)
                    await f.fsync()
                await fs.rename(tmp, a.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    await fs.unlink(tmp)
                raise
        return 0
    return on_image(a, body)


async def put_mode(fs: Any, path: str, src: Any) -> int | None:
    """The permissions put gives PATH, as cp gives them: an existing regular file PATH keeps its
    own, a new one takes a regular host file's less the umask (None: the default, for a pipe or a
    device). Every put made 0644, so a script put into the image did not run on the mount. PATH
    is not followed, so a symbolic link there is replaced, not kept: its 0777 made the file put
    over it world-writable."""
    with contextlib.suppress(FileNotFoundError):
        st = await fs.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    host = os.fstat(src.fileno())
    if not stat.S_ISREG(host.st_mode):
        return None
    umask = os.umask(0)
    os.umask(umask)
    return stat.S_IMODE(host.st_mode) & ~umask


def cmd_mkdir(a: argparse.Namespace) -> int:
    from blockemu.crypto import fscrypt

    if a.encrypt and not a.key_file:
        raise UsageError("--encrypt needs --key-file")

    async def body(fs: Any) -> int:
        await fs.mkdir(a.path)
        if a.encrypt:
            try:
                await fs.set_policy(a.path, fscrypt.key_identifier(read_key(a.key_file)))
            except OSError:
                await fs.rmdir(a.path)  # a refused policy (a key too short) leaves no plain directory behind
                raise
        return 0
    return on_image(a, body)


def cmd_extents(a: argparse.Namespace) -> int:
    async def body(fs: Any) -> int:
        st = await fs.stat(a.path)
        if stat.S_ISDIR(st.st_mode):  # a directory has no extents: an empty table read as an empty file
            raise IsADirectory(f"{a.path}: is a directory")
        rows = []
        for m in fs.extents.mappings(st.st_ino):
            fe, ctx = m.extent, m.extent.context
            rows.append({"file_offset": m.file_offset, "length": m.length, "disk_bytenr": fe.disk_bytenr,
                         "disk_length": fe.disk_num_bytes, "extent_offset": fe.offset, "encrypted": ctx is not None,
                         "nonce": ctx.nonce.hex() if ctx else None,
                         "key_identifier": ctx.key_identifier.hex() if ctx else None,
                         "contents_mode": ctx.contents_mode if ctx else None})
        if a.json:
            emit_json(rows)
        else:
            print(f"{'file_offset':>12} {'length':>10} {'disk_bytenr':>14} {'disk_len':>10} {'ext_off':>8}  encryption")
            for r in rows:
                enc = f"AES-256-XTS key {r['key_identifier']} nonce {r['nonce']}" if r["encrypted"] else "none"
                print(f"{r['file_offset']:>12} {r['length']:>10} {r['disk_bytenr']:>14} {r['disk_length']:>10} "
                      f"{r['extent_offset']:>8}  {enc}")
        return 0
    return on_image(a, body, readonly=True)


OUTPUT_FORMATS = ("normal", "json", "json+", "terse")


def output_formats(text: str) -> list[str]:
    out = text.split(",")
    bad = [f for f in out if f not in OUTPUT_FORMATS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown output format {bad[0]!r} (one of {', '.join(OUTPUT_FORMATS)})")
    return out


def fio_value(conv: Callable[[str], Any], positive: bool = False) -> Callable[[str], Any]:
    """A flag in fio's units; ``positive``: 0 is out of range too (``--size 0`` reached the jobs
    as "no size given" and asked for the --size it had been given)."""
    def parse(text: str) -> Any:
        try:
            value = conv(text)
        except (ValueError, BlockemuError) as e:  # with the parser's reason, where it gives one
            said = str(e)
            if said.startswith(repr(text)):
                raise argparse.ArgumentTypeError(f"bad value {said}") from None
            # the parser's own sentence where it names the value ("bad size '10Q': expected ..."), as mkfs's
            raise argparse.ArgumentTypeError(said if repr(text) in said else f"bad value {text!r}") from None
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is out of range: more than 0")
        return value
    return parse


def cmd_run(a: argparse.Namespace) -> int:
    import asyncio

    from blockemu.workload.runner import prepare, run_workload, scenarios

    if a.list:
        for name, text in sorted(scenarios().items()):
            print(textwrap.fill(describe(text), 100, initial_indent=f"{name:<22} ", subsequent_indent=" " * 23,
                                break_on_hyphens=False))
        return 0
    if not a.workload:
        raise UsageError("a job file or a scenario name is needed (or --list)")
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    overrides = {k: v for k, v in (("runtime", a.runtime), ("size", a.size), ("key_removal", a.key_removal))
                 if v is not None}
    text = job_file_from_stdin() if a.workload == "-" else None
    name = STDIN_JOB_FILE if text is not None else a.workload
    if a.parse_only:
        prepare(name, overrides, text)
        return 0
    report = asyncio.run(run_workload(name, image=a.image, seed=seed, overrides=overrides, text=text,
                                      preallocate=a.preallocate))
    formats = ["json"] if a.json else a.output_format
    for fmt in formats:
        if fmt in ("json", "json+"):
            emit_json(report.as_json(plus=fmt == "json+"))
        else:
            print("\n".join(report.text(fmt)))
    if "normal" not in formats:  # the normal output carries fio's notes itself
        for note in report.as_json()["blockemu"]["notes"]:
            print(note, file=sys.stderr)
    if not report.ok:  # one line on stderr whatever the output format
        image = f" --image {a.image}" if a.image else ""
        keep = "" if a.image else "; add --image PATH to keep the image"
        # the overrides too: without them a failure under --key-removal hard said to rerun it
        # under the job file's own mode (soft), where it does not happen
        flags = "".join(f" --{k.replace('_', '-')} {format(v, 'g') if isinstance(v, float) else v}"
                        for k, v in overrides.items())
        print(f"blockemu: run: {'; '.join(report.failures)} (reproduce with: blockemu run {a.workload}{flags}{image} "
              f"--seed {seed}{keep})", file=sys.stderr)
    if report.interrupted:
        return 128 + int(signal.Signals[report.interrupted])
    return 0 if report.ok else 1


STDIN_JOB_FILE = "<stdin>"  # the name a job file read from standard input goes by in messages


def job_file_from_stdin() -> str:
    """``blockemu run -``: the job file on standard input, as ``fio -`` reads it (a heredoc, a
    generated job); one that is not UTF-8 is one line, as a job file on disk."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{STDIN_JOB_FILE}: not a text file (byte {e.start} is not UTF-8)") from None


def describe(jobfile: str) -> str:
    """A job file's description: its leading comment block, as one paragraph."""
    lines = []
    for line in jobfile.splitlines():
        if not line.startswith(";"):
            break
        lines.append(line.lstrip("; ").strip())
    return " ".join(lines)


def print_first(label: str, lines: list[str], limit: int = 10) -> None:
    """The first ``limit`` of a report's findings, one ``label: ...`` line each, then how many
    were left out: a report that stopped at ten without saying so read as if ten were all."""
    for line in lines[:limit]:
        print(f"{label}: {line}")
    if len(lines) > limit:
        print(f"{label}: ... and {len(lines) - limit} more (--json lists every one)")


def cmd_stress(a: argparse.Namespace) -> int:
    import asyncio

    from blockemu.device.faultplan import FaultPlan
    from blockemu.display import bar as progress_bar
    from blockemu.workload.runner import RERUN_REPEATS, stress_mix
    from blockemu.workload.writepath import PRODUCTION, WRITE_PATHS

    if a.scenario == "key-removal-race":
        race_flags(a)
    else:
        mix_flags(a)
    campaign_flags(a)
    a.ops = DEFAULT_OPS if a.ops is None else a.ops
    a.tasks = MIX_TASKS if a.tasks is None else a.tasks
    a.crash_points = a.crash_points or 0
    a.write_path = a.write_path or PRODUCTION.name
    if a.seeds is not None:
        return stress_seeds(a)
    if a.image is None:
        raise UsageError("IMAGE is required (unless --seeds)")
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    if a.scenario == "key-removal-race":
        return stress_race(a, seed)
    faults = FaultPlan.parse(a.faults) if a.faults else None
    total = None if a.duration else a.tasks * a.ops
    with progress_bar("stress", total, progress_wanted(None, a.json)) as advance:
        summary = asyncio.run(stress_mix(a.image, seed=seed, tasks=a.tasks, nops=a.ops, duration=a.duration,
                                         faults=faults, crash_points=a.crash_points,
                                         advance=advance, write_path=WRITE_PATHS[a.write_path]))
    ok = summary["ok"]
    if a.json:
        emit_json(summary)
    else:
        print(f"seed = {seed}")
        for k in ("ops", "ops_per_second", "acknowledged_writes", "lost_acknowledged_writes", "divergent_files", "detected_corruption", "refused_out_of_space", "io_errors", "aborted", "ledger_files_checked_after_crash",
                  "fsck", "fsck_flips_undone", "crash_states_checked", "crash_failures"):
            if summary.get(k) is not None:
                print(f"{k.replace('_', ' '):<34}{summary[k]}{ops_split(a) if k == 'ops' else ''}"
                      + (f" (over the mix's {summary['seconds']} s)" if k == "ops_per_second" else ""))
        for line in summary.get("notes", []):
            print(f"note: {line}")
        print_first("detected", summary["detected"])  # injected flips caught by a checksum: the success case
        print_first("FAILED", summary["problems"])
        if not ok:
            extra = f" --faults {a.faults}" if a.faults else ""
            span = f"--duration {a.duration}" if a.duration else f"--ops {a.ops}"
            # on a fresh image: this one is the failure's evidence, and a rerun on it is refused
            # (flips left on it) or runs in a directory of its own beside the first run's
            fresh = f"{os.path.splitext(a.image)[0]}-rerun.img"
            print(f"rerun with: blockemu stress {fresh} --seed {seed} --tasks {a.tasks} {span}{extra}"
                  + (f" --crash-points {a.crash_points}" if a.crash_points else "") + write_path_flag(a))
            print(f"note: {RERUN_REPEATS}; this failure is {a.image} as the run left it "
                  f"(blockemu fsck {a.image} --check-data)")
    return 0 if ok else 1


def ops_split(a: argparse.Namespace) -> str:
    """What the mix's total of operations is made of: --ops counts per task (the summary said
    "ops 40" for --ops 10, as if --ops had been ignored)."""
    per = "" if a.duration else f" x {a.ops} per task"
    return f" ({a.tasks} task{'s' * (a.tasks > 1)}{per})"


def mix_flags(a: argparse.Namespace) -> None:
    """The race's own flags refused on the mix, which would ignore them: a silent --force let a
    user believe the mix ran on a fresh image, a silent --key-removal that each mode had been
    tried (the mix uses no encryption key, so every mode ran the same)."""
    if a.force:
        raise UsageError("--force belongs to --scenario key-removal-race, which makes IMAGE afresh; the mix "
                         "runs on IMAGE as it is, in a directory of its own (making IMAGE only if it is missing)")
    if a.key_removal is not None or a.compare_modes or a.schedule is not None:
        raise UsageError("--key-removal, --compare-modes and --schedule belong to --scenario key-removal-race: "
                         "the mix uses no encryption key, so no removal mode changes what it does")
    if a.kernel_peer is not None or a.report:
        raise UsageError("--kernel-peer and --report belong to --scenario key-removal-race")


def campaign_flags(a: argparse.Namespace) -> None:
    """What one run and a campaign each ignore, refused: IMAGE and --seed with --seeds (each seed
    runs on its worker's own fresh image), and the campaign's --jobs, --ray, --results, --resume
    and --keep-failed without it (no results file was written, a --resume FILE went unread, and
    nothing went to the --keep-failed DIR: the run's IMAGE is its record)."""
    if a.seeds is not None:
        if a.image is not None:
            raise UsageError("--seeds runs each seed on a fresh image its worker makes: give no IMAGE")
        if a.seed is not None:
            raise UsageError("--seed is one run's; --seeds A..B names the campaign's seeds")
        a.jobs = 1 if a.jobs is None else a.jobs
        return
    refuse_given([("--jobs", a.jobs), ("--ray", a.ray), ("--results", a.results), ("--resume", a.resume),
                  ("--keep-failed", a.keep_failed)],
                 "a campaign (--seeds A..B); a run on IMAGE is one run, in this process")


def refuse_given(flags: list[tuple[str, Any]], owner: str) -> None:
    """Refuse the flags given (not None: told from their defaults) that belong to ``owner``."""
    given = [flag for flag, value in flags if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} belong{'s' * (len(given) == 1)} to {owner}")


def race_flags(a: argparse.Namespace) -> None:
    """The race's flags checked before it runs: the free schedule runs for --duration and the
    seeded one for --ops steps, so the other bound would be ignored (a silent --ops was); and
    --report needs matplotlib, which used to be found missing only after the whole race. The
    mix's own flags are refused: a silent --faults let a user believe the race ran under them."""
    refuse_given([("--tasks", a.tasks), ("--faults", a.faults), ("--crash-points", a.crash_points),
                  ("--write-path", a.write_path)],
                 "the mix (--scenario mix, the default); the race runs its own two tasks, without faults")
    a.key_removal, a.schedule = a.key_removal or "soft", a.schedule or "free"
    if a.schedule == "free" and a.ops is not None:
        raise UsageError("--ops counts the steps of --schedule seeded; the free race runs for "
                         "--duration S (default 5)")
    if a.schedule == "seeded" and a.duration is not None:
        raise UsageError("--duration bounds the free race; --schedule seeded runs --ops N steps "
                         f"(default {DEFAULT_OPS})")
    if a.report:
        need_pyplot("--report")


def need_pyplot(flag: str | None = None) -> None:
    """matplotlib (the `report` extra) found missing before any work, as a usage error (exit 2,
    as --ray without Ray): found when drawing, it came after the whole race or image walk."""
    from blockemu.display import MissingExtra, pyplot

    try:
        pyplot()
    except MissingExtra as e:
        raise UsageError(f"{flag}: {e}" if flag else str(e)) from None


def stress_race(a: argparse.Namespace, seed: int) -> int:
    import asyncio

    from blockemu.crypto.keyring import MODES
    from blockemu.workload.kernelpeer import Unavailable, run_kernel_race
    from blockemu.workload.keyrace import run_race, unexpected
    from blockemu.workload.keyrace import table as race_table
    from blockemu.workload.report import hard_sweep, write_report

    if os.path.exists(a.image) and os.path.getsize(a.image) and not a.force:
        raise ExistsError(f"{a.image} exists and is not empty (the race makes a fresh image; use --force)")
    if a.report:  # made now: found unmakeable after the race and the sweep, it lost their table
        os.makedirs(a.report, exist_ok=True)
    modes = list(MODES) if a.compare_modes else [a.key_removal]

    async def go() -> list[RaceResult]:
        return [await run_race(m, image=a.image, seed=seed, schedule=a.schedule, steps=a.ops,
                               duration=a.duration or 5.0) for m in modes]

    results = asyncio.run(go())
    peer_why = None
    if a.kernel_peer is not None:
        try:
            results.append(run_kernel_race(a.kernel_peer or None, seed=seed, schedule=a.schedule, steps=a.ops,
                                           duration=a.duration or 5.0))
        except Unavailable as e:
            peer_why = f"kernel peer not run: {e}"
    bad = [r for r in results if unexpected(r)]
    written = []
    if a.report:
        sweep = asyncio.run(hard_sweep(seed=seed, schedule=a.schedule, steps=a.ops, duration=a.duration or 5.0))
        written = write_report(a.report, results, sweep, note=peer_why)
    if a.json:
        emit_json({"seed": seed, "scenario": a.scenario, "results": [r.as_json() for r in results],
                   "unexpected_loss": bool(bad), **({"kernel_peer_not_run": peer_why} if peer_why else {}),
                   **({"report": written} if written else {})})
    else:
        print(f"seed = {seed}")
        print(race_table(results))
        if peer_why:
            print(peer_why)
        elif a.kernel_peer is not None:
            print("kernel: ENOKEY counts ENOENT too (without the key the plaintext name is gone); "
                  "remove->wipe is REMOVE until the key status reads ABSENT")
        lossy = [r.mode for r in results if r.mode in ("hard", "sync") and r.lost]
        if lossy:  # the table's legend, for the rows it explains (sync mode often loses nothing)
            print(f"the losses in {' and '.join(lossy)} mode are what {'those semantics' if len(lossy) > 1 else 'its semantics'}"
                  " cost: expected, but never silent")
        if written:
            print(f"report: {', '.join(written)}")
        if bad:
            again = f"blockemu stress {a.image} --scenario key-removal-race --force --seed {seed} --schedule {a.schedule} " + (
                f"--ops {a.ops}" if a.schedule == "seeded" else f"--duration {a.duration or 5.0}")
            again += f" --key-removal {bad[0].mode}" if len(bad) == 1 else " --compare-modes"
            # the seeded schedule replays its interleaving (every count the same, run after run);
            # the free one's is timing (3308 then 3602 appends, 251 then 282 lost, on one seed)
            print(f"UNEXPECTED LOSS in {', '.join(r.mode for r in bad)}; "
                  + (f"reproduce with: {again}" if a.schedule == "seeded" else
                     f"rerun with: {again} (the free schedule's interleaving is timing, so the loss may not "
                     "recur; --schedule seeded --ops N replays an interleaving exactly)"))
    return 1 if bad else 0


def stress_seeds(a: argparse.Namespace) -> int:
    """Many stress seeds as one campaign, each seed a shard on its own fresh image."""
    from blockemu.workload.runner import RERUN_REPEATS, kept_seed_image, stress_campaign
    from blockemu.workload.writepath import WRITE_PATHS

    if a.scenario != "mix":
        raise UsageError("--seeds runs the mix scenario")
    keep = keep_failed_dir(a)
    s = run_campaign_cli(a, stress_campaign(a.seeds, tasks=a.tasks, ops=a.ops, duration=a.duration,
                                            faults=a.faults, crash_points=a.crash_points,
                                            write_path=WRITE_PATHS[a.write_path], keep_failed=keep))
    rc = report_campaign(a, s, f"{s.units} stress seeds ({a.seeds[0]}..{a.seeds[1]}), {s.states} operations and "
                               f"crash states in {s.seconds:.1f} s ({s.resumed} shards resumed): {len(s.failures)} failures",
                         "stress seeds",
                         json_extra={"seeds": list(a.seeds), "write_path": a.write_path}, again="rerun")
    if s.failures and not a.json:  # a seed's line is a rerun, no more: say what it repeats
        where = f"each failing seed's image is kept in {keep}/seed-N.img" if keep else \
            "each seed's image went with its shard: --keep-failed DIR keeps a failing seed's"
        # a failure --resume took from its file was not run again: its image is where that run put it, if anywhere
        unkept = sorted({f["unit"] for f in s.failures if keep and not os.path.exists(kept_seed_image(keep, f["unit"]))})
        if unkept:
            where += f", but for seed{'s' * (len(unkept) > 1)} {', '.join(map(str, unkept))}: resumed, not run here"
        print(f"note: {RERUN_REPEATS} ({where})")
    return rc


def cmd_crash(a: argparse.Namespace) -> int:
    from blockemu.workload.crash import crash_campaign
    from blockemu.workload.writepath import WRITE_PATHS

    keep = keep_failed_dir(a)
    try:
        campaign = crash_campaign(a.max_ops, seed=a.seed, subsets=a.subsets, nobarrier=a.nobarrier, limit=a.limit,
                                  groups=a.groups, write_path=WRITE_PATHS[a.write_path], workloads=a.workloads,
                                  shard_size=a.shard_size, keep_failed=keep)
    except InvalidArgument as e:  # --workloads past the campaign's end
        raise UsageError(e.strerror or str(e)) from None
    s = run_campaign_cli(a, campaign)
    groups = "" if a.groups == 0 else ", and fsync groups"
    return report_campaign(a, s, f"{s.units} workloads (Ace, up to {a.max_ops} operations each{groups}; "
                                 f"{a.write_path} write path), {s.states} crash states checked in {s.seconds:.1f} s ({s.shards} shards, "
                                 f"{s.resumed} resumed, {'Ray' if a.ray is not None else f'{a.jobs} jobs'}): "
                                 f"{len(s.failures)} failures", "workloads",
                           json_extra={"workloads": s.units, "write_path": a.write_path}, counts=False)


# -o NAME=VALUE takes every mount option the library does: their one list is fs/writeback.py's
# OPTION_FLOORS. Values are sizes (K/M/G/T/P suffixes: its SIZE_OPTIONS) but for these;
# tests/test_fuse.py holds each option's parser to the type its Writeback keyword is annotated with
NOT_SIZES: dict[str, Callable[[str], Any]] = {"interval": float, "seal_timeout": float, "seal_workers": int}


def mount_option_parsers() -> dict[str, Callable[[str], Any]]:
    """The library's mount options, each with its value's parser (imported when a command
    mounts: the fs layer is no import of the others)."""
    from blockemu.fs.writeback import OPTION_FLOORS, SIZE_OPTIONS

    return {name: parse_size if name in SIZE_OPTIONS else NOT_SIZES[name] for name in OPTION_FLOORS}


def mount_options(options: list[str]) -> dict[str, Any]:
    """``-o ro,interval=1,dirty_limit=128M`` -> the keywords of ``blockemu.mount``; a value the
    library would refuse (``interval=0``) is a usage error here, as one that does not parse."""
    from blockemu.fs.writeback import check_options

    parsers = mount_option_parsers()
    out: dict[str, Any] = {"readonly": False}
    for opt in filter(None, ",".join(options).split(",")):
        name, eq, value = opt.partition("=")
        if not eq and name in ("ro", "rw"):
            out["readonly"] = name == "ro"
        elif not eq and name == "allow_other":
            out["allow_other"] = True  # the FUSE mount's, not the library's
        elif eq and name in parsers:
            try:
                out[name] = parsers[name](value)
            except (ValueError, InvalidArgument):
                raise UsageError(f"bad value for mount option {name}: {value!r}") from None
        else:
            raise UsageError(f"unknown mount option {opt!r} (known: ro, rw, allow_other, "
                             + ", ".join(f"{k}=" for k in parsers) + ")")
    try:
        check_options({k: v for k, v in out.items() if k not in ("readonly", "allow_other")})
    except InvalidArgument as e:
        raise UsageError(str(e)) from None
    return out


def cmd_mount(a: argparse.Namespace) -> int:
    from blockemu.fuse import serve as fuse_serve

    return fuse_serve.run(a.image, a.mountpoint, foreground=a.foreground, keys=[read_key(k) for k in a.key_file],
                          key_removal=a.key_removal, **mount_options(a.options))


def cmd_umount(a: argparse.Namespace) -> int:
    from blockemu.fuse import control
    from blockemu.fuse import serve as fuse_serve

    try:
        control.request(a.mountpoint, "umount")
    except control.NotServed:
        # a killed server's dead mount, or not a blockemu mount at all
        if fuse_serve.clear_dead_mount(a.mountpoint):
            print(f"blockemu umount: {a.mountpoint}: its server was gone; detached the dead mount")
            return 0
        raise
    return 0


def cmd_key(a: argparse.Namespace) -> int:
    from blockemu.crypto import fscrypt
    from blockemu.crypto.keyring import OTHERS_HOLD
    from blockemu.fuse import control

    if a.action == "add":
        reply = control.request(a.mountpoint, "key-add", key=read_key(a.key_file), user=a.user)
    else:
        if (a.key_file is None) == (a.id is None):
            raise UsageError("give one of --key-file or --id")
        kid = a.id if a.id is not None else fscrypt.key_identifier(read_key(a.key_file)).hex()
        extra = {"all_users": a.all_users} if a.action == "remove" else {}
        try:
            reply = control.request(a.mountpoint, f"key-{a.action}", id=kid, user=a.user, **extra)
        except OSError as e:  # the keyring's hint, in this command's words: the flag, not the API's keyword
            if e.strerror is None or OTHERS_HOLD not in e.strerror:
                raise
            raise OSError(e.errno, e.strerror.replace(OTHERS_HOLD, "--all-users removes theirs")) from None
    if "note" in reply:  # a key no encryption policy uses: added, but it unlocks nothing
        print(f"blockemu: key: {reply['note']}", file=sys.stderr)
    if a.json:
        emit_json({"action": a.action, **reply})
    else:
        print(reply["text"])
    return 0


def cmd_fuzz(a: argparse.Namespace) -> int:
    from blockemu.cli import fuzz  # it drives this module's main(): imported here, not at the top
    size = {"shard_size": a.shard_size} if a.shard_size else {}
    campaign = (fuzz.structural_campaign(a.images, a.seed, max_rss=a.max_rss, only=a.only, **size) if a.structural
                else fuzz.flip_campaign(a.trials, a.seed, a.recsum, only=a.only, **size))
    s = run_campaign_cli(a, campaign)
    what = "images" if a.structural else "trials"
    return report_campaign(a, s, f"{s.units} {what} ({campaign.identity['mode']}), {s.states} checks in "
                                 f"{s.seconds:.1f} s ({s.resumed} shards resumed): {len(s.failures)} failures", what)


def cmd_key_id(a: argparse.Namespace) -> int:
    from blockemu.crypto import fscrypt

    print(fscrypt.key_identifier(read_key(a.key_file)).hex())
    return 0


def cmd_mkfs(a: argparse.Namespace) -> int:
    import asyncio

    from blockemu.fs.mkfs import check_options, mkfs

    if a.encrypt and not a.key_file:  # a flag missing is a usage error, as mkdir --encrypt says it
        raise UsageError("--encrypt needs --key-file")
    try:  # a value out of range is too, as one that does not parse (``size_text``)
        check_options(a.size, a.node_size, a.csum, a.label, a.uuid)
    except InvalidArgument as e:
        raise UsageError(str(e)) from None
    sb = asyncio.run(mkfs(a.image, a.size, node_size=a.node_size, csum=a.csum, label=a.label, uuid=a.uuid, force=a.force,
                          rootdir=a.rootdir, encrypt=a.encrypt, key=read_key(a.key_file),
                          progress=progress_wanted(a.progress), preallocate=a.preallocate))
    print(f"blockemu mkfs: created {a.image}")
    rows = [("Label", sb.label or "(null)"), ("UUID", str(uuid.UUID(bytes=sb.fsid))), ("Node size", sb.nodesize),
            ("Sector size", sb.sectorsize), ("Filesystem size", human(sb.total_bytes)), ("Checksum", a.csum),
            ("Generation", sb.generation)]
    for k, v in rows:
        print(f"{k + ':':<20}{v}")
    return 0


def cmd_fsck(a: argparse.Namespace) -> int:
    from blockemu.check.fsck import PHASES, check
    from blockemu.display import bar as progress_bar

    e2fsck_modes(a)
    key = read_key(a.key_file)
    with progress_bar("fsck", len(PHASES), progress_wanted(a.progress, a.json)) as advance:
        report = check(a.image, check_data=a.check_data, key=key,
                       progress=lambda n, phase: advance(1 if n > 1 else 0, f"[{n}/{len(PHASES)}] checking {phase}"))
    code = report.exit_code
    for warning in report.warnings:  # the exit code is the image's: the check ran, as ls's with such a key
        print(f"blockemu: fsck: {warning}", file=sys.stderr)
    if a.repair and report.read_only is not None:
        raise report.read_only  # writes nothing, clean or not
    if a.repair and not report.clean:
        report, code = repair(a, report, key)
    if a.json:
        emit_json(report.as_json())
    else:
        if a.repair and report.repaired:
            print("\n".join(f"repaired: [{e['code']}] {e['message']}" + (f" -- {e['action']}" if "action" in e else "")
                             for e in report.repaired))
        print("\n".join(report.text()))
    return code


# why --repair wrote nothing, said rather than left to the unchanged exit code
UNREPAIRED_TREES = ("--repair wrote nothing: tree blocks are damaged, and changing items around them would mean "
                    "guessing (only the free-space tree is rebuilt); ")
# what can still be read, by whether the checksum tree (which every read of file data consults) is whole
READABLE = "files the errors do not name can still be copied out with blockemu ls / cat"
UNREADABLE = ("the checksum tree is among them, and every read of file data checks it: blockemu ls still lists "
              "names, but cat of a file whose checksums it cannot reach fails")
UNREPAIRED = "--repair wrote nothing: none of these findings has a repair"
# ls and cat replay an fsync log (in memory) before they read: through the damaged trees
LOGGED = ("; with the fsync log on the image, ls and cat replay it first, and fail where the replay meets the "
          "damage: `blockemu rescue zero-log` then lets them read the last commit, dropping what was fsynced since")
UNREPAIRED_SHORT = ("--repair wrote nothing: the image is truncated, and tree blocks the cut took are lost; the "
                    "other commands refuse a truncated image too")


def unrepaired(report: Any) -> str:
    """Why --repair wrote nothing, and what can still be read: with a log to replay, READABLE alone
    promised ls and cat to an image they refused (an extent tree leaf damaged: every one failed)."""
    if not report.trees_damaged:
        return UNREPAIRED
    if any(e.fix is not None and "extend_to" in e.fix for e in report.errors):
        return UNREPAIRED_SHORT
    readable = UNREADABLE if CSUM_TREE_OBJECTID in report.damaged_trees else READABLE
    return UNREPAIRED_TREES + readable + (LOGGED if report.stats.get("log_items") else "")


def repair(a: argparse.Namespace, report: Any, key: bytes | None) -> tuple[Any, int]:
    """--repair on what ``report`` found: the report after, and the exit code. A repair can expose
    the next fix (a dropped entry changes its directory's size), so repair and check again, a few
    rounds at most. Imported here: repair writes through the fs layer, which a check never needs."""
    from blockemu.check.fsck import check
    from blockemu.check.repair import repairable, run_repair

    if not repairable(report):
        report.notes.append(unrepaired(report))
        return report, report.exit_code
    repaired, fixed = [], 0
    for _ in range(4):
        before = report
        done, stopped = run_repair(a.image, before)
        fixed += done
        report = check(a.image, check_data=a.check_data, key=key)
        repaired += [e.as_json() for e in before.errors if e not in report.errors]
        if stopped is not None:
            report.notes.append(stopped)
        if stopped is not None or report.clean or not repairable(report):
            break
    report.stats["repaired"] = fixed
    report.repaired = repaired
    return report, EXIT_CORRECTED if report.clean else EXIT_UNCORRECTED


def cmd_inspect(a: argparse.Namespace) -> int:
    from blockemu.check import inspect as inspect_mod

    if a.what == "dump-super":
        d = inspect_mod.dump_super(a.image)
        if a.json:
            emit_json(d)
        else:
            print("\n".join(inspect_mod.super_text(d)))
        return 0
    if a.what == "heatmap":
        return inspect_heatmap(a)
    problems: list[str] = []
    blocks = inspect_mod.dump_tree(a.image, a.tree, problems)
    for why in problems:  # each block that did not read, as ls names each entry it could not stat
        print(f"blockemu: inspect: {why}", file=sys.stderr)
    if a.json:
        emit_json(blocks)
    else:
        current = None
        for b in blocks:
            if b["tree"] != current:
                current = b["tree"]
                print(f"{current} tree")
            print("\n".join(inspect_mod.block_text(b)))
        if "log" in (a.tree or ()) and not any(b["tree"] == "log" for b in blocks):
            print("log tree: none (no fsync log to replay: the image is its last full commit)")  # not silence
    return 1 if problems else 0


def cmd_rescue(a: argparse.Namespace) -> int:
    """``zero-log``: a damaged log makes every read-write mount fail, and only the user can
    decide to lose what it fsynced (btrfs leaves that to ``btrfs rescue`` too); likewise
    ``use-backup-root``, which loses the commits after the backup it goes back to."""
    if a.what == "use-backup-root":
        return rescue_backup_root(a)
    from blockemu.check.repair import zero_log

    sb = zero_log(a.image)
    if a.json:
        emit_json({"image": a.image, "log_root": sb.log_root if sb else 0, "zeroed": sb is not None})
    elif sb is None:
        print(f"{a.image}: no fsync log; nothing to do")
    else:
        print(f"{a.image}: dropped the fsync log at {sb.log_root} (generation {sb.log_root_transid}); "
              f"the image is its last full commit, generation {sb.generation}")
    return 0


def rescue_backup_root(a: argparse.Namespace) -> int:
    """Exit 0 when it went back (or had nothing to do), fsck's 4 (errors left) when it refused."""
    import asyncio

    from blockemu.check.backup import NoCleanBackup, use_backup_root

    try:
        r = asyncio.run(use_backup_root(a.image))
    except NoCleanBackup as e:
        fail("rescue", str(e), e.errno, a)
        return EXIT_UNCORRECTED
    if a.json:
        emit_json(r.as_json())
    elif r.chosen is None:
        print(f"{a.image}: generation {r.generation} reads whole and checks clean; nothing to do")
    else:
        log = "; the fsync log, which extends a newer generation, is dropped" if r.dropped_log else ""
        print(f"{a.image}: went back from generation {r.generation} to backup root slot {r.chosen.slot}, "
              f"generation {r.chosen.generation} (its trees committed as generation {r.generation_after}, above every "
              f"lost one); every change after generation {r.chosen.generation} is lost{log}")
    return 0


def picture_format(out: str) -> None:
    """OUT's suffix picks the format matplotlib writes: one it cannot write (`map.txt`) is a usage
    error before the image is walked, not a traceback after it (no suffix: PNG)."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(out)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UsageError(f"{out}: matplotlib cannot write .{suffix} pictures (it writes {', '.join(sorted(formats))})")


def inspect_heatmap(a: argparse.Namespace) -> int:
    from blockemu import display
    from blockemu.check import heatmap
    from blockemu.fs.mkfs import file_id

    need_pyplot()
    picture_format(a.out)
    if (own := file_id(a.image)) is not None and file_id(a.out) == own:  # `heatmap disk.raw disk.raw`, a link to it
        raise InvalidArgument(f"{a.out}: is the image itself (the picture would overwrite it)")
    hm = heatmap.build(a.image)
    heatmap.draw(hm, a.image, a.out)
    if a.json:
        emit_json(hm.as_json(a.image))
    else:
        counts = hm.counts()
        print(f"{a.out}: {len(hm.cells)} cells of {hm.cell_bytes} bytes")
        print(display.table(["class", "cells"], [[c, str(n)] for c, n in counts.items() if n]))
        print_first("WARNING", hm.problems)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "mkfs": cmd_mkfs, "fsck": cmd_fsck, "inspect": cmd_inspect, "ls": cmd_ls, "cat": cmd_cat, "put": cmd_put,
    "mkdir": cmd_mkdir, "extents": cmd_extents, "key-id": cmd_key_id, "stress": cmd_stress,
    "run": cmd_run, "crash": cmd_crash, "mount": cmd_mount, "umount": cmd_umount, "key": cmd_key, "fuzz": cmd_fuzz,
    "rescue": cmd_rescue,
}
# fsck follows e2fsck's exit codes: 8 operational error, 16 usage error
FAILURE_CODES = {"fsck": (EXIT_OPERATIONAL, EXIT_USAGE)}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    collect_less()
    hold_closed()
    print_any_name()
    command = next((x for x in argv if not x.startswith("-")), "")
    failure, usage = FAILURE_CODES.get(command, (CMD_FAILURE, CMD_USAGE))
    debug = bool(os.environ.get("BLOCKEMU_DEBUG"))
    args = None
    try:
        args, extra = build_parser(command, prog).parse_known_args(argv)
        if extra:  # parse_args has the top-level parser say it, naming no command
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        with terminated_as_interrupted(args.command):
            return COMMANDS[args.command](args)
    except UsageError as e:
        line = f"{e.prog or prog or prog_of(args)}: {e.why}"  # fsck.blockemu's as its parser's
        print(f"blockemu: usage: {line}", file=sys.stderr)
        if wants_json(args, argv):  # the JSON contract holds for a usage error too
            emit_json(error_json(command, line, errno.EINVAL))
        return usage if e.code is None else e.code
    except BlockemuError as e:
        if debug:
            raise
        fail(command, str(e), e.errno, args)
        return failure
    except BrokenPipeError:
        # the reader went away (``| head``): not an error worth a message, but no success either
        # (0 made ``fsck --json | head`` of a damaged image look clean under pipefail): the
        # status of a process SIGPIPE ended, as other tools give
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        # one error path among the others: with --json a reader of stdout gets the error object,
        # not an empty stream it fails to parse. fsck exits e2fsck's 32 for either signal, as
        # e2fsck cancels on both; the others 128 + the signal, as the shell reports one that ended them
        term = isinstance(e, Terminated)
        fail(command, "terminated" if term else "interrupted", errno.EINTR, args)
        return 32 if command == "fsck" else 128 + (signal.SIGTERM if term else signal.SIGINT)
    except OSError as e:
        if debug:
            raise
        why = e.strerror or str(e)
        fail(command, f"{e.filename}: {why}" if e.filename else why, e.errno, args)  # path first, as cp(1)
        return failure
    finally:
        wipe_keys_read()


def prog_of(args: argparse.Namespace | None) -> str:
    """``blockemu CMD [ACTION]``, as argparse names the (sub)command in its own usage errors."""
    words = [getattr(args, k, None) for k in ("command", "action", "what")] if args is not None else []
    return " ".join(["blockemu", *(w for w in words if isinstance(w, str))])


def fail(command: str, why: str, err: int | None, args: argparse.Namespace | None) -> None:
    """The one line on stderr; with --json also the JSON error on stdout."""
    print(f"blockemu: {command}: {why}", file=sys.stderr)
    if wants_json(args, None) and not is_closed(sys.stdout):  # (closed: nowhere to put it)
        emit_json(error_json(command, why, err))


def error_json(command: str, why: str, err: int | None) -> dict[str, Any]:
    return {"error": {"command": command, "errno": err, "code": errno.errorcode.get(err or 0), "message": why}}


def wants_json(args: argparse.Namespace | None, argv: list[str] | None) -> bool:
    """--json, or an --output-format with json in it: from the parsed flags, or, when parsing
    itself failed (a usage error), from the words of the command line."""
    if args is not None:
        formats = getattr(args, "output_format", None) or []
        return bool(getattr(args, "json", False)) or any(f.startswith("json") for f in formats)
    words = argv or []
    formats = [w.partition("=")[2] for w in words if w.startswith("--output-format=")]
    formats += [nxt for w, nxt in zip(words, words[1:]) if w == "--output-format"]
    return "--json" in words or any(f.startswith("json") for fmt in formats for f in fmt.split(","))


def main_mkfs() -> int:
    return main(["mkfs", *sys.argv[1:]], "mkfs.blockemu")


def main_fsck() -> int:
    return main(["fsck", *sys.argv[1:]], "fsck.blockemu")
