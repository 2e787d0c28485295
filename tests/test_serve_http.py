"""`remotefs serve` as HTTP clients see it: curl against a real server and a real origin.

Every body is compared with the origin's bytes; every header that comes from the origin
(ETag, Last-Modified, Content-Type) with what the origin sent. The server is started as a
user starts it (`remotefs serve`, in the background, on a free port of 127.0.0.1).
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import json
import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from .conftest import need_tool, write_random
from .mounting import run_remotefs
from .origin import Origin
from .serving import ServeFactory, curl

MiB = 1024 * 1024
SECRET = "TOPSECRET4242"


@pytest.fixture(autouse=True)
def _curl() -> None:
    need_tool("curl", "curl")


def origin_headers(origin: Origin, name: str) -> dict[str, str]:
    status, _, headers = curl("-I", origin.url(name))
    assert status == 200
    return headers


def test_ranges_head_304_and_416_equal_the_origins_bytes(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    size = 3 * MiB + 12345
    data = write_random(origin_root / "v.bin", size)
    server = serve.start([origin.url("v.bin")])
    url = server.file_url("v.bin")
    theirs = origin_headers(origin, "v.bin")

    # The whole file, and HEAD: the origin's validators and type, and Accept-Ranges.
    status, body, headers = curl(url)
    assert (status, body) == (200, data)
    for name in ("etag", "last-modified", "content-type"):
        assert headers[name] == theirs[name], name
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-length"] == str(size)
    status, _, head = curl("-I", url)  # curl -I writes the headers as the body
    assert status == 200
    assert head["content-length"] == str(size) and head["etag"] == theirs["etag"]

    # One range each: first byte, middle, last byte, suffix, past EOF (clamped).
    cases = {
        "0-0": (0, 1),
        "1000000-1000999": (1000000, 1001000),
        f"{size - 1}-{size - 1}": (size - 1, size),
        "-500": (size - 500, size),
        f"{size - 10}-{size + 5000}": (size - 10, size),
        "2000000-": (2000000, size),
    }
    for spec, (start, end) in cases.items():
        status, body, headers = curl("-r", spec, url)
        assert status == 206, spec
        assert body == data[start:end], spec
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{size}", spec
        assert headers["content-length"] == str(end - start), spec

    # A range that starts past the end: 416, with the size.
    status, body, headers = curl("-r", f"{size}-", url)
    assert status == 416
    assert headers["content-range"] == f"bytes */{size}"

    # Conditional requests: 304 without a body, then 200 when the validator differs.
    status, body, headers = curl("-H", f"If-None-Match: {theirs['etag']}", url)
    assert (status, body) == (304, b"")
    assert headers["etag"] == theirs["etag"] and "content-length" not in headers
    status, body, _ = curl("-H", f"If-Modified-Since: {theirs['last-modified']}", url)
    assert (status, body) == (304, b"")
    status, body, _ = curl("-H", 'If-None-Match: "another"', "-r", "0-9", url)
    assert (status, body) == (206, data[:10])
    status, _, _ = curl("-H", 'If-Match: "another"', url)
    assert status == 412

    # Several ranges: multipart/byteranges, one part per range, each equal to the origin's.
    status, body, headers = curl("-r", "0-9,2000000-2000099,-7", url)
    assert status == 206
    kind = headers["content-type"]
    assert kind.startswith("multipart/byteranges; boundary=")
    assert headers["content-length"] == str(len(body))
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {kind}\r\n\r\n".encode() + body
    )
    assert isinstance(message, email.message.EmailMessage)
    parts = [(p["Content-Range"], p.get_payload(decode=True)) for p in message.iter_parts()]
    assert parts == [
        (f"bytes 0-9/{size}", data[:10]),
        (f"bytes 2000000-2000099/{size}", data[2000000:2000100]),
        (f"bytes {size - 7}-{size - 1}/{size}", data[-7:]),
    ]


def test_if_range_against_a_file_that_changed_at_the_origin(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    old = write_random(origin_root / "c.bin", 2 * MiB, seed=1)
    # --revalidate 0: every request asks the origin first, as an open of the mount does.
    server = serve.start([origin.url("c.bin")], "--revalidate", "0")
    url = server.file_url("c.bin")
    status, body, headers = curl("-r", "0-99", url)
    assert (status, body) == (206, old[:100])
    etag = headers["etag"]

    time.sleep(0.01)
    new = write_random(origin_root / "c.bin", 2 * MiB + 777, seed=2)
    new_etag = origin_headers(origin, "c.bin")["etag"]
    assert new_etag != etag

    # The client's copy is of the old version: If-Range sends the whole new one.
    status, body, headers = curl("-r", "100-199", "-H", f"If-Range: {etag}", url)
    assert status == 200
    assert body == new
    assert headers["etag"] == new_etag
    # With the new validator, the range applies.
    status, body, headers = curl("-r", "100-199", "-H", f"If-Range: {new_etag}", url)
    assert (status, body) == (206, new[100:200])
    assert headers["content-range"] == f"bytes 100-199/{len(new)}"
    # A Last-Modified date that is not the current one: the whole file too.
    status, body, _ = curl("-r", "0-9", "-H", "If-Range: Mon, 01 Jan 2001 00:00:00 GMT", url)
    assert (status, body) == (200, new)


def test_index_pages_names_and_errors(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    write_random(origin_root / "a.bin", 300_000)
    small = write_random(origin_root / "s.bin", 1000)
    name = "dir \u00e9t\u00e9/clip #1.mp4"
    server = serve.start(
        [
            f"{origin.url('a.bin')}  top.bin",
            f"{origin.url('s.bin')}  {name}",
            f"{origin.url('missing.bin')}  later.bin",  # 404 at the origin: not listed yet
        ]
    )
    # The file under its percent-encoded name.
    encoded = "/" + "/".join(urllib.parse.quote(part) for part in name.split("/"))
    status, body, headers = curl(server.url + encoded)
    assert (status, body) == (200, small)
    assert headers["content-type"] == "application/octet-stream"  # the origin's

    # The root's index, as HTML (with the same encoded link) and as JSON.
    status, body, headers = curl(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert 'href="/dir%20%C3%A9t%C3%A9/"' in page and 'href="/top.bin"' in page
    assert "293.0 KiB" in page  # sizes
    status, body, headers = curl("-H", "Accept: application/json", server.url + "/")
    assert headers["content-type"] == "application/json"
    listing = json.loads(body)
    entries = {entry["name"]: entry for entry in listing["entries"]}
    assert entries["top.bin"]["size"] == 300_000 and entries["top.bin"]["percent"] == 0.0
    assert entries["dir \u00e9t\u00e9"]["type"] == "directory"
    sub = encoded.rsplit("/", 1)[0] + "/"
    status, body, _ = curl("-H", "Accept: application/json", server.url + sub)
    (only,) = json.loads(body)["entries"]
    assert only["name"] == "clip #1.mp4" and only["percent"] == 100.0  # read above
    # A directory without its slash is redirected to it; a file with one is not found.
    status, _, headers = curl(server.url + sub.rstrip("/"))
    assert status == 302 and headers["location"] == sub
    assert curl(server.url + "/top.bin/")[0] == 404

    # What is not in the list: 404, or 503 while its origin has not answered.
    assert curl(server.url + "/nothing")[0] == 404
    status, _, headers = curl(server.url + "/later.bin")
    assert status == 503 and headers["retry-after"] == "5"
    # Escapes: dot segments (raw or encoded) and encoded slashes name nothing.
    for path in ("/../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/dir%20%C3%A9t%C3%A9%2Fclip"):
        assert curl("--path-as-is", server.url + path)[0] == 404, path
    # Only GET and HEAD.
    status, _, headers = curl("-X", "POST", "-d", "x", server.url + "/top.bin")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert curl(server.url + "/_remotefs/health")[:2] == (200, b"ok\n")


def test_request_headers_never_reach_the_origin(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    data = write_random(origin_root / "h.bin", 1 * MiB)
    server = serve.start([origin.url("h.bin")], "--prefetch-head", "0", "--prefetch-tail", "0")
    origin.wait_idle()
    origin.reset_counters()
    client = {
        "Authorization": "Bearer CLIENTSECRET",
        "Cookie": "session=CLIENTSECRET",
        "X-Forwarded-For": "10.9.8.7",
        "User-Agent": "curl-CLIENTSECRET",
        "Referer": "http://CLIENTSECRET.example/",
    }
    args = [arg for name, value in client.items() for arg in ("-H", f"{name}: {value}")]
    status, body, _ = curl(*args, "-r", "1000-1999", server.file_url("h.bin"))
    assert (status, body) == (206, data[1000:2000])
    origin.wait_idle()
    requests = origin.requests
    assert requests, "the range was fetched from the origin"
    for record in requests:
        assert "CLIENTSECRET" not in json.dumps(record.headers)
        assert "x-forwarded-for" not in record.headers and "cookie" not in record.headers
        assert record.headers["user-agent"].startswith("remotefs/")
    # An absolute-form request (as to a proxy) is not fetched from anywhere.
    origin.reset_counters()
    status, _, _ = curl("--proxy", server.url, "http://127.0.0.1:9/elsewhere.bin")
    assert status == 404
    assert not origin.requests


def test_status_page_and_json_show_every_file_and_no_secret(
    origin: Origin, origin_root: Path, serve: ServeFactory, tmp_path: Path
) -> None:
    data = write_random(origin_root / "p.bin", 2 * MiB)
    header_file = tmp_path / "headers"
    header_file.write_text(f"X-Api-Key: {SECRET}\n")
    url = origin.url("p.bin") + f"?X-Signature={SECRET}"
    server = serve.start([url, f"{origin.url('p.bin')}  other/q.bin"], "--header-file", header_file)
    assert curl("-r", "0-99999", server.file_url("p.bin"))[1] == data[:100000]

    status, body, headers = curl(server.url + "/_remotefs/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["listen"] == [server.url]
    rows = {row["path"]: row for row in answer["files"]}
    assert set(rows) == {"p.bin", "other/q.bin"}
    assert rows["p.bin"]["url"].endswith("/p.bin?<redacted>")
    assert rows["p.bin"]["cached_bytes"] >= 100000
    assert answer["totals"]["files"] == 2
    status, page, headers = curl(server.url + "/_remotefs/status")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="rows"' in page and b"/_remotefs/status.json" in page
    for text in (body, page, server.log_text().encode()):
        assert SECRET.encode() not in text
    # /_remotefs is the server's own: it leads to the status page.
    status, _, headers = curl(server.url + "/_remotefs/")
    assert status == 302 and headers["location"] == "/_remotefs/status"
    assert curl(server.url + "/_remotefs/other")[0] == 404


def test_urls_under_the_reserved_name_are_refused(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.bin\nhttp://127.0.0.1:9/b.bin  _remotefs/b.bin\n")
    result = run_remotefs("serve", urls, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"remotefs: {urls}:2: the name '_remotefs' is reserved: remotefs serve keeps its own"
        " pages under /_remotefs/; give this URL another PATH"
    )
    assert not (tmp_path / "cache").exists()


def test_control_commands_work_on_a_serving_daemon(
    origin: Origin, origin_root: Path, serve: ServeFactory, tmp_path: Path
) -> None:
    one = write_random(origin_root / "one.bin", 3 * MiB)
    two = write_random(origin_root / "two.bin", 1 * MiB)
    server = serve.start([origin.url("one.bin"), f"{origin.url('two.bin')}  d/two.bin"])
    cache = str(server.cache_dir)

    # status: found by the cache directory; the table names the server.
    result = run_remotefs("status", "--cache-dir", cache, "--once")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{server.url}  (pid {server.pid}; 2 files, 0 complete)")
    # prefetch: by the path in the list, or by the file's URL on the server.
    result = run_remotefs("prefetch", "--cache-dir", cache, server.file_url("one.bin"), "d")
    assert result.returncode == 0, result.stderr
    assert f"{server.url}/one.bin: complete (3.0 MiB)" in result.stdout
    answer = server.status()
    assert all(row["state"] == "complete" for row in answer["files"])
    origin.wait_idle()
    origin.reset_counters()
    assert curl(server.file_url("one.bin"))[1] == one  # from the cache now
    assert curl(server.file_url("d/two.bin"))[1] == two
    origin.wait_idle()
    assert origin.bytes_served() <= 2  # at most revalidation probes
    # evict: the next read goes to the origin again.
    result = run_remotefs("evict", "--cache-dir", cache, "one.bin")
    assert result.returncode == 0, result.stderr
    assert f"evicted {server.url}/one.bin (3.0 MiB dropped)" in result.stdout
    assert server.status()["files"][1]["cached_bytes"] == 0
    # reload: the list changes, and so does what the server serves.
    server.urls_file.write_text(f"{origin.url('two.bin')}  renamed.bin\n")
    result = run_remotefs("reload", "--cache-dir", cache)
    assert result.returncode == 0, result.stderr
    assert "1 added, 2 removed, 0 changed" in result.stdout
    assert curl(server.file_url("one.bin"))[0] == 404
    assert curl(server.file_url("renamed.bin"))[1] == two
    # SIGHUP too.
    server.urls_file.write_text(f"{origin.url('one.bin')}\n{origin.url('two.bin')}  renamed.bin\n")
    os.kill(server.pid, 1)
    deadline = time.monotonic() + 10
    while curl(server.file_url("one.bin"))[0] != 200:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.1)
    # stop: saves and exits.
    server.stop()
    assert "stopping; saving state" in server.log_text()
    assert curl_fails(server.url + "/")


def curl_fails(url: str) -> bool:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", url], capture_output=True, check=False
    )
    return result.returncode != 0


def test_status_without_arguments_includes_the_default_cache_directorys_server(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    write_random(origin_root / "x.bin", 1000)
    urls = tmp_path / "urls.txt"
    urls.write_text(origin.url("x.bin") + "\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}

    def remotefs(*args: str) -> subprocess.CompletedProcess[str]:
        command = [os.environ.get("PYTHON", "python3"), "-m", "remotefs", *args]
        import sys

        command[0] = sys.executable
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)

    started = remotefs("serve", str(urls), "--listen", "127.0.0.1:0", "--no-fill")
    assert started.returncode == 0, started.stderr
    address = re.search(r"serving (http://\S+)", started.stdout)
    assert address
    try:
        # Every mount of the machine is listed too (and makes the exit status 1 if one does
        # not answer): only this server's row is checked.
        listed = remotefs("status", "--once")
        assert f"{address.group(1)}  (pid " in listed.stdout, listed.stderr
        assert "x.bin" in listed.stdout
    finally:
        stopped = remotefs("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert remotefs("stop").returncode == 1


def test_a_url_that_answers_later_is_served_once_it_does(
    origin: Origin, origin_root: Path, serve: ServeFactory
) -> None:
    """The engine tells the daemon (`Door.available`); the path appears in the tree, and so
    on the server, without a reload."""
    server = serve.start([origin.url("late.bin")])  # not at the origin yet: 404 to the probe
    url = server.file_url("late.bin")
    status, _, headers = curl(url)
    assert status == 503 and headers["retry-after"] == "5"
    data = write_random(origin_root / "late.bin", 500_000)
    deadline = time.monotonic() + 30  # the re-prober tries after 5 s, then 10 s
    while (answer := curl(url))[0] != 200:
        assert answer[0] == 503, answer[0]
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.5)
    assert answer[1] == data
    listing = json.loads(curl("-H", "Accept: application/json", server.url + "/")[1])
    assert [entry["name"] for entry in listing["entries"]] == ["late.bin"]
