"""`PieceStore`: parts of blocks in memory, merged, looked up, bounded, turned into blocks."""

from __future__ import annotations

import random
from typing import cast

from remotefs.cache.cached_file import CachedFile
from remotefs.cache.pieces import PieceStore

KiB = 1024


class FakeFile:
    """What the store needs of a `CachedFile`: identity (weakly held), block size, size."""

    def __init__(self, size: int, block_size: int = 64 * KiB) -> None:
        self.size = size
        self.block_size = block_size
        self.nblocks = -(-size // block_size)


def fake(size: int) -> CachedFile:
    return cast(CachedFile, FakeFile(size))


def test_touching_and_overlapping_pieces_merge_and_serve_any_part() -> None:
    data = random.Random(1).randbytes(256 * KiB)
    file = fake(len(data))
    store = PieceStore()
    store.add(file, 8 * KiB, data[8 * KiB : 16 * KiB])
    store.add(file, 16 * KiB, data[16 * KiB : 20 * KiB])
    store.add(file, 4 * KiB, data[4 * KiB : 12 * KiB])
    assert store.get(file, 4 * KiB, 20 * KiB) == data[4 * KiB : 20 * KiB]
    assert store.get(file, 10 * KiB, 11 * KiB) == data[10 * KiB : 11 * KiB]
    assert store.get(file, 0, 8 * KiB) is None
    assert store.get(file, 16 * KiB, 24 * KiB) is None
    assert store.size == 16 * KiB  # one piece now, no byte counted twice


def test_pieces_that_cover_whole_blocks_give_them_up() -> None:
    data = random.Random(2).randbytes(200 * KiB)  # the last block is short
    file = fake(len(data))
    store = PieceStore()
    store.add(file, 60 * KiB, data[60 * KiB : 140 * KiB])
    assert store.take_blocks(file, 60 * KiB) == [(1, data[64 * KiB : 128 * KiB])]
    assert store.take_blocks(file, 150 * KiB) == []  # no piece there
    store.add(file, 190 * KiB, data[190 * KiB :])
    store.add(file, 192 * KiB, data[192 * KiB :])
    blocks = dict(store.take_blocks(file, 195 * KiB))
    assert blocks[3] == data[192 * KiB :]


def test_the_store_drops_its_oldest_pieces_beyond_its_capacity() -> None:
    file = fake(10 * 1024 * KiB)
    store = PieceStore(capacity=64 * KiB)
    for index in range(10):
        store.add(file, index * 32 * KiB, bytes(16 * KiB))
    assert store.size <= 64 * KiB
    assert store.get(file, 0, 16 * KiB) is None
    assert store.get(file, 9 * 32 * KiB, 9 * 32 * KiB + 16 * KiB) is not None


def test_a_files_pieces_go_with_it() -> None:
    store = PieceStore()
    file = fake(1024 * KiB)
    store.add(file, 0, bytes(4 * KiB))
    store.drop(file)
    assert store.size == 0 and store.get(file, 0, 4 * KiB) is None
