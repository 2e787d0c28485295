"""Parsers of directory listings: HTML pages of links, nginx and Caddy JSON, S3 and GCS XML,
and GCS's JSON API (``storage#objects``).

Each takes the listing's URL and its body (already capped in size by whoever fetched it) and
returns a `Page`: the entries it names, and for a paginated bucket listing the token of the
next page. A listing is hostile input: every parser survives any bytes, never trusts a field
it cannot check (a size that is not a non-negative integer is dropped, not guessed), and
names entries only as `links.child_of` allows for HTML, or by the bucket's own key layout.

`parse` dispatches on what came back, not on what was asked for (servers ignore ``Accept``):
the media type first, the body's first bytes when the type says nothing useful.
"""

from __future__ import annotations

import base64
import binascii
import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

from .links import child_of

#: What a listing request asks for: machine-readable forms first (nginx's and Caddy's JSON,
#: bucket XML), a page of links otherwise.
ACCEPT = "application/json, application/xml;q=0.9, text/html;q=0.8"


class ListingError(ValueError):
    """The body is not a listing remotefs can read (the message says what it is instead)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a listed directory. *size* and *etag* only where the listing is exact
    (JSON, bucket XML); an HTML listing's files are probed like urls.txt lines."""

    name: str
    is_dir: bool
    size: int | None = None
    etag: str | None = None
    #: The content's MD5 (hex) where the listing states it as such (GCS's ``md5Hash``).
    md5: str | None = None


@dataclass(slots=True)
class Page:
    """What one response of a listing named; *next_token* continues a paginated bucket list."""

    kind: str
    entries: list[Entry] = field(default_factory=list)
    next_token: str | None = None


def parse(listing_url: str, content_type: str | None, body: bytes, prefix: str = "") -> Page:
    """The entries of the directory at *listing_url* that *body* lists.

    *prefix* is the key prefix of a bucket listing (``dir/sub/``): keys are named relative to
    it. Raises `ListingError` for a body that is no listing (an error page in JSON, say).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    head = body.lstrip()[:64]
    if media.endswith("json") or (not media and head.startswith((b"[", b"{"))):
        return parse_json(listing_url, body, prefix)
    if media.endswith("xml") or head.startswith(b"<?xml") or b"<ListBucketResult" in head:
        return parse_bucket_xml(body, prefix)
    return parse_html(listing_url, body)


# -- HTML --------------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value is not None:
                    self.hrefs.append(value)


def parse_html(listing_url: str, body: bytes) -> Page:
    """The entries an HTML page links to, by `links.child_of`'s rules, each once."""
    parser = _Links()
    # Bytes that are not UTF-8 stay recognisable (surrogates), and `child_of` refuses an href
    # with any: a name guessed from them would not be the server's.
    parser.feed(body.decode("utf-8", errors="surrogateescape"))
    parser.close()
    page = Page("html")
    seen: set[str] = set()
    for href in parser.hrefs:
        link = child_of(listing_url, href)
        if link is None or link.name in seen:
            continue
        seen.add(link.name)
        page.entries.append(Entry(link.name, link.is_dir))
    return page


# -- JSON: nginx (autoindex_format json) and Caddy (file_server browse) ------------------------


def parse_json(listing_url: str, body: bytes, prefix: str = "") -> Page:
    """nginx's ``[{"name", "type", "size"}]``, Caddy's ``[{"name", "is_dir", "size",
    "url"}]``, or a page of GCS's JSON API (``{"kind": "storage#objects"}``, keys under
    *prefix*)."""
    try:
        rows = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ListingError(f"not a JSON listing: {err}") from None
    if isinstance(rows, dict) and rows.get("kind") == "storage#objects":
        return parse_gcs_json(rows, prefix)
    if not isinstance(rows, list):
        raise ListingError("not a JSON listing: not an array of entries")
    page = Page("json")
    seen: set[str] = set()
    for row in rows:
        entry = _json_entry(listing_url, row)
        if entry is not None and entry.name not in seen:
            seen.add(entry.name)
            page.entries.append(entry)
    return page


def parse_gcs_json(answer: dict[str, object], prefix: str) -> Page:
    """One page of GCS's ``objects.list`` with ``delimiter=/``: ``items`` are objects (their
    ``size`` a decimal string, ``md5Hash`` base64 where GCS has one), ``prefixes`` the
    directories, ``nextPageToken`` the next page."""
    page = Page("bucket")
    seen: set[str] = set()
    items = answer.get("items")
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        name = _relative(item["name"], prefix)
        if name is None or name.endswith("/") or name in seen:
            continue
        seen.add(name)
        size = item.get("size")
        exact = int(size) if isinstance(size, str) and size.isdigit() else None
        # Its "etag" is not the HTTP ETag its downloads carry: only the MD5 is kept.
        page.entries.append(Entry(name, False, exact, None, _md5_hex(item.get("md5Hash"))))
    prefixes = answer.get("prefixes")
    for key in prefixes if isinstance(prefixes, list) else []:
        name = _relative(key, prefix) if isinstance(key, str) else None
        if name is None or not name.endswith("/"):
            continue
        name = name[:-1]
        if name and name not in seen:
            seen.add(name)
            page.entries.append(Entry(name, True))
    token = answer.get("nextPageToken")
    page.next_token = token if isinstance(token, str) and token else None
    return page


def _md5_hex(value: object) -> str | None:
    """GCS's base64 ``md5Hash`` as hex; None unless it is exactly 16 bytes."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw.hex() if len(raw) == 16 else None


def _json_entry(listing_url: str, row: object) -> Entry | None:
    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        return None
    if "is_dir" in row:  # Caddy: a name (dirs end in "/") and a relative URL
        is_dir = row.get("is_dir") is True
        url = row.get("url")
        link = child_of(listing_url, url) if isinstance(url, str) else None
        if link is None or link.is_dir != is_dir:
            return None
        name = link.name
    else:  # nginx: a name and a type
        kind = row.get("type")
        if kind not in ("file", "directory"):
            return None  # "other" (sockets, devices) and unknown kinds
        is_dir = kind == "directory"
        name = row["name"]
        if name in ("", ".", "..") or "/" in name or "\x00" in name:
            return None
    size = row.get("size")
    exact = isinstance(size, int) and not isinstance(size, bool) and size >= 0
    return Entry(name, is_dir, size if exact and not is_dir else None)


# -- XML: S3 ListObjectsV2 and GCS's XML API ---------------------------------------------------


def parse_bucket_xml(body: bytes, prefix: str) -> Page:
    """A ``ListBucketResult`` page listed with ``delimiter=/`` under *prefix*."""
    if b"<!DOCTYPE" in body[:1024] or b"<!ENTITY" in body:
        raise ListingError("not a bucket listing: an XML document type (refused)")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as err:
        raise ListingError(f"not a bucket listing: {err}") from None
    if _local(root.tag) != "ListBucketResult":
        raise ListingError(f"not a bucket listing: <{_local(root.tag)}>")
    page = Page("bucket")
    seen: set[str] = set()
    for child in root:
        tag = _local(child.tag)
        if tag == "Contents":
            key = _text(child, "Key")
            size = _text(child, "Size")
            name = _relative(key, prefix)
            if name is None or name.endswith("/") or name in seen:
                continue  # a "dir/" marker key, or a key outside the prefix
            seen.add(name)
            etag = _text(child, "ETag")
            exact = int(size) if size is not None and size.isdigit() else None
            page.entries.append(Entry(name, False, exact, etag))
        elif tag == "CommonPrefixes":
            name = _relative(_text(child, "Prefix"), prefix)
            if name is None or not name.endswith("/"):
                continue
            name = name[:-1]
            if name and "/" not in name and name not in seen:
                seen.add(name)
                page.entries.append(Entry(name, True))
    truncated = (_text(root, "IsTruncated") or "").lower() == "true"
    token = _text(root, "NextContinuationToken") or _text(root, "NextMarker")
    page.next_token = token if truncated and token else None
    return page


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(element: ElementTree.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def _relative(key: str | None, prefix: str) -> str | None:
    """*key* below *prefix*, one level only (a name, or ``name/`` for a common prefix)."""
    if key is None or not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    inner = rest[:-1] if rest.endswith("/") else rest
    if not inner or "/" in inner or inner in (".", "..") or "\x00" in inner:
        return None
    return rest


def bucket_location(listing_url: str) -> tuple[str, str] | None:
    """``(bucket URL, key prefix)`` of a path-style bucket URL (``http://host/bucket/dir/``),
    or None when the URL has no bucket in its path."""
    parts = urlsplit(listing_url)
    segments = parts.path.lstrip("/").split("/", 1)
    if not segments[0]:
        return None
    bucket = f"{parts.scheme}://{parts.netloc}/{segments[0]}"
    return bucket, unquote(segments[1]) if len(segments) > 1 else ""
