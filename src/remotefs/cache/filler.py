"""Idle background fill: complete partly read files while nobody reads.

When no foreground read has arrived for ``fill_idle`` seconds, missing blocks are downloaded
(with ``--fill opened``, the default, only of files a program has read: the design is to
finish what was started, as a browser completes a video; ``--fill all`` completes every
listed file, for mirrors), file by file (in mount order), largest contiguous gap first, over
at most ``fill_connections`` connections and at most ``fill_rate`` bytes per second, never
a stale file before its origin confirmed it, and never below the cache filesystem's
free-space reserve (``--min-free``). Planning costs time in the number of gaps, not of blocks
(`gaps.py`), so a 16 TiB file does not stall the event loop. The next foreground read cancels the
fill at once (`BlockFetcher.pause_fill`); every whole block already stored is kept. An origin
that fails is backed off (doubling up to five minutes) rather than hammered. Under a cache cap
fill only starts a chunk while the cache has room for it: it does not push out blocks that
were read in order to complete files.

Fill only what can be kept: a file is never filled when it is larger than the cache cap
(``--cache-max-size``: it could never be complete), or when the bytes it still lacks exceed
the free space above the reserve. Any door can open a file (one byte asked of ``remotefs
serve`` opens it), so this is what bounds what a client's request can make the daemon
download: the bytes it asked for, their readahead, and at most a file that fits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import trio

from ..config.options import MiB, MountOptions
from ..http.errors import HttpSourceError
from ..units import human_size
from .cached_file import CachedFile, FileRetiredError
from .disk_space import RECHECK_INTERVAL, FreeSpaceReserve
from .fetcher import BlockFetcher, FillPaused
from .freshness import Revalidator
from .gaps import gaps_largest_first

log = logging.getLogger(__name__)

#: One background request: small enough to pause promptly and to pace a rate cap finely.
FILL_CHUNK = 4 * MiB
FIRST_BACKOFF = 5.0
MAX_BACKOFF = 300.0


def _chunks(gaps: list[tuple[int, int]], chunk_blocks: int) -> Iterator[tuple[int, int]]:
    for first, end in gaps:
        for start in range(first, end, chunk_blocks):
            yield start, min(start + chunk_blocks, end)


class Filler:
    """The background task that completes files; one per daemon."""

    def __init__(
        self,
        fetcher: BlockFetcher,
        files: Callable[[], list[CachedFile]],
        options: MountOptions,
        reserve: FreeSpaceReserve | None = None,
        revalidator: Revalidator | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._files = files
        self._options = options
        self._reserve = reserve
        self._revalidator = revalidator
        self._backoff: dict[CachedFile, tuple[float, float]] = {}  # file -> (until, delay)
        #: Names of files left unfilled because they do not fit (each logged once).
        self._too_large: set[str] = set()

    def _next_file(self) -> CachedFile | None:
        now = trio.current_time()
        for file in self._files():
            if file.complete or file.retired or file.no_fill or not file.cacheable:
                continue
            if self._options.fill == "opened" and not file.meta.opened:
                continue  # nobody read it: a list of 50 ISOs is not 50 downloads
            if self._revalidator is not None and self._revalidator.is_stale(file):
                # Never complete a version the origin may have replaced: ask first.
                self._revalidator.in_background(file)
                continue
            budget = self._fetcher.budget
            if budget is not None and not budget.has_room(FILL_CHUNK):
                return None  # the cache is full: fill waits until a cap leaves room
            misfit = self._misfit(file)
            if misfit is not None:
                if file.key not in self._too_large:
                    self._too_large.add(file.key)
                    log.info("%s: not completed in the background: %s", file.name, misfit)
                continue
            self._too_large.discard(file.key)
            until, _ = self._backoff.get(file, (0.0, 0.0))
            if until <= now:
                return file
        return None

    def _misfit(self, file: CachedFile) -> str | None:
        """Why *file* cannot be kept whole in the cache, or None when it can."""
        budget = self._fetcher.budget
        if budget is not None and file.size > budget.cap:
            return (
                f"it is larger ({human_size(file.size)}) than the cache cap"
                f" ({human_size(budget.cap)}, --cache-max-size)"
            )
        missing = file.size - file.cached_bytes
        if self._reserve is not None and not self._reserve.could_hold(missing):
            return (
                f"the {human_size(missing)} it lacks do not fit in the cache filesystem's free"
                f" space above its reserve ({human_size(self._reserve.reserve)}, --min-free)"
            )
        return None

    async def run(self) -> None:
        """Fill forever (until cancelled), only while the mount is idle."""
        while True:
            await self._fetcher.wait_idle(self._options.fill_idle)
            file = self._next_file()
            if file is None:
                await trio.sleep(self._options.fill_idle)
                continue
            if self._reserve is not None and not self._reserve.room_for(FILL_CHUNK):
                await trio.sleep(RECHECK_INTERVAL)  # the cache filesystem is at its reserve
                continue
            try:
                await self._fill_file(file)
            except Exception as err:  # a bug must cost this file's fill, not the daemon
                log.exception("%s: background fill failed", file.name)
                self._back_off(file, err)

    async def _fill_file(self, file: CachedFile) -> None:
        """Download *file*'s gaps with a few workers until done, paused or failed."""
        chunk_blocks = max(1, FILL_CHUNK // file.block_size)
        if self._options.fill_rate:
            chunk_blocks = max(1, min(chunk_blocks, self._options.fill_rate // file.block_size))
        work = _chunks(gaps_largest_first(file.bitmap, file.nblocks), chunk_blocks)
        failure: list[BaseException] = []
        started = trio.current_time()
        fetched = [0]

        budget = self._fetcher.budget

        async def worker() -> None:
            for first, end in work:
                if failure or file.no_fill:
                    return
                need = (end - first) * file.block_size
                if budget is not None and not budget.has_room(need):
                    return  # background fill never evicts cached blocks to make room
                before = file.cached_bytes
                with self._claim(need) as room:
                    if not room:
                        return  # nor takes the cache filesystem below its free-space reserve
                    try:
                        await self._fetcher.fill(file, first, end)
                    except FillPaused:
                        failure.append(FillPaused())
                        return
                    except (HttpSourceError, OSError, FileRetiredError) as err:
                        failure.append(err)
                        return
                fetched[0] += file.cached_bytes - before
                await self._pace(started, fetched[0])

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, self._options.fill_connections)):
                nursery.start_soon(worker)
        errors = [err for err in failure if not isinstance(err, FillPaused)]
        if errors:
            self._back_off(file, errors[0])
        elif not failure:
            self._backoff.pop(file, None)
            if file.complete:
                log.info("%s: completed in the background", file.name)

    def _claim(self, need: int) -> contextlib.AbstractContextManager[bool]:
        if self._reserve is None:
            return contextlib.nullcontext(True)
        return self._reserve.claim(need)

    def _back_off(self, file: CachedFile, error: BaseException) -> None:
        """Leave *file* alone for a while after a failure (doubling, up to five minutes)."""
        _, delay = self._backoff.get(file, (0.0, FIRST_BACKOFF / 2))
        delay = min(delay * 2, MAX_BACKOFF)
        self._backoff[file] = (trio.current_time() + delay, delay)
        log.warning("%s: background fill failed (%s); retrying in %.0fs", file.name, error, delay)

    async def _pace(self, started: float, fetched: int) -> None:
        """Sleep as needed so the fill's average rate stays under ``fill_rate``."""
        rate = self._options.fill_rate
        if rate:
            ahead = fetched / rate - (trio.current_time() - started)
            if ahead > 0:
                await trio.sleep(ahead)
