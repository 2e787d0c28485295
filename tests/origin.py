"""An instrumented HTTP/1.1 origin server for the remotefs integration tests.

The remotefs daemon runs in its own process and downloads byte ranges from this server, which runs
in background threads of the pytest process.  The point of serving files ourselves instead of
using ``http.server`` as is: the tests need to know *exactly* which bytes left the server (to
assert things like "``unzip -l`` fetched less than 5 % of the archive" or "no block was downloaded
twice"), they need to stop and restart the origin on the same port to simulate outages, and later
tests subclass :class:`Origin` to inject faults.  Everything here is standard library only so the
helper works wherever the tests can run.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import html
import http.server
import os
import pathlib
import re
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from types import TracebackType
from typing import Any, Self

__all__ = [
    "CHUNK_SIZE",
    "Exchange",
    "Origin",
    "RangeNotSatisfiable",
    "RequestRecord",
    "make_etag",
    "parse_byte_range",
]

#: Largest single ``sendfile``/``send`` call.  Big enough that loopback throughput is limited by
#: the kernel rather than by Python, small enough that a stop() never waits on one huge syscall.
CHUNK_SIZE = 1 << 20

#: How often the accept loop checks for a stop request; bounds how long ``stop()`` takes.
_POLL_INTERVAL = 0.05

#: How long ``stop()`` waits for each connection thread after closing its socket.
_JOIN_TIMEOUT = 10.0

_Request = socket.socket | tuple[bytes, socket.socket]

# One byte-range-spec, nothing else: a comma (multi-range) or any other unit fails the match and
# the Range header is then ignored, which RFC 9110 §14.2 allows.  [0-9] with re.ASCII so that
# non-ASCII digits cannot sneak through int().
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class RequestRecord:
    """What the origin did for one request; the unit the tests count with."""

    method: str
    #: URL path without query, percent-decoded, e.g. ``"/big.zip"``.
    path: str
    #: The Range header exactly as received (``None`` if absent), even when it was ignored.
    range_header: str | None
    #: Status code sent; 0 if the connection ended before any response was started.
    status: int
    #: First byte of the file that was sent (``None`` if the response had no body).
    start: int | None
    #: One past the last byte actually written (``start + body_bytes``), so an aborted transfer
    #: shows only what really left the server.
    end: int | None
    #: Body bytes actually handed to the socket.
    body_bytes: int
    #: Request headers with lower-case names (repeated headers joined with ``", "``).
    headers: dict[str, str]


class RangeNotSatisfiable(Exception):
    """A syntactically valid Range that selects no byte of the file, answered with 416."""


def parse_byte_range(value: str, size: int) -> tuple[int, int] | None:
    """Interpret a Range header for a file of ``size`` bytes.

    Returns ``(start, end)`` with ``end`` exclusive, or ``None`` when the header must be ignored
    (malformed, another unit, ``last < first``, or several ranges: we serve single ranges only and
    RFC 9110 lets a server answer those with the full representation).  Raises
    :class:`RangeNotSatisfiable` when the range starts at or past the end of the file, which
    includes every range of an empty file and the suffix range ``bytes=-0``.
    """
    match = _RANGE_RE.fullmatch(value)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        if last:
            end = int(last) + 1
            if end <= start:
                return None
        else:
            end = size
        if start >= size:
            raise RangeNotSatisfiable(value)
        return start, min(end, size)
    if not last:
        return None
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable(value)
    return max(0, size - suffix), size


def make_etag(st: os.stat_result) -> str:
    """Strong ETag from size and nanosecond mtime.

    Derived from ``os.stat`` at request time so that a test which replaces a file between two
    requests gets a different validator, just like a real origin whose object changed.
    """
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


def _mtime_seconds(st: os.stat_result) -> int:
    """Whole seconds of mtime: the resolution of Last-Modified, used to compare If-Range dates."""
    return st.st_mtime_ns // 1_000_000_000


def _http_date(st: os.stat_result) -> str:
    return email.utils.formatdate(_mtime_seconds(st), usegmt=True)


def _if_match_allows(value: str, etag: str) -> bool:
    """RFC 9110 §13.1.1 with strong comparison: ``*`` or any listed tag equal to ours."""
    tags = [tag.strip() for tag in value.split(",")]
    return "*" in tags or etag in tags


def _if_range_allows(value: str, etag: str, st: os.stat_result) -> bool:
    """Whether If-Range lets the Range apply (RFC 9110 §13.1.5).

    An entity tag must match strongly (a weak tag never does); otherwise the value must be an HTTP
    date equal to our Last-Modified.  Anything unparsable counts as a mismatch, so the client gets
    the full, current representation rather than a range of something it may not have.
    """
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) == _mtime_seconds(st)


class Exchange:
    """One request and its response, plus the accounting that becomes its :class:`RequestRecord`.

    The ``Origin._send_*`` methods write responses only through this object, so that whatever a
    subclass does (send half a body, abort, stall) is still counted accurately.
    """

    def __init__(self, handler: _Handler) -> None:
        self.handler = handler
        self.method: str = handler.command
        raw_path = handler.path.partition("?")[0].partition("#")[0]
        self.path: str = urllib.parse.unquote(raw_path)
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.headers = headers
        self.range_header: str | None = handler.headers.get("Range")
        self.status = 0
        self.start: int | None = None
        self.body_bytes = 0

    @property
    def wants_body(self) -> bool:
        """False for HEAD, whose response carries GET's headers but no body."""
        return self.method != "HEAD"

    def send_head(self, status: int, headers: Mapping[str, str]) -> None:
        """Write the status line and headers (plus Date and Server) to the socket."""
        self.status = status
        handler = self.handler
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()

    def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset``, counting every byte the kernel took.

        ``os.sendfile`` keeps the data out of Python so hundreds of MB/s are possible on loopback;
        looping over bounded chunks (instead of one ``socket.sendfile``) is what lets us know how
        much was written when the peer goes away mid-body.  If the file shrank under us the
        connection is marked for closing, because the promised Content-Length can no longer be met.
        """
        if self.start is None:
            self.start = offset
        sock = self.handler.connection
        position, end = offset, offset + count
        use_sendfile = hasattr(os, "sendfile")
        while position < end:
            want = min(end - position, CHUNK_SIZE)
            if use_sendfile:
                try:
                    sent = os.sendfile(sock.fileno(), fd, position, want)
                except OSError as exc:
                    # Some file systems cannot sendfile; fall back before anything was sent.
                    if position == offset and exc.errno in (errno.EINVAL, errno.ENOSYS):
                        use_sendfile = False
                        continue
                    raise
            else:
                # A partial send() is fine: the next round re-reads from the new position.
                data = os.pread(fd, want, position)
                sent = sock.send(data) if data else 0
            if sent == 0:
                self.handler.close_connection = True
                return
            position += sent
            self.body_bytes += sent

    def abort(self) -> None:
        """Reset the connection now (RST, not FIN): the fault a subclass usually wants to inject.

        Later writes on this exchange raise ``OSError``, which the origin treats as a broken
        connection, so a ``_send_*`` override may simply return or keep going.
        """
        self.handler.close_connection = True
        sock: socket.socket = self.handler.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def record(self) -> RequestRecord:
        """Freeze the accounting into the immutable record the tests see."""
        end = None if self.start is None else self.start + self.body_bytes
        return RequestRecord(
            method=self.method,
            path=self.path,
            range_header=self.range_header,
            status=self.status,
            start=self.start,
            end=end,
            body_bytes=self.body_bytes,
            headers=dict(self.headers),
        )


class _Handler(http.server.BaseHTTPRequestHandler):
    """Thin adaptor: parses HTTP with the standard library and lets the Origin answer."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate syscalls; without TCP_NODELAY a small range body can
    # sit in Nagle's buffer until the client's delayed ACK, i.e. ~40 ms per request.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.server.origin._handle(self)

    def do_HEAD(self) -> None:
        self.server.origin._handle(self)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler answers unknown methods with 501 by probing for do_<METHOD>;
        # route every method to the Origin instead so it can answer 405 and record the request.
        if name.startswith("do_"):
            return self.do_GET
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging; the tests read ``Origin.requests`` instead."""


class _Server(socketserver.TCPServer):
    """TCP server that tracks its connections and their threads so ``stop()`` can end them all.

    ``ThreadingMixIn`` does not remember daemon threads and never closes idle keep-alive
    connections, but an outage simulation needs both: clients must see their connections die and
    the test must not leave threads behind.
    """

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, origin: Origin, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler, bind_and_activate=False)
        self.origin = origin
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = False
        try:
            self.server_bind()
        except BaseException:
            self.server_close()
            raise

    def process_request(self, request: _Request, client_address: Any) -> None:
        assert isinstance(request, socket.socket)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"origin-{self.server_address[1]}-conn",
            daemon=True,
        )
        with self._lock:
            closing = self._closing
            if not closing:
                self._connections.add(request)
                self._threads.add(thread)
        if closing:
            self.shutdown_request(request)
            return
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown_request(self, request: _Request) -> None:
        # Forget the socket under the lock before closing it, so close_connections() never calls
        # shutdown() on a descriptor number that may already belong to another socket.
        with self._lock:
            if isinstance(request, socket.socket):
                self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: _Request, client_address: Any) -> None:
        """Stay quiet about connections the peer (or ``stop()``) broke; report real bugs."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open connection; their threads then see EOF/EPIPE and exit."""
        with self._lock:
            self._closing = True
            for sock in self._connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def join_threads(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class Origin:
    """A real HTTP/1.1 server on ``host`` that serves the regular files under ``root``.

    URL path ``/a/b.bin`` maps to ``root/"a"/"b.bin"``; files are opened and stat'ed per request,
    so tests may replace them at any time.  GET and HEAD are supported with single byte ranges,
    If-Range and If-Match; every request is recorded (see :class:`RequestRecord`) once its response
    has finished or its connection broke.

    Fault injection: subclass and override ``_send_full``, ``_send_range``, ``_send_unsatisfiable``,
    ``_send_not_found``, ``_send_precondition_failed`` or ``_send_method_not_allowed``; write
    through the :class:`Exchange` passed in so counting stays exact.  ``delay`` adds latency.
    """

    def __init__(self, root: pathlib.Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = pathlib.Path(root)
        self.host = host
        #: Seconds to wait before answering each request; ``stop()`` cuts the wait short.
        self.delay: float = 0.0
        #: Answer a GET of a directory (a path ending in "/") with a page of links to its
        #: entries, as a web server's autoindex does; off: 404, as for any non-file.
        self.listings = False
        self._port = port
        self._records: list[RequestRecord] = []
        self._in_flight = 0
        self._records_cond = threading.Condition()
        self._state_lock = threading.Lock()
        self._server: _Server | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def _bind(self) -> _Server:
        server = _Server(self, (self.host, self._port))
        self._port = server.server_address[1]
        return server

    @property
    def port(self) -> int:
        """The TCP port, fixed for the Origin's lifetime.

        With ``port=0`` the first access (or ``start()``) binds a free port.  Until ``start()``
        the socket is bound but not listening, so the port is reserved and connections to it are
        refused, exactly as while stopped.
        """
        if self._port == 0:
            with self._state_lock:
                if self._port == 0:
                    self._server = self._bind()
        return self._port

    def start(self) -> None:
        """Start listening (again) on the same port; a no-op if already running."""
        with self._state_lock:
            if self._accept_thread is not None:
                return
            server = self._server if self._server is not None else self._bind()
            self._server = None
            try:
                server.server_activate()
            except BaseException:
                server.server_close()
                raise
            self._server = server
            self._stopping.clear()
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"origin-{self._port}-accept",
                daemon=True,
            )
            thread.start()
            self._accept_thread = thread

    def stop(self) -> None:
        """Stop listening and kill every open connection, including idle keep-alive ones.

        Afterwards new connections are refused and existing ones see EOF or a reset, which is what
        an outage looks like to the daemon.  Joins all server threads; safe to call repeatedly,
        before ``start()``, or from inside a ``_send_*`` override.
        """
        with self._state_lock:
            server, thread = self._server, self._accept_thread
            self._server = self._accept_thread = None
            if server is None:
                return
            self._stopping.set()
            if thread is not None:
                # Shutting the listening socket down wakes the accept loop at once (on Linux)
                # instead of after up to one poll interval; fifty stops then cost ~nothing.
                with contextlib.suppress(OSError):
                    server.socket.shutdown(socket.SHUT_RDWR)
                server.shutdown()
                thread.join()
            server.server_close()
            server.close_connections()
            server.join_threads(_JOIN_TIMEOUT)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, name: str) -> str:
        """Absolute URL of ``name`` (relative to root); percent-quoted, ``/`` kept."""
        quoted = urllib.parse.quote(name.removeprefix("/"), safe="/")
        return f"http://{self.host}:{self.port}/{quoted}"

    # -- counters ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of all records so far, oldest first."""
        with self._records_cond:
            return list(self._records)

    def reset_counters(self) -> None:
        """Forget all records, e.g. after a warm-up phase."""
        with self._records_cond:
            self._records.clear()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being answered; returns False on timeout.

        A client can hold the last byte of a response before the server thread has appended the
        record, so a test should call this before asserting on the counters.
        """
        with self._records_cond:
            return self._records_cond.wait_for(lambda: self._in_flight == 0, timeout)

    def _matching(self, path: str | None) -> list[RequestRecord]:
        # Records hold decoded paths; accept the quoted spelling as well for convenience.
        wanted = None if path is None else {path, urllib.parse.unquote(path)}
        return [
            r for r in self.requests if r.method == "GET" and (wanted is None or r.path in wanted)
        ]

    def bytes_served(self, path: str | None = None) -> int:
        """Total GET body bytes written, for all paths or for one URL path."""
        return sum(r.body_bytes for r in self._matching(path))

    def served_ranges(self, path: str) -> list[tuple[int, int]]:
        """``[start, end)`` actually written by every GET of ``path``, in request order."""
        return [
            (r.start, r.end)
            for r in self._matching(path)
            if r.start is not None and r.end is not None
        ]

    # -- request handling --------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        """Answer one request and record it, whatever happens to the connection meanwhile."""
        exchange = Exchange(handler)
        with self._records_cond:
            self._in_flight += 1
        try:
            if self.delay > 0 and self._stopping.wait(self.delay):
                handler.close_connection = True  # stopped while delaying: just drop the request
                return
            self._respond(exchange)
        except OSError:
            handler.close_connection = True  # peer went away or the exchange was aborted
        finally:
            with self._records_cond:
                self._records.append(exchange.record())
                self._in_flight -= 1
                self._records_cond.notify_all()

    def _open(self, url_path: str) -> tuple[int, os.stat_result] | None:
        """Open the regular file for ``url_path``; ``None`` means 404 (also for ``..`` tricks)."""
        if not url_path.startswith("/") or "\0" in url_path:
            return None
        parts = [part for part in url_path.split("/") if part]
        if any(part in (".", "..") for part in parts):
            return None
        try:
            # O_NONBLOCK: never hang the handler on a FIFO someone put under root.
            fd = os.open(self.root.joinpath(*parts), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st

    def _respond(self, ex: Exchange) -> None:
        if ex.method not in ("GET", "HEAD"):
            self._send_method_not_allowed(ex)
            return
        opened = self._open(ex.path)
        if opened is None:
            if self.listings and ex.path.endswith("/") and self._send_index(ex):
                return
            self._send_not_found(ex)
            return
        fd, st = opened
        try:
            if_match = ex.headers.get("if-match")
            if if_match is not None and not _if_match_allows(if_match, make_etag(st)):
                self._send_precondition_failed(ex, st)
                return
            try:
                byte_range = self._select_range(ex, st)
            except RangeNotSatisfiable:
                self._send_unsatisfiable(ex, st)
                return
            if byte_range is None:
                self._send_full(ex, fd, st)
            else:
                self._send_range(ex, fd, st, *byte_range)
        finally:
            os.close(fd)

    def _select_range(self, ex: Exchange, st: os.stat_result) -> tuple[int, int] | None:
        """The range to serve, ``None`` for the full body; may raise RangeNotSatisfiable.

        Range applies to GET only (RFC 9110 §14.2: a server MUST ignore it for other methods, and
        HEAD is one of them), and If-Range is evaluated first so that a stale validator yields the
        full current body even when the range would be unsatisfiable.
        """
        if ex.method != "GET" or ex.range_header is None:
            return None
        if_range = ex.headers.get("if-range")
        if if_range is not None and not _if_range_allows(if_range, make_etag(st), st):
            return None
        return parse_byte_range(ex.range_header, st.st_size)

    def _representation_headers(self, st: os.stat_result) -> dict[str, str]:
        return {
            "Accept-Ranges": "bytes",
            "ETag": make_etag(st),
            "Last-Modified": _http_date(st),
            "Content-Type": "application/octet-stream",
        }

    def _send_full(self, ex: Exchange, fd: int, st: os.stat_result) -> None:
        """200 with the whole file."""
        headers = self._representation_headers(st)
        headers["Content-Length"] = str(st.st_size)
        ex.send_head(200, headers)
        if ex.wants_body:
            self._send_body(ex, fd, 0, st.st_size)

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        """206 with bytes ``[start, end)`` of the file."""
        headers = self._representation_headers(st)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
        headers["Content-Length"] = str(end - start)
        ex.send_head(206, headers)
        if ex.wants_body:
            self._send_body(ex, fd, start, end - start)

    def _send_body(self, ex: Exchange, fd: int, offset: int, count: int) -> None:
        """Write ``count`` bytes of the file from ``offset``; the hook a shaper overrides."""
        ex.send_file(fd, offset, count)

    def _send_unsatisfiable(self, ex: Exchange, st: os.stat_result) -> None:
        """416 telling the client the current size."""
        headers = self._representation_headers(st)
        headers["Content-Range"] = f"bytes */{st.st_size}"
        headers["Content-Length"] = "0"
        ex.send_head(416, headers)

    def _send_precondition_failed(self, ex: Exchange, st: os.stat_result) -> None:
        """412 for a failed If-Match; carries the current ETag to help debugging."""
        ex.send_head(412, {"ETag": make_etag(st), "Content-Length": "0"})

    def _send_index(self, ex: Exchange) -> bool:
        """A page of links to the entries of the directory at ``ex.path``; False if none."""
        parts = [part for part in ex.path.split("/") if part]
        if any(part in (".", "..") for part in parts):
            return False
        directory = self.root.joinpath(*parts)
        if not directory.is_dir() or directory.is_symlink():
            return False
        links = "".join(
            f'<a href="{urllib.parse.quote(entry.name)}{"/" if entry.is_dir() else ""}">'
            f"{html.escape(entry.name)}</a>\n"
            for entry in sorted(directory.iterdir())
        )
        body = f"<html><body>\n{links}</body></html>\n".encode()
        ex.send_head(200, {"Content-Type": "text/html", "Content-Length": str(len(body))})
        if ex.wants_body:
            ex.handler.wfile.write(body)
            ex.body_bytes += len(body)
        return True

    def _send_not_found(self, ex: Exchange) -> None:
        """404 with an empty body, so error responses never count as served bytes."""
        ex.send_head(404, {"Content-Length": "0"})

    def _send_method_not_allowed(self, ex: Exchange) -> None:
        """405; closes the connection because a request body (if any) was not read."""
        ex.send_head(405, {"Allow": "GET, HEAD", "Content-Length": "0", "Connection": "close"})
