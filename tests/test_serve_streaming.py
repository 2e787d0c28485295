"""How `remotefs serve` streams: first bytes early, backpressure, disconnects, remote changes,
slow and idle clients, and the bound on connections.

Clients here are raw sockets or `http.client`, so each test controls exactly when bytes are
read; origins count what they send.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from remotefs.serve.listen import Listen
from remotefs.serve.server import _Guarded

from .conftest import write_random
from .origin import Exchange, Origin
from .serving import ServeFactory, Server, curl
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024
KiB = 1024


class SlowOrigin(Origin):
    """Sends bodies in 256 KiB pieces with a pause after each."""

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


def open_get(server: Server, path: str, headers: str = "", rcvbuf: int = 64 * KiB) -> socket.socket:
    """A connection with a small receive buffer that sent a GET for *path*."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
    return sock


def read_head(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    """The response's headers (lower-case names) and the body bytes read with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the headers"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {"status": lines[0].split(" ")[1]}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields, rest


def http_stats(server: Server) -> dict[str, int]:
    stats: dict[str, int] = server.status()["daemon"]["http"]
    return stats


def test_the_first_byte_leaves_before_the_range_is_cached(
    slow_origin: SlowOrigin, origin_root: Path, serve: ServeFactory
) -> None:
    size = 4 * MiB
    data = write_random(origin_root / "slow.bin", size)
    # One request for the whole range (min-request) on one connection: it takes the time of
    # all its pieces, whatever readahead asks beside it.
    server = serve.start(
        [slow_origin.url("slow.bin")],
        *("--min-request", "4M", "--max-connections", "1"),
        *("--prefetch-head", "0", "--prefetch-tail", "0"),
    )
    slow_origin.pause = 0.25  # 16 pieces: the range takes about 4 s to arrive
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    started = time.monotonic()
    connection.request("GET", "/slow.bin", headers={"Range": f"bytes=0-{size - 1}"})
    response = connection.getresponse()
    assert response.status == 206
    first = response.read(1)
    first_at = time.monotonic() - started
    rest = response.read()
    done_at = time.monotonic() - started
    connection.close()
    assert first + rest == data
    assert first_at < 1.5, f"first byte after {first_at:.2f}s"
    assert done_at > first_at + 2.0, f"first byte {first_at:.2f}s, last {done_at:.2f}s"


@pytest.fixture
def virtual() -> Iterator[VirtualOrigin]:
    with VirtualOrigin() as origin:
        origin.files["big.bin"] = VirtualFile(4 << 30, seed=3)  # 4 GiB, nothing on disk
        yield origin


def test_a_slow_client_does_not_make_the_server_buffer_the_file(
    virtual: VirtualOrigin, serve: ServeFactory
) -> None:
    server = serve.start([virtual.url("big.bin")], "--readahead-max", "8M")
    sock = open_get(server, "big.bin")
    headers, body = read_head(sock)
    assert headers["status"] == "200" and headers["content-length"] == str(4 << 30)
    received = bytearray(body)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # about 1.3 MB/s
        received += sock.recv(64 * KiB)
        time.sleep(0.05)
    assert bytes(received) == expected(3, 0, len(received))
    served = virtual.body_bytes("big.bin")
    # What the origin sent is what the client took, plus readahead and socket buffers:
    # nowhere near the file.
    assert served < len(received) + 48 * MiB, (served, len(received))
    rss = _rss_kib(server.pid)
    assert rss < 200 * 1024, f"daemon RSS {rss} KiB"
    sock.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_disconnects_frees_its_request_at_once(
    virtual: VirtualOrigin, serve: ServeFactory
) -> None:
    server = serve.start([virtual.url("big.bin")], "--readahead-max", "8M")
    sock = open_get(server, "big.bin")
    _, body = read_head(sock)
    received = len(body)
    while received < 2 * MiB:
        received += len(sock.recv(64 * KiB))
    assert http_stats(server)["responses_in_flight"] == 1
    sock.close()
    deadline = time.monotonic() + 2
    while (stats := http_stats(server))["responses_in_flight"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    # Nothing more is fetched for it (downloads in flight end, no new one starts).
    time.sleep(1.0)
    before = virtual.body_bytes("big.bin")
    time.sleep(1.5)
    assert virtual.body_bytes("big.bin") == before
    assert before < 64 * MiB


def test_a_remote_change_ends_the_response_without_mixing_versions(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    size = 48 * MiB
    old = write_random(origin_root / "m.bin", size, seed=5)
    server = serve.start(
        [origin.url("m.bin")],
        *("--readahead-max", "1M", "--prefetch-head", "0", "--prefetch-tail", "0"),
    )
    sock = open_get(server, "m.bin")
    headers, body = read_head(sock)
    assert headers["status"] == "200" and headers["content-length"] == str(size)
    etag = headers["etag"]
    received = bytearray(body)
    while len(received) < 2 * MiB:
        received += sock.recv(64 * KiB)
    # The origin's file changes (same size, other bytes, another ETag) mid-response.
    time.sleep(0.01)
    new = write_random(origin_root / "m.bin", size, seed=6)
    while chunk := sock.recv(256 * KiB):
        received += chunk
    sock.close()
    # The connection was closed before the declared length, and every byte is the old one.
    assert 2 * MiB <= len(received) < size
    assert bytes(received) == old[: len(received)]
    assert "response cut after" in server.log_text()
    # The next request gets the new version, whole.
    status, body, headers = curl(server.file_url("m.bin"))
    assert (status, body == new) == (200, True)
    assert headers["etag"] != etag


def test_slow_header_senders_are_dropped_and_connections_are_bounded(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    data = write_random(origin_root / "b.bin", 64 * MiB)
    server = serve.start(
        [origin.url("b.bin")], "--http-idle-timeout", "1", "--http-connections", "4"
    )
    # Slowloris: four connections trickle a request head, a byte at a time.
    trickling = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /b.bin HTTP/1.1\r\nHo")
        trickling.append(sock)
    opened = time.monotonic()
    closed_after = []
    for sock in trickling:
        with contextlib.suppress(OSError):
            while True:
                time.sleep(0.2)
                sock.sendall(b"s")
                if time.monotonic() - opened > 8:
                    break
        closed_after.append(time.monotonic() - opened)
        sock.close()
    # Each was cut at the idle timeout (1 s), not served forever.
    assert all(after < 4 for after in closed_after), closed_after

    # Four clients that do not read hold the four connections; a fifth waits for one.
    holders = [open_get(server, "b.bin", rcvbuf=16 * KiB) for _ in range(4)]
    for sock in holders:
        assert read_head(sock)[0]["status"] == "200"
    answer: list[float] = []

    def fifth() -> None:
        started = time.monotonic()
        status, body, _ = curl("-r", "0-99", server.file_url("b.bin"), timeout=30)
        assert (status, body) == (206, data[:100])
        answer.append(time.monotonic() - started)

    thread = threading.Thread(target=fifth)
    thread.start()
    time.sleep(1.5)
    assert not answer, "a fifth connection was served while four were open"
    holders[0].close()
    thread.join(15)
    assert answer and answer[0] < 5, answer
    for sock in holders[1:]:
        sock.close()
    assert json.dumps(http_stats(server))


def test_a_client_that_stops_reading_is_let_go() -> None:
    """hypercorn's writes are shielded; the guarded stream gives up on a stalled client."""

    async def main() -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        accepted, _ = await listener.accept()
        guarded = _Guarded(trio.SocketStream(accepted), timeout=0.5)
        started = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            await guarded.send_all(b"x" * (64 * MiB))  # the client never reads
        assert trio.current_time() - started < 5
        await guarded.aclose()
        client.close()
        listener.close()

    trio.run(main)
    assert Listen("127.0.0.1", 0).bind == "127.0.0.1:0"


@pytest.mark.parametrize("protocol", ["--http1.1", "--http2-prior-knowledge"])
def test_a_remote_change_ends_the_response_over_http_1_and_2(
    protocol: str, origin: Origin, origin_root: Path, serve: ServeFactory, tmp_path: Path
) -> None:
    """curl reading slowly, over HTTP/1.1 or HTTP/2: the response ends at once when the
    file changes at the origin, with old bytes only, and curl says it is incomplete."""
    import subprocess

    size = 48 * MiB
    old = write_random(origin_root / "h.bin", size, seed=8)
    server = serve.start(
        [origin.url("h.bin")],
        *("--readahead-max", "1M", "--prefetch-head", "0", "--prefetch-tail", "0"),
    )
    out = tmp_path / "body"
    reader = subprocess.Popen(
        ["curl", "-sS", protocol, "--limit-rate", "4M", "-o", str(out), server.file_url("h.bin")],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not out.exists() or out.stat().st_size < 2 * MiB:
            assert time.monotonic() < deadline and reader.poll() is None
            time.sleep(0.05)
        time.sleep(0.01)
        write_random(origin_root / "h.bin", size, seed=9)
        changed = time.monotonic()
        _, stderr = reader.communicate(timeout=30)
        ended = time.monotonic() - changed
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode != 0, "curl got the whole body"
    body = out.read_bytes()
    assert 2 * MiB <= len(body) < size
    assert body == old[: len(body)]
    # Cut within a few seconds of the change (the time to drain what was already sent at
    # 4 MB/s, and for the server to notice), not at an idle timeout.
    assert ended < 10, (ended, stderr)
