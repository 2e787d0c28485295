"""`Cache.listdir`: the files a real server lists, each opened and read through the cache.

nginx (its HTML autoindex and its JSON one) and moto's S3 server, started by the test on
127.0.0.1. Every listed file opens with `Cache.open` and reads back equal to the origin's
bytes; a directory that cannot be listed is a typed error, not an empty list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import remotefs

from . import listing_servers
from .listing_servers import ListingServer
from .requirements import unavailable

TREE = {
    "a.iso": b"a" * 70_000,
    "b c #1.txt": b"b" * 10,
    "skip.sig": b"s",
    "sub/d.iso": b"d" * 123_457,
    "sub/deeper/e.iso": b"e",
}


@pytest.fixture(scope="module")
def nginx_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ListingServer, ...]]:
    if listing_servers.missing_servers():
        unavailable("nginx is missing (scripts/setup.sh test installs it)")
    root = tmp_path_factory.mktemp("lib-listed") / "root"
    for relative, data in TREE.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with listing_servers.nginx(root, tmp_path_factory.mktemp("lib-nginx")) as pair:
        yield pair


@pytest.mark.parametrize("which", [0, 1], ids=["html", "json"])
def test_listed_files_open_and_read_as_the_origins(
    nginx_pair: tuple[ListingServer, ...], tmp_path: Path, which: int
) -> None:
    server = nginx_pair[which]
    with remotefs.Cache(tmp_path / "cache") as cache:
        files = cache.listdir(server.url + "/", depth=2, exclude=["*.sig"])
        found = {"/".join(f.path): f for f in files}
        assert set(found) == {"a.iso", "b c #1.txt", "sub/d.iso"}
        for relative, listed in found.items():
            assert listed.size == (len(TREE[relative]) if server.exact_sizes else None)
            with cache.open(listed.url) as handle:
                assert handle.read() == TREE[relative], relative
        only_isos = cache.listdir(server.url + "/", depth=3, include=["*.iso"])
        assert {"/".join(f.path) for f in only_isos} == {"a.iso", "sub/d.iso", "sub/deeper/e.iso"}


def test_a_directory_that_cannot_be_listed_is_a_network_error(
    nginx_pair: tuple[ListingServer, ...], tmp_path: Path
) -> None:
    with remotefs.Cache(tmp_path / "cache") as cache:
        with pytest.raises(remotefs.NetworkError, match="HTTP 404"):
            cache.listdir(nginx_pair[0].url + "/no-such-dir/")
        with pytest.raises(remotefs.UrlError, match="ends in '/'"):
            cache.listdir(nginx_pair[0].url + "/sub")


def test_a_bucket_prefix_lists_its_objects_and_they_read_back(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    objects = {"/pub/set/x.bin": b"x" * 5000, "/pub/set/y/z.bin": b"z" * 17}
    with listing_servers.moto_s3(tmp_path_factory.mktemp("lib-moto")) as base:
        listing_servers.put_objects(base, {"/pub": b"", **objects})
        with remotefs.Cache(tmp_path / "cache") as cache:
            files = cache.listdir(base + "/pub/set/", depth=2)
            assert {"/".join(f.path): f.size for f in files} == {"x.bin": 5000, "y/z.bin": 17}
            for listed in files:
                with cache.open(listed.url) as handle:
                    assert handle.read() == objects["/pub/set/" + "/".join(listed.path)]
