"""ext2, ext3 and ext4: the metadata the kernel reads to mount and walk the filesystem.

What the kernel reads, and so what this parser fetches (Documentation/filesystems/ext4):

- the superblock and the group descriptors (at the start; with ``meta_bg``, in the first
  blocks of each meta group);
- the *used* part of each group's inode table: with group descriptor checksums
  (``metadata_csum`` or ``uninit_bg``), ``bg_itable_unused`` says how many inodes at the end
  of a table were never used, and the kernel's inode readahead stops there too. Without
  them (old ext2/3), groups whose inodes are all free are skipped and the rest are read
  whole (which is what the kernel's readahead does). With ``flex_bg`` the tables of a flex
  group lie side by side, so their used parts come in one request each;
- every directory's blocks (`find`, `ls -R` read them all), found from the directories'
  extent trees (or block maps on ext2/3), tree blocks included;
- the journal's superblock (mount reads it to see whether the journal needs recovery).

The bitmaps are not fetched: a read-only mount never reads them. Regular files' extents
become the layout's data extents; files with an extent tree deeper than the inode are left
out (their tree blocks are only read when the file is), so their data is simply unknown.

Three rounds after the head: inode tables, then directory blocks and the journal superblock,
then the blocks of deeper directory extent trees (rare: a directory of thousands of
fragmented blocks).
"""

from __future__ import annotations

import struct

import trio

from .layout import Extents, Layout, Range
from .reader import ImageReader, NoHint

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xEF53

# s_feature_compat / incompat / ro_compat bits
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_INLINE_DATA = 0x8000
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400

BG_INODE_UNINIT = 0x1

S_IFMT = 0xF000
S_IFDIR = 0x4000
S_IFREG = 0x8000

EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
EXTENT_MAGIC = 0xF30A
#: The kernel refuses trees deeper than this (EXT4_MAX_EXTENT_DEPTH).
MAX_EXTENT_DEPTH = 5
#: Groups beyond this are not believed (2^32 blocks of 64 KiB in groups of 8 blocks would be
#: more, but no real filesystem has a million groups in an image someone loop-mounts).
MAX_GROUPS = 1 << 20
#: Data extents kept at most; past this the rest of the files' data is simply unknown.
MAX_EXTENTS = 1 << 20


class _Super:
    """The superblock fields the parser uses, checked for sanity."""

    def __init__(self, raw: bytes, image_size: int) -> None:
        (magic,) = struct.unpack_from("<H", raw, 0x38)
        if magic != MAGIC:
            raise NoHint("no ext2/3/4 magic")
        self.inodes_count, blocks_lo = struct.unpack_from("<II", raw, 0)
        self.first_data_block, log_block = struct.unpack_from("<II", raw, 0x14)
        self.blocks_per_group, _, self.inodes_per_group = struct.unpack_from("<III", raw, 0x20)
        (rev,) = struct.unpack_from("<I", raw, 0x4C)
        first_ino, inode_size = struct.unpack_from("<IH", raw, 0x54)
        self.compat, self.incompat, self.ro_compat = struct.unpack_from("<III", raw, 0x5C)
        (self.journal_inum,) = struct.unpack_from("<I", raw, 0xE0)
        (desc_size,) = struct.unpack_from("<H", raw, 0xFE)
        (self.first_meta_bg,) = struct.unpack_from("<I", raw, 0x104)
        (blocks_hi,) = struct.unpack_from("<I", raw, 0x150)
        if log_block > 6:
            raise NoHint(f"block size 1024 << {log_block}")
        self.block_size = 1024 << log_block
        self.inode_size = 128 if rev == 0 else inode_size
        self.first_ino = 11 if rev == 0 else first_ino
        if self.inode_size < 128 or self.inode_size > self.block_size:
            raise NoHint(f"inode size {self.inode_size}")
        if self.inode_size & (self.inode_size - 1):
            raise NoHint(f"inode size {self.inode_size} is not a power of two")
        self.is_64bit = bool(self.incompat & INCOMPAT_64BIT)
        self.blocks_count = blocks_lo | ((blocks_hi << 32) if self.is_64bit else 0)
        if self.is_64bit:
            if desc_size < 32 or desc_size > 1024 or desc_size & (desc_size - 1):
                raise NoHint(f"group descriptor size {desc_size}")
            self.desc_size = desc_size
        else:
            self.desc_size = 32
        bits = 8 * self.block_size
        if not 0 < self.blocks_per_group <= bits or not 0 < self.inodes_per_group <= bits:
            raise NoHint("impossible group geometry")
        if self.first_data_block >= self.blocks_count or self.first_data_block > 1:
            raise NoHint("impossible first data block")
        if self.blocks_count * self.block_size > image_size:
            raise NoHint("the filesystem is larger than the image")
        self.groups = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        if self.groups > MAX_GROUPS:
            raise NoHint(f"{self.groups} block groups")
        self.has_csum = bool(self.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM))
        self.has_extents = bool(self.incompat & INCOMPAT_EXTENTS)

    def block_range(self, block: int, count: int = 1) -> Range:
        return block * self.block_size, (block + count) * self.block_size

    def valid_blocks(self, block: int, count: int) -> bool:
        return count > 0 and block >= 0 and block + count <= self.blocks_count


def _has_super(group: int) -> bool:
    """Whether a group holds a superblock backup under sparse_super (0, 1, powers of 3, 5, 7)."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False


def _descriptor_ranges(sb: _Super) -> list[Range]:
    """Where the group descriptors lie: one table after the superblock, or per meta group."""
    table_block = sb.first_data_block + 1
    per_block = sb.block_size // sb.desc_size
    if not sb.incompat & INCOMPAT_META_BG:
        start = table_block * sb.block_size
        return [(start, start + sb.groups * sb.desc_size)]
    ranges = []
    # Before first_meta_bg, an ordinary table of first_meta_bg blocks; then one block per meta
    # group, in its first group (after the superblock backup, if that group has one).
    plain = min(sb.first_meta_bg * per_block, sb.groups)
    if plain:
        start = table_block * sb.block_size
        ranges.append((start, start + plain * sb.desc_size))
    for first_group in range(plain, sb.groups, per_block):
        block = sb.first_data_block + first_group * sb.blocks_per_group
        block += 1 if _has_super(first_group) else 0
        count = min(per_block, sb.groups - first_group)
        start = block * sb.block_size
        ranges.append((start, start + count * sb.desc_size))
    return ranges


class _Group:
    __slots__ = ("inode_table", "used")

    def __init__(self, inode_table: int, used: int) -> None:
        self.inode_table = inode_table
        self.used = used


def _parse_groups(sb: _Super, tables: list[bytes]) -> list[_Group]:
    raw = b"".join(tables)
    groups = []
    for index in range(sb.groups):
        at = index * sb.desc_size
        _, _, table_lo, _, free_lo, _, flags = struct.unpack_from("<IIIHHHH", raw, at)
        (unused_lo,) = struct.unpack_from("<H", raw, at + 0x1C)
        table, free, unused = table_lo, free_lo, unused_lo
        if sb.desc_size >= 64:
            (table_hi,) = struct.unpack_from("<I", raw, at + 0x28)
            (free_hi,) = struct.unpack_from("<H", raw, at + 0x2E)
            (unused_hi,) = struct.unpack_from("<H", raw, at + 0x32)
            table |= table_hi << 32
            free |= free_hi << 16
            unused |= unused_hi << 16
        if sb.has_csum:
            used = 0 if flags & BG_INODE_UNINIT else sb.inodes_per_group - unused
        else:
            used = 0 if free >= sb.inodes_per_group else sb.inodes_per_group
        used = max(0, min(used, sb.inodes_per_group))
        table_blocks = -(-used * sb.inode_size // sb.block_size)
        if used and not sb.valid_blocks(table, table_blocks):
            raise NoHint(f"group {index}'s inode table lies outside the filesystem")
        groups.append(_Group(table, used))
    return groups


class _Walk:
    """What the inode tables say: directory blocks, file extents, tree blocks still to read."""

    def __init__(self, sb: _Super) -> None:
        self.sb = sb
        self.dir_blocks: list[Range] = []
        self.file_extents: list[Range] = []
        #: ``(depth, block, is_directory)`` of extent tree nodes to read next round.
        self.pending_nodes: list[tuple[int, int, bool]] = []
        #: ext2/3 indirect blocks of directories: ``(level, block)``.
        self.pending_indirect: list[tuple[int, int]] = []
        self.journal_block: int | None = None
        self.seen_nodes: set[int] = set()
        self.notes: list[str] = []

    def add_run(self, block: int, count: int, directory: bool) -> None:
        """A run of data blocks of a directory (metadata) or a file (an extent)."""
        if not self.sb.valid_blocks(block, count):
            return
        target = self.dir_blocks if directory else self.file_extents
        if len(target) < MAX_EXTENTS:
            target.append(self.sb.block_range(block, count))

    def inode(self, ino: int, raw: bytes) -> None:
        (mode,) = struct.unpack_from("<H", raw, 0)
        (links,) = struct.unpack_from("<H", raw, 0x1A)
        (flags,) = struct.unpack_from("<I", raw, 0x20)
        kind = mode & S_IFMT
        if not mode or (not links and ino != self.sb.journal_inum):
            return
        directory = kind == S_IFDIR
        journal = ino == self.sb.journal_inum and bool(self.sb.compat & COMPAT_HAS_JOURNAL)
        if not (directory or kind == S_IFREG or journal) or flags & INLINE_DATA_FL:
            return
        i_block = raw[0x28 : 0x28 + 60]
        if flags & EXTENTS_FL:
            self._extent_node(i_block, directory, journal, depth_limit=MAX_EXTENT_DEPTH)
        else:
            self._block_map(i_block, directory, journal)

    def _extent_node(
        self, node: bytes, directory: bool, journal: bool, *, depth_limit: int
    ) -> None:
        magic, entries, maximum, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != EXTENT_MAGIC or entries > maximum or 12 * (entries + 1) > len(node):
            return  # a damaged tree: this file's blocks stay unknown
        if depth > depth_limit:
            return
        for index in range(entries):
            at = 12 + 12 * index
            if depth == 0:
                _, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, at)
                if length > 32768:
                    length -= 32768  # an unwritten extent: reads as zeros, still its blocks
                start = start_lo | (start_hi << 32)
                if journal:
                    if self.journal_block is None and self.sb.valid_blocks(start, 1):
                        self.journal_block = start
                    return
                self.add_run(start, length, directory)
            elif directory or journal:
                _, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, at)
                leaf = leaf_lo | (leaf_hi << 32)
                if self.sb.valid_blocks(leaf, 1) and leaf not in self.seen_nodes:
                    self.seen_nodes.add(leaf)
                    self.pending_nodes.append((depth - 1, leaf, directory))
                if journal:
                    return  # its first leaf is all the journal needs
            else:
                # A file whose extents do not fit in its inode: its tree blocks are read only
                # when the file is, so its data stays unknown here.
                return

    def tree_node(self, depth: int, raw: bytes, directory: bool) -> None:
        """An extent tree block fetched in a later round (*depth* levels above leaves)."""
        journal = not directory
        (node_depth,) = struct.unpack_from("<H", raw, 6)
        if node_depth != depth:
            return  # the tree does not agree with itself
        self._extent_node(raw, directory, journal, depth_limit=depth)

    def _block_map(self, i_block: bytes, directory: bool, journal: bool) -> None:
        """ext2/3: twelve direct blocks, then single, double and triple indirect ones."""
        pointers = struct.unpack_from("<15I", i_block, 0)
        run_start, run_length = 0, 0
        for block in pointers[:12]:
            if block and block == run_start + run_length:
                run_length += 1
                continue
            if run_length:
                self._mapped_run(run_start, run_length, directory, journal)
            run_start, run_length = block, (1 if block else 0)
        if run_length:
            self._mapped_run(run_start, run_length, directory, journal)
        if directory:
            for level, block in ((1, pointers[12]), (2, pointers[13]), (3, pointers[14])):
                if block and self.sb.valid_blocks(block, 1) and block not in self.seen_nodes:
                    self.seen_nodes.add(block)
                    self.pending_indirect.append((level, block))

    def _mapped_run(self, start: int, length: int, directory: bool, journal: bool) -> None:
        if journal:
            if self.journal_block is None and self.sb.valid_blocks(start, 1):
                self.journal_block = start
            return
        self.add_run(start, length, directory)

    def indirect(self, level: int, raw: bytes) -> None:
        """An ext2/3 indirect block of a directory: its pointers, a level down."""
        for (block,) in struct.iter_unpack("<I", raw):
            if not block or not self.sb.valid_blocks(block, 1):
                continue
            if level == 1:
                self.add_run(block, 1, True)
            elif block not in self.seen_nodes:
                self.seen_nodes.add(block)
                self.pending_indirect.append((level - 1, block))


async def parse(reader: ImageReader) -> Layout:
    """The layout of the ext2/3/4 filesystem *reader* holds; `NoHint` if it is not one."""
    sb = _Super(await reader.read(SUPERBLOCK_OFFSET, 1024), reader.size)
    kind = "ext4" if sb.has_extents else ("ext3" if sb.compat & COMPAT_HAS_JOURNAL else "ext2")
    metadata: list[Range] = [(0, max(2048, sb.block_size * (sb.first_data_block + 1)))]
    descriptor_ranges = _descriptor_ranges(sb)
    metadata += descriptor_ranges
    groups = _parse_groups(sb, await reader.read_many(descriptor_ranges))

    # Round 1: the used part of every inode table.
    table_ranges: list[Range] = []
    table_groups: list[int] = []
    notes: list[str] = []
    room = reader.budget.room()
    for index, group in enumerate(groups):
        if not group.used:
            continue
        start, _ = sb.block_range(group.inode_table)
        length = -(-group.used * sb.inode_size // sb.block_size) * sb.block_size
        if length > room:
            notes.append(f"inode tables of groups {index}+ left out (budget)")
            break
        room -= length
        table_ranges.append((start, start + length))
        table_groups.append(index)
    metadata += table_ranges
    walk = _Walk(sb)
    for index, raw in zip(table_groups, await reader.read_many(table_ranges), strict=True):
        base = index * sb.inodes_per_group + 1
        size = sb.inode_size
        for slot in range(groups[index].used):
            walk.inode(base + slot, raw[slot * size : slot * size + size])
        await trio.lowlevel.checkpoint()  # a large filesystem: let the mount's requests run

    # Later rounds: extent tree nodes and indirect blocks of directories (and the journal).
    for _ in range(MAX_EXTENT_DEPTH + 3):
        nodes, walk.pending_nodes = walk.pending_nodes, []
        indirect, walk.pending_indirect = walk.pending_indirect, []
        if not nodes and not indirect:
            break
        wanted = [sb.block_range(block) for _, block, _ in nodes]
        wanted += [sb.block_range(block) for _, block in indirect]
        if sum(end - start for start, end in wanted) > reader.budget.room():
            notes.append("deep directory trees left out (budget)")
            break
        metadata += wanted
        blocks = await reader.read_many(wanted)
        for (depth, _, directory), raw in zip(nodes, blocks, strict=False):
            walk.tree_node(depth, raw, directory)
        for (level, _), raw in zip(indirect, blocks[len(nodes) :], strict=True):
            walk.indirect(level, raw)

    if walk.journal_block is not None:
        metadata.append(sb.block_range(walk.journal_block))
    room = reader.budget.room()
    for start, end in walk.dir_blocks:
        if end - start > room:
            notes.append("directory blocks left out (budget)")
            break
        room -= end - start
        metadata.append((start, end))
    return Layout(kind, metadata, Extents(walk.file_extents), notes + walk.notes)


def sniff(head: bytes) -> bool:
    """True when *head* (the image's first bytes) holds an ext2/3/4 superblock."""
    return len(head) >= SUPERBLOCK_OFFSET + 0x3A and head[1080:1082] == b"\x53\xef"
