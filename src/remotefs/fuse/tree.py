"""The namespace of a daemon: directories and files built from urls.txt paths, shared by its
FUSE mount and its HTTP server.

Inode numbers are assigned once per mount, in manifest order, and never reused, so the kernel's
entry and attribute caches can keep them for a long time. A reload of urls.txt unlinks files
(and prunes directories left empty); an unlinked file keeps its inode in `Tree.unlinked` while
open handles may still ask for its attributes, like an unlinked file of a local filesystem. A
file that changed at the origin is replaced the same way: a new inode at the same path.

Every node knows its parent and its name, and the tree keeps its counts and the nodes of each
cache entry, so that no operation walks the whole tree: with 100,000 files, a walk per change
or per lookup is what made mounting and reloading slow.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from ..cache.cached_file import CachedFile

#: The root directory's inode: FUSE's own (``FUSE_ROOT_ID``, ROOT_INODE). Defined here
#: so that the tree, which the HTTP server shares, needs no pyfuse3 (a serve-only daemon runs
#: without libfuse).
ROOT_INODE = 1


@dataclass(eq=False, slots=True)
class DirNode:
    """A directory: children by name (readdir sorts them per opendir)."""

    inode: int
    parent: int = 0
    name: str = ""
    children: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class FileNode:
    """A remote file; *cached* is its cache entry (size, mtime and bytes come from there)."""

    inode: int
    cached: CachedFile
    parent: int = 0
    name: str = ""


Node = DirNode | FileNode

#: A directory entry that disappeared: (parent inode, name, inode), for the kernel's dcache.
Removed = tuple[int, str, int]


class Tree:
    """Maps inodes to nodes and paths to inodes."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: DirNode(ROOT_INODE)}
        self._next_inode = ROOT_INODE + 1
        #: Files removed from the namespace whose cache entry may still be read through open
        #: handles; the daemon drops them once nothing uses them.
        self.unlinked: dict[int, FileNode] = {}
        #: Linked file inodes of each cache entry (a URL listed at several paths has several).
        self._by_cached: dict[CachedFile, list[int]] = {}
        self._files = 0

    def add_file(self, path: tuple[str, ...], cached: CachedFile) -> FileNode:
        """Add a file, creating its parent directories (the manifest parser checked clashes)."""
        directory = self.nodes[ROOT_INODE]
        for name in path[:-1]:
            assert isinstance(directory, DirNode)
            child = directory.children.get(name)
            if child is None:
                child = self._allocate()
                self.nodes[child] = DirNode(child, directory.inode, name)
                directory.children[name] = child
            directory = self.nodes[child]
        assert isinstance(directory, DirNode)
        node = FileNode(self._allocate(), cached, directory.inode, path[-1])
        self._link(node)
        directory.children[path[-1]] = node.inode
        return node

    def _link(self, node: FileNode) -> None:
        self.nodes[node.inode] = node
        self._by_cached.setdefault(node.cached, []).append(node.inode)
        self._files += 1

    def _unlink(self, node: FileNode) -> None:
        del self.nodes[node.inode]
        inodes = self._by_cached[node.cached]
        inodes.remove(node.inode)
        if not inodes:
            del self._by_cached[node.cached]
        self._files -= 1
        self.unlinked[node.inode] = node

    def _allocate(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode

    def get(self, inode: int) -> Node | None:
        """The node of *inode*, linked or unlinked (an open handle may still stat it)."""
        return self.nodes.get(inode) or self.unlinked.get(inode)

    def find(self, path: tuple[str, ...]) -> Node | None:
        """The node at *path* (segments under the root), or None."""
        node: Node | None = self.nodes[ROOT_INODE]
        for name in path:
            if not isinstance(node, DirNode):
                return None
            inode = node.children.get(name)
            node = None if inode is None else self.nodes[inode]
        return node

    def path_of(self, node: Node) -> str:
        """The path of *node* under the mount root, ``a/b/c`` ("" for the root)."""
        parts: list[str] = []
        current: Node | None = node
        while current is not None and current.inode != ROOT_INODE:
            parts.append(current.name)
            current = self.nodes.get(current.parent)
        return "/".join(reversed(parts))

    def nodes_of(self, cached: CachedFile) -> list[FileNode]:
        """The linked files whose cache entry is *cached*."""
        nodes = []
        for inode in self._by_cached.get(cached, ()):
            node = self.nodes[inode]
            assert isinstance(node, FileNode)
            nodes.append(node)
        return nodes

    def is_listed(self, cached: CachedFile) -> bool:
        """True while some path of the namespace shows *cached*."""
        return cached in self._by_cached

    def unlink_file(self, path: tuple[str, ...]) -> Removed | None:
        """Take the file at *path* out of the namespace into `unlinked`; None if there is none.

        Parent directories stay, even empty ones: `prune` removes those once every change of
        a reload is made, so a path whose file is replaced keeps its directories' inodes.
        """
        parent = self.find(path[:-1])
        if not isinstance(parent, DirNode):
            return None
        inode = parent.children.get(path[-1])
        node = None if inode is None else self.nodes[inode]
        if not isinstance(node, FileNode):
            return None
        del parent.children[path[-1]]
        self._unlink(node)
        return parent.inode, path[-1], node.inode

    def replace_file(self, inode: int, cached: CachedFile) -> tuple[FileNode, Removed] | None:
        """Serve *cached* at the path of file *inode* under a new inode; None if not linked.

        The origin's file changed, and the kernel keeps page cache per inode: handles opened
        on the old version read cached pages without asking the daemon. With one inode per
        version, an old handle can never find a page of the new version there, nor a new
        open a page of the old. The old node moves to `unlinked` for its open handles.
        """
        old = self.nodes.get(inode)
        if not isinstance(old, FileNode):
            return None
        directory = self.nodes[old.parent]
        assert isinstance(directory, DirNode)
        self._unlink(old)
        node = FileNode(self._allocate(), cached, old.parent, old.name)
        self._link(node)
        directory.children[old.name] = node.inode
        return node, (directory.inode, old.name, inode)

    def prune(self, keep: Collection[tuple[str, ...]] = ()) -> list[Removed]:
        """Remove every directory without files, except the paths in *keep* (files are about
        to be added there); the removed entries, deepest first."""
        removed: list[Removed] = []

        def visit(directory: DirNode, path: tuple[str, ...]) -> None:
            for name, inode in list(directory.children.items()):
                child = self.nodes[inode]
                if isinstance(child, DirNode):
                    visit(child, (*path, name))
                    if not child.children and (*path, name) not in keep:
                        del directory.children[name]
                        del self.nodes[inode]
                        removed.append((directory.inode, name, inode))

        root = self.nodes[ROOT_INODE]
        assert isinstance(root, DirNode)
        visit(root, ())
        return removed

    def lookup(self, parent: int, name: str) -> Node | None:
        """The child *name* of directory *parent*, or None."""
        directory = self.nodes.get(parent)
        if not isinstance(directory, DirNode):
            return None
        inode = directory.children.get(name)
        return None if inode is None else self.nodes[inode]

    def files(self) -> Iterator[FileNode]:
        """Every linked file node."""
        return (node for node in self.nodes.values() if isinstance(node, FileNode))

    def files_under(self, node: Node) -> Iterator[FileNode]:
        """Every linked file at or under *node*."""
        if isinstance(node, FileNode):
            yield node
            return
        for inode in node.children.values():
            yield from self.files_under(self.nodes[inode])

    def cached_files(self) -> list[CachedFile]:
        """The distinct cache entries of the files: a URL listed at two paths has one entry,
        which must be counted, saved and filled once."""
        return list(self._by_cached)

    def counts(self) -> tuple[int, int]:
        """(number of files, number of directories)."""
        return self._files, len(self.nodes) - self._files
