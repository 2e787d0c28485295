"""Real media clients against `remotefs serve`: ffprobe, and a `<video>` in headless Chromium.

The clip is made here with ffmpeg: ten seconds of H.264 and AAC, looped to fifteen minutes
(250 MB) without re-encoding, and written without ``-movflags faststart``, so its index (the
``moov`` box) is at the end: a client must read the head, jump to the end, then jump back.
Both tests count what the origin served.
"""

from __future__ import annotations

import json
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .browser import chromium
from .conftest import need_tool
from .origin import Origin
from .serving import ServeFactory

ROOT = Path(__file__).resolve().parent.parent
#: Where the browser test leaves its screenshot of the status page (not committed).
ARTIFACTS = ROOT / "test-artifacts"


def top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types, in file order."""
    boxes = []
    with open(path, "rb") as handle:
        size = path.stat().st_size
        position = 0
        while position < size:
            handle.seek(position)
            length, kind = struct.unpack(">I4s", handle.read(8))
            if length == 1:
                (length,) = struct.unpack(">Q", handle.read(8))
            boxes.append(kind.decode())
            position += length
    return boxes


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ffmpeg = need_tool("ffmpeg", "ffmpeg")
    work = tmp_path_factory.mktemp("clip")
    short, long = work / "short.mp4", work / "origin" / "clip.mp4"
    long.parent.mkdir()
    subprocess.run(
        [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
            "-t", "10", "-c:v", "libx264", "-preset", "ultrafast", "-g", "50",
            "-b:v", "2M", "-maxrate", "2M", "-bufsize", "4M", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "64k", str(short),
        ],
        check=True,
        timeout=300,
    )  # fmt: skip
    subprocess.run(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-stream_loop", "89",
         "-i", str(short), "-c", "copy", str(long)],
        check=True,
        timeout=300,
    )  # fmt: skip
    boxes = top_level_boxes(long)
    assert boxes.index("moov") > boxes.index("mdat"), f"the index is not at the end: {boxes}"
    return long


@pytest.fixture
def clip_origin(clip: Path) -> Iterator[Origin]:
    with Origin(clip.parent) as origin:
        yield origin


def served_share(origin: Origin, clip: Path) -> float:
    origin.wait_idle()
    return origin.bytes_served("/clip.mp4") / clip.stat().st_size


def test_ffprobe_over_http_prints_what_it_prints_for_the_local_file(
    clip: Path, clip_origin: Origin, serve: ServeFactory
) -> None:
    ffprobe = need_tool("ffprobe", "ffmpeg")
    server = serve.start([clip_origin.url("clip.mp4")])  # default options
    url = server.file_url("clip.mp4")
    command = [ffprobe, "-hide_banner", "-show_format", "-show_streams", "-of", "json"]
    remote = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
    local = subprocess.run([*command, str(clip)], capture_output=True, text=True, timeout=120)
    assert remote.returncode == 0, remote.stderr
    # The same streams, codecs, durations, bit rates and tags; only the name differs.
    assert remote.stdout.replace(url, "CLIP") == local.stdout.replace(str(clip), "CLIP")
    assert remote.stderr.replace(url, "CLIP") == local.stderr.replace(str(clip), "CLIP")
    described = json.loads(remote.stdout)
    assert {s["codec_name"] for s in described["streams"]} == {"h264", "aac"}
    assert float(described["format"]["duration"]) > 890
    share = served_share(clip_origin, clip)
    assert share < 0.30, f"the origin served {share:.1%} of the clip"


PLAYER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>player</title></head>
<body><video id="v" preload="auto" width="640" height="360" src="{src}"></video></body>
</html>
"""

PLAY_AND_SEEK = """(async () => {
  const v = document.getElementById("v");
  if (v.readyState < 1) {
    await new Promise((resolve, reject) => {
      v.addEventListener("loadedmetadata", resolve, {once: true});
      v.addEventListener("error", () => reject(new Error("media error " + v.error.code)));
    });
  }
  await v.play();
  await new Promise(resolve => setTimeout(resolve, 1500));
  const played = v.currentTime;
  const target = v.duration * 0.8;
  v.currentTime = target;
  await new Promise(resolve => v.addEventListener("seeked", resolve, {once: true}));
  return {duration: v.duration, played, target, at: v.currentTime};
})()"""

STATUS_DOM = """(() => {
  const row = document.querySelector('tr[data-path="clip.mp4"]');
  if (!row) return null;
  const bar = row.querySelector('[role="progressbar"]');
  const fill = bar.querySelector(".fill");
  return {
    updated: document.body.dataset.updated || null,
    percent: Number(bar.getAttribute("aria-valuenow")),
    fill: fill.getBoundingClientRect().width,
    bar: bar.getBoundingClientRect().width,
    cells: Array.from(row.cells).map(cell => cell.textContent),
  };
})()"""


@pytest.fixture
def player_page(serve: ServeFactory) -> Iterator[tuple[ThreadingHTTPServer, list[str]]]:
    """A web server of the test, on 127.0.0.1, that serves the player page (its src is set
    once the remotefs server runs)."""
    source: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            page = PLAYER.format(src=source[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, source
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_chromium_plays_and_seeks_a_video_and_the_status_page_shows_it(
    clip: Path,
    clip_origin: Origin,
    serve: ServeFactory,
    player_page: tuple[ThreadingHTTPServer, list[str]],
) -> None:
    executable = need_tool("chromium", "chromium")
    # A player reads sequentially: the engine's readahead follows it up to --readahead-max
    # (64M by default, a quarter of this clip); 4M keeps what is fetched near what is played.
    server = serve.start([clip_origin.url("clip.mp4")], "--readahead-max", "4M")
    page_server, source = player_page
    source.append(server.file_url("clip.mp4"))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "serve-status-during-playback.png"
    screenshot.unlink(missing_ok=True)
    with chromium(executable) as browser:
        player = browser.tab(f"http://127.0.0.1:{page_server.server_address[1]}/")
        seek = player.evaluate(PLAY_AND_SEEK)
        assert seek["duration"] > 890
        assert seek["played"] > 0.5, seek  # it played from the start first
        assert abs(seek["at"] - seek["target"]) < 1.0, seek  # currentTime got there

        # The status page, in another tab while the video plays: a row with a progress bar.
        status = browser.tab(f"{server.url}/_remotefs/status")
        first = status.evaluate(STATUS_DOM)
        assert first is not None, "no row for clip.mp4"
        deadline = time.monotonic() + 10
        while (shown := status.evaluate(STATUS_DOM))["updated"] == first["updated"]:
            assert time.monotonic() < deadline, "the status page did not update itself"
            time.sleep(0.2)
        assert 0 < shown["percent"] < 50, shown
        assert 0 < shown["fill"] < shown["bar"], shown
        assert shown["cells"][0] == "clip.mp4" and shown["cells"][5] in ("partial", "filling")
        status.screenshot(screenshot)
        status.close()

        # Playback goes on after the seek.
        time.sleep(2.0)
        state = player.evaluate(
            "(() => { const v = document.getElementById('v');"
            " return {now: v.currentTime, paused: v.paused, error: v.error && v.error.code}; })()"
        )
        assert state["error"] is None and not state["paused"], state
        assert state["now"] > seek["at"] + 1.0, (seek, state)
        player.close()
    assert screenshot.stat().st_size > 10_000
    share = served_share(clip_origin, clip)
    assert share < 0.50, f"the origin served {share:.1%} of the clip"
