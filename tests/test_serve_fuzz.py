"""Hostile input against a running `remotefs serve`: ranges, paths and request heads, generated.

One real daemon (origin on 127.0.0.1) takes a bounded number of generated requests on raw
sockets: Range headers well-formed or not (suffixes, overlaps, many parts, huge numbers,
garbage), paths (encoded slashes and dots, NUL, non-UTF-8, reserved names, queries), and heads
(odd header names and values, duplicates, control bytes). What must hold for every one:

- the answer is a status the server documents (never a 5xx but 502/503, never a crash);
- every byte of a 200 or a 206 is the origin's, where its Content-Range says, in single and
  multipart answers alike;
- the daemon still answers a plain request afterwards, and its log has no traceback.

Bounded in count (hypothesis's ``max_examples``), not in time; the seed is derandomized so a
failure is the same failure on the next run.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import write_random
from .origin import Origin
from .serving import ServeFactory, Server

SIZE = 300 * 1024 + 7
ALLOWED = {200, 206, 302, 304, 400, 403, 404, 405, 412, 416, 431, 502, 503}
FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "origin"
    data = write_random(root / "f.bin", SIZE, seed=9)
    write_random(root / "dir" / "g h.bin", 1000, seed=10)
    factory = ServeFactory(base)
    with Origin(root) as origin:
        try:
            other = f"{origin.url('dir/g%20h.bin')} d/g h.bin"
            yield Served(factory.start([origin.url("f.bin"), other]), data)
        finally:
            factory.cleanup()


@dataclass(frozen=True)
class Served:
    """The fuzzed daemon and the origin's bytes of f.bin (kept out of reports)."""

    server: Server
    data: bytes = field(repr=False)


def exchange(port: int, head: bytes, method: str = "GET") -> http.client.HTTPResponse | None:
    """Send *head*; the parsed answer, or None when the server closed without one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        sock.sendall(head)
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        response.body = response.read()  # type: ignore[attr-defined]
        return response
    finally:
        sock.close()


def check_body(response: http.client.HTTPResponse, data: bytes) -> None:
    """The bytes of a 200 or 206 of f.bin are the origin's, where the answer says."""
    body: bytes = response.body  # type: ignore[attr-defined]
    if response.status == 200:
        assert body == data
        return
    kind = response.getheader("content-type", "")
    if kind.startswith("multipart/byteranges"):
        boundary = kind.split("boundary=", 1)[1].encode()
        parts = body.split(b"--" + boundary)
        assert parts[-1].strip() == b"--", parts[-1][:100]
        checked = 0
        for part in parts[1:-1]:
            head, _, content = part.partition(b"\r\n\r\n")
            part_range = re.search(rb"content-range: bytes (\d+)-(\d+)/(\d+)", head, re.I)
            assert part_range, head
            start, end, total = map(int, part_range.groups())
            assert total == len(data)
            assert content[:-2] == data[start : end + 1] and content.endswith(b"\r\n")
            checked += 1
        assert checked >= 2
        return
    found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.getheader("content-range", ""))
    assert found, response.getheaders()
    start, end, total = map(int, found.groups())
    assert total == len(data) and 0 <= start <= end < total
    assert body == data[start : end + 1]


NUMBER = st.one_of(
    st.integers(0, SIZE + 10),
    st.integers(0, 2**70),
    st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64]),
)
RANGE_SPEC = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", NUMBER, NUMBER),
    st.builds(lambda a: f"{a}-", NUMBER),
    st.builds(lambda b: f"-{b}", NUMBER),
    st.text(alphabet="0123456789-, =\t;abx", max_size=12),
)
RANGE = st.one_of(
    st.builds(
        lambda specs: "bytes=" + ",".join(specs), st.lists(RANGE_SPEC, min_size=1, max_size=70)
    ),
    st.builds(
        lambda unit, spec: f"{unit}={spec}",
        st.sampled_from(["bytes", "BYTES", "items", "", " bytes"]),
        RANGE_SPEC,
    ),
    st.text(alphabet="bytes=0123456789-, ", max_size=30),
)


@FUZZ
@given(
    range_header=RANGE, if_range=st.sampled_from([None, '"nope"', "Thu, 01 Jan 1970 00:00:00 GMT"])
)
def test_hostile_ranges_get_the_origins_bytes_or_a_documented_refusal(
    served: Served, range_header: str, if_range: str | None
) -> None:
    server, data = served.server, served.data
    head = f"GET /f.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: {range_header}\r\n"
    if if_range is not None:
        head += f"If-Range: {if_range}\r\n"
    response = exchange(server.port, (head + "Connection: close\r\n\r\n").encode("latin-1"))
    if response is None:
        return  # a head the parser refused by closing: nothing was served
    assert response.status in ALLOWED, response.status
    if response.status in (200, 206):
        check_body(response, data)


SEGMENT = st.one_of(
    st.sampled_from(
        [
            "f.bin",
            "d",
            "g%20h.bin",
            "..",
            ".",
            "%2e%2e",
            "%2F",
            "%2f..%2f",
            "%00",
            "_remotefs",
            "status",
            "status.json",
            "health",
            "%ff%fe",
            "f.bin%00",
            "\u00e9",
            "%C3%A9",
            "",
            "?x",
            "#y",
            ";p",
            "f.bin?token=1",
        ]
    ),
    st.text(alphabet="abc./%20?#;&=~\u00e9", max_size=12),
)
PATH = st.builds(lambda parts: "/" + "/".join(parts), st.lists(SEGMENT, min_size=0, max_size=6))


@FUZZ
@given(path=PATH, method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "GET"]))
def test_hostile_paths_name_a_listed_file_or_nothing(
    served: Served, path: str, method: str
) -> None:
    server, data = served.server, served.data
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = exchange(server.port, head.encode("utf-8"), method)
    if response is None:
        return
    assert response.status in ALLOWED, (path, response.status)
    served_file = path.split("?", 1)[0] == "/f.bin"
    if response.status == 200 and method == "GET" and served_file:
        check_body(response, data)
    if response.status in (200, 206) and method == "GET" and not served_file:
        body: bytes = response.body  # type: ignore[attr-defined]
        assert data[:4096] not in body or path.split("?", 1)[0] == "/f.bin"


HEADER_NAME = st.one_of(
    st.sampled_from(["X-A", "Range", "Host", "If-None-Match", "Authorization", "Accept", "Cookie"]),
    st.text(alphabet="abcXYZ-_:;. \t\x00\x7f\u00e9", min_size=0, max_size=20),
)
HEADER_VALUE = st.one_of(
    st.text(alphabet='abc 0123456789-=,;"\t', max_size=40),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
    st.integers(0, 20000).map(lambda n: "v" * n),
)


@FUZZ
@given(headers=st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=12))
def test_hostile_heads_are_answered_or_refused_never_crash(
    served: Served, headers: list[tuple[str, str]]
) -> None:
    server, data = served.server, served.data
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = f"GET /f.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}Connection: close\r\n\r\n"
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        response = exchange(server.port, head.encode("latin-1", errors="replace"))
        if response is None:
            return
        assert response.status in ALLOWED, response.status
        if response.status in (200, 206):
            check_body(response, data)


def test_the_server_is_well_after_the_fuzzing(served: Served) -> None:
    """Runs after the fuzz tests (file order): a plain request, and a clean log."""
    server, data = served.server, served.data
    response = exchange(
        server.port, b"GET /f.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert response is not None and response.status == 200
    check_body(response, data)
    log = server.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
