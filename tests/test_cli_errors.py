"""Bad input stops `remotefs mount` before anything is mounted, with a message that says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from .mounting import MountFactory, is_mounted, run_remotefs
from .origin import Origin

GOOD = "http://127.0.0.1:9/ok.bin"


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        ([GOOD, "ftp://example.org/file.iso"], 2, "unsupported URL scheme 'ftp'"),
        (["http://:80/x.bin"], 1, "malformed URL"),
        (["http://h:99999/x.bin"], 1, "invalid port"),
        (["# c", "", "http://h/dir/?q=1"], 3, "has a query"),
        (["http://h/a.bin same.bin", "http://h/b.bin same.bin"], 2, "already used on line 1"),
        (["http://h/a.bin ../escape.bin"], 1, ".."),
        (["http://h/a.bin dir//a.bin"], 1, "empty"),
        (["http://h/a%00b.bin"], 1, "add a PATH"),
        (["http://h/a.bin x", "http://h/b.bin x/y"], 2, "line 1"),
    ],
)
def test_manifest_errors_name_file_and_line_and_mount_nothing(
    lines: list[str], line: int, reason: str, tmp_path: Path
) -> None:
    urls = tmp_path / "bad-urls.txt"
    urls.write_text("\n".join(lines) + "\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_remotefs("mount", urls, mountpoint, "--cache-dir", tmp_path / "cache")
    assert result.returncode != 0
    first = result.stderr.strip().splitlines()[0]
    assert f"{urls}:{line}:" in first
    assert reason in first
    assert not is_mounted(mountpoint)
    assert not (tmp_path / "cache").exists(), "nothing may be created before input is valid"


def test_nul_in_path_is_refused(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"http://h/a.bin bad\x00name\n")
    (tmp_path / "mnt").mkdir()
    result = run_remotefs("mount", urls, tmp_path / "mnt")
    assert result.returncode != 0
    assert f"{urls}:1:" in result.stderr


def test_unreadable_manifest(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = run_remotefs("mount", tmp_path / "nope.txt", tmp_path / "mnt")
    assert result.returncode != 0
    assert "nope.txt: cannot read" in result.stderr


def test_mountpoint_missing_or_not_empty(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text(GOOD + "\n")
    result = run_remotefs("mount", urls, tmp_path / "absent")
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "mkdir -p" in result.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    result = run_remotefs("mount", urls, busy)
    assert result.returncode != 0
    assert "not empty" in result.stderr
    assert not is_mounted(busy)


def test_second_daemon_on_one_cache_dir_and_double_mount_are_refused(
    origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    (origin_root / "f.bin").write_bytes(b"abc")
    mount = remotefs.mount([origin.url("f.bin")])
    other = tmp_path / "other"
    other.mkdir()
    result = run_remotefs("mount", mount.urls_file, other, "--cache-dir", mount.cache_dir)
    assert result.returncode != 0
    assert "in use by another remotefs daemon" in result.stderr
    assert f"pid {mount.pid}" in result.stderr
    assert not is_mounted(other)
    result = run_remotefs("mount", mount.urls_file, mount.path, "--cache-dir", tmp_path / "c2")
    assert result.returncode != 0
    assert "already a mount point" in result.stderr
    assert (mount.path / "f.bin").read_bytes() == b"abc"


def test_bad_option_values(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text(GOOD + "\n")
    (tmp_path / "mnt").mkdir()
    result = run_remotefs("mount", urls, tmp_path / "mnt", "--block-size", "3000")
    assert result.returncode != 0
    assert "block size" in result.stderr
    result = run_remotefs("mount", urls, tmp_path / "mnt", "--read-deadline", "-1")
    assert result.returncode != 0
    assert "--read-deadline" in result.stderr
