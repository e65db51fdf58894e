"""Mojibake repair: UTF-8 text that was decoded as Latin-1 or Windows-1252 somewhere upstream
("nÃ£o", "pÃ¡ginas", "freguÃªs"), put back with ftfy before hashing and language id.

Why not run ftfy on everything: it costs per character in Python. A cheap polars pre-filter finds the
only texts that can be such damage (a UTF-8 lead byte read as Latin-1, followed by a continuation
byte or a cp1252 punctuation character) and ftfy's `fix_encoding` (encoding only: quotes, widths and
NFC are left to the normalizer) runs on those alone.
"""

from __future__ import annotations

import ftfy
import polars as pl

# A UTF-8 lead byte (0xC2-0xF4) seen as Latin-1, then a continuation byte (0x80-0xBF) seen as Latin-1
# or as the cp1252 characters those bytes map to.
SUSPECT = (
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)


def repair_encoding(text: str) -> str:
    """One text, mojibake undone (unchanged if it is not mojibake)."""
    return ftfy.fix_encoding(text)


def repair_encodings(texts: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(texts with mojibake repaired, whether each was changed); only suspects reach ftfy."""
    suspect = texts.str.contains(SUSPECT).fill_null(False)
    changed = pl.Series("encoding_repaired", [False] * texts.len(), dtype=pl.Boolean)
    if not suspect.any():
        return texts, changed
    idx = suspect.arg_true()
    before = texts.gather(idx).to_list()
    after = [repair_encoding(t) for t in before]
    repaired = texts.clone().scatter(idx, after)
    return repaired, changed.scatter(idx, [a != b for a, b in zip(before, after, strict=True)])
