"""Freshness: how long a cached version is served without asking its origin, and the asking.

A mount runs for months, and the files behind its URLs change ("latest.iso", nightly builds).
Each file is *fresh* for a lifetime computed as a private HTTP cache computes it (RFC 9111
§4.2): the origin's ``Cache-Control: max-age``, else ``Expires`` minus ``Date`` (both minus
``Age``), else ``--revalidate`` (60 s). ``no-cache`` means every open asks. ``--revalidate``
given by the user caps the origin's lifetime: fresher than the origin says, never staler.

Once the lifetime has run out, the file is *revalidated*: one conditional request
(``If-None-Match`` with the ETag, else ``If-Modified-Since``, on a ``Range: bytes=0-0`` GET).
A 304, or a 206 of the same version, makes it fresh again; another version goes through the
remote-change path (a new inode; old handles never mix versions). Revalidation happens

* when a stale file is opened: the open waits for the answer up to ``--revalidate-wait``,
  then goes on with what is cached (the answer still applies to later opens);
* in the background when a lookup, a getattr or a directory listing sees a stale file, so
  ``ls -l`` shows a new size within one lifetime and a few seconds (the kernel's attribute
  timeouts never outlive a file's freshness);
* before background fill touches a stale file.

One revalidation per file at a time, whoever asks; background ones go through a bounded set
of workers, and the prober bounds requests per origin. An origin that cannot be reached, or
answers 5xx, leaves the cached bytes in service (stale if error): the outage is logged once
per origin, and the file is asked again after a growing delay (5 s doubling to 5 min). A 404
or 410 marks the file *gone at origin* in ``status``; its cached bytes stay readable until a
reload removes its line. ``must-revalidate`` is not honoured for offline reads: a file system
whose files vanish when the network does would be worse than a stale one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from ..config.options import MountOptions
from ..http.errors import HttpSourceError, PermanentError
from ..http.source import RemoteMeta
from .cached_file import CachedFile

log = logging.getLogger(__name__)

#: The lifetime of a file whose origin says nothing about it (``--revalidate``'s default).
DEFAULT_LIFETIME = 60.0
#: After a revalidation failed, the file is asked again after this long, doubling.
RETRY_FIRST = 5.0
RETRY_MAX = 300.0
#: A lookup or getattr does not start another background revalidation of a file asked
#: this recently (a file whose lifetime is 0 would be asked on every stat otherwise).
BACKGROUND_MIN_INTERVAL = 1.0
#: Background revalidations in flight at once (the prober bounds them per origin too).
BACKGROUND_WORKERS = 32

Prober = Callable[[str, RemoteMeta], Awaitable[RemoteMeta | HttpSourceError]]
Changed = Callable[[CachedFile, RemoteMeta], Awaitable[None]]
Confirmed = Callable[[CachedFile, RemoteMeta], None]


def lifetime(remote: RemoteMeta, configured: float | None) -> float:
    """Seconds *remote* stays fresh after it was confirmed (see the module docstring)."""
    freshness = remote.freshness
    if freshness.no_cache:
        return 0.0
    if freshness.max_age is None:
        return DEFAULT_LIFETIME if configured is None else configured
    return freshness.max_age if configured is None else min(freshness.max_age, configured)


class Revalidator:
    """Keeps the files of one daemon fresh; run `run` in its nursery."""

    def __init__(
        self,
        probe: Prober,
        options: MountOptions,
        *,
        on_changed: Changed,
        on_confirmed: Confirmed,
        origin_of: Callable[[str], object] = lambda url: url,
    ) -> None:
        self._probe = probe
        self._configured = options.revalidate
        self._on_changed = on_changed
        self._on_confirmed = on_confirmed
        self._origin_of = origin_of
        self._flights: dict[CachedFile, trio.Event] = {}
        self._queue: deque[CachedFile] = deque()
        #: Files waiting in the queue, and when they were queued: one asked meanwhile (an
        #: open did not wait for the queue) is not asked again when its turn comes.
        self._queued: dict[CachedFile, float] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: Origins whose last revalidation failed (logged once, and again when back).
        self._down: set[object] = set()
        self.requests = 0

    # -- state of one file ------------------------------------------------------------------

    def lifetime_of(self, cached: CachedFile) -> float:
        return lifetime(cached.remote, self._configured)

    def confirm(self, cached: CachedFile, remote: RemoteMeta, at: float | None = None) -> None:
        """*remote* (the same version as *cached*) was confirmed by its origin at *at*."""
        now = time.time()
        at = now if at is None else at
        if remote.freshness != cached.remote.freshness:
            cached.set_freshness(remote.freshness)
        cached.validated_at = at
        cached.fresh_until = trio.current_time() + self.lifetime_of(cached) - (now - at)
        cached.retry_delay = 0.0
        cached.retry_at = float("-inf")
        cached.gone = False

    def is_stale(self, cached: CachedFile) -> bool:
        return trio.current_time() >= cached.fresh_until

    def remaining(self, cached: CachedFile) -> float:
        """Seconds *cached* stays fresh (0 when stale)."""
        return max(0.0, cached.fresh_until - trio.current_time())

    # -- asking ------------------------------------------------------------------------------

    async def refresh(self, cached: CachedFile, wait: float) -> None:
        """Revalidate *cached* if it is stale, waiting at most *wait* seconds for the answer.

        Nothing happens while a failed revalidation waits for its retry: the cached version
        is served at once (stale if error).
        """
        now = trio.current_time()
        if cached.retired or now < cached.fresh_until or now < cached.retry_at:
            return
        done = self._start(cached)
        with trio.move_on_after(wait):
            await done.wait()

    def in_background(self, cached: CachedFile) -> None:
        """Have *cached* revalidated soon if it is stale (a lookup or getattr saw it)."""
        now = trio.current_time()
        if (
            cached.retired
            or now < cached.fresh_until
            or now < cached.retry_at
            or now - cached.checked_at < BACKGROUND_MIN_INTERVAL
            or cached in self._flights
            or cached in self._queued
        ):
            return
        self._queued[cached] = now
        self._queue.append(cached)
        self._wake.set()

    def _start(self, cached: CachedFile) -> trio.Event:
        """The revalidation of *cached* in flight, started now if there is none."""
        done = self._flights.get(cached)
        if done is None:
            assert self._nursery is not None, "the revalidator is not running"
            done = self._flights[cached] = trio.Event()
            self._nursery.start_soon(self._revalidate, cached, done)
        return done

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve revalidations until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(BACKGROUND_WORKERS):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            cached = self._queue.popleft()
            queued_at = self._queued.pop(cached, float("-inf"))
            if (
                cached.retired
                or not self.is_stale(cached)
                or cached in self._flights
                or cached.checked_at >= queued_at
            ):
                continue
            done = self._flights[cached] = trio.Event()
            await self._revalidate(cached, done)

    async def _revalidate(self, cached: CachedFile, done: trio.Event) -> None:
        url = cached.remote.url
        try:
            cached.checked_at = trio.current_time()
            self.requests += 1
            result = await self._probe(url, cached.remote)
            if cached.retired:
                return
            origin = self._origin_of(url)
            if isinstance(result, RemoteMeta):
                if origin in self._down:
                    self._down.discard(origin)
                    log.info("%s: its origin answers again; revalidating", cached.name)
                stays = cached.remote.same_version(result)
                if stays and result.freshness.no_store and cached.cacheable:
                    stays = False  # now no-store: its cached bytes must go
                if stays:
                    self.confirm(cached, result)
                    self._on_confirmed(cached, result)
                else:
                    await self._on_changed(cached, result)
                return
            self._failed(cached, result, origin)
        except Exception:  # a bug must cost this revalidation, not the daemon
            log.exception("%s: revalidation failed", cached.name)
            self._failed(cached, None, None)
        finally:
            self._flights.pop(cached, None)
            done.set()

    def _failed(self, cached: CachedFile, error: HttpSourceError | None, origin: object) -> None:
        """Serve what is cached, and ask again after a growing delay."""
        now = trio.current_time()
        cached.retry_delay = min(max(cached.retry_delay * 2, RETRY_FIRST), RETRY_MAX)
        cached.retry_at = now + cached.retry_delay
        if isinstance(error, PermanentError) and error.status in (404, 410):
            if not cached.gone:
                cached.gone = True
                log.warning(
                    "%s: gone at its origin (%s); its cached bytes stay readable until a reload"
                    " removes its line",
                    cached.name,
                    error,
                )
            return
        if origin is not None and origin not in self._down:
            self._down.add(origin)
            log.warning(
                "%s: cannot revalidate it (%s); serving cached bytes, possibly stale, and"
                " asking again later (logged once for its origin)",
                cached.name,
                error,
            )
