"""The generation engine: dedup, cache lookup, throughput ordering, checkpointed execution.

A request whose `request_id` is in the cache is never sent again; everything sent is written to the
cache in segments of `flush_every` rows (or every `flush_seconds`), so a crash loses at most one
segment of work. Requests are grouped by shared prompt prefix (vLLM's prefix cache reuses the
shared part) and, within a group, by length, and handed to the backend, which keeps its engine
saturated and reports each result as soon as it is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import polars as pl

from synth_cpt.core.secrets import redact
from synth_cpt.generation.backends import Backend, Feed, Prepared
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.requests import ChatRequest, Generation, derived_seed
from synth_cpt.generation.structured import output_rejection, unbounded_parts

PREFIX_CHARS = 256


@dataclass
class RunReport:
    requests: int = 0
    unique: int = 0
    cache_hits: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_seconds: float = 0.0
    seconds: float = 0.0  # generation only, engine loading excluded
    speculation: str = ""  # whether the engine that ran the batch speculates, and why ("" when nothing was sent)
    failures: dict[str, str] = field(default_factory=dict)
    rejections: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def metadata(self) -> dict[str, float | int | str]:
        return {
            "requests": self.requests, "unique_requests": self.unique, "cache_hits": self.cache_hits, "sent": self.sent,
            "succeeded": self.succeeded, "failed": self.failed, "rejected": self.rejected,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "load_seconds": round(self.load_seconds, 2), "seconds": round(self.seconds, 2),
            "output_tokens_per_s": round(self.tokens_per_s, 1),
            **({"speculation": self.speculation} if self.speculation else {}),
        }  # fmt: skip


class GenerationAccountingError(RuntimeError):
    """A request was sent and neither a result nor a failure came back."""


def check_schemas_bounded(requests: Iterable[ChatRequest]) -> None:
    """Refuse, before anything is sent, a JSON schema under which decoding may never end."""
    for schema_text in {r.json_schema for r in requests if r.json_schema}:
        parts = unbounded_parts(json.loads(schema_text))
        if parts:
            raise ValueError(
                "JSON schema is unbounded, so constrained decoding can loop until max_tokens: "
                + "; ".join(parts[:5])
                + ". Bound every string (maxLength), array (maxItems) and object (additionalProperties: false)."
            )


def progress_line(done: int, total: int, tokens: int, failed: int, elapsed: float) -> str:
    """The one progress message: done/total, output tok/s, failures, ETA."""
    rate = tokens / max(elapsed, 1e-9)
    eta = elapsed / max(done, 1) * (total - done)
    return f"generation: {done:,}/{total:,} sent, {rate:,.0f} output tok/s, {failed:,} failed, ETA {eta:,.0f} s"


Progress = Callable[[int, int, int, float], None]  # done, total, completion tokens, elapsed seconds
# Called with each request's result (fresh, or cached); returns the requests that depend on it (the next
# chunk of an autoregressive chain), which join the same run. `rejected` is set on a usable-looking
# result whose output broke its contract.
Follow = Callable[[str, Generation], Iterable[ChatRequest]]


def cached_generation(row: dict) -> Generation:
    """A cache row as the Generation it recorded."""
    return Generation(
        row["request_id"], row["text"], row["finish_reason"], row.get("prompt_tokens"), row.get("completion_tokens"),
        row.get("attempts") or 1, 0.0, error=row.get("error"), rejected=row.get("rejected"),
    )  # fmt: skip


def throughput_order(prepared: list[Prepared]) -> list[Prepared]:
    """Shared prefixes together (prefix-cache hits), short before long within a prefix; deterministic."""

    def key(p: Prepared) -> tuple[str, int, str]:
        rendered = p.request.rendered()
        return rendered[:PREFIX_CHARS], len(rendered), p.request_id

    return sorted(prepared, key=key)


class GenerationEngine:
    def __init__(
        self,
        backend: Backend,
        cache: GenerationCache,
        *,
        model: str,
        model_fingerprint: str,
        flush_every: int = 128,
        flush_seconds: float = 30.0,
        log: Callable[[str], None] | None = None,
        progress: Progress | None = None,
        log_every_s: float = 10.0,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.model = model
        self.fingerprint = model_fingerprint
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.log = log
        self.progress = progress
        self.log_every_s = log_every_s

    def with_backend(self, backend: Backend) -> GenerationEngine:
        """The same engine (cache, model, settings) generating through `backend`, e.g. a `JointBackend` around this one's."""
        return GenerationEngine(
            backend, self.cache, model=self.model, model_fingerprint=self.fingerprint, flush_every=self.flush_every,
            flush_seconds=self.flush_seconds, log=self.log, progress=self.progress, log_every_s=self.log_every_s,
        )  # fmt: skip

    def speculation(self) -> str:
        """Whether the engine decodes with n-gram speculation, and why (see backends.speculation_decision)."""
        return self.backend.speculation()

    def request_ids(self, requests: list[ChatRequest]) -> list[str]:
        return [r.request_id(self.fingerprint) for r in requests]

    def run(self, requests: list[ChatRequest], scope: str | None = None, follow: Follow | None = None) -> RunReport:
        """Make sure every request has a cached result (or a recorded failure); returns the figures.

        `scope` (an asset and partition, e.g. `rewrites_easy/pt/high`) is where this run's rows are
        stored and looked up first; a hit in any other scope still counts. Every request sent ends as a
        result or a failure with its reason: a backend that returns without accounting for one is an
        error (after the missing ones are recorded as failures, so the next run retries them).

        `follow` makes the run a set of chains: each result (cached or fresh) is handed to it, and the
        requests it returns join the run at once, so a chain's next link is sent the moment its last
        one is back while the engine stays busy with every other chain. Links already cached are
        followed from the cache without sending anything. A link made from an output generated in this
        run carries that new text, so it is not looked up again (it cannot have been asked before)."""
        started = time.monotonic()
        report = RunReport()
        unique: dict[str, ChatRequest] = {}
        pending: list[Prepared] = []

        def admit(batch: Iterable[ChatRequest], look_up: bool) -> list[str]:
            """Count and dedupe new requests; returns the ids found in the cache (when looked up)."""
            fresh: dict[str, ChatRequest] = {}
            for req in batch:
                rid = req.request_id(self.fingerprint)
                report.requests += 1
                if rid not in unique and rid not in fresh:
                    fresh[rid] = req
            if not fresh:
                return []
            check_schemas_bounded(fresh.values())
            unique.update(fresh)
            report.unique += len(fresh)
            hits = self.cache.finished_ids(fresh, scope) if look_up else set()
            report.cache_hits += len(hits)
            pending.extend(Prepared(req, rid, derived_seed(rid)) for rid, req in fresh.items() if rid not in hits)
            return [rid for rid in fresh if rid in hits]

        hits = admit(requests, look_up=True)
        while follow and hits:  # chains resumed from the cache: follow their cached links, wave by wave
            cached = self.cache.finished(hits, scope).to_dicts()
            hits = admit([r for row in cached for r in follow(row["request_id"], cached_generation(row))], look_up=True)
        if self.log:
            self.log(
                f"generation: {report.requests:,} requests, {report.unique:,} unique, {report.cache_hits:,} cached, {len(pending):,} to send"
            )
        if not pending:
            report.seconds = time.monotonic() - started
            return report

        loading = time.monotonic()
        self.backend.prepare(pending)
        report.load_seconds = time.monotonic() - loading
        report.speculation = self.backend.speculation()
        writer = self.cache.writer(
            model=self.model, model_fingerprint=self.fingerprint, engine=self.backend.name,
            engine_version=self.backend.version(), flush_every=self.flush_every, flush_seconds=self.flush_seconds,
            scope=scope, engine_config=self.backend.config(), check=output_rejection,
        )  # fmt: skip
        feed = Feed(
            throughput_order(pending), checkpoint=writer.flush, checkpoint_rows=writer.batch_rows, buffered=lambda: len(writer.rows)
        )
        by_id = {p.request_id: p for p in pending}
        answered: set[str] = set()
        unexpected: list[str] = []
        lost: list[Prepared] = []
        closing = False
        sent_at = time.monotonic()
        last_log = [sent_at]

        def on_result(p: Prepared, gen: Generation) -> None:
            if gen.request_id not in by_id or gen.request_id in answered:
                unexpected.append(gen.request_id)  # reported twice, or never asked: not stored
                return
            answered.add(gen.request_id)
            writer.add(p.request, p.seed, gen)
            report.sent += 1
            if gen.ok:
                report.succeeded += 1
                report.prompt_tokens += gen.prompt_tokens or 0
                report.completion_tokens += gen.completion_tokens or 0
            else:
                report.failed += 1
                report.failures[gen.request_id] = gen.error or ""
            if follow and not closing:
                try:
                    rejected = output_rejection(p.request, gen) if gen.ok else None
                except Exception as exc:  # as the cache writer does: a check that raises rejects this output, not the run
                    rejected = redact(f"check failed: {type(exc).__name__}: {exc}")
                judged = gen if not gen.ok else replace(gen, rejected=rejected)
                pending.clear()
                admit(follow(gen.request_id, judged), look_up=False)
                for q in pending:
                    by_id[q.request_id] = q
                    feed.push(q)
            elapsed = time.monotonic() - sent_at
            if self.progress:
                self.progress(report.sent, len(by_id), report.completion_tokens, elapsed)
            now = time.monotonic()
            if self.log and (now - last_log[0] >= self.log_every_s or report.sent == len(by_id)):
                last_log[0] = now
                self.log(progress_line(report.sent, len(by_id), report.completion_tokens, report.failed, elapsed))

        try:
            # backends report each result as it finishes; the writer thread checkpoints in the background
            self.backend.generate(feed, on_result)
            closing = True
            lost = [p for rid, p in by_id.items() if rid not in answered]
            for p in lost:
                on_result(p, Generation.failure(p.request_id, "lost: the backend returned without a result for this request"))
        finally:
            writer.close()
        report.rejected = writer.rejected
        report.rejections = writer.rejections
        report.seconds = time.monotonic() - sent_at
        if lost or unexpected:
            raise GenerationAccountingError(
                f"{self.backend.name} backend: {len(lost)} of {len(by_id)} requests ended without a result "
                f"(recorded as failures, retried next run); {len(unexpected)} results for requests not pending"
            )
        return report

    def results(self, requests: list[ChatRequest], scope: str | None = None) -> pl.DataFrame:
        """The cached successful row for each distinct request (rows in the order first asked)."""
        ids = list(dict.fromkeys(self.request_ids(requests)))
        finished = self.cache.finished(ids, scope)
        order = pl.DataFrame({"request_id": ids}).with_row_index("_order")
        return order.join(finished, on="request_id", how="inner").sort("_order").drop("_order")
