"""`DirectorySources` alone: how listings become entries, with the engine's two calls faked.

The rules each test pins down: file lines win collisions, a failed listing keeps its last
good files, the total is bounded, names a mount cannot show are left out, and digests come
from checksum files (named or listed) and single-part bucket ETags, matched by URL.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from remotefs.cache.verify import ETAG_MD5
from remotefs.config.manifest import ManifestEntry, parse_manifest_text
from remotefs.daemon import sources as sources_module
from remotefs.daemon.sources import DirectorySources
from remotefs.http.source import ListingResponse
from remotefs.listings.walk import ListedFile, Walk


@dataclass
class FakeEngine:
    """Answers `list_directory` from *walks* and `fetch_small` from *files*."""

    walks: dict[str, Walk] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    listed: list[str] = field(default_factory=list)

    async def list_directory(self, url: str, **_: Any) -> Walk:
        self.listed.append(url)
        return self.walks[url]

    async def fetch_small(self, url: str, key: str, accept: str, memo: Any) -> ListingResponse:
        if url not in self.files:
            return ListingResponse(404, None, b"", None, None)
        return ListingResponse(200, "text/plain", self.files[url], None, None)


def expand(engine: FakeEngine, text: str, sources: DirectorySources | None = None) -> Any:
    sources = sources or DirectorySources(engine)  # type: ignore[arg-type]
    manifest = parse_manifest_text(text, "urls.txt")

    async def main() -> list[ManifestEntry]:
        return await sources.expand(manifest)

    return trio.run(main), sources


def walk_of(base: str, *paths: str, **kwargs: Any) -> Walk:
    return Walk(
        files=[ListedFile(base + p.replace(" ", "%20"), tuple(p.split("/"))) for p in paths],
        **kwargs,
    )


def test_file_lines_win_and_earlier_sources_win(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(
        walks={
            "http://h/a/": walk_of("http://h/a/", "x.bin", "y.bin", "d/z.bin"),
            "http://h/b/": walk_of("http://h/b/", "y.bin", "w.bin", "x.bin/inner"),
        }
    )
    entries, _ = expand(
        engine, "http://h/other.bin x.bin\nhttp://h/a/\nhttp://h/b/\nhttp://h/f.bin d\n"
    )
    by_path = {"/".join(e.path): e.url for e in entries}
    assert by_path == {
        "x.bin": "http://h/other.bin",
        "d": "http://h/f.bin",
        "y.bin": "http://h/a/y.bin",
        "w.bin": "http://h/b/w.bin",
    }
    assert caplog.text.count("left out") == 4  # x.bin (a), d/z.bin, y.bin (b), x.bin/inner


def test_a_failed_directory_keeps_its_last_good_files() -> None:
    engine = FakeEngine(walks={"http://h/a/": walk_of("http://h/a/", "k.bin", "s/old.bin")})
    first, sources = expand(engine, "http://h/a/\n    depth=2\n")
    assert {"/".join(e.path) for e in first} == {"k.bin", "s/old.bin"}
    # Now the subdirectory fails and the top lists a new file: both show.
    engine.walks["http://h/a/"] = walk_of(
        "http://h/a/", "k.bin", "n.bin", failed=[("s",)], problems=["s: HTTP 500"]
    )
    second, _ = expand(engine, "http://h/a/\n    depth=2\n", sources)
    assert {"/".join(e.path) for e in second} == {"k.bin", "n.bin", "s/old.bin"}
    # The whole directory fails: everything listed before stays.
    engine.walks["http://h/a/"] = Walk(failed=[()], problems=["HTTP 503"])
    third, _ = expand(engine, "http://h/a/\n    depth=2\n", sources)
    assert {"/".join(e.path) for e in third} == {"k.bin", "n.bin", "s/old.bin"}
    assert sources.statistics()[0].problems == ("HTTP 503",)


def test_the_total_is_bounded_with_the_manifest_s_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_module, "MAX_FILES", 10)
    engine = FakeEngine(
        walks={"http://h/a/": walk_of("http://h/a/", *(f"f{i:02d}" for i in range(20)))}
    )
    entries, _ = expand(engine, "http://h/one.bin\nhttp://h/two.bin\nhttp://h/a/ a/\n")
    assert len(entries) == 10


def test_names_a_mount_cannot_show_are_left_out() -> None:
    engine = FakeEngine(
        walks={"http://h/a/": walk_of("http://h/a/", "ok.bin", "bad\x01name", "x" * 256)}
    )
    entries, _ = expand(engine, "http://h/a/\n")
    assert [e.path for e in entries] == [("ok.bin",)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_digests_from_named_and_listed_checksum_files_and_etags(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"file {i}.iso" for i in range(rng.randrange(2, 6))]
    digests = {name: hashlib.sha256(rng.randbytes(20)).hexdigest() for name in names}
    named = "".join(f"{digests[n]}  {n}\n" for n in names[:1]).encode()
    listed = "".join(f"{digests[n]}  {n}\n" for n in names[1:]).encode()
    md5 = hashlib.md5(b"x").hexdigest()
    walk = walk_of("http://h/a/", *names, "SHA256SUMS")
    walk.files.append(ListedFile("http://h/a/obj", ("obj",), 1, f'"{md5}"'))
    walk.files.append(ListedFile("http://h/a/multi", ("multi",), 1, f'"{md5}-3"'))
    engine = FakeEngine(
        walks={"http://h/a/": walk},
        files={"http://h/sums/named.txt": named, "http://h/a/SHA256SUMS": listed},
    )
    entries, _ = expand(engine, "http://h/a/\n    checksums=../sums/named.txt\n")
    found = {"/".join(e.path): dict(e.digests) for e in entries}
    for name in names:
        assert found[name] == {"sha256": digests[name]}, name
    assert found["obj"] == {ETAG_MD5: md5}
    assert found["multi"] == {} and found["SHA256SUMS"] == {}


def test_a_broken_checksum_file_names_its_line_and_verifies_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FakeEngine(
        walks={"http://h/a/": walk_of("http://h/a/", "x.iso", "SHA256SUMS")},
        files={"http://h/a/SHA256SUMS": b"# fine\nnot a line\n"},
    )
    entries, _ = expand(engine, "http://h/a/\n")
    assert all(e.digests == () for e in entries)
    assert "SHA256SUMS:2: not a checksum line" in caplog.text


def test_a_listing_s_stated_md5_is_a_digest() -> None:
    md5 = hashlib.md5(b"gcs").hexdigest()
    walk = Walk(files=[ListedFile("http://h/a/g.bin", ("g.bin",), 3, None, md5)])
    entries, _ = expand(FakeEngine(walks={"http://h/a/": walk}), "http://h/a/\n")
    assert dict(entries[0].digests) == {"md5": md5}
