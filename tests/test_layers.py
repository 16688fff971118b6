"""The import contract of DESIGN.md §2, enforced over the source's AST.

Each package of ``blockemu`` is a layer; a module may import its own package and
the layers below it, never one above. The format and engine layers are sans-I/O:
no asyncio, no aiofiles, no os/io/mmap -- a block they lack arrives through a
callable their owner passes in. The check reads imports statically (including
those under ``TYPE_CHECKING`` and inside functions), so a lazy import cannot
hide an upward dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "blockemu"

# Bottom to top. The common modules (errors, units, display) sit below everything.
LAYERS = ["common", "ondisk", "engine", "device", "crypto", "fs", "check", "workload", "fuse", "cli", "api"]
COMMON = {"errors", "units", "display"}
SANS_IO = {"ondisk", "engine"}
IO_MODULES = {"asyncio", "aiofiles", "os", "io", "mmap", "socket", "subprocess", "threading", "concurrent"}


def layer_of(module: str) -> str:
    """``blockemu.fs.writeback`` -> ``fs``; the package root and ``__main__`` are the API on top."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "api"
    return "common" if parts[1] in COMMON else parts[1]


def imports_of(source: str, module: str, is_package: bool) -> list[str]:
    """Every module a source imports, made absolute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            if target == "blockemu" or (node.level and not node.module):  # from blockemu import fs
                found += [f"{target}.{alias.name}" for alias in node.names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What this module imports against the contract, one line each."""
    here = layer_of(module)
    bad = []
    for target in imports_of(source, module, is_package):
        root = target.split(".")[0]
        if root == "blockemu":
            if target == "blockemu":
                continue
            there = layer_of(target)
            if LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{module} ({here}) imports {target} ({there}): upward")
        elif here in SANS_IO and root in IO_MODULES:
            bad.append(f"{module} ({here}) imports {target}: the {here} layer does no I/O")
    return bad


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_module_keeps_the_import_contract(module: str, path: Path) -> None:
    assert violations(path.read_text(), module, path.name == "__init__.py") == []


def test_every_package_says_what_it_may_import() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init.parent.name}/__init__.py does not state its imports"


def test_the_check_catches_what_it_forbids() -> None:
    """The contract test itself can fail: asyncio in the engine, or an upward import, is reported."""
    assert violations("import asyncio\n", "blockemu.engine.btree")
    assert violations("from os import pread\n", "blockemu.ondisk.items")
    assert violations("from blockemu.fs.filesystem import Filesystem\n", "blockemu.engine.extents")
    assert violations("from ..fs import pagecache\n", "blockemu.crypto.sealer")
    assert violations("from blockemu import fs\n", "blockemu.device.image")
    assert not violations("from blockemu.engine.btree import BTree\n", "blockemu.fs.volume")
    assert not violations("import asyncio\n", "blockemu.fs.writeback")
