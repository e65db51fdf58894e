"""A built-in quality scorer for records that carry no classifier scores.

It maps the Gopher (Rae et al. 2021) and FineWeb quality rules to 0-5: each of the nine rules below
that a document passes adds 5/9 to its score (so 5.0 passes all, 0.0 none). A document under 50 words
has its score scaled by words/50: Gopher drops such documents outright, and a two-word page must not
reach a high bucket by passing the rules that short texts pass trivially. Lines are the non-empty
lines of the normalized text; words are whitespace-separated tokens.

| signal                 | passes when                | source  |
|------------------------|----------------------------|---------|
| words                  | 50 <= words <= 100,000     | Gopher  |
| mean_word_length       | 3 <= mean length <= 10     | Gopher  |
| symbol_ratio           | (# + ... + …) / words <= 0.1 | Gopher |
| alpha_word_fraction    | words with a letter >= 0.8 | Gopher  |
| bullet_line_fraction   | lines starting with a bullet <= 0.9 | Gopher |
| ellipsis_line_fraction | lines ending in ... or … <= 0.3 | Gopher |
| terminal_punct_fraction| lines ending in . ! ? : ; " ' ” » ) >= 0.12 | FineWeb |
| dup_line_char_fraction | characters in repeated lines <= 0.1 | FineWeb |
| short_line_fraction    | lines under 30 characters <= 0.67 | FineWeb |

Vectorized with polars (the scorer runs on every record of every drop); `score_text` is the same
rule set for one text, used by the benchmark's per-record baseline and by tests to cross-check.
"""

from __future__ import annotations

import polars as pl

SIGNALS = (
    "words",
    "mean_word_length",
    "symbol_ratio",
    "alpha_word_fraction",
    "bullet_line_fraction",
    "ellipsis_line_fraction",
    "terminal_punct_fraction",
    "dup_line_char_fraction",
    "short_line_fraction",
)
_BULLETS = "•-*·●▪‣◦–"
_TERMINAL = ".!?:;\"'”»)"
_BULLET_RE = r"(?m)^[•\-\*·●▪‣◦–]"
_ELLIPSIS_RE = r"(?m)(?:\.\.\.|…)$"
_NONLETTER_START = r"(?:\A|\s)[^\p{L}\s]+"  # a token's opening run of non-letters (and the space before it)


def _passes(words, mwl, sym, alpha, bullet, ellipsis, term, dup, short):  # works on floats and on exprs
    return [
        (words >= 50) & (words <= 100_000),
        (mwl >= 3) & (mwl <= 10),
        sym <= 0.1,
        alpha >= 0.8,
        bullet <= 0.9,
        ellipsis <= 0.3,
        term >= 0.12,
        dup <= 0.1,
        short <= 0.67,
    ]


# Whitespace other than ' ' and LF (Unicode White_Space, which polars' \s is, plus what Python's
# str.split also splits on), in groups of at most ten characters: polars' regex engine scans for a
# class that small with a vectorized prefilter, ten times faster than for a larger one.
_OTHER_WHITESPACE = ("[\t\x0b\x0c\r\x1c-\x1f\x85]", "[\xa0\u1680\u2000-\u2007]", "[\u2008-\u200a\u2028\u2029\u202f\u205f\u3000]")


def _word_counts(texts: pl.Series, spaces: pl.Series, breaks: pl.Series) -> pl.Series:
    """Whitespace-separated tokens of each text, as `count_matches(r"\\S+")` counts them.

    In a text whose only whitespace is single spaces and single or double line breaks, none at either
    end (what the normalizer leaves, almost always), tokens are one more than the whitespace runs, so
    they follow from the counts of spaces and line breaks already taken; the other texts are counted
    with the regex."""
    t = pl.col("text")
    frame = pl.DataFrame([texts.alias("text")])
    irregular = frame.select(
        pl.any_horizontal(
            t.str.contains("  | \n|\n |\n\n\n"),
            *(t.str.contains(c) for c in _OTHER_WHITESPACE),
            t.str.starts_with(" "),
            t.str.starts_with("\n"),
            t.str.ends_with(" "),
            t.str.ends_with("\n"),
            t.str.len_bytes() == 0,
        ).fill_null(True)
    ).to_series()
    double_breaks = frame.select(t.str.count_matches("\n\n", literal=True)).to_series()
    words = (spaces + breaks - double_breaks + 1).cast(pl.Float64)
    if irregular.any():
        idx = irregular.arg_true()
        words = words.scatter(idx, texts.gather(idx).str.count_matches(r"\S+").cast(pl.Float64).fill_null(0))
    return words


def heuristic_scores(texts: pl.Series) -> pl.Series:
    """Score in 0-5 for each normalized text (Float64, rounded to 4 places)."""
    df = pl.DataFrame({"text": texts}).with_row_index("i")
    t = pl.col("text")
    line, n, chars = pl.col("line"), pl.col("n"), pl.col("chars")
    # per distinct non-empty line of each text (a line repeated n times counts n times)
    lines = (
        df.select("i", t.str.split("\n").alias("line"))
        .explode("line")
        .filter(line.str.len_chars() > 0)
        .group_by("i", "line")
        .agg(n=pl.len())
        .with_columns(
            chars=line.str.len_chars().cast(pl.Int64),
            terminal=line.str.tail(1).is_in(list(_TERMINAL)),
        )
        .group_by("i")
        .agg(
            n.sum().cast(pl.Float64).alias("lines"),
            (n * pl.col("terminal")).sum().cast(pl.Float64).alias("terminal"),
            (n * (chars < 30)).sum().cast(pl.Float64).alias("short"),
            ((n - 1) * chars).sum().alias("dup_chars"),
            (n * chars).sum().alias("line_chars"),
        )
    )
    df = df.with_columns(
        t.str.count_matches(" ", literal=True).fill_null(0).alias("spaces"),
        t.str.count_matches("\n", literal=True).fill_null(0).alias("breaks"),
    )
    df = df.with_columns(words=_word_counts(df["text"], df["spaces"], df["breaks"]))
    w = pl.col("words")
    feats = (
        df.select(
            "i",
            "words",
            # normalized text has no whitespace but ' ', LF, U+2028 and U+2029: counting those
            # literally is 4x faster than counting every non-space character with a regex
            (t.str.len_chars() - pl.col("spaces") - pl.col("breaks") - t.str.count_matches("[\u2028\u2029]"))
            .cast(pl.Float64)
            .alias("nonspace"),
            t.str.count_matches(r"#|\.\.\.|…").cast(pl.Float64).alias("symbols"),
            t.str.count_matches(_BULLET_RE).cast(pl.Float64).alias("bullets"),  # rare characters: faster on the text
            t.str.count_matches(_ELLIPSIS_RE).cast(pl.Float64).alias("ellipses"),
            # tokens with a letter = all tokens - tokens without one: those whose opening run of
            # non-letters (what `_NONLETTER_START` takes, with the next character if it is a letter)
            # does not end in a letter; such openings are few, so they are extracted and checked
            (w - t.str.extract_all(_NONLETTER_START + r"\p{L}?").list.eval(pl.element().str.contains(r"\p{L}\z").not_()).list.sum()).alias(
                "alpha_words"
            ),
        )
        .join(lines, on="i", how="left", maintain_order="left")
        .fill_null(0)
    )
    n_lines = pl.max_horizontal(pl.col("lines"), pl.lit(1.0))
    n_words = pl.max_horizontal(w, pl.lit(1.0))
    passes = _passes(
        w,
        pl.col("nonspace") / n_words,
        pl.col("symbols") / n_words,
        pl.col("alpha_words") / n_words,
        pl.col("bullets") / n_lines,
        pl.col("ellipses") / n_lines,
        pl.col("terminal") / n_lines,
        pl.col("dup_chars") / pl.max_horizontal(pl.col("line_chars"), pl.lit(1)),
        pl.col("short") / n_lines,
    )
    short_scale = pl.min_horizontal(w / 50.0, pl.lit(1.0))
    score = (pl.sum_horizontal([p.cast(pl.Float64) for p in passes]) * 5.0 / len(passes) * short_scale).round(4)
    return feats.select(score.alias("score_heuristic")).to_series()


def score_text(text: str) -> float:
    """The same nine rules for one normalized text, in plain Python."""
    words = text.split()
    n_words = len(words)
    lines = [line for line in text.split("\n") if line]
    n_lines = max(len(lines), 1)
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    dup_chars = sum((n - 1) * len(line) for line, n in counts.items())
    line_chars = sum(n * len(line) for line, n in counts.items())
    nw = max(n_words, 1)
    passes = _passes(
        n_words,
        sum(len(x) for x in words) / nw,
        (text.count("#") + _count_dots(text)) / nw,
        sum(1 for x in words if any(c.isalpha() for c in x)) / nw,
        sum(1 for line in lines if line[0] in _BULLETS) / n_lines,
        sum(1 for line in lines if line.endswith(("...", "…"))) / n_lines,
        sum(1 for line in lines if line[-1] in _TERMINAL) / n_lines,
        dup_chars / max(line_chars, 1),
        sum(1 for line in lines if len(line) < 30) / n_lines,
    )
    return round(sum(bool(p) for p in passes) * 5.0 / len(passes) * min(n_words / 50.0, 1.0), 4)


def _count_dots(text: str) -> int:
    """Non-overlapping '...' and '…' matches, left to right (as the regex counts them)."""
    return text.count("...") + text.count("…")
