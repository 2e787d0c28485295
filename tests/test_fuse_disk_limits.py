"""The cache filesystem's limits, through real mounts: a free-space reserve that background
downloads never touch, and a 16 TiB file whose fill planning never stalls the event loop.

The cache lives on a filesystem made for the test: a small ext4 image on a loop device (a
full disk is a real full disk), or a tmpfs (which holds a 16 TiB sparse file, as ext4 does
not).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import loop_ext4
from .mounting import MountFactory, force_unmount, run_remotefs, status_json
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024
TiB = 1 << 40


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    where = tmp_path / "cachefs"
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        force_unmount(where)
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def test_fill_stops_at_the_free_space_reserve_and_reads_go_on(
    tmp_path: Path,
    virtual_origin: VirtualOrigin,
    remotefs: MountFactory,
    root_required: None,
) -> None:
    virtual_origin.files["big.bin"] = VirtualFile(300 * MiB, seed=11)
    virtual_origin.files["other.bin"] = VirtualFile(2 * MiB, seed=12)
    reserve = 24 * MiB
    with loop_ext4(tmp_path, 96 * MiB) as cachefs:
        mount = remotefs.mount(
            [virtual_origin.url("big.bin"), virtual_origin.url("other.bin")],
            "--fill-idle",
            "0.3",
            "--min-free",
            "24M",
            cache_dir=cachefs / "cache",
            fill=True,
        )
        path = mount.path / "big.bin"
        with open(path, "rb", buffering=0) as handle:
            assert handle.read(MiB) == expected(11, 0, MiB)
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
        assert 40 * MiB < cached < 80 * MiB
        assert "background downloads paused" in run_remotefs("status", "--once", mount.path).stdout
        assert "background downloads paused" in mount.log_text()
        # Reads go on, cached or not, anywhere in the file and in the other file.
        for offset in (250 * MiB, 299 * MiB, 5 * MiB):
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                assert handle.read(MiB) == expected(11, offset, MiB)
        assert (mount.path / "other.bin").read_bytes() == expected(12, 0, 2 * MiB)
        mount.unmount()


def test_a_16_tib_file_reads_correctly_and_fill_planning_never_stalls_the_loop(
    tmp_path: Path,
    virtual_origin: VirtualOrigin,
    remotefs: MountFactory,
    root_required: None,
) -> None:
    size = 16 * TiB
    virtual_origin.files["huge.bin"] = VirtualFile(size, seed=13)
    rng = random.Random(16)
    with tmpfs(tmp_path, "512m") as cachefs:
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
        # 28 reads left about as many gaps in 2^28 blocks: fill plans over the gaps, not the
        # blocks. Wait until it has planned and downloaded, then read the loop watchdog.
        deadline = time.monotonic() + 60
        before = virtual_origin.body_bytes("huge.bin")
        while virtual_origin.body_bytes("huge.bin") < before + 8 * MiB:
            assert time.monotonic() < deadline, "background fill did not start"
            time.sleep(0.2)
        loop = status_json(mount.path)["daemon"]["loop"]
        assert loop["checks"] > 100
        assert loop["max_stall"] < 0.05, loop
        row = status_json(mount.path)["files"][0]
        assert row["state"] in ("filling", "partial")
        mount.unmount()


@pytest.fixture(autouse=True)
def _tools(root_required: None) -> None:
    for tool in ("mkfs.ext4", "mount", "umount"):
        assert subprocess.run(["which", tool], capture_output=True).returncode == 0, tool
