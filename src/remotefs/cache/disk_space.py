"""The free-space reserve of the cache filesystem, which background downloads never touch.

Idle fill of one large file used to take a 2 GiB cache filesystem to 100% in seconds, and
with it everything else on that filesystem. Background fill and ``remotefs prefetch`` now
check the filesystem's free space before each chunk and pause while storing the chunk would
leave less than the reserve (``--min-free``; by default 5% of the filesystem or 2 GiB,
whichever is smaller, as mountpoint-s3 and catfs keep some room free). Reads still cache
what they fetch until the disk is really full, and then go on uncached (see the fetcher).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

GiB = 1 << 30
#: How often a paused fill looks at the free space again.
RECHECK_INTERVAL = 5.0


def default_reserve(total: int) -> int:
    """5% of a filesystem of *total* bytes, or 2 GiB, whichever is smaller."""
    return min(total * 5 // 100, 2 * GiB)


@dataclass(frozen=True)
class ReserveStatistics:
    """A snapshot for `remotefs status`."""

    free: int
    total: int
    reserve: int
    #: Why background downloads wait, or None while they may go on.
    paused: str | None


class FreeSpaceReserve:
    """Tells background downloads whether the cache filesystem has room above its reserve."""

    def __init__(self, statvfs: Callable[[], os.statvfs_result], min_free: int | None) -> None:
        """*statvfs* reads the cache filesystem; *min_free* None means the default reserve."""
        self._statvfs = statvfs
        _, total = self._space()
        self.reserve = default_reserve(total) if min_free is None else min_free
        self.paused: str | None = None
        #: Bytes promised to background downloads in flight (`claim`), not on disk yet.
        self.claimed = 0

    def _space(self) -> tuple[int, int]:
        info = self._statvfs()
        return info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize

    def room_for(self, need: int) -> bool:
        """True when *need* more bytes leave the reserve free; else remembers why not.

        Bytes claimed by downloads in flight count as used: two fill workers that each see
        room for one chunk must not both take it.
        """
        try:
            free, _ = self._space()
        except OSError as err:
            self._pause(f"cannot read the cache filesystem's free space: {err.strerror}")
            return False
        if free - self.claimed - need >= self.reserve:
            if self.paused is not None:
                log.info("background downloads go on: the cache filesystem has room again")
                self.paused = None
            return True
        self._pause(
            f"the cache filesystem has {_mib(free)} free and {_mib(self.reserve)} is kept free"
            " (--min-free)"
        )
        return False

    def could_hold(self, need: int) -> bool:
        """True when *need* more bytes would fit above the reserve now (nothing remembered).

        For deciding whether to start a whole fill at all, where `room_for` decides each chunk.
        """
        try:
            free, _ = self._space()
        except OSError:
            return False
        return free - self.claimed - need >= self.reserve

    def _pause(self, reason: str) -> None:
        if self.paused is None:
            log.warning("background downloads paused: %s", reason)
        self.paused = reason

    async def wait_for_room(self, need: int) -> None:
        """Sleep until *need* bytes fit above the reserve."""
        while not self.room_for(need):
            await trio.sleep(RECHECK_INTERVAL)

    @contextlib.contextmanager
    def claim(self, need: int) -> Iterator[bool]:
        """Claim *need* bytes for one download while it runs; yields False if there is no room.

        The claim is released when the block ends (the bytes are then on disk, and counted
        in the filesystem's free space).
        """
        if not self.room_for(need):
            yield False
            return
        self.claimed += need
        try:
            yield True
        finally:
            self.claimed -= need

    def statistics(self) -> ReserveStatistics:
        try:
            free, total = self._space()
        except OSError:
            free = total = 0
        return ReserveStatistics(free=free, total=total, reserve=self.reserve, paused=self.paused)


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.0f} MiB"
