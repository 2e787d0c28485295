"""GCS's JSON API (``objects.list``): pages parsed, and a bucket found by that answer.

There is no GCS server among Debian's packages or on PyPI to start here, so the answers are
written by the test in the documented shape (``kind``, ``items`` with ``name``, ``size`` as a
decimal string, ``md5Hash`` in base64, ``prefixes``, ``nextPageToken``), including what a
hostile or broken answer can hold. The walk talks to a fake fetch that answers only the JSON
form, as a JSON-only GCS emulator would: the S3 form is refused there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import urllib.parse

import pytest
import trio

from remotefs.listings import parse
from remotefs.listings.walk import Walk, walk

BASE = "http://127.0.0.1:9"


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def answer(prefix: str, names: list[str], dirs: list[str], token: str | None = None) -> bytes:
    body: dict[str, object] = {
        "kind": "storage#objects",
        "items": [
            {"kind": "storage#object", "name": prefix + n, "size": str(len(n)), "etag": "CJj8"}
            | {"md5Hash": md5_b64(n.encode())}
            for n in names
        ],
        "prefixes": [prefix + d + "/" for d in dirs],
    }
    if token is not None:
        body["nextPageToken"] = token
    return json.dumps(body).encode()


def test_a_page_names_objects_below_its_prefix_with_sizes_and_md5s() -> None:
    body = answer("data/", ["a.bin", "b c.bin"], ["sub"], token="t1")
    page = parse(f"{BASE}/storage/v1/b/bkt/o", "application/json", body, prefix="data/")
    assert page.kind == "bucket" and page.next_token == "t1"
    by_name = {e.name: e for e in page.entries}
    assert by_name["a.bin"].size == 5 and by_name["a.bin"].md5 == hashlib.md5(b"a.bin").hexdigest()
    assert by_name["a.bin"].etag is None  # GCS's JSON etag is not its downloads' ETag
    assert by_name["sub"].is_dir


@pytest.mark.parametrize(
    "item",
    [
        {"name": "data/x", "size": "-1"},
        {"name": "data/x", "size": 12},
        {"name": "data/x", "md5Hash": "not base64!"},
        {"name": "data/x", "md5Hash": base64.b64encode(b"short").decode()},
        {"name": "other/x", "size": "1"},
        {"name": "data/deeper/x", "size": "1"},
        {"name": "data/", "size": "0"},
        {"name": 7},
        "a string",
    ],
)
def test_fields_that_cannot_be_checked_are_dropped(item: object) -> None:
    body = json.dumps({"kind": "storage#objects", "items": [item]}).encode()
    page = parse(f"{BASE}/storage/v1/b/bkt/o", "application/json", body, prefix="data/")
    for entry in page.entries:
        assert entry.name == "x" and entry.size is None and entry.md5 is None


def test_a_json_only_bucket_is_found_and_walked_over_pages() -> None:
    rng = random.Random(7)
    names = [f"k{i:03d}.bin" for i in range(rng.randrange(5, 40))]
    cut = len(names) // 2
    pages: dict[str, bytes] = {}

    def page_url(prefix: str, token: str | None = None) -> str:
        query = {"delimiter": "/", "prefix": prefix} | ({"pageToken": token} if token else {})
        return f"{BASE}/storage/v1/b/bkt/o?{urllib.parse.urlencode(query)}"

    pages[page_url("data/")] = answer("data/", names[:cut], ["sub"], token="p2")
    pages[page_url("data/", "p2")] = answer("data/", names[cut:], [])
    pages[page_url("data/sub/")] = answer("data/sub/", ["deep.bin"], [])

    async def fetch(url: str) -> tuple[int, str | None, bytes]:
        if url in pages:
            return 200, "application/json; charset=UTF-8", pages[url]
        return 404, "application/xml", b"<Error><Code>NoSuchKey</Code></Error>"

    async def main() -> Walk:
        return await walk(f"{BASE}/bkt/data/", fetch, depth=2)

    result = trio.run(main)
    assert result.problems == []
    found = {"/".join(f.path): f for f in result.files}
    assert set(found) == {*names, "sub/deep.bin"}
    # Files are fetched where GCS serves objects: bucket/key, not the JSON API.
    assert found["sub/deep.bin"].url == f"{BASE}/bkt/data/sub/deep.bin"
    assert found[names[0]].md5 == hashlib.md5(names[0].encode()).hexdigest()
