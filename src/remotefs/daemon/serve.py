"""The daemon: wires configuration, HTTP source, block cache and FUSE ops into one mount.

Everything runs on one trio event loop: the FUSE request handlers, the downloads, the
checkpointer, the re-prober and the signal handler. Order of a mount:

1. take the cache directory's lock (a second daemon on it fails here, before mounting);
2. probe every URL (bounded), attach each to its cache entry (discarding changed ones);
3. mount, start serving, and only when the mountpoint answers a stat call `on_ready`
   (the foreground parent exits / systemd gets READY=1);
4. on unmount, SIGINT or SIGTERM: stop downloads, save every bitmap, unmount, release the lock.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pyfuse3
import trio

from ..cache.budget import CacheBudget
from ..cache.cached_file import CachedFile
from ..cache.checkpoint import run_checkpointer, save_all
from ..cache.fetcher import BlockFetcher
from ..cache.filler import Filler
from ..cache.store import CacheStore
from ..config.manifest import ManifestEntry
from ..config.options import MountOptions
from ..fuse.ops import RemoteFsOperations
from ..fuse.tree import Tree
from ..http.errors import HttpSourceError, RemoteChangedError
from ..http.retry import retry_until
from ..http.source import UNKNOWN_SIZE, HttpSource, RemoteMeta
from .control import ControlServer
from .notify import notify_enabled, sd_notify
from .probe import probe_all, probe_one, reprobe_until_found

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


class Daemon:
    """One mount's lifetime; `run` returns after a clean unmount with all state saved."""

    def __init__(
        self,
        options: MountOptions,
        entries: Sequence[ManifestEntry],
        mountpoint: Path,
        fsname: str = "remotefs",
    ) -> None:
        self.options = options
        self.entries = entries
        self.mountpoint = mountpoint
        self.fsname = fsname
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
                control = ControlServer(
                    self.tree,
                    fetcher,
                    ops,
                    self.options.cache_dir,
                    self.mountpoint,
                    invalidate_inode,
                )
                ops.control_path = await nursery.start(control.serve)
                pyfuse3.init(ops, str(self.mountpoint), fuse_options(self.options, self.fsname))
                mounted = True
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(
                    run_checkpointer, self._cached_files, self.options.checkpoint_interval
                )
                if self.options.fill:
                    filler = Filler(fetcher, self._cached_files, self.options)
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
            for node in self.tree.files():
                node.cached.close()
            self.store.close()
            self._notify_stopping("stopped")

    def _cached_files(self) -> list[CachedFile]:
        return [node.cached for node in self.tree.files()]

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- building the tree ---------------------------------------------------------------------

    async def _build_tree(self) -> None:
        """Probe all URLs and place each one; unreachable ones are re-probed in the background."""
        results = await probe_all(self._source, self.entries, self.options)
        for entry in self.entries:
            result = results[entry.url]
            if isinstance(result, RemoteMeta):
                self._place(entry, result)
                continue
            name = "/".join(entry.path)
            cached = self.store.attach(entry.url, None, name)
            if cached is None:
                log.warning("%s: not shown until its URL answers: %s", name, result)
                self._spawn(reprobe_until_found, self._source, entry, self.options, self._found)
            else:
                log.warning("%s: origin unreachable (%s); serving cached bytes only", name, result)
                self.tree.add_file(entry.path, cached)
        files, _ = self.tree.counts()
        log.info("%d of %d URLs ready", files, len(self.entries))

    def _place(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        """Show *entry* as the probed version *remote*; a file of unknown size is fetched first."""
        name = "/".join(entry.path)
        if remote.size == UNKNOWN_SIZE:
            stored = self.store.known_meta(entry.url)
            if stored is not None and stored.complete and stored.remote().same_version(remote):
                cached = self.store.attach(entry.url, None, name)
                if cached is not None and cached.complete:
                    self.tree.add_file(entry.path, cached)
                    return
            log.info("%s: the server sends no length; listed once downloaded", name)
            self._spawn(self._download_unknown_size, entry, remote)
            return
        cached = self.store.attach(entry.url, remote, name)
        assert cached is not None
        self.tree.add_file(entry.path, cached)

    async def _found(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        self._place(entry, remote)

    async def _download_unknown_size(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        """Fetch a file whose server announces no length, then list it (it is complete)."""
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
            self._spawn(reprobe_until_found, self._source, entry, self.options, self._found)
            return
        finally:
            os.close(fd)
        final = replace(remote, size=size)
        self.tree.add_file(entry.path, self.store.adopt_download(entry.url, final, part, name))
        log.info("%s: downloaded (%d bytes); now listed", name, size)

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
        node = next((n for n in self.tree.files() if n.cached is cached), None)
        try:
            result = await probe_one(self._source, cached.remote.url, self.options.probe_timeout)
            if isinstance(result, RemoteMeta) and result.size != UNKNOWN_SIZE:
                replacement = await self.store.replace(cached, result)
                if node is not None:
                    # The old version is retired now (its reads fail), so no page of it can
                    # enter the kernel's cache any more: drop the ones there *before* a new
                    # open can reach the new version, or it would mix old pages with new bytes.
                    await trio.to_thread.run_sync(invalidate_inode, node.inode)
                    node.cached = replacement
                log.info("%s: now serving the new version (%d bytes)", cached.name, result.size)
            else:
                await cached.retire()
                log.warning("%s: cannot probe the new version yet: %s", cached.name, result)
        finally:
            self._changing.discard(cached)
        if node is not None:
            # Drop the kernel's cached pages and attributes (the size may have changed).
            await trio.to_thread.run_sync(invalidate_inode, node.inode)

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
