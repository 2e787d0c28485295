"""Turn reads into downloads: coalesce missing blocks, fetch each block once, bound the wait.

The life of a read (see docs/architecture.md for the full story):

1. Blocks already present are served straight from the data file, with no await and no lock.
2. Missing blocks that no download covers are grouped into contiguous runs; each run becomes
   one `Download` (one Range request), extended forward to the minimum request size but never
   over a block that is present or already being fetched, and never past EOF.
3. The reader waits on the downloads that cover its blocks. A download writes and marks every
   whole block the moment it arrives and wakes its waiters, so two readers of one block share
   one request ("single flight"), and a reader at the start of a long request need not wait for
   its end.
4. Transient failures are retried (backoff with jitter) from the first block still missing, so
   blocks already received are kept. After the read deadline the download fails; every reader
   waiting on it gets `ReadError` (EIO) and the next read starts a new download.

Downloads run in the fetcher's own nursery, not in the reader's task, so a reader that gives
up does not cancel a request other readers share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio
from pyroaring import BitMap

from ..config.options import MountOptions
from ..http.errors import HttpSourceError
from ..http.retry import retry_until
from ..http.source import HttpSource
from .cached_file import CachedFile

log = logging.getLogger(__name__)


class ReadError(Exception):
    """A read could not be satisfied; the FUSE layer answers EIO. The message names the file."""


@dataclass(eq=False)
class Download:
    """One request in flight for blocks ``[first, end)`` of a file."""

    first: int
    end: int
    done: bool = False
    error: BaseException | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        """Wake every reader waiting on this download (a block arrived, or it ended)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> None:
        """Sleep until the next `notify`."""
        await self._changed.wait()


class _BlockAssembler:
    """Cuts a byte stream that starts at a block boundary into whole blocks and stores them."""

    def __init__(self, file: CachedFile, first_block: int, download: Download) -> None:
        self._file = file
        self._block = first_block
        self._download = download
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        file = self._file
        stored = False
        while self._block < self._download.end:
            length = file.block_length(self._block)
            if len(self._buffer) < length:
                break
            file.write_block(self._block, memoryview(self._buffer)[:length])
            del self._buffer[:length]
            self._block += 1
            stored = True
        if stored:
            self._download.notify()


class BlockFetcher:
    """Reads byte ranges of cached files, downloading what is missing exactly once."""

    def __init__(self, source: HttpSource, options: MountOptions, nursery: trio.Nursery) -> None:
        self._source = source
        self._options = options
        self._nursery = nursery
        self._inflight: dict[CachedFile, dict[int, Download]] = {}

    async def read(self, file: CachedFile, offset: int, size: int) -> bytes:
        """Return bytes ``[offset, offset+size)`` of *file*, short only at EOF."""
        end = min(offset + size, file.size)
        if offset >= end:
            return b""
        block_size = file.block_size
        first, last = offset // block_size, (end - 1) // block_size + 1
        if not file.has_blocks(first, last):
            # Safety net only: downloads have their own deadline; this bounds a reader even
            # if a download were somehow never to finish.
            limit = self._options.read_deadline + self._options.stall_timeout + 5
            with trio.move_on_after(limit) as scope:
                await self._ensure(file, first, last)
            if scope.cancelled_caught:
                raise ReadError(f"{file.name}: read at {offset} timed out after {limit:.0f}s")
        return file.read(offset, end - offset)

    async def _ensure(self, file: CachedFile, first: int, last: int) -> None:
        """Wait until blocks ``[first, last)`` are present, starting downloads as needed."""
        inflight = self._inflight.setdefault(file, {})
        while True:
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
            if block not in file.bitmap:
                cause = download.error
                raise ReadError(f"{file.name}: bytes at {block * file.block_size}: {cause}")

    def _schedule(self, file: CachedFile, inflight: dict[int, Download], missing: BitMap) -> None:
        """Start one download per run of missing blocks that nothing is fetching yet."""
        min_blocks = max(1, self._options.min_request // file.block_size)
        run_start: int | None = None
        previous = -2
        for block in missing:
            if block in inflight:
                continue
            if run_start is not None and block == previous + 1:
                previous = block
                continue
            if run_start is not None:
                self._start(file, inflight, run_start, previous + 1, min_blocks)
            run_start = previous = block
        if run_start is not None:
            self._start(file, inflight, run_start, previous + 1, min_blocks)

    def _start(
        self, file: CachedFile, inflight: dict[int, Download], first: int, end: int, min_blocks: int
    ) -> None:
        """Register and launch a download of ``[first, end)`` grown to *min_blocks* if free."""
        target = min(max(end, first + min_blocks), file.nblocks)
        while end < target and end not in inflight and end not in file.bitmap:
            end += 1
        download = Download(first, end)
        for block in range(first, end):
            inflight[block] = download
        self._nursery.start_soon(self._run, file, inflight, download)

    async def _run(
        self, file: CachedFile, inflight: dict[int, Download], download: Download
    ) -> None:
        """Fetch a download's blocks with retries within the deadline; always wake waiters."""
        describe = f"{file.name}: bytes {download.first * file.block_size}-"
        describe += f"{min(download.end * file.block_size, file.size) - 1}"
        try:
            await retry_until(
                lambda: self._attempt(file, download),
                deadline=trio.current_time() + self._options.read_deadline,
                describe=describe,
            )
        except (HttpSourceError, OSError) as err:
            download.error = err
            log.error("%s: download failed: %s", file.name, err)
        finally:
            download.done = True
            for block in range(download.first, download.end):
                if inflight.get(block) is download:
                    del inflight[block]
            download.notify()

    async def _attempt(self, file: CachedFile, download: Download) -> None:
        """One request for the download's blocks from the first one still missing."""
        block = download.first
        while block < download.end and block in file.bitmap:
            block += 1
        if block >= download.end:
            return
        start = block * file.block_size
        end = min(download.end * file.block_size, file.size)
        assembler = _BlockAssembler(file, block, download)
        await self._source.fetch_range(file.remote, start, end, assembler.feed)
