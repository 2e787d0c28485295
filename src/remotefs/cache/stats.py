"""Per-file transfer counters for `remotefs status`: cheap enough to bump on every chunk.

Each cached file carries one `TransferStats`. The block assembler (and the uncached path on a
full disk) adds every body byte received from the origin; the fetcher records the last
download error and clears it when a later download succeeds. The rate is a sliding window of
a few seconds, kept as a handful of time slots, so adding a chunk costs O(1).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

#: The download rate is averaged over this many seconds.
RATE_WINDOW = 3.0
#: Width of one slot of the window.
_SLOT = 0.25
_SLOTS = int(RATE_WINDOW / _SLOT)


class TransferStats:
    """Origin bytes received this session, the current rate, and the last download error."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Body bytes received from the origin by this daemon (probes are not counted).
        self.origin_bytes = 0
        #: Why the last download of this file failed; None once a later one succeeded.
        self.last_error: str | None = None
        self._slots: deque[tuple[int, int]] = deque()  # (slot number, bytes), oldest first

    def add(self, count: int) -> None:
        """Count *count* bytes that just arrived from the origin."""
        self.origin_bytes += count
        slot = int(self._clock() / _SLOT)
        if self._slots and self._slots[-1][0] == slot:
            self._slots[-1] = (slot, self._slots[-1][1] + count)
        else:
            self._slots.append((slot, count))
            while len(self._slots) > _SLOTS + 1:
                self._slots.popleft()

    def rate(self) -> float:
        """Bytes per second received over the last `RATE_WINDOW` seconds."""
        oldest = int(self._clock() / _SLOT) - _SLOTS
        return sum(count for slot, count in self._slots if slot > oldest) / RATE_WINDOW
