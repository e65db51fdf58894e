"""One synthesis output of one `language|quality` partition: inputs read, generation run, tables and
their checks made, metadata gathered. Plain functions: the Dagster assets (defs/synthesis.py), the
CLI and the benchmark call the same ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import check_entity_graphs, check_generations, check_pass_rate, check_synthetic
from synth_cpt.core.layout import (
    ENTITY_GRAPHS,
    ENTITY_ROWS,
    QUALITY_SUBSETS,
    SUMMARIES,
    SYNTHETIC_REJECTS,
    SYNTHETIC_ROWS,
    generation_scope,
    partition_file,
)
from synth_cpt.core.metadata import sample_markdown
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome, merge
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.synthesis.chunking import Count
from synth_cpt.synthesis.entigraph import Budget, extract_entity_graphs, relation_corpus
from synth_cpt.synthesis.fidelity import GateContext
from synth_cpt.synthesis.outputs import published_table
from synth_cpt.synthesis.prompts import Prompt, judge_for
from synth_cpt.synthesis.rewrite import rewrite_documents
from synth_cpt.synthesis.rows import SourceDocument, SynthesisResult
from synth_cpt.text.langid import identify

ROWS_VALID = "rows_valid"
PASS_RATE = "pass_rate"
SOURCE_COLUMNS = ["doc_id", "text", "language", "drop_id", "drop_version", "source_file", "source_line", "title"]


def read_sources(storage: Storage, key: str) -> pl.DataFrame:
    """A subset's source columns; one written before drop versions were recorded reads with a null drop_version."""
    with contextlib.closing(storage.parquet_file(key)) as pf:
        present = set(pf.schema_arrow.names)
    frame = storage.read_parquet(key, columns=[c for c in SOURCE_COLUMNS if c in present])
    return frame if "drop_version" in frame.columns else frame.with_columns(pl.lit(None, pl.String).alias("drop_version"))


@dataclass
class PartitionInputs:
    """What every generation step of a partition reads: its documents (the subset, capped), the
    subset's doc_ids (for lineage checks), the two token counters and the gate's tools. `count` is the
    target tokenizer's (rows' n_tokens, `tokens` metadata, the gate's length rules: data); `prompt_count`
    is the generator's (chunks and carried context: what is sent)."""

    language: str
    quality: str
    documents: list[SourceDocument]
    subset_doc_ids: list[str]
    count: Count
    prompt_count: Count
    gate: GateContext
    seed: int


def partition_inputs(
    storage: Storage, config: PipelineConfig, language: str, quality: str, count: Count, prompt_count: Count | None = None
) -> PartitionInputs:
    """The partition's inputs; without `prompt_count` (the generator's tokenizer is not known) the target counter chunks too."""
    frame = read_sources(storage, partition_file(QUALITY_SUBSETS, language, quality))
    cap = config.synthesis.max_documents
    chosen = frame.head(cap) if cap is not None else frame  # the subset's own order: best score first
    gate = GateContext(count=count, identify=identify, min_language_confidence=config.synthesis.min_language_confidence)
    return PartitionInputs(
        language, quality, SourceDocument.from_frame(chosen), frame["doc_id"].to_list(), count, prompt_count or count, gate,
        config.seeds.synthesis,
    )  # fmt: skip


@dataclass
class StepOutput:
    """Tables to publish together, the checks guarding them, and the metadata of the step."""

    tables: dict[str, pl.DataFrame]
    outcomes: dict[str, Outcome]
    metadata: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    tokens: int = 0
    prompts: list[Prompt] = field(default_factory=list)  # the prompt files the rows name (archived by SHA before publishing)
    engine_used: bool = True  # False: nothing was generated (a style not routed here), so the run's engine figures are not its own


def _examples(documents: list[SourceDocument], rows: pl.DataFrame, n: int = 3) -> str:
    sources = {d.doc_id: d.text for d in documents}
    picked = rows.head(n).select("doc_id", "text").to_dicts()
    return sample_markdown([{"doc_id": r["doc_id"][:12], "source": sources.get(r["doc_id"], ""), "output": r["text"]} for r in picked])


FAILED_LISTED = 1000  # failed requests named one by one in a step's metadata; every one of them is in the cache with its error


def failed_requests(result: SynthesisResult) -> dict[str, Any]:
    """Every request of the step that ended without an answer, by request_id, with its reason, and the count
    by reason: what the next materialization sends again (and nothing else). Beyond FAILED_LISTED only counted."""
    failed: dict[str, str] = {}
    for run in result.batch.runs:
        failed.update(run.failures)
    by_reason: dict[str, int] = {}
    for reason in failed.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    listed = dict(sorted(failed.items())[:FAILED_LISTED])
    return {
        "failed_requests": listed,
        "failed_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        **({"failed_requests_not_listed": len(failed) - len(listed)} if len(failed) > len(listed) else {}),
    }


def _common(result: SynthesisResult, prompts: list[Prompt], engine: GenerationEngine | None) -> dict[str, Any]:
    rates = result.pass_rates()
    return {
        **result.batch.metadata(),
        **failed_requests(result),
        "pass_rate": rates["pass_rate"],
        "candidates": rates["candidates"],
        "rejected_by_reason": rates["rejected_by_reason"],
        "rejected_share_by_reason": rates["rejected_share_by_reason"],
        "dropped_chunks_by_reason": rates["dropped_chunks_by_reason"],
        "prompt_sha": {p.id: p.sha for p in prompts},
        "model": engine.model if engine else None,
        "model_fingerprint": engine.fingerprint if engine else None,
    }


def _resolves(outcome: Outcome, engine: GenerationEngine, scope: str, *frames: pl.DataFrame) -> Outcome:
    """`outcome` and the check that every request_id the frames name is in the cache."""
    ids: list[str] = []
    for frame in frames:
        ids += frame["request_ids"].explode().drop_nulls().to_list()
        if "judge_request_ids" in frame.columns:
            ids += frame["judge_request_ids"].explode().drop_nulls().to_list()
    return merge({"rows": outcome, "lineage": check_generations(ids, engine.cache.finished_ids(set(ids), scope) if ids else set())})


def empty_step(reason: str, minimum_pass_rate: float, tables: dict[str, pl.DataFrame]) -> StepOutput:
    """A partition the style is not routed to: published empty, with the reason."""
    return StepOutput(
        tables=tables,
        outcomes={ROWS_VALID: Outcome(True), PASS_RATE: check_pass_rate(1.0, minimum_pass_rate)},
        metadata={"not_routed": reason},
        engine_used=False,
    )


def rewrite_step(
    engine: GenerationEngine, inputs: PartitionInputs, prompt: Prompt, judge: Prompt | None, asset: str, minimum_pass_rate: float
) -> StepOutput:
    """One style on one partition. `judge`: the configured judge (synthesis.judge); a style whose file says
    `judge: true` is judged without it (`judge_for`)."""
    judge = judge_for(prompt, judge)
    scope = generation_scope(asset, inputs.language, inputs.quality)
    result = rewrite_documents(
        engine, prompt, inputs.documents, prompt_count=inputs.prompt_count, gate=inputs.gate, scope=scope, seed=inputs.seed, judge=judge
    )
    rows, rejects = result.frames()
    rates = result.pass_rates()
    return StepOutput(
        tables={SYNTHETIC_ROWS: rows, SYNTHETIC_REJECTS: rejects},
        outcomes={
            ROWS_VALID: _resolves(check_synthetic(rows, inputs.language, inputs.subset_doc_ids, count=inputs.count), engine, scope, rows),
            PASS_RATE: check_pass_rate(rates["pass_rate"], minimum_pass_rate),
        },
        metadata={
            **_common(result, [prompt, *([judge] if judge else [])], engine),
            "documents": len(inputs.documents),
            "chunks": result.chunks,
            "examples": _examples(inputs.documents, rows),
        },
        rows=rows.height,
        tokens=int(rows["n_tokens"].sum() or 0),
        prompts=[prompt, *([judge] if judge else [])],
    )


def entity_graphs_step(
    engine: GenerationEngine,
    inputs: PartitionInputs,
    prompt: Prompt,
    max_entities: int | None,
    minimum_pass_rate: float,
    max_attempts: int = 1,
) -> StepOutput:
    scope = generation_scope(ENTITY_GRAPHS, inputs.language, inputs.quality)
    graphs = extract_entity_graphs(
        engine, prompt, inputs.documents, prompt_count=inputs.prompt_count, scope=scope, seed=inputs.seed, max_entities=max_entities,
        max_attempts=max_attempts,
    )  # fmt: skip
    _, rejects = graphs.result.frames()
    rates = graphs.result.pass_rates(accepted=graphs.summaries.height)
    per_doc = graphs.entities.group_by("doc_id").len()
    return StepOutput(
        tables={SUMMARIES: graphs.summaries, ENTITY_ROWS: graphs.entities, SYNTHETIC_REJECTS: rejects},
        outcomes={
            ROWS_VALID: _resolves(
                check_entity_graphs(graphs.summaries, graphs.entities, inputs.subset_doc_ids), engine, scope, graphs.summaries
            ),
            PASS_RATE: check_pass_rate(rates["pass_rate"], minimum_pass_rate),
        },
        metadata={
            **_common(graphs.result, [prompt], engine),
            "pass_rate": rates["pass_rate"],
            "candidates": rates["candidates"],
            "rejected_share_by_reason": rates["rejected_share_by_reason"],
            "documents": len(inputs.documents),
            **graphs.metadata(),
            "entities": graphs.entities.height,
            "entities_per_document_max": int(per_doc["len"].max() or 0) if per_doc.height else 0,
            "examples": sample_markdown(
                graphs.summaries.head(3).select(pl.col("doc_id").str.slice(0, 12), "n_entities", "summary").to_dicts()
            ),
        },
        rows=graphs.summaries.height,
        tokens=sum(inputs.count(graphs.summaries["summary"].to_list())) if graphs.summaries.height else 0,
        prompts=[prompt],
    )


def entigraph_corpus_step(
    engine: GenerationEngine,
    storage: Storage,
    inputs: PartitionInputs,
    prompts: dict[str, Prompt],
    budget: Budget,
    asset: str,
    minimum_pass_rate: float,
) -> StepOutput:
    summaries = published_table(storage, ENTITY_GRAPHS, inputs.language, inputs.quality, SUMMARIES)
    entities = published_table(storage, ENTITY_GRAPHS, inputs.language, inputs.quality, ENTITY_ROWS)
    if summaries is None or entities is None:
        raise FileNotFoundError(
            f"entity_graphs {inputs.language}|{inputs.quality} is not published: materialize entity_graphs for this partition first"
        )
    pair, triple = prompts["pair"], prompts["triple"]
    scope = generation_scope(asset, inputs.language, inputs.quality)
    result, figures = relation_corpus(
        engine, pair, triple, prompts["entities"].sha, inputs.documents, summaries, entities,
        prompt_count=inputs.prompt_count, gate=inputs.gate, scope=scope, seed=inputs.seed, budget=budget,
    )  # fmt: skip
    rows, rejects = result.frames()
    rates = result.pass_rates()
    by_kind = rows.group_by("kind").agg(pl.len().alias("rows"), pl.col("n_tokens").sum().alias("tokens")).sort("kind")
    return StepOutput(
        tables={SYNTHETIC_ROWS: rows, SYNTHETIC_REJECTS: rejects},
        outcomes={
            ROWS_VALID: _resolves(check_synthetic(rows, inputs.language, inputs.subset_doc_ids, count=inputs.count), engine, scope, rows),
            PASS_RATE: check_pass_rate(rates["pass_rate"], minimum_pass_rate),
        },
        metadata={
            **_common(result, [prompts["entities"], pair, triple], engine),
            **figures.metadata(),
            "by_kind": {r["kind"]: {"rows": r["rows"], "tokens": r["tokens"]} for r in by_kind.to_dicts()},
            "examples": _examples(inputs.documents, rows.filter(pl.col("kind") != "entigraph_summary")),
        },
        rows=rows.height,
        tokens=int(rows["n_tokens"].sum() or 0),
        prompts=[prompts["entities"], pair, triple],
    )
