# The raw_corpus dedup before the bounded-memory rewrite (synth_cpt/ingest/dedup.py at ec13d03), kept
# as the baseline of benchmarks/corpus.py: each accepted drop through Storage.local_path (a whole
# download on S3), every document of the language sorted and deduplicated with its text, once for the
# figures and once for the output. Do not use it anywhere else.
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

from synth_cpt.core import contracts
from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.layout import RAW_CORPUS, partition_file
from synth_cpt.core.metadata import DocumentSummary, summarize
from synth_cpt.core.publish import CandidateRejected, keep_rejected
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome
from synth_cpt.ingest.drops import accepts, ingested_drops

SAMPLE_COLUMNS = ["doc_id", "quality_score", "drop_id", "text"]


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
    """Write the `raw_corpus` partition and return what went into it.

    With `validate`, the candidate file is checked before it replaces the published one; a failure
    raises CandidateRejected and readers keep the previous version."""
    stats = CorpusStats(language, quality)
    manifests = ingested_drops(storage)
    stats.rejected_drops = [m["drop_id"] for m in manifests if not drop_accepted(m, config)]
    accepted = [m["prefix"] for m in manifests if drop_accepted(m, config) and m["documents"] > 0]
    bounds = config.quality.buckets[quality]
    out_key = partition_file(RAW_CORPUS, language, quality)
    with _local_docs(storage, accepted) as paths:
        if not paths:
            frame = contracts.empty(contracts.corpus_documents(config)).lazy()
            counts = {"n": 0, "unique": 0, "no_bucket": 0}
        else:
            lang_docs = pl.scan_parquet(paths, missing_columns="insert", extra_columns="ignore").filter(pl.col("language") == language)
            unique = lang_docs.sort("drop_id", "source_line").unique(subset="doc_id", keep="first", maintain_order=True)
            counts = (
                pl.concat(
                    [
                        lang_docs.select(pl.len().alias("n")),
                        unique.select(pl.len().alias("unique"), (~config.quality.in_any_bucket()).sum().alias("no_bucket")),
                    ],
                    how="horizontal",
                )
                .collect(engine="streaming")
                .row(0, named=True)
            )
            frame = unique.filter(bounds.expr()).with_columns(pl.lit(quality).alias("quality"))
        with storage.writing(out_key) as tmp:
            frame.select(contracts.corpus_documents(config).names).sink_parquet(tmp, compression="zstd", engine="streaming")
            # figures of what was written come from the output itself, not from a second dedup pass
            stats.summary = summarize(str(tmp), SAMPLE_COLUMNS)
            if validate is not None:
                stats.outcome = validate(str(tmp))
                if not stats.outcome.success:
                    raise CandidateRejected(stats.outcome, keep_rejected(storage, out_key, tmp), "documents_valid")
    stats.language_documents = int(counts["n"])
    stats.unique_documents = int(counts["unique"])
    stats.duplicates_removed = stats.language_documents - stats.unique_documents
    stats.in_no_bucket = int(counts["no_bucket"] or 0)
    stats.documents = stats.summary.rows
    stats.characters = stats.summary.characters
    return stats
