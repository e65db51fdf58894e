"""`raw_corpus`: every accepted drop of a language, exact-deduplicated and bucketed by quality.

Dedup keeps the first occurrence of a `doc_id` in (drop_id, source_line) order: drop ids sort by
name, so date-prefixed drop names make the earliest drop win, and the choice never depends on when a
drop happened to be ingested. Runs as a streaming polars query: memory stays bounded by the engine,
not by the corpus size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from synth_cpt.config import BucketBounds, PipelineConfig
from synth_cpt.ingest.drops import accepts, ingested_drops
from synth_cpt.ingest.records import docs_schema
from synth_cpt.storage import Storage
from synth_cpt.validation import CandidateRejected, Outcome

ASSET = "raw_corpus"


def corpus_file(asset: str, language: str, quality: str) -> str:
    return f"{asset}/{language}/{quality}/part-0.parquet"


def bucket_expr(bounds: BucketBounds, column: str = "quality_score") -> pl.Expr:
    s = pl.col(column)
    expr = pl.lit(True)
    if bounds.gt is not None:
        expr = expr & (s > bounds.gt)
    if bounds.ge is not None:
        expr = expr & (s >= bounds.ge)
    if bounds.lt is not None:
        expr = expr & (s < bounds.lt)
    if bounds.le is not None:
        expr = expr & (s <= bounds.le)
    return expr


def any_bucket_expr(config: PipelineConfig) -> pl.Expr:
    return pl.any_horizontal([bucket_expr(b) for b in config.quality.buckets.values()])


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
    drops: list[str] = field(default_factory=list)
    rejected_drops: list[str] = field(default_factory=list)
    outcome: Outcome | None = None  # the validation of what was published


@contextlib.contextmanager
def _local_docs(storage: Storage, prefixes: list[str]):
    with contextlib.ExitStack() as stack:
        yield [str(stack.enter_context(storage.local_path(f"{p}/docs.parquet"))) for p in prefixes]


def drop_accepted(manifest: dict, config: PipelineConfig) -> bool:
    """Judged with today's limits, not those of ingest time: raising `limits.max_quarantine_rate` or
    setting `limits.accept_partial_files` lets a drop in without re-ingesting it (and the reverse)."""
    limits = config.limits
    return accepts(
        float(manifest["quarantine_rate"]), manifest.get("complete", True), limits.max_quarantine_rate, limits.accept_partial_files
    )


def build_raw_corpus(
    storage: Storage, config: PipelineConfig, language: str, quality: str, validate: Callable[[str], Outcome] | None = None
) -> CorpusStats:
    """Write `raw_corpus/<language>/<quality>/part-0.parquet` and return what went into it.

    With `validate`, the candidate file is checked before it replaces the published one; a failure
    raises CandidateRejected and readers keep the previous version."""
    stats = CorpusStats(language, quality)
    manifests = ingested_drops(storage)
    stats.rejected_drops = [m["drop_id"] for m in manifests if not drop_accepted(m, config)]
    accepted = [m["prefix"] for m in manifests if drop_accepted(m, config) and m["documents"] > 0]
    bounds = config.quality.buckets[quality]
    out_key = corpus_file(ASSET, language, quality)
    with _local_docs(storage, accepted) as paths:
        if not paths:
            frame = pl.LazyFrame(schema=_empty_schema(config))
            counts = {"n": 0, "unique": 0, "no_bucket": 0}
        else:
            lang_docs = pl.scan_parquet(paths, missing_columns="insert", extra_columns="ignore").filter(pl.col("language") == language)
            unique = lang_docs.sort("drop_id", "source_line").unique(subset="doc_id", keep="first", maintain_order=True)
            counts = (
                pl.concat(
                    [
                        lang_docs.select(pl.len().alias("n")),
                        unique.select(pl.len().alias("unique"), (~any_bucket_expr(config)).sum().alias("no_bucket")),
                    ],
                    how="horizontal",
                )
                .collect(engine="streaming")
                .row(0, named=True)
            )
            frame = unique.filter(bucket_expr(bounds)).with_columns(pl.lit(quality).alias("quality"))
        with storage.writing(out_key) as tmp:
            frame.select(corpus_columns(config)).sink_parquet(tmp, compression="zstd", engine="streaming")
            # figures of what was written come from the output itself, not from a second dedup pass
            written = pl.scan_parquet(tmp)
            summary = written.select(pl.len().alias("n"), pl.col("n_chars").sum().alias("chars")).collect().row(0, named=True)
            stats.drops = written.select(pl.col("drop_id").unique().sort()).collect().to_series().to_list()
            if validate is not None:
                stats.outcome = validate(str(tmp))
                if not stats.outcome.success:
                    raise CandidateRejected(stats.outcome, storage.keep_rejected(out_key, tmp))
    stats.language_documents = int(counts["n"])
    stats.unique_documents = int(counts["unique"])
    stats.duplicates_removed = stats.language_documents - stats.unique_documents
    stats.in_no_bucket = int(counts["no_bucket"] or 0)
    stats.documents = int(summary["n"])
    stats.characters = int(summary["chars"] or 0)
    return stats


def corpus_columns(config: PipelineConfig) -> list[str]:
    """The document contract of raw_corpus: a drop's document columns plus `quality` (subsets add `n_tokens`)."""
    names = [f.name for f in docs_schema(config)]
    names.insert(names.index("n_chars"), "quality")
    return names


def _empty_schema(config: PipelineConfig) -> dict[str, pl.DataType]:
    floats = {"language_score", "score_heuristic", "quality_score", *[f"score_{n}" for n in config.fields.scores]}
    ints = {"n_chars", "source_line"}
    bools = {"encoding_repaired"}
    kind = lambda c: pl.Float64 if c in floats else pl.Int64 if c in ints else pl.Boolean if c in bools else pl.String  # noqa: E731
    return {c: kind(c) for c in corpus_columns(config)}


def read_corpus(storage: Storage, asset: str, language: str, quality: str, columns: list[str] | None = None) -> pl.DataFrame:
    return storage.read_parquet(corpus_file(asset, language, quality), columns=columns)
