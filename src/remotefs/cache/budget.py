"""The cache size cap (``--cache-max-size``): least-recently-used chunks make room for new blocks.

What counts: the bytes of present blocks (set bits) of every file this daemon serves, plus the
bytes of blocks whose bits were cleared by an eviction that has not punched its holes yet, plus
the bytes a store is writing now (a worker thread writes them; their bits come after).
Before a download stores blocks, `_BlockAssembler.feed` asks `has_room`; when the new blocks
would pass the cap, the download waits in `make_room` (its HTTP stream is paused meanwhile)
until enough old blocks are gone. So the cached bytes never exceed the cap.

Recency is tracked per *chunk* of `CHUNK_BLOCKS` blocks (1 MiB at 64 KiB blocks), with a
logical clock: one integer per chunk in a preallocated array, bumped by every read and every
store that touches the chunk. That costs one array store per chunk per read, no allocation.
Eviction goes chunk by chunk, oldest first, and frees at least `headroom` more than needed, so
one bitmap save (fsync) pays for many blocks.

Which chunks go first:

1. chunks of files nobody has open, least recently used first;
2. then chunks of open files, least recently used first. A reader of a file larger than the
   cap must lose its own oldest blocks, or the cap could not hold.

Never evicted: chunks that hold blocks a reader is waiting for (`reading`): the request in
progress of every reader. A block being written has no bit yet, so it is never a candidate.
If everything left is protected (more readers at once than the cap holds), the new blocks are
stored anyway and a warning is logged once: a reader must not wait for itself.

Order of an eviction, as in `CachedFile.evict_blocks`: the bits are cleared, the bitmap is saved
(fsync'ed), and only then are holes punched; the eviction runs shielded from cancellation so
that no hole is left unpunched. Evictions run one at a time; a store waits for the running one.
"""

from __future__ import annotations

import contextlib
import logging
from array import array
from collections.abc import Callable, Iterable, Iterator
from weakref import WeakKeyDictionary

import trio
from pyroaring import BitMap

from ..config.options import MIN_CACHE_MAX_SIZE
from .cached_file import CachedFile, FileRetiredError

log = logging.getLogger(__name__)

#: The unit of recency and of eviction, in blocks.
CHUNK_BLOCKS = 16
#: Files of at most this many chunks keep their stamps in a preallocated array.
DENSE_STAMPS = 1 << 16
__all__ = ["CHUNK_BLOCKS", "MIN_CACHE_MAX_SIZE", "CacheBudget"]


class CacheBudget:
    """Keeps the cached bytes of the mount's files under ``cap``; one per daemon."""

    def __init__(self, cap: int, files: Callable[[], Iterable[CachedFile]]) -> None:
        self.cap = cap
        self._files = files
        #: Evictions free this much more than needed, so each fsync frees many blocks.
        self.headroom = cap // 16
        self._stamps: WeakKeyDictionary[CachedFile, array[int] | dict[int, int]] = (
            WeakKeyDictionary()
        )
        self._clock = 0
        #: Bytes whose bits are cleared but whose holes are not punched yet (still on disk).
        self.unpunched = 0
        #: Bytes that passed `has_room` and are being written (in a worker thread), bits
        #: not set yet: they count, so two stores cannot both take the same room.
        self.in_flight = 0
        #: Blocks ``[first, end)`` that readers are waiting for, per file: never evicted.
        self.reading: dict[CachedFile, list[tuple[int, int]]] = {}
        #: The files that have an open handle (set by the FUSE layer).
        self.open_files: Callable[[], set[CachedFile]] = set
        #: Bytes evicted this session (for `remotefs status`).
        self.evicted_bytes = 0
        self._evicting: trio.Event | None = None
        self._warned = False

    # -- accounting ----------------------------------------------------------------------------

    def used(self) -> int:
        """Cached bytes of every file, plus evicted bytes whose holes are not punched yet and
        bytes being written."""
        cached = sum(file.cached_bytes for file in self._files())
        return cached + self.unpunched + self.in_flight

    @contextlib.contextmanager
    def writing(self, need: int) -> Iterator[None]:
        """Count *need* bytes being stored against the cap until the block ends (their bits
        are set by then, and `cached_bytes` counts them)."""
        self.in_flight += need
        try:
            yield
        finally:
            self.in_flight -= need

    def has_room(self, need: int) -> bool:
        """True when *need* more bytes may be stored without passing the cap."""
        return self.used() + need <= self.cap

    def touch(self, file: CachedFile, first: int, end: int) -> None:
        """Blocks ``[first, end)`` of *file* were just used (read or stored)."""
        stamps = self._stamps.get(file)
        if stamps is None:
            chunks = -(-file.nblocks // CHUNK_BLOCKS)
            # A preallocated array for files up to 64 GiB at 64 KiB blocks; beyond, a dict of
            # the chunks ever used (a 16 TiB file would need a 128 MiB array).
            stamps = array("Q", bytes(8 * chunks)) if chunks <= DENSE_STAMPS else {}
            self._stamps[file] = stamps
        self._clock += 1
        for chunk in range(first // CHUNK_BLOCKS, (end - 1) // CHUNK_BLOCKS + 1):
            stamps[chunk] = self._clock

    @contextlib.contextmanager
    def reading_blocks(self, file: CachedFile, first: int, end: int) -> Iterator[None]:
        """Protect blocks ``[first, end)`` of *file* from eviction while a reader waits."""
        ranges = self.reading.setdefault(file, [])
        entry = (first, end)
        ranges.append(entry)
        try:
            yield
        finally:
            ranges.remove(entry)
            if not ranges:
                del self.reading[file]

    # -- evicting ------------------------------------------------------------------------------

    async def make_room(self, need: int) -> None:
        """Return once *need* bytes fit under the cap (after evicting), or nothing can go."""
        while not self.has_room(need):
            if self._evicting is not None:
                await self._evicting.wait()
                continue
            excess = self.used() + need - self.cap
            victims = self._choose(excess + min(self.headroom, max(0, self.cap - need)))
            if not victims:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "cache cap %d bytes exceeded: every cached block is being read;"
                        " storing anyway",
                        self.cap,
                    )
                return
            if not await self._evict(victims):
                return  # a disk error: logged; the new blocks are stored anyway

    async def trim(self) -> None:
        """Evict until the cache fits the cap (at mount, after the cap was lowered)."""
        before = self.used()
        if before <= self.cap:
            return
        await self.make_room(0)
        log.info(
            "cache trimmed from %d to %d bytes to fit --cache-max-size %d",
            before,
            self.used(),
            self.cap,
        )

    async def drop(self, file: CachedFile, blocks: BitMap | None = None) -> int:
        """Evict *blocks* of *file* (all of them when None); return the bytes dropped."""
        pending = file.bytes_of(file.bitmap if blocks is None else blocks & file.bitmap)
        self.unpunched += pending
        try:
            freed = await file.evict_blocks(blocks)
        finally:
            self.unpunched -= pending
        self.evicted_bytes += freed
        return freed

    def _choose(self, target: int) -> dict[CachedFile, BitMap]:
        """The least recently used unprotected chunks that hold at least *target* bytes."""
        open_files = self.open_files()
        candidates: list[tuple[int, int, int, int, CachedFile]] = []
        for order, file in enumerate(self._files()):
            if file.retired or not file.bitmap:
                continue
            tier = 1 if file in open_files else 0
            stamps = self._stamps.get(file)
            guarded = self.reading.get(file, ())
            bitmap = file.bitmap
            block = bitmap.min()
            while True:
                chunk = block // CHUNK_BLOCKS
                first, end = chunk * CHUNK_BLOCKS, (chunk + 1) * CHUNK_BLOCKS
                if not any(a < end and first < b for a, b in guarded):
                    if stamps is None:
                        stamp = 0
                    elif isinstance(stamps, dict):
                        stamp = stamps.get(chunk, 0)
                    else:
                        stamp = stamps[chunk]
                    candidates.append((tier, stamp, order, chunk, file))
                if end > bitmap.max():
                    break
                block = bitmap.next_set_bit(end)
        candidates.sort(key=lambda entry: entry[:4])
        victims: dict[CachedFile, BitMap] = {}
        freed = 0
        for _, _, _, chunk, file in candidates:
            if freed >= target:
                break
            blocks = BitMap()
            blocks.add_range(chunk * CHUNK_BLOCKS, min((chunk + 1) * CHUNK_BLOCKS, file.nblocks))
            blocks &= file.bitmap
            freed += file.bytes_of(blocks)
            victims.setdefault(file, BitMap()).update(blocks)
        return victims

    async def _evict(self, victims: dict[CachedFile, BitMap]) -> bool:
        """Drop *victims*, shielded: a cancelled download must not leave holes unpunched.

        Returns False when a bitmap could not be saved (those blocks stay cached).
        """
        done = self._evicting = trio.Event()
        ok = True
        try:
            with trio.CancelScope(shield=True):
                for file, blocks in victims.items():
                    try:
                        await self.drop(file, blocks)
                    except FileRetiredError:
                        continue
                    except OSError as err:
                        log.warning("%s: could not evict cached blocks: %s", file.name, err)
                        ok = False
        finally:
            self._evicting = None
            done.set()
        return ok
