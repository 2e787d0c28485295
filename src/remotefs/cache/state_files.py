"""On-disk encodings of a cached file's metadata and block bitmap, each self-checking.

Both files start with a magic, a format version, the payload length and a CRC32 of the
payload. A truncated or corrupted file is detected on load and reported as `CorruptStateError`
so the caller can reset that one file's cache instead of trusting garbage or refusing to mount.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pyroaring import BitMap

from ..http.source import Freshness, RemoteMeta
from ..redact import url_at_rest
from .atomic import atomic_write

_HEADER = struct.Struct("<4sHQI")  # magic, version, payload length, crc32
_META_MAGIC = b"RFSM"
_BITMAP_MAGIC = b"RFSB"
_VERSION = 1


class CorruptStateError(Exception):
    """A state file is truncated, has a bad checksum, or cannot be decoded."""


@dataclass(frozen=True, slots=True)
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
    # How long the origin said this version stays fresh (see `Freshness`).
    max_age: float | None = None
    no_cache: bool = False
    no_store: bool = False
    #: A program read this file (`--fill opened` completes only such files).
    opened: bool = False

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
            max_age=remote.freshness.max_age,
            no_cache=remote.freshness.no_cache,
            no_store=remote.freshness.no_store,
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
            freshness=Freshness(self.max_age, self.no_cache, self.no_store),
        )


def _frame(magic: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(magic, _VERSION, len(payload), zlib.crc32(payload)) + payload


def _unframe(magic: bytes, data: bytes, what: object) -> bytes:
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


def encode_meta(meta: CacheMeta) -> bytes:
    """The metadata file's content: the URL in its at-rest form (`url_at_rest`)."""
    fields = asdict(meta)
    fields["url"] = url_at_rest(meta.url)
    return _frame(_META_MAGIC, json.dumps(fields, sort_keys=True).encode())


def decode_meta(data: bytes, what: object) -> CacheMeta:
    """Verify and decode a metadata file's content (*what* names it in errors).

    Its ``url`` is as stored: the at-rest form (or, from an older version, the whole URL);
    the caller puts the whole URL back (`CacheStore.stored_meta`).
    """
    payload = _unframe(_META_MAGIC, data, what)
    try:
        fields = json.loads(payload)
        meta = CacheMeta(**fields)
    except (ValueError, TypeError) as err:
        raise CorruptStateError(f"{what}: cannot decode metadata: {err}") from err
    if not isinstance(meta.size, int) or meta.size < 0 or not isinstance(meta.block_size, int):
        raise CorruptStateError(f"{what}: impossible size {meta.size!r}")
    return meta


def save_meta(path: Path, meta: CacheMeta) -> None:
    """Write the metadata file at *path* atomically."""
    atomic_write(path, encode_meta(meta))


def load_meta(path: Path) -> CacheMeta:
    """Read and verify a metadata file (FileNotFoundError when there is none)."""
    return decode_meta(path.read_bytes(), path)


def encode_bitmap(bitmap: BitMap) -> bytes:
    """Serialize a bitmap with its integrity header (done on the trio thread: it is fast)."""
    return _frame(_BITMAP_MAGIC, bitmap.serialize())


def decode_bitmap(data: bytes, what: object) -> BitMap:
    """Verify and decode a bitmap file's content (*what* names it in errors)."""
    payload = _unframe(_BITMAP_MAGIC, data, what)
    try:
        return BitMap.deserialize(payload)
    except Exception as err:  # pyroaring raises ValueError or its own errors
        raise CorruptStateError(f"{what}: cannot decode bitmap: {err}") from err


def load_bitmap(path: Path) -> BitMap:
    """Read and verify a bitmap file (FileNotFoundError when there is none)."""
    return decode_bitmap(path.read_bytes(), path)


_CATALOG_MAGIC = b"RFSC"


@dataclass(frozen=True, slots=True)
class CatalogRecord:
    """What the origin last said about one URL, and when (seconds since the epoch)."""

    remote: RemoteMeta
    validated_at: float


class Catalog:
    """The catalog in memory: what the origin said of each URL, keyed by the URL's at-rest form.

    The file holds only at-rest forms (`url_at_rest`: no password, token or signature), so
    records read back are found by the whole URL the manifest gives, and come back with it.
    """

    def __init__(self, records: dict[str, CatalogRecord] | None = None) -> None:
        self._records = records if records is not None else {}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, url: str) -> CatalogRecord | None:
        record = self._records.get(url_at_rest(url))
        if record is None or record.remote.url == url:
            return record
        return CatalogRecord(replace(record.remote, url=url), record.validated_at)

    def set(self, url: str, record: CatalogRecord) -> None:
        self._records[url_at_rest(url)] = record

    def pop(self, url: str) -> CatalogRecord | None:
        return self._records.pop(url_at_rest(url), None)

    def records_for(self, urls: Iterable[str]) -> list[CatalogRecord]:
        """The records of *urls* (each with its whole URL), for saving."""
        found = (self.get(url) for url in urls)
        return [record for record in found if record is not None]


def encode_catalog(records: Iterable[CatalogRecord]) -> bytes:
    """The catalog file's content: one compact JSON row per URL (at rest), checksummed."""
    rows = [
        [
            url_at_rest(r.remote.url),
            r.remote.size,
            r.remote.etag,
            r.remote.last_modified,
            r.remote.content_type,
            r.remote.accepts_ranges,
            round(r.validated_at, 3),
            r.remote.freshness.max_age,
            r.remote.freshness.no_cache,
            r.remote.freshness.no_store,
        ]
        for r in records
    ]
    payload = json.dumps({"rows": rows}, separators=(",", ":")).encode()
    return _frame(_CATALOG_MAGIC, payload)


def decode_catalog(data: bytes, what: object) -> dict[str, CatalogRecord]:
    """Verify and decode a catalog, keyed by each row's URL as stored (its at-rest form, or
    the whole URL from an older version); rows that do not make sense are skipped."""
    payload = _unframe(_CATALOG_MAGIC, data, what)
    try:
        rows = json.loads(payload)["rows"]
    except (ValueError, TypeError, KeyError) as err:
        raise CorruptStateError(f"{what}: cannot decode the catalog: {err}") from err
    records: dict[str, CatalogRecord] = {}
    for row in rows if isinstance(rows, list) else ():
        try:
            url, size, etag, modified, ctype, ranges, validated = row[:7]
            max_age, no_cache, no_store = [*row[7:10], None, False, False][:3]
            if max_age is not None and not isinstance(max_age, int | float):
                max_age = None
            if not isinstance(url, str) or not isinstance(size, int) or size < 0:
                continue
            remote = RemoteMeta(
                url=url,
                size=size,
                etag=etag if isinstance(etag, str) else None,
                last_modified=modified if isinstance(modified, str) else None,
                content_type=ctype if isinstance(ctype, str) else None,
                accepts_ranges=bool(ranges),
                freshness=Freshness(max_age, bool(no_cache), bool(no_store)),
            )
            records[url_at_rest(url) if " sha256:" not in url else url] = CatalogRecord(
                remote, float(validated)
            )
        except (ValueError, TypeError):
            continue
    return records
