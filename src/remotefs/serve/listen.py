"""What the HTTP server is told before it starts: where to listen, and the token, checked.

These checks run in the foreground, before the daemon forks, so that a mistake is one line
and a non-zero exit, and nothing listens:

* ``--listen HOST:PORT`` (``[::1]:8080`` for IPv6; a bare ``PORT`` means 127.0.0.1);
* an address that is not loopback needs ``--token-file``: a server reachable from the
  network hands every listed file, and the names of all of them, to whoever asks;
* the token file is the user's own, not readable or writable by group or others (as ssh
  treats a private key), and holds one token of printable ASCII.

No hypercorn here: the CLI imports this module whether or not the ``[serve]`` extra is
installed, to say so in one line when it is not.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8080"
#: The shortest token accepted: a guessable one would make the check decoration.
MIN_TOKEN_LENGTH = 16
#: Host names that always mean this machine's loopback interface.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


#: The largest request head answered, request line and headers (the README's 16 KiB): h11
#: refuses a larger one that arrives in parts, the app one that arrives at once.
MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """How much the HTTP server may take: connections, and how long a client may idle or
    stall (`remotefs.serve.server` explains each)."""

    connections: int = 128
    idle_timeout: float = 15.0
    send_timeout: float = 60.0


class ListenError(ValueError):
    """A ``--listen`` or ``--token-file`` that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Listen:
    """Where to listen: a host (an IP address, or a name resolved at bind time) and a port."""

    host: str
    port: int

    @property
    def bind(self) -> str:
        """The address as hypercorn's ``bind`` setting takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.bind


def parse_listen(text: str) -> Listen:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:8080``, ``0.0.0.0:80`` or ``8080``."""
    value = text.strip()
    if not value:
        raise ListenError("--listen: empty address")
    if value.isdigit():
        host, port_text = "127.0.0.1", value
    elif value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ListenError(f"--listen {text}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon or not host:
            raise ListenError(f"--listen {text}: expected HOST:PORT, e.g. 127.0.0.1:8080")
        if ":" in host:
            raise ListenError(f"--listen {text}: write an IPv6 address in brackets: [{host}]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(f"--listen {text}: the port must be a number from 0 to 65535")
    return Listen(host, int(port_text))


def is_loopback(listen: Listen) -> bool:
    """True when every address *listen.host* stands for is a loopback address.

    A name is resolved (``localhost`` need not be); a name that does not resolve is not
    loopback. The wildcard addresses (``0.0.0.0``, ``::``) are every interface: not loopback.
    """
    host = listen.host
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, listen.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%")[0]).is_loopback for address in addresses
    )


def load_token(path: Path) -> str:
    """The token in *path*: its first line, stripped. The file must be the user's (or root's),
    a regular file, and not readable or writable by group or others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ListenError(f"--token-file {path}: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ListenError(f"--token-file {path}: not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise ListenError(f"--token-file {path}: owned by uid {info.st_uid}, not by you")
        if info.st_mode & 0o077:
            raise ListenError(
                f"--token-file {path}: permissions {stat.S_IMODE(info.st_mode):04o} are too"
                f" open (group or others may read it); chmod 600 {path}"
            )
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        token = data.decode("ascii").splitlines()[0].strip() if data.strip() else ""
    except UnicodeDecodeError:
        raise ListenError(f"--token-file {path}: the token must be printable ASCII") from None
    if not token.isprintable() or " " in token:
        raise ListenError(f"--token-file {path}: the token must be printable ASCII, no spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ListenError(
            f"--token-file {path}: the token has {len(token)} characters; use at least"
            f" {MIN_TOKEN_LENGTH} (for example: openssl rand -hex 32 > {path})"
        )
    return token


def check_exposure(listen: Listen, token: str | None) -> None:
    """Refuse a non-loopback address without a token (one line, with the fix)."""
    if token is None and not is_loopback(listen):
        raise ListenError(
            f"refusing to serve on {listen}, which is not a loopback address, without"
            " --token-file: anyone who can reach it could read every listed file"
            " (create one with: openssl rand -hex 32 > FILE; chmod 600 FILE)"
        )


@dataclass(frozen=True)
class HttpSettings:
    """Everything the daemon's HTTP door needs, checked: where, the token, the limits."""

    listen: Listen
    token: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)
