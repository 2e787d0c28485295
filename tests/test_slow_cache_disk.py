"""A slow cache disk slows the downloads that write to it, never the daemon's other answers.

The cache directory lives on tests/slow_disk.py: a FUSE passthrough whose every write and
fsync waits 50 ms (FUSE cuts a 1 MiB write into 128 KiB requests: 0.4 s per MiB). A 1 TiB
sparse file is being filled there (the passthrough reports 4 TiB free, so it fits), and a
watchdog asks the mount for attributes (getxattr, which FUSE never caches, and getattr) the
whole time, until the slow disk has taken 60 delayed writes (3 s of waiting on the disk). With
cache writes on the event loop, each of those writes held every request behind it; now none
may take 100 ms. The daemon's own loop monitor must agree.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .mounting import MountFactory, force_unmount, is_mounted, status_json, wait_for
from .virtual_origin import VirtualFile, VirtualOrigin, expected

ROOT = Path(__file__).resolve().parent.parent
TIB = 1 << 40
DELAY = 0.05
#: Delayed writes the watchdog must live through.
WRITES = 60
LIMIT = 0.1


@contextlib.contextmanager
def slow_disk(base: Path) -> Iterator[tuple[Path, Path]]:
    """The mounted slow disk, and the file that counts its delayed writes."""
    backing, mountpoint, counter = base / "backing", base / "slow", base / "writes"
    backing.mkdir(mode=0o700)
    mountpoint.mkdir()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.slow_disk", str(backing), str(mountpoint)),
            *("--delay", str(DELAY), "--counter", str(counter)),
        ],
        cwd=ROOT,
    )
    try:
        wait_for(lambda: is_mounted(mountpoint), 20, "the slow disk to mount")
        yield mountpoint, counter
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        force_unmount(mountpoint)


def delayed_writes(counter: Path) -> int:
    try:
        return int(counter.read_text() or 0)
    except (OSError, ValueError):
        return 0


class Watchdog(threading.Thread):
    """Asks the mount for a file's attributes in a loop, and keeps the slowest answer."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.slowest = {"getxattr": 0.0, "getattr": 0.0}
        self.asked = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for what, ask in (
                ("getxattr", lambda: os.getxattr(self.path, "user.remotefs.complete")),
                ("getattr", lambda: os.stat(self.path)),
            ):
                began = time.monotonic()
                ask()
                self.slowest[what] = max(self.slowest[what], time.monotonic() - began)
            self.asked += 1
            time.sleep(0.005)


def test_filling_a_1_tib_file_on_a_slow_disk_never_holds_up_other_requests(
    virtual_origin: VirtualOrigin, remotefs: MountFactory, tmp_path: Path, root_required: None
) -> None:
    virtual_origin.files["huge.bin"] = VirtualFile(TIB, seed=5)
    with slow_disk(tmp_path) as (disk, counter):
        mount = remotefs.mount(
            [virtual_origin.url("huge.bin")],
            "--fill-idle",
            "0.2",
            cache_dir=disk / "cache",
            fill=True,
        )
        path = mount.path / "huge.bin"
        with open(path, "rb", buffering=0) as handle:  # opened: --fill opened completes it
            assert handle.read(4096) == expected(5, 0, 4096)
        watchdog = Watchdog(path)
        watchdog.start()
        try:
            start = delayed_writes(counter)
            wait_for(
                lambda: delayed_writes(counter) >= start + WRITES,
                120,
                f"{WRITES} delayed writes on the slow disk",
            )
        finally:
            watchdog.stop.set()
            watchdog.join(30)
        slowest = watchdog.slowest
        assert max(slowest.values()) < LIMIT, f"slowest answers while filling: {slowest}"
        assert watchdog.asked > 20, watchdog.asked
        assert "huge.bin: not completed in the background" not in mount.log_text()
        assert virtual_origin.body_bytes("huge.bin") > 2 * 1024 * 1024, "the fill did not run"
        loop = status_json(mount.path)["daemon"]["loop"]
        assert loop["max_stall"] < LIMIT, loop
        mount.unmount()
