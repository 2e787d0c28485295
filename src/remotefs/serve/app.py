"""The HTTP door: an ASGI app over the daemon's tree of names and the engine, and a `Door`.

One request, as the engine sees it, is one open handle: the file is revalidated first when
it is stale (``engine.ensure_fresh``, as an open of the mount does), its version is the one
the response serves from start to end, and bytes come through ``engine.read``, so a block is
fetched once whoever asks (another request, the mount, background fill).

* **Streaming.** A body goes out in pieces as their blocks arrive: a piece is the cached run
  at the current position (up to `PIECE`), or, when the next block is not cached, just that
  block, so the first byte of a range leaves as soon as its block is cached. Each piece is
  sent before the next is read, and hypercorn's send returns once the socket took it:
  a slow client slows the reads (backpressure), nothing is buffered beyond a piece.
* **Disconnects.** A task per request waits for ``http.disconnect`` and cancels the request
  at once: its handle is closed, its reads stop (downloads other readers share go on).
* **Remote changes.** Every response registers under the version it serves; when the engine
  swaps that version for a new one (`swap`), the response is cancelled, and a read of a
  retired version fails anyway. A response that already started then ends by closing the
  connection before its declared length: the app shuts its socket down
  (`remotefs.serve.server.Connections`; hypercorn would close an HTTP/1.1 connection whose
  body is incomplete by itself, but leave an HTTP/2 stream open), so a client never gets
  bytes of two versions in one body. Before the headers went out, the request starts again
  on the new version.
* **Safety.** Only names of the tree are served (no file system path, no URL from the
  request, and no request header ever reaches an origin). With a token, every request must
  carry it (``Authorization: Bearer`` or ``?token=``); without one (loopback only), the
  ``Host`` must be a loopback name, so a web page cannot reach the server through DNS
  rebinding. Files go out with ``Content-Security-Policy: sandbox`` and ``nosniff``: an HTML
  file of an origin cannot script the server's other pages.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import mimetypes
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from pyroaring import BitMap

from .. import __version__
from ..cache.cached_file import CachedFile
from ..cache.engine import RemoteCache
from ..cache.fetcher import ReadError
from ..fuse.tree import DirNode, FileNode, Tree
from . import pages
from .listen import MAX_HEAD
from .ranges import (
    ByteRange,
    Unsatisfiable,
    Validators,
    multipart_lengths,
    parse_range,
    preconditions,
    range_applies,
)

log = logging.getLogger(__name__)

#: The largest piece read and sent at once (the FUSE mount's largest kernel read, too).
PIECE = 1 << 20
#: The reserved name: urls.txt may not use it (`remotefs.config.manifest`).
RESERVED = "_remotefs"
#: How often a request starts again when the file changes while it is being answered.
VERSION_TRIES = 3

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
StatusSource = Callable[[bool], dict[str, Any]]


@dataclass
class Request:
    """What the app reads of one HTTP request."""

    method: str
    raw_path: bytes
    headers: dict[str, str]
    query: dict[str, list[str]]
    #: The client's address, which names its connection (`Connections.cut`).
    client: tuple[str, int] | None = None
    #: The size of the request's head as HTTP/1.1 writes it (request line, header lines).
    head_size: int = 0

    @classmethod
    def from_scope(cls, scope: Scope) -> Request:
        headers: dict[str, str] = {}
        raw_path = bytes(scope.get("raw_path") or scope["path"].encode())
        raw_query = bytes(scope.get("query_string", b""))
        # "GET /path?query HTTP/1.1\r\n", "Name: value\r\n" each, and the blank line.
        head_size = len(scope["method"]) + len(raw_path) + len(raw_query) + 1 + 12 + 2
        for name, value in scope["headers"]:
            key = bytes(name).decode("latin-1").lower()
            text = bytes(value).decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
            head_size += len(name) + len(value) + 4
        return cls(
            method=scope["method"],
            raw_path=raw_path,
            headers=headers,
            query=urllib.parse.parse_qs(raw_query.decode("latin-1"), keep_blank_values=True),
            client=tuple(scope["client"]) if scope.get("client") else None,
            head_size=head_size,
        )


class _Sender:
    """Sends one response; the status line and headers go out with the first body bytes.

    Until then nothing is on the wire, so a failure before the first byte can still become
    an error status instead of a cut connection.
    """

    def __init__(self, send: Send, status: int, headers: Headers) -> None:
        self._send = send
        self._status = status
        self._headers = headers
        self._literals: list[bytes] = []
        self.started = False

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self._send(
                {"type": "http.response.start", "status": self._status, "headers": self._headers}
            )
            for literal in self._literals:
                await self._send({"type": "http.response.body", "body": literal, "more_body": True})
            self._literals.clear()

    async def literal(self, data: bytes) -> None:
        """Bytes of the body that are not file data (multipart part headers)."""
        if self.started:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
        else:
            self._literals.append(data)

    async def data(self, data: bytes) -> None:
        await self._start()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self) -> None:
        await self._start()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class _Changed(Exception):
    """The version being served was replaced before the response started: serve the new one."""


@dataclass
class Statistics:
    """Figures of the HTTP door for ``remotefs status --json`` (``daemon.http``)."""

    requests: int = 0
    responses_in_flight: int = 0
    aborted: int = 0
    bytes_sent: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class HttpDoor:
    """The ASGI app of the HTTP server, and its `Door` onto the engine."""

    def __init__(
        self,
        tree: Tree,
        engine: RemoteCache,
        *,
        token: str | None,
        status: StatusSource,
        pending: Callable[[tuple[str, ...]], bool] = lambda path: False,
        cut: Callable[[tuple[str, int] | None], None] = lambda client: None,
    ) -> None:
        self._tree = tree
        #: Ends the connection of a client at once (`remotefs.serve.server.Connections`).
        self._cut = cut
        self._engine = engine
        self._token = token
        self._status = status
        self._pending = pending
        #: Responses in flight per version they serve: a swap cancels them.
        self._responses: dict[CachedFile, set[trio.CancelScope]] = {}
        self.stats = Statistics()
        #: Where the server listens (``http://127.0.0.1:8080``), once it does.
        self.addresses: list[str] = []

    # -- the Door ------------------------------------------------------------------------------

    def available(self, url: str, cached: CachedFile) -> None:
        """Nothing to do: the daemon lists it in the tree, which is where requests look."""

    def swap(self, old: CachedFile, new: CachedFile) -> None:
        """End every response that serves *old* (no await: the swap is synchronous)."""
        for scope in self._responses.pop(old, ()):
            scope.cancel()

    async def settle(self, old: CachedFile) -> None:
        """Nothing is cached of *old* outside the engine."""

    async def discard_pages(self, cached: CachedFile) -> None:
        """Nothing is cached of a file's bytes outside the engine."""

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: hypercorn closes the connection
        self.stats.requests += 1
        request = Request.from_scope(scope)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
            try:
                await self._respond(request, send)
            except Exception:
                log.exception("internal error answering %s", _shown(request))
            finally:
                nursery.cancel_scope.cancel()

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
        """Cancel the request as soon as its client goes away."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    # -- routing -------------------------------------------------------------------------------

    async def _respond(self, request: Request, send: Send) -> None:
        if request.head_size > MAX_HEAD:
            # h11 bounds only a head that arrives in parts; one sent at once is whole.
            self._refused("head")
            text = f"The request's head is larger than {MAX_HEAD // 1024} KiB."
            await _simple(send, request, 431, pages.message_html(431, "Too Large", text))
            return
        if not _plain_host(request.headers.get("host")):
            self._refused("host")
            text = "The Host header must be a plain host name or address, with a port or not."
            await _simple(send, request, 400, pages.message_html(400, "Bad Request", text))
            return
        if not self._authorized(request):
            self._refused("token")
            await _simple(
                send,
                request,
                401,
                pages.message_html(401, "Unauthorized", "This server needs its token."),
                [(b"www-authenticate", b'Bearer realm="remotefs"')],
            )
            return
        if self._token is None and not _loopback_host(request.headers.get("host")):
            self._refused("host")
            text = "Without a token, this server answers only requests to a loopback host."
            await _simple(send, request, 403, pages.message_html(403, "Forbidden", text))
            return
        if request.method not in ("GET", "HEAD"):
            self._refused("method")
            await _simple(
                send,
                request,
                405,
                pages.message_html(405, "Method Not Allowed", "Only GET and HEAD."),
                [(b"allow", b"GET, HEAD")],
            )
            return
        parts = _path_parts(request.raw_path)
        if parts is None:
            await self._not_found(send, request)
            return
        directory = request.raw_path.endswith(b"/")
        names = tuple(part for part in parts if part)
        if names and names[0] == RESERVED:
            await self._reserved(send, request, names[1:])
            return
        node = self._tree.find(names)
        if node is None:
            if self._pending(names):
                text = "Its origin has not answered yet; try again soon."
                body = pages.message_html(503, "Not Available Yet", text)
                await _simple(send, request, 503, body, [(b"retry-after", b"5")])
                return
            await self._not_found(send, request)
            return
        if isinstance(node, DirNode):
            if not directory:
                location = pages.quote_path(names, directory=True) + _query_suffix(request)
                await _simple(send, request, 302, b"", [(b"location", location.encode())])
                return
            await self._index(send, request, names, node)
            return
        if directory:
            await self._not_found(send, request)
            return
        await self._file(send, request, names, node)

    def _authorized(self, request: Request) -> bool:
        token = self._token
        if token is None:
            return True
        expected = token.encode()
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), expected
        ):
            return True
        return any(
            hmac.compare_digest(value.encode("utf-8", "replace"), expected)
            for value in request.query.get("token", ())
        )

    def _refused(self, why: str) -> None:
        self.stats.refused[why] = self.stats.refused.get(why, 0) + 1

    async def _not_found(self, send: Send, request: Request) -> None:
        body = pages.message_html(404, "Not Found", "No such file in this server's URL list.")
        await _simple(send, request, 404, body)

    async def _reserved(self, send: Send, request: Request, rest: tuple[str, ...]) -> None:
        """``/_remotefs/status`` (the live page), ``/_remotefs/status.json`` and
        ``/_remotefs/health`` (200 while the daemon serves: for the daemon's own readiness
        check, and for load balancers)."""
        every = request.query.get("all", ["0"])[-1] not in ("", "0", "false", "no")
        if rest == ("status.json",):
            body = _json(self.status(every))
            await _simple(send, request, 200, body, content_type=b"application/json")
        elif rest == ("status",):
            await _simple(send, request, 200, pages.status_html(self.status(every)))
        elif rest == ("health",):
            await _simple(send, request, 200, b"ok\n", content_type=b"text/plain")
        elif rest == ():
            location = f"/{RESERVED}/status{_query_suffix(request)}".encode()
            await _simple(send, request, 302, b"", [(b"location", location)])
        else:
            await self._not_found(send, request)

    def status(self, every: bool = False) -> dict[str, Any]:
        """The status.json answer: the control socket's status, and where we listen."""
        answer = self._status(every)
        answer["listen"] = list(self.addresses)
        return answer

    async def _index(
        self, send: Send, request: Request, names: tuple[str, ...], node: DirNode
    ) -> None:
        entries: list[pages.Entry] = []
        for name, inode in node.children.items():
            child = self._tree.nodes.get(inode)
            if isinstance(child, DirNode):
                entries.append(pages.Entry(name, True))
            elif isinstance(child, FileNode):
                self._engine.seen(child.cached)  # a stale file is revalidated soon
                entries.append(
                    pages.Entry(name, False, child.cached.size, child.cached.cached_bytes)
                )
        entries.sort(key=lambda entry: (not entry.is_dir, entry.name))
        if pages.wants_json(request.headers.get("accept")):
            body = pages.index_json(names, entries)
            await _simple(send, request, 200, body, content_type=b"application/json")
            return
        body = pages.index_html(names, entries, _token_suffix(request))
        await _simple(send, request, 200, body)

    # -- files ---------------------------------------------------------------------------------

    async def _current(self, names: tuple[str, ...], cached: CachedFile) -> CachedFile | None:
        """The version to serve: *cached* revalidated if stale, or what replaced it."""
        for _ in range(VERSION_TRIES):
            await self._engine.ensure_fresh(cached)
            if not cached.retired and not self._engine.changing(cached):
                return cached
            while self._engine.changing(cached):
                await trio.sleep(0.05)  # a swap is under way: its new version comes
            node = self._tree.find(names)
            if not isinstance(node, FileNode):
                return None
            cached = node.cached
        return None if cached.retired else cached

    async def _file(
        self, send: Send, request: Request, names: tuple[str, ...], node: FileNode
    ) -> None:
        for _ in range(VERSION_TRIES):
            cached = await self._current(names, node.cached)
            if cached is None:
                break
            try:
                await self._serve_version(send, request, names, cached)
                return
            except _Changed:
                found = self._tree.find(names)
                if not isinstance(found, FileNode):
                    break
                node = found
        text = "The file keeps changing at its origin, or is gone from the URL list."
        await _simple(send, request, 503, pages.message_html(503, "Try Again", text))

    async def _serve_version(
        self, send: Send, request: Request, names: tuple[str, ...], cached: CachedFile
    ) -> None:
        remote = cached.remote
        size = cached.size
        validators = Validators(remote.etag, remote.last_modified)
        headers = _representation_headers(cached, names[-1])
        decided = preconditions(request.headers, validators, method=request.method, now=time.time())
        if decided is not None:
            keep = {b"etag", b"last-modified", b"cache-control"}
            extra = [(name, value) for name, value in headers if name in keep]
            await _simple(send, request, decided, b"", extra, content_type=None)
            return
        ranges: list[ByteRange] | None = None
        if (
            request.method == "GET"
            and "range" in request.headers
            and range_applies(request.headers.get("if-range"), validators)
        ):
            try:
                ranges = parse_range(request.headers["range"], size)
            except Unsatisfiable:
                extra = [*headers, (b"content-range", f"bytes */{size}".encode())]
                await _simple(send, request, 416, b"", extra, content_type=None)
                return
        if ranges is None:
            status, segments = 200, [ByteRange(0, size)]
            headers.append((b"content-length", str(size).encode()))
            literals: list[bytes] = []
            tail = b""
        elif len(ranges) == 1:
            status, segments = 206, ranges
            part = ranges[0]
            headers.append((b"content-range", part.content_range(size).encode()))
            headers.append((b"content-length", str(part.length).encode()))
            literals, tail = [], b""
        else:
            status, segments = 206, ranges
            boundary = secrets.token_hex(16)
            content_type = _content_type(cached, names[-1])
            literals, tail, length = multipart_lengths(ranges, size, content_type, boundary)
            headers = [(name, value) for name, value in headers if name != b"content-type"]
            kind = f"multipart/byteranges; boundary={boundary}".encode()
            headers += [(b"content-type", kind), (b"content-length", str(length).encode())]
        if request.method == "HEAD":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._stream(send, request, cached, status, headers, segments, literals, tail)

    async def _stream(
        self,
        send: Send,
        request: Request,
        cached: CachedFile,
        status: int,
        headers: Headers,
        segments: list[ByteRange],
        literals: list[bytes],
        tail: bytes,
    ) -> None:
        """Send the body: each segment (after its literal, for multipart) as it arrives."""
        engine = self._engine
        sender = _Sender(send, status, headers)
        # Open-time hints (the tail's index, the head) for a request from the start, which
        # is how clients open a file; a range further in is a seek of a client that has.
        handle = engine.open(cached, hints=segments[0].start == 0)
        scope = trio.CancelScope()
        self._responses.setdefault(cached, set()).add(scope)
        self.stats.responses_in_flight += 1
        sent = 0
        try:
            with scope:
                try:
                    for index, segment in enumerate(segments):
                        if literals:
                            await sender.literal(literals[index])
                        position = segment.start
                        while position < segment.end:
                            piece = _piece(cached, position, segment.end)
                            data = await engine.read(handle, position, piece)
                            if not data:
                                raise ReadError(f"{cached.name}: ended early at {position}")
                            await sender.data(data)
                            position += len(data)
                            sent += len(data)
                    if tail:
                        await sender.literal(tail)
                    await sender.finish()
                    return
                except (ReadError, OSError) as err:
                    if not sender.started and (cached.retired or engine.changing(cached)):
                        raise _Changed() from None
                    if not sender.started:
                        log.warning("%s: %s", _shown(request), err)
                        body = pages.message_html(502, "Bad Gateway", str(err))
                        await _simple(send, request, 502, body)
                        return
                    log.warning("%s: response cut after %d bytes: %s", _shown(request), sent, err)
                    self.stats.aborted += 1
                    self._cut(request.client)  # before its declared length, whatever protocol
                    return
            # Cancelled by a swap (a disconnect cancels the request's own scope instead).
            if not sender.started:
                raise _Changed()
            log.warning(
                "%s: response cut after %d bytes: the file changed at its origin",
                _shown(request),
                sent,
            )
            self.stats.aborted += 1
            self._cut(request.client)
        finally:
            self.stats.bytes_sent += sent
            self.stats.responses_in_flight -= 1
            engine.close(handle)
            scopes = self._responses.get(cached)
            if scopes is not None:
                scopes.discard(scope)
                if not scopes:
                    del self._responses[cached]


def _piece(cached: CachedFile, position: int, end: int) -> int:
    """How much to read at *position*: the cached run there (up to `PIECE`), or, when the
    block at *position* is missing, up to that block's end (it is sent once it arrives)."""
    limit = min(end, position + PIECE)
    if not cached.cacheable:
        return limit - position
    block_size = cached.block_size
    first = position // block_size
    last = (limit - 1) // block_size + 1
    if cached.has_blocks(first, last):
        return limit - position
    if not cached.has_blocks(first, first + 1):
        return min(limit, (first + 1) * block_size) - position
    missing = BitMap()
    missing.add_range(first, last)
    missing -= cached.bitmap
    return min(limit, missing.min() * block_size) - position


def _content_type(cached: CachedFile, name: str) -> str:
    """The origin's Content-Type, else one guessed from the name, else octet-stream."""
    if cached.remote.content_type:
        return cached.remote.content_type
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def _representation_headers(cached: CachedFile, name: str) -> Headers:
    remote = cached.remote
    headers: Headers = [
        (b"content-type", _content_type(cached, name).encode("latin-1", "replace")),
        (b"accept-ranges", b"bytes"),
        # Clients may keep copies, but ask first (cheap: 304): the origin's file can change.
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", b"sandbox"),
        (b"server", f"remotefs/{__version__}".encode()),
    ]
    if remote.etag:
        headers.append((b"etag", remote.etag.encode("latin-1", "replace")))
    if remote.last_modified:
        headers.append((b"last-modified", remote.last_modified.encode("latin-1", "replace")))
    return headers


def _path_parts(raw_path: bytes) -> list[str] | None:
    """The percent-decoded segments of an origin-form path, or None if it cannot name a
    file of the tree (not absolute, not UTF-8, ``.``/``..``, an empty segment inside, or a
    ``/`` encoded inside a segment)."""
    if not raw_path.startswith(b"/"):
        return None  # absolute-form (a proxy request) or "*": never served
    segments = raw_path[1:].split(b"/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        try:
            name = urllib.parse.unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if name in (".", "..") or "/" in name or "\0" in name:
            return None
        if not name and index != len(segments) - 1:
            return None  # "//" inside the path
        parts.append(name)
    return parts


#: RFC 9110 §7.2 Host: uri-host [":" port], uri-host an IP literal, IPv4 or reg-name.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{0,5})?", re.ASCII)


def _plain_host(host: str | None) -> bool:
    """True for a Host that is only a host and maybe a port (or for none, HTTP/1.0):
    ``localhost:1@evil.com`` names no host this server could check, so it is refused."""
    return host is None or _HOST.fullmatch(host.strip()) is not None


def _loopback_host(host: str | None) -> bool:
    """True for a Host header naming this machine's loopback (``127.0.0.1:8080``,
    ``localhost``, ``[::1]:8080``); a request without Host (HTTP/1.0) passes."""
    if host is None:
        return True
    value = host.strip().lower()
    if value.startswith("["):
        name = value[1:].partition("]")[0]
    else:
        name = value.rpartition(":")[0] if value.count(":") == 1 else value
    name = name.rstrip(".")
    if name in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _token_suffix(request: Request) -> str:
    """``?token=...`` when the request carried its token in the query: links keep it."""
    tokens = request.query.get("token")
    return f"?token={urllib.parse.quote(tokens[-1], safe='')}" if tokens else ""


def _query_suffix(request: Request) -> str:
    query = urllib.parse.urlencode(request.query, doseq=True)
    return f"?{query}" if query else ""


def _shown(request: Request) -> str:
    """The request as logged: method and path, never the query (it may hold the token)."""
    return f"{request.method} {request.raw_path.decode('latin-1')}"


def _json(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


async def _simple(
    send: Send,
    request: Request,
    status: int,
    body: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
    *,
    content_type: bytes | None = b"text/html; charset=utf-8",
) -> None:
    """A whole response at once (pages, errors, 304, 416): never cached by clients.

    A 304 carries no Content-Length: a cache would take it for the length of the file.
    """
    headers: Headers = [] if status == 304 else [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    names = {name for name, _ in extra}
    if b"cache-control" not in names:
        headers.append((b"cache-control", b"no-store"))
    headers += list(extra)
    headers.append((b"server", f"remotefs/{__version__}".encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send(
        {
            "type": "http.response.body",
            "body": b"" if request.method == "HEAD" else body,
            "more_body": False,
        }
    )
