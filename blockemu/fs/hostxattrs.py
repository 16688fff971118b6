"""What ``mkfs --rootdir`` leaves behind of its host entries' extended attributes.

The image keeps no xattrs (SPEC: an XATTR_ITEM's data is unused; a mount answers ENOSYS), so
mkfs.btrfs's copying of them has no place here. Dropping them unsaid lost POSIX ACLs and file
capabilities -- a binary that worked by its capability no longer does -- while the fifos and
sockets mkfs skips were named. So each kind dropped is said in one line per run (not per entry,
which a labelled host -- every file's security.selinux -- would make thousands of).
"""
from __future__ import annotations

import os
from typing import Iterable

ACL, CAPABILITY, OTHER = "POSIX ACLs", "file capabilities", "extended attributes"


def kind(name: str) -> str:
    """The kind an xattr's name says it is."""
    if name.startswith("system.posix_acl_"):
        return ACL
    if name == "security.capability":
        return CAPABILITY
    return OTHER


def dropped(hosts: Iterable[str]) -> dict[str, tuple[int, str]]:
    """By kind, the host entries that hold xattrs of it: their count and the first. An entry
    whose xattrs cannot be listed (its filesystem has none: ENOTSUP; gone since the walk) holds none."""
    found: dict[str, tuple[int, str]] = {}
    for host in hosts:
        try:
            names = os.listxattr(host, follow_symlinks=False)
        except OSError:
            continue
        for k in {kind(name) for name in names}:
            count, first = found.get(k, (0, host))
            found[k] = (count + 1, first)
    return found


def lines(found: dict[str, tuple[int, str]]) -> list[str]:
    """One line per kind dropped, in a fixed order."""
    return [f"blockemu mkfs: not copied: the {k} of {count} host entr{'y' if count == 1 else 'ies'} "
            f"(first {first}): the image keeps no xattrs"
            for k in (ACL, CAPABILITY, OTHER) if k in found for count, first in [found[k]]]
