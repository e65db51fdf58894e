import gzip
import json

import polars as pl
import pytest

from synth_cpt.text.heuristics import heuristic_scores, score_text
from synth_cpt.text.langid import identify, normalize_code
from synth_cpt.text.normalize import doc_id, normalize_expr, normalize_text

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
    assert score_text("") == score_text(" ") == heuristic_scores(pl.Series([""]))[0]


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
