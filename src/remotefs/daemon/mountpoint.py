"""Checks on the mountpoint before anything is mounted, with the fix in every message.

Mounting over a non-empty directory hides its files; mounting over a stale FUSE mount (a
daemon killed with -9 leaves one: "Transport endpoint is not connected") fails obscurely
inside libfuse. Both are caught here, before the daemon starts.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class MountpointError(Exception):
    """The mountpoint cannot be used; the message says why and what to do."""


def check_mountpoint(path: Path) -> Path:
    """Return the absolute mountpoint after checking it is an empty, unmounted directory."""
    absolute = Path(os.path.abspath(path))
    try:
        info = os.stat(absolute)
    except FileNotFoundError:
        raise MountpointError(
            f"mountpoint {absolute} does not exist; create it with: mkdir -p {absolute}"
        ) from None
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountpointError(
                f"mountpoint {absolute} is a stale FUSE mount (transport endpoint is not"
                " connected), left by a daemon that died; clear it with:"
                f" fusermount3 -u {absolute}   (or: umount -l {absolute})"
            ) from None
        raise MountpointError(f"mountpoint {absolute}: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise MountpointError(f"mountpoint {absolute} is not a directory")
    if os.path.ismount(absolute):
        raise MountpointError(
            f"mountpoint {absolute} is already a mount point; unmount it first:"
            f" remotefs unmount {absolute}"
        )
    try:
        entries = os.listdir(absolute)
    except OSError as err:
        raise MountpointError(f"mountpoint {absolute}: {err.strerror}") from None
    if entries:
        raise MountpointError(
            f"mountpoint {absolute} is not empty ({len(entries)} entries); mounting would"
            " hide them: use an empty directory"
        )
    return absolute
