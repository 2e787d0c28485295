"""Files and directories of the cache, opened so that nobody else's planting is ever followed.

The daemon often runs as root, and its cache directory holds files it truncates, writes and
serves as the content of remote files. If another user could place anything there (a
symlink named ``lock`` pointing at /etc/shadow, a forged cache entry with a valid checksum),
root would write through it or serve it. Two rules, as ssh's StrictModes has them:

* **Trust only a directory the user owns.** `check_private_dir` refuses a cache directory
  (or log directory) that is owned by someone other than the daemon's user or root, or is
  writable by group or others; the same for each parent up to and including the first
  directory owned by root (a root-owned sticky directory such as /tmp is fine: others cannot
  replace what is in it). A symlink on the way must be owned by the user or root too.
* **Never follow a link inside it.** Every file and directory under the cache directory is
  opened relative to its parent's descriptor with ``O_NOFOLLOW``; a symlink there fails with
  ELOOP (reported as `UnsafePathError`) instead of being followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

#: Flags of every file open under the cache directory.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW


class UnsafePathError(OSError):
    """A path the daemon must not use: another owner, loose permissions, or a symlink."""


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_owner_and_mode(directory: Path, info: os.stat_result, subject: str) -> None:
    """Raise unless *directory* is owned by the user or root and only they may write to it.

    *subject* opens the message: the directory the user named, and which one is wrong.
    """
    euid = os.geteuid()
    if info.st_uid not in (euid, 0):
        raise UnsafePathError(
            errno.EPERM,
            f"{subject} is owned by {_owner_name(info.st_uid)}, not by {_owner_name(euid)}"
            " or root, so its owner could plant files in it; use a directory you own"
            f" (or: chown {euid} {directory})",
        )
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky_root = info.st_uid == 0 and info.st_mode & stat.S_ISVTX
    if writable and not sticky_root:
        who = {stat.S_IWGRP: "its group", stat.S_IWOTH: "others"}.get(
            writable, "its group and others"
        )
        raise UnsafePathError(
            errno.EPERM,
            f"{subject} is writable by {who}, who could plant files in it;"
            f" fix it with: chmod go-w {directory}",
        )


def check_private_dir(path: Path, what: str = "cache directory") -> None:
    """Refuse *path* unless it and its parents are safe (see the module docstring).

    *path* may not exist yet: its missing part is created later by the daemon (0700), and
    its existing ancestors are checked. Raises `UnsafePathError` with a message that says
    why and how to fix it.
    """
    absolute = Path(os.path.abspath(path))
    # Symlinks on the way are the user's own choice only if the user (or root) made them.
    current = Path("/")
    for part in absolute.parts[1:]:
        candidate = current / part
        try:
            info = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            break
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in (os.geteuid(), 0):
                raise UnsafePathError(
                    errno.EPERM,
                    f"{what} {path}: {candidate} is a symbolic link owned by"
                    f" {_owner_name(info.st_uid)}; remotefs follows only links of yours or"
                    " root's",
                )
            candidate = Path(os.path.realpath(candidate))
        current = candidate
    real = Path(os.path.realpath(absolute))
    first = True
    for directory in [real, *real.parents]:
        try:
            info = os.stat(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue  # created later by the daemon (or a file on the way, refused below)
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePathError(errno.ENOTDIR, f"{what} {path}: {directory} is not a directory")
        subject = (
            f"{what} {path}" if directory == real else f"{what} {path}: its parent {directory}"
        )
        _check_owner_and_mode(directory, info, subject)
        if not first and info.st_uid == 0:
            return  # the first root-owned parent: above it, only root can change anything
        first = False


def open_dir(name: str | Path, *, dir_fd: int | None = None, create: bool = False) -> int:
    """A descriptor of directory *name* (relative to *dir_fd*), never through a symlink."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(
                err.errno, f"{name} is not a directory (a symbolic link is never followed)"
            ) from None
        raise


def open_file(
    name: str, flags: int, *, dir_fd: int, mode: int = 0o600, regular: bool = True
) -> int:
    """``open`` of *name* under *dir_fd* with ``O_NOFOLLOW``; a link raises `UnsafePathError`.

    Opened non-blocking first, so a FIFO planted in the cache cannot hang the daemon, and
    refused unless it is a regular file owned by the daemon's user.
    """
    try:
        fd = os.open(name, flags | _NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(
                errno.ELOOP, f"{name} is a symbolic link; remotefs never follows one here"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if regular and not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(errno.EINVAL, f"{name} is not a regular file")
        if info.st_uid != os.geteuid():
            raise UnsafePathError(
                errno.EPERM, f"{name} is owned by {_owner_name(info.st_uid)}, not by you"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(name: str, *, dir_fd: int) -> bytes:
    """The whole content of regular file *name* under *dir_fd* (never through a link)."""
    fd = open_file(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(name: str, data: bytes, *, dir_fd: int) -> None:
    """Replace *name* under *dir_fd* with *data*: temp file, fsync, rename, fsync the directory.

    After a crash a reader finds either the old complete file or the new one, never a torn
    one. A stale temp file (or a link planted in its place) is removed first.
    """
    tmp = f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # unlink never follows a link: it removes the link
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def remove_entry(name: str, *, dir_fd: int) -> None:
    """Remove *name* under *dir_fd*: a file, a link (not its target) or a whole directory."""
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = open_dir(name, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_entry(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


@contextlib.contextmanager
def opened_dir(
    name: str | Path, *, dir_fd: int | None = None, create: bool = False
) -> Iterator[int]:
    """`open_dir` as a context manager that closes the descriptor."""
    fd = open_dir(name, dir_fd=dir_fd, create=create)
    try:
        yield fd
    finally:
        os.close(fd)
