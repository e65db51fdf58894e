"""Row contracts (DESIGN.md "Data contracts"): the columns of every table synth-cpt writes, and the
Great Expectations suites built from them. A new asset adds its contract here, next to the others.

Suites see texts as their lengths (`text_chars`, see `core.validation.narrow`): GX reads pandas, and
whole texts need not go there.
"""

from __future__ import annotations

from collections.abc import Callable
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
    schema = schema.insert(schema.get_field_index("drop_id") + 1, pa.field("drop_version", pa.string()))  # the drop version read
    return schema.append(pa.field("n_tokens", pa.int64())) if with_tokens else schema


def empty(schema: pa.Schema) -> pl.DataFrame:
    return pl.from_arrow(schema.empty_table())  # type: ignore[return-value]


# Lineage of a synthetic row (DESIGN.md): the drop line it came from, the cache rows it was made
# from (in order), the prompt file and the model. Rejected rows carry the same.
_LINEAGE = [
    ("kind", pa.string()),  # rewrite | entigraph_summary | entigraph_pair | entigraph_triple | entities
    ("style", pa.string()),  # the prompt's name
    ("doc_id", pa.string()),
    ("drop_id", pa.string()),
    ("drop_version", pa.string()),  # the version of the drop the document was read from (null: made before versions were recorded)
    ("source_file", pa.string()),
    ("source_line", pa.int64()),
    ("request_ids", pa.list_(pa.string())),
    ("prompt_sha", pa.string()),
    ("model", pa.string()),
    ("model_fingerprint", pa.string()),
]
SYNTHETIC = pa.schema(
    [
        ("synth_id", pa.string()),
        *_LINEAGE,
        ("chunk_starts", pa.list_(pa.int64())),  # source character offset of each chunk, aligned with request_ids
        ("entities", pa.list_(pa.string())),
        ("text", pa.string()),
        ("language", pa.string()),
        ("n_tokens", pa.int64()),
        ("source_tokens", pa.int64()),
        ("length_ratio", pa.float64()),
        ("number_coverage", pa.float64()),
        ("entity_coverage", pa.float64()),
        ("copy_similarity", pa.float64()),
        ("judge_request_ids", pa.list_(pa.string())),  # the judge's verdicts, one per kept chunk (null: not judged)
        ("chunks", pa.int64()),  # chunks the document was cut into (rewrites)
        ("chunks_kept", pa.int64()),  # of them, those whose output is in `text` (fewer only with on_failed_chunk: drop_chunk)
    ]
)
SYNTHETIC_REJECTS = pa.schema(
    [
        *_LINEAGE, ("chunk_index", pa.int64()), ("reason_code", pa.string()), ("reason", pa.string()), ("text", pa.string()),
        ("chunk_dropped", pa.bool_()),  # true: only this chunk was dropped, the rest of its document kept (drop_chunk)
    ]
)  # fmt: skip
# entity_graphs: one summary row per document, and its entities one per row
ENTITY_SUMMARIES = pa.schema(
    [
        ("doc_id", pa.string()),
        ("drop_id", pa.string()),
        ("drop_version", pa.string()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("language", pa.string()),
        ("summary", pa.string()),
        ("n_entities", pa.int64()),
        ("request_ids", pa.list_(pa.string())),
        ("attempts", pa.int64()),  # step-1 requests it took for the answer to parse (request_ids: the attempt that parsed)
        ("prompt_sha", pa.string()),
        ("model", pa.string()),
        ("model_fingerprint", pa.string()),
    ]
)
ENTITIES = pa.schema([("doc_id", pa.string()), ("entity", pa.string()), ("position", pa.int64())])

# A row of a training-mix shard: `origin` is original | rewrite:<style> | entigraph (DESIGN.md); every row
# names its document and drop, and a synthetic row its synth_id (an original's is null).
MIX_SHARD = pa.schema(
    [("text", pa.string()), ("origin", pa.string()), ("synth_id", pa.string()), ("doc_id", pa.string()),
     ("drop_id", pa.string()), ("drop_version", pa.string()), ("n_tokens", pa.int64())]
)  # fmt: skip


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


# -- synthetic outputs (validated in memory, before their version is written) -------------------------


def _exact_columns(frame: pl.DataFrame, schema: pa.Schema, name: str) -> Outcome:
    missing = [c for c in schema.names if c not in frame.columns]
    extra = [c for c in frame.columns if c not in schema.names]
    failures = [f"{name}: missing columns {missing}"] if missing else []
    failures += [f"{name}: unexpected columns {extra}"] if extra else []
    return Outcome(not failures, failures, {"columns": frame.columns})


def synthetic_suite(language: str, doc_ids: list[str]) -> list[Any]:
    """Every row has an id, leads back to a document of the subset and to at least one generation,
    says which prompt and model made it, has text, and is in the partition's language."""
    gxe = expect()
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="synth_id"),
        gxe.ExpectColumnValuesToBeUnique(column="synth_id"),
        gxe.ExpectColumnValuesToBeInSet(column="doc_id", value_set=doc_ids),
        gxe.ExpectColumnValuesToBeBetween(column="n_requests", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt_sha"),
        gxe.ExpectColumnValuesToNotBeNull(column="model_fingerprint"),
        gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="language", value_set=[language]),
    ]


def check_token_counts(frame: pl.DataFrame, count: Callable[[list[str]], list[int]]) -> Outcome:
    """Every row's `n_tokens` is the target tokenizer's count of its `text`: budgets and mixes add these up."""
    if "n_tokens" not in frame.columns or "text" not in frame.columns:
        return Outcome(False, ["rows: n_tokens or text missing"], {})
    counted = pl.Series("counted", count(frame["text"].to_list()) if frame.height else [], dtype=pl.Int64)
    wrong = frame.select("synth_id", "n_tokens").with_columns(counted).filter(pl.col("n_tokens").ne_missing(pl.col("counted")))
    failures = [
        f"{wrong.height} rows' n_tokens differ from the target tokenizer's count of their text, e.g. "
        + ", ".join(f"{r['synth_id']} ({r['n_tokens']} != {r['counted']})" for r in wrong.head(5).to_dicts())
    ] if wrong.height else []  # fmt: skip
    details = {"n_tokens_match_text": {"success": not wrong.height, "rows": frame.height, "wrong": wrong["synth_id"].to_list()[:20]}}
    return Outcome(not wrong.height, failures, details)


def check_synthetic(frame: pl.DataFrame, language: str, doc_ids: list[str], *, count: Callable[[list[str]], list[int]]) -> Outcome:
    """The synthetic suite, the exact columns, and every row's n_tokens against `count` (the target tokenizer's)."""
    narrowed = frame.select(
        "synth_id", "doc_id", "prompt_sha", "model_fingerprint", "language",
        pl.col("request_ids").list.len().alias("n_requests"), pl.col("text").str.len_chars().alias("text_chars"),
    )  # fmt: skip
    return merge(
        {
            "schema": _exact_columns(frame, SYNTHETIC, "rows"),
            "rows": run_suite("synthetic", narrowed, synthetic_suite(language, doc_ids)),
            "tokens": check_token_counts(frame, count),
        }
    )


def check_entity_graphs(summaries: pl.DataFrame, entities: pl.DataFrame, doc_ids: list[str]) -> Outcome:
    """One summary per subset document at most, entities only of documents that have a summary."""
    gxe = expect()
    narrowed = summaries.select("doc_id", "n_entities", pl.col("request_ids").list.len().alias("n_requests"))
    return merge(
        {
            "summaries_schema": _exact_columns(summaries, ENTITY_SUMMARIES, "summaries"),
            "entities_schema": _exact_columns(entities, ENTITIES, "entities"),
            "summaries": run_suite(
                "entity_summaries",
                narrowed,
                [
                    gxe.ExpectColumnValuesToBeUnique(column="doc_id"),
                    gxe.ExpectColumnValuesToBeInSet(column="doc_id", value_set=doc_ids),
                    gxe.ExpectColumnValuesToBeBetween(column="n_requests", min_value=1),
                    gxe.ExpectColumnValuesToBeBetween(column="n_entities", min_value=0),
                ],
            ),
            "entities": run_suite(
                "entities",
                entities.select("doc_id", pl.col("entity").str.len_chars().alias("entity_chars")),
                [
                    gxe.ExpectColumnValuesToBeInSet(column="doc_id", value_set=summaries["doc_id"].to_list()),
                    gxe.ExpectColumnValuesToBeBetween(column="entity_chars", min_value=1),
                ],
            ),
        }
    )


def check_generations(request_ids: list[str], finished: set[str]) -> Outcome:
    """Every generation a row names is a successful row of the cache: its lineage resolves."""
    missing = sorted(set(request_ids) - finished)
    details = {"generations_resolve": {"success": not missing, "referenced": len(set(request_ids)), "missing": len(missing)}}
    failures = [f"{len(missing)} request_ids are not successful generations in the cache, e.g. {missing[:3]}"] if missing else []
    return Outcome(not missing, failures, details)


def check_mix(rows: pl.DataFrame, origins: list[str], planned: dict[str, tuple[int, int]]) -> Outcome:
    """The shards' rows before publishing: the contract's columns, text and tokens in every row, only the
    recipe's origins, a synth_id on every synthetic row, and each origin's tokens at most its target and
    short of it by less than one of its documents (`planned`: origin -> (target, largest document))."""
    narrowed = rows.select(
        "origin", "doc_id", "n_tokens", pl.col("text").str.len_chars().alias("text_chars"),
        (pl.col("synth_id").is_not_null() | (pl.col("origin") == "original")).alias("has_lineage"),
    )  # fmt: skip
    return check_mix_columns(narrowed, rows.columns, origins, planned)


def check_mix_columns(narrowed: pl.DataFrame, columns: list[str], origins: list[str], planned: dict[str, tuple[int, int]]) -> Outcome:
    """`check_mix` of rows given only as what its suite reads (`origin`, `doc_id`, `n_tokens`, `text_chars`,
    `has_lineage`) and their column names: a mix of millions of rows is checked without its texts or ids,
    and GX's pandas copy holds only these narrow columns."""
    gxe = expect()
    suite = run_suite(
        "mix_rows",
        narrowed,
        [
            gxe.ExpectColumnValuesToBeInSet(column="origin", value_set=origins),
            gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
            gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
            gxe.ExpectColumnValuesToBeInSet(column="has_lineage", value_set=[True]),
        ],
    )
    got = dict(narrowed.group_by("origin").agg(pl.col("n_tokens").sum()).iter_rows()) if narrowed.height else {}
    off = {
        o: (got.get(o, 0), t) for o, (t, largest) in planned.items() if not (t - max(largest, 1) < got.get(o, 0) <= t or got.get(o, 0) == t)
    }
    tokens = Outcome(not off, [f"tokens of {o}: {g:,}, target {t:,}" for o, (g, t) in off.items()], {"tokens_by_origin": got})
    schema = _exact_columns(pl.DataFrame(schema=dict.fromkeys(columns, pl.Null)), MIX_SHARD, "mix rows")
    return merge({"schema": schema, "rows": suite, "tokens": tokens})


def check_pass_rate(pass_rate: float, minimum: float) -> Outcome:
    gxe = expect()
    frame = pl.DataFrame({"pass_rate": [float(pass_rate)]})
    return run_suite("pass_rate", frame, [gxe.ExpectColumnValuesToBeBetween(column="pass_rate", min_value=minimum, max_value=1.0)])


def check_scores(scores: pl.DataFrame) -> Outcome:
    """One row per set, each with its counts, and ratios where they are ratios."""
    gxe = expect()
    narrowed = scores.select("set", "rows", "tokens", "distinct_1", "near_duplicate_rate")
    return run_suite(
        "eval_scores",
        narrowed,
        [
            gxe.ExpectColumnValuesToBeUnique(column="set"),
            gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="tokens", min_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="distinct_1", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="near_duplicate_rate", min_value=0, max_value=1),
        ],
    )
