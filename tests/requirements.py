"""What a test needs from the machine, and what happens when the machine lacks it.

Two kinds of need, treated differently on purpose:

- **a tool or a privilege** (``mkfs.ext4``, ``xorriso``, root): the project's set-up installs
  it, so its absence is a broken set-up. Under CI=true the test fails; elsewhere it skips.
- **a kernel feature** (autofs, a filesystem type, loop devices, mount namespaces, overlay):
  set-up cannot install it, and machines of the project's kind differ in their kernels. The
  part of the test that needs it is skipped, in CI too, with one line that names the test, the
  part and what the kernel lacks (tests/kernel.py detects; the section at the end of the run
  lists every such line). The rest of the test still runs.

FUSE is the exception among kernel features: it is what remotefs is, and without it the suite
would test almost nothing, so under CI=true a missing /dev/fuse fails the run.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from .kernel import KERNEL, lacking

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(message: str) -> NoReturn:
    """A tool or privilege is missing: fail under CI=true, skip elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def current_test() -> str:
    """The node id of the test running now (pytest sets PYTEST_CURRENT_TEST around each phase)."""
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def without_kernel_feature(feature: str, problem: str | None, part: str) -> None:
    """Skip *part* of the running test (the rest of it, from here) when *problem* is not None."""
    if problem is not None:
        pytest.skip(lacking(current_test(), feature, problem, part))


def note_kernel_gap(feature: str, problem: str, part: str) -> None:
    """Record that *part* was not run, for a test that goes on with its other parts."""
    message = lacking(current_test(), feature, problem, part)
    print(message)


def require_loop_mount(fstype: str, part: str = "the whole test") -> None:
    """Skip unless an image of *fstype* can be loop-mounted here (loop devices and the type)."""
    without_kernel_feature(f"loop-mounted {fstype}", KERNEL.loop_mount_problem(fstype), part)


def require_mount_namespaces(part: str = "the whole test") -> None:
    without_kernel_feature("mount namespaces", KERNEL.mount_namespace_problem(), part)


def require_overlay(part: str = "the whole test") -> None:
    without_kernel_feature("overlay", KERNEL.filesystem_problem("overlay"), part)
