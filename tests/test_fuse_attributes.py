"""What `getattr` tells the kernel, without a mount: sizes, cached blocks and cache lifetimes."""

from __future__ import annotations

from pathlib import Path

import pyfuse3
import trio

from remotefs.fuse.ops import ATTR_TIMEOUT, RemoteFsOperations
from remotefs.fuse.tree import Tree

from .test_block_cache import BS, attach, open_store, remote


def _getattr(ops: RemoteFsOperations, inode: int) -> pyfuse3.EntryAttributes:
    async def ask() -> pyfuse3.EntryAttributes:
        return await ops.getattr(pyfuse3.InodeT(inode))

    return trio.run(ask)


def test_a_retired_version_is_never_cached_by_the_kernel(tmp_path: Path) -> None:
    """Attributes of a version being replaced must not outlive the swap (a stale size)."""
    store = open_store(tmp_path / "cache")
    try:
        cached = attach(store, remote(size=5 * BS + 7))
        tree = Tree()
        node = tree.add_file(("data.bin",), cached)
        ops = RemoteFsOperations(tree, None, BS)  # no engine: getattr never fetches

        live = _getattr(ops, node.inode)
        assert live.st_size == 5 * BS + 7
        assert live.attr_timeout == live.entry_timeout == ATTR_TIMEOUT

        trio.run(cached.retire)
        retired = _getattr(ops, node.inode)
        assert retired.st_size == 5 * BS + 7
        assert retired.attr_timeout == retired.entry_timeout == 0
    finally:
        store.close()
