"""Small helpers shared by the tests."""
from __future__ import annotations

import errno


class ErrnoCheck:
    """``with ErrnoCheck(errno.ENOKEY): ...``: the block must raise an OSError with that errno."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __enter__(self) -> "ErrnoCheck":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        assert exc is not None, f"expected errno {errno.errorcode[self.code]}"
        assert isinstance(exc, OSError) and exc.errno == self.code, (exc, errno.errorcode[self.code])
        return True
