"""Run the format detector on bytes in memory, counting what it reads, bounded in time.

The parsers only ever see an `ImageReader`; here its reads come from a bytes object, so a
test can hand them real images, cut or damaged ones, and see exactly what they read.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from remotefs.formats import Budget, ImageReader, Layout, NoHint, analyse
from remotefs.formats.layout import Range, merge

from .image_makers import missing_tools
from .requirements import unavailable

MiB = 1024 * 1024
#: No parse of a test image may take longer than this (a hang is a failure, not a wait).
PARSE_DEADLINE = 20.0


@dataclass
class Analysis:
    """What one run of the detector did."""

    layout: Layout | None
    #: Why there is no layout, when a parser refused the image.
    refusal: str | None
    reads: list[Range] = field(default_factory=list)
    prefetched: list[Range] = field(default_factory=list)
    budget: Budget | None = None

    def metadata(self) -> list[Range]:
        assert self.layout is not None
        return merge(self.layout.metadata)

    def covers(self, start: int, end: int) -> bool:
        """True when ``[start, end)`` lies inside the layout's metadata."""
        return any(s <= start and end <= e for s, e in self.metadata())


def analyse_bytes(data: bytes, *, budget: int = 64 * MiB) -> Analysis:
    """Run `remotefs.formats.analyse` on *data*; a `NoHint` is recorded, anything else raised."""
    result = Analysis(None, None)
    result.budget = Budget(max_bytes=budget)

    async def read(offset: int, size: int) -> bytes:
        assert offset >= 0 and offset + size <= len(data), "a read outside the image"
        result.reads.append((offset, offset + size))
        await trio.lowlevel.checkpoint()
        return bytes(data[offset : offset + size])

    def prefetch(ranges: Sequence[Range]) -> None:
        result.prefetched.extend(ranges)

    async def main() -> None:
        assert result.budget is not None
        reader = ImageReader(read, len(data), result.budget, prefetch=prefetch)
        with trio.fail_after(PARSE_DEADLINE):
            try:
                result.layout = await analyse(reader)
            except NoHint as err:
                result.refusal = str(err)

    trio.run(main)
    return result


def analyse_path(path: Path, **kwargs: int) -> Analysis:
    return analyse_bytes(path.read_bytes(), **kwargs)


def require_image_tools() -> None:
    """The image makers' tools: in CI their absence fails the run, elsewhere it skips."""
    missing = missing_tools()
    if not missing:
        return
    unavailable(f"image tools missing: {', '.join(missing)} (scripts/setup.sh test installs them)")


def run(*command: str | Path) -> str:
    return subprocess.run(
        [str(part) for part in command], check=True, capture_output=True, text=True
    ).stdout
