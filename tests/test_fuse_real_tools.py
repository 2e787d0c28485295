"""Real tools on a real mount: `unzip -l` on a big archive and a loop-mounted ext4 image."""

from __future__ import annotations

import contextlib
import filecmp
import random
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .mounting import MountFactory
from .origin import Origin
from .requirements import require_loop_mount

ZIP_MEMBERS = 10_500


def make_zip(path: Path, members: int) -> int:
    """A stored (uncompressed) zip of *members* small random files; returns its size."""
    rng = random.Random(7)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(members):
            archive.writestr(f"dir{index % 50:02d}/member-{index:05d}.bin", rng.randbytes(8000))
    return path.stat().st_size


def test_unzip_lists_every_member_fetching_under_5_percent(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = make_zip(origin_root / "big.zip", ZIP_MEMBERS)
    mount = remotefs.mount([origin.url("big.zip")])
    origin.wait_idle()
    origin.reset_counters()
    result = subprocess.run(
        ["unzip", "-l", str(mount.path / "big.zip")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    listed = [line for line in result.stdout.splitlines() if "member-" in line]
    assert len(listed) == ZIP_MEMBERS
    assert result.stdout.rstrip().endswith(f"{ZIP_MEMBERS} files")
    origin.wait_idle()
    served = origin.bytes_served("/big.zip")
    assert 0 < served < 0.05 * size, f"served {served} of {size} bytes"


def make_ext4_image(source: Path, image: Path) -> None:
    """An ext4 image populated from *source* by mkfs.ext4 -d (no mounting needed)."""
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(source), str(image), "64M"],
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def loop_mounted(image: Path, target: Path) -> Iterator[Path]:
    """`mount -o loop,ro` *image* on *target*; always unmounted (and the loop device freed)."""
    require_loop_mount("ext4")
    target.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(target)], check=True, timeout=60)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, timeout=60)
        backing = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        assert backing.stdout == "", f"loop device left behind: {backing.stdout}"


def test_loop_mount_of_ext4_image_through_the_mount(
    root_required: None, origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    content = tmp_path / "content"
    rng = random.Random(3)
    for index, size in enumerate([0, 1, 4095, 4096, 70_000, 1_000_000, 5_000_000]):
        path = content / f"sub{index % 3}" / f"file{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    make_ext4_image(content, origin_root / "disk.img")
    mount = remotefs.mount([origin.url("disk.img")])
    with loop_mounted(mount.path / "disk.img", tmp_path / "disk") as disk:
        for path in content.rglob("*.bin"):
            inside = disk / path.relative_to(content)
            assert filecmp.cmp(path, inside, shallow=False), inside
        found = sorted(p.relative_to(disk) for p in disk.rglob("*.bin"))
        assert found == sorted(p.relative_to(content) for p in content.rglob("*.bin"))
    origin.wait_idle()
    image_size = (origin_root / "disk.img").stat().st_size
    # Only the blocks ext4 touched: metadata plus the files' data, not the empty space.
    assert origin.bytes_served("/disk.img") < image_size / 3
