"""Walk a directory source: its listing, its subdirectories' down to a depth, bounded.

`walk` asks *fetch* (an HTTP GET the caller provides, with the source's headers and a cap on
the body) for each listing, parses it (`formats.parse`), and returns every file under the
source with its path below it; the caller mounts them as urls.txt entries. A listing is
hostile input, so everything is bounded and nothing one listing does ends the walk:

- at most `Limits.entries` entries in all, `Limits.pages` pages per directory (a bucket's
  continuation tokens; a token seen twice ends that directory), and `depth` levels;
- a directory reached again (a loop of absolute links) is listed once;
- a listing that fails (an HTTP error, a page that is no listing) is a `problem` of that
  directory, reported with its URL redacted; the rest of the tree is still walked;
- *include* and *exclude* are shell patterns (``*.iso``) matched against each file's name;
  directories are always walked.

A bucket is found by its answer: when the directory's own URL gives no page of entries (a GET
of ``bucket/dir/`` is a GET of a key: an error, or the empty marker object consoles make), the
walk asks S3's ``bucket?list-type=2&delimiter=/&prefix=dir/`` (path-style; GCS's XML API
answers it too), then GCS's JSON API on the same host
(``/storage/v1/b/bucket/o?delimiter=/&prefix=dir/``), and goes on in the first form that
answers with a bucket listing. Files are always fetched at ``bucket/dir/name``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import trio

from ..redact import redact_url
from .formats import Entry, ListingError, Page, bucket_location, parse

#: ``fetch(url)`` -> ``(status, content type, body)``; raises OSError-like errors on failure.
Fetch = Callable[[str], Awaitable[tuple[int, str | None, bytes]]]

MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class Limits:
    """What one directory source may cost (see the module docstring)."""

    entries: int = 100_000
    pages: int = 1000


@dataclass(frozen=True, slots=True)
class ListedFile:
    """A file found under a source: its URL, its path below the source, what the listing
    said of it (exact sizes only)."""

    url: str
    path: tuple[str, ...]
    size: int | None = None
    etag: str | None = None
    #: The content's MD5 (hex) where the listing states it (GCS's JSON API).
    md5: str | None = None


@dataclass(slots=True)
class Walk:
    """What a walk found, and what it could not list (one line each, URLs redacted)."""

    files: list[ListedFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    truncated: bool = False
    #: Directories (paths below the root; ``()`` the root) that could not be listed: a caller
    #: that listed them before keeps what it had under them.
    failed: list[tuple[str, ...]] = field(default_factory=list)


async def walk(
    root: str,
    fetch: Fetch,
    *,
    depth: int = 1,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    limits: Limits = Limits(),
) -> Walk:
    """Every file under the directory *root* (a URL ending in ``/``), *depth* levels deep."""
    if not root.endswith("/"):
        raise ValueError(f"a directory source ends in '/': {redact_url(root)}")
    depth = max(1, min(depth, MAX_DEPTH))
    result = Walk()
    seen: set[str] = set()
    bucket: Bucket | None = None
    pending: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while pending:
        url, path = pending.pop(0)
        if url in seen:
            continue
        seen.add(url)
        try:
            entries, bucket = await _list(url, fetch, bucket, limits)
        except (OSError, ListingError, ValueError) as err:
            result.problems.append(f"{redact_url(url)}: {err}")
            result.failed.append(path)
            continue
        for entry in entries:
            if len(result.files) + len(pending) >= limits.entries:
                result.truncated = True
                result.problems.append(
                    f"{redact_url(root)}: more than {limits.entries} entries; the rest is left out"
                )
                return result
            child = url + quote(entry.name, safe="")
            if entry.is_dir:
                if len(path) + 1 < depth:
                    pending.append((child + "/", (*path, entry.name)))
                continue
            if include and not any(fnmatch.fnmatchcase(entry.name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in exclude):
                continue
            result.files.append(
                ListedFile(child, (*path, entry.name), entry.size, entry.etag, entry.md5)
            )
    return result


#: A bucket as the walk found it: its URL (``http://host/bucket``), the root's key prefix, and
#: the form of listing it answered: ``s3`` (ListObjectsV2 XML) or ``gcs-json``.
Bucket = tuple[str, str, str]
BUCKET_FORMS = ("s3", "gcs-json")


async def _list(
    url: str, fetch: Fetch, bucket: Bucket | None, limits: Limits
) -> tuple[list[Entry], Bucket | None]:
    """The entries of the directory at *url*, and the bucket form once one was found."""
    if bucket is None:
        status, content_type, body = await fetch(url)
        page = None
        if status == 200:
            with contextlib.suppress(ListingError):
                page = await _parse(url, content_type, body)
            listed = page is not None and (page.entries or _is_html(content_type))
            if page is not None and listed and page.kind != "bucket":
                return page.entries, None
        # Not a page of entries: a bucket answers a GET of ``bucket/dir/`` as the object API
        # does (an error, or the empty "dir/" marker object), and lists elsewhere.
        located = bucket_location(url)
        if located is not None:
            for form in BUCKET_FORMS:
                with contextlib.suppress(_NotABucket, OSError):
                    entries = await _list_bucket(located[0], located[1], form, fetch, limits)
                    return entries, (located[0], located[1], form)
        if page is not None:
            return page.entries, None
        raise ListingError(f"HTTP {status}, not a listing")
    base, root_prefix, form = bucket
    prefix = _prefix_of(url, base, root_prefix)
    return await _list_bucket(base, prefix, form, fetch, limits), bucket


#: A listing body from this size on is parsed in a worker thread: a page of 100,000 links
#: takes about a second to parse, which the event loop must not wait through.
THREAD_PARSE_FROM = 256 << 10


async def _parse(url: str, content_type: str | None, body: bytes, prefix: str = "") -> Page:
    if len(body) < THREAD_PARSE_FROM:
        return parse(url, content_type, body, prefix=prefix)
    return await trio.to_thread.run_sync(
        functools.partial(parse, url, content_type, body, prefix=prefix)
    )


def _is_html(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() in ("text/html", "")


def _prefix_of(url: str, base: str, root_prefix: str) -> str:
    """The key prefix of directory *url* in the bucket at *base*."""
    located = bucket_location(url)
    if located is None or located[0] != base:
        return root_prefix
    return located[1]


class _NotABucket(ListingError):
    """The bucket form of a URL did not answer with a bucket listing."""


async def _list_bucket(
    base: str, prefix: str, form: str, fetch: Fetch, limits: Limits
) -> list[Entry]:
    """Every entry under *prefix*, page after page, in *form*; `_NotABucket` when the first
    page is not a bucket listing, `ListingError` for a bucket that misbehaves later."""
    entries: list[Entry] = []
    tokens: set[str] = set()
    token: str | None = None
    for number in range(limits.pages):
        url = _bucket_page_url(base, prefix, form, token)
        status, content_type, body = await fetch(url)
        failure = _NotABucket if number == 0 else ListingError
        if status != 200:
            raise failure(f"HTTP {status} listing the bucket")
        try:
            page: Page = await _parse(url, content_type, body, prefix=prefix)
        except ListingError as err:
            raise failure(str(err)) from None
        if page.kind != "bucket":
            raise failure("the bucket did not answer with a bucket listing")
        entries.extend(page.entries)
        token = page.next_token
        if token is None:
            return entries
        if token in tokens:
            raise ListingError("the bucket repeated a continuation token")
        tokens.add(token)
    raise ListingError(f"more than {limits.pages} pages")


def _bucket_page_url(base: str, prefix: str, form: str, token: str | None) -> str:
    """The URL of one page of the bucket at *base* in *form*."""
    if form == "gcs-json":
        host, _, bucket = base.rpartition("/")
        query = {"delimiter": "/", "prefix": prefix}
        if token is not None:
            query["pageToken"] = token
        return f"{host}/storage/v1/b/{quote(bucket, safe='')}/o?{urlencode(query)}"
    query = {"list-type": "2", "delimiter": "/", "prefix": prefix}
    if token is not None:
        query["continuation-token"] = token
    return f"{base}?{urlencode(query)}"
