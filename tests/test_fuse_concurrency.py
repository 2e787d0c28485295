"""Many reader processes at once: correct bytes, and each block crosses the network once."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

from .conftest import write_random
from .mounting import MountFactory
from .origin import Origin

MiB = 1024 * 1024

# Each reader hashes its whole file with a read size of its own (so the kernel's requests
# differ between readers) and prints the digest.
READER = r"""
import hashlib, sys
path, chunk = sys.argv[1], int(sys.argv[2])
digest = hashlib.sha256()
with open(path, "rb", buffering=0) as f:
    while block := f.read(chunk):
        digest.update(block)
print(digest.hexdigest())
"""

RANDOM_READER = r"""
import os, random, sys
path, seed, expected_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
fd = os.open(path, os.O_RDONLY)
truth = open(expected_path, "rb").read()
for _ in range(300):
    offset = rng.randrange(len(truth) + 10)
    length = rng.randrange(1, 300_000)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    got = os.pread(fd, length, offset)
    if got != truth[offset:offset + length]:
        sys.exit(f"wrong bytes at {offset}+{length}")
print("ok")
"""


def overlapping(
    ranges: list[tuple[int, int]],
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs of served ranges that share a byte (there should be none)."""
    ordered = sorted(ranges)
    return [(a, b) for a, b in itertools.pairwise(ordered) if b[0] < a[1]]


def test_concurrent_readers_get_correct_bytes_and_each_block_is_fetched_once(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    names = ["a.bin", "b.bin", "c.bin"]
    for index, name in enumerate(names):
        write_random(origin_root / name, 40 * MiB + index * 777)
    mount = remotefs.mount([origin.url(name) for name in names])
    origin.wait_idle()
    origin.reset_counters()
    jobs: list[tuple[str | None, list[str]]] = []
    # Four sequential readers on a.bin, two on b.bin, and four random readers on c.bin and a.bin.
    for chunk in (4096, 65536, 131072, 1048576):
        jobs.append(
            ("a.bin", [sys.executable, "-c", READER, str(mount.path / "a.bin"), str(chunk)])
        )
    for chunk in (10000, 1 << 20):
        jobs.append(
            ("b.bin", [sys.executable, "-c", READER, str(mount.path / "b.bin"), str(chunk)])
        )
    for seed, name in enumerate(["c.bin", "c.bin", "a.bin", "c.bin"]):
        command = [
            sys.executable, "-c", RANDOM_READER, str(mount.path / name), str(seed),
            str(origin_root / name),
        ]  # fmt: skip
        jobs.append((None, command))
    processes = [
        (job_file, subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        for job_file, command in jobs
    ]
    assert len(processes) >= 8
    for job_file, process in processes:
        out, _ = process.communicate(timeout=240)
        assert process.returncode == 0
        if job_file is None:
            assert out.strip() == "ok"
        else:
            truth = hashlib.sha256((origin_root / job_file).read_bytes()).hexdigest()
            assert out.strip() == truth, job_file
    origin.wait_idle()
    for name in names:
        ranges = origin.served_ranges(f"/{name}")
        assert ranges, name
        assert overlapping(ranges) == [], f"{name}: some bytes were downloaded twice"
    # The sequentially read files came down whole, exactly once.
    assert origin.bytes_served("/a.bin") == (origin_root / "a.bin").stat().st_size
    assert origin.bytes_served("/b.bin") == (origin_root / "b.bin").stat().st_size
