"""The whole cache tree is trusted or refused: another local user cannot make a mount serve
wrong bytes by owning ``files/`` or an entry directory below a cache directory root owns.

Real users (one made for the attacker, removed at the end), a real mount, a real origin. The
attack, as found against an earlier version: the attacker makes the cache directory and the
entry directories of two URLs (their names are the URLs' hashes) before root first uses it;
root follows the advice of the old refusal (``chown 0 DIR``), mounts, reads both files
completely and unmounts; the attacker swaps the two entries' data files (root's own files,
moved by renames in directories the attacker owns); the next mount served each file's bytes as
the other's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from remotefs.cache.store import CacheStore

from .mounting import MountFactory, is_mounted, run_remotefs
from .origin import Origin
from .other_users import ATTACKER, VICTIM, as_user, run_cli_as

SIZE = 300 * 1024 + 5  # a few blocks; both files the same size, as a swap needs


def plant_cache(cache: Path, urls: list[str], *, files_mode: int = 0o755) -> list[Path]:
    """What the attacker makes before root first uses *cache*: the directory, ``files/`` and
    the entry directories of *urls*, all the attacker's. Returns the entry directories."""
    entries = [cache / "files" / CacheStore.key(url) for url in urls]
    for directory in (cache, cache / "files", *entries):
        made = as_user(ATTACKER, "mkdir", "-m", "755", directory)
        assert made.returncode == 0, made.stderr
    as_user(ATTACKER, "chmod", oct(files_mode)[2:], cache / "files")
    return entries


def swap_data(entries: list[Path]) -> subprocess.CompletedProcess[str]:
    """The attacker swaps the data files of two entries (renames only: no file of theirs)."""
    first, second = (entry / "data" for entry in entries)
    script = f"mv {first} {first}.x && mv {second} {first} && mv {first}.x {second}"
    return as_user(ATTACKER, "sh", "-c", script)


def two_files(origin: Origin, origin_root: Path) -> tuple[list[str], dict[str, bytes]]:
    data = {name: os.urandom(SIZE) for name in ("a.bin", "b.bin")}
    for name, content in data.items():
        (origin_root / name).write_bytes(content)
    return [origin.url(name) for name in data], data


def read_all(mount_path: Path, data: dict[str, bytes]) -> dict[str, bool]:
    return {name: (mount_path / name).read_bytes() == content for name, content in data.items()}


def test_old_advice_followed_the_mount_is_refused_and_the_new_advice_closes_the_hole(
    users: dict[str, int],
    sticky_tmp: Path,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
) -> None:
    urls, data = two_files(origin, origin_root)
    cache = sticky_tmp / "cache"
    entries = plant_cache(cache, urls)
    mountpoint = sticky_tmp / "mnt"
    mountpoint.mkdir()
    listing = remotefs.write_urls(urls, "trust.txt")

    # The attacker's own directory: refused, and the advice is not a chown of a tree
    # that holds what the attacker made.
    refused = run_remotefs("mount", listing, mountpoint, "--cache-dir", cache)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"remotefs: refusing the cache directory {cache}: it is owned by {ATTACKER}"
        f" (uid {users[ATTACKER]}), not by root, so that user could plant or swap files in it;"
        f" what is in it cannot be trusted, so remove it (rm -rf {cache}) or use another"
        " directory\n"
    )
    assert not is_mounted(mountpoint)

    # The old advice (chown 0 DIR) followed: files/ is still the attacker's, so still refused.
    os.chown(cache, 0, 0)
    refused = run_remotefs("mount", listing, mountpoint, "--cache-dir", cache)
    assert refused.returncode == 1, "a cache whose files/ another user owns was used"
    files = cache / "files"
    assert refused.stderr == (
        f"remotefs: refusing the cache directory {cache}: {files} is owned by {ATTACKER}"
        f" (uid {users[ATTACKER]}), not by root (uid 0), so that user could swap what is in it;"
        f" what is there cannot be trusted, so remove it (rm -rf {files}) or use another cache"
        " directory\n"
    )
    assert not is_mounted(mountpoint)
    assert sorted(os.listdir(cache)) == ["files"], "the refusal left something behind"

    # The new advice followed: the attacker can no longer reach anything, and every byte is
    # the origin's, read from the cache on the next mount.
    subprocess.run(["rm", "-rf", str(files)], check=True)
    mount = remotefs.mount(urls_file=listing, cache_dir=cache, mountpoint=mountpoint)
    assert read_all(mount.path, data) == {"a.bin": True, "b.bin": True}
    mount.unmount()
    attempt = swap_data(entries)
    assert attempt.returncode != 0, "the attacker could still swap the entries"
    origin.reset_counters()
    mount = remotefs.mount(urls_file=listing, cache_dir=cache, mountpoint=mountpoint)
    assert read_all(mount.path, data) == {"a.bin": True, "b.bin": True}
    assert origin.bytes_served("/a.bin") <= 1 and origin.bytes_served("/b.bin") <= 1


def test_entry_directories_of_another_user_are_replaced_before_anything_is_written(
    users: dict[str, int],
    sticky_tmp: Path,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
) -> None:
    """files/ is root's but traversable, the two entries are the attacker's: root's daemon
    must not write into them, so the swap after the unmount has nothing to swap."""
    urls, data = two_files(origin, origin_root)
    cache = sticky_tmp / "cache"
    entries = plant_cache(cache, urls)
    os.chown(cache, 0, 0)
    os.chown(cache / "files", 0, 0)
    (cache / "files").chmod(0o711)  # root's, not writable by others: it passes the check

    mount = remotefs.mount(urls, cache_dir=cache, mountpoint=sticky_tmp / "mnt")
    assert read_all(mount.path, data) == {"a.bin": True, "b.bin": True}
    mount.unmount()
    for entry in entries:
        info = entry.stat()
        assert (info.st_uid, info.st_mode & 0o077) == (0, 0), f"{entry} is still not root's"
    attempt = swap_data(entries)
    assert attempt.returncode != 0, "the attacker could still swap the entries"
    log = mount.log_text()
    assert log.count("cannot be trusted") == 2, log[-3000:]
    assert f"is owned by {ATTACKER} (uid {users[ATTACKER]})" in log

    mount = remotefs.mount(urls, cache_dir=cache, mountpoint=sticky_tmp / "mnt")
    assert read_all(mount.path, data) == {"a.bin": True, "b.bin": True}


def test_entries_another_user_could_write_to_are_never_served(
    users: dict[str, int],
    sticky_tmp: Path,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
) -> None:
    """The attack as it worked against the earlier version: root reads both files into the
    attacker's entry directories (planted by root here, as the earlier version did write
    into them), the attacker swaps the data, and the next mount must still serve the
    origin's bytes: the untrusted entries are dropped, and fetched again."""
    urls, data = two_files(origin, origin_root)
    cache = sticky_tmp / "cache"
    cache.mkdir(mode=0o755)
    (cache / "files").mkdir(mode=0o711)
    mount = remotefs.mount(urls, cache_dir=cache, mountpoint=sticky_tmp / "mnt")
    assert read_all(mount.path, data) == {"a.bin": True, "b.bin": True}
    mount.unmount()
    # What the earlier version left: root's files in the attacker's directories.
    entries = [cache / "files" / CacheStore.key(url) for url in urls]
    for entry in entries:
        os.chown(entry, users[ATTACKER], users[ATTACKER])
    attempt = swap_data(entries)
    assert attempt.returncode == 0, attempt.stderr  # the attacker really swapped them

    origin.reset_counters()
    mount = remotefs.mount(urls, cache_dir=cache, mountpoint=sticky_tmp / "mnt")
    assert read_all(mount.path, data) == {"a.bin": True, "b.bin": True}
    # Both entries were dropped and their bytes fetched again from the origin.
    assert origin.bytes_served("/a.bin") >= SIZE and origin.bytes_served("/b.bin") >= SIZE
    assert mount.log_text().count("cannot be trusted") == 2


def test_a_non_root_user_is_refused_a_cache_dir_another_user_made(
    users: dict[str, int], sticky_tmp: Path, origin: Origin, origin_root: Path
) -> None:
    """The same rule for a daemon that is not root (serving: no FUSE needed): the sentence
    names the user, and the cache directory is left as it was."""
    urls, _ = two_files(origin, origin_root)
    cache = sticky_tmp / "cache"
    plant_cache(cache, urls)
    listing = sticky_tmp / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    code, stderr = run_cli_as(
        users[VICTIM],
        ["serve", str(listing), "--listen", "127.0.0.1:0", "--cache-dir", str(cache), "-f"],
    )
    assert code == 1, stderr
    victim = f"{VICTIM} (uid {users[VICTIM]})"
    assert stderr == (
        f"remotefs: refusing the cache directory {cache}: it is owned by {ATTACKER}"
        f" (uid {users[ATTACKER]}), not by {victim} or root, so that user could plant or"
        f" swap files in it; what is in it cannot be trusted, so remove it (rm -rf {cache}) or"
        " use another directory\n"
    )
    assert sorted(os.listdir(cache)) == ["files"]


def test_a_non_root_user_is_refused_a_files_dir_another_user_made(
    users: dict[str, int], sticky_tmp: Path, origin: Origin, origin_root: Path
) -> None:
    """The victim's own cache directory, once open to others and then closed with
    ``chmod go-w`` while the attacker's files/ stayed in it: refused, not used."""
    urls, _ = two_files(origin, origin_root)
    cache = sticky_tmp / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    os.chown(cache, users[VICTIM], users[VICTIM])
    plant = as_user(ATTACKER, "mkdir", "-m", "755", cache / "files")
    assert plant.returncode == 0, plant.stderr
    cache.chmod(0o755)
    listing = sticky_tmp / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    code, stderr = run_cli_as(
        users[VICTIM],
        ["serve", str(listing), "--listen", "127.0.0.1:0", "--cache-dir", str(cache), "-f"],
    )
    assert code == 1, stderr
    files = cache / "files"
    assert stderr == (
        f"remotefs: refusing the cache directory {cache}: {files} is owned by {ATTACKER}"
        f" (uid {users[ATTACKER]}), not by {VICTIM} (uid {users[VICTIM]}), so that user could"
        f" swap what is in it; what is there cannot be trusted, so remove it (rm -rf {files})"
        " or use another cache directory\n"
    )
    assert sorted(os.listdir(cache)) == ["files"], "the refusal left something behind"
