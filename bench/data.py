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


def make_ext4_image(path: Path, work: Path, size_mib: int = 256) -> Path:
    """An ext4 image with a tree of files (made by mkfs.ext4 -d, no mounting needed).

    Returns the directory the image was populated from, to compare against.
    """
    content = work / "ext4-content"
    marker = path.with_suffix(".done")
    if path.exists() and marker.exists() and content.exists():
        return content
    rng = random.Random(2)
    for index in range(400):
        folder = content / f"dir{index % 20:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{index:04d}.bin").write_bytes(
            rng.randbytes(rng.choice([1000, 20000, 150000]))
        )
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(path), f"{size_mib}M"],
        check=True,
        capture_output=True,
    )
    marker.touch()
    return content
