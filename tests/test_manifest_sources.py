"""urls.txt directory sources and option lines (remotefs.config.manifest).

The new forms must never change what an older file meant: each test that adds a form also
shows the older reading it cannot collide with.
"""

from __future__ import annotations

import hashlib

import pytest

from remotefs.config.manifest import (
    DirectoryOptions,
    ManifestEntry,
    ManifestError,
    parse_manifest_text,
)

SRC = "urls.txt"
SHA = hashlib.sha256(b"x").hexdigest()


def parse(text: str) -> list[ManifestEntry]:
    return parse_manifest_text(text, SRC)


def error(text: str, line: int, *fragments: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"{SRC}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_a_url_ending_in_a_slash_without_path_is_the_root_directory() -> None:
    (entry,) = parse("https://h/pub/\n")
    assert entry.directory == DirectoryOptions()
    assert entry.path == ()
    assert entry.url == "https://h/pub/"


def test_a_path_ending_in_a_slash_places_the_directory() -> None:
    entries = parse("https://h/pub/ mirrors/pub/\nhttps://h/a.iso\nhttps://h/cd/ /\n")
    assert [(e.path, e.directory is not None) for e in entries] == [
        (("mirrors", "pub"), True),
        (("a.iso",), False),
        ((), True),
    ]


def test_a_url_ending_in_a_slash_with_a_file_path_is_still_that_page() -> None:
    (entry,) = parse("https://h/pub/ index.html\n")
    assert entry.directory is None and entry.path == ("index.html",)


def test_directory_options() -> None:
    text = (
        "https://h/pub/   my dir/\n"
        "    depth=3\n"
        "    Authorization: Bearer t=1\n"
        "    include=*.iso\n"
        "    include=*.img\n"
        "    exclude=*.sig\n"
        "    checksums=SHA256SUMS\n"
        "    checksums=https://other/sums.txt\n"
    )
    (entry,) = parse(text)
    assert entry.path == ("my dir",)
    assert entry.headers == (("Authorization", "Bearer t=1"),)
    assert entry.directory == DirectoryOptions(
        depth=3,
        include=("*.iso", "*.img"),
        exclude=("*.sig",),
        checksums=("https://h/pub/SHA256SUMS", "https://other/sums.txt"),
    )


def test_file_digests() -> None:
    sha512 = hashlib.sha512(b"x").hexdigest()
    (entry, other) = parse(
        f"https://h/a.iso  a file.iso\n    sha256={SHA.upper()}\n    sha512={sha512}\n"
        "https://h/b.iso\n"
    )
    assert entry.path == ("a file.iso",)
    assert entry.digests == (("sha256", SHA), ("sha512", sha512))
    assert other.digests == ()


def test_a_header_value_with_an_equals_sign_stays_a_header() -> None:
    (entry,) = parse("https://h/a.iso\n    X-Query: a=b\n")
    assert entry.headers == (("X-Query", "a=b"),)


def test_a_file_below_a_directory_source_is_allowed() -> None:
    entries = parse("https://h/pub/ pub/\nhttps://h/other.iso pub/extra.iso\n")
    assert entries[1].path == ("pub", "extra.iso")


def test_two_sources_may_share_a_directory() -> None:
    entries = parse("https://h/a/\nhttps://h/b/\n")
    assert [e.path for e in entries] == [(), ()]


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        ("https://h/pub/\n    depth=9\n", 2, ("depth 9", "1 to 8")),
        ("https://h/pub/\n    depth=x\n", 2, ("whole number",)),
        ("https://h/pub/\n    sha256=" + SHA + "\n", 2, ("checksums=URL",)),
        ("https://h/pub/\n    colour=red\n", 2, ("unknown option colour=", "depth")),
        ("https://h/pub/\n    include=\n", 2, ("include= needs a value",)),
        ("https://h/a.iso\n    depth=2\n", 2, ("directory source",)),
        ("https://h/a.iso\n    sha256=abc\n", 2, ("64 hex digits", "got 3")),
        ("https://h/a.iso\n    sha256=" + "g" * 64 + "\n", 2, ("64 hex digits",)),
        ("https://h/a.iso\n    sha1=" + "0" * 40 + "\n", 2, ("unknown option sha1=",)),
        ("https://h/pub/?x=1\n", 1, ("has a query",)),
        ("https://h/a.iso d/\n", 1, ("ends in '/'",)),
        ("https://h/a.iso pub\nhttps://h/pub/ pub/\n", 2, ("already used on line 1",)),
        ("https://h/pub/ pub/\nhttps://h/a.iso pub\n", 2, ("line 1's directory source",)),
        ("https://h/pub/ _remotefs/\n", 1, ("reserved",)),
        ("https://h/pub/\n\n    depth=2\n", 3, ("must follow its URL line",)),
        ("https://h/pub/\n    checksums=ftp://h/SUMS\n", 2, ("unsupported URL scheme",)),
    ],
)
def test_bad_source_lines_name_file_and_line(
    text: str, line: int, fragments: tuple[str, ...]
) -> None:
    error(text, line, *fragments)


def test_the_last_entry_options_are_checked_too() -> None:
    error("https://h/a.iso\nhttps://h/pub/\n    depth=0\n", 3, "depth 0")
