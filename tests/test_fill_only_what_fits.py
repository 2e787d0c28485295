"""Background fill starts only for a file the cache can keep whole, whatever door opened it.

One byte asked of ``remotefs serve`` opens the file, and with ``--fill opened`` (the default)
an opened file is completed in the background. For a 1 TiB file behind a small cache that was
a download of everything until the reserve stopped it. Now a file larger than the cache cap,
or lacking more bytes than the cache filesystem has free above its reserve, is never filled
(logged once); a file that fits, served by the same daemon, still is (the control: the rule
must not have switched fill off).

Each test waits for events (the log line, the complete file), never for a length of time.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from .conftest import mounted_tmpfs
from .mounting import wait_for
from .serving import ServeFactory, Server
from .virtual_origin import VirtualFile, VirtualOrigin, expected

MiB = 1024 * 1024
TiB = 1 << 40
#: Readahead of a first read, and a block or two of rounding: what one tiny range may cost.
SMALL_READ_BOUND = 8 * MiB


def get_range(server: Server, name: str, first: int, last: int) -> bytes:
    request = urllib.request.Request(
        server.file_url(name), headers={"Range": f"bytes={first}-{last}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 206
        body: bytes = response.read()
    return body


def complete(server: Server, name: str) -> bool:
    rows = [row for row in server.status()["files"] if row["path"].endswith(name)]
    return bool(rows) and rows[0]["cached_bytes"] == rows[0]["size"]


FILL = ("--fill", "opened", "--fill-idle", "0.2")


def test_one_byte_of_a_file_larger_than_the_cache_cap_starts_no_fill(
    virtual_origin: VirtualOrigin, serve: ServeFactory
) -> None:
    virtual_origin.files["big.bin"] = VirtualFile(64 * MiB + 3, seed=1)
    virtual_origin.files["small.bin"] = VirtualFile(3 * MiB + 1, seed=2)
    server = serve.start(
        [virtual_origin.url("big.bin"), virtual_origin.url("small.bin")],
        "--cache-max-size",
        "16M",
        *FILL,
        fill=True,
    )
    assert get_range(server, "big.bin", 1000, 1000) == expected(1, 1000, 1)
    wait_for(
        lambda: "big.bin: not completed in the background: it is larger" in server.log_text(),
        what="the fill's decision about big.bin",
    )
    # The control, after the decision: the same daemon fills a file that fits.
    assert get_range(server, "small.bin", 5, 5) == expected(2, 5, 1)
    wait_for(lambda: complete(server, "small.bin"), what="small.bin to be filled")
    assert virtual_origin.body_bytes("big.bin") <= SMALL_READ_BOUND
    assert not complete(server, "big.bin")
    log = server.log_text()
    assert log.count("big.bin: not completed in the background") == 1, log[-2000:]
    assert "than the cache cap (16.0 MiB, --cache-max-size)" in log


def test_one_byte_of_a_1_tib_file_starts_no_fill_past_the_free_space(
    virtual_origin: VirtualOrigin, serve: ServeFactory, tmp_path: Path, root_required: None
) -> None:
    """No cap: the cache filesystem (a 256 MiB tmpfs) is what a 1 TiB fill cannot fit."""
    virtual_origin.files["huge.bin"] = VirtualFile(TiB, seed=3)
    virtual_origin.files["fits.bin"] = VirtualFile(5 * MiB, seed=4)
    with mounted_tmpfs(tmp_path / "cachefs", "256m") as cachefs:
        server = serve.start(
            [virtual_origin.url("huge.bin"), virtual_origin.url("fits.bin")],
            *FILL,
            "--min-free",
            "32M",
            cache_dir=cachefs / "cache",
            fill=True,
        )
        assert get_range(server, "huge.bin", TiB - 6, TiB - 1) == expected(3, TiB - 6, 6)
        wait_for(
            lambda: "huge.bin: not completed in the background: the" in server.log_text(),
            what="the fill's decision about huge.bin",
        )
        assert get_range(server, "fits.bin", 0, 0) == expected(4, 0, 1)
        wait_for(lambda: complete(server, "fits.bin"), what="fits.bin to be filled")
        assert virtual_origin.body_bytes("huge.bin") <= SMALL_READ_BOUND
        log = server.log_text()
        assert "do not fit in the cache filesystem's free space above its reserve" in log
        assert "(32.0 MiB, --min-free)" in log
        server.stop()
