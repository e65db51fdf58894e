"""What an output's metadata says about its documents, read once from the candidate before it is
published (only the columns needed; texts only for the few sample rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from synth_cpt.core.plots import histogram_counts


@dataclass
class DocumentSummary:
    rows: int = 0
    characters: int = 0
    tokens: int = 0
    drops: list[str] = field(default_factory=list)
    histogram: list[int] = field(default_factory=list)  # quality_score, core.plots bins
    sample: list[dict[str, Any]] = field(default_factory=list)


def summarize(path: str, sample_columns: list[str], n_sample: int = 3) -> DocumentSummary:
    """Counts, contributing drops, score histogram and a few sample rows of a documents file."""
    lf = pl.scan_parquet(path)
    names = lf.collect_schema().names()
    figures = (
        lf.select(
            pl.len().alias("rows"),
            pl.col("n_chars").sum().alias("chars"),
            (pl.col("n_tokens").sum() if "n_tokens" in names else pl.lit(0)).alias("tokens"),
        )
        .collect()
        .row(0, named=True)
    )
    return DocumentSummary(
        rows=int(figures["rows"]),
        characters=int(figures["chars"] or 0),
        tokens=int(figures["tokens"] or 0),
        drops=lf.select(pl.col("drop_id").unique().sort()).collect().to_series().to_list(),
        histogram=histogram_counts(lf.select("quality_score").collect().to_series()),
        sample=lf.select([c for c in sample_columns if c in names]).head(n_sample).collect().to_dicts(),
    )


def sample_markdown(rows: list[dict[str, Any]], width: int = 80) -> str:
    """A few rows as a markdown table (cells cut to `width`)."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    cell = lambda v: str(v).replace("\n", " ").replace("|", "\\|")[:width]  # noqa: E731
    return head + "\n".join("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows)
