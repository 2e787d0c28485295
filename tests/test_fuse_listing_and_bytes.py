"""A real mount of a real origin: names, sizes, mtimes, and every byte compared with the origin."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import write_random
from .mounting import MountFactory
from .origin import Origin

BLOCK = 64 * 1024


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256sum(path: Path) -> str:
    """The real sha256sum tool, reading through the mount."""
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def test_listing_shows_sizes_mtimes_and_nested_directories(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "a.bin", 1000)
    write_random(origin_root / "deep" / "b.bin", 70000)
    os.utime(origin_root / "a.bin", (1_600_000_000, 1_600_000_000))
    mount = remotefs.mount(
        [
            origin.url("a.bin"),
            f"{origin.url('deep/b.bin')} isos/nested/renamed b.bin",
            "# a comment",
            "",
        ]
    )
    assert sorted(os.listdir(mount.path)) == ["a.bin", "isos"]
    assert os.listdir(mount.path / "isos") == ["nested"]
    assert os.listdir(mount.path / "isos" / "nested") == ["renamed b.bin"]
    for local, remote in [
        (mount.path / "a.bin", origin_root / "a.bin"),
        (mount.path / "isos" / "nested" / "renamed b.bin", origin_root / "deep" / "b.bin"),
    ]:
        seen, truth = local.stat(), remote.stat()
        assert seen.st_size == truth.st_size
        assert int(seen.st_mtime) == int(truth.st_mtime)  # Last-Modified has 1 s precision
        assert seen.st_mode & 0o777 == 0o444
        assert seen.st_uid == os.getuid()
    assert (mount.path / "isos").stat().st_mode & 0o777 == 0o555
    # `ls -l` agrees (it is what users look at).
    listing = subprocess.run(
        ["ls", "-l", "--time-style=+%s", str(mount.path)], capture_output=True, text=True
    ).stdout
    assert " 1000 1600000000 a.bin" in listing


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_small_files_hash_equal_to_origin(
    size: int, origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "f.bin", size)
    mount = remotefs.mount([origin.url("f.bin")])
    assert (mount.path / "f.bin").stat().st_size == size
    assert sha256sum(mount.path / "f.bin") == sha256_of(origin_root / "f.bin")


def test_large_file_hash_equal_to_origin(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 300 * 1024 * 1024 + 12345
    write_random(origin_root / "big.iso", size)
    mount = remotefs.mount([origin.url("big.iso")])
    assert sha256sum(mount.path / "big.iso") == sha256_of(origin_root / "big.iso")
    origin.wait_idle()
    # Every byte crossed the wire once, plus the 1-byte probe.
    assert origin.bytes_served("/big.iso") <= size + 1


def _drop_page_cache(fd: int) -> None:
    """Make the next read of *fd* reach the daemon instead of the kernel's page cache."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


FILE_SIZE = 5 * BLOCK * 16 + 4321  # ~5 MiB, deliberately not block aligned


@pytest.fixture
def random_read_mount(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> Iterator[tuple[int, bytes]]:
    data = write_random(origin_root / "r.bin", FILE_SIZE)
    mount = remotefs.mount([origin.url("r.bin")], "--min-request", "64K")
    fd = os.open(mount.path / "r.bin", os.O_RDONLY)
    try:
        yield fd, data
    finally:
        os.close(fd)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    offset=st.one_of(
        st.integers(0, FILE_SIZE + BLOCK),
        # Offsets near block boundaries and near EOF, where off-by-one errors live.
        st.integers(1, FILE_SIZE // BLOCK + 1).flatmap(
            lambda b: st.integers(b * BLOCK - 3, b * BLOCK + 3)
        ),
        st.integers(FILE_SIZE - 5, FILE_SIZE + 5),
    ),
    length=st.one_of(st.integers(0, 3 * BLOCK), st.sampled_from([1, BLOCK, BLOCK + 1])),
)
def test_random_reads_equal_origin_bytes(
    random_read_mount: tuple[int, bytes], offset: int, length: int
) -> None:
    fd, data = random_read_mount
    offset = max(0, offset)
    _drop_page_cache(fd)
    assert os.pread(fd, length, offset) == data[offset : offset + length]


def test_writes_are_refused_with_erofs(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "f.bin", 10)
    mount = remotefs.mount([origin.url("f.bin")])
    attempts = [
        lambda: os.open(mount.path / "f.bin", os.O_RDWR),
        lambda: os.open(mount.path / "new.bin", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(mount.path / "d"),
        lambda: os.rename(mount.path / "f.bin", mount.path / "g.bin"),
        lambda: os.unlink(mount.path / "f.bin"),
        lambda: os.chmod(mount.path / "f.bin", 0o644),
        lambda: os.truncate(mount.path / "f.bin", 0),
        lambda: os.setxattr(mount.path / "f.bin", "user.x", b"1"),
        lambda: os.symlink("f.bin", mount.path / "link"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert (mount.path / "f.bin").read_bytes() == (origin_root / "f.bin").read_bytes()
