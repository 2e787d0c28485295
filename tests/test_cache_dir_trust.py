"""A cache directory the daemon does not own is refused, and no planted symlink is followed.

The daemon runs as root here. Each test plants what another user could have: a cache
directory made (or a parent owned) by someone else, a group-writable one, symlinks named
``lock``, ``remotefs.log`` or in place of a cache entry. The mount must be refused with a
message that says why and how to fix it, or the planted link removed (never followed), and
the files the links point at must be exactly as they were.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from remotefs.cache import safe_fs
from remotefs.cache.store import CacheDirError, CacheStore

from .mounting import MountFactory, is_mounted, run_remotefs
from .virtual_origin import VirtualFile, VirtualOrigin, expected

NOBODY = 65534
MiB = 1024 * 1024


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    """A root-owned file outside every cache directory, which no test may change."""
    path = tmp_path / "precious" / "shadow"
    path.parent.mkdir()
    path.write_bytes(b"root's secret\n")
    path.chmod(0o600)
    return path


def untouched(path: Path) -> bool:
    return path.read_bytes() == b"root's secret\n" and path.stat().st_size == 14


def mount_command(tmp_path: Path, cache: Path, url: str, *extra: str) -> tuple[int, str, Path]:
    urls = tmp_path / "urls.txt"
    urls.write_text(url + "\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    result = run_remotefs("mount", urls, mnt, "--cache-dir", cache, *extra)
    return result.returncode, result.stderr, mnt


def test_a_cache_dir_made_by_another_user_is_refused(
    tmp_path: Path, virtual_origin: VirtualOrigin, fuse_available: None
) -> None:
    virtual_origin.files["a.bin"] = VirtualFile(1000)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)
    code, stderr, mnt = mount_command(tmp_path, cache, virtual_origin.url("a.bin"))
    assert code == 1
    assert stderr == (
        f"remotefs: refusing the cache directory {cache}: it is owned by nobody (uid {NOBODY}),"
        " not by root, so that user could plant or swap files in it; use a directory you own,"
        f" or take it over: chown 0 {cache}\n"
    )
    assert not is_mounted(mnt)
    assert os.listdir(cache) == []  # nothing created in it


def test_a_cache_dir_under_another_users_directory_is_refused(
    tmp_path: Path, virtual_origin: VirtualOrigin, fuse_available: None
) -> None:
    virtual_origin.files["a.bin"] = VirtualFile(1000)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    cache = theirs / "cache"  # not there yet: root would create it in nobody's directory
    code, stderr, mnt = mount_command(tmp_path, cache, virtual_origin.url("a.bin"))
    assert code == 1
    assert f"its parent {theirs} is owned by nobody (uid {NOBODY})" in stderr
    assert not cache.exists() and not is_mounted(mnt)


@pytest.mark.parametrize(("mode", "who"), [(0o770, "its group"), (0o707, "others")])
def test_a_cache_dir_others_may_write_to_is_refused(
    tmp_path: Path, virtual_origin: VirtualOrigin, fuse_available: None, mode: int, who: str
) -> None:
    virtual_origin.files["a.bin"] = VirtualFile(1000)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    code, stderr, mnt = mount_command(tmp_path, cache, virtual_origin.url("a.bin"))
    assert code == 1
    assert stderr == (
        f"remotefs: refusing the cache directory {cache}: it is writable by {who}, who could"
        f" plant or swap files in it; fix it with: chmod go-w {cache}\n"
    )
    assert not is_mounted(mnt)


def test_a_planted_lock_symlink_is_refused_and_not_followed(
    tmp_path: Path, virtual_origin: VirtualOrigin, precious: Path, fuse_available: None
) -> None:
    virtual_origin.files["a.bin"] = VirtualFile(1000)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / "lock").symlink_to(precious)
    code, stderr, mnt = mount_command(tmp_path, cache, virtual_origin.url("a.bin"))
    assert code == 1
    assert stderr == (
        f"remotefs: refusing the cache directory {cache}: {cache / 'lock'} is a symbolic link;"
        " remotefs never follows one here; what is there cannot be trusted, so remove it"
        f" (rm -rf {cache / 'lock'}) or use another cache directory\n"
    )
    assert untouched(precious)
    assert not is_mounted(mnt)


def test_a_planted_log_symlink_is_refused_and_not_followed(
    tmp_path: Path, virtual_origin: VirtualOrigin, precious: Path, fuse_available: None
) -> None:
    virtual_origin.files["a.bin"] = VirtualFile(1000)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / "remotefs.log").symlink_to(precious)
    code, stderr, mnt = mount_command(tmp_path, cache, virtual_origin.url("a.bin"))
    assert code == 1
    assert stderr == (
        f"remotefs: refusing the log file {cache / 'remotefs.log'}: remotefs.log is a symbolic"
        " link; remotefs never follows one here\n"
    )
    assert untouched(precious)
    assert not is_mounted(mnt)


def test_a_log_file_in_a_directory_others_may_write_to_is_refused(
    tmp_path: Path, virtual_origin: VirtualOrigin, fuse_available: None
) -> None:
    virtual_origin.files["a.bin"] = VirtualFile(1000)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    code, stderr, _ = mount_command(
        tmp_path,
        tmp_path / "cache",
        virtual_origin.url("a.bin"),
        "--log-file",
        str(shared / "r.log"),
    )
    assert code == 1
    assert f"log directory {shared}: it is writable by its group and others" in stderr
    assert not (shared / "r.log").exists()


@pytest.mark.parametrize("planted", ["entry", "data", "meta"])
def test_a_planted_entry_symlink_is_removed_never_followed(
    tmp_path: Path,
    virtual_origin: VirtualOrigin,
    remotefs: MountFactory,
    precious: Path,
    planted: str,
) -> None:
    origin = virtual_origin
    origin.files["a.bin"] = VirtualFile(3 * MiB, seed=9)
    url = origin.url("a.bin")
    mount = remotefs.mount([url])
    assert (mount.path / "a.bin").read_bytes() == expected(9, 0, 3 * MiB)
    mount.unmount()
    entry = mount.cache_dir / "files" / hashlib.sha256(url.encode()).hexdigest()[:40]
    assert (entry / "data").exists()
    elsewhere = tmp_path / "elsewhere"
    if planted == "entry":
        # A forged entry elsewhere (its checksums are valid: a copy of the real one, with
        # other bytes in the data file), reached through a link in place of the entry.
        shutil.copytree(entry, elsewhere)
        (elsewhere / "data").write_bytes(b"\x00" * 3 * MiB)
        shutil.rmtree(entry)
        entry.symlink_to(elsewhere)
    else:
        (entry / planted).unlink()
        (entry / planted).symlink_to(precious)
    mount = remotefs.mount([url])
    assert (mount.path / "a.bin").read_bytes() == expected(9, 0, 3 * MiB)
    assert untouched(precious)
    if planted == "entry":
        assert (elsewhere / "data").read_bytes() == b"\x00" * 3 * MiB  # never written to
        assert not entry.is_symlink()
    assert "symbolic link" in mount.log_text()


def test_check_private_dir_accepts_what_the_user_owns(tmp_path: Path) -> None:
    mine = tmp_path / "a" / "b"
    mine.mkdir(parents=True, mode=0o700)
    safe_fs.check_private_dir(mine)
    safe_fs.check_private_dir(mine / "not" / "yet")  # created later, 0700
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.chown(sticky, 0, 0)
    safe_fs.check_private_dir(sticky / "cache")  # a root-owned sticky parent, as /tmp
    link = tmp_path / "link"
    link.symlink_to(mine)
    safe_fs.check_private_dir(link)  # the user's own link


def test_a_symlink_on_the_way_made_by_another_user_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(safe_fs.UnsafePathError, match="is a symbolic link owned by nobody"):
        safe_fs.check_private_dir(link / "cache")


def test_the_store_refuses_a_fifo_planted_as_lock(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.mkfifo(cache / "lock")
    with pytest.raises(CacheDirError, match="lock is not a regular file"):
        CacheStore(cache, 65536).open(wait=0)
