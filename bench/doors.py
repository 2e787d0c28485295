"""The doors onto one engine, side by side: the FUSE mount, the Python library and the HTTP
server (`remotefs serve`), reading the same file from the same origin in the same run.

    sudo .venv/bin/python -m bench.doors                     # loopback, 512 MiB
    sudo .venv/bin/python -m bench.doors --rtt 0.02          # 20 ms per request

Rows, each the median of ``--repeat`` interleaved runs, with a fresh cache every time:

* cold sequential read of the whole file: ``curl`` (the link), the mount (``dd``), the library
  (``f.read(1 MiB)`` in a loop, in a process of its own);
* random 4 KiB reads at queue depth 1: the library's ``pread`` and, as the baselines, one
  4 KiB Range GET over a kept-alive connection (one round trip on this link) and one
  ``curl -r`` (a process per request); latency p50 and p99.
* the HTTP server: a cold sequential read of the whole file with ``curl`` (beside the
  mount's, as a share of it), the warm re-read once every block is cached, and the time to
  the first byte of Range requests at random places (cold, over a kept-alive connection)
  of 4 KiB and of 16 MiB: one round trip to the origin, not the whole range.

Results go to ``bench/results/doors-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .data import make_random_file
from .origin import ShapedOrigin
from .run import drop_page_cache, parse_size

ROOT = Path(__file__).resolve().parent.parent
REMOTEFS = [sys.executable, "-m", "remotefs"]
MiB = 1 << 20

LIBRARY_SEQUENTIAL = """
import sys, time, remotefs
url, cache_dir = sys.argv[1], sys.argv[2]
with remotefs.open(url, cache_dir=cache_dir, fill="none") as f:
    started = time.monotonic()
    total = 0
    while chunk := f.read(1 << 20):
        total += len(chunk)
    print(total, time.monotonic() - started)
"""

LIBRARY_RANDOM = """
import json, random, sys, time, remotefs
url, cache_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(4)
times = []
with remotefs.open(url, cache_dir=cache_dir, fill="none", prefetch_tail=0, prefetch_head=0) as f:
    for _ in range(count):
        offset = rng.randrange(f.size // 4096) * 4096
        started = time.monotonic()
        f.pread(4096, offset)
        times.append(time.monotonic() - started)
print(json.dumps(times))
"""


def mount_sequential(origin: ShapedOrigin, size: int, work: Path) -> float:
    cache, mnt = work / "cache-mount", work / "mnt"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    mnt.mkdir(exist_ok=True)
    urls = work / "urls.txt"
    urls.write_text(origin.url("big.bin") + "\n")
    subprocess.run(
        [*REMOTEFS, "mount", str(urls), str(mnt), "--cache-dir", str(cache), "--no-fill"],
        check=True,
        capture_output=True,
    )
    try:
        drop_page_cache()
        started = time.monotonic()
        subprocess.run(
            ["dd", f"if={mnt / 'big.bin'}", "of=/dev/null", "bs=1M"],
            check=True,
            capture_output=True,
        )
        return size / (time.monotonic() - started) / 1e6
    finally:
        subprocess.run([*REMOTEFS, "unmount", str(mnt)], check=False, capture_output=True)


def library_sequential(origin: ShapedOrigin, work: Path) -> float:
    cache = work / "cache-library"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY_SEQUENTIAL, origin.url("big.bin"), str(cache)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    total, seconds = result.stdout.split()
    return int(total) / float(seconds) / 1e6


def curl_sequential(origin: ShapedOrigin, size: int) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", origin.url("big.bin")], check=True)
    return size / (time.monotonic() - started) / 1e6


def library_random(origin: ShapedOrigin, work: Path, count: int) -> list[float]:
    cache = work / "cache-random"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    result = subprocess.run(
        [sys.executable, "-c", LIBRARY_RANDOM, origin.url("big.bin"), str(cache), str(count)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    times: list[float] = json.loads(result.stdout)
    return times


def curl_random(origin: ShapedOrigin, size: int, count: int) -> list[float]:
    rng = random.Random(5)
    times = []
    for _ in range(count):
        offset = rng.randrange(size // 4096) * 4096
        started = time.monotonic()
        subprocess.run(
            ["curl", "-sS", "--fail", "-o", "/dev/null", "-r", f"{offset}-{offset + 4095}",
             origin.url("big.bin")],
            check=True,
        )  # fmt: skip
        times.append(time.monotonic() - started)
    return times


def request_random(origin: ShapedOrigin, size: int, count: int) -> list[float]:
    """One round trip on this link: a 4 KiB Range GET over a kept-alive connection."""
    import http.client

    rng = random.Random(6)
    connection = http.client.HTTPConnection("127.0.0.1", origin.port)
    times = []
    try:
        for _ in range(count):
            offset = rng.randrange(size // 4096) * 4096
            started = time.monotonic()
            connection.request(
                "GET", "/big.bin", headers={"Range": f"bytes={offset}-{offset + 4095}"}
            )
            response = connection.getresponse()
            response.read()
            times.append(time.monotonic() - started)
    finally:
        connection.close()
    return times


def serve_start(origin: ShapedOrigin, work: Path, cache: Path) -> str:
    """Start `remotefs serve` of big.bin with a fresh *cache*; its address."""
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    urls = work / "urls.txt"
    urls.write_text(origin.url("big.bin") + "\n")
    started = subprocess.run(
        [*REMOTEFS, "serve", str(urls), "--listen", "127.0.0.1:0", "--cache-dir", str(cache),
         "--no-fill"],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    return started.stdout.split("serving ", 1)[1].split()[0]


def serve_stop(cache: Path) -> None:
    subprocess.run([*REMOTEFS, "stop", "--cache-dir", str(cache)], check=False, capture_output=True)


def curl_rate(url: str, size: int) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", url], check=True)
    return size / (time.monotonic() - started) / 1e6


def serve_sequential(origin: ShapedOrigin, size: int, work: Path) -> tuple[float, float]:
    """MB/s of a cold read of the whole file through the server, then of a warm re-read."""
    cache = work / "cache-serve"
    address = serve_start(origin, work, cache)
    try:
        cold = curl_rate(f"{address}/big.bin", size)
        warm = curl_rate(f"{address}/big.bin", size)
    finally:
        serve_stop(cache)
    return cold, warm


def serve_first_byte(
    origin: ShapedOrigin, size: int, work: Path, count: int, length: int
) -> list[float]:
    """Seconds to the first body byte of *count* cold Range requests of *length* bytes at
    random places, over one kept-alive connection. The cache is emptied between requests
    (``remotefs evict``): a range's readahead must not make the next one warm."""
    import http.client

    from remotefs.control_client import ClientError, Target

    cache = work / "cache-ttfb"
    control = Target.of_cache(cache)

    def evict() -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with control.connect() as connection:
                    connection.request({"cmd": "evict", "paths": ["big.bin"]})
                return
            except ClientError:  # busy: readahead still arriving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    address = serve_start(origin, work, cache)
    host, port = address.removeprefix("http://").rsplit(":", 1)
    rng = random.Random(7 + length)
    connection = http.client.HTTPConnection(host, int(port))
    times = []
    try:
        for _ in range(count):
            offset = rng.randrange((size - length) // 4096) * 4096
            started = time.monotonic()
            connection.request(
                "GET", "/big.bin", headers={"Range": f"bytes={offset}-{offset + length - 1}"}
            )
            response = connection.getresponse()
            response.read(1)
            times.append(time.monotonic() - started)
            response.read()
            evict()
    finally:
        connection.close()
        serve_stop(cache)
    return times


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=parse_size, default=512 * MiB)
    parser.add_argument("--rtt", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--random-reads", type=int, default=200)
    args = parser.parse_args()
    rows: dict[str, Any] = {"size": args.size, "rtt_ms": args.rtt * 1000}
    with tempfile.TemporaryDirectory(prefix="remotefs-doors-") as tmp:
        work = Path(tmp)
        root = work / "origin"
        root.mkdir()
        make_random_file(root / "big.bin", args.size)
        with ShapedOrigin(root, delay=args.rtt) as origin:
            runs: dict[str, list[float]] = {
                "curl": [],
                "mount": [],
                "library": [],
                "serve": [],
                "serve_warm": [],
            }
            for _ in range(args.repeat):
                runs["curl"].append(curl_sequential(origin, args.size))
                runs["mount"].append(mount_sequential(origin, args.size, work))
                runs["library"].append(library_sequential(origin, work))
                cold, warm = serve_sequential(origin, args.size, work)
                runs["serve"].append(cold)
                runs["serve_warm"].append(warm)
                print({k: round(v[-1]) for k, v in runs.items()}, flush=True)
            for name, values in runs.items():
                rows[f"{name}_sequential_MBps"] = statistics.median(values)
            rows["library_percent_of_mount"] = (
                100 * rows["library_sequential_MBps"] / rows["mount_sequential_MBps"]
            )
            # Per run, then the median: the two reads of one run saw the same machine.
            shares = [100 * s / m for s, m in zip(runs["serve"], runs["mount"], strict=True)]
            rows["serve_percent_of_mount"] = statistics.median(shares)
            for length, label in ((4096, "4k"), (16 * MiB, "16m")):
                first = serve_first_byte(
                    origin, args.size, work, min(50, args.random_reads), length
                )
                rows[f"serve_first_byte_{label}_p50_ms"] = 1000 * percentile(first, 0.5)
                rows[f"serve_first_byte_{label}_p99_ms"] = 1000 * percentile(first, 0.99)
            library = library_random(origin, work, args.random_reads)
            curl = curl_random(origin, args.size, min(50, args.random_reads))
            rows["library_pread_4k_p50_ms"] = 1000 * percentile(library, 0.5)
            rows["library_pread_4k_p99_ms"] = 1000 * percentile(library, 0.99)
            rows["curl_4k_p50_ms"] = 1000 * percentile(curl, 0.5)
            one = request_random(origin, args.size, min(100, args.random_reads))
            rows["round_trip_4k_p50_ms"] = 1000 * percentile(one, 0.5)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"doors-{stamp}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
