"""The benchmark's origin: the test origin plus a shaper (delay per request, rate per connection).

A real link has a round-trip time and, often, a per-connection rate cap (a CDN or a TCP
window); loopback has neither. The shaper adds both so the benchmark can show what
concurrency and readahead buy on a realistic link, not just on loopback.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from tests.origin import CHUNK_SIZE, Exchange, Origin

PACE_CHUNK = 64 * 1024


class ShapedOrigin(Origin):
    """An `Origin` whose responses wait *delay* seconds and stream at most *rate* B/s each."""

    def __init__(
        self, root: Path, *, delay: float = 0.0, rate: float = 0.0, link_rate: float = 0.0
    ) -> None:
        super().__init__(root)
        self.delay = delay
        self.rate = rate
        #: Cap on all connections together (the link), in bytes/s; 0 for none.
        self.link_rate = link_rate
        self._link_lock = threading.Lock()
        self._link_free_at = 0.0

    def _send_body(self, ex: Exchange, fd: int, offset: int, count: int) -> None:
        if self.rate or self.link_rate:
            self._paced(ex, fd, offset, count)
        else:
            super()._send_body(ex, fd, offset, count)

    def _respond(self, ex: Exchange) -> None:
        """Serve an HTML index at ``/`` (rclone and httpdirfs discover files from it)."""
        if ex.path != "/":
            super()._respond(ex)
            return
        names = sorted(p.name for p in self.root.iterdir() if p.is_file())
        page = "".join(f'<a href="{name}">{name}</a><br>\n' for name in names)
        index = self.root.parent / "index.html"
        index.write_text(f"<html><body>\n{page}</body></html>\n")
        fd = os.open(index, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            ex.send_head(200, {"Content-Type": "text/html", "Content-Length": str(size)})
            if ex.wants_body:
                ex.send_file(fd, 0, size)
        finally:
            os.close(fd)

    def _paced(self, ex: Exchange, fd: int, offset: int, count: int) -> None:
        """Send in small chunks, sleeping so the connection never exceeds *rate*."""
        started = time.monotonic()
        sent = 0
        while sent < count:
            chunk = min(PACE_CHUNK, count - sent, CHUNK_SIZE)
            before = ex.body_bytes
            ex.send_file(fd, offset + sent, chunk)
            if ex.body_bytes == before:
                return
            sent += ex.body_bytes - before
            if self.rate:
                ahead = sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if self.link_rate:
                self._take_link_time(ex.body_bytes - before)

    def _take_link_time(self, count: int) -> None:
        """Reserve the link for *count* bytes; sleep until the reservation ends."""
        with self._link_lock:
            now = time.monotonic()
            start = max(now, self._link_free_at)
            self._link_free_at = start + count / self.link_rate
            wait = self._link_free_at - now
        if wait > 0:
            time.sleep(wait)
