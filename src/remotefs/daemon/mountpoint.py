"""Checks on the mountpoint before anything is mounted, with the fix in every message.

Mounting over a non-empty directory hides its files; mounting over a stale FUSE mount (a
daemon killed with -9 leaves one: "Transport endpoint is not connected") fails obscurely
inside libfuse. Both are caught here, before the daemon starts.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

#: The kernel's mount table as this process sees it (tests pass a fake one).
MOUNT_TABLE = Path("/proc/self/mounts")


class MountpointError(Exception):
    """The mountpoint cannot be used; the message says why and what to do."""


def check_mountpoint(path: Path, mount_table: Path = MOUNT_TABLE) -> Path:
    """Return the absolute mountpoint after checking it is an empty, unmounted directory.

    An autofs mount there is accepted: it is systemd's automount point (x-systemd.automount),
    and mounting on top of it is what the automount waits for.
    """
    absolute = Path(os.path.abspath(path))
    try:
        info = os.stat(absolute)
    except FileNotFoundError:
        raise MountpointError(
            f"mountpoint {absolute} does not exist; create it with: mkdir -p {absolute}"
        ) from None
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountpointError(_stale(absolute)) from None
        raise MountpointError(f"mountpoint {absolute}: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise MountpointError(f"mountpoint {absolute} is not a directory")
    try:
        entries = os.listdir(absolute)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountpointError(_stale(absolute)) from None
        raise MountpointError(f"mountpoint {absolute}: {err.strerror}") from None
    if mount_types(mount_table).get(str(absolute), "autofs") != "autofs":
        raise MountpointError(
            f"mountpoint {absolute} is already a mount point; unmount it first:"
            f" remotefs unmount {absolute}"
        )
    if entries:
        raise MountpointError(
            f"mountpoint {absolute} is not empty ({len(entries)} entries); mounting would"
            " hide them: use an empty directory"
        )
    return absolute


def _stale(path: Path) -> str:
    # The kernel may still answer stat() of a dead FUSE mount from its attribute cache;
    # listing the directory always reaches the (dead) daemon, so both paths end up here.
    return (
        f"mountpoint {path} is a stale FUSE mount (transport endpoint is not connected),"
        f" left by a daemon that died; clear it with: fusermount3 -u {path}"
        f"   (or: umount -l {path})"
    )


def mount_types(table: Path = MOUNT_TABLE) -> dict[str, str]:
    """The filesystem type of the topmost mount at each mountpoint of *table*.

    Mountpoints have their octal escapes (``\\040``) decoded. The mount table is the reliable
    source: `os.path.ismount` says False for a stale FUSE mount, whose every stat call fails.
    """
    try:
        with open(table, encoding="utf-8", errors="surrogateescape") as lines:
            rows = [line.split(" ") for line in lines.read().splitlines()]
    except OSError:
        return {}
    return {
        _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1]): fields[2]
        for fields in rows
        if len(fields) >= 3
    }


def mounted_paths(table: Path = MOUNT_TABLE) -> set[str]:
    """Mountpoints listed in *table*, octal escapes decoded."""
    return set(mount_types(table))


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
