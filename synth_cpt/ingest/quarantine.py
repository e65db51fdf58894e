"""Quarantine: the reasons a record is refused, and the rows that say so.

The code (`reason_code`) is stable, for grouping and dashboards; the `reason` sentence says what a
person can do about it.
"""

from __future__ import annotations

from typing import Any

import orjson
import polars as pl
import pyarrow as pa

from synth_cpt.core.contracts import QUARANTINE

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

Row = tuple[int, str, str, str]  # line or row, code, reason, raw preview


def raw_preview(raw: bytes | str | Any, limit: int) -> str:
    if isinstance(raw, bytes):
        text = raw[: limit * 4].decode("utf-8", errors="replace")
    elif isinstance(raw, str):
        text = raw
    else:
        text = orjson.dumps(raw, default=str).decode("utf-8", errors="replace")
    return text[:limit]


def quarantine_frame(rows: list[Row], drop_id: str, source_file: str) -> pl.DataFrame:
    """Quarantine rows of one batch in line order, in the QUARANTINE contract."""
    rows = sorted(rows, key=lambda row: row[0])
    return pl.DataFrame(
        {
            "drop_id": [drop_id] * len(rows),
            "source_file": [source_file] * len(rows),
            "source_line": [r[0] for r in rows],
            "reason_code": [r[1] for r in rows],
            "reason": [r[2] for r in rows],
            "raw": [r[3] for r in rows],
        },
        schema={f.name: pl.String if f.type == pa.string() else pl.Int64 for f in QUARANTINE},
    )
