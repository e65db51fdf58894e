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
from functools import lru_cache

import polars as pl
import pyarrow as pa

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


def _classes(chars: str, size: int = 10) -> list[str]:
    """Character classes of at most `size` characters covering `chars`: polars' regex engine scans
    for a class that small with a vectorized prefilter, ten times faster than for a larger one."""
    return ["[" + "".join(f"\\x{{{ord(c):X}}}" for c in chars[i : i + size]) + "]" for i in range(0, len(chars), size)]


_CONTROL_CHARS = (
    "".join(chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]) + "\u200b\u2060\ufeff\u180e"
)
_CONTROL_CLASSES = _classes(_CONTROL_CHARS)


def _where(texts: pl.Series, needed: pl.Series, step) -> pl.Series:
    """`step` applied to the texts where it is `needed` (and only computed there). On a clone: `scatter`
    writes in place, and the caller's Series must stay as it was."""
    needed = needed.fill_null(False)
    if not needed.any():
        return texts
    idx = needed.arg_true()
    return texts.clone().scatter(idx, step(texts.gather(idx)))


def normalize_texts(texts: pl.Series) -> pl.Series:
    """`normalize_expr` over a batch, each rule run only on the texts it could change (a cheap scan
    says which): most texts have no CR, no control character and nothing NFC changes, and NFC alone is
    most of the normalizer's cost. Tested to agree with `normalize_expr`."""
    out = texts
    out = _where(
        out,
        out.str.contains("\r", literal=True),
        lambda s: s.str.replace_all("\r\n", "\n", literal=True).str.replace_all("\r", "\n", literal=True),
    )
    controls = pl.DataFrame([out.alias("t")]).select(pl.any_horizontal(pl.col("t").str.contains(c) for c in _CONTROL_CLASSES)).to_series()
    out = _where(out, controls, lambda s: s.str.replace_all(_CONTROL, ""))
    out = _where(out, out.str.contains(nfc_unstable_pattern()), lambda s: s.str.normalize("NFC"))
    out = out.str.replace_all(_HSPACE_CHANGING, " ")
    out = _where(out, out.str.contains(" \n|\n "), lambda s: s.str.replace_all(_LINE_EDGE, "\n"))
    return out.str.replace_all(_MANY_BREAKS, "\n\n").str.strip_chars(" \n")


@lru_cache(maxsize=1)
def nfc_unstable_pattern() -> str:
    """A character class of every character that NFC may change, reorder or compose with what
    precedes it. A text with none of them is its own NFC (Unicode's NFC quick check: all
    characters NFC_Quick_Check=Yes, canonical combining class 0).

    From Python's Unicode database: characters that NFC changes on their own (NFC_QC=No), that have
    a non-zero combining class, or that can be the second of a canonical composition (NFC_QC=Maybe,
    Hangul vowels and trailing consonants included); plus, so that polars' possibly newer Unicode
    version is covered, every character Python does not know and all of planes 2-16 (rare; correct,
    only slower)."""
    chars = [chr(c) for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF]
    unstable = {0x1161 + k for k in range(0x15)} | {0x11A8 + k for k in range(0x1B)}  # Hangul V and T jamo compose
    categories = map(unicodedata.category, chars)
    combining = map(unicodedata.combining, chars)
    decompositions = map(unicodedata.decomposition, chars)
    for ch, category, ccc, decomposition in zip(chars, categories, combining, decompositions, strict=True):
        if category == "Cn" or ccc:
            unstable.add(ord(ch))
        if decomposition and not decomposition.startswith("<"):  # only these can change under NFC alone
            if unicodedata.normalize("NFC", ch) != ch:
                unstable.add(ord(ch))
            unstable.update(int(part, 16) for part in decomposition.split()[1:])
    ranges: list[list[int]] = []
    for c in sorted(unstable):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    ranges.append([0x20000, 0x10FFFF])
    return "[" + "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges) + "]"


def doc_id(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:32]


def doc_ids(normalized: pl.Series) -> pl.Series:
    """`doc_id` of each text, hashed straight from the column's UTF-8 buffer (no Python strings)."""
    if normalized.is_empty() or normalized.null_count():
        return pl.Series([None if t is None else doc_id(t) for t in normalized.to_list()], dtype=pl.String)
    arr = normalized.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    _, offsets_buf, data_buf = arr.buffers()
    offsets = memoryview(offsets_buf).cast("q")[arr.offset : arr.offset + len(arr) + 1]
    data = memoryview(data_buf if data_buf is not None else b"")
    sha = hashlib.sha256
    return pl.Series([sha(data[offsets[i] : offsets[i + 1]]).hexdigest()[:32] for i in range(len(arr))], dtype=pl.String)
