"""The suite's kernel-feature detection (tests/kernel.py) against fake /proc and /dev trees, and
the mountpoint check's handling of an autofs mountpoint against a fake mount table.

The developers' own machines may or may not have autofs, iso9660 or loop devices; these tests
give every answer on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remotefs.daemon.mountpoint import MountpointError, check_mountpoint, mount_types

from .kernel import GAPS, Kernel, lacking

# /proc/filesystems of a kernel like the one in issue 28: no autofs, no iso9660, no vfat.
WITHOUT_AUTOFS = """\
nodev\tsysfs
nodev\ttmpfs
nodev\tproc
nodev\tcgroup2
nodev\tdevpts
\text3
\text2
\text4
\tsquashfs
\tfuseblk
nodev\tfuse
nodev\tfusectl
nodev\toverlay
\txfs
"""
WITH_AUTOFS = WITHOUT_AUTOFS + "nodev\tautofs\n\tiso9660\n\tvfat\n"
MISC = "229 fuse\n237 loop-control\n235 autofs\n"


def fake_kernel(
    tmp_path: Path,
    filesystems: str,
    devices: tuple[str, ...] = ("fuse", "loop-control"),
    misc: str = "229 fuse\n237 loop-control\n",
    modules: dict[str, str] | None = None,
) -> tuple[Kernel, list[str]]:
    """A Kernel over fake /proc and /dev; *modules* maps an alias to the filesystem line that
    loading it adds. Returns the kernel and the list of aliases it asked to load."""
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "mnt").write_text("")
    (proc / "filesystems").write_text(filesystems)
    (proc / "misc").write_text(misc)
    dev.mkdir()
    for name in devices:
        (dev / name).write_text("")
    asked: list[str] = []

    def load(alias: str) -> None:
        asked.append(alias)
        if modules and alias in modules:
            with open(proc / "filesystems", "a") as table:
                table.write(modules[alias])

    return Kernel(proc=proc, dev=dev, load_module=load), asked


def test_a_kernel_without_autofs_says_what_it_lacks(tmp_path: Path) -> None:
    kernel, asked = fake_kernel(tmp_path, WITHOUT_AUTOFS)
    assert kernel.autofs_problem() == (
        "no autofs in /proc/filesystems (and no module for it), no /dev/autofs"
    )
    assert asked == ["fs-autofs"]
    assert kernel.autofs_problem() is not None
    assert asked == ["fs-autofs"], "a missing module is asked for once per run"
    assert kernel.filesystem_problem("iso9660") is not None
    assert kernel.filesystem_problem("vfat") is not None
    for present in ("ext4", "squashfs", "overlay", "xfs", "fuse"):
        assert kernel.filesystem_problem(present) is None, present


def test_a_kernel_with_autofs_has_it(tmp_path: Path) -> None:
    kernel, asked = fake_kernel(
        tmp_path, WITH_AUTOFS, devices=("fuse", "loop-control", "autofs"), misc=MISC
    )
    assert kernel.autofs_problem() is None
    assert kernel.filesystem_problem("iso9660") is None
    assert asked == []


def test_the_filesystem_without_the_device_node_is_not_enough_for_systemd(tmp_path: Path) -> None:
    """systemd starts automount units only where /dev/autofs exists."""
    kernel, _ = fake_kernel(tmp_path, WITH_AUTOFS)
    assert kernel.autofs_problem() == "no /dev/autofs"


def test_a_module_that_loads_makes_its_filesystem_available(tmp_path: Path) -> None:
    """A type built as a module is listed once loaded: mount(2) would load it, so do we."""
    kernel, asked = fake_kernel(
        tmp_path, WITHOUT_AUTOFS, modules={"fs-iso9660": "\tiso9660\n", "fs-autofs": "\tautofs\n"}
    )
    assert kernel.filesystem_problem("iso9660") is None
    assert kernel.filesystem_problem("vfat") is not None
    assert asked == ["fs-iso9660", "fs-vfat"]
    assert kernel.autofs_problem() == "no /dev/autofs"


def test_loop_devices_fuse_and_mount_namespaces(tmp_path: Path) -> None:
    kernel, _ = fake_kernel(tmp_path, WITHOUT_AUTOFS)
    assert kernel.loop_problem() is None
    assert kernel.loop_mount_problem("ext4") is None
    assert kernel.loop_mount_problem("vfat") is not None
    assert kernel.mount_namespace_problem() is None
    if os.geteuid() == 0 or os.access(tmp_path / "dev" / "fuse", os.R_OK | os.W_OK):
        assert kernel.fuse_problem() is None

    bare, asked = fake_kernel(tmp_path / "bare", "nodev\tproc\n", devices=(), misc="")
    (bare.proc / "self" / "ns" / "mnt").unlink()
    assert bare.loop_problem() == "no loop devices (no /dev/loop-control)"
    assert "loop" in asked
    assert bare.loop_mount_problem("ext4") == "no loop devices (no /dev/loop-control)"
    assert bare.fuse_problem() == f"{bare.dev / 'fuse'} does not exist"
    assert bare.mount_namespace_problem() == "no mount namespaces (no /proc/self/ns/mnt)"


def test_loop_control_listed_in_proc_misc_without_a_node_counts(tmp_path: Path) -> None:
    """Without udev the node may be missing while the driver is there (mount creates it)."""
    kernel, _ = fake_kernel(tmp_path, WITHOUT_AUTOFS, devices=("fuse",))
    assert kernel.loop_problem() is None


def test_unreadable_proc_files_mean_nothing_is_there(tmp_path: Path) -> None:
    kernel = Kernel(proc=tmp_path / "nowhere", dev=tmp_path / "nodev", load_module=lambda _: None)
    assert kernel.filesystems() == set()
    assert kernel.misc_devices() == set()
    assert kernel.autofs_problem() is not None


def test_a_gap_is_one_line_naming_the_test_the_part_and_the_reason() -> None:
    before = len(GAPS)
    line = lacking("tests/t.py::test_x", "autofs", "no /dev/autofs", "the first access")
    try:
        assert line == (
            "tests/t.py::test_x: not run: the first access (the kernel lacks autofs:"
            " no /dev/autofs)"
        )
        assert len(GAPS) == before + 1
    finally:
        GAPS.pop()


# -- the mountpoint check beside an autofs mount (the systemd automount case) -----------------


def fake_mount_table(tmp_path: Path, point: Path, fstype: str) -> Path:
    table = tmp_path / "mounts"
    escaped = str(point).replace(" ", "\\040")
    table.write_text(
        "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
        f"systemd-1 {escaped} {fstype} rw,relatime,fd=52,pgrp=1,timeout=0,direct 0 0\n"
    )
    return table


@pytest.mark.parametrize("name", ["auto", "with space"])
def test_an_autofs_mountpoint_is_accepted_as_the_automount_s_target(
    tmp_path: Path, name: str
) -> None:
    """systemd's automount point is an autofs mount: the remotefs mount goes on top of it."""
    point = tmp_path / name
    point.mkdir()
    table = fake_mount_table(tmp_path, point, "autofs")
    assert mount_types(table)[str(point)] == "autofs"
    assert check_mountpoint(point, mount_table=table) == point


@pytest.mark.parametrize("fstype", ["fuse.remotefs", "ext4", "tmpfs"])
def test_any_other_mount_there_is_refused(tmp_path: Path, fstype: str) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    table = fake_mount_table(tmp_path, point, fstype)
    with pytest.raises(MountpointError, match="already a mount point; unmount it first"):
        check_mountpoint(point, mount_table=table)


def test_an_autofs_mountpoint_must_still_be_empty(tmp_path: Path) -> None:
    point = tmp_path / "auto"
    point.mkdir()
    (point / "left-over").write_text("x")
    table = fake_mount_table(tmp_path, point, "autofs")
    with pytest.raises(MountpointError, match="is not empty"):
        check_mountpoint(point, mount_table=table)
