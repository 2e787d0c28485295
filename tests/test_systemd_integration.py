"""Running under systemd: sd_notify (READY=1, STATUS=, STOPPING=1), journald logs, the unit file.

systemd is not needed: the notify tests play its part with a real AF_UNIX datagram socket in
``NOTIFY_SOCKET``, around a real ``remotefs mount -f``, and the unit is checked with
``systemd-analyze verify``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remotefs.daemon.process import wait_for_exit
from remotefs.units import human_size

from .conftest import write_random
from .mounting import REMOTEFS, MountFactory, force_unmount, is_mounted
from .origin import Origin
from .requirements import unavailable

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "remotefs@.service"
SIZE = 300 * 1024


@dataclass
class Message:
    """One datagram the daemon sent, and what the mount looked like when it arrived."""

    fields: dict[str, str]
    mounted: bool = False
    stat_size: int | None = None


@dataclass
class Supervisor:
    """Plays systemd: a notify socket and a foreground daemon with NOTIFY_SOCKET set."""

    sock: socket.socket
    mountpoint: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    messages: list[Message] = field(default_factory=list)

    def receive(self, timeout: float) -> Message | None:
        """The next message, or None after *timeout* seconds.

        On READY=1 the mount is inspected at once, before anything else runs.
        """
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        message = Message(fields)
        if fields.get("READY") == "1":
            message.mounted = is_mounted(self.mountpoint)
            try:
                message.stat_size = os.stat(self.mountpoint / "f.bin").st_size
            except OSError:
                message.stat_size = None
        self.messages.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30) -> Message:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is None:
                break
            if key in message.fields and (value is None or message.fields[key] == value):
                return message
        raise AssertionError(
            f"no {key} message within {timeout}s; got {[m.fields for m in self.messages]};"
            f" daemon exit code {self.proc.poll()}; stderr: {self.stderr()}"
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def supervisor(
    fuse_available: None, origin: Origin, origin_root: Path, tmp_path: Path
) -> Iterator[Supervisor]:
    """A foreground daemon under a fake systemd; unmounted and reaped at the end, always."""
    write_random(origin_root / "f.bin", SIZE)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{origin.url('f.bin')}\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    # AF_UNIX paths are limited to 108 bytes: keep the socket in a short directory.
    sock_dir = Path(tempfile.mkdtemp(prefix="rfs-notify-", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "notify"))
    stderr_path = tmp_path / "stderr.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(stderr_path, "wb") as stderr:
            info = os.fstat(stderr.fileno())
            env = {
                **os.environ,
                "NOTIFY_SOCKET": str(sock_dir / "notify"),
                # What systemd sets when stderr is the journal: DEVICE:INODE of that stream.
                "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}",
            }
            options = ["--cache-dir", str(tmp_path / "cache"), "--no-fill", "--status-interval"]
            options += ["0.2", "--prefetch-head", "0", "--prefetch-tail", "0"]
            proc = subprocess.Popen(
                [*REMOTEFS, "mount", "-f", str(urls), str(mountpoint), *options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        yield Supervisor(sock, mountpoint, proc, stderr_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        force_unmount(mountpoint)
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.parametrize("stop_by", ["SIGTERM", "umount"])
def test_ready_status_and_stopping(supervisor: Supervisor, stop_by: str) -> None:
    ready = supervisor.wait_for("READY", "1")
    # At the very moment READY=1 arrived, the mount was in the table and answered a stat.
    assert ready.mounted, "READY=1 was sent before the mount was in /proc/self/mounts"
    assert ready.stat_size == SIZE, "READY=1 was sent before a file in the mount answered"
    assert not any("STOPPING" in m.fields for m in supervisor.messages)
    assert ready.fields["STATUS"].startswith("serving 1 file; cached 0 B of 300.0 KiB (0%)")

    # Periodic STATUS= lines follow, and they show progress.
    periodic = supervisor.wait_for("STATUS", timeout=10)
    assert "READY" not in periodic.fields
    assert (supervisor.mountpoint / "f.bin").stat().st_size == SIZE
    assert len((supervisor.mountpoint / "f.bin").read_bytes()) == SIZE
    deadline = time.monotonic() + 10
    while "cached 300.0 KiB of 300.0 KiB (100%)" not in periodic.fields["STATUS"]:
        assert time.monotonic() < deadline, periodic.fields
        periodic = supervisor.wait_for("STATUS", timeout=10)
    assert re.search(r"; \d+\.\d KiB from origins since mount$", periodic.fields["STATUS"])

    # Shutdown: STOPPING=1 as soon as it starts, naming the cause.
    if stop_by == "SIGTERM":
        supervisor.proc.send_signal(signal.SIGTERM)
    else:
        subprocess.run(["umount", str(supervisor.mountpoint)], check=True, timeout=30)
    stopping = supervisor.wait_for("STOPPING", "1", timeout=20)
    expected = "got SIGTERM" if stop_by == "SIGTERM" else "unmounted"
    assert stopping.fields["STATUS"].startswith(expected), stopping.fields
    assert supervisor.proc.wait(timeout=30) == 0
    assert not is_mounted(supervisor.mountpoint)
    assert sum("STOPPING" in m.fields for m in supervisor.messages) == 1

    # stderr is the journal's stream: no timestamps of our own (the journal adds them).
    lines = supervisor.stderr().splitlines()
    mounted = [line for line in lines if "mounted " in line]
    assert mounted and mounted[0].startswith("INFO remotefs"), lines


def test_human_size() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(5 * 1024**3) == "5.0 GiB"
    assert human_size(3 * 1024**4) == "3.0 TiB"


# -- the unit file --------------------------------------------------------------------------


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart/ExecStop name a remotefs that exists here."""
    wrapper = tmp_path / "bin" / "remotefs"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m remotefs \"$@\"\n")
    wrapper.chmod(0o755)
    text = UNIT.read_text()
    assert text.count("/usr/local/bin/remotefs ") == 3, "ExecStart, ExecReload and ExecStop use it"
    copy = tmp_path / "units" / UNIT.name
    copy.parent.mkdir()
    copy.write_text(text.replace("/usr/local/bin/remotefs ", f"{wrapper} "))
    return copy


def _systemd_analyze() -> str:
    """The systemd-analyze binary; a failure in CI, a skip elsewhere, when it is missing."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        unavailable("systemd-analyze is missing (Debian package: systemd)")
    return tool


def _assert_verified(tool: str, template: Path, instance: Path) -> None:
    """`systemd-analyze verify` passes the template and an instance without a word on ours."""
    for unit in (template, instance):
        result = subprocess.run(
            [tool, "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = result.stdout + result.stderr
        ours = [line for line in output.splitlines() if "remotefs" in line]
        assert result.returncode == 0, output
        assert not ours, f"systemd-analyze complains about the unit: {ours}"


def _unit_settings(unit: Path) -> dict[str, list[str]]:
    """A unit file's ``KEY=value`` lines, every value of each key in order."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    template = _unit_for_this_machine(tmp_path)
    instance = template.with_name("remotefs@example.service")
    shutil.copy(template, instance)
    _assert_verified(tool, template, instance)


def test_unit_settings() -> None:
    """What the unit must say; settings that would hide the mount from the host are absent."""
    settings = _unit_settings(UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["EnvironmentFile"] == ["/etc/remotefs/%i.conf"]
    assert settings["Environment"][0] == "URLS=/etc/remotefs/%i.txt"
    start = shlex.split(settings["ExecStart"][0])
    assert start[1:5] == ["mount", "-f", "${URLS}", "${MOUNTPOINT}"]
    assert start[-1] == "$OPTIONS"
    assert shlex.split(settings["ExecStop"][0])[1:] == ["unmount", "${MOUNTPOINT}"]
    assert settings["DeviceAllow"] == ["/dev/fuse rw"]
    # Each of these gives the service a mount namespace of its own: the FUSE mount would not
    # be visible outside it.
    namespaced = {
        *("PrivateDevices", "PrivateTmp", "PrivateMounts", "ProtectSystem", "ProtectHome"),
        *("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectProc"),
        *("ProtectControlGroups", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem"),
        *("BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "DynamicUser"),
        *("PrivateIPC", "ProcSubset", "ReadWritePaths", "MountFlags", "PrivateUsers"),
    }
    assert not namespaced & settings.keys()
    # Hardening that keeps the mount visible (tests/test_systemd_live.py boots it under systemd).
    for kept in ("NoNewPrivileges", "MemoryDenyWriteExecute", "ProtectClock", "ProtectHostname"):
        assert settings[kept] == ["yes"], kept
    assert settings["SystemCallFilter"] == ["@system-service @mount"]
    assert settings["LimitNOFILE"] == ["65536"]


def test_stop_post_clears_only_its_own_dead_mount(
    origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    """After a crash, ExecStopPost clears the stale mount, so Restart=on-failure can mount."""
    (origin_root / "f.bin").write_bytes(b"abc")
    mount = remotefs.mount([origin.url("f.bin")])
    mount.kill()  # kill -9: the kernel keeps a dead mount
    assert is_mounted(mount.path)
    stop_post = next(
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith("ExecStopPost=")
    )
    assert stop_post.startswith("-/bin/sh -c ")
    # systemd turns $$ into $ and leaves the expansion to the shell.
    command = shlex.split(stop_post[1:].replace("$$", "$"))

    def run(urls: Path) -> None:
        env = {"PATH": os.environ["PATH"], "URLS": str(urls), "MOUNTPOINT": str(mount.path)}
        result = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr

    run(tmp_path / "another-list.txt")  # not this unit's mount: left alone
    assert is_mounted(mount.path)
    run(mount.urls_file)
    assert not is_mounted(mount.path)
    # And the restart can mount again.
    again = remotefs.mount(urls_file=mount.urls_file)
    assert (again.path / "f.bin").read_bytes() == b"abc"
    again.unmount()
    assert wait_for_exit(again.pid, 10)


# -- remotefs serve under systemd: remotefs-serve@.service --------------------------------------

SERVE_UNIT = ROOT / "systemd" / "remotefs-serve@.service"


def test_serve_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    wrapper = tmp_path / "bin" / "remotefs"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m remotefs \"$@\"\n")
    wrapper.chmod(0o755)
    text = SERVE_UNIT.read_text()
    assert text.count("/usr/local/bin/remotefs ") == 2, "ExecStart and ExecReload use it"
    units = tmp_path / "units"
    units.mkdir()
    template = units / SERVE_UNIT.name
    template.write_text(text.replace("/usr/local/bin/remotefs ", f"{wrapper} "))
    instance = units / "remotefs-serve@example.service"
    shutil.copy(template, instance)
    _assert_verified(tool, template, instance)


def test_serve_unit_settings() -> None:
    settings = _unit_settings(SERVE_UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["EnvironmentFile"] == ["-/etc/remotefs/%i.serve.conf"]
    assert "LISTEN=127.0.0.1:8080" in settings["Environment"]  # loopback by default
    start = shlex.split(settings["ExecStart"][0])
    assert start[1:7] == ["serve", "-f", "${URLS}", "--listen", "${LISTEN}", "--cache-dir"]
    assert start[-1] == "$OPTIONS"
    assert shlex.split(settings["ExecReload"][0])[1:3] == ["reload", "--cache-dir"]
    # No mount to keep visible: the whole sandbox applies.
    for kept in ("ProtectSystem", "NoNewPrivileges", "PrivateDevices", "PrivateTmp"):
        assert settings[kept] in (["strict"], ["yes"]), kept
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]


def test_serve_ready_status_and_stopping_under_a_fake_systemd(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """READY=1 only once the server answers HTTP; STATUS= lines; STOPPING=1 on SIGTERM."""
    data = write_random(origin_root / "f.bin", SIZE)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{origin.url('f.bin')}\n")
    sock_dir = Path(tempfile.mkdtemp(prefix="rfs-notify-", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "notify"))
    stderr_path = tmp_path / "stderr.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [*REMOTEFS, "serve", "-f", str(urls), "--listen", "127.0.0.1:0",
                 "--cache-dir", str(tmp_path / "cache"), "--no-fill",
                 "--status-interval", "0.2"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "NOTIFY_SOCKET": str(sock_dir / "notify")},
            )  # fmt: skip
        sock.settimeout(30)
        fields = {}
        while "READY" not in fields:
            data_gram = sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in data_gram.splitlines() if "=" in line)
        # At the moment READY=1 arrived, the server answered, and the log says where.
        found = re.search(r"serving (http://\S+) ", stderr_path.read_text())
        assert found, stderr_path.read_text()
        import urllib.request

        with urllib.request.urlopen(f"{found.group(1)}/f.bin", timeout=10) as answer:
            assert answer.read() == data
        assert fields["STATUS"].startswith("serving 1 file; cached ")
        periodic = sock.recv(4096).decode()
        assert periodic.startswith("STATUS=serving 1 file")
        proc.send_signal(signal.SIGTERM)
        while True:
            message = sock.recv(4096).decode()
            if "STOPPING=1" in message:
                break
        assert "STATUS=got SIGTERM" in message
        assert proc.wait(timeout=30) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
