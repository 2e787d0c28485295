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
"""

from __future__ import annotations

import email.utils
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from ..config.options import MountOptions
from ..redact import redact_url
from .errors import (
    HttpSourceError,
    PermanentError,
    ProtocolViolationError,
    RangeNotSupportedError,
    RemoteChangedError,
    TransientError,
)

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteMeta:
    """What a probe learned about one URL; the identity of the version we cache."""

    url: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None
    accepts_ranges: bool

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
        if self.size != other.size:
            return False
        if self.etag and other.etag:
            return self.etag == other.etag
        return self.last_modified == other.last_modified


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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
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
    return PermanentError(f"{what}: HTTP {status}")


class HttpSource:
    """Probes URLs and streams verified ranges over one bounded connection pool."""

    def __init__(self, options: MountOptions) -> None:
        self._options = options
        self._limiter = trio.CapacityLimiter(options.max_connections)
        verify: ssl.SSLContext | bool = True
        if options.insecure:
            verify = False
        elif options.ca_bundle:
            verify = ssl.create_default_context(cafile=options.ca_bundle)
        self._client = httpx.AsyncClient(
            http2=False,
            follow_redirects=True,
            verify=verify,
            headers={"Accept-Encoding": "identity", "User-Agent": options.user_agent},
            limits=httpx.Limits(
                max_connections=options.max_connections,
                max_keepalive_connections=options.max_connections,
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

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._client.aclose()

    async def probe(self, url: str) -> RemoteMeta:
        """Learn size, validators, type and Range support of *url* with one ``bytes=0-0`` GET."""
        what = f"probe {redact_url(url)}"
        async with self._limiter, self._request(url, {"Range": "bytes=0-0"}, what) as response:
            headers = response.headers
            accepts_ranges = headers.get("accept-ranges", "").strip().lower() != "none"
            if response.status_code == 206:
                crange = parse_content_range(headers.get("content-range"))
                if crange is None or crange.start != 0 or crange.total is None:
                    raise ProtocolViolationError(
                        f"{what}: 206 with unusable Content-Range {headers.get('content-range')!r}"
                    )
                size = crange.total
            elif response.status_code == 416:
                crange = parse_content_range(headers.get("content-range"))
                if crange is None or crange.total is None:
                    raise ProtocolViolationError(f"{what}: 416 without a Content-Range size")
                size = crange.total  # an empty file cannot satisfy bytes=0-0
            elif response.status_code == 200:
                accepts_ranges = False
                length = headers.get("content-length")
                if length is None or not length.isdigit():
                    raise PermanentError(f"{what}: no Range support and no Content-Length")
                size = int(length)
            else:
                raise error_for_status(response.status_code, what, headers.get("retry-after"))
            return RemoteMeta(
                url=url,
                size=size,
                etag=headers.get("etag"),
                last_modified=headers.get("last-modified"),
                content_type=headers.get("content-type"),
                accepts_ranges=accepts_ranges,
            )

    async def fetch_range(
        self,
        meta: RemoteMeta,
        start: int,
        end: int,
        on_data: Callable[[bytes], None],
    ) -> None:
        """Stream bytes ``[start, end)`` of *meta*'s file into *on_data*, in order.

        ``If-Range`` carries the cached version's validator, so a changed file comes back as a
        200 and raises `RemoteChangedError` instead of mixing versions. *on_data* may have
        received part of the range when a transient error is raised; the caller keeps what it
        can use and asks again for the rest.
        """
        if not 0 <= start < end <= meta.size:
            raise ValueError(f"bad range [{start}, {end}) for size {meta.size}")
        what = f"GET {redact_url(meta.url)} bytes {start}-{end - 1}"
        headers = {"Range": f"bytes={start}-{end - 1}"}
        validator = meta.validator
        if validator:
            headers["If-Range"] = validator
        async with self._limiter, self._request(meta.url, headers, what) as response:
            self._check_range_response(response, meta, start, end, what, bool(validator))
            expected = end - start
            received = 0
            async for chunk in response.aiter_raw():
                if received + len(chunk) > expected:
                    raise ProtocolViolationError(f"{what}: body longer than the range")
                received += len(chunk)
                self.bytes_received += len(chunk)
                on_data(chunk)
            if received != expected:
                raise TransientError(f"{what}: body ended after {received} of {expected} bytes")

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
            if sent_validator and meta.accepts_ranges:
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

    def _request(self, url: str, headers: dict[str, str], what: str) -> _Exchange:
        return _Exchange(self, url, headers, what)


class _Exchange:
    """Async context manager around one streamed request that maps httpx errors to ours."""

    def __init__(self, source: HttpSource, url: str, headers: dict[str, str], what: str) -> None:
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


def _map_httpx_error(err: httpx.HTTPError, what: str) -> HttpSourceError:
    """Translate httpx's exception tree into transient/permanent, without leaking the URL."""
    if isinstance(err, httpx.TimeoutException):
        return TransientError(f"{what}: timed out ({type(err).__name__})")
    if isinstance(err, httpx.TooManyRedirects):
        return PermanentError(f"{what}: too many redirects")
    if isinstance(err, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return PermanentError(f"{what}: {type(err).__name__}")
    if isinstance(err, httpx.TransportError):
        return TransientError(f"{what}: {type(err).__name__}: {_short(err)}")
    return PermanentError(f"{what}: {type(err).__name__}")


def _short(err: BaseException) -> str:
    """First line of an exception message, with any URL stripped of its query."""
    text = str(err).splitlines()[0] if str(err) else ""
    return re.sub(r"https?://\S+", lambda m: redact_url(m.group(0)), text)[:200]
