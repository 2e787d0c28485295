"""The namespace of the mount: directories and files built from urls.txt paths.

Inode numbers are assigned once per mount, in manifest order, and never reused, so the kernel's
entry and attribute caches can keep them for a long time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pyfuse3

from ..cache.cached_file import CachedFile


@dataclass(eq=False)
class DirNode:
    """A directory: children by name, kept sorted for stable readdir offsets."""

    inode: int
    children: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class FileNode:
    """A remote file; *cached* is its cache entry (size, mtime and bytes come from there)."""

    inode: int
    cached: CachedFile


Node = DirNode | FileNode


class Tree:
    """Maps inodes to nodes and paths to inodes."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: DirNode(pyfuse3.ROOT_INODE)}
        self._next_inode = pyfuse3.ROOT_INODE + 1

    def add_file(self, path: tuple[str, ...], cached: CachedFile) -> FileNode:
        """Add a file, creating its parent directories (the manifest parser checked clashes)."""
        directory = self.nodes[pyfuse3.ROOT_INODE]
        for name in path[:-1]:
            assert isinstance(directory, DirNode)
            child = directory.children.get(name)
            if child is None:
                child = self._allocate()
                self.nodes[child] = DirNode(child)
                directory.children[name] = child
            directory = self.nodes[child]
        assert isinstance(directory, DirNode)
        inode = self._allocate()
        node = FileNode(inode, cached)
        self.nodes[inode] = node
        directory.children[path[-1]] = inode
        return node

    def _allocate(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode

    def lookup(self, parent: int, name: str) -> Node | None:
        """The child *name* of directory *parent*, or None."""
        directory = self.nodes.get(parent)
        if not isinstance(directory, DirNode):
            return None
        inode = directory.children.get(name)
        return None if inode is None else self.nodes[inode]

    def files(self) -> Iterator[FileNode]:
        """Every file node."""
        return (node for node in self.nodes.values() if isinstance(node, FileNode))

    def counts(self) -> tuple[int, int]:
        """(number of files, number of directories)."""
        files = sum(1 for node in self.nodes.values() if isinstance(node, FileNode))
        return files, len(self.nodes) - files
