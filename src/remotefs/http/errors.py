"""What can go wrong talking to an origin, sorted by what the caller should do about it.

The one distinction that matters to callers is *transient* (worth retrying within the read
deadline: resets, timeouts, 5xx, 429) versus *permanent* (retrying cannot help: 404, 403, a
file that changed under us, a server that will not serve ranges). Messages never contain a
URL's query string: callers build them with `redact_url`.
"""

from __future__ import annotations


class HttpSourceError(Exception):
    """Base class: a request to an origin did not produce the bytes asked for."""

    transient: bool = False

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: The HTTP status behind the error, when there was one.
        self.status = status


class TransientError(HttpSourceError):
    """Network trouble or an overloaded server: try again after a backoff."""

    transient = True


class PermanentError(HttpSourceError):
    """The origin refused (404, 403, 410, ...): retrying this request will not help."""


class RemoteChangedError(PermanentError):
    """The origin's file is not the version whose blocks we cache (validator or size differ)."""


class RangeNotSupportedError(PermanentError):
    """The origin answered a Range request with the whole body."""


class ProtocolViolationError(PermanentError):
    """The origin answered with something that is not valid data for the request."""


class DeadlineExceededError(TransientError):
    """The read deadline passed while retries were still failing or a request was in progress."""
