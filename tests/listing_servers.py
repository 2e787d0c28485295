"""Real web servers that list directories, each started by a test with a configuration of its
own on 127.0.0.1 (never the system's service): nginx (HTML and JSON autoindex), Apache 2
(mod_autoindex with fancy indexing), lighttpd (mod_dirlisting), Caddy (file_server browse,
where the release has it), ``python3 -m http.server``, and moto's S3 server.

Every server runs in the foreground as a child of the test, logs into its own directory and
is stopped (killed if need be) when its context ends.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .requirements import unavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ListingServer:
    """A running server: its base URL, and what its listings leave out."""

    name: str
    url: str
    #: Leaves names that start with "." out of its listings.
    hides_dotfiles: bool
    #: Its listings give exact sizes (JSON).
    exact_sizes: bool
    #: Extra request headers its listings need (``Accept`` for Caddy's JSON).
    headers: tuple[tuple[str, str], ...] = ()


def _wait_answering(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{url}: the server exited: {log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (a 403 of a server that wants a token is an answer)
        except OSError:
            if time.monotonic() > deadline:
                text = log.read_text(errors="replace")
                raise AssertionError(f"{url}: no answer: {text}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def _running(command: list[str], url: str, log: Path, **kwargs: object) -> Iterator[None]:
    with open(log, "ab") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )  # type: ignore[call-overload]
    try:
        _wait_answering(url, process, log)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait()


def missing_servers() -> list[str]:
    """Tools of the listing servers that are not installed (caddy is optional)."""
    tools = {"nginx": "/usr/sbin/nginx", "apache2": "/usr/sbin/apache2", "lighttpd": None}
    return [
        tool
        for tool, path in tools.items()
        if shutil.which(tool) is None and not (path and Path(path).exists())
    ]


def packaged(name: str) -> bool:
    """True when apt offers package *name* on this machine's release."""
    answer = subprocess.run(
        ["apt-cache", "policy", name], capture_output=True, text=True, check=False
    ).stdout
    return "Candidate:" in answer and "Candidate: (none)" not in answer


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@contextlib.contextmanager
def nginx(
    root: Path, work: Path, token: str | None = None
) -> Iterator[tuple[ListingServer, ListingServer]]:
    """One nginx with two servers: the HTML autoindex and the JSON one. With *token*, every
    request without ``X-Token: <token>`` gets a 403 (listings and files alike)."""
    if "nginx" in missing_servers():
        unavailable("nginx is missing (scripts/setup.sh test installs it)")
    work.mkdir(parents=True, exist_ok=True)
    html, data = free_port(), free_port()
    temp = " ".join(f"{kind}_temp_path {work}/{kind};" for kind in ("client_body", "proxy"))
    temp += " ".join(f" {kind}_temp_path {work}/{kind};" for kind in ("fastcgi", "uwsgi", "scgi"))
    guard = f'if ($http_x_token != "{token}") {{ return 403; }}' if token is not None else ""
    (work / "nginx.conf").write_text(
        # As root, nginx's workers would be nobody's: the test's tree is root's alone.
        f"user root; daemon off; pid {work}/nginx.pid; error_log {work}/error.log;"
        " events {}\n"
        f"http {{ access_log off; {temp}\n"
        f"  server {{ listen 127.0.0.1:{html}; root {root}; {guard}"
        "    location / { autoindex on; } }\n"
        f"  server {{ listen 127.0.0.1:{data}; root {root}; {guard}"
        "    location / { autoindex on; autoindex_format json; } }\n}\n"
    )
    command = [_tool("nginx"), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")]
    with _running(command, f"http://127.0.0.1:{html}/", work / "out.log"):
        yield (
            ListingServer("nginx", f"http://127.0.0.1:{html}", True, False),
            ListingServer("nginx-json", f"http://127.0.0.1:{data}", True, True),
        )


@contextlib.contextmanager
def apache(root: Path, work: Path) -> Iterator[ListingServer]:
    """Apache 2 with mod_autoindex and fancy indexing (sort links, an absolute parent link)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    modules = ["mpm_event", "authz_core", "dir", "autoindex", "mime"]
    loads = "".join(
        f"LoadModule {name}_module /usr/lib/apache2/modules/mod_{name}.so\n" for name in modules
    )
    (work / "apache.conf").write_text(
        f'ServerRoot "{work}"\nPidFile {work}/apache.pid\nListen 127.0.0.1:{port}\n{loads}'
        f"ServerName 127.0.0.1\nErrorLog {work}/error.log\nTypesConfig /etc/mime.types\n"
        f'DocumentRoot "{root}"\n<Directory "{root}">\n  Options +Indexes\n'
        "  IndexOptions FancyIndexing\n  Require all granted\n</Directory>\n"
    )
    command = [_tool("apache2"), "-f", str(work / "apache.conf"), "-DFOREGROUND"]
    with _running(command, f"http://127.0.0.1:{port}/", work / "out.log"):
        yield ListingServer("apache", f"http://127.0.0.1:{port}", False, False)


@contextlib.contextmanager
def lighttpd(root: Path, work: Path) -> Iterator[ListingServer]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (work / "lighttpd.conf").write_text(
        f'server.document-root = "{root}"\nserver.bind = "127.0.0.1"\nserver.port = {port}\n'
        'server.modules = ("mod_dirlisting")\ndir-listing.activate = "enable"\n'
        f'server.pid-file = "{work}/lighttpd.pid"\nserver.errorlog = "{work}/error.log"\n'
    )
    command = [_tool("lighttpd"), "-D", "-f", str(work / "lighttpd.conf")]
    with _running(command, f"http://127.0.0.1:{port}/", work / "out.log"):
        yield ListingServer("lighttpd", f"http://127.0.0.1:{port}", True, False)


@contextlib.contextmanager
def caddy(root: Path, work: Path) -> Iterator[ListingServer]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (work / "Caddyfile").write_text(
        "{\n  admin off\n  auto_https off\n"
        f"  storage file_system {work}/data\n}}\n"
        f"http://127.0.0.1:{port} {{\n  root * {root}\n  file_server browse\n}}\n"
    )
    env = {
        **os.environ,
        "HOME": str(work),
        "XDG_DATA_HOME": str(work),
        "XDG_CONFIG_HOME": str(work),
    }
    command = [_tool("caddy"), "run", "--config", str(work / "Caddyfile"), "--adapter", "caddyfile"]
    with _running(command, f"http://127.0.0.1:{port}/", work / "out.log", env=env):
        yield ListingServer(
            "caddy", f"http://127.0.0.1:{port}", False, True, (("Accept", "application/json"),)
        )


@contextlib.contextmanager
def python_http_server(root: Path, work: Path) -> Iterator[ListingServer]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with _running(
        [*command, "--directory", str(root)], f"http://127.0.0.1:{port}/", work / "out.log"
    ):
        yield ListingServer("python-http.server", f"http://127.0.0.1:{port}", False, False)


@contextlib.contextmanager
def moto_s3(work: Path) -> Iterator[str]:
    """moto's S3 server (path-style buckets at ``http://127.0.0.1:PORT/BUCKET``); its URL."""
    if importlib.util.find_spec("moto") is None:
        unavailable("moto is missing (the test extra installs moto[server])")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    with _running(command, f"http://127.0.0.1:{port}/", work / "out.log", env=env):
        yield f"http://127.0.0.1:{port}"


def put_objects(base: str, objects: dict[str, bytes], public: bool = True) -> None:
    """PUT each path of *objects* (``/bucket`` makes the bucket) to moto at *base*; objects
    are public-read, as anonymous reads need on S3 and on moto."""
    parts = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        for path, body in objects.items():
            is_object = path.strip("/").count("/") >= 1
            headers = {"x-amz-acl": "public-read"} if public and is_object else {}
            connection.request("PUT", urllib.parse.quote(path), body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, (path, response.status)
    finally:
        connection.close()
