"""A fresh Debian machine, as a newcomer has it: the README's set-up, a mount, and the .deb.

For each release, in a chroot of a fresh ``debootstrap --variant=minbase`` tree (no Python, no
compiler, no FUSE; see tests/chroot.py for how the tree is cached and the chroot kept apart from
the host), with the real /dev/fuse and the host's network:

1. The repository's git-tracked files are copied to /root/remotefs, and a urls.txt there names a
   generated file served by an origin on the host's 127.0.0.1.
2. The README's set-up command runs as written (``mkdir -p /mnt/remote`` and
   ``scripts/remotefs mount urls.txt /mnt/remote``): set-up must install every system package
   itself, choose the release's python3, build the virtualenv, link ``remotefs`` into
   /usr/local/bin, and mount. The mounted file's sha256 must equal the origin's, and
   ``remotefs unmount`` (from the PATH) must unmount it.
3. The README's Debian package commands: ``packaging/build-deb.sh``, then
   ``apt install ./dist/remotefs_*.deb``; its Depends must name the release's own libfuse3
   package and python3.X; a mount through the installed /usr/bin/remotefs must read the same
   bytes; ``apt remove --purge remotefs`` must leave no file behind (the file lists of /usr,
   /etc, /opt, /root are compared with those before the install).

apt and pip inside the chroot reach Debian's archive and PyPI: the only traffic off this machine.
The time after the tree is ready is bounded by ``BUDGET`` and printed per step. In CI (CI=true)
a missing tool fails the test; elsewhere it skips. The suites are ``DEFAULT_SUITES`` (Debian 13
and 12); REMOTEFS_FRESH_SUITES (space-separated) chooses others.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from .chroot import Chroot, copy_repository, fresh_chroot, mounts_under
from .conftest import write_random
from .debs import DebBuilds
from .origin import Origin
from .readme import command_lines, readme_block
from .requirements import require_overlay, unavailable

REPO_IN_CHROOT = "/root/remotefs"
#: What each release must give: its python3 and the libfuse3 package pyfuse3 links against.
RELEASES = {
    "trixie": {"python": "3.13", "libfuse": "libfuse3-4"},
    "bookworm": {"python": "3.11", "libfuse": "libfuse3-3"},
}
#: Both run by default, CI included: each takes one to two minutes once its tree is cached.
DEFAULT_SUITES = "trixie bookworm"
#: Seconds allowed from a ready tree to the end (apt and pip downloads, two pyfuse3 builds).
BUDGET = 600
PRINT_BASE = "'import sys; print(sys._base_executable)'"
PRINT_VERSION = "'import sys; print(\"%d.%d\" % sys.version_info[:2])'"
SNAPSHOT_DIRS = ("usr", "etc", "opt", "root", "bin", "sbin", "lib", "lib64")


def _suites() -> list[str]:
    chosen = os.environ.get("REMOTEFS_FRESH_SUITES", DEFAULT_SUITES).split()
    unknown = [suite for suite in chosen if suite not in RELEASES]
    assert not unknown, f"REMOTEFS_FRESH_SUITES names unknown suites: {unknown}"
    return chosen


@pytest.fixture
def host_tools(fuse_available: None) -> None:
    if os.geteuid() != 0:
        unavailable("a chroot needs root")
    missing = [
        tool
        for tool in ("debootstrap", "chroot", "mount", "umount", "losetup", "git")
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
    ]
    if missing:
        unavailable(f"missing {', '.join(missing)} (scripts/setup.sh test installs them)")
    require_overlay()


def snapshot(chroot: Chroot) -> set[str]:
    """Every path under the directories a package installs into (symlinks not followed)."""
    paths: set[str] = set()
    for top in SNAPSHOT_DIRS:
        start = chroot.path(top)
        if start.is_symlink() or not start.is_dir():
            continue
        for directory, dirs, files in os.walk(start):
            relative = "/" + os.path.relpath(directory, chroot.root)
            if relative.startswith("/root/.cache"):
                dirs[:] = []
                continue
            paths.update(f"{relative}/{name}" for name in (*dirs, *files))
    return paths


class Steps:
    """Times each step, for the report printed at the end (and shown on failure)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = self.start
        self.lines: list[str] = []

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.lines.append(f"{name}: {now - self.last:.0f} s")
        self.last = now

    def total(self) -> float:
        return time.monotonic() - self.start


@pytest.mark.fresh_machine
@pytest.mark.timeout(BUDGET + 300)  # + building the tree (about a minute) and the teardown
@pytest.mark.parametrize("suite", _suites())
def test_fresh_debian_setup_mount_and_package(
    suite: str, host_tools: None, origin: Origin, origin_root: Path, built_debs: DebBuilds
) -> None:
    release = RELEASES[suite]
    data = write_random(origin_root / "smoke.bin", 3 * 1024 * 1024 + 12345)
    digest = hashlib.sha256(data).hexdigest()
    setup_block = command_lines(readme_block("set-up-mount"))
    assert setup_block == ["mkdir -p /mnt/remote", "scripts/remotefs mount urls.txt /mnt/remote"]
    package_block = command_lines(readme_block("debian-package"))
    assert package_block == [
        "packaging/build-deb.sh",
        "apt install ./dist/remotefs_*.deb",
        "apt remove --purge remotefs",
    ]
    build, install, purge = package_block

    started = time.monotonic()
    with fresh_chroot(suite) as chroot:
        steps = Steps()
        print(f"[{suite}] tree ready after {time.monotonic() - started:.0f} s")
        try:
            before = _run_steps(
                chroot,
                steps,
                suite,
                release,
                origin,
                digest,
                setup_block,
                build,
                install,
                built_debs,
            )
            _purge_and_compare(chroot, steps, purge, before)
        finally:
            print(f"[{suite}] " + ", ".join(steps.lines) + f"; total {steps.total():.0f} s")
        assert steps.total() < BUDGET, f"took {steps.total():.0f} s, more than {BUDGET} s"
    assert not chroot.leftovers, f"left behind in the chroot: {chroot.leftovers}"


def _run_steps(
    chroot: Chroot,
    steps: Steps,
    suite: str,
    release: dict[str, str],
    origin: Origin,
    digest: str,
    setup_block: list[str],
    build: str,
    install: str,
    built_debs: DebBuilds,
) -> set[str]:
    """Set-up, mount, build, install, mount again; returns the file list before the install.

    The .deb, once its Depends are checked, goes to *built_debs* for the live-systemd tier.
    """
    repo = chroot.path(REPO_IN_CHROOT)
    assert copy_repository(repo) > 50
    (repo / "urls.txt").write_text(f"{origin.url('smoke.bin')}\n")
    assert not chroot.path("/usr/bin/python3").exists(), "the tree is not fresh: it has python3"
    steps.done("copy")

    # -- the README's set-up command, as written
    result = chroot.run(f"cd {REPO_IN_CHROOT}\n" + "\n".join(setup_block), timeout=480)
    steps.done("set-up and mount")
    assert "setup: installing system packages:" in result.stderr
    link = chroot.path("/usr/local/bin/remotefs")
    assert link.is_symlink() and os.readlink(link) == f"{REPO_IN_CHROOT}/.venv/bin/remotefs"
    assert f"setup: linked /usr/local/bin/remotefs -> {REPO_IN_CHROOT}/.venv/bin/remotefs" in (
        result.stderr
    )
    base = chroot.run(f"{REPO_IN_CHROOT}/.venv/bin/python -c {PRINT_BASE}")
    assert base.stdout.strip() in ("/usr/bin/python3", f"/usr/bin/python{release['python']}")
    version = chroot.run(f"/usr/bin/python3 -c {PRINT_VERSION}")
    assert version.stdout.strip() == release["python"]
    # The mounted file is the origin's, read through FUSE in the chroot.
    checked = chroot.run("sha256sum /mnt/remote/smoke.bin; remotefs unmount /mnt/remote")
    assert checked.stdout.split()[0] == digest
    assert not mounts_under(chroot.path("/mnt/remote"))
    steps.done("read and unmount")

    # -- the Debian package: build, check its Depends, install
    built = chroot.run(f"cd {REPO_IN_CHROOT}\n{build}", timeout=420)
    deb = built.stdout.strip().splitlines()[-1]
    assert deb.startswith(f"{REPO_IN_CHROOT}/dist/remotefs_") and deb.endswith(".deb"), built.stdout
    steps.done("build the .deb")
    depends = chroot.run(f"dpkg-deb -f {deb} Depends").stdout.strip()
    names = [part.split()[0] for part in depends.split(", ")]
    assert names[:2] == [f"python{release['python']}", "fuse3"], depends
    assert release["libfuse"] in names, depends
    assert not any(name.startswith("libfuse3-") and name != release["libfuse"] for name in names)
    built_debs.add(suite, chroot.path(deb), "built by the fresh-machine test")

    before = snapshot(chroot)
    chroot.run(f"cd {REPO_IN_CHROOT}\n{install}", timeout=300, answer="y\n")
    steps.done("apt install")
    status = chroot.run("dpkg-query -W -f='${Status} ${Version}' remotefs").stdout
    assert status.startswith("install ok installed "), status

    # -- a mount through the installed command
    mounted = chroot.run(
        "mkdir -p /mnt/pkg\n"
        f"/usr/bin/remotefs mount {REPO_IN_CHROOT}/urls.txt /mnt/pkg"
        " --cache-dir /var/cache/remotefs-test\n"
        "sha256sum /mnt/pkg/smoke.bin\n"
        "/usr/bin/remotefs unmount /mnt/pkg\n"
    )
    assert mounted.stdout.split()[0] == digest
    assert not mounts_under(chroot.path("/mnt/pkg"))
    steps.done("mount with the package")
    return before


def _purge_and_compare(chroot: Chroot, steps: Steps, purge: str, before: set[str]) -> None:
    # apt asks before it removes anything: answer as a person would.
    chroot.run(purge, timeout=300, answer="y\n")
    steps.done("apt purge")
    query = chroot.run("dpkg-query -W -f='${Status}' remotefs", check=False)
    assert query.returncode != 0 or "not-installed" in query.stdout, query.stdout
    for path in (
        "/usr/lib/remotefs",
        "/usr/bin/remotefs",
        "/usr/sbin/mount.remotefs",
        "/lib/systemd/system/remotefs@.service",
        "/lib/systemd/system/remotefs-serve@.service",
        "/usr/share/doc/remotefs",
        "/usr/share/man/man1/remotefs.1.gz",
    ):
        assert not os.path.lexists(chroot.path(path)), f"{path} is left after the purge"
    after = snapshot(chroot)
    assert after == before, (
        f"left after the purge: {sorted(after - before)[:20]}; gone: {sorted(before - after)[:20]}"
    )
