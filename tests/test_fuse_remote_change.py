"""The origin's file changes: old readers get EIO, never a mix of two versions.

An outage is not a change: a stopped origin must not make the cache forget anything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import write_random
from .mounting import MountFactory
from .origin import Origin

MiB = 1024 * 1024
CHANGED = "the remote file changed"
# These tests need blocks that stay uncached until a reader asks for them.
NO_FILL = "--no-fill"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replace_at_origin(path: Path, size: int, seed: int) -> bytes:
    """Swap *path* for a new file (new inode, new mtime) the way a publisher would."""
    old_mtime_ns = path.stat().st_mtime_ns
    fresh = path.with_name(path.name + ".new")
    data = write_random(fresh, size, seed=seed)
    # Both the ETag (size + mtime_ns) and Last-Modified (whole seconds) must change, even when
    # the size does not and the clock is coarse.
    mtime_ns = old_mtime_ns + 5_000_000_000
    os.utime(fresh, ns=(mtime_ns, mtime_ns))
    os.replace(fresh, path)
    return data


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        return handle.read(size)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "new_size",
    [12 * MiB + 777, 5 * MiB + 3, 8 * MiB],
    ids=["grows", "shrinks", "same-size"],
)
def test_change_during_read_gives_eio_to_old_reader_and_new_bytes_to_new_open(
    new_size: int, origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    old = write_random(origin_root / "f.bin", 8 * MiB, seed=1)
    mount = remotefs.mount([origin.url("f.bin")], "--read-deadline", "5", NO_FILL)
    path = mount.path / "f.bin"
    chunk = 128 * 1024
    got: dict[int, bytes] = {}
    with open(path, "rb", buffering=0) as reader:
        # The reader gets the first MiB of the old version...
        while reader.tell() < MiB:
            offset = reader.tell()
            got[offset] = reader.read(chunk)
        origin.wait_idle()
        new = replace_at_origin(origin_root / "f.bin", new_size, seed=2)
        # ... then the file is replaced at the origin, and it reads on. Every byte it gets
        # must be the old version's; blocks it had not cached must fail with EIO.
        errors = 0
        offset = reader.tell()
        while offset < len(old):
            try:
                os.lseek(reader.fileno(), offset, os.SEEK_SET)
                data = reader.read(chunk)
            except OSError as err:
                assert err.errno == errno.EIO, err
                errors += 1
            else:
                if not data:
                    break  # the kernel learned the new, smaller size: EOF is not a wrong byte
                got[offset] = data
            offset += chunk
        assert errors > 0, "the old reader never noticed the change"
        for at, data in got.items():
            assert data == old[at : at + len(data)], f"wrong bytes at {at} for the old reader"
        # Reading again what it had before the change: old bytes or EIO, never new ones.
        try:
            os.lseek(reader.fileno(), 0, os.SEEK_SET)
            again = reader.read(chunk)
        except OSError as err:
            assert err.errno == errno.EIO
        else:
            assert again == old[: len(again)]

    wait_for(lambda: "now serving the new version" in mount.log_text(), 15, "the new version")
    log = mount.log_text()
    assert CHANGED in log and "f.bin" in log
    # A new open sees the new file: its size and its bytes, nothing of the old version.
    assert path.stat().st_size == new_size
    assert sha256(path.read_bytes()) == sha256(new)
    mount.unmount()

    # The next mount agrees: the cache holds the new version only.
    mount = remotefs.mount([origin.url("f.bin")], "--read-deadline", "5")
    origin.wait_idle()
    origin.reset_counters()
    assert (mount.path / "f.bin").stat().st_size == new_size
    assert sha256((mount.path / "f.bin").read_bytes()) == sha256(new)
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == 0, "the new version was not kept in the cache"


def test_once_the_new_version_is_announced_every_stat_shows_its_size(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    """A stat racing the change may cache the old size; the announcement must come after."""
    write_random(origin_root / "f.bin", 8 * MiB, seed=5)
    mount = remotefs.mount([origin.url("f.bin")], "--read-deadline", "5", NO_FILL)
    path = mount.path / "f.bin"
    assert path.stat().st_size == 8 * MiB
    origin.wait_idle()
    replace_at_origin(origin_root / "f.bin", 3 * MiB + 1, seed=6)
    stop = threading.Event()

    def stat_until_stopped() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.stat(path)

    poller = threading.Thread(target=stat_until_stopped)
    poller.start()
    try:
        # A read of an uncached block meets the new version and starts the change.
        with pytest.raises(OSError) as failed:
            read_at(path, 6 * MiB, 4096)
        assert failed.value.errno == errno.EIO
        wait_for(lambda: "now serving the new version" in mount.log_text(), 15, "the new version")
        assert path.stat().st_size == 3 * MiB + 1
    finally:
        stop.set()
        poller.join()


def test_a_handle_of_the_old_version_never_reads_pages_a_new_open_cached(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    """The kernel shares page cache between handles of one inode: versions need their own."""
    page = 4096
    old = write_random(origin_root / "f.bin", 8 * MiB, seed=7)
    mount = remotefs.mount(
        [origin.url("f.bin")], "--read-deadline", "5", "--kernel-readahead", "128K", NO_FILL
    )
    path = mount.path / "f.bin"
    with open(path, "rb", buffering=0) as before:
        assert before.read(page) == old[:page]
        origin.wait_idle()
        new = replace_at_origin(origin_root / "f.bin", 8 * MiB, seed=8)
        # Another reader meets the new version at the origin: the daemon notices the change.
        with pytest.raises(OSError) as failed:
            read_at(path, 6 * MiB, page)  # (the open-time hint cached the last MiB)
        assert failed.value.errno == errno.EIO
        wait_for(lambda: "now serving the new version" in mount.log_text(), 15, "the new version")
        # A new open reads a page of the new version into the kernel's page cache...
        far = 3 * MiB
        assert read_at(path, far, page) == new[far : far + page]
        assert read_at(path, 0, page) == new[:page]
        # ... which the handle opened before the change must not see.
        for offset in (far, 0):
            before.seek(offset)
            try:
                data = before.read(page)
            except OSError as err:
                assert err.errno == errno.EIO
            else:
                assert data == old[offset : offset + page], (
                    f"new bytes at {offset} for an old handle"
                )
        # Like a file replaced on a local disk: the path names another inode now.
        assert os.fstat(before.fileno()).st_ino != path.stat().st_ino


def test_a_url_at_two_paths_changes_at_both_and_the_cache_keeps_one_version(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    """Both paths show the new version, and the cache entry they share stays consistent."""
    old = write_random(origin_root / "f.bin", 6 * MiB, seed=11)
    url = origin.url("f.bin")
    lines = [f"{url} a.bin", f"{url} b.bin"]
    mount = remotefs.mount(lines, "--read-deadline", "5", NO_FILL)
    assert read_at(mount.path / "a.bin", 0, MiB) == old[:MiB]
    assert read_at(mount.path / "b.bin", 2 * MiB, MiB) == old[2 * MiB : 3 * MiB]
    origin.wait_idle()
    new = replace_at_origin(origin_root / "f.bin", 6 * MiB, seed=12)
    with pytest.raises(OSError) as failed:
        read_at(mount.path / "a.bin", 4 * MiB, 4096)
    assert failed.value.errno == errno.EIO
    wait_for(lambda: "now serving the new version" in mount.log_text(), 15, "the new version")
    for name in ("a.bin", "b.bin"):
        assert read_at(mount.path / name, 2 * MiB, MiB) == new[2 * MiB : 3 * MiB], name
    mount.unmount()

    # What the cache kept after the change is the new version's, under either path.
    mount = remotefs.mount(lines, "--read-deadline", "5", NO_FILL)
    for name in ("b.bin", "a.bin"):
        assert sha256((mount.path / name).read_bytes()) == sha256(new), name


def test_change_between_mounts_discards_the_old_blocks(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    old = write_random(origin_root / "f.bin", 6 * MiB + 11, seed=3)
    mount = remotefs.mount([origin.url("f.bin")])
    assert sha256((mount.path / "f.bin").read_bytes()) == sha256(old)
    mount.unmount()
    assert "discarding" not in mount.log_text()

    new = replace_at_origin(origin_root / "f.bin", 9 * MiB + 5, seed=4)
    origin.wait_idle()
    origin.reset_counters()
    mount = remotefs.mount([origin.url("f.bin")])
    log = mount.log_text()
    assert "f.bin: the remote file changed since it was cached" in log
    assert "discarding its cached blocks" in log
    assert (mount.path / "f.bin").stat().st_size == len(new)
    assert read_at(mount.path / "f.bin", 0, MiB) == new[:MiB]
    assert sha256((mount.path / "f.bin").read_bytes()) == sha256(new)
    origin.wait_idle()
    # Every byte came from the origin again: nothing of the old version was reused.
    assert origin.bytes_served("/f.bin") >= len(new)

    # Same size, new mtime: still a change.
    newer = replace_at_origin(origin_root / "f.bin", len(new), seed=5)
    mount.unmount()
    mount = remotefs.mount([origin.url("f.bin")])
    assert mount.log_text().count("discarding its cached blocks") == 2
    assert sha256((mount.path / "f.bin").read_bytes()) == sha256(newer)


def served_within(origin: Origin, path: str, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` of *path* the origin sent since its counters were reset."""
    return sum(max(0, min(e, end) - max(s, start)) for s, e in origin.served_ranges(path))


def test_unreachable_origin_is_not_a_change(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 8 * MiB, seed=6)
    args = ["--read-deadline", "2", "--probe-timeout", "1", NO_FILL]
    mount = remotefs.mount([origin.url("f.bin")], *args)
    path = mount.path / "f.bin"
    assert read_at(path, 0, 2 * MiB) == data[: 2 * MiB]
    origin.wait_idle()

    # Outage while mounted: cached bytes read, uncached ones fail, and nothing is discarded.
    origin.stop()
    assert read_at(path, 100, MiB) == data[100 : MiB + 100]
    with pytest.raises(OSError) as info:
        read_at(path, 5 * MiB, 4096)
    assert info.value.errno == errno.EIO
    origin.start()
    origin.reset_counters()
    assert read_at(path, 0, 2 * MiB) == data[: 2 * MiB]
    assert read_at(path, 5 * MiB, MiB) == data[5 * MiB : 6 * MiB]
    origin.wait_idle()
    # What was cached before the outage did not come from the origin again.
    assert served_within(origin, "/f.bin", 0, 2 * MiB) == 0
    mount.unmount()

    # Mounted during an outage: shown from the cache, and after the origin is back the cached
    # blocks are still there and the rest downloads from the same version.
    origin.stop()
    mount = remotefs.mount([origin.url("f.bin")], *args)
    assert path.stat().st_size == len(data)
    assert read_at(path, 0, 2 * MiB) == data[: 2 * MiB]
    assert read_at(path, 5 * MiB, MiB) == data[5 * MiB : 6 * MiB]
    origin.start()
    origin.reset_counters()
    assert read_at(path, 0, 2 * MiB) == data[: 2 * MiB]
    assert sha256(path.read_bytes()) == sha256(data)
    origin.wait_idle()
    assert served_within(origin, "/f.bin", 0, 2 * MiB) == 0
    assert served_within(origin, "/f.bin", 5 * MiB, 6 * MiB) == 0
    assert origin.bytes_served("/f.bin") <= len(data) - 3 * MiB
    mount.unmount()

    # And the next mount with the origin up keeps everything.
    mount = remotefs.mount([origin.url("f.bin")], *args)
    origin.wait_idle()
    origin.reset_counters()
    assert sha256(path.read_bytes()) == sha256(data)
    origin.wait_idle()
    assert origin.bytes_served("/f.bin") == 0
    log = mount.log_text()
    assert CHANGED not in log and "discarding" not in log and "resetting" not in log


def test_new_opens_never_mix_cached_pages_of_the_old_version_with_new_bytes(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    """Readers keep opening the file while it changes again and again at the origin.

    Each open reads a page the kernel has cached (offset 0) and a block nobody read yet; both
    must come from one version. The kernel's page cache must be emptied of the old version
    before a new open can reach the new one.
    """
    size, cycles, page = 16 * MiB, 12, 4096
    fars = [2 * MiB + cycle * MiB for cycle in range(cycles + 1)]

    def pages(data: bytes) -> dict[int, bytes]:
        """What a version looks like where the readers look: page 0 and every far page."""
        return {offset: data[offset : offset + page] for offset in [0, *fars]}

    versions = [pages(write_random(origin_root / "f.bin", size, seed=10))]
    sizes = [size]
    # Small kernel reads, so a far page is never fetched before its cycle.
    mount = remotefs.mount(
        [origin.url("f.bin")], "--read-deadline", "5", "--kernel-readahead", "128K", NO_FILL
    )
    path = mount.path / "f.bin"
    far = [fars[0]]
    stop = threading.Event()
    checks: list[int] = []
    mixes: list[str] = []

    def matching(offset: int, data: bytes) -> set[int]:
        return {index for index, v in enumerate(list(versions)) if v[offset] == data}

    def hammer() -> None:
        while not stop.is_set():
            offset = far[0]
            try:
                with open(path, "rb", buffering=0) as handle:
                    head = handle.read(page)
                    handle.seek(offset)
                    tail = handle.read(page)
                    length = os.fstat(handle.fileno()).st_size
            except OSError:
                continue  # EIO while the change is being handled: allowed
            checks.append(1)
            both = matching(0, head) & matching(offset, tail)
            if not both:
                mixes.append(f"page 0 of {matching(0, head)}, far page of {matching(offset, tail)}")
            elif all(sizes[index] != length for index in both):
                mixes.append(f"bytes of version {both} with size {length}")

    def changes_noticed(count: int) -> Callable[[], bool]:
        return lambda: mount.log_text().count("now serving the new version") >= count

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for cycle in range(1, cycles + 1):
            # Page 0 of the version the daemon serves now goes into the kernel's page cache.
            wait_for(lambda: _read_quietly(path, 0, page) is not None, 10, "a readable file")
            # Each version has its own size, so a stale size shows as well as stale bytes.
            sizes.append(size + cycle * page)
            versions.append(pages(replace_at_origin(origin_root / "f.bin", sizes[-1], 10 + cycle)))
            far[0] = fars[cycle]  # a page no earlier version's cache holds
            wait_for(changes_noticed(cycle), 15, f"change {cycle} to be noticed")
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not mixes, f"{len(mixes)} opens mixed two versions, e.g. {mixes[:3]}"
    assert len(checks) > 100


def _read_quietly(path: Path, offset: int, size: int) -> bytes | None:
    try:
        return read_at(path, offset, size)
    except OSError:
        return None
