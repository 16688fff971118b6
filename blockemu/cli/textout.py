"""Standard output that prints any name: Linux names are bytes, and an image holds names that
are not UTF-8 (``ls`` shows them as ls(1) does, their bytes). Python writes such a name (a str
with surrogate escapes) as its bytes only in the C/POSIX locale or UTF-8 mode; under
``LANG=en_US.UTF-8`` its stdout is strict, and ``blockemu ls`` of such a name ended in a
UnicodeEncodeError traceback."""
from __future__ import annotations

import codecs
import io
import sys


def print_any_name() -> None:
    """A strict stdout writes what it cannot encode instead of raising: in a UTF-8 locale a
    name's own bytes (surrogateescape, as the C locale gets), in another encoding escaped
    (backslashreplace, as Python's stderr does) -- never a traceback mid-listing."""
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper) and out.errors == "strict":
        utf8 = codecs.lookup(out.encoding).name == "utf-8"
        out.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")
