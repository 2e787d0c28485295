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
from .config.options import MountOptions, default_cache_dir
from .config.settings import MOUNT, positive_float
from .config.settings import add_arguments as add_settings
from .config.settings import given as given_settings
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
    mount.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where downloaded blocks are kept (default: {default_cache_dir()})",
    )
    add_settings(mount, MOUNT)  # every option of config/settings.py that a mount takes
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
            headers=headers,
            **given_settings(args, MOUNT),
        )
    except (ManifestError, MountpointError, HeaderError) as err:
        return _fail(str(err))
    except ValueError as err:
        return _fail(f"invalid option: {err}")
    if options.ca_bundle and not os.access(options.ca_bundle, os.R_OK):
        return _fail(f"--ca-bundle {options.ca_bundle}: not a readable file")
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
