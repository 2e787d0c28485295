"""Parts of blocks held in memory: what exact fetches of a mapped image brought.

The cache stores whole blocks (64 KiB by default), but a filesystem image is read in pages:
a directory block of 4 KiB, an inode table's used 8 KiB, a file of 2 KB. When an image's
format is known (`remotefs.formats`), the fetcher fetches such places exactly, page by page,
instead of a block around each; what does not fill whole blocks is kept here, in memory,
for the reads that follow (the kernel reads each once: it keeps it in its own page cache).

Pieces are never written to the cache's data file, so the bitmap's promise (a set bit means
the block's bytes are on disk) is untouched, and a crash, an eviction or a remote change can
not make them wrong: they belong to one `CachedFile` object (one version of one file) and go
with it. When pieces come to cover a whole block, the fetcher stores that block in the
cache like any other (`take_blocks`). Memory is bounded (`capacity`, oldest pieces dropped
first): a dropped piece is fetched again if it is read again.
"""

from __future__ import annotations

import bisect
import weakref
from collections import OrderedDict

from .cached_file import CachedFile

#: Exact fetches start and end on page boundaries (the kernel reads whole pages).
PAGE = 4096


class _FilePieces:
    """The pieces of one file: sorted, disjoint ``[start, end)`` with their bytes."""

    __slots__ = ("data", "ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.data: list[bytes] = []


class PieceStore:
    """In-memory pieces of files, at most *capacity* bytes in all."""

    def __init__(self, capacity: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self.size = 0
        self._files: weakref.WeakKeyDictionary[CachedFile, _FilePieces] = (
            weakref.WeakKeyDictionary()
        )
        #: ``(file ref, start)`` of every piece, oldest first (for dropping).
        self._order: OrderedDict[tuple[weakref.ref[CachedFile], int], int] = OrderedDict()

    def add(self, file: CachedFile, start: int, data: bytes) -> None:
        """Keep bytes ``[start, start + len(data))`` of *file*; merged with touching pieces."""
        if not data:
            return
        pieces = self._files.setdefault(file, _FilePieces())
        end = start + len(data)
        # Merge with every piece that overlaps or touches [start, end).
        first = bisect.bisect_left(pieces.ends, start)
        last = bisect.bisect_right(pieces.starts, end)
        if first < last:
            merged_start = min(start, pieces.starts[first])
            merged_end = max(end, pieces.ends[last - 1])
            buffer = bytearray(merged_end - merged_start)
            for index in range(first, last):
                at = pieces.starts[index] - merged_start
                buffer[at : at + len(pieces.data[index])] = pieces.data[index]
                self._forget(file, pieces.starts[index], len(pieces.data[index]))
            buffer[start - merged_start : end - merged_start] = data
            start, end, data = merged_start, merged_end, bytes(buffer)
            del pieces.starts[first:last], pieces.ends[first:last], pieces.data[first:last]
        pieces.starts.insert(first, start)
        pieces.ends.insert(first, end)
        pieces.data.insert(first, data)
        self._order[(weakref.ref(file), start)] = len(data)
        self.size += len(data)
        self._trim()

    def get(self, file: CachedFile, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of *file* if one piece holds them all, else None."""
        pieces = self._files.get(file)
        if pieces is None:
            return None
        index = bisect.bisect_right(pieces.starts, start) - 1
        if index < 0 or pieces.ends[index] < end:
            return None
        at = start - pieces.starts[index]
        return pieces.data[index][at : at + end - start]

    def covered(self, file: CachedFile, start: int, end: int) -> bool:
        """True when one piece holds all of ``[start, end)``."""
        pieces = self._files.get(file)
        if pieces is None:
            return False
        index = bisect.bisect_right(pieces.starts, start) - 1
        return index >= 0 and pieces.ends[index] >= end

    def take_blocks(self, file: CachedFile, near: int) -> list[tuple[int, bytes]]:
        """Whole blocks that the piece holding byte *near* covers: ``(block, bytes)``.

        For the cache: a piece that grew to fill a block makes that block an ordinary one.
        """
        pieces = self._files.get(file)
        if pieces is None:
            return []
        index = bisect.bisect_right(pieces.starts, near) - 1
        if index < 0 or pieces.ends[index] <= near:
            return []
        size, found = file.block_size, []
        start, end, data = pieces.starts[index], pieces.ends[index], pieces.data[index]
        stop = file.nblocks if end >= file.size else end // size
        for block in range(-(-start // size), stop):
            block_end = min((block + 1) * size, file.size)
            at = block * size - start
            found.append((block, data[at : at + block_end - block * size]))
        return found

    def drop(self, file: CachedFile) -> None:
        """Forget every piece of *file*."""
        pieces = self._files.pop(file, None)
        if pieces is not None:
            for start, data in zip(pieces.starts, pieces.data, strict=True):
                self._forget(file, start, len(data))

    def _forget(self, file: CachedFile, start: int, length: int) -> None:
        if self._order.pop((weakref.ref(file), start), None) is not None:
            self.size -= length

    def _trim(self) -> None:
        """Drop the oldest pieces until the store is within its capacity."""
        while self.size > self.capacity and self._order:
            (ref, start), length = self._order.popitem(last=False)
            self.size -= length
            file = ref()
            pieces = None if file is None else self._files.get(file)
            if pieces is None:
                continue
            index = bisect.bisect_left(pieces.starts, start)
            if index < len(pieces.starts) and pieces.starts[index] == start:
                del pieces.starts[index], pieces.ends[index], pieces.data[index]
