"""The readahead decisions of one handle (`ReadStream`), without a mount or a network.

What these decisions cost and buy on a real link is measured by bench/; here they are pinned
down exactly: when a window starts and how it grows, and when scattered misses count as a
reader working in one part of its file.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from remotefs.cache.readahead import (
    ACROSS_FILES,
    CLUSTER_MISSES,
    CLUSTER_MISSES_AGAIN,
    CLUSTER_SPAN_MAX,
    CLUSTERED_WINDOW_MAX,
    CLUSTERED_WINDOW_SHARE,
    SEQUENTIAL_THRESHOLD,
    ReadStream,
    tail_hint,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
INITIAL = 256 * KiB
MAXIMUM = 64 * MiB


def advance(stream: ReadStream, offset: int, size: int) -> tuple[int, int] | None:
    return stream.advance(offset, offset + size, first_window=MiB, initial=INITIAL, maximum=MAXIMUM)


def read_missing(
    stream: ReadStream, offset: int, size: int, file_size: int
) -> tuple[int, int] | None:
    """A read that was not cached: `advance`, then `note_miss`, as the fetcher calls them."""
    advance(stream, offset, size)
    return stream.note_miss(offset, offset + size, file_size)


def test_a_stream_from_offset_zero_covers_the_kernels_next_readahead_at_once() -> None:
    stream = ReadStream()
    assert advance(stream, 0, MiB) == (MiB, 2 * MiB)


def test_sequential_window_starts_after_the_threshold_and_doubles_on_every_read() -> None:
    stream = ReadStream()
    read = 128 * KiB  # cat's reads
    windows = []
    for index in range(128):
        advance(stream, index * read, read)
        windows.append(stream.window)
    threshold_reads = SEQUENTIAL_THRESHOLD // read
    assert windows[: threshold_reads - 1] == [0] * (threshold_reads - 1)
    grown = [w for w in windows if w]
    assert grown[0] == INITIAL
    assert all(b == min(2 * a, MAXIMUM) for a, b in itertools.pairwise(grown))
    assert grown[-1] == MAXIMUM


def test_a_window_starts_at_one_read_when_reads_are_larger_than_the_minimum_request() -> None:
    """The kernel's readahead reads 1 MiB at a time: a 256 KiB window would not reach the next."""
    stream = ReadStream()
    advance(stream, 0, 4096)
    offset = 100 * MiB  # a seek, so the first-read window does not apply
    windows = []
    for index in range(6):
        advance(stream, offset + index * MiB, MiB)
        windows.append(stream.window)
    grown = [w for w in windows if w]
    assert grown[:3] == [MiB, 2 * MiB, 4 * MiB]


def test_small_reordering_and_forward_skips_keep_the_stream_but_a_seek_resets_it() -> None:
    stream = ReadStream()
    read = 128 * KiB
    for index in range(10):
        advance(stream, index * read, read)
    window = stream.window
    advance(stream, 10 * read + 2 * read, read)  # the kernel's parallel readahead overtook two
    advance(stream, 10 * read, read)
    advance(stream, 11 * read, read)
    assert stream.window > window
    assert advance(stream, 500 * MiB, MiB) is None
    assert stream.window == 0 and stream.jumped


def test_a_stream_interrupted_by_reads_elsewhere_resumes_with_its_window() -> None:
    """An image's file read in order, with an inode table read in between (twice)."""
    stream = ReadStream()
    advance(stream, 0, 4096)
    start = 100 * MiB
    for index in range(8):
        advance(stream, start + index * MiB, MiB)
    window, position, requested = stream.window, start + 8 * MiB, stream.prefetched_until
    assert window >= 8 * MiB
    assert advance(stream, 40 * MiB, 4096) is None  # elsewhere: a seek, the window is parked
    assert stream.window == 0 and stream.jumped
    advance(stream, 60 * MiB, 4096)  # and elsewhere again
    advance(stream, position, MiB)  # back where the stream stopped
    assert not stream.jumped
    assert stream.run == 9 * MiB  # the run goes on (a run after a seek: capped at its length)
    assert stream.window == min(2 * window, stream.run)
    assert stream.prefetched_until >= requested  # what it had requested is not asked again


def test_a_parked_stream_does_not_resume_for_reads_far_from_it() -> None:
    stream = ReadStream()
    advance(stream, 0, 4096)
    for index in range(8):
        advance(stream, 100 * MiB + index * MiB, MiB)
    advance(stream, 40 * MiB, 4096)
    assert advance(stream, 300 * MiB, MiB) is None
    assert stream.window == 0 and stream.jumped


#: Five misses within 1 MiB of each other, each a seek from the one before.
PART = [8 * MiB + step * 256 * KiB for step in (0, 4, 2, 3, 1)]


def test_misses_clustered_in_a_small_part_of_a_big_file_return_that_part_widened() -> None:
    stream = ReadStream()
    results = [read_missing(stream, offset, 4 * KiB, 256 * MiB) for offset in PART]
    assert results[:-1] == [None] * (CLUSTER_MISSES - 1)
    span = 9 * MiB + 4 * KiB - 8 * MiB
    margin = span // (CLUSTER_MISSES - 1)
    assert results[-1] == (8 * MiB - margin, 9 * MiB + 4 * KiB + margin)
    assert stream.clustered


def test_the_widened_part_stays_inside_the_file() -> None:
    stream = ReadStream()
    for offset in [0, 1200 * KiB, 300 * KiB, 900 * KiB]:  # each a seek from the one before
        assert read_missing(stream, offset, 4 * KiB, 256 * MiB) is None
    start, end = read_missing(stream, 600 * KiB, 4 * KiB, 256 * MiB) or (-1, -1)
    assert start == 0 and end > 1200 * KiB


def test_misses_spread_over_the_file_never_cluster() -> None:
    """Uniform random reads (fio's randread) keep fetching only what they ask for."""
    stream = ReadStream()
    rng = random.Random(11)
    size = GiB
    clusters = [
        read_missing(stream, rng.randrange(size // 4096) * 4096, 4096, size) for _ in range(5000)
    ]
    assert clusters == [None] * len(clusters)
    assert not stream.clustered


def test_a_cluster_wider_than_the_cap_or_share_of_the_file_is_not_one() -> None:
    wide = ReadStream()
    for index in range(CLUSTER_MISSES):
        offset = index * (CLUSTER_SPAN_MAX // (CLUSTER_MISSES - 1) + MiB)
        assert read_missing(wide, offset, 4096, 100 * GiB) is None
    small_file = ReadStream()  # 1.6 MiB is more than 1/64 of a 64 MiB file
    for index in range(CLUSTER_MISSES):
        assert read_missing(small_file, index * 400 * KiB, 4096, 64 * MiB) is None


def test_a_sequential_readers_misses_do_not_count_as_a_cluster() -> None:
    stream = ReadStream()
    results = [read_missing(stream, index * 128 * KiB, 128 * KiB, GiB) for index in range(64)]
    assert results == [None] * 64
    assert not stream.clustered


@pytest.mark.parametrize(
    ("file_size", "cap"),
    [(GiB, CLUSTERED_WINDOW_MAX), (64 * MiB, 64 * MiB // CLUSTERED_WINDOW_SHARE)],
)
def test_a_clustered_handle_reads_ahead_a_bounded_window(file_size: int, cap: int) -> None:
    """Runs inside a filesystem image end without warning: over-fetch stays bounded."""
    stream = ReadStream()
    for offset in [256 * KiB, 768 * KiB, 512 * KiB, 640 * KiB, 448 * KiB]:
        read_missing(stream, offset, 4 * KiB, file_size)
    assert stream.clustered
    start = 30 * MiB
    windows = []
    for index in range(400):
        advance(stream, start + index * 128 * KiB, 128 * KiB)
        windows.append(stream.window)
    assert max(windows) == cap
    # It gets there as fast as a first run does: doubling, without waiting for the run.
    assert windows.index(cap) < 16


def test_a_run_that_began_at_a_seek_reads_ahead_at_most_its_own_length() -> None:
    """A file inside a disk image ends without warning; a stream from offset 0 does not."""
    stream = ReadStream()
    advance(stream, 0, 4096)
    advance(stream, 100 * MiB, 128 * KiB)  # a seek: the run starts mid-file
    for index in range(1, 200):
        advance(stream, 100 * MiB + index * 128 * KiB, 128 * KiB)
        assert stream.window <= max(INITIAL, stream.run)
    assert stream.window > 8 * MiB


def test_close_but_out_of_order_misses_before_any_readahead_count_as_jumps() -> None:
    """A filesystem's metadata blocks: near each other, in no order, one round trip each."""
    stream = ReadStream()
    offsets = [134 * MiB + step * 300 * KiB for step in (5, 0, 6, 1, 2)]
    results = [read_missing(stream, offset, 4 * KiB, GiB) for offset in offsets]
    assert results[-1] is not None and stream.clustered


def test_a_handles_first_run_doubles_freely_wherever_it_starts() -> None:
    """One of several readers splitting a file starts mid-file and is still a stream."""
    stream = ReadStream()
    start = 300 * MiB
    for index in range(12):
        advance(stream, start + index * MiB, MiB)
    assert stream.window == MAXIMUM > stream.run


def test_after_a_first_cluster_fewer_misses_show_the_next_part() -> None:
    """An image's reader moves on to another block group: it need not pay five misses again."""
    stream = ReadStream()
    for offset in PART:
        read_missing(stream, offset, 4 * KiB, GiB)
    assert stream.clustered
    offsets = [400 * MiB, 399 * MiB, 400 * MiB + 700 * KiB]
    results = [read_missing(stream, offset, 4 * KiB, GiB) for offset in offsets]
    assert results[: CLUSTER_MISSES_AGAIN - 1] == [None] * (CLUSTER_MISSES_AGAIN - 1)
    start, end = results[-1] or (-1, -1)
    span = 400 * MiB + 704 * KiB - 399 * MiB
    assert start < 399 * MiB and end > 400 * MiB + 704 * KiB
    assert end - start <= 2 * span


def test_the_tail_hint_grows_with_the_file_up_to_twice_its_setting() -> None:
    assert tail_hint(MiB, 20 * MiB) == MiB
    assert tail_hint(MiB, 200 * MiB) == 200 * MiB // 128
    assert tail_hint(MiB, 100 * GiB) == 2 * MiB
    assert tail_hint(MiB, 100 * KiB) == 100 * KiB  # never more than the file
    assert tail_hint(0, 100 * GiB) == 0  # off stays off


def test_small_reads_far_apart_are_not_a_stream() -> None:
    """A mount reading bitmaps 512 KiB apart: each read is a jump, and counts as a miss."""
    stream = ReadStream()
    advance(stream, 0, 4096)
    for index in range(1, 40):
        advance(stream, index * 512 * KiB, 4096)
        assert stream.window == 0 and stream.jumped


def test_four_misses_in_a_few_hundred_kib_are_a_cluster_already() -> None:
    """A filesystem's inode chunk and directory blocks, read one round trip each."""
    stream = ReadStream()
    offsets = [64 * KiB, 160 * KiB, 320 * KiB, 448 * KiB]
    results = [read_missing(stream, offset, 4 * KiB, GiB) for offset in offsets]
    assert results[:3] == [None] * 3
    span = 452 * KiB - 64 * KiB
    assert results[3] == (0, 452 * KiB + span // 3)  # widened, down to offset 0
    spread = ReadStream()
    for offset in [0, 200 * KiB, 400 * KiB, 600 * KiB]:  # four, but over more than 512 KiB
        assert read_missing(spread, offset, 4 * KiB, GiB) is None


def test_a_miss_just_past_a_fetched_part_fetches_the_next_part_over() -> None:
    """The few misses that showed a part underestimate it: the reader goes on past its end."""
    offsets = [200 * MiB + offset for offset in PART]
    upward, downward = ReadStream(), ReadStream()
    for offset in offsets:
        part = read_missing(upward, offset, 4 * KiB, GiB)
        read_missing(downward, offset, 4 * KiB, GiB)
    assert part is not None
    first, last = part
    width = last - first
    assert read_missing(upward, last + width // 2, 4 * KiB, GiB) == (last, last + width)
    assert read_missing(downward, first - width // 2, 4 * KiB, GiB) == (first - width, first)
    assert read_missing(upward, 900 * MiB, 4 * KiB, GiB) is None  # far away: no neighbour


# -- files of a mapped image -------------------------------------------------------------------


def starts(offsets: list[int], size: int = 100 * KiB) -> Callable[[int, int], int]:
    """A count of the files that start (or lie) in a span, for files at *offsets*."""

    def count(start: int, end: int) -> int:
        return sum(1 for offset in offsets if offset < end and offset + size > start)

    return count


def test_a_reader_of_every_file_of_a_directory_gets_their_data_at_once() -> None:
    """``find | xargs cat``: name order is not disk order, but every file is read."""
    files = [64 * MiB + index * 100 * KiB for index in range(20)]
    order = [files[index] for index in (7, 2, 13, 0, 18, 5)]
    stream = ReadStream()
    results = [
        stream.note_miss(offset, offset + 4 * KiB, GiB, files=starts(files)) for offset in order
    ]
    assert results[:3] == [None] * 3
    part = next(result for result in results if result is not None)
    assert part[0] <= files[2] and part[1] >= files[13] + 4 * KiB


def test_a_few_files_picked_among_many_nearby_are_not_a_cluster() -> None:
    """``cat`` of a few files of a big directory: they lie close, but most are not read."""
    files = [64 * MiB + index * 20 * KiB for index in range(200)]  # 4 MiB of small files
    order = [files[index] for index in (3, 40, 77, 120, 160, 199)]
    stream = ReadStream()
    assert all(
        stream.note_miss(offset, offset + 4 * KiB, GiB, files=starts(files, 20 * KiB)) is None
        for offset in order
    )


def test_a_part_of_files_is_followed_by_wider_parts_while_the_reader_goes_on() -> None:
    files = [64 * MiB + index * 100 * KiB for index in range(400)]
    stream = ReadStream()
    for offset in files[:5]:
        part = stream.note_miss(offset, offset + 4 * KiB, GiB, files=starts(files))
    assert part is not None
    width = part[1] - part[0]
    beyond = stream.note_miss(part[1] + KiB, part[1] + 5 * KiB, GiB, files=starts(files))
    assert beyond == (part[1], part[1] + 2 * width)


def test_a_run_through_files_in_a_row_reads_ahead_across_them() -> None:
    """Four files one right after the other: the window is no longer cut at each file's end."""
    stream = ReadStream()
    advance(stream, 900 * MiB, 4 * KiB)  # the handle has seeked before (a loop device has)
    size = 64 * KiB
    windows = []
    for index in range(6):
        start = 100 * MiB + index * size
        result = stream.advance(
            start,
            start + size,
            first_window=MiB,
            initial=INITIAL,
            maximum=MAXIMUM,
            proven=True,
            limit=start + size,
        )
        windows.append(result)
        assert stream.reads_across == (index + 1 >= ACROSS_FILES)
    # Cut at the file's end while the files are few; past it once four were read in a row.
    assert all(w is None or w[1] <= 100 * MiB + (i + 1) * size for i, w in enumerate(windows[:3]))
    last = windows[-1]
    assert last is not None and last[1] > 100 * MiB + 6 * size
    assert last[1] - (100 * MiB + 6 * size) <= stream.run  # never further ahead than read
