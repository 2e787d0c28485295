"""mount(8) and fstab: ``mount -t fuse.remotefs URLS MNT -o ...``, ``mount MNT``, ``umount MNT``.

The option mapping is tested as a unit. The end-to-end tests run the real mount(8), which runs
/sbin/mount.fuse3, which runs ``remotefs`` through ``/bin/sh``. mount(8) removes PATH from the
environment of its helpers, so ``remotefs`` must be in the shell's default PATH, and
``-t remotefs`` needs ``/sbin/mount.remotefs``. Nothing is installed for that: each test runs in
a private mount namespace (``unshare --mount``) where an overlay adds both commands to
``/usr/sbin`` and a test fstab is bind-mounted over ``/etc/fstab``. The FUSE mounts live in that
namespace only, and vanish with it whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotefs.config.options import SYSTEM_CACHE_DIR, default_cache_dir
from remotefs.daemon.process import wait_for_exit
from remotefs.mount_helper import (
    MountOptionError,
    helper_command,
    options_to_flags,
    parse_helper_args,
    split_options,
)

from .conftest import write_random
from .mounting import run_remotefs
from .origin import Origin
from .requirements import require_mount_namespaces, require_overlay, unavailable

ROOT = Path(__file__).resolve().parent.parent

# -- the option mapping ----------------------------------------------------------------------


def test_key_values_and_flags_map_to_cli_flags() -> None:
    flags = options_to_flags(
        [
            "cache_dir=/var/cache/remotefs",
            "block_size=1M",
            "fill-rate=10M",
            "allow_other",
            "insecure",
            "no_fill",
            "log_level=debug",
        ]
    )
    assert flags == [
        "--cache-dir",
        "/var/cache/remotefs",
        "--block-size",
        "1M",
        "--fill-rate",
        "10M",
        "--allow-other",
        "--insecure",
        "--no-fill",
        "--log-level",
        "debug",
    ]


def test_generic_mount_options_are_dropped() -> None:
    generic = [
        *("ro", "rw", "defaults", "auto", "noauto", "_netdev", "nofail", "user", "users"),
        *("nosuid", "nodev", "noexec", "suid", "dev", "exec", "noatime", "relatime"),
        *("x-systemd.automount", "x-systemd.idle-timeout=60", "X-mount.mkdir"),
        *("comment=systemd.automount", "default_permissions"),
    ]
    assert options_to_flags(generic) == []


def test_what_mount_fuse3_passes_is_accepted() -> None:
    # Observed on Debian 12: mount.fuse3 appends "dev,suid" as root, and "rw" when no -o was
    # given; a "user" mount gets "noexec,nosuid,nodev".
    command, fake = helper_command(
        ["/etc/u.txt", "/mnt/r", "-o", "ro,cache_dir=/c,dev,suid", "-t", "fuse.remotefs"]
    )
    assert command == ["mount", "/etc/u.txt", "/mnt/r", "--cache-dir", "/c"]
    assert not fake
    command, _ = helper_command(["/etc/u.txt", "/mnt/r", "-o", "rw,dev,suid"], euid=1000)
    assert command == ["mount", "/etc/u.txt", "/mnt/r"]


def test_unknown_or_malformed_options_are_clear_errors() -> None:
    with pytest.raises(MountOptionError, match="unknown mount option 'cachedir'"):
        options_to_flags(["cachedir=/x"])
    with pytest.raises(MountOptionError, match="'allow_other' takes no value"):
        options_to_flags(["allow_other=1"])
    with pytest.raises(MountOptionError, match=r"'cache_dir' needs a value: cache_dir=VALUE"):
        options_to_flags(["cache_dir"])
    with pytest.raises(MountOptionError, match="unknown mount option 'foreground'"):
        options_to_flags(["foreground"])  # it would make mount(8) wait forever
    with pytest.raises(MountOptionError, match="unknown mount option 'allow_root'"):
        options_to_flags(["allow_root"])
    # sloppy (-s): warned about and skipped
    assert options_to_flags(["bogus", "no_fill"], sloppy=True) == ["--no-fill"]


def test_quoted_values_and_argument_forms() -> None:
    assert split_options('user_agent="a, b",no_fill,,ro') == ['user_agent="a, b"', "no_fill", "ro"]
    assert options_to_flags(['user_agent="a, b"']) == ["--user-agent", "a, b"]
    with pytest.raises(MountOptionError, match="unbalanced quote"):
        split_options('user_agent="a')
    args = parse_helper_args(["-sv", "src", "-ono_fill", "mnt", "-n", "-o", "ro", "-t", "remotefs"])
    assert (args.source, args.mountpoint, args.options) == ("src", "mnt", ["no_fill", "ro"])
    assert args.sloppy and not args.fake
    assert parse_helper_args(["a", "b", "-f"]).fake
    with pytest.raises(MountOptionError, match="expected URLS and MOUNTPOINT"):
        parse_helper_args(["only-one", "-o", "ro"])
    with pytest.raises(MountOptionError, match="-o needs a value"):
        parse_helper_args(["a", "b", "-o"])


def test_root_gets_the_system_cache_dir_unless_one_is_given() -> None:
    command, _ = helper_command(["u.txt", "m", "-o", "no_fill"], euid=0)
    assert command == ["mount", "u.txt", "m", "--cache-dir", str(SYSTEM_CACHE_DIR), "--no-fill"]
    command, _ = helper_command(["u.txt", "m", "-o", "cache_dir=/c"], euid=0)
    assert command == ["mount", "u.txt", "m", "--cache-dir", "/c"]


def test_default_cache_dir_without_home(monkeypatch: pytest.MonkeyPatch) -> None:
    # mount(8) and systemd give their helpers no HOME and no XDG_* variables.
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/cache/remotefs")
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no passwd entry either
    assert default_cache_dir() == Path("/var/cache/remotefs")
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_cache_dir() == Path("/home/someone/.cache/remotefs")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == Path("/xdg/remotefs")


def test_console_scripts_are_declared() -> None:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        scripts = tomllib.load(handle)["project"]["scripts"]
    assert scripts["remotefs"] == "remotefs.cli:main"
    assert scripts["mount.remotefs"] == "remotefs.mount_helper:main"


def test_helper_form_errors_before_anything_happens(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/f.bin\n")
    result = run_remotefs(urls, tmp_path / "mnt", "-o", f"cache_dir={tmp_path / 'c'},bogus=1")
    assert result.returncode == 2
    assert "unknown mount option 'bogus'" in result.stderr
    result = run_remotefs(tmp_path / "absent.txt", tmp_path / "mnt", "-o", "ro")
    assert result.returncode == 2
    assert "absent.txt: no such URL list" in result.stderr
    result = run_remotefs(urls, tmp_path / "mnt", "-f", "-o", "block_size=huge")
    assert result.returncode == 2
    assert "not a size" in result.stderr
    assert not (tmp_path / "c").exists()


# -- the real mount(8), in a private mount namespace ------------------------------------------


def _require_tools() -> None:
    missing = [tool for tool in ("unshare", "nsenter", "mount", "umount") if not shutil.which(tool)]
    if not os.path.exists("/sbin/mount.fuse3"):
        missing.append("/sbin/mount.fuse3 (package fuse3)")
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        unavailable(f"mount(8) tests need: {', '.join(missing)}")
    require_mount_namespaces()
    require_overlay("mount(8) with the helper overlaid on /usr/sbin")


class Namespace:
    """A private mount namespace held open by a sleeping process; commands run in it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "600"],
            stdin=subprocess.DEVNULL,
        )
        self.daemons: list[int] = []

    def run(
        self, *command: str | os.PathLike[str], check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-m", "--", *map(str, command)],
            capture_output=True,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )
        if check:
            assert result.returncode == 0, (command, result.stderr.decode(errors="replace"))
        return result

    def ready(self) -> None:
        """Wait until the holder is inside its namespace (its /proc/PID/ns/mnt changed)."""
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while self.holder.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != own:
                    return
            time.sleep(0.01)
        raise AssertionError("unshare --mount did not start (needs CAP_SYS_ADMIN)")

    def install(self, fstab_line: str) -> None:
        """Put remotefs and mount.remotefs into /usr/sbin and a one-line fstab into /etc."""
        extra = self.base / "sbin-extra"
        extra.mkdir()
        for name, module in (("remotefs", "remotefs"), ("mount.remotefs", "remotefs.mount_helper")):
            script = extra / name
            script.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m {module} \"$@\"\n")
            script.chmod(0o755)
        self.run(
            "mount", "-t", "overlay", "overlay", "-o", f"lowerdir={extra}:/usr/sbin", "/usr/sbin"
        )
        fstab = self.base / "fstab"
        fstab.write_text(f"# test fstab\n{fstab_line}\n")
        self.run("mount", "--bind", fstab, "/etc/fstab")

    def mounts(self) -> list[list[str]]:
        text = self.run("cat", "/proc/self/mounts").stdout.decode()
        return [line.split(" ") for line in text.splitlines()]

    def close(self) -> None:
        """Let the daemons finish, kill whatever still runs in the namespace, end it."""
        for pid in self.daemons:
            wait_for_exit(pid, 5)
        with contextlib.suppress(OSError):
            ours = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
            if ours == os.readlink("/proc/self/ns/mnt"):
                raise OSError("the holder never left our namespace: nothing of ours runs there")
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) != self.holder.pid:
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry}/ns/mnt") == ours:
                            os.kill(int(entry), signal.SIGKILL)
                            wait_for_exit(int(entry), 5)
        self.holder.kill()
        self.holder.wait(timeout=10)


@pytest.fixture
def namespace(fuse_available: None, tmp_path: Path) -> Iterator[Namespace]:
    _require_tools()
    space = Namespace(tmp_path)
    try:
        space.ready()
        yield space
    finally:
        space.close()


def _daemon_pid(cache: Path) -> int:
    return int((cache / "lock").read_text().strip())


def _mount_and_check(
    space: Namespace, command: list[str], urls: Path, mnt: Path, cache: Path, data: bytes
) -> int:
    """Run *command* (a mount), check the mount table and the bytes, return the daemon pid."""
    result = space.run(*command, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    pid = _daemon_pid(cache)
    space.daemons.append(pid)
    entries = [entry for entry in space.mounts() if entry[1] == str(mnt)]
    assert len(entries) == 1, entries
    source, _, fstype, options = entries[0][:4]
    assert (source, fstype) == (str(urls), "fuse.remotefs")
    assert "ro" in options.split(",")
    assert space.run("cat", mnt / "data.bin").stdout == data
    assert not os.path.ismount(mnt), "the mount must stay inside the test's namespace"
    return pid


def _umount(space: Namespace, mnt: Path, pid: int) -> None:
    space.run("umount", mnt)
    assert wait_for_exit(pid, 30), "the daemon did not exit after umount"
    assert not [entry for entry in space.mounts() if entry[1] == str(mnt)]


def test_mount_t_fuse_remotefs_and_fstab(
    namespace: Namespace, origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    data = write_random(origin_root / "data.bin", 300_000)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{origin.url('data.bin')}\n")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    namespace.install(
        f"{urls} {mnt} fuse.remotefs ro,_netdev,nofail,cache_dir={cache},allow_other,"
        "no_fill,x-systemd.idle-timeout=600,comment=test 0 0"
    )

    # 1. mount -t fuse.remotefs: mount(8) -> mount.fuse3 -> sh -> remotefs URLS MNT -o ...
    command = ["mount", "-t", "fuse.remotefs", str(urls), str(mnt)]
    pid = _mount_and_check(
        namespace, [*command, "-o", f"cache_dir={cache},no_fill"], urls, mnt, cache, data
    )
    _umount(namespace, mnt, pid)

    # 2. the fstab line: `mount MNT`; then `mount -a` knows it is mounted (same source).
    pid = _mount_and_check(namespace, ["mount", str(mnt)], urls, mnt, cache, data)
    result = namespace.run("mount", "--all", "--verbose", check=False)
    assert result.returncode == 0, result.stderr
    assert b"already mounted" in result.stdout + result.stderr
    assert len([entry for entry in namespace.mounts() if entry[1] == str(mnt)]) == 1
    _umount(namespace, mnt, pid)

    # 3. -t remotefs: mount(8) runs /sbin/mount.remotefs itself.
    command = [
        "mount",
        "-t",
        "remotefs",
        str(urls),
        str(mnt),
        "-o",
        f"ro,cache_dir={cache},no_fill",
    ]
    pid = _mount_and_check(namespace, command, urls, mnt, cache, data)
    _umount(namespace, mnt, pid)

    # 4. a bad option fails the mount with a message that names it, and mounts nothing.
    result = namespace.run(
        "mount", "-t", "fuse.remotefs", urls, mnt, "-o", f"cache_dir={cache},bogus", check=False
    )
    assert result.returncode != 0
    assert b"unknown mount option 'bogus'" in result.stderr
    assert not [entry for entry in namespace.mounts() if entry[1] == str(mnt)]
