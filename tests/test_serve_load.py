"""`remotefs serve` under load: 64 connections of random ranges for 20 s, every body checked.

The client (`tests.load_client`) runs in a process of its own and compares every byte with
a local copy of the files. Against a clean origin, every request must succeed with the right
bytes. Against the fault-injecting origin (`tests.faults`: resets, truncated bodies, stalls,
5xx, 429), a request may fail or be cut short (the connection closed before the declared
length), but no byte may be wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import write_random
from .faults import Fault, FaultyOrigin
from .origin import Origin
from .serving import ServeFactory, Server

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 64
SECONDS = 20


def run_load(server: Server, files: dict[str, Path], seconds: float = SECONDS) -> dict[str, Any]:
    args = [arg for name, path in files.items() for arg in ("--file", f"{name}={path}")]
    result = subprocess.run(
        [
            sys.executable, "-m", "tests.load_client", "--url", server.url, *args,
            "--connections", str(CONNECTIONS), "--seconds", str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 180,
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout)
    print(outcome)
    return outcome


def make_files(root: Path) -> dict[str, Path]:
    """Three files: sizes that are no multiple of a block, one under a directory."""
    files = {
        "a.bin": write_random(root / "a.bin", 96 * MiB + 4321, seed=11),
        "sub dir/b.bin": write_random(root / "sub dir" / "b.bin", 40 * MiB + 17, seed=12),
        "c.bin": write_random(root / "c.bin", 5 * MiB - 3, seed=13),
    }
    return {name: root / name for name in files}


def test_64_connections_of_random_ranges_get_every_byte_right(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    files = make_files(origin_root)
    lines = [f"{origin.url(name)}  {name}" for name in files]
    # A cache cap below the files' size: evictions run under the load too.
    server = serve.start(lines, "--cache-max-size", "64M", "--max-connections", "16")
    outcome = run_load(server, files)
    assert outcome["wrong"] == 0, outcome["samples"]
    assert outcome["errors"] == 0 and outcome["cut"] == 0, outcome["samples"]
    assert outcome["requests"] >= 1000, outcome
    # The server really went to the origin (evictions, a cap below the data).
    origin.wait_idle()
    assert origin.bytes_served() > 64 * MiB


@pytest.fixture
def faulty(origin_root: Path) -> Iterator[FaultyOrigin]:
    with FaultyOrigin(origin_root) as server:
        server.stall_seconds = 1.0
        yield server


def test_under_faults_bytes_are_right_or_the_connection_closes(
    faulty: FaultyOrigin, origin_root: Path, serve: ServeFactory
) -> None:
    files = make_files(origin_root)
    lines = [f"{faulty.url(name)}  {name}" for name in files]
    server = serve.start(
        lines,
        *("--cache-max-size", "64M", "--max-connections", "16"),
        *("--read-deadline", "3", "--stall-timeout", "0.5"),
    )
    kinds = (
        Fault.RESET, Fault.TRUNCATE, Fault.STALL, Fault.HTTP_500, Fault.HTTP_503,
        Fault.HTTP_429, Fault.HTTP_502,
    )  # fmt: skip
    faulty.plan.randomly(0.25, kinds, seed=7)
    outcome = run_load(server, files)
    faulty.plan.clear()
    assert outcome["wrong"] == 0, outcome["samples"]
    assert faulty.plan.count() > 100, faulty.plan.injected
    # Most requests still succeed (retries); the others failed before their first byte
    # (502) or were cut: never a wrong byte.
    assert outcome["ok"] > outcome["requests"] // 2, outcome
    assert set(outcome["statuses"]) <= {"206", "502", "none"}, outcome
    # And the daemon is fine afterwards.
    from .serving import curl

    status, body, _ = curl("-r", "0-99999", server.file_url("c.bin"))
    assert (status, body) == (206, files["c.bin"].read_bytes()[:100000])
