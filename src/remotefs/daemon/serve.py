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

import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import pyfuse3
import trio

from ..cache.cached_file import CachedFile
from ..cache.checkpoint import run_checkpointer, save_all
from ..cache.fetcher import BlockFetcher
from ..cache.store import CacheStore
from ..config.manifest import ManifestEntry
from ..config.options import MountOptions
from ..fuse.ops import RemoteFsOperations
from ..fuse.tree import Tree
from ..http.source import HttpSource, RemoteMeta
from .notify import sd_notify
from .probe import probe_all, reprobe_until_found

log = logging.getLogger(__name__)


def fuse_options(options: MountOptions) -> set[str]:
    """libfuse mount options: read-only, named, and with the kernel's permission checks."""
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=remotefs", "subtype=remotefs", "ro", "noatime"}
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
        self, options: MountOptions, entries: Sequence[ManifestEntry], mountpoint: Path
    ) -> None:
        self.options = options
        self.entries = entries
        self.mountpoint = mountpoint
        self.store = CacheStore(options.cache_dir, options.block_size)
        self.tree = Tree()

    def open_cache(self) -> None:
        """Take the cache lock (raises `CacheDirError`); done before forking the parent away."""
        self.store.open()

    async def run(self, on_ready: Callable[[], None]) -> None:
        """Probe, mount, serve until unmounted or signalled, then save and unmount."""
        source = HttpSource(self.options)
        mounted = False
        try:
            async with trio.open_nursery() as nursery:
                fetcher = BlockFetcher(source, self.options, nursery)
                missing = await self._build_tree(source)
                ops = RemoteFsOperations(self.tree, fetcher, self.options.block_size)
                pyfuse3.init(ops, str(self.mountpoint), fuse_options(self.options))
                mounted = True
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(
                    run_checkpointer, self._cached_files, self.options.checkpoint_interval
                )
                for entry in missing:
                    nursery.start_soon(reprobe_until_found, source, entry, self.options, self._add)
                nursery.start_soon(self._announce_ready, on_ready)
                await pyfuse3.main()
                log.info("unmounted; saving state")
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await save_all(self._cached_files())
                await source.aclose()
            if mounted:
                pyfuse3.close(unmount=True)
            for node in self.tree.files():
                node.cached.close()
            self.store.close()
            sd_notify("STOPPING=1")

    def _cached_files(self) -> list[CachedFile]:
        return [node.cached for node in self.tree.files()]

    async def _build_tree(self, source: HttpSource) -> list[ManifestEntry]:
        """Probe all URLs and add every usable one; return the entries to re-probe later."""
        results = await probe_all(source, self.entries, self.options)
        missing = []
        for entry in self.entries:
            result = results[entry.url]
            name = "/".join(entry.path)
            remote = result if isinstance(result, RemoteMeta) else None
            cached = self.store.attach(entry.url, remote, name)
            if cached is None:
                log.warning("%s: not shown until its URL answers: %s", name, result)
                missing.append(entry)
                continue
            if remote is None:
                log.warning("%s: origin unreachable (%s); serving cached bytes only", name, result)
            self.tree.add_file(entry.path, cached)
        files, _ = self.tree.counts()
        log.info("%d of %d URLs ready", files, len(self.entries))
        return missing

    async def _add(self, entry: ManifestEntry, remote: RemoteMeta) -> None:
        cached = self.store.attach(entry.url, remote, "/".join(entry.path))
        if cached is not None:
            self.tree.add_file(entry.path, cached)

    async def _announce_ready(self, on_ready: Callable[[], None]) -> None:
        """Call *on_ready* once the kernel routes a stat of the mountpoint to us."""
        info = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        set_kernel_readahead(info.st_dev, self.options.kernel_readahead)
        files, _ = self.tree.counts()
        log.info("mounted %s (%d files)", self.mountpoint, files)
        sd_notify(f"READY=1\nSTATUS=serving {files} files")
        on_ready()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("got %s; unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return
