"""Sequential-read detection and the readahead window of one open file handle.

A stream that keeps reading where it left off gets a window that doubles on every hit up to a
cap (mountpoint-s3's prefetcher, which peers.md describes); a real seek resets it. The kernel
delivers its own readahead requests out of order and in parallel, so "where it left off" is
fuzzy: reads a little behind the furthest point, or a few MiB ahead of it, still count as
sequential (mountpoint-s3 issue #488 is what happens otherwise).

This module only decides *what* to prefetch; `BlockFetcher.prefetch` does it, through the
same single-flight registry as every other download, so nothing is fetched twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.options import MiB

#: Reads this far behind the furthest point seen are reordered kernel requests, not seeks.
BACKWARD_TOLERANCE = 1 * MiB
#: Forward skips up to this size keep the stream sequential: the kernel's parallel readahead
#: requests (up to 1 MiB each) can overtake each other. Larger skips are seeks: a filesystem
#: image read through a loop device jumps around by a few MiB and must not look like a stream.
FORWARD_TOLERANCE = 2 * MiB


#: A run must be this long before readahead beyond the kernel's own starts: a filesystem
#: image or a database reads short sequential runs that do not deserve a growing window.
SEQUENTIAL_THRESHOLD = 4 * MiB


@dataclass
class ReadStream:
    """Readahead state of one open handle; see `advance`."""

    #: One past the furthest byte read so far; -1 before the first read.
    furthest: int = -1
    #: Bytes read in the current sequential run.
    run: int = 0
    #: Current readahead window in bytes; 0 for a reader not (yet) seen as sequential.
    window: int = 0
    #: Everything before this offset has been requested already by readahead.
    prefetched_until: int = 0

    def advance(
        self, offset: int, end: int, *, first_window: int, initial: int, maximum: int
    ) -> tuple[int, int] | None:
        """Account for a read of ``[offset, end)``; return a byte range to prefetch, or None.

        A first read at offset 0 prefetches *first_window* beyond itself: the kernel's own
        readahead follows such a read at once and should not cost a second round trip. After
        that, a run of `SEQUENTIAL_THRESHOLD` bytes starts a window of *initial* bytes that
        doubles on every read up to *maximum*; a seek resets it all.
        """
        if self.furthest < 0:
            self.furthest, self.run = end, end - offset
            if offset == 0 and first_window:
                self.prefetched_until = end + first_window
                return end, end + first_window
            return None
        if self.furthest - BACKWARD_TOLERANCE <= offset <= self.furthest + FORWARD_TOLERANCE:
            self.run += max(0, end - self.furthest)
            self.furthest = max(self.furthest, end)
        else:
            self.furthest, self.run = end, end - offset
            self.window = self.prefetched_until = 0
            return None
        if self.run < SEQUENTIAL_THRESHOLD:
            return None
        # Never further ahead than the run has proven: a sequential stretch of a filesystem
        # image or a short file then over-fetches at most its own length.
        self.window = min(max(self.window * 2, initial), maximum, max(initial, self.run))
        target = self.furthest + self.window
        start = max(self.furthest, self.prefetched_until)
        # Top the window up only when half of it has been consumed: one scheduling pass per
        # half window instead of one per read.
        if target - start < self.window // 2:
            return None
        self.prefetched_until = target
        return start, target
