"""Fast probes: ``GET Range: bytes=0-0`` over kept-alive HTTP/1.1 connections driven by h11.

A mount of 100,000 URLs sends 100,000 probes before it can list them. httpx spends about
half a millisecond of CPU on each request, and its connection pool slows down with every
connection it holds (measured on a 2-core machine against a local origin: 2,300 probes/s
over 4 connections, 450/s over 64). The daemon runs one event loop, so that CPU is the limit:
100,000 probes would take close to a minute before anything could be listed. The same
requests written and parsed with h11 (the HTTP/1.1 parser httpx itself uses) on trio
streams cost a tenth of that: about 13,000 probes/s whatever the number of connections.

So probes of plain origins go through `ProbeClient`: a small pool of HTTP/1.1 connections
per origin (scheme, host, port), each answering one probe at a time. Only the simple case
is handled here. Whatever needs more (a redirect, a proxy, a URL whose redirect target is
remembered, a TLS failure whose message must be exact) returns None, and the caller probes
that URL through httpx (`HttpSource.probe`), which stays the one general HTTP client. Both
read an answer with the same function (`meta_from_probe`), so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h11
import httpx
import trio

from ..config.options import MountOptions
from ..redact import redact_url
from .errors import HttpSourceError, TransientError
from .source import RemoteMeta, conditional_headers, meta_from_probe

log = logging.getLogger(__name__)

#: A response body longer than this is not read: the connection is closed instead.
MAX_DRAINED_BODY = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_Origin = tuple[str, str, int]


def proxies_configured() -> bool:
    """True when an HTTP(S)/ALL proxy variable is set: then httpx, which honours it, probes."""
    return any(key in ("http", "https", "all") for key in urllib.request.getproxies())


@dataclass(eq=False)
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    #: Answered at least one request: a failure before the next answer may just be the
    #: server closing an idle keep-alive connection, worth one retry on a fresh one.
    reused: bool = False


class _NeedsGeneralClient(Exception):
    """This URL's probe must go through httpx (redirect, TLS trouble)."""


class _Redirected(_NeedsGeneralClient):
    """The origin redirects: httpx follows (and remembers the target, as for data requests)."""


class ProbeClient:
    """Probes over a few kept-alive HTTP/1.1 connections per origin (one per daemon)."""

    def __init__(
        self,
        options: MountOptions,
        headers_for: Callable[[str], Sequence[tuple[str, str]]],
        *,
        remembered_target: Callable[[str], bool] = lambda url: False,
    ) -> None:
        """*headers_for(url)* gives the user's request headers for a manifest URL."""
        self._options = options
        self._headers_for = headers_for
        self._remembered_target = remembered_target
        self._idle: dict[_Origin, list[_Connection]] = {}
        #: Origins that answered a probe with a redirect: their URLs go to httpx directly
        #: (the first one costs two requests, the others one).
        self._redirecting: set[_Origin] = set()
        self.enabled = not options.proxy and not proxies_configured()
        verify: ssl.SSLContext | str | bool = True
        if options.insecure:
            verify = False
        elif options.ca_bundle:
            verify = options.ca_bundle
        self._ssl = httpx.create_ssl_context(verify=verify)
        # HTTP/2 stays httpx's: an origin that picks it in the handshake is probed there, so
        # it gets the multiplexed connection the user asked for (--no-http2 turns it off).
        self._ssl.set_alpn_protocols(["h2", "http/1.1"] if options.http2 else ["http/1.1"])
        #: Origins that chose HTTP/2: their probes go to httpx.
        self._http2: set[_Origin] = set()
        #: Probes answered here, and those handed to httpx.
        self.answered = 0
        self.handed_over = 0

    async def aclose(self) -> None:
        """Close every idle connection."""
        for connections in self._idle.values():
            for connection in connections:
                with contextlib.suppress(Exception):
                    await trio.aclose_forcefully(connection.stream)
        self._idle.clear()

    async def probe(self, url: str, previous: RemoteMeta | None = None) -> RemoteMeta | None:
        """Probe *url*; None when it needs the general client. Raises `HttpSourceError`.

        With *previous*, a conditional probe (a revalidation): 304 means *previous* holds.
        """
        if not self.enabled or self._remembered_target(url):
            self.handed_over += 1
            return None
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.userinfo:
            # user:password@ becomes Basic authentication: httpx's to do.
            self.handed_over += 1
            return None
        origin = (
            parsed.scheme,
            parsed.host,
            parsed.port or (443 if parsed.scheme == "https" else 80),
        )
        if origin in self._redirecting or origin in self._http2:
            self.handed_over += 1
            return None
        what = f"{'revalidate' if previous else 'probe'} {redact_url(url)}"
        request = self._request(url, parsed, origin, conditional_headers(previous))
        try:
            for attempt in range(2):
                connection = self._take_idle(origin)
                if connection is None:
                    connection = await self._connect(origin, what)
                try:
                    meta, keep = await self._exchange(connection, request, url, what, previous)
                except trio.TooSlowError:
                    await trio.aclose_forcefully(connection.stream)
                    raise TransientError(
                        f"{what}: no answer for {self._options.stall_timeout:.0f}s"
                    ) from None
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    OSError,
                    h11.RemoteProtocolError,
                ) as err:
                    await trio.aclose_forcefully(connection.stream)
                    if connection.reused and attempt == 0:
                        continue  # the server had closed this idle connection: try a fresh one
                    raise TransientError(f"{what}: {type(err).__name__}: {err}"[:300]) from None
                except BaseException:
                    await trio.aclose_forcefully(connection.stream)
                    raise
                if keep:
                    connection.reused = True
                    self._idle.setdefault(origin, []).append(connection)
                else:
                    await trio.aclose_forcefully(connection.stream)
                self.answered += 1
                return meta
        except _Redirected:
            self._redirecting.add(origin)
            self.handed_over += 1
            return None
        except _NeedsGeneralClient:
            self.handed_over += 1
            return None
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        return idle.pop() if idle else None

    def _request(
        self, url: str, parsed: httpx.URL, origin: _Origin, conditional: dict[str, str]
    ) -> h11.Request:
        scheme, host, port = origin
        default = 443 if scheme == "https" else 80
        host_header = f"[{host}]" if ":" in host else host
        if port != default:
            host_header += f":{port}"
        headers = [
            ("Host", host_header),
            ("User-Agent", self._options.user_agent),
            ("Accept-Encoding", "identity"),
            *self._headers_for(url),
            ("Range", "bytes=0-0"),
            *conditional.items(),
        ]
        try:
            return h11.Request(
                method="GET",
                target=parsed.raw_path or b"/",
                headers=[(name.encode("ascii"), value.encode("ascii")) for name, value in headers],
            )
        except (UnicodeError, h11.LocalProtocolError):
            raise _NeedsGeneralClient from None  # httpx reports it properly

    async def _connect(self, origin: _Origin, what: str) -> _Connection:
        scheme, host, port = origin
        try:
            with trio.fail_after(self._options.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
                if scheme != "https":
                    return _Connection(tcp)
                tls = trio.SSLStream(tcp, self._ssl, server_hostname=host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
                if tls.selected_alpn_protocol() == "h2":
                    await trio.aclose_forcefully(tls)
                    self._http2.add(origin)
                    raise _NeedsGeneralClient
                return _Connection(tls)
        except trio.TooSlowError:
            raise TransientError(f"{what}: connect timed out") from None
        except trio.BrokenResourceError:
            raise _NeedsGeneralClient from None  # a TLS failure: httpx names it exactly
        except OSError as err:
            raise TransientError(f"{what}: cannot connect: {err.strerror or err}") from None

    async def _exchange(
        self,
        connection: _Connection,
        request: h11.Request,
        url: str,
        what: str,
        previous: RemoteMeta | None,
    ) -> tuple[RemoteMeta, bool]:
        """Send one probe and read its answer; (meta, connection reusable)."""
        conn = connection.h11
        await connection.stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        response = await self._next_event(connection, h11.Response)
        assert isinstance(response, h11.Response)
        if response.status_code in _REDIRECTS:
            raise _Redirected
        headers = _header_dict(response.headers)
        meta = meta_from_probe(url, response.status_code, headers, what, previous)
        length = headers.get("content-length", "")
        small = response.status_code in (204, 304) or (  # no body at all
            length.isascii() and length.isdigit() and int(length) <= MAX_DRAINED_BODY
        )
        if not small:
            return meta, False  # do not read a whole file to keep a connection
        while not isinstance(
            await self._next_event(connection, h11.Data, h11.EndOfMessage), h11.EndOfMessage
        ):
            pass
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return meta, True
        return meta, False

    async def _next_event(self, connection: _Connection, *kinds: type) -> object:
        conn = connection.h11
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(self._options.stall_timeout):
                    data = await connection.stream.receive_some(65536)
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, kinds):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("connection closed by the server")
            # A Data event before a Response cannot happen; anything else is a protocol error.
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)


def _header_dict(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers by lower-case name; repeated ones joined with ", " (as httpx does)."""
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


__all__ = ["HttpSourceError", "ProbeClient", "proxies_configured"]
