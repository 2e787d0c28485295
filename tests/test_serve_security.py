"""`remotefs serve` is safe by default: loopback, a token off loopback, only the listed paths.

Nothing here listens anywhere but on 127.0.0.1: the non-loopback case is refused before the
daemon starts, and what a token changes is checked on loopback with a token.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import need_tool, write_random
from .mounting import run_remotefs
from .origin import Origin
from .serving import ServeFactory, curl, raw_request

TOKEN = "s3cr3t-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def _curl() -> None:
    need_tool("curl", "curl")


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.7:8080"])
def test_a_non_loopback_address_without_a_token_is_refused(address: str, tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.bin\n")
    result = run_remotefs("serve", urls, "--listen", address, "--cache-dir", tmp_path / "c")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "which is not a loopback address, without --token-file" in lines[0]
    assert not (tmp_path / "c").exists()  # nothing was started
    # The same for a mount's --serve.
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_remotefs(
        "mount", urls, mountpoint, "--serve", address, "--cache-dir", tmp_path / "c"
    )
    assert result.returncode == 2 and "not a loopback address" in result.stderr


def test_token_files_that_are_unsafe_are_refused(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.bin\n")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    result = run_remotefs("serve", urls, "--token-file", token, "--cache-dir", tmp_path / "c")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"remotefs: --token-file {token}: permissions 0644 are too open (group or others may"
        f" read it); chmod 600 {token}"
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    token.chmod(0o600)
    result = run_remotefs("mount", urls, mountpoint, "--token-file", token)
    assert result.returncode == 2 and "add --serve" in result.stderr


def test_with_a_token_every_request_must_carry_it(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    data = write_random(origin_root / "t.bin", 100_000)
    server = serve.start([origin.url("t.bin")], token=TOKEN)
    url = server.file_url("t.bin")
    for args in ([], ["-H", "Authorization: Bearer wrong"], ["-H", f"Authorization: {TOKEN}"]):
        status, body, headers = curl(*args, url)
        assert status == 401, args
        assert headers["www-authenticate"] == 'Bearer realm="remotefs"'
        assert data[:100] not in body
    for path in ("/", "/_remotefs/status", "/_remotefs/status.json", "/nothing"):
        assert curl(server.url + path)[0] == 401, path
    assert curl(f"{url}?token=wrong")[0] == 401
    # The header, or the query.
    assert curl("-H", f"Authorization: Bearer {TOKEN}", url)[:2] == (200, data)
    assert curl("-H", f"authorization: bearer {TOKEN}", "-r", "0-9", url)[:2] == (206, data[:10])
    assert curl(f"{url}?token={TOKEN}")[:2] == (200, data)
    # Pages reached with ?token= keep it on their links, so a browser can follow them.
    status, page, _ = curl(f"{server.url}/?token={TOKEN}")
    assert status == 200 and f'href="/t.bin?token={TOKEN}"'.encode() in page
    # With a token, any Host is fine (the token is the check).
    assert curl("-H", "Host: media.example", f"{url}?token={TOKEN}")[0] == 200
    # The token never reaches the log.
    assert TOKEN not in server.log_text()


def test_without_a_token_only_loopback_hosts_are_answered(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    """A web page that rebinds its own name to 127.0.0.1 cannot read the server."""
    write_random(origin_root / "r.bin", 1000)
    server = serve.start([origin.url("r.bin")])
    url = server.file_url("r.bin")
    assert curl(url)[0] == 200
    assert curl("-H", f"Host: localhost:{server.port}", url)[0] == 200
    status, body, _ = curl("-H", f"Host: attacker.example:{server.port}", url)
    assert status == 403 and b"loopback" in body


def test_malformed_and_oversized_requests_are_refused_by_the_parser(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    write_random(origin_root / "m.bin", 1000)
    server = serve.start([origin.url("m.bin")])
    answer = raw_request(server.port, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    huge = b"GET /m.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(huge)
            reply = sock.recv(65536)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"HTTP/1.1 200"), reply[:100]
    # And it still serves.
    assert curl(server.file_url("m.bin"))[0] == 200
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", server.url + "/"], check=False)
    assert result.returncode == 0


def status_line(port: int, data: bytes) -> bytes:
    """Send *data* on a new connection; the status line of the answer (b"" if it closed first).

    Read only that far: hypercorn says ``Connection: close`` but may keep the socket a while.
    """
    reply = b""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        contextlib.suppress(ConnectionResetError, BrokenPipeError),
    ):
        sock.sendall(data)
        while b"\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    return reply.partition(b"\r\n")[0]


@pytest.mark.parametrize(
    "host",
    [
        "localhost:1@evil.com",
        "127.0.0.1@evil.com",
        "localhost/evil",
        "localhost:80:81",
        "user:pass@127.0.0.1",
        "[::1",
        "local host",
    ],
)
def test_a_host_that_is_not_a_plain_host_and_port_is_a_bad_request(
    origin: Origin, origin_root: Path, serve: ServeFactory, host: str
) -> None:
    """``localhost:1@evil.com`` once passed as a loopback name (its part before the colon)."""
    write_random(origin_root / "h.bin", 1000)
    server = serve.start([origin.url("h.bin")])
    request = f"GET /h.bin HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    assert status_line(server.port, request) == b"HTTP/1.1 400 "
    for plain in (f"127.0.0.1:{server.port}", "localhost", "[::1]:80", "LOCALHOST.:1"):
        request = f"GET /h.bin HTTP/1.1\r\nHost: {plain}\r\n\r\n".encode()
        assert status_line(server.port, request) == b"HTTP/1.1 200 ", plain


@pytest.mark.parametrize("size", [17 * 1024, 20 * 1024, 60 * 1024])
def test_a_head_larger_than_16_kib_sent_at_once_is_refused(
    origin: Origin, origin_root: Path, serve: ServeFactory, size: int
) -> None:
    """The README promises 16 KiB; h11 alone enforced it only for heads that came in parts."""
    write_random(origin_root / "b.bin", 1000)
    server = serve.start([origin.url("b.bin")])

    def head_of(total: int) -> bytes:
        start = b"GET /b.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        return start + b"a" * (total - len(start) - 4) + b"\r\n\r\n"

    assert status_line(server.port, head_of(size)) in (b"HTTP/1.1 431 ", b"HTTP/1.1 400 ", b"")
    # A head just under the limit is answered.
    assert status_line(server.port, head_of(16 * 1024 - 64)) == b"HTTP/1.1 200 "
