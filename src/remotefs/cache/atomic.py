"""Crash-safe small-file writes by path (see `safe_fs.atomic_write`, which the cache uses).

After a crash (kill -9 or power loss) a reader finds either the old complete file or the new
complete file, never a torn one.
"""

from __future__ import annotations

from pathlib import Path

from . import safe_fs


def atomic_write(path: Path, data: bytes) -> None:
    """Replace *path* with *data* atomically; the file is created 0600, never through a link."""
    with safe_fs.opened_dir(path.parent) as dir_fd:
        safe_fs.atomic_write(path.name, data, dir_fd=dir_fd)
