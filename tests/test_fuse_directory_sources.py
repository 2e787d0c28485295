"""Directory sources through a real FUSE mount: what a server lists is what the mount shows.

Real servers started by the test on 127.0.0.1 with their own configuration (nginx with its
HTML and JSON autoindex, Apache's mod_autoindex, lighttpd, Caddy where the release has it,
``python3 -m http.server``, and moto's S3 server with 2,500 keys over several pages). For each,
``remotefs mount URL/ MNT --depth 3``: the mount's tree equals the served tree (names with
spaces, ``#``, ``%`` and UTF-8), every size is right, and every file's bytes equal the
origin's. Then change over time (a file added or removed at the origin appears or vanishes
once the listing's lifetime ran out), and the ways a directory source sits beside urls.txt
lines, fstab and ``remotefs serve``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import listing_servers
from .listing_servers import ListingServer
from .mounting import (
    MountFactory,
    is_mounted,
    read_fails_with_eio,
    run_remotefs,
    status_json,
    wait_for,
)
from .requirements import unavailable
from .serving import ServeFactory

#: Names that break naive listing parsers: spaces, '#', '%', UTF-8, a dotted name.
NAMES = [
    "plain.bin",
    "with space.bin",
    "hash #1.bin",
    "pct 100%.bin",
    "caf\u00e9 \u2615.bin",
    "v1.2.3.tar.gz",
    "sub dir/nested.bin",
    "sub dir/deeper/x.bin",
]


def make_tree(root: Path, seed: int) -> dict[str, bytes]:
    """The served tree: NAMES with sizes and bytes drawn from *seed* (some span blocks)."""
    rng = random.Random(seed)
    tree = {}
    for name in NAMES:
        size = rng.choice([0, 1, rng.randrange(2, 5000), rng.randrange(65_536, 400_000)])
        data = rng.randbytes(size)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        tree[name] = data
    return tree


def mounted_tree(root: Path) -> dict[str, bytes]:
    """Every file under *root* with its bytes (read through the mount)."""
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, bytes], Path]]:
    """The tree every server serves, with the SHA256SUMS the real sha256sum wrote for it."""
    root = tmp_path_factory.mktemp("dir-sources") / "root"
    tree = make_tree(root, seed=20)
    sums = subprocess.run(
        ["sha256sum", "--", *tree], cwd=root, capture_output=True, check=True, timeout=60
    ).stdout
    (root / "SHA256SUMS").write_bytes(sums)
    yield {**tree, "SHA256SUMS": sums}, root


def _servers(root: Path, work: Path) -> Iterator[ListingServer]:
    """Each listing server in turn, over *root* (Caddy only where the release has it)."""
    missing = listing_servers.missing_servers()
    if missing:
        unavailable(f"{', '.join(missing)} missing (scripts/setup.sh test installs them)")
    with listing_servers.nginx(root, work / "nginx") as (html, json_listing):
        yield html
        yield json_listing
    with listing_servers.apache(root, work / "apache") as server:
        yield server
    with listing_servers.lighttpd(root, work / "lighttpd") as server:
        yield server
    if listing_servers.packaged("caddy"):
        with listing_servers.caddy(root, work / "caddy") as server:
            yield server
    with listing_servers.python_http_server(root, work / "python") as server:
        yield server


def verified(path: Path) -> str:
    return os.getxattr(path, "user.remotefs.verified").decode()


def _mount_follow_and_verify(
    remotefs: MountFactory,
    server: ListingServer,
    tree: dict[str, bytes],
    root: Path,
    tmp_path: Path,
) -> None:
    """One server: *root* serves *tree*, except that its largest file is corrupted at the
    origin (SHA256SUMS still lists the right digest) until this returns."""
    corrupt = max((name for name in tree if name != "SHA256SUMS"), key=lambda n: len(tree[n]))
    gone = "v1.2.3.tar.gz"
    damaged = bytearray(tree[corrupt])
    damaged[len(damaged) // 2] ^= 0x55
    (root / corrupt).write_bytes(bytes(damaged))
    args = ["--depth", "3", "--list-ttl", "1"]
    for name, value in server.headers:
        args += ["--header", f"{name}: {value}"]
    try:
        mount = remotefs.mount(
            None,
            *args,
            source=server.url + "/",
            mountpoint=tmp_path / f"mnt-{server.name}",
            cache_dir=tmp_path / f"cache-{server.name}",
        )
        names = {
            str((Path(d) / f).relative_to(mount.path))
            for d, _, files in os.walk(mount.path)
            for f in files
        }
        assert names == set(tree), server.name
        for name, data in tree.items():
            path = mount.path / name
            assert path.stat().st_size == len(data), (server.name, name)
            if name == corrupt:
                continue
            assert path.read_bytes() == data, (server.name, name)
            expected = "none" if name == "SHA256SUMS" else "sha256"
            assert verified(path) == expected, (server.name, name)
        # The corrupted file: EIO at its end, refetched once, then every read fails.
        target = mount.path / corrupt
        assert read_fails_with_eio(target), server.name
        wait_for(lambda: verified(target) == "mismatch", 60, f"{server.name}: mismatch")
        assert read_fails_with_eio(target)
        answer = status_json(mount.path)
        assert {row["path"] for row in answer["files"]} == set(tree)
        assert answer["daemon"]["directories"][0]["files"] == len(tree)
        # Change over time: a file added and one removed at the origin.
        (root / "added #2.bin").write_bytes(b"added")
        (root / gone).rename(tmp_path / gone)
        wait_for(lambda: (mount.path / "added #2.bin").exists(), 30, "the added file")
        wait_for(lambda: not (mount.path / gone).exists(), 30, "the removed file gone")
        assert (mount.path / "added #2.bin").read_bytes() == b"added"
        mount.unmount()
    finally:
        (root / "added #2.bin").unlink(missing_ok=True)
        if (tmp_path / gone).exists():
            (tmp_path / gone).rename(root / gone)
        (root / corrupt).write_bytes(tree[corrupt])


def test_each_server_s_tree_mounts_follows_and_verifies(
    remotefs: MountFactory, served: tuple[dict[str, bytes], Path], tmp_path: Path
) -> None:
    """Per server: the tree (names, sizes, bytes), every file verified against SHA256SUMS; a
    file added and one removed at the origin appear and vanish; a corrupted one fails."""
    tree, root = served
    seen = []
    for server in _servers(root, tmp_path / "servers"):
        _mount_follow_and_verify(remotefs, server, tree, root, tmp_path)
        seen.append(server.name)
    assert {"nginx", "nginx-json", "apache", "lighttpd", "python-http.server"} <= set(seen)


def test_a_bucket_of_2500_keys_over_pages_mounts_whole(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    rng = random.Random(2500)
    objects: dict[str, bytes] = {}
    for index in range(2500):
        prefix = ["", "a/", "a/b/", "c/"][index % 4]
        objects[f"{prefix}key-{index:04d}.bin"] = rng.randbytes(rng.randrange(0, 300))
    with listing_servers.moto_s3(tmp_path / "moto") as base:
        listing_servers.put_objects(
            base, {"/bucket": b"", **{f"/bucket/data/{k}": v for k, v in objects.items()}}
        )
        mount = remotefs.mount(
            None,
            "--depth",
            "3",
            "--list-ttl",
            "1",
            source=base + "/bucket/data/",
            cache_dir=tmp_path / "cache",
        )
        names = {
            str((Path(d) / f).relative_to(mount.path))
            for d, _, files in os.walk(mount.path)
            for f in files
        }
        assert names == set(objects)
        for key in rng.sample(sorted(objects), 50):
            assert (mount.path / key).read_bytes() == objects[key], key
            assert os.getxattr(mount.path / key, "user.remotefs.verified") == b"md5"
        # A key added and one deleted in the bucket appear and vanish with the next listing.
        listing_servers.put_objects(base, {"/bucket/data/c/new key.bin": b"new"})
        _delete(base + "/bucket/data/a/key-0001.bin")
        wait_for(lambda: (mount.path / "c" / "new key.bin").exists(), 60, "the new key")
        wait_for(lambda: not (mount.path / "a" / "key-0001.bin").exists(), 60, "the deleted key")
        assert (mount.path / "c" / "new key.bin").read_bytes() == b"new"


def _delete(url: str) -> None:
    request = urllib.request.Request(urllib.parse.quote(url, safe=":/"), method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 204, response.status


def test_files_added_and_removed_at_the_origin_follow_after_the_lifetime(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    tree = make_tree(root, seed=7)
    with listing_servers.nginx(root, tmp_path / "nginx") as (html, _json):
        mount = remotefs.mount(None, "--depth", "3", "--list-ttl", "1", source=html.url + "/")
        assert set(mounted_tree(mount.path)) == set(tree)
        kept = (mount.path / "plain.bin").open("rb")  # an open handle of a file that goes
        (root / "new file.bin").write_bytes(b"fresh")
        (root / "plain.bin").unlink()
        wait_for(lambda: (mount.path / "new file.bin").exists(), what="the new file")
        wait_for(lambda: not (mount.path / "plain.bin").exists(), what="the removed file gone")
        assert (mount.path / "new file.bin").read_bytes() == b"fresh"
        with kept:
            assert kept.read() == tree["plain.bin"]  # cached or not, the handle still reads
        # A listing that fails keeps what it listed: the mount does not empty itself.
        away = root.with_name("away")
        root.rename(away)
        try:
            answer = run_remotefs("reload", mount.path)
            assert answer.returncode == 0, answer.stderr
            assert (mount.path / "sub dir" / "nested.bin").exists()
            problems = status_json(mount.path)["daemon"]["directories"][0]["problems"]
            assert problems and "HTTP 404" in problems[0]
        finally:
            away.rename(root)
        assert (mount.path / "new file.bin").read_bytes() == b"fresh"


def test_urls_txt_lines_beside_a_source_win_collisions_and_options_apply(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    tree = make_tree(root, seed=3)
    (root / "skip.sig").write_bytes(b"sig")
    other = tmp_path / "other"
    other.mkdir()
    (other / "replacement.bin").write_bytes(b"from the file line")
    with (
        listing_servers.nginx(root, tmp_path / "nginx") as (html, _json),
        listing_servers.nginx(other, tmp_path / "nginx2") as (html2, _json2),
    ):
        mount = remotefs.mount(
            [
                f"{html2.url}/replacement.bin  mirror/plain.bin",
                f"{html.url}/   mirror/",
                "    depth=2",
                "    exclude=*.sig",
                f"{html.url}/sub%20dir/  flat/",
            ]
        )
        found = mounted_tree(mount.path)
        assert found["mirror/plain.bin"] == b"from the file line"
        assert "mirror/skip.sig" not in found
        assert found["mirror/sub dir/nested.bin"] == tree["sub dir/nested.bin"]
        assert "mirror/sub dir/deeper/x.bin" not in found  # depth=2
        assert found["flat/nested.bin"] == tree["sub dir/nested.bin"]
        assert "mirror/plain.bin: left out: line 1 has this path" in mount.log_text()


def test_fstab_and_the_mount_helper_take_a_directory_url(
    fuse_available: None, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    tree = make_tree(root, seed=11)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with listing_servers.nginx(root, tmp_path / "nginx") as (html, _json):
        result = subprocess.run(
            [
                *_python_module("remotefs.mount_helper"),
                html.url + "/",
                str(mountpoint),
                "-o",
                f"ro,_netdev,depth=3,cache_dir={tmp_path / 'cache'},no_fill",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        try:
            assert mounted_tree(mountpoint) == tree
            table = Path("/proc/self/mounts").read_text()
            assert f"{html.url}/ {mountpoint}" in table
        finally:
            assert run_remotefs("unmount", mountpoint).returncode == 0


def test_remotefs_serve_serves_what_a_directory_lists(serve: ServeFactory, tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = make_tree(root, seed=5)
    with listing_servers.nginx(root, tmp_path / "nginx") as (_html, json_listing):
        server = serve.start(None, "--depth", "3", source=json_listing.url + "/")
        for name, data in tree.items():
            with urllib.request.urlopen(server.file_url(name), timeout=20) as response:
                assert response.read() == data, name
        assert shutil.which("curl")
        head = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", server.url + "/sub%20dir/"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert head.stdout == "200"


def test_command_line_mistakes_are_one_line_and_mount_nothing(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.bin\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cases: list[tuple[list[str | Path], str]] = [
        (["mount", urls, mountpoint, "--depth", "2"], "--depth: is for a directory URL"),
        (["mount", "http://127.0.0.1:9/a.bin", mountpoint, "--depth", "2"], "does not end in"),
        (["mount", "http://127.0.0.1:9/d/", mountpoint, "--depth", "9"], "1 to 8"),
        (["mount", "http://127.0.0.1:9/d/?x=1", mountpoint], "has a query"),
    ]
    for args, fragment in cases:
        result = run_remotefs(*args, "--cache-dir", tmp_path / "cache")
        assert result.returncode == 2, result
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not os.listdir(mountpoint)


def test_a_directory_url_that_cannot_be_listed_mounts_nothing_and_says_why(
    fuse_available: None, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with listing_servers.nginx(root, tmp_path / "nginx") as (html, _json):
        result = run_remotefs(
            "mount", html.url + "/no-such-dir/", mountpoint, "--cache-dir", tmp_path / "cache"
        )
    assert result.returncode == 1, result
    line = result.stderr.strip()
    assert "cannot list the directory" in line and "HTTP 404" in line, line
    assert len(line.splitlines()) == 1
    assert not is_mounted(mountpoint) and not os.listdir(mountpoint)


def _python_module(name: str) -> list[str]:
    import sys

    return [sys.executable, "-m", name]


def test_a_file_the_json_listing_shows_changed_is_swapped_without_waiting_for_freshness(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    tree = make_tree(root, seed=13)
    with listing_servers.nginx(root, tmp_path / "nginx") as (_html, json_listing):
        # Fresh for an hour: only the listing can say the file changed.
        mount = remotefs.mount(
            None,
            "--list-ttl",
            "1",
            "--revalidate",
            "3600",
            source=json_listing.url + "/",
        )
        target = mount.path / "plain.bin"
        assert target.read_bytes() == tree["plain.bin"]
        (root / "plain.bin").write_bytes(b"a new version, another size")
        wait_for(
            lambda: target.stat().st_size == len(b"a new version, another size"),
            what="the listing's new size",
        )
        assert target.read_bytes() == b"a new version, another size"


def test_an_exact_listing_s_sizes_list_files_before_their_probes_answer(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    rng = random.Random(300)
    files = {f"f{i:03d}.bin": rng.randbytes(rng.randrange(0, 3000)) for i in range(300)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    with listing_servers.nginx(root, tmp_path / "nginx") as (_html, json_listing):
        # No wait for probes at all: what the mount shows at once comes from the listing.
        mount = remotefs.mount(None, "--revalidate-wait", "0", source=json_listing.url + "/")
        seeded = re.search(r"(\d+) listed from the cache are being confirmed", mount.log_text())
        assert seeded and int(seeded.group(1)) > 0, mount.log_text()
        for name, data in files.items():
            assert (mount.path / name).stat().st_size == len(data), name
        # The probes answer in the background and complete what the listing did not say.
        wait_for(
            lambda: all("user.remotefs.etag" in os.listxattr(mount.path / name) for name in files),
            what="every file's ETag from its probe",
        )
        for name in rng.sample(sorted(files), 40):
            assert (mount.path / name).read_bytes() == files[name], name


def test_a_source_s_header_lines_go_with_its_listings_and_its_files(
    remotefs: MountFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    tree = make_tree(root, seed=17)
    with listing_servers.nginx(root, tmp_path / "nginx", token="s3cret") as (html, json_listing):
        mount = remotefs.mount(
            [
                f"{html.url}/   html/",
                "    depth=3",
                "    X-Token: s3cret",
                f"{json_listing.url}/   json/",
                "    depth=3",
                "    X-Token: s3cret",
                f"{html.url}/sub%20dir/   refused/",
            ]
        )
        found = mounted_tree(mount.path)
        for name, data in tree.items():
            assert found[f"html/{name}"] == data, name
            assert found[f"json/{name}"] == data, name
        # The line without the header is refused by the server: its directory stays empty,
        # the rest of the mount is there, and status says why.
        assert not any(path.startswith("refused/") for path in found)
        problems = [d["problems"] for d in status_json(mount.path)["daemon"]["directories"]]
        assert problems[0] == problems[1] == [] and "HTTP 403" in problems[2][0]
        assert "s3cret" not in mount.log_text()
