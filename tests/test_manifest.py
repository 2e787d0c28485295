"""Tests for the urls.txt manifest parser (remotefs.config.manifest)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

import remotefs.config.manifest as manifest_module
from remotefs.config.manifest import (
    ManifestEntry,
    ManifestError,
    load_manifest,
    parse_manifest_bytes,
    parse_manifest_text,
)
from remotefs.redact import redact_url

SRC = "urls.txt"


def parse(text: str) -> list[ManifestEntry]:
    return parse_manifest_text(text, SRC)


def paths(text: str) -> list[tuple[str, ...]]:
    return [entry.path for entry in parse(text)]


def error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse(text)
    return info.value


def assert_error(text: str, line: int, *fragments: str) -> ManifestError:
    err = error(text)
    assert err.source == SRC
    assert err.line == line
    message = str(err)
    assert message.startswith(f"{SRC}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return err


# --- ManifestError ---------------------------------------------------------------------------


def test_error_str_with_line() -> None:
    err = ManifestError("m.txt", 7, "boom")
    assert str(err) == "m.txt:7: boom"
    assert (err.source, err.line, err.reason) == ("m.txt", 7, "boom")
    assert isinstance(err, ValueError)


def test_error_str_without_line() -> None:
    assert str(ManifestError("m.txt", None, "boom")) == "m.txt: boom"


def test_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(ManifestError("m.txt", 3, "boom")))
    assert str(err) == "m.txt:3: boom"
    assert err.line == 3


# --- valid manifests ---------------------------------------------------------------------------


def test_single_url_uses_last_path_segment() -> None:
    assert parse("https://example.com/isos/debian.iso\n") == [
        ManifestEntry(url="https://example.com/isos/debian.iso", path=("debian.iso",), line=1)
    ]


def test_default_name_is_percent_decoded() -> None:
    assert paths("https://example.com/a%20b.bin") == [("a b.bin",)]


def test_explicit_nested_path_creates_directories() -> None:
    assert paths("https://example.com/d.iso isos/debian.iso") == [("isos", "debian.iso")]


def test_one_leading_slash_in_path_is_ignored() -> None:
    assert paths("https://example.com/d.iso /isos/debian.iso") == [("isos", "debian.iso")]


def test_path_may_contain_spaces() -> None:
    assert paths("https://example.com/x   my files/big file.bin  ") == [
        ("my files", "big file.bin")
    ]


def test_comments_and_blank_lines_are_skipped_and_lines_counted() -> None:
    text = "# header\n\n   \n  # indented comment\nhttps://h/a.bin\n\nhttps://h/b.bin\n"
    assert [(e.path, e.line) for e in parse(text)] == [(("a.bin",), 5), (("b.bin",), 7)]


def test_surrounding_whitespace_and_crlf_are_ignored() -> None:
    entries = parse("  \thttps://h/a.bin\t \r\nhttps://h/b.bin x/y \r\n")
    assert [(e.url, e.path) for e in entries] == [
        ("https://h/a.bin", ("a.bin",)),
        ("https://h/b.bin", ("x", "y")),
    ]


def test_utf8_bom_is_ignored() -> None:
    entries = parse_manifest_bytes("\ufeffhttps://h/a.bin\n".encode(), SRC)
    assert [(e.url, e.path) for e in entries] == [("https://h/a.bin", ("a.bin",))]


def test_bom_in_text_is_ignored() -> None:
    assert paths("\ufeff# comment\nhttps://h/a.bin") == [("a.bin",)]


def test_query_string_is_kept_and_not_used_for_name() -> None:
    url = "https://bucket.s3.amazonaws.com/f.bin?X-Amz-Signature=abc&X-Amz-Expires=60"
    assert parse(url) == [ManifestEntry(url=url, path=("f.bin",), line=1)]


def test_fragment_is_dropped() -> None:
    assert parse("https://h/f.bin?a=1#part2") == [
        ManifestEntry(url="https://h/f.bin?a=1", path=("f.bin",), line=1)
    ]


def test_ipv6_host_with_port() -> None:
    assert parse("http://[::1]:8080/f") == [
        ManifestEntry(url="http://[::1]:8080/f", path=("f",), line=1)
    ]


def test_scheme_is_case_insensitive_and_url_kept_as_written() -> None:
    assert [e.url for e in parse("HTTPS://Example.COM/a.bin\nHttp://h/b.bin")] == [
        "HTTPS://Example.COM/a.bin",
        "Http://h/b.bin",
    ]


def test_unicode_names_are_kept() -> None:
    assert paths("https://h/%C3%A9t%C3%A9.txt\nhttps://h/x données/ü.bin") == [
        ("été.txt",),
        ("données", "ü.bin"),
    ]


def test_files_may_share_a_directory() -> None:
    text = "https://h/a isos/a.iso\nhttps://h/b isos/b.iso\nhttps://h/c isos/deep/c.iso"
    assert paths(text) == [("isos", "a.iso"), ("isos", "b.iso"), ("isos", "deep", "c.iso")]


def test_path_overrides_unusable_url_name() -> None:
    assert paths("https://h/dir/ index.html\nhttps://h index2.html") == [
        ("index.html",),
        ("index2.html",),
    ]


def test_name_of_255_bytes_is_allowed() -> None:
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert paths(f"https://h/f {name}") == [(name,)]


def test_userinfo_is_allowed() -> None:
    assert [e.url for e in parse("https://user:pw@h/f.bin")] == ["https://user:pw@h/f.bin"]


# --- errors: URL -------------------------------------------------------------------------------


def test_unsupported_scheme() -> None:
    assert_error(
        "https://h/ok.bin\nftp://h/f.bin",
        2,
        "unsupported URL scheme 'ftp' (only http and https)",
    )


def test_missing_scheme() -> None:
    assert_error("example.com/f.bin", 1, "no scheme", "http://")


def test_no_host() -> None:
    assert_error("http:///f.bin", 1, "malformed URL", "no host")


def test_no_host_with_userinfo_only() -> None:
    assert_error("http://user@/f.bin", 1, "no host")


@pytest.mark.parametrize("port", ["abc", "99999", "0", "+80"])
def test_invalid_port(port: str) -> None:
    assert_error(f"http://h:{port}/f.bin", 1, "malformed URL", "invalid port")


@pytest.mark.parametrize(
    "url", ["http://[::1/f", "http://[1.2.3.4]/f", "http://a[::1]/f", "http://[::1]x/f"]
)
def test_invalid_bracketed_host(url: str) -> None:
    assert_error(url, 1, "malformed URL", "invalid host")


@pytest.mark.parametrize("url", ["http://ex<ample.com/f", "http://a^b/f", "http://a|b/f"])
def test_forbidden_host_characters(url: str) -> None:
    assert_error(url, 1, "invalid host")


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x08"])
def test_control_characters_in_url(char: str) -> None:
    err = assert_error(f"https://h/a{char}b.bin", 1, "malformed URL", "control characters")
    assert char not in str(err)  # shown escaped, so it cannot mess up the terminal


# --- errors: file name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://h",
        "https://h/%2e%2e",
        "https://h/.",
        "https://h/a%2Fb",
        "https://h/a%00b",
        "https://h/a%FFb",
        "https://h/a%0Ab",
    ],
)
def test_url_without_usable_name_needs_path(url: str) -> None:
    assert_error(f"# c\n{url}", 2, "add a PATH after the URL")


def test_too_long_url_name_needs_path() -> None:
    assert_error("https://h/" + "a" * 256, 1, "256 bytes", "add a PATH")


# --- errors: PATH ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["..", "a/../b", "a/..", "./a", "a/./b"])
def test_dot_segments_in_path(path: str) -> None:
    assert_error(f"https://h/f.bin {path}", 1, "invalid PATH", "not allowed")


@pytest.mark.parametrize("path", ["a//b", "//a"])
def test_empty_segment_in_path(path: str) -> None:
    assert_error(f"https://h/f.bin {path}", 1, "invalid PATH", "empty segment")


@pytest.mark.parametrize("path", ["a/", "/"])
def test_directory_path_for_a_file_url(path: str) -> None:
    assert_error(f"https://h/f.bin {path}", 1, "ends in '/' but the URL is a file")


def test_nul_in_path() -> None:
    assert_error("https://h/f.bin a\0b", 1, "invalid PATH", "NUL")


def test_control_character_in_path() -> None:
    assert_error("https://h/f.bin a\x1bb", 1, "invalid PATH", "control character")


def test_segment_longer_than_255_bytes() -> None:
    name = "é" * 128  # 256 bytes in UTF-8, only 128 characters
    assert_error(f"https://h/f.bin dir/{name}", 1, "invalid PATH", "256 bytes", "at most 255")


def test_lone_surrogate_in_path() -> None:
    assert_error("https://h/f.bin a\udcffb", 1, "cannot be encoded as UTF-8")


# --- errors: clashes ---------------------------------------------------------------------------


def test_duplicate_path() -> None:
    text = "https://h/x.bin\n\nhttps://h/a a/b\nhttps://h/y a/b"
    assert_error(text, 4, "path 'a/b' is already used on line 3")


def test_duplicate_default_name() -> None:
    assert_error("https://h1/f.bin\nhttps://h2/f.bin", 2, "path 'f.bin' is already used on line 1")


def test_duplicate_ignores_leading_slash() -> None:
    assert_error("https://h/a a/b\nhttps://h/b /a/b", 2, "already used on line 1")


def test_file_then_used_as_directory() -> None:
    assert_error("https://h/x\nhttps://h/y x/y", 2, "'x' to be a directory", "line 1")


def test_directory_then_used_as_file() -> None:
    assert_error("https://h/y x/y/z\nhttps://h/x x", 2, "'x' is already a directory", "line 1")


def test_deep_file_used_as_directory() -> None:
    text = "https://h/1 a/b\nhttps://h/2 a/b/c/d"
    assert_error(text, 2, "'a/b' to be a directory", "line 1")


def test_first_error_wins() -> None:
    assert_error("https://h/ok\nftp://h/f\nhttps://h/ok", 2, "unsupported URL scheme")


# --- errors: whole file ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  \n", "\ufeff"])
def test_no_entries(text: str) -> None:
    err = error(text)
    assert err.line is None
    assert str(err) == f"{SRC}: no URLs in the file"


def test_invalid_utf8_names_the_line() -> None:
    data = b"https://h/a.bin\n# comment\nhttps://h/b.bin caf\xe9\n"
    with pytest.raises(ManifestError) as info:
        parse_manifest_bytes(data, SRC)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{SRC}:3: not valid UTF-8")
    assert "0xe9" in str(info.value)
    assert "column 20" in str(info.value)


def test_invalid_utf8_on_first_line() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest_bytes(b"\xff", SRC)
    assert str(info.value) == f"{SRC}:1: not valid UTF-8 (byte 0xff at column 1)"


# --- load_manifest -----------------------------------------------------------------------------


def test_load_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "urls.txt"
    manifest.write_bytes(b"\xef\xbb\xbf# mirrors\r\nhttps://h/d.iso isos/debian.iso\r\n")
    assert load_manifest(manifest) == [
        ManifestEntry(url="https://h/d.iso", path=("isos", "debian.iso"), line=2)
    ]


def test_load_manifest_accepts_str(tmp_path: Path) -> None:
    manifest = tmp_path / "urls.txt"
    manifest.write_text("https://h/a.bin\n", encoding="utf-8")
    assert load_manifest(str(manifest))[0].path == ("a.bin",)


def test_load_manifest_error_uses_path_as_given(tmp_path: Path) -> None:
    manifest = tmp_path / "urls.txt"
    manifest.write_text("https://h/a.bin\nftp://h/b.bin\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert str(info.value).startswith(f"{manifest}:2: unsupported URL scheme")


def test_load_manifest_invalid_utf8(tmp_path: Path) -> None:
    manifest = tmp_path / "urls.txt"
    manifest.write_bytes(b"https://h/a.bin\n\xc3(\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert str(info.value).startswith(f"{manifest}:2: not valid UTF-8")


def test_load_manifest_empty_file(tmp_path: Path) -> None:
    manifest = tmp_path / "urls.txt"
    manifest.write_bytes(b"")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert str(info.value) == f"{manifest}: no URLs in the file"


def test_load_manifest_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ManifestError) as info:
        load_manifest(missing)
    assert info.value.line is None
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def test_load_manifest_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert info.value.line is None
    assert str(info.value) == (
        f"{tmp_path}: cannot read: a directory, not a regular file (give a text file)"
    )


def test_load_manifest_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    """A FIFO given as urls.txt used to hang `remotefs mount` until something wrote to it."""
    fifo = tmp_path / "urls.txt"
    os.mkfifo(fifo)
    began = time.monotonic()
    with pytest.raises(ManifestError) as info:
        load_manifest(fifo)
    assert time.monotonic() - began < 2
    assert str(info.value) == f"{fifo}: cannot read: a FIFO, not a regular file (give a text file)"


def test_load_manifest_refuses_a_device(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest("/dev/zero")
    assert "a device, not a regular file" in str(info.value)


def test_load_manifest_permission_error_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same as above, but also runs as root, by making open() itself fail."""

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(manifest_module.os, "open", denied)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "urls.txt")
    assert str(info.value) == f"{tmp_path / 'urls.txt'}: cannot read: Permission denied"


# --- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h/f.bin", "https://h/f.bin"),
        ("https://h/f?X-Amz-Signature=SECRET", "https://h/f?<redacted>"),
        ("https://h/f?", "https://h/f?<redacted>"),
        ("https://u:SECRET@h/f", "https://***@h/f"),
        ("https://TOKEN@h/f", "https://***@h/f"),
        ("https://u:SE@CRET@h:8443/f", "https://***@h:8443/f"),
        ("https://u:SECRET@h?q=SECRET#SECRET", "https://***@h?<redacted>#<redacted>"),
        ("https://h/f#SECRET", "https://h/f#<redacted>"),
        ("https://h/user@example.com/f", "https://h/user@example.com/f"),
        ("u:SECRET@h/f?SECRET", "***@h/f?<redacted>"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "line",
    [
        "https://h/dir/?X-Amz-Signature=SECRET",  # no usable name: URL is shown
        "https://h:99999/f?X-Amz-Signature=SECRET",  # bad port
        "https://[::1/f?X-Amz-Signature=SECRET",  # urlsplit itself fails
        "https://h/f\x01?X-Amz-Signature=SECRET",  # control character
        "ftp://h/f?X-Amz-Signature=SECRET",  # bad scheme
        "h/f?X-Amz-Signature=SECRET",  # no scheme
        "http:///f?X-Amz-Signature=SECRET",  # no host
    ],
)
def test_errors_do_not_show_query(line: str) -> None:
    message = str(error(line))
    assert "SECRET" not in message
    assert "X-Amz" not in message


def test_error_shows_redacted_url() -> None:
    message = str(error("https://h/dir/?X-Amz-Signature=SECRET"))
    assert "'https://h/dir/?<redacted>'" in message


@pytest.mark.parametrize(
    "line",
    [
        "https://user:SECRET@h/dir/?q=1",
        "https://user:SECRET@h:abc/f",
        "https://user:SECRET@[::1/f",
        "https://user:SECRET@/f",
    ],
)
def test_errors_do_not_show_password(line: str) -> None:
    message = str(error(line))
    assert "SECRET" not in message
    assert "***@" in message and "user" not in message


def test_clash_errors_do_not_show_urls() -> None:
    message = str(error("https://h/f.bin?sig=SECRET\nhttps://h/f.bin?sig=SECRET2"))
    assert "SECRET" not in message
