"""Tests of the HTTP layer (remotefs.http) against the real test origin on 127.0.0.1.

No FUSE and no cache here: `HttpSource` is driven directly with ``trio.run``, and misbehaving
servers are small `Origin` subclasses that write through the `Exchange` so the origin's byte
accounting stays exact.
"""

from __future__ import annotations

import dataclasses
import email.utils
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from remotefs.config.options import MountOptions
from remotefs.http.errors import (
    DeadlineExceededError,
    HttpSourceError,
    PermanentError,
    ProtocolViolationError,
    RangeNotSupportedError,
    RemoteChangedError,
    TransientError,
)
from remotefs.http.retry import retry_until
from remotefs.http.source import (
    ContentRange,
    HttpSource,
    RemoteMeta,
    error_for_status,
    parse_content_range,
    parse_retry_after,
)

from .conftest import make_options, write_random
from .origin import Exchange, Origin, make_etag, parse_byte_range

T = TypeVar("T")

BLOCK = 64 * 1024
SIZE = 3 * BLOCK + 1000  # three whole blocks and a short one
SECRET = "sig=SECRET-TOKEN"


def run_source(options: MountOptions, body: Callable[[HttpSource], Awaitable[T]]) -> T:
    """Run *body* with a fresh HttpSource inside trio, always closing the source."""

    async def main() -> T:
        source = HttpSource(options)
        try:
            return await body(source)
        finally:
            await source.aclose()

    return trio.run(main)


async def fetch(source: HttpSource, meta: RemoteMeta, start: int, end: int) -> bytes:
    chunks: list[bytes] = []
    await source.fetch_range(meta, start, end, chunks.append)
    return b"".join(chunks)


def replace_file(path: Path, data: bytes, mtime_s: int = 1_000_000_000) -> None:
    """Replace *path* atomically with *data* and a distinct mtime (hence a new ETag)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(mtime_s * 10**9, mtime_s * 10**9))
    tmp.replace(path)


def gets(origin: Origin) -> list[tuple[str, str, int]]:
    """(path, Range header, status) of every request after the origin went idle, sorted.

    Sorted because the origin records a request when its handler thread finishes, so two
    requests on different connections (the probe closes its connection without reading the
    body) may be recorded in either order on a busy machine.
    """
    assert origin.wait_idle()
    return sorted((r.path, r.range_header or "", r.status) for r in origin.requests)


# -- origin subclasses that misbehave -----------------------------------------------------------


class NoRanges(Origin):
    """Ignores Range: every GET gets the whole file with 200."""

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        self._send_full(ex, fd, st)


class Redirecting(Origin):
    """``/old.bin`` answers 302 to ``/new.bin``."""

    def _send_not_found(self, ex: Exchange) -> None:
        if ex.path == "/old.bin":
            ex.send_head(302, {"Location": "/new.bin", "Content-Length": "0"})
            return
        super()._send_not_found(ex)


class WeakEtag(Origin):
    """Sends weak ETags, which If-Range must not use."""

    def _representation_headers(self, st: os.stat_result) -> dict[str, str]:
        headers = super()._representation_headers(st)
        headers["ETag"] = "W/" + headers["ETag"]
        return headers


class IgnoresIfRange(Origin):
    """Serves the Range even when If-Range does not match (a broken CDN)."""

    def _select_range(self, ex: Exchange, st: os.stat_result) -> tuple[int, int] | None:
        if ex.range_header is None:
            return None
        return parse_byte_range(ex.range_header, st.st_size)


class ShiftedRange(Origin):
    """Answers a range one byte later than asked, with a Content-Range that says so."""

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if end - start > 1:
            start, end = start + 1, min(end + 1, st.st_size)
        super()._send_range(ex, fd, st, start, end)


class NoContentRange(Origin):
    """A 206 without any Content-Range header."""

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if end - start == 1:  # let the probe through
            super()._send_range(ex, fd, st, start, end)
            return
        ex.send_head(206, {"Content-Length": str(end - start)})
        ex.send_file(fd, start, end - start)


class LongBody(Origin):
    """A 206 with the right Content-Range but 10 bytes more body than the range."""

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if end - start == 1:
            super()._send_range(ex, fd, st, start, end)
            return
        headers = self._representation_headers(st)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
        headers["Content-Length"] = str(end - start + 10)
        ex.send_head(206, headers)
        ex.send_file(fd, start, end - start + 10)


class CutBody(Origin):
    """Promises the whole range, sends ``cut`` bytes, then resets or closes the connection."""

    cut = 1000
    abort = True

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if end - start <= self.cut:
            super()._send_range(ex, fd, st, start, end)
            return
        headers = self._representation_headers(st)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
        headers["Content-Length"] = str(end - start)
        ex.send_head(206, headers)
        ex.send_file(fd, start, self.cut)
        if self.abort:
            ex.abort()
        else:
            ex.handler.close_connection = True
            ex.handler.connection.shutdown(socket.SHUT_WR)  # FIN after the partial body


class Unavailable(Origin):
    """Answers the next ``failures`` range requests with ``status`` (and maybe Retry-After)."""

    failures = 0
    status = 503
    retry_after: str | None = None

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if self.failures > 0:
            self.failures -= 1
            headers = {"Content-Length": "0"}
            if self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            ex.send_head(self.status, headers)
            return
        super()._send_range(ex, fd, st, start, end)


# -- probe --------------------------------------------------------------------------------------


def test_probe_reads_metadata_from_one_ranged_get(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    url = origin.url("f.bin")
    meta = run_source(make_options(tmp_path), lambda s: s.probe(url))

    st = os.stat(origin_root / "f.bin")
    assert meta == RemoteMeta(
        url=url,
        size=SIZE,
        etag=make_etag(st),
        last_modified=email.utils.formatdate(st.st_mtime_ns // 10**9, usegmt=True),
        content_type="application/octet-stream",
        accepts_ranges=True,
    )
    assert meta.validator == make_etag(st)
    assert meta.mtime_ns == (st.st_mtime_ns // 10**9) * 10**9
    assert origin.wait_idle()
    [record] = origin.requests
    assert record.method == "GET"  # never HEAD
    assert record.range_header == "bytes=0-0"
    assert record.status == 206
    assert record.headers["accept-encoding"] == "identity"
    assert record.headers["user-agent"] == "remotefs/0.1"
    assert origin.bytes_served() <= 1


def test_probe_empty_file_has_size_zero(origin: Origin, origin_root: Path, tmp_path: Path) -> None:
    (origin_root / "empty.bin").write_bytes(b"")
    meta = run_source(make_options(tmp_path), lambda s: s.probe(origin.url("empty.bin")))
    assert meta.size == 0
    assert meta.accepts_ranges
    assert meta.etag == make_etag(os.stat(origin_root / "empty.bin"))
    assert gets(origin) == [("/empty.bin", "bytes=0-0", 416)]


def test_probe_404_is_permanent_and_hides_the_query(origin: Origin, tmp_path: Path) -> None:
    url = origin.url("missing.bin") + "?" + SECRET
    with pytest.raises(PermanentError) as info:
        run_source(make_options(tmp_path), lambda s: s.probe(url))
    assert not info.value.transient
    assert not isinstance(info.value, RemoteChangedError)
    assert "404" in str(info.value)
    assert "SECRET" not in str(info.value)
    assert origin.wait_idle()
    assert [r.method for r in origin.requests] == ["GET"]


def test_probe_of_server_without_ranges(origin_root: Path, tmp_path: Path) -> None:
    data = write_random(origin_root / "f.bin", 5000)
    with NoRanges(origin_root) as server:
        url = server.url("f.bin")

        async def body(source: HttpSource) -> RemoteMeta:
            meta = await source.probe(url)
            with pytest.raises(RangeNotSupportedError):
                await fetch(source, meta, 0, 10)
            return meta

        meta = run_source(make_options(tmp_path), body)
        assert server.wait_idle()
        assert [r.method for r in server.requests] == ["GET", "GET"]
    assert meta.size == len(data)
    assert meta.accepts_ranges is False


def test_probe_follows_redirects(origin_root: Path, tmp_path: Path) -> None:
    data = write_random(origin_root / "new.bin", SIZE)
    with Redirecting(origin_root) as server:
        url = server.url("old.bin")

        async def body(source: HttpSource) -> tuple[RemoteMeta, bytes]:
            meta = await source.probe(url)
            assert gets(server) == [("/new.bin", "bytes=0-0", 206), ("/old.bin", "bytes=0-0", 302)]
            return meta, await fetch(source, meta, BLOCK, 2 * BLOCK)

        meta, got = run_source(make_options(tmp_path), body)
        assert server.wait_idle()
        # The data came from the redirect target (whether or not the fetch asked the old URL
        # again first), with the range and validator of the probed version.
        wanted = f"bytes={BLOCK}-{2 * BLOCK - 1}"
        [data_request] = [
            r for r in server.requests if r.path == "/new.bin" and r.range_header != "bytes=0-0"
        ]
        assert (data_request.range_header, data_request.status) == (wanted, 206)
        assert data_request.headers["if-range"] == meta.etag
        assert all(r.status == 302 for r in server.requests if r.path == "/old.bin")
    assert meta.url == url  # the URL as written, not where it redirected to
    assert meta.size == SIZE
    assert meta.etag == make_etag(os.stat(origin_root / "new.bin"))
    assert got == data[BLOCK : 2 * BLOCK]


def test_probe_transient_status(origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", 100)
    server = Unavailable(origin_root)
    with server:
        server.failures = 1
        with pytest.raises(TransientError):
            run_source(make_options(tmp_path), lambda s: s.probe(server.url("f.bin")))


def test_probe_of_unsupported_scheme_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError):
        run_source(make_options(tmp_path), lambda s: s.probe("ftp://127.0.0.1/f.bin"))


# -- fetch_range --------------------------------------------------------------------------------

RANGES = [
    (0, 1),
    (100, 5000),
    (BLOCK - 10, BLOCK + 10),  # across a block boundary
    (BLOCK, 2 * BLOCK),  # exactly one block
    (3 * BLOCK, SIZE),  # the short last block, up to EOF
    (SIZE - 1, SIZE),
    (0, SIZE),
]


def test_fetch_range_returns_exact_bytes(origin: Origin, origin_root: Path, tmp_path: Path) -> None:
    data = write_random(origin_root / "f.bin", SIZE)
    url = origin.url("f.bin")

    async def body(source: HttpSource) -> list[bytes]:
        meta = await source.probe(url)
        return [await fetch(source, meta, start, end) for start, end in RANGES]

    results = run_source(make_options(tmp_path), body)
    for (start, end), got in zip(RANGES, results, strict=True):
        assert got == data[start:end], (start, end)
    assert origin.wait_idle()
    [probe] = [r for r in origin.requests if "if-range" not in r.headers]
    assert probe.range_header == "bytes=0-0"
    records = [r for r in origin.requests if r is not probe]
    etag = make_etag(os.stat(origin_root / "f.bin"))
    assert [(r.range_header, r.status) for r in records] == [
        (f"bytes={start}-{end - 1}", 206) for start, end in RANGES
    ]
    for record in records:
        assert record.headers["if-range"] == etag
        assert record.headers["accept-encoding"] == "identity"
    assert [(r.start, r.end) for r in records] == RANGES


@pytest.mark.parametrize(("start", "end"), [(0, 0), (-1, 5), (5, 4), (0, SIZE + 1), (SIZE, SIZE)])
def test_fetch_range_rejects_ranges_outside_the_file(
    origin: Origin, origin_root: Path, tmp_path: Path, start: int, end: int
) -> None:
    write_random(origin_root / "f.bin", SIZE)

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        with pytest.raises(ValueError):
            await fetch(source, meta, start, end)

    run_source(make_options(tmp_path), body)
    assert len(gets(origin)) == 1  # only the probe went out


def test_weak_etag_uses_last_modified_for_if_range(origin_root: Path, tmp_path: Path) -> None:
    data = write_random(origin_root / "f.bin", SIZE)
    with WeakEtag(origin_root) as server:

        async def body(source: HttpSource) -> tuple[RemoteMeta, bytes]:
            meta = await source.probe(server.url("f.bin"))
            return meta, await fetch(source, meta, 10, 20)

        meta, got = run_source(make_options(tmp_path), body)
        assert server.wait_idle()
        [record] = [r for r in server.requests if r.range_header == "bytes=10-19"]
    assert meta.etag is not None and meta.etag.startswith("W/")
    assert meta.validator == meta.last_modified
    assert record.headers["if-range"] == meta.last_modified
    assert got == data[10:20]


def test_content_range_other_than_asked_is_rejected_before_any_data(
    origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []
    with ShiftedRange(origin_root) as server:

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            await source.fetch_range(meta, 1000, 2000, chunks.append)

        with pytest.raises(ProtocolViolationError, match="1001-2000"):
            run_source(make_options(tmp_path), body)
        assert server.wait_idle()
        assert server.requests[-1].status == 206
    assert chunks == []  # no byte from the wrong offset reached the caller


def test_206_without_content_range_is_rejected(origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []
    with NoContentRange(origin_root) as server:

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            await source.fetch_range(meta, 0, 100, chunks.append)

        with pytest.raises(ProtocolViolationError):
            run_source(make_options(tmp_path), body)
    assert chunks == []


def test_body_longer_than_range_is_rejected(origin_root: Path, tmp_path: Path) -> None:
    data = write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []
    with LongBody(origin_root) as server:

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            await source.fetch_range(meta, 100, 1100, chunks.append)

        with pytest.raises(ProtocolViolationError):
            run_source(make_options(tmp_path), body)
    got = b"".join(chunks)
    assert len(got) <= 1000
    assert got == data[100 : 100 + len(got)]  # never a byte past the range


def test_replaced_file_gives_remote_changed(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        replace_file(origin_root / "f.bin", os.urandom(SIZE))  # same size, new ETag
        await source.fetch_range(meta, 0, BLOCK, chunks.append)

    with pytest.raises(RemoteChangedError):
        run_source(make_options(tmp_path), body)
    # If-Range failed, so the origin sent the whole new file.
    assert [status for _, _, status in gets(origin)] == [206, 200]
    assert chunks == []


def test_size_change_without_validators_gives_remote_changed(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        bare = dataclasses.replace(meta, etag=None, last_modified=None)
        assert bare.validator is None
        replace_file(origin_root / "f.bin", os.urandom(SIZE + 10))
        with pytest.raises(RemoteChangedError, match="size is now"):
            await source.fetch_range(bare, 0, 100, chunks.append)
        replace_file(origin_root / "f.bin", os.urandom(500))
        with pytest.raises(RemoteChangedError):  # 416: the range is past the new end
            await source.fetch_range(bare, 1000, 2000, chunks.append)

    run_source(make_options(tmp_path), body)
    assert origin.wait_idle()
    assert sorted(r.status for r in origin.requests) == [206, 206, 416]
    assert not any("if-range" in r.headers for r in origin.requests)
    assert chunks == []


def test_server_ignoring_if_range_cannot_mix_versions(origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []
    with IgnoresIfRange(origin_root) as server:

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            replace_file(origin_root / "f.bin", os.urandom(SIZE + 1))
            with pytest.raises(RemoteChangedError, match="size"):
                await source.fetch_range(meta, 0, 100, chunks.append)
            replace_file(origin_root / "f.bin", os.urandom(SIZE), mtime_s=1_100_000_000)
            with pytest.raises(RemoteChangedError, match="ETag"):
                await source.fetch_range(meta, 0, 100, chunks.append)

        run_source(make_options(tmp_path), body)
        assert server.wait_idle()
        assert [r.status for r in server.requests] == [206, 206, 206]
    assert chunks == []


@pytest.mark.parametrize("abort", [True, False], ids=["reset", "fin"])
def test_body_cut_short_is_transient_and_keeps_a_correct_prefix(
    origin_root: Path, tmp_path: Path, abort: bool
) -> None:
    data = write_random(origin_root / "f.bin", SIZE)
    chunks: list[bytes] = []
    server = CutBody(origin_root)
    with server:
        server.abort = abort

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            await source.fetch_range(meta, BLOCK, 2 * BLOCK, chunks.append)

        with pytest.raises(TransientError):
            run_source(make_options(tmp_path), body)
        assert server.wait_idle()
        assert sorted(server.served_ranges("/f.bin")) == [(0, 1), (BLOCK, BLOCK + CutBody.cut)]
    got = b"".join(chunks)
    assert len(got) <= CutBody.cut
    if not abort:
        assert len(got) == CutBody.cut
    assert got == data[BLOCK : BLOCK + len(got)]


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (503, "7", 7.0),
        (503, None, None),
        (429, "0", 0.0),
        (500, None, None),
        (502, "2", 2.0),
    ],
)
def test_transient_statuses_carry_retry_after(
    origin_root: Path, tmp_path: Path, status: int, retry_after: str | None, expected: float | None
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    server = Unavailable(origin_root)
    with server:
        server.status = status
        server.retry_after = retry_after

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            server.failures = 1
            await fetch(source, meta, 0, 10)

        with pytest.raises(TransientError) as info:
            run_source(make_options(tmp_path), body)
    assert str(status) in str(info.value)
    assert info.value.retry_after == expected


def test_retry_after_as_http_date(origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)
    server = Unavailable(origin_root)
    with server:
        server.retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            server.failures = 1
            await fetch(source, meta, 0, 10)

        with pytest.raises(TransientError) as info:
            run_source(make_options(tmp_path), body)
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 31


def test_unparseable_retry_after_still_gives_transient_error(
    origin_root: Path, tmp_path: Path
) -> None:
    """``Retry-After: ²`` (the latin-1 byte 0xB2) must not escape as ValueError.

    httpx decodes the header as latin-1 ``"²"``, for which ``str.isdigit()`` is true but
    ``float()`` fails; a parser relying on isdigit() turned this 503 into a ValueError that
    the block fetcher does not catch, crashing its nursery (the whole daemon).
    """
    write_random(origin_root / "f.bin", SIZE)
    server = Unavailable(origin_root)
    with server:
        server.retry_after = "\u00b2"

        async def body(source: HttpSource) -> None:
            meta = await source.probe(server.url("f.bin"))
            server.failures = 1
            await fetch(source, meta, 0, 10)

        with pytest.raises(TransientError) as info:
            run_source(make_options(tmp_path), body)
    assert info.value.retry_after is None


def test_fetch_404_is_permanent(origin: Origin, origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        (origin_root / "f.bin").unlink()
        await fetch(source, meta, 0, 10)

    with pytest.raises(PermanentError) as info:
        run_source(make_options(tmp_path), body)
    assert not isinstance(info.value, RemoteChangedError)


def test_stalled_response_is_transient(origin: Origin, origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        origin.delay = 10
        await fetch(source, meta, 0, 10)

    began = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        run_source(make_options(tmp_path, stall_timeout=0.5), body)
    assert time.monotonic() - began < 3


def test_connection_refused_is_transient(origin: Origin, origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin") + "?" + SECRET)
        origin.stop()
        await fetch(source, meta, 0, 10)

    with pytest.raises(TransientError) as info:
        run_source(make_options(tmp_path), body)
    assert "SECRET" not in str(info.value)


def test_byte_counters(origin: Origin, origin_root: Path, tmp_path: Path) -> None:
    write_random(origin_root / "f.bin", SIZE)

    async def body(source: HttpSource) -> tuple[int, int]:
        meta = await source.probe(origin.url("f.bin"))
        await fetch(source, meta, 0, BLOCK)
        await fetch(source, meta, SIZE - 10, SIZE)
        return source.requests_sent, source.bytes_received

    assert run_source(make_options(tmp_path), body) == (3, BLOCK + 10)


# -- retry_until --------------------------------------------------------------------------------


def test_retry_until_retries_transient_errors_until_success(
    origin_root: Path, tmp_path: Path
) -> None:
    data = write_random(origin_root / "f.bin", SIZE)
    attempts = 0
    server = Unavailable(origin_root)
    with server:

        async def body(source: HttpSource) -> bytes:
            meta = await source.probe(server.url("f.bin"))
            server.failures = 2

            async def attempt() -> bytes:
                nonlocal attempts
                attempts += 1
                return await fetch(source, meta, BLOCK, 2 * BLOCK)

            return await retry_until(
                attempt, deadline=trio.current_time() + 5, describe="test fetch"
            )

        got = run_source(make_options(tmp_path), body)
        assert sorted(status for _, _, status in gets(server)) == [206, 206, 503, 503]
    assert got == data[BLOCK : 2 * BLOCK]
    assert attempts == 3


def test_retry_until_gives_up_at_the_deadline_with_the_last_error(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    attempts = 0
    deadline = 1.5

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        origin.stop()  # every attempt now gets "connection refused"

        async def attempt() -> bytes:
            nonlocal attempts
            attempts += 1
            return await fetch(source, meta, 0, 10)

        await retry_until(attempt, deadline=trio.current_time() + deadline, describe="test")

    began = time.monotonic()
    with pytest.raises(TransientError) as info:
        run_source(make_options(tmp_path), body)
    assert time.monotonic() - began < deadline + 1
    assert attempts >= 2
    # The last attempt's own error, unless it started so close to the deadline that the
    # deadline itself cut it short.
    assert "ConnectError" in str(info.value) or isinstance(info.value, DeadlineExceededError)


def test_retry_until_raises_permanent_errors_at_once(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)
    attempts = 0

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        (origin_root / "f.bin").unlink()

        async def attempt() -> bytes:
            nonlocal attempts
            attempts += 1
            return await fetch(source, meta, 0, 10)

        await retry_until(attempt, deadline=trio.current_time() + 30, describe="test")

    began = time.monotonic()
    with pytest.raises(PermanentError, match="404"):
        run_source(make_options(tmp_path), body)
    assert time.monotonic() - began < 3
    assert attempts == 1


def test_retry_until_bounds_a_hanging_attempt(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", SIZE)

    async def body(source: HttpSource) -> None:
        meta = await source.probe(origin.url("f.bin"))
        origin.delay = 10

        await retry_until(
            lambda: fetch(source, meta, 0, 10),
            deadline=trio.current_time() + 0.5,
            describe="test",
        )

    began = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        run_source(make_options(tmp_path, stall_timeout=5), body)
    assert time.monotonic() - began < 3


def test_retry_until_honours_retry_after_within_the_deadline() -> None:
    calls: list[float] = []

    async def flaky() -> str:
        calls.append(trio.current_time())
        if len(calls) == 1:
            raise TransientError("busy", retry_after=0.3)
        return "ok"

    async def main() -> str:
        return await retry_until(flaky, deadline=trio.current_time() + 5, describe="t")

    assert trio.run(main) == "ok"
    assert calls[1] - calls[0] >= 0.3


def test_retry_until_gives_up_when_retry_after_passes_the_deadline() -> None:
    calls = 0

    async def busy() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("busy", retry_after=60)

    async def main() -> None:
        await retry_until(busy, deadline=trio.current_time() + 5, describe="t")

    began = time.monotonic()
    with pytest.raises(TransientError, match="busy"):
        trio.run(main)
    assert time.monotonic() - began < 3
    assert calls == 1


def test_retry_until_does_not_catch_other_exceptions() -> None:
    async def broken() -> None:
        raise KeyError("x")

    async def main() -> None:
        await retry_until(broken, deadline=trio.current_time() + 5, describe="t")

    with pytest.raises(KeyError):
        trio.run(main)


# -- parsing and classification -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-9/100", ContentRange(0, 9, 100)),
        ("bytes 0-0/1", ContentRange(0, 0, 1)),
        ("bytes */100", ContentRange(None, None, 100)),
        ("bytes */0", ContentRange(None, None, 0)),
        ("bytes 10-19/*", ContentRange(10, 19, None)),
        ("BYTES 1-2/3", ContentRange(1, 2, 3)),
        ("  bytes   5-6 / 7  ", ContentRange(5, 6, 7)),
        ("bytes 0-18446744073709551615/18446744073709551616", ContentRange(0, 2**64 - 1, 2**64)),
        (None, None),
        ("", None),
        ("bytes", None),
        ("bytes 0-9", None),
        ("bytes 0-/100", None),
        ("bytes -5/100", None),
        ("bytes 0-9/", None),
        ("bytes 0-9/abc", None),
        ("items 0-9/100", None),
        ("bytes=0-9/100", None),
        ("bytes 0-9/100, 20-29/100", None),
        ("bytes 1.5-2/3", None),
    ],
)
def test_parse_content_range(value: str | None, expected: ContentRange | None) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 5 ", 5.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: retry now
        ("\u00b2", None),  # isdigit() is true, but float() raises ValueError
        ("\u00b9", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_future_date() -> None:
    value = email.utils.formatdate(time.time() + 100, usegmt=True)
    seconds = parse_retry_after(value)
    assert seconds is not None
    assert 95 <= seconds <= 101


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (408, TransientError),
        (425, TransientError),
        (429, TransientError),
        (500, TransientError),
        (503, TransientError),
        (599, TransientError),
        (400, PermanentError),
        (403, PermanentError),
        (404, PermanentError),
        (410, PermanentError),
        (412, RemoteChangedError),
        (416, RemoteChangedError),
    ],
)
def test_error_for_status(status: int, kind: type[HttpSourceError]) -> None:
    err = error_for_status(status, "GET x", "3")
    assert type(err) is kind
    assert err.transient == (kind is TransientError)
    assert str(err) == f"GET x: HTTP {status}" or "changed" in str(err)
    assert err.retry_after == (3.0 if kind is TransientError else None)


def test_remote_meta_versions_and_validators() -> None:
    base = RemoteMeta("u", 10, '"a"', "Wed, 21 Oct 2015 07:28:00 GMT", None, True)
    assert base.validator == '"a"'
    assert base.mtime_ns == 1445412480 * 10**9
    assert base.same_version(dataclasses.replace(base, content_type="text/plain"))
    assert not base.same_version(dataclasses.replace(base, size=11))
    assert not base.same_version(dataclasses.replace(base, etag='"b"'))
    # Same ETag wins over a different Last-Modified; without ETags, Last-Modified decides.
    assert base.same_version(dataclasses.replace(base, last_modified="x"))
    no_etag = dataclasses.replace(base, etag=None)
    assert no_etag.validator == base.last_modified
    assert not no_etag.same_version(dataclasses.replace(no_etag, last_modified="x"))
    weak = dataclasses.replace(base, etag='W/"a"')
    assert weak.validator == base.last_modified
    assert dataclasses.replace(weak, last_modified=None).validator is None
    assert dataclasses.replace(base, last_modified="garbage").mtime_ns is None
    assert dataclasses.replace(base, last_modified=None).mtime_ns is None
