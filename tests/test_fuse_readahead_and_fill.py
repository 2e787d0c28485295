"""Readahead, open-time hints and idle background fill, judged by what the origin serves.

These tests check behaviour (which requests, how many bytes, nothing twice), not speed:
speed is measured by bench/.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import write_random
from .mounting import MountFactory
from .origin import Origin

MiB = 1024 * 1024
KiB = 1024


def no_overlaps(ranges: list[tuple[int, int]]) -> bool:
    ordered = sorted(ranges)
    return all(b[0] >= a[1] for a, b in itertools.pairwise(ordered))


def test_sequential_reader_gets_growing_parallel_requests_and_nothing_twice(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 96 * MiB + 123
    write_random(origin_root / "seq.bin", size)
    mount = remotefs.mount([origin.url("seq.bin")])
    origin.wait_idle()
    origin.reset_counters()
    subprocess.run(
        ["dd", f"if={mount.path / 'seq.bin'}", "of=/dev/null", "bs=128k"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    origin.wait_idle()
    ranges = origin.served_ranges("/seq.bin")
    assert no_overlaps(ranges)
    assert origin.bytes_served("/seq.bin") == size
    largest = max(end - start for start, end in ranges)
    assert largest >= 4 * MiB, "readahead never grew past small requests"
    # 96 MiB in 128 KiB reads would be 768 requests without readahead.
    assert len(ranges) < 100


def test_random_reader_gets_only_what_it_asks_rounded_to_min_request(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    # Large enough that misses spread over it do not look like a reader working in one part
    # of it (see readahead.ReadStream.note_miss): for 5 of them within 1/16 of the file, about
    # one chance in 10,000 per read.
    size = 512 * MiB
    data = write_random(origin_root / "rand.bin", size)
    mount = remotefs.mount([origin.url("rand.bin")], "--prefetch-tail", "0", "--prefetch-head", "0")
    origin.wait_idle()
    origin.reset_counters()
    rng = random.Random(5)
    reads = 60
    fd = os.open(mount.path / "rand.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = bytearray(4096)
        view = memoryview(buffer)
        for _ in range(reads):
            offset = rng.randrange(size // 4096) * 4096
            assert os.preadv(fd, [view], offset) == 4096
            assert bytes(buffer) == data[offset : offset + 4096]
    finally:
        os.close(fd)
    origin.wait_idle()
    served = origin.bytes_served("/rand.bin")
    assert served <= reads * 256 * KiB
    assert no_overlaps(origin.served_ranges("/rand.bin"))


def test_a_reader_working_in_one_part_of_a_file_gets_that_part_at_once(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    """Scattered misses in one small part (an unknown image's metadata) fetch the part.

    Later reads there are hits: no request, no round trip. The part is the misses' span
    widened by one average gap at each end, cut into parallel requests, each byte once.
    """
    size = 256 * MiB
    data = write_random(origin_root / "image.bin", size)
    mount = remotefs.mount(
        [origin.url("image.bin")], "--prefetch-tail", "0", "--prefetch-head", "0"
    )
    origin.wait_idle()
    origin.reset_counters()
    # Five reads within 1 MiB, each a jump from the last (a filesystem's metadata blocks).
    seeks = [40 * MiB + step * 256 * KiB for step in (0, 3, 1, 4, 2)]
    fd = os.open(mount.path / "image.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = bytearray(4096)
        view = memoryview(buffer)

        def read_at(offset: int) -> None:
            assert os.preadv(fd, [view], offset) == 4096
            assert bytes(buffer) == data[offset : offset + 4096]

        for offset in seeks[:-1]:
            read_at(offset)
        origin.wait_idle()
        assert origin.bytes_served("/image.bin") <= 4 * 256 * KiB, "clustered too early"
        read_at(seeks[-1])
        deadline = time.monotonic() + 30
        span = MiB + 4 * KiB  # 40..41 MiB + one read, widened by a quarter of it each side
        part = (40 * MiB - span // 4, 41 * MiB + 4 * KiB + span // 4)
        while time.monotonic() < deadline and not _covers(origin, part):
            time.sleep(0.05)
        origin.wait_idle()
        ranges = origin.served_ranges("/image.bin")
        assert no_overlaps(ranges)
        covered = sum(end - start for start, end in ranges)
        assert part[0] >= min(start for start, _ in ranges) - 256 * KiB
        assert max(end for _, end in ranges) >= part[1]
        # The part plus at most one minimum request of rounding at each miss, and never
        # anything far from it: a part is small (see readahead.CLUSTER_SPAN_MAX).
        assert covered <= part[1] - part[0] + 5 * 256 * KiB
        assert max(end for _, end in ranges) <= part[1] + 256 * KiB
        assert len(ranges) > 5, "the part was not fetched in parallel pieces"
        origin.reset_counters()
        rng = random.Random(8)
        for _ in range(200):
            read_at(rng.randrange(part[0] // 4096, part[1] // 4096 - 1) * 4096)
        origin.wait_idle()
        assert origin.requests == [], "reads inside the fetched part went to the origin"
    finally:
        os.close(fd)


def _covers(origin: Origin, part: tuple[int, int]) -> bool:
    """True once the origin has served every byte of *part* of /image.bin."""
    origin.wait_idle()
    position = part[0]
    for start, end in sorted(origin.served_ranges("/image.bin")):
        if start <= position < end:
            position = end
    return position >= part[1]


@pytest.mark.parametrize(
    ("size", "tail"),
    [
        (20 * MiB + 7, MiB),  # the configured 1 MiB
        (192 * MiB + 7, 192 * MiB // 128),  # 1/128 of a big file (its index grows with it)
        (1024 * MiB, 2 * MiB),  # at most twice the configured size
    ],
)
def test_open_prefetches_tail_and_head_as_one_request_each(
    origin: Origin, origin_root: Path, remotefs: MountFactory, size: int, tail: int
) -> None:
    path = origin_root / "hint.bin"
    if size < 64 * MiB:
        write_random(path, size)
    else:
        with path.open("wb") as sparse:  # only the requested ranges matter here
            sparse.truncate(size)
    mount = remotefs.mount([origin.url("hint.bin")])
    origin.wait_idle()
    origin.reset_counters()
    with open(mount.path / "hint.bin", "rb"):
        deadline = time.monotonic() + 10
        while len(origin.served_ranges("/hint.bin")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    origin.wait_idle()
    ranges = sorted(origin.served_ranges("/hint.bin"))
    assert ranges[0] == (0, 64 * KiB)
    tail_start = (size - tail) // (64 * KiB) * (64 * KiB)  # rounded down to a block
    assert ranges[-1] == (tail_start, size)
    assert len(ranges) == 2


def _cached_completely(cache_dir: Path, size: int) -> bool:
    return any(d.stat().st_blocks * 512 >= size for d in cache_dir.glob("files/*/data"))


def test_idle_fill_completes_a_partly_read_file_and_later_reads_cost_nothing(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 40 * MiB + 5
    write_random(origin_root / "fill.bin", size)
    mount = remotefs.mount([origin.url("fill.bin")], "--fill-idle", "0.5", fill=True)
    origin.wait_idle()
    origin.reset_counters()
    with open(mount.path / "fill.bin", "rb") as handle:
        handle.read(3 * MiB)
    deadline = time.monotonic() + 60
    while not _cached_completely(mount.cache_dir, size) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cached_completely(mount.cache_dir, size), "background fill did not finish"
    deadline = time.monotonic() + 10
    while "completed in the background" not in mount.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "fill.bin: completed in the background" in mount.log_text()
    origin.wait_idle()
    assert no_overlaps(origin.served_ranges("/fill.bin"))
    mount.unmount()

    mount = remotefs.mount([origin.url("fill.bin")])
    origin.wait_idle()
    origin.reset_counters()
    digest = hashlib.sha256((mount.path / "fill.bin").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((origin_root / "fill.bin").read_bytes()).hexdigest()
    origin.wait_idle()
    assert origin.bytes_served("/fill.bin") == 0


def test_fill_yields_to_foreground_reads_and_wastes_at_most_what_was_in_flight(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 24 * MiB
    data = write_random(origin_root / "slow.bin", size)
    # A slow fill (1 MiB/s): foreground reads arrive while fill requests are in flight.
    mount = remotefs.mount(
        [origin.url("slow.bin")],
        "--fill-idle", "0.3", "--fill-rate", "1M", "--prefetch-tail", "0",
        fill=True,
    )  # fmt: skip
    origin.wait_idle()
    origin.reset_counters()
    with open(mount.path / "slow.bin", "rb", buffering=0) as handle:
        handle.read(1)
        rng = random.Random(9)
        for _ in range(6):
            time.sleep(0.6)  # idle long enough for the fill to start
            offset = rng.randrange(size - 10_000)
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            handle.seek(offset)
            assert handle.read(10_000) == data[offset : offset + 10_000]
    origin.wait_idle()
    # A paused fill request drops the partial block it was receiving (and whatever the
    # origin had already pushed into the socket); whole blocks are never fetched twice.
    assert origin.bytes_served("/slow.bin") <= size + 6 * 2 * MiB


def test_no_fill_means_no_background_traffic(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 32 * MiB
    write_random(origin_root / "quiet.bin", size)
    mount = remotefs.mount([origin.url("quiet.bin")], "--fill-idle", "0.2")  # --no-fill default
    with open(mount.path / "quiet.bin", "rb") as handle:
        handle.read(100)
    # Far past --fill-idle: a fill would have fetched the whole file by now (loopback), while
    # the read and its open-time hints and first readahead window cost ~2 MiB at most.
    time.sleep(2)
    origin.wait_idle()
    assert origin.bytes_served("/quiet.bin") < 4 * MiB
