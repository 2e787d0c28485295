"""End-to-end verification: files whose digests are known are hashed as their bytes arrive.

A digest comes from a ``sha256=`` line in urls.txt, a checksum file a directory source names or
lists (``SHA256SUMS``), or a bucket's single-part ETag (`ETAG_MD5`). The `Verifier` hashes a
file's *contiguous prefix* from the cache as it grows (whoever stored the blocks: a reader,
readahead, prefetch, the idle fill), in worker threads (hashlib releases the GIL), so a file
read to its end is checked moments after its last block arrives, and the event loop never
hashes. Only whole files can be verified: a read of part of a file gets those bytes
unverified (the README says so).

What a result does:

- **Match**: the file is verified (``user.remotefs.verified`` = the algorithm, ``status``).
- **First mismatch**: logged with both digests; the cached copy is dropped and fetched again
  at once (a corrupt transfer or a bad disk block is the likely cause). The read that reached
  the end of the file fails (EIO, `IntegrityMismatch`): the bytes its program got are suspect.
- **Second mismatch** (of the refetched copy): reads of this version fail from then on, at any
  offset (the kernel's cached pages of it are dropped too), and it is logged once. A new version
  at the origin, or new digests (a reload, a new ``SHA256SUMS``), start over. Exception: when
  only an ETag's MD5 disagrees twice, the ETag was not an MD5 of the content after all (S3
  objects encrypted with SSE-KMS or SSE-C have such ETags, indistinguishable from an MD5): the
  file is served, marked ``none``, and a warning says why.

Hashing reads bytes the bitmap claims. An eviction clears bits before it punches holes, so a
chunk is used only when no eviction of its file began while it was read (`CachedFile.evictions`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ..config.manifest import Digests
from .cached_file import CachedFile
from .fetcher import ReadError

log = logging.getLogger(__name__)

#: The algorithm of an MD5 read from an S3 ETag: checked, but never trusted to fail a file.
ETAG_MD5 = "etag-md5"
_HASHES: dict[str, Callable[[], Any]] = {
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
    "md5": hashlib.md5,
    ETAG_MD5: hashlib.md5,
}
#: Bytes read and hashed per worker-thread call.
CHUNK = 4 << 20
#: The prefix is hashed once it grew by this much (or reached the end of the file).
STEP = 8 << 20
#: Runs a whole read's final read may need (a run is cut short by an eviction racing it).
READ_ATTEMPTS = 4

#: What ``user.remotefs.verified`` and status say.
VERIFIED_NONE = "none"  # no digest known (or an ETag that turned out not to be an MD5)
VERIFIED_PENDING = "pending"  # a digest is known; the file is not complete (or not hashed yet)
VERIFIED_MISMATCH = "mismatch"


class IntegrityMismatch(ReadError):
    """The file's bytes do not have the digest they must have (EIO, a 502, IntegrityError)."""


@dataclass(frozen=True, slots=True)
class VerifyStatistics:
    verified: int  # files whose bytes matched their digests (this run)
    mismatches: int  # mismatches seen (each refetch included)
    failed: int  # files whose reads fail: their refetched copy did not match either


class _Progress:
    """One version's hashing: the hash objects, how far they got, what came of it."""

    def __init__(self, digests: Digests) -> None:
        self.digests = digests
        self.hashers = {algorithm: _HASHES[algorithm]() for algorithm, _ in digests}
        self.upto = 0
        self.running = False
        self.idle = trio.Event()  # set when a run ends (with a result or not)
        self.idle.set()
        self.result: str | None = None  # an algorithm, VERIFIED_NONE or VERIFIED_MISMATCH
        self.settled = trio.Event()  # set when *result* is

    def start(self) -> None:
        self.running = True
        self.idle = trio.Event()

    def stop(self) -> None:
        self.running = False
        self.idle.set()

    def restart(self) -> None:
        self.hashers = {algorithm: _HASHES[algorithm]() for algorithm, _ in self.digests}
        self.upto = 0


class Verifier:
    """Hashes files with known digests; `check_read` holds the read that ends a file until
    its result is known."""

    def __init__(
        self,
        spawn: Callable[..., None],
        drop: Callable[[CachedFile], Awaitable[int]],
        refetch: Callable[[CachedFile], Awaitable[None]],
        discard_pages: Callable[[CachedFile], Awaitable[None]],
        complete: Callable[[CachedFile], Awaitable[None]],
    ) -> None:
        self._spawn = spawn
        self._drop = drop
        self._refetch = refetch
        self._discard_pages = discard_pages
        self._complete = complete
        self._digests: dict[str, Digests] = {}
        # Per version, and weak: a version nothing holds any more is forgotten with it.
        self._progress: weakref.WeakKeyDictionary[CachedFile, _Progress] = (
            weakref.WeakKeyDictionary()
        )
        #: Mismatches per version (one refetch, then the file fails).
        self._mismatches: weakref.WeakKeyDictionary[CachedFile, int] = weakref.WeakKeyDictionary()
        self._failed: weakref.WeakSet[CachedFile] = weakref.WeakSet()
        self._verified = 0
        self._mismatch_count = 0

    # -- what is known ---------------------------------------------------------------------------

    def set_digests(self, url_digests: Mapping[str, Digests]) -> None:
        """The digests of every URL now; files whose digests changed start over."""
        self._digests = {url: digests for url, digests in url_digests.items() if digests}
        for cached in list(self._progress):
            if self._progress[cached].digests != self._digests.get(cached.meta.url, ()):
                del self._progress[cached]
                self._mismatches.pop(cached, None)
                self._failed.discard(cached)
                self.stored(cached)

    def add_digests(self, url: str, digests: Digests) -> None:
        """The digests of one more URL (the library opens URLs one by one)."""
        if self._digests.get(url) != digests:
            self.set_digests({**self._digests, url: digests})

    def digests(self, cached: CachedFile) -> Digests:
        return self._digests.get(cached.meta.url, ())

    def state(self, cached: CachedFile) -> str:
        """``sha256`` (verified with it), ``pending``, ``mismatch`` or ``none``."""
        if cached in self._failed:
            return VERIFIED_MISMATCH
        digests = self.digests(cached)
        if not digests or not cached.cacheable:
            return VERIFIED_NONE
        if cached.size == 0:  # nothing ever arrives, nothing is ever read: judged as it is
            empty = all(_HASHES[algorithm]().hexdigest() == hex for algorithm, hex in digests)
            return _strongest(digests) if empty else VERIFIED_MISMATCH
        progress = self._progress.get(cached)
        if progress is None or progress.result is None:
            return VERIFIED_PENDING
        return progress.result

    def statistics(self) -> VerifyStatistics:
        return VerifyStatistics(self._verified, self._mismatch_count, len(self._failed))

    # -- hashing as blocks arrive ----------------------------------------------------------------

    def stored(self, cached: CachedFile) -> None:
        """Blocks of *cached* were stored: hash its prefix further when it grew enough."""
        digests = self.digests(cached)
        if not digests or cached.retired or not cached.cacheable:
            return
        progress = self._progress.get(cached)
        if progress is None or progress.digests != digests:
            progress = self._progress[cached] = _Progress(digests)
        if progress.running or progress.result is not None:
            return
        prefix = _prefix_end(cached, progress.upto)
        if prefix >= cached.size or prefix - progress.upto >= STEP:
            progress.start()
            self._spawn(self._hash, cached, progress)

    async def _hash(self, cached: CachedFile, progress: _Progress, again: bool = True) -> None:
        """Hash the present prefix from where the last run stopped; judge a whole file.

        The caller marked *progress* running. *again*: when the prefix grew meanwhile, start
        another run (a reader that runs this itself decides that on its own).
        """
        try:
            while not cached.retired and self._progress.get(cached) is progress:
                end = min(_prefix_end(cached, progress.upto), progress.upto + CHUNK)
                if end <= progress.upto:
                    break
                try:
                    hashed = await self._hash_chunk(cached, progress, end)
                except OSError as err:  # the data file could not be read: start again later
                    log.warning("%s: could not read it to verify it: %s", cached.name, err)
                    hashed = False
                if not hashed:
                    progress.restart()  # an eviction raced the read: start again later
                    break
                if progress.upto >= cached.size:
                    self._judge(cached, progress)
                    return
        finally:
            progress.stop()
        if again and progress.result is None and _prefix_end(cached, 0) >= cached.size:
            self.stored(cached)  # more arrived meanwhile

    async def _hash_chunk(self, cached: CachedFile, progress: _Progress, end: int) -> bool:
        """Hash bytes ``[upto, end)`` in a worker thread; False when an eviction raced it."""
        evictions = cached.evictions
        start = progress.upto
        copies = {algorithm: hasher.copy() for algorithm, hasher in progress.hashers.items()}
        async with cached.pinned_fd() as fd:
            await trio.to_thread.run_sync(_hash_range, fd, start, end, list(copies.values()))
        first, last = start // cached.block_size, -(-end // cached.block_size)
        if cached.evictions != evictions or not cached.has_blocks(first, last):
            return False
        if self._progress.get(cached) is not progress or progress.upto != start:
            return False
        progress.hashers = copies
        progress.upto = end
        return True

    def _judge(self, cached: CachedFile, progress: _Progress) -> None:
        """Compare a whole file's digests and act on the result. Never awaits: it may run in
        the read that ends the file, which must answer before anything that waits for it."""
        wrong = [
            (algorithm, expected, progress.hashers[algorithm].hexdigest())
            for algorithm, expected in progress.digests
            if progress.hashers[algorithm].hexdigest() != expected
        ]
        if not wrong:
            progress.result = _strongest(progress.digests)
            self._verified += 1
            log.info("%s: verified (%s)", cached.name, progress.result)
            progress.settled.set()
            return
        self._mismatch_count += 1
        shown = "; ".join(f"{a}: expected {e}, got {g}" for a, e, g in wrong)
        count = self._mismatches[cached] = self._mismatches.get(cached, 0) + 1
        if count == 1:
            log.warning(
                "%s: the downloaded bytes do not match their digest (%s); dropping the cached"
                " copy and fetching it again",
                cached.name,
                shown,
            )
            progress.result = VERIFIED_MISMATCH
            progress.settled.set()  # the read that ended the file fails
            self._spawn(self._refetch_once, cached)
            return
        if all(algorithm == ETAG_MD5 for algorithm, _, _ in wrong):
            log.warning(
                "%s: its ETag is not an MD5 of its bytes (S3 SSE-KMS/SSE-C objects have such"
                " ETags); served unverified",
                cached.name,
            )
            progress.result = VERIFIED_NONE
            progress.settled.set()
            return
        log.error(
            "%s: the origin's bytes do not match their digest twice (%s); reads of this file"
            " fail until the origin or the digest changes",
            cached.name,
            shown,
        )
        self._failed.add(cached)
        progress.result = VERIFIED_MISMATCH
        progress.settled.set()
        # The kernel may hold pages of the first part. Not awaited here: this may run in the
        # read that ends the file, and the kernel's invalidation waits for that read's pages.
        self._spawn(self._discard_pages, cached)

    async def _refetch_once(self, cached: CachedFile) -> None:
        """After a first mismatch: hash anew, drop the copy, download the whole file again.

        The new hashing starts before the drop: blocks that readers fetch meanwhile are
        hashed into it (a run that read dropped bytes is discarded, `evictions`), and once
        the refetch is done it is kicked again, in case readers brought every block first.
        """
        self._progress[cached] = _Progress(self.digests(cached))
        await self._drop(cached)
        await self._discard_pages(cached)
        await self._refetch(cached)
        self.stored(cached)

    # -- reads -----------------------------------------------------------------------------------

    def check_failed(self, cached: CachedFile) -> None:
        """Reads of a file whose refetched copy did not match fail at once."""
        if cached in self._failed:
            raise IntegrityMismatch(
                f"{cached.name}: its bytes do not match their digest (checked twice)"
            )

    async def check_read(self, cached: CachedFile, offset: int, length: int, whole: bool) -> None:
        """A read that reached the end of a file read *whole* (from its start, by one handle)
        waits for the file's verdict, so the program sees EIO before it sees EOF.

        The file is completed first: a kernel's readahead may have asked for the end while
        earlier parts are still arriving. A read of the end alone (``unzip -l``) is not held.
        Each attempt either waits for a background run or hashes here; an eviction racing
        every one of them is a `ReadError`, never a hang.
        """
        if offset + length < cached.size or not self.digests(cached) or not cached.cacheable:
            return
        if not whole:  # a part of the file: served unverified (hashed in the background)
            self.stored(cached)
            return
        for _ in range(READ_ATTEMPTS):
            progress = self._progress.get(cached)
            if progress is not None and progress.result is not None:
                break
            if progress is not None and progress.running:
                await progress.idle.wait()  # a background run: its verdict, or a stop
                continue
            if not cached.complete:
                await self._complete(cached)  # in flight, or evicted meanwhile
            progress = self._progress.get(cached)
            if progress is None or progress.digests != self.digests(cached):
                progress = self._progress[cached] = _Progress(self.digests(cached))
            if progress.result is None and not progress.running:
                progress.start()
                await self._hash(cached, progress, again=False)  # this reader's own run
        else:
            raise ReadError(f"{cached.name}: could not be verified (its blocks kept going)")
        self.check_failed(cached)
        if progress.result == VERIFIED_MISMATCH:
            raise IntegrityMismatch(
                f"{cached.name}: its bytes do not match their digest; fetching it again"
            )


def _strongest(digests: Digests) -> str:
    names = [algorithm for algorithm, _ in digests]
    for algorithm in ("sha512", "sha256", "md5"):
        if algorithm in names:
            return algorithm
    return "md5"  # an ETag's


def _prefix_end(cached: CachedFile, start: int) -> int:
    """The end (bytes) of the run of present blocks that begins at byte *start*."""
    first = start // cached.block_size
    if first >= cached.nblocks:
        return cached.size
    if first not in cached.bitmap:
        return start
    low, high = first + 1, cached.nblocks  # the run covers [first, low); find the largest
    while low < high:
        middle = (low + high + 1) // 2
        if cached.has_blocks(first, middle):
            low = middle
        else:
            high = middle - 1
    return min(low * cached.block_size, cached.size)


def _hash_range(fd: int, start: int, end: int, hashers: list[Any]) -> None:
    """Feed bytes ``[start, end)`` of *fd* to every hasher (in a worker thread)."""
    position = start
    while position < end:
        data = os.pread(fd, min(1 << 20, end - position), position)
        if not data:
            raise OSError(f"short read at {position}")
        for hasher in hashers:
            hasher.update(data)
        position += len(data)
