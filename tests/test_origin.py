"""Tests of the test origin server itself.

The integration tests draw conclusions ("this read fetched < 5 % of the file", "no block was
downloaded twice") from the origin's counters and simulate outages with stop()/start(), so the
origin's HTTP semantics and bookkeeping have to be right before anything built on them means much.
"""

from __future__ import annotations

import email.utils
import http.client
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.origin import (
    Exchange,
    Origin,
    RangeNotSatisfiable,
    RequestRecord,
    make_etag,
    parse_byte_range,
)

DATA = bytes(range(256)) * 4  # 1024 distinctive bytes


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "root"
    path.mkdir()
    (path / "data.bin").write_bytes(DATA)
    (path / "empty.bin").write_bytes(b"")
    return path


def _origin_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("origin-")]


@pytest.fixture
def origin(root: pathlib.Path) -> Iterator[Origin]:
    """A started origin; teardown checks that stop() really left no thread behind."""
    assert _origin_threads() == []
    server = Origin(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        assert _origin_threads() == []


def request(
    origin: Origin,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection; waits until the origin has recorded it."""
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert origin.wait_idle()
    return response.status, response.headers, body


def last(origin: Origin) -> RequestRecord:
    return origin.requests[-1]


# -- parse_byte_range ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=-5", 100, (95, 100)),
        ("bytes=-500", 100, (0, 100)),
        ("bytes=90-500", 100, (90, 100)),
        ("bytes=99-99", 100, (99, 100)),
        ("Bytes = 1 - 2", 100, (1, 3)),
        ("bytes=5-2", 100, None),
        ("bytes=0-1,3-4", 100, None),
        ("bytes=-", 100, None),
        ("bytes=a-b", 100, None),
        ("items=0-1", 100, None),
        ("bytes=١-٢", 100, None),  # non-ASCII digits
    ],
)
def test_parse_byte_range(value: str, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_byte_range(value, size) == expected


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=100-200", 100),
        ("bytes=0-", 0),
        ("bytes=-5", 0),
        ("bytes=-0", 9),
    ],
)
def test_parse_byte_range_unsatisfiable(value: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_byte_range(value, size)


# -- full responses, HEAD, errors ---------------------------------------------------------------


def test_full_get_headers_and_record(origin: Origin, root: pathlib.Path) -> None:
    status, headers, body = request(origin, "/data.bin", {"X-Test": "yes"})
    st = os.stat(root / "data.bin")
    assert status == 200
    assert body == DATA
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["ETag"] == make_etag(st)
    assert headers["ETag"].startswith('"')  # strong
    assert email.utils.parsedate_to_datetime(headers["Last-Modified"]).timestamp() == int(
        st.st_mtime
    )
    assert last(origin) == RequestRecord(
        method="GET",
        path="/data.bin",
        range_header=None,
        status=200,
        start=0,
        end=len(DATA),
        body_bytes=len(DATA),
        headers=last(origin).headers,
    )
    assert last(origin).headers["x-test"] == "yes"


def test_head_has_headers_but_no_body_and_ignores_range(origin: Origin) -> None:
    status, headers, body = request(origin, "/data.bin", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(DATA)))
    assert "ETag" in headers
    status, headers, _ = request(origin, "/data.bin", {"Range": "bytes=0-9"}, method="HEAD")
    assert status == 200
    assert "Content-Range" not in headers
    record = last(origin)
    assert (record.method, record.start, record.end, record.body_bytes) == ("HEAD", None, None, 0)
    assert origin.bytes_served() == 0


def test_empty_file_full_get(origin: Origin) -> None:
    status, headers, body = request(origin, "/empty.bin")
    assert (status, headers["Content-Length"], body) == (200, "0", b"")


@pytest.mark.parametrize(
    "path", ["/missing.bin", "/", "/sub", "/../secret.bin", "/sub/../data.bin"]
)
def test_not_found(origin: Origin, root: pathlib.Path, path: str) -> None:
    (root / "sub").mkdir()
    (root.parent / "secret.bin").write_bytes(b"secret")
    status, _, body = request(origin, path)
    assert (status, body) == (404, b"")
    assert last(origin).status == 404
    assert origin.bytes_served() == 0


def test_other_methods_get_405(origin: Origin) -> None:
    for method in ("POST", "PUT", "DELETE", "FROB"):
        status, headers, _ = request(origin, "/data.bin", method=method)
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"
        assert last(origin).method == method


def test_subdirectories_and_quoting(origin: Origin, root: pathlib.Path) -> None:
    (root / "a dir").mkdir()
    (root / "a dir" / "x%y ü.bin").write_bytes(b"hello")
    url = origin.url("a dir/x%y ü.bin")
    assert url == f"http://127.0.0.1:{origin.port}/a%20dir/x%25y%20%C3%BC.bin"
    status, _, body = request(origin, url.split(str(origin.port), 1)[1])
    assert (status, body) == (200, b"hello")
    assert last(origin).path == "/a dir/x%y ü.bin"
    assert origin.bytes_served("/a dir/x%y ü.bin") == 5
    assert origin.bytes_served("/a%20dir/x%25y%20%C3%BC.bin") == 5


# -- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=1000-", 1000, 1024),
        ("bytes=-24", 1000, 1024),
        ("bytes=-5000", 0, 1024),
        ("bytes=1020-5000", 1020, 1024),
    ],
)
def test_range_forms(origin: Origin, range_header: str, start: int, end: int) -> None:
    status, headers, body = request(origin, "/data.bin", {"Range": range_header})
    assert status == 206
    assert body == DATA[start:end]
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert headers["Content-Length"] == str(end - start)
    record = last(origin)
    assert (record.range_header, record.start, record.end) == (range_header, start, end)


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-6", "bytes=9-3", "bytes=x-", "pages=1-2"])
def test_malformed_or_multi_range_gets_full_body(origin: Origin, range_header: str) -> None:
    status, headers, body = request(origin, "/data.bin", {"Range": range_header})
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers


@pytest.mark.parametrize(
    ("path", "range_header", "size"),
    [
        ("/data.bin", "bytes=1024-", 1024),
        ("/data.bin", "bytes=5000-6000", 1024),
        ("/empty.bin", "bytes=0-", 0),
        ("/empty.bin", "bytes=-10", 0),
    ],
)
def test_unsatisfiable_range(origin: Origin, path: str, range_header: str, size: int) -> None:
    status, headers, body = request(origin, path, {"Range": range_header})
    assert (status, body) == (416, b"")
    assert headers["Content-Range"] == f"bytes */{size}"
    assert (last(origin).status, last(origin).body_bytes) == (416, 0)


def test_if_range(origin: Origin, root: pathlib.Path) -> None:
    st = os.stat(root / "data.bin")
    etag = make_etag(st)
    last_modified = email.utils.formatdate(int(st.st_mtime), usegmt=True)
    earlier = email.utils.formatdate(int(st.st_mtime) - 10, usegmt=True)
    expected = {
        etag: 206,
        last_modified: 206,
        '"stale"': 200,
        "W/" + etag: 200,  # weak tags never match strongly
        earlier: 200,
        "not a date": 200,
    }
    for if_range, status in expected.items():
        got, _, body = request(origin, "/data.bin", {"Range": "bytes=0-9", "If-Range": if_range})
        assert (if_range, got) == (if_range, status)
        assert body == (DATA[:10] if status == 206 else DATA)
    # A stale If-Range wins over an unsatisfiable Range: the client gets the current file.
    got, _, _ = request(origin, "/data.bin", {"Range": "bytes=9999-", "If-Range": '"stale"'})
    assert got == 200


def test_if_match(origin: Origin, root: pathlib.Path) -> None:
    etag = make_etag(os.stat(root / "data.bin"))
    for if_match, status in {
        etag: 200,
        "*": 200,
        f'"other", {etag}': 200,
        '"other"': 412,
        "W/" + etag: 412,
    }.items():
        got, headers, body = request(origin, "/data.bin", {"If-Match": if_match})
        assert (if_match, got) == (if_match, status)
        if status == 412:
            assert body == b""
            assert headers["ETag"] == etag
    got, _, _ = request(origin, "/data.bin", {"If-Match": '"other"', "Range": "bytes=0-1"})
    assert got == 412


def test_replaced_file_gets_new_etag(origin: Origin, root: pathlib.Path) -> None:
    _, headers, _ = request(origin, "/data.bin")
    old_etag = headers["ETag"]
    tmp = root / "data.bin.new"
    tmp.write_bytes(b"new content")
    os.utime(tmp, ns=(1_000_000_123, 1_000_000_123))
    tmp.replace(root / "data.bin")
    status, headers, body = request(
        origin, "/data.bin", {"Range": "bytes=0-2", "If-Range": old_etag}
    )
    assert (status, body) == (200, b"new content")
    assert headers["ETag"] != old_etag
    assert headers["ETag"] == make_etag(os.stat(root / "data.bin"))


# -- counting -----------------------------------------------------------------------------------


def test_counters(origin: Origin, root: pathlib.Path) -> None:
    (root / "other.bin").write_bytes(b"x" * 100)
    request(origin, "/data.bin", {"Range": "bytes=0-99"})
    request(origin, "/data.bin", {"Range": "bytes=-24"})
    request(origin, "/other.bin")
    request(origin, "/data.bin", method="HEAD")
    request(origin, "/missing.bin")
    assert origin.bytes_served("/data.bin") == 124
    assert origin.bytes_served("/other.bin") == 100
    assert origin.bytes_served() == 224
    assert origin.served_ranges("/data.bin") == [(0, 100), (1000, 1024)]
    assert origin.served_ranges("/other.bin") == [(0, 100)]
    assert [r.status for r in origin.requests] == [206, 206, 200, 200, 404]
    snapshot = origin.requests
    origin.reset_counters()
    assert origin.requests == []
    assert origin.bytes_served() == 0
    assert len(snapshot) == 5  # snapshots are copies


def test_concurrent_requests_are_all_counted(origin: Origin) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            status, _, body = request(
                origin, "/data.bin", {"Range": f"bytes={i * 64}-{i * 64 + 63}"}
            )
            assert (status, body) == (206, DATA[i * 64 : i * 64 + 64])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert origin.bytes_served("/data.bin") == len(DATA)
    assert sorted(origin.served_ranges("/data.bin")) == [(i * 64, i * 64 + 64) for i in range(16)]


def test_client_disconnect_mid_body_counts_written_bytes_quietly(
    origin: Origin, root: pathlib.Path, capfd: pytest.CaptureFixture[str]
) -> None:
    size = 64 << 20  # far more than loopback socket buffers can absorb
    with open(root / "big.bin", "wb") as f:
        f.truncate(size)
    with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert origin.wait_idle()
    record = last(origin)
    assert record.status == 200
    assert 0 < record.body_bytes < size
    assert record.end == record.body_bytes
    assert origin.bytes_served("/big.bin") == record.body_bytes
    assert capfd.readouterr().err == ""


def test_large_body_streams_completely(origin: Origin, root: pathlib.Path) -> None:
    size = 32 << 20
    with open(root / "big.bin", "wb") as f:
        f.truncate(size)
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
    try:
        conn.request("GET", "/big.bin")
        response = conn.getresponse()
        received = 0
        while chunk := response.read(1 << 20):
            received += len(chunk)
    finally:
        conn.close()
    assert received == size
    assert origin.wait_idle()
    assert origin.served_ranges("/big.bin") == [(0, size)]


# -- connections and lifecycle ------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(origin: Origin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
    try:
        conn.request("GET", "/data.bin", headers={"Range": "bytes=0-0"})
        assert conn.getresponse().read() == DATA[:1]
        sock = conn.sock
        conn.request("GET", "/data.bin", headers={"Range": "bytes=1-1"})
        assert conn.getresponse().read() == DATA[1:2]
        conn.request("GET", "/missing")
        assert conn.getresponse().read() == b""
        conn.request("GET", "/data.bin", headers={"Range": "bytes=2-2"})
        assert conn.getresponse().read() == DATA[2:3]
        assert conn.sock is sock
    finally:
        conn.close()


def test_stop_refuses_and_closes_keep_alive_then_restart_same_port(origin: Origin) -> None:
    port = origin.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/data.bin")
        assert conn.getresponse().read() == DATA
        began = time.monotonic()
        origin.stop()
        assert time.monotonic() - began < 2
        assert _origin_threads() == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(ConnectionError):  # RemoteDisconnected, reset or broken pipe
            conn.request("GET", "/data.bin")
            conn.getresponse().read()
    finally:
        conn.close()
    origin.stop()  # idempotent
    origin.start()
    assert origin.port == port
    status, _, body = request(origin, "/data.bin")
    assert (status, body) == (200, DATA)


def test_port_reserved_before_start(root: pathlib.Path) -> None:
    server = Origin(root)
    server.stop()  # before start: harmless
    port = server.port
    assert port != 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with server:
        assert server.port == port
        assert server.url("data.bin") == f"http://127.0.0.1:{port}/data.bin"
        assert request(server, "/data.bin")[0] == 200
    assert _origin_threads() == []


def test_delay_and_stop_during_delay(origin: Origin) -> None:
    origin.delay = 0.1
    began = time.monotonic()
    assert request(origin, "/data.bin")[0] == 200
    assert time.monotonic() - began >= 0.1

    origin.delay = 30
    outcome: list[BaseException | int] = []

    def slow_client() -> None:
        try:
            outcome.append(request(origin, "/data.bin")[0])
        except BaseException as exc:
            outcome.append(exc)

    client = threading.Thread(target=slow_client)
    client.start()
    deadline = time.monotonic() + 5
    while origin.wait_idle(0) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the request is being delayed
    began = time.monotonic()
    origin.stop()
    client.join(5)
    assert time.monotonic() - began < 2
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectionError)


def test_subclass_can_inject_faults(root: pathlib.Path) -> None:
    class HalfBody(Origin):
        """Promises the whole range, sends half, then resets the connection."""

        def _send_range(
            self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int
        ) -> None:
            ex.send_head(206, {"Content-Length": str(end - start)})
            ex.send_file(fd, start, (end - start) // 2)
            ex.abort()

    with HalfBody(root) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("GET", "/data.bin", headers={"Range": "bytes=0-99"})
            response = conn.getresponse()
            with pytest.raises((http.client.IncompleteRead, ConnectionError)):
                response.read()
        finally:
            conn.close()
        assert server.wait_idle()
        assert server.served_ranges("/data.bin") == [(0, 50)]
        assert server.requests[-1].status == 206
    assert _origin_threads() == []
