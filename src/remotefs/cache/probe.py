"""Probing URLs: many at a time, a bounded number per origin, each within its own timeout.

A mount of 100,000 URLs on one host must not take minutes, nor open a thousand connections
to that host. Probes are spread over a few workers per origin (``--probe-connections``, and
`MAX_PROBES` over all origins), which take URLs from a queue: memory does not grow with a
task per URL. Each probe's ``--probe-timeout`` counts from when its request may be sent, not
from the start of the mount: a URL waiting its turn behind 99,999 others has not failed.

Probes go through the fast HTTP/1.1 `ProbeClient` and fall back to httpx (`HttpSource.probe`)
for whatever it does not handle (redirects, proxies). Any exception while probing one URL
becomes that URL's result: nothing one origin answers can end the mount.

A URL that cannot be probed must not stop the mount either: one dead origin among a hundred
URLs is common. Such a URL is shown from the cache when an earlier run cached it (so its bytes
stay readable offline); otherwise it is left out and re-probed in the background.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import trio

from ..config.options import MountOptions
from ..http.errors import HttpSourceError, PermanentError, TransientError
from ..http.probe_client import ProbeClient
from ..http.retry import retry_until
from ..http.source import HttpSource, RemoteMeta
from ..redact import redact_url

log = logging.getLogger(__name__)

REPROBE_FIRST_DELAY = 5.0
REPROBE_MAX_DELAY = 300.0
#: Probes in flight over all origins together.
MAX_PROBES = 64

ProbeResult = RemoteMeta | HttpSourceError


class ProbeFailedError(PermanentError):
    """Probing one URL raised something unexpected (a bug, or an answer nothing anticipated)."""


class OriginDownError(TransientError):
    """Not sent: the URL's origin failed its last probes; it is given a rest first."""


#: Consecutive probes of one origin that must fail (each after its whole timeout) before the
#: origin counts as down.
DOWN_AFTER = 3


@dataclass
class OriginHealth:
    """Whether an origin answers probes: a dead origin with 100,000 URLs must cost a few
    probe timeouts, not 100,000 of them (hours before a mount could return).

    After `DOWN_AFTER` consecutive transient failures (refused, timed out, 5xx) the origin is
    down for a while (5 s, doubling up to 5 min); probes of its URLs then fail at once, and
    the first one after the rest goes through. Any answer from the origin (even a 404)
    makes it healthy again.
    """

    failures: int = 0
    rest: float = 0.0
    until: float = float("-inf")
    last: str = ""

    def down(self, now: float) -> str | None:
        """Why the origin counts as down at *now*, or None."""
        if now < self.until:
            return f"its origin did not answer the last probes ({self.last}); not asked again yet"
        return None

    def note(self, result: ProbeResult, now: float, key: tuple[str, str, int | None]) -> None:
        if not (isinstance(result, HttpSourceError) and result.transient):
            if self.failures >= DOWN_AFTER:
                log.info("%s answers probes again", origin_name(key))
            self.failures, self.rest = 0, 0.0
            return
        if isinstance(result, OriginDownError):
            return
        self.failures += 1
        self.last = str(result)[:200]
        if self.failures >= DOWN_AFTER:
            self.rest = min(max(self.rest * 2, REPROBE_FIRST_DELAY), REPROBE_MAX_DELAY)
            self.until = now + self.rest
            if self.failures == DOWN_AFTER:
                log.warning(
                    "%s does not answer probes (%s); its other URLs fail at once for %.0fs",
                    origin_name(key),
                    self.last,
                    self.rest,
                )


@dataclass(frozen=True)
class ProbeStatistics:
    """Progress of probing, for the mount's progress line and `remotefs status`."""

    queued: int
    done: int
    in_flight: int
    #: Probes answered by the fast client, and those that went through httpx.
    fast: int
    general: int


def origin_name(key: tuple[str, str, int | None]) -> str:
    """``http://host:port`` of an origin key, for messages."""
    scheme, host, port = key
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of *url*: probes are bounded per origin."""
    try:
        parsed = httpx.URL(url)
        return parsed.scheme, parsed.host, parsed.port
    except (httpx.InvalidURL, ValueError):
        return "", url, None


class Prober:
    """Probes URLs for one daemon, bounded per origin and in all."""

    def __init__(self, source: HttpSource, options: MountOptions) -> None:
        self._source = source
        self._options = options
        self.client = ProbeClient(
            options,
            lambda url: source.request_headers(url, url, {}),
            remembered_target=source.has_remembered_target,
        )
        per_origin = max(1, options.probe_connections)
        if not self.client.enabled:
            per_origin = min(per_origin, int(source.probe_limiter.total_tokens))
        self._per_origin = int(per_origin)
        self._all = trio.CapacityLimiter(MAX_PROBES)
        self._origins: dict[tuple[str, str, int | None], trio.CapacityLimiter] = {}
        self._health: dict[tuple[str, str, int | None], OriginHealth] = {}
        self._queued = 0
        self._done = 0
        self._in_flight = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    def statistics(self) -> ProbeStatistics:
        return ProbeStatistics(
            queued=self._queued,
            done=self._done,
            in_flight=self._in_flight,
            fast=self.client.answered,
            general=self.client.handed_over,
        )

    def _limiter(self, url: str) -> trio.CapacityLimiter:
        key = origin_of(url)
        limiter = self._origins.get(key)
        if limiter is None:
            limiter = self._origins[key] = trio.CapacityLimiter(self._per_origin)
        return limiter

    async def probe(self, url: str, previous: RemoteMeta | None = None) -> ProbeResult:
        """Probe *url* within ``--probe-timeout`` from when it may send; never raises.

        Transient failures are retried until then; the error is returned, not raised. While
        the URL's origin is down (`OriginHealth`), the probe fails at once. With *previous*
        the probe is a revalidation: conditional, and a 304 gives *previous* back (with the
        freshness the 304 announced).
        """
        key = origin_of(url)
        health = self._health.setdefault(key, OriginHealth())
        async with self._limiter(url), self._all:
            down = health.down(trio.current_time())
            if down is not None:
                return OriginDownError(f"probe {redact_url(url)}: {down}")
            self._in_flight += 1
            try:
                result: ProbeResult = await retry_until(
                    lambda: self._attempt(url, previous),
                    deadline=trio.current_time() + self._options.probe_timeout,
                    describe=f"probe {redact_url(url)}",
                )
            except HttpSourceError as err:
                result = err
            except Exception as err:
                log.exception("probe of %s failed unexpectedly", redact_url(url))
                result = ProbeFailedError(
                    f"probe {redact_url(url)}: unexpected {type(err).__name__}: {err}"[:300]
                )
            finally:
                self._in_flight -= 1
            health.note(result, trio.current_time(), key)
            return result

    async def _attempt(self, url: str, previous: RemoteMeta | None) -> RemoteMeta:
        meta = await self.client.probe(url, previous)
        if meta is not None:
            return meta
        async with self._source.probe_limiter:
            return await self._source.probe(url, previous)

    async def probe_many(
        self, urls: Sequence[str], on_result: Callable[[str, ProbeResult], None]
    ) -> None:
        """Probe every URL once (in order, per origin), calling *on_result* as each answers.

        A few workers per origin take URLs from that origin's queue; an exception raised by
        *on_result* is logged and does not stop the others.
        """
        queues: dict[tuple[str, str, int | None], deque[str]] = {}
        for url in urls:
            queues.setdefault(origin_of(url), deque()).append(url)
        self._queued += len(urls)

        async def worker(queue: deque[str]) -> None:
            while queue:
                url = queue.popleft()
                result = await self.probe(url)
                self._done += 1
                try:
                    on_result(url, result)
                except Exception:
                    log.exception("handling the probe of %s failed", redact_url(url))

        async with trio.open_nursery() as nursery:
            for queue in queues.values():
                for _ in range(min(self._per_origin, len(queue))):
                    nursery.start_soon(worker, queue)


class ProbeRetrier:
    """URLs whose probe failed, probed again by one task, each after its own growing delay.

    One task and a heap of due times, not a sleeping task per URL: when an origin with
    100,000 files is down, that is the difference between a few MiB and a few hundred.
    Every answer that comes back is handed to *on_answer*; a URL that still fails waits
    twice as long next time (from `REPROBE_FIRST_DELAY` up to `REPROBE_MAX_DELAY`).
    """

    def __init__(self, prober: Prober, on_answer: Callable[[str, RemoteMeta], None]) -> None:
        self._prober = prober
        self._on_answer = on_answer
        self._due: list[tuple[float, str]] = []
        self._delay: dict[str, float] = {}
        self._wake = trio.Event()

    def __contains__(self, url: str) -> bool:
        return url in self._delay

    def __len__(self) -> int:
        return len(self._delay)

    def add(self, url: str, first_delay: float = REPROBE_FIRST_DELAY) -> None:
        """Probe *url* again after *first_delay* (nothing if it is waiting already)."""
        if url in self._delay:
            return
        self._delay[url] = first_delay
        heapq.heappush(self._due, (trio.current_time() + first_delay, url))
        self._wake.set()

    def discard(self, url: str) -> None:
        """Stop probing *url* (its line left urls.txt, or it answered elsewhere)."""
        self._delay.pop(url, None)

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            due: list[str] = []
            while self._due and self._due[0][0] <= now:
                _, url = heapq.heappop(self._due)
                if url in self._delay and url not in due:
                    due.append(url)
            if due:
                await self._prober.probe_many(due, self._answered)
                continue
            self._wake = trio.Event()
            with trio.move_on_at(self._due[0][0] if self._due else float("inf")):
                await self._wake.wait()

    def _answered(self, url: str, result: ProbeResult) -> None:
        delay = self._delay.get(url)
        if delay is None:
            return  # discarded meanwhile
        if isinstance(result, RemoteMeta):
            del self._delay[url]
            self._on_answer(url, result)
            return
        log.debug("%s still unreachable: %s", redact_url(url), result)
        delay = min(delay * 2, REPROBE_MAX_DELAY)
        self._delay[url] = delay
        heapq.heappush(self._due, (trio.current_time() + delay, url))
