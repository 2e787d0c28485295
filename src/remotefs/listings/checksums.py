"""Checksum files servers publish next to their files, and digests users give for a file.

Mirrors and release pages put ``SHA256SUMS`` (and friends) in the directory they list, so a
digest for each file is often one small request away; users can give one too (``sha256=HEX``
on a urls.txt line). This module only turns such text into `Digest` values: fetching the file,
deciding which listed names it covers and checking bytes against it belong to the callers.

A checksum file is hostile input like any listing: every byte sequence either parses or raises
`ChecksumFileError` with the line at fault, nothing is guessed (a digest of the wrong length is
an error, not truncated), names that could leave the listed directory are refused, and error
messages quote at most `_QUOTE_CHARS` characters of a line so a huge line cannot flood a log.
Pure functions: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config.manifest import DIGEST_LENGTHS, FileLineError, digest_problem

#: Digest algorithms remotefs knows, and the length of their digests in hex digits. The
#: length is what identifies a coreutils line's algorithm when the file name does not.
ALGORITHMS: dict[str, int] = DIGEST_LENGTHS

#: File names (in a listed directory) that are used automatically, -> algorithm. The
#: algorithm is the one their tools write, so a line of another length in them is an error.
KNOWN_FILES: dict[str, str] = {
    "SHA256SUMS": "sha256",
    "SHA512SUMS": "sha512",
    "sha256sum.txt": "sha256",
    "sha512sum.txt": "sha512",
    "MD5SUMS": "md5",
}

#: Caps on a checksum file: far above any real one (Debian's largest list a few thousand
#: files), low enough that a hostile server cannot make parsing cost much memory or time.
MAX_BYTES = 64 * 1024 * 1024
MAX_LINES = 1_000_000

#: At most this many characters of an offending line go into an error message.
_QUOTE_CHARS = 60

#: When a name is listed with several algorithms, the strongest is kept: it is the one whose
#: match means the most.
_STRENGTH = {"md5": 0, "sha256": 1, "sha512": 2}

_BY_LENGTH = {length: algorithm for algorithm, length in ALGORITHMS.items()}
_HEX = re.compile(r"[0-9a-fA-F]+")
#: The algorithm word of a BSD/``--tag`` line: letters, digits and dashes (``SHA256``,
#: ``SHA1``, ``BLAKE2b``, ``SHA2-256``), so that an unknown one is named, not "malformed".
_TAG_WORD = re.compile(r"[A-Za-z0-9-]+")
_UTF8_BOM = b"\xef\xbb\xbf"
_NOT_A_LINE = "not a checksum line (expected 'HEX  NAME' or 'SHA256 (NAME) = HEX')"


@dataclass(frozen=True, slots=True)
class Digest:
    """A digest a file's content must have: *algorithm* is a key of `ALGORITHMS`, *hex* is
    lowercase so that digests compare equal however they were written."""

    algorithm: str
    hex: str


class ChecksumFileError(FileLineError):
    """A checksum file that cannot be used: ``SOURCE:LINE: reason``."""


def _quote(text: str) -> str:
    """*text* for a message: repr'd (so control characters show) and cut to `_QUOTE_CHARS`."""
    if len(text) > _QUOTE_CHARS:
        return repr(text[:_QUOTE_CHARS]) + "..."
    return repr(text)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX.fullmatch(text) is not None


def check_digest(algorithm: str, text: str) -> Digest:
    """The digest a user gave (``sha256=HEX`` on a urls.txt line), checked.

    Strict, because a digest that is silently wrong would make every read of a good file
    fail (or worse, make a check pass on nothing): the algorithm must be one of `ALGORITHMS`
    and *text* exactly its number of hex digits, in any case, with nothing around them.
    Raises `ValueError` with a one-line message naming the problem.
    """
    problem = digest_problem(algorithm, text)
    if problem is not None:
        raise ValueError(problem)
    return Digest(algorithm, text.lower())


def digest_from_etag(etag: str | None) -> Digest | None:
    """The MD5 of an object's content, where its ETag is one.

    An ETag is an opaque version tag; it is an MD5 of the content only for S3 (and S3-style)
    objects uploaded in a single part: ``"<32 hex>"``, strong and quoted. A multipart upload's
    ETag (``"<hex>-<parts>"``) is an MD5 of the parts' MD5s, a weak one (``W/"..."``) is not
    about bytes at all, and anything else is some server's own scheme: all give ``None``.
    Whether a given server's ETags are S3's is the caller's to know.
    """
    if etag is None or len(etag) != 34 or etag[0] != '"' or etag[-1] != '"':
        return None
    inner = etag[1:-1]
    if not _is_hex(inner, 32):
        return None
    return Digest("md5", inner.lower())


def parse_checksum_file(
    data: bytes, source: str, default_algorithm: str | None = None
) -> dict[str, Digest]:
    """Name -> digest, from a checksum file's bytes.

    Reads what ``sha256sum``/``sha512sum``/``md5sum`` write, both forms, mixed:

    * ``HEX  NAME`` or ``HEX *NAME`` (coreutils' binary marker): the name is the rest of the
      line, spaces and all (only a trailing ``\\r`` is dropped). A line starting with ``\\``
      has an escaped name (``\\\\``, ``\\n``, ``\\r``), as coreutils writes names holding those
      characters. The algorithm is *default_algorithm* (the length must then match), else the
      one the digest's length implies.
    * ``SHA256 (NAME) = HEX`` (BSD, ``--tag``; also SHA512, MD5, any case): the name runs
      from the first ``" ("`` to the last ``") = "``, so names holding either still parse.
      The line names its algorithm, which wins over *default_algorithm*.

    Blank lines, ``#`` comments and a leading UTF-8 BOM are skipped. Names are relative paths
    (``sub/file.iso``); a leading ``./`` is dropped, and empty, absolute or ``..`` names are
    refused since they cannot name a file of the listed directory. A name listed twice with
    different digests of one algorithm is an error (which is right cannot be known); with
    several algorithms the strongest is kept. *source* (a redacted URL or file name) is only
    for messages. Raises `ChecksumFileError` for anything else, at the first fault.
    """
    if default_algorithm is not None and default_algorithm not in ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {_quote(default_algorithm)}")
    if len(data) > MAX_BYTES:
        raise ChecksumFileError(
            source, None, f"too large: {len(data)} bytes (at most {MAX_BYTES} are read)"
        )
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ending the last line does not start another
    if len(lines) > MAX_LINES:
        raise ChecksumFileError(
            source, None, f"too many lines: {len(lines)} (at most {MAX_LINES} are read)"
        )
    if lines and lines[0].startswith(_UTF8_BOM):
        lines[0] = lines[0][len(_UTF8_BOM) :]

    found: dict[str, Digest] = {}
    found_at: dict[tuple[str, str], tuple[str, int]] = {}  # (name, algorithm) -> (hex, line)
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ChecksumFileError(
                source,
                number,
                f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})",
            ) from None
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip() or line.startswith("#"):
            continue
        try:
            name, digest = _parse_line(line, default_algorithm)
        except ValueError as error:
            raise ChecksumFileError(source, number, str(error)) from None

        earlier = found_at.get((name, digest.algorithm))
        if earlier is not None:
            if earlier[0] != digest.hex:
                raise ChecksumFileError(
                    source,
                    number,
                    f"{_quote(name)} has a different {digest.algorithm} digest on line "
                    f"{earlier[1]} than on line {number}",
                )
            continue
        found_at[(name, digest.algorithm)] = (digest.hex, number)
        kept = found.get(name)
        if kept is None or _STRENGTH[digest.algorithm] > _STRENGTH[kept.algorithm]:
            found[name] = digest
    return found


def _parse_line(line: str, default_algorithm: str | None) -> tuple[str, Digest]:
    """One non-blank, non-comment line -> (name, digest); ValueError says what is wrong."""
    escaped = line.startswith("\\")
    if escaped:
        line = line[1:]

    head, space, _ = line.partition(" ")
    if space and _HEX.fullmatch(head):
        name, digest = _parse_gnu(line, len(head), default_algorithm)
    elif space and " (" in line and _TAG_WORD.fullmatch(line[: line.index(" (")]):
        name, digest = _parse_tag(line)
    else:
        raise ValueError(f"{_NOT_A_LINE}: {_quote(line)}")

    if escaped:
        name = _unescape(name)
    return _check_name(name), digest


def _parse_gnu(line: str, hex_length: int, default_algorithm: str | None) -> tuple[str, Digest]:
    """``HEX  NAME`` / ``HEX *NAME``: exactly one space after the digest, then the mode."""
    if len(line) < hex_length + 2 or line[hex_length + 1] not in " *":
        raise ValueError(
            f"expected two spaces or ' *' between the digest and the name: {_quote(line)}"
        )
    hex_text = line[:hex_length]
    if default_algorithm is not None:
        algorithm = default_algorithm
        if hex_length != ALGORITHMS[algorithm]:
            raise ValueError(
                f"{algorithm} digest must be {ALGORITHMS[algorithm]} hex digits, got {hex_length}"
            )
    else:
        guessed = _BY_LENGTH.get(hex_length)
        if guessed is None:
            lengths = ", ".join(f"{n} ({a})" for a, n in sorted(ALGORITHMS.items()))
            raise ValueError(f"digest has {hex_length} hex digits, expected one of {lengths}")
        algorithm = guessed
    return line[hex_length + 2 :], Digest(algorithm, hex_text.lower())


def _parse_tag(line: str) -> tuple[str, Digest]:
    """``ALGO (NAME) = HEX``: the name between the first ``" ("`` and the last ``") = "``."""
    open_at = line.index(" (")
    close_at = line.rfind(") = ")
    if close_at < open_at + 2:
        raise ValueError(f"{_NOT_A_LINE}: {_quote(line)}")
    word = line[:open_at]
    algorithm = word.lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {_quote(word)}")
    hex_text = line[close_at + 4 :]
    if not _is_hex(hex_text, ALGORITHMS[algorithm]):
        raise ValueError(
            f"{algorithm} digest must be {ALGORITHMS[algorithm]} hex digits: {_quote(hex_text)}"
        )
    return line[open_at + 2 : close_at], Digest(algorithm, hex_text.lower())


def _unescape(name: str) -> str:
    """Undo coreutils' escaping of a name (``\\\\``, ``\\n``, and ``\\r`` in recent versions); any
    other escape is refused, as ``sha256sum -c`` refuses it."""
    out: list[str] = []
    i = 0
    while i < len(name):
        char = name[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        following = name[i + 1 : i + 2]
        if following == "\\":
            out.append("\\")
        elif following == "n":
            out.append("\n")
        elif following == "r":
            out.append("\r")
        else:
            raise ValueError(f"bad escape in name (only \\\\, \\n and \\r): {_quote(name)}")
        i += 2
    return "".join(out)


def _check_name(name: str) -> str:
    """*name* without leading ``./``, if it is a relative path inside the listed directory."""
    while name.startswith("./"):
        name = name[2:]
    if not name:
        raise ValueError("empty file name")
    if name.startswith("/"):
        raise ValueError(f"absolute file name {_quote(name)}")
    if ".." in name.split("/"):
        raise ValueError(f"file name with a '..' segment {_quote(name)}")
    return name
