"""EntiGraph (METHODS §5): a summary and entities per document, then texts on how its entities relate.

Step 1 asks, per chunk of a document, for JSON `{"summary", "entities"}` under a bounded schema; an
answer that does not parse is asked again (a new `attempt` in its request id) up to `max_attempts`,
as the paper retries until it parses. The chunks' summaries are joined and their entity lists merged
(normalized, deduplicated, first surface form kept; capped only when `max_entities` is set). Steps
2-3, as published: every unordered pair of a document's entities is written, then its triples,
enumerated and shuffled with a seed of (run seed, doc_id) so a document's plan does not depend on the
others, up to the triple budget. Each relation request carries the document: the whole of it when it
fits the prompt's `max_input_tokens`, else its summary and the passages that mention the entities.
The corpus is the summaries plus the relations. What is sent is bounded by the generator's tokenizer
(`prompt_count`); every row's `n_tokens` is the target tokenizer's (`gate.count`: it counts data).
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import polars as pl

from synth_cpt.core.contracts import ENTITIES, ENTITY_SUMMARIES
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest
from synth_cpt.generation.structured import parse_json_output
from synth_cpt.synthesis.chunking import Chunk, Count, chunk_document
from synth_cpt.synthesis.fidelity import FAILED, GateContext, check_document, clean_piece
from synth_cpt.synthesis.prompts import Prompt
from synth_cpt.synthesis.rewrite import document_chunks, lineage
from synth_cpt.synthesis.rows import SourceDocument, SynthesisResult, synth_id, table

SUMMARY = "entigraph_summary"
PAIR = "entigraph_pair"
TRIPLE = "entigraph_triple"
ENTITY_STEP = "entities"
MAX_ENTITY_CHARS = 80
PASSAGES = 4  # a long document is cut into passages of a quarter of what is left after its summary
GAP = "\n\n[...]\n\n"  # between two passages that are not adjacent in the document
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


def merge_entities(lists: list[list[Any]], limit: int | None = None) -> list[str]:
    """Chunk lists merged in order, normalized and deduplicated by key; at most `limit` (None: all, the paper)."""
    seen: set[str] = set()
    merged: list[str] = []
    for items in lists:
        for raw in items:
            name = normalize_entity(raw)
            if name is None or entity_key(name) in seen:
                continue
            seen.add(entity_key(name))
            merged.append(name)
            if limit is not None and len(merged) >= limit:
                return merged
    return merged


@dataclass
class EntityGraphs:
    summaries: pl.DataFrame
    entities: pl.DataFrame
    result: SynthesisResult
    attempts: dict[str, int] = field(default_factory=dict)  # doc_id -> most attempts one of its chunks took

    def metadata(self) -> dict[str, int]:
        """How hard step 1 had to retry: documents that needed more than one attempt, and the extra requests."""
        return {
            "documents_retried": sum(n > 1 for n in self.attempts.values()),
            "attempts_max": max(self.attempts.values(), default=0),
        }


def entity_requests(prompt: Prompt, doc: SourceDocument, *, prompt_count: Count, seed: int) -> list[tuple[Chunk, ChatRequest]]:
    """Step 1's first request for each chunk of `doc` (chunked by the generator's tokenizer); a retry is
    the same request with `attempt` > 0 (a new request id, so a new seed)."""
    chunks = document_chunks(prompt, doc, prompt_count)
    return [(ch, prompt.request(doc.language, seed=seed, text=ch.text, title=doc.title or "")) for ch in chunks]


@dataclass
class _Ask:
    """One chunk of step 1 across its attempts."""

    request: ChatRequest
    ids: list[str] = field(default_factory=list)  # every attempt's request id, in order
    value: dict[str, Any] | None = None
    problem: str | None = None
    text: str | None = None
    failed: bool = False  # the engine recorded a failure: asked again on the next materialization, not here


def extract_entity_graphs(
    engine: GenerationEngine,
    prompt: Prompt,
    documents: list[SourceDocument],
    *,
    prompt_count: Count,
    scope: str,
    seed: int = 0,
    max_entities: int | None = None,
    max_attempts: int = 3,
) -> EntityGraphs:
    """Step 1 for every document. An answer that is not JSON of the schema is asked again with the next
    attempt index, up to `max_attempts` (every attempt is cached, so a rerun sends nothing already
    answered); a document with a chunk that failed or never parsed is rejected whole."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    result = SynthesisResult()
    spec = prompt.spec
    plans = [(doc, [_Ask(req) for _, req in entity_requests(prompt, doc, prompt_count=prompt_count, seed=seed)]) for doc in documents]
    plans = [(doc, asks) for doc, asks in plans if asks]
    doomed: set[str] = set()
    pending = [(doc, ask) for doc, asks in plans for ask in asks]
    for attempt in range(max_attempts):
        pending = [(doc, ask) for doc, ask in pending if doc.doc_id not in doomed]
        if not pending:
            break
        requests = [replace(ask.request, attempt=attempt) for _, ask in pending]
        answers = result.batch.ask(engine, requests, scope)
        retry = []
        for (doc, ask), rid in zip(pending, engine.request_ids(requests), strict=True):
            ask.ids.append(rid)
            answer = answers.get(rid)
            if answer is None:
                ask.failed, ask.problem, ask.text = True, "the request failed (retried on the next materialization)", None
                doomed.add(doc.doc_id)
                continue
            value, problem = (None, answer.unusable) if answer.unusable else parse_json_output(answer.text, spec.json_schema)
            ask.value, ask.problem, ask.text = value, problem, answer.text
            if problem:
                retry.append((doc, ask))
        pending = retry
    summaries: list[dict[str, Any]] = []
    entity_rows: list[dict[str, Any]] = []
    attempts: dict[str, int] = {}
    for doc, asks in plans:
        attempts[doc.doc_id] = max(len(a.ids) for a in asks)
        bad = next(((k, a) for k, a in enumerate(asks) if a.problem), None)
        if bad is not None:
            k, ask = bad
            tried = "" if ask.failed else f" (after {len(ask.ids)} attempt{'s' * (len(ask.ids) > 1)})"
            base = lineage(doc, prompt, engine, [rid for a in asks for rid in a.ids], kind=ENTITY_STEP)
            result.reject(base, FAILED, f"chunk {k}: {ask.problem}{tried}", ask.text, k)
            continue
        rids = [a.ids[-1] for a in asks]  # the answers the graph is made from
        parsed = [a.value or {} for a in asks]
        names = merge_entities([p.get("entities", []) for p in parsed], max_entities)
        summary = " ".join(" ".join(str(p.get("summary", "")).split()) for p in parsed).strip()
        summaries.append(
            {
                "doc_id": doc.doc_id, "drop_id": doc.drop_id, "drop_version": doc.drop_version, "source_file": doc.source_file, "source_line": doc.source_line,
                "language": doc.language, "summary": summary, "n_entities": len(names), "request_ids": rids,
                "attempts": attempts[doc.doc_id], "prompt_sha": prompt.sha, "model": engine.model, "model_fingerprint": engine.fingerprint,
            }
        )  # fmt: skip
        entity_rows += [{"doc_id": doc.doc_id, "entity": name, "position": i} for i, name in enumerate(names)]
    return EntityGraphs(
        table(summaries, ENTITY_SUMMARIES).sort("doc_id"), table(entity_rows, ENTITIES).sort(["doc_id", "position"]), result, attempts
    )


# -- steps 2 and 3 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many triples a document gets after all its pairs (the paper writes every pair): a count
    (`triples_per_document`; 0 none, None no count), and/or output tokens (`tokens_per_document`,
    divided by the triple prompt's `max_tokens`, the most one text can cost). Both None: every triple."""

    triples: int | None = 8
    tokens: int | None = None

    def triples_limit(self, max_tokens: int) -> int | None:
        """Triples per document (None: all of them)."""
        limits = [v for v in (self.triples, self.tokens // max_tokens if self.tokens is not None else None) if v is not None]
        return min(limits) if limits else None

    def arithmetic(self, max_tokens: int) -> str:
        parts = []
        if self.triples is not None:
            parts.append(f"triples_per_document {self.triples}")
        if self.tokens is not None:
            parts.append(f"tokens_per_document {self.tokens:,} // max_tokens {max_tokens} = {self.tokens // max_tokens}")
        if not parts:
            return "every pair and every triple per document (no triple budget)"
        limit = self.triples_limit(max_tokens)
        rule = f"min({', '.join(parts)}) = {limit}" if len(parts) > 1 else parts[0]
        return f"every pair, then triples: {rule} per document"


def _nth_combination(n: int, r: int, index: int) -> tuple[int, ...]:
    """The `index`-th r-combination of range(n) in lexicographic order (itertools' order)."""
    c = math.comb(n, r)
    if not 0 <= index < c:
        raise IndexError(index)
    out: list[int] = []
    i = 0
    while r:
        c, n, r = c * r // n, n - 1, r - 1
        while index >= c:
            index -= c
            c, n = c * (n - r) // n, n - 1
            i += 1
        out.append(i)
        i += 1
    return tuple(out)


def relation_plan(entities: list[str], doc_id: str, seed: int, triples: int | None) -> list[tuple[str, ...]]:
    """Every pair, shuffled; then triples, up to `triples` (None: all). The triples are a seeded shuffle
    of their enumeration cut at the budget: drawn as indices into it (`random.sample`), so the n^3 list is
    never built when the budget is small. Seeded by (seed, doc_id): a plan depends on its document only."""
    rng = random.Random(f"{seed}:{doc_id}")
    n = len(entities)
    pairs = [(entities[a], entities[b]) for a, b in (_nth_combination(n, 2, i) for i in range(math.comb(n, 2)))]
    rng.shuffle(pairs)
    total = math.comb(n, 3)
    picks = rng.sample(range(total), total if triples is None else min(triples, total))
    trios = [tuple(entities[i] for i in _nth_combination(n, 3, k)) for k in picks]
    return [*pairs, *trios]


@dataclass
class RelationFigures:
    documents: int = 0
    pairs_possible: int = 0
    triples_possible: int = 0
    pairs_planned: int = 0
    triples_planned: int = 0
    pairs_written: int = 0
    triples_written: int = 0
    with_whole_document: int = 0  # relation requests that carried the whole document
    with_passages: int = 0  # ... its summary and passages (the document was over the prompt's input limit)
    budget: str = ""
    per_document: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, int | str]:
        return {
            "documents_with_entities": self.documents,
            "pairs_possible": self.pairs_possible,
            "triples_possible": self.triples_possible,
            "pairs_planned": self.pairs_planned,
            "triples_planned": self.triples_planned,
            "pairs_written": self.pairs_written,
            "triples_written": self.triples_written,
            "relations_with_whole_document": self.with_whole_document,
            "relations_with_summary_and_passages": self.with_passages,
            "budget": self.budget,
        }


def _iter_docs(summaries: pl.DataFrame, entities: pl.DataFrame) -> Iterator[tuple[dict[str, Any], list[str]]]:
    by_doc: dict[str, list[str]] = {}
    for row in entities.sort(["doc_id", "position"]).iter_rows(named=True):
        by_doc.setdefault(row["doc_id"], []).append(row["entity"])
    for row in summaries.sort("doc_id").iter_rows(named=True):
        yield row, by_doc.get(row["doc_id"], [])


@dataclass(frozen=True)
class RelationContext:
    """What a relation request carries about its document: the whole of it (`summary` empty), or its
    summary and the passages that mention the entities, in document order."""

    whole: bool
    summary: str
    chunks: tuple[Chunk, ...]
    text: str


class DocumentContexts:
    """A document as a relation prompt can carry it, within the prompt's `max_input_tokens` (generator's
    tokens): the whole document when it fits; else its summary (the head of it that fits half the limit)
    and, for each combination, as many passages as fit what is left: those mentioning the most of the
    entities first, then carried in document order. Computed once per document and prompt."""

    def __init__(self, prompt: Prompt, doc: SourceDocument, summary: str, prompt_count: Count) -> None:
        self.count = prompt_count
        limit = prompt.spec.chunking.max_input_tokens
        self.doc = doc
        self.whole = prompt_count([doc.text])[0] <= limit
        if self.whole:
            self.summary, self.passages, self.room = "", [Chunk(0, 0, len(doc.text), doc.text, limit)], limit
            return
        self.summary = summary
        if summary and prompt_count([summary])[0] > limit // 2:
            self.summary = chunk_document(summary, max(1, limit // 2), prompt_count, "sentences", doc.language)[0].text.strip()
        self.room = limit - (prompt_count([self.summary])[0] if self.summary else 0)
        split = prompt.spec.chunking.split
        self.passages = chunk_document(doc.text, max(1, self.room // PASSAGES), prompt_count, split, doc.language)
        self.folded = [entity_key(p.text) for p in self.passages]
        self.gap = prompt_count([GAP])[0]

    def _join(self, chosen: list[Chunk]) -> str:
        parts: list[str] = []
        for i, ch in enumerate(chosen):
            if i and chosen[i - 1].end != ch.start:
                parts.append(GAP)
            parts.append(ch.text)
        return "".join(parts)

    def for_entities(self, names: tuple[str, ...]) -> RelationContext:
        if self.whole:
            return RelationContext(True, "", tuple(self.passages), self.doc.text)
        keys = [entity_key(n) for n in names]
        hits = [sum(k in folded for k in keys) for folded in self.folded]
        order = sorted(range(len(self.passages)), key=lambda i: (-hits[i], i))
        if any(hits):
            order = [i for i in order if hits[i]]
        chosen: list[Chunk] = []
        used = 0
        for i in order:  # a bound from the passages' own counts; the joined text is checked below
            cost = self.passages[i].n_tokens + (self.gap if chosen else 0)
            if used + cost <= self.room:
                chosen.append(self.passages[i])
                used += cost
        chosen.sort(key=lambda ch: ch.index)
        text = self._join(chosen)
        while len(chosen) > 1 and self.count([text])[0] > self.room:  # token counts are not additive across joins
            chosen.remove(max(chosen, key=lambda ch: (-hits[ch.index], ch.index)))
            text = self._join(chosen)
        return RelationContext(False, self.summary, tuple(chosen), text)


@dataclass(frozen=True)
class RelationJob:
    """One relation text to ask for: its entities, what of the document it carries, the request."""

    doc: SourceDocument
    prompt: Prompt
    entities: tuple[str, ...]
    context: RelationContext
    request: ChatRequest

    @property
    def kind(self) -> str:
        return PAIR if len(self.entities) == 2 else TRIPLE

    @property
    def chunk(self) -> Chunk:
        """The first part of the document carried (the whole document when it fit)."""
        return self.context.chunks[0]


def relation_jobs(
    doc: SourceDocument,
    names: list[str],
    pair_prompt: Prompt,
    triple_prompt: Prompt,
    *,
    prompt_count: Count,
    seed: int,
    budget: Budget,
    summary: str = "",
) -> list[RelationJob]:
    """The exact relation requests of one document (what `relation_corpus` sends and `prompts render`
    shows): every pair and the budgeted triples, each carrying the document (see `DocumentContexts`;
    `summary` is the document's step-1 summary, carried only when the document is over the limit)."""
    plan = relation_plan(names, doc.doc_id, seed, budget.triples_limit(triple_prompt.spec.output.max_tokens))
    contexts: dict[str, DocumentContexts] = {}
    jobs = []
    for combo in plan:
        prompt = pair_prompt if len(combo) == 2 else triple_prompt
        if prompt.name not in contexts:
            contexts[prompt.name] = DocumentContexts(prompt, doc, summary, prompt_count)
        context = contexts[prompt.name].for_entities(combo)
        request = prompt.request(
            doc.language, seed=seed, text=context.text, entities=list(combo), summary=context.summary, title=doc.title or ""
        )
        jobs.append(RelationJob(doc, prompt, combo, context, request))
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
    """The EntiGraph corpus of a partition: every summary, every pair's relation text and the budgeted
    triples'. What is carried is bounded by `prompt_count` (the generator's); every row is counted by
    `gate.count` (the target's); each relation text is checked against what its request carried."""
    result = SynthesisResult()
    figures = RelationFigures(budget=budget.arithmetic(triple_prompt.spec.output.max_tokens))
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
                    "doc_id": doc.doc_id, "drop_id": doc.drop_id, "drop_version": doc.drop_version, "source_file": doc.source_file, "source_line": doc.source_line,
                    "request_ids": row["request_ids"], "prompt_sha": entities_prompt_sha, "model": row["model"],
                    "model_fingerprint": row["model_fingerprint"], "chunk_starts": None, "entities": names, "text": row["summary"],
                    "language": doc.language, "n_tokens": gate.count([row["summary"]])[0], "source_tokens": None, "length_ratio": None,
                    "number_coverage": None, "entity_coverage": None, "copy_similarity": None,
                }
            )  # fmt: skip
        n = len(names)
        figures.pairs_possible += math.comb(n, 2)
        figures.triples_possible += math.comb(n, 3)
        doc_jobs = relation_jobs(
            doc, names, pair_prompt, triple_prompt, prompt_count=prompt_count, seed=seed, budget=budget, summary=row["summary"] or ""
        )
        if names:
            figures.documents += 1
        figures.per_document[doc.doc_id] = len(doc_jobs)
        figures.pairs_planned += sum(j.kind == PAIR for j in doc_jobs)
        figures.triples_planned += sum(j.kind == TRIPLE for j in doc_jobs)
        figures.with_whole_document += sum(j.context.whole for j in doc_jobs)
        figures.with_passages += sum(not j.context.whole for j in doc_jobs)
        jobs += doc_jobs
    requests = [j.request for j in jobs]
    ids = engine.request_ids(requests)
    answers = result.batch.ask(engine, requests, scope)
    for job, rid in zip(jobs, ids, strict=True):
        doc, prompt, combo, context, kind = job.doc, job.prompt, job.entities, job.context, job.kind
        base = {**lineage(doc, prompt, engine, [rid], kind=kind)}
        answer = answers.get(rid)
        if answer is None or answer.unusable:
            result.reject(base, FAILED, answer.unusable if answer else "the request failed (retried on the next materialization)")
            continue
        piece = clean_piece(answer.text, answer.finish_reason, prompt.spec.output)
        verdict = (
            piece
            if not piece.ok
            else check_document(context.text, piece.text, prompt.output_language(doc.language), prompt.spec.output, gate)
        )
        if not verdict.ok:
            result.reject(base, verdict.reason_code or FAILED, verdict.reason, answer.text)
            continue
        figures.pairs_written += kind == PAIR
        figures.triples_written += kind == TRIPLE
        result.accept(
            {
                "synth_id": synth_id(kind, prompt.name, doc.doc_id, [rid]), **base, "chunk_starts": [ch.start for ch in context.chunks],
                "entities": list(combo), "text": verdict.text, "language": prompt.output_language(doc.language),
                "n_tokens": verdict.figures["n_tokens"], "source_tokens": verdict.figures["source_tokens"],
                "length_ratio": verdict.figures["length_ratio"], "number_coverage": verdict.figures["number_coverage"],
                "entity_coverage": verdict.figures["entity_coverage"], "copy_similarity": verdict.figures["copy_similarity"],
               
            }
        )  # fmt: skip
    return result, figures
