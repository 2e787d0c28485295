"""Format-aware open hints: what an image's own metadata says a reader of it will need.

A file opened through the mount is *sniffed*: its head (and, for zip, its tail) shows
whether it is a format remotefs knows. If so, the format's parser reads exactly the
metadata a reader of that format needs, through the cache, and returns a `Layout`: the
metadata ranges to fetch at once, and where the files inside lie. One small module per
format:

========================  ======================================================
`ext`                     ext2/3/4: superblock, group descriptors, used inode
                          tables, directory blocks, journal superblock
`squashfs`                the tables region at the end; file extents (gzip, xz)
`iso9660`                 volume descriptors, path table, directory records
`zip`                     EOCD, ZIP64 records, the exact central directory
`partitions`              MBR/GPT: each partition analysed as an image
========================  ======================================================

Every parser reads through an `ImageReader` with a `Budget` and raises `NoHint` on anything
it does not expect; `analyse` turns that into "no hint". `remotefs.formats.hints` runs it
on open, off the read path, so that no parser error can fail an open or a read.
"""

from __future__ import annotations

import lzma
import struct
import zlib

from . import ext, iso9660, partitions, squashfs, zip
from .layout import Layout
from .reader import Budget, ImageReader, NoHint

__all__ = ["HEAD", "Budget", "ImageReader", "Layout", "NoHint", "analyse"]

#: Bytes of a file's head the detector looks at (ISO 9660 descriptors start at 32 KiB).
HEAD = 64 * 1024


#: What malformed bytes raise inside a parser (a record cut short, a count that does not
#: fit, a stream that does not decompress): the image is not what it claims.
MALFORMED = (struct.error, IndexError, ValueError, OverflowError, zlib.error, lzma.LZMAError)


async def analyse(
    reader: ImageReader, *, partitioned: bool = True, tail: bool = True
) -> Layout | None:
    """The layout of the image *reader* holds, or None for a format without a parser.

    Raises `NoHint` for a damaged, hostile or over-budget image of a known format. With
    *partitioned*, a partition table is followed (one level: partitions are not nested).
    With *tail*, a file whose head shows no known format is checked for a zip's end record.
    """
    try:
        return await _analyse(reader, partitioned, tail)
    except MALFORMED as err:
        raise NoHint(f"malformed: {type(err).__name__}: {err}") from None


async def _analyse(reader: ImageReader, partitioned: bool, tail: bool) -> Layout | None:
    if not reader.size:
        return None
    head = await reader.read(0, min(HEAD, reader.size))
    if ext.sniff(head):
        return await ext.parse(reader)
    if squashfs.sniff(head):
        return await squashfs.parse(reader)
    if iso9660.sniff(head):
        return await iso9660.parse(reader)
    if partitioned and partitions.sniff(head):

        async def inner(part: ImageReader) -> Layout | None:
            return await analyse(part, partitioned=False, tail=False)

        try:
            return await partitions.parse(reader, head, inner)
        except NoHint:
            pass  # bytes that only looked like a partition table: maybe a zip
    if not tail:
        return None  # a partition's tail is not a zip's; a caller that fetches no tail
    span = min(zip.TAIL, reader.size)
    end = await reader.read(reader.size - span, span)
    if zip.sniff_tail(end):
        return await zip.parse(reader, end)
    return None
