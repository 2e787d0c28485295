"""Parse the URL manifest (``urls.txt``) that decides what the filesystem shows.

Each non-blank, non-comment line is ``URL [PATH]``: the remote file and where it appears under
the mount root. Indented ``Name: value`` lines right below a URL line add request headers
for that URL only (``Authorization: Bearer ...`` for a private file)::

    https://example.org/private/disk.img   images/disk.img
        Authorization: Bearer TOKEN
        X-Api-Version: 2

An indented line is a header line when its first word is not a URL (has no ``://``), so every
manifest that was valid before stays valid and means the same. Header values are secrets as
far as messages go: errors name the header, never its value.

A URL ending in ``/`` with no PATH, or with a PATH ending in ``/``, is a *directory source*:
every file the server lists there (an autoindex page, a JSON listing, a bucket) appears under
that PATH (the mount root without one). Indented ``key=value`` lines below a URL line are its
options: ``depth=``, ``include=``, ``exclude=``, ``checksums=`` for a directory source, and
``sha256=``, ``sha512=``, ``md5=`` for a file::

    https://deb.example.org/cd/                  debian/
        depth=2
        include=*.iso
        checksums=SHA256SUMS
    https://example.org/disk.img
        sha256=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

Neither form was valid before (a URL ending in ``/`` had no file name, a PATH ending in ``/``
an empty segment, and ``=`` cannot be in a header name), so no older file changes meaning;
a URL ending in ``/`` with a file PATH (``https://h/ index.html``) is still that one page.

The whole manifest is validated up front and the first problem is reported as a
:class:`ManifestError` that names the file and line, so that a typo is found when the user runs
the command, not later as a confusing I/O error inside a mounted filesystem.

Error messages are shown on terminals and end up in logs, and URLs for private objects often
carry credentials (pre-signed query strings, ``user:password@``).  Every URL placed in an error
message therefore goes through :func:`remotefs.redact.redact_url` first.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from ..redact import redact_url

_SCHEMES = frozenset({"http", "https"})
_MAX_NAME_BYTES = 255  # NAME_MAX on Linux; longer names cannot be created or looked up.
_BOM = "\ufeff"
# WHATWG "forbidden host code points" (minus the C0 controls, which are rejected earlier).
_FORBIDDEN_HOST_CHARS = frozenset(" #/:<>?@[\\]^|")
_BRACKETED_HOST = re.compile(r"\[[^\[\]]*\](?::[^:]*)?")
# RFC 9110 §5.6.2 token: the characters a header name may have.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
#: Headers remotefs sets itself and must control: a user value would break verified ranges,
#: raw bodies or the framing of the request.
RESERVED_HEADERS = frozenset(
    {
        "range",
        "if-range",
        "accept-encoding",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "keep-alive",
    }
)

#: Top-level names a URL list may not use: the HTTP server (``remotefs serve``) keeps its own
#: pages there (``/_remotefs/status``). Refused for mounts too, so one list serves both doors.
RESERVED_NAMES = frozenset({"_remotefs"})

#: Request headers as (name, value) pairs, in the order given.
Headers = tuple[tuple[str, str], ...]

#: Digest algorithms a file line may name, with the length of their hex digests.
DIGEST_LENGTHS = {"sha256": 64, "sha512": 128, "md5": 32}
#: Expected digests of a file as (algorithm, lowercase hex) pairs.
Digests = tuple[tuple[str, str], ...]

#: How deep a directory source is listed by default, and at most (each level costs requests).
DEFAULT_DEPTH = 1
MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class DirectoryOptions:
    """What of a directory source is mounted: levels, name patterns, checksum files."""

    depth: int = DEFAULT_DEPTH
    include: tuple[str, ...] = ()  # shell patterns matched against file names
    exclude: tuple[str, ...] = ()
    checksums: tuple[str, ...] = ()  # URLs of checksum files (SHA256SUMS format)


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One remote file, or one directory source: the URL and where it appears in the mount."""

    url: str  # the URL as it will be requested (fragment removed)
    path: tuple[str, ...]  # path segments under the mount root, e.g. ("isos", "debian.iso")
    line: int  # 1-based line number in the manifest
    # Request headers for this URL only (indented lines below it); kept out of repr: secrets.
    headers: Headers = field(default=(), repr=False)
    #: Digests the file's bytes must have (``sha256=`` lines, or a checksum file's).
    digests: Digests = ()
    #: Set for a directory source: *path* is where its listing goes (``()``: the root).
    directory: DirectoryOptions | None = None


class FileLineError(ValueError):
    """A file of the user's (or a server's) that cannot be used, and where: ``str()`` is
    ``SOURCE:LINE: reason`` (``SOURCE: reason`` when the fault is the whole file), as
    compilers write it, so that users find the line.

    The parts are kept as attributes so callers (and tests) can inspect them without parsing
    the message.  They are also passed to ``ValueError`` as ``args`` so the exception survives
    pickling, e.g. when it crosses a process boundary.
    """

    source: str
    line: int | None
    reason: str

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        super().__init__(source, line, reason)
        self.source = source
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.source}: {self.reason}"
        return f"{self.source}:{self.line}: {self.reason}"


class ManifestError(FileLineError):
    """The manifest (urls.txt) cannot be used."""


class _LineError(Exception):
    """Internal: a problem with the current line; the caller adds the file name and line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_manifest(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Read and parse the manifest file at ``path``.

    The file is read as bytes so that invalid UTF-8 can be reported with its line number
    instead of as a bare ``UnicodeDecodeError``.
    """
    source = str(path)
    try:
        data = read_regular_file(path)
    except OSError as exc:
        raise ManifestError(source, None, f"cannot read: {exc.strerror or exc}") from exc
    return parse_manifest_bytes(data, source)


def is_url(text: str) -> bool:
    """``remotefs mount URLS``: a URL (``https://...``) rather than a file's name."""
    return "://" in text


def command_line_source(url: str, depth: int | None = None) -> list[ManifestEntry]:
    """The manifest of one URL given instead of a urls.txt file (``--depth N`` for a
    directory); errors name the command line."""
    source = "the command line"
    try:
        found, path, directory = _parse_line(url)
        if depth is not None:
            if not directory:
                raise _LineError(
                    f"--depth is for a directory: {redact_url(url)!r} does not end in '/'"
                )
            check_depth(str(depth))
    except _LineError as exc:
        raise ManifestError(source, None, exc.reason) from None
    if not directory:
        return [ManifestEntry(found, path, 1)]
    options = DirectoryOptions(depth=depth if depth is not None else DEFAULT_DEPTH)
    return [ManifestEntry(found, (), 1, directory=options)]


def read_regular_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of *path*, which must be a regular file; anything else is refused at once.

    A FIFO would block the reader until something writes to it (``remotefs mount`` hung
    forever on one), and a device never ends: both get an OSError that says what they are.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a directory"
                if stat.S_ISDIR(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket"
                if stat.S_ISSOCK(mode)
                else "not a regular file"
            )
            raise OSError(errno.EINVAL, f"{kind}, not a regular file (give a text file)")
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_manifest_bytes(data: bytes, source: str) -> list[ManifestEntry]:
    """Decode ``data`` as UTF-8 and parse it; ``source`` is only used in error messages.

    Decoding is strict: guessing another encoding could silently produce wrong file names.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        reason = f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
        raise ManifestError(source, line, reason) from exc
    return parse_manifest_text(text, source)


def parse_manifest_text(
    text: str, source: str, *, reserved: frozenset[str] = RESERVED_NAMES
) -> list[ManifestEntry]:
    """Parse manifest text into entries, in file order.

    Every line is checked before anything is returned, so a caller never acts on part of a
    broken manifest.  ``source`` is only used in error messages. A path whose first segment
    is one of *reserved* is refused (the library, which names no paths, passes none).
    """
    entries: list[ManifestEntry] = []
    tree = _PathTree()
    below = _Below()  # the indented lines of the entry above
    follows_url = False  # the previous content line belongs to a URL entry (no blank between)
    for number, raw, content in _content_lines(text):
        try:
            if not content:  # a blank line ends the entry above it
                follows_url = False
                continue
            if raw[:1] in (" ", "\t") and (_OPTION.match(content) or _is_header_line(raw, content)):
                if not follows_url:
                    raise _LineError(
                        "an indented header or option line must follow its URL line"
                        " (or another indented line of it) with no blank line between"
                    )
                below.add(content, entries[-1])
                continue
            below.finish(entries)
            url, path, directory = _parse_line(content)
            if path and path[0] in reserved:
                raise _LineError(
                    f"the name {path[0]!r} is reserved: remotefs serve keeps its own pages under"
                    f" /{path[0]}/; give this URL another PATH"
                )
            if directory:
                tree.add_directory(path, number)
            else:
                tree.add(path, number)
        except _LineError as exc:
            raise ManifestError(source, number, exc.reason) from None
        entries.append(
            ManifestEntry(
                url=url,
                path=path,
                line=number,
                directory=DirectoryOptions() if directory else None,
            )
        )
        follows_url = True
    try:
        below.finish(entries)
    except _LineError as exc:
        raise ManifestError(source, entries[-1].line, exc.reason) from None
    if not entries:
        raise ManifestError(source, None, "no URLs in the file")
    _check_same_url_same_headers(entries, source)
    return entries


#: An option line: ``key=value`` (a header name can never hold ``=``, so never a header line).
_OPTION = re.compile(r"([a-z0-9]+)=(.*)", re.ASCII)
_FILE_OPTIONS = tuple(DIGEST_LENGTHS)
_DIRECTORY_OPTIONS = ("depth", "include", "exclude", "checksums")
_HEX = re.compile(r"[0-9a-fA-F]+", re.ASCII)


class _Below:
    """The header and option lines below one URL line, until the next URL line."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.digests: dict[str, str] = {}
        self.depth: int | None = None
        self.include: list[str] = []
        self.exclude: list[str] = []
        self.checksums: list[str] = []

    def add(self, content: str, entry: ManifestEntry) -> None:
        option = _OPTION.fullmatch(content)
        if option is None:
            self.headers.append(parse_header(content))
            return
        key, value = option.group(1), option.group(2).strip()
        if entry.directory is None:
            self._file_option(key, value)
        else:
            self._directory_option(key, value, entry.url)

    def _file_option(self, key: str, value: str) -> None:
        if key in ("depth", "include", "exclude", "checksums"):
            raise _LineError(
                f"{key}= is an option of a directory source (a URL ending in '/'), not of a file"
            )
        if key not in DIGEST_LENGTHS:
            raise _LineError(f"unknown option {key}= (a file takes {', '.join(_FILE_OPTIONS)})")
        self.digests[key] = check_digest(key, value)

    def _directory_option(self, key: str, value: str, url: str) -> None:
        if key in DIGEST_LENGTHS:
            raise _LineError(
                f"{key}= is for a file line; a directory source names a checksum file with"
                " checksums=URL (a SHA256SUMS file in the directory is used by itself)"
            )
        if key not in _DIRECTORY_OPTIONS:
            raise _LineError(
                f"unknown option {key}= (a directory source takes {', '.join(_DIRECTORY_OPTIONS)})"
            )
        if not value:
            raise _LineError(f"{key}= needs a value")
        if key == "depth":
            self.depth = check_depth(value)
        elif key == "include":
            self.include.append(value)
        elif key == "exclude":
            self.exclude.append(value)
        else:
            self.checksums.append(_checksum_url(value, url))

    def finish(self, entries: list[ManifestEntry]) -> None:
        """Attach what was collected to the last entry, and start afresh."""
        if not entries:
            return
        last = entries[-1]
        directory = last.directory
        if directory is not None:
            directory = DirectoryOptions(
                self.depth if self.depth is not None else directory.depth,
                tuple(self.include),
                tuple(self.exclude),
                tuple(self.checksums),
            )
        entries[-1] = ManifestEntry(
            last.url,
            last.path,
            last.line,
            tuple(self.headers),
            tuple(self.digests.items()),
            directory,
        )
        self._reset()


def digest_problem(algorithm: str, text: str) -> str | None:
    """Why *text* is not a digest of *algorithm* (a key of `DIGEST_LENGTHS`), or None.

    Strict, because a digest that is silently wrong would make every read of a good file
    fail: exactly the algorithm's number of hex digits, in any case, nothing around them.
    The one check of a digest, for urls.txt lines and checksum files alike.
    """
    length = DIGEST_LENGTHS.get(algorithm)
    if length is None:
        known = ", ".join(sorted(DIGEST_LENGTHS))
        return f"unknown digest algorithm {_quoted(algorithm)} (known: {known})"
    if not text:
        return f"{algorithm}= needs {length} hex digits, got nothing"
    if _HEX.fullmatch(text) is None:
        return f"{algorithm}= needs {length} hex digits, got {_quoted(text)}"
    if len(text) != length:
        return f"{algorithm}= needs {length} hex digits, got {len(text)}"
    return None


def _quoted(text: str, limit: int = 60) -> str:
    """*text* for a message: repr'd (control characters show) and cut to *limit*."""
    return repr(text[:limit]) + "..." if len(text) > limit else repr(text)


def check_digest(algorithm: str, text: str) -> str:
    """A user's hex digest for *algorithm*, lowercased; `_LineError` names what is wrong."""
    problem = digest_problem(algorithm, text)
    if problem is not None:
        raise _LineError(problem)
    return text.lower()


def check_depth(text: str) -> int:
    """``depth=N``: 1 (the directory itself) to `MAX_DEPTH`."""
    try:
        depth = int(text)
    except ValueError:
        raise _LineError(f"depth= needs a whole number, not {text[:20]!r}") from None
    if not 1 <= depth <= MAX_DEPTH:
        raise _LineError(f"depth {depth}: it must be 1 to {MAX_DEPTH}")
    return depth


def _checksum_url(value: str, directory: str) -> str:
    """``checksums=URL``: absolute, or a name relative to the directory source's URL."""
    url = urljoin(directory, value)
    _check_url(url)
    return _without_fragment(url)


def _check_same_url_same_headers(entries: list[ManifestEntry], source: str) -> None:
    """One URL listed twice shares one cache and one probe, so it needs the same headers."""
    first: dict[str, ManifestEntry] = {}
    for entry in entries:
        earlier = first.setdefault(entry.url, entry)
        if earlier.headers != entry.headers:
            raise ManifestError(
                source,
                entry.line,
                f"URL {redact_url(entry.url)!r} is also on line {earlier.line} with other"
                " headers; one URL needs the same headers everywhere",
            )


def _is_header_line(raw: str, content: str) -> bool:
    """An indented line whose first word is not a URL."""
    return raw[:1] in (" ", "\t") and "://" not in content.split(None, 1)[0]


def parse_header(text: str) -> tuple[str, str]:
    """``Name: value`` -> (name, value); raises `_LineError` naming the problem, not the value.

    Used for urls.txt header lines, ``--header`` and ``--header-file`` lines alike.
    """
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name:
        raise _LineError("malformed header line (expected 'Name: value')")
    if not _HEADER_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise _LineError(f"malformed header line: {shown!r} is not a valid header name")
    if any(_is_control(ch) and ch != "\t" for ch in value):
        raise _LineError(f"header {name!r}: the value contains control characters")
    if not value.isascii():
        # RFC 9110 §5.5: field values are visible ASCII; bytes above 0x7F have no agreed
        # meaning (Latin-1? UTF-8?), and httpx cannot send them at all.
        raise _LineError(
            f"header {name!r}: the value has non-ASCII characters; HTTP header values must be"
            " ASCII (percent-encode or base64 the value)"
        )
    if name.lower() in RESERVED_HEADERS:
        raise _LineError(f"header {name!r} is set by remotefs itself and cannot be given")
    return name, value


class HeaderError(ValueError):
    """A header from ``--header`` or a header file is malformed; the message has no value."""


def parse_header_option(text: str) -> tuple[str, str]:
    """Parse one ``--header 'Name: value'`` argument."""
    try:
        return parse_header(text)
    except _LineError as exc:
        raise HeaderError(f"--header: {exc.reason}") from None


def header_pair(name: object, value: object) -> tuple[str, str]:
    """A header given as Python objects (the library's ``headers=``), checked as it is.

    Both must be ``str`` (a ``None`` or ``b"..."`` would otherwise go out as its ``str()``),
    and the name an RFC 9110 token as written: it is never split at a ``:`` in it.
    """
    if not isinstance(name, str):
        raise HeaderError(f"a header name must be a str, not {type(name).__name__}")
    shown = name if len(name) <= 40 else name[:40] + "..."
    if not isinstance(value, str):
        raise HeaderError(f"header {shown!r}: its value must be a str, not {type(value).__name__}")
    if not _HEADER_NAME.fullmatch(name):
        raise HeaderError(f"{shown!r} is not a valid header name (an RFC 9110 token)")
    try:
        return parse_header(f"{name}: {value}")
    except _LineError as exc:
        raise HeaderError(exc.reason) from None


def parse_header_lines(lines: Iterable[str], source: str) -> Headers:
    """Parse a header file: one ``Name: value`` per line, blank and ``#`` lines skipped."""
    headers: list[tuple[str, str]] = []
    for index, raw in enumerate(lines):
        content = raw.strip()
        if index == 0 and content.startswith(_BOM):
            content = content[len(_BOM) :].strip()
        if not content or content.startswith("#"):
            continue
        try:
            headers.append(parse_header(content))
        except _LineError as exc:
            raise HeaderError(f"{source}:{index + 1}: {exc.reason}") from None
    return tuple(headers)


def load_header_file(path: str | os.PathLike[str]) -> Headers:
    """Read a ``--header-file``; errors name the file and line, never a value."""
    try:
        text = read_regular_file(path).decode("utf-8")
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise HeaderError(f"{path}: not valid UTF-8") from None
    return parse_header_lines(text.split("\n"), str(path))


def _content_lines(text: str) -> Iterator[tuple[int, str, str]]:
    """Yield ``(line number, raw line, stripped line)`` for every line that is not a comment.

    Blank lines are yielded (stripped to ``""``): they end a URL's header lines.

    Lines are split on ``\\n`` only (``\\r\\n`` works because of the strip): ``str.splitlines``
    would also split on form feeds, U+2028 and others, and the line numbers in error messages
    would then disagree with the user's editor.
    """
    if text.startswith(_BOM):
        text = text[len(_BOM) :]
    for index, raw in enumerate(text.split("\n")):
        content = raw.strip()
        if not content.startswith("#"):
            yield index + 1, raw, content


def _parse_line(content: str) -> tuple[str, tuple[str, ...], bool]:
    """Turn one ``URL [PATH]`` line into the URL to request, its path segments, and whether
    it is a directory source."""
    fields = content.split(None, 1)
    url = fields[0]
    parts = _check_url(url)
    path_text = fields[1].strip() if len(fields) > 1 else ""
    if parts.path.endswith("/") and (not path_text or path_text.endswith("/")):
        if parts.query:
            raise _LineError(
                f"directory source {redact_url(url)!r} has a query; a directory's URL ends in '/'"
                " (give request headers on indented lines below it)"
            )
        stripped = path_text.strip("/")
        return _without_fragment(url), _parse_path(stripped) if stripped else (), True
    if path_text.endswith("/"):
        raise _LineError(
            f"PATH {path_text!r} ends in '/' but the URL is a file; a directory source's URL"
            " ends in '/' too"
        )
    path = _parse_path(path_text) if path_text else (_default_name(url, parts),)
    return _without_fragment(url), path, False


def _without_fragment(url: str) -> str:
    """Drop the ``#fragment``: it is never sent to servers, so it must not reach the request.

    This cuts at the first ``#`` on the raw string, as ``urlsplit`` does, instead of
    re-assembling the URL with ``urlunsplit``, which could change other parts of it (for
    example an empty ``?``) and break signed URLs.
    """
    return url.split("#", 1)[0]


def _check_url(url: str) -> SplitResult:
    """Reject URLs that cannot be requested, so the problem shows up with its line number."""
    if _CONTROL.search(url):
        # Checked before urlsplit, which silently drops some of these characters.
        raise _LineError(f"malformed URL {redact_url(url)!r}: contains control characters")
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit's own message may quote the host part, including a password; leave it out.
        raise _LineError(f"malformed URL {redact_url(url)!r}: invalid host") from None
    _check_scheme(url, parts)
    _check_host(url, parts)
    _check_port(url, parts)
    return parts


def _check_scheme(url: str, parts: SplitResult) -> None:
    """Only plain HTTP(S) is supported, since the downloader speaks nothing else."""
    if not parts.scheme:
        reason = f"URL {redact_url(url)!r} has no scheme (it must start with http:// or https://)"
        raise _LineError(reason)
    if parts.scheme.lower() not in _SCHEMES:
        raise _LineError(f"unsupported URL scheme {parts.scheme!r} (only http and https)")


def _check_host(url: str, parts: SplitResult) -> None:
    """Require a host that can be connected to.

    ``urlsplit`` is lenient (``http://a[::1]/`` gives the host ``::1``), so the host part is
    checked here too: a bracketed IPv6 literal must make up the whole host, and other hosts
    must not contain characters that are never valid in a host name.
    """
    host_port = parts.netloc.rpartition("@")[2]
    if not parts.hostname:
        raise _LineError(f"malformed URL {redact_url(url)!r}: no host")
    if host_port.startswith("["):
        valid = _BRACKETED_HOST.fullmatch(host_port) is not None
    else:
        valid = not _FORBIDDEN_HOST_CHARS.intersection(host_port.partition(":")[0])
    if not valid:
        raise _LineError(f"malformed URL {redact_url(url)!r}: invalid host")


def _check_port(url: str, parts: SplitResult) -> None:
    """Require a port in 1-65535; port 0 parses but cannot be connected to.

    The ``ValueError`` text is not used: when a password contains ``/``, what ``urlsplit``
    takes for the port is really part of the password.
    """
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise _LineError(f"malformed URL {redact_url(url)!r}: invalid port")


def _default_name(url: str, parts: SplitResult) -> str:
    """Name the file after the last segment of the URL path when no PATH is given."""
    last = parts.path.rpartition("/")[2]
    try:
        name = unquote(last, errors="strict")
    except UnicodeDecodeError:
        problem: str | None = "its percent-encoded name is not valid UTF-8"
    else:
        problem = "it does not end in a file name" if not name else name_problem(name)
    if problem is not None:
        reason = (
            f"cannot name the file for URL {redact_url(url)!r}: {problem}; add a PATH after the URL"
        )
        raise _LineError(reason)
    return name


def _parse_path(text: str) -> tuple[str, ...]:
    """Split a user-given PATH into segments, rejecting those that cannot be a file name.

    ``.`` and ``..`` are refused rather than resolved: a manifest that needs them is almost
    certainly a mistake, and resolving them could make two lines name the same file unnoticed.
    """
    relative = text[1:] if text.startswith("/") else text
    segments = tuple(relative.split("/"))
    for segment in segments:
        problem = "it contains an empty segment" if not segment else name_problem(segment)
        if problem is not None:
            raise _LineError(f"invalid PATH {text!r}: {problem}")
    return segments


def name_problem(name: str) -> str | None:
    """Say why ``name`` cannot be a single file or directory name, or return None if it can.

    Control characters are refused as well as NUL: names with newlines or escape sequences are
    legal on Linux but break scripts and terminals, and a stray ``\\r`` usually means the
    manifest was not split into lines the way the user thinks.
    """
    if name in (".", ".."):
        return f"{name!r} is not allowed as a name"
    if "/" in name:
        return "a name cannot contain '/'"
    if "\0" in name:
        return "it contains a NUL character"
    if _CONTROL.search(name):
        return "it contains a control character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it contains characters that cannot be encoded as UTF-8"
    if size > _MAX_NAME_BYTES:
        return f"the name {name[:40]!r}... is {size} bytes long (at most {_MAX_NAME_BYTES})"
    return None


#: ASCII control characters (C0 and DEL); a regex finds them ten times faster than a loop.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_control(ch: str) -> bool:
    """True for ASCII control characters (C0 and DEL)."""
    return ch < " " or ch == "\x7f"


class _PathTree:
    """Remembers which paths are files and which are directories, to catch clashes.

    A path may be used by only one entry, and a file cannot also be a directory.  The line
    that first used a path is kept so the error can point the user at both lines.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, ...], int] = {}
        self._dirs: dict[tuple[str, ...], tuple[int, tuple[str, ...]]] = {}

    def add(self, path: tuple[str, ...], line: int) -> None:
        """Record ``path`` as a file from ``line``, or raise if it clashes with earlier lines."""
        self._check_free(path)
        self._check_parents(path)
        self._files[path] = line
        for depth in range(1, len(path)):
            self._dirs.setdefault(path[:depth], (line, path))

    def add_directory(self, path: tuple[str, ...], line: int) -> None:
        """Record ``path`` as a directory source's (``()``: the root); several may share one."""
        if path in self._files:
            raise _LineError(f"path {_show(path)!r} is already used on line {self._files[path]}")
        self._check_parents(path)
        for depth in range(1, len(path) + 1):
            self._dirs.setdefault(path[:depth], (line, path))

    def _check_free(self, path: tuple[str, ...]) -> None:
        shown = _show(path)
        if path in self._files:
            raise _LineError(f"path {shown!r} is already used on line {self._files[path]}")
        if path in self._dirs:
            line, child = self._dirs[path]
            if child == path:
                raise _LineError(f"path {shown!r} is line {line}'s directory source")
            raise _LineError(
                f"path {shown!r} is already a directory: line {line} puts {_show(child)!r} in it"
            )

    def _check_parents(self, path: tuple[str, ...]) -> None:
        for depth in range(1, len(path)):
            parent = path[:depth]
            if parent in self._files:
                raise _LineError(
                    f"path {_show(path)!r} needs {_show(parent)!r} to be a directory, "
                    f"but line {self._files[parent]} makes it a file"
                )


def _show(path: tuple[str, ...]) -> str:
    """Format path segments the way the user wrote them in the manifest."""
    return "/".join(path)
