# The pre-issue-6 generation cache (synth_cpt/generation/cache.py at 706fd14), kept as the baseline
# of benchmarks/cache.py. Trimmed to what the benchmark calls (segment listing, load, finished,
# finished_ids); writing and compaction are left out. Do not use it anywhere else.
"""The content-addressed generation cache: one Parquet row per LLM call, in small atomic segments.

Why segments: a crash loses at most the rows not yet flushed (one segment), two processes never
write the same file (segment names carry host, pid and a random part), and a finished request is
found by id no matter which run, partition or asset made it.
"""

from __future__ import annotations

import contextlib

import polars as pl
import pyarrow as pa

from synth_cpt.core.storage import Storage

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
