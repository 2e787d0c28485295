"""Directory mounts: ``ls -l`` of a 10,000-file listing, and what verifying a checksum costs.

    sudo .venv/bin/python -m bench.listings                        # 10,000 files, 0 and 20 ms
    sudo .venv/bin/python -m bench.listings --files 200 --size 64M  # a quick check
    sudo .venv/bin/python -m bench.listings --parts listings --sources html --delay 0.02

Targets from the issue: ``ls -l`` of the mount root under 30 s at 20 ms per request (judged
here on mount + ``ls -l``), and the first byte of a file under 1 s after the mount returns.

**Listings.** The same ``--files`` files (``f00000.bin`` ..., ``--file-size`` bytes each) are
served two ways, each by a real server of its own on 127.0.0.1 (`tests.listing_servers`):

* ``nginx-html``: nginx with ``autoindex on``, directory URL ``http://127.0.0.1:PORT/dir/``
  (an HTML page of links without exact sizes, so each file's size takes a request);
* ``s3-moto``: moto's S3 server, bucket URL ``http://127.0.0.1:PORT/bucket/`` (paginated XML
  with sizes); the keys are PUT over plain HTTP first (`tests.listing_servers.put_objects`);
* ``nginx-json`` (only with ``--sources``): nginx's JSON autoindex, which gives sizes.

Per request delay: every system talks to the server through a `DelayProxy` on 127.0.0.1,
which counts requests and holds back the first bytes of each by the delay (none at 0 ms).
Bytes a client sends on a connection after the server last answered on it start a request
(HTTP/1.1 without pipelining, which is what every system here sends). Connecting costs
nothing extra and responses pass at once, so one request costs one delay, like
`bench.origin.ShapedOrigin`'s delay; nginx and moto sit behind the same kind of proxy, so
both sources see the same link. Each (source, delay) group of rows starts with ``curl -r 0-0``
of 20 files one after another: what one request costs there (a process start included).
Everything shares this machine's CPUs: moto, a Python server, answers far slower than nginx,
so the 0 ms S3 rows show moto's own floor.

For each system, with a fresh cache and mount point, in this order:

* mount: the wall time until the mount command returns and the mount point is a mount;
* first byte: right after that, ``head -c1`` of the last file in name order;
* ``ls -l`` of the mount root (a lookup and a stat of every file), and how many regular files
  it showed; for remotefs also the daemon's resident memory afterwards;
* mount + ``ls -l``: what the ``ls -l`` target is judged on, since a system may list the
  directory before its mount returns (remotefs does) or on the first ``ls`` (lazy peers);
* requests: how many the server saw from the mount to the unmount.

Systems: ``remotefs`` mounts the directory URL (``remotefs mount URL/ MNT --depth 1``; where
this remotefs has no ``--depth`` the row says so); ``remotefs-urls`` mounts a urls.txt naming
every file of the same directory (the list-it-yourself baseline); ``httpdirfs`` (``--cache``,
HTML listings only) and ``rclone`` (``--vfs-cache-mode full --read-only``; its ``http`` backend
for HTML, its ``s3`` backend with ``provider=Other`` for the bucket) when installed, else a
"not installed" row. remotefs runs with ``--no-fill`` (as `bench.scale` does) so that
background downloads do not compete with the listing; ``--fill`` keeps its default.

**Verification.** A ``--size`` random file served by `bench.origin.ShapedOrigin` (no delay)
is read sequentially with ``cat FILE > /dev/null`` (page cache dropped first) through a fresh
remotefs mount of a urls.txt without a checksum, then of one with an indented
``    sha256=HEX`` line below the URL, then of one with a wrong sha256 (that read must fail,
which shows the digest is checked rather than ignored). Baselines from the same run: ``cat``
of the local copy (cold), ``sha256sum`` of it (warm: what hashing costs on this CPU), and
``curl`` of the URL. When the mount refuses the option line (a remotefs without checksums),
the row says "checksum option not available yet".

Results go to ``bench/results/listings-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.listing_servers import moto_s3, nginx, put_objects

from .data import make_random_file
from .results_files import write_results
from .run import Bench, MiB, drop_page_cache, parse_size, running_origin, timed
from .scale import REMOTEFS, ROOT, rss_mib
from .systems import _unmount

Row = dict[str, Any]

TARGET_LS_S = 30.0
TARGET_FIRST_BYTE_S = 1.0
#: The delay at which the ``ls -l`` target applies (the issue's 20 ms).
TARGET_DELAY_MS = 20
#: Longest any one command may take (a peer that stats 10,000 files one by one at 20 ms).
TIMEOUT = 1800
CURL_PROBES = 20
SYSTEMS = ("remotefs", "remotefs-urls", "httpdirfs", "rclone")
SOURCES = ("html", "json", "s3")
BUCKET = "bucket"


# -- the delay -------------------------------------------------------------------------------


class DelayProxy:
    """A TCP proxy on 127.0.0.1 to *target* (``http://host:port``) that holds the first
    bytes of each HTTP request back *delay* seconds.

    Bytes the client sends after the server's last answer on the connection (or first on it)
    start a request; later bytes of the same request (a body) pass at once. Responses pass at
    once. One thread per direction per connection: listings make a few dozen connections.
    """

    def __init__(self, target: str, delay: float) -> None:
        parts = urllib.parse.urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        #: HTTP requests relayed so far (each one's first bytes).
        self.requests = 0

    def __enter__(self) -> DelayProxy:
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:  # shutdown wakes a thread blocked in recv; close does not
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        pair = (client, upstream)
        with self._lock:
            self._sockets.update(pair)
        for sock in pair:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answered = threading.Event()
        answered.set()
        responses = threading.Thread(
            target=self._pump, args=(upstream, client, answered, False), daemon=True
        )
        responses.start()
        self._pump(client, upstream, answered, True)
        responses.join()
        with self._lock:
            self._sockets.difference_update(pair)
        for sock in pair:
            sock.close()

    def _pump(
        self, source: socket.socket, sink: socket.socket, answered: threading.Event, asks: bool
    ) -> None:
        """Copy *source* to *sink* until EOF; *asks*: this is the client-to-server direction."""
        try:
            while data := source.recv(256 * 1024):
                if asks:
                    if answered.is_set():
                        answered.clear()
                        with self._lock:
                            self.requests += 1
                        if self.delay > 0:
                            time.sleep(self.delay)
                else:
                    answered.set()  # before the client can see the answer and ask again
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def curl_probe_ms(urls: list[str]) -> float:
    """Mean wall time of ``curl -r 0-0`` of each of *urls*, one after another, in ms."""
    started = time.monotonic()
    for url in urls:
        timed(["curl", "-sS", "--fail", "-o", "/dev/null", "-r", "0-0", url], timeout=60)
    return round((time.monotonic() - started) / len(urls) * 1000, 2)


# -- the directories ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Directory:
    """One listed directory: its server, its path there (ending in ``/``), and its files."""

    source: str
    base: str
    path: str
    names: list[str]

    def url(self, base: str) -> str:
        """The directory's URL through *base* (the server, or a proxy in front of it)."""
        return f"{base}{self.path}"

    def file_url(self, base: str, name: str) -> str:
        return f"{base}{self.path}{urllib.parse.quote(name)}"


def file_bytes(name: str, size: int) -> bytes:
    """*size* bytes of file *name*: its name over and over (each file differs)."""
    seed = f"{name}\n".encode()
    return (seed * (size // len(seed) + 1))[:size]


def directory_mounts() -> bool:
    """True when this remotefs mounts a directory URL (its ``mount`` has ``--depth``)."""
    return "--depth" in _mount_help()


@functools.cache
def _mount_help() -> str:
    return subprocess.run(
        [*REMOTEFS, "mount", "--help"], capture_output=True, text=True, check=False, cwd=ROOT
    ).stdout


# -- the systems ---------------------------------------------------------------------------


class Unsupported(Exception):
    """This system cannot mount this kind of directory (the row says why)."""


@dataclass
class Mounted:
    """A mount that answers: how long its command took, and remotefs's daemon pid."""

    seconds: float
    pid: int | None = None


def _wait_mounted(mountpoint: Path, started: float, timeout: float = 120) -> float:
    """Seconds from *started* until *mountpoint* is a mount point (a daemonised peer)."""
    while not os.path.ismount(mountpoint):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{mountpoint} was not mounted within {timeout:.0f} s")
        time.sleep(0.01)
    return time.monotonic() - started


def _command(command: list[str]) -> float:
    """Run *command*; its wall time; a RuntimeError with its stderr when it fails."""
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=ROOT
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-400:]
        raise RuntimeError(f"{command[0]} exited {result.returncode}: {detail}")
    return time.monotonic() - started


@dataclass
class Mounts:
    """Mounts a directory with each system, each time with an empty cache and mount point."""

    work: Path
    fill: bool

    def places(self, system: str) -> tuple[Path, Path]:
        cache, mountpoint = self.work / f"cache-{system}", self.work / f"mnt-{system}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        mountpoint.mkdir(exist_ok=True)
        return cache, mountpoint

    def mounter(
        self, system: str
    ) -> Callable[[Directory, str], contextlib.AbstractContextManager[tuple[Mounted, Path]]]:
        return {
            "remotefs": self.remotefs,
            "remotefs-urls": self.remotefs_urls,
            "httpdirfs": self.httpdirfs,
            "rclone": self.rclone,
        }[system]

    @contextlib.contextmanager
    def remotefs(self, directory: Directory, base: str) -> Iterator[tuple[Mounted, Path]]:
        if not directory_mounts():
            raise Unsupported("directory mount not in this remotefs yet (mount has no --depth)")
        with self.remotefs_mount("remotefs", directory.url(base), ["--depth", "1"]) as mounted:
            yield mounted

    @contextlib.contextmanager
    def remotefs_urls(self, directory: Directory, base: str) -> Iterator[tuple[Mounted, Path]]:
        urls = self.work / "urls.txt"
        urls.write_text("".join(f"{directory.file_url(base, n)}\n" for n in directory.names))
        with self.remotefs_mount("remotefs-urls", str(urls), []) as mounted:
            yield mounted

    @contextlib.contextmanager
    def remotefs_mount(
        self, system: str, source: str, extra: list[str]
    ) -> Iterator[tuple[Mounted, Path]]:
        cache, mountpoint = self.places(system)
        options = ["--cache-dir", str(cache), *extra, *([] if self.fill else ["--no-fill"])]
        try:
            seconds = _command([*REMOTEFS, "mount", source, str(mountpoint), *options])
            pid = int(os.getxattr(mountpoint, "user.remotefs.pid"))
            yield Mounted(seconds, pid), mountpoint
        finally:
            unmount_remotefs(mountpoint)

    @contextlib.contextmanager
    def httpdirfs(self, directory: Directory, base: str) -> Iterator[tuple[Mounted, Path]]:
        if directory.source.startswith("s3"):
            raise Unsupported("httpdirfs reads HTML listings only, not S3 buckets")
        cache, mountpoint = self.places("httpdirfs")
        command = ["httpdirfs", "--cache", "--cache-location", str(cache)]
        with self._daemon([*command, directory.url(base), str(mountpoint)], mountpoint) as mounted:
            yield mounted, mountpoint

    @contextlib.contextmanager
    def rclone(self, directory: Directory, base: str) -> Iterator[tuple[Mounted, Path]]:
        cache, mountpoint = self.places("rclone")
        config = self.work / "rclone.conf"
        config.touch()
        if directory.source.startswith("s3"):
            remote = [
                f":s3:{directory.path.strip('/')}",
                str(mountpoint),
                "--s3-provider=Other",
                f"--s3-endpoint={base}",
                "--s3-access-key-id=test",
                "--s3-secret-access-key=test",
                "--s3-region=us-east-1",
                "--s3-force-path-style=true",
            ]
        else:
            remote = [":http:", str(mountpoint), f"--http-url={directory.url(base)}"]
        command = [
            "rclone",
            "mount",
            *remote,
            f"--config={config}",
            "--vfs-cache-mode=full",
            f"--cache-dir={cache}",
            "--read-only",
            "--daemon",
        ]
        with self._daemon(command, mountpoint) as mounted:
            yield mounted, mountpoint

    @contextlib.contextmanager
    def _daemon(self, command: list[str], mountpoint: Path) -> Iterator[Mounted]:
        """Run a peer that daemonises; the time until it returned and its mount is up."""
        started = time.monotonic()
        try:
            _command(command)
            yield Mounted(_wait_mounted(mountpoint, started))
        finally:
            _unmount(mountpoint)  # harmless when it is not mounted
            time.sleep(0.5)  # let the daemon exit before the next mount reuses its cache


def unmount_remotefs(mountpoint: Path) -> None:
    """``remotefs unmount``, and the generic way when that leaves it mounted."""
    try:
        done = subprocess.run(
            [*REMOTEFS, "unmount", str(mountpoint)],
            capture_output=True,
            check=False,
            timeout=120,
            cwd=ROOT,
        ).returncode
    except subprocess.TimeoutExpired:
        done = -1
    if done != 0:  # a stale mount (its daemon died) too, which os.path.ismount cannot see
        _unmount(mountpoint)


def installed(system: str) -> bool:
    return system.startswith("remotefs") or shutil.which(system) is not None


# -- the measurements ---------------------------------------------------------------------------


def first_byte_seconds(path: Path) -> float:
    started = time.monotonic()
    result = subprocess.run(["head", "-c1", str(path)], capture_output=True, timeout=TIMEOUT)
    seconds = time.monotonic() - started
    if result.returncode != 0 or len(result.stdout) != 1:
        raise RuntimeError(f"head -c1 {path}: {result.stderr.decode(errors='replace').strip()}")
    return seconds


def ls_long(mountpoint: Path) -> tuple[float, int, str]:
    """``ls -l`` of *mountpoint*: seconds, regular files shown, and a note when ls failed."""
    started = time.monotonic()
    result = subprocess.run(
        ["ls", "-l", str(mountpoint)], capture_output=True, text=True, timeout=TIMEOUT
    )
    seconds = time.monotonic() - started
    files = sum(1 for line in result.stdout.splitlines() if line.startswith("-"))
    note = ""
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or [""])[0]
        note = f"ls exited {result.returncode}: {first[:160]}"
    return seconds, files, note


def measure(
    mounts: Mounts, system: str, directory: Directory, base: str, delay: float, curl_ms: float
) -> Row:
    """One system on one directory at one delay: mount, first byte, ``ls -l``."""
    row: Row = {
        "source": directory.source,
        "files": len(directory.names),
        "delay_ms": round(delay * 1000),
        "curl_ms": curl_ms,
        "system": system,
    }
    if not installed(system):
        row["note"] = "not installed"
        return row
    try:
        with mounts.mounter(system)(directory, base) as (mounted, mountpoint):
            row["mount_s"] = round(mounted.seconds, 3)
            row["first_byte_s"] = round(first_byte_seconds(mountpoint / directory.names[-1]), 3)
            seconds, files, note = ls_long(mountpoint)
            row |= {"ls_s": round(seconds, 3), "listed": files}
            row["mount_and_ls_s"] = round(row["mount_s"] + row["ls_s"], 3)
            if note:
                row["note"] = note
            if mounted.pid is not None:
                row["rss_mib"] = round(rss_mib(mounted.pid), 1)
    except Unsupported as reason:
        row["note"] = str(reason)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        row["error"] = str(err)[-400:]
    return row


def make_directories(
    stack: contextlib.ExitStack, work: Path, names: list[str], size: int, sources: list[str]
) -> tuple[list[Directory], list[Row]]:
    """Start the servers of *sources* with *names* on them; rows for those that cannot run."""
    directories: list[Directory] = []
    missing: list[Row] = []
    if {"html", "json"} & set(sources):
        www = work / "www"
        (www / "dir").mkdir(parents=True)
        for name in names:
            (www / "dir" / name).write_bytes(file_bytes(name, size))
        html, data = stack.enter_context(nginx(www, work / "nginx"))
        if "html" in sources:
            directories.append(Directory("nginx-html", html.url, "/dir/", names))
        if "json" in sources:
            directories.append(Directory("nginx-json", data.url, "/dir/", names))
    if "s3" in sources:
        if importlib.util.find_spec("moto") is None:
            missing.append({"source": "s3-moto", "note": "moto is not installed"})
        else:
            base = stack.enter_context(moto_s3(work / "moto"))
            started = time.monotonic()
            objects = {f"/{BUCKET}": b""}
            objects |= {f"/{BUCKET}/{name}": file_bytes(name, size) for name in names}
            put_objects(base, objects)
            print(f"PUT {len(names)} keys in {time.monotonic() - started:.1f} s", flush=True)
            directories.append(Directory("s3-moto", base, f"/{BUCKET}/", names))
    return directories, missing


def listing_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    """Every (source, delay, system) row."""
    names = [f"f{index:05d}.bin" for index in range(args.files)]
    mounts = Mounts(work, args.fill)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        directories, rows = make_directories(stack, work, names, args.file_size, args.sources)
        for directory in directories:
            for delay in args.delay:
                with DelayProxy(directory.base, delay) as proxy:
                    probes = [directory.file_url(proxy.url, n) for n in names[:CURL_PROBES]]
                    curl_ms = curl_probe_ms(probes)
                    for system in args.systems:
                        before = proxy.requests
                        row = measure(mounts, system, directory, proxy.url, delay, curl_ms)
                        if "mount_s" in row:
                            row["requests"] = proxy.requests - before
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


def cat_seconds(path: Path, size: int) -> float:
    """Wall time of ``cat PATH > /dev/null`` of *size* bytes; CalledProcessError when the
    read fails, TimeoutExpired when it runs slower than 5 MB/s (a hung read)."""
    command = ["sh", "-c", f"cat {shlex.quote(str(path))} > /dev/null"]
    return timed(command, timeout=60 + size / 5e6)


def verified_read(mounts: Mounts, bench: Bench, url: str, label: str, option: str) -> Row:
    """A cold ``cat`` of *url* through remotefs, with *option* lines below the URL line.

    A wrong sha256 (label starting with "wrong") must make the read fail: that shows the
    other row's digest was checked, not ignored.
    """
    urls = mounts.work / f"urls-{label.replace(' ', '-')}.txt"
    urls.write_text(f"{url}\n{option}")
    row: Row = {"read": f"remotefs, {label}"}
    must_fail = label.startswith("wrong")
    try:
        with mounts.remotefs_mount("remotefs-verify", str(urls), []) as (_, mountpoint):
            drop_page_cache()
            traffic = bench.origin_delta()
            row["seconds"] = cat_seconds(mountpoint / "big.bin", bench.size)
            row |= traffic()
        if must_fail:
            row["note"] = "WARNING: the read succeeded despite a wrong sha256"
    except RuntimeError as err:
        if option:  # the mount refused the option line
            row["note"] = "checksum option not available yet"
            row["mount_error"] = str(err)[-300:]
        else:
            row["error"] = str(err)[-400:]
    except subprocess.CalledProcessError as err:
        if must_fail:
            row["note"] = f"the read failed, as it must (cat exited {err.returncode})"
        else:
            row["error"] = f"cat exited {err.returncode}: the read returned an error"
    except subprocess.TimeoutExpired as err:
        row["error"] = f"the read did not finish within {err.timeout:.0f} s"
    return row


def checksum_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    """A sequential read of one *size* file through remotefs, without and with a sha256."""
    root = work / "origin"
    root.mkdir()
    local = root / "big.bin"
    make_random_file(local, args.size)
    digest = hashlib.sha256()
    with open(local, "rb") as handle:
        while chunk := handle.read(16 * MiB):
            digest.update(chunk)
    rows: list[Row] = []

    def add(row: Row) -> None:
        if "seconds" in row:
            row["MBps"] = round(args.size / row["seconds"] / 1e6, 1)
            row["seconds"] = round(row["seconds"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)

    drop_page_cache()
    add({"read": "local cat (cold)", "seconds": cat_seconds(local, args.size)})
    add({"read": "local sha256sum (warm)", "seconds": timed(["sha256sum", str(local)])})
    with running_origin(root, 0.0, 0, 0) as origin:
        bench = Bench(work, origin, args.size, 0, True)
        url = origin.url("big.bin")
        traffic = bench.origin_delta()
        seconds = timed(["curl", "-sS", "--fail", "-o", "/dev/null", url])
        add({"read": "curl", "seconds": seconds, **traffic()})
        mounts = Mounts(work, args.fill)
        wrong = "0" * 64 if digest.hexdigest() != "0" * 64 else "1" * 64
        for label, option in (
            ("no checksum", ""),
            ("sha256", f"    sha256={digest.hexdigest()}\n"),
            ("wrong sha256", f"    sha256={wrong}\n"),
        ):
            add(verified_read(mounts, bench, url, label, option))
    return rows


# -- the report ------------------------------------------------------------------------------


def _seconds(row: Row, key: str) -> str:
    return f"{row[key]:.2f} s" if key in row else ""


def targets(row: Row) -> str:
    """Whether a row meets the issue's targets ('' when it has no figures)."""
    verdicts = []
    if "first_byte_s" in row:
        ok = row["first_byte_s"] < TARGET_FIRST_BYTE_S
        verdicts.append(f"first byte {'yes' if ok else 'NO'}")
    if "ls_s" in row and row["delay_ms"] == TARGET_DELAY_MS:
        ok = row["mount_and_ls_s"] < TARGET_LS_S and row.get("listed") == row["files"]
        verdicts.append(f"ls {'yes' if ok else 'NO'}")
    return ", ".join(verdicts)


def markdown(meta: Row, listings: list[Row], checks: list[Row]) -> str:
    lines = [f"# Directory mounts {meta['started']}", ""]
    if listings:
        lines += [
            f"{meta['files']:,} files of {meta['file_size']} bytes. Targets: mount + `ls -l`"
            f" under {TARGET_LS_S:.0f} s at {TARGET_DELAY_MS} ms per request; first byte under"
            f" {TARGET_FIRST_BYTE_S:.0f} s after the mount returns. remotefs fill:"
            f" {'default' if meta['fill'] else 'off (--no-fill)'}; {meta['cpus']} CPUs."
            " Requests: what the server saw from mount to unmount.",
            "",
            "| directory | per request (curl) | system | mount returns | first byte | `ls -l`"
            " | mount + `ls -l` | listed | requests | RSS | targets | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in listings:
            delay = f"{r['delay_ms']} ms ({r['curl_ms']} ms)" if "delay_ms" in r else ""
            listed = f"{r['listed']:,} of {r['files']:,}" if "listed" in r else ""
            rss = f"{r['rss_mib']:.0f} MiB" if "rss_mib" in r else ""
            note = r.get("note", "") or (f"error: {r['error']}" if "error" in r else "")
            lines.append(
                f"| {r['source']} | {delay} | {r.get('system', '')} | {_seconds(r, 'mount_s')}"
                f" | {_seconds(r, 'first_byte_s')} | {_seconds(r, 'ls_s')}"
                f" | {_seconds(r, 'mount_and_ls_s')} | {listed} | {r.get('requests', '')} | {rss}"
                f" | {targets(r)} | {note.replace('|', '/').replace(chr(10), ' ')} |"
            )
        lines.append("")
    if checks:
        lines += [
            f"Sequential read of {meta['size_MiB']} MiB (`cat FILE > /dev/null`, page cache"
            " dropped first):",
            "",
            "| read | time | MB/s | origin requests | origin MiB | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in checks:
            origin_mib = f"{r['origin_bytes'] / MiB:.0f}" if "origin_bytes" in r else ""
            note = r.get("note", "") or (f"error: {r['error']}" if "error" in r else "")
            if "mount_error" in r:
                note += f" (mount said: {r['mount_error']})"
            lines.append(
                f"| {r['read']} | {_seconds(r, 'seconds')} | {r.get('MBps', '')}"
                f" | {r.get('origin_requests', '')} | {origin_mib}"
                f" | {note.replace('|', '/').replace(chr(10), ' ')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = list(allowed) if text == "all" else text.split(",")
        unknown = set(chosen) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}")
        return chosen

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.listings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="files in the directory")
    parser.add_argument("--file-size", type=parse_size, default=4096, help="bytes per file")
    parser.add_argument("--delay", type=float, nargs="+", default=[0.0, 0.02], help="seconds")
    parser.add_argument(
        "--sources", type=_choices(SOURCES), default=["html", "s3"], help="html,json,s3 or all"
    )
    parser.add_argument(
        "--systems", type=_choices(SYSTEMS), default=list(SYSTEMS), help=f"{','.join(SYSTEMS)}"
    )
    parser.add_argument("--size", type=parse_size, default=1024 * MiB, help="verified file size")
    parser.add_argument(
        "--parts", type=_choices(("listings", "checksum")), default=["listings", "checksum"]
    )
    parser.add_argument("--fill", action="store_true", help="remotefs with its default fill")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"), help="temp dirs under it")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    # A plain kill must still unmount and stop the servers: the finally blocks do that.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.strftime("%Y%m%d-%H%M%S")
    version = subprocess.run(
        [*REMOTEFS, "--version"], capture_output=True, text=True, check=False, cwd=ROOT
    ).stdout.strip()
    meta: Row = {
        "started": started,
        "remotefs": version,
        "directory_mount": directory_mounts(),
        "files": args.files,
        "file_size": args.file_size,
        "delays_ms": [round(d * 1000) for d in args.delay],
        "size_MiB": args.size // MiB,
        "fill": args.fill,
        "cpus": os.cpu_count(),
    }
    listings: list[Row] = []
    checks: list[Row] = []
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="remotefs-listings-", dir=args.work) as tmp:
        if "listings" in args.parts:
            (Path(tmp) / "listings").mkdir()
            listings = listing_rows(args, Path(tmp) / "listings")
        if "checksum" in args.parts:
            (Path(tmp) / "checksum").mkdir()
            checks = checksum_rows(args, Path(tmp) / "checksum")
    report = {"meta": meta, "listings": listings, "checksum": checks}
    write_results(args.out, f"listings-{started}", report, markdown(meta, listings, checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
