"""Nemotron-CC percentile bucketing (METHODS §3): cut points, values 0-19, max over scores, bucket > 11 high."""

import hashlib
import random

import numpy as np
import polars as pl
import pytest

from synth_cpt.core.config import load_config
from synth_cpt.core.storage import LocalStorage
from synth_cpt.ingest.cutpoints import (
    PERCENTILES,
    Cutpoints,
    check_cutpoints,
    compute_cutpoints,
    digest,
    score_values,
    weighted_cutpoints,
)

from .conftest import REPO, make_config


def test_nineteen_cut_points_at_5_to_95():
    assert PERCENTILES == (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95)


def test_token_weighted_cut_points_of_a_hand_made_sample():
    # cumulative weights 10, 40, 60, 80, 100 of 100: p5-p10 -> 0.5, p15-p40 -> 1.0, p45-p60 -> 1.5, p65-p80 -> 2.0, p85-p95 -> 3.0
    values, weights = [3.0, 1.0, 2.0, 0.5, 1.5], [20, 30, 20, 10, 20]  # unsorted: the order must not matter
    expected = [0.5, 0.5] + [1.0] * 6 + [1.5] * 4 + [2.0] * 4 + [3.0] * 3
    assert weighted_cutpoints(values, weights) == expected
    # unweighted, the same values cut elsewhere: the weights are used
    assert weighted_cutpoints(values, [1] * 5) == [0.5] * 4 + [1.0] * 4 + [1.5] * 4 + [2.0] * 4 + [3.0] * 3
    assert weighted_cutpoints([], []) is None


def test_cut_points_of_twenty_equal_weights_are_the_first_nineteen_values():
    values = list(range(20, 0, -1))  # 20 .. 1
    assert weighted_cutpoints(values, [7] * 20) == [float(v) for v in range(1, 20)]


def test_a_score_maps_to_the_number_of_cut_points_below_it():
    cuts = [float(v) for v in range(1, 20)]  # 1 .. 19
    got = score_values([0.2, 0.9999, 1.0, 1.5, 11.9999, 12.0, 18.9999, 19.0, 19.5, None], cuts)
    # below the first -> 0; equal to a cut point -> the upper bin; at or above the last -> 19; missing -> NaN
    assert got[:9].tolist() == [0.0, 0.0, 1.0, 1.0, 11.0, 12.0, 18.0, 19.0, 19.0]
    assert np.isnan(got[9])
    tied = [1.0] + [5.0] * 18  # a score saturated at its top: the tied block takes the highest band it spans
    assert score_values([5.0, 3.0], tied).tolist() == [19.0, 1.0]
    assert np.isnan(score_values([3.0], None)).all(), "a score without cut points counts as missing"


def test_bucket_value_is_the_max_over_scores_with_the_heuristic_only_as_fallback():
    cuts = Cutpoints(
        "pt",
        {
            "edu": [float(v) for v in range(1, 20)],  # edu e in 1..19 -> e
            "stem": [v / 10 for v in range(1, 20)],  # stem s -> 10 s
            "heuristic": [v / 4 for v in range(1, 20)],  # heuristic h -> 4 h
        },
    )
    frame = pl.DataFrame(
        {
            "score_edu": [5.0, 13.0, None, None, 12.0],
            "score_stem": [1.4, 0.3, 0.4, None, None],
            "score_heuristic": [4.0, 4.0, 4.0, 1.75, 0.1],
        }
    )
    values = cuts.bucket_values(frame).to_pylist()
    # max(5, 14) = 14; max(13, 3) = 13; stem alone 4; neither -> heuristic 7; edu alone 12 (the heuristic's
    # 16 and 0 are not used: a field score wins over the fallback)
    assert values == [14.0, 13.0, 4.0, 7.0, 12.0]
    nemotron = load_config(REPO / "synth_cpt/defaults/nemotron.yaml")
    assert nemotron.quality.method == "percentiles" and nemotron.synthesis.profile == "nemotron"
    high, low = nemotron.quality.buckets["high"], nemotron.quality.buckets["low"]
    assert [high.contains(v) for v in values] == [True, True, False, False, True]
    assert [low.contains(v) for v in values] == [False, False, True, True, False]
    assert [high.contains(v) for v in (11.0, 12.0)] == [False, True], "bucket > 11 is high"
    assert [low.contains(v) for v in (0.0, 11.0)] == [True, True], "the defaults' low bound (ge 0.5) is not inherited"


def test_a_score_without_cut_points_is_ignored_and_no_usable_score_is_null():
    cuts = Cutpoints("en", {"edu": None, "stem": [float(v) for v in range(1, 20)], "heuristic": None})
    frame = pl.DataFrame({"score_edu": [4.0, 4.0], "score_stem": [3.5, None], "score_heuristic": [1.0, 1.0]})
    assert cuts.bucket_values(frame).to_pylist() == [3.0, None]


def test_check_rejects_bad_cut_points():
    good = {"scores": {"edu": {"cutpoints": [float(v) for v in range(19)]}, "stem": {"cutpoints": None}}}
    good["sha256"] = digest({"edu": good["scores"]["edu"]["cutpoints"], "stem": None})
    assert (check_cutpoints(good).success, check_cutpoints(good).failures) == (True, [])
    short = {"scores": {"edu": {"cutpoints": [1.0] * 18}}, "sha256": digest({"edu": [1.0] * 18})}
    down = {"scores": {"edu": {"cutpoints": [2.0] + [1.0] * 18}}, "sha256": digest({"edu": [2.0] + [1.0] * 18})}
    wrong_sha = {**good, "sha256": "0" * 64}
    assert [check_cutpoints(p).failures for p in (short, down, wrong_sha)] == [
        ["edu: 18 cut points, expected 19"],
        ["edu: cut points decrease"],
        ["sha256 does not match the cut points"],
    ]


def _drop(storage, drop_id, rows):
    frame = pl.DataFrame(
        rows,
        schema={
            "doc_id": pl.String, "language": pl.String, "score_edu": pl.Float64, "score_stem": pl.Float64,
            "score_heuristic": pl.Float64, "n_chars": pl.Int64, "drop_id": pl.String, "source_line": pl.Int64,
        },
        orient="row",
    )  # fmt: skip
    storage.write_parquet(f"crawl_drops/{drop_id}/v/1/docs.parquet", frame)
    return f"crawl_drops/{drop_id}/v/1"


@pytest.mark.parametrize("limit", [25, 1000])
def test_cut_points_come_from_the_seeded_deduplicated_sample_and_repeat(tmp_path, limit):
    rng = random.Random(7)
    storage = LocalStorage(tmp_path / "home")
    docs = [(f"d{i:03d}", rng.choice(["pt", "en"]), rng.random() * 5, None, 1.0, rng.randint(10, 500)) for i in range(120)]
    first = _drop(storage, "2026-11-01", [(*d[:5], d[5], "2026-11-01", i) for i, d in enumerate(docs[:80])])
    # the later drop repeats d000-d019 with other scores: the earliest drop's occurrence counts, as in raw_corpus
    again = [(d[0], d[1], 4.99, None, 1.0, 9999, "2026-11-02", i) for i, d in enumerate(docs[:20])]
    second = _drop(storage, "2026-11-02", again + [(*d[:5], d[5], "2026-11-02", 20 + i) for i, d in enumerate(docs[80:])])
    config = make_config(tmp_path, quality={"method": "percentiles", "percentile_sample": limit}, seeds={"quality": 99})

    payload = compute_cutpoints(storage, config, "pt", [second, first])  # prefix order does not matter
    pt = [d for d in docs if d[1] == "pt"]
    chosen = sorted(pt, key=lambda d: hashlib.sha256(f"99:{d[0]}".encode()).hexdigest())[:limit]
    assert payload["sampled_documents"] == min(limit, len(pt))
    assert payload["weight"] == "characters" and payload["tokenizer_sha256"] is None
    assert payload["scores"]["edu"]["cutpoints"] == weighted_cutpoints([d[2] for d in chosen], [d[5] for d in chosen])
    assert payload["scores"]["edu"]["documents"] == len(chosen)
    assert payload["scores"]["stem"] == {"cutpoints": None, "documents": 0, "weight": 0}
    assert payload["scores"]["heuristic"]["documents"] == 0, "every sampled document has a field score"
    assert compute_cutpoints(storage, config, "pt", [first, second]) == payload, "same seed, same cut points"


def test_a_configured_target_tokenizer_weighs_by_its_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.trainers import WordLevelTrainer

    long_word, many_words = "a" * 400, " ".join("bcdefghijklmnopqrstu")  # 1 token of 400 chars; 20 tokens of 39 chars
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([long_word, many_words], WordLevelTrainer(special_tokens=["[UNK]"]))
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    storage = LocalStorage(tmp_path / "home")
    rows = [("d1", long_word, "pt", 1.0, 400), ("d2", many_words, "pt", 2.0, 39)]
    frame = pl.DataFrame(
        [(d, t, lang, e, None, 1.0, n, "x", i) for i, (d, t, lang, e, n) in enumerate(rows)],
        schema={
            "doc_id": pl.String, "text": pl.String, "language": pl.String, "score_edu": pl.Float64, "score_stem": pl.Float64,
            "score_heuristic": pl.Float64, "n_chars": pl.Int64, "drop_id": pl.String, "source_line": pl.Int64,
        },
        orient="row",
    )  # fmt: skip
    storage.write_parquet("crawl_drops/x/v/1/docs.parquet", frame)
    by_chars = compute_cutpoints(storage, make_config(tmp_path, quality={"method": "percentiles"}), "pt", ["crawl_drops/x/v/1"])
    by_tokens = compute_cutpoints(
        storage,
        make_config(tmp_path, quality={"method": "percentiles"}, tokenizer={"model_file": str(tmp_path / "tokenizer.json")}),
        "pt",
        ["crawl_drops/x/v/1"],
    )
    # characters 400 + 39: p5-p90 fall on d1; tokens 1 + 20: d1 is under 5% of the weight
    assert (by_chars["weight"], by_chars["scores"]["edu"]["cutpoints"]) == ("characters", [1.0] * 18 + [2.0])
    assert (by_tokens["weight"], by_tokens["scores"]["edu"]["cutpoints"], by_tokens["scores"]["edu"]["weight"]) == (
        "tokens",
        [2.0] * 19,
        21,
    )
    assert by_tokens["tokenizer_sha256"] == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
