#!/usr/bin/env python3
"""The fuzz campaigns moved into the package as ``blockemu fuzz`` (blockemu/cli/fuzz.py);
this keeps the old command line working: ``python tools/fuzz_fsck.py [blockemu fuzz options]``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockemu.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fuzz", *sys.argv[1:]]))
