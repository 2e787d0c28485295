"""The cache size cap (``--cache-max-size``), through a real mount and a real origin.

What is measured at every sample, from outside the daemon:

* the bytes the live bitmaps claim (``user.remotefs.cached_bytes`` of every file) and the
  bytes the bitmaps saved on disk claim: at most the cap plus one block;
* the disk space of the data files (``st_blocks * 512``): at most the cap plus one block plus
  the filesystem's own slack, `FS_SLACK` per data file. On ext4 ``st_blocks`` also counts the
  extent tree: the inode holds 4 extents, and each 4 KiB tree block 340. A data file under the
  cap holds at most ``CAP / 4096`` filesystem blocks, so at most that many extents: 2048 for
  8 MiB, which need 7 leaf blocks and 1 index block. The test files' sizes are multiples of
  4 KiB, so no partial filesystem block at EOF survives a punched hole. (tmpfs counts data
  pages only: the bound holds there too.)
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from remotefs.cache.state_files import CorruptStateError, load_bitmap
from remotefs.control_client import Control

from .conftest import read_direct, write_random
from .mounting import Mount, MountFactory, run_remotefs
from .origin import Origin

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
CAP = 8 * MiB
FS_BLOCK = 4096
_EXTENTS = CAP // FS_BLOCK
FS_SLACK = (-(-_EXTENTS // 340) + 1) * FS_BLOCK  # extent-tree leaves + one index block


def status(mount: Mount) -> dict[str, Any]:
    with Control(str(mount.path)) as control:
        return control.request({"cmd": "status"})


def saved_bitmap_bytes(cache_dir: Path) -> int:
    total = 0
    for path in cache_dir.glob("files/*/bitmap"):
        try:
            total += len(load_bitmap(path)) * BLOCK
        except (FileNotFoundError, CorruptStateError):
            continue  # replaced while we read it: the next sample sees the new one
    return total


def data_bytes(cache_dir: Path) -> int:
    total = 0
    for path in cache_dir.glob("files/*/data"):
        try:
            total += path.stat().st_blocks * 512
        except FileNotFoundError:
            continue
    return total


class Sampler(threading.Thread):
    """Measures the cache from outside every few milliseconds; keeps the maxima."""

    def __init__(self, mount: Mount, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.mount = mount
        self.files = files
        self.stop = threading.Event()
        self.samples = 0
        self._lock = threading.Lock()
        self.max_live = self.max_saved = self.max_disk = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.005)

    def sample(self) -> None:
        """One measurement; the background thread and the test (between reads) both call it."""
        live = sum(int(os.getxattr(f, "user.remotefs.cached_bytes")) for f in self.files)
        saved = saved_bitmap_bytes(self.mount.cache_dir)
        disk = data_bytes(self.mount.cache_dir)
        with self._lock:
            self.max_live = max(self.max_live, live)
            self.max_saved = max(self.max_saved, saved)
            self.max_disk = max(self.max_disk, disk)
            self.samples += 1

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(10)
        self.sample()

    def check(self, cap: int, data_files: int) -> None:
        assert self.samples >= 8, self.samples
        assert self.max_live <= cap + BLOCK, (self.max_live, cap)
        assert self.max_saved <= cap + BLOCK, (self.max_saved, cap)
        assert self.max_disk <= cap + BLOCK + data_files * FS_SLACK, (self.max_disk, cap)


def test_sequential_read_of_three_times_the_cap_stays_under_it(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 3 * CAP
    data = write_random(origin_root / "big.bin", size)
    mount = remotefs.mount([origin.url("big.bin")], "--cache-max-size", "8M")
    target = mount.path / "big.bin"
    with Sampler(mount, [target]) as sampler, open(target, "rb") as handle:
        for offset in range(0, size, MiB):
            assert handle.read(MiB) == data[offset : offset + MiB]
            sampler.sample()
    sampler.check(CAP, 1)
    totals = status(mount)["totals"]
    assert totals["cache_max_size"] == CAP
    assert totals["cache_used"] <= CAP
    assert totals["evicted_bytes"] >= size - CAP
    text = run_remotefs("status", mount.path, "--once").stdout
    assert "of 8.0 MiB cap" in text, text


def test_random_reads_of_three_times_the_cap_stay_under_it(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 3 * CAP
    data = write_random(origin_root / "big.bin", size, seed=7)
    mount = remotefs.mount([origin.url("big.bin")], "--cache-max-size", "8M")
    target = mount.path / "big.bin"
    rng = random.Random(42)
    with Sampler(mount, [target]) as sampler:
        for _ in range(300):
            length = rng.choice([4 * KiB, 100 * KiB, 256 * KiB, MiB])
            offset = rng.randrange(0, size - length)
            assert read_direct(target, offset, length) == data[offset : offset + length]
            sampler.sample()
    sampler.check(CAP, 1)
    assert status(mount)["totals"]["evicted_bytes"] > 0


def test_closed_files_go_before_the_open_file_and_come_back_intact(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    closed = write_random(origin_root / "a.bin", 4 * MiB, seed=1)
    opened = write_random(origin_root / "b.bin", 12 * MiB, seed=2)
    mount = remotefs.mount(
        [origin.url("a.bin"), origin.url("b.bin")],
        "--cache-max-size",
        "8M",
        "--prefetch-tail",
        "0",
        "--prefetch-head",
        "0",
    )
    a, b = mount.path / "a.bin", mount.path / "b.bin"
    with Sampler(mount, [a, b]) as sampler, open(b, "rb") as handle:
        # b's first blocks are used *before* a's: pure LRU would evict them first.
        assert handle.read(MiB) == opened[:MiB]
        with open(a, "rb") as other:
            for offset in range(0, 4 * MiB, MiB):
                assert other.read(MiB) == closed[offset : offset + MiB]
                sampler.sample()
        assert status(mount)["totals"]["evicted_bytes"] == 0
        for offset in range(MiB, 4 * MiB, 256 * KiB):  # past the cap: a goes
            assert handle.read(256 * KiB) == opened[offset : offset + 256 * KiB]
            sampler.sample()
        assert origin.wait_idle(10)
        assert int(os.getxattr(a, "user.remotefs.cached_bytes")) < 4 * MiB
        origin.reset_counters()
        assert read_direct(b, 0, 4 * MiB) == opened[: 4 * MiB]
        assert origin.wait_idle(10)
        # (A new handle reading from 0 gets readahead past 4 MiB; nothing before it is fetched.)
        served = origin.served_ranges("/b.bin")
        assert all(start >= 4 * MiB for start, _ in served), f"b was evicted: {served}"
        # a's evicted blocks are fetched again, and correctly.
        assert read_direct(a, 0, 4 * MiB) == closed
        assert origin.wait_idle(10)
        assert origin.bytes_served("/a.bin") > 0
    sampler.check(CAP, 2)


def test_without_a_cap_nothing_is_evicted(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 3 * CAP
    data = write_random(origin_root / "big.bin", size, seed=3)
    mount = remotefs.mount([origin.url("big.bin")])
    target = mount.path / "big.bin"
    assert target.read_bytes() == data
    assert origin.wait_idle(10)
    totals = status(mount)["totals"]
    assert totals["cache_max_size"] == 0 and totals["evicted_bytes"] == 0
    assert totals["cache_used"] == size
    assert data_bytes(mount.cache_dir) >= size
    origin.reset_counters()
    assert read_direct(target, 0, size) == data
    assert origin.bytes_served() == 0


def test_a_restart_with_a_lower_cap_trims_the_cache(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    first = write_random(origin_root / "one.bin", 6 * MiB, seed=4)
    second = write_random(origin_root / "two.bin", 6 * MiB, seed=5)
    urls = [origin.url("one.bin"), origin.url("two.bin")]
    mount = remotefs.mount(urls)
    assert (mount.path / "one.bin").read_bytes() == first
    assert (mount.path / "two.bin").read_bytes() == second
    mount.unmount()
    assert saved_bitmap_bytes(mount.cache_dir) == 12 * MiB

    started = time.monotonic()
    mount = remotefs.mount(urls, "--cache-max-size", "5M")
    cap = 5 * MiB
    # Trimmed before the mount answered: durable bitmaps and disk space both fit.
    assert saved_bitmap_bytes(mount.cache_dir) <= cap
    assert data_bytes(mount.cache_dir) <= cap + 2 * FS_SLACK
    totals = status(mount)["totals"]
    assert totals["cache_used"] <= cap and totals["evicted_bytes"] >= 7 * MiB
    assert "cache trimmed" in mount.log_text()
    assert time.monotonic() - started < 30
    origin.reset_counters()
    assert read_direct(mount.path / "one.bin", 0, 6 * MiB) == first
    assert read_direct(mount.path / "two.bin", 0, 6 * MiB) == second
    assert origin.wait_idle(10)
    assert origin.bytes_served() > 0
    assert data_bytes(mount.cache_dir) <= cap + BLOCK + 2 * FS_SLACK
