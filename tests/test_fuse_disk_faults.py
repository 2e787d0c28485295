"""The cache disk misbehaves: damaged state files, a full disk, a read-only directory.

None of it may cost a wrong byte, and none may stop a mount that can work: damage resets
that one file's cache with a warning, a full disk serves reads from the network, and only a
cache directory that cannot be written at all refuses the mount, with a one-line reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroaring import BitMap

from remotefs.cache.state_files import encode_bitmap, load_bitmap, load_meta

from .conftest import write_random
from .mounting import MountFactory, is_mounted, run_remotefs
from .origin import Origin

MiB = 1024 * 1024
BLOCK = 64 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_dir(cache: Path, url: str) -> Path:
    return cache / "files" / hashlib.sha256(url.encode()).hexdigest()[:40]


@contextlib.contextmanager
def tmpfs(directory: Path, *options: str) -> Iterator[Path]:
    """Mount a tmpfs on *directory* for the duration of the block; always unmounted."""
    directory.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["mode=0700", *options]), "tmpfs", str(directory)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)
        assert not is_mounted(directory)


# -- damaged state files -------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300))


def _well_framed_but_past_the_end(path: Path) -> None:
    # A bitmap with a valid checksum that claims a block the file does not have.
    path.write_bytes(encode_bitmap(BitMap([0, 1, 10**6])))


def _meta_well_framed_but_meaningless(path: Path) -> None:
    from remotefs.cache import state_files

    path.write_bytes(state_files._frame(b"RFSM", b'{"url": 1}'))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "bitmap-bitflip": ("bitmap", _flip_last_byte),
    "bitmap-truncated": ("bitmap", _truncate_half),
    "bitmap-header-only": ("bitmap", _truncate_header),
    "bitmap-empty": ("bitmap", lambda path: os.truncate(path, 0)),
    "bitmap-garbage": ("bitmap", _garbage),
    "bitmap-past-the-end": ("bitmap", _well_framed_but_past_the_end),
    "meta-bitflip": ("meta", _flip_last_byte),
    "meta-truncated": ("meta", _truncate_half),
    "meta-garbage": ("meta", _garbage),
    "meta-undecodable": ("meta", _meta_well_framed_but_meaningless),
    "data-truncated": ("data", lambda path: os.truncate(path, 100_000)),  # bits without bytes
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_state_file_resets_that_file_with_a_warning(
    damage: str, origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 3 * MiB + 1234, seed=7)
    other = write_random(origin_root / "g.bin", MiB, seed=8)
    lines = [origin.url("f.bin"), origin.url("g.bin")]
    mount = remotefs.mount(lines)
    assert (mount.path / "f.bin").read_bytes() == data
    assert (mount.path / "g.bin").read_bytes() == other
    mount.unmount()

    which, spoil = DAMAGE[damage]
    directory = entry_dir(mount.cache_dir, origin.url("f.bin"))
    assert load_bitmap(directory / "bitmap")  # the state the damage is done to was saved
    spoil(directory / which)

    log_before = len(mount.log_text())
    mount = remotefs.mount(lines)
    origin.wait_idle()
    origin.reset_counters()
    new_log = mount.log_text()[log_before:]
    warnings = [line for line in new_log.splitlines() if " WARNING " in line]
    assert warnings, new_log
    assert any("f.bin" in line or "damaged" in line for line in warnings), warnings
    assert not any("g.bin" in line for line in warnings), warnings
    assert sha256((mount.path / "f.bin").read_bytes()) == sha256(data)
    assert sha256((mount.path / "g.bin").read_bytes()) == sha256(other)
    origin.wait_idle()
    # The damaged entry was not trusted: f.bin came from the origin again; g.bin was untouched.
    assert origin.bytes_served("/f.bin") >= len(data)
    assert origin.bytes_served("/g.bin") == 0
    mount.unmount()

    # And the state written after the reset is sound again.
    meta = load_meta(directory / "meta")
    assert meta.size == len(data) and meta.complete
    assert len(load_bitmap(directory / "bitmap")) == -(-len(data) // BLOCK)


# -- a full cache disk -----------------------------------------------------------------------------


def test_full_cache_disk_serves_right_bytes_and_keeps_what_it_cached(
    origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    data = write_random(origin_root / "big.bin", 20 * MiB, seed=9)
    url = origin.url("big.bin")
    # The log goes elsewhere: this test is about the cache's own files on the full disk.
    log_file = tmp_path / "daemon.log"
    with tmpfs(tmp_path / "cache", "size=3m") as cache:
        mount = remotefs.mount([url], "--log-file", str(log_file), cache_dir=cache)
        assert sha256((mount.path / "big.bin").read_bytes()) == sha256(data)
        log = log_file.read_text()
        assert "cache disk is full" in log, log
        mount.unmount()

        bitmap = load_bitmap(entry_dir(cache, url) / "bitmap")
        # About 3 MiB of blocks fitted before the disk filled; they must have been kept.
        assert len(bitmap) * BLOCK >= 2 * MiB, f"only {len(bitmap)} blocks kept"

        mount = remotefs.mount([url], "--log-file", str(log_file), cache_dir=cache)
        origin.wait_idle()
        origin.reset_counters()
        assert sha256((mount.path / "big.bin").read_bytes()) == sha256(data)
        origin.wait_idle()
        # Not one byte of a kept block came from the origin again.
        for start, end in origin.served_ranges("/big.bin"):
            overlap = BitMap()
            overlap.add_range(start // BLOCK, -(-end // BLOCK))
            assert not (overlap & bitmap), f"kept blocks fetched again: bytes {start}-{end}"
        mount.unmount()


# -- a cache directory that cannot be written ------------------------------------------------


def _assert_refused(result: subprocess.CompletedProcess[str], directory: Path, mnt: Path) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(directory) in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("layout", ["empty", "used-before", "missing-subdir", "log-elsewhere"])
def test_read_only_cache_dir_refuses_to_mount_with_one_line(
    layout: str, origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", 100_000)
    urls = remotefs.write_urls([origin.url("f.bin")])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with tmpfs(tmp_path / "ro", "size=4m") as ro:
        if layout == "used-before":
            # A cache that worked, then its disk became read-only.
            mount = remotefs.mount(urls_file=urls, cache_dir=ro, mountpoint=mnt)
            (mnt / "f.bin").read_bytes()
            mount.unmount()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, timeout=30)
        cache = ro / "sub" if layout == "missing-subdir" else ro
        extra = ["--log-file", str(tmp_path / "log")] if layout == "log-elsewhere" else []
        result = run_remotefs("mount", urls, mnt, "--cache-dir", cache, *extra)
        _assert_refused(result, cache, mnt)
