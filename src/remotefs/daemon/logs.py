"""Logging set-up: a file in the background, stderr in the foreground, journald-friendly.

Under journald (stderr is the stream that ``JOURNAL_STREAM`` names) lines carry no timestamp,
since the journal adds its own; elsewhere they do. Secrets never reach these handlers: callers
log redacted URLs only.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd set up for this service.

    systemd puts ``DEVICE:INODE`` of that stream in ``JOURNAL_STREAM``; a program started
    from such a service with stderr redirected elsewhere inherits the variable, so the
    stream itself is compared, as systemd.exec(5) recommends.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def setup_logging(level: str, log_file: Path | None) -> None:
    """Route the ``remotefs`` loggers to *log_file* (appending, 0600) or to stderr."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        handler: logging.Handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
        fmt = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            fmt = "%(levelname)s %(name)s: %(message)s"
        else:
            fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request with its full URL (query included) at INFO: keep it quiet.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
