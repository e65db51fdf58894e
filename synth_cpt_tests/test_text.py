import gzip
import json
import random
import re
import unicodedata

import ftfy
import polars as pl
import pytest
from ftfy.badness import is_bad
from hypothesis import given, settings
from hypothesis import strategies as st

from synth_cpt.text import encoding as E
from synth_cpt.text import heuristics as H
from synth_cpt.text import langid as L
from synth_cpt.text import normalize as N
from synth_cpt.text.encoding import repair_encodings, suspect_pattern
from synth_cpt.text.heuristics import heuristic_scores, score_text
from synth_cpt.text.langid import identify, normalize_code
from synth_cpt.text.normalize import doc_id, doc_ids, nfc_unstable_pattern, normalize_expr, normalize_text, normalize_texts

from .conftest import EN_TEXT, PT_TEXT, SAMPLE_DROPS

TRICKY = [
    "a\r\nb\x00c  \t d \n\n\n\n e\u00a0f ",
    "Cafe\u0301 com leite",  # decomposed é -> NFC
    "\x85\x07  \n\n",
    "linha 1   \n   linha 2\r\rfim",
    "tabs\t\tand\u2003em\u3000spaces",
    "",
    "   ",
    "ﬁ ligature stays (NFC, not NFKC)",
    "line\u2028separator and\u2029paragraph separator count as spaces",
    "Cafe\x00\u0301 with a NUL between letter and accent",
    "zero\u200bwidth\u2060joiner\ufeffbom\u180e and ZWJ \U0001f469\u200d\U0001f4bb stays",
]


@pytest.mark.parametrize("text", TRICKY)
def test_normalize_scalar_and_vectorized_agree(text):
    vectorized = pl.DataFrame({"t": [text]}).select(normalize_expr("t"))["t"][0]
    assert vectorized == normalize_text(text)


def test_normalize_rules():
    assert normalize_text("Cafe\u0301") == "Café"
    assert doc_id(normalize_text("Cafe\x00\u0301")) == doc_id(normalize_text("Café")), "NFC after control characters go"
    assert normalize_text("\u200b\u2060\ufeff") == ""
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("a\x00b\x7fc\x9fd") == "abcd"
    assert normalize_text("a \t\u00a0 b") == "a b"
    assert normalize_text("a  \n  b") == "a\nb"
    assert normalize_text("a\n\n\n\n\nb") == "a\n\nb"
    assert normalize_text("  \n a \n ") == "a"
    assert normalize_text("ﬁ") == "ﬁ"


def test_doc_id_is_hash_of_normalized_text():
    assert doc_id(normalize_text("Olá  mundo")) == doc_id(normalize_text("Olá mundo\n"))
    assert doc_id("a") != doc_id("b")
    assert len(doc_id("a")) == 32


def _sample_texts():
    with gzip.open(SAMPLE_DROPS / "2026-11-01_pt_gimp-help.jsonl.gz") as f:
        return [normalize_text(json.loads(line)["text"]) for line in f]


def test_heuristic_vectorized_matches_scalar_on_sample_corpus():
    texts = _sample_texts() + [normalize_text(t) for t in TRICKY] + ["# # # ...\n- a\n- a\n- a", "x" * 50]
    assert heuristic_scores(pl.Series(texts)).to_list() == [score_text(t) for t in texts]


def test_heuristic_orders_prose_above_junk():
    prose = PT_TEXT + "\n\n" + EN_TEXT
    junk = "\n".join(["HOME", "MENU", "Login", "Login", "Login", "#1 ...", "- click", "- here"] * 3)
    assert score_text(prose) == 5.0
    # 33 words in 24 short lines: passes 4 of 9 rules (mean word length, alphabetic words, bullets, ellipses),
    # then scaled by 33/50 for being short
    assert score_text(junk) == round(4 * 5 / 9 * 33 / 50, 4)
    # one word passes 5 trivial rules but is scaled by 1/50: never a high-quality document
    assert score_text("no") == round(5 * 5 / 9 / 50, 4)
    assert [score_text(""), score_text(" "), heuristic_scores(pl.Series([""]))[0]] == [0.0, 0.0, 0.0]


def test_language_identification():
    codes, probs = identify([PT_TEXT, EN_TEXT, "1234 5678 !!!! ----"])
    assert codes[:2] == ["pt", "en"]
    assert probs[0] > 0.9 and probs[1] > 0.9
    assert probs[2] < 0.4


def test_language_codes_from_records():
    assert normalize_code("pt-BR") == "pt"
    assert normalize_code(" EN_us ") == "en"
    assert normalize_code(3) is None
    assert normalize_code("") is None


# --- batch forms that skip work: each must give exactly what the plain form gives -------------------

_NORMALIZE_ALPHABET = (
    list("ab Z.\n\n\r\t-#")
    + ["\r\n", "  ", "\x00", "\x1f", "\x7f", "\x85", "\x9f", "\u200b", "\u2060", "\ufeff", "\u180e", "\u200d"]
    + ["\u00a0", "\u2003", "\u3000", "\u2028", "\u2029"]
    + ["\u0301", "\u0308", "\u0327", "\u0345", "\u0334", "e", "\u00e9", "\u212b", "\u2000", "\u0344", "\u0958"]
    + ["\u0915", "\u093c", "\u1100", "\u1161", "\u11a8", "\uac00", "\u0cbf", "\u0cd5", "\u0f73", "\U0001f600", "\U0002f800"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_NORMALIZE_ALPHABET), max_size=20).map("".join), min_size=1, max_size=30))
def test_batch_normalizer_agrees_with_the_expression_and_the_scalar(texts):
    batch = normalize_texts(pl.Series("text", texts))
    assert batch.to_list() == pl.DataFrame({"t": texts}).select(normalize_expr("t"))["t"].to_list()
    assert batch.to_list() == [normalize_text(t) for t in texts]
    assert batch.name == "text"


@pytest.mark.parametrize("text", TRICKY)
def test_batch_normalizer_on_tricky_texts(text):
    assert normalize_texts(pl.Series([text, "plain"]))[0] == normalize_text(text)


def test_batch_normalizer_leaves_its_input_unchanged():
    """The caller keeps the raw texts (quarantine rows, encoding repair): normalizing a batch must not
    rewrite the Series it was given."""
    texts = pl.Series("text", ["a\r\nb", "Cafe\u0301", "x\x00y", "plain"])
    before = texts.to_list()
    normalize_texts(texts)
    assert texts.to_list() == before


def test_characters_outside_the_nfc_class_never_change_under_nfc():
    """NFC is skipped for texts without a character of `nfc_unstable_pattern`: any string of the other
    characters must be its own NFC, in polars' Unicode version (each also after base letters and jamo)."""
    everything = pl.Series([chr(c) for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF])
    stable = everything.filter(~everything.str.contains(nfc_unstable_pattern())).to_list()
    assert len(stable) > 80_000
    rng = random.Random(0)
    shuffled = stable[:]
    rng.shuffle(shuffled)
    texts = ["".join(stable), "".join(shuffled), *("".join(base + c for c in stable) for base in ("a", "e", "\u1100", "\u0915"))]
    series = pl.Series(texts)
    assert series.str.normalize("NFC").to_list() == texts
    assert [unicodedata.normalize("NFC", t) for t in texts] == texts


def test_control_character_groups_are_the_control_class():
    everything = pl.Series([chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF])
    frame = pl.DataFrame({"t": everything})
    in_groups = frame.select(pl.any_horizontal(pl.col("t").str.contains(c) for c in N._CONTROL_CLASSES)).to_series()
    assert in_groups.equals(everything.str.contains(N._CONTROL))


_MOJIBAKE_ALPHABET = (
    list("ab eA.,?!\n")
    + [chr(c) for c in range(0x80, 0x100)]
    + list("ŒœŠšŽžŸƒˆ˜–—‘’‚“”„†‡•…‰‹›€™")
    + [chr(c) for c in range(0x401, 0x460)]
    + [chr(c) for c in range(0x391, 0x3CF)]
    + list("│┌┐┘├┤┬┼═║▀▄█▌▐░▒▓√±∂≠≈°ā")
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_MOJIBAKE_ALPHABET), max_size=12).map("".join), min_size=1, max_size=40))
def test_mojibake_prefilter_never_skips_a_text_ftfy_would_change(texts):
    series = pl.Series(texts)
    assert series.str.contains(suspect_pattern()).to_list() == [is_bad(t) for t in texts], "exactly ftfy's own test"
    repaired, changed = repair_encodings(series)
    expected = [ftfy.fix_encoding(t) for t in texts]
    assert repaired.to_list() == expected
    assert changed.to_list() == [a != b for a, b in zip(texts, expected, strict=True)]


def test_mojibake_of_other_encodings_is_repaired_too():
    texts = ["РїСЂРёРІРµС‚ РјРёСЂ", "\x93quoted\x94 text", "nÃ£o Ã© fÃ¡cil", "café”", "plain ascii"]
    repaired, changed = repair_encodings(pl.Series(texts))
    assert repaired.to_list() == ["привет мир", "“quoted” text", "não é fácil", "café”", "plain ascii"]
    assert changed.to_list() == [True, True, True, False, False]


def test_python_categories_in_the_translated_pattern_are_pythons():
    import re._constants as sre

    for category, pattern in ((sre.CATEGORY_SPACE, r"\s"), (sre.CATEGORY_WORD, r"\w")):
        match = re.compile(pattern).match
        expected = [c for c in range(0x110000) if match(chr(c))]
        assert [c for a, b in E._category(category) for c in range(a, b + 1)] == expected


_SCORE_ALPHABET = list("ab xé1.#-*…”'\n") + ["...", "\n\n", "•", "– ", "\u2028", "😀", "\u00a0", "\t", "  ", "(", ")", "»", "Ж", "\u0301"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_SCORE_ALPHABET), max_size=60).map("".join), min_size=1, max_size=20))
def test_heuristic_vectorized_matches_scalar_on_any_text(texts):
    normalized = [normalize_text(t) for t in texts]
    assert heuristic_scores(pl.Series(normalized)).to_list() == [score_text(t) for t in normalized]
    # not normalized (runs of spaces, tabs, NBSP, spaces at the edges): the word counts fall back to the regex
    raw = pl.Series(texts, dtype=pl.String)
    spaces, breaks = raw.str.count_matches(" ", literal=True), raw.str.count_matches("\n", literal=True)
    assert H._word_counts(raw, spaces, breaks).to_list() == raw.str.count_matches(r"\S+").cast(pl.Float64).to_list()


def test_doc_ids_of_a_column_are_the_scalar_doc_ids():
    texts = ["a", "", "Olá mundo", "\U0001f600 x"]
    assert doc_ids(pl.Series(texts)).to_list() == [doc_id(t) for t in texts]
    assert doc_ids(pl.Series(["x", *texts]).slice(1)).to_list() == [doc_id(t) for t in texts], "a sliced column"
    assert doc_ids(pl.Series(["a", None])).to_list() == [doc_id("a"), None]


class _CountingModel:
    """Test double around the real fastText model: counts the lines it is asked to classify."""

    def __init__(self, model):
        self.lines: list[str] = []
        outer = self

        class F:
            def predict(self, line, *args):
                outer.lines.append(line)
                return model.f.predict(line, *args)

        self.f = F()


def test_language_id_classifies_each_distinct_opening_once(monkeypatch):
    counting = _CountingModel(L._model())
    monkeypatch.setattr(L, "_model", lambda: counting)
    texts = [PT_TEXT, EN_TEXT, PT_TEXT, PT_TEXT + " and a different ending past the classified characters", EN_TEXT]
    codes, probs = identify(texts, max_chars=len(PT_TEXT))
    assert len(counting.lines) == 2, "duplicates (and texts that differ only past max_chars) are classified once"
    one_by_one = [identify([t], max_chars=len(PT_TEXT)) for t in texts]
    assert codes == [c for (c,), _ in one_by_one] and probs == [p for _, (p,) in one_by_one]
    assert codes == ["pt", "en", "pt", "pt", "en"]
