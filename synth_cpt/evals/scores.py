"""eval_scores of one `language|quality` partition: every set of texts the partition has (its originals,
each synthetic asset, each training mix) scored side by side, plus contamination and external NPM.

A set is read from what is published. Sets larger than `evals.max_texts` are scored on a seeded
sample (the row counts and tokens are always of the whole set).
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from synth_cpt.core.config import EvalsConfig, PipelineConfig
from synth_cpt.core.layout import ENTIGRAPH_CORPUS, QUALITY_SUBSETS, REWRITES, SYNTHETIC_ROWS, TRAINING_MIX, partition_file
from synth_cpt.core.publish import published_partitions
from synth_cpt.core.storage import Storage
from synth_cpt.evals import diversity
from synth_cpt.evals.npm import npm_of_files
from synth_cpt.text.heuristics import heuristic_scores

FIDELITY = ["length_ratio", "number_coverage", "entity_coverage", "copy_similarity"]
# the columns of scores.parquet (a partition with nothing published still has them)
SCORE_SCHEMA = {
    "set": pl.String, "rows": pl.Int64, "tokens": pl.Int64, "scored": pl.Int64,
    **{f"distinct_{n}": pl.Float64 for n in (1, 2, 3, 4)}, "compression_ratio": pl.Float64, "near_duplicate_rate": pl.Float64,
    "heuristic_score_mean": pl.Float64, "copy_overlap_mean": pl.Float64,
    **{f"{c}_{q}": pl.Float64 for c in FIDELITY for q in ("p10", "p50", "p90")},
}  # fmt: skip


@dataclass
class TextSet:
    """One set of the partition: its totals (from the `n_tokens` column of every file) and a seeded sample
    of its rows (chosen by row group from the footers, then only the sampled rows kept as batches are read,
    so a 10B-token set is never read whole)."""

    rows: int
    tokens: int
    sample: pl.DataFrame


BATCH_ROWS = 2048  # rows read at once: of a file's n_tokens, of the texts counted or sampled


def _tokens(pf: Any, count: Any, batch_rows: int = BATCH_ROWS) -> int:
    """A file's tokens: its `n_tokens` column, or (a file without one) its texts counted, a batch at a time."""
    if pf.metadata.num_rows == 0:
        return 0
    column = "n_tokens" if "n_tokens" in pf.schema_arrow.names else "text"
    total = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column], use_threads=False):
        values = batch.column(0)
        total += int(pc.sum(values).as_py() or 0) if column == "n_tokens" else sum(count(values.to_pylist()))
    return total


def _sampled_rows(height: int, limit: int, seed: int) -> np.ndarray | None:
    """The positions `DataFrame.sample(limit, seed=seed)` takes of a frame of `height` rows, in its order
    (they depend on the height alone); None when every row is kept."""
    if height <= limit:
        return None
    return pl.DataFrame({"i": pl.int_range(height, eager=True, dtype=pl.Int64)}).sample(limit, seed=seed)["i"].to_numpy()


def _sample(
    storage: Storage, keys: list[str], columns: list[str], limit: int, seed: int, count: Any, batch_rows: int = BATCH_ROWS
) -> TextSet:
    """Each file is opened once where it can be (on S3 every open fetches the footer again): the row
    groups to sample are chosen from the footers (a row group's rows are in its metadata), and so are the
    rows sampled of them; then the groups are read file by file, a batch at a time, keeping only those
    rows, the last file opened for the totals still open."""
    rows = tokens = 0
    groups: list[tuple[str, int]] = []
    sizes: dict[tuple[str, int], int] = {}
    names: dict[str, list[str]] = {}
    last: tuple[str, Any] | None = None  # the file opened last, kept open: it is often the only one
    try:
        for key in keys:
            if last is not None:
                last, (_, done) = None, last
                done.close()
            pf = storage.parquet_file(key)
            last = (key, pf)
            rows += pf.metadata.num_rows
            tokens += _tokens(pf, count, batch_rows)
            names[key] = pf.schema_arrow.names
            for g in range(pf.metadata.num_row_groups):
                groups.append((key, g))
                sizes[(key, g)] = pf.metadata.row_group(g).num_rows
        random.Random(seed).shuffle(groups)
        chosen, taken = [], 0
        for group in groups:
            if taken >= limit:
                break
            chosen.append(group)
            taken += sizes[group]
        picked = _sampled_rows(taken, limit, seed)  # positions in the chosen groups, one after another
        wanted_rows = np.sort(picked) if picked is not None else None
        first = dict(zip(chosen, np.cumsum([0] + [sizes[g] for g in chosen[:-1]]).tolist(), strict=True))
        read: dict[tuple[str, int], pl.DataFrame] = {}
        for key in dict.fromkeys(k for k, _ in chosen):  # each file once, in the order first sampled
            if last is None or last[0] != key:
                if last is not None:
                    last, (_, done) = None, last
                    done.close()
                last = (key, storage.parquet_file(key))
            wanted = [c for c in columns if c in names[key]]
            for g in (g for k, g in chosen if k == key):
                read[(key, g)] = _read_rows(last[1], g, wanted, first[(key, g)], wanted_rows, batch_rows)
    finally:
        if last is not None:
            last[1].close()
    frames = [read[group] for group in chosen]  # in the sampled order, as before
    sample = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(schema={"doc_id": pl.String, "text": pl.String})
    if picked is not None:  # the rows kept are in position order: put them in the sample's
        sample = sample[pl.Series(np.searchsorted(wanted_rows, picked), dtype=pl.UInt32)]  # type: ignore[arg-type]
    return TextSet(rows, tokens, sample)


def _read_rows(pf: Any, group: int, columns: list[str], offset: int, wanted: np.ndarray | None, batch_rows: int) -> pl.DataFrame:
    """Row group `group` (its first row at position `offset` of the chosen rows), a batch at a time, keeping
    only the rows at the `wanted` positions (every row when None)."""
    kept: list[pa.Table] = []
    start = offset
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns, use_threads=False):
        table, end = pa.Table.from_batches([batch]), start + batch.num_rows
        if wanted is not None:
            table = table.take(pa.array(wanted[np.searchsorted(wanted, start) : np.searchsorted(wanted, end)] - start, type=pa.int64()))
        kept.append(table)
        start = end
    table = pa.concat_tables(kept) if kept else pa.schema([pf.schema_arrow.field(c) for c in columns]).empty_table()
    return pl.from_arrow(table.combine_chunks())  # type: ignore[return-value]


def text_sets(storage: Storage, language: str, quality: str, limit: int, seed: int, count: Any) -> dict[str, TextSet]:
    """origin -> its set: the originals (quality_subsets), each published synthetic asset, each mix."""
    sets: dict[str, TextSet] = {}
    key = partition_file(QUALITY_SUBSETS, language, quality)
    if storage.exists(key):
        sets["original"] = _sample(storage, [key], ["doc_id", "text"], limit, seed, count)
    for prefix in (REWRITES, ENTIGRAPH_CORPUS):
        for p in published_partitions(storage, prefix):
            if (p.language, p.quality) == (language, quality):
                name = "entigraph" if p.asset == ENTIGRAPH_CORPUS else f"rewrite:{p.asset.removeprefix(REWRITES)}"
                sets[name] = _sample(storage, [f"{p.prefix}/{SYNTHETIC_ROWS}"], ["doc_id", "text", *FIDELITY], limit, seed, count)
    for p in published_partitions(storage, TRAINING_MIX):
        if (p.language, p.quality) == (language, quality):
            shards = sorted(k for k in storage.list(p.prefix) if k.rsplit("/", 1)[1].startswith("shard-") and k.endswith(".parquet"))
            sets[f"mix:{p.asset.removeprefix(TRAINING_MIX)}"] = _sample(storage, shards, ["doc_id", "text", "origin"], limit, seed, count)
    return sets


def _sources(storage: Storage, language: str, quality: str, doc_ids: set[str], batch_rows: int = BATCH_ROWS) -> dict[str, str]:
    """The subset's texts of `doc_ids` only (read a batch at a time, never the whole partition in memory)."""
    key = partition_file(QUALITY_SUBSETS, language, quality)
    if not doc_ids or not storage.exists(key):
        return {}
    wanted = pl.Series(sorted(doc_ids))
    found = []
    with contextlib.closing(storage.parquet_file(key)) as pf:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["doc_id", "text"], use_threads=False):
            frame = pl.from_arrow(pa.Table.from_batches([batch]))
            found.append(frame.filter(pl.col("doc_id").is_in(wanted.implode())))  # type: ignore[union-attr]
    return dict(pl.concat(found).iter_rows()) if found else {}


def read_benchmark(path: str) -> list[str]:
    """Benchmark texts: one per line (.txt), the `text` field (.jsonl, or every string value), a `text` column (.parquet)."""
    p = Path(path)
    if p.suffix == ".parquet":
        return pl.read_parquet(p, columns=["text"])["text"].drop_nulls().to_list()
    if p.suffix == ".jsonl":
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                out.append(
                    obj["text"] if isinstance(obj, dict) and "text" in obj else " ".join(v for v in obj.values() if isinstance(v, str))
                )
        return out
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class EvalReport:
    scores: pl.DataFrame  # one row per set
    contamination: pl.DataFrame  # one row per contaminated text
    npm: dict[str, Any] | None
    score_hist: dict[str, list[float]] = field(default_factory=dict)  # origin -> heuristic scores (sampled)


def lm_eval_npm(evals: EvalsConfig) -> dict[str, Any] | None:
    """NPM of `evals.lm_eval_results`, read with the aliases and scales the config declares (the same as
    `synth-cpt npm --alias/--scale`): without them a renamed task is unmatched and a percent file left out."""
    if not evals.lm_eval_results:
        return None
    report = npm_of_files(list(evals.lm_eval_results), extra_aliases=dict(evals.lm_eval_aliases), scales=dict(evals.lm_eval_scales))
    return {**report.summary(), "tasks": [s.__dict__ for s in report.scores]}


def score_partition(storage: Storage, config: PipelineConfig, language: str, quality: str, count: Any) -> EvalReport:
    """Every set of the partition scored side by side. Totals are exact (the rows' project-tokenizer
    counts); the measures run on each set's sample of at most `evals.max_texts` rows."""
    sets = text_sets(storage, language, quality, config.evals.max_texts, config.seeds.subsets, count)
    synthetic_ids = {d for name, t in sets.items() if name not in ("original",) and not name.startswith("mix:") for d in t.sample["doc_id"]}
    sources = _sources(storage, language, quality, synthetic_ids)
    benchmarks = {path: read_benchmark(path) for path in config.evals.benchmarks}
    rows, hits, hist = [], [], {}
    for name, found in sets.items():
        sample = found.sample
        texts = sample["text"].to_list()
        scores = heuristic_scores(sample["text"]) if texts else pl.Series([], dtype=pl.Float64)
        hist[name] = scores.to_list()
        row: dict[str, Any] = {
            "set": name, "rows": found.rows, "tokens": found.tokens,
            "scored": len(texts), **{f"distinct_{n}": diversity.distinct_n(texts, n) for n in (1, 2, 3, 4)},
            "compression_ratio": diversity.compression_ratio(texts),
            "near_duplicate_rate": diversity.near_duplicate_rate(texts, config.evals.near_duplicate_threshold),
            "heuristic_score_mean": float(scores.mean()) if len(scores) else None,
            "copy_overlap_mean": None,
        }  # fmt: skip
        if name != "original" and not name.startswith("mix:") and sources:
            overlaps = [diversity.copy_overlap(t, sources[d]) for d, t in sample.select("doc_id", "text").iter_rows() if d in sources]
            overlaps = [o for o in overlaps if o is not None]
            row["copy_overlap_mean"] = sum(overlaps) / len(overlaps) if overlaps else None
        for col in FIDELITY:
            values = sample[col].drop_nulls() if col in sample.columns else pl.Series([], dtype=pl.Float64)
            row[f"{col}_p10"] = float(values.quantile(0.1)) if len(values) else None
            row[f"{col}_p50"] = float(values.quantile(0.5)) if len(values) else None
            row[f"{col}_p90"] = float(values.quantile(0.9)) if len(values) else None
        rows.append(row)
        for path, bench in benchmarks.items():
            for i, b, gram in diversity.contamination(texts, bench):
                hits.append({"set": name, "doc_id": sample["doc_id"][i], "benchmark": path, "benchmark_row": b, "ngram": gram})
    npm = lm_eval_npm(config.evals)
    contamination = pl.DataFrame(
        hits, schema={"set": pl.String, "doc_id": pl.String, "benchmark": pl.String, "benchmark_row": pl.Int64, "ngram": pl.String}
    )
    scores = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame(schema=SCORE_SCHEMA)
    return EvalReport(scores, contamination, npm, hist)


def plots(report: EvalReport) -> dict[str, str]:
    """Markdown images: heuristic-score histograms by origin, and diversity by set."""
    import matplotlib

    matplotlib.use("Agg")
    import base64
    import io

    import matplotlib.pyplot as plt

    def png(fig) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    for name, values in report.score_hist.items():
        if values and not name.startswith("mix:"):
            ax.hist(values, bins=20, range=(0, 5), histtype="step", density=True, label=name)
    ax.set_xlabel("heuristic quality score (0-5)", fontsize=9)
    ax.set_title("quality score by origin", fontsize=10)
    ax.legend(fontsize=7)
    hist = f"![quality score by origin](data:image/png;base64,{png(fig)})"
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    frame = report.scores
    x = range(frame.height)
    for k, col in enumerate(("distinct_2", "distinct_4", "near_duplicate_rate")):
        ax.bar([i + k * 0.27 for i in x], [v or 0 for v in frame[col].to_list()], width=0.27, label=col)
    ax.set_xticks([i + 0.27 for i in x], frame["set"].to_list(), rotation=45, ha="right", fontsize=7)
    ax.set_title("diversity by set", fontsize=10)
    ax.legend(fontsize=7)
    return {"quality_score_by_origin": hist, "diversity_by_set": f"![diversity by set](data:image/png;base64,{png(fig)})"}
