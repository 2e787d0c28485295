"""What the kernel under the test suite can do, read the way the kernel itself reports it.

Machines of the same kind do not all run the same kernel: one has autofs and iso9660, the next
has neither (no ``autofs`` line in /proc/filesystems, no /dev/autofs, no modules to load). A
test that needs such a feature asks here first. Where the feature is missing, the test runs
every part that does not need it and skips only the rest, saying so in one line (see
`lacking`); a missing *tool* is different: under CI=true it fails the run (tests/requirements.py).

How each feature is detected:

- a filesystem type: a line of /proc/filesystems. A type built as a module is listed only once
  loaded, so a missing one is asked for once with ``modprobe -q fs-TYPE`` (the alias the
  kernel's own mount(2) path requests) and /proc/filesystems read again;
- autofs: the filesystem type and the misc device node /dev/autofs, because systemd starts
  automount units only where that node exists (and systemd-nspawn can only pass it on then);
- loop devices: /dev/loop-control (or a ``loop-control`` line in /proc/misc, udev-less hosts);
- FUSE: /dev/fuse, readable and writable, and the ``fuse`` filesystem type;
- mount namespaces: /proc/self/ns/mnt (``unshare --mount``);
- cgroup2 and overlay: their filesystem types (systemd-nspawn, the fresh-machine tier).

`Kernel` takes the roots of /proc and /dev (and the module loader) as arguments, so the
detection is tested against fake trees (tests/test_kernel_features.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def _modprobe(alias: str) -> None:
    """Ask the kernel to load the module behind *alias*; quietly nothing where it cannot."""
    tool = shutil.which("modprobe") or "/usr/sbin/modprobe"
    if os.geteuid() != 0 or not Path(tool).exists():
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([tool, "-q", alias], capture_output=True, timeout=30, check=False)


@dataclass
class Kernel:
    """The kernel's features, each as the reason it is missing (a short phrase) or None."""

    proc: Path = Path("/proc")
    dev: Path = Path("/dev")
    load_module: Callable[[str], None] = _modprobe
    _asked: set[str] = field(default_factory=set)

    def filesystems(self) -> set[str]:
        """The filesystem types registered now (/proc/filesystems: ``[nodev]\\tNAME``)."""
        try:
            text = (self.proc / "filesystems").read_text()
        except OSError:
            return set()
        return {line.split()[-1] for line in text.splitlines() if line.split()}

    def misc_devices(self) -> set[str]:
        """The misc devices registered (/proc/misc: ``MINOR NAME``)."""
        try:
            text = (self.proc / "misc").read_text()
        except OSError:
            return set()
        return {line.split()[-1] for line in text.splitlines() if len(line.split()) == 2}

    def filesystem_problem(self, fstype: str) -> str | None:
        """Why *fstype* cannot be mounted here, or None (a module is loaded once if needed)."""
        if fstype in self.filesystems():
            return None
        if fstype not in self._asked:
            self._asked.add(fstype)
            self.load_module(f"fs-{fstype}")
            if fstype in self.filesystems():
                return None
        return f"no {fstype} in /proc/filesystems (and no module for it)"

    def autofs_problem(self) -> str | None:
        filesystem = self.filesystem_problem("autofs")
        node = None if (self.dev / "autofs").exists() else "no /dev/autofs"
        found = [problem for problem in (filesystem, node) if problem]
        return ", ".join(found) or None

    def loop_problem(self) -> str | None:
        if (self.dev / "loop-control").exists() or "loop-control" in self.misc_devices():
            return None
        self.load_module("loop")
        if (self.dev / "loop-control").exists():
            return None
        return "no loop devices (no /dev/loop-control)"

    def fuse_problem(self) -> str | None:
        node = self.dev / "fuse"
        if not node.exists():
            return f"{node} does not exist"
        if not os.access(node, os.R_OK | os.W_OK):
            return f"{node} is not readable and writable"
        return self.filesystem_problem("fuse")

    def mount_namespace_problem(self) -> str | None:
        if (self.proc / "self" / "ns" / "mnt").exists():
            return None
        return "no mount namespaces (no /proc/self/ns/mnt)"

    def loop_mount_problem(self, fstype: str) -> str | None:
        """Why an image of *fstype* cannot be loop-mounted here, or None."""
        return self.loop_problem() or self.filesystem_problem(fstype)


#: The running kernel; module loads are asked for at most once per type and run.
KERNEL = Kernel()


@dataclass(frozen=True)
class Gap:
    """A part of a test that did not run because the kernel lacks a feature."""

    test: str
    feature: str
    reason: str
    part: str

    def line(self) -> str:
        return f"{self.test}: not run: {self.part} (the kernel lacks {self.feature}: {self.reason})"


#: Every gap of this run, printed in one section at the end (tests/conftest.py).
GAPS: list[Gap] = []


def lacking(test: str, feature: str, reason: str, part: str) -> str:
    """Record that *part* of *test* was not run for want of *feature*; the one-line message."""
    gap = Gap(test, feature, reason, part)
    GAPS.append(gap)
    return gap.line()
