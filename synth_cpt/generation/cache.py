"""The content-addressed generation cache: one Parquet row per LLM call, in small atomic segments.

Why segments: a crash loses at most the rows not yet flushed (one segment), two processes never
write the same file (segment names carry host, pid and a random part), and a finished request is
found by id no matter which run, partition or asset made it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone

import polars as pl
import pyarrow as pa

from synth_cpt.generation.requests import ChatRequest, Generation
from synth_cpt.storage import Storage

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("model", pa.string()),
        ("model_fingerprint", pa.string()),
        ("engine", pa.string()),
        ("engine_version", pa.string()),
        ("prompt_name", pa.string()),
        ("prompt_sha", pa.string()),
        ("messages", pa.string()),
        ("sampling", pa.string()),
        ("json_schema", pa.string()),
        ("seed", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("attempts", pa.int64()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("rejected", pa.string()),
        ("created_at", pa.string()),
        ("segment", pa.string()),
    ]
)


def _segment_name(kind: str) -> str:
    """Unique across processes and machines: time, host, pid and a random part."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return f"{kind}-{stamp}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


class GenerationCache:
    def __init__(self, storage: Storage, prefix: str = "generations") -> None:
        self.storage = storage
        self.prefix = prefix.strip("/")

    def segment_keys(self) -> list[str]:
        return [
            k for k in self.storage.list(f"{self.prefix}/segments") if k.endswith(".parquet") and not k.rsplit("/", 1)[-1].startswith(".")
        ]

    def load(self, columns: list[str] | None = None) -> pl.DataFrame:
        """Every row of every segment (failures included), oldest first."""
        keys = self.segment_keys()
        if not keys:
            return pl.DataFrame(schema=pl.from_arrow(SCHEMA.empty_table()).schema).select(columns or pl.all())
        with contextlib.ExitStack() as stack:
            paths = [str(stack.enter_context(self.storage.local_path(k))) for k in keys]
            frame = pl.scan_parquet(paths).select(columns or pl.all()).collect()
        order = [c for c in ("created_at", "segment") if c in frame.columns]
        return frame.sort(order) if order else frame

    def finished(self, request_ids: list[str] | None = None) -> pl.DataFrame:
        """One row per request that succeeded (the earliest success wins if two processes raced),
        for `request_ids` only when given: other rows are filtered out while reading."""
        keys = self.segment_keys()
        if not keys:
            return self.load()
        with contextlib.ExitStack() as stack:
            paths = [str(stack.enter_context(self.storage.local_path(k))) for k in keys]
            scan = pl.scan_parquet(paths).filter(pl.col("error").is_null())
            if request_ids is not None:
                scan = scan.filter(pl.col("request_id").is_in(pl.Series(list(request_ids), dtype=pl.String).implode()))
            rows = scan.collect()
        return rows.sort("created_at", "segment").unique(subset="request_id", keep="first", maintain_order=True)

    def finished_ids(self) -> set[str]:
        rows = self.load(["request_id", "error"])
        return set(rows.filter(pl.col("error").is_null())["request_id"].to_list())

    def compact(self) -> dict[str, int]:
        """Merge every segment present now into one: the earliest success per request, and for
        requests that never succeeded their latest failure (still retried).

        Safe beside running writers: the merged segment is written first, then exactly the segments
        it read are deleted; a reader in between sees duplicates, which every read already resolves.
        """
        keys = self.segment_keys()
        rows = self.load()
        if len(keys) < 2:
            return {"segments_before": len(keys), "segments_after": len(keys), "rows_before": rows.height, "rows_after": rows.height}
        ok = rows.filter(pl.col("error").is_null()).unique(subset="request_id", keep="first", maintain_order=True)
        failed = (
            rows.filter(pl.col("error").is_not_null() & ~pl.col("request_id").is_in(ok["request_id"].implode()))
            .unique(subset="request_id", keep="last", maintain_order=True)
        )  # fmt: skip
        merged = pl.concat([ok, failed]).sort("created_at", "segment")
        self.storage.write_parquet(f"{self.prefix}/segments/{_segment_name('compact')}", merged.to_arrow().cast(SCHEMA))
        for key in keys:
            self.storage.delete(key)
        return {
            "segments_before": len(keys),
            "segments_after": len(self.segment_keys()),
            "rows_before": rows.height,
            "rows_after": merged.height,
        }

    def writer(
        self, *, model: str, model_fingerprint: str, engine: str, engine_version: str, flush_every: int, flush_seconds: float
    ) -> "SegmentWriter":
        return SegmentWriter(self, model, model_fingerprint, engine, engine_version, flush_every, flush_seconds)


class SegmentWriter:
    """Buffers results and writes a new segment every `flush_every` rows or `flush_seconds`."""

    def __init__(
        self, cache: GenerationCache, model: str, fingerprint: str, engine: str, version: str, flush_every: int, flush_seconds: float
    ) -> None:
        self.cache = cache
        self.fixed = {"model": model, "model_fingerprint": fingerprint, "engine": engine, "engine_version": version}
        self.flush_every = max(1, flush_every)
        self.flush_seconds = flush_seconds
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()
        self.segments_written = 0

    def add(self, request: ChatRequest, seed: int, gen: Generation) -> None:
        self.rows.append(
            {
                "request_id": gen.request_id,
                **self.fixed,
                "prompt_name": request.prompt_name,
                "prompt_sha": request.prompt_sha,
                "messages": request.rendered(),
                "sampling": json.dumps(request.sampling.as_dict(), sort_keys=True),
                "json_schema": request.json_schema,
                "seed": seed,
                "text": gen.text,
                "finish_reason": gen.finish_reason,
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens,
                "attempts": gen.attempts,
                "latency_s": round(gen.latency_s, 4),
                "error": gen.error,
                "rejected": gen.rejected,
                "created_at": datetime.now(timezone.utc).isoformat(),
            }
        )
        if len(self.rows) >= self.flush_every or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        name = _segment_name("seg")
        for row in self.rows:
            row["segment"] = name
        self.cache.storage.write_parquet(f"{self.cache.prefix}/segments/{name}", pa.Table.from_pylist(self.rows, schema=SCHEMA))
        self.rows = []
        self.segments_written += 1
