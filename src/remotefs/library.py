"""remotefs as a Python library: remote files as file objects, over the same engine as a mount.

    import remotefs

    with remotefs.open(url) as f:                      # binary, seekable, like open(path, "rb")
        zipfile.ZipFile(f).namelist()
        piece = f.pread(4096, 1 << 30)                # positional; safe from many threads

    async with remotefs.aopen(url) as f:               # under trio or asyncio
        head = await f.read(100)

    with remotefs.Cache(cache_dir) as cache:           # one engine for many files
        f = cache.open(url)
        cache.prefetch(url, progress=print)
        cache.evict(url); cache.status()

No FUSE is needed: nothing here imports pyfuse3. A `Cache` runs the engine (`RemoteCache`) on
a trio event loop of its own, in one background thread, so that one engine (one connection
pool, one background fill, one single-flight registry) serves every file object, thread and
event loop of the program. Synchronous calls wait for the engine's answer; the async API
waits without blocking the caller's loop (trio or asyncio, found with sniffio).

A cache directory is used by one process at a time (a mount's daemon counts); a second one
gets `CacheInUseError`, which names the holder's pid. Within one process, every
`remotefs.open` of the same directory shares one `Cache`. The default directory,
``$XDG_CACHE_HOME/remotefs-python`` (``~/.cache/remotefs-python``), is not the mount's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import sniffio
import trio

from ._exceptions import (
    CacheInUseError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    RemoteChangedError,
    RemoteFsError,
    UrlError,
)
from .cache.cached_file import CachedFile
from .cache.engine import Handle, RemoteCache
from .cache.fetcher import ReadError
from .cache.store import CacheDirError
from .cache.verify import IntegrityMismatch
from .config.manifest import (
    Digests,
    HeaderError,
    ManifestError,
    digest_problem,
    header_pair,
    parse_manifest_text,
)
from .config.settings import LIBRARY, options_from_keywords
from .http.errors import HttpSourceError, PermanentError
from .listings.walk import ListedFile, Walk
from .redact import redact_url

T = TypeVar("T")

#: How long a `Cache` waits for another process to release its directory before it fails
#: with `CacheInUseError` (a program that just closed it may still be saving).
LOCK_WAIT = 1.0

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The library's own cache directory (not the mount's: each holds its own lock)."""
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "remotefs-python"
    return Path(os.path.expanduser("~")) / ".cache" / "remotefs-python"


@dataclass(frozen=True)
class FileStatus:
    """What the cache holds of one URL (`Cache.status`)."""

    url: str  # redacted: query and userinfo hidden
    size: int
    cached_bytes: int
    complete: bool
    #: When its origin last confirmed this version (seconds since the epoch; 0: never).
    validated_at: float
    #: The reason it is served uncached, or None.
    uncached: str | None
    #: Why its last download failed, or None.
    error: str | None


# -- the engine's thread --------------------------------------------------------------------------


class _EngineThread:
    """One `RemoteCache` on a trio loop in a background thread; calls are sent to it."""

    def __init__(self, engine: RemoteCache) -> None:
        self.engine = engine
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="remotefs-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as err:  # reported to the caller of the constructor
            if not self._ready.is_set():
                self._error = err
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        try:
            async with self.engine, trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except CacheDirError as err:
            self._error = _cache_error(err)
            self._ready.set()

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the engine's loop; its result or error comes in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        token, nursery = self._token, self._nursery
        if token is None or nursery is None or not self._thread.is_alive():
            future.set_exception(RemoteFsError("the cache is closed"))
            return future

        async def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(await fn(*args))
            except trio.Cancelled:
                future.set_exception(RemoteFsError("the cache was closed during the call"))
                raise
            except BaseException as err:
                future.set_exception(err)

        try:
            token.run_sync_soon(nursery.start_soon, job)
        except trio.RunFinishedError:
            future.set_exception(RemoteFsError("the cache is closed"))
        return future

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's loop and wait for it (from any other thread)."""
        if threading.current_thread() is self._thread:
            raise RemoteFsError("a blocking remotefs call from inside the engine's own thread")
        return self.submit(fn, *args).result()

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's loop; await it from trio or asyncio, not blocking."""
        future = self.submit(fn, *args)
        library = sniffio.current_async_library()
        if library == "asyncio":
            return await asyncio.wrap_future(future)
        if library != "trio":
            raise RemoteFsError(f"remotefs.aopen works under trio and asyncio, not {library}")
        caller = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                caller.run_sync_soon(done.set)

        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    def close(self) -> None:
        """Stop the engine (it saves every bitmap and the catalog) and end the thread."""
        token, stop = self._token, self._stop
        if token is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _cache_error(err: CacheDirError) -> RemoteFsError:
    text = str(err)
    if "in use by another" in text:
        return CacheInUseError(text)
    return RemoteFsError(text)


def _source_error(err: HttpSourceError) -> RemoteFsError:
    """The library's error for an engine failure (the message is already redacted)."""
    if isinstance(err, PermanentError) and err.status in (404, 410):
        return NotFoundError(str(err))
    return NetworkError(str(err))


# -- the cache -----------------------------------------------------------------------------------


class Cache:
    """One cache directory and its engine, for any number of files, threads and event loops.

    *options* are the mount's own options, by their names (`remotefs.config.settings`):
    ``block_size``, ``min_request``, ``max_connections``, ``read_deadline``,
    ``stall_timeout``, ``probe_timeout``, ``readahead_max``, ``prefetch_tail``,
    ``prefetch_head``, ``fill``, ``fill_idle``, ``fill_connections``, ``fill_rate``,
    ``cache_max_size``, ``min_free``, ``revalidate``, ``revalidate_wait``, ``proxy``,
    ``http2``, ``ca_bundle``, ``insecure``, ``user_agent``, ... Sizes may be given as text
    (``"64K"``). *headers* go with every request; `open` takes more for one URL.

    Use it as a context manager, or call `close`: closing saves the download progress, so
    another process (or a mount of the same directory) reuses it for free.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        **options: Any,
    ) -> None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        try:
            self.options = options_from_keywords(
                options,
                LIBRARY,
                cache_dir=root.absolute(),
                headers=_headers(headers),
            )
        except ValueError as err:
            raise UrlError(str(err)) from None
        engine = RemoteCache(self.options)
        engine.lock_wait = LOCK_WAIT
        self._thread = _EngineThread(engine)
        self._closed = False
        self._names: dict[str, str] = {}

    # -- life --------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Save progress and stop the engine; open files of this cache stop working."""
        if not self._closed:
            self._closed = True
            self._thread.close()
            _forget(self)

    @property
    def engine(self) -> RemoteCache:
        return self._thread.engine

    # -- files -------------------------------------------------------------------------------

    def open(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        sha256: str | None = None,
    ) -> RemoteFile:
        """A binary, seekable, read-only file object of *url* (raises NotFoundError, ...).

        With *sha256* (hex), a read that reaches the end of the file raises `IntegrityError`
        when the file's bytes do not have that digest (after one fresh download).
        """
        handle = self._thread.call(self._open, url, _headers(headers), _digests(sha256))
        return RemoteFile(self, handle, url)

    def aopen(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        sha256: str | None = None,
    ) -> _AsyncOpening:
        """``async with cache.aopen(url) as f``: the async file object of *url*."""
        return _AsyncOpening(lambda: self, url, _headers(headers), _digests(sha256), owned=False)

    async def _open(
        self, url: str, headers: tuple[tuple[str, str], ...], digests: Digests = ()
    ) -> Handle:
        if digests:
            self.engine.verifier.add_digests(_checked_url(url), digests)
        cached = await self._file(url, headers)
        await self.engine.ensure_fresh(cached)
        cached = self.engine.file(url) or cached  # a revalidation may have swapped it
        return self.engine.open(cached)

    async def _file(self, url: str, headers: tuple[tuple[str, str], ...] = ()) -> CachedFile:
        url = _checked_url(url)
        if headers:
            self.engine.source.add_headers(url, headers)
        name = self._names.setdefault(url, redact_url(url))
        try:
            return await self.engine.get(url, name)
        except HttpSourceError as err:
            raise _source_error(err) from None

    def prefetch(self, url: str, progress: Callable[[int, int], None] | None = None) -> None:
        """Download *url* completely now (SmartRemote's Complete); *progress(cached, size)* is
        called as it goes (from the engine's thread)."""
        self._thread.call(self._prefetch, url, progress)

    async def _prefetch(self, url: str, progress: Callable[[int, int], None] | None) -> None:
        cached = await self._file(url)
        try:
            await self.engine.complete(cached, progress)
        except (HttpSourceError, ReadError, OSError) as err:
            raise NetworkError(str(err)) from None

    def listdir(
        self,
        url: str,
        *,
        depth: int = 1,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> list[ListedFile]:
        """The files a server lists under the directory *url* (a URL ending in ``/``).

        nginx, Apache, lighttpd, Caddy and ``python3 -m http.server`` listings, any plain page
        of links, nginx's and Caddy's JSON, and S3/GCS buckets (path-style URLs), *depth*
        levels down (1 to 8), files selected by shell patterns on their names. Each
        `ListedFile` has the file's URL (open it with `open`), its path below *url*, and its
        size where the listing is exact (JSON, buckets). *headers* go with every listing
        request. A directory below *url* that cannot be listed is left out and logged; when
        *url* itself cannot be, `NetworkError`.
        """
        if not url.endswith("/"):
            raise UrlError(f"a directory URL ends in '/': {redact_url(url)}")
        checked = _headers(headers)
        if checked:
            self._thread.call(self._set_headers, url, checked)
        found = self._thread.call(self._list_directory, url, depth, tuple(include), tuple(exclude))
        if found.problems and not found.files and found.problems[0].startswith(redact_url(url)):
            raise NetworkError(found.problems[0])
        for problem in found.problems:
            log.warning("listing %s", problem)
        return found.files

    async def _set_headers(self, url: str, headers: tuple[tuple[str, str], ...]) -> None:
        self.engine.source.add_headers(url, headers)

    async def _list_directory(
        self, url: str, depth: int, include: tuple[str, ...], exclude: tuple[str, ...]
    ) -> Walk:
        try:
            return await self.engine.list_directory(
                url, depth=depth, include=include, exclude=exclude
            )
        except HttpSourceError as err:
            raise NetworkError(str(err)) from None

    def save(self) -> None:
        """Persist download progress now (SmartRemote's SavePart); also done every few seconds."""
        self._thread.call(self.engine.save)

    def evict(self, url: str) -> int:
        """Drop what is cached of *url*; the bytes dropped. Refused while a file object of it
        is open (`RemoteFsError`)."""
        return self._thread.call(self._evict, url)

    async def _evict(self, url: str) -> int:
        cached = self.engine.file(_checked_url(url))
        if cached is None:
            return 0
        try:
            return await self.engine.evict(cached)
        except ValueError as err:
            raise RemoteFsError(str(err)) from None

    def status(self) -> list[FileStatus]:
        """What the cache holds of every URL this cache has opened."""
        return self._thread.call(self._status)

    async def _status(self) -> list[FileStatus]:
        rows = []
        for cached in self.engine.files():
            error = cached.stats.last_error if cached._stats is not None else None
            rows.append(
                FileStatus(
                    url=redact_url(cached.remote.url),
                    size=cached.size,
                    cached_bytes=cached.cached_bytes,
                    complete=cached.complete,
                    validated_at=cached.validated_at,
                    uncached=cached.uncached_reason,
                    error=error,
                )
            )
        return rows


def _checked_url(url: str) -> str:
    """*url* if it can be requested (the urls.txt rules), else `UrlError` naming the problem."""
    if not isinstance(url, str) or not url or any(ch in url for ch in "\n\r"):
        raise UrlError(f"not a URL: {redact_url(str(url))!r}")
    try:
        entries = parse_manifest_text(url.replace(" ", "%20"), "url", reserved=frozenset())
    except ManifestError as err:
        raise UrlError(err.reason) from None
    if entries[0].directory is not None:
        raise UrlError(
            f"{redact_url(url)} is a directory (it ends in '/'): list its files with"
            " Cache.listdir(url), then open one of them"
        )
    return entries[0].url


def _digests(sha256: str | None) -> Digests:
    """``sha256=`` of `open`: checked like a urls.txt line's."""
    if sha256 is None:
        return ()
    problem = digest_problem("sha256", sha256) if isinstance(sha256, str) else "not a str"
    if problem is not None:
        raise UrlError(f"sha256: {problem}")
    return (("sha256", sha256.lower()),)


def _headers(
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...]:
    if not headers:
        return ()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    checked = []
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise UrlError(f"headers must be a mapping or (name, value) pairs, not {pair!r}")
        try:
            checked.append(header_pair(*pair))
        except HeaderError as err:
            raise UrlError(str(err)) from None
    return tuple(checked)


# -- one shared cache per directory, for remotefs.open ---------------------------------------------

_shared: dict[Path, tuple[Cache, int]] = {}
_shared_lock = threading.Lock()


def _acquire(cache_dir: str | os.PathLike[str] | None, options: dict[str, Any]) -> Cache:
    root = Path(os.path.abspath(cache_dir if cache_dir is not None else default_cache_dir()))
    with _shared_lock:
        found = _shared.get(root)
        if found is not None:
            cache, count = found
            wanted = options_from_keywords(
                options, LIBRARY, cache_dir=root, headers=cache.options.headers
            )
            if wanted != cache.options:
                raise RemoteFsError(
                    f"{root} is already open in this process with other options; use one"
                    " remotefs.Cache for both"
                )
            _shared[root] = (cache, count + 1)
            return cache
        cache = Cache(root, **options)
        _shared[root] = (cache, 1)
        return cache


def _release(cache: Cache) -> None:
    with _shared_lock:
        root = cache.options.cache_dir
        found = _shared.get(root)
        if found is None or found[0] is not cache:
            return
        count = found[1] - 1
        if count:
            _shared[root] = (cache, count)
            return
        del _shared[root]
    cache.close()


def _forget(cache: Cache) -> None:
    with _shared_lock:
        found = _shared.get(cache.options.cache_dir)
        if found is not None and found[0] is cache:
            del _shared[cache.options.cache_dir]


def open(
    url: str,
    cache_dir: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    sha256: str | None = None,
    **options: Any,
) -> RemoteFile:
    """A binary, seekable, read-only file object of *url*, cached in *cache_dir*.

    Closing it releases its cache (shared with other `remotefs.open` of the same directory in
    this process) and saves the download progress when the last one closes. With *sha256*,
    reading to the end raises `IntegrityError` when the bytes do not have that digest.
    """
    digests = _digests(sha256)
    cache = _acquire(cache_dir, options)
    try:
        handle = cache._thread.call(cache._open, url, _headers(headers), digests)
    except BaseException:
        _release(cache)
        raise
    return RemoteFile(cache, handle, url, owned=True)


def aopen(
    url: str,
    cache_dir: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    sha256: str | None = None,
    **options: Any,
) -> _AsyncOpening:
    """``async with remotefs.aopen(url) as f``: the async file object of *url* (trio, asyncio)."""
    return _AsyncOpening(
        lambda: _acquire(cache_dir, options),
        url,
        _headers(headers),
        _digests(sha256),
        owned=True,
    )


# -- file objects --------------------------------------------------------------------------------


class _Reader:
    """What both file objects share: the handle, the position, and the error translation."""

    def __init__(self, cache: Cache, handle: Handle, url: str, owned: bool) -> None:
        self._cache = cache
        self._handle = handle
        self.url = url
        self._owned = owned
        self._position = 0
        self._open = True

    @property
    def size(self) -> int:
        """The remote file's size in bytes."""
        return self._handle.file.size

    def _span(self, size: int | None, offset: int) -> int:
        if not self._open:
            raise ValueError("I/O operation on closed file")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if size is None or size < 0:
            return max(0, self.size - offset)
        return size

    async def _read_at(self, size: int, offset: int) -> bytes:
        if size == 0 or offset >= self.size:
            return b""
        try:
            return await self._cache.engine.read(self._handle, offset, size)
        except IntegrityMismatch as err:
            raise IntegrityError(str(err)) from None
        except ReadError as err:
            file = self._handle.file
            if file.retired or self._cache.engine.changing(file):
                raise RemoteChangedError(str(err)) from None
            raise NetworkError(str(err)) from None
        except OSError as err:
            raise NetworkError(f"local cache error: {err.strerror or err}") from None

    def _seek_to(self, offset: int, whence: int) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._position + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = target
        return target

    async def _close_handle(self) -> None:
        self._cache.engine.close(self._handle)


class RemoteFile(_Reader, io.RawIOBase):
    """A remote file as a binary, seekable, read-only file object (`remotefs.open`).

    `read`, `readinto`, `seek` and `tell` move one cursor, as a file object's do; `pread`
    reads at an offset without it and may be called from many threads at once. Every byte
    comes through the cache: a block is fetched once, whoever asks.
    """

    def __init__(self, cache: Cache, handle: Handle, url: str, owned: bool = False) -> None:
        _Reader.__init__(self, cache, handle, url, owned)
        io.RawIOBase.__init__(self)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.pread(self._span(size, self._position), self._position)
        self._position += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def pread(self, size: int, offset: int) -> bytes:
        """*size* bytes at *offset* (fewer at the end of the file), leaving the cursor alone."""
        return self._cache._thread.call(self._read_at, self._span(size, offset), offset)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._seek_to(offset, whence)

    def tell(self) -> int:
        return self._position

    def clone(self) -> RemoteFile:
        """An independent cursor on the same file version and cache."""
        handle = self._cache._thread.call(_reopen, self._cache, self._handle)
        return RemoteFile(self._cache, handle, self.url)

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(RemoteFsError):  # the cache was closed first
                self._cache._thread.call(self._close_handle)
            if self._owned:
                _release(self._cache)
        io.RawIOBase.close(self)

    @property
    def closed(self) -> bool:
        return not self._open

    def __repr__(self) -> str:
        return f"<remotefs.RemoteFile {redact_url(self.url)!r} size={self.size}>"


async def _reopen(cache: Cache, handle: Handle) -> Handle:
    return cache.engine.open(handle.file, hints=False)


class AsyncRemoteFile(_Reader):
    """A remote file for async code (`remotefs.aopen`), under trio or asyncio."""

    async def read(self, size: int | None = -1) -> bytes:
        data = await self.pread(self._span(size, self._position), self._position)
        self._position += len(data)
        return data

    async def pread(self, size: int, offset: int) -> bytes:
        """*size* bytes at *offset*, leaving the cursor alone; safe from many tasks at once."""
        return await self._cache._thread.acall(self._read_at, self._span(size, offset), offset)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._seek_to(offset, whence)

    def tell(self) -> int:
        return self._position

    def clone(self) -> AsyncRemoteFile:
        """An independent cursor on the same file version and cache (not owning it)."""
        handle = self._cache.engine.open(self._handle.file, hints=False)
        return AsyncRemoteFile(self._cache, handle, self.url, owned=False)

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(RemoteFsError):
                await self._cache._thread.acall(self._close_handle)
            if self._owned:
                await _in_thread(_release, self._cache)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class _AsyncOpening:
    """What `aopen` returns: awaitable, and an async context manager, like trio's open_file."""

    def __init__(
        self,
        get_cache: Callable[[], Cache],
        url: str,
        headers: tuple[tuple[str, str], ...],
        digests: Digests,
        owned: bool,
    ) -> None:
        self._get_cache = get_cache
        self._url = url
        self._headers = headers
        self._digests = digests
        self._owned = owned
        self._file: AsyncRemoteFile | None = None

    async def _open(self) -> AsyncRemoteFile:
        cache = await _in_thread(self._get_cache)  # starting an engine waits for its thread
        try:
            handle = await cache._thread.acall(cache._open, self._url, self._headers, self._digests)
        except BaseException:
            if self._owned:
                await _in_thread(_release, cache)
            raise
        return AsyncRemoteFile(cache, handle, self._url, self._owned)

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncRemoteFile:
        self._file = await self._open()
        return self._file

    async def __aexit__(self, *exc: object) -> None:
        if self._file is not None:
            await self._file.aclose()


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking *fn* in a worker thread of the caller's loop (trio or asyncio)."""
    if sniffio.current_async_library() == "trio":
        return await trio.to_thread.run_sync(fn, *args)
    return await asyncio.to_thread(fn, *args)


__all__ = [
    "AsyncRemoteFile",
    "Cache",
    "FileStatus",
    "RemoteFile",
    "aopen",
    "default_cache_dir",
    "open",
]
