"""Where crawl drops come from: a local folder, an S3 prefix, or the sample corpus in the package.

A drop is one file. Its partition key comes from its path inside the location (`drop_key`), its
version from the S3 ETag or the local mtime and size, so a replaced file is seen as new and an
unchanged one never is. Paths that escape the location (`..`, symlinks out of it) are refused.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import io
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import IO, Any

import zstandard

from synth_cpt.partitions import drop_key
from synth_cpt.storage import s3_client, s3_location

PACKAGE_PREFIX = "package://"


@dataclass(frozen=True)
class DropFile:
    key: str
    uri: str
    relative_path: str
    version: str
    size: int
    # when a local file last changed (max of mtime and ctime, ns): a file still being copied keeps
    # changing. 0 where objects appear whole (S3, the packaged sample corpus).
    changed_ns: int = 0

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


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(PurePosixPath(name).name, p) for p in patterns)


def _escapes(relative: str) -> bool:
    parts = PurePosixPath(relative).parts
    return relative.startswith("/") or ".." in parts


class DropSource:
    uri: str

    def list(self, patterns: tuple[str, ...], recursive: bool = True) -> Listing:
        raise NotImplementedError

    def open(self, drop: DropFile) -> IO[bytes]:
        """The file's bytes as stored (still compressed)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def local_path(self, drop: DropFile) -> Iterator[Path]:
        """A seekable local copy (Parquet needs random access)."""
        raise NotImplementedError

    def find(self, key: str, patterns: tuple[str, ...]) -> DropFile:
        for drop in self.list(patterns).drops:
            if drop.key == key:
                return drop
        raise FileNotFoundError(f"no drop file with partition key {key!r} under {self.uri}")


class LocalSource(DropSource):
    def __init__(self, root: str | os.PathLike, uri: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = uri or str(self.root)

    def list(self, patterns: tuple[str, ...], recursive: bool = True) -> Listing:
        if not self.root.is_dir():
            raise FileNotFoundError(f"drops location {self.uri} is not a folder")
        real_root = self.root.resolve()
        drops: list[DropFile] = []
        refused: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            if not recursive:
                dirnames.clear()
            for d in list(dirnames):
                if Path(dirpath, d).is_symlink():
                    refused.append(f"{Path(dirpath, d)}: symlinked folder refused (drops must live in {self.uri})")
                    dirnames.remove(d)
            for name in sorted(filenames):
                path = Path(dirpath, name)
                relative = path.relative_to(self.root).as_posix()
                if name.startswith(".") or not _matches(name, patterns):
                    continue
                if path.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(real_root):
                        refused.append(f"{relative}: symlink to {target} escapes the drops folder {self.uri}; refused")
                        continue
                if _escapes(relative):
                    refused.append(f"{relative}: path escapes the drops folder; refused")
                    continue
                st = path.stat()
                drops.append(
                    DropFile(
                        key=drop_key(relative),
                        uri=str(path),
                        relative_path=relative,
                        version=f"mtime{st.st_mtime_ns}-size{st.st_size}",
                        size=st.st_size,
                        changed_ns=0 if self.uri.startswith(PACKAGE_PREFIX) else max(st.st_mtime_ns, st.st_ctime_ns),
                    )
                )
        return Listing(drops, refused)

    def open(self, drop: DropFile) -> IO[bytes]:
        return open(self.root / drop.relative_path, "rb")

    @contextlib.contextmanager
    def local_path(self, drop: DropFile) -> Iterator[Path]:
        yield self.root / drop.relative_path


class S3Source(DropSource):
    def __init__(self, uri: str, client: Any | None = None) -> None:
        self.bucket, self.prefix = s3_location(uri, "drops location")
        self.uri = uri.rstrip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def list(self, patterns: tuple[str, ...], recursive: bool = True) -> Listing:
        from dagster_aws.s3.sensor import get_objects

        prefix = f"{self.prefix}/" if self.prefix else ""
        drops: list[DropFile] = []
        refused: list[str] = []
        for obj in get_objects(bucket=self.bucket, prefix=prefix, client=self.client):
            key = obj["Key"]
            relative = key[len(prefix) :]
            if not relative or relative.endswith("/") or not _matches(relative, patterns):
                continue
            if not recursive and "/" in relative:
                continue
            if _escapes(relative):
                refused.append(f"s3://{self.bucket}/{key}: path escapes the drops prefix; refused")
                continue
            drops.append(
                DropFile(
                    key=drop_key(relative),
                    uri=f"s3://{self.bucket}/{key}",
                    relative_path=relative,
                    version=f"etag{str(obj.get('ETag', '')).strip(chr(34))}",
                    size=int(obj.get("Size", 0)),
                )
            )
        drops.sort(key=lambda d: d.relative_path)
        return Listing(drops, refused)

    def _key(self, drop: DropFile) -> str:
        return f"{self.prefix}/{drop.relative_path}" if self.prefix else drop.relative_path

    def open(self, drop: DropFile) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(drop))["Body"]

    @contextlib.contextmanager
    def local_path(self, drop: DropFile) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="synth-cpt-drop-") as d:
            path = Path(d, PurePosixPath(drop.relative_path).name)
            self.client.download_file(self.bucket, self._key(drop), str(path))
            yield path


def open_source(uri: str) -> DropSource:
    """The drop source for a location URI: `s3://bucket/prefix`, `package://pkg/folder` or a path."""
    if uri.startswith("s3://"):
        return S3Source(uri)
    if uri.startswith(PACKAGE_PREFIX):
        package, _, folder = uri.removeprefix(PACKAGE_PREFIX).partition("/")
        root = resources.files(package).joinpath(folder)
        return LocalSource(str(root), uri=uri)
    if "://" in uri:
        raise ValueError(f"drops location {uri!r}: use a local folder, s3://bucket/prefix or package://")
    return LocalSource(uri)


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

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.damage: str | None = None
        self.newlines = 0

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
            return 0
        n = len(data)
        b[:n] = data
        self.newlines += data.count(b"\n")
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.close()
        super().close()


def decompressed(raw: IO[bytes], fmt: str) -> tuple[IO[bytes], GuardedStream]:
    """A buffered, decompressing reader for a JSONL drop, and its guard (which says whether and where
    the stream broke)."""
    if fmt == "jsonl.gz":
        inner: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    elif fmt == "jsonl.zst":
        inner = ZstdFrames(raw)
    else:
        inner = raw
    guard = GuardedStream(inner)
    return io.BufferedReader(guard, buffer_size=1 << 20), guard
