"""A bounded set of open data-file descriptors: least recently used closed first.

A mount lists up to hundreds of thousands of files, and systemd gives a service 1,024
descriptors by default. Holding one descriptor per listed file made a list of about 1,010
URLs fail to mount. Here a data file is opened when it is read or written and stays open
while it is in use; when more than `capacity` are open, the least recently used one that is
not pinned (an fsync in a worker thread holds a pin) is closed.

When the process runs out of descriptors anyway (EMFILE, or ENFILE for the whole system),
half of the idle ones are closed and the open is tried once more. If it still fails, the
caller gets the OSError: a read answers EIO, and nothing is ever taken for a damaged cache.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

log = logging.getLogger(__name__)

#: Descriptors kept free for everything else: sockets, /dev/fuse, the log, pipes, threads.
BASE_RESERVE = 96
#: More than this many open data files gains nothing (the kernel's page cache does the rest).
MAX_CAPACITY = 4096
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


class DataFileOwner(Protocol):
    """What owns one cache data file: it knows how to open it (creating it if need be)."""

    def open_data(self) -> int: ...


@dataclass(frozen=True)
class FdCacheStatistics:
    """A snapshot for `remotefs status`."""

    open: int
    capacity: int
    pinned: int
    closed_for_room: int
    out_of_descriptors: int


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the (soft, hard) now in force.

    Many shells and systemd start programs with a soft limit of 1,024 and a much higher hard
    one; a daemon may take the difference without asking anyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def capacity_for(soft_limit: int, connections: int) -> int:
    """How many data files may be open at once under *soft_limit* descriptors."""
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_CAPACITY
    spare = soft_limit - BASE_RESERVE - connections
    return max(8, min(MAX_CAPACITY, spare))


class FdCache:
    """Open data-file descriptors by owner, at most *capacity* of them (one per daemon)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._fds: OrderedDict[DataFileOwner, int] = OrderedDict()
        self._pins: dict[DataFileOwner, int] = {}
        #: Owners closed while pinned: their descriptor goes when the last pin is released.
        self._doomed: dict[DataFileOwner, int] = {}
        #: Owners whose data file a worker thread is opening now (`apinned`).
        self._opening: dict[DataFileOwner, trio.Event] = {}
        self._closed_for_room = 0
        self._out_of_descriptors = 0

    def fd(self, owner: DataFileOwner) -> int:
        """The open descriptor of *owner*'s data file, opening it if need be (may raise)."""
        fd = self._fds.get(owner)
        if fd is not None:
            self._fds.move_to_end(owner)
            return fd
        fd = self._open(owner.open_data)
        self._fds[owner] = fd
        self._trim(self.capacity)
        return fd

    def _open(self, opener: Callable[[], int]) -> int:
        try:
            return opener()
        except OSError as err:
            self._make_room_after(err)
            return opener()

    def _make_room_after(self, err: OSError) -> None:
        """Close half the idle descriptors after *err* said there were none left; or raise it."""
        if err.errno not in _OUT_OF_FDS:
            raise err
        self._out_of_descriptors += 1
        idle = len(self._fds) - len(self._pins)
        log.warning(
            "out of file descriptors (%s); closing %d idle cache files and trying again",
            err.strerror,
            max(1, idle // 2),
        )
        self._trim(len(self._fds) - max(1, idle // 2))

    def _trim(self, keep: int) -> None:
        """Close least recently used unpinned descriptors until at most *keep* are open."""
        if len(self._fds) <= keep:
            return
        for owner in list(self._fds):
            if len(self._fds) <= keep:
                return
            if owner in self._pins:
                continue
            os.close(self._fds.pop(owner))
            self._closed_for_room += 1

    @contextlib.contextmanager
    def pinned(self, owner: DataFileOwner) -> Iterator[int]:
        """*owner*'s descriptor, kept open until the block ends (for work across awaits)."""
        fd = self.fd(owner)
        self._pins[owner] = self._pins.get(owner, 0) + 1
        try:
            yield fd
        finally:
            self._unpin(owner)

    @contextlib.asynccontextmanager
    async def apinned(self, owner: DataFileOwner) -> AsyncIterator[int]:
        """`pinned`, but a descriptor not open yet is opened in a worker thread.

        The first open of a data file creates its cache entry (an atomic metadata write with
        two fsyncs): the event loop must not wait for that. One open per owner at a time:
        other callers wait for it instead of creating the entry twice.
        """
        while owner not in self._fds:
            opening = self._opening.get(owner)
            if opening is not None:
                await opening.wait()
                continue
            self._opening[owner] = opening = trio.Event()
            try:
                try:
                    fd = await trio.to_thread.run_sync(owner.open_data)
                except OSError as err:
                    self._make_room_after(err)  # on this thread: it closes descriptors
                    fd = await trio.to_thread.run_sync(owner.open_data)
            finally:
                del self._opening[owner]
                opening.set()
            self._fds[owner] = fd
            self._trim(self.capacity)
        self._fds.move_to_end(owner)
        fd = self._fds[owner]
        self._pins[owner] = self._pins.get(owner, 0) + 1
        try:
            yield fd
        finally:
            self._unpin(owner)

    def _unpin(self, owner: DataFileOwner) -> None:
        count = self._pins.pop(owner) - 1
        if count:
            self._pins[owner] = count
        elif owner in self._doomed:
            os.close(self._doomed.pop(owner))

    def close(self, owner: DataFileOwner) -> None:
        """Close *owner*'s descriptor now (or when its last pin is released)."""
        fd = self._fds.pop(owner, None)
        if fd is None:
            return
        if owner in self._pins:
            self._doomed[owner] = fd
        else:
            os.close(fd)

    def is_open(self, owner: DataFileOwner) -> bool:
        """True while *owner* has a descriptor in the cache."""
        return owner in self._fds

    def close_all(self) -> None:
        """Close every descriptor (at shutdown, after every save)."""
        for owner in list(self._fds):
            self.close(owner)

    def statistics(self) -> FdCacheStatistics:
        return FdCacheStatistics(
            open=len(self._fds),
            capacity=self.capacity,
            pinned=len(self._pins),
            closed_for_room=self._closed_for_room,
            out_of_descriptors=self._out_of_descriptors,
        )
