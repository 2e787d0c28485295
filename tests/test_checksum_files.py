"""Checksum files as coreutils writes them, hostile ones, user digests and S3 ETags.

The good files are not written by hand: each test makes a tree in tmp_path with the names
that break parsers (spaces, doubled and trailing; UTF-8; a backslash, a newline and a carriage
return, which coreutils escapes; ``) = `` inside a name, which the ``--tag`` form must survive;
a file in a subdirectory), runs the real ``sha256sum``/``sha512sum``/``md5sum`` on it, and
checks that parsing their output gives what hashlib says of the same bytes. Contents come from
a seeded random generator, several seeds, some files empty.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from remotefs.listings.checksums import (
    ALGORITHMS,
    KNOWN_FILES,
    MAX_BYTES,
    MAX_LINES,
    ChecksumFileError,
    Digest,
    check_digest,
    digest_from_etag,
    parse_checksum_file,
)

NAMES = (
    "plain.bin",
    "two  spaces and a trailing one .iso",
    "café.iso",
    "back\\slash.txt",
    "new\nline.txt",
    "carriage\rreturn.txt",
    "x) = y (z).txt",
    "#not a comment.txt",
    "-dash.txt",
    "sub/file.iso",
)
SEEDS = (0, 1, 7, 2024)
TOOLS = {"sha256": "sha256sum", "sha512": "sha512sum", "md5": "md5sum"}
HEX64 = "a" * 64


def _tree(tmp_path: Path, seed: int) -> dict[str, bytes]:
    """Write `NAMES` under *tmp_path* with random contents; name -> content."""
    rng = random.Random(seed)
    contents: dict[str, bytes] = {}
    for name in NAMES:
        size = rng.choice((0, 1, rng.randrange(2, 70_000)))
        contents[name] = rng.randbytes(size)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[name])
    return contents


def _run(tool: str, *flags: str, cwd: Path, names: tuple[str, ...] = NAMES) -> bytes:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (coreutils) is not installed")
    return subprocess.run(
        [tool, *flags, "--", *names], cwd=cwd, capture_output=True, check=True
    ).stdout


def _expected(contents: dict[str, bytes], algorithm: str) -> dict[str, Digest]:
    return {
        name: Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
        for name, data in contents.items()
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("flags", [(), ("--tag",), ("-b",)], ids=["gnu", "tag", "binary"])
def test_real_tool_output(
    tmp_path: Path, seed: int, algorithm: str, flags: tuple[str, ...]
) -> None:
    contents = _tree(tmp_path, seed)
    output = _run(TOOLS[algorithm], *flags, cwd=tmp_path)
    # The tree has names coreutils escapes: the escaped form is really what is parsed.
    assert output.count(b"\n\\") + output.startswith(b"\\") == 3
    if flags == ("-b",):
        assert b" *" in output
    expected = _expected(contents, algorithm)
    assert parse_checksum_file(output, "SUMS") == expected
    assert parse_checksum_file(output, "SUMS", default_algorithm=algorithm) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_known_file_names_match_their_tools(tmp_path: Path, seed: int) -> None:
    contents = _tree(tmp_path, seed)
    for file_name, algorithm in KNOWN_FILES.items():
        output = _run(TOOLS[algorithm], cwd=tmp_path)
        parsed = parse_checksum_file(output, file_name, default_algorithm=algorithm)
        assert parsed == _expected(contents, algorithm)


@pytest.mark.parametrize("seed", SEEDS)
def test_dot_slash_names_crlf_bom_comments(tmp_path: Path, seed: int) -> None:
    contents = _tree(tmp_path, seed)
    output = _run("sha256sum", cwd=tmp_path, names=tuple(f"./{name}" for name in NAMES))
    assert b"  ./plain.bin\n" in output
    # As a checksum file edited on Windows: a BOM, CRLF line ends, comments, blank lines.
    edited = (
        b"\xef\xbb\xbf# made by sha256sum\r\n\r\n"
        + output.replace(b"\n", b"\r\n\r\n")
        + b"# end\r\n   \r\n"
    )
    expected = _expected(contents, "sha256")
    assert parse_checksum_file(output, "SHA256SUMS") == expected
    assert parse_checksum_file(edited, "SHA256SUMS", default_algorithm="sha256") == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_forms_keep_the_strongest_digest(tmp_path: Path, seed: int) -> None:
    contents = _tree(tmp_path, seed)
    mixed = (
        _run("md5sum", cwd=tmp_path)
        + _run("sha512sum", "--tag", cwd=tmp_path)
        + _run("sha256sum", "-b", cwd=tmp_path)
        + _run("sha512sum", cwd=tmp_path)  # the same digests again: not a conflict
    )
    assert parse_checksum_file(mixed, "mixed") == _expected(contents, "sha512")


def test_tag_algorithm_word_any_case_and_hex_lowercased() -> None:
    data = f"sha256 (a) = {'AB' * 32}\nMd5 (b) = {'Cd' * 16}\n{'EF' * 64} *c d\n".encode()
    assert parse_checksum_file(data, "s") == {
        "a": Digest("sha256", "ab" * 32),
        "b": Digest("md5", "cd" * 16),
        "c d": Digest("sha512", "ef" * 64),
    }


def test_tag_line_names_its_algorithm_whatever_the_default() -> None:
    data = f"MD5 (a) = {'0' * 32}\n".encode()
    assert parse_checksum_file(data, "SHA256SUMS", "sha256") == {"a": Digest("md5", "0" * 32)}


def test_empty_and_comment_only_files() -> None:
    assert parse_checksum_file(b"", "s") == {}
    assert parse_checksum_file(b"\xef\xbb\xbf", "s") == {}
    assert parse_checksum_file(b"# nothing\n\n\r\n", "s") == {}


GOOD = f"{HEX64}  good.iso\n# a comment\n\n".encode()  # lines 1 to 3; the bad line is line 4

MALFORMED = [
    ("just some words", "not a checksum line (expected 'HEX  NAME' or 'SHA256 (NAME) = HEX')"),
    ("g" * 64 + "  name", "not a checksum line"),
    (" " + HEX64 + "  name", "not a checksum line"),
    (HEX64, "not a checksum line"),
    (HEX64 + " name", "expected two spaces or ' *' between the digest and the name"),
    (HEX64 + "\tname", "not a checksum line"),
    (HEX64 + " ", "expected two spaces"),
    ("a" * 63 + "  name", "digest has 63 hex digits, expected one of 32 (md5), 64 (sha256)"),
    ("a" * 40 + "  name", "digest has 40 hex digits"),
    ("SHA1 (name) = " + "a" * 40, "unknown algorithm 'SHA1'"),
    ("BLAKE2b (name) = " + "a" * 128, "unknown algorithm 'BLAKE2b'"),
    ("SHA256 (name) = " + "a" * 63, "sha256 digest must be 64 hex digits"),
    ("SHA256 (name) = " + "a" * 65, "sha256 digest must be 64 hex digits"),
    ("SHA512 (name) = " + HEX64, "sha512 digest must be 128 hex digits"),
    ("SHA256 (name) = " + "z" * 64, "sha256 digest must be 64 hex digits"),
    ("SHA256 (name) = ", "sha256 digest must be 64 hex digits"),
    ("SHA256 (name)= " + HEX64, "not a checksum line"),
    ("SHA256 name = " + HEX64, "not a checksum line"),
    ("SHA256 () = " + HEX64, "empty file name"),
    (HEX64 + "  ", "empty file name"),
    (HEX64 + "  ./", "empty file name"),
    (HEX64 + "  /etc/passwd", "absolute file name '/etc/passwd'"),
    (HEX64 + "  ../x", "file name with a '..' segment '../x'"),
    (HEX64 + "  ./../x", "'..' segment"),
    (HEX64 + "  sub/../../x", "'..' segment"),
    (HEX64 + "  sub/..", "'..' segment"),
    ("SHA256 (../x) = " + HEX64, "'..' segment"),
    ("SHA256 (/x) = " + HEX64, "absolute file name '/x'"),
    ("\\" + HEX64 + "  a\\tb", "bad escape in name"),
    ("\\" + HEX64 + "  ends in \\", "bad escape in name"),
    ("\\" + HEX64 + "  ..\\nx/..", "'..' segment"),
    ("\\SHA256 (x\\q) = " + HEX64, "bad escape in name"),
]


@pytest.mark.parametrize(("line", "reason"), MALFORMED)
def test_malformed_line_is_named(line: str, reason: str) -> None:
    after = f"{HEX64}  after.iso\n"
    for rest in ("\n" + after, "\r\n" + after, ""):  # "": the last line, with no newline
        data = GOOD + (line + rest).encode()
        with pytest.raises(ChecksumFileError) as caught:
            parse_checksum_file(data, "https://mirror.example/SHA256SUMS")
        error = caught.value
        assert str(error).startswith("https://mirror.example/SHA256SUMS:4: ")
        assert reason in str(error)
        assert (error.source, error.line) == ("https://mirror.example/SHA256SUMS", 4)
        assert "\n" not in str(error)


def test_messages_quote_at_most_60_characters() -> None:
    for line in ("x" * 500, HEX64 + " " + "y" * 500, "SHA256 (n) = " + "z" * 500):
        with pytest.raises(ChecksumFileError) as caught:
            parse_checksum_file(line.encode(), "s")
        message = str(caught.value)
        assert not any(c * 61 in message for c in "xyz")
        assert len(message) < 200


def test_invalid_utf8_names_the_line() -> None:
    data = f"{HEX64}  a\n{HEX64}  caf".encode() + b"\xe9.iso\n"  # Latin-1, not UTF-8
    with pytest.raises(ChecksumFileError) as caught:
        parse_checksum_file(data, "s")
    assert str(caught.value) == "s:2: not valid UTF-8 (byte 0xe9 at column 70)"
    assert caught.value.line == 2


def test_conflicting_duplicate_names_both_lines() -> None:
    data = (f"{HEX64}  dup.iso\n{'b' * 64}  other\n# c\nSHA256 (./dup.iso) = {'c' * 64}\n").encode()
    with pytest.raises(ChecksumFileError) as caught:
        parse_checksum_file(data, "s")
    assert caught.value.line == 4
    assert str(caught.value) == (
        "s:4: 'dup.iso' has a different sha256 digest on line 1 than on line 4"
    )


def test_same_digest_twice_is_fine() -> None:
    data = f"{HEX64}  dup.iso\nSHA256 (./dup.iso) = {HEX64.upper()}\n{HEX64} *dup.iso\n"
    assert parse_checksum_file(data.encode(), "s") == {"dup.iso": Digest("sha256", HEX64)}


@pytest.mark.parametrize(
    ("default", "line", "reason"),
    [
        ("sha256", "a" * 32 + "  x", "sha256 digest must be 64 hex digits, got 32"),
        ("sha512", HEX64 + "  x", "sha512 digest must be 128 hex digits, got 64"),
        ("md5", "a" * 128 + "  x", "md5 digest must be 32 hex digits, got 128"),
    ],
)
def test_default_algorithm_fixes_the_length(default: str, line: str, reason: str) -> None:
    with pytest.raises(ChecksumFileError) as caught:
        parse_checksum_file(f"# c\n{line}\n".encode(), "SUMS", default_algorithm=default)
    assert str(caught.value) == f"SUMS:2: {reason}"


def test_real_md5sum_output_in_a_sha256sums_file(tmp_path: Path) -> None:
    _tree(tmp_path, 3)
    with pytest.raises(ChecksumFileError) as caught:
        parse_checksum_file(_run("md5sum", cwd=tmp_path), "SHA256SUMS", "sha256")
    assert str(caught.value) == "SHA256SUMS:1: sha256 digest must be 64 hex digits, got 32"


def test_unknown_default_algorithm_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown digest algorithm 'sha1'"):
        parse_checksum_file(b"", "s", default_algorithm="sha1")


def test_oversize_data() -> None:
    assert parse_checksum_file(b"#" * MAX_BYTES, "s") == {}
    with pytest.raises(ChecksumFileError) as caught:
        parse_checksum_file(b"#" * (MAX_BYTES + 1), "big")
    assert caught.value.line is None
    assert (
        str(caught.value) == f"big: too large: {MAX_BYTES + 1} bytes (at most {MAX_BYTES} are read)"
    )


def test_too_many_lines() -> None:
    assert parse_checksum_file(b"\n" * MAX_LINES, "s") == {}
    assert parse_checksum_file(b"\n" * (MAX_LINES - 1) + b"#", "s") == {}
    with pytest.raises(ChecksumFileError) as caught:
        parse_checksum_file(b"\n" * MAX_LINES + b"#", "many")
    assert caught.value.line is None
    assert str(caught.value).startswith("many: too many lines: 1000001")


def test_error_pickles() -> None:
    error = ChecksumFileError("https://host/SUMS", 12, "bad")
    assert str(error) == "https://host/SUMS:12: bad"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.line, copy.reason, str(copy)) == (
        error.source,
        12,
        "bad",
        str(error),
    )
    whole = pickle.loads(pickle.dumps(ChecksumFileError("SUMS", None, "too large")))
    assert str(whole) == "SUMS: too large"
    assert whole.line is None


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_check_digest_good(algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"remotefs").hexdigest()
    assert check_digest(algorithm, digest) == Digest(algorithm, digest)
    assert check_digest(algorithm, digest.upper()) == Digest(algorithm, digest)


@pytest.mark.parametrize(
    ("algorithm", "text", "message"),
    [
        ("sha1", "a" * 40, "unknown digest algorithm 'sha1' (known: md5, sha256, sha512)"),
        ("SHA256", HEX64, "unknown digest algorithm 'SHA256' (known: md5, sha256, sha512)"),
        ("", HEX64, "unknown digest algorithm '' (known: md5, sha256, sha512)"),
        ("sha256", "a" * 63, "sha256= needs 64 hex digits, got 63"),
        ("sha256", "a" * 65, "sha256= needs 64 hex digits, got 65"),
        ("sha512", HEX64, "sha512= needs 128 hex digits, got 64"),
        ("md5", HEX64, "md5= needs 32 hex digits, got 64"),
        ("sha256", "", "sha256= needs 64 hex digits, got nothing"),
        ("md5", "g" * 32, "md5= needs 32 hex digits, got 'gggggggggggggggggggggggggggggggg'"),
        ("md5", " " + "a" * 32, "md5= needs 32 hex digits, got ' aaaa"),
        ("md5", "a" * 32 + "\n", "md5= needs 32 hex digits, got 'aaaa"),
        ("md5", "0x" + "a" * 30, "md5= needs 32 hex digits, got '0xaa"),
        ("md5", "٣" * 32, "md5= needs 32 hex digits, got '٣٣"),  # digits, but not hex ones
        ("sha256", "q" * 1000, "sha256= needs 64 hex digits, got '" + "q" * 60 + "'..."),
    ],
)
def test_check_digest_bad(algorithm: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_digest(algorithm, text)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_digest_from_etag_single_part() -> None:
    data = random.Random(5).randbytes(10_000)
    md5 = hashlib.md5(data).hexdigest()
    assert digest_from_etag(f'"{md5}"') == Digest("md5", md5)
    assert digest_from_etag(f'"{md5.upper()}"') == Digest("md5", md5)


def test_digest_from_etag_multipart() -> None:
    # What S3 gives a three-part upload: the MD5 of the parts' MD5s, then the part count.
    data = random.Random(6).randbytes(3 * 5 * 2**20)
    parts = [data[i : i + 5 * 2**20] for i in range(0, len(data), 5 * 2**20)]
    etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert digest_from_etag(f'"{etag}-3"') is None


@pytest.mark.parametrize(
    "etag",
    [
        None,
        "",
        '""',
        '"',
        "a" * 32,  # unquoted
        f'W/"{"a" * 32}"',  # weak
        f'w/"{"a" * 32}"',
        f'"{"a" * 31}"',
        f'"{"a" * 33}"',
        f'"{"a" * 64}"',  # some server's SHA-256, not S3's
        f'"{"g" * 32}"',
        f"'{'a' * 32}'",
        f' "{"a" * 32}"',
        f'"{"a" * 30}-3"',
        f'"{"a" * 32}-1"',
        "garbage",
    ],
)
def test_digest_from_etag_others(etag: str | None) -> None:
    assert digest_from_etag(etag) is None
