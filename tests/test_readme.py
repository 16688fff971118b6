"""The README's two set-up commands are the contract with a fresh machine; its walk-through and
JSON table follow the command line."""
import argparse
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

from blockemu.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_commands():
    lines = [x for x in (ROOT / "README.md").read_text().splitlines() if x.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```sh"
    cmds = setup_commands()
    assert len(cmds) == 2
    assert "images/" in cmds[0] and "mkfs" in cmds[0] and "fsck" in cmds[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


def section(title: str) -> str:
    """The README's text from the heading ``## title`` up to the next ``## `` heading."""
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def walkthrough_commands() -> list[list[str]]:
    """Each ``blockemu`` command of the first-ten-minutes block, as the shell splits it."""
    block = section("First ten minutes").split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(part) for line in block.splitlines() for part in re.split(r"&&|;", line)]
    return [words for words in commands if words[:1] == ["blockemu"]]


def test_walkthrough_commands_parse():
    """The walk-through is run by newcomers as it stands: a renamed or dropped flag must fail
    here, not in their shell. (Parsing only: running it takes a minute and a campaign.)"""
    commands = walkthrough_commands()
    assert len(commands) >= 8
    for words in commands:
        args, extra = build_parser(words[1]).parse_known_args(words[1:])
        assert not extra, words


def json_commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    """Every (sub)command that takes --json, named as typed: ``inspect heatmap``, ``key add``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from json_commands(sub, f"{prefix} {name}".strip())
        elif "--json" in action.option_strings:
            yield prefix


def test_json_table_lists_every_json_command():
    """A command that gains --json gains a row in the README's table of top-level keys."""
    rows = [line.split("|")[1] for line in section("JSON output").splitlines() if line.startswith("| `")]
    named = [name for cell in rows for name in re.findall(r"`([^`]+)`", cell)]
    missing = [c for c in json_commands(build_parser()) if not any(n == c or n.startswith(c + " ") for n in named)]
    assert not missing, missing
