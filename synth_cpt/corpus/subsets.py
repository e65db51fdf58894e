"""`quality_subsets`: a seeded, token-budgeted selection of a raw_corpus partition.

Budget rule: documents are put in order, by `quality_score` descending (ties by `doc_id`) or, with
`order: random`, by SHA-256 of (seed, doc_id); the subset is the longest prefix of that order whose
token total is <= the budget. It stops at the first document that would overflow, so a larger budget
always yields a superset, and the same inputs, seed and tokenizer always give the same subset.
Tokens are counted lazily, chunk by chunk in that order, so a 10B-token budget over a 120B-token
corpus never tokenizes (nor holds in memory) the 110B it will not use.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from synth_cpt.corpus.tokenizer import TokenCounter

CHUNK = 2048
FIRST_COUNT = 64  # documents tokenized first; each later slice twice as many, up to CHUNK


def _slices(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches cut into slices of FIRST_COUNT rows, then twice as many each time up to CHUNK: a small
    budget, filled by the first few dozen documents, tokenizes those and not a whole CHUNK."""
    size = FIRST_COUNT
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            yield batch.slice(start, size)
            start += size
            size = min(2 * size, CHUNK)


def _ordered(path: str, order: str, seed: int) -> pl.LazyFrame:
    """The partition in selection order, as a lazy query (polars sorts out of core if it must)."""
    scan = pl.scan_parquet(path)
    if order == "score":
        return scan.sort(["quality_score", "doc_id"], descending=[True, False])
    if order == "random":
        ids = pl.scan_parquet(path).select("doc_id").collect()["doc_id"].to_list()
        keys = pl.LazyFrame({"doc_id": ids, "_k": [hashlib.sha256(f"{seed}:{d}".encode()).hexdigest() for d in ids]})
        return scan.join(keys, on="doc_id", how="left").sort("_k").drop("_k")
    raise ValueError(f"unknown subset order {order!r} (score or random)")


@dataclass
class SubsetStats:
    budget_tokens: int | None
    candidate_documents: int
    documents: int
    tokens: int
    stopped_at_doc_tokens: int | None  # the first document that did not fit, if any


def select_budgeted_file(source: str, target: str, counter: TokenCounter, budget: int | None, order: str, seed: int) -> SubsetStats:
    """Write the budgeted subset of the Parquet file `source` to `target`, with `n_tokens`.

    Memory stays bounded: the ordered partition is spilled to a temporary Parquet file and read back
    one chunk at a time, and reading stops at the first document that does not fit.
    """
    with tempfile.TemporaryDirectory(prefix="synth-cpt-subset-") as tmp:
        ordered_path = str(Path(tmp) / "ordered.parquet")
        _ordered(source, order, seed).sink_parquet(ordered_path, row_group_size=CHUNK, engine="streaming")
        reader = pq.ParquetFile(ordered_path)
        candidates = reader.metadata.num_rows
        schema = reader.schema_arrow.append(pa.field("n_tokens", pa.int64()))
        total, taken, stopped = 0, 0, None
        with pq.ParquetWriter(target, schema, compression="zstd") as writer:
            for batch in _slices(reader.iter_batches(batch_size=CHUNK)):
                counts = counter.count(batch.column("text").to_pylist())
                keep = 0
                for n in counts:
                    if budget is not None and total + n > budget:
                        stopped = n
                        break
                    total += n
                    keep += 1
                if keep:
                    part = batch.slice(0, keep).append_column("n_tokens", pa.array(counts[:keep], type=pa.int64()))
                    writer.write_batch(part)
                taken += keep
                if stopped is not None:
                    break
            if taken == 0:
                writer.write_table(schema.empty_table())
    return SubsetStats(budget, candidates, taken, total, stopped)


def select_budgeted(
    frame: pl.DataFrame, counter: TokenCounter, budget: int | None, order: str, seed: int
) -> tuple[pl.DataFrame, SubsetStats]:
    """The same selection for a frame in memory (tests, notebooks)."""
    with tempfile.TemporaryDirectory(prefix="synth-cpt-subset-") as tmp:
        source, target = str(Path(tmp) / "in.parquet"), str(Path(tmp) / "out.parquet")
        frame.write_parquet(source)
        stats = select_budgeted_file(source, target, counter, budget, order, seed)
        return pl.read_parquet(target), stats
