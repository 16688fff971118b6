"""DESIGN.md §8's Python examples are whole programs, run as they stand: a renamed call, a
missing import or an undefined name fails here, not in a reader's interpreter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def examples() -> list[str]:
    """Each ```python block of §8."""
    text = (ROOT / "DESIGN.md").read_text()
    api = text.split("\n## 8. ", 1)[1].split("\n## ", 1)[0]
    return [part.split("```", 1)[0] for part in api.split("```python\n")[1:]]


def test_section_8_has_its_examples():
    assert len(examples()) == 3


@pytest.mark.parametrize("number", range(len(examples())))
def test_each_section_8_example_runs_as_written(tmp_path, number):
    (tmp_path / "images").mkdir()
    p = subprocess.run([sys.executable, "-c", examples()[number]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
