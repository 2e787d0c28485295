"""Every option a user can set, defined once: the CLI, fstab, the man page and the library.

Each `Setting` names a `MountOptions` field (whose default lives there, with the reason for
it), its command-line flag, how text becomes a value, its help, and the doors it applies to.
From this one table come:

* the options of ``remotefs mount`` (`add_arguments`), and so the fstab ``-o`` mapping
  (`remotefs.mount_helper` reads the parser) and the man page (`packaging/make_manpage.py`
  reads the parser too);
* the keyword arguments of the Python library (`options_from_keywords`), which take the
  same names as the fields (``block_size=65536`` or ``block_size="64K"``).

A setting a door cannot use (``kernel_readahead`` for a library) is refused there with a
message that lists the ones it takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .options import FILL_POLICIES, MountOptions

MOUNT = "mount"
LIBRARY = "library"
SERVE = "serve"
EVERYWHERE = frozenset({MOUNT, LIBRARY, SERVE})

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M`` -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 1M)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def human(value: Any) -> str:
    """A default as the help shows it: sizes in K/M/G, seconds and words as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if value % size == 0:
                return f"{value // size}{unit}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Setting:
    """One option: a `MountOptions` field and how each door takes it."""

    field: str
    help: str
    #: Text -> value (the command line, fstab, and strings given to the library).
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    #: A flag that sets the field to this value (``--insecure``: True, ``--no-http2``: False).
    flag_value: Any = None
    flag: str | None = None
    doors: frozenset[str] = EVERYWHERE
    #: What the help shows as the default, when not the field's own.
    shown_default: str | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    def default(self) -> Any:
        for item in dataclasses.fields(MountOptions):
            if item.name == self.field:
                if item.default is not dataclasses.MISSING:
                    return item.default
                return None
        raise KeyError(self.field)


SETTINGS: tuple[Setting, ...] = (
    Setting("block_size", "cache granularity, a power of two >= 4K", parse_size, "SIZE"),
    Setting("min_request", "smallest Range request sent", parse_size, "SIZE"),
    Setting("max_connections", "connections shared by all downloads", positive_int, "N"),
    Setting(
        "read_deadline",
        "seconds a read may wait for the network, retries included, before EIO; the same"
        " handle's reads of a range that failed then fail at once for as long",
        positive_float,
        "SEC",
    ),
    Setting(
        "stall_timeout",
        "seconds without a byte before a response is abandoned and retried",
        positive_float,
        "SEC",
    ),
    Setting(
        "probe_timeout",
        "seconds to reach each URL (from when its request may be sent) before it is left"
        " out or served from cache",
        positive_float,
        "SEC",
    ),
    Setting(
        "probe_connections",
        "probes in flight per origin (scheme, host, port) while listing",
        positive_int,
        "N",
    ),
    Setting(
        "revalidate",
        "seconds a file stays fresh when its origin does not say (Cache-Control, Expires);"
        " given, it also caps what the origin says; 0 asks on every open",
        non_negative_float,
        "SEC",
        shown_default="60",
    ),
    Setting(
        "revalidate_wait",
        "seconds an open of a stale file (and, at mount, a file known from an earlier run)"
        " waits for its origin to confirm it before the cached version is used",
        non_negative_float,
        "SEC",
    ),
    Setting(
        "list_ttl",
        "seconds a directory source's listing is used before it is asked for again"
        " (conditionally); new files appear, removed ones vanish",
        positive_float,
        "SEC",
        doors=frozenset({MOUNT, SERVE}),
    ),
    Setting(
        "checkpoint_interval", "seconds between saves of download progress", positive_float, "SEC"
    ),
    Setting("readahead_max", "largest readahead window of a sequential reader", parse_size, "SIZE"),
    Setting(
        "prefetch_tail",
        "bytes of a file's end fetched when it is opened, 0 to disable",
        parse_size,
        "SIZE",
    ),
    Setting(
        "prefetch_head",
        "bytes of a file's start fetched when it is opened, 0 to disable",
        parse_size,
        "SIZE",
    ),
    Setting(
        "fill",
        "what background fill completes when idle: the files a program has read (opened),"
        " every listed file (all), or nothing (none)",
        str,
        choices=FILL_POLICIES,
    ),
    Setting("fill", "the same as --fill none", flag="--no-fill", flag_value="none"),
    Setting(
        "fill_idle",
        "seconds without a read before background fill starts",
        positive_float,
        "SEC",
    ),
    Setting("fill_connections", "connections background fill may use", positive_int, "N"),
    Setting(
        "fill_rate",
        "bandwidth cap of background fill in bytes/s, e.g. 10M (0: none)",
        parse_size,
        "SIZE",
    ),
    Setting(
        "min_free",
        "free space of the cache filesystem that background fill and prefetch never use",
        parse_size,
        "SIZE",
        shown_default="5% of the filesystem, at most 2G",
    ),
    Setting(
        "cache_max_size",
        "keep at most this many bytes of cached blocks, evicting the least recently used"
        " (files nobody has open first); at least 4M (0: no cap)",
        parse_size,
        "SIZE",
    ),
    Setting(
        "kernel_readahead",
        "the kernel's own readahead and largest read request, up to 1M (root only)",
        parse_size,
        "SIZE",
        doors=frozenset({MOUNT}),
    ),
    Setting("user_agent", "User-Agent header", str, "STR"),
    Setting(
        "proxy",
        "send all requests through this proxy (http://, https://, socks5://, socks5h://);"
        " default: the HTTP_PROXY/HTTPS_PROXY/ALL_PROXY/NO_PROXY environment variables",
        str,
        "URL",
        shown_default="the environment",
    ),
    Setting(
        "http2",
        "never use HTTP/2 (by default it is offered to HTTPS servers)",
        flag="--no-http2",
        flag_value=False,
    ),
    Setting("ca_bundle", "PEM file of CA certificates to trust", str, "FILE"),
    Setting("insecure", "do NOT verify TLS certificates (dangerous)", flag_value=True),
    Setting(
        "allow_other",
        "let other users read the mount (FUSE)",
        flag_value=True,
        doors=frozenset({MOUNT}),
    ),
    Setting(
        "status_interval",
        "under systemd, seconds between STATUS= progress reports",
        positive_float,
        "SEC",
        doors=frozenset({MOUNT, SERVE}),
    ),
)


def add_arguments(parser: argparse.ArgumentParser, door: str = MOUNT) -> None:
    """Add the options of *door* to a command's parser (their dest is the field name)."""
    for setting in SETTINGS:
        if door not in setting.doors:
            continue
        if setting.parse is None:
            parser.add_argument(
                setting.option,
                dest=setting.field,
                action="store_const",
                const=setting.flag_value,
                default=argparse.SUPPRESS,
                help=setting.help.replace("%", "%%"),
            )
            continue
        shown = setting.shown_default or human(setting.default())
        parser.add_argument(
            setting.option,
            dest=setting.field,
            type=setting.parse,
            metavar=setting.metavar,
            choices=setting.choices,
            default=argparse.SUPPRESS,
            help=f"{setting.help} (default: {shown})".replace("%", "%%"),
        )


def given(args: argparse.Namespace, door: str = MOUNT) -> dict[str, Any]:
    """The fields the command line set (the rest keep `MountOptions`' defaults)."""
    fields = {setting.field for setting in SETTINGS if door in setting.doors}
    return {name: value for name, value in vars(args).items() if name in fields}


def options_from_keywords(
    keywords: Mapping[str, Any], door: str = LIBRARY, **fixed: Any
) -> MountOptions:
    """`MountOptions` from a door's keyword arguments (library, serve): the same names as
    the fields; a string is parsed as on the command line ("64K"). Raises TypeError for a
    name the door does not take, ValueError for a value that is wrong."""
    allowed = {setting.field: setting for setting in SETTINGS if door in setting.doors}
    values: dict[str, Any] = dict(fixed)
    for name, value in keywords.items():
        setting = allowed.get(name)
        if setting is None:
            raise TypeError(
                f"unknown option {name!r}; the options are: {', '.join(sorted(allowed))}"
            )
        if isinstance(value, str) and setting.parse is not None and setting.parse is not str:
            try:
                value = setting.parse(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{name}: {err}") from None
        values[name] = value
    return MountOptions(**values)


def library_settings() -> Iterable[Setting]:
    """The settings the library's keyword arguments take (for its docstrings)."""
    return (setting for setting in SETTINGS if LIBRARY in setting.doors)


__all__ = [
    "SETTINGS",
    "Setting",
    "add_arguments",
    "given",
    "non_negative_float",
    "options_from_keywords",
    "parse_size",
    "positive_float",
    "positive_int",
]
