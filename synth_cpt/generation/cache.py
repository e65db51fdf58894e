"""The content-addressed generation cache: one Parquet row per LLM call, in small atomic segments.

Why segments: a crash loses at most the rows not yet flushed (one checkpoint), two processes never
write the same file (segment names carry time, host, pid and a random part), and a finished request
is found by id no matter which run, partition or asset made it.

Why scopes and an index: at billions of tokens the cache holds millions of rows in thousands of
segments, and a run must not read all of them to learn what is done. Segments live under the scope
that wrote them (an asset and partition, e.g. `rewrites_easy/pt/high`), and each segment has a small
id-only index file (64-bit id prefixes of its successful rows, nothing else). A lookup reads its own
scope's index first and the other scopes' index only for ids still missing, so cross-scope hits
count (of those it reads the key column alone, and a cache object keeps what it read: index files
never change once written); then it opens only the segments that hold hits, a few at a time, and
reads only the row groups and columns it needs (ranged reads on S3). `request_id` stays the one key;
the scope is a locality hint.

Layout under `<root>/<prefix>/`:
    segments/<scope>/<stamp>-<kind>-<host>-<pid>-<rand>.parquet   rows (DuckDB: segments/**/*.parquet)
    index/<scope>/<same name>.parquet                              key (uint64), segment
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synth_cpt.core.layout import GENERATIONS
from synth_cpt.core.storage import LocalStorage, Storage, utc_stamp
from synth_cpt.generation.requests import ChatRequest, Generation

DEFAULT_SCOPE = "adhoc"
INDEX_FAN_IN = 4  # index files of one tier that a writer merges into one file of the next tier
LOOKUP_RETRIES = 5
NO_SUCCESS = 0  # index key of a segment with no successful row (a real id has it with probability 2^-64)
INDEX_BATCH_FILES = 256  # index files whose keys are matched at once (bounds memory)
INDEX_MEMO_KEYS = 8_000_000  # other scopes' index keys (8 bytes each) a cache object keeps between lookups
READ_THREADS = 8  # files read at once: Parquet decoding releases the GIL, and S3 reads are mostly waiting

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("scope", pa.string()),
        ("model", pa.string()),
        ("model_fingerprint", pa.string()),
        ("engine", pa.string()),
        ("engine_version", pa.string()),
        ("engine_config", pa.string()),
        ("prompt_name", pa.string()),
        ("prompt_sha", pa.string()),
        ("messages", pa.string()),
        ("sampling", pa.string()),
        ("json_schema", pa.string()),
        ("seed", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("attempts", pa.int64()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("rejected", pa.string()),
        ("created_at", pa.string()),
        ("segment", pa.string()),
    ]
)
INDEX_SCHEMA = pa.schema([("key", pa.uint64()), ("segment", pa.string())])
_EMPTY = pl.from_arrow(SCHEMA.empty_table())


def id_key(request_id: str) -> int:
    """The 64-bit prefix of a request id: what the index stores (8 bytes a row instead of 64).

    Two different ids share a prefix with probability ~n*m/2^64 for m asked against n cached
    (1e-9 for 10k against 2M); the rows themselves are always matched on the full id."""
    return int(request_id[:16], 16)


def safe_scope(scope: str | None) -> str:
    """A scope as a relative folder: `rewrites_easy/pt|high` -> `rewrites_easy/pt/high`."""
    parts = [re.sub(r"[^A-Za-z0-9_.=-]+", "_", p.strip()) for p in (scope or "").replace("|", "/").split("/")]
    parts = [p for p in parts if p and p not in (".", "..")]
    return "/".join(parts) or DEFAULT_SCOPE


def _segment_name(kind: str) -> str:
    """Unique across processes and machines; names sort by creation time."""
    return f"{utc_stamp()}-{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


def _basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _threaded(fn: Callable[[Any], Any], items: list[Any], threads: int = READ_THREADS) -> list[Any]:
    """fn over items in a few threads, results in order."""
    if len(items) < 2 or threads < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def _index_tier(key: str) -> int:
    """0 for a segment's own index file, n for a merge whose inputs were at most of tier n-1 (its
    name's kind is `index<n>`; a merge named plain `index`, from before tiers, counts as 0)."""
    kind = _basename(key).split("-")[1] if _basename(key).count("-") >= 2 else ""
    return int(kind[5:]) if kind.startswith("index") and kind[5:].isdigit() else 0


def _earliest_success(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per request if two processes raced: the one in the segment whose name sorts first (names
    start with the time of the flush), the rule the index lookup follows, so `load` and `finished` agree."""
    name = pl.col("segment").str.extract(r"([^/]+)$")
    return rows.sort(name, "created_at").unique(subset="request_id", keep="first", maintain_order=True)


class GenerationCache:
    def __init__(self, storage: Storage, prefix: str = GENERATIONS) -> None:
        self.storage = storage
        self.prefix = prefix.strip("/")
        # Index files never change once written (a merge writes a new one), so the key columns of
        # other scopes' index read by one lookup serve the next (finished_ids, then finished); only
        # files still listed are used, and those no longer listed are dropped.
        self._memo: dict[str, pa.ChunkedArray] = {}
        self._memo_keys = 0
        self._local = isinstance(storage, LocalStorage)
        self._lookups = threading.RLock()  # the runs of a joint engine run look up from their own threads; the memo is shared

    # -- keys ---------------------------------------------------------------------------------------
    def _keys(self, area: str, scope: str | None) -> list[str]:
        base = f"{self.prefix}/{area}" + (f"/{safe_scope(scope)}" if scope is not None else "")
        return [k for k in self.storage.list(base) if k.endswith(".parquet") and not _basename(k).startswith(".")]

    def segment_keys(self, scope: str | None = None) -> list[str]:
        """Every segment, or one scope's."""
        return self._keys("segments", scope)

    def index_keys(self, scope: str | None = None) -> list[str]:
        return self._keys("index", scope)

    def _index_key(self, segment_key: str) -> str:
        rel = segment_key[len(f"{self.prefix}/segments/") :]
        return f"{self.prefix}/index/{rel}"

    def scopes(self) -> list[str]:
        base = f"{self.prefix}/segments/"
        return sorted({k[len(base) :].rsplit("/", 1)[0] for k in self.segment_keys()})

    # -- reading ------------------------------------------------------------------------------------
    def _read(self, key: str, columns: list[str] | None = None) -> pl.DataFrame | None:
        """A whole segment (or some columns); None if it vanished (compacted away meanwhile)."""
        try:
            return pl.from_arrow(self.storage.parquet_file(key).read(columns=columns))
        except OSError as exc:  # gone between listing and reading (compaction): None; anything else raises
            if self.storage.vanished(key, exc):
                return None
            raise

    def load(self, columns: list[str] | None = None, scope: str | None = None) -> pl.DataFrame:
        """Every row of every segment (failures included), oldest first. For tools and tests: a run
        never calls this."""
        frames = [f for f in (self._read(k, columns) for k in self.segment_keys(scope)) if f is not None]
        frame = pl.concat(frames, how="vertical_relaxed") if frames else _EMPTY.select(columns or pl.all())
        order = [c for c in ("created_at", "segment") if c in frame.columns]
        return frame.sort(order) if order else frame

    def _index_hits(
        self, keys: list[str], wanted: pl.Series, seen: set[str], covered: set[str] | None = None
    ) -> tuple[pl.DataFrame, list[str]]:
        """Rows of the given index files whose key is wanted, and the files that vanished meanwhile.
        `covered` collects the segments the files index (to find segments with no index).

        Without `covered` (other scopes' index, read for the few ids still missing) only the key
        column is read, the keys of many files are matched at once, and the segment column is read
        only from the files that hold a hit: most of the cache's index costs 8 bytes a row."""
        empty = pl.from_arrow(INDEX_SCHEMA.empty_table())
        todo = [k for k in dict.fromkeys(keys) if k not in seen]
        seen.update(todo)
        hits, vanished = [], []
        if covered is not None:
            for key in todo:
                frame = self._read(key)
                if frame is None:
                    vanished.append(key)
                    continue
                covered.update(frame["segment"].unique().to_list())
                hit = frame.filter(pl.col("key").is_in(wanted.implode()))
                if hit.height:
                    hits.append(hit)
            return (pl.concat(hits) if hits else empty), vanished
        for start in range(0, len(todo), INDEX_BATCH_FILES):
            batch = todo[start : start + INDEX_BATCH_FILES]
            fresh = [k for k in batch if k not in self._memo]
            # small local files read faster one after the other than through threads; remote ones not
            threads = 1 if self._local else READ_THREADS
            read = dict(zip(fresh, _threaded(self._index_column, fresh, threads), strict=True))
            vanished += [k for k, column in read.items() if column is None]
            files = [k for k in batch if k in self._memo or read.get(k) is not None]
            columns = [self._memo[k] if k in self._memo else read[k] for k in files]
            for key in fresh:
                if read[key] is not None and self._memo_keys + len(read[key]) <= INDEX_MEMO_KEYS:
                    self._memo[key] = read[key]
                    self._memo_keys += len(read[key])
            if not files:
                continue
            lengths = [len(c) for c in columns]
            all_keys = pl.Series(pa.chunked_array([chunk for c in columns for chunk in c.chunks], pa.uint64()))
            rows = all_keys.is_in(wanted.implode()).arg_true()
            if rows.len() == 0:
                continue
            starts = pl.Series(lengths, dtype=pl.Int64).cum_sum() - pl.Series(lengths, dtype=pl.Int64)
            which = starts.search_sorted(rows.cast(pl.Int64), side="right") - 1
            by_file = pl.DataFrame({"file": which, "row": rows.cast(pl.Int64) - starts.gather(which)}).group_by("file").agg("row")
            for file, local in by_file.iter_rows():
                take = pa.array(local, pa.int64())
                segments = self._index_column(files[file], "segment")
                if segments is None:  # merged away between the two reads: its replacement is read instead
                    vanished.append(files[file])
                    continue
                segments = segments.take(take)
                hits.append(pl.from_arrow(pa.table({"key": columns[file].take(take), "segment": segments}, schema=INDEX_SCHEMA)))
        return (pl.concat(hits) if hits else empty), vanished

    def _forget_unlisted(self, listed: set[str]) -> None:
        self._memo = {k: v for k, v in self._memo.items() if k in listed}
        self._memo_keys = sum(len(v) for v in self._memo.values())

    def _index_column(self, key: str, column: str = "key") -> pa.ChunkedArray | None:
        """One column of one index file (None if the file vanished). The column reader is used when
        pyarrow has it: ParquetFile.read's pre-buffering costs ~0.1 ms a file locally, more than a
        small file's keys take to decode, and a lookup reads a few index files of every scope."""
        try:
            pf = self.storage.parquet_file(key)
            reader = getattr(pf, "reader", None)
            if reader is not None and hasattr(reader, "read_column"):
                return pa.chunked_array(reader.read_column(pf.schema_arrow.get_field_index(column)))
            return pf.read(columns=[column]).column(0)
        except OSError as exc:
            if self.storage.vanished(key, exc):
                return None
            raise

    def _unindexed(self, scope: str, wanted_ids: set[str], covered: set[str]) -> pl.DataFrame:
        """Hits in this scope's segments that no index file covers (a crash between the two writes,
        or a writer that is between them right now)."""
        hits = []
        for key in self.segment_keys(scope):
            if key in covered:
                continue
            rows = self._read(key, ["request_id", "error"])
            if rows is None:
                continue
            self._write_index(key, rows)  # repair, so the next lookup is cheap
            ok = rows.filter(pl.col("error").is_null() & pl.col("request_id").is_in(list(wanted_ids)))
            if ok.height:
                keys = [id_key(r) for r in ok["request_id"]]
                hits.append(pl.DataFrame({"key": keys, "segment": [key] * ok.height}, schema={"key": pl.UInt64, "segment": pl.String}))
        return pl.concat(hits) if hits else pl.from_arrow(INDEX_SCHEMA.empty_table())

    def lookup(self, request_ids: Iterable[str], scope: str | None = None, gone: set[str] | None = None) -> dict[str, str]:
        """request_id -> the segment holding its earliest success, for the ids that have one.

        Reads the scope's index, then other scopes' index only for what is still missing. Index files
        that vanish while being read (compaction) are replaced by a fresh listing; segments in `gone`
        (found missing by a reader) are passed over."""
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            return {}
        with self._lookups:
            return self._lookup(ids, scope, gone)

    def _lookup(self, ids: list[str], scope: str | None, gone: set[str] | None) -> dict[str, str]:
        by_key = {id_key(r): r for r in ids}
        own = safe_scope(scope)
        seen: set[str] = set()
        covered: set[str] = set()
        wanted = pl.Series(list(by_key), dtype=pl.UInt64)
        found, vanished = self._index_hits(self.index_keys(own), wanted, seen, covered)
        if vanished:  # the scope's index was compacted while we read it: read the fresh listing
            more, _ = self._index_hits(self.index_keys(own), wanted, seen, covered)
            found = pl.concat([found, more])
        found = pl.concat([found, self._unindexed(own, set(ids), covered)])
        for _ in range(LOOKUP_RETRIES):
            missing = wanted.filter(~wanted.is_in(found["key"].implode()))
            if missing.len() == 0:
                break
            listed = self.index_keys()
            self._forget_unlisted(set(listed))
            more, vanished = self._index_hits(listed, missing, seen)
            found = pl.concat([found, more])
            if not vanished:
                break
        if gone:
            found = found.filter(~pl.col("segment").is_in(list(gone)))
        if found.height == 0:
            return {}
        found = found.with_columns(pl.col("segment").str.extract(r"([^/]+)$").alias("_name"))
        earliest = found.sort("_name").unique(subset="key", keep="first", maintain_order=True)
        return {by_key[k]: seg for k, seg in zip(earliest["key"].to_list(), earliest["segment"].to_list(), strict=True)}

    def finished_ids(self, request_ids: Iterable[str] | None = None, scope: str | None = None) -> set[str]:
        """The ids (of those asked, or all) that have a result."""
        if request_ids is None:
            rows = self.load(["request_id", "error"])
            return set(rows.filter(pl.col("error").is_null())["request_id"].to_list())
        return set(self.lookup(request_ids, scope))

    def _rows_from(self, segment: str, ids: set[str]) -> pl.DataFrame | None:
        """The successful rows of `ids` in one segment, reading only row groups that hold them."""
        try:
            pf = self.storage.parquet_file(segment)
        except OSError as exc:
            if self.storage.vanished(segment, exc):
                return None
            raise
        wanted = pa.array(list(ids), pa.string())
        out = []
        try:
            for i in range(pf.num_row_groups):
                head = pf.read_row_group(i, columns=["request_id", "error"])
                mask = pc.and_(pc.is_in(head["request_id"], value_set=wanted), pc.is_null(head["error"]))
                if pc.any(mask).as_py():
                    out.append(pl.from_arrow(pf.read_row_group(i).filter(mask)))
        except OSError as exc:  # on S3 each ranged read can find the object deleted
            if self.storage.vanished(segment, exc):
                return None
            raise
        return pl.concat(out, how="vertical_relaxed") if out else _EMPTY.clear()

    def finished(self, request_ids: Iterable[str] | None = None, scope: str | None = None) -> pl.DataFrame:
        """One row per request that succeeded (the earliest success wins if two processes raced),
        for `request_ids` only when given. A segment compacted away mid-read is looked up again."""
        if request_ids is None:
            return _earliest_success(self.load().filter(pl.col("error").is_null()))
        pending = set(request_ids)
        frames = []
        gone: set[str] = set()
        for _ in range(LOOKUP_RETRIES):
            where = self.lookup(pending, scope, gone)
            by_segment: dict[str, set[str]] = {}
            for rid, seg in where.items():
                by_segment.setdefault(seg, set()).add(rid)
            lost: set[str] = set()
            segments = list(by_segment.items())
            threads = min(READ_THREADS, os.cpu_count() or 1) if self._local else READ_THREADS  # CPU-bound locally
            for (seg, ids), rows in zip(segments, _threaded(lambda item: self._rows_from(*item), segments, threads), strict=True):
                if rows is None:
                    gone.add(seg)
                    lost |= ids
                else:
                    frames.append(rows)
                    lost |= ids - set(rows["request_id"].to_list())  # a 64-bit prefix collision, or a race
            pending = lost
            if not pending:
                break
        rows = pl.concat(frames, how="vertical_relaxed") if frames else _EMPTY.clear()
        return _earliest_success(rows)

    # -- writing ------------------------------------------------------------------------------------
    def _write_index(self, segment_key: str, rows: pl.DataFrame) -> None:
        ok = rows.filter(pl.col("error").is_null())["request_id"].to_list()
        # a segment of failures only gets one NO_SUCCESS row, so the lookup knows it is indexed
        keys = [id_key(r) for r in ok] or [NO_SUCCESS]
        table = pa.table({"key": pa.array(keys, pa.uint64()), "segment": pa.array([segment_key] * len(keys), pa.string())})
        self._write_index_file(self._index_key(segment_key), table)

    def _write_index_file(self, key: str, table: pa.Table) -> None:
        """Keys are random 64-bit numbers, so they are stored plain and uncompressed: a dictionary
        and zstd would only make every lookup decode them slower. Segment names repeat: dictionary."""
        with self.storage.writing(key) as tmp:
            pq.write_table(table, tmp, compression={"key": "none", "segment": "zstd"}, use_dictionary=["segment"])

    def write_segment(self, scope: str, rows: list[dict[str, Any]], kind: str = "seg") -> str:
        """Rows first, then their index: a crash in between leaves rows that the scope's next lookup
        indexes itself."""
        name = _segment_name(kind)
        key = f"{self.prefix}/segments/{safe_scope(scope)}/{name}"
        for row in rows:
            row["segment"] = key
            row["scope"] = safe_scope(scope)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        self.storage.write_parquet(key, table)
        self._write_index(key, pl.from_arrow(table.select(["request_id", "error"])))
        return key

    def compact_index(self, scope: str, drop_segments: set[str] | None = None, files: list[str] | None = None) -> int:
        """Merge one scope's index files (or the given ones) into one, leaving out entries of
        `drop_segments` (new file first, then delete what was merged). The merge's tier is one more
        than its highest input's."""
        folder = f"{self.prefix}/index/{safe_scope(scope)}"
        keys = [k for k in self.index_keys(scope) if k.rsplit("/", 1)[0] == folder] if files is None else files
        if len(keys) < 2 and not drop_segments:
            return len(keys)
        read = {k: self._read(k) for k in keys}
        keys = [k for k, f in read.items() if f is not None]  # only what was read is deleted below
        frames = [read[k] for k in keys]
        merged = pl.concat(frames) if frames else pl.from_arrow(INDEX_SCHEMA.empty_table())
        if drop_segments:
            merged = merged.filter(~pl.col("segment").is_in(list(drop_segments)))
        kind = f"index{max((_index_tier(k) for k in keys), default=0) + 1}"
        self._write_index_file(f"{self.prefix}/index/{safe_scope(scope)}/{_segment_name(kind)}", merged.to_arrow().cast(INDEX_SCHEMA))
        for key in keys:
            self.storage.delete(key)
        return 1

    def merge_index(self, scope: str) -> int:
        """What a writer does after each segment: whenever INDEX_FAN_IN of a scope's index files
        share a tier, merge them into one file of the next tier. A scope then keeps a few index files
        per tier (the log of its size: 2 for 20 segments), so a lookup opens few files however many
        segments there are, and a merge rewrites each key once per tier instead of the whole scope's
        index every time. Returns the number of merges."""
        folder = f"{self.prefix}/index/{safe_scope(scope)}"
        merges = 0
        while merges < 64:  # each merge leaves at least 3 files fewer; the bound only guards against a storage that cannot delete
            tiers: dict[int, list[str]] = {}
            for key in self.index_keys(scope):
                if key.rsplit("/", 1)[0] == folder:  # not a nested scope's files
                    tiers.setdefault(_index_tier(key), []).append(key)
            due = [t for t in sorted(tiers) if len(tiers[t]) >= INDEX_FAN_IN]
            if not due:
                break
            self.compact_index(scope, files=tiers[due[0]])
            merges += 1
        return merges

    def compact(self, scope: str | None = None, row_group_rows: int = 10_000) -> dict[str, int]:
        """Merge each scope's segments into one (or the given scope's): the earliest success per
        request, and for requests that never succeeded their latest failure (still retried).

        Bounded memory: a first pass reads only ids and times, the second streams one segment at a
        time into the merged file. Safe beside running writers and readers: the merged segment and its
        index are written first, then exactly what was merged is deleted; a reader that loses a
        segment looks its ids up again."""
        figures = {"segments_before": 0, "segments_after": 0, "rows_before": 0, "rows_after": 0}
        for sc in [safe_scope(scope)] if scope is not None else self.scopes():
            for name, value in self._compact_scope(sc, row_group_rows).items():
                figures[name] += value
        return figures

    def _compact_scope(self, scope: str, row_group_rows: int) -> dict[str, int]:
        folder = f"{self.prefix}/segments/{scope}"
        listed = [k for k in self.segment_keys(scope) if k.rsplit("/", 1)[0] == folder]  # not nested scopes
        heads, keys = [], []
        for key in listed:
            head = self._read(key, ["request_id", "error", "created_at"])
            if head is not None:  # only segments read are merged, and only they are deleted
                keys.append(key)
                heads.append(head.with_row_index("_row").with_columns(pl.lit(key).alias("_key")))
        rows_before = sum(h.height for h in heads)
        if len(heads) < 2:
            return {"segments_before": len(keys), "segments_after": len(keys), "rows_before": rows_before, "rows_after": rows_before}
        head = pl.concat(heads).sort("created_at", "_key", "_row")
        ok = head.filter(pl.col("error").is_null()).unique(subset="request_id", keep="first", maintain_order=True)
        failed = (
            head.filter(pl.col("error").is_not_null() & ~pl.col("request_id").is_in(ok["request_id"].implode()))
            .unique(subset="request_id", keep="last", maintain_order=True)
        )  # fmt: skip
        keep = pl.concat([ok, failed])
        name = _segment_name("compact")
        target = f"{self.prefix}/segments/{scope}/{name}"
        kept = 0
        with self.storage.parquet_writer(target, SCHEMA) as out:
            for key in dict.fromkeys(keep["_key"].to_list()):
                rows = keep.filter(pl.col("_key") == key)["_row"]
                table = self.storage.parquet_file(key).read().take(pa.array(rows.to_list()))
                table = table.set_column(table.schema.get_field_index("segment"), "segment", pa.array([target] * table.num_rows))
                out.write_table(table.cast(SCHEMA), row_group_size=row_group_rows)
                kept += table.num_rows
        merged = pl.from_arrow(self.storage.parquet_file(target).read(columns=["request_id", "error"]))
        self._write_index(target, merged)
        self.compact_index(scope, drop_segments=set(keys))  # the index stops pointing at what is deleted next
        for key in keys:
            self.storage.delete(key)
        return {
            "segments_before": len(keys),
            "segments_after": len(self.segment_keys(scope)),
            "rows_before": rows_before,
            "rows_after": kept,
        }

    def writer(
        self,
        *,
        model: str,
        model_fingerprint: str,
        engine: str,
        engine_version: str,
        flush_every: int,
        flush_seconds: float,
        scope: str | None = None,
        engine_config: dict[str, Any] | None = None,
        check: Callable[[ChatRequest, Generation], str | None] | None = None,
    ) -> "SegmentWriter":
        fixed = {
            "model": model,
            "model_fingerprint": model_fingerprint,
            "engine": engine,
            "engine_version": engine_version,
            "engine_config": json.dumps(engine_config or {}, sort_keys=True),
        }
        return SegmentWriter(self, safe_scope(scope), fixed, flush_every, flush_seconds, check)


class SegmentWriter:
    """Writes results as segments from a background thread, so the engine never waits on Parquet,
    fsync or S3, and output checks (JSON schema) run off the engine's loop too.

    A batch is handed over every `flush_every // 2` rows (or `flush_seconds`); handing over waits for
    the previous batch to be written. So at most `flush_every` results are ever unwritten: a crash
    loses at most one checkpoint."""

    def __init__(
        self,
        cache: GenerationCache,
        scope: str,
        fixed: dict[str, str],
        flush_every: int,
        flush_seconds: float,
        check: Callable[[ChatRequest, Generation], str | None] | None = None,
    ) -> None:
        self.cache = cache
        self.scope = scope
        self.fixed = fixed
        self.batch_rows = max(1, flush_every // 2)
        self.flush_seconds = flush_seconds
        self.check = check
        self.rows: list[tuple[ChatRequest, int, Generation]] = []
        self.last_flush = time.monotonic()
        self.segments_written = 0
        self.rows_written = 0
        self.rejected = 0
        self.rejections: dict[str, str] = {}
        self.error: BaseException | None = None
        self._queue: queue.Queue[list | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._work, name="synth-cpt-cache-writer", daemon=True)
        self._thread.start()

    def add(self, request: ChatRequest, seed: int, gen: Generation) -> None:
        self.rows.append((request, seed, gen))
        if len(self.rows) >= self.batch_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (waiting until the previous batch is written)."""
        self.last_flush = time.monotonic()
        self._raise()
        if not self.rows:
            return
        batch, self.rows = self.rows, []
        self._queue.join()
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Write what is left and stop the thread; raises if any write failed."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"generation cache write failed: {type(self.error).__name__}: {self.error}") from self.error

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if self.error is None:
                    self._write(batch)
            except BaseException as exc:  # surfaced to the engine's thread at its next hand-over
                self.error = exc
            finally:
                self._queue.task_done()

    def _write(self, batch: list[tuple[ChatRequest, int, Generation]]) -> None:
        rows = []
        now = datetime.now(timezone.utc).isoformat()
        for request, seed, gen in batch:
            if gen.ok and self.check is not None and gen.rejected is None:
                try:
                    gen.rejected = self.check(request, gen)
                except Exception as exc:  # a check that cannot judge an output rejects it, never the batch
                    gen.rejected = f"check failed: {type(exc).__name__}: {str(exc)[:200]}"
            if gen.ok and gen.rejected is not None:
                self.rejected += 1
                self.rejections[gen.request_id] = gen.rejected
            rows.append(
                {
                    "request_id": gen.request_id,
                    **self.fixed,
                    "prompt_name": request.prompt_name,
                    "prompt_sha": request.prompt_sha,
                    "messages": request.rendered(),
                    "sampling": json.dumps(request.sampling.as_dict(), sort_keys=True),
                    "json_schema": request.json_schema,
                    "seed": seed,
                    "text": gen.text,
                    "finish_reason": gen.finish_reason,
                    "prompt_tokens": gen.prompt_tokens,
                    "completion_tokens": gen.completion_tokens,
                    "attempts": gen.attempts,
                    "latency_s": round(gen.latency_s, 4),
                    "error": gen.error,
                    "rejected": gen.rejected,
                    "created_at": now,
                }
            )
        self.cache.write_segment(self.scope, rows)
        self.segments_written += 1
        self.rows_written += len(rows)
        self.cache.merge_index(self.scope)
