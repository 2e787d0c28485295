"""packaging/deb-depends.sh: the .deb's Depends, computed from the extensions that were built.

The script runs dpkg-shlibdeps for real, on this checkout's own pyfuse3 extension and on small
extensions compiled here, and the answers are checked against what this machine has installed
(the libfuse3 package is the one that owns the libfuse3.so the extension loads).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .requirements import unavailable

ROOT = Path(__file__).resolve().parent.parent
DEB_DEPENDS = ROOT / "packaging" / "deb-depends.sh"
PYTHON_PACKAGE = f"python{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture(autouse=True)
def tools() -> None:
    missing = [tool for tool in ("dpkg-shlibdeps", "gcc", "ldd") if shutil.which(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (scripts/setup.sh test installs dpkg-dev, gcc)")


def depends(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEB_DEPENDS), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parse(field: str) -> dict[str, str]:
    """``{"libc6": ">= 2.17", "fuse3": ""}`` from a Depends value (no alternatives in ours)."""
    parsed = {}
    for part in field.strip().split(", "):
        match = re.fullmatch(r"([a-z0-9][a-z0-9.+-]+)(?: \(([^)]*)\))?", part)
        assert match, f"not a dependency: {part!r} in {field!r}"
        parsed[match.group(1)] = match.group(2) or ""
    return parsed


def owner_of_loaded_library(extension: Path, soname_prefix: str) -> str:
    """The Debian package that owns the library *extension* loads (by ldd)."""
    ldd = subprocess.run(["ldd", extension], capture_output=True, text=True, check=True).stdout
    paths = [line.split("=> ")[1].split(" (")[0] for line in ldd.splitlines() if "=> /" in line]
    library = next(path for path in paths if Path(path).name.startswith(soname_prefix))
    real = os.path.realpath(library)
    # dpkg may know the file by its /lib or by its /usr/lib name (merged /usr or not).
    for name in dict.fromkeys((library, real, real.removeprefix("/usr"), "/usr" + real)):
        owner = subprocess.run(["dpkg", "-S", name], capture_output=True, text=True, check=False)
        if owner.returncode == 0:
            return owner.stdout.split(":")[0]
    raise AssertionError(f"no package owns {library}")


def installed_version(package: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True
    ).stdout


def compile_extension(directory: Path, name: str, source: str, *libraries: str) -> Path:
    c_file = directory / f"{name}.c"
    c_file.write_text(source)
    output = directory / f"{name}.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", output, c_file, *libraries],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return output


def test_this_checkouts_pyfuse3_extension() -> None:
    import pyfuse3

    package_dir = Path(pyfuse3.__file__).parent
    extensions = sorted(package_dir.glob("*.so"))
    assert extensions, f"no compiled pyfuse3 in {package_dir}"
    result = depends(PYTHON_PACKAGE, *extensions)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{PYTHON_PACKAGE}, fuse3, "), result.stdout
    parsed = parse(result.stdout)
    libfuse = owner_of_loaded_library(extensions[0], "libfuse3.so")
    assert re.fullmatch(r"libfuse3-\d+", libfuse)
    assert parsed[libfuse].startswith(">= "), "dpkg-shlibdeps gives the symbols' minimum version"
    assert "libc6" in parsed
    assert [name for name in parsed if name.startswith("libfuse")] == [libfuse]
    # Installable here: every library dependency is installed in a version that satisfies it.
    for package, constraint in parsed.items():
        if not constraint:
            continue
        operator, version = constraint.split()
        assert operator == ">="
        satisfied = subprocess.run(
            ["dpkg", "--compare-versions", installed_version(package), "ge", version], check=False
        )
        assert satisfied.returncode == 0, f"{package} here is older than {constraint}"


def test_every_library_of_every_extension_is_a_dependency(tmp_path: Path) -> None:
    fuse = compile_extension(
        tmp_path,
        "uses_fuse",
        "int fuse_version(void);\nint f(void) { return fuse_version(); }\n",
        "-lfuse3",
    )
    zlib = compile_extension(
        tmp_path,
        "uses_zlib",
        "const char *zlibVersion(void);\nconst char *g(void) { return zlibVersion(); }\n",
        "-l:libz.so.1",
    )
    result = depends("python3.13", fuse, zlib)
    assert result.returncode == 0, result.stderr
    parsed = parse(result.stdout)
    assert list(parsed)[:2] == ["python3.13", "fuse3"]
    assert owner_of_loaded_library(fuse, "libfuse3.so") in parsed
    assert owner_of_loaded_library(zlib, "libz.so") in parsed  # zlib1g


def test_fails_when_nothing_links_libfuse3(tmp_path: Path) -> None:
    plain = compile_extension(
        tmp_path, "plain", "#include <string.h>\nsize_t h(const char *s) { return strlen(s); }\n"
    )
    result = depends(PYTHON_PACKAGE, plain)
    assert result.returncode == 1
    assert "none of the files links libfuse3" in result.stderr
    assert result.stdout == ""


def test_refuses_bad_arguments(tmp_path: Path) -> None:
    assert "usage:" in depends(PYTHON_PACKAGE).stderr
    assert "is not a python3.X package name" in depends("python3", tmp_path).stderr
    missing = depends(PYTHON_PACKAGE, tmp_path / "absent.so")
    assert missing.returncode == 1 and "absent.so does not exist" in missing.stderr
