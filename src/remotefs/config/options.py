"""Tunables of one mount, in one place with their defaults and the reason for each.

Every layer receives a `MountOptions` instead of loose keyword arguments, so a test can build a
layer with exactly the settings it needs and the CLI stays the only place that parses strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB


#: The smallest cache size cap: room for a few of the kernel's 1 MiB reads in flight at once.
MIN_CACHE_MAX_SIZE = 4 * MiB

SYSTEM_CACHE_DIR = Path("/var/cache/remotefs")


def default_cache_dir() -> Path:
    """The XDG cache directory for remotefs (``$XDG_CACHE_HOME/remotefs`` or ``~/.cache``).

    Root gets the same rule as everyone else while it has a home: an explicit ``--cache-dir``
    is the way to choose a system-wide location. mount(8) and systemd run their helpers with
    a minimal environment (no ``HOME``, no ``XDG_*``): root then gets ``/var/cache/remotefs``,
    and another user the home directory of its passwd entry. Never raises.
    """
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "remotefs"
    if home := os.environ.get("HOME"):
        return Path(home) / ".cache" / "remotefs"
    if os.geteuid() == 0:
        return SYSTEM_CACHE_DIR
    home = os.path.expanduser("~")  # without HOME: the passwd entry, or "~" if there is none
    if not os.path.isabs(home):
        return SYSTEM_CACHE_DIR
    return Path(home) / ".cache" / "remotefs"


@dataclass(frozen=True)
class MountOptions:
    """Settings of one mount. Defaults are what a user gets without flags."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    # 64 KiB: fine enough that `unzip -l` or a superblock read costs little, coarse enough that
    # a 5 GB file needs only ~80k bits of bitmap.
    block_size: int = 64 * KiB
    # Requests smaller than this cost a round trip for little data; 256 KiB keeps random-read
    # traffic bounded while amortising latency.
    min_request: int = 256 * KiB
    # One pool for the whole mount: origins and the local link are shared resources.
    max_connections: int = 8
    # A read gives up (EIO) after this many seconds of retries, so no reader hangs forever.
    read_deadline: float = 60.0
    # A response body that delivers no byte for this long is treated as a broken connection.
    stall_timeout: float = 20.0
    connect_timeout: float = 10.0
    # Probing all URLs at mount: how long one URL may take (with retries, counted from when
    # its request may be sent) before it is reported unreachable and re-probed later.
    probe_timeout: float = 10.0
    # Probes in flight per origin (scheme, host, port): enough to probe 10,000 URLs in a few
    # seconds at 20 ms per request, few enough not to look like an attack.
    probe_connections: int = 16
    # How long a file stays fresh when its origin says nothing (Cache-Control, Expires):
    # None means 60 s. Given by the user, it also caps what the origin says.
    revalidate: float | None = None
    # How long an open of a stale file waits for its origin to confirm it (and at mount,
    # files known from an earlier run) before the cached version is used.
    revalidate_wait: float = 2.0
    # A directory source's listing is asked for again (conditionally) after this many
    # seconds: often enough that new files show within minutes, rarely enough that a
    # 10,000-entry listing costs its server little.
    list_ttl: float = 300.0
    # Free space of the cache filesystem that background fill and prefetch never use
    # (None: 5% of the filesystem or 2 GiB, whichever is smaller).
    min_free: int | None = None
    # The bitmap is saved at most this often while reads are downloading blocks.
    checkpoint_interval: float = 2.0
    # Sequential readers get a readahead window that doubles per read up to this cap.
    readahead_max: int = 64 * MiB
    # On first open, fetch the tail (zip central directories, ISO/MP4 indexes) and the head
    # (superblocks, headers) concurrently with the caller's first read.
    prefetch_tail: int = 1 * MiB
    prefetch_head: int = 64 * KiB
    # Idle background fill: after this many seconds without a foreground read, missing blocks
    # are downloaded over at most fill_connections connections, at most fill_rate B/s (0: no
    # cap), of the files a program has read ("opened"), of every file ("all"), or none.
    fill: str = "opened"
    fill_idle: float = 2.0
    fill_connections: int = 2
    fill_rate: int = 0
    # The most bytes of cached blocks the mount keeps (0: no cap). Least recently used chunks
    # of blocks are evicted to make room, those of files nobody has open first.
    cache_max_size: int = 0
    # How far ahead the kernel itself reads for sequential readers, which is also the largest
    # read request it sends us (at most 1 MiB, FUSE's limit). Needs root; else 128 KiB.
    kernel_readahead: int = 1 * MiB
    user_agent: str = "remotefs/0.1"
    # Request headers sent with every request (--header, --header-file), as (name, value)
    # pairs; per-URL headers from urls.txt are added on top. Out of repr: they hold secrets.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # All requests through this proxy (http://, https://, socks5://, socks5h://). None: the
    # standard environment variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) apply.
    proxy: str | None = field(default=None, repr=False)
    # Offer HTTP/2 in the TLS handshake (ALPN); servers that do not take it get HTTP/1.1.
    http2: bool = True
    ca_bundle: str | None = None
    insecure: bool = False
    allow_other: bool = False
    # Under systemd (NOTIFY_SOCKET set), a STATUS= progress line is sent this often.
    status_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.block_size < 4 * KiB or self.block_size & (self.block_size - 1):
            raise ValueError("block size must be a power of two of at least 4 KiB")
        if self.min_request < self.block_size:
            object.__setattr__(self, "min_request", self.block_size)
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if self.probe_connections < 1:
            raise ValueError("probe connections must be at least 1")
        if self.revalidate_wait < 0:
            raise ValueError("the revalidation wait cannot be negative")
        if self.revalidate is not None and self.revalidate < 0:
            raise ValueError("--revalidate cannot be negative")
        if self.fill not in FILL_POLICIES:
            raise ValueError(f"--fill must be one of {', '.join(FILL_POLICIES)}")
        if self.min_free is not None and self.min_free < 0:
            raise ValueError("the free-space reserve cannot be negative")
        if self.read_deadline <= 0 or self.stall_timeout <= 0 or self.probe_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.cache_max_size and self.cache_max_size < MIN_CACHE_MAX_SIZE:
            raise ValueError(
                f"the cache size cap must be 0 (none) or at least {MIN_CACHE_MAX_SIZE // MiB}M"
            )
        if self.status_interval <= 0:
            raise ValueError("the status interval must be positive")
        if self.proxy is not None:
            scheme, sep, rest = self.proxy.partition("://")
            if not sep or not rest or scheme.lower() not in PROXY_SCHEMES:
                # The proxy URL may hold a password: say what is wrong, never echo it.
                raise ValueError(
                    "--proxy must be a URL starting with http://, https://, socks5:// or socks5h://"
                )


PROXY_SCHEMES = frozenset({"http", "https", "socks5", "socks5h"})
#: What background fill completes: files a program read, every listed file, nothing.
FILL_POLICIES = ("opened", "all", "none")
