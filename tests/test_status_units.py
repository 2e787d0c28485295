"""The pieces of `remotefs status` and `evict` that need no mount: counters and eviction."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from remotefs.cache.cached_file import BITMAP_NAME, DATA_NAME, META_NAME, CachedFile
from remotefs.cache.state_files import load_bitmap, load_meta
from remotefs.cache.stats import RATE_WINDOW, TransferStats
from remotefs.cache.store import CacheStore
from remotefs.control_client import bar, human, locate
from remotefs.http.source import RemoteMeta

BS = 64 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_a_sliding_window_and_origin_bytes_accumulate() -> None:
    clock = FakeClock()
    stats = TransferStats(clock)
    assert stats.rate() == 0
    for _ in range(10):
        stats.add(300_000)
        clock.now += 0.1
    assert stats.origin_bytes == 3_000_000
    assert stats.rate() == 3_000_000 / RATE_WINDOW
    clock.now += RATE_WINDOW + 0.5
    assert stats.rate() == 0, "old traffic leaves the window"
    assert stats.origin_bytes == 3_000_000
    for _ in range(1000):  # a long download keeps a bounded number of slots
        stats.add(1)
        clock.now += 0.3
    assert len(stats._slots) <= RATE_WINDOW / 0.25 + 1


def _entry(tmp_path: Path, size: int) -> CachedFile:
    store = CacheStore(tmp_path / "cache", BS)
    store.open()
    meta = RemoteMeta("http://h/f.bin?sig=x", size, '"v1"', None, None, True)
    cached = store.attach(meta.url, meta, "f.bin")
    assert cached is not None
    return cached


def test_evict_saves_an_empty_bitmap_before_freeing_and_keeps_blocks_that_arrive(
    tmp_path: Path,
) -> None:
    size = 10 * BS + 7
    cached = _entry(tmp_path, size)
    data = os.urandom(size)
    cached.write_blocks(0, cached.nblocks, data)

    async def scenario() -> int:
        await cached.save()
        assert load_meta(cached.directory / META_NAME).complete
        freed = 0

        async def evict() -> None:
            nonlocal freed
            freed = await cached.evict()

        async def late_block() -> None:
            # A download that stores block 3 while the eviction saves: its bytes must stay.
            while cached.bitmap:
                await trio.sleep(0)
            cached.write_block(3, data[3 * BS : 4 * BS])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(evict)
            nursery.start_soon(late_block)
        return freed

    assert trio.run(scenario) == size
    assert list(cached.bitmap) == [3]
    assert cached.read(3 * BS, BS) == data[3 * BS : 4 * BS]
    assert not cached.complete
    on_disk = load_bitmap(cached.directory / BITMAP_NAME)
    assert set(on_disk) <= {3}, "the saved bitmap claims only what is still there"
    assert not load_meta(cached.directory / META_NAME).complete
    trio.run(cached.save)
    assert list(load_bitmap(cached.directory / BITMAP_NAME)) == [3]
    # Everything else is a hole again.
    assert (cached.directory / DATA_NAME).stat().st_blocks * 512 <= 2 * BS
    assert (cached.directory / DATA_NAME).stat().st_size == size
    cached.close()


def test_evict_of_everything_truncates_the_data_file(tmp_path: Path) -> None:
    size = 4 * BS
    cached = _entry(tmp_path, size)
    cached.write_blocks(0, 4, os.urandom(size))
    assert trio.run(cached.evict) == size
    info = (cached.directory / DATA_NAME).stat()
    assert info.st_blocks == 0 and info.st_size == size
    assert not cached.bitmap and cached.cached_bytes == 0
    assert not load_bitmap(cached.directory / BITMAP_NAME)
    cached.close()


def test_formatting_helpers() -> None:
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KiB"
    assert human(5 * 1024**3) == "5.0 GiB"
    assert bar(0, 10) == "[..........]"
    assert bar(50, 10) == "[#####.....]"
    assert bar(100, 10) == "[##########]"


def test_locate_finds_the_innermost_mount() -> None:
    mounts = ["/mnt", "/mnt/a b", "/srv/x"]
    assert locate("/mnt/a b/f.bin", mounts) == ("/mnt/a b", "f.bin")
    assert locate("/mnt/a bc/f.bin", mounts) == ("/mnt", "a bc/f.bin")
    assert locate("/srv/x", mounts) == ("/srv/x", ".")
    assert locate("/srv/xy", mounts) is None
