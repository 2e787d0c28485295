"""Logging set-up: a file in the background, stderr in the foreground, journald-friendly.

Under journald (stderr is the stream that ``JOURNAL_STREAM`` names) lines carry no timestamp,
since the journal adds its own; elsewhere they do. Secrets never reach these handlers: callers
log redacted URLs only.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
from pathlib import Path

from ..cache import safe_fs


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


def open_log_file(path: Path) -> int:
    """Open *path* for appending (0600), with the cache directory's rules: a log directory
    owned by the user or root and writable only by them, and never a symlink followed."""
    directory = path.parent
    safe_fs.check_private_dir(directory, "log directory")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with safe_fs.opened_dir(os.path.realpath(directory)) as dir_fd:
        return safe_fs.open_file(path.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, dir_fd=dir_fd)


def setup_logging(level: str, *, to_log_file: bool = False) -> None:
    """Route the ``remotefs`` loggers to stderr: a log file (with timestamps and the pid),
    or a terminal or the journal (which adds its own timestamps).

    Through a queue: a log line is written by a thread of its own, so the event loop never
    waits for the disk the log file lives on (often the slow cache disk itself) or for a
    journal that is behind. `flush_logging` writes out what is queued; it runs at exit.
    """
    global _listener
    flush_logging()
    handler = logging.StreamHandler(sys.stderr)
    if to_log_file:
        fmt = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    elif stderr_is_journal():
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level.upper())
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    # httpx logs every request with its full URL (query included) at INFO: keep it quiet.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: The thread that writes queued log records (`setup_logging`), while logging is set up.
_listener: logging.handlers.QueueListener | None = None


def flush_logging() -> None:
    """Write every queued log record and stop the writer thread (at exit, or before a
    process ends with ``os._exit``)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(flush_logging)
