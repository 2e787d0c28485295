"""The pure parts of the HTTP server: Range, conditional headers, paths, hosts, addresses.

`remotefs.serve.ranges` against a model of RFC 9110 §14 written here from the RFC's rules
(hypothesis draws the headers), the precondition order of §13.2.2 case by case, and the
helpers that decide what a request may name (`_path_parts`, `_loopback_host`) and where the
server may listen (`remotefs.serve.listen`).
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remotefs.serve.app import _loopback_host, _path_parts
from remotefs.serve.listen import (
    Listen,
    ListenError,
    check_exposure,
    is_loopback,
    load_token,
    parse_listen,
)
from remotefs.serve.pages import wants_json
from remotefs.serve.ranges import (
    MAX_PARTS,
    ByteRange,
    Unsatisfiable,
    Validators,
    http_date,
    multipart_lengths,
    parse_entity_tags,
    parse_http_date,
    parse_range,
    preconditions,
    range_applies,
)

# -- Range against a model -------------------------------------------------------------------

Spec = tuple[int | None, int | None]  # (first, last) as written; None: left out


def spec_text(spec: Spec) -> str:
    first, last = spec
    return f"{'' if first is None else first}-{'' if last is None else last}"


def model(specs: list[Spec], size: int) -> list[tuple[int, int]] | str | None:
    """RFC 9110 §14.1.1-§14.2 written out plainly: the satisfiable ranges in order, None to
    ignore the header, or "416"."""
    wanted: list[tuple[int, int]] = []
    for first, last in specs:
        if first is None and last is None:
            return None
        if first is not None and last is not None and last < first:
            return None
        if first is None:
            assert last is not None
            if last > 0 and size > 0:
                wanted.append((max(0, size - last), size))
        elif first < size:
            wanted.append((first, size if last is None else min(last + 1, size)))
    if not wanted:
        return "416"
    return wanted


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {byte for start, end in ranges for byte in range(start, end)}


positions = st.one_of(st.none(), st.integers(0, 300))
specs = st.lists(st.tuples(positions, positions), min_size=1, max_size=6)


@settings(max_examples=500)
@given(specs, st.integers(0, 250), st.sampled_from(["", " ", "  "]))
def test_parse_range_follows_the_rfc(request_specs: list[Spec], size: int, space: str) -> None:
    header = "bytes=" + f",{space}".join(spec_text(spec) for spec in request_specs)
    expected = model(request_specs, size)
    if expected == "416":
        with pytest.raises(Unsatisfiable):
            parse_range(header, size)
        return
    got = parse_range(header, size)
    if expected is None:
        assert got is None
        return
    assert got is not None and isinstance(expected, list)
    pairs = [(r.start, r.end) for r in got]
    assert all(0 <= start < end <= size for start, end in pairs)
    ordered = sorted(expected)
    overlapping = any(b[0] <= a[1] for a, b in itertools.pairwise(ordered))
    if overlapping:
        # Coalesced: sorted, disjoint, not touching, and covering exactly the same bytes.
        assert pairs == sorted(pairs)
        assert all(b[0] > a[1] for a, b in itertools.pairwise(pairs))
        assert covered(pairs) == covered(expected)
    else:
        assert pairs == expected  # the order asked for


@given(st.text(max_size=40), st.integers(0, 1000))
def test_parse_range_never_fails_on_garbage(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except Unsatisfiable:
        return
    assert got is None or all(0 <= r.start < r.end <= size for r in got)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 1000, [(0, 1)]),  # first byte
        ("bytes=500-599", 1000, [(500, 600)]),  # middle
        ("bytes=999-999", 1000, [(999, 1000)]),  # last byte
        ("bytes=-500", 1000, [(500, 1000)]),  # suffix
        ("bytes=-5000", 1000, [(0, 1000)]),  # a suffix longer than the file
        ("bytes=900-", 1000, [(900, 1000)]),
        ("bytes=900-5000", 1000, [(900, 1000)]),  # past EOF: clamped
        ("BYTES = 1-2", 1000, [(1, 3)]),  # the unit is case-insensitive
        ("bytes=0-1,,5-6", 1000, [(0, 2), (5, 7)]),  # empty list elements are allowed
        ("bytes=5-6,0-1", 1000, [(5, 7), (0, 2)]),  # kept in the order asked
        ("bytes=0-5,3-9", 1000, [(0, 10)]),  # overlapping: merged
        ("bytes=0-4,5-9", 1000, [(0, 10)]),  # touching: merged
        ("bytes=2000-,0-0", 1000, [(0, 1)]),  # an unsatisfiable one is dropped
        ("bytes=5-4", 1000, None),  # last before first: invalid, ignored
        ("items=0-1", 1000, None),  # another unit
        ("bytes=a-b", 1000, None),
        ("bytes=-", 1000, None),
        ("bytes 0-1", 1000, None),
        ("bytes=" + "9" * 5000 + "-", 1000, "416"),  # huge numbers are past every end
        ("bytes=0-" + "9" * 5000, 1000, [(0, 1000)]),
        ("bytes=1000-", 1000, "416"),  # past EOF
        ("bytes=-0", 1000, "416"),
        ("bytes=0-0", 0, "416"),  # every range of an empty file
    ],
)
def test_parse_range_cases(header: str, size: int, expected: object) -> None:
    if expected == "416":
        with pytest.raises(Unsatisfiable):
            parse_range(header, size)
        return
    got = parse_range(header, size)
    assert (None if got is None else [(r.start, r.end) for r in got]) == expected


def test_too_many_parts_get_the_whole_file() -> None:
    many = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_PARTS + 1))
    assert parse_range(f"bytes={many}", 100_000) is None
    fewer = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_PARTS))
    got = parse_range(f"bytes={fewer}", 100_000)
    assert got is not None and len(got) == MAX_PARTS


@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(1, 50)), min_size=2, max_size=5),
    st.integers(500, 600),
)
def test_multipart_length_is_the_length_of_the_body(
    parts: list[tuple[int, int]], size: int
) -> None:
    data = bytes(range(256)) * 3
    ranges = [ByteRange(start, min(start + length, size)) for start, length in parts]
    heads, tail, length = multipart_lengths(ranges, size, "video/mp4", "B0UNDARY")
    body = b"".join(head + data[r.start : r.end] for head, r in zip(heads, ranges, strict=True))
    body += tail
    assert len(body) == length
    # A MIME parser reads the parts back, each with its Content-Range and bytes.
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: multipart/byteranges; boundary=B0UNDARY\r\n\r\n" + body
    )
    assert isinstance(message, email.message.EmailMessage)
    got = list(message.iter_parts())
    assert len(got) == len(ranges)
    for part, byte_range in zip(got, ranges, strict=True):
        assert part["Content-Range"] == byte_range.content_range(size)
        assert part.get_payload(decode=True) == data[byte_range.start : byte_range.end]


# -- conditional requests --------------------------------------------------------------------

LM = "Mon, 30 Nov 2026 00:00:00 GMT"
BEFORE = "Sun, 29 Nov 2026 00:00:00 GMT"
AFTER = "Tue, 01 Dec 2026 00:00:00 GMT"
NOW = parse_http_date("Wed, 02 Dec 2026 00:00:00 GMT") or 0.0
STRONG = Validators('"v1"', LM)
WEAK = Validators('W/"v1"', LM)
NONE = Validators(None, None)


@pytest.mark.parametrize(
    ("headers", "validators", "method", "expected"),
    [
        ({}, STRONG, "GET", None),
        ({"if-none-match": '"v1"'}, STRONG, "GET", 304),
        ({"if-none-match": '"v1"'}, STRONG, "HEAD", 304),
        ({"if-none-match": 'W/"v1"'}, STRONG, "GET", 304),  # weak comparison
        ({"if-none-match": '"v1"'}, WEAK, "GET", 304),
        ({"if-none-match": '"x", "v1"'}, STRONG, "GET", 304),
        ({"if-none-match": '"v2"'}, STRONG, "GET", None),
        ({"if-none-match": "*"}, STRONG, "GET", 304),
        ({"if-none-match": '"v1"'}, NONE, "GET", None),
        ({"if-modified-since": LM}, STRONG, "GET", 304),
        ({"if-modified-since": AFTER}, STRONG, "GET", 304),
        ({"if-modified-since": BEFORE}, STRONG, "GET", None),
        ({"if-modified-since": "garbage"}, STRONG, "GET", None),
        ({"if-modified-since": "Mon, 30 Nov 2099 00:00:00 GMT"}, STRONG, "GET", None),  # future
        ({"if-modified-since": LM}, NONE, "GET", None),
        # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2 step 3 before 4).
        ({"if-none-match": '"v2"', "if-modified-since": AFTER}, STRONG, "GET", None),
        ({"if-match": '"v1"'}, STRONG, "GET", None),
        ({"if-match": '"v2"'}, STRONG, "GET", 412),
        ({"if-match": 'W/"v1"'}, STRONG, "GET", 412),  # strong comparison
        ({"if-match": '"v1"'}, WEAK, "GET", 412),
        ({"if-match": "*"}, STRONG, "GET", None),
        ({"if-unmodified-since": BEFORE}, STRONG, "GET", 412),
        ({"if-unmodified-since": LM}, STRONG, "GET", None),
        # If-Match is evaluated first; If-Unmodified-Since only without it.
        ({"if-match": '"v1"', "if-unmodified-since": BEFORE}, STRONG, "GET", None),
    ],
)
def test_preconditions(
    headers: dict[str, str], validators: Validators, method: str, expected: int | None
) -> None:
    assert preconditions(headers, validators, method=method, now=NOW) == expected


@pytest.mark.parametrize(
    ("if_range", "validators", "applies"),
    [
        (None, STRONG, True),
        ('"v1"', STRONG, True),
        ('"v2"', STRONG, False),
        ('W/"v1"', WEAK, False),  # a weak tag never matches in If-Range
        ('"v1"', WEAK, False),
        (LM, STRONG, True),
        (BEFORE, STRONG, False),
        ("garbage", STRONG, False),
        (LM, NONE, False),
    ],
)
def test_if_range(if_range: str | None, validators: Validators, applies: bool) -> None:
    assert range_applies(if_range, validators) is applies


def test_entity_tag_lists() -> None:
    assert parse_entity_tags('"a", W/"b" ,"c,d"') == ['"a"', 'W/"b"', '"c,d"']
    assert parse_entity_tags("*") == ["*"]
    assert parse_entity_tags("a") is None
    assert parse_entity_tags('"a" junk') is None


@given(st.integers(0, 4_000_000_000))
def test_http_dates_round_trip(seconds: int) -> None:
    assert parse_http_date(http_date(seconds)) == seconds


def test_http_date_formats() -> None:
    # IMF-fixdate, RFC 850 and asctime (RFC 9110 §5.6.7).
    for text in (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ):
        assert parse_http_date(text) == 784111777, text
    assert parse_http_date("yesterday") is None


# -- what a request may name, and from where ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        (b"/", [""]),
        (b"/a.bin", ["a.bin"]),
        (b"/dir/", ["dir", ""]),
        (b"/a%20b/c%C3%A9.mp4", ["a b", "c\u00e9.mp4"]),
        (b"/%2e%2e/etc/passwd", None),  # an encoded dot segment
        (b"/../etc/passwd", None),
        (b"/a/./b", None),
        (b"/a%2Fb", None),  # a slash inside a name: no such name can exist
        (b"/a//b", None),
        (b"/%00", None),
        (b"/%ff", None),  # not UTF-8
        (b"http://example.org/a.bin", None),  # absolute-form: never a proxy
        (b"*", None),
    ],
)
def test_path_parts(raw: bytes, parts: list[str] | None) -> None:
    assert _path_parts(raw) == parts


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (None, True),
        ("127.0.0.1", True),
        ("127.0.0.1:8080", True),
        ("localhost:8080", True),
        ("LOCALHOST", True),
        ("[::1]:8080", True),
        ("127.1.2.3:80", True),
        ("evil.example:8080", False),  # DNS rebinding
        ("10.0.0.1:8080", False),
        ("[::ffff:10.0.0.1]:80", False),
    ],
)
def test_loopback_host(host: str | None, allowed: bool) -> None:
    assert _loopback_host(host) is allowed


@pytest.mark.parametrize(
    ("accept", "as_json"),
    [
        (None, False),
        ("application/json", True),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
        ("application/json, text/plain, */*", True),
        ("text/html;q=0.5, application/json", True),
        ("application/json;q=0.1, text/html", False),
        ("*/*", False),
    ],
)
def test_wants_json(accept: str | None, as_json: bool) -> None:
    assert wants_json(accept) is as_json


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("8080", "127.0.0.1", 8080),
        ("[::1]:0", "::1", 0),
        ("localhost:80", "localhost", 80),
        ("0.0.0.0:8080", "0.0.0.0", 8080),
    ],
)
def test_parse_listen(text: str, host: str, port: int) -> None:
    assert parse_listen(text) == Listen(host, port)


@pytest.mark.parametrize(
    "text", ["", ":80", "127.0.0.1", "127.0.0.1:http", "::1:80", "[::1]", "1:99999"]
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ListenError):
        parse_listen(text)


def test_loopback_and_exposure() -> None:
    assert is_loopback(Listen("127.0.0.1", 80))
    assert is_loopback(Listen("::1", 80))
    assert is_loopback(Listen("localhost", 80))
    assert not is_loopback(Listen("0.0.0.0", 80))
    assert not is_loopback(Listen("::", 80))
    assert not is_loopback(Listen("192.0.2.1", 80))
    assert not is_loopback(Listen("no-such-host.invalid", 80))
    check_exposure(Listen("127.0.0.1", 80), None)
    check_exposure(Listen("0.0.0.0", 80), "a" * 32)  # with a token: allowed
    with pytest.raises(ListenError, match="not a loopback address, without --token-file"):
        check_exposure(Listen("0.0.0.0", 80), None)


def test_token_files(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text("0123456789abcdef0123\n")
    good.chmod(0o600)
    assert load_token(good) == "0123456789abcdef0123"
    good.chmod(0o640)
    with pytest.raises(ListenError, match="too open"):
        load_token(good)
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ListenError, match="at least 16"):
        load_token(short)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(ListenError):
        load_token(link)
    with pytest.raises(ListenError, match="No such file"):
        load_token(tmp_path / "missing")
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.write_text("0123456789abcdef0123\n")
        other.chmod(0o600)
        os.chown(other, 65534, 65534)
        with pytest.raises(ListenError, match="not by you"):
            load_token(other)
