"""Disk images made by the real tools, in shapes drawn at random from a seed.

The open-time format hints (`remotefs.formats`) and the working-region rules are judged on
images like the ones users mount: ext4 made by mkfs.ext4 and filled *through a mount* (so
the kernel's allocator spreads directories and files over the block groups), squashfs from
mksquashfs, ISO 9660 from xorriso, zips from zip. A shape (`TreeShape`) says how many files
of which sizes in which directory layout; `random_shape` draws one, so the tests and the
benchmark do not only see the shapes the heuristics were tuned on.

Both the tests and the benchmark (`bench/images.py`) use these makers; nothing here is
committed as data.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class TreeShape:
    """A tree of files: how many, how big (log-uniform between the bounds), where."""

    files: int
    min_size: int
    max_size: int
    #: Directories at the top, and below each of them (0: files go into the top ones).
    top_dirs: int
    sub_dirs: int = 0
    #: Extra levels of single directories below each sub directory (a deep tree).
    depth: int = 0
    seed: int = 0
    #: The most all files may hold together (the largest are halved until they fit).
    max_total: int | None = None

    def describe(self) -> str:
        dirs = f"{self.top_dirs}x{self.sub_dirs}" if self.sub_dirs else f"{self.top_dirs}"
        if self.depth:
            dirs += f" (+{self.depth} deep)"
        return (
            f"{self.files} files of {_human(self.min_size)}-{_human(self.max_size)} in {dirs} dirs"
        )


def _human(size: int) -> str:
    for unit, scale in (("M", MiB), ("K", KiB)):
        if size >= scale:
            return f"{size / scale:g}{unit}"
    return f"{size}B"


def random_shape(seed: int, *, max_files: int = 400, max_size: int = 4 * MiB) -> TreeShape:
    """A shape drawn from *seed*: file count, size range and directory layout all vary."""
    rng = random.Random(seed)
    top = rng.choice([1, 3, 7, 20])
    return TreeShape(
        files=rng.randint(max(1, max_files // 8), max_files),
        min_size=rng.choice([1, 100, 4 * KiB, 30 * KiB]),
        max_size=rng.choice([64 * KiB, 1 * MiB, max_size]),
        top_dirs=top,
        sub_dirs=rng.choice([0, 0, 3, 12]),
        depth=rng.choice([0, 0, 0, 4]),
        seed=seed,
    )


def plan_tree(shape: TreeShape) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every file of *shape*, in the order they are written."""
    rng = random.Random(shape.seed)
    dirs: list[str] = []
    for top in range(shape.top_dirs):
        subs = [f"d{top:02d}/s{sub:02d}" for sub in range(shape.sub_dirs)] or [f"d{top:02d}"]
        for sub in subs:
            dirs.append(sub + "".join(f"/deep{level}" for level in range(shape.depth)))
    low, high = math.log(max(1, shape.min_size)), math.log(max(1, shape.max_size))
    files = []
    for index in range(shape.files):
        size = int(math.exp(rng.uniform(low, high))) if high > low else shape.max_size
        files.append((f"{rng.choice(dirs)}/f{index:05d}.bin", size))
    if shape.max_total is not None:
        sizes = [size for _, size in files]
        while sum(sizes) > shape.max_total and max(sizes) > shape.min_size:
            largest = sizes.index(max(sizes))
            sizes[largest] = max(shape.min_size, sizes[largest] // 2)
        files = [(path, size) for (path, _), size in zip(files, sizes, strict=True)]
    # Written directory by directory, as cp -a or tar would.
    files.sort()
    return files


def write_tree(root: Path, shape: TreeShape) -> list[tuple[str, int]]:
    """Write *shape*'s files under *root* (existing or not); return the plan."""
    plan = plan_tree(shape)
    rng = random.Random(shape.seed + 1)
    for relative, size in plan:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            remaining = size
            while remaining:
                chunk = min(remaining, 4 * MiB)
                out.write(rng.randbytes(chunk))
                remaining -= chunk
    return plan


@contextlib.contextmanager
def loop_mount(image: Path, target: Path, *, read_only: bool = True) -> Iterator[Path]:
    """Mount *image* on *target* through a loop device; unmounted whatever happens."""
    target.mkdir(parents=True, exist_ok=True)
    options = "loop,ro" if read_only else "loop"
    subprocess.run(
        ["mount", "-o", options, str(image), str(target)], check=True, capture_output=True
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True)


def make_ext4(
    image: Path,
    size: int,
    shape: TreeShape,
    *,
    flex_bg: bool = True,
    journal: bool = True,
    kind: str = "ext4",
    mkfs_args: tuple[str, ...] = (),
) -> list[tuple[str, int]]:
    """An ext2/3/4 (or xfs, btrfs) image of *size* bytes, filled with *shape* through a mount.

    Filled through a mount, not ``mkfs -d``: the kernel's allocator spreads directories over
    the block groups (Orlov) and places files near them, as in images made the usual way.
    """
    image.unlink(missing_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size)
    features = []
    if not flex_bg:
        features.append("^flex_bg")
    if not journal and kind != "ext2":
        features.append("^has_journal")
    command = ["mkfs." + kind, "-q", "-F"]
    if kind in ("xfs", "btrfs"):  # formats without a parser in remotefs: the fallback rules
        command = ["mkfs." + kind, "-q", "-f"]
    elif features:
        command += ["-O", ",".join(features)]
    subprocess.run([*command, *mkfs_args, str(image)], check=True, capture_output=True)
    target = image.with_name(image.name + ".fill")
    try:
        with loop_mount(image, target, read_only=False):
            plan = write_tree(target, shape)
    finally:
        with contextlib.suppress(OSError):
            target.rmdir()
    return plan


def make_squashfs(
    image: Path, shape: TreeShape, work: Path, *, compressor: str = "gzip"
) -> list[tuple[str, int]]:
    """A squashfs image of *shape* made by mksquashfs."""
    content = work / f"{image.name}.content"
    shutil.rmtree(content, ignore_errors=True)
    plan = write_tree(content, shape)
    image.unlink(missing_ok=True)
    try:
        subprocess.run(
            ["mksquashfs", str(content), str(image), "-noappend", "-quiet", "-comp", compressor],
            check=True,
            capture_output=True,
        )
    finally:
        shutil.rmtree(content, ignore_errors=True)
    return plan


def make_iso(image: Path, shape: TreeShape, work: Path, *, tool: str = "xorriso") -> None:
    """An ISO 9660 image (Rock Ridge and Joliet) of *shape*, by xorriso or genisoimage."""
    content = work / f"{image.name}.content"
    shutil.rmtree(content, ignore_errors=True)
    write_tree(content, shape)
    image.unlink(missing_ok=True)
    if tool == "xorriso":
        command = ["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-o", str(image)]
    else:
        command = ["genisoimage", "-quiet", "-R", "-J", "-o", str(image)]
    try:
        subprocess.run([*command, str(content)], check=True, capture_output=True)
    finally:
        shutil.rmtree(content, ignore_errors=True)


def make_zip_tool(image: Path, shape: TreeShape, work: Path, *, store: bool = False) -> None:
    """A zip of *shape* made by Info-ZIP's zip."""
    content = work / f"{image.name}.content"
    shutil.rmtree(content, ignore_errors=True)
    write_tree(content, shape)
    image.unlink(missing_ok=True)
    command = ["zip", "-q", "-r", *(["-0"] if store else []), str(image.resolve()), "."]
    try:
        subprocess.run(command, check=True, capture_output=True, cwd=content)
    finally:
        shutil.rmtree(content, ignore_errors=True)


def required_tools() -> dict[str, str]:
    """The Debian package of every tool these makers run (scripts/setup.sh installs them)."""
    return {
        "mkfs.ext4": "e2fsprogs",
        "mksquashfs": "squashfs-tools",
        "xorriso": "xorriso",
        "genisoimage": "genisoimage",
        "zip": "zip",
        "unzip": "unzip",
    }


def missing_tools() -> list[str]:
    """Tools of `required_tools` not on PATH."""
    return [tool for tool in required_tools() if shutil.which(tool) is None]


def sparse_copy(source: Path, target: Path) -> None:
    """Copy an image keeping its holes (origins serve the copy; the original may be reused)."""
    subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
    os.utime(target)
