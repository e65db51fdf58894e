"""eval_scores of one `language|quality` partition: every set of texts the partition has (its originals,
each synthetic asset, each training mix) scored side by side, plus contamination and external NPM.

A set is read from what is published. Sets larger than `evals.max_texts` are scored on a seeded
sample (the row counts and tokens are always of the whole set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.layout import ENTIGRAPH_CORPUS, QUALITY_SUBSETS, REWRITES, SYNTHETIC_ROWS, TRAINING_MIX, partition_file
from synth_cpt.core.publish import published_partitions
from synth_cpt.core.storage import Storage
from synth_cpt.evals import diversity
from synth_cpt.evals.npm import load_tasks, npm_of_files
from synth_cpt.text.heuristics import heuristic_scores

FIDELITY = ["length_ratio", "number_coverage", "entity_coverage", "copy_similarity"]


def text_sets(storage: Storage, language: str, quality: str) -> dict[str, pl.DataFrame]:
    """origin -> its texts (doc_id, text, and the fidelity figures where it has them)."""
    sets: dict[str, pl.DataFrame] = {}
    key = partition_file(QUALITY_SUBSETS, language, quality)
    if storage.exists(key):
        sets["original"] = storage.read_parquet(key, columns=["doc_id", "text"])
    for prefix in (REWRITES, ENTIGRAPH_CORPUS):
        for p in published_partitions(storage, prefix):
            if (p.language, p.quality) == (language, quality):
                rows = storage.read_parquet(f"{p.prefix}/{SYNTHETIC_ROWS}")
                rows = rows.select([c for c in ["doc_id", "text", *FIDELITY] if c in rows.columns])
                name = "entigraph" if p.asset == ENTIGRAPH_CORPUS else f"rewrite:{p.asset.removeprefix(REWRITES)}"
                sets[name] = rows
    for p in published_partitions(storage, TRAINING_MIX):
        if (p.language, p.quality) == (language, quality):
            shards = [k for k in storage.list(p.prefix) if k.rsplit("/", 1)[1].startswith("shard-") and k.endswith(".parquet")]
            frames = [storage.read_parquet(k, columns=["doc_id", "text", "origin"]) for k in shards]
            sets[f"mix:{p.asset.removeprefix(TRAINING_MIX)}"] = pl.concat(frames) if frames else pl.DataFrame(schema={"doc_id": pl.String, "text": pl.String, "origin": pl.String})
    return sets


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
                out.append(obj["text"] if isinstance(obj, dict) and "text" in obj else " ".join(v for v in obj.values() if isinstance(v, str)))
        return out
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class EvalReport:
    scores: pl.DataFrame  # one row per set
    contamination: pl.DataFrame  # one row per contaminated text
    npm: dict[str, Any] | None
    score_hist: dict[str, list[float]] = field(default_factory=dict)  # origin -> heuristic scores (sampled)


def score_partition(storage: Storage, config: PipelineConfig, language: str, quality: str, count: Any) -> EvalReport:
    sets = text_sets(storage, language, quality)
    sources = dict(sets["original"].select("doc_id", "text").iter_rows()) if "original" in sets else {}
    benchmarks = {path: read_benchmark(path) for path in config.evals.benchmarks}
    rows, hits, hist = [], [], {}
    for name, frame in sets.items():
        sample = frame.sample(config.evals.max_texts, seed=config.seeds.subsets) if frame.height > config.evals.max_texts else frame
        texts = sample["text"].to_list()
        scores = heuristic_scores(sample["text"]) if texts else pl.Series([], dtype=pl.Float64)
        hist[name] = scores.to_list()
        row: dict[str, Any] = {
            "set": name, "rows": frame.height, "tokens": sum(count(frame["text"].to_list())) if frame.height else 0,
            "scored": len(texts), **{f"distinct_{n}": diversity.distinct_n(texts, n) for n in (1, 2, 3, 4)},
            "compression_ratio": diversity.compression_ratio(texts),
            "near_duplicate_rate": diversity.near_duplicate_rate(texts, config.evals.near_duplicate_threshold),
            "heuristic_score_mean": float(scores.mean()) if len(scores) else None,
            "copy_overlap_mean": None,
        }  # fmt: skip
        if name != "original" and not name.startswith("mix:") and sources:
            overlaps = [diversity.copy_overlap(t, sources.get(d, "")) for d, t in sample.select("doc_id", "text").iter_rows()]
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
    npm = None
    if config.evals.lm_eval_results:
        report = npm_of_files(list(config.evals.lm_eval_results))
        npm = {**report.summary(len(load_tasks())), "tasks": [s.__dict__ for s in report.scores]}
    contamination = pl.DataFrame(hits, schema={"set": pl.String, "doc_id": pl.String, "benchmark": pl.String, "benchmark_row": pl.Int64, "ngram": pl.String})
    return EvalReport(pl.DataFrame(rows, infer_schema_length=None), contamination, npm, hist)


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
