"""The zero-copy receive buffer gives h11 exactly the events its own buffer gives.

Responses are cut into chunks at arbitrary places (hypothesis) and parsed twice, once with
h11's `ReceiveBuffer` and once with `ZeroCopyReceiveBuffer`; the events must be equal. A
large body chunk must come out as the very object that went in: that is the copy saved.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import h11
import h11._connection
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from remotefs.http import receive_buffer
from remotefs.http.receive_buffer import MIN_HELD_CHUNK, ZeroCopyReceiveBuffer


@contextmanager
def buffer_class(cls: type[ReceiveBuffer]) -> Iterator[None]:
    saved = h11._connection.ReceiveBuffer
    h11._connection.ReceiveBuffer = cls  # type: ignore[misc]
    try:
        yield
    finally:
        h11._connection.ReceiveBuffer = saved  # type: ignore[misc]


def response_bytes(body: bytes, *, chunked: bool) -> bytes:
    if not chunked:
        plain = f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n\r\n"
        return plain.encode() + body
    pieces = [body[i : i + 70_000] for i in range(0, len(body), 70_000)]
    framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + framed + b"0\r\n\r\n"


def parse(cls: type[ReceiveBuffer], wire: bytes, cuts: list[int]) -> list[object]:
    """Feed *wire* cut at *cuts* to a client connection; return its events, data joined."""
    with buffer_class(cls):
        connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    events: list[object] = []
    body = bytearray()
    bounds = [0, *sorted(set(cuts)), len(wire)]
    for start, end in itertools.pairwise(bounds):
        if start == end:
            continue  # h11 takes empty data for the end of the connection
        connection.receive_data(wire[start:end])
        for _ in range(len(wire) + 10):  # bounded: each event consumes input
            event = connection.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Data):
                body += event.data
                continue
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                break
    events.append(bytes(body))
    return events


@settings(max_examples=150, deadline=None)
@given(
    body_size=st.integers(min_value=0, max_value=300_000),
    cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=8),
    chunked=st.booleans(),
)
def test_events_equal_h11s_own_buffer_for_any_chunking(
    body_size: int, cut_fractions: list[float], chunked: bool
) -> None:
    wire = response_bytes(os.urandom(body_size), chunked=chunked)
    cuts = [int(f * len(wire)) for f in cut_fractions]
    assert parse(ZeroCopyReceiveBuffer, wire, cuts) == parse(ReceiveBuffer, wire, cuts)


def test_a_large_body_chunk_is_handed_on_without_a_copy() -> None:
    body = os.urandom(4 * MIN_HELD_CHUNK)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body) * 2}\r\n\r\n".encode()
    with buffer_class(ZeroCopyReceiveBuffer):
        connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(head)
    assert isinstance(connection.next_event(), h11.Response)
    for _ in range(2):
        connection.receive_data(body)
        event = connection.next_event()
        assert isinstance(event, h11.Data)
        assert event.data is body
    assert isinstance(connection.next_event(), h11.EndOfMessage)


def test_install_replaces_h11s_buffer_and_is_idempotent() -> None:
    with buffer_class(ReceiveBuffer):
        receive_buffer.install()
        receive_buffer.install()
        assert h11._connection.ReceiveBuffer is ZeroCopyReceiveBuffer
