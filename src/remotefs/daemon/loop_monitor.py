"""A watchdog on the daemon's one event loop: how late does it wake a sleeping task?

Everything the daemon does runs on one trio loop, so any piece of work that forgets to yield
(planning a fill over 2^28 blocks, say) stops every FUSE request of every file until it ends.
`LoopMonitor` sleeps for a short interval, over and over, and measures how much later than
asked it wakes up: that lateness is a stall every request felt. `remotefs status --json`
shows the figures, a stall of a second or more is logged, and the tests use it to prove that
no work on the loop grows with the size of a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

#: How often the monitor wakes up.
INTERVAL = 0.01
#: Stalls at least this long are counted.
NOTICEABLE = 0.05
#: Stalls at least this long are logged.
LOGGED = 1.0


@dataclass(frozen=True)
class LoopStatistics:
    """What the monitor saw since the daemon started (seconds)."""

    max_stall: float
    stalls_over_50ms: int
    checks: int


class LoopMonitor:
    """Measures event-loop stalls; run `run` in the daemon's nursery."""

    def __init__(self) -> None:
        self.max_stall = 0.0
        self.stalls = 0
        self.checks = 0

    async def run(self) -> None:
        while True:
            started = trio.current_time()
            await trio.sleep(INTERVAL)
            late = trio.current_time() - started - INTERVAL
            self.checks += 1
            self.max_stall = max(self.max_stall, late)
            if late >= NOTICEABLE:
                self.stalls += 1
                if late >= LOGGED:
                    log.warning("the event loop was blocked for %.1fs", late)

    def statistics(self) -> LoopStatistics:
        return LoopStatistics(
            max_stall=round(self.max_stall, 4), stalls_over_50ms=self.stalls, checks=self.checks
        )
