"""Request headers through a real mount: a private origin that wants a bearer token.

The token can come from ``--header``, ``--header-file`` or the URL's own header line in
urls.txt. Without it the file is not listed. The token reaches the origin on every request
(probe and data) and nowhere else: not the daemon log (at debug level), not the output of
``remotefs mount``, not ``remotefs status --json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import write_random
from .mounting import Mount, MountFactory, daemon_pid, run_remotefs
from .origin import Exchange, Origin

TOKEN = "TOPSECRETTOKEN123"
COOKIE = "SECRETCOOKIE456"
AUTHORIZATION = f"Bearer {TOKEN}"


class BearerOrigin(Origin):
    """Answers 401 to every request that lacks ``Authorization: Bearer TOKEN``."""

    def _respond(self, ex: Exchange) -> None:
        if ex.headers.get("authorization") != AUTHORIZATION:
            ex.send_head(401, {"WWW-Authenticate": "Bearer", "Content-Length": "0"})
            return
        super()._respond(ex)


@pytest.fixture
def bearer_origin(origin_root: Path) -> Iterator[BearerOrigin]:
    with BearerOrigin(origin_root) as server:
        yield server


def _mount(
    remotefs: MountFactory, lines: list[str], tmp_path: Path, name: str, *args: str
) -> tuple[Mount, str]:
    """Mount at debug level; return the mount and everything `remotefs mount` printed."""
    urls = remotefs.write_urls(lines, f"{name}.txt")
    mnt, cache = tmp_path / f"mnt-{name}", tmp_path / f"cache-{name}"
    mnt.mkdir()
    common = ["--cache-dir", str(cache), "--no-fill", "--log-level", "debug"]
    result = run_remotefs("mount", urls, mnt, *common, "--probe-timeout", "2", *args)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mnt)
    assert pid is not None
    mount = Mount(mnt, cache, urls, pid)
    remotefs.mounts.append(mount)  # cleaned up whatever happens
    return mount, result.stdout + result.stderr


def _assert_secret_free(text: str, where: str) -> None:
    for secret in (TOKEN, COOKIE):
        assert secret not in text, f"{secret} leaked into {where}:\n{text}"


def _check_served(
    mount: Mount, output: str, origin: BearerOrigin, data: bytes, name: str = "f.bin"
) -> None:
    assert name in os.listdir(mount.path)
    assert (mount.path / name).read_bytes() == data
    status = run_remotefs("status", mount.path, "--json")
    assert status.returncode == 0, status.stderr
    assert name in status.stdout
    _assert_secret_free(status.stdout + status.stderr, "remotefs status --json")
    text = run_remotefs("status", mount.path, "--once")
    _assert_secret_free(text.stdout + text.stderr, "remotefs status")
    mount.unmount()
    _assert_secret_free(output, "the output of remotefs mount")
    _assert_secret_free(mount.log_text(), "the daemon log")
    origin.wait_idle()
    served = [r for r in origin.requests if r.path == f"/{name}"]
    assert len(served) >= 2  # the probe and at least one data request
    assert all(r.status in (200, 206) for r in served), [r.status for r in served]


def test_global_header_option(
    bearer_origin: BearerOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    data = write_random(origin_root / "f.bin", 700_000, seed=31)
    lines = [bearer_origin.url("f.bin")]
    mount, output = _mount(
        remotefs, lines, tmp_path, "opt", "--header", f"Authorization: {AUTHORIZATION}"
    )
    _check_served(mount, output, bearer_origin, data)


def test_header_file(
    bearer_origin: BearerOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    data = write_random(origin_root / "f.bin", 500_000, seed=32)
    header_file = tmp_path / "headers.txt"
    header_file.write_text(
        f"# private origin\n\nAuthorization: {AUTHORIZATION}\nCookie: session={COOKIE}\n"
    )
    header_file.chmod(0o600)
    mount, output = _mount(
        remotefs, [bearer_origin.url("f.bin")], tmp_path, "file", "--header-file", str(header_file)
    )
    _check_served(mount, output, bearer_origin, data)
    served = [r for r in bearer_origin.requests if r.path == "/f.bin"]
    assert all(r.headers.get("cookie") == f"session={COOKIE}" for r in served)


def test_per_url_header_line(
    bearer_origin: BearerOrigin,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
    tmp_path: Path,
) -> None:
    data = write_random(origin_root / "f.bin", 600_000, seed=33)
    public = write_random(origin_root / "public.bin", 100_000, seed=34)
    lines = [
        "# the token goes to this URL only",
        bearer_origin.url("f.bin"),
        f"    Authorization: {AUTHORIZATION}",
        "\tX-Extra: 1",
        "",
        f"{origin.url('public.bin')}   other/public.bin",
    ]
    mount, output = _mount(remotefs, lines, tmp_path, "perurl")
    assert sorted(os.listdir(mount.path)) == ["f.bin", "other"]
    assert (mount.path / "other" / "public.bin").read_bytes() == public
    _check_served(mount, output, bearer_origin, data)
    # The public URL on the other origin got neither the token nor the extra header.
    origin.wait_idle()
    public_requests = [r for r in origin.requests if r.path == "/public.bin"]
    assert public_requests
    assert all("authorization" not in r.headers for r in public_requests)
    assert all("x-extra" not in r.headers for r in public_requests)
    private = [r for r in bearer_origin.requests if r.path == "/f.bin"]
    assert all(r.headers.get("x-extra") == "1" for r in private)


def test_without_the_token_the_file_is_not_listed(
    bearer_origin: BearerOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", 1000, seed=35)
    wrong = ["--header", "Authorization: Bearer wrong"]
    mount, _output = _mount(remotefs, [bearer_origin.url("f.bin")], tmp_path, "none", *wrong)
    assert os.listdir(mount.path) == []
    log = mount.log_text()
    assert "f.bin: not shown until its URL answers" in log, log
    assert "HTTP 401" in log, log
    mount.unmount()
    assert "Bearer wrong" not in mount.log_text()


def test_header_errors_name_the_line_not_the_value(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    urls = tmp_path / "urls.txt"
    urls.write_text(f"http://127.0.0.1:9/f.bin\n  Authorization {TOKEN}\n")
    result = run_remotefs("mount", urls, mnt, "--cache-dir", tmp_path / "c")
    assert result.returncode == 2
    assert "urls.txt:2: malformed header line" in result.stderr, result.stderr
    _assert_secret_free(result.stderr, "the error for a bad header line")

    urls.write_text("http://127.0.0.1:9/f.bin\n")
    header_file = tmp_path / "h.txt"
    header_file.write_text(f"X-Ok: 1\nAuthorization{TOKEN}\n")
    result = run_remotefs(
        "mount", urls, mnt, "--cache-dir", tmp_path / "c", "--header-file", header_file
    )
    assert result.returncode == 2
    assert f"{header_file}:2: malformed header line" in result.stderr, result.stderr
    _assert_secret_free(result.stderr, "the error for a bad header file")

    result = run_remotefs("mount", urls, mnt, "--cache-dir", tmp_path / "c", "--header", TOKEN)
    assert result.returncode == 2
    assert "--header: malformed header line" in result.stderr, result.stderr
    _assert_secret_free(result.stderr, "the error for a bad --header")
