"""Make URLs and headers safe to print.

Query strings carry presigned-URL signatures and tokens, userinfo carries passwords and
tokens, and Authorization and Cookie headers carry credentials. Nothing that reaches a log
line, an error message or status output may contain them, so every such place goes through
these helpers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_REDACTED_QUERY = "?<redacted>"
_REDACTED_FRAGMENT = "#<redacted>"


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Copy *headers* with credential-bearing values replaced by ``***``."""
    return {k: ("***" if k.lower() in SECRET_HEADERS else v) for k, v in headers.items()}


def redact_url(url: str) -> str:
    """Return ``url`` safe to show in messages and logs.

    The query becomes ``?<redacted>`` (pre-signed URLs carry their signature there), the
    userinfo becomes ``***``, and a fragment becomes ``#<redacted>`` (some services
    put tokens there).  This works on the raw string rather than through ``urlsplit`` because
    it is also used on URLs that ``urlsplit`` rejects.
    """
    rest, has_fragment, _ = url.partition("#")
    rest, has_query, _ = rest.partition("?")
    scheme_end = rest.find("//")
    start = scheme_end + 2 if scheme_end >= 0 else 0
    end = rest.find("/", start)
    if end < 0:
        end = len(rest)
    authority = _redact_authority(rest[start:end])
    redacted = rest[:start] + authority + rest[end:]
    if has_query:
        redacted += _REDACTED_QUERY
    if has_fragment:
        redacted += _REDACTED_FRAGMENT
    return redacted


def url_at_rest(url: str) -> str:
    """The form of *url* written to the cache's files: no userinfo, query or fragment.

    The cache's files name the URL they belong to (to tell entries apart and to check an
    entry is the one asked for), but never hold a password, a token or a signature: the
    URL list (or the library call) supplies the whole URL again at every start. A URL with
    such parts is written as its redacted form and a digest of the whole, which keeps two
    URLs that differ only in them apart; it is not a URL anyone can request.
    """
    shown = redact_url(url)
    if shown == url:
        return url
    return f"{shown} sha256:{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def _redact_authority(authority: str) -> str:
    """Hide the whole userinfo of ``user:password@host``.

    A password is a secret, and so is a bare user part: ``https://TOKEN@host`` is a common way
    to pass an access token.
    """
    _userinfo, at, host = authority.rpartition("@")
    return f"***@{host}" if at else authority
