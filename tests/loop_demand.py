"""The kernel's own demand: what it reads from a local loop device for a workload on an image.

A remote image should cost what the kernel reads of it, so the yardstick is measured, not
guessed: the image is attached to a loop device (``losetup``), the page cache is dropped,
the workload runs on its mount, and ``/sys/block/loopN/stat`` (sectors read) says how
many bytes the kernel asked of the device, libblkid's probes included. Used by the tests
(`tests/test_fuse_images.py`) and the benchmark (`bench/images.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def drop_page_cache() -> None:
    """Write dirty pages back and drop the page cache (root only): cold means cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def loop_sectors_read() -> dict[str, int]:
    """Sectors read so far by every loop device (field 3 of /sys/block/loopN/stat)."""
    counts = {}
    for stat in Path("/sys/block").glob("loop*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            counts[stat.parent.name] = int(stat.read_text().split()[2])
    return counts


@contextlib.contextmanager
def mounted(source: Path, target: Path, options: str) -> Iterator[Path]:
    """``mount -o options source target``; unmounted whatever happens."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-o", options, str(source), str(target)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True, timeout=600)


def run_workload(target: Path, files: list[str], reader: str) -> str:
    """``find`` over the mounted image, then *reader* of *files*; a digest of what it printed.

    The reader's output (``sha256sum``'s lines, ``cat``'s bytes) is the same wherever the
    image is mounted: the mountpoint is taken out before it is hashed.
    """
    subprocess.run(["find", str(target)], check=True, stdout=subprocess.DEVNULL, timeout=1800)
    result = subprocess.run(
        [reader, *(str(target / name) for name in files)],
        check=True,
        stdout=subprocess.PIPE,
        timeout=1800,
    )
    printed = result.stdout
    if reader != "cat":
        printed = printed.replace(os.fsencode(target), b"")
    return hashlib.sha256(printed).hexdigest()


@dataclass
class Demand:
    """What the kernel read from the local loop device, how long it took, what it printed."""

    bytes: int
    seconds: float
    output: str


def kernel_demand(image: Path, files: list[str], reader: str, where: Path) -> Demand:
    """Bytes the kernel reads from a local loop device of *image* for the workload."""
    device = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    name = Path(device).name
    try:
        drop_page_cache()
        before = loop_sectors_read()[name]
        started = time.monotonic()
        with mounted(Path(device), where, "ro") as target:
            output = run_workload(target, files, reader)
        seconds = time.monotonic() - started
        read = loop_sectors_read()[name] - before
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
    return Demand(read * 512, seconds, output)


@dataclass
class LoopRun:
    """The workload on a loop mount of a file: its time, its output, the device's reads."""

    seconds: float
    output: str
    loop_bytes: int


def loop_mount_run(image: Path, files: list[str], reader: str, where: Path) -> LoopRun:
    """``mount -o loop,ro`` of *image* (a file in some mount), then the workload."""
    before = loop_sectors_read()
    started = time.monotonic()
    with mounted(image, where, "loop,ro") as target:
        output = run_workload(target, files, reader)
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(target)], capture_output=True, text=True
        ).stdout.strip()
        name = Path(source).name
        loop_bytes = (loop_sectors_read().get(name, 0) - before.get(name, 0)) * 512
    seconds = time.monotonic() - started
    wait_detached(image)
    return LoopRun(seconds, output, loop_bytes)


def wait_detached(image: Path, timeout: float = 20) -> None:
    """Wait until no loop device holds *image* (autoclear detaches after umount returns).

    Until then the file is open, and the filesystem it lives in cannot be unmounted.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        if not held.stdout.strip():
            return
        time.sleep(0.05)


def digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
