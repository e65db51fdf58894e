"""Small PNG figures for asset metadata (Dagster renders markdown images inline)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence


def histogram_markdown(values: Sequence[float], title: str, xlabel: str, marks: Sequence[float] = (), bins: int = 20) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    ax.hist(list(values), bins=bins, range=(0, 5), color="#4c72b0")
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
