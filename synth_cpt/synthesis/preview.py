"""Exactly what a prompt sends for one real document, without sending anything (`synth-cpt prompts render`).

Each kind is previewed by the same function its step uses to build requests, so the preview cannot
drift from what is sent: rewrites chunk by chunk (autoregressive chunks with the cached outputs of
the chunks before them), EntiGraph step 1 per chunk, and relation prompts for the document's
budgeted plan over its published entity graph. Chunks are cut by the same generator counter the
assets use (`prompt_count`), so a chunk's `source_tokens` here is the generator's count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from synth_cpt.core.layout import ENTITY_GRAPHS, ENTITY_ROWS, SUMMARIES, generation_scope, rewrite_asset
from synth_cpt.core.storage import Storage
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest
from synth_cpt.synthesis.chunking import Count
from synth_cpt.synthesis.entigraph import Budget, entity_requests, relation_jobs
from synth_cpt.synthesis.outputs import published_table
from synth_cpt.synthesis.prompts import Prompt, PromptError
from synth_cpt.synthesis.rewrite import preview_requests
from synth_cpt.synthesis.rows import SourceDocument


@dataclass(frozen=True)
class Preview:
    """One request of the document (None where it depends on an output not generated yet)."""

    header: dict[str, Any]
    request: ChatRequest | None
    note: str = ""


def preview(
    prompt: Prompt,
    doc: SourceDocument,
    quality: str,
    *,
    storage: Storage,
    prompt_count: Count,
    seed: int,
    budget: Budget,
    relation_prompts: dict[str, Prompt],
    engine: GenerationEngine | None = None,
) -> list[Preview]:
    """`doc`'s requests as its asset sends them; `prompt_count` must be the counter the assets chunk with
    (`defs.synthesis.chunking_counter`), or the chunks shown are not the chunks sent."""
    base = {"doc_id": doc.doc_id, "prompt": prompt.id, "prompt_sha": prompt.sha}
    if prompt.kind == "rewrite":
        if engine is None and prompt.spec.chunking.autoregressive:
            raise ValueError("an autoregressive rewrite needs the engine's cache to preview chunks after the first")
        scope = generation_scope(rewrite_asset(prompt.name), doc.language, quality)
        items = preview_requests(engine, prompt, doc, prompt_count=prompt_count, scope=scope, seed=seed)  # type: ignore[arg-type]
        return [
            Preview(
                {**base, "chunk": chunk.index, "of": len(items), "source_tokens": chunk.n_tokens},
                request,
                "" if request else f"carries the rewritten chunk {chunk.index - 1}, which is not in the cache yet (or was rejected)",
            )  # fmt: skip
            for chunk, request in items
        ]
    if prompt.kind == "entigraph" and prompt.name == "entities":
        asks = entity_requests(prompt, doc, prompt_count=prompt_count, seed=seed)
        return [Preview({**base, "chunk": ch.index, "of": len(asks), "source_tokens": ch.n_tokens}, req) for ch, req in asks]
    if prompt.kind == "entigraph":
        rows = published_table(storage, ENTITY_GRAPHS, doc.language, quality, ENTITY_ROWS)
        if rows is None:
            raise PromptError(f"entity_graphs {doc.language}|{quality} is not published: materialize it to preview {prompt.id}")
        names = rows.filter(rows["doc_id"] == doc.doc_id).sort("position")["entity"].to_list()
        pair, triple = relation_prompts["pair"], relation_prompts["triple"]
        summaries = published_table(storage, ENTITY_GRAPHS, doc.language, quality, SUMMARIES)
        mine_summary = summaries.filter(summaries["doc_id"] == doc.doc_id)["summary"].to_list() if summaries is not None else []
        summary = mine_summary[0] if mine_summary else ""  # carried as the run carries it (documents over the limit)
        jobs = relation_jobs(doc, names, pair, triple, prompt_count=prompt_count, seed=seed, budget=budget, summary=summary)
        mine = [j for j in jobs if j.prompt.name == prompt.name]
        if not mine:
            note = f"the document has {len(names)} entities; its plan of {len(jobs)} relations holds no {prompt.name}"
            return [Preview(base, None, note)]
        return [
            Preview(
                {
                    **base,
                    "relation": i,
                    "of": len(mine),
                    "entities": list(j.entities),
                    "whole_document": j.context.whole,
                    "chunks": [c.index for c in j.context.chunks],
                },
                j.request,
            )  # fmt: skip
            for i, j in enumerate(mine)
        ]
    raise PromptError(f"{prompt.id}: a judge prompt needs a rewrite to judge; preview a rewrite or entigraph prompt")
