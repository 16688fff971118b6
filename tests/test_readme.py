"""The README's two set-up commands are the contract with a fresh machine."""
from pathlib import Path

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
