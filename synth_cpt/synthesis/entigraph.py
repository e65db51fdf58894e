"""EntiGraph (METHODS §5): a summary and entities per document, then texts on how its entities relate.

Step 1 asks, per chunk of a document, for JSON `{"summary", "entities"}` under a bounded schema; the
chunks' summaries are joined and their entity lists merged (normalized, deduplicated, first surface
form kept). Steps 2-3 enumerate every pair, then every triple, of a document's entities, shuffle each
list with a seed of (run seed, doc_id) so a document's plan does not depend on the others, and
generate relation texts up to a per-document budget. The corpus is the summaries plus the relations.
Documents are chunked by the generator's tokenizer (`prompt_count`: it bounds what is sent); every
row's `n_tokens` is the target tokenizer's (`gate.count`: it counts data).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from synth_cpt.core.contracts import ENTITIES, ENTITY_SUMMARIES
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest
from synth_cpt.generation.structured import parse_json_output
from synth_cpt.synthesis.chunking import Chunk, Count
from synth_cpt.synthesis.fidelity import FAILED, GateContext, check_document, clean_piece
from synth_cpt.synthesis.prompts import Prompt
from synth_cpt.synthesis.rewrite import document_chunks, lineage
from synth_cpt.synthesis.rows import SourceDocument, SynthesisResult, synth_id, table

SUMMARY = "entigraph_summary"
PAIR = "entigraph_pair"
TRIPLE = "entigraph_triple"
ENTITY_STEP = "entities"
MAX_ENTITY_CHARS = 80
_EDGE = re.compile(r"^[\W_]+|[\W_]+$", re.U)


def normalize_entity(name: Any) -> str | None:
    """An entity as it will be used: NFC, single spaces, no surrounding quotes or punctuation; None if
    nothing usable is left (no letter or digit, or longer than an entity name can be)."""
    if not isinstance(name, str):
        return None
    text = " ".join(unicodedata.normalize("NFC", name).split())
    text = _EDGE.sub("", text)
    if not text or len(text) > MAX_ENTITY_CHARS or not any(c.isalnum() for c in text):
        return None
    return text


def entity_key(name: str) -> str:
    """Two spellings of one entity ("São Paulo", "sao paulo") share a key."""
    folded = unicodedata.normalize("NFKD", name.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c))


def merge_entities(lists: list[list[Any]], limit: int) -> list[str]:
    """Chunk lists merged in order, normalized and deduplicated by key, at most `limit`."""
    seen: set[str] = set()
    merged: list[str] = []
    for items in lists:
        for raw in items:
            name = normalize_entity(raw)
            if name is None or entity_key(name) in seen:
                continue
            seen.add(entity_key(name))
            merged.append(name)
            if len(merged) >= limit:
                return merged
    return merged


@dataclass
class EntityGraphs:
    summaries: pl.DataFrame
    entities: pl.DataFrame
    result: SynthesisResult


def entity_requests(prompt: Prompt, doc: SourceDocument, *, prompt_count: Count, seed: int) -> list[tuple[Chunk, ChatRequest]]:
    """Step 1's request for each chunk of `doc` (chunked by the generator's tokenizer)."""
    chunks = document_chunks(prompt, doc, prompt_count)
    return [(ch, prompt.request(doc.language, seed=seed, text=ch.text, title=doc.title or "")) for ch in chunks]


def extract_entity_graphs(
    engine: GenerationEngine,
    prompt: Prompt,
    documents: list[SourceDocument],
    *,
    prompt_count: Count,
    scope: str,
    seed: int = 0,
    max_entities: int = 24,
) -> EntityGraphs:
    """Step 1 for every document; a document with a failed or unreadable chunk is rejected whole."""
    result = SynthesisResult()
    spec = prompt.spec
    plans = [(doc, entity_requests(prompt, doc, prompt_count=prompt_count, seed=seed)) for doc in documents]
    plans = [(doc, asks) for doc, asks in plans if asks]
    requests = [req for _, asks in plans for _, req in asks]
    ids = iter(engine.request_ids(requests))
    answers = result.batch.ask(engine, requests, scope)
    summaries: list[dict[str, Any]] = []
    entity_rows: list[dict[str, Any]] = []
    for doc, chunks in plans:
        rids = [next(ids) for _ in chunks]
        base = lineage(doc, prompt, engine, rids, kind=ENTITY_STEP)
        parsed: list[dict[str, Any]] = []
        for k, rid in enumerate(rids):
            answer = answers.get(rid)
            if answer is None or answer.unusable:
                why = answer.unusable if answer else "the request failed (retried on the next materialization)"
                result.reject(base, FAILED, f"chunk {k}: {why}", answer.text if answer else None, k)
                break
            value, problem = parse_json_output(answer.text, spec.json_schema)
            if problem:
                result.reject(base, FAILED, f"chunk {k}: {problem}", answer.text, k)
                break
            parsed.append(value)
        else:
            names = merge_entities([p.get("entities", []) for p in parsed], max_entities)
            summary = " ".join(" ".join(str(p.get("summary", "")).split()) for p in parsed).strip()
            summaries.append(
                {
                    "doc_id": doc.doc_id, "drop_id": doc.drop_id, "source_file": doc.source_file, "source_line": doc.source_line,
                    "language": doc.language, "summary": summary, "n_entities": len(names), "request_ids": rids,
                    "prompt_sha": prompt.sha, "model": engine.model, "model_fingerprint": engine.fingerprint,
                }
            )  # fmt: skip
            entity_rows += [{"doc_id": doc.doc_id, "entity": name, "position": i} for i, name in enumerate(names)]
    return EntityGraphs(
        table(summaries, ENTITY_SUMMARIES).sort("doc_id"), table(entity_rows, ENTITIES).sort(["doc_id", "position"]), result
    )


# -- steps 2 and 3 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many relation texts a document may get: a count, or output tokens (divided by the relation
    prompt's `max_tokens`, the most one text can cost)."""

    relations: int | None = 8
    tokens: int | None = None
    triples: bool = True

    def per_document(self, max_tokens: int) -> int | None:
        limits = [v for v in (self.relations, self.tokens // max_tokens if self.tokens is not None else None) if v is not None]
        return min(limits) if limits else None

    def arithmetic(self, max_tokens: int) -> str:
        parts = []
        if self.relations is not None:
            parts.append(f"relations {self.relations}")
        if self.tokens is not None:
            parts.append(f"tokens {self.tokens:,} // max_tokens {max_tokens} = {self.tokens // max_tokens}")
        limit = self.per_document(max_tokens)
        return f"min({', '.join(parts)}) = {limit} per document" if parts else "unlimited"


def relation_plan(entities: list[str], doc_id: str, seed: int, limit: int | None, triples: bool = True) -> list[tuple[str, ...]]:
    """Pairs first, then triples, each list shuffled with (seed, doc_id), cut at `limit`. Triples are
    enumerated only when the pairs do not fill the budget (they grow as n^3)."""
    rng = random.Random(f"{seed}:{doc_id}")
    pairs = list(itertools.combinations(entities, 2))
    rng.shuffle(pairs)
    plan: list[tuple[str, ...]] = pairs[:limit] if limit is not None else pairs
    if triples and (limit is None or len(plan) < limit):
        trios = list(itertools.combinations(entities, 3))
        rng.shuffle(trios)
        plan += trios[: None if limit is None else limit - len(plan)]
    return plan


@dataclass
class RelationFigures:
    documents: int = 0
    pairs_possible: int = 0
    triples_possible: int = 0
    pairs_planned: int = 0
    triples_planned: int = 0
    per_document: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, int]:
        return {
            "documents_with_entities": self.documents,
            "pairs_possible": self.pairs_possible,
            "triples_possible": self.triples_possible,
            "pairs_planned": self.pairs_planned,
            "triples_planned": self.triples_planned,
        }


def best_chunk(chunks: list[Chunk], names: tuple[str, ...]) -> Chunk:
    """The part of the document that mentions the most of `names` (the first on a tie)."""
    keys = [entity_key(n) for n in names]
    return max(chunks, key=lambda ch: (sum(k in entity_key(ch.text) for k in keys), -ch.index))


def _iter_docs(summaries: pl.DataFrame, entities: pl.DataFrame) -> Iterator[tuple[dict[str, Any], list[str]]]:
    by_doc: dict[str, list[str]] = {}
    for row in entities.sort(["doc_id", "position"]).iter_rows(named=True):
        by_doc.setdefault(row["doc_id"], []).append(row["entity"])
    for row in summaries.sort("doc_id").iter_rows(named=True):
        yield row, by_doc.get(row["doc_id"], [])


@dataclass(frozen=True)
class RelationJob:
    """One relation text to ask for: its entities, the part of the document it is asked about, the request."""

    doc: SourceDocument
    prompt: Prompt
    entities: tuple[str, ...]
    chunk: Chunk
    request: ChatRequest

    @property
    def kind(self) -> str:
        return PAIR if len(self.entities) == 2 else TRIPLE


def relation_jobs(
    doc: SourceDocument, names: list[str], pair_prompt: Prompt, triple_prompt: Prompt, *, prompt_count: Count, seed: int, budget: Budget
) -> list[RelationJob]:
    """The exact relation requests of one document: its budgeted plan, each combination asked about
    the chunk that mentions most of its entities (what `relation_corpus` sends and `prompts render` shows)."""
    limit = budget.per_document(max(pair_prompt.spec.output.max_tokens, triple_prompt.spec.output.max_tokens))
    plan = relation_plan(names, doc.doc_id, seed, limit, budget.triples)
    chunks = document_chunks(pair_prompt, doc, prompt_count)
    jobs = []
    for combo in plan:
        prompt = pair_prompt if len(combo) == 2 else triple_prompt
        chunk = best_chunk(chunks, combo)
        request = prompt.request(doc.language, seed=seed, text=chunk.text, entities=list(combo), summary="", title=doc.title or "")
        jobs.append(RelationJob(doc, prompt, combo, chunk, request))
    return jobs


def relation_corpus(
    engine: GenerationEngine,
    pair_prompt: Prompt,
    triple_prompt: Prompt,
    entities_prompt_sha: str,
    documents: list[SourceDocument],
    summaries: pl.DataFrame,
    entities: pl.DataFrame,
    *,
    prompt_count: Count,
    gate: GateContext,
    scope: str,
    seed: int,
    budget: Budget,
) -> tuple[SynthesisResult, RelationFigures]:
    """The EntiGraph corpus of a partition: every summary, and the budgeted relation texts. Relations are
    asked about chunks cut by `prompt_count` (the generator's); every row is counted by `gate.count` (the target's)."""
    result = SynthesisResult()
    figures = RelationFigures()
    docs = {d.doc_id: d for d in documents}
    jobs: list[RelationJob] = []
    for row, names in _iter_docs(summaries, entities):
        doc = docs.get(row["doc_id"])
        if doc is None:
            continue  # the document left the subset since its graph was made
        if row["summary"]:
            result.accept(
                {
                    "synth_id": synth_id(SUMMARY, ENTITY_STEP, doc.doc_id, row["request_ids"]), "kind": SUMMARY, "style": ENTITY_STEP,
                    "doc_id": doc.doc_id, "drop_id": doc.drop_id, "source_file": doc.source_file, "source_line": doc.source_line,
                    "request_ids": row["request_ids"], "prompt_sha": entities_prompt_sha, "model": row["model"],
                    "model_fingerprint": row["model_fingerprint"], "chunk_starts": None, "entities": names, "text": row["summary"],
                    "language": doc.language, "n_tokens": gate.count([row["summary"]])[0], "source_tokens": None, "length_ratio": None,
                    "number_coverage": None, "entity_coverage": None, "copy_similarity": None, "judge_request_id": None,
                }
            )  # fmt: skip
        n = len(names)
        figures.pairs_possible += math.comb(n, 2)
        figures.triples_possible += math.comb(n, 3) if budget.triples else 0
        doc_jobs = relation_jobs(doc, names, pair_prompt, triple_prompt, prompt_count=prompt_count, seed=seed, budget=budget)
        if names:
            figures.documents += 1
        figures.per_document[doc.doc_id] = len(doc_jobs)
        figures.pairs_planned += sum(j.kind == PAIR for j in doc_jobs)
        figures.triples_planned += sum(j.kind == TRIPLE for j in doc_jobs)
        jobs += doc_jobs
    requests = [j.request for j in jobs]
    ids = engine.request_ids(requests)
    answers = result.batch.ask(engine, requests, scope)
    for job, rid in zip(jobs, ids, strict=True):
        doc, prompt, combo, chunk, kind = job.doc, job.prompt, job.entities, job.chunk, job.kind
        base = {**lineage(doc, prompt, engine, [rid], kind=kind)}
        answer = answers.get(rid)
        if answer is None or answer.unusable:
            result.reject(base, FAILED, answer.unusable if answer else "the request failed (retried on the next materialization)")
            continue
        piece = clean_piece(answer.text, answer.finish_reason, prompt.spec.output)
        verdict = (
            piece
            if not piece.ok
            else check_document(chunk.text, piece.text, prompt.output_language(doc.language), prompt.spec.output, gate)
        )
        if not verdict.ok:
            result.reject(base, verdict.reason_code or FAILED, verdict.reason, answer.text)
            continue
        result.accept(
            {
                "synth_id": synth_id(kind, prompt.name, doc.doc_id, [rid]), **base, "chunk_starts": [chunk.start],
                "entities": list(combo), "text": verdict.text, "language": prompt.output_language(doc.language),
                "n_tokens": verdict.figures["n_tokens"], "source_tokens": verdict.figures["source_tokens"],
                "length_ratio": verdict.figures["length_ratio"], "number_coverage": verdict.figures["number_coverage"],
                "entity_coverage": verdict.figures["entity_coverage"], "copy_similarity": verdict.figures["copy_similarity"],
                "judge_request_id": None,
            }
        )  # fmt: skip
    return result, figures
