"""Tell a supervisor how the daemon is doing: systemd's sd_notify protocol, dependency-free.

systemd passes ``NOTIFY_SOCKET`` (a path, or an abstract socket starting with ``@``) to
``Type=notify`` services; ``READY=1`` must be sent only when the mount answers, so units
ordered after this one can use it at once. While serving, the daemon sends a ``STATUS=`` line
every ``--status-interval`` seconds, and ``STOPPING=1`` as soon as shutdown begins.
"""

from __future__ import annotations

import os
import socket


def notify_enabled() -> bool:
    """True when a supervisor listens (``NOTIFY_SOCKET`` is set): only then is status sent."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def sd_notify(message: str) -> bool:
    """Send *message* (e.g. ``READY=1``) to systemd; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True
