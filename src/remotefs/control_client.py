"""``remotefs status``, ``prefetch``, ``evict``, ``reload`` and ``stop``: clients of a daemon.

They talk to the daemon over its control socket (see `remotefs.daemon.control` for the
protocol). A mount's daemon is found through the ``user.remotefs.control`` xattr of the
mount root, so only a mountpoint or a path inside a mount is needed; mounts are found in
/proc/self/mounts (type ``fuse.remotefs``). A daemon that only serves HTTP has no mount to
ask: it is found by its cache directory, whose ``control.sock`` it owns (``--cache-dir
DIR``; without it, the default cache directory's daemon is included too). Its files are
named by their paths in the URL list, or by their URLs on the server
(``http://127.0.0.1:8080/videos/clip.mp4``). Every error is one line on stderr and exit
status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .config.options import default_cache_dir
from .daemon.control import MAX_ANSWER, SOCKET_NAME, unix_address
from .daemon.process import wait_for_exit
from .fuse.xattr_names import CONTROL_XATTR
from .units import human_size as human

COMMANDS = ("status", "prefetch", "evict", "reload", "stop")
FSTYPE = "fuse.remotefs"
#: How long one request may take (an eviction fsyncs, and waits briefly for busy files; a
#: reload probes every URL, each for up to --probe-timeout, in parallel).
REQUEST_TIMEOUT = 60.0
#: Refresh interval of the live views on a terminal.
STATUS_REFRESH = 1.0
PREFETCH_POLL = 0.2
#: How long a mount may take to answer the xattr lookup (a stopped daemon never answers).
XATTR_TIMEOUT = 10.0
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class ClientError(Exception):
    """Something the user must hear about: one line, exit status 1."""


# -- finding mounts and their daemons ----------------------------------------------------------


def remotefs_mounts(owner: int | None = None, table: str = "/proc/self/mounts") -> list[str]:
    """Mountpoints of every remotefs mount in the mount *table*, in mount order.

    With *owner*, only the mounts of that user (the kernel's ``user_id=`` option of a FUSE
    mount): the ones whose daemon that user may ask. Another user's mount answers neither its
    root's attributes (without ``allow_other``) nor its control socket (the daemon's own).
    """
    try:
        with open(table, encoding="utf-8", errors="surrogateescape") as lines:
            rows = [line.split(" ") for line in lines.read().splitlines()]
    except OSError:
        return []
    mounts = []
    for fields in rows:
        if len(fields) < 4 or fields[2] != FSTYPE:
            continue
        if owner is not None and f"user_id={owner}" not in fields[3].split(","):
            continue
        mounts.append(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1]))
    return mounts


def locate(path: str, mounts: list[str]) -> tuple[str, str] | None:
    """``(mountpoint, path relative to it)`` of the remotefs mount holding *path*, or None."""
    absolute = os.path.abspath(path)
    for candidate in dict.fromkeys((absolute, os.path.realpath(absolute))):
        inside = [m for m in mounts if candidate == m or candidate.startswith(m.rstrip("/") + "/")]
        if inside:
            mountpoint = max(inside, key=len)
            return mountpoint, os.path.relpath(candidate, mountpoint)
    return None


def control_socket(mountpoint: str) -> Path:
    """The control socket of the daemon serving *mountpoint* (from the root's xattr).

    Looked up in a thread: the kernel waits for a stopped or hung daemon forever, and one
    such mount must not hang `remotefs status` of all mounts.
    """
    answer: list[bytes | OSError] = []

    def lookup() -> None:
        try:
            answer.append(os.getxattr(mountpoint, CONTROL_XATTR))
        except OSError as err:
            answer.append(err)

    thread = threading.Thread(target=lookup, name="xattr", daemon=True)
    thread.start()
    thread.join(XATTR_TIMEOUT)
    if not answer:
        raise ClientError(
            f"{mountpoint}: the mount did not answer within {XATTR_TIMEOUT:.0f}s"
            " (is its daemon stopped or hung?)"
        )
    try:
        if isinstance(answer[0], OSError):
            raise answer[0]
        return Path(os.fsdecode(answer[0]))
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise ClientError(
                f"{mountpoint} is a stale mount: its daemon died; clear it with:"
                f" fusermount3 -u {mountpoint}"
            ) from None
        if err.errno == errno.ENOENT:
            raise ClientError(f"{mountpoint}: no such file or directory") from None
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            if mountpoint in remotefs_mounts():
                raise ClientError(
                    f"{mountpoint}: its daemon has no control socket (see its log)"
                ) from None
            raise ClientError(f"{mountpoint} is not a remotefs mount") from None
        raise ClientError(f"{mountpoint}: {err.strerror}") from None


@dataclass(frozen=True)
class Target:
    """A daemon to talk to: a mount (its socket found through the root's xattr), or the
    daemon of a cache directory (a serve-only one, or any daemon by its directory)."""

    #: The mountpoint, or the cache directory.
    name: str
    #: The control socket, for a daemon found by its cache directory.
    socket: Path | None = None

    @classmethod
    def of_cache(cls, cache_dir: str | os.PathLike[str]) -> Target:
        directory = os.path.abspath(cache_dir)
        return cls(directory, Path(directory) / SOCKET_NAME)

    def connect(self) -> Control:
        return Control(self.name, self.socket)

    def where(self, answer: dict[str, Any], path: str) -> str:
        """How a file of this daemon is shown: its path in the mount, else its HTTP URL."""
        if self.socket is None:
            return os.path.join(self.name, path)
        mountpoint = answer.get("mountpoint")
        if mountpoint:
            return os.path.join(mountpoint, path)
        listen = answer.get("listen") or []
        if listen:
            return f"{listen[0]}/{urllib.parse.quote(path)}"
        return path


def served_path(text: str) -> str:
    """A path of the URL list from what a user typed: ``a/b.mp4``, ``/a/b.mp4`` or the file's
    URL on the server (``http://127.0.0.1:8080/a/b%20c.mp4``)."""
    if text.startswith(("http://", "https://")):
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    return text.strip("/")


def default_server() -> Target | None:
    """The daemon of the default cache directory, when one runs there and has no mount."""
    target = Target.of_cache(default_cache_dir())
    assert target.socket is not None
    if not target.socket.exists():
        return None
    try:
        with target.connect() as control:
            answer = control.request({"cmd": "status", "paths": [""]})
    except ClientError:
        return None
    return target if not answer.get("mountpoint") else None


class Control:
    """One connection to a daemon: a mount's (*path* None: found through the mount root's
    xattr), or the one listening on the control socket *path*."""

    def __init__(self, mountpoint: str, path: Path | None = None) -> None:
        self.mountpoint = mountpoint
        if path is None:
            path = control_socket(mountpoint)
        elif not path.exists():
            raise ClientError(
                f"{mountpoint}: no remotefs daemon uses this cache directory (no {path.name})"
            )
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(REQUEST_TIMEOUT)
        self._buffer = bytearray()
        try:
            with unix_address(path) as address:
                self._sock.connect(address)
        except PermissionError:
            self._sock.close()
            raise ClientError(
                f"{mountpoint}: no permission to use its control socket {path}"
                " (only the user who started the daemon may)"
            ) from None
        except OSError as err:
            self._sock.close()
            raise ClientError(
                f"{mountpoint}: its daemon does not answer on {path}"
                f" ({err.strerror or err}); is it still running?"
            ) from None

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return the answer; a refusal raises `ClientError`."""
        try:
            self._sock.sendall(json.dumps(payload).encode() + b"\n")
            while (newline := self._buffer.find(b"\n")) < 0:
                if len(self._buffer) > MAX_ANSWER:
                    raise ClientError(f"{self.mountpoint}: the daemon's answer is too long")
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    raise ClientError(f"{self.mountpoint}: the daemon closed the connection")
                self._buffer += chunk
        except TimeoutError:
            raise ClientError(
                f"{self.mountpoint}: the daemon did not answer within {REQUEST_TIMEOUT:.0f}s"
            ) from None
        except OSError as err:
            raise ClientError(f"{self.mountpoint}: control socket: {err.strerror}") from None
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        try:
            answer = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ClientError(f"{self.mountpoint}: the daemon's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ClientError(f"{self.mountpoint}: the daemon's answer is not a JSON object")
        if not answer.get("ok"):
            raise ClientError(f"{self.mountpoint}: {answer.get('error', 'request refused')}")
        return answer


def _group_by_daemon(paths: list[str], cache_dir: str | None) -> dict[Target, list[str]]:
    """Each path's daemon and its path there.

    With *cache_dir*, every path is a path of that daemon's URL list (or a file's URL on its
    server). Otherwise a path must exist inside a mount, and a URL
    (``http://127.0.0.1:8080/...``) names a file of the default cache directory's daemon.
    """
    if cache_dir is not None:
        return {Target.of_cache(cache_dir): [served_path(path) for path in paths]}
    mounts = remotefs_mounts()
    groups: dict[Target, list[str]] = {}
    for path in paths:
        if path.startswith(("http://", "https://")):
            server = default_server()
            if server is None:
                raise ClientError(
                    f"{path}: no serving daemon in the default cache directory"
                    f" {default_cache_dir()}; name its cache directory with --cache-dir"
                )
            groups.setdefault(server, []).append(served_path(path))
            continue
        found = locate(path, mounts)
        if found is None:
            raise ClientError(
                f"{path}: not inside a remotefs mount (for a daemon that serves HTTP, give"
                " --cache-dir DIR and the path in its URL list, or the file's URL)"
            )
        try:
            os.stat(path)
        except OSError as err:
            raise ClientError(f"{path}: {err.strerror}") from None
        mountpoint, relative = found
        groups.setdefault(Target(mountpoint), []).append("" if relative == "." else relative)
    return groups


# -- formatting ----------------------------------------------------------------------------------


def bar(percent: float, width: int = 20) -> str:
    """``[########............]``"""
    filled = min(width, int(percent * width / 100))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_status(status: dict[str, Any], *, bars: bool) -> list[str]:
    """The table of one mount's status answer."""
    totals = status["totals"]
    title = status.get("mountpoint") or ", ".join(status.get("listen") or [])
    if status.get("mountpoint") and status.get("listen"):
        title += f" and {', '.join(status['listen'])}"
    lines = [
        f"{title or status.get('cache_dir', '?')}  (pid {status['pid']}; {totals['files']}"
        f" file{'' if totals['files'] == 1 else 's'}, {totals['complete']} complete)"
    ]
    states = totals.get("states")
    if states and len(states) > 1:
        lines.append(
            "  " + ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        )
    paused = (status.get("daemon") or {}).get("reserve", {}).get("paused")
    if paused:
        lines.append(f"  background downloads paused: {paused}")
    rows = [["PATH", "SIZE", "CACHED", "PROGRESS" if bars else "%", "STATE", "RATE", "FETCHED"]]
    rows[0].append("URL")
    notes: dict[int, str] = {}

    def progress(percent: float) -> str:
        return f"{bar(percent)} {percent:5.1f}%" if bars else f"{percent:.1f}%"

    for entry in status["files"]:
        rows.append(
            [
                entry["path"],
                human(entry["size"]),
                human(entry["cached_bytes"]),
                progress(entry["percent"]),
                entry["state"],
                f"{human(entry['rate'])}/s" if entry["rate"] else "-",
                human(entry["origin_bytes"]),
                entry["url"],
            ]
        )
        if entry.get("error"):
            notes[len(rows) - 1] = f"    error: {entry['error']}"
        elif entry.get("prefetch") and entry["prefetch"]["state"] == "failed":
            notes[len(rows) - 1] = f"    prefetch failed: {entry['prefetch']['error']}"
        elif entry.get("prefetch") and entry["prefetch"].get("paused"):
            notes[len(rows) - 1] = f"    prefetch paused: {entry['prefetch']['paused']}"
        elif entry.get("note"):
            notes[len(rows) - 1] = f"    note: {entry['note']}"
        if entry.get("state") == "gone at origin":
            notes[len(rows) - 1] = f"    {entry['error']}"
        if entry.get("verified") == "mismatch":
            notes[len(rows) - 1] = "    its bytes do not match their digest (twice): reads fail"
    hidden = status.get("hidden", 0)
    rows.append(
        [
            "TOTAL",
            human(totals["size"]),
            human(totals["cached_bytes"]),
            progress(totals["percent"]),
            "",
            f"{human(totals['rate'])}/s" if totals["rate"] else "-",
            human(totals["origin_bytes"]),
            "",
        ]
    )
    if totals.get("cache_max_size"):
        cap, used = totals["cache_max_size"], totals["cache_used"]
        lines[0] = (
            f"{lines[0][:-1]}; cache {human(used)} of {human(cap)} cap,"
            f" {human(totals['evicted_bytes'])} evicted)"
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    right = {1, 2, 5, 6}  # sizes and rates
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[column]) if column in right else cell.ljust(widths[column])
            for column, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index in notes:
            lines.append(notes[index])
        if hidden and index == len(rows) - 2:  # before the TOTAL row
            lines.append(f"... {hidden} more files (remotefs status --all shows every one)")
    return lines


class LiveView:
    """Redraws a block of lines in place on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown = 0

    def show(self, lines: list[str]) -> None:
        width = max(40, shutil.get_terminal_size().columns)
        text = "".join(line[: width - 1] + "\n" for line in lines)
        erase = f"\x1b[{self._shown}F\x1b[J" if self._shown else ""
        self._out.write(erase + text)
        self._out.flush()
        self._shown = len(lines)


# -- commands ------------------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Add the status, prefetch, evict, reload and stop sub-commands to the CLI's parsers."""
    cache_help = (
        "the daemon that uses this cache directory (one that only serves HTTP has no mount"
        " to name); PATHs are then paths of its URL list, or the files' URLs on its server"
    )
    status = commands.add_parser(
        "status",
        help="show what each file of a daemon has cached, and what is downloading",
        description="Show every file of MOUNTPOINT (or of every remotefs mount, and the daemon"
        " of the default cache directory): size, cached bytes, state, download rate and bytes"
        " fetched from the origin this session. On a terminal the view refreshes until Ctrl-C.",
    )
    status.add_argument(
        "mountpoint",
        nargs="?",
        metavar="MOUNTPOINT",
        help="a mount, or a path inside one (with --cache-dir: a path of the URL list)",
    )
    status.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    status.add_argument("--json", action="store_true", help="print the status as JSON and exit")
    status.add_argument("--once", action="store_true", help="print one snapshot even on a terminal")
    status.add_argument(
        "--all",
        action="store_true",
        help="every file, also in a mount of more than 100 files (by default only the files"
        " that matter most are shown, with the totals)",
    )
    status.add_argument(
        "--all-users",
        action="store_true",
        help="without MOUNTPOINT, list other users' mounts too (by default only yours: another"
        " user's daemon does not answer you)",
    )
    prefetch = commands.add_parser(
        "prefetch",
        help="download files completely now",
        description="Download the files (or every file under the directories) completely,"
        " and wait until they are. Exits 0 once all are complete.",
    )
    prefetch.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file inside a mount, or a served file's URL"
    )
    prefetch.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    evict = commands.add_parser(
        "evict",
        help="drop the cached data of files",
        description="Drop the cached data of the files (or of every file under the"
        " directories); the next read downloads again. Refused while a file is open or"
        " downloading.",
    )
    evict.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file inside a mount, or a served file's URL"
    )
    evict.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    reload = commands.add_parser(
        "reload",
        help="re-read the URL list of a daemon (as SIGHUP to it does)",
        description="Read the daemon's URL list again: added URLs appear, removed ones"
        " disappear (open files keep working until closed), changed ones are probed and"
        " replaced; no remount. A broken list changes nothing and is reported with its line.",
    )
    reload.add_argument(
        "mountpoint",
        nargs="?",
        metavar="MOUNTPOINT",
        help="a mount, or a path inside one (default: the only remotefs mount, or else the"
        " default cache directory's daemon)",
    )
    reload.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    stop = commands.add_parser(
        "stop",
        help="stop a daemon (remotefs serve), waiting until it saved its state",
        description="Stop the daemon of MOUNTPOINT, or of --cache-dir DIR (default: the daemon"
        " of the default cache directory), as SIGTERM does: it stops serving, unmounts if it"
        " has a mount, saves its state and exits; the command waits for that.",
    )
    stop.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT", help="a mount")
    stop.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    stop.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default: 30)")


def run_command(args: argparse.Namespace) -> int:
    """Run a control command; errors become one line on stderr and exit status 1."""
    try:
        if args.command == "status":
            return cmd_status(
                args.mountpoint,
                as_json=args.json,
                once=args.once,
                every=args.all,
                cache_dir=args.cache_dir,
                all_users=args.all_users,
            )
        if args.command == "prefetch":
            return cmd_prefetch(args.paths, args.cache_dir)
        if args.command == "reload":
            return cmd_reload(args.mountpoint, args.cache_dir)
        if args.command == "stop":
            return cmd_stop(args.mountpoint, args.cache_dir, args.timeout)
        return cmd_evict(args.paths, args.cache_dir)
    except ClientError as err:
        sys.stderr.write(f"remotefs: {err}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `remotefs status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _query(target: Target, paths: list[str] | None, *, every: bool = False) -> dict[str, Any]:
    with target.connect() as control:
        request: dict[str, Any] = {"cmd": "status"}
        if paths is not None:
            request["paths"] = paths
        if every:
            request["all"] = True
        return control.request(request)


def cmd_status(
    target: str | None,
    *,
    as_json: bool,
    once: bool,
    every: bool = False,
    cache_dir: str | None = None,
    all_users: bool = False,
) -> int:
    """``remotefs status [MOUNTPOINT | --cache-dir DIR [PATH]] [--json] [--once]``.

    Without a target: the caller's own mounts (another user's are skipped silently, unless
    *all_users*: then they are listed, each with why it cannot be asked).
    """
    explicit = target is not None or cache_dir is not None
    selection: list[tuple[Target, list[str] | None]]
    if cache_dir is not None:
        paths = None if target is None or not served_path(target) else [served_path(target)]
        selection = [(Target.of_cache(cache_dir), paths)]
    elif target is not None:
        found = locate(target, remotefs_mounts())
        mountpoint, relative = found or (os.path.abspath(target), ".")
        paths = None if relative == "." else [relative]
        selection = [(Target(mountpoint), paths)]
    else:
        owner = None if all_users else os.geteuid()
        selection = [(Target(mountpoint), None) for mountpoint in remotefs_mounts(owner)]
        server = default_server()
        if server is not None:
            selection.append((server, None))

    def snapshot() -> tuple[list[dict[str, Any]], list[str]]:
        answers, errors = [], []
        for where, paths in selection:
            try:
                answers.append(_query(where, paths, every=every))
            except ClientError as err:
                if explicit:
                    raise
                answers.append({"ok": False, "mountpoint": where.name, "error": str(err)})
                errors.append(str(err))
        return answers, errors

    answers, errors = snapshot()
    if as_json:
        json.dump(answers[0] if explicit else answers, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 1 if errors else 0
    if not selection:
        print("no remotefs mounts or daemons")
        return 0
    live = sys.stdout.isatty() and not once

    def lines() -> list[str]:
        out: list[str] = []
        for answer in answers:
            if out:
                out.append("")
            if answer["ok"]:
                out.extend(render_status(answer, bars=live))
            else:
                out.append(_error_line(answer["mountpoint"], answer["error"]))
        return out

    if not live:
        sys.stdout.write("".join(line + "\n" for line in lines()))
        return 1 if errors else 0
    view = LiveView(sys.stdout)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            view.show([*lines(), "(refreshing every second; Ctrl-C to quit)"])
            time.sleep(STATUS_REFRESH)
            answers, errors = snapshot()
    return 0


def _error_line(mountpoint: str, error: str) -> str:
    """*error* naming *mountpoint* once (most errors name it already)."""
    return error if error.startswith(mountpoint) else f"{mountpoint}: {error}"


def cmd_prefetch(paths: list[str], cache_dir: str | None = None) -> int:
    """``remotefs prefetch PATH...``: start the downloads, then follow them to the end."""
    groups = _group_by_daemon(paths, cache_dir)
    names: dict[Target, list[str]] = {}
    for target, relatives in groups.items():
        with target.connect() as control:
            names[target] = control.request({"cmd": "prefetch", "paths": relatives})["files"]
    view = LiveView(sys.stdout) if sys.stdout.isatty() else None
    while True:
        files: list[tuple[str, dict[str, Any]]] = []
        for target, selected in names.items():
            answer = _query(target, selected, every=True)
            files.extend((target.where(answer, entry["path"]), entry) for entry in answer["files"])
        outcomes = [(where, entry, _prefetch_outcome(entry)) for where, entry in files]
        if view is not None:
            view.show([_progress_line(where, entry) for where, entry, _ in outcomes])
        if all(outcome is not None for _, _, outcome in outcomes):
            break
        time.sleep(PREFETCH_POLL)
    failed = 0
    for where, entry, outcome in outcomes:
        if outcome:
            failed += 1
            sys.stderr.write(f"remotefs: prefetch of {where} failed: {outcome}\n")
        elif view is None:
            print(f"{where}: complete ({human(entry['size'])})")
    return 1 if failed else 0


def _prefetch_outcome(entry: dict[str, Any]) -> str | None:
    """None while the file's prefetch runs, "" once complete, else why it failed."""
    if entry["state"] == "complete":
        return ""
    job = entry.get("prefetch")
    if job is None:
        return "stopped (the file was evicted meanwhile)"
    if job["state"] == "failed":
        return str(job["error"])
    if job["state"] == "done":
        return "stopped before the file was complete (evicted meanwhile?)"
    if job.get("paused"):
        return f"paused: {job['paused']}; it goes on by itself once there is room"
    return None


def _progress_line(where: str, entry: dict[str, Any]) -> str:
    """``[####....]  40.0%  path  1.0 MiB of 2.5 MiB  3.1 MiB/s  filling``."""
    rate = f"  {human(entry['rate'])}/s" if entry["rate"] else ""
    return (
        f"{bar(entry['percent'])} {entry['percent']:5.1f}%  {where}"
        f"  {human(entry['cached_bytes'])} of {human(entry['size'])}{rate}  {entry['state']}"
    )


def cmd_evict(paths: list[str], cache_dir: str | None = None) -> int:
    """``remotefs evict PATH...``."""
    for target, relatives in _group_by_daemon(paths, cache_dir).items():
        with target.connect() as control:
            answer = control.request({"cmd": "evict", "paths": relatives})
            shown = control.request({"cmd": "status", "paths": [""]}) if target.socket else {}
        for entry in answer["files"]:
            where = target.where(shown, entry["path"])
            print(f"evicted {where} ({human(entry['freed'])} dropped)")
    return 0


def _one_daemon(target: str | None, cache_dir: str | None) -> Target:
    """The daemon a reload or stop is for: named, or the only mount, or the default cache
    directory's serving daemon."""
    if cache_dir is not None:
        return Target.of_cache(cache_dir)
    mounts = remotefs_mounts()
    if target is not None:
        found = locate(target, mounts)
        return Target(found[0] if found else os.path.abspath(target))
    server = default_server()
    if len(mounts) == 1 and server is None:
        return Target(mounts[0])
    if not mounts and server is not None:
        return server
    if not mounts:
        raise ClientError("no remotefs mounts or daemons")
    names = [*mounts, *([server.name] if server is not None else [])]
    raise ClientError(
        f"{len(names)} remotefs daemons; name one (a MOUNTPOINT, or --cache-dir DIR):"
        f" {' '.join(names)}"
    )


def cmd_reload(target: str | None, cache_dir: str | None = None) -> int:
    """``remotefs reload [MOUNTPOINT | --cache-dir DIR]``: one summary line, or the URL
    list's error."""
    daemon = _one_daemon(target, cache_dir)
    with daemon.connect() as control:
        answer = control.request({"cmd": "reload"})
    pending = f", {answer['pending']} not listed yet" if answer.get("pending") else ""
    print(
        f"{daemon.name}: reloaded {answer['urls']}: {answer['added']} added,"
        f" {answer['removed']} removed, {answer['changed']} changed{pending}"
        f" ({answer['files']} file{'' if answer['files'] == 1 else 's'};"
        f" {answer['revalidating']} being confirmed with their origins)"
    )
    return 0


def cmd_stop(target: str | None, cache_dir: str | None, timeout: float) -> int:
    """``remotefs stop [MOUNTPOINT | --cache-dir DIR]``: stop, and wait until it exited."""
    if target is None and cache_dir is None:
        daemon = default_server()
        if daemon is None:
            raise ClientError(
                f"no daemon serves from the default cache directory {default_cache_dir()};"
                " name one: remotefs stop MOUNTPOINT, or remotefs stop --cache-dir DIR"
            )
    else:
        daemon = _one_daemon(target, cache_dir)
    with daemon.connect() as control:
        pid = int(control.request({"cmd": "stop"})["pid"])
    if not wait_for_exit(pid, timeout):
        raise ClientError(f"{daemon.name}: daemon {pid} did not exit within {timeout:.0f}s")
    print(f"{daemon.name}: stopped (daemon {pid} saved its state)")
    return 0
