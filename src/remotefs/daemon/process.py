"""Waiting for a daemon process to finish, as `remotefs unmount` must.

The daemon is not our child (it was forked away and reparented to init), so it cannot be
waited for with waitpid. It counts as finished once it is gone or a zombie: some inits (a
container's PID 1, say) reap late or never, and a zombie has already closed its files, its
FUSE connection and its cache lock.
"""

from __future__ import annotations

import contextlib
import os
import time


def has_exited(pid: int) -> bool:
    """True when *pid* no longer runs (gone, or exited but not reaped yet)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaps it when it happens to be our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return True
    return bool(fields) and fields[0] in ("Z", "X")


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Poll until *pid* has exited; False if it still runs after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if has_exited(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
