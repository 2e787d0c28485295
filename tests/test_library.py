"""The Python library (`remotefs.open`, `aopen`, `Cache`) against real origins on 127.0.0.1.

No FUSE here: the library runs the engine on a trio loop in a thread of its own. Every
check compares bytes with the origin's, and counts what the origin served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import itertools
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import remotefs

from .conftest import write_random
from .faults import Fault, FaultyOrigin
from .mounting import MountFactory
from .origin import Origin
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def data_bytes(origin: Origin, path: str) -> int:
    """Body bytes of data answers (a probe's one byte at 0 is not counted)."""
    return sum(end - start for start, end in origin.served_ranges(path) if (start, end) != (0, 1))


def no_overlaps(ranges: list[tuple[int, int]]) -> bool:
    ordered = sorted(ranges)
    return all(b[0] >= a[1] for a, b in itertools.pairwise(ordered))


def test_zipfile_lists_ten_thousand_members_from_a_small_part_of_the_zip(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    rng = random.Random(1)
    path = origin_root / "big.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index in range(10_000):
            archive.writestr(f"dir{index % 50}/member-{index:05d}.bin", rng.randbytes(8192))
    size = path.stat().st_size
    with remotefs.open(origin.url("big.zip"), cache_dir=tmp_path / "cache") as f:
        names = zipfile.ZipFile(f).namelist()
    assert len(names) == 10_000 and names[1234] == "dir34/member-01234.bin"
    origin.wait_idle()
    served = origin.bytes_served("/big.zip")
    assert served < size * 0.05, f"{served} of {size} bytes"


def test_tarfile_reads_a_member_from_the_middle(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    rng = random.Random(2)
    members = {f"m{index:03d}": rng.randbytes(rng.randrange(1, 300_000)) for index in range(120)}
    with tarfile.open(origin_root / "a.tar", "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    url = origin.url("a.tar")
    with remotefs.open(url, cache_dir=tmp_path / "cache") as f, tarfile.open(fileobj=f) as archive:
        extracted = archive.extractfile("m060")
        assert extracted is not None
        assert extracted.read() == members["m060"]


SIZE = 3 * MiB + 4321
SEED = 77


@pytest.fixture(scope="module")
def random_file() -> Iterator[tuple[remotefs.RemoteFile, bytes]]:
    """One file object over small blocks (many boundaries), and the origin's bytes."""
    with VirtualOrigin() as origin, tempfile.TemporaryDirectory() as cache_dir:
        origin.files["r.bin"] = VirtualFile(SIZE, seed=SEED)
        cache = remotefs.Cache(cache_dir, block_size="4K", min_request="4K")
        with cache, cache.open(origin.url("r.bin")) as f:
            yield f, expected(SEED, 0, SIZE)


Operation = tuple[str, int, int]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(-1, 300_000), st.just(0)),
        st.tuples(
            st.just("seek"), st.integers(-SIZE - 10, SIZE + 5000), st.sampled_from([0, 1, 2])
        ),
        st.tuples(st.just("pread"), st.integers(0, 300_000), st.integers(0, SIZE + 5000)),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations)
def test_random_reads_seeks_and_preads_equal_the_origins_bytes(
    random_file: tuple[remotefs.RemoteFile, bytes], steps: list[Operation]
) -> None:
    f, data = random_file
    model = io.BytesIO(data)
    f.seek(0)
    for kind, a, b in steps:
        if kind == "read":
            assert f.read(a) == model.read(a)
        elif kind == "seek":
            target = {0: a, 1: model.tell() + a, 2: len(data) + a}[b]
            if target < 0:
                with pytest.raises(OSError):
                    f.seek(a, b)
                continue
            assert f.seek(a, b) == model.seek(a, b)
        else:
            assert f.pread(a, b) == data[b : b + a]
        assert f.tell() == model.tell()


def test_cursors_under_asyncio_trio_and_threads_fetch_each_block_once(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    data = write_random(origin_root / "shared.bin", 24 * MiB + 17)
    url = origin.url("shared.bin")
    ranges = [(i * 700_000, 3 * MiB) for i in range(16)]  # overlapping

    async def readers() -> list[bytes]:
        async with remotefs.aopen(url, cache_dir=tmp_path / "cache") as f:
            cursors = [f.clone() for _ in ranges]
            return list(
                await asyncio.gather(
                    *(c.pread(n, at) for c, (at, n) in zip(cursors, ranges, strict=True))
                )
            )

    assert asyncio.run(readers()) == [data[at : at + n] for at, n in ranges]

    async def trio_readers() -> list[bytes]:
        results: list[bytes] = [b""] * len(ranges)
        async with remotefs.aopen(url, cache_dir=tmp_path / "cache") as f:

            async def one(index: int) -> None:
                cursor = f.clone()
                at, n = ranges[index]
                cursor.seek(at + 1_000_000)
                results[index] = await cursor.read(n)

            async with trio.open_nursery() as nursery:
                for index in range(len(ranges)):
                    nursery.start_soon(one, index)
        return results

    assert trio.run(trio_readers) == [data[at + 1_000_000 : at + 1_000_000 + n] for at, n in ranges]

    with remotefs.open(url, cache_dir=tmp_path / "cache") as f:
        offsets = [random.Random(i).randrange(len(data)) for i in range(200)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda at: f.pread(100_000, at), offsets))
        assert got == [data[at : at + 100_000] for at in offsets]
    origin.wait_idle()
    data_ranges = [r for r in origin.served_ranges("/shared.bin") if r != (0, 1)]  # not probes
    assert no_overlaps(data_ranges), sorted(data_ranges)


CHILD = textwrap.dedent(
    """
    import sys, time, remotefs
    url, cache_dir, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with remotefs.open(url, cache_dir=cache_dir) as f:
        f.seek(2 * 1024 * 1024)
        sys.stdout.buffer.write(f.read(1024 * 1024))
        sys.stdout.flush()
        time.sleep(hold)
    """
)


def test_another_process_reuses_the_cache_and_meanwhile_is_refused(
    origin: Origin, origin_root: Path, tmp_path: Path, remotefs_mount: MountFactory
) -> None:
    data = write_random(origin_root / "p.bin", 8 * MiB)
    cache_dir = tmp_path / "cache"
    url = origin.url("p.bin")
    holder = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(cache_dir), "3"], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.read(MiB) == data[2 * MiB : 3 * MiB]
        with pytest.raises(remotefs.CacheInUseError) as info:
            remotefs.Cache(cache_dir)
        assert f"pid {holder.pid}" in str(info.value)
    finally:
        holder.wait(30)
    origin.wait_idle()
    origin.reset_counters()
    again = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(cache_dir), "0"], capture_output=True, check=True
    )
    assert again.stdout == data[2 * MiB : 3 * MiB]
    origin.wait_idle()
    assert data_bytes(origin, "/p.bin") == 0
    # A mount of the same cache directory reads it for free too.
    mount = remotefs_mount.mount([url], cache_dir=cache_dir)
    with open(mount.path / "p.bin", "rb", buffering=0) as handle:
        handle.seek(2 * MiB)
        assert handle.read(MiB) == data[2 * MiB : 3 * MiB]
    origin.wait_idle()
    assert data_bytes(origin, "/p.bin") == 0


@pytest.fixture
def remotefs_mount(remotefs: MountFactory) -> MountFactory:
    return remotefs


def test_faults_give_correct_bytes_or_a_typed_error_within_the_deadline(
    origin_root: Path, tmp_path: Path
) -> None:
    data = write_random(origin_root / "f.bin", 6 * MiB)
    with FaultyOrigin(origin_root) as origin:
        origin.plan.randomly(0.3, (Fault.RESET, Fault.HTTP_503, Fault.TRUNCATE), seed=5)
        with remotefs.Cache(
            tmp_path / "cache", read_deadline=8, stall_timeout=1, prefetch_tail=0
        ) as cache:
            with cache.open(origin.url("f.bin")) as f:
                for at in (0, 5 * MiB, MiB + 7, 3 * MiB):
                    assert f.pread(300_000, at) == data[at : at + 300_000]
            origin.plan.clear()
            origin.plan.always(Fault.HTTP_503)
            began = time.monotonic()
            with cache.open(origin.url("f.bin")) as f, pytest.raises(remotefs.NetworkError):
                f.pread(4096, 4 * MiB + 12345)
            assert time.monotonic() - began < 8 + 5
            origin.plan.clear()
            with pytest.raises(remotefs.NotFoundError):
                cache.open(origin.url("gone.bin"))
            # The file changes at the origin under an open object: never a mixed byte.
            with cache.open(origin.url("f.bin")) as f:
                assert f.pread(1000, 0) == data[:1000]
                write_random(origin_root / "f.bin", 6 * MiB + 1, seed=9)
                with pytest.raises(remotefs.RemoteChangedError):
                    f.pread(1000, 5 * MiB + 500_000)
            with cache.open(origin.url("f.bin")) as f:
                assert f.size == 6 * MiB + 1
                new = (origin_root / "f.bin").read_bytes()
                assert f.pread(1000, 5 * MiB + 500_000) == new[5 * MiB + 500_000 :][:1000]


def test_bad_urls_headers_and_options_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(remotefs.UrlError, match="unsupported URL scheme 'ftp'"):
        remotefs.open("ftp://example.invalid/x", cache_dir=tmp_path / "c1")
    with pytest.raises(ValueError, match="non-ASCII"):
        remotefs.open("http://127.0.0.1:9/x", cache_dir=tmp_path / "c2", headers={"X": "caf\u00e9"})
    with pytest.raises(TypeError, match="unknown option 'allow_other'"):
        remotefs.Cache(tmp_path / "c3", allow_other=True)
    with pytest.raises(ValueError, match="block size"):
        remotefs.Cache(tmp_path / "c4", block_size=1000)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-T": None}, "header 'X-T': its value must be a str, not NoneType"),
        ({"X-T": b"abc"}, "header 'X-T': its value must be a str, not bytes"),
        ({"X-T": 7}, "header 'X-T': its value must be a str, not int"),
        ({b"X-T": "v"}, "a header name must be a str, not bytes"),
        ({"X:T": "v"}, "'X:T' is not a valid header name (an RFC 9110 token)"),
        ({"X T": "v"}, "'X T' is not a valid header name"),
        ({"": "v"}, "'' is not a valid header name"),
        ({"X-T": "a\r\nInjected: 1"}, "the value contains control characters"),
        ([("X-T",)], "headers must be a mapping or (name, value) pairs"),
    ],
)
def test_headers_of_other_types_or_names_that_are_not_tokens_are_url_errors(
    tmp_path: Path, headers: Any, message: str
) -> None:
    """Nothing is sent as a str() of another type, and no name is split at a colon."""
    with pytest.raises(remotefs.UrlError, match=re.escape(message)):
        remotefs.Cache(tmp_path / "c1", headers=headers)
    with pytest.raises(remotefs.UrlError, match=re.escape(message)):
        remotefs.open("http://127.0.0.1:9/x", cache_dir=tmp_path / "c2", headers=headers)


def test_the_library_works_without_pyfuse3_as_another_user(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """A virtualenv with remotefs and no pyfuse3 (no libfuse needed), used by user nobody."""
    data = write_random(origin_root / "n.bin", 3 * MiB)
    home = Path(tempfile.mkdtemp(prefix="remotefs-lib-"))
    try:
        home.chmod(0o755)
        venv = home / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        install = subprocess.run(
            [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(ROOT)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PIP_NO_CACHE_DIR": "0"},
        )
        assert install.returncode == 0, install.stderr
        work = home / "work"
        work.mkdir()
        os.chown(work, 65534, 65534)
        script = textwrap.dedent(
            f"""
            import sys, remotefs
            assert "pyfuse3" not in sys.modules
            try:
                import pyfuse3
            except ImportError:
                pass
            else:
                raise SystemExit("pyfuse3 is installed")
            url = {origin.url("n.bin")!r}
            with remotefs.Cache({str(work / "cache")!r}) as cache:
                with cache.open(url) as f:
                    f.seek(1000)
                    sys.stdout.buffer.write(f.read(5000))
                cache.prefetch(url)
                assert cache.status()[0].complete
                assert cache.evict(url) == {len(data)}
                assert cache.status()[0].cached_bytes == 0
            """
        )
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             str(venv / "bin/python"), "-c", script],
            capture_output=True,
            timeout=120,
            cwd=work,
            env={"PATH": "/usr/bin:/bin", "HOME": str(work)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == data[1000:6000]
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_an_origin_without_range_is_downloaded_once_for_every_cursor(
    virtual_origin: VirtualOrigin, tmp_path: Path
) -> None:
    virtual_origin.files["plain.bin"] = VirtualFile(3 * MiB + 5, seed=8, ranges=False)
    url = virtual_origin.url("plain.bin")
    with remotefs.Cache(tmp_path / "cache") as cache, cache.open(url) as f:
        cursors = [f.clone() for _ in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda c: c.pread(100_000, 2 * MiB), cursors))
        assert got == [expected(8, 2 * MiB, 100_000)] * 4
        assert f.read() == expected(8, 0, 3 * MiB + 5)
    # Two requests: the probe (answered with the whole body, which remotefs does not read:
    # the origin counts what it wrote into the socket) and one stream of the whole file.
    assert virtual_origin.requests("plain.bin") == 2
    assert virtual_origin.body_bytes("plain.bin") <= 2 * (3 * MiB + 5)
