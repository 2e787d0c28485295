"""The FUSE door of a daemon: the mount itself and the kernel's caches of names and pages.

Only a daemon that mounts imports this module (and so pyfuse3): a serve-only daemon runs
without libfuse. The names it shows are the daemon's `Tree`, shared with the HTTP door; what
is FUSE's own is here: libfuse's options, mounting and unmounting, the kernel's readahead,
and making the kernel forget entries and pages when the daemon changes its names (a reload)
or a file's version (a remote change).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

from ..cache.engine import RemoteCache
from ..config.options import MountOptions
from ..fuse.ops import RemoteFsOperations
from ..fuse.tree import Removed, Tree

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


class FuseDoor:
    """One FUSE mount of the daemon's tree."""

    def __init__(
        self,
        tree: Tree,
        engine: RemoteCache,
        options: MountOptions,
        mountpoint: Path,
        fsname: str = "remotefs",
    ) -> None:
        self._tree = tree
        self._engine = engine
        self._options = options
        self.mountpoint = mountpoint
        self._fsname = fsname
        self.mounted = False

    def mount(self, control_path: str | None) -> None:
        """Mount (the kernel sends requests from now on; `main` answers them)."""
        ops = RemoteFsOperations(self._tree, self._engine, self._options.block_size)
        ops.control_path = control_path
        pyfuse3.init(ops, str(self.mountpoint), fuse_options(self._options, self._fsname))
        self.mounted = True

    async def main(self) -> None:
        """Answer the kernel until the mount is unmounted or `terminate` is called."""
        await pyfuse3.main()

    @staticmethod
    def terminate() -> None:
        pyfuse3.terminate()

    def close(self) -> None:
        """Unmount (after `main` returned) and let libfuse go."""
        if self.mounted:
            self.mounted = False
            pyfuse3.close(unmount=True)

    async def wait_answering(self) -> None:
        """Return once the kernel routes a stat of the mountpoint to us; raise its readahead."""
        info = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        set_kernel_readahead(info.st_dev, self._options.kernel_readahead)

    @staticmethod
    async def forget(entries: Sequence[Removed]) -> None:
        """The kernel drops these directory entries (a reload or a swap removed them)."""
        await trio.to_thread.run_sync(forget_entries, entries)

    @staticmethod
    async def invalidate(inodes: Sequence[int]) -> None:
        """The kernel forgets these inodes' pages and attributes."""
        for inode in inodes:
            await trio.to_thread.run_sync(invalidate_inode, inode)
