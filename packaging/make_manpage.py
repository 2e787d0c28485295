"""Write the remotefs(1) man page, in roff, from the argparse parser of every sub-command.

Usage: python packaging/make_manpage.py [OUTPUT]   (stdout without OUTPUT)

The options, their arguments and their help come from `remotefs.cli.build_parser`, so the page
documents exactly the options the installed command accepts; the mount(8) helper's usage comes
from `remotefs.mount_helper.USAGE`. packaging/build-deb.sh runs this with the packaged
virtualenv's Python, so it describes the code that is shipped.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from remotefs import __version__
from remotefs.cli import build_parser
from remotefs.mount_helper import USAGE as HELPER_USAGE

# Help texts whose default depends on who runs this script (HOME, euid): the page states the
# rule instead.
HELP_OVERRIDES = {
    "--cache-dir": "where downloaded blocks are kept (default: $XDG_CACHE_HOME/remotefs, else"
    " ~/.cache/remotefs; /var/cache/remotefs for root without HOME, as under mount(8))",
}


def roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens of options, and control characters at the
    start of a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n")]
    return "\n".join(lines)


Command = tuple[str, list[str], str, argparse.ArgumentParser]


def subcommands(parser: argparse.ArgumentParser) -> list[Command]:
    """(name, aliases, one-line help, parser) of every sub-command, in definition order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: list[Command] = []
            by_parser: dict[int, list[str]] = {}
            for name, sub in action.choices.items():
                by_parser.setdefault(id(sub), []).append(name)
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                names = by_parser[id(sub)]
                found.append((names[0], names[1:], choice.help or "", sub))
            return found
    raise AssertionError("the CLI has no sub-commands")


def option_label(action: argparse.Action) -> str:
    """``\\fB\\-\\-block\\-size\\fR \\fISIZE\\fR``, ``\\fIURLS\\fR``: the term of a .TP entry."""
    if not action.option_strings:
        return f"\\fI{roff(str(action.metavar or action.dest))}\\fR" + (
            " ..." if action.nargs in ("+", "*") else ""
        )
    names = ", ".join(f"\\fB{roff(name)}\\fR" for name in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices:
        argument = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        argument = str(action.metavar or action.dest.upper())
    return f"{names} \\fI{roff(argument)}\\fR"


def option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    for name in action.option_strings:
        if name in HELP_OVERRIDES:
            return HELP_OVERRIDES[name]
    if action.help is None or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


def usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip()
    return " ".join(text.removeprefix("usage:").split())


def arguments(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        lines += [".TP", option_label(action), roff(option_help(parser, action))]
    return lines


def manpage(today: datetime.date) -> str:
    parser = build_parser()
    commands = subcommands(parser)
    lines = [
        f'.TH REMOTEFS 1 "{today.isoformat()}" "remotefs {__version__}" "User Commands"',
        ".SH NAME",
        "remotefs \\- mount remote HTTP(S) files as read\\-only local files",
        ".SH SYNOPSIS",
    ]
    for _name, _aliases, _help, sub in commands:
        lines += [roff(usage(sub)), ".br"]
    lines += [
        "\\fBmount \\-t fuse.remotefs\\fR \\fIURLS MOUNTPOINT\\fR [\\fB\\-o\\fR \\fIOPTIONS\\fR]",
        ".br",
        "\\fBmount.remotefs\\fR \\fIURLS MOUNTPOINT\\fR [\\fB\\-o\\fR \\fIOPTIONS\\fR]"
        " [\\fB\\-sfnv\\fR]",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        ".PP",
        "\\fIURLS\\fR is a text file with one entry per line: \\fIURL\\fR [\\fIPATH\\fR]."
        " Blank lines and lines starting with # are ignored. \\fIPATH\\fR defaults to the"
        " last segment of the URL's path; a \\fIPATH\\fR with / creates directories.",
        ".PP",
        "Sizes accept the suffixes K, M and G (binary multiples).",
        ".SH GLOBAL OPTIONS",
    ]
    for action in parser._actions:
        if action.option_strings:
            lines += [".TP", option_label(action), roff(option_help(parser, action))]
    lines.append(".SH COMMANDS")
    for name, aliases, summary, sub in commands:
        title = name + "".join(f", {alias}" for alias in aliases)
        lines += [f'.SS "{roff(title)}"', roff(sub.description or summary), *arguments(sub)]
    lines += [
        ".SH MOUNT(8) AND FSTAB",
        "The filesystem type is \\fBfuse.remotefs\\fR (\\fBremotefs\\fR works as well, through"
        " \\fB/usr/sbin/mount.remotefs\\fR) and the source is the URL list:",
        ".PP",
        ".nf",
        "/etc/remotefs/urls.txt /mnt/remote fuse.remotefs"
        " ro,_netdev,cache_dir=/var/cache/remotefs,allow_other 0 0",
        ".fi",
        ".PP",
        ".nf",
        roff(HELPER_USAGE.rstrip()),
        ".fi",
        ".SH SYSTEMD",
        "\\fBremotefs@\\fR\\fINAME\\fR\\fB.service\\fR mounts the URL list"
        " \\fI/etc/remotefs/NAME.txt\\fR with the settings of \\fI/etc/remotefs/NAME.conf\\fR"
        " (MOUNTPOINT=, URLS=, OPTIONS=; see \\fI/usr/share/doc/remotefs/example.conf\\fR)."
        " Its cache is \\fI/var/cache/remotefs/NAME\\fR.",
        ".SH FILES",
        ".TP",
        "\\fI/etc/remotefs/NAME.conf\\fR, \\fI/etc/remotefs/NAME.txt\\fR",
        "Settings and URL list of \\fBremotefs@NAME.service\\fR.",
        ".TP",
        "\\fICACHE_DIR/control.sock\\fR",
        "The control socket of a running mount (status, prefetch, evict).",
        ".TP",
        "\\fICACHE_DIR/remotefs.log\\fR",
        "The log of a daemon running in the background.",
        ".SH SEE ALSO",
        "\\fBmount\\fR(8), \\fBfstab\\fR(5), \\fBfusermount3\\fR(1), \\fBsystemd.service\\fR(5)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    # SOURCE_DATE_EPOCH (reproducible builds) fixes the date in the page's header.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    today = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date()
        if epoch
        else datetime.date.today()
    )
    text = manpage(today)
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
