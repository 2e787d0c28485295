"""remotefs: remote HTTP(S) files as read-only local files, fetched block by block on demand."""

__version__ = "0.1.0"
