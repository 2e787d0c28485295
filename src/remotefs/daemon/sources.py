"""Directory sources: what a server lists, turned into the urls.txt entries a daemon mounts.

A urls.txt line whose URL ends in ``/`` (or ``remotefs mount https://host/pub/ MNT``) is a
directory source. `DirectorySources.expand` lists every source (`RemoteCache.list_directory`)
and returns the manifest as the daemon serves it: the file lines, then one file entry per
listed file, at the source's PATH plus its path below the source, with the source's headers.
From there on a listed file is exactly a urls.txt line: probed, cached, reloaded and swapped
by the same code.

Rules, each chosen so that nothing one listing does can hurt the rest of the mount:

- **Collisions.** A urls.txt file line wins over a listed file at the same path (or where the
  listed file would need the line's file to be a directory, or the other way round); an
  earlier source wins over a later one. Each collision is logged once, not at every re-list.
- **Failures keep the last good listing.** A directory that cannot be listed this time (an
  HTTP error, an error page, a timeout) keeps the files it had; one never listed is empty
  until it answers. The mount comes up either way.
- **Bounds.** At most `MAX_FILES` files in all (urls.txt lines count too); each walk is
  bounded as `remotefs.listings.walk` says.
- **Names** a listing gives must be names a mount can show (`name_problem`: no control
  characters, at most 255 bytes); others are left out, logged once.
- **Digests.** A file's digests come from a ``checksums=URL`` file of its source, from a
  ``SHA256SUMS``-style file in its own listed directory (`KNOWN_FILES`), or, for a bucket, from
  a single-part S3 ETag (an MD5 that is not always one: ``etag-md5``, see
  `remotefs.cache.verify`), or GCS's JSON API ``md5Hash``. Checksum files are matched by URL:
  each name in a listed one resolves against its own directory, in a named one (``checksums=``)
  against the source's directory, wherever that file is. A checksum file that cannot be fetched
  or read is logged once (file and line) and verifies nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

import trio

from ..cache.engine import ListingMemo, RemoteCache
from ..cache.verify import ETAG_MD5
from ..config.manifest import Digests, ManifestEntry, name_problem
from ..http.errors import HttpSourceError
from ..listings.checksums import (
    KNOWN_FILES,
    ChecksumFileError,
    Digest,
    digest_from_etag,
    parse_checksum_file,
)
from ..listings.walk import ListedFile, Walk
from ..redact import redact_url

log = logging.getLogger(__name__)

#: Directory sources listed at once (each walks its own tree one listing at a time).
LIST_CONCURRENCY = 8
#: Files a daemon shows at most, urls.txt lines and listed files together: what one daemon is
#: built and tested for (100,000 files), so that no listing can make it grow without bound.
MAX_FILES = 100_000
#: What a checksum file is asked for with.
CHECKSUM_ACCEPT = "text/plain, */*;q=0.5"

Path = tuple[str, ...]


def source_key(entry: ManifestEntry) -> tuple[object, ...]:
    """What makes two source lines the same source (its line number may move)."""
    return (entry.url, entry.path, entry.directory, entry.headers)


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    """One directory source as `remotefs status --json` shows it."""

    url: str  # redacted
    path: str
    files: int
    listed_at: float | None  # wall-clock time of the last listing that answered
    problems: tuple[str, ...]  # the last listing's, one line each


class _Source:
    """What is known of one source: its files as last listed, and its listing's validators."""

    def __init__(self) -> None:
        self.files: dict[Path, ListedFile] = {}
        self.memo: ListingMemo = {}
        self.listed_at: float | None = None
        self.problems: tuple[str, ...] = ()


class DirectorySources:
    """Lists a daemon's directory sources and keeps what they last listed."""

    def __init__(self, engine: RemoteCache) -> None:
        self._engine = engine
        self._sources: dict[tuple[object, ...], _Source] = {}
        self._statistics: list[SourceStatistics] = []
        self._sums_memo: ListingMemo = {}
        self._logged: set[str] = set()
        #: What the last listings said of each file they placed (size, ETag where exact).
        self.listed: dict[str, ListedFile] = {}

    def any(self, manifest: Sequence[ManifestEntry]) -> bool:
        return any(entry.directory is not None for entry in manifest)

    async def expand(self, manifest: Sequence[ManifestEntry]) -> list[ManifestEntry]:
        """The manifest with every directory source listed (again) and replaced by its files."""
        sources = [entry for entry in manifest if entry.directory is not None]
        keys = {source_key(entry) for entry in sources}
        for key in list(self._sources):
            if key not in keys:
                del self._sources[key]  # a source no longer in urls.txt
        limiter = trio.CapacityLimiter(LIST_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for entry in sources:
                nursery.start_soon(self._list, entry, limiter)
        await self.fetch_checksum_files(sources)
        # 100,000 names take a second or two to check and place: not on the event loop,
        # which answers every read meanwhile. Only this object's own state is touched.
        return await trio.to_thread.run_sync(self._entries, manifest, sources)

    def statistics(self) -> list[SourceStatistics]:
        return list(self._statistics)

    def contradicted(self, urls: Sequence[str], known: Callable[[str], object]) -> list[str]:
        """The *urls* whose last listing gives another size or ETag than the version
        *known* (url -> its `CachedFile`) holds: asked at their origins now, not when their
        freshness runs out."""
        found = []
        for url in urls:
            listed, cached = self.listed.get(url), known(url)
            remote = getattr(cached, "remote", None)
            if listed is None or remote is None:
                continue
            if (listed.size is not None and listed.size != remote.size) or (
                listed.etag is not None and remote.etag is not None and listed.etag != remote.etag
            ):
                found.append(url)
        return found

    async def _list(self, entry: ManifestEntry, limiter: trio.CapacityLimiter) -> None:
        """List one source; on failure keep what was listed before under the failed parts."""
        assert entry.directory is not None
        state = self._sources.setdefault(source_key(entry), _Source())
        options = entry.directory
        async with limiter:
            try:
                found: Walk = await self._engine.list_directory(
                    entry.url,
                    depth=options.depth,
                    include=options.include,
                    exclude=options.exclude,
                    memo=state.memo,
                )
            except Exception as err:  # nothing one listing does may end the daemon
                log.exception("%s: listing failed", source_name(entry))
                found = Walk(problems=[f"{redact_url(entry.url)}: {err}"], failed=[()])
        files = {listed.path: listed for listed in found.files}
        for failed in found.failed:  # keep the last good files below a directory that failed
            for path, listed in state.files.items():
                if path[: len(failed)] == failed and len(path) > len(failed):
                    files.setdefault(path, listed)
        if () not in found.failed:
            state.listed_at = time.time()
        state.problems = tuple(found.problems)
        for problem in found.problems:
            self._log_once(f"{source_name(entry)}: cannot list {problem}")
        state.files = files

    def _entries(
        self, manifest: Sequence[ManifestEntry], sources: Sequence[ManifestEntry]
    ) -> list[ManifestEntry]:
        """File lines first; then each source's files where nothing took their path."""
        entries = [entry for entry in manifest if entry.directory is None]
        files: dict[Path, str] = {entry.path: f"line {entry.line}" for entry in entries}
        dirs: set[Path] = {e.path[:i] for e in entries for i in range(1, len(e.path))}
        statistics: list[SourceStatistics] = []
        self.listed = {}
        for source in sources:
            state = self._sources[source_key(source)]
            digests = self._digests_of(source, state)
            placed = 0
            for below, listed in sorted(state.files.items()):
                if len(entries) >= MAX_FILES:
                    self._log_once(
                        f"{source_name(source)}: more than {MAX_FILES} files in the mount;"
                        " the rest of its listing is left out"
                    )
                    break
                path = source.path + below
                problem = self._path_problem(path, files, dirs)
                if problem is not None:
                    self._log_once(f"{source_name(source)}: {'/'.join(path)}: {problem}")
                    continue
                files[path] = f"line {source.line}'s listing"
                self.listed[listed.url] = listed
                dirs.update(path[:i] for i in range(1, len(path)))
                entries.append(
                    ManifestEntry(
                        listed.url,
                        path,
                        source.line,
                        source.headers,
                        digests.get(listed.url, ()),
                    )
                )
                placed += 1
            statistics.append(
                SourceStatistics(
                    redact_url(source.url),
                    "/".join(source.path),
                    placed,
                    state.listed_at,
                    state.problems,
                )
            )
        self._statistics = statistics
        return entries

    @staticmethod
    def _path_problem(path: Path, files: dict[Path, str], dirs: set[Path]) -> str | None:
        for name in path:
            problem = name_problem(name)
            if problem is not None:
                return f"left out: {problem}"
        if path in files:
            return f"left out: {files[path]} has this path"
        if path in dirs:
            return "left out: a directory of another entry has this name"
        for depth in range(1, len(path)):
            if path[:depth] in files:
                return f"left out: {files[path[:depth]]} is a file at {'/'.join(path[:depth])}"
        return None

    # -- digests -----------------------------------------------------------------------------------

    def _digests_of(self, source: ManifestEntry, state: _Source) -> dict[str, Digests]:
        """URL -> digests, for the files *source* lists (only the strongest per algorithm)."""
        found: dict[str, dict[str, str]] = {}
        for listed in state.files.values():
            from_etag = digest_from_etag(listed.etag)
            if from_etag is not None:
                found.setdefault(listed.url, {})[ETAG_MD5] = from_etag.hex
            if listed.md5 is not None:  # a listing that states the MD5 as such (GCS)
                found.setdefault(listed.url, {})["md5"] = listed.md5
        assert source.directory is not None
        # A named file's names are the source directory's; a listed one's, its own directory's.
        sums: list[tuple[str, str | None, str]] = [
            (url, None, source.url) for url in source.directory.checksums
        ]
        sums += [
            (listed.url, KNOWN_FILES[listed.path[-1]], listed.url.rsplit("/", 1)[0] + "/")
            for listed in state.files.values()
            if listed.path[-1] in KNOWN_FILES
        ]
        for url, algorithm, base in sums:
            for file_url, digest in self._checksum_file(source, url, algorithm, base).items():
                found.setdefault(file_url, {})[digest.algorithm] = digest.hex
        return {url: tuple(sorted(d.items())) for url, d in found.items()}

    def _checksum_file(
        self, source: ManifestEntry, url: str, algorithm: str | None, base: str
    ) -> dict[str, Digest]:
        """File URL -> digest, from the checksum file at *url* as last fetched; its names
        are relative to the directory *base*."""
        answer = self._sums_memo.get(url)
        if answer is None or answer.status != 200:
            return {}
        try:
            named = parse_checksum_file(answer.body, redact_url(url), algorithm)
        except ChecksumFileError as err:
            self._log_once(f"{source_name(source)}: checksum file not used: {err}")
            return {}
        return {
            base + "/".join(quote(part, safe="") for part in name.split("/")): digest
            for name, digest in named.items()
        }

    async def fetch_checksum_files(self, manifest: Sequence[ManifestEntry]) -> None:
        """Fetch (conditionally) the checksum files the sources name or list."""
        wanted: list[tuple[ManifestEntry, str]] = []
        for source in manifest:
            if source.directory is None:
                continue
            state = self._sources.get(source_key(source))
            wanted += [(source, url) for url in source.directory.checksums]
            if state is not None:
                wanted += [
                    (source, listed.url)
                    for listed in state.files.values()
                    if listed.path[-1] in KNOWN_FILES
                ]
        for source, url in wanted:
            try:
                answer = await self._engine.fetch_small(
                    url, source.url, CHECKSUM_ACCEPT, self._sums_memo
                )
            except (HttpSourceError, OSError) as err:
                self._log_once(f"{source_name(source)}: checksum file {redact_url(url)}: {err}")
                continue
            if answer.status == 200:
                self._sums_memo[url] = answer
            else:
                self._log_once(
                    f"{source_name(source)}: checksum file {redact_url(url)}: HTTP {answer.status}"
                )

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.warning("%s", message)


def source_name(entry: ManifestEntry) -> str:
    """A source as logs name it: its redacted URL and where it is mounted."""
    where = "/".join(entry.path) or "the root"
    return f"{redact_url(entry.url)} (at {where})"
