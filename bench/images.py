"""Loop-mounted images: what each system fetches beside what the kernel itself reads.

    sudo .venv/bin/python -m bench.images                       # every image, 0 and 20 ms
    sudo .venv/bin/python -m bench.images --images ext4-2g --rtts 0.02 --repeat 3

For each image (generated here, in shapes drawn from ``--seed``: file counts, sizes and
directories as `IMAGES` says, files placed at random; cached under ``--work``), the same
commands run several ways, each from a cold page cache:

* **kernel**: the image is attached to a local loop device (``losetup``), mounted, walked
  with ``find`` and some of its files read (``cat`` or ``sha256sum``), unmounted. The loop
  device's ``/sys/block/loopN/stat`` says how many bytes the kernel read from it: the
  demand, blkid's probes included;
* **remotefs, rclone, httpfs2**: the same commands on ``mount -o loop,ro`` of the image in
  the mount, against the benchmark origin on 127.0.0.1 with 0 or 20 ms per request: the
  origin's bytes and requests, and the wall time from ``mount`` to ``umount``. The remote
  loop device's own read count is recorded too: it shows that the kernel asked the same of
  both.

Targets (issue 15): origin bytes at most 1.5x the kernel's demand on every image, and at
20 ms no slower than rclone. Results go to ``bench/results/images-<timestamp>.json`` and
``.md``, with medians of ``--repeat`` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.image_makers import GiB, KiB, MiB, TreeShape, make_ext4, make_squashfs
from tests.loop_demand import drop_page_cache, kernel_demand, loop_mount_run

from .origin import ShapedOrigin
from .results_files import write_results
from .systems import System, available_systems

Metrics = dict[str, Any]


@dataclass(frozen=True)
class ImageCase:
    """One generated image and what is run on it."""

    name: str
    kind: str  # "ext4" or "squashfs"
    size: int  # ext4 only: the filesystem's size
    files: int
    min_size: int
    max_size: int
    top_dirs: int
    sub_dirs: int
    depth: int = 0
    flex_bg: bool = True
    journal: bool = True
    #: Files read after ``find``, and with which command.
    reads: int = 8
    reader: str = "sha256sum"
    mkfs_args: tuple[str, ...] = ()

    def shape(self, seed: int) -> TreeShape:
        # Files fill at most 60% of an ext4 image (the largest are halved until they fit).
        return TreeShape(
            self.files,
            self.min_size,
            self.max_size,
            self.top_dirs,
            self.sub_dirs,
            self.depth,
            seed=seed,
            max_total=self.size * 6 // 10 if self.size else None,
        )

    def describe(self, seed: int) -> str:
        if self.kind == "squashfs":
            what = "squashfs (gzip)"
        elif self.kind != "ext4":
            what = f"{self.kind} {self.size // MiB} MiB"
        else:
            what = f"ext4 {self.size // MiB} MiB"
            what += "" if self.flex_bg else ", no flex_bg"
            what += ", journal" if self.journal else ", no journal"
        return f"{what}, {self.shape(seed).describe()}; {self.reader} of {self.reads}"


IMAGES = [
    # The two images: mkfs.ext4 defaults, files written through a mount.
    ImageCase("ext4-256m", "ext4", 256 * MiB, 306, 4 * KiB, 12 * MiB, 6, 0, reads=8),
    ImageCase("ext4-2g", "ext4", 2 * GiB, 1000, 2000, 7 * MiB, 23, 41, reads=7, reader="cat"),
    # Without flex_bg, each group keeps its bitmaps and inode table at its own start.
    ImageCase(
        "ext4-1g-noflex",
        "ext4",
        1 * GiB,
        2000,
        1 * KiB,
        1 * MiB,
        40,
        10,
        flex_bg=False,
        reads=10,
        reader="cat",
    ),
    # Many small files in a deep tree, no journal (as cloud images are often built).
    ImageCase(
        "ext4-4g-5000",
        "ext4",
        4 * GiB,
        5000,
        100,
        2 * MiB,
        20,
        10,
        depth=2,
        journal=False,
        reads=12,
    ),
    # A big journal (a 1 GiB ext4 with a 256 MiB one) and few large files.
    ImageCase(
        "ext4-1g-journal",
        "ext4",
        1 * GiB,
        100,
        64 * KiB,
        16 * MiB,
        4,
        0,
        reads=6,
        mkfs_args=("-J", "size=256"),
    ),
    ImageCase("squashfs", "squashfs", 0, 1500, 1 * KiB, 4 * MiB, 12, 8, reads=8),
    # A format remotefs has no parser for: the general rules (working regions) apply.
    ImageCase("xfs-1g", "xfs", 1 * GiB, 1000, 1 * KiB, 4 * MiB, 10, 10, reads=8),
]


def build(case: ImageCase, seed: int, work: Path) -> tuple[Path, list[tuple[str, int]]]:
    """The image of *case* (made once per seed, then reused) and its files."""
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{case.name}-seed{seed}.img"
    plan_file = image.with_suffix(".json")
    stamp = repr(case)
    if image.exists() and plan_file.exists():
        saved = json.loads(plan_file.read_text())
        if saved.get("case") == stamp:
            return image, [(path, size) for path, size in saved["files"]]
    print(f"making {image.name}: {case.describe(seed)} ...", flush=True)
    if case.kind == "squashfs":
        plan = make_squashfs(image, case.shape(seed), folder)
    else:
        plan = make_ext4(
            image,
            case.size,
            case.shape(seed),
            flex_bg=case.flex_bg,
            journal=case.journal,
            kind=case.kind,
            mkfs_args=case.mkfs_args,
        )
    plan_file.write_text(json.dumps({"case": stamp, "files": plan}))
    return image, plan


def chosen_files(plan: list[tuple[str, int]], count: int, seed: int) -> list[str]:
    """*count* of the image's files, drawn from *seed* (the same for every system)."""
    rng = random.Random(seed * 7919 + count)
    return sorted(rng.sample([path for path, _ in plan], min(count, len(plan))))


def remote_run(
    system: System,
    origin: ShapedOrigin,
    image_name: str,
    files: list[str],
    reader: str,
    work: Path,
) -> Metrics:
    """The workload on ``mount -o loop,ro`` of the image inside *system*'s mount."""
    with system.mounted([image_name], fresh=True) as mount:
        drop_page_cache()
        origin.wait_idle(30)
        origin.reset_counters()
        run = loop_mount_run(mount.path(image_name), files, reader, work / "mnt-loop")
        origin.wait_idle(60)
        records = [r for r in origin.requests if r.method == "GET"]
    return {
        "seconds": run.seconds,
        "origin_bytes": sum(r.body_bytes for r in records),
        "origin_requests": len(records),
        "loop_bytes": run.loop_bytes,
        "output": run.output,
    }


def median(runs: list[Metrics], key: str) -> Metrics:
    """The run with the median *key* (the middle one; the lower of two)."""
    ranked = sorted(runs, key=lambda m: float(m[key]))
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs"] = len(runs)
    chosen[f"all_{key}"] = [m[key] for m in runs]
    return chosen


def _mib(value: float) -> str:
    return f"{value / MiB:.1f}"


def markdown(results: dict[str, Any], meta: Metrics) -> str:
    """One row per image and delay: the demand, then each system's bytes, ratio, requests, time."""
    systems = meta["systems"]
    header = ["image", "ms", "kernel read"]
    for name in systems:
        header += [f"{name} MiB (x kernel)", f"{name} requests", f"{name} s"]
    lines = [
        f"# remotefs image benchmark {meta['started']}",
        "",
        f"Seed {meta['seed']}; {meta['cpus']} CPUs; median of {meta['repeat']} interleaved runs"
        " (bytes and requests of the run with the median time).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, entry in results.items():
        demand = entry["kernel"]["bytes"]
        for rtt, by_system in entry["remote"].items():
            row = [f"{name}: {entry['describe']}", rtt, f"{_mib(demand)} MiB"]
            for system in systems:
                metrics = by_system.get(system)
                if metrics is None or "error" in metrics:
                    row += ["failed", "", ""]
                    continue
                ratio = metrics["origin_bytes"] / demand if demand else float("nan")
                row += [
                    f"{_mib(metrics['origin_bytes'])} ({ratio:.2f}x)",
                    str(metrics["origin_requests"]),
                    f"{metrics['seconds']:.2f}",
                ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.images", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", default="all", help="comma list of " + ", ".join(c.name for c in IMAGES)
    )
    parser.add_argument("--rtts", default="0,0.02", help="seconds of delay per request, comma list")
    parser.add_argument("--systems", default="remotefs,rclone,httpfs2")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/remotefs-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.images needs root (loop devices)", file=sys.stderr)
        return 2
    cases = (
        IMAGES if args.images == "all" else [c for c in IMAGES if c.name in args.images.split(",")]
    )
    rtts = [float(value) for value in args.rtts.split(",")]
    work = args.work
    root = work / "images-origin"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    prepared = []
    for case in cases:
        image, plan = build(case, args.seed, work)
        served = root / f"{case.name}.img"
        os.link(image, served)
        prepared.append((case, served, chosen_files(plan, case.reads, args.seed)))

    started = time.strftime("%Y-%m-%dT%H%M%S")
    origin = ShapedOrigin(root)
    origin.start()
    results: dict[str, Any] = {}
    samples: dict[str, dict[str, dict[str, list[Metrics]]]] = {}
    kernel: dict[str, list[Metrics]] = {}
    try:
        systems = available_systems(work, origin, args.systems)
        names = [system.name for system in systems]
        print("systems:", ", ".join(names), flush=True)
        for run in range(args.repeat):
            print(f"run {run + 1} of {args.repeat}", flush=True)
            for case, served, files in prepared:
                found = kernel_demand(served, files, case.reader, work / "mnt-kernel")
                demand = {"bytes": found.bytes, "seconds": found.seconds}
                kernel.setdefault(case.name, []).append(demand)
                print(f"  {case.name:<16} kernel   {_mib(found.bytes)} MiB", flush=True)
                for rtt in rtts:
                    origin.delay = rtt
                    for system in systems:
                        try:
                            metrics = remote_run(
                                system, origin, served.name, files, case.reader, work
                            )
                            if metrics.pop("output") != found.output:
                                metrics["error"] = "read other bytes than the local image"
                        except Exception as err:  # one peer failing must not lose the others
                            metrics = {"error": str(err)[:300], "seconds": float("inf")}
                        by_rtt = samples.setdefault(case.name, {}).setdefault(f"{rtt * 1000:g}", {})
                        by_rtt.setdefault(system.name, []).append(metrics)
                        shown = ", ".join(f"{k}={v}" for k, v in metrics.items())
                        print(
                            f"  {case.name:<16} {system.name:<8} {rtt * 1000:g} ms: {shown}",
                            flush=True,
                        )
    finally:
        origin.stop()
    for case, _, files in prepared:
        results[case.name] = {
            "describe": case.describe(args.seed),
            "files": files,
            "kernel": median(kernel[case.name], "bytes"),
            "remote": {
                rtt: {system: median(runs, "seconds") for system, runs in by_system.items()}
                for rtt, by_system in samples[case.name].items()
            },
        }
    meta = {
        "started": started,
        "seed": args.seed,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "systems": names,
    }
    write_results(
        args.out, f"images-{started}", {"meta": meta, "results": results}, markdown(results, meta)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
