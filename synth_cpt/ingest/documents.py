"""Documents from a batch of records: encoding repair, normalization, language id, quality score and
doc_id, vectorized in polars where it can be. Records that turn out not to be prose go to quarantine.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import polars as pl

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import drop_documents
from synth_cpt.ingest.quarantine import EMPTY_TEXT, LANGUAGE_NOT_DETECTED, NO_LETTERS, NO_SCORE, Row, quarantine_frame
from synth_cpt.ingest.records import Batch
from synth_cpt.text.encoding import repair_encodings
from synth_cpt.text.heuristics import heuristic_scores
from synth_cpt.text.langid import identify
from synth_cpt.text.normalize import doc_ids, normalize_expr


def _identify_async(texts: list[str], max_chars: int, pool: Executor | None) -> Callable[[], tuple[list[str], list[float]]]:
    """Start language id (in worker processes when a pool is given); call the result to collect it."""
    if not texts:
        return lambda: ([], [])
    if pool is None:
        result = identify(texts, max_chars)
        return lambda: result
    clipped = [t[:max_chars] for t in texts]  # ship only what the classifier reads
    n = getattr(pool, "_max_workers", 2)
    step = -(-len(clipped) // n)
    futures = [pool.submit(identify, clipped[i : i + step], max_chars) for i in range(0, len(clipped), step)]

    def collect() -> tuple[list[str], list[float]]:
        codes: list[str] = []
        probs: list[float] = []
        for fut in futures:
            c, p = fut.result()
            codes += c
            probs += p
        return codes, probs

    return collect


@dataclass
class StartedBatch:
    """A batch normalized and with its language id under way."""

    batch: Batch
    frame: pl.DataFrame
    quarantine: list[Row]
    need: pl.Series
    languages: Callable[[], tuple[list[str], list[float]]]


def start_batch(batch: Batch, config: PipelineConfig, pool: Executor | None = None) -> StartedBatch:
    """Normalize the batch and start language id (in `pool`'s processes when given)."""
    score_names = list(config.fields.scores)
    frame = pl.DataFrame(
        {
            "source_line": pl.Series(batch.lines, dtype=pl.Int64),
            "text": pl.Series(batch.texts, dtype=pl.String),
            "record_id": pl.Series(batch.record_ids, dtype=pl.String),
            "url": pl.Series(batch.urls, dtype=pl.String),
            "title": pl.Series(batch.titles, dtype=pl.String),
            "record_language": pl.Series(batch.languages, dtype=pl.String),
            **{f"score_{n}": pl.Series(batch.scores[n], dtype=pl.Float64) for n in score_names},
        }
    )
    # mojibake first: hashing, language id and scoring must see the text as it was written
    texts, repaired = repair_encodings(frame["text"])
    frame = frame.with_columns(texts.alias("text"), repaired.alias("encoding_repaired")).with_columns(normalize_expr("text"))
    quarantine = list(batch.quarantine)

    empty = frame.filter(pl.col("text") == "")
    for line in empty["source_line"].to_list():
        quarantine.append((line, EMPTY_TEXT, "text is empty after normalization (only whitespace, control or invisible characters)", ""))
    frame = frame.filter(pl.col("text") != "")
    letterless = frame.filter(~pl.col("text").str.contains(r"\p{L}"))
    for line, text in letterless.select("source_line", "text").iter_rows():
        quarantine.append(
            (
                line,
                NO_LETTERS,
                "no letters left after normalization (only digits, symbols, emoji or punctuation): not prose",
                text[: config.limits.quarantine_raw_chars],
            )
        )
    frame = frame.filter(pl.col("text").str.contains(r"\p{L}"))
    # language: the record's own field wins; the rest is identified
    need = frame["record_language"].is_null()
    languages = _identify_async(frame.filter(need)["text"].to_list(), config.language_id.max_chars, pool)
    return StartedBatch(batch, frame, quarantine, need, languages)


def finish_batch(
    batch: Batch, config: PipelineConfig, drop_id: str, source_file: str, pool: Executor | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Normalize, identify language, score and hash; returns (docs, quarantine) frames."""
    return complete_batch(start_batch(batch, config, pool), config, drop_id, source_file)


def complete_batch(started: StartedBatch, config: PipelineConfig, drop_id: str, source_file: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score and hash (while language id may still run elsewhere), then assemble docs and quarantine."""
    frame, quarantine, need = started.frame, started.quarantine, started.need
    frame = frame.with_columns(
        score_heuristic=heuristic_scores(frame["text"]),
        doc_id=pl.Series(doc_ids(frame["text"].to_list()), dtype=pl.String),
    )
    codes, probs = started.languages()
    detected = pl.DataFrame(
        {"i": frame.with_row_index("i").filter(need)["i"], "det_code": codes, "det_prob": probs},
        schema={"i": pl.UInt32, "det_code": pl.String, "det_prob": pl.Float64},
    )
    frame = (
        frame.with_row_index("i")
        .join(detected, on="i", how="left", maintain_order="left")
        .with_columns(
            pl.coalesce("record_language", "det_code").alias("language"),
            pl.when(pl.col("record_language").is_null()).then(pl.col("det_prob")).otherwise(None).alias("language_score"),
            pl.when(pl.col("record_language").is_null()).then(pl.lit("detected")).otherwise(pl.lit("record")).alias("language_source"),
        )
    )
    min_conf = config.language_id.min_confidence
    undetected = frame.filter((pl.col("language_source") == "detected") & ((pl.col("det_prob") < min_conf) | (pl.col("language") == "")))
    for line, code, prob, text in undetected.select("source_line", "det_code", "det_prob", "text").iter_rows():
        quarantine.append(
            (
                line,
                LANGUAGE_NOT_DETECTED,
                f"language not detected: best guess {code!r} at {prob:.2f} < language_id.min_confidence={min_conf}; add a language field or lower the threshold",
                text[: config.limits.quarantine_raw_chars],
            )
        )
    frame = frame.filter(~pl.col("source_line").is_in(undetected["source_line"].implode()))

    # quality: combine the configured score fields present; otherwise the heuristic
    present = [pl.col(f"score_{n}") for n in config.quality.scores]
    combine = {"max": pl.max_horizontal, "min": pl.min_horizontal, "mean": pl.mean_horizontal}[config.quality.combine]
    combined = combine(present) if present else pl.lit(None, dtype=pl.Float64)
    frame = frame.with_columns(
        pl.when(combined.is_not_null()).then(pl.lit("fields")).otherwise(pl.lit("heuristic")).alias("quality_score_source"),
        pl.coalesce(combined, pl.col("score_heuristic")).round(4).alias("quality_score"),
    )
    if config.quality.fallback == "quarantine":
        missing = frame.filter(pl.col("quality_score_source") == "heuristic")
        wanted = ", ".join(config.fields.scores[n] for n in config.quality.scores)
        for line, text in missing.select("source_line", "text").iter_rows():
            quarantine.append(
                (
                    line,
                    NO_SCORE,
                    f"none of the score fields ({wanted}) is set and quality.fallback is 'quarantine'",
                    text[: config.limits.quarantine_raw_chars],
                )
            )
        frame = frame.filter(pl.col("quality_score_source") == "fields")

    docs = frame.with_columns(
        n_chars=pl.col("text").str.len_chars().cast(pl.Int64),
        drop_id=pl.lit(drop_id),
        source_file=pl.lit(source_file),
    ).select(drop_documents(config).names)

    return docs, quarantine_frame(quarantine, drop_id, source_file)
