"""The Debian package: build it, install it with apt, mount through the installed commands,
remove it, and check that nothing is left.

This installs a real package on the machine (root, apt, dpkg-deb; network to PyPI for the
build), so it refuses to run where a remotefs package or /usr/lib/remotefs already exists.
Everything happens in try/finally: a failing test still unmounts and purges the package.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotefs.cli import build_parser

from .conftest import write_random
from .mounting import force_unmount, is_mounted
from .origin import Origin
from .requirements import unavailable

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build-deb.sh"
MAKE_MANPAGE = ROOT / "packaging" / "make_manpage.py"
VENV = Path("/usr/lib/remotefs")
INSTALLED = {
    Path("/usr/bin/remotefs"),
    Path("/usr/sbin/mount.remotefs"),
    Path("/lib/systemd/system/remotefs@.service"),
    Path("/lib/systemd/system/remotefs-serve@.service"),
    Path("/usr/share/man/man1/remotefs.1.gz"),
    Path("/usr/share/doc/remotefs/example.conf"),
    Path("/usr/share/doc/remotefs/serve-example.conf"),
}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(*command: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run *command* without this test run's PYTHONPATH: installed code must import itself."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def package_installed() -> bool:
    result = run("dpkg-query", "-W", "-f=${Status}", "remotefs")
    return result.returncode == 0 and "installed" in result.stdout


def every_option() -> set[str]:
    """Every option string of the CLI and of each of its sub-commands."""
    options: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            options.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return options


def roff_to_text(page: str) -> str:
    return page.replace("\\-", "-").replace("\\e", "\\")


@pytest.fixture
def packaging_tools() -> None:
    for tool in ("dpkg-deb", "apt-get", "dpkg-query"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing: the package cannot be built and installed")
    if os.geteuid() != 0:
        unavailable("installing a package needs root")


@pytest.fixture
def clean_system(packaging_tools: None) -> Iterator[None]:
    """No remotefs package before; none after, whatever happened."""
    if package_installed() or VENV.exists():
        unavailable("a remotefs package (or /usr/lib/remotefs) is already installed here")
    try:
        yield
    finally:
        if package_installed() or VENV.exists():
            run("apt-get", "remove", "--purge", "-y", "remotefs", timeout=300)


def test_manpage_documents_every_option(tmp_path: Path) -> None:
    page = tmp_path / "remotefs.1"
    ok(_make_manpage(page))
    text = roff_to_text(page.read_text())
    missing = {option for option in every_option() if option not in text}
    assert not missing, f"the man page does not document {sorted(missing)}"
    assert text.startswith(".TH REMOTEFS 1 ")
    for command in ("mount", "unmount", "umount", "status", "prefetch", "evict"):
        assert f'.SS "{command}' in text or f", {command}" in text


def _make_manpage(page: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MAKE_MANPAGE), str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(600)
def test_build_install_mount_remove(
    clean_system: None,
    fuse_available: None,
    origin: Origin,
    origin_root: Path,
    tmp_path: Path,
) -> None:
    data = write_random(origin_root / "f.bin", 700 * 1024)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{origin.url('f.bin')}\n")
    mountpoints = [tmp_path / "mnt", tmp_path / "mnt-helper"]
    for mountpoint in mountpoints:
        mountpoint.mkdir()
    try:
        # -- build
        out = tmp_path / "dist"
        built = run("bash", BUILD, out, timeout=420)
        ok(built)
        debs = list(out.glob("remotefs_*.deb"))
        arch = ok(run("dpkg", "--print-architecture")).strip()
        assert [deb.name for deb in debs] == [f"remotefs_{VERSION}_{arch}.deb"]
        fields = ok(run("dpkg-deb", "-f", debs[0], "Package", "Version", "Depends"))
        assert f"Version: {VERSION}" in fields
        # Computed from the build (packaging/deb-depends.sh): the interpreter, fuse3, and the
        # libfuse3 package of this release (libfuse3-3 on Debian 12, libfuse3-4 on 13).
        depends = fields.split("Depends: ", 1)[1].strip()
        names = [part.split()[0] for part in depends.split(", ")]
        system_python = ok(run("/usr/bin/python3", "-c", "import sys; print(sys.version_info[1])"))
        assert names[:2] == [f"python3.{system_python.strip()}", "fuse3"], depends
        libfuse = [name for name in names if name.startswith("libfuse3-")]
        assert len(libfuse) == 1, depends
        assert ok(run("dpkg-query", "-W", "-f=${Status}", libfuse[0])) == "install ok installed"

        # -- install
        ok(run("apt-get", "install", "-y", "--no-install-recommends", debs[0], timeout=300))
        assert package_installed()
        for path in INSTALLED:
            assert path.exists(), f"{path} is not installed"
        assert ok(run("/usr/bin/remotefs", "--version")).strip() == f"remotefs {VERSION}"
        where = ok(run(VENV / "bin" / "python", "-c", "import remotefs; print(remotefs.__file__)"))
        assert where.startswith(f"{VENV}/lib/python3."), where
        unit = Path("/lib/systemd/system/remotefs@.service").read_text()
        assert "ExecStart=/usr/bin/remotefs mount -f " in unit
        assert "/usr/local" not in unit
        unit = Path("/lib/systemd/system/remotefs-serve@.service").read_text()
        assert "ExecStart=/usr/bin/remotefs serve -f " in unit
        assert "/usr/local" not in unit and "/usr/share/doc/remotefs" in unit

        # -- mount through the installed command, read, unmount
        cache = tmp_path / "cache"
        ok(
            run(
                "/usr/bin/remotefs",
                "mount",
                urls,
                mountpoints[0],
                "--cache-dir",
                cache,
                "--no-fill",
            )
        )
        assert (mountpoints[0] / "f.bin").read_bytes() == data
        ok(run("/usr/bin/remotefs", "unmount", mountpoints[0]))
        assert not is_mounted(mountpoints[0])

        # -- the same files over HTTP: remotefs serve (hypercorn is in the package)
        served = ok(
            run(
                "/usr/bin/remotefs",
                "serve",
                urls,
                "--listen",
                "127.0.0.1:0",
                "--cache-dir",
                cache,
                "--no-fill",
            )
        )
        address = served.split("serving ", 1)[1].split()[0]
        ok(run("curl", "-sS", "-o", tmp_path / "served.bin", f"{address}/f.bin"))
        assert (tmp_path / "served.bin").read_bytes() == data
        ok(run("/usr/bin/remotefs", "stop", "--cache-dir", cache))

        # -- mount(8) -t remotefs runs the installed /usr/sbin/mount.remotefs
        options = f"ro,cache_dir={tmp_path / 'cache-helper'},no_fill"
        ok(run("mount", "-t", "remotefs", urls, mountpoints[1], "-o", options))
        assert (mountpoints[1] / "f.bin").read_bytes() == data
        ok(run("/usr/bin/remotefs", "unmount", mountpoints[1]))
        assert not is_mounted(mountpoints[1])

        # -- the man page documents every option
        found = run("man", "-w", "remotefs") if shutil.which("man") else None
        page_path = Path(found.stdout.strip()) if found and found.returncode == 0 else None
        if page_path is None:  # man-db may be missing; the file itself must be there
            page_path = Path("/usr/share/man/man1/remotefs.1.gz")
        assert page_path == Path("/usr/share/man/man1/remotefs.1.gz")
        page = roff_to_text(gzip.decompress(page_path.read_bytes()).decode())
        missing = {option for option in every_option() if option not in page}
        assert not missing, f"the installed man page does not document {sorted(missing)}"

        # -- running it wrote nothing the package does not own (byte-code was valid)
        owned = set(ok(run("dpkg-query", "-L", "remotefs")).splitlines())
        present = {str(path) for path in VENV.rglob("*")}
        assert present - owned == set()

        # -- remove
        ok(run("apt-get", "remove", "--purge", "-y", "remotefs", timeout=300))
        assert not package_installed()
        for path in (*INSTALLED, VENV):
            assert not path.exists() and not path.is_symlink(), f"{path} is left after purge"
    finally:
        for mountpoint in mountpoints:
            force_unmount(mountpoint)
