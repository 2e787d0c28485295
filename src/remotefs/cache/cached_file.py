"""One cached URL: a sparse data file of the full size, its block bitmap and its metadata.

Invariant that makes crashes harmless: a block's bit is set only after its bytes were written
to the data file, and a bitmap snapshot reaches disk only after the data file was fdatasync'ed.
So the bitmap on disk may *miss* blocks that are present (they are fetched again), but never
claims a block that is not.

Nothing is written to disk for a file until its first block is: a mount of 100,000 URLs that
reads ten of them creates ten entries, not 100,000 (each would cost a directory, a metadata
file and two fsyncs). Then the entry is created in crash-safe order: any older version's
bitmap and data are removed, the metadata is written atomically, the data file is created.

The data file is opened on demand through the store's `FdCache` and may be closed again when
many files are in use; nothing here holds a descriptor between calls, except a save that pins
it across its fsync.

All methods run on the trio thread, and no file I/O that can wait for the disk runs on it:
`store_blocks` writes (and creates the entry) in a worker thread, `save` fsyncs and writes the
bitmap there, `evict_blocks` punches its holes there. Bits are set and cleared only on the trio
thread. While a worker writes blocks they are in `writing` (an eviction leaves them alone),
and while a worker punches holes, stores of the file wait; so a set bit always claims bytes
that are on disk, and a hole never lands on bytes a bit claims.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import trio
from pyroaring import BitMap

from ..http.source import Freshness, RemoteMeta
from . import safe_fs
from .fd_cache import FdCache
from .gaps import runs
from .state_files import CacheMeta, encode_bitmap, encode_meta
from .stats import TransferStats

log = logging.getLogger(__name__)

DATA_NAME = "data"
BITMAP_NAME = "bitmap"
META_NAME = "meta"

#: Roaring bitmaps index blocks with 32-bit numbers: 256 TiB at 64 KiB blocks. A larger file is
#: served without caching.
MAX_BLOCKS = 1 << 32

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: What ftruncate says when the cache filesystem cannot hold a file that large.
_TOO_LARGE = (errno.EFBIG, errno.EINVAL, errno.EOVERFLOW)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk space of ``[offset, offset+length)`` of *fd*; best effort (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if fallocate(fd, mode, offset, length) != 0:
        log.debug("could not free a partly written block: %s", os.strerror(ctypes.get_errno()))


class FileRetiredError(Exception):
    """A write to the cache of a file version that the origin no longer serves."""


class UncacheableError(OSError):
    """The cache filesystem cannot hold this file: it is served from the network, uncached."""


class EntryHome(Protocol):
    """What a `CachedFile` needs of its store: its entry directory and the descriptor cache."""

    fds: FdCache

    def opened_entry(
        self, key: str, *, create: bool = False
    ) -> contextlib.AbstractContextManager[int]: ...

    def entry_path(self, key: str) -> Path: ...

    def blocks_stored(self, cached: CachedFile) -> None: ...


class CachedFile:
    """The local copy of one remote file, block by block."""

    __slots__ = (
        "__weakref__",
        "_home",
        "_meta_dirty",
        "_punched",
        "_save_lock",
        "_saved_version",
        "_stats",
        "_version",
        "bitmap",
        "block_size",
        "checked_at",
        "evictions",
        "fresh_until",
        "gone",
        "key",
        "meta",
        "name",
        "nblocks",
        "no_fill",
        "on_disk",
        "remote",
        "retired",
        "retry_at",
        "retry_delay",
        "uncached_reason",
        "validated_at",
        "writing",
    )

    def __init__(
        self,
        home: EntryHome,
        key: str,
        meta: CacheMeta,
        bitmap: BitMap,
        name: str,
        *,
        on_disk: bool,
        uncached_reason: str | None = None,
    ) -> None:
        self._home = home
        #: The entry's directory name under the store's ``files/``.
        self.key = key
        self.meta = meta
        self.bitmap = bitmap
        #: How this file is named in logs: its path in the mount (never the URL's query).
        self.name = name
        self.block_size = meta.block_size
        self.nblocks = -(-meta.size // meta.block_size)
        self.remote: RemoteMeta = meta.remote()
        #: The metadata of this version is on disk (else it is written with the first block).
        self.on_disk = on_disk
        self._version = 0  # bumped on every bitmap change
        self._saved_version = 0
        self._meta_dirty = False
        #: Evictions begun (their bits cleared): a reader of the data file outside the fetcher
        #: (`verify.Verifier`) compares it before and after, as holes may follow the bits.
        self.evictions = 0
        #: Set when the origin's file changed: this object's bytes belong to an old version,
        #: nothing may be written to or read from it any more.
        self.retired = False
        #: Why this file is served without caching (the cache cannot hold it), or None.
        self.uncached_reason = uncached_reason
        if uncached_reason is None and self.nblocks > MAX_BLOCKS:
            self.uncached_reason = (
                f"{meta.size} bytes is more than {MAX_BLOCKS} blocks of {meta.block_size}"
            )
        self._stats: TransferStats | None = None
        #: Set by `remotefs evict`: background fill leaves this file alone (until a prefetch).
        self.no_fill = False
        self._save_lock: trio.Lock | None = None
        #: Blocks whose bytes a worker thread is writing now (no bit set yet): an eviction
        #: never punches them, or it could punch bytes a bit is about to claim.
        self.writing = BitMap()
        #: Set while an eviction's holes are being punched (in a worker thread): stores of
        #: this file wait for it, or a hole could land on bytes written meanwhile.
        self._punched: trio.Event | None = None
        # Freshness (see `freshness.Revalidator`, which owns these): when the origin last
        # confirmed this version (seconds since the epoch, 0: never), until when (trio clock)
        # it is fresh, when it was last asked, and when to ask again after a failure.
        self.validated_at = 0.0
        self.fresh_until = float("-inf")
        self.checked_at = float("-inf")
        self.retry_at = float("-inf")
        self.retry_delay = 0.0
        #: The origin answered 404 or 410 to a revalidation: served from the cache only.
        self.gone = False

    # -- queries -----------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The entry's directory (for messages and tests; code opens it by descriptor)."""
        return self._home.entry_path(self.key)

    @property
    def stats(self) -> TransferStats:
        """Origin bytes, rate and last error of this session (carried over to a new version)."""
        if self._stats is None:
            self._stats = TransferStats()
        return self._stats

    @stats.setter
    def stats(self, value: TransferStats) -> None:
        self._stats = value

    @property
    def cacheable(self) -> bool:
        """False when the cache cannot hold this file: every read goes to the network."""
        return self.uncached_reason is None

    @property
    def size(self) -> int:
        """The remote file's size in bytes."""
        return self.meta.size

    @property
    def complete(self) -> bool:
        """True once every block is present: from then on no read needs the network."""
        return len(self.bitmap) == self.nblocks

    @property
    def cached_bytes(self) -> int:
        """Bytes present locally (the last block may be short)."""
        return self.bytes_of(self.bitmap)

    @property
    def dirty(self) -> bool:
        """True when the bitmap changed since it was last saved."""
        return self._version != self._saved_version

    def bytes_of(self, blocks: BitMap) -> int:
        """The bytes that *blocks* (of this file) hold; the last block may be short."""
        count = len(blocks)
        if count and (self.nblocks - 1) in blocks:
            return (count - 1) * self.block_size + self.block_length(self.nblocks - 1)
        return count * self.block_size

    def block_length(self, index: int) -> int:
        """Length of block *index*: the block size, except for a short last block."""
        return min(self.block_size, self.meta.size - index * self.block_size)

    def has_blocks(self, first: int, end: int) -> bool:
        """True when blocks ``[first, end)`` are all present."""
        return bool(self.bitmap.contains_range(first, end))

    # -- the data file -----------------------------------------------------------------------

    def open_data(self) -> int:
        """Open (creating the entry if need be) the data file; called by the `FdCache`.

        Raises `UncacheableError` when the cache filesystem cannot hold a file this large:
        the file is then served uncached from now on.
        """
        if self.retired:
            raise FileRetiredError(f"{self.name}: the remote file changed")
        with self._home.opened_entry(self.key, create=True) as entry:
            if not self.on_disk:
                # A new version: nothing of an older one may survive, the bitmap first.
                for stale in (BITMAP_NAME, DATA_NAME):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(stale, dir_fd=entry)
                safe_fs.atomic_write(META_NAME, encode_meta(self.meta), dir_fd=entry)
                self.on_disk = True
                self._meta_dirty = False
            fd = safe_fs.open_file(DATA_NAME, os.O_RDWR | os.O_CREAT, dir_fd=entry)
        try:
            if os.fstat(fd).st_size != self.meta.size:
                os.ftruncate(fd, self.meta.size)  # sparse: no disk blocks until written
        except OSError as err:
            os.close(fd)
            if err.errno in _TOO_LARGE:
                self.uncached_reason = f"the cache filesystem cannot hold it ({err.strerror})"
                log.warning(
                    "%s: %s; serving it from the network without caching",
                    self.name,
                    self.uncached_reason,
                )
                raise UncacheableError(err.errno, self.uncached_reason) from None
            raise
        return fd

    def read(self, offset: int, size: int) -> bytes:
        """Read present bytes from the data file (the caller checked the blocks are present)."""
        return os.pread(self._home.fds.fd(self), size, offset)

    def write_block(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Store one whole block, then mark it present (see `write_blocks`)."""
        self.write_blocks(index, 1, data)

    def write_blocks(self, first: int, count: int, data: bytes | bytearray | memoryview) -> None:
        """Store *count* whole consecutive blocks, then mark them present; blocking.

        For tools and tests outside the event loop: the daemon stores with `store_blocks`,
        whose disk write runs in a worker thread.
        """
        expected = self._check_store(first, count, data)
        _write_all(self._home.fds.fd(self), data, first * self.block_size, expected)
        self._mark_stored(first, count)

    async def store_blocks(
        self, first: int, count: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Store *count* whole consecutive blocks, then mark them present.

        In that order (see module docstring): a crash between the two loses the blocks, it
        never makes the bitmap claim them. The write (and the data file's first open, which
        creates the entry) runs in a worker thread: a slow cache disk slows this download,
        never the event loop that answers every other request. *data* must not change until
        this returns.
        """
        expected = self._check_store(first, count, data)
        while self._punched is not None:
            await self._punched.wait()
        self._check_store(first, count, data)
        self.writing.add_range(first, first + count)
        try:
            async with self._home.fds.apinned(self) as fd:
                await trio.to_thread.run_sync(
                    _write_all, fd, data, first * self.block_size, expected
                )
        finally:
            self.writing.remove_range(first, first + count)
        if self.retired:
            raise FileRetiredError(f"{self.name}: the remote file changed; block not stored")
        self._mark_stored(first, count)

    def _check_store(self, first: int, count: int, data: bytes | bytearray | memoryview) -> int:
        """The byte count blocks ``first + count`` must have; raises when they cannot go."""
        if self.retired:
            raise FileRetiredError(f"{self.name}: the remote file changed; block not stored")
        if not self.cacheable:
            raise UncacheableError(errno.EFBIG, str(self.uncached_reason))
        expected = min(count * self.block_size, self.meta.size - first * self.block_size)
        if count < 1 or len(data) != expected:
            raise ValueError(f"blocks {first}+{count} of {self.name}: {len(data)} bytes")
        return expected

    def _mark_stored(self, first: int, count: int) -> None:
        self.bitmap.add_range(first, first + count)
        self._version += 1
        self._home.blocks_stored(self)

    def pinned_fd(self) -> contextlib.AbstractAsyncContextManager[int]:
        """The data file's descriptor, held open (for readers outside the fetcher)."""
        return self._home.fds.apinned(self)

    def adopt(self, remote: RemoteMeta) -> None:
        """A probe confirmed the size this file was listed with (an exact listing's): take
        its validators, type and Range support, and save them with the next checkpoint."""
        self.remote = remote
        self.meta = replace(
            self.meta,
            etag=remote.etag,
            last_modified=remote.last_modified,
            content_type=remote.content_type,
            accepts_ranges=remote.accepts_ranges,
        )
        self.mark_meta_dirty()

    def set_freshness(self, freshness: Freshness) -> None:
        """The origin said anew how long this version stays fresh (a 304, say)."""
        self.meta = replace(
            self.meta,
            max_age=freshness.max_age,
            no_cache=freshness.no_cache,
            no_store=freshness.no_store,
        )
        self.remote = self.meta.remote()
        self._meta_dirty = True

    def mark_opened(self) -> None:
        """A program read this file: `--fill opened` completes it (remembered across mounts)."""
        if not self.meta.opened:
            self.meta = replace(self.meta, opened=True)
            self._meta_dirty = True
            self._version += 1

    def disable_ranges(self) -> None:
        """Remember that the origin ignores Range: fetch this file as one stream from now on."""
        if self.meta.accepts_ranges:
            self.meta = replace(self.meta, accepts_ranges=False)
            self.remote = self.meta.remote()
            self._meta_dirty = True
            self._version += 1

    def _lock(self) -> trio.Lock:
        if self._save_lock is None:
            self._save_lock = trio.Lock()
        return self._save_lock

    async def retire(self) -> None:
        """Stop using this object (its file changed at the origin) and release its descriptor.

        Waits for a save in progress, so no snapshot of the old version can land on disk
        after the caller has reset the entry.
        """
        self.retired = True
        async with self._lock():
            self.close()

    async def evict(self) -> int:
        """Forget every cached block and free its disk space; return the bytes dropped."""
        return await self.evict_blocks(None)

    async def evict_blocks(self, blocks: BitMap | None) -> int:
        """Forget *blocks* (every block when None), free their disk space; return the bytes.

        The bits are cleared first and the bitmap is saved (fsync'ed) before any byte is
        dropped, so a crash in between never leaves a bitmap on disk that claims a hole. Blocks
        stored again during the save keep their bytes. If the save fails, nothing was dropped
        and the bits are set again. The caller makes sure no reader waits for these blocks (a
        download that stores them again meanwhile is harmless, only wasteful).
        """
        if self.retired:
            raise FileRetiredError(f"{self.name}: the remote file changed; nothing to evict")
        dropped = self.bitmap.copy() if blocks is None else blocks & self.bitmap
        freed = self.bytes_of(dropped)
        if not dropped:
            return 0
        self.bitmap -= dropped
        self._version += 1
        self.evictions += 1
        if self.meta.complete:
            self.meta = replace(self.meta, complete=False)
            self._meta_dirty = True
        try:
            await self.save()
        except BaseException:
            # The bytes are all still there: claiming them again is safe.
            if not self.retired:
                self.bitmap |= dropped
                self._version += 1
            raise
        if self.retired:
            return freed
        # Only now, with no durable claim left, may the bytes go: not those of blocks stored
        # again meanwhile, nor of blocks being written now; and no store starts until the
        # holes are punched (in a worker thread).
        while self._punched is not None:
            await self._punched.wait()
        if self.retired:
            return freed
        # No await from here until the punch is under way: what is computed stays true.
        self._punched = done = trio.Event()
        dropped -= self.bitmap
        dropped -= self.writing
        whole = not self.bitmap and not self.writing
        runs = [
            (first * self.block_size, min(end * self.block_size, self.size))
            for first, end in _block_runs(dropped)
        ]
        try:
            async with self._home.fds.apinned(self) as fd:
                await trio.to_thread.run_sync(_drop_bytes, fd, self.meta.size, whole, runs)
        finally:
            self._punched = None
            done.set()
        return freed

    def mark_dirty(self) -> None:
        """Force the next `save` to write the bitmap (after a conversion, say)."""
        self._version += 1

    def mark_meta_dirty(self) -> None:
        """Have the next `save` write the metadata too (what the probe said changed)."""
        self._meta_dirty = True
        self._version += 1

    # -- persistence -------------------------------------------------------------------------

    async def save(self) -> None:
        """Persist the bitmap (and the complete flag) if it changed since the last save.

        The snapshot is taken before fdatasync, so every block it claims was written before
        the sync: the durable bitmap never runs ahead of the durable data.
        """
        async with self._lock():
            if not self.dirty or self.retired:
                return
            version = self._version
            if not self.on_disk:
                # Nothing stored yet: the entry is created with its first block, not before.
                self._saved_version = version
                return
            snapshot = encode_bitmap(self.bitmap)
            complete = self.complete
            newly_complete = complete and not self.meta.complete
            meta: CacheMeta | None = None
            if newly_complete or self._meta_dirty:
                meta = replace(self.meta, complete=complete)
            with self._home.fds.pinned(self) as fd:
                await trio.to_thread.run_sync(os.fdatasync, fd)
            await trio.to_thread.run_sync(self._persist, snapshot, meta)
            if meta is not None:
                self.meta = meta
                self._meta_dirty = False
                if newly_complete:
                    log.info("%s: complete on disk (%d bytes)", self.name, self.size)
            self._saved_version = version

    def _persist(self, bitmap: bytes, meta: CacheMeta | None) -> None:
        """Write the bitmap (and the metadata) atomically (in a worker thread)."""
        with self._home.opened_entry(self.key) as entry:
            safe_fs.atomic_write(BITMAP_NAME, bitmap, dir_fd=entry)
            if meta is not None:
                safe_fs.atomic_write(META_NAME, encode_meta(meta), dir_fd=entry)

    def close(self) -> None:
        """Release the data file descriptor (after a final `save`)."""
        self._home.fds.close(self)


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int, length: int) -> None:
    """``pwrite`` all of *data* at *offset* (any thread). On a full disk the space the part
    written took is given back: nothing claims those bytes (their bits are not set), and
    otherwise not even a bitmap save would fit."""
    view = memoryview(data)
    position = offset
    try:
        while view:
            written = os.pwrite(fd, view, position)
            view = view[written:]
            position += written
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            punch_hole(fd, offset, length)
        raise


def _drop_bytes(fd: int, size: int, whole: bool, runs: list[tuple[int, int]]) -> None:
    """Free the disk space of byte ranges *runs* of a data file (any thread); *whole*: every
    byte, by truncating the file to nothing and back to its size."""
    if whole:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        return
    for start, end in runs:
        punch_hole(fd, start, end - start)


def _block_runs(blocks: BitMap) -> Iterator[tuple[int, int]]:
    """Runs ``[first, end)`` of consecutive blocks in *blocks*."""
    if blocks:
        yield from runs(blocks, blocks.min(), blocks.max() + 1)
