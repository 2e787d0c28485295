"""Runs of present and missing blocks, found in time proportional to the number of runs.

A 16 TiB file has 2^28 blocks of 64 KiB. Walking them one by one to plan a fill or a
prefetch takes most of a minute, and the daemon's single event loop answers no FUSE request
meanwhile. Roaring bitmaps store long runs as run containers, so the complement of a bitmap
over ``[0, nblocks)`` is cheap to build, and `BitMap.next_set_bit` jumps over a run in
O(log n). Alternating it between the present and the missing bitmap yields each run once.
"""

from __future__ import annotations

from collections.abc import Iterator

from pyroaring import BitMap


def missing_blocks(present: BitMap, first: int, end: int) -> BitMap:
    """The blocks of ``[first, end)`` that *present* lacks (cheap: run containers)."""
    missing = BitMap()
    if first < end:
        missing.add_range(first, end)
        missing -= present
    return missing


def next_set(bitmap: BitMap, position: int, end: int) -> int:
    """The first block of *bitmap* at or after *position*, or *end* when there is none before."""
    if not bitmap or position >= end or position > bitmap.max():
        return end
    return min(bitmap.next_set_bit(position), end)


def runs(
    bitmap: BitMap, first: int, end: int, *, complement: BitMap | None = None
) -> Iterator[tuple[int, int]]:
    """Runs ``[a, b)`` of consecutive blocks of *bitmap* within ``[first, end)``, in order.

    *complement* must be the blocks of ``[first, end)`` not in *bitmap* (computed when not
    given); each run costs two `next_set_bit` calls, whatever its length.
    """
    if complement is None:
        complement = missing_blocks(bitmap, first, end)
    position = first
    while position < end:
        start = next_set(bitmap, position, end)
        if start >= end:
            return
        stop = next_set(complement, start, end)
        yield start, stop
        position = stop


def missing_runs(present: BitMap, first: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs ``[a, b)`` of blocks of ``[first, end)`` that *present* lacks, in order."""
    missing = missing_blocks(present, first, end)
    yield from runs(missing, first, end, complement=present)


def gaps_largest_first(present: BitMap, nblocks: int) -> list[tuple[int, int]]:
    """Runs of missing blocks of a file of *nblocks*, longest first (ties: earliest first)."""
    return sorted(missing_runs(present, 0, nblocks), key=lambda run: (run[0] - run[1], run[0]))
