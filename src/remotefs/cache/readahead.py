"""Sequential-read detection and the readahead window of one open file handle.

A stream that keeps reading where it left off gets a window that doubles on every hit up to a
cap (mountpoint-s3's prefetcher, which peers.md describes); a real seek resets it. The kernel
delivers its own readahead requests out of order and in parallel, so "where it left off" is
fuzzy: reads a little behind the furthest point, or a few MiB ahead of it, still count as
sequential (mountpoint-s3 issue #488 is what happens otherwise).

How far the window may grow depends on what the run looks like. A handle's first run (from
the start of the file, or one of several readers splitting a file) reads the file and
doubles freely. A run that began at a seek may be one file inside a disk image, so its
window never exceeds the run itself. A handle whose misses cluster in one part of its file
(see `ReadStream.note_miss`) gets that part fetched at once, and reads ahead at most
`CLUSTERED_WINDOW_MAX` and 1/`CLUSTERED_WINDOW_SHARE` of the file. Together these keep a
loop-mounted image's traffic near what it reads, while a plain stream still reaches full
speed within a few round trips.

This module only decides *what* to prefetch; `BlockFetcher.prefetch` does it, through the
same single-flight registry as every other download, so nothing is fetched twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from ..config.options import KiB, MiB

#: Reads that end at most this far behind the furthest point seen are reordered kernel
#: requests, not seeks (two 1 MiB readahead requests that overtook each other).
BACKWARD_TOLERANCE = 2 * MiB
#: Forward skips up to this size keep the stream sequential: the kernel's parallel readahead
#: requests (up to 1 MiB each) can overtake each other. Larger skips are seeks: a filesystem
#: image read through a loop device jumps around by a few MiB and must not look like a stream.
FORWARD_TOLERANCE = 2 * MiB


#: A run must be this long before readahead beyond the kernel's own starts (one kernel
#: readahead request): shorter runs are single small reads, not streams.
SEQUENTIAL_THRESHOLD = 1 * MiB


#: A handle whose last this-many misses all fall in one small part of its file is working in
#: that part (the metadata of a filesystem image remotefs has no parser for, a database's
#: hot pages): the part is fetched in the background. Five, because uniform random misses
#: over a large file almost never cluster like that (for 2 MiB of a 1 GiB file, about one
#: chance in 10^9 per miss).
#:
#: Parts are small: a filesystem keeps the metadata of one group of files close together
#: (XFS's inode chunks and directory blocks within a few hundred KiB of each allocation
#: group's start, ext4's inode tables and directories in its first block groups). A larger
#: part would fetch the files beside the metadata, which nobody may read; formats remotefs
#: knows get their metadata from their own tables instead (`remotefs.formats`), and never
#: cluster.
CLUSTER_MISSES = 5
#: Fewer misses in a smaller part are as telling: four within 512 KiB and 1/256 of the file.
TIGHT_CLUSTER_MISSES = 4
TIGHT_CLUSTER_SPAN_MAX = 512 * 1024
TIGHT_CLUSTER_SPAN_SHARE = 256
#: A handle that has clustered once works in parts of its file (a filesystem image moving
#: on to another group): fewer misses are enough to show its next part.
CLUSTER_MISSES_AGAIN = 3
#: The largest readahead window of a handle whose misses have clustered, and its largest
#: share of the file. It is reached by doubling, without the run-length cap of other runs
#: after a seek, so these bound what a run that ends (a file inside an image) over-fetches.
CLUSTERED_WINDOW_MAX = 1 * MiB
CLUSTERED_WINDOW_SHARE = 128
#: The largest part fetched for a cluster, and its largest share of the file.
CLUSTER_SPAN_MAX = 2 * MiB
CLUSTER_SPAN_SHARE = 64
#: ``(misses, largest span, N)`` that make a cluster, the span also at most 1/N of the file:
#: before a handle's first cluster, and after it.
_FIRST_CLUSTER_RULES = (
    (CLUSTER_MISSES, CLUSTER_SPAN_MAX, CLUSTER_SPAN_SHARE),
    (TIGHT_CLUSTER_MISSES, TIGHT_CLUSTER_SPAN_MAX, TIGHT_CLUSTER_SPAN_SHARE),
)
_NEXT_CLUSTER_RULES = ((CLUSTER_MISSES_AGAIN, CLUSTER_SPAN_MAX, CLUSTER_SPAN_SHARE),)
#: In an image whose files are mapped, the misses that count are the starts of files read
#: one after another (``find | xargs cat``, ``tar``, ``cp -r``): five within 8 MiB and 1/32
#: of the image, or four within 2 MiB and 1/128, make the reader one that reads the files
#: of that part (a directory's files lie together), and the files there, only their data,
#: are fetched at once. Eight files read at random from 150 MiB of data cluster like that
#: about once in 2,000 tries.
FILE_CLUSTER_SPAN_MAX = 8 * MiB
#: The misses that make a cluster of files must be at least this share of the files that
#: start in their span: ``find | xargs cat`` reads every file of a directory (in name order,
#: which is not the order on disk), ``cat`` of a few files picked from a big directory does
#: not.
FILE_CLUSTER_DENSITY = 0.25
#: The widest part fetched for a reader of a mapped image's files that keeps going past
#: its parts (each next part twice the last).
FILE_REGION_MAX = 64 * MiB
_FIRST_FILE_CLUSTER_RULES = (
    (CLUSTER_MISSES, FILE_CLUSTER_SPAN_MAX, 32),
    (TIGHT_CLUSTER_MISSES, 2 * MiB, 128),
)
_NEXT_FILE_CLUSTER_RULES = ((CLUSTER_MISSES_AGAIN, FILE_CLUSTER_SPAN_MAX, 32),)
#: A run that starts a file inside a mapped image reads ahead this many of its reads at
#: first (its reads are the kernel's own readahead requests, which grow with the reader's).
PROVEN_WINDOW_FACTOR = 4
#: A run that has gone through this many files of a mapped image, one right after the
#: other on disk, reads ahead over the files that follow (`tar`, ``cp -r`` of a tree written
#: in order). Two files in a row happen by chance (two small files picked from a directory
#: lie side by side); four rarely do.
ACROSS_FILES = 4
#: ... "in a row": a file counts as the next one when its first read begins at most this far
#: past what the run has read (files written in order lie a block apart at most; squashfs
#: packs them back to back). Files picked further apart, even in disk order (`sha256sum` of
#: files sorted by name, which squashfs stores in that order), start the count again.
ACROSS_GAP = 64 * KiB
#: An index at a file's end grows with the file (a zip's central directory has one entry per
#: member): the open-time tail hint grows to this share of the file, up to twice its
#: configured size, so that a big archive's index still arrives in one round trip.
TAIL_HINT_SHARE = 128


def tail_hint(configured: int, file_size: int) -> int:
    """Bytes at the end of a *file_size* file to fetch on open (`--prefetch-tail` *configured*).

    The configured size, or 1/`TAIL_HINT_SHARE` of the file if that is larger, but never
    more than twice the configured size: a 200 MB zip with 20,000 members keeps a 1.2 MiB
    central directory, and `unzip -l` would otherwise wait a second round trip for it.
    ``0`` stays off.
    """
    return min(max(configured, file_size // TAIL_HINT_SHARE), 2 * configured, file_size)


@dataclass
class _Run:
    """Where one sequential run of a handle stands; parked while the handle reads elsewhere."""

    #: One past the furthest byte read so far; -1 before the first read.
    furthest: int = -1
    #: Bytes the current sequential run spans (reordered and skipped bytes included).
    run: int = 0
    #: Bytes actually read in the current run. A stream reads at least half of what it
    #: spans; small reads a few hundred KiB apart span a run without being one.
    read_bytes: int = 0
    #: Current readahead window in bytes; 0 for a reader not (yet) seen as sequential.
    window: int = 0
    #: Everything before this offset has been requested already by readahead.
    prefetched_until: int = 0
    #: True once the handle has seeked: its current run is not its first.
    seeked: bool = False
    #: True when the run began where a file inside an image begins (the caller's map).
    proven: bool = False
    #: Starts of files inside an image this run has read, one after another.
    files: int = 0

    def takes(self, offset: int, end: int) -> bool:
        """True when a read of ``[offset, end)`` continues this run (within the tolerances)."""
        return (
            self.furthest - BACKWARD_TOLERANCE <= end
            and offset <= self.furthest + FORWARD_TOLERANCE
        )


_RUN_FIELDS = tuple(f.name for f in fields(_Run))


@dataclass
class ReadStream(_Run):
    """Readahead state of one open handle; see `advance`.

    Besides its current run, a handle remembers one earlier run that had a window (it is
    *parked*). A loop-mounted image reading a big file's blocks in order also reads an inode
    table or a directory block now and then, somewhere else; when its reads come back to
    where the parked run stopped, that run goes on with the window it had, instead of
    starting again from nothing (the kernel's readahead does the same for interleaved
    streams of one file).
    """

    #: ``(offset, end)`` of the latest reads that were not cached, oldest first.
    misses: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=CLUSTER_MISSES))
    #: Set once the misses have clustered: this handle works in parts of its file.
    clustered: bool = False
    #: The largest readahead window once clustered (`CLUSTERED_WINDOW_MAX`, or less in a
    #: small file).
    clustered_window: int = 0
    #: ``(start, end)`` of the part fetched for this handle's latest cluster.
    region: tuple[int, int] | None = None
    #: True when the latest read started a new run (the first read, or a seek).
    jumped: bool = True
    #: One past the last byte of the latest read.
    last_end: int = -1
    #: An earlier run with a window, interrupted by a seek; resumed when reads return to it.
    parked: _Run | None = None
    #: Whether this handle remembers its failed reads: the kernel's handles do, because the
    #: kernel retries a failed read on the same handle at once (see `BlockFetcher.read`).
    holds_failures: bool = False
    #: Reads of this handle that failed: (first block, end block, until when a read of them
    #: fails at once, why). A new open tries again.
    failed_reads: list[tuple[int, int, float, str]] = field(default_factory=list)

    def note_miss(
        self,
        offset: int,
        end: int,
        file_size: int,
        *,
        files: Callable[[int, int], int] | None = None,
    ) -> tuple[int, int] | None:
        """Account for a read of ``[offset, end)`` that was not cached; maybe return a cluster.

        With *files* (it counts the files of a mapped image that start in a span), the read
        starts a file inside that image, and the rules for files apply: the misses must also
        be at least `FILE_CLUSTER_DENSITY` of the files in their span (a reader of all of
        them, not of a few picked here and there); the caller fetches only files' data.

        Called after `advance` for the same read; only reads that started a new run (seeks)
        count, since a sequential reader's misses are what its readahead is for.

        A loop-mounted filesystem image misses once per directory and file, each at a new
        place: one round trip each, in series, because the reader waits for every one. When
        the last `CLUSTER_MISSES` misses lie within a span of at most `CLUSTER_SPAN_MAX` and
        1/`CLUSTER_SPAN_SHARE` of the file, or the last `TIGHT_CLUSTER_MISSES` within the
        tighter bounds, or (once the handle has clustered) the last `CLUSTER_MISSES_AGAIN`
        within the first bounds, the reader is working in that span. The span is returned,
        widened by one average gap between its misses at each end, to be fetched at once,
        in parallel: later misses there become hits. The bytes are ones such a reader goes
        on to read (the files next to their directories), so traffic stays close to what
        it reads. Random readers spread over the file never cluster and keep fetching only
        what they ask for.
        """
        if not self.jumped and files is None:
            return None  # a sequential run's misses are readahead's business
        self.misses.append((offset, end))
        beside = self._beside_region(offset, end, file_size, files is not None)
        if beside is not None:
            return beside
        if files is not None:
            rules = _NEXT_FILE_CLUSTER_RULES if self.clustered else _FIRST_FILE_CLUSTER_RULES
        else:
            rules = _NEXT_CLUSTER_RULES if self.clustered else _FIRST_CLUSTER_RULES
        for needed, span_max, share in rules:
            if len(self.misses) < needed:
                continue
            recent = list(self.misses)[-needed:]
            start = min(first for first, _ in recent)
            stop = max(last for _, last in recent)
            span = stop - start
            if span > min(span_max, file_size // share):
                continue
            if files is not None and needed < FILE_CLUSTER_DENSITY * files(start, stop):
                continue  # a few files picked among many
            # The misses are samples of the part being worked in; its best estimate reaches
            # one average gap beyond the outermost samples (the estimate of a uniform
            # range's ends).
            margin = span // (needed - 1)
            self.clustered = True
            self.clustered_window = min(CLUSTERED_WINDOW_MAX, file_size // CLUSTERED_WINDOW_SHARE)
            self.region = max(0, start - margin), min(file_size, stop + margin)
            return self.region
        return None

    def _beside_region(
        self, offset: int, end: int, file_size: int, files: bool
    ) -> tuple[int, int] | None:
        """The next part over, when a miss lands within one part's width of the last part.

        A reader that worked in a part and now misses just past it is working in a part
        that reaches further (the estimate from a few misses fell short): the fetch continues
        in that direction by the same width, instead of waiting for misses to cluster again.
        A reader of the files of a mapped image that keeps going (``find | xargs cat``) has
        shown sequential use of the image: its next part is twice as wide as its last, up
        to `FILE_REGION_MAX`, never wider than what it has gone through.
        """
        if self.region is None:
            return None
        first, last = self.region
        if files:
            width = min(2 * (last - first), FILE_REGION_MAX)
        else:
            width = min(last - first, CLUSTER_SPAN_MAX)
        if last <= offset < last + width:
            self.region = first, min(file_size, last + width)
            return last, self.region[1]
        if first - width < end <= first:
            self.region = max(0, first - width), last
            return self.region[0], first
        return None

    def advance(
        self,
        offset: int,
        end: int,
        *,
        first_window: int,
        initial: int,
        maximum: int,
        proven: bool = False,
        limit: int | None = None,
    ) -> tuple[int, int] | None:
        """Account for a read of ``[offset, end)``; return a byte range to prefetch, or None.

        A first read at offset 0 prefetches *first_window* beyond itself: the kernel's own
        readahead follows such a read at once and should not cost a second round trip. After
        that, a run that has read `SEQUENTIAL_THRESHOLD` bytes, at least half of what it
        spans, starts a window of *initial* bytes (or of one read, if reads are larger: a
        smaller window would not reach past the next read) that doubles on every read up to
        *maximum*. A seek resets it all, unless the read resumes the parked run.

        A *proven* read starts a file that an image's metadata maps: its run reads ahead at
        once, from its first read on, since what lies ahead is the rest of the file being
        read, and its first window is `PROVEN_WINDOW_FACTOR` reads (the kernel's own
        readahead asks for more at once of a reader that reads more at once). Nothing is
        read ahead past *limit* (the end of that file). Both apply only once the handle
        has seeked: a handle that reads the image from its start reads the image. A run
        that has gone on from one file into the next (`files`, `reads_across`) has shown
        sequential use of the image: it reads ahead across files, but never further ahead
        than it has read.
        """
        self.jumped = self.furthest < 0
        previous_end, self.last_end = self.last_end, end
        if self.furthest < 0:
            self.furthest = end
            self.run = self.read_bytes = end - offset
            self.proven, self.files = proven, int(proven)
            if offset == 0 and first_window:
                self.prefetched_until = end + first_window
                return end, end + first_window
            if not proven:
                return None
        elif self.takes(offset, end):
            # Before any readahead, a read that does not continue the last one is a jump
            # too: a filesystem's metadata blocks, close together but in no order.
            self.jumped = not self.window and offset != previous_end
            self._extend(offset, end, proven)
        elif self.parked is not None and self.parked.takes(offset, end):
            self._swap_parked()
            self.jumped = False
            self._extend(offset, end, proven)
        else:
            if self.window:
                self.parked = self._current_run()
            self.furthest = end
            self.run = self.read_bytes = end - offset
            self.window = self.prefetched_until = 0
            self.jumped = self.seeked = True
            self.proven, self.files = proven, int(proven)
            if not proven:
                return None
        if not self.seeked:
            # A handle's first run (sha256sum of the whole image, cp) reads the file, not the
            # files inside it: no file's end bounds it.
            self.proven, limit = False, None
        if self.reads_across:
            limit = None  # the caller reads ahead over the files that follow
        proven = self.proven
        if not proven and (
            self.read_bytes < SEQUENTIAL_THRESHOLD or 2 * self.read_bytes < self.run
        ):
            return None  # not yet a stream, or a sparse one (small reads far apart)
        if proven:
            first = PROVEN_WINDOW_FACTOR * (end - offset)
            self.window = min(max(self.window * 2, initial, first), maximum)
        else:
            self.window = min(max(self.window * 2, initial, end - offset), maximum)
        if proven:
            if self.reads_across:
                self.window = min(self.window, max(initial, self.run))
            # otherwise the end of the file being read bounds it (*limit*)
        elif self.clustered:
            # A handle working in parts of its file (a filesystem image) reads runs that end
            # without warning (files inside the image): `CLUSTERED_WINDOW_MAX` bounds what an
            # ending run wastes. Its runs begin in parts already fetched, so they need not
            # prove their length first.
            self.window = min(self.window, max(initial, self.clustered_window))
        elif self.seeked:
            # A run that began at a seek may be one piece of something (a file in an image):
            # never further ahead than it has proven. A handle's first run (cp, sha256sum, a
            # player from the beginning, one of several readers splitting a file) reads the
            # file: full doubling.
            self.window = min(self.window, max(initial, self.run))
        target = self.furthest + self.window
        if limit is not None:
            target = min(target, limit)
        start = max(self.furthest, self.prefetched_until)
        # Top the window up only when half of it has been consumed: one scheduling pass per
        # half window instead of one per read.
        if target - start < self.window // 2 and target != limit:
            return None
        if target <= start:
            return None
        self.prefetched_until = target
        return start, target

    def from_start(self, offset: int, end: int) -> bool:
        """True when a read of ``[offset, end)`` belongs to a first run begun at offset 0.

        Such a handle (sha256sum, cp, a player) reads the file itself, whatever it holds.
        """
        if self.furthest < 0:
            return offset == 0
        return not self.seeked and self.run == self.furthest and self.takes(offset, end)

    @property
    def reads_across(self) -> bool:
        """True when this run went on through `ACROSS_FILES` files of an image in a row."""
        return self.proven and self.seeked and self.files >= ACROSS_FILES

    def _extend(self, offset: int, end: int, proven: bool) -> None:
        """Count a read that continues the current run (*proven*: it starts a mapped file)."""
        if proven:
            self.files = self.files + 1 if offset <= self.furthest + ACROSS_GAP else 1
        self.proven = self.proven or proven
        self.run += max(0, end - self.furthest)
        self.read_bytes += end - offset
        self.furthest = max(self.furthest, end)

    def _current_run(self) -> _Run:
        return _Run(**{name: getattr(self, name) for name in _RUN_FIELDS})

    def _swap_parked(self) -> None:
        """Make the parked run current; park the current one if it had a window."""
        parked = self.parked
        assert parked is not None
        current = self._current_run()
        for name in _RUN_FIELDS:
            setattr(self, name, getattr(parked, name))
        self.parked = current if current.window else None
