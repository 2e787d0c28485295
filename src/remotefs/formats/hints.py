"""What to fetch when a file is opened, before its reader asks: the open-time hints.

On every open of a file that is not complete:

1. Its head (``--prefetch-head``) is fetched, and either its tail (``--prefetch-tail``,
   growing with the file, `tail_hint`) or, when the opener is setting up a loop device
   (`LOOP_OPENERS`), the places libblkid probes (`probe_ranges`): every loop device is
   probed by mount(8) before anything is mounted from it, one synchronous read after
   another, and a round trip for each would cost more than all the rest.
2. The first open of each file version starts `analyse` in the background: the head shows
   the format, and the format's parser (`remotefs.formats`) fetches and reads exactly the
   metadata a reader of it needs, then hands the fetcher a `Layout`, whose metadata is
   fetched at once and whose extents bound readahead (`BlockFetcher.read`).

A loop device's backing file is opened with ``direct_io``: the loop driver's requests then
reach the daemon as the kernel's own demand, instead of being widened by the page cache's
readahead on the backing file (up to 1 MiB past every file inside the image). Until its
analysis ends, such a file is fetched exactly (a *pending* layout): no rounding up of misses
to ``--min-request`` and no readahead, so nothing is fetched that the metadata may show to
be unneeded.

Nothing here can fail an open or a read: the analysis runs in its own task, and every error
in it (a damaged image, a parser bug, a failed download) only means no hint.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Sequence

import trio

from ..cache.cached_file import CachedFile
from ..cache.fetcher import BlockFetcher, ReadError
from ..cache.readahead import tail_hint
from . import analyse
from .layout import Layout, Range, merge
from .reader import Budget, ImageReader, NoHint

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

#: Programs whose open of a file is a loop device's setup (the command name, as in
#: ``/proc/PID/comm``): mount(8) with ``-o loop``, losetup(8), and udisks (desktop mounts).
LOOP_OPENERS = frozenset({"mount", "losetup", "udisksd"})
#: What libblkid (util-linux 2.38, Debian 12) reads when it probes a new device: the first
#: 512 KiB (most filesystems' and RAID formats' superblocks, swap signatures up to 64 KiB
#: pages), one page at 512 KiB, 1, 2 and 4 MiB, the last 512 KiB (MD, DDF and other RAID metadata,
#: ZFS labels) and a page 1544 KiB before the end, measured with the kernel's block trace.
PROBE_HEAD = 512 * KiB
PROBE_POINTS = (PROBE_HEAD, 1 * MiB, 2 * MiB, 4 * MiB)
PROBE_TAIL = 512 * KiB
PROBE_TAIL_POINTS = (1544 * KiB,)
PROBE_PAGE = 4 * KiB
#: Metadata ranges of at least this many blocks are fetched in whole blocks (at most one
#: block more at each end: under 25% of the range), smaller ones exactly, page by page.
WHOLE_BLOCKS_FROM = 8
#: How long an analysis may take before its hint is given up (the reader has long since
#: fetched what it needed by then).
ANALYSIS_DEADLINE = 60.0


def probe_ranges(size: int) -> list[Range]:
    """The byte ranges of a *size*-byte device that libblkid reads (see `PROBE_HEAD`)."""
    ranges = [(0, PROBE_HEAD)]
    ranges += [(point, point + PROBE_PAGE) for point in PROBE_POINTS]
    ranges += [(size - PROBE_TAIL, size)]
    ranges += [(size - back, size - back + PROBE_PAGE) for back in PROBE_TAIL_POINTS]
    return merge((max(0, start), min(size, end)) for start, end in ranges)


def budget_for(size: int) -> Budget:
    """What one analysis may fetch: 1/8 of the file, at least 16 MiB, at most 512 MiB.

    The metadata of real images is a few percent of them (ext4's inode tables and
    directories, squashfs's tables); a hostile one that claims more gets no hint.
    """
    return Budget(max_bytes=max(16 * MiB, min(size // 8, 512 * MiB)))


def opener_name(pid: int) -> str:
    """The command name of process *pid* (empty if it is gone or hidden)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return ""


class OpenHints:
    """The open-time hints of one mount (see the module docstring)."""

    def __init__(self, fetcher: BlockFetcher, *, tail: int, head: int) -> None:
        self._fetcher = fetcher
        self._tail = tail
        self._head = head
        #: File versions whose analysis has started (each is analysed once per mount).
        self._analysed: weakref.WeakSet[CachedFile] = weakref.WeakSet()

    def opened(self, cached: CachedFile, pid: int) -> bool:
        """Start the hints for an open of *cached* by *pid*; True to open it ``direct_io``.

        Never raises: a bug here must not fail the open.
        """
        try:
            return self._opened(cached, opener_name(pid) in LOOP_OPENERS)
        except Exception:
            log.exception("%s: internal error in the open hints; none given", cached.name)
            return False

    def _opened(self, cached: CachedFile, loop: bool) -> bool:
        if cached.retired or not cached.size or cached.complete or not cached.cacheable:
            return False
        fetcher = self._fetcher
        if loop and self._head:
            # The end first: libblkid's first reads are there. They cover the head too.
            for start, end in reversed(probe_ranges(cached.size)):
                fetcher.fetch_exact(cached, start, end)
        elif not loop:
            if self._head:
                fetcher.prefetch(cached, 0, self._head, split=False)
            tail = tail_hint(self._tail, cached.size)
            if tail:
                fetcher.prefetch(cached, cached.size - tail, cached.size, split=False)
        if cached not in self._analysed and self._head:
            # Without the head hint (``--prefetch-head 0``) nothing is fetched on open: the
            # format check would read the head, and the zip check the tail.
            self._analysed.add(cached)
            if loop:
                fetcher.set_layout(cached, Layout("pending", pending=True))
            fetcher.spawn(self._analyse, cached, loop or bool(self._tail))
        return loop

    async def _analyse(self, cached: CachedFile, tail: bool) -> None:
        """Parse *cached*'s format and give the fetcher its layout; any failure: no hint.

        With *tail*, a file of no format known by its head is looked for a zip's end record
        in its last 64 KiB (which the tail hint or the loop probes are fetching already).
        """
        layout: Layout | None = None
        budget = budget_for(cached.size)
        try:
            with trio.move_on_after(ANALYSIS_DEADLINE):
                reader = ImageReader(
                    functools.partial(self._read, cached),
                    cached.size,
                    budget,
                    prefetch=functools.partial(self._prefetch, cached),
                )
                layout = await analyse(reader, tail=tail)
        except NoHint as err:
            log.info("%s: no format hint: %s", cached.name, err)
        except (ReadError, OSError) as err:
            log.info("%s: no format hint: reading its metadata failed: %s", cached.name, err)
        except Exception:
            log.exception("%s: internal error in a format parser; no hint", cached.name)
        if cached.retired:
            return
        if layout is None:
            self._fetcher.set_layout(cached, None)
            return
        layout.metadata = _within(merge(layout.metadata), max(budget.max_bytes, budget.used_bytes))
        self._fetcher.set_layout(cached, layout)
        block = cached.block_size
        for start, end in layout.metadata:
            if end - start >= WHOLE_BLOCKS_FROM * block:
                # A large range (a region of directories, a central directory) is read
                # around its ends too (the kernel's readahead): whole blocks, one request.
                self._fetcher.prefetch(cached, start, end)
            else:
                # Not readahead: the reader (the kernel mounting it) waits for these.
                self._fetcher.fetch_exact(cached, start, end, background=False)
        log.info("%s: format hint: %s", cached.name, layout.describe())

    async def _read(self, cached: CachedFile, offset: int, size: int) -> bytes:
        """Bytes of *cached* through the cache: exactly the pages needed, fetched once."""
        return await self._fetcher.read_exact(cached, offset, size)

    def _prefetch(self, cached: CachedFile, ranges: Sequence[Range]) -> None:
        for start, end in ranges:
            self._fetcher.fetch_exact(cached, start, end)


def _within(ranges: list[Range], limit: int) -> list[Range]:
    """The first ranges of *ranges* (in order) that fit in *limit* bytes together."""
    kept, total = [], 0
    for start, end in ranges:
        if total + end - start > limit:
            break
        kept.append((start, end))
        total += end - start
    return kept
