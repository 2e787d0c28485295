"""Under a live systemd (PID 1): the unit, fstab lines, a reboot and thousands of URLs.

Each release (Debian 13 and 12 by default; REMOTEFS_LIVE_SUITES chooses) gets machines booted with
``systemd-nspawn`` from a cached tree that has systemd, dbus, python3 and fuse3 (tests/nspawn.py),
and the project's .deb built for that release (tests/debs.py: the fresh-machine test's build, or
one made here in a chroot of the same tree). The machine shares the host's network: its files
come from an origin on the host's 127.0.0.1, run by this process, which counts every byte it
sends. A boot runs one scenario of tests/systemd_live_checks.py from a oneshot unit ordered after
``multi-user.target``; that script records what it saw and the tests below assert on it. Machines
are torn down (cgroups, overlay, processes) before any assertion, and the last test of each
release checks that nothing was left.

- ``service``: ``dpkg -i`` of the .deb in the booted machine, then ``remotefs@t``: ``systemctl
  enable --now`` returns only once the mount answers (the origin holds the probe of one file back,
  so a unit that did not wait for READY=1 would return before the mount exists), files read back
  equal to the origin's (from the test unit and from a ``systemd-run`` unit: the mount is visible
  outside the service), ``systemctl status`` shows the STATUS= line, ``systemctl reload`` applies
  an edited URL list, ``systemctl stop`` unmounts and saves (the restart re-reads with no origin
  bytes beyond its probes), a SIGKILL is followed by the dead mount's removal and a restart, the
  journal has one line per event with no timestamp of the daemon's own and no secret, and
  ``dpkg --remove`` stops the service.
- ``fstab`` (two boots of the same machine, a "reboot"): an fstab line mounted at boot by the
  generated mnt-remote.mount, ``systemctl stop mnt-remote.mount`` unmounting cleanly, an
  ``x-systemd.automount`` line mounted by the first access, and the second boot reading every
  byte the first one read from the cache: zero origin bytes beyond the probes.
- ``many``: an fstab line of 5,000 URLs, started with ``systemctl start`` of its mount unit under
  the LimitNOFILE systemd gives mount units (a soft limit of 1024; nothing raised by the test).
- ``hardening``: the shipped unit's mount is visible and readable outside the service; each
  sandboxing setting the unit leaves out, added by a drop-in, either gives the service a mount
  namespace of its own where the mount hides, or keeps it from mounting.

In CI (CI=true) a missing tool fails these tests; elsewhere they skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import write_random
from .debs import DebBuilds
from .kernel import KERNEL
from .nspawn import SYSTEMD_PACKAGES, Boot, Machine, booted_machine, nspawn_problem
from .origin import Exchange, Origin, RequestRecord
from .requirements import note_kernel_gap, require_overlay, unavailable

ROOT = Path(__file__).resolve().parent.parent
CHECKS = Path(__file__).resolve().parent / "systemd_live_checks.py"
README = ROOT / "systemd" / "README.md"
DEFAULT_SUITES = "trixie bookworm"
TEST_UNIT = "remotefs-live-test.service"
#: The probe of slow.bin is answered this late: enable --now must wait at least this long.
SLOW_PROBE = 1.5
STATUS_INTERVAL = 1
#: Must never reach the journal: a URL query and a header from a --header-file.
QUERY_SECRET = "qs-5ecret-4a1f"
HEADER_SECRET = "hdr-5ecret-77c2"
MANY = 5000
#: Seconds a boot may take, scenario included (the slowest, ``many``, probes, reads and saves
#: 5,000 files: about 40 s here).
BOOT_TIMEOUT = 240

pytestmark = [pytest.mark.systemd_live, pytest.mark.timeout(900)]


def _suites() -> list[str]:
    chosen = os.environ.get("REMOTEFS_LIVE_SUITES", DEFAULT_SUITES).split()
    unknown = [suite for suite in chosen if suite not in ("trixie", "bookworm")]
    assert not unknown, f"REMOTEFS_LIVE_SUITES names unknown suites: {unknown}"
    return chosen


@pytest.fixture(scope="session")
def live_tools(fuse_available: None) -> None:
    problem = nspawn_problem()
    if problem is None:
        missing = [tool for tool in ("debootstrap", "chroot", "git") if not shutil.which(tool)]
        if missing:
            problem = f"missing {', '.join(missing)} (scripts/setup.sh test installs them)"
    if problem:
        unavailable(problem)
    require_overlay()


# -- the origin -----------------------------------------------------------------------------


class LiveOrigin(Origin):
    """An origin that answers ``/_mark/NAME`` by noting how many requests it has answered, and
    holds the probe (``Range: bytes=0-0``) of the paths in ``slow_probes`` back."""

    def __init__(self, root: Path, slow_probes: dict[str, float] | None = None) -> None:
        super().__init__(root)
        self.slow_probes = slow_probes or {}
        self.marks: dict[str, int] = {}

    def _respond(self, ex: Exchange) -> None:
        if ex.path.startswith("/_mark/"):
            with self._records_cond:
                # Requests still being answered belong before the mark.
                self._records_cond.wait_for(lambda: self._in_flight == 1, timeout=10)
                self.marks[ex.path.removeprefix("/_mark/")] = len(self._records)
            ex.send_head(200, {"Content-Length": "0"})
            return
        delay = self.slow_probes.get(ex.path)
        if delay and ex.range_header == "bytes=0-0" and self._stopping.wait(delay):
            return
        super()._respond(ex)


def _is_probe(record: RequestRecord) -> bool:
    return record.range_header == "bytes=0-0"


def data_bytes(records: list[RequestRecord]) -> int:
    """Body bytes sent for reads, not counting the one byte of each probe."""
    return sum(r.body_bytes for r in records if r.method == "GET" and not _is_probe(r))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- one run: machines booted, torn down, results kept ---------------------------------------


@dataclass
class LiveRun:
    """What the boots of one scenario left: their records, consoles, and the origin's log."""

    suite: str
    scenario: str
    results: list[dict[str, Any]] = field(default_factory=list)
    boots: list[Boot] = field(default_factory=list)
    journals: list[list[dict[str, Any]]] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)
    timings: list[str] = field(default_factory=list)

    def step(self, name: str, boot: int = 0) -> dict[str, Any]:
        """The record of step *name* of boot *boot*; fails with the reason it is missing."""
        results = self.results[boot] if boot < len(self.results) else {}
        steps = results.get("steps", {})
        error = results.get("error")
        if name in steps and not (error and error.get("step") == name):
            return dict(steps[name])
        if error:
            why = f"step {error['step']!r} raised:\n{error['traceback']}"
        elif boot < len(self.boots) and self.boots[boot].timed_out:
            why = f"the boot was killed after {BOOT_TIMEOUT} s"
        else:
            why = "the scenario did not get there"
        console = self.boots[boot].tail() if boot < len(self.boots) else "(no boot)"
        raise AssertionError(
            f"[{self.suite}] {self.scenario} boot {boot + 1}: no record of step {name!r}: {why}\n"
            f"-- console (last lines):\n{console}"
        )

    def between(self, start: str, end: str | None = None) -> list[RequestRecord]:
        """The origin's requests from mark *start* to mark *end* (or the end)."""
        return self.requests[self.marks[start] : None if end is None else self.marks[end]]


def _boot_scenario(
    machine: Machine,
    run: LiveRun,
    config: dict[str, Any],
    deb: Path,
    work: Path,
    after: tuple[str, ...] = (),
) -> None:
    """Boot *machine* once to run *config*'s scenario; keep its results in *run*.

    The test unit starts after ``multi-user.target`` and the units *after* (a ``nofail`` fstab
    line's mount unit is not waited for by any target).
    """
    number = len(run.boots) + 1
    inputs, results = work / f"input-{number}", work / f"results-{number}"
    inputs.mkdir()
    results.mkdir()
    shutil.copyfile(CHECKS, inputs / CHECKS.name)
    (inputs / "config.json").write_text(json.dumps(config))
    unit = machine.path(f"/etc/systemd/system/{TEST_UNIT}")
    unit.write_text(
        "[Unit]\n"
        "Description=remotefs live-systemd checks (tests/test_systemd_live.py)\n"
        f"After={' '.join(['multi-user.target', *after])}\n"
        "[Service]\n"
        "Type=oneshot\n"
        "StandardOutput=journal+console\n"
        "StandardError=journal+console\n"
        f"ExecStart=/bin/sh -c '/usr/bin/python3 /test/{CHECKS.name}; systemctl exit $$?'\n"
    )
    boot = machine.boot(
        TEST_UNIT,
        binds=[
            f"--bind-ro={inputs}:/test",
            f"--bind-ro={deb}:/pkg/remotefs.deb",
            f"--bind={results}:/results",
        ],
        timeout=BOOT_TIMEOUT,
    )
    run.boots.append(boot)
    run.timings.append(f"boot {number}: {boot.seconds:.1f} s")
    try:
        run.results.append(json.loads((results / "results.json").read_text()))
    except (OSError, ValueError):
        run.results.append({})
    journal = []
    journal_file = results / "journal.json"
    if journal_file.exists():
        for line in journal_file.read_text(errors="replace").splitlines():
            if line.strip():
                journal.append(json.loads(line))
    run.journals.append(journal)


@contextlib.contextmanager
def _machine(suite: str, run: LiveRun) -> Iterator[Machine]:
    """A machine of *suite*; whatever its teardown had to clean up goes to run.leftovers."""
    started = time.monotonic()
    with booted_machine(suite) as machine:
        run.timings.append(f"tree and overlay: {time.monotonic() - started:.1f} s")
        yield machine
    run.leftovers += machine.leftovers
    for path in (machine.run_dir, *machine.cgroups):
        if path.exists():
            run.leftovers.append(f"{path} still exists")


def _install_before_boot(machine: Machine, deb: Path) -> None:
    """dpkg -i in the machine, not booted: what it needs at boot is there (fstab's helper)."""
    machine.run("dpkg", "-i", "/pkg/remotefs.deb", binds=[f"--bind-ro={deb}:/pkg/remotefs.deb"])


def _origin_files(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Random files under *root*; their sha256 by name."""
    return {name: sha256(write_random(root / name, size)) for name, size in sizes.items()}


def _finish(run: LiveRun, origin: LiveOrigin, started: float) -> LiveRun:
    origin.wait_idle()
    run.requests, run.marks = origin.requests, dict(origin.marks)
    run.timings.append(f"total {time.monotonic() - started:.1f} s")
    print(f"[{run.suite}] {run.scenario}: " + "; ".join(run.timings))
    return run


# -- service: remotefs@t.service ------------------------------------------------------------

SERVICE_FILES = {"one.bin": 300 * 1024 + 7, "slow.bin": 100 * 1024, "two.bin": 50 * 1024 + 1}
RELOAD_FILES = {"three.bin": 70 * 1024 + 3}


@pytest.fixture(scope="module", params=_suites())
def service_run(
    request: pytest.FixtureRequest,
    live_tools: None,
    built_debs: DebBuilds,
    tmp_path_factory: pytest.TempPathFactory,
) -> LiveRun:
    suite: str = request.param
    started = time.monotonic()
    work = tmp_path_factory.mktemp(f"live-service-{suite}")
    expected = _origin_files(work / "origin", {**SERVICE_FILES, **RELOAD_FILES})
    run = LiveRun(suite, "service", expected=expected)
    deb = built_debs.get(suite, SYSTEMD_PACKAGES)
    run.timings.append(f".deb {built_debs.origins[suite]}")
    with LiveOrigin(work / "origin", {"/slow.bin": SLOW_PROBE}) as origin:
        url = origin.url
        config = {
            "scenario": "service",
            "origin": url("").rstrip("/"),
            "name": "t",
            "mountpoint": "/mnt/t",
            "status_interval": STATUS_INTERVAL,
            "conf": (
                "MOUNTPOINT=/mnt/t\n"
                f"OPTIONS=--no-fill --status-interval {STATUS_INTERVAL} --log-level debug"
                " --header-file /etc/remotefs/t.headers\n"
            ),
            "headers": f"X-Test-Token: {HEADER_SECRET}\n",
            # A URL with a secret query, and one that is missing (its warnings name it).
            "urls": (
                f"{url('one.bin')}?sig={QUERY_SECRET}\n{url('slow.bin')}\n{url('two.bin')}\n"
                f"{url('missing.bin')}?token={QUERY_SECRET}\n"
            ),
            "reloaded_urls": (
                f"{url('one.bin')}?sig={QUERY_SECRET}\n{url('slow.bin')}\n{url('three.bin')}\n"
                f"{url('missing.bin')}?token={QUERY_SECRET}\n"
            ),
        }
        with _machine(suite, run) as machine:
            _boot_scenario(machine, run, config, deb, work)
        return _finish(run, origin, started)


def _assert_digests(run: LiveRun, seen: dict[str, str], names: list[str], what: str) -> None:
    assert sorted(seen) == sorted(names), f"[{run.suite}] {what}: files {sorted(seen)}"
    wrong = [name for name in names if seen[name] != run.expected[name]]
    assert not wrong, f"[{run.suite}] {what}: differ from the origin's: {wrong}"


def test_enable_now_returns_once_the_mount_answers(service_run: LiveRun) -> None:
    run = service_run
    install = run.step("install")
    assert install["dpkg"]["rc"] == 0, install["dpkg"]
    step = run.step("enable_now")
    assert step["run"]["rc"] == 0, step["run"]
    assert step["run"]["seconds"] >= SLOW_PROBE, (
        f"systemctl enable --now returned after {step['run']['seconds']} s, before the probe of"
        f" slow.bin was answered ({SLOW_PROBE} s): it did not wait for READY=1"
    )
    assert step["fstype"] == "fuse.remotefs", f"not mounted right after enable --now: {step}"
    assert step.get("listing") == sorted(SERVICE_FILES), step
    assert step["state"]["ActiveState"] == "active", step["state"]
    # The unit's LimitNOFILE= is in effect (clamped by systemd to the hard limit it may give:
    # inside the test machine, the host's).
    soft = int(step["limit"].split()[0])
    assert soft > 1024, f"the daemon runs with systemd's default soft limit: {step['limit']}"


def test_files_read_back_equal_to_the_origin_also_from_another_unit(service_run: LiveRun) -> None:
    run = service_run
    step = run.step("read")
    _assert_digests(run, step["digests"], sorted(SERVICE_FILES), "read through /mnt/t")
    other = step["other_unit"]
    assert other["rc"] == 0, f"systemd-run could not read the mount: {other}"
    assert other["out"].split()[0] == run.expected[step["other_unit_file"]], other


def test_status_shows_the_progress_line(service_run: LiveRun) -> None:
    status = service_run.step("status")["status"]["out"]
    line = re.search(r'Status: "(.*)"', status)
    assert line, f"no Status: line in systemctl status:\n{status}"
    total = sum(SERVICE_FILES.values())
    assert re.fullmatch(
        r"serving 3 files; cached (.+) of (.+) \(100%\); \d+\.\d KiB from origins since mount",
        line.group(1),
    ), f"{line.group(1)!r} (after reading all {total} bytes)"


def test_reload_applies_an_edited_url_list(service_run: LiveRun) -> None:
    run = service_run
    step = run.step("reload")
    assert step["run"]["rc"] == 0, step["run"]
    assert step["same_pid"], "systemctl reload restarted the daemon"
    names = sorted(["one.bin", "slow.bin", "three.bin"])
    assert step["listing"] == names, step["listing"]
    _assert_digests(run, step["digests"], names, "after the reload")


def test_stop_unmounts_and_saves_so_a_restart_rereads_for_free(service_run: LiveRun) -> None:
    run = service_run
    stop = run.step("stop")
    assert stop["run"]["rc"] == 0, stop["run"]
    assert stop["fstype"] is None, f"still mounted after systemctl stop: {stop['fstype']}"
    assert stop["state"]["ActiveState"] == "inactive", stop["state"]
    assert stop["state"]["Result"] == "success", stop["state"]
    assert stop["daemons"] == [], f"daemon processes left: {stop['daemons']}"
    restart = run.step("restart")
    assert restart["run"]["rc"] == 0, restart["run"]
    names = sorted(["one.bin", "slow.bin", "three.bin"])
    _assert_digests(run, restart["digests"], names, "after the restart")
    requests = run.between("restart", "restart-read")
    assert sum(_is_probe(r) for r in requests) >= 3, "the restart did not probe its URLs"
    assert data_bytes(requests) == 0, (
        f"the restart downloaded {data_bytes(requests)} bytes again:"
        f" {[(r.path, r.range_header) for r in requests if not _is_probe(r)]}"
    )


def test_sigkill_is_followed_by_a_restart_and_the_dead_mount_is_cleared(
    service_run: LiveRun,
) -> None:
    run = service_run
    step = run.step("sigkill")
    timeline = step["timeline"]
    waiting = [seen for seen in timeline if seen["state"] == "activating/auto-restart"]
    assert waiting, f"systemd never scheduled a restart: {timeline}"
    assert all(seen["fstype"] is None for seen in waiting), (
        f"the dead mount was not cleared before the restart: {timeline}"
    )
    after = step["after"]
    assert after["ActiveState"] == "active", f"not restarted: {after}; {timeline}"
    assert after["MainPID"] != step["before"]["MainPID"], after
    assert after["NRestarts"] == "1", after
    _assert_digests(
        run, step["digests"], sorted(["one.bin", "slow.bin", "three.bin"]), "after the restart"
    )


LEVEL = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d|\b\d\d:\d\d:\d\d\b")


def test_journal_has_one_line_per_event_and_no_secret(service_run: LiveRun) -> None:
    run = service_run
    step = run.step("journal")
    entries = [json.loads(line) for line in step["unit"]["out"].splitlines() if line.strip()]
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "remotefs"]
    # The three daemons (enable --now, start after stop, restart after SIGKILL); the other
    # remotefs lines are what ExecReload's `remotefs reload` printed.
    daemons = {
        run.step("enable_now")["state"]["MainPID"],
        run.step("sigkill")["before"]["MainPID"],
        run.step("sigkill")["after"]["MainPID"],
    }
    assert len(daemons) == 3, daemons
    messages = [str(e.get("MESSAGE")) for e in ours if e.get("_PID") in daemons]
    assert messages, f"no line of the daemons {daemons} in journalctl -u remotefs@t: {ours[:5]}"
    # A line of its own for each event, starting with its level: a message spread over several
    # lines (a traceback, say) would leave lines without one.
    bad = [m for m in messages if not LEVEL.match(m)]
    bad += [str(e.get("MESSAGE")) for e in ours if "\n" in str(e.get("MESSAGE"))]
    assert not bad, f"lines that are not one event each: {bad[:10]}"
    stamped = [str(e.get("MESSAGE")) for e in ours if TIMESTAMP.search(str(e.get("MESSAGE")))]
    assert not stamped, f"lines with a timestamp of their own: {stamped[:10]}"
    # Started three times (enable --now, start after stop, restart after SIGKILL); stopped once
    # with its state saved (the SIGKILL gave it no chance).
    mounted = [m for m in messages if m.startswith("INFO remotefs.daemon.serve: mounted /mnt/t ")]
    assert len(mounted) == 3, mounted
    saved = [m for m in messages if m.endswith(": unmounted; saving state")]
    assert len(saved) == 1, saved
    assert any("missing.bin" in m for m in messages), "the missing URL was never logged"
    # The secrets were in use: the origin saw the header and the query.
    assert any(r.headers.get("x-test-token") == HEADER_SECRET for r in run.requests)
    everything = json.dumps(run.journals[0]) + json.dumps(run.results[0])
    for secret in (QUERY_SECRET, HEADER_SECRET):
        assert secret not in everything, f"{secret} appears in the journal or the checks' output"
    assert len(run.journals[0]) > 50, "the boot's journal is missing"


def test_package_removal_stops_the_service(service_run: LiveRun) -> None:
    step = service_run.step("remove")
    assert step["dpkg"]["rc"] == 0, step["dpkg"]
    assert step["fstype"] is None, "still mounted after dpkg --remove"
    assert step["state"]["ActiveState"] in ("inactive", "failed"), step["state"]
    assert step["daemons"] == [], step["daemons"]


#: The column of each release in systemd/README.md's exposure table.
EXPOSURE_COLUMNS = {"bookworm": 1, "trixie": 2}


def _documented_exposure(suite: str) -> str:
    """The exposure systemd/README.md's table gives for the shipped unit on *suite*."""
    row = re.search(r"^\| after \|.*$", README.read_text(), re.MULTILINE)
    assert row, "systemd/README.md has no '| after |' row of exposures"
    cells = [cell.strip() for cell in row.group(0).strip("|").split("|")]
    value = re.match(r"\d+\.\d", cells[EXPOSURE_COLUMNS[suite]])
    assert value, f"no exposure for {suite} in {row.group(0)!r}"
    return value.group(0)


def test_security_exposure_is_the_documented_one(service_run: LiveRun) -> None:
    run = service_run
    analyze = run.step("security")["analyze"]
    found = re.search(r"Overall exposure level for remotefs@t\.service: (\d+\.\d)", analyze["out"])
    assert found, analyze
    print(f"[{run.suite}] systemd-analyze security: {found.group(1)}")
    assert found.group(1) == _documented_exposure(run.suite), analyze["out"][-3000:]


def test_service_machine_left_nothing_behind(service_run: LiveRun) -> None:
    _assert_clean(service_run)


def _assert_clean(run: LiveRun) -> None:
    """Every boot ended by its test unit, and nothing was left to clean up after a boot."""
    for number, boot in enumerate(run.boots, 1):
        assert not boot.timed_out, (
            f"boot {number} was killed after {BOOT_TIMEOUT} s (what was then cleaned up:"
            f" {run.leftovers}):\n{boot.tail()}"
        )
        assert boot.status == 0, f"boot {number}: test unit exited {boot.status}:\n{boot.tail()}"
    assert not run.leftovers, f"[{run.suite}] {run.scenario}: cleaned up after: {run.leftovers}"


# -- fstab: mounted at boot, automount, a reboot --------------------------------------------

FSTAB_FILES = {"boot/a.bin": 200 * 1024 + 11, "boot/b.bin": 150 * 1024 + 5, "auto/c.bin": 80 * 1024}
FSTAB = (
    "/etc/remotefs/boot.txt /mnt/remote fuse.remotefs"
    " ro,_netdev,nofail,no_fill,cache_dir=/var/cache/remotefs/boot 0 0\n"
    "/etc/remotefs/auto.txt /mnt/auto fuse.remotefs"
    " ro,_netdev,nofail,x-systemd.automount,no_fill,cache_dir=/var/cache/remotefs/auto 0 0\n"
)


@pytest.fixture(scope="module", params=_suites())
def fstab_run(
    request: pytest.FixtureRequest,
    live_tools: None,
    built_debs: DebBuilds,
    tmp_path_factory: pytest.TempPathFactory,
) -> LiveRun:
    suite: str = request.param
    started = time.monotonic()
    work = tmp_path_factory.mktemp(f"live-fstab-{suite}")
    expected = _origin_files(work / "origin", FSTAB_FILES)
    run = LiveRun(suite, "fstab", expected=expected)
    deb = built_debs.get(suite, SYSTEMD_PACKAGES)
    with LiveOrigin(work / "origin") as origin:
        with _machine(suite, run) as machine:
            _install_before_boot(machine, deb)
            remotefs = machine.path("/etc/remotefs")
            remotefs.mkdir()
            (remotefs / "boot.txt").write_text(
                f"{origin.url('boot/a.bin')}\n{origin.url('boot/b.bin')}\n"
            )
            (remotefs / "auto.txt").write_text(f"{origin.url('auto/c.bin')}\n")
            machine.path("/etc/fstab").write_text(FSTAB)
            # The first boot, then a reboot of the same machine (its /var/cache kept).
            for boot in (1, 2):
                origin.marks[f"boot{boot}"] = len(origin.requests)
                config = {
                    "scenario": "fstab",
                    "boot": boot,
                    "origin": origin.url("").rstrip("/"),
                    "mountpoint": "/mnt/remote",
                    "automount": "/mnt/auto",
                    "mount_unit": "mnt-remote.mount",
                    "automount_unit": "mnt-auto.automount",
                    "urls_file": "/etc/remotefs/boot.txt",
                    "log_file": "/var/cache/remotefs/boot/remotefs.log",
                    "read_first": ["a.bin"],
                }
                _boot_scenario(machine, run, config, deb, work, after=("mnt-remote.mount",))
                origin.wait_idle()
        return _finish(run, origin, started)


def test_fstab_line_is_mounted_at_boot_by_its_mount_unit(fstab_run: LiveRun) -> None:
    run = fstab_run
    for boot in (0, 1):
        step = run.step("at_boot", boot)
        assert step["fstype"] == "fuse.remotefs", f"boot {boot + 1}: /mnt/remote: {step}"
        unit = step["mount_unit"]
        assert unit["ActiveState"] == "active" and unit["SourcePath"] == "/etc/fstab", unit
        assert step["failed"].strip() == "", f"failed units: {step['failed']}"
        read = run.step("read", boot)
        _assert_digests(
            run,
            {f"boot/{k}": v for k, v in read["digests"].items()},
            ["boot/a.bin"],
            f"boot {boot + 1}",
        )


def test_stopping_the_mount_unit_unmounts_cleanly(fstab_run: LiveRun) -> None:
    run = fstab_run
    for boot in (0, 1):
        step = run.step("stop", boot)
        assert step["daemons_before"], "no daemon was running for /mnt/remote"
        assert step["run"]["rc"] == 0, step["run"]
        assert step["fstype"] is None, f"boot {boot + 1}: still mounted: {step['fstype']}"
        assert step["state"]["ActiveState"] == "inactive", step["state"]
        assert step["state"]["Result"] == "success", step["state"]
        assert step["daemons"] == [], f"the daemon did not exit after the unmount: {step}"
        print(
            f"[{run.suite}] boot {boot + 1}: the daemon exited"
            f" {step['daemon_exit_seconds']} s after systemctl stop returned"
        )
        again = run.step("start_again", boot)
        assert again["run"]["rc"] == 0 and again["fstype"] == "fuse.remotefs", again
        _assert_digests(
            run,
            {f"boot/{k}": v for k, v in again["digests"].items()},
            ["boot/a.bin", "boot/b.bin"],
            f"boot {boot + 1}, mounted again",
        )
    # Each unmount saved the state: the stop of boot 1, its shutdown, the stop of boot 2.
    log = run.step("stop", 1)["log"]
    assert log.count("unmounted; saving state") == 3, log[-3000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_the_automount_line_becomes_units_systemd_accepts(fstab_run: LiveRun) -> None:
    """systemd-fstab-generator's output for the x-systemd.automount line, checked by
    ``systemd-analyze verify`` in the machine: needs no autofs, so it runs on every kernel."""
    at_boot = fstab_run.step("at_boot", 0)
    generated = at_boot["generated"]
    automount, mount = generated["mnt-auto.automount"], generated["mnt-auto.mount"]
    assert automount is not None and mount is not None, generated
    assert _unit_settings(automount, "Automount") == {"Where": ["/mnt/auto"]}, automount
    settings = _unit_settings(mount, "Mount")
    assert settings["What"] == ["/etc/remotefs/auto.txt"], mount
    assert settings["Where"] == ["/mnt/auto"], mount
    assert settings["Type"] == ["fuse.remotefs"], mount
    options = settings["Options"][0].split(",")
    assert {"x-systemd.automount", "no_fill", "cache_dir=/var/cache/remotefs/auto"} <= set(
        options
    ), mount
    # _netdev: systemd orders the mount after the network, as the README promises.
    assert "network-online.target" in at_boot["auto_mount_order"], at_boot["auto_mount_order"]
    assert at_boot["verify"]["rc"] == 0, at_boot["verify"]
    assert at_boot["verify"]["err"].strip() == "", at_boot["verify"]


def _unit_settings(text: str, section: str) -> dict[str, list[str]]:
    """``Key=value`` lines of one [section] of a unit file, each key's values in order."""
    settings: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_automount_mounts_on_first_access(fstab_run: LiveRun) -> None:
    """With autofs: the first access mounts /mnt/auto. Without it (no /dev/autofs), systemd
    leaves the automount unit inactive, and the generated mount unit is started directly: the
    part not run is the kernel's trigger on first access, and the test says so in one line."""
    run = fstab_run
    problem = KERNEL.autofs_problem()
    for boot in (0, 1):
        at_boot = run.step("at_boot", boot)
        step = run.step("automount", boot)
        assert at_boot["dev_autofs"] == (problem is None), (
            f"the host's kernel: {problem or 'autofs'}, but the machine's /dev/autofs"
            f" exists: {at_boot['dev_autofs']}"
        )
        if problem is None:
            assert at_boot["auto_fstype"] == "autofs", f"/mnt/auto at boot: {at_boot}"
            assert at_boot["automount_unit"]["ActiveState"] == "active", at_boot
        else:
            # What a user sees on such a kernel: no mount there, the unit left inactive.
            assert at_boot["auto_fstype"] is None, at_boot
            assert at_boot["automount_unit"]["ActiveState"] == "inactive", at_boot
            assert step["listing_before"] in (None, []), step
            started = step["start_automount"]
            assert started["rc"] != 0 and "not supported" in started["err"], started
            assert step["start_mount"]["rc"] == 0, step["start_mount"]
        assert at_boot["auto_mount_unit"]["ActiveState"] == "inactive", at_boot
        assert "error" not in step, (
            f"boot {boot + 1}: the first access to /mnt/auto failed: {step['error']}\n"
            f"journalctl -u mnt-auto.automount -u mnt-auto.mount:\n{step['journal']}"
        )
        assert step["listing"] == ["c.bin"], step
        assert step["fstype"] == "fuse.remotefs", step
        assert step["auto_mount_unit"]["ActiveState"] == "active", step
        _assert_digests(
            run, {f"auto/{k}": v for k, v in step["digests"].items()}, ["auto/c.bin"], "automount"
        )
    # Its cache survives the reboot like any other.
    second = _under(run.between("boot2"), "/auto/")
    assert data_bytes(second) == 0, f"the second boot downloaded c.bin again: {second}"
    if problem is not None:
        note_kernel_gap("autofs", problem, "the mount of /mnt/auto on first access")


def _under(records: list[RequestRecord], prefix: str) -> list[RequestRecord]:
    return [r for r in records if r.path.startswith(prefix)]


def test_a_reboot_rereads_cached_bytes_for_free(fstab_run: LiveRun) -> None:
    run = fstab_run
    first = _under(run.between("boot1", "boot2"), "/boot/")
    size = FSTAB_FILES["boot/a.bin"] + FSTAB_FILES["boot/b.bin"]
    assert data_bytes(first) >= size, "the first boot did not read both files"
    second = _under(run.between("boot2"), "/boot/")
    assert sum(_is_probe(r) for r in second) >= 2, "the second boot did not probe its URLs"
    assert data_bytes(second) == 0, (
        f"the second boot downloaded {data_bytes(second)} bytes again:"
        f" {[(r.path, r.range_header) for r in second if not _is_probe(r)]}"
    )


def test_fstab_machine_left_nothing_behind(fstab_run: LiveRun) -> None:
    _assert_clean(fstab_run)


# -- many: 5,000 URLs under systemd's default limits ---------------------------------------


@pytest.fixture(scope="module", params=_suites())
def many_run(
    request: pytest.FixtureRequest,
    live_tools: None,
    built_debs: DebBuilds,
    tmp_path_factory: pytest.TempPathFactory,
) -> LiveRun:
    suite: str = request.param
    started = time.monotonic()
    work = tmp_path_factory.mktemp(f"live-many-{suite}")
    names = [f"d{i // 500}/f{i}.bin" for i in range(MANY)]
    lines = []
    for name in names:
        data = os.urandom(100 + len(name))
        (work / "origin" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "origin" / name).write_bytes(data)
        lines.append(f"{name} {sha256(data)}")
    combined = sha256("\n".join(sorted(lines)).encode())
    run = LiveRun(suite, "many", expected={"digest": combined})
    deb = built_debs.get(suite, SYSTEMD_PACKAGES)
    with LiveOrigin(work / "origin") as origin:
        with _machine(suite, run) as machine:
            _install_before_boot(machine, deb)
            urls = machine.path("/etc/remotefs/many.txt")
            urls.parent.mkdir()
            urls.write_text("".join(f"{origin.url(name)} {name}\n" for name in names))
            machine.path("/etc/fstab").write_text(
                "/etc/remotefs/many.txt /mnt/many fuse.remotefs"
                " ro,noauto,no_fill,x-systemd.mount-timeout=300,cache_dir=/var/cache/remotefs/many"
                " 0 0\n"
            )
            config = {
                "scenario": "many",
                "origin": origin.url("").rstrip("/"),
                "mount_unit": "mnt-many.mount",
                "mountpoint": "/mnt/many",
                "urls_file": "/etc/remotefs/many.txt",
                "log_file": "/var/cache/remotefs/many/remotefs.log",
            }
            _boot_scenario(machine, run, config, deb, work)
        return _finish(run, origin, started)


def test_5000_urls_mount_under_systemds_default_limit(many_run: LiveRun) -> None:
    run = many_run
    step = run.step("mount")
    soft = int(step["default_limit"].split()[0])
    assert soft < MANY, f"systemd's default soft LimitNOFILE here is {soft}: no test of {MANY}"
    log = step.get("log", "")[-3000:]
    assert step["run"]["rc"] == 0, f"systemctl start mnt-many.mount: {step['run']}\n{log}"
    assert step["files"] == MANY, f"{step['files']} files listed\n{log}"
    assert step["digest"] == run.expected["digest"], "the files read differ from the origin's"
    assert step["stop"]["rc"] == 0 and step["fstype"] is None, step["stop"]
    print(
        f"[{run.suite}] {MANY} URLs: default limit {step['default_limit']},"
        f" the daemon's {step.get('daemon_limit')}; start {step['run']['seconds']} s,"
        f" stop {step['stop']['seconds']} s"
    )


def test_many_machine_left_nothing_behind(many_run: LiveRun) -> None:
    _assert_clean(many_run)


# -- hardening: which sandboxing settings keep the mount visible ----------------------------

#: Sandboxing settings the unit leaves out, each added by a drop-in to the shipped unit in turn.
#: "hidden": the service gives itself a mount namespace, mounts there and reports ready, but the
#: mount is not visible outside it. "fails": the service cannot mount at all. The unit's comment
#: and systemd/README.md say so; this checks it on every release the tier boots.
LEFT_OUT = {
    "ProtectSystem=strict": (["ProtectSystem=strict"], "hidden"),
    "ProtectSystem=full": (["ProtectSystem=full"], "hidden"),
    "ProtectSystem=strict with MountFlags=shared": (
        ["ProtectSystem=strict", "MountFlags=shared"],
        "hidden",
    ),
    "ProtectHome=read-only": (["ProtectHome=read-only"], "hidden"),
    "PrivateTmp=yes": (["PrivateTmp=yes"], "hidden"),
    "PrivateMounts=yes": (["PrivateMounts=yes"], "hidden"),
    "PrivateIPC=yes": (["PrivateIPC=yes"], "hidden"),
    "ProtectKernelTunables=yes": (["ProtectKernelTunables=yes"], "hidden"),
    "ProtectKernelModules=yes": (["ProtectKernelModules=yes"], "hidden"),
    "ProtectKernelLogs=yes": (["ProtectKernelLogs=yes"], "hidden"),
    "ProtectControlGroups=yes": (["ProtectControlGroups=yes"], "hidden"),
    "ProtectProc=invisible": (["ProtectProc=invisible"], "hidden"),
    "ProcSubset=pid": (["ProcSubset=pid"], "hidden"),
    "PrivateDevices=yes": (["PrivateDevices=yes"], "fails"),  # no /dev/fuse
    "PrivateUsers=yes": (["PrivateUsers=yes"], "fails"),  # no CAP_SYS_ADMIN where it counts
}
SHIPPED = "the shipped unit"
HARDENING_FILES = {"h.bin": 40 * 1024 + 9}


@pytest.fixture(scope="module", params=_suites())
def hardening_run(
    request: pytest.FixtureRequest,
    live_tools: None,
    built_debs: DebBuilds,
    tmp_path_factory: pytest.TempPathFactory,
) -> LiveRun:
    suite: str = request.param
    started = time.monotonic()
    work = tmp_path_factory.mktemp(f"live-hardening-{suite}")
    run = LiveRun(suite, "hardening", expected=_origin_files(work / "origin", HARDENING_FILES))
    deb = built_debs.get(suite, SYSTEMD_PACKAGES)
    with LiveOrigin(work / "origin") as origin:
        with _machine(suite, run) as machine:
            _install_before_boot(machine, deb)
            machine.path("/mnt/h").mkdir(parents=True)
            config = {
                "scenario": "hardening",
                "origin": origin.url("").rstrip("/"),
                "name": "h",
                "mountpoint": "/mnt/h",
                "conf": "MOUNTPOINT=/mnt/h\nOPTIONS=--no-fill\n",
                "urls": f"{origin.url('h.bin')}\n",
                "candidates": {
                    SHIPPED: [],
                    **{label: settings for label, (settings, _) in LEFT_OUT.items()},
                },
            }
            _boot_scenario(machine, run, config, deb, work)
        return _finish(run, origin, started)


def test_the_shipped_units_mount_is_visible_and_readable_outside_it(hardening_run: LiveRun) -> None:
    run = hardening_run
    step = run.step(SHIPPED)
    assert step["start"]["rc"] == 0, step["start"]
    assert step["fstype"] == "fuse.remotefs", f"not in PID 1's mount table: {step}"
    assert step.get("digests") == {"h.bin": run.expected["h.bin"]}, step
    assert step["reload"]["rc"] == 0, step["reload"]
    assert step["stop"]["rc"] == 0 and step["stopped"]["ActiveState"] == "inactive", step
    assert step["left_mounted"] is None, step


@pytest.mark.parametrize("label", sorted(LEFT_OUT))
def test_a_setting_left_out_of_the_unit_hides_its_mount_or_fails(
    hardening_run: LiveRun, label: str
) -> None:
    step = hardening_run.step(label)
    expected = LEFT_OUT[label][1]
    assert step["fstype"] is None, f"with {label}, the mount is visible outside the service"
    if expected == "hidden":
        assert step["start"]["rc"] == 0, step["start"]
        assert step["state"]["ActiveState"] == "active", step["state"]
        assert step["inside"] == "fuse.remotefs", (
            f"with {label}, the daemon does not see its own mount: {step}"
        )
    else:
        assert step["start"]["rc"] != 0, f"with {label}, the service started: {step['state']}"


def test_hardening_machine_left_nothing_behind(hardening_run: LiveRun) -> None:
    _assert_clean(hardening_run)
