"""Small helpers shared by the tests."""
from __future__ import annotations

import errno

KEY = bytes(range(1, 65))  # the test master key; KID is its fscrypt identifier
KID = "69b2f6edeee720cce0577937eb8a6751"


async def encrypted_dir(fs, path: str, key: bytes = KEY) -> str:
    """Add ``key`` and make ``path`` a new directory encrypted with it; returns the key id."""
    kid = await fs.add_key(key)
    await fs.mkdir(path)
    await fs.set_policy(path, kid)
    return kid


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
