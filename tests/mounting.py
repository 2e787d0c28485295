"""Run the real `remotefs` command against a real FUSE mount, and always clean up after it.

Tests use `MountFactory` (through the ``remotefs`` fixture): each mount is a separate daemon
process started exactly as a user would start it, and every mount is unmounted (and its daemon
killed if need be) when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotefs.daemon.process import wait_for_exit

REMOTEFS = [sys.executable, "-m", "remotefs"]


def run_remotefs(
    *args: str | os.PathLike[str], timeout: float = 60, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the remotefs CLI and capture its output (*prefix*: a wrapper command, e.g. a
    shell that lowers the file-descriptor limit first)."""
    return subprocess.run(
        [*prefix, *REMOTEFS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def with_fd_limit(limit: int) -> list[str]:
    """A `run_remotefs` prefix that runs the command with ``ulimit -n`` *limit* (soft and hard)."""
    return ["bash", "-c", f'ulimit -n {limit} && exec "$@"', "with-fd-limit"]


def mounted_paths() -> set[str]:
    """Mountpoints currently in the mount table."""
    with open("/proc/self/mounts", encoding="utf-8") as table:
        return {line.split(" ")[1].replace("\\040", " ") for line in table}


def is_mounted(path: Path) -> bool:
    """True when *path* is a mountpoint (live or stale)."""
    return str(path) in mounted_paths()


def daemon_pid(mountpoint: Path) -> int | None:
    """The daemon's pid, which it reports in an xattr of the mount root."""
    try:
        return int(os.getxattr(mountpoint, "user.remotefs.pid"))
    except (OSError, ValueError):
        return None


def force_unmount(mountpoint: Path) -> None:
    """Unmount whatever is at *mountpoint*, live or stale, without waiting for anyone."""
    for command in (
        ["fusermount3", "-u", "-z", str(mountpoint)],
        ["umount", "-l", str(mountpoint)],
    ):
        if not is_mounted(mountpoint):
            return
        subprocess.run(command, capture_output=True, check=False, timeout=30)


@dataclass
class Mount:
    """One running mount."""

    path: Path
    cache_dir: Path
    urls_file: Path
    pid: int

    @property
    def log_file(self) -> Path:
        return self.cache_dir / "remotefs.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def unmount(self) -> None:
        """Unmount the way users do, and wait for the daemon to save its state and exit."""
        result = run_remotefs("unmount", self.path)
        assert result.returncode == 0, result.stderr
        assert wait_for_exit(self.pid, 30)
        assert not is_mounted(self.path)

    def kill(self) -> None:
        """kill -9 the daemon (leaves a stale mount behind, as a crash does)."""
        os.kill(self.pid, signal.SIGKILL)
        assert wait_for_exit(self.pid, 10)


@dataclass
class MountFactory:
    """Creates mounts for one test and tears every one of them down at the end."""

    base: Path
    mounts: list[Mount] = field(default_factory=list)
    counter: int = 0

    def write_urls(self, lines: list[str], name: str = "urls.txt") -> Path:
        path = self.base / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def mount(
        self,
        lines: list[str] | None = None,
        *args: str,
        urls_file: Path | None = None,
        source: str | None = None,
        cache_dir: Path | None = None,
        mountpoint: Path | None = None,
        fill: bool = False,
        prefix: Sequence[str] = (),
    ) -> Mount:
        """Mount *lines* (or *urls_file*, or *source*: a URL) and return once it answers.

        Background fill is off unless *fill*: it would add origin traffic at unpredictable
        moments to tests that count bytes.
        """
        self.counter += 1
        if urls_file is None and source is None:
            assert lines is not None
            urls_file = self.write_urls(lines, f"urls{self.counter}.txt")
        what = source if source is not None else urls_file
        assert what is not None
        cache_dir = cache_dir or self.base / "cache"
        mountpoint = mountpoint or self.base / "mnt"
        mountpoint.mkdir(exist_ok=True)
        extra = args if fill else ("--no-fill", *args)
        result = run_remotefs(
            "mount", what, mountpoint, "--cache-dir", cache_dir, *extra, prefix=prefix
        )
        assert result.returncode == 0, f"mount failed: {result.stderr}"
        assert is_mounted(mountpoint), "remotefs mount returned before the mount was ready"
        pid = daemon_pid(mountpoint)
        assert pid is not None
        mount = Mount(mountpoint, cache_dir, urls_file or Path(os.devnull), pid)
        self.mounts.append(mount)
        return mount

    def cleanup(self) -> None:
        for mount in self.mounts:
            if is_mounted(mount.path):
                run_remotefs("unmount", mount.path, timeout=60)
            force_unmount(mount.path)
            with contextlib.suppress(ProcessLookupError):
                if not wait_for_exit(mount.pid, 5):
                    os.kill(mount.pid, signal.SIGKILL)
                    wait_for_exit(mount.pid, 5)


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "it") -> None:
    """Poll *condition* until it holds; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status_json(mountpoint: Path, *, every: bool = True) -> dict[str, Any]:
    """``remotefs status --json`` of a mount (every row unless *every* is False)."""
    result = run_remotefs("status", "--json", *(["--all"] if every else []), mountpoint)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def read_at(path: Path, offset: int, size: int) -> bytes:
    """*size* bytes of *path* at *offset*, through an unbuffered file object."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        return handle.read(size)


def read_fails_with_eio(path: Path, first: int | None = None) -> bool:
    """True when reading *path* (whole, or its *first* bytes) fails with EIO."""
    try:
        with path.open("rb", buffering=0) as handle:
            if first is not None:
                handle.read(first)
            else:
                while handle.read(1 << 20):
                    pass
    except OSError as err:
        return err.errno == errno.EIO
    return False
