"""Fresh for months: revalidation with the origin, through real mounts, and the fill policy.

The origin is `VirtualOrigin`: it answers conditional requests (304 to a matching
If-None-Match or If-Modified-Since), sends the Cache-Control or Expires a test asks for, and
counts conditional requests, 304s and body bytes per file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .mounting import MountFactory, wait_for
from .mounting import status_json as status
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024


def row(mountpoint: Path, path: str) -> dict[str, Any]:
    return next(f for f in status(mountpoint)["files"] if f["path"] == path)


def read_whole(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as handle:
        return handle.read()


def test_a_replaced_file_is_seen_within_its_lifetime_and_never_mixed(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    origin.files["f.bin"] = VirtualFile(2 * MiB, seed=1)
    mount = remotefs.mount([origin.url("f.bin")], "--revalidate", "1")
    path = mount.path / "f.bin"
    assert read_whole(path) == expected(1, 0, 2 * MiB)
    wait_for(lambda: row(mount.path, "f.bin")["state"] == "complete", what="completion")
    with open(path, "rb", buffering=0) as old:
        assert old.read(MiB) == expected(1, 0, MiB)
        origin.files["f.bin"] = VirtualFile(3 * MiB, seed=2, etag='"v2"')
        changed = time.monotonic()
        time.sleep(2)
        assert read_whole(path) == expected(2, 0, 3 * MiB)  # an open 2 s later: the new one
        wait_for(lambda: path.stat().st_size == 3 * MiB, 3, "the new size")
        assert time.monotonic() - changed < 5
        # The handle opened before the change: old bytes or EIO, never new ones.
        try:
            rest = old.read()
        except OSError:
            rest = None
        assert rest in (None, expected(1, MiB, MiB))
    assert "now serving the new version" in mount.log_text()


def test_max_age_is_honoured_then_one_conditional_request_costs_no_body(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    origin.files["m.bin"] = VirtualFile(300_000, seed=3, cache_control="max-age=5")
    mounted = time.monotonic()
    mount = remotefs.mount([origin.url("m.bin")])
    path = mount.path / "m.bin"
    assert read_whole(path) == expected(3, 0, 300_000)
    wait_for(lambda: row(mount.path, "m.bin")["state"] == "complete", what="completion")
    assert row(mount.path, "m.bin")["lifetime"] == 5
    origin.reset_counters()
    while time.monotonic() - mounted < 4:  # opens within the lifetime ask nobody
        assert read_whole(path) == expected(3, 0, 300_000)
        time.sleep(0.3)
    assert origin.requests("m.bin") == 0
    time.sleep(max(0.0, 6 - (time.monotonic() - mounted)))
    assert read_whole(path) == expected(3, 0, 300_000)
    assert read_whole(path) == expected(3, 0, 300_000)  # fresh again: no second request
    assert origin.requests("m.bin") == 1
    assert origin.conditional("m.bin") == origin.not_modified("m.bin") == 1
    assert origin.body_bytes("m.bin") == 0 and origin.probes("m.bin") == 0


def test_no_cache_asks_on_every_open_and_no_store_keeps_nothing(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    origin.files["nc.bin"] = VirtualFile(200_000, seed=4, cache_control="no-cache")
    origin.files["ns.bin"] = VirtualFile(200_000, seed=5, cache_control="no-store, max-age=60")
    mount = remotefs.mount([origin.url("nc.bin"), origin.url("ns.bin")])
    nc = mount.path / "nc.bin"
    assert read_whole(nc) == expected(4, 0, 200_000)
    wait_for(lambda: row(mount.path, "nc.bin")["state"] == "complete", what="completion")
    origin.reset_counters()
    for _ in range(3):
        assert read_whole(nc) == expected(4, 0, 200_000)
    assert origin.conditional("nc.bin") == origin.requests("nc.bin") == 3
    assert origin.not_modified("nc.bin") == 3 and origin.body_bytes("nc.bin") == 0

    ns = mount.path / "ns.bin"
    assert read_whole(ns) == expected(5, 0, 200_000)
    assert read_whole(ns) == expected(5, 0, 200_000)
    entry = row(mount.path, "ns.bin")
    assert entry["state"] == "uncached" and "no-store" in entry["note"]
    mount.unmount()
    url = origin.url("ns.bin")
    entry_dir = mount.cache_dir / "files" / hashlib.sha256(url.encode()).hexdigest()[:40]
    assert not entry_dir.exists()
    assert b"ns.bin" not in (mount.cache_dir / "catalog").read_bytes()


def test_an_unreachable_origin_serves_the_cached_version_and_is_asked_again_when_back(
    remotefs: MountFactory,
) -> None:
    file = VirtualFile(500_000, seed=6)
    with VirtualOrigin() as origin:
        origin.files["o.bin"] = file
        port = origin.port
        mount = remotefs.mount(
            [origin.url("o.bin")],
            "--revalidate",
            "1",
            "--revalidate-wait",
            "1",
            "--probe-timeout",
            "2",
        )
        path = mount.path / "o.bin"
        assert read_whole(path) == expected(6, 0, 500_000)
        wait_for(lambda: row(mount.path, "o.bin")["state"] == "complete", what="completion")
    time.sleep(1.5)  # stale now, and the origin is gone
    for _ in range(3):
        began = time.monotonic()
        assert read_whole(path) == expected(6, 0, 500_000)
        assert time.monotonic() - began < 1 + 1
    wait_for(lambda: "cannot revalidate it" in mount.log_text(), 10, "the outage log line")
    time.sleep(3)
    assert read_whole(path) == expected(6, 0, 500_000)
    assert mount.log_text().count("cannot revalidate it") == 1  # once for the origin
    with VirtualOrigin(port=port) as back:
        back.files["o.bin"] = file
        # The next open after the retry delay (5 s from the failure) asks again.
        wait_for(
            lambda: read_whole(path) == expected(6, 0, 500_000) and back.conditional() >= 1,
            15,
            "a revalidation once the origin is back",
        )
        assert back.not_modified("o.bin") == 1
        assert row(mount.path, "o.bin")["fresh"] is True


def test_ls_of_ten_thousand_stale_files_revalidates_each_once_in_the_background(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    origin = virtual_origin
    names = [f"s{index:05d}.bin" for index in range(10_000)]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(1000 + index, seed=index)
    mount = remotefs.mount([origin.url(name) for name in names], "--revalidate", "3")
    time.sleep(3.5)  # every file is stale now
    origin.reset_counters()
    origin.delay = 0.002
    began = time.monotonic()
    listing = subprocess.run(["ls", "-lR", str(mount.path)], capture_output=True, check=True)
    took = time.monotonic() - began
    assert listing.stdout.count(b".bin") == 10_000
    asked = origin.conditional()
    assert asked < 10_000, "ls waited for the revalidations"
    wait_for(lambda: origin.conditional() >= 10_000, 60, "every file revalidated")
    time.sleep(1)
    assert origin.conditional() == origin.not_modified() == 10_000
    assert all(origin.conditional(name) == 1 for name in names)
    assert origin.stats.max_in_flight <= 16  # --probe-connections per origin
    assert took < 10


def test_fill_completes_only_files_a_program_read_unless_told_all(
    virtual_origin: VirtualOrigin, remotefs: MountFactory, tmp_path: Path
) -> None:
    origin = virtual_origin
    names = ["a.bin", "b.bin", "c.bin", "d.bin"]
    for index, name in enumerate(names):
        origin.files[name] = VirtualFile(6 * MiB + index, seed=index)
    lines = [origin.url(name) for name in names]
    mount = remotefs.mount(lines, "--fill-idle", "0.5", "--prefetch-tail", "0", fill=True)
    with open(mount.path / "b.bin", "rb", buffering=0) as handle:
        assert handle.read(MiB) == expected(1, 0, MiB)
    wait_for(lambda: row(mount.path, "b.bin")["state"] == "complete", 30, "b.bin to complete")
    time.sleep(2)  # several idle periods more
    for name in ("a.bin", "c.bin", "d.bin"):
        assert row(mount.path, name)["cached_bytes"] == 0, name
    mount.unmount()

    mount = remotefs.mount(
        lines,
        "--fill-idle",
        "0.5",
        "--fill",
        "all",
        cache_dir=tmp_path / "cache-all",
        mountpoint=tmp_path / "mnt-all",
        fill=True,
    )
    wait_for(
        lambda: all(f["state"] == "complete" for f in status(mount.path)["files"]),
        60,
        "every file to complete",
    )
    for index, name in enumerate(names):
        assert read_whole(mount.path / name) == expected(index, 0, 6 * MiB + index)


def test_the_validated_xattr_says_when_and_for_how_long(
    virtual_origin: VirtualOrigin, remotefs: MountFactory
) -> None:
    virtual_origin.files["x.bin"] = VirtualFile(10, cache_control="max-age=3600")
    mount = remotefs.mount([virtual_origin.url("x.bin")])
    text = os.getxattr(mount.path / "x.bin", "user.remotefs.validated").decode()
    when, _, rest = text.partition("; ")
    assert time.strftime("%Y-%m-%dT", time.gmtime()) in when
    assert rest == "fresh for 3600s after it"
    assert row(mount.path, "x.bin")["lifetime"] == 3600
