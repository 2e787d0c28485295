"""hypercorn, on the daemon's own trio loop, with a bound on connections and on slow clients.

hypercorn parses HTTP (h11, and h2 for clients that ask for it) and runs the ASGI app; this
module only decides what it may cost. `serve` replaces ``hypercorn.trio.serve`` with the
same parts (its ``Config``, its sockets, its per-connection ``TCPServer``) and two additions
that its public API has no setting for:

* **At most ``--http-connections`` connections.** The listener accepts the next connection
  only when one of them has ended; meanwhile clients wait in the kernel's backlog. Each
  connection holds a descriptor, and the engine needs descriptors for its cache files.
* **A client that stops reading is let go.** hypercorn writes a body with a shielded
  ``send_all`` that only the client can finish; each write here is cut into slices that must
  each be taken within ``Limits.send_timeout`` (60 s), or the connection is closed (and the
  app hears a disconnect).

hypercorn's own settings do the rest: a request's headers must arrive within
``--http-idle-timeout`` of the connection opening (or of the previous response), as must the
next request on a kept-alive connection (its keep-alive timeout, which runs until a whole
request head is parsed), so a client trickling headers (slowloris) is closed; a request head
is at most 16 KiB (``h11_max_incomplete_size``).

The per-connection ``TCPServer`` is below hypercorn's public API: ``pyproject.toml`` pins the
versions whose signature matches (0.17, 0.18), and the tests run through it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework
from hypercorn.utils import repr_socket_addr, wrap_app

from .listen import MAX_HEAD, Limits, Listen

log = logging.getLogger(__name__)

#: A slice of a write that a client must take within ``Limits.send_timeout`` seconds.
SEND_SLICE = 256 * 1024
#: The kernel's queue of connections not accepted yet.
BACKLOG = 128
#: Largest request head (request line and headers).


class _Guarded(trio.abc.HalfCloseableStream):
    """A connection whose writes fail when the client does not take a slice in time."""

    def __init__(self, stream: trio.SocketStream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        #: hypercorn reads the peer's and its own address from here.
        self.socket = stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            for offset in range(0, max(len(view), 1), SEND_SLICE):
                with trio.move_on_after(self._timeout) as scope:
                    await self._stream.send_all(view[offset : offset + SEND_SLICE])
                if scope.cancelled_caught:
                    raise trio.BrokenResourceError("the client took nothing for too long")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Connections:
    """The open connections by client address (``scope["client"]``): the app cuts one whose
    response must end before its length (`cut`). Returning early is enough for HTTP/1.1
    (hypercorn closes a connection whose body is incomplete), but hypercorn leaves an
    unfinished HTTP/2 stream open until the connection idles; shutting the socket down ends
    every protocol's response at once."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], trio.SocketStream] = {}

    def add(self, stream: trio.SocketStream) -> tuple[str, int] | None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return None
        key = (str(peer[0]), int(peer[1]))
        self._open[key] = stream
        return key

    def remove(self, key: tuple[str, int] | None) -> None:
        if key is not None:
            self._open.pop(key, None)

    def cut(self, client: tuple[str, int] | None) -> None:
        """Shut the connection of *client* down in both directions, now."""
        stream = self._open.get(client) if client is not None else None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.socket.shutdown(socket.SHUT_RDWR)

    def __len__(self) -> int:
        return len(self._open)


class _LimitedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts a connection only while fewer than the limit are open."""

    def __init__(self, inner: trio.SocketListener, slots: trio.Semaphore) -> None:
        self._inner = inner
        self._slots = slots

    async def accept(self) -> trio.SocketStream:
        await self._slots.acquire()
        try:
            return await self._inner.accept()
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


def _config(listen: Listen, limits: Limits) -> Config:
    config = Config()
    config.bind = [listen.bind]
    config.keep_alive_timeout = limits.idle_timeout
    config.h11_max_incomplete_size = MAX_HEAD
    config.include_server_header = False  # the app sends "Server: remotefs/VERSION"
    config.errorlog = logging.getLogger("remotefs.serve.hypercorn")
    config.accesslog = None
    config.backlog = BACKLOG
    return config


def bind(listen: Listen) -> list[socket.socket]:
    """The listening sockets of *listen* (raises OSError: in use, no such address, ...)."""
    sockets = _config(listen, Limits()).create_sockets()
    bound = sockets.insecure_sockets
    try:
        for sock in bound:
            sock.listen(BACKLOG)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def addresses(sockets: list[socket.socket]) -> list[str]:
    """``http://127.0.0.1:8080`` for each socket (the port the kernel chose for port 0)."""
    return [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets]


async def serve(
    app: ASGIFramework,
    sockets: list[socket.socket],
    listen: Listen,
    limits: Limits,
    connections: Connections | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *app* on the bound *sockets* until cancelled (connections are then cut);
    *connections* keeps the open ones for the app to cut."""
    connections = connections if connections is not None else Connections()
    config = _config(listen, limits)
    context = WorkerContext(None)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    slots = trio.Semaphore(limits.connections)
    listeners = [
        _LimitedListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), slots)
        for sock in sockets
    ]

    async def connection(stream: trio.SocketStream) -> None:
        key = connections.add(stream)
        try:
            guarded: Any = _Guarded(stream, limits.send_timeout)
            await TCPServer(wrapped, config, context, {}, guarded)
        finally:
            connections.remove(key)
            slots.release()

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(connection, listeners, handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


__all__ = ["Connections", "Limits", "addresses", "bind", "serve"]
