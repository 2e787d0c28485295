"""remotefs benchmark: real workloads through real mounts, each beside same-run baselines.

    sudo .venv/bin/python -m bench.run                  # loopback, 1 GiB
    sudo .venv/bin/python -m bench.run --rtt 0.02       # 20 ms per request
    sudo .venv/bin/python -m bench.run --rate 100M      # 100 MB/s per connection
    sudo .venv/bin/python -m bench.run --size 256M --quick

Machines here are shared and noisy, so every figure is reported next to baselines measured
in the same run against the same origin: ``curl`` of the same file (what the link gives one
connection) and a read of the local copy (what the disk and page cache give). Peers
(httpfs2, rclone with ``--vfs-cache-mode full``, httpdirfs) are measured too when installed.
Results go to ``bench/results/<timestamp>.json`` and ``.md``.

Two more benchmarks live beside this one: ``python -m bench.scale`` (10,000 and 100,000 URLs
in one urls.txt) and ``python -m bench.listings`` (mounting a 10,000-file nginx autoindex and
S3 bucket at 0 and 20 ms per request, with peers; and what a ``sha256=`` check costs a read).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import (
    make_ext4_content,
    make_ext4_image,
    make_random_file,
    make_spread_ext4_image,
    make_zip,
)
from .folios import mean_folio_kib
from .origin import ShapedOrigin
from .results_files import write_results
from .systems import Remotefs, System, available_systems

MiB = 1024 * 1024
Metrics = dict[str, Any]


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def drop_page_cache() -> bool:
    """Drop the kernel's page cache (root only) so 'cold' means cold."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(command: list[str], *, timeout: float = 1800) -> float:
    """Run *command*, fail loudly if it fails, return its wall time in seconds."""
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=timeout)
    return time.monotonic() - started


#: Warm re-reads measured per system, each beside a read of the local copy; medians.
WARM_SAMPLES = 5


def warm_read_seconds(path: Path, local: Path) -> tuple[float, float]:
    """Median times of page-cache reads of *path* and of *local*, taken in turns.

    Both files are read once untimed first: the kernel moves pages to its active list on
    their second access, which costs time once. Dirty pages are written back first, and the
    two reads alternate, so both see the same machine: on a shared machine a local figure
    taken a minute earlier can be off by a third.
    """
    os.sync()
    timed(dd_read(path))
    timed(dd_read(local))
    mount_times, local_times = [], []
    for _ in range(WARM_SAMPLES):
        mount_times.append(timed(dd_read(path)))
        local_times.append(timed(dd_read(local)))
    middle = WARM_SAMPLES // 2
    return sorted(mount_times)[middle], sorted(local_times)[middle]


def dd_read(path: Path, *, skip_mib: int = 0, count_mib: int | None = None) -> list[str]:
    command = ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"skip={skip_mib}"]
    if count_mib is not None:
        command.append(f"count={count_mib}")
    return command


@dataclass
class Bench:
    """One benchmark run: the origin, the data, and the results gathered so far."""

    work: Path
    origin: ShapedOrigin
    size: int
    zip_members: int
    quick: bool
    results: dict[str, dict[str, Metrics]] = field(default_factory=dict)
    #: Every measurement per workload and system; `results` holds the median one.
    samples: dict[str, dict[str, list[Metrics]]] = field(default_factory=dict)
    ext4_content: Path | None = None

    def origin_delta(self) -> Callable[[], Metrics]:
        """Start counting origin traffic; the returned function reads the counts."""
        self.origin.wait_idle(30)
        self.origin.reset_counters()

        def read() -> Metrics:
            self.origin.wait_idle(30)
            records = [r for r in self.origin.requests if r.method == "GET"]
            return {
                "origin_requests": len(records),
                "origin_bytes": sum(r.body_bytes for r in records),
            }

        return read

    def record(self, system: str, workload: str, metrics: Metrics) -> None:
        """Keep *metrics*; with repeated runs, the result is the run with the median figure.

        These machines are shared and noisy: one run can be off by a factor of two, for the
        baselines as much as for the systems. The median of a few interleaved runs is what
        the ratios in the README are taken from.
        """
        runs = self.samples.setdefault(workload, {}).setdefault(system, [])
        runs.append(metrics)
        unit = PRIMARY_UNITS.get(workload)
        ranked = [m for m in runs if unit in m] if unit else []
        if len(ranked) > 1 and unit is not None:
            ranked.sort(key=lambda m: float(m[unit]))
            median = dict(ranked[(len(ranked) - 1) // 2])
            median["runs"] = len(ranked)
            self.results.setdefault(workload, {})[system] = median
        else:
            self.results.setdefault(workload, {})[system] = metrics
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        print(f"  {workload:<24} {system:<10} {shown}", flush=True)

    # -- baselines ---------------------------------------------------------------------------

    def baselines(self) -> None:
        local = self.origin.root / "big.bin"
        url = self.origin.url("big.bin")
        counts = self.origin_delta()
        seconds = timed(["curl", "-sS", "--fail", "-o", "/dev/null", url])
        self.record("curl", "cold_sequential", {"MBps": self.size / seconds / 1e6, **counts()})
        if drop_page_cache():
            seconds = timed(dd_read(local))
            self.record("local", "cold_sequential", {"MBps": self.size / seconds / 1e6})
        seconds = warm_read_seconds(local, local)[1]
        self.record("local", "warm_reread", {"MBps": self.size / seconds / 1e6})
        counts = self.origin_delta()
        started = time.monotonic()
        subprocess.run(
            ["unzip", "-l", str(self.origin.root / "big.zip")], check=True, capture_output=True
        )
        self.record("local", "unzip_list", {"seconds": time.monotonic() - started})

    # -- workloads on a mounted system ---------------------------------------------------------

    def sequential(self, system: System) -> None:
        with system.mounted(["big.bin"], fresh=True) as files:
            path = files.path("big.bin")
            counts = self.origin_delta()
            drop_page_cache()
            seconds = timed(dd_read(path))
            metrics = {"MBps": self.size / seconds / 1e6, **counts()}
            if files.pid:
                metrics["daemon_peak_rss_MiB"] = _peak_rss_mib(files.pid)
            self.record(system.name, "cold_sequential", metrics)
            local = self.origin.root / "big.bin"
            seconds, local_seconds = warm_read_seconds(path, local)
            metrics = {
                "MBps": self.size / seconds / 1e6,
                "local_MBps": self.size / local_seconds / 1e6,
                "percent_of_local": 100 * local_seconds / seconds,
            }
            # Why the two differ: the kernel copies page cache folios; larger ones cost less.
            folio_kib, local_folio_kib = mean_folio_kib(path), mean_folio_kib(local)
            if folio_kib is not None and local_folio_kib is not None:
                metrics |= {"folio_KiB": folio_kib, "local_folio_KiB": local_folio_kib}
            self.record(system.name, "warm_reread", metrics)
            if drop_page_cache():
                counts = self.origin_delta()
                seconds = timed(dd_read(path))
                self.record(
                    system.name,
                    "warm_reread_dropped",
                    {"MBps": self.size / seconds / 1e6, **counts()},
                )
        if system.persistent:
            with system.mounted(["big.bin"], fresh=False) as files:
                drop_page_cache()
                counts = self.origin_delta()
                seconds = timed(dd_read(files.path("big.bin")))
                self.record(
                    system.name, "restart_reread", {"MBps": self.size / seconds / 1e6, **counts()}
                )

    def parallel_sequential(self, system: System, readers: int = 4) -> None:
        with system.mounted(["big.bin"], fresh=True) as files:
            path = files.path("big.bin")
            share = self.size // MiB // readers
            counts = self.origin_delta()
            drop_page_cache()
            started = time.monotonic()
            processes = [
                subprocess.Popen(
                    dd_read(path, skip_mib=index * share, count_mib=share),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for index in range(readers)
            ]
            for process in processes:
                if process.wait(timeout=1800) != 0:
                    raise RuntimeError(f"dd failed on {system.name}")
            seconds = time.monotonic() - started
            self.record(
                system.name,
                f"{readers}_sequential_readers",
                {"MBps": readers * share * MiB / seconds / 1e6, **counts()},
            )

    def random_reads(self, system: System) -> None:
        ios = 200 if self.quick else 1000
        jobs = {
            "random_4k_qd1": ["--ioengine=psync", "--iodepth=1", "--numjobs=1"],
            "random_4k_qd8": ["--ioengine=libaio", "--iodepth=8", "--numjobs=1"],
            "random_4k_8jobs": ["--ioengine=psync", "--iodepth=1", "--numjobs=8"],
        }
        for name, extra in jobs.items():
            with system.mounted(["big.bin"], fresh=True) as files:
                counts = self.origin_delta()
                result = subprocess.run(
                    [
                        "fio",
                        "--name=rand",
                        f"--filename={files.path('big.bin')}",
                        "--rw=randread",
                        "--bs=4k",
                        "--direct=1",
                        "--readonly",
                        f"--size={self.size}",
                        f"--number_ios={ios}",
                        "--group_reporting",
                        "--output-format=json",
                        "--randrepeat=1",
                        "--norandommap",
                        *extra,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                job = json.loads(result.stdout)["jobs"][0]["read"]
                latency = job.get("clat_ns", {}).get("percentile", {})
                traffic = counts()
                reads = max(1, job["total_ios"])
                self.record(
                    system.name,
                    name,
                    {
                        "IOPS": job["iops"],
                        "p50_ms": latency.get("50.000000", 0) / 1e6,
                        "p99_ms": latency.get("99.000000", 0) / 1e6,
                        "KiB_per_read": traffic["origin_bytes"] / reads / 1024,
                        **traffic,
                    },
                )

    def unzip_list(self, system: System) -> None:
        with system.mounted(["big.zip"], fresh=True) as files:
            counts = self.origin_delta()
            started = time.monotonic()
            subprocess.run(
                ["unzip", "-l", str(files.path("big.zip"))], check=True, capture_output=True
            )
            seconds = time.monotonic() - started
            traffic = counts()
            zip_size = (self.origin.root / "big.zip").stat().st_size
            self.record(
                system.name,
                "unzip_list",
                {
                    "seconds": seconds,
                    "percent_of_zip": 100 * traffic["origin_bytes"] / zip_size,
                    **traffic,
                },
            )

    def idle_fill(self, system: System) -> None:
        """remotefs only: read 10%, then leave the mount idle; the rest must arrive by itself."""
        if not isinstance(system, Remotefs):
            return
        link_rate = self.results["cold_sequential"]["curl"]["MBps"] * 1e6
        allowed = self.size / link_rate + 10
        system.extra_args = []
        try:
            with system.mounted(["big.bin"], fresh=True) as files:
                path = files.path("big.bin")
                timed(dd_read(path, count_mib=max(1, self.size // MiB // 10)))
                started = time.monotonic()
                assert files.cache_dir is not None
                while time.monotonic() - started < allowed + 60 and not _cached_fully(
                    files.cache_dir, self.size
                ):
                    time.sleep(0.2)
                waited = time.monotonic() - started
                complete = _cached_fully(files.cache_dir, self.size)
                counts = self.origin_delta()
                drop_page_cache()
                timed(dd_read(path))
                self.record(
                    system.name,
                    "idle_fill",
                    {
                        "seconds_to_complete": waited,
                        "allowed_seconds": allowed,
                        "complete": complete,
                        **counts(),
                    },
                )
        finally:
            system.extra_args = ["--no-fill"]

    def ext4_find_and_read(self, system: System) -> None:
        self._find_and_read(system, "disk.img", "ext4_find_read")

    def spread_ext4_find_and_read(self, system: System) -> None:
        self._find_and_read(system, "spread.img", "ext4_spread_find_read")

    def _find_and_read(self, system: System, image: str, workload: str) -> None:
        """Loop-mount *image* through *system*, then `find` and read every file in it."""
        if os.geteuid() != 0:
            return
        with system.mounted([image], fresh=True) as files:
            target = self.work / "ext4-mnt"
            target.mkdir(exist_ok=True)
            counts = self.origin_delta()
            started = time.monotonic()
            subprocess.run(
                ["mount", "-o", "loop,ro", str(files.path(image)), str(target)], check=True
            )
            try:
                subprocess.run(
                    f"find {target} -type f | sort | xargs cat > /dev/null",
                    shell=True,
                    check=True,
                )
            finally:
                subprocess.run(["umount", str(target)], check=False)
            seconds = time.monotonic() - started
            self.record(system.name, workload, {"seconds": seconds, **counts()})


def _cached_fully(cache_dir: Path, size: int) -> bool:
    """True when a remotefs data file in *cache_dir* has all its *size* bytes on disk.

    Read from the cache directory, not the mount: the mount's st_blocks is cached by the
    kernel for an hour.
    """
    return any(data.stat().st_blocks * 512 >= size for data in cache_dir.glob("files/*/data"))


def _peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


WORKLOAD_COLUMNS = [
    ("cold_sequential", "MBps"),
    ("warm_reread", "MBps"),
    ("warm_reread_dropped", "MBps"),
    ("restart_reread", "MBps"),
    ("4_sequential_readers", "MBps"),
    ("random_4k_qd1", "IOPS"),
    ("random_4k_qd8", "IOPS"),
    ("random_4k_8jobs", "IOPS"),
    ("unzip_list", "seconds"),
    ("ext4_find_read", "seconds"),
    ("ext4_spread_find_read", "seconds"),
    ("idle_fill", "seconds_to_complete"),
]


PRIMARY_UNITS = dict(WORKLOAD_COLUMNS)


def markdown(bench: Bench, meta: Metrics) -> str:
    """A table per workload: systems side by side with their traffic."""
    lines = [
        f"# remotefs benchmark {meta['started']}",
        "",
        f"File {meta['size_MiB']} MiB; per-request delay {meta['rtt_ms']} ms;"
        f" per-connection rate {meta['rate'] or 'unlimited'};"
        f" link rate {meta['link_rate'] or 'unlimited'}; {meta['cpus']} CPUs;"
        f" median of {meta['repeat']} interleaved runs.",
        "",
        "| workload | system | result | origin requests | origin MiB | other |",
        "|---|---|---|---|---|---|",
    ]
    for workload, unit in WORKLOAD_COLUMNS:
        for system, metrics in bench.results.get(workload, {}).items():
            extra = {
                k: v
                for k, v in metrics.items()
                if k not in (unit, "origin_requests", "origin_bytes")
            }
            lines.append(
                f"| {workload} | {system} | {_fmt(metrics.get(unit, float('nan')))} {unit}"
                f" | {metrics.get('origin_requests', '')}"
                f" | {_fmt(metrics['origin_bytes'] / MiB) if 'origin_bytes' in metrics else ''}"
                f" | {', '.join(f'{k}={_fmt(v)}' for k, v in extra.items())} |"
            )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_origin(
    root: Path, delay: float, rate: float, link_rate: float
) -> Iterator[ShapedOrigin]:
    origin = ShapedOrigin(root, delay=delay, rate=rate, link_rate=link_rate)
    origin.start()
    try:
        yield origin
    finally:
        origin.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1024 * MiB, help="big file size")
    parser.add_argument("--zip-members", type=int, default=20_000)
    parser.add_argument("--rtt", type=float, default=0.0, help="seconds of delay per request")
    parser.add_argument("--rate", type=parse_size, default=0, help="bytes/s per connection")
    parser.add_argument(
        "--link-rate", type=parse_size, default=0, help="bytes/s for all connections together"
    )
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/remotefs-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--systems", default="all", help="comma list: remotefs,httpfs2,rclone,httpdirfs"
    )
    parser.add_argument("--workloads", default="all", help="comma list of workload names")
    parser.add_argument("--quick", action="store_true", help="fewer random reads")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of everything, interleaved; medians reported"
    )
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    root = args.work / "origin"
    root.mkdir(exist_ok=True)
    print(f"making data in {root} ...", flush=True)
    make_random_file(root / "big.bin", args.size)
    make_zip(root / "big.zip", args.zip_members)
    content = make_ext4_content(args.work)
    make_ext4_image(root / "disk.img", content)
    if os.geteuid() == 0:
        make_spread_ext4_image(root / "spread.img", content, args.work)

    started = time.strftime("%Y-%m-%dT%H%M%S")
    meta = {
        "started": started,
        "size_MiB": args.size // MiB,
        "rtt_ms": args.rtt * 1000,
        "rate": args.rate,
        "link_rate": args.link_rate,
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "page_cache_droppable": drop_page_cache(),
    }
    with running_origin(root, args.rtt, args.rate, args.link_rate) as origin:
        bench = Bench(
            args.work, origin, args.size, args.zip_members, args.quick, ext4_content=content
        )
        systems = available_systems(args.work, origin, args.systems)
        print("systems:", ", ".join(s.name for s in systems), flush=True)
        workloads: dict[str, Callable[[System], None]] = {
            "sequential": bench.sequential,
            "parallel": bench.parallel_sequential,
            "random": bench.random_reads,
            "unzip": bench.unzip_list,
            "ext4": bench.ext4_find_and_read,
            "ext4_spread": bench.spread_ext4_find_and_read,
            "fill": bench.idle_fill,
        }
        chosen = list(workloads) if args.workloads == "all" else args.workloads.split(",")
        for run in range(args.repeat):
            if args.repeat > 1:
                print(f"run {run + 1} of {args.repeat}", flush=True)
            bench.baselines()
            for system in systems:
                for name in chosen:
                    try:
                        workloads[name](system)
                    except Exception as err:  # one peer failing must not lose the others
                        print(f"  {name} on {system.name} failed: {err}", file=sys.stderr)
                        bench.record(system.name, f"{name}_error", {"error": str(err)[:200]})
    stem = f"{started}-rtt{int(args.rtt * 1000)}ms-rate{args.rate}-link{args.link_rate}"
    write_results(args.out, stem, {"meta": meta, "results": bench.results}, markdown(bench, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
