"""What survives a restart, an origin outage and a kill -9 of the daemon."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import write_random
from .mounting import REMOTEFS, MountFactory, force_unmount, is_mounted, run_remotefs
from .origin import Origin

MiB = 1024 * 1024


def read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def test_restart_rereads_cached_part_for_free_and_works_offline(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 16 * MiB + 5)
    mount = remotefs.mount([origin.url("f.bin")], "--read-deadline", "3")
    assert read_range(mount.path / "f.bin", 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    mount.unmount()

    mount = remotefs.mount([origin.url("f.bin")], "--read-deadline", "3")
    origin.wait_idle()
    origin.reset_counters()
    assert read_range(mount.path / "f.bin", 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == 0

    # The origin goes away while mounted: cached bytes still read, uncached ones fail in time.
    origin.stop()
    assert (
        read_range(mount.path / "f.bin", 2 * MiB + 100, 5000)
        == data[2 * MiB + 100 : 2 * MiB + 5100]
    )
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_range(mount.path / "f.bin", 10 * MiB, 4096)
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 3 + 10
    assert "f.bin" in mount.log_text()
    mount.unmount()

    # Mounting while the origin is down: the file is shown from the cache and still readable.
    mount = remotefs.mount([origin.url("f.bin")], "--read-deadline", "2", "--probe-timeout", "1")
    assert (mount.path / "f.bin").stat().st_size == len(data)
    assert read_range(mount.path / "f.bin", 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_range(mount.path / "f.bin", 12 * MiB, 4096)
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 2 + 10


def test_unknown_url_is_left_out_while_unreachable(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "here.bin", 100)
    mount = remotefs.mount(
        [origin.url("here.bin"), origin.url("later.bin")], "--probe-timeout", "1"
    )
    assert os.listdir(mount.path) == ["here.bin"]
    assert "later.bin" in mount.log_text()


READER = r"""
import os, random, sys
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
size = os.path.getsize(path)
try:
    with open(path, "rb", buffering=0) as f:
        for _ in range(400):
            offset = rng.randrange(size)
            f.seek(offset)
            f.read(rng.randrange(1, 2 * 1024 * 1024))
except OSError:
    pass  # the daemon was killed under us: expected
"""


def test_kill_9_during_heavy_reads_never_corrupts_the_cache(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    names = [f"f{index}.bin" for index in range(4)]
    for index, name in enumerate(names):
        write_random(origin_root / name, 24 * MiB + index * 12345)
    lines = [origin.url(name) for name in names]
    rng = random.Random(11)
    for _round in range(3):
        mount = remotefs.mount(lines, "--checkpoint-interval", "0.1")
        readers = [
            subprocess.Popen([sys.executable, "-c", READER, str(mount.path / name), str(seed)])
            for seed, name in enumerate(names * 2)
        ]
        try:
            time.sleep(rng.uniform(0.3, 1.5))
            mount.kill()
        finally:
            for reader in readers:
                reader.wait(timeout=60)
        assert is_mounted(mount.path)  # a stale mount, as after a real crash
        # Mounting over the stale mount is refused with the fix in the message.
        again = run_remotefs("mount", mount.urls_file, mount.path, "--cache-dir", mount.cache_dir)
        assert again.returncode != 0 and "fusermount3 -u" in again.stderr
        force_unmount(mount.path)
        assert not is_mounted(mount.path)

    mount = remotefs.mount(lines)
    for name in names:
        got = hashlib.sha256((mount.path / name).read_bytes()).hexdigest()
        assert got == hashlib.sha256((origin_root / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_daemon_unmounts_and_saves_on_signal(
    signum: int, origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    data = write_random(origin_root / "f.bin", 3 * MiB)
    urls = remotefs.write_urls([origin.url("f.bin")])
    mountpoint, cache = tmp_path / "mnt", tmp_path / "cache"
    mountpoint.mkdir()
    # A long checkpoint interval: only the save at shutdown can persist what was read.
    command = [*REMOTEFS, "mount", "-f", str(urls), str(mountpoint), "--cache-dir", str(cache)]
    daemon = subprocess.Popen([*command, "--checkpoint-interval", "3600"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mountpoint / "f.bin").read_bytes()[:MiB] == data[:MiB]
        daemon.send_signal(signum)
        assert daemon.wait(timeout=30) == 0
        assert not is_mounted(mountpoint)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        force_unmount(mountpoint)
    mount = remotefs.mount(urls_file=urls, cache_dir=cache)
    origin.wait_idle()
    origin.reset_counters()
    assert read_range(mount.path / "f.bin", 0, MiB) == data[:MiB]
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == 0


def test_one_url_at_two_paths_shares_one_cache_entry(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    """Both paths read one cache entry: bytes one path fetched are free for the other, and
    the entry's state on disk is one object's, not two objects' overwriting each other."""
    data = write_random(origin_root / "f.bin", 6 * MiB + 9)
    url = origin.url("f.bin")
    mount = remotefs.mount([f"{url} a/first.bin", f"{url} b/second.bin"])
    origin.wait_idle()
    origin.reset_counters()
    assert (mount.path / "a" / "first.bin").read_bytes() == data
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == len(data)
    assert (mount.path / "b" / "second.bin").read_bytes() == data
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == len(data), "the second path downloaded again"
    mount.unmount()

    # The next mount finds every byte cached, under either path.
    mount = remotefs.mount([f"{url} b/second.bin", f"{url} a/first.bin"])
    origin.wait_idle()
    origin.reset_counters()
    assert (mount.path / "b" / "second.bin").read_bytes() == data
    assert (mount.path / "a" / "first.bin").read_bytes() == data
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == 0
