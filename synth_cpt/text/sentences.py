"""Sentence and line spans of a text, as character offsets that cover it exactly.

blingfire finds sentence ends fast and in any language, but it cuts after abbreviations it does not
know ("A Dra. Ana", "pág. 3"), and it does not cut before a sentence that opens with an accented
capital ("Às quatro", "É verdade", "Última"), which Portuguese has often. So its cuts are joined by
every end mark followed by space and a capital letter, and a candidate is kept only where the next
sentence really starts: a cut after a known abbreviation of the language, or before a lowercase
letter or a digit, is undone.
"""

from __future__ import annotations

import re

import blingfire

# Abbreviations that end with a period inside a sentence (lowercase, without the final period).
ABBREVIATIONS: dict[str, frozenset[str]] = {
    "pt": frozenset(
        "sr sra srta dr dra drs dras prof profa eng enga arq adv exmo exma ilmo ilma v.exa sto sta "
        "pág págs p pp cap caps art arts fig figs vol vols ed eds n nº núm num tel av r rua pça "
        "cia ltda etc p.ex ex obs aprox séc sec jan fev mar abr mai jun jul ago set out nov dez "
        "min máx max seg qua qui sex sáb dom km kg cm mm ml hab apto dept depto gov gal cel maj cap ten sgto".split()
    ),
    "en": frozenset(
        "mr mrs ms dr prof sr jr st vs etc e.g i.e fig figs eq eqs no nos vol vols ed eds p pp ch sec "
        "approx dept est inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec mt ft gen col "
        "lt sgt capt cmdr rev hon".split()
    ),
}
_LAST_WORD = re.compile(r"(\S+)\s*$")
# an end mark, closing quotes or brackets, whitespace, then an uppercase letter (any script, accented too)
_END_BEFORE_CAPITAL = re.compile(r"[.!?…][\"'»”’)\]]*\s+(?=[^\W\d_])")


def _continues(text: str, cut: int, prev_start: int, language: str) -> bool:
    """True when the text after `cut` continues the sentence before it (the cut was wrong)."""
    following = text[cut:].lstrip()
    if not following:
        return False
    first = following[0]
    if first.islower() or first.isdigit():
        return True
    last = _LAST_WORD.search(text[prev_start:cut])
    if not last:
        return False
    word = last.group(1).lower().lstrip("(\"'«“")
    if not word.endswith("."):
        return False
    word = word[:-1]
    abbreviations = ABBREVIATIONS.get(language, frozenset())
    # initials ("J. Silva") and known abbreviations
    return (len(word) == 1 and word.isalpha()) or word in abbreviations


def sentence_spans(text: str, language: str = "") -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of `text`; each span runs to the next one's start, so
    the spans concatenate back to exactly `text` (leading whitespace belongs to the first)."""
    if not text:
        return []
    _, offsets = blingfire.text_to_sentences_and_offsets(text)
    candidates = {start for start, _end in offsets[1:]}
    candidates |= {m.end() for m in _END_BEFORE_CAPITAL.finditer(text) if text[m.end()].isupper()}
    starts = [0]
    prev = 0
    for start in sorted(candidates):
        if start <= prev or start >= len(text):
            continue
        if _continues(text, start, prev, language):
            continue
        starts.append(start)
        prev = start
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(text)], strict=True)]


def line_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line, its newline included; they concatenate back to `text`."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in re.finditer("\n", text):
        spans.append((start, match.end()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans
