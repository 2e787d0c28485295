"""An origin of virtual files: any size (16 TiB, 2^63), any number (100,000), nothing on disk.

The file-backed `Origin` serves what is on disk, which cannot be a 16 TiB file on ext4 nor
100,000 files made in a second. Here each file is a size and a seed, and its bytes are a
function of the offset (a random pattern of a prime length, shifted by the seed), so a
reader can check any byte it got (`expected`) without a copy. It speaks plain HTTP/1.1 with
keep-alive on asyncio, fast enough for the scale benchmark (about 10,000 requests per second
from one core), and it can lie: announce another size in the probe than in data answers,
an impossible size, or a negative one.

Run it in a thread (`VirtualOrigin` as a context manager, for tests) or as its own process
(``python -m tests.virtual_origin --files N --delay SEC``, for the benchmark, which must not
share a core with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

#: Length of the byte pattern: prime, so no block size or readahead step is a multiple of it.
PATTERN_LENGTH = (1 << 20) + 7
_PATTERN = random.Random(20261130).randbytes(PATTERN_LENGTH)
_DOUBLE = _PATTERN + _PATTERN
LAST_MODIFIED = "Mon, 30 Nov 2026 00:00:00 GMT"


def expected(seed: int, offset: int, length: int) -> bytes:
    """The bytes ``[offset, offset+length)`` of a virtual file with *seed*."""
    out = bytearray()
    position = (offset + seed) % PATTERN_LENGTH
    while len(out) < length:
        take = min(length - len(out), PATTERN_LENGTH)
        out += _DOUBLE[position : position + take]
        position = (position + take) % PATTERN_LENGTH
    return bytes(out)


@dataclass
class VirtualFile:
    """One file: its real size, and what the origin claims about it."""

    size: int
    seed: int = 0
    etag: str = '"v1"'
    #: The total sent in a probe's Content-Range instead of the size (a lie), or None.
    probe_total: str | None = None
    #: The total sent in data answers' Content-Range instead of the size, or None.
    data_total: str | None = None
    #: Answer Range requests (False: 200 with the whole body).
    ranges: bool = True
    #: Sent as Cache-Control, when set (max-age=5, no-cache, no-store).
    cache_control: str | None = None
    #: Sent as Expires (with a Date of now), when set: seconds from now.
    expires_in: float | None = None


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    #: Body bytes of data answers (a probe's one byte is not counted here).
    body_bytes: Counter[str] = field(default_factory=Counter)
    #: ``bytes=0-0`` requests answered.
    probes: Counter[str] = field(default_factory=Counter)
    #: Requests with If-None-Match or If-Modified-Since, and those answered 304.
    conditional: Counter[str] = field(default_factory=Counter)
    not_modified: Counter[str] = field(default_factory=Counter)
    #: The most requests in flight at once (after any delay, while answering).
    max_in_flight: int = 0


class VirtualOrigin:
    """Serves ``/NAME`` for every file in `files` (add or change them at any time)."""

    def __init__(self, delay: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.files: dict[str, VirtualFile] = {}
        self.delay = delay
        self.host = host
        self.port = port
        self.stats = Stats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._in_flight = 0

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name}"

    def requests(self, name: str | None = None) -> int:
        with self._lock:
            return self.stats.requests[name] if name else sum(self.stats.requests.values())

    def body_bytes(self, name: str | None = None) -> int:
        with self._lock:
            return self.stats.body_bytes[name] if name else sum(self.stats.body_bytes.values())

    def conditional(self, name: str | None = None) -> int:
        with self._lock:
            counter = self.stats.conditional
            return counter[name] if name else sum(counter.values())

    def not_modified(self, name: str | None = None) -> int:
        with self._lock:
            counter = self.stats.not_modified
            return counter[name] if name else sum(counter.values())

    def probes(self, name: str | None = None) -> int:
        with self._lock:
            return self.stats.probes[name] if name else sum(self.stats.probes.values())

    def reset_counters(self) -> None:
        with self._lock:
            self.stats = Stats()

    # -- running -------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="virtual-origin", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the virtual origin did not start")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._connection, self.host, self.port, backlog=4096)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def serve_forever(self) -> None:
        """Serve in the current asyncio loop until cancelled (the command-line form)."""
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]
        print(self.port, flush=True)
        async with self._server:
            await self._server.serve_forever()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" "), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                self._in_flight += 1
                with self._lock:
                    self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
                try:
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    keep = await self._respond(writer, method, target, headers)
                finally:
                    self._in_flight -= 1
                await writer.drain()
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(
        self, writer: asyncio.StreamWriter, method: str, target: str, headers: dict[str, str]
    ) -> bool:
        name = target.split("?", 1)[0].lstrip("/")
        with self._lock:
            self.stats.requests[name] += 1
        file = self.files.get(name)
        if file is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return True
        common = (
            f"ETag: {file.etag}\r\nLast-Modified: {LAST_MODIFIED}\r\n"
            "Content-Type: application/octet-stream\r\n"
        )
        if file.cache_control is not None:
            common += f"Cache-Control: {file.cache_control}\r\n"
        if file.expires_in is not None:
            now = time.time()
            common += f"Date: {_http_date(now)}\r\nExpires: {_http_date(now + file.expires_in)}\r\n"
        none_match, modified_since = headers.get("if-none-match"), headers.get("if-modified-since")
        if none_match is not None or modified_since is not None:
            with self._lock:
                self.stats.conditional[name] += 1
            unchanged = (
                none_match in ("*", file.etag)
                if none_match is not None
                else modified_since == LAST_MODIFIED
            )
            if unchanged:
                with self._lock:
                    self.stats.not_modified[name] += 1
                writer.write(f"HTTP/1.1 304 Not Modified\r\n{common}\r\n".encode())
                return True
        wanted = headers.get("range") if file.ranges else None
        if_range = headers.get("if-range")
        if wanted and if_range and if_range not in (file.etag, LAST_MODIFIED):
            wanted = None  # changed since: the whole body
        span = _parse_range(wanted, file.size) if wanted else None
        if span is None or isinstance(span, str):
            if span == "unsatisfiable":
                writer.write(
                    f"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{file.size}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                return True
            head = f"HTTP/1.1 200 OK\r\n{common}Content-Length: {file.size}\r\n"
            writer.write((head + "Accept-Ranges: bytes\r\n\r\n").encode())
            if method != "HEAD":
                await self._body(writer, name, file, 0, file.size)
            return True
        start, end = span
        probe = start == 0 and end == 1
        total = (file.probe_total if probe else file.data_total) or str(file.size)
        writer.write(
            (
                f"HTTP/1.1 206 Partial Content\r\n{common}Accept-Ranges: bytes\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{total}\r\n"
                f"Content-Length: {end - start}\r\n\r\n"
            ).encode()
        )
        if probe:
            with self._lock:
                self.stats.probes[name] += 1
            writer.write(expected(file.seed, 0, 1))
        elif method != "HEAD":
            await self._body(writer, name, file, start, end)
        return True

    async def _body(
        self, writer: asyncio.StreamWriter, name: str, file: VirtualFile, start: int, end: int
    ) -> None:
        position = start
        while position < end:
            take = min(end - position, 1 << 20)
            writer.write(expected(file.seed, position, take))
            await writer.drain()
            position += take
            with self._lock:
                self.stats.body_bytes[name] += take


def _http_date(when: float) -> str:
    return email.utils.formatdate(when, usegmt=True)


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end)`` of a single ``bytes=`` range, "unsatisfiable", or None (ignore it)."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first:
            start = int(first)
            end = int(last) + 1 if last else size
        else:
            start, end = max(0, size - int(last)), size
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=0, help="serve f000000.bin ... (1 MiB each)")
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    origin = VirtualOrigin(delay=args.delay, port=args.port)
    for index in range(args.files):
        origin.files[f"f{index:06d}.bin"] = VirtualFile(args.size, seed=index)
    started = time.monotonic()
    try:
        asyncio.run(origin.serve_forever())
    except KeyboardInterrupt:
        pass
    finally:
        sys.stderr.write(
            f"virtual origin: {origin.requests()} requests in {time.monotonic() - started:.0f}s\n"
        )


if __name__ == "__main__":
    main()
