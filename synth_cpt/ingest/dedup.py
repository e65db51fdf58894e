"""`raw_corpus`: every accepted drop of a language, exact-deduplicated and bucketed by quality.

Dedup keeps the first occurrence of a `doc_id` in (drop_id, source_line) order, nulls first, across
every accepted drop of the language: drop ids sort by name, so date-prefixed drop names make the
earliest drop win, the choice never depends on when a drop happened to be ingested, and the winner is
the same whichever bucket is being built (a duplicate never lands in two buckets).

Two passes, so memory stays bounded whatever the corpus size, and no drop is copied or downloaded
whole (ranged reads of the columns needed, on S3 too):

1. **Winners**, over narrow columns only (doc_id, drop_id, source_line, language, quality_score):
   DuckDB picks each doc_id's first occurrence under a memory limit, spilling to a temporary folder
   when the corpus outgrows it. The figures (documents, duplicates, in no bucket) come from here.
   With `quality.method: percentiles` (METHODS §3), `quality_score` is the document's bucket value
   0-19 from the language's published `quality_cutpoints` (`ingest.cutpoints`), in both passes: the
   bucket bounds apply to it unchanged, and the raw scores stay in the `score_*` columns.
2. **Documents**: the winners inside the bucket, in (drop_id, source_line) order, are read back row
   group by row group (only row groups holding one) by two threads, while a third compresses the
   previous row group of the candidate file.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synth_cpt.core import contracts
from synth_cpt.core.config import BucketBounds, PipelineConfig
from synth_cpt.core.layout import RAW_CORPUS, partition_file
from synth_cpt.core.metadata import DocumentSummary, summarize
from synth_cpt.core.plots import histogram_counts
from synth_cpt.core.publish import CandidateRejected, keep_rejected
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome
from synth_cpt.ingest.cutpoints import Cutpoints, published_cutpoints
from synth_cpt.ingest.drops import drop_accepted, ingested_drops

SAMPLE_COLUMNS = ["doc_id", "quality_score", "drop_id", "text"]

# DuckDB's share of memory for the winners (it spills to a temporary folder beyond it) and its threads
DUCKDB_MEMORY_LIMIT = "256MB"
DUCKDB_THREADS = 2
NARROW = pa.schema(
    [("doc_id", pa.string()), ("drop_id", pa.string()), ("source_line", pa.int64()), ("quality_score", pa.float64()), ("pos", pa.int64())]
)
NARROW_BATCH_ROWS = 64 * 1024  # rows per narrow read
FLUSH_BYTES = 32 * 1024 * 1024  # documents buffered before a row group of the candidate is written
READERS = 2  # threads reading and selecting row groups while the candidate is written
READ_AHEAD = 4  # row groups read ahead
VALUES = 20  # percentiles: bucket values 0-19
ORDER = "ORDER BY drop_id NULLS FIRST, source_line NULLS FIRST, pos"  # the rule's order: nulls first, as polars sorts


@dataclass
class CorpusStats:
    language: str
    quality: str
    documents: int = 0
    characters: int = 0
    language_documents: int = 0
    unique_documents: int = 0
    duplicates_removed: int = 0
    in_no_bucket: int = 0
    rejected_drops: list[str] = field(default_factory=list)
    summary: DocumentSummary = field(default_factory=DocumentSummary)  # of what was published
    cutpoints: Cutpoints | None = None  # quality.method percentiles: the cut points the buckets were made with
    value_histogram: list[int] = field(default_factory=list)  # percentiles: documents per bucket value 0-19
    outcome: Outcome | None = None  # the validation of what was published


def connect(temp_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB bounded by DUCKDB_MEMORY_LIMIT, spilling into `temp_dir`."""
    return duckdb.connect(
        ":memory:",
        config={
            "memory_limit": DUCKDB_MEMORY_LIMIT,
            "threads": DUCKDB_THREADS,
            "temp_directory": str(temp_dir),
            "preserve_insertion_order": False,
        },
    )


class _Docs:
    """The docs.parquet files of the accepted drops, in drop order, with every row group's first row as
    a position counted across all files (how pass 2 finds a winner again).

    Each file is opened once where it can be: on S3 every open fetches the footer again. Pass 1 opens a
    file, records its row groups from that footer and reads its narrow columns; the reader is then
    handed on (idle) so pass 2 reuses it, and a second reader of a file is opened only when two threads
    read it at once. At most READERS files are open at a time: a corpus of thousands of drops must not
    hold thousands of open files (EMFILE) or S3 connections."""

    def __init__(
        self, storage: Storage, prefixes: list[str], cutpoints: Cutpoints | None = None, versions: list[str] | None = None
    ) -> None:
        self.storage = storage
        self.versions = versions or [None] * len(prefixes)  # each file's drop version, stamped on its rows (drop_version)
        self.cutpoints = cutpoints  # given: quality_score is replaced by the bucket value 0-19
        self.keys = [f"{p}/docs.parquet" for p in prefixes]
        # readers not in use, oldest first: a reader is used by one thread at a time, handed on under the lock
        self._idle: list[tuple[int, pq.ParquetFile]] = []
        self._busy = 0  # readers in use
        self._lock = threading.Lock()
        # the row group layout, filled by pass 1 (`narrow`) from the footers it opens anyway
        self.file_start: list[int] = []
        self.group_start = np.zeros(0, dtype=np.int64)
        self.group_where: list[tuple[int, int]] = []

    def _take(self, f: int) -> pq.ParquetFile:
        """A reader of file `f` for this thread: an idle one if there is, else a new one (idle readers of
        other files are closed first, so no more than READERS are ever open)."""
        with self._lock:
            for i, (g, pf) in enumerate(self._idle):
                if g == f:
                    del self._idle[i]
                    self._busy += 1
                    return pf
            while self._idle and self._busy + len(self._idle) >= READERS:
                self._idle.pop(0)[1].close()
            self._busy += 1
        try:
            return self.storage.parquet_file(self.keys[f])
        except BaseException:
            with self._lock:
                self._busy -= 1
            raise

    def _give_back(self, f: int, pf: pq.ParquetFile) -> None:
        with self._lock:
            self._busy -= 1
            self._idle.append((f, pf))
            while self._busy + len(self._idle) > READERS:
                self._idle.pop(0)[1].close()

    def close(self) -> None:
        with self._lock:
            for _, pf in self._idle:
                pf.close()
            self._idle.clear()

    def narrow(self, language: str, counted: list[int]) -> Iterator[pa.RecordBatch]:
        """Pass 1's rows: the language's documents, narrow columns plus their position; counts them.
        Records the row group layout (`file_start`, `group_start`, `group_where`) that pass 2 needs."""
        starts: list[int] = []
        self.file_start, self.group_where = [], []
        total = 0
        for f in range(len(self.keys)):
            pf = self._take(f)
            try:
                meta = pf.metadata
                self.file_start.append(total)
                for g in range(meta.num_row_groups):
                    starts.append(total)
                    self.group_where.append((f, g))
                    total += meta.row_group(g).num_rows
                self.group_start = np.array(starts, dtype=np.int64)
                yield from self._narrow_file(pf, f, language, counted)
            except BaseException:
                pf.close()
                with self._lock:
                    self._busy -= 1
                raise
            self._give_back(f, pf)

    def _narrow_file(self, pf: pq.ParquetFile, f: int, language: str, counted: list[int]) -> Iterator[pa.RecordBatch]:
        present = set(pf.schema_arrow.names)
        if "language" not in present:
            return  # missing is null: never the language
        wanted = ["doc_id", "drop_id", "source_line", "quality_score", "language"]
        if self.cutpoints is not None:
            wanted += [c for c in present if c.startswith("score_")]
        columns = [c for c in wanted if c in present]
        pos = self.file_start[f]
        for batch in pf.iter_batches(batch_size=NARROW_BATCH_ROWS, columns=columns, use_threads=True):
            n = batch.num_rows
            positions = pa.array(np.arange(pos, pos + n, dtype=np.int64))
            pos += n
            keep = pc.fill_null(pc.equal(batch.column("language"), language), False)
            arrays = [batch.column(fld.name).cast(fld.type) if fld.name in present else pa.nulls(n, fld.type) for fld in list(NARROW)[:-1]]
            if self.cutpoints is not None:
                arrays[NARROW.get_field_index("quality_score")] = self.cutpoints.bucket_values(batch)
            out = pa.RecordBatch.from_arrays([*arrays, positions], schema=NARROW).filter(keep)
            counted[0] += out.num_rows
            if out.num_rows:
                yield out

    def documents(self, index: int, rows: np.ndarray, schema: pa.Schema, quality: str) -> pa.Table:
        """Rows `rows` of row group `index` (in that order), as `schema` rows of bucket `quality`."""
        f, g = self.group_where[index]
        pf = self._take(f)
        try:
            present = set(pf.schema_arrow.names)
            table = pf.read_row_group(g, columns=[c for c in schema.names if c in present], use_threads=False)
        finally:
            self._give_back(f, pf)
        table = table.take(pa.array(rows))  # in output order, wherever a file put them
        n = table.num_rows
        if self.cutpoints is not None:
            table = table.drop_columns([c for c in ("quality_score",) if c in table.column_names])
            table = table.append_column("quality_score", self.cutpoints.bucket_values(table))
            present = present | {"quality_score"}
        return pa.Table.from_arrays(
            [
                pa.repeat(pa.scalar(quality, fld.type), n)
                if fld.name == "quality"
                else pa.repeat(pa.scalar(self.versions[f], fld.type), n)
                if fld.name == "drop_version"
                else (table.column(fld.name).cast(fld.type) if fld.name in present else pa.nulls(n, fld.type))
                for fld in schema
            ],
            schema=schema,
        )

    def runs(self, positions: Iterator[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """(row group, rows in it) for positions in output order, consecutive rows of one group merged."""
        current, parts = -1, []
        for pos in positions:
            if not len(pos):
                continue
            groups = np.searchsorted(self.group_start, pos, side="right") - 1
            cuts = np.flatnonzero(np.diff(groups)) + 1
            for part_pos, part_groups in zip(np.split(pos, cuts), np.split(groups, cuts), strict=True):
                group = int(part_groups[0])
                if group != current and parts:
                    yield current, np.concatenate(parts)
                    parts = []
                current = group
                parts.append(part_pos - self.group_start[group])
        if parts:
            yield current, np.concatenate(parts)


def _select_winners(con: duckdb.DuckDBPyConnection, docs: _Docs, language: str, config: PipelineConfig) -> dict[str, int]:
    """Pass 1: the winners of the language into DuckDB table `winners`, and the figures."""
    counted = [0]
    reader = pa.RecordBatchReader.from_batches(NARROW, docs.narrow(language, counted))
    con.register("narrow_docs", reader)
    # first occurrence: the smallest (drop_id, source_line) of each doc_id, nulls first as the rule
    # (and polars) sorts them (min() of a struct would put them last); pos breaks ties, if any
    con.execute(
        f"""
        CREATE TEMP TABLE winners AS
        SELECT drop_id, source_line, pos, quality_score FROM narrow_docs
        QUALIFY row_number() OVER (PARTITION BY doc_id {ORDER}) = 1
        """
    )
    con.unregister("narrow_docs")
    counts = {"n": counted[0], "unique": 0, "no_bucket": 0}
    outside = ~config.quality.in_any_bucket()
    for batch in con.sql("SELECT quality_score FROM winners").to_arrow_reader(NARROW_BATCH_ROWS):
        frame = pl.from_arrow(batch)
        counts["unique"] += frame.height
        counts["no_bucket"] += int(frame.select(outside.sum()).item() or 0)
    return counts


def _positions(con: duckdb.DuckDBPyConnection, bounds: BucketBounds) -> Iterator[np.ndarray]:
    """The positions of the winners inside the bucket (its own polars expression decides), in
    (drop_id, source_line) order."""
    inside = bounds.expr()
    for batch in con.sql(f"SELECT pos, quality_score FROM winners {ORDER}").to_arrow_reader(NARROW_BATCH_ROWS):
        yield pl.from_arrow(batch).filter(inside)["pos"].to_numpy()


def _write_documents(
    con: duckdb.DuckDBPyConnection, docs: _Docs, bounds: BucketBounds, quality: str, schema: pa.Schema, path: Path
) -> None:
    """Pass 2: the winners inside the bucket, in (drop_id, source_line) order, streamed into `path`."""
    plain = [c for c in schema.names if c != "text"]  # texts: no dictionary, no min/max
    with (
        pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=plain, write_statistics=plain) as writer,
        ThreadPoolExecutor(READERS) as readers,
        ThreadPoolExecutor(1) as writing,  # a row group is compressed while the next ones are read
    ):
        reading: deque[Future[pa.Table]] = deque()
        written: Future | None = None
        buffer: list[pa.Table] = []
        buffered = 0

        def collect(last: bool = False) -> None:
            nonlocal written, buffer, buffered
            if reading:
                table = reading.popleft().result()
                buffer.append(table)
                buffered += table.nbytes
            if buffer and (buffered >= FLUSH_BYTES or last):
                if written is not None:
                    written.result()  # one row group in flight: memory stays bounded
                written = writing.submit(writer.write_table, pa.concat_tables(buffer))
                buffer, buffered = [], 0

        for group, rows in docs.runs(_positions(con, bounds)):
            reading.append(readers.submit(docs.documents, group, rows, schema, quality))
            if len(reading) > READ_AHEAD:
                collect()
        while reading:
            collect(last=len(reading) == 1)
        if written is not None:
            written.result()


def build_raw_corpus(
    storage: Storage, config: PipelineConfig, language: str, quality: str, validate: Callable[[str], Outcome] | None = None
) -> CorpusStats:
    """Write the `raw_corpus` partition and return what went into it.

    With `validate`, the candidate file is checked before it replaces the published one; a failure
    raises CandidateRejected and readers keep the previous version. With `quality.method: percentiles`
    the language's published cut points decide the bucket (FileNotFoundError until they are published)."""
    stats = CorpusStats(language, quality)
    if config.quality.method == "percentiles":
        stats.cutpoints = published_cutpoints(storage, language)
    manifests = ingested_drops(storage)
    stats.rejected_drops = [m["drop_id"] for m in manifests if not drop_accepted(m, config)]
    accepted_manifests = [m for m in manifests if drop_accepted(m, config) and m["documents"] > 0]
    accepted = [m["prefix"] for m in accepted_manifests]
    bounds = config.quality.buckets[quality]
    schema = contracts.corpus_documents(config)
    out_key = partition_file(RAW_CORPUS, language, quality)
    with storage.writing(out_key) as tmp:
        if accepted:
            with (
                tempfile.TemporaryDirectory(prefix="synth-cpt-dedup-") as spill,
                connect(spill) as con,
                contextlib.closing(_Docs(storage, accepted, stats.cutpoints, [m.get("version") for m in accepted_manifests])) as docs,
            ):
                counts = _select_winners(con, docs, language, config)
                _write_documents(con, docs, bounds, quality, schema, tmp)
        else:
            pq.write_table(schema.empty_table(), tmp, compression="zstd")
            counts = {"n": 0, "unique": 0, "no_bucket": 0}
        # figures of what was written come from the output itself
        stats.summary = summarize(str(tmp), SAMPLE_COLUMNS)
        if stats.cutpoints is not None:
            values = pl.read_parquet(tmp, columns=["quality_score"])["quality_score"]
            stats.value_histogram = histogram_counts(values, bins=VALUES, lo=0.0, hi=float(VALUES))
        if validate is not None:
            stats.outcome = validate(str(tmp))
            if not stats.outcome.success:
                raise CandidateRejected(stats.outcome, keep_rejected(storage, out_key, tmp), "documents_valid")
    stats.language_documents = counts["n"]
    stats.unique_documents = counts["unique"]
    stats.duplicates_removed = stats.language_documents - stats.unique_documents
    stats.in_no_bucket = counts["no_bucket"]
    stats.documents = stats.summary.rows
    stats.characters = stats.summary.characters
    return stats
