"""What a person sees of long work and of results: progress bars on a terminal (silent
when piped or with --json) and plain-text tables, both drawn by rich -- one mechanism for
every command, so they look alike and nothing formats columns by hand."""
from __future__ import annotations

import errno
import io
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from blockemu.errors import BlockemuError


class Advance(Protocol):
    def __call__(self, n: int = 1, description: str | None = None) -> None: ...


def wanted(flag: bool | None, json_out: bool = False) -> bool:
    """--progress/--no-progress win; otherwise only when stderr is a terminal and output is not JSON."""
    return flag if flag is not None else (sys.stderr.isatty() and not json_out)


@contextmanager
def bar(description: str, total: int | None, enabled: bool) -> Iterator[Advance]:
    """A bar on stderr; the callable it yields advances it by ``n`` and may rename the step."""
    if not enabled:
        yield lambda n=1, description=None: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as p:
        task = p.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            p.update(task, advance=n, description=description) if description else p.advance(task, n)

        yield advance


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns, no box and no colour: it reads the same on a terminal, in a
    pipe and in a test that splits it into words."""
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
