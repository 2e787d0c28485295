"""One cached URL: a sparse data file of the full size, its block bitmap and its metadata.

Invariant that makes crashes harmless: a block's bit is set only after its bytes were written
to the data file, and a bitmap snapshot reaches disk only after the data file was fdatasync'ed.
So the bitmap on disk may *miss* blocks that are present (they are fetched again), but never
claims a block that is not.

All methods run on the trio thread. Only `save` awaits (fsync and the atomic bitmap write go
to a worker thread); everything else is synchronous, so between two awaits the bitmap and the
data file agree.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import replace
from pathlib import Path

import trio
from pyroaring import BitMap

from ..http.source import RemoteMeta
from .atomic import atomic_write
from .state_files import CacheMeta, encode_bitmap, save_meta
from .stats import TransferStats

log = logging.getLogger(__name__)

DATA_NAME = "data"
BITMAP_NAME = "bitmap"
META_NAME = "meta"


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


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


class CachedFile:
    """The local copy of one remote file, block by block."""

    def __init__(self, directory: Path, meta: CacheMeta, bitmap: BitMap, name: str) -> None:
        self.directory = directory
        self.meta = meta
        self.bitmap = bitmap
        #: How this file is named in logs: its path in the mount (never the URL's query).
        self.name = name
        self.block_size = meta.block_size
        self.nblocks = -(-meta.size // meta.block_size)
        self.remote: RemoteMeta = meta.remote()
        self._version = 0  # bumped on every bitmap change
        self._saved_version = 0
        self._meta_dirty = False
        #: Set when the origin's file changed: this object's bytes belong to an old version,
        #: nothing may be written to or read from it any more.
        self.retired = False
        #: Origin bytes, rate and last error of this session (carried over to a new version).
        self.stats = TransferStats()
        #: Set by `remotefs evict`: background fill leaves this file alone (until a prefetch).
        self.no_fill = False
        self._save_lock = trio.Lock()
        self._fd = os.open(directory / DATA_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size != meta.size:
            os.ftruncate(self._fd, meta.size)  # sparse: no disk blocks until written

    # -- queries -----------------------------------------------------------------------------

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

    # -- data --------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read present bytes from the data file (the caller checked the blocks are present)."""
        return os.pread(self._fd, size, offset)

    def write_block(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Store one whole block, then mark it present (see `write_blocks`)."""
        self.write_blocks(index, 1, data)

    def write_blocks(self, first: int, count: int, data: bytes | bytearray | memoryview) -> None:
        """Store *count* whole consecutive blocks, then mark them present.

        In that order (see module docstring): a crash between the two loses the blocks, it
        never makes the bitmap claim them.
        """
        if self.retired:
            raise FileRetiredError(f"{self.name}: the remote file changed; block not stored")
        expected = min(count * self.block_size, self.meta.size - first * self.block_size)
        if count < 1 or len(data) != expected:
            raise ValueError(f"blocks {first}+{count} of {self.name}: {len(data)} bytes")
        view = memoryview(data)
        offset = start = first * self.block_size
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                # A full disk took part of the blocks: give that space back (their bits are
                # not set, so nothing claims these bytes), or not even a bitmap save would fit.
                punch_hole(self._fd, start, expected)
            raise
        self.bitmap.add_range(first, first + count)
        self._version += 1

    def disable_ranges(self) -> None:
        """Remember that the origin ignores Range: fetch this file as one stream from now on."""
        if self.meta.accepts_ranges:
            self.meta = replace(self.meta, accepts_ranges=False)
            self.remote = self.meta.remote()
            self._meta_dirty = True
            self._version += 1

    async def retire(self) -> None:
        """Stop using this object (its file changed at the origin) and release its descriptor.

        Waits for a save in progress, so no snapshot of the old version can land on disk
        after the caller has reset the entry.
        """
        self.retired = True
        async with self._save_lock:
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
        if blocks is not None and not dropped:
            return 0
        self.bitmap -= dropped
        self._version += 1
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
        if self.retired or self._fd < 0:
            return freed
        # Only now, with no durable claim left, may the bytes go. No await from here on.
        if not self.bitmap:
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.meta.size)
            return freed
        dropped -= self.bitmap
        run_start = run_end = -1
        for block in [*dropped, -1]:
            if block == run_end:
                run_end += 1
                continue
            if run_start >= 0:
                start = run_start * self.block_size
                punch_hole(self._fd, start, min(run_end * self.block_size, self.size) - start)
            run_start, run_end = block, block + 1
        return freed

    def mark_dirty(self) -> None:
        """Force the next `save` to write the bitmap (after a conversion, say)."""
        self._version += 1

    # -- persistence -------------------------------------------------------------------------

    async def save(self) -> None:
        """Persist the bitmap (and the complete flag) if it changed since the last save.

        The snapshot is taken before fdatasync, so every block it claims was written before
        the sync: the durable bitmap never runs ahead of the durable data.
        """
        async with self._save_lock:
            if not self.dirty or self.retired:
                return
            version = self._version
            snapshot = encode_bitmap(self.bitmap)
            complete = self.complete
            await trio.to_thread.run_sync(os.fdatasync, self._fd)
            await trio.to_thread.run_sync(atomic_write, self.directory / BITMAP_NAME, snapshot)
            if (complete and not self.meta.complete) or self._meta_dirty:
                newly_complete = complete and not self.meta.complete
                self.meta = replace(self.meta, complete=complete)
                self._meta_dirty = False
                await trio.to_thread.run_sync(save_meta, self.directory / META_NAME, self.meta)
                if newly_complete:
                    log.info("%s: complete on disk (%d bytes)", self.name, self.size)
            self._saved_version = version

    def close(self) -> None:
        """Release the data file descriptor (after a final `save`)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
