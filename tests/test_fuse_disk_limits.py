"""The cache filesystem's limits, through real mounts: a free-space reserve that background
downloads never touch, and a 16 TiB file whose fill planning never stalls the event loop.

The cache lives on a filesystem made for the test: a small ext4 image on a loop device (a
full disk is a real full disk), or a tmpfs (which holds a 16 TiB sparse file, as ext4 does
not).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import loop_ext4, mounted_tmpfs
from .mounting import REMOTEFS, MountFactory, run_remotefs, status_json, wait_for
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024
TiB = 1 << 40


def free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def test_fill_stops_at_the_free_space_reserve_and_reads_go_on(
    tmp_path: Path,
    virtual_origin: VirtualOrigin,
    remotefs: MountFactory,
    root_required: None,
) -> None:
    """A fill starts only for a file that fits above the reserve (tests/test_fill_only_what_
    fits.py); here another program then fills the cache filesystem while it runs, and the
    fill stops at the reserve instead of taking the rest."""
    reserve = 24 * MiB
    with loop_ext4(tmp_path, 96 * MiB) as cachefs:
        # Fits above the reserve when the fill starts, with 4 MiB to spare.
        size = (free_bytes(cachefs) - reserve - 4 * MiB) // MiB * MiB
        virtual_origin.files["big.bin"] = VirtualFile(size, seed=11)
        virtual_origin.files["other.bin"] = VirtualFile(2 * MiB, seed=12)
        mount = remotefs.mount(
            [virtual_origin.url("big.bin"), virtual_origin.url("other.bin")],
            "--fill-idle",
            "0.3",
            "--fill-rate",
            "4M",
            "--min-free",
            "24M",
            cache_dir=cachefs / "cache",
            fill=True,
        )
        path = mount.path / "big.bin"
        with open(path, "rb", buffering=0) as handle:
            assert handle.read(MiB) == expected(11, 0, MiB)

        def cached_bytes() -> int:
            files = status_json(mount.path)["files"]
            return int(next(f for f in files if f["path"] == "big.bin")["cached_bytes"])

        wait_for(lambda: cached_bytes() > 4 * MiB, 60, "the background fill to start")
        # Another program takes 20 MiB of the cache filesystem meanwhile.
        (cachefs / "other-program.bin").write_bytes(os.urandom(20 * MiB))
        deadline = time.monotonic() + 90
        while status_json(mount.path)["daemon"]["reserve"]["paused"] is None:
            assert time.monotonic() < deadline, "background fill never reached the reserve"
            time.sleep(0.5)
        answer = status_json(mount.path)
        assert answer["daemon"]["reserve"]["reserve"] == reserve
        assert "kept free (--min-free)" in answer["daemon"]["reserve"]["paused"]
        time.sleep(2)  # whatever was on its way has landed
        assert free_bytes(cachefs) >= reserve - MiB  # a chunk in flight at most, no more
        cached = next(f for f in answer["files"] if f["path"] == "big.bin")["cached_bytes"]
        assert 4 * MiB < cached < size - 16 * MiB
        assert "background downloads paused" in run_remotefs("status", "--once", mount.path).stdout
        assert "background downloads paused" in mount.log_text()
        # Reads go on, cached or not, anywhere in the file and in the other file.
        for offset in (size - 10 * MiB, size - MiB, 5 * MiB):
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                assert handle.read(MiB) == expected(11, offset, MiB)
        assert (mount.path / "other.bin").read_bytes() == expected(12, 0, 2 * MiB)
        mount.unmount()


def test_a_16_tib_file_reads_correctly_and_prefetch_planning_never_stalls_the_loop(
    tmp_path: Path,
    virtual_origin: VirtualOrigin,
    remotefs: MountFactory,
    root_required: None,
) -> None:
    size = 16 * TiB
    virtual_origin.files["huge.bin"] = VirtualFile(size, seed=13)
    rng = random.Random(16)
    with mounted_tmpfs(tmp_path / "cachefs", "512m") as cachefs:
        mount = remotefs.mount(
            [virtual_origin.url("huge.bin")],
            "--fill-idle",
            "1",
            "--min-free",
            "384M",
            "--fill-rate",
            "20M",
            cache_dir=cachefs / "cache",
            fill=True,
        )
        path = mount.path / "huge.bin"
        assert path.stat().st_size == size
        offsets = [0, size - 4096, size // 2 + 777, *(rng.randrange(size - MiB) for _ in range(24))]
        for offset in offsets:
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                assert handle.read(65536) == expected(13, offset, min(65536, size - offset))
        # Background fill leaves it alone: 16 TiB cannot fit (tests/test_fill_only_what_fits.py).
        # An explicit prefetch plans over the gaps the same way: 28 reads left about as many
        # gaps in 2^28 blocks, planned by gap, not by block. Wait until it has planned and
        # downloaded, then read the loop watchdog.
        before = virtual_origin.body_bytes("huge.bin")
        prefetch = subprocess.Popen(
            [*REMOTEFS, "prefetch", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: virtual_origin.body_bytes("huge.bin") >= before + 8 * MiB,
                60,
                "the prefetch to download",
            )
            wait_for(
                lambda: status_json(mount.path)["daemon"]["loop"]["checks"] > 100,
                60,
                "the loop watchdog's checks",
            )
            loop = status_json(mount.path)["daemon"]["loop"]
            assert loop["max_stall"] < 0.05, loop
            row = status_json(mount.path)["files"][0]
            assert row["prefetch"] is not None and row["prefetch"]["state"] == "running", row
        finally:
            prefetch.kill()
            prefetch.wait()
        assert "huge.bin: not completed in the background" in mount.log_text()
        mount.unmount()


@pytest.fixture(autouse=True)
def _tools(root_required: None) -> None:
    for tool in ("mkfs.ext4", "mount", "umount"):
        assert subprocess.run(["which", tool], capture_output=True).returncode == 0, tool
