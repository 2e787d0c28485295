"""Trust at the edges, through real mounts: hostile sizes, a descriptor limit, many URLs.

One URL, one fault domain: whatever one origin claims (a size no file can have, one the cache
filesystem cannot hold, a negative one, totals that contradict its own probe, a size that
turns impossible during a read), the mount stays up, every other file reads back equal to
its origin, and the bad file gives EIO or is left out with a log line. The origin is
`VirtualOrigin`: its files are computed, so a 16 TiB file costs nothing.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import loop_ext4
from .mounting import REMOTEFS, Mount, MountFactory, read_at, run_remotefs, wait_for, with_fd_limit
from .mounting import status_json as status
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024
TiB = 1 << 40


def test_hostile_sizes_cost_only_their_own_file(
    virtual_origin: VirtualOrigin, remotefs: MountFactory, tmp_path: Path, root_required: None
) -> None:
    with loop_ext4(tmp_path, 64 * MiB) as cachefs:  # a cache that holds 16 TiB - 4 KiB at most
        _hostile_sizes(virtual_origin, remotefs, cachefs / "cache")


def _hostile_sizes(origin: VirtualOrigin, remotefs: MountFactory, cache: Path) -> None:
    origin.files["good.bin"] = VirtualFile(3 * MiB + 17, seed=1)
    origin.files["beyond.bin"] = VirtualFile(MiB, seed=2, probe_total=str(1 << 63))
    origin.files["negative.bin"] = VirtualFile(MiB, seed=3, probe_total="-5")
    origin.files["huge.bin"] = VirtualFile(16 * TiB, seed=4)  # more than ext4 holds
    origin.files["liar.bin"] = VirtualFile(4 * MiB, seed=5, data_total=str(5 * MiB))
    names = ["good.bin", "beyond.bin", "negative.bin", "huge.bin", "liar.bin"]
    mount = remotefs.mount(
        [origin.url(name) for name in names],
        "--probe-timeout",
        "2",
        "--read-deadline",
        "3",
        "--fill-idle",
        "0.3",
        cache_dir=cache,
        fill=True,
    )
    assert sorted(os.listdir(mount.path)) == ["good.bin", "huge.bin", "liar.bin"]
    log = mount.log_text()
    assert "beyond.bin: not shown until its URL answers" in log
    assert "more than any file can have" in log
    assert "negative.bin: not shown until its URL answers" in log

    # A file larger than the cache filesystem holds is served from the network, uncached.
    huge = mount.path / "huge.bin"
    assert huge.stat().st_size == 16 * TiB
    for offset in (0, 8 * TiB + 12345, 16 * TiB - 5000, random.randrange(16 * TiB - 70000)):
        assert read_at(huge, offset, 70000) == expected(4, offset, min(70000, 16 * TiB - offset))
    rows = {row["path"]: row for row in status(mount.path)["files"]}
    assert rows["huge.bin"]["state"] == "uncached"
    assert "cannot hold" in rows["huge.bin"]["note"]
    assert rows["huge.bin"]["cached_bytes"] == 0

    # An origin whose data answers contradict its probe: EIO, never bytes of either story.
    with pytest.raises(OSError) as info:
        read_at(mount.path / "liar.bin", MiB, 4096)
    assert info.value.errno == errno.EIO
    wait_for(lambda: "contradicts itself" in mount.log_text(), what="the contradiction log")
    # ... and neither reads nor background fill hammer it: a few requests, then backoff.
    time.sleep(2)
    before = origin.requests("liar.bin")
    time.sleep(3)
    assert origin.requests("liar.bin") - before <= 2

    # Nothing of this touched the good file or the daemon.
    good = mount.path / "good.bin"
    assert good.read_bytes() == expected(1, 0, 3 * MiB + 17)
    assert int(os.getxattr(mount.path, "user.remotefs.pid")) == mount.pid
    assert "Traceback" not in mount.log_text()
    mount.unmount()


def test_a_size_turning_impossible_during_a_read_fails_that_file_only(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    origin.files["x.bin"] = VirtualFile(8 * MiB, seed=6)
    origin.files["y.bin"] = VirtualFile(2 * MiB, seed=7)
    mount = remotefs.mount(
        [origin.url("x.bin"), origin.url("y.bin")],
        "--read-deadline",
        "3",
        "--probe-timeout",
        "2",
        "--prefetch-tail",
        "0",
    )
    with open(mount.path / "x.bin", "rb", buffering=0) as reader:
        assert reader.read(MiB) == expected(6, 0, MiB)
        origin.files["x.bin"] = VirtualFile(
            8 * MiB, seed=6, etag='"v2"', probe_total=str(1 << 64), data_total=str(1 << 64)
        )
        reader.seek(7 * MiB)
        with pytest.raises(OSError) as info:
            reader.read(4096)
        assert info.value.errno == errno.EIO
    wait_for(
        lambda: "cannot probe the new version yet" in mount.log_text(),
        what="the failed probe of the new version",
    )
    assert "more than any file can have" in mount.log_text()
    assert (mount.path / "y.bin").read_bytes() == expected(7, 0, 2 * MiB)
    assert int(os.getxattr(mount.path, "user.remotefs.pid")) == mount.pid
    assert "Traceback" not in mount.log_text()


def test_header_values_that_http_cannot_carry_fail_the_mount_with_file_and_line(
    tmp_path: Path,
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for value, label in (("caf\u00e9", "latin-1"), ("\u65e5\u672c", "utf-8")):
        urls = tmp_path / f"{label}.txt"
        urls.write_text(f"http://127.0.0.1:9/a.bin\n    X-Name: {value}\n")
        result = run_remotefs("mount", urls, mountpoint, "--cache-dir", tmp_path / "cache")
        assert result.returncode == 2
        assert result.stderr == (
            f"remotefs: {urls}:2: header 'X-Name': the value has non-ASCII characters;"
            " HTTP header values must be ASCII (percent-encode or base64 the value)\n"
        )
        assert value not in result.stderr
    assert not (tmp_path / "cache").exists()  # nothing half-done


def test_two_thousand_urls_under_a_limit_of_256_descriptors(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    names = [f"f{index:04d}.bin" for index in range(2000)]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(100_000 + index * 37, seed=index)
    lines = [origin.url(name) for name in names]
    mount = remotefs.mount(lines, prefix=with_fd_limit(256))
    assert len(os.listdir(mount.path)) == 2000
    limits = Path(f"/proc/{mount.pid}/limits").read_text()
    assert any(
        line.startswith("Max open files") and " 256 " in line for line in limits.splitlines()
    )

    def check(batch: list[int]) -> None:
        handles = [open(mount.path / names[i], "rb", buffering=0) for i in batch]  # noqa: SIM115
        try:  # several files open at once, read in turns
            for i, handle in zip(batch, handles, strict=True):
                size = origin.files[names[i]].size
                assert handle.read() == expected(i, 0, size), names[i]
        finally:
            for handle in handles:
                handle.close()

    batches = [list(range(start, start + 40)) for start in range(0, 2000, 40)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(check, batches))
    fds = len(os.listdir(f"/proc/{mount.pid}/fd"))
    assert fds < 256
    mount.unmount()
    # Again from the cache, under the same limit: every file read from disk, none damaged.
    origin.reset_counters()
    mount = remotefs.mount(lines, prefix=with_fd_limit(256))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(check, batches))
    assert origin.body_bytes() == 0
    log = mount.log_text()
    for word in ("damaged", "resetting", "reset", "Too many open files", "Traceback"):
        assert word not in log, word


def test_files_are_found_by_their_path_when_a_url_is_listed_twice(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    origin.files["a.bin"] = VirtualFile(3 * MiB, seed=8)
    url = origin.url("a.bin")
    mount = remotefs.mount([f"{url} one/a.bin", f"{url} two/a.bin"])
    rows = status(mount.path)["files"]
    assert [row["path"] for row in rows] == ["one/a.bin", "two/a.bin"]
    result = run_remotefs("status", "--json", mount.path / "two/a.bin")
    assert result.returncode == 0, result.stderr
    assert [row["path"] for row in json.loads(result.stdout)["files"]] == ["two/a.bin"]
    prefetched = run_remotefs("prefetch", mount.path / "two/a.bin", timeout=120)
    assert prefetched.returncode == 0, prefetched.stderr
    assert (mount.path / "one/a.bin").read_bytes() == expected(8, 0, 3 * MiB)
    evicted = run_remotefs("evict", mount.path / "two/a.bin")
    assert evicted.returncode == 0, evicted.stderr
    assert f"evicted {mount.path / 'two/a.bin'}" in evicted.stdout
    assert all(row["cached_bytes"] == 0 for row in status(mount.path)["files"])


def test_every_url_is_listed_when_probes_queue_longer_than_their_timeout(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    """Each probe's timeout counts from its own request, not from the start of the mount."""
    origin = virtual_origin
    origin.delay = 0.05
    names = [f"q{index:03d}.bin" for index in range(240)]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(1000 + index, seed=index)
    started = time.monotonic()
    # 240 probes, 2 at a time, 50 ms each: 6 s of queueing against a 2 s probe timeout.
    mount = remotefs.mount(
        [origin.url(name) for name in names], "--probe-connections", "2", "--probe-timeout", "2"
    )
    assert time.monotonic() - started >= 5
    assert sorted(os.listdir(mount.path)) == names


def test_a_remount_lists_from_the_catalog_at_once_and_confirms_in_the_background(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    names = [f"c{index:03d}.bin" for index in range(300)]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(5000 + index, seed=index)
    lines = [origin.url(name) for name in names]
    mount = remotefs.mount(lines)
    mount.unmount()
    assert (mount.cache_dir / "catalog").exists()
    # Nothing was read, so nothing but the catalog tells the sizes; the origin now answers
    # every request after 3 s: the remount must not wait for that.
    origin.reset_counters()
    origin.delay = 3.0
    started = time.monotonic()
    mount = remotefs.mount(lines, "--revalidate-wait", "0.5")
    assert time.monotonic() - started < 3
    assert sorted(os.listdir(mount.path)) == names
    assert (mount.path / names[7]).stat().st_size == 5007
    origin.delay = 0.0
    wait_for(lambda: origin.requests() >= len(names), 30, "the background confirmations")
    # Confirmed unchanged: nothing replaced, and the bytes are right.
    assert "remote file changed" not in mount.log_text()
    assert (mount.path / names[7]).read_bytes() == expected(7, 0, 5007)


def test_mount_shows_probe_progress_on_a_terminal(
    virtual_origin: VirtualOrigin, remotefs: MountFactory, tmp_path: Path
) -> None:
    origin = virtual_origin
    origin.delay = 0.01
    names = [f"p{index:04d}.bin" for index in range(600)]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(100 + index, seed=index)
    urls = remotefs.write_urls([origin.url(name) for name in names], "progress.txt")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [
                *REMOTEFS,
                "mount",
                str(urls),
                str(mnt),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--no-fill",
                "--probe-connections",
                "2",
            ],
            stderr=slave,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        output = b""
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:  # the child closed its end
                    break
            elif process.poll() is not None:
                break
        assert process.wait(60) == 0
        pid = int(os.getxattr(mnt, "user.remotefs.pid"))
        remotefs.mounts.append(Mount(mnt, tmp_path / "cache", urls, pid))
    finally:
        os.close(master)
    text = output.decode(errors="replace")
    assert "remotefs: probed " in text and " of 600 URLs" in text, text
    assert text.endswith("\r\x1b[K"), repr(text[-80:])  # the line is cleared at the end
    assert len(os.listdir(mnt)) == 600


def test_a_dead_origin_with_thousands_of_urls_costs_a_few_probe_timeouts(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: every connection is refused
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    virtual_origin.files["alive.bin"] = VirtualFile(5000, seed=3)
    lines = [f"http://127.0.0.1:{dead}/d{index:04d}.bin" for index in range(3000)]
    started = time.monotonic()
    mount = remotefs.mount([virtual_origin.url("alive.bin"), *lines], "--probe-timeout", "1")
    assert time.monotonic() - started < 25
    assert os.listdir(mount.path) == ["alive.bin"]
    assert (mount.path / "alive.bin").read_bytes() == expected(3, 0, 5000)
    log = mount.log_text()
    assert f"http://127.0.0.1:{dead} does not answer probes" in log
    assert log.count("not shown until its URL answers") == 10  # then only counted
    assert f"more files of http://127.0.0.1:{dead}: see above" in log


def test_reload_of_a_big_list_with_more_urls_lists_every_one_it_reports(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    names = [f"r{index:05d}.bin" for index in range(3100)]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(10 + index, seed=index)
    mount = remotefs.mount([origin.url(name) for name in names[:3000]])
    mount.urls_file.write_text("".join(origin.url(name) + "\n" for name in names))
    result = run_remotefs("reload", mount.path)
    assert result.returncode == 0, result.stderr
    assert "100 added, 0 removed, 0 changed (3100 files;" in result.stdout
    assert sorted(os.listdir(mount.path)) == names  # what it reported is what is there
    assert (mount.path / names[-1]).read_bytes() == expected(3099, 0, 3109)


def test_an_origin_that_ignores_range_is_named_in_the_log_and_in_status(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    """``python3 -m http.server``, the first origin anyone tries, ignores Range: a 4 KiB read
    then costs the whole file. The user hears why, once per file, and sees it in status."""
    root = tmp_path / "served"
    root.mkdir()
    data = os.urandom(3 * MiB)
    (root / "plain.bin").write_bytes(data)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.05)
        mount = remotefs.mount([f"http://127.0.0.1:{port}/plain.bin"])
        assert read_at(mount.path / "plain.bin", MiB, 4096) == data[MiB : MiB + 4096]
        log = mount.log_text()
        message = "plain.bin: the origin ignores Range requests: the first read downloads the whole"
        assert log.count(message) == 1, log
        row = status(mount.path)["files"][0]
        assert row["note"] == "the origin ignores Range: the whole file is downloaded once"
        assert (
            "note: the origin ignores Range" in run_remotefs("status", "--once", mount.path).stdout
        )
        assert (mount.path / "plain.bin").read_bytes() == data
    finally:
        server.terminate()
        server.wait(10)
