"""Run the daemon in the background, returning to the shell only once it answers.

The classic fork-and-exit returns before the filesystem is usable, so `remotefs mount ...;
ls /mnt` races. Here the parent waits on a pipe: the child writes progress lines while it
probes (``progress DONE TOTAL``), then ``ready`` once the mount answers a stat, or
``error TEXT`` when it fails before that; the parent shows the progress on a terminal and
exits 0 or 1 accordingly. Forking happens before trio or any thread starts, which is what
makes it safe.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

READY = "ready"
PROGRESS = "progress"
ERROR = "error"


@dataclass(frozen=True)
class Reporter:
    """What the child tells the waiting parent."""

    #: The daemon answers; the text (where it serves, or "") is printed by the parent.
    ready: Callable[[str], None]
    error: Callable[[str], None]
    progress: Callable[[int, int], None]


ChildMain = Callable[[Reporter], int]


def run_in_background(child: ChildMain, log_fd: int, log_file: str) -> int:
    """Fork; the child runs ``child(reporter)``; return the parent's exit code.

    *child* must call ``reporter.ready(text)`` when the mount answers (the parent prints
    *text*, when there is one, on its stdout), or ``reporter.error(text)``
    when it fails before that. Its return value is the child's exit status. *log_fd* is the
    opened log file: the child's stdout and stderr go there (libfuse writes to them).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        done = False

        def send(line: str) -> None:
            os.write(write_end, (line.replace("\n", " ")[:4000] + "\n").encode(errors="replace"))

        def ready(message: str = "") -> None:
            nonlocal done
            if not done:
                done = True
                send(f"{READY} {message}" if message else READY)
                os.close(write_end)
                # Only now, mounted: systemd lets the process group of a mount helper past
                # the automount it is mounting (x-systemd.automount); a session of our own
                # before the mount would wait for that automount, which waits for us.
                os.setsid()

        def error(text: str) -> None:
            nonlocal done
            if not done:
                done = True
                send(f"{ERROR} {text}")
                os.close(write_end)

        def progress(count: int, total: int) -> None:
            if not done:
                send(f"{PROGRESS} {count} {total}")

        status = 1
        try:
            # Inside the try: whatever fails, the child must end here, never return into
            # the parent's code.
            _detach_stdio(log_fd)
            status = child(Reporter(ready, error, progress))
        finally:
            if not done:
                error(f"the daemon exited before the mount was ready; see {log_file}")
            os._exit(status)
    os.close(write_end)
    os.close(log_fd)
    return _wait_for_child(read_end, pid, log_file)


def _wait_for_child(read_end: int, pid: int, log_file: str) -> int:
    show = sys.stderr.isatty()
    shown = False
    buffer = b""
    outcome: str | None = None
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while outcome is None and (chunk := pipe.read(65536)):
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                line = raw.decode(errors="replace")
                if line.startswith(PROGRESS + " "):
                    if show:
                        count, _, total = line[len(PROGRESS) + 1 :].partition(" ")
                        sys.stderr.write(
                            f"\rremotefs: probed {int(count):,} of {int(total):,} URLs"
                        )
                        sys.stderr.flush()
                        shown = True
                    continue
                outcome = line
                break
    if shown:
        sys.stderr.write("\r\x1b[K")
    if outcome == READY or (outcome is not None and outcome.startswith(READY + " ")):
        said = outcome[len(READY) + 1 :].strip()
        if said:
            sys.stdout.write(f"remotefs: {said}\n")
            sys.stdout.flush()
        return 0
    if outcome is None:
        # The child died without a word (killed): reap it to report its status.
        _, status = os.waitpid(pid, 0)
        outcome = f"the daemon died during start-up (status {status}); see {log_file}"
    elif outcome.startswith(ERROR + " "):
        outcome = outcome[len(ERROR) + 1 :]
    sys.stderr.write(f"remotefs: {outcome.strip()}\n")
    return 1


def _detach_stdio(log_fd: int) -> None:
    """Point stdin at /dev/null and stdout/stderr at the log file (libfuse writes there)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
