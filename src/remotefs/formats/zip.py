"""zip: the end of central directory record says exactly where the central directory is.

Every zip reader (``unzip -l``, Python's zipfile, ``bsdtar``) reads the end of central
directory record (EOCD, in the last 64 KiB + 22 bytes: a record and a comment of at most
65,535 bytes), then the ZIP64 records it points at when counts or offsets overflow 32 bits,
then the whole central directory. The open hint fetches the tail; this parser reads the EOCD
from it and fetches the central directory, exactly, in the next round trip. It replaces the
tail guess (1/128 of the file) for archives whose directory is larger than that guess.

An archive with bytes before it (a self-extracting stub) has its offsets shifted: the
central directory is found where the EOCD says it ends, as unzip does.
"""

from __future__ import annotations

import struct

from .layout import Layout, Range
from .reader import ImageReader, NoHint

EOCD = b"PK\x05\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP64_EOCD = b"PK\x06\x06"
EOCD_SIZE = 22
#: The EOCD record and the longest comment it can have.
TAIL = EOCD_SIZE + 0xFFFF
LOCATOR_SIZE = 20
ZIP64_EOCD_SIZE = 56
#: The largest central directory fetched. Not the budget of other formats: whatever reads a
#: zip (a listing, one member's extraction) reads all of its central directory first.
MAX_DIRECTORY = 512 * 1024 * 1024


def _find_eocd(tail: bytes) -> int | None:
    """Where the EOCD record starts in *tail* (the last search), whose comment fits."""
    at = tail.rfind(EOCD)
    while at >= 0:
        if at + EOCD_SIZE <= len(tail):
            (comment,) = struct.unpack_from("<H", tail, at + 20)
            if at + EOCD_SIZE + comment == len(tail):
                return at
        at = tail.rfind(EOCD, 0, at)
    return None


async def parse(reader: ImageReader, tail: bytes | None = None) -> Layout:
    """The central directory of the zip *reader* holds; `NoHint` if it is not one.

    *tail*, when given, is the file's last bytes (up to `TAIL`), already read.
    """
    size = reader.size
    if tail is None:
        tail = await reader.read(size - min(TAIL, size), min(TAIL, size))
    found = _find_eocd(tail)
    if found is None:
        raise NoHint("no end of central directory record")
    eocd_at = size - len(tail) + found
    disk, cd_disk, _, entries, cd_size, cd_offset = struct.unpack_from("<HHHHII", tail, found + 4)
    if disk != cd_disk:
        raise NoHint("a multi-disk archive")
    metadata: list[Range] = [(eocd_at, size)]
    cd_end = eocd_at
    if 0xFFFF in (entries, disk) or 0xFFFFFFFF in (cd_size, cd_offset):
        locator_at = eocd_at - LOCATOR_SIZE
        if locator_at < 0:
            raise NoHint("ZIP64 values without a ZIP64 locator")
        locator = await reader.read(locator_at, LOCATOR_SIZE)
        if locator[:4] != ZIP64_LOCATOR:
            raise NoHint("ZIP64 values without a ZIP64 locator")
        (record_at,) = struct.unpack_from("<Q", locator, 8)
        record_at = max(0, min(record_at, locator_at - ZIP64_EOCD_SIZE))
        # The record lies right before the locator unless it has an extensible data sector;
        # its recorded offset is wrong in an archive with a stub in front.
        record = await reader.read(locator_at - ZIP64_EOCD_SIZE, ZIP64_EOCD_SIZE)
        if record[:4] != ZIP64_EOCD:
            record = await reader.read(record_at, ZIP64_EOCD_SIZE)
            if record[:4] != ZIP64_EOCD:
                raise NoHint("no ZIP64 end of central directory record")
            cd_end = record_at
        else:
            cd_end = locator_at - ZIP64_EOCD_SIZE
        (cd_size,) = struct.unpack_from("<Q", record, 40)
        metadata.append((cd_end, eocd_at))
    if cd_size > cd_end:
        raise NoHint("the central directory is larger than what precedes it")
    # Where the directory ends, not its recorded offset: with bytes prepended (a stub) the
    # two disagree, and unzip looks where it ends too.
    start = cd_end - cd_size
    if cd_size > MAX_DIRECTORY:
        raise NoHint("a central directory of more than 512 MiB")
    metadata.insert(0, (start, cd_end))
    return Layout("zip", metadata)


def sniff_tail(tail: bytes) -> bool:
    """True when *tail* (a file's last bytes) ends with an EOCD record."""
    return _find_eocd(tail) is not None
