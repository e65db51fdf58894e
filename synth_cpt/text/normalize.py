"""Text normalization: one definition, as a polars expression (batches) and a scalar (one record).

Rules, in order: CRLF and CR become LF; control characters other than TAB and LF (C0, DEL, C1) and
invisible format characters (zero-width space, word joiner, zero-width no-break space/BOM, Mongolian
vowel separator; ZWJ and ZWNJ stay, scripts and emoji need them) are removed; then Unicode NFC, so a
combining mark split from its letter by a removed character composes with it; runs of spaces and tabs (and other horizontal Unicode spaces) become one space;
spaces at line ends are trimmed; three or more line breaks become two; the text is stripped.
`doc_id` is the first 32 hex digits of SHA-256 of the normalized text in UTF-8.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl

_CONTROL = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\u200B\u2060\uFEFF\u180E]"
_HS = r"\t\u00A0\u1680\u2000-\u200A\u202F\u205F\u3000"  # horizontal spaces other than ' '
_HSPACE = rf"[ {_HS}]+"
# The same rewrite, matching only runs that change (a lone ' ' is left alone): 4x faster in polars'
# automaton engine. Python's backtracking `re` keeps the simple form, which is linear there.
_HSPACE_CHANGING = rf"[ {_HS}]*[{_HS}][ {_HS}]*| {{2,}}"
_LINE_EDGE = r" *\n *"
_MANY_BREAKS = r"\n{3,}"

_control_re = re.compile(_CONTROL)
_hspace_re = re.compile(_HSPACE)
_line_edge_re = re.compile(_LINE_EDGE)
_many_breaks_re = re.compile(_MANY_BREAKS)


def normalize_text(text: str) -> str:
    """Scalar form of `normalize_expr`; the two agree on every input (tested)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _control_re.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _hspace_re.sub(" ", text)
    text = _line_edge_re.sub("\n", text)
    text = _many_breaks_re.sub("\n\n", text)
    return text.strip(" \n")


def normalize_expr(column: str | pl.Expr) -> pl.Expr:
    expr = pl.col(column) if isinstance(column, str) else column
    return (
        expr.str.replace_all("\r\n", "\n", literal=True)
        .str.replace_all("\r", "\n", literal=True)
        .str.replace_all(_CONTROL, "")
        .str.normalize("NFC")
        .str.replace_all(_HSPACE_CHANGING, " ")
        .str.replace_all(_LINE_EDGE, "\n")
        .str.replace_all(_MANY_BREAKS, "\n\n")
        .str.strip_chars(" \n")
    )


def doc_id(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:32]


def doc_ids(normalized: list[str]) -> list[str]:
    sha = hashlib.sha256
    return [sha(t.encode("utf-8")).hexdigest()[:32] for t in normalized]
