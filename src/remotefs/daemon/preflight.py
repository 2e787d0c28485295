"""Checks before mounting, and the one line a person sees when a mount fails anyway.

libfuse reports most set-up problems as "fuse_session_mount failed" (with a line of its own on
stderr, which the background daemon's user never sees), and a failure inside the daemon's
nursery used to reach the user as "Exceptions from Trio nursery (1 sub-exception)". Here the
usual causes are checked first, each with the fix in its message, and any other failure is
reduced to its real cause.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil

import trio

from ..cache.fd_cache import raise_nofile_limit

FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"


class PreflightError(Exception):
    """The mount cannot work on this machine as it is; the message says what to do."""


def check_fuse_device(device: str = FUSE_DEVICE) -> None:
    """Refuse when *device* cannot be opened for reading and writing."""
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        raise PreflightError(
            f"{device} does not exist: load the FUSE module (modprobe fuse), or give a"
            f" container the device (docker run --device {device} --cap-add SYS_ADMIN ...)"
        ) from None
    except PermissionError:
        raise PreflightError(
            f"{device}: permission denied for uid {os.geteuid()}: mount as root, or make the"
            f" device usable by your user (Debian's default is mode 0666: chmod 0666 {device})"
        ) from None
    except OSError as err:
        raise PreflightError(f"{device}: {err.strerror}") from None


#: Descriptors the daemon needs besides its cache's data files: stdio, /dev/fuse, the lock,
#: the log, the event loop, the control socket, and a few connections.
MIN_DESCRIPTORS = 64


def check_descriptor_limit(minimum: int = MIN_DESCRIPTORS) -> int:
    """Raise the soft limit of open files to the hard one; refuse a limit below *minimum*.

    Returns the soft limit now in force.
    """
    soft, _ = raise_nofile_limit()
    if soft != resource.RLIM_INFINITY and soft < minimum:
        raise PreflightError(
            f"too many open files would be needed: the limit is {soft} and remotefs needs at"
            f" least {minimum}; raise it with 'ulimit -n', or with LimitNOFILE= in the"
            " systemd unit"
        )
    return int(soft)


def check_unprivileged_mount(allow_other: bool, conf: str | None = None) -> None:
    """What a mount by a user other than root needs: fusermount3, and maybe fuse.conf."""
    conf = conf or FUSE_CONF
    if os.geteuid() == 0:
        return
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        raise PreflightError(
            "fusermount3 is not installed; a user other than root needs it to mount"
            " (Debian package: fuse3)"
        )
    if allow_other and not user_allow_other(conf):
        raise PreflightError(
            f"--allow-other needs the line 'user_allow_other' in {conf} for users other than"
            f" root; add it (as root: echo user_allow_other >> {conf}) or leave out"
            " --allow-other"
        )


def user_allow_other(conf: str | None = None) -> bool:
    """True when *conf* enables ``user_allow_other`` (a line of its own, not commented)."""
    conf = conf or FUSE_CONF
    try:
        with open(conf, encoding="utf-8", errors="replace") as handle:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in handle)
    except OSError:
        return False


def describe_failure(error: BaseException) -> str:
    """One line naming the real cause of *error* (the first one inside exception groups)."""
    leaf = _first_leaf(error)
    if isinstance(leaf, OSError) and leaf.errno in (errno.EMFILE, errno.ENFILE):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"too many open files (the limit is {soft}): raise it with 'ulimit -n', or with"
            " LimitNOFILE= in the systemd unit"
        )
    if isinstance(leaf, RuntimeError) and "fuse" in str(leaf).lower():
        return (
            f"{leaf}: the kernel refused the mount (is the mountpoint usable, is FUSE"
            " allowed here? see the log for libfuse's own message)"
        )
    text = str(leaf) or type(leaf).__name__
    if isinstance(leaf, OSError) and leaf.strerror and leaf.filename:
        text = f"{leaf.filename}: {leaf.strerror}"
    return f"{type(leaf).__name__}: {text}" if not isinstance(leaf, OSError) else text


def _first_leaf(error: BaseException) -> BaseException:
    """The first exception of *error* that is not a group or a cancellation."""
    for _ in range(100):  # bounded: groups nest, they do not loop
        if not isinstance(error, BaseExceptionGroup):
            return error
        inner = [e for e in error.exceptions if not isinstance(e, trio.Cancelled)]
        error = (inner or list(error.exceptions))[0]
    return error
