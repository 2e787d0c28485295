"""Every failure to mount prints one line that names the cause and the fix, exits non-zero,
and leaves nothing half-done: /dev/fuse, fuse.conf, descriptor limits, a FIFO as urls.txt,
and any other exception reduced to its own message."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import trio

from remotefs import cli
from remotefs.daemon import preflight
from remotefs.daemon.preflight import (
    PreflightError,
    check_fuse_device,
    check_unprivileged_mount,
    describe_failure,
    user_allow_other,
)

from .mounting import is_mounted, run_remotefs, with_fd_limit


def test_a_missing_fuse_device_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PreflightError) as info:
        check_fuse_device(str(tmp_path / "fuse"))
    assert "does not exist: load the FUSE module (modprobe fuse)" in str(info.value)


def test_a_fuse_device_the_user_may_not_open_names_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def denied(path: str, flags: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(preflight.os, "open", denied)
    with pytest.raises(PreflightError) as info:
        check_fuse_device()
    assert str(info.value).startswith("/dev/fuse: permission denied for uid")
    assert "mount as root" in str(info.value)


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("#user_allow_other\n", False),
        ("mount_max = 1000\n", False),
        ("user_allow_other\n", True),
        ("  user_allow_other   # for the NAS\n", True),
        ("user_allow_other_not\n", False),
    ],
)
def test_user_allow_other_is_read_as_fuse_does(tmp_path: Path, text: str, allowed: bool) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text(text)
    assert user_allow_other(str(conf)) is allowed


def test_allow_other_without_user_allow_other_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("#user_allow_other\n")
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    with pytest.raises(PreflightError) as info:
        check_unprivileged_mount(True, str(conf))
    assert str(info.value) == (
        f"--allow-other needs the line 'user_allow_other' in {conf} for users other than root;"
        f" add it (as root: echo user_allow_other >> {conf}) or leave out --allow-other"
    )
    check_unprivileged_mount(False, str(conf))  # without --allow-other it is fine


def test_allow_other_as_another_user_is_refused_before_anything_happens(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fuse_available: None,
) -> None:
    """The command as a user without root (its uid faked in-process): one line, exit 1, no
    mount and no cache directory."""
    conf = tmp_path / "fuse.conf"
    conf.write_text("#user_allow_other\n")
    monkeypatch.setattr(preflight, "FUSE_CONF", str(conf))
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.bin\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    code = cli.main(["mount", str(urls), str(mnt), "--cache-dir", str(cache), "--allow-other"])
    stderr = capsys.readouterr().err
    assert code == 1
    assert stderr == (
        f"remotefs: --allow-other needs the line 'user_allow_other' in {conf} for users other"
        f" than root; add it (as root: echo user_allow_other >> {conf}) or leave out"
        " --allow-other\n"
    )
    assert not is_mounted(mnt) and not cache.exists()


def test_a_fifo_as_urls_txt_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "urls.txt"
    os.mkfifo(fifo)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    began = time.monotonic()
    result = run_remotefs("mount", fifo, mnt, "--cache-dir", tmp_path / "cache", timeout=20)
    assert time.monotonic() - began < 10
    assert result.returncode == 2
    assert result.stderr == (
        f"remotefs: {fifo}: cannot read: a FIFO, not a regular file (give a text file)\n"
    )


def test_too_few_descriptors_is_one_line_that_says_so(tmp_path: Path, fuse_available: None) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.bin\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_remotefs(
        "mount", urls, mnt, "--cache-dir", tmp_path / "cache", prefix=with_fd_limit(12)
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == (
        "remotefs: too many open files would be needed: the limit is 12 and remotefs needs at"
        " least 64; raise it with 'ulimit -n', or with LimitNOFILE= in the systemd unit\n"
    )
    assert not is_mounted(mnt)


def test_describe_failure_names_the_real_cause_inside_exception_groups() -> None:
    inner = ValueError("bad things at line 3")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
    assert describe_failure(group) == "ValueError: bad things at line 3"
    with_cancel = BaseExceptionGroup("x", [trio.Cancelled._create(), KeyError("k")])
    assert describe_failure(with_cancel) == "KeyError: 'k'"
    emfile = OSError(errno.EMFILE, "Too many open files")
    assert describe_failure(ExceptionGroup("g", [emfile])).startswith("too many open files")
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")
    assert describe_failure(missing) == "/x/y: No such file or directory"
