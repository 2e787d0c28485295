"""TLS verification against a real HTTPS origin, and credentials that never reach a log.

The HTTPS origin uses a self-signed certificate for 127.0.0.1 made with ``openssl`` at test
time. Verification is on by default, so that origin is refused until it is trusted with
``--ca-bundle`` or, loudly, ``--insecure``.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import write_random
from .mounting import (
    REMOTEFS,
    Mount,
    MountFactory,
    daemon_pid,
    force_unmount,
    is_mounted,
    run_remotefs,
    wait_for_exit,
)
from .origin import Exchange, Origin, _Server

MiB = 1024 * 1024


# -- an HTTPS origin ---------------------------------------------------------------------------


class _TlsServer(_Server):
    """The origin's server, with every accepted connection wrapped in TLS."""

    tls: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the connection's own thread, so a client that rejects the
        # certificate (or never speaks) cannot stall the accept loop; its SSLError is an
        # OSError, which the server treats as a connection the peer broke.
        request.settimeout(10)
        request.do_handshake()
        request.settimeout(None)
        super().finish_request(request, client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        wrapped = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address


class TlsOrigin(Origin):
    """`Origin` over HTTPS. Bodies go through the TLS socket (``sendfile`` would bypass it)."""

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        super().__init__(root)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)

    def _bind(self) -> _Server:
        server = _TlsServer(self, (self.host, self._port))
        server.tls = self.tls
        self._port = server.server_address[1]
        return server

    def url(self, name: str) -> str:
        return "https" + super().url(name).removeprefix("http")

    def _send_full(self, ex: Exchange, fd: int, st: os.stat_result) -> None:
        headers = self._representation_headers(st)
        headers["Content-Length"] = str(st.st_size)
        ex.send_head(200, headers)
        if ex.wants_body:
            _send_body(ex, fd, 0, st.st_size)

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        headers = self._representation_headers(st)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{st.st_size}"
        headers["Content-Length"] = str(end - start)
        ex.send_head(206, headers)
        if ex.wants_body:
            _send_body(ex, fd, start, end - start)


def _send_body(ex: Exchange, fd: int, offset: int, count: int) -> None:
    """Like `Exchange.send_file`, but written through the (TLS) socket object."""
    ex.start = offset if ex.start is None else ex.start
    sock = ex.handler.connection
    position, end = offset, offset + count
    while position < end:
        data = os.pread(fd, min(end - position, 256 * 1024), position)
        if not data:
            ex.handler.close_connection = True  # the file shrank under us
            return
        sock.sendall(data)
        position += len(data)
        ex.body_bytes += len(data)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh self-signed certificate (and key) for 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    return make_certificate(directory)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key into *directory*."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("these tests need the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = f"{openssl} req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    command += " -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(
        [*command.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_origin(origin_root: Path, certificate: tuple[Path, Path]) -> Iterator[TlsOrigin]:
    with TlsOrigin(origin_root, *certificate) as server:
        yield server


def test_https_origin_with_self_signed_certificate(
    tls_origin: TlsOrigin,
    origin_root: Path,
    remotefs: MountFactory,
    certificate: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    data = write_random(origin_root / "f.bin", 2 * MiB + 77, seed=21)
    lines = [tls_origin.url("f.bin")]
    cert, _key = certificate

    # Default: certificates are verified, so this origin is not trusted and the file is left
    # out, with the reason in the log. A failed check is permanent: the mount does not spend
    # its probe timeout retrying it.
    started = time.monotonic()
    mount = remotefs.mount(lines, "--probe-timeout", "60", cache_dir=tmp_path / "c1")
    assert time.monotonic() - started < 30, "a failed certificate check was retried"
    assert os.listdir(mount.path) == []
    log = mount.log_text()
    assert "f.bin: not shown until its URL answers" in log, log
    assert "TLS certificate verification failed: self-signed certificate" in log, log
    assert "TLS certificate verification is OFF" not in log
    mount.unmount()

    # Trusted through --ca-bundle: served, and the bytes are right.
    mount = remotefs.mount(lines, "--ca-bundle", str(cert), cache_dir=tmp_path / "c2")
    assert os.listdir(mount.path) == ["f.bin"]
    assert (mount.path / "f.bin").read_bytes() == data
    assert "TLS certificate verification is OFF" not in mount.log_text()
    tls_origin.wait_idle()
    assert tls_origin.bytes_served("/f.bin") >= len(data)
    mount.unmount()

    # --insecure: served too, and the log says loudly that nothing is verified.
    mount = remotefs.mount(lines, "--insecure", cache_dir=tmp_path / "c3")
    assert (mount.path / "f.bin").read_bytes() == data
    warnings = [line for line in mount.log_text().splitlines() if " WARNING " in line]
    assert any("TLS certificate verification is OFF (--insecure)" in w for w in warnings), warnings
    mount.unmount()


def test_ca_bundle_of_another_certificate_is_still_refused(
    tls_origin: TlsOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    write_random(origin_root / "f.bin", 1000)
    other = tmp_path / "other"
    other.mkdir()
    other_cert, _key = make_certificate(other)
    mount = remotefs.mount(
        [tls_origin.url("f.bin")], "--probe-timeout", "1", "--ca-bundle", str(other_cert)
    )
    assert os.listdir(mount.path) == []
    assert "TLS certificate verification failed" in mount.log_text()


# -- secrets ------------------------------------------------------------------------------------


class RefusingOrigin(Origin):
    """Answers the probe of ``/fails.bin`` but refuses every data range of it (HTTP 403)."""

    def _send_range(self, ex: Exchange, fd: int, st: os.stat_result, start: int, end: int) -> None:
        if ex.path == "/fails.bin" and (start, end) != (0, 1):
            ex.send_head(403, {"Content-Length": "0"})
            return
        super()._send_range(ex, fd, st, start, end)


@pytest.fixture
def refusing_origin(origin_root: Path) -> Iterator[RefusingOrigin]:
    with RefusingOrigin(origin_root) as server:
        yield server


SIG = "SECRETSIG"
PASSWORD = "SECRETPW"


def _with_userinfo(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=f"{user}:{password}@{parts.netloc}").geturl()


def _assert_no_secret(text: str, where: str) -> None:
    for secret in (SIG, PASSWORD):
        assert secret not in text, f"{secret} leaked into {where}:\n{text}"


def test_credentials_in_urls_never_reach_logs_or_errors(
    refusing_origin: RefusingOrigin, origin_root: Path, remotefs: MountFactory, tmp_path: Path
) -> None:
    origin = refusing_origin
    data = write_random(origin_root / "ok.bin", 2 * MiB, seed=22)
    write_random(origin_root / "fails.bin", 2 * MiB, seed=23)
    write_random(origin_root / "auth.bin", 100_000, seed=24)
    query = f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIG}"
    lines = [
        origin.url("ok.bin") + query,
        origin.url("missing.bin") + query,
        origin.url("fails.bin") + query,
        _with_userinfo(origin.url("auth.bin"), "user", PASSWORD),
        _with_userinfo(origin.url("gone.bin"), "user", PASSWORD),
    ]
    urls = remotefs.write_urls(lines)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    args = ["--cache-dir", str(cache), "--probe-timeout", "1", "--read-deadline", "2"]
    result = run_remotefs("mount", urls, mnt, *args, "--log-level", "debug")
    _assert_no_secret(result.stdout + result.stderr, "the output of remotefs mount")
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mnt)
    assert pid is not None
    remotefs.mounts.append(Mount(mnt, cache, urls, pid))  # cleaned up whatever happens

    assert sorted(os.listdir(mnt)) == ["auth.bin", "fails.bin", "ok.bin"]
    assert (mnt / "ok.bin").read_bytes() == data
    assert (mnt / "auth.bin").read_bytes() == (origin_root / "auth.bin").read_bytes()
    # A read that fails: the origin refuses the file's data.
    with pytest.raises(OSError) as info:
        (mnt / "fails.bin").read_bytes()
    assert info.value.errno == errno.EIO
    _assert_no_secret(str(info.value), "the read error")
    # Errors of the CLI itself: mounting again over the live mount, and a bad line.
    again = run_remotefs("mount", urls, mnt, *args)
    assert again.returncode != 0
    _assert_no_secret(again.stderr, "the error of a second mount")
    bad = remotefs.write_urls([*lines, f"ftp://user:{PASSWORD}@host/x{query}"], "bad.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = run_remotefs("mount", bad, elsewhere, *args)
    assert refused.returncode != 0 and "bad.txt:6:" in refused.stderr, refused.stderr
    _assert_no_secret(refused.stderr, "the error for a bad line")

    unmounted = run_remotefs("unmount", mnt)
    _assert_no_secret(unmounted.stdout + unmounted.stderr, "the output of remotefs unmount")
    assert unmounted.returncode == 0
    assert wait_for_exit(pid, 30)
    log = (cache / "remotefs.log").read_text()
    _assert_no_secret(log, "the daemon log")
    # The failures were logged, redacted: the reader can still tell which file failed.
    assert "missing.bin" in log and "gone.bin" in log and "fails.bin" in log
    assert "?<redacted>" in log and "***@" in log

    # The password went where it belongs: in the Authorization header, to the origin.
    origin.wait_idle()
    expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    auth_requests = [r for r in origin.requests if r.path in ("/auth.bin", "/gone.bin")]
    assert {r.path for r in auth_requests} == {"/auth.bin", "/gone.bin"}
    assert all(r.headers.get("authorization") == expected for r in auth_requests)
    # ... and only there: the signed URLs carry no Authorization.
    signed = [r for r in origin.requests if r.path == "/ok.bin"]
    assert signed and all("authorization" not in r.headers for r in signed)

    # Nothing in the cache directory holds a password or a signature: not the entries'
    # metadata, not the catalog, not the log (grep -r, as a user would look).
    assert sorted(os.listdir(cache / "files")), "nothing was cached"
    for secret in (SIG, PASSWORD):
        found = subprocess.run(
            ["grep", "-r", "-a", "-l", secret, str(cache)], capture_output=True, text=True
        )
        assert found.returncode == 1 and found.stdout == "", f"{secret} in {found.stdout}"
    # The URL list supplies the rest: a remount finds the cached bytes of both files.
    origin.wait_idle()
    origin.reset_counters()
    mount = remotefs.mount(urls_file=urls, cache_dir=cache, mountpoint=mnt)
    assert (mnt / "ok.bin").read_bytes() == data
    assert (mnt / "auth.bin").read_bytes() == (origin_root / "auth.bin").read_bytes()
    origin.wait_idle()
    assert origin.bytes_served("/ok.bin") <= 1 and origin.bytes_served("/auth.bin") <= 1
    assert "cannot be trusted" not in mount.log_text()
    assert "belongs to another URL" not in mount.log_text()


def test_secrets_stay_out_of_the_foreground_daemons_stderr(
    refusing_origin: RefusingOrigin, origin_root: Path, tmp_path: Path, fuse_available: None
) -> None:
    origin = refusing_origin
    write_random(origin_root / "ok.bin", 300_000, seed=25)
    write_random(origin_root / "fails.bin", 300_000, seed=26)
    urls = tmp_path / "urls.txt"
    urls.write_text(
        f"{_with_userinfo(origin.url('ok.bin'), 'user', PASSWORD)}\n"
        f"{origin.url('fails.bin')}?sig={SIG}\n"
        f"{_with_userinfo(origin.url('nope.bin'), 'user', PASSWORD)}\n"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    stderr_file = tmp_path / "stderr.txt"
    command = [*REMOTEFS, "mount", "-f", str(urls), str(mnt), "--cache-dir", str(tmp_path / "c")]
    with open(stderr_file, "w") as stderr:
        daemon = subprocess.Popen(
            [*command, "--probe-timeout", "1", "--read-deadline", "2", "--log-level", "debug"],
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and time.monotonic() < deadline:
            assert daemon.poll() is None, stderr_file.read_text()
            time.sleep(0.05)
        assert (mnt / "ok.bin").read_bytes() == (origin_root / "ok.bin").read_bytes()
        with pytest.raises(OSError) as info:
            (mnt / "fails.bin").read_bytes()
        assert info.value.errno == errno.EIO
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        force_unmount(mnt)
        try:
            daemon.wait(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    err = stderr_file.read_text()
    assert daemon.returncode == 0, err
    _assert_no_secret(err, "the foreground daemon's stderr")
    assert "nope.bin" in err and "fails.bin" in err
