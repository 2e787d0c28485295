"""A load client for `remotefs serve` that checks every byte it gets.

    python -m tests.load_client --url http://127.0.0.1:PORT --file big.bin=/path/to/copy \\
        --connections 64 --seconds 20

Each connection is a thread with a kept-alive `http.client` connection that asks, until the
time is up, for random ranges of random files: single ranges of 1 byte to 1 MiB (mostly
small), suffix ranges, open-ended ranges near the end, and now and then two ranges at once
(multipart/byteranges). Every body is compared with the local copy of the file.

Outcomes, printed as one JSON object: ``ok`` (the whole body, right), ``wrong`` (any byte
that differs from the copy: never allowed), ``cut`` (the connection closed before the
declared length, every byte received right: allowed only where faults are injected),
``errors`` (a status other than the one asked for, or a failure before any byte), and the
statuses seen. It runs in a process of its own so that it does not share a core's GIL with
the origin of the test.
"""

from __future__ import annotations

import argparse
import email.message
import email.parser
import email.policy
import http.client
import json
import mmap
import random
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, outcome: str, status: str, size: int = 0, note: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            self.statuses[status] += 1
            self.bytes += size
            if note and len(self.samples) < 10:
                self.samples.append(note)


def choose(rng: random.Random, size: int) -> tuple[str, list[tuple[int, int]]]:
    """A Range header and the ranges [start, end) it asks for (already clamped)."""
    roll = rng.random()
    if roll < 0.1:
        length = rng.randint(1, 200_000)
        return f"bytes=-{length}", [(max(0, size - length), size)]
    if roll < 0.15:
        start = rng.randrange(max(1, size - 300_000), size)
        return f"bytes={start}-", [(start, size)]
    if roll < 0.22:
        a = rng.randrange(0, size // 2)
        b = rng.randrange(size // 2 + 10, size)
        la, lb = rng.randint(1, 50_000), rng.randint(1, 50_000)
        a_end = min(a + la, size // 2)
        return f"bytes={a}-{a_end - 1},{b}-{b + lb - 1}", [(a, a_end), (b, min(b + lb, size))]
    length = rng.choice([1, 100, 4096, 65536, 65537, 300_000, 1 << 20])
    length = rng.randint(1, length)
    start = rng.randrange(0, size)
    return f"bytes={start}-{start + length - 1}", [(start, min(start + length, size))]


def check_multipart(
    body: bytes, content_type: str, ranges: list[tuple[int, int]], data: mmap.mmap, size: int
) -> str | None:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert isinstance(message, email.message.EmailMessage)
    parts = list(message.iter_parts())
    if len(parts) != len(ranges):
        return f"{len(parts)} parts for {len(ranges)} ranges"
    for part, (start, end) in zip(parts, ranges, strict=True):
        if part["Content-Range"] != f"bytes {start}-{end - 1}/{size}":
            return f"part {part['Content-Range']} for {start}-{end - 1}"
        if part.get_payload(decode=True) != data[start:end]:
            return f"wrong bytes in part {start}-{end - 1}"
    return None


def multipart_body(content_type: str, ranges: list[tuple[int, int]], data: mmap.mmap) -> bytes:
    """The multipart/byteranges body the ranges should give (RFC 9110 §14.6), for checking
    the bytes of one that was cut short."""
    boundary = content_type.partition("boundary=")[2]
    size = len(data)
    body = b""
    for start, end in ranges:
        body += (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n"
        ).encode() + data[start:end]
    return body + f"\r\n--{boundary}--\r\n".encode()


def worker(
    address: tuple[str, int],
    files: dict[str, mmap.mmap],
    deadline: float,
    seed: int,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    names = sorted(files)
    connection: http.client.HTTPConnection | None = None
    while time.monotonic() < deadline:
        name = rng.choice(names)
        data = files[name]
        size = len(data)
        header, ranges = choose(rng, size)
        if connection is None:
            connection = http.client.HTTPConnection(*address, timeout=60)
        try:
            connection.request("GET", "/" + urllib.parse.quote(name), headers={"Range": header})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as err:
            tally.add("errors", "none", note=f"{name} {header}: {err!r}")
            connection.close()
            connection = None
            continue
        status = str(response.status)
        try:
            body = response.read()
        except http.client.IncompleteRead as err:
            partial = err.partial
            if len(ranges) == 1:
                start = ranges[0][0]
                whole = data[start : start + len(partial)]
            else:
                whole = multipart_body(response.getheader("Content-Type") or "", ranges, data)
            if partial != whole[: len(partial)]:
                tally.add("wrong", status, note=f"{name} {header}: wrong bytes before a cut")
            else:
                tally.add("cut", status, len(partial))
            connection.close()
            connection = None
            continue
        except (OSError, http.client.HTTPException) as err:
            tally.add("cut", status, note=f"{name} {header}: {err!r}")
            connection.close()
            connection = None
            continue
        if response.status != 206:
            tally.add("errors", status, note=f"{name} {header}: status {status}")
            if response.will_close:
                connection.close()
                connection = None
            continue
        if len(ranges) == 1:
            start, end = ranges[0]
            expected_range = f"bytes {start}-{end - 1}/{size}"
            if response.getheader("Content-Range") != expected_range:
                tally.add(
                    "wrong", status, note=f"{name} {header}: {response.getheader('Content-Range')}"
                )
            elif body != data[start:end]:
                tally.add("wrong", status, note=f"{name} {header}: wrong bytes")
            else:
                tally.add("ok", status, len(body))
        else:
            problem = check_multipart(
                body, response.getheader("Content-Type") or "", ranges, data, size
            )
            if problem:
                tally.add("wrong", status, note=f"{name} {header}: {problem}")
            else:
                tally.add("ok", status, len(body))
    if connection is not None:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--file", action="append", required=True, help="NAME=LOCAL_COPY")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    parts = urllib.parse.urlsplit(args.url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    files: dict[str, mmap.mmap] = {}
    for item in args.file:
        name, _, path = item.partition("=")
        with open(path, "rb") as handle:
            files[name] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    threads = [
        threading.Thread(
            target=worker, args=(address, files, deadline, args.seed * 1000 + i, tally)
        )
        for i in range(args.connections)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "requests": sum(tally.counts.values()),
                "ok": tally.counts["ok"],
                "wrong": tally.counts["wrong"],
                "cut": tally.counts["cut"],
                "errors": tally.counts["errors"],
                "statuses": dict(tally.statuses),
                "bytes": tally.bytes,
                "seconds": round(elapsed, 1),
                "samples": tally.samples,
            }
        )
    )


if __name__ == "__main__":
    main()
