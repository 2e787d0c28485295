"""kill -9 at random moments during heavy concurrent reads, twenty times in a row.

After every crash the stale mount is cleared, the state files on disk must load cleanly, and a
fresh mount must return every byte of every file exactly as the origin has it: whatever the
bitmap claims must be true, and whatever it lost is downloaded again.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotefs.cache.state_files import load_bitmap, load_meta

from .conftest import write_random
from .mounting import MountFactory, is_mounted
from .origin import Exchange, Origin

MiB = 1024 * 1024
ROUNDS = 20

READER = r"""
import os, random, sys
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
try:
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        for _ in range(2000):
            if rng.random() < 0.3:  # a sequential stretch: kernel readahead, long requests
                f.seek(rng.randrange(size))
                for _ in range(8):
                    f.read(256 * 1024)
            else:
                f.seek(rng.randrange(size))
                f.read(rng.randrange(1, 1024 * 1024))
except OSError:
    pass  # the daemon was killed under us: expected
"""


class SlowOrigin(Origin):
    """An origin that, while ``slow`` is set, sends each body at about 3 MiB/s per connection.

    Loopback is so fast that a few MiB are downloaded before a kill could land; slowed down,
    a kill at a random moment finds downloads in flight and checkpoints being written.
    """

    slow = False

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if not self.slow:
            super()._send_range(ex, fd, st, start, end)
            return
        headers = self._representation_headers(st)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
        headers["Content-Length"] = str(end - start)
        ex.send_head(206, headers)
        position = start
        while position < end:
            count = min(64 * 1024, end - position)
            ex.send_file(fd, position, count)
            position += count
            if self._stopping.wait(0.02):
                ex.abort()
                return


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def slow_origin(origin_root: Path) -> Iterator[SlowOrigin]:
    with SlowOrigin(origin_root) as server:
        yield server


def test_kill_9_twenty_times_during_heavy_reads_never_serves_a_wrong_byte(
    slow_origin: SlowOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    origin = slow_origin
    names = [f"f{index}.bin" for index in range(4)]
    expected = {}
    for index, name in enumerate(names):
        data = write_random(origin_root / name, 7 * MiB + index * 4099, seed=100 + index)
        expected[name] = hashlib.sha256(data).hexdigest()
    cache, mountpoint = tmp_path / "cache", tmp_path / "mnt"
    args = ["--checkpoint-interval", "0.1", "--read-deadline", "10"]
    rng = random.Random(2024)
    claimed_rounds = busy_rounds = 0

    for round_ in range(ROUNDS):
        # A new query string per round makes new cache entries, so every round downloads
        # (and checkpoints) while it is killed, instead of reading a complete cache.
        lines = [f"{origin.url(name)}?round={round_}" for name in names]
        mount = remotefs.mount(lines, *args, cache_dir=cache, mountpoint=mountpoint)
        origin.slow = True
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", READER, str(mount.path / name), str(round_ * 10 + seed)]
            )
            for seed, name in enumerate(names * 2)
        ]
        try:
            time.sleep(rng.uniform(0.1, 1.5))
            busy_rounds += not origin.wait_idle(timeout=0)
            mount.kill()
        finally:
            origin.slow = False
            for reader in readers:
                try:
                    reader.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    reader.kill()
                    reader.wait()

        # The crash left a stale mount; clear it the way the error message says.
        assert is_mounted(mountpoint)
        cleared = subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, timeout=30
        )
        assert cleared.returncode == 0, cleared.stderr
        assert not is_mounted(mountpoint)

        # Every state file on disk is whole (atomic replacement), and the bitmap never claims
        # more than the file has.
        entries = [d for d in (cache / "files").iterdir() if d.is_dir()]
        claimed = 0
        for entry in entries:
            if not (entry / "meta").exists():  # killed while creating it: allowed, no claims
                assert not (entry / "bitmap").exists()
                continue
            meta = load_meta(entry / "meta")
            if (entry / "bitmap").exists():
                bitmap = load_bitmap(entry / "bitmap")
                nblocks = -(-meta.size // meta.block_size)
                assert not bitmap or bitmap.max() < nblocks
                claimed += len(bitmap)
        claimed_rounds += claimed > 0

        log_before = len(mount.log_text())
        mount = remotefs.mount(lines, *args, cache_dir=cache, mountpoint=mountpoint)
        for name in names:
            assert sha256_file(mount.path / name) == expected[name], f"round {round_}: {name}"
        new_log = mount.log_text()[log_before:]
        assert "damaged" not in new_log and "resetting" not in new_log, new_log
        mount.unmount()
        for entry in entries:  # keep the disk use of twenty rounds bounded
            shutil.rmtree(entry)

    # The test did what it says: most kills hit while downloads were in flight, and most
    # rounds left blocks on disk that the next mount trusted (and the checks proved right).
    assert busy_rounds >= ROUNDS // 2, busy_rounds
    assert claimed_rounds >= ROUNDS // 2, claimed_rounds
