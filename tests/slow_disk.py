"""A slow disk for tests: a FUSE passthrough of a directory whose writes and fsyncs sleep.

``python -m tests.slow_disk SOURCE MOUNTPOINT --delay 0.05 --counter FILE`` mounts SOURCE at
MOUNTPOINT; every ``write`` and ``fsync`` waits *delay* seconds first (as a disk that is busy
or far away does), and FILE holds the number of delayed writes so far (a test waits on that
event, not on a length of time). ``statfs`` reports 4 TiB free, so a cache on it may hold a
1 TiB file. It stops on SIGTERM or when unmounted.

The kernel's device-mapper ``delay`` target would be the other way to slow a disk down, but not
every kernel the suite runs on has device-mapper (tests/kernel.py); FUSE it always has.
Only what a cache directory needs is implemented: files, directories, renames, truncation.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

TIB = 1 << 40


def _fuse_error(err: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err.errno or errno.EIO)


class SlowPassthrough(pyfuse3.Operations):
    """SOURCE's files, with every write and fsync *delay* seconds late."""

    def __init__(self, source: Path, delay: float, counter: Path) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: str(source)}
        self._delay = delay
        self._counter = counter
        self._writes = 0

    # -- names -------------------------------------------------------------------------------

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attributes(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            info = os.lstat(path)
        except OSError as err:
            raise _fuse_error(err) from None
        inode = pyfuse3.ROOT_INODE if path == self._paths[pyfuse3.ROOT_INODE] else info.st_ino
        self._paths[inode] = path
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
            setattr(entry, name, getattr(info, name))
        entry.st_blksize = 4096
        entry.st_blocks = info.st_blocks
        entry.st_atime_ns = info.st_atime_ns
        entry.st_mtime_ns = info.st_mtime_ns
        entry.st_ctime_ns = info.st_ctime_ns
        return entry

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attributes(self._path(parent_inode))
        return self._attributes(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._path(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode), follow_symlinks=False)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.chown(path, uid, gid, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                info = os.lstat(path)
                atime = attr.st_atime_ns if fields.update_atime else info.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else info.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        except OSError as err:
            raise _fuse_error(err) from None
        return self._attributes(path)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    # -- directories -------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._path(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for index, name in enumerate(names[start_id:], start_id + 1):
            try:
                entry = self._attributes(os.path.join(path, name))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.sleep(self._delay)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as err:
            raise _fuse_error(err) from None
        return self._attributes(path)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """For the daemon's control socket (``bind`` makes its node here)."""
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode, rdev)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as err:
            raise _fuse_error(err) from None
        return self._attributes(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.rmdir(self._child(parent_inode, name))
        except OSError as err:
            raise _fuse_error(err) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.unlink(self._child(parent_inode, name))
        except OSError as err:
            raise _fuse_error(err) from None

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
        except OSError as err:
            raise _fuse_error(err) from None
        for inode, path in list(self._paths.items()):
            if path == old or path.startswith(old + "/"):
                self._paths[inode] = new + path[len(old) :]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    # -- files -------------------------------------------------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT, mode)
            os.fchown(fd, ctx.uid, ctx.gid)
        except OSError as err:
            raise _fuse_error(err) from None
        return pyfuse3.FileInfo(fh=fd), self._attributes(path)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as err:
            raise _fuse_error(err) from None
        return pyfuse3.FileInfo(fh=fd)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await trio.sleep(self._delay)
        written = os.pwrite(fh, buf, off)
        self._writes += 1
        self._counter.write_text(f"{self._writes}\n")
        return written

    async def fsync(self, fh: int, datasync: bool) -> None:
        await trio.sleep(self._delay)
        os.fsync(fh)

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = 8 * TIB // 4096
        data.f_bfree = data.f_bavail = 4 * TIB // 4096
        data.f_files = data.f_ffree = data.f_favail = 1 << 20
        data.f_namemax = 255
        return data


async def _serve(operations: SlowPassthrough, mountpoint: Path) -> None:
    options = set(pyfuse3.default_options)
    options.add("fsname=slowdisk")
    pyfuse3.init(operations, str(mountpoint), options)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_until_unmounted() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

            async def stop_on_signal() -> None:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

            nursery.start_soon(serve_until_unmounted)
            nursery.start_soon(stop_on_signal)
    pyfuse3.close(unmount=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--counter", type=Path, required=True)
    args = parser.parse_args()
    args.counter.write_text("0\n")
    operations = SlowPassthrough(args.source.resolve(), args.delay, args.counter)
    trio.run(_serve, operations, args.mountpoint)


if __name__ == "__main__":
    main()
