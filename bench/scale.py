"""Scale benchmark: a mount of 10,000 or 100,000 URLs on one origin.

    sudo .venv/bin/python -m bench.scale                       # 10,000 and 100,000 at 0 and 20 ms
    sudo .venv/bin/python -m bench.scale --files 10000 --delay 0.02

For each list size and delay, against a virtual origin in its own process
(`tests.virtual_origin`: 1 MiB files whose bytes are computed, so nothing is on disk):

* mount: the time until ``remotefs mount`` returns with every file listed, and the daemon's
  resident memory then;
* ``ls -lR`` of the whole mount, and ``remotefs status --once`` (summarised) and ``--all``;
* ``reload`` after 100 more URLs were appended: its time, and that all of them are listed;
* a warm remount (the same cache): the time until it returns with every file listed.

A baseline from the same run: ``curl`` of 100 of the URLs one after another (the cost of one
request on this link). Results go to ``bench/results/scale-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REMOTEFS = [sys.executable, "-m", "remotefs"]
EXTRA = 100


@contextlib.contextmanager
def virtual_origin(files: int, delay: float) -> Iterator[int]:
    """A virtual origin process serving f000000.bin ... with *delay* per request; its port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.virtual_origin",
            "--files",
            str(files + EXTRA),
            "--delay",
            str(delay),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield port
    finally:
        process.terminate()
        process.wait(10)


def run(*args: str | Path, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return elapsed, result


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def listed(mountpoint: Path) -> int:
    return len(os.listdir(mountpoint))


def measure(files: int, delay: float, work: Path) -> dict[str, Any]:
    """Every figure of one list size at one delay."""
    cache, mnt = work / "cache", work / "mnt"
    for path in (cache, mnt):
        shutil.rmtree(path, ignore_errors=True)
    mnt.mkdir(parents=True)
    result: dict[str, Any] = {"files": files, "delay_ms": round(delay * 1000)}
    with virtual_origin(files, delay) as port:
        names = [f"f{index:06d}.bin" for index in range(files + EXTRA)]
        urls = work / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{n}\n" for n in names[:files]))
        started = time.monotonic()
        for name in names[-EXTRA:]:
            run("curl", "-s", "-o", "/dev/null", "-r", "0-0", f"http://127.0.0.1:{port}/{name}")
        result["curl_probe_ms"] = round((time.monotonic() - started) / EXTRA * 1000, 2)
        options: list[str | Path] = ["--cache-dir", cache, "--no-fill"]
        result["mount_s"], _ = run(*REMOTEFS, "mount", urls, mnt, *options)
        result["listed"] = listed(mnt)
        pid = int(os.getxattr(mnt, "user.remotefs.pid"))
        result["rss_mib"] = round(rss_mib(pid), 1)
        try:
            result["ls_lR_s"], _ = run("ls", "-lR", mnt)
            result["status_s"], _ = run(*REMOTEFS, "status", "--once", mnt)
            result["status_all_s"], _ = run(*REMOTEFS, "status", "--once", "--all", mnt)
            with urls.open("a") as handle:
                handle.writelines(f"http://127.0.0.1:{port}/{n}\n" for n in names[-EXTRA:])
            result["reload_s"], reload = run(*REMOTEFS, "reload", mnt)
            result["reload_output"] = reload.stdout.strip()
            result["listed_after_reload"] = listed(mnt)
            result["rss_after_mib"] = round(rss_mib(pid), 1)
        finally:
            run(*REMOTEFS, "unmount", mnt)
        result["remount_s"], _ = run(*REMOTEFS, "mount", urls, mnt, *options)
        result["listed_after_remount"] = listed(mnt)
        run(*REMOTEFS, "unmount", mnt)
    return result


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| URLs | per request | mount (all listed) | RSS | `ls -lR` | status | status --all"
        " | reload +100 | warm remount |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['files']:,} | {r['delay_ms']} ms (curl: {r['curl_probe_ms']} ms)"
            f" | {r['mount_s']:.1f} s ({r['listed']:,}) | {r['rss_mib']:.0f} MiB"
            f" | {r['ls_lR_s']:.1f} s | {r['status_s']:.2f} s | {r['status_all_s']:.1f} s"
            f" | {r['reload_s']:.1f} s ({r['listed_after_reload']:,})"
            f" | {r['remount_s']:.1f} s ({r['listed_after_remount']:,}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--delay", type=float, nargs="+", default=[0.0, 0.02])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="remotefs-scale-") as tmp:
        for files in args.files:
            for delay in args.delay:
                row = measure(files, delay, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"scale-{stamp}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"scale-{stamp}.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
