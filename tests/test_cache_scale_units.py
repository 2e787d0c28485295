"""Unit checks of the parts that make the cache scale: the descriptor cache, runs of blocks
found run by run (against a block-by-block walk, for any bitmap), the bitmap conversion, the
catalog, and what the store does with a file too large for its filesystem."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from remotefs.cache.cached_file import MAX_BLOCKS
from remotefs.cache.fd_cache import FdCache, capacity_for
from remotefs.cache.gaps import gaps_largest_first, missing_runs, runs
from remotefs.cache.state_files import (
    Catalog,
    CatalogRecord,
    CorruptStateError,
    decode_catalog,
    encode_catalog,
)
from remotefs.cache.store import CacheStore, convert_bitmap
from remotefs.http.source import RemoteMeta

from .conftest import loop_ext4


class Owner:
    """A data-file owner whose opener can be told to fail."""

    def __init__(self, path: Path, failures: list[int] | None = None) -> None:
        self.path = path
        self.failures = failures or []
        self.opens = 0

    def open_data(self) -> int:
        self.opens += 1
        if self.failures:
            raise OSError(self.failures.pop(0), os.strerror(errno.EMFILE))
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_fd_cache_keeps_at_most_its_capacity_least_recently_used_first(
    tmp_path: Path,
) -> None:
    cache = FdCache(3)
    owners = [Owner(tmp_path / f"{i}") for i in range(5)]
    before = open_fds()
    for owner in owners:
        cache.fd(owner)
    assert open_fds() - before == 3
    assert [cache.is_open(o) for o in owners] == [False, False, True, True, True]
    cache.fd(owners[2])  # used again: now the most recent
    cache.fd(owners[0])
    assert [cache.is_open(o) for o in owners] == [True, False, True, False, True]
    cache.close_all()
    assert open_fds() == before


def test_a_pinned_descriptor_outlives_a_close_until_it_is_released(tmp_path: Path) -> None:
    cache = FdCache(1)
    first, second = Owner(tmp_path / "a"), Owner(tmp_path / "b")
    with cache.pinned(first) as fd:
        cache.fd(second)  # over capacity, but the pinned one stays open
        os.fstat(fd)
        cache.close(first)
        os.fstat(fd)  # still open while pinned
    with pytest.raises(OSError):
        os.fstat(fd)
    cache.close_all()


def test_out_of_descriptors_closes_idle_ones_and_tries_again(tmp_path: Path) -> None:
    cache = FdCache(100)
    idle = [Owner(tmp_path / f"{i}") for i in range(10)]
    for owner in idle:
        cache.fd(owner)
    unlucky = Owner(tmp_path / "x", failures=[errno.EMFILE])
    fd = cache.fd(unlucky)
    os.fstat(fd)
    assert unlucky.opens == 2
    assert sum(cache.is_open(o) for o in idle) == 5  # half of the idle ones went
    assert cache.statistics().out_of_descriptors == 1
    hopeless = Owner(tmp_path / "y", failures=[errno.EMFILE, errno.EMFILE])
    with pytest.raises(OSError) as info:
        cache.fd(hopeless)
    assert info.value.errno == errno.EMFILE  # reported as what it is, never as damage
    cache.close_all()


def test_capacity_leaves_room_for_everything_else() -> None:
    assert capacity_for(1024, 74) == 1024 - 96 - 74
    assert capacity_for(256, 74) == 86
    assert capacity_for(100, 74) == 8
    assert capacity_for(1 << 30, 74) == 4096


def _naive_runs(blocks: set[int], first: int, end: int) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    for block in range(first, end):
        if block in blocks:
            if found and found[-1][1] == block:
                found[-1] = (found[-1][0], block + 1)
            else:
                found.append((block, block + 1))
    return found


@settings(max_examples=300, deadline=None)
@given(
    st.sets(st.integers(0, 400), max_size=120),
    st.integers(0, 200),
    st.integers(0, 450),
)
def test_runs_equal_a_block_by_block_walk(blocks: set[int], first: int, end: int) -> None:
    bitmap = BitMap(blocks)
    assert list(runs(bitmap, first, end)) == _naive_runs(blocks, first, end)
    missing = set(range(first, end)) - blocks
    assert list(missing_runs(bitmap, first, end)) == _naive_runs(missing, first, end)


def test_gaps_of_a_16_tib_file_cost_their_number_not_the_blocks() -> None:
    nblocks = 1 << 28  # 16 TiB of 64 KiB blocks
    present = BitMap([5, 6, 7, 1 << 20, nblocks - 1])
    present.add_range(1000, 2000)
    began = time.perf_counter()
    gaps = gaps_largest_first(present, nblocks)
    assert time.perf_counter() - began < 0.05
    assert gaps[0] == ((1 << 20) + 1, nblocks - 1)
    assert sorted(gaps) == [(0, 5), (8, 1000), (2000, 1 << 20), ((1 << 20) + 1, nblocks - 1)]


def _naive_convert(old: BitMap, old_size: int, new_size: int, file_size: int) -> BitMap:
    new = BitMap()
    for block in range(-(-file_size // new_size)):
        start, end = block * new_size, min((block + 1) * new_size, file_size)
        if all(b in old for b in range(start // old_size, -(-end // old_size))):
            new.add(block)
    return new


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([(4096, 65536), (65536, 4096), (8192, 8192), (16384, 4096)]),
    st.integers(1, 600_000),
    st.sets(st.integers(0, 200), max_size=80),
)
def test_converted_bitmaps_keep_exactly_the_fully_covered_blocks(
    sizes: tuple[int, int], file_size: int, blocks: set[int]
) -> None:
    old_size, new_size = sizes
    nblocks = -(-file_size // old_size)
    old = BitMap(b for b in blocks if b < nblocks)
    assert convert_bitmap(old, old_size, new_size, file_size) == _naive_convert(
        old, old_size, new_size, file_size
    )


def _record(url: str, size: int) -> CatalogRecord:
    remote = RemoteMeta(url, size, '"e"', "Mon, 30 Nov 2026 00:00:00 GMT", "text/plain", True)
    return CatalogRecord(remote, 1764460800.5)


def test_the_catalog_round_trips_and_refuses_damage() -> None:
    records = [_record(f"https://h/{i}?sig=x", i * 1000) for i in range(50)]
    data = encode_catalog(records)
    assert b"sig=x" not in data  # the catalog holds each URL at rest: no query
    catalog = Catalog(decode_catalog(data, "catalog"))
    assert len(catalog) == len(records)
    assert all(catalog.get(r.remote.url) == r for r in records)  # found by the whole URL
    with pytest.raises(CorruptStateError):
        decode_catalog(data[:-3], "catalog")
    flipped = bytearray(data)
    flipped[-5] ^= 1
    with pytest.raises(CorruptStateError):
        decode_catalog(bytes(flipped), "catalog")


def test_a_store_lists_from_its_catalog_and_ignores_a_damaged_one(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache", 65536)
    store.open(wait=0)
    try:
        store.save_catalog([_record("https://h/a", 5)])
        catalog = store.load_catalog()
        assert len(catalog) == 1 and catalog.get("https://h/a") is not None
        (tmp_path / "cache" / "catalog").write_bytes(b"RFSCgarbage")
        assert len(store.load_catalog()) == 0
    finally:
        store.close()


def test_a_file_larger_than_the_cache_can_hold_is_served_uncached(
    tmp_path: Path, root_required: None
) -> None:
    with loop_ext4(tmp_path, 32 << 20) as ext4:
        _check_what_ext4_holds(ext4 / "cache")


def _check_what_ext4_holds(root: Path) -> None:
    store = CacheStore(root, 65536)
    store.open(wait=0)
    try:
        ext4_limit = store.new_entry("https://h/a", _record("https://h/a", 16 << 40).remote, "a")
        assert not ext4_limit.cacheable  # ext4 holds at most 16 TiB - 4 KiB
        assert "cannot hold" in str(ext4_limit.uncached_reason)
        roaring = store.new_entry(
            "https://h/b", _record("https://h/b", MAX_BLOCKS * 65536 + 1).remote, "b"
        )
        assert not roaring.cacheable
        small = store.new_entry("https://h/c", _record("https://h/c", 1 << 30).remote, "c")
        assert small.cacheable
        assert os.listdir(root / "files") == []  # nothing left behind
    finally:
        store.close()
