"""The README's quick start runs as written, top to bottom, against a local origin.

The block marked ``<!-- quick-start -->`` is taken from README.md and run by bash with ``-e``
and ``pipefail``: every command must succeed, in the README's order (an unmount in the wrong
order fails here with "target is busy"). The one change is the one a reader makes: the URLs'
``https://example.org`` becomes an origin on 127.0.0.1 that serves the three files the block
names (a random big.iso, a zip and an ext4 image).

The README's paths are used as they are. The block runs in a private mount namespace
(``unshare --mount``) whose ``/mnt`` is a fresh tmpfs, so ``/mnt/remote`` and ``/mnt/disk`` are
the block's own and the host's ``/mnt`` is never touched; every mount made there ends with the
namespace, and the copies of other FUSE mounts it starts with are dropped first (so
``remotefs status`` there shows the block's mount only). ``HOME`` is a temporary directory
(the default cache, ``~/.cache/remotefs``, goes there), and ``remotefs`` on the PATH is this
checkout's ``.venv/bin/remotefs``, as set-up's link makes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import write_random
from .origin import Origin
from .readme import readme_block
from .requirements import require_loop_mount, require_mount_namespaces, unavailable

PLACEHOLDER = "https://example.org"
UNSHARE = ["unshare", "--mount", "--propagation", "private"]
ZIP_MEMBERS = {f"docs/part-{index:02d}.txt": f"part {index}\n" * 200 for index in range(12)}
IMAGE_FILES = {"hello.txt": "hello from the image\n", "nested/deeper/note.txt": "a note\n"}

# Runs in the new namespace: the block's /mnt, then the block, then checks that it left nothing.
WRAPPER = r"""
set -euo pipefail
readlink /proc/self/ns/mnt > "$1"
# The namespace starts with copies of the host's mounts. Drop the copies of other FUSE mounts
# (other tests' remotefs mounts) at once: they are not the block's, and a copy held here would
# keep such a mount's daemon from finishing its unmount.
awk '$3 ~ /^fuse/ {print $2}' /proc/self/mounts | while read -r point; do
    umount -l "$(printf '%b' "$point")" 2>/dev/null || true
done
mount -t tmpfs -o mode=755 quick-start /mnt
cd "$2"
bash -e -o pipefail -x ./quick-start.sh
if mountpoint -q /mnt/remote || mountpoint -q /mnt/disk || mountpoint -q /mnt/releases; then
    echo "the quick start left a mount behind" >&2
    exit 1
fi
"""


def _remotefs_command(bin_dir: Path) -> None:
    """``remotefs`` on the PATH: this checkout's, as set-up links it."""
    bin_dir.mkdir()
    console = Path(sys.executable).parent / "remotefs"
    if console.exists():
        (bin_dir / "remotefs").symlink_to(console)
    else:  # pytest run by an interpreter without the console script
        script = bin_dir / "remotefs"
        script.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m remotefs \"$@\"\n")
        script.chmod(0o755)


def _serve_the_block_files(root: Path, tmp_path: Path) -> dict[str, str]:
    """Files for the block's three URLs; returns facts the output must show."""
    iso = write_random(root / "releases" / "big.iso", 4 * 1024 * 1024 + 321)
    with zipfile.ZipFile(root / "releases" / "big.zip", "w", zipfile.ZIP_STORED) as archive:
        for name, text in ZIP_MEMBERS.items():
            archive.writestr(name, text)
    content = tmp_path / "image-content"
    for name, text in IMAGE_FILES.items():
        (content / name).parent.mkdir(parents=True, exist_ok=True)
        (content / name).write_text(text)
    image = root / "images" / "disk.img"
    image.parent.mkdir(parents=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(image), "8M"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"iso_sha256": hashlib.sha256(iso).hexdigest()}


def _processes_in(namespace: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                    found.append(int(entry))
    return found


def test_readme_quick_start_runs_as_written(
    fuse_available: None,
    root_required: None,
    origin: Origin,
    origin_root: Path,
    tmp_path: Path,
) -> None:
    missing = [
        tool
        for tool in ("unshare", "mount", "mountpoint", "unzip", "getfattr", "mkfs.ext4")
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
    ]
    if missing:
        unavailable(f"the quick start needs {', '.join(missing)} (scripts/setup.sh test)")
    require_mount_namespaces()
    require_loop_mount("ext4", "the quick start (its block loop-mounts disk.img)")

    origin.listings = True  # the block mounts a directory its server lists
    block = readme_block("quick-start")
    urls = re.findall(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+", block)
    assert urls and all(url.startswith(PLACEHOLDER + "/") for url in urls), urls
    facts = _serve_the_block_files(origin_root, tmp_path)
    local = f"http://{origin.host}:{origin.port}"
    script = block.replace(PLACEHOLDER, local)

    work = tmp_path / "work"
    work.mkdir()
    (work / "quick-start.sh").write_text(script)
    (tmp_path / "home").mkdir()
    _remotefs_command(tmp_path / "bin")
    namespace_file = tmp_path / "namespace"
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
    }
    namespace = ""
    try:
        result = subprocess.run(
            [*UNSHARE, "bash", "-c", WRAPPER, "quick-start", str(namespace_file), str(work)],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            namespace = namespace_file.read_text().strip()
        left = _processes_in(namespace) if namespace else []
        for pid in left:  # a daemon the block did not unmount keeps the namespace alive
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert namespace and namespace != os.readlink("/proc/self/ns/mnt")
    assert result.returncode == 0, f"the quick start failed:\n{result.stderr[-6000:]}"
    assert not left, f"processes left running after the quick start: {left}"

    out = result.stdout
    assert f"{facts['iso_sha256']}  /mnt/remote/big.iso" in out
    for name in ("big.iso", "big.zip", "disk.img"):
        assert re.search(rf"^-r.* {re.escape(name)}$", out, re.MULTILINE), (name, out)
    for member in ZIP_MEMBERS:
        assert member in out, f"unzip -l did not list {member}"
    assert "hello.txt" in out and "note.txt" in out, "ls -R of the loop-mounted image"
    assert 'user.remotefs.complete="1"' in out, "getfattr after sha256sum read the whole file"
    assert f'user.remotefs.url="{local}/releases/big.iso"' in out
    status = out[out.index("user.remotefs.url") :]
    assert re.search(r"^/mnt/remote  \(pid \d+; 3 files", status, re.MULTILINE), status
    assert re.search(r"^big\.iso .* complete ", status, re.MULTILINE), status
    assert all(name in status for name in ("big.zip", "disk.img")), status
    # The directory mount lists what the origin's index of /releases/ shows (ls: last).
    assert out.rstrip().endswith("big.iso\nbig.zip"), out[-200:]


def test_readme_serve_example_runs_as_written(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """The "Serve over HTTP" block, after the quick start's urls.txt, on a free port.

    The block's port 8080 becomes a free one (a test must not take a port another program
    may hold); everything else runs as written. No FUSE: a serving daemon needs none.
    """
    missing = [tool for tool in ("curl", "od", "sha256sum") if shutil.which(tool) is None]
    if missing:
        unavailable(f"the serve example needs {', '.join(missing)} (scripts/setup.sh test)")
    facts = _serve_the_block_files(origin_root, tmp_path)
    local = f"http://{origin.host}:{origin.port}"
    heredoc = re.search(
        r"^cat > urls\.txt <<'EOF'\n.*?^EOF\n",
        readme_block("quick-start"),
        re.DOTALL | re.MULTILINE,
    )
    assert heredoc is not None, "the quick start no longer writes urls.txt"
    block = readme_block("serve-example")
    assert "127.0.0.1:8080" in block
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (heredoc.group(0) + block).replace(PLACEHOLDER, local)
    script = script.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    work = tmp_path / "work"
    work.mkdir()
    (work / "serve-example.sh").write_text(script)
    (tmp_path / "home").mkdir()
    _remotefs_command(tmp_path / "bin")
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
    }
    try:
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-x", "./serve-example.sh"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    finally:
        # A block that failed half-way leaves its daemon: stop it the way the block does.
        subprocess.run(["remotefs", "stop"], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, f"the serve example failed:\n{result.stderr[-6000:]}"
    out = result.stdout
    assert f"{facts['iso_sha256']}  -" in out
    assert re.search(r"^0000000\s+P\s+K\s+003\s+004\s*$", out, re.MULTILINE), out
    assert '"big.zip"' in out and '"disk.img"' in out, out
    assert re.search(r"\(pid \d+; 3 files", out), out
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pytest.fail("the server still answers after remotefs stop")
