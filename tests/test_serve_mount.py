"""One daemon, one engine, one cache, two doors: `remotefs mount URLS MNT --serve ADDR`; and a
serve-only daemon that needs no FUSE at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from .conftest import need_tool, read_direct, write_random
from .mounting import MountFactory, run_remotefs
from .origin import Origin
from .serving import curl

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


def data_requests(origin: Origin, path: str) -> list[tuple[int, int]]:
    """Ranges the origin sent for *path*, without the one-byte probes."""
    origin.wait_idle()
    return [(s, e) for s, e in origin.served_ranges(path) if (s, e) != (0, 1)]


def test_a_range_read_over_http_then_through_the_mount_costs_one_fetch(
    origin: Origin, origin_root: Path, remotefs: MountFactory
) -> None:
    need_tool("curl", "curl")
    data = write_random(origin_root / "both.bin", 16 * MiB)
    mount = remotefs.mount(
        [origin.url("both.bin")],
        *("--serve", "127.0.0.1:0", "--prefetch-head", "0", "--prefetch-tail", "0"),
    )
    status = json.loads(run_remotefs("status", mount.path, "--json").stdout)
    assert status["mountpoint"] == str(mount.path)
    (address,) = status["listen"]
    origin.wait_idle()
    origin.reset_counters()

    # Over HTTP: one Range request reaches the origin.
    start = 5 * MiB + 4096
    status_code, body, _ = curl("-r", f"{start}-{start + 99_999}", f"{address}/both.bin")
    assert (status_code, body) == (206, data[start : start + 100_000])
    fetched = data_requests(origin, "/both.bin")
    assert len(fetched) == 1, fetched
    (first,) = fetched
    assert first[0] <= start and first[1] >= start + 100_000

    # The same bytes through the mount (O_DIRECT: past the page cache, to the daemon):
    # nothing more from the origin.
    assert read_direct(mount.path / "both.bin", start, 65536) == data[start : start + 65536]
    assert (
        read_direct(mount.path / "both.bin", start + 32768, 32768)
        == data[start + 32768 : start + 65536]
    )
    assert data_requests(origin, "/both.bin") == [first]

    # And the other way round: read through the mount first, then over HTTP.
    other = 12 * MiB
    assert read_direct(mount.path / "both.bin", other, 4096) == data[other : other + 4096]
    after_mount = data_requests(origin, "/both.bin")
    assert len(after_mount) == 2
    status_code, body, _ = curl("-r", f"{other}-{other + 4095}", f"{address}/both.bin")
    assert (status_code, body) == (206, data[other : other + 4096])
    assert data_requests(origin, "/both.bin") == after_mount

    # One daemon: the control socket, the mount and the server report one pid.
    _, health, _ = curl(f"{address}/_remotefs/status.json")
    assert json.loads(health)["pid"] == mount.pid == status["pid"]
    mount.unmount()  # the whole daemon stops: the server too
    assert subprocess.run(["curl", "-sS", f"{address}/"], capture_output=True).returncode != 0


def test_serve_needs_no_fuse_nor_pyfuse3_and_runs_as_another_user(
    origin: Origin, origin_root: Path
) -> None:
    """A virtualenv with remotefs[serve] and no pyfuse3, used by user nobody."""
    need_tool("curl", "curl")
    data = write_random(origin_root / "n.bin", 3 * MiB)
    home = Path(tempfile.mkdtemp(prefix="remotefs-serve-"))
    try:
        home.chmod(0o755)
        venv = home / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        install = subprocess.run(
            [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
             f"{ROOT}[serve]"],
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        assert install.returncode == 0, install.stderr
        work = home / "work"
        work.mkdir()
        os.chown(work, 65534, 65534)
        urls = work / "urls.txt"
        urls.write_text(origin.url("n.bin") + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work)}
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        check = subprocess.run(
            [*nobody, str(venv / "bin/python"), "-c", "import pyfuse3"],
            capture_output=True,
            env=env,
            check=False,
        )
        assert check.returncode != 0, "pyfuse3 is installed in the virtualenv"
        started = subprocess.run(
            [*nobody, str(venv / "bin/remotefs"), "serve", str(urls), "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=work,
            env=env,
        )
        assert started.returncode == 0, started.stderr
        found = re.search(r"serving (http://\S+)", started.stdout)
        assert found
        status, body, _ = curl("-r", "1000-5999", f"{found.group(1)}/n.bin")
        assert (status, body) == (206, data[1000:6000])
        stopped = subprocess.run(
            [*nobody, str(venv / "bin/remotefs"), "stop"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert stopped.returncode == 0, stopped.stderr
        log = (work / ".cache" / "remotefs" / "remotefs.log").read_text()
        assert "pyfuse3" not in log and "stopping; saving state" in log
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_a_fstab_line_can_serve_too() -> None:
    """``serve=`` and ``token_file=`` are mount options like the others (mount_helper)."""
    from remotefs.mount_helper import options_to_flags

    flags = options_to_flags(["ro", "serve=127.0.0.1:8080", "token_file=/etc/remotefs/t"])
    assert flags == ["--serve", "127.0.0.1:8080", "--token-file", "/etc/remotefs/t"]
