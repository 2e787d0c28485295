"""A daemon: the engine (`RemoteCache`) and its doors, over one namespace of its own.

The engine owns everything about URLs and bytes. The daemon owns the names: the tree of
paths built from urls.txt (`Tree`), reloads of that list, the control socket, signals and
systemd notification. Its doors show that tree: the FUSE mount (`fuse_door.FuseDoor`, only
when there is a mountpoint: a serve-only daemon never imports pyfuse3) and the HTTP server
(`remotefs.serve.app.HttpDoor`, with ``--serve``/``remotefs serve``), either or both, over
one engine and one cache. Order of a start:

1. take the cache directory's lock (a second daemon on it fails here, before anything else);
2. ask the engine for the files of every URL (`RemoteCache.list_files`: new URLs probed, known
   ones confirmed for up to ``--revalidate-wait``), and place each at its paths; a URL that
   does not answer yet is placed when the engine says it is `available`;
3. mount and/or listen, and only when the mountpoint answers a stat call and the server an
   HTTP request, `on_ready` (the foreground parent exits / systemd gets READY=1);
4. on unmount, SIGINT, SIGTERM or the control socket's ``stop``: stop serving; the engine
   saves every bitmap and the catalog; unmount; release the lock.

SIGHUP and the control socket's ``reload`` re-read urls.txt (`Daemon.reload`) without a
restart. Directory sources (a URL ending in ``/``) are listed into file entries
(`sources.DirectorySources`) before step 2, on every reload, and again every ``--list-ttl``
seconds (`Daemon.relist`): what a listing adds, removes or changes goes through the same
steps as an edit of urls.txt. When the engine swaps a file for the origin's new version, the
daemon gives every path of it a new inode (`swap`), makes the kernel forget the old one
(`settle`), and the HTTP door ends the responses that serve the old one (its own `swap`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from ..cache.cached_file import CachedFile
from ..cache.engine import PENDING, Listing, ProgressCallback, RemoteCache
from ..config.manifest import ManifestEntry, ManifestError, load_manifest
from ..config.options import MountOptions
from ..fuse.tree import FileNode, Removed, Tree
from ..redact import redact_url
from ..serve.listen import HttpSettings
from ..units import human_size
from .control import ControlServer
from .loop_monitor import LoopMonitor
from .notify import notify_enabled, sd_notify
from .sources import DirectorySources

if TYPE_CHECKING:
    from ..serve.app import HttpDoor
    from .fuse_door import FuseDoor

log = logging.getLogger(__name__)

#: How long the daemon waits for its own HTTP server to answer before it says it is ready.
HTTP_READY_TIMEOUT = 10.0


#: How often files removed by a reload are checked for their last handle (then closed).
REAP_INTERVAL = 1.0

#: A directory source whose listing failed is asked again after at most this long.
RELIST_FAILED = 30.0


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


def names_of(entries: Sequence[ManifestEntry]) -> dict[str, str]:
    """URL -> the path it is logged under (its first one)."""
    names: dict[str, str] = {}
    for entry in entries:
        names.setdefault(entry.url, "/".join(entry.path))
    return names


class Daemon:
    """One daemon's lifetime; `run` returns after a clean stop with all state saved.

    *mountpoint* None: no FUSE mount (a serve-only daemon); *http* None: no HTTP server.
    """

    def __init__(
        self,
        options: MountOptions,
        entries: Sequence[ManifestEntry],
        mountpoint: Path | None,
        fsname: str = "remotefs",
        urls_file: Path | None = None,
        http: HttpSettings | None = None,
    ) -> None:
        self.options = options
        #: urls.txt as read: file lines and directory sources.
        self.manifest = list(entries)
        #: The files served: file lines, and what the directory sources list (`_build_tree`).
        self.entries = [entry for entry in entries if entry.directory is None]
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.http = http
        #: The URL list `reload` reads again (absolute: the background daemon changes cwd).
        self.urls_file = urls_file
        self.engine = RemoteCache(options, {entry.url: entry.headers for entry in entries})
        self.sources = DirectorySources(self.engine)
        #: Held by a reload or a re-list from its listing to its last change of the tree.
        self._changes = trio.Lock()
        self.tree = Tree()
        #: The manifest being served, by path.
        self._wanted: dict[tuple[str, ...], ManifestEntry] = {e.path: e for e in self.entries}
        #: Entries not listed yet: their URL did not answer, or is being downloaded whole.
        self._missing: dict[tuple[str, ...], ManifestEntry] = {}
        self._missing_urls: dict[str, set[tuple[str, ...]]] = {}
        #: Directory entries a swap to a new version removed, until `settle` drops them.
        self._swapped: dict[CachedFile, list[Removed]] = {}
        #: Background confirmation of unchanged lines after a reload (a new reload cancels).
        self._revalidation: trio.CancelScope | None = None
        self._stopping_sent = False
        self._fuse: FuseDoor | None = None
        self._http: HttpDoor | None = None
        #: Set to stop a daemon without a mount (a mount stops when `FuseDoor.main` returns).
        self._stop = trio.Event()
        self.loop_monitor = LoopMonitor()

    @property
    def source_name(self) -> str:
        """What this daemon serves, as summaries name it: urls.txt, or the directory's URL."""
        if self.urls_file is not None:
            return str(self.urls_file)
        return ", ".join(redact_url(entry.url) for entry in self.manifest)

    @property
    def store(self) -> Any:
        return self.engine.store

    @property
    def addresses(self) -> list[str]:
        """Where the HTTP server listens (``http://127.0.0.1:8080``); empty without one."""
        return list(self._http.addresses) if self._http is not None else []

    def open_cache(self) -> None:
        """Take the cache lock (raises `CacheDirError`); done before forking the parent away."""
        self.engine.open_store()

    async def run(
        self, on_ready: Callable[[str], None], on_progress: ProgressCallback | None = None
    ) -> None:
        """Probe, mount and/or listen, serve until stopped, then save and unmount.

        *on_ready* hears a line for the user once every door answers: where the HTTP server
        listens, or "" for a mount alone.
        """
        fuse: FuseDoor | None = None
        try:
            async with self.engine as engine, trio.open_nursery() as nursery:
                engine.add_door(self)
                await self._build_tree(on_progress)
                if engine.budget is not None:
                    await engine.budget.trim()  # the cap may have been lowered since
                control = ControlServer(
                    self.tree,
                    engine,
                    self.options.cache_dir,
                    self.mountpoint,
                    self._invalidate,
                    self.reload if self._reloadable() else None,
                    extras=self.statistics,
                    listen=lambda: self.addresses,
                    stop=self.stop,
                )
                control_path = await nursery.start(control.serve)
                if self.http is not None:
                    await self._listen(nursery, control)
                if self.mountpoint is not None:
                    from .fuse_door import FuseDoor  # pyfuse3: only where a mount happens

                    fuse = FuseDoor(self.tree, engine, self.options, self.mountpoint, self.fsname)
                    fuse.mount(control_path)
                    self._fuse = fuse
                nursery.start_soon(self._watch_signals)
                # Started (SIGHUP caught) before anyone hears the daemon is ready.
                await nursery.start(self._watch_reload_signal)
                nursery.start_soon(self._reap_unlinked_loop)
                nursery.start_soon(self._relist_loop)
                nursery.start_soon(self._announce_ready, on_ready)
                if fuse is not None:
                    await fuse.main()
                    self._notify_stopping("unmounted; saving state")
                    log.info("unmounted; saving state")
                else:
                    await self._stop.wait()
                    log.info("stopping; saving state")
                nursery.cancel_scope.cancel()
        finally:
            if fuse is not None:
                fuse.close()
            self._notify_stopping("stopped")

    def stop(self, why: str = "asked to stop") -> None:
        """Begin a clean stop (a signal, or the control socket's ``stop``)."""
        self._notify_stopping(f"{why}; saving state")
        if self._fuse is not None and self._fuse.mounted:
            self._fuse.terminate()  # `main` returns: the same path as an unmount
        self._stop.set()

    async def _listen(self, nursery: trio.Nursery, control: ControlServer) -> None:
        """Start the HTTP door: bind (a failure is one line), then serve in *nursery*."""
        from ..serve import server  # hypercorn: only where a daemon serves HTTP
        from ..serve.app import HttpDoor

        settings = self.http
        assert settings is not None
        try:
            sockets = server.bind(settings.listen)
        except OSError as err:
            raise OSError(
                err.errno, err.strerror or str(err), f"cannot listen on {settings.listen}"
            ) from None
        connections = server.Connections()
        door = HttpDoor(
            self.tree,
            self.engine,
            token=settings.token,
            status=lambda every: control.status(every=every),
            pending=lambda path: path in self._missing,
            cut=connections.cut,
        )
        door.addresses = server.addresses(sockets)
        self.engine.add_door(door)
        self._http = door
        await nursery.start(
            server.serve, door, sockets, settings.listen, settings.limits, connections
        )

    def statistics(self) -> dict[str, Any]:
        """Figures of the daemon's parts for `remotefs status --json` (no I/O, no await)."""
        figures = {"loop": asdict(self.loop_monitor.statistics()), **self.engine.statistics()}
        if self.sources.any(self.manifest):
            figures["directories"] = [asdict(item) for item in self.sources.statistics()]
        if self._http is not None:
            figures["http"] = {"listen": self.addresses, **asdict(self._http.stats)}
        return figures

    def _invalidate(self, inode: int) -> None:
        """The kernel forgets an inode's pages (an eviction); nothing to do without a mount."""
        if self._fuse is not None:
            from .fuse_door import invalidate_inode

            invalidate_inode(inode)

    # -- building the tree ---------------------------------------------------------------------

    async def _build_tree(self, on_progress: ProgressCallback | None) -> None:
        """List the directory sources, then every URL, and place each at its paths."""
        began = trio.current_time()
        if self.sources.any(self.manifest):
            self.entries = await self.sources.expand(self.manifest)
            self._wanted = {entry.path: entry for entry in self.entries}
            self._check_listed()
            log.info(
                "%d files listed by %d directory sources in %.1fs",
                len(self.entries) - sum(1 for e in self.manifest if e.directory is None),
                sum(1 for e in self.manifest if e.directory is not None),
                trio.current_time() - began,
            )
        self._tell_engine(self.manifest, self.entries)
        listing = await self.engine.list_files(names_of(self.entries), on_progress)
        for entry in self.entries:
            self._place(entry, listing[entry.url])
        files, _ = self.tree.counts()
        log.info(
            "%d of %d URLs listed in %.1fs",
            files,
            len(self.entries),
            trio.current_time() - began,
        )

    def _check_listed(self) -> None:
        """A directory URL given instead of urls.txt that cannot be listed at all is the
        user's error, said on their terminal: an empty mount would only hide it. (In
        urls.txt a failing source waits for its server beside the other lines.)"""
        if self.urls_file is not None:
            return
        for source in self.sources.statistics():
            if source.listed_at is None:
                why = source.problems[0] if source.problems else f"{source.url}: no listing"
                raise OSError(f"cannot list the directory: {why}")

    def _place(self, entry: ManifestEntry, listing: Listing) -> None:
        """Show *entry* as the engine listed it, or wait for it (`available`)."""
        if isinstance(listing, CachedFile):
            self.tree.add_file(entry.path, listing)
            return
        self._missing[entry.path] = entry
        self._missing_urls.setdefault(entry.url, set()).add(entry.path)
        if listing is PENDING:
            return  # downloading whole: `available` brings it

    def _current(self, entry: ManifestEntry) -> bool:
        """True while *entry* is in the served manifest and its path is not listed yet."""
        return self._wanted.get(entry.path) is entry and self.tree.find(entry.path) is None

    def _drop_missing(self, path: tuple[str, ...]) -> None:
        entry = self._missing.pop(path, None)
        if entry is None:
            return
        paths = self._missing_urls.get(entry.url)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._missing_urls[entry.url]

    # -- what the engine tells this door ---------------------------------------------------------

    def available(self, url: str, cached: CachedFile) -> None:
        """A URL that did not answer (or was downloading) has a file now: list its paths."""
        for path in sorted(self._missing_urls.pop(url, ())):
            entry = self._missing.pop(path, None)
            if entry is not None and self._current(entry):
                self.tree.add_file(entry.path, cached)

    def swap(self, old: CachedFile, new: CachedFile) -> None:
        """Every path of *old* gets *new* under a new inode (no await: the kernel keeps page
        cache per inode, so one inode per version keeps a handle from mixing versions)."""
        removed = self._swapped.setdefault(old, [])
        for node in self.tree.nodes_of(old):
            swapped = self.tree.replace_file(node.inode, new)
            assert swapped is not None  # a linked node
            removed.append(swapped[1])

    async def settle(self, old: CachedFile) -> None:
        """The kernel forgets the entries and the pages of *old*'s inodes: their handles get
        EIO from now on, and lookups reach the new inodes."""
        gone = self._swapped.pop(old, [])
        if self._fuse is None:
            return
        await self._fuse.forget(gone)
        inodes = [inode for _, _, inode in gone]
        inodes += [node.inode for node in self.tree.nodes_of(old)]  # retired in place
        await self._fuse.invalidate(inodes)

    async def discard_pages(self, cached: CachedFile) -> None:
        """The kernel forgets the pages of *cached*'s inodes (its bytes did not verify)."""
        if self._fuse is not None:
            await self._fuse.invalidate([node.inode for node in self.tree.nodes_of(cached)])

    # -- reloading urls.txt -------------------------------------------------------------------

    def _reloadable(self) -> bool:
        """A daemon reloads its urls.txt, or re-lists the directory it was given."""
        return self.urls_file is not None or self.sources.any(self.manifest)

    def _tell_engine(
        self, manifest: Sequence[ManifestEntry], entries: Sequence[ManifestEntry]
    ) -> None:
        """Headers of every URL (directory sources' for their listings), digests of files,
        and what exact listings said of their files' sizes (`RemoteCache.seed`)."""
        self.engine.set_headers({e.url: e.headers for e in [*manifest, *entries]})
        self.engine.set_digests({e.url: e.digests for e in entries if e.digests})
        listed = self.sources.listed.values()
        self.engine.seed({f.url: (f.size, f.etag) for f in listed if f.size is not None})

    async def reload(self) -> ReloadSummary:
        """Read urls.txt again and make the namespace match it, without a remount.

        A broken file changes nothing and raises `ManifestError` (file:line). Directory
        sources are listed again. New and changed lines are probed (bounded, as at mount)
        before anything changes; the reload answers once they are listed (or failed their
        probes). Unchanged lines are confirmed with their origins in the background
        afterwards: a file that changed there is swapped as usual. Removed files leave the
        namespace at once; their open handles keep reading until closed.
        """
        manifest = self.manifest
        if self.urls_file is not None:
            try:
                manifest = await trio.to_thread.run_sync(load_manifest, self.urls_file)
            except ManifestError as err:
                log.error("reload failed, nothing changed: %s", err)
                raise
        summary = await self._change_to(manifest, confirm=True)
        log.info("reloaded %s", summary)
        return summary

    async def relist(self) -> ReloadSummary:
        """List the directory sources again (their lifetime ran out) and show what changed."""
        summary = await self._change_to(self.manifest, confirm=False)
        if summary.added or summary.removed or summary.changed:
            log.info("listed again: %s", summary)
        return summary

    async def _relist_loop(self) -> None:
        """Every ``--list-ttl`` seconds (sooner after a failed listing), `relist`."""
        while True:
            failing = any(item.problems for item in self.sources.statistics())
            ttl = self.options.list_ttl
            await trio.sleep(min(ttl, RELIST_FAILED) if failing else ttl)
            if not self.sources.any(self.manifest):
                continue
            try:
                await self.relist()
            except Exception:
                log.exception("listing the directory sources again failed; the mount goes on")

    async def _change_to(self, manifest: list[ManifestEntry], *, confirm: bool) -> ReloadSummary:
        """Make the namespace show *manifest* (directory sources listed now).

        *confirm*: unchanged files are confirmed with their origins in the background (a
        reload); a re-list leaves that to their own freshness.
        """
        async with self._changes:  # one reload or re-list at a time: the newest listing wins
            return await self._change_to_locked(manifest, confirm=confirm)

    async def _change_to_locked(
        self, manifest: list[ManifestEntry], *, confirm: bool
    ) -> ReloadSummary:
        entries = manifest
        if self.sources.any(manifest):
            entries = await self.sources.expand(manifest)
        engine = self.engine
        async with engine.lock:
            old = self._wanted
            names = names_of(entries)
            fresh = {
                e.url: names[e.url]
                for e in entries
                if e.path not in old or old[e.path].url != e.url
            }
            self._tell_engine(manifest, entries)
            engine.want(names)
            listing = await engine.add_files(fresh)
            # From here to the end of _apply nothing awaits: the namespace changes at once.
            self.manifest = manifest
            summary, gone, unchanged = self._apply(entries, listing)
            if confirm:
                if self._revalidation is not None:
                    self._revalidation.cancel()
                self._revalidation = trio.CancelScope()
                engine.revalidate_all(unchanged, self._revalidation)
            elif contradicted := self.sources.contradicted(unchanged, engine.file):
                # A re-list asks only about files whose listing says they changed.
                engine.revalidate_all(contradicted, trio.CancelScope())
            if self._fuse is not None:
                await self._fuse.forget(gone)
            return summary

    def _apply(
        self, entries: Sequence[ManifestEntry], listing: dict[str, Listing]
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
            self._drop_missing(path)
            unlinked = self.tree.unlink_file(path)
            if unlinked is not None:
                gone.append(unlinked)
                log.info("%s: removed from the mount", "/".join(path))
        # Directories left without files go now, before a new file may take their name;
        # the directories of new paths stay (a replaced file's directory keeps its inode).
        gone.extend(self.tree.prune(keep={p[:i] for p in new for i in range(1, len(p))}))
        # Unchanged lines keep their entry object.
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
            item = listing.get(entry.url)
            if item is None:  # listed at another path already: shares its entry
                item = self.engine.file(entry.url) or PENDING
            self._place(entry, item)
            if isinstance(self.tree.find(path), FileNode):
                added += path not in old
            else:
                pending += 1
        files, _ = self.tree.counts()
        urls = list(dict.fromkeys(unchanged))
        summary = ReloadSummary(
            self.source_name, added, len(removed), len(changed), pending, len(urls), files
        )
        return summary, gone, urls

    async def _reap_unlinked_loop(self) -> None:
        while True:
            await trio.sleep(REAP_INTERVAL)
            if self.tree.unlinked:
                async with self.engine.lock:
                    await self._reap_unlinked()

    async def _reap_unlinked(self) -> None:
        """Let the engine close the files of removed paths that nothing uses any more."""
        for inode, node in list(self.tree.unlinked.items()):
            cached = node.cached
            if self.tree.is_listed(cached):  # listed again (moved, or back): the old inode goes
                del self.tree.unlinked[inode]
                continue
            if self.engine.in_use(cached):
                continue
            del self.tree.unlinked[inode]
            if any(other.cached is cached for other in self.tree.unlinked.values()):
                continue  # another removed inode still holds it
            await self.engine.release(cached)

    async def _watch_reload_signal(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGHUP: reload urls.txt (errors are logged; the mount goes on as it was)."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                if not self._reloadable():
                    log.warning("got SIGHUP, but this daemon has no URL list file to reload")
                    continue
                log.info("got SIGHUP; reloading %s", self.source_name)
                try:
                    await self.reload()
                except ManifestError:
                    pass  # logged by reload
                except Exception:
                    log.exception("reload failed; the mount goes on as it was")

    async def _announce_ready(self, on_ready: Callable[[str], None]) -> None:
        """Call *on_ready* once every door answers: the kernel routes a stat of the
        mountpoint to us, and the HTTP server answers a request."""
        files, _ = self.tree.counts()
        said = ""
        if self._fuse is not None:
            await self._fuse.wait_answering()
            log.info("mounted %s (%d files)", self.mountpoint, files)
        if self._http is not None:
            await self._http_answers()
            addresses = " and ".join(self.addresses)
            log.info("serving %s (%d files)", addresses, files)
            status = f"{self.addresses[0]}/_remotefs/status"
            said = (
                f"serving {addresses} ({files} file{'' if files == 1 else 's'}; status: {status})"
            )
        sd_notify(f"READY=1\nSTATUS={self.status_line()}")
        on_ready(said)
        # From now on every stall is felt by readers (before, nothing was served).
        self.engine.spawn(self.loop_monitor.run)
        if notify_enabled():
            while True:
                await trio.sleep(self.options.status_interval)
                if not self._stopping_sent:
                    sd_notify(f"STATUS={self.status_line()}")

    async def _http_answers(self) -> None:
        """Wait until the HTTP server answers a request of its own health page."""
        assert self._http is not None and self.http is not None
        headers = {"Authorization": f"Bearer {self.http.token}"} if self.http.token else {}
        address = self.addresses[0]
        # A wildcard address is reached through loopback.
        address = address.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
        async with httpx.AsyncClient(trust_env=False, timeout=HTTP_READY_TIMEOUT) as client:
            answer = await client.get(f"{address}/_remotefs/health", headers=headers)
        if answer.status_code != 200:
            raise RuntimeError(f"the HTTP server answers its own request with {answer.status_code}")

    def status_line(self) -> str:
        """One line of progress for ``systemctl status``; cheap (no I/O, no await)."""
        files = self.engine.files()
        cached = sum(f.cached_bytes for f in files)
        total = sum(f.size for f in files)
        share = f" ({100 * cached // total}%)" if total else ""
        return (
            f"serving {len(files)} file{'' if len(files) == 1 else 's'};"
            f" cached {human_size(cached)} of {human_size(total)}"
            f"{share}; {human_size(self.engine.source.bytes_received)} from origins since mount"
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
                if self._fuse is not None:
                    log.info("got %s; unmounting", name)
                    self._notify_stopping(f"got {name}; saving state and unmounting")
                else:
                    log.info("got %s; stopping", name)
                self.stop(f"got {name}")
                return
