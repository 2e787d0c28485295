"""Periodic, debounced saving of every cached file's bitmap.

Saving on every block would fsync hundreds of times a second; saving only at unmount would
lose a whole session's progress to a crash (what rclone and httpdirfs do). A checkpoint every
few seconds bounds both: at most one interval of downloads is fetched again after a kill -9.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio

from .cached_file import CachedFile

log = logging.getLogger(__name__)


async def save_all(files: Iterable[CachedFile]) -> None:
    """Save every dirty file; a failure on one file is logged and does not stop the others."""
    for cached in list(files):
        if not cached.dirty:
            continue
        try:
            await cached.save()
        except OSError as err:
            log.warning("%s: could not save cache state: %s", cached.name, err)


async def run_checkpointer(files: Callable[[], Iterable[CachedFile]], interval: float) -> None:
    """Save dirty bitmaps every *interval* seconds until cancelled."""
    while True:
        await trio.sleep(interval)
        await save_all(files())
