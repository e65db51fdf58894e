"""From raw records to documents and quarantine rows, one bounded batch at a time.

Per record, only what must be per record stays in Python (JSON parsing with orjson, field checks,
SHA-256, fastText); normalization and the heuristic scorer run vectorized in polars over the batch.
A bad record becomes a quarantine row with a reason a person can act on; it never stops the drop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import polars as pl
import pyarrow as pa

from synth_cpt.config import PipelineConfig
from synth_cpt.text.encoding import repair_encodings
from synth_cpt.text.heuristics import heuristic_scores
from synth_cpt.text.langid import identify, normalize_code
from synth_cpt.text.normalize import doc_ids, normalize_expr

# Stable codes for grouping; the `reason` column holds the sentence for people.
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
NOT_OBJECT = "not_object"
MISSING_TEXT = "missing_text"
NULL_TEXT = "null_text"
NON_STRING_TEXT = "non_string_text"
EMPTY_TEXT = "empty_text"
TOO_LARGE = "too_large"
LANGUAGE_NOT_DETECTED = "language_not_detected"
NO_LETTERS = "no_letters"
TRUNCATED_FILE = "truncated_file"
UNREADABLE_FILE = "unreadable_file"
BAD_SCORE = "bad_score"
NO_SCORE = "no_score"

QUARANTINE_SCHEMA = pa.schema(
    [
        ("drop_id", pa.string()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("reason_code", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


def docs_schema(config: PipelineConfig) -> pa.Schema:
    """Columns of `crawl_drops/<drop>/docs.parquet` (DESIGN.md's document contract, before bucketing)."""
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("text", pa.string()),
            ("url", pa.string()),
            ("title", pa.string()),
            ("record_id", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float64()),
            ("language_source", pa.string()),
            *[(f"score_{name}", pa.float64()) for name in config.fields.scores],
            ("score_heuristic", pa.float64()),
            ("quality_score", pa.float64()),
            ("quality_score_source", pa.string()),
            ("n_chars", pa.int64()),
            ("encoding_repaired", pa.bool_()),
            ("drop_id", pa.string()),
            ("source_file", pa.string()),
            ("source_line", pa.int64()),
        ]
    )


@dataclass
class Batch:
    """Candidate records of one batch: parsed, shape-checked, not yet normalized."""

    lines: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    record_ids: list[str | None] = field(default_factory=list)
    urls: list[str | None] = field(default_factory=list)
    titles: list[str | None] = field(default_factory=list)
    languages: list[str | None] = field(default_factory=list)
    scores: dict[str, list[float | None]] = field(default_factory=dict)
    quarantine: list[tuple[int, str, str, str]] = field(default_factory=list)  # line, code, reason, raw


def _raw_preview(raw: bytes | str | Any, limit: int) -> str:
    if isinstance(raw, bytes):
        text = raw[: limit * 4].decode("utf-8", errors="replace")
    elif isinstance(raw, str):
        text = raw
    else:
        text = orjson.dumps(raw, default=str).decode("utf-8", errors="replace")
    return text[:limit]


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(type(value), type(value).__name__)


class RecordParser:
    """Turns raw lines or Parquet rows into a `Batch` (shape checks only)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.f = config.fields
        self.limit = config.limits.max_record_bytes
        self.raw_chars = config.limits.quarantine_raw_chars

    def new_batch(self) -> Batch:
        return Batch(scores={name: [] for name in self.f.scores})

    def add_line(self, batch: Batch, line_no: int, line: bytes | None, size: int) -> None:
        """One JSONL line (`None` when it was longer than the size limit and not read)."""
        if line is None or size > self.limit:
            batch.quarantine.append(
                (
                    line_no,
                    TOO_LARGE,
                    f"record is {size:,} bytes, over limits.max_record_bytes={self.limit:,}; split or drop it",
                    _raw_preview(line or b"", self.raw_chars),
                )
            )
            return
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as uexc:
                reason = f"invalid UTF-8 at byte {uexc.start} (0x{line[uexc.start]:02x}); re-encode the source as UTF-8"
                batch.quarantine.append((line_no, INVALID_UTF8, reason, _raw_preview(line, self.raw_chars)))
                return
            batch.quarantine.append((line_no, INVALID_JSON, f"invalid JSON: {exc}", _raw_preview(line, self.raw_chars)))
            return
        self.add_object(batch, line_no, obj, line)

    def add_object(self, batch: Batch, line_no: int, obj: Any, raw: Any = None) -> None:
        raw = obj if raw is None else raw
        if not isinstance(obj, dict):
            batch.quarantine.append(
                (line_no, NOT_OBJECT, f"record is a JSON {_type_name(obj)}, not an object", _raw_preview(raw, self.raw_chars))
            )
            return
        f = self.f
        if f.text not in obj:
            batch.quarantine.append(
                (line_no, MISSING_TEXT, f"record has no '{f.text}' field (fields.text)", _raw_preview(raw, self.raw_chars))
            )
            return
        text = obj[f.text]
        if text is None:
            batch.quarantine.append((line_no, NULL_TEXT, f"'{f.text}' is null", _raw_preview(raw, self.raw_chars)))
            return
        if not isinstance(text, str):
            batch.quarantine.append(
                (line_no, NON_STRING_TEXT, f"'{f.text}' is a {_type_name(text)}, not a string", _raw_preview(raw, self.raw_chars))
            )
            return
        scores: dict[str, float | None] = {}
        for name, fld in f.scores.items():
            value = obj.get(fld)
            if value is None:
                scores[name] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0.0 <= value <= 5.0:
                scores[name] = float(value)
            else:
                batch.quarantine.append(
                    (line_no, BAD_SCORE, f"score field '{fld}' must be a number in 0-5, got {value!r}", _raw_preview(raw, self.raw_chars))
                )
                return
        batch.lines.append(line_no)
        batch.texts.append(text)
        batch.record_ids.append(_opt_str(obj.get(f.id)) if f.id else None)
        batch.urls.append(_opt_str(obj.get(f.url)) if f.url else None)
        batch.titles.append(_opt_str(obj.get(f.title)) if f.title else None)
        batch.languages.append(normalize_code(obj.get(f.language)) if f.language else None)
        for name, value in scores.items():
            batch.scores[name].append(value)


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
    quarantine: list[tuple[int, str, str, str]]
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
    ).select([f.name for f in docs_schema(config)])

    quarantine.sort(key=lambda row: row[0])
    q = pl.DataFrame(
        {
            "drop_id": [drop_id] * len(quarantine),
            "source_file": [source_file] * len(quarantine),
            "source_line": [r[0] for r in quarantine],
            "reason_code": [r[1] for r in quarantine],
            "reason": [r[2] for r in quarantine],
            "raw": [r[3] for r in quarantine],
        },
        schema={f.name: pl.String if f.type == pa.string() else pl.Int64 for f in QUARANTINE_SCHEMA},
    )
    return docs, q


BOM = b"\xef\xbb\xbf"


def iter_lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without newline or None when over `limit`, size in bytes); bounded memory."""
    line_no = 0
    readline = stream.readline
    while True:
        line = readline(limit + 1)
        if not line:
            return
        line_no += 1
        if len(line) > limit and not line.endswith(b"\n"):
            size = len(line)
            while True:  # skip the rest of an oversized line without holding it
                chunk = readline(1 << 20)
                size += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield line_no, None, size - (1 if chunk.endswith(b"\n") else 0)
            continue
        line = line.rstrip(b"\r\n")
        if line_no == 1 and line.startswith(BOM):
            line = line[len(BOM) :]  # a UTF-8 byte order mark is not part of the first record
        if not line.strip():
            continue  # blank lines are not records
        yield line_no, line, len(line)


def iter_batches_jsonl(parser: RecordParser, stream: IO[bytes], batch_bytes: int) -> Iterator[Batch]:
    batch, held = parser.new_batch(), 0
    for line_no, line, size in iter_lines(stream, parser.limit):
        parser.add_line(batch, line_no, line, size)
        held += size
        if held >= batch_bytes:
            yield batch
            batch, held = parser.new_batch(), 0
    yield batch


def iter_batches_rows(parser: RecordParser, rows: Iterable[tuple[int, dict]], batch_bytes: int) -> Iterator[Batch]:
    batch, held = parser.new_batch(), 0
    for row_no, row in rows:
        text = row.get(parser.f.text)
        size = len(text.encode("utf-8")) if isinstance(text, str) else 0
        if size > parser.limit:
            parser.add_line(batch, row_no, None, size)
        else:
            parser.add_object(batch, row_no, row)
        held += size
        if held >= batch_bytes:
            yield batch
            batch, held = parser.new_batch(), 0
    yield batch
