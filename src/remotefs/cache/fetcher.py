"""Turn reads into downloads: coalesce missing blocks, fetch each block once, bound the wait.

The life of a read (see docs/architecture.md for the full story):

1. Blocks already present are served straight from the data file, with no await and no lock.
2. Missing blocks that no download covers are grouped into contiguous runs; each run becomes
   one `Download` (one Range request), extended forward to the minimum request size but never
   over a block that is present or already being fetched, and never past EOF. A file whose
   server ignores Range gets a single download of the whole body instead.
3. The reader waits on the downloads that cover its blocks. A download writes and marks every
   whole block the moment it arrives and wakes its waiters, so two readers of one block share
   one request ("single flight"), and a reader at the start of a long request need not wait for
   its end.
4. Transient failures are retried (backoff with jitter) from the first block still missing, so
   blocks already received are kept. After the read deadline the download fails; every reader
   waiting on it gets `ReadError` (EIO) and the next read starts a new download.

Downloads run in the fetcher's own nursery, not in the reader's task, so a reader that gives
up does not cancel a request other readers share.

Two conditions change the rules. When the origin's file changed (`RemoteChangedError`) the
file is *retired*: its readers get EIO and the daemon replaces the entry. When the cache disk
is full (ENOSPC) reads are served straight from the network, uncached, for a while.
"""

from __future__ import annotations

import errno
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from pyroaring import BitMap

from ..config.options import MountOptions
from ..http.errors import HttpSourceError, RangeNotSupportedError, RemoteChangedError
from ..http.retry import retry_until
from ..http.source import HttpSource
from .budget import CacheBudget
from .cached_file import CachedFile, FileRetiredError, UncacheableError
from .pieces import PAGE, PieceStore
from .readahead import ReadStream

log = logging.getLogger(__name__)

#: After ENOSPC, how long reads bypass the cache before storing is tried again.
CACHE_FULL_BACKOFF = 30.0
#: A download of blocks whose last download failed less than this long ago gets one stall
#: timeout instead of a whole read deadline: the kernel answers a failed readahead by reading
#: the page again at once, and that read must not make the reader wait a second deadline.
RECENT_FAILURE = 1.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ReadError(Exception):
    """A read could not be satisfied; the FUSE layer answers EIO. The message names the file."""


#: Largest single Range request of readahead: big enough to amortise a round trip, small
#: enough that several run in parallel and one slow connection does not hold up the stream.
MAX_PART = 8 * 1024 * 1024


#: Exact fetches (mapped images) of whole blocks are cut into parallel parts only from
#: this size on.
SPLIT_EXACT_FROM = 4 * 1024 * 1024


def _failed_before(stream: ReadStream, file: CachedFile, first: int, last: int) -> str | None:
    """Why a read of blocks ``[first, last)`` on *stream*'s handle fails at once, or None.

    Only while a failed read of some of its missing blocks is younger than the deadline;
    blocks that arrived since (readahead, another handle's read) count as present.
    """
    now = trio.current_time()
    for failed_first, failed_end, until, reason in stream.failed_reads:
        if until <= now or failed_end <= first or last <= failed_first:
            continue
        start, stop = max(first, failed_first), min(last, failed_end)
        if not file.has_blocks(start, stop):
            left = until - now
            return f"{reason} (failed on this handle: tried again in {left:.0f}s, or by a new open)"
    return None


class FillPaused(Exception):
    """A background fill download stopped because a foreground read arrived."""


class _CacheFullError(Exception):
    """The cache disk is full: the download stopped; its readers fetch directly."""


@dataclass(eq=False)
class Download:
    """One request in flight for blocks ``[first, end)`` of a file."""

    first: int
    end: int
    #: A download of the whole body (the server ignores Range); at most one per file.
    stream: bool = False
    #: Readahead or fill: it may not take the connections reserved for readers.
    background: bool = False
    done: bool = False
    error: BaseException | None = None
    #: When it started (trio clock): a reader tells its own downloads from older ones.
    started: float = float("-inf")
    _changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        """Wake every reader waiting on this download (a block arrived, or it ended)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> None:
        """Sleep until the next `notify`."""
        await self._changed.wait()


@dataclass(eq=False)
class _PieceFetch:
    """One exact request in flight for bytes ``[start, end)`` (parts of blocks)."""

    start: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class _BlockAssembler:
    """Cuts a byte stream that starts at a block boundary into whole blocks and stores them.

    Blocks already present are skipped (a whole-body stream passes over them). With a cache
    cap (*budget*), blocks that would pass it are stored only after older ones were evicted.
    Blocks are written in a worker thread (`CachedFile.store_blocks`): `feed` returns an
    awaitable whenever there is something to store, and the stream waits for it, so the
    event loop never waits for the cache disk.
    """

    def __init__(
        self,
        file: CachedFile,
        first_block: int,
        download: Download,
        budget: CacheBudget | None = None,
    ) -> None:
        self._file = file
        self._block = first_block
        self._download = download
        self._buffer = bytearray()
        self._budget = budget

    def feed(self, chunk: bytes) -> Awaitable[None] | None:
        """Store every whole block the stream now holds; keep the rest for the next chunk.

        Runs of consecutive missing blocks are written with one `pwrite` each, straight from
        the received chunk: a 1 MiB chunk costs one copy into the cache, plus at most one
        block's worth where it continues a block begun by the chunk before. Returns an
        awaitable that does the storing (None when the chunk completes no block).
        """
        self._file.stats.add(len(chunk))
        need = self._new_bytes(len(self._buffer) + len(chunk))
        if not need and not self._skips(len(self._buffer) + len(chunk)):
            self._buffer += chunk  # not a whole new block yet: nothing to write
            return None
        return self._store_with_room(chunk, need)

    def _skips(self, available: int) -> bool:
        """True when the next *available* bytes hold a whole block that is present already."""
        block = self._block
        return (
            block < self._download.end
            and block in self._file.bitmap
            and self._file.block_length(block) <= available
        )

    async def _store_with_room(self, chunk: bytes, need: int) -> None:
        budget = self._budget
        if budget is None or not need:
            await self._store(chunk)
            return
        if not budget.has_room(need):
            self._buffer += chunk
            chunk = b""
            await budget.make_room(need)
        # The bytes being written count against the cap until their bits are set.
        with budget.writing(need):
            await self._store(chunk)

    def _new_bytes(self, available: int) -> int:
        """Bytes of missing whole blocks among the next *available* bytes of the stream."""
        file = self._file
        block, total, need = self._block, 0, 0
        while block < self._download.end:
            length = file.block_length(block)
            if total + length > available:
                break
            total += length
            if block not in file.bitmap:
                need += length
            block += 1
        return need

    async def _store(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        stored = False
        if self._buffer:
            # Complete the block begun by earlier chunks with the head of this one (a copy of
            # less than a block), then go on from the chunk itself: appending every chunk to
            # the leftover would copy the whole body once more.
            take = min(self._partial_need(len(self._buffer)), len(view))
            if take:
                self._buffer += view[:take]
                view = view[take:]
            buffered = memoryview(self._buffer)
            used, stored = await self._write_whole_blocks(buffered)
            rest = bytearray(buffered[used:])
            buffered.release()
            if rest:
                # Still a partial block (the chunk was too short to finish it), or bytes past
                # the download's end: nothing of *view* can be written before them.
                rest += view
                view.release()
                self._buffer = rest
                if stored:
                    self._download.notify()
                return
        used, wrote = await self._write_whole_blocks(view)
        self._buffer = bytearray(view[used:])
        view.release()
        if stored or wrote:
            self._download.notify()

    def _partial_need(self, buffered: int) -> int:
        """Bytes that would complete the last, partial block of *buffered* bytes (0: none)."""
        file, block, total = self._file, self._block, 0
        while block < self._download.end and total < buffered:
            total += file.block_length(block)
            block += 1
        return max(0, total - buffered)

    async def _write_whole_blocks(self, data: memoryview) -> tuple[int, bool]:
        """Store the whole blocks at the start of *data*; return (bytes used, any stored).

        Runs of consecutive missing blocks are written with one `pwrite` each, straight from
        *data*; blocks already present are skipped over.
        """
        file = self._file
        end = self._download.end
        available = len(data)
        position = 0
        stored = False
        while self._block < end:
            first = self._block
            present = first in file.bitmap
            block, run_bytes = first, 0
            while block < end and (block in file.bitmap) == present:
                length = file.block_length(block)
                if available - position - run_bytes < length:
                    break
                run_bytes += length
                block += 1
            if block == first:
                break
            if not present:
                await file.store_blocks(first, block - first, data[position : position + run_bytes])
                if self._budget is not None:
                    self._budget.touch(file, first, block)
                stored = True
            position += run_bytes
            self._block = block
        return position, stored


RemoteChangedCallback = Callable[[CachedFile, RemoteChangedError], None]


class FileMap(Protocol):
    """What a file's format says about its bytes (`remotefs.formats.layout.Layout`).

    With a map, the fetcher fetches what the map says a reader will use, and nothing on a
    guess: readahead stops at the end of the data extent a read falls in; a run that starts
    where an extent starts (a file read from its beginning) reads ahead at once and its
    misses grow to ``--min-request``, while any other miss is fetched exactly (a probe, a
    block in the middle of a file); and scattered misses never make a working region (the
    map's metadata was fetched on open instead).
    """

    #: A stand-in while the format is being parsed: fetch exactly what is read.
    pending: bool

    def extent_of_read(self, offset: int, end: int) -> tuple[int, int] | None:
        """``(start, end)`` of the data extent (a file's bytes) a read of these bytes reads."""

    def extents_within(self, start: int, end: int, gap: int = 0) -> list[tuple[int, int]]:
        """The files' data in ``[start, end)``; parts less than *gap* apart joined."""

    def count_extents(self, start: int, end: int) -> int:
        """How many data extents start or lie in ``[start, end)``."""

    def in_metadata(self, offset: int) -> bool:
        """True when byte *offset* lies in the format's metadata."""


def _mapped_readahead(
    layout: FileMap, offset: int, extent: tuple[int, int] | None, wanted: tuple[int, int]
) -> tuple[int, int] | None:
    """The part of readahead *wanted* (for a read at *offset*) that *layout* allows.

    Inside a file's extent: up to its end. In the metadata (fetched on open already) or
    while the format is being parsed: nothing. Elsewhere (a file whose extents the parser
    could not list): what the stream asked.
    """
    if extent is not None:
        return (wanted[0], min(wanted[1], extent[1])) if wanted[0] < extent[1] else None
    if layout.pending or layout.in_metadata(offset):
        return None
    return wanted


def _runs(missing: BitMap, inflight: dict[int, Download]) -> list[tuple[int, int]]:
    """Contiguous runs ``[first, end)`` of *missing* blocks that no download covers."""
    runs: list[tuple[int, int]] = []
    for block in missing:
        if block in inflight:
            continue
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs


class BlockFetcher:
    """Reads byte ranges of cached files, downloading what is missing exactly once."""

    def __init__(
        self,
        source: HttpSource,
        options: MountOptions,
        nursery: trio.Nursery,
        on_remote_changed: RemoteChangedCallback | None = None,
        budget: CacheBudget | None = None,
    ) -> None:
        self._source = source
        self._options = options
        #: The cache cap, when there is one (`--cache-max-size`).
        self.budget = budget
        # With a cap, a sequential reader's readahead is at most a quarter of it: blocks
        # fetched ahead must not push out the ones being read.
        self._readahead_max = options.readahead_max
        if budget is not None:
            self._readahead_max = max(
                options.min_request, min(options.readahead_max, budget.cap // 4)
            )
        self._nursery = nursery
        self._on_remote_changed = on_remote_changed
        self._inflight: dict[CachedFile, dict[int, Download]] = {}
        self._cache_full_until = float("-inf")
        #: When the last foreground read arrived (the idle filler waits for quiet). Starts at
        #: creation: a fresh mount is about to be read, so fill waits its idle time first.
        self.last_read = trio.current_time()
        self._fill_scopes: set[trio.CancelScope] = set()
        #: Per file: ``(first, end, until)`` of downloads that failed recently.
        self._failures: dict[CachedFile, list[tuple[int, int, float]]] = {}
        #: Per file: what its format says about its bytes (`set_layout`).
        self._maps: weakref.WeakKeyDictionary[CachedFile, FileMap] = weakref.WeakKeyDictionary()
        #: Parts of blocks fetched exactly for mapped files, and those on their way.
        self.pieces = PieceStore()
        self._piece_fetches: weakref.WeakKeyDictionary[CachedFile, list[_PieceFetch]] = (
            weakref.WeakKeyDictionary()
        )

    def set_layout(self, file: CachedFile, layout: FileMap | None) -> None:
        """Fetch *file* by what its format says from now on (None: by the general rules)."""
        if layout is None:
            self._maps.pop(file, None)
        else:
            self._maps[file] = layout

    def spawn(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run *function* in the fetcher's nursery (open-time analysis), not in a request."""
        self._nursery.start_soon(function, *args)

    @property
    def cache_full(self) -> bool:
        """True while reads bypass the cache because its disk was found full."""
        return trio.current_time() < self._cache_full_until

    async def read(
        self, file: CachedFile, offset: int, size: int, stream: ReadStream | None = None
    ) -> bytes:
        """Return bytes ``[offset, offset+size)`` of *file*, short only at EOF.

        *stream* is the caller's handle state: sequential handles get readahead. On a
        kernel's handle (`ReadStream.holds_failures`), a read that fails makes every read of
        its missing blocks on that handle fail at once for ``read_deadline`` seconds
        (`_failed_before`): the kernel retries a failed read on the same handle at once, and
        the deadline must hold across that retry, not start again. A new open (another
        handle) tries again at once; the library's and the HTTP server's handles try again
        at every read.
        """
        end = min(offset + size, file.size)
        if stream is None or not stream.holds_failures or offset >= end:
            return await self._read(file, offset, size, stream)
        first, last = offset // file.block_size, (end - 1) // file.block_size + 1
        reason = _failed_before(stream, file, first, last)
        if reason is not None:
            raise ReadError(reason)
        try:
            return await self._read(file, offset, size, stream)
        except ReadError as err:
            now = trio.current_time()
            stream.failed_reads[:] = [entry for entry in stream.failed_reads if entry[2] > now]
            stream.failed_reads.append((first, last, now + self._options.read_deadline, str(err)))
            raise

    async def _read(
        self, file: CachedFile, offset: int, size: int, stream: ReadStream | None
    ) -> bytes:
        end = min(offset + size, file.size)
        self.last_read = trio.current_time()
        if self._fill_scopes:
            self.pause_fill()
        layout = self._maps.get(file) if self._maps else None
        extent = None if layout is None else layout.extent_of_read(offset, end)
        # The map is for readers of the files inside the image (a loop device, a tool that
        # walks it); a handle still in a first run that began at offset 0 (sha256sum, cp)
        # reads the image itself: a plain stream.
        if (
            layout is not None
            and not layout.pending
            and stream is not None
            and stream.from_start(offset, end)
        ):
            layout = extent = None
        if stream is not None and offset < end and file.cacheable:
            wanted = stream.advance(
                offset,
                end,
                first_window=self._options.kernel_readahead,
                initial=self._options.min_request,
                maximum=self._readahead_max,
                proven=extent is not None and offset <= extent[0] < end,
                limit=None if extent is None else extent[1],
            )
            if wanted is not None and layout is not None and stream.reads_across:
                # A reader going from file to file: read ahead over the next files' data.
                for start, stop in layout.extents_within(*wanted, gap=file.block_size):
                    self.fetch_exact(file, start, stop)
                wanted = None
            if wanted is not None and layout is not None:
                wanted = _mapped_readahead(layout, offset, extent, wanted)
            if wanted is not None and extent is None:
                self.prefetch(file, wanted[0], wanted[1])
                wanted = None
        else:
            wanted = None
        if offset >= end:
            return b""
        if not file.cacheable:
            return await self._read_direct(file, offset, end)
        if layout is not None and (
            layout.pending or extent is not None or layout.in_metadata(offset)
        ):
            grow = 0
            if extent is not None and stream is not None and stream.proven:
                grow = min(extent[1], offset + self._options.min_request)
            if self.budget is not None:
                size = file.block_size
                self.budget.touch(file, offset // size, (end - 1) // size + 1)
            # The read's own bytes first, then its file's readahead: what the read waits
            # for is asked for before what it may need next.
            missed = self._assemble(file, offset, end) is None
            if missed:
                self.fetch_exact(file, offset, max(end, grow), background=False)
            if wanted is not None:
                self.fetch_exact(file, wanted[0], wanted[1])
            if missed and extent is not None and stream is not None and offset <= extent[0]:
                # The start of a file: a reader of many files nearby gets their data at once.
                part = stream.note_miss(offset, end, file.size, files=layout.count_extents)
                parts = [] if part is None else layout.extents_within(*part, gap=file.block_size)
                for start, stop in parts:
                    self.fetch_exact(file, start, stop)
            return await self._read_mapped(file, offset, end, grow)
        if wanted is not None:
            self.fetch_exact(file, wanted[0], wanted[1])
        block_size = file.block_size
        first, last = offset // block_size, (end - 1) // block_size + 1
        budget = self.budget
        if budget is not None:
            budget.touch(file, first, last)
        if file.has_blocks(first, last) and not file.retired:
            return file.read(offset, end - offset)
        if file.retired:
            raise ReadError(f"{file.name}: the remote file changed; reopen it for the new version")
        if self.pieces.size and (held := self._assemble(file, offset, end)) is not None:
            return held  # parts of blocks an exact fetch brought (libblkid's probes, say)
        if stream is not None and layout is None and not self._all_pending(file, first, last):
            # Only a read that needs a new download is a miss: one that waits for blocks
            # already on their way (a prefetched part still arriving) says nothing new.
            cluster = stream.note_miss(offset, end, file.size)
            if cluster is not None:
                self.prefetch(file, *cluster)
        if not self.cache_full:
            # Safety net: downloads have their own deadline; this bounds a reader even when
            # it waits on a long whole-file stream.
            limit = self._options.read_deadline + self._options.stall_timeout
            with trio.move_on_after(limit) as scope:
                try:
                    if budget is None:
                        await self._ensure(file, first, last)
                    else:
                        with budget.reading_blocks(file, first, last):
                            await self._ensure(file, first, last)
                    return file.read(offset, end - offset)
                except (_CacheFullError, UncacheableError):
                    pass
            if scope.cancelled_caught:
                raise ReadError(f"{file.name}: read at {offset} timed out after {limit:.0f}s")
        return await self._read_direct(file, offset, end)

    def _all_pending(self, file: CachedFile, first: int, last: int) -> bool:
        """True when every missing block of ``[first, last)`` is being downloaded already."""
        inflight = self._inflight.get(file)
        if not inflight:
            return False
        missing = BitMap()
        missing.add_range(first, last)
        missing -= file.bitmap
        return all(block in inflight for block in missing)

    async def _read_direct(self, file: CachedFile, offset: int, end: int) -> bytes:
        """Fetch ``[offset, end)`` from the network without caching it.

        For a file the cache cannot hold, and for every file while the cache disk is full.
        """
        if file.retired:
            raise ReadError(f"{file.name}: the remote file changed during the read")
        why = "the cache cannot hold it" if not file.cacheable else "cache disk full"
        if not file.remote.accepts_ranges:
            raise ReadError(f"{file.name}: {why} and the server does not do Range")
        if not file.cacheable:
            return await self._fetch_direct(file, (offset, end))
        # Only the missing blocks go to the network; the blocks present between them are
        # read now, before any await (a set bit means their bytes are final).
        block_size = file.block_size
        missing = BitMap()
        missing.add_range(offset // block_size, (end - 1) // block_size + 1)
        missing -= file.bitmap
        pieces: list[bytes | tuple[int, int]] = []
        position = offset
        for run_start, run_end in _runs(missing, {}):
            start, stop = max(offset, run_start * block_size), min(end, run_end * block_size)
            if start > position:
                pieces.append(file.read(position, start - position))
            pieces.append((start, stop))
            position = stop
        if position < end:
            pieces.append(file.read(position, end - position))
        return b"".join([await self._fetch_direct(file, piece) for piece in pieces])

    async def _fetch_direct(self, file: CachedFile, piece: bytes | tuple[int, int]) -> bytes:
        """Fetch bytes ``[start, stop)`` uncached (bytes already read pass through)."""
        if isinstance(piece, bytes):
            return piece
        start, stop = piece
        chunks: list[bytes] = []

        def keep(chunk: bytes) -> None:
            file.stats.add(len(chunk))
            chunks.append(chunk)

        async def attempt() -> None:
            chunks.clear()
            await self._source.fetch_range(file.remote, start, stop, keep)

        try:
            await retry_until(
                attempt,
                deadline=trio.current_time() + self._options.read_deadline,
                describe=f"{file.name}: bytes {start}-{stop - 1} (uncached)",
            )
        except HttpSourceError as err:
            self._note_change(file, err)
            raise ReadError(f"{file.name}: bytes at {start}: {err}") from None
        return b"".join(chunks)

    async def _ensure(self, file: CachedFile, first: int, last: int) -> None:
        """Wait until blocks ``[first, last)`` are present, starting downloads as needed.

        A download this read joined but did not start (readahead, an open's hints, another
        reader) may fail for reasons older than the read: the origin failing a moment ago and
        now well. Its failure costs this read one attempt of its own, not the read itself; a
        download this read started fails it.
        """
        inflight = self._inflight.setdefault(file, {})
        began = trio.current_time()
        joined_failed = False
        while True:
            if file.retired:
                raise ReadError(f"{file.name}: the remote file changed during the read")
            if not file.cacheable:
                raise UncacheableError(errno.EFBIG, str(file.uncached_reason))
            missing = BitMap()
            missing.add_range(first, last)
            missing -= file.bitmap
            if not missing:
                return
            self._schedule(file, inflight, missing)
            block = missing.min()
            download = inflight[block]
            while block not in file.bitmap and not download.done:
                await download.wait_change()
            if block in file.bitmap:
                continue
            cause = download.error
            if isinstance(cause, _CacheFullError | UncacheableError):
                raise cause
            if isinstance(cause, RangeNotSupportedError | FillPaused):
                continue  # fetched as one stream now, or a paused fill: schedule again
            if download.started < began and not joined_failed:
                joined_failed = True
                continue  # an older download's failure: this read tries once itself
            raise ReadError(f"{file.name}: bytes at {block * file.block_size}: {cause}")

    def _schedule(self, file: CachedFile, inflight: dict[int, Download], missing: BitMap) -> None:
        """Start one download per run of missing blocks that nothing is fetching yet."""
        if not file.remote.accepts_ranges:
            block = missing.min()
            if block not in inflight:
                # One stream per file. A block left to a range request that met the server
                # ignoring Range is not registered to the stream: it joins it now.
                running = next((d for d in inflight.values() if d.stream), None)
                if running is None:
                    self._start(file, inflight, 0, file.nblocks, stream=True)
                else:
                    inflight[block] = running
            return
        min_blocks = max(1, self._options.min_request // file.block_size)
        for first, end in _runs(missing, inflight):
            self._start(file, inflight, first, self._grow(file, inflight, first, end, min_blocks))

    def prefetch(self, file: CachedFile, start: int, end: int, *, split: bool = True) -> None:
        """Start downloads for bytes ``[start, end)`` without waiting for them (readahead).

        With *split*, the range is cut into parts of a quarter of its size (between the
        minimum request and `MAX_PART`) that run concurrently, so a per-connection rate cap
        does not cap a stream; without, each missing run is one request.
        """
        end = min(end, file.size)
        if start >= end or file.retired or self.cache_full or not file.cacheable:
            return
        block_size = file.block_size
        missing = BitMap()
        missing.add_range(start // block_size, -(-end // block_size))
        missing -= file.bitmap
        if not missing:
            return
        inflight = self._inflight.setdefault(file, {})
        if not file.remote.accepts_ranges:
            self._schedule(file, inflight, missing)
            return
        part = min(max((end - start) // 4, self._options.min_request), MAX_PART)
        part_blocks = max(1, part // block_size) if split else file.nblocks
        for first, run_end in _runs(missing, inflight):
            for part_first in range(first, run_end, part_blocks):
                end_block = min(part_first + part_blocks, run_end)
                self._start(file, inflight, part_first, end_block, background=True)

    def downloading(self, file: CachedFile) -> bool:
        """True while a download of some of *file*'s blocks is in flight."""
        return bool(self._inflight.get(file))

    async def ensure(self, file: CachedFile, first: int, end: int) -> None:
        """Wait until blocks ``[first, end)`` are present, downloading what is missing.

        The single-flight path of `read` without its reader deadline (each download has its
        own); raises `ReadError` when a download fails.
        """
        try:
            await self._ensure(file, first, end)
        except _CacheFullError as err:
            raise ReadError(f"{file.name}: cache disk full: {err}") from None
        except UncacheableError as err:
            raise ReadError(f"{file.name}: not cached: {err.strerror}") from None

    # -- exact fetches of mapped images ----------------------------------------------------------
    #
    # A file whose format is known (a `FileMap`) is read in pages by the kernel: a block of
    # 64 KiB around each 4 KiB directory block would fetch 16 times what it reads. Its misses
    # are fetched exactly instead: whole blocks go to the cache as always, parts of blocks
    # (page-aligned) are kept in memory as pieces (`PieceStore`), with the same single flight.

    def fetch_exact(
        self, file: CachedFile, start: int, end: int, *, background: bool = True
    ) -> None:
        """Start fetching bytes ``[start, end)`` (page-aligned) without waiting for them.

        Whole blocks become block downloads (in parallel parts, as readahead); the parts of
        blocks at either end become exact piece requests, unless present, held or on their
        way already.
        """
        start = start // PAGE * PAGE
        end = min(-(-end // PAGE) * PAGE, file.size)
        if start >= end or file.retired or self.cache_full or not file.cacheable:
            return
        if not file.remote.accepts_ranges:
            self.prefetch(file, start, end)
            return
        size = file.block_size
        first_whole, last_whole = -(-start // size), end // size
        if end == file.size:
            last_whole = file.nblocks
        if first_whole < last_whole:
            whole = BitMap()
            whole.add_range(first_whole, last_whole)
            for fetch in self._piece_fetches.get(file, ()):  # pieces on their way cover some
                stop = file.nblocks if fetch.end >= file.size else fetch.end // size
                whole.remove_range(-(-fetch.start // size), max(stop, 0))
            whole -= file.bitmap
            # Few requests: the window of one file inside an image is small, and every request
            # beyond what may run at once waits a round trip for a connection.
            for run_first, run_end in _runs(whole, self._inflight.get(file, {})):
                run = (run_first * size, min(run_end * size, file.size))
                self.prefetch(file, *run, split=run[1] - run[0] > SPLIT_EXACT_FROM)
            parts = [(start, first_whole * size), (last_whole * size, end)]
        else:
            # No whole block: one part, or two when it crosses a block boundary.
            middle = (start // size + 1) * size
            parts = [(start, min(end, middle)), (middle, end)]
        inflight = self._inflight.get(file, {})
        wanted = []
        for part_start, part_end in parts:
            block = part_start // size
            if part_start >= part_end or block in file.bitmap or block in inflight:
                continue  # present, or its whole block is on its way
            if self.pieces.covered(file, part_start, part_end):
                continue
            if self._piece_fetch(file, part_start, part_end) is None:
                wanted.append((part_start, part_end))
        if len(wanted) == 2 and wanted[0][1] == wanted[1][0]:
            wanted = [(wanted[0][0], wanted[1][1])]  # two touching parts: one request
        for part_start, part_end in wanted:
            self._start_piece(file, part_start, part_end, background)

    async def read_exact(self, file: CachedFile, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)``, fetched exactly (a format parser's reads).

        Raises `ReadError` when they cannot be had.
        """
        end = min(offset + size, file.size)
        if offset >= end:
            return b""
        if not file.cacheable or not file.remote.accepts_ranges:
            await self.ensure(file, offset // file.block_size, (end - 1) // file.block_size + 1)
            return file.read(offset, end - offset)
        return await self._read_mapped(file, offset, end, 0, background=True)

    async def _read_mapped(
        self, file: CachedFile, offset: int, end: int, grow: int, *, background: bool = False
    ) -> bytes:
        """A read of a mapped file: fetch exactly what it misses (up to *grow*, if more)."""
        limit = self._options.read_deadline + self._options.stall_timeout
        with trio.move_on_after(limit):
            while True:
                if file.retired:
                    raise ReadError(f"{file.name}: the remote file changed during the read")
                data = self._assemble(file, offset, end)
                if data is not None:
                    return data
                if self.cache_full:
                    return await self._read_direct(file, offset, end)
                self.fetch_exact(file, offset, max(end, grow), background=background)
                grow = 0
                await self._wait_exact(file, offset, end)
                await trio.lowlevel.checkpoint()  # never a busy loop, whatever was missing
        raise ReadError(f"{file.name}: read at {offset} timed out after {limit:.0f}s")

    def _assemble(self, file: CachedFile, offset: int, end: int) -> bytes | None:
        """Bytes ``[offset, end)`` from present blocks and pieces, or None if any is missing.

        Synchronous: a present block's bytes are read before anything can evict it.
        """
        size = file.block_size
        first, last = offset // size, (end - 1) // size + 1
        if file.has_blocks(first, last):
            return file.read(offset, end - offset)
        parts: list[bytes] = []
        position = offset
        while position < end:
            block = position // size
            stop = min(end, (block + 1) * size)
            if block in file.bitmap:
                parts.append(file.read(position, stop - position))
            else:
                piece = self.pieces.get(file, position, stop)
                if piece is None:
                    return None
                parts.append(piece)
            position = stop
        return b"".join(parts)

    async def _wait_exact(self, file: CachedFile, offset: int, end: int) -> None:
        """Wait for the first missing part of ``[offset, end)``; raise `ReadError` if it failed."""
        size = file.block_size
        position = offset
        while position < end:
            block = position // size
            stop = min(end, (block + 1) * size)
            if block in file.bitmap or self.pieces.covered(file, position, stop):
                position = stop
                continue
            download = self._inflight.get(file, {}).get(block)
            if download is not None:
                while block not in file.bitmap and not download.done:
                    await download.wait_change()
                if block not in file.bitmap and isinstance(download.error, HttpSourceError):
                    raise ReadError(f"{file.name}: bytes at {position}: {download.error}")
                return
            fetch = self._piece_fetch(file, position, stop)
            if fetch is not None:
                await fetch.done.wait()
                if fetch.error is not None:
                    raise ReadError(f"{file.name}: bytes at {position}: {fetch.error}")
            return  # nothing on its way: the caller fetches it again
        return

    def _piece_fetch(self, file: CachedFile, start: int, end: int) -> _PieceFetch | None:
        """The exact request in flight that covers ``[start, end)``, if any."""
        for fetch in self._piece_fetches.get(file, ()):
            if fetch.start <= start and end <= fetch.end:
                return fetch
        return None

    def _start_piece(self, file: CachedFile, start: int, end: int, background: bool) -> None:
        fetch = _PieceFetch(start, end)
        self._piece_fetches.setdefault(file, []).append(fetch)
        self._nursery.start_soon(self._run_piece, file, fetch, background)

    async def _run_piece(self, file: CachedFile, fetch: _PieceFetch, background: bool) -> None:
        """Fetch one piece within the read deadline; keep it, and any block it completes."""
        chunks: list[bytes] = []

        def keep(chunk: bytes) -> None:
            file.stats.add(len(chunk))
            chunks.append(chunk)

        async def attempt() -> None:
            chunks.clear()
            await self._source.fetch_range(
                file.remote, fetch.start, fetch.end, keep, background=background
            )

        try:
            await retry_until(
                attempt,
                deadline=trio.current_time() + self._options.read_deadline,
                describe=f"{file.name}: bytes {fetch.start}-{fetch.end - 1}",
            )
            if not file.retired:
                self.pieces.add(file, fetch.start, b"".join(chunks))
                await self._store_whole_blocks(file, fetch.start)
        except RangeNotSupportedError:
            # Not an error for the readers: they fetch the file as one stream from now on.
            if file.remote.accepts_ranges:
                log.warning(
                    "%s: the server ignores Range; fetching the file as one stream", file.name
                )
                file.disable_ranges()
        except HttpSourceError as err:
            fetch.error = err
            log.error("%s: download failed: %s", file.name, err)
            self._note_change(file, err)
        except Exception as err:  # a bug must cost this piece, not the daemon
            log.exception("%s: internal error in a download", file.name)
            fetch.error = err
        finally:
            fetches = self._piece_fetches.get(file)
            if fetches is not None and fetch in fetches:
                fetches.remove(fetch)
            fetch.done.set()

    async def _store_whole_blocks(self, file: CachedFile, near: int) -> None:
        """Put blocks that the piece at *near* now covers whole into the cache (no cap only)."""
        if self.budget is not None or not file.cacheable:
            return
        for block, data in self.pieces.take_blocks(file, near):
            if block in file.bitmap:
                continue
            try:
                await file.store_blocks(block, 1, data)
            except (OSError, FileRetiredError, UncacheableError) as err:
                log.debug("%s: block %d not stored: %s", file.name, block, err)
                return

    # -- background fill ------------------------------------------------------------------------

    def pause_fill(self) -> None:
        """Stop every background fill download now (a foreground read needs the link)."""
        for scope in self._fill_scopes:
            scope.cancel()

    async def wait_idle(self, quiet: float) -> None:
        """Return once no foreground read has arrived for *quiet* seconds."""
        while True:
            remaining = self.last_read + quiet - trio.current_time()
            if remaining <= 0:
                return
            await trio.sleep(remaining)

    async def fill(self, file: CachedFile, first: int, end: int, *, pausable: bool = True) -> None:
        """Download the missing blocks of ``[first, end)`` as background work.

        Registered like any download, so readers of these blocks wait for it instead of
        fetching them again; cancelled by the next foreground read (`FillPaused`) unless not
        *pausable* (an explicit `remotefs prefetch`), keeping every whole block already
        stored. Blocks another download is fetching are left to it. Raises the download's
        error on failure.
        """
        if file.retired or not file.cacheable:
            return
        inflight = self._inflight.setdefault(file, {})
        if not file.remote.accepts_ranges:
            await self._ensure(file, 0, file.nblocks)  # one stream; not pausable
            return
        position = first
        while position < end:
            # Recomputed after every await: meanwhile other downloads may have claimed blocks.
            missing = BitMap()
            missing.add_range(position, end)
            missing -= file.bitmap
            runs = _runs(missing, inflight)
            if not runs:
                return
            run_first, run_end = runs[0]
            position = run_end
            download = Download(run_first, run_end, background=pausable)
            download.started = trio.current_time()
            for block in range(run_first, run_end):
                inflight[block] = download
            scope = trio.CancelScope()
            if pausable:
                self._fill_scopes.add(scope)
            try:
                with scope:
                    await retry_until(
                        functools.partial(self._attempt_range, file, download),
                        deadline=trio.current_time() + self._options.read_deadline,
                        describe=f"{file.name}: background fill",
                    )
                if scope.cancelled_caught:
                    download.error = FillPaused()
                    raise download.error
            except (HttpSourceError, OSError, FileRetiredError) as err:
                self._fail(file, download, err)
                raise
            finally:
                self._fill_scopes.discard(scope)
                self._finish(file, inflight, download)

    @staticmethod
    def _grow(
        file: CachedFile, inflight: dict[int, Download], first: int, end: int, min_blocks: int
    ) -> int:
        """Extend ``[first, end)`` to *min_blocks* over blocks nobody has or is fetching."""
        target = min(max(end, first + min_blocks), file.nblocks)
        while end < target and end not in inflight and end not in file.bitmap:
            end += 1
        return end

    def _start(
        self,
        file: CachedFile,
        inflight: dict[int, Download],
        first: int,
        end: int,
        *,
        stream: bool = False,
        background: bool = False,
    ) -> None:
        """Register and launch a download of blocks ``[first, end)``.

        *background* (readahead) downloads leave the pool's reserved connections to readers.
        """
        download = Download(first, end, stream=stream, background=background)
        download.started = trio.current_time()
        for block in range(first, end):
            if stream and block in inflight:
                continue
            inflight[block] = download
        runner = self._run_stream if stream else self._run_ranges
        self._nursery.start_soon(runner, file, inflight, download)

    def _finish(self, file: CachedFile, inflight: dict[int, Download], download: Download) -> None:
        download.done = True
        if download.error is None:
            file.stats.last_error = None
        for block in range(download.first, download.end):
            if inflight.get(block) is download:
                del inflight[block]
        download.notify()

    def _fail(self, file: CachedFile, download: Download, err: BaseException) -> None:
        """Record why a download stopped and what follows from it."""
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            if not self.cache_full:
                log.warning(
                    "cache disk is full (%s); serving reads from the network without caching"
                    " for %.0fs; nothing cached so far is lost",
                    err.strerror,
                    CACHE_FULL_BACKOFF,
                )
            self._cache_full_until = trio.current_time() + CACHE_FULL_BACKOFF
            download.error = _CacheFullError(str(err))
            return
        download.error = err
        if isinstance(err, FileRetiredError | UncacheableError):
            return  # logged where it was found; readers of this download read uncached
        if isinstance(err, RangeNotSupportedError):
            log.warning("%s: the server ignores Range; fetching the file as one stream", file.name)
            file.disable_ranges()
            return
        log.error("%s: download failed: %s", file.name, err)
        file.stats.last_error = str(err)
        now = trio.current_time()
        recent = [entry for entry in self._failures.get(file, ()) if entry[2] > now]
        self._failures[file] = [*recent, (download.first, download.end, now + RECENT_FAILURE)]
        self._note_change(file, err)

    def _failed_recently(self, file: CachedFile, block: int) -> bool:
        now = trio.current_time()
        return any(
            first <= block < end and until > now
            for first, end, until in self._failures.get(file, ())
        )

    def _note_change(self, file: CachedFile, err: BaseException) -> None:
        if isinstance(err, RemoteChangedError) and self._on_remote_changed and not file.retired:
            self._on_remote_changed(file, err)

    async def _run_ranges(
        self, file: CachedFile, inflight: dict[int, Download], download: Download
    ) -> None:
        """Fetch a download's blocks with retries within the deadline; always wake waiters."""
        describe = f"{file.name}: bytes {download.first * file.block_size}-"
        describe += f"{min(download.end * file.block_size, file.size) - 1}"
        budget = self._options.read_deadline
        if self._failed_recently(file, download.first):
            budget = min(budget, self._options.stall_timeout)  # a second chance, not a deadline
        try:
            await retry_until(
                lambda: self._attempt_range(file, download),
                deadline=trio.current_time() + budget,
                describe=describe,
            )
        except (HttpSourceError, OSError, FileRetiredError) as err:
            self._fail(file, download, err)
        except Exception as err:  # a bug must cost this download, not the daemon
            log.exception("%s: internal error in a download", file.name)
            self._fail(file, download, err)
        finally:
            self._finish(file, inflight, download)

    async def _attempt_range(self, file: CachedFile, download: Download) -> None:
        """One request for the download's blocks from the first one still missing."""
        block = download.first
        while block < download.end and block in file.bitmap:
            block += 1
        if block >= download.end:
            return
        start = block * file.block_size
        end = min(download.end * file.block_size, file.size)
        assembler = _BlockAssembler(file, block, download, self.budget)
        await self._source.fetch_range(
            file.remote, start, end, assembler.feed, background=download.background
        )

    async def _run_stream(
        self, file: CachedFile, inflight: dict[int, Download], download: Download
    ) -> None:
        """Download the whole body once (server without Range), retrying while it progresses.

        A body can take longer than any read deadline, so the deadline counts from the last
        block that arrived, not from the start; readers have their own deadline meanwhile.
        """
        try:
            while True:
                before = len(file.bitmap)

                async def attempt() -> None:
                    assembler = _BlockAssembler(file, 0, download, self.budget)
                    await self._source.fetch_whole(file.remote, assembler.feed)

                try:
                    await retry_until(
                        attempt,
                        deadline=trio.current_time() + self._options.read_deadline,
                        describe=f"{file.name}: whole-file stream",
                        per_attempt_deadline=False,
                    )
                    return
                except HttpSourceError:
                    if len(file.bitmap) == before or file.complete:
                        raise
                    log.info(
                        "%s: stream interrupted; continuing (%d blocks kept)",
                        file.name,
                        len(file.bitmap),
                    )
        except (HttpSourceError, OSError, FileRetiredError) as err:
            self._fail(file, download, err)
        except Exception as err:  # a bug must cost this download, not the daemon
            log.exception("%s: internal error in a download", file.name)
            self._fail(file, download, err)
        finally:
            self._finish(file, inflight, download)
