"""The cache directory: one lock for one daemon, one sub-directory per URL.

Layout (everything 0600 in 0700 directories, because cached bytes of private URLs are as
private as the URLs)::

    CACHE_DIR/
      lock                      flock'ed by the running daemon; holds its pid
      files/<sha256(url)>/meta   CacheMeta (checksummed)
      files/<sha256(url)>/bitmap present blocks (checksummed roaring bitmap)
      files/<sha256(url)>/data   sparse file of the remote size

Entries are keyed by the URL as written in urls.txt, so renaming a PATH keeps the cache and
two PATHs never share one. An entry whose stored version (size, ETag, Last-Modified) differs
from a fresh probe is discarded: its bytes belong to another version of the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from pyroaring import BitMap

from ..http.source import RemoteMeta
from ..redact import redact_url
from .cached_file import BITMAP_NAME, DATA_NAME, META_NAME, CachedFile
from .state_files import CacheMeta, CorruptStateError, load_bitmap, load_meta, save_meta

log = logging.getLogger(__name__)


class CacheDirError(Exception):
    """The cache directory cannot be used (unwritable, or in use by another daemon)."""


class CacheStore:
    """Owns the cache directory for the lifetime of one daemon."""

    def __init__(self, root: Path, block_size: int) -> None:
        self.root = root
        self.block_size = block_size
        self._lock_fd = -1

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, wait: float = 5.0) -> None:
        """Create the directory if needed and take its lock.

        Waits up to *wait* seconds for the lock, because a daemon that was just unmounted may
        still be saving its state; after that, the directory is reported as in use.
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.root / "files").mkdir(mode=0o700, exist_ok=True)
            lock_path = self.root / "lock"
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise CacheDirError(
                f"cache directory {self.root} is not usable: {err.strerror}"
            ) from err
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
                    os.close(self._lock_fd)
                    self._lock_fd = -1
                    raise CacheDirError(
                        f"cache directory {self.root} is in use by another remotefs daemon"
                        f" (pid {holder or 'unknown'}); unmount it first or use --cache-dir"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._check_writable()

    def _check_writable(self) -> None:
        probe = self.root / "files" / ".write-test"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"x")
            probe.unlink()
        except OSError as err:
            raise CacheDirError(
                f"cache directory {self.root} is not writable: {err.strerror}"
            ) from err

    def close(self) -> None:
        """Release the lock (state must have been saved by then)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- entries -----------------------------------------------------------------------------

    def entry_dir(self, url: str) -> Path:
        """The directory holding *url*'s cache entry."""
        return self.root / "files" / hashlib.sha256(url.encode()).hexdigest()[:40]

    def known_meta(self, url: str) -> CacheMeta | None:
        """The metadata stored by an earlier run, or None (missing or corrupt)."""
        try:
            return load_meta(self.entry_dir(url) / META_NAME)
        except FileNotFoundError:
            return None
        except (CorruptStateError, OSError) as err:
            log.warning("cache of %s is damaged (%s); it will be reset", redact_url(url), err)
            return None

    def attach(self, url: str, remote: RemoteMeta | None, name: str) -> CachedFile | None:
        """Open the cache entry of *url* for the version *remote* describes.

        With *remote* None (the origin could not be probed) an existing entry is opened as it
        is, so its cached bytes stay readable offline; without one, None is returned.
        """
        directory = self.entry_dir(url)
        stored = self.known_meta(url)
        if remote is None:
            if stored is None:
                return None
            return self._open_entry(directory, stored, name)
        if stored is not None and not stored.remote().same_version(remote):
            log.warning(
                "%s: the remote file changed since it was cached (size %d -> %d);"
                " discarding its cached blocks",
                name,
                stored.size,
                remote.size,
            )
            stored = None
        if stored is None:
            # An empty file is complete from the start: there is no block to wait for.
            fresh = replace(
                CacheMeta.from_remote(remote, self.block_size), complete=remote.size == 0
            )
            return self._create_entry(directory, fresh, name)
        if stored.block_size != self.block_size:
            return self._rebase_entry(directory, stored, remote, name)
        # Same version: keep the blocks, but refresh what the probe says beyond validators
        # (a server that learned Range, a corrected Content-Type).
        refreshed = replace(
            stored, content_type=remote.content_type, accepts_ranges=remote.accepts_ranges
        )
        if refreshed != stored:
            save_meta(directory / META_NAME, refreshed)
        return self._open_entry(directory, refreshed, name)

    async def replace(self, old: CachedFile, remote: RemoteMeta) -> CachedFile:
        """Discard *old* (the origin's file changed) and start an empty entry for *remote*."""
        await old.retire()
        fresh = CacheMeta.from_remote(remote, self.block_size)
        cached = self._create_entry(
            old.directory, replace(fresh, complete=remote.size == 0), old.name
        )
        cached.stats = old.stats  # origin bytes count for the whole session
        cached.stats.last_error = None
        return cached

    def adopt_download(self, url: str, remote: RemoteMeta, data: Path, name: str) -> CachedFile:
        """Turn a finished whole-file download (of a file of unknown size) into a complete entry.

        *data* is a file in the entry's directory holding every byte; *remote* has its size.
        """
        directory = self.entry_dir(url)
        meta = replace(CacheMeta.from_remote(remote, self.block_size), complete=True)
        with contextlib.suppress(FileNotFoundError):
            (directory / BITMAP_NAME).unlink()
        os.replace(data, directory / DATA_NAME)
        bitmap = BitMap()
        bitmap.add_range(0, -(-remote.size // self.block_size))
        save_meta(directory / META_NAME, meta)
        cached = CachedFile(directory, meta, bitmap, name)
        cached.mark_dirty()
        return cached

    def _create_entry(self, directory: Path, meta: CacheMeta, name: str) -> CachedFile:
        """Start an empty entry: bitmap gone first, so no stale claim can survive a crash."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (directory / BITMAP_NAME).unlink()
        with contextlib.suppress(FileNotFoundError):
            (directory / DATA_NAME).unlink()
        save_meta(directory / META_NAME, meta)
        return CachedFile(directory, meta, BitMap(), name)

    def _open_entry(self, directory: Path, meta: CacheMeta, name: str) -> CachedFile:
        bitmap = self._load_bitmap(directory, meta, name)
        if bitmap is None:
            return self._create_entry(directory, replace(meta, complete=False), name)
        return CachedFile(directory, meta, bitmap, name)

    def _load_bitmap(self, directory: Path, meta: CacheMeta, name: str) -> BitMap | None:
        """The stored bitmap, an empty one when none was saved, or None when it is unusable."""
        nblocks = -(-meta.size // meta.block_size)
        try:
            bitmap = load_bitmap(directory / BITMAP_NAME)
        except FileNotFoundError:
            return BitMap()
        except (CorruptStateError, OSError) as err:
            log.warning("%s: cache bitmap is damaged (%s); resetting this file's cache", name, err)
            return None
        if bitmap and bitmap.max() >= nblocks:
            log.warning("%s: cache bitmap claims blocks past the end; resetting", name)
            return None
        data = directory / DATA_NAME
        if bitmap and (not data.exists() or data.stat().st_size != meta.size):
            log.warning("%s: cache data file is missing or has the wrong size; resetting", name)
            return None
        return bitmap

    def _rebase_entry(
        self, directory: Path, stored: CacheMeta, remote: RemoteMeta, name: str
    ) -> CachedFile:
        """Reuse an entry cached with another block size: keep every fully covered new block."""
        old = self._load_bitmap(directory, stored, name) or BitMap()
        new = convert_bitmap(old, stored.block_size, self.block_size, stored.size)
        meta = CacheMeta.from_remote(remote, self.block_size)
        with contextlib.suppress(FileNotFoundError):
            (directory / BITMAP_NAME).unlink()
        save_meta(directory / META_NAME, meta)
        cached = CachedFile(directory, meta, new, name)
        cached.mark_dirty()
        log.info(
            "%s: cache converted from %d to %d byte blocks",
            name,
            stored.block_size,
            self.block_size,
        )
        return cached


def convert_bitmap(old: BitMap, old_size: int, new_size: int, file_size: int) -> BitMap:
    """Map a bitmap of *old_size* blocks to *new_size* blocks, keeping only whole blocks."""
    new = BitMap()
    new_nblocks = -(-file_size // new_size)
    if new_size >= old_size:
        ratio = new_size // old_size
        old_nblocks = -(-file_size // old_size)
        for block in range(new_nblocks):
            first = block * ratio
            if old.contains_range(first, min(first + ratio, old_nblocks)):
                new.add(block)
    else:
        ratio = old_size // new_size
        for block in old:
            new.add_range(block * ratio, min((block + 1) * ratio, new_nblocks))
    return new
