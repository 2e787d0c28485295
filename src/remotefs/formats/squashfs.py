"""squashfs 4.0: every table the kernel reads lies at the end, after the files' data.

mksquashfs writes the data blocks and fragments first, then the inode table, the directory
table, the fragment, export and id tables and the xattr table, one after another up to
``bytes_used``; the superblock says where each starts. Mounting and walking the tree reads
the id and fragment indexes, then inodes and directory entries, so the metadata hint is
that one region, ``[inode_table_start, bytes_used)``, fetched in parallel parts.

The files' data extents come from their inodes: each regular file's blocks lie one after
another from its ``blocks_start``, and the tails of small files sit in shared fragment
blocks. Reading them means decompressing the inode table: gzip (mksquashfs's default) and
xz/lzma are in Python's standard library; for lzo, lz4 and zstd images only the metadata
region is hinted, and the files' data is unknown.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Callable

import trio

from .layout import Extents, Layout, Range
from .reader import ImageReader, NoHint

MAGIC = b"hsqs"
SUPERBLOCK = struct.Struct("<4sIIIIHHHHHHQQQQQQQQ")
METADATA_BLOCK = 8192
NONE = 0xFFFFFFFFFFFFFFFF
NO_FRAGMENT = 0xFFFFFFFF
FLAG_UNCOMPRESSED_INODES = 0x1
FLAG_UNCOMPRESSED_FRAGMENTS = 0x8
BLOCK_UNCOMPRESSED = 1 << 24
#: Data extents kept at most (files and fragment blocks).
MAX_EXTENTS = 1 << 20

GZIP, LZMA, LZO, XZ, LZ4, ZSTD = 1, 2, 3, 4, 5, 6
COMPRESSORS = {GZIP: "gzip", LZMA: "lzma", LZO: "lzo", XZ: "xz", LZ4: "lz4", ZSTD: "zstd"}


def _zlib(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, METADATA_BLOCK + 1)
    if len(out) > METADATA_BLOCK:
        raise NoHint("a metadata block inflates past 8 KiB")
    return out


def _lzma(kind: int) -> Callable[[bytes], bytes]:
    def decompress(data: bytes) -> bytes:
        form = lzma.FORMAT_XZ if kind == XZ else lzma.FORMAT_ALONE
        out = lzma.LZMADecompressor(format=form).decompress(data, max_length=METADATA_BLOCK + 1)
        if len(out) > METADATA_BLOCK:
            raise NoHint("a metadata block inflates past 8 KiB")
        return out

    return decompress


class _Super:
    def __init__(self, raw: bytes, image_size: int) -> None:
        fields = SUPERBLOCK.unpack_from(raw, 0)
        (magic, self.inode_count, _, self.block_size, self.frag_count, self.compressor) = fields[:6]
        (block_log, self.flags, _, major, _) = fields[6:11]
        (_, self.bytes_used, self.id_table, _, self.inode_table, self.directory_table) = fields[
            11:17
        ]
        self.fragment_table, _ = fields[17:19]
        if magic != MAGIC:
            raise NoHint("no squashfs magic")
        if major != 4:
            raise NoHint(f"squashfs {major}.x")
        if not 12 <= block_log <= 20 or self.block_size != 1 << block_log:
            raise NoHint(f"block size {self.block_size}")
        if self.bytes_used > image_size:
            raise NoHint("the filesystem is larger than the image")
        if not 96 <= self.inode_table < self.directory_table <= self.bytes_used:
            raise NoHint("tables out of order")
        if self.id_table >= self.bytes_used:
            raise NoHint("the id table lies past the end")


class _MetadataStream:
    """The concatenated contents of consecutive metadata blocks (the inode table)."""

    def __init__(self, raw: bytes, decompress: Callable[[bytes], bytes] | None) -> None:
        self.data = bytearray()
        at = 0
        while at + 2 <= len(raw):
            (header,) = struct.unpack_from("<H", raw, at)
            length, stored = header & 0x7FFF, bool(header & 0x8000)
            block = raw[at + 2 : at + 2 + length]
            if not length or len(block) != length:
                raise NoHint("a damaged metadata block")
            if stored:
                self.data += block
            elif decompress is None:
                raise NoHint("compressed metadata")
            else:
                try:
                    self.data += decompress(block)
                except (zlib.error, lzma.LZMAError) as err:
                    raise NoHint(f"metadata does not decompress: {err}") from None
            at += 2 + length


# Sizes of the fixed part after the 16-byte common header, per inode type.
_FIXED = {1: 16, 3: 8, 4: 8, 5: 8, 6: 4, 7: 4, 8: 24, 10: 12, 11: 12, 12: 12, 13: 8, 14: 8}


def _file_extents(table: bytes, sb: _Super) -> tuple[list[Range], set[int]]:
    """The data extent of every regular file, and the fragments they use."""
    extents: list[Range] = []
    fragments: set[int] = set()
    at, count = 0, 0
    while at + 16 <= len(table) and count < sb.inode_count:
        (kind,) = struct.unpack_from("<H", table, at)
        at += 16
        count += 1
        if kind in (2, 9):
            if kind == 2:
                start, fragment, _, size = struct.unpack_from("<IIII", table, at)
                at += 16
            else:
                start, size, _, _, fragment, _, _ = struct.unpack_from("<QQQIIII", table, at)
                at += 40
            whole, tail = divmod(size, sb.block_size)
            blocks = whole + (1 if tail and fragment == NO_FRAGMENT else 0)
            if at + 4 * blocks > len(table):
                raise NoHint("an inode's block list runs past the table")
            stored = sum(
                entry & (BLOCK_UNCOMPRESSED - 1)
                for (entry,) in struct.iter_unpack("<I", table[at : at + 4 * blocks])
            )
            at += 4 * blocks
            if stored and start + stored <= sb.inode_table and len(extents) < MAX_EXTENTS:
                extents.append((start, start + stored))
            if fragment != NO_FRAGMENT:
                fragments.add(fragment)
        elif kind in _FIXED:
            fixed = _FIXED[kind]
            if kind in (3, 10):  # symlinks: the target follows
                (_, target) = struct.unpack_from("<II", table, at)
                fixed += target
            elif kind == 8:  # extended directory: its index entries follow
                (index_count,) = struct.unpack_from("<H", table, at + 16)
                extra = at + fixed
                for _ in range(index_count):
                    (_, _, name_size) = struct.unpack_from("<III", table, extra)
                    extra += 12 + name_size + 1
                fixed = extra - at
            at += fixed
        else:
            raise NoHint(f"inode type {kind}")
    return extents, fragments


async def _fragment_extents(
    reader: ImageReader, sb: _Super, used: set[int], decompress: Callable[[bytes], bytes] | None
) -> list[Range]:
    """The fragment blocks in *used*, from the fragment table (already fetched with the rest)."""
    if sb.fragment_table == NONE or not sb.frag_count or not used:
        return []
    entries_per_block = METADATA_BLOCK // 16
    index_count = -(-sb.frag_count // entries_per_block)
    index = await reader.read(sb.fragment_table, 8 * index_count)
    extents = []
    for number, (block_at,) in enumerate(struct.iter_unpack("<Q", index)):
        if not sb.inode_table <= block_at < sb.bytes_used:
            raise NoHint("a fragment index entry points outside the tables")
        header = await reader.read(block_at, 2)
        length = struct.unpack("<H", header)[0] & 0x7FFF
        stream = _MetadataStream(await reader.read(block_at, 2 + length), decompress)
        for slot, (start, size, _) in enumerate(struct.iter_unpack("<QII", stream.data)):
            if number * entries_per_block + slot in used:
                stored = size & (BLOCK_UNCOMPRESSED - 1)
                if stored and start + stored <= sb.inode_table:
                    extents.append((start, start + stored))
    return extents


async def parse(reader: ImageReader) -> Layout:
    """The layout of the squashfs image *reader* holds; `NoHint` if it is not one."""
    sb = _Super(await reader.read(0, SUPERBLOCK.size), reader.size)
    region = (sb.inode_table, sb.bytes_used)
    if region[1] - region[0] > reader.budget.room():
        raise NoHint("the tables are larger than the budget")
    name = COMPRESSORS.get(sb.compressor, f"compressor {sb.compressor}")
    layout = Layout(f"squashfs ({name})", [(0, min(4096, reader.size)), region])
    decompress: Callable[[bytes], bytes] | None
    if sb.compressor == GZIP:
        decompress = _zlib
    elif sb.compressor in (XZ, LZMA):
        decompress = _lzma(sb.compressor)
    elif sb.flags & FLAG_UNCOMPRESSED_INODES:
        decompress = None
    else:
        layout.notes.append(f"{name} metadata: files' data extents unknown")
        return layout
    # One round trip for the whole region: the hint fetches it anyway, and the parser needs
    # the inode table and the fragment table out of it.
    (tables,) = await reader.read_many([region])
    inode_table = tables[: sb.directory_table - sb.inode_table]

    def inodes() -> tuple[list[Range], set[int]]:
        return _file_extents(bytes(_MetadataStream(inode_table, decompress).data), sb)

    # Inflating and walking a large inode table takes a while: not on the event loop.
    extents, fragments = await trio.to_thread.run_sync(inodes)
    if sb.flags & FLAG_UNCOMPRESSED_FRAGMENTS or decompress is not None:
        extents += await _fragment_extents(reader, sb, fragments, decompress)
    layout.extents = Extents(extents)
    return layout


def sniff(head: bytes) -> bool:
    """True when *head* starts with a squashfs superblock."""
    return head[:4] == MAGIC
