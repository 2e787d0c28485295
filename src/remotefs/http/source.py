"""The HTTP edge: probe a URL's metadata and stream verified byte ranges from it.

Everything here is about not trusting the wire more than it deserves:

* ``Accept-Encoding: identity`` on every request and the *raw* body (``aiter_raw``): byte
  ranges address the bytes as sent, so a transparently decoded body would put wrong bytes at
  the right offsets.
* The probe is a ``GET`` of ``bytes=0-0``, not ``HEAD``: presigned URLs sign the method and
  many servers refuse HEAD. ``Content-Range`` gives the full size and the validators in one
  round trip.
* A data response is accepted only as ``206`` with exactly the ``Content-Range`` asked for and
  the size we know; anything else raises, so the cache never stores a byte from the wrong
  place or the wrong version of the file.

All requests share one `httpx.AsyncClient` (keep-alive) behind a `trio.CapacityLimiter` so the
whole mount never opens more than ``max_connections`` connections.

Headers: ``--header``/``--header-file`` apply to every URL, and a URL's own header lines in
urls.txt are added on top (replacing a global header of the same name). Redirects are followed
by httpx, which drops ``Authorization`` when a redirect leaves the origin (except http -> https
on the same host) and drops ``Cookie`` on every redirect. A remembered redirect target is
requested directly, so the same rule is applied here before such a request.

With ``http2`` (the default) HTTP/2 is offered in the TLS handshake; the server chooses.
``--proxy`` sends everything through one proxy; without it httpx honours HTTP_PROXY,
HTTPS_PROXY, ALL_PROXY and NO_PROXY (``trust_env``).
"""

from __future__ import annotations

import email.utils
import logging
import re
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, TypeVar

import httpcore._async.http11
import httpx
import trio

from ..config.options import MountOptions
from ..redact import redact_url
from . import receive_buffer
from .errors import (
    HttpSourceError,
    PermanentError,
    ProtocolViolationError,
    RangeNotSupportedError,
    RemoteChangedError,
    TransientError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_CONTENT_RANGE = re.compile(
    r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE | re.ASCII
)
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Statuses from a remembered redirect target that mean "that URL expired", not "the file is
# gone": the original URL is resolved again before the error is believed.
_EXPIRED_TARGET_STATUSES = frozenset({400, 401, 403, 404, 410})

#: `RemoteMeta.size` of a file whose server sends no length (chunked, no Content-Range total).
UNKNOWN_SIZE = -1


@dataclass(frozen=True, slots=True)
class Freshness:
    """What an answer says about how long it stays fresh (RFC 9111, as a private cache).

    *max_age* is the lifetime left when the answer arrived, in seconds: Cache-Control's
    max-age, else Expires minus Date, minus the answer's Age; None when the origin said
    nothing (the mount's ``--revalidate`` applies).
    """

    max_age: float | None = None
    no_cache: bool = False
    no_store: bool = False


NO_FRESHNESS = Freshness()


@dataclass(frozen=True, slots=True)
class RemoteMeta:
    """What a probe learned about one URL; the identity of the version we cache.

    `same_version` compares size and validators only: *freshness* is about how long this
    answer may be trusted, not about which bytes it describes.
    """

    url: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None
    accepts_ranges: bool
    freshness: Freshness = NO_FRESHNESS

    @property
    def mtime_ns(self) -> int | None:
        """Last-Modified as nanoseconds since the epoch, or None when absent/unparseable."""
        if not self.last_modified:
            return None
        try:
            parsed = email.utils.parsedate_to_datetime(self.last_modified)
        except (TypeError, ValueError):
            return None
        return int(parsed.timestamp()) * 1_000_000_000

    @property
    def validator(self) -> str | None:
        """The value for ``If-Range``: a strong ETag, else Last-Modified (RFC 9110 §13.1.5).

        Weak ETags (``W/"..."``) are not allowed in If-Range, so they are never used.
        """
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def same_version(self, other: RemoteMeta) -> bool:
        """True when *other* describes the same bytes: same size and same validators."""
        unknown = UNKNOWN_SIZE in (self.size, other.size)
        if self.size != other.size and not unknown:
            return False
        if self.etag and other.etag:
            return self.etag == other.etag
        if unknown:  # only a validator can vouch for a file whose length is not announced
            return bool(self.last_modified and self.last_modified == other.last_modified)
        return self.last_modified == other.last_modified


class ListingResponse(NamedTuple):
    """A directory listing's answer, with the validators a later conditional GET sends."""

    status: int
    content_type: str | None
    body: bytes
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range`` header; ``start``/``end`` are None for ``*/total``."""

    start: int | None
    end: int | None  # inclusive, as on the wire
    total: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """Parse ``bytes a-b/total`` or ``bytes */total``; None when absent or malformed."""
    if not value:
        return None
    match = _CONTENT_RANGE.match(value)
    if not match:
        return None
    start, end, total = match.groups()
    return ContentRange(
        int(start) if start is not None else None,
        int(end) if end is not None else None,
        None if total == "*" else int(total),
    )


#: The largest size a file can have: the kernel's file offsets are signed 64-bit numbers.
#: An origin that claims more is lying or broken; its file is left out, with a log line.
MAX_FILE_SIZE = (1 << 63) - 1


_CACHE_DIRECTIVE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("[^"]*"|[^,]*))?\s*')


def freshness_from_headers(headers: Mapping[str, str], now: float | None = None) -> Freshness:
    """How long an answer stays fresh, from Cache-Control, Expires, Date, Age and Pragma.

    Directives a private cache ignores (``s-maxage``, ``public``, ``private``) are ignored.
    An Expires that cannot be parsed means already expired, as RFC 9111 §5.3 says.
    """
    now = time.time() if now is None else now
    max_age: float | None = None
    no_cache = no_store = False
    control = headers.get("cache-control")
    if control:
        for part in control.split(","):
            match = _CACHE_DIRECTIVE.fullmatch(part)
            if not match:
                continue
            name, value = match.group(1).lower(), (match.group(2) or "").strip('"')
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age" and re.fullmatch(r"[0-9]+", value):
                max_age = float(value)
    elif "no-cache" in headers.get("pragma", "").lower():
        no_cache = True
    if max_age is None and headers.get("expires") is not None:
        expires = _http_date(headers.get("expires"))
        date = _http_date(headers.get("date")) or now
        max_age = max(0.0, expires - date) if expires is not None else 0.0
    if max_age is not None:
        age = headers.get("age", "").strip()
        if re.fullmatch(r"[0-9]+", age):
            max_age = max(0.0, max_age - float(age))
    return Freshness(max_age, no_cache, no_store)


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def meta_from_probe(
    url: str,
    status: int,
    headers: Mapping[str, str],
    what: str,
    previous: RemoteMeta | None = None,
) -> RemoteMeta:
    """Interpret the answer to a ``Range: bytes=0-0`` GET of *url*; raise if it is unusable.

    Shared by the general probe (httpx) and the fast one (`ProbeClient`), so both read an
    answer the same way. With *previous* (a conditional request: a revalidation), a 304
    says *previous* is still the current version; its freshness is updated from the 304.
    """
    if status == 304 and previous is not None:
        if not any(headers.get(name) for name in ("cache-control", "expires", "pragma")):
            return previous  # a 304 without them leaves the stored ones in force (RFC 9111)
        return replace(previous, freshness=freshness_from_headers(headers))
    accepts_ranges = headers.get("accept-ranges", "").strip().lower() != "none"
    if status == 206:
        crange = parse_content_range(headers.get("content-range"))
        if crange is None or crange.start != 0:
            raise ProtocolViolationError(
                f"{what}: 206 with unusable Content-Range {headers.get('content-range')!r}"
            )
        size = UNKNOWN_SIZE if crange.total is None else crange.total
    elif status == 416:
        # Only an empty file cannot satisfy bytes=0-0 (RFC 9110 §14.1.1: the first byte is at
        # or past the end). S3 (and moto) send no Content-Range with it; where one is sent,
        # its size is used.
        crange = parse_content_range(headers.get("content-range"))
        if crange is None:
            size = 0
        elif crange.total is None:
            raise ProtocolViolationError(f"{what}: 416 with an unusable Content-Range")
        else:
            size = crange.total
    elif status == 200:
        accepts_ranges = False
        length = headers.get("content-length", "").strip()
        # No Content-Length (a chunked body): the size is known only after a download.
        size = int(length) if re.fullmatch(r"[0-9]+", length) else UNKNOWN_SIZE
    else:
        raise error_for_status(status, what, headers.get("retry-after"))
    if size > MAX_FILE_SIZE:
        raise ProtocolViolationError(
            f"{what}: the origin claims a size of {size} bytes, more than any file can have"
        )
    return RemoteMeta(
        url=url,
        size=size,
        etag=headers.get("etag") or None,
        # Shared by many files of one origin (a mirror's one date, one type): interned, a
        # list of 100,000 files keeps one copy of each.
        last_modified=_interned(headers.get("last-modified")),
        content_type=_interned(headers.get("content-type")),
        accepts_ranges=accepts_ranges,
        freshness=freshness_from_headers(headers),
    )


def _interned(value: str | None) -> str | None:
    return sys.intern(value) if value else None


def conditional_headers(previous: RemoteMeta | None) -> dict[str, str]:
    """``If-None-Match`` with the ETag, else ``If-Modified-Since``: ask only for a change."""
    if previous is None:
        return {}
    if previous.etag:
        return {"If-None-Match": previous.etag}
    if previous.last_modified:
        return {"If-Modified-Since": previous.last_modified}
    return {}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):  # str.isdigit() accepts "²", which float() rejects
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(status: int, what: str, retry_after: str | None = None) -> HttpSourceError:
    """Classify an unexpected HTTP status as transient or permanent."""
    if status in _TRANSIENT_STATUSES or 500 <= status <= 599:
        return TransientError(f"{what}: HTTP {status}", retry_after=parse_retry_after(retry_after))
    if status in (412, 416):
        return RemoteChangedError(f"{what}: HTTP {status}: the remote file changed")
    return PermanentError(f"{what}: HTTP {status}", status=status)


#: Bytes asked of the socket per read. httpcore asks 64 KiB; at hundreds of MB/s the fixed
#: cost of each read (h11 events, trio's socket wrapper) then dominates. 1 MiB made a cold
#: sequential read through the mount ~30% faster on loopback.
SOCKET_READ_SIZE = 1 << 20


def _use_large_socket_reads() -> None:
    """Raise httpcore's per-read size (a class attribute; left alone if it ever disappears)."""
    connection = getattr(httpcore._async.http11, "AsyncHTTP11Connection", None)
    if connection is not None and isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        connection.READ_NUM_BYTES = SOCKET_READ_SIZE


#: Connections of the httpx pool kept for probes (see `HttpSource.probe_limiter`).
HTTPX_PROBE_CONNECTIONS = 8

#: Connections of the pool that background requests (readahead, fill) never take.
FOREGROUND_RESERVE = 2


class _NoLimit:
    """An async context manager that limits nothing (foreground requests)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


class HttpSource:
    """Probes URLs and streams verified ranges over one bounded connection pool."""

    def __init__(
        self,
        options: MountOptions,
        url_headers: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    ) -> None:
        """*url_headers* maps a manifest URL to its own request headers (urls.txt lines)."""
        _use_large_socket_reads()
        receive_buffer.install()
        self._options = options
        self._url_headers = {url: list(h) for url, h in (url_headers or {}).items() if h}
        self._limiter = trio.CapacityLimiter(options.max_connections)
        #: Probes that go through httpx (redirects, proxies, HTTP/2): httpx's pool slows
        #: down with every connection it holds, so these few are enough.
        self.probe_limiter = trio.CapacityLimiter(HTTPX_PROBE_CONNECTIONS)
        self._background_limiter = trio.CapacityLimiter(
            max(1, options.max_connections - FOREGROUND_RESERVE)
        )
        verify: ssl.SSLContext | bool = True
        if options.insecure:
            verify = False
        elif options.ca_bundle:
            verify = ssl.create_default_context(cafile=options.ca_bundle)
        if options.proxy:
            log.info("all requests go through the proxy %s", redact_url(options.proxy))
        self._client = httpx.AsyncClient(
            http2=options.http2,
            proxy=options.proxy,
            trust_env=True,
            follow_redirects=True,
            verify=verify,
            headers={"Accept-Encoding": "identity", "User-Agent": options.user_agent},
            limits=httpx.Limits(
                max_connections=options.max_connections + HTTPX_PROBE_CONNECTIONS,
                max_keepalive_connections=options.max_connections + HTTPX_PROBE_CONNECTIONS,
                keepalive_expiry=30.0,
            ),
            timeout=httpx.Timeout(
                connect=options.connect_timeout,
                read=options.stall_timeout,
                write=options.stall_timeout,
                pool=None,
            ),
        )
        self.bytes_received = 0
        self.requests_sent = 0
        self._targets: dict[str, str] = {}

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._client.aclose()

    def set_headers(self, url_headers: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """Replace the per-URL request headers (a reload read urls.txt again)."""
        self._url_headers = {url: list(h) for url, h in url_headers.items() if h}

    def add_headers(self, url: str, headers: Sequence[tuple[str, str]]) -> None:
        """Set the request headers of one more URL (the library opens URLs one by one)."""
        if headers:
            self._url_headers[url] = list(headers)

    async def probe(self, url: str, previous: RemoteMeta | None = None) -> RemoteMeta:
        """Learn size, validators, type and Range support of *url* with one ``bytes=0-0`` GET.

        With *previous*, the request is conditional (`conditional_headers`): an unchanged
        file answers 304, without a body. This is the general path (redirects, proxies,
        HTTP/2); `ProbeClient` does the same faster for plain HTTP/1.1 origins and falls back
        here for anything else. It takes no connection slot of its own: the caller bounds
        probing (`remotefs.daemon.probe`).
        """
        what = f"{'revalidate' if previous else 'probe'} {redact_url(url)}"
        own = {"Range": "bytes=0-0", **conditional_headers(previous)}
        request = self._request(url, own, what, key=url)
        async with request as response:
            meta = meta_from_probe(url, response.status_code, response.headers, what, previous)
            self._remember_target(url, response)
            return meta

    async def fetch_listing(
        self,
        url: str,
        key: str,
        accept: str,
        limit: int,
        validators: Mapping[str, str] | None = None,
    ) -> ListingResponse:
        """GET a directory listing, whatever the status.

        *key* is the directory source's URL: its headers go with the listing of every
        directory under it. A body over *limit* bytes is refused (`PermanentError`): a
        listing is hostile input, and 64 MiB already holds a million names. *validators*
        (``If-None-Match``, ``If-Modified-Since``) make the request conditional: an unchanged
        listing answers 304 with no body.
        """
        what = f"list {redact_url(url)}"
        own = {"Accept": accept, **(validators or {})}
        async with self._request(url, own, what, key=key) as response:
            body = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise PermanentError(f"{what}: the listing is larger than {limit} bytes")
            except httpx.HTTPError as err:
                raise _map_httpx_error(err, what) from err
            headers = response.headers
            return ListingResponse(
                response.status_code,
                headers.get("content-type"),
                bytes(body),
                headers.get("etag"),
                headers.get("last-modified"),
            )

    async def fetch_range(
        self,
        meta: RemoteMeta,
        start: int,
        end: int,
        on_data: Callable[[bytes], Awaitable[None] | None],
        *,
        background: bool = False,
    ) -> None:
        """Stream bytes ``[start, end)`` of *meta*'s file into *on_data*, in order.

        *background* requests (readahead, fill) may hold all but `FOREGROUND_RESERVE` of the
        pool's connections, so a reader that misses the cache never queues behind them.

        ``If-Range`` carries the cached version's validator, so a changed file comes back as a
        200 and raises `RemoteChangedError` instead of mixing versions. *on_data* may have
        received part of the range when a transient error is raised; the caller keeps what it
        can use and asks again for the rest.
        """
        if not 0 <= start < end <= meta.size:
            raise ValueError(f"bad range [{start}, {end}) for size {meta.size}")
        headers = {"Range": f"bytes={start}-{end - 1}"}
        validator = meta.validator
        if validator:
            headers["If-Range"] = validator
        what = f"GET {redact_url(meta.url)} bytes {start}-{end - 1}"

        async def attempt(url: str) -> None:
            async with (
                self._background_limiter if background else _NO_LIMIT,
                self._limiter,
                self._request(url, headers, what, key=meta.url) as response,
            ):
                self._check_range_response(response, meta, start, end, what, bool(validator))
                self._remember_target(meta.url, response)
                await self._stream_body(response, end - start, on_data, what)

        await self._via_remembered_target(meta.url, attempt)

    async def fetch_whole(
        self, meta: RemoteMeta, on_data: Callable[[bytes], Awaitable[None] | None]
    ) -> int:
        """Stream the whole body of *meta*'s file (for servers without Range); return its size.

        The response must be a 200 of the same version: same ETag when both sides have one,
        and the known size when the server sends a length. A file of unknown size takes
        whatever length the body turns out to have.
        """
        what = f"GET {redact_url(meta.url)} (whole file)"

        async def attempt(url: str) -> int:
            async with self._limiter, self._request(url, {}, what, key=meta.url) as response:
                if response.status_code != 200:
                    raise error_for_status(
                        response.status_code, what, response.headers.get("retry-after")
                    )
                etag = response.headers.get("etag")
                if etag and meta.etag and etag != meta.etag:
                    raise RemoteChangedError(f"{what}: ETag changed: the remote file changed")
                length = response.headers.get("content-length", "").strip()
                size = int(length) if re.fullmatch(r"[0-9]+", length) else UNKNOWN_SIZE
                if meta.size != UNKNOWN_SIZE and size not in (meta.size, UNKNOWN_SIZE):
                    raise RemoteChangedError(
                        f"{what}: size is now {size}, was {meta.size}: the remote file changed"
                    )
                expected = meta.size if meta.size != UNKNOWN_SIZE else size
                self._remember_target(meta.url, response)
                return await self._stream_body(response, expected, on_data, what)

        return await self._via_remembered_target(meta.url, attempt)

    async def _stream_body(
        self,
        response: httpx.Response,
        expected: int,
        on_data: Callable[[bytes], Awaitable[None] | None],
        what: str,
    ) -> int:
        """Feed the raw body to *on_data*; a body of the wrong length is an error.

        *on_data* may return an awaitable: the body is not read further until it is done.

        *expected* is UNKNOWN_SIZE for a body whose end only the server knows.
        """
        received = 0
        async for chunk in response.aiter_raw():
            if expected != UNKNOWN_SIZE and received + len(chunk) > expected:
                raise ProtocolViolationError(f"{what}: body longer than expected")
            received += len(chunk)
            self.bytes_received += len(chunk)
            pending = on_data(chunk)
            if pending is not None:
                await pending  # the consumer needs time (room under the cache cap)
        if expected != UNKNOWN_SIZE and received != expected:
            raise TransientError(f"{what}: body ended after {received} of {expected} bytes")
        return received

    async def _via_remembered_target(self, url: str, attempt: Callable[[str], Awaitable[T]]) -> T:
        """Run *attempt* on the remembered redirect target of *url*, else on *url* itself.

        Redirect targets are often short-lived presigned URLs: if the remembered one fails
        with a status that can mean "expired", it is forgotten and *url* is resolved again
        (following its redirects) before the error is believed.
        """
        target = self._targets.get(url)
        if target is not None:
            try:
                return await attempt(target)
            except PermanentError as err:
                if (
                    isinstance(err, RemoteChangedError)
                    or err.status not in _EXPIRED_TARGET_STATUSES
                ):
                    raise
                log.info("%s: redirect target failed (%s); resolving again", redact_url(url), err)
                self._targets.pop(url, None)
        return await attempt(url)

    def has_remembered_target(self, url: str) -> bool:
        """True when requests of *url* go to a remembered redirect target."""
        return url in self._targets

    def _remember_target(self, url: str, response: httpx.Response) -> None:
        """Remember where *url* redirected to, saving a round trip on every later request."""
        final = str(response.url)
        if response.history and final != url:
            self._targets[url] = final

    def _check_range_response(
        self,
        response: httpx.Response,
        meta: RemoteMeta,
        start: int,
        end: int,
        what: str,
        sent_validator: bool,
    ) -> None:
        """Accept only a 206 whose Content-Range is exactly the range asked, of the known size."""
        status = response.status_code
        if status == 200:
            # A 200 to If-Range means "changed" -- or a server that ignores Range. The
            # validators of the response tell which; without them, assume the worst.
            if sent_validator and not _same_validators(meta, response.headers):
                raise RemoteChangedError(f"{what}: whole body sent for If-Range: file changed")
            raise RangeNotSupportedError(f"{what}: the server ignored the Range header")
        if status != 206:
            raise error_for_status(status, what, response.headers.get("retry-after"))
        crange = parse_content_range(response.headers.get("content-range"))
        if crange is None or crange.start is None:
            raise ProtocolViolationError(f"{what}: 206 without a usable Content-Range")
        if crange.total is not None and crange.total != meta.size:
            raise RemoteChangedError(
                f"{what}: size is now {crange.total}, was {meta.size}: the remote file changed"
            )
        if crange.start != start or crange.end != end - 1:
            raise ProtocolViolationError(f"{what}: got bytes {crange.start}-{crange.end} instead")
        etag = response.headers.get("etag")
        if etag and meta.etag and etag != meta.etag:
            raise RemoteChangedError(f"{what}: ETag changed: the remote file changed")

    def _request(self, url: str, headers: dict[str, str], what: str, *, key: str) -> _Exchange:
        """One GET of *url* (*key*'s remembered redirect target, or *key* itself)."""
        return _Exchange(self, url, self.request_headers(key, url, headers), what)

    def request_headers(self, key: str, url: str, own: Mapping[str, str]) -> list[tuple[str, str]]:
        """The headers of a request of *url* for manifest URL *key*: user headers, then *own*.

        Global headers come first; a per-URL header replaces global ones of the same name.
        When *url* is a remembered redirect target of *key*, ``Authorization`` is dropped if
        the target is on another origin and ``Cookie`` is always dropped, exactly as httpx
        does when it follows the redirect itself.
        """
        per_url = self._url_headers.get(key, [])
        replaced = {name.lower() for name, _ in per_url}
        headers = [(n, v) for n, v in self._options.headers if n.lower() not in replaced]
        headers += per_url
        below_directory = key.endswith("/") and url.startswith(key) and "?" not in key
        if url != key and not below_directory:
            strip = {"cookie"}
            if not _same_origin_or_upgrade(key, url):
                strip.add("authorization")
            headers = [(n, v) for n, v in headers if n.lower() not in strip]
        return headers + list(own.items())


class _Exchange:
    """Async context manager around one streamed request that maps httpx errors to ours."""

    def __init__(
        self, source: HttpSource, url: str, headers: list[tuple[str, str]], what: str
    ) -> None:
        self._source = source
        self._url = url
        self._headers = headers
        self._what = what
        self._stream: httpx.Response | None = None
        self._cm: object = None

    async def __aenter__(self) -> httpx.Response:
        self._source.requests_sent += 1
        cm = self._source._client.stream("GET", self._url, headers=self._headers)
        self._cm = cm
        try:
            return await cm.__aenter__()
        except httpx.HTTPError as err:
            raise _map_httpx_error(err, self._what) from err
        except UnicodeError:
            # A header value that HTTP cannot carry (the manifest parser refuses them; this
            # keeps any other way in from ending the daemon).
            raise PermanentError(f"{self._what}: a request header is not ASCII") from None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        cm = self._cm
        assert cm is not None
        try:
            await cm.__aexit__(exc_type, exc, tb)  # type: ignore[attr-defined]
        except httpx.HTTPError as err:
            if exc is None:
                raise _map_httpx_error(err, self._what) from err
        if isinstance(exc, httpx.HTTPError):
            raise _map_httpx_error(exc, self._what) from exc


def _same_origin_or_upgrade(original: str, target: str) -> bool:
    """httpx's rule for keeping Authorization on a redirect from *original* to *target*."""
    a, b = httpx.URL(original), httpx.URL(target)
    if (a.scheme, a.host, _port(a)) == (b.scheme, b.host, _port(b)):
        return True
    return (
        a.host == b.host
        and (a.scheme, _port(a)) == ("http", 80)
        and (b.scheme, _port(b)) == ("https", 443)
    )


def _port(url: httpx.URL) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)


def _same_validators(meta: RemoteMeta, headers: httpx.Headers) -> bool:
    """True when a response's validators prove it is the version *meta* describes."""
    etag = headers.get("etag")
    if meta.etag and etag:
        return bool(etag == meta.etag)
    modified = headers.get("last-modified")
    return bool(meta.last_modified and modified and modified == meta.last_modified)


def _map_httpx_error(err: httpx.HTTPError, what: str) -> HttpSourceError:
    """Translate httpx's exception tree into transient/permanent, without leaking the URL."""
    if isinstance(err, httpx.TimeoutException):
        return TransientError(f"{what}: timed out ({type(err).__name__})")
    if isinstance(err, httpx.TooManyRedirects):
        return PermanentError(f"{what}: too many redirects")
    if isinstance(err, httpx.UnsupportedProtocol | httpx.InvalidURL | httpx.LocalProtocolError):
        return PermanentError(f"{what}: {type(err).__name__}")
    if isinstance(err, httpx.TransportError):
        if _cause_of_type(err, ssl.SSLCertVerificationError) is not None:
            # Retrying cannot make a certificate valid: fail now, not after the deadline.
            return PermanentError(f"{what}: {_short(err)}")
        return TransientError(f"{what}: {type(err).__name__}: {_short(err)}")
    return PermanentError(f"{what}: {type(err).__name__}")


def _cause_of_type(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type *kind* in *err*'s cause/context chain (bounded walk)."""
    cause: BaseException | None = err
    for _ in range(10):  # a chain can loop
        if cause is None or isinstance(cause, kind):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _short(err: BaseException) -> str:
    """First line of an exception message, with any URL stripped of its query.

    httpx on trio often wraps the real reason several levels deep in exceptions with empty
    messages (ConnectError <- BrokenResourceError <- SSLError), so the chain is searched: a
    failed certificate check is named as such, else the first non-empty message is used.
    """
    text = ""
    failed_check = _cause_of_type(err, ssl.SSLCertVerificationError)
    if isinstance(failed_check, ssl.SSLCertVerificationError):
        reason = failed_check.verify_message or str(failed_check)
        text = f"TLS certificate verification failed: {reason} (see --ca-bundle)"
    cause: BaseException | None = err
    for _ in range(10):  # bounded: a cause chain can loop
        if cause is None or text:
            break
        if str(cause):
            text = str(cause).splitlines()[0]
        cause = cause.__cause__ or cause.__context__
    # Any URL (an origin's, a proxy's with its password) is shown without its secrets.
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact_url(m.group(0)), text)[:200]
