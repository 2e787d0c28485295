"""Unit checks of the HTTP options: header syntax in urls.txt and header files, which headers
a request carries (redirect targets included), the proxy URL check, and HTTP/2 on by default."""

from __future__ import annotations

import pytest
import trio

from remotefs.config.manifest import (
    HeaderError,
    ManifestError,
    parse_header_lines,
    parse_header_option,
    parse_manifest_text,
)
from remotefs.config.options import MountOptions
from remotefs.http.source import HttpSource

SECRET = "s3cr3t-value"


def test_indented_header_lines_belong_to_the_url_above() -> None:
    entries = parse_manifest_text(
        "https://h/a.bin   dir/with space.bin\n"
        f"    Authorization: Bearer {SECRET}\n"
        "\t# a comment between header lines\n"
        "\tX-Two:  two words \n"
        "https://h/b.bin\n"
        "  https://h/c.bin\n",  # an indented URL is still a URL line, as before
        "urls.txt",
    )
    assert [e.path for e in entries] == [("dir", "with space.bin"), ("b.bin",), ("c.bin",)]
    assert entries[0].headers == (("Authorization", f"Bearer {SECRET}"), ("X-Two", "two words"))
    assert entries[1].headers == entries[2].headers == ()
    assert SECRET not in repr(entries[0])


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (f"  Authorization: {SECRET}\nhttps://h/a\n", 1, "must follow its URL line"),
        (f"https://h/a\n\n  Authorization: {SECRET}\n", 3, "must follow its URL line"),
        (f"https://h/a\n  Authorization {SECRET}\n", 2, "malformed header line"),
        (f"https://h/a\n  Bad Name: {SECRET}\n", 2, "malformed header line"),
        (f"https://h/a\n  X-A: {SECRET}\x01\n", 2, "control characters"),
        ("https://h/a\n  Range: bytes=0-\n", 2, "set by remotefs itself"),
        ("https://h/a\n  Accept-Encoding: gzip\n", 2, "set by remotefs itself"),
        (f"https://h/a\n  X-A: {SECRET}\nhttps://h/a other\n", 3, "with other headers"),
        # Latin-1 and UTF-8 values: HTTP cannot carry them, and they once ended the daemon.
        (f"https://h/a\n  X-Name: caf\u00e9 {SECRET}\n", 2, "non-ASCII characters"),
        (f"https://h/a\n  X-Name: \u65e5\u672c {SECRET}\n", 2, "non-ASCII characters"),
    ],
)
def test_header_line_errors_name_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest_text(text, "urls.txt")
    assert info.value.line == line
    assert reason in str(info.value)
    assert str(info.value).startswith(f"urls.txt:{line}: ")
    assert SECRET not in str(info.value)


def test_header_file_and_option() -> None:
    lines = ["\ufeff# comment", "", f"Authorization: Bearer {SECRET}", "X-Empty:"]
    assert parse_header_lines(lines, "h.txt") == (
        ("Authorization", f"Bearer {SECRET}"),
        ("X-Empty", ""),
    )
    with pytest.raises(HeaderError, match=r"^h\.txt:2: malformed header line") as info:
        parse_header_lines(["X-Ok: 1", f"Authorization {SECRET}"], "h.txt")
    assert SECRET not in str(info.value)
    with pytest.raises(HeaderError, match=r"^h\.txt:1: header 'X-Name': the value has non-ASCII"):
        parse_header_lines([f"X-Name: caf\u00e9{SECRET}"], "h.txt")
    with pytest.raises(HeaderError, match="non-ASCII") as info:
        parse_header_option(f"X-Name: \u00e9{SECRET}")
    assert SECRET not in str(info.value)
    assert parse_header_option("Cookie: a=b") == ("Cookie", "a=b")
    with pytest.raises(HeaderError) as info:
        parse_header_option(SECRET)
    assert SECRET not in str(info.value)


def test_request_headers_and_redirect_targets() -> None:
    trio.run(_request_headers_and_redirect_targets)


async def _request_headers_and_redirect_targets() -> None:
    options = MountOptions(
        headers=(("Authorization", "Bearer global"), ("X-Global", "g"), ("Cookie", "c=1"))
    )
    url = "http://origin.example/f"
    source = HttpSource(options, {url: [("Authorization", "Bearer mine"), ("X-Url", "u")]})
    try:
        assert source.request_headers(url, url, {"Range": "bytes=0-0"}) == [
            ("X-Global", "g"),
            ("Cookie", "c=1"),
            ("Authorization", "Bearer mine"),
            ("X-Url", "u"),
            ("Range", "bytes=0-0"),
        ]
        # Another URL gets the global headers only.
        assert source.request_headers("http://other/x", "http://other/x", {}) == [
            ("Authorization", "Bearer global"),
            ("X-Global", "g"),
            ("Cookie", "c=1"),
        ]
        # A remembered target on another origin: no Authorization, no Cookie (httpx's rule).
        names = [n for n, _ in source.request_headers(url, "https://cdn.example/f?sig=1", {})]
        assert names == ["X-Global", "X-Url"]
        # Same origin, or the https upgrade of the same host: Authorization stays.
        for target in ("http://origin.example:80/g", "https://origin.example/f"):
            names = [n for n, _ in source.request_headers(url, target, {})]
            assert names == ["X-Global", "Authorization", "X-Url"], target
    finally:
        await source.aclose()


def test_proxy_url_check_never_echoes_it() -> None:
    for good in ("http://p:3128", "https://p", "socks5://p:1080", "SOCKS5H://u:pw@p:1"):
        assert MountOptions(proxy=good).proxy == good
    for bad in (f"ftp://u:{SECRET}@p", f"u:{SECRET}@p:1", "http://"):
        with pytest.raises(ValueError) as info:
            MountOptions(proxy=bad)
        assert SECRET not in str(info.value)
    assert SECRET not in repr(MountOptions(proxy=f"http://u:{SECRET}@p", headers=(("A", SECRET),)))


def test_http2_is_offered_unless_turned_off() -> None:
    trio.run(_http2_is_offered_unless_turned_off)


async def _http2_is_offered_unless_turned_off() -> None:
    for enabled in (True, False):
        source = HttpSource(MountOptions(http2=enabled))
        try:
            pool = source._client._transport._pool  # type: ignore[attr-defined]
            assert pool._http2 is enabled
            assert pool._http1 is True
        finally:
            await source.aclose()
