"""scripts/setup.sh's choice of Python, run as the script runs it, on a fake PATH.

Each test sources the real setup.sh in bash (which runs nothing but defines its functions) and
calls ``choose_python`` with a PATH made of directories of fake commands:

- fake ``python3`` scripts that print a version, and answer whether they have venv, ensurepip
  and Python.h;
- a fake ``dpkg`` that says which of them a Debian package owns (a distribution's Python);
- a fake ``apt-cache`` that answers ``policy`` from a table of candidate versions (nothing until
  ``apt-get update`` when the lists are empty, as on a fresh system), and a fake ``apt-get`` that
  records its calls;
- links to the few real tools the functions use (readlink, sed, awk, id, ...), and nothing
  else: the machine's own pythons are out of sight.

The releases are modelled by their package names and versions: Debian 12 (python3 3.11),
Debian 13 (3.13), Ubuntu 24.04 (3.12), Ubuntu 22.04 (3.10, python3.11 in the archive), a
debootstrapped minbase (no python3 at all), Debian 11 (3.9 and nothing newer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import IN_CI

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"
REAL_TOOLS = ("readlink", "sed", "awk", "id", "dirname", "cat", "grep", "mkdir", "touch")


@dataclass
class Choice:
    returncode: int
    python: str
    packages: list[str]
    error: str
    stderr: str
    apt_calls: list[str]


class FakeSystem:
    """Directories of fake commands, and the tables the fakes answer from."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tools = base / "tools"
        self.tools.mkdir()
        for tool in REAL_TOOLS:
            real = shutil.which(tool)
            assert real is not None, tool
            (self.tools / tool).symlink_to(real)
        self.owned = base / "dpkg-owned"
        self.owned.write_text("")
        self.candidates = base / "apt-candidates"
        self.candidates.write_text("")
        self.apt_log = base / "apt-calls"
        self.apt_log.write_text("")
        self.lists_empty = base / "lists-empty"
        self._script("dpkg", self._DPKG)
        self._script("apt-cache", self._APT_CACHE)
        self._script("apt-get", self._APT_GET)

    _DPKG = """
import sys
owned = open({owned!r}).read().split()
if sys.argv[1:2] == ["-S"] and sys.argv[2] in owned:
    print("python3-minimal: " + sys.argv[2])
    sys.exit(0)
sys.exit(1)
"""
    _APT_CACHE = """
import os, sys
if os.path.exists({lists_empty!r}):
    sys.exit(0)
table = dict(line.split() for line in open({candidates!r}) if line.strip())
assert sys.argv[1] == "policy", sys.argv
for package in sys.argv[2:]:
    if package in table:
        print(package + ":")
        print("  Installed: (none)")
        print("  Candidate: " + table[package])
        print("  Version table:")
"""
    _APT_GET = """
import os, sys
with open({apt_log!r}, "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["update"] and os.path.exists({lists_empty!r}):
    os.unlink({lists_empty!r})
"""

    def _script(self, name: str, body: str) -> None:
        path = self.tools / name
        text = body.format(
            owned=str(self.owned),
            candidates=str(self.candidates),
            apt_log=str(self.apt_log),
            lists_empty=str(self.lists_empty),
        )
        path.write_text(f"#!{sys.executable}\n{text}")
        path.chmod(0o755)

    def python(self, directory: str, version: str, *, owned: bool, can_build: bool = True) -> Path:
        """A fake python3 in base/DIRECTORY; *owned*: a Debian package owns it."""
        folder = self.base / directory
        folder.mkdir(exist_ok=True)
        path = folder / "python3"
        path.write_text(
            "#!/bin/sh\n"
            'case "$*" in\n'
            f"*ensurepip*) exit {0 if can_build else 1} ;;\n"
            f"*version_info*) echo {version} ;;\n"
            "*) exit 2 ;;\n"
            "esac\n"
        )
        path.chmod(0o755)
        if owned:
            with self.owned.open("a") as table:
                table.write(f"{path}\n")
        return path

    def apt(self, **candidates: str) -> None:
        """Candidate versions by package name (python3_11_venv means python3.11-venv)."""
        with self.candidates.open("a") as table:
            for name, version in candidates.items():
                package = name.replace("python3_", "python3.", 1).replace("_", "-")
                table.write(f"{package} {version}\n")

    def choose(self, *path_dirs: str, python: str | None = None) -> Choice:
        dirs = [str(self.base / name) for name in path_dirs]
        for folder in dirs:
            os.makedirs(folder, exist_ok=True)
        env = {"PATH": ":".join([*dirs, str(self.tools)]), "HOME": str(self.base)}
        if python is not None:
            env["PYTHON"] = python
        script = (
            f"source {SETUP}\n"
            "if choose_python; then\n"
            '  echo "python=$chosen_python"; echo "packages=${python_packages[*]}"\n'
            'else echo "error=$choose_error"; exit 3; fi\n'
        )
        result = subprocess.run(
            ["/bin/bash", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert "command not found" not in result.stderr, result.stderr
        fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        return Choice(
            returncode=result.returncode,
            python=fields.get("python", ""),
            packages=fields.get("packages", "").split(),
            error=fields.get("error", ""),
            stderr=result.stderr,
            apt_calls=self.apt_log.read_text().splitlines(),
        )


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


GENERIC = ["python3-venv", "python3-dev"]


@pytest.mark.parametrize(
    "release, version", [("debian-12", "3.11"), ("debian-13", "3.13"), ("ubuntu-24.04", "3.12")]
)
def test_distribution_python3_with_the_generic_packages(
    fake: FakeSystem, release: str, version: str
) -> None:
    python = fake.python("usr-bin", version, owned=True)
    choice = fake.choose("usr-local-bin", "usr-bin")
    assert (choice.returncode, choice.python, choice.packages) == (0, str(python), GENERIC)
    assert choice.apt_calls == [], "an installed python3 needs no apt look-up"


def test_a_usable_python3_first_on_path_wins(fake: FakeSystem) -> None:
    pyenv = fake.python("pyenv-shims", "3.12", owned=False)
    fake.python("usr-bin", "3.11", owned=True)
    choice = fake.choose("pyenv-shims", "usr-bin")
    assert (choice.python, choice.packages) == (str(pyenv), [])


def test_a_python3_too_old_first_on_path_is_passed_over(fake: FakeSystem) -> None:
    fake.python("pyenv-shims", "3.10", owned=False)
    system = fake.python("usr-bin", "3.13", owned=True)
    choice = fake.choose("pyenv-shims", "usr-bin")
    assert (choice.python, choice.packages) == (str(system), GENERIC)


def test_a_non_distribution_python3_without_venv_is_passed_over_with_a_note(
    fake: FakeSystem,
) -> None:
    broken = fake.python("opt-python", "3.12", owned=False, can_build=False)
    system = fake.python("usr-bin", "3.11", owned=True)
    choice = fake.choose("opt-python", "usr-bin")
    assert (choice.python, choice.packages) == (str(system), GENERIC)
    assert f"not using {broken} (3.12)" in choice.stderr


def test_fresh_minbase_without_python_installs_the_distribution_python3(
    fake: FakeSystem,
) -> None:
    fake.apt(python3="3.13.5-1", python3_13="3.13.5-2", python3_13_venv="3.13.5-2")
    fake.apt(python3_13_dev="3.13.5-2")
    fake.lists_empty.touch()  # debootstrap's lists may not answer; apt-get update once
    choice = fake.choose("usr-bin")
    assert choice.returncode == 0, choice
    assert (choice.python, choice.packages) == (
        "/usr/bin/python3",
        ["python3", "python3-venv", "python3-dev"],
    )
    assert choice.apt_calls == ["update -qq"]


def test_ubuntu_22_04_falls_back_to_the_archives_python3_11(fake: FakeSystem) -> None:
    fake.python("usr-bin", "3.10", owned=True)
    fake.apt(python3="3.10.6-1~22.04")
    fake.apt(python3_11="3.11.0-1~22.04", python3_11_venv="3.11.0-1~22.04")
    fake.apt(python3_11_dev="3.11.0-1~22.04")
    fake.apt(python3_12="3.12.0-1", python3_12_venv="3.12.0-1")  # no python3.12-dev
    choice = fake.choose("usr-bin")
    assert (choice.returncode, choice.python, choice.packages) == (
        0,
        "/usr/bin/python3.11",
        ["python3.11", "python3.11-venv", "python3.11-dev"],
    )
    assert choice.apt_calls == [], "the lists answered: no apt-get update"


def test_the_newest_complete_versioned_python_is_chosen(fake: FakeSystem) -> None:
    fake.python("usr-bin", "3.10", owned=True)
    fake.apt(python3="3.10.6-1")
    for minor in ("11", "12"):
        fake.apt(**{f"python3_{minor}": "1", f"python3_{minor}_venv": "1"})
        fake.apt(**{f"python3_{minor}_dev": "1"})
    choice = fake.choose("usr-bin")
    assert choice.python == "/usr/bin/python3.12"


def test_no_python_anywhere_fails_with_one_line_saying_what_to_install(
    fake: FakeSystem,
) -> None:
    fake.python("usr-bin", "3.9", owned=True)
    fake.apt(python3="3.9.2-3", python3_9="3.9.2-1", python3_9_venv="3.9.2-1")
    choice = fake.choose("usr-bin")
    assert choice.returncode == 3
    assert choice.python == ""
    assert "\n" not in choice.error.strip()
    assert "3.9" in choice.error and "install Python 3.11+" in choice.error
    assert "python3.11-venv" in choice.error and "PYTHON=" in choice.error


def test_setup_itself_stops_with_that_line_and_installs_nothing(fake: FakeSystem) -> None:
    fake.python("usr-bin", "3.9", owned=True)
    fake.apt(python3="3.9.2-3")
    env = {"PATH": f"{fake.base / 'usr-bin'}:{fake.tools}", "HOME": str(fake.base)}
    result = subprocess.run(
        ["/bin/bash", str(SETUP)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: no Python 3.11+ found"), lines
    assert not any(call.startswith("install") for call in fake.apt_log.read_text().splitlines())


def test_python_names_the_interpreter(fake: FakeSystem) -> None:
    chosen = fake.python("opt-python", "3.12", owned=False)
    fake.python("usr-bin", "3.11", owned=True)
    assert fake.choose("usr-bin", python=str(chosen)).python == str(chosen)
    old = fake.python("old", "3.10", owned=False)
    refused = fake.choose("usr-bin", python=str(old))
    assert refused.returncode == 3 and "needs 3.11 or newer" in refused.error


def test_the_machines_own_system_python() -> None:
    """With only the system's directories on PATH, the real /usr/bin/python3 is the choice."""
    system = Path("/usr/bin/python3")
    if not system.exists():
        if IN_CI:
            pytest.fail("no /usr/bin/python3 on this machine")
        pytest.skip("no /usr/bin/python3 on this machine")
    version = subprocess.run(
        [system, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    script = f'source {SETUP}; choose_python; echo "$chosen_python ${{python_packages[*]}}"'
    result = subprocess.run(
        ["/bin/bash", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"},
        timeout=60,
        check=False,
    )
    if version == "True":
        assert result.stdout.split() == ["/usr/bin/python3", *GENERIC], result
    else:
        assert not result.stdout.startswith("/usr/bin/python3 "), result
