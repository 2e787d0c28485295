"""Directory listings: which files and subdirectories a server says a directory holds.

The parsers behind directory sources (a URL ending in ``/``): HTML pages of links as nginx,
Apache, lighttpd, Caddy and ``python3 -m http.server`` write them (`links` has the rules),
nginx's and Caddy's JSON, and S3/GCS ``ListBucketResult`` XML with its pagination. Pure
functions of a body: fetching, limits and walking a tree belong to their callers.
"""

from __future__ import annotations

from .formats import ACCEPT, Entry, ListingError, Page, bucket_location, parse
from .links import ChildLink, child_of

__all__ = [
    "ACCEPT",
    "ChildLink",
    "Entry",
    "ListingError",
    "Page",
    "bucket_location",
    "child_of",
    "parse",
]
