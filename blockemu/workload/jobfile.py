"""fio job-file syntax, parsed by our own small parser (sans-I/O).

What fio accepts and configparser does not: repeated ``[global]`` sections that
apply only to the jobs below them, bare keys (``time_based``), ``;`` and ``#``
comments, ``${ENV}`` expansion (unset is empty, as in fio), ``include FILE``,
``$pagesize``/``$mb_memory``/``$ncpus`` and arithmetic in values. Every key is checked:
an option blockemu runs is converted here, once; one that only shapes logging or CPU
placement is kept and listed as ignored; one of fio's that blockemu cannot honour, and a
typo, are errors. All errors of a file are reported together, each with its file:line.
"""
from __future__ import annotations

import ast
import errno
import operator
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

from blockemu.errors import InvalidArgument
from blockemu.units import parse_size
from blockemu.workload.mix import DEFAULT_OPS

_KEYWORDS = {
    "$pagesize": lambda: str(os.sysconf("SC_PAGE_SIZE")),
    "$mb_memory": lambda: str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20),
    "$ncpus": lambda: str(os.cpu_count() or 1),
}


def _arith(text: str) -> str:
    """fio's numeric expressions: ``$pagesize``/``$mb_memory``/``$ncpus`` substituted, then
    arithmetic (``+ - * / % ^``, parentheses) evaluated, keeping a trailing unit suffix
    (``(2*$ncpus)k``). A plain value passes through untouched."""
    for word, value in _KEYWORDS.items():
        text = text.replace(word, value())
    m = re.fullmatch(r"\s*([0-9.\s+\-*/%^()]+?)\s*([a-zA-Z%]*)\s*", text)
    if not m or not re.search(r"[+\-*/%^()]", m[1].strip().lstrip("-")):
        return text
    try:
        tree = ast.parse(m[1].replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ValueError(text) from None
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.operand))
        raise ValueError(text)
    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise ValueError(text) from None
    return f"{int(value) if float(value).is_integer() else value}{m[2]}"


def size(text: str) -> int:
    return parse_size(_arith(text))


def file_size(text: str) -> int:
    """filesize=: one size; fio's range (a random size per file) is refused by name."""
    if re.fullmatch(r"\s*[\w.]+\s*-\s*[\w.]+\s*", text) and not text.lstrip().startswith("-"):
        raise Unsupported(f"filesize={text}: a range of sizes (fio picks each file's in it) is not supported: "
                          "give one size")
    return size(text)


@dataclass(frozen=True)
class Zones:
    """``size=128z``: a number of zones, made bytes once the job's ``zonesize`` is known (fio
    takes the zone size of the file, which for an emulated zoned file is ``zonesize``)."""
    count: int


@dataclass(frozen=True)
class Share:
    """``size=30%``: a share of what the job's files offer -- the existing files' size, or the
    image's free space for files not there yet (fio takes the files' or the device's size)."""
    percent: float

    def of(self, whole: int, unit: int = 1) -> int:
        """The share of ``whole``, rounded down to ``unit``."""
        n = int(whole * self.percent / 100)
        return n - n % unit


def size_or_zones(text: str) -> int | Zones:
    """A size, or a number of zones (``524z``)."""
    m = re.fullmatch(r"\s*(\d+)\s*z\s*", text)
    return Zones(int(m[1])) if m else size(text)


def size_or_share(text: str) -> int | Share | Zones:
    """A size, a number of zones (``128z``), or fio's percentage form (``30%``, between 1 and 100)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if not m:
        return size_or_zones(text)
    if not 0 < float(m[1]) <= 100:
        raise ValueError(f"{text!r} (a percentage is between 1 and 100)")
    return Share(float(m[1]))


def fixed(value: int | Share | None) -> int:
    """A size known before the run (0 for a share, which the run resolves)."""
    return value if isinstance(value, int) else 0


def integer(text: str) -> int:
    """A whole number, or one of fio's expressions giving one; said in the job file's terms, not
    Python's ('invalid literal for int() with base 10')."""
    try:
        return int(_arith(text))
    except ValueError:
        raise ValueError(f"{text!r} (expected a whole number)") from None


def parse_time(text: str, bare: float = 1.0) -> float:
    """fio time values in seconds: a bare number is in ``bare`` seconds (seconds for most
    options); suffixes us, ms, s, m, h, d."""
    value = _arith(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|min|h|d)?\s*", value)
    if not m:  # the reason said, as fio says it: ``runtime=-1`` gave only the bare value
        why = ("a time is at least 0" if value.strip().startswith("-")
               else "expected a number, optionally with a unit: us, ms, s, m, h or d")
        raise ValueError(f"{text!r} ({why})")
    scale = {None: bare, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[m[2]]
    return float(m[1]) * scale


def parse_usec(text: str) -> float:
    """fio's thinktime values: a bare number is microseconds."""
    return parse_time(text, 1e-6)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on", ""):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def parse_ops(text: str) -> dict[str, int]:
    """fsstress-like weights: ``write:10,fsync:2,rename:1``. Checked here, with the file's line:
    an unknown name or a weight the mix cannot draw from was a traceback once the run started."""
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition(":")
        out[name.strip()] = int(weight) if weight else 1
    unknown = set(out) - set(DEFAULT_OPS)
    if unknown:
        raise ValueError(f"unknown mix operations: {', '.join(sorted(unknown))} (known: {', '.join(DEFAULT_OPS)})")
    if min(out.values()) < 0 or not any(out.values()):
        raise ValueError(f"{text!r} (weights are 0 or more, and one at least is more)")
    return out


def choice(*allowed: str) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} (expected one of {', '.join(allowed)})")
        return text
    return conv


def ignored(text: str) -> str:
    return text


def file_names(text: str) -> str:
    """``filename=``: one name or more, ``:``-separated; empty, fio fails parsing it (an empty
    one was taken as unset, so the job ran on files of its own name). One of separators only
    (``filename=:``) names no file either: fio runs it doing nothing, blockemu divided the
    size among no files (a traceback), so it is refused as the empty one is."""
    if not any(text.split(":")):
        raise ValueError(f"{text!r} (a file name is needed)")
    return text


def unified_reporting(text: str) -> str:
    """``unified_rw_reporting``: ``none`` (``0``) is what blockemu writes; ``mixed`` and ``both``
    (``1``, ``2``) make fio report a ``mixed`` entry, the directions summed, which blockemu does
    not write, so they are refused (ignored, they left a parser of the output without its ``mixed``)."""
    choice("none", "mixed", "both", "0", "1", "2")(text)
    if text not in ("none", "0"):
        raise Unsupported(f"unified_rw_reporting={text} is not supported (each direction is reported apart: none)")
    return text


def per_direction(conv: Callable[[str], Any]) -> Callable[[str], tuple[Any, Any, Any]]:
    """fio's ``read,write,trim`` triples (``bs=4k,64k``): a missing write value repeats the
    read one, a missing trim value the write one; an empty field keeps the default (None)."""
    def parse3(text: str) -> tuple[Any, Any, Any]:
        parts = text.split(",")
        if len(parts) > 3:  # as fio refuses it; the bare value gave no reason
            raise ValueError(f"{text!r} (at most three values: read,write,trim)")
        vals = [conv(p) if p.strip() else None for p in parts]
        if len(vals) == 1:
            vals *= 2
        while len(vals) < 3:
            vals.append(vals[-1])
        return (vals[0], vals[1], vals[2])
    return parse3


def bs_range(text: str) -> tuple[int, int]:
    """``LO-HI``; a reversed range is taken smallest first, as fio takes it (``8k-4k`` runs
    ``4096B-8192B`` there; it was refused here, the bare value as the only reason)."""
    lo, _, hi = text.partition("-")
    a, b = sorted((size(lo), size(hi or lo)))
    if a <= 0:
        raise ValueError(f"{text!r} (a block size is at least 1 byte)")
    return a, b


def bs_split(text: str) -> tuple[tuple[int, float], ...]:
    """``4k/10:64k/50:32k/40``; sizes without a share split what is left equally."""
    pairs = [(size(bs), float(pct) if pct else None) for bs, _, pct in (p.partition("/") for p in text.split(":"))]
    given = sum(p for _, p in pairs if p is not None)
    rest = [bs for bs, p in pairs if p is None]
    if given > 100 or (given < 100 and not rest) or any(bs <= 0 for bs, _ in pairs):
        raise ValueError(f"{text!r} (shares must add up to 100)")
    return tuple((bs, p if p is not None else (100 - given) / len(rest)) for bs, p in pairs)


@dataclass(frozen=True)
class RW:
    """``rw=randread:8``: the pattern and its offset modifier, as fio reads it: for a random
    pattern, N I/Os go sequentially before a new random offset; for a sequential one, N bytes
    are added to each next offset (negative: the file is walked backwards)."""
    pattern: str
    modifier: int = 0

    @cached_property
    def random(self) -> bool:  # asked for every I/O: worked out once
        return self.pattern.startswith("rand")


RW_PATTERNS = ("read", "write", "trim", "randread", "randwrite", "randtrim", "rw", "readwrite", "randrw",
               "trimwrite", "randtrimwrite")


def parse_rw(text: str) -> RW:
    pattern, _, mod = text.partition(":")
    choice(*RW_PATTERNS)(pattern)
    if not mod:
        return RW(pattern)
    if pattern.startswith("rand"):
        return RW(pattern, integer(mod))
    neg = mod.strip().startswith("-")
    add = size(mod.strip().lstrip("-"))
    return RW(pattern, -add if neg else add)


def verify_pattern(text: str) -> bytes:
    """fio's ``verify_pattern``: ``0x`` hex bytes (in the order written), a decimal number (its
    little-endian bytes, 1 to 4 as it needs), a ``"quoted string"``, or several in a row."""
    out = b""
    for tok in re.findall(r'0[xX][0-9a-fA-F]+|"[^"]*"|\d+|\S', text):
        if tok[:2].lower() == "0x":
            digits = tok[2:]
            out += bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
        elif tok.startswith('"'):
            out += tok[1:-1].encode()
        elif tok.isdigit():
            n = int(tok)
            out += n.to_bytes(max(1, (n.bit_length() + 7) // 8), "little")
        else:
            raise ValueError(f"{text!r} (%o and other formats are not supported)")
    if not out:
        raise ValueError(text)
    return out


def distribution(text: str) -> tuple[str, Any]:
    """``random``, ``zipf:THETA``, ``pareto:POWER``, ``normal:DEV``, or zones of the region:
    ``zoned:60/10:30/20:10/70`` (access %/region %), ``zoned_abs:60/20G:40/100G`` (sizes)."""
    m = re.fullmatch(r"(zoned|zoned_abs)[:=](.+)", text)
    if m:
        if "," in m[2]:
            raise Unsupported("random_distribution with zones per direction is not supported (one set is)")
        conv = float if m[1] == "zoned" else size
        parts = [z.partition("/") for z in m[2].split(":")]
        zones: tuple[tuple[float, Any], ...] = ()
        for k, (a, _, b) in enumerate(parts):
            if not b.strip() and k == len(parts) - 1 and m[1] == "zoned":  # fio: the last region is the rest
                zones += ((float(a), 100 - sum(r for _, r in zones)),)
            else:
                zones += ((float(a), conv(b)),)
        if abs(sum(a for a, _ in zones) - 100) > 1e-6 or (m[1] == "zoned" and sum(b for _, b in zones) > 100 + 1e-6):
            raise ValueError(f"{text!r} (access shares must add up to 100, region shares to at most 100)")
        return (m[1], zones)
    name, _, arg = text.partition(":")
    if name == "random" and not arg:
        return ("random", 0.0)
    if name in ("zipf", "pareto", "normal") and arg and ":" not in arg and "," not in text:
        value = float(arg)
        ok = {"zipf": value > 0 and value != 1.0, "pareto": 0 < value < 1, "normal": 0 <= value <= 100}[name]
        if not ok:  # fio's limits: zipf theta != 1, pareto power in (0, 1), normal deviation in [0, 100]
            raise ValueError(f"{text!r} (out of range for {name})")
        return (name, value)
    raise ValueError(f"{text!r} (expected random, zipf:THETA, pareto:POWER, normal:DEV, zoned:... or zoned_abs:...)")


# fio's I/O engines that do I/O to files, and how they queue: a sync engine has one I/O in
# flight (fio caps iodepth at 1); an async one keeps iodepth of them in flight. ftruncate is
# fio's engine whose writes are ftruncate(offset) calls.
SYNC_ENGINES = ("sync", "psync", "vsync", "pvsync", "pvsync2", "mmap", "ftruncate")
ASYNC_ENGINES = ("libaio", "io_uring", "posixaio")


@dataclass(frozen=True)
class SteadyState:
    """``ss=iops_slope:0.1%``: what to watch (iops or bw), how (deviation from the mean, or
    the least-squares slope), and the limit -- absolute, or a percentage of the mean."""
    metric: str
    slope: bool
    limit: float
    percent: bool

    def __str__(self) -> str:
        return f"{self.metric}{'_slope' if self.slope else ''}:{self.limit:.6f}{'%' if self.percent else ''}"


def steadystate(text: str) -> SteadyState:
    m = re.fullmatch(r"(iops|bw)(_slope)?:(\d+(?:\.\d+)?)(%?)", text.strip())
    if not m:
        raise ValueError(f"{text!r} (expected iops, iops_slope, bw or bw_slope, then :LIMIT or :LIMIT%)")
    return SteadyState(m[1], bool(m[2]), float(m[3]), bool(m[4]))


def percent(text: str) -> float:
    """fio's FLOAT_LIST bounds for percentiles (minfp 0, maxfp 100)."""
    value = float(text)
    if not 0 <= value <= 100:
        raise ValueError(f"{text!r} (between 0 and 100)")
    return value


@dataclass(frozen=True)
class PercentileList:
    """``percentile_list``'s values, and fio's percentile_precision: the most decimals any of
    them was written with, trailing zeros included (``50.00:99`` has 2), which the normal
    output writes every percentile with -- the values alone cannot say it (50.00 is 50)."""
    values: tuple[float, ...]
    precision: int


def percentiles(text: str) -> PercentileList:
    """``percentile_list=1:50:99.9``: fio's colon-separated list, at most 20 values; it was read
    only when the report was written, so a bad value was a traceback after the whole run."""
    values = tuple(sorted(percent(p) for p in text.split(":")))  # fio sorts it (stat.c)
    if len(values) > PERCENTILE_LIST_MAX:
        raise ValueError(f"{text!r} (at most {PERCENTILE_LIST_MAX} values)")
    return PercentileList(values, max(len(p.partition(".")[2]) for p in text.split(":")))


PERCENTILE_LIST_MAX = 20  # fio's FIO_IO_U_LIST_MAX_LEN


def fraction(text: str) -> float:
    """fio's zone_reset_threshold/zone_reset_frequency: a float between 0 and 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"{text!r} (between 0 and 1)")
    return value


def bounded(lo: int, hi: int | None = None, conv: Callable[[str], int] = integer) -> Callable[[str], int]:
    """fio's minval/maxval: fio fails parsing a value outside them (``failed parsing iodepth=0``),
    so it is refused here too -- taken, it ran clamped (``iodepth=0`` as 1, ``bs=0`` as 4 KiB) or
    drew from a mix no job file can mean (``rwmixread=150``)."""
    def parse(text: str) -> int:
        value = conv(text)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{text!r} ({f'at least {lo}' if hi is None else f'between {lo} and {hi}'})")
        return value
    return parse


MAX_OPEN_ZONES = 4096  # fio's own limit on max_open_zones (ZBD_MAX_OPEN_ZONES)
open_zones = bounded(0, MAX_OPEN_ZONES)
percentage = bounded(0, 100)
# a count: fio gives these no minval, and stores -1 as 4294967295 files, loops or IOPS; blockemu
# took it as none (nrfiles=-1 as one file, fsync=-1 as never) and the run reported clean
nonnegative = bounded(0)


ERROR_KINDS = ("read", "write", "verify")  # fio's error types: continue_on_error and ignore_error lists


def continue_on(text: str) -> frozenset[str]:
    """``continue_on_error``: the error types a job goes on past (fio's none|read|write|io|verify|all|0|1)."""
    kinds = {"none": (), "0": (), "read": ("read",), "write": ("write",), "io": ("read", "write"),
             "verify": ("verify",), "all": ERROR_KINDS, "1": ERROR_KINDS, "": ERROR_KINDS}
    if text not in kinds:
        raise ValueError(f"{text!r} (expected one of none, read, write, io, verify, all)")
    return frozenset(kinds[text])


def ignore_errors(text: str) -> tuple[frozenset[int] | None, ...]:
    """``ignore_error=READ_LIST,WRITE_LIST,VERIFY_LIST``, each a ``:``-separated list of errno
    names or numbers; an empty list keeps fio's default for that type (EIO, EILSEQ)."""
    lists = text.split(",")
    if len(lists) > 3:
        raise ValueError(f"{text!r} (at most three lists: read, write, verify)")
    out: list[frozenset[int] | None] = []
    for part in lists + [""] * (3 - len(lists)):
        codes = set()
        for name in filter(None, (n.strip() for n in part.split(":"))):
            code = int(name) if name.isdigit() else getattr(errno, name.upper(), None)
            if code is None or code not in errno.errorcode:
                raise ValueError(f"{name!r} is not an errno name or number")
            codes.add(code)
        out.append(frozenset(codes) or None)
    return tuple(out)


def engine(text: str) -> str:
    if text not in SYNC_ENGINES + ASYNC_ENGINES:
        raise Unsupported(f"ioengine={text} is not supported (blockemu runs file engines: "
                          f"{', '.join(SYNC_ENGINES + ASYNC_ENGINES)})")
    return text


class Unsupported(ValueError):
    """A value fio knows that blockemu cannot run (as opposed to a malformed one)."""


VERIFY_TYPES = ("0", "null", "md5", "crc64", "crc32c", "crc32c-intel", "crc32", "crc16", "crc7", "xxhash", "sha1",
                "sha256", "sha512", "sha3-224", "sha3-256", "sha3-384", "sha3-512", "meta", "pattern")

# name -> converter: fio's options as blockemu runs them, then blockemu's own job kinds and knobs.
OPTIONS: dict[str, Callable[[str], Any]] = {
    "name": str, "description": str, "filename": file_names, "directory": str, "filename_format": str,
    "wait_for": str, "rw": parse_rw, "rw_sequencer": choice("sequential", "identical"),
    "bs": per_direction(bounded(1, conv=size)), "bsrange": per_direction(bs_range), "bssplit": per_direction(bs_split),
    "bs_unaligned": parse_bool, "ba": per_direction(bounded(1, conv=size)), "thinktime": parse_usec, "thinktime_spin": parse_usec,
    "thinktime_blocks": integer, "size": size_or_share, "filesize": file_size, "io_size": size_or_share,
    "offset": size_or_share,
    "offset_increment": size_or_zones, "number_ios": nonnegative, "nrfiles": nonnegative, "file_service_type": choice(
        "roundrobin", "random", "sequential"),
    "numjobs": bounded(1), "iodepth": bounded(1), "ioengine": engine, "runtime": parse_time, "time_based": parse_bool,
    "ramp_time": parse_time, "startdelay": parse_time, "loops": nonnegative, "fsync": nonnegative, "fdatasync": nonnegative,
    "end_fsync": parse_bool, "fsync_on_close": parse_bool, "randseed": integer, "randrepeat": parse_bool,
    "allrandrepeat": parse_bool, "norandommap": parse_bool, "random_distribution": distribution,
    "verify": choice(*VERIFY_TYPES), "do_verify": parse_bool, "verify_fatal": parse_bool,
    "verify_pattern": verify_pattern, "verify_interval": size, "verify_backlog": integer,
    "verify_backlog_batch": integer, "rwmixread": percentage, "rwmixwrite": percentage,
    "rate": per_direction(size), "rate_iops": per_direction(nonnegative), "rate_min": per_direction(size),
    "rate_iops_min": per_direction(nonnegative), "rate_process": choice("linear", "poisson"),
    "fill_device": parse_bool, "steadystate": steadystate, "steadystate_duration": parse_time,
    "steadystate_ramp_time": parse_time, "latency_target": parse_usec, "latency_window": parse_usec,
    "latency_percentile": percent, "latency_run": parse_bool, "max_latency": per_direction(parse_usec),
    "zonemode": choice("none", "strided", "zbd"), "zonesize": size, "zonerange": size, "zoneskip": size_or_zones,
    "zonecapacity": size, "read_beyond_wp": parse_bool, "max_open_zones": open_zones,
    "job_max_open_zones": open_zones, "ignore_zone_limits": parse_bool, "zone_reset_threshold": fraction,
    "zone_reset_frequency": fraction, "flow": integer,
    "flow_id": integer, "flow_sleep": parse_usec, "sync": choice("0", "1", "none", "sync", "dsync"),
    "stonewall": parse_bool, "new_group": parse_bool, "group_reporting": parse_bool, "thread": parse_bool,
    "exitall": parse_bool, "exit_what": choice("group", "stonewall", "all"), "unlink": parse_bool,
    "unlink_each_loop": parse_bool,
    "refill_buffers": parse_bool, "zero_buffers": parse_bool, "scramble_buffers": parse_bool,
    "overwrite": parse_bool, "create_on_open": parse_bool, "create_only": parse_bool, "pre_read": parse_bool,
    "allow_file_create": parse_bool, "create_serialize": parse_bool,
    "create_fsync": parse_bool, "percentile_list": percentiles, "clat_percentiles": parse_bool,
    "lat_percentiles": parse_bool, "slat_percentiles": parse_bool, "unified_rw_reporting": unified_reporting,
    "continue_on_error": continue_on,
    "ignore_error": ignore_errors, "error_dump": parse_bool,
    "trim_percentage": percentage, "trim_verify_zero": parse_bool, "trim_backlog": integer,
    "trim_backlog_batch": integer,
    "buffer_pattern": verify_pattern, "buffer_compress_percentage": percentage, "buffer_compress_chunk": size,
    "dedupe_percentage": percentage, "dedupe_mode": choice("repeat", "working_set"),
    "dedupe_working_set_percentage": percentage, "dedupe_global": parse_bool,
    # documented no-ops: the emulated filesystem has no page cache bypass, no preallocation and
    # no readahead to advise, and asyncio tasks are neither threads nor processes
    "direct": parse_bool, "buffered": parse_bool, "invalidate": parse_bool, "fallocate": str,
    "fadvise_hint": str, "atomic": parse_bool, "random_generator": str, "kb_base": str, "unit_base": str,
    # blockemu
    "kind": choice("fio", "mix", "keyrace", "fsck", "script", "faults"),
    "ops": parse_ops, "nops": nonnegative, "key_removal": choice("soft", "hard", "sync", "deny-writes"),
    "schedule": choice("free", "seeded"), "encrypt": parse_bool, "script": str, "faults": str,
    "image_size": parse_size, "check_data": parse_bool,
}

# blockemu's options that set up the run's one mount, read from [global] only: in a job's
# section they would be taken and ignored (an encrypt=1 there wrote the job's files in plain)
RUN_WIDE = {"encrypt": "encrypts the run's directory, /enc-jobs, for every job",
            "image_size": "sizes the image the run makes, for every job"}

# blockemu's options that only one kind of job reads: in another kind's section they would be
# taken and ignored (faults= on a fio job injected nothing)
KIND_OPTIONS = {
    "key_removal": (("keyrace",), "in a job's section sets a keyrace job's own mode; the mount's, which every "
                                  "other job runs under, is set in [global]"),
    "faults": (("faults",), "is read by a kind=faults job (it sets the device's faults for the jobs after it)"),
    "script": (("script",), "is read by a kind=script job"),
    "check_data": (("fsck",), "is read by a kind=fsck job"),
    "schedule": (("keyrace",), "is read by a kind=keyrace job"),
    "nops": (("mix", "keyrace"), "is read by kind=mix and kind=keyrace jobs"),
    "ops": (("mix",), "is read by a kind=mix job"),
}

ALIASES = {"readwrite": "rw", "blocksize": "bs", "blocksize_range": "bsrange", "io_limit": "io_size",
           "fileoffset": "offset", "nr_files": "nrfiles", "timeout": "runtime", "wait_for_previous": "stonewall",
           "blocksize_unaligned": "bs_unaligned", "iomem": "mem", "iomem_align": "mem_align", "ratemin": "rate_min", "ratecycle": "rate_cycle",
           "disable_bw": "disable_bw_measurement", "blockalign": "ba", "fill_fs": "fill_device",
           "threads": "thread", "ss": "steadystate", "ss_dur": "steadystate_duration",
           "ss_ramp": "steadystate_ramp_time"}

# Options that only shape logging, measurement overhead, CPU/NUMA placement or how an engine
# talks to the kernel: accepted, and listed as ignored in the output.
IGNORED = frozenset("""
write_bw_log write_lat_log write_iops_log write_hist_log bwavgtime iopsavgtime log_entries log_avg_msec
log_hist_msec log_hist_coarseness log_max_value log_offset log_prio log_compression log_compression_cpus
log_store_compressed log_unix_epoch log_alternate_epoch log_alternate_epoch_clock_id per_job_logs gtod_reduce
gtod_cpu disable_lat disable_clat disable_slat disable_bw_measurement clocksource cpumask cpus_allowed
cpus_allowed_policy numa_cpu_nodes numa_mem_policy nice prio prioclass ioscheduler lockmem mem mem_align hugepage-size
disk_util significant_figures stats block_error_percentiles io_submit_mode iodepth_batch iodepth_batch_submit
iodepth_batch_complete iodepth_batch_complete_min iodepth_batch_complete_max iodepth_low write_hint cgroup
cgroup_nodelete cgroup_weight uid gid http_verbose hipri hipri_percentage fixedbufs registerfiles
sqthread_poll sqthread_poll_cpu nonvectored uncached nowait force_async userspace_reap cmdprio_percentage
cmdprio_class cmdprio cmdprio_bssplit verify_async verify_dump
""".split())

# The rest of fio's options: known, and refused by name rather than as typos.
UNSUPPORTED = frozenset("""
lockfile unique_filename opendir serialize_overlap file_append offset_align percentage_random
openfiles write_barrier sync_file_range verify_only verify_offset experimental_verify verify_state_load
verify_state_save write_iolog read_iolog
read_iolog_chunked replay_no_stall replay_redirect replay_scale replay_align replay_time_scale replay_skip
merge_blktrace_file merge_blktrace_scalars merge_blktrace_iters exec_prerun exec_postrun thinktime_blocks_type thinktime_iotime rate_cycle rate_ignore_thinktime allow_mounted_write exitall_on_error
profile rwmixcycle
""".split())


@dataclass
class Job:
    name: str
    options: dict[str, Any]
    line: int
    group: int = 0  # fio's reporting group (groupid): stonewall and new_group start a new one
    barrier: int = 0  # jobs run only after every job of a lower barrier (stonewall) has finished
    raw: dict[str, str] = field(default_factory=dict)  # this section's own options as written

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    @property
    def ignored(self) -> list[str]:
        """Options accepted but without effect here (logging, CPU placement, engine tuning)."""
        return sorted(k for k in self.options if k in IGNORED)


@dataclass
class JobFile:
    path: str
    globals: dict[str, Any] = field(default_factory=dict)  # the last [global] (mount-level options)
    jobs: list[Job] = field(default_factory=list)
    global_raw: dict[str, str] = field(default_factory=dict)  # every [global] option as written


def _expand(text: str) -> str:
    """``${VAR}`` is the environment variable, or nothing when it is unset (as in fio)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(m[1], ""), text)


def _convert(key: str, value: str) -> tuple[str, Any]:
    """The canonical option name and its value, or the reason it cannot be used."""
    name = ALIASES.get(key, key)
    if name in OPTIONS:
        try:
            return name, OPTIONS[name](value)  # a bare key is "" -- true for booleans, an error otherwise
        except Unsupported as e:
            raise InvalidArgument(str(e)) from None
        except (ValueError, InvalidArgument) as e:
            raise InvalidArgument(f"bad value for {key}: {e}") from None
    if name in IGNORED:
        return name, value
    if name in UNSUPPORTED:
        raise InvalidArgument(f"fio option {key!r} is not supported")
    raise InvalidArgument(f"unknown option {key!r}")


def _lines(text: str, path: str, depth: int = 0) -> Iterator[tuple[str, int, str]]:
    """The file's option and section lines (comments stripped), each with where it was written
    and its line number there. fio's include is textual, so an included file's lines are read in
    its place, sections and all: its jobs start from the [global] options in force at the
    include (they started from none, a [global] bs= or size= before it lost to them), and what
    follows it is in its last section. Every option then meets the same checks wherever it was
    written (encrypt= brought into a job's section is refused as if written there)."""
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        line = raw.split(";", 1)[0].split("#", 1)[0].strip()
        if line.startswith("include "):
            inc = Path(path).parent / line[8:].strip()
            if depth > 8:
                raise InvalidArgument(f"{where}: include nested too deeply")
            yield from _lines(read_text(inc, f"{where}: include {inc}"), str(inc), depth + 1)
        elif line:
            yield where, lineno, line


def parse(text: str, path: str = "<string>") -> JobFile:
    """Every problem in the file is collected and reported at once, each with file:line."""
    jf = JobFile(path)
    errors: list[str] = []
    scope: dict[str, Any] = {}  # the [global] options in force
    current: Job | None = None
    for where, lineno, line in _lines(text, path):
        m = re.fullmatch(r"\[([^\]]+)\]", line)
        if m:
            section = m[1].strip()
            if section == "global":
                current = None
                scope = dict(scope)
                jf.globals = scope
            else:
                current = Job(section, dict(scope), lineno)
                jf.jobs.append(current)
            continue
        if line.startswith("["):
            raise InvalidArgument(f"{where}: malformed section header {line!r} (expected [name])")
        key, _, value = line.partition("=")
        key, value = key.strip(), _expand(value.strip())
        try:
            name, converted = _convert(key, value)
        except InvalidArgument as e:
            errors.append(f"{where}: {e}")
            continue
        raw_opts = current.raw if current is not None else jf.global_raw
        if "=" in line:  # fio's "job options" leave bare flags (stonewall, group_reporting) out
            raw_opts[key] = value
        if current is not None and name in RUN_WIDE:
            errors.append(f"{where}: {key}= {RUN_WIDE[name]}: put it in [global] (in a job's section it "
                          "would change nothing)")
            continue
        if current is not None:
            current.options[name] = converted
        else:
            scope[name] = converted
            jf.globals = scope
    for job in jf.jobs:
        errors += [f"{path}:{job.line}: job {job.name}: {e}" for e in _count_zones(job)]
        kind = job.get("kind", "fio")
        errors += [f"{path}:{job.line}: job {job.name}: {key}= {why}" for key, (kinds, why) in KIND_OPTIONS.items()
                   if key in job.raw and kind not in kinds]
    if errors:
        raise InvalidArgument("; ".join(errors))
    group = barrier = 0
    for i, job in enumerate(jf.jobs):
        if i and job.options.get("stonewall"):
            barrier += 1
        if i and (job.options.get("stonewall") or job.options.get("new_group")):
            group += 1
        job.group, job.barrier = group, barrier
    if not jf.jobs:
        raise InvalidArgument(f"{path}: no jobs")
    return jf


ZONE_SIZED = ("size", "io_size", "offset", "offset_increment", "zoneskip")  # the options fio takes in zones


def _count_zones(job: Job) -> list[str]:
    """``524z`` in bytes: the count times the job's zone size (fio does it once the zones are
    known; an emulated zoned file's zones are ``zonesize`` long). Without a zone size, why not."""
    problems = []
    for key in ZONE_SIZED:
        value = job.options.get(key)
        if isinstance(value, Zones):
            if job.get("zonemode", "none") == "none" or not job.get("zonesize"):
                problems.append(f"{key}={value.count}z is a number of zones, which needs zonemode=zbd (or strided) "
                                f"and zonesize=")
            else:
                job.options[key] = value.count * job.get("zonesize")
    return problems


def read_text(path: str | Path, what: str) -> str:
    """A job file's text, or one line saying why not: a file that is not UTF-8 (a binary given
    by mistake, a name in Latin-1) was a UnicodeDecodeError traceback."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(f"{what}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what}: not a text file (byte {e.start} is not UTF-8)") from None


def load(path: str) -> JobFile:
    return parse(read_text(path, path), path)
