"""How a format parser reads its image: bounded, checked, and batched into few round trips.

Parsers never touch the network or the cache themselves. They get an `ImageReader`, whose
reads go through the cache (so every byte is fetched once, single flight, and a second open
parses from disk) and are checked against the image's size and a `Budget`. An image is
data from anywhere: a count of a billion groups, an offset past the end or a table that
points at itself must end the parse (`NoHint`), never fetch the whole file or loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .layout import Range, merge

#: Reads bytes ``[offset, offset + size)`` of the whole file (through the cache).
ReadFn = Callable[[int, int], Awaitable[bytes]]
#: Starts fetching ranges of the whole file without waiting for them.
PrefetchFn = Callable[[Sequence[Range]], None]


class NoHint(Exception):
    """The image is not what it seemed, is damaged, or would cost more than the budget.

    Parsers raise it for anything unexpected; the open then simply gets no format hint.
    """


@dataclass
class Budget:
    """What one parse may cost: bytes read through the cache, and batches of reads.

    A batch (`ImageReader.read_many`) is one round trip however many ranges it holds, so
    the batch count bounds the parse's round trips, and the bytes bound its traffic.
    """

    max_bytes: int
    max_batches: int = 64
    used_bytes: int = 0
    used_batches: int = 0

    def take(self, size: int, batches: int = 1) -> None:
        self.used_bytes += size
        self.used_batches += batches
        if self.used_bytes > self.max_bytes:
            raise NoHint(f"more than {self.max_bytes} bytes of metadata")
        if self.used_batches > self.max_batches:
            raise NoHint(f"more than {self.max_batches} rounds of metadata reads")

    def room(self) -> int:
        """Bytes still allowed."""
        return max(0, self.max_bytes - self.used_bytes)


class ImageReader:
    """Reads of one image (or one partition of it, at *base*), checked and budgeted."""

    def __init__(
        self,
        read: ReadFn,
        size: int,
        budget: Budget,
        *,
        base: int = 0,
        prefetch: PrefetchFn | None = None,
    ) -> None:
        self._read = read
        self._prefetch = prefetch
        self.size = size
        self.budget = budget
        self.base = base

    def sub(self, base: int, size: int) -> ImageReader:
        """A reader of the part ``[base, base + size)`` of this image (same budget)."""
        self.check(base, size)
        return ImageReader(
            self._read, size, self.budget, base=self.base + base, prefetch=self._prefetch
        )

    def check(self, offset: int, size: int) -> None:
        """Raise `NoHint` unless ``[offset, offset + size)`` lies inside the image."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise NoHint(f"bytes {offset}+{size} are outside the {self.size}-byte image")

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)``, all of them, or `NoHint`."""
        self.check(offset, size)
        self.budget.take(size)
        data = await self._read(self.base + offset, size)
        if len(data) != size:
            raise NoHint(f"short read at {offset}")
        return data

    async def read_many(self, ranges: Sequence[Range]) -> list[bytes]:
        """Read several ranges in one round trip: all are requested before any is awaited."""
        for offset, end in ranges:
            self.check(offset, end - offset)
        self.budget.take(sum(end - offset for offset, end in ranges))
        if self._prefetch is not None:
            self._prefetch(merge((self.base + s, self.base + e) for s, e in ranges))
        out = []
        for offset, end in ranges:
            data = await self._read(self.base + offset, end - offset)
            if len(data) != end - offset:
                raise NoHint(f"short read at {offset}")
            out.append(data)
        return out
