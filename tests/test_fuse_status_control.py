"""Status and control of a running mount: xattrs, the control socket, status/prefetch/evict.

Every figure is checked against what the origin itself counted for the path, through a real
mount (``--no-fill``, the `remotefs` fixture's default, so no background traffic).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remotefs.control_client import Control

from .conftest import read_direct, write_random
from .mounting import REMOTEFS, Mount, MountFactory, force_unmount, run_remotefs
from .origin import Exchange, Origin, make_etag

MiB = 1024 * 1024
KiB = 1024
SECRET = "TOPSECRET4242"
FILE_XATTRS = {
    "user.remotefs.url",
    "user.remotefs.cached_bytes",
    "user.remotefs.complete",
    "user.remotefs.etag",
    "user.remotefs.content_type",
    "user.remotefs.validated",
    "user.remotefs.verified",
}


class SlowOrigin(Origin):
    """An origin that sends bodies in 256 KiB pieces with a pause after each: downloads last."""

    pause = 0.0

    def _send_body(self, ex: Exchange, fd: int, offset: int, count: int) -> None:
        while count > 0:
            piece = min(256 * KiB, count)
            ex.send_file(fd, offset, piece)
            offset, count = offset + piece, count - piece
            if count and self.pause and self._stopping.wait(self.pause):
                ex.abort()
                return


@pytest.fixture
def slow_origin(origin_root: Path) -> Iterator[SlowOrigin]:
    with SlowOrigin(origin_root) as server:
        yield server


def status(mount: Mount, *paths: str) -> dict[str, Any]:
    """The daemon's status answer, straight from its control socket."""
    with Control(str(mount.path)) as control:
        request: dict[str, Any] = {"cmd": "status"}
        if paths:
            request["paths"] = list(paths)
        return control.request(request)


def file_status(mount: Mount, path: str) -> dict[str, Any]:
    (entry,) = status(mount, path)["files"]
    assert entry["path"] == path
    return entry


def settle(origin: Origin, mount: Mount, timeout: float = 20) -> dict[str, Any]:
    """Wait until the origin is idle and the daemon downloads nothing; return the status."""
    deadline = time.monotonic() + timeout
    while True:
        assert origin.wait_idle(timeout)
        answer = status(mount)
        if all(entry["state"] != "filling" for entry in answer["files"]):
            return answer
        assert time.monotonic() < deadline, answer
        time.sleep(0.05)


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def no_overlaps(ranges: list[tuple[int, int]]) -> bool:
    ordered = sorted(ranges)
    return all(b[0] >= a[1] for a, b in itertools.pairwise(ordered))


def data_file(mount: Mount) -> Path:
    (found,) = mount.cache_dir.glob("files/*/data")
    return found


def test_status_and_xattrs_equal_what_the_origin_served(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 6 * MiB + 123
    data = write_random(origin_root / "data.bin", size)
    url = origin.url("data.bin") + f"?X-Signature={SECRET}"
    mount = remotefs.mount([url], "--prefetch-tail", "0", "--prefetch-head", "0")
    origin.wait_idle()
    origin.reset_counters()
    target = mount.path / "data.bin"

    assert xattr(target, "user.remotefs.cached_bytes") == "0"
    for offset in (0, 3 * MiB + 8192, size // 4096 * 4096):
        assert read_direct(target, offset) == data[offset : offset + 4096]
    answer = settle(origin, mount)

    served = origin.bytes_served("/data.bin")
    ranges = origin.served_ranges("/data.bin")
    assert served > 0 and no_overlaps(ranges)
    (entry,) = answer["files"]
    assert entry["path"] == "data.bin"
    assert entry["size"] == size
    # Every byte received was stored once: the session's origin bytes, the cached bytes and the
    # origin's own count agree exactly.
    assert entry["origin_bytes"] == served
    assert entry["cached_bytes"] == served
    assert entry["percent"] == round(100 * served / size, 2)
    assert entry["state"] == "partial" and entry["error"] is None
    assert entry["url"] == f"http://127.0.0.1:{origin.port}/data.bin?<redacted>"
    assert answer["totals"]["files"] == 1
    assert answer["totals"]["origin_bytes"] == served
    assert answer["totals"]["cached_bytes"] == served
    assert answer["pid"] == mount.pid and answer["mountpoint"] == str(mount.path)

    # The xattrs are the same live view.
    assert set(os.listxattr(target)) == FILE_XATTRS
    assert xattr(target, "user.remotefs.cached_bytes") == str(served)
    assert xattr(target, "user.remotefs.complete") == "0"
    assert xattr(target, "user.remotefs.url") == entry["url"]
    assert xattr(target, "user.remotefs.etag") == make_etag(os.stat(origin_root / "data.bin"))
    assert xattr(target, "user.remotefs.content_type") == "application/octet-stream"
    assert xattr(target, "user.remotefs.validated").endswith("Z; fresh for 60s after it")
    with pytest.raises(OSError):
        os.getxattr(target, "user.remotefs.nope")

    # The root names the daemon and its control socket, which only its owner may use.
    assert set(os.listxattr(mount.path)) == {"user.remotefs.pid", "user.remotefs.control"}
    assert xattr(mount.path, "user.remotefs.pid") == str(mount.pid)
    control = Path(xattr(mount.path, "user.remotefs.control"))
    assert control == mount.cache_dir / "control.sock"
    info = os.stat(control)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600

    # The CLI: a table, and JSON that parses; redacted URLs only.
    table = run_remotefs("status", mount.path, timeout=30)
    assert table.returncode == 0, table.stderr
    assert "data.bin" in table.stdout and "?<redacted>" in table.stdout
    assert "TOTAL" in table.stdout
    as_json = run_remotefs("status", mount.path, "--json", timeout=30)
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)
    assert parsed["files"][0]["cached_bytes"] == served
    assert parsed["files"][0]["origin_bytes"] == served
    every = run_remotefs("status", "--json", timeout=60)
    mine = [m for m in json.loads(every.stdout) if m["mountpoint"] == str(mount.path)]
    assert len(mine) == 1 and mine[0]["ok"] and mine[0]["files"][0]["path"] == "data.bin"
    for output in (table.stdout, as_json.stdout, every.stdout, table.stderr, as_json.stderr):
        assert SECRET not in output

    # Reading everything makes the file complete; the figures follow.
    assert target.read_bytes() == data
    answer = settle(origin, mount)
    assert answer["files"][0]["state"] == "complete"
    assert answer["files"][0]["cached_bytes"] == size
    assert answer["files"][0]["origin_bytes"] == origin.bytes_served("/data.bin") == size
    assert xattr(target, "user.remotefs.complete") == "1"
    assert xattr(target, "user.remotefs.cached_bytes") == str(size)

    mount.unmount()
    assert not control.exists(), "the control socket must be removed at exit"


def test_control_protocol_answers_every_line_and_survives_bad_requests(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "a.bin", 100_000)
    mount = remotefs.mount([origin.url("a.bin"), f"{origin.url('a.bin')}?v=2 sub/b.bin"])
    path = xattr(mount.path, "user.remotefs.control")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        reader = client.makefile("rb")
        requests = [
            b"not json\n",
            b"[1, 2]\n",
            b'{"cmd": "reboot"}\n',
            b'{"cmd": "status", "paths": "a.bin"}\n',
            b'{"cmd": "status", "paths": ["missing.bin"]}\n',
            b'{"cmd": "evict"}\n',
            b'{"cmd": "status", "paths": ["sub"]}\n',
            b'{"cmd": "status"}\n',
        ]
        client.sendall(b"".join(requests))  # pipelined: answered in order
        answers = [json.loads(reader.readline()) for _ in requests]
    errors = [answer.get("error", "") for answer in answers[:6]]
    assert not any(answer["ok"] for answer in answers[:6])
    assert "JSON object" in errors[0] and "JSON object" in errors[1]
    assert "unknown command 'reboot'" in errors[2]
    assert "list of strings" in errors[3]
    assert "missing.bin: no such file in the mount" in errors[4]
    assert "needs at least one path" in errors[5]
    assert [f["path"] for f in answers[6]["files"]] == ["sub/b.bin"]
    assert [f["path"] for f in answers[7]["files"]] == ["a.bin", "sub/b.bin"]
    assert status(mount)["totals"]["files"] == 2, "the daemon must still answer"


def test_prefetch_completes_files_despite_foreground_reads_and_then_reads_are_free(
    slow_origin: SlowOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 16 * MiB + 77
    data = write_random(origin_root / "big.bin", size)
    other = write_random(origin_root / "other.bin", 2 * MiB, seed=3)
    mount = remotefs.mount([slow_origin.url("big.bin"), slow_origin.url("other.bin")])
    target = mount.path / "big.bin"
    slow_origin.wait_idle()
    slow_origin.reset_counters()
    slow_origin.pause = 0.05  # ~1 s of prefetch: foreground reads arrive meanwhile

    prefetch = subprocess.Popen(
        [*REMOTEFS, "prefetch", str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rng = random.Random(4)
        reads = 0
        deadline = time.monotonic() + 60
        while prefetch.poll() is None and time.monotonic() < deadline:
            offset = rng.randrange(size // 4096) * 4096
            assert read_direct(target, offset) == data[offset : offset + 4096]
            assert (
                read_direct(mount.path / "other.bin", offset % (2 * MiB))
                == (other[offset % (2 * MiB) :][:4096])
            )
            reads += 1
        stdout, stderr = prefetch.communicate(timeout=60)
    finally:
        if prefetch.poll() is None:
            prefetch.kill()
            prefetch.wait()
    assert prefetch.returncode == 0, stderr
    assert f"{target}: complete" in stdout
    assert reads > 0
    assert xattr(target, "user.remotefs.complete") == "1"
    entry = file_status(mount, "big.bin")
    assert entry["state"] == "complete"
    assert entry["prefetch"] == {"state": "done", "error": None, "paused": None}
    slow_origin.wait_idle()
    # Foreground reads and the prefetch share the single-flight path: nothing came twice.
    assert no_overlaps(slow_origin.served_ranges("/big.bin"))
    assert slow_origin.bytes_served("/big.bin") == size == entry["origin_bytes"]

    slow_origin.pause = 0.0
    slow_origin.reset_counters()
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(data).hexdigest()
    slow_origin.wait_idle()
    assert slow_origin.bytes_served("/big.bin") == 0

    # A complete file: prefetch has nothing to do and says so at once.
    again = run_remotefs("prefetch", target, timeout=30)
    assert again.returncode == 0, again.stderr


def test_prefetch_failure_is_one_clear_line_and_shows_in_status(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "ok.bin", 3 * MiB)
    write_random(origin_root / "gone.bin", 3 * MiB)
    mount = remotefs.mount(
        [origin.url("ok.bin"), origin.url("gone.bin") + f"?token={SECRET}"],
        "--prefetch-tail", "0", "--prefetch-head", "0",
    )  # fmt: skip
    (origin_root / "gone.bin").unlink()  # the origin now answers 404

    result = run_remotefs("prefetch", mount.path, timeout=120)  # a directory: all its files
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"remotefs: prefetch of {mount.path / 'gone.bin'} failed: ")
    assert "404" in lines[0]
    assert SECRET not in result.stderr + result.stdout
    assert xattr(mount.path / "ok.bin", "user.remotefs.complete") == "1"
    gone = file_status(mount, "gone.bin")
    assert gone["state"] == "error" and "404" in gone["error"]
    assert gone["prefetch"]["state"] == "failed"
    table = run_remotefs("status", mount.path, timeout=30)
    assert "error:" in table.stdout and "404" in table.stdout
    assert SECRET not in table.stdout + run_remotefs("status", mount.path, "--json").stdout


def test_evict_drops_the_data_and_the_next_read_hits_the_origin(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 5 * MiB + 1
    data = write_random(origin_root / "f.bin", size)
    mount = remotefs.mount([origin.url("f.bin")])
    target = mount.path / "f.bin"
    assert target.read_bytes() == data
    settle(origin, mount)
    assert xattr(target, "user.remotefs.complete") == "1"
    assert data_file(mount).stat().st_blocks * 512 >= size

    origin.reset_counters()
    result = run_remotefs("evict", target, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"evicted {target}" in result.stdout
    assert xattr(target, "user.remotefs.cached_bytes") == "0"
    assert xattr(target, "user.remotefs.complete") == "0"
    assert data_file(mount).stat().st_blocks == 0, "the disk space must be freed"
    entry = file_status(mount, "f.bin")
    assert entry["state"] == "partial" and entry["cached_bytes"] == 0

    # The kernel's page cache was dropped as well: the bytes come from the origin again.
    assert target.read_bytes() == data
    settle(origin, mount)
    assert origin.bytes_served("/f.bin") == size
    assert xattr(target, "user.remotefs.complete") == "1"

    # The empty bitmap is on disk before evict returns: a kill -9 right after it cannot
    # bring back a claim on the dropped (now zero) bytes.
    assert run_remotefs("evict", target, timeout=60).returncode == 0
    mount.kill()
    force_unmount(mount.path)
    mount = remotefs.mount([origin.url("f.bin")], mountpoint=mount.path)
    assert xattr(target, "user.remotefs.cached_bytes") == "0"
    assert target.read_bytes() == data


def test_evict_is_refused_while_the_file_is_open(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 3 * MiB
    data = write_random(origin_root / "f.bin", size)
    mount = remotefs.mount([origin.url("f.bin")])
    target = mount.path / "f.bin"
    with open(target, "rb") as handle:
        assert handle.read(MiB) == data[:MiB]
        settle(origin, mount)
        cached = xattr(target, "user.remotefs.cached_bytes")
        result = run_remotefs("evict", target, timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"remotefs: {mount.path}: not evicted: f.bin is open (1 handle); close it first"
        ]
        assert xattr(target, "user.remotefs.cached_bytes") == cached
        assert handle.read() == data[MiB:]
    result = run_remotefs("evict", target, timeout=60)
    assert result.returncode == 0, result.stderr
    assert xattr(target, "user.remotefs.cached_bytes") == "0"


def test_evict_is_refused_while_the_file_downloads(
    slow_origin: SlowOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 8 * MiB
    data = write_random(origin_root / "f.bin", size)
    mount = remotefs.mount([slow_origin.url("f.bin")])
    target = mount.path / "f.bin"
    slow_origin.pause = 0.25  # two 4 MiB requests of 16 pieces: ~4 s
    with Control(str(mount.path)) as control:
        assert control.request({"cmd": "prefetch", "paths": ["f.bin"]})["files"] == ["f.bin"]
    assert file_status(mount, "f.bin")["state"] == "filling"
    result = run_remotefs("evict", target, timeout=60)
    assert result.returncode == 1
    assert "f.bin is downloading; try again when it is done" in result.stderr
    deadline = time.monotonic() + 60
    while file_status(mount, "f.bin")["state"] != "complete":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    slow_origin.pause = 0.0
    assert run_remotefs("evict", target, timeout=60).returncode == 0
    assert target.read_bytes() == data


def test_evict_stops_background_fill_of_the_file_for_good(
    slow_origin: SlowOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 12 * MiB
    data = write_random(origin_root / "f.bin", size)
    slow_origin.pause = 0.1  # a 4 MiB fill request lasts ~1.6 s
    # A fresh mount is idle: the fill starts at once.
    mount = remotefs.mount(
        [slow_origin.url("f.bin")], "--fill-idle", "0.3", "--fill", "all", fill=True
    )
    target = mount.path / "f.bin"
    deadline = time.monotonic() + 20
    while file_status(mount, "f.bin")["state"] != "filling":
        assert time.monotonic() < deadline, "background fill never started"
        time.sleep(0.05)

    started = time.monotonic()
    result = run_remotefs("evict", target, timeout=60)
    assert result.returncode == 0, result.stderr  # the fill yielded; evict was not refused
    assert time.monotonic() - started < 10
    slow_origin.wait_idle()
    slow_origin.reset_counters()
    time.sleep(1.5)  # five times --fill-idle: the filler would have started again
    slow_origin.wait_idle()
    assert slow_origin.bytes_served("/f.bin") == 0
    entry = file_status(mount, "f.bin")
    assert entry["cached_bytes"] == 0 and entry["state"] == "partial"

    # An explicit prefetch still completes it.
    slow_origin.pause = 0.0
    result = run_remotefs("prefetch", target, timeout=120)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == data


def test_status_on_a_terminal_shows_live_progress_bars(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "t.bin", 2 * MiB)
    mount = remotefs.mount([origin.url("t.bin")])
    assert len((mount.path / "t.bin").read_bytes()) == 2 * MiB
    master, slave = os.openpty()
    process = subprocess.Popen(
        [*REMOTEFS, "status", str(mount.path)],
        stdout=slave,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while output.count(b"refreshing every second") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                output += os.read(master, 65536)
        process.send_signal(signal.SIGINT)
        # Keep draining the terminal: a child blocked writing to a full pty never exits.
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    output += os.read(master, 65536)
        assert process.wait(timeout=1) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    text = output.decode(errors="replace")
    assert text.count("refreshing every second") >= 2, text
    assert "[####################] 100.0%" in text and "t.bin" in text
    assert "\x1b[" in text  # redrawn in place


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    outside = tmp_path / "plain.txt"
    outside.write_text("x")
    cases: list[tuple[list[str | os.PathLike[str]], str]] = [
        (["status", tmp_path], f"remotefs: {tmp_path} is not a remotefs mount"),
        (["status", tmp_path / "nope"], f"remotefs: {tmp_path / 'nope'}: no such file"),
        (["prefetch", outside], f"remotefs: {outside}: not inside a remotefs mount"),
        (["evict", outside], f"remotefs: {outside}: not inside a remotefs mount"),
    ]
    for args, message in cases:
        result = run_remotefs(*args, timeout=30)
        assert result.returncode == 1, result
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith(message), result.stderr


def test_a_stale_socket_is_replaced(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    write_random(origin_root / "s.bin", 100_000)
    mount = remotefs.mount([origin.url("s.bin")])
    mount.kill()  # leaves control.sock behind, like any crash
    force_unmount(mount.path)
    stale = mount.cache_dir / "control.sock"
    assert stale.exists()
    mount = remotefs.mount([origin.url("s.bin")])
    assert status(mount)["files"][0]["path"] == "s.bin"
    assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600


def test_a_long_cache_dir_path_still_gets_a_socket(
    origin: Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    write_random(origin_root / "l.bin", 100_000)
    cache = tmp_path / ("c" * 60) / ("d" * 60)  # longer than a unix socket address allows
    mount = remotefs.mount([origin.url("l.bin")], cache_dir=cache)
    assert xattr(mount.path, "user.remotefs.control") == str(cache / "control.sock")
    assert status(mount)["files"][0]["path"] == "l.bin"
    result = run_remotefs("status", mount.path, "--json", timeout=30)
    assert json.loads(result.stdout)["files"][0]["path"] == "l.bin"


def test_status_counts_a_concurrent_reader_in_the_rate(
    slow_origin: SlowOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    size = 8 * MiB
    write_random(origin_root / "r.bin", size)
    mount = remotefs.mount([slow_origin.url("r.bin")])
    slow_origin.pause = 0.1
    reader = threading.Thread(target=lambda: (mount.path / "r.bin").read_bytes(), daemon=True)
    reader.start()
    rates = []
    deadline = time.monotonic() + 30
    while reader.is_alive() and time.monotonic() < deadline:
        entry = file_status(mount, "r.bin")
        rates.append(entry["rate"])
        time.sleep(0.1)
    reader.join(timeout=30)
    assert max(rates) > 0, "the rate never showed a download in progress"
