"""The filesystems under test: remotefs, and the peers when they are installed.

Each system mounts the named files of the origin and yields where they appear. Peers that
need a directory listing (rclone, httpdirfs) read the HTML index the benchmark origin serves
at ``/``; httpfs2 mounts one URL per mountpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .origin import ShapedOrigin


@dataclass
class MountedFiles:
    """Where each benchmark file appears, and the daemon's pid when known."""

    paths: dict[str, Path]
    pid: int | None = None
    #: remotefs only: the cache directory (to watch background fill on disk).
    cache_dir: Path | None = None

    def path(self, name: str) -> Path:
        return self.paths[name]


class System(Protocol):
    name: str
    persistent: bool

    def mounted(
        self, names: list[str], *, fresh: bool
    ) -> contextlib.AbstractContextManager[MountedFiles]: ...


def _unmount(path: Path) -> None:
    for command in (["fusermount3", "-u", str(path)], ["umount", "-l", str(path)]):
        if subprocess.run(command, capture_output=True, check=False).returncode == 0:
            return


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not appear within {timeout}s")


def _cache_and_mountpoint(work: Path, system: str, *, fresh: bool) -> tuple[Path, Path]:
    """*system*'s cache folder (emptied when *fresh*) and its mount point, under *work*."""
    cache = work / f"cache-{system}"
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    mountpoint = work / f"mnt-{system}"
    mountpoint.mkdir(exist_ok=True)
    return cache, mountpoint


class Remotefs:
    name = "remotefs"
    persistent = True

    def __init__(self, work: Path, origin: ShapedOrigin) -> None:
        self.work, self.origin = work, origin
        #: Background fill would add traffic to every workload; only the fill workload wants it.
        self.extra_args: list[str] = ["--no-fill"]

    @contextlib.contextmanager
    def mounted(self, names: list[str], *, fresh: bool) -> Iterator[MountedFiles]:
        cache, mountpoint = _cache_and_mountpoint(self.work, self.name, fresh=fresh)
        urls = self.work / "urls-remotefs.txt"
        urls.write_text("".join(f"{self.origin.url(name)}\n" for name in names))
        command = [sys.executable, "-m", "remotefs"]
        subprocess.run(
            [
                *command,
                "mount",
                str(urls),
                str(mountpoint),
                "--cache-dir",
                str(cache),
                *self.extra_args,
            ],
            check=True,
            capture_output=True,
        )
        try:
            pid = int(os.getxattr(mountpoint, "user.remotefs.pid"))
            yield MountedFiles({name: mountpoint / name for name in names}, pid, cache)
        finally:
            subprocess.run([*command, "unmount", str(mountpoint)], check=False, capture_output=True)


class Httpfs2:
    name = "httpfs2"
    persistent = False

    def __init__(self, work: Path, origin: ShapedOrigin) -> None:
        self.work, self.origin = work, origin

    @contextlib.contextmanager
    def mounted(self, names: list[str], *, fresh: bool) -> Iterator[MountedFiles]:
        mounts = []
        try:
            paths = {}
            for name in names:
                mountpoint = self.work / f"mnt-httpfs2-{name}"
                mountpoint.mkdir(exist_ok=True)
                subprocess.run(
                    ["httpfs2", self.origin.url(name), str(mountpoint)],
                    check=True,
                    capture_output=True,
                )
                mounts.append(mountpoint)
                paths[name] = mountpoint / name
                _wait_for(paths[name])
            yield MountedFiles(paths)
        finally:
            for mountpoint in mounts:
                _unmount(mountpoint)


class Rclone:
    name = "rclone"
    persistent = True

    def __init__(self, work: Path, origin: ShapedOrigin) -> None:
        self.work, self.origin = work, origin

    @contextlib.contextmanager
    def mounted(self, names: list[str], *, fresh: bool) -> Iterator[MountedFiles]:
        cache, mountpoint = _cache_and_mountpoint(self.work, self.name, fresh=fresh)
        subprocess.run(
            [
                "rclone",
                "mount",
                ":http:",
                str(mountpoint),
                "--http-url",
                self.origin.url(""),
                "--vfs-cache-mode",
                "full",
                "--cache-dir",
                str(cache),
                "--read-only",
                "--daemon",
            ],
            check=True,
            capture_output=True,
        )
        try:
            _wait_for(mountpoint / names[0])
            yield MountedFiles({name: mountpoint / name for name in names})
        finally:
            _unmount(mountpoint)
            time.sleep(1)  # rclone writes its cache metadata on the way out


class Httpdirfs:
    name = "httpdirfs"
    persistent = True

    def __init__(self, work: Path, origin: ShapedOrigin) -> None:
        self.work, self.origin = work, origin

    @contextlib.contextmanager
    def mounted(self, names: list[str], *, fresh: bool) -> Iterator[MountedFiles]:
        cache, mountpoint = _cache_and_mountpoint(self.work, self.name, fresh=fresh)
        cache.mkdir(exist_ok=True)
        subprocess.run(
            [
                "httpdirfs",
                "--cache",
                "--cache-location",
                str(cache),
                self.origin.url(""),
                str(mountpoint),
            ],
            check=True,
            capture_output=True,
        )
        try:
            _wait_for(mountpoint / names[0])
            yield MountedFiles({name: mountpoint / name for name in names})
        finally:
            _unmount(mountpoint)


def available_systems(work: Path, origin: ShapedOrigin, wanted: str) -> list[System]:
    """remotefs always; each peer when its binary is on PATH (and wanted)."""
    candidates: list[System] = [Remotefs(work, origin)]
    for peer, binary in ((Httpfs2, "httpfs2"), (Rclone, "rclone"), (Httpdirfs, "httpdirfs")):
        if shutil.which(binary):
            candidates.append(peer(work, origin))
    if wanted != "all":
        chosen = set(wanted.split(","))
        candidates = [system for system in candidates if system.name in chosen]
    return candidates
