"""A receive buffer for h11 that hands large received chunks on without copying them.

httpx speaks HTTP/1.1 through httpcore and h11. For every chunk of a response body, h11's
`ReceiveBuffer` appends the received bytes to a bytearray, slices them out again twice, and
httpcore turns the slice back into bytes: four copies of every body byte, each in a new
allocation, on top of the socket read and the write into the cache. Profiles of a cold
sequential read showed that copying at a fifth of the daemon's CPU, which is the limit on
fast links (the daemon runs one event loop).

`ZeroCopyReceiveBuffer` keeps a received chunk as it is while nothing else is buffered, and
gives it out whole when the body reader asks for at most that many bytes, which is the
common case in a large body. Anything else (headers, chunked framing, a chunk split by the
end of a body) first moves the chunk into the bytearray and then works exactly as h11's own
buffer does. `install` puts it in place for every h11 connection made afterwards.
"""

from __future__ import annotations

import h11._connection
from h11._receivebuffer import ReceiveBuffer

#: Chunks smaller than this are appended as usual: copying them is cheap, and headers and
#: framing arrive in small chunks.
MIN_HELD_CHUNK = 16 * 1024


class ZeroCopyReceiveBuffer(ReceiveBuffer):
    """h11's `ReceiveBuffer` with a zero-copy path for large body chunks."""

    def __init__(self) -> None:
        super().__init__()
        #: A received chunk held as is; only ever set while the bytearray is empty.
        self._held: bytes | None = None

    def _spill(self) -> None:
        """Move a held chunk into the bytearray, for the operations that need it there."""
        if self._held is not None:
            self._data += self._held
            self._held = None

    def __iadd__(self, byteslike: bytes | bytearray) -> ZeroCopyReceiveBuffer:
        if (
            self._held is None
            and not self._data
            and type(byteslike) is bytes
            and len(byteslike) >= MIN_HELD_CHUNK
        ):
            self._held = byteslike
            return self
        self._spill()
        self._data += byteslike
        return self

    def __len__(self) -> int:
        return len(self._data) + (len(self._held) if self._held is not None else 0)

    def __bytes__(self) -> bytes:
        self._spill()
        return super().__bytes__()

    def _extract(self, count: int) -> bytearray:
        self._spill()
        return super()._extract(count)

    def maybe_extract_at_most(self, count: int) -> bytearray | None:
        held = self._held
        if held is not None and len(held) <= count:
            self._held = None
            # h11 wraps this in a Data event and httpcore calls bytes() on it, which returns
            # an exact bytes object itself: the chunk reaches the cache with no copy at all.
            return held  # type: ignore[return-value]  # bytes where h11 says bytearray
        self._spill()
        if not self._data:
            return None
        return super()._extract(count)

    def maybe_extract_next_line(self) -> bytearray | None:
        self._spill()
        return super().maybe_extract_next_line()

    def maybe_extract_lines(self) -> list[bytearray] | None:
        self._spill()
        return super().maybe_extract_lines()

    def is_next_line_obviously_invalid_request_line(self) -> bool:
        self._spill()
        return super().is_next_line_obviously_invalid_request_line()


def install() -> None:
    """Make h11 connections created from now on use `ZeroCopyReceiveBuffer`.

    h11 looks the class up in its connection module when a connection is created, so this
    is the one place to change. Idempotent; an h11 that no longer has that name is left
    alone (bodies are then copied as before, nothing breaks).
    """
    if getattr(h11._connection, "ReceiveBuffer", None) in (ReceiveBuffer, ZeroCopyReceiveBuffer):
        h11._connection.ReceiveBuffer = ZeroCopyReceiveBuffer  # type: ignore[misc]
