"""Checksums: files whose digests are published (SHA256SUMS, ``sha256=`` lines, S3 ETags) are
verified end to end, and a copy that does not match is never served as if it did.

Real servers on 127.0.0.1 (nginx over a tree whose SHA256SUMS the real ``sha256sum`` wrote,
the test origin, moto's S3 server), a real mount read by real tools (``sha256sum``, ``cat``,
``head``), the library and ``remotefs serve``. A corrupted file at the origin is found when it
is read to its end: the reader gets EIO, the copy is dropped and fetched once more, and when
that copy does not match either, every read of the file fails (EIO, `IntegrityError`, 502)
until the origin or the digest changes.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import random
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from remotefs import Cache, IntegrityError, UrlError

from . import listing_servers
from .mounting import Mount, MountFactory, read_fails_with_eio, status_json, wait_for
from .origin import Origin
from .serving import ServeFactory

VERIFIED = "user.remotefs.verified"


def verified(path: Path) -> str:
    return os.getxattr(path, VERIFIED).decode()


def row(mount: Mount, name: str) -> dict[str, object]:
    rows = {r["path"]: r for r in status_json(mount.path)["files"]}
    found: dict[str, object] = rows[name]
    return found


def tool(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )


def make_files(root: Path, seed: int) -> dict[str, bytes]:
    """Files of sizes from *seed* (one several blocks and steps long), and their SHA256SUMS
    written by the real sha256sum; then ``bad.bin`` is corrupted at the origin (same size)."""
    rng = random.Random(seed)
    files = {
        "good.bin": rng.randbytes(rng.randrange(9 << 20, 20 << 20)),
        "small one.txt": rng.randbytes(rng.randrange(1, 5000)),
        "bad.bin": rng.randbytes(rng.randrange(200_000, 3 << 20)),
        "sub/nested.bin": rng.randbytes(rng.randrange(70_000, 300_000)),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    listed = subprocess.run(
        ["sha256sum", *files], cwd=root, capture_output=True, check=True, timeout=60
    ).stdout
    (root / "SHA256SUMS").write_bytes(listed)
    corrupt = bytearray(files["bad.bin"])
    corrupt[len(corrupt) // 2] ^= 0xFF
    (root / "bad.bin").write_bytes(bytes(corrupt))
    return files


def test_a_listed_sha256sums_verifies_files_and_a_corrupt_one_fails_after_one_refetch(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    files = make_files(root, seed=31)
    with listing_servers.nginx(root, tmp_path / "nginx") as (html, _json):
        mount = remotefs.mount(None, "--depth", "2", source=html.url + "/")
        good = mount.path / "good.bin"
        assert verified(good) == "pending"
        # A part of a file cannot be verified: it is served, and says so.
        assert tool("head", "-c", "1000", good).returncode == 0
        assert verified(good) == "pending"
        # Read whole: the real sha256sum equals the origin's, and the file is verified.
        for name in ("good.bin", "small one.txt", "sub/nested.bin"):
            result = tool("sha256sum", mount.path / name)
            assert result.stdout.split()[0] == hashlib.sha256(files[name]).hexdigest()
            assert verified(mount.path / name) == "sha256"
            assert row(mount, name)["verified"] == "sha256"
        # The checksum file itself is listed like any file, without a digest of its own.
        assert verified(mount.path / "SHA256SUMS") == "none"

        # The corrupted file: the read that reaches its end fails, never wrong bytes as right.
        bad = mount.path / "bad.bin"
        first = tool("cat", bad)
        assert first.returncode != 0 and "Input/output error" in first.stderr
        # The copy is dropped and fetched once more; it does not match either: reads fail.
        wait_for(
            lambda: verified(bad) == "mismatch" and read_fails_with_eio(bad, first=1),
            60,
            "the verdict",
        )
        log = mount.log_text()
        assert log.count("do not match their digest twice") == 1
        assert "fetching it again" in log
        origin_bytes = row(mount, "bad.bin")["origin_bytes"]
        assert isinstance(origin_bytes, int) and origin_bytes <= 2 * len(files["bad.bin"]) + (
            1 << 20
        )
        figures = status_json(mount.path)["daemon"]["verification"]
        assert figures["failed"] == 1 and figures["mismatches"] == 2
        assert figures["verified"] >= 3


def test_a_sha256_line_in_urls_txt_and_the_library_and_serve(
    remotefs: MountFactory,
    serve: ServeFactory,
    origin: Origin,
    origin_root: Path,
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    data = rng.randbytes(1_234_567)
    (origin_root / "f.bin").write_bytes(data)
    right = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(data + b"!").hexdigest()
    lines = [
        f"{origin.url('f.bin')}  right.bin",
        f"    sha256={right.upper()}",
        f"{origin.url('f.bin')}?copy  wrong.bin",
        f"    sha256={wrong}",
    ]
    mount = remotefs.mount(lines)
    assert (mount.path / "right.bin").read_bytes() == data
    assert verified(mount.path / "right.bin") == "sha256"
    with pytest.raises(OSError) as failure:
        (mount.path / "wrong.bin").read_bytes()
    assert failure.value.errno == errno.EIO

    # The library: a typed error at the end of the file, the right digest reads.
    with Cache(tmp_path / "lib-cache") as cache:
        with cache.open(origin.url("f.bin"), sha256=right) as handle:
            assert handle.read() == data
        with (
            pytest.raises(IntegrityError),
            cache.open(origin.url("f.bin") + "?lib", sha256=wrong) as handle,
        ):
            handle.read()
        with pytest.raises(UrlError, match="64 hex digits"):
            cache.open(origin.url("f.bin"), sha256="abc")
        with pytest.raises(UrlError, match=r"Cache\.listdir"):
            cache.open(origin.url("dir") + "/")

    # remotefs serve: once the refetched copy failed too, a 502, never the bytes.
    server = serve.start(lines)
    url = server.file_url("wrong.bin")
    with (  # the first read to the end is cut
        pytest.raises((urllib.error.URLError, http.client.HTTPException)),
        urllib.request.urlopen(url, timeout=30) as response,
    ):
        response.read()

    def refused() -> bool:
        try:
            urllib.request.urlopen(url, timeout=30).close()
        except urllib.error.HTTPError as err:
            return err.code == 502
        return False

    wait_for(refused, 60, "a 502")


def test_a_bsd_checksums_file_named_on_the_source_line_and_a_broken_one(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "pub").mkdir(parents=True)
    rng = random.Random(9)
    data = {name: rng.randbytes(rng.randrange(1, 90_000)) for name in ("a.iso", "b.iso")}
    for name, body in data.items():
        (root / "pub" / name).write_bytes(body)
    shutil.copytree(root / "pub", root / "other")
    tagged = subprocess.run(
        ["sha512sum", "--tag", *data], cwd=root / "pub", capture_output=True, check=True
    ).stdout
    (root / "sums.txt").write_bytes(tagged)
    (root / "broken.txt").write_bytes(b"# ok\nnot a checksum line\n")
    with listing_servers.nginx(root, tmp_path / "nginx") as (html, _json):
        mount = remotefs.mount(
            [
                f"{html.url}/pub/  tagged/",
                "    checksums=../sums.txt",
                f"{html.url}/other/  broken/",
                "    checksums=/broken.txt",
            ]
        )
        for name, body in data.items():
            assert (mount.path / "tagged" / name).read_bytes() == body
            assert verified(mount.path / "tagged" / name) == "sha512"
            assert (mount.path / "broken" / name).read_bytes() == body
            assert verified(mount.path / "broken" / name) == "none"
        assert "broken.txt:2: not a checksum line" in mount.log_text()


def test_a_bucket_s_single_part_etags_verify_as_md5(remotefs: MountFactory, tmp_path: Path) -> None:
    rng = random.Random(3)
    objects = {f"k{i}.bin": rng.randbytes(rng.randrange(1, 200_000)) for i in range(3)}
    with listing_servers.moto_s3(tmp_path / "moto") as base:
        listing_servers.put_objects(
            base, {"/bkt": b"", **{f"/bkt/d/{k}": v for k, v in objects.items()}}
        )
        mount = remotefs.mount(None, source=base + "/bkt/d/")
        for name, body in objects.items():
            assert (mount.path / name).read_bytes() == body
            assert verified(mount.path / name) == "md5"
