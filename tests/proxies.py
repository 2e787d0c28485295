"""Two small proxies on 127.0.0.1 for the proxy tests: an HTTP forward proxy and SOCKS5.

Both count what went through them, so a test can prove the daemon really used the proxy.
They run in daemon threads of the pytest process; ``stop()`` closes every socket and joins.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import select
import socket
import socketserver
import struct
import threading
import urllib.parse
from typing import Any

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, handler: type[socketserver.BaseRequestHandler], owner: Any) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connections the peer or stop() broke are not errors."""


class _Running:
    """Start/stop plumbing shared by both proxies."""

    handler: type[socketserver.BaseRequestHandler]

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._server = _ThreadingServer(self.handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)
        self._server.server_close()
        with self._server.lock:
            for sock in list(self._server.sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _ForwardHandler(http.server.BaseHTTPRequestHandler):
    """Forwards ``GET http://host:port/path`` (absolute URI) to the origin, one by one."""

    protocol_version = "HTTP/1.1"
    server: _ThreadingServer

    def do_GET(self) -> None:
        proxy: HttpForwardProxy = self.server.owner
        target = urllib.parse.urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self.send_error(400, "absolute http:// URI expected")
            return
        with proxy.lock:
            proxy.requests.append(self.path)
            proxy.proxy_authorizations.append(self.headers.get("Proxy-Authorization"))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=30)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            upstream.request("GET", path or "/", headers=headers)
            response = upstream.getresponse()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.end_headers()
            while chunk := response.read(256 * 1024):
                self.wfile.write(chunk)
        finally:
            upstream.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class HttpForwardProxy(_Running):
    """A plain-HTTP forward proxy; ``requests`` lists every absolute URI it forwarded."""

    handler = _ForwardHandler

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.proxy_authorizations: list[str | None] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Socks5Handler(socketserver.BaseRequestHandler):
    """SOCKS5 (RFC 1928), no authentication, CONNECT only, then a byte relay."""

    server: _ThreadingServer

    def handle(self) -> None:
        proxy: Socks5Proxy = self.server.owner
        client: socket.socket = self.request
        client.settimeout(30)
        version, count = _read_exact(client, 2)
        methods = _read_exact(client, count)
        if version != 5 or 0 not in methods:
            client.sendall(b"\x05\xff")
            return
        client.sendall(b"\x05\x00")
        version, command, _reserved, kind = _read_exact(client, 4)
        if kind == 1:
            host = socket.inet_ntoa(_read_exact(client, 4))
        elif kind == 3:
            host = _read_exact(client, _read_exact(client, 1)[0]).decode()
        else:
            client.sendall(b"\x05\x08\x00\x01" + bytes(6))  # address type not supported
            return
        (port,) = struct.unpack("!H", _read_exact(client, 2))
        if version != 5 or command != 1:
            client.sendall(b"\x05\x07\x00\x01" + bytes(6))  # command not supported
            return
        try:
            upstream = socket.create_connection((host, port), timeout=10)
        except OSError:
            client.sendall(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        with proxy.lock:
            proxy.connections.append((host, port))
        with upstream:
            client.sendall(b"\x05\x00\x00\x01" + bytes(6))
            _relay(client, upstream, proxy)


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _relay(a: socket.socket, b: socket.socket, proxy: Socks5Proxy) -> None:
    """Copy bytes both ways until either side closes (or 30 s of silence)."""
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 30)
        if not readable:
            return
        for sock in readable:
            data = sock.recv(256 * 1024)
            if not data:
                return
            peers[sock].sendall(data)
            if sock is b:
                with proxy.lock:
                    proxy.bytes_relayed += len(data)


class Socks5Proxy(_Running):
    """``connections`` lists the (host, port) of every CONNECT it relayed."""

    handler = _Socks5Handler

    def __init__(self) -> None:
        self.connections: list[tuple[str, int]] = []
        self.bytes_relayed = 0
        super().__init__()
