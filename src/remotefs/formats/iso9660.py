"""ISO 9660 (with Rock Ridge or Joliet): volume descriptors, path table, directory records.

A reader of an ISO image (the kernel's isofs, ``isoinfo``, ``xorriso``, ``7z``) reads the
volume descriptors at 32 KiB, then directory records. The path table lists every directory
and where its records start, so all directories can be fetched in one round: a directory's
own size is in its first record (``.``), and a directory larger than what was guessed gets
the rest in a second round. Writers put the directories one after another, so the guess is
"up to the next directory", bounded.

Which tree: the primary one when it carries Rock Ridge (what Linux and ``isoinfo -R`` read);
otherwise Joliet if there is one (what Windows tools and ``7z`` read), else the primary.
Files' extents (a file may have several) become the layout's data extents; Rock Ridge
continuation areas are metadata.
"""

from __future__ import annotations

import struct

from .layout import Extents, Layout, Range
from .reader import ImageReader, NoHint

SECTOR = 2048
DESCRIPTORS_AT = 16 * SECTOR
#: Volume descriptors read at most (they fill the rest of the head: 32 to 64 KiB).
MAX_DESCRIPTORS = 16
#: Directories at most; more is not a CD or DVD anyone made.
MAX_DIRECTORIES = 1 << 16
#: How far to guess a directory's size from where the next one starts, in sectors.
MAX_GUESS = 16
FLAG_DIRECTORY = 0x2
JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")


class _Volume:
    """A primary or Joliet volume descriptor: block size, path table, root record."""

    def __init__(self, raw: bytes, image_size: int) -> None:
        (self.space,) = struct.unpack_from("<I", raw, 80)
        (self.block_size,) = struct.unpack_from("<H", raw, 128)
        (self.path_table_size,) = struct.unpack_from("<I", raw, 132)
        (self.path_table,) = struct.unpack_from("<I", raw, 140)
        root = raw[156 : 156 + 34]
        (self.root_extent,) = struct.unpack_from("<I", root, 2)
        (self.root_size,) = struct.unpack_from("<I", root, 10)
        if self.block_size not in (512, 1024, 2048):
            raise NoHint(f"logical block size {self.block_size}")
        if self.path_table_size > 16 * 1024 * 1024:
            raise NoHint("a path table of more than 16 MiB")
        end = self.path_table * self.block_size + self.path_table_size
        if not self.path_table or end > image_size:
            raise NoHint("the path table lies outside the image")

    def at(self, block: int) -> int:
        return block * self.block_size


def _path_table(raw: bytes) -> list[int]:
    """The extent (first block) of every directory, in path table order."""
    extents: list[int] = []
    at = 0
    while at + 8 <= len(raw) and len(extents) < MAX_DIRECTORIES:
        length = raw[at]
        if length == 0:
            break
        (extent,) = struct.unpack_from("<I", raw, at + 2)
        extents.append(extent)
        at += 8 + length + (length & 1)
    return extents


class _Records:
    """What the directory records say: file extents, directory sizes, continuation areas."""

    def __init__(self, volume: _Volume, image_size: int) -> None:
        self.volume = volume
        self.image_size = image_size
        self.files: list[Range] = []
        self.continuations: list[Range] = []
        self.rock_ridge = False

    def directory(self, raw: bytes) -> int:
        """Parse one directory's records; return its size from its ``.`` record."""
        size = 0
        sector = self.volume.block_size
        at = 0
        first = True
        while at < len(raw):
            length = raw[at]
            if length == 0:
                at = (at // sector + 1) * sector  # records never cross a sector: skip to the next
                continue
            if length < 34 or at + length > len(raw):
                break
            record = raw[at : at + length]
            (extent,) = struct.unpack_from("<I", record, 2)
            (data_length,) = struct.unpack_from("<I", record, 10)
            flags, name_length = record[25], record[32]
            if first:
                size = data_length
                self._system_use(record, name_length, root_dot=True)
                first = False
            else:
                self._system_use(record, name_length, root_dot=False)
                if not flags & FLAG_DIRECTORY and data_length:
                    start = self.volume.at(extent)
                    if start + data_length <= self.image_size:
                        self.files.append((start, start + data_length))
            at += length
        return size

    def _system_use(self, record: bytes, name_length: int, *, root_dot: bool) -> None:
        """Rock Ridge: an ``SP`` entry in ``.`` says so; ``CE`` entries continue elsewhere."""
        at = 33 + name_length + (0 if name_length & 1 else 1)
        while at + 4 <= len(record):
            signature, length = record[at : at + 2], record[at + 2]
            if length < 4 or at + length > len(record):
                break
            if (signature == b"SP" and root_dot) or signature in (b"RR", b"PX"):
                self.rock_ridge = True
            elif signature == b"CE" and length >= 28:
                block, offset, size = struct.unpack_from("<I4xI4xI", record, at + 4)
                start = self.volume.at(block) + offset
                if size and start + size <= self.image_size:
                    self.continuations.append((start, start + size))
            at += length


async def _tree(reader: ImageReader, volume: _Volume) -> tuple[list[Range], _Records]:
    """Fetch and parse every directory of *volume*'s tree; return its metadata ranges."""
    metadata: list[Range] = []
    table_start = volume.at(volume.path_table)
    metadata.append((table_start, table_start + volume.path_table_size))
    (table,) = await reader.read_many([metadata[0]])
    blocks = _path_table(table)
    if not blocks:
        raise NoHint("an empty path table")
    records = _Records(volume, reader.size)
    ordered = sorted(set(blocks))
    guesses: list[Range] = []
    for index, block in enumerate(ordered):
        start = volume.at(block)
        following = ordered[index + 1] if index + 1 < len(ordered) else block + 1
        sectors = max(1, min(following - block, MAX_GUESS))
        end = min(start + sectors * volume.block_size, reader.size)
        if start >= end:
            raise NoHint("a directory lies outside the image")
        guesses.append((start, end))
    first = await reader.read_many(guesses)
    missing: list[tuple[int, Range]] = []
    for index, ((start, end), raw) in enumerate(zip(guesses, first, strict=True)):
        size = records.directory(raw)
        if size > end - start:
            if start + size > reader.size:
                raise NoHint("a directory runs past the end of the image")
            missing.append((index, (end, start + size)))
        metadata.append((start, start + max(size, volume.block_size)))
    if missing:
        rest = await reader.read_many([r for _, r in missing])
        for (index, _), raw in zip(missing, rest, strict=True):
            records.directory(first[index] + raw)
    return metadata, records


async def parse(reader: ImageReader) -> Layout:
    """The layout of the ISO 9660 image *reader* holds; `NoHint` if it is not one."""
    count = min(MAX_DESCRIPTORS, (reader.size - DESCRIPTORS_AT) // SECTOR)
    if count < 1:
        raise NoHint("too small for an ISO 9660 image")
    descriptors = await reader.read(DESCRIPTORS_AT, count * SECTOR)
    primary = joliet = None
    for index in range(count):
        raw = descriptors[index * SECTOR : (index + 1) * SECTOR]
        if raw[1:6] != b"CD001":
            raise NoHint("a volume descriptor without CD001")
        if raw[0] == 255:
            break
        if raw[0] == 1 and primary is None:
            primary = _Volume(raw, reader.size)
        elif raw[0] == 2 and joliet is None and raw[88:91] in JOLIET_ESCAPES:
            joliet = _Volume(raw, reader.size)
    if primary is None:
        raise NoHint("no primary volume descriptor")
    head: Range = (0, DESCRIPTORS_AT + count * SECTOR)
    metadata, records = await _tree(reader, primary)
    kind = "iso9660"
    if records.rock_ridge:
        kind += " (Rock Ridge)"
    elif joliet is not None:
        metadata, records = await _tree(reader, joliet)
        kind += " (Joliet)"
    return Layout(kind, [head, *metadata, *records.continuations], Extents(records.files))


def sniff(head: bytes) -> bool:
    """True when *head* holds an ISO 9660 volume descriptor at 32 KiB."""
    return head[DESCRIPTORS_AT + 1 : DESCRIPTORS_AT + 6] == b"CD001"
