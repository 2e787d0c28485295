"""Fuzzing the format parsers with damaged real images (hypothesis).

Each example takes a small image made by the real tool, and overwrites bytes where the
parser looks (the ranges it read from the intact image: superblocks, descriptors, inode
tables, path tables, directory records, central directories) with random bytes or with the
values that break naive parsers (0, all ones, 2^31 - 1, the image's size), and maybe cuts the
image short. The parse must end within its deadline, raise nothing but `NoHint`, stay
within its budget, and give either no hint or a layout that lies inside the image.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remotefs.formats.layout import merge

from .image_analysis import analyse_bytes, require_image_tools, run
from .image_makers import KiB, TreeShape, make_iso, make_squashfs, make_zip_tool, write_tree

SHAPE = TreeShape(files=25, min_size=10, max_size=200 * KiB, top_dirs=3, sub_dirs=2, seed=9)
BUDGET = 4 * 1024 * 1024
#: ``FUZZ_EXAMPLES=5000`` for a longer hunt with fresh random examples (3,000 per format
#: found nothing when these tests were written).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[bytes, list]]]:
    """Small real images, with the ranges their intact parse reads."""
    require_image_tools()
    work = tmp_path_factory.mktemp("fuzz")
    content = work / "content"
    write_tree(content, SHAPE)
    paths: dict[str, Path] = {}
    for kind, options in (("ext4", ()), ("ext2", ()), ("ext4nf", ("-O", "^flex_bg"))):
        paths[kind] = work / f"{kind}.img"
        mkfs = "mkfs.ext2" if kind == "ext2" else "mkfs.ext4"
        run(mkfs, "-q", "-F", *options, "-d", content, paths[kind], "6M")
    paths["squashfs"] = work / "s.img"
    make_squashfs(paths["squashfs"], SHAPE, work)
    paths["iso9660"] = work / "i.iso"
    make_iso(paths["iso9660"], SHAPE, work)
    paths["zip"] = work / "z.zip"
    make_zip_tool(paths["zip"], SHAPE, work)
    found = {}
    for kind, path in paths.items():
        data = path.read_bytes()
        clean = analyse_bytes(data, budget=BUDGET)
        assert clean.layout is not None, (kind, clean.refusal)
        found[kind] = (data, merge(clean.reads))
    yield found
    shutil.rmtree(work, ignore_errors=True)


NASTY = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def damage(draw: st.DrawFn, data: bytes, read: list[tuple[int, int]]) -> bytes:
    """*data* with a few fields overwritten where the parser reads, maybe cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        start, end = draw(st.sampled_from(read))
        at = draw(st.integers(start, max(start, end - 4)))
        if draw(st.booleans()):
            value = draw(st.sampled_from([*NASTY, len(data), len(data) // 512, len(data) // 4096]))
            struct.pack_into("<I", out, at, value & 0xFFFFFFFF)
        else:
            out[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
    if draw(st.integers(0, 4)) == 0:
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


@pytest.mark.parametrize("kind", ["ext4", "ext2", "ext4nf", "squashfs", "iso9660", "zip"])
def test_damaged_images_never_crash_hang_or_overspend(
    images: dict[str, tuple[bytes, list]], kind: str
) -> None:
    data, read = images[kind]

    @settings(
        max_examples=EXAMPLES or 150,
        deadline=None,
        derandomize=not EXAMPLES,  # CI: the same examples every run
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        damaged = draw.draw(damage(data, read))
        analysis = analyse_bytes(damaged, budget=BUDGET)  # raises on anything but NoHint
        assert analysis.budget is not None
        assert analysis.budget.used_bytes <= BUDGET
        assert analysis.budget.used_batches <= analysis.budget.max_batches
        if analysis.layout is not None:
            for start, end in analysis.layout.metadata:
                assert 0 <= start <= end <= len(damaged)
            for start, end in analysis.layout.extents:
                assert 0 <= start < end <= len(damaged)

    check()
