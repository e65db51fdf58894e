"""Record parsing: raw JSONL lines or Parquet rows into bounded batches of candidate records.

Only shape checks happen here (JSON, an object, a string text, scores in range), with orjson; a bad
record becomes a quarantine row and never stops the drop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from synth_cpt.core.config import PipelineConfig
from synth_cpt.ingest.quarantine import (
    BAD_SCORE,
    INVALID_JSON,
    INVALID_UTF8,
    MISSING_TEXT,
    NON_STRING_TEXT,
    NOT_OBJECT,
    NULL_TEXT,
    TOO_LARGE,
    Row,
    raw_preview,
)
from synth_cpt.text.langid import normalize_code


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
    quarantine: list[Row] = field(default_factory=list)


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
                    raw_preview(line or b"", self.raw_chars),
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
                batch.quarantine.append((line_no, INVALID_UTF8, reason, raw_preview(line, self.raw_chars)))
                return
            batch.quarantine.append((line_no, INVALID_JSON, f"invalid JSON: {exc}", raw_preview(line, self.raw_chars)))
            return
        self.add_object(batch, line_no, obj, line)

    def add_object(self, batch: Batch, line_no: int, obj: Any, raw: Any = None) -> None:
        raw = obj if raw is None else raw
        if not isinstance(obj, dict):
            batch.quarantine.append(
                (line_no, NOT_OBJECT, f"record is a JSON {_type_name(obj)}, not an object", raw_preview(raw, self.raw_chars))
            )
            return
        f = self.f
        if f.text not in obj:
            batch.quarantine.append(
                (line_no, MISSING_TEXT, f"record has no '{f.text}' field (fields.text)", raw_preview(raw, self.raw_chars))
            )
            return
        text = obj[f.text]
        if text is None:
            batch.quarantine.append((line_no, NULL_TEXT, f"'{f.text}' is null", raw_preview(raw, self.raw_chars)))
            return
        if not isinstance(text, str):
            batch.quarantine.append(
                (line_no, NON_STRING_TEXT, f"'{f.text}' is a {_type_name(text)}, not a string", raw_preview(raw, self.raw_chars))
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
                    (line_no, BAD_SCORE, f"score field '{fld}' must be a number in 0-5, got {value!r}", raw_preview(raw, self.raw_chars))
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
