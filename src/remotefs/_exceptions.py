"""The errors of the Python library, one tree, each also a built-in error where one fits:

    RemoteFsError                 anything the library cannot do
     ├── UrlError                 (also ValueError) a bad URL, a bad header, a bad option value
     ├── NetworkError             (also OSError) unreachable, timed out, 5xx after retries, EIO
     ├── RemoteChangedError       (also OSError) the file changed under an open object
     ├── NotFoundError            (also FileNotFoundError) the origin answers 404 or 410
     ├── IntegrityError           (also OSError) the bytes do not match their digest, twice
     └── CacheInUseError          the cache directory is used by another process (names it)

Messages never contain a URL's query or userinfo: they come from the engine, which redacts.
"""

from __future__ import annotations

import errno


class RemoteFsError(Exception):
    """Base of every error the library raises."""


class UrlError(RemoteFsError, ValueError):
    """A URL, a header or an option value that cannot be used."""


class NetworkError(RemoteFsError, OSError):
    """The origin could not give the bytes in time: unreachable, timed out, 5xx, refused."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class RemoteChangedError(RemoteFsError, OSError):
    """The file changed at its origin while an object had it open: reopen it for the new one."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.ESTALE, message)

    def __str__(self) -> str:
        return str(self.strerror)


class NotFoundError(RemoteFsError, FileNotFoundError):
    """The origin answers 404 or 410."""

    def __init__(self, message: str) -> None:
        FileNotFoundError.__init__(self, errno.ENOENT, message)

    def __str__(self) -> str:
        return str(self.strerror)


class IntegrityError(RemoteFsError, OSError):
    """The file's bytes do not have the digest given for them (``sha256=``, a checksum file),
    and a fresh download did not either: EIO, never the wrong bytes as if they were right."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class CacheInUseError(RemoteFsError):
    """The cache directory is used by another process (a mount, or another program)."""


__all__ = [
    "CacheInUseError",
    "IntegrityError",
    "NetworkError",
    "NotFoundError",
    "RemoteChangedError",
    "RemoteFsError",
    "UrlError",
]
