"""Directory listings read from the real servers that write them, and hostile ones.

Each server (tests/listing_servers.py) is started by the test on 127.0.0.1 with its own
configuration and serves a tree made here with the names that break parsers: spaces, ``#``,
``%``, ``&``, brackets, UTF-8, a name longer than nginx's 50-character link text, a dot file,
an empty directory. The listing of the top and of a subdirectory must name exactly that
tree (less dot files where the server hides them), directories as directories, with exact
sizes where the listing has them (JSON, S3) and none where it does not (HTML). moto's S3
server lists a bucket of 2,500 keys in nested prefixes over three pages.
"""

from __future__ import annotations

import contextlib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remotefs.listings import ACCEPT, Entry, ListingError, Page, bucket_location, child_of, parse

from . import listing_servers
from .listing_servers import ListingServer
from .requirements import unavailable

FILES = {
    "big file #1.bin": 150_001,
    "ünïcode 100%.txt": 3,
    "a" * 70 + ".txt": 7,
    "a&b;c=d.txt": 11,
    "[x] (y) {z}.txt": 0,
    ".hidden": 5,
}
DIRS = ("sub dir", "empty")
SUB = {"inner.txt": 9}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("listed") / "root"
    root.mkdir()
    for name, size in FILES.items():
        (root / name).write_bytes(b"x" * size)
    for name in DIRS:
        (root / name).mkdir()
    for name, size in SUB.items():
        (root / "sub dir" / name).write_bytes(b"y" * size)
    (root / "sub dir" / "deeper").mkdir()
    (root / "sub dir" / "deeper" / "z.txt").write_bytes(b"z")
    return root


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[str | None, bytes]:
    request = urllib.request.Request(url, headers={"Accept": ACCEPT, **(headers or {})})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.headers.get("Content-Type"), response.read()


def listed(url: str) -> Page:
    content_type, body = fetch(url)
    return parse(url, content_type, body)


SERVERS: dict[str, Callable[[Path, Path], Any]] = {
    "nginx": listing_servers.nginx,
    "apache": listing_servers.apache,
    "lighttpd": listing_servers.lighttpd,
    "caddy": listing_servers.caddy,
    "python-http.server": listing_servers.python_http_server,
}


@pytest.fixture(scope="module", params=list(SERVERS))
def servers(
    request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ListingServer]]:
    name: str = request.param
    if name == "caddy" and listing_servers.shutil.which("caddy") is None:
        if listing_servers.packaged("caddy"):
            unavailable("caddy is missing (scripts/setup.sh test installs it)")
        pytest.skip("caddy is not packaged for this release: its listings are not tested")
    missing = listing_servers.missing_servers()
    if missing:
        unavailable(f"missing {', '.join(missing)} (scripts/setup.sh test installs them)")
    with SERVERS[name](tree, tmp_path_factory.mktemp(name)) as started:
        yield list(started) if isinstance(started, tuple) else [started]


def expected_top(server: ListingServer) -> dict[str, Entry]:
    files = {
        name: Entry(name, False, size if server.exact_sizes else None)
        for name, size in FILES.items()
        if not (server.hides_dotfiles and name.startswith("."))
    }
    return {**files, **{name: Entry(name, True) for name in DIRS}}


def test_the_listing_of_a_directory_names_exactly_its_entries(
    servers: list[ListingServer],
) -> None:
    for server in servers:
        page = listed(server.url + "/")
        got = {entry.name: entry for entry in page.entries}
        want = expected_top(server)
        if page.kind == "json" and not server.exact_sizes:  # Caddy answers our Accept with JSON
            want = {
                n: Entry(n, e.is_dir, FILES.get(n) if not e.is_dir else None)
                for n, e in want.items()
            }
        assert got == want, f"{server.name} ({page.kind}): {sorted(got)} != {sorted(want)}"
        assert len(page.entries) == len(got), f"{server.name}: an entry listed twice"
        assert page.next_token is None


def test_a_subdirectory_with_a_space_lists_its_own_entries(servers: list[ListingServer]) -> None:
    for server in servers:
        url = server.url + "/" + urllib.parse.quote("sub dir") + "/"
        page = listed(url)
        got = {entry.name: entry.is_dir for entry in page.entries}
        assert got == {"inner.txt": False, "deeper": True}, f"{server.name}: {got}"
        sizes = {entry.name: entry.size for entry in page.entries if not entry.is_dir}
        assert sizes["inner.txt"] in (None, SUB["inner.txt"])


def test_html_listings_give_no_sizes_and_json_listings_exact_ones(
    servers: list[ListingServer],
) -> None:
    """Never the size columns of a page (nginx rounds to ``1M`` if told to, Apache to
    ``1.4M``): an HTML file is probed later, like a urls.txt line."""
    for server in servers:
        page = listed(server.url + "/")
        sizes = {entry.size for entry in page.entries if not entry.is_dir}
        if page.kind == "html":
            assert sizes == {None}, server.name
        else:
            assert None not in sizes, server.name


# -- S3 through moto's server ------------------------------------------------------------------

KEYS = 2500


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bucket of moto's S3 server with a nested layout and 2,500 keys under ``many/``."""
    with listing_servers.moto_s3(tmp_path_factory.mktemp("moto")) as base:
        objects = {
            "/data": b"",
            "/data/top.bin": b"t" * 1234,
            "/data/a dir/": b"",  # a "directory marker" key, as consoles make
            "/data/a dir/x #1.bin": b"x" * 10,
            "/data/a dir/sub/y.bin": b"y",
            "/data/ünï/z.bin": b"zz",
        }
        objects.update({f"/data/many/k{i:05d}.bin": b"k" * (i % 7) for i in range(KEYS)})
        listing_servers.put_objects(base, objects, public=False)
        yield base + "/data"


def list_bucket(bucket_url: str, prefix: str) -> Iterator[Page]:
    """Every page of ``ListObjectsV2`` under *prefix* (``delimiter=/``)."""
    token = None
    for _ in range(100):
        query = {"list-type": "2", "delimiter": "/", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        url = f"{bucket_url}?{urllib.parse.urlencode(query)}"
        content_type, body = fetch(url)
        page = parse(url, content_type, body, prefix=prefix)
        assert page.kind == "bucket"
        yield page
        token = page.next_token
        if token is None:
            return
    raise AssertionError("more than 100 pages")


def test_a_bucket_lists_keys_as_files_and_common_prefixes_as_directories(bucket: str) -> None:
    pages = list(list_bucket(bucket, ""))
    got = {entry.name: (entry.is_dir, entry.size) for page in pages for entry in page.entries}
    assert got == {
        "top.bin": (False, 1234),
        "a dir": (True, None),
        "many": (True, None),
        "ünï": (True, None),
    }
    inner = {e.name: (e.is_dir, e.size) for p in list_bucket(bucket, "a dir/") for e in p.entries}
    assert inner == {"x #1.bin": (False, 10), "sub": (True, None)}  # the marker key is skipped
    assert all(e.etag for p in list_bucket(bucket, "a dir/") for e in p.entries if not e.is_dir)


def test_a_bucket_of_2500_keys_lists_over_three_pages(bucket: str) -> None:
    pages = list(list_bucket(bucket, "many/"))
    assert len(pages) == 3
    names = [entry.name for page in pages for entry in page.entries]
    assert len(names) == len(set(names)) == KEYS
    sizes = {entry.name: entry.size for page in pages for entry in page.entries}
    assert sizes["k00013.bin"] == 13 % 7


def test_a_bucket_url_names_its_bucket_and_prefix() -> None:
    assert bucket_location("http://127.0.0.1:9/data/a%20dir/") == (
        "http://127.0.0.1:9/data",
        "a dir/",
    )
    assert bucket_location("https://s3.example/data/") == ("https://s3.example/data", "")
    assert bucket_location("https://s3.example/") is None


# -- hostile listings --------------------------------------------------------------------------

LISTING = "http://127.0.0.1:8080/pub/list/"


@pytest.mark.parametrize(
    ("href", "expected"),
    [
        ("file.iso", ("file.iso", False)),
        ("./file.iso", ("file.iso", False)),
        ("sub/", ("sub", True)),
        ("file.iso#part", ("file.iso", False)),
        ("%C3%A9t%C3%A9%20x.txt", ("été x.txt", False)),
        ("a%25b.txt", ("a%b.txt", False)),
        ("http://127.0.0.1:8080/pub/list/abs.txt", ("abs.txt", False)),
        ("/pub/list/rooted.txt", ("rooted.txt", False)),
        ("../", None),
        ("..", None),
        ("/", None),
        ("/pub/", None),
        ("", None),
        ("#top", None),
        ("?C=N;O=D", None),
        ("file.iso?download=1", None),
        ("http://other.example/pub/list/x", None),
        ("https://127.0.0.1:8080/pub/list/x", None),
        ("http://127.0.0.1:8081/pub/list/x", None),
        ("//127.0.0.1:9/pub/list/x", None),
        ("sub/deeper/x", None),
        ("a%2Fb", None),
        ("x%00y", None),
        ("%ff%fe.bin", None),
        ("%2e%2e/", None),
        ("mailto:someone@example.org", None),
        ("javascript:alert(1)", None),
    ],
)
def test_a_link_names_an_entry_only_by_the_rules(
    href: str, expected: tuple[str, bool] | None
) -> None:
    link = child_of(LISTING, href)
    assert (None if link is None else (link.name, link.is_dir)) == expected


def test_an_html_page_of_junk_links_lists_only_its_entries_once() -> None:
    body = (
        b"<html><body><a href='../'>Parent</a><a href='/'>/</a>"
        b"<a href='?C=M;O=A'>Last modified</a><a href='a.iso'>a.iso</a>"
        b"<a href='a.iso'>a.iso again</a><a href='http://127.0.0.1:8080/pub/'>up</a>"
        b"<a href='d/'>d/</a><A HREF=\"b&amp;c.txt\">b&amp;c..&gt;</A><a>no href</a>"
        b"<a href='http://127.0.0.1:8080/pub/list/'>self</a><a href='\xff\xfe'>bytes</a>"
    )
    page = parse(LISTING, "text/html", body)
    assert [(e.name, e.is_dir) for e in page.entries] == [
        ("a.iso", False),
        ("d", True),
        ("b&c.txt", False),
    ]


def test_json_that_is_not_a_listing_is_refused_and_bad_rows_are_skipped() -> None:
    with pytest.raises(ListingError, match="not an array"):
        parse(LISTING, "application/json", b'{"error": "forbidden"}')
    with pytest.raises(ListingError, match="not a JSON listing"):
        parse(LISTING, "application/json", b"[{")
    rows = (
        b'[{"name": "ok.bin", "type": "file", "size": 5},'
        b' {"name": "neg.bin", "type": "file", "size": -1},'
        b' {"name": "str.bin", "type": "file", "size": "5"},'
        b' {"name": "bool.bin", "type": "file", "size": true},'
        b' {"name": "../up", "type": "file", "size": 1},'
        b' {"name": "sock", "type": "other"}, 7, null, {"type": "file"},'
        b' {"name": "d", "type": "directory"}, {"name": "ok.bin", "type": "file", "size": 9}]'
    )
    page = parse(LISTING, "application/json", rows)
    assert page.entries == [
        Entry("ok.bin", False, 5),
        Entry("neg.bin", False, None),
        Entry("str.bin", False, None),
        Entry("bool.bin", False, None),
        Entry("d", True, None),
    ]


def test_xml_that_is_not_a_bucket_listing_is_refused() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><ListBucketResult>&lol2;</ListBucketResult>'
    )
    with pytest.raises(ListingError, match="document type"):
        parse(LISTING, "application/xml", laughs)
    error = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"
    with pytest.raises(ListingError, match="<Error>"):
        parse(LISTING, "application/xml", error)
    with pytest.raises(ListingError):
        parse(LISTING, "application/xml", b"<?xml version='1.0'?><ListBucketResult>")
    escaped = (
        b"<ListBucketResult><IsTruncated>true</IsTruncated>"
        b"<NextContinuationToken>t1</NextContinuationToken>"
        b"<Contents><Key>p/a.bin</Key><Size>3</Size></Contents>"
        b"<Contents><Key>elsewhere/b.bin</Key><Size>3</Size></Contents>"
        b"<Contents><Key>p/c/d.bin</Key><Size>3</Size></Contents>"
        b"<Contents><Key>p/big.bin</Key><Size>-3</Size></Contents>"
        b"<CommonPrefixes><Prefix>p/s/</Prefix></CommonPrefixes>"
        b"<CommonPrefixes><Prefix>p/../</Prefix></CommonPrefixes></ListBucketResult>"
    )
    page = parse(LISTING, "application/xml", escaped, prefix="p/")
    assert page.entries == [
        Entry("a.bin", False, 3),
        Entry("big.bin", False, None),
        Entry("s", True),
    ]
    assert page.next_token == "t1"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    body=st.one_of(
        st.binary(max_size=400),
        st.text(alphabet="<>/=\"' ahrefxmlLsitBucketRsult[]{}:,.%#?0123456789", max_size=400).map(
            str.encode
        ),
    ),
    content_type=st.sampled_from([None, "text/html", "application/json", "application/xml", ""]),
)
def test_any_bytes_are_a_listing_or_a_listing_error(body: bytes, content_type: str | None) -> None:
    with contextlib.suppress(ListingError):
        page = parse(LISTING, content_type, body, prefix="p/")
        for entry in page.entries:
            assert entry.name and entry.name not in (".", "..") and "/" not in entry.name
            assert entry.size is None or entry.size >= 0
