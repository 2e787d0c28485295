"""Proxies through a real mount: ``--proxy`` (HTTP and SOCKS5) and the proxy variables.

Each proxy counts what it forwarded, so these tests prove the requests went through it, not
just that the bytes arrived.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import write_random
from .mounting import REMOTEFS, Mount, MountFactory, daemon_pid
from .origin import Origin
from .proxies import HttpForwardProxy, Socks5Proxy

PROXY_PASSWORD = "PROXYSECRETPW"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def http_proxy() -> Iterator[HttpForwardProxy]:
    proxy = HttpForwardProxy()
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def socks_proxy() -> Iterator[Socks5Proxy]:
    proxy = Socks5Proxy()
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _mount(
    remotefs: MountFactory,
    lines: list[str],
    tmp_path: Path,
    name: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> tuple[Mount, str]:
    """Mount with exactly the proxy variables in *env* (none else); return mount and output."""
    urls = remotefs.write_urls(lines, f"{name}.txt")
    mnt, cache = tmp_path / f"mnt-{name}", tmp_path / f"cache-{name}"
    mnt.mkdir()
    environment = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_VARIABLES  # the machine's own proxy settings stay out
    }
    environment.update(env or {})
    command = [*REMOTEFS, "mount", str(urls), str(mnt), "--cache-dir", str(cache), "--no-fill"]
    command += ["--log-level", "debug", "--probe-timeout", "5", *args]
    result = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mnt)
    assert pid is not None
    mount = Mount(mnt, cache, urls, pid)
    remotefs.mounts.append(mount)
    return mount, result.stdout + result.stderr


def _origin_gets(origin: Origin, path: str) -> int:
    origin.wait_idle()
    return len([r for r in origin.requests if r.path == path and r.method == "GET"])


def test_http_proxy_option_with_credentials(
    http_proxy: HttpForwardProxy,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
    tmp_path: Path,
) -> None:
    data = write_random(origin_root / "f.bin", 1_500_000, seed=41)
    proxy_url = f"http://user:{PROXY_PASSWORD}@127.0.0.1:{http_proxy.port}"
    # --proxy wins over the variables, NO_PROXY included.
    env = {"NO_PROXY": "127.0.0.1,localhost", "HTTP_PROXY": "http://127.0.0.1:9"}
    mount, output = _mount(
        remotefs, [origin.url("f.bin")], tmp_path, "http", "--proxy", proxy_url, env=env
    )
    assert (mount.path / "f.bin").read_bytes() == data
    mount.unmount()
    gets = _origin_gets(origin, "/f.bin")
    forwarded = [u for u in http_proxy.requests if u.startswith(origin.url("f.bin"))]
    assert gets >= 2 and len(forwarded) == gets, (gets, http_proxy.requests)
    expected = "Basic " + base64.b64encode(f"user:{PROXY_PASSWORD}".encode()).decode()
    assert set(http_proxy.proxy_authorizations) == {expected}
    for text, where in ((output, "remotefs mount output"), (mount.log_text(), "the log")):
        assert PROXY_PASSWORD not in text, f"proxy password leaked into {where}:\n{text}"
    assert f"all requests go through the proxy http://***@127.0.0.1:{http_proxy.port}" in (
        mount.log_text()
    )


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_socks5_proxy_option(
    scheme: str,
    socks_proxy: Socks5Proxy,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
    tmp_path: Path,
) -> None:
    data = write_random(origin_root / "f.bin", 1_200_000, seed=42)
    proxy_url = f"{scheme}://127.0.0.1:{socks_proxy.port}"
    mount, _output = _mount(remotefs, [origin.url("f.bin")], tmp_path, scheme, "--proxy", proxy_url)
    assert (mount.path / "f.bin").read_bytes() == data
    mount.unmount()
    assert _origin_gets(origin, "/f.bin") >= 2
    assert socks_proxy.connections, "no connection went through the SOCKS proxy"
    assert set(socks_proxy.connections) == {("127.0.0.1", origin.port)}
    assert socks_proxy.bytes_relayed >= len(data)


def test_proxy_environment_variables_apply_without_the_option(
    http_proxy: HttpForwardProxy,
    origin: Origin,
    origin_root: Path,
    remotefs: MountFactory,
    tmp_path: Path,
) -> None:
    data = write_random(origin_root / "f.bin", 800_000, seed=43)
    lines = [origin.url("f.bin")]
    mount, _output = _mount(remotefs, lines, tmp_path, "env", env={"HTTP_PROXY": http_proxy.url})
    assert (mount.path / "f.bin").read_bytes() == data
    mount.unmount()
    gets = _origin_gets(origin, "/f.bin")
    assert gets >= 2 and len(http_proxy.requests) == gets, (gets, http_proxy.requests)

    # NO_PROXY exempts the origin: the proxy sees nothing more.
    before = len(http_proxy.requests)
    env = {"HTTP_PROXY": http_proxy.url, "NO_PROXY": "127.0.0.1"}
    mount, _output = _mount(remotefs, lines, tmp_path, "noproxy", env=env)
    assert (mount.path / "f.bin").read_bytes() == data
    mount.unmount()
    assert len(http_proxy.requests) == before


def test_bad_proxy_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/f.bin\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    command = [*REMOTEFS, "mount", str(urls), str(mnt), "--cache-dir", str(tmp_path / "c")]
    result = subprocess.run(
        [*command, "--proxy", f"ftp://user:{PROXY_PASSWORD}@127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--proxy must be a URL starting with http://" in result.stderr, result.stderr
    assert PROXY_PASSWORD not in result.stderr
