"""Crawl drops in their location (any storage: a local folder, an S3 prefix, the packaged sample) and
the decompressing readers that survive damaged files.

A drop is one file. Its partition key comes from its path inside the location (`drop_key`), its
version from the storage listing, so a replaced file is seen as new and an unchanged one never is.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from synth_cpt.core.layout import drop_key
from synth_cpt.core.storage import Storage


@dataclass(frozen=True)
class DropFile:
    key: str  # the partition key (drop id), from the path inside the location
    uri: str
    relative_path: str  # the file's key in the location's storage
    version: str
    size: int
    changed_ns: int = 0  # see FileInfo.changed_ns

    @property
    def format(self) -> str:
        return drop_format(self.relative_path)


def drop_format(name: str) -> str:
    lower = name.lower()
    for suffix, fmt in ((".jsonl.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".parquet", "parquet")):
        if lower.endswith(suffix):
            return fmt
    raise ValueError(f"{name}: unknown drop format (expected .jsonl, .jsonl.gz, .jsonl.zst or .parquet)")


@dataclass(frozen=True)
class Listing:
    drops: list[DropFile]
    refused: list[str]  # one human-readable line per refused path


def list_drops(location: Storage, patterns: tuple[str, ...], recursive: bool = True) -> Listing:
    """The drop files of a location (a storage opened on the drops folder) that match `patterns`."""
    listing = location.files("", recursive=recursive, patterns=patterns)  # matched first: only drops are refused
    drops = [DropFile(drop_key(f.key), f.uri, f.key, f.version, f.size, f.changed_ns) for f in listing.files]
    return Listing(drops, listing.refused)


def find_drop(location: Storage, key: str, patterns: tuple[str, ...]) -> DropFile:
    for drop in list_drops(location, patterns).drops:
        if drop.key == key:
            return drop
    raise FileNotFoundError(f"no drop file with partition key {key!r} under {getattr(location, 'label', None) or location.uri()}")


class CountingReader(io.RawIOBase):
    """Counts the stored bytes consumed, so progress and ETA can be reported on compressed input."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()
        super().close()


class TruncatedStream(Exception):
    """The compressed stream ended inside a frame: the file was cut short."""


class ZstdFrames(io.RawIOBase):
    """Zstandard frames decoded one small input chunk at a time, so a file that ends inside a frame is
    noticed (the library's stream reader ends quietly there). Small chunks bound what one read can
    expand to."""

    CHUNK = 1 << 14

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.decompressor = zstandard.ZstdDecompressor()
        self.obj = self.decompressor.decompressobj()
        self.pending = b""
        self.pos = 0  # read offset into pending: handing out a slice never copies the rest
        self.in_frame = False
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self.pos >= len(self.pending):
            if self.done:
                return 0
            chunk = self.raw.read(self.CHUNK)
            if not chunk:
                self.done = True
                if self.in_frame:
                    raise TruncatedStream("the file ends inside a zstd frame")
                return 0
            self.pending, self.pos = b"", 0
            self._feed(chunk)
        n = min(len(b), len(self.pending) - self.pos)
        b[:n] = memoryview(self.pending)[self.pos : self.pos + n]
        self.pos += n
        return n

    def _feed(self, data: bytes) -> None:
        out = []
        while data:
            out.append(self.obj.decompress(data))
            self.in_frame = True
            if not self.obj.eof:
                break
            data = self.obj.unused_data  # the next frame starts in this chunk
            self.obj = self.decompressor.decompressobj()
            self.in_frame = False
        self.pending += b"".join(out)


DAMAGE = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError, TruncatedStream)


class GuardedStream(io.RawIOBase):
    """A decompressing stream whose damage (a cut-off file, bad magic, corrupt data) ends the stream
    with a note instead of an exception, so every record before the break is kept and the break is
    recorded. I/O errors of the storage itself still raise: they are not the file's fault."""

    def __init__(self, inner: IO[bytes], compression: str | None = None) -> None:
        self.inner = inner
        self.compression = compression  # "gzip", "zstd" or None (plain)
        self.damage: str | None = None
        self.newlines = 0
        self.produced = 0  # decompressed bytes handed out

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.damage is not None:
            return 0
        try:
            # read1: one underlying read at a time, so data decoded before a break is handed out
            # before the break is raised (a buffered read(n) would drop it with the exception)
            read = getattr(self.inner, "read1", None) or self.inner.read
            data = read(len(b))
        except DAMAGE as exc:
            self.damage = f"{type(exc).__name__}: {exc}"
            if not self.produced and _not_compressed(exc):  # the first bytes already fail: it never was this format
                self.damage = f"not {self.compression}-compressed data: {exc}"
            return 0
        n = len(data)
        b[:n] = data
        self.newlines += data.count(b"\n")
        self.produced += n
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.close()
        super().close()


def _not_compressed(exc: BaseException) -> bool:
    """The decompressor's word for "these bytes do not start a stream of mine" (bad magic)."""
    if isinstance(exc, gzip.BadGzipFile):
        return str(exc).startswith("Not a gzipped file")
    return isinstance(exc, zstandard.ZstdError) and "Unknown frame descriptor" in str(exc)


def decompressed(raw: IO[bytes], fmt: str) -> tuple[IO[bytes], GuardedStream]:
    """A buffered, decompressing reader for a JSONL drop, and its guard (which says whether and where
    the stream broke)."""
    if fmt == "jsonl.gz":
        inner: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
        compression: str | None = "gzip"
    elif fmt == "jsonl.zst":
        inner, compression = ZstdFrames(raw), "zstd"
    else:
        inner, compression = raw, None
    guard = GuardedStream(inner, compression)
    return io.BufferedReader(guard, buffer_size=1 << 20), guard
