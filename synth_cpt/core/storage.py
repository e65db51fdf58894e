"""The one file layer: a local folder, an S3 prefix or a folder inside the package, read and written
by relative keys. Assets write through it, and crawl drops are read through it.

Why atomic writes: a reader (a downstream asset, DuckDB, a person) must never see half a file.
Locally a file is written beside its target and renamed; on S3 an object appears only when its single
PUT (or multipart upload) completes. Why versions in listings: a replaced input must be seen as new
and an unchanged one never (local mtime and size, S3 ETag).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import IO, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


def utc_stamp(at: datetime | None = None) -> str:
    """UTC time (now, or `at`) to the microsecond, in a form that sorts as it reads: the head of every
    name that must order by creation (cache segments, drop versions, rejected candidates)."""
    return (at or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%f")


PACKAGE_PREFIX = "package://"
# errors only a write gets: raised while a candidate is written, they become a StorageWriteError
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM}  # a write error only when it names the candidate (a read may get them too)


@dataclass(frozen=True)
class FileInfo:
    key: str  # relative to the root
    uri: str
    size: int
    version: str  # changes whenever the content may have: S3 ETag, local mtime and size
    # when a local file last changed (max of mtime and ctime, ns): a file still being copied keeps
    # changing. 0 where files appear whole (S3, the package).
    changed_ns: int = 0
    modified_ns: int = 0  # when the content was last written (S3 LastModified, local mtime); 0 where unknown (the package)


@dataclass(frozen=True)
class FileListing:
    files: list[FileInfo]
    refused: list[str]  # one human-readable line per path refused (symlinks or paths escaping the root)


def unsafe_path(relative: str) -> str | None:
    """Why a path inside a root may not be read, or None when it is safe. A drop location is written by
    others: a name must stay inside it on every backend (S3 keys are literal, but a `..` segment or a
    doubled slash is normalized away by some HTTP stacks and by every local copy of the file), and a NUL
    byte or a control character truncates or garbles the name in a C API, a log line or a shell."""
    if "\x00" in relative:
        return "name contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in relative):
        return "name contains a control character"
    if relative.startswith("/"):
        return "absolute path"
    parts = relative.split("/")
    if ".." in parts:
        return "'..' segment climbs out of the location"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' segment (the name is not in its one normal form)"
    return None


def candidate_name(name: str) -> str:
    """Where `name` is written before its atomic rename: hidden, and ending in `.tmp`, so a candidate left by a
    killed process matches no reader's glob (`**/*.parquet` in DuckDB matches hidden files too)."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def is_candidate(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


_S3_MISSING = ("404", "NoSuchKey", "NotFound")


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


class StorageWriteError(OSError):
    """A write under a root failed (disk full, read-only file system, access denied, bucket missing).
    Raised with the target and the errno's meaning in one sentence, so a failed asset says what to fix;
    the candidate was removed, so nothing half written is there and what readers saw is unchanged."""


def _write_failed(target: str, exc: BaseException) -> StorageWriteError:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        meaning = f"{os.strerror(code)} ({errno.errorcode[code]})"
    else:  # S3: the service's error code and message
        error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
        meaning = f"{error.get('Message') or exc} ({error.get('Code') or type(exc).__name__})"
    return StorageWriteError(
        code if isinstance(code, int) else errno.EIO,
        f"could not write {target}: {meaning}; nothing was published there, the previous version is unchanged",
    )


def _candidate_write_failed(exc: OSError, candidate: Path) -> bool:
    """Whether an error raised while a candidate was written is that write's: a full disk or read-only mount that
    names no file or the candidate, or access denied to the candidate. One naming another file (a full disk
    elsewhere, an input the body could not read) is the body's own and stays what it is."""
    names_candidate = exc.filename == str(candidate)
    if exc.errno in _FULL_OR_READ_ONLY:
        return exc.filename is None or names_candidate
    return exc.errno in _DENIED and names_candidate


def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage:
    """Files under one root, addressed by relative keys such as `raw_corpus/pt/high/part-0.parquet`."""

    root: str

    def uri(self, *parts: str) -> str:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> str:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""
        raise NotImplementedError

    def files(self, prefix: str = "", recursive: bool = True, patterns: tuple[str, ...] = ()) -> FileListing:
        """Files under `prefix` with their size and version, sorted by key; what may not be read is refused.
        With `patterns`, only files whose name matches one are listed, and only they can be refused: a
        file nobody asked for is skipped, not reported."""
        raise NotImplementedError

    def open(self, key: str) -> IO[bytes]:
        """A forward-only stream of the file's bytes (no local copy)."""
        raise NotImplementedError

    def candidates(self, prefix: str = "") -> list[FileInfo]:
        """Candidate files (`.<name>.<id>.tmp`) under `prefix` that a killed write left behind: listings hide
        them, so only this finds them. An object store has none (a PUT is whole or absent)."""
        return []

    def delete_prefix(self, prefix: str) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """A local file with the key's content, for libraries that only open paths."""
        raise NotImplementedError

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        """Yields a temporary local path; on clean exit it becomes `key` atomically."""
        raise NotImplementedError

    def parquet_file(self, key: str) -> pq.ParquetFile:
        """A Parquet file opened for ranged reads: only the footer and the column chunks asked for are
        fetched (on S3 through pyarrow's filesystem, never a whole download). FileNotFoundError if gone."""
        raise NotImplementedError

    def vanished(self, key: str, exc: BaseException) -> bool:
        """Whether an error reading `key` means the file is gone (deleted meanwhile), not a failure."""
        return isinstance(exc, FileNotFoundError) or (isinstance(exc, OSError) and not self.exists(key))

    # -- helpers shared by both backends ---------------------------------------------------------
    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_parquet(self, key: str, frame: pl.DataFrame | pa.Table) -> str:
        table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
        with self.writing(key) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return self.uri(key)

    def copy(self, source: str, target: str) -> None:
        """Copy one file under the root (server-side on S3), atomically at the target."""
        with self.local_path(source) as path, self.writing(target) as tmp:
            shutil.copyfile(path, tmp)

    def read_parquet(self, key: str, columns: list[str] | None = None, n_rows: int | None = None) -> pl.DataFrame:
        with self.local_path(key) as path:
            return pl.read_parquet(path, columns=columns, n_rows=n_rows)

    @contextlib.contextmanager
    def parquet_writer(self, key: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream record batches into one Parquet file that appears only when complete."""
        with self.writing(key) as tmp:
            writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            try:
                yield writer
            finally:
                writer.close()


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike, label: str | None = None) -> None:
        self.root = str(Path(root).expanduser().resolve())
        self.label = label  # how the root is named to people (package://...), when not its path

    def path(self, key: str) -> Path:
        return Path(self.root, key)

    def uri(self, *parts: str) -> str:
        return str(Path(self.root, _join(*parts)))

    def write_bytes(self, key: str, data: bytes) -> str:
        with self.writing(key) as tmp:
            tmp.write_bytes(data)
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not is_candidate(p.name))

    def files(self, prefix: str = "", recursive: bool = True, patterns: tuple[str, ...] = ()) -> FileListing:
        base = self.path(prefix)
        if not base.is_dir():
            raise FileNotFoundError(f"{self.label or self.uri(prefix)} is not a folder")
        real_root = Path(self.root).resolve()
        found: list[FileInfo] = []
        refused: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames.sort()
            if not recursive:
                dirnames.clear()
            for d in list(dirnames):
                if Path(dirpath, d).is_symlink():
                    refused.append(f"{Path(dirpath, d)}: symlinked folder refused (files must live in {self.label or self.root})")
                    dirnames.remove(d)
            for name in sorted(filenames):
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if name.startswith(".") or not _wanted(name, patterns):
                    continue
                if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                    refused.append(f"{key}: symlink to {path.resolve()} escapes {self.label or self.root}; refused")
                    continue
                why = unsafe_path(key)
                if why is not None:
                    refused.append(f"{key!r}: {why}; refused")
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # a dangling symlink, or deleted since the walk
                    refused.append(f"{key}: symlink to a missing file; refused" if path.is_symlink() else f"{key}: vanished while listed")
                    continue
                changed = 0 if self.label and self.label.startswith(PACKAGE_PREFIX) else max(st.st_mtime_ns, st.st_ctime_ns)
                modified = 0 if self.label and self.label.startswith(PACKAGE_PREFIX) else st.st_mtime_ns
                found.append(FileInfo(key, str(path), st.st_size, f"mtime{st.st_mtime_ns}-size{st.st_size}", changed, modified))
        found.sort(key=lambda f: f.key)  # as documented (the walk yields a folder's files before its subfolders')
        return FileListing(found, refused)

    def candidates(self, prefix: str = "") -> list[FileInfo]:
        base = self.path(prefix)
        found = []
        for dirpath, _, filenames in os.walk(base, followlinks=False):
            for name in filenames:
                if is_candidate(name):
                    path = Path(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):  # renamed into place or removed meanwhile
                        st = path.lstat()
                        key = path.relative_to(self.root).as_posix()
                        found.append(FileInfo(key, str(path), st.st_size, f"mtime{st.st_mtime_ns}", st.st_mtime_ns, st.st_mtime_ns))
        return sorted(found, key=lambda f: f.key)

    def _readable(self, key: str) -> Path:
        """The path of `key`, refused (PermissionError, never opened) when its name is unsafe or it resolves
        outside the root: a file swapped for a symlink after listing, or a key nobody listed."""
        why = unsafe_path(key)
        path = self.path(key)
        if why is None and not path.resolve().is_relative_to(Path(self.root).resolve()):
            why = f"resolves to {path.resolve()}, outside {self.label or self.root}"
        if why is not None:
            raise PermissionError(errno.EACCES, f"{key!r}: {why}; refused")
        return path

    def open(self, key: str) -> IO[bytes]:
        """The file, checked again once open: a file swapped for a symlink out of the root between the name check
        and the open (a drop folder others write to) is refused by what was actually opened."""
        f = open(self._readable(key), "rb")
        try:
            opened = Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        except OSError:  # no /proc: the check by name above is all there is
            return f
        if not opened.is_relative_to(Path(self.root).resolve()):
            f.close()
            raise PermissionError(errno.EACCES, f"{key!r}: opened {opened}, outside {self.label or self.root}; refused")
        return f

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._readable(key)
        if not path.exists():
            raise FileNotFoundError(f"{self.uri(key)} does not exist")
        yield path

    def parquet_file(self, key: str) -> pq.ParquetFile:
        return pq.ParquetFile(str(self.path(key)))  # FileNotFoundError when the file is gone

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_failed(str(target), exc) from exc
        tmp = target.with_name(candidate_name(target.name))
        try:
            try:
                yield tmp
            except StorageWriteError:
                raise
            except OSError as exc:
                # the body's writes to `tmp` (a full disk, a read-only mount) say which target, once; a
                # failed read in the body (a refused drop, a missing input) stays what it is
                if _candidate_write_failed(exc, tmp):
                    raise _write_failed(str(target), exc) from exc
                raise
            try:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                raise _write_failed(str(target), exc) from exc
        finally:
            with contextlib.suppress(OSError):  # a read-only mount cannot unlink; the rename never happened
                tmp.unlink(missing_ok=True)


def s3_location(uri: str, what: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of an `s3://bucket/prefix` URI."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{what} {uri!r} has no bucket")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    """A plain boto3 S3 client (credentials from the AWS chain, AWS_ENDPOINT_URL honoured). Dagster code
    hands in the client of its dagster-aws `S3Resource` instead (defs/resources.py)."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))


class S3Storage(Storage):
    """An `s3://bucket/prefix` root; Dagster code hands in its dagster-aws S3Resource client."""

    def __init__(self, root: str, client: Any | None = None) -> None:
        self.bucket, self.prefix = s3_location(root, "storage root")
        self.root = root.rstrip("/")
        self._client = client
        self._fs: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{_join(self.prefix, *parts)}"

    def _safe_key(self, key: str) -> str:
        """The object key of `key`, refused (never requested) when the name is unsafe: some HTTP stacks
        normalize `..` and doubled slashes away, so such a key could name an object outside the prefix."""
        why = unsafe_path(key)
        if why is not None:
            raise PermissionError(errno.EACCES, f"{key!r}: {why}; refused")
        return self._key(key)

    def write_bytes(self, key: str, data: bytes) -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:  # botocore ClientError, connection errors
            raise _write_failed(self.uri(key), exc) from exc
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._safe_key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:  # botocore ClientError 404
            if _s3_code(exc) in _S3_MISSING:
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/" if self._key(prefix) else ""  # the bucket's root lists everything
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                keys.append(obj["Key"][len(self.prefix) + 1 :] if self.prefix else obj["Key"])
        return sorted(keys)

    def files(self, prefix: str = "", recursive: bool = True, patterns: tuple[str, ...] = ()) -> FileListing:
        base = _join(self.prefix, prefix)
        start = f"{base}/" if base else ""
        found: list[FileInfo] = []
        refused: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                inner = obj["Key"][len(start) :]
                if not inner or inner.endswith("/") or (not recursive and "/" in inner) or not _wanted(PurePosixPath(inner).name, patterns):
                    continue
                why = unsafe_path(inner)
                if why is not None:
                    refused.append(f"s3://{self.bucket}/{obj['Key']!r}: {why} (under {self.uri(prefix)}); refused")
                    continue
                key = _join(prefix, inner)
                etag = str(obj.get("ETag", "")).strip('"')
                stamp = obj.get("LastModified")
                modified = int(stamp.timestamp() * 1e9) if stamp is not None else 0
                found.append(FileInfo(key, self.uri(key), int(obj.get("Size", 0)), f"etag{etag}", modified_ns=modified))
        found.sort(key=lambda f: f.key)
        return FileListing(found, refused)

    def open(self, key: str) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=self._safe_key(key))["Body"]

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def copy(self, source: str, target: str) -> None:
        try:
            self.client.copy({"Bucket": self.bucket, "Key": self._key(source)}, self.bucket, self._key(target))
        except Exception as exc:
            # the source is missing (the copy reads it first): not a failed write, unless the bucket itself is (S3 says 404 to both)
            if _s3_code(exc) in _S3_MISSING and self._bucket_exists():
                raise FileNotFoundError(errno.ENOENT, f"{self.uri(source)} does not exist (copying it to {self.uri(target)})") from exc
            raise _write_failed(self.uri(target), exc) from exc

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:  # noqa: BLE001 - missing, forbidden or unreachable: not a missing source either way
            return False

    @property
    def filesystem(self) -> Any:
        """pyarrow's S3 filesystem (credentials from the AWS chain, AWS_ENDPOINT_URL honoured)."""
        if self._fs is None:
            from pyarrow import fs

            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            kwargs: dict[str, Any] = {"region": region} if region else {}  # else pyarrow resolves it like the AWS chain
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            self._fs = fs.S3FileSystem(**kwargs)
        return self._fs

    def read_parquet(self, key: str, columns: list[str] | None = None, n_rows: int | None = None) -> pl.DataFrame:
        """Ranged reads: the footer and the column chunks asked for (and with `n_rows`, only the row groups
        that hold them), never a download of the whole object."""
        with contextlib.closing(self.parquet_file(key)) as pf:
            if n_rows is None:
                table = pf.read(columns=columns)
            else:
                groups, rows = [], 0
                for g in range(pf.num_row_groups):
                    if rows >= n_rows:
                        break
                    groups.append(g)
                    rows += pf.metadata.row_group(g).num_rows
                table = pf.read_row_groups(groups, columns=columns) if groups else pf.schema_arrow.empty_table()
                if columns is not None and not groups:
                    table = table.select(columns)
                table = table.slice(0, n_rows)
        return pl.from_arrow(table)  # type: ignore[return-value]

    def parquet_file(self, key: str) -> pq.ParquetFile:
        path = f"{self.bucket}/{self._key(key)}"
        try:
            # opened by pyarrow through the filesystem, so the ParquetFile owns the stream and close() closes it
            return pq.ParquetFile(path, filesystem=self.filesystem)
        except FileNotFoundError:
            raise
        except OSError:
            # never guess from the message (keys may contain "404"): a throttled or failed request is
            # not a missing file, and callers delete what they think is gone
            if not self.exists(key):
                raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
            raise

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="synth-cpt-") as d:
            path = Path(d, Path(key).name)
            self.client.download_file(self.bucket, self._safe_key(key), str(path))
            yield path

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="synth-cpt-") as d:
            path = Path(d, Path(key).name)
            try:
                yield path
            except StorageWriteError:
                raise
            except OSError as exc:  # the local staging file (TMPDIR) is full or read-only: nothing was uploaded
                if _candidate_write_failed(exc, path):
                    raise _write_failed(f"{self.uri(key)} (staged in {d})", exc) from exc
                raise
            try:
                self.client.upload_file(str(path), self.bucket, self._key(key))
            except Exception as exc:  # boto3 S3UploadFailedError, ClientError, connection errors
                raise _write_failed(self.uri(key), exc) from exc


def open_storage(root: str, s3: Any | None = None) -> Storage:
    """The storage for a root URI: `s3://bucket/prefix` (through the client `s3` when given), a local
    folder, or `package://package/folder` (read-only data shipped inside a package)."""
    if root.startswith("s3://"):
        return S3Storage(root, client=s3)
    if root.startswith(PACKAGE_PREFIX):
        package, _, folder = root.removeprefix(PACKAGE_PREFIX).partition("/")
        return LocalStorage(str(resources.files(package).joinpath(folder)), label=root)
    if "://" in root:
        raise ValueError(f"{root!r}: use a local folder, s3://bucket/prefix or package://package/folder")
    return LocalStorage(root)
