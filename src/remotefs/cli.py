"""Command line: ``remotefs mount URLS MOUNTPOINT`` and ``remotefs unmount MOUNTPOINT``.

Every check that can fail on user input (the URL list, the mountpoint, the options) runs in
the foreground, before anything is mounted, and ends with a one-line message and exit 2. The
daemon then starts in the background and the command returns only once the mount answers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .cache.safe_fs import UnsafePathError, check_private_dir
from .cache.store import CacheDirError
from .config.manifest import (
    HeaderError,
    ManifestEntry,
    ManifestError,
    load_header_file,
    load_manifest,
    parse_header_option,
)
from .config.options import FILL_POLICIES, MountOptions, default_cache_dir
from .control_client import COMMANDS as CONTROL_COMMANDS
from .control_client import add_commands as add_control_commands
from .control_client import run_command as run_control_command
from .daemon.background import Reporter, run_in_background
from .daemon.logs import open_log_file, setup_logging
from .daemon.mountpoint import MountpointError, check_mountpoint, mounted_paths
from .daemon.preflight import (
    PreflightError,
    check_descriptor_limit,
    check_fuse_device,
    check_unprivileged_mount,
    describe_failure,
)
from .daemon.process import wait_for_exit
from .fuse.ops import PID_XATTR

log = logging.getLogger("remotefs")

EXIT_USAGE = 2
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M`` -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 1M)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def positive_float(text: str) -> float:
    """A number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full CLI; every option is documented in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="remotefs",
        description="Show remote HTTP(S) files as read-only local files, downloading only the"
        " bytes that programs read.",
    )
    parser.add_argument("--version", action="version", version=f"remotefs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount the URLs listed in a file",
        description="Mount every URL listed in URLS (one 'URL [PATH]' per line) under"
        " MOUNTPOINT. Returns once the mount answers; the daemon stays in the background.",
    )
    mount.add_argument("urls", type=Path, metavar="URLS", help="file listing 'URL [PATH]' lines")
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    defaults = MountOptions(cache_dir=Path("/"))
    mount.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where downloaded blocks are kept (default: {default_cache_dir()})",
    )
    mount.add_argument(
        "--block-size",
        type=parse_size,
        default=defaults.block_size,
        help="cache granularity, a power of two >= 4K (default: 64K)",
    )
    mount.add_argument(
        "--min-request",
        type=parse_size,
        default=defaults.min_request,
        help="smallest Range request sent (default: 256K)",
    )
    mount.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="connections shared by the whole mount (default: 8)",
    )
    mount.add_argument(
        "--read-deadline",
        type=positive_float,
        default=defaults.read_deadline,
        help="seconds a read may wait for the network, retries included, before EIO (default: 60)",
    )
    mount.add_argument(
        "--stall-timeout",
        type=positive_float,
        default=defaults.stall_timeout,
        help="seconds without a byte before a response is abandoned and retried (default: 20)",
    )
    mount.add_argument(
        "--probe-timeout",
        type=positive_float,
        default=defaults.probe_timeout,
        help="seconds to reach each URL at mount before it is left out or served from cache"
        " (default: 10)",
    )
    mount.add_argument(
        "--probe-connections",
        type=int,
        default=defaults.probe_connections,
        help="probes in flight per origin (scheme, host, port) while listing (default: 16)",
    )
    mount.add_argument(
        "--revalidate-wait",
        type=non_negative_float,
        default=defaults.revalidate_wait,
        help="seconds an open of a stale file (and, at mount, a file known from an earlier"
        " run) waits for its origin to confirm it before the cached version is used"
        " (default: 2)",
    )
    mount.add_argument(
        "--checkpoint-interval",
        type=positive_float,
        default=defaults.checkpoint_interval,
        help="seconds between saves of download progress (default: 2)",
    )
    mount.add_argument(
        "--readahead-max",
        type=parse_size,
        default=defaults.readahead_max,
        help="largest readahead window of a sequential reader (default: 64M)",
    )
    mount.add_argument(
        "--prefetch-tail",
        type=parse_size,
        default=defaults.prefetch_tail,
        help="bytes of a file's end fetched when it is opened, 0 to disable (default: 1M)",
    )
    mount.add_argument(
        "--prefetch-head",
        type=parse_size,
        default=defaults.prefetch_head,
        help="bytes of a file's start fetched when it is opened, 0 to disable (default: 64K)",
    )
    mount.add_argument(
        "--fill",
        choices=FILL_POLICIES,
        default=defaults.fill,
        help="what background fill completes when the mount is idle: the files a program has"
        " read (opened, the default), every listed file (all), or nothing (none)",
    )
    mount.add_argument(
        "--no-fill",
        dest="fill",
        action="store_const",
        const="none",
        help="the same as --fill none",
    )
    mount.add_argument(
        "--revalidate",
        type=non_negative_float,
        default=None,
        metavar="SEC",
        help="seconds a file stays fresh when its origin does not say (Cache-Control,"
        " Expires); given, it also caps what the origin says; 0 asks on every open"
        " (default: 60)",
    )
    mount.add_argument(
        "--fill-idle",
        type=positive_float,
        default=defaults.fill_idle,
        help="seconds without a read before background fill starts (default: 2)",
    )
    mount.add_argument(
        "--fill-connections",
        type=int,
        default=defaults.fill_connections,
        help="connections background fill may use (default: 2)",
    )
    mount.add_argument(
        "--fill-rate",
        type=parse_size,
        default=defaults.fill_rate,
        help="bandwidth cap of background fill in bytes/s, e.g. 10M (default: none)",
    )
    mount.add_argument(
        "--min-free",
        type=parse_size,
        default=None,
        help="free space of the cache filesystem that background fill and prefetch never use"
        " (default: 5%% of the filesystem or 2G, whichever is smaller)",
    )
    mount.add_argument(
        "--cache-max-size",
        type=parse_size,
        default=defaults.cache_max_size,
        help="keep at most this many bytes of cached blocks, evicting the least recently used"
        " (files nobody has open first); at least 4M (default: no cap)",
    )
    mount.add_argument(
        "--kernel-readahead",
        type=parse_size,
        default=defaults.kernel_readahead,
        help="the kernel's own readahead and largest read request, up to 1M (root only;"
        " default: 1M)",
    )
    mount.add_argument("--user-agent", default=defaults.user_agent, help="User-Agent header")
    mount.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header sent with every request (repeatable; visible in ps: use"
        " --header-file for secrets)",
    )
    mount.add_argument(
        "--header-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file of request headers for every request, one 'Name: value' per line",
    )
    mount.add_argument(
        "--proxy",
        default=None,
        metavar="URL",
        help="send all requests through this proxy (http://, https://, socks5://, socks5h://);"
        " default: the HTTP_PROXY/HTTPS_PROXY/ALL_PROXY/NO_PROXY environment variables",
    )
    mount.add_argument(
        "--no-http2",
        dest="http2",
        action="store_false",
        help="never use HTTP/2 (by default it is offered to HTTPS servers)",
    )
    mount.add_argument("--ca-bundle", default=None, help="PEM file of CA certificates to trust")
    mount.add_argument(
        "--insecure", action="store_true", help="do NOT verify TLS certificates (dangerous)"
    )
    mount.add_argument(
        "--allow-other", action="store_true", help="let other users read the mount (FUSE)"
    )
    mount.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="log file in the background (default: CACHE_DIR/remotefs.log)",
    )
    mount.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    mount.add_argument(
        "--status-interval",
        type=positive_float,
        default=defaults.status_interval,
        help="under systemd, seconds between STATUS= progress reports (default: 10)",
    )

    unmount = commands.add_parser(
        "unmount",
        aliases=["umount"],
        help="unmount and wait for the daemon to save its state",
        description="Unmount MOUNTPOINT and wait until its daemon has saved its state and exited.",
    )
    unmount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    unmount.add_argument(
        "--timeout", type=positive_float, default=30.0, help="seconds to wait (default: 30)"
    )
    add_control_commands(commands)  # status, prefetch, evict
    return parser


COMMANDS = ("mount", "unmount", "umount", *CONTROL_COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``remotefs`` command.

    ``remotefs URLS MOUNTPOINT -o OPTIONS`` (no command) is the mount-helper form that
    mount.fuse3 runs for ``mount -t fuse.remotefs`` and fstab lines: see `mount_helper`.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) >= 2 and arguments[0] not in COMMANDS and not arguments[0].startswith("-"):
        from .mount_helper import main as mount_helper_main

        return mount_helper_main(arguments)
    args = build_parser().parse_args(arguments)
    if args.command == "mount":
        return cmd_mount(args)
    if args.command in CONTROL_COMMANDS:
        return run_control_command(args)
    return cmd_unmount(args.mountpoint, args.timeout)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"remotefs: {message}\n")
    return code


def cmd_mount(args: argparse.Namespace) -> int:
    """Validate everything, then run the daemon (in the background unless ``-f``)."""
    try:
        entries = load_manifest(args.urls)
        headers = load_header_file(args.header_file) if args.header_file else ()
        headers += tuple(parse_header_option(text) for text in args.header)
        mountpoint = check_mountpoint(args.mountpoint)
        options = MountOptions(
            cache_dir=(args.cache_dir or default_cache_dir()).absolute(),
            block_size=args.block_size,
            min_request=args.min_request,
            max_connections=args.max_connections,
            read_deadline=args.read_deadline,
            stall_timeout=args.stall_timeout,
            probe_timeout=args.probe_timeout,
            probe_connections=args.probe_connections,
            revalidate_wait=args.revalidate_wait,
            revalidate=args.revalidate,
            min_free=args.min_free,
            checkpoint_interval=args.checkpoint_interval,
            kernel_readahead=args.kernel_readahead,
            readahead_max=args.readahead_max,
            prefetch_tail=args.prefetch_tail,
            prefetch_head=args.prefetch_head,
            fill=args.fill,
            fill_idle=args.fill_idle,
            fill_connections=args.fill_connections,
            fill_rate=args.fill_rate,
            cache_max_size=args.cache_max_size,
            user_agent=args.user_agent,
            headers=headers,
            proxy=args.proxy,
            http2=args.http2,
            ca_bundle=args.ca_bundle,
            insecure=args.insecure,
            allow_other=args.allow_other,
            status_interval=args.status_interval,
        )
    except (ManifestError, MountpointError, HeaderError) as err:
        return _fail(str(err))
    except ValueError as err:
        return _fail(f"invalid option: {err}")
    if args.ca_bundle and not os.access(args.ca_bundle, os.R_OK):
        return _fail(f"--ca-bundle {args.ca_bundle}: not a readable file")
    try:
        check_descriptor_limit()
        check_fuse_device()
        check_unprivileged_mount(options.allow_other)
        check_private_dir(options.cache_dir)
    except PreflightError as err:
        return _fail(str(err), 1)
    except UnsafePathError as err:
        return _fail(f"refusing the {err.strerror}", 1)

    source = os.path.abspath(args.urls)  # the mount's source in the mount table, as in fstab

    def serve(reporter: Reporter) -> int:
        return _serve(options, entries, mountpoint, reporter, source, Path(source))

    if args.foreground:
        setup_logging(args.log_level)

        def print_error(text: str) -> None:
            sys.stderr.write(f"remotefs: {text}\n")

        return serve(Reporter(lambda: None, print_error, lambda done, total: None))
    log_file = (args.log_file or options.cache_dir / "remotefs.log").absolute()
    try:  # checked here, where the error can still be one line on the terminal
        log_fd = open_log_file(log_file)
    except UnsafePathError as err:
        return _fail(f"refusing the log file {log_file}: {err.strerror}", 1)
    except OSError as err:
        return _fail(f"cannot write the log file {log_file}: {err.strerror}", 1)

    def child(reporter: Reporter) -> int:
        setup_logging(args.log_level, to_log_file=True)
        return serve(reporter)

    return run_in_background(child, log_fd, str(log_file))


def _serve(
    options: MountOptions,
    entries: list[ManifestEntry],
    mountpoint: Path,
    reporter: Reporter,
    source: str = "remotefs",
    urls_file: Path | None = None,
) -> int:
    """Run one daemon to completion; errors before readiness go to the reporter."""
    from .daemon.serve import Daemon  # imports pyfuse3: only where a mount really happens

    if options.insecure:
        log.warning(
            "TLS certificate verification is OFF (--insecure): anyone on the path"
            " can change the bytes you read"
        )
    daemon = Daemon(options, entries, mountpoint, fsname=source, urls_file=urls_file)
    try:
        daemon.open_cache()
    except CacheDirError as err:
        reporter.error(str(err))
        return 1
    try:
        trio.run(daemon.run, reporter.ready, reporter.progress)
    except KeyboardInterrupt:
        return 130
    except BaseException as err:
        message = describe_failure(err)
        log.error("mount failed: %s", message, exc_info=not isinstance(err, RuntimeError))
        reporter.error(f"mount failed: {message}")
        return 1
    return 0


def cmd_unmount(mountpoint: Path, timeout: float) -> int:
    """Unmount, then wait for the daemon (found through its pid xattr) to exit."""
    target = os.path.abspath(mountpoint)
    pid: int | None = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.getxattr(target, PID_XATTR))
    if target not in mounted_paths():
        return _fail(f"{target} is not mounted", 1)
    commands = [["fusermount3", "-u", target], ["fusermount", "-u", target], ["umount", target]]
    errors = []
    for command in commands:
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            break
        errors.append(result.stderr.strip())
    else:
        return _fail(f"could not unmount {target}: {'; '.join(errors) or 'no unmount tool'}", 1)
    if pid is not None and not wait_for_exit(pid, timeout):
        return _fail(f"unmounted, but daemon {pid} did not exit within {timeout:.0f}s", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
