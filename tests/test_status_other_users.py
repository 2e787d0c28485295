"""`remotefs status` beside other users' mounts: a user sees their own, and root's mount is
no error of theirs.

A FUSE mount answers only its owner (without ``allow_other``), and a daemon's control socket
only the user who started it, so another user's mount can never be asked. Without a mountpoint,
status lists the caller's mounts (the kernel's ``user_id=`` of each) and skips the others
silently; ``--all-users`` lists them too, each with one line saying why it cannot be asked.
"""

from __future__ import annotations

from pathlib import Path

from remotefs.control_client import remotefs_mounts

from .mounting import MountFactory
from .origin import Origin
from .other_users import VICTIM, run_cli_as


def test_status_as_another_user_beside_roots_mount_exits_0(
    users: dict[str, int], origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    (origin_root / "a.bin").write_bytes(b"x" * 5000)
    mount = remotefs.mount([origin.url("a.bin")])
    code, output = run_cli_as(users[VICTIM], ["status", "--once"], stream=1)
    assert code == 0, output
    assert output == "no remotefs mounts or daemons\n"
    assert str(mount.path) not in output

    code, output = run_cli_as(users[VICTIM], ["status", "--once", "--all-users"], stream=1)
    assert code == 1, output
    lines = [line for line in output.splitlines() if str(mount.path) in line]
    assert len(lines) == 1, output
    assert lines[0].count(str(mount.path)) == 1, f"the path twice: {lines[0]}"
    assert "Permission denied" in lines[0] or "no permission" in lines[0], lines[0]

    # Root's own view is unchanged: the mount is listed, and status exits 0.
    code, output = run_cli_as(0, ["status", "--once"], stream=1)
    assert code == 0, output
    assert str(mount.path) in output and "a.bin" in output


MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
urls.txt /mnt/root fuse.remotefs ro,nosuid,nodev,relatime,user_id=0,group_id=0 0 0
/home/ann/u.txt /home/ann/mnt fuse.remotefs rw,nosuid,nodev,relatime,user_id=1000,group_id=1000 0 0
/home/bob/u /home/bob/my\\040files fuse.remotefs rw,user_id=1001,group_id=1001,allow_other 0 0
other /mnt/sshfs fuse.sshfs rw,relatime,user_id=1000,group_id=1000 0 0
"""


def test_the_mounts_a_user_may_ask_are_their_own(tmp_path: Path) -> None:
    """The owner filter against a fake mount table: user_id=, not allow_other, decides."""
    table = tmp_path / "mounts"
    table.write_text(MOUNTS)
    every = ["/mnt/root", "/home/ann/mnt", "/home/bob/my files"]
    assert remotefs_mounts(table=str(table)) == every
    assert remotefs_mounts(0, table=str(table)) == ["/mnt/root"]
    assert remotefs_mounts(1000, table=str(table)) == ["/home/ann/mnt"]
    assert remotefs_mounts(1001, table=str(table)) == ["/home/bob/my files"]
    assert remotefs_mounts(4242, table=str(table)) == []
