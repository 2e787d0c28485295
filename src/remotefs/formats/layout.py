"""What a format parser found in an image: its metadata, and where each file's data lies.

A `Layout` is the whole output of a parser. Its *metadata* ranges are what the format's
reader (the kernel's ext4 or squashfs driver, `unzip -l`, `isoinfo`) will read to list the
image: the open-time hint fetches them at once, in parallel. Its *extents* are the byte
ranges of the files inside the image: the fetcher never reads ahead past the end of the
extent a read falls in, and fetches a miss outside every extent exactly, since nothing
says its neighbours will be wanted (see `BlockFetcher.read`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: The unit the kernel reads a loop device's backing file in.
PAGE = 4096

Range = tuple[int, int]


def merge(ranges: Iterable[Range], *, gap: int = 0) -> list[Range]:
    """Sorted, disjoint ``[start, end)`` ranges covering *ranges* (joined across gaps <= *gap*)."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1] + gap:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


class Extents:
    """Sorted byte ranges of file data; `containing` finds the one an offset falls in.

    Ranges of different files are kept apart even when they touch: a read ahead stops at the
    end of the file being read. Overlapping ranges (only a corrupt image has them) are
    dropped, keeping the first: a wrong extent costs a little traffic, never a wrong byte.
    """

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in sorted(r for r in ranges if r[1] > r[0]):
            if self._ends and start < self._ends[-1]:
                continue
            self._starts.append(start)
            self._ends.append(end)

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[Range]:
        return iter(zip(self._starts, self._ends, strict=True))

    def containing(self, offset: int) -> Range | None:
        """The range that holds byte *offset*, or None."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self._ends[index]:
            return self._starts[index], self._ends[index]
        return None

    def starting_in(self, start: int, end: int) -> Range | None:
        """The first range whose start lies in ``[start, end)``, or None."""
        index = bisect.bisect_left(self._starts, start)
        if index < len(self._starts) and self._starts[index] < end:
            return self._starts[index], self._ends[index]
        return None

    def within(self, start: int, end: int) -> list[Range]:
        """The parts of ``[start, end)`` that lie in a range (the gaps between them left out)."""
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        parts = []
        while index < len(self._starts) and self._starts[index] < end:
            low, high = max(start, self._starts[index]), min(end, self._ends[index])
            if low < high:
                parts.append((low, high))
            index += 1
        return parts

    def total(self) -> int:
        return sum(end - start for start, end in zip(self._starts, self._ends, strict=True))

    def shifted(self, base: int) -> Extents:
        return Extents((start + base, end + base) for start, end in self)


@dataclass
class Layout:
    """A parsed image: its format, the metadata to fetch, and the files' data extents."""

    kind: str
    #: Byte ranges the format's reader needs to list the image (fetched on open).
    metadata: list[Range] = field(default_factory=list)
    #: Where the files' data lies.
    extents: Extents = field(default_factory=Extents)
    #: What the parser could not finish (a budget, an unsupported compressor), for the log.
    notes: list[str] = field(default_factory=list)
    #: A stand-in while the image is being parsed: fetch exactly what is read, nothing more.
    pending: bool = False
    _metadata_index: Extents | None = field(default=None, repr=False, compare=False)

    def in_metadata(self, offset: int) -> bool:
        """True when byte *offset* lies in one of the metadata ranges."""
        if self._metadata_index is None:
            self._metadata_index = Extents(merge(self.metadata))
        return self._metadata_index.containing(offset) is not None

    def shifted(self, base: int) -> Layout:
        """This layout for an image that starts *base* bytes into its file (a partition)."""
        return Layout(
            self.kind,
            [(start + base, end + base) for start, end in self.metadata],
            self.extents.shifted(base),
            list(self.notes),
        )

    def extent_of_read(self, offset: int, end: int) -> Range | None:
        """``(start, end)`` of the data extent a read of ``[offset, end)`` is reading, or None.

        That is the extent holding *offset*, but for one case: a read of more than a page
        that begins less than a page before another extent's start and lies mostly past it
        is that file's first read. The kernel reads a squashfs file (whose data starts
        anywhere: squashfs packs files byte after byte) from the device block before its
        start, which holds the end of the file before it, a compressed block (up to 128 KiB)
        at a time. What is left out: a read mostly before that start (the end of the file
        before), a read of a page or less (libblkid's probes, one 4 KiB page each; the last
        block of the file before), and a read that begins in the metadata (squashfs's first
        file starts inside the superblock's page).
        """
        if end - offset > PAGE and not self.in_metadata(offset):
            starting = self.extents.starting_in(offset + 1, offset + PAGE)
            if starting is not None and end - starting[0] > starting[0] - offset:
                return starting
        return self.extents.containing(offset)

    def count_extents(self, start: int, end: int) -> int:
        """How many data extents overlap ``[start, end)`` (files, or pieces of files)."""
        return len(self.extents.within(start, end))

    def extents_within(self, start: int, end: int, gap: int = 0) -> list[Range]:
        """The files' data in ``[start, end)``, without what lies between files.

        Parts less than *gap* apart are joined (one request is worth a few bytes more).
        """
        return merge(self.extents.within(start, end), gap=gap)

    def describe(self) -> str:
        meta = sum(end - start for start, end in merge(self.metadata))
        text = f"{self.kind}: {meta / 1048576:.1f} MiB of metadata in {len(merge(self.metadata))}"
        text += f" ranges, {len(self.extents)} data extents"
        if self.notes:
            text += f" ({'; '.join(self.notes)})"
        return text


def combine(kind: str, layouts: Iterable[Layout]) -> Layout:
    """One layout of several (the partitions of a disk image)."""
    metadata: list[Range] = []
    extents: list[Range] = []
    notes: list[str] = []
    kinds = []
    for layout in layouts:
        kinds.append(layout.kind)
        metadata += layout.metadata
        extents += list(layout.extents)
        notes += layout.notes
    return Layout(f"{kind}({', '.join(kinds)})", metadata, Extents(extents), notes)
