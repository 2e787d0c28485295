"""Probe every URL at mount, concurrently and bounded, and keep re-probing the ones that fail.

A URL that cannot be probed must not stop the mount: one dead origin among a hundred URLs is
common. Such a URL is shown from the cache when an earlier run cached it (so its bytes stay
readable offline); otherwise it is left out and re-probed in the background until it answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..config.manifest import ManifestEntry
from ..config.options import MountOptions
from ..http.errors import HttpSourceError
from ..http.retry import retry_until
from ..http.source import HttpSource, RemoteMeta
from ..redact import redact_url

log = logging.getLogger(__name__)

REPROBE_FIRST_DELAY = 5.0
REPROBE_MAX_DELAY = 300.0

ProbeResult = RemoteMeta | HttpSourceError


async def probe_one(source: HttpSource, url: str, timeout: float) -> ProbeResult:
    """Probe *url* with retries for up to *timeout* seconds; the error is returned, not raised."""
    try:
        return await retry_until(
            lambda: source.probe(url),
            deadline=trio.current_time() + timeout,
            describe=f"probe {redact_url(url)}",
        )
    except HttpSourceError as err:
        return err


async def probe_all(
    source: HttpSource, entries: Sequence[ManifestEntry], options: MountOptions
) -> dict[str, ProbeResult]:
    """Probe all distinct URLs, at most ``max_connections`` at a time (the pool bounds it)."""
    results: dict[str, ProbeResult] = {}

    async def run(url: str) -> None:
        results[url] = await probe_one(source, url, options.probe_timeout)

    async with trio.open_nursery() as nursery:
        for url in dict.fromkeys(entry.url for entry in entries):
            nursery.start_soon(run, url)
    return results


async def reprobe_until_found(
    source: HttpSource,
    entry: ManifestEntry,
    options: MountOptions,
    on_found: Callable[[ManifestEntry, RemoteMeta], Awaitable[None]],
) -> None:
    """Retry the probe of one missing URL with growing pauses until it answers."""
    delay = REPROBE_FIRST_DELAY
    while True:
        await trio.sleep(delay)
        result = await probe_one(source, entry.url, options.probe_timeout)
        if isinstance(result, RemoteMeta):
            log.info("%s is reachable now; adding it", "/".join(entry.path))
            await on_found(entry, result)
            return
        log.debug("%s still unreachable: %s", "/".join(entry.path), result)
        delay = min(delay * 2, REPROBE_MAX_DELAY)
