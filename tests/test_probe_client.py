"""The fast probe client against real origins on 127.0.0.1: what it answers itself, what it
hands to httpx, and that both read an answer the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from remotefs.cache.probe import ProbeFailedError, Prober
from remotefs.config.options import MountOptions
from remotefs.http.errors import PermanentError, ProtocolViolationError
from remotefs.http.probe_client import ProbeClient
from remotefs.http.source import HttpSource, RemoteMeta

from .conftest import write_random
from .faults import FaultyOrigin
from .virtual_origin import LAST_MODIFIED, VirtualFile, VirtualOrigin

MiB = 1024 * 1024


def client(tmp_path: Path, **overrides: object) -> ProbeClient:
    options = MountOptions(cache_dir=tmp_path / "cache", **overrides)  # type: ignore[arg-type]
    return ProbeClient(options, lambda url: [("X-Token", "t")])


def test_probes_many_files_over_kept_alive_connections(
    tmp_path: Path, virtual_origin: VirtualOrigin
) -> None:
    for index in range(300):
        virtual_origin.files[f"f{index}"] = VirtualFile(1000 + index, seed=index)
    probe = client(tmp_path)

    async def main() -> list[RemoteMeta | None]:
        results = [await probe.probe(virtual_origin.url(f"f{index}")) for index in range(300)]
        await probe.aclose()
        return results

    results = trio.run(main)
    assert [r.size if r else None for r in results] == [1000 + i for i in range(300)]
    first = results[0]
    assert first is not None
    assert (first.etag, first.last_modified, first.accepts_ranges) == ('"v1"', LAST_MODIFIED, True)
    assert probe.answered == 300 and probe.handed_over == 0
    assert virtual_origin.probes() == 300


def test_impossible_and_negative_sizes_are_errors_not_listings(
    tmp_path: Path, virtual_origin: VirtualOrigin
) -> None:
    virtual_origin.files["beyond"] = VirtualFile(10, probe_total=str(1 << 63))
    virtual_origin.files["negative"] = VirtualFile(10, probe_total="-1")
    probe = client(tmp_path)

    async def main() -> None:
        with pytest.raises(ProtocolViolationError, match="more than any file can have"):
            await probe.probe(virtual_origin.url("beyond"))
        with pytest.raises(ProtocolViolationError, match="unusable Content-Range"):
            await probe.probe(virtual_origin.url("negative"))
        with pytest.raises(PermanentError, match="HTTP 404"):
            await probe.probe(virtual_origin.url("missing"))
        await probe.aclose()

    trio.run(main)


def test_a_whole_body_answer_is_not_read_to_keep_the_connection(
    tmp_path: Path, virtual_origin: VirtualOrigin
) -> None:
    virtual_origin.files["noranges"] = VirtualFile(64 * MiB, ranges=False)
    probe = client(tmp_path)

    async def main() -> RemoteMeta | None:
        result = await probe.probe(virtual_origin.url("noranges"))
        await probe.aclose()
        return result

    result = trio.run(main)
    assert result is not None and result.size == 64 * MiB and not result.accepts_ranges
    assert virtual_origin.body_bytes("noranges") < 16 * MiB  # the connection was dropped


def test_redirects_go_to_httpx_which_follows_them(tmp_path: Path, origin_root: Path) -> None:
    write_random(origin_root / "f.bin", 5000)
    with FaultyOrigin(origin_root) as origin:
        origin.redirect_signed("/dl/f.bin", "f.bin")
        options = MountOptions(cache_dir=tmp_path / "cache")
        source = HttpSource(options)
        prober = Prober(source, options)

        async def main() -> object:
            result = await prober.probe(origin.url("dl/f.bin"))
            await prober.aclose()
            await source.aclose()
            return result

        result = trio.run(main)
    assert isinstance(result, RemoteMeta) and result.size == 5000
    assert prober.statistics().general == 1


def test_a_closed_keep_alive_connection_is_retried_on_a_fresh_one(
    tmp_path: Path, virtual_origin: VirtualOrigin
) -> None:
    virtual_origin.files["a"] = VirtualFile(7)
    probe = client(tmp_path)

    async def main() -> tuple[RemoteMeta | None, RemoteMeta | None]:
        first = await probe.probe(virtual_origin.url("a"))
        # The server side of the idle connection goes away, as servers do after a while.
        for connections in probe._idle.values():
            for connection in connections:
                await connection.stream.aclose()
        second = await probe.probe(virtual_origin.url("a"))
        await probe.aclose()
        return first, second

    first, second = trio.run(main)
    assert first is not None and second is not None and first == second


def test_an_unexpected_exception_while_probing_is_that_urls_result(
    tmp_path: Path, virtual_origin: VirtualOrigin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in a probe once ended the whole mount ("Exceptions from Trio nursery")."""
    virtual_origin.files["ok"] = VirtualFile(10)
    options = MountOptions(cache_dir=tmp_path / "cache")
    source = HttpSource(options)
    prober = Prober(source, options)
    real = prober.client.probe

    async def crashing(url: str, previous: RemoteMeta | None = None) -> RemoteMeta | None:
        if url.endswith("/boom"):
            raise ZeroDivisionError("a bug")
        return await real(url, previous)

    monkeypatch.setattr(prober.client, "probe", crashing)
    results: dict[str, object] = {}

    async def main() -> None:
        urls = [virtual_origin.url("boom"), virtual_origin.url("ok")]
        await prober.probe_many(urls, results.__setitem__)
        await prober.aclose()
        await source.aclose()

    trio.run(main)
    boom = results[virtual_origin.url("boom")]
    assert isinstance(boom, ProbeFailedError)
    assert "unexpected ZeroDivisionError: a bug" in str(boom)
    ok = results[virtual_origin.url("ok")]
    assert isinstance(ok, RemoteMeta) and ok.size == 10
