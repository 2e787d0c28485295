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
    if str(absolute) in mounted_paths() and mount_types().get(str(absolute)) != "autofs":
        # An autofs mount is systemd's automount point (x-systemd.automount): the mount
        # goes on top of it, which is what the automount waits for.
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


def mounted_paths() -> set[str]:
    """Mountpoints listed in /proc/self/mounts, octal escapes (``\\040``) decoded.

    The mount table is the reliable source: `os.path.ismount` says False for a stale FUSE
    mount, whose every stat call fails.
    """
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as table:
            lines = table.read().splitlines()
    except OSError:
        return set()
    return {
        _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split(" ")[1])
        for line in lines
        if line.count(" ") >= 2
    }


def mount_types() -> dict[str, str]:
    """The filesystem type of the topmost mount at each mountpoint (/proc/self/mounts)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as table:
            lines = table.read().splitlines()
    except OSError:
        return {}
    types: dict[str, str] = {}
    for line in lines:
        fields = line.split(" ")
        if len(fields) >= 3:
            types[_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])] = fields[2]
    return types


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
