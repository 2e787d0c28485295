"""Runs inside a test machine booted with systemd as PID 1 (tests/test_systemd_live.py).

The machine's test unit runs ``python3 /test/systemd_live_checks.py``; the scenario and its
settings are in ``/test/config.json``, written by the test. Every step records what it saw (exit
codes, times, unit states, mount table entries, sha256 of files read through the mount,
``systemctl status`` and journal output) in ``/results/results.json``, saved after each step, so
a step that breaks still leaves the earlier ones. The pytest test asserts on those records: this
script decides nothing, except to stop at the first step that raises (later steps build on it).
``/results/journal.json`` gets the whole journal of the boot at the end, whatever happened.

Between steps the script asks the origin on the host for ``/_mark/NAME``: the origin notes how
many requests it had answered by then, so the test can count the origin bytes of each phase.

Only the standard library of the machine's python3 (3.11 on Debian 12, 3.13 on Debian 13).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path("/results")
CONFIG_FILE = Path("/test/config.json")
DEB = "/pkg/remotefs.deb"

Record = dict[str, Any]


class Recorder:
    """The steps' records, written to /results/results.json after each step."""

    def __init__(self, scenario: str) -> None:
        self.data: Record = {"scenario": scenario, "steps": {}, "order": [], "error": None}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Record]:
        record: Record = {}
        self.data["steps"][name] = record
        self.data["order"].append(name)
        started = time.monotonic()
        try:
            yield record
        except BaseException:
            self.data["error"] = {"step": name, "traceback": traceback.format_exc()}
            raise
        finally:
            record["step_seconds"] = round(time.monotonic() - started, 3)
            self.save()

    def save(self) -> None:
        temporary = RESULTS / "results.json.tmp"
        temporary.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        temporary.replace(RESULTS / "results.json")


def run(*argv: str, timeout: float = 120, check: bool = False, keep: int = 20000) -> Record:
    """Run a command; its exit code, output (the last *keep* characters) and duration."""
    started = time.monotonic()
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"{' '.join(argv)} did not end within {timeout} s") from expired
    record = {
        "argv": list(argv),
        "rc": result.returncode,
        "out": result.stdout[-keep:],
        "err": result.stderr[-keep:],
        "seconds": round(time.monotonic() - started, 3),
    }
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return record


def unit_state(unit: str) -> dict[str, str]:
    """Some of ``systemctl show``'s properties of *unit*."""
    properties = ("ActiveState", "SubState", "Result", "MainPID", "NRestarts", "SourcePath")
    result = run("systemctl", "show", *(f"--property={name}" for name in properties), unit)
    return dict(line.split("=", 1) for line in result["out"].splitlines() if "=" in line)


def mount_table(pid: int = 1) -> dict[str, str]:
    """Mountpoint -> filesystem type, as process *pid* (PID 1: the system) sees them."""
    table = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        point = fields[4].replace("\\040", " ")
        table[point] = fields[fields.index("-") + 1]  # the last mount at a point wins
    return table


def digests(top: str) -> dict[str, str]:
    """sha256 of every file under *top* (read through the mount), by relative path."""
    found = {}
    for directory, _dirs, files in os.walk(top):
        for name in files:
            path = Path(directory, name)
            found[str(path.relative_to(top))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def combined_digest(top: str) -> tuple[int, str]:
    """(file count, sha256 over the sorted "PATH SHA256" lines): one value for many files."""
    lines = sorted(f"{path} {digest}" for path, digest in digests(top).items())
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def mark(origin: str, name: str) -> None:
    """Tell the origin a phase begins (it records how many requests it has answered)."""
    with urllib.request.urlopen(f"{origin}/_mark/{name}", timeout=30) as response:
        response.read()


def wait_until(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until *condition* held, or None if it did not within *timeout*."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.05)
    return round(time.monotonic() - started, 3)


def write(path: str, text: str, mode: int = 0o644) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    os.chmod(path, mode)


def processes_naming(text: str) -> list[int]:
    """Pids whose command line contains *text*."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return " ".join(line.split()[3:5])
    return ""


# -- scenarios --------------------------------------------------------------------------------


def service(config: Record, recorder: Recorder) -> None:
    """remotefs@NAME.service: install, enable --now, read, status, reload, stop, restart, crash."""
    name, mountpoint, origin = config["name"], config["mountpoint"], config["origin"]
    unit = f"remotefs@{name}.service"
    with recorder.step("install") as record:
        record["dpkg"] = run("dpkg", "-i", DEB, timeout=300)
        write(f"/etc/remotefs/{name}.conf", config["conf"], 0o600)
        write(f"/etc/remotefs/{name}.headers", config["headers"], 0o600)
        write(f"/etc/remotefs/{name}.txt", config["urls"])
        record["state"] = unit_state(unit)

    with recorder.step("enable_now") as record:
        mark(origin, "enable")
        record["run"] = run("systemctl", "enable", "--now", unit, timeout=120)
        # At once, before anything else: the mount must be there and answer.
        record["fstype"] = mount_table().get(mountpoint)
        try:
            record["listing"] = sorted(os.listdir(mountpoint))
        except OSError as err:
            record["listing_error"] = repr(err)
        record["state"] = unit_state(unit)
        record["limit"] = open_files_limit(int(record["state"]["MainPID"]))

    with recorder.step("read") as record:
        record["digests"] = digests(mountpoint)
        # And from another unit of its own, as any other service would read it.
        first = sorted(record["digests"])[0]
        record["other_unit"] = run(
            "systemd-run", "--wait", "--pipe", "--quiet", "sha256sum", f"{mountpoint}/{first}"
        )
        record["other_unit_file"] = first

    with recorder.step("status") as record:
        time.sleep(config["status_interval"] * 2 + 0.5)  # a STATUS= line sent after the reads
        record["status"] = run("systemctl", "status", "--no-pager", "--lines=0", unit)

    with recorder.step("reload") as record:
        write(f"/etc/remotefs/{name}.txt", config["reloaded_urls"])
        pid_before = unit_state(unit)["MainPID"]
        record["run"] = run("systemctl", "reload", unit)
        record["listing"] = sorted(os.listdir(mountpoint))
        record["digests"] = digests(mountpoint)
        record["same_pid"] = unit_state(unit)["MainPID"] == pid_before

    with recorder.step("stop") as record:
        record["run"] = run("systemctl", "stop", unit, timeout=120)
        record["fstype"] = mount_table().get(mountpoint)
        record["state"] = unit_state(unit)
        record["daemons"] = processes_naming(f"/etc/remotefs/{name}.txt")
        record["cache"] = sorted(os.listdir(f"/var/cache/remotefs/{name}"))

    with recorder.step("restart") as record:
        mark(origin, "restart")
        record["run"] = run("systemctl", "start", unit, timeout=120)
        record["digests"] = digests(mountpoint)
        mark(origin, "restart-read")

    with recorder.step("sigkill") as record:
        before = unit_state(unit)
        record["before"] = before
        os.kill(int(before["MainPID"]), signal.SIGKILL)
        # Observe the unit's way back: failed -> ExecStopPost clears the dead mount ->
        # auto-restart (RestartSec=) -> a new daemon.
        timeline: list[Record] = []
        started = time.monotonic()
        while time.monotonic() - started < 60:
            state = unit_state(unit)
            seen = {
                "t": round(time.monotonic() - started, 2),
                "state": f"{state['ActiveState']}/{state['SubState']}",
                "pid": state["MainPID"],
                "fstype": mount_table().get(mountpoint),
            }
            if not timeline or {k: v for k, v in seen.items() if k != "t"} != {
                k: v for k, v in timeline[-1].items() if k != "t"
            }:
                timeline.append(seen)
            restarted = state["MainPID"] not in ("0", before["MainPID"])
            if state["ActiveState"] == "active" and restarted:
                break
            time.sleep(0.1)
        record["timeline"] = timeline
        record["after"] = unit_state(unit)
        record["digests"] = digests(mountpoint)

    with recorder.step("security") as record:
        record["analyze"] = run("systemd-analyze", "security", "--no-pager", unit)

    with recorder.step("journal") as record:
        run("journalctl", "--sync")
        record["unit"] = run("journalctl", "--no-pager", "-o", "json", "-u", unit, keep=50_000_000)

    with recorder.step("remove") as record:
        # The package's prerm stops running remotefs@ services: the mount goes with them.
        record["dpkg"] = run("dpkg", "--remove", "remotefs", timeout=300)
        record["fstype"] = mount_table().get(mountpoint)
        record["state"] = unit_state(unit)
        record["daemons"] = processes_naming(f"/etc/remotefs/{name}.txt")


def fstab(config: Record, recorder: Recorder) -> None:
    """fstab lines mounted at boot (and by automount), stopped, restarted; one boot of two."""
    boot, mountpoint, automount = config["boot"], config["mountpoint"], config["automount"]
    mount_unit = config["mount_unit"]
    auto_unit = config["automount_unit"]
    auto_mount_unit = auto_unit.replace(".automount", ".mount")
    origin = config["origin"]
    with recorder.step("at_boot") as record:
        record["fstype"] = mount_table().get(mountpoint)
        record["auto_fstype"] = mount_table().get(automount)
        record["mount_unit"] = unit_state(mount_unit)
        record["automount_unit"] = unit_state(auto_unit)
        record["auto_mount_unit"] = unit_state(auto_mount_unit)
        record["failed"] = run("systemctl", "--failed", "--no-legend", "--plain")["out"]
        # What systemd-fstab-generator made of the fstab lines, and whether systemd accepts it.
        generated = [f"/run/systemd/generator/{unit}" for unit in (auto_unit, auto_mount_unit)]
        record["generated"] = {
            Path(path).name: Path(path).read_text() if Path(path).exists() else None
            for path in generated
        }
        record["verify"] = run("systemd-analyze", "verify", "--man=no", *generated)
        record["auto_mount_order"] = run(
            "systemctl", "show", "--property=After", "--property=Wants", auto_mount_unit
        )["out"]
        # systemd starts automount units only where this node exists (the kernel's autofs).
        record["dev_autofs"] = Path("/dev/autofs").exists()

    with recorder.step("read") as record:
        mark(origin, f"boot{boot}-read")
        record["digests"] = {
            name: hashlib.sha256(Path(mountpoint, name).read_bytes()).hexdigest()
            for name in config["read_first"]
        }

    with recorder.step("stop") as record:
        record["daemons_before"] = processes_naming(config["urls_file"])
        record["run"] = run("systemctl", "stop", mount_unit, timeout=120)
        record["fstype"] = mount_table().get(mountpoint)
        record["state"] = unit_state(mount_unit)
        # systemd leaves a mount unit's processes (its FUSE daemon) to end by themselves once
        # the filesystem is unmounted: the daemon saves its state, then exits.
        record["daemon_exit_seconds"] = wait_until(
            lambda: not processes_naming(config["urls_file"]), 30
        )
        record["daemons"] = processes_naming(config["urls_file"])
        record["log"] = Path(config["log_file"]).read_text(errors="replace")

    with recorder.step("start_again") as record:
        record["run"] = run("systemctl", "start", mount_unit, timeout=120)
        record["fstype"] = mount_table().get(mountpoint)
        # Read the rest now: the shutdown at the end of the boot must save these bytes.
        record["digests"] = digests(mountpoint)
        mark(origin, f"boot{boot}-end")

    with recorder.step("automount") as record:
        if not Path("/dev/autofs").exists():
            # No autofs in the kernel: what a user sees when starting the automount, then the
            # generated mount unit itself, started the way the first access would.
            record["start_automount"] = run("systemctl", "start", auto_unit, timeout=60)
            record["automount_unit"] = unit_state(auto_unit)
            record["listing_before"] = (
                sorted(os.listdir(automount)) if os.path.isdir(automount) else None
            )
            record["start_mount"] = run("systemctl", "start", auto_mount_unit, timeout=120)
        # The first access mounts it (listing the directory is an access). A failure is
        # recorded, not raised: the reboot's steps do not depend on it.
        try:
            record["listing"] = sorted(os.listdir(automount))
            record["digests"] = digests(automount)
        except OSError as err:
            record["error"] = repr(err)
        record["fstype"] = mount_table().get(automount)
        record["auto_mount_unit"] = unit_state(auto_mount_unit)
        record["journal"] = run(
            "journalctl", "--no-pager", "-o", "cat", "-b", "-u", auto_unit, "-u", auto_mount_unit
        )["out"]


def many(config: Record, recorder: Recorder) -> None:
    """An fstab line with thousands of URLs, under the LimitNOFILE systemd gives mount units."""
    unit, point = config["mount_unit"], config["mountpoint"]
    with recorder.step("mount") as record:
        mark(config["origin"], "mount")
        # This unit has systemd's default limits, as mount units do: nothing raises them here.
        record["default_limit"] = open_files_limit(os.getpid())
        record["run"] = run("systemctl", "start", unit, timeout=300)
        record["state"] = unit_state(unit)
        pids = processes_naming(config["urls_file"])
        if pids:
            record["daemon_limit"] = open_files_limit(pids[0])
        record["files"], record["digest"] = combined_digest(point)
        record["stop"] = run("systemctl", "stop", unit, timeout=300)
        record["fstype"] = mount_table().get(point)
        with contextlib.suppress(OSError):
            record["log"] = Path(config["log_file"]).read_text(errors="replace")[-20000:]


def hardening(config: Record, recorder: Recorder) -> None:
    """The unit with each candidate setting added: is its mount visible outside the service?"""
    name, mountpoint = config["name"], config["mountpoint"]
    unit = f"remotefs@{name}.service"
    write(f"/etc/remotefs/{name}.conf", config["conf"], 0o600)
    write(f"/etc/remotefs/{name}.txt", config["urls"])
    dropin = Path(f"/etc/systemd/system/remotefs@{name}.service.d/candidate.conf")
    for label, settings in config["candidates"].items():
        with recorder.step(label) as record:
            write(str(dropin), "[Service]\n" + "".join(f"{line}\n" for line in settings))
            run("systemctl", "daemon-reload", check=True)
            record["start"] = run("systemctl", "start", unit, timeout=120)
            record["state"] = unit_state(unit)
            record["fstype"] = mount_table().get(mountpoint)
            pid = int(record["state"]["MainPID"] or 0)
            # What the daemon itself sees: its mount, in its own namespace or the system's.
            record["inside"] = mount_table(pid).get(mountpoint) if pid else None
            try:
                record["digests"] = digests(mountpoint)
            except OSError as err:
                record["read_error"] = repr(err)
            record["reload"] = run("systemctl", "reload", unit)
            record["stop"] = run("systemctl", "stop", unit, timeout=120)
            record["stopped"] = unit_state(unit)
            record["left_mounted"] = mount_table().get(mountpoint)
            if record["left_mounted"]:
                run("umount", "-l", mountpoint)
            run("systemctl", "reset-failed", unit)


SCENARIOS: dict[str, Callable[[Record, Recorder], None]] = {
    "service": service,
    "fstab": fstab,
    "many": many,
    "hardening": hardening,
}


def main() -> int:
    config = json.loads(CONFIG_FILE.read_text())
    recorder = Recorder(config["scenario"])
    recorder.save()
    status = 0
    try:
        SCENARIOS[config["scenario"]](config, recorder)
    except BaseException:
        status = 1
        recorder.data["error"] = recorder.data["error"] or {
            "step": None,
            "traceback": traceback.format_exc(),
        }
        traceback.print_exc()
    finally:
        recorder.save()
        run("journalctl", "--sync")
        journal = run("journalctl", "--no-pager", "-b", "-o", "json", timeout=60, keep=200_000_000)
        (RESULTS / "journal.json").write_text(journal["out"] if journal["rc"] == 0 else "")
    return status


if __name__ == "__main__":
    sys.exit(main())
