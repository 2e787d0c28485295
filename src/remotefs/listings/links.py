"""Which link of a listing names an entry of the listed directory, and by what name.

The rules that rclone's http backend and httpdirfs converged on, for every HTML listing (a
server's autoindex page or any plain page of links): resolve the ``href`` against the listing's
URL; drop a fragment; drop any link with a query (sort links such as Apache's ``?C=N;O=D``);
keep only links of the same scheme, host and port whose path is the listing's path plus one
segment, with a trailing ``/`` for a subdirectory; percent-decode that segment as strict UTF-8;
never ``.``, ``..``, an empty name, or one with ``/`` or NUL once decoded. The link's *text* is
never used: servers truncate it (nginx cuts names at 50 characters), and neither are the size
columns (rounded: ``1.4M``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin, urlsplit


@dataclass(frozen=True, slots=True)
class ChildLink:
    """An entry a link names: its decoded name, and whether it is a subdirectory."""

    name: str
    is_dir: bool


def child_of(listing_url: str, href: str) -> ChildLink | None:
    """The entry of the directory at *listing_url* that *href* names, or None (not one)."""
    href = href.strip()
    if not href or href.startswith("#") or not _is_text(href):
        return None
    target = urlsplit(urljoin(listing_url, href))
    base = urlsplit(listing_url)
    if target.query or "?" in href:
        return None  # a sort link, or a page of the server: never a file of the listing
    if (target.scheme, target.hostname, target.port) != (base.scheme, base.hostname, base.port):
        return None
    prefix = base.path if base.path.endswith("/") else base.path + "/"
    if not target.path.startswith(prefix):
        return None  # the parent, the server's root, another directory
    rest = target.path[len(prefix) :]
    is_dir = rest.endswith("/")
    segment = rest[:-1] if is_dir else rest
    if not segment or "/" in segment:
        return None  # the listing itself, or a deeper path
    name = decode_segment(segment)
    if name is None or name in (".", "..") or "/" in name or "\x00" in name:
        return None
    return ChildLink(name, is_dir)


def _is_text(value: str) -> bool:
    """False when *value* holds bytes that were not UTF-8 (kept as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_segment(segment: str) -> str | None:
    """*segment* percent-decoded as strict UTF-8, or None when its bytes are not UTF-8."""
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        return None
