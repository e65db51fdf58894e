"""Documents cut into pieces a prompt can take, by real token counts of the generator's tokenizer.

WRAP found that inputs much longer than ~300 tokens lose information when rewritten, and Nemotron-CC
cuts on line breaks to each prompt's input limit; so a document becomes consecutive chunks that each
fit `max_input_tokens`, cut on sentence (or line) boundaries, and that concatenate back to exactly
the document. A single sentence longer than the limit is cut on whitespace, never mid-word unless a
word alone is over the limit. Every `count` here bounds what is sent, so callers pass the generator's
counter (`prompt_count`; the target tokenizer's when the generator's is not known), never the one rows
are counted with.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from synth_cpt.text.sentences import line_spans, sentence_spans

Count = Callable[[list[str]], list[int]]  # a TokenCounter's count: one token count per text
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # character offsets into the document
    end: int
    text: str
    n_tokens: int  # by the counter that chunked (the generator's)


def _longest_fit(text: str, pos: int, cuts: list[int], limit: int, count: Count) -> int | None:
    """The furthest of `cuts` (ascending) up to which text[pos:cut] fits `limit` tokens (bisection)."""
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count([text[pos : cuts[mid]]])[0] <= limit:
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _split_long(text: str, start: int, end: int, limit: int, count: Count) -> list[tuple[int, int]]:
    """Cut one over-long span after whitespace so that each piece fits `limit` tokens; a word that
    alone is over the limit (a long URL, a run with no spaces) is cut by characters."""
    pieces: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        if count([text[pos:end]])[0] <= limit:
            pieces.append((pos, end))
            break
        cuts = [m.end() for m in _SPACE.finditer(text, pos, end) if pos < m.end() < end]
        cut = _longest_fit(text, pos, cuts, limit, count) if cuts else None
        if cut is None:  # the first word alone is over the limit: cut it by characters
            word_end = cuts[0] if cuts else end
            cut = _longest_fit(text, pos, list(range(pos + 1, word_end)), limit, count) or pos + 1
        pieces.append((pos, cut))
        pos = cut
    return pieces


def chunk_document(
    text: str, max_input_tokens: int, count: Count, split: Literal["sentences", "lines"] = "sentences", language: str = ""
) -> list[Chunk]:
    """Greedy packing of consecutive sentences (or lines) into chunks of at most `max_input_tokens`
    tokens each (counted on the chunk's own text, so the bound holds exactly)."""
    if max_input_tokens < 1:
        raise ValueError("max_input_tokens must be at least 1")
    if not text:
        return []
    spans = sentence_spans(text, language) if split == "sentences" else line_spans(text)
    sizes = count([text[a:b] for a, b in spans])
    units: list[tuple[int, int, int]] = []
    for (a, b), n in zip(spans, sizes, strict=True):
        if n <= max_input_tokens:
            units.append((a, b, n))
        else:
            pieces = _split_long(text, a, b, max_input_tokens, count)
            units += [(p, q, m) for (p, q), m in zip(pieces, count([text[p:q] for p, q in pieces]), strict=True)]
    bounds: list[tuple[int, int]] = []
    start, end, total = units[0][0], units[0][1], units[0][2]
    for a, b, n in units[1:]:
        # token counts are not additive across a join by one or two tokens: check the joined text
        if total + n <= max_input_tokens and count([text[start:b]])[0] <= max_input_tokens:
            end, total = b, total + n
        else:
            bounds.append((start, end))
            start, end, total = a, b, n
    bounds.append((start, end))
    counts = count([text[a:b] for a, b in bounds])
    return [Chunk(i, a, b, text[a:b], n) for i, ((a, b), n) in enumerate(zip(bounds, counts, strict=True))]


def joiner(chunk_text: str) -> str:
    """What separates a rewritten chunk from the next: the kind of break the source had there."""
    tail = chunk_text[len(chunk_text.rstrip()) :]
    newlines = tail.count("\n")
    return "\n\n" if newlines >= 2 else "\n" if newlines == 1 else " "


def join_outputs(chunks: list[Chunk], outputs: list[str]) -> str:
    """Rewritten chunks re-joined in order, each separated as its source chunk was from the next."""
    parts: list[str] = []
    for i, (chunk, out) in enumerate(zip(chunks, outputs, strict=True)):
        parts.append(out.strip())
        if i + 1 < len(chunks):
            parts.append(joiner(chunk.text))
    return "".join(parts)


def tail_within(texts: list[str], budget: int, count: Count) -> str:
    """The most recent of `texts` (joined with blank lines) that fit `budget` tokens: whole texts from
    the newest back, then, if even the newest does not fit, its last sentences that do."""
    if budget <= 0 or not texts:
        return ""
    kept = ""
    for text in reversed(texts):
        # counted joined, as it is sent: counts are not additive across the blank lines between texts
        candidate = f"{text}\n\n{kept}" if kept else text
        if count([candidate])[0] > budget:
            break
        kept = candidate
    if kept:
        return kept
    newest = texts[-1]
    spans = sentence_spans(newest)
    for a, _b in spans:
        piece = newest[a:].strip()
        if count([piece])[0] <= budget:
            return piece
    return ""
