"""Small PNG figures for asset metadata (Dagster renders markdown images inline)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import polars as pl

BINS = 20
RANGE = (0.0, 5.0)


def histogram_counts(scores: pl.Series, bins: int = BINS, lo: float = RANGE[0], hi: float = RANGE[1]) -> list[int]:
    """Counts per equal-width bin over [lo, hi]; values outside land in the edge bins. Counts add up
    across batches, so a histogram never needs every score in memory at once."""
    index = ((scores.cast(pl.Float64) - lo) / (hi - lo) * bins).floor().clip(0, bins - 1).cast(pl.Int64)
    counts = index.value_counts()
    out = [0] * bins
    for i, n in counts.iter_rows():
        if i is not None:
            out[i] += n
    return out


def histogram_markdown(
    counts: Sequence[int], title: str, xlabel: str, marks: Sequence[float] = (), lo: float = RANGE[0], hi: float = RANGE[1]
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    edges = [lo + (hi - lo) * i / len(counts) for i in range(len(counts) + 1)]
    ax.stairs(list(counts), edges, fill=True, color="#4c72b0")
    for m in marks:
        ax.axvline(m, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("documents", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
