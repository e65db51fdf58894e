"""`quality_subsets`: a seeded, token-budgeted selection of a raw_corpus partition.

Budget rule: documents are put in order, by `quality_score` descending (ties by `doc_id`) or, with
`order: random`, by SHA-256 of (seed, doc_id); the subset is the longest prefix of that order whose
token total is <= the budget. It stops at the first document that would overflow, so a larger budget
always yields a superset, and the same inputs, seed and tokenizer always give the same subset.
Tokens are counted lazily, chunk by chunk in that order, so a 10B-token budget over a 120B-token
corpus never tokenizes the 110B it will not use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

from synth_cpt.tokens import TokenCounter

CHUNK = 2048


def selection_order(frame: pl.DataFrame, order: str, seed: int) -> pl.DataFrame:
    if order == "score":
        return frame.sort(["quality_score", "doc_id"], descending=[True, False])
    if order == "random":
        keys = [hashlib.sha256(f"{seed}:{d}".encode()).hexdigest() for d in frame["doc_id"].to_list()]
        return frame.with_columns(_k=pl.Series(keys, dtype=pl.String)).sort("_k").drop("_k")
    raise ValueError(f"unknown subset order {order!r} (score or random)")


@dataclass
class SubsetStats:
    budget_tokens: int | None
    candidate_documents: int
    documents: int
    tokens: int
    stopped_at_doc_tokens: int | None  # the first document that did not fit, if any


def select_budgeted(
    frame: pl.DataFrame, counter: TokenCounter, budget: int | None, order: str, seed: int
) -> tuple[pl.DataFrame, SubsetStats]:
    """The budgeted subset of `frame`, with an `n_tokens` column, and its figures."""
    ordered = selection_order(frame, order, seed)
    taken: list[int] = []
    total = 0
    stopped: int | None = None
    texts = ordered["text"]
    for start in range(0, ordered.height, CHUNK):
        counts = counter.count(texts.slice(start, CHUNK).to_list())
        for n in counts:
            if budget is not None and total + n > budget:
                stopped = n
                break
            taken.append(n)
            total += n
        if stopped is not None:
            break
    subset = ordered.head(len(taken)).with_columns(n_tokens=pl.Series(taken, dtype=pl.Int64))
    return subset, SubsetStats(budget, frame.height, subset.height, total, stopped)
