"""fio job-file syntax, parsed by our own small parser (sans-I/O).

What fio accepts and configparser does not: repeated ``[global]`` sections that
apply only to the jobs below them, bare keys (``time_based``), ``;`` and ``#``
comments, ``${ENV}`` expansion, ``include FILE``. Every key is checked against
the options we know, so a typo is an error naming the file and line (fio's
``--warnings-fatal``), and every value is converted here, once.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from blockemu.errors import InvalidArgument
from blockemu.units import parse_size


def parse_time(text: str) -> float:
    """fio time values: a bare number is seconds; suffixes us, ms, s, m, h, d."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|min|h|d)?\s*", text)
    if not m:
        raise ValueError(text)
    scale = {None: 1, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[m[2]]
    return float(m[1]) * scale


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on", ""):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def parse_ops(text: str) -> dict[str, int]:
    """fsstress-like weights: ``write:10,fsync:2,rename:1``."""
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition(":")
        out[name.strip()] = int(weight) if weight else 1
    return out


def choice(*allowed: str) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} (expected one of {', '.join(allowed)})")
        return text
    return conv


def ignored(text: str) -> str:
    return text


# name -> converter. fio's common options, then blockemu's own job kinds and knobs.
OPTIONS: dict[str, Callable[[str], Any]] = {
    "name": str, "description": str, "filename": str, "directory": str,
    "rw": choice("read", "write", "randread", "randwrite", "rw", "readwrite", "randrw"),
    "readwrite": choice("read", "write", "randread", "randwrite", "rw", "readwrite", "randrw"),
    "bs": parse_size, "blocksize": parse_size, "size": parse_size, "filesize": parse_size,
    "numjobs": int, "iodepth": int, "runtime": parse_time, "time_based": parse_bool, "fsync": int,
    "fdatasync": int, "end_fsync": parse_bool, "fsync_on_close": parse_bool, "randseed": int,
    "verify": choice("0", "crc32c", "crc32", "md5", "sha256", "sha1", "xxhash", "pattern", "meta", "null"),
    "do_verify": parse_bool, "verify_fatal": parse_bool, "rwmixread": int, "rwmixwrite": int, "loops": int,
    "stonewall": parse_bool, "wait_for_previous": parse_bool, "new_group": parse_bool, "group_reporting": parse_bool,
    "startdelay": parse_time, "ramp_time": parse_time, "thread": parse_bool, "randrepeat": parse_bool,
    "norandommap": parse_bool, "refill_buffers": parse_bool, "overwrite": parse_bool, "create_on_open": parse_bool,
    # accepted so real job files run unmodified; the emulated filesystem has no such choice to make
    "ioengine": ignored, "direct": ignored, "buffered": ignored, "invalidate": ignored, "unlink": ignored,
    "lat_percentiles": ignored, "clat_percentiles": ignored, "percentile_list": ignored, "output-format": ignored,
    # blockemu
    "kind": choice("fio", "mix", "keyrace", "ledger", "fsck", "script", "faults"),
    "ops": parse_ops, "nops": int, "key_removal": choice("soft", "hard", "sync", "deny-writes"),
    "schedule": choice("free", "seeded"), "encrypt": parse_bool, "script": str, "faults": str,
    "image_size": parse_size, "check_data": parse_bool, "appends": int, "power_cut_after": int,
}


@dataclass
class Job:
    name: str
    options: dict[str, Any]
    line: int
    group: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass
class JobFile:
    path: str
    globals: dict[str, Any] = field(default_factory=dict)  # the last [global] (mount-level options)
    jobs: list[Job] = field(default_factory=list)


def _expand(text: str, where: str) -> str:
    def env(m: re.Match) -> str:
        if m[1] not in os.environ:
            raise InvalidArgument(f"{where}: environment variable ${{{m[1]}}} is not set")
        return os.environ[m[1]]
    return re.sub(r"\$\{(\w+)\}", env, text)


def parse(text: str, path: str = "<string>", _depth: int = 0) -> JobFile:
    jf = JobFile(path)
    scope: dict[str, Any] = {}  # the [global] options in force
    current: Job | None = None
    group = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        line = raw.split(";", 1)[0].split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include "):
            inc = Path(path).parent / line[8:].strip()
            if _depth > 8:
                raise InvalidArgument(f"{where}: include nested too deeply")
            try:
                included = inc.read_text()
            except OSError as e:
                raise InvalidArgument(f"{where}: include {inc}: {e.strerror}") from None
            sub = parse(included, str(inc), _depth + 1)
            scope.update(sub.globals)
            jf.jobs.extend(sub.jobs)
            continue
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
        key, value = key.strip(), _expand(value.strip(), where)
        if key not in OPTIONS:
            raise InvalidArgument(f"{where}: unknown option {key!r}")
        try:
            converted = OPTIONS[key](value)  # a bare key is "" -- true for booleans, an error otherwise
        except (ValueError, InvalidArgument) as e:
            raise InvalidArgument(f"{where}: bad value for {key}: {e}") from None
        target = current.options if current is not None else scope
        target[key] = converted
        if current is None:
            jf.globals = scope
    for job in jf.jobs:
        if job.options.get("stonewall") or job.options.get("wait_for_previous") or job.options.get("new_group"):
            group += 1
        job.group = group
    if not jf.jobs and not _depth:
        raise InvalidArgument(f"{path}: no jobs")
    return jf


def load(path: str) -> JobFile:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(f"{path}: {e.strerror}") from None
    return parse(text, path)
