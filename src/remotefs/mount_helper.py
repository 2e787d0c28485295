"""The mount(8) helper: ``mount -t fuse.remotefs URLS MOUNTPOINT -o OPTIONS`` and fstab lines.

Two ways lead here, both with the same arguments, ``SOURCE MOUNTPOINT [-o OPTIONS] ...``:

- ``-t fuse.remotefs`` (the usual FUSE spelling): mount(8) runs ``/sbin/mount.fuse3``, which
  runs ``remotefs SOURCE MOUNTPOINT -o OPTIONS`` through ``/bin/sh``. mount(8) removes
  ``PATH`` and ``HOME`` from the environment first, so ``remotefs`` must be in the shell's
  default PATH (``/usr/local/bin``, ``/usr/bin``, ...). `remotefs.cli.main` passes this form on.
- ``-t remotefs``: mount(8) runs ``/sbin/mount.remotefs SOURCE MOUNTPOINT [-sfnv] [-o ...]``
  (the ``mount.remotefs`` console script, linked into ``/sbin``).

Each ``-o`` option becomes a ``remotefs mount`` flag: ``key=value`` is ``--key value`` and a
bare ``flag`` is ``--flag``, with ``_`` read as ``-`` (``cache_dir=/var/cache/remotefs`` is
``--cache-dir /var/cache/remotefs``, ``no_fill`` is ``--no-fill``). Options meant for mount(8),
systemd or the kernel (``ro``, ``nosuid``, ``_netdev``, ``x-systemd.*`` ...) are dropped:
remotefs is always read-only, and its files are never executable, set-uid or devices. Any other
option is an error that names it, before anything is mounted.

The daemon then starts in the background, and the command returns once the mount answers, as
mount(8) expects. As root, the cache defaults to ``/var/cache/remotefs`` here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .config.options import SYSTEM_CACHE_DIR

# Options of mount(8), libmount, systemd and the kernel that mean nothing to remotefs. mount.fuse3
# adds "dev,suid" (or "nodev,nosuid,noexec" for "user" mounts) and passes "rw" by default.
GENERIC_OPTIONS = frozenset(
    {
        *("ro", "rw", "defaults", "auto", "noauto", "_netdev", "nofail"),
        *("user", "nouser", "users", "owner", "group"),
        *("dev", "nodev", "suid", "nosuid", "exec", "noexec"),
        *("atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime"),
        *("strictatime", "nostrictatime", "lazytime", "nolazytime"),
        *("sync", "async", "dirsync", "silent", "loud"),
        "default_permissions",  # remotefs always mounts with it
    }
)
GENERIC_PREFIXES = ("x-", "X-", "comment=")
# `remotefs mount` flags that make no sense as mount options.
REFUSED = frozenset({"help", "foreground"})

USAGE = """\
usage: mount.remotefs URLS MOUNTPOINT [-o OPTIONS] [-s] [-f] [-n] [-v]
       (URLS: a file of 'URL [PATH]' lines, or a directory's URL ending in '/')
       remotefs URLS MOUNTPOINT -o OPTIONS          (as run by mount.fuse3)

  -o OPTIONS  comma-separated: key=value for `remotefs mount --key value`, a bare flag for
              `--flag`; '_' reads as '-' (cache_dir=/var/cache/remotefs,allow_other,no_fill).
              Generic mount options (ro, nosuid, _netdev, x-systemd.*, ...) are ignored.
  -s          sloppy: warn about unknown options instead of failing
  -f          fake: check the arguments and options, mount nothing
  -n, -v      accepted and ignored (no mtab; verbose)
"""


class MountOptionError(Exception):
    """A mount option or argument remotefs cannot use; the message names it."""


@dataclass
class HelperArgs:
    """The mount-helper command line, taken apart."""

    source: str
    mountpoint: str
    options: list[str] = field(default_factory=list)
    sloppy: bool = False
    fake: bool = False


def split_options(text: str) -> list[str]:
    """Split ``-o`` text at commas, except inside double quotes (``user_agent="a, b"``)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise MountOptionError(f"unbalanced quote in mount options: {text!r}")
    parts.append("".join(current))
    return [part for part in parts if part]


def parse_helper_args(argv: Sequence[str]) -> HelperArgs:
    """``SOURCE MOUNTPOINT`` plus ``-o OPTS`` (repeatable, or ``-oOPTS``), ``-t``, ``-sfnv``."""
    positional: list[str] = []
    options: list[str] = []
    sloppy = fake = False
    items = iter(argv)
    for item in items:
        if item in ("-o", "-t"):
            value = next(items, None)
            if value is None:
                raise MountOptionError(f"{item} needs a value")
            if item == "-o":
                options += split_options(value)
        elif item.startswith("-o"):
            options += split_options(item[2:])
        elif item.startswith("-t"):
            pass  # the type (fuse.remotefs, remotefs): we know what we are
        elif item.startswith("-") and len(item) > 1 and item[1:].isalpha():
            for letter in item[1:]:
                if letter == "s":
                    sloppy = True
                elif letter == "f":
                    fake = True
                elif letter not in "nv":
                    raise MountOptionError(f"unknown argument -{letter}")
        else:
            positional.append(item)
    if len(positional) != 2:
        raise MountOptionError(f"expected URLS and MOUNTPOINT, got {len(positional)} arguments")
    return HelperArgs(positional[0], positional[1], options, sloppy, fake)


def _mount_actions() -> dict[str, argparse.Action]:
    """``remotefs mount``'s long options, by name without the dashes."""
    from .cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            mount: argparse.ArgumentParser = action.choices["mount"]
            return {
                option[2:]: candidate
                for candidate in mount._actions
                for option in candidate.option_strings
                if option.startswith("--") and option[2:] not in REFUSED
            }
    raise AssertionError("the CLI has no mount command")


def options_to_flags(options: Iterable[str], sloppy: bool = False) -> list[str]:
    """Map mount options to ``remotefs mount`` flags; raise `MountOptionError` on unknown ones.

    With *sloppy*, unknown options are reported on stderr and skipped instead.
    """
    actions = _mount_actions()
    flags: list[str] = []
    for option in options:
        key, has_value, value = option.partition("=")
        if option in GENERIC_OPTIONS or option.startswith(GENERIC_PREFIXES):
            continue
        name = key.strip().replace("_", "-")
        action = actions.get(name)
        try:
            if action is None:
                raise MountOptionError(
                    f"unknown mount option {key!r}; remotefs takes the long options of"
                    " `remotefs mount --help` with '_' or '-' (cache_dir=DIR, allow_other, ...)"
                )
            if action.nargs == 0 and has_value:
                raise MountOptionError(f"mount option {key!r} takes no value")
            if action.nargs != 0 and not has_value:
                raise MountOptionError(f"mount option {key!r} needs a value: {key}=VALUE")
        except MountOptionError as err:
            if not sloppy:
                raise
            sys.stderr.write(f"remotefs: {err} (ignored: sloppy mount)\n")
            continue
        flags.append(f"--{name}")
        if has_value:
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            flags.append(value)
    return flags


def helper_command(argv: Sequence[str], euid: int | None = None) -> tuple[list[str], bool]:
    """The ``remotefs`` argument list that mounts what *argv* asks for, and the fake flag."""
    args = parse_helper_args(argv)
    flags = options_to_flags(args.options, args.sloppy)
    if "--cache-dir" not in flags and (os.geteuid() if euid is None else euid) == 0:
        flags = ["--cache-dir", str(SYSTEM_CACHE_DIR), *flags]
    return ["mount", args.source, args.mountpoint, *flags], args.fake


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mount.remotefs`` and of the ``remotefs URLS MOUNTPOINT -o ...`` form."""
    from .cli import EXIT_USAGE, build_parser
    from .cli import main as cli_main

    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(item in ("-h", "--help") for item in arguments):
        sys.stdout.write(USAGE)
        return 0
    try:
        command, fake = helper_command(arguments)
    except MountOptionError as err:
        sys.stderr.write(f"remotefs: {err}\n{USAGE.splitlines()[0]}\n")
        return EXIT_USAGE
    if "://" not in command[1] and not os.path.isfile(command[1]):
        sys.stderr.write(
            f"remotefs: {command[1]}: no such URL list (commands: remotefs mount URLS"
            " MOUNTPOINT, remotefs unmount MOUNTPOINT; see remotefs --help)\n"
        )
        return EXIT_USAGE
    if fake:
        build_parser().parse_args(command)  # exits 2 with argparse's message on a bad value
        return 0
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
