"""FUSE semantics of the mount: a read-only tree whose file reads go through the block cache.

This module only translates between the kernel's requests and the lower layers: names to
nodes, nodes to attributes, reads to `BlockFetcher.read`, and failures to errno values. Every
request that would change something answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3

from ..cache.cached_file import CachedFile
from ..cache.engine import Handle, RemoteCache
from ..cache.fetcher import ReadError
from ..redact import redact_url
from .tree import ROOT_INODE, DirNode, FileNode, Node, Tree
from .xattr_names import CONTROL_XATTR, PID_XATTR

log = logging.getLogger(__name__)

# The namespace only changes when the daemon itself changes it, so the kernel may trust what
# it was told for a long time; warm lookups then never reach this process.
ATTR_TIMEOUT = 3600.0
#: On every file: the live view of its cache (the kernel caches attributes, not xattrs).
URL_XATTR = b"user.remotefs.url"
CACHED_BYTES_XATTR = b"user.remotefs.cached_bytes"
COMPLETE_XATTR = b"user.remotefs.complete"
ETAG_XATTR = b"user.remotefs.etag"
CONTENT_TYPE_XATTR = b"user.remotefs.content_type"
#: When the origin last confirmed the file, and how long it stays fresh.
VALIDATED_XATTR = b"user.remotefs.validated"
#: Whether the bytes matched their digest: ``sha256`` (the algorithm), ``pending``,
#: ``mismatch`` or ``none`` (no digest known).
VERIFIED_XATTR = b"user.remotefs.verified"
#: Attribute and entry timeout of a stale file: the kernel asks again soon, by which time a
#: background revalidation has usually answered.
STALE_TIMEOUT = 1.0


def validated_text(cached: CachedFile, lifetime: float) -> str:
    """``2026-11-30T06:40:00Z; fresh for 60s`` (or ``never``), for xattrs and status."""
    if not cached.validated_at:
        when = "never"
    else:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cached.validated_at))
    gone = "; gone at origin" if cached.gone else ""
    return f"{when}; fresh for {lifetime:g}s after it{gone}"


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _never_crash(handler: _Handler) -> _Handler:
    """Turn an unexpected exception in a request handler into EIO and a logged traceback.

    pyfuse3 ends its main loop (and so the mount) on any exception that is not a FUSEError;
    one bug hit by one request must cost that request, not every reader of the mount.
    """

    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(_Handler, guarded)


def _guard_handlers(cls: type) -> type:
    """Apply `_never_crash` to every request handler the class defines."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(value):
            setattr(cls, name, _never_crash(value))
    return cls


@_guard_handlers
class RemoteFsOperations(pyfuse3.Operations):
    """The `pyfuse3.Operations` of a remotefs mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree, engine: RemoteCache | None, block_size: int) -> None:
        """*engine* None serves attributes only (tests of what getattr tells the kernel)."""
        super().__init__()
        self._tree = tree
        self._engine = engine
        #: Keeps files fresh: stale ones are revalidated on open (waiting up to
        #: ``--revalidate-wait``) and in the background when a lookup or getattr sees them.
        self._revalidator = engine.revalidator if engine is not None else None
        self._block_size = block_size
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._mount_time_ns = time.time_ns()
        self._sorted_children: dict[int, list[tuple[str, int]]] = {}
        # Each open handle keeps the file version it opened: when the origin's file changes,
        # its path gets a new node and old handles keep failing instead of mixing.
        self._handles: dict[int, Handle] = {}
        self._next_handle = 1
        #: The control socket's path, once the daemon listens on it (root xattr).
        self.control_path: str | None = None

    # -- attributes --------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self._tree.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.InodeT(node.inode)
        attrs.st_uid = self._uid
        attrs.st_gid = self._gid
        attrs.st_blksize = self._block_size
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        if isinstance(node, FileNode):
            cached = node.cached
            attrs.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
            attrs.st_nlink = 1
            attrs.st_size = cached.size
            # st_blocks counts what is cached, so `du` shows local disk use.
            attrs.st_blocks = (cached.cached_bytes + 511) // 512
            mtime = cached.remote.mtime_ns or self._mount_time_ns
            if cached.retired:
                # The origin changed and this version is on its way out: attributes the
                # kernel kept now would outlive the swap to the new version (stale size).
                attrs.entry_timeout = attrs.attr_timeout = 0
            elif self._revalidator is not None:
                # Never longer than the file stays fresh: the kernel asks again once its
                # lifetime has run out, and that ask starts a revalidation, so `ls -l` shows
                # a new size within one lifetime and a few seconds.
                remaining = self._revalidator.remaining(cached)
                timeout = min(ATTR_TIMEOUT, remaining) if remaining > 0 else STALE_TIMEOUT
                attrs.entry_timeout = attrs.attr_timeout = timeout
        else:
            attrs.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            attrs.st_nlink = 2
            attrs.st_size = 0
            mtime = self._mount_time_ns
        attrs.st_mtime_ns = attrs.st_ctime_ns = attrs.st_atime_ns = mtime
        return attrs

    def _seen(self, node: Node) -> None:
        """A lookup, getattr or listing saw *node*: a stale file is revalidated soon."""
        if self._engine is not None and isinstance(node, FileNode):
            self._engine.seen(node.cached)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        self._seen(node)
        return self._attributes(node)

    async def lookup(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        node = self._tree.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._seen(node)
        return self._attributes(node)

    # -- directories -------------------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self._node(inode)
        if not isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # A fresh sorted snapshot per opendir keeps offsets stable while this handle reads.
        self._sorted_children[inode] = sorted(node.children.items())
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        children = self._sorted_children.get(fh)
        if children is None:
            node = self._node(fh)
            assert isinstance(node, DirNode)
            children = sorted(node.children.items())
        for index in range(start_id, len(children)):
            name, inode = children[index]
            child = self._tree.nodes.get(inode)
            if child is None:
                continue  # removed by a reload since this handle's opendir
            self._seen(child)
            attrs = self._attributes(child)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    # -- files -------------------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise _erofs()
        engine = self._engine
        assert engine is not None
        await engine.ensure_fresh(node.cached)
        if node.cached.retired:
            # The origin serves another version now, under a new inode: ESTALE makes the
            # kernel look the path up again (once) and open that one.
            raise pyfuse3.FUSEError(errno.ESTALE)
        handle = self._next_handle
        self._next_handle += 1
        opened = engine.open(node.cached, opener_pid=ctx.pid, kernel_retries=True)
        self._handles[handle] = opened
        # keep_cache: the kernel page cache stays valid across opens; the bytes cannot change
        # without the daemon noticing, and then the new version gets a new inode. Not for a
        # no-store file: what the origin said not to keep is kept only while it is open.
        keep = not node.cached.remote.freshness.no_store
        info = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(handle), keep_cache=keep)
        # A loop device's backing file: its requests reach the engine as the kernel's own
        # demand, not widened by page cache readahead (`remotefs.formats.hints`).
        info.direct_io = opened.loop
        return info

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        assert self._engine is not None
        try:
            return await self._engine.read(handle, off, size)
        except ReadError as err:
            log.error("read failed: %s", err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as err:
            log.error("%s: local cache error: %s", handle.file.name, err)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and self._engine is not None:
            self._engine.close(handle)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = self._block_size
        data.f_frsize = self._block_size
        data.f_blocks = sum(-(-f.size // self._block_size) for f in self._tree.cached_files())
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = len(self._tree.nodes)
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- extended attributes -----------------------------------------------------------------

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        """Every extended attribute of *node*, computed now (they are a live view)."""
        if isinstance(node, FileNode):
            cached = node.cached
            values = {
                URL_XATTR: redact_url(cached.remote.url).encode(),
                CACHED_BYTES_XATTR: str(cached.cached_bytes).encode(),
                COMPLETE_XATTR: b"1" if cached.complete else b"0",
            }
            if cached.remote.etag:
                values[ETAG_XATTR] = cached.remote.etag.encode()
            if cached.remote.content_type:
                values[CONTENT_TYPE_XATTR] = cached.remote.content_type.encode()
            if self._revalidator is not None:
                values[VALIDATED_XATTR] = validated_text(
                    cached, self._revalidator.lifetime_of(cached)
                ).encode()
            if self._engine is not None:
                values[VERIFIED_XATTR] = self._engine.verifier.state(cached).encode()
            return values
        if node.inode == ROOT_INODE:
            values = {PID_XATTR: str(os.getpid()).encode()}
            if self.control_path is not None:
                values[CONTROL_XATTR] = os.fsencode(self.control_path)
            return values
        return {}

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        if name.startswith((b"security.", b"system.")):
            # No security labels or ACLs here. ENOTSUP (not ENODATA) says so for the whole
            # filesystem: ``ls -l`` then stops asking every file for security.selinux and
            # system.posix_acl_access, which made listing 100,000 files take 200,000
            # requests to this process.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if not name.startswith(b"user.remotefs."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._xattrs(self._node(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> list[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(name) for name in self._xattrs(self._node(inode))]

    # -- everything that would modify the tree: read-only ---------------------------------------

    async def setattr(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def setxattr(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def removexattr(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def mknod(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def symlink(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def link(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def rmdir(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def rename(self, *args: object, **kwargs: object) -> None:
        raise _erofs()

    async def create(
        self, *args: object, **kwargs: object
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _erofs()

    async def write(self, *args: object, **kwargs: object) -> int:
        raise _erofs()

    async def fsync(self, *args: object, **kwargs: object) -> None:
        return None
