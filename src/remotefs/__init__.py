"""remotefs: remote HTTP(S) files as local files, fetched block by block on demand and kept.

Three doors onto one engine: a FUSE mount (``remotefs mount``), a local HTTP server
(``remotefs serve``) and this Python library::

    import remotefs
    with remotefs.open(url) as f:          # a binary, seekable file object
        head = f.read(100)

The library needs no FUSE: importing remotefs never imports pyfuse3.
"""

import logging

from ._exceptions import (
    CacheInUseError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    RemoteChangedError,
    RemoteFsError,
    UrlError,
)
from .library import AsyncRemoteFile, Cache, FileStatus, RemoteFile, aopen, open
from .listings.walk import ListedFile

__version__ = "0.1.0"

# A library reports through its exceptions; its log lines go where the program sends them,
# never to stderr by default (the daemons configure logging themselves).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AsyncRemoteFile",
    "Cache",
    "CacheInUseError",
    "FileStatus",
    "IntegrityError",
    "ListedFile",
    "NetworkError",
    "NotFoundError",
    "RemoteChangedError",
    "RemoteFile",
    "RemoteFsError",
    "UrlError",
    "__version__",
    "aopen",
    "open",
]
