"""A fault-injecting origin: the real test `Origin`, plus a per-test plan of what goes wrong.

Two kinds of misbehaviour:

* **Per-request faults** (`Fault`) are drawn from a `FaultPlan` for every *data* request (a GET
  that is not the mount's ``bytes=0-0`` probe, unless ``include_probes`` is set): a queue of
  faults to inject next, a fault to inject on every request, or a random fault with a given
  probability.  Every injection is counted (`FaultPlan.injected`, `FaultPlan.history`).
* **Server modes** are attributes of `FaultyOrigin` that change how the server behaves for
  every request: ignore Range, announce ``Accept-Ranges: none``, send no Content-Length, refuse
  HEAD, or redirect a path to short-lived "signed" URLs that later answer 403.

Everything is written through the `Exchange`, so the origin's byte accounting
(`Origin.served_ranges`, `Origin.bytes_served`) stays exact whatever a fault does.  Every sleep
waits on the origin's stop event, so `Origin.stop()` never waits for a stall to end.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import random
import re
import socket
import threading
from dataclasses import dataclass
from os import stat_result as os_stat
from pathlib import Path
from typing import Literal

from .origin import Exchange, Origin, RequestRecord

__all__ = [
    "BODY_FAULTS",
    "SIGNED_PREFIX",
    "STATUS_OF",
    "Fault",
    "FaultPlan",
    "FaultyOrigin",
    "Injection",
]

PROBE_RANGE = "bytes=0-0"
#: Signed URLs look like ``/_signed/<generation>/<name>?sig=...``.
SIGNED_PREFIX = "/_signed/"
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class Fault(enum.Enum):
    """What can go wrong with one response."""

    #: Send part of the body, then reset the connection (RST).
    RESET = "reset"
    #: Send part of the body, then close the connection cleanly (FIN): a short body.
    TRUNCATE = "truncate"
    #: Send part of the body, then send nothing for `FaultyOrigin.stall_seconds`, then reset.
    STALL = "stall"
    #: Send part of the body, then one byte every `FaultyOrigin.trickle_seconds`, forever: a
    #: hostile origin that never stalls long enough for a stall timeout.
    TRICKLE = "trickle"
    HTTP_500 = "500"
    HTTP_502 = "502"
    HTTP_503 = "503"
    HTTP_504 = "504"
    #: 429 Too Many Requests with ``Retry-After: 1``.
    HTTP_429 = "429"
    HTTP_403 = "403"
    HTTP_404 = "404"
    HTTP_410 = "410"
    #: Answer a Range request with ``200`` and the whole body.
    IGNORE_RANGE = "ignore-range"


#: Faults that send a partial body before going wrong.
BODY_FAULTS = frozenset({Fault.RESET, Fault.TRUNCATE, Fault.STALL, Fault.TRICKLE})

#: The status each status fault answers with.
STATUS_OF = {
    Fault.HTTP_500: 500,
    Fault.HTTP_502: 502,
    Fault.HTTP_503: 503,
    Fault.HTTP_504: 504,
    Fault.HTTP_429: 429,
    Fault.HTTP_403: 403,
    Fault.HTTP_404: 404,
    Fault.HTTP_410: 410,
}


@dataclass(frozen=True)
class Injection:
    """One fault that was injected: on which request, and how much body it let through."""

    fault: Fault
    path: str
    range_header: str | None
    #: Body bytes sent before the fault struck (0 for status faults; filled in on completion).
    sent: int = 0


class FaultPlan:
    """Which faults the next data requests get. Thread-safe: the origin's threads draw from it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[Fault] = collections.deque()
        self._always: Fault | None = None
        self._rate = 0.0
        self._kinds: tuple[Fault, ...] = ()
        self._rng = random.Random(0)
        self._paths: frozenset[str] | None = None
        #: Also inject faults into the ``bytes=0-0`` probes remotefs sends at mount.
        self.include_probes = False
        #: Inject faults only into requests for at least this many bytes (a request without
        #: Range asks for the whole file, which counts as big enough).
        self.min_bytes = 0
        #: How many faults of each kind were injected.
        self.injected: collections.Counter[Fault] = collections.Counter()
        #: Every injection, in the order the requests arrived.
        self.history: list[Injection] = []
        #: Data requests seen (faulted or not): the denominator of the fault rate.
        self.data_requests = 0

    # -- setting the plan --------------------------------------------------------------------

    def add(self, *faults: Fault) -> None:
        """Inject *faults*, in this order, into the next data requests."""
        with self._lock:
            self._queue.extend(faults)

    def always(self, fault: Fault | None) -> None:
        """Inject *fault* into every data request (after the queue is used up); None stops."""
        with self._lock:
            self._always = fault

    def randomly(self, rate: float, kinds: tuple[Fault, ...], seed: int = 0) -> None:
        """Inject one of *kinds* (uniformly) into each data request with probability *rate*."""
        with self._lock:
            self._rate = rate
            self._kinds = kinds
            self._rng = random.Random(seed)

    def only_paths(self, *paths: str) -> None:
        """Inject faults only into requests for these URL paths (no argument: all paths)."""
        with self._lock:
            self._paths = frozenset(paths) if paths else None

    def clear(self) -> None:
        """No more faults (the counters are kept)."""
        with self._lock:
            self._queue.clear()
            self._always = None
            self._rate = 0.0

    # -- reading the counters ----------------------------------------------------------------

    def count(self, *faults: Fault) -> int:
        """Faults injected so far, of the given kinds (no argument: of all kinds)."""
        with self._lock:
            if not faults:
                return sum(self.injected.values())
            return sum(self.injected[fault] for fault in faults)

    def injections(self) -> list[Injection]:
        """Snapshot of `history`."""
        with self._lock:
            return list(self.history)

    # -- used by the origin ------------------------------------------------------------------

    def draw(self, ex: Exchange) -> int | None:
        """Decide the fault for *ex*; returns its index in `history`, or None for no fault."""
        if ex.method != "GET":
            return None
        if ex.range_header == PROBE_RANGE and not self.include_probes:
            return None
        if self.min_bytes and ex.range_header is not None:
            match = _RANGE.fullmatch(ex.range_header)
            if match and int(match.group(2)) + 1 - int(match.group(1)) < self.min_bytes:
                return None
        with self._lock:
            if self._paths is not None and ex.path not in self._paths:
                return None
            self.data_requests += 1
            fault: Fault | None = None
            if self._queue:
                fault = self._queue.popleft()
            elif self._always is not None:
                fault = self._always
            elif self._rate > 0 and self._kinds and self._rng.random() < self._rate:
                fault = self._rng.choice(self._kinds)
            if fault is None:
                return None
            self.injected[fault] += 1
            self.history.append(Injection(fault, ex.path, ex.range_header))
            return len(self.history) - 1

    def fault_at(self, index: int) -> Fault:
        with self._lock:
            return self.history[index].fault

    def note_sent(self, index: int, sent: int) -> None:
        with self._lock:
            old = self.history[index]
            self.history[index] = Injection(old.fault, old.path, old.range_header, sent)


class FaultyOrigin(Origin):
    """`Origin` that injects the faults of its `plan` and behaves according to its modes."""

    #: Body bytes a partial-body fault sends (at most half the response): not block-aligned,
    #: so a retry must re-request the partly received block.
    partial_bytes = 150 * 1024 + 123
    #: How long a STALL sends nothing (remotefs's ``--stall-timeout`` should be shorter).
    stall_seconds = 1.5
    #: The pause between the bytes of a TRICKLE (remotefs's ``--stall-timeout`` is longer).
    trickle_seconds = 0.25
    #: Pause before a RESET, so the client has read the partial body before the RST arrives
    #: (a RST makes the receiving kernel drop data the client has not read yet).
    settle_seconds = 0.2
    #: Pause between the chunks of a body sent without Content-Length (a slow download).
    body_pause = 0.0
    #: Send buffer of each connection. Small, so that a body the client abandons is counted
    #: as sent only up to what really was in flight (the kernel's autotuned default holds MiBs).
    send_buffer = 128 * 1024

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(root, host, port)
        self.plan = FaultPlan()
        #: Answer every Range request with 200 and the whole body (the probe included).
        self.ignore_range = False
        #: Announce ``Accept-Ranges: none`` on every response (ranges are still honoured).
        self.accept_ranges_none = False
        #: Send bodies without Content-Length, chunked or delimited by closing the connection;
        #: such a server also ignores Range.
        self.no_length: Literal["chunked", "close"] | None = None
        #: Answer HEAD with this status instead of serving it.
        self.head_status: int | None = None
        self._signed_lock = threading.Lock()
        self._signed: dict[str, str] = {}  # original URL path -> file name under root
        self._generation = 0
        self._valid_from = 0
        self._local = threading.local()

    # -- signed redirects --------------------------------------------------------------------

    def redirect_signed(self, path: str, name: str) -> None:
        """Make URL *path* answer 302 to a fresh "signed" URL that serves *name* until expired."""
        with self._signed_lock:
            self._signed[path] = name

    def expire_signatures(self) -> None:
        """Every signed URL handed out so far answers 403 from now on."""
        with self._signed_lock:
            self._valid_from = self._generation + 1

    def signed_requests(self) -> list[RequestRecord]:
        """Requests to signed URLs, oldest first."""
        return [r for r in self.requests if r.path.startswith(SIGNED_PREFIX)]

    # -- request handling --------------------------------------------------------------------

    def _respond(self, ex: Exchange) -> None:
        ex.handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        if ex.method == "HEAD" and self.head_status is not None:
            ex.send_head(self.head_status, {"Allow": "GET", "Content-Length": "0"})
            return
        with self._signed_lock:
            target = self._signed.get(ex.path)
        if target is not None:
            with self._signed_lock:
                self._generation += 1
                generation = self._generation
            location = f"{SIGNED_PREFIX}{generation}/{target}?sig=s{generation}"
            ex.send_head(302, {"Location": location, "Content-Length": "0"})
            return
        if ex.path.startswith(SIGNED_PREFIX):
            generation_text = ex.path[len(SIGNED_PREFIX) :].partition("/")[0]
            with self._signed_lock:
                expired = not generation_text.isdigit() or int(generation_text) < self._valid_from
            if expired:
                ex.send_head(403, {"Content-Length": "0"})
                return
        index = self.plan.draw(ex)
        if index is not None:
            fault = self.plan.fault_at(index)
            status = STATUS_OF.get(fault)
            if status is not None:
                headers = {"Content-Length": "0"}
                if status == 429:
                    headers["Retry-After"] = "1"
                ex.send_head(status, headers)
                return
        self._local.fault_index = index
        try:
            super()._respond(ex)
        finally:
            self._local.fault_index = None

    def _open(self, url_path: str) -> tuple[int, os_stat] | None:
        if url_path.startswith(SIGNED_PREFIX):
            # /_signed/<generation>/<name>: serve <name>
            url_path = "/" + url_path[len(SIGNED_PREFIX) :].partition("/")[2]
        return super()._open(url_path)

    def _select_range(self, ex: Exchange, st: os_stat) -> tuple[int, int] | None:
        if self.ignore_range or self.no_length is not None:
            return None
        return super()._select_range(ex, st)

    def _representation_headers(self, st: os_stat) -> dict[str, str]:
        headers = super()._representation_headers(st)
        if self.accept_ranges_none or self.no_length is not None:
            headers["Accept-Ranges"] = "none"
        return headers

    def _current_fault(self) -> tuple[int, Fault] | None:
        index: int | None = getattr(self._local, "fault_index", None)
        if index is None:
            return None
        return index, self.plan.fault_at(index)

    def _send_full(self, ex: Exchange, fd: int, st: os_stat) -> None:
        current = self._current_fault()
        if current is not None and current[1] in BODY_FAULTS:
            headers = self._representation_headers(st)
            headers["Content-Length"] = str(st.st_size)
            self._send_faulty(ex, fd, 200, headers, 0, st.st_size, *current)
            return
        if self.no_length is not None and ex.wants_body:
            self._send_without_length(ex, fd, st)
            return
        super()._send_full(ex, fd, st)

    def _send_range(self, ex: Exchange, fd: int, st: os_stat, start: int, end: int) -> None:
        current = self._current_fault()
        if current is not None and current[1] is Fault.IGNORE_RANGE:
            super()._send_full(ex, fd, st)
            return
        if current is not None and current[1] in BODY_FAULTS:
            headers = self._representation_headers(st)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
            headers["Content-Length"] = str(end - start)
            self._send_faulty(ex, fd, 206, headers, start, end, *current)
            return
        super()._send_range(ex, fd, st, start, end)

    def _send_faulty(
        self,
        ex: Exchange,
        fd: int,
        status: int,
        headers: dict[str, str],
        start: int,
        end: int,
        index: int,
        fault: Fault,
    ) -> None:
        """Promise ``[start, end)``, send part of it, then reset, close or stall."""
        part = min(self.partial_bytes, (end - start) // 2)
        ex.send_head(status, headers)
        try:
            ex.send_file(fd, start, part)
        finally:
            self.plan.note_sent(index, ex.body_bytes)
        if fault is Fault.TRICKLE:
            position = start + part
            with contextlib.suppress(OSError):
                while position < end and not self._stopping.wait(self.trickle_seconds):
                    ex.send_file(fd, position, 1)
                    position += 1
            ex.handler.close_connection = True
            return
        if fault is Fault.TRUNCATE:
            ex.handler.close_connection = True
            ex.handler.connection.shutdown(socket.SHUT_WR)  # FIN after a short body
            return
        wait = self.stall_seconds if fault is Fault.STALL else self.settle_seconds
        self._stopping.wait(wait)  # returns early when the origin is stopped
        ex.abort()

    def _send_without_length(self, ex: Exchange, fd: int, st: os_stat) -> None:
        """200 with the whole file and no Content-Length: chunked, or ended by closing."""
        headers = self._representation_headers(st)
        if self.no_length == "chunked":
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Connection"] = "close"
        ex.send_head(200, headers)
        out = ex.handler.wfile
        position, chunk = 0, 256 * 1024
        while position < st.st_size:
            if position and self._stopping.wait(self.body_pause):
                ex.abort()
                return
            count = min(chunk, st.st_size - position)
            if self.no_length == "chunked":
                out.write(b"%x\r\n" % count)
            ex.send_file(fd, position, count)
            if self.no_length == "chunked":
                out.write(b"\r\n")
            position += count
        if self.no_length == "chunked":
            out.write(b"0\r\n\r\n")
        else:
            ex.handler.close_connection = True  # the end of the body is the end of the connection
