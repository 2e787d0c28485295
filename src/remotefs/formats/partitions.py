"""Partitioned disk images (MBR, GPT): each partition is an image of its own, at an offset.

A whole-disk image (``losetup -P``, ``mount -o loop,offset=...``) keeps its filesystems in
partitions. The table is read from the head (MBR at 510, GPT header at 512 with its entries
right after it), then the partitions are parsed in parallel by the detector, each like a
file of its own, and their layouts shifted to where the partition starts. Extended
(logical) MBR partitions form a chain of boot records that a damaged image can make
circular: it is followed at most `MAX_PARTITIONS` links, never twice through one record.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import trio

from .layout import Layout, Range, combine
from .reader import ImageReader, NoHint

SECTOR = 512
MAX_PARTITIONS = 128
EXTENDED = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE
GPT_SIGNATURE = b"EFI PART"

#: Parses the image a reader holds (the detector, for a partition's contents).
Analyse = Callable[[ImageReader], Awaitable[Layout | None]]


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """``(type, first LBA, sectors)`` of the four entries of a boot record that look real."""
    if sector[510:512] != b"\x55\xaa":
        return []
    entries = []
    for index in range(4):
        at = 446 + 16 * index
        status, kind = sector[at], sector[at + 4]
        first, count = struct.unpack_from("<II", sector, at + 8)
        if status not in (0x00, 0x80):
            return []  # not a partition table (a FAT boot sector has code here)
        if kind and count:
            entries.append((kind, first, count))
    return entries


def _gpt(head: bytes, image_size: int, sector: int) -> list[Range] | None:
    """Partitions of a GPT whose header is at LBA 1 of *sector* bytes, if *head* has one."""
    header = head[sector : sector + 92]
    if header[:8] != GPT_SIGNATURE:
        return None
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if entry_size < 128 or entry_size > 4096 or count > 1024:
        raise NoHint("an impossible GPT header")
    start = entries_lba * sector
    if start + count * entry_size > len(head):
        raise NoHint("GPT entries beyond the head")
    parts = []
    for index in range(count):
        entry = head[start + index * entry_size : start + (index + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if first <= last and (last + 1) * sector <= image_size:
            parts.append((first * sector, (last + 1) * sector))
    return parts


async def _mbr(reader: ImageReader, head: bytes) -> list[Range]:
    parts: list[Range] = []
    chain: list[tuple[int, int]] = []  # extended partitions: (its start, the record's LBA)
    for kind, first, count in _mbr_entries(head[:SECTOR]):
        if kind == GPT_PROTECTIVE:
            continue
        if kind in EXTENDED:
            chain.append((first, first))
        else:
            parts.append((first * SECTOR, (first + count) * SECTOR))
    seen: set[int] = set()
    while chain and len(seen) < MAX_PARTITIONS:
        extended, lba = chain.pop()
        if lba in seen:
            continue  # a circular chain
        seen.add(lba)
        record = await reader.read(lba * SECTOR, SECTOR)
        for kind, first, count in _mbr_entries(record):
            if kind in EXTENDED:
                chain.append((extended, extended + first))
            else:
                parts.append(((lba + first) * SECTOR, (lba + first + count) * SECTOR))
    return parts


async def parse(reader: ImageReader, head: bytes, analyse: Analyse) -> Layout:
    """The layouts of the partitions of the disk image *reader* holds, as one."""
    parts = _gpt(head, reader.size, SECTOR)
    kind = "gpt"
    if parts is None:
        parts = _gpt(head, reader.size, 4096)
    if parts is None:
        kind = "mbr"
        parts = await _mbr(reader, head)
    parts = [(start, end) for start, end in parts if 0 < start < end <= reader.size]
    if not parts:
        raise NoHint("no partitions")
    layouts: list[Layout] = []

    async def one(start: int, end: int) -> None:
        try:
            found = await analyse(reader.sub(start, end - start))
        except NoHint:
            return
        if found is not None:
            layouts.append(found.shifted(start))

    # In parallel: each partition's parse takes a few round trips of its own.
    async with trio.open_nursery() as nursery:
        for start, end in parts[:MAX_PARTITIONS]:
            nursery.start_soon(one, start, end)
    layouts.sort(key=lambda layout: layout.metadata[0] if layout.metadata else (0, 0))
    if not layouts:
        raise NoHint("no partition holds a known filesystem")
    table_end = max(SECTOR * 2, min(len(head), 34 * SECTOR))
    combined = combine(kind, layouts)
    combined.metadata.insert(0, (0, table_end))
    return combined


def sniff(head: bytes) -> bool:
    """True when *head* starts with an MBR (protective or not) or a GPT header."""
    if head[SECTOR : SECTOR + 8] == GPT_SIGNATURE or head[4096 : 4096 + 8] == GPT_SIGNATURE:
        return True
    return bool(_mbr_entries(head[:SECTOR]))
