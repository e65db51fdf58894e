"""Intrinsic measures of a set of texts: how diverse it is, how much it copies, what it leaks.

- distinct-n: distinct word n-grams / all word n-grams, n = 1..4 (over the whole set);
- compression ratio: raw bytes / zstd bytes of the set (repetitive text compresses more);
- near-duplicate rate: the share of texts that have at least one other text of the set whose estimated
  Jaccard similarity (MinHash over word 5-gram shingles) is >= the threshold (0.8 by default); both
  texts of a near-identical pair count. A style's fixed template is stripped first (METHODS §9): every QA
  rewrite opens with "Pergunta:" and every list with bullets, which would make unrelated documents twins;
- copying: the share of a text's word n-grams that are also in its source document;
- contamination: 13-gram overlap with benchmark texts, with the matching rows listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import zstandard
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+", re.U)
# labels and bullets that a style puts on every output (question/answer markers, list bullets, numbering)
_TEMPLATE = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|(?:question|answer|pergunta|resposta|q|a|p|r)\s*\d*\s*[:.)])\s*", re.I | re.M)


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def strip_template(text: str) -> str:
    """The text without the markers a style stamps on every output."""
    return _TEMPLATE.sub("", text)


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def compression_ratio(texts: Iterable[str]) -> float | None:
    raw = "\n".join(texts).encode("utf-8")
    return len(raw) / len(zstandard.ZstdCompressor(level=10).compress(raw)) if raw else None


def _minhash(text: str, num_perm: int, seed: int) -> MinHash:
    tokens = words(strip_template(text))
    shingles = {" ".join(g).encode() for g in ngrams(tokens, 5)} or {" ".join(tokens).encode()}
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(shingles))
    return m


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128, seed: int = 1) -> list[int]:
    """Indices (ascending) of the texts that have at least one other text with estimated Jaccard >= threshold
    (the share of equal MinHash values over shingles of the template-stripped text).

    LSH only proposes candidates, so its bands are chosen to miss none: a pair at or above the threshold
    differs in at most `num_perm - need` hash values, and with more bands than that, one band is equal
    (pigeonhole). Every candidate is then checked against the threshold itself."""
    need = next(k for k in range(num_perm + 1) if k / num_perm >= threshold)  # equal hash values a twin has
    bands = min(num_perm, num_perm - need + 1)
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, num_perm // bands))
    hashes = [_minhash(text, num_perm, seed) for text in texts]
    for i, m in enumerate(hashes):
        lsh.insert(i, m)
    twins: set[int] = set()
    for i, m in enumerate(hashes):
        if i in twins:
            continue
        for j in lsh.query(m):
            if j != i and m.jaccard(hashes[j]) >= threshold:
                twins.update((i, j))
                break
    return sorted(twins)


def near_duplicate_meaning(threshold: float) -> str:
    """What `near_duplicate_rate` measures, in the words reports show next to it."""
    return (
        f"share of a set's texts that have at least one other text with estimated Jaccard >= {threshold:g} "
        "(MinHash of word 5-grams, after strip_template)"
    )


def near_duplicate_rate(texts: list[str], threshold: float = 0.8) -> float | None:
    """The share of texts with a near twin in the set (see `near_duplicates`); None for no texts."""
    return len(near_duplicates(texts, threshold)) / len(texts) if texts else None


def copy_overlap(text: str, source: str, n: int = 8) -> float | None:
    """Share of the text's word n-grams that occur in its source (1.0: stitched from the source)."""
    grams = ngrams(words(text), n)
    if not grams:
        return None
    source_grams = set(ngrams(words(source), n))
    return sum(g in source_grams for g in grams) / len(grams)


def contamination(texts: list[str], benchmark: list[str], n: int = 13) -> list[tuple[int, int, str]]:
    """(text index, benchmark row, the first shared n-gram) for every text sharing a word n-gram with a benchmark row."""
    index: dict[tuple[str, ...], int] = {}
    for row, text in enumerate(benchmark):
        for g in ngrams(words(text), n):
            index.setdefault(g, row)
    hits = []
    for i, text in enumerate(texts):
        for g in ngrams(words(text), n):
            if g in index:
                hits.append((i, index[g], " ".join(g)))
                break
    return hits
