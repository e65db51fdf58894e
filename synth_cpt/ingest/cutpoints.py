"""`quality_cutpoints`: Nemotron-CC's percentile bucketing (METHODS.md §3).

Each classifier score is cut at its weighted percentiles 5, 10, ..., 95 (19 cut points, computed on a
seeded sample of the language's accepted drops) into an integer 0-19. The weight is the document's
tokens by the target tokenizer (`tokenizer.model_file`), as the paper; without a configured one it is
characters, since a trained tokenizer comes from raw_corpus, downstream (the metadata says which); a document's bucket value is
the max over its scores, and `raw_corpus` stores it as `quality_score` so the bucket bounds of the
config (`high: {gt: 11}`) apply unchanged. The raw scores stay in the `score_*` columns.

Why an output and not a constant: the cut points move when drops arrive; publishing them as a file
with a digest makes every move visible in the asset's history and names the version each
`raw_corpus` partition was bucketed with.

Rules, so that a figure can be recomputed by hand:
- **Cut point p** of a score: the smallest sampled value v whose cumulative weight (documents sorted by
  the score, weights summed up to and including every document scoring <= v) reaches p% of the total
  weight (integer arithmetic: exact).
- **Value** of a score s: the number of cut points at or below s (`numpy.digitize`): below the first
  cut point is 0, at or above the last is 19, a score equal to a cut point goes to the upper bin. So a
  block of tied scores takes the highest band it spans: a saturated score (many documents at the
  top, as the heuristic's 5.0) is 19, not the band where its block starts.
- **Which scores**: each of `quality.scores`, its cut points over the sampled documents that have it;
  a document with none of them (the `heuristic` fallback, as the thresholds method does) is valued on
  `score_heuristic` cut at the percentiles of the sampled documents that fell back too. A score with no
  sampled document has no cut points and counts as missing.
- **Weight**: the target tokenizer's tokens when `tokenizer.model_file` is configured; otherwise the
  tokenizer is trained on `raw_corpus` (which is bucketed with these cut points, a cycle) and the
  weight is the document's characters (`n_chars`), a deterministic proxy. A document weighs at least 1.
- **Sample**: the `quality.percentile_sample` documents of the language with the smallest SHA-256 of
  (`seeds.quality`, doc_id) (the rule of `corpus.tokenizer.seeded_sample`), after the dedup rule of
  `raw_corpus` (earliest (drop_id, source_line) wins): the same sample whatever the ingest order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.layout import cutpoints_file
from synth_cpt.core.publish import CandidateRejected, keep_rejected
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome
from synth_cpt.corpus.tokenizer import TokenCounter, load_model_file, load_tokenizer_config, seeded_sample
from synth_cpt.ingest.drops import drop_accepted, ingested_drops

PERCENTILES = tuple(range(5, 100, 5))  # 5, 10, ..., 95: 19 cut points, values 0-19
HEURISTIC = "heuristic"  # the fallback score of documents with none of quality.scores
WEIGHT_TOKENS = "tokens"
WEIGHT_CHARACTERS = "characters"
BATCH_ROWS = 64 * 1024


def weighted_cutpoints(values: Sequence[float], weights: Sequence[int], percentiles: Sequence[int] = PERCENTILES) -> list[float] | None:
    """The cut point of each percentile (see the module docstring); None without values."""
    v = np.asarray(values, dtype=np.float64)
    w = np.maximum(np.asarray(weights, dtype=np.int64), 1)
    if not len(v):
        return None
    order = np.argsort(v, kind="stable")
    v, cumulative = v[order], np.cumsum(w[order])
    total = int(cumulative[-1])
    # the first index whose cumulative weight reaches p% of the total: 100 * cum >= p * total
    return [float(v[int(np.searchsorted(100 * cumulative, p * total, side="left"))]) for p in percentiles]


def score_values(scores: Sequence[float | None] | np.ndarray, cuts: Sequence[float] | None) -> np.ndarray:
    """Each score's value 0-19 as float (NaN: no score, or a score without cut points)."""
    s = np.asarray([np.nan if x is None else x for x in scores] if not isinstance(scores, np.ndarray) else scores, dtype=np.float64)
    if cuts is None:
        return np.full(len(s), np.nan)
    out = np.searchsorted(np.asarray(cuts, dtype=np.float64), s, side="right").astype(np.float64)
    out[np.isnan(s)] = np.nan
    return out


@dataclass(frozen=True)
class Cutpoints:
    """The published cut points of one language: score name -> 19 cut points (None: no sampled value)."""

    language: str
    scores: dict[str, list[float] | None]
    sha256: str = ""
    info: dict = field(default_factory=dict, compare=False)

    def bucket_values(self, table: pa.Table | pa.RecordBatch | pl.DataFrame) -> pa.Array:
        """Each document's bucket value (float64, null: no usable score): the max over the values of
        `score_<name>` of the configured scores, else the value of `score_heuristic`."""
        frame = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)

        def column(name: str) -> np.ndarray:
            col = f"score_{name}"
            if col not in frame.columns:
                return np.full(frame.height, np.nan)
            return frame[col].cast(pl.Float64).fill_null(np.nan).to_numpy()

        configured = [score_values(column(s), cuts) for s, cuts in self.scores.items() if s != HEURISTIC]
        fields = np.vstack(configured) if configured else np.full((1, frame.height), np.nan)
        has_field = ~np.all(np.isnan(fields), axis=0)
        best = np.nanmax(np.where(np.isnan(fields), -1.0, fields), axis=0) if frame.height else np.zeros(0)
        fallback = score_values(column(HEURISTIC), self.scores.get(HEURISTIC))
        value = np.where(has_field, best, fallback)
        return pa.array(value, type=pa.float64(), from_pandas=True)  # NaN -> null

    @classmethod
    def from_payload(cls, payload: dict) -> Cutpoints:
        return cls(payload["language"], {k: v["cutpoints"] for k, v in payload["scores"].items()}, payload["sha256"], payload)


def digest(scores: dict[str, list[float] | None]) -> str:
    """What changes when a cut point moves (and nothing else): the lineage key of a version."""
    return hashlib.sha256(json.dumps(scores, sort_keys=True).encode()).hexdigest()


def _read_columns(storage: Storage, prefixes: list[str], language: str, wanted: list[str]):
    """The language's rows of every drop's docs.parquet, `wanted` columns (missing ones null), batch by batch."""
    for prefix in prefixes:
        with contextlib.closing(storage.parquet_file(f"{prefix}/docs.parquet")) as pf:
            present = set(pf.schema_arrow.names)
            if "language" not in present:
                continue
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[c for c in [*wanted, "language"] if c in present]):
                frame = pl.from_arrow(pa.Table.from_batches([batch]))
                frame = frame.with_columns(
                    [pl.lit(None, dtype=pl.Float64 if c.startswith("score_") else pl.Int64).alias(c) for c in wanted if c not in present]
                )
                yield frame.filter(pl.col("language") == language).select(wanted)


def sample_documents(storage: Storage, prefixes: list[str], language: str, score_names: list[str], n: int, seed: int) -> pl.DataFrame:
    """The seeded sample (module docstring) with doc_id, drop_id, source_line, n_chars and the scores;
    memory follows `n`, not the corpus."""
    columns = ["doc_id", "drop_id", "source_line", "n_chars", *[f"score_{s}" for s in score_names]]
    best: pl.DataFrame | None = None
    for frame in _read_columns(storage, prefixes, language, columns):
        merged = frame if best is None else pl.concat([best, frame], how="vertical_relaxed")
        merged = merged.sort(["drop_id", "source_line"], nulls_last=False).unique("doc_id", keep="first", maintain_order=True)
        best = seeded_sample(merged, n, seed)  # a duplicate shares its key: the earliest occurrence stays
    if best is None:
        return pl.DataFrame(
            schema={c: (pl.String if c in ("doc_id", "drop_id") else pl.Float64 if c.startswith("score_") else pl.Int64) for c in columns}
        )
    return best.sort("doc_id")


def sample_weights(
    storage: Storage, config: PipelineConfig, prefixes: list[str], language: str, sample: pl.DataFrame
) -> tuple[np.ndarray, str, str | None]:
    """(weights, weight kind, tokenizer sha256): target tokens with a configured tokenizer, else characters."""
    path = config.tokenizer.model_file
    if not path or sample.is_empty():
        return sample["n_chars"].fill_null(1).to_numpy(), WEIGHT_CHARACTERS, None
    counter = TokenCounter(load_model_file(path, storage), load_tokenizer_config(path), name=path)
    wanted = sample["doc_id"].implode()
    texts: dict[str, str] = {}
    for frame in _read_columns(storage, prefixes, language, ["doc_id", "text"]):
        for doc, text in frame.filter(pl.col("doc_id").is_in(wanted)).iter_rows():
            texts.setdefault(doc, text)  # doc_id is the hash of the text: every occurrence has the same text
    ids = sample["doc_id"].to_list()
    return np.asarray(counter.count([texts[d] for d in ids]), dtype=np.int64), WEIGHT_TOKENS, counter.sha256


def compute_cutpoints(storage: Storage, config: PipelineConfig, language: str, prefixes: list[str]) -> dict:
    """The payload of a `quality_cutpoints` version for `language` from the drops at `prefixes`."""
    quality = config.quality
    names = list(quality.scores)
    sample = sample_documents(storage, prefixes, language, [*names, HEURISTIC], quality.percentile_sample, config.seeds.quality)
    weights, kind, tokenizer_sha = sample_weights(storage, config, prefixes, language, sample)
    has_field = pl.any_horizontal([pl.col(f"score_{s}").is_not_null() for s in names]) if names else pl.lit(False)
    fell_back = ~sample.select(has_field.alias("f"))["f"].to_numpy() if sample.height else np.zeros(0, dtype=bool)
    scores: dict[str, dict] = {}
    for name in [*names, HEURISTIC]:
        values = sample[f"score_{name}"].cast(pl.Float64).to_numpy()
        keep = ~np.isnan(values) & (fell_back if name == HEURISTIC else True)
        cuts = weighted_cutpoints(values[keep], weights[keep])
        scores[name] = {"cutpoints": cuts, "documents": int(keep.sum()), "weight": int(np.maximum(weights[keep], 1).sum())}
    cut_only = {k: v["cutpoints"] for k, v in scores.items()}
    return {
        "language": language,
        "percentiles": list(PERCENTILES),
        "weight": kind,
        "tokenizer_sha256": tokenizer_sha,
        "seed": config.seeds.quality,
        "sample_limit": quality.percentile_sample,
        "sampled_documents": sample.height,
        "scores": scores,
        "sha256": digest(cut_only),
    }


def check_cutpoints(payload: dict) -> Outcome:
    """Every score has no cut points or 19 finite, non-decreasing ones; the digest matches them."""
    failures = []
    for name, entry in payload["scores"].items():
        cuts = entry["cutpoints"]
        if cuts is None:
            continue
        if len(cuts) != len(PERCENTILES):
            failures.append(f"{name}: {len(cuts)} cut points, expected {len(PERCENTILES)}")
        elif not all(isinstance(c, float) and math.isfinite(c) for c in cuts):
            failures.append(f"{name}: a cut point is not a finite number")
        elif any(b < a for a, b in zip(cuts, cuts[1:], strict=False)):
            failures.append(f"{name}: cut points decrease")
    if payload["sha256"] != digest({k: v["cutpoints"] for k, v in payload["scores"].items()}):
        failures.append("sha256 does not match the cut points")
    return Outcome(success=not failures, failures=failures, details={"scores": sorted(payload["scores"])})


@dataclass
class CutpointsReport:
    payload: dict
    outcome: Outcome
    drops: list[str]
    previous_sha256: str | None


def build_cutpoints(storage: Storage, config: PipelineConfig, language: str) -> CutpointsReport:
    """Compute, validate, then publish `quality_cutpoints/<language>`; a failed candidate raises
    CandidateRejected and readers keep the previous version."""

    manifests = [m for m in ingested_drops(storage) if drop_accepted(m, config) and m["documents"] > 0]
    payload = {**compute_cutpoints(storage, config, language, [m["prefix"] for m in manifests]), "drops": [m["drop_id"] for m in manifests]}
    key = cutpoints_file(language)
    previous = storage.read_json(key)["sha256"] if storage.exists(key) else None
    outcome = check_cutpoints(payload)
    with storage.writing(key) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        if not outcome.success:
            raise CandidateRejected(outcome, keep_rejected(storage, key, tmp), "cutpoints_valid")
    return CutpointsReport(payload, outcome, payload["drops"], previous)


def published_cutpoints(storage: Storage, language: str) -> Cutpoints:
    key = cutpoints_file(language)
    if not storage.exists(key):
        raise FileNotFoundError(
            f"{storage.uri(key)} is not published: quality.method is percentiles, materialize quality_cutpoints[{language}] first"
        )
    return Cutpoints.from_payload(storage.read_json(key))


def cutpoints_markdown(payload: dict) -> str:
    """The cut points as a markdown table: one row per percentile, one column per score."""
    names = list(payload["scores"])
    head = "| percentile | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    cell = lambda cuts, i: "" if cuts is None else f"{cuts[i]:g}"  # noqa: E731
    rows = [
        f"| {p} | " + " | ".join(cell(payload["scores"][n]["cutpoints"], i) for n in names) + " |"
        for i, p in enumerate(payload["percentiles"])
    ]
    return head + "\n".join(rows)
