"""What every synthesis step shares: the source documents, asking the engine, and the rows written.

A synthetic row carries its lineage (DESIGN.md "Data contracts"): the document and drop line it came
from, the cache rows it was made from (`request_ids`, in order), the prompt file's hash and the model
fingerprint. A rejected row carries the same, plus the rule that rejected it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from synth_cpt.core.contracts import SYNTHETIC, SYNTHETIC_REJECTS
from synth_cpt.generation.engine import GenerationEngine, RunReport
from synth_cpt.generation.requests import ChatRequest

REJECT_TEXT_CHARS = 2000


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pl.DataFrame:
    """Rows as a frame of exactly the contract's columns and types."""
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema))  # type: ignore[return-value]


@dataclass(frozen=True)
class SourceDocument:
    doc_id: str
    text: str
    language: str
    drop_id: str
    source_file: str
    source_line: int
    title: str | None = None
    drop_version: str | None = None  # null: a subset written before raw_corpus recorded drop versions

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> list[SourceDocument]:
        cols = ["doc_id", "text", "language", "drop_id", "source_file", "source_line", "title", "drop_version"]
        return [cls(**row) for row in frame.select([c for c in cols if c in frame.columns]).iter_rows(named=True)]


def synth_id(kind: str, style: str, doc_id: str, request_ids: list[str]) -> str:
    """Deterministic: the same document, style and generations make the same id on every rerun."""
    payload = "\x1f".join([kind, style, doc_id, *request_ids])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass
class Answer:
    """A cached generation as synthesis sees it."""

    request_id: str
    text: str | None
    finish_reason: str | None
    unusable: str | None  # the cache's `rejected`: the output broke its contract (e.g. invalid JSON)
    completion_tokens: int


def cached_answers(engine: GenerationEngine, requests: list[ChatRequest], scope: str) -> dict[str, Answer]:
    """What the cache holds for `requests`, by request_id (nothing is sent)."""
    rows = engine.results(requests, scope)
    return {
        r["request_id"]: Answer(r["request_id"], r["text"], r["finish_reason"], r["rejected"], r["completion_tokens"] or 0)
        for r in rows.select(["request_id", "text", "finish_reason", "rejected", "completion_tokens"]).iter_rows(named=True)
    }


@dataclass
class Batch:
    """Figures of every engine run of one synthesis step, summed."""

    runs: list[RunReport] = field(default_factory=list)

    def ask(self, engine: GenerationEngine, requests: list[ChatRequest], scope: str) -> dict[str, Answer]:
        """Make sure each request has a cached answer; returns what is there by request_id (failed
        requests are missing: they are retried on the next materialization)."""
        if not requests:
            return {}
        self.runs.append(engine.run(requests, scope))
        return cached_answers(engine, requests, scope)

    def metadata(self) -> dict[str, float | int]:
        keys = ["requests", "unique", "cache_hits", "sent", "succeeded", "failed", "rejected", "prompt_tokens", "completion_tokens"]
        out: dict[str, float | int] = {k: sum(getattr(r, k) for r in self.runs) for k in keys}
        seconds = sum(r.seconds for r in self.runs)
        out["generation_seconds"] = round(seconds, 2)
        out["output_tokens_per_s"] = round(out["completion_tokens"] / seconds, 1) if seconds > 0 else 0.0
        return out


@dataclass
class SynthesisResult:
    """The accepted rows and the rejected ones of one step, as frames of their contracts."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    batch: Batch = field(default_factory=Batch)
    chunks: int = 0  # chunks of every document asked about, accepted or not

    def accept(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def reject(
        self, base: dict[str, Any], code: str, reason: str, text: str | None = None, chunk_index: int | None = None, dropped: bool = False
    ) -> None:
        """A rejected candidate; `dropped`: only chunk `chunk_index` was dropped and the rest of its document kept
        (it is recorded, but is not a candidate of the pass rate: its document is)."""
        self.rejects.append(
            {**base, "reason_code": code, "reason": reason, "text": (text or "")[:REJECT_TEXT_CHARS], "chunk_index": chunk_index,
             "chunk_dropped": dropped}
        )  # fmt: skip

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        rows = table(self.rows, SYNTHETIC).sort("synth_id")
        rejects = table(self.rejects, SYNTHETIC_REJECTS).sort(["doc_id", "reason_code", "style"], maintain_order=True)
        return rows, rejects

    def pass_rates(self, accepted: int | None = None) -> dict[str, Any]:
        """Accepted share and the rejections by reason (what a person tunes a style by). `accepted`:
        when the accepted outputs are not `rows` (entity graphs write their own tables)."""
        kept = len(self.rows) if accepted is None else accepted
        rejected = [r for r in self.rejects if not r.get("chunk_dropped")]
        total = kept + len(rejected)
        by_reason = Counter(r["reason_code"] for r in rejected)
        dropped = Counter(r["reason_code"] for r in self.rejects if r.get("chunk_dropped"))
        return {
            "candidates": total,
            "accepted": kept,
            "pass_rate": round(kept / total, 4) if total else 1.0,
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "rejected_share_by_reason": {k: round(v / total, 4) for k, v in sorted(by_reason.items())},
            "dropped_chunks_by_reason": dict(sorted(dropped.items())),
        }
