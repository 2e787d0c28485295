"""Range requests and conditional requests (RFC 9110 §13 and §14), as pure functions.

The HTTP server is an origin server to its clients: it answers ``Range`` with 206 (one range,
or ``multipart/byteranges`` for several), 416 when no range can be satisfied, and evaluates
``If-Match``, ``If-Unmodified-Since``, ``If-None-Match``, ``If-Modified-Since`` and
``If-Range`` against the validators its own origin sent (ETag, Last-Modified), in the order
of RFC 9110 §13.2.2. Everything here is a function of header values and a size, so it is
tested on its own (``tests/test_serve_ranges.py``, with hypothesis).

What a malformed header does follows the RFC's "ignore what you cannot parse": a Range that
is not valid ``bytes=`` syntax is ignored (the whole representation, 200), and so is a
conditional header with an unparsable date.
"""

from __future__ import annotations

import email.utils
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: At most this many parts in a multipart/byteranges answer. A request for more (after
#: overlapping and adjacent ranges are merged) gets the whole representation, as RFC 9110
#: §14.2 allows: many small ranges cost a server more than they save a client.
MAX_PARTS = 64

_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)
_UNIT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
_ENTITY_TAG = re.compile(r'\s*((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)', re.ASCII)


class Unsatisfiable(Exception):
    """A valid byte Range of which no range overlaps the representation: 416."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of the representation (``end`` exclusive)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        """The ``Content-Range`` value of this part: ``bytes 0-99/1000``."""
        return f"bytes {self.start}-{self.end - 1}/{size}"


def parse_range(value: str, size: int) -> list[ByteRange] | None:
    """The ranges a ``Range`` header asks of a representation of *size* bytes.

    Returns None when the header must be ignored (another unit, bad syntax, a range whose
    last position is before its first, or more than `MAX_PARTS` parts once merged), so the
    whole representation is sent. Raises `Unsatisfiable` when the syntax is valid but no
    range overlaps the representation (every range of an empty one, ``bytes=-0``, a start
    at or past the end). Satisfiable ranges keep the order they were asked in, clamped to
    the representation; unsatisfiable ones are dropped. When any two overlap or touch, all
    of them are merged and sorted (RFC 9110 §14.2 lets a server coalesce).
    """
    unit, equals, rest = value.partition("=")
    if not equals or not _UNIT.fullmatch(unit.strip()) or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in rest.split(",")]
    specs = [spec for spec in specs if spec]  # list syntax allows empty elements
    if not specs:
        return None
    ranges: list[ByteRange] = []
    for spec in specs:
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None:
            return None
        first, last = match.group(1), match.group(2)
        if first:
            start = _number(first)
            if last and _number(last) < start:
                return None  # invalid: the whole header is ignored
            if start >= size:
                continue  # unsatisfiable, but others may be
            end = size if not last else min(_number(last) + 1, size)
            ranges.append(ByteRange(start, end))
        elif last:
            suffix = _number(last)
            if suffix == 0 or size == 0:
                continue
            ranges.append(ByteRange(max(0, size - suffix), size))
        else:
            return None  # "-" alone
    if not ranges:
        raise Unsatisfiable(value)
    ordered = sorted(ranges, key=lambda r: (r.start, r.end))
    if any(b.start <= a.end for a, b in itertools.pairwise(ordered)):
        ranges = _merge(ordered)
    if len(ranges) > MAX_PARTS:
        return None
    return ranges


def _number(digits: str) -> int:
    """A position; any number of more than 30 digits is past every file's end (int() of a
    huge one costs time, and Python refuses more than 4300 digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 30 else 10**30


def _merge(ordered: list[ByteRange]) -> list[ByteRange]:
    merged = [ordered[0]]
    for item in ordered[1:]:
        last = merged[-1]
        if item.start <= last.end:
            merged[-1] = ByteRange(last.start, max(last.end, item.end))
        else:
            merged.append(item)
    return merged


# -- validators -----------------------------------------------------------------------------


def parse_entity_tags(value: str) -> list[str] | None:
    """The entity tags of an ``If-Match``/``If-None-Match`` list (``["*"]`` for ``*``), or
    None when the value is not a valid list (the header is then ignored)."""
    if value.strip() == "*":
        return ["*"]
    tags: list[str] = []
    position = 0
    text = value.strip()
    while position < len(text):
        match = _ENTITY_TAG.match(text, position)
        if match is None:
            return None
        tags.append(match.group(1))
        position = match.end()
        while position < len(text) and text[position] in " \t,":
            position += 1
    return tags or None


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def strong_match(a: str | None, b: str | None) -> bool:
    """RFC 9110 §8.8.3.2: both strong, and the same opaque tag."""
    if not a or not b or a.startswith("W/") or b.startswith("W/"):
        return False
    return a == b


def weak_match(a: str | None, b: str | None) -> bool:
    """RFC 9110 §8.8.3.2: the same opaque tag, weak or not."""
    if not a or not b:
        return False
    return _opaque(a) == _opaque(b)


def parse_http_date(value: str | None) -> float | None:
    """Seconds since the epoch of an HTTP-date (IMF-fixdate, RFC 850 or asctime), or None."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def http_date(seconds: float) -> str:
    """An IMF-fixdate: ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return email.utils.formatdate(seconds, usegmt=True)


@dataclass(frozen=True, slots=True)
class Validators:
    """What identifies the representation served now: the origin's ETag and Last-Modified."""

    etag: str | None
    last_modified: str | None

    @property
    def modified(self) -> float | None:
        return parse_http_date(self.last_modified)


def preconditions(
    headers: Mapping[str, str], validators: Validators, *, method: str, now: float
) -> int | None:
    """The status that the conditional headers decide (412 or 304), or None to go on.

    RFC 9110 §13.2.2, in its order: If-Match (strong comparison; failing is 412), else
    If-Unmodified-Since; then If-None-Match (weak comparison; a match is 304 for GET and
    HEAD, 412 for other methods), else If-Modified-Since for GET and HEAD. If-Range is not
    a precondition: `range_applies` decides it.
    """
    etag, modified = validators.etag, validators.modified
    if_match = headers.get("if-match")
    if if_match is not None:
        tags = parse_entity_tags(if_match)
        if tags is not None and not (tags == ["*"] or any(strong_match(tag, etag) for tag in tags)):
            return 412
    else:
        since = parse_http_date(headers.get("if-unmodified-since"))
        if since is not None and modified is not None and modified > since:
            return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = parse_entity_tags(if_none_match)
        if tags is not None and (tags == ["*"] or any(weak_match(tag, etag) for tag in tags)):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD"):
        since = parse_http_date(headers.get("if-modified-since"))
        # A date in the future is invalid (RFC 9110 §13.1.3): ignored.
        if since is not None and since <= now and modified is not None and modified <= since:
            return 304
    return None


def range_applies(if_range: str | None, validators: Validators) -> bool:
    """Whether ``Range`` applies given ``If-Range`` (RFC 9110 §13.1.5).

    An entity tag must match strongly (a weak one never does); a date must be exactly the
    Last-Modified (a weak validator otherwise, which If-Range refuses). Anything else sends
    the whole representation: the client's partial copy is of another version.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return strong_match(value, validators.etag)
    when = parse_http_date(value)
    modified = validators.modified
    return when is not None and modified is not None and when == modified


def multipart_lengths(
    ranges: list[ByteRange], size: int, content_type: str, boundary: str
) -> tuple[list[bytes], bytes, int]:
    """The part headers of a ``multipart/byteranges`` body, its closing delimiter, and the
    body's exact length (RFC 9110 §14.6), so the answer can carry Content-Length."""
    heads = [
        (
            f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {part.content_range(size)}\r\n\r\n"
        ).encode("latin-1")
        for part in ranges
    ]
    tail = f"\r\n--{boundary}--\r\n".encode("latin-1")
    length = sum(len(head) for head in heads) + sum(p.length for p in ranges) + len(tail)
    return heads, tail, length
