"""Intrinsic evals: diversity, template-aware near duplicates, copying, contamination, and eval_scores of a partition."""

import json

import pytest

from synth_cpt.core.config import PipelineConfig
from synth_cpt.evals import diversity as dv
from synth_cpt.evals.scores import plots, score_partition

from .conftest import PT_TEXT
from .test_lineage import materialized  # noqa: F401  (fixture)
from .test_mix_build import tokenizer  # noqa: F401  (fixture)


def test_distinct_n_and_compression():
    assert dv.distinct_n(["a b c d"], 1) == 1.0 and dv.distinct_n(["a a a a"], 1) == 0.25
    assert dv.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert dv.distinct_n([], 1) is None
    assert dv.compression_ratio(["o gato " * 200]) > dv.compression_ratio([PT_TEXT]) > 1


def test_templates_do_not_make_unrelated_qa_rewrites_twins():
    """Every QA rewrite opens the same way: without stripping the markers, short unrelated ones collide."""
    qa = [
        "Pergunta: Quem fundou a escola?\nResposta: Maria fundou a escola em 1990.",
        "Pergunta: Onde fica o rio?\nResposta: O rio fica ao norte da cidade.",
    ]
    assert dv.strip_template(qa[0]).startswith("Quem fundou")
    assert dv.near_duplicates(qa) == []
    assert dv.near_duplicates([PT_TEXT, PT_TEXT + " Fim.", "Outro texto bem diferente sobre rios e montanhas do norte."]) == [1]


def test_copying_and_contamination():
    assert dv.copy_overlap(PT_TEXT, PT_TEXT) == 1.0
    assert dv.copy_overlap("palavras totalmente novas que não existem na fonte original deste texto", PT_TEXT) == 0.0
    bench = ["linha sem nada", "um texto " + " ".join(PT_TEXT.split()[3:20]) + " e mais"]
    hits = dv.contamination(["nada aqui", PT_TEXT], bench)
    assert [(i, row) for i, row, _ in hits] == [(1, 1)] and len(hits[0][2].split()) == 13


def test_eval_scores_of_a_partition(materialized, tokenizer, tmp_path):  # noqa: F811
    storage, _ = materialized
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"text": " ".join(PT_TEXT.split()[:15])}) + "\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"boolq_pt": {"acc,none": 0.75}}}))
    config = PipelineConfig.model_validate({"evals": {"benchmarks": [str(bench)], "lm_eval_results": [str(results)]}})
    report = score_partition(storage, config, "pt", "high", tokenizer.count)
    sets = {r["set"]: r for r in report.scores.to_dicts()}
    assert set(sets) == {"original", "rewrite:easy", "mix:demo"}
    assert sets["original"]["rows"] == 10 and sets["rewrite:easy"]["rows"] == 12
    published = storage.read_parquet(storage.read_json("rewrites_easy/pt/high/current.json")["prefix"] + "/rows.parquet")
    assert sets["rewrite:easy"]["tokens"] == published["n_tokens"].sum(), "the rows' own project-tokenizer counts"
    assert sets["original"]["tokens"] == sum(tokenizer.count(storage.read_parquet("quality_subsets/pt/high/part-0.parquet")["text"].to_list()))
    assert 0 < sets["rewrite:easy"]["copy_overlap_mean"] <= 1 and sets["original"]["copy_overlap_mean"] is None
    assert all(0 <= (r["distinct_1"] or 0) <= 1 for r in sets.values())
    contaminated = report.contamination.to_dicts()
    assert contaminated and {c["set"] for c in contaminated} >= {"original"} and all(c["benchmark_row"] == 0 for c in contaminated)
    assert report.npm["all"] == {"npm": 50.0, "tasks": 1} and len(report.npm["missing"]) == 43
    figures = plots(report)
    assert set(figures) == {"quality_score_by_origin", "diversity_by_set"} and all(v.startswith("![") for v in figures.values())


def test_eval_scores_sample_large_sets_but_count_them_whole(materialized, tokenizer):  # noqa: F811
    storage, _ = materialized
    config = PipelineConfig.model_validate({"evals": {"max_texts": 5}})
    sets = {r["set"]: r for r in score_partition(storage, config, "pt", "high", tokenizer.count).scores.to_dicts()}
    assert sets["rewrite:easy"]["rows"] == 12 and sets["rewrite:easy"]["scored"] <= 5
    assert sets["mix:demo"]["rows"] > 5 and sets["mix:demo"]["scored"] <= 5


def test_eval_scores_of_a_partition_with_nothing_published(tmp_path, tokenizer):  # noqa: F811
    from synth_cpt.core.contracts import check_scores
    from synth_cpt.core.storage import LocalStorage

    report = score_partition(LocalStorage(tmp_path), PipelineConfig(), "pt", "high", tokenizer.count)
    assert report.scores.height == 0 and "near_duplicate_rate" in report.scores.columns
    assert check_scores(report.scores).success
