"""The namespace (`remotefs.fuse.tree`) without a mount: inodes per path and per version."""

from __future__ import annotations

from pathlib import Path

import pyfuse3

from remotefs.cache.cached_file import CachedFile
from remotefs.fuse.tree import FileNode, Tree

from .test_block_cache import attach, open_store, remote


def _two_versions(tmp_path: Path) -> tuple[CachedFile, CachedFile]:
    store = open_store(tmp_path / "cache")
    first = attach(store, remote(etag='"v1"'))
    second = attach(store, remote(etag='"v2"'))
    for cached in (first, second):
        cached.close()  # the tree never reads them
    store.close()
    return first, second


def test_a_new_version_gets_a_new_inode_at_the_same_path(tmp_path: Path) -> None:
    first, second = _two_versions(tmp_path)
    tree = Tree()
    old = tree.add_file(("dir", "data.bin"), first)
    directory = tree.find(("dir",))
    assert directory is not None

    swapped = tree.replace_file(old.inode, second)
    assert swapped is not None
    new, removed = swapped
    assert new.inode not in (old.inode, directory.inode) and new.cached is second
    assert removed == (directory.inode, "data.bin", old.inode)
    # A lookup by name reaches the new version; the old inode still answers its handles.
    assert tree.lookup(directory.inode, "data.bin") is new
    assert tree.find(("dir", "data.bin")) is new
    assert tree.get(old.inode) is old and old.cached is first
    assert tree.unlinked == {old.inode: old}
    assert [node.cached for node in tree.files()] == [second]
    assert tree.counts() == (1, 2)


def test_replacing_what_is_not_linked_changes_nothing(tmp_path: Path) -> None:
    first, second = _two_versions(tmp_path)
    tree = Tree()
    node = tree.add_file(("data.bin",), first)
    assert tree.replace_file(pyfuse3.ROOT_INODE + 100, second) is None
    assert tree.unlink_file(("data.bin",)) is not None
    assert tree.replace_file(node.inode, second) is None  # unlinked by a reload meanwhile
    assert tree.unlinked == {node.inode: node}
    assert not any(isinstance(n, FileNode) for n in tree.nodes.values())


def test_a_url_at_two_paths_is_one_cache_entry(tmp_path: Path) -> None:
    first, second = _two_versions(tmp_path)
    tree = Tree()
    a = tree.add_file(("a.bin",), first)
    tree.add_file(("b.bin",), first)
    tree.add_file(("c.bin",), second)
    assert tree.cached_files() == [first, second]
    swapped = tree.replace_file(a.inode, second)
    assert swapped is not None
    assert tree.cached_files() == [first, second]  # b.bin still lists the first
