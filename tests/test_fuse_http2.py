"""HTTP/2 through a real mount: an h2-capable TLS origin (hypercorn) on 127.0.0.1.

The origin records the HTTP version of every request, so the test proves HTTP/2 was used
(and that ``--no-http2`` keeps HTTP/1.1), and that ranges over HTTP/2 give the right bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from .conftest import write_random
from .mounting import MountFactory
from .origin import make_etag, parse_byte_range
from .test_fuse_tls_and_secrets import make_certificate


class H2Origin:
    """A minimal ASGI file server with single ranges and If-Range, served by hypercorn."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        self.root = root
        self.versions: list[tuple[str, str | None, int]] = []  # (http_version, range, status)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._config = Config()
        self._config.bind = [f"127.0.0.1:{self.port}"]
        self._config.certfile, self._config.keyfile = str(cert), str(key)
        self._config.alpn_protocols = ["h2", "http/1.1"]
        self._config.accesslog = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/{name}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self._started.set()
            await serve(self._app, self._config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

        self._loop.run_until_complete(main())

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(10)
        for _ in range(200):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                threading.Event().wait(0.05)
        raise AssertionError("hypercorn did not start")

    def stop(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = self.root / scope["path"].lstrip("/")
        status, body, extra = 404, b"", {}
        if path.is_file():
            st = os.stat(path)
            data = path.read_bytes()
            extra = {"etag": make_etag(st), "accept-ranges": "bytes"}
            wanted = headers.get("range")
            if_range = headers.get("if-range")
            byte_range = None
            if wanted and (if_range is None or if_range == make_etag(st)):
                byte_range = parse_byte_range(wanted, len(data))
            if byte_range is None:
                status, body = 200, data
            else:
                start, end = byte_range
                status, body = 206, data[start:end]
                extra["content-range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self.versions.append((scope["http_version"], headers.get("range"), status))
        extra["content-length"] = str(len(body))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in extra.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def h2_origin(origin_root: Path, tmp_path: Path) -> Iterator[H2Origin]:
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_certificate(certs)
    server = H2Origin(origin_root, cert, key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_http2_is_used_when_the_server_offers_it(
    h2_origin: H2Origin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    data = write_random(origin_root / "f.bin", 3 * 1024 * 1024 + 123, seed=51)
    cert = str(tmp_path / "certs" / "cert.pem")
    mount = remotefs.mount([h2_origin.url("f.bin")], "--ca-bundle", cert, cache_dir=tmp_path / "c1")
    with open(mount.path / "f.bin", "rb") as f:  # a random read, then everything
        f.seek(2 * 1024 * 1024 + 5)
        assert f.read(1000) == data[2 * 1024 * 1024 + 5 : 2 * 1024 * 1024 + 1005]
    assert (mount.path / "f.bin").read_bytes() == data
    mount.unmount()
    assert h2_origin.versions, "the origin saw no request"
    assert {version for version, _, _ in h2_origin.versions} == {"2"}, h2_origin.versions
    assert all(status == 206 for _, _, status in h2_origin.versions), h2_origin.versions

    h2_origin.versions.clear()
    mount = remotefs.mount(
        [h2_origin.url("f.bin")],
        "--ca-bundle",
        cert,
        "--no-http2",
        cache_dir=tmp_path / "c2",
        mountpoint=tmp_path / "mnt2",
    )
    assert (mount.path / "f.bin").read_bytes() == data
    mount.unmount()
    assert {version for version, _, _ in h2_origin.versions} == {"1.1"}, h2_origin.versions
