"""The format parsers (`remotefs.formats`) on images made by the real tools, and on broken ones.

Each layout is checked against the tools' own view of the image: debugfs and dumpe2fs for
ext2/3/4 (every directory block, the used part of every inode table and the journal's
superblock are metadata; every file's extents are data extents), unsquashfs for squashfs,
isoinfo for ISO 9660, Python's zipfile for zip. Then the same images cut short, damaged and
made hostile (loops, offsets past the end, huge counts): a parser gives no hint, reads
nothing outside the image and nothing past its budget, and never hangs.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotefs.formats import HEAD
from remotefs.formats.layout import PAGE, Extents, Layout

from .image_analysis import Analysis, analyse_bytes, analyse_path, require_image_tools, run
from .image_makers import (
    KiB,
    MiB,
    TreeShape,
    make_ext4,
    make_iso,
    make_squashfs,
    make_zip_tool,
    random_shape,
    write_tree,
)
from .requirements import require_loop_mount

SMALL = TreeShape(files=40, min_size=10, max_size=400 * KiB, top_dirs=4, sub_dirs=3, seed=5)


@dataclass
class Image:
    path: Path
    plan: list[tuple[str, int]]
    #: Where the files' contents were written (for byte-for-byte checks), if kept.
    content: Path | None = None


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_image_tools()
    path = tmp_path_factory.mktemp("formats")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def content(workdir: Path) -> tuple[Path, list[tuple[str, int]]]:
    """A small tree of random files, written once for the images made with -d."""
    root = workdir / "content"
    plan = write_tree(root, SMALL)
    return root, plan


def _mkfs_d(workdir: Path, name: str, kind: str, *options: str) -> Path:
    image = workdir / f"{name}.img"
    run(f"mkfs.{kind}", "-q", "-F", *options, "-d", workdir / "content", image, "48M")
    return image


# -- ext2/3/4 -----------------------------------------------------------------------------------


def _debugfs(image: Path, commands: list[str]) -> dict[str, str]:
    """Run debugfs *commands* in one process; the output of each, by command."""
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    output = subprocess.run(
        ["debugfs", "-f", str(script), str(image)], capture_output=True, text=True, check=True
    ).stdout
    results: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("debugfs: "):
            current = line.removeprefix("debugfs: ").strip()
            results[current] = ""
        elif current is not None:
            results[current] += line + "\n"
    return results


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match is not None, pattern
    return int(match.group(1))


def _ext_geometry(image: Path) -> tuple[int, int, int, list[tuple[int, int]]]:
    """Block size, inode size, inodes per group, and each group's (inode table, used)."""
    text = run("dumpe2fs", image)
    block_size = _number(r"Block size:\s+(\d+)", text)
    inode_size = _number(r"Inode size:\s+(\d+)", text)
    per_group = _number(r"Inodes per group:\s+(\d+)", text)
    groups = []
    for section in re.split(r"^Group \d+:", text, flags=re.MULTILINE)[1:]:
        table = _number(r"Inode table at (\d+)", section)
        unused = re.search(r"(\d+) unused inodes", section)
        free = _number(r"(\d+) free inodes", section)
        if unused is not None:
            used = per_group - int(unused.group(1))
        else:
            used = 0 if free == per_group else per_group
        groups.append((table, used))
    return block_size, inode_size, per_group, groups


def _directories(plan: list[tuple[str, int]]) -> list[str]:
    found = {"/"}
    for path, _ in plan:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            found.add("/" + "/".join(parts[:depth]))
    return sorted(found)


def check_ext_layout(image: Image, analysis: Analysis, *, journal: bool) -> None:
    """The layout against debugfs and dumpe2fs: see the module docstring."""
    assert analysis.layout is not None, analysis.refusal
    block_size, inode_size, _, groups = _ext_geometry(image.path)
    for table, used in groups:
        length = -(-used * inode_size // block_size) * block_size
        if used:
            assert analysis.covers(table * block_size, table * block_size + length)
    commands = [f"blocks {d}" for d in _directories(image.plan)]
    commands += [f"ex /{path}" for path, size in image.plan if size]
    if journal:
        commands.append("blocks <8>")
    output = _debugfs(image.path, commands)
    for directory in _directories(image.plan):
        blocks = [int(b) for b in output[f"blocks {directory}"].split()]
        assert blocks, directory
        for block in blocks:
            assert analysis.covers(block * block_size, (block + 1) * block_size), directory
    if journal:
        first = int(output["blocks <8>"].split()[0])
        assert analysis.covers(first * block_size, (first + 1) * block_size)
    extents = analysis.layout.extents
    for path, size in image.plan:
        if not size:
            continue
        rows = [m.groups() for m in EXTENT_ROW.finditer(output[f"ex /{path}"])]
        if not rows or any(int(row[1]) != 0 for row in rows):
            continue  # a block map (ext2/3), or a tree deeper than the inode: data unknown
        for row in rows:
            physical = int(row[6])
            found = extents.containing(physical * block_size)
            assert found is not None and found[0] == physical * block_size, path


#: A row of debugfs's ``ex``: level/max, entry/entries, logical start - end, physical start -
#: end, length.
EXTENT_ROW = re.compile(
    r"^\s*(\d+)/\s*(\d+)\s+(\d+)/\s*(\d+)\s+(\d+)\s+-\s+(\d+)\s+(\d+)\s+-\s+(\d+)\s+(\d+)",
    re.MULTILINE,
)


def _content_at_extents(image: Image, analysis: Analysis) -> None:
    """Every file's first bytes are where one of the layout's extents starts."""
    assert analysis.layout is not None and image.content is not None
    data = image.path.read_bytes()
    starts = {data[start : start + 64] for start, _ in analysis.layout.extents}
    for path, size in image.plan:
        if size >= 64:
            head = (image.content / path).read_bytes()[:64]
            assert head in starts, path


@pytest.mark.parametrize(
    ("kind", "options", "journal"),
    [
        ("ext4", (), True),
        ("ext4", ("-O", "^has_journal"), False),
        ("ext4", ("-O", "^flex_bg"), True),
        ("ext4", ("-b", "1024"), True),
        ("ext4", ("-O", "meta_bg,^resize_inode"), True),
        ("ext4", ("-O", "^metadata_csum,uninit_bg"), True),
        ("ext3", (), True),
        ("ext2", (), False),
    ],
)
def test_ext_images_made_by_mkfs(
    workdir: Path,
    content: tuple[Path, list[tuple[str, int]]],
    kind: str,
    options: tuple[str, ...],
    journal: bool,
) -> None:
    name = f"{kind}{''.join(options).replace(',', '').replace('^', 'no')}"
    image = Image(_mkfs_d(workdir, name, kind, *options), content[1], content[0])
    analysis = analyse_path(image.path)
    check_ext_layout(image, analysis, journal=journal)
    if kind == "ext4":
        _content_at_extents(image, analysis)
    # Three rounds after the head: descriptors, inode tables, then deeper trees if any.
    assert analysis.budget is not None and analysis.budget.used_batches <= 6


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ext4_images_filled_through_a_mount_in_random_shapes(
    root_required: None, workdir: Path, seed: int
) -> None:
    """The kernel's allocator spreads directories over the groups: the shapes users have."""
    require_loop_mount("ext4")
    shape = random_shape(seed, max_files=300, max_size=2 * MiB)
    flex = seed != 2
    path = workdir / f"mounted-{seed}.img"
    plan = make_ext4(path, 256 * MiB, shape, flex_bg=flex, journal=seed != 3)
    analysis = analyse_path(path)
    check_ext_layout(Image(path, plan), analysis, journal=seed != 3)
    assert analysis.layout is not None
    # The metadata is a small part of the image, and every file has its extent.
    assert sum(e - s for s, e in analysis.metadata()) < 16 * MiB
    assert len(analysis.layout.extents) >= sum(1 for _, size in plan if size)


# -- squashfs ------------------------------------------------------------------------------------


def _bytes_used(image: Path) -> int:
    return _number(r"Filesystem size (\d+) bytes", run("unsquashfs", "-s", image))


@pytest.mark.parametrize("compressor", ["gzip", "xz", "lzma", "lz4", "zstd"])
def test_squashfs_tables_region_and_extents(workdir: Path, compressor: str) -> None:
    image = workdir / f"squash-{compressor}.img"
    plan = make_squashfs(image, SMALL, workdir, compressor=compressor)
    analysis = analyse_path(image)
    assert analysis.layout is not None, analysis.refusal
    used = _bytes_used(image)
    region = analysis.metadata()[-1]
    assert region[1] == used and region[0] < used
    if compressor in ("gzip", "xz", "lzma"):
        # One extent per file with whole blocks, plus the fragment blocks.
        big = sum(1 for _, size in plan if size >= 128 * KiB)
        assert big <= len(analysis.layout.extents) <= big + len(plan)
        assert all(end <= region[0] for _, end in analysis.layout.extents)
    else:
        assert not len(analysis.layout.extents)
        assert "unknown" in " ".join(analysis.layout.notes)


def test_uncompressed_squashfs_extents_hold_the_files(
    workdir: Path, content: tuple[Path, list[tuple[str, int]]]
) -> None:
    image = workdir / "squash-plain.img"
    run("mksquashfs", content[0], image, "-noappend", "-quiet", "-noI", "-noD", "-noF", "-noX")
    analysis = analyse_path(image)
    assert analysis.layout is not None, analysis.refusal
    data = image.read_bytes()
    for path, size in content[1]:
        if size < 64:
            continue
        head = (content[0] / path).read_bytes()[:64]
        assert any(head in data[s:e] for s, e in analysis.layout.extents), path


# -- ISO 9660 ------------------------------------------------------------------------------------


def _iso_directory_extents(image: Path, flag: str) -> list[int]:
    listing = run("isoinfo", "-l", *([flag] if flag else []), "-i", image)
    blocks = []
    for line in listing.splitlines():
        match = re.search(r"\[\s*(\d+)\s+02\]", line)
        if match and line.startswith("d"):
            blocks.append(int(match.group(1)))
    return blocks


@pytest.mark.parametrize(
    ("tool", "options", "tree"),
    [
        ("xorriso", ("-R", "-J"), "-R"),
        ("genisoimage", ("-R", "-J"), "-R"),
        ("genisoimage", ("-J",), "-J"),
        ("genisoimage", (), ""),
    ],
)
def test_iso9660_directories_are_metadata_and_files_are_extents(
    workdir: Path,
    content: tuple[Path, list[tuple[str, int]]],
    tool: str,
    options: tuple[str, ...],
    tree: str,
) -> None:
    image = workdir / f"{tool}{''.join(options)}.iso"
    if tool == "xorriso":
        run("xorriso", "-as", "mkisofs", "-quiet", *options, "-o", image, content[0])
    else:
        run("genisoimage", "-quiet", *options, "-o", image, content[0])
    analysis = analyse_path(image)
    assert analysis.layout is not None, analysis.refusal
    for block in _iso_directory_extents(image, tree):
        assert analysis.covers(block * 2048, block * 2048 + 2048), block
    data = image.read_bytes()
    whole = {data[s:e] for s, e in analysis.layout.extents}
    for path, size in content[1]:
        if size:
            assert (content[0] / path).read_bytes() in whole, path


# -- zip -----------------------------------------------------------------------------------------


def _central_directory(path: Path) -> tuple[int, int]:
    with zipfile.ZipFile(path) as archive:
        start = archive.start_dir
    with open(path, "rb") as handle:
        end_record = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    return start, start + end_record[zipfile._ECD_SIZE]  # type: ignore[attr-defined]


def test_zip_made_by_zip_gives_its_exact_central_directory(workdir: Path) -> None:
    image = workdir / "tool.zip"
    make_zip_tool(image, SMALL, workdir)
    analysis = analyse_path(image)
    assert analysis.layout is not None, analysis.refusal
    assert analysis.layout.metadata[0] == _central_directory(image)


def test_zip64_and_a_stub_in_front(workdir: Path) -> None:
    """More than 65,535 members need ZIP64 records; a stub shifts every recorded offset."""
    image = workdir / "many.zip"
    with zipfile.ZipFile(image, "w") as archive:
        for index in range(70_000):
            archive.writestr(f"m{index}", b"")
    analysis = analyse_path(image)
    assert analysis.layout is not None, analysis.refusal
    assert analysis.layout.metadata[0] == _central_directory(image)
    stubbed = workdir / "stubbed.zip"
    stub = b"#!/bin/sh\nexit 0\n" * 1000
    stubbed.write_bytes(stub + image.read_bytes())  # offsets left unadjusted, as cat does
    analysis = analyse_path(stubbed)
    assert analysis.layout is not None, analysis.refusal
    start, end = _central_directory(image)
    assert analysis.layout.metadata[0] == (start + len(stub), end + len(stub))


# -- partitioned disk images ---------------------------------------------------------------------


def _partition(image: Path, script: str) -> None:
    subprocess.run(["sfdisk", "-q", str(image)], input=script, text=True, check=True)


def test_gpt_disk_with_ext4_and_squashfs_partitions(
    workdir: Path, content: tuple[Path, list[tuple[str, int]]]
) -> None:
    disk = workdir / "gpt.img"
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as handle:
        handle.truncate(120 * MiB)
    _partition(disk, "label: gpt\nstart=2048, size=102400, type=L\nstart=106496, type=L\n")
    run("mkfs.ext4", "-q", "-F", "-d", content[0], "-E", f"offset={2048 * 512}", disk, "48M")
    squash = workdir / "part.sq"
    run("mksquashfs", content[0], squash, "-noappend", "-quiet")
    with open(disk, "r+b") as handle:
        handle.seek(106496 * 512)
        handle.write(squash.read_bytes())
    analysis = analyse_path(disk)
    assert analysis.layout is not None, analysis.refusal
    assert analysis.layout.kind.startswith("gpt(ext4, squashfs")
    # Each partition's metadata where the partition is: the ext4 superblock, the squashfs
    # tables ending where its bytes end.
    assert analysis.covers(2048 * 512 + 1024, 2048 * 512 + 2048)
    assert analysis.metadata()[-1][1] == 106496 * 512 + _bytes_used(squash)


def test_mbr_disk_with_a_logical_partition(
    workdir: Path, content: tuple[Path, list[tuple[str, int]]]
) -> None:
    disk = workdir / "mbr.img"
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as handle:
        handle.truncate(100 * MiB)
    _partition(
        disk,
        "label: dos\nstart=2048, size=20480, type=83\nstart=22528, size=180000, type=5\n"
        "start=24576, size=100000, type=83\n",
    )
    run("mkfs.ext4", "-q", "-F", "-d", content[0], "-E", f"offset={24576 * 512}", disk, "48M")
    analysis = analyse_path(disk)
    assert analysis.layout is not None, analysis.refusal
    assert analysis.layout.kind == "mbr(ext4)"
    assert analysis.covers(24576 * 512 + 1024, 24576 * 512 + 2048)


# -- broken and hostile images -------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_images(workdir: Path, content: tuple[Path, list[tuple[str, int]]]) -> dict[str, bytes]:
    """One small image of every format, as bytes (the raw material of the hostile tests)."""
    images = {}
    images["ext4"] = _mkfs_d(workdir, "h-ext4", "ext4").read_bytes()
    images["ext2"] = _mkfs_d(workdir, "h-ext2", "ext2").read_bytes()
    squash = workdir / "h.sq"
    make_squashfs(squash, SMALL, workdir)
    images["squashfs"] = squash.read_bytes()
    iso = workdir / "h.iso"
    make_iso(iso, SMALL, workdir)
    images["iso9660"] = iso.read_bytes()
    archive = workdir / "h.zip"
    make_zip_tool(archive, SMALL, workdir)
    images["zip"] = archive.read_bytes()
    return images


def assert_no_hint_or_sane(analysis: Analysis, size: int) -> None:
    """A broken image gives no hint, or a layout whose ranges lie inside it."""
    assert analysis.budget is not None
    assert analysis.budget.used_bytes <= analysis.budget.max_bytes
    if analysis.layout is not None:
        for start, end in analysis.layout.metadata:
            assert 0 <= start <= end <= size
        for start, end in analysis.layout.extents:
            assert 0 <= start < end <= size


@pytest.mark.parametrize("kind", ["ext4", "ext2", "squashfs", "iso9660", "zip"])
def test_truncated_images_give_no_hint_and_never_read_past_their_end(
    real_images: dict[str, bytes], kind: str
) -> None:
    data = real_images[kind]
    whole = analyse_bytes(data)
    assert whole.layout is not None, whole.refusal
    cuts = [0, 1, 100, 1100, 4096, 40_000, HEAD - 1, HEAD + 1, len(data) // 3, len(data) // 2]
    cuts += [len(data) - 4096, len(data) - 1]
    for cut in cuts:
        analysis = analyse_bytes(data[:cut])
        assert_no_hint_or_sane(analysis, cut)
        if kind in ("ext4", "ext2", "squashfs") and 1100 < cut <= len(data) - 4096:
            # The superblock says how big the filesystem is: a shorter image is refused
            # (mksquashfs pads its image to 4 KiB: a cut in the padding loses nothing).
            assert analysis.layout is None, (cut, analysis.layout)


def test_ext_extent_tree_that_points_at_itself_is_followed_once(
    real_images: dict[str, bytes],
) -> None:
    """A directory whose extent index names a block whose index names that block again."""
    data = bytearray(real_images["ext4"])
    block_size = 1024 << struct.unpack_from("<I", data, 1024 + 0x18)[0]
    root_inode = _inode_offset(bytes(data), 2)
    loop_block = 40  # a block of the image used as a tree node pointing at itself
    node = struct.pack("<HHHHI", 0xF30A, 1, 4, 1, 0) + struct.pack("<IIH2x", 0, loop_block, 0)
    data[loop_block * block_size : loop_block * block_size + len(node)] = node
    data[root_inode + 0x28 : root_inode + 0x28 + len(node)] = node
    struct.pack_into("<I", data, root_inode + 0x20, 0x80000)  # EXTENTS_FL
    analysis = analyse_bytes(bytes(data))
    assert_no_hint_or_sane(analysis, len(data))
    assert analysis.reads.count((loop_block * block_size, (loop_block + 1) * block_size)) <= 1


def _inode_offset(data: bytes, ino: int) -> int:
    """Where inode *ino* lies (group 0), from the superblock and the first descriptor."""
    block_size = 1024 << struct.unpack_from("<I", data, 1024 + 0x18)[0]
    inode_size = struct.unpack_from("<H", data, 1024 + 0x58)[0]
    first_data = struct.unpack_from("<I", data, 1024 + 0x14)[0]
    table = struct.unpack_from("<I", data, (first_data + 1) * block_size + 8)[0]
    return table * block_size + (ino - 1) * inode_size


@pytest.mark.parametrize(
    ("field", "fmt", "value"),
    [
        (0x20, "<I", 0),  # blocks per group 0
        (0x20, "<I", 1 << 31),  # more blocks per group than a bitmap has bits
        (0x04, "<I", 0xFFFFFFFF),  # billions of blocks: larger than the image
        (0x18, "<I", 30),  # a block size of 1 << 40
        (0x58, "<H", 3),  # an inode size that is no power of two
        (0x28, "<I", 1 << 30),  # a billion inodes per group
    ],
)
def test_ext_superblock_with_impossible_values_gives_no_hint(
    real_images: dict[str, bytes], field: int, fmt: str, value: int
) -> None:
    data = bytearray(real_images["ext4"])
    struct.pack_into(fmt, data, 1024 + field, value)
    analysis = analyse_bytes(bytes(data))
    assert analysis.layout is None and analysis.refusal
    assert sum(end - start for start, end in analysis.reads) < 2 * HEAD


def test_ext_inode_table_past_the_end_gives_no_hint(real_images: dict[str, bytes]) -> None:
    data = bytearray(real_images["ext4"])
    block_size = 1024 << struct.unpack_from("<I", data, 1024 + 0x18)[0]
    first_data = struct.unpack_from("<I", data, 1024 + 0x14)[0]
    struct.pack_into("<I", data, (first_data + 1) * block_size + 8, 0x7FFFFFFF)
    analysis = analyse_bytes(bytes(data))
    assert analysis.layout is None and "outside" in (analysis.refusal or "")


def test_squashfs_hostile_tables(real_images: dict[str, bytes]) -> None:
    original = real_images["squashfs"]
    cases = {
        "tables out of order": (72, "<Q", 100),  # directory table before the inode table
        "bytes used past the end": (40, "<Q", 1 << 40),
        "fragment count in billions": (16, "<I", 0xFFFFFFFF),
        "fragment index outside": (80, "<Q", len(original) - 8),
        "inode count in billions": (4, "<I", 0xFFFFFFFF),
    }
    for name, (offset, fmt, value) in cases.items():
        data = bytearray(original)
        struct.pack_into(fmt, data, offset, value)
        analysis = analyse_bytes(bytes(data))
        assert_no_hint_or_sane(analysis, len(data))
        if name in ("tables out of order", "bytes used past the end"):
            assert analysis.layout is None, name


def test_iso9660_hostile_descriptors_and_records(real_images: dict[str, bytes]) -> None:
    original = real_images["iso9660"]
    pvd = 16 * 2048
    root = pvd + 156
    cases = {
        "path table of 2 GiB": (pvd + 132, "<I", 1 << 31),
        "path table past the end": (pvd + 140, "<I", 0x7FFFFFFF),
        "root directory past the end": (root + 2, "<I", 0x7FFFFFFF),
        "root directory of 4 GiB": (root + 10, "<I", 0xFFFFFFFF),
        "block size 0": (pvd + 128, "<H", 0),
    }
    for name, (offset, fmt, value) in cases.items():
        data = bytearray(original)
        struct.pack_into(fmt, data, offset, value)
        analysis = analyse_bytes(bytes(data))
        assert_no_hint_or_sane(analysis, len(data))
        if not name.startswith("root"):  # the parser walks the path table, not the root
            assert analysis.layout is None, name


def test_zip_hostile_end_records(real_images: dict[str, bytes]) -> None:
    original = real_images["zip"]
    eocd = original.rfind(b"PK\x05\x06")
    cases = {
        "directory larger than the file": (eocd + 12, "<I", 0x7FFFFFFE),
        "ZIP64 marker without a locator": (eocd + 16, "<I", 0xFFFFFFFF),
        "comment longer than what follows": (eocd + 20, "<H", 500),
    }
    for name, (offset, fmt, value) in cases.items():
        data = bytearray(original)
        struct.pack_into(fmt, data, offset, value)
        analysis = analyse_bytes(bytes(data))
        assert analysis.layout is None, name


def test_mbr_chain_of_extended_partitions_in_a_loop_ends() -> None:
    """An extended boot record whose link points back at itself: followed once."""
    size = 8 * MiB
    data = bytearray(size)

    def entry(at: int, kind: int, first: int, count: int) -> None:
        struct.pack_into("<B3xB3xII", data, at, 0, kind, first, count)

    data[510:512] = b"\x55\xaa"
    entry(446, 0x05, 2048, 8192)  # an extended partition at sector 2048
    ebr = 2048 * 512
    data[ebr + 510 : ebr + 512] = b"\x55\xaa"
    entry(ebr + 446, 0x83, 64, 1024)  # a logical partition (empty)
    entry(ebr + 462, 0x05, 0, 8192)  # the next record: this one again
    analysis = analyse_bytes(bytes(data))
    assert analysis.layout is None
    assert analysis.reads.count((ebr, ebr + 512)) == 1


def test_a_budget_bounds_what_a_parse_reads(root_required: None, workdir: Path) -> None:
    """With a budget below its metadata, a parse stops at the budget."""
    require_loop_mount("ext4")
    shape = TreeShape(files=2000, min_size=1, max_size=4 * KiB, top_dirs=30, sub_dirs=10)
    path = workdir / "many-inodes.img"
    make_ext4(path, 256 * MiB, shape)
    full = analyse_path(path)
    assert full.layout is not None
    needed = sum(e - s for s, e in full.metadata())
    small = analyse_path(path, budget=needed // 3)
    assert small.budget is not None and small.budget.used_bytes <= needed // 3
    if small.layout is not None:
        assert sum(e - s for s, e in small.metadata()) <= needed // 3 + HEAD
        assert small.layout.notes


def test_random_bytes_and_empty_files_are_no_format() -> None:
    rng = random.Random(4)
    for size in (0, 1, 511, 4096, 70_000, 3 * MiB):
        analysis = analyse_bytes(rng.randbytes(size))
        assert analysis.layout is None


def test_a_read_from_the_page_before_a_files_start_belongs_to_that_file() -> None:
    """A file that starts mid-page is read from before its start; a read mostly before it
    is the end of the file before, and a read from the metadata stays metadata."""
    rng = random.Random(21)
    for _ in range(500):
        first = rng.randrange(1, PAGE)  # right after a superblock, inside its page
        second = rng.randrange(first + 2 * PAGE, 1 << 30)
        end = second + rng.randrange(2 * PAGE, 1 << 24)
        layout = Layout("test", [(0, PAGE)], Extents([(first, second), (second, end)]))
        long_read = rng.randrange(2 * PAGE, 256 * KiB)
        assert layout.extent_of_read(0, long_read) is None  # the superblock's page: metadata
        before = second - rng.randrange(1, PAGE)  # a block (sector, page) before its start
        assert layout.extent_of_read(before, before + long_read) == (second, end)
        assert layout.extent_of_read(before, second) == (first, second)  # the last block before
        assert layout.extent_of_read(before, before + PAGE) == (first, second)  # a probe's page
        assert layout.extent_of_read(second, second + long_read) == (second, end)
        far = second - PAGE - rng.randrange(0, PAGE)  # more than a page before: the file before
        assert layout.extent_of_read(far, far + long_read) == (first, second)
