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
* **Trust nothing below it that is not the user's own.** Every directory under it (``files/``
  and each entry) is checked as it is opened (`check_own_dir`, on the descriptor): owned by
  the user, writable by nobody else. Ownership of the top alone is not enough: a user who made
  ``files/`` or an entry directory could swap two entries' data files, root-owned as they are.
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


def _trusted_owners() -> str:
    """Who may own a trusted directory, as the end of a sentence."""
    euid = os.geteuid()
    return "root" if euid == 0 else f"{_owner_name(euid)} or root"


def _is_empty(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _fix_for(directory: Path, cheap_fix: str) -> str:
    """The advice for a directory someone else could write to.

    An empty one is fixed in place (*cheap_fix*). A non-empty one never is: its owner (or
    group) may already have planted or swapped files in it, and ``chown -R`` would make those
    the user's own. Removing it, or using another one, is the only advice that closes the hole.
    """
    if _is_empty(directory):
        return cheap_fix
    return (
        f"what is in it cannot be trusted, so remove it (rm -rf {directory}) or use another"
        " directory"
    )


def _check_owner_and_mode(path: Path, directory: Path, info: os.stat_result, what: str) -> None:
    """Raise unless *directory* is owned by the user or root and only they may write to it.

    *path* is the directory the user named (as *what*); *directory* is it or a parent of it.
    """
    itself = directory == Path(os.path.realpath(path))
    subject = f"{what} {path}: " + ("it" if itself else f"its parent {directory}")
    euid = os.geteuid()
    if info.st_uid not in (euid, 0):
        fix = (
            _fix_for(
                directory, f"use a directory you own, or take it over: chown {euid} {directory}"
            )
            if itself
            else f"use a {what} whose parents only {_trusted_owners()} can write to"
        )
        raise UnsafePathError(
            errno.EPERM,
            f"{subject} is owned by {_owner_name(info.st_uid)}, not by {_trusted_owners()},"
            f" so that user could plant or swap files in it; {fix}",
        )
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky_root = info.st_uid == 0 and info.st_mode & stat.S_ISVTX
    if writable and not sticky_root:
        who = {stat.S_IWGRP: "its group", stat.S_IWOTH: "others"}.get(
            writable, "its group and others"
        )
        cheap = f"fix it with: chmod go-w {directory}"
        raise UnsafePathError(
            errno.EPERM,
            f"{subject} is writable by {who}, who could plant or swap files in it;"
            f" {_fix_for(directory, cheap) if itself else cheap}",
        )


def check_private_dir(path: Path, what: str = "cache directory") -> None:
    """Refuse *path* unless it and its parents are safe (see the module docstring).

    *path* may not exist yet: its missing part is created later by the daemon (0700), and
    its existing ancestors are checked. Raises `UnsafePathError` whose message is one
    sentence that names *what* and *path*, says why, and gives a fix that leaves no hole.
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
        _check_owner_and_mode(path, directory, info, what)
        if not first and info.st_uid == 0:
            return  # the first root-owned parent: above it, only root can change anything
        first = False


def check_own_dir(fd: int, name: str | Path) -> None:
    """Refuse the directory open at *fd* unless the user owns it and only the user may write.

    For every directory below the cache directory (``files/`` and each entry): the daemon
    made them all, so any other owner, or write access for others, means someone else could
    have swapped what is in them. Raises `UnsafePathError` naming *name*.
    """
    info = os.fstat(fd)
    euid = os.geteuid()
    if info.st_uid != euid:
        raise UnsafePathError(
            errno.EPERM,
            f"{name} is owned by {_owner_name(info.st_uid)}, not by {_owner_name(euid)},"
            " so that user could swap what is in it",
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            errno.EPERM,
            f"{name} is writable by others than {_owner_name(euid)}, who could swap what is in it",
        )


def open_dir(
    name: str | Path, *, dir_fd: int | None = None, create: bool = False, own: bool = False
) -> int:
    """A descriptor of directory *name* (relative to *dir_fd*), never through a symlink.

    With *own*, the directory must also pass `check_own_dir` (the user's, nobody else may
    write to it), checked on the descriptor itself so nothing can be swapped in between.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(
                err.errno, f"{name} is not a directory (a symbolic link is never followed)"
            ) from None
        raise
    if own:
        try:
            check_own_dir(fd, name)
        except BaseException:
            os.close(fd)
            raise
    return fd


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
        if regular and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafePathError(errno.EPERM, f"{name} is writable by others than you")
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
