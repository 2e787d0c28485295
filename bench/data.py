"""Generated benchmark data: a large random file, a zip of many members, an ext4 image.

Data is made at run time (never committed) and reused between runs in the work directory
when it already has the requested shape, because making a GiB of random bytes and an ext4
image takes longer than some of the workloads.
"""

from __future__ import annotations

import os
import random
import subprocess
import zipfile
from pathlib import Path

MiB = 1024 * 1024


def make_random_file(path: Path, size: int) -> None:
    """*size* random bytes (reused when a file of that size exists)."""
    if path.exists() and path.stat().st_size == size:
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        remaining = size
        while remaining:
            chunk = min(remaining, 16 * MiB)
            out.write(os.urandom(chunk))
            remaining -= chunk
    tmp.replace(path)


def make_zip(path: Path, members: int) -> None:
    """A stored zip of *members* small random files, like a source or photo archive."""
    marker = path.with_suffix(f".{members}x10000.done")
    if path.exists() and marker.exists():
        return
    rng = random.Random(1)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(members):
            archive.writestr(f"d{index % 100:02d}/m{index:06d}.bin", rng.randbytes(10_000))
    marker.touch()


def make_ext4_content(work: Path) -> Path:
    """The tree of files both ext4 images hold: 400 files of 1 KB to 150 KB in 20 folders."""
    content = work / "ext4-content"
    if content.exists():
        return content
    rng = random.Random(2)
    for index in range(400):
        folder = content / f"dir{index % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{index:04d}.bin").write_bytes(
            rng.randbytes(rng.choice([1000, 20000, 150000]))
        )
    return content


def make_ext4_image(path: Path, content: Path, size_mib: int = 256) -> None:
    """A packed ext4 image of *content*: mkfs.ext4 -d writes the files one after another."""
    marker = path.with_suffix(".done")
    if path.exists() and marker.exists():
        return
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(path), f"{size_mib}M"],
        check=True,
        capture_output=True,
    )
    marker.touch()


def make_spread_ext4_image(path: Path, content: Path, work: Path, size_mib: int = 1024) -> None:
    """An ext4 image of *content* populated through a mount, the way most images are made.

    The kernel's allocator spreads top-level folders over the block groups (128 MiB each),
    so the same files lie all over a 1 GiB image instead of packed at its start. This is
    the image the issue's reference figures describe (rclone reading 550-700 MiB for 29 MiB
    of files); a tool that streams big chunks around every miss pays for it here. Needs
    root (loop mount), as the ext4 workloads do.
    """
    marker = path.with_suffix(".done")
    if path.exists() and marker.exists():
        return
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(path), f"{size_mib}M"], check=True, capture_output=True
    )
    target = work / "ext4-populate"
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(path), str(target)], check=True)
    try:
        for folder in sorted(content.iterdir()):
            subprocess.run(["cp", "-a", str(folder), str(target)], check=True)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    marker.touch()
