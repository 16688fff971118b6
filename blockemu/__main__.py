"""``python -m blockemu``: the ``blockemu`` command. Run from a checkout whose dependencies pip
never installed, the import below fails deep in a layer (construct, cryptography, ...): one
line naming the package and the way in, not a traceback."""
import sys

try:
    from blockemu.cli.main import main
except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] == "blockemu":
        raise
    sys.exit(f"blockemu: the Python package {e.name!r} is not installed: "
             "python3 -m venv .venv && .venv/bin/pip install -e . (the README's first command)")

sys.exit(main())
