"""Run the daemon in the background, returning to the shell only once the mount answers.

The classic fork-and-exit returns before the filesystem is usable, so `remotefs mount ...;
ls /mnt` races. Here the parent waits on a pipe: the child writes ``ready`` after the mount
answers a stat, or the error that stopped it, and the parent exits 0 or 1 accordingly.
Forking happens before trio or any thread starts, which is what makes it safe.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

READY = b"ready\n"


def run_in_background(
    child: Callable[[Callable[[], None], Callable[[str], None]], int], log_file: Path
) -> int:
    """Fork; the child runs ``child(report_ready, report_error)``; return the parent's exit code.

    *child* must call ``report_ready()`` when the mount answers, or ``report_error(text)``
    when it fails before that. Its return value is the child's exit status.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        sent = False

        def report_ready() -> None:
            nonlocal sent
            if not sent:
                sent = True
                os.write(write_end, READY)
                os.close(write_end)

        def report_error(text: str) -> None:
            nonlocal sent
            if not sent:
                sent = True
                os.write(write_end, text.encode(errors="replace")[:4000])
                os.close(write_end)

        status = 1
        try:
            # Inside the try: whatever fails, the child must end here, never return into
            # the parent's code.
            _detach_stdio(log_file)
            status = child(report_ready, report_error)
        finally:
            if not sent:
                report_error("the daemon exited before the mount was ready; see " + str(log_file))
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    message = b"".join(chunks)
    if message == READY:
        return 0
    if not message:
        # The child died without a word (killed): reap it to report its status.
        _, status = os.waitpid(pid, 0)
        message = f"the daemon died during start-up (status {status}); see {log_file}".encode()
    sys.stderr.write(f"remotefs: {message.decode(errors='replace').strip()}\n")
    return 1


def _detach_stdio(log_file: Path) -> None:
    """Point stdin at /dev/null and stdout/stderr at the log file (libfuse writes there)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
