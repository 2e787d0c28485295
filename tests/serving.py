"""Run the real `remotefs serve` command, and always stop what it started.

Tests use `ServeFactory` (through the ``serve`` fixture): each server is a separate daemon
started exactly as a user starts one (in the background, on port 0), found by the address
it prints, and stopped (killed if need be) when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotefs.daemon.process import wait_for_exit

from .mounting import run_remotefs

_SERVING = re.compile(r"serving (http://\S+)")


@dataclass
class Server:
    """One running `remotefs serve` daemon."""

    url: str  # http://127.0.0.1:PORT
    cache_dir: Path
    urls_file: Path
    pid: int
    token: str | None = None

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urllib.parse.urlsplit(self.url).port
        assert port is not None
        return port

    def file_url(self, path: str) -> str:
        return f"{self.url}/{urllib.parse.quote(path)}"

    @property
    def log_file(self) -> Path:
        return self.cache_dir / "remotefs.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        """The status answer, from the control socket."""
        result = run_remotefs("status", "--cache-dir", self.cache_dir, "--json")
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def stop(self) -> None:
        """Stop it the way users do, and check it saved its state and exited."""
        result = run_remotefs("stop", "--cache-dir", self.cache_dir)
        assert result.returncode == 0, result.stderr
        assert wait_for_exit(self.pid, 30)


def raw_request(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send *data* on a new connection to 127.0.0.1:*port*; everything until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class ServeFactory:
    """Starts servers for one test and stops every one of them at the end."""

    base: Path
    servers: list[Server] = field(default_factory=list)
    counter: int = 0

    def write_urls(self, lines: list[str], name: str = "urls.txt") -> Path:
        path = self.base / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(
        self,
        lines: list[str] | None = None,
        *args: str | os.PathLike[str],
        urls_file: Path | None = None,
        source: str | None = None,
        cache_dir: Path | None = None,
        fill: bool = False,
        token: str | None = None,
        listen: str = "127.0.0.1:0",
    ) -> Server:
        """Serve *lines* (or *urls_file*) and return once the server answers.

        Background fill is off unless *fill*: it would add origin traffic at unpredictable
        moments to tests that count bytes. *token* is written to a 0600 file and passed.
        """
        self.counter += 1
        if urls_file is None and source is None:
            assert lines is not None
            urls_file = self.write_urls(lines, f"serve-urls{self.counter}.txt")
        what = source if source is not None else urls_file
        assert what is not None
        cache_dir = cache_dir or self.base / f"serve-cache{self.counter}"
        extra: list[str | os.PathLike[str]] = list(args) if fill else ["--no-fill", *args]
        if token is not None:
            token_file = self.base / f"token{self.counter}"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            extra += ["--token-file", token_file]
        result = run_remotefs("serve", what, "--listen", listen, "--cache-dir", cache_dir, *extra)
        assert result.returncode == 0, f"serve failed: {result.stderr}"
        found = _SERVING.search(result.stdout)
        assert found, f"no address in {result.stdout!r}"
        pid = _pid_of(cache_dir)
        server = Server(found.group(1), cache_dir, urls_file or Path(os.devnull), pid, token)
        self.servers.append(server)
        return server

    def cleanup(self) -> None:
        for server in self.servers:
            with contextlib.suppress(ProcessLookupError):
                if wait_for_exit(server.pid, 0):
                    continue
                run_remotefs("stop", "--cache-dir", server.cache_dir, timeout=60)
                if not wait_for_exit(server.pid, 10):
                    os.kill(server.pid, signal.SIGKILL)
                    wait_for_exit(server.pid, 5)


def _pid_of(cache_dir: Path) -> int:
    """The daemon's pid, which it writes into the cache directory's lock file."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int((cache_dir / "lock").read_text().split()[0])
        assert time.monotonic() < deadline, "no pid in the cache lock"
        time.sleep(0.05)


def curl(*args: str, timeout: float = 60) -> tuple[int, bytes, dict[str, str]]:
    """Run curl; (status, body, response headers with lower-case names)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile() as headers, tempfile.NamedTemporaryFile() as body:
        result = subprocess.run(
            ["curl", "-sS", "-o", body.name, "-D", headers.name, "-w", "%{http_code}", *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        fields: dict[str, str] = {}
        for line in Path(headers.name).read_text("latin-1").splitlines()[1:]:
            name, colon, value = line.partition(":")
            if colon:
                fields[name.strip().lower()] = value.strip()
        return int(result.stdout), Path(body.name).read_bytes(), fields


__all__: Sequence[str] = ["ServeFactory", "Server", "curl", "raw_request"]
