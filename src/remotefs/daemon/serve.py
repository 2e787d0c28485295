"""The daemon: wires configuration, HTTP source, block cache and FUSE ops into one mount.

Everything runs on one trio event loop: the FUSE request handlers, the downloads, the probes,
the checkpointer, the re-prober and the signal handler. Order of a mount:

1. take the cache directory's lock (a second daemon on it fails here, before mounting);
2. list what earlier runs cached (each entry's metadata, and the catalog of what every
   origin said last); probe every URL never seen before, and confirm the known ones with
   their origins for up to ``--revalidate-wait``; place each file in the tree (a known file
   not confirmed yet is listed from the cache and confirmed in the background);
3. mount, start serving, and only when the mountpoint answers a stat call `on_ready`
   (the foreground parent exits / systemd gets READY=1);
4. on unmount, SIGINT or SIGTERM: stop downloads, save every bitmap and the catalog,
   unmount, release the lock.

SIGHUP and the control socket's ``reload`` re-read urls.txt (`Daemon.reload`) without a remount.

One URL, one fault domain: every background task runs through `_spawn`, which logs an
unexpected exception and goes on, and every probe turns whatever happened into that URL's
result. Nothing one URL or one origin does can end the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..cache import safe_fs
from ..cache.budget import CacheBudget
from ..cache.cached_file import CachedFile
from ..cache.checkpoint import run_checkpointer, save_all
from ..cache.disk_space import FreeSpaceReserve
from ..cache.fd_cache import capacity_for, raise_nofile_limit
from ..cache.fetcher import BlockFetcher
from ..cache.filler import Filler
from ..cache.freshness import Revalidator
from ..cache.state_files import CatalogRecord
from ..cache.store import CacheStore, EntryUnavailableError, StoredEntry
from ..config.manifest import ManifestEntry, ManifestError, load_manifest
from ..config.options import MountOptions
from ..fuse.ops import RemoteFsOperations
from ..fuse.tree import FileNode, Removed, Tree
from ..http.errors import HttpSourceError, PermanentError, RemoteChangedError
from ..http.retry import retry_until
from ..http.source import UNKNOWN_SIZE, HttpSource, RemoteMeta
from ..redact import redact_url
from .control import ControlServer
from .loop_monitor import LoopMonitor
from .notify import notify_enabled, sd_notify
from .probe import MAX_PROBES, Prober, ProbeResult, ProbeRetrier, origin_name, origin_of

log = logging.getLogger(__name__)


def fuse_options(options: MountOptions, fsname: str = "remotefs") -> set[str]:
    """libfuse mount options: read-only, named, and with the kernel's permission checks.

    *fsname* is the mount's source in the mount table: the URL list's path, as an fstab line
    names it, so ``mount -a`` sees the line is mounted already. pyfuse3 passes options as
    ASCII and libfuse splits them at commas: other names fall back to ``remotefs``.
    """
    if not fsname.isascii() or not fsname.isprintable():
        fsname = "remotefs"
    escaped = fsname.replace("\\", "\\\\").replace(",", "\\,")
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={escaped}", "subtype=remotefs", "ro", "noatime"}
    if options.allow_other:
        opts.add("allow_other")
    return opts


def set_kernel_readahead(device: int, size: int) -> None:
    """Let the kernel send reads of up to *size* bytes (its FUSE default is 128 KiB).

    The kernel's readahead window for this mount is a sysfs knob of its backing device; only
    root may raise it. With 1 MiB, a sequential reader costs a quarter as many FUSE requests
    and round trips through this process. Failure is harmless: reads just stay smaller.
    """
    knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        knob.write_text(f"{size // 1024}\n")
    except OSError as err:
        log.debug("kernel readahead left at its default (%s: %s)", knob, err.strerror)


#: How often files removed by a reload are checked for their last handle (then closed).
REAP_INTERVAL = 1.0
#: How often the catalog is saved while it changes (it is saved at unmount too).
CATALOG_INTERVAL = 30.0
#: While probing, how often progress is reported (to the waiting command, and to the log).
PROGRESS_INTERVAL = 0.5
PROGRESS_LOG_INTERVAL = 5.0
#: Per origin, how many files that cannot be listed or confirmed are logged one by one.
LOGGED_FAILURES = 10
#: After the origin contradicted itself about a file (a probe says it did not change, a data
#: answer says it did), further change reports of that file are ignored for this long.
CONTRADICTION_COOLDOWN = 60.0

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ReloadSummary:
    """What one reload of urls.txt changed (the ``reload`` control answer)."""

    urls: str  # the file read
    added: int  # paths new in urls.txt, listed now
    removed: int  # paths no longer in it
    changed: int  # paths whose URL changed: the new URL is shown instead
    pending: int  # new paths not listed yet: their URL did not answer (retried)
    revalidating: int  # unchanged URLs being confirmed with their origins in the background
    files: int  # files listed after the reload

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        pending = f", {self.pending} not listed yet" if self.pending else ""
        return (
            f"{self.urls}: {self.added} added, {self.removed} removed, {self.changed} changed"
            f"{pending}; {self.files} files; {self.revalidating} being confirmed with their"
            " origins"
        )


@dataclass(frozen=True, slots=True)
class _Known:
    """What an earlier run knew of a URL: its stored entry, or only the catalog's record."""

    remote: RemoteMeta
    stored: StoredEntry | None


class Daemon:
    """One mount's lifetime; `run` returns after a clean unmount with all state saved."""

    def __init__(
        self,
        options: MountOptions,
        entries: Sequence[ManifestEntry],
        mountpoint: Path,
        fsname: str = "remotefs",
        urls_file: Path | None = None,
    ) -> None:
        self.options = options
        self.entries = entries
        self.mountpoint = mountpoint
        self.fsname = fsname
        #: The URL list `reload` reads again (absolute: the background daemon changes cwd).
        self.urls_file = urls_file
        #: The manifest being served, by path. Background tasks that place an entry check
        #: that it is still the current one (a reload may have removed or changed it).
        self._wanted: dict[tuple[str, ...], ManifestEntry] = {e.path: e for e in entries}
        #: Background tasks (re-probe, download of unknown size) of entries not listed yet.
        self._pending: dict[tuple[str, ...], trio.CancelScope] = {}
        #: Reloads, the closing of files they removed and the swaps to new versions of changed
        #: files run one at a time.
        self._reload_lock = trio.Lock()
        #: Downloads of files of unknown size, one per URL (`_download_unknown_size`).
        self._download_locks: dict[str, trio.Lock] = {}
        self._ops: RemoteFsOperations | None = None
        self._fetcher: BlockFetcher | None = None
        self._stopping_sent = False
        self.store = CacheStore(options.cache_dir, options.block_size)
        self.tree = Tree()
        self._source = HttpSource(options, {entry.url: entry.headers for entry in entries})
        self._prober = Prober(self._source, options)
        self._retrier = ProbeRetrier(self._prober, self._answered_again)
        #: Entries not listed because their URL did not answer (the retrier probes them).
        self._missing: dict[tuple[str, ...], ManifestEntry] = {}
        self._missing_urls: dict[str, set[tuple[str, ...]]] = {}
        #: Failures logged per origin (after `LOGGED_FAILURES`, only counted).
        self._failures_logged: dict[tuple[str, str, int | None], int] = {}
        #: Origins that did not answer lately (logged once, and again when they are back).
        self._down_origins: set[tuple[str, str, int | None]] = set()
        self._nursery: trio.Nursery | None = None
        #: The one current cache entry of each URL: listed, or held by open handles of a
        #: removed path. One object per URL, or two would fetch and save the same entry.
        self._by_url: dict[str, CachedFile] = {}
        self._changing: set[CachedFile] = set()
        #: Files whose origin contradicted itself, and until when their change reports wait.
        self._contradicted: dict[CachedFile, float] = {}
        #: What each URL's origin said last (saved as the cache's catalog).
        self._catalog: dict[str, CatalogRecord] = {}
        self._catalog_dirty = False
        #: Background confirmation of unchanged lines after a reload (a new reload cancels).
        self._revalidation: trio.CancelScope | None = None
        self.loop_monitor = LoopMonitor()
        self.reserve: FreeSpaceReserve | None = None
        self.revalidator = Revalidator(
            self._prober.probe,
            options,
            on_changed=self._changed_at_origin,
            on_confirmed=self._note_probe_of,
            origin_of=origin_of,
        )

    def open_cache(self) -> None:
        """Take the cache lock (raises `CacheDirError`); done before forking the parent away.

        The soft limit of open files is raised to the hard one first, and the cache keeps as
        many data files open as that leaves room for.
        """
        soft, _ = raise_nofile_limit()
        self.store.fds.capacity = capacity_for(
            soft, self.options.max_connections + MAX_PROBES + self.options.fill_connections
        )
        self.store.open()

    async def run(
        self, on_ready: Callable[[], None], on_progress: ProgressCallback | None = None
    ) -> None:
        """Probe, mount, serve until unmounted or signalled, then save and unmount."""
        mounted = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._retrier.run)
                await nursery.start(self.revalidator.run)
                budget = None
                if self.options.cache_max_size:
                    budget = CacheBudget(self.options.cache_max_size, self._cached_files)
                fetcher = BlockFetcher(
                    self._source,
                    self.options,
                    nursery,
                    on_remote_changed=self._remote_changed,
                    budget=budget,
                )
                self._fetcher = fetcher
                self.reserve = FreeSpaceReserve(
                    functools.partial(os.statvfs, self.options.cache_dir), self.options.min_free
                )
                await self._build_tree(on_progress)
                if budget is not None:
                    await budget.trim()  # the cap may have been lowered since the last mount
                ops = RemoteFsOperations(
                    self.tree,
                    fetcher,
                    self.options.block_size,
                    (self.options.prefetch_tail, self.options.prefetch_head),
                    revalidator=self.revalidator,
                    revalidate_wait=self.options.revalidate_wait,
                )
                if budget is not None:
                    budget.open_files = ops.open_files
                self._ops = ops
                control = ControlServer(
                    self.tree,
                    fetcher,
                    ops,
                    self.options.cache_dir,
                    self.mountpoint,
                    invalidate_inode,
                    self.reload if self.urls_file is not None else None,
                    extras=self.statistics,
                    reserve=self.reserve,
                    revalidator=self.revalidator,
                )
                ops.control_path = await nursery.start(control.serve)
                pyfuse3.init(ops, str(self.mountpoint), fuse_options(self.options, self.fsname))
                mounted = True
                nursery.start_soon(self._watch_signals)
                # Started (SIGHUP caught) before anyone hears the mount is ready.
                await nursery.start(self._watch_reload_signal)
                nursery.start_soon(self._reap_unlinked_loop)
                nursery.start_soon(
                    run_checkpointer, self._cached_files, self.options.checkpoint_interval
                )
                nursery.start_soon(self._catalog_loop)
                if self.options.fill != "none":
                    filler = Filler(
                        fetcher, self._listed_files, self.options, self.reserve, self.revalidator
                    )
                    nursery.start_soon(filler.run)
                nursery.start_soon(self._announce_ready, on_ready)
                await pyfuse3.main()
                self._notify_stopping("unmounted; saving state")
                log.info("unmounted; saving state")
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await save_all(self._cached_files())
                await self._save_catalog()
                await self._source.aclose()
                await self._prober.aclose()
            if mounted:
                pyfuse3.close(unmount=True)
            self.store.close()
            self._notify_stopping("stopped")

    def _listed_files(self) -> list[CachedFile]:
        """The cache entries of the files in the namespace (each once)."""
        return self.tree.cached_files()

    def _cached_files(self) -> list[CachedFile]:
        """Every open cache entry: listed files and removed ones still open (saved alike)."""
        return list(self._by_url.values())

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run *fn* in the background; an unexpected exception is logged, never fatal."""
        assert self._nursery is not None

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("background task %s failed", getattr(fn, "__name__", fn))

        self._nursery.start_soon(guarded)

    def statistics(self) -> dict[str, Any]:
        """Figures of the daemon's parts for `remotefs status --json` (no I/O, no await)."""
        return {
            "loop": asdict(self.loop_monitor.statistics()),
            "probes": asdict(self._prober.statistics()),
            "descriptors": asdict(self.store.fds.statistics()),
        }

    # -- building the tree ---------------------------------------------------------------------

    async def _build_tree(self, on_progress: ProgressCallback | None) -> None:
        """List every URL: probe the new ones, confirm the known ones (briefly), place all."""
        began = trio.current_time()
        urls = list(dict.fromkeys(entry.url for entry in self.entries))
        known = await trio.to_thread.run_sync(self._known_versions, urls)
        log.debug(
            "%d URLs, %d known from earlier runs (read in %.1fs)",
            len(urls),
            len(known),
            trio.current_time() - began,
        )
        unknown = [url for url in urls if url not in known]
        results: dict[str, ProbeResult] = {}
        placed = False
        waiting_unknown = len(unknown)
        waiting_known = len(known)
        unknown_done = trio.Event()
        known_done = trio.Event()
        for count, event in ((waiting_unknown, unknown_done), (waiting_known, known_done)):
            if not count:
                event.set()

        def on_result(url: str, result: ProbeResult) -> None:
            nonlocal waiting_unknown, waiting_known
            self._note_probe(url, result)
            if placed:
                self._revalidated(url, result)
                return
            results[url] = result
            if url in known:
                waiting_known -= 1
                if not waiting_known:
                    known_done.set()
            else:
                waiting_unknown -= 1
                if not waiting_unknown:
                    unknown_done.set()

        started = trio.current_time()
        assert self._nursery is not None
        # New URLs first: the mount waits for every one of them.
        self._spawn(self._prober.probe_many, [*unknown, *known], on_result)
        async with trio.open_nursery() as progress:
            progress.start_soon(self._report_progress, len(urls), on_progress)
            await unknown_done.wait()
            with trio.move_on_at(started + self.options.revalidate_wait):
                await known_done.wait()
            progress.cancel_scope.cancel()
        placed = True
        probed = trio.current_time()
        for entry in self.entries:
            result = results.get(entry.url)
            if result is None:
                self._list_known(entry, known[entry.url])
            else:
                self._add_entry(entry, result, known.get(entry.url))
        files, _ = self.tree.counts()
        confirming = len(known) - sum(1 for url in known if url in results)
        log.info(
            "%d of %d URLs listed in %.1fs (placing them took %.1fs)%s",
            files,
            len(self.entries),
            trio.current_time() - began,
            trio.current_time() - probed,
            f"; {confirming} listed from the cache are being confirmed" if confirming else "",
        )
        for origin, count in self._failures_logged.items():
            if count > LOGGED_FAILURES:
                log.warning(
                    "... and %d more files of %s: see above",
                    count - LOGGED_FAILURES,
                    origin_name(origin),
                )
        self._spawn(self._save_catalog)

    def _log_failure(self, url: str, message: str, *args: object) -> None:
        """Log a file that cannot be listed or confirmed; only the first few per origin."""
        origin = origin_of(url)
        count = self._failures_logged.get(origin, 0) + 1
        self._failures_logged[origin] = count
        if count <= LOGGED_FAILURES:
            log.warning(message, *args)
        else:
            log.debug(message, *args)

    def _known_versions(self, urls: list[str]) -> dict[str, _Known]:
        """What earlier runs stored of each URL (runs in a worker thread before the mount)."""
        self._catalog = self.store.load_catalog()
        known: dict[str, _Known] = {}
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
                known[url] = _Known(stored.meta.remote(), stored)
            elif record is not None:
                known[url] = _Known(record.remote, None)
        return known

    async def _report_progress(self, total: int, on_progress: ProgressCallback | None) -> None:
        """Tell the waiting command (and, for big lists, the log) how far probing got."""
        last_log = trio.current_time()
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            done = self._prober.statistics().done
            if on_progress is not None:
                on_progress(done, total)
            if total >= 1000 and trio.current_time() - last_log >= PROGRESS_LOG_INTERVAL:
                last_log = trio.current_time()
                log.info("probed %d of %d URLs", done, total)

    def _note_probe_of(self, cached: CachedFile, result: RemoteMeta) -> None:
        self._note_probe(cached.remote.url, result)

    def _note_probe(self, url: str, result: ProbeResult) -> None:
        """Remember what an origin said of *url*, for the catalog (never of no-store files:
        nothing of them is kept)."""
        if isinstance(result, RemoteMeta) and result.freshness.no_store:
            if self._catalog.pop(url, None) is not None:
                self._catalog_dirty = True
            return
        if isinstance(result, RemoteMeta) and result.size != UNKNOWN_SIZE:
            known = self._catalog.get(url)
            if known is not None and known.remote == result:
                result = known.remote  # the same answer: keep one copy
            self._catalog[url] = CatalogRecord(result, time.time())
            self._catalog_dirty = True

    def _list_known(self, entry: ManifestEntry, known: _Known) -> None:
        """List *entry* as an earlier run knew it; its probe goes on in the background."""
        name = "/".join(entry.path)
        cached = self._by_url.get(entry.url)
        if cached is None:
            if known.stored is not None:
                cached = self.store.attach_stored(entry.url, name, known.stored)
            else:
                cached = self.store.new_entry(entry.url, known.remote, name)
            record = self._catalog.get(entry.url)
            if record is not None and record.remote.same_version(cached.remote):
                # Fresh for what is left of its lifetime since the origin last confirmed it.
                self.revalidator.confirm(cached, record.remote, at=record.validated_at)
            self._by_url[entry.url] = cached
        self.tree.add_file(entry.path, cached)

    def _revalidated(self, url: str, result: ProbeResult) -> None:
        """A file listed from the cache was confirmed (or not) by its origin."""
        cached = self._by_url.get(url)
        if cached is None or cached.retired:
            return
        if isinstance(result, RemoteMeta):
            if not cached.remote.same_version(result):
                self._remote_changed(cached, RemoteChangedError("changed since it was cached"))
            else:
                self.revalidator.confirm(cached, result)
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
            self._retrier.add(url)

    def _answered_again(self, url: str, remote: RemoteMeta) -> None:
        """A URL that had failed its probe answered: list what waited, confirm what is listed."""
        self._note_probe(url, remote)
        origin = origin_of(url)
        if origin in self._down_origins:
            self._down_origins.discard(origin)
            log.info("%s answers again", origin_name(origin))
        for path in sorted(self._missing_urls.pop(url, ())):
            entry = self._missing.pop(path, None)
            if entry is not None and self._current(entry):
                log.info("%s is reachable now", "/".join(entry.path))
                self._place(entry, remote)
        if url in self._by_url:
            self._revalidated(url, remote)

    def _add_missing(self, entry: ManifestEntry) -> None:
        """Leave *entry* out until its URL answers (the retrier probes it)."""
        self._missing[entry.path] = entry
        self._missing_urls.setdefault(entry.url, set()).add(entry.path)
        self._retrier.add(entry.url)

    def _drop_missing(self, path: tuple[str, ...]) -> None:
        entry = self._missing.pop(path, None)
        if entry is None:
            return
        paths = self._missing_urls.get(entry.url)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._missing_urls[entry.url]
                if entry.url not in self._by_url:
                    self._retrier.discard(entry.url)

    def _add_entry(
        self, entry: ManifestEntry, result: ProbeResult, known: _Known | None = None
    ) -> None:
        """Show *entry* as probed; an unreachable URL is shown from the cache or re-probed."""
        if isinstance(result, RemoteMeta):
            self._place(entry, result, known.stored if known is not None else None)
            return
        name = "/".join(entry.path)
        cached = self._by_url.get(entry.url)
        if cached is None and known is not None:
            if known.stored is not None:
                cached = self.store.attach_stored(entry.url, name, known.stored)
            else:
                cached = self.store.new_entry(entry.url, known.remote, name)
            self._by_url[entry.url] = cached
        if cached is None:
            self._log_failure(entry.url, "%s: not shown until its URL answers: %s", name, result)
            self._add_missing(entry)
            return
        self._log_failure(
            entry.url, "%s: origin unreachable (%s); serving cached bytes only", name, result
        )
        self.tree.add_file(entry.path, cached)
        self._retrier.add(entry.url)

    def _spawn_pending(
        self, entry: ManifestEntry, fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        """Run a task that will place *entry* later; a reload that drops the entry cancels it."""
        scope = trio.CancelScope()
        self._pending[entry.path] = scope

        async def run() -> None:
            with scope:
                await fn(*args)
            if self._pending.get(entry.path) is scope:
                del self._pending[entry.path]

        self._spawn(run)

    def _current(self, entry: ManifestEntry) -> bool:
        """True while *entry* is in the served manifest and its path is not listed yet."""
        return self._wanted.get(entry.path) is entry and self.tree.find(entry.path) is None

    def _attach(
        self, url: str, remote: RemoteMeta, name: str, stored: StoredEntry | object | None
    ) -> CachedFile:
        """The cache entry for *remote*; one that cannot be read now is left alone, uncached."""
        try:
            if stored is None:
                return self.store.attach(url, remote, name)
            return self.store.attach(url, remote, name, stored)
        except EntryUnavailableError as err:
            log.error("%s: %s; serving it uncached for now", name, err.strerror)
            return self.store.unusable_entry(url, remote, name, str(err.strerror))
        except safe_fs.UnsafePathError as err:
            log.error("%s: %s; serving it uncached for now", name, err.strerror)
            return self.store.unusable_entry(url, remote, name, str(err.strerror))

    def _place(
        self, entry: ManifestEntry, remote: RemoteMeta, stored: StoredEntry | None = None
    ) -> None:
        """Show *entry* as the probed version *remote*; a file of unknown size is fetched first."""
        if not self._current(entry):
            return  # removed or replaced by a reload meanwhile
        name = "/".join(entry.path)
        reused = self._by_url.get(entry.url)
        if reused is not None and not reused.retired:
            self.tree.add_file(entry.path, reused)
            if not reused.remote.same_version(remote):
                self._remote_changed(reused, RemoteChangedError("another version at reload"))
            else:
                self.revalidator.confirm(reused, remote)
            return
        if remote.size == UNKNOWN_SIZE:
            if stored is None:
                with contextlib.suppress(EntryUnavailableError):
                    stored = self.store.load_entry(entry.url)
            if (
                stored is not None
                and stored.meta.complete
                and stored.meta.remote().same_version(remote)
            ):
                cached = self.store.attach_stored(entry.url, name, stored)
                if cached.complete:
                    self._by_url[entry.url] = cached
                    self.tree.add_file(entry.path, cached)
                    return
            log.info("%s: the server sends no length; listed once downloaded", name)
            self._spawn_pending(entry, self._download_unknown_size, entry, remote)
            return
        cached = self._attach(entry.url, remote, name, stored)
        self.revalidator.confirm(cached, remote)
        if not cached.remote.accepts_ranges:
            log.warning(
                "%s: the origin ignores Range requests: the first read downloads the whole"
                " file once",
                name,
            )
        self._by_url[entry.url] = cached
        self.tree.add_file(entry.path, cached)

    async def _download_unknown_size(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        """Fetch a file whose server announces no length, then list it (it is complete).

        One download per URL at a time: a URL listed at two paths shares one part file and
        one cache entry, so the second path waits and then lists what the first fetched.
        """
        lock = self._download_locks.setdefault(entry.url, trio.Lock())
        async with lock:
            shared = self._by_url.get(entry.url)
            if shared is not None and shared.complete and not shared.retired:
                if self._current(entry):
                    self.tree.add_file(entry.path, shared)
                return
            await self._download_whole(entry, remote)

    async def _download_whole(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        name = "/".join(entry.path)
        part = "download.part"
        key = self.store.key(entry.url)
        try:
            with self.store.opened_entry(key, create=True) as directory:
                fd = safe_fs.open_file(
                    part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, dir_fd=directory
                )
        except OSError as err:
            log.error("%s: cannot store its download: %s", name, err.strerror or err)
            return
        written = 0

        def store(chunk: bytes) -> None:
            nonlocal written
            os.pwrite(fd, chunk, written)
            written += len(chunk)

        async def attempt() -> int:
            nonlocal written
            written = 0
            os.ftruncate(fd, 0)
            return await self._source.fetch_whole(remote, store)

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
            self._add_missing(entry)
            return
        finally:
            os.close(fd)
        if not self._current(entry):
            return  # a reload removed it meanwhile; the next download starts afresh
        final = replace(remote, size=size)
        cached = self.store.adopt_download(entry.url, final, part, name)
        self.revalidator.confirm(cached, final)
        self._by_url[entry.url] = cached
        self.tree.add_file(entry.path, cached)
        log.info("%s: downloaded (%d bytes); now listed", name, size)

    # -- reloading urls.txt -------------------------------------------------------------------

    async def reload(self) -> ReloadSummary:
        """Read urls.txt again and make the namespace match it, without a remount.

        A broken file changes nothing and raises `ManifestError` (file:line). New and changed
        lines are probed (bounded, as at mount) before anything changes, and placed as at
        mount; the reload answers once they are listed (or failed their probes). Unchanged
        lines are confirmed with their origins in the background afterwards: a file that
        changed there goes through the remote-change path. Removed files leave the namespace
        at once; their open handles keep reading until closed.
        """
        assert self.urls_file is not None
        async with self._reload_lock:
            try:
                entries = await trio.to_thread.run_sync(load_manifest, self.urls_file)
            except ManifestError as err:
                log.error("reload failed, nothing changed: %s", err)
                raise
            old = self._wanted
            fresh = [
                e.url
                for e in entries
                if (e.path not in old or old[e.path].url != e.url) and e.url not in self._by_url
            ]
            results: dict[str, ProbeResult] = {}

            def on_result(url: str, result: ProbeResult) -> None:
                self._note_probe(url, result)
                results[url] = result

            self._source.set_headers({entry.url: entry.headers for entry in entries})
            await self._prober.probe_many(list(dict.fromkeys(fresh)), on_result)
            # From here to the end of _apply nothing awaits: the namespace changes at once.
            summary, gone, unchanged = self._apply(entries, results)
            log.info("reloaded %s", summary)
            if self._revalidation is not None:
                self._revalidation.cancel()
            self._revalidation = trio.CancelScope()
            self._spawn(self._revalidate, unchanged, self._revalidation)
            await trio.to_thread.run_sync(forget_entries, gone)
            self._spawn(self._save_catalog)
            return summary

    async def _revalidate(self, urls: list[str], scope: trio.CancelScope) -> None:
        """Confirm *urls* with their origins; a changed file is replaced as usual."""

        def on_result(url: str, result: ProbeResult) -> None:
            self._note_probe(url, result)
            self._revalidated(url, result)

        with scope:
            await self._prober.probe_many(urls, on_result)

    def _apply(
        self, entries: list[ManifestEntry], results: dict[str, ProbeResult]
    ) -> tuple[ReloadSummary, list[Removed], list[str]]:
        """Change the namespace to *entries* (synchronously).

        Returns the summary, the entries that disappeared, and the URLs of unchanged lines.
        """
        new = {entry.path: entry for entry in entries}
        old = self._wanted
        removed = [path for path in old if path not in new]
        changed = [path for path in new if path in old and old[path].url != new[path].url]
        gone: list[Removed] = []
        for path in removed + changed:
            scope = self._pending.pop(path, None)
            if scope is not None:
                scope.cancel()
            self._drop_missing(path)
            unlinked = self.tree.unlink_file(path)
            if unlinked is not None:
                gone.append(unlinked)
                log.info("%s: removed from the mount", "/".join(path))
        # Directories left without files go now, before a new file may take their name;
        # the directories of new paths stay (a replaced file's directory keeps its inode).
        gone.extend(self.tree.prune(keep={p[:i] for p in new for i in range(1, len(p))}))
        # Unchanged lines keep their entry object: their pending tasks stay valid.
        self._wanted = {
            path: old[path] if path in old and old[path].url == entry.url else entry
            for path, entry in new.items()
        }
        self.entries = list(self._wanted.values())  # what is served now; the old list goes
        added = pending = 0
        unchanged: list[str] = []
        for path, entry in self._wanted.items():
            if entry is old.get(path):
                if path not in self._missing:
                    unchanged.append(entry.url)
                continue
            result = results.get(entry.url)
            if result is None:  # listed at another path already: shares its entry
                cached = self._by_url.get(entry.url)
                if cached is None:
                    continue
                self.tree.add_file(entry.path, cached)
            else:
                self._add_entry(entry, result, self._catalog_known(entry.url))
            if isinstance(self.tree.find(path), FileNode):
                added += path not in old
            else:
                pending += 1
        files, _ = self.tree.counts()
        summary = ReloadSummary(
            str(self.urls_file),
            added,
            len(removed),
            len(changed),
            pending,
            len(dict.fromkeys(unchanged)),
            files,
        )
        return summary, gone, list(dict.fromkeys(unchanged))

    def _catalog_known(self, url: str) -> _Known | None:
        record = self._catalog.get(url)
        return None if record is None else _Known(record.remote, None)

    async def _reap_unlinked_loop(self) -> None:
        while True:
            await trio.sleep(REAP_INTERVAL)
            if self.tree.unlinked:
                async with self._reload_lock:
                    await self._reap_unlinked()

    async def _reap_unlinked(self) -> None:
        """Save and close the cache entries of removed files that nothing uses any more."""
        assert self._ops is not None and self._fetcher is not None
        for inode, node in list(self.tree.unlinked.items()):
            cached = node.cached
            if self.tree.is_listed(cached):  # listed again (moved, or back): the old inode goes
                del self.tree.unlinked[inode]
                continue
            if (
                self._ops.open_handles(cached)
                or self._fetcher.downloading(cached)
                or cached in self._changing
            ):
                continue
            del self.tree.unlinked[inode]
            if any(other.cached is cached for other in self.tree.unlinked.values()):
                continue  # another removed inode still holds it
            try:
                await cached.save()
            except OSError as err:
                log.warning("%s: could not save its cache state: %s", cached.name, err)
            cached.close()
            if self._by_url.get(cached.remote.url) is cached and not self.tree.is_listed(cached):
                del self._by_url[cached.remote.url]

    async def _watch_reload_signal(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGHUP: reload urls.txt (errors are logged; the mount goes on as it was)."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                if self.urls_file is None:
                    log.warning("got SIGHUP, but this daemon has no URL list file to reload")
                    continue
                log.info("got SIGHUP; reloading %s", self.urls_file)
                try:
                    await self.reload()
                except ManifestError:
                    pass  # logged by reload
                except Exception:
                    log.exception("reload failed; the mount goes on as it was")

    # -- the catalog ----------------------------------------------------------------------------

    async def _catalog_loop(self) -> None:
        while True:
            await trio.sleep(CATALOG_INTERVAL)
            await self._save_catalog()

    async def _save_catalog(self) -> None:
        """Save what the origins said of the listed URLs, if that changed (worker thread)."""
        if not self._catalog_dirty:
            return
        self._catalog_dirty = False
        wanted = {entry.url for entry in self._wanted.values()}
        records = [record for url, record in self._catalog.items() if url in wanted]
        try:
            await trio.to_thread.run_sync(self.store.save_catalog, records)
        except OSError as err:
            self._catalog_dirty = True
            log.warning("could not save the cache's catalog: %s", err.strerror or err)

    # -- remote changes -----------------------------------------------------------------------

    def _remote_changed(self, cached: CachedFile, err: RemoteChangedError) -> None:
        """The origin now serves another version: drop the old blocks, show the new file."""
        if cached.retired or cached in self._changing:
            return
        if self._contradicted.get(cached, 0.0) > trio.current_time():
            return  # the origin contradicts itself about this file: not again so soon
        self._changing.add(cached)
        log.warning(
            "%s: the remote file changed (%s); discarding its cached blocks; readers of the"
            " old version get EIO",
            cached.name,
            err,
        )
        self._spawn(self._replace_changed, cached)

    async def _changed_at_origin(self, cached: CachedFile, result: RemoteMeta) -> None:
        """A revalidation found another version: swap to it now (the opener may be waiting)."""
        if cached.retired or cached in self._changing:
            return
        self._changing.add(cached)
        log.warning(
            "%s: the remote file changed (seen by a revalidation); discarding its cached"
            " blocks; readers of the old version get EIO",
            cached.name,
        )
        await self._replace_changed(cached, result)

    async def _replace_changed(self, cached: CachedFile, known: RemoteMeta | None = None) -> None:
        """Serve the origin's new version under new inodes; old handles keep the old ones.

        The kernel's page cache is per inode and shared by every handle, so one inode per
        version is what keeps a handle from mixing pages of two versions. The reload lock is
        held throughout: a reload that listed this URL at another path meanwhile would open
        a second object on the entry directory that `store.replace` resets.
        """
        serving: int | None = None
        gone: list[Removed] = []
        old_inodes: list[int] = []
        try:
            async with self._reload_lock:
                result = known or await self._prober.probe(cached.remote.url)
                self._note_probe(cached.remote.url, result)
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
                    # Every path that lists this URL, found after the last await.
                    for node in self.tree.nodes_of(cached):
                        swapped = self.tree.replace_file(node.inode, replacement)
                        assert swapped is not None  # a linked node
                        gone.append(swapped[1])
                        old_inodes.append(node.inode)
                    if gone or self._by_url.get(cached.remote.url) is cached:
                        self._by_url[cached.remote.url] = replacement
                    if not gone:
                        replacement.close()  # a reload took its paths away meanwhile
                    serving = result.size
                else:
                    await cached.retire()
                    old_inodes = [n.inode for n in self.tree.nodes_of(cached)]
                    log.warning(
                        "%s: cannot probe the new version yet (%s); trying again",
                        cached.name,
                        result,
                    )
                    self._spawn(self._reprobe_retired, cached)
        finally:
            self._changing.discard(cached)
        # The kernel's entries for the old inodes go, so a lookup reaches the new ones...
        await trio.to_thread.run_sync(forget_entries, gone)
        for inode in old_inodes:
            # ... and the old inodes' pages and attributes: their handles get EIO from now on.
            await trio.to_thread.run_sync(invalidate_inode, inode)
        if serving is not None:
            # Only now: from here on every lookup, stat and open sees the new version.
            log.info("%s: now serving the new version (%d bytes)", cached.name, serving)

    async def _reprobe_retired(self, cached: CachedFile) -> None:
        """Bring the new version of a retired file once its origin answers again."""
        delay = 5.0
        while self.tree.is_listed(cached):
            await trio.sleep(delay)
            result = await self._prober.probe(cached.remote.url)
            if isinstance(result, RemoteMeta) and result.size != UNKNOWN_SIZE:
                self._note_probe(cached.remote.url, result)
                async with self._reload_lock:
                    replacement = self.store.new_entry(result.url, result, cached.name)
                    self.revalidator.confirm(replacement, result)
                    gone = []
                    for node in self.tree.nodes_of(cached):
                        swapped = self.tree.replace_file(node.inode, replacement)
                        assert swapped is not None
                        gone.append(swapped[1])
                    if not gone:
                        return
                    self._by_url[cached.remote.url] = replacement
                await trio.to_thread.run_sync(forget_entries, gone)
                log.info("%s: now serving the new version (%d bytes)", cached.name, result.size)
                return
            delay = min(delay * 2, 300.0)

    async def _announce_ready(self, on_ready: Callable[[], None]) -> None:
        """Call *on_ready* once the kernel routes a stat of the mountpoint to us."""
        info = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        set_kernel_readahead(info.st_dev, self.options.kernel_readahead)
        files, _ = self.tree.counts()
        log.info("mounted %s (%d files)", self.mountpoint, files)
        sd_notify(f"READY=1\nSTATUS={self.status_line()}")
        on_ready()
        # From now on every stall is felt by readers (before, the mount was not up).
        assert self._nursery is not None
        self._nursery.start_soon(self.loop_monitor.run)
        if notify_enabled():
            while True:
                await trio.sleep(self.options.status_interval)
                if not self._stopping_sent:
                    sd_notify(f"STATUS={self.status_line()}")

    def status_line(self) -> str:
        """One line of progress for ``systemctl status``; cheap (no I/O, no await)."""
        files = self._cached_files()
        cached = sum(f.cached_bytes for f in files)
        total = sum(f.size for f in files)
        share = f" ({100 * cached // total}%)" if total else ""
        return (
            f"serving {len(files)} file{'' if len(files) == 1 else 's'};"
            f" cached {human_size(cached)} of {human_size(total)}"
            f"{share}; {human_size(self._source.bytes_received)} from origins since mount"
        )

    def _notify_stopping(self, status: str) -> None:
        """Tell systemd once, as soon as shutdown begins, that the daemon is stopping."""
        if not self._stopping_sent:
            self._stopping_sent = True
            sd_notify(f"STOPPING=1\nSTATUS={status}")

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                log.info("got %s; unmounting", name)
                self._notify_stopping(f"got {name}; saving state and unmounting")
                pyfuse3.terminate()
                return


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def invalidate_inode(inode: int) -> None:
    """Ask the kernel to forget an inode's cached data and attributes (runs in a thread)."""
    try:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(inode), attr_only=False)
    except OSError as err:
        if err.errno != errno.ENOENT:  # the kernel had nothing cached for it
            log.warning("could not invalidate inode %d: %s", inode, err)


def forget_entries(entries: Sequence[Removed]) -> None:
    """Make the kernel drop directory entries that a reload removed (runs in a thread).

    `pyfuse3.invalidate_entry` may block until requests on those entries are answered, so it
    must not run on the trio thread. Entries come deepest first: the kernel refuses to delete
    a directory entry while it still caches children under it.
    """
    for parent, name, inode in entries:
        try:
            pyfuse3.invalidate_entry(
                pyfuse3.InodeT(parent), pyfuse3.FileNameT(os.fsencode(name)), pyfuse3.InodeT(inode)
            )
        except OSError as err:
            if err.errno != errno.ENOENT:  # ENOENT: the kernel had not cached it
                log.warning("could not invalidate %r in directory inode %d: %s", name, parent, err)


__all__ = ["Daemon", "ReloadSummary", "redact_url"]
