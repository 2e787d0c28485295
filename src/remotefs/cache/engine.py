"""The engine: one block cache of remote files, shared by every door onto it.

`RemoteCache` owns everything that is about URLs and bytes: the cache directory (`CacheStore`),
the HTTP source and the prober, the fetcher (single-flight downloads, readahead), the cache
cap and the free-space reserve, the checkpointer, background fill, freshness
(`Revalidator`), the catalog, the registry of the one `CachedFile` of each URL, whole-file
downloads of files without a length, the swap to a new version when an origin's file
changes, and open handles with their open-time hints.

The doors (the FUSE mount in `remotefs.daemon`, the Python library in `remotefs.library`, the
HTTP server) own only names: paths, inodes, file objects, HTTP requests. They ask the engine
for the files of URLs (`list_files`, `add_files`, `get`), read through handles (`open`,
`read`, `close`), and hear about changes as a `Door`: a URL that was not there is now
(`available`), a file was replaced by a new version (`swap`, then `settle`).

Lifetime, as s3ql's block cache and mount have it: ``async with RemoteCache(...) as cache``.
Starting takes the cache directory's lock (`open_store` may do that earlier, before a daemon
forks), then starts in this order the re-prober, the revalidator, the checkpointer, the
catalog saver and, unless ``--fill none``, the filler, all in the engine's own nursery.
Stopping cancels them in reverse, then saves every dirty bitmap and the catalog, closes the
connections and releases the lock. Nothing is lost by a stop: a crash costs at most one
checkpoint interval of downloads (docs/architecture.md has the crash table).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import trio

from ..config.manifest import Digests, Headers
from ..config.options import MountOptions
from ..formats.hints import OpenHints
from ..http.errors import (
    HttpSourceError,
    PermanentError,
    RangeNotSupportedError,
    RemoteChangedError,
)
from ..http.retry import retry_until
from ..http.source import UNKNOWN_SIZE, HttpSource, ListingResponse, RemoteMeta
from ..listings import ACCEPT, ListingError
from ..listings.walk import Walk, walk
from . import safe_fs
from .budget import CacheBudget
from .cached_file import CachedFile, FileRetiredError
from .checkpoint import run_checkpointer, save_all
from .disk_space import FreeSpaceReserve
from .fd_cache import capacity_for, raise_nofile_limit
from .fetcher import BlockFetcher, ReadError
from .filler import Filler
from .freshness import Revalidator
from .gaps import gaps_largest_first
from .probe import MAX_PROBES, Prober, ProbeResult, ProbeRetrier, origin_name, origin_of
from .readahead import ReadStream
from .state_files import Catalog, CatalogRecord
from .store import CacheStore, EntryUnavailableError, StoredEntry
from .verify import Verifier

log = logging.getLogger(__name__)

#: How often the catalog is saved while it changes (it is saved when the engine stops too).
CATALOG_INTERVAL = 30.0
#: While probing, how often progress is reported (to the waiting command, and to the log).
PROGRESS_INTERVAL = 0.5
PROGRESS_LOG_INTERVAL = 5.0
#: After the origin contradicted itself about a file (a probe says it did not change, a data
#: answer says it did), further change reports of that file are ignored for this long.
CONTRADICTION_COOLDOWN = 60.0
#: Per origin, how many files that cannot be listed or confirmed are logged one by one.
LOGGED_FAILURES = 10
#: Concurrent requests of one file's prefetch, and the size of each.
PREFETCH_WORKERS = 4
PREFETCH_CHUNK = 4 << 20
#: The largest directory listing read (a listing is hostile input; this holds a million names).
LISTING_LIMIT = 64 << 20
#: Earlier answers by URL, for conditional GETs of listings and checksum files.
ListingMemo = dict[str, ListingResponse]

ProgressCallback = Callable[[int, int], None]


class Pending:
    """A URL whose file is being downloaded whole (its server sends no length): `Door.available`
    brings it once it is complete."""


PENDING = Pending()
Listing = CachedFile | HttpSourceError | Pending


class Door(Protocol):
    """What a door onto the engine hears (the FUSE mount, the HTTP server)."""

    def available(self, url: str, cached: CachedFile) -> None:
        """*url*, which did not answer (or was downloading), has a file now."""

    def swap(self, old: CachedFile, new: CachedFile) -> None:
        """The origin serves a new version: show *new* where *old* was, now (no await)."""

    async def settle(self, old: CachedFile) -> None:
        """After a swap or a retirement: forget what caches (the kernel's) hold of *old*."""

    async def discard_pages(self, cached: CachedFile) -> None:
        """Bytes of *cached* were wrong (a digest mismatch): forget any copy of them."""


@dataclass(eq=False)
class Handle:
    """One open file: the version it opened, and its reads' sequential state (readahead)."""

    file: CachedFile
    stream: ReadStream
    #: The opener sets up a loop device: its reads should reach the engine as the kernel's
    #: own demand (the FUSE door opens it ``direct_io``), see `remotefs.formats.hints`.
    loop: bool = False


@dataclass(frozen=True, slots=True)
class Known:
    """What an earlier run knew of a URL: its stored entry, or only the catalog's record."""

    remote: RemoteMeta
    stored: StoredEntry | None


class RemoteCache:
    """The engine of one cache directory (see the module docstring)."""

    def __init__(
        self, options: MountOptions, url_headers: Mapping[str, Headers] | None = None
    ) -> None:
        self.options = options
        self.store = CacheStore(options.cache_dir, options.block_size)
        self.source = HttpSource(options, url_headers or {})
        self.prober = Prober(self.source, options)
        self.retrier = ProbeRetrier(self.prober, self._answered_again)
        self.revalidator = Revalidator(
            self.prober.probe,
            options,
            on_changed=self._changed_at_origin,
            on_confirmed=lambda cached, remote: self._note_probe(cached.remote.url, remote),
            origin_of=origin_of,
        )
        self.verifier = Verifier(
            self.spawn, self._drop_copy, self._refetch, self._discard_pages, self._complete_now
        )
        self.store.on_stored = self.verifier.stored
        self.budget: CacheBudget | None = None
        if options.cache_max_size:
            self.budget = CacheBudget(options.cache_max_size, self.files)
        self.reserve: FreeSpaceReserve | None = None
        self._fetcher: BlockFetcher | None = None
        self._hints: OpenHints | None = None
        self._doors: list[Door] = []
        self._nursery: trio.Nursery | None = None
        #: Swaps to new versions run one at a time, and doors take this lock for their own
        #: changes of names (a reload): a swap must not race a door listing the same URL.
        self.lock = trio.Lock()
        #: The one current cache entry of each URL. One object per URL, or two would fetch
        #: and save the same entry.
        self._by_url: dict[str, CachedFile] = {}
        #: The URLs doors want, with the name to log for each (a door's first path).
        self._wanted: dict[str, str] = {}
        #: Files being swapped for a new version, and the event set when that is done.
        self._changing: dict[CachedFile, trio.Event] = {}
        self._contradicted: dict[CachedFile, float] = {}
        self._catalog = Catalog()
        self._catalog_dirty = False
        self._downloads: dict[str, trio.Lock] = {}
        #: URLs being downloaded whole, and the event set when that ends (`get` waits).
        self._arrivals: dict[str, trio.Event] = {}
        self._download_errors: dict[str, HttpSourceError] = {}
        self._handles: dict[Handle, None] = {}
        #: What exact listings (JSON, buckets) said of URLs never probed: size and ETag. A
        #: file is listed from its seed at once and probed in the background (`seed`).
        self._seeds: dict[str, RemoteMeta] = {}
        #: URLs whose file was made from a seed and not yet confirmed by a probe.
        self._provisional: set[str] = set()
        self._failures_logged: dict[tuple[str, str, int | None], int] = {}
        self._down_origins: set[tuple[str, str, int | None]] = set()
        self._opened = False

    # -- lifetime -------------------------------------------------------------------------------

    def open_store(self, wait: float = 5.0) -> None:
        """Take the cache directory's lock now (raises `CacheDirError`), waiting up to *wait*
        seconds for a daemon that was just stopped to release it.

        The soft limit of open files is raised to the hard one first, and the cache keeps as
        many data files open as that leaves room for.
        """
        if self._opened:
            return
        soft, _ = raise_nofile_limit()
        self.store.fds.capacity = capacity_for(
            soft, self.options.max_connections + MAX_PROBES + self.options.fill_connections
        )
        self.store.open(wait)
        self._opened = True

    #: How long `__aenter__` waits for the cache directory's lock (`open_store` may be called
    #: first with another wait).
    lock_wait = 5.0

    async def __aenter__(self) -> RemoteCache:
        self.open_store(self.lock_wait)
        self._exits = contextlib.AsyncExitStack()
        await self._exits.__aenter__()
        try:
            # Unwound in reverse: every task of the nursery has ended before the shutdown
            # saves and closes the store (a catalog save in a thread must not lose its fd).
            self._exits.push_async_callback(self._shutdown)
            self._nursery = await self._exits.enter_async_context(trio.open_nursery())
            self.reserve = FreeSpaceReserve(
                functools.partial(os.statvfs, self.options.cache_dir), self.options.min_free
            )
            self._fetcher = BlockFetcher(
                self.source,
                self.options,
                self._nursery,
                on_remote_changed=self._remote_changed,
                budget=self.budget,
            )
            self._hints = OpenHints(
                self._fetcher, tail=self.options.prefetch_tail, head=self.options.prefetch_head
            )
            if self.budget is not None:
                self.budget.open_files = self.open_files
            self._catalog = await trio.to_thread.run_sync(self.store.load_catalog)
            self._nursery.start_soon(self.retrier.run)
            await self._nursery.start(self.revalidator.run)
            self._nursery.start_soon(run_checkpointer, self.files, self.options.checkpoint_interval)
            self._nursery.start_soon(self._catalog_loop)
            if self.options.fill != "none":
                filler = Filler(
                    self._fetcher, self.listed_files, self.options, self.reserve, self.revalidator
                )
                self._nursery.start_soon(filler.run)
        except BaseException:
            await self._exits.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._exits.__aexit__(None, None, None)

    async def _shutdown(self) -> None:
        """Save everything, close everything (shielded: a cancelled stop still saves)."""
        with trio.CancelScope(shield=True):
            await save_all(self.files())
            self._catalog_dirty = True
            await self.save_catalog()
            await self.source.aclose()
            await self.prober.aclose()
        self.store.close()

    @property
    def fetcher(self) -> BlockFetcher:
        assert self._fetcher is not None, "the engine is not running"
        return self._fetcher

    def add_door(self, door: Door) -> None:
        self._doors.append(door)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run *fn* in the engine's nursery; an unexpected exception is logged, never fatal."""
        assert self._nursery is not None, "the engine is not running"

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("background task %s failed", getattr(fn, "__name__", fn))

        self._nursery.start_soon(guarded)

    # -- the files ------------------------------------------------------------------------------

    def files(self) -> list[CachedFile]:
        """Every current cache entry (listed, or held open)."""
        return list(self._by_url.values())

    def listed_files(self) -> list[CachedFile]:
        """The entries of the URLs doors want (those background fill completes)."""
        return [cached for url, cached in self._by_url.items() if url in self._wanted]

    def file(self, url: str) -> CachedFile | None:
        return self._by_url.get(url)

    def set_headers(self, url_headers: Mapping[str, Headers]) -> None:
        """Per-URL request headers (a reload read urls.txt again)."""
        self.source.set_headers(url_headers)

    def set_digests(self, url_digests: Mapping[str, Digests]) -> None:
        """The digests each URL's bytes must have (``sha256=`` lines, checksum files)."""
        self.verifier.set_digests(url_digests)

    def seed(self, listed: Mapping[str, tuple[int, str | None]]) -> None:
        """Sizes (and ETags) that exact listings gave for URLs: such a URL never seen before
        is listed from them without waiting for its probe, which runs in the background
        and, when it agrees on the size (and the ETag), only completes what is known."""
        self._seeds = {
            url: RemoteMeta(url, size, etag, None, None, True)
            for url, (size, etag) in listed.items()
        }

    def want(self, names: Mapping[str, str]) -> None:
        """The URLs doors want now, each with the name to log it under; others are let go."""
        for url in list(self._wanted):
            if url not in names:
                self.retrier.discard(url)
        self._wanted = dict(names)

    # -- listing --------------------------------------------------------------------------------

    async def list_files(
        self, names: Mapping[str, str], on_progress: ProgressCallback | None = None
    ) -> dict[str, Listing]:
        """The file of every URL in *names* (URL -> name in logs), as a mount lists them.

        URLs never seen before are probed, and all of them waited for. URLs known from an
        earlier run (a cache entry, or the catalog) are confirmed with their origins too, but
        waited for at most ``--revalidate-wait``: the rest come from the cache, and are
        confirmed in the background (a changed one goes through `Door.swap`). A URL whose
        probe failed is an `HttpSourceError` (listed from the cache when it was known) and is
        probed again in the background (`Door.available` when it answers).
        """
        self.want(names)
        began = trio.current_time()
        urls = list(names)
        known = await trio.to_thread.run_sync(self._known_versions, urls)
        unknown = [url for url in urls if url not in known]
        results: dict[str, ProbeResult] = {}
        placed = False
        waiting = {"unknown": len(unknown), "known": len(known)}
        done = {"unknown": trio.Event(), "known": trio.Event()}
        for kind, count in waiting.items():
            if not count:
                done[kind].set()

        def on_result(url: str, result: ProbeResult) -> None:
            self._note_probe(url, result)
            if placed:
                self._revalidated(url, result)
                return
            results[url] = result
            kind = "known" if url in known else "unknown"
            waiting[kind] -= 1
            if not waiting[kind]:
                done[kind].set()

        # New URLs first: the caller waits for every one of them.
        self.spawn(self.prober.probe_many, [*unknown, *known], on_result)
        async with trio.open_nursery() as progress:
            progress.start_soon(self._report_progress, len(urls), on_progress)
            await done["unknown"].wait()
            with trio.move_on_at(began + self.options.revalidate_wait):
                await done["known"].wait()
            progress.cancel_scope.cancel()
        placed = True
        listing: dict[str, Listing] = {}
        for url in urls:
            result = results.get(url)
            if result is None:
                listing[url] = self._from_known(url, known[url])
            else:
                listing[url] = self._listing(url, result, known.get(url))
        confirming = len(known) - sum(1 for url in known if url in results)
        log.info(
            "%d URLs probed in %.1fs%s",
            len(urls),
            trio.current_time() - began,
            f"; {confirming} listed from the cache are being confirmed" if confirming else "",
        )
        self._log_suppressed_failures()
        self.spawn(self.save_catalog)
        return listing

    async def add_files(self, names: Mapping[str, str]) -> dict[str, Listing]:
        """The files of more URLs (a reload's new lines): each probed now, and waited for."""
        self._wanted.update(names)
        results: dict[str, ProbeResult] = {}

        def on_result(url: str, result: ProbeResult) -> None:
            self._note_probe(url, result)
            results[url] = result

        fresh = [url for url in names if url not in self._by_url]
        seeded = [url for url in fresh if url in self._seeds and self._catalog.get(url) is None]
        if seeded:
            known = await trio.to_thread.run_sync(self._known_versions, seeded)
            for url in seeded:
                self._from_known(url, known[url])
            self.revalidate_all(seeded, trio.CancelScope())
            fresh = [url for url in fresh if url not in self._by_url]
        await self.prober.probe_many(fresh, on_result)
        listing: dict[str, Listing] = {}
        for url in names:
            if url in results:
                listing[url] = self._listing(url, results[url], self._catalog_known(url))
            elif url in self._by_url:
                listing[url] = self._by_url[url]
        self._log_suppressed_failures()
        self.spawn(self.save_catalog)
        return listing

    async def get(self, url: str, name: str) -> CachedFile:
        """The file of one URL (for the library and the HTTP server): probed now if unknown,
        downloaded first if its server sends no length. Raises `HttpSourceError`."""
        cached = self._by_url.get(url)
        while cached is not None and cached in self._changing:
            await self._changing[cached].wait()  # being swapped: the new version comes
            cached = self._by_url.get(url)
        if cached is not None and not cached.retired:
            return cached
        self._wanted.setdefault(url, name)
        for _ in range(3):  # a file that changes while it is being listed: a few tries
            listing = (await self.add_files({url: self._wanted.get(url, name)})).get(url)
            if isinstance(listing, CachedFile):
                if not listing.retired:
                    return listing
                continue
            if isinstance(listing, HttpSourceError):
                self._wanted.pop(url, None)  # nobody holds it: no background re-probing
                self.retrier.discard(url)
                raise listing
            arrival = self._arrivals.setdefault(url, trio.Event())
            await arrival.wait()
            error = self._download_errors.pop(url, None)
            if error is not None:
                raise error
        raise RemoteChangedError(f"{name}: the file keeps changing at its origin")

    def revalidate_all(self, urls: Sequence[str], scope: trio.CancelScope) -> None:
        """Confirm *urls* with their origins in the background (a reload's unchanged lines)."""

        def on_result(url: str, result: ProbeResult) -> None:
            self._note_probe(url, result)
            self._revalidated(url, result)

        async def run() -> None:
            with scope:
                await self.prober.probe_many(urls, on_result)

        self.spawn(run)

    def _known_versions(self, urls: list[str]) -> dict[str, Known]:
        """What earlier runs stored of each URL (runs in a worker thread before the mount)."""
        known: dict[str, Known] = {}
        for url in urls:
            stored = None
            if self.store.has_entry(url):
                try:
                    stored = self.store.load_entry(url)
                except EntryUnavailableError as err:
                    log.error("%s; it is probed and served uncached until a remount", err)
                    continue
            record = self._catalog.get(url)
            if stored is not None:
                known[url] = Known(stored.meta.remote(), stored)
            elif record is not None:
                known[url] = Known(record.remote, None)
            elif url in self._seeds:
                known[url] = Known(self._seeds[url], None)
        return known

    def _catalog_known(self, url: str) -> Known | None:
        record = self._catalog.get(url)
        return None if record is None else Known(record.remote, None)

    async def _report_progress(self, total: int, on_progress: ProgressCallback | None) -> None:
        """Tell the waiting command (and, for big lists, the log) how far probing got."""
        last_log = trio.current_time()
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            done = self.prober.statistics().done
            if on_progress is not None:
                on_progress(done, total)
            if total >= 1000 and trio.current_time() - last_log >= PROGRESS_LOG_INTERVAL:
                last_log = trio.current_time()
                log.info("probed %d of %d URLs", done, total)

    def _name(self, url: str) -> str:
        return self._wanted.get(url) or url

    def _from_known(self, url: str, known: Known) -> CachedFile:
        """*url* as an earlier run knew it; its probe goes on in the background."""
        cached = self._by_url.get(url)
        if cached is not None:
            return cached
        name = self._name(url)
        if known.stored is not None:
            cached = self.store.attach_stored(url, name, known.stored)
        else:
            cached = self.store.new_entry(url, known.remote, name)
            if known.remote is self._seeds.get(url):
                self._provisional.add(url)
        record = self._catalog.get(url)
        if record is not None and record.remote.same_version(cached.remote):
            # Fresh for what is left of its lifetime since the origin last confirmed it.
            self.revalidator.confirm(cached, record.remote, at=record.validated_at)
        self._by_url[url] = cached
        return cached

    def _listing(self, url: str, result: ProbeResult, known: Known | None) -> Listing:
        """What a door lists for *url* after its probe answered *result*."""
        if isinstance(result, RemoteMeta):
            return self._attach_probed(url, result, known.stored if known else None)
        name = self._name(url)
        cached = self._by_url.get(url)
        if cached is None and known is not None:
            cached = self._from_known(url, known)
        self.retrier.add(url)
        if cached is None:
            self._log_failure(url, "%s: not shown until its URL answers: %s", name, result)
            return result
        self._log_failure(
            url, "%s: origin unreachable (%s); serving cached bytes only", name, result
        )
        return cached

    def _attach_probed(
        self, url: str, remote: RemoteMeta, stored: StoredEntry | None = None
    ) -> CachedFile | Pending:
        """The file of *url* as the probed version *remote* (downloaded first without a length)."""
        name = self._name(url)
        reused = self._by_url.get(url)
        if reused is not None and not reused.retired:
            self._confirm_or_change(reused, remote, "another version at reload")
            return reused
        if remote.size == UNKNOWN_SIZE:
            if stored is None:
                with contextlib.suppress(EntryUnavailableError):
                    stored = self.store.load_entry(url)
            if (
                stored is not None
                and stored.meta.complete
                and stored.meta.remote().same_version(remote)
            ):
                cached = self.store.attach_stored(url, name, stored)
                if cached.complete:
                    self._by_url[url] = cached
                    return cached
            log.info("%s: the server sends no length; listed once downloaded", name)
            self.spawn(self._download_unknown_size, url, remote)
            return PENDING
        cached = self._attach(url, remote, name, stored)
        self.revalidator.confirm(cached, remote)
        if not cached.remote.accepts_ranges:
            log.warning(
                "%s: the origin ignores Range requests: the first read downloads the whole"
                " file once",
                name,
            )
        self._by_url[url] = cached
        return cached

    def _attach(
        self, url: str, remote: RemoteMeta, name: str, stored: StoredEntry | None
    ) -> CachedFile:
        """The cache entry for *remote*; one that cannot be read now is left alone, uncached."""
        try:
            if stored is None:
                return self.store.attach(url, remote, name)
            return self.store.attach(url, remote, name, stored)
        except (EntryUnavailableError, safe_fs.UnsafePathError) as err:
            log.error("%s: %s; serving it uncached for now", name, err.strerror)
            return self.store.unusable_entry(url, remote, name, str(err.strerror))

    def _log_failure(self, url: str, message: str, *args: object) -> None:
        """Log a file that cannot be listed or confirmed; only the first few per origin."""
        origin = origin_of(url)
        count = self._failures_logged.get(origin, 0) + 1
        self._failures_logged[origin] = count
        if count <= LOGGED_FAILURES:
            log.warning(message, *args)
        else:
            log.debug(message, *args)

    def _log_suppressed_failures(self) -> None:
        for origin, count in self._failures_logged.items():
            if count > LOGGED_FAILURES:
                log.warning(
                    "... and %d more files of %s: see above",
                    count - LOGGED_FAILURES,
                    origin_name(origin),
                )
        self._failures_logged.clear()

    def _revalidated(self, url: str, result: ProbeResult) -> None:
        """A file listed from the cache was confirmed (or not) by its origin."""
        cached = self._by_url.get(url)
        if cached is None or cached.retired:
            return
        if isinstance(result, RemoteMeta):
            self._confirm_or_change(cached, result, "changed since it was cached")
            return
        origin = origin_of(url)
        if origin not in self._down_origins:
            self._down_origins.add(origin)
            log.warning(
                "%s: could not confirm it with its origin (%s); its files are served from the"
                " cache and confirmed once the origin answers",
                cached.name,
                result,
            )
        if not isinstance(result, PermanentError) or result.status not in (404, 410):
            self.retrier.add(url)

    def _confirm_or_change(self, cached: CachedFile, remote: RemoteMeta, why: str) -> None:
        """The origin answered *remote* for *cached*'s URL: the same version (confirmed), or
        another (swapped). A file listed from a seed takes what the probe adds (validators,
        type, Range support) when the size and any ETag agree."""
        url = cached.remote.url
        if url in self._provisional:
            self._provisional.discard(url)
            seed = cached.remote
            agrees = seed.size == remote.size and (
                seed.etag is None or remote.etag is None or seed.etag == remote.etag
            )
            if agrees:
                cached.adopt(remote)
                self.revalidator.confirm(cached, remote)
                return
        if not cached.remote.same_version(remote):
            self._remote_changed(cached, RemoteChangedError(why))
        else:
            self.revalidator.confirm(cached, remote)

    def _answered_again(self, url: str, remote: RemoteMeta) -> None:
        """A URL that had failed its probe answered: confirm it, or list it at last."""
        self._note_probe(url, remote)
        origin = origin_of(url)
        if origin in self._down_origins:
            self._down_origins.discard(origin)
            log.info("%s answers again", origin_name(origin))
        if url in self._by_url:
            self._revalidated(url, remote)
            return
        if url not in self._wanted:
            return
        log.info("%s is reachable now", self._name(url))
        listing = self._attach_probed(url, remote)
        if isinstance(listing, CachedFile):
            for door in self._doors:
                door.available(url, listing)

    async def _download_unknown_size(self, url: str, remote: RemoteMeta) -> None:
        """Fetch a file whose server announces no length, then hand it to the doors.

        One download per URL at a time: a second request for it waits for the first.
        """
        lock = self._downloads.setdefault(url, trio.Lock())
        arrival = self._arrivals.setdefault(url, trio.Event())
        try:
            async with lock:
                shared = self._by_url.get(url)
                if shared is not None and shared.complete and not shared.retired:
                    for door in self._doors:
                        door.available(url, shared)
                    return
                cached = await self._download_whole(url, remote)
            if cached is not None and url in self._wanted:
                for door in self._doors:
                    door.available(url, cached)
        finally:
            if self._arrivals.get(url) is arrival:
                del self._arrivals[url]
            arrival.set()

    async def _download_whole(self, url: str, remote: RemoteMeta) -> CachedFile | None:
        name = self._name(url)
        part = "download.part"
        key = self.store.key(url)

        def open_part() -> int:
            with self.store.opened_entry(key, create=True) as directory:
                return safe_fs.open_file(
                    part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, dir_fd=directory
                )

        try:
            fd = await trio.to_thread.run_sync(open_part)
        except OSError as err:
            log.error("%s: cannot store its download: %s", name, err.strerror or err)
            return None
        written = 0

        async def store(chunk: bytes) -> None:
            # In a worker thread, as every cache write: the event loop never waits for the disk.
            nonlocal written
            await trio.to_thread.run_sync(_pwrite_all, fd, chunk, written)
            written += len(chunk)

        async def attempt() -> int:
            nonlocal written
            written = 0
            await trio.to_thread.run_sync(os.ftruncate, fd, 0)
            return await self.source.fetch_whole(remote, store)

        try:
            size = await retry_until(
                attempt,
                deadline=trio.current_time() + self.options.read_deadline,
                describe=f"{name}: download",
                per_attempt_deadline=False,
            )
            await trio.to_thread.run_sync(os.fsync, fd)
        except (HttpSourceError, OSError) as err:
            log.error("%s: download failed (%s); trying again later", name, err)
            if isinstance(err, HttpSourceError):
                self._download_errors[url] = err
            self.retrier.add(url)
            return None
        finally:
            os.close(fd)
        if url not in self._wanted:
            return None  # nobody wants it any more; the next download starts afresh
        final = replace(remote, size=size)
        cached = await trio.to_thread.run_sync(self.store.adopt_download, url, final, part, name)
        self.revalidator.confirm(cached, final)
        self._by_url[url] = cached
        log.info("%s: downloaded (%d bytes); now listed", name, size)
        return cached

    # -- the catalog ----------------------------------------------------------------------------

    def _note_probe(self, url: str, result: ProbeResult) -> None:
        """Remember what an origin said of *url*, for the catalog (never of no-store files:
        nothing of them is kept)."""
        if not isinstance(result, RemoteMeta):
            return
        if result.freshness.no_store:
            if self._catalog.pop(url) is not None:
                self._catalog_dirty = True
            return
        if result.size == UNKNOWN_SIZE:
            return
        known = self._catalog.get(url)
        if known is not None and known.remote == result:
            result = known.remote  # the same answer: keep one copy
        self._catalog.set(url, CatalogRecord(result, time.time()))
        self._catalog_dirty = True

    async def _catalog_loop(self) -> None:
        while True:
            await trio.sleep(CATALOG_INTERVAL)
            await self.save_catalog()

    async def save_catalog(self) -> None:
        """Save what the origins said of the wanted URLs, if that changed (worker thread)."""
        if not self._catalog_dirty:
            return
        self._catalog_dirty = False
        records = self._catalog.records_for(self._wanted)
        try:
            await trio.to_thread.run_sync(self.store.save_catalog, records)
        except OSError as err:
            self._catalog_dirty = True
            log.warning("could not save the cache's catalog: %s", err.strerror or err)

    async def save(self) -> None:
        """Persist progress now: every dirty bitmap, and the catalog."""
        await save_all(self.files())
        await self.save_catalog()

    # -- remote changes -------------------------------------------------------------------------

    def _remote_changed(self, cached: CachedFile, err: RemoteChangedError) -> None:
        """The origin now serves another version: drop the old blocks, serve the new file."""
        if cached.retired or cached in self._changing:
            return
        if self._contradicted.get(cached, 0.0) > trio.current_time():
            return  # the origin contradicts itself about this file: not again so soon
        self._changing[cached] = trio.Event()
        log.warning(
            "%s: the remote file changed (%s); discarding its cached blocks; readers of the"
            " old version get EIO",
            cached.name,
            err,
        )
        self.spawn(self._replace_changed, cached)

    async def _changed_at_origin(self, cached: CachedFile, result: RemoteMeta) -> None:
        """A revalidation found another version: swap to it now (an opener may be waiting)."""
        if cached.retired or cached in self._changing:
            return
        self._changing[cached] = trio.Event()
        log.warning(
            "%s: the remote file changed (seen by a revalidation); discarding its cached"
            " blocks; readers of the old version get EIO",
            cached.name,
        )
        await self._replace_changed(cached, result)

    def changing(self, cached: CachedFile) -> bool:
        """True while *cached* is being swapped for a new version."""
        return cached in self._changing

    async def _replace_changed(self, cached: CachedFile, known: RemoteMeta | None = None) -> None:
        """Serve the origin's new version; handles of the old one keep failing, never mixing.

        Under `lock`: a door that listed this URL at another name meanwhile would open a
        second object on the entry directory that `store.replace` resets. Each door swaps
        its names in the same step as the registry (no await between), then forgets its
        caches of the old version; only then is "now serving" logged.
        """
        url = cached.remote.url
        serving: int | None = None
        try:
            async with self.lock:
                result = known or await self.prober.probe(url)
                self._note_probe(url, result)
                if isinstance(result, RemoteMeta) and cached.remote.same_version(result):
                    # A data answer said "changed", the probe says "the same": the origin
                    # contradicts itself. Keep what was verified; its downloads fail.
                    self._contradicted[cached] = trio.current_time() + CONTRADICTION_COOLDOWN
                    cached.stats.last_error = (
                        "the origin contradicts itself: its answers disagree on this file's"
                        " size or version"
                    )
                    log.error("%s: %s", cached.name, cached.stats.last_error)
                    return
                if isinstance(result, RemoteMeta) and result.size != UNKNOWN_SIZE:
                    replacement = await self.store.replace(cached, result)  # retires the old
                    self.revalidator.confirm(replacement, result)
                    # No await from here to the end of the swaps.
                    if self._by_url.get(url) is cached:
                        self._by_url[url] = replacement
                    for door in self._doors:
                        door.swap(cached, replacement)
                    serving = result.size
                else:
                    await cached.retire()
                    log.warning(
                        "%s: cannot probe the new version yet (%s); trying again",
                        cached.name,
                        result,
                    )
                    self.spawn(self._reprobe_retired, cached)
        finally:
            done = self._changing.pop(cached, None)
            if done is not None:
                done.set()
        for door in self._doors:
            await door.settle(cached)
        if serving is not None:
            # Only now: from here on every name shows the new version.
            log.info("%s: now serving the new version (%d bytes)", cached.name, serving)

    async def _reprobe_retired(self, cached: CachedFile) -> None:
        """Bring the new version of a retired file once its origin answers again."""
        url = cached.remote.url
        delay = 5.0
        while self._by_url.get(url) is cached and url in self._wanted:
            await trio.sleep(delay)
            result = await self.prober.probe(url)
            if isinstance(result, RemoteMeta) and result.size != UNKNOWN_SIZE:
                self._note_probe(url, result)
                async with self.lock:
                    if self._by_url.get(url) is not cached:
                        return
                    replacement = self.store.new_entry(url, result, cached.name)
                    self.revalidator.confirm(replacement, result)
                    self._by_url[url] = replacement
                    for door in self._doors:
                        door.swap(cached, replacement)
                for door in self._doors:
                    await door.settle(cached)
                log.info("%s: now serving the new version (%d bytes)", cached.name, result.size)
                return
            delay = min(delay * 2, 300.0)

    async def release(self, cached: CachedFile) -> None:
        """No door names *cached* any more: save and close it unless someone still uses it."""
        if self.in_use(cached):
            return
        url = cached.remote.url
        if self._by_url.get(url) is cached and url in self._wanted:
            return  # still current and wanted: another name may come for it
        try:
            await cached.save()
        except OSError as err:
            log.warning("%s: could not save its cache state: %s", cached.name, err)
        cached.close()
        if self._by_url.get(url) is cached:
            del self._by_url[url]

    def in_use(self, cached: CachedFile) -> bool:
        """True while *cached* has open handles, downloads, or a swap in progress."""
        return (
            self.handle_count(cached) > 0
            or (self._fetcher is not None and self._fetcher.downloading(cached))
            or cached in self._changing
        )

    # -- reading --------------------------------------------------------------------------------

    def open(
        self,
        cached: CachedFile,
        *,
        hints: bool = True,
        opener_pid: int = 0,
        kernel_retries: bool = False,
    ) -> Handle:
        """A handle to read *cached* (this version; it keeps failing once the origin changed).

        Open-time hints (`OpenHints`) fetch what most formats keep at their ends (zip, ISO,
        MP4 indexes at the tail, superblocks at the head) concurrently with the first read,
        or what libblkid probes when *opener_pid* is setting up a loop device, and start the
        format analysis of a known image. *opener_pid* 0: not a process of this machine's
        (the library, the HTTP server). *kernel_retries*: the handle is the kernel's, which
        reads a page again at once when a read failed; such a retry fails at once instead of
        waiting for a second deadline (`BlockFetcher.read`).
        """
        handle = Handle(cached, ReadStream(holds_failures=kernel_retries))
        self._handles[handle] = None
        if hints and self._hints is not None:
            handle.loop = self._hints.opened(cached, opener_pid)
        return handle

    def close(self, handle: Handle) -> None:
        self._handles.pop(handle, None)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the handle's file, short only at EOF."""
        cached = handle.file
        if not cached.meta.opened:
            cached.mark_opened()  # `--fill opened` completes the files programs read
        self.verifier.check_failed(cached)
        data = await self.fetcher.read(cached, offset, size, handle.stream)
        whole = handle.stream.from_start(offset, offset + len(data))
        await self.verifier.check_read(cached, offset, len(data), whole)
        return data

    def handle_count(self, cached: CachedFile) -> int:
        return sum(1 for handle in self._handles if handle.file is cached)

    def open_files(self) -> set[CachedFile]:
        """The files that have at least one open handle (the cache cap evicts them last)."""
        return {handle.file for handle in self._handles}

    async def ensure_fresh(self, cached: CachedFile) -> None:
        """Revalidate *cached* if it is stale, waiting up to ``--revalidate-wait``."""
        await self.revalidator.refresh(cached, self.options.revalidate_wait)

    def seen(self, cached: CachedFile) -> None:
        """A door showed *cached* (a stat, a listing): revalidate it soon if it is stale."""
        self.revalidator.in_background(cached)

    # -- completing and dropping files -------------------------------------------------------------

    async def list_directory(
        self,
        url: str,
        *,
        depth: int = 1,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        memo: ListingMemo | None = None,
    ) -> Walk:
        """Every file the directory *url* (ending in ``/``) lists, *depth* levels down.

        Listings are fetched with the directory's own headers (those of *url*, as set for it)
        and capped at `LISTING_LIMIT` bytes each; see `remotefs.listings.walk`. With *memo*
        (kept by the caller from one walk to the next) each listing is asked for
        conditionally, and one that did not change costs a 304.
        """
        fresh: ListingMemo = {}

        async def fetch(listing: str) -> tuple[int, str | None, bytes]:
            try:
                answer = await self.fetch_small(listing, url, ACCEPT, memo, fresh)
            except HttpSourceError as err:  # this directory fails; the walk goes on
                raise ListingError(str(err)) from None
            return answer.status, answer.content_type, answer.body

        found = await walk(url, fetch, depth=depth, include=include, exclude=exclude)
        if memo is not None:
            memo.clear()
            memo.update(fresh)
        return found

    async def fetch_small(
        self,
        url: str,
        key: str,
        accept: str,
        memo: ListingMemo | None = None,
        fresh: ListingMemo | None = None,
    ) -> ListingResponse:
        """GET a listing or a checksum file (at most `LISTING_LIMIT` bytes), with *key*'s
        headers; conditional when *memo* holds an earlier answer, which a 304 returns.
        Answers with validators go into *fresh* (or *memo*)."""
        before = memo.get(url) if memo is not None else None
        validators: dict[str, str] = {}
        if before is not None and before.etag:
            validators["If-None-Match"] = before.etag
        if before is not None and before.last_modified:
            validators["If-Modified-Since"] = before.last_modified
        answer = await self.source.fetch_listing(url, key, accept, LISTING_LIMIT, validators)
        if answer.status == 304 and before is not None:
            answer = before
        keep = fresh if fresh is not None else memo
        if keep is not None and answer.status == 200 and (answer.etag or answer.last_modified):
            keep[url] = answer
        return answer

    async def complete(
        self,
        file: CachedFile,
        progress: Callable[[int, int], None] | None = None,
        paused: Callable[[str | None], None] | None = None,
    ) -> None:
        """Download every missing block of *file* now (``remotefs prefetch``).

        A few chunks at a time, through the same single-flight path as reads (nothing is
        fetched twice), not paused by foreground reads, but waiting while the cache
        filesystem is at its free-space reserve (*paused* hears why, then None). *progress*
        hears (cached bytes, size) after each chunk. Raises the first download's error, or
        ValueError for a file the cache cannot hold.
        """
        if not file.cacheable:
            raise ValueError(f"{file.name}: not cached: {file.uncached_reason}")
        fetcher, reserve = self.fetcher, self.reserve
        chunk_blocks = max(1, PREFETCH_CHUNK // file.block_size)
        work = (
            (start, min(start + chunk_blocks, end))
            for first, end in sorted(gaps_largest_first(file.bitmap, file.nblocks))
            for start in range(first, end, chunk_blocks)
        )
        failures: list[BaseException] = []

        async def worker() -> None:
            for first, end in work:
                if failures:
                    return
                need = (end - first) * file.block_size
                if reserve is not None:
                    while not reserve.room_for(need):
                        if paused is not None:
                            paused(reserve.paused)
                        await reserve.wait_for_room(need)
                    if paused is not None:
                        paused(None)
                claim = contextlib.nullcontext(True) if reserve is None else reserve.claim(need)
                try:
                    with claim:
                        await fetcher.fill(file, first, end, pausable=False)
                except RangeNotSupportedError:
                    return  # the file is fetched as one stream below
                except (HttpSourceError, OSError, FileRetiredError) as err:
                    failures.append(err)
                    return
                if progress is not None:
                    progress(file.cached_bytes, file.size)

        async with trio.open_nursery() as nursery:
            for _ in range(PREFETCH_WORKERS):
                nursery.start_soon(worker)
        if failures:
            raise failures[0]
        # What other downloads were fetching meanwhile, or a server without Range.
        await fetcher.ensure(file, 0, file.nblocks)
        if progress is not None:
            progress(file.cached_bytes, file.size)

    def busy(self, cached: CachedFile) -> str | None:
        """Why *cached*'s blocks cannot be dropped now (open, downloading), or None."""
        handles = self.handle_count(cached)
        if handles:
            plural = "s" if handles > 1 else ""
            return f"{cached.name} is open ({handles} handle{plural}); close it first"
        if self._fetcher is not None and self._fetcher.downloading(cached):
            return f"{cached.name} is downloading; try again when it is done"
        return None

    async def drop(self, cached: CachedFile) -> int:
        """Drop every cached block of *cached* (the bitmap first, durably); the bytes dropped.

        The caller checked it is not `busy`. Background fill leaves it alone from then on.
        """
        cached.no_fill = True
        if self.budget is not None:
            return await self.budget.drop(cached)
        return await cached.evict()

    async def _drop_copy(self, cached: CachedFile) -> int:
        """Drop a copy whose digest did not match (the verifier fetches it again)."""
        if cached.retired:
            return 0
        if self.budget is not None:
            return await self.budget.drop(cached)
        return await cached.evict()

    async def _complete_now(self, cached: CachedFile) -> None:
        """The blocks a whole read still waits for (in flight, or skipped), as a read."""
        try:
            await self.fetcher.ensure(cached, 0, cached.nblocks)
        except (HttpSourceError, FileRetiredError) as err:
            raise ReadError(f"{cached.name}: {err}") from None

    async def _discard_pages(self, cached: CachedFile) -> None:
        """Every door forgets what it holds of *cached*'s bytes (the kernel's page cache)."""
        for door in self._doors:
            await door.discard_pages(cached)

    async def _refetch(self, cached: CachedFile) -> None:
        """Download *cached* again after a mismatch (its new copy is hashed as it arrives)."""
        try:
            await self.complete(cached)
        except (HttpSourceError, OSError, ValueError, FileRetiredError) as err:
            log.warning("%s: fetching it again failed: %s", cached.name, err)

    async def evict(self, cached: CachedFile) -> int:
        """`drop`, refused (ValueError) while *cached* is open or downloading."""
        reason = self.busy(cached)
        if reason is not None:
            raise ValueError(f"not evicted: {reason}")
        return await self.drop(cached)

    # -- statistics -----------------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """Figures of the engine's parts (no I/O, no await)."""
        figures: dict[str, Any] = {
            "probes": asdict(self.prober.statistics()),
            "descriptors": asdict(self.store.fds.statistics()),
            "revalidations": self.revalidator.requests,
            "verification": asdict(self.verifier.statistics()),
        }
        if self.reserve is not None:
            figures["reserve"] = asdict(self.reserve.statistics())
        return figures


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` all of *data* at *offset* (in a worker thread)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
