"""Test machines with systemd as PID 1: a cached Debian tree booted by ``systemd-nspawn``.

``Machine`` mounts an overlay of a cached tree (``tests/chroot.py``'s ``base_tree`` with
``SYSTEMD_PACKAGES`` included: the tree itself is never written) at
``/var/tmp/remotefs-test-trees/runs/SUITE-PID-ID/root``, and boots it as often as a test needs:
the overlay's upper directory stays between boots, so a second boot is a reboot of the same
machine (its ``/etc``, ``/var/cache``... are as the first boot left them). nspawn's own
``--volatile=overlay`` would keep the tree pristine as well, but would forget everything at every
boot.

Every boot runs ``systemd-nspawn --register=no --keep-unit`` (the host runs no systemd, so there
is no machined to register with) from a private cgroup, ``remotefs-test-PID-ID``, created in the
host's ``name=systemd`` and unified (cgroup2) hierarchies: nspawn then creates its ``payload/``
and ``supervisor/`` cgroups under it instead of under the cgroup the tests run in. The machine
shares the host's network namespace (no ``--private-network``), so an origin on the host's
127.0.0.1 is reachable from inside, and gets the host's ``/dev/fuse`` (and ``/dev/autofs``, without
which systemd refuses to start automount units). A boot runs one test unit:
``-b -- systemd.wants=UNIT``, a oneshot unit ordered after ``multi-user.target`` that ends with
``systemctl exit N``, so nspawn's exit status is the test's. The console (``--console=read-only``:
systemd's status lines and the test unit's output) is kept for the report.

``Machine.close()`` (always called, from ``finally``) kills whatever is left in the private
cgroups (``cgroup.kill``, then SIGKILL to each listed pid), removes them deepest first, removes
nspawn's propagation directory of the machine if it was left, and tears the run directory down
as ``tests/chroot.py`` does (unmount deepest first, check, delete). What had to be killed or
removed besides the overlay is kept in ``leftovers`` for the caller to report. Private cgroups
of test processes that died are removed by the next ``Machine``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .chroot import TREES, _run, base_tree, teardown

#: What a tree needs to boot with systemd as PID 1 and run remotefs's .deb without the network:
#: its Depends are python3.X, fuse3 and libraries that a minbase system already has.
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "fuse3")
CGROUP_PREFIX = "remotefs-test-"
#: nspawn's directory for a machine's propagated mounts, on the host.
PROPAGATE = Path("/run/systemd/nspawn/propagate")


def nspawn_problem() -> str | None:
    """Why machines cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a test machine needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (Debian package systemd-container; scripts/setup.sh test)"
    if not cgroup_roots():
        return "no writable name=systemd or cgroup2 hierarchy under /sys/fs/cgroup"
    return None


def cgroup_roots() -> list[Path]:
    """The mountpoints of the hierarchies nspawn uses: name=systemd (cgroup v1) and cgroup2.

    On a mixed layout both (``/sys/fs/cgroup/systemd``, ``/sys/fs/cgroup/unified``); on a
    cgroup2-only host just ``/sys/fs/cgroup``.
    """
    roots = []
    with open("/proc/self/mounts", encoding="utf-8") as table:
        for line in table:
            _source, point, fstype, options = line.split(" ")[:4]
            named = fstype == "cgroup" and "name=systemd" in options.split(",")
            if (named or fstype == "cgroup2") and os.access(point, os.W_OK):
                roots.append(Path(point))
    return roots


def _cgroup_dirs(top: Path) -> list[Path]:
    """*top* and every cgroup below it, deepest first."""
    found = [Path(directory) for directory, _dirs, _files in os.walk(top)]
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def _cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for directory in _cgroup_dirs(top):
        with contextlib.suppress(OSError):
            pids.update(int(pid) for pid in (directory / "cgroup.procs").read_text().split())
    return pids


def remove_cgroup(top: Path) -> list[str]:
    """Kill every process in the cgroup *top* and below, then remove those cgroups.

    Returns what was found there (processes, for the caller to report). Raises if a cgroup
    cannot be removed within a few seconds.
    """
    if not top.exists():
        return []
    found = [f"process {pid} in {top}" for pid in sorted(_cgroup_pids(top))]
    deadline = time.monotonic() + 15
    while True:
        pids = _cgroup_pids(top)
        if pids:
            kill = top / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for directory in _cgroup_dirs(top):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if not top.exists():
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"cannot remove the cgroup {top}: {_cgroup_dirs(top)}")
        time.sleep(0.1)


def _clean_dead_cgroups() -> None:
    """Remove the private cgroups of test processes that no longer exist."""
    for root in cgroup_roots():
        for group in root.glob(f"{CGROUP_PREFIX}*"):
            pid = group.name[len(CGROUP_PREFIX) :].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(AssertionError):
                    remove_cgroup(group)


@dataclass
class Boot:
    """One boot: nspawn's exit status (the test unit's ``systemctl exit N``) and console."""

    status: int
    console: str
    seconds: float
    timed_out: bool

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


class Machine:
    """An overlay of a systemd tree, booted with nspawn; see the module's docstring."""

    def __init__(self, tree: Path, suite: str) -> None:
        _clean_dead_cgroups()
        run_id = uuid.uuid4().hex[:8]
        self.run_dir = TREES / "runs" / f"{suite}-{os.getpid()}-{run_id}"
        self.root = self.run_dir / "root"
        self.name = f"rfs-{suite}-{run_id}"  # also the machine's hostname
        self.cgroups = [root / f"{CGROUP_PREFIX}{os.getpid()}-{run_id}" for root in cgroup_roots()]
        self.leftovers: list[str] = []
        for sub in ("upper", "work", "root"):
            (self.run_dir / sub).mkdir(parents=True)
        try:
            upper, work = self.run_dir / "upper", self.run_dir / "work"
            options = f"lowerdir={tree},upperdir={upper},workdir={work}"
            _run("mount", "-t", "overlay", "remotefs-test", "-o", options, self.root)
            for group in self.cgroups:
                group.mkdir()
        except BaseException:
            self.close()
            raise

    def path(self, inside: str) -> Path:
        """The host path of a path inside the machine (valid while it is not booted, too)."""
        return self.root / inside.lstrip("/")

    def _nspawn(
        self, arguments: Sequence[str], binds: Sequence[str], timeout: float
    ) -> tuple[int, str, bool]:
        """Run nspawn from the private cgroups; (exit status, output, timed out)."""
        moves = " && ".join(f'echo $$ > "{group}/cgroup.procs"' for group in self.cgroups)
        command = [
            "/bin/sh",
            "-c",
            f'{moves} && exec "$@"',
            "nspawn",
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            f"--machine={self.name}",
            f"--directory={self.root}",
            "--bind=/dev/fuse",
            # systemd starts automount units only where /dev/autofs exists.
            *(["--bind=/dev/autofs"] if Path("/dev/autofs").exists() else []),
            *binds,
            *arguments,
        ]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            )
        except subprocess.TimeoutExpired as expired:
            # subprocess killed nspawn; the machine's own processes are killed by close().
            output = expired.output or b""
            return -1, output.decode(errors="replace"), True
        return result.returncode, result.stdout.decode(errors="replace"), False

    def run(
        self, *command: str, binds: Sequence[str] = (), timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run *command* in the machine, not booted (no systemd): for installing things."""
        status, output, timed_out = self._nspawn(
            ["--quiet", "--pipe", "--console=pipe", "--", *command], binds, timeout
        )
        if status != 0:
            why = f"timed out after {timeout} s" if timed_out else f"exited {status}"
            raise AssertionError(f"in the machine, {' '.join(command)} {why}:\n{output[-4000:]}")
        return subprocess.CompletedProcess(list(command), status, output, "")

    def boot(self, unit: str, binds: Sequence[str] = (), timeout: float = 180) -> Boot:
        """Boot with systemd as PID 1, start *unit* after multi-user.target, wait for the end."""
        started = time.monotonic()
        status, output, timed_out = self._nspawn(
            # read-only: systemd's console (unit status lines, the test unit's output) comes out
            # on nspawn's stdout, for the report; "pipe" would show nothing of it.
            ["--console=read-only", "-b", "--", f"systemd.wants={unit}"],
            binds,
            timeout,
        )
        boot = Boot(status, output, time.monotonic() - started, timed_out)
        # The machine is down: nothing may be left in its cgroups (nspawn's supervisor either).
        for group in self.cgroups:
            for pid in sorted(_cgroup_pids(group)):
                self.leftovers.append(f"process {pid} still in {group} after a boot")
        return boot

    def close(self) -> None:
        for group in self.cgroups:
            try:
                self.leftovers += remove_cgroup(group)
            except AssertionError as err:
                self.leftovers.append(str(err))
        propagate = PROPAGATE / self.name
        if propagate.exists():
            self.leftovers.append(f"nspawn's {propagate}")
            with contextlib.suppress(OSError):
                propagate.rmdir()
        self.leftovers += teardown(self.run_dir)


@contextlib.contextmanager
def booted_machine(suite: str) -> Iterator[Machine]:
    """A machine of *suite*'s systemd tree (built first when needed), closed at the end."""
    with base_tree(suite, SYSTEMD_PACKAGES) as tree:
        machine = Machine(tree, suite)
        try:
            yield machine
        finally:
            machine.close()
