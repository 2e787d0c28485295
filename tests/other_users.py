"""Other local users for tests of what one user can do to another: real accounts (made as
system users when missing, removed at the end), commands run as them, and the remotefs CLI run
as them inside this process (their own interpreter would live under /root, which they cannot
read)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from .requirements import unavailable

ATTACKER = "rfs-attacker"
VICTIM = "rfs-victim"


def _user(name: str) -> int:
    """The uid of *name*, made as a system user when missing (removed by `users`)."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name).pw_uid
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name).pw_uid


@contextlib.contextmanager
def local_users() -> Iterator[dict[str, int]]:
    """The attacker's and the victim's uids (real accounts, made here and removed after)."""
    if os.geteuid() != 0:
        unavailable("these tests need root (they make users and mount as root)")
    for tool in ("useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing (Debian packages passwd and util-linux)")
    existed = {name for name in (ATTACKER, VICTIM) if _exists(name)}
    try:
        yield {name: _user(name) for name in (ATTACKER, VICTIM)}
    finally:
        for name in (ATTACKER, VICTIM):
            if name not in existed:
                subprocess.run(["userdel", name], capture_output=True, check=False)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def sticky_dir() -> Iterator[Path]:
    """A root-owned sticky directory that everyone may write to, as /tmp is: where the attacker
    can make a cache directory before root does."""
    path = Path(tempfile.mkdtemp(prefix="remotefs-trust-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: str, *command: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *map(str, command)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_cli_as(uid: int, args: list[str], stream: int = 2) -> tuple[int, str]:
    """``remotefs ARGS`` run by user *uid*: its exit code and what it printed on *stream*
    (2: stderr, 1: stdout).

    In a forked child of this process, whose Python is already loaded: the user could not
    start root's interpreter (it lives under /root).
    """
    from remotefs import cli

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            os.dup2(write, stream)
            # pytest's capture is not the real fd; the child ends with os._exit, after a flush.
            captured = open(stream, "w", closefd=False)  # noqa: SIM115
            if stream == 1:
                sys.stdout = captured
            else:
                sys.stderr = captured
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.environ["HOME"] = pwd.getpwuid(uid).pw_dir
            code = cli.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "r") as output:
        text = output.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text
