"""Documents from a batch of records: encoding repair, normalization, language id, quality score and
doc_id, vectorized in polars where it can be. Records that turn out not to be prose go to quarantine.
"""

from __future__ import annotations

import polars as pl

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import drop_documents
from synth_cpt.ingest.quarantine import EMPTY_TEXT, LANGUAGE_NOT_DETECTED, NO_LETTERS, NO_SCORE, quarantine_frame
from synth_cpt.ingest.records import Batch
from synth_cpt.text.encoding import repair_encodings
from synth_cpt.text.heuristics import heuristic_scores
from synth_cpt.text.langid import identify
from synth_cpt.text.normalize import doc_ids, normalize_texts


def finish_batch(batch: Batch, config: PipelineConfig, drop_id: str, source_file: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Repair, normalize, identify language, score and hash one batch; returns (docs, quarantine) frames.

    Plain and self-contained, so `drops` can run whole batches in worker processes."""
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
    frame = frame.with_columns(normalize_texts(texts).alias("text"), repaired.alias("encoding_repaired"))
    quarantine = list(batch.quarantine)

    empty = frame.filter(pl.col("text") == "")
    for line in empty["source_line"].to_list():
        quarantine.append((line, EMPTY_TEXT, "text is empty after normalization (only whitespace, control or invisible characters)", ""))
    frame = frame.filter(pl.col("text") != "")
    has_letter = frame["text"].str.contains(r"\p{L}")
    letterless = frame.filter(~has_letter)
    for line, text in letterless.select("source_line", "text").iter_rows():
        quarantine.append(
            (
                line,
                NO_LETTERS,
                "no letters left after normalization (only digits, symbols, emoji or punctuation): not prose",
                text[: config.limits.quarantine_raw_chars],
            )
        )
    frame = frame.filter(has_letter)

    # language: the record's own field wins; the rest is identified, from only the characters the
    # classifier reads, each distinct opening once (`identify`)
    max_chars = config.language_id.max_chars
    need = frame["record_language"].is_null()
    codes, probs = identify(frame.filter(need)["text"].str.slice(0, max_chars).to_list(), max_chars)
    detected = pl.DataFrame(
        {"i": need.arg_true(), "det_code": codes, "det_prob": probs},
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
    frame = frame.with_columns(score_heuristic=heuristic_scores(frame["text"]), doc_id=doc_ids(frame["text"]))

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
