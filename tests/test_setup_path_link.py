"""scripts/setup.sh puts `remotefs` on the PATH with a link, and never takes over another one.

``link_on_path VENV [DIR]`` of the real setup.sh is called in bash against temporary
directories (the default DIR for root, /usr/local/bin, is exercised in a fresh Debian by
tests/test_fresh_debian.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup.sh"


def link_on_path(
    venv: Path, directory: Path | None, *, path: str = "/usr/bin:/bin", uid: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "HOME": str(venv.parent / "home")}
    if uid is not None:  # a fake `id` that reports another user
        fake = venv.parent / "fake-id"
        fake.mkdir(exist_ok=True)
        (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")
        (fake / "id").chmod(0o755)
        env["PATH"] = f"{fake}:{path}"
    args = f'"{venv}"' + (f' "{directory}"' if directory else "")
    return subprocess.run(
        ["/bin/bash", "-c", f"source {SETUP}; link_on_path {args}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    venv = tmp_path / "checkout" / ".venv"
    (venv / "bin").mkdir(parents=True)
    command = venv / "bin" / "remotefs"
    command.write_text("#!/bin/sh\necho remotefs from the checkout\n")
    command.chmod(0o755)
    return venv


def test_links_into_the_directory_says_so_and_runs(venv: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    result = link_on_path(venv, bin_dir, path=f"{bin_dir}:/usr/bin:/bin")
    link = bin_dir / "remotefs"
    assert os.readlink(link) == f"{venv}/bin/remotefs"
    assert result.stderr.strip() == (
        f"setup: linked {link} -> {venv}/bin/remotefs, so `remotefs` runs from anywhere"
        " (delete the link to undo; REMOTEFS_LINK=no skips this)"
    )
    ran = subprocess.run(
        ["remotefs"],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        check=True,
    )
    assert ran.stdout == "remotefs from the checkout\n"
    # Again: nothing to do, nothing said.
    assert link_on_path(venv, bin_dir, path=f"{bin_dir}:/usr/bin:/bin").stderr == ""
    assert os.readlink(link) == f"{venv}/bin/remotefs"


def test_says_when_the_directory_is_not_on_path(venv: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    result = link_on_path(venv, bin_dir)
    assert f"setup: {bin_dir} is not on your PATH" in result.stderr


def test_another_remotefs_is_left_alone(venv: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    other = bin_dir / "remotefs"
    other.write_text("#!/bin/sh\necho pip-installed\n")
    result = link_on_path(venv, bin_dir)
    assert other.read_text() == "#!/bin/sh\necho pip-installed\n" and not other.is_symlink()
    assert "exists and is not a link to this checkout: left alone" in result.stderr


def test_a_link_to_another_checkout_is_left_alone(venv: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-checkout" / ".venv" / "bin" / "remotefs"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "remotefs").symlink_to(other)
    result = link_on_path(venv, bin_dir)
    assert os.readlink(bin_dir / "remotefs") == str(other)
    assert f"is a link to {other}, not to this checkout: left alone" in result.stderr


def test_a_link_to_a_removed_checkout_is_replaced(venv: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gone = tmp_path / "removed-checkout" / ".venv" / "bin" / "remotefs"
    (bin_dir / "remotefs").symlink_to(gone)
    result = link_on_path(venv, bin_dir)
    assert os.readlink(bin_dir / "remotefs") == f"{venv}/bin/remotefs"
    assert f"replacing {bin_dir}/remotefs, a link to the removed {gone}" in result.stderr


def test_a_dangling_link_to_something_else_is_left_alone(venv: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "remotefs").symlink_to("/opt/somewhere/remotefs")
    link_on_path(venv, bin_dir)
    assert os.readlink(bin_dir / "remotefs") == "/opt/somewhere/remotefs"


def test_other_users_get_a_link_in_their_local_bin(venv: Path, tmp_path: Path) -> None:
    result = link_on_path(venv, None, uid="1000")
    link = tmp_path / "checkout" / "home" / ".local" / "bin" / "remotefs"
    assert os.readlink(link) == f"{venv}/bin/remotefs", result.stderr
