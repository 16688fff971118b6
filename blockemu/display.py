"""What a person sees of long work and of results: progress bars on a terminal (silent
when piped or with --json) and plain-text tables, both drawn by rich -- one mechanism for
every command, so they look alike and nothing formats columns by hand. rich is imported
when something is drawn: a command that draws nothing (``fsck --json``) does not pay for it."""
from __future__ import annotations

import errno
import io
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Protocol

from blockemu.errors import BlockemuError


class Advance(Protocol):
    def __call__(self, n: int = 1, description: str | None = None) -> None: ...


def counted(n: int, noun: str) -> str:
    """``1 error``, ``3 errors``: a count in a message, the noun singular for one."""
    return f"{n} {noun}{'s' * (n != 1)}"


def wanted(flag: bool | None, json_out: bool = False) -> bool:
    """--progress/--no-progress win; otherwise only when stderr is a terminal and output is not JSON."""
    return flag if flag is not None else (sys.stderr.isatty() and not json_out)


@contextmanager
def bar(description: str, total: int | None, enabled: bool) -> Iterator[Advance]:
    """A bar on stderr; the callable it yields advances it by ``n`` and may rename the step."""
    if not enabled:
        yield lambda n=1, description=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as p:
        task = p.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            p.update(task, advance=n, description=description) if description else p.advance(task, n)

        yield advance


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns, no box and no colour: it reads the same on a terminal, in a
    pipe and in a test that splits it into words."""
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_edge=False, header_style="", collapse_padding=True)
    for h in headers:
        t.add_column(h, justify="right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    out = Console(file=io.StringIO(), width=1000, color_system=None, legacy_windows=False)
    out.print(t)
    return "\n".join(line.rstrip() for line in out.file.getvalue().splitlines())  # type: ignore[attr-defined]


class MissingExtra(BlockemuError):
    """A picture was asked for but the optional plotting library is not installed."""

    code = errno.ENOSYS


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend: pictures are files, never windows,
    so they draw the same on a CI machine without a display."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra("drawing needs matplotlib: pip install 'blockemu[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Tally(Protocol):
    def __call__(self, shards: int, states: int, failures: int) -> None: ...


@contextmanager
def tally(description: str, shards: int, enabled: bool, start: tuple[int, int, int] = (0, 0, 0)) -> Iterator[Tally]:
    """A campaign's bar: shards done of all, states checked, failures, states/s and the time
    left. ``start`` is what a resumed run already had: shown, but not counted in the rates."""
    if not enabled:
        yield lambda shards, states, failures: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("shards  {task.fields[states]} states  {task.fields[failures]} failures  "
                             "{task.fields[rate]} states/s  eta"), TimeRemainingColumn(),
                  console=Console(stderr=True)) as p:
        task = p.add_task(description, total=shards, completed=start[0], states=start[1], failures=start[2], rate="-")
        fresh = 0

        def advance(shards: int, states: int, failures: int) -> None:
            nonlocal fresh
            fresh += states
            f = p.tasks[task].fields
            p.update(task, advance=shards, states=f["states"] + states, failures=f["failures"] + failures,
                     rate=f"{fresh / max(time.perf_counter() - t0, 1e-9):.1f}")

        yield advance
