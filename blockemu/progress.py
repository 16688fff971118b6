"""Progress bars for long work: shown on a terminal, silent when piped or with --json."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Advance = Callable[[int], None]


def wanted(flag: bool | None, json_out: bool = False) -> bool:
    """--progress/--no-progress win; otherwise only when stderr is a terminal and output is not JSON."""
    return flag if flag is not None else (sys.stderr.isatty() and not json_out)


@contextmanager
def bar(description: str, total: int | None, enabled: bool) -> Iterator[Advance]:
    if not enabled:
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
