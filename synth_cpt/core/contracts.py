"""Row contracts (DESIGN.md "Data contracts"): the columns of every table synth-cpt writes, and the
Great Expectations suites built from them. A new asset adds its contract here, next to the others.

Suites see texts as their lengths (`text_chars`, see `core.validation.narrow`): GX reads pandas, and
whole texts need not go there.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from synth_cpt.core.config import BucketBounds, PipelineConfig
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome, columns_outcome, expect, merge, narrow, run_suite

QUARANTINE = pa.schema(
    [
        ("drop_id", pa.string()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("reason_code", pa.string()),  # stable, for grouping (ingest.quarantine)
        ("reason", pa.string()),  # a sentence a person can act on
        ("raw", pa.string()),  # the record, truncated to limits.quarantine_raw_chars
    ]
)


def drop_documents(config: PipelineConfig) -> pa.Schema:
    """`crawl_drops/<drop>/.../docs.parquet`: a document as ingested, before bucketing."""
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("text", pa.string()),
            ("url", pa.string()),
            ("title", pa.string()),
            ("record_id", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float64()),
            ("language_source", pa.string()),
            *[(f"score_{name}", pa.float64()) for name in config.fields.scores],
            ("score_heuristic", pa.float64()),
            ("quality_score", pa.float64()),
            ("quality_score_source", pa.string()),
            ("n_chars", pa.int64()),
            ("encoding_repaired", pa.bool_()),
            ("drop_id", pa.string()),
            ("source_file", pa.string()),
            ("source_line", pa.int64()),
        ]
    )


def corpus_documents(config: PipelineConfig, with_tokens: bool = False) -> pa.Schema:
    """`raw_corpus` rows: a drop's documents plus their `quality` bucket; `quality_subsets` add `n_tokens`."""
    schema = drop_documents(config)
    schema = schema.insert(schema.get_field_index("n_chars"), pa.field("quality", pa.string()))
    return schema.append(pa.field("n_tokens", pa.int64())) if with_tokens else schema


def empty(schema: pa.Schema) -> pl.DataFrame:
    return pl.from_arrow(schema.empty_table())  # type: ignore[return-value]


# Room for the synthesis and mix assets (DESIGN.md): their rows are fixed here before their code lands.
SYNTHETIC = pa.schema(
    [
        ("synth_id", pa.string()),
        ("kind", pa.string()),  # rewrite | entigraph_pair | entigraph_triple | entities
        ("style", pa.string()),
        ("doc_id", pa.string()),
        ("request_ids", pa.list_(pa.string())),
        ("chunk_index", pa.int64()),
        ("entities", pa.list_(pa.string())),
        ("text", pa.string()),
        ("language", pa.string()),
        ("drop_id", pa.string()),
    ]
)

MIX_SHARD = pa.schema([("text", pa.string()), ("origin", pa.string()), ("source_id", pa.string()), ("n_tokens", pa.int64())])


# -- suites ------------------------------------------------------------------------------------------


# The suites see only the columns they test (`DOCUMENT_COLUMNS`, the text as `text_chars`); that a file
# has exactly its contract's columns is checked from its footer (`validation.columns_outcome`).
DOCUMENT_COLUMNS = ["doc_id", "text", "language", "quality_score"]


def drop_documents_suite() -> list[Any]:
    gxe = expect()
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="language"),
        gxe.ExpectColumnValuesToBeBetween(column="quality_score", min_value=0, max_value=5),
    ]


def quarantine_suite() -> list[Any]:
    gxe = expect()
    return [gxe.ExpectColumnValuesToNotBeNull(column="reason")]


def corpus_documents_suite(language: str, bounds: BucketBounds) -> list[Any]:
    """Schema, non-empty text, unique doc_id, language of the partition, scores inside the bucket."""
    gxe = expect()
    lo, hi, strict_lo, strict_hi = bounds.interval()
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToBeUnique(column="doc_id"),
        gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="language", value_set=[language]),
        gxe.ExpectColumnValuesToBeBetween(column="quality_score", min_value=lo, max_value=hi, strict_min=strict_lo, strict_max=strict_hi),
    ]


def budget_suite(budget: int | None) -> list[Any]:
    gxe = expect()
    return [
        gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1),
        gxe.ExpectColumnSumToBeBetween(column="n_tokens", min_value=0, max_value=budget),
    ]


def acceptance_suite(max_quarantine_rate: float, accept_partial_files: bool) -> list[Any]:
    """Over a one-row frame (quarantine_rate, complete): the rule of `ingest.drops.accepts`, as a check."""
    gxe = expect()
    suite = [gxe.ExpectColumnValuesToBeBetween(column="quarantine_rate", min_value=0, max_value=max_quarantine_rate)]
    if not accept_partial_files:  # a damaged file waits for a complete version
        suite.append(gxe.ExpectColumnValuesToBeInSet(column="complete", value_set=[True]))
    return suite


# -- validating candidate files ----------------------------------------------------------------------


def check_corpus_file(path: str, config: PipelineConfig, language: str, quality: str, with_tokens: bool = False) -> Outcome:
    """The documents suite of one `language|quality` partition file."""
    suite = corpus_documents_suite(language, config.quality.buckets[quality])
    return merge(
        {
            "schema": columns_outcome(path, corpus_documents(config, with_tokens).names),
            "documents": run_suite("corpus_documents", narrow(path, DOCUMENT_COLUMNS), suite),
        }
    )


def check_budget(path: str, budget: int | None) -> Outcome:
    return run_suite("budget", pl.read_parquet(path, columns=["n_tokens"]), budget_suite(budget))


def check_drop_version(storage: Storage, prefix: str, config: PipelineConfig) -> Outcome:
    """The documents and quarantine suites of one drop version (before its pointer is written)."""
    with storage.local_path(f"{prefix}/docs.parquet") as docs, storage.local_path(f"{prefix}/quarantine.parquet") as quarantine:
        return merge(
            {
                "schema": columns_outcome(str(docs), drop_documents(config).names),
                "documents": run_suite("drop_documents", narrow(str(docs), DOCUMENT_COLUMNS), drop_documents_suite()),
                "quarantine_schema": columns_outcome(str(quarantine), QUARANTINE.names),
                "quarantine": run_suite("drop_quarantine", narrow(str(quarantine), ["reason"]), quarantine_suite()),
            }
        )
