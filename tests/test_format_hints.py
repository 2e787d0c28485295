"""Open-time hints and exact fetches, in the daemon's layers against a real origin.

`BlockFetcher` and `OpenHints` run here in the test's own trio loop (as in
`tests/test_block_cache.py`), against the test origin, whose accounting shows exactly which
bytes were asked for. The real-mount side (loop devices, the kernel's demand) is in
`tests/test_fuse_images.py`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import trio

import remotefs.formats.ext as ext_module
from remotefs.cache.cached_file import CachedFile
from remotefs.cache.fetcher import BlockFetcher
from remotefs.cache.readahead import ReadStream
from remotefs.cache.store import CacheStore
from remotefs.formats.hints import LOOP_OPENERS, OpenHints, probe_ranges
from remotefs.formats.layout import PAGE, Extents, Layout
from remotefs.http.source import HttpSource

from .conftest import make_options, write_random
from .faults import FaultyOrigin
from .image_analysis import require_image_tools
from .origin import Origin

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB


@dataclass
class Stack:
    cached: CachedFile
    fetcher: BlockFetcher
    hints: OpenHints


def run_stack(
    tmp_path: Path, origin: Origin, name: str, body: Callable[[Stack], Awaitable[T]]
) -> T:
    """Probe *name*, attach it, and run *body* with a fetcher and open hints."""
    options = make_options(tmp_path)

    async def main() -> T:
        source = HttpSource(options)
        store = CacheStore(options.cache_dir, options.block_size)
        store.open(wait=0.2)
        cached: CachedFile | None = None
        try:
            meta = await source.probe(origin.url(name))
            cached = store.attach(origin.url(name), meta, name)
            assert cached is not None
            assert origin.wait_idle()
            origin.reset_counters()
            async with trio.open_nursery() as nursery:
                fetcher = BlockFetcher(source, options, nursery)
                hints = OpenHints(fetcher, tail=MiB, head=64 * KiB)
                result = await body(Stack(cached, fetcher, hints))
                nursery.cancel_scope.cancel()
            return result
        finally:
            await source.aclose()
            if cached is not None:
                cached.close()
            store.close()

    return trio.run(main)


def served(origin: Origin, name: str) -> list[tuple[int, int]]:
    assert origin.wait_idle()
    return sorted(origin.served_ranges(f"/{name}"))


def test_a_mapped_file_is_fetched_page_by_page_not_block_by_block(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    data = write_random(origin_root / "img.bin", MiB)

    async def body(stack: Stack) -> None:
        # Metadata the hint has not fetched (yet): a read there takes its pages only.
        stack.fetcher.set_layout(stack.cached, Layout("test", [(0, 4 * KiB), (BS, 2 * BS)]))
        got = await stack.fetcher.read(stack.cached, 70 * KiB, 4 * KiB)
        assert got == data[70 * KiB : 74 * KiB]
        assert served(origin, "img.bin") == [(68 * KiB, 76 * KiB)]  # whole pages around it
        again = await stack.fetcher.read(stack.cached, 70 * KiB, 4 * KiB)
        assert again == got and served(origin, "img.bin") == [(68 * KiB, 76 * KiB)]

    run_stack(tmp_path, origin, "img.bin", body)


def test_a_read_across_a_present_block_and_a_missing_piece(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    """One block present, the next one's first pages missing: only those are fetched."""
    data = write_random(origin_root / "img.bin", MiB)

    async def body(stack: Stack) -> None:
        stack.fetcher.prefetch(stack.cached, 0, BS, split=False)  # block 0 alone
        await stack.fetcher.ensure(stack.cached, 0, 1)
        assert list(stack.cached.bitmap) == [0]
        origin.reset_counters()
        stack.fetcher.set_layout(stack.cached, Layout("test", pending=True))
        with trio.fail_after(10):
            got = await stack.fetcher.read(stack.cached, 60 * KiB, 8 * KiB)
        assert got == data[60 * KiB : 68 * KiB]
        assert served(origin, "img.bin") == [(64 * KiB, 68 * KiB)]

    run_stack(tmp_path, origin, "img.bin", body)


def test_pieces_that_fill_a_block_are_stored_as_that_block(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    data = write_random(origin_root / "img.bin", MiB)

    async def body(stack: Stack) -> None:
        fetcher, cached = stack.fetcher, stack.cached
        assert await fetcher.read_exact(cached, 2 * BS, BS // 2) == data[2 * BS : 2 * BS + BS // 2]
        assert 2 not in cached.bitmap
        await fetcher.read_exact(cached, 2 * BS + BS // 2, BS // 2)
        assert 2 in cached.bitmap  # now in the cache like any block
        assert cached.read(2 * BS, BS) == data[2 * BS : 3 * BS]

    run_stack(tmp_path, origin, "img.bin", body)


def test_a_file_read_from_its_start_inside_an_image_is_fetched_to_its_end_and_no_further(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    data = write_random(origin_root / "img.bin", 4 * MiB)
    extent = (100 * KiB, 300 * KiB)

    async def body(stack: Stack) -> None:
        fetcher, cached = stack.fetcher, stack.cached
        fetcher.set_layout(cached, Layout("test", [(0, 4 * KiB)], Extents([extent])))
        stream = ReadStream()
        await fetcher.read(cached, 3 * MiB, 4 * KiB, stream)  # the handle has seeked before
        origin.reset_counters()
        position = extent[0]
        while position < extent[1]:
            size = min(32 * KiB, extent[1] - position)
            assert (
                await fetcher.read(cached, position, size, stream)
                == data[position : position + size]
            )
            position += size
        ranges = served(origin, "img.bin")
        assert ranges[0][0] == extent[0] and max(end for _, end in ranges) == extent[1]
        assert sum(end - start for start, end in ranges) == extent[1] - extent[0]
        assert len(ranges) <= 4, ranges  # a piece, whole blocks, a piece: one round trip

    run_stack(tmp_path, origin, "img.bin", body)


def test_a_file_that_starts_mid_page_is_read_ahead_from_the_page_before_its_start(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    """squashfs packs files byte after byte: the kernel reads a file from the page that holds
    its start, which begins with the previous file's tail. That read is the file's first."""
    data = write_random(origin_root / "img.bin", 4 * MiB)
    rng = random.Random(15)
    start = 400 * KiB + rng.randrange(1, PAGE)  # not on a page boundary
    previous = (64 * KiB + rng.randrange(1, PAGE), start)  # the file before it, up to it
    extents = [previous, (start, start + 400 * KiB + rng.randrange(PAGE))]

    async def body(stack: Stack) -> None:
        fetcher, cached = stack.fetcher, stack.cached
        fetcher.set_layout(cached, Layout("test", [(0, 4 * KiB)], Extents(extents)))
        stream = ReadStream()
        await fetcher.read(cached, 3 * MiB, 4 * KiB, stream)  # the handle has seeked before
        origin.reset_counters()
        position, end = start // PAGE * PAGE, extents[1][1]
        while position < end:  # the loop driver's reads: 128 KiB plus a page, overlapping
            size = min(132 * KiB, end - position)
            got = await fetcher.read(cached, position, size, stream)
            assert got == data[position : position + size]
            position += 128 * KiB
        ranges = served(origin, "img.bin")
        # The first read and, at once, the rest of the file: one round trip, not one a read
        # (its own bytes: a piece, whole blocks, a piece; the rest: blocks and a piece).
        assert len(ranges) <= 5, ranges
        assert min(first for first, _ in ranges) == start // PAGE * PAGE
        assert max(stop for _, stop in ranges) <= -(-end // PAGE) * PAGE + 4 * KiB

    run_stack(tmp_path, origin, "img.bin", body)


def test_a_handle_reading_an_image_from_its_start_is_a_plain_stream(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    """sha256sum of an ISO: the map of the files inside must not slow it down."""
    data = write_random(origin_root / "img.bin", 16 * MiB)
    extents = [(start, start + 100 * KiB) for start in range(0, 16 * MiB, 200 * KiB)]

    async def body(stack: Stack) -> None:
        fetcher, cached = stack.fetcher, stack.cached
        fetcher.set_layout(cached, Layout("test", [(0, 4 * KiB)], Extents(extents)))
        stream = ReadStream()
        for position in range(0, 16 * MiB, 128 * KiB):
            got = await fetcher.read(cached, position, 128 * KiB, stream)
            assert got == data[position : position + 128 * KiB]
        ranges = served(origin, "img.bin")
        # Not cut at the 100 KiB extents: windows of MiBs, as for any file.
        assert max(end - start for start, end in ranges) >= MiB, "readahead never grew"
        assert len(ranges) < 40

    run_stack(tmp_path, origin, "img.bin", body)


def _ext4_image(path: Path, tmp_path: Path) -> None:
    content = tmp_path / "content"
    write_random(content / "a" / "file.bin", 200 * KiB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(path), "16M"],
        check=True,
        capture_output=True,
    )


async def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def test_a_bug_in_a_parser_costs_the_hint_never_the_open_or_the_read(
    tmp_path: Path,
    origin: Origin,
    origin_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_image_tools()
    _ext4_image(origin_root / "disk.img", tmp_path)
    image = (origin_root / "disk.img").read_bytes()

    async def broken(reader: object) -> Layout:
        raise RuntimeError("a bug in a parser")

    monkeypatch.setattr(ext_module, "parse", broken)

    async def body(stack: Stack) -> None:
        assert stack.hints.opened(stack.cached, os.getpid()) is False
        await _until(lambda: "internal error in a format parser" in caplog.text)
        assert "a bug in a parser" in caplog.text
        assert not stack.fetcher._maps  # no layout: the general rules
        got = await stack.fetcher.read(stack.cached, 1024, 8192, ReadStream())
        assert got == image[1024 : 1024 + 8192]

    with caplog.at_level(logging.INFO):
        run_stack(tmp_path, origin, "disk.img", body)


def test_a_bug_in_the_open_hints_never_fails_the_open(
    tmp_path: Path,
    origin: Origin,
    origin_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_random(origin_root / "f.bin", MiB)

    def broken(self: OpenHints, cached: CachedFile, loop: bool) -> bool:
        raise KeyError("a bug")

    monkeypatch.setattr(OpenHints, "_opened", broken)

    async def body(stack: Stack) -> None:
        assert stack.hints.opened(stack.cached, os.getpid()) is False

    with caplog.at_level(logging.ERROR):
        run_stack(tmp_path, origin, "f.bin", body)
    assert "internal error in the open hints" in caplog.text


def test_a_loop_device_setup_gets_direct_io_the_probes_and_the_metadata(
    tmp_path: Path, origin: Origin, origin_root: Path
) -> None:
    """An open by a process named mount: direct_io, libblkid's places, then the ext4 hint."""
    require_image_tools()
    _ext4_image(origin_root / "disk.img", tmp_path)
    fake = tmp_path / "mount"  # the command name is what tells a loop setup apart
    shutil.copy("/bin/sleep", fake)
    opener = subprocess.Popen([str(fake), "30"])
    size = (origin_root / "disk.img").stat().st_size

    def probed() -> bool:
        ranges = _merged(origin.served_ranges("/disk.img"))
        return all(any(s <= a and b <= e for s, e in ranges) for a, b in probe_ranges(size))

    try:
        comm = Path(f"/proc/{opener.pid}/comm")
        deadline = time.monotonic() + 10
        while comm.read_text().strip() not in LOOP_OPENERS and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'ed

        async def body(stack: Stack) -> None:
            assert stack.hints.opened(stack.cached, opener.pid) is True
            layouts = stack.fetcher._maps
            await _until(lambda: not getattr(layouts.get(stack.cached), "pending", True))
            layout = layouts.get(stack.cached)
            assert isinstance(layout, Layout) and layout.kind == "ext4"
            await _until(probed)  # libblkid's places, fetched without anyone reading them

        run_stack(tmp_path, origin, "disk.img", body)
    finally:
        opener.kill()
        opener.wait()


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def test_probe_ranges_stay_inside_small_files() -> None:
    assert probe_ranges(100 * KiB) == [(0, 100 * KiB)]
    big = probe_ranges(8 * 1024 * MiB)
    assert big[0] == (0, 516 * KiB) and big[-1] == (8 * 1024 * MiB - 512 * KiB, 8 * 1024 * MiB)
    assert all(end - start <= 516 * KiB for start, end in big)


def test_an_origin_that_stops_honouring_range_mid_way_is_read_as_one_stream(
    tmp_path: Path, origin_root: Path
) -> None:
    """A piece request answered with the whole body: the readers get the right bytes."""
    data = write_random(origin_root / "img.bin", MiB)
    with FaultyOrigin(origin_root) as faulty:

        async def body(stack: Stack) -> None:
            stack.fetcher.set_layout(stack.cached, Layout("test", pending=True))
            faulty.ignore_range = True
            with trio.fail_after(20):
                got = await stack.fetcher.read(stack.cached, 70 * KiB, 4 * KiB)
            assert got == data[70 * KiB : 74 * KiB]
            assert not stack.cached.remote.accepts_ranges

        run_stack(tmp_path, faulty, "img.bin", body)
