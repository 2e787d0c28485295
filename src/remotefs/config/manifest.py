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
from urllib.parse import SplitResult, unquote, urlsplit

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


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One remote file: the URL to request and where it appears under the mount root."""

    url: str  # the URL as it will be requested (fragment removed)
    path: tuple[str, ...]  # path segments under the mount root, e.g. ("isos", "debian.iso")
    line: int  # 1-based line number in the manifest
    # Request headers for this URL only (indented lines below it); kept out of repr: secrets.
    headers: Headers = field(default=(), repr=False)


class ManifestError(ValueError):
    """The manifest cannot be used; ``str()`` gives a ``file:line: reason`` message.

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
    headers: list[tuple[str, str]] = []
    follows_url = False  # the previous content line belongs to a URL entry (no blank between)
    for number, raw, content in _content_lines(text):
        try:
            if not content:  # a blank line ends the entry above it
                follows_url = False
                continue
            if _is_header_line(raw, content):
                if not follows_url:
                    raise _LineError(
                        "an indented header line must follow its URL line"
                        " (or another header line of it) with no blank line between"
                    )
                headers.append(parse_header(content))
                continue
            _finish_headers(entries, headers)
            url, path = _parse_line(content)
            if path[0] in reserved:
                raise _LineError(
                    f"the name {path[0]!r} is reserved: remotefs serve keeps its own pages under"
                    f" /{path[0]}/; give this URL another PATH"
                )
            tree.add(path, number)
        except _LineError as exc:
            raise ManifestError(source, number, exc.reason) from None
        entries.append(ManifestEntry(url=url, path=path, line=number))
        follows_url = True
    _finish_headers(entries, headers)
    if not entries:
        raise ManifestError(source, None, "no URLs in the file")
    _check_same_url_same_headers(entries, source)
    return entries


def _finish_headers(entries: list[ManifestEntry], headers: list[tuple[str, str]]) -> None:
    """Attach the header lines collected so far to the last entry, and start afresh."""
    if headers:
        last = entries[-1]
        entries[-1] = ManifestEntry(last.url, last.path, last.line, tuple(headers))
        headers.clear()


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


def _parse_line(content: str) -> tuple[str, tuple[str, ...]]:
    """Turn one ``URL [PATH]`` line into the URL to request and its path segments."""
    fields = content.split(None, 1)
    url = fields[0]
    parts = _check_url(url)
    path_text = fields[1].strip() if len(fields) > 1 else ""
    path = _parse_path(path_text) if path_text else (_default_name(url, parts),)
    return _without_fragment(url), path


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
        problem = "it does not end in a file name" if not name else _name_problem(name)
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
        problem = "it contains an empty segment" if not segment else _name_problem(segment)
        if problem is not None:
            raise _LineError(f"invalid PATH {text!r}: {problem}")
    return segments


def _name_problem(name: str) -> str | None:
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

    def _check_free(self, path: tuple[str, ...]) -> None:
        shown = _show(path)
        if path in self._files:
            raise _LineError(f"path {shown!r} is already used on line {self._files[path]}")
        if path in self._dirs:
            line, child = self._dirs[path]
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
