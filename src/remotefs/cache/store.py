"""The cache directory: one lock for one daemon, one sub-directory per URL, one catalog.

Layout (everything 0600 in 0700 directories, because cached bytes of private URLs are as
private as the URLs)::

    CACHE_DIR/
      lock                      flock'ed by the running daemon; holds its pid
      catalog                   what each listed URL's origin said last (size, validators),
                                so a remount lists every file at once (checksummed)
      files/<sha256(url)>/meta   CacheMeta (checksummed)
      files/<sha256(url)>/bitmap present blocks (checksummed roaring bitmap)
      files/<sha256(url)>/data   sparse file of the remote size

Entries are keyed by the URL as written in urls.txt, so renaming a PATH keeps the cache, and a
URL listed at several paths has one entry. An entry exists on disk only once a block of it was
stored. An entry whose stored version (size, ETag, Last-Modified) differs from a fresh probe
is discarded: its bytes belong to another version of the file.

The directory is trusted only if the daemon's user owns it (`safe_fs.check_private_dir`), and
everything in it is opened relative to a directory descriptor with ``O_NOFOLLOW``: a planted
symlink is never followed. ``files/`` and every entry directory must be the user's own and
writable by nobody else, checked on the open descriptor. A ``files/`` that is not refuses the
whole cache directory (someone else held every entry). An entry directory that is not, or a
symlink found where an entry or one of its files should be, is removed (the link, never its
target) and the entry starts afresh: one planted entry must not take 100,000 good ones down.
An entry that cannot be read for any other reason (EMFILE, EIO, EACCES) is reported, never
taken for damage and deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pyroaring import BitMap

from ..http.source import RemoteMeta
from ..redact import redact_url, url_at_rest
from . import safe_fs
from .cached_file import BITMAP_NAME, DATA_NAME, META_NAME, CachedFile
from .fd_cache import FdCache
from .gaps import runs
from .state_files import (
    CacheMeta,
    Catalog,
    CatalogRecord,
    CorruptStateError,
    decode_bitmap,
    decode_catalog,
    decode_meta,
    encode_catalog,
    encode_meta,
)

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog"
LOCK_NAME = "lock"
FILES_NAME = "files"


class CacheDirError(Exception):
    """The cache directory cannot be used (unsafe, unwritable, or in use by another daemon)."""


class EntryUnavailableError(OSError):
    """A cache entry exists but cannot be read now (not damage: nothing is deleted)."""


@dataclass(slots=True)
class StoredEntry:
    """What an earlier run left for one URL."""

    meta: CacheMeta
    bitmap: BitMap
    #: False when the entry was damaged and removed: only its metadata is left (the size).
    on_disk: bool


#: `CacheStore.attach`'s default: read the stored entry itself.
_LOAD = object()


class CacheStore:
    """Owns the cache directory for the lifetime of one daemon."""

    def __init__(self, root: Path, block_size: int, fd_capacity: int = 256) -> None:
        self.root = root
        self.block_size = block_size
        self.fds = FdCache(fd_capacity)
        self._lock_fd = -1
        self._root_fd = -1
        self._files_fd = -1
        #: Names of the entry directories that exist (read once at open, kept up to date).
        self._keys: set[str] = set()
        #: Sizes known to fit on the cache filesystem, and the smallest known not to.
        self._fits_up_to = 0
        self._too_large_from: int | None = None
        #: Told when blocks of a file were stored (the engine's `Verifier`).
        self.on_stored: Callable[[CachedFile], None] | None = None

    def blocks_stored(self, cached: CachedFile) -> None:
        if self.on_stored is not None:
            self.on_stored(cached)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, wait: float = 5.0) -> None:
        """Check the directory is safe, create it if needed and take its lock.

        Waits up to *wait* seconds for the lock, because a daemon that was just unmounted may
        still be saving its state; after that, the directory is reported as in use.
        """
        check_cache_dir(self.root)
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            self._root_fd = safe_fs.open_dir(os.path.realpath(self.root))
        except OSError as err:
            raise CacheDirError(
                f"cache directory {self.root} is not usable: {err.strerror or err}"
            ) from None
        try:
            self._lock_fd = safe_fs.open_file(
                LOCK_NAME, os.O_RDWR | os.O_CREAT, dir_fd=self._root_fd
            )
        except OSError as err:
            self.close()
            raise CacheDirError(_unusable(self.root, LOCK_NAME, err)) from None
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
                    self.close()
                    raise CacheDirError(
                        f"cache directory {self.root} is in use by another remotefs daemon"
                        f" (pid {holder or 'unknown'}); unmount it first or use --cache-dir"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self._files_fd = safe_fs.open_dir(
                FILES_NAME, dir_fd=self._root_fd, create=True, own=True
            )
            self._keys = {name for name in os.listdir(self._files_fd) if not name.startswith(".")}
            self._check_writable()
        except OSError as err:
            self.close()
            raise CacheDirError(_unusable(self.root, FILES_NAME, err)) from None

    def _check_writable(self) -> None:
        name = ".write-test"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._files_fd)
        fd = safe_fs.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=self._files_fd)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=self._files_fd)

    def close(self) -> None:
        """Release the lock and the directories (state must have been saved by then)."""
        self.fds.close_all()
        for attribute in ("_files_fd", "_root_fd", "_lock_fd"):
            fd = getattr(self, attribute)
            if fd >= 0:
                os.close(fd)
                setattr(self, attribute, -1)

    # -- entries -----------------------------------------------------------------------------

    @staticmethod
    def key(url: str) -> str:
        """The name of *url*'s entry directory."""
        return hashlib.sha256(url.encode()).hexdigest()[:40]

    def entry_dir(self, url: str) -> Path:
        """The directory holding *url*'s cache entry (for messages and tests)."""
        return self.entry_path(self.key(url))

    def entry_path(self, key: str) -> Path:
        return self.root / FILES_NAME / key

    @contextlib.contextmanager
    def opened_entry(self, key: str, *, create: bool = False) -> Iterator[int]:
        """A descriptor of entry directory *key* (created if *create*), never via a link."""
        try:
            fd = safe_fs.open_dir(key, dir_fd=self._files_fd, create=create, own=True)
        except safe_fs.UnsafePathError as err:
            if not create:
                raise
            log.warning("%s cannot be trusted (%s); replaced", self.entry_path(key), err.strerror)
            safe_fs.remove_entry(key, dir_fd=self._files_fd)
            fd = safe_fs.open_dir(key, dir_fd=self._files_fd, create=True, own=True)
        self._keys.add(key)
        try:
            yield fd
        finally:
            os.close(fd)

    def has_entry(self, url: str) -> bool:
        """True when *url* has an entry directory (it may still turn out empty or damaged)."""
        return self.key(url) in self._keys

    def stored_meta(self, url: str) -> CacheMeta | None:
        """The metadata stored by an earlier run, or None (none, or damaged: reset).

        Raises `EntryUnavailableError` when the entry exists but cannot be read now.
        """
        key = self.key(url)
        if key not in self._keys:
            return None
        try:
            with self.opened_entry(key) as entry:
                data = safe_fs.read_file(META_NAME, dir_fd=entry)
            meta = decode_meta(data, self.entry_path(key) / META_NAME)
        except FileNotFoundError:
            return None
        except safe_fs.UnsafePathError as err:
            log.warning(
                "cache of %s cannot be trusted (%s); it is removed and starts empty",
                redact_url(url),
                err.strerror,
            )
            self._discard(key)
            return None
        except CorruptStateError as err:
            log.warning("cache of %s is damaged (%s); it is reset", redact_url(url), err)
            self._discard(key)
            return None
        except OSError as err:
            raise EntryUnavailableError(
                err.errno, f"cannot read the cache entry of {redact_url(url)}: {err.strerror}"
            ) from None
        if meta.url not in (url_at_rest(url), url):
            log.warning("cache entry of %s belongs to another URL; it is reset", redact_url(url))
            self._discard(key)
            return None
        if meta.url != url_at_rest(url):
            # Written by an older version with the whole URL (a password in it, maybe):
            # rewritten at once in the at-rest form.
            meta = replace(meta, url=url)
            with contextlib.suppress(OSError), self.opened_entry(key) as entry:
                safe_fs.atomic_write(META_NAME, encode_meta(meta), dir_fd=entry)
        return replace(meta, url=url)

    def _discard(self, key: str) -> None:
        """Remove an entry directory (links in it are removed, never followed).

        One that cannot be removed (another user's directory, for a daemon that is not root)
        is logged and left; it is never opened again (`opened_entry` refuses it).
        """
        try:
            safe_fs.remove_entry(key, dir_fd=self._files_fd)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove %s: %s", self.entry_path(key), err.strerror or err)
        self._keys.discard(key)

    def load_entry(self, url: str) -> StoredEntry | None:
        """What an earlier run stored for *url*: metadata and bitmap; None when nothing.

        A damaged entry is removed, and then only its metadata (if readable) comes back, as a
        StoredEntry that is not on disk. Raises `EntryUnavailableError` when the entry exists
        but cannot be read now. Touches only this entry: safe to run in a worker thread while
        nothing else uses the store.
        """
        meta = self.stored_meta(url)
        if meta is None:
            return None
        key = self.key(url)
        bitmap = self._load_bitmap(key, meta, redact_url(url))
        if bitmap is None:
            self._discard(key)
            return StoredEntry(replace(meta, complete=False), BitMap(), on_disk=False)
        return StoredEntry(meta, bitmap, on_disk=True)

    def attach(
        self, url: str, remote: RemoteMeta, name: str, stored: StoredEntry | object | None = _LOAD
    ) -> CachedFile:
        """The cache entry of *url* for the version *remote* describes (fresh if it differs).

        *stored* is what `load_entry` gave, when the caller has it already. Raises
        `EntryUnavailableError` when the stored entry cannot be read now.
        """
        entry = self.load_entry(url) if stored is _LOAD else stored
        assert entry is None or isinstance(entry, StoredEntry)
        if entry is not None and remote.freshness.no_store:
            log.info("%s: the origin says no-store; its cached bytes are removed", name)
            self._discard(self.key(url))
            entry = None
        if entry is not None and not entry.meta.remote().same_version(remote):
            log.warning(
                "%s: the remote file changed since it was cached (size %d -> %d);"
                " discarding its cached blocks",
                name,
                entry.meta.size,
                remote.size,
            )
            self._discard(self.key(url))
            entry = None
        if entry is None:
            return self.new_entry(url, remote, name)
        if entry.meta.block_size != self.block_size:
            return self._rebase_entry(entry, remote, name)
        # Same version: keep the blocks, but refresh what the probe says beyond validators
        # (a server that learned Range, a corrected Content-Type).
        refreshed = replace(
            entry.meta, content_type=remote.content_type, accepts_ranges=remote.accepts_ranges
        )
        cached = self._from_stored(url, StoredEntry(refreshed, entry.bitmap, entry.on_disk), name)
        if refreshed != entry.meta and entry.on_disk:
            # Written by the next save, in a worker thread (never on the event loop).
            cached.mark_meta_dirty()
        return cached

    def attach_stored(self, url: str, name: str, stored: StoredEntry) -> CachedFile:
        """The entry of *url* as an earlier run left it (the origin was not asked)."""
        if stored.meta.block_size != self.block_size:
            return self._rebase_entry(stored, stored.meta.remote(), name)
        return self._from_stored(url, stored, name)

    def new_entry(self, url: str, remote: RemoteMeta, name: str) -> CachedFile:
        """An empty entry for *remote*, created on disk with its first block."""
        # An empty file is complete from the start: there is no block to wait for.
        meta = replace(CacheMeta.from_remote(remote, self.block_size), complete=remote.size == 0)
        return CachedFile(
            self,
            self.key(url),
            meta,
            BitMap(),
            name,
            on_disk=False,
            uncached_reason=self._uncached_reason(remote.size, remote.freshness.no_store),
        )

    def unusable_entry(self, url: str, remote: RemoteMeta, name: str, why: str) -> CachedFile:
        """An entry for *remote* that never touches the disk: reads go to the network.

        For a URL whose entry exists but cannot be read now: its data is left alone.
        """
        meta = CacheMeta.from_remote(remote, self.block_size)
        return CachedFile(
            self, self.key(url), meta, BitMap(), name, on_disk=False, uncached_reason=why
        )

    async def replace(self, old: CachedFile, remote: RemoteMeta) -> CachedFile:
        """Discard *old* (the origin's file changed) and start an empty entry for *remote*."""
        await old.retire()
        self._discard(old.key)
        cached = self.new_entry(remote.url, remote, old.name)
        cached.stats = old.stats  # origin bytes count for the whole session
        cached.stats.last_error = None
        return cached

    def adopt_download(self, url: str, remote: RemoteMeta, part: str, name: str) -> CachedFile:
        """Turn a finished whole-file download (of a file of unknown size) into a complete entry.

        *part* names a file in the entry's directory holding every byte; *remote* has its size.
        """
        meta = replace(CacheMeta.from_remote(remote, self.block_size), complete=True)
        key = self.key(url)
        with self.opened_entry(key, create=True) as entry:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(BITMAP_NAME, dir_fd=entry)
            os.replace(part, DATA_NAME, src_dir_fd=entry, dst_dir_fd=entry)
            safe_fs.atomic_write(META_NAME, encode_meta(meta), dir_fd=entry)
        bitmap = BitMap()
        bitmap.add_range(0, -(-remote.size // self.block_size))
        cached = CachedFile(self, key, meta, bitmap, name, on_disk=True)
        cached.mark_dirty()
        return cached

    def _from_stored(self, url: str, stored: StoredEntry, name: str) -> CachedFile:
        if not stored.on_disk:
            return self.new_entry(url, stored.meta.remote(), name)
        return CachedFile(
            self,
            self.key(url),
            stored.meta,
            stored.bitmap,
            name,
            on_disk=True,
            uncached_reason=None if stored.bitmap else self._uncached_reason(stored.meta.size),
        )

    def _load_bitmap(self, key: str, meta: CacheMeta, name: str) -> BitMap | None:
        """The stored bitmap, an empty one when none was saved, or None when it is unusable."""
        nblocks = -(-meta.size // meta.block_size)
        path = self.entry_path(key)
        try:
            with self.opened_entry(key) as entry:
                try:
                    bitmap = decode_bitmap(safe_fs.read_file(BITMAP_NAME, dir_fd=entry), path)
                except FileNotFoundError:
                    return BitMap()
                if not bitmap:
                    return bitmap
                try:
                    info = os.stat(DATA_NAME, dir_fd=entry, follow_symlinks=False)
                except FileNotFoundError:
                    info = None
        except (CorruptStateError, safe_fs.UnsafePathError) as err:
            log.warning("%s: cache bitmap is damaged (%s); resetting this file's cache", name, err)
            return None
        except OSError as err:
            raise EntryUnavailableError(
                err.errno, f"{name}: cannot read its cache entry: {err.strerror}"
            ) from None
        if bitmap.max() >= nblocks:
            log.warning("%s: cache bitmap claims blocks past the end; resetting", name)
            return None
        if info is not None and stat.S_ISLNK(info.st_mode):
            log.warning(
                "%s: its cache data file is a symbolic link (never followed); resetting", name
            )
            return None
        if info is None or not stat.S_ISREG(info.st_mode) or info.st_size != meta.size:
            log.warning("%s: cache data file is missing or has the wrong size; resetting", name)
            return None
        return bitmap

    def _rebase_entry(self, stored: StoredEntry, remote: RemoteMeta, name: str) -> CachedFile:
        """Reuse an entry cached with another block size: keep every fully covered new block."""
        old = stored.meta
        key = self.key(old.url)
        new = convert_bitmap(stored.bitmap, old.block_size, self.block_size, old.size)
        meta = CacheMeta.from_remote(remote, self.block_size)
        if not stored.on_disk:
            return self.new_entry(old.url, remote, name)
        with self.opened_entry(key, create=True) as entry:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(BITMAP_NAME, dir_fd=entry)
            safe_fs.atomic_write(META_NAME, encode_meta(meta), dir_fd=entry)
        cached = CachedFile(self, key, meta, new, name, on_disk=True)
        cached.mark_dirty()
        log.info(
            "%s: cache converted from %d to %d byte blocks",
            name,
            old.block_size,
            self.block_size,
        )
        return cached

    # -- what the cache filesystem can hold ----------------------------------------------------

    def _uncached_reason(self, size: int, no_store: bool = False) -> str | None:
        """Why a file of *size* bytes cannot be cached here, or None when it can."""
        if no_store:
            return "the origin says no-store: nothing of it is kept on disk"
        if size <= self._fits_up_to:
            return None
        if self._too_large_from is not None and size >= self._too_large_from:
            return "the cache filesystem cannot hold a file this large"
        if size < 1 << 40:  # every filesystem a cache lives on holds 1 TiB files
            self._fits_up_to = max(self._fits_up_to, size)
            return None
        name = ".size-test"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._files_fd)
            fd = safe_fs.open_file(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, dir_fd=self._files_fd)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
                os.unlink(name, dir_fd=self._files_fd)
        except OSError as err:
            if err.errno in (errno.EFBIG, errno.EINVAL, errno.EOVERFLOW):
                self._too_large_from = min(self._too_large_from or size, size)
                return f"the cache filesystem cannot hold a file this large ({err.strerror})"
            return None  # not a size limit: the first write will tell
        self._fits_up_to = size
        return None

    # -- the catalog ---------------------------------------------------------------------------

    def load_catalog(self) -> Catalog:
        """What the origins said about each URL at the last save (empty when unusable)."""
        try:
            data = safe_fs.read_file(CATALOG_NAME, dir_fd=self._root_fd)
            return Catalog(decode_catalog(data, self.root / CATALOG_NAME))
        except FileNotFoundError:
            return Catalog()
        except (CorruptStateError, OSError) as err:
            log.warning("the catalog of the cache is unusable (%s); every URL is probed", err)
            return Catalog()

    def save_catalog(self, records: Iterable[CatalogRecord]) -> None:
        """Replace the catalog atomically (may run in a worker thread)."""
        safe_fs.atomic_write(CATALOG_NAME, encode_catalog(records), dir_fd=self._root_fd)


def check_cache_dir(root: Path) -> None:
    """Refuse *root* as a cache directory unless it and what it holds can be trusted.

    The directory and its parents (`safe_fs.check_private_dir`), and an existing ``files/``,
    which must be the user's own: whoever could write to it could have swapped the entries.
    Run by the command before it writes anything (the log file included), so a refusal leaves
    nothing behind; `CacheStore.open` checks again on the descriptors it opens. Raises
    `CacheDirError` with one sentence that says why and what to do.
    """
    try:
        safe_fs.check_private_dir(root)
    except safe_fs.UnsafePathError as err:
        raise CacheDirError(f"refusing the {err.strerror}") from None
    try:
        fd = safe_fs.open_dir(root / FILES_NAME, own=True)
    except (FileNotFoundError, NotADirectoryError) as err:
        if isinstance(err, NotADirectoryError):
            raise CacheDirError(_unusable(root, FILES_NAME, err)) from None
        return
    except OSError as err:
        raise CacheDirError(_unusable(root, FILES_NAME, err)) from None
    os.close(fd)


def _unusable(root: Path, name: str, err: OSError) -> str:
    """One sentence for a file or directory *name* of the cache directory that cannot be used.

    An unsafe one (a link, another owner) is never fixed in place: what it holds may have been
    planted, so the advice is to remove it.
    """
    path = root / name
    if isinstance(err, safe_fs.UnsafePathError):
        reason = (err.strerror or str(err)).removeprefix(f"{path} ").removeprefix(f"{name} ")
        return (
            f"refusing the cache directory {root}: {path} {reason}; what is there cannot be"
            f" trusted, so remove it (rm -rf {path}) or use another cache directory"
        )
    return f"cache directory {root}: {path}: {err.strerror or err}"


def convert_bitmap(old: BitMap, old_size: int, new_size: int, file_size: int) -> BitMap:
    """Map a bitmap of *old_size* blocks to *new_size* blocks, keeping only whole blocks.

    Works run by run, so its cost follows the number of runs, not of blocks.
    """
    new = BitMap()
    new_nblocks = -(-file_size // new_size)
    if not old:
        return new
    for first, end in runs(old, old.min(), old.max() + 1):
        start_byte, end_byte = first * old_size, min(end * old_size, file_size)
        if new_size >= old_size:
            new_first = -(-start_byte // new_size)
            new_end = new_nblocks if end_byte >= file_size else end_byte // new_size
        else:
            new_first, new_end = start_byte // new_size, -(-end_byte // new_size)
        if new_first < new_end:
            new.add_range(new_first, min(new_end, new_nblocks))
    return new
