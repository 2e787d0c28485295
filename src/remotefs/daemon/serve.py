"""The daemon: wires configuration, HTTP source, block cache and FUSE ops into one mount.

Everything runs on one trio event loop: the FUSE request handlers, the downloads, the
checkpointer, the re-prober and the signal handler. Order of a mount:

1. take the cache directory's lock (a second daemon on it fails here, before mounting);
2. probe every URL (bounded), attach each to its cache entry (discarding changed ones);
3. mount, start serving, and only when the mountpoint answers a stat call `on_ready`
   (the foreground parent exits / systemd gets READY=1);
4. on unmount, SIGINT or SIGTERM: stop downloads, save every bitmap, unmount, release the lock.

SIGHUP and the control socket's ``reload`` re-read urls.txt (`Daemon.reload`) without a remount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..cache.budget import CacheBudget
from ..cache.cached_file import CachedFile
from ..cache.checkpoint import run_checkpointer, save_all
from ..cache.fetcher import BlockFetcher
from ..cache.filler import Filler
from ..cache.store import CacheStore
from ..config.manifest import ManifestEntry, ManifestError, load_manifest
from ..config.options import MountOptions
from ..fuse.ops import RemoteFsOperations
from ..fuse.tree import FileNode, Removed, Tree
from ..http.errors import HttpSourceError, RemoteChangedError
from ..http.retry import retry_until
from ..http.source import UNKNOWN_SIZE, HttpSource, RemoteMeta
from .control import ControlServer
from .notify import notify_enabled, sd_notify
from .probe import ProbeResult, probe_all, probe_one, reprobe_until_found

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


@dataclass(frozen=True)
class ReloadSummary:
    """What one reload of urls.txt changed (the ``reload`` control answer)."""

    urls: str  # the file read
    added: int  # paths new in urls.txt
    removed: int  # paths no longer in it
    changed: int  # paths whose URL changed: the new URL is probed and shown instead
    updated: int  # unchanged lines whose origin now serves another version (being replaced)
    files: int  # files listed after the reload

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.urls}: {self.added} added, {self.removed} removed, {self.changed} changed,"
            f" {self.updated} updated at the origin; {self.files} files"
        )


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
        self._nursery: trio.Nursery | None = None
        self._changing: set[CachedFile] = set()

    def open_cache(self) -> None:
        """Take the cache lock (raises `CacheDirError`); done before forking the parent away."""
        self.store.open()

    async def run(self, on_ready: Callable[[], None]) -> None:
        """Probe, mount, serve until unmounted or signalled, then save and unmount."""
        mounted = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
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
                await self._build_tree()
                if budget is not None:
                    await budget.trim()  # the cap may have been lowered since the last mount
                ops = RemoteFsOperations(
                    self.tree,
                    fetcher,
                    self.options.block_size,
                    (self.options.prefetch_tail, self.options.prefetch_head),
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
                if self.options.fill:
                    filler = Filler(fetcher, self._listed_files, self.options)
                    nursery.start_soon(filler.run)
                nursery.start_soon(self._announce_ready, on_ready)
                await pyfuse3.main()
                self._notify_stopping("unmounted; saving state")
                log.info("unmounted; saving state")
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await save_all(self._cached_files())
                await self._source.aclose()
            if mounted:
                pyfuse3.close(unmount=True)
            for cached in self._cached_files():
                cached.close()
            self.store.close()
            self._notify_stopping("stopped")

    def _listed_files(self) -> list[CachedFile]:
        """The cache entries of the files in the namespace (each once)."""
        return self.tree.cached_files()

    def _cached_files(self) -> list[CachedFile]:
        """Every open cache entry: listed files and removed ones still open (saved alike)."""
        listed = self._listed_files()
        seen = set(listed)
        extra = [n.cached for n in self.tree.unlinked.values() if n.cached not in seen]
        return listed + list(dict.fromkeys(extra))

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- building the tree ---------------------------------------------------------------------

    async def _build_tree(self) -> None:
        """Probe all URLs and place each one; unreachable ones are re-probed in the background."""
        results = await probe_all(self._source, self.entries, self.options)
        for entry in self.entries:
            self._add_entry(entry, results[entry.url])
        files, _ = self.tree.counts()
        log.info("%d of %d URLs ready", files, len(self.entries))

    def _add_entry(self, entry: ManifestEntry, result: ProbeResult) -> None:
        """Show *entry* as probed; an unreachable URL is shown from the cache or re-probed."""
        if isinstance(result, RemoteMeta):
            self._place(entry, result)
            return
        name = "/".join(entry.path)
        cached = self._reusable(entry.url, name) or self.store.attach(entry.url, None, name)
        if cached is None:
            log.warning("%s: not shown until its URL answers: %s", name, result)
            self._spawn_pending(
                entry, reprobe_until_found, self._source, entry, self.options, self._found
            )
        else:
            log.warning("%s: origin unreachable (%s); serving cached bytes only", name, result)
            self.tree.add_file(entry.path, cached)

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

    def _reusable(self, url: str, name: str) -> CachedFile | None:
        """The open cache entry of *url*, to list (again) under *name*; None if there is none.

        One URL has one `CachedFile`, however many paths list it and whether a reload moved
        it or brought it back before its last handle closed: a second object on the same
        entry directory would download its bytes again and overwrite the first one's bitmap.
        """
        listed = self._listed_files()
        for cached in listed:
            if cached.remote.url == url and not cached.retired:
                return cached  # listed at another path too: it keeps its name for the logs
        for node in self.tree.unlinked.values():
            cached = node.cached
            if cached.remote.url == url and not cached.retired:
                cached.name = name
                return cached
        return None

    def _place(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        """Show *entry* as the probed version *remote*; a file of unknown size is fetched first."""
        if not self._current(entry):
            return  # removed or replaced by a reload meanwhile
        name = "/".join(entry.path)
        reused = self._reusable(entry.url, name)
        if reused is not None:
            self.tree.add_file(entry.path, reused)
            if not reused.remote.same_version(remote):
                self._remote_changed(reused, RemoteChangedError("another version at reload"))
            return
        if remote.size == UNKNOWN_SIZE:
            stored = self.store.known_meta(entry.url)
            if stored is not None and stored.complete and stored.remote().same_version(remote):
                cached = self.store.attach(entry.url, None, name)
                if cached is not None and cached.complete:
                    self.tree.add_file(entry.path, cached)
                    return
            log.info("%s: the server sends no length; listed once downloaded", name)
            self._spawn_pending(entry, self._download_unknown_size, entry, remote)
            return
        cached = self.store.attach(entry.url, remote, name)
        assert cached is not None
        self.tree.add_file(entry.path, cached)

    async def _found(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        self._place(entry, remote)

    async def _download_unknown_size(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        """Fetch a file whose server announces no length, then list it (it is complete).

        One download per URL at a time: a URL listed at two paths shares one part file and
        one cache entry, so the second path waits and then lists what the first fetched.
        """
        lock = self._download_locks.setdefault(entry.url, trio.Lock())
        async with lock:
            shared = self._reusable(entry.url, "/".join(entry.path))
            if shared is not None and shared.complete:
                if self._current(entry):
                    self.tree.add_file(entry.path, shared)
                return
            await self._download_whole(entry, remote)

    async def _download_whole(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        name = "/".join(entry.path)
        directory = self.store.entry_dir(entry.url)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        part = directory / "download.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
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
            self._spawn_pending(
                entry, reprobe_until_found, self._source, entry, self.options, self._found
            )
            return
        finally:
            os.close(fd)
        if not self._current(entry):
            return  # a reload removed it meanwhile; the next download starts afresh
        final = replace(remote, size=size)
        self.tree.add_file(entry.path, self.store.adopt_download(entry.url, final, part, name))
        log.info("%s: downloaded (%d bytes); now listed", name, size)

    # -- reloading urls.txt -------------------------------------------------------------------

    async def reload(self) -> ReloadSummary:
        """Read urls.txt again and make the namespace match it, without a remount.

        A broken file changes nothing and raises `ManifestError` (file:line). Every URL is
        probed again (bounded by the pool, like at mount), before anything changes: new and
        changed paths are placed as at mount, and an unchanged line whose origin now serves
        another version goes through the remote-change path. Removed files leave the
        namespace at once; their open handles keep reading until closed.
        """
        assert self.urls_file is not None
        async with self._reload_lock:
            try:
                entries = await trio.to_thread.run_sync(load_manifest, self.urls_file)
            except ManifestError as err:
                log.error("reload failed, nothing changed: %s", err)
                raise
            results = await probe_all(self._source, entries, self.options)
            # From here to the end of _apply nothing awaits: the namespace changes at once.
            summary, gone = self._apply(entries, results)
            log.info("reloaded %s", summary)
            await trio.to_thread.run_sync(forget_entries, gone)
            return summary

    def _apply(
        self, entries: list[ManifestEntry], results: dict[str, ProbeResult]
    ) -> tuple[ReloadSummary, list[Removed]]:
        """Change the namespace to *entries* (synchronously); the entries that disappeared."""
        new = {entry.path: entry for entry in entries}
        old = self._wanted
        removed = [path for path in old if path not in new]
        changed = [path for path in new if path in old and old[path].url != new[path].url]
        gone: list[Removed] = []
        for path in removed + changed:
            scope = self._pending.pop(path, None)
            if scope is not None:
                scope.cancel()
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
        added = 0
        updated = 0
        for path, entry in self._wanted.items():
            result = results[entry.url]
            if entry is not old.get(path):
                added += path not in old
                self._add_entry(entry, result)
                continue
            node = self.tree.find(path)
            if (
                isinstance(node, FileNode)
                and isinstance(result, RemoteMeta)
                and result.size != UNKNOWN_SIZE
                and not node.cached.retired
                and not node.cached.remote.same_version(result)
            ):
                updated += 1
                self._remote_changed(node.cached, RemoteChangedError("changed, seen at reload"))
        files, _ = self.tree.counts()
        summary = ReloadSummary(
            str(self.urls_file), added, len(removed), len(changed), updated, files
        )
        return summary, gone

    async def _reap_unlinked_loop(self) -> None:
        while True:
            await trio.sleep(REAP_INTERVAL)
            if self.tree.unlinked:
                async with self._reload_lock:
                    await self._reap_unlinked()

    async def _reap_unlinked(self) -> None:
        """Save and close the cache entries of removed files that nothing uses any more."""
        assert self._ops is not None and self._fetcher is not None
        listed = set(self._listed_files())
        for inode, node in list(self.tree.unlinked.items()):
            cached = node.cached
            if cached in listed:  # listed again (moved, or back): only the old inode goes
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
                with contextlib.suppress(ManifestError):  # logged by reload
                    await self.reload()

    # -- remote changes -----------------------------------------------------------------------

    def _remote_changed(self, cached: CachedFile, err: RemoteChangedError) -> None:
        """The origin now serves another version: drop the old blocks, show the new file."""
        if cached.retired or cached in self._changing:
            return
        self._changing.add(cached)
        log.warning(
            "%s: the remote file changed (%s); discarding its cached blocks; readers of the"
            " old version get EIO",
            cached.name,
            err,
        )
        self._spawn(self._replace_changed, cached)

    async def _replace_changed(self, cached: CachedFile) -> None:
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
                result = await probe_one(
                    self._source, cached.remote.url, self.options.probe_timeout
                )
                if isinstance(result, RemoteMeta) and result.size != UNKNOWN_SIZE:
                    replacement = await self.store.replace(cached, result)  # retires the old
                    # Every path that lists this URL, found after the last await.
                    for node in [n for n in self.tree.files() if n.cached is cached]:
                        swapped = self.tree.replace_file(node.inode, replacement)
                        assert swapped is not None  # a linked node
                        gone.append(swapped[1])
                        old_inodes.append(node.inode)
                    if not gone:
                        replacement.close()  # a reload took its paths away meanwhile
                    serving = result.size
                else:
                    await cached.retire()
                    old_inodes = [n.inode for n in self.tree.files() if n.cached is cached]
                    log.warning("%s: cannot probe the new version yet: %s", cached.name, result)
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

    async def _announce_ready(self, on_ready: Callable[[], None]) -> None:
        """Call *on_ready* once the kernel routes a stat of the mountpoint to us."""
        info = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        set_kernel_readahead(info.st_dev, self.options.kernel_readahead)
        files, _ = self.tree.counts()
        log.info("mounted %s (%d files)", self.mountpoint, files)
        sd_notify(f"READY=1\nSTATUS={self.status_line()}")
        on_ready()
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
