"""On-disk encodings of a cached file's metadata and block bitmap, each self-checking.

Both files start with a magic, a format version, the payload length and a CRC32 of the
payload. A truncated or corrupted file is detected on load and reported as `CorruptStateError`
so the caller can reset that one file's cache instead of trusting garbage or refusing to mount.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroaring import BitMap

from ..http.source import RemoteMeta
from .atomic import atomic_write

_HEADER = struct.Struct("<4sHQI")  # magic, version, payload length, crc32
_META_MAGIC = b"RFSM"
_BITMAP_MAGIC = b"RFSB"
_VERSION = 1


class CorruptStateError(Exception):
    """A state file is truncated, has a bad checksum, or cannot be decoded."""


@dataclass(frozen=True)
class CacheMeta:
    """The metadata file: which remote version the data file holds, and in what block size."""

    url: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None
    accepts_ranges: bool
    block_size: int
    complete: bool = False

    @classmethod
    def from_remote(cls, remote: RemoteMeta, block_size: int) -> CacheMeta:
        """Start the metadata of a fresh cache entry from a probe result."""
        return cls(
            url=remote.url,
            size=remote.size,
            etag=remote.etag,
            last_modified=remote.last_modified,
            content_type=remote.content_type,
            accepts_ranges=remote.accepts_ranges,
            block_size=block_size,
        )

    def remote(self) -> RemoteMeta:
        """The remote version this cache entry holds bytes of."""
        return RemoteMeta(
            url=self.url,
            size=self.size,
            etag=self.etag,
            last_modified=self.last_modified,
            content_type=self.content_type,
            accepts_ranges=self.accepts_ranges,
        )


def _frame(magic: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(magic, _VERSION, len(payload), zlib.crc32(payload)) + payload


def _unframe(magic: bytes, data: bytes, what: Path) -> bytes:
    if len(data) < _HEADER.size:
        raise CorruptStateError(f"{what}: truncated ({len(data)} bytes)")
    got_magic, version, length, crc = _HEADER.unpack_from(data)
    payload = data[_HEADER.size :]
    if got_magic != magic or version != _VERSION:
        raise CorruptStateError(f"{what}: not a remotefs state file of version {_VERSION}")
    if len(payload) != length:
        raise CorruptStateError(f"{what}: length {len(payload)}, header says {length}")
    if zlib.crc32(payload) != crc:
        raise CorruptStateError(f"{what}: checksum mismatch")
    return payload


def save_meta(path: Path, meta: CacheMeta) -> None:
    """Write the metadata file atomically."""
    atomic_write(path, _frame(_META_MAGIC, json.dumps(asdict(meta), sort_keys=True).encode()))


def load_meta(path: Path) -> CacheMeta:
    """Read and verify a metadata file (FileNotFoundError when there is none)."""
    payload = _unframe(_META_MAGIC, path.read_bytes(), path)
    try:
        return CacheMeta(**json.loads(payload))
    except (ValueError, TypeError) as err:
        raise CorruptStateError(f"{path}: cannot decode metadata: {err}") from err


def encode_bitmap(bitmap: BitMap) -> bytes:
    """Serialize a bitmap with its integrity header (done on the trio thread: it is fast)."""
    return _frame(_BITMAP_MAGIC, bitmap.serialize())


def load_bitmap(path: Path) -> BitMap:
    """Read and verify a bitmap file (FileNotFoundError when there is none)."""
    payload = _unframe(_BITMAP_MAGIC, path.read_bytes(), path)
    try:
        return BitMap.deserialize(payload)
    except Exception as err:  # pyroaring raises ValueError or its own errors
        raise CorruptStateError(f"{path}: cannot decode bitmap: {err}") from err
