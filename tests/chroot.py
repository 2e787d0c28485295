"""Fresh Debian systems for tests: a cached debootstrap tree per suite, and throw-away chroots.

``base_tree(suite)`` keeps one ``debootstrap --variant=minbase`` tree per suite in
``/var/tmp/remotefs-test-trees/SUITE``, stamped with the suite, variant, mirror and
``TREE_FORMAT`` beside it (``SUITE.stamp``). ``base_tree(suite, include=(...))`` keeps another
tree per suite and package set, built with ``debootstrap --include=...`` (``SUITE-with-PKG-...``,
its stamp listing the packages), so a test that needs more than a fresh system (the live-systemd
tier boots one with systemd, tests/nspawn.py) does not change the fresh tree. A tree with a
missing or different stamp, older than ``MAX_AGE``, whose dpkg database is damaged or that lacks
an included package is built again (into ``NAME.new``, then renamed, so an interrupted
debootstrap never counts as a tree). An exclusive ``flock`` guards building,
a shared one using, so parallel test runs neither build twice nor pull a tree from under each
other.

``Chroot`` never writes to that tree: it mounts an overlay (the tree below, a per-run upper
directory above) at ``runs/SUITE-PID-ID/root``, with a fresh ``proc``, ``/sys`` and the host's
``/dev`` bound in (the real ``/dev/fuse``, ``/dev/null``...), a private ``tmpfs`` on ``/dev/shm``
and the host's ``resolv.conf``. The chroot shares the host's network namespace, so a server on
the host's 127.0.0.1 is reachable from inside. ``Chroot.close()`` (always called, from
``finally``) unmounts the FUSE mounts made inside, kills every process whose root is in the
chroot, unmounts everything under the run directory deepest first, detaches loop devices backed
by files there, checks that nothing is mounted there any more, and only then deletes it.
Leftover run directories of test processes that died are cleaned the same way by the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
TREES = Path("/var/tmp/remotefs-test-trees")
MIRROR = "http://deb.debian.org/debian"
#: Bump to rebuild every cached tree (e.g. when what a tree must contain changes).
TREE_FORMAT = 1
#: Older trees are rebuilt, so the packages they start from do not drift too far behind.
MAX_AGE = 14 * 24 * 3600
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The host's CA bundle, copied into the chroot for pip (on machines whose TLS is intercepted,
#: pip's own bundle does not know the interceptor's CA). The project itself never does this.
CA_BUNDLE_IN_CHROOT = "/root/host-ca-bundle.pem"


def _run(
    *command: str | os.PathLike[str], timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(result.args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


def _unescape(field: str) -> str:
    """A path from /proc/self/mounts, whose spaces, tabs and newlines are octal escapes."""
    for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escape, char)
    return field


def mounts_under(path: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below *path*, in mount order."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as table:
        for line in table:
            fields = line.split(" ")
            point = _unescape(fields[1])
            if point == prefix or point.startswith(prefix + "/"):
                found.append((point, fields[2]))
    return found


def _rooted_in(path: Path) -> list[int]:
    """Pids of the processes whose root directory is *path* or below it (chrooted there)."""
    prefix = str(path).rstrip("/")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            root = os.readlink(f"/proc/{entry}/root")
            if root == prefix or root.startswith(prefix + "/"):
                pids.append(int(entry))
    return pids


def _kill_rooted_in(path: Path) -> list[int]:
    """SIGTERM, then SIGKILL, every process chrooted into *path*; returns the pids found."""
    found = _rooted_in(path)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _rooted_in(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _rooted_in(path) and time.monotonic() < deadline:
            time.sleep(0.1)
    return found


def _detach_loops_under(path: Path) -> None:
    prefix = str(path).rstrip("/") + "/"
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(prefix):
                _run("losetup", "-d", f"/dev/{backing.parent.parent.name}", check=False)


def teardown(path: Path) -> list[str]:
    """Unmount, kill and detach everything of a run directory, then delete it.

    Returns what had to be cleaned up besides the mounts made by ``Chroot`` itself (FUSE mounts
    and processes left inside), for the caller to report. Raises if something stays mounted:
    then nothing is deleted (a recursive delete through a bind mount of /dev would be a disaster).
    """
    leftovers = []
    for point, fstype in reversed(mounts_under(path)):
        if fstype.startswith("fuse"):
            leftovers.append(f"FUSE mount {point}")
            _run("umount", "-l", point, check=False)
    leftovers += [f"process {pid}" for pid in _kill_rooted_in(path)]
    for point, _fstype in reversed(mounts_under(path)):
        if _run("umount", point, check=False).returncode != 0:
            _run("umount", "-l", point, check=False)
    _detach_loops_under(path)
    remaining = mounts_under(path)
    if remaining:
        raise AssertionError(f"still mounted, {path} left in place: {remaining}")
    if path.exists():
        _run("rm", "-rf", "--one-file-system", path, timeout=300)
    return leftovers


def _clean_dead_runs() -> None:
    """Tear down the run directories of test processes that no longer exist."""
    runs = TREES / "runs"
    if not runs.is_dir():
        return
    for run in runs.iterdir():
        pid = run.name.split("-")[1] if run.name.count("-") >= 2 else ""
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(AssertionError):
            teardown(run)


# -- the cached base trees ---------------------------------------------------------------------


def tree_name(suite: str, include: Sequence[str] = ()) -> str:
    """The cached tree's directory name: the suite, plus the extra packages when there are any."""
    packages = sorted(set(include))
    return "-".join([suite, "with", *packages]) if packages else suite


def _stamp(suite: str, include: Sequence[str] = ()) -> dict[str, object]:
    stamp: dict[str, object] = {
        "suite": suite,
        "variant": "minbase",
        "mirror": MIRROR,
        "format": TREE_FORMAT,
    }
    if include:  # the plain tree's stamp stays as it was, so its cached trees stay valid
        stamp["include"] = sorted(set(include))
    return stamp


def _tree_ok(suite: str, tree: Path, include: Sequence[str] = ()) -> bool:
    stamp_file = TREES / f"{tree.name}.stamp"
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return False
    wanted = _stamp(suite, include)
    if not isinstance(stamp, dict) or {k: stamp.get(k) for k in wanted} != wanted:
        return False
    if not include and "include" in stamp:
        return False
    created = stamp.get("created")
    if not isinstance(created, int | float) or time.time() - created > MAX_AGE:
        return False
    for needed in ("usr/bin/apt-get", "usr/bin/dpkg", "bin/bash", "var/lib/dpkg/status"):
        if not (tree / needed).exists():
            return False
    audit = _run("chroot", tree, "/usr/bin/dpkg", "--audit", check=False)
    if audit.returncode != 0 or audit.stdout.strip():
        return False
    if include:
        query = ["/usr/bin/dpkg-query", "-W", "-f", "${Status}\n", *include]
        installed = _run("chroot", tree, *query, check=False)
        statuses = installed.stdout.splitlines()
        return installed.returncode == 0 and statuses == ["install ok installed"] * len(include)
    return True


def _build_tree(suite: str, tree: Path, include: Sequence[str] = ()) -> None:
    new = TREES / f"{tree.name}.new"
    teardown(new)  # an interrupted earlier build (debootstrap mounts proc and sys inside)
    (TREES / f"{tree.name}.stamp").unlink(missing_ok=True)
    extra: list[str] = [f"--include={','.join(sorted(set(include)))}"] if include else []
    try:
        result = _run(
            "debootstrap",
            "--variant=minbase",
            *extra,
            suite,
            new,
            MIRROR,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            log = new / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(
                f"debootstrap {suite} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n{tail}"
            )
    except BaseException:
        teardown(new)
        raise
    teardown(tree)
    new.rename(tree)
    stamp = {**_stamp(suite, include), "created": time.time()}
    (TREES / f"{tree.name}.stamp").write_text(json.dumps(stamp) + "\n")


@contextlib.contextmanager
def base_tree(suite: str, include: Sequence[str] = ()) -> Iterator[Path]:
    """The cached minbase tree of *suite* (with the *include* packages too, when given).

    It is built first when missing, stale or broken.
    """
    TREES.mkdir(mode=0o755, parents=True, exist_ok=True)
    name = tree_name(suite, include)
    with open(TREES / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _clean_dead_runs()
        tree = TREES / name
        if not _tree_ok(suite, tree, include):
            _build_tree(suite, tree, include)
        # Others may use it at the same time; nobody rebuilds it while we do.
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield tree


# -- one throw-away chroot ---------------------------------------------------------------------


class Chroot:
    """An overlay of *tree* with proc, sys, dev mounted; see the module's docstring."""

    def __init__(self, tree: Path, suite: str) -> None:
        self.run_dir = TREES / "runs" / f"{suite}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.root = self.run_dir / "root"
        self.env = {
            "PATH": CHROOT_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        self.leftovers: list[str] = []
        for sub in ("upper", "work", "root"):
            (self.run_dir / sub).mkdir(parents=True)
        try:
            self._mount(tree)
        except BaseException:
            self.close()
            raise

    def _mount(self, tree: Path) -> None:
        root = self.root
        upper, work = self.run_dir / "upper", self.run_dir / "work"
        options = f"lowerdir={tree},upperdir={upper},workdir={work}"
        _run("mount", "-t", "overlay", "remotefs-test", "-o", options, root)
        _run("mount", "-t", "proc", "proc", root / "proc")
        _run("mount", "--bind", "/sys", root / "sys")
        _run("mount", "--bind", "/dev", root / "dev")
        _run("mount", "-t", "tmpfs", "-o", "mode=1777,size=256m", "tmpfs", root / "dev" / "shm")
        resolv = root / "etc" / "resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        resolv.write_text(Path("/etc/resolv.conf").read_text())
        # Packages' maintainer scripts must not start services (on the host's kernel).
        policy = root / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        for candidate in (
            os.environ.get("PIP_CERT"),
            os.environ.get("SSL_CERT_FILE"),
            "/etc/ssl/certs/ca-certificates.crt",
        ):
            if candidate and Path(candidate).is_file():
                shutil.copyfile(candidate, root / CA_BUNDLE_IN_CHROOT.lstrip("/"))
                self.env["PIP_CERT"] = CA_BUNDLE_IN_CHROOT
                break

    def path(self, inside: str) -> Path:
        """The host path of a path inside the chroot."""
        return self.root / inside.lstrip("/")

    def run(
        self, script: str, timeout: float = 120, check: bool = True, answer: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run a bash script inside (``set -euo pipefail``), with a clean environment.

        Its standard input is *answer* (what a person would type at a prompt), then EOF.
        """
        result = subprocess.run(
            ["chroot", str(self.root), "/bin/bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
            input=answer,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the chroot, exit {result.returncode}:\n{script}\n"
                f"-- stdout:\n{result.stdout[-6000:]}\n-- stderr:\n{result.stderr[-6000:]}"
            )
        return result

    def close(self) -> None:
        self.leftovers = teardown(self.run_dir)


@contextlib.contextmanager
def fresh_chroot(suite: str) -> Iterator[Chroot]:
    with base_tree(suite) as tree:
        chroot = Chroot(tree, suite)
        try:
            yield chroot
        finally:
            chroot.close()


def copy_repository(destination: Path) -> int:
    """Copy the git-tracked files of the working tree (as they are now) to *destination*."""
    listed = subprocess.run(
        ["git", "-C", str(REPOSITORY), "ls-files", "-z"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    count = 0
    for name in filter(None, listed.split("\0")):
        source = REPOSITORY / name
        if not source.is_symlink() and not source.exists():
            continue  # deleted in the working tree, not yet committed
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
        count += 1
    return count
