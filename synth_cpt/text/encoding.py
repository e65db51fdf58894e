"""Mojibake repair: UTF-8 text that was decoded as Latin-1, Windows-1252, Windows-1251 or another
single-byte encoding somewhere upstream ("nÃ£o", "pÃ¡ginas", "РїСЂРёРІРµС‚"), put back with ftfy's
`fix_encoding` (encoding only: quotes, widths and NFC are left to the normalizer) before hashing and
language id.

Why not run ftfy on everything: it costs per character in Python (~0.5 ms for a 3 KB text). ftfy
itself changes nothing unless its badness regex (`ftfy.badness.BADNESS_RE`) matches, so that regex,
translated once into polars' regex syntax with the same character sets (`suspect_pattern`), picks the
texts ftfy could change in one vectorized pass, and ftfy runs on those alone. The pre-filter is exactly
ftfy's own first test, so it never skips a text that ftfy would change (tested against ftfy).
"""

from __future__ import annotations

import array
import re
import re._constants as _sre
import re._parser as _sre_parse
import sys
from functools import lru_cache

import ftfy
import polars as pl
from ftfy.badness import BADNESS_RE

_MAX = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
# Any non-ASCII character: ftfy leaves ASCII text alone, so this is the safe fallback pre-filter
NON_ASCII = r"[^\x00-\x7F]"


def repair_encoding(text: str) -> str:
    """One text, mojibake undone (unchanged if it is not mojibake)."""
    return ftfy.fix_encoding(text)


Intervals = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges


@lru_cache(maxsize=1)
def _every_character() -> str:
    """All code points in order (surrogates included), to let Python's own regex engine say which
    characters its \\s, \\w and \\d match."""
    codec = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"
    return array.array("I", range(_MAX + 1)).tobytes().decode(codec, "surrogatepass")


@lru_cache(maxsize=None)
def _category(category: object) -> tuple[tuple[int, int], ...]:
    """The code points a `str` pattern's \\s, \\w or \\d (or their negations) matches, as ranges."""
    pattern = {
        _sre.CATEGORY_SPACE: r"\s+",
        _sre.CATEGORY_NOT_SPACE: r"\S+",
        _sre.CATEGORY_WORD: r"\w+",
        _sre.CATEGORY_NOT_WORD: r"\W+",
        _sre.CATEGORY_DIGIT: r"\d+",
        _sre.CATEGORY_NOT_DIGIT: r"\D+",
    }[category]
    return tuple((m.start(), m.end() - 1) for m in re.finditer(pattern, _every_character()))


def _merge(ranges: Intervals) -> Intervals:
    merged: Intervals = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _complement(ranges: Intervals) -> Intervals:
    out: Intervals = []
    next_start = 0
    for a, b in _merge(ranges):
        if a > next_start:
            out.append((next_start, a - 1))
        next_start = b + 1
    if next_start <= _MAX:
        out.append((next_start, _MAX))
    return out


def _class(ranges: Intervals) -> str:
    """A regex character class of exactly these code points (surrogates dropped: never in UTF-8)."""
    parts = []
    for a, b in _complement(_complement(ranges) + [_SURROGATES]):
        parts.append(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}")
    if not parts:
        raise ValueError("empty character class")
    return "[" + "".join(parts) + "]"


def _members(items: list) -> Intervals:
    ranges: Intervals = []
    negate = False
    for op, arg in items:
        if op is _sre.NEGATE:
            negate = True
        elif op is _sre.LITERAL:
            ranges.append((arg, arg))
        elif op is _sre.RANGE:
            ranges.append((arg[0], arg[1]))
        elif op is _sre.CATEGORY:
            ranges.extend(_category(arg))
        else:
            raise ValueError(f"unsupported class item {op}")
    return _complement(ranges) if negate else _merge(ranges)


def _translate(tree) -> str:
    """A parsed Python pattern as a Rust-regex pattern that matches the same strings."""
    out = []
    for op, arg in tree:
        if op is _sre.LITERAL:
            out.append(f"\\x{{{arg:X}}}")
        elif op is _sre.NOT_LITERAL:
            out.append(_class(_complement([(arg, arg)])))
        elif op is _sre.IN:
            out.append(_class(_members(arg)))
        elif op is _sre.ANY:
            out.append(r"[^\n]")  # no DOTALL
        elif op is _sre.AT and arg in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING):
            out.append(r"\A")  # no MULTILINE: '^' is the start of the text
        elif op is _sre.BRANCH:
            out.append("(?:" + "|".join(_translate(branch) for branch in arg[1]) + ")")
        elif op is _sre.SUBPATTERN:
            out.append("(?:" + _translate(arg[-1]) + ")")
        elif op is _sre.MAX_REPEAT:
            low, high, sub = arg
            out.append(f"(?:{_translate(sub)}){{{low},{'' if high is _sre.MAXREPEAT else high}}}")
        else:
            raise ValueError(f"unsupported pattern element {op} {arg}")
    return "".join(out)


@lru_cache(maxsize=1)
def suspect_pattern() -> str:
    """ftfy's badness regex in polars' syntax: a text it does not match is one ftfy leaves unchanged.

    Falls back to "any non-ASCII character" if a future ftfy uses a construct this translation does
    not know (still never skipping a text ftfy would change, only slower)."""
    if BADNESS_RE.flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL | re.ASCII | re.LOCALE):
        return NON_ASCII
    try:
        return _translate(_sre_parse.parse(BADNESS_RE.pattern, BADNESS_RE.flags))
    except (ValueError, TypeError, AttributeError):
        return NON_ASCII


def repair_encodings(texts: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(texts with mojibake repaired, whether each was changed); only texts ftfy could change reach it."""
    suspect = texts.str.contains(suspect_pattern()).fill_null(False)
    changed = pl.Series("encoding_repaired", [False] * texts.len(), dtype=pl.Boolean)
    if not suspect.any():
        return texts, changed
    idx = suspect.arg_true()
    before = texts.gather(idx).to_list()
    after = [repair_encoding(t) for t in before]
    repaired = texts.clone().scatter(idx, after)
    return repaired, changed.scatter(idx, [a != b for a, b in zip(before, after, strict=True)])
