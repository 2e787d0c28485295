"""The control socket of a running daemon: `remotefs status`, `prefetch`, `evict`, `reload`,
`stop`.

The daemon listens on a unix stream socket, ``CACHE_DIR/control.sock`` (mode 0600; a stale
one left by a killed daemon is replaced, since whoever holds the cache lock owns it; removed
at exit). A mount root's ``user.remotefs.control`` xattr names it, so a client needs only
the mountpoint; a daemon that only serves HTTP is found through its cache directory
(``remotefs status --cache-dir DIR``, the default directory when none is given).

The protocol is one JSON object per line each way, answered in order on one connection:

``{"cmd": "status"}``, with ``"paths": [...]`` and ``"all": true`` optional
    Per file: path, redacted URL, size, cached_bytes, percent, state (``complete``, ``partial``,
    ``filling`` while a download or a prefetch runs, ``uncached`` when the cache cannot hold it,
    ``gone at origin`` after a 404/410, ``error`` when the last download failed, with
    ``error``), validated_at (when the origin last confirmed it, seconds since the epoch),
    lifetime (seconds it stays fresh after that) and fresh, verified
    (``sha256``/``sha512``/``md5`` when its bytes matched their digest, ``pending``,
    ``mismatch``, ``none``), note (why a file is fetched as it is: the origin ignores Range, or
    it is served uncached), rate (bytes/s over the last seconds), origin_bytes (this session)
    and the outcome of the last prefetch; plus totals and a count of files per state, the
    daemon's ``mountpoint`` (null without a mount), ``listen`` (the HTTP server's addresses,
    empty without one) and ``cache_dir``. With more than `SUMMARY_THRESHOLD` files and without
    ``all``, ``files`` holds only the `SUMMARY_ROWS` files that matter most (errors, downloads
    in progress, then the largest partial ones) and ``hidden`` says how many more there are. The
    totals also describe the whole cache, whatever the paths: ``cache_used`` (cached bytes of
    every file, plus evicted bytes whose disk space is being freed), ``cache_max_size`` (``0``:
    no cap) and ``evicted_bytes`` (evicted under the cap this session). ``daemon`` holds the
    daemon's own figures: event-loop stalls, probes, open descriptors, and the free-space
    reserve with ``paused`` set while background downloads wait for room.
``{"cmd": "prefetch", "paths": [...]}``
    Starts downloading the files completely, through the fetcher's single-flight path and
    not paused by foreground reads, and answers at once; the client polls ``status``.
    Refused when the files together are larger than the cache cap.
``{"cmd": "evict", "paths": [...]}``
    Drops the files' cached blocks (refused while one is open or downloading).
``{"cmd": "stop"}``
    Begins a clean stop of the daemon, as SIGTERM does (a mount is unmounted), and answers
    at once with its ``pid``: the client waits for that process to exit.
``{"cmd": "reload"}``
    Reads urls.txt again and lists its directory sources again, as SIGHUP does (a daemon of a
    directory URL given on the command line only lists it again), and answers once the
    namespace matches it:
    ``added`` (new paths, listed now), ``removed``, ``changed`` (same path, new URL),
    ``pending`` (new paths not listed yet: their URL did not answer; tried again),
    ``revalidating`` (unchanged URLs being confirmed with their origins in the background),
    ``files`` and ``urls`` (the file read). A broken file changes nothing; its error
    (``file:line: reason``) is the answer's ``error``.

A path is relative to the mount root (the root of the URL list's paths); a directory (``""`` for
the root) selects every file under it. Files are found by their path in the mount, whatever URL
they share with others.
Every answer is ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``.
Answers carry only redacted URLs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from ..cache.cached_file import CachedFile, FileRetiredError
from ..cache.engine import RemoteCache
from ..cache.fetcher import ReadError
from ..config.manifest import ManifestError
from ..config.options import MiB
from ..fuse.tree import FileNode, Tree
from ..http.errors import HttpSourceError
from ..redact import redact_url

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
PROTOCOL_VERSION = 1
#: Longest request line.
MAX_LINE = 4 * MiB
#: Longest answer a client reads: ``status --all`` of 100,000 files is about 30 MiB.
MAX_ANSWER = 1024 * MiB
#: Longest socket path `bind`/`connect` take (sun_path is 108 bytes with its NUL).
_MAX_UNIX_PATH = 107
#: How long an eviction waits for open handles to be released and downloads to end.
EVICT_GRACE = 2.0
#: Above this many files, `status` answers with a summary unless asked for every row.
SUMMARY_THRESHOLD = 100
SUMMARY_ROWS = 20


class ControlError(Exception):
    """A request that cannot be served; the message is the client's one-line error."""


class ReloadResult(Protocol):
    """What the daemon's reload reports (`remotefs.daemon.serve.ReloadSummary`)."""

    def as_dict(self) -> dict[str, Any]: ...


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for `bind`/`connect` of the socket *path*, however long the path is.

    A path longer than sun_path is reached through ``/proc/self/fd/N`` of its directory.
    """
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


@dataclass(eq=False)
class PrefetchJob:
    """One `prefetch` of one file: running, done, or failed with an error."""

    file: CachedFile
    state: str = "running"
    error: str | None = None
    #: Why the job waits (the cache filesystem is at its free-space reserve), or None.
    paused: str | None = None


class ControlServer:
    """Answers control requests for one daemon (runs in the daemon's nursery)."""

    def __init__(
        self,
        tree: Tree,
        engine: RemoteCache,
        cache_dir: Path,
        mountpoint: Path | None,
        invalidate: Callable[[int], None],
        reload: Callable[[], Awaitable[ReloadResult]] | None = None,
        *,
        extras: Callable[[], dict[str, Any]] | None = None,
        listen: Callable[[], list[str]] | None = None,
        stop: Callable[[], None] | None = None,
    ) -> None:
        self._tree = tree
        self._engine = engine
        self._fetcher = engine.fetcher
        self.path = cache_dir / SOCKET_NAME
        self._mountpoint = mountpoint
        self._invalidate = invalidate
        self._reload = reload
        self._extras = extras
        self._listen = listen
        self._stop = stop
        self._cache_dir = cache_dir
        self._reserve = engine.reserve
        self._revalidator = engine.revalidator
        self._jobs: dict[CachedFile, PrefetchJob] = {}
        self._nursery: trio.Nursery | None = None

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled; reports the socket's path (None if it cannot listen)."""
        try:
            sock = self._bind()
        except OSError as err:
            log.warning(
                "no control socket at %s (%s): status, prefetch and evict will not work",
                self.path,
                err.strerror or err,
            )
            task_status.started(None)
            return
        inode = os.stat(self.path).st_ino
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                task_status.started(str(self.path))
                await trio.serve_listeners(self._connection, [listener], handler_nursery=nursery)
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)

    def _bind(self) -> socket.socket:
        """A listening socket at `path`, 0600 from the start, replacing a stale one."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # we hold the cache lock: no live daemon owns this socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with unix_address(self.path) as address:
                # bind creates the file; the umask makes it 0600 at once (no thread of this
                # process creates files with wider modes, so the brief umask is harmless).
                old_umask = os.umask(0o177)
                try:
                    sock.bind(address)
                finally:
                    os.umask(old_umask)
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _connection(self, stream: trio.SocketStream) -> None:
        """Answer each request line of one client, in order, until it hangs up."""
        buffer = bytearray()
        try:
            async with stream:
                while True:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        if len(buffer) > MAX_LINE:
                            await self._send(stream, _error("request line too long"))
                            return
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buffer += chunk
                        continue
                    line = bytes(buffer[:newline])
                    del buffer[: newline + 1]
                    if line.strip():
                        await self._send(stream, await self.answer(line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("control connection failed")

    @staticmethod
    async def _send(stream: trio.SocketStream, response: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(response, separators=(",", ":")).encode() + b"\n")

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The response to one request line (never raises)."""
        try:
            try:
                request = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ControlError("a request is one JSON object per line") from None
            if not isinstance(request, dict):
                raise ControlError("a request is one JSON object per line")
            paths = request.get("paths")
            if paths is not None and (
                not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)
            ):
                raise ControlError("'paths' must be a list of strings")
            command = request.get("cmd")
            if command == "status":
                return self.status(paths, every=bool(request.get("all")))
            if command == "prefetch":
                return self.prefetch(paths)
            if command == "evict":
                return await self.evict(paths)
            if command == "reload":
                return await self.reload()
            if command == "stop":
                return self.stop()
            raise ControlError(
                f"unknown command {command!r} (known: status, prefetch, evict, reload, stop)"
            )
        except ControlError as err:
            return _error(str(err))
        except Exception as err:
            log.exception("control request failed")
            return _error(f"internal error: {err}")

    # -- selecting files -----------------------------------------------------------------------

    def _select(self, paths: list[str] | None) -> list[tuple[str, FileNode]]:
        """(path, node) of the files *paths* name (every file when None), sorted by path."""
        tree = self._tree
        if paths is None:
            chosen = {node.inode: node for node in tree.files()}
        else:
            chosen = {}
            for raw in paths:
                path = raw.strip("/")
                parts = () if path in ("", ".") else tuple(path.split("/"))
                node = tree.find(parts)
                if node is None:
                    raise ControlError(f"{raw}: no such file in the mount")
                chosen.update((found.inode, found) for found in tree.files_under(node))
        return sorted((tree.path_of(node), node) for node in chosen.values())

    # -- status --------------------------------------------------------------------------------

    def status(self, paths: list[str] | None = None, *, every: bool = False) -> dict[str, Any]:
        """Figures of the selected files (all by default) and their totals.

        A big selection is summarised (see the module docstring) unless *every*.
        """
        selected = self._select(paths)
        states: dict[str, int] = {}
        size = cached = rate = origin = 0
        rows: list[dict[str, Any]] = []
        summarise = len(selected) > SUMMARY_THRESHOLD and not every
        for path, node in selected:
            file = node.cached
            state, _ = self._state(file)
            states[state] = states.get(state, 0) + 1
            size += file.size
            cached += file.cached_bytes
            if file._stats is not None:
                rate += round(file.stats.rate())
                origin += file.stats.origin_bytes
            if not summarise:
                rows.append(self._file_status(path, file))
        if summarise:
            rows = [self._file_status(path, node.cached) for path, node in self._notable(selected)]
        answer: dict[str, Any] = {
            "ok": True,
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "mountpoint": None if self._mountpoint is None else str(self._mountpoint),
            "listen": self._listen() if self._listen is not None else [],
            "cache_dir": str(self._cache_dir),
            "files": rows,
            "hidden": len(selected) - len(rows),
            "totals": {
                "files": len(selected),
                "complete": states.get("complete", 0),
                "states": states,
                "size": size,
                "cached_bytes": cached,
                "percent": _percent(cached, size),
                "rate": rate,
                "origin_bytes": origin,
                **self._cache_totals(),
            },
        }
        answer["daemon"] = self._extras() if self._extras is not None else {}
        return answer

    def _notable(self, selected: list[tuple[str, FileNode]]) -> list[tuple[str, FileNode]]:
        """The `SUMMARY_ROWS` files a person wants to see first, in path order."""
        order = {"error": 0, "filling": 1, "uncached": 2, "partial": 3, "complete": 4}

        def rank(item: tuple[str, FileNode]) -> tuple[int, int, str]:
            file = item[1].cached
            state, _ = self._state(file)
            return order.get(state, 5), -file.cached_bytes, item[0]

        chosen = sorted(selected, key=rank)[:SUMMARY_ROWS]
        return sorted(chosen)

    def _cache_totals(self) -> dict[str, int]:
        """Usage and cap of the whole cache (every file of the mount)."""
        budget = self._fetcher.budget
        if budget is None:
            used = sum(cached.cached_bytes for cached in self._tree.cached_files())
            return {"cache_used": used, "cache_max_size": 0, "evicted_bytes": 0}
        return {
            "cache_used": budget.used(),
            "cache_max_size": budget.cap,
            "evicted_bytes": budget.evicted_bytes,
        }

    def _state(self, cached: CachedFile) -> tuple[str, str | None]:
        """(state, error) of one file."""
        job = self._jobs.get(cached)
        error = cached.stats.last_error if cached._stats is not None else None
        if cached.retired:
            return "error", "the remote file changed; waiting for the new version"
        if cached.gone:
            return "gone at origin", "the origin answers 404/410; the cached bytes stay readable"
        if cached.complete:
            return "complete", None
        if self._fetcher.downloading(cached) or (job is not None and job.state == "running"):
            return "filling", None
        if error:
            return "error", error
        if not cached.cacheable:
            return "uncached", None
        return "partial", None

    def _file_status(self, path: str, cached: CachedFile) -> dict[str, Any]:
        job = self._jobs.get(cached)
        state, error = self._state(cached)
        note = None
        if not cached.cacheable:
            note = f"served uncached: {cached.uncached_reason}"
        elif not cached.remote.accepts_ranges:
            note = "the origin ignores Range: the whole file is downloaded once"
        return {
            "path": path,
            "url": redact_url(cached.remote.url),
            "size": cached.size,
            "cached_bytes": cached.cached_bytes,
            "percent": _percent(cached.cached_bytes, cached.size),
            "state": state,
            "error": error,
            "note": note,
            "validated_at": cached.validated_at or None,
            "lifetime": self._revalidator.lifetime_of(cached) if self._revalidator else None,
            "fresh": not self._revalidator.is_stale(cached) if self._revalidator else None,
            "verified": self._engine.verifier.state(cached),
            "rate": round(cached.stats.rate()) if cached._stats is not None else 0,
            "origin_bytes": cached.stats.origin_bytes if cached._stats is not None else 0,
            "prefetch": None
            if job is None
            else {"state": job.state, "error": job.error, "paused": job.paused},
        }

    # -- prefetch ------------------------------------------------------------------------------

    def prefetch(self, paths: list[str] | None) -> dict[str, Any]:
        """Start downloading the selected files completely; answers at once."""
        if not paths:
            raise ControlError("prefetch needs at least one path")
        assert self._nursery is not None
        selected = self._select(paths)
        files = list(dict.fromkeys(node.cached for _, node in selected))
        budget = self._fetcher.budget
        if budget is not None:
            total = sum(cached.size for cached in files)
            if total > budget.cap:
                raise ControlError(
                    f"not prefetched: {total} bytes do not fit the cache cap"
                    f" (--cache-max-size {budget.cap})"
                )
        for cached in files:
            job = self._jobs.get(cached)
            if job is not None and job.state == "running":
                continue  # already on its way
            cached.no_fill = False
            if cached.complete:
                self._jobs[cached] = PrefetchJob(cached, "done")
                continue
            if not cached.cacheable:
                self._jobs[cached] = PrefetchJob(
                    cached, "failed", f"not cached: {cached.uncached_reason}"
                )
                continue
            job = PrefetchJob(cached)
            self._jobs[cached] = job
            self._nursery.start_soon(self._run_prefetch, job)
        return {"ok": True, "files": [path for path, _ in selected]}

    async def _run_prefetch(self, job: PrefetchJob) -> None:
        """Download every missing block of the job's file (`RemoteCache.complete`)."""
        file = job.file
        log.info(
            "%s: prefetch started (%d bytes missing)", file.name, file.size - file.cached_bytes
        )

        def paused(reason: str | None) -> None:
            job.paused = reason

        try:
            await self._engine.complete(file, paused=paused)
        except (HttpSourceError, OSError, FileRetiredError, ReadError, ValueError) as err:
            job.state, job.error = "failed", str(err)
            log.warning("%s: prefetch failed: %s", file.name, err)
            return
        except Exception as err:  # a bug must cost this prefetch, not the mount
            log.exception("%s: prefetch failed", file.name)
            job.state, job.error = "failed", f"internal error: {err!r}"
            return
        job.state = "done"
        log.info("%s: prefetch done (%d bytes cached)", file.name, file.cached_bytes)

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> dict[str, Any]:
        """Begin a clean stop of the daemon (as SIGTERM does); answers at once, with the pid
        for the client to wait on."""
        if self._stop is None:
            raise ControlError("this daemon cannot be stopped through its control socket")
        log.info("stop requested through the control socket")
        self._stop()
        return {"ok": True, "pid": os.getpid()}

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Re-read urls.txt (see `Daemon.reload`); a broken file is the error, file:line."""
        if self._reload is None:
            raise ControlError("this daemon has no URL list file to reload")
        try:
            summary = await self._reload()
        except ManifestError as err:
            raise ControlError(str(err)) from None
        return {"ok": True, **summary.as_dict()}

    # -- evict ---------------------------------------------------------------------------------

    def _busy(self, node: FileNode) -> str | None:
        """Why *node*'s cache cannot be evicted now, or None."""
        cached = node.cached
        job = self._jobs.get(cached)
        if job is not None and job.state == "running":
            return f"{cached.name} is downloading; try again when it is done"
        return self._engine.busy(cached)

    async def evict(self, paths: list[str] | None) -> dict[str, Any]:
        """Drop the cached blocks of the selected files; refused while one is busy.

        Busy means open (a handle exists) or downloading. Handles are released and downloads
        end asynchronously, so a busy file gets `EVICT_GRACE` seconds before the refusal.
        Background fill yields at once, and leaves evicted files alone from then on (or it
        would download them again).
        """
        if not paths:
            raise ControlError("evict needs at least one path")
        selected = self._select(paths)
        nodes = [node for _, node in selected]
        before = [(cached, cached.no_fill) for cached in dict.fromkeys(n.cached for n in nodes)]
        for cached, _ in before:
            cached.no_fill = True
        deadline = trio.current_time() + EVICT_GRACE
        while True:
            busy = [reason for node in nodes if (reason := self._busy(node))]
            if not busy:
                break
            if trio.current_time() >= deadline:
                for cached, no_fill in before:
                    cached.no_fill = no_fill
                raise ControlError("not evicted: " + "; ".join(busy))
            if any(self._fetcher.downloading(cached) for cached, _ in before):
                self._fetcher.pause_fill()  # a background fill of these files yields at once
            await trio.sleep(0.05)
        evicted: list[dict[str, Any]] = []
        done_files: set[CachedFile] = set()
        for path, node in selected:
            cached = node.cached
            if cached in done_files:  # the same URL at another selected path
                evicted.append({"path": path, "freed": 0})
                continue
            # Earlier files' saves awaited: check again, nothing may have started meanwhile.
            reason = self._busy(node)
            try:
                if reason:
                    raise ControlError(reason)
                freed = await self._engine.drop(cached)
            except (ControlError, FileRetiredError, OSError) as err:
                for other, no_fill in before[len(done_files) :]:
                    other.no_fill = no_fill
                done = ", ".join(f["path"] for f in evicted) or "none"
                text = err.strerror if isinstance(err, OSError) else str(err)
                raise ControlError(
                    f"{cached.name}: not evicted: {text} (evicted: {done})"
                ) from None
            done_files.add(cached)
            self._jobs.pop(cached, None)
            # The kernel's page cache must forget the bytes too (at every path of the URL),
            # or reads never reach us.
            for shown in self._tree.nodes_of(cached):
                await trio.to_thread.run_sync(self._invalidate, shown.inode)
            log.info("%s: evicted (%d bytes dropped)", path, freed)
            evicted.append({"path": path, "freed": freed})
        return {"ok": True, "files": evicted}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 100.0


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}
