"""The ``blockemu`` command (DESIGN §6). Errors are one line on stderr,
``blockemu: <what>: <why>``; set BLOCKEMU_DEBUG=1 for the traceback."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from typing import Any, Callable, NoReturn

from . import inspect as inspect_mod
from .errors import BlockemuError
from .fsck import EXIT_OPERATIONAL, EXIT_USAGE, check, tty_progress
from .mkfs import mkfs
from .units import human

# every command but fsck: 1 failure, 2 usage error (argparse's convention)
CMD_FAILURE, CMD_USAGE = 1, 2


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    p = Parser(prog="blockemu", description="Block-device emulator with a btrfs-like encrypted COW filesystem.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    m = sub.add_parser("mkfs", help="create a filesystem image")
    m.add_argument("image")
    m.add_argument("--size", required=True, help="image size, K/M/G/T suffixes")
    m.add_argument("--node-size", default="16K")
    m.add_argument("--csum", default="crc32c", choices=["crc32c", "xxhash64", "sha256", "blake2b"])
    m.add_argument("--label", default="")
    m.add_argument("--uuid")
    m.add_argument("--force", action="store_true", help="overwrite an existing non-empty image")

    f = sub.add_parser("fsck", help="check an image (read-only unless --repair)")
    f.add_argument("image")
    f.add_argument("--json", action="store_true")
    f.add_argument("--check-data", action="store_true", help="verify every data sector against its checksum")
    f.add_argument("--repair", action="store_true")
    f.add_argument("--progress", dest="progress", action="store_true", default=None)
    f.add_argument("--no-progress", dest="progress", action="store_false")

    i = sub.add_parser("inspect", help="dump on-disk structures")
    isub = i.add_subparsers(dest="what", required=True, parser_class=Parser)
    ds = isub.add_parser("dump-super")
    ds.add_argument("image")
    ds.add_argument("--json", action="store_true")
    dt = isub.add_parser("dump-tree")
    dt.add_argument("image")
    dt.add_argument("--tree", choices=list(inspect_mod.TREE_BY_NAME), action="append")
    dt.add_argument("--json", action="store_true")
    return p


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def cmd_mkfs(a: argparse.Namespace) -> int:
    sb = asyncio.run(mkfs(a.image, a.size, node_size=a.node_size, csum=a.csum, label=a.label, uuid=a.uuid, force=a.force))
    print(f"blockemu mkfs: created {a.image}")
    rows = [("Label", sb.label or "(null)"), ("UUID", str(uuid.UUID(bytes=sb.fsid))), ("Node size", sb.nodesize),
            ("Sector size", sb.sectorsize), ("Filesystem size", human(sb.total_bytes)), ("Checksum", a.csum),
            ("Generation", sb.generation)]
    for k, v in rows:
        print(f"{k + ':':<20}{v}")
    return 0


def cmd_fsck(a: argparse.Namespace) -> int:
    if a.repair:
        raise BlockemuError("--repair: not implemented yet (nothing was written)")
    show = a.progress if a.progress is not None else (sys.stderr.isatty() and not a.json)
    report = check(a.image, check_data=a.check_data, progress=tty_progress() if show else None)
    if a.json:
        emit_json(report.as_json())
    else:
        print("\n".join(report.text()))
    return report.exit_code


def cmd_inspect(a: argparse.Namespace) -> int:
    if a.what == "dump-super":
        d = inspect_mod.dump_super(a.image)
        if a.json:
            emit_json(d)
        else:
            print("\n".join(inspect_mod.super_text(d)))
        return 0
    blocks = inspect_mod.dump_tree(a.image, a.tree)
    if a.json:
        emit_json(blocks)
    else:
        current = None
        for b in blocks:
            if b["tree"] != current:
                current = b["tree"]
                print(f"{current} tree")
            print("\n".join(inspect_mod.block_text(b)))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"mkfs": cmd_mkfs, "fsck": cmd_fsck, "inspect": cmd_inspect}
# fsck follows e2fsck's exit codes: 8 operational error, 16 usage error
FAILURE_CODES = {"fsck": (EXIT_OPERATIONAL, EXIT_USAGE)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((x for x in argv if not x.startswith("-")), "")
    failure, usage = FAILURE_CODES.get(command, (CMD_FAILURE, CMD_USAGE))
    debug = bool(os.environ.get("BLOCKEMU_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"blockemu: usage: {e}", file=sys.stderr)
        return usage
    except BlockemuError as e:
        if debug:
            raise
        print(f"blockemu: {command}: {e}", file=sys.stderr)
        return failure
    except BrokenPipeError:
        # the reader went away (``| head``): not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"blockemu: {command}: interrupted", file=sys.stderr)
        return 32 if command == "fsck" else 130
    except OSError as e:
        if debug:
            raise
        print(f"blockemu: {command}: {e.strerror or e}{': ' + e.filename if e.filename else ''}", file=sys.stderr)
        return failure


def main_mkfs() -> int:
    return main(["mkfs", *sys.argv[1:]])


def main_fsck() -> int:
    return main(["fsck", *sys.argv[1:]])
