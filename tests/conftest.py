"""Shared fixtures: a real origin on 127.0.0.1, real FUSE mounts, generated test data."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotefs.config.options import MountOptions

from .debs import DebBuilds
from .kernel import GAPS, KERNEL
from .mounting import MountFactory
from .origin import Origin
from .other_users import local_users, sticky_dir
from .requirements import IN_CI, require_loop_mount, unavailable
from .serving import ServeFactory
from .virtual_origin import VirtualOrigin

__all__ = ["IN_CI"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per part of a test that did not run because the kernel lacks a feature."""
    if not GAPS:
        return
    terminalreporter.section("parts not run: this machine's kernel lacks a feature")
    for gap in dict.fromkeys(GAPS):
        terminalreporter.line(gap.line())


@pytest.fixture(scope="session")
def fuse_available() -> None:
    """FUSE tests need /dev/fuse: in CI its absence fails the run, elsewhere it skips (FUSE is
    the one kernel feature the suite requires: tests/requirements.py)."""
    problem = KERNEL.fuse_problem()
    if problem is not None:
        unavailable(f"FUSE is required: {problem}")


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    """Two real local users, an attacker and a victim: their uids (tests/other_users.py)."""
    with local_users() as uids:
        yield uids


@pytest.fixture
def sticky_tmp() -> Iterator[Path]:
    """A root-owned sticky directory everyone may write to, as /tmp is (removed after)."""
    with sticky_dir() as path:
        yield path


@pytest.fixture(scope="session")
def root_required() -> None:
    """Loop mounts need root: in CI its absence fails the run, elsewhere it skips."""
    if os.geteuid() != 0:
        unavailable("these tests need root (loop mounts)")


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    root.mkdir()
    return root


@pytest.fixture
def origin(origin_root: Path) -> Iterator[Origin]:
    """A running origin serving *origin_root*; stopped at the end of the test."""
    with Origin(origin_root) as server:
        yield server


@pytest.fixture
def remotefs(fuse_available: None, tmp_path: Path) -> Iterator[MountFactory]:
    """Mount factory; every mount it made is unmounted and its daemon reaped at the end."""
    factory = MountFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeFactory]:
    """`remotefs serve` factory; every server it started is stopped at the end."""
    factory = ServeFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


def need_tool(tool: str, package: str) -> str:
    """The path of *tool*; in CI its absence fails the test (setup installs *package*),
    elsewhere it skips."""
    found = shutil.which(tool)
    if found is not None:
        return found
    unavailable(f"{tool} is missing (Debian package {package}; scripts/setup.sh test installs it)")


@pytest.fixture(scope="session")
def built_debs(tmp_path_factory: pytest.TempPathFactory) -> DebBuilds:
    """The project's .deb per Debian release, built at most once per session (tests/debs.py)."""
    return DebBuilds(tmp_path_factory.mktemp("debs"))


def write_random(path: Path, size: int, seed: int = 0) -> bytes:
    """Write *size* pseudo-random bytes to *path* (fast for hundreds of MiB) and return them."""
    data = os.urandom(size) if seed == 0 else _seeded(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _seeded(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def make_options(
    tmp_path: Path,
    *,
    read_deadline: float = 3,
    stall_timeout: float = 2,
    connect_timeout: float = 2,
    min_request: int = 256 * 1024,
) -> MountOptions:
    """Options for layer tests: short deadlines so failures end in seconds."""
    return MountOptions(
        cache_dir=tmp_path / "cache",
        read_deadline=read_deadline,
        probe_timeout=3,
        stall_timeout=stall_timeout,
        connect_timeout=connect_timeout,
        min_request=min_request,
    )


def read_direct(path: Path, offset: int, size: int = 4096) -> bytes:
    """Read with O_DIRECT, so the read reaches the daemon instead of the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = bytearray(size)
        count = os.preadv(fd, [memoryview(buffer)], offset)
        return bytes(buffer[:count])
    finally:
        os.close(fd)


@pytest.fixture
def virtual_origin() -> Iterator[VirtualOrigin]:
    """An origin of virtual files (any size, any number); see `tests.virtual_origin`."""
    with VirtualOrigin() as server:
        yield server


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* mounted at *where* (made here, mode 0700); unmounted afterwards.

    For a cache filesystem of a known, small size (its free space is what a test is about).
    """
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def loop_ext4(tmp_path: Path, size: int) -> Iterator[Path]:
    """An ext4 filesystem of *size* bytes on a loop device, mounted; removed afterwards.

    For tests whose cache must live on a filesystem with known limits (ext4 holds files of
    at most 16 TiB - 4 KiB) or a small size (a full disk is a real full disk).
    """
    require_loop_mount("ext4")
    image, where = tmp_path / "cachefs.img", tmp_path / "cachefs"
    with open(image, "wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
