"""Walking a directory source: depth, patterns, buckets found by their answer, and bounds.

Against real servers on 127.0.0.1 (nginx's HTML autoindex over a tree with a symlink loop,
moto's S3 server behind a path-style directory URL), and against listings made up here for the
hostile cases (an error page in the middle, a repeated continuation token, too many entries).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import trio

from remotefs.listings import ACCEPT
from remotefs.listings.walk import Limits, ListedFile, Walk, walk

from . import listing_servers
from .listing_servers import ListingServer
from .requirements import unavailable


def fetch_blocking(url: str) -> tuple[int, str | None, bytes]:
    request = urllib.request.Request(url, headers={"Accept": ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


async def fetch(url: str) -> tuple[int, str | None, bytes]:
    return await trio.to_thread.run_sync(fetch_blocking, url)


def run_walk(root: str, **kwargs: object) -> Walk:
    async def main() -> Walk:
        return await walk(root, fetch, **kwargs)  # type: ignore[arg-type]

    return trio.run(main)


@pytest.fixture(scope="module")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListingServer]:
    if listing_servers.missing_servers():
        unavailable("nginx is missing (scripts/setup.sh test installs it)")
    root = tmp_path_factory.mktemp("walked") / "root"
    for relative, size in {
        "a.iso": 10,
        "a.iso.sig": 1,
        "notes.txt": 2,
        "level1/b.iso": 3,
        "level1/level2/c.iso": 4,
        "level1/level2/level3/d.iso": 5,
        "with space/e #1.iso": 6,
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    os.symlink("..", root / "level1" / "loop")  # a directory that lists its parent again
    with listing_servers.nginx(root, tmp_path_factory.mktemp("nginx-walk")) as (html, _json):
        yield html


def paths(result: Walk) -> set[str]:
    return {"/".join(found.path) for found in result.files}


def test_depth_1_lists_the_top_only_and_depth_3_goes_three_levels_down(
    nginx_server: ListingServer,
) -> None:
    top = run_walk(nginx_server.url + "/")
    assert paths(top) == {"a.iso", "a.iso.sig", "notes.txt"}
    assert top.problems == [] and not top.truncated
    deep = run_walk(nginx_server.url + "/", depth=3)
    assert {"level1/b.iso", "level1/level2/c.iso", "with space/e #1.iso"} <= paths(deep)
    assert "level1/level2/level3/d.iso" not in paths(deep)
    # URLs are the server's own spelling: the file behind each is the one listed.
    found = {"/".join(f.path): f for f in deep.files}
    space = found["with space/e #1.iso"]
    assert space.url == nginx_server.url + "/with%20space/e%20%231.iso"
    assert fetch_blocking(space.url)[2] == b"x" * 6


def test_a_symlink_loop_is_bounded_by_the_depth(nginx_server: ListingServer) -> None:
    result = run_walk(nginx_server.url + "/", depth=8)
    looped = [p for p in paths(result) if "/loop/" in p]
    assert looped, "the loop was not followed at all"
    assert max(p.count("/") for p in paths(result)) <= 7
    assert "level1/level2/level3/d.iso" in paths(result)


def test_include_and_exclude_patterns_select_files(nginx_server: ListingServer) -> None:
    result = run_walk(nginx_server.url + "/", depth=2, include=("*.iso",), exclude=("b*",))
    assert paths(result) == {"a.iso", "with space/e #1.iso"}


@pytest.fixture(scope="module")
def bucket_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with listing_servers.moto_s3(tmp_path_factory.mktemp("moto-walk")) as base:
        listing_servers.put_objects(
            base,
            {
                "/pub": b"",
                "/pub/data/": b"",
                "/pub/data/one.bin": b"1" * 11,
                "/pub/data/sub/two.bin": b"2" * 22,
                "/pub/data/sub/deeper/three.bin": b"3",
                "/pub/other.bin": b"o",
            },
        )
        yield base + "/pub/data/"


def test_a_bucket_is_found_by_its_answer_and_walked_by_prefix(bucket_dir: str) -> None:
    result = run_walk(bucket_dir, depth=2)
    assert result.problems == []
    found = {"/".join(f.path): f for f in result.files}
    assert set(found) == {"one.bin", "sub/two.bin"}
    assert found["sub/two.bin"].size == 22 and found["sub/two.bin"].etag
    # Each file's URL is the object's: a plain GET returns its bytes.
    assert fetch_blocking(found["sub/two.bin"].url)[2] == b"2" * 22


# -- hostile listings, made up ---------------------------------------------------------------


def fake(pages: dict[str, tuple[int, str, bytes]]):  # type: ignore[no-untyped-def]
    async def fetch_fake(url: str) -> tuple[int, str | None, bytes]:
        if url not in pages:
            return 404, "text/html", b"<html>not found</html>"
        return pages[url]

    return fetch_fake


ROOT = "http://127.0.0.1:9/pub/"


def test_a_failing_directory_is_a_problem_and_the_rest_is_still_walked() -> None:
    pages = {
        ROOT: (200, "text/html", b"<a href='ok/'>ok</a><a href='bad/'>bad</a><a href='f'>f</a>"),
        ROOT + "ok/": (200, "text/html", b"<a href='g'>g</a>"),
        ROOT + "bad/": (500, "text/html", b"<h1>Internal Server Error</h1>"),
    }
    result = trio.run(lambda: walk(ROOT, fake(pages), depth=2))
    assert {f.path for f in result.files} == {("f",), ("ok", "g")}
    assert result.problems == [f"{ROOT}bad/: HTTP 500, not a listing"]


def test_a_repeated_continuation_token_ends_the_bucket_listing() -> None:
    page = (
        b"<ListBucketResult><IsTruncated>true</IsTruncated>"
        b"<NextContinuationToken>same</NextContinuationToken>"
        b"<Contents><Key>d/x</Key><Size>1</Size></Contents></ListBucketResult>"
    )
    error = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>"
    first = "http://127.0.0.1:9/b?list-type=2&delimiter=%2F&prefix=d%2F"

    async def fetch_loop(url: str) -> tuple[int, str | None, bytes]:
        if url == "http://127.0.0.1:9/b/d/":
            return 404, "application/xml", error
        assert url.startswith(first), url
        return 200, "application/xml", page

    result = trio.run(lambda: walk("http://127.0.0.1:9/b/d/", fetch_loop))
    assert result.files == []
    assert result.problems == ["http://127.0.0.1:9/b/d/: the bucket repeated a continuation token"]


def test_more_entries_than_the_limit_are_left_out_with_one_problem() -> None:
    links = b"".join(f"<a href='f{i}'>x</a>".encode() for i in range(50))
    result = trio.run(
        lambda: walk(ROOT, fake({ROOT: (200, "text/html", links)}), limits=Limits(entries=20))
    )
    assert len(result.files) == 20 and result.truncated
    assert result.problems == [f"{ROOT}: more than 20 entries; the rest is left out"]


def test_secrets_in_a_source_url_never_reach_a_problem() -> None:
    root = "http://user:pw-secret@127.0.0.1:9/pub/?token=tk-secret"
    with pytest.raises(ValueError) as info:
        trio.run(lambda: walk(root, fake({})))
    assert "pw-secret" not in str(info.value) and "tk-secret" not in str(info.value)
    secret_root = "http://user:pw-secret@127.0.0.1:9/pub/"
    result = trio.run(lambda: walk(secret_root, fake({})))
    assert result.problems and all("pw-secret" not in p for p in result.problems)


def test_listed_files_keep_what_the_listing_said() -> None:
    body = b'[{"name": "a b", "type": "file", "size": 5}, {"name": "d", "type": "directory"}]'
    result = trio.run(lambda: walk(ROOT, fake({ROOT: (200, "application/json", body)})))
    assert result.files == [ListedFile(ROOT + "a%20b", ("a b",), 5, None)]


def test_a_source_url_must_end_in_a_slash() -> None:
    with pytest.raises(ValueError, match="ends in '/'"):
        trio.run(lambda: walk("http://127.0.0.1:9/pub", fake({})))


def test_a_big_listing_is_parsed_whole_off_the_event_loop() -> None:
    names = [f"file-{i:05d} with a long name.bin" for i in range(20_000)]
    page = "".join(f'<a href="{urllib.parse.quote(n)}">{n}</a>\n' for n in names).encode()
    assert len(page) > 256 << 10  # above THREAD_PARSE_FROM: parsed in a worker thread

    async def big(url: str) -> tuple[int, str | None, bytes]:
        return 200, "text/html", page

    async def main() -> Walk:
        return await walk("http://h/d/", big)

    result = trio.run(main)
    assert [found.path[0] for found in result.files] == names
