"""How big the kernel's page-cache folios of a file are: the evidence behind warm re-reads.

A warm re-read is the kernel copying pages out of its page cache; the daemon is not
involved. Its cost per byte depends on the folio size: each folio is looked up and copied
separately. ext4 keeps large folios (up to 2 MiB); a FUSE file's folios are single 4 KiB
pages on kernels without FUSE large-folio support. This module maps the first part of a
file, then reads each page's flags from /proc/kpageflags (root only) to measure them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

PAGE = mmap.PAGESIZE
#: /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
_COMPOUND_TAIL = 1 << 16
_PFN_MASK = (1 << 55) - 1


def mean_folio_kib(path: Path) -> float | None:
    """Mean size in KiB of the folios holding the first 64 MiB of *path*, or ``None``.

    Measured in a child process: a mapped page that a FUSE filesystem fails to supply kills
    the reader with SIGBUS (httpfs2 does that), and the benchmark must go on.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.folios", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0 or done.stdout.strip() in ("", "None"):
        return None
    return float(done.stdout)


def measure(path: Path, length: int = 64 * 1024 * 1024) -> float | None:
    """Mean size in KiB of the folios holding the first *length* bytes of *path*.

    Weighted by bytes (the folio an average byte lives in). ``None`` when the page flags
    cannot be read (not root, or no /proc/kpageflags). The pages should be cached already.
    """
    length = min(length, path.stat().st_size) // PAGE * PAGE
    if length <= 0 or not os.access("/proc/kpageflags", os.R_OK):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        # A private writable mapping lets ctypes give its address; reading never copies.
        mapped = mmap.mmap(
            fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(fd)
    anchor = ctypes.c_char.from_buffer(mapped)
    try:
        return _mean_folio_kib(ctypes.addressof(anchor), mapped, length)
    finally:
        del anchor
        mapped.close()


def _mean_folio_kib(address: int, mapped: mmap.mmap, length: int) -> float | None:
    folios: list[int] = []
    # Unbuffered: a buffered read would take entries of pages not yet faulted in.
    pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115
    flags = open("/proc/kpageflags", "rb", buffering=0)  # noqa: SIM115
    with pagemap, flags:
        for page in range(length // PAGE):
            _ = mapped[page * PAGE]  # map the cached page
            pagemap.seek((address // PAGE + page) * 8)
            pfn = struct.unpack("Q", pagemap.read(8))[0] & _PFN_MASK
            if not pfn:
                return None  # PFNs are hidden without CAP_SYS_ADMIN
            flags.seek(pfn * 8)
            if struct.unpack("Q", flags.read(8))[0] & _COMPOUND_TAIL and folios:
                folios[-1] += 1
            else:
                folios.append(1)
    return sum(size * size for size in folios) / sum(folios) * PAGE / 1024


if __name__ == "__main__":
    print(measure(Path(sys.argv[1])))
