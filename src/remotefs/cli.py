"""Command line: ``remotefs mount URLS MOUNTPOINT``, ``remotefs serve URLS``, ``remotefs
unmount MOUNTPOINT`` (and the control commands of `remotefs.control_client`).

Every check that can fail on user input (the URL list, the mountpoint, the listening address
and token, the options) runs in the foreground, before anything is mounted or listens, and
ends with a one-line message and exit 2. The daemon then starts in the background and the
command returns only once it answers (the mount a stat, the HTTP server a request).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .cache.safe_fs import UnsafePathError
from .cache.store import CacheDirError, check_cache_dir
from .config.manifest import (
    DEFAULT_DEPTH,
    MAX_DEPTH,
    HeaderError,
    ManifestEntry,
    ManifestError,
    command_line_source,
    is_url,
    load_header_file,
    load_manifest,
    parse_header_option,
)
from .config.options import MountOptions, default_cache_dir
from .config.settings import MOUNT, SERVE, positive_float, positive_int
from .config.settings import add_arguments as add_settings
from .config.settings import given as given_settings
from .control_client import COMMANDS as CONTROL_COMMANDS
from .control_client import add_commands as add_control_commands
from .control_client import run_command as run_control_command
from .daemon.background import Reporter, run_in_background
from .daemon.logs import flush_logging, open_log_file, setup_logging
from .daemon.mountpoint import MountpointError, check_mountpoint, mounted_paths
from .daemon.preflight import (
    PreflightError,
    check_descriptor_limit,
    check_fuse_device,
    check_unprivileged_mount,
    describe_failure,
)
from .daemon.process import wait_for_exit
from .fuse.xattr_names import PID_XATTR
from .redact import redact_url
from .serve.listen import (
    DEFAULT_LISTEN,
    HttpSettings,
    Limits,
    ListenError,
    check_exposure,
    load_token,
    parse_listen,
)

log = logging.getLogger("remotefs")

EXIT_USAGE = 2


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """What a daemon serves: a urls.txt file, or a URL (a directory when it ends in '/')."""
    parser.add_argument(
        "urls",
        metavar="URLS",
        help="a file of 'URL [PATH]' lines, or one URL; a URL ending in '/' is a directory:"
        " every file its listing (an autoindex page, a JSON listing, a bucket) shows",
    )
    parser.add_argument(
        "--depth",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"levels of a directory URL to list (default: {DEFAULT_DEPTH}, at most"
        f" {MAX_DEPTH}); in a URL file write depth=N on an indented line below the URL",
    )


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
        " MOUNTPOINT, or the directory a URL ending in '/' lists. Returns once the mount"
        " answers; the daemon stays in the background."
        " With --serve, the same daemon also serves the files over HTTP.",
    )
    _add_source_arguments(mount)
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    _add_daemon_arguments(mount, MOUNT)
    mount.add_argument(
        "--serve",
        default=None,
        metavar="HOST:PORT",
        help="also serve the files over HTTP at this address (loopback unless --token-file;"
        " see remotefs serve)",
    )
    _add_http_arguments(mount)

    serve = commands.add_parser(
        "serve",
        help="serve the URLs listed in a file over HTTP (a local streaming server)",
        description="Serve every URL listed in URLS at http://HOST:PORT/PATH, downloading only"
        " the bytes clients read into the cache (Range requests, conditional requests, an"
        " index of each directory, a live status page at /_remotefs/status). Returns once the"
        " server answers; the daemon stays in the background (remotefs stop ends it).",
    )
    _add_source_arguments(serve)
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where to listen (default: {DEFAULT_LISTEN}; [::1]:PORT for IPv6; port 0 picks a"
        " free one); an address that is not loopback needs --token-file",
    )
    _add_daemon_arguments(serve, SERVE)
    _add_http_arguments(serve)

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
    add_control_commands(commands)  # status, prefetch, evict, reload, stop
    return parser


def _add_daemon_arguments(parser: argparse.ArgumentParser, door: str) -> None:
    """The options every daemon takes: foreground, cache, engine settings, headers, logs."""
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where downloaded blocks are kept (default: {default_cache_dir()})",
    )
    add_settings(parser, door)  # every option of config/settings.py that this door takes
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="request header sent with every request (repeatable; visible in ps: use"
        " --header-file for secrets)",
    )
    parser.add_argument(
        "--header-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file of request headers for every request, one 'Name: value' per line",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="log file in the background (default: CACHE_DIR/remotefs.log)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )


def _add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's own options (`remotefs serve`, `remotefs mount --serve`)."""
    limits = Limits()
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="every HTTP request must carry the token in FILE (Authorization: Bearer TOKEN, or"
        " ?token=TOKEN); FILE must be mode 600; required off loopback",
    )
    parser.add_argument(
        "--http-connections",
        type=positive_int,
        default=limits.connections,
        metavar="N",
        help=f"HTTP connections served at once; more wait (default: {limits.connections})",
    )
    parser.add_argument(
        "--http-idle-timeout",
        type=positive_float,
        default=limits.idle_timeout,
        metavar="SEC",
        help="seconds a client may take to send a request's headers, and a kept-alive"
        f" connection may stay idle (default: {limits.idle_timeout:g})",
    )


COMMANDS = ("mount", "serve", "unmount", "umount", *CONTROL_COMMANDS)


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
    if args.command == "serve":
        return cmd_serve(args)
    if args.command in CONTROL_COMMANDS:
        return run_control_command(args)
    return cmd_unmount(args.mountpoint, args.timeout)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"remotefs: {message}\n")
    return code


def _http_settings(args: argparse.Namespace, address: str | None) -> HttpSettings | None:
    """The HTTP server's settings from the command line (None without an address).

    Raises `ListenError`: a bad address or token file, or a non-loopback address without a
    token.
    """
    if address is None:
        if args.token_file is not None:
            raise ListenError("--token-file is for the HTTP server: add --serve HOST:PORT")
        return None
    listen = parse_listen(address)
    token = load_token(args.token_file) if args.token_file is not None else None
    check_exposure(listen, token)
    limits = Limits(connections=args.http_connections, idle_timeout=args.http_idle_timeout)
    return HttpSettings(listen, token, limits)


def _source_entries(urls: str, depth: int | None) -> list[ManifestEntry]:
    """The manifest of URLS: a urls.txt file, or the one URL given instead of one."""
    if is_url(urls):
        return command_line_source(urls, depth)
    if depth is not None:
        raise ManifestError(
            "--depth",
            None,
            "is for a directory URL given on the command line; in a URL file, write depth=N on"
            " an indented line below the directory's URL",
        )
    return load_manifest(urls)


def cmd_mount(args: argparse.Namespace) -> int:
    """Validate everything, then run the daemon (in the background unless ``-f``)."""
    return _start_daemon(args, MOUNT, args.mountpoint, args.serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """``remotefs serve URLS --listen HOST:PORT``: the HTTP door alone (no FUSE needed)."""
    return _start_daemon(args, SERVE, None, args.listen)


def _start_daemon(
    args: argparse.Namespace, door: str, mount_at: Path | None, address: str | None
) -> int:
    """Check what a daemon needs (URL list, mountpoint, options, machine), then run it."""
    try:
        entries = _source_entries(args.urls, args.depth)
        headers = load_header_file(args.header_file) if args.header_file else ()
        headers += tuple(parse_header_option(text) for text in args.header)
        mountpoint = check_mountpoint(mount_at) if mount_at is not None else None
        options = MountOptions(
            cache_dir=(args.cache_dir or default_cache_dir()).absolute(),
            headers=headers,
            **given_settings(args, door),
        )
        http = _http_settings(args, address)
    except (ManifestError, MountpointError, HeaderError, ListenError) as err:
        return _fail(str(err))
    except ValueError as err:
        return _fail(f"invalid option: {err}")
    if options.ca_bundle and not os.access(options.ca_bundle, os.R_OK):
        return _fail(f"--ca-bundle {options.ca_bundle}: not a readable file")
    if http is not None and importlib.util.find_spec("hypercorn") is None:
        return _fail(
            "serving over HTTP needs hypercorn, which is not installed: pip install"
            " 'remotefs[serve]' (scripts/setup.sh and the Debian package include it)",
            1,
        )
    try:
        check_descriptor_limit()
        if mountpoint is not None:
            check_fuse_device()
            check_unprivileged_mount(options.allow_other)
        check_cache_dir(options.cache_dir)
    except (PreflightError, CacheDirError) as err:
        return _fail(str(err), 1)

    # The mount's source in the mount table, as in fstab.
    urls_file = None if is_url(args.urls) else Path(os.path.abspath(args.urls))
    source = str(urls_file) if urls_file is not None else redact_url(args.urls)
    what = "mount" if mountpoint is not None else "serve"

    def serve(reporter: Reporter) -> int:
        return _serve(options, entries, mountpoint, reporter, source, urls_file, http, what)

    if args.foreground:
        setup_logging(args.log_level)

        def print_error(text: str) -> None:
            sys.stderr.write(f"remotefs: {text}\n")

        return serve(Reporter(lambda said: None, print_error, lambda done, total: None))
    log_file = (args.log_file or options.cache_dir / "remotefs.log").absolute()
    try:  # checked here, where the error can still be one line on the terminal
        log_fd = open_log_file(log_file)
    except UnsafePathError as err:
        return _fail(f"refusing the log file {log_file}: {err.strerror}", 1)
    except OSError as err:
        return _fail(f"cannot write the log file {log_file}: {err.strerror}", 1)

    def child(reporter: Reporter) -> int:
        setup_logging(args.log_level, to_log_file=True)
        try:
            return serve(reporter)
        finally:
            flush_logging()  # the child ends with os._exit: no atexit

    return run_in_background(child, log_fd, str(log_file))


def _serve(
    options: MountOptions,
    entries: list[ManifestEntry],
    mountpoint: Path | None,
    reporter: Reporter,
    source: str = "remotefs",
    urls_file: Path | None = None,
    http: HttpSettings | None = None,
    what: str = "mount",
) -> int:
    """Run one daemon to completion; errors before readiness go to the reporter."""
    from .daemon.serve import Daemon  # the engine, and pyfuse3 only if it mounts

    if options.insecure:
        log.warning(
            "TLS certificate verification is OFF (--insecure): anyone on the path"
            " can change the bytes you read"
        )
    daemon = Daemon(options, entries, mountpoint, fsname=source, urls_file=urls_file, http=http)
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
        log.error("%s failed: %s", what, message, exc_info=not isinstance(err, RuntimeError))
        reporter.error(f"{what} failed: {message}")
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
