"""Never wrong bytes: a real mount of an origin that fails in every way a real one does.

Each test injects one kind of fault (see `tests/faults.py`) into the responses of an origin on
127.0.0.1 and reads through a real FUSE mount. Whatever the fault, a read returns exactly the
origin's bytes or fails with EIO, within a bounded time, and the fetcher keeps every whole
block it received.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import write_random
from .faults import BODY_FAULTS, STATUS_OF, Fault, FaultyOrigin
from .mounting import Mount, MountFactory, wait_for
from .origin import RequestRecord

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB

DEADLINE = 3.0
STALL_TIMEOUT = 1.0


def options(**overrides: str) -> list[str]:
    """Mount options of these tests; ``read_deadline="20"`` overrides ``--read-deadline``.

    A short read deadline and stall timeout keep the tests fast; no idle background fill, so
    the origin sees only the requests that reads cause.
    """
    values = {
        "read_deadline": str(DEADLINE),
        "stall_timeout": str(STALL_TIMEOUT),
        "probe_timeout": "3",
        "min_request": "256K",
    }
    values.update(overrides)
    args = ["--no-fill"]
    for name, value in values.items():
        args += ["--" + name.replace("_", "-"), value]
    return args


#: How long after the read deadline an EIO may take: the kernel reads a page again when its
#: readahead failed, and remotefs gives that second read one stall timeout; plus some slack.
SLACK = STALL_TIMEOUT + 1.5


@pytest.fixture
def faulty(origin_root: Path) -> Iterator[FaultyOrigin]:
    """A fault-injecting origin serving *origin_root*; no faults until the test plans them."""
    with FaultyOrigin(origin_root) as server:
        yield server


def read_range(path: Path, offset: int, size: int) -> bytes:
    """One pread through the mount, after dropping the kernel's cached pages of that range."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def timed(read: Callable[[], bytes]) -> tuple[bytes, float]:
    """Call *read*; return its result and how long it took."""
    started = time.monotonic()
    result = read()
    return result, time.monotonic() - started


def expect_eio(path: Path, offset: int, size: int) -> float:
    """Read and expect EIO; return how long it took."""
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_range(path, offset, size)
    assert info.value.errno == errno.EIO, info.value
    return time.monotonic() - started


def range_of(header: str | None) -> tuple[int, int]:
    """``[start, end)`` asked for by a Range header."""
    assert header is not None
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", header)
    assert match, header
    return int(match.group(1)), int(match.group(2)) + 1


def covered(ranges: list[tuple[int, int]]) -> int:
    """Bytes covered by the union of ``[start, end)`` ranges."""
    total, reach = 0, 0
    for start, end in sorted(ranges):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def settle(server: FaultyOrigin) -> None:
    """Wait until the origin has recorded every request so far."""
    assert server.wait_idle(10)


def wait_for_log(mount: Mount, pattern: str, timeout: float = 5.0) -> str:
    """Poll the daemon log until *pattern* (a regex) appears, for at most *timeout*; the log."""
    deadline = time.monotonic() + timeout
    while True:
        text = mount.log_text()
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


#: What the daemon log says about each transient fault once the deadline passed.
CAUSES = {
    Fault.RESET: r"reset by peer|ReadError|RemoteProtocolError",
    Fault.TRUNCATE: r"RemoteProtocolError|incomplete|body ended",
    Fault.STALL: r"timed out \(ReadTimeout\)",
    Fault.HTTP_500: r"HTTP 500",
    Fault.HTTP_502: r"HTTP 502",
    Fault.HTTP_503: r"HTTP 503",
    Fault.HTTP_504: r"HTTP 504",
    Fault.HTTP_429: r"HTTP 429",
}


@pytest.mark.parametrize("fault", list(CAUSES), ids=lambda fault: fault.value)
def test_transient_fault_is_retried_and_persistent_one_fails_in_time(
    fault: Fault, faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 2 * MiB + 4321)
    other = write_random(origin_root / "g.bin", MiB + 17)
    mount = remotefs.mount([faulty.url("f.bin"), faulty.url("g.bin")], *options())
    settle(faulty)
    faulty.reset_counters()

    # Two faults in a row, then the origin behaves: the reader gets the origin's bytes in time.
    # Only requests of 512 KiB or more are hit, so every partial body holds whole blocks.
    faulty.plan.min_bytes = 512 * KiB
    faulty.plan.add(fault, fault)
    got, elapsed = timed((mount.path / "f.bin").read_bytes)
    assert got == data
    assert elapsed < DEADLINE
    assert faulty.plan.count(fault) == 2
    settle(faulty)

    # Whole blocks that arrived before a fault are kept: a retry asks from the first block not
    # wholly received to the end of the original range, so only that block is sent twice.
    records = [r for r in faulty.requests if r.path == "/f.bin"]
    asked = [range_of(r.range_header) for r in records]
    resent = 0
    for injection in faulty.plan.injections():
        if injection.fault not in BODY_FAULTS:
            continue
        assert injection.sent == FaultyOrigin.partial_bytes
        start, end = range_of(injection.range_header)
        kept = injection.sent // BLOCK * BLOCK
        assert (start + kept, end) in asked, (injection, asked)
        resent += injection.sent - kept
    served = sorted(faulty.served_ranges("/f.bin"))
    assert covered(served) == len(data)
    assert faulty.bytes_served("/f.bin") == len(data) + resent, served

    # Faults that outlast the read deadline: EIO in time, a log line naming file and cause.
    # (Partial bodies now stop short of a whole block, so no retry makes progress.)
    faulty.partial_bytes = 1000
    faulty.plan.min_bytes = 0
    faulty.plan.always(fault)
    took = expect_eio(mount.path / "g.bin", 3 * BLOCK, 1000)
    assert took < DEADLINE + SLACK
    log = wait_for_log(mount, r"g\.bin.*(" + CAUSES[fault] + ")")
    failures = [line for line in log.splitlines() if "g.bin" in line and "ERROR" in line]
    assert failures, log
    assert any(re.search(CAUSES[fault], line) for line in failures), failures

    # The origin recovers: the next read succeeds.
    faulty.plan.clear()
    assert read_range(mount.path / "g.bin", 3 * BLOCK, 1000) == other[3 * BLOCK : 3 * BLOCK + 1000]
    assert (mount.path / "g.bin").read_bytes() == other


def test_the_read_deadline_holds_across_the_kernels_retry_of_the_same_read(
    faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    """A hostile origin trickles a byte every 0.25 s: no stall timeout ever fires, only the
    read deadline ends the read. The kernel then reads the page again on the same handle; that
    retry must fail at once, not wait for a second deadline (it once took 34-40 s with
    --read-deadline 20). Counted in requests, not seconds: the failed read costs one request
    for its range, and a new open tries again."""
    other = write_random(origin_root / "g.bin", 2 * MiB + 17)
    mount = remotefs.mount([faulty.url("g.bin")], *options(stall_timeout="2"))
    settle(faulty)
    faulty.reset_counters()
    faulty.partial_bytes = 1000
    faulty.plan.always(Fault.TRICKLE)
    offset = 5 * BLOCK + 100

    def asked_for_offset() -> int:
        ranges = [range_of(r.range_header) for r in faulty.requests if r.path == "/g.bin"]
        return sum(start <= offset < end for start, end in ranges)

    # A buffered read: the kernel's readahead fails, then it reads the page again itself.
    with open(mount.path / "g.bin", "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        handle.seek(offset)
        with pytest.raises(OSError) as info:
            handle.read(1000)
        assert info.value.errno == errno.EIO
        # The program's own retry on the same handle fails at once too.
        with pytest.raises(OSError):
            os.pread(handle.fileno(), 1000, offset)
    log = wait_for_log(mount, r"g\.bin.*failed on this handle")
    # The origin records a request once its connection is gone: wait for the first one.
    wait_for(lambda: asked_for_offset() >= 1, what="the trickled request to end")
    settle(faulty)
    assert asked_for_offset() == 1, [r.range_header for r in faulty.requests]
    assert re.search(r"g\.bin.*no answer before the deadline", log), log[-3000:]

    # A new open tries again, and once the origin behaves, it reads the origin's bytes.
    faulty.plan.clear()
    assert read_range(mount.path / "g.bin", offset, 1000) == other[offset : offset + 1000]
    assert asked_for_offset() == 2


@pytest.mark.parametrize("fault", [Fault.HTTP_404, Fault.HTTP_410, Fault.HTTP_403], ids=str)
def test_refusal_of_a_data_request_fails_at_once(
    fault: Fault, faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", MiB)
    mount = remotefs.mount([faulty.url("f.bin")], *options(read_deadline="20"))
    faulty.plan.always(fault)
    took = expect_eio(mount.path / "f.bin", 5 * BLOCK, 100)
    assert took < 2, "a permanent error must not be retried until the deadline"
    # No retries: one request for the kernel's readahead, one or two for its retries of the
    # page; a retry loop would have sent many within the time taken.
    settle(faulty)
    asked = [r.range_header for r in data_gets(faulty, "/f.bin")]
    assert len(asked) == faulty.plan.count(fault) <= 4, asked
    status = STATUS_OF[fault]
    log = wait_for_log(mount, rf"f\.bin.*HTTP {status}")
    assert re.search(rf"ERROR .*f\.bin.*HTTP {status}", log), log
    faulty.plan.clear()
    assert read_range(mount.path / "f.bin", 5 * BLOCK, 100) == data[5 * BLOCK : 5 * BLOCK + 100]


# Reads *length* bytes at *offset* with one pread and compares them with the origin's file.
OFFSET_READER = r"""
import os, sys
path, offset, length, truth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(truth, "rb") as f:
    f.seek(offset)
    want = f.read(length)
fd = os.open(path, os.O_RDONLY)
got = os.pread(fd, length, offset)
sys.exit(0 if got == want else f"wrong bytes at {offset}: {len(got)} of {len(want)}")
"""


def run_offset_readers(mount_file: Path, truth: Path, count: int, timeout: float) -> None:
    """*count* processes read 100 KiB each, at offsets spread over the file, concurrently."""
    size = truth.stat().st_size
    offsets = [(size - 100 * KiB) * (count - 1 - index) // (count - 1) for index in range(count)]
    command = [sys.executable, "-c", OFFSET_READER, str(mount_file)]
    processes = [
        subprocess.Popen(
            [*command, str(offset), str(100 * KiB), str(truth)], stderr=subprocess.PIPE, text=True
        )
        for offset in offsets
    ]
    errors = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate(timeout=10)
            errors.append(f"reader timed out: {err}")
            continue
        if process.returncode != 0:
            errors.append(err)
    assert errors == []


def data_gets(server: FaultyOrigin, path: str) -> list[RequestRecord]:
    """GETs of *path* other than the mount's ``bytes=0-0`` probe."""
    return [
        r
        for r in server.requests
        if r.method == "GET" and r.path == path and r.range_header != "bytes=0-0"
    ]


@pytest.mark.parametrize("when", ["after-mount", "from-the-start"])
def test_server_ignoring_range_is_downloaded_once_sequentially(
    when: str, faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 8 * MiB + 999)
    if when == "from-the-start":
        faulty.ignore_range = True  # the probe gets a 200 too
    mount = remotefs.mount([faulty.url("f.bin")], *options(stall_timeout="5"))
    faulty.plan.always(Fault.IGNORE_RANGE)  # every data request gets 200 and the whole body
    run_offset_readers(mount.path / "f.bin", origin_root / "f.bin", 8, timeout=60)
    assert (mount.path / "f.bin").read_bytes() == data
    settle(faulty)
    gets = data_gets(faulty, "/f.bin")
    summary = [(r.range_header, r.status, r.body_bytes) for r in gets]
    # One download of the whole file, from its start...
    streams = [r for r in gets if r.range_header is None]
    assert [(r.status, r.start, r.body_bytes) for r in streams] == [(200, 0, len(data))], summary
    # ... and the Range requests sent before remotefs knew (at most one per reader and
    # readahead) were abandoned at once: together they cost less than the file.
    abandoned = [r for r in gets if r.range_header is not None]
    assert len(abandoned) <= 16, summary
    assert all(r.status == 200 for r in abandoned), summary
    assert sum(r.body_bytes for r in abandoned) < len(data), summary


def test_accept_ranges_none_is_downloaded_once_sequentially(
    faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 8 * MiB + 999)
    faulty.accept_ranges_none = True
    mount = remotefs.mount([faulty.url("f.bin")], *options(stall_timeout="5"))
    run_offset_readers(mount.path / "f.bin", origin_root / "f.bin", 8, timeout=60)
    assert (mount.path / "f.bin").read_bytes() == data
    settle(faulty)
    gets = data_gets(faulty, "/f.bin")
    assert [(r.range_header, r.status, r.body_bytes) for r in gets] == [(None, 200, len(data))]


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_body_without_length_is_listed_once_downloaded(
    framing: str, faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 3 * MiB + 5)
    write_random(origin_root / "other.bin", 1000)
    faulty.no_length = "chunked" if framing == "chunked" else "close"
    faulty.body_pause = 0.2  # thirteen chunks: the download takes over two seconds
    mount = remotefs.mount([faulty.url("f.bin"), faulty.url("other.bin")], *options())
    assert sorted(os.listdir(mount.path)) == ["other.bin"]
    deadline = time.monotonic() + 20
    while "f.bin" not in os.listdir(mount.path):
        assert time.monotonic() < deadline, "f.bin never appeared"
        time.sleep(0.05)
    assert (mount.path / "f.bin").stat().st_size == len(data)
    assert (mount.path / "f.bin").read_bytes() == data
    settle(faulty)
    downloads = [r for r in faulty.requests if r.path == "/f.bin" and r.range_header is None]
    assert [(r.status, r.body_bytes) for r in downloads] == [(200, len(data))]
    assert "f.bin" in mount.log_text()


def test_a_body_without_length_at_two_paths_is_downloaded_once(
    faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 2 * MiB + 5)
    faulty.no_length = "chunked"
    faulty.body_pause = 0.1
    url = faulty.url("f.bin")
    mount = remotefs.mount([f"{url} a.bin", f"{url} b.bin"], *options())
    deadline = time.monotonic() + 20
    while sorted(os.listdir(mount.path)) != ["a.bin", "b.bin"]:
        assert time.monotonic() < deadline, f"listed only {os.listdir(mount.path)}"
        time.sleep(0.05)
    assert (mount.path / "a.bin").read_bytes() == data
    assert (mount.path / "b.bin").read_bytes() == data
    settle(faulty)
    downloads = [r for r in faulty.requests if r.path == "/f.bin" and r.range_header is None]
    assert [(r.status, r.body_bytes) for r in downloads] == [(200, len(data))]


def test_refused_head_does_not_matter(
    faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", MiB + 3)
    faulty.head_status = 405
    connection = http.client.HTTPConnection(faulty.host, faulty.port, timeout=10)
    try:
        connection.request("HEAD", "/f.bin")
        assert connection.getresponse().status == 405  # the fault is active
    finally:
        connection.close()
    settle(faulty)
    faulty.reset_counters()
    mount = remotefs.mount([faulty.url("f.bin")], *options())
    assert (mount.path / "f.bin").stat().st_size == len(data)
    assert (mount.path / "f.bin").read_bytes() == data
    settle(faulty)
    assert faulty.requests
    assert {r.method for r in faulty.requests} == {"GET"}


def test_expired_redirect_target_is_resolved_again(
    faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory
) -> None:
    data = write_random(origin_root / "f.bin", 16 * MiB)
    faulty.redirect_signed("/dl/f.bin", "f.bin")
    mount = remotefs.mount([faulty.url("dl/f.bin") + "?id=42"], *options())
    path = mount.path / "f.bin"
    assert read_range(path, 0, MiB) == data[:MiB]
    settle(faulty)
    originals = [r for r in faulty.requests if r.path == "/dl/f.bin"]
    # The probe (the fast probe client hands a redirect to httpx, which asks again), and no
    # more: data requests go to the target.
    assert [r.status for r in originals] in ([302], [302, 302])
    assert {r.status for r in faulty.signed_requests()} == {206}

    faulty.expire_signatures()
    # Far past what readahead of the first read may have fetched (kernel and daemon alike).
    assert read_range(path, 8 * MiB, MiB) == data[8 * MiB : 9 * MiB]
    settle(faulty)
    originals = [r for r in faulty.requests if r.path == "/dl/f.bin"]
    assert len(originals) >= 2, "the original URL was not resolved again"
    assert all(r.status == 302 for r in originals)
    signed = faulty.signed_requests()
    assert any(r.status == 403 for r in signed)
    assert any(r.status == 206 and not r.path.startswith("/_signed/1/") for r in signed)
    assert "resolving again" in mount.log_text()
    assert path.read_bytes() == data


# Random reads of the mounted files, each checked against the origin's bytes; EIO is allowed
# (counted), a wrong byte ends the reader with an error. Prints "reads eio short".
SOAK_READER = r"""
import errno, os, random, sys, time
seed, stop_at, max_reads, *pairs = sys.argv[1:]
rng = random.Random(int(seed))
stop_at, max_reads = float(stop_at), int(max_reads)
files = []
for mounted, truth in zip(pairs[::2], pairs[1::2]):
    with open(truth, "rb") as f:
        files.append((os.open(mounted, os.O_RDONLY), f.read()))
reads = eio = short = 0
while time.time() < stop_at and reads + eio < max_reads:
    fd, truth = rng.choice(files)
    offset = rng.randrange(len(truth))
    length = rng.randrange(1, 192 * 1024)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    try:
        got = os.pread(fd, length, offset)
    except OSError as err:
        if err.errno != errno.EIO:
            raise
        eio += 1
        continue
    reads += 1
    want = truth[offset : offset + length]
    if got != want[: len(got)]:
        sys.exit(f"WRONG BYTES: {len(got)} bytes at {offset}")
    if len(got) < len(want):
        short += 1
print(reads, eio, short)
"""


def run_soak_readers(mount: Path, names: list[str], truth: Path, duration: float) -> list[int]:
    """8 `SOAK_READER` processes for *duration* seconds; the summed ``[reads, eio, short]``."""
    pairs = [str(p) for name in names for p in (mount / name, truth / name)]
    stop_at = str(time.time() + duration)
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", SOAK_READER, str(seed), stop_at, "1000", *pairs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(8)
    ]
    totals = [0, 0, 0]
    failures = []
    for reader in readers:
        try:
            out, err = reader.communicate(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            reader.kill()
            reader.communicate(timeout=10)
            failures.append("a reader hung")
            continue
        if reader.returncode != 0:
            failures.append(err)
            continue
        for index, value in enumerate(out.split()):
            totals[index] += int(value)
    assert failures == []
    return totals


def test_soak_random_faults_never_give_wrong_bytes(
    faulty: FaultyOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    names = [f"s{index}.bin" for index in range(4)]
    for index, name in enumerate(names):
        write_random(origin_root / name, 4 * MiB + index * 40_009, seed=index + 1)
    digests = {
        name: hashlib.sha256((origin_root / name).read_bytes()).hexdigest() for name in names
    }
    faulty.stall_seconds = 1.5
    kinds = (Fault.RESET, Fault.HTTP_503, Fault.STALL, Fault.TRUNCATE)
    totals = [0, 0, 0]
    # Three rounds, each with an empty cache (random reads soon find every block cached) and
    # another request size, so that partial bodies sometimes hold whole blocks and sometimes not.
    for round_index, min_request in enumerate(["64K", "256K", "1M"]):
        mount = remotefs.mount(
            [faulty.url(name) for name in names],
            "--read-deadline", "5", "--stall-timeout", "1", "--min-request", min_request,
            "--checkpoint-interval", "0.5",
            cache_dir=tmp_path / f"cache{round_index}",
        )  # fmt: skip
        faulty.plan.randomly(0.25, kinds, seed=round_index)
        counts = run_soak_readers(mount.path, names, origin_root, duration=8.0)
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        faulty.plan.clear()
        settle(faulty)
        # Faults off: every file reads back equal to the origin, through the daemon's cache.
        for name in names:
            fd = os.open(mount.path / name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            got = hashlib.sha256((mount.path / name).read_bytes()).hexdigest()
            assert got == digests[name], f"round {round_index}: {name}"
        mount.unmount()

    injected = faulty.plan.count()
    print(
        f"soak: {totals[0]} reads, {totals[1]} EIO, {totals[2]} short; {injected} faults in"
        f" {faulty.plan.data_requests} data requests {dict(faulty.plan.injected)}"
    )
    assert totals[0] >= 3 * 8 * 20
    assert injected >= 50
    assert injected >= 0.1 * faulty.plan.data_requests
    assert all(faulty.plan.injected[kind] > 0 for kind in kinds)
