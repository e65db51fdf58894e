"""Rewriting documents in one style: chunk by real tokens, ask the engine, re-join, gate.

A document is rewritten chunk by chunk and its outputs re-joined in order; if any chunk fails or is
rejected, the whole document is rejected (never silently shortened), unless the style's
`chunking.on_failed_chunk` is `drop_chunk` (Nemotron-CC segments): then that chunk is dropped, with a
reject row of its own, the kept chunks are re-joined, and the row records `chunks` and `chunks_kept`. With `autoregressive: true`
(Kimi K2), chunk k's request carries the rewritten chunks before it, so it can only be asked once
chunk k-1 is back: every document's chain runs in one engine run, each next chunk sent the moment
the one before it returns, so the engine is kept full with all the chains' next chunks.

Two counters: `prompt_count` (the generator's tokenizer) cuts chunks and the carried context, which
bound what is sent; the gate's `count` (the target tokenizer) measures the output, which is data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest, Generation
from synth_cpt.generation.structured import parse_json_output
from synth_cpt.synthesis.chunking import Chunk, Count, chunk_document, join_outputs, tail_within
from synth_cpt.synthesis.fidelity import FAILED, JUDGE, NO_CHUNK_KEPT, SHAPE, GateContext, Verdict, check_document, clean_piece, has_shape
from synth_cpt.synthesis.prompts import Prompt, judge_for
from synth_cpt.synthesis.rows import Answer, SourceDocument, SynthesisResult, cached_answers, synth_id

KIND = "rewrite"


@dataclass
class Chain:
    """One document on its way through its chunks."""

    doc: SourceDocument
    chunks: list[Chunk]
    request_ids: list[str]  # one per chunk asked, in order
    outputs: list[str]  # cleaned outputs of the kept chunks, in order
    failed: bool = False
    kept: list[int] = field(default_factory=list)  # indices of the chunks whose output is in `outputs`

    def kept_request_ids(self) -> list[str]:
        return [self.request_ids[k] for k in self.kept]


def lineage(doc: SourceDocument, prompt: Prompt, engine: GenerationEngine, request_ids: list[str], kind: str = KIND) -> dict[str, Any]:
    return {
        "kind": kind, "style": prompt.name, "doc_id": doc.doc_id, "drop_id": doc.drop_id, "drop_version": doc.drop_version, "source_file": doc.source_file,
        "source_line": doc.source_line, "request_ids": list(request_ids), "prompt_sha": prompt.sha, "model": engine.model,
        "model_fingerprint": engine.fingerprint,
    }  # fmt: skip


def document_chunks(prompt: Prompt, doc: SourceDocument, prompt_count: Count) -> list[Chunk]:
    """`doc` cut to the prompt's `max_input_tokens`, counted by the generator's tokenizer (what it bounds is the request)."""
    c = prompt.spec.chunking
    return chunk_document(doc.text, c.max_input_tokens, prompt_count, c.split, doc.language)


def chunk_request(prompt: Prompt, chain: Chain, k: int, seed: int, prompt_count: Count) -> ChatRequest:
    """Chunk k's request; an autoregressive one carries the rewritten chunks before it, up to `context_tokens` of the generator's."""
    chunking = prompt.spec.chunking
    context = tail_within(chain.outputs[:k], chunking.context_tokens, prompt_count) if chunking.autoregressive else ""
    return prompt.request(chain.doc.language, seed=seed, text=chain.chunks[k].text, context=context, title=chain.doc.title or "")


def _take(chain: Chain, k: int, answer: Answer | None, prompt: Prompt, result: SynthesisResult, engine: GenerationEngine) -> None:
    """Record chunk k's answer in its chain; a rejected chunk rejects the whole document, or, with
    `on_failed_chunk: drop_chunk`, is dropped alone (its reject row names only its own request). A request
    that failed (no answer: retried on the next materialization) always rejects the document, so a
    transient error never publishes a shortened row that the next run would replace."""
    drop = prompt.spec.chunking.on_failed_chunk == "drop_chunk"
    output = prompt.spec.output

    def fail(code: str, reason: str, text: str | None, whole: bool = False) -> None:
        if drop and not whole:
            base = lineage(chain.doc, prompt, engine, chain.request_ids[k : k + 1])
            result.reject(base, code, f"chunk {k} dropped, the document keeps its other chunks: {reason}", text, k, dropped=True)
        else:
            chain.failed = True
            result.reject(lineage(chain.doc, prompt, engine, chain.request_ids), code, reason, text, k)

    if answer is None:
        return fail(FAILED, "the request failed (error recorded in the cache; retried on the next materialization)", None, whole=True)
    if answer.unusable:
        return fail(FAILED, f"unusable output: {answer.unusable}", answer.text)
    piece = clean_piece(answer.text, answer.finish_reason, output)
    if not piece.ok:
        return fail(piece.reason_code or FAILED, f"chunk {k}: {piece.reason}", answer.text)
    if drop and not has_shape(piece.text, output.shape):  # Nemotron-CC drops a segment without the expected shape
        return fail(SHAPE, f"chunk {k}: does not have the required {output.shape} shape", answer.text)
    chain.outputs.append(piece.text)
    chain.kept.append(k)


def run_chains(
    engine: GenerationEngine, prompt: Prompt, chains: list[Chain], prompt_count: Count, seed: int, scope: str, result: SynthesisResult
) -> None:
    """Kimi K2's chunk-wise autoregressive rewriting of every document at once: each chain's chunk k is
    asked the moment its chunk k-1 is back (`follow`), so no chain waits for the slowest of the others
    and the engine stays full while any chain has chunks left. Chunks already in the cache are
    followed without sending anything, so a crash mid-document resumes where it stopped."""
    waiting: dict[str, list[tuple[Chain, int]]] = {}
    known: dict[str, Answer | None] = {}

    def ask(c: Chain, k: int) -> list[ChatRequest]:
        request = chunk_request(prompt, c, k, seed, prompt_count)
        rid = engine.request_ids([request])[0]
        c.request_ids.append(rid)
        if rid in known:  # the same link of another chain is already back (identical chunk and context)
            return advance(c, k, known[rid])
        waiting.setdefault(rid, []).append((c, k))
        return [request] if len(waiting[rid]) == 1 else []

    def advance(c: Chain, k: int, answer: Answer | None) -> list[ChatRequest]:
        _take(c, k, answer, prompt, result, engine)
        return ask(c, k + 1) if not c.failed and k + 1 < len(c.chunks) else []

    def follow(rid: str, gen: Generation) -> list[ChatRequest]:
        answer = Answer(rid, gen.text, gen.finish_reason, gen.rejected, gen.completion_tokens or 0) if gen.ok else None
        known[rid] = answer
        return [r for c, k in waiting.pop(rid, []) for r in advance(c, k, answer)]

    first = [r for c in chains for r in ask(c, 0)]
    if first:
        result.batch.runs.append(engine.run(first, scope, follow=follow))
    for stalled in waiting.values():  # the engine ended a chain without answering its last link
        for c, k in stalled:
            _take(c, k, None, prompt, result, engine)


def rewrite_documents(
    engine: GenerationEngine,
    prompt: Prompt,
    documents: list[SourceDocument],
    *,
    prompt_count: Count,
    gate: GateContext,
    scope: str,
    seed: int = 0,
    judge: Prompt | None = None,
) -> SynthesisResult:
    """Every document rewritten in `prompt`'s style, or rejected with the reason of the rule it broke.
    `prompt_count` (the generator's tokenizer) cuts what is sent; `gate.count` (the target's) counts the rows.
    `judge`: the configured judge; a style whose file says `judge: true` is judged even without one."""
    judge = judge_for(prompt, judge)
    result = SynthesisResult()
    spec = prompt.spec
    chains = [Chain(doc, document_chunks(prompt, doc, prompt_count), [], []) for doc in documents]
    chains = [c for c in chains if c.chunks]
    result.chunks = sum(len(c.chunks) for c in chains)
    if spec.chunking.autoregressive:
        run_chains(engine, prompt, chains, prompt_count, seed, scope, result)
    else:
        requests = [chunk_request(prompt, c, k, seed, prompt_count) for c in chains for k in range(len(c.chunks))]
        ids = iter(engine.request_ids(requests))
        for c in chains:
            c.request_ids = [next(ids) for _ in c.chunks]
        answers = result.batch.ask(engine, requests, scope)
        for c in chains:
            for k, rid in enumerate(c.request_ids):
                _take(c, k, answers.get(rid), prompt, result, engine)
                if c.failed:
                    break
    passed: list[tuple[Chain, Verdict]] = []
    for c in chains:
        if c.failed:
            continue
        if not c.kept:
            result.reject(
                lineage(c.doc, prompt, engine, c.request_ids), NO_CHUNK_KEPT, f"every one of its {len(c.chunks)} chunks was dropped"
            )
            continue
        kept = [c.chunks[k] for k in c.kept]
        # the rules compare the output with the source it was made from: the kept chunks (all of them: the document)
        source = c.doc.text if len(kept) == len(c.chunks) else "".join(ch.text for ch in kept)
        joined = join_outputs(kept, c.outputs)
        verdict = check_document(source, joined, prompt.output_language(c.doc.language), spec.output, gate, source_language=c.doc.language)
        if verdict.ok:
            passed.append((c, verdict))
        else:
            result.reject(lineage(c.doc, prompt, engine, c.kept_request_ids()), verdict.reason_code or FAILED, verdict.reason, joined)
    judged = judge_rewrites(engine, prompt, judge, passed, scope, seed, result) if judge else {c.doc.doc_id: None for c, _ in passed}
    for c, verdict in passed:
        if c.doc.doc_id not in judged:
            continue
        text, n_tokens = verdict.text, verdict.figures["n_tokens"]
        if spec.output.keep_source:  # the row is the original followed by the output: count what is stored
            text = f"{c.doc.text.rstrip()}\n\n{verdict.text}"
            n_tokens = gate.count([text])[0]
        request_ids = c.kept_request_ids()
        result.accept(
            {
                "synth_id": synth_id(KIND, prompt.name, c.doc.doc_id, request_ids),
                **lineage(c.doc, prompt, engine, request_ids),
                "chunk_starts": [c.chunks[k].start for k in c.kept], "entities": None, "text": text,
                "language": prompt.output_language(c.doc.language), "n_tokens": n_tokens,
                "source_tokens": verdict.figures["source_tokens"], "length_ratio": verdict.figures["length_ratio"],
                "number_coverage": verdict.figures["number_coverage"], "entity_coverage": verdict.figures["entity_coverage"],
                "copy_similarity": verdict.figures["copy_similarity"], "judge_request_ids": judged[c.doc.doc_id],
                "chunks": len(c.chunks), "chunks_kept": len(c.kept),
            }
        )  # fmt: skip
    return result


def preview_requests(
    engine: GenerationEngine, prompt: Prompt, doc: SourceDocument, *, prompt_count: Count, scope: str, seed: int = 0
) -> list[tuple[Chunk, ChatRequest | None]]:
    """The exact request of each chunk of `doc`, as `rewrite_documents` would send it, sending nothing.
    With autoregressive chunking chunk k carries the cleaned outputs of the chunks before it: they are
    read from the cache, and where one is not there yet (or was rejected) the later requests cannot be
    known and are None."""
    chain = Chain(doc, document_chunks(prompt, doc, prompt_count), [], [])
    out: list[tuple[Chunk, ChatRequest | None]] = []
    for k, chunk in enumerate(chain.chunks):
        if chain.failed:
            out.append((chunk, None))
            continue
        request = chunk_request(prompt, chain, k, seed, prompt_count)
        out.append((chunk, request))
        if prompt.spec.chunking.autoregressive and k + 1 < len(chain.chunks):
            rid = engine.request_ids([request])[0]
            chain.request_ids.append(rid)
            _take(chain, k, cached_answers(engine, [request], scope).get(rid), prompt, SynthesisResult(), engine)
    return out


def judge_rewrites(
    engine: GenerationEngine,
    prompt: Prompt,
    judge: Prompt,
    passed: list[tuple[Chain, Verdict]],
    scope: str,
    seed: int,
    result: SynthesisResult,
) -> dict[str, list[str]]:
    """K2's fidelity verification by an LLM judge, chunk by chunk: each kept source chunk against its
    cleaned rewritten chunk (what the rewrite was asked to keep, and a request the engine can hold).
    Returns doc_id -> the judge's request_ids in chunk order, for the documents whose every chunk it
    calls faithful; the others are rejected (unfaithful, or a verdict could not be read) once each,
    naming the first such chunk."""
    asks = [
        (c, k, judge.request(c.doc.language, seed=seed, source=c.chunks[k].text, rewrite=out))
        for c, _ in passed
        for k, out in zip(c.kept, c.outputs, strict=True)
    ]
    ids = engine.request_ids([r for _, _, r in asks])
    answers = result.batch.ask(engine, [r for _, _, r in asks], scope)
    by_doc: dict[str, list[tuple[int, str]]] = {}
    for (c, k, _), rid in zip(asks, ids, strict=True):
        by_doc.setdefault(c.doc.doc_id, []).append((k, rid))
    kept: dict[str, list[str]] = {}
    for c, v in passed:
        verdicts = by_doc[c.doc.doc_id]
        judge_ids = [rid for _, rid in verdicts]
        base = lineage(c.doc, prompt, engine, [*c.kept_request_ids(), *judge_ids])
        problems = [(k, problem) for k, rid in verdicts if (problem := _judged(answers.get(rid), judge)) is not None]
        if not problems:
            kept[c.doc.doc_id] = judge_ids
            continue
        k, (code, reason) = problems[0]
        more = f" ({len(problems)} of {len(verdicts)} chunks)" if len(problems) > 1 else ""
        result.reject(base, code, f"chunk {k}{more}: {reason}", v.text, k)
    return kept


def _judged(answer: Answer | None, judge: Prompt) -> tuple[str, str] | None:
    """None when the judge calls the chunk faithful; else (reason code, reason)."""
    if answer is None or answer.unusable:
        return FAILED, f"the judge gave no usable verdict: {answer.unusable if answer else 'request failed'}"
    value, problem = parse_json_output(answer.text, judge.spec.json_schema)
    if problem or not isinstance(value, dict):
        return FAILED, f"the judge's verdict is unreadable: {problem}"
    if value.get("verdict") != "faithful":
        return JUDGE, f"judge: {json.dumps(value, ensure_ascii=False)[:300]}"
    return None
